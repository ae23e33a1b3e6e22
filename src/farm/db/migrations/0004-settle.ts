/**
 * Settling builds when their steps finish: a finished member finds the aggregates it belongs
 * to without a scan of `aggregate_members`.
 */
import type { Kysely } from "kysely";
import { runStatements } from "./statements.js";

export const name = "0004-settle";

export async function up(db: Kysely<unknown>): Promise<void> {
  await runStatements(db, `create index aggregate_members_member on aggregate_members (member_id);`);
}

/**
 * The farm's event outbox (`farm_events`): a row per `noun:verb` event, written in the same
 * transaction as the change it reports, so an event exists exactly when its change does.
 * Webhook delivery reads it (src/farm/webhooks.ts).
 */
import { sql, type Kysely, type Transaction } from "kysely";
import type { FarmSchema } from "./index.js";

type Db = Kysely<FarmSchema> | Transaction<FarmSchema>;

export type BuildStatus = "queued" | "succeeded" | "failed" | "dependency-failed" | "cancelled";

/** The events the farm writes, with their payloads. */
export interface FarmEvents {
  "build:finished": { buildId: string; project: string; jobset: string; job: string; status: BuildStatus; drvPath: string };
  "step:finished": { stepId: string; drvPath: string; status: string };
  "evaluation:finished": {
    evaluationId: string;
    project: string;
    jobset: string;
    status: "succeeded" | "failed";
    builds: number;
    /** Jobs that are new or whose derivation changed since the previous evaluation. */
    changed: number;
    revision: string | null;
    error?: string;
  };
}

export type FarmEventKind = keyof FarmEvents;
export const EVENT_KINDS: readonly FarmEventKind[] = ["build:finished", "step:finished", "evaluation:finished"];

export async function recordEvent<K extends FarmEventKind>(db: Db, kind: K, payload: FarmEvents[K]): Promise<string> {
  const r = await sql<{ id: string }>`insert into farm_events (kind, payload) values (${kind}, ${JSON.stringify(payload)}::jsonb) returning id::text as id`.execute(db);
  return r.rows[0]!.id;
}

/** The project and jobset names of a jobset id. */
export async function jobsetNames(db: Db, jobsetId: number): Promise<{ project: string; jobset: string }> {
  const r = await sql<{ project: string; jobset: string }>`
    select p.name as project, j.name as jobset from jobsets j join projects p on p.id = j.project_id where j.id = ${jobsetId}`.execute(db);
  const row = r.rows[0];
  if (!row) throw new Error(`no jobset ${jobsetId}`);
  return row;
}

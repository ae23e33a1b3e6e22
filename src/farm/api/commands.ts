/**
 * Asking the scheduling leader for changes to steps: a row in `farm_commands`, which the leader
 * applies in id order and answers with per-item results. Any coordinator (or tool) can ask;
 * only the leader changes steps, so the in-memory scheduler and the database never disagree.
 *
 * Payload: `{ "steps": ["<step id>", …], "bump"?: <int> }`. Result:
 * `{ "items": [{ "id", "ok": true, "value"? } | { "id", "ok": false, "error": { code, message, hint } }] }`.
 */
import { sql, type Kysely, type Transaction } from "kysely";
import type { FarmSchema } from "../db/index.js";
import type { ErrorBody } from "./http.js";

type Db = Kysely<FarmSchema> | Transaction<FarmSchema>;

export type CommandKind = "cancel" | "restart" | "bump";

export interface CommandPayload {
  readonly steps: readonly string[];
  /** For `bump`: the new priority (higher first). */
  readonly bump?: number;
}

export type ItemResult<T = unknown> = { readonly id: string; readonly ok: true; readonly value?: T } | { readonly id: string; readonly ok: false; readonly error: ErrorBody };

export type CommandOutcome =
  | { readonly applied: true; readonly id: string; readonly items: readonly ItemResult[] }
  /** No leader applied it in time; it stays queued and is applied when one runs. */
  | { readonly applied: false; readonly id: string };

/** Queues a command (in `tx`, so it commits with the caller's own changes); returns its id. */
export async function insertCommand(tx: Db, kind: CommandKind, payload: CommandPayload): Promise<string> {
  const r = await sql<{ id: string }>`insert into farm_commands (kind, payload) values (${kind}, ${JSON.stringify(payload)}::jsonb) returning id::text as id`.execute(tx);
  return r.rows[0]!.id;
}

export interface WaitOptions {
  /** How long to wait for the leader (default 10 s). */
  readonly waitMs?: number;
  /** How often to look (default 50 ms). */
  readonly pollMs?: number;
}

/** Waits until the leader has applied command `id`, or `waitMs` passed. */
export async function awaitCommand(db: Db, id: string, opts: WaitOptions = {}): Promise<CommandOutcome> {
  const deadline = Date.now() + (opts.waitMs ?? 10_000);
  for (;;) {
    const r = await sql<{ applied_at: Date | null; result: { items?: ItemResult[] } | null }>`select applied_at, result from farm_commands where id = ${id}`.execute(db);
    const row = r.rows[0];
    if (!row) throw new Error(`command ${id} disappeared`);
    if (row.applied_at !== null) return { applied: true, id, items: row.result?.items ?? [] };
    if (Date.now() >= deadline) return { applied: false, id };
    await new Promise((res) => setTimeout(res, opts.pollMs ?? 50));
  }
}

/** Queues a command and waits for its per-item results. */
export async function submitCommand(db: Kysely<FarmSchema>, kind: CommandKind, payload: CommandPayload, opts: WaitOptions = {}): Promise<CommandOutcome> {
  return awaitCommand(db, await insertCommand(db, kind, payload), opts);
}

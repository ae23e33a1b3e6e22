/**
 * Dispatch: the scheduling leader, its intake of new steps, a command queue for the changes
 * other processes ask of the scheduler, an outbox of farm events (for webhooks), and the
 * steps' logs and outputs.
 *
 * - `steps.scheduled`: false until the leader has taken the step into its in-memory scheduler;
 *   ingest writes steps with false, the leader takes them in (and sets true) in batches.
 * - `farm_commands`: cancel / restart / bump, applied by the leader in id order; the API waits
 *   for `applied_at` and reads `result`. Kinds and payloads: see src/farm/commands.ts.
 * - `farm_events`: written in the same transaction as the change they report
 *   (`build:finished`, `step:finished`, `evaluation:finished`), read by webhook delivery.
 * - `farm_leader`: the one row naming the coordinator that schedules (workers are redirected to it).
 * - `build_steps (step_id)`: a finished step finds its builds without a scan.
 */
import type { Kysely } from "kysely";
import { runStatements } from "./statements.js";

export const name = "0002-dispatch";

const SCHEMA = `
    alter table steps add column scheduled boolean not null default false;
    create index steps_unscheduled on steps (id) where not scheduled;
    alter table steps add column outputs jsonb;
    create index build_steps_step on build_steps (step_id);
    create table farm_commands (
      id bigserial primary key,
      kind text not null check (kind in ('cancel', 'restart', 'bump')),
      payload jsonb not null,
      created_at timestamptz not null default now(),
      applied_at timestamptz,
      result jsonb
    );
    create index farm_commands_pending on farm_commands (id) where applied_at is null;
    create table farm_events (
      id bigserial primary key,
      kind text not null,
      payload jsonb not null,
      created_at timestamptz not null default now()
    );
    create table farm_leader (
      id smallint primary key check (id = 1),
      owner text not null,
      url text not null,
      since timestamptz not null default now()
    )
`;

export const up = (db: Kysely<unknown>): Promise<void> => runStatements(db, SCHEMA);

/**
 * The farm's interfaces: stored tokens get an id (to list and revoke them without their
 * secret), projects may declare their jobsets in a file of a repository, and outgoing webhooks
 * are delivered at least once from the event outbox.
 *
 * - `tokens.id`: a stable handle for `GET|DELETE /api/tokens`.
 * - `projects.decl_*`: the declarative spec (repository, branch, file, how often to read it),
 *   when it was last read, the hash of what was applied, and the last error.
 * - `farm_events.fanned_out`: false until the event has been turned into one delivery per
 *   matching webhook; claimed with `FOR UPDATE SKIP LOCKED`, so each event is fanned out once
 *   even with several coordinators, and none is skipped (a cursor over ids could pass an event
 *   whose transaction commits late). Events written before this migration count as done.
 * - `webhooks`: where to POST which events (`build:finished`, `evaluation:finished`, …),
 *   optionally only one project's, signed with the secret.
 * - `webhook_deliveries`: one per webhook and event; retried with backoff until a 2xx answer
 *   (`delivered_at`) or until it is given up (`next_attempt_at` null, `last_error` kept).
 */
import type { Kysely } from "kysely";
import { runStatements } from "./statements.js";

export const name = "0003-interfaces";

const SCHEMA = `
    alter table tokens add column id bigserial;
    create unique index tokens_id on tokens (id);
    alter table projects add column decl_repo text;
    alter table projects add column decl_branch text;
    alter table projects add column decl_file text;
    alter table projects add column decl_check_interval_s integer not null default 300 check (decl_check_interval_s >= 0);
    alter table projects add column decl_checked_at timestamptz;
    alter table projects add column decl_spec_hash text;
    alter table projects add column decl_error text;
    alter table farm_events add column fanned_out boolean not null default true;
    alter table farm_events alter column fanned_out set default false;
    create index farm_events_unfanned on farm_events (id) where not fanned_out;
    create table webhooks (
      id bigserial primary key,
      url text not null,
      events text[] not null,
      secret text not null,
      project text,
      description text not null default '',
      created_at timestamptz not null default now()
    );
    create table webhook_deliveries (
      id bigserial primary key,
      webhook_id bigint not null references webhooks(id) on delete cascade,
      event_id bigint not null references farm_events(id) on delete cascade,
      attempts integer not null default 0,
      next_attempt_at timestamptz default now(),
      delivered_at timestamptz,
      last_error text,
      unique (webhook_id, event_id)
    );
    create index webhook_deliveries_due on webhook_deliveries (next_attempt_at) where delivered_at is null and next_attempt_at is not null
`;

export const up = (db: Kysely<unknown>): Promise<void> => runStatements(db, SCHEMA);

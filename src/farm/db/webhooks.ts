/**
 * Webhook delivery state. Events are fanned out into deliveries (one per matching webhook) by
 * claiming unfanned events with `FOR UPDATE SKIP LOCKED`; deliveries are claimed the same way
 * and leased (their next attempt moved past the request's timeout) while they are sent, so two
 * coordinators never send one at the same time.
 */
import { sql, type Kysely } from "kysely";
import type { FarmSchema } from "./index.js";

/** Counts of deliveries by state (`delivered`, `pending`, `failed`: given up), over rows `d`. */
export const DELIVERY_COUNTS = sql`count(d.id) filter (where d.delivered_at is not null) as delivered,
  count(d.id) filter (where d.delivered_at is null and d.next_attempt_at is not null) as pending,
  count(d.id) filter (where d.delivered_at is null and d.next_attempt_at is null) as failed`;

/** Turns up to `limit` new events into deliveries; returns how many events it took. */
export async function fanOutEvents(db: Kysely<FarmSchema>, limit: number): Promise<number> {
  const r = await sql<{ id: string }>`
    with ev as (
      select id, kind, payload from farm_events where not fanned_out order by id limit ${limit} for update skip locked
    ), made as (
      insert into webhook_deliveries (webhook_id, event_id)
      select w.id, ev.id from ev join webhooks w on ev.kind = any(w.events) and (w.project is null or w.project = ev.payload->>'project')
      on conflict (webhook_id, event_id) do nothing
      returning id
    )
    update farm_events set fanned_out = true where id in (select id from ev) returning id`.execute(db);
  return r.rows.length;
}

export interface DueDelivery {
  readonly id: string;
  /** Including this one. */
  readonly attempts: number;
  readonly url: string;
  readonly secret: string;
  readonly eventId: string;
  readonly kind: string;
  readonly payload: unknown;
  readonly createdAt: Date;
}

/** Claims up to `limit` deliveries that are due, counting the attempt and leasing them for `leaseMs`. */
export async function claimDeliveries(db: Kysely<FarmSchema>, limit: number, leaseMs: number): Promise<DueDelivery[]> {
  const r = await sql<{ id: string; attempts: number; url: string; secret: string; event_id: string; kind: string; payload: unknown; created_at: Date }>`
    update webhook_deliveries d set attempts = d.attempts + 1, next_attempt_at = now() + ${leaseMs} * interval '1 millisecond'
    from (
      select id from webhook_deliveries where delivered_at is null and next_attempt_at <= now() order by next_attempt_at, id limit ${limit} for update skip locked
    ) due, webhooks w, farm_events e
    where d.id = due.id and w.id = d.webhook_id and e.id = d.event_id
    returning d.id::text as id, d.attempts, w.url, w.secret, e.id::text as event_id, e.kind, e.payload, e.created_at`.execute(db);
  return r.rows.map((x) => ({ id: x.id, attempts: x.attempts, url: x.url, secret: x.secret, eventId: x.event_id, kind: x.kind, payload: x.payload, createdAt: x.created_at }));
}

/** Records an attempt's outcome: delivered, retried after `retryMs`, or given up (retryMs null). */
export async function recordAttempt(db: Kysely<FarmSchema>, id: string, outcome: { delivered: true } | { delivered: false; error: string; retryMs: number | null }): Promise<void> {
  if (outcome.delivered) {
    await sql`update webhook_deliveries set delivered_at = now(), next_attempt_at = null, last_error = null where id = ${id}`.execute(db);
  } else {
    await sql`
      update webhook_deliveries set last_error = ${outcome.error},
        next_attempt_at = ${outcome.retryMs === null ? null : sql`now() + ${outcome.retryMs} * interval '1 millisecond'`}
      where id = ${id}`.execute(db);
  }
}

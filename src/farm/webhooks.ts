/**
 * Outgoing webhooks, delivered at least once: events from the outbox (`farm_events`) are fanned
 * out into one delivery per matching webhook, and each delivery is POSTed until the receiver
 * answers 2xx, with exponential backoff (1 s, 2 s, 4 s, … at most 10 min apart), giving up after
 * `maxAttempts` with the last error kept. A receiver may see an event twice (a coordinator that
 * dies after sending, before recording): `X-Ferry-Delivery` tells repeats apart.
 *
 * A request: `POST <url>` with the JSON body `{ delivery, event, eventId, createdAt, payload }`
 * and the headers `X-Ferry-Event: <kind>`, `X-Ferry-Delivery: <delivery id>` and
 * `X-Ferry-Signature-256: sha256=<HMAC-SHA256 of the body with the webhook's secret, hex>`.
 */
import { createHmac } from "node:crypto";
import type { Kysely } from "kysely";
import type { FarmSchema } from "./db/index.js";
import { claimDeliveries, fanOutEvents, recordAttempt, type DueDelivery } from "./db/webhooks.js";
import { startLoop, type Loop } from "./loop.js";

export interface DeliveryOptions {
  readonly db: Kysely<FarmSchema>;
  /** How often to look for events and due deliveries (ms; 0: only when poked). Default 500. */
  readonly everyMs?: number;
  /** The first retry's delay (default 1000 ms); each next one doubles. */
  readonly retryBaseMs?: number;
  /** The longest delay between attempts (default 10 min). */
  readonly retryMaxMs?: number;
  /** Attempts before giving up (default 12). */
  readonly maxAttempts?: number;
  /** How long a receiver may take to answer (default 10 s). */
  readonly timeoutMs?: number;
  /** Deliveries sent at once (default 8). */
  readonly concurrency?: number;
}

/** The delay before the attempt after `attempts` failed ones. */
export function retryDelayMs(attempts: number, baseMs = 1000, maxMs = 600_000): number {
  return Math.min(maxMs, baseMs * 2 ** Math.max(0, attempts - 1));
}

export const signBody = (secret: string, body: string): string => `sha256=${createHmac("sha256", secret).update(body).digest("hex")}`;

async function send(d: DueDelivery, timeoutMs: number): Promise<string | undefined> {
  const body = JSON.stringify({ delivery: d.id, event: d.kind, eventId: d.eventId, createdAt: d.createdAt, payload: d.payload });
  try {
    const res = await fetch(d.url, {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        "User-Agent": "ferry-farm",
        "X-Ferry-Event": d.kind,
        "X-Ferry-Delivery": d.id,
        "X-Ferry-Signature-256": signBody(d.secret, body),
      },
      body,
      signal: AbortSignal.timeout(timeoutMs),
      redirect: "manual",
    });
    await res.arrayBuffer().catch(() => undefined);
    return res.status >= 200 && res.status < 300 ? undefined : `HTTP ${res.status}`;
  } catch (e) {
    const err = e as Error;
    return err.name === "TimeoutError" ? `no answer within ${timeoutMs} ms` : ((err.cause as Error | undefined)?.message ?? err.message);
  }
}

/** Starts fanning out and delivering; `poke` runs a pass now (an event was just written). */
export function startWebhookDelivery(opts: DeliveryOptions): Loop {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const maxAttempts = opts.maxAttempts ?? 12;
  const batch = opts.concurrency ?? 8;
  const pass = async (): Promise<void> => {
    while ((await fanOutEvents(opts.db, 500)) === 500);
    for (;;) {
      const due = await claimDeliveries(opts.db, batch, timeoutMs + 30_000);
      await Promise.all(
        due.map(async (d) => {
          const error = await send(d, timeoutMs);
          await recordAttempt(
            opts.db,
            d.id,
            error === undefined ? { delivered: true } : { delivered: false, error: `attempt ${d.attempts}: ${error}`, retryMs: d.attempts >= maxAttempts ? null : retryDelayMs(d.attempts, opts.retryBaseMs, opts.retryMaxMs) },
          );
        }),
      );
      if (due.length < batch) return;
    }
  };
  return startLoop("delivering webhooks", opts.everyMs ?? 500, pass);
}

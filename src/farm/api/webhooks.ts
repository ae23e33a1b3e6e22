/** Outgoing webhooks (admin): add one (its secret is shown once), list, remove, see its deliveries. */
import { randomBytes } from "node:crypto";
import { sql } from "kysely";
import { EVENT_KINDS } from "../db/events.js";
import { DELIVERY_COUNTS } from "../db/webhooks.js";
import type { ApiContext } from "./context.js";
import { ApiError, checkId, checkName, ok, str, strings, type Route } from "./http.js";

const DEFAULT_EVENTS = ["build:finished", "evaluation:finished"];

export function webhookRoutes(ctx: ApiContext): Route[] {
  const db = ctx.db;
  const exists = async (id: string) => {
    const r = await sql`select 1 from webhooks where id = ${id}`.execute(db);
    if (r.rows.length === 0) throw new ApiError(404, "FERRY_FARM_NO_WEBHOOK", `there is no webhook ${id}`, "list them with `ferry farm webhook list`");
  };
  return [
    {
      method: "POST",
      path: "/api/webhooks",
      access: "admin",
      run: async (req) => {
        const body = await req.json();
        const url = str(body, "url", true);
        let parsed: URL | undefined;
        try {
          parsed = new URL(url);
        } catch {
          parsed = undefined;
        }
        if (!parsed || !/^https?:$/.test(parsed.protocol)) throw new ApiError(400, "FERRY_FARM_BAD_FIELD", `'${url}' is not an http(s) URL`, "e.g. https://hooks.example.org/ferry");
        const events = strings(body, "events") ?? DEFAULT_EVENTS;
        const unknown = events.filter((e) => !(EVENT_KINDS as readonly string[]).includes(e));
        if (events.length === 0 || unknown.length) throw new ApiError(400, "FERRY_FARM_BAD_FIELD", `unknown event kinds: ${unknown.join(", ") || "(none given)"}`, `use some of ${EVENT_KINDS.join(", ")}`);
        const project = str(body, "project", false);
        if (project !== undefined) {
          checkName("project", project);
          const p = await sql`select 1 from projects where name = ${project}`.execute(db);
          if (p.rows.length === 0) throw new ApiError(404, "FERRY_FARM_NO_PROJECT", `there is no project ${project}`, "add it with `ferry farm project add`, or leave --project out for every project");
        }
        const secret = str(body, "secret", false) ?? randomBytes(24).toString("base64url");
        const description = str(body, "description", false) ?? "";
        const r = await sql<{ id: string; created_at: Date }>`
          insert into webhooks (url, events, secret, project, description) values (${url}, ${sql.val([...new Set(events)])}::text[], ${secret}, ${project ?? null}, ${description})
          returning id::text as id, created_at`.execute(db);
        return ok({ id: r.rows[0]!.id, url, events: [...new Set(events)], project: project ?? null, description, createdAt: r.rows[0]!.created_at, secret }, 201);
      },
    },
    {
      method: "GET",
      path: "/api/webhooks",
      access: "admin",
      run: async () => {
        const r = await sql<{ id: string; url: string; events: string[]; project: string | null; description: string; created_at: Date; delivered: string; pending: string; failed: string }>`
          select w.id::text as id, w.url, w.events, w.project, w.description, w.created_at, ${DELIVERY_COUNTS}
          from webhooks w left join webhook_deliveries d on d.webhook_id = w.id group by w.id order by w.id`.execute(db);
        return ok(
          r.rows.map((w) => ({
            id: w.id,
            url: w.url,
            events: w.events,
            project: w.project,
            description: w.description,
            createdAt: w.created_at,
            deliveries: { delivered: Number(w.delivered), pending: Number(w.pending), failed: Number(w.failed) },
          })),
        );
      },
    },
    {
      method: "DELETE",
      path: "/api/webhooks/{id}",
      access: "admin",
      run: async (req) => {
        const id = checkId("webhook", req.params.id!);
        await exists(id);
        await sql`delete from webhooks where id = ${id}`.execute(db);
        return ok({ deleted: id });
      },
    },
    {
      method: "GET",
      path: "/api/webhooks/{id}/deliveries",
      access: "admin",
      run: async (req) => {
        const id = checkId("webhook", req.params.id!);
        await exists(id);
        const r = await sql<{ id: string; event_id: string; kind: string; attempts: number; next_attempt_at: Date | null; delivered_at: Date | null; last_error: string | null }>`
          select d.id::text as id, d.event_id::text as event_id, e.kind, d.attempts, d.next_attempt_at, d.delivered_at, d.last_error
          from webhook_deliveries d join farm_events e on e.id = d.event_id where d.webhook_id = ${id} order by d.id desc limit 100`.execute(db);
        return ok(
          r.rows.map((d) => ({
            id: d.id,
            eventId: d.event_id,
            event: d.kind,
            attempts: d.attempts,
            state: d.delivered_at ? "delivered" : d.next_attempt_at ? "pending" : "failed",
            nextAttemptAt: d.next_attempt_at,
            deliveredAt: d.delivered_at,
            lastError: d.last_error,
          })),
        );
      },
    },
  ];
}

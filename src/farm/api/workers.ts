/**
 * The dispatcher's routes: connected workers (and draining one), and steps with their live
 * logs. The worker WebSocket itself (`GET /api/worker`) is an upgrade, handled by the dispatcher.
 * Every coordinator serves them: steps come from the database, and what only the scheduling
 * leader has (its workers, the logs it writes) is a 307 to the leader from the others.
 */
import { sql } from "kysely";
import type { Dispatcher } from "../dispatch/dispatcher.js";
import { currentLeaderUrl } from "../dispatch/leader.js";
import type { ApiContext } from "./context.js";
import { ApiError, ok, type Reply, type Route } from "./http.js";
import { logSize, type LogFollowers } from "./step-log.js";

export interface WorkerRouteOptions {
  /** The dispatcher (throws while the coordinator is starting); undefined on a coordinator that does not schedule (`--no-dispatch`). */
  readonly dispatcher: () => Dispatcher | undefined;
  /** Log followers, with the dispatcher. */
  readonly logs: LogFollowers | undefined;
  /** The URL this coordinator is known by (as the leader, in `farm_leader`); undefined while starting. */
  readonly publicUrl: () => string | undefined;
  /** A finished step's log as its worker uploaded it to the farm cache (for logs this coordinator did not write: another leader ran the step). */
  readonly cachedLog?: (drvPath: string) => Promise<Uint8Array | undefined>;
}

export function workerRoutes(ctx: ApiContext, opts: WorkerRouteOptions): Route[] {
  const { dispatcher, logs } = opts;
  const stepRow = async (id: string) => {
    if (!/^[0-9]{1,18}$/.test(id)) throw new ApiError(400, "FERRY_FARM_BAD_ID", `'${id}' is not a step id`, "step ids are numbers");
    const r = await sql<{ id: string; drv_path: string; name: string; system: string; status: string; attempts: number; machine: string | null; started_at: Date | null; finished_at: Date | null; duration_ms: number | null; error: string | null; outputs: unknown }>`
      select id::text as id, drv_path, name, system, status, attempts, machine, started_at, finished_at, duration_ms, error, outputs from steps where id = ${id}`.execute(ctx.db);
    const row = r.rows[0];
    if (!row) throw new ApiError(404, "FERRY_FARM_UNKNOWN_STEP", `there is no step ${id}`, "a build's steps are listed by GET /api/builds/{id}");
    return row;
  };
  /**
   * The dispatcher when this coordinator leads; else a 307 to the leader; else (no one leads
   * now) this coordinator's own dispatcher, or a 404 on one without.
   */
  const scheduling = async (req: { raw: { url?: string | undefined } }): Promise<Dispatcher | Reply> => {
    const d = dispatcher();
    if (d?.isLeader()) return d;
    const leader = await leaderUrl();
    if (leader !== undefined) return toLeader(leader, req);
    if (d) return d;
    throw new ApiError(404, "FERRY_FARM_NO_SCHEDULER", "this coordinator does not schedule (--no-dispatch), and no coordinator leads now", "start a coordinator without --no-dispatch on the same database");
  };
  return [
    {
      method: "GET",
      path: "/api/workers",
      access: "read",
      run: async (req) => {
        const d = await scheduling(req);
        return "status" in d ? d : ok(d.workers());
      },
    },
    {
      method: "POST",
      path: "/api/workers/{id}/drain",
      access: "admin",
      run: async (req) => {
        const d = await scheduling(req);
        if ("status" in d) return d;
        const id = req.params.id!;
        if (!d.drain(id)) throw new ApiError(404, "FERRY_FARM_UNKNOWN_WORKER", `no worker '${id}' is connected here`, "see GET /api/workers; a worker connects to the scheduling coordinator");
        return ok({ worker: id, draining: true });
      },
    },
    {
      method: "GET",
      path: "/api/steps/{id}",
      access: "read",
      run: async (req) => {
        const s = await stepRow(req.params.id!);
        return ok({
          id: s.id,
          drvPath: s.drv_path,
          name: s.name,
          system: s.system,
          status: s.status,
          attempts: s.attempts,
          machine: s.machine,
          startedAt: s.started_at,
          finishedAt: s.finished_at,
          durationMs: s.duration_ms,
          error: s.error,
          outputs: s.outputs,
        });
      },
    },
    {
      method: "GET",
      path: "/api/steps/{id}/log",
      access: "read",
      run: async (req): Promise<Reply> => {
        const s = await stepRow(req.params.id!);
        const follow = flag(req.query, "follow");
        const offset = offsetOf(req.query);
        const d = await scheduling(req);
        if ("status" in d) return d;
        const path = d.logPath(s.drv_path);
        const size = logSize(path);
        const live = s.status === "queued" || s.status === "running";
        if (size === undefined) {
          // The leader writes the logs of the steps it runs: send the caller there.
          const leader = d.isLeader() ? undefined : await leaderUrl();
          if (leader !== undefined) return toLeader(leader, req);
          // Run under another leader (before a failover): its worker uploaded the log to the farm cache.
          const cached = live ? undefined : await opts.cachedLog?.(s.drv_path).catch(() => undefined);
          if (cached !== undefined) {
            if (offset > cached.length) throw new ApiError(416, "FERRY_FARM_LOG_OFFSET", `step ${s.id}'s log has ${cached.length} bytes, fewer than offset ${offset}`, "ask again without offset");
            const rest = cached.subarray(offset);
            return { status: 200, contentType: "text/plain; charset=utf-8", headers: { "Content-Length": String(rest.length), "X-Ferry-Log-Source": "farm-cache" }, stream: async function* () { yield rest; } };
          }
          if (!(follow && live)) {
            throw new ApiError(404, "FERRY_FARM_NO_LOG", `step ${s.id} has no log here`, s.status === "queued" ? "the step has not started yet; add ?follow=1 to wait for it" : "logs are kept by the coordinator that scheduled the step");
          }
        } else if (offset > size) {
          throw new ApiError(416, "FERRY_FARM_LOG_OFFSET", `step ${s.id}'s log has ${size} bytes, fewer than offset ${offset}`, "the log starts again when a step is retried; ask again without offset");
        }
        const headers: Record<string, string> = follow ? { "Cache-Control": "no-store", "X-Accel-Buffering": "no" } : { "Content-Length": String((size ?? 0) - offset) };
        return {
          status: 200,
          contentType: "text/plain; charset=utf-8",
          headers,
          stream: (signal) => logs!.read({ path, stepId: s.id, status: s.status, offset, follow, ...(size !== undefined ? { end: size } : {}) }, signal),
        };
      },
    },
  ];

  /** The scheduling leader's URL when it is another coordinator. */
  async function leaderUrl(): Promise<string | undefined> {
    const url = (await currentLeaderUrl(ctx.fdb))?.replace(/\/+$/, "");
    return url !== undefined && url !== opts.publicUrl() ? url : undefined;
  }
}

/** The same request, at the leader. */
function toLeader(leader: string, req: { raw: { url?: string | undefined } }): Reply {
  return { status: 307, json: { leader }, headers: { Location: `${leader}${req.raw.url ?? ""}` } };
}

/** A yes/no query parameter: `?follow`, `?follow=1`, `?follow=true`. */
function flag(q: URLSearchParams, name: string): boolean {
  const v = q.get(name);
  if (v === null || v === "0" || v === "false") return false;
  if (v === "" || v === "1" || v === "true") return true;
  throw new ApiError(400, "FERRY_FARM_BAD_QUERY", `'${name}=${v}' is not a yes or no`, `use ${name}=1 or leave it out`);
}

/** `?offset=N`: the first byte to send (default 0). */
function offsetOf(q: URLSearchParams): number {
  const v = q.get("offset");
  if (v === null) return 0;
  if (!/^[0-9]{1,15}$/.test(v)) throw new ApiError(400, "FERRY_FARM_BAD_OFFSET", `'offset=${v}' is not a byte offset`, "offset is a whole number of bytes, 0 or more");
  return Number(v);
}

/**
 * The dispatcher's routes: connected workers (and draining one), and steps with their live
 * logs. The worker WebSocket itself (`GET /api/worker`) is an upgrade, handled by the dispatcher.
 */
import * as fs from "node:fs";
import { sql } from "kysely";
import type { Dispatcher } from "../dispatch/dispatcher.js";
import type { ApiContext } from "./context.js";
import { ApiError, ok, type Route } from "./http.js";

export function workerRoutes(ctx: ApiContext, dispatcher: () => Dispatcher): Route[] {
  const stepRow = async (id: string) => {
    if (!/^[0-9]{1,18}$/.test(id)) throw new ApiError(400, "FERRY_FARM_BAD_ID", `'${id}' is not a step id`, "step ids are numbers");
    const r = await sql<{ id: string; drv_path: string; name: string; system: string; status: string; attempts: number; machine: string | null; started_at: Date | null; finished_at: Date | null; duration_ms: number | null; error: string | null; outputs: unknown }>`
      select id::text as id, drv_path, name, system, status, attempts, machine, started_at, finished_at, duration_ms, error, outputs from steps where id = ${id}`.execute(ctx.db);
    const row = r.rows[0];
    if (!row) throw new ApiError(404, "FERRY_FARM_UNKNOWN_STEP", `there is no step ${id}`, "a build's steps are listed by GET /api/builds/{id}");
    return row;
  };
  return [
    { method: "GET", path: "/api/workers", access: "read", run: async () => ok(dispatcher().workers()) },
    {
      method: "POST",
      path: "/api/workers/{id}/drain",
      access: "admin",
      run: async (req) => {
        const id = req.params.id!;
        if (!dispatcher().drain(id)) throw new ApiError(404, "FERRY_FARM_UNKNOWN_WORKER", `no worker '${id}' is connected here`, "see GET /api/workers; a worker connects to the scheduling coordinator");
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
      run: async (req) => {
        const s = await stepRow(req.params.id!);
        let text: string;
        try {
          text = fs.readFileSync(dispatcher().logPath(s.drv_path), "utf8");
        } catch {
          throw new ApiError(404, "FERRY_FARM_NO_LOG", `step ${s.id} has no log here`, s.status === "queued" ? "the step has not started yet" : "logs are kept by the coordinator that scheduled the step");
        }
        return { status: 200, text, contentType: "text/plain; charset=utf-8" };
      },
    },
  ];
}

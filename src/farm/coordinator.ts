/**
 * The coordinator's HTTP API (a first slice): projects and jobsets, evaluations on demand,
 * and the builds of a jobset's latest evaluation. JSON in and out; errors are
 * `{ "error": { code, message, hint } }` with a 4xx/5xx status. Mutations need the admin
 * token; reads are public unless a read token is set.
 *
 *   PUT  /api/projects/:project                                  { description? }
 *   PUT  /api/projects/:project/jobsets/:jobset                  { repo, file, branch?, attr?, checkInterval?, state?, shares? }
 *   POST /api/projects/:project/jobsets/:jobset/evaluations[?wait=1]
 *   GET  /api/projects/:project/jobsets/:jobset/evaluations
 *   GET  /api/projects/:project/jobsets/:jobset/builds           (the latest successful evaluation)
 *   GET  /api/health
 *   GET  /metrics                                                 (Prometheus text)
 *
 * Jobsets whose check interval has passed are evaluated by a loop; a due jobset is claimed
 * with `FOR UPDATE SKIP LOCKED`, so several coordinators on one database evaluate it once.
 * A one-shot jobset (state 2) is disabled after its evaluation.
 */
import * as http from "node:http";
import { createHash, timingSafeEqual } from "node:crypto";
import { sql } from "kysely";
import { FerryError, isFerryError } from "../core/errors.js";
import type { LocalStore } from "../store/local-store.js";
import type { FarmDatabase } from "./db/index.js";
import { evaluateJobset, type EvaluationOutcome } from "./evaluator.js";

export interface CoordinatorOptions {
  readonly db: FarmDatabase;
  readonly store: LocalStore;
  readonly dataDir: string;
  readonly host?: string;
  readonly port?: number;
  readonly adminToken: string;
  readonly workerToken?: string;
  readonly readToken?: string;
  readonly evalTimeoutSeconds?: number;
  readonly evalMemoryMiB?: number;
  /** How often to look for jobsets whose check interval has passed (ms; 0 turns it off). */
  readonly checkEveryMs?: number;
}

export interface Coordinator {
  readonly url: string;
  close(): Promise<void>;
}

class ApiError extends FerryError {
  readonly status: number;
  constructor(status: number, code: string, message: string, hint?: string) {
    super(code, message, hint === undefined ? {} : { hint });
    this.status = status;
  }
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const digest = (t: string) => createHash("sha256").update(t).digest();

function checkName(kind: string, v: string): string {
  if (!NAME.test(v)) throw new ApiError(400, "FERRY_FARM_BAD_NAME", `'${v}' is not a valid ${kind} name`, "use letters, digits, '.', '_' and '-' (at most 64)");
  return v;
}

async function readJson(req: http.IncomingMessage): Promise<Record<string, unknown>> {
  let text = "";
  for await (const c of req) {
    text += (c as Buffer).toString("utf8");
    if (text.length > 1 << 20) throw new ApiError(413, "FERRY_FARM_TOO_LARGE", "the request body is larger than 1 MiB");
  }
  if (text.trim() === "") return {};
  try {
    const v = JSON.parse(text) as unknown;
    if (v === null || typeof v !== "object" || Array.isArray(v)) throw new Error("not an object");
    return v as Record<string, unknown>;
  } catch (e) {
    throw new ApiError(400, "FERRY_FARM_BAD_JSON", `the request body is not a JSON object: ${(e as Error).message}`);
  }
}

function str(body: Record<string, unknown>, key: string, required: boolean): string | undefined {
  const v = body[key];
  if (v === undefined || v === null) {
    if (required) throw new ApiError(400, "FERRY_FARM_MISSING_FIELD", `'${key}' is required`);
    return undefined;
  }
  if (typeof v !== "string" || v === "") throw new ApiError(400, "FERRY_FARM_BAD_FIELD", `'${key}' must be a non-empty string`);
  return v;
}

function int(body: Record<string, unknown>, key: string, min: number): number | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "number" || !Number.isInteger(v) || v < min) throw new ApiError(400, "FERRY_FARM_BAD_FIELD", `'${key}' must be an integer of at least ${min}`);
  return v;
}

export async function startCoordinator(opts: CoordinatorOptions): Promise<Coordinator> {
  const db = opts.db.db;
  const admin = digest(opts.adminToken);
  const reader = opts.readToken === undefined ? undefined : digest(opts.readToken);
  /** One evaluation at a time per jobset; later requests wait for it. */
  const running = new Map<number, Promise<EvaluationOutcome>>();

  const role = (req: http.IncomingMessage): "admin" | "read" | "none" | "wrong" => {
    const a = req.headers.authorization;
    if (a === undefined) return "none";
    const t = a.startsWith("Bearer ") ? a.slice(7).trim() : "";
    const h = digest(t);
    if (timingSafeEqual(h, admin)) return "admin";
    if (reader && timingSafeEqual(h, reader)) return "read";
    return "wrong";
  };
  const requireAdmin = (req: http.IncomingMessage) => {
    const r = role(req);
    if (r === "none") throw new ApiError(401, "FERRY_FARM_UNAUTHORIZED", "this needs the admin token", "pass --token (Authorization: Bearer TOKEN)");
    if (r !== "admin") throw new ApiError(403, "FERRY_FARM_FORBIDDEN", "the token does not allow changes", "use the admin token");
  };
  const requireRead = (req: http.IncomingMessage) => {
    const r = role(req);
    if (r === "wrong") throw new ApiError(403, "FERRY_FARM_FORBIDDEN", "the token is not valid here");
    if (reader && r === "none") throw new ApiError(401, "FERRY_FARM_UNAUTHORIZED", "this farm needs a token to read");
  };

  type JobsetRow = { id: number; repo: string; branch: string; file: string; attr: string | null; last_inputs_hash: string | null };
  const startEvaluation = (js: JobsetRow): Promise<EvaluationOutcome> => {
    let job = running.get(js.id);
    if (!job) {
      job = evaluateJobset(
        { db, store: opts.store, dataDir: opts.dataDir, ...(opts.evalTimeoutSeconds ? { timeoutSeconds: opts.evalTimeoutSeconds } : {}), ...(opts.evalMemoryMiB ? { memoryMiB: opts.evalMemoryMiB } : {}) },
        { id: js.id, repo: js.repo, branch: js.branch, file: js.file, attr: js.attr, lastInputsHash: js.last_inputs_hash },
      ).finally(() => running.delete(js.id));
      running.set(js.id, job);
    }
    return job;
  };

  /** Claims the jobsets that are due (their check interval passed) and evaluates them. */
  const checkDue = async (): Promise<void> => {
    const due = await sql<JobsetRow & { state: number }>`
      update jobsets set last_checked_at = now()
      where id in (
        select id from jobsets
        where state in (1, 2) and check_interval_s > 0
          and (last_checked_at is null or last_checked_at + check_interval_s * interval '1 second' <= now())
        for update skip locked)
      returning id, repo, branch, file, attr, last_inputs_hash, state`.execute(db);
    for (const js of due.rows) {
      if (running.has(js.id)) continue;
      void startEvaluation(js)
        .then(async () => {
          if (js.state === 2) await sql`update jobsets set state = 0 where id = ${js.id}`.execute(db);
        })
        .catch((e: unknown) => console.error(`ferry farm: evaluating jobset ${js.id} failed: ${(e as Error).message}`));
    }
  };
  let checking = false;
  const checkTimer =
    (opts.checkEveryMs ?? 5000) > 0
      ? setInterval(() => {
          if (checking) return;
          checking = true;
          checkDue()
            .catch((e: unknown) => console.error(`ferry farm: checking jobsets failed: ${(e as Error).message}`))
            .finally(() => (checking = false));
        }, opts.checkEveryMs ?? 5000)
      : undefined;

  const metrics = async (): Promise<string> => {
    const steps = await sql<{ system: string; status: string; n: string }>`select system, status, count(*) as n from steps group by system, status order by system, status`.execute(db);
    const waits = await sql<{ system: string; s: number | null }>`
      select system, extract(epoch from now() - min(created_at))::float8 as s from steps where status = 'queued' group by system order by system`.execute(db);
    const evals = await sql<{ n: string; failed: string; ms: string | null }>`
      select count(*) as n, count(*) filter (where error is not null) as failed, sum(eval_ms) as ms from evaluations`.execute(db);
    const durations = await sql<{ system: string; n: string; ms: string | null }>`
      select system, count(*) as n, sum(duration_ms) as ms from steps where duration_ms is not null group by system order by system`.execute(db);
    const lines = [
      "# HELP ferry_farm_steps Steps by system and status (queued is the queue depth).",
      "# TYPE ferry_farm_steps gauge",
      ...steps.rows.map((r) => `ferry_farm_steps{system="${r.system}",status="${r.status}"} ${r.n}`),
      "# HELP ferry_farm_queue_oldest_seconds How long the oldest queued step of a system has waited.",
      "# TYPE ferry_farm_queue_oldest_seconds gauge",
      ...waits.rows.map((r) => `ferry_farm_queue_oldest_seconds{system="${r.system}"} ${(r.s ?? 0).toFixed(3)}`),
      "# HELP ferry_farm_step_duration_seconds Build time of finished steps.",
      "# TYPE ferry_farm_step_duration_seconds summary",
      ...durations.rows.flatMap((r) => [`ferry_farm_step_duration_seconds_sum{system="${r.system}"} ${(Number(r.ms ?? 0) / 1000).toFixed(3)}`, `ferry_farm_step_duration_seconds_count{system="${r.system}"} ${r.n}`]),
      "# HELP ferry_farm_evaluations_total Evaluations, and how many failed.",
      "# TYPE ferry_farm_evaluations_total counter",
      `ferry_farm_evaluations_total ${evals.rows[0]!.n}`,
      `ferry_farm_evaluations_failed_total ${evals.rows[0]!.failed}`,
      "# HELP ferry_farm_evaluation_seconds Time spent evaluating.",
      "# TYPE ferry_farm_evaluation_seconds counter",
      `ferry_farm_evaluation_seconds_sum ${(Number(evals.rows[0]!.ms ?? 0) / 1000).toFixed(3)}`,
      `ferry_farm_evaluations_running ${running.size}`,
    ];
    return lines.join("\n") + "\n";
  };

  const jobsetRow = async (project: string, jobset: string) => {
    const r = await sql<{ id: number; repo: string; branch: string; file: string; attr: string | null; last_inputs_hash: string | null }>`
      select j.id, j.repo, j.branch, j.file, j.attr, j.last_inputs_hash from jobsets j join projects p on p.id = j.project_id
      where p.name = ${project} and j.name = ${jobset}`.execute(db);
    const row = r.rows[0];
    if (!row) throw new ApiError(404, "FERRY_FARM_NO_JOBSET", `there is no jobset ${project}/${jobset}`, "add it with `ferry farm jobset add`");
    return row;
  };

  const routes: { method: string; path: RegExp; run(req: http.IncomingMessage, m: string[], query: URLSearchParams): Promise<[number, unknown]> }[] = [
    { method: "GET", path: /^\/api\/health$/, run: async () => [200, { ok: true, database: opts.db.kind }] },
    {
      method: "PUT",
      path: /^\/api\/projects\/([^/]+)$/,
      run: async (req, [p]) => {
        requireAdmin(req);
        const body = await readJson(req);
        const name = checkName("project", p!);
        const description = str(body, "description", false) ?? "";
        await sql`insert into projects (name, description) values (${name}, ${description}) on conflict (name) do update set description = excluded.description`.execute(db);
        return [200, { project: name }];
      },
    },
    {
      method: "PUT",
      path: /^\/api\/projects\/([^/]+)\/jobsets\/([^/]+)$/,
      run: async (req, [p, j]) => {
        requireAdmin(req);
        const body = await readJson(req);
        const project = checkName("project", p!);
        const jobset = checkName("jobset", j!);
        const repo = str(body, "repo", true)!;
        const file = str(body, "file", true)!;
        const branch = str(body, "branch", false) ?? "main";
        const attr = str(body, "attr", false) ?? null;
        const interval = int(body, "checkInterval", 0) ?? 300;
        const state = int(body, "state", 0) ?? 1;
        if (state > 2) throw new ApiError(400, "FERRY_FARM_BAD_FIELD", "'state' is 0 (disabled), 1 (enabled) or 2 (one-shot)");
        const shares = int(body, "shares", 1) ?? 100;
        const pr = await sql<{ id: number }>`insert into projects (name) values (${project}) on conflict (name) do update set name = excluded.name returning id`.execute(db);
        await sql`
          insert into jobsets (project_id, name, repo, branch, file, attr, check_interval_s, state, shares)
          values (${pr.rows[0]!.id}, ${jobset}, ${repo}, ${branch}, ${file}, ${attr}, ${interval}, ${state}, ${shares})
          on conflict (project_id, name) do update set repo = excluded.repo, branch = excluded.branch, file = excluded.file, attr = excluded.attr,
            check_interval_s = excluded.check_interval_s, state = excluded.state, shares = excluded.shares`.execute(db);
        return [200, { project, jobset, repo, branch, file, attr, checkInterval: interval, state, shares }];
      },
    },
    {
      method: "POST",
      path: /^\/api\/projects\/([^/]+)\/jobsets\/([^/]+)\/evaluations$/,
      run: async (req, [p, j], query) => {
        requireAdmin(req);
        const js = await jobsetRow(p!, j!);
        const job = startEvaluation(js);
        if (query.get("wait") !== "1") {
          job.catch(() => undefined);
          return [202, { started: true }];
        }
        const o = await job;
        if (o.kind === "failed") return [200, { status: "failed", evaluation: o.evaluationId, error: { code: o.error.code, message: o.error.message, hint: o.error.hint } }];
        if (o.kind === "unchanged") return [200, { status: "unchanged", revision: o.revision }];
        return [200, { status: "evaluated", revision: o.revision, evaluation: o.result.evaluationId, builds: o.result.builds, newSteps: o.result.newSteps, changedJobs: o.result.changedJobs }];
      },
    },
    {
      method: "GET",
      path: /^\/api\/projects\/([^/]+)\/jobsets\/([^/]+)\/evaluations$/,
      run: async (req, [p, j]) => {
        requireRead(req);
        const js = await jobsetRow(p!, j!);
        const r = await sql<{ id: string; revision: string | null; started_at: Date; eval_ms: number | null; error: string | null; nr_builds: number; nr_new: number }>`
          select id, revision, started_at, eval_ms, error, nr_builds, nr_new from evaluations where jobset_id = ${js.id} order by id desc limit 100`.execute(db);
        return [200, r.rows.map((e) => ({ id: e.id, revision: e.revision, startedAt: e.started_at, evalMs: e.eval_ms, error: e.error, builds: e.nr_builds, changed: e.nr_new }))];
      },
    },
    {
      method: "GET",
      path: /^\/api\/projects\/([^/]+)\/jobsets\/([^/]+)\/builds$/,
      run: async (req, [p, j]) => {
        requireRead(req);
        const js = await jobsetRow(p!, j!);
        const r = await sql<{ id: string; job: string; drv_path: string; system: string; status: string; outputs: Record<string, string>; evaluation_id: string }>`
          select id, job, drv_path, system, status, outputs, evaluation_id from builds
          where evaluation_id = (select max(id) from evaluations where jobset_id = ${js.id} and error is null)
          order by job`.execute(db);
        return [200, r.rows.map((b) => ({ id: b.id, job: b.job, drvPath: b.drv_path, system: b.system, status: b.status, outputs: b.outputs, evaluation: b.evaluation_id }))];
      },
    },
  ];

  const server = http.createServer((req, res) => {
    void (async () => {
      const u = new URL(req.url ?? "/", "http://x");
      if (u.pathname === "/metrics" && req.method === "GET") {
        try {
          requireRead(req);
          const text = await metrics();
          res.writeHead(200, { "Content-Type": "text/plain; version=0.0.4", "Content-Length": Buffer.byteLength(text) });
          res.end(text);
        } catch (e) {
          res.writeHead(e instanceof ApiError ? e.status : 500, { "Content-Type": "text/plain" });
          res.end(`${(e as Error).message}\n`);
        }
        return;
      }
      let status = 404;
      let body: unknown = { error: { code: "FERRY_FARM_NOT_FOUND", message: `no such endpoint: ${req.method} ${u.pathname}` } };
      try {
        const candidates = routes.filter((r) => r.path.test(u.pathname));
        const route = candidates.find((r) => r.method === req.method);
        if (candidates.length && !route) throw new ApiError(405, "FERRY_FARM_METHOD", `${req.method} is not allowed on ${u.pathname}`);
        if (route) [status, body] = await route.run(req, route.path.exec(u.pathname)!.slice(1).map(decodeURIComponent), u.searchParams);
      } catch (e) {
        status = e instanceof ApiError ? e.status : isFerryError(e) ? 400 : 500;
        const fe = e as FerryError;
        body = { error: { code: fe.code ?? "FERRY_FARM_INTERNAL", message: status === 500 && !isFerryError(e) ? "internal error" : fe.message, ...(fe.hint ? { hint: fe.hint } : {}) } };
        if (status === 500 && !isFerryError(e)) console.error(`ferry farm: ${req.method} ${u.pathname}: ${(e as Error).stack ?? String(e)}`);
      }
      const text = JSON.stringify(body);
      res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(text) });
      res.end(text);
    })();
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (e: NodeJS.ErrnoException) =>
      reject(new FerryError("FERRY_FARM_LISTEN_FAILED", `cannot listen on ${opts.host ?? "127.0.0.1"}:${opts.port ?? 0}: ${e.message}`, { hint: "pick another --listen HOST:PORT" })),
    );
    server.listen(opts.port ?? 0, opts.host ?? "127.0.0.1", () => resolve());
  });
  const addr = server.address() as { address: string; port: number };
  return {
    url: `http://${addr.address}:${addr.port}`,
    close: async () => {
      if (checkTimer) clearInterval(checkTimer);
      await Promise.allSettled(running.values());
      await new Promise<void>((r) => {
        server.close(() => r());
        server.closeAllConnections();
      });
    },
  };
}

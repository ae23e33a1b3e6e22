/** A jobset's evaluations: start one, list them, diff two, and the builds of the latest. */
import { sql } from "kysely";
import { diffEvaluations } from "../db/ingest.js";
import { latestBuilds, type BuildInfo } from "../db/builds.js";
import { jobsetRow, type ApiContext } from "./context.js";
import { ApiError, checkId, errorBody, ok, type Route } from "./http.js";

/** A build as the API lists it. */
export const buildJson = (b: BuildInfo) => ({
  id: b.id,
  project: b.project,
  jobset: b.jobset,
  job: b.job,
  evaluation: b.evaluation,
  drvPath: b.drvPath,
  system: b.system,
  status: b.status,
  outputs: b.outputs,
  isAggregate: b.isAggregate,
  createdAt: b.createdAt,
  finishedAt: b.finishedAt,
  step: b.step,
});

type EvalRow = { id: string; revision: string | null; started_at: Date; eval_ms: number | null; error: string | null; nr_builds: number; nr_new: number };

const evaluationJson = (e: EvalRow) => ({ id: e.id, revision: e.revision, startedAt: e.started_at, evalMs: e.eval_ms, error: e.error, builds: e.nr_builds, changed: e.nr_new });

export function evaluationRoutes(ctx: ApiContext): Route[] {
  const db = ctx.db;
  /** An evaluation of the jobset by id or `latest` (the latest successful one). */
  const evaluation = async (jobsetId: number, ref: string): Promise<EvalRow> => {
    const r = await sql<EvalRow>`
      select id::text as id, revision, started_at, eval_ms, error, nr_builds, nr_new from evaluations e
      where e.jobset_id = ${jobsetId} and ${ref === "latest" ? sql`e.id = (select max(id) from evaluations where jobset_id = ${jobsetId} and error is null)` : sql`e.id = ${checkId("evaluation", ref)}`}`.execute(db);
    const e = r.rows[0];
    if (!e) throw new ApiError(404, "FERRY_FARM_NO_EVALUATION", ref === "latest" ? "the jobset has no successful evaluation yet" : `the jobset has no evaluation ${ref}`, "list them with `ferry farm evals`");
    if (e.error !== null) throw new ApiError(409, "FERRY_FARM_EVALUATION_FAILED", `evaluation ${e.id} failed and has no jobs`, "pick a successful evaluation (`ferry farm evals`)");
    return e;
  };
  return [
    {
      method: "POST",
      path: "/api/projects/{project}/jobsets/{jobset}/evaluations",
      access: "admin",
      run: async (req) => {
        const js = await jobsetRow(db, req.params.project!, req.params.jobset!);
        const job = ctx.evaluations.start(js);
        if (req.query.get("wait") !== "1") {
          job.catch(() => undefined);
          return ok({ started: true }, 202);
        }
        const o = await job;
        if (o.kind === "failed") return ok({ status: "failed", evaluation: o.evaluationId, error: errorBody(o.error) });
        if (o.kind === "unchanged") return ok({ status: "unchanged", revision: o.revision });
        return ok({ status: "evaluated", revision: o.revision, evaluation: o.result.evaluationId, builds: o.result.builds, newSteps: o.result.newSteps, changedJobs: o.result.changedJobs });
      },
    },
    {
      method: "GET",
      path: "/api/projects/{project}/jobsets/{jobset}/evaluations",
      access: "read",
      run: async (req) => {
        const js = await jobsetRow(db, req.params.project!, req.params.jobset!);
        const r = await sql<EvalRow>`
          select id::text as id, revision, started_at, eval_ms, error, nr_builds, nr_new from evaluations e where e.jobset_id = ${js.id} order by e.id desc limit 100`.execute(db);
        return ok(r.rows.map(evaluationJson));
      },
    },
    {
      method: "GET",
      path: "/api/projects/{project}/jobsets/{jobset}/evaluations/{id}/diff",
      access: "read",
      run: async (req) => {
        const js = await jobsetRow(db, req.params.project!, req.params.jobset!);
        const to = await evaluation(js.id, req.params.id!);
        const against = req.query.get("against");
        let from: EvalRow | null;
        if (against !== null) from = await evaluation(js.id, against);
        else {
          const prev = await sql<{ id: string }>`select max(id)::text as id from evaluations where jobset_id = ${js.id} and error is null and id < ${to.id}`.execute(db);
          from = prev.rows[0]?.id ? await evaluation(js.id, prev.rows[0].id) : null;
        }
        const diff = await diffEvaluations(db, from?.id ?? null, to.id);
        return ok({ project: js.project, jobset: js.name, evaluation: evaluationJson(to), against: from && evaluationJson(from), ...diff });
      },
    },
    {
      method: "GET",
      path: "/api/projects/{project}/jobsets/{jobset}/builds",
      access: "read",
      run: async (req) => {
        const js = await jobsetRow(db, req.params.project!, req.params.jobset!);
        return ok((await latestBuilds(db, js.id)).map(buildJson));
      },
    },
  ];
}

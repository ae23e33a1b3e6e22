/**
 * Builds: one build, a job's latest finished build (the URL a channel or a release follows),
 * and restart / cancel / bump.
 */
import { buildRelations, buildsById, latestFinished } from "../db/builds.js";
import { buildAction } from "./build-actions.js";
import { jobsetRow, type ApiContext } from "./context.js";
import { buildJson } from "./evaluations.js";
import { ApiError, checkId, ok, type ApiRequest, type Route } from "./http.js";

export function buildRoutes(ctx: ApiContext): Route[] {
  const latest = async (req: ApiRequest) => {
    const js = await jobsetRow(ctx.db, req.params.project!, req.params.jobset!);
    const b = await latestFinished(ctx.db, js.id, req.params.job!);
    if (!b) {
      throw new ApiError(404, "FERRY_FARM_NO_FINISHED_BUILD", `job '${req.params.job}' of ${js.project}/${js.name} has no succeeded build in a finished evaluation yet`, "it appears once a build of the job succeeded and its evaluation has no queued builds left");
    }
    return b;
  };
  const action = (kind: "restart" | "cancel" | "bump"): Route => ({ method: "POST", path: `/api/builds/${kind}`, access: "admin", run: async (req) => buildAction(ctx, kind, await req.json()) });
  return [
    {
      method: "GET",
      path: "/api/builds/{id}",
      access: "read",
      run: async (req) => {
        const id = checkId("build", req.params.id!);
        const b = (await buildsById(ctx.db, [id])).get(id);
        if (!b) throw new ApiError(404, "FERRY_FARM_NO_BUILD", `there is no build ${id}`, "build ids are shown by `ferry farm builds`");
        return ok({ ...buildJson(b), ...(await buildRelations(ctx.db, id)) });
      },
    },
    { method: "GET", path: "/api/projects/{project}/jobsets/{jobset}/jobs/{job}/latest-finished", access: "read", run: async (req) => ok(buildJson(await latest(req))) },
    {
      method: "GET",
      path: "/api/projects/{project}/jobsets/{jobset}/jobs/{job}/latest-finished/{output}",
      access: "read",
      run: async (req) => {
        const b = await latest(req);
        const output = req.params.output!;
        const path = b.outputs[output];
        if (path === undefined) throw new ApiError(404, "FERRY_FARM_NO_OUTPUT", `build ${b.id} (${b.job}) has no output '${output}'`, `its outputs: ${Object.keys(b.outputs).join(", ")}`);
        const wantsJson = req.query.get("format") === "json" || /application\/json/.test(req.raw.headers.accept ?? "");
        return wantsJson ? ok({ build: b.id, job: b.job, output, path }) : { status: 200, text: `${path}\n`, contentType: "text/plain; charset=utf-8" };
      },
    },
    action("restart"),
    action("cancel"),
    action("bump"),
  ];
}

/**
 * Projects and jobsets: create and change them (admin), read them, trigger an evaluation, and
 * the push webhook of git hosts (GitHub, Gitea, GitLab) that makes the matching jobsets due.
 */
import { createHmac, timingSafeEqual } from "node:crypto";
import { sql } from "kysely";
import { applyDeclaration, existingJobsets, planDeclaration, readDeclaration } from "../declarative.js";
import { bearerToken } from "./auth.js";
import { jobsetJson, jobsetRow, JOBSET_SELECT, type ApiContext, type JobsetRow } from "./context.js";
import { ApiError, checkName, int, ok, str, type ApiRequest, type Route } from "./http.js";

/** A repository URL reduced to what identifies it: `host/path` without scheme, user, `.git` or trailing `/`. */
export function repoKey(url: string): string {
  let u = url.trim();
  const scp = /^[^/@:]+@([^:/]+):(?!\/)(.*)$/.exec(u);
  if (scp) u = `${scp[1]}/${scp[2]}`;
  else u = u.replace(/^[a-z][a-z0-9+.-]*:\/\//i, "").replace(/^[^/@]*@/, "");
  u = u.replace(/\/+$/, "").replace(/\.git$/, "").replace(/\/+$/, "");
  const i = u.indexOf("/");
  return i < 0 ? u.toLowerCase() : u.slice(0, i).toLowerCase() + u.slice(i);
}

/** The repository URLs and branch a push webhook names (GitHub, Gitea, Forgejo, GitLab shapes). */
export function parsePush(body: Record<string, unknown>): { urls: string[]; branch: string | undefined } {
  const urls: string[] = [];
  for (const key of ["repository", "project"]) {
    const o = body[key];
    if (o && typeof o === "object") {
      for (const f of ["clone_url", "git_url", "ssh_url", "html_url", "url", "git_http_url", "git_ssh_url", "http_url", "web_url", "homepage"]) {
        const v = (o as Record<string, unknown>)[f];
        if (typeof v === "string" && v !== "") urls.push(v);
      }
    }
  }
  const ref = body.ref;
  if (urls.length === 0 || typeof ref !== "string") {
    throw new ApiError(400, "FERRY_FARM_BAD_HOOK", "the push webhook names no repository URL or ref", 'send { "ref": "refs/heads/BRANCH", "repository": { "clone_url": URL } } (GitHub, Gitea and GitLab push events do)');
  }
  return { urls, branch: ref.startsWith("refs/heads/") ? ref.slice("refs/heads/".length) : undefined };
}

const equal = (a: string, b: string) => {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
};

/** Accepts a push webhook signed with the shared secret, or sent with the admin token. */
async function authenticateHook(ctx: ApiContext, req: ApiRequest): Promise<void> {
  const raw = await req.body();
  const secret = ctx.webhookSecret;
  const signature = req.raw.headers["x-hub-signature-256"];
  const gitlab = req.raw.headers["x-gitlab-token"];
  if (secret && typeof signature === "string") {
    if (equal(signature, `sha256=${createHmac("sha256", secret).update(raw).digest("hex")}`)) return;
    throw new ApiError(403, "FERRY_FARM_BAD_SIGNATURE", "the webhook's X-Hub-Signature-256 does not match its body", "set the same secret on the git host as --webhook-secret");
  }
  if (secret && typeof gitlab === "string") {
    if (equal(gitlab, secret)) return;
    throw new ApiError(403, "FERRY_FARM_BAD_SIGNATURE", "the webhook's X-Gitlab-Token is not the webhook secret", "set the same secret on the git host as --webhook-secret");
  }
  const token = bearerToken(req.raw);
  if (token !== undefined && (await ctx.auth.roleOf(token)) === "admin") return;
  throw new ApiError(401, "FERRY_FARM_UNAUTHORIZED", "the webhook is not signed", secret ? "configure the git host's webhook secret to be --webhook-secret" : "start the farm with --webhook-secret and give the git host the same secret, or send the admin token");
}

const declarativeConflict = (j: { project: string }) =>
  new ApiError(409, "FERRY_FARM_DECLARATIVE", `the jobsets of project ${j.project} are declared in a file in its repository`, "change the declaration file (and push), or make the project non-declarative with `ferry farm project add` without --declarative-file");

async function projectJson(ctx: ApiContext, name: string) {
  const r = await sql<{ id: number; name: string; description: string; decl_repo: string | null; decl_branch: string | null; decl_file: string | null; decl_check_interval_s: number; decl_checked_at: Date | null; decl_error: string | null; jobsets: string }>`
    select p.id, p.name, p.description, p.decl_repo, p.decl_branch, p.decl_file, p.decl_check_interval_s, p.decl_checked_at, p.decl_error,
      (select count(*) from jobsets j where j.project_id = p.id) as jobsets
    from projects p where p.name = ${name}`.execute(ctx.db);
  const p = r.rows[0];
  if (!p) throw new ApiError(404, "FERRY_FARM_NO_PROJECT", `there is no project ${name}`, "add it with `ferry farm project add`");
  return {
    project: p.name,
    description: p.description,
    jobsets: Number(p.jobsets),
    declarative: p.decl_file === null ? null : { repo: p.decl_repo, branch: p.decl_branch, file: p.decl_file, checkInterval: p.decl_check_interval_s, checkedAt: p.decl_checked_at, error: p.decl_error },
  };
}

async function putProject(ctx: ApiContext, req: ApiRequest) {
  const name = checkName("project", req.params.project!);
  const body = await req.json();
  const description = str(body, "description", false);
  const d = body.declarative;
  if (d !== undefined && d !== null && (typeof d !== "object" || Array.isArray(d))) throw new ApiError(400, "FERRY_FARM_BAD_FIELD", "'declarative' must be an object { repo, file, branch?, checkInterval? } or null");
  if (d === undefined || d === null) {
    await sql`
      insert into projects (name, description) values (${name}, ${description ?? ""})
      on conflict (name) do update set description = ${description === undefined ? sql`projects.description` : sql`excluded.description`}
        ${d === null ? sql`, decl_repo = null, decl_branch = null, decl_file = null, decl_spec_hash = null, decl_error = null, decl_checked_at = null` : sql``}`.execute(ctx.db);
    return ok({ ...(await projectJson(ctx, name)), changes: [] });
  }
  const spec = d as Record<string, unknown>;
  const decl = { repo: str(spec, "repo", true), branch: str(spec, "branch", false) ?? "main", file: str(spec, "file", true) };
  const interval = int(spec, "checkInterval", 0) ?? 300;
  // Read (and check) the declaration before anything is written: a bad one changes nothing.
  const read = await readDeclaration(ctx.dataDir, name, decl);
  const changes = await ctx.db.transaction().execute(async (tx) => {
    const p = await sql<{ id: number }>`
      insert into projects (name, description, decl_repo, decl_branch, decl_file, decl_check_interval_s, decl_checked_at, decl_spec_hash, decl_error)
      values (${name}, ${description ?? ""}, ${decl.repo}, ${decl.branch}, ${decl.file}, ${interval}, now(), ${read.hash}, null)
      on conflict (name) do update set description = ${description === undefined ? sql`projects.description` : sql`excluded.description`},
        decl_repo = excluded.decl_repo, decl_branch = excluded.decl_branch, decl_file = excluded.decl_file, decl_check_interval_s = excluded.decl_check_interval_s,
        decl_checked_at = now(), decl_spec_hash = excluded.decl_spec_hash, decl_error = null
      returning id`.execute(tx);
    const id = p.rows[0]!.id;
    const plan = planDeclaration(await existingJobsets(tx, id), read.jobsets);
    await applyDeclaration(tx, id, plan);
    return plan;
  });
  return ok({ ...(await projectJson(ctx, name)), revision: read.revision, changes: changes.map((c) => ({ jobset: c.jobset, action: c.action })) });
}

function jobsetFields(body: Record<string, unknown>) {
  const state = int(body, "state", 0, 2);
  return {
    repo: str(body, "repo", false),
    file: str(body, "file", false),
    branch: str(body, "branch", false),
    attr: body.attr === null ? null : str(body, "attr", false),
    checkInterval: int(body, "checkInterval", 0),
    state,
    shares: int(body, "shares", 1),
  };
}

async function putJobset(ctx: ApiContext, req: ApiRequest) {
  const project = checkName("project", req.params.project!);
  const jobset = checkName("jobset", req.params.jobset!);
  const f = jobsetFields(await req.json());
  if (f.repo === undefined) throw new ApiError(400, "FERRY_FARM_MISSING_FIELD", "'repo' is required");
  if (f.file === undefined) throw new ApiError(400, "FERRY_FARM_MISSING_FIELD", "'file' is required");
  await ctx.db.transaction().execute(async (tx) => {
    const pr = await sql<{ id: number; declarative: boolean }>`
      insert into projects (name) values (${project}) on conflict (name) do update set name = excluded.name returning id, decl_file is not null as declarative`.execute(tx);
    if (pr.rows[0]!.declarative) throw declarativeConflict({ project });
    await sql`
      insert into jobsets (project_id, name, repo, branch, file, attr, check_interval_s, state, shares)
      values (${pr.rows[0]!.id}, ${jobset}, ${f.repo}, ${f.branch ?? "main"}, ${f.file}, ${f.attr ?? null}, ${f.checkInterval ?? 300}, ${f.state ?? 1}, ${f.shares ?? 100})
      on conflict (project_id, name) do update set repo = excluded.repo, branch = excluded.branch, file = excluded.file, attr = excluded.attr,
        check_interval_s = excluded.check_interval_s, state = excluded.state, shares = excluded.shares`.execute(tx);
  });
  return ok(jobsetJson(await jobsetRow(ctx.db, project, jobset)));
}

async function patchJobset(ctx: ApiContext, req: ApiRequest) {
  const js = await jobsetRow(ctx.db, req.params.project!, req.params.jobset!);
  const f = jobsetFields(await req.json());
  if (js.declarative) throw declarativeConflict(js);
  const sets = [
    f.repo !== undefined && sql`repo = ${f.repo}`,
    f.file !== undefined && sql`file = ${f.file}`,
    f.branch !== undefined && sql`branch = ${f.branch}`,
    f.attr !== undefined && sql`attr = ${f.attr}`,
    f.checkInterval !== undefined && sql`check_interval_s = ${f.checkInterval}`,
    f.state !== undefined && sql`state = ${f.state}`,
    f.shares !== undefined && sql`shares = ${f.shares}`,
  ].filter((x) => x !== false);
  if (sets.length === 0) throw new ApiError(400, "FERRY_FARM_MISSING_FIELD", "nothing to change", "give one or more of repo, file, branch, attr, checkInterval, state, shares");
  await sql`update jobsets set ${sql.join(sets)} where id = ${js.id}`.execute(ctx.db);
  return ok(jobsetJson(await jobsetRow(ctx.db, js.project, js.name)));
}

async function pushHook(ctx: ApiContext, req: ApiRequest) {
  await authenticateHook(ctx, req);
  const body = await req.json();
  if (req.raw.headers["x-github-event"] === "ping") return ok({ pong: true });
  const { urls, branch } = parsePush(body);
  if (branch === undefined) return ok({ jobsets: [], projects: [] });
  const keys = new Set(urls.map(repoKey));
  const jobsets = await sql<{ id: number; project: string; name: string; repo: string }>`
    select j.id, p.name as project, j.name, j.repo from jobsets j join projects p on p.id = j.project_id where j.state in (1, 2) and j.branch = ${branch}`.execute(ctx.db);
  const hit = jobsets.rows.filter((j) => keys.has(repoKey(j.repo)));
  if (hit.length) await sql`update jobsets set trigger_at = now() where id = any(${sql.val(hit.map((j) => j.id))}::int[])`.execute(ctx.db);
  const projects = await sql<{ id: number; name: string; decl_repo: string }>`select id, name, decl_repo from projects where decl_file is not null and decl_branch = ${branch}`.execute(ctx.db);
  const declared = projects.rows.filter((p) => keys.has(repoKey(p.decl_repo)));
  if (declared.length) await sql`update projects set decl_checked_at = null where id = any(${sql.val(declared.map((p) => p.id))}::int[])`.execute(ctx.db);
  if (hit.length || declared.length) ctx.evaluations.poke();
  return ok({ jobsets: hit.map((j) => `${j.project}/${j.name}`).sort(), projects: declared.map((p) => p.name).sort() });
}

export function projectRoutes(ctx: ApiContext): Route[] {
  const jobsets = async (project: string): Promise<JobsetRow[]> => (await sql<JobsetRow>`${JOBSET_SELECT} where p.name = ${project} order by j.name`.execute(ctx.db)).rows;
  return [
    {
      method: "GET",
      path: "/api/projects",
      access: "read",
      run: async () => {
        const r = await sql<{ name: string }>`select name from projects order by name`.execute(ctx.db);
        return ok(await Promise.all(r.rows.map((p) => projectJson(ctx, p.name))));
      },
    },
    { method: "PUT", path: "/api/projects/{project}", access: "admin", run: (req) => putProject(ctx, req) },
    { method: "GET", path: "/api/projects/{project}", access: "read", run: async (req) => ok(await projectJson(ctx, req.params.project!)) },
    {
      method: "GET",
      path: "/api/projects/{project}/jobsets",
      access: "read",
      run: async (req) => {
        await projectJson(ctx, req.params.project!);
        return ok((await jobsets(req.params.project!)).map(jobsetJson));
      },
    },
    { method: "PUT", path: "/api/projects/{project}/jobsets/{jobset}", access: "admin", run: (req) => putJobset(ctx, req) },
    { method: "PATCH", path: "/api/projects/{project}/jobsets/{jobset}", access: "admin", run: (req) => patchJobset(ctx, req) },
    {
      method: "GET",
      path: "/api/projects/{project}/jobsets/{jobset}",
      access: "read",
      run: async (req) => {
        const js = await jobsetRow(ctx.db, req.params.project!, req.params.jobset!);
        const last = await sql<{ id: string; revision: string | null; finished_at: Date | null; error: string | null; nr_builds: number }>`
          select id::text as id, revision, finished_at, error, nr_builds from evaluations e where e.jobset_id = ${js.id} order by e.id desc limit 1`.execute(ctx.db);
        const counts = await sql<{ status: string; n: string }>`
          select status, count(*) as n from builds where evaluation_id = (select max(id) from evaluations where jobset_id = ${js.id} and error is null) group by status order by status`.execute(ctx.db);
        const e = last.rows[0];
        return ok({
          ...jobsetJson(js),
          lastEvaluation: e ? { id: e.id, revision: e.revision, finishedAt: e.finished_at, error: e.error, builds: e.nr_builds } : null,
          builds: Object.fromEntries(counts.rows.map((c) => [c.status, Number(c.n)])),
        });
      },
    },
    {
      method: "POST",
      path: "/api/projects/{project}/jobsets/{jobset}/trigger",
      access: "admin",
      run: async (req) => {
        const js = await jobsetRow(ctx.db, req.params.project!, req.params.jobset!);
        if (js.state === 0) throw new ApiError(409, "FERRY_FARM_JOBSET_DISABLED", `jobset ${js.project}/${js.name} is disabled`, "enable it with `ferry farm jobset enable`, or evaluate it once with `ferry farm eval`");
        await sql`update jobsets set trigger_at = now() where id = ${js.id}`.execute(ctx.db);
        ctx.evaluations.poke();
        return ok({ triggered: `${js.project}/${js.name}` }, 202);
      },
    },
    { method: "POST", path: "/api/hooks/git", access: "self", run: (req) => pushHook(ctx, req) },
  ];
}

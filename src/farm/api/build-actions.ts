/**
 * Restart, cancel and bump builds. A build is built by its step (the step of its own
 * derivation); only the scheduling leader changes steps, so these queue a command for it
 * (src/farm/api/commands.ts) and answer with per-build results.
 *
 * - cancel: queued builds become `cancelled` here; the steps they need that no other queued
 *   build needs (their own step and its unfinished dependencies) are cancelled by the leader.
 * - restart: failed, dependency-failed and cancelled builds are queued again and their step is
 *   restarted (the leader restarts the failed steps it waited on). If the leader refuses, the
 *   build gets its status back.
 * - bump: a queued build's step gets a priority (the leader passes it on to its dependencies).
 *
 * Builds are named by id, or as a jobset's jobs in its latest evaluation.
 */
import { sql, type Transaction } from "kysely";
import type { FarmSchema } from "../db/index.js";
import { buildsById, latestBuilds, settleAggregates, type BuildInfo } from "../db/builds.js";
import { recordEvent, type BuildStatus } from "../db/events.js";
import { awaitCommand, insertCommand, type CommandKind, type ItemResult } from "./commands.js";
import { jobsetRow, type ApiContext } from "./context.js";
import { ApiError, int, ok, strings, str, type Reply } from "./http.js";

type Item = ItemResult<Record<string, unknown>>;

const fail = (id: string, code: string, message: string, hint?: string): Item => ({ id, ok: false, error: { code, message, ...(hint ? { hint } : {}) } });

/** The builds a request names, and per-item errors for names that are not builds. */
async function resolveTargets(ctx: ApiContext, body: Record<string, unknown>): Promise<{ builds: BuildInfo[]; missing: Item[] }> {
  const ids = strings(body, "builds");
  const project = str(body, "project", false);
  const jobset = str(body, "jobset", false);
  const jobs = strings(body, "jobs");
  if (ids !== undefined && (project !== undefined || jobset !== undefined)) throw new ApiError(400, "FERRY_FARM_BAD_FIELD", "name builds either by 'builds' (ids) or by 'project' and 'jobset' (and 'jobs'), not both");
  if (ids !== undefined) {
    if (ids.length === 0) throw new ApiError(400, "FERRY_FARM_BAD_FIELD", "'builds' is empty");
    const valid = ids.filter((i) => /^[1-9][0-9]{0,17}$/.test(i));
    const found = await buildsById(ctx.db, valid);
    return {
      builds: [...new Set(valid)].filter((i) => found.has(i)).map((i) => found.get(i)!),
      missing: [...new Set(ids)].filter((i) => !found.has(i)).map((i) => fail(i, "FERRY_FARM_NO_BUILD", `there is no build ${i}`, "build ids are shown by `ferry farm builds`")),
    };
  }
  if (project === undefined || jobset === undefined) throw new ApiError(400, "FERRY_FARM_MISSING_FIELD", "name the builds: 'builds' (ids), or 'project' and 'jobset' (and optionally 'jobs')");
  const js = await jobsetRow(ctx.db, project, jobset);
  const builds = await latestBuilds(ctx.db, js.id, jobs);
  const have = new Set(builds.map((b) => b.job));
  return {
    builds,
    missing: (jobs ?? []).filter((j) => !have.has(j)).map((j) => fail(j, "FERRY_FARM_NO_JOB", `the latest evaluation of ${project}/${jobset} has no job '${j}'`, "jobs are listed by `ferry farm builds`")),
  };
}

/** Why a build cannot take the action, or undefined when it can. */
function refusal(action: CommandKind, b: BuildInfo): Item | undefined {
  if (action === "restart") {
    if (!["failed", "dependency-failed", "cancelled"].includes(b.status) || b.step === null) {
      return fail(b.id, "FERRY_FARM_NOT_RESTARTABLE", `build ${b.id} (${b.job}) is ${b.status}; only failed, dependency-failed and cancelled builds are restarted`);
    }
    return undefined;
  }
  if (b.status !== "queued") return fail(b.id, "FERRY_FARM_BUILD_FINISHED", `build ${b.id} (${b.job}) is already ${b.status}`, action === "cancel" ? "only queued builds can be cancelled" : "only queued builds can be bumped");
  if (b.step === null && action === "bump") return fail(b.id, "FERRY_FARM_BUILD_FINISHED", `build ${b.id} (${b.job}) has nothing left to build`);
  return undefined;
}

/**
 * The unfinished steps that `builds` need and no other queued build needs: the steps reached
 * downwards from theirs, minus those reached downwards from other queued builds' steps (found
 * by going up from the candidates, then down again).
 */
async function stepsOnlyFor(tx: Transaction<FarmSchema>, builds: readonly string[]): Promise<string[]> {
  const ids = sql.val([...builds]);
  const r = await sql<{ id: string }>`
    with recursive mine(id) as (
      select bs.step_id from build_steps bs join steps s on s.id = bs.step_id where bs.build_id = any(${ids}::bigint[]) and s.status in ('queued', 'running')
      union
      select d.depends_on from step_deps d join mine on d.step_id = mine.id join steps s on s.id = d.depends_on where s.status in ('queued', 'running')
    ), up(id) as (
      select id from mine
      union
      select d.step_id from step_deps d join up on d.depends_on = up.id
    ), kept(id) as (
      select distinct bs.step_id from up join build_steps bs on bs.step_id = up.id join builds b on b.id = bs.build_id
      where b.status = 'queued' and not (b.id = any(${ids}::bigint[]))
      union
      select d.depends_on from step_deps d join kept on d.step_id = kept.id join up on up.id = d.depends_on
    )
    select x.id::text as id from (select id from mine except select id from kept) x order by x.id`.execute(tx);
  return r.rows.map((x) => x.id);
}

export async function buildAction(ctx: ApiContext, action: CommandKind, body: Record<string, unknown>): Promise<Reply> {
  const bump = action === "bump" ? (int(body, "bump", -1_000_000, 1_000_000) ?? 1) : undefined;
  const { builds, missing } = await resolveTargets(ctx, body);
  const items = new Map<string, Item>(missing.map((m) => [m.id, m]));
  const targets: BuildInfo[] = [];
  for (const b of builds) {
    const r = refusal(action, b);
    if (r) items.set(b.id, r);
    else targets.push(b);
  }
  /** Builds whose step results decide their item, by step id. */
  const byStep = new Map<string, BuildInfo[]>();
  let command: string | undefined;
  let cancelled: { build: string; steps: string[] }[] = [];
  await ctx.db.transaction().execute(async (tx) => {
    const ids = targets.map((b) => b.id);
    if (ids.length === 0) return;
    let steps: string[];
    if (action === "cancel") {
      steps = await stepsOnlyFor(tx, ids);
      const done = await sql<{ id: string }>`
        update builds set status = 'cancelled', finished_at = now() where id = any(${sql.val(ids)}::bigint[]) and status = 'queued' returning id::text as id`.execute(tx);
      const now = new Set(done.rows.map((r) => r.id));
      for (const b of targets) {
        if (!now.has(b.id)) items.set(b.id, fail(b.id, "FERRY_FARM_BUILD_FINISHED", `build ${b.id} (${b.job}) finished meanwhile`));
        else await recordEvent(tx, "build:finished", { buildId: b.id, project: b.project, jobset: b.jobset, job: b.job, status: "cancelled", drvPath: b.drvPath });
      }
      cancelled = targets.filter((b) => now.has(b.id)).map((b) => ({ build: b.id, steps }));
      await settleAggregates(tx, [...now]);
    } else {
      let kept = targets;
      if (action === "restart") {
        const done = await sql<{ id: string }>`
          update builds set status = 'queued', finished_at = null
          where id = any(${sql.val(ids)}::bigint[]) and status in ('failed', 'dependency-failed', 'cancelled') returning id::text as id`.execute(tx);
        const now = new Set(done.rows.map((r) => r.id));
        for (const b of targets) if (!now.has(b.id)) items.set(b.id, fail(b.id, "FERRY_FARM_NOT_RESTARTABLE", `build ${b.id} (${b.job}) changed meanwhile`, "look at it again and retry"));
        kept = targets.filter((b) => now.has(b.id));
        await settleAggregates(tx, [...now]);
      }
      for (const b of kept) byStep.set(b.step!.id, [...(byStep.get(b.step!.id) ?? []), b]);
      steps = [...byStep.keys()];
    }
    if (steps.length) command = await insertCommand(tx, action, { steps, ...(bump !== undefined ? { bump } : {}) });
  });
  const job = new Map(targets.map((b) => [b.id, b.job]));
  for (const c of cancelled) items.set(c.build, { id: c.build, ok: true, value: { job: job.get(c.build), status: "cancelled", steps: c.steps } });
  if (command === undefined) {
    return ok({ items: [...items.values()] });
  }
  const outcome = await awaitCommand(ctx.db, command, ctx.commandWait);
  if (!outcome.applied) {
    for (const b of targets) {
      const i = items.get(b.id);
      if (!i) items.set(b.id, { id: b.id, ok: true, value: { job: b.job, ...(action === "bump" ? { bump } : { status: "queued" }), pending: true } });
      else if (i.ok) items.set(b.id, { ...i, value: { ...i.value, pending: true } });
    }
    return ok(
      { command, applied: false, items: [...items.values()], hint: "no scheduler applied the command yet (is a coordinator with the dispatcher running?); it is applied when one runs" },
      202,
    );
  }
  const stepItems = new Map(outcome.items.map((i) => [i.id, i]));
  if (action === "cancel") {
    for (const c of cancelled) items.set(c.build, { id: c.build, ok: true, value: { job: job.get(c.build), status: "cancelled", steps: c.steps.map((s) => stepItems.get(s) ?? { id: s, ok: true }) } });
  }
  for (const [step, bs] of byStep) {
    const r = stepItems.get(step) ?? fail(step, "FERRY_FARM_NO_RESULT", `the scheduler gave no result for step ${step}`);
    for (const b of bs) {
      if (r.ok) items.set(b.id, { id: b.id, ok: true, value: { job: b.job, step, ...(action === "bump" ? { bump } : { status: "queued" }), ...(r.value === undefined ? {} : { result: r.value }) } });
      else {
        items.set(b.id, { id: b.id, ok: false, error: r.error });
        if (action === "restart") await revertRestart(ctx, b);
      }
    }
  }
  return ok({ command, items: [...items.values()] });
}

/** Gives a build whose restart the leader refused its status back. */
async function revertRestart(ctx: ApiContext, b: BuildInfo): Promise<void> {
  await ctx.db.transaction().execute(async (tx) => {
    await sql`update builds set status = ${b.status as BuildStatus}, finished_at = ${b.finishedAt} where id = ${b.id} and status = 'queued'`.execute(tx);
    await settleAggregates(tx, [b.id]);
  });
}

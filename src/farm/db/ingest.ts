/**
 * Ingesting an evaluation: the jobset remembers its inputs (so unchanged inputs are skipped
 * next time), its jobs become builds (one per job), the derivations that need
 * building become steps (one per derivation, shared with every earlier evaluation and jobset
 * that needs it), with their dependency edges. Everything goes in one transaction, in
 * multi-row statements of a few thousand rows, so an evaluation of 100,000 jobs is a few dozen
 * round trips, and a crash leaves either the whole evaluation or none of it.
 *
 * The same transaction writes the `evaluation:finished` event, so webhooks hear of exactly the
 * evaluations that were stored. A failed evaluation is stored (with its error and its event) by
 * `recordFailedEvaluation`.
 */
import { sql, type Kysely, type Transaction } from "kysely";
import type { FarmSchema } from "./index.js";
import { jobsetNames, recordEvent } from "./events.js";

export interface EvalJob {
  readonly job: string;
  readonly drvPath: string;
  readonly system: string;
  readonly outputs: Readonly<Record<string, string>>;
  /** Aggregate jobs (like Hydra's `tested`) name the jobs they are made of. */
  readonly members?: readonly string[];
}

export interface EvalStep {
  readonly drvPath: string;
  readonly name: string;
  readonly system: string;
  readonly features?: readonly string[];
  /** Derivations (among the steps) that must be built first. */
  readonly dependsOn: readonly string[];
}

export interface IngestInput {
  readonly jobsetId: number;
  readonly inputsHash: string;
  readonly revision?: string | undefined;
  readonly jobs: readonly EvalJob[];
  /** Every derivation of the jobs' closures that is not built yet. */
  readonly steps: readonly EvalStep[];
  readonly evalMs?: number;
}

export interface IngestResult {
  readonly evaluationId: string;
  readonly builds: number;
  /** Steps this evaluation added (the others existed already). */
  readonly newSteps: number;
  /** Jobs whose derivation differs from the previous evaluation of the jobset, or that are new. */
  readonly changedJobs: number;
}

/** Rows per multi-row statement (PostgreSQL takes at most 65,535 parameters per statement). */
const CHUNK = 5000;

function chunks<T>(items: readonly T[], size = CHUNK): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

type Tx = Transaction<FarmSchema> | Kysely<FarmSchema>;

/** Inserts rows of two ids (`a[k]`, `b[k]`), a chunk per statement; rows that exist are kept. */
async function insertIdPairs(tx: Tx, table: string, [colA, colB]: readonly [string, string], a: readonly string[], b: readonly string[]): Promise<void> {
  for (let i = 0; i < a.length; i += CHUNK) {
    await insertColumns(tx, table, { [colA]: { type: "bigint", values: a.slice(i, i + CHUNK) }, [colB]: { type: "bigint", values: b.slice(i, i + CHUNK) } }, "on conflict do nothing");
  }
}

/**
 * Calls `f` on each item, letting the event loop run every `every` items: the coordinator's
 * loop also serves the workers and the API while a jobset of a hundred thousand jobs goes in.
 */
async function eachLettingLoopRun<T>(items: readonly T[], f: (item: T) => void, every = 20_000): Promise<void> {
  for (let i = 0; i < items.length; i++) {
    if (i > 0 && i % every === 0) await new Promise<void>((resolve) => setImmediate(resolve));
    f(items[i]!);
  }
}

/** Inserts rows with one array parameter per column (unnest), whatever their number. */
async function insertColumns(tx: Tx, table: string, columns: Record<string, { type: string; values: readonly unknown[] }>, suffix = ""): Promise<number> {
  const names = Object.keys(columns);
  const selects = names.map((n) => sql`unnest(${sql.val(columns[n]!.values)}::${sql.raw(columns[n]!.type)}[])`);
  const r = await sql`insert into ${sql.table(table)} (${sql.join(names.map((n) => sql.ref(n)))}) select ${sql.join(selects)} ${sql.raw(suffix)}`.execute(tx);
  return Number(r.numAffectedRows ?? 0n);
}

export async function ingestEvaluation(db: Kysely<FarmSchema>, input: IngestInput): Promise<IngestResult> {
  return db.transaction().execute(async (tx) => {
    const previous = await sql<{ job: string; drv_path: string }>`
      select b.job, b.drv_path from builds b
      where b.evaluation_id = (select max(id) from evaluations where jobset_id = ${input.jobsetId} and error is null and finished_at is not null)`.execute(tx);
    const before = new Map(previous.rows.map((r) => [r.job, r.drv_path]));
    const changedJobs = input.jobs.filter((j) => before.get(j.job) !== j.drvPath).length;

    const ev = await sql<{ id: string }>`
      insert into evaluations (jobset_id, inputs_hash, revision, eval_ms, nr_builds, nr_new, finished_at)
      values (${input.jobsetId}, ${input.inputsHash}, ${input.revision ?? null}, ${input.evalMs ?? null}, ${input.jobs.length}, ${changedJobs}, now())
      returning id::text as id`.execute(tx);
    const evaluationId = ev.rows[0]!.id;

    let newSteps = 0;
    for (const part of chunks(input.steps)) {
      // Features travel as one comma-joined text per step (arrays of arrays do not unnest).
      const r = await sql`
        insert into steps (drv_path, name, system, features)
        select d, n, s, case when f = '' then '{}'::text[] else string_to_array(f, ',') end
        from unnest(${sql.val(part.map((x) => x.drvPath))}::text[], ${sql.val(part.map((x) => x.name))}::text[], ${sql.val(part.map((x) => x.system))}::text[],
                    ${sql.val(part.map((x) => [...(x.features ?? [])].sort().join(",")))}::text[]) as t(d, n, s, f)
        on conflict (drv_path) do nothing`.execute(tx);
      newSteps += Number(r.numAffectedRows ?? 0n);
    }

    // Existing steps are read FOR SHARE: a step finishing meanwhile waits for this transaction,
    // then sees (and settles) the builds it adds; one that finished before is read as finished.
    const ids = new Map<string, string>();
    const finished = new Map<string, string>();
    const drvPaths = new Set<string>();
    await eachLettingLoopRun(input.steps, (s) => drvPaths.add(s.drvPath));
    await eachLettingLoopRun(input.jobs, (j) => drvPaths.add(j.drvPath));
    for (const part of chunks([...drvPaths])) {
      const rows = await sql<{ id: string; drv_path: string; status: string }>`select id::text as id, drv_path, status from steps where drv_path = any(${sql.val(part)}::text[]) order by id for share`.execute(tx);
      for (const r of rows.rows) {
        ids.set(r.drv_path, r.id);
        if (r.status !== "queued" && r.status !== "running") finished.set(r.drv_path, r.status);
      }
    }
    // The edges as two columns (hundreds of thousands of pairs would be as many arrays).
    const edgeFrom: string[] = [];
    const edgeTo: string[] = [];
    await eachLettingLoopRun(input.steps, (s) => {
      for (const d of s.dependsOn) {
        const to = ids.get(d);
        if (to === undefined) continue;
        edgeFrom.push(ids.get(s.drvPath)!);
        edgeTo.push(to);
      }
    });
    await insertIdPairs(tx, "step_deps", ["step_id", "depends_on"], edgeFrom, edgeTo);

    const buildIds = new Map<string, string>();
    for (const part of chunks(input.jobs)) {
      const rows = await sql<{ id: string; job: string }>`
        insert into builds (evaluation_id, jobset_id, job, drv_path, system, outputs, is_aggregate, status)
        select ${evaluationId}::bigint, ${input.jobsetId}::int, j, d, s, o::jsonb, a, case when st = '' then 'queued' else st end
        from unnest(${sql.val(part.map((j) => j.job))}::text[], ${sql.val(part.map((j) => j.drvPath))}::text[], ${sql.val(part.map((j) => j.system))}::text[],
                    ${sql.val(part.map((j) => JSON.stringify(j.outputs)))}::text[], ${sql.val(part.map((j) => (j.members?.length ?? 0) > 0))}::boolean[],
                    ${sql.val(part.map((j) => (!ids.has(j.drvPath) ? "succeeded" : (finished.get(j.drvPath) ?? ""))))}::text[]) as t(j, d, s, o, a, st)
        returning id, job`.execute(tx);
      for (const r of rows.rows) buildIds.set(r.job, r.id);
    }
    const linkBuild: string[] = [];
    const linkStep: string[] = [];
    await eachLettingLoopRun(input.jobs, (j) => {
      const step = ids.get(j.drvPath);
      if (step === undefined) return;
      linkBuild.push(buildIds.get(j.job)!);
      linkStep.push(step);
    });
    await insertIdPairs(tx, "build_steps", ["build_id", "step_id"], linkBuild, linkStep);
    const members = input.jobs.flatMap((j) => (j.members ?? []).filter((m) => buildIds.has(m)).map((m) => [buildIds.get(j.job)!, buildIds.get(m)!] as const));
    await insertIdPairs(tx, "aggregate_members", ["aggregate_id", "member_id"], members.map((m) => m[0]), members.map((m) => m[1]));
    await sql`update jobsets set last_checked_at = now(), last_inputs_hash = ${input.inputsHash}, error = null where id = ${input.jobsetId}`.execute(tx);
    await recordEvent(tx, "evaluation:finished", {
      evaluationId,
      ...(await jobsetNames(tx, input.jobsetId)),
      status: "succeeded",
      builds: input.jobs.length,
      changed: changedJobs,
      revision: input.revision ?? null,
    });
    return { evaluationId, builds: input.jobs.length, newSteps, changedJobs };
  });
}

export interface FailedEvaluation {
  readonly jobsetId: number;
  /** Empty when the inputs could not be read (the checkout failed). */
  readonly inputsHash: string;
  readonly revision?: string | undefined;
  readonly evalMs: number;
  /** The error as shown to users: code, message and hint. */
  readonly error: string;
}

/** Stores a failed evaluation (kept for display), the jobset's error, and the event. */
export async function recordFailedEvaluation(db: Kysely<FarmSchema>, f: FailedEvaluation): Promise<string> {
  return db.transaction().execute(async (tx) => {
    const ev = await sql<{ id: string }>`
      insert into evaluations (jobset_id, inputs_hash, revision, eval_ms, error, finished_at)
      values (${f.jobsetId}, ${f.inputsHash || "-"}, ${f.revision || null}, ${f.evalMs}, ${f.error}, now()) returning id::text as id`.execute(tx);
    await sql`update jobsets set last_checked_at = now(), error = ${f.error} where id = ${f.jobsetId}`.execute(tx);
    const evaluationId = ev.rows[0]!.id;
    await recordEvent(tx, "evaluation:finished", {
      evaluationId,
      ...(await jobsetNames(tx, f.jobsetId)),
      status: "failed",
      builds: 0,
      changed: 0,
      revision: f.revision || null,
      error: f.error,
    });
    return evaluationId;
  });
}

export interface EvaluationDiff {
  readonly added: readonly string[];
  readonly removed: readonly string[];
  readonly changed: readonly string[];
  /** Steps the changed and added jobs need that are not finished (what the change costs). */
  readonly stepsNeeded: number;
}

/** What changed between two evaluations of a jobset (`ferry farm diff`); from null: since nothing. */
export async function diffEvaluations(db: Kysely<FarmSchema>, fromId: string | null, toId: string): Promise<EvaluationDiff> {
  const rows = async (id: string | null) => id === null ? new Map<string, string>() : new Map((await sql<{ job: string; drv_path: string }>`select job, drv_path from builds where evaluation_id = ${id}`.execute(db)).rows.map((r) => [r.job, r.drv_path]));
  const [a, b] = await Promise.all([rows(fromId), rows(toId)]);
  const added = [...b.keys()].filter((j) => !a.has(j)).sort();
  const removed = [...a.keys()].filter((j) => !b.has(j)).sort();
  const changed = [...b.keys()].filter((j) => a.has(j) && a.get(j) !== b.get(j)).sort();
  const roots = [...added, ...changed].map((j) => b.get(j)!);
  const needed = roots.length
    ? await sql<{ n: string }>`
        with recursive need(id) as (
          select id from steps where drv_path = any(${sql.val(roots)}::text[]) and status not in ('succeeded')
          union
          select d.depends_on from step_deps d join need on d.step_id = need.id join steps s on s.id = d.depends_on where s.status not in ('succeeded')
        ) select count(*) as n from need`.execute(db)
    : { rows: [{ n: "0" }] };
  return { added, removed, changed, stepsNeeded: Number(needed.rows[0]!.n) };
}

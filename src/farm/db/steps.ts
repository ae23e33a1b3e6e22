/**
 * Durable step state: leases, their renewal and expiry, and results. These are the rules that
 * make a step finish exactly once across coordinator and worker crashes (one leader schedules;
 * see src/farm/dispatch/leader.ts):
 * - the leader claims the steps its scheduler assigned (queued → running) with an owner and a
 *   lease, in one owner-checked statement: a step that is no longer queued is not claimed;
 * - the leases of connected workers are renewed; a lease that is not renewed expires and the
 *   step is queued again (its attempt counted);
 * - a result is written only while its sender holds the step's lease: a worker that lost its
 *   lease (it was presumed dead and the step went elsewhere) cannot finish it again.
 */
import { sql, type Kysely } from "kysely";
import type { FarmSchema } from "./index.js";
import { settleAggregates } from "./builds.js";

/** A running step back in the queue, leaseless: the columns every requeue sets. */
const BACK_IN_QUEUE = sql`status = 'queued', lease_owner = null, lease_expires_at = null, machine = null`;

/** Queues again every running step whose lease expired; returns their ids. */
export async function requeueExpired(db: Kysely<FarmSchema>): Promise<string[]> {
  const r = await sql<{ id: string }>`
    update steps set ${BACK_IN_QUEUE}, attempts = attempts + 1
    where status = 'running' and lease_expires_at < now()
    returning id`.execute(db);
  return r.rows.map((x) => String(x.id));
}

// ---- the dispatcher's reads and writes -------------------------------------------------------
//
// The scheduling leader keeps unfinished steps in memory and writes every transition here, in
// batches: one statement (or one transaction) per batch of events, whatever its size.

/** A step as the scheduler needs it. */
export interface StepRow {
  readonly id: string;
  readonly drvPath: string;
  readonly name: string;
  readonly system: string;
  readonly features: readonly string[];
  readonly status: string;
  readonly bump: number;
  readonly attempts: number;
  readonly leaseOwner: string | null;
  readonly startedAt: Date | null;
  readonly createdAt: Date;
}

export interface StepGraph {
  readonly steps: readonly StepRow[];
  /** [step, dependency, dependency's status] for every dependency of the steps. */
  readonly edges: readonly (readonly [string, string, string])[];
  /** [step, jobset id] for the jobsets whose queued builds are these steps. */
  readonly jobsets: readonly (readonly [string, number])[];
}

type RawStep = { id: string; drv_path: string; name: string; system: string; features: string[]; status: string; bump: number; attempts: number; lease_owner: string | null; started_at: Date | null; created_at: Date };
const stepRow = (r: RawStep): StepRow => ({
  id: String(r.id),
  drvPath: r.drv_path,
  name: r.name,
  system: r.system,
  features: r.features,
  status: r.status,
  bump: r.bump,
  attempts: r.attempts,
  leaseOwner: r.lease_owner,
  startedAt: r.started_at,
  createdAt: r.created_at,
});

async function graphOf(db: Kysely<FarmSchema>, rows: RawStep[]): Promise<StepGraph> {
  const ids = rows.map((r) => String(r.id));
  if (ids.length === 0) return { steps: [], edges: [], jobsets: [] };
  const edges = await sql<{ step_id: string; depends_on: string; status: string }>`
    select d.step_id, d.depends_on, p.status from step_deps d join steps p on p.id = d.depends_on
    where d.step_id = any(${sql.val(ids)}::bigint[])`.execute(db);
  const jobsets = await sql<{ step_id: string; jobset_id: number }>`
    select distinct bs.step_id, b.jobset_id from build_steps bs join builds b on b.id = bs.build_id
    where bs.step_id = any(${sql.val(ids)}::bigint[]) and b.status = 'queued'`.execute(db);
  return {
    steps: rows.map(stepRow),
    edges: edges.rows.map((e) => [String(e.step_id), String(e.depends_on), e.status] as const),
    jobsets: jobsets.rows.map((j) => [String(j.step_id), j.jobset_id] as const),
  };
}

/** Every unfinished step (queued or running), and marks them taken in (`scheduled`). */
export async function loadLiveSteps(db: Kysely<FarmSchema>): Promise<StepGraph> {
  // One statement: a step ingested meanwhile is either taken in here or left for intake, never marked taken but missed.
  const rows = await sql<RawStep>`
    update steps set scheduled = true where status in ('queued', 'running') or not scheduled
    returning id, drv_path, name, system, features, status, bump, attempts, lease_owner, started_at, created_at`.execute(db);
  return graphOf(db, rows.rows.filter((r) => r.status === "queued" || r.status === "running"));
}

/** Steps written since the leader last looked (at most `limit`), marked taken in. */
export async function takeNewSteps(db: Kysely<FarmSchema>, limit: number): Promise<StepGraph> {
  const rows = await sql<RawStep>`
    update steps set scheduled = true
    where id in (select id from steps where not scheduled order by id limit ${limit})
    returning id, drv_path, name, system, features, status, bump, attempts, lease_owner, started_at, created_at`.execute(db);
  return graphOf(db, rows.rows.filter((r) => r.status === "queued" || r.status === "running"));
}

/** The last measured duration of each package name. */
export async function loadDurations(db: Kysely<FarmSchema>): Promise<[string, number][]> {
  const d = await sql<{ name: string; duration_ms: number }>`
    select distinct on (name) name, duration_ms from steps
    where status = 'succeeded' and duration_ms is not null order by name, finished_at desc`.execute(db);
  return d.rows.map((r) => [r.name, r.duration_ms]);
}

/** Each jobset's scheduling shares, by jobset id. */
export async function loadShares(db: Kysely<FarmSchema>): Promise<[number, number][]> {
  const s = await sql<{ id: number; shares: number }>`select id, shares from jobsets`.execute(db);
  return s.rows.map((r) => [Number(r.id), r.shares]);
}

export interface Claim {
  readonly stepId: string;
  readonly owner: string;
}

/**
 * Marks assigned steps running under their owner's lease; returns the claimed steps (queued ones
 * only). The rows are locked in id order first, so two claimers of overlapping steps (a leader
 * and one that has just lost the lock) wait for each other instead of deadlocking.
 */
export async function claimAssigned(db: Kysely<FarmSchema>, claims: readonly Claim[], leaseMs: number): Promise<{ id: string; drvPath: string; attempts: number }[]> {
  if (claims.length === 0) return [];
  const r = await sql<{ id: string; drv_path: string; attempts: number }>`
    with c as (
      select * from unnest(${sql.val(claims.map((c) => c.stepId))}::bigint[], ${sql.val(claims.map((c) => c.owner))}::text[]) as c(id, owner)
    ), locked as (
      select steps.id from steps where steps.id in (select id from c) and steps.status = 'queued' order by steps.id for update
    )
    update steps set status = 'running', lease_owner = c.owner, machine = c.owner, started_at = now(), not_before = null,
      lease_expires_at = now() + ${leaseMs} * interval '1 millisecond'
    from c
    where steps.id = c.id and steps.id in (select id from locked) and steps.status = 'queued'
    returning steps.id, steps.drv_path, steps.attempts`.execute(db);
  return r.rows.map((x) => ({ id: String(x.id), drvPath: x.drv_path, attempts: x.attempts }));
}

/** Queues claimed steps again, each only while its claim's owner still holds it (a newer leader may have claimed it since). */
export async function giveBackClaims(db: Kysely<FarmSchema>, claims: readonly Claim[]): Promise<void> {
  if (claims.length === 0) return;
  await sql`
    update steps set ${BACK_IN_QUEUE}, started_at = null
    from unnest(${sql.val(claims.map((c) => c.stepId))}::bigint[], ${sql.val(claims.map((c) => c.owner))}::text[]) as c(id, owner)
    where steps.id = c.id and steps.status = 'running' and steps.lease_owner = c.owner`.execute(db);
}

/** Extends `owner`'s leases on the named steps (those it still holds). */
export async function renewStepLeases(db: Kysely<FarmSchema>, owner: string, stepIds: readonly string[], leaseMs: number): Promise<string[]> {
  if (stepIds.length === 0) return [];
  const r = await sql<{ id: string }>`
    update steps set lease_expires_at = now() + ${leaseMs} * interval '1 millisecond'
    where id = any(${sql.val([...stepIds])}::bigint[]) and status = 'running' and lease_owner = ${owner}
    returning id`.execute(db);
  return r.rows.map((x) => String(x.id));
}

/** Queues running steps again (their worker lost them); no attempt is counted. */
export async function requeueSteps(db: Kysely<FarmSchema>, ids: readonly string[]): Promise<void> {
  if (ids.length === 0) return;
  await sql`
    update steps set ${BACK_IN_QUEUE}, started_at = null
    where id = any(${sql.val([...ids])}::bigint[]) and status = 'running'`.execute(db);
}

/** How a step ended, as the dispatcher writes it. */
export interface StepOutcomeRow {
  readonly stepId: string;
  /** The lease owner the result came from; the write is refused if it no longer holds the lease. */
  readonly owner: string;
  /** succeeded, failed, or queued again (a transient failure retried at `retryAt`). */
  readonly status: "succeeded" | "failed" | "queued";
  readonly durationMs: number;
  readonly error?: string | undefined;
  readonly outputs?: Readonly<Record<string, string>> | undefined;
  readonly retryAt?: Date | undefined;
}

export interface FinishBatch {
  readonly outcomes: readonly StepOutcomeRow[];
  /** Steps that can no longer run because a dependency failed or was cancelled, with the step that blocked them. */
  readonly depFailed: readonly { readonly stepId: string; readonly cause: string }[];
}

export interface FinishedBuild {
  readonly id: string;
  readonly jobsetId: number;
  readonly job: string;
  readonly drvPath: string;
  readonly status: string;
}

/**
 * Writes a batch of step results in one transaction: the steps (each only if its owner still
 * holds the lease), permanent failures into `failed_paths`, the steps they block as
 * dependency-failed, the builds those steps are (their status and finish time, once), and a
 * `step:finished` / `build:finished` event for each into the outbox. Returns the steps whose
 * write was refused (lost lease) and the builds that finished.
 */
export async function recordStepResults(db: Kysely<FarmSchema>, batch: FinishBatch): Promise<{ refused: string[]; builds: FinishedBuild[] }> {
  if (batch.outcomes.length === 0 && batch.depFailed.length === 0) return { refused: [], builds: [] };
  return db.transaction().execute((tx) => writeStepResults(tx, batch));
}

/** `recordStepResults` inside a transaction the caller holds. */
export async function writeStepResults(tx: Kysely<FarmSchema>, batch: FinishBatch): Promise<{ refused: string[]; builds: FinishedBuild[] }> {
  const o = batch.outcomes;
  const written = o.length
    ? await sql<{ id: string }>`
        update steps set
          status = r.status,
          lease_owner = null, lease_expires_at = null,
          machine = case when r.status = 'queued' then null else steps.machine end,
          finished_at = case when r.status = 'queued' then null else now() end,
          duration_ms = r.duration, error = nullif(r.error, ''), outputs = case when r.outputs = '' then null else r.outputs::jsonb end,
          attempts = steps.attempts + case when r.status = 'queued' then 1 else 0 end,
          not_before = r.retry_at
        from unnest(${sql.val(o.map((x) => x.stepId))}::bigint[], ${sql.val(o.map((x) => x.owner))}::text[], ${sql.val(o.map((x) => x.status))}::text[],
                    ${sql.val(o.map((x) => Math.round(x.durationMs)))}::int[], ${sql.val(o.map((x) => x.error ?? ""))}::text[],
                    ${sql.val(o.map((x) => (x.outputs ? JSON.stringify(x.outputs) : "")))}::text[],
                    ${sql.val(o.map((x) => x.retryAt?.toISOString() ?? null))}::timestamptz[]) as r(id, owner, status, duration, error, outputs, retry_at)
        where steps.id = r.id and steps.status = 'running' and steps.lease_owner = r.owner
        returning steps.id`.execute(tx)
    : { rows: [] };
  const ok = new Set(written.rows.map((r) => String(r.id)));
  const refused = o.filter((x) => !ok.has(x.stepId)).map((x) => x.stepId);
  const done = o.filter((x) => ok.has(x.stepId) && x.status !== "queued");
  const failed = done.filter((x) => x.status === "failed");
  if (failed.length) {
    await sql`
      insert into failed_paths (drv_path, error)
      select s.drv_path, s.error from steps s where s.id = any(${sql.val(failed.map((x) => x.stepId))}::bigint[])
      on conflict (drv_path) do update set failed_at = now(), error = excluded.error`.execute(tx);
  }
  const blocked = batch.depFailed;
  if (blocked.length) {
    await sql`
      update steps set status = 'dependency-failed', finished_at = now(), lease_owner = null, lease_expires_at = null,
        error = 'dependency ' || c.drv_path || ' did not build'
      from unnest(${sql.val(blocked.map((b) => b.stepId))}::bigint[], ${sql.val(blocked.map((b) => b.cause))}::bigint[]) as b(id, cause)
      join steps c on c.id = b.cause
      where steps.id = b.id and steps.status in ('queued', 'running')`.execute(tx);
  }
  const ended = [...done.map((x) => x.stepId), ...blocked.map((b) => b.stepId)];
  if (ended.length === 0) return { refused, builds: [] };
  await sql`
    insert into farm_events (kind, payload)
    select 'step:finished', jsonb_build_object('stepId', s.id::text, 'drvPath', s.drv_path, 'status', s.status, 'durationMs', s.duration_ms)
    from steps s where s.id = any(${sql.val(ended)}::bigint[]) order by s.id`.execute(tx);
  const builds = await settleBuilds(tx, ended);
  return { refused, builds };
}

/**
 * Gives the queued builds of finished steps their step's status (once: only queued builds
 * change) and writes a `build:finished` event for each, in one statement that also names the
 * queued aggregates concerned (whose own step finished, or with a member among these builds);
 * only when there are some does `settleAggregates` run (and write their events after their
 * members'). Returns the builds that finished.
 */
export async function settleBuilds(tx: Kysely<FarmSchema>, stepIds: readonly string[]): Promise<FinishedBuild[]> {
  if (stepIds.length === 0) return [];
  const steps = sql.val([...stepIds]);
  const r = await sql<{ id: string; jobset_id: number; job: string; drv_path: string; status: string; aggregates: string[] | null }>`
    with settled as (
      update builds set status = s.status, finished_at = now()
      from build_steps bs join steps s on s.id = bs.step_id
      where bs.build_id = builds.id and bs.step_id = any(${steps}::bigint[]) and builds.status = 'queued' and not builds.is_aggregate
        and s.status in ('succeeded', 'failed', 'dependency-failed', 'cancelled')
      returning builds.id, builds.jobset_id, builds.job, builds.drv_path, builds.status
    ), events as (
      insert into farm_events (kind, payload)
      select 'build:finished', jsonb_build_object('buildId', b.id::text, 'project', p.name, 'jobset', j.name, 'job', b.job, 'status', b.status, 'drvPath', b.drv_path)
      from settled b join jobsets j on j.id = b.jobset_id join projects p on p.id = j.project_id
      order by b.id
    ), concerned as (
      select a.id from builds a join build_steps bs on bs.build_id = a.id
      where bs.step_id = any(${steps}::bigint[]) and a.is_aggregate and a.status = 'queued'
      union
      -- Whatever their status: a failed aggregate whose restarted members now succeed succeeds.
      select am.aggregate_id from aggregate_members am where am.member_id in (select id from settled)
    )
    select b.id::text as id, b.id as n, b.jobset_id, b.job, b.drv_path, b.status, null::text[] as aggregates from settled b
    union all
    select null, null, null, null, null, null, array(select id::text from concerned order by id)
    order by n nulls last`.execute(tx);
  const builds: FinishedBuild[] = [];
  let aggregates: string[] = [];
  for (const b of r.rows) {
    if (b.aggregates) aggregates = b.aggregates;
    else builds.push({ id: String(b.id), jobsetId: b.jobset_id, job: b.job, drvPath: b.drv_path, status: b.status });
  }
  if (aggregates.length) await settleAggregates(tx, aggregates);
  return builds;
}

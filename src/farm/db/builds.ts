/**
 * Builds: reading them for the API, and aggregate builds (like Hydra's `tested`), whose status
 * follows their members.
 *
 * An aggregate build succeeds when its own step (if it has one) and every member succeeded,
 * fails when any member failed (or was cancelled or failed on a dependency), and stays queued
 * otherwise. `settleAggregates` applies that rule; whoever changes builds' statuses calls it in
 * the same transaction with the ids it changed (the dispatcher, when steps finish).
 */
import { sql, type Kysely, type Transaction } from "kysely";
import type { FarmSchema } from "./index.js";
import { recordEvent, type BuildStatus } from "./events.js";

type Db = Kysely<FarmSchema> | Transaction<FarmSchema>;

/** How deep aggregates of aggregates are followed in one call. */
const MAX_NESTING = 32;

/** An aggregate's status from its own step's status (null: nothing to build) and its members'. */
export function aggregateStatus(current: BuildStatus, own: string | null, members: readonly BuildStatus[]): BuildStatus {
  if (current === "cancelled") return current;
  if (members.some((m) => m === "failed" || m === "dependency-failed" || m === "cancelled")) return "failed";
  if (own === "failed" || own === "dependency-failed" || own === "cancelled") return own;
  if ((own === null || own === "succeeded") && members.every((m) => m === "succeeded")) return "succeeded";
  return "queued";
}

export interface SettledAggregate {
  readonly id: string;
  readonly from: BuildStatus;
  readonly to: BuildStatus;
}

/**
 * Brings the aggregates among `buildIds`, and those with a member among them, to the status
 * their members give (see `aggregateStatus`), following aggregates of aggregates. Writes a
 * `build:finished` event for each aggregate that becomes finished. Returns what changed.
 */
export async function settleAggregates(tx: Db, buildIds: readonly string[]): Promise<SettledAggregate[]> {
  const changed: SettledAggregate[] = [];
  let ids = [...new Set(buildIds)];
  for (let depth = 0; depth < MAX_NESTING && ids.length > 0; depth++) {
    const rows = await sql<{ id: string; status: BuildStatus; own: string | null; members: BuildStatus[]; job: string; drv_path: string; project: string; jobset: string }>`
      select a.id::text as id, a.status, a.job, a.drv_path, p.name as project, j.name as jobset,
        (select s.status from build_steps bs join steps s on s.id = bs.step_id where bs.build_id = a.id and s.drv_path = a.drv_path) as own,
        array(select m.status from aggregate_members am join builds m on m.id = am.member_id where am.aggregate_id = a.id) as members
      from builds a join jobsets j on j.id = a.jobset_id join projects p on p.id = j.project_id
      where a.is_aggregate
        and (a.id = any(${sql.val(ids)}::bigint[]) or a.id in (select aggregate_id from aggregate_members where member_id = any(${sql.val(ids)}::bigint[])))
      order by a.id
      for update of a`.execute(tx);
    const round: SettledAggregate[] = [];
    for (const a of rows.rows) {
      const to = aggregateStatus(a.status, a.own, a.members);
      if (to === a.status) continue;
      await sql`update builds set status = ${to}, finished_at = ${to === "queued" ? null : sql`now()`} where id = ${a.id}`.execute(tx);
      if (to !== "queued") await recordEvent(tx, "build:finished", { buildId: a.id, project: a.project, jobset: a.jobset, job: a.job, status: to, drvPath: a.drv_path });
      round.push({ id: a.id, from: a.status, to });
    }
    changed.push(...round);
    ids = round.map((r) => r.id);
  }
  return changed;
}

export interface BuildInfo {
  readonly id: string;
  readonly project: string;
  readonly jobset: string;
  readonly job: string;
  readonly evaluation: string;
  readonly drvPath: string;
  readonly system: string;
  readonly status: BuildStatus;
  readonly outputs: Record<string, string>;
  readonly isAggregate: boolean;
  readonly createdAt: Date;
  readonly finishedAt: Date | null;
  /** The step that builds this build's own derivation (none when it was already built). */
  readonly step: { readonly id: string; readonly status: string } | null;
}

type BuildRow = {
  id: string;
  project: string;
  jobset: string;
  job: string;
  evaluation_id: string;
  drv_path: string;
  system: string;
  status: BuildStatus;
  outputs: Record<string, string>;
  is_aggregate: boolean;
  created_at: Date;
  finished_at: Date | null;
  step_id: string | null;
  step_status: string | null;
};

const BUILD_COLUMNS = sql`b.id::text as id, p.name as project, j.name as jobset, b.job, b.evaluation_id::text as evaluation_id, b.drv_path, b.system, b.status, b.outputs, b.is_aggregate, b.created_at, b.finished_at,
  s.id::text as step_id, s.status as step_status`;
const BUILD_FROM = sql`builds b join jobsets j on j.id = b.jobset_id join projects p on p.id = j.project_id
  left join lateral (select s.id, s.status from build_steps bs join steps s on s.id = bs.step_id where bs.build_id = b.id and s.drv_path = b.drv_path) s on true`;

const toInfo = (r: BuildRow): BuildInfo => ({
  id: r.id,
  project: r.project,
  jobset: r.jobset,
  job: r.job,
  evaluation: r.evaluation_id,
  drvPath: r.drv_path,
  system: r.system,
  status: r.status,
  outputs: r.outputs,
  isAggregate: r.is_aggregate,
  createdAt: r.created_at,
  finishedAt: r.finished_at,
  step: r.step_id === null ? null : { id: r.step_id, status: r.step_status! },
});

/** Builds by id (those that exist). */
export async function buildsById(db: Db, ids: readonly string[]): Promise<Map<string, BuildInfo>> {
  if (ids.length === 0) return new Map();
  const r = await sql<BuildRow>`select ${BUILD_COLUMNS} from ${BUILD_FROM} where b.id = any(${sql.val([...ids])}::bigint[])`.execute(db);
  return new Map(r.rows.map((row) => [row.id, toInfo(row)]));
}

/** The builds of a jobset's latest successful evaluation, by job (only `jobs` when given). */
export async function latestBuilds(db: Db, jobsetId: number, jobs?: readonly string[]): Promise<BuildInfo[]> {
  const r = await sql<BuildRow>`
    select ${BUILD_COLUMNS} from ${BUILD_FROM}
    where b.evaluation_id = (select max(id) from evaluations where jobset_id = ${jobsetId} and error is null)
      ${jobs ? sql`and b.job = any(${sql.val([...jobs])}::text[])` : sql``}
    order by b.job`.execute(db);
  return r.rows.map(toInfo);
}

/** A build's aggregate members, and the aggregates it is a member of. */
export async function buildRelations(db: Db, id: string): Promise<{ members: { id: string; job: string; status: BuildStatus }[]; memberOf: string[] }> {
  const members = await sql<{ id: string; job: string; status: BuildStatus }>`
    select m.id::text as id, m.job, m.status from aggregate_members am join builds m on m.id = am.member_id where am.aggregate_id = ${id} order by m.job`.execute(db);
  const of = await sql<{ id: string }>`select aggregate_id::text as id from aggregate_members where member_id = ${id} order by aggregate_members.aggregate_id`.execute(db);
  return { members: members.rows, memberOf: of.rows.map((r) => r.id) };
}

/**
 * The newest succeeded build of a job in an evaluation with no build still queued (Hydra's
 * `latest-finished`: what a channel or a release follows). Undefined when there is none.
 */
export async function latestFinished(db: Db, jobsetId: number, job: string): Promise<BuildInfo | undefined> {
  const r = await sql<BuildRow>`
    select ${BUILD_COLUMNS} from ${BUILD_FROM}
    where b.jobset_id = ${jobsetId} and b.job = ${job} and b.status = 'succeeded'
      and not exists (select 1 from builds o where o.evaluation_id = b.evaluation_id and o.status = 'queued')
    order by b.id desc limit 1`.execute(db);
  return r.rows[0] && toInfo(r.rows[0]);
}

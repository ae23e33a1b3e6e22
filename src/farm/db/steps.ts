/**
 * Durable step state: claims with leases, lease renewal and expiry, and results. These are the
 * rules that make a step finish exactly once across coordinator and worker crashes:
 * - a step is claimed (queued → running) with `FOR UPDATE SKIP LOCKED`, so two claimers never
 *   take the same one, and only when every step it depends on has succeeded;
 * - a claim carries an owner and a lease; a lease that is not renewed expires and the step is
 *   queued again (its attempt counted);
 * - a result is accepted only from the current lease owner of a running step: a worker that
 *   lost its lease (it was presumed dead and the step went elsewhere) cannot finish it again.
 */
import { sql, type Kysely } from "kysely";
import type { FarmSchema } from "./index.js";

export interface ClaimRequest {
  readonly owner: string;
  readonly systems: readonly string[];
  /** Features the machine supports; a step is claimable only if it needs no others. */
  readonly features: readonly string[];
  readonly limit: number;
  readonly leaseMs: number;
}

export interface ClaimedStep {
  readonly id: string;
  readonly drvPath: string;
  readonly name: string;
  readonly system: string;
  readonly attempts: number;
}

/** Claims up to `limit` runnable steps for `owner`, highest bump first, then oldest. */
export async function claimSteps(db: Kysely<FarmSchema>, req: ClaimRequest): Promise<ClaimedStep[]> {
  if (req.limit <= 0 || req.systems.length === 0) return [];
  const rows = await sql<{ id: string; drv_path: string; name: string; system: string; attempts: number }>`
    with picked as (
      select s.id from steps s
      where s.status = 'queued'
        and s.system = any(${sql.val([...req.systems])}::text[])
        and s.features <@ ${sql.val([...req.features])}::text[]
        and (s.not_before is null or s.not_before <= now())
        and not exists (select 1 from step_deps d join steps p on p.id = d.depends_on where d.step_id = s.id and p.status <> 'succeeded')
      order by s.bump desc, s.id
      limit ${req.limit}
      for update of s skip locked
    )
    update steps set status = 'running', lease_owner = ${req.owner}, lease_expires_at = now() + ${req.leaseMs} * interval '1 millisecond',
      started_at = now(), machine = ${req.owner}
    from picked where steps.id = picked.id
    returning steps.id, steps.drv_path, steps.name, steps.system, steps.attempts`.execute(db);
  return rows.rows.map((r) => ({ id: r.id, drvPath: r.drv_path, name: r.name, system: r.system, attempts: r.attempts }));
}

/** Extends the leases `owner` holds (its heartbeat); returns how many it still holds. */
export async function renewLeases(db: Kysely<FarmSchema>, owner: string, leaseMs: number): Promise<number> {
  const r = await sql`update steps set lease_expires_at = now() + ${leaseMs} * interval '1 millisecond' where status = 'running' and lease_owner = ${owner}`.execute(db);
  return Number(r.numAffectedRows ?? 0n);
}

/** Queues again every running step whose lease expired; returns their ids. */
export async function requeueExpired(db: Kysely<FarmSchema>): Promise<string[]> {
  const r = await sql<{ id: string }>`
    update steps set status = 'queued', lease_owner = null, lease_expires_at = null, machine = null, attempts = attempts + 1
    where status = 'running' and lease_expires_at < now()
    returning id`.execute(db);
  return r.rows.map((x) => x.id);
}

export type StepResult = { readonly status: "succeeded"; readonly durationMs: number } | { readonly status: "failed"; readonly error: string; readonly durationMs: number };

/**
 * Records a step's result if `owner` still holds its lease. Returns false (and changes
 * nothing) when it does not: the step was re-queued or finished by someone else.
 */
export async function finishStep(db: Kysely<FarmSchema>, stepId: string, owner: string, result: StepResult): Promise<boolean> {
  const r = await sql`
    update steps set status = ${result.status}, lease_owner = null, lease_expires_at = null, finished_at = now(),
      duration_ms = ${result.durationMs}, error = ${result.status === "failed" ? result.error : null}
    where id = ${stepId} and status = 'running' and lease_owner = ${owner}`.execute(db);
  return Number(r.numAffectedRows ?? 0n) === 1;
}

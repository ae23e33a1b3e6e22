/**
 * Synthetic farm workloads for tests: a random DAG of steps (every step also a job), a fresh
 * project/jobset to ingest it into, and polling helpers.
 */
import { sql } from "kysely";
import type { FarmDatabase } from "../../src/farm/db/index.js";
import type { EvalJob, EvalStep } from "../../src/farm/db/ingest.js";

export const drv = (n: string) => `/ferry/store/${n.padStart(32, "c").slice(-32)}-${n}.drv`;

/** A random DAG: step i depends on up to two earlier steps; every step is also a job. */
export function dag(n: number, seed = 1): { steps: EvalStep[]; jobs: EvalJob[] } {
  let x = seed;
  const rnd = () => ((x = (x * 1103515245 + 12345) % 2147483648) / 2147483648);
  const steps: EvalStep[] = [];
  for (let i = 0; i < n; i++) {
    const deps = new Set<string>();
    if (i > 0) for (let k = 0; k < 2; k++) if (rnd() < 0.7) deps.add(drv(`s${Math.floor(rnd() * i)}`));
    steps.push({ drvPath: drv(`s${i}`), name: `pkg${i % 50}`, system: "x86_64-linux", dependsOn: [...deps] });
  }
  return { steps, jobs: steps.map((s, i) => ({ job: `job${i}`, drvPath: s.drvPath, system: s.system, outputs: { out: s.drvPath.replace(/\.drv$/, "") } })) };
}

export async function seedJobset(db: FarmDatabase["db"]): Promise<number> {
  await sql`truncate projects, steps, failed_paths, farm_commands, farm_events, farm_leader cascade`.execute(db);
  const p = await sql<{ id: number }>`insert into projects (name) values ('p') returning id`.execute(db);
  const js = await sql<{ id: number }>`insert into jobsets (project_id, name, repo, file) values (${p.rows[0]!.id}, 'j', '/r', 'f.ts') returning id`.execute(db);
  return js.rows[0]!.id;
}

export async function until(what: string, cond: () => Promise<boolean> | boolean, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export const statusCounts = async (db: FarmDatabase["db"], table: "steps" | "builds") =>
  Object.fromEntries((await sql<{ status: string; n: string }>`select status, count(*) as n from ${sql.table(table)} group by status`.execute(db)).rows.map((r) => [r.status, Number(r.n)]));


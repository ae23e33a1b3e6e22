/**
 * Ingesting evaluations into the farm's database, on PGlite and on PostgreSQL: builds per
 * job, steps shared across evaluations, the step graph, aggregates, and the diff between two
 * evaluations. One transaction: a failed ingest leaves nothing.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { sql } from "kysely";
import { migrateFarmDatabase } from "../../src/farm/db/index.js";
import { ingestEvaluation, diffEvaluations, type EvalJob, type EvalStep } from "../../src/farm/db/ingest.js";
import { useFarmEngines } from "../helpers/farm-db.js";

const drv = (n: string) => `/ferry/store/${n.padStart(32, "a").slice(0, 32)}-${n}.drv`;

/** A small package set: libc <- zlib <- app, libc <- tool, and an aggregate of app and tool. */
function evaluation(version: string): { jobs: EvalJob[]; steps: EvalStep[] } {
  const libc = drv("libc");
  const zlib = drv("zlib");
  const app = drv(`app${version}`);
  const tool = drv("tool");
  const steps: EvalStep[] = [
    { drvPath: libc, name: "libc", system: "x86_64-linux", dependsOn: [] },
    { drvPath: zlib, name: "zlib", system: "x86_64-linux", features: ["big-parallel", "kvm"], dependsOn: [libc] },
    { drvPath: app, name: "app", system: "x86_64-linux", dependsOn: [zlib, libc] },
    { drvPath: tool, name: "tool", system: "aarch64-linux", dependsOn: [libc] },
  ];
  const jobs: EvalJob[] = [
    { job: "app", drvPath: app, system: "x86_64-linux", outputs: { out: app.replace(".drv", "") } },
    { job: "tool", drvPath: tool, system: "aarch64-linux", outputs: { out: tool.replace(".drv", "") } },
    { job: "tested", drvPath: drv(`tested${version}`), system: "x86_64-linux", outputs: {}, members: ["app", "tool"] },
  ];
  return { jobs, steps };
}

describe("farm ingest", () => {
  const engines = useFarmEngines("ferry-farm-ingest-");

  for (const engine of ["pglite", "postgres"] as const) {
    test(`evaluations become builds and shared steps, and their diff is known (${engine})`, async () => {
      const fdb = await engines.open(engine);
      try {
        assert.equal((await migrateFarmDatabase(fdb)).error, undefined);
        const db = fdb.db;
        const p = await sql<{ id: number }>`insert into projects (name) values ('demo') returning id`.execute(db);
        const js = await sql<{ id: number }>`insert into jobsets (project_id, name, repo, file) values (${p.rows[0]!.id}, 'main', '/src/demo', 'packages.ts') returning id`.execute(db);
        const jobsetId = js.rows[0]!.id;

        const e1 = evaluation("1");
        const r1 = await ingestEvaluation(db, { jobsetId, inputsHash: "h1", jobs: e1.jobs, steps: e1.steps });
        assert.equal(r1.builds, 3);
        assert.equal(r1.newSteps, 4);
        assert.equal(r1.changedJobs, 3);
        const zlib = await sql<{ features: string[] }>`select features from steps where name = 'zlib'`.execute(db);
        assert.deepEqual(zlib.rows[0]!.features, ["big-parallel", "kvm"]);
        const libc = await sql<{ features: string[] }>`select features from steps where name = 'libc'`.execute(db);
        assert.deepEqual(libc.rows[0]!.features, []);
        const edges = await sql<{ n: string }>`select count(*) as n from step_deps`.execute(db);
        assert.equal(Number(edges.rows[0]!.n), 4);
        const agg = await sql<{ n: string }>`select count(*) as n from aggregate_members`.execute(db);
        assert.equal(Number(agg.rows[0]!.n), 2);
        // the aggregate's own derivation is not a step here, so it is not queued
        const statuses = await sql<{ job: string; status: string }>`select job, status from builds where evaluation_id = ${r1.evaluationId} order by job`.execute(db);
        assert.deepEqual(statuses.rows.map((r) => `${r.job}:${r.status}`), ["app:queued", "tested:succeeded", "tool:queued"]);

        // a second evaluation where only app changed: steps are shared, one is new
        const e2 = evaluation("2");
        const r2 = await ingestEvaluation(db, { jobsetId, inputsHash: "h2", jobs: e2.jobs, steps: e2.steps });
        assert.equal(r2.newSteps, 1);
        assert.equal(r2.changedJobs, 2, "app and the aggregate changed");
        const diff = await diffEvaluations(db, r1.evaluationId, r2.evaluationId);
        assert.deepEqual(diff.added, []);
        assert.deepEqual(diff.removed, []);
        assert.deepEqual(diff.changed, ["app", "tested"]);
        assert.equal(diff.stepsNeeded, 3, "app2, zlib and libc are not built yet");

        // a failing ingest (a build for an unknown jobset) leaves no evaluation behind
        const count = async () => Number((await sql<{ n: string }>`select count(*) as n from evaluations`.execute(db)).rows[0]!.n);
        const n = await count();
        await assert.rejects(ingestEvaluation(db, { jobsetId: 9999, inputsHash: "x", jobs: e2.jobs, steps: [] }));
        assert.equal(await count(), n);
      } finally {
        await fdb.close();
      }
    });
  }
});

/**
 * Durable step claims on PGlite and PostgreSQL: dependencies gate claims, systems and features
 * are honoured, an expired lease re-queues the step, a stale owner's result is refused, and
 * with claimers racing (and one of them "dying") every step finishes exactly once.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { sql } from "kysely";
import { migrateFarmDatabase, type FarmDatabase } from "../../src/farm/db/index.js";
import { ingestEvaluation, type EvalStep } from "../../src/farm/db/ingest.js";
import { claimSteps, finishStep, renewLeases, requeueExpired } from "../../src/farm/db/steps.js";
import { useFarmEngines } from "../helpers/farm-db.js";

const drv = (n: string) => `/ferry/store/${n.padStart(32, "b").slice(0, 32)}-${n}.drv`;

async function seed(db: FarmDatabase["db"], steps: EvalStep[]): Promise<void> {
  await sql`truncate steps, step_deps, builds, build_steps, evaluations, jobsets, projects cascade`.execute(db);
  const p = await sql<{ id: number }>`insert into projects (name) values ('t') returning id`.execute(db);
  const js = await sql<{ id: number }>`insert into jobsets (project_id, name, repo, file) values (${p.rows[0]!.id}, 'j', '/r', 'f.ts') returning id`.execute(db);
  await ingestEvaluation(db, { jobsetId: js.rows[0]!.id, inputsHash: "h", jobs: [], steps });
}

describe("farm step claims", () => {
  const engines = useFarmEngines("ferry-farm-steps-");

  for (const engine of ["pglite", "postgres"] as const) {
    test(`claims follow dependencies, systems and features; leases expire; stale results are refused (${engine})`, async () => {
      const fdb = await engines.open(engine);
      try {
        await migrateFarmDatabase(fdb);
        const db = fdb.db;
        await seed(db, [
          { drvPath: drv("base"), name: "base", system: "x86_64-linux", dependsOn: [] },
          { drvPath: drv("kvm-test"), name: "kvm-test", system: "x86_64-linux", features: ["kvm"], dependsOn: [drv("base")] },
          { drvPath: drv("arm"), name: "arm", system: "aarch64-linux", dependsOn: [] },
          { drvPath: drv("top"), name: "top", system: "x86_64-linux", dependsOn: [drv("base")] },
        ]);
        const x86 = { systems: ["x86_64-linux"], features: [] as string[], limit: 10, leaseMs: 60_000 };
        const first = await claimSteps(db, { ...x86, owner: "w1" });
        assert.deepEqual(first.map((s) => s.name), ["base"], "only steps whose dependencies succeeded");
        assert.deepEqual(await claimSteps(db, { ...x86, owner: "w2" }), [], "a claimed step is not claimed again");
        assert.equal(await finishStep(db, first[0]!.id, "w2", { status: "succeeded", durationMs: 5 }), false, "not w2's lease");
        assert.equal(await finishStep(db, first[0]!.id, "w1", { status: "succeeded", durationMs: 5 }), true);
        assert.equal(await finishStep(db, first[0]!.id, "w1", { status: "succeeded", durationMs: 5 }), false, "finished once");
        const next = await claimSteps(db, { ...x86, owner: "w1", leaseMs: 1 });
        assert.deepEqual(next.map((s) => s.name), ["top"], "kvm-test needs a feature w1 lacks");
        const kvm = await claimSteps(db, { ...x86, owner: "w3", features: ["kvm", "big-parallel"] });
        assert.deepEqual(kvm.map((s) => s.name), ["kvm-test"]);
        assert.deepEqual((await claimSteps(db, { ...x86, owner: "w4", systems: ["aarch64-linux"] })).map((s) => s.name), ["arm"]);
        // w1's 1 ms lease on top expires: the step is queued again and w1's late result is refused
        await new Promise((r) => setTimeout(r, 20));
        assert.equal(await renewLeases(db, "w3", 60_000), 1);
        const requeued = await requeueExpired(db);
        assert.deepEqual(requeued, [next[0]!.id]);
        assert.equal(await finishStep(db, next[0]!.id, "w1", { status: "succeeded", durationMs: 5 }), false);
        const again = await claimSteps(db, { ...x86, owner: "w5" });
        assert.equal(again[0]!.name, "top");
        assert.equal(again[0]!.attempts, 1, "the expired attempt counts");
      } finally {
        await fdb.close();
      }
    });
  }

  test("racing claimers on PostgreSQL, one of them dying mid-step: every step finishes exactly once", async () => {
    const fdb = await engines.open("postgres", { poolSize: 8 });
    try {
      await migrateFarmDatabase(fdb);
      const db = fdb.db;
      const n = 300;
      const steps: EvalStep[] = Array.from({ length: n }, (_, i) => ({ drvPath: drv(`s${i}`), name: `s${i}`, system: "x86_64-linux", dependsOn: i >= 10 ? [drv(`s${i % 10}`)] : [] }));
      await seed(db, steps);
      const finished: string[] = [];
      const worker = async (owner: string, dieAfter: number) => {
        let done = 0;
        for (let idle = 0; idle < 30; ) {
          const claimed = await claimSteps(db, { owner, systems: ["x86_64-linux"], features: [], limit: 3, leaseMs: dieAfter < Infinity ? 50 : 60_000 });
          if (claimed.length === 0) {
            idle++;
            await requeueExpired(db);
            await new Promise((r) => setTimeout(r, 10));
            continue;
          }
          idle = 0;
          for (const s of claimed) {
            if (done >= dieAfter) return; // "killed": holds its claims without finishing them
            if (await finishStep(db, s.id, owner, { status: "succeeded", durationMs: 1 })) finished.push(s.id);
            done++;
          }
        }
      };
      await Promise.all([worker("a", Infinity), worker("b", Infinity), worker("dies", 5), worker("c", Infinity)]);
      assert.equal(finished.length, n, "every step finished");
      assert.equal(new Set(finished).size, n, "none twice");
      const left = await sql<{ n: string }>`select count(*) as n from steps where status <> 'succeeded'`.execute(db);
      assert.equal(Number(left.rows[0]!.n), 0);
    } finally {
      await fdb.close();
    }
  });
});

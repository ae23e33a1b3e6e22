/**
 * Durable step state on PGlite and PostgreSQL, as the dispatcher writes it: claims of assigned
 * steps, lease renewal and expiry, results accepted only from the lease owner and only once,
 * and two would-be leaders claiming the same steps at once (each step goes to one of them).
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { sql } from "kysely";
import { migrateFarmDatabase, type FarmDatabase } from "../../src/farm/db/index.js";
import { ingestEvaluation, type EvalStep } from "../../src/farm/db/ingest.js";
import { claimAssigned, recordStepResults, renewStepLeases, requeueExpired, requeueSteps } from "../../src/farm/db/steps.js";
import { useFarmEngines } from "../helpers/farm-db.js";

const drv = (n: string) => `/ferry/store/${n.padStart(32, "b").slice(0, 32)}-${n}.drv`;

async function seed(db: FarmDatabase["db"], steps: EvalStep[]): Promise<Map<string, string>> {
  await sql`truncate steps, step_deps, builds, build_steps, evaluations, jobsets, projects cascade`.execute(db);
  const p = await sql<{ id: number }>`insert into projects (name) values ('t') returning id`.execute(db);
  const js = await sql<{ id: number }>`insert into jobsets (project_id, name, repo, file) values (${p.rows[0]!.id}, 'j', '/r', 'f.ts') returning id`.execute(db);
  await ingestEvaluation(db, { jobsetId: js.rows[0]!.id, inputsHash: "h", jobs: [], steps });
  const ids = await sql<{ id: string; name: string }>`select id::text as id, name from steps`.execute(db);
  return new Map(ids.rows.map((r) => [r.name, r.id]));
}

const step = async (db: FarmDatabase["db"], id: string) =>
  (await sql<{ status: string; lease_owner: string | null; attempts: number }>`select status, lease_owner, attempts from steps where id = ${id}`.execute(db)).rows[0]!;

const ok = (stepId: string, owner: string) => ({ stepId, owner, status: "succeeded" as const, durationMs: 5 });

describe("farm step state", () => {
  const engines = useFarmEngines("ferry-farm-steps-");

  for (const engine of ["pglite", "postgres"] as const) {
    test(`claims, leases and results: only the lease owner finishes a step, and only once (${engine})`, async () => {
      const fdb = await engines.open(engine);
      try {
        await migrateFarmDatabase(fdb);
        const db = fdb.db;
        const id = await seed(db, [
          { drvPath: drv("base"), name: "base", system: "x86_64-linux", dependsOn: [] },
          { drvPath: drv("top"), name: "top", system: "x86_64-linux", dependsOn: [drv("base")] },
          { drvPath: drv("arm"), name: "arm", system: "aarch64-linux", dependsOn: [] },
        ]);
        const [base, top, arm] = ["base", "top", "arm"].map((n) => id.get(n)!) as [string, string, string];
        const claimed = await claimAssigned(db, [{ stepId: base, owner: "w1" }, { stepId: arm, owner: "w2" }], 60_000);
        assert.deepEqual(claimed.map((c) => c.id).sort(), [base, arm].sort());
        assert.deepEqual(await claimAssigned(db, [{ stepId: base, owner: "w3" }], 60_000), [], "a running step is not claimed again");
        assert.equal((await step(db, base)).lease_owner, "w1");
        assert.deepEqual(await renewStepLeases(db, "w1", [base, arm], 60_000), [base], "only w1's own lease is renewed");

        let r = await recordStepResults(db, { outcomes: [ok(base, "w2")], depFailed: [] });
        assert.deepEqual(r.refused, [base], "not w2's lease");
        assert.equal((await step(db, base)).status, "running");
        r = await recordStepResults(db, { outcomes: [ok(base, "w1")], depFailed: [] });
        assert.deepEqual(r.refused, []);
        assert.equal((await step(db, base)).status, "succeeded");
        r = await recordStepResults(db, { outcomes: [ok(base, "w1")], depFailed: [] });
        assert.deepEqual(r.refused, [base], "finished once");
        const events = await sql<{ n: string }>`select count(*) as n from farm_events where kind = 'step:finished'`.execute(db);
        assert.equal(Number(events.rows[0]!.n), 1);

        // w1's 1 ms lease on top expires: the step is queued again (an attempt counted) and w1's late result is refused.
        await claimAssigned(db, [{ stepId: top, owner: "w1" }], 1);
        await new Promise((res) => setTimeout(res, 20));
        assert.deepEqual(await renewStepLeases(db, "w2", [arm], 60_000), [arm]);
        assert.deepEqual(await requeueExpired(db), [top]);
        assert.deepEqual((await recordStepResults(db, { outcomes: [ok(top, "w1")], depFailed: [] })).refused, [top]);
        assert.deepEqual(await step(db, top), { status: "queued", lease_owner: null, attempts: 1 });
        // A step given back (a refusal, a lost message) is queued again without counting an attempt.
        const again = await claimAssigned(db, [{ stepId: top, owner: "w5" }], 60_000);
        assert.equal(again[0]!.attempts, 1);
        await requeueSteps(db, [top]);
        assert.deepEqual(await step(db, top), { status: "queued", lease_owner: null, attempts: 1 });
      } finally {
        await fdb.close();
      }
    });
  }

  test("two would-be leaders claiming the same steps at once on PostgreSQL: each step goes to exactly one", async () => {
    const fdb = await engines.open("postgres", { poolSize: 8 });
    try {
      await migrateFarmDatabase(fdb);
      const db = fdb.db;
      const n = 300;
      const id = await seed(db, Array.from({ length: n }, (_, i) => ({ drvPath: drv(`s${i}`), name: `s${i}`, system: "x86_64-linux", dependsOn: [] })));
      const all = [...id.values()];
      // Both claim every step, in batches of 10, in opposite orders, concurrently.
      const claimer = async (owner: string, ids: string[]) => {
        const got: string[] = [];
        for (let i = 0; i < ids.length; i += 10) got.push(...(await claimAssigned(db, ids.slice(i, i + 10).map((stepId) => ({ stepId, owner })), 60_000)).map((c) => c.id));
        return got;
      };
      const [a, b] = await Promise.all([claimer("old-leader", all), claimer("new-leader", [...all].reverse())]);
      assert.equal(a.length + b.length, n, "every step claimed once");
      assert.equal(new Set([...a, ...b]).size, n, "none twice");
      const owners = await sql<{ lease_owner: string; n: string }>`select lease_owner, count(*) as n from steps group by lease_owner order by lease_owner`.execute(db);
      assert.deepEqual(owners.rows.map((r) => [r.lease_owner, Number(r.n)]).sort(), [["new-leader", b.length], ["old-leader", a.length]].filter(([, k]) => k !== 0).sort());
    } finally {
      await fdb.close();
    }
  });
});

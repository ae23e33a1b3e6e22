/**
 * Aggregate jobs: `aggregate()` in a package set becomes a build whose members are the
 * constituent jobs (real evaluator, real git repository), and `settleAggregates` makes an
 * aggregate's status follow its members, nested aggregates included, on PGlite and PostgreSQL.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { sql, type Kysely } from "kysely";
import { migrateFarmDatabase, type FarmSchema } from "../../src/farm/db/index.js";
import { aggregateStatus, settleAggregates } from "../../src/farm/db/builds.js";
import { settleBuilds } from "../../src/farm/db/steps.js";
import { evaluateJobset } from "../../src/farm/evaluator.js";
import { LocalStore } from "../../src/store/local-store.js";
import { resolveStoreLocation } from "../../src/store/config.js";
import { useFarmEngines } from "../helpers/farm-db.js";
import { gitRepo } from "../helpers/git-repo.js";
import { drv, finishSteps, freshDatabase, seedEvaluation } from "../helpers/farm-api.js";

const SET = `
import { derivation, aggregate } from "ferry";
export const base = derivation({ name: "base", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo base > $out"] });
export const app = derivation({ name: "app", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $base > $out"], base });
export const tested = aggregate({ name: "tested", constituents: [app, base] });
`;

async function statuses(db: Kysely<FarmSchema>, jobset: string): Promise<Record<string, string>> {
  const r = await sql<{ job: string; status: string }>`
    select b.job, b.status from builds b join jobsets j on j.id = b.jobset_id where j.name = ${jobset}
      and b.evaluation_id = (select max(id) from evaluations where jobset_id = j.id) order by b.job`.execute(db);
  return Object.fromEntries(r.rows.map((x) => [x.job, x.status]));
}

async function buildIds(db: Kysely<FarmSchema>, jobset: string, ...jobs: string[]): Promise<string[]> {
  const r = await sql<{ id: string }>`
    select b.id::text as id from builds b join jobsets j on j.id = b.jobset_id where j.name = ${jobset} and b.job = any(${sql.val(jobs)}::text[])`.execute(db);
  return r.rows.map((x) => x.id);
}

describe("farm aggregates", () => {
  const engines = useFarmEngines("ferry-farm-aggregates-");

  test("an aggregate's status from its own step and its members", () => {
    assert.equal(aggregateStatus("queued", "queued", ["succeeded", "queued"]), "queued");
    assert.equal(aggregateStatus("queued", "succeeded", ["succeeded", "succeeded"]), "succeeded");
    assert.equal(aggregateStatus("queued", null, ["succeeded"]), "succeeded", "nothing of its own to build");
    assert.equal(aggregateStatus("succeeded", "succeeded", ["succeeded", "queued"]), "queued", "its step alone does not make it succeed");
    assert.equal(aggregateStatus("dependency-failed", "dependency-failed", ["failed", "succeeded"]), "failed", "a member failed");
    assert.equal(aggregateStatus("queued", "queued", ["cancelled"]), "failed");
    assert.equal(aggregateStatus("queued", "failed", ["succeeded"]), "failed");
    assert.equal(aggregateStatus("cancelled", "queued", ["failed"]), "cancelled", "a cancelled aggregate stays so");
  });

  for (const engine of ["pglite", "postgres"] as const) {
    test(`settleAggregates follows members, nested aggregates too, and writes events (${engine})`, async () => {
      const fdb = await freshDatabase(engines, engine, "aggregates");
      try {
        assert.equal((await migrateFarmDatabase(fdb)).error, undefined);
        const db = fdb.db;
        await seedEvaluation(db, "demo", "rel", [
          { job: "a" },
          { job: "b" },
          { job: "c" },
          { job: "tested", deps: ["a", "b"], members: ["a", "b"] },
          { job: "all", deps: ["tested", "c"], members: ["tested", "c"] },
        ]);
        const settle = (ids: string[]) => db.transaction().execute((tx) => settleAggregates(tx, ids));
        await finishSteps(db, "succeeded", "a");
        assert.deepEqual(await settle(await buildIds(db, "rel", "a")), [], "b is still queued");
        // b fails; the dispatcher marks what waited on it dependency-failed, then settles.
        await finishSteps(db, "failed", "b");
        await finishSteps(db, "dependency-failed", "tested", "all");
        const changed = await settle(await buildIds(db, "rel", "b", "tested", "all"));
        assert.deepEqual(changed.map((c) => `${c.from}->${c.to}`), ["dependency-failed->failed", "dependency-failed->failed"]);
        assert.deepEqual(await statuses(db, "rel"), { a: "succeeded", all: "failed", b: "failed", c: "queued", tested: "failed" });
        const events = await sql<{ payload: { job: string; status: string; project: string } }>`select payload from farm_events where kind = 'build:finished' order by id`.execute(db);
        assert.deepEqual(events.rows.map((e) => `${e.payload.project}/${e.payload.job}:${e.payload.status}`), ["demo/tested:failed", "demo/all:failed"]);

        // An aggregate whose own derivation does not wait for its members (made elsewhere than
        // by aggregate()): its step succeeding is not enough.
        await seedEvaluation(db, "demo", "loose", [{ job: "m1" }, { job: "m2" }, { job: "gate", members: ["m1", "m2"] }]);
        await finishSteps(db, "succeeded", "gate");
        await settle(await buildIds(db, "loose", "gate"));
        assert.equal((await statuses(db, "loose")).gate, "queued");
        await finishSteps(db, "succeeded", "m1", "m2");
        await settle(await buildIds(db, "loose", "m1", "m2"));
        assert.equal((await statuses(db, "loose")).gate, "succeeded");
        assert.deepEqual(await settle(await buildIds(db, "loose", "m1", "m2", "gate")), [], "settling again changes nothing");

        // As the dispatcher settles finished steps (settleBuilds): a failed aggregate whose
        // member is restarted and then succeeds, with its other member, succeeds too.
        await seedEvaluation(db, "demo", "revive", [{ job: "r1" }, { job: "r2" }, { job: "rgate", members: ["r1", "r2"] }]);
        const stepEnds = async (status: string, ...jobs: string[]) => {
          const ids = await sql<{ id: string }>`update steps set status = ${status}, finished_at = now() where drv_path = any(${jobs.map(drv)}::text[]) returning id::text as id`.execute(db);
          return db.transaction().execute((tx) => settleBuilds(tx, ids.rows.map((r) => r.id)));
        };
        await stepEnds("succeeded", "rgate");
        await stepEnds("failed", "r1");
        assert.deepEqual(await statuses(db, "revive"), { r1: "failed", r2: "queued", rgate: "failed" });
        // The restart (as the leader's requeue does): the step and its build queued again.
        await sql`update steps set status = 'queued', finished_at = null where drv_path = ${drv("r1")}`.execute(db);
        await sql`update builds set status = 'queued', finished_at = null where drv_path = ${drv("r1")}`.execute(db);
        await stepEnds("succeeded", "r1");
        assert.equal((await statuses(db, "revive")).rgate, "queued", "no longer failed: r2 is still to come");
        const last = await stepEnds("succeeded", "r2");
        assert.deepEqual(last.map((b) => b.job), ["r2"]);
        assert.deepEqual(await statuses(db, "revive"), { r1: "succeeded", r2: "succeeded", rgate: "succeeded" });
      } finally {
        await fdb.close();
      }
    });
  }

  test("aggregate() in a package set: a derivation on its constituents, a build with members", async () => {
    const dir = engines.dir();
    const repo = gitRepo(join(dir, "repo"), { "packages.ts": SET });
    const fdb = await engines.open("pglite", { name: "dsl" });
    const store = LocalStore.open(resolveStoreLocation({ storeDir: "/ferry/store", stateDir: "/ferry/var", root: join(dir, "store") }, {}));
    try {
      await migrateFarmDatabase(fdb);
      const db = fdb.db;
      await seedEvaluation(db, "demo", "dsl", []);
      const js = await sql<{ id: number }>`update jobsets set repo = ${repo} where name = 'dsl' returning id`.execute(db);
      const o = await evaluateJobset({ db, store, dataDir: dir, timeoutSeconds: 60, memoryMiB: 512 }, { id: js.rows[0]!.id, repo, branch: "main", file: "packages.ts" });
      assert.equal(o.kind, "evaluated", o.kind === "failed" ? o.error.message : "");
      const tested = await sql<{ id: string; is_aggregate: boolean; drv_path: string }>`select id::text as id, is_aggregate, drv_path from builds where job = 'tested'`.execute(db);
      assert.equal(tested.rows[0]!.is_aggregate, true);
      const members = await sql<{ job: string }>`select m.job from aggregate_members am join builds m on m.id = am.member_id where am.aggregate_id = ${tested.rows[0]!.id} order by m.job`.execute(db);
      assert.deepEqual(members.rows.map((m) => m.job), ["app", "base"]);
      const deps = await sql<{ name: string }>`
        select d.name from step_deps sd join steps s on s.id = sd.step_id join steps d on d.id = sd.depends_on where s.drv_path = ${tested.rows[0]!.drv_path} order by d.name`.execute(db);
      assert.deepEqual(deps.rows.map((d) => d.name), ["app", "base"], "the aggregate builds after its constituents");
    } finally {
      store.close();
      await fdb.close();
    }
  });
});

/**
 * Evaluating jobsets from git repositories into the farm's database: a real git repository on
 * disk, the sandboxed evaluator, the coordinator's store. Unchanged inputs are skipped; a new
 * commit gives a new evaluation whose diff names what changed; a broken commit keeps its error.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { sql } from "kysely";
import { migrateFarmDatabase } from "../../src/farm/db/index.js";
import { diffEvaluations } from "../../src/farm/db/ingest.js";
import { evaluateJobset } from "../../src/farm/evaluator.js";
import { LocalStore } from "../../src/store/local-store.js";
import { resolveStoreLocation } from "../../src/store/config.js";
import { useFarmEngines } from "../helpers/farm-db.js";
import { gitCommit, gitRepo } from "../helpers/git-repo.js";

const SET = (extra: string) => `
import { derivation } from "ferry";
export const base = derivation({ name: "base", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo base > $out"] });
export const app = derivation({ name: "app", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $base ${extra} > $out"], base });
export const heavy = derivation({ name: "heavy", system: "aarch64-linux", builder: "/bin/sh", args: ["-c", "echo heavy > $out"], requiredSystemFeatures: ["big-parallel"] });
`;

describe("jobset evaluation", () => {
  const engines = useFarmEngines("ferry-farm-eval-");

  test("git checkout, sandboxed evaluation, skip when unchanged, diff after a commit, errors kept", async () => {
    const dir = engines.dir();
    const repo = gitRepo(join(dir, "repo"), { "packages.ts": SET("v1") });

    const fdb = await engines.open("pglite", { name: "eval-db" });
    const store = LocalStore.open(resolveStoreLocation({ storeDir: "/ferry/store", stateDir: "/ferry/var", root: join(dir, "store") }, {}));
    try {
      await migrateFarmDatabase(fdb);
      const db = fdb.db;
      const p = await sql<{ id: number }>`insert into projects (name) values ('demo') returning id`.execute(db);
      const js = await sql<{ id: number }>`insert into jobsets (project_id, name, repo, branch, file) values (${p.rows[0]!.id}, 'main', ${repo}, 'main', 'packages.ts') returning id`.execute(db);
      const spec = async () => {
        const r = await sql<{ id: number; repo: string; branch: string; file: string; attr: string | null; last_inputs_hash: string | null }>`select * from jobsets where id = ${js.rows[0]!.id}`.execute(db);
        const row = r.rows[0]!;
        return { id: row.id, repo: row.repo, branch: row.branch, file: row.file, attr: row.attr, lastInputsHash: row.last_inputs_hash };
      };
      // Publishing (the last use of the .drv files) finds them valid and rooted: a GC then takes nothing.
      const published: { paths: number; valid: boolean; collected: number }[] = [];
      const publish = async (paths: readonly string[]) => {
        published.push({ paths: paths.length, valid: paths.every((p) => store.isValid(p)), collected: store.gc().deleted.length });
      };
      const ctx = { db, store, dataDir: dir, timeoutSeconds: 60, memoryMiB: 512, publish };

      const first = await evaluateJobset(ctx, await spec());
      assert.equal(first.kind, "evaluated", first.kind === "failed" ? first.error.message : "");
      assert.ok(first.kind === "evaluated");
      assert.equal(first.result.builds, 3);
      assert.equal(first.result.newSteps, 3);
      const heavy = await sql<{ system: string; features: string[] }>`select system, features from steps where name = 'heavy'`.execute(db);
      assert.deepEqual(heavy.rows[0], { system: "aarch64-linux", features: ["big-parallel"] });
      const edge = await sql<{ n: string }>`select count(*) as n from step_deps`.execute(db);
      assert.equal(Number(edge.rows[0]!.n), 1, "app waits for base");
      // The .drv files were written by threads of their own and stayed rooted until published;
      // after the evaluation nothing holds them (workers fetch them from the farm cache).
      assert.deepEqual(published, [{ paths: 3, valid: true, collected: 0 }]);
      const drvs = await sql<{ drv_path: string }>`select drv_path from builds where evaluation_id = ${first.result.evaluationId}`.execute(db);
      assert.deepEqual([...store.gc().deleted].sort(), drvs.rows.map((r) => r.drv_path).sort(), "the coordinator does not keep every evaluation's derivations for ever");

      assert.equal((await evaluateJobset(ctx, await spec())).kind, "unchanged");

      gitCommit(repo, { "packages.ts": SET("v2") }, "two");
      const second = await evaluateJobset(ctx, await spec());
      assert.ok(second.kind === "evaluated");
      const diff = await diffEvaluations(db, first.result.evaluationId, second.result.evaluationId);
      assert.deepEqual(diff.changed, ["app"]);
      assert.equal(second.result.newSteps, 1);

      gitCommit(repo, { "packages.ts": "export const broken = ;\n" }, "broken");
      const third = await evaluateJobset(ctx, await spec());
      assert.equal(third.kind, "failed");
      const kept = await sql<{ error: string }>`select error from jobsets where id = ${js.rows[0]!.id}`.execute(db);
      assert.match(kept.rows[0]!.error, /FERRY_EVAL/);

      const missing = await evaluateJobset(ctx, { ...(await spec()), repo: join(dir, "no-such-repo"), lastInputsHash: null });
      assert.ok(missing.kind === "failed" && missing.error.code === "FERRY_FARM_CHECKOUT_FAILED", missing.kind === "failed" ? missing.error.message : missing.kind);
      const errors = await sql<{ n: string }>`select count(*) as n from evaluations where error is not null`.execute(db);
      assert.equal(Number(errors.rows[0]!.n), 2, "both failures are kept for display");
    } finally {
      store.close();
      await fdb.close();
    }
  });
});

/**
 * The whole farm, as separate processes: `ferry farm serve` evaluates a jobset from a git
 * repository, publishes the derivations to its cache, and real `ferry worker`s build the steps
 * in the sandbox and upload the outputs. Then the crash rules: a worker killed mid-step loses
 * the step to another worker once its lease expires; a coordinator killed (SIGKILL) in the
 * middle of a 2,000-step run and restarted finishes every build exactly once.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { sql } from "kysely";
import { ferryOk } from "../helpers/cli.js";
import { useFarmEngines } from "../helpers/farm-db.js";
import { gitRepo } from "../helpers/git-repo.js";
import { spawnFarmServe, spawnFerryWorker, type FarmProcess } from "../helpers/farm-processes.js";
import { dag, seedJobset, statusCounts, until } from "../helpers/farm-dag.js";
import { startScriptedWorker } from "../helpers/scripted-worker.js";
import { migrateFarmDatabase } from "../../src/farm/db/index.js";
import { ingestEvaluation } from "../../src/farm/db/ingest.js";

const SET = `
import { derivation } from "ferry";
export const base = derivation({ name: "base", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo building base; echo base > $out"] });
export const app = derivation({ name: "app", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo building app; read x < $base; echo \\"$x app\\" > $out"], base });
export const slow = derivation({ name: "slow", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo slow start; i=0; while [ $i -lt 40 ]; do i=$((i+1)); sleep 0.1; done; echo slow > $out"] });
`;

const storeFlags = (root: string) => ["--store-dir", "/ferry/store", "--state-dir", "/ferry/var", "--root", root];

interface Build {
  job: string;
  status: string;
  drvPath: string;
}
const builds = (url: string): Build[] =>
  ferryOk(["farm", "builds", "--farm", url, "demo", "main", "--json"])
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as Build);

describe("the farm end to end", () => {
  const engines = useFarmEngines("ferry-farm-e2e-");

  test("serve + two real workers build a jobset; outputs land in the farm cache; a worker killed mid-step loses the step after its lease", async () => {
    const dir = join(engines.dir(), "real");
    const repo = gitRepo(join(dir, "repo"), { "packages.ts": SET });
    const farm = await spawnFarmServe(["--listen", "127.0.0.1:0", "--data-dir", join(dir, "farm"), "--admin-token", "adm", "--worker-token", "wrk", "--lease-seconds", "3", "--check-every", "0", ...storeFlags(join(dir, "coord"))]);
    const workers: FarmProcess[] = [];
    try {
      ferryOk(["farm", "jobset", "add", "--farm", farm.url, "--token", "adm", "demo", "main", "--repo", repo, "--file", "packages.ts"]);
      const ev = JSON.parse(ferryOk(["farm", "eval", "--farm", farm.url, "--token", "adm", "demo", "main", "--wait"])) as { status: string; builds: number };
      assert.equal(ev.status, "evaluated");
      for (const id of ["wa", "wb"]) workers.push(spawnFerryWorker(farm.url, "wrk", ["--id", id, "--max-jobs", "1", ...storeFlags(join(dir, id))]));
      // Whoever takes "slow" is killed while it builds.
      let victim = "";
      let slowStep = "";
      await until("a worker to run the slow step", async () => {
        const ws = (await (await fetch(`${farm.url}/api/workers`)).json()) as { id: string; running: string[] }[];
        const steps = await Promise.all(ws.flatMap((w) => w.running.map(async (s) => [w.id, s, ((await (await fetch(`${farm.url}/api/steps/${s}`)).json()) as { name: string }).name] as const)));
        const hit = steps.find(([, , name]) => name === "slow");
        if (hit) [victim, slowStep] = [hit[0], hit[1]];
        return victim !== "";
      }, 60_000);
      const killed = workers[victim === "wa" ? 0 : 1]!;
      await killed.kill9();
      await until("every build to succeed", () => builds(farm.url).every((b) => b.status === "succeeded"), 90_000);
      const b = builds(farm.url);
      assert.deepEqual(b.map((x) => x.job).sort(), ["app", "base", "slow"]);
      const survivor = victim === "wa" ? "wb" : "wa";
      const step = (await (await fetch(`${farm.url}/api/steps/${slowStep}`)).json()) as { status: string; machine: string; attempts: number };
      assert.deepEqual([step.status, step.machine, step.attempts], ["succeeded", survivor, 1], "the slow step moved to the other worker after the lease");
      assert.match(await (await fetch(`${farm.url}/api/steps/${slowStep}/log`)).text(), /slow start/);
      const connected = (await (await fetch(`${farm.url}/api/workers`)).json()) as { id: string }[];
      assert.deepEqual(connected.map((w) => w.id), [survivor], "the killed worker is gone");
      // The outputs are in the farm cache, signed, and the coordinator kept the logs.
      const cacheDir = join(dir, "farm", "cache");
      const narinfos = fs.readdirSync(cacheDir).filter((n) => n.endsWith(".narinfo"));
      const text = narinfos.map((n) => fs.readFileSync(join(cacheDir, n), "utf8")).join("\n");
      assert.match(text, /StorePath: \/ferry\/store\/[0-9a-z]{32}-slow\n/);
      assert.match(text, /StorePath: \/ferry\/store\/[0-9a-z]{32}-app\n/);
      assert.match(text, /Sig: ferry-farm-1:/);
      const logs = fs.readdirSync(join(dir, "farm", "logs")).map((n) => fs.readFileSync(join(dir, "farm", "logs", n), "utf8")).join("");
      assert.match(logs, /building app/);
      const metrics = await (await fetch(`${farm.url}/metrics`)).text();
      assert.match(metrics, /^ferry_farm_workers 1$/m);
      assert.match(metrics, /^ferry_farm_worker_utilisation /m);
    } finally {
      for (const w of workers) await w.kill9();
      await farm.stop();
    }
  });

  test("the coordinator killed with SIGKILL in the middle of a 2,000-step run: after a restart every build finishes exactly once", async () => {
    const dir = join(engines.dir(), "crash");
    const fdb = await engines.open("postgres", { poolSize: 2 });
    await migrateFarmDatabase(fdb);
    const jobsetId = await seedJobset(fdb.db);
    const { steps, jobs } = dag(2000, 3);
    await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs, steps });
    // A fixed port, so the workers find the restarted coordinator where they left it.
    const probe = await spawnFarmServe(["--listen", "127.0.0.1:0", "--data-dir", join(dir, "probe"), "--admin-token", "adm", "--no-dispatch", "--check-every", "0", ...storeFlags(join(dir, "s"))]);
    const port = new URL(probe.url).port;
    await probe.stop();
    const args = ["--listen", `127.0.0.1:${port}`, "--database", engines.pg().url, "--data-dir", join(dir, "farm"), "--admin-token", "adm", "--worker-token", "wrk", "--lease-seconds", "5", "--check-every", "0", ...storeFlags(join(dir, "s"))];
    let farm = await spawnFarmServe(args);
    const workers = ["c1", "c2", "c3"].map((id) => startScriptedWorker({ url: farm.url, token: "wrk", id, maxJobs: 4, duration: () => 8 }));
    try {
      await until("a quarter of the run", async () => ((await statusCounts(fdb.db, "builds")).succeeded ?? 0) >= 500, 60_000);
      await farm.kill9();
      const atKill = (await statusCounts(fdb.db, "builds")).succeeded ?? 0;
      assert.ok(atKill < 2000, "killed in the middle of the run");
      await new Promise((r) => setTimeout(r, 300));
      farm = await spawnFarmServe(args);
      await until("every build", async () => (await statusCounts(fdb.db, "builds")).succeeded === 2000, 120_000);
      const ev = await sql<{ n: string; d: string }>`select count(*) as n, count(distinct payload->>'buildId') as d from farm_events where kind = 'build:finished'`.execute(fdb.db);
      assert.equal(Number(ev.rows[0]!.n), 2000, "each build finished once (one event each)");
      assert.equal(Number(ev.rows[0]!.d), 2000);
      const s = await statusCounts(fdb.db, "steps");
      assert.deepEqual(s, { succeeded: 2000 });
      // No step's result was taken twice: at most one accepted acknowledgement per step.
      const accepted = new Map<string, number>();
      for (const w of workers) for (const [id, ok] of w.acks) if (ok) accepted.set(id, (accepted.get(id) ?? 0) + 1);
      assert.ok([...accepted.values()].every((n) => n === 1));
    } finally {
      for (const w of workers) await w.stop();
      await farm.kill9();
      await fdb.close();
    }
  });
});

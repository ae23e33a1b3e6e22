/**
 * Several coordinators on one PostgreSQL database, as separate processes: exactly one leads
 * (holds the advisory lock, is named in `farm_leader`, says so in /metrics); the others answer
 * the API and redirect workers to it. When the leader is killed with SIGKILL in the middle of a
 * run, a follower takes the lock and rebuilds the schedule from the database, the workers find
 * it (through the other URLs they were given, or back through the coordinator that redirected
 * them), and every build finishes exactly once. The killed coordinator, restarted, is a follower.
 * The coordinators of one farm share its cache (`--cache`): the leader hands it to the workers,
 * whichever coordinator evaluated the jobset.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import pg from "pg";
import { sql } from "kysely";
import { generateSecretKey, printPublicKey, printSecretKey } from "../../src/core/signing.js";
import { ferry, ferryOk } from "../helpers/cli.js";
import { spawnCacheServer } from "../helpers/cache.js";
import { gitRepo } from "../helpers/git-repo.js";
import { useFarmEngines } from "../helpers/farm-db.js";
import { freePort } from "../helpers/postgres.js";
import { spawnFarmServe, spawnFerryWorker, type FarmProcess } from "../helpers/farm-processes.js";
import { dag, drv, seedJobset, statusCounts, until } from "../helpers/farm-dag.js";
import { startScriptedWorker, type ScriptedWorker, type ScriptedWorkerOptions } from "../helpers/scripted-worker.js";
import { migrateFarmDatabase, type FarmDatabase } from "../../src/farm/db/index.js";
import { ingestEvaluation } from "../../src/farm/db/ingest.js";
import { LEADER_APP_PREFIX, LEADER_LOCK_KEY } from "../../src/farm/dispatch/leader.js";
import { startWorker, WorkerState } from "../../src/farm/worker/index.js";
import { LocalStore } from "../../src/store/local-store.js";
import { ScriptedCoordinator } from "../helpers/worker-peer.js";

const storeFlags = (root: string) => ["--store-dir", "/ferry/store", "--state-dir", "/ferry/var", "--root", root];

/** Real derivations for the real worker: `slow` runs long enough to be in flight when the leader dies. */
const SET = `
import { derivation } from "ferry";
const sh = (name, script, deps = {}) => derivation({ name, system: "x86_64-linux", builder: "/bin/sh", args: ["-c", script], ...deps });
export const first = sh("first", "echo first > $out");
export const slow = sh("slow", "echo slow start; i=0; while [ $i -lt 50 ]; do i=$((i+1)); /bin/sleep 0.1; done; /bin/cat $first > $out", { first });
export const last = sh("last", "/bin/cat $slow > $out; echo last >> $out", { slow });
`;
/** The scripted workers' steps are for a system of their own, so the real worker gets only real derivations. */
const FAKE_SYSTEM = "fake-linux";

/** Whether the coordinator at `url` says it schedules (undefined when it does not answer). */
async function leads(url: string): Promise<boolean | undefined> {
  try {
    const text = await (await fetch(`${url}/metrics`)).text();
    const m = /^ferry_farm_leader (\d)$/m.exec(text);
    return m ? m[1] === "1" : undefined;
  } catch {
    return undefined;
  }
}

const getJson = async <T>(url: string): Promise<T> => (await (await fetch(url)).json()) as T;

const leaderRow = async (db: FarmDatabase["db"]) => (await sql<{ url: string }>`select url from farm_leader`.execute(db)).rows.map((r) => r.url);

/** Two coordinators' command lines on one database, each with its own data dir, store and fixed address. */
async function coordinatorPair(dir: string, database: string, extra: readonly string[] = []) {
  const ports = [await freePort(), await freePort()];
  const urls = ports.map((p) => `http://127.0.0.1:${p}`) as [string, string];
  const args = (i: 0 | 1) => {
    const name = "ab"[i]!;
    return ["--listen", `127.0.0.1:${ports[i]}`, "--public-url", urls[i], "--database", database, "--data-dir", join(dir, name), "--admin-token", "adm", "--worker-token", "wrk", "--lease-seconds", "2", "--check-every", "0", ...storeFlags(join(dir, `${name}-store`)), ...extra];
  };
  /** Starts A, waits until it leads, then starts B, its follower. */
  const startBoth = async (): Promise<[FarmProcess, FarmProcess]> => {
    const a = await spawnFarmServe(args(0));
    await until("A to lead", async () => (await leads(urls[0])) === true, 10_000);
    return [a, await spawnFarmServe(args(1))];
  };
  return { urls, args, startBoth };
}

/** Samples both coordinators' /metrics until stopped; counts the samples in which both claimed to lead. */
function watchLeaders(urls: readonly string[]) {
  let both = 0;
  let samples = 0;
  let on = true;
  const done = (async () => {
    while (on) {
      const l = await Promise.all(urls.map(leads));
      samples++;
      if (l.every((x) => x === true)) both++;
      await new Promise((r) => setTimeout(r, 50));
    }
  })();
  return {
    stop: async () => {
      on = false;
      await done;
      return { both, samples };
    },
  };
}

describe("several coordinators on one PostgreSQL database", () => {
  const engines = useFarmEngines("ferry-farm-failover-");
  /** The PostgreSQL farm database, migrated, with a fresh project/jobset to ingest into. */
  const seededDatabase = async () => {
    const fdb = await engines.open("postgres", { poolSize: 2 });
    await migrateFarmDatabase(fdb);
    return { fdb, jobsetId: await seedJobset(fdb.db) };
  };

  test("exactly one of two coordinators leads; a worker that dials the follower is redirected to the leader and gets work; both APIs answer", async () => {
    const dir = join(engines.dir(), "pair");
    const { fdb, jobsetId } = await seededDatabase();
    const { steps, jobs } = dag(40, 5);
    await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs, steps });
    const { urls, startBoth } = await coordinatorPair(dir, engines.pg().url);
    const [A, B] = urls;
    const procs: FarmProcess[] = [];
    let w: ScriptedWorker | undefined;
    try {
      procs.push(...(await startBoth()));
      await until("B to serve", async () => (await leads(B)) !== undefined, 10_000);
      assert.deepEqual([await leads(A), await leads(B)], [true, false], "exactly one leads");
      assert.deepEqual(await leaderRow(fdb.db), [A], "farm_leader names the leader");

      w = startScriptedWorker({ url: B, token: "wrk", id: "via-b", maxJobs: 3, duration: () => 5 });
      await w.welcomed();
      assert.equal(w.welcomedAt(), A, "the follower sent the worker to the leader");
      assert.ok(w.closes.includes(4003), "with a redirect");
      await until("every build", async () => (await statusCounts(fdb.db, "builds")).succeeded === 40);
      assert.equal(w.requests.length, 40);

      const workersOf = async (url: string) => (await getJson<{ id: string }[]>(`${url}/api/workers`)).map((x) => x.id);
      assert.deepEqual(await workersOf(A), ["via-b"], "the leader has the worker");
      const atB = await fetch(`${B}/api/workers`, { redirect: "manual" });
      assert.equal(atB.status, 307, "the follower sends the caller to the leader");
      assert.equal(atB.headers.get("location"), `${A}/api/workers`);
      assert.deepEqual(await workersOf(B), ["via-b"]);
      // The CLI follows the redirect with its token.
      const listed = ferryOk(["farm", "workers", "--farm", B, "--token", "adm", "--json"]).trim().split("\n").map((l) => JSON.parse(l) as { id: string; draining: boolean });
      assert.deepEqual(listed.map((x) => [x.id, x.draining]), [["via-b", false]]);
      assert.equal(ferryOk(["farm", "drain", "--farm", B, "--token", "adm", "via-b"]).trim(), "draining via-b");
      assert.deepEqual((await getJson<{ id: string; draining: boolean }[]>(`${A}/api/workers`)).map((x) => [x.id, x.draining]), [["via-b", true]]);
      const noSuch = ferry(["farm", "drain", "--farm", B, "--token", "adm", "nobody"]);
      assert.equal(noSuch.status, 1);
      assert.match(noSuch.stderr, /FERRY_FARM_UNKNOWN_WORKER/);
      // A third coordinator that only serves the API (--no-dispatch): steps from the database, the rest at the leader.
      const apiOnly = await spawnFarmServe(["--listen", "127.0.0.1:0", "--database", engines.pg().url, "--data-dir", join(dir, "api-only"), "--admin-token", "adm", "--no-dispatch", "--check-every", "0", ...storeFlags(join(dir, "api-only-store"))]);
      procs.push(apiOnly);
      const stepId = (await sql<{ id: string }>`select id::text as id from steps order by id limit 1`.execute(fdb.db)).rows[0]!.id;
      assert.equal((await getJson<{ status: string }>(`${apiOnly.url}/api/steps/${stepId}`)).status, "succeeded");
      assert.deepEqual(await workersOf(apiOnly.url), ["via-b"], "its workers list is the leader's");
      const log = await fetch(`${apiOnly.url}/api/steps/${stepId}/log`, { redirect: "manual" });
      assert.equal(log.status, 307);
      assert.equal(log.headers.get("location"), `${A}/api/steps/${stepId}/log`);
      assert.match(await (await fetch(`${apiOnly.url}/api/steps/${stepId}/log`)).text(), /building/);
      for (const url of urls) {
        const builds = await getJson<{ status: string }[]>(`${url}/api/projects/p/jobsets/j/builds`);
        assert.equal(builds.length, 40, `${url} lists the builds`);
        assert.ok(builds.every((b) => b.status === "succeeded"));
        assert.match(await (await fetch(`${url}/metrics`)).text(), /^ferry_farm_workers \d+$/m);
      }
    } finally {
      await w?.stop();
      for (const p of procs) await p.stop();
      await fdb.close();
    }
  });

  test("a farm_leader row counts only while its coordinator holds the lock; a follower takes the lock the moment it is free", async () => {
    const dir = join(engines.dir(), "stale");
    const { fdb, jobsetId } = await seededDatabase();
    const { steps, jobs } = dag(10, 2);
    await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs, steps });
    // The test plays a leader that is gone: it holds the lock on a connection of its own, and a
    // row names an address where nothing listens (a killed leader's row, before anyone took over).
    const holder = new pg.Client({ connectionString: engines.pg().url, application_name: "not-a-coordinator" });
    await holder.connect();
    await holder.query("select pg_advisory_lock($1)", [LEADER_LOCK_KEY.toString()]);
    const dead = `http://127.0.0.1:${await freePort()}`;
    await sql`insert into farm_leader (id, owner, url) values (1, 'gone', ${dead})`.execute(fdb.db);
    const { urls, args } = await coordinatorPair(dir, engines.pg().url);
    const B = urls[1];
    const b = await spawnFarmServe(args(1));
    const w = startScriptedWorker({ url: B, token: "wrk", id: "w", maxJobs: 2, duration: () => 5 });
    try {
      await until("the follower to answer the worker", () => w.closes.length >= 3, 10_000);
      assert.equal(await leads(B), false);
      assert.ok(w.closes.every((c) => c === 1013), `'try again' (1013), not a redirect to the dead address (4003): ${w.closes.join(" ")}`);
      // Once the lock's session is the row's owner, the follower trusts the row.
      await holder.query(`set application_name = '${LEADER_APP_PREFIX}gone'`);
      await until("a redirect to the row's address", () => w.closes.includes(4003), 10_000);
      // The holder's session ends: the follower, waiting for the lock, takes it at once.
      const t0 = Date.now();
      await holder.end();
      await until("B to lead", async () => (await leads(B)) === true, 10_000);
      const takeoverMs = Date.now() - t0;
      await w.welcomed();
      assert.equal(w.welcomedAt(), B);
      await until("every build", async () => (await statusCounts(fdb.db, "builds")).succeeded === 10);
      assert.deepEqual(await leaderRow(fdb.db), [B]);
      process.stderr.write(`# failover: a waiting follower led ${takeoverMs} ms after the lock was freed\n`);
    } finally {
      await w.stop();
      await holder.end().catch(() => undefined);
      await b.stop();
      await fdb.close();
    }
  });

  test("a worker sent again and again to a leader that does not answer keeps asking, and follows the redirect once the leader is elsewhere", async () => {
    const dir = join(engines.dir(), "redirects");
    const [b, c] = [await ScriptedCoordinator.start("wrk"), await ScriptedCoordinator.start("wrk")];
    const dead = `http://127.0.0.1:${await freePort()}`;
    const store = LocalStore.open({ storeDir: "/ferry/store", stateDir: "/ferry/var", root: join(dir, "store") });
    const worker = startWorker({
      farm: b.url,
      token: "wrk",
      identity: { id: "w", systems: ["x86_64-linux"], features: [], mandatoryFeatures: [], maxJobs: 1, speedFactor: 1 },
      store,
      state: new WorkerState(join(dir, "state")),
      backoff: { initialMs: 10, maxMs: 40 },
    });
    try {
      // More redirects to the dead address than a worker follows in a row, then one to the live leader.
      for (let i = 0; i < 9; i++) {
        const conn = await b.connection(i, 5000);
        await conn.waitFor("hello");
        conn.send({ type: "redirect", url: i < 8 ? dead : c.url });
      }
      const there = await c.connection(0, 5000);
      assert.equal((await there.waitFor("hello")).message.id, "w");
    } finally {
      worker.stop();
      await worker.done.catch(() => undefined);
      store.close();
      await b.close();
      await c.close();
    }
  });

  test("the leader's lock connection killed (the process lives on): it steps down at once, the follower takes over, every build finishes once", async () => {
    const dir = join(engines.dir(), "lock-lost");
    const { fdb, jobsetId } = await seededDatabase();
    const N = 600;
    const { steps, jobs } = dag(N, 13);
    const { urls, startBoth } = await coordinatorPair(dir, engines.pg().url);
    const [A, B] = urls;
    const procs = await startBoth();
    const watch = watchLeaders(urls);
    const workers = [[A, B], [B, A], [B]].map((url, i) => startScriptedWorker({ url, token: "wrk", id: `k${i + 1}`, maxJobs: 3, duration: () => 15 }));
    try {
      await Promise.all(workers.map((w) => w.welcomed()));
      await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs, steps });
      await until("a third of the run", async () => ((await statusCounts(fdb.db, "builds")).succeeded ?? 0) >= N / 3, 30_000);
      const killed = await sql<{ ok: boolean }>`
        select pg_terminate_backend(pid) as ok from pg_stat_activity where application_name = ${LEADER_APP_PREFIX} || (select owner from farm_leader)`.execute(fdb.db);
      assert.deepEqual(killed.rows, [{ ok: true }], "the leader's lock session was found and ended");
      await until("B to lead", async () => (await leads(B)) === true, 10_000);
      await until("A to step down", async () => (await leads(A)) === false, 10_000);
      await until("every build", async () => (await statusCounts(fdb.db, "builds")).succeeded === N, 30_000);
      const { both, samples } = await watch.stop();
      // The server ends A's session and hands the lock to B at once; A learns it when its
      // connection reports the end, a few milliseconds later. A sample (every 50 ms) may fall in
      // that gap, no more: what A and B actually did is checked below (every build exactly once).
      assert.ok(both <= 1, `two leaders at once for at most one sample (${both} of ${samples} samples)`);
      assert.ok(workers.every((w) => w.welcomedAt() === B), "every worker moved to B");
      assert.deepEqual(await leaderRow(fdb.db), [B]);
      assert.match(procs[0]!.stderr(), /no longer the leader: the leader's database connection/);
      await checkExactlyOnce(fdb.db, N, workers, { system: "x86_64-linux" });
    } finally {
      await watch.stop();
      for (const w of workers) await w.stop();
      for (const p of procs) await p.stop();
      await fdb.close();
    }
  });

  // A leader reloads its schedule from the database when its writes and the database disagree
  // (a late write of a coordinator that no longer leads, say). It used to welcome the connected
  // workers again with the step lists of their first hello, so the steps sent to them since were
  // taken for lost: aborted on the worker and sent again.
  test("a leader that reloads its schedule keeps the builds its connected workers run", async () => {
    const dir = join(engines.dir(), "reload");
    const { fdb, jobsetId } = await seededDatabase();
    const steps = ["a", "b"].map((n) => ({ drvPath: drv(n), name: n, system: "x86_64-linux", dependsOn: [] }));
    await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs: steps.map((x) => ({ job: x.name, drvPath: x.drvPath, system: x.system, outputs: {} })), steps });
    const { args } = await coordinatorPair(dir, engines.pg().url);
    const a = await spawnFarmServe(args(0));
    const w = startScriptedWorker({ url: a.url, token: "wrk", id: "w", maxJobs: 2, duration: (d) => (d === drv("a") ? 500 : 2500) });
    try {
      await until("both steps to be sent", () => w.requests.length === 2, 10_000);
      // Step a's lease changes hands behind the leader's back: w's result for it is refused, and the leader reloads.
      await sql`update steps set lease_owner = 'another-coordinator-wrote-this' where drv_path = ${drv("a")}`.execute(fdb.db);
      await until("the refusal", () => [...w.acks.values()].includes(false), 10_000);
      await sql`update steps set status = 'queued', lease_owner = null, lease_expires_at = null where drv_path = ${drv("a")}`.execute(fdb.db);
      await until("both builds", async () => (await statusCounts(fdb.db, "builds")).succeeded === 2, 15_000);
      const sentB = w.requests.filter((r) => r.drvPath === drv("b")).length;
      assert.equal(sentB, 1, `b, running on w all along, was sent ${sentB} times (${a.stderr().match(/came back without.*/)?.[0] ?? ""})`);
    } finally {
      await w.stop();
      await a.stop();
      await fdb.close();
    }
  });

  test("the leader killed with SIGKILL mid-run: the follower takes over, the workers find it, every build finishes exactly once; restarted, the killed one follows", async () => {
    const dir = join(engines.dir(), "failover");
    const { fdb, jobsetId } = await seededDatabase();
    const N = 1000;
    const fake = dag(N, 11);
    const steps = fake.steps.map((x) => ({ ...x, system: FAKE_SYSTEM }));
    const jobs = fake.jobs.map((x) => ({ ...x, system: FAKE_SYSTEM }));
    // The farm's cache, shared by both coordinators.
    const key = generateSecretKey("farm-cache-1");
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(join(dir, "sk"), printSecretKey(key));
    const cache = await spawnCacheServer(["--dir", join(dir, "cache"), "--upload-token", "up", "--secret-key", join(dir, "sk"), "--store-dir", "/ferry/store"]);
    const { urls, args, startBoth } = await coordinatorPair(dir, engines.pg().url, ["--cache", cache.url, "--cache-token", "up", "--cache-public-key", printPublicKey(key)]);
    const [A, B] = urls;
    const pair = await startBoth();
    const b = pair[1];
    let a = pair[0];
    const watch = watchLeaders(urls);
    const scripted = (id: string, url: ScriptedWorkerOptions["url"], ms = 15) => startScriptedWorker({ url, token: "wrk", id, systems: [FAKE_SYSTEM], maxJobs: 3, duration: () => ms });
    const workers = [
      scripted("s1", [A, B]),
      scripted("s2", [A, B]),
      scripted("s3", [B, A]),
      // Only the follower's URL: back there after the leader is gone, and redirected to the new one.
      scripted("s4", [B]),
      // Only the leader's URL, and slow: away while A is down, so its leases expire under B.
      scripted("s5", [A], 300),
    ];
    // A real worker (building in the sandbox: --no-sandbox needs the store at its real place) given both coordinators, the leader first.
    const real = spawnFerryWorker(`${A},${B}`, "wrk", ["--id", "real", "--max-jobs", "1", "--systems", "x86_64-linux", ...storeFlags(join(dir, "real"))]);
    try {
      const repo = gitRepo(join(dir, "repo"), { "packages.ts": SET });
      ferryOk(["farm", "jobset", "add", "--farm", B, "--token", "adm", "demo", "main", "--repo", repo, "--file", "packages.ts"]);
      const ev = JSON.parse(ferryOk(["farm", "eval", "--farm", B, "--token", "adm", "demo", "main", "--wait"])) as { status: string };
      assert.equal(ev.status, "evaluated", "the follower evaluates (and publishes to the shared cache)");
      await Promise.all(workers.map((w) => w.welcomed()));
      assert.ok(workers.every((w) => w.welcomedAt() === A), "every worker is at the leader");
      const realStep = async (name: string) => (await sql<{ status: string; attempts: number; machine: string | null }>`select status, attempts, machine from steps where name = ${name}`.execute(fdb.db)).rows[0];
      await until("the real worker to build 'slow'", async () => (await realStep("slow"))?.status === "running", 30_000);
      await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs, steps });
      await until("a third of the run", async () => ((await statusCounts(fdb.db, "builds")).succeeded ?? 0) >= N / 3, 30_000);
      assert.equal((await realStep("slow"))?.status, "running", "'slow' is still being built");
      await a.kill9();
      const killedAt = Date.now();
      const atKill = (await statusCounts(fdb.db, "builds")).succeeded ?? 0;
      assert.ok(atKill < N, "killed in the middle of the run");
      await until("B to lead", async () => (await leads(B)) === true, 10_000);
      const takeoverMs = Date.now() - killedAt;
      await until("B to name itself in farm_leader", async () => (await leaderRow(fdb.db))[0] === B, 5000);
      await until("the workers that can reach B to be welcomed there", () => workers.slice(0, 4).every((w) => w.connected() && w.welcomedAt() === B), 15_000);
      // s5's steps: their leases expire one lease period after B took over, and they are built elsewhere.
      await until("s5's leases to expire", async () => Number((await sql<{ n: string }>`select count(*) as n from steps where attempts > 0`.execute(fdb.db)).rows[0]!.n) > 0, 15_000);

      // The killed coordinator comes back (same address): a follower, which redirects s5 to B.
      a = await spawnFarmServe(args(0));
      await until("A to serve", async () => (await leads(A)) !== undefined, 10_000);
      assert.equal(await leads(A), false, "the restarted coordinator follows");
      await workers[4]!.welcomed(1);
      assert.equal(workers[4]!.welcomedAt(), B, "s5, which knows only A, was redirected to B");

      await until("every build", async () => (await statusCounts(fdb.db, "builds")).succeeded === N + 3, 60_000);
      const { both, samples } = await watch.stop();
      assert.equal(both, 0, `never two leaders at once (${samples} samples)`);
      assert.deepEqual([await leads(A), await leads(B)], [false, true]);
      assert.deepEqual(await leaderRow(fdb.db), [B]);

      // The real worker kept building 'slow' through the failover and delivered it to B.
      assert.deepEqual(await realStep("slow"), { status: "succeeded", attempts: 0, machine: "real" });
      assert.equal(real.stderr().match(/building slow/g)?.length, 1, real.stderr());
      assert.match(real.stderr(), new RegExp(`connected to ws://127\\.0\\.0\\.1:${new URL(A).port}/api/worker as real`));
      assert.match(real.stderr(), new RegExp(`reconnected to ws://127\\.0\\.0\\.1:${new URL(B).port}/api/worker as real \\(1 running step kept`), real.stderr());

      // 'first' ran under A, whose logs died with it: B serves the log the worker uploaded to the farm cache.
      const firstId = (await sql<{ id: string }>`select id::text as id from steps where name = 'first'`.execute(fdb.db)).rows[0]!.id;
      const firstLog = await fetch(`${B}/api/steps/${firstId}/log`);
      assert.equal(firstLog.status, 200, await firstLog.clone().text());
      assert.equal(firstLog.headers.get("x-ferry-log-source"), "farm-cache");
      await firstLog.arrayBuffer();

      await checkExactlyOnce(fdb.db, N + 3, workers, { system: FAKE_SYSTEM, mayLose: 4 });
      // Nothing changes after the run: no step is sent again, no build finishes again.
      const sent = workers.reduce((n, w) => n + w.requests.length, 0);
      await new Promise((r) => setTimeout(r, 2500));
      assert.equal(workers.reduce((n, w) => n + w.requests.length, 0), sent);
      await checkExactlyOnce(fdb.db, N + 3, workers, { system: FAKE_SYSTEM, mayLose: 4 });
      process.stderr.write(`# failover: takeover ${takeoverMs} ms after the kill; ${atKill}/${N} builds done at the kill\n`);
    } catch (e) {
      process.stderr.write(`--- real worker:\n${real.stderr()}\n--- A:\n${a.stderr()}\n--- B:\n${b.stderr()}\n`);
      throw e;
    } finally {
      await watch.stop();
      for (const w of workers) await w.stop();
      await real.kill9();
      await a.kill9();
      await b.kill9();
      cache.child.kill("SIGTERM");
      await fdb.close();
    }
  });
});

/**
 * Every build succeeded with one build:finished event; no step of the scripted workers (steps
 * for `system`) was sent after it succeeded, or more often than its lost leases allow; only
 * the worker `mayLose` (an index into `workers`) lost leases.
 */
async function checkExactlyOnce(db: FarmDatabase["db"], n: number, workers: readonly ScriptedWorker[], opts: { system: string; mayLose?: number }): Promise<void> {
  assert.deepEqual(await statusCounts(db, "builds"), { succeeded: n });
  assert.deepEqual(await statusCounts(db, "steps"), { succeeded: n });
  const ev = await sql<{ n: string; d: string }>`select count(*) as n, count(distinct payload->>'buildId') as d from farm_events where kind = 'build:finished'`.execute(db);
  assert.deepEqual([Number(ev.rows[0]!.n), Number(ev.rows[0]!.d)], [n, n], "one build:finished event per build");
  const rows = (await sql<{ id: string; attempts: number; finished_at: Date }>`select id::text as id, attempts, finished_at from steps where system = ${opts.system}`.execute(db)).rows;
  const sent = new Map<string, { worker: number; at: number }[]>();
  for (const [i, w] of workers.entries()) for (const r of w.requests) sent.set(r.stepId, [...(sent.get(r.stepId) ?? []), { worker: i, at: r.receivedAt }]);
  for (const s of rows) {
    const got = sent.get(s.id) ?? [];
    assert.ok(got.length >= 1, `step ${s.id} was built`);
    assert.ok(got.every((g) => g.at <= s.finished_at.getTime()), `step ${s.id} was not sent again after it succeeded`);
    assert.ok(s.attempts <= (opts.mayLose === undefined ? 0 : 1), `step ${s.id}: ${s.attempts} attempts`);
    assert.ok(got.length <= s.attempts + 1, `step ${s.id} was sent ${got.length} times with ${s.attempts} lost attempt(s): ${JSON.stringify(got)}`);
    if (s.attempts > 0) assert.ok(got.some((g) => g.worker === opts.mayLose), `step ${s.id} lost a lease, but not on worker #${opts.mayLose}`);
  }
  // At most one accepted result per step.
  const accepted = new Map<string, number>();
  for (const w of workers) for (const [id, ok] of w.acks) if (ok) accepted.set(id, (accepted.get(id) ?? 0) + 1);
  assert.ok([...accepted.values()].every((k) => k === 1));
}

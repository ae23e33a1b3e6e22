/**
 * Several coordinators on one PostgreSQL database, as separate processes: exactly one leads
 * (holds the advisory lock, is named in `farm_leader`, says so in /metrics); the others answer
 * the API and redirect workers to it. When the leader is killed with SIGKILL in the middle of a
 * run, a follower takes the lock and rebuilds the schedule from the database, the workers find
 * it (through the other URLs they were given, or back through the coordinator that redirected
 * them), and every build finishes exactly once. The killed coordinator, restarted, is a follower.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { sql } from "kysely";
import { useFarmEngines } from "../helpers/farm-db.js";
import { freePort } from "../helpers/postgres.js";
import { spawnFarmServe, type FarmProcess } from "../helpers/farm-processes.js";
import { dag, seedJobset, statusCounts, until } from "../helpers/farm-dag.js";
import { startScriptedWorker, type ScriptedWorker, type ScriptedWorkerOptions } from "../helpers/scripted-worker.js";
import { migrateFarmDatabase, type FarmDatabase } from "../../src/farm/db/index.js";
import { ingestEvaluation } from "../../src/farm/db/ingest.js";

const storeFlags = (root: string) => ["--store-dir", "/ferry/store", "--state-dir", "/ferry/var", "--root", root];

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
async function coordinatorPair(dir: string, database: string) {
  const ports = [await freePort(), await freePort()];
  const urls = ports.map((p) => `http://127.0.0.1:${p}`) as [string, string];
  const args = (i: 0 | 1) => {
    const name = "ab"[i]!;
    return ["--listen", `127.0.0.1:${ports[i]}`, "--public-url", urls[i], "--database", database, "--data-dir", join(dir, name), "--admin-token", "adm", "--worker-token", "wrk", "--lease-seconds", "2", "--check-every", "0", ...storeFlags(join(dir, `${name}-store`))];
  };
  return { urls, args };
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

  test("exactly one of two coordinators leads; a worker that dials the follower is redirected to the leader and gets work; both APIs answer", async () => {
    const dir = join(engines.dir(), "pair");
    const fdb = await engines.open("postgres", { poolSize: 2 });
    await migrateFarmDatabase(fdb);
    const jobsetId = await seedJobset(fdb.db);
    const { steps, jobs } = dag(40, 5);
    await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs, steps });
    const { urls, args } = await coordinatorPair(dir, engines.pg().url);
    const [A, B] = urls;
    const procs: FarmProcess[] = [];
    let w: ScriptedWorker | undefined;
    try {
      procs.push(await spawnFarmServe(args(0)));
      await until("A to lead", async () => (await leads(A)) === true, 10_000);
      procs.push(await spawnFarmServe(args(1)));
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
      assert.deepEqual(await workersOf(B), [], "the follower keeps none");
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

  test("the leader killed with SIGKILL mid-run: the follower takes over, the workers find it, every build finishes exactly once; restarted, the killed one follows", async () => {
    const dir = join(engines.dir(), "failover");
    const fdb = await engines.open("postgres", { poolSize: 2 });
    await migrateFarmDatabase(fdb);
    const jobsetId = await seedJobset(fdb.db);
    const N = 1000;
    const { steps, jobs } = dag(N, 11);
    const { urls, args } = await coordinatorPair(dir, engines.pg().url);
    const [A, B] = urls;
    let a = await spawnFarmServe(args(0));
    await until("A to lead", async () => (await leads(A)) === true, 10_000);
    const b = await spawnFarmServe(args(1));
    const watch = watchLeaders(urls);
    const scripted = (id: string, url: ScriptedWorkerOptions["url"], ms = 15) => startScriptedWorker({ url, token: "wrk", id, maxJobs: 3, duration: () => ms });
    const workers = [
      scripted("s1", [A, B]),
      scripted("s2", [A, B]),
      scripted("s3", [B, A]),
      // Only the follower's URL: back there after the leader is gone, and redirected to the new one.
      scripted("s4", [B]),
      // Only the leader's URL, and slow: away while A is down, so its leases expire under B.
      scripted("s5", [A], 300),
    ];
    try {
      await Promise.all(workers.map((w) => w.welcomed()));
      assert.ok(workers.every((w) => w.welcomedAt() === A), "every worker is at the leader");
      await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs, steps });
      await until("a third of the run", async () => ((await statusCounts(fdb.db, "builds")).succeeded ?? 0) >= N / 3, 30_000);
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
      const s5Welcomes = 1;
      a = await spawnFarmServe(args(0));
      await until("A to serve", async () => (await leads(A)) !== undefined, 10_000);
      assert.equal(await leads(A), false, "the restarted coordinator follows");
      await workers[4]!.welcomed(s5Welcomes);
      assert.equal(workers[4]!.welcomedAt(), B, "s5, which knows only A, was redirected to B");

      await until("every build", async () => (await statusCounts(fdb.db, "builds")).succeeded === N, 60_000);
      const { both, samples } = await watch.stop();
      assert.equal(both, 0, `never two leaders at once (${samples} samples)`);
      assert.deepEqual([await leads(A), await leads(B)], [false, true]);
      assert.deepEqual(await leaderRow(fdb.db), [B]);

      await checkExactlyOnce(fdb.db, N, workers);
      // Nothing changes after the run: no step is sent again, no build finishes again.
      const sent = workers.reduce((n, w) => n + w.requests.length, 0);
      await new Promise((r) => setTimeout(r, 2500));
      assert.equal(workers.reduce((n, w) => n + w.requests.length, 0), sent);
      await checkExactlyOnce(fdb.db, N, workers);
      process.stderr.write(`# failover: takeover ${takeoverMs} ms after the kill; ${atKill}/${N} builds done at the kill\n`);
    } finally {
      await watch.stop();
      for (const w of workers) await w.stop();
      await a.kill9();
      await b.kill9();
      await fdb.close();
    }
  });
});

/** Every build succeeded with one build:finished event; no step was sent after it succeeded; attempts only for lost leases. */
async function checkExactlyOnce(db: FarmDatabase["db"], n: number, workers: readonly ScriptedWorker[]): Promise<void> {
  assert.deepEqual(await statusCounts(db, "builds"), { succeeded: n });
  assert.deepEqual(await statusCounts(db, "steps"), { succeeded: n });
  const ev = await sql<{ n: string; d: string }>`select count(*) as n, count(distinct payload->>'buildId') as d from farm_events where kind = 'build:finished'`.execute(db);
  assert.deepEqual([Number(ev.rows[0]!.n), Number(ev.rows[0]!.d)], [n, n], "one build:finished event per build");
  const rows = (await sql<{ id: string; attempts: number; finished_at: Date; machine: string }>`select id::text as id, attempts, finished_at, machine from steps`.execute(db)).rows;
  const sent = new Map<string, { worker: string; at: number }[]>();
  for (const [i, w] of workers.entries()) for (const r of w.requests) sent.set(r.stepId, [...(sent.get(r.stepId) ?? []), { worker: `s${i + 1}`, at: r.receivedAt }]);
  for (const s of rows) {
    const got = sent.get(s.id) ?? [];
    assert.ok(got.length >= 1, `step ${s.id} was built`);
    assert.ok(got.every((g) => g.at <= s.finished_at.getTime()), `step ${s.id} was not sent again after it succeeded`);
    assert.ok(s.attempts <= 1, `step ${s.id}: ${s.attempts} attempts`);
    assert.ok(got.length <= s.attempts + 1, `step ${s.id} was sent ${got.length} times with ${s.attempts} lost attempt(s): ${JSON.stringify(got)}`);
    if (s.attempts > 0) assert.ok(got.some((g) => g.worker === "s5"), `step ${s.id} lost a lease, but not s5's`);
  }
  // At most one accepted result per step.
  const accepted = new Map<string, number>();
  for (const w of workers) for (const [id, ok] of w.acks) if (ok) accepted.set(id, (accepted.get(id) ?? 0) + 1);
  assert.ok([...accepted.values()].every((k) => k === 1));
}

/**
 * The dispatcher against real databases (PGlite and PostgreSQL) and workers on real
 * WebSockets: steps run in dependency order and each exactly once; failures block their
 * dependents and a restart clears them; a worker that reconnects keeps its builds; a vanished
 * worker's step moves to another worker when its lease expires and its late result is refused.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as http from "node:http";
import { join } from "node:path";
import type { AddressInfo } from "node:net";
import WebSocket from "ws";
import { sql } from "kysely";
import { migrateFarmDatabase, type FarmDatabase } from "../../src/farm/db/index.js";
import { ingestEvaluation, type EvalStep } from "../../src/farm/db/ingest.js";
import { startDispatcher, type Dispatcher, type DispatcherOptions } from "../../src/farm/dispatch/dispatcher.js";
import { useFarmEngines } from "../helpers/farm-db.js";
import { dag, drv, seedJobset, statusCounts, until } from "../helpers/farm-dag.js";
import { startScriptedWorker, type ScriptedWorker } from "../helpers/scripted-worker.js";

interface Farm {
  readonly url: string;
  readonly db: FarmDatabase["db"];
  readonly dispatcher: Dispatcher;
  close(): Promise<void>;
}

async function startFarm(fdb: FarmDatabase, logDir: string, extra: Partial<DispatcherOptions> = {}): Promise<Farm> {
  const server = http.createServer((_req, res) => res.writeHead(404).end());
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const dispatcher = startDispatcher({
    db: fdb,
    publicUrl: url,
    cache: { url: `${url}/cache` },
    logDir,
    authenticate: (req) => (req.headers.authorization === "Bearer wtok" ? "worker" : req.headers.authorization ? "wrong" : "none"),
    leaseMs: 1500,
    heartbeatMs: 200,
    pollMs: 100,
    log: () => undefined,
    ...extra,
  });
  server.on("upgrade", (req, socket, head) => dispatcher.handleUpgrade(req, socket, head));
  return {
    url,
    db: fdb.db,
    dispatcher,
    close: async () => {
      await dispatcher.close();
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

describe("farm dispatcher", () => {
  const engines = useFarmEngines("ferry-farm-dispatch-");

  for (const engine of ["pglite", "postgres"] as const) {
    test(`a DAG runs in dependency order on two workers, each step once; builds and events follow (${engine})`, async () => {
      const fdb = await engines.open(engine, { name: "order" });
      await migrateFarmDatabase(fdb);
      const jobsetId = await seedJobset(fdb.db);
      const { steps, jobs } = dag(300);
      await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h1", jobs, steps });
      const farm = await startFarm(fdb, join(engines.dir(), `logs-${engine}`));
      const done = new Set<string>();
      const order: string[] = [];
      const workers: ScriptedWorker[] = [];
      try {
        for (const id of ["w1", "w2"]) workers.push(startScriptedWorker({ url: farm.url, token: "wtok", id, maxJobs: 3, duration: () => 2 }));
        await until("every build to finish", async () => (await statusCounts(fdb.db, "builds")).succeeded === 300);
        for (const w of workers) for (const r of w.requests) order.push(r.drvPath);
        assert.equal(order.length, 300, "each step was sent to a worker exactly once");
        assert.equal(new Set(order).size, 300);
        const deps = new Map(steps.map((s) => [s.drvPath, s.dependsOn]));
        // A step is dispatched only after its dependencies finished: check against the acks' order.
        const finishedAt = new Map((await sql<{ drv_path: string; finished_at: Date; started_at: Date }>`select drv_path, finished_at, started_at from steps`.execute(fdb.db)).rows.map((r) => [r.drv_path, r]));
        for (const [d, ds] of deps) for (const x of ds) assert.ok(finishedAt.get(x)!.finished_at <= finishedAt.get(d)!.started_at, `${d} started before ${x} finished`);
        for (const d of order) done.add(d);
        assert.ok(workers.every((w) => w.requests.length > 0), "both workers got work");
        const ev = await sql<{ kind: string; n: string }>`select kind, count(*) as n from farm_events where kind in ('build:finished', 'step:finished') group by kind order by kind`.execute(fdb.db);
        assert.deepEqual(ev.rows.map((r) => [r.kind, Number(r.n)]), [["build:finished", 300], ["step:finished", 300]]);
        const metrics = farm.dispatcher.metrics();
        assert.match(metrics, /ferry_farm_steps_dispatched_total 300/);
        // Every step's wait in the queue was measured, and the scheduler let go of the succeeded steps.
        assert.match(metrics, /^ferry_farm_queue_wait_seconds_count\{system="x86_64-linux"\} 300$/m);
        assert.match(metrics, /^ferry_farm_queue_wait_seconds_bucket\{system="x86_64-linux",le="\+Inf"\} 300$/m);
        assert.doesNotMatch(metrics, /^ferry_farm_scheduler_steps\{state="[a-zA-Z]+"\} [1-9]/m);
        assert.equal(farm.dispatcher.workers().length, 2);
      } finally {
        for (const w of workers) await w.stop();
        await farm.close();
        await fdb.close();
      }
    });
  }

  test("a failure blocks its dependents; a restart command clears it and they build", async () => {
    const fdb = await engines.open("postgres");
    await migrateFarmDatabase(fdb);
    const jobsetId = await seedJobset(fdb.db);
    const steps: EvalStep[] = [
      { drvPath: drv("a"), name: "a", system: "x86_64-linux", dependsOn: [] },
      { drvPath: drv("b"), name: "b", system: "x86_64-linux", dependsOn: [drv("a")] },
      { drvPath: drv("c"), name: "c", system: "x86_64-linux", dependsOn: [drv("b")] },
      { drvPath: drv("d"), name: "d", system: "x86_64-linux", dependsOn: [] },
    ];
    const jobs = steps.map((s) => ({ job: s.name, drvPath: s.drvPath, system: s.system, outputs: {} }));
    await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs, steps });
    let failA = true;
    const farm = await startFarm(fdb, join(engines.dir(), "logs-fail"));
    const w = startScriptedWorker({ url: farm.url, token: "wtok", id: "w1", maxJobs: 2, outcome: (d) => (d === drv("a") && failA ? "failed" : "succeeded") });
    try {
      await until("a to fail and d to build", async () => {
        const c = await statusCounts(fdb.db, "builds");
        return c.failed === 1 && c.succeeded === 1 && c["dependency-failed"] === 2;
      });
      const failed = await sql<{ drv_path: string }>`select drv_path from failed_paths`.execute(fdb.db);
      assert.deepEqual(failed.rows.map((r) => r.drv_path), [drv("a")], "the failure is cached");
      const cStep = await sql<{ id: string; error: string }>`select id, error from steps where drv_path = ${drv("c")}`.execute(fdb.db);
      assert.match(cStep.rows[0]!.error, /did not build/);
      failA = false;
      // Restart the top of the chain: the scheduler restarts the failed root it needs.
      const cmd = await sql<{ id: string }>`insert into farm_commands (kind, payload) values ('restart', ${JSON.stringify({ steps: [cStep.rows[0]!.id, "999999"] })}::jsonb) returning id`.execute(fdb.db);
      farm.dispatcher.poke();
      await until("the chain to build", async () => (await statusCounts(fdb.db, "builds")).succeeded === 4);
      const res = await sql<{ result: { items: { id: string; ok: boolean; error?: { code: string } }[] } }>`select result from farm_commands where id = ${cmd.rows[0]!.id}`.execute(fdb.db);
      const items = res.rows[0]!.result.items;
      assert.equal(items[0]!.ok, true);
      assert.equal(items[1]!.error?.code, "FERRY_FARM_UNKNOWN_STEP");
      assert.equal((await sql`select 1 from failed_paths`.execute(fdb.db)).rows.length, 0, "the cleared failure is forgotten");
    } finally {
      await w.stop();
      await farm.close();
      await fdb.close();
    }
  });

  test("a worker that reconnects keeps its build; one that vanishes loses it to another after the lease, and its late result is refused", async () => {
    const fdb = await engines.open("postgres");
    await migrateFarmDatabase(fdb);
    const jobsetId = await seedJobset(fdb.db);
    const steps: EvalStep[] = [
      { drvPath: drv("slow1"), name: "slow1", system: "x86_64-linux", dependsOn: [] },
      { drvPath: drv("slow2"), name: "slow2", system: "x86_64-linux", dependsOn: [] },
    ];
    await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs: steps.map((s) => ({ job: s.name, drvPath: s.drvPath, system: s.system, outputs: {} })), steps });
    const farm = await startFarm(fdb, join(engines.dir(), "logs-lease"));
    // Closed in any case, so that a failure here does not leave a farm running into the next test.
    let farmRunning = true;
    const closeFarm = async () => {
      if (!farmRunning) return;
      farmRunning = false;
      await farm.close();
    };
    const w1 = startScriptedWorker({ url: farm.url, token: "wtok", id: "w1", duration: () => 1200 });
    try {
      await until("w1 to start slow1", () => w1.requests.length === 1);
      // A short drop: w1 comes back well within the lease and keeps building.
      w1.drop(100);
      await w1.welcomed(1);
      await until("w1 to finish both", async () => (await statusCounts(fdb.db, "builds")).succeeded === 2);
      assert.equal(w1.requests.length, 2, "the running step was not sent again");
      // A result is recorded before it is acknowledged: the second ack may still be on its way.
      await until("w1's results to be acknowledged", () => w1.acks.size === 2);
      assert.deepEqual([...w1.acks.values()], [true, true]);

      // The restarted step is new to a fresh scheduler: close this farm, then restart the step
      // and start another one. (Restarted while this farm still ran, the step could go to w1
      // again just before it stopped, and come to the new farm as an expired lease: a second
      // attempt.)
      await w1.stop();
      await closeFarm();
      await sql`update steps set status = 'queued', scheduled = false, finished_at = null where drv_path = ${drv("slow1")}`.execute(fdb.db);
      await sql`update builds set status = 'queued' where drv_path = ${drv("slow1")}`.execute(fdb.db);
      const farm2 = await startFarm(fdb, join(engines.dir(), "logs-lease"));
      const w2 = startScriptedWorker({ url: farm2.url, token: "wtok", id: "w2", duration: () => 4000 });
      try {
        await until("w2 to start slow1", () => w2.requests.length === 1);
        w2.drop(6000); // gone for longer than the lease; its build still ends while it is away
        const w3 = startScriptedWorker({ url: farm2.url, token: "wtok", id: "w3", duration: () => 10 });
        try {
          await until("the step to move to w3 after the lease expired", async () => (await statusCounts(fdb.db, "builds")).succeeded === 2, 20_000);
          assert.equal(w3.requests.length, 1);
          const s = await sql<{ attempts: number; machine: string }>`select attempts, machine from steps where drv_path = ${drv("slow1")}`.execute(fdb.db);
          assert.equal(s.rows[0]!.machine, "w3");
          assert.equal(s.rows[0]!.attempts, 1, "the expired lease counts as an attempt");
          // w2 comes back with its result: it is told the step is no longer its own.
          await w2.welcomed(1);
          await new Promise((r) => setTimeout(r, 200));
          assert.equal(w2.acks.size, 0, "no result of w2 was taken");
          const after = await sql<{ machine: string; n: string }>`select machine, (select count(*) from farm_events where kind = 'build:finished') as n from steps where drv_path = ${drv("slow1")}`.execute(fdb.db);
          assert.equal(after.rows[0]!.machine, "w3");
        } finally {
          await w3.stop();
        }
      } finally {
        w2.kill();
        await farm2.close();
      }
    } finally {
      await w1.stop();
      await closeFarm();
      await fdb.close();
    }
  });

  test("PostgreSQL restarted under load: the coordinator reconnects and carries on, every build finishing once", async () => {
    const fdb = await engines.open("postgres");
    await migrateFarmDatabase(fdb);
    const jobsetId = await seedJobset(fdb.db);
    const { steps, jobs } = dag(600, 7);
    await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs, steps });
    const farm = await startFarm(fdb, join(engines.dir(), "logs-pg-restart"), { leaseMs: 4000 });
    const workers = ["w1", "w2"].map((id) => startScriptedWorker({ url: farm.url, token: "wtok", id, maxJobs: 4, duration: () => 15 }));
    try {
      await until("a third of the builds", async () => ((await statusCounts(fdb.db, "builds")).succeeded ?? 0) >= 200);
      await engines.pg().stop("immediate");
      await new Promise((r) => setTimeout(r, 1500));
      await engines.pg().start();
      await until("every build", async () => {
        try {
          return (await statusCounts(fdb.db, "builds")).succeeded === 600;
        } catch {
          return false; // the pool's connections died with the server
        }
      }, 60_000);
      const ev = await sql<{ n: string; d: string }>`select count(*) as n, count(distinct payload->>'buildId') as d from farm_events where kind = 'build:finished'`.execute(fdb.db);
      assert.equal(Number(ev.rows[0]!.n), 600, "one build:finished event per build");
      assert.equal(Number(ev.rows[0]!.d), 600);
      assert.ok(farm.dispatcher.isLeader(), "leader again after the restart");
    } finally {
      for (const w of workers) await w.stop();
      await farm.close();
      await fdb.close();
    }
  });

  test("a step sent but never named by the worker's heartbeats is queued again, not leased for ever", async () => {
    const fdb = await engines.open("pglite", { name: "lost-send" });
    await migrateFarmDatabase(fdb);
    const jobsetId = await seedJobset(fdb.db);
    const steps: EvalStep[] = ["a", "b", "c"].map((n) => ({ drvPath: drv(n), name: n, system: "x86_64-linux", dependsOn: [] }));
    await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs: steps.map((x) => ({ job: x.name, drvPath: x.drvPath, system: x.system, outputs: {} })), steps });
    const farm = await startFarm(fdb, join(engines.dir(), "logs-lost-send"));
    // The first request for b is lost on the way; the worker stays connected and keeps beating.
    let lost = 0;
    const w = startScriptedWorker({ url: farm.url, token: "wtok", id: "w", maxJobs: 3, duration: () => 5, heartbeatMs: 100, lose: (d) => d === drv("b") && lost++ === 0 });
    try {
      await until("every build", async () => (await statusCounts(fdb.db, "builds")).succeeded === 3, 10_000);
      const sent = w.requests.map((r) => r.drvPath);
      assert.deepEqual(sent.filter((d) => d === drv("b")).length, 2, "b was sent again after two heartbeats without it");
      assert.equal(sent.length, 4, "nothing else was sent twice");
      // Its lease was renewed all along (the worker is connected): only the heartbeats could tell.
      const b = (await sql<{ attempts: number }>`select attempts from steps where drv_path = ${drv("b")}`.execute(fdb.db)).rows[0]!;
      assert.equal(b.attempts, 0, "a lost message is not a failed attempt");
    } finally {
      await w.stop();
      await farm.close();
      await fdb.close();
    }
  });

  test("a log sent in one burst is written in the order it was sent", async () => {
    const fdb = await engines.open("pglite", { name: "log-order" });
    await migrateFarmDatabase(fdb);
    const jobsetId = await seedJobset(fdb.db);
    const steps: EvalStep[] = [{ drvPath: drv("chatty"), name: "chatty", system: "x86_64-linux", dependsOn: [] }];
    await ingestEvaluation(fdb.db, { jobsetId, inputsHash: "h", jobs: [{ job: "chatty", drvPath: drv("chatty"), system: "x86_64-linux", outputs: {} }], steps });
    const logDir = join(engines.dir(), "logs-order");
    const farm = await startFarm(fdb, logDir);
    const lines = Array.from({ length: 2000 }, (_, i) => `line ${i} ${"x".repeat(i % 200)}\n`);
    const w = startScriptedWorker({ url: farm.url, token: "wtok", id: "w", duration: () => 0, log: () => lines });
    try {
      await until("the build", async () => (await statusCounts(fdb.db, "builds")).succeeded === 1, 10_000);
      await until("the whole log", () => fs.readFileSync(farm.dispatcher.logPath(drv("chatty")), "utf8").length === lines.join("").length, 5000);
      assert.equal(fs.readFileSync(farm.dispatcher.logPath(drv("chatty")), "utf8"), lines.join(""));
    } finally {
      await w.stop();
      await farm.close();
      await fdb.close();
    }
  });

  test("workers with a wrong token are refused before the upgrade", async () => {
    const fdb = await engines.open("pglite", { name: "auth" });
    await migrateFarmDatabase(fdb);
    const farm = await startFarm(fdb, join(engines.dir(), "logs-auth"));
    try {
      const w = startScriptedWorker({ url: farm.url, token: "nope", id: "w9", reconnect: false });
      await until("the refusal", () => w.closes.length > 0, 5000);
      assert.equal(w.connected(), false);
      assert.equal(farm.dispatcher.workers().length, 0);
      // A worker that reports a step it does not hold is told so; a malformed message closes it.
      const raw = new WebSocket(`${farm.url.replace("http", "ws")}/api/worker`, { headers: { authorization: "Bearer wtok" } });
      const got: unknown[] = [];
      raw.on("message", (d) => got.push(JSON.parse(d.toString())));
      await new Promise((r) => raw.once("open", r));
      raw.send(JSON.stringify({ type: "hello", protocol: 1, id: "raw", systems: ["x86_64-linux"], features: [], mandatoryFeatures: [], maxJobs: 1, speedFactor: 1, running: [] }));
      await until("the welcome", () => got.length === 1);
      raw.send(JSON.stringify({ type: "result", stepId: "424242", status: "succeeded", durationMs: 1 }));
      await until("the ack", () => got.length === 2);
      assert.deepEqual(got[1], { type: "ack", stepId: "424242", accepted: false });
      const closed = new Promise<number>((r) => raw.once("close", (code) => r(code)));
      raw.send("{not json");
      assert.equal(await closed, 4002);
    } finally {
      await farm.close();
      await fdb.close();
    }
  });
});

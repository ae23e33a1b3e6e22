#!/usr/bin/env node
/**
 * bench/farm-100k: issue 5's stress test. A synthetic DAG of N (default 100,000) trivial
 * derivations goes through the farm on PostgreSQL (a server started on loopback, as the tests
 * do): the evaluation's builds are ingested (builds/s), then the dispatcher (leader lock,
 * in-memory scheduler rebuilt from the database, batched claims and results) runs every step
 * on 4 workers in another process that answer each build at once, so the rate measured is the
 * farm's own (steps/s); the scheduler's time per decision is read from the dispatcher's metrics.
 * Real builds are measured separately (bench/farm-real.mjs).
 * Usage: N=100000 W=4 J=8 node bench/farm-100k.mjs
 */
import * as fs from "node:fs";
import * as http from "node:http";
import { spawn } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { sql } from "kysely";
import { openFarmDatabase, migrateFarmDatabase } from "../dist/src/farm/db/index.js";
import { ingestEvaluation } from "../dist/src/farm/db/ingest.js";
import { startDispatcher } from "../dist/src/farm/dispatch/dispatcher.js";
import { startPostgres } from "../dist/test/helpers/postgres.js";

const N = Number(process.env.N ?? 100000);
const W = process.env.W ?? "4";
const J = process.env.J ?? "8";
let seed = 11;
const rand = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
const drv = (i) => `/ferry/store/${String(i).padStart(32, "0")}-pkg-${i}.drv`;

const steps = [];
const jobs = [];
for (let i = 0; i < N; i++) {
  // A quarter of the steps need nothing (so tens of thousands are runnable at once), the others 1–3 earlier ones.
  const deps = i === 0 ? [] : [...new Set(Array.from({ length: Math.floor(rand() * 4) }, () => Math.floor(rand() * i)))];
  const system = i % 10 < 7 ? "x86_64-linux" : "aarch64-linux";
  steps.push({ drvPath: drv(i), name: `pkg-${i % 1000}`, system, dependsOn: deps.map(drv) });
  jobs.push({ job: `pkg-${i}`, drvPath: drv(i), system, outputs: { out: drv(i).replace(".drv", "") } });
}

console.log(`farm-100k: N=${N}, ${W} workers × ${J} slots; node ${process.version}`);
const pg = await startPostgres();
const logDir = fs.mkdtempSync(join(tmpdir(), "ferry-bench-farm-"));
let workers;
try {
  const fdb = await openFarmDatabase({ url: pg.url, poolSize: 4 });
  await migrateFarmDatabase(fdb);
  const p = await sql`insert into projects (name) values ('bench') returning id`.execute(fdb.db);
  const js = await sql`insert into jobsets (project_id, name, repo, file) values (${p.rows[0].id}, 'all', '/src', 'packages.ts') returning id`.execute(fdb.db);
  let t0 = performance.now();
  await ingestEvaluation(fdb.db, { jobsetId: js.rows[0].id, inputsHash: "h", jobs, steps });
  const ingestS = (performance.now() - t0) / 1000;
  console.log(`ingest:   ${N} builds in ${ingestS.toFixed(2)} s: ${Math.round(N / ingestS)} builds/s`);

  const server = http.createServer((_q, r) => r.writeHead(404).end());
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const url = `http://127.0.0.1:${server.address().port}`;
  t0 = performance.now();
  let readyAt = 0;
  const dispatcher = startDispatcher({
    db: fdb,
    publicUrl: url,
    cache: { url: `${url}/cache` },
    logDir,
    authenticate: () => "worker",
    leaseMs: 60_000,
    pollMs: 500,
    log: (l) => {
      if (l.startsWith("scheduler ready")) readyAt = performance.now();
      if (!l.startsWith("worker")) console.log(`  (${l})`);
    },
  });
  server.on("upgrade", (req, socket, head) => dispatcher.handleUpgrade(req, socket, head));
  workers = spawn(process.execPath, [new URL("./lib/farm-workers.mjs", import.meta.url).pathname, url, "t", W, J], { stdio: "inherit" });
  let last = 0;
  let lastT = performance.now();
  for (;;) {
    await new Promise((r) => setTimeout(r, 2000));
    const r = await sql`select count(*) filter (where status = 'succeeded') as done from steps`.execute(fdb.db);
    const done = Number(r.rows[0].done);
    const now = performance.now();
    process.stderr.write(`  ${done}/${N} steps done (${Math.round(((done - last) * 1000) / (now - lastT))}/s)\n`);
    last = done;
    lastT = now;
    if (done === N) break;
  }
  const totalS = (performance.now() - t0) / 1000;
  const runS = (performance.now() - readyAt) / 1000;
  const m = dispatcher.metrics();
  const num = (name) => Number(new RegExp(`^${name} (\\S+)$`, "m").exec(m)?.[1] ?? NaN);
  const decisions = num("ferry_farm_schedule_decisions_total");
  console.log(`dispatch: ${N} steps in ${totalS.toFixed(1)} s (scheduler load included), ${runS.toFixed(1)} s after it was ready: ${Math.round(N / runS)} steps/s`);
  const q = (x) => Number(new RegExp(`^ferry_farm_schedule_decision_seconds\\{quantile="${x}"\\} (\\S+)$`, "m").exec(m)?.[1] ?? NaN) * 1e6;
  console.log(
    `scheduler: ${decisions} decisions, ${((num("ferry_farm_schedule_seconds_sum") / decisions) * 1e6).toFixed(1)} µs each on average; per decision p50 ${q("0.5").toFixed(1)} µs, p99 ${q("0.99").toFixed(1)} µs (last 10,000 calls), slowest ${(num("ferry_farm_schedule_decision_max_seconds") * 1e3).toFixed(3)} ms`,
  );
  const ev = await sql`select count(*) as n from farm_events where kind = 'build:finished'`.execute(fdb.db);
  console.log(`builds finished (events): ${ev.rows[0].n}`);
  workers.kill("SIGTERM");
  await dispatcher.close();
  server.closeAllConnections();
  server.close();
  await fdb.close();
} finally {
  workers?.kill("SIGKILL");
  await pg.destroy();
  fs.rmSync(logDir, { recursive: true, force: true });
}
console.log("goals: ingest ≥ 1,000 builds/s; dispatch ≥ 200 steps/s; a scheduling decision < 1 ms with 100,000 steps queued");

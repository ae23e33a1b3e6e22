#!/usr/bin/env node
/**
 * bench/farm-ingest: how fast an evaluation's jobs go into the farm's database (the ingest half
 * of issue 5's farm-100k). N jobs (default 100,000), each with its own step, in a DAG like a
 * package set (each step depends on up to 3 earlier ones), ingested as one evaluation into
 * PostgreSQL (a server started on loopback, as the tests do) and into the embedded PGlite;
 * then a second evaluation where 10 % of the jobs changed. Reports builds per second.
 * Usage: N=100000 node bench/farm-ingest.mjs
 */
import * as fs from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { sql } from "kysely";
import { openFarmDatabase, migrateFarmDatabase } from "../dist/src/farm/db/index.js";
import { ingestEvaluation } from "../dist/src/farm/db/ingest.js";
import { startPostgres } from "../dist/test/helpers/postgres.js";

const N = Number(process.env.N ?? 100000);
let seed = 7;
const rand = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
const drv = (i, v = "") => `/ferry/store/${String(i).padStart(32, "0")}-pkg-${i}${v}.drv`;

function evaluation(changedEvery) {
  const steps = [];
  const jobs = [];
  for (let i = 0; i < N; i++) {
    const v = changedEvery && i % changedEvery === 0 ? "-v2" : "";
    const deps = i === 0 ? [] : [...new Set(Array.from({ length: 1 + Math.floor(rand() * 3) }, () => Math.floor(rand() * i)))];
    steps.push({ drvPath: drv(i, v), name: `pkg-${i}`, system: i % 10 < 7 ? "x86_64-linux" : "aarch64-linux", dependsOn: deps.map((d) => drv(d, changedEvery && d % changedEvery === 0 ? "-v2" : "")) });
    jobs.push({ job: `pkg-${i}`, drvPath: drv(i, v), system: steps[i].system, outputs: { out: drv(i, v).replace(".drv", "") } });
  }
  return { jobs, steps };
}

async function run(label, fdb) {
  await migrateFarmDatabase(fdb);
  const p = await sql`insert into projects (name) values ('bench') returning id`.execute(fdb.db);
  const js = await sql`insert into jobsets (project_id, name, repo, file) values (${p.rows[0].id}, 'all', '/src', 'packages.ts') returning id`.execute(fdb.db);
  const jobsetId = js.rows[0].id;
  for (const [name, ev] of [["first evaluation", evaluation(0)], ["second, 10 % changed", evaluation(10)]]) {
    const t0 = performance.now();
    const r = await ingestEvaluation(fdb.db, { jobsetId, inputsHash: name, jobs: ev.jobs, steps: ev.steps });
    const s = (performance.now() - t0) / 1000;
    console.log(`${label.padEnd(12)} ${name.padEnd(22)} ${N} builds, ${r.newSteps} new steps in ${s.toFixed(2)} s: ${Math.round(N / s)} builds/s`);
  }
  await fdb.close();
}

console.log(`farm-ingest: N=${N}; node ${process.version}`);
const pg = await startPostgres();
try {
  await run("postgresql", await openFarmDatabase({ url: pg.url }));
} finally {
  await pg.destroy();
}
const dir = fs.mkdtempSync(join(tmpdir(), "ferry-bench-ingest-"));
try {
  await run("pglite", await openFarmDatabase({ dataDir: dir }));
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
console.log("goal: ingest at least 1,000 builds/s");

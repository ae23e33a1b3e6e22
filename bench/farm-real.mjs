#!/usr/bin/env node
/**
 * bench/farm-real: the farm with real parts end to end, at a size one machine can build.
 * A package set of N (default 1,000) trivial derivations in a DAG (a quarter need nothing, the
 * others 1–3 earlier ones; each `echo`s its inputs into $out) is committed to a git repository;
 * `ferry farm serve` on PostgreSQL (a server started on loopback) evaluates it as a jobset, and
 * W (default 4) real `ferry worker` processes, J slots each, fetch each step's derivation closure
 * from the farm's cache, build it in the bubblewrap sandbox, upload the outputs and report.
 * Reported: evaluation + ingest time, steps/s from the first dispatch to the last build finished,
 * and, in the same run, `ferry build -j W×J` of the same package set into a fresh local store
 * (the same builds without the farm: no cache round trips, no coordinator), so the difference
 * is the farm's cost per step.
 * Usage: N=1000 W=4 J=1 node bench/farm-real.mjs   (after `npm run build`; SANDBOX=0 for --no-sandbox)
 */
import * as fs from "node:fs";
import { spawnSync } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { ferryBin } from "../dist/test/helpers/cli.js";
import { gitRepo } from "../dist/test/helpers/git-repo.js";
import { spawnFarmServe, spawnFerryWorker } from "../dist/test/helpers/farm-processes.js";
import { startPostgres } from "../dist/test/helpers/postgres.js";

const N = Number(process.env.N ?? 1000);
const W = Number(process.env.W ?? 4);
const J = Number(process.env.J ?? 1);
const sandbox = process.env.SANDBOX !== "0";
let seed = 11;
const rand = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;

// ---- the package set -----------------------------------------------------------------------
const lines = ['import { derivation } from "ferry";'];
for (let i = 0; i < N; i++) {
  const deps = i === 0 ? [] : [...new Set(Array.from({ length: Math.floor(rand() * 4) }, () => Math.floor(rand() * i)))];
  const env = deps.map((d, k) => `d${k}: p${d}`).join(", ");
  const script = `echo p${i} ${deps.map((_, k) => `$d${k}`).join(" ")} > $out`;
  lines.push(`export const p${i} = derivation({ name: "p${i}", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", ${JSON.stringify(script)}]${env ? `, ${env}` : ""} });`);
}

const dir = fs.mkdtempSync(join(tmpdir(), "ferry-farm-real-"));
const ferry = (args, opts = {}) => {
  const r = spawnSync(process.execPath, [ferryBin, ...args], { encoding: "utf8", maxBuffer: 1 << 28, ...opts });
  if (r.status !== 0) throw new Error(`ferry ${args.slice(0, 3).join(" ")} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
};
const storeFlags = (root) => ["--store-dir", "/ferry/store", "--state-dir", "/ferry/var", "--root", root];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

console.log(`farm-real: N=${N} derivations, ${W} workers × ${J} slot(s), sandbox ${sandbox ? "on" : "off"}; node ${process.version}`);
const repo = gitRepo(join(dir, "repo"), { "packages.ts": lines.join("\n") + "\n" });
const pg = await startPostgres();
const procs = [];
try {
  const farm = await spawnFarmServe(["--listen", "127.0.0.1:0", "--database", pg.url, "--data-dir", join(dir, "farm"), "--admin-token", "adm", "--worker-token", "wrk", "--check-every", "0", ...storeFlags(join(dir, "coord"))]);
  procs.push(farm);
  ferry(["farm", "jobset", "add", "--farm", farm.url, "--token", "adm", "bench", "main", "--repo", repo, "--file", "packages.ts"]);
  const t0 = performance.now();
  const ev = JSON.parse(ferry(["farm", "eval", "--farm", farm.url, "--token", "adm", "bench", "main", "--wait"]));
  const evalS = (performance.now() - t0) / 1000;
  if (ev.status !== "evaluated" || ev.builds !== N) throw new Error(`evaluation: ${JSON.stringify(ev)}`);
  console.log(`evaluation (checkout, ferry eval in its sandbox, publishing ${N} .drv files to the farm cache, ingest): ${evalS.toFixed(2)} s`);

  const t1 = performance.now();
  for (let w = 0; w < W; w++) procs.push(spawnFerryWorker(farm.url, "wrk", ["--id", `w${w}`, "--max-jobs", String(J), ...(sandbox ? [] : ["--no-sandbox"]), ...storeFlags(join(dir, `w${w}`))]));
  let last = "";
  for (;;) {
    const builds = ferry(["farm", "builds", "--farm", farm.url, "bench", "main", "--json"]).trim().split("\n").map((l) => JSON.parse(l));
    const counts = {};
    for (const b of builds) counts[b.status] = (counts[b.status] ?? 0) + 1;
    const line = Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(", ");
    if (line !== last) process.stderr.write(`  ${((performance.now() - t1) / 1000).toFixed(1)} s: ${line}\n`);
    last = line;
    if ((counts.queued ?? 0) === 0) {
      if ((counts.succeeded ?? 0) !== N) throw new Error(`not every build succeeded: ${line}`);
      break;
    }
    await sleep(500);
  }
  const farmS = (performance.now() - t1) / 1000;
  const metrics = await (await fetch(`${farm.url}/metrics`)).text();
  const waitSum = Number(/^ferry_farm_queue_wait_seconds_sum\{system="x86_64-linux"\} (\S+)/m.exec(metrics)?.[1] ?? NaN);
  console.log(`farm: ${N} steps in ${farmS.toFixed(2)} s (workers started, then every build finished): ${(N / farmS).toFixed(1)} steps/s; mean queue wait ${(waitSum / N).toFixed(2)} s`);

  // The same package set built locally, no farm.
  const t2 = performance.now();
  ferry(["build", "-j", String(W * J), ...(sandbox ? [] : ["--no-sandbox"]), ...storeFlags(join(dir, "local")), join(repo, "packages.ts")], { stdio: ["ignore", "ignore", "pipe"] });
  const localS = (performance.now() - t2) / 1000;
  console.log(`local: ferry build -j ${W * J} of the same set (evaluation included): ${localS.toFixed(2)} s: ${(N / localS).toFixed(1)} builds/s`);
  console.log(`farm cost per step over a local build: ${(((farmS - localS) / N) * W * J * 1000).toFixed(1)} ms of slot time`);
} finally {
  for (const p of procs.reverse()) await p.stop().catch(() => undefined);
  await pg.destroy();
  fs.rmSync(dir, { recursive: true, force: true });
}

#!/usr/bin/env node
/**
 * bench/farm-eval: what a large jobset's evaluation costs the coordinator's event loop, which
 * also serves the workers' connections, the dispatcher and the API. One evaluation of a
 * synthetic package set of N derivations (default 100,000; eval-100k's shape) from a git
 * repository into a store and PostgreSQL (started on loopback, as the tests do), through the
 * farm's own `evaluateJobset`; a 10 ms timer measures how late the event loop runs meanwhile.
 * Reports the evaluation's time, the longest stall of the event loop, how many stalls passed
 * 100 ms, and the process's peak RSS.
 * Usage (after `npm run build`): N=100000 node bench/farm-eval.mjs
 *   FERRY_DIST=/path/to/dist runs another build of Ferry (an older commit) with the same script;
 *   PUBLISH=1 publishes the steps' derivations to an embedded farm cache, as a coordinator that
 *   dispatches does; STALLS=1 prints each stall over 100 ms and when it happened; TMPDIR chooses where the store
 *   goes (a file system at rest: see eval-100k).
 */
import * as fs from "node:fs";
import { execFileSync } from "node:child_process";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { sql } from "kysely";

const N = Number(process.env.N ?? 100000);
const dist = resolve(process.env.FERRY_DIST ?? new URL("../dist", import.meta.url).pathname);
const load = (p) => import(pathToFileURL(join(dist, p)).href);
const { openFarmDatabase, migrateFarmDatabase } = await load("src/farm/db/index.js");
const { evaluateJobset } = await load("src/farm/evaluator.js");
const { LocalStore } = await load("src/store/local-store.js");
const { resolveStoreLocation } = await load("src/store/config.js");
const { openFarmCache } = await load("src/farm/farm-cache.js");
const { startPostgres } = await import(pathToFileURL(resolve(new URL("../dist/test/helpers/postgres.js", import.meta.url).pathname)).href);

const SET = `import { derivation, type Package } from "ferry";
const N = ${N};
const mod = (a: number, b: number) => a - Math.floor(a / b) * b;
const depsOf = (i: number): number[] => (i === 0 ? [] : [...(mod(i, 50) !== 0 ? [i - 1] : []), mod(i * 7919 + 13, i), Math.floor(i / 3)]);
const pkgs: Package[] = [];
for (let i = 0; i < N; i++) {
  pkgs.push(derivation({ name: \`p\${i}\`, system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $deps > $out"], deps: depsOf(i).map((j) => pkgs[j]!) }));
}
export default Object.fromEntries(pkgs.map((p, i) => [\`p\${i}\`, p]));
`;

const dir = fs.mkdtempSync(join(process.env.TMPDIR ?? tmpdir(), "ferry-bench-farm-eval-"));
const repo = join(dir, "repo");
fs.mkdirSync(repo);
fs.writeFileSync(join(repo, "packages.ts"), SET);
const git = (...args) => execFileSync("git", args, { cwd: repo, stdio: "ignore" });
git("init", "-q", "-b", "main");
git("add", ".");
git("-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-q", "-m", "set");

console.log(`farm-eval: N=${N}; ${dist}; node ${process.version}`);
const pg = await startPostgres();
const fdb = await openFarmDatabase({ url: pg.url });
const store = LocalStore.open(resolveStoreLocation({ storeDir: "/ferry/store", stateDir: "/ferry/var", root: join(dir, "store") }, {}));
try {
  await migrateFarmDatabase(fdb);
  const p = await sql`insert into projects (name) values ('bench') returning id`.execute(fdb.db);
  const js = await sql`insert into jobsets (project_id, name, repo, branch, file) values (${p.rows[0].id}, 'all', ${repo}, 'main', 'packages.ts') returning id`.execute(fdb.db);
  // The event loop's lateness: a 10 ms timer that should fire every 10 ms.
  const stalls = [];
  const t0 = performance.now();
  let last = t0;
  const timer = setInterval(() => {
    const now = performance.now();
    const stall = now - last - 10;
    stalls.push(stall);
    if (process.env.STALLS && stall > 100) console.error(`stall of ${Math.round(stall)} ms, ${((now - t0) / 1000).toFixed(1)} s into the evaluation`);
    last = now;
  }, 10);
  const cache = process.env.PUBLISH ? await openFarmCache({ dataDir: dir, storeDir: store.storeDir }) : undefined;
  const publish = cache ? (paths) => cache.publish(store, paths) : undefined;
  const outcome = await evaluateJobset({ db: fdb.db, store, dataDir: dir, ...(publish ? { publish } : {}) }, { id: js.rows[0].id, repo, branch: "main", file: "packages.ts" });
  const secs = (performance.now() - t0) / 1000;
  clearInterval(timer);
  await cache?.close();
  if (outcome.kind !== "evaluated") throw new Error(`the evaluation did not succeed: ${outcome.kind === "failed" ? outcome.error.message : outcome.kind}`);
  const sorted = [...stalls].sort((a, b) => a - b);
  const pct = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  console.log(`evaluation: ${outcome.result.builds} builds, ${outcome.result.newSteps} new steps in ${secs.toFixed(2)} s`);
  console.log(`event loop: longest stall ${Math.round(sorted.at(-1))} ms, p99 ${Math.round(pct(0.99))} ms, ${stalls.filter((s) => s > 100).length} stalls over 100 ms (${stalls.length} ticks)`);
  console.log(`peak RSS: ${Math.round(process.resourceUsage().maxRSS / 1024)} MiB`);
} finally {
  store.close();
  await fdb.close();
  await pg.destroy();
  fs.rmSync(dir, { recursive: true, force: true });
}

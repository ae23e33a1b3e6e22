#!/usr/bin/env node
/**
 * Builds the example package set (examples/packages.ts) from a fresh store, with the fixture
 * tarballs served by a hashed mirror over HTTP on loopback, and reports:
 *   1. each package built on its own, in dependency order (wall time of `ferry build`, and the
 *      realiser's time for the package itself), and their sum;
 *   2. the whole set built by one `ferry build -j J` in another fresh store (wall time);
 *   3. `ferry build --check` of each package: whether the rebuild is bit-for-bit the same, and
 *      if not, which files differ. The rebuild uses `--check-cores` cores (default 1), so that
 *      output that depends on parallel make's timing shows up.
 *
 *   bench/real-packages [--cores N] [--check-cores N] [-j N] [--only a,b,c] [--keep]
 *
 * Needs the built CLI (npm run build), bubblewrap, gcc and the aarch64 cross toolchain.
 * Prints Markdown on stdout; progress on stderr.
 */
import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as http from "node:http";
import * as os from "node:os";
import { join } from "node:path";

const repo = new URL("..", import.meta.url).pathname;
const ferryBin = join(repo, "dist", "src", "cli", "main.js");
const packages = join(repo, "examples", "packages.ts");
const sources = join(repo, "..", "shared", "fixtures", "sources");
/** Every member of the set, each after what it depends on. */
const ALL = ["zlib", "libpng", "hello", "bzip2", "xz", "lua", "zlib-aarch64", "libpng-aarch64", "hello-aarch64"];

function parseArgs(argv) {
  const o = { cores: 2, checkCores: 1, jobs: 2, only: ALL, keep: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--cores") o.cores = Number(argv[++i]);
    else if (a === "--check-cores") o.checkCores = Number(argv[++i]);
    else if (a === "-j" || a === "--max-jobs") o.jobs = Number(argv[++i]);
    else if (a === "--only") o.only = argv[++i].split(",");
    else if (a === "--keep") o.keep = true;
    else {
      console.error(`usage: bench/real-packages [--cores N] [--check-cores N] [-j N] [--only a,b,c] [--keep]\nunknown argument: ${a}`);
      process.exit(2);
    }
  }
  return o;
}

/** GET /sha256/<hex> serves the fixture with that sha256. */
async function startMirror() {
  const byHash = new Map();
  for (const n of fs.readdirSync(sources)) {
    if (n.includes(".tar.")) byHash.set(createHash("sha256").update(fs.readFileSync(join(sources, n))).digest("hex"), join(sources, n));
  }
  const server = http.createServer((req, res) => {
    const m = /^\/sha256\/([0-9a-f]{64})$/.exec(req.url ?? "");
    const file = m && byHash.get(m[1]);
    if (!file) return void res.writeHead(404).end();
    res.writeHead(200, { "content-length": fs.statSync(file).size });
    fs.createReadStream(file).pipe(res);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((r) => server.close(r)) };
}

/** Runs `ferry build --json …`; returns the wall time, the events and the per-derivation results. */
function ferryBuild(args) {
  const t0 = performance.now();
  const child = spawn(process.execPath, [ferryBin, "build", "--json", ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d) => (stdout += d));
  child.stderr.on("data", (d) => (stderr += d));
  return new Promise((resolve) =>
    child.on("close", (status) => {
      const wallMs = performance.now() - t0;
      const lines = stdout.split("\n");
      const events = lines.filter((l) => l.startsWith('{"event"')).map((l) => JSON.parse(l));
      const rest = lines.filter((l) => !l.startsWith('{"event"')).join("\n").trim();
      let results = [];
      try {
        results = rest ? JSON.parse(rest).results : [];
      } catch {
        /* a failure before the build printed no results */
      }
      resolve({ status, wallMs, events, results, stderr });
    }),
  );
}

const secs = (ms) => (ms / 1000).toFixed(1);

function machineInfo() {
  const cpu = os.cpus()[0]?.model ?? "unknown CPU";
  const gcc = spawnSync("gcc", ["--version"], { encoding: "utf8" }).stdout?.split("\n")[0] ?? "gcc: not found";
  const cross = spawnSync("aarch64-linux-gnu-gcc", ["--version"], { encoding: "utf8" }).stdout?.split("\n")[0] ?? "aarch64-linux-gnu-gcc: not found";
  const distro = fs.existsSync("/etc/os-release") ? (/PRETTY_NAME="([^"]*)"/.exec(fs.readFileSync("/etc/os-release", "utf8"))?.[1] ?? "") : "";
  return `${os.cpus().length} × ${cpu}, ${Math.round(os.totalmem() / 2 ** 30)} GiB RAM, ${distro}, Linux ${os.release()}, Node ${process.version}, ${gcc}, ${cross}`;
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  if (!fs.existsSync(ferryBin)) {
    console.error("bench/real-packages: build Ferry first (npm run build)");
    process.exit(1);
  }
  const mirror = await startMirror();
  const work = fs.mkdtempSync(join(os.tmpdir(), "ferry-bench-real-"));
  const common = (root, cores = o.cores) => ["--root", root, "--hashed-mirror", mirror.url, "--cores", String(cores)];
  const say = (s) => process.stderr.write(s + "\n");
  const out = [];
  let failed = false;
  try {
    // 1. One package at a time, in dependency order.
    const serialRoot = join(work, "serial");
    const rows = [];
    let sum = 0;
    for (const attr of o.only) {
      say(`building ${attr} …`);
      const r = await ferryBuild([`${packages}#${attr}`, ...common(serialRoot)]);
      if (r.status !== 0) {
        failed = true;
        say(r.stderr);
      }
      const own = r.results[0];
      const fin = r.events.find((e) => e.event === "build:finished" && own && e.drvPath === own.drvPath);
      sum += r.wallMs;
      rows.push({ attr, ok: r.status === 0, wallMs: r.wallMs, buildMs: fin?.durationMs, out: own?.outputs?.out ?? "" });
    }
    out.push(`Machine: ${machineInfo()}`, "");
    out.push(`### Each package on its own (fresh store, \`--cores ${o.cores}\`, in dependency order)`, "");
    out.push("| package | `ferry build` wall (s) | its own build (s) | output |", "|---|---:|---:|---|");
    for (const r of rows) out.push(`| ${r.attr} | ${r.ok ? secs(r.wallMs) : "FAILED"} | ${r.buildMs !== undefined ? secs(r.buildMs) : "–"} | \`${r.out.replace(/^\/ferry\/store\//, "")}\` |`);
    out.push(`| **total** | **${secs(sum)}** | | |`, "");

    // 2. The whole set at once, in another fresh store.
    say(`building the whole set with -j ${o.jobs} …`);
    const all = await ferryBuild([...o.only.map((a) => `${packages}#${a}`), ...common(join(work, "parallel")), "-j", String(o.jobs)]);
    if (all.status !== 0) {
      failed = true;
      say(all.stderr);
    }
    const built = all.events.filter((e) => e.event === "build:finished").length;
    out.push(`### The whole set in one \`ferry build -j ${o.jobs} --cores ${o.cores}\` (fresh store)`, "");
    out.push(`${all.status === 0 ? `${secs(all.wallMs)} s wall` : "FAILED"} for ${built} derivations (${o.only.length} packages and their source tarballs).`, "");

    // 3. Rebuild each and compare.
    out.push(`### \`ferry build --check --cores ${o.checkCores}\` (rebuild in the sandbox, compare with the first build)`, "");
    out.push("| package | check wall (s) | bit-for-bit reproducible | files that differ |", "|---|---:|---|---|");
    for (const attr of o.only) {
      say(`checking ${attr} …`);
      const r = await ferryBuild([`${packages}#${attr}`, ...common(serialRoot, o.checkCores), "--check"]);
      const own = r.results[0];
      const checked = own?.checked;
      if (!checked) {
        failed = true;
        say(r.stderr);
        out.push(`| ${attr} | – | check FAILED: ${own?.error?.message ?? r.stderr.trim().split("\n").pop()} | |`);
        continue;
      }
      const diffs = checked.differences.map((d) => `\`${d.replace(/^\/ferry\/store\/[0-9a-z]{32}-/, "")}\``).join(", ");
      out.push(`| ${attr} | ${secs(r.wallMs)} | ${checked.reproducible ? "yes" : "**no**"} | ${diffs || "–"} |`);
    }
    out.push("");
  } finally {
    await mirror.close();
    if (o.keep) say(`kept the stores in ${work}`);
    else fs.rmSync(work, { recursive: true, force: true });
  }
  process.stdout.write(out.join("\n") + "\n");
  if (failed) process.exitCode = 1;
}

await main();

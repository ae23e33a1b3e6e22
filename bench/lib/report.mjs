#!/usr/bin/env node
/**
 * Prints bench/nar-hash's table from hyperfine's JSON exports and the RSS figures.
 * Usage: report.mjs DIR BIG_MIB FILES NPROC CPU_MODEL LOADAVG
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const [dir, bigMib, files, nproc, cpu, load] = process.argv.slice(2);
const read = (name) => JSON.parse(readFileSync(join(dir, name), "utf8"));
const byName = (json) => Object.fromEntries(json.results.map((r) => [r.command, r]));
const startup = byName(read("startup.json"));
const a = byName(read("a.json"));
const b = byName(read("b.json"));
const rss = read("rss.json");

const ms = (s) => (s * 1000).toFixed(0);
const cell = (r) => `${ms(r.mean)} ± ${ms(r.stddev)}`.padStart(12);
const row = (label, r, ratio) => `| ${label.padEnd(44)} | ${cell(r)} | ${ms(r.min).padStart(6)} | ${ratio.padStart(18)} |`;
const x = (p, q) => (p.mean / q.mean).toFixed(2) + "×";

const out = [];
out.push(`machine: ${nproc} CPUs, ${cpu}; load average at the end ${load}`);
out.push("");
out.push(`| ${"command".padEnd(44)} | ${"mean ± σ, ms".padStart(12)} | ${"min".padStart(6)} | ${"ratio".padStart(18)} |`);
out.push(`|${"-".repeat(46)}|${"-".repeat(14)}|${"-".repeat(8)}|${"-".repeat(20)}|`);
out.push(row(`(a) ferry hash path, ${bigMib} MiB file`, a.ferry, `${x(a.ferry, a.openssl)} openssl`));
out.push(row(`(a) nix-hash --type sha256`, a["nix-hash"], `${x(a["nix-hash"], a.openssl)} openssl`));
out.push(row(`(a) openssl dgst -sha256 (the file)`, a.openssl, "1.00× openssl"));
out.push(row(`(b) ferry hash path, tree of ${files} files`, b.ferry, `${x(b.ferry, b["nix-hash"])} nix-hash`));
out.push(row(`(b) nix-hash --type sha256`, b["nix-hash"], "1.00× nix-hash"));
out.push(row(`(b) openssl dgst -sha256 (the tree's NAR)`, b.openssl, `${x(b.openssl, b["nix-hash"])} nix-hash`));
out.push(row("node -e 0 (Node's own start-up)", startup["node -e 0"], ""));
out.push(row("ferry hash path of a 1-byte file (start-up)", startup["ferry hash path, 1 byte"], ""));
out.push("");
const ra = a.ferry.mean / a.openssl.mean;
const rb = b.ferry.mean / b["nix-hash"].mean;
out.push(`goal (a) ferry within 1.1× of openssl: ${ra.toFixed(2)}× ${ra <= 1.1 ? "MET" : "MISSED"}`);
out.push(`goal (b) ferry no slower than nix-hash: ${rb.toFixed(2)}× ${rb <= 1.0 ? "MET" : "MISSED"}`);
const start = startup["ferry hash path, 1 byte"].mean;
out.push(`without the CLI's start-up (${ms(start)} ms): (a) ${((a.ferry.mean - start) / a.openssl.mean).toFixed(2)}× openssl, (b) ${((b.ferry.mean - start) / b["nix-hash"].mean).toFixed(2)}× nix-hash`);
out.push("");
out.push(`| ${"peak RSS".padEnd(44)} | ${"MiB".padStart(8)} |`);
out.push(`|${"-".repeat(46)}|${"-".repeat(10)}|`);
for (const [k, kib] of Object.entries(rss)) out.push(`| ${k.padEnd(44)} | ${(kib / 1024).toFixed(1).padStart(8)} |`);
console.log(out.join("\n"));

if (process.env.FERRY_BENCH_JSON) {
  writeFileSync(process.env.FERRY_BENCH_JSON, JSON.stringify({ machine: { nproc, cpu, load }, startup, a, b, rss }, null, 2));
}

#!/usr/bin/env node
/**
 * Makes the input trees of bench/nar-hash, deterministically (a seeded PRNG, so every run hashes
 * the same bytes).
 *
 *   make-tree.mjs small DIR FILES   FILES regular files (log-normal sizes, median 1 KiB, a few up to
 *                                   1 MiB, 3% empty, 5% executable) in nested directories, plus 2%
 *                                   as many symlinks and a few empty directories.
 *   make-tree.mjs tricky DIR        a small tree of edge cases: unicode and odd-byte names, names that
 *                                   sort differently as bytes and as UTF-16, symlinks (dangling,
 *                                   absolute, to directories), executables, empty files and dirs,
 *                                   files around the batch and direct-write thresholds.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { createHash } from "node:crypto";
import { prng } from "../../dist/test/helpers/fs-trees.js";


/** 4 MiB of deterministic bytes; file contents are slices of it at random offsets. */
function pool() {
  const out = Buffer.allocUnsafe(4 << 20);
  let block = createHash("sha256").update("ferry-bench").digest();
  for (let off = 0; off < out.length; off += 32) {
    block = createHash("sha256").update(block).digest();
    block.copy(out, off);
  }
  return out;
}

function write(file, bytes, mode) {
  fs.writeFileSync(file, bytes, { mode });
  fs.chmodSync(file, mode); // regardless of umask
}

function makeSmall(root, nFiles) {
  const rnd = prng(42);
  const bytes = pool();
  const pick = (xs) => xs[Math.floor(rnd() * xs.length)];
  const words = ["lib", "share", "bin", "include", "src", "doc", "man", "locale", "python3.11", "site-packages", "node_modules", "test", "util", "core", "x86_64-linux", "pkgconfig", "cmake", "data", "icons", "hicolor"];
  const exts = [".h", ".c", ".py", ".js", ".so", ".txt", ".json", ".mo", ".html", ".png", "", ".gz", ".pc", ".cmake", ".1"];

  // ~1 directory per 20 files, as a random tree of depth up to 5 under 50 top-level directories.
  const dirs = [];
  for (let i = 0; i < 50; i++) dirs.push(`d${String(i).padStart(2, "0")}`);
  const nDirs = Math.max(50, Math.round(nFiles / 20));
  while (dirs.length < nDirs) {
    const parent = pick(dirs);
    if (parent.split("/").length >= 5) continue;
    dirs.push(`${parent}/${pick(words)}${Math.floor(rnd() * 100)}`);
  }
  const uniq = [...new Set(dirs)];
  for (const d of uniq) fs.mkdirSync(path.join(root, d), { recursive: true });

  const files = [];
  let total = 0;
  for (let i = 0; i < nFiles; i++) {
    const dir = pick(uniq);
    const name = `${pick(words)}-${i.toString(36)}${pick(exts)}`;
    // Log-normal sizes: median 1 KiB, sigma 1.6 (so a long tail), capped at 1 MiB; 3% empty.
    const g = Math.sqrt(-2 * Math.log(1 - rnd())) * Math.cos(2 * Math.PI * rnd());
    const size = rnd() < 0.03 ? 0 : Math.min(1 << 20, Math.round(1024 * Math.exp(1.6 * g)));
    const off = Math.floor(rnd() * (bytes.length - size));
    const file = path.join(root, dir, name);
    write(file, bytes.subarray(off, off + size), rnd() < 0.05 ? 0o755 : 0o644);
    files.push(`${dir}/${name}`);
    total += size;
  }
  const nLinks = Math.round(nFiles * 0.02);
  for (let i = 0; i < nLinks; i++) {
    const dir = pick(uniq);
    const target = rnd() < 0.1 ? `/nix/store/does-not-exist-${i}` : path.relative(path.join(root, dir), path.join(root, pick(files)));
    fs.symlinkSync(target, path.join(root, dir, `link-${i.toString(36)}`));
  }
  for (let i = 0; i < 20; i++) fs.mkdirSync(path.join(root, pick(uniq), `empty-${i}`), { recursive: true });
  return { files: nFiles, symlinks: nLinks, dirs: uniq.length + 20, bytes: total };
}

function makeTricky(root) {
  const bytes = pool();
  fs.mkdirSync(root);
  const names = ["a", "B", "b", "ä", "z", "é", "e\u0301", "日本語", "😀", "\uff41", "-dash", ".hidden", "..x", "with space", "tab\there", "new\nline", "quote\"'", "back\\slash", "x".repeat(255)];
  for (const [i, n] of names.entries()) write(path.join(root, n), bytes.subarray(i * 97, i * 97 + i * 13), i % 3 === 0 ? 0o755 : 0o644);
  // Non-UTF-8 name (a lone 0xff byte) and names whose byte order differs from their UTF-16 order.
  fs.writeFileSync(Buffer.concat([Buffer.from(root + "/raw-"), Buffer.from([0xff, 0xfe])]), "x");
  write(path.join(root, "\u{10000}"), "astral", 0o644);
  write(path.join(root, "\uffff"), "bmp-end", 0o644);
  fs.mkdirSync(path.join(root, "empty-dir"));
  fs.mkdirSync(path.join(root, "deep/er/and/deeper/still"), { recursive: true });
  write(path.join(root, "deep/er/and/deeper/still/leaf"), "", 0o755);
  write(path.join(root, "empty-file"), "", 0o644);
  write(path.join(root, "empty-exec"), "", 0o755);
  // Sizes around the reader's and writer's thresholds (64 KiB, 256 KiB batch, 1 MiB reads).
  for (const s of [1, 7, 8, 9, 4095, 4096, 65535, 65536, 65537, 262143, 262144, 262145, 1048575, 1048576, 1048577, 3 * 1048576 + 5]) {
    write(path.join(root, `size-${s}`), bytes.subarray(0, s), 0o644);
  }
  fs.symlinkSync("a", path.join(root, "link-to-a"));
  fs.symlinkSync("deep/er", path.join(root, "link-to-dir"));
  fs.symlinkSync("/nonexistent/absolute", path.join(root, "dangling"));
  fs.symlinkSync("日本語", path.join(root, "link-unicode"));
  fs.symlinkSync("x".repeat(1000), path.join(root, "link-long"));
  // Many entries in one directory, out of creation order.
  fs.mkdirSync(path.join(root, "many"));
  for (let i = 999; i >= 0; i--) write(path.join(root, "many", `f${i}`), bytes.subarray(i, i + (i % 50)), 0o644);
  return { ok: true };
}

const [mode, dir, n] = process.argv.slice(2);
if (mode === "small") console.log(JSON.stringify(makeSmall(dir, Number(n))));
else if (mode === "tricky") console.log(JSON.stringify(makeTricky(dir)));
else {
  console.error("usage: make-tree.mjs small DIR FILES | tricky DIR");
  process.exit(2);
}

#!/usr/bin/env node
/**
 * Makes a closure of N input-addressed store objects (a DAG like a package set: each object
 * references a few earlier ones; one "top" references every object without referrers) in a
 * Ferry store with store dir /nix/store under ROOT, and prints the top path.
 * Sizes: most objects a few KiB to tens of KiB of text-like data, every 50th about 1 MiB.
 * Usage: make-closure.mjs ROOT N
 */
import * as fs from "node:fs";
import { join } from "node:path";
import { LocalStore } from "../../dist/src/store/local-store.js";
import { resolveStoreLocation } from "../../dist/src/store/config.js";
import { hashPath } from "../../dist/src/store/nar-dump.js";
import { makeOutputPath, printStorePath } from "../../dist/src/core/store-path.js";
import { sha256 } from "../../dist/src/core/digest.js";

const [root, nText] = process.argv.slice(2);
const n = Number(nText);
const store = LocalStore.open(resolveStoreLocation({ storeDir: "/nix/store", stateDir: "/nix/var", root }, {}));
let seed = 12345;
const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
const words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore magna aliqua".split(" ");
const text = (bytes) => {
  let s = "";
  while (s.length < bytes) s += words[Math.floor(rand() * words.length)] + (rand() < 0.1 ? "\n" : " ");
  return s.slice(0, bytes);
};
const paths = [];
const referenced = new Set();
const batch = [];
const flush = () => {
  store.registerObjects(batch.splice(0));
};
for (let i = 0; i <= n - 1; i++) {
  const isTop = i === n - 1;
  const refs = isTop ? paths.filter((p) => !referenced.has(p)) : [...new Set(Array.from({ length: Math.min(i, 1 + Math.floor(rand() * 4)) }, () => paths[Math.floor(rand() * i)]))];
  refs.forEach((r) => referenced.add(r));
  const name = isTop ? "top" : `pkg-${i}`;
  const path = printStorePath(makeOutputPath("/nix/store", "out", sha256(`bench-${i}`), name));
  const tmp = store.newTempPath();
  fs.mkdirSync(join(tmp, "lib"), { recursive: true });
  const size = i % 50 === 7 ? 1_000_000 : Math.floor(2000 + rand() * rand() * 60_000);
  fs.writeFileSync(join(tmp, "lib", "data"), text(size));
  fs.writeFileSync(join(tmp, "deps"), refs.join("\n"));
  if (i % 3 === 0) fs.symlinkSync("lib/data", join(tmp, "link"));
  const { hash, size: narSize } = hashPath(tmp);
  batch.push({ tmpReal: tmp, obj: { path, narHash: hash, narSize, references: refs.sort() } });
  paths.push(path);
  if (batch.length >= 200) flush();
}
flush();
store.close();
process.stdout.write(paths[paths.length - 1] + "\n");

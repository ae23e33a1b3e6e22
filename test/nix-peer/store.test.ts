/**
 * Real Nix 2.8 as the judge: for random trees our NAR bytes, hashes and store paths must equal
 * Nix's, and export streams must cross between the two in both directions.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { ferryBin, ferryOk, nixStoreFlags } from "../helpers/cli.js";
import { nix, nixChroot, haveNix, nixEnv } from "../helpers/nix.js";
import { prng, tempDir, writeRandomTree } from "../helpers/fs-trees.js";
import { dumpPath, hashPath, walkerReady } from "../../src/store/nar-dump.js";
import { FerryError } from "../../src/core/errors.js";
import { nixVectorsDir } from "../helpers/paths.js";
import { LocalStore } from "../../src/store/local-store.js";
import { exportEnd, exportEntryStart, exportEntryTrailer } from "../../src/core/export-stream.js";
import { narOfTree } from "../../src/core/nar/tree.js";
import { makeTextPath, printStorePath } from "../../src/core/store-path.js";
import { makeHash } from "../../src/core/hash.js";
import { sha256 } from "../../src/core/digest.js";
import { resolveStoreLocation } from "../../src/store/config.js";

const SEEDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

describe("Nix 2.8 as a peer", { skip: haveNix() ? false : "nix-bin is not installed (the test command installs it)" }, () => {
  let dir: string;
  before(() => {
    dir = tempDir("ferry-nixpeer-");
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  test("NAR bytes and NAR hashes of random trees equal nix-store --dump and nix-hash", () => {
    for (const seed of SEEDS) {
      const src = join(dir, `tree-${seed}`);
      writeRandomTree(src, seed, { largeFileChance: seed % 4 === 0 ? 0.3 : 0.02 });
      assert.ok(spawnDump(src).equals(ferryDump(src)), `seed ${seed}: NAR bytes differ from nix-store --dump`);
      assert.equal(ferryOk(["hash", "path", "--base16", src]).trim(), nix("nix-hash", ["--type", "sha256", src]).toString().trim(), `seed ${seed}`);
      assert.equal(ferryOk(["hash", "path", "--base32", "--type", "sha512", src]).trim(), nix("nix-hash", ["--type", "sha512", "--base32", src]).toString().trim());
    }
  });

  test("a tree walked by the walker thread: NAR bytes, hashes and store copies equal Nix's", async () => {
    // Thousands of files, so the walk is handed to the (already running) walker thread after the
    // first few dozen; contents cross its ring in pieces of 128 KiB, so sizes straddle them.
    const src = join(dir, "walked");
    writeWideTree(src, 11);
    assert.equal(await walkerReady(), true, "the walker thread starts on this two-CPU machine");
    const chunks: Buffer[] = [];
    const size = dumpPath(src, (c) => chunks.push(Buffer.from(c)));
    const theirs = spawnDump(src);
    assert.equal(size, theirs.length);
    assert.ok(Buffer.concat(chunks).equals(theirs), "NAR bytes differ from nix-store --dump");
    assert.equal(ferryOk(["hash", "path", "--base16", src]).trim(), nix("nix-hash", ["--type", "sha256", src]).toString().trim());
    assert.ok(ferryDump(src).equals(theirs), "ferry nar dump differs from nix-store --dump");
    // The store's one-pass copy-and-hash through the walker: path and NAR hash as Nix has them.
    const nixRoot = nixChroot(dir);
    const expected = nix("nix-store", ["--store", nixRoot, "--add", src]).toString().trim();
    const store = LocalStore.open(resolveStoreLocation({ storeDir: "/nix/store", stateDir: "/nix/var", root: join(dir, "ferry-root-walked") }, {}));
    try {
      const added = store.addPath(src);
      assert.equal(added.path, expected);
      assert.deepEqual(hashPath(store.realPathOf(added.path)).hash.digest, hashPath(src).hash.digest);
    } finally {
      store.close();
    }
  });

  test("a FIFO deep in a walked tree is refused, and the walker thread stays usable", async () => {
    const src = join(dir, "walked-fifo");
    writeWideTree(src, 12);
    const fifo = join(src, "zz", "zz-fifo");
    assert.equal(spawnSync("mkfifo", [fifo]).status, 0);
    assert.equal(await walkerReady(), true);
    assert.throws(() => hashPath(src), (e: unknown) => e instanceof FerryError && e.code === "FERRY_NAR_UNSUPPORTED_FILE" && e.message.includes("zz-fifo"));
    fs.rmSync(fifo);
    // The walker thread is usable again, and walks the repaired tree like Nix.
    assert.equal(ferryOk(["hash", "path", "--base16", src]).trim(), nix("nix-hash", ["--type", "sha256", src]).toString().trim());
    assert.deepEqual(hashPath(src).hash, hashPath(src).hash);
    assert.ok(Buffer.concat(collect(src)).equals(spawnDump(src)));
  });

  test("ferry store add gives the path nix-store --add gives, for trees, files and symlinks", () => {
    const nixRoot = nixChroot(dir);
    const ferryRoot = join(dir, "ferry-root-add");
    const inputs: string[] = [];
    for (const seed of SEEDS.slice(0, 6)) {
      const src = join(dir, `add-${seed}`);
      writeRandomTree(src, seed * 7);
      inputs.push(src);
    }
    fs.writeFileSync(join(dir, "single-file"), "just a file\n");
    fs.symlinkSync("/some/where", join(dir, "a-symlink"));
    inputs.push(join(dir, "single-file"), join(dir, "a-symlink"));
    for (const src of inputs) {
      const theirs = nix("nix-store", ["--store", nixRoot, "--add", src]).toString().trim();
      const ours = ferryOk(["store", "add", ...nixStoreFlags(ferryRoot), src]).trim();
      assert.equal(ours, theirs, src);
      assert.equal(ferryOk(["store", "add", "--dry-run", "--store-dir", "/nix/store", src]).trim(), theirs);
      const info = JSON.parse(nix("nix", ["--store", nixRoot, "path-info", "--json", theirs]).toString())[0];
      const mine = JSON.parse(ferryOk(["store", "path-info", "--json", ...nixStoreFlags(ferryRoot), ours]))[0];
      assert.equal(mine.narHash, info.narHash);
      assert.equal(mine.narSize, info.narSize);
    }
  });

  test("fixed-output adds match nix-store --add-fixed (flat and recursive, several algorithms)", () => {
    const nixRoot = nixChroot(dir);
    const ferryRoot = join(dir, "ferry-root-fixed");
    const file = join(dir, "fixed-input.txt");
    fs.writeFileSync(file, "fixed output contents\n");
    const tree = join(dir, "fixed-tree");
    writeRandomTree(tree, 99);
    for (const algo of ["sha256", "sha1", "sha512", "md5"]) {
      const flatTheirs = nix("nix-store", ["--store", nixRoot, "--add-fixed", algo, file]).toString().trim();
      assert.equal(ferryOk(["store", "add-fixed", "--type", algo, ...nixStoreFlags(ferryRoot), file]).trim(), flatTheirs, `flat ${algo}`);
      const recTheirs = nix("nix-store", ["--store", nixRoot, "--add-fixed", "--recursive", algo, tree]).toString().trim();
      assert.equal(ferryOk(["store", "add-fixed", "--recursive", "--type", algo, ...nixStoreFlags(ferryRoot), tree]).trim(), recTheirs, `recursive ${algo}`);
    }
  });

  test("export streams cross both ways: ferry -> nix-store --import and nix-store --export -> ferry", () => {
    const ferryA = join(dir, "ferry-a");
    const ferryB = join(dir, "ferry-b");
    const nixRoot = nixChroot(dir);
    // Objects with references come from text objects, which Ferry can make directly.
    const src = join(dir, "exp-tree");
    writeRandomTree(src, 123, { largeFileChance: 0.2 });
    const tree = ferryOk(["store", "add", ...nixStoreFlags(ferryA), src]).trim();
    const stream1 = ferryExport(ferryA, [tree]);
    const imported = nix("nix-store", ["--store", nixRoot, "--import"], stream1).toString().trim();
    assert.equal(imported, tree);
    assert.equal(nix("nix-store", ["--store", nixRoot, "--verify-path", tree]).toString(), "");
    const back = nix("nix-store", ["--store", nixRoot, "--export", tree]);
    assert.ok(back.equals(stream1), "Nix re-exports exactly the bytes Ferry wrote");
    const out = ferryOk(["store", "import", ...nixStoreFlags(ferryB)], { input: back }).trim();
    assert.equal(out, tree);
    assert.ok(ferryExport(ferryB, [tree]).equals(stream1));
  });

  test("objects with references and a deriver survive ferry -> Nix -> ferry", () => {
    const ferryA = join(dir, "ferry-refs-a");
    const ferryB = join(dir, "ferry-refs-b");
    const nixRoot = nixChroot(dir);
    const store = LocalStore.open(resolveStoreLocation({ storeDir: "/nix/store", stateDir: "/nix/var", root: ferryA }, {}));
    let top: string;
    let leaf: string;
    let mid: string;
    try {
      leaf = store.addText("leaf.txt", "leaf").path;
      mid = store.addText("mid.txt", `see ${leaf}`, [leaf]).path;
      top = store.addText("top.txt", `see ${mid} and ${leaf}`, [leaf, mid]).path;
    } finally {
      store.close();
    }
    const stream = ferryExport(ferryA, [top, mid, leaf]);
    const imported = nix("nix-store", ["--store", nixRoot, "--import"], stream).toString().trim().split("\n");
    assert.deepEqual(imported, [leaf, mid, top], "references first");
    assert.equal(nix("nix-store", ["--store", nixRoot, "-q", "--references", top]).toString().trim().split("\n").sort().join(" "), [leaf, mid].sort().join(" "));
    const back = nix("nix-store", ["--store", nixRoot, "--export", leaf, mid, top]);
    assert.ok(back.equals(stream));
    assert.deepEqual(ferryOk(["store", "import", ...nixStoreFlags(ferryB)], { input: back }).trim().split("\n"), [leaf, mid, top]);
    const info = JSON.parse(ferryOk(["store", "path-info", "--json", ...nixStoreFlags(ferryB), top]))[0];
    assert.deepEqual(info.references, [leaf, mid].sort());

    // A deriver crosses too: a hand-made stream for a text object that names a .drv.
    const text = new TextEncoder().encode("made by a derivation\n");
    const objPath = printStorePath(makeTextPath("/nix/store", "derived.txt", makeHash("sha256", sha256(text))));
    const deriver = "/nix/store/00000000000000000000000000000000-derived.drv";
    const crafted = Buffer.concat([exportEntryStart(), narOfTree({ type: "regular", executable: false, contents: text }), exportEntryTrailer({ storePath: objPath, references: [], deriver }), exportEnd()]);
    const ferryC = join(dir, "ferry-deriver");
    assert.equal(ferryOk(["store", "import", ...nixStoreFlags(ferryC)], { input: crafted }).trim(), objPath);
    const viaNix = nix("nix-store", ["--store", nixRoot, "--import"], ferryExport(ferryC, [objPath])).toString().trim();
    assert.equal(viaNix, objPath);
    assert.equal(nix("nix-store", ["--store", nixRoot, "-q", "--deriver", objPath]).toString().trim(), deriver);
    assert.ok(nix("nix-store", ["--store", nixRoot, "--export", objPath]).equals(crafted));
  });

  test("an export whose references are missing is refused by Ferry with the missing path named", () => {
    const vec = (JSON.parse(fs.readFileSync(join(nixVectorsDir, "export.json"), "utf8")).vectors as { store_path: string; export_base64: string; references: string[] }[])
      .find((v) => v.references.some((r) => r !== v.store_path))!;
    const r = ferryRun(["store", "import", ...nixStoreFlags(join(dir, "ferry-missing"))], Buffer.from(vec.export_base64, "base64"));
    assert.equal(r.status, 1);
    assert.match(r.stderr, /FERRY_STORE_MISSING_REFERENCE/);
    assert.match(r.stderr, /which is not valid/);
  });
});


/**
 * A wide tree for the walker thread: 40 directories of 60 entries (files of varied sizes, some
 * executable, some with names that are not UTF-8, symlinks), then `zz` with files whose sizes
 * straddle the walker's 128 KiB content pieces.
 */
function writeWideTree(root: string, seed: number): void {
  const rnd = prng(seed);
  for (let d = 0; d < 40; d++) {
    const sub = join(root, `d${String(d).padStart(3, "0")}`);
    fs.mkdirSync(sub, { recursive: true });
    for (let f = 0; f < 60; f++) {
      const r = rnd();
      if (r < 0.08) {
        fs.symlinkSync(r < 0.04 ? "../d000/f000" : `missing-${f}`, join(sub, `l${f}`));
        continue;
      }
      const size = r < 0.15 ? 0 : r < 0.97 ? Math.floor(rnd() * 6000) : Math.floor(rnd() * 400_000);
      const data = Buffer.alloc(size);
      for (let i = 0; i < size; i += 1024) data[i] = Math.floor(rnd() * 256);
      const name = f % 17 === 5 ? Buffer.concat([Buffer.from(sub + "/f"), Buffer.from([0xff, 0xfe, 0x80 + (f % 64)])]) : join(sub, `f${String(f).padStart(3, "0")}`);
      fs.writeFileSync(name, data);
      if (rnd() < 0.1) fs.chmodSync(name, 0o755);
    }
  }
  const zz = join(root, "zz");
  fs.mkdirSync(zz);
  const PIECE = 128 << 10;
  for (const size of [0, 1, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 5, (1 << 20) + 3]) {
    const data = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4093) data[i] = (i >> 12) & 0xff;
    fs.writeFileSync(join(zz, `size-${size}`), data, { mode: size % 2 ? 0o755 : 0o644 });
  }
}

function collect(src: string): Buffer[] {
  const chunks: Buffer[] = [];
  dumpPath(src, (c) => chunks.push(Buffer.from(c)));
  return chunks;
}

function spawnDump(src: string): Buffer {
  const r = spawnSync("nix-store", ["--dump", src], { env: nixEnv(), maxBuffer: 1 << 30 });
  if (r.status !== 0) throw new Error(r.stderr.toString());
  return r.stdout;
}

function ferryDump(src: string): Buffer {
  return ferryRaw(["nar", "dump", src]);
}

function ferryExport(root: string, paths: string[]): Buffer {
  return ferryRaw(["store", "export", ...nixStoreFlags(root), ...paths]);
}

function ferryRaw(args: string[], input?: Uint8Array): Buffer {
  const r = spawnSync(process.execPath, [ferryBin, ...args], { input, maxBuffer: 1 << 30 });
  if (r.status !== 0) throw new Error(`ferry ${args.join(" ")}: ${r.stderr.toString()}`);
  return r.stdout;
}

function ferryRun(args: string[], input?: Uint8Array): { status: number | null; stderr: string } {
  const r = spawnSync(process.execPath, [ferryBin, ...args], { input, maxBuffer: 1 << 30 });
  return { status: r.status, stderr: r.stderr.toString() };
}

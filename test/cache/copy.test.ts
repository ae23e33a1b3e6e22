/**
 * `ferry copy` and the cache substituter against directory caches and a loopback HTTP server:
 * closures round-trip, signatures are required and checked, corrupt NARs are refused and the
 * next cache is tried, dropped downloads resume with Range, and `ferry build` substitutes.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { LocalStore } from "../../src/store/local-store.js";
import { resolveStoreLocation } from "../../src/store/config.js";
import { generateSecretKey, publicKeyOf, printPublicKey, printSecretKey, type SecretKey } from "../../src/core/signing.js";
import { FileBackend } from "../../src/cache/file-backend.js";
import { BinaryCache } from "../../src/cache/binary-cache.js";
import { CacheSubstituter } from "../../src/cache/substituter.js";
import { copyToCache } from "../../src/cache/upload.js";
import { copyToCacheOffThread } from "../../src/cache/upload-thread.js";
import { parseNarInfo, printNarInfo } from "../../src/core/narinfo.js";
import { tempDir } from "../helpers/fs-trees.js";
import { addObject } from "../helpers/store-objects.js";
import { ferry, ferryOk } from "../helpers/cli.js";
import { startFlakyServer } from "../helpers/flaky-http.js";
import { startS3Server } from "../helpers/s3-server.js";
import * as http from "node:http";
import Database from "better-sqlite3";
import { startCacheServer } from "../../src/cache/server.js";
import { openBackend } from "../../src/cache/open.js";
import { packNar } from "../../src/cache/pack.js";
import { SyncZstdDecompressor } from "../../src/cache/compression.js";
import { UploadEmitter } from "../../src/cache/upload.js";
import { narKey } from "../../src/core/cache-layout.js";
import { printHash } from "../../src/core/hash.js";

const STORE_DIR = "/ferry/store";
const open = (root: string) => LocalStore.open(resolveStoreLocation({ storeDir: STORE_DIR, stateDir: "/ferry/var", root }, {}));
const storeFlags = (root: string) => ["--store-dir", STORE_DIR, "--state-dir", "/ferry/var", "--root", root];

describe("binary cache client", () => {
  let dir: string;
  let key: SecretKey;
  let otherKey: SecretKey;
  let src: LocalStore;
  let closure: { base: string; mid: string; top: string };

  before(() => {
    dir = tempDir("ferry-copy-");
    key = generateSecretKey("cache.test-1");
    otherKey = generateSecretKey("other.test-1");
    fs.writeFileSync(join(dir, "sk"), printSecretKey(key));
    src = open(join(dir, "src"));
    const base = addObject(src, "base", { "lib.so": Buffer.alloc(300_000, 7), "readme": "base" });
    const mid = addObject(src, "mid", { bin: "mid uses @REFS@" }, [base]);
    const top = addObject(src, "top", { bin: "top uses @REFS@", big: Buffer.from(Array.from({ length: 200_000 }, (_, i) => (i * 7919) % 251)) }, [mid, base]);
    closure = { base, mid, top };
  });
  after(() => {
    src.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const trusted = (k: SecretKey) => [publicKeyOf(k)];

  test("a closure goes to a directory cache and comes back byte-exact, signed, references first", async () => {
    const cacheDir = join(dir, "c1");
    const be = FileBackend.open(cacheDir);
    const res = await copyToCache(src, be, [closure.top], { secretKey: key });
    assert.deepEqual(res.map((r) => r.status), ["ok", "ok", "ok"]);
    assert.ok(res.every((r) => r.status === "ok" && r.value.uploaded));
    // narinfos name the NAR by its file hash and carry the signature
    const ni = parseNarInfo(STORE_DIR, fs.readFileSync(join(cacheDir, `${closure.top.slice(STORE_DIR.length + 1, STORE_DIR.length + 33)}.narinfo`), "utf8"));
    assert.equal(ni.compression, "zstd");
    assert.match(ni.url, /^nar\/[0-9a-z]{52}\.nar\.zst$/);
    assert.ok(fs.existsSync(join(cacheDir, ni.url)));
    assert.equal(ni.sigs.length, 1);
    assert.deepEqual(ni.references, [closure.base, closure.mid].sort());
    // a second copy uploads nothing
    const again = await copyToCache(src, be, [closure.top], { secretKey: key });
    assert.ok(again.every((r) => r.status === "ok" && !r.value.uploaded));

    const dst = open(join(dir, "d1"));
    try {
      const cache = await BinaryCache.open(`file://${cacheDir}`, { storeDir: STORE_DIR });
      const sub = new CacheSubstituter(dst, [cache], { trustedKeys: trusted(key) });
      const out = await sub.substituteClosure([closure.top]);
      assert.deepEqual(out.filter((o) => o.status !== "ok"), []);
      assert.equal(out.length, 3);
      for (const p of Object.values(closure)) {
        assert.ok(dst.isValid(p));
        assert.deepEqual(dst.queryPathInfo(p)!.references, src.queryPathInfo(p)!.references);
        assert.equal(dst.queryPathInfo(p)!.ultimate, false);
      }
      assert.deepEqual(dst.verify().filter((v) => v.status !== "ok"), []);
      assert.equal(fs.readFileSync(join(dst.realPathOf(closure.top), "big")).length, 200_000);
      await sub.close();
    } finally {
      dst.close();
    }
  });

  test("a directory cache gets a closure staged: each narinfo published in a round after its references', identical NARs shared, a failed stage leaves nothing", async () => {
    const root = join(dir, "s-staged");
    const s = open(root);
    try {
      // A diamond and a chain, with two objects whose NARs are identical (one NAR file for both).
      const leaf = addObject(s, "leaf", { f: "leaf" });
      const same1 = addObject(s, "same", { f: "same" });
      const same2 = addObject(s, "same", { f: "same" });
      const left = addObject(s, "left", { f: "left @REFS@" }, [leaf, same1]);
      const right = addObject(s, "right", { f: "right @REFS@" }, [leaf, same2]);
      const top = addObject(s, "top", { f: "top @REFS@" }, [left, right]);
      const cacheDir = join(dir, "c-staged");
      const be = FileBackend.open(cacheDir);
      const rounds: string[][] = [];
      const stage = be.stage.bind(be);
      be.stage = async (items) => {
        const staged = await stage(items);
        return { ...staged, publish: async (keys) => (rounds.push([...keys]), staged.publish(keys)) };
      };
      const res = await copyToCache(s, be, [top], { secretKey: key });
      assert.deepEqual(res.filter((r) => r.status !== "ok"), []);
      assert.equal(res.length, 6);
      const roundOf = (p: string) => rounds.findIndex((keys) => keys.includes(`${p.slice(STORE_DIR.length + 1, STORE_DIR.length + 33)}.narinfo`));
      for (const p of [leaf, same1, same2, left, right, top]) {
        for (const r of s.queryPathInfo(p)!.references) assert.ok(roundOf(r) < roundOf(p), `${r} is published before ${p}`);
      }
      assert.deepEqual([leaf, left, top].map(roundOf).map((r) => r - roundOf(leaf)), [0, 1, 2], "one round per level, not one per path");
      const narUrl = (p: string) => parseNarInfo(STORE_DIR, fs.readFileSync(join(cacheDir, `${p.slice(STORE_DIR.length + 1, STORE_DIR.length + 33)}.narinfo`), "utf8")).url;
      assert.equal(narUrl(same1), narUrl(same2));
      assert.deepEqual(fs.readdirSync(join(cacheDir, ".ferry-tmp")), [], "nothing staged is left");
      // What a process that died left is removed when the cache is next opened; a live writer's file is not.
      fs.writeFileSync(join(cacheDir, ".ferry-tmp", "dead-writer"), "x");
      fs.utimesSync(join(cacheDir, ".ferry-tmp", "dead-writer"), new Date(Date.now() - 2 * 86400_000), new Date(Date.now() - 2 * 86400_000));
      fs.writeFileSync(join(cacheDir, ".ferry-tmp", "live-writer"), "x");
      FileBackend.open(cacheDir);
      assert.deepEqual(fs.readdirSync(join(cacheDir, ".ferry-tmp")), ["live-writer"]);
      fs.rmSync(join(cacheDir, ".ferry-tmp", "live-writer"));
      const dst = open(join(dir, "d-staged"));
      try {
        const sub = new CacheSubstituter(dst, [await BinaryCache.open(`file://${cacheDir}`, { storeDir: STORE_DIR })], { trustedKeys: trusted(key) });
        assert.deepEqual((await sub.substituteClosure([top])).filter((o) => o.status !== "ok"), []);
        await sub.close();
      } finally {
        dst.close();
      }
      // Directories removed behind the backend's back (it remembers making them) are made again.
      const reused = FileBackend.open(join(dir, "c-staged-vanish"));
      assert.deepEqual((await copyToCache(s, reused, [left])).filter((r) => r.status !== "ok"), []);
      fs.rmSync(join(dir, "c-staged-vanish", "nar"), { recursive: true });
      fs.rmSync(join(dir, "c-staged-vanish", ".ferry-tmp"), { recursive: true });
      const again = await copyToCache(s, reused, [right]);
      assert.deepEqual(again.filter((r) => r.status !== "ok"), []);
      assert.ok(again.some((r) => r.status === "ok" && r.value.uploaded));
      // A cache whose staging area cannot be made: every path fails with the cache's error, no narinfo appears.
      const broken = join(dir, "c-staged-broken");
      fs.mkdirSync(broken);
      const be2 = FileBackend.open(broken);
      fs.rmSync(join(broken, ".ferry-tmp"), { recursive: true });
      fs.writeFileSync(join(broken, ".ferry-tmp"), "not a directory");
      fs.copyFileSync(join(cacheDir, "nix-cache-info"), join(broken, "nix-cache-info"));
      const failed = await copyToCache(s, be2, [top]);
      assert.deepEqual(new Set(failed.map((r) => r.status === "error" && r.error.code)), new Set(["FERRY_CACHE_IO"]));
      assert.deepEqual(fs.readdirSync(broken).filter((f) => f.endsWith(".narinfo")), []);
    } finally {
      s.close();
    }
  });

  test("a copy on a thread of its own: the same cache contents, a summary with each failure and its code, and a cache that cannot be opened rejects", async () => {
    // A directory whose name a URL must escape (the farm passes its cache as a file: URL).
    const cacheDir = join(dir, "c-thread #1 50%");
    const sum = await copyToCacheOffThread(src.loc, { url: pathToFileURL(cacheDir).href }, [closure.top], { secretKey: key });
    assert.deepEqual({ paths: sum.paths, uploaded: sum.uploaded, failures: sum.failures.length }, { paths: 3, uploaded: 3, failures: 0 });
    assert.ok(fs.existsSync(join(cacheDir, `${closure.top.slice(STORE_DIR.length + 1, STORE_DIR.length + 33)}.narinfo`)), "written where the URL points");
    const cache = await BinaryCache.open(cacheDir, { storeDir: STORE_DIR });
    const dst = open(join(dir, "d-thread"));
    try {
      const sub = new CacheSubstituter(dst, [cache], { trustedKeys: trusted(key) });
      assert.deepEqual((await sub.substituteClosure([closure.top])).filter((o) => o.status !== "ok"), [], "signed by the key given to the thread");
      await sub.close();
    } finally {
      dst.close();
    }
    // A path changed on disk fails with its code; the path that references it is not published.
    const root = join(dir, "s-thread");
    const s = open(root);
    try {
      const a = addObject(s, "a", { f: "a" });
      const b = addObject(s, "b", { f: "b uses @REFS@" }, [a]);
      const file = join(s.realPathOf(a), "f");
      fs.chmodSync(s.realPathOf(a), 0o755);
      fs.chmodSync(file, 0o644);
      fs.writeFileSync(file, "A");
      const bad = await copyToCacheOffThread(s.loc, { url: join(dir, "c-thread-bad") }, [b]);
      assert.deepEqual({ paths: bad.paths, uploaded: bad.uploaded }, { paths: 2, uploaded: 0 });
      assert.deepEqual(bad.failures.map((f) => [f.path, f.error.code]), [[a, "FERRY_STORE_CORRUPT"], [b, "FERRY_CACHE_REFERENCE_FAILED"]]);
      assert.ok(!fs.existsSync(join(dir, "c-thread-bad", `${b.slice(STORE_DIR.length + 1, STORE_DIR.length + 33)}.narinfo`)));
    } finally {
      s.close();
    }
    await assert.rejects(copyToCacheOffThread(src.loc, { url: "ftp://nowhere" }, [closure.top]), (e: unknown) => (e as { code?: string }).code === "FERRY_CACHE_BAD_URL");
  });

  test("a reference cycle (a database corrupted by hand) does not hang a copy: each path is uploaded once", async () => {
    const root = join(dir, "cyclic");
    const s = open(root);
    try {
      const a = addObject(s, "cyc-a", { f: "a" });
      const b = addObject(s, "cyc-b", { f: "b @REFS@" }, [a]);
      // b refers to a; make a refer to b as well, which no registration can do.
      const db = new Database(join(root, "ferry/var/db/db.sqlite"));
      try {
        db.prepare("INSERT INTO Refs (referrer, reference) SELECT x.id, y.id FROM ValidPaths x, ValidPaths y WHERE x.path = ? AND y.path = ?").run(a, b);
      } finally {
        db.close();
      }
      assert.deepEqual(s.queryPathInfo(a)!.references, [b]);
      const res = await copyToCache(s, FileBackend.open(join(dir, "c-cyclic")), [a], { secretKey: key });
      assert.deepEqual(res.map((r) => r.status).sort(), ["ok", "ok"]);
    } finally {
      s.close();
    }
  });

  test("the same round trip through an S3 bucket (ferry copy --to s3:// and --from s3://)", async () => {
    const s3 = await startS3Server({ buckets: ["copies"] });
    try {
      const url = s3.url("copies", "team/cache");
      const res = ferry(["copy", "--to", url, "--secret-key", join(dir, "sk"), ...storeFlags(join(dir, "src")), closure.top], { env: s3.env });
      assert.equal(res.status, 0, res.stderr);
      // cache GC on the bucket: a pinned closure stays, an unpinned path goes, NARs after narinfos
      const stray = addObject(src, "stray", { f: "nobody needs me" });
      ferryOk(["copy", "--to", url, ...storeFlags(join(dir, "src")), stray], { env: s3.env });
      ferryOk(["cache", "pin", "--s3", url, "--store-dir", STORE_DIR, "release-1", closure.top], { env: s3.env });
      const gc = ferry(["cache", "gc", "--s3", url, "--keep-recent", "0", "--grace", "0"], { env: s3.env });
      assert.equal(gc.status, 0, gc.stderr);
      const deleted = gc.stdout.toString().trim().split("\n");
      assert.equal(deleted.length, 2);
      assert.match(deleted[0]!, new RegExp(`^${stray.slice(STORE_DIR.length + 1, STORE_DIR.length + 33)}\\.narinfo$`));
      assert.match(deleted[1]!, /^nar\//);

      const dst = open(join(dir, "d-s3"));
      try {
        const sub = new CacheSubstituter(dst, [await BinaryCache.open(url, { storeDir: STORE_DIR })], { trustedKeys: trusted(key) });
        const out = await sub.substituteClosure([closure.top]);
        assert.deepEqual(out.filter((o) => o.status !== "ok"), []);
        assert.equal(out.length, 3);
        assert.deepEqual(dst.verify().filter((v) => v.status !== "ok"), []);
        const gone = await sub.substituteClosure([stray]);
        assert.equal(gone[0]!.status, "error");
        await sub.close();
      } finally {
        dst.close();
      }
    } finally {
      await s3.stop();
    }
  });

  test("every compression round-trips (zstd, xz, bzip2, br, none)", async () => {
    for (const compression of ["xz", "bzip2", "br", "none"] as const) {
      const cacheDir = join(dir, `comp-${compression}`);
      const res = await copyToCache(src, FileBackend.open(cacheDir), [closure.mid], { secretKey: key, compression });
      assert.ok(res.every((r) => r.status === "ok"), compression);
      const dst = open(join(dir, `dcomp-${compression}`));
      try {
        const sub = new CacheSubstituter(dst, [await BinaryCache.open(cacheDir, { storeDir: STORE_DIR })], { trustedKeys: trusted(key) });
        const out = await sub.substituteClosure([closure.mid]);
        assert.deepEqual(out.filter((o) => o.status !== "ok").map((o) => o.status === "error" && o.error.message), [], compression);
        assert.ok(dst.isValid(closure.mid) && dst.isValid(closure.base));
        await sub.close();
      } finally {
        dst.close();
      }
    }
  });

  test("zstd packing reuses its compression contexts, small NARs are packed in memory, and a tree that no longer has the recorded NAR size is refused as corrupt", async () => {
    const unpack = (bytes: Uint8Array) => {
      const z = new SyncZstdDecompressor();
      z.reset();
      const parts: Uint8Array[] = [];
      z.push(bytes, (c) => parts.push(Uint8Array.from(c)));
      z.end();
      return Buffer.concat(parts);
    };
    for (const path of [closure.mid, closure.top]) {
      const info = src.requirePathInfo(path);
      const small = info.narSize <= 64 << 10;
      // Packed many times in a row (contexts come back to the pool): the same bytes each time, and they decompress to the NAR.
      const packs = [];
      for (let i = 0; i < 4; i++) packs.push(await packNar(src.realPathOf(path), "zstd", dir, info.narSize));
      assert.equal(new Set(packs.map((f) => printHash(f.fileHash, "nix32"))).size, 1);
      assert.ok(packs.every((f) => (small ? f.file === undefined && f.bytes?.length === f.fileSize : f.file !== undefined && f.bytes === undefined)), `${path}: in memory only when small`);
      const plain = await packNar(src.realPathOf(path), "none", dir);
      assert.ok(plain.file !== undefined, "without a recorded size, in a file");
      assert.deepEqual(unpack(packs[0]!.bytes ?? fs.readFileSync(packs[0]!.file!)), fs.readFileSync(plain.file), "zstd output decompresses to the NAR");
      if (small) assert.deepEqual(Buffer.from((await packNar(src.realPathOf(path), "none", dir, info.narSize)).bytes!), fs.readFileSync(plain.file));
      for (const f of [...packs, plain]) if (f.file) fs.rmSync(f.file);
      // A recorded size that is not the tree's: refused, with the store's code, and the pooled context is not left mid-frame.
      for (const wrong of [info.narSize + 8, info.narSize - 8]) {
        await assert.rejects(packNar(src.realPathOf(path), "zstd", dir, wrong), (e: unknown) => (e as { code?: string }).code === "FERRY_STORE_CORRUPT");
      }
      const after = await packNar(src.realPathOf(path), "zstd", dir, info.narSize);
      assert.equal(printHash(after.fileHash, "nix32"), printHash(packs[0]!.fileHash, "nix32"));
      if (after.file) fs.rmSync(after.file);
    }
    assert.ok(src.requirePathInfo(closure.mid).narSize <= 64 << 10 && src.requirePathInfo(closure.top).narSize > 64 << 10, "one small and one large NAR");
  });

  test("an untrusted or missing signature is refused, naming the keys; nothing is registered", async () => {
    const cacheDir = join(dir, "c-untrusted");
    await copyToCache(src, FileBackend.open(cacheDir), [closure.mid], { secretKey: otherKey });
    const dst = open(join(dir, "d-untrusted"));
    try {
      const sub = new CacheSubstituter(dst, [await BinaryCache.open(cacheDir, { storeDir: STORE_DIR })], { trustedKeys: trusted(key) });
      const out = await sub.substituteClosure([closure.mid]);
      const err = out.find((o) => o.path === closure.mid);
      assert.ok(err && err.status === "error");
      assert.equal(err.error.code, "FERRY_SUBSTITUTE_UNAVAILABLE");
      assert.match(err.error.message, /signed by other\.test-1/);
      assert.match(err.error.message, /trusted keys: cache\.test-1/);
      assert.equal(dst.isValid(closure.mid), false);
      assert.equal(dst.allValidPaths().length, 0);
      assert.equal(await sub.has([closure.mid]).then((s) => s.size), 0);
      await sub.close();
      // the CLI says the same, with exit status 1
      const r = ferry(["copy", "--from", cacheDir, "--trusted-public-keys", printPublicKey(key), ...storeFlags(join(dir, "d-untrusted-cli")), closure.mid]);
      assert.equal(r.status, 1);
      assert.match(r.stderr, /FERRY_SUBSTITUTE_UNAVAILABLE.*other\.test-1/);
    } finally {
      dst.close();
    }
  });

  test("a NAR whose hash differs from its narinfo is refused and the next cache is used", async () => {
    const bad = join(dir, "c-bad");
    const good = join(dir, "c-good");
    await copyToCache(src, FileBackend.open(bad), [closure.mid], { secretKey: key, compression: "none" });
    await copyToCache(src, FileBackend.open(good), [closure.mid], { secretKey: key });
    // corrupt one byte of base's NAR in the preferred cache, keeping its size
    const hp = closure.base.slice(STORE_DIR.length + 1, STORE_DIR.length + 33);
    const ni = parseNarInfo(STORE_DIR, fs.readFileSync(join(bad, `${hp}.narinfo`), "utf8"));
    const narFile = join(bad, ni.url);
    const bytes = fs.readFileSync(narFile);
    const mid = Math.floor(bytes.length / 2);
    bytes[mid] = bytes[mid]! ^ 0xff;
    fs.writeFileSync(narFile, bytes);
    const dst = open(join(dir, "d-bad"));
    try {
      const rejected: string[] = [];
      const { SubstituteEmitter } = await import("../../src/cache/substituter.js");
      const events = new SubstituteEmitter();
      events.on("path:rejected", (e) => rejected.push(`${e.cache} ${e.reason}`));
      const caches = [await BinaryCache.open(`${bad}?priority=10`, { storeDir: STORE_DIR }), await BinaryCache.open(`${good}?priority=20`, { storeDir: STORE_DIR })];
      const sub = new CacheSubstituter(dst, caches, { trustedKeys: trusted(key), events });
      const out = await sub.substituteClosure([closure.mid]);
      assert.deepEqual(out.filter((o) => o.status !== "ok"), []);
      assert.ok(dst.isValid(closure.base));
      assert.equal(rejected.length, 1);
      assert.match(rejected[0]!, /c-bad.*hashes to/);
      assert.deepEqual(dst.verify().filter((v) => v.status !== "ok"), []);
      await sub.close();

      // with only the bad cache: refused, base not registered, and mid not either (its reference is missing)
      const dst2 = open(join(dir, "d-bad2"));
      const sub2 = new CacheSubstituter(dst2, [await BinaryCache.open(bad, { storeDir: STORE_DIR })], { trustedKeys: trusted(key) });
      const out2 = await sub2.substituteClosure([closure.mid]);
      const byPath = new Map(out2.map((o) => [o.path, o]));
      assert.equal(byPath.get(closure.base)!.status === "error" && byPath.get(closure.base)!.status, "error");
      const midOutcome = byPath.get(closure.mid)!;
      assert.ok(midOutcome.status === "error" && midOutcome.error.code === "FERRY_SUBSTITUTE_REFERENCE_MISSING");
      assert.equal(dst2.allValidPaths().length, 0);
      // no temporary leftovers in the store dir
      assert.deepEqual(fs.readdirSync(dst2.realStoreDir).filter((n) => n.startsWith(".ferry-tmp")), []);
      await sub2.close();
      dst2.close();
    } finally {
      dst.close();
    }
  });

  test("a large closure is fetched by worker threads; a corrupt NAR among them fails over", async () => {
    const chain: string[] = [];
    for (let i = 0; i < 24; i++) chain.push(addObject(src, `chain-${i}`, { data: `object ${i} `.repeat(500 + i), ...(i % 5 === 0 ? { blob: Buffer.alloc(70_000, i) } : {}) }, chain.slice(-2)));
    const head = chain[chain.length - 1]!;
    const bad = join(dir, "c-many-bad");
    const good = join(dir, "c-many-good");
    await copyToCache(src, FileBackend.open(bad), [head], { secretKey: key });
    await copyToCache(src, FileBackend.open(good), [head], { secretKey: key, compression: "xz" });
    const victim = chain[15]!;
    const ni = parseNarInfo(STORE_DIR, fs.readFileSync(join(bad, `${victim.slice(STORE_DIR.length + 1, STORE_DIR.length + 33)}.narinfo`), "utf8"));
    fs.writeFileSync(join(bad, ni.url), Buffer.from("not zstd at all"));
    const dst = open(join(dir, "d-many"));
    try {
      const { SubstituteEmitter } = await import("../../src/cache/substituter.js");
      const events = new SubstituteEmitter();
      const rejected: string[] = [];
      events.on("path:rejected", (e) => rejected.push(e.path));
      const caches = [await BinaryCache.open(`${bad}?priority=1`, { storeDir: STORE_DIR }), await BinaryCache.open(`${good}?priority=2`, { storeDir: STORE_DIR })];
      const sub = new CacheSubstituter(dst, caches, { trustedKeys: trusted(key), workers: 2, events });
      const out = await sub.substituteClosure([head]);
      assert.deepEqual(out.filter((o) => o.status !== "ok").map((o) => o.status === "error" && o.error.message), []);
      assert.equal(out.length, 24);
      assert.deepEqual(rejected, [victim]);
      assert.deepEqual(dst.verify().filter((v) => v.status !== "ok"), []);
      await sub.close();
    } finally {
      dst.close();
    }
  });

  test("a narinfo whose NarSize is wrong, or that is malformed, is refused", async () => {
    const c = join(dir, "c-size");
    await copyToCache(src, FileBackend.open(c), [closure.base], { secretKey: key });
    const hp = closure.base.slice(STORE_DIR.length + 1, STORE_DIR.length + 33);
    const file = join(c, `${hp}.narinfo`);
    const ni = parseNarInfo(STORE_DIR, fs.readFileSync(file, "utf8"));
    fs.writeFileSync(file, printNarInfo(STORE_DIR, { ...ni, narSize: ni.narSize - 8 }));
    const dst = open(join(dir, "d-size"));
    try {
      const sub = new CacheSubstituter(dst, [await BinaryCache.open(c, { storeDir: STORE_DIR })], { trustedKeys: trusted(key), requireSigs: false });
      const out = await sub.substituteClosure([closure.base]);
      assert.ok(out[0]!.status === "error" && /SIZE_MISMATCH|more than/.test(`${out[0]!.error.code} ${out[0]!.error.message}`));
      fs.writeFileSync(file, "StorePath: /ferry/store/nonsense\n");
      const sub2 = new CacheSubstituter(dst, [await BinaryCache.open(c, { storeDir: STORE_DIR })], { trustedKeys: trusted(key) });
      const out2 = await sub2.substituteClosure([closure.base]);
      assert.ok(out2[0]!.status === "error" && /narinfo/.test(out2[0]!.error.message));
      assert.equal(dst.allValidPaths().length, 0);
      await sub.close();
      await sub2.close();
    } finally {
      dst.close();
    }
  });

  test("over HTTP a dropped NAR download resumes with a Range request", async () => {
    const c = join(dir, "c-http");
    await copyToCache(src, FileBackend.open(c), [closure.top], { secretKey: key, compression: "none" });
    const server = await startFlakyServer(c);
    const dst = open(join(dir, "d-http"));
    try {
      server.cutNars(3, 50_000);
      const sub = new CacheSubstituter(dst, [await BinaryCache.open(server.url, { storeDir: STORE_DIR })], { trustedKeys: trusted(key) });
      const out = await sub.substituteClosure([closure.top]);
      assert.deepEqual(out.filter((o) => o.status !== "ok"), []);
      assert.ok(server.log.some((l) => /^GET nar\/.* bytes=50000-$/.test(l)), server.log.join("\n"));
      assert.deepEqual(dst.verify().filter((v) => v.status !== "ok"), []);
      await sub.close();
    } finally {
      dst.close();
      await server.close();
    }
  });

  test("over HTTP an interrupted NAR upload resumes at the server's offset; the server signs", async () => {
    const root = join(dir, "c-upload");
    const serverKey = generateSecretKey("server-1");
    const server = await startCacheServer({ backend: FileBackend.open(root), stagingDir: join(dir, "staging"), uploadToken: "tok", secretKey: serverKey, storeDir: STORE_DIR });
    try {
      // What copy will upload for `top`: the packing is deterministic, so its name is known.
      const packed = await packNar(src.realPathOf(closure.top), "none", dir);
      const key = narKey(printHash(packed.fileHash, "nix32"), "none");
      assert.ok(packed.fileSize > 100_000);
      const body = fs.readFileSync(packed.file!);
      fs.rmSync(packed.file!);
      // a first attempt that died after 60,000 bytes
      const u = new URL(server.url);
      const req = http.request({ host: u.hostname, port: u.port, method: "PUT", path: `/${key}`, headers: { authorization: "Bearer tok", "content-length": body.length, "content-range": `bytes 0-${body.length - 1}/${body.length}` } });
      req.on("error", () => undefined);
      req.write(body.subarray(0, 60_000));
      const partial = join(dir, "staging", `${key.replace("/", "_")}.partial`);
      for (let i = 0; i < 300 && !(fs.existsSync(partial) && fs.statSync(partial).size === 60_000); i++) await new Promise((r) => setTimeout(r, 10));
      req.destroy();
      await new Promise((r) => setTimeout(r, 50));

      const events = new UploadEmitter();
      const resumed: number[] = [];
      events.on("upload:resumed", (e) => resumed.push(e.offset));
      const backend = await openBackend(server.url, { token: "tok" });
      const res = await copyToCache(src, backend, [closure.top], { events, compression: "none" });
      await backend.close();
      assert.deepEqual(res.filter((r) => r.status !== "ok"), []);
      assert.deepEqual(resumed, [60_000]);
      assert.ok(fs.readFileSync(join(root, key)).equals(body));
      // the server signed every narinfo; Ferry trusts its key
      const dst = open(join(dir, "d-upload"));
      try {
        const sub = new CacheSubstituter(dst, [await BinaryCache.open(server.url, { storeDir: STORE_DIR })], { trustedKeys: [publicKeyOf(serverKey)] });
        assert.deepEqual((await sub.substituteClosure([closure.top])).filter((o) => o.status !== "ok"), []);
        await sub.close();
      } finally {
        dst.close();
      }
      // without the token the upload is refused with a clear error
      const anon = await openBackend(server.url);
      const denied = await copyToCache(src, anon, [addObject(src, "anon", { f: "x" })]);
      await anon.close();
      assert.ok(denied[0]!.status === "error" && denied[0]!.error.code === "FERRY_CACHE_DENIED");
      assert.match(denied[0]!.error.hint ?? "", /token/);
    } finally {
      await server.close();
    }
  });

  test("ferry store verify --repair restores damaged and missing paths from a cache", async () => {
    const cacheDir = join(dir, "c-repair");
    await copyToCache(src, FileBackend.open(cacheDir), [closure.top], { secretKey: key });
    const root = join(dir, "d-repair");
    const dst = open(root);
    const sub = new CacheSubstituter(dst, [await BinaryCache.open(cacheDir, { storeDir: STORE_DIR })], { trustedKeys: trusted(key) });
    await sub.substituteClosure([closure.top]);
    await sub.close();
    // damage one path's file and delete another path's tree
    const big = join(dst.realPathOf(closure.top), "big");
    fs.chmodSync(dst.realPathOf(closure.top), 0o755);
    fs.chmodSync(big, 0o644);
    fs.writeFileSync(big, "tampered");
    fs.rmSync(dst.realPathOf(closure.base), { recursive: true, force: true });
    dst.close();
    const before = ferry(["store", "verify", ...storeFlags(root)]);
    assert.equal(before.status, 1);
    assert.match(before.stderr, /3 paths checked, 2 damaged/);
    const r = ferry(["store", "verify", "--repair", "--substituters", `file://${cacheDir}`, "--trusted-public-keys", printPublicKey(key), ...storeFlags(root)]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stderr, /2 of 2 damaged paths repaired/);
    const after = ferry(["store", "verify", ...storeFlags(root)]);
    assert.equal(after.status, 0, after.stderr);
    assert.match(after.stderr, /3 paths checked, 0 damaged/);
  });

  test("a miss is believed only briefly: a path uploaded after a lookup is found", async () => {
    const c = join(dir, "c-neg");
    FileBackend.open(c);
    const cache = await BinaryCache.open(c, { storeDir: STORE_DIR, negativeTtlMs: 50 });
    assert.equal(await cache.narInfo(closure.base), undefined);
    await copyToCache(src, FileBackend.open(c), [closure.base], { secretKey: key });
    await new Promise((r) => setTimeout(r, 80));
    assert.ok(await cache.narInfo(closure.base));
    await cache.close();
  });

  test("a cache for another store dir is refused", async () => {
    const c = join(dir, "c-other");
    fs.mkdirSync(c);
    fs.writeFileSync(join(c, "nix-cache-info"), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n");
    await assert.rejects(BinaryCache.open(c, { storeDir: STORE_DIR }), { code: "FERRY_CACHE_STORE_DIR_MISMATCH" });
  });

  test("ferry copy --to and --from on the command line", () => {
    const c = join(dir, "c-cli");
    const root = join(dir, "src");
    src.close();
    try {
      ferryOk(["copy", "--to", `file://${c}`, "--secret-key", join(dir, "sk"), ...storeFlags(root), closure.top]);
      const outText = ferryOk(["copy", "--from", `file://${c}`, "--trusted-public-keys", printPublicKey(key), "--json", ...storeFlags(join(dir, "d-cli")), closure.top]);
      const parsed = JSON.parse(outText) as { results: { status: string; path: string }[] };
      assert.equal(parsed.results.filter((r) => r.status === "ok").length, 3);
      const usage = ferry(["copy", ...storeFlags(root), closure.top]);
      assert.equal(usage.status, 1);
      assert.match(usage.stderr, /exactly one of --to URL and --from URL/);
      const badUrl = ferry(["copy", "--to", "ftp://x", ...storeFlags(root), closure.top]);
      assert.match(badUrl.stderr, /FERRY_CACHE_BAD_URL/);
    } finally {
      src = open(root);
    }
  });
});

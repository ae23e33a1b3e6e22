import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import Database from "better-sqlite3";
import { LocalStore } from "../../src/store/local-store.js";
import { resolveStoreLocation } from "../../src/store/config.js";
import { printHash } from "../../src/core/hash.js";
import { generateSecretKey, publicKeyOf, verifySignature } from "../../src/core/signing.js";
import { hashPath } from "../../src/store/nar-dump.js";
import { isFerryError } from "../../src/core/errors.js";
import { tempDir, writeRandomTree } from "../helpers/fs-trees.js";

function openStore(root: string): LocalStore {
  return LocalStore.open(resolveStoreLocation({ storeDir: "/ferry/store", stateDir: "/ferry/var", root }, {}));
}

async function* chunksOf(parts: Uint8Array[], size = 7): AsyncGenerator<Uint8Array> {
  const all = Buffer.concat(parts);
  for (let i = 0; i < all.length; i += size) yield all.subarray(i, i + size);
}

function storeEntries(s: LocalStore): string[] {
  return fs.readdirSync(s.realStoreDir).sort();
}

describe("local store", () => {
  let dir: string;
  let store: LocalStore;
  before(() => {
    dir = tempDir();
    store = openStore(join(dir, "root"));
  });
  after(() => {
    store.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("adding a tree registers it read-only with its NAR hash; adding again is a no-op", () => {
    const src = join(dir, "src1");
    writeRandomTree(src, 11);
    const a = store.addPath(src);
    assert.equal(a.added, true);
    const b = store.addPath(src);
    assert.equal(b.added, false);
    assert.equal(a.path, b.path);
    const info = store.requirePathInfo(a.path);
    assert.deepEqual(info.narHash.digest, hashPath(src).hash.digest);
    assert.equal(info.ca?.kind, "fixed");
    const real = store.realPathOf(a.path);
    assert.deepEqual(hashPath(real).hash.digest, info.narHash.digest, "the stored copy has the same NAR as the source");
    const st = fs.statSync(real);
    assert.equal(st.mode & 0o222, 0, "store objects are not writable");
    assert.equal(Math.floor(st.mtimeMs / 1000), 1, "mtime is normalised to 1");
    assert.ok(!storeEntries(store).some((n) => n.startsWith(".ferry-tmp")), "no temporary copy is left behind");
  });

  test("a dry run computes the same path and writes nothing", () => {
    const src = join(dir, "src-dry");
    writeRandomTree(src, 12);
    const before = storeEntries(store);
    const r = store.addPath(src, { dryRun: true });
    assert.deepEqual(storeEntries(store), before);
    assert.equal(store.isValid(r.path), false);
    assert.equal(store.addPath(src).path, r.path);
  });

  test("invalid names are refused before anything is written", () => {
    const src = join(dir, "src-name");
    fs.writeFileSync(src, "x");
    assert.throws(() => store.addPath(src, { name: "bad name" }), (e) => isFerryError(e, "FERRY_STORE_BAD_NAME"));
    assert.throws(() => store.addPath(src, { name: ".hidden" }), (e) => isFerryError(e, "FERRY_STORE_BAD_NAME"));
  });

  test("text objects carry references; closures and topological order follow them", () => {
    const a = store.addText("a.txt", "leaf");
    const b = store.addText("b.txt", `uses ${a.path}`, [a.path]);
    const c = store.addText("c.txt", `uses ${b.path} and ${a.path}`, [a.path, b.path]);
    assert.deepEqual(store.closure([c.path]), [a.path, b.path, c.path].sort());
    assert.deepEqual(store.topoSort([c.path, a.path, b.path]), [a.path, b.path, c.path]);
    assert.deepEqual(store.referrers(a.path), [b.path, c.path].sort());
    assert.equal(store.requirePathInfo(c.path).ca?.kind, "text");
  });

  test("registering an object whose reference is missing fails and leaves nothing", () => {
    const before = storeEntries(store);
    assert.throws(
      () => store.addText("orphan.txt", "x", ["/ferry/store/00000000000000000000000000000000-missing"]),
      (e) => isFerryError(e, "FERRY_STORE_MISSING_REFERENCE"),
    );
    assert.deepEqual(storeEntries(store), before);
  });

  test("flat and recursive fixed-output adds", () => {
    const f = join(dir, "fixed.bin");
    fs.writeFileSync(f, "fixed contents\n", { mode: 0o755 });
    const flat = store.addFixed(f, { recursive: false, algo: "sha1" });
    const info = store.requirePathInfo(flat.path);
    assert.equal(info.ca?.kind === "fixed" && info.ca.method, "flat");
    assert.equal(fs.statSync(store.realPathOf(flat.path)).mode & 0o111, 0, "flat objects are stored non-executable");
    assert.equal(store.addFixed(f, { recursive: false, algo: "sha1", dryRun: true }).path, flat.path);
    const rec = store.addFixed(f, { recursive: true, algo: "sha256" });
    assert.equal(rec.path, store.addPath(f).path, "recursive sha256 is the same as a plain add");
    assert.throws(() => store.addFixed(dir, { recursive: false, algo: "sha256" }), (e) => isFerryError(e, "FERRY_STORE_NOT_FILE"));
  });

  test("signatures verify against the fingerprint and are kept once", () => {
    const k = generateSecretKey("test-key-1");
    const p = store.addText("signed.txt", "sign me").path;
    store.sign([p], k);
    store.sign([p], k);
    const info = store.requirePathInfo(p);
    assert.equal(info.sigs.length, 1);
    assert.ok(verifySignature([publicKeyOf(k)], store.fingerprint(info), info.sigs[0]!));
    const bad = store.sign(["/ferry/store/00000000000000000000000000000000-nope"], k);
    assert.equal(bad[0]!.status, "error");
  });

  test("export and import between stores keep contents, references and deriver", async () => {
    const src = join(dir, "exp-src");
    writeRandomTree(src, 21, { largeFileChance: 0.2 });
    const tree = store.addPath(src).path;
    const leaf = store.addText("leaf.txt", "leaf").path;
    const top = store.addText("top.txt", `${tree} ${leaf}`, [tree, leaf]).path;
    const parts: Uint8Array[] = [];
    store.exportPaths([top, leaf, tree], (c) => parts.push(new Uint8Array(c)));
    const other = openStore(join(dir, "root2"));
    try {
      const { results, error } = await other.importStream(chunksOf(parts, 4093));
      assert.equal(error, undefined);
      assert.deepEqual(results.map((r) => r.status), ["ok", "ok", "ok"]);
      for (const p of [tree, leaf, top]) {
        const a = store.requirePathInfo(p);
        const b = other.requirePathInfo(p);
        assert.equal(printHash(b.narHash, "sri"), printHash(a.narHash, "sri"));
        assert.deepEqual(b.references, a.references);
      }
      assert.ok(other.verify().every((v) => v.status === "ok"));
      const again: Uint8Array[] = [];
      other.exportPaths([top, leaf, tree], (c) => again.push(new Uint8Array(c)));
      assert.deepEqual(Buffer.concat(again), Buffer.concat(parts), "re-export is byte-identical");
    } finally {
      other.close();
    }
  });

  test("a truncated or corrupt import keeps the objects before the damage and nothing half-done", async () => {
    const a = store.addText("first.txt", "first").path;
    const src = join(dir, "big-exp");
    writeRandomTree(src, 5, { largeFileChance: 0.5 });
    const b = store.addPath(src).path;
    const parts: Uint8Array[] = [];
    store.exportPaths([a, b], (c) => parts.push(new Uint8Array(c)));
    const whole = Buffer.concat(parts);
    for (const cut of [whole.length - 3, Math.floor(whole.length * 0.6)]) {
      const other = openStore(join(dir, `root-trunc-${cut}`));
      try {
        const { results, error } = await other.importStream(chunksOf([whole.subarray(0, cut)], 65536));
        assert.ok(error, "truncation is reported");
        assert.equal(error.code, "FERRY_EXPORT_INVALID");
        assert.deepEqual(other.allValidPaths(), results.filter((r) => r.status === "ok").map((r) => r.path).sort());
        assert.ok(!storeEntries(other).some((n) => n.startsWith(".ferry-tmp")), "no partial object is left");
        assert.ok(other.verify().every((v) => v.status === "ok"));
      } finally {
        other.close();
      }
    }
    // a flipped byte inside the first object's NAR framing
    const corrupt = Buffer.from(whole);
    corrupt[20] = 0x41;
    const other = openStore(join(dir, "root-corrupt"));
    try {
      const { error } = await other.importStream(chunksOf([corrupt]));
      assert.ok(error);
      assert.deepEqual(other.allValidPaths(), []);
    } finally {
      other.close();
    }
  });

  test("importing an object whose references are absent is a per-item error", async () => {
    const leaf = store.addText("leaf2.txt", "leaf2").path;
    const top = store.addText("top2.txt", leaf, [leaf]).path;
    const parts: Uint8Array[] = [];
    store.exportPaths([top], (c) => parts.push(new Uint8Array(c)));
    const other = openStore(join(dir, "root-missing-ref"));
    try {
      const { results, error } = await other.importStream(chunksOf(parts));
      assert.equal(error, undefined);
      assert.equal(results[0]!.status, "error");
      assert.equal(results[0]!.status === "error" && results[0]!.error.code, "FERRY_STORE_MISSING_REFERENCE");
      assert.equal(other.isValid(top), false);
    } finally {
      other.close();
    }
  });

  test("verify finds corrupt and missing paths", () => {
    const s2 = openStore(join(dir, "root-verify"));
    try {
      const f = join(dir, "v.txt");
      fs.writeFileSync(f, "original");
      const p = s2.addPath(f).path;
      const q = s2.addText("gone.txt", "gone").path;
      assert.ok(s2.verify().every((v) => v.status === "ok"));
      const real = s2.realPathOf(p);
      fs.chmodSync(real, 0o644);
      fs.writeFileSync(real, "tampered");
      fs.rmSync(s2.realPathOf(q));
      const byPath = new Map(s2.verify().map((v) => [v.path, v]));
      assert.equal(byPath.get(p)!.status, "corrupt");
      assert.notEqual(byPath.get(p)!.actual, byPath.get(p)!.expected);
      assert.equal(byPath.get(q)!.status, "missing");
    } finally {
      s2.close();
    }
  });

  test("gc keeps rooted closures and deletes the rest, including leftovers of interrupted adds", () => {
    const w = openStore(join(dir, "root-gc"));
    const leaf = w.addText("l.txt", "l").path;
    const kept = w.addText("k.txt", leaf, [leaf]).path;
    const junk = w.addText("j.txt", "junk").path;
    w.addRoot("keep", kept);
    w.close(); // its temp roots go with it
    const s = openStore(join(dir, "root-gc"));
    try {
      fs.mkdirSync(join(s.realStoreDir, ".ferry-tmp-999999999-dead"));
      fs.writeFileSync(join(s.realStoreDir, "00000000000000000000000000000000-unregistered"), "x");
      const dry = s.gc({ dryRun: true });
      assert.deepEqual(dry.deleted, [junk]);
      assert.equal(s.isValid(junk), true, "a dry run deletes nothing");
      const r = s.gc();
      assert.deepEqual(r.deleted, [junk]);
      assert.deepEqual([...r.leftovers].sort(), ["00000000000000000000000000000000-unregistered", ".ferry-tmp-999999999-dead"].sort());
      assert.equal(s.isValid(junk), false);
      assert.equal(fs.existsSync(s.realPathOf(junk)), false);
      assert.ok(s.isValid(kept) && s.isValid(leaf));
      assert.deepEqual(storeEntries(s), [kept, leaf].map((p) => p.slice("/ferry/store/".length)).sort());
      s.removeRoot("keep");
      assert.deepEqual([...s.gc().deleted].sort(), [kept, leaf].sort());
    } finally {
      s.close();
    }
  });

  test("a live process's temp roots protect the paths it is using", () => {
    const s = openStore(join(dir, "root-temproot"));
    try {
      const p = s.addText("t.txt", "temp-rooted").path; // addText registers a temp root for this process
      assert.deepEqual(s.gc().deleted, []);
      assert.ok(s.isValid(p));
    } finally {
      s.close();
    }
    const s2 = openStore(join(dir, "root-temproot"));
    try {
      assert.deepEqual(s2.gc().deleted.length, 1, "once the first handle is closed its temp roots are gone");
    } finally {
      s2.close();
    }
  });

  test("a text found valid while preparing is rooted by it, so a GC before the commit keeps it", () => {
    const root = join(dir, "root-prepare-race");
    const gcer = openStore(root);
    try {
      const bytes = (t: string) => Buffer.from(t);
      const s = openStore(root);
      const first = s.addText("base.txt", "base");
      s.close();
      const s2 = openStore(root);
      let topPath = "";
      try {
        const prepared = s2.prepareTexts([
          { name: "base.txt", bytes: bytes("base"), references: [] },
          { name: "top.txt", bytes: bytes("top"), references: [first.path] },
        ]);
        topPath = prepared.paths[1]!;
        assert.deepEqual(prepared.batch.paths, [topPath], "only top is written; base was valid");
        const top = s2.realPathOf(prepared.paths[1]!);
        assert.equal(fs.readFileSync(top, "utf8"), "top", "top is written in place, invalid until the commit");
        assert.ok(!s2.isValid(prepared.paths[1]!));
        // Both are rooted: a GC between preparing and committing takes neither.
        assert.deepEqual(gcer.gc(), { deleted: [], bytesFreed: 0, roots: [first.path], leftovers: [] });
        const added = s2.commitTexts(prepared);
        assert.deepEqual(added.map((a) => a.added), [false, true]);
        assert.equal(fs.readFileSync(s2.realPathOf(first.path), "utf8"), "base");
        assert.deepEqual(s2.queryPathInfo(added[1]!.path)!.references, [first.path]);
        assert.deepEqual(gcer.gc().deleted, []);
      } finally {
        s2.close();
      }
      assert.deepEqual([...gcer.gc().deleted].sort(), [first.path, topPath].sort(), "once the handle is closed its roots are gone");
    } finally {
      gcer.close();
    }
  });

  test("two writers of the same text: the one that finds the name taken commits its own copy, and the other's abort leaves it", () => {
    const root = join(dir, "root-two-writers");
    const a = openStore(root);
    const b = openStore(root);
    try {
      const item = { name: "same.txt", bytes: Buffer.from("same"), references: [] };
      const pa = a.prepareTexts([item]);
      const pb = b.prepareTexts([item]);
      assert.equal(pa.batch.tmpReals[0], "", "a creates the final name");
      assert.ok(pb.batch.tmpReals[0], "b finds it taken and writes a temporary copy");
      assert.deepEqual(b.commitTexts(pb).map((r) => r.added), [true]);
      a.abortTexts(pa.batch);
      const real = a.realPathOf(pa.paths[0]!);
      assert.equal(fs.readFileSync(real, "utf8"), "same", "a's abort does not unlink a valid path");
      assert.deepEqual(a.commitTexts(a.prepareTexts([item])).map((r) => r.added), [false]);
      assert.deepEqual(fs.readdirSync(a.realPathOf(a.storeDir)).filter((n) => n.startsWith(".ferry-")), []);
    } finally {
      a.close();
      b.close();
    }
  });

  test("an unregistered file under a final name is replaced by the add", () => {
    const s = openStore(join(dir, "root-replace"));
    try {
      const path = s.prepareTexts([{ name: "r.txt", bytes: Buffer.from("right"), references: [] }]);
      s.abortTexts(path.batch);
      const real = s.realPathOf(path.paths[0]!);
      assert.ok(!fs.existsSync(real), "an aborted batch leaves nothing under its final names");
      fs.writeFileSync(real, "wrong leftover");
      const prepared = s.prepareTexts([{ name: "r.txt", bytes: Buffer.from("right"), references: [] }]);
      assert.ok(prepared.batch.tmpReals[0], "the taken name gets a temporary one");
      assert.equal(fs.readFileSync(real, "utf8"), "wrong leftover");
      s.commitTexts(prepared);
      assert.equal(fs.readFileSync(real, "utf8"), "right");
      assert.equal(fs.statSync(real).mode & 0o777, 0o444);
      assert.ok(s.isValid(path.paths[0]!));
    } finally {
      s.close();
    }
  });

  test("a batch of texts skips the valid ones and gives a taken name a temporary copy, whether it creates first or looks up first", () => {
    const s = openStore(join(dir, "root-batches"));
    const other = openStore(join(dir, "root-batches"));
    try {
      const texts = (n: number) => Array.from({ length: n }, (_, i) => ({ name: `b${i}.txt`, bytes: Buffer.from(`batch text ${i}`), references: [] as string[] }));
      other.commitTexts(other.prepareTexts(texts(30)));
      // A leftover (unregistered, wrong) under the name of text 35.
      const p35 = s.prepareTexts(texts(55).slice(35, 36));
      s.abortTexts(p35.batch);
      fs.writeFileSync(s.realPathOf(p35.paths[0]!), "wrong leftover");
      // A new batch (this handle creates first): 30 valid are skipped, the leftover's name is taken.
      const first = s.prepareTexts(texts(55));
      assert.equal(first.batch.paths.length, 25, "only the 25 texts not valid are written");
      assert.deepEqual(first.batch.tmpReals.map((t, j) => (t ? first.batch.paths[j] : "")).filter(Boolean), [p35.paths[0]], "the taken name gets a temporary copy");
      assert.deepEqual(s.commitTexts(first).filter((r) => r.added).length, 25);
      assert.equal(fs.readFileSync(s.realPathOf(p35.paths[0]!), "utf8"), "batch text 35");
      // The batch before was mostly valid: this one looks up first, and writes only the 25 new.
      const second = s.prepareTexts(texts(80));
      assert.deepEqual(second.batch.paths, second.paths.slice(55));
      s.commitTexts(second);
      assert.equal(s.allValidPaths().length, 80);
      assert.deepEqual(s.verify().filter((v) => v.status !== "ok"), []);
      assert.deepEqual(fs.readdirSync(s.realPathOf(s.storeDir)).filter((n) => n.startsWith(".ferry-")), []);
    } finally {
      s.close();
      other.close();
    }
  });

  test("texts written under the paths they claim are checked before they are registered: a false claim is refused and its file removed", () => {
    const s = openStore(join(dir, "root-claims"));
    try {
      const good = { name: "a.drv", bytes: Buffer.from("a"), references: [] as string[] };
      const goodPath = s.prepareTexts([good]).paths[0]!;
      s.abortTexts(s.prepareTexts([good]).batch);
      const claim = (name: string, text: string, expectedPath: string) => ({ name, bytes: Buffer.from(text), references: [] as string[], expectedPath });

      // A true claim: written before it is checked, then committed.
      const items = [claim("a.drv", "a", goodPath)];
      const written = s.writeClaimedTexts(items);
      assert.deepEqual(written.paths, [goodPath]);
      assert.equal(fs.readFileSync(s.realPathOf(goodPath), "utf8"), "a");
      assert.deepEqual(s.commitBatch(s.checkWrittenTexts(items, written)), [true]);
      assert.ok(s.isValid(goodPath));

      // A claim whose content hashes elsewhere: refused when checked, its file gone, nothing registered.
      const forgedPath = `${s.storeDir}/${"0".repeat(31)}a-b.drv`;
      const forged = [claim("b.drv", "b", forgedPath)];
      const w2 = s.writeClaimedTexts(forged);
      assert.ok(fs.existsSync(s.realPathOf(forgedPath)), "written, unchecked and invalid");
      assert.throws(() => s.checkWrittenTexts(forged, w2), (e) => isFerryError(e) && e.code === "FERRY_STORE_PATH_MISMATCH");
      assert.ok(!fs.existsSync(s.realPathOf(forgedPath)));
      assert.ok(!s.isValid(forgedPath));

      // A false claim of a path that is valid already: nothing is written, and the check still refuses it.
      const lie = [claim("a.drv", "not a", goodPath)];
      const w3 = s.writeClaimedTexts(lie);
      assert.deepEqual(w3.paths, []);
      assert.throws(() => s.checkWrittenTexts(lie, w3), (e) => isFerryError(e) && e.code === "FERRY_STORE_PATH_MISMATCH");
      assert.equal(fs.readFileSync(s.realPathOf(goodPath), "utf8"), "a", "the valid path is untouched");

      // A claim that is not a path of this store is refused before anything is written.
      for (const bad of [`${s.storeDir}/../escape.drv`, "/etc/ferry-escape.drv", `${s.storeDir}/${"0".repeat(32)}-x/../../../escape.drv`]) {
        assert.throws(() => s.writeClaimedTexts([claim("x.drv", "x", bad)]), (e) => isFerryError(e) && e.code === "FERRY_STORE_BAD_PATH", bad);
      }
      assert.ok(!fs.existsSync(join(dir, "root-claims", "ferry", "escape.drv")));
      assert.deepEqual(storeEntries(s).filter((n) => n.startsWith(".ferry-")), []);
    } finally {
      s.close();
    }
  });

  test("aborting a batch twice does not remove a file another writer created under the same name meanwhile", () => {
    const root = join(dir, "root-abort-twice");
    const a = openStore(root);
    const b = openStore(root);
    try {
      const item = () => [{ name: "x.drv", bytes: Buffer.from("hello"), references: [] as string[] }];
      const pa = a.prepareTexts(item());
      a.abortTexts(pa.batch);
      const pb = b.prepareTexts(item());
      assert.deepEqual(pb.batch.tmpReals, [""], "b creates the final name, now free");
      a.abortTexts(pa.batch);
      assert.deepEqual(b.commitTexts(pb).map((r) => r.added), [true]);
      assert.equal(fs.readFileSync(b.realPathOf(pb.paths[0]!), "utf8"), "hello", "b's file is still there");
    } finally {
      a.close();
      b.close();
    }
  });

  test("a text whose write fails after its final name was created leaves no partial file under that name", () => {
    // A file-size limit (with SIGXFSZ ignored, so the write fails with EFBIG) cuts the text short.
    const root = join(dir, "root-partial");
    openStore(root).close();
    const script = `
      import { LocalStore } from ${JSON.stringify(new URL("../../src/store/local-store.js", import.meta.url).href)};
      const s = LocalStore.open({ storeDir: "/ferry/store", stateDir: "/ferry/var", root: ${JSON.stringify(root)} });
      try {
        s.prepareTexts(Array.from({ length: 20 }, (_, k) => ({ name: "big" + k + ".drv", bytes: Buffer.alloc(2 << 20, 97 + k), references: [] })));
        console.log("written");
      } catch (e) {
        console.log("refused " + e.code);
      }
      s.close();`;
    const r = spawnSync("bash", ["-c", 'trap "" XFSZ; ulimit -f 1024; exec "$0" --input-type=module -e "$1"', process.execPath, script], { encoding: "utf8" });
    assert.match(r.stdout, /refused EFBIG/, r.stderr);
    const s = openStore(root);
    try {
      assert.deepEqual(storeEntries(s), [], "neither the partial file nor anything else is left");
    } finally {
      s.close();
    }
  });

  test("a new store's database has 16 KiB pages; an existing one keeps the pages it has", () => {
    const pageSize = (root: string) => {
      const db = new Database(join(root, "ferry/var/db/db.sqlite"), { readonly: true });
      try {
        return db.pragma("page_size", { simple: true });
      } finally {
        db.close();
      }
    };
    const fresh = join(dir, "root-pages");
    openStore(fresh).close();
    assert.equal(pageSize(fresh), 16384);
    // A store made with 4 KiB pages (as before) is opened, migrated and used as it is.
    const old = join(dir, "root-old-pages");
    fs.mkdirSync(join(old, "ferry/var/db"), { recursive: true });
    const db = new Database(join(old, "ferry/var/db/db.sqlite"));
    db.pragma("page_size = 4096");
    db.pragma("journal_mode = WAL");
    db.exec("CREATE TABLE Placeholder (x)");
    db.exec("DROP TABLE Placeholder");
    db.close();
    const s = openStore(old);
    try {
      assert.equal(s.addText("a.txt", "a").added, true);
    } finally {
      s.close();
    }
    assert.equal(pageSize(old), 4096);
  });
});

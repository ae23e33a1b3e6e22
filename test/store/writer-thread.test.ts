/** The threads that write an evaluation's plan: batches, backlog and failures. */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, existsSync, rmSync, truncateSync } from "node:fs";
import Database from "better-sqlite3";
import { join } from "node:path";
import { StoreWriterThread, planWriteError } from "../../src/store/writer-thread.js";
import { LocalStore, bootId } from "../../src/store/local-store.js";
import { realPath, resolveStoreLocation, type StoreLocation } from "../../src/store/config.js";
import { encodeTextRecord, maxTextRecordSize, type TextRecordSource } from "../../src/store/text-records.js";
import { textPathOfHex } from "../../src/core/store-path.js";
import { sha256Hex } from "../../src/core/digest.js";
import { isFerryError } from "../../src/core/errors.js";
import { tempDir } from "../helpers/fs-trees.js";

const STORE = "/ferry/store";

/** A batch of `n` text records, true to their claims unless `forge`. */
function batchOf(first: number, n: number, forge = false): Uint8Array {
  const texts: TextRecordSource[] = [];
  for (let i = first; i < first + n; i++) {
    const text = `text ${i}`;
    const storePath = textPathOfHex(STORE, `t${i}.drv`, sha256Hex(forge ? "something else" : text), []);
    texts.push({ storePath, name: `t${i}.drv`, text, references: [] });
  }
  return encodeBatch(texts);
}

/** `texts` as one batch of text records. */
function encodeBatch(texts: readonly TextRecordSource[]): Uint8Array {
  const buf = Buffer.alloc(texts.reduce((n, t) => n + maxTextRecordSize(t), 0));
  let at = 0;
  for (const t of texts) at = encodeTextRecord(buf, at, t);
  return new Uint8Array(buf.buffer, 0, at);
}

/** A new, empty store for one test (removed after it), and its location. */
function newStore(t: TestContext, prefix: string): StoreLocation {
  const dir = tempDir(prefix);
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const loc = resolveStoreLocation({ storeDir: STORE, stateDir: "/ferry/var", root: join(dir, "root") }, {});
  LocalStore.open(loc).close();
  return loc;
}

/** The valid paths of the store at `loc`, read through a handle of its own. */
function validPaths(loc: StoreLocation): string[] {
  const s = LocalStore.open(loc);
  try {
    return s.allValidPaths();
  } finally {
    s.close();
  }
}

test("the writer counts the batches it has not committed yet, and says when fewer than a limit wait", async (t) => {
  const loc = newStore(t, "writer");
  const w = new StoreWriterThread(loc);
  for (let b = 0; b < 6; b++) w.addTextRecords(batchOf(b * 100, 100));
  assert.equal(w.backlog(), 6, "nothing is committed the moment it is handed over");
  await w.drained(1);
  assert.equal(w.backlog(), 0);
  await w.finish();
  assert.equal(validPaths(loc).length, 600);
});

test("a writer's paths stay rooted until it is finished: beforeRelease sees them committed and can root them itself", async (t) => {
  const loc = newStore(t, "writer-release");
  const keeper = LocalStore.open(loc);
  t.after(() => keeper.close());
  const plan = (w: StoreWriterThread, first: number) => {
    for (let b = 0; b < 3; b++) w.addTextRecords(batchOf(first + b * 50, 50));
  };
  let seen: { valid: number; collected: number } | undefined;
  const rooted = new StoreWriterThread(loc, {
    beforeRelease: () => {
      // Everything is committed, and the writer's own roots still hold: a GC now takes nothing.
      seen = { valid: keeper.allValidPaths().length, collected: keeper.gc().deleted.length };
      keeper.addTempRoots(keeper.allValidPaths());
    },
  });
  plan(rooted, 0);
  await rooted.finish();
  assert.deepEqual(seen, { valid: 150, collected: 0 });
  assert.deepEqual(keeper.gc().deleted, [], "the paths rooted in beforeRelease outlive the writer");

  // Without the hook, the writer's roots go with it: its paths are anyone's to collect.
  const plain = new StoreWriterThread(loc);
  plan(plain, 1000);
  await plain.finish();
  assert.equal(keeper.gc().deleted.length, 150);
  assert.equal(validPaths(loc).length, 150);
});

test("an aborted writer keeps what it committed, but not rooted: its threads close their stores and their roots go", async (t) => {
  const loc = newStore(t, "writer-abort");
  const keeper = LocalStore.open(loc);
  t.after(() => keeper.close());
  const w = new StoreWriterThread(loc);
  w.addTextRecords(batchOf(0, 50));
  await w.drained(1);
  await w.abort();
  assert.equal(validPaths(loc).length, 50, "the committed batch stays registered");
  assert.equal(keeper.gc().deleted.length, 50, "and nothing of the writer roots it any more");

  // A beforeRelease that fails is the writer's failure, reported with a code; its roots go too.
  const failing = new StoreWriterThread(loc, {
    beforeRelease: () => {
      throw new Error("the roots database is gone");
    },
  });
  failing.addTextRecords(batchOf(100, 50));
  await assert.rejects(failing.finish(), (e) => isFerryError(e) && e.code === "FERRY_EVAL_STORE" && e.message.includes("the roots database is gone"));
  assert.equal(keeper.gc().deleted.length, 50);
});

test("a writer that fails releases whoever waits for its backlog, and reports the failure as it happens", async (t) => {
  const loc = newStore(t, "writer-fail");
  const w = new StoreWriterThread(loc);
  const failures: string[] = [];
  w.onFailure((e) => failures.push(e.code));
  w.addTextRecords(batchOf(0, 100, true));
  for (let b = 1; b < 6; b++) w.addTextRecords(batchOf(b * 100, 100));
  await w.drained(1); // would wait for ever if a failed writer did not release it
  await assert.rejects(w.finish(), (e) => isFerryError(e) && e.code === "FERRY_STORE_PATH_MISMATCH");
  assert.deepEqual(failures, ["FERRY_STORE_PATH_MISMATCH"]);
  assert.deepEqual(validPaths(loc), [], "nothing after the false batch is registered");
});

test("a full file system while writing a plan is reported as such, with what to do; other errors keep their words", () => {
  const full = Object.assign(new Error("ENOSPC: no space left on device, open '/ferry/store/x.drv'"), { code: "ENOSPC" });
  const e = planWriteError(full);
  assert.equal(e.code, "FERRY_STORE_NO_SPACE");
  assert.match(e.message, /file system is full/);
  assert.match(e.hint ?? "", /df -i/);
  assert.equal(planWriteError(Object.assign(new Error("quota"), { code: "EDQUOT" })).code, "FERRY_STORE_NO_SPACE");
  const other = planWriteError(new Error("something else"));
  assert.equal(other.code, "FERRY_EVAL_STORE");
  assert.match(other.message, /something else/);
});

/**
 * Texts 0..n-1 in two interleaved chains: text i refers to text i-2. Returns the batches (of
 * `per` records) and every text's path.
 */
function chains(n: number, per: number, tag = "chained"): { batches: Uint8Array[]; paths: string[] } {
  const paths: string[] = [];
  const batches: Uint8Array[] = [];
  for (let first = 0; first < n; first += per) {
    const texts: TextRecordSource[] = [];
    for (let i = first; i < Math.min(n, first + per); i++) {
      const text = `${tag} text ${i}`;
      const references = i >= 2 ? [paths[i - 2]!] : [];
      paths.push(textPathOfHex(STORE, `c${i}.drv`, sha256Hex(text), references));
      texts.push({ storePath: paths[i]!, name: `c${i}.drv`, text, references });
    }
    batches.push(encodeBatch(texts));
  }
  return { batches, paths };
}

/** Runs `fn` on the database of the store at `loc`, opened directly (not through a store handle). */
function withDatabase<T>(loc: StoreLocation, fn: (db: Database.Database) => T): T {
  const db = new Database(join(realPath(loc, loc.stateDir), "db", "db.sqlite"));
  try {
    return fn(db);
  } finally {
    db.close();
  }
}

/** The unsynced-registration records of the store at `loc`. */
function unsyncedRecords(loc: StoreLocation): { boot: string; firstId: number; lastId: number; registeredAt: number }[] {
  return withDatabase(loc, (db) => db.prepare("SELECT boot, firstId, lastId, registeredAt FROM UnsyncedRegistrations ORDER BY firstId").all() as { boot: string; firstId: number; lastId: number; registeredAt: number }[]);
}

function editDatabase(loc: StoreLocation, sql: string): void {
  withDatabase(loc, (db) => db.exec(sql));
}

test("a writer that defers the sync registers its batches with a record of this boot, which an open forgets once it is a minute old", async (t) => {
  const loc = newStore(t, "writer-defer");
  const { batches, paths } = chains(300, 100);
  const w = new StoreWriterThread(loc, { deferSync: true });
  for (const b of batches) w.addTextRecords(b);
  await w.finish();
  assert.equal(validPaths(loc).length, 300);
  const records = unsyncedRecords(loc);
  assert.ok(records.length >= 1 && records.length <= 3, `one record per transaction (${records.length})`);
  assert.ok(records.every((r) => r.boot === bootId()), "made in this boot");
  const covered = records.reduce((k, r) => k + r.lastId - r.firstId + 1, 0);
  assert.equal(covered, 300, "the records cover exactly the rows the writer inserted");

  // An open in the same boot leaves young records alone (nothing is lost while the machine runs)...
  const s = LocalStore.open(loc);
  assert.equal(s.recovered, undefined);
  s.close();
  assert.equal(unsyncedRecords(loc).length, records.length);
  // ...and syncs and forgets those a minute old.
  editDatabase(loc, `UPDATE UnsyncedRegistrations SET registeredAt = registeredAt - 61`);
  LocalStore.open(loc).close();
  assert.deepEqual(unsyncedRecords(loc), []);
  assert.equal(validPaths(loc).length, 300);

  // A writer that syncs leaves no record.
  const synced = new StoreWriterThread(loc);
  for (const b of chains(40, 20, "synced").batches) synced.addTextRecords(b);
  await synced.finish();
  assert.deepEqual(unsyncedRecords(loc), []);
  assert.equal(validPaths(loc).length, paths.length + 40);
});

test("after a stop of the machine, the next open checks what was registered unsynced: a lost file is unregistered with every path that refers to it", async (t) => {
  const loc = newStore(t, "writer-recover");
  const { batches, paths } = chains(200, 50);
  const w = new StoreWriterThread(loc, { deferSync: true });
  for (const b of batches) w.addTextRecords(b);
  await w.finish();
  // A path registered the usual way (synced) that refers to one of them.
  const keeper = LocalStore.open(loc);
  const outside = keeper.addText("outside.drv", "refers to c10", [paths[10]!]).path;
  keeper.close();
  // The machine stopped: the records are of an earlier boot, and the kernel had written back
  // some files only. ext4 leaves a new file that was never written back empty.
  editDatabase(loc, `UPDATE UnsyncedRegistrations SET boot = 'an earlier boot'`);
  const real = (p: string) => realPath(loc, p);
  chmodSync(real(paths[10]!), 0o644);
  truncateSync(real(paths[10]!), 0);
  rmSync(real(paths[151]!));

  const s = LocalStore.open(loc);
  t.after(() => s.close());
  const lostEvens = paths.filter((_, i) => i >= 10 && i % 2 === 0);
  const lostOdds = paths.filter((_, i) => i >= 151 && i % 2 === 1);
  assert.deepEqual(s.recovered, { checked: 200, lost: [...lostEvens, ...lostOdds, outside].sort() });
  const valid = new Set(s.allValidPaths());
  assert.equal(valid.size, 200 - lostEvens.length - lostOdds.length);
  for (const p of [...lostEvens, ...lostOdds, outside]) {
    assert.ok(!valid.has(p), `${p} is no longer registered`);
    assert.ok(!existsSync(real(p)), `and its file is gone`);
  }
  assert.deepEqual(s.verify().filter((v) => v.status !== "ok"), [], "what stays is intact");
  assert.deepEqual(unsyncedRecords(loc), [], "the records are settled");
  // The next open has nothing to do.
  const again = LocalStore.open(loc);
  assert.equal(again.recovered, undefined);
  again.close();
  // Evaluating again makes the lost paths again.
  const redo = new StoreWriterThread(loc, { deferSync: true });
  for (const b of chains(200, 50).batches) redo.addTextRecords(b); // (a batch handed over is detached)
  await redo.finish();
  assert.equal(validPaths(loc).length, 200, "all 200 texts (the synced path that referred to one is not remade)");
});

test("a writer that syncs and finds paths a deferring writer registered syncs its batch, whatever its size, until those records are settled", async (t) => {
  const loc = newStore(t, "writer-lean");
  const { paths } = chains(60, 30, "deferred");
  const w = new StoreWriterThread(loc, { deferSync: true });
  for (const b of chains(60, 30, "deferred").batches) w.addTextRecords(b);
  await w.finish();
  const s = LocalStore.open(loc);
  t.after(() => s.close());
  // Five of the deferred texts again: all valid, nothing to write, and a batch this small would
  // otherwise count as synced (its files are fsync'ed one by one).
  const texts = Array.from({ length: 5 }, (_, i) => ({ name: `c${i}.drv`, bytes: Buffer.from(`deferred text ${i}`), references: i >= 2 ? [paths[i - 2]!] : [] }));
  const leaning = s.prepareTexts(texts);
  assert.deepEqual(leaning.paths, paths.slice(0, 5));
  assert.equal(leaning.batch.paths.length, 0);
  assert.equal(leaning.batch.synced, false, "it leans on files that may not be on the disk yet: it must sync");
  s.commitTexts(leaning);
  // Once the records are settled, the same batch needs no sync.
  editDatabase(loc, `UPDATE UnsyncedRegistrations SET registeredAt = registeredAt - 61`);
  LocalStore.open(loc).close();
  assert.deepEqual(unsyncedRecords(loc), []);
  assert.equal(s.prepareTexts(texts).batch.synced, true);
});

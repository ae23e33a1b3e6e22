/** The threads that write an evaluation's plan: batches, backlog and failures. */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { StoreWriterThread, planWriteError } from "../../src/store/writer-thread.js";
import { LocalStore } from "../../src/store/local-store.js";
import { resolveStoreLocation, type StoreLocation } from "../../src/store/config.js";
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

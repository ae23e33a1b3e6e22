/** The store's file-system helpers that run other processes. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { FileSystemSyncer } from "../../src/store/fs-util.js";
import { tempDir } from "../helpers/fs-trees.js";

test("a FileSystemSyncer answers each sync in order from one shell, and reports a failure with sync's own words", async () => {
  const ok = new FileSystemSyncer(tempDir("syncer"));
  const bad = new FileSystemSyncer("/nonexistent/ferry-syncer");
  try {
    const order: number[] = [];
    await Promise.all([1, 2, 3].map((k) => ok.sync().then(() => order.push(k))));
    assert.deepEqual(order, [1, 2, 3]);
    await assert.rejects(bad.sync(), (e: Error & { code?: string }) => e.code === "FERRY_STORE_SYNC" && /No such file or directory/.test(e.message));
    await ok.sync(); // still usable after another syncer failed
  } finally {
    ok.close();
    bad.close();
  }
});

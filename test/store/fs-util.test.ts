/** The store's file-system helpers that run other processes. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { FileSystemSyncer } from "../../src/store/fs-util.js";
import { tempDir } from "../helpers/fs-trees.js";

test("a FileSystemSyncer answers each sync in order from one shell, serves requests made while one runs with the next, and reports a failure with sync's own words", async () => {
  const ok = new FileSystemSyncer(tempDir("syncer"));
  const bad = new FileSystemSyncer("/nonexistent/ferry-syncer");
  try {
    const order: number[] = [];
    await Promise.all([1, 2, 3, 4, 5, 6].map((k) => ok.sync().then(() => order.push(k))));
    assert.deepEqual(order, [1, 2, 3, 4, 5, 6]);
    assert.equal(ok.runs, 2, "the first request starts a sync; the five made while it runs share the second");
    const failures = await Promise.allSettled([bad.sync(), bad.sync(), bad.sync()]);
    for (const f of failures) {
      assert.equal(f.status, "rejected");
      const e = (f as PromiseRejectedResult).reason as Error & { code?: string };
      assert.ok(e.code === "FERRY_STORE_SYNC" && /No such file or directory/.test(e.message), e.message);
    }
    await ok.sync(); // still usable after another syncer failed
    assert.equal(ok.runs, 3);
  } finally {
    ok.close();
    bad.close();
  }
});

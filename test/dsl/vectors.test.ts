/**
 * The DSL reproduces what nix-instantiate wrote for the public derivation vectors: the same
 * attributes, written as a Ferry module, give byte-identical .drv files and the same paths.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { evaluate, type EvalJob } from "../../src/dsl/evaluate.js";
import { drvVectors, writeVectorPackageSet, type DrvVector } from "../helpers/vector-fixture.js";
import { tempDir } from "../helpers/fs-trees.js";
import { decodeTextRecords } from "../../src/store/text-records.js";



describe("DSL against the derivation vectors", () => {
  let dir: string;
  let vectors: DrvVector[];
  before(() => {
    dir = tempDir("ferry-dsl-");
    vectors = drvVectors();
    writeVectorPackageSet(dir);
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  for (const storeDir of ["/nix/store", "/ferry/store"]) {
    test(`every vector's .drv text and paths are reproduced (${storeDir})`, async () => {
      const texts = new Map<string, string>();
      const { jobs } = await evaluate({
        file: join(dir, "drvs.ts"),
        storeDir,
        store: { addSource: () => {}, addTextRecords: (batch) => decodeTextRecords(batch).forEach((t) => texts.set(t.expectedPath, Buffer.from(t.bytes).toString())) },
      });
      const byAttr = new Map<string, EvalJob>(jobs.map((j) => [j.attr, j]));
      const mine = vectors.filter((v) => v.store_dir === storeDir);
      assert.equal(mine.length, 7);
      for (const v of mine) {
        const j = byAttr.get(v.attr);
        assert.ok(j, v.attr);
        assert.equal(j.drvPath, v.drv_path, `${v.attr} .drv path`);
        assert.equal(texts.get(j.drvPath), v.drv_text, `${v.attr} .drv text`);
        assert.deepEqual({ ...j.outputs }, v.outputs, `${v.attr} outputs`);
      }
      assert.equal(byAttr.get("dependent")!.outputs.out, byAttr.get("dependentViaAlt")!.outputs.out, "how a fixed output is fetched does not change dependents");
    });
  }
});

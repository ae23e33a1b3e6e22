/**
 * The DSL reproduces what nix-instantiate wrote for the public derivation vectors: the same
 * attributes, written as a Ferry module, give byte-identical .drv files and the same paths.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { evaluate, type EvalJob } from "../../src/dsl/evaluate.js";
import { nixVectorsDir, repoRoot } from "../helpers/paths.js";
import { tempDir } from "../helpers/fs-trees.js";

interface DrvVector { attr: string; store_dir: string; drv_path: string; drv_text: string; outputs: Record<string, string> }


type Tree = { type: "regular"; executable: boolean; contents?: string; contents_base64?: string } | { type: "symlink"; target: string } | { type: "directory"; entries: Record<string, Tree> };

function writeTree(path: string, t: Tree): void {
  if (t.type === "directory") {
    fs.mkdirSync(path);
    for (const [n, c] of Object.entries(t.entries)) writeTree(join(path, n), c);
  } else if (t.type === "symlink") fs.symlinkSync(t.target, path);
  else fs.writeFileSync(path, t.contents_base64 !== undefined ? Buffer.from(t.contents_base64, "base64") : t.contents ?? "", { mode: t.executable ? 0o755 : 0o644 });
}

describe("DSL against the derivation vectors", () => {
  let dir: string;
  let vectors: DrvVector[];
  before(() => {
    dir = tempDir("ferry-dsl-");
    const drvs = JSON.parse(fs.readFileSync(join(nixVectorsDir, "derivations.json"), "utf8"));
    vectors = drvs.vectors;
    fs.writeFileSync(join(dir, "dependent-builder.sh"), drvs.nix_expressions["dependent-builder.sh"]);
    const nar = JSON.parse(fs.readFileSync(join(nixVectorsDir, "nar.json"), "utf8"));
    writeTree(join(dir, "unicode-tree"), nar.vectors.find((v: { name: string }) => v.name === "unicode-tree").tree);
    fs.copyFileSync(join(repoRoot, "test", "fixtures", "vector-drvs.ts"), join(dir, "drvs.ts"));
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  for (const storeDir of ["/nix/store", "/ferry/store"]) {
    test(`every vector's .drv text and paths are reproduced (${storeDir})`, async () => {
      const texts = new Map<string, string>();
      const { jobs } = await evaluate({
        file: join(dir, "drvs.ts"),
        storeDir,
        store: { addSource: () => {}, addTexts: (ts) => ts.forEach((t) => texts.set(t.storePath, t.text)) },
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

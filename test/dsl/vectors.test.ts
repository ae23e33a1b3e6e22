/**
 * The DSL reproduces what nix-instantiate wrote for the public derivation vectors: the same
 * attributes, written as a Ferry module, give byte-identical .drv files and the same paths.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { evaluate, type EvalJob } from "../../src/dsl/evaluate.js";
import { nixVectorsDir } from "../helpers/paths.js";
import { tempDir } from "../helpers/fs-trees.js";

interface DrvVector { attr: string; store_dir: string; drv_path: string; drv_text: string; outputs: Record<string, string> }

const MODULE = `
import { derivation, source } from "ferry";
const sys = "x86_64-linux";
export const simple = derivation({ name: "simple", system: sys, builder: "/bin/sh", args: ["-c", "echo hello > $out"] });
export const multi = derivation({
  name: "multi-out", system: sys, builder: "/bin/sh",
  outputs: ["out", "dev"],
  anInt: 42, aTrue: true, aFalse: false, aNull: null, aFloat: 0.1,
  aList: ["x", 1, true, false, null, "y z"],
  weird: "q\\" b\\\\ n\\n t\\t r\\r c\\u0001 ü 😀",
  src: source("./unicode-tree"),
  args: ["-c", "printf '%s' \\"$weird\\" > $out; /bin/mkdir $dev; echo $out > $dev/out-path"],
});
export const fixedFlat = derivation({
  name: "fixed-flat", system: sys, builder: "/bin/sh",
  args: ["-c", "echo 'fixed content' > $out"],
  outputHashMode: "flat", outputHashAlgo: "sha256",
  outputHash: "0rcnqrrdvppl92i39a6njnzq1icsqcqc9ffsy080qg40w8d7kkxd",
});
export const fixedFlatAlt = derivation({
  name: "fixed-flat", system: sys, builder: "/bin/sh",
  args: ["-c", "printf 'fixed content\\\\n' > $out"],
  outputHashMode: "flat", outputHashAlgo: "sha256",
  outputHash: "adcf791ae2803c0c10f0dab9c430c39ac580bf95d6a834a248f4dedd72c69665",
});
export const fixedRec = derivation({
  name: "fixed-rec", system: sys, builder: "/bin/sh",
  args: ["-c", "/bin/mkdir $out; echo data > $out/data; /bin/ln -s data $out/link; printf '#!/bin/sh\\\\n' > $out/run; /bin/chmod +x $out/run"],
  outputHashMode: "recursive",
  outputHash: "sha256-t/eurinaLUE+qrm6OucqRnfbDFjpOfVxmqxejZOMqsg=",
});
const builderScript = source("./dependent-builder.sh");
export const dependent = derivation({
  name: "dependent", system: sys, builder: "/bin/sh", args: [builderScript],
  simpleOut: simple, devOut: multi.outputs.dev, fixedFile: fixedFlat, fixedDir: fixedRec,
});
export const dependentViaAlt = derivation({
  name: "dependent", system: sys, builder: "/bin/sh", args: [builderScript],
  simpleOut: simple, devOut: multi.outputs.dev, fixedFile: fixedFlatAlt, fixedDir: fixedRec,
});
`;

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
    fs.writeFileSync(join(dir, "drvs.ts"), MODULE);
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

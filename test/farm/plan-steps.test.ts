/**
 * Planning an evaluation's steps on a thread of its own: the same steps as on the caller's
 * thread (names, systems, features, edges), in pieces that arrive whole, and errors with their
 * codes. A real evaluation writes the .drv files into a real store first.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { evaluate } from "../../src/dsl/evaluate.js";
import { planSteps, planStepsOffThread } from "../../src/farm/plan-steps.js";
import { LocalStore } from "../../src/store/local-store.js";
import { resolveStoreLocation } from "../../src/store/config.js";
import { StoreWriterThread } from "../../src/store/writer-thread.js";
import { isFerryError } from "../../src/core/errors.js";
import { tempDir } from "../helpers/fs-trees.js";

// More steps than the planning thread sends in one message, with shared inputs and features.
const N = 5200;
const SET = `
import { derivation, type Package } from "ferry";
const pkgs: Package[] = [];
for (let i = 0; i < ${N}; i++) {
  const deps = i === 0 ? [] : [pkgs[i - 1]!, pkgs[Math.floor(i / 3)]!];
  pkgs.push(derivation({
    name: \`p\${i}\`, system: i % 10 === 0 ? "aarch64-linux" : "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $deps > $out"], deps,
    ...(i % 7 === 0 ? { requiredSystemFeatures: ["kvm", "big-parallel"] } : {}),
  }));
}
export default Object.fromEntries(pkgs.map((p, i) => [\`p\${i}\`, p]));
`;

test("steps planned on a thread of their own are those planned here, and errors keep their codes", async (t) => {
  const dir = tempDir("ferry-plan-steps-");
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, "set.ts"), SET);
  const loc = resolveStoreLocation({ storeDir: "/ferry/store", stateDir: "/ferry/var", root: join(dir, "root") }, {});
  const store = LocalStore.open(loc);
  t.after(() => store.close());
  const drvPaths: string[] = [];
  await evaluate({ file: join(dir, "set.ts"), storeDir: loc.storeDir, store: new StoreWriterThread(loc, { beforeRelease: () => store.addTempRoots(drvPaths) }), onJob: (j) => drvPaths.push(j.drvPath) });
  assert.equal(drvPaths.length, N);

  const here = planSteps(store, drvPaths);
  const there = await planStepsOffThread(loc, drvPaths);
  assert.equal(there.length, N, "every step arrives, across several messages");
  assert.deepEqual(there, here);
  const byName = new Map(there.map((s) => [s.name, s]));
  assert.deepEqual(byName.get("p7")!.features, ["kvm", "big-parallel"]);
  assert.equal(byName.get("p10")!.system, "aarch64-linux");
  assert.deepEqual([...byName.get("p9")!.dependsOn].sort(), [drvPaths[8], drvPaths[3]].sort());

  const missing = "/ferry/store/00000000000000000000000000000000-gone.drv";
  await assert.rejects(planStepsOffThread(loc, [drvPaths[0]!, missing]), (e) => isFerryError(e) && e.code === "FERRY_BUILD_NO_DRV" && e.message.includes(missing) && e.hint !== undefined);
});

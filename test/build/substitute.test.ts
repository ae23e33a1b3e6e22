/**
 * The realiser with a substituter: outputs another store already has are copied, not built,
 * and the inputs they were built from are not needed at all.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { LocalStore } from "../../src/store/local-store.js";
import { resolveStoreLocation } from "../../src/store/config.js";
import { realise, type BuildOutcome } from "../../src/build/realise.js";
import { StoreSubstituter } from "../../src/build/store-substituter.js";
import { BuildEmitter } from "../../src/build/events.js";
import { evaluate } from "../../src/dsl/evaluate.js";
import { storePort } from "../../src/cli/commands/eval.js";
import { tempDir } from "../helpers/fs-trees.js";

const open = (root: string) => LocalStore.open(resolveStoreLocation({ storeDir: "/ferry/store", stateDir: "/ferry/var", root }, {}));

describe("substitution", () => {
  let dir: string;
  let file: string;
  before(() => {
    dir = tempDir("ferry-subst-");
    file = join(dir, "set.ts");
    fs.writeFileSync(file, `
      import { derivation } from "ferry";
      export const base = derivation({ name: "base", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo base > $out"] });
      export const mid = derivation({ name: "mid", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $base > $out"], base });
      export const top = derivation({ name: "top", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $mid > $out"], mid });
      export const extra = derivation({ name: "extra", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $top extra > $out"], top });
    `);
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  async function evalInto(s: LocalStore): Promise<Record<string, string>> {
    const { jobs } = await evaluate({ file, storeDir: s.storeDir, store: storePort(s) });
    return Object.fromEntries(jobs.map((j) => [j.attr, j.drvPath]));
  }

  test("outputs a substituter has are substituted with their closure; the rest is built", async () => {
    const a = open(join(dir, "a"));
    const b = open(join(dir, "b"));
    try {
      const da = await evalInto(a);
      const built = await realise(a, [da.top!]);
      assert.ok(built.every((o) => o.status === "built"));
      const db = await evalInto(b);
      const events = new BuildEmitter();
      const seen: string[] = [];
      events.onAny((name) => seen.push(String(name)));
      const out = await realise(b, [db.extra!], { substituters: [new StoreSubstituter(b, a)], events });
      const status = (o: BuildOutcome) => `${o.drvPath.replace(/^.*-/, "")}:${o.status}`;
      assert.deepEqual(out.map(status).sort(), ["extra.drv:built", "top.drv:substituted"]);
      const topOut = (out.find((o) => o.drvPath === db.top) as { outputs: Record<string, string> }).outputs.out!;
      assert.ok(b.isValid(topOut));
      // top's closure came along; base and mid were never built here.
      assert.deepEqual(b.closure([topOut]).length, 3);
      assert.ok(seen.includes("substitute:started") && seen.includes("substitute:finished"));
      assert.deepEqual(b.verify().filter((v) => v.status !== "ok"), []);
    } finally {
      a.close();
      b.close();
    }
  });
});

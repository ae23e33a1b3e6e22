/**
 * `evaluate()` as the CLI and the farm call it: how far an evaluation is (what `ferry eval`
 * shows on a terminal), and an evaluator that cannot be started.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { evaluate, type EvalProgress } from "../../src/dsl/evaluate.js";
import { evalProgressText } from "../../src/cli/commands/eval.js";
import { progressLine } from "../../src/cli/output.js";
import { StoreWriterThread } from "../../src/store/writer-thread.js";
import { resolveStoreLocation } from "../../src/store/config.js";
import { tempDir } from "../helpers/fs-trees.js";
import { sandboxAvailable } from "../../src/build/sandbox.js";
import { isFerryError } from "../../src/core/errors.js";

const N = 3000;

test("progress counts what the evaluator planned, never backwards, and says when only the store's writes are left", async (t) => {
  const dir = tempDir("ferry-eval-progress-");
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, "set.ts"), `import { derivation, type Package } from "ferry";
const pkgs: Package[] = [];
for (let i = 0; i < ${N}; i++) pkgs.push(derivation({ name: \`p\${i}\`, system: "x86_64-linux", builder: "/bin/sh", deps: i ? [pkgs[i - 1]!] : [] }));
export default Object.fromEntries(pkgs.map((p, i) => [\`p\${i}\`, p]));
`);
  const seen: EvalProgress[] = [];
  const dry = await evaluate({ file: join(dir, "set.ts"), storeDir: "/ferry/store", onProgress: (p) => seen.push(p) });
  assert.equal(dry.jobs.length, N);
  assert.ok(seen.length >= 1);
  for (let i = 1; i < seen.length; i++) {
    assert.ok(seen[i]!.derivations >= seen[i - 1]!.derivations && seen[i]!.jobs >= seen[i - 1]!.jobs, "counts only grow");
  }
  assert.deepEqual(seen.at(-1), { derivations: N, sources: 0, jobs: N, writing: false }, "a dry run has nothing left to write");

  const loc = resolveStoreLocation({ storeDir: "/ferry/store", stateDir: "/ferry/var", root: join(dir, "root") }, {});
  const writing: EvalProgress[] = [];
  await evaluate({ file: join(dir, "set.ts"), storeDir: loc.storeDir, store: new StoreWriterThread(loc), onProgress: (p) => writing.push(p) });
  assert.deepEqual(writing.at(-1), { derivations: N, sources: 0, jobs: N, writing: true });
  assert.equal(writing.filter((p) => p.writing).length, 1);

  assert.equal(evalProgressText("set.ts", { derivations: 45210, sources: 2, jobs: 0, writing: false }), "set.ts: evaluating, 45,210 derivations, 2 sources");
  assert.equal(evalProgressText("set.ts", { derivations: 100000, sources: 0, jobs: 100000, writing: true }), "set.ts: evaluated; writing the last of 100,000 .drv files to the store");
});

test("an evaluator that cannot be started is reported with the reason, and its store port is aborted", async (t) => {
  if (!sandboxAvailable().ok) return t.skip("needs bubblewrap, to get past the sandbox check to the start");
  const dir = tempDir("ferry-eval-start-");
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, "set.ts"), `import { derivation } from "ferry";\nexport const x = derivation({ name: "x", system: "x86_64-linux", builder: "/bin/sh" });\n`);
  const before = process.env.FERRY_BWRAP;
  process.env.FERRY_BWRAP = join(dir, "no-such-bwrap");
  t.after(() => (before === undefined ? delete process.env.FERRY_BWRAP : (process.env.FERRY_BWRAP = before)));
  const calls: string[] = [];
  const port = { addSource: () => calls.push("source"), addTextRecords: () => calls.push("texts"), finish: async () => void calls.push("finish"), abort: async () => void calls.push("abort") };
  await assert.rejects(
    evaluate({ file: join(dir, "set.ts"), storeDir: "/ferry/store", store: port }),
    (e) => isFerryError(e) && e.code === "FERRY_EVAL_START_FAILED" && e.message.includes("no-such-bwrap") && e.message.includes("ENOENT") && e.hint !== undefined,
  );
  assert.deepEqual(calls, ["abort"]);
});

test("the package set's own output reaches a caller that shows it, all of it before evaluate settles, even when evaluation fails", async (t) => {
  const dir = tempDir("ferry-eval-output-");
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const big = 200_000; // more than a pipe holds: the evaluator must not block on it
  writeFileSync(join(dir, "set.ts"), `import { derivation } from "ferry";
console.log("hello from the package set");
console.error("x".repeat(${big}));
export const a = derivation({ name: "a", system: "x86_64-linux", builder: "/bin/sh" });
`);
  const chunks: Buffer[] = [];
  const r = await evaluate({ file: join(dir, "set.ts"), storeDir: "/ferry/store", onOutput: (c) => chunks.push(c) });
  assert.equal(r.jobs.length, 1);
  const out = Buffer.concat(chunks).toString();
  assert.match(out, /^hello from the package set\n/);
  assert.equal(out.split("x").length - 1, big);

  writeFileSync(join(dir, "bad.ts"), `console.error("about to fail");\nthrow new Error("broken set");\n`);
  const failed: Buffer[] = [];
  await assert.rejects(evaluate({ file: join(dir, "bad.ts"), storeDir: "/ferry/store", onOutput: (c) => failed.push(c) }), /broken set/);
  assert.equal(Buffer.concat(failed).toString(), "about to fail\n");
});

test("a progress line on a terminal makes way for other output and is drawn again after each whole line", () => {
  const written: string[] = [];
  const term = { isTTY: true, write: (c: Uint8Array | string) => (written.push(String(c)), true) };
  const p = progressLine(term);
  assert.ok(p.active);
  p.update("evaluating, 10 derivations", true);
  p.print("a line from the package set\n");
  p.print("half a line");
  p.update("evaluating, 20 derivations", true); // not drawn over the half line
  p.print(" ends here\n");
  p.done();
  assert.deepEqual(written, [
    "\r\x1b[Kevaluating, 10 derivations",
    "\r\x1b[K",
    "a line from the package set\n",
    "\r\x1b[Kevaluating, 10 derivations",
    "\r\x1b[K",
    "half a line",
    " ends here\n",
    "\r\x1b[Kevaluating, 20 derivations",
    "\r\x1b[K",
  ]);
  // Not a terminal: nothing of the line, the output as it is.
  const plain: string[] = [];
  const q = progressLine({ isTTY: false, write: (c: Uint8Array | string) => (plain.push(String(c)), true) });
  q.update("evaluating", true);
  q.print("output\n");
  q.done();
  assert.deepEqual(plain, ["output\n"]);
  // Output that ends mid-line: whatever comes after the line starts on a line of its own.
  const after: string[] = [];
  const r = progressLine({ isTTY: true, write: (c: Uint8Array | string) => (after.push(String(c)), true) });
  r.print("no newline at the end");
  r.update("writing", true);
  r.done();
  assert.deepEqual(after, ["no newline at the end", "\n"]);
});

/** The order objects are registered and uploaded in: references first, any depth, cycles survived. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { referencesFirst } from "../../src/core/path-order.js";

test("each path comes after the paths it references, otherwise in the order given; refs are asked once per path", () => {
  const refs: Record<string, string[]> = { a: [], b: ["a", "b"], c: ["b", "x"], d: [], e: ["d", "c"] };
  const asked: string[] = [];
  const order = referencesFirst(["e", "c", "b", "a", "d", "c"], (p) => {
    asked.push(p);
    return refs[p]!;
  });
  assert.deepEqual(order, ["d", "a", "b", "c", "e"]);
  assert.deepEqual([...asked].sort(), ["a", "b", "c", "d", "e"], "once each; 'x' is not among the paths");
  assert.deepEqual(referencesFirst(["d", "a"], (p) => refs[p]!), ["d", "a"], "unrelated paths keep their order");
});

test("a chain of 200,000 is ordered without recursion, and a cycle is broken rather than looped on", () => {
  const n = 200_000;
  const chain = Array.from({ length: n }, (_, i) => `p${i}`);
  const order = referencesFirst([...chain].reverse(), (p) => (p === "p0" ? [] : [`p${Number(p.slice(1)) - 1}`]));
  assert.deepEqual(order, chain);
  const cyclic: Record<string, string[]> = { a: ["b"], b: ["c"], c: ["a"] };
  assert.deepEqual([...referencesFirst(["a", "b", "c"], (p) => cyclic[p]!)].sort(), ["a", "b", "c"]);
});

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { FerryError } from "../../src/core/errors.js";
import { NarParser, type NarEvent } from "../../src/core/nar/parser.js";
import { narOfTree, treeOfEvents, writeTree, type NarTree } from "../../src/core/nar/tree.js";
import { NarWriter } from "../../src/core/nar/writer.js";

const SPECIAL_NAMES = ["😀", "u-～", "u-😀", "\u{10ffff}", "\uffff", "\ue000", "__proto__", "constructor", "...", ".x", "a b", "ü", "子目录", "\u00ff"];

const nameArb = fc
  .oneof(
    fc.constantFrom(...SPECIAL_NAMES),
    fc.string({ unit: "binary", minLength: 1, maxLength: 6 }),
    fc.string({ unit: "grapheme", minLength: 1, maxLength: 3 }),
    fc.string({ minLength: 1, maxLength: 8 }),
  )
  .filter((s) => s !== "." && s !== ".." && !s.includes("/") && !s.includes("\0"));

function dirOf(entries: readonly (readonly [string, NarTree])[]): NarTree {
  const rec: Record<string, NarTree> = {};
  for (const [n, t] of entries) Object.defineProperty(rec, n, { value: t, enumerable: true, writable: true, configurable: true });
  return { type: "directory", entries: rec };
}

// Trees are plain objects, as callers build them (fc.record would give null-prototype objects).
const fileArb: fc.Arbitrary<NarTree> = fc
  .tuple(
    fc.boolean(),
    fc.oneof({ weight: 5, arbitrary: fc.uint8Array({ minLength: 0, maxLength: 20 }) }, { weight: 1, arbitrary: fc.uint8Array({ minLength: 0, maxLength: 300 }) }),
  )
  .map(([executable, contents]) => ({ type: "regular", executable, contents }));
// Symlink targets are never empty and never contain NUL (no file system can hold such a link).
const symlinkArb: fc.Arbitrary<NarTree> = fc
  .oneof(fc.string({ unit: "binary", minLength: 1, maxLength: 20 }).filter((t) => !t.includes("\0")), fc.constantFrom("../a/b", "/nix/store/x", "😀"))
  .map((target) => ({ type: "symlink", target }));

const { tree: treeArb } = fc.letrec<{ tree: NarTree; dir: NarTree }>((tie) => ({
  tree: fc.oneof({ depthSize: "small", withCrossShrink: true }, fileArb, symlinkArb, tie("dir")),
  dir: fc.uniqueArray(fc.tuple(nameArb, tie("tree")), { selector: (e) => e[0], maxLength: 5 }).map(dirOf),
}));

/** Feeds `bytes` to `p` in chunks whose sizes cycle through `sizes`. */
function pushChunked(p: NarParser, bytes: Uint8Array, sizes: readonly number[]): void {
  let o = 0;
  for (let k = 0; o < bytes.length; k++) {
    const n = sizes[k % sizes.length]!;
    p.push(bytes.subarray(o, o + n));
    o += n;
  }
}

const strictUtf8 = new TextDecoder("utf-8", { fatal: true });
function isUtf8(b: Uint8Array): boolean {
  try {
    strictUtf8.decode(b);
    return true;
  } catch {
    return false;
  }
}

function collect(): { events: NarEvent[]; emit: (e: NarEvent) => void } {
  const events: NarEvent[] = [];
  return { events, emit: (e) => events.push(e.kind === "contents" ? { kind: "contents", data: e.data.slice() } : e) };
}

describe("NAR properties", () => {
  test("narOfTree → NarParser in random chunks → treeOfEvents is the identity", () => {
    fc.assert(
      fc.property(treeArb, fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1, maxLength: 8 }), (tree, sizes) => {
        const nar = narOfTree(tree);
        assert.equal(nar.length % 8, 0);
        const { events, emit } = collect();
        const p = new NarParser(emit);
        pushChunked(p, nar, sizes);
        p.end();
        assert.equal(p.offset, nar.length);
        assert.deepEqual(treeOfEvents(events), tree);
      }),
      { numRuns: Number(process.env.FERRY_PROPERTY_RUNS ?? 400) },
    );
  });

  test("the writer's batch size never changes the bytes", () => {
    fc.assert(
      fc.property(treeArb, fc.integer({ min: 8, max: 64 }), (tree, bufferSize) => {
        const parts: Uint8Array[] = [];
        const w = new NarWriter((c) => parts.push(c.slice()), bufferSize);
        writeTree(w, tree);
        const size = w.end();
        const nar = Buffer.concat(parts);
        assert.equal(size, nar.length);
        assert.deepEqual(nar, Buffer.from(narOfTree(tree)));
      }),
      { numRuns: 200 },
    );
  });

  type Mutation =
    | { kind: "flip"; at: number; xor: number }
    | { kind: "truncate"; at: number }
    | { kind: "insert"; at: number; bytes: Uint8Array }
    | { kind: "delete"; at: number; count: number }
    | { kind: "length"; at: number; value: number };

  const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
    fc.record({ kind: fc.constant("flip" as const), at: fc.nat(), xor: fc.integer({ min: 1, max: 255 }) }),
    fc.record({ kind: fc.constant("truncate" as const), at: fc.nat() }),
    fc.record({ kind: fc.constant("insert" as const), at: fc.nat(), bytes: fc.uint8Array({ minLength: 1, maxLength: 16 }) }),
    fc.record({ kind: fc.constant("delete" as const), at: fc.nat(), count: fc.integer({ min: 1, max: 16 }) }),
    // overwrite a length-prefix-aligned word with a hostile value
    fc.record({ kind: fc.constant("length" as const), at: fc.nat(), value: fc.constantFrom(0, 1, 7, 0xffffffff, 2 ** 32, 2 ** 53, 2 ** 63) }),
  );

  function mutate(nar: Uint8Array, m: Mutation): Uint8Array {
    const at = m.at % (nar.length + 1);
    switch (m.kind) {
      case "flip": {
        const out = nar.slice();
        const i = m.at % nar.length;
        out[i] = out[i]! ^ m.xor;
        return out;
      }
      case "truncate":
        return nar.slice(0, at);
      case "insert":
        return new Uint8Array(Buffer.concat([nar.subarray(0, at), m.bytes, nar.subarray(at)]));
      case "delete":
        return new Uint8Array(Buffer.concat([nar.subarray(0, at), nar.subarray(at + m.count)]));
      case "length": {
        if (nar.length < 8) return nar;
        const out = nar.slice();
        const i = Math.floor(m.at / 8) % Math.floor(nar.length / 8) * 8;
        const v = new DataView(out.buffer);
        v.setUint32(i, m.value % 2 ** 32, true);
        v.setUint32(i + 4, Math.floor(m.value / 2 ** 32) % 2 ** 32, true);
        return out;
      }
    }
  }

  test("mutated NARs fail only with FERRY_NAR_INVALID and a sensible offset", () => {
    fc.assert(
      fc.property(
        treeArb,
        fc.array(mutationArb, { minLength: 1, maxLength: 3 }),
        fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 4 }),
        fc.boolean(),
        (tree, mutations, sizes, smallLimits) => {
          let bytes = narOfTree(tree);
          for (const m of mutations) bytes = bytes.length > 0 ? mutate(bytes, m) : bytes;
          const { events, emit } = collect();
          const p = new NarParser(emit, smallLimits ? { maxTokenLength: 16, maxFileSize: 64, maxDepth: 2 } : {});
          try {
            pushChunked(p, bytes, sizes);
            p.end();
          } catch (e) {
            if (!(e instanceof FerryError)) throw new Error(`non-Ferry error ${String(e)}`, { cause: e });
            assert.equal(e.code, "FERRY_NAR_INVALID");
            const offset = e.details.offset;
            assert.equal(typeof offset, "number");
            assert.ok(Number.isInteger(offset) && (offset as number) >= 0 && (offset as number) <= bytes.length, `offset ${String(offset)} of ${bytes.length}`);
            assert.match(e.message, /^invalid NAR at byte \d+: /);
            return;
          }
          // whatever was accepted is canonical: writing its tree back gives the same bytes
          // (when names and targets are valid UTF-8, so that the tree form holds them exactly)
          assert.equal(p.done, true);
          if (events.every((e) => (e.kind !== "symlink" || isUtf8(e.target)) && (!("path" in e) || e.path.every(isUtf8)))) {
            assert.deepEqual(Buffer.from(narOfTree(treeOfEvents(events))), Buffer.from(bytes));
          }
        },
      ),
      { numRuns: Number(process.env.FERRY_PROPERTY_RUNS ?? 500) },
    );
  });
});

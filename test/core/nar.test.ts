import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { sha256 } from "../../src/core/digest.js";
import { toBase16, toNix32, makeHash, printHash } from "../../src/core/hash.js";
import { NarParser, parseNarBytes, type NarEvent } from "../../src/core/nar/parser.js";
import { narOfTree, treeOfEvents, writeTree, type NarTree } from "../../src/core/nar/tree.js";
import { NarWriter, narOfRegularFile } from "../../src/core/nar/writer.js";
import { sortUtf8 } from "../../src/core/nar/names.js";
import { fromBase64, loadVectors, narTreeOf, type VectorTree } from "../helpers/vectors.js";

interface NarVector {
  name: string;
  tree: VectorTree;
  nar_base64: string;
  nar_size: number;
  nar_sha256_hex: string;
  nar_sha256_nix32: string;
  nar_hash_sri: string;
}

const file = loadVectors<NarVector>("nar.json");

/** Parses `nar` pushed in pieces of `step` bytes and rebuilds the tree. */
function parseChunked(nar: Uint8Array, step: number): NarTree {
  const events: NarEvent[] = [];
  const p = new NarParser((e) => events.push(e.kind === "contents" ? { kind: "contents", data: e.data.slice() } : e));
  for (let o = 0; o < nar.length; o += step) p.push(nar.subarray(o, o + step));
  p.end();
  assert.ok(p.done);
  assert.equal(p.offset, nar.length);
  return treeOfEvents(events);
}

describe("nar.json vectors", () => {
  for (const v of file.vectors) {
    test(v.name, () => {
      const tree = narTreeOf(v.tree);
      const expected = fromBase64(v.nar_base64);
      const nar = narOfTree(tree);
      assert.equal(nar.length, v.nar_size);
      assert.deepEqual(Buffer.from(nar), Buffer.from(expected));
      const digest = sha256(nar);
      assert.equal(toBase16(digest), v.nar_sha256_hex);
      assert.equal(toNix32(digest), v.nar_sha256_nix32);
      assert.equal(printHash(makeHash("sha256", digest), "sri"), v.nar_hash_sri);

      // parse the real Nix bytes back, whole and in every small chunking
      assert.deepEqual(treeOfEvents(parseNarBytes(expected)), tree);
      for (const step of [1, 3, 7, 8, 9, 64]) assert.deepEqual(parseChunked(expected, step), tree, `chunks of ${step}`);
    });
  }

  test("a tiny writer buffer gives the same bytes", () => {
    for (const v of file.vectors) {
      const parts: Uint8Array[] = [];
      const w = new NarWriter((c) => parts.push(c.slice()), 16);
      writeTree(w, narTreeOf(v.tree));
      const size = w.end();
      assert.equal(size, v.nar_size);
      assert.deepEqual(Buffer.concat(parts), Buffer.from(fromBase64(v.nar_base64)), v.name);
    }
  });

  test("unicode-tree puts u-～ (EF BD 9E) before u-😀 (F0 9F 98 80)", () => {
    assert.deepEqual(sortUtf8(["u-😀", "u-～"]), ["u-～", "u-😀"]);
    // JavaScript's own sort gets this wrong, which is why the vector exists
    assert.deepEqual(["u-😀", "u-～"].sort(), ["u-😀", "u-～"]);
    const v = file.vectors.find((x) => x.name === "unicode-tree");
    assert.ok(v);
    const nar = Buffer.from(fromBase64(v.nar_base64));
    assert.ok(nar.indexOf("u-～") < nar.indexOf("u-😀"));
  });

  test("the SPEC §2.2 example: hello\\n is 120 bytes", () => {
    const nar = narOfTree({ type: "regular", executable: false, contents: new TextEncoder().encode("hello\n") });
    assert.equal(nar.length, 120);
    const spec = [
      "0d00000000000000 6e69782d61726368 6976652d31000000",
      "0100000000000000 2800000000000000",
      "0400000000000000 7479706500000000",
      "0700000000000000 726567756c617200",
      "0800000000000000 636f6e74656e7473",
      "0600000000000000 68656c6c6f0a0000",
      "0100000000000000 2900000000000000",
    ].join("").replaceAll(" ", "");
    assert.equal(Buffer.from(nar).toString("hex"), spec);
  });

  test("file contents of 64 KiB and more bypass the batch buffer unchanged", () => {
    const big = new Uint8Array(200_000).map((_, i) => (i * 7) & 0xff);
    const tree: NarTree = { type: "directory", entries: { a: { type: "regular", executable: true, contents: big }, b: { type: "symlink", target: "a" } } };
    const nar = narOfTree(tree);
    assert.deepEqual(treeOfEvents(parseNarBytes(nar)), tree);
    assert.deepEqual(parseChunked(nar, 4093), tree);
  });

  test("entry names that are Object.prototype keys survive the round trip", () => {
    const entries: Record<string, NarTree> = {};
    for (const n of ["__proto__", "constructor", "toString", "hasOwnProperty"]) {
      Object.defineProperty(entries, n, { value: { type: "symlink", target: n }, enumerable: true, writable: true, configurable: true });
    }
    const tree: NarTree = { type: "directory", entries };
    const back = treeOfEvents(parseNarBytes(narOfTree(tree)));
    assert.equal(back.type, "directory");
    assert.deepEqual(Object.keys(back.type === "directory" ? back.entries : {}).sort(), ["__proto__", "constructor", "hasOwnProperty", "toString"]);
    assert.deepEqual(back, tree);
  });

  test("writer misuse is a bug: a plain Error, not a FerryError", () => {
    const w = () => new NarWriter(() => {});
    const plain = (f: () => void, re: RegExp) => assert.throws(f, (e: unknown) => e instanceof Error && e.name === "Error" && re.test(e.message));
    plain(() => {
      const x = w();
      x.openDirectory();
      x.openEntry(new TextEncoder().encode("b"));
      x.symlink(new Uint8Array([0x61]));
      x.closeEntry();
      x.openEntry(new TextEncoder().encode("a"));
    }, /ascending/);
    plain(() => {
      const x = w();
      x.openDirectory();
      x.openEntry(new TextEncoder().encode("a/b"));
    }, /'\/'/);
    plain(() => {
      const x = w();
      x.openRegular(false, 2);
      x.writeContents(new Uint8Array(3));
    }, /more contents/);
    plain(() => {
      const x = w();
      x.openRegular(false, 2);
      x.writeContents(new Uint8Array(1));
      x.closeRegular();
    }, /missing/);
    plain(() => new NarWriter(() => {}, 4), /length prefix/);
  });

  test("narOfRegularFile gives a writer's bytes for one file, in scratch space or not", () => {
    const scratch = new Uint8Array(4096);
    for (const size of [0, 1, 7, 8, 9, 15, 16, 17, 1000, 4000, 4100, 70_000]) {
      const contents = new Uint8Array(size).map((_, i) => (i * 31 + size) & 0xff);
      const parts: Uint8Array[] = [];
      const w = new NarWriter((c) => parts.push(c.slice()));
      w.regular(false, contents);
      w.end();
      const want = Buffer.concat(parts);
      assert.ok(Buffer.from(narOfRegularFile(contents)).equals(want), `size ${size}`);
      const inScratch = narOfRegularFile(contents, scratch);
      assert.ok(Buffer.from(inScratch).equals(want), `size ${size} in scratch`);
      assert.equal(inScratch.buffer === scratch.buffer, want.length <= scratch.length);
    }
  });

  test("reserve/commit writes contents in place", () => {
    const parts: Uint8Array[] = [];
    const w = new NarWriter((c) => parts.push(c.slice()), 64);
    const data = new Uint8Array(1000).map((_, i) => i & 0xff);
    w.openRegular(true, data.length);
    let o = 0;
    while (w.remaining > 0) {
      const view = w.reserve(w.remaining);
      assert.ok(view.length > 0);
      view.set(data.subarray(o, o + view.length));
      w.commit(view.length);
      o += view.length;
    }
    w.closeRegular();
    w.end();
    assert.deepEqual(Buffer.concat(parts), Buffer.from(narOfTree({ type: "regular", executable: true, contents: data })));
  });
});

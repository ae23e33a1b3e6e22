import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { NarParser, parseNarBytes, type NarParserLimits } from "../../src/core/nar/parser.js";
import { narOfTree, treeOfEvents, type NarTree } from "../../src/core/nar/tree.js";
import { throwsFerry } from "../helpers/errors.js";
import type { FerryError } from "../../src/core/errors.js";

const enc = new TextEncoder();

/** The NAR `str` primitive. */
function str(s: string | Uint8Array): Uint8Array {
  const b = typeof s === "string" ? enc.encode(s) : s;
  const out = new Uint8Array(8 + b.length + ((8 - (b.length % 8)) % 8));
  new DataView(out.buffer).setUint32(0, b.length, true);
  out.set(b, 8);
  return out;
}

/** Concatenated `str` tokens. */
function toks(...parts: (string | Uint8Array)[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts.map(str)));
}

function cat(...parts: Uint8Array[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts));
}

const MAGIC = ["nix-archive-1"];
const file = (contents: string) => ["(", "type", "regular", "contents", contents, ")"];
const entry = (name: string | Uint8Array, node: (string | Uint8Array)[]) => ["entry", "(", "name", name, "node", ...node, ")"];
const dir = (...entries: (string | Uint8Array)[][]) => ["(", "type", "directory", ...entries.flat(), ")"];

/** Asserts that parsing `nar` fails with FERRY_NAR_INVALID at `offset`, in one chunk and byte by byte. */
function rejects(nar: Uint8Array, offset: number, message: RegExp, limits?: NarParserLimits): FerryError {
  const e = throwsFerry(() => parseNarBytes(nar, limits), "FERRY_NAR_INVALID", message);
  assert.equal(e.details.offset, offset, e.message);
  assert.match(e.message, new RegExp(`at byte ${offset}:`));
  assert.ok(e.hint);
  const e1 = throwsFerry(() => {
    const p = new NarParser(() => {}, limits);
    for (let i = 0; i < nar.length; i++) p.push(nar.subarray(i, i + 1));
    p.end();
  }, "FERRY_NAR_INVALID", message);
  assert.equal(e1.details.offset, offset, `byte by byte: ${e1.message}`);
  return e;
}

describe("NarParser accepts", () => {
  test("a hand-built NAR equal to the writer's", () => {
    const nar = toks(...MAGIC, ...dir(entry("a", file("x")), entry("b", ["(", "type", "symlink", "target", "a", ")"])));
    const tree: NarTree = {
      type: "directory",
      entries: { a: { type: "regular", executable: false, contents: enc.encode("x") }, b: { type: "symlink", target: "a" } },
    };
    assert.deepEqual(Buffer.from(nar), Buffer.from(narOfTree(tree)));
    assert.deepEqual(treeOfEvents(parseNarBytes(nar)), tree);
  });

  test("pushPartial stops exactly at the end of the archive", () => {
    const nar = toks(...MAGIC, ...file("hello"));
    const p = new NarParser(() => {});
    const used = p.pushPartial(cat(nar, new Uint8Array([1, 2, 3])));
    assert.equal(used, nar.length);
    assert.ok(p.done);
    p.end();
  });
});

describe("NarParser rejects", () => {
  test("a wrong magic", () => {
    rejects(toks("nix-archive-2", ...file("")), 0, /magic/);
    rejects(toks("(", ...file("")), 0, /magic/);
    rejects(new Uint8Array(16), 0, /magic/);
  });

  test("non-zero padding, in a keyword and in file contents", () => {
    const good = toks(...MAGIC, ...file("hello"));
    const a = good.slice();
    a[8 + 13] = 1; // first padding byte after 'nix-archive-1'
    rejects(a, 21, /non-zero padding/);
    const contentsAt = toks(...MAGIC, "(", "type", "regular", "contents").length;
    const b = good.slice();
    b[contentsAt + 8 + 5 + 2] = 0x80; // last padding byte after 'hello'
    rejects(b, contentsAt + 15, /non-zero padding/);
  });

  test("unsorted entries", () => {
    const nar = toks(...MAGIC, ...dir(entry("b", file("")), entry("a", file(""))));
    const at = toks(...MAGIC, "(", "type", "directory", ...entry("b", file("")), "entry", "(", "name").length;
    rejects(nar, at, /"a" comes after "b".*sorted/);
  });

  test("entries sorted by UTF-16 instead of UTF-8 bytes", () => {
    const nar = toks(...MAGIC, ...dir(entry("u-😀", file("")), entry("u-～", file(""))));
    rejects(nar, toks(...MAGIC, "(", "type", "directory", ...entry("u-😀", file("")), "entry", "(", "name").length, /sorted/);
  });

  test("duplicate entries", () => {
    const nar = toks(...MAGIC, ...dir(entry("a", file("")), entry("a", file("x"))));
    const at = toks(...MAGIC, "(", "type", "directory", ...entry("a", file("")), "entry", "(", "name").length;
    rejects(nar, at, /duplicate entry "a"/);
  });

  test("duplicates in a nested directory; equal names in different directories are fine", () => {
    const ok = toks(...MAGIC, ...dir(entry("a", dir(entry("a", file("")))), entry("b", dir(entry("a", file(""))))));
    assert.doesNotThrow(() => parseNarBytes(ok));
    const bad = toks(...MAGIC, ...dir(entry("d", dir(entry("x", file("")), entry("x", file(""))))));
    const at = toks(...MAGIC, "(", "type", "directory", "entry", "(", "name", "d", "node", "(", "type", "directory", ...entry("x", file("")), "entry", "(", "name").length;
    rejects(bad, at, /duplicate/);
  });

  const nameAt = toks(...MAGIC, "(", "type", "directory", "entry", "(", "name").length;
  const badNames: [string, string | Uint8Array, RegExp][] = [
    ["empty", "", /empty/],
    [".", ".", /named '\.'/],
    ["..", "..", /named '\.\.'/],
    ["with a slash", "a/b", /contains '\/'/],
    ["a lone slash", "/", /contains '\/'/],
    ["with NUL", new Uint8Array([0x61, 0, 0x62]), /NUL/],
  ];
  for (const [label, name, msg] of badNames) {
    test(`an entry name ${label}`, () => {
      rejects(toks(...MAGIC, ...dir(entry(name, file("")))), nameAt, msg);
    });
  }
  test("names that merely look special are fine", () => {
    for (const name of ["...", ".a", "a.", " ", "\\", "\u00ff"]) {
      assert.doesNotThrow(() => parseNarBytes(toks(...MAGIC, ...dir(entry(name, file(""))))), name);
    }
  });

  test("an unknown node type", () => {
    const at = toks(...MAGIC, "(", "type").length;
    rejects(toks(...MAGIC, "(", "type", "fifo", ")"), at, /unknown node type "fifo"/);
    rejects(toks(...MAGIC, "(", "type", "Regular", ")"), at, /unknown node type/);
  });

  test("unknown or misplaced tokens", () => {
    rejects(toks(...MAGIC, "(", "kind", "regular", "contents", "", ")"), 24 + 16, /expected 'type', found "kind"/);
    const afterRegular = toks(...MAGIC, "(", "type", "regular").length;
    rejects(toks(...MAGIC, "(", "type", "regular", "contentz", "", ")"), afterRegular, /expected 'executable' or 'contents'/);
    rejects(toks(...MAGIC, "(", "type", "regular", "executable", "x", "contents", "", ")"), afterRegular + 24, /empty string after 'executable'/);
    rejects(toks(...MAGIC, "(", "type", "symlink", "contents", "x", ")"), toks(...MAGIC, "(", "type", "symlink").length, /expected 'target'/);
    const afterDir = toks(...MAGIC, "(", "type", "directory").length;
    rejects(toks(...MAGIC, "(", "type", "directory", "entries", ")"), afterDir, /expected 'entry' or '\)'/);
    rejects(toks(...MAGIC, "(", "type", "directory", "entry", "(", "nam", "a"), afterDir + 16 + 16, /expected 'name'/);
    rejects(toks(...MAGIC, ...file("x").slice(0, -1), "("), toks(...MAGIC, ...file("x").slice(0, -1)).length, /expected '\)'/);
    rejects(toks(...MAGIC, "[", "type", "regular", "contents", "", ")"), 24, /expected '\('/);
    // an entry's closing ')' is required
    const noClose = toks(...MAGIC, "(", "type", "directory", "entry", "(", "name", "a", "node", ...file(""), "entry");
    rejects(noClose, toks(...MAGIC, "(", "type", "directory", "entry", "(", "name", "a", "node", ...file("")).length, /'\)' closing the entry/);
  });

  test("truncation at every byte, reported by end()", () => {
    const nar = narOfTree({
      type: "directory",
      entries: {
        bin: { type: "directory", entries: { x: { type: "regular", executable: true, contents: enc.encode("#!/bin/sh\n") } } },
        l: { type: "symlink", target: "bin/x" },
      },
    });
    for (let n = 0; n < nar.length; n++) {
      const p = new NarParser(() => {});
      p.push(nar.subarray(0, n));
      assert.equal(p.done, false);
      const e = throwsFerry(() => p.end(), "FERRY_NAR_INVALID", /truncated/);
      assert.equal(e.details.offset, n);
    }
  });

  test("trailing bytes after the archive, in the same chunk or a later one", () => {
    const nar = toks(...MAGIC, ...file("x"));
    rejects(cat(nar, new Uint8Array(8)), nar.length, /after the end/);
    rejects(cat(nar, new Uint8Array([0])), nar.length, /after the end/);
    const p = new NarParser(() => {});
    p.push(nar);
    const e = throwsFerry(() => p.push(new Uint8Array([7])), "FERRY_NAR_INVALID", /after the end/);
    assert.equal(e.details.offset, nar.length);
  });

  test("a file longer than maxFileSize", () => {
    const at = toks(...MAGIC, "(", "type", "regular", "contents").length;
    assert.doesNotThrow(() => parseNarBytes(toks(...MAGIC, ...file("1234")), { maxFileSize: 4 }));
    rejects(toks(...MAGIC, ...file("12345")), at, /5 bytes is over the limit of 4/, { maxFileSize: 4 });
    // a length prefix of 2^64-1 is rejected before any contents arrive
    const huge = cat(toks(...MAGIC, "(", "type", "regular", "contents"), new Uint8Array(8).fill(0xff));
    const e = throwsFerry(() => new NarParser(() => {}).push(huge), "FERRY_NAR_INVALID", /over the limit/);
    assert.equal(e.details.offset, at);
  });

  test("a token longer than maxTokenLength (names, targets, keywords)", () => {
    const limits = { maxTokenLength: 8 };
    assert.doesNotThrow(() => parseNarBytes(toks(...MAGIC, "(", "type", "symlink", "target", "12345678", ")"), { maxTokenLength: 13 }));
    // the magic itself is 13 bytes
    rejects(toks(...MAGIC, ...file("")), 0, /13 bytes is over the limit of 8/, limits);
    const l13 = { maxTokenLength: 13 };
    rejects(toks(...MAGIC, "(", "type", "symlink", "target", "12345678901234", ")"), toks(...MAGIC, "(", "type", "symlink", "target").length, /14 bytes is over the limit of 13.*symlink target/, l13);
    rejects(toks(...MAGIC, ...dir(entry("abcdefghijklmn", file("")))), nameAt, /over the limit.*entry name/, l13);
    // file contents are not tokens: a long file passes a small token limit
    assert.doesNotThrow(() => parseNarBytes(toks(...MAGIC, ...file("x".repeat(100))), l13));
  });

  test("directories nested deeper than maxDepth", () => {
    const nest = (depth: number): (string | Uint8Array)[] => (depth === 0 ? file("") : dir(entry("d", nest(depth - 1))));
    assert.doesNotThrow(() => parseNarBytes(toks(...MAGIC, ...nest(3)), { maxDepth: 3 }));
    const nar = toks(...MAGIC, ...nest(4));
    // the fourth 'directory' keyword is the offending token
    const prefix = toks(...MAGIC, "(", "type", "directory", "entry", "(", "name", "d", "node", "(", "type", "directory", "entry", "(", "name", "d", "node", "(", "type", "directory", "entry", "(", "name", "d", "node", "(", "type");
    rejects(nar, prefix.length, /nested deeper than 3/, { maxDepth: 3 });
  });
});

describe("NAR symlink targets", () => {
  const enc = new TextEncoder();
  for (const [label, target] of [["empty", ""], ["with a NUL byte", "a\0b"]] as const) {
    test(`a symlink target that is ${label} is rejected with its offset`, () => {
      const good = narOfTree({ type: "symlink", target: "xx" });
      const at = Buffer.from(good).indexOf(Buffer.from("xx")) - 8;
      const lenBytes = new Uint8Array(8);
      lenBytes[0] = enc.encode(target).length;
      const padded = new Uint8Array(((enc.encode(target).length + 7) >> 3) << 3);
      padded.set(enc.encode(target));
      const bad = Buffer.concat([good.subarray(0, at), lenBytes, padded, good.subarray(at + 16)]);
      const p = new NarParser(() => {});
      assert.throws(() => {
        p.push(bad);
        p.end();
      }, (e: unknown) => (e as { code?: string }).code === "FERRY_NAR_INVALID" && (e as Error).message.includes(`byte ${at}`));
    });
  }
});

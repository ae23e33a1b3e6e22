import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { sha256 } from "../../src/core/digest.js";
import { makeHash, printHash } from "../../src/core/hash.js";
import { ExportReader, exportEnd, exportEntryStart, exportEntryTrailer, type ExportMeta } from "../../src/core/export-stream.js";
import { NarParser, parseNarBytes, type NarEvent } from "../../src/core/nar/parser.js";
import { treeOfEvents } from "../../src/core/nar/tree.js";
import { throwsFerry } from "../helpers/errors.js";
import { fromBase64, loadVectors } from "../helpers/vectors.js";

interface ExportVector {
  store_dir: string;
  store_path: string;
  references: string[];
  deriver: string | null;
  export_base64: string;
}

const file = loadVectors<ExportVector>("export.json");
const narinfos = loadVectors<{ store_path: string; narinfo_text: string }>("narinfo.json").vectors;
const storePaths = loadVectors<{ store_path?: string; nix_path_info?: { narHash: string } }>("store-paths.json").vectors;

/** The NAR inside a single-object export stream: it starts after the u64(1) marker. */
function narOfStream(stream: Uint8Array): Uint8Array {
  const p = new NarParser(() => {});
  const used = p.pushPartial(stream.subarray(8));
  assert.ok(p.done, "the NAR inside the stream is complete");
  return stream.slice(8, 8 + used);
}

interface Read {
  starts: number;
  nars: Uint8Array[];
  events: NarEvent[][];
  metas: ExportMeta[];
}

function readStream(bytes: Uint8Array, chunk: number): Read {
  const r: Read = { starts: 0, nars: [], events: [], metas: [] };
  const parts: Uint8Array[][] = [];
  const reader = new ExportReader({
    onStart() {
      r.starts++;
      parts.push([]);
      r.events.push([]);
    },
    onNarBytes(c) {
      parts[parts.length - 1]!.push(c.slice());
    },
    onNarEvent(e) {
      r.events[r.events.length - 1]!.push(e.kind === "contents" ? { kind: "contents", data: e.data.slice() } : e);
    },
    onObject(meta) {
      r.metas.push(meta);
    },
  });
  for (let o = 0; o < bytes.length; o += chunk) reader.push(bytes.subarray(o, o + chunk));
  reader.end();
  r.nars = parts.map((p) => new Uint8Array(Buffer.concat(p)));
  return r;
}

function metaOf(v: ExportVector): ExportMeta {
  return { storePath: v.store_path, references: v.references, deriver: v.deriver ?? undefined };
}

describe("export.json vectors", () => {
  for (const v of file.vectors) {
    test(v.store_path, () => {
      const stream = fromBase64(v.export_base64);
      const nar = narOfStream(stream);
      const built = Buffer.concat([exportEntryStart(), nar, exportEntryTrailer(metaOf(v)), exportEnd()]);
      assert.deepEqual(built, Buffer.from(stream));
      // references are written sorted whatever order they are given in
      const reversed = Buffer.concat([exportEntryStart(), nar, exportEntryTrailer({ ...metaOf(v), references: [...v.references].reverse() }), exportEnd()]);
      assert.deepEqual(reversed, Buffer.from(stream));

      // the NAR is the object's: its hash matches what other vectors say about the same path
      const sri = printHash(makeHash("sha256", sha256(nar)), "sri");
      const known = storePaths.find((x) => x.store_path === v.store_path)?.nix_path_info?.narHash;
      if (known) assert.equal(sri, known);
      const ni = narinfos.find((x) => x.store_path === v.store_path);
      if (ni) assert.match(ni.narinfo_text, new RegExp(`NarHash: sha256:${printHash(makeHash("sha256", sha256(nar)), "nix32")}\n`));

      const tree = treeOfEvents(parseNarBytes(nar));
      for (let chunk = 1; chunk <= 17; chunk++) {
        const r = readStream(stream, chunk);
        assert.equal(r.starts, 1, `chunk ${chunk}`);
        assert.deepEqual(r.metas, [metaOf(v)], `chunk ${chunk}`);
        assert.deepEqual(Buffer.from(r.nars[0]!), Buffer.from(nar), `chunk ${chunk}`);
        assert.deepEqual(treeOfEvents(r.events[0]!), tree, `chunk ${chunk}`);
      }
    });
  }

  test("all vectors in one stream (as `nix-store --export a b c` writes them)", () => {
    const objects = file.vectors.map((v) => fromBase64(v.export_base64)).map((s) => s.subarray(0, s.length - 8));
    const stream = new Uint8Array(Buffer.concat([...objects, exportEnd()]));
    for (const chunk of [1, 5, 13, 4096]) {
      const r = readStream(stream, chunk);
      assert.equal(r.starts, file.vectors.length);
      assert.deepEqual(r.metas, file.vectors.map(metaOf));
      r.nars.forEach((n, i) => assert.deepEqual(Buffer.from(n), Buffer.from(narOfStream(fromBase64(file.vectors[i]!.export_base64)))));
    }
  });

  test("an empty stream is just the end marker", () => {
    const r = readStream(exportEnd(), 1);
    assert.equal(r.starts, 0);
    assert.deepEqual(r.metas, []);
  });
});

describe("ExportReader rejects", () => {
  const v = file.vectors.find((x) => x.deriver !== null)!;
  const stream = fromBase64(v.export_base64);
  const narLen = narOfStream(stream).length;
  const noop = { onStart() {}, onNarBytes() {}, onNarEvent() {}, onObject() {} };
  const read = (bytes: Uint8Array, chunk = bytes.length || 1) => {
    const r = new ExportReader(noop);
    for (let o = 0; o < bytes.length; o += chunk) r.push(bytes.subarray(o, o + chunk));
    r.end();
  };

  test("truncation anywhere", () => {
    for (let n = 0; n < stream.length; n += 7) {
      const e = throwsFerry(() => read(stream.subarray(0, n)), "FERRY_EXPORT_INVALID", /truncated/);
      assert.equal(typeof e.details.offset, "number");
    }
  });

  test("bytes after the end marker", () => {
    throwsFerry(() => read(new Uint8Array(Buffer.concat([stream, new Uint8Array(8)]))), "FERRY_EXPORT_INVALID", /after the end/);
  });

  test("a marker other than 0 or 1", () => {
    const bad = stream.slice();
    bad[0] = 2;
    throwsFerry(() => read(bad), "FERRY_EXPORT_INVALID", /expected 0 or 1/);
  });

  test("a missing NIXE marker", () => {
    const bad = stream.slice();
    bad[8 + narLen] = bad[8 + narLen]! ^ 1;
    const e = throwsFerry(() => read(bad, 3), "FERRY_EXPORT_INVALID", /NIXE/);
    assert.equal(e.details.offset, 8 + narLen);
  });

  test("a legacy signature flag", () => {
    const bad = stream.slice();
    bad[bad.length - 16] = 1;
    throwsFerry(() => read(bad), "FERRY_EXPORT_INVALID", /signatures/);
  });

  test("non-zero padding in the metadata", () => {
    const bad = stream.slice();
    // the store path string follows NIXE: u64 length, then the bytes padded to 8
    const len = v.store_path.length;
    const padAt = 8 + narLen + 8 + 8 + len;
    assert.ok(len % 8 !== 0);
    bad[padAt] = 1;
    throwsFerry(() => read(bad), "FERRY_EXPORT_INVALID", /padding/);
  });

  test("a corrupt NAR inside the stream is a NAR error", () => {
    const bad = stream.slice();
    bad[8 + 8 + 13] = 1; // padding of the NAR magic
    throwsFerry(() => read(bad), "FERRY_NAR_INVALID", /padding/);
  });
});

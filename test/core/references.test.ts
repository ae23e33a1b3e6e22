import { describe, test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { NIX32_ALPHABET } from "../../src/core/hash.js";
import { ReferenceScanner, scanForReferences } from "../../src/core/references.js";
import { parseStorePath } from "../../src/core/store-path.js";
import { fromBase64, loadVectors } from "../helpers/vectors.js";

interface Realised {
  path: string;
  nar_base64: string;
  references: string[];
}
interface DrvVector {
  attr: string;
  store_dir: string;
  outputs: Record<string, string>;
  input_closure?: string[];
  realised?: Record<string, Realised>;
}

const file = loadVectors<DrvVector>("derivations.json");
const enc = new TextEncoder();

/** Splits `bytes` into chunks whose sizes cycle through `sizes`. */
function chunked(bytes: Uint8Array, sizes: readonly number[]): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let o = 0, k = 0; o < bytes.length; k++) {
    const n = sizes[k % sizes.length]!;
    out.push(bytes.subarray(o, o + n));
    o += n;
  }
  return out;
}

/** The oracle: a candidate is found exactly when its bytes occur somewhere in the stream. */
function naive(bytes: Uint8Array, candidates: readonly string[]): Set<string> {
  const hay = Buffer.from(bytes);
  return new Set(candidates.filter((c) => hay.includes(c, 0, "latin1")));
}

describe("reference scanning of the realised vectors (SPEC §7)", () => {
  for (const v of file.vectors.filter((x) => x.realised)) {
    for (const [o, r] of Object.entries(v.realised!)) {
      test(`${v.attr}.${o} in ${v.store_dir}`, () => {
        const candidates = [...new Set([...(v.input_closure ?? []), ...Object.values(v.outputs)])];
        const byHash = new Map(candidates.map((p) => [parseStorePath(v.store_dir, p).hashPart, p]));
        const nar = fromBase64(r.nar_base64);
        for (const sizes of [[nar.length], [1], [7, 31, 32, 33], [64, 5], [100]]) {
          const found = scanForReferences(chunked(nar, sizes), byHash.keys());
          assert.deepEqual([...found].map((h) => byHash.get(h)!).sort(), [...r.references].sort(), `chunks ${sizes.join(",")}`);
        }
      });
    }
  }

  test("the dependent output finds the closure member it mentions, and not the fake path", () => {
    const v = file.vectors.find((x) => x.attr === "dependent" && x.store_dir === "/nix/store")!;
    const nar = fromBase64(v.realised!.out!.nar_base64);
    const fake = "00000000000000000000000000000000";
    assert.ok(Buffer.from(nar).includes(fake));
    const found = scanForReferences([nar], [fake, "r6pfzy52d7z12dpal4r1kq9dq79ns37s"]);
    // the fake hash part is a candidate here, so it is found; in the vector it is not a candidate
    assert.deepEqual(found, new Set([fake, "r6pfzy52d7z12dpal4r1kq9dq79ns37s"]));
    assert.deepEqual(scanForReferences([nar], ["r6pfzy52d7z12dpal4r1kq9dq79ns37s"]), new Set(["r6pfzy52d7z12dpal4r1kq9dq79ns37s"]));
  });
});

const hashPartArb = fc.string({ unit: fc.constantFrom(...NIX32_ALPHABET), minLength: 32, maxLength: 32 });
/** Noise: random bytes, or runs of nix32 characters that make the scanner work hardest. */
const noiseArb = fc.oneof(
  fc.uint8Array({ maxLength: 80 }),
  fc.string({ unit: fc.constantFrom(...NIX32_ALPHABET), maxLength: 70 }).map((s) => enc.encode(s)),
  fc.constantFrom(enc.encode("/nix/store/"), enc.encode("-name\n"), new Uint8Array([0xff, 0x61])),
);

describe("ReferenceScanner properties", () => {
  test("finds exactly the candidates whose hash parts occur, whatever the chunking", () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(hashPartArb, { minLength: 1, maxLength: 8 }),
        fc.array(fc.tuple(noiseArb, fc.nat(), fc.boolean()), { maxLength: 12 }),
        fc.array(fc.integer({ min: 1, max: 70 }), { minLength: 1, maxLength: 6 }),
        (hashes, pieces, sizes) => {
          // some hash parts are candidates, the rest are decoys that must never be reported
          const candidates = hashes.filter((_, k) => k % 2 === 0);
          const parts: Uint8Array[] = [];
          const inserted = new Set<string>();
          for (const [noise, pick, cut] of pieces) {
            parts.push(noise);
            const h = hashes[pick % hashes.length]!;
            // sometimes only a prefix of a hash part, which must not count
            parts.push(enc.encode(cut ? h.slice(0, 31) : h));
            if (!cut) inserted.add(h);
          }
          const bytes = Buffer.concat(parts);
          const found = scanForReferences(chunked(bytes, sizes), candidates);
          assert.deepEqual(found, naive(bytes, candidates));
          for (const h of inserted) assert.equal(found.has(h), candidates.includes(h));
          for (const h of found) assert.ok(candidates.includes(h));
        },
      ),
      { numRuns: 300 },
    );
  });

  test("a hash part split across any two chunks is found", () => {
    const h = "r6pfzy52d7z12dpal4r1kq9dq79ns37s";
    const bytes = enc.encode(`xx/${h}/yy`);
    for (let cut = 0; cut <= bytes.length; cut++) {
      assert.deepEqual(scanForReferences([bytes.subarray(0, cut), bytes.subarray(cut)], [h]), new Set([h]), `cut at ${cut}`);
    }
    // and spread over one-byte chunks with empty ones between
    const s = new ReferenceScanner([h]);
    for (const b of bytes) s.update(new Uint8Array([b])).update(new Uint8Array(0));
    assert.deepEqual(s.found(), new Set([h]));
  });

  test("found() reports each hash once and is a copy", () => {
    const h = "0123456789abcdfghijklmnpqrsvwxyz";
    const s = new ReferenceScanner([h]);
    s.update(enc.encode(`${h} ${h}`));
    const f = s.found();
    f.clear();
    assert.deepEqual(s.found(), new Set([h]));
  });

  test("refuses candidates that are not hash parts", () => {
    assert.throws(() => new ReferenceScanner(["/nix/store/r6pfzy52d7z12dpal4r1kq9dq79ns37s-x"]));
    assert.throws(() => new ReferenceScanner(["r6pfzy52d7z12dpal4r1kq9dq79ns37e"]));
  });

  test("scans a few megabytes of random data and a long nix32 run", () => {
    const h = "r6pfzy52d7z12dpal4r1kq9dq79ns37s";
    const big = new Uint8Array(4 << 20);
    for (let i = 0; i < big.length; i += 65536) big.set(crypto.getRandomValues(new Uint8Array(65536)), i);
    big.set(enc.encode(h), 3_000_001);
    assert.deepEqual(scanForReferences(chunked(big, [65536, 4093]), [h, "0".repeat(32)]), naive(big, [h, "0".repeat(32)]));
    const run = enc.encode("a".repeat(1 << 20) + h + "b".repeat(1000));
    // the window that ends on the first character of h straddles the run and h
    assert.deepEqual(scanForReferences(chunked(run, [1 << 19, 3]), [h, "a".repeat(31) + "r", "a".repeat(31) + "b"]), new Set([h, "a".repeat(31) + "r"]));
  });
});

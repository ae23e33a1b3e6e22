import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { sha256, digestOf, DIGEST_SIZE, type HashAlgo } from "../../src/core/digest.js";
import {
  fromBase16,
  fromBase64,
  fromNix32,
  makeHash,
  nix32Length,
  NIX32_ALPHABET,
  parseDigest,
  parseHash,
  printHash,
  printPrefixedHash,
  toBase16,
  toBase64,
  toNix32,
  hashEquals,
  compressHash,
} from "../../src/core/hash.js";
import { throwsFerry } from "../helpers/errors.js";
import { fromHex, loadVectors } from "../helpers/vectors.js";

interface Base32Vector {
  algo: HashAlgo;
  bytes: number;
  hex: string;
  nix32: string;
  sri: string;
  input_utf8?: string;
}

const file = loadVectors<Base32Vector>("base32.json");

describe("base32.json vectors", () => {
  for (const v of file.vectors) {
    const label = `${v.algo} ${v.hex.slice(0, 16)}…${v.input_utf8 !== undefined ? ` (${JSON.stringify(v.input_utf8)})` : ""}`;
    test(label, () => {
      const digest = fromHex(v.hex);
      assert.equal(digest.length, v.bytes);
      assert.equal(DIGEST_SIZE[v.algo], v.bytes);
      if (v.input_utf8 !== undefined) assert.deepEqual(digestOf(v.algo, v.input_utf8), digest);

      // encodings, both ways
      assert.equal(nix32Length(v.bytes), v.nix32.length);
      assert.equal(toNix32(digest), v.nix32);
      assert.deepEqual(fromNix32(v.nix32, v.bytes), digest);
      assert.equal(toBase16(digest), v.hex);
      assert.deepEqual(fromBase16(v.hex), digest);
      assert.deepEqual(fromBase16(v.hex.toUpperCase()), digest);
      const h = makeHash(v.algo, digest);
      assert.equal(printHash(h, "sri"), v.sri);
      assert.equal(printHash(h, "nix32"), v.nix32);
      assert.equal(printHash(h, "base16"), v.hex);
      assert.equal(`${v.algo}-${printHash(h, "base64")}`, v.sri);
      assert.deepEqual(fromBase64(toBase64(digest)), digest);

      // every textual form parses back to the same hash
      const forms = [
        `${v.algo}:${v.nix32}`,
        `${v.algo}:${v.hex}`,
        `${v.algo}:${v.sri.slice(v.algo.length + 1)}`,
        v.sri,
        printPrefixedHash(h),
        printPrefixedHash(h, "base16"),
        printPrefixedHash(h, "base64"),
      ];
      for (const f of forms) assert.ok(hashEquals(parseHash(f), h), `parseHash(${f})`);
      assert.equal(printPrefixedHash(h), `${v.algo}:${v.nix32}`);
      // bare digests need a default algorithm
      for (const bare of [v.nix32, v.hex, v.sri.slice(v.algo.length + 1)]) {
        assert.ok(hashEquals(parseHash(bare, v.algo), h));
        assert.ok(hashEquals(parseDigest(v.algo, bare), h));
        throwsFerry(() => parseHash(bare), "FERRY_HASH_NO_ALGO");
      }
    });
  }

  test("sha256 strings start with 0 or 1 (the 4-bit overhang)", () => {
    for (const v of file.vectors.filter((x) => x.algo === "sha256")) assert.match(v.nix32, /^[01]/);
  });
});

describe("nix32 rejects what Nix rejects", () => {
  test("non-canonical overhang: a first digit too large for the digest", () => {
    // 52 chars carry 260 bits; sha256 has 256, so the first digit must be 0 or 1.
    const ones = "1" + "z".repeat(51);
    assert.deepEqual(fromNix32(ones, 32), new Uint8Array(32).fill(0xff));
    for (const first of ["2", "3", "9", "z"]) {
      throwsFerry(() => fromNix32(first + "0".repeat(51), 32), "FERRY_HASH_BAD_NIX32", /canonical/);
      throwsFerry(() => parseHash(`sha256:${first}${"0".repeat(51)}`), "FERRY_HASH_BAD_NIX32");
    }
    // md5: 26 chars carry 130 bits, 2 too many, so the first digit is 0-7 (SPEC §1.2 says 0-3,
    // but the md5 vector itself starts with '4'); sha512: 515 bits, 3 too many, so 0-3
    assert.doesNotThrow(() => fromNix32("7" + "0".repeat(25), 16));
    throwsFerry(() => fromNix32("8" + "0".repeat(25), 16), "FERRY_HASH_BAD_NIX32");
    assert.doesNotThrow(() => fromNix32("3" + "0".repeat(102), 64));
    throwsFerry(() => fromNix32("4" + "0".repeat(102), 64), "FERRY_HASH_BAD_NIX32");
    // 20 bytes are exactly 32 digits: no overhang, everything canonical
    assert.deepEqual(fromNix32("z".repeat(32), 20), new Uint8Array(20).fill(0xff));
  });

  test("characters outside the alphabet (e, o, t, u, capitals, non-ASCII)", () => {
    const good = "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq";
    for (const bad of ["e", "o", "t", "u", "A", "Z", "-", "=", " ", "é", "\u0000"]) {
      const s = good.slice(0, 20) + bad + good.slice(21);
      throwsFerry(() => fromNix32(s, 32), "FERRY_HASH_BAD_NIX32", /alphabet/);
      throwsFerry(() => parseHash(`sha256:${s}`), "FERRY_HASH_BAD_NIX32");
    }
    for (const c of NIX32_ALPHABET) assert.doesNotThrow(() => fromNix32(good.slice(0, 51) + c, 32));
  });

  test("wrong lengths", () => {
    throwsFerry(() => fromNix32("0".repeat(51), 32), "FERRY_HASH_BAD_NIX32");
    throwsFerry(() => parseHash("sha256:" + "0".repeat(51)), "FERRY_HASH_BAD_LENGTH");
    throwsFerry(() => parseHash("sha256-AAAA"), "FERRY_HASH_BAD_LENGTH");
    throwsFerry(() => parseHash("sha257:" + "0".repeat(52)), "FERRY_HASH_UNKNOWN_ALGO");
    throwsFerry(() => fromBase16("abc"), "FERRY_HASH_BAD_BASE16");
    throwsFerry(() => fromBase16("zz"), "FERRY_HASH_BAD_BASE16");
    throwsFerry(() => fromBase64("AAA"), "FERRY_HASH_BAD_BASE64");
  });
});

describe("nix32 encoding properties", () => {
  test("round trip over every digest size and single-bit values", () => {
    for (const size of [16, 20, 32, 64]) {
      for (let bit = 0; bit < size * 8; bit++) {
        const d = new Uint8Array(size);
        d[bit >> 3] = 1 << (bit & 7);
        const s = toNix32(d);
        assert.equal(s.length, nix32Length(size));
        assert.deepEqual(fromNix32(s, size), d);
        // one set bit is one non-zero digit, and it is a power of two
        const nonZero = [...s].filter((c) => c !== "0");
        assert.equal(nonZero.length, 1);
        assert.ok([1, 2, 4, 8, 16].includes(NIX32_ALPHABET.indexOf(nonZero[0]!)));
      }
    }
  });

  test("compressHash folds by XOR into 20 bytes", () => {
    const d = sha256("x");
    const c = compressHash(d, 20);
    for (let i = 0; i < 20; i++) assert.equal(c[i], d[i]! ^ (i + 20 < 32 ? d[i + 20]! : 0));
  });
});

/**
 * Hash values and their textual forms, as Nix 2.8 reads and writes them (SPEC §1):
 * base16 (lowercase hex), nix32 (Nix's own base-32), base64, SRI (`sha256-<base64>`) and the
 * prefixed form `algo:<encoded>` whose encoding is told apart by length.
 */
import { DIGEST_SIZE, HASH_ALGOS, type HashAlgo } from "./digest.js";
import { FerryError } from "./errors.js";

export type { HashAlgo } from "./digest.js";

export type HashEncoding = "base16" | "nix32" | "base64" | "sri";

/** An immutable (algorithm, digest) pair. */
export interface Hash {
  readonly algo: HashAlgo;
  readonly digest: Uint8Array;
}

export function makeHash(algo: HashAlgo, digest: Uint8Array): Hash {
  if (digest.length !== DIGEST_SIZE[algo]) {
    throw new Error(`a ${algo} digest is ${DIGEST_SIZE[algo]} bytes, not ${digest.length}`);
  }
  return Object.freeze({ algo, digest });
}

// ---- base16 ---------------------------------------------------------------------------------

const HEX = "0123456789abcdef";
const HEX_CODES = Array.from(HEX, (c) => c.charCodeAt(0));

/** Writes `bytes` in lowercase hex; the string is made in one piece (not a chain of concatenations). */
export function toBase16(bytes: Uint8Array): string {
  const codes = new Array<number>(bytes.length * 2);
  for (let i = 0; i < bytes.length; i++) {
    codes[2 * i] = HEX_CODES[bytes[i]! >> 4]!;
    codes[2 * i + 1] = HEX_CODES[bytes[i]! & 15]!;
  }
  return String.fromCharCode(...codes);
}

export function fromBase16(s: string): Uint8Array {
  if (s.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(s)) {
    throw new FerryError("FERRY_HASH_BAD_BASE16", `'${s}' is not a base-16 string`, {
      hint: "base-16 hashes use only the characters 0-9 and a-f, two per byte",
    });
  }
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(2 * i, 2 * i + 2), 16);
  return out;
}

// ---- nix32 ----------------------------------------------------------------------------------

/** The digits, then the lowercase letters without e, o, t and u. */
export const NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz";

const NIX32_VALUE = (() => {
  const t = new Int8Array(128).fill(-1);
  for (let i = 0; i < NIX32_ALPHABET.length; i++) t[NIX32_ALPHABET.charCodeAt(i)] = i;
  return t;
})();

/** Characters needed to write `n` bytes in nix32. */
export function nix32Length(n: number): number {
  return Math.floor((n * 8 - 1) / 5) + 1;
}

/** True when `c` (a char code) is a nix32 digit; used by reference scanning. */
export function isNix32Char(c: number): boolean {
  return c < 128 && NIX32_VALUE[c]! >= 0;
}

const NIX32_CODES = Array.from(NIX32_ALPHABET, (c) => c.charCodeAt(0));

/** Writes `bytes` in nix32; the string is made in one piece (not a chain of concatenations). */
export function toNix32(bytes: Uint8Array): string {
  const len = nix32Length(bytes.length);
  const codes = new Array<number>(len);
  for (let n = len - 1; n >= 0; n--) {
    const b = n * 5;
    const i = b >> 3;
    const j = b & 7;
    const c = ((bytes[i]! >> j) | (i + 1 < bytes.length ? bytes[i + 1]! << (8 - j) : 0)) & 31;
    codes[len - 1 - n] = NIX32_CODES[c]!;
  }
  return String.fromCharCode(...codes);
}

/** Decodes nix32 into `size` bytes; rejects foreign characters and a non-canonical overhang. */
export function fromNix32(s: string, size: number): Uint8Array {
  if (s.length !== nix32Length(size)) {
    throw new FerryError("FERRY_HASH_BAD_NIX32", `'${s}' has ${s.length} characters; ${size} bytes take ${nix32Length(size)} in nix32`);
  }
  const out = new Uint8Array(size);
  for (let n = 0; n < s.length; n++) {
    const code = s.charCodeAt(s.length - 1 - n);
    const digit = code < 128 ? NIX32_VALUE[code]! : -1;
    if (digit < 0) {
      throw new FerryError("FERRY_HASH_BAD_NIX32", `'${s}' has the character '${s[s.length - 1 - n]}', which is not in Nix's base-32 alphabet`, {
        hint: `nix32 uses ${NIX32_ALPHABET}`,
      });
    }
    const b = n * 5;
    const i = b >> 3;
    const j = b & 7;
    out[i]! |= (digit << j) & 0xff;
    const carry = digit >> (8 - j);
    if (i + 1 < size) out[i + 1]! |= carry;
    else if (carry) {
      throw new FerryError("FERRY_HASH_BAD_NIX32", `'${s}' is not a canonical nix32 encoding of ${size} bytes (its value is too large)`);
    }
  }
  return out;
}

// ---- base64 ---------------------------------------------------------------------------------

export function toBase64(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64");
}

export function fromBase64(s: string): Uint8Array {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(s) || s.length % 4 !== 0) {
    throw new FerryError("FERRY_HASH_BAD_BASE64", `'${s}' is not valid base-64`);
  }
  return new Uint8Array(Buffer.from(s, "base64"));
}

// ---- whole hashes ---------------------------------------------------------------------------

export function isHashAlgo(s: string): s is HashAlgo {
  return (HASH_ALGOS as readonly string[]).includes(s);
}

export function parseHashAlgo(s: string): HashAlgo {
  if (!isHashAlgo(s)) {
    throw new FerryError("FERRY_HASH_UNKNOWN_ALGO", `unknown hash algorithm '${s}'`, { hint: `use one of ${HASH_ALGOS.join(", ")}` });
  }
  return s;
}

/** Prints the digest alone in the given encoding (`sri` includes the algorithm). */
export function printHash(h: Hash, enc: HashEncoding): string {
  switch (enc) {
    case "base16":
      return toBase16(h.digest);
    case "nix32":
      return toNix32(h.digest);
    case "base64":
      return toBase64(h.digest);
    case "sri":
      return `${h.algo}-${toBase64(h.digest)}`;
  }
}

/** `algo:<encoded>`, the form narinfo and `nix-store -q --hash` use (nix32 by default). */
export function printPrefixedHash(h: Hash, enc: Exclude<HashEncoding, "sri"> = "nix32"): string {
  return `${h.algo}:${printHash(h, enc)}`;
}

/** Decodes a bare digest of a known algorithm, telling the encoding apart by its length. */
export function parseDigest(algo: HashAlgo, s: string): Hash {
  const size = DIGEST_SIZE[algo];
  if (s.length === size * 2) return makeHash(algo, fromBase16(s));
  if (s.length === nix32Length(size)) return makeHash(algo, fromNix32(s, size));
  if (s.length === Math.ceil(size / 3) * 4) {
    const d = fromBase64(s);
    if (d.length === size) return makeHash(algo, d);
  }
  throw new FerryError("FERRY_HASH_BAD_LENGTH", `'${s}' is not a ${algo} hash in base-16, nix32 or base-64 (wrong length ${s.length})`, {
    hint: `a ${algo} hash is ${size * 2} hex, ${nix32Length(size)} nix32 or ${Math.ceil(size / 3) * 4} base-64 characters`,
  });
}

/**
 * Parses `algo:digest`, `algo-base64` (SRI) or, when `defaultAlgo` is given, a bare digest.
 * A bare digest with no algorithm and no default is rejected, as in narinfo (SPEC §9.5).
 */
export function parseHash(s: string, defaultAlgo?: HashAlgo): Hash {
  const colon = s.indexOf(":");
  if (colon > 0) return parseDigest(parseHashAlgo(s.slice(0, colon)), s.slice(colon + 1));
  const dash = s.indexOf("-");
  if (dash > 0 && isHashAlgo(s.slice(0, dash))) {
    const algo = s.slice(0, dash) as HashAlgo;
    const d = fromBase64(s.slice(dash + 1));
    if (d.length !== DIGEST_SIZE[algo]) {
      throw new FerryError("FERRY_HASH_BAD_LENGTH", `SRI hash '${s}' has ${d.length} bytes; ${algo} has ${DIGEST_SIZE[algo]}`);
    }
    return makeHash(algo, d);
  }
  if (defaultAlgo) return parseDigest(defaultAlgo, s);
  throw new FerryError("FERRY_HASH_NO_ALGO", `hash '${s}' does not say its algorithm`, {
    hint: "write it as sha256:<digest> or in SRI form sha256-<base64>",
  });
}

export function hashEquals(a: Hash, b: Hash): boolean {
  if (a.algo !== b.algo || a.digest.length !== b.digest.length) return false;
  for (let i = 0; i < a.digest.length; i++) if (a.digest[i] !== b.digest[i]) return false;
  return true;
}

/** Folds a digest into `size` bytes by XOR, as Nix does to make 20-byte store path hashes. */
export function compressHash(digest: Uint8Array, size: number): Uint8Array {
  const out = new Uint8Array(size);
  for (let i = 0; i < digest.length; i++) out[i % size]! ^= digest[i]!;
  return out;
}

/** `compressHash` for a digest held as a binary string (one character U+0000–U+00FF per byte). */
export function compressBinaryHash(digest: string, size: number): Uint8Array {
  const out = new Uint8Array(size);
  for (let i = 0; i < digest.length; i++) out[i % size]! ^= digest.charCodeAt(i);
  return out;
}

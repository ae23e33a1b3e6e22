/**
 * Reference scanning (SPEC §7): which of a set of candidate store paths a byte stream (an
 * output's NAR) mentions, matched by their 32-character nix32 hash parts alone.
 *
 * The scan looks at 32-byte windows. Checking a window from its right end, a byte outside the
 * nix32 alphabet rules out every window that contains it, so the scan jumps past it; on
 * incompressible data that skips about 28 bytes per look. A window of nix32 characters is
 * looked up in a bitmap of the candidates' first four characters before any string is made.
 */
import { NIX32_ALPHABET } from "./hash.js";
import { HASH_PART_LENGTH } from "./store-path.js";

const W = HASH_PART_LENGTH;

/** Byte → nix32 digit value + 1, or 0 for a byte outside the alphabet. */
const DIGIT1 = (() => {
  const t = new Uint8Array(256);
  for (let i = 0; i < NIX32_ALPHABET.length; i++) t[NIX32_ALPHABET.charCodeAt(i)] = i + 1;
  return t;
})();

/** The 20-bit key of a window's first four characters (each a 5-bit digit). */
function prefixKey(b: Uint8Array, i: number): number {
  return ((DIGIT1[b[i]!]! - 1) << 15) | ((DIGIT1[b[i + 1]!]! - 1) << 10) | ((DIGIT1[b[i + 2]!]! - 1) << 5) | (DIGIT1[b[i + 3]!]! - 1);
}

function isHashPart(s: string): boolean {
  if (s.length !== W) return false;
  for (let i = 0; i < W; i++) {
    const c = s.charCodeAt(i);
    if (c > 255 || DIGIT1[c] === 0) return false;
  }
  return true;
}

/**
 * Scans a byte stream given in chunks of any size for candidate hash parts. Keeps the last 31
 * bytes of each chunk so a hash part split across chunks is found.
 */
export class ReferenceScanner {
  /** Candidates not seen yet. */
  private readonly remaining = new Set<string>();
  private readonly seen = new Set<string>();
  /** Bit k set when some candidate's first four characters have key k. */
  private readonly prefixes = new Uint32Array(1 << 15);
  /** The stream's last (up to) 31 bytes, then room for the next chunk's first 31. */
  private readonly seam = new Uint8Array(2 * (W - 1));
  private tailLength = 0;

  /** `candidates` are 32-character nix32 hash parts; anything else is a bug in the caller. */
  constructor(candidates: Iterable<string>) {
    const buf = new Uint8Array(W);
    for (const c of candidates) {
      if (!isHashPart(c)) throw new Error(`reference candidate '${c}' is not a 32-character nix32 hash part`);
      this.remaining.add(c);
      for (let i = 0; i < 4; i++) buf[i] = c.charCodeAt(i);
      const k = prefixKey(buf, 0);
      this.prefixes[k >>> 5]! |= 1 << (k & 31);
    }
  }

  /** Scans the next chunk of the stream. The chunk is not kept. */
  update(chunk: Uint8Array): this {
    if (this.remaining.size === 0 || chunk.length === 0) return this.keepTail(chunk);
    // windows that straddle the previous chunk and this one
    if (this.tailLength > 0) {
      const head = Math.min(chunk.length, W - 1);
      this.seam.set(chunk.subarray(0, head), this.tailLength);
      this.scan(this.seam, this.tailLength + head);
    }
    this.scan(chunk, chunk.length);
    return this.keepTail(chunk);
  }

  /** The candidates seen so far. */
  found(): Set<string> {
    return new Set(this.seen);
  }

  private keepTail(chunk: Uint8Array): this {
    const seam = this.seam;
    const keep = W - 1;
    if (chunk.length >= keep) {
      seam.set(chunk.subarray(chunk.length - keep));
      this.tailLength = keep;
    } else {
      const fromOld = Math.min(this.tailLength, keep - chunk.length);
      seam.copyWithin(0, this.tailLength - fromOld, this.tailLength);
      seam.set(chunk, fromOld);
      this.tailLength = fromOld + chunk.length;
    }
    return this;
  }

  private scan(b: Uint8Array, n: number): void {
    const digit = DIGIT1;
    const prefixes = this.prefixes;
    let i = 0;
    // b[i .. i+valid) are known to be nix32 characters
    let valid = 0;
    while (i + W <= n) {
      let j = W - 1;
      while (j >= valid && digit[b[i + j]!] !== 0) j--;
      if (j >= valid) {
        // b[i+j] is not nix32: no window containing it can match
        i += j + 1;
        valid = W - 1 - j;
        continue;
      }
      // a run of nix32 characters: slide one byte at a time, rolling the prefix key
      let key = prefixKey(b, i);
      for (;;) {
        if ((prefixes[key >>> 5]! & (1 << (key & 31))) !== 0) this.lookup(b, i);
        i++;
        if (i + W > n) return;
        if (digit[b[i + W - 1]!] === 0) {
          i += W;
          valid = 0;
          break;
        }
        key = ((key << 5) | (digit[b[i + 3]!]! - 1)) & 0xfffff;
      }
    }
  }

  private lookup(b: Uint8Array, i: number): void {
    let s = "";
    for (let j = 0; j < W; j++) s += String.fromCharCode(b[i + j]!);
    if (this.remaining.delete(s)) this.seen.add(s);
  }
}

/** The candidate hash parts that occur in the concatenation of `chunks`. */
export function scanForReferences(chunks: Iterable<Uint8Array>, candidates: Iterable<string>): Set<string> {
  const scanner = new ReferenceScanner(candidates);
  for (const c of chunks) scanner.update(c);
  return scanner.found();
}

/**
 * The one place core/ reaches for a hash function. node:crypto is pure computation here (no I/O);
 * a browser bundle replaces this module with a WebCrypto/JS implementation of the same surface.
 */
import { createHash, hash as oneShotHash, type Hash as NodeHash } from "node:crypto";

export type HashAlgo = "md5" | "sha1" | "sha256" | "sha512";

export const HASH_ALGOS: readonly HashAlgo[] = ["md5", "sha1", "sha256", "sha512"];

/** Digest length in bytes per algorithm. */
export const DIGEST_SIZE: Readonly<Record<HashAlgo, number>> = { md5: 16, sha1: 20, sha256: 32, sha512: 64 };

export interface Hasher {
  update(data: Uint8Array | string): Hasher;
  /** Finishes the hash; the hasher must not be used afterwards. */
  digest(): Uint8Array;
}

export function createHasher(algo: HashAlgo): Hasher {
  const h: NodeHash = createHash(algo);
  const self: Hasher = {
    update(data) {
      h.update(data);
      return self;
    },
    digest() {
      return new Uint8Array(h.digest());
    },
  };
  return self;
}

export function digestOf(algo: HashAlgo, data: Uint8Array | string): Uint8Array {
  // Node's "buffer" output takes a slow path (0.7 µs more per call than a string output, which
  // matters at a hundred thousand .drv files); one character per byte converts back cheaply.
  const s = oneShotHash(algo, data, "binary");
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

export function sha256(data: Uint8Array | string): Uint8Array {
  return digestOf("sha256", data);
}

/** The sha256 digest of `data` (a string is hashed as UTF-8) in lowercase hex. */
export function sha256Hex(data: Uint8Array | string): string {
  return oneShotHash("sha256", data, "hex");
}

/** The sha256 digest of `data` as a 32-character string, one character (U+0000–U+00FF) per byte. */
export function sha256Binary(data: Uint8Array | string): string {
  return oneShotHash("sha256", data, "binary");
}

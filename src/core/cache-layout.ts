/**
 * The layout of a binary cache (SPEC §9), the same in a directory, an S3 bucket and over HTTP:
 *
 *   nix-cache-info                     the cache's store dir, priority and mass-query flag
 *   <hashpart>.narinfo                 one per store path
 *   nar/<filehash>.nar[.zst|.xz|…]     the (compressed) NAR a narinfo's URL points at
 *   <hashpart>.ls                      optional listing of a NAR's files
 *   log/<drv base name>                a build log
 *
 * `classifyCacheKey` is the one place that decides which keys exist: a key that is not one of
 * these (traversal, absolute paths, odd characters) is refused by every backend and the server.
 */
import { FerryError } from "./errors.js";
import { NIX32_ALPHABET } from "./hash.js";

export type Compression = "none" | "zstd" | "xz" | "bzip2" | "br";

/** The compressions Ferry reads and writes; all are ones Nix 2.8 reads. */
export const COMPRESSIONS: readonly Compression[] = ["zstd", "xz", "none", "bzip2", "br"];

const EXTENSION: Record<Compression, string> = { none: "", zstd: ".zst", xz: ".xz", bzip2: ".bz2", br: ".br" };

/** Parses a narinfo `Compression:` value or a `--compression` option. */
export function parseCompression(text: string): Compression {
  const c = text === "" ? "bzip2" : text;
  if ((COMPRESSIONS as readonly string[]).includes(c)) return c as Compression;
  throw new FerryError("FERRY_CACHE_COMPRESSION_UNKNOWN", `unknown compression '${text}'`, {
    hint: `use one of: ${COMPRESSIONS.join(", ")}`,
  });
}

/** The key a NAR with this file hash (nix32, no algo prefix) is stored under. */
export function narKey(fileHashNix32: string, compression: Compression): string {
  return `nar/${fileHashNix32}.nar${EXTENSION[compression]}`;
}

/** The key of the narinfo for a store path's 32-character hash part. */
export function narInfoKey(hashPart: string): string {
  return `${hashPart}.narinfo`;
}

export type CacheKeyKind = "cache-info" | "narinfo" | "nar" | "listing" | "log" | "root";

const HASH_PART = `[${NIX32_ALPHABET}]{32}`;
const KEY_PATTERNS: readonly [CacheKeyKind, RegExp][] = [
  ["cache-info", /^nix-cache-info$/],
  ["narinfo", new RegExp(`^${HASH_PART}\\.narinfo$`)],
  ["nar", new RegExp(`^nar/[${NIX32_ALPHABET}]{52}\\.nar(\\.zst|\\.xz|\\.bz2|\\.br)?$`)],
  ["listing", new RegExp(`^${HASH_PART}\\.ls$`)],
  ["log", new RegExp(`^log/${HASH_PART}-[A-Za-z0-9+\\-_?=][A-Za-z0-9+\\-._?=]{0,210}$`)],
  ["root", /^roots\/[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/],
];

/** What kind of object `key` names, or undefined when it names nothing a cache holds. */
export function classifyCacheKey(key: string): CacheKeyKind | undefined {
  for (const [kind, re] of KEY_PATTERNS) if (re.test(key)) return kind;
  return undefined;
}

/** Throws FERRY_CACHE_BAD_KEY unless `key` is a key a cache may hold. */
export function checkCacheKey(key: string): CacheKeyKind {
  const kind = classifyCacheKey(key);
  if (kind === undefined) {
    throw new FerryError("FERRY_CACHE_BAD_KEY", `'${key}' is not a binary cache object name`, {
      hint: "a cache holds nix-cache-info, <hash>.narinfo, nar/<filehash>.nar[.zst|.xz|.bz2|.br], <hash>.ls, log/<drv> and roots/<name>",
    });
  }
  return kind;
}

/** The content type each kind is served with (what Nix's own caches send). */
export function contentTypeOf(kind: CacheKeyKind): string {
  switch (kind) {
    case "cache-info":
      return "text/x-nix-cache-info";
    case "narinfo":
      return "text/x-nix-narinfo";
    case "nar":
      return "application/x-nix-nar";
    case "listing":
      return "application/json";
    case "log":
    case "root":
      return "text/plain; charset=utf-8";
  }
}

/**
 * A relative object name that is safe to resolve under a cache root: what a client accepts in
 * a narinfo's URL from a cache it did not write (no scheme, no traversal, no absolute path).
 */
export function checkRelativeKey(key: string): string {
  const ok = key.length > 0 && key.length <= 1024 && /^[A-Za-z0-9._+=-][A-Za-z0-9._+=/-]*$/.test(key) && !key.split("/").some((s) => s === "" || s === "." || s === "..");
  if (!ok) {
    throw new FerryError("FERRY_CACHE_BAD_KEY", `'${key}' is not a safe relative object name in a binary cache`, {
      hint: "the cache's narinfo points outside the cache; check the cache or use another substituter",
    });
  }
  return key;
}

/**
 * Fetches one NAR from a cache into a temporary name in the store dir: downloads the
 * compressed file (resuming with a Range request after a dropped connection), decompresses,
 * parses and unpacks it as it streams, and checks its size and hash against the narinfo. On
 * any failure nothing is left behind. Runs in the main thread or in a fetch worker alike.
 */
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { FerryError } from "../core/errors.js";
import { checkRelativeKey, parseCompression } from "../core/cache-layout.js";
import { createHasher } from "../core/digest.js";
import { hashEquals, makeHash, printHash } from "../core/hash.js";
import { NarParser } from "../core/nar/parser.js";
import type { NarInfo } from "../core/narinfo.js";
import { NarRestorer } from "../store/nar-restore.js";
import type { CacheBackend } from "./backend.js";
import { decompressStream, SyncZstdDecompressor } from "./compression.js";
import { isRetryable } from "./http-backend.js";

export interface FetchNarOptions {
  /** fsync every file (small batches); otherwise the caller syncs the file system once. */
  readonly fsync: boolean;
  readonly attempts?: number;
  /** Compressed bytes as they arrive (progress). */
  readonly onBytes?: (n: number) => void;
}

/** Idle zstd contexts; each concurrent fetch takes its own. */
const zstdContexts: SyncZstdDecompressor[] = [];

/** The compressed file's bytes, resuming after a dropped connection. */
async function* compressedBytes(backend: CacheBackend, key: string, attempts: number, onBytes?: (n: number) => void): AsyncIterable<Uint8Array> {
  let received = 0;
  for (let attempt = 1; ; attempt++) {
    try {
      const r = await backend.read(key, received > 0 ? { start: received } : undefined);
      if (!r) {
        throw new FerryError("FERRY_CACHE_NAR_MISSING", `${backend.url}/${key} is missing although a narinfo points at it`, {
          hint: "the cache is inconsistent (a garbage collection in progress?); another substituter will be tried",
        });
      }
      let skip = received - r.start;
      for await (const c of r.body as AsyncIterable<Buffer>) {
        let chunk: Uint8Array = c;
        if (skip > 0) {
          if (chunk.length <= skip) {
            skip -= chunk.length;
            continue;
          }
          chunk = chunk.subarray(skip);
          skip = 0;
        }
        received += chunk.length;
        onBytes?.(chunk.length);
        yield chunk;
      }
      if (r.info.size >= 0 && received < r.info.size) {
        throw new FerryError("FERRY_CACHE_UNREACHABLE", `${backend.url}/${key}: the connection ended after ${received} of ${r.info.size} bytes`, { hint: "the link dropped", details: { retryable: true } });
      }
      return;
    } catch (e) {
      const retry = isRetryable(e) || (e as Error).message === "aborted";
      if (!retry || attempt >= attempts) throw e;
      await new Promise((res) => setTimeout(res, Math.min(100 * 2 ** attempt, 3000)));
    }
  }
}

/** Streams the decompressed NAR of `info` to `onData`. */
export async function streamNar(backend: CacheBackend, info: NarInfo, onData: (chunk: Uint8Array) => void, opts: { attempts?: number; onBytes?: (n: number) => void } = {}): Promise<void> {
  const key = checkRelativeKey(info.url);
  const compression = parseCompression(info.compression);
  const source = compressedBytes(backend, key, opts.attempts ?? 5, opts.onBytes);
  if (compression === "zstd" || compression === "none") {
    const z = compression === "zstd" ? (zstdContexts.pop() ?? new SyncZstdDecompressor()) : undefined;
    try {
      z?.reset();
      for await (const c of source) {
        if (z) z.push(c, onData);
        else onData(c);
      }
      z?.end();
    } finally {
      if (z) zstdContexts.push(z);
    }
    return;
  }
  // The consumer's own error (a hash or size mismatch) is what the caller must see, not the
  // abort it causes upstream.
  let consumerError: { e: unknown } | undefined;
  try {
    await pipeline(Readable.from(source), decompressStream(compression), async function (chunks: AsyncIterable<Buffer>) {
      for await (const c of chunks) {
        try {
          onData(c);
        } catch (e) {
          consumerError = { e };
          throw e;
        }
      }
    });
  } catch (e) {
    throw consumerError ? consumerError.e : e;
  }
}

/** Fetches, unpacks and checks the NAR of `info` at `tmpPath` (which must not exist). */
export async function fetchNarToTemp(backend: CacheBackend, info: NarInfo, tmpPath: string, opts: FetchNarOptions): Promise<void> {
  const restorer = new NarRestorer(tmpPath, { canonical: true, fsync: opts.fsync });
  const parser = new NarParser(restorer.onEvent);
  const hasher = createHasher(info.narHash.algo);
  let size = 0;
  const where = `the NAR of ${info.storePath} from ${backend.url}`;
  try {
    await streamNar(
      backend,
      info,
      (c) => {
        size += c.length;
        if (size > info.narSize) throw sizeMismatch(where, info, `more than ${info.narSize}`);
        hasher.update(c);
        parser.push(c);
      },
      { ...(opts.attempts !== undefined ? { attempts: opts.attempts } : {}), ...(opts.onBytes ? { onBytes: opts.onBytes } : {}) },
    );
    parser.end();
    if (size !== info.narSize) throw sizeMismatch(where, info, String(size));
    const actual = makeHash(info.narHash.algo, hasher.digest());
    if (!hashEquals(actual, info.narHash)) {
      throw new FerryError("FERRY_SUBSTITUTE_HASH_MISMATCH", `${where} hashes to ${printHash(actual, "sri")}, its narinfo says ${printHash(info.narHash, "sri")}`, {
        hint: "the cache's copy is corrupt; it was not registered, and another cache is tried",
      });
    }
    restorer.finish();
  } catch (e) {
    restorer.abort();
    throw e;
  }
}

function sizeMismatch(where: string, info: NarInfo, got: string): FerryError {
  return new FerryError("FERRY_SUBSTITUTE_SIZE_MISMATCH", `${where} is ${got} bytes, its narinfo says ${info.narSize}`, {
    hint: "the cache's copy is corrupt or truncated; it was not registered, and another cache is tried",
  });
}

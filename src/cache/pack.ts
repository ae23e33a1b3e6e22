/**
 * Packs a store object for a binary cache: its NAR, compressed, in a temporary file, with the
 * NAR's hash and size and the file's hash and size (the file's name in the cache is its hash).
 * zstd and none stream straight from the dumper to the file; xz, bzip2 and brotli go through a
 * NAR file first because their compressors are asynchronous. Memory stays flat either way.
 */
import * as fs from "node:fs";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";
import { createHasher } from "../core/digest.js";
import { makeHash, type Hash } from "../core/hash.js";
import type { Compression } from "../core/cache-layout.js";
import { dumpPath } from "../store/nar-dump.js";
import { randomSuffix, writeAllSync } from "../store/fs-util.js";
import { FerryError } from "../core/errors.js";
import { compressStream, SyncZstdCompressor } from "./compression.js";

export interface PackedNar {
  /** The compressed NAR in a file the caller removes, or (a small NAR packed with zstd or none) in `bytes`. */
  readonly file: string | undefined;
  readonly bytes: Uint8Array | undefined;
  readonly compression: Compression;
  readonly fileHash: Hash;
  readonly fileSize: number;
  readonly narHash: Hash;
  readonly narSize: number;
}

/** NARs up to this size (as the store recorded them) are packed in memory, not in a temporary file (larger ones keep resumable uploads from the file). */
const IN_MEMORY_MAX = 64 << 10;

/**
 * Packs the tree at `realPath` into a new file in `tmpDir`. `expectedNarSize`, when given, is the size
 * the store recorded: zstd then sizes its work for it, a small NAR is packed in memory (`bytes`),
 * and a tree whose NAR is not that size any more fails with FERRY_STORE_CORRUPT.
 */
export async function packNar(realPath: string, compression: Compression, tmpDir: string, expectedNarSize?: number): Promise<PackedNar> {
  const file = join(tmpDir, `nar-${randomSuffix()}`);
  const narHasher = createHasher("sha256");
  const fileHasher = createHasher("sha256");
  let fileSize = 0;
  try {
    if (compression === "zstd" || compression === "none") {
      const inMemory = expectedNarSize !== undefined && expectedNarSize <= IN_MEMORY_MAX;
      const chunks: Uint8Array[] = [];
      const fd = inMemory ? undefined : fs.openSync(file, "wx", 0o600);
      try {
        const toFile = (c: Uint8Array) => {
          fileHasher.update(c);
          fileSize += c.length;
          // (The dumper reuses its buffers: keep a copy.)
          if (fd === undefined) chunks.push(c.slice());
          else writeAllSync(fd, c);
        };
        const zstd = compression === "zstd" ? new SyncZstdCompressor(toFile, expectedNarSize !== undefined ? { pledgedSize: expectedNarSize } : {}) : undefined;
        let dumped = 0;
        // Read errors (a path removed meanwhile, permissions) stay what they are; a NAR of another size is corruption.
        const changed = () =>
          new FerryError("FERRY_STORE_CORRUPT", `'${realPath}' changed on disk: its NAR is ${dumped > expectedNarSize! ? "larger" : "smaller"} than the ${expectedNarSize} bytes the store recorded`, {
            hint: "run `ferry store verify` to find every damaged path",
          });
        dumpPath(realPath, (c) => {
          dumped += c.length;
          if (expectedNarSize !== undefined && dumped > expectedNarSize) throw changed();
          narHasher.update(c);
          if (zstd) zstd.push(c);
          else toFile(c);
        });
        if (expectedNarSize !== undefined && dumped !== expectedNarSize) throw changed();
        zstd?.end();
        const packed = { compression, fileHash: makeHash("sha256", fileHasher.digest()), fileSize, narHash: makeHash("sha256", narHasher.digest()), narSize: dumped };
        return fd === undefined ? { ...packed, file: undefined, bytes: Buffer.concat(chunks) } : { ...packed, file, bytes: undefined };
      } finally {
        if (fd !== undefined) fs.closeSync(fd);
      }
    }
    const narFile = `${file}.nar`;
    let narSize: number;
    const fd = fs.openSync(narFile, "wx", 0o600);
    try {
      narSize = dumpPath(realPath, (c) => {
        narHasher.update(c);
        writeAllSync(fd, c);
      });
    } finally {
      fs.closeSync(fd);
    }
    try {
      await pipeline(fs.createReadStream(narFile, { highWaterMark: 256 * 1024 }), compressStream(compression), async function* (source: AsyncIterable<Buffer>) {
        for await (const c of source) {
          fileHasher.update(c);
          fileSize += c.length;
          yield c;
        }
      }, fs.createWriteStream(file, { flags: "wx", mode: 0o600 }));
    } finally {
      fs.rmSync(narFile, { force: true });
    }
    return { file, bytes: undefined, compression, fileHash: makeHash("sha256", fileHasher.digest()), fileSize, narHash: makeHash("sha256", narHasher.digest()), narSize };
  } catch (e) {
    fs.rmSync(file, { force: true });
    throw e;
  }
}

/**
 * Streaming compression of NARs in a binary cache: zstd (the default, native through
 * zstd-napi), xz and bzip2 (the Debian `xz` and `bzip2` programs, which Nix-written caches use),
 * brotli (Node's zlib) and none. Every function returns a fresh Transform; errors of the codec
 * (a corrupt stream, a missing program) surface as FERRY_CACHE_DECOMPRESS_FAILED /
 * FERRY_CACHE_COMPRESS_FAILED on the stream.
 */
import { spawn } from "node:child_process";
import { Duplex, PassThrough, Transform, type TransformCallback } from "node:stream";
import * as zlib from "node:zlib";
import { CompressStream, DecompressStream } from "zstd-napi";
import { createRequire } from "node:module";
import type * as ZstdBinding from "zstd-napi/binding.js";
import { FerryError } from "../core/errors.js";
import type { Compression } from "../core/cache-layout.js";

export type { Compression } from "../core/cache-layout.js";

// The native binding is CommonJS without static exports; load it as such.
const zstdBinding = createRequire(import.meta.url)("zstd-napi/binding.js") as typeof ZstdBinding;

/** The zstd level Ferry writes: fast to make on a worker and about as small as xz -3. */
const ZSTD_LEVEL = 8;

function codecError(what: "compress" | "decompress", method: Compression, e: unknown): FerryError {
  if (e instanceof FerryError) return e;
  const code = what === "compress" ? "FERRY_CACHE_COMPRESS_FAILED" : "FERRY_CACHE_DECOMPRESS_FAILED";
  return new FerryError(code, `cannot ${what} ${method} data: ${(e as Error).message}`, {
    hint: what === "decompress" ? "the file in the cache is corrupt or not in the compression its narinfo names" : "check that the compressor is installed and there is free space",
    cause: e,
  });
}

/** Wraps a codec stream so that its errors become coded FerryErrors. */
function coded(inner: Transform, what: "compress" | "decompress", method: Compression): Transform {
  const t = new Transform({
    transform(chunk: Buffer, _enc, cb: TransformCallback) {
      if (inner.write(chunk)) cb();
      else inner.once("drain", () => cb());
    },
    flush(cb: TransformCallback) {
      inner.once("end", () => cb());
      inner.end();
    },
    destroy(err, cb) {
      inner.destroy();
      cb(err);
    },
  });
  inner.on("data", (c: Buffer) => t.push(c));
  inner.on("error", (e) => t.destroy(codecError(what, method, e)));
  return t;
}

/** A Transform that pipes through an external program (`xz -d`, `bzip2 -c`, …). */
function programTransform(cmd: string, args: readonly string[], what: "compress" | "decompress", method: Compression): Duplex {
  const child = spawn(cmd, args, { stdio: ["pipe", "pipe", "pipe"] });
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (s: string) => (stderr = (stderr + s).slice(-2000)));
  const duplex = Duplex.from({ writable: child.stdin, readable: child.stdout });
  let failed = false;
  const fail = (e: Error) => {
    if (failed) return;
    failed = true;
    duplex.destroy(codecError(what, method, e));
  };
  child.on("error", (e) => fail(new Error(`cannot run ${cmd}: ${e.message}`)));
  child.stdin.on("error", () => {
    /* reported through the exit status */
  });
  child.on("close", (code, signal) => {
    if (code !== 0 && !duplex.destroyed) fail(new Error(`${cmd} ${signal ? `was killed by ${signal}` : `exited with status ${code}`}${stderr ? `: ${stderr.trim()}` : ""}`));
  });
  duplex.on("close", () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  });
  return duplex;
}

/** A stream that compresses with `method`. */
export function compressStream(method: Compression): Duplex {
  switch (method) {
    case "none":
      return new PassThrough();
    case "zstd":
      return coded(new CompressStream({ compressionLevel: ZSTD_LEVEL }), "compress", method);
    case "xz":
      return programTransform("xz", ["-c", "-6"], "compress", method);
    case "bzip2":
      return programTransform("bzip2", ["-c"], "compress", method);
    case "br":
      return coded(zlib.createBrotliCompress(), "compress", method);
  }
}

/** A stream that decompresses `method`. */
export function decompressStream(method: Compression): Duplex {
  switch (method) {
    case "none":
      return new PassThrough();
    case "zstd":
      return coded(new DecompressStream(), "decompress", method);
    case "xz":
      return programTransform("xz", ["-d", "-c"], "decompress", method);
    case "bzip2":
      return programTransform("bzip2", ["-d", "-c"], "decompress", method);
    case "br":
      return coded(zlib.createBrotliDecompress(), "decompress", method);
  }
}

/**
 * A synchronous zstd compressor for a producer that cannot wait (the NAR dumper calls back
 * synchronously): output goes to `out` as it is made, so memory stays flat for any input.
 */
export class SyncZstdCompressor {
  readonly #cctx = new zstdBinding.CCtx();
  readonly #buf = new Uint8Array(256 * 1024);
  readonly #out: (chunk: Uint8Array) => void;

  constructor(out: (chunk: Uint8Array) => void, level = ZSTD_LEVEL) {
    this.#out = out;
    this.#cctx.setParameter(zstdBinding.CParameter.compressionLevel, level);
  }

  push(chunk: Uint8Array): void {
    let src = chunk;
    while (src.length > 0) {
      const [, written, consumed] = this.#cctx.compressStream2(this.#buf, src, zstdBinding.EndDirective.continue);
      if (written > 0) this.#out(this.#buf.slice(0, written));
      src = src.subarray(consumed);
    }
  }

  end(): void {
    for (;;) {
      const [remaining, written] = this.#cctx.compressStream2(this.#buf, new Uint8Array(0), zstdBinding.EndDirective.end);
      if (written > 0) this.#out(this.#buf.slice(0, written));
      if (remaining === 0) return;
    }
  }
}

/**
 * A synchronous, reusable zstd decompressor: one per thread serves every NAR it fetches
 * (making a context per NAR costs more than decompressing a small one). Call `reset()` before
 * each stream; `end()` fails if the stream stopped inside a frame.
 */
export class SyncZstdDecompressor {
  readonly #dctx = new zstdBinding.DCtx();
  readonly #buf = new Uint8Array(256 * 1024);
  #inFrame = false;

  reset(): void {
    this.#dctx.reset(zstdBinding.ResetDirective.sessionOnly);
    this.#inFrame = false;
  }

  push(chunk: Uint8Array, out: (chunk: Uint8Array) => void): void {
    let src = chunk;
    try {
      for (;;) {
        const [hint, written, consumed] = this.#dctx.decompressStream(this.#buf, src);
        this.#inFrame = hint !== 0;
        if (written > 0) out(this.#buf.subarray(0, written));
        src = src.subarray(consumed);
        // Done with this chunk once it is consumed and the output buffer was not filled.
        if (src.length === 0 && written < this.#buf.length) return;
      }
    } catch (e) {
      if (e instanceof FerryError) throw e;
      throw codecError("decompress", "zstd", e);
    }
  }

  end(): void {
    if (this.#inFrame) throw codecError("decompress", "zstd", new Error("the data ends inside a zstd frame (truncated)"));
  }
}

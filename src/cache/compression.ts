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

/** Compression contexts of this thread not in use: making one costs far more (milliseconds: its tables) than compressing a small NAR. */
const idleCompressors: { cctx: ZstdBinding.CCtx; buf: Uint8Array }[] = [];
const MAX_IDLE_COMPRESSORS = 4;

/**
 * A synchronous zstd compressor for a producer that cannot wait (the NAR dumper calls back
 * synchronously): output goes to `out` as it is made, so memory stays flat for any input. Its
 * context comes from a per-thread pool and goes back on `end()`. Given the exact input size
 * (`pledgedSize`), zstd sizes its tables for it: a small NAR then costs microseconds, and a
 * different size fails the stream (FERRY_CACHE_COMPRESS_FAILED).
 */
export class SyncZstdCompressor {
  #ctx: { cctx: ZstdBinding.CCtx; buf: Uint8Array } | undefined;
  readonly #out: (chunk: Uint8Array) => void;

  constructor(out: (chunk: Uint8Array) => void, opts: { readonly level?: number; readonly pledgedSize?: number } = {}) {
    this.#out = out;
    const ctx = idleCompressors.pop() ?? { cctx: new zstdBinding.CCtx(), buf: new Uint8Array(256 * 1024) };
    // A context from the pool ended its last frame; start clean all the same.
    ctx.cctx.reset(zstdBinding.ResetDirective.sessionOnly);
    ctx.cctx.setParameter(zstdBinding.CParameter.compressionLevel, opts.level ?? ZSTD_LEVEL);
    if (opts.pledgedSize !== undefined) ctx.cctx.setPledgedSrcSize(opts.pledgedSize);
    this.#ctx = ctx;
  }

  push(chunk: Uint8Array): void {
    const { cctx, buf } = this.#live();
    let src = chunk;
    try {
      while (src.length > 0) {
        const [, written, consumed] = cctx.compressStream2(buf, src, zstdBinding.EndDirective.continue);
        if (written > 0) this.#out(buf.slice(0, written));
        src = src.subarray(consumed);
      }
    } catch (e) {
      this.#ctx = undefined;
      throw codecError("compress", "zstd", e);
    }
  }

  end(): void {
    const ctx = this.#live();
    try {
      for (;;) {
        const [remaining, written] = ctx.cctx.compressStream2(ctx.buf, new Uint8Array(0), zstdBinding.EndDirective.end);
        if (written > 0) this.#out(ctx.buf.slice(0, written));
        if (remaining === 0) break;
      }
    } catch (e) {
      this.#ctx = undefined;
      throw codecError("compress", "zstd", e);
    }
    this.#ctx = undefined;
    if (idleCompressors.length < MAX_IDLE_COMPRESSORS) idleCompressors.push(ctx);
  }

  #live(): { cctx: ZstdBinding.CCtx; buf: Uint8Array } {
    if (!this.#ctx) throw new FerryError("FERRY_CACHE_COMPRESS_FAILED", "this zstd compressor has ended", { hint: "make a new SyncZstdCompressor per stream" });
    return this.#ctx;
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

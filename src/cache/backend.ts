/**
 * The port every binary cache store sits behind: a directory, an S3-compatible bucket, or a
 * remote cache over HTTP. Keys are relative object names (core/cache-layout.ts); a backend
 * refuses unsafe ones with FERRY_CACHE_BAD_KEY.
 *
 * Contract shared by all backends:
 * - `write` is atomic: a reader sees the old object or the whole new one, never a part.
 * - `read` with a range returns bytes [start, end] (end inclusive, clipped to the size).
 * - A missing object is `undefined`, never an error; errors are coded FerryErrors
 *   (FERRY_CACHE_UNREACHABLE, FERRY_CACHE_DENIED, FERRY_CACHE_IO).
 */
import type { Readable } from "node:stream";

export interface ObjectInfo {
  readonly key: string;
  readonly size: number;
  /** Changes whenever the content changes (quoted, as in HTTP). */
  readonly etag: string;
  readonly mtimeMs: number;
}

export interface ByteRange {
  readonly start: number;
  /** Inclusive; omitted means to the end. */
  readonly end?: number;
}

export interface ReadResult {
  readonly info: ObjectInfo;
  /** The requested bytes (the whole object without a range). */
  readonly body: Readable;
  /** The first byte `body` starts at (the range's start, or 0). */
  readonly start: number;
}

export interface WriteOptions {
  readonly contentType?: string;
  /** Stop reading the body and fail with FERRY_CACHE_TOO_LARGE past this many bytes. */
  readonly maxBytes?: number;
}

/** One small object to stage: its key and all its bytes. */
export interface StageItem {
  readonly key: string;
  readonly body: Uint8Array;
}

/** Objects written and durable under temporary names, not visible yet (see `CacheBackend.stage`). */
export interface StagedObjects {
  /**
   * Moves the staged objects `keys` into place, each atomically, in the order given; they are
   * all durable when it resolves. Objects that must appear after others go in a later call.
   */
  publish(keys: readonly string[]): Promise<ObjectInfo[]>;
  /** Removes what was staged and not published. */
  discard(): Promise<void>;
}

export interface CacheBackend {
  /** The URL the backend was opened from, for messages. */
  readonly url: string;
  stat(key: string): Promise<ObjectInfo | undefined>;
  read(key: string, range?: ByteRange): Promise<ReadResult | undefined>;
  /** Reads a small object whole (narinfo, nix-cache-info). */
  readBytes(key: string): Promise<Uint8Array | undefined>;
  write(key: string, body: Uint8Array | AsyncIterable<Uint8Array>, opts?: WriteOptions): Promise<ObjectInfo>;
  /**
   * Optional, for a backend whose every `write` waits for its disk (a directory): writes many
   * small objects with one wait. Each is written under a temporary name and all are made
   * durable together; none is visible until `publish`. On failure nothing staged is left.
   */
  stage?(items: readonly StageItem[]): Promise<StagedObjects>;
  /** True if something was deleted. */
  delete(key: string): Promise<boolean>;
  /** Every object whose key starts with `prefix` ("" for all), in no particular order. */
  list(prefix: string): AsyncIterable<ObjectInfo>;
  close(): Promise<void>;
}

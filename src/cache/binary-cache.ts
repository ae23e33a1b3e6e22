/**
 * A binary cache as a client sees it: its settings (nix-cache-info), narinfo lookups with a
 * short-lived negative cache. NARs are fetched by fetch-nar.ts.
 */
import { FerryError } from "../core/errors.js";
import { narInfoKey } from "../core/cache-layout.js";
import { parseCacheInfo, parseNarInfo, type NarInfo } from "../core/narinfo.js";
import { parseStorePath } from "../core/store-path.js";
import type { CacheBackend } from "./backend.js";
import { isRetryable } from "./http-backend.js";
import { openBackend, parseCacheUrl } from "./open.js";

/** How long "this cache does not have it" is believed. Short: a stale miss fails nothing, but
 *  it makes a worker build what another worker has just uploaded. */
export const NEGATIVE_TTL_MS = 10_000;

export interface BinaryCacheOptions {
  readonly token?: string | undefined;
  /** The local store's dir; the cache must serve the same one. */
  readonly storeDir: string;
  readonly negativeTtlMs?: number;
  /** Attempts per narinfo lookup on transport errors. */
  readonly attempts?: number;
}

export class BinaryCache {
  readonly url: string;
  readonly backend: CacheBackend;
  readonly storeDir: string;
  /** Lower is preferred (Nix's convention). */
  readonly priority: number;
  readonly wantMassQuery: boolean;
  /** The bearer token it was opened with (fetch workers open their own connection). */
  readonly token: string | undefined;
  readonly #negativeTtlMs: number;
  readonly #attempts: number;
  readonly #positive = new Map<string, NarInfo>();
  readonly #negative = new Map<string, number>();

  private constructor(url: string, backend: CacheBackend, storeDir: string, priority: number, wantMassQuery: boolean, opts: BinaryCacheOptions) {
    this.url = url;
    this.backend = backend;
    this.storeDir = storeDir;
    this.priority = priority;
    this.wantMassQuery = wantMassQuery;
    this.token = opts.token;
    this.#negativeTtlMs = opts.negativeTtlMs ?? NEGATIVE_TTL_MS;
    this.#attempts = opts.attempts ?? 5;
  }

  /**
   * Opens a cache and reads its nix-cache-info (a cache without one is taken to serve the
   * local store dir). `?priority=N` in the URL overrides the cache's own priority.
   */
  static async open(urlText: string, opts: BinaryCacheOptions): Promise<BinaryCache> {
    const parsed = parseCacheUrl(urlText);
    const backend = await openBackend(parsed.url, { token: opts.token });
    try {
      const bytes = await backend.readBytes("nix-cache-info");
      const ci = parseCacheInfo(bytes ? Buffer.from(bytes).toString("utf8") : "", { storeDir: opts.storeDir });
      if (ci.storeDir !== opts.storeDir) {
        throw new FerryError("FERRY_CACHE_STORE_DIR_MISMATCH", `${parsed.url} holds paths of the store dir ${ci.storeDir}, not ${opts.storeDir}`, {
          hint: "a cache can only serve stores with the same store dir; use --store-dir or another cache",
        });
      }
      const prio = parsed.params.get("priority");
      const priority = prio !== undefined && /^-?\d+$/.test(prio) ? Number(prio) : ci.priority;
      return new BinaryCache(parsed.url, backend, ci.storeDir, priority, ci.wantMassQuery, opts);
    } catch (e) {
      await backend.close();
      throw e;
    }
  }

  /** The narinfo for `storePath`, or undefined when this cache does not have it. */
  async narInfo(storePath: string): Promise<NarInfo | undefined> {
    const hashPart = parseStorePath(this.storeDir, storePath).hashPart;
    const known = this.#positive.get(hashPart);
    if (known) return known;
    const missAt = this.#negative.get(hashPart);
    if (missAt !== undefined && Date.now() - missAt < this.#negativeTtlMs) return undefined;
    const bytes = await this.#withRetry(() => this.backend.readBytes(narInfoKey(hashPart)));
    if (!bytes) {
      this.#negative.set(hashPart, Date.now());
      return undefined;
    }
    this.#negative.delete(hashPart);
    let info: NarInfo;
    try {
      info = parseNarInfo(this.storeDir, Buffer.from(bytes).toString("utf8"));
    } catch (e) {
      throw new FerryError((e as FerryError).code ?? "FERRY_NARINFO_INVALID", `${this.url}/${narInfoKey(hashPart)}: ${(e as Error).message}`, {
        hint: (e as FerryError).hint ?? "the cache served a corrupt narinfo",
      });
    }
    if (info.storePath !== storePath) {
      throw new FerryError("FERRY_NARINFO_INVALID", `${this.url}/${narInfoKey(hashPart)} describes ${info.storePath}, not ${storePath}`, {
        hint: "the cache is corrupt; try another substituter",
      });
    }
    this.#positive.set(hashPart, info);
    return info;
  }

  /** Forgets a miss (after this process uploaded the path, say). */
  forget(storePath: string): void {
    const hashPart = parseStorePath(this.storeDir, storePath).hashPart;
    this.#negative.delete(hashPart);
    this.#positive.delete(hashPart);
  }

  async #withRetry<T>(fn: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await fn();
      } catch (e) {
        if (!isRetryable(e) || attempt >= this.#attempts) throw e;
        await new Promise((res) => setTimeout(res, Math.min(100 * 2 ** attempt, 3000)));
      }
    }
  }

  async close(): Promise<void> {
    await this.backend.close();
  }
}

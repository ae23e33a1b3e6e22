/**
 * Substitution from binary caches (`ferry copy --from`, and `ferry build` through the
 * realiser's Substituter port). Three steps:
 *
 * 1. Query: the closure's narinfos, level by level, parallel lookups; each path from the first
 *    cache (by priority) whose narinfo is trusted (a signature by a trusted key, or a content
 *    address that makes its path).
 * 2. Fetch: NARs in parallel, each decompressed, parsed and unpacked to a temporary name while
 *    its hash and size are checked against the narinfo; a bad or missing NAR fails over to the
 *    next cache that has the path.
 * 3. Register: one file-system sync, then one transaction for every fetched path whose
 *    references are valid or fetched too, references first. A path is never registered
 *    before its signature and hash check out and its references are present.
 */
import { referencesFirst } from "../core/path-order.js";
import { FerryError, isFerryError } from "../core/errors.js";
import { TypedEmitter } from "../core/events.js";
import { availableParallelism } from "node:os";
import { hashEquals } from "../core/hash.js";
import { narInfoDistrust, type NarInfo } from "../core/narinfo.js";
import type { PublicKey } from "../core/signing.js";
import { asFerryError, type ItemOutcome, type LocalStore, type NewObject } from "../store/local-store.js";
import { removeTree, syncFilesystem } from "../store/fs-util.js";
import type { Substituter } from "../build/realise.js";
import { BinaryCache } from "./binary-cache.js";
import { mapLimit, Semaphore } from "./parallel.js";
import { fetchNarToTemp } from "./fetch-nar.js";
import { FetchPool } from "./fetch-pool.js";
import type { SubstitutionSettings } from "./settings.js";

export interface SubstituteEvents {
  "substitute:planned": { paths: number; toFetch: number; narBytes: number };
  "path:fetched": { path: string; cache: string; narSize: number; durationMs: number };
  "path:rejected": { path: string; cache: string; reason: string };
  "fetch:bytes": { bytes: number };
}

export class SubstituteEmitter extends TypedEmitter<SubstituteEvents> {}

export interface CacheSubstituterOptions {
  readonly trustedKeys: readonly PublicKey[];
  /** Without signatures required any narinfo is accepted (Nix's `require-sigs = false`). */
  readonly requireSigs?: boolean;
  /** Parallel NAR downloads. */
  readonly jobs?: number;
  /** Parallel narinfo lookups. */
  readonly lookups?: number;
  /** Fetch worker threads for large closures (default: one per core; 0 fetches in this thread). */
  readonly workers?: number;
  readonly events?: SubstituteEmitter;
}

export type SubstituteOutcome = ItemOutcome<{ fetched: boolean; cache?: string }>;

interface Found {
  readonly cache: BinaryCache;
  readonly info: NarInfo;
}

interface Fetched {
  readonly tmpReal: string;
  readonly found: Found;
}

/** The first this many objects of a closure are fsync'ed file by file; beyond, one syncfs. */
const SYNC_BATCH_MIN = 16;
/** Closures larger than this are fetched by worker threads. */
const POOL_THRESHOLD = 8;

export class CacheSubstituter implements Substituter {
  readonly #store: LocalStore;
  /** Sorted by priority, lowest (preferred) first. */
  readonly caches: readonly BinaryCache[];
  readonly #opts: CacheSubstituterOptions;

  constructor(store: LocalStore, caches: readonly BinaryCache[], opts: CacheSubstituterOptions) {
    this.#store = store;
    this.caches = [...caches].sort((a, b) => a.priority - b.priority);
    this.#opts = opts;
  }

  /**
   * Opens the configured caches. A misconfigured cache (bad URL, wrong store dir, refused
   * token) is an error: a typo must not turn into silent rebuilds. An unreachable one is
   * skipped with a warning, as Nix does: a cache that is down must not fail a build.
   */
  static async open(
    store: LocalStore,
    settings: SubstitutionSettings,
    opts: { token?: string | undefined; jobs?: number; events?: SubstituteEmitter; onWarning?: (message: string) => void } = {},
  ): Promise<CacheSubstituter> {
    const caches: BinaryCache[] = [];
    try {
      for (const url of settings.substituters) {
        try {
          caches.push(await BinaryCache.open(url, { storeDir: store.storeDir, token: opts.token }));
        } catch (e) {
          if (!isFerryError(e, "FERRY_CACHE_UNREACHABLE")) throw e;
          opts.onWarning?.(`not substituting from ${url}: ${e.message}`);
        }
      }
    } catch (e) {
      await Promise.all(caches.map((c) => c.close()));
      throw e;
    }
    return new CacheSubstituter(store, caches, {
      trustedKeys: settings.trustedPublicKeys,
      requireSigs: settings.requireSigs,
      ...(opts.jobs !== undefined ? { jobs: opts.jobs } : {}),
      ...(opts.events ? { events: opts.events } : {}),
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.caches.map((c) => c.close()));
  }

  #distrust(cache: BinaryCache, info: NarInfo): string | undefined {
    if (this.#opts.requireSigs === false) return undefined;
    return narInfoDistrust(cache.storeDir, info, this.#opts.trustedKeys);
  }

  /** The first cache (by priority, skipping `exclude`) with a trusted narinfo for `path`. */
  async #find(path: string, exclude: ReadonlySet<BinaryCache> = new Set()): Promise<Found | { reasons: string[] }> {
    const reasons: string[] = [];
    for (const cache of this.caches) {
      if (exclude.has(cache)) continue;
      let info: NarInfo | undefined;
      try {
        info = await cache.narInfo(path);
      } catch (e) {
        reasons.push(`${cache.url}: ${(e as Error).message}`);
        continue;
      }
      if (!info) continue;
      const why = this.#distrust(cache, info);
      if (why === undefined) return { cache, info };
      reasons.push(`${cache.url}: ${why}`);
      this.#opts.events?.emit("path:rejected", { path, cache: cache.url, reason: why });
    }
    return { reasons };
  }

  async has(paths: readonly string[]): Promise<Set<string>> {
    const found = await mapLimit(paths, this.#opts.lookups ?? 32, (p) => this.#find(p));
    return new Set(paths.filter((_, k) => "info" in found[k]!));
  }

  async substitute(path: string): Promise<boolean> {
    const outcomes = await this.substituteClosure([path]);
    const mine = outcomes.find((o) => o.path === path);
    if (mine?.status === "error") throw mine.error;
    return this.#store.isValid(path);
  }

  /**
   * Makes the closures of `paths` valid. One outcome per path that was not valid already
   * (and per requested path): fetched, or an error that says why.
   */
  async substituteClosure(paths: readonly string[]): Promise<SubstituteOutcome[]> {
    const store = this.#store;
    const ev = this.#opts.events;
    const roots = paths.map((p) => store.parsePath(p));
    const outcomes = new Map<string, SubstituteOutcome>();
    const found = new Map<string, Found>();
    const seen = new Set<string>();

    // 1. query, level by level; 2. each NAR is fetched as soon as its narinfo is found
    const fetched = new Map<string, Fetched>();
    const fetches: Promise<void>[] = [];
    const gate = new Semaphore(this.#opts.jobs ?? 16);
    let perFileSync = 0;
    let needSync = false;
    let narBytes = 0;
    const startFetch = (p: string, f: Found) => {
      // The first few objects are fsync'ed one by one; a larger closure is synced once at the end.
      const fsyncEach = perFileSync < SYNC_BATCH_MIN;
      if (fsyncEach) perFileSync++;
      else needSync = true;
      narBytes += f.info.narSize;
      fetches.push(
        gate.run(async () => {
          const r = await this.#fetchWithFailover(p, f, fsyncEach, found.size, pools);
          if ("error" in r) outcomes.set(p, { status: "error", path: p, error: r.error });
          else fetched.set(p, r);
        }),
      );
    };
    // Worker threads of this call, made when the closure turns out to be large.
    const pools: { pool?: FetchPool } = {};
    // Lookups run as a queue, not level by level: a found narinfo's references are looked up
    // at once. References found meanwhile are rooted and checked in one batch.
    const pending = [...new Set(roots)];
    pending.forEach((p) => seen.add(p));
    const lookupGate = new Semaphore(this.#opts.lookups ?? 32);
    const lookup = async (p: string) => {
      const r = await this.#find(p);
      if ("reasons" in r) {
        outcomes.set(p, { status: "error", path: p, error: notSubstitutable(p, r.reasons) });
        return;
      }
      found.set(p, r);
      startFetch(p, r);
      for (const ref of r.info.references) {
        if (!seen.has(ref)) {
          seen.add(ref);
          pending.push(ref);
        }
      }
    };
    try {
      await new Promise<void>((resolve, reject) => {
        let inflight = 0;
        let scheduled = false;
        const pump = () => {
          scheduled = false;
          try {
            if (pending.length > 0) {
              const batch = pending.splice(0);
              store.addTempRoots(batch);
              for (const p of batch) {
                if (store.isValid(p)) continue;
                inflight++;
                void lookupGate
                  .run(() => lookup(p))
                  .catch((e: unknown) => outcomes.set(p, { status: "error", path: p, error: asFerryError(e) }))
                  .finally(() => {
                    inflight--;
                    if (!scheduled) {
                      scheduled = true;
                      setImmediate(pump);
                    }
                  });
              }
            }
            if (inflight === 0 && pending.length === 0) resolve();
          } catch (e) {
            reject(e);
          }
        };
        pump();
      });
      ev?.emit("substitute:planned", { paths: seen.size, toFetch: found.size, narBytes });
      await Promise.all(fetches);
    } finally {
      await pools.pool?.close();
    }

    // 3. register what is complete, references first
    try {
      const batch: { tmpReal: string; obj: NewObject; cache: string }[] = [];
      const registrable = new Set<string>();
      for (const p of referencesFirst([...fetched.keys()], (p) => fetched.get(p)!.found.info.references)) {
        const { tmpReal, found: f } = fetched.get(p)!;
        const missing = f.info.references.find((r) => r !== p && !registrable.has(r) && !store.isValid(r));
        if (missing !== undefined) {
          removeTree(tmpReal);
          outcomes.set(p, {
            status: "error",
            path: p,
            error: new FerryError("FERRY_SUBSTITUTE_REFERENCE_MISSING", `not registering ${p}: its reference ${missing} could not be substituted`, {
              hint: "see the error for the reference; the path is registered once its closure is complete",
            }),
          });
          continue;
        }
        registrable.add(p);
        batch.push({ tmpReal, cache: f.cache.url, obj: { path: p, narHash: f.info.narHash, narSize: f.info.narSize, references: f.info.references, deriver: f.info.deriver, sigs: f.info.sigs, ca: f.info.ca } });
      }
      if (batch.length > 0) {
        if (needSync) syncFilesystem(store.realStoreDir);
        store.registerObjects(batch);
        for (const b of batch) outcomes.set(b.obj.path, { status: "ok", path: b.obj.path, value: { fetched: true, cache: b.cache } });
      }
    } catch (e) {
      for (const { tmpReal } of fetched.values()) removeTree(tmpReal);
      const error = asFerryError(e);
      for (const p of fetched.keys()) if (!outcomes.has(p)) outcomes.set(p, { status: "error", path: p, error });
    }
    for (const p of roots) if (!outcomes.has(p)) outcomes.set(p, { status: "ok", path: p, value: { fetched: false } });
    return [...outcomes.values()];
  }

  /**
   * Restores valid paths whose files are damaged or missing (`ferry store verify --repair`):
   * each is fetched from the first cache whose copy has the NAR hash the store recorded, and
   * swapped in under the store's lock. One outcome per path.
   */
  async repair(paths: readonly string[]): Promise<SubstituteOutcome[]> {
    const store = this.#store;
    return mapLimit(paths, this.#opts.jobs ?? 16, async (path): Promise<SubstituteOutcome> => {
      try {
        const recorded = store.requirePathInfo(path);
        const reasons: string[] = [];
        const tried = new Set<BinaryCache>();
        for (;;) {
          const f = await this.#find(path, tried);
          if (!("info" in f)) return { status: "error", path, error: notSubstitutable(path, [...reasons, ...f.reasons]) };
          tried.add(f.cache);
          if (f.info.narSize !== recorded.narSize || !hashEquals(f.info.narHash, recorded.narHash)) {
            reasons.push(`${f.cache.url}: its copy has another NAR hash than the one this store recorded`);
            continue;
          }
          const r = await this.#fetchWithFailover(path, f, true, 0, {});
          if ("error" in r) return { status: "error", path, error: r.error };
          store.repairContent(path, r.tmpReal);
          return { status: "ok", path, value: { fetched: true, cache: r.found.cache.url } };
        }
      } catch (e) {
        return { status: "error", path, error: asFerryError(e) };
      }
    });
  }

  /** Fetches `path` from `first`, then from every other cache that has it, until one checks out. */
  async #fetchWithFailover(path: string, first: Found, fsyncEach: boolean, foundSoFar: number, pools: { pool?: FetchPool }): Promise<Fetched | { error: FerryError }> {
    const tried = new Set<BinaryCache>();
    const reasons: string[] = [];
    let current: Found | undefined = first;
    while (current) {
      tried.add(current.cache);
      try {
        return { tmpReal: await this.#fetchOne(path, current, fsyncEach, foundSoFar, pools), found: current };
      } catch (e) {
        const err = asFerryError(e);
        reasons.push(`${current.cache.url}: ${err.message}`);
        this.#opts.events?.emit("path:rejected", { path, cache: current.cache.url, reason: err.message });
        if (this.caches.length === 1) return { error: err };
      }
      const next = await this.#find(path, tried);
      current = "info" in next ? next : undefined;
    }
    return { error: notSubstitutable(path, reasons) };
  }

  /**
   * Downloads and unpacks one NAR to a temporary name, checking its hash and size. Once a
   * closure turns out to be large, fetches go to worker threads so every core unpacks.
   */
  async #fetchOne(path: string, { cache, info }: Found, fsyncEach: boolean, foundSoFar: number, pools: { pool?: FetchPool }): Promise<string> {
    const t0 = Date.now();
    const tmpPath = this.#store.newTempPath();
    const ev = this.#opts.events;
    const workers = this.#opts.workers ?? (availableParallelism() > 1 ? availableParallelism() : 0);
    if (workers > 0 && foundSoFar > POOL_THRESHOLD) {
      pools.pool ??= new FetchPool(workers, ev ? (n) => ev.emit("fetch:bytes", { bytes: n }) : undefined);
      await pools.pool.fetch(cache.url, cache.token, info, tmpPath, fsyncEach);
    } else {
      await fetchNarToTemp(cache.backend, info, tmpPath, { fsync: fsyncEach, ...(ev ? { onBytes: (n: number) => ev.emit("fetch:bytes", { bytes: n }) } : {}) });
    }
    ev?.emit("path:fetched", { path, cache: cache.url, narSize: info.narSize, durationMs: Date.now() - t0 });
    return tmpPath;
  }
}

function notSubstitutable(path: string, reasons: readonly string[]): FerryError {
  return new FerryError("FERRY_SUBSTITUTE_UNAVAILABLE", reasons.length ? `cannot substitute ${path}: ${reasons.join("; ")}` : `no configured cache has ${path}`, {
    hint: reasons.some((r) => r.includes("signature") || r.includes("signed"))
      ? "trust the cache's key with --trusted-public-keys (or trusted-public-keys in the config) if you mean to"
      : "check the substituters setting, or build the path",
  });
}

/**
 * One step on a worker: fetch the derivation and its inputs from the farm cache, build it with
 * the sandboxed realiser, upload the outputs' closure (and the build log) to the cache, and
 * say how it went. Never throws: every way a step ends is an outcome, and each failure says
 * whether it is the build's own or transient (worth retrying on another worker).
 */
import * as fs from "node:fs";
import { FerryError } from "../../core/errors.js";
import { asFerryError, type LocalStore } from "../../store/local-store.js";
import { parsePublicKey } from "../../core/signing.js";
import { BuildEmitter } from "../../build/events.js";
import { readStoreDerivation, realise } from "../../build/realise.js";
import { BinaryCache } from "../../cache/binary-cache.js";
import { CacheSubstituter } from "../../cache/substituter.js";
import { copyToCache } from "../../cache/upload.js";
import type { BuildRequest, Result, Welcome } from "../protocol.js";
import { isTransientFailure } from "./policy.js";

/** A step's result without the envelope: what `result` carries besides its type and step id. */
export type StepOutcome = Omit<Result, "type" | "stepId">;

export interface StepContext {
  readonly store: LocalStore;
  /** The farm cache, as the welcome named it. */
  readonly cache: Welcome["cache"];
  /** The worker's client of the farm cache, shared by its steps. */
  readonly farmCache: FarmCacheClient;
  readonly sandbox: boolean;
  /** NIX_BUILD_CORES for the builder. */
  readonly cores: number;
  /** Kills the build (its whole process tree); the outcome is then of no interest. */
  readonly signal: AbortSignal;
  /** Each line the builder prints, as it prints it. */
  readonly onLog: (line: string) => void;
}

/** Free bytes of the file system that holds the store. */
export async function freeDiskBytes(store: LocalStore): Promise<number> {
  try {
    const s = await fs.promises.statfs(store.realStoreDir);
    return s.bavail * s.bsize;
  } catch {
    return Number.MAX_SAFE_INTEGER;
  }
}

/** How long a path fetched from or uploaded to the farm cache is taken to be there without asking (the cache may be collected). */
const PRESENT_TTL_MS = 10 * 60_000;

/** One opening of the farm cache, shared by the steps that use it, with what it is known to hold. */
export interface FarmCacheSession {
  readonly substituter: CacheSubstituter;
  /** Whether the cache is known to hold `path` (fetched from it or uploaded to it, lately). */
  holds(path: string): boolean;
  remember(paths: Iterable<string>): void;
  /** The step is done with it. */
  release(): void;
}

interface Opening {
  readonly config: string;
  readonly substituter: Promise<CacheSubstituter>;
  readonly present: Map<string, number>;
  users: number;
  retired: boolean;
}

function closeOpening(o: Opening): void {
  void o.substituter.then((x) => x.close()).catch(() => undefined);
}

/**
 * The farm cache as a substituter (signatures by `publicKey` required when one is given) and an
 * upload target, opened once and shared by the worker's steps while the welcome names the same
 * cache: steps share its connections, and it remembers which paths the cache holds (those this
 * worker fetched from it or uploaded to it, for ten minutes), so an upload asks only about the
 * others. A welcome naming another cache retires the opening: it closes when its last step is done.
 */
export class FarmCacheClient {
  #current: Opening | undefined;

  /** A session on `cache`; the caller releases it. */
  async open(store: LocalStore, cache: Welcome["cache"]): Promise<FarmCacheSession> {
    const config = JSON.stringify([cache.url, cache.token ?? "", cache.publicKey ?? ""]);
    let o = this.#current;
    if (!o || o.config !== config) {
      if (o) this.#retire(o);
      const substituter = (async () => {
        // Misses are not remembered: an input another worker has just uploaded must be found.
        const bc = await BinaryCache.open(cache.url, { storeDir: store.storeDir, token: cache.token, negativeTtlMs: 0 });
        const trustedKeys = cache.publicKey ? [parsePublicKey(cache.publicKey)] : [];
        return new CacheSubstituter(store, [bc], { trustedKeys, requireSigs: cache.publicKey !== undefined });
      })();
      o = { config, substituter, present: new Map(), users: 0, retired: false };
      this.#current = o;
    }
    const opening = o;
    opening.users++;
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      opening.users--;
      if (opening.retired && opening.users === 0) closeOpening(opening);
    };
    let substituter: CacheSubstituter;
    try {
      substituter = await opening.substituter;
    } catch (e) {
      // A failed opening is tried again by the next step.
      if (this.#current === opening) this.#current = undefined;
      release();
      throw e;
    }
    return {
      substituter,
      holds: (path) => {
        const at = opening.present.get(path);
        return at !== undefined && Date.now() - at < PRESENT_TTL_MS;
      },
      remember: (paths) => {
        const now = Date.now();
        for (const p of paths) opening.present.set(p, now);
      },
      release,
    };
  }

  #retire(o: Opening): void {
    o.retired = true;
    if (o.users === 0) closeOpening(o);
  }

  async close(): Promise<void> {
    const o = this.#current;
    this.#current = undefined;
    if (o) this.#retire(o);
  }
}

/** Makes the closures of `paths` valid from the farm cache; throws FERRY_WORKER_INPUT_UNAVAILABLE. */
async function fetchClosures(store: LocalStore, cache: FarmCacheSession, paths: readonly string[]): Promise<void> {
  const missing = paths.filter((p) => !store.isValid(p));
  if (missing.length === 0) return;
  const outcomes = await cache.substituter.substituteClosure(missing);
  cache.remember(outcomes.flatMap((o) => (o.status === "ok" && o.value.fetched ? [o.path] : [])));
  const errors = outcomes.flatMap((o) => (o.status === "error" ? [o.error.message] : []));
  const absent = missing.filter((p) => !store.isValid(p));
  if (errors.length > 0 || absent.length > 0) {
    throw new FerryError("FERRY_WORKER_INPUT_UNAVAILABLE", `cannot fetch ${absent.length === 1 ? absent[0] : `${absent.length} inputs`} from the farm cache: ${errors.join("; ") || "not found"}`, {
      hint: "the coordinator publishes each step's derivation and inputs to the cache before dispatching it; check the cache and its key",
    });
  }
}

/** Everything the build reads that another step made or the evaluator wrote: sources and every output of each input derivation. */
function inputPaths(store: LocalStore, drvPath: string): string[] {
  const drv = readStoreDerivation(store, drvPath);
  const out = [...drv.inputSrcs];
  for (const inDrv of drv.inputDrvs.keys()) for (const o of readStoreDerivation(store, inDrv).outputs.values()) out.push(o.path);
  return out;
}

/** Builds the step `req` asks for; see the module comment. */
export async function runStep(req: BuildRequest, ctx: StepContext): Promise<StepOutcome> {
  const { store } = ctx;
  const t0 = Date.now();
  const failure = (e: unknown, transient: boolean): StepOutcome => {
    const err = asFerryError(e);
    return { status: "failed", transient, error: `${err.code}: ${err.message}`, durationMs: Date.now() - t0 };
  };
  const cancelled = () => failure(new FerryError("FERRY_BUILD_CANCELLED", "the step was aborted"), true);
  let cache: FarmCacheSession;
  try {
    cache = await ctx.farmCache.open(store, ctx.cache);
  } catch (e) {
    return failure(e, true);
  }
  const substituter = cache.substituter;
  try {
    let drvPath: string;
    try {
      drvPath = store.parsePath(req.drvPath);
    } catch (e) {
      return failure(e, false);
    }
    try {
      await fetchClosures(store, cache, [drvPath]);
      await fetchClosures(store, cache, inputPaths(store, drvPath));
    } catch (e) {
      return failure(e, true);
    }
    if (ctx.signal.aborted) return cancelled();

    const events = new BuildEmitter();
    events.on("build:log", (l) => ctx.onLog(l.line));
    const [outcome] = await realise(store, [drvPath], {
      sandbox: ctx.sandbox,
      cores: ctx.cores,
      signal: ctx.signal,
      events,
      substituters: [substituter],
      ...(req.timeoutSeconds ? { timeout: req.timeoutSeconds } : {}),
    });
    if (!outcome || outcome.status === "dependency-failed") return failure(new FerryError("FERRY_WORKER_INPUT_UNAVAILABLE", `an input of ${drvPath} could not be made valid`), true);
    if (outcome.status === "failed") {
      if (ctx.signal.aborted) return cancelled();
      return failure(outcome.error, isTransientFailure(outcome.error.code, await freeDiskBytes(store)));
    }

    const uploads = await copyToCache(store, substituter.caches[0]!.backend, Object.values(outcome.outputs), { knownPresent: (p) => cache.holds(p) });
    cache.remember(uploads.flatMap((u) => (u.status === "ok" ? [u.path] : [])));
    const bad = uploads.flatMap((u) => (u.status === "error" ? [`${u.path}: ${u.error.message}`] : []));
    if (bad.length > 0) {
      return failure(new FerryError("FERRY_WORKER_UPLOAD_FAILED", `the outputs were built but not all could be uploaded to the farm cache: ${bad.join("; ")}`), true);
    }
    return { status: "succeeded", durationMs: Date.now() - t0, outputs: outcome.outputs };
  } catch (e) {
    // Whatever else went wrong (the store, the disk, the cache) is this machine's trouble.
    return failure(e, true);
  } finally {
    cache.release();
  }
}

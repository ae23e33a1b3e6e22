/**
 * `copyToCache` on a thread of its own, for a caller whose event loop must stay free: the farm's
 * coordinator publishes every derivation an evaluation planned (a hundred thousand for a large
 * jobset) while it serves workers and the API. Packing, compressing, signing and the store's
 * path-info reads all happen on the thread, which opens the store and the cache itself; what
 * comes back is one summary, with every path that failed and why.
 */
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { FerryError, errorBody, fromErrorBody, type ErrorBody } from "../core/errors.js";
import { parseSecretKey, printSecretKey, type SecretKey } from "../core/signing.js";
import type { Compression } from "../core/cache-layout.js";
import type { StoreLocation } from "../store/config.js";
import { LocalStore } from "../store/local-store.js";
import { openBackend } from "./open.js";
import { copyToCache } from "./upload.js";

/** The cache to copy to, as `openBackend` takes it. */
export interface CopyTarget {
  readonly url: string;
  readonly token?: string | undefined;
}

export interface CopyOffThreadOptions {
  readonly secretKey?: SecretKey | undefined;
  readonly compression?: Compression;
}

/** What a copy did: the closure's size, how many paths it uploaded, and each path that failed. */
export interface CopySummary {
  readonly paths: number;
  readonly uploaded: number;
  readonly failures: readonly { readonly path: string; readonly error: FerryError }[];
}

interface Job {
  readonly role: "copy-to-cache";
  readonly loc: StoreLocation;
  readonly target: CopyTarget;
  readonly paths: readonly string[];
  readonly secretKey: string | undefined;
  readonly compression: Compression | undefined;
}

type Reply =
  | { t: "done"; paths: number; uploaded: number; failures: { path: string; error: ErrorBody }[] }
  | ({ t: "error" } & ErrorBody);

/**
 * Uploads the closures of `paths` from the store at `loc` to `target`, on a new thread. The
 * paths must be valid (and rooted by the caller) while it runs. A failure to copy one path is
 * in the summary; a failure to start (the store or the cache cannot be opened) rejects, with
 * its code.
 */
export function copyToCacheOffThread(loc: StoreLocation, target: CopyTarget, paths: readonly string[], opts: CopyOffThreadOptions = {}): Promise<CopySummary> {
  return new Promise((resolve, reject) => {
    let settled = false;
    const settle = (f: () => void) => {
      if (settled) return;
      settled = true;
      f();
    };
    const job: Job = {
      role: "copy-to-cache",
      loc,
      target,
      paths,
      secretKey: opts.secretKey ? printSecretKey(opts.secretKey) : undefined,
      compression: opts.compression,
    };
    const worker = new Worker(new URL(import.meta.url), { workerData: job });
    worker.on("message", (m: Reply) => {
      if (m.t === "done") settle(() => resolve({ paths: m.paths, uploaded: m.uploaded, failures: m.failures.map((f) => ({ path: f.path, error: fromErrorBody(f.error) })) }));
      else settle(() => reject(fromErrorBody(m)));
    });
    worker.on("error", (e) => settle(() => reject(new FerryError("FERRY_CACHE_IO", `the thread copying to ${target.url} failed: ${e.message}`, { hint: "check the cache and the memory of this machine; no narinfo is published without those of its references", cause: e }))));
    worker.on("exit", (code) => settle(() => reject(new Error(`the thread copying to ${target.url} stopped with code ${code}`))));
  });
}

/** On the copying thread: the whole copy, reported in one message. */
async function copyAndReport(port: NonNullable<typeof parentPort>, job: Job): Promise<void> {
  let store: LocalStore | undefined;
  try {
    store = LocalStore.open(job.loc);
    const backend = await openBackend(job.target.url, { token: job.target.token });
    try {
      const outcomes = await copyToCache(store, backend, job.paths, {
        ...(job.secretKey ? { secretKey: parseSecretKey(job.secretKey) } : {}),
        ...(job.compression ? { compression: job.compression } : {}),
      });
      let uploaded = 0;
      const failures: { path: string; error: ErrorBody }[] = [];
      for (const o of outcomes) {
        if (o.status === "error") failures.push({ path: o.path, error: errorBody(o.error) });
        else if (o.value.uploaded) uploaded++;
      }
      port.postMessage({ t: "done", paths: outcomes.length, uploaded, failures } satisfies Reply);
    } finally {
      await backend.close();
    }
  } catch (e) {
    const fe = e instanceof FerryError ? e : new FerryError("FERRY_CACHE_IO", `copying to ${job.target.url} failed: ${(e as Error).message}`);
    port.postMessage({ t: "error", ...errorBody(fe) } satisfies Reply);
  } finally {
    store?.close();
  }
}

const job = workerData as Job | undefined;
if (!isMainThread && parentPort && job?.role === "copy-to-cache") void copyAndReport(parentPort, job);

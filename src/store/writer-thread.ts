/**
 * Writes an evaluation's plan (sources and .drv files) into a store from a worker thread, so
 * the thread that reads the evaluator's output is never blocked by file system work and the
 * evaluator never waits on a full pipe: evaluation and writing overlap on two cores.
 * Messages are handled in order; the first error stops the writer and is reported by `finish`.
 */
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { FerryError } from "../core/errors.js";
import type { StoreLocation } from "./config.js";
import { LocalStore } from "./local-store.js";

export interface PlannedSourceMsg {
  readonly storePath: string;
  readonly from: string;
  readonly name: string;
}

export interface PlannedTextMsg {
  readonly storePath: string;
  readonly name: string;
  readonly text: string;
  readonly references: readonly string[];
}

/** Adds a planned source; its path must be the one evaluation computed. */
export function writePlannedSource(store: LocalStore, s: PlannedSourceMsg): void {
  const r = store.addPath(s.from, { name: s.name });
  if (r.path !== s.storePath) {
    throw new FerryError("FERRY_EVAL_SOURCE_CHANGED", `source ${s.from} changed while it was evaluated (${r.path}, planned ${s.storePath})`, { hint: "evaluate again once the sources are not being edited" });
  }
}

/** Adds planned text objects (.drv files) in one batch; each must get the path evaluation computed. */
export function writePlannedTexts(store: LocalStore, ts: readonly PlannedTextMsg[]): void {
  store.addTexts(ts.map((t) => ({ name: t.name, text: t.text, references: t.references, expectedPath: t.storePath })));
}

/**
 * An evaluation's plan written into `store` on this thread, each path checked against the
 * plan (the shape of dsl's EvalStorePort; the store does not depend on the DSL).
 */
export function storePort(store: LocalStore): { addSource(s: PlannedSourceMsg): void; addTexts(ts: readonly PlannedTextMsg[]): void } {
  return {
    addSource: (src) => writePlannedSource(store, src),
    addTexts: (ts) => writePlannedTexts(store, ts),
  };
}

type Msg = { t: "source"; s: PlannedSourceMsg } | { t: "texts"; ts: readonly PlannedTextMsg[] } | { t: "end" };
type Reply = { t: "done" } | { t: "error"; code: string; message: string; hint?: string };

export class StoreWriterThread {
  readonly #worker: Worker;
  readonly #result: Promise<void>;

  constructor(loc: StoreLocation) {
    this.#worker = new Worker(new URL(import.meta.url), { workerData: loc });
    this.#result = new Promise((resolve, reject) => {
      this.#worker.on("message", (r: Reply) => {
        if (r.t === "done") resolve();
        else reject(new FerryError(r.code, r.message, r.hint ? { hint: r.hint } : {}));
      });
      this.#worker.on("error", reject);
      this.#worker.on("exit", (code) => code !== 0 && reject(new Error(`the store writer thread stopped with code ${code}`)));
    });
    // A rejection is reported by finish(); until then it must not count as unhandled.
    this.#result.catch(() => undefined);
  }

  addSource(s: PlannedSourceMsg): void {
    this.#worker.postMessage({ t: "source", s } satisfies Msg);
  }

  addTexts(ts: readonly PlannedTextMsg[]): void {
    this.#worker.postMessage({ t: "texts", ts } satisfies Msg);
  }

  /** Waits until everything sent is written (or throws the first error). */
  async finish(): Promise<void> {
    this.#worker.postMessage({ t: "end" } satisfies Msg);
    try {
      await this.#result;
    } finally {
      await this.#worker.terminate();
    }
  }

  /** Stops without waiting (after a failed evaluation). */
  async abort(): Promise<void> {
    await this.#worker.terminate();
  }
}

if (!isMainThread && parentPort && (workerData as StoreLocation | undefined)?.storeDir) {
  const port = parentPort;
  const store = LocalStore.open(workerData as StoreLocation);
  let failed = false;
  port.on("message", (m: Msg) => {
    if (failed) return;
    try {
      if (m.t === "source") writePlannedSource(store, m.s);
      else if (m.t === "texts") writePlannedTexts(store, m.ts);
      else {
        store.close();
        port.postMessage({ t: "done" } satisfies Reply);
      }
    } catch (e) {
      failed = true;
      const fe = e instanceof FerryError ? e : new FerryError("FERRY_EVAL_STORE", `could not record the evaluation: ${(e as Error).message}`);
      port.postMessage({ t: "error", code: fe.code, message: fe.message, ...(fe.hint ? { hint: fe.hint } : {}) } satisfies Reply);
    }
  });
}

/**
 * Worker threads that fetch NARs (fetch-worker.ts). The substituter hands each fetch to the
 * least busy worker; a worker that dies fails its pending fetches with a coded error.
 */
import { Worker } from "node:worker_threads";
import { FerryError, fromErrorBody } from "../core/errors.js";
import type { NarInfo } from "../core/narinfo.js";
import type { FetchReply, FetchRequest } from "./fetch-worker.js";

interface Slot {
  readonly worker: Worker;
  readonly pending: Map<number, { resolve: () => void; reject: (e: FerryError) => void }>;
}

export class FetchPool {
  readonly #slots: Slot[] = [];
  #nextId = 1;
  #closed = false;

  constructor(size: number, onBytes?: (n: number) => void) {
    for (let i = 0; i < size; i++) {
      const worker = new Worker(new URL("./fetch-worker.js", import.meta.url));
      const slot: Slot = { worker, pending: new Map() };
      worker.on("message", (m: FetchReply | { bytes: number }) => {
        if ("bytes" in m) return onBytes?.(m.bytes);
        const p = slot.pending.get(m.id);
        slot.pending.delete(m.id);
        if (!p) return;
        if (m.ok) p.resolve();
        else p.reject(fromErrorBody(m.error));
      });
      const fail = (why: string) => {
        for (const p of slot.pending.values()) p.reject(new FerryError("FERRY_SUBSTITUTE_WORKER_FAILED", `a fetch worker stopped: ${why}`, { hint: "this is a bug in Ferry; please report it" }));
        slot.pending.clear();
      };
      worker.on("error", (e) => fail(e.message));
      worker.on("exit", (code) => {
        if (!this.#closed) fail(`it exited with status ${code}`);
      });
      this.#slots.push(slot);
    }
  }

  /** Fetches the NAR of `info` from the cache at `url` into `tmpPath` (see fetchNarToTemp). */
  fetch(url: string, token: string | undefined, info: NarInfo, tmpPath: string, fsync: boolean): Promise<void> {
    const slot = this.#slots.reduce((a, b) => (b.pending.size < a.pending.size ? b : a));
    const id = this.#nextId++;
    return new Promise<void>((resolve, reject) => {
      slot.pending.set(id, { resolve, reject });
      const req: FetchRequest = { id, url, token, info, tmpPath, fsync };
      slot.worker.postMessage(req);
    });
  }

  async close(): Promise<void> {
    this.#closed = true;
    await Promise.all(this.#slots.map((s) => s.worker.terminate()));
  }
}

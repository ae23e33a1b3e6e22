/**
 * Writes an evaluation's plan (sources and .drv files) into a store from worker threads, so
 * the thread that reads the evaluator's output is never blocked by file system work and the
 * evaluator never waits on a full pipe: evaluation and writing overlap.
 * Messages are handled in order; the first error stops the writer and is reported by `finish`.
 * Text batches arrive as transferred buffers of text records, so the sending thread copies and
 * decodes nothing. */
import { MessageChannel, Worker, isMainThread, parentPort, workerData, type MessagePort } from "node:worker_threads";
import { FerryError, errorBody, fromErrorBody } from "../core/errors.js";
import type { StoreLocation } from "./config.js";
import { LocalStore, mergeBatches, type PreparedBatch, type WrittenTexts } from "./local-store.js";
import { decodeTextClaims, decodeTextRecords } from "./text-records.js";

export interface PlannedSourceMsg {
  readonly storePath: string;
  readonly from: string;
  readonly name: string;
}

/** Adds a planned source; its path must be the one evaluation computed. */
export function writePlannedSource(store: LocalStore, s: PlannedSourceMsg): void {
  const r = store.addPath(s.from, { name: s.name });
  if (r.path !== s.storePath) {
    throw new FerryError("FERRY_EVAL_SOURCE_CHANGED", `source ${s.from} changed while it was evaluated (${r.path}, planned ${s.storePath})`, { hint: "evaluate again once the sources are not being edited" });
  }
}

/** Adds planned text objects (.drv files) given as a batch of text records (store/text-records); each must get the path evaluation computed. */
export function writeTextRecords(store: LocalStore, batch: Uint8Array): void {
  store.commitTexts(store.prepareTexts(decodeTextRecords(batch)));
}

/** What an evaluation's plan needs from a store (the shape of dsl's EvalStorePort; the store does not depend on the DSL). */
export interface PlanWriter {
  addSource(s: PlannedSourceMsg): void;
  /** Adds a batch of text records; the writer may take `batch`'s buffer (transfer it). */
  addTextRecords(batch: Uint8Array): void;
}

/** An evaluation's plan written into `store` on this thread, each path checked against the plan. */
export function storePort(store: LocalStore): PlanWriter {
  return {
    addSource: (src) => writePlannedSource(store, src),
    addTextRecords: (batch) => writeTextRecords(store, batch),
  };
}

type Msg = { t: "source"; s: PlannedSourceMsg } | { t: "records"; batch: Uint8Array } | { t: "end" } | { t: "close" } | { t: "abort" };
type Written = { t: "written"; records: Uint8Array; w: WrittenTexts } | { t: "end" } | { t: "abort" };
type Reply = { t: "done" } | { t: "committed"; batches: number } | { t: "closed" } | { t: "aborted" } | { t: "error"; code: string; message: string; hint?: string };

/** The most rows one transaction commits when batches are grouped (it holds the write lock meanwhile). */
const GROUP_COMMIT_ROWS = 20_000;

/** How long `finish` and `abort` wait for the threads to close their stores before terminating them. */
const SHUTDOWN_MS = 10_000;
type Role = { loc: StoreLocation; role: "prepare" | "commit"; port: MessagePort; deferSync: boolean };

/**
 * Writes a plan on two threads: one writes each batch's files under the paths its records
 * claim (and adds sources), the other syncs them, checks every text against its claim while
 * the sync runs, and commits the batches in order. File creation, hashing, the file-system
 * sync and the registration of earlier batches overlap, and the two threads carry about the
 * same load.
 */
export class StoreWriterThread implements PlanWriter {
  readonly #preparer: Worker;
  readonly #committer: Worker;
  readonly #result: Promise<void>;
  /** Text batches handed over, and committed. */
  #sent = 0;
  #committed = 0;
  /** Who waits for the backlog to shrink: the limit each waits for. */
  readonly #waiting: { limit: number; resolve: () => void }[] = [];

  readonly #beforeRelease: (() => void) | undefined;

  /**
   * `beforeRelease`, when given, runs once everything is committed and before the preparing
   * thread releases its temp roots (which protect the plan's paths from GC until then): a
   * caller that must keep the paths (the farm keeps an evaluation's .drv files) roots them
   * there with its own handle, so there is no moment where a GC could take them.
   *
   * With `deferSync`, batches are registered without waiting for their files to reach the
   * disk (`LocalStore.commitBatch`): an evaluation whose results only this machine's store
   * holds, and which could be made again, need not wait for the disk; the store unregisters
   * what a stop of the machine lost. Without it, every file is durable before its row commits.
   */
  constructor(loc: StoreLocation, opts: { beforeRelease?: () => void; deferSync?: boolean } = {}) {
    this.#beforeRelease = opts.beforeRelease;
    const { port1, port2 } = new MessageChannel();
    // A batch's strings live until it is committed: a young generation that holds a few
    // batches lets most of them die there (fewer, cheaper scavenges).
    const resourceLimits = { maxYoungGenerationSizeMb: 64 };
    const deferSync = opts.deferSync ?? false;
    this.#preparer = new Worker(new URL(import.meta.url), { workerData: { loc, role: "prepare", port: port1, deferSync } satisfies Role, transferList: [port1], resourceLimits });
    this.#committer = new Worker(new URL(import.meta.url), { workerData: { loc, role: "commit", port: port2, deferSync } satisfies Role, transferList: [port2], resourceLimits });
    this.#result = new Promise((resolve, reject) => {
      for (const w of [this.#preparer, this.#committer]) {
        w.on("message", (r: Reply) => {
          if (r.t === "committed") {
            this.#committed += r.batches;
            this.#wake(false);
          } else if (r.t === "done") resolve();
          else if (r.t === "error") reject(fromErrorBody(r));
        });
        w.on("error", reject);
        w.on("exit", (code) => code !== 0 && reject(new Error(`the store writer thread stopped with code ${code}`)));
      }
    });
    // A rejection is reported by finish(); until then it must not count as unhandled.
    this.#result.catch(() => undefined);
    // Whatever the outcome, nobody waits for a backlog any more.
    this.#result.then(() => this.#wake(true), () => this.#wake(true));
  }

  /** Text batches handed over and not committed yet. */
  backlog(): number {
    return this.#sent - this.#committed;
  }

  /** Resolves once fewer than `limit` batches wait to be committed (or the writer has stopped). */
  drained(limit: number): Promise<void> {
    if (this.backlog() < limit) return Promise.resolve();
    return new Promise((resolve) => this.#waiting.push({ limit, resolve }));
  }

  #wake(all: boolean): void {
    for (let i = this.#waiting.length - 1; i >= 0; i--) {
      const w = this.#waiting[i]!;
      if (all || this.backlog() < w.limit) {
        this.#waiting.splice(i, 1);
        w.resolve();
      }
    }
  }

  addSource(s: PlannedSourceMsg): void {
    this.#preparer.postMessage({ t: "source", s } satisfies Msg);
  }

  /** Moves `batch`'s whole buffer to the writer thread (it is detached here afterwards). */
  addTextRecords(batch: Uint8Array): void {
    this.#sent++;
    this.#preparer.postMessage({ t: "records", batch } satisfies Msg, [batch.buffer as ArrayBuffer]);
  }

  /** Calls `listener` with the first error of either thread, when it happens. */
  onFailure(listener: (e: FerryError) => void): void {
    this.#result.then(undefined, (e: unknown) => listener(planWriteError(e)));
  }

  /**
   * Waits until everything sent is written (or throws the first error, after removing what was
   * not committed). The preparing thread keeps its temp roots (the sources it added) until the
   * last batch is committed.
   */
  async finish(): Promise<void> {
    this.#preparer.postMessage({ t: "end" } satisfies Msg);
    try {
      await this.#result;
      this.#beforeRelease?.();
    } catch (e) {
      await this.abort();
      throw planWriteError(e);
    }
    const closed = replyFrom(this.#preparer, "closed");
    this.#preparer.postMessage({ t: "close" } satisfies Msg);
    await closed;
    await this.#terminate();
  }

  /**
   * Stops (after a failed evaluation): batches prepared but not committed are removed, then both
   * threads close their stores (the preparing thread's temp roots go: what was committed is
   * anyone's to collect) and end. Nothing half-registered is left either way: a batch commits
   * whole or not at all.
   */
  async abort(): Promise<void> {
    const aborted = replyFrom(this.#committer, "aborted");
    this.#preparer.postMessage({ t: "abort" } satisfies Msg);
    await aborted;
    const closed = replyFrom(this.#preparer, "closed");
    this.#preparer.postMessage({ t: "close" } satisfies Msg);
    await closed;
    await this.#terminate();
  }

  async #terminate(): Promise<void> {
    await Promise.all([this.#preparer.terminate(), this.#committer.terminate()]);
  }
}

/** Resolves when `w` replies `t`, exits, or SHUTDOWN_MS pass. */
function replyFrom(w: Worker, t: Reply["t"]): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      w.off("message", onMessage);
      w.off("exit", done);
      resolve();
    };
    const onMessage = (r: Reply) => {
      if (r.t === t) done();
    };
    const timer = setTimeout(done, SHUTDOWN_MS);
    w.on("message", onMessage);
    w.once("exit", done);
  });
}

/**
 * An error of writing an evaluation's plan, as users see it: a full file system says so, with
 * what to do; anything else unexpected keeps its own words.
 */
export function planWriteError(e: unknown): FerryError {
  if (e instanceof FerryError) return e;
  const err = e as NodeJS.ErrnoException;
  if (err?.code === "ENOSPC" || err?.code === "EDQUOT") {
    return new FerryError("FERRY_STORE_NO_SPACE", `could not record the evaluation: the store's file system is full (${err.message})`, {
      hint: "free space or inodes there (df -h, df -i; ferry store gc) and evaluate again; the .drv files already registered stay, the others were removed",
    });
  }
  return new FerryError("FERRY_EVAL_STORE", `could not record the evaluation: ${err?.message ?? String(e)}`);
}

function replyError(port: NonNullable<typeof parentPort>, e: unknown): void {
  const fe = planWriteError(e);
  port.postMessage({ t: "error", ...errorBody(fe) } satisfies Reply);
}

/**
 * The preparing thread: handles the plan in order and hands written text batches on. Its store
 * stays open (its temp roots protect the sources it added) until `close`, after the commits.
 */
function runPreparer(store: LocalStore, parent: NonNullable<typeof parentPort>, committer: MessagePort): void {
  let failed = false;
  parent.on("message", (m: Msg) => {
    if (m.t === "close") {
      store.close();
      parent.postMessage({ t: "closed" } satisfies Reply);
      return;
    }
    if (m.t === "abort") {
      failed = true;
      committer.postMessage({ t: "abort" } satisfies Written); // after every batch it was sent
      return;
    }
    if (failed) return;
    try {
      if (m.t === "records") {
        const w = store.writeClaimedTexts(decodeTextClaims(m.batch));
        committer.postMessage({ t: "written", records: m.batch, w } satisfies Written, [m.batch.buffer as ArrayBuffer]);
      } else if (m.t === "source") {
        writePlannedSource(store, m.s);
      } else {
        committer.postMessage({ t: "end" } satisfies Written);
      }
    } catch (e) {
      failed = true;
      replyError(parent, e);
    }
  });
}

/**
 * The committing thread: starts each batch's file-system sync (another process) as soon as it
 * arrives, checks the batch's texts against the paths they claim while the sync runs, and
 * commits batches in order once their sync is done, so files are always durable before their
 * rows commit (with `deferSync`, nothing is synced: batches commit as soon as they are checked). Once it has failed or is told to abort, every batch not committed (queued or
 * arriving later) has its files removed.
 */
function runCommitter(store: LocalStore, parent: NonNullable<typeof parentPort>, preparer: MessagePort, deferSync: boolean): void {
  const queue: { p: PreparedBatch; w: WrittenTexts; synced: Promise<void> }[] = [];
  let ended = false;
  let running = false;
  let failed = false;
  // A failure to remove a batch's files is not the error to report (they are unregistered
  // leftovers for GC).
  const cleanUp = (batch: Pick<PreparedBatch, "paths" | "tmpReals">) => store.abortTextsQuietly(batch);
  const fail = (e: unknown) => {
    failed = true;
    replyError(parent, e);
    for (const q of queue.splice(0)) cleanUp(q.p);
  };
  const drain = async () => {
    running = true;
    try {
      while (queue.length && !failed) {
        const head = queue[0]!;
        try {
          await head.synced;
        } catch (e) {
          if (failed) return; // aborted meanwhile: the queue, this batch included, is cleaned up
          cleanUp(queue.shift()!.p);
          throw e;
        }
        if (failed) return; // aborted meanwhile: the queue, this batch included, is cleaned up
        // Batches that are durable by now (or need not be) go in the same transaction (a commit rewrites the
        // pages it touches, and a path index touches most of its pages): when commits fall
        // behind, they catch up in fewer, larger transactions.
        let n = 1;
        let rows = head.p.paths.length;
        while (n < queue.length && (deferSync || queue[n]!.w.synced) && rows + queue[n]!.p.paths.length <= GROUP_COMMIT_ROWS) rows += queue[n++]!.p.paths.length;
        const group = queue.splice(0, n).map((q) => q.p);
        if (!deferSync) for (const p of group) p.synced = true;
        store.commitBatch(mergeBatches(group), { deferSync });
        parent.postMessage({ t: "committed", batches: n } satisfies Reply);
      }
      if (ended && !failed) {
        close();
        parent.postMessage({ t: "done" } satisfies Reply);
      }
    } catch (e) {
      fail(e);
    } finally {
      running = false;
    }
  };
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    store.close();
  };
  preparer.on("message", (m: Written) => {
    if (m.t === "abort") {
      failed = true;
      for (const q of queue.splice(0)) cleanUp(q.p);
      close();
      parent.postMessage({ t: "aborted" } satisfies Reply);
      return;
    }
    if (failed) {
      if (m.t === "written") cleanUp(m.w);
      return;
    }
    if (m.t === "written") {
      const synced = deferSync ? Promise.resolve() : store.syncPrepared(m.w);
      synced.catch(() => undefined); // reported when the batch's turn comes
      let p: PreparedBatch;
      try {
        p = store.checkWrittenTexts(decodeTextRecords(m.records), m.w);
      } catch (e) {
        fail(e); // checkWrittenTexts removed this batch's files
        return;
      }
      queue.push({ p, w: m.w, synced });
    } else ended = true;
    if (!running) void drain();
  });
}

const role = workerData as Role | undefined;
if (!isMainThread && parentPort && role?.loc?.storeDir) {
  const store = LocalStore.open(role.loc);
  if (role.role === "prepare") runPreparer(store, parentPort, role.port);
  else {
    store.onlyRegisters({ deferSync: role.deferSync });
    runCommitter(store, parentPort, role.port, role.deferSync);
  }
}

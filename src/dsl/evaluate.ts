/**
 * Evaluates a package set in a subprocess (time and memory limits; the package code cannot
 * touch the parent's state), then carries out the plan it streams back: sources and .drv files
 * are written to the store through a narrow port, in the order they were made.
 */
import { spawn } from "node:child_process";
import type { Readable } from "node:stream";
import { fileURLToPath } from "node:url";
import { existsSync } from "node:fs";
import { resolve } from "node:path";
import { FerryError } from "../core/errors.js";
import type { PlannedSource } from "./context.js";
import { bwrapPath, sandboxAvailable } from "../build/sandbox.js";
import { textRecordFault } from "../store/text-records.js";
import { FRAME_JOB, FRAME_TEXT, FrameReader, decodeJob, protocolError, type JobMessage } from "./eval-protocol.js";

/** How evaluation results reach a store. */
export interface EvalStorePort {
  /** Adds a source object; must produce `expectedPath`. */
  addSource(s: PlannedSource): void;
  /**
   * Adds a batch of text objects (.drv files, in order) in the text-record encoding
   * (store/text-records); each must produce its expected path. The port may take over
   * `batch`'s buffer.
   */
  addTextRecords(batch: Uint8Array): void;
  /** For ports that write in the background: resolves once everything is written. */
  finish?(): Promise<void>;
  abort?(): Promise<void>;
  /** For ports that write in the background: `listener` hears of the first failure as it happens. */
  onFailure?(listener: (e: FerryError) => void): void;
  /** For ports that write in the background: text batches handed over and not written yet. */
  backlog?(): number;
  /** Resolves once fewer than `limit` batches wait (or the port has stopped). */
  drained?(limit: number): Promise<void>;
}

/**
 * At most this many text batches (of up to 8 MiB each) wait for a port that writes in the
 * background: past it, the evaluator's output is not read until the writer catches up, so a
 * fast evaluator and a slow disk do not fill the memory with the plan.
 */
const MAX_BACKLOG = 4;

/** How long the evaluator's output may stay open after it exited. */
const OUTPUT_GRACE_MS = 1000;

export type EvalJob = JobMessage;

export interface EvalOptions {
  readonly file: string;
  readonly attr?: string | undefined;
  readonly storeDir: string;
  readonly hostSystem?: string;
  /** Wall-clock limit in seconds (default 600). */
  readonly timeoutSeconds?: number;
  /** Heap limit of the evaluator in MiB (default 4096). */
  readonly memoryMiB?: number;
  /** Where the plan goes; without one nothing is written (a dry evaluation). */
  readonly store?: EvalStorePort;
  /** Called for each job as it is found. */
  readonly onJob?: (job: EvalJob) => void;
  /** Called as the plan arrives (once per read from the evaluator, not per derivation), and once the store is being finished. */
  readonly onProgress?: (p: EvalProgress) => void;
  /**
   * Gets what the evaluator prints (the package set's own output, Node's fatal errors), for a
   * caller that draws on the terminal itself; all of it arrives before `evaluate` settles.
   * Without it the evaluator writes straight to this process's stderr.
   */
  readonly onOutput?: (chunk: Buffer) => void;
  readonly textBatch?: number;
  /** Run the evaluator read-only and offline under bubblewrap when available (default true). */
  readonly sandbox?: boolean;
}

/** How far an evaluation is: what the evaluator has planned so far. */
export interface EvalProgress {
  /** .drv files (and other texts) planned. */
  readonly derivations: number;
  readonly sources: number;
  readonly jobs: number;
  /** The evaluator is done; the store is writing what is left of the plan. */
  readonly writing: boolean;
}

export interface EvalResult {
  readonly jobs: EvalJob[];
  readonly texts: number;
  readonly sources: number;
}

export function hostSystemOf(): string {
  const arch = process.arch === "x64" ? "x86_64" : process.arch === "arm64" ? "aarch64" : process.arch;
  return `${arch}-linux`;
}

const WORKER = fileURLToPath(new URL("./eval-worker.js", import.meta.url));

/**
 * Evaluates `opts.file`. The store port is finished when the plan is complete and aborted
 * otherwise, whatever stops the evaluation, so a port that writes from threads never outlives it.
 */
export async function evaluate(opts: EvalOptions): Promise<EvalResult> {
  let settled = false;
  const settle = async (complete: boolean): Promise<void> => {
    if (settled) return;
    settled = true;
    await (complete ? opts.store?.finish?.() : opts.store?.abort?.());
  };
  try {
    return await evaluateInto(opts, settle);
  } catch (e) {
    await settle(false);
    throw e;
  }
}

async function evaluateInto(opts: EvalOptions, settle: (complete: boolean) => Promise<void>): Promise<EvalResult> {
  const file = resolve(opts.file);
  if (!existsSync(file)) {
    throw new FerryError("FERRY_EVAL_NO_FILE", `the package set '${opts.file}' does not exist`, { hint: "give the path of a .ts or .js module that exports packages" });
  }
  // (No --enable-source-maps: it reads and parses the map of every module the evaluator loads,
  // 40 ms of each evaluation's start; package code keeps its own line numbers without one.)
  const nodeArgs = [`--max-old-space-size=${opts.memoryMiB ?? 4096}`, WORKER, file, opts.attr ?? "", opts.storeDir, opts.hostSystem ?? hostSystemOf()];
  // Package code runs with the whole filesystem read-only and no network, when bubblewrap is
  // there: evaluation can read its sources and nothing else can happen.
  const sandboxed = (opts.sandbox ?? true) && sandboxAvailable().ok;
  const [cmd, args] = sandboxed
    ? [bwrapPath(), ["--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--", process.execPath, ...nodeArgs]]
    : [process.execPath, nodeArgs];
  // Package code sees no secrets from the caller's environment (they could end up in
  // world-readable .drv files): only what Node and the loader need.
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH ?? "/usr/bin:/bin", LANG: "C.UTF-8", TZ: "UTC" };
  const onOutput = opts.onOutput;
  const child = spawn(cmd, args, { stdio: ["ignore", onOutput ? "pipe" : 2, onOutput ? "pipe" : 2, "pipe"], env });
  // (A process that could not be started may have no pipes.)
  const pipes = onOutput ? [child.stdout, child.stderr].filter((s): s is Readable => s !== null) : [];
  const printed = Promise.all(pipes.map((s) => new Promise<void>((res) => s.on("data", onOutput!).on("end", res).on("error", () => res()).on("close", res))));
  let startError: Error | undefined;
  const timeoutMs = (opts.timeoutSeconds ?? 600) * 1000;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill("SIGKILL");
    (child.stdio[3] as Readable | null)?.resume();
  }, timeoutMs);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) => {
    child.on("exit", (code, signal) => res({ code, signal }));
    // A process that could not be started has no exit.
    child.on("error", (e) => {
      startError ??= e;
      res({ code: null, signal: null });
    });
  });
  const jobs: EvalJob[] = [];
  let texts = 0;
  let sources = 0;
  let failure: FerryError | undefined;
  let finished = false;
  const store = opts.store;
  const batch = new TextBatch(opts.textBatch ?? 5000, store);
  const onFrame = (kind: number, buf: Buffer, start: number, end: number) => {
    if (finished) throw protocolError("a message after the end of the plan");
    if (kind === FRAME_TEXT) {
      const fault = textRecordFault(buf, start, end);
      if (fault) throw protocolError(fault);
      texts++;
      batch.add(buf, start, end);
      return;
    }
    if (kind === FRAME_JOB) {
      // The texts collected before the first job go to the writer now, not after the last
      // job (in a set that is not lazy they are all the texts).
      if (jobs.length === 0) batch.flush();
      const job = decodeJob(buf, start, end);
      jobs.push(job);
      opts.onJob?.(job);
      return;
    }
    let m: { t: string } & Record<string, unknown>;
    try {
      m = JSON.parse(buf.toString("utf8", start, end)) as { t: string } & Record<string, unknown>;
    } catch {
      throw protocolError("a message that is not JSON");
    }
    if (m === null || typeof m !== "object" || typeof m.t !== "string") throw protocolError("a message that is not an object with a kind");
    const fields = FIELDS[m.t];
    if (fields && !fields.every((f) => typeof m[f] === "string")) throw protocolError(`a '${m.t}' message without ${fields.join(", ")}`);
    switch (m.t) {
      case "source":
        batch.flush();
        sources++;
        store?.addSource(m as unknown as PlannedSource);
        break;
      case "done":
        batch.flush();
        finished = true;
        break;
      case "error":
        failure = new FerryError(String(m.code), String(m.message), {
          ...(m.hint ? { hint: String(m.hint) } : { hint: "fix the package set; the message says where" }),
          details: m.stack ? { stack: m.stack } : {},
        });
        break;
      default:
        throw protocolError(`a message of unknown kind '${String(m.t)}'`);
    }
  };
  const fail = (e: unknown) => {
    failure = e instanceof FerryError ? e : new FerryError("FERRY_EVAL_STORE", `could not record the evaluation: ${(e as Error).message}`);
    child.kill("SIGKILL");
    (child.stdio[3] as Readable | null)?.resume(); // read to the end, even while waiting for the writer
  };
  // A plan the store refuses (a text that is not what it claims, a full disk) stops the
  // evaluation at once, and is what gets reported.
  store?.onFailure?.((e) => {
    if (!failure) fail(e);
  });
  try {
    const reader = new FrameReader(onFrame);
    const input = child.stdio[3] as Readable;
    await new Promise<void>((resolve) => {
      let paused = false;
      input.on("data", (chunk: Buffer) => {
        if (failure) return;
        try {
          reader.push(chunk);
        } catch (e) {
          fail(e);
          return;
        }
        opts.onProgress?.({ derivations: texts, sources, jobs: jobs.length, writing: false });
        if (!paused && store?.backlog && store.drained && store.backlog() >= MAX_BACKLOG) {
          paused = true;
          input.pause();
          void store.drained(MAX_BACKLOG).then(() => {
            paused = false;
            input.resume();
          });
        }
      });
      input.on("error", (e) => {
        if (!failure) fail(e);
        resolve();
      });
      input.on("end", () => {
        try {
          if (!failure) reader.end();
        } catch (e) {
          fail(e);
        }
        resolve();
      });
    });
  } finally {
    clearTimeout(timer);
    if (failure && child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  }
  const { code, signal } = await exited;
  // What it printed last (a fatal error) is shown before the result; a process it started
  // that keeps the output open (only possible without the sandbox) is not waited for long.
  let grace: NodeJS.Timeout | undefined;
  await Promise.race([printed, new Promise((res) => (grace = setTimeout(res, OUTPUT_GRACE_MS)))]);
  clearTimeout(grace);
  child.stdout?.destroy();
  child.stderr?.destroy();
  const complete = !(failure || timedOut || !finished);
  if (complete && opts.store) opts.onProgress?.({ derivations: texts, sources, jobs: jobs.length, writing: true });
  await settle(complete);
  if (failure) throw failure;
  if (timedOut) {
    throw new FerryError("FERRY_EVAL_TIMEOUT", `evaluating ${opts.file} took longer than ${opts.timeoutSeconds ?? 600} s and was stopped`, {
      hint: "look for an endless loop in the package set, or raise --eval-timeout",
    });
  }
  if (!finished && startError) {
    throw new FerryError("FERRY_EVAL_START_FAILED", `could not start the evaluator (${cmd}): ${startError.message}`, {
      hint: "check that Node and bubblewrap (bwrap) are installed and that this user may run them",
    });
  }
  if (!finished) {
    const oom = signal === "SIGABRT" || code === 134;
    throw new FerryError(oom ? "FERRY_EVAL_OUT_OF_MEMORY" : "FERRY_EVAL_CRASHED", oom
      ? `evaluating ${opts.file} needed more than ${opts.memoryMiB ?? 4096} MiB and was stopped`
      : `the evaluator of ${opts.file} stopped unexpectedly (${signal ?? `exit code ${code}`})`, {
      hint: oom ? "raise --eval-memory, or look for a package set that grows without end" : "run again; if it repeats, report it with the package set",
    });
  }
  return { jobs, texts, sources };
}

/**
 * Text records collected into batches for the store port: each record is copied once into the
 * current batch, whose buffer goes to the port whole (a writer thread takes it over).
 */
class TextBatch {
  #buf: Uint8Array;
  #used = 0;
  #count = 0;
  readonly #limit: number;
  readonly #store: EvalStorePort | undefined;

  constructor(limit: number, store: EvalStorePort | undefined) {
    this.#limit = limit;
    this.#store = store;
    this.#buf = store ? new Uint8Array(TEXT_BATCH_BYTES) : new Uint8Array(0);
  }

  /** Adds the record `buf[start, end)`. */
  add(buf: Buffer, start: number, end: number): void {
    if (!this.#store) return;
    const size = end - start;
    if (this.#used + size > this.#buf.length) {
      this.flush();
      if (size > this.#buf.length) this.#buf = new Uint8Array(size);
    }
    this.#used += buf.copy(this.#buf, this.#used, start, end);
    if (++this.#count >= this.#limit) this.flush();
  }

  flush(): void {
    const store = this.#store;
    if (!store || this.#count === 0) return;
    // A batch that filled its buffer hands the buffer over; a small one (cut short by a source)
    // goes as a copy of its size, and the buffer is kept.
    const small = this.#used < this.#buf.length / 4;
    const records = small ? this.#buf.slice(0, this.#used) : this.#buf.subarray(0, this.#used);
    if (!small) this.#buf = new Uint8Array(TEXT_BATCH_BYTES);
    this.#used = 0;
    this.#count = 0;
    store.addTextRecords(records);
  }
}

const TEXT_BATCH_BYTES = 8 * 1024 * 1024;

/** The string fields each kind of JSON message must have. */
const FIELDS: Readonly<Record<string, readonly string[]>> = {
  source: ["storePath", "from", "name"],
  error: ["code", "message"],
};

/**
 * The worker's decisions, as values and pure functions (no I/O, no clock, no randomness of their
 * own): where to dial, how long to wait before dialling again, what a welcome means for the
 * steps the worker holds, which results wait for an acknowledgement, how a step's log is
 * batched, and whether a failure is the build's own or worth retrying elsewhere.
 */
import { FerryError } from "../../core/errors.js";
import { parseWorkerMessage, PROTOCOL_VERSION, type Hello, type Result } from "../protocol.js";

// ---- where to dial --------------------------------------------------------------------------

/**
 * The worker endpoint of a farm URL: `http://host[:port][/prefix]` dials
 * `ws://host[:port][/prefix]/api/worker` (https → wss; ws:// and wss:// are taken as they are).
 * Query and fragment are dropped. Throws FERRY_WORKER_BAD_FARM_URL.
 */
export function workerSocketUrl(farm: string): string {
  let u: URL;
  try {
    u = new URL(farm);
  } catch {
    throw badFarmUrl(farm);
  }
  const scheme = { "http:": "ws:", "https:": "wss:", "ws:": "ws:", "wss:": "wss:" }[u.protocol];
  if (scheme === undefined || u.hostname === "" || u.username !== "" || u.password !== "") throw badFarmUrl(farm);
  return `${scheme}//${u.host}${u.pathname.replace(/\/+$/, "")}/api/worker`;
}

/**
 * The worker endpoints of a `--farm` value: one farm URL, or the URLs of several coordinators
 * of one farm separated by commas (or white space). Throws FERRY_WORKER_BAD_FARM_URL.
 */
export function farmSocketUrls(farm: string | readonly string[]): string[] {
  const urls = (typeof farm === "string" ? [farm] : farm).flatMap((f) => f.split(/[\s,]+/)).filter((f) => f !== "");
  if (urls.length === 0) throw badFarmUrl(typeof farm === "string" ? farm : farm.join(","));
  return urls.map(workerSocketUrl);
}

function badFarmUrl(farm: string): FerryError {
  return new FerryError("FERRY_WORKER_BAD_FARM_URL", `'${farm}' is not a farm URL`, {
    hint: "give the coordinator's address, e.g. --farm http://farm.example.org:8090 (https:// for TLS); the token goes in --token",
  });
}

// ---- when to dial again ---------------------------------------------------------------------

export interface BackoffPolicy {
  /** The wait after the first failure. */
  readonly initialMs: number;
  /** The longest wait. */
  readonly maxMs: number;
}

export const DEFAULT_BACKOFF: BackoffPolicy = { initialMs: 500, maxMs: 30_000 };

/**
 * The wait before the next attempt after `failures` consecutive failed ones (≥ 1): a base that
 * doubles from `initialMs` up to `maxMs`, of which a random half is waited ("equal jitter"), so
 * the workers of a farm do not all dial at once when the coordinator comes back. `random` is in
 * [0, 1).
 */
export function reconnectDelay(failures: number, random: number, policy: BackoffPolicy = DEFAULT_BACKOFF): number {
  const base = Math.min(policy.maxMs, policy.initialMs * 2 ** Math.max(0, Math.min(failures - 1, 30)));
  return Math.round(base / 2 + (base / 2) * Math.min(Math.max(random, 0), 1));
}

/** Where the worker dials next: farm URL `at`, `tried` URLs into a round, and whether to back off first. */
export interface DialPlan {
  readonly at: number;
  readonly tried: number;
  readonly backoff: boolean;
}

/**
 * Where to dial after a connection ended with no redirect to follow, for a worker with `count`
 * farm URLs that last dialled URL `at` (or a coordinator URL `at` redirected it to, when
 * `viaRedirect`), `tried` URLs into the current round (0 after a welcome):
 * - a redirect target that failed sends the worker back to URL `at`, after a backoff (the
 *   coordinator there answered, so it is asked again where the leader is);
 * - URL `at` that failed (or dropped the worker) hands over to the next URL, at once while this
 *   round has URLs not yet tried, else after a backoff, starting a new round.
 * With one URL every failure backs off, as it always did.
 */
export function nextDial(at: number, tried: number, count: number, viaRedirect: boolean): DialPlan {
  if (viaRedirect) return { at, tried, backoff: true };
  const next = (at + 1) % count;
  return tried + 1 >= count ? { at: next, tried: 0, backoff: true } : { at: next, tried: tried + 1, backoff: false };
}

// ---- who the worker is ----------------------------------------------------------------------

/** What the worker announces about itself: a hello without its envelope and running steps. */
export type WorkerIdentity = Omit<Hello, "type" | "protocol" | "running">;

/** The hello for `identity`, naming the steps still held. */
export function helloOf(identity: WorkerIdentity, running: readonly string[]): Hello {
  return { type: "hello", protocol: PROTOCOL_VERSION, ...identity, running: [...running] };
}

/**
 * Checks an identity the way the coordinator will (the protocol's own checks), so that a bad
 * `--id`, `--systems` or `--max-jobs` is refused at start with a coded error, not by the farm.
 */
export function checkIdentity(identity: WorkerIdentity): WorkerIdentity {
  try {
    parseWorkerMessage(JSON.stringify(helloOf(identity, [])));
  } catch (e) {
    const why = (e as Error).message.replace(/^hello: /, "");
    throw new FerryError("FERRY_WORKER_BAD_SETTING", `the worker cannot announce itself: ${why}`, {
      hint: "check --id, --systems, --features, --mandatory-features, --max-jobs and --speed-factor",
    });
  }
  return identity;
}

/** A generated worker id: the host name (in the protocol's alphabet) and a random suffix. */
export function generatedWorkerId(hostname: string, randomHex: string): string {
  const host = hostname.replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[^A-Za-z0-9]+/, "").slice(0, 100);
  return `${host || "worker"}-${randomHex.slice(0, 8)}`;
}

// ---- what a welcome means -------------------------------------------------------------------

export interface WelcomePlan {
  /** Running builds whose lease the worker lost: kill them, report nothing. */
  readonly abort: readonly string[];
  /** Finished steps whose result waits for an acknowledgement: send it again. */
  readonly resend: readonly string[];
  /** Results the coordinator no longer wants (their lease is gone): drop them. */
  readonly forget: readonly string[];
}

/** What to do with the held steps when a (re)connection is welcomed with `keep`. */
export function planWelcome(running: Iterable<string>, awaitingAck: Iterable<string>, keep: readonly string[]): WelcomePlan {
  const kept = new Set(keep);
  const outbox = [...awaitingAck];
  return {
    abort: [...running].filter((id) => !kept.has(id)),
    resend: outbox.filter((id) => kept.has(id)),
    forget: outbox.filter((id) => !kept.has(id)),
  };
}

// ---- results waiting for an ack -------------------------------------------------------------

/**
 * Results sent (or to be sent) and not yet acknowledged, in the order they were produced. A
 * value: the worker persists `toJSON()` so that results survive a restart of the worker too.
 */
export class Outbox {
  readonly #results = new Map<string, Result>();

  /** Holds `result` (replacing an earlier one for the same step). */
  put(result: Result): void {
    this.#results.delete(result.stepId);
    this.#results.set(result.stepId, result);
  }

  /** Forgets the result of `stepId`; whether there was one. */
  delete(stepId: string): boolean {
    return this.#results.delete(stepId);
  }

  get(stepId: string): Result | undefined {
    return this.#results.get(stepId);
  }

  ids(): string[] {
    return [...this.#results.keys()];
  }

  get size(): number {
    return this.#results.size;
  }

  toJSON(): Result[] {
    return [...this.#results.values()];
  }

  /** An outbox from `toJSON()` output; entries that are not valid results are skipped. */
  static fromJSON(value: unknown): Outbox {
    const o = new Outbox();
    for (const item of Array.isArray(value) ? value : []) {
      try {
        const m = parseWorkerMessage(JSON.stringify(item));
        if (m.type === "result") o.put(m);
      } catch {
        /* a damaged entry: its lease expires and the step is built again */
      }
    }
    return o;
  }
}

// ---- a step's live log ----------------------------------------------------------------------

/** Send a batch once this much text is pending (else every LOG_FLUSH_MS). */
export const LOG_CHUNK_CHARS = 64 * 1024;
export const LOG_FLUSH_MS = 100;

/**
 * The log text of one step that is not sent yet. Bounded: while the connection is down (or
 * backed up) text beyond `maxChars` is dropped and counted, and the next batch says so; the
 * complete log stays in the worker's store and goes to the cache with the outputs.
 */
export class LogBuffer {
  readonly #maxChars: number;
  #parts: string[] = [];
  #size = 0;
  #dropped = 0;

  constructor(maxChars = 4 * 1024 * 1024) {
    this.#maxChars = maxChars;
  }

  /** Adds one line (a newline is appended). */
  push(line: string): void {
    const text = `${line}\n`;
    if (this.#size + text.length > this.#maxChars) {
      this.#dropped += text.length;
      return;
    }
    this.#parts.push(text);
    this.#size += text.length;
  }

  /** Characters waiting. */
  get size(): number {
    return this.#size;
  }

  /** Whether anything (text, or the news that text was dropped) waits to be sent. */
  get pending(): boolean {
    return this.#size > 0 || this.#dropped > 0;
  }

  /** Removes and returns up to about `maxChars` of pending text (whole lines), or undefined when there is none. */
  take(maxChars = LOG_CHUNK_CHARS): string | undefined {
    if (this.#size === 0 && this.#dropped === 0) return undefined;
    let out = "";
    if (this.#dropped > 0) {
      out = `[ferry worker: ${this.#dropped} characters of log were not streamed while the coordinator was unreachable; the full log is kept with the build]\n`;
      this.#dropped = 0;
    }
    let n = 0;
    while (n < this.#parts.length && (n === 0 || out.length + this.#parts[n]!.length <= maxChars)) out += this.#parts[n++]!;
    const taken = this.#parts.splice(0, n);
    this.#size -= taken.reduce((s, p) => s + p.length, 0);
    return out;
  }
}

// ---- whose failure it is --------------------------------------------------------------------

/**
 * Failures that are the build's own: the same derivation fails the same way on any worker, so
 * retrying elsewhere is pointless. Every other failure (fetching inputs, uploading, the cache,
 * this machine's setup, a full disk) is transient: the step goes back to the queue.
 */
const BUILD_OWN_FAILURES = new Set([
  "FERRY_BUILD_FAILED",
  "FERRY_BUILD_TIMEOUT",
  "FERRY_BUILD_SILENT",
  "FERRY_BUILD_NO_OUTPUT",
  "FERRY_BUILD_BAD_OUTPUT",
  "FERRY_BUILD_HASH_MISMATCH",
  "FERRY_BUILD_FIXED_OUTPUT_REFERENCES",
  "FERRY_BUILD_OUTPUT_CYCLE",
  "FERRY_FETCH_FAILED",
]);

/** Below this much free space in the store, a failed build is blamed on the disk. */
export const DISK_FULL_BYTES = 64 * 1024 * 1024;

/** Whether a failure with `code` is worth retrying on another worker. */
export function isTransientFailure(code: string, freeDiskBytes: number): boolean {
  return !BUILD_OWN_FAILURES.has(code) || freeDiskBytes < DISK_FULL_BYTES;
}

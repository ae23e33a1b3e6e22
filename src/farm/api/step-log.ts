/**
 * Reading step logs as the dispatcher writes them (`<logDir>/<drv base name>`, truncated when
 * the step is dispatched, appended as workers stream `log` messages): a byte range now, or the
 * log followed as it grows until its step finishes.
 *
 * Followers poll: one timer for all of them (every `pollMs`, 200 ms by default) looks up the
 * status of every followed step in one query, then each follower reads what its file gained.
 * Polling rather than fs.watch: the end of a follow needs the database anyway, a queued step's
 * log does not exist yet (watching the directory would wake every follower on every line of
 * every build), inotify does not see writes over network file systems, and polling 1,000 logs
 * every 200 ms measured under 1% of a core more than watching them. The price is latency: new
 * bytes arrive ~100 ms after they were written (at most `pollMs`; fs.watch: under 1 ms). The
 * timer runs only while someone follows.
 */
import * as fs from "node:fs";
import { sql, type Kysely } from "kysely";
import type { FarmSchema } from "../db/index.js";

const CHUNK = 64 * 1024;

/** Step statuses after which nothing more is written to a step's log. */
const LIVE = new Set(["queued", "running"]);

export interface LogRead {
  /** The log file. */
  readonly path: string;
  readonly stepId: string;
  /** The step's status when the request came (the first check of the end of a follow). */
  readonly status: string;
  /** The first byte to send. */
  readonly offset: number;
  /** Without follow: up to this byte (the size when the request came). */
  readonly end?: number;
  /** Keep sending what is appended until the step has finished. */
  readonly follow: boolean;
}

export interface LogFollowers {
  /** The bytes of a log from `offset`: to `end`, or (follow) until the step has finished and the file is read to its end. */
  read(r: LogRead, signal: AbortSignal): AsyncGenerator<Uint8Array>;
  /** Prometheus lines (`ferry_farm_log_followers`). */
  metrics(): string;
  /** Ends every follow. */
  close(): void;
}

export function createLogFollowers(opts: { readonly db: Kysely<FarmSchema>; readonly pollMs?: number; readonly log?: (line: string) => void }): LogFollowers {
  const pollMs = opts.pollMs ?? 200;
  const log = opts.log ?? ((l: string) => process.stderr.write(`ferry farm: ${l}\n`));
  /** Followed step id → how many follow it. */
  const followed = new Map<string, number>();
  /** The latest status of each followed step. */
  const statuses = new Map<string, string>();
  /** The follows running now, to end them on close. */
  const follows = new Set<AbortController>();
  let waiters: (() => void)[] = [];
  let timer: NodeJS.Timeout | undefined;
  let ticking = false;
  let closed = false;
  /** Whether the last status look failed (said once, not every tick). */
  let failing = false;

  const schedule = () => {
    if (timer === undefined && !ticking && follows.size > 0 && !closed) timer = setTimeout(() => void tick(), pollMs);
  };
  const tick = async (): Promise<void> => {
    timer = undefined;
    ticking = true;
    try {
      const ids = [...followed.keys()];
      if (ids.length > 0) {
        const r = await sql<{ id: string; status: string }>`select id::text as id, status from steps where id = any(${sql.val(ids)}::bigint[])`.execute(opts.db);
        for (const row of r.rows) if (followed.has(row.id)) statuses.set(row.id, row.status);
      }
      failing = false;
    } catch (e) {
      // A follow outlives a database hiccup: it only cannot end until a look succeeds.
      if (!closed && !failing) log(`following step logs: cannot read step statuses (trying again every ${pollMs} ms): ${(e as Error).message}`);
      failing = true;
    } finally {
      ticking = false;
      const wake = waiters;
      waiters = [];
      for (const w of wake) w();
      schedule();
    }
  };

  /** Resolves after the next status look, or at once when `signal` is aborted. */
  const nextTick = (signal: AbortSignal): Promise<void> =>
    new Promise<void>((resolve) => {
      if (signal.aborted) return resolve();
      const done = () => {
        signal.removeEventListener("abort", done);
        waiters = waiters.filter((w) => w !== done);
        resolve();
      };
      signal.addEventListener("abort", done);
      waiters.push(done);
      schedule();
    });

  const join = (stepId: string, status: string): AbortController => {
    const ac = new AbortController();
    follows.add(ac);
    followed.set(stepId, (followed.get(stepId) ?? 0) + 1);
    if (!statuses.has(stepId)) statuses.set(stepId, status);
    return ac;
  };
  const leave = (stepId: string, ac: AbortController) => {
    follows.delete(ac);
    const n = (followed.get(stepId) ?? 1) - 1;
    if (n > 0) followed.set(stepId, n);
    else {
      followed.delete(stepId);
      statuses.delete(stepId);
    }
    if (follows.size === 0 && timer !== undefined) {
      clearTimeout(timer);
      timer = undefined;
    }
  };

  async function* read(r: LogRead, clientGone: AbortSignal): AsyncGenerator<Uint8Array> {
    const ac = r.follow ? join(r.stepId, r.status) : new AbortController();
    const signal = ac.signal;
    const abort = () => ac.abort();
    clientGone.addEventListener("abort", abort);
    if (clientGone.aborted) ac.abort();
    let fd: number | undefined;
    let pos = r.offset;
    const buf = Buffer.allocUnsafe(CHUNK);
    try {
      /** One more look after the step was seen finished: bytes whose write raced the result are not lost. */
      let last = false;
      for (;;) {
        fd ??= openIfThere(r.path);
        if (fd !== undefined) {
          const size = fs.fstatSync(fd).size;
          // The dispatcher truncates the log when it runs the step again: follow the new attempt.
          if (size < pos && r.follow) pos = 0;
          const end = r.follow ? size : Math.min(size, r.end ?? size);
          while (pos < end && !signal.aborted) {
            const n = fs.readSync(fd, buf, 0, Math.min(CHUNK, end - pos), pos);
            if (n === 0) break;
            pos += n;
            // A copy: the socket may still hold the chunk when the buffer is read into again.
            yield Buffer.from(buf.subarray(0, n));
          }
        }
        if (!r.follow || last || signal.aborted) return;
        if (!LIVE.has(statuses.get(r.stepId) ?? r.status)) last = true;
        await nextTick(signal);
        if (signal.aborted) return;
      }
    } finally {
      clientGone.removeEventListener("abort", abort);
      if (fd !== undefined) fs.closeSync(fd);
      if (r.follow) leave(r.stepId, ac);
    }
  }

  return {
    read,
    metrics: () => ["# HELP ferry_farm_log_followers Responses following a step's log now.", "# TYPE ferry_farm_log_followers gauge", `ferry_farm_log_followers ${follows.size}`, ""].join("\n"),
    close: () => {
      closed = true;
      for (const ac of follows) ac.abort();
      if (timer !== undefined) clearTimeout(timer);
      timer = undefined;
    },
  };
}

/** The size of a log file, or undefined when there is none. */
export function logSize(path: string): number | undefined {
  return fs.statSync(path, { throwIfNoEntry: false })?.size;
}

function openIfThere(path: string): number | undefined {
  try {
    return fs.openSync(path, "r");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw e;
  }
}

/**
 * The farm worker's connection: it dials the coordinator (protocol.ts), builds the steps it is
 * given (step.ts, up to `maxJobs` at once), streams their logs, and delivers each result until
 * it is acknowledged.
 *
 * Contract:
 * - A lost connection never fails or kills a build. The worker dials again with capped,
 *   jittered exponential backoff (forever: it is a daemon), names the steps it still holds in
 *   `hello`, and on `welcome` stops the builds whose lease it lost, drops their results, and
 *   sends again the results that wait for an acknowledgement (also across restarts: they are
 *   kept in the state directory).
 * - Nothing but `hello` is sent before `welcome`. A step's log lines are batched (every
 *   LOG_FLUSH_MS or LOG_CHUNK_CHARS) and always precede its result; the build never waits for
 *   the socket (while it is down or backed up, the log is buffered up to a bound).
 * - `abort` kills the build (its whole process tree) and no result is sent for it.
 * - `build` for a step the worker already runs is ignored; for one whose result it holds, the
 *   result is sent again; while draining or at `maxJobs`, the step is refused with a transient
 *   failure so the coordinator queues it again at once.
 * - Drain (the coordinator's `drain`, or `drain()`): `drain` is sent, no new step starts, the
 *   running ones finish, their results are acknowledged, then `done` resolves.
 * - `redirect` (or close 4003) dials the URL given; the next reconnect after that goes back to
 *   the configured farm URL that redirected. More than MAX_REDIRECTS in a row without a welcome
 *   count as a failure of that URL, and redirects are followed again after it.
 * - With several farm URLs (coordinators of one farm on one database), one that fails or drops
 *   the worker hands over to the next at once; a round of URLs that all failed backs off (see
 *   `nextDial`).
 * - Close 4001 (or HTTP 401/403 on the upgrade) rejects `done` with FERRY_WORKER_UNAUTHORIZED,
 *   close 4004 with FERRY_WORKER_REPLACED; running builds are killed.
 */
import { loadavg } from "node:os";
import WebSocket from "ws";
import { FerryError, isFerryError } from "../../core/errors.js";
import type { LocalStore } from "../../store/local-store.js";
import {
  CLOSE_PROTOCOL_ERROR,
  CLOSE_REDIRECT,
  CLOSE_REPLACED,
  CLOSE_UNAUTHORIZED,
  parseCoordinatorMessage,
  type BuildRequest,
  type CoordinatorMessage,
  type Result,
  type Welcome,
  type WorkerMessage,
} from "../protocol.js";
import { WorkerEmitter } from "./events.js";
import {
  DEFAULT_BACKOFF,
  farmSocketUrls,
  helloOf,
  LOG_CHUNK_CHARS,
  LOG_FLUSH_MS,
  LogBuffer,
  nextDial,
  planWelcome,
  reconnectDelay,
  workerSocketUrl,
  type BackoffPolicy,
  type WorkerIdentity,
} from "./policy.js";
import { WorkerState } from "./state.js";
import { FarmCacheClient, freeDiskBytes, runStep, type StepOutcome } from "./step.js";

export interface WorkerOptions {
  /**
   * The farm's URL (http:// or https://), or the URLs of several coordinators of one farm,
   * tried in turn; the worker dials their /api/worker.
   */
  readonly farm: string | readonly string[];
  /** The worker token. */
  readonly token: string;
  readonly identity: WorkerIdentity;
  readonly store: LocalStore;
  /** Where the worker keeps its unacknowledged results. */
  readonly state: WorkerState;
  readonly sandbox?: boolean;
  /** NIX_BUILD_CORES of each build. */
  readonly cores?: number;
  readonly events?: WorkerEmitter;
  readonly backoff?: BackoffPolicy;
  /** A number in [0, 1) (the reconnect jitter). */
  readonly random?: () => number;
  /** How long a connection may take from dialling to `welcome`. */
  readonly welcomeTimeoutMs?: number;
}

export interface WorkerHandle {
  /** Resolves once drained (or stopped); rejects with FERRY_WORKER_UNAUTHORIZED or FERRY_WORKER_REPLACED. */
  readonly done: Promise<void>;
  /** Takes no new steps, finishes the running ones, delivers their results, then ends. */
  drain(): void;
  /** Ends at once: running builds are killed; unacknowledged results stay in the state directory. */
  stop(): void;
}

interface Running {
  readonly req: BuildRequest;
  readonly name: string;
  readonly controller: AbortController;
  /** Settles once the build has ended and cleaned up after itself. */
  settled?: Promise<void>;
  abortedFor?: string;
}

/** Sent data beyond this waits in the step's log buffer instead of the socket's. */
const MAX_SOCKET_BACKLOG = 1024 * 1024;
/** Following redirects this many times in a row without a welcome counts as a failure of the farm URL that sent them. */
const MAX_REDIRECTS = 5;
/** The shortest heartbeat period honoured, whatever the coordinator asks. */
const MIN_HEARTBEAT_MS = 100;
/** How long a stopping worker waits for killed builds to clean up their build directories. */
const STOP_GRACE_MS = 5000;

const nameOf = (drvPath: string) => drvPath.slice(drvPath.lastIndexOf("/") + 1).replace(/^[0-9a-z]{32}-/, "").replace(/\.drv$/, "");

/** Starts a worker; see the module comment for what it promises. */
export function startWorker(opts: WorkerOptions): WorkerHandle {
  const farmUrls = farmSocketUrls(opts.farm);
  const ev = opts.events ?? new WorkerEmitter();
  const backoff = opts.backoff ?? DEFAULT_BACKOFF;
  const random = opts.random ?? Math.random;
  const identity = opts.identity;
  const running = new Map<string, Running>();
  const farmCache = new FarmCacheClient();
  const logs = new Map<string, LogBuffer>();
  const outbox = opts.state.loadOutbox();

  let ws: WebSocket | undefined;
  /** The farm URL dialled last (or that redirected the worker), and how many were tried in this round. */
  let at = 0;
  let tried = 0;
  let url = farmUrls[0]!;
  let viaRedirect = false;
  let welcome: Welcome | undefined;
  let failures = 0;
  let redirects = 0;
  let redirectTo: string | undefined;
  let fatal: FerryError | undefined;
  let lastReason = "";
  let lastHeard = 0;
  let draining = false;
  let ended = false;
  let heartbeatTimer: NodeJS.Timeout | undefined;
  let welcomeTimer: NodeJS.Timeout | undefined;
  let retryTimer: NodeJS.Timeout | undefined;
  let logTimer: NodeJS.Timeout | undefined;

  let resolveDone!: () => void;
  let rejectDone!: (e: FerryError) => void;
  const done = new Promise<void>((res, rej) => {
    resolveDone = res;
    rejectDone = rej;
  });

  const held = () => [...new Set([...running.keys(), ...outbox.ids()])];
  const saveOutbox = () => {
    try {
      opts.state.saveOutbox(outbox);
    } catch {
      /* the results are still in memory; only a restart would lose them */
    }
  };

  /** Sends when welcomed on an open socket; whether it went out. */
  const send = (m: WorkerMessage): boolean => {
    if (!ws || ws.readyState !== WebSocket.OPEN || (!welcome && m.type !== "hello")) return false;
    ws.send(JSON.stringify(m));
    return true;
  };

  // ---- logs and results -------------------------------------------------------------------

  /** Sends pending log text of every step (or of `only`), unless the socket is backed up. */
  const flushLogs = (only?: string): boolean => {
    if (!welcome || !ws || ws.readyState !== WebSocket.OPEN) return false;
    for (const [stepId, buf] of logs) {
      if (only !== undefined && stepId !== only) continue;
      for (let data = buf.take(); data !== undefined; data = buf.take()) {
        send({ type: "log", stepId, data });
        if (only === undefined && ws.bufferedAmount > MAX_SOCKET_BACKLOG) {
          scheduleLogFlush();
          return false;
        }
      }
    }
    return true;
  };

  const scheduleLogFlush = () => {
    logTimer ??= setTimeout(() => {
      logTimer = undefined;
      flushLogs();
    }, LOG_FLUSH_MS);
  };

  /** Sends the held result of `stepId`, its remaining log first. */
  const deliver = (stepId: string) => {
    const r = outbox.get(stepId);
    if (!r || !welcome || !flushLogs(stepId)) return;
    logs.delete(stepId);
    send(r);
  };

  const forget = (stepId: string) => {
    logs.delete(stepId);
    if (outbox.delete(stepId)) saveOutbox();
  };

  // ---- steps ------------------------------------------------------------------------------

  const refuse = (req: BuildRequest, reason: string) => {
    ev.emit("step:refused", { stepId: req.stepId, drvPath: req.drvPath, reason });
    outbox.put({ type: "result", stepId: req.stepId, status: "failed", transient: true, error: `FERRY_WORKER_REFUSED: ${reason}`, durationMs: 0 });
    saveOutbox();
    deliver(req.stepId);
  };

  const startStep = (req: BuildRequest, cache: Welcome["cache"]) => {
    const name = nameOf(req.drvPath);
    const r: Running = { req, name, controller: new AbortController() };
    const buf = new LogBuffer();
    running.set(req.stepId, r);
    logs.set(req.stepId, buf);
    ev.emit("step:started", { stepId: req.stepId, drvPath: req.drvPath, name, attempt: req.attempt });
    const onLog = (line: string) => {
      if (r.abortedFor !== undefined) return;
      buf.push(line);
      ev.emit("step:log", { stepId: req.stepId, name, line });
      if (buf.size >= LOG_CHUNK_CHARS) flushLogs();
      else scheduleLogFlush();
    };
    r.settled = runStep(req, { store: opts.store, cache, farmCache, sandbox: opts.sandbox ?? true, cores: opts.cores ?? 1, signal: r.controller.signal, onLog })
      .catch((e: unknown): StepOutcome => ({ status: "failed", transient: true, error: String((e as Error)?.message ?? e), durationMs: 0 }))
      .then((outcome) => finishStep(r, outcome));
  };

  const finishStep = (r: Running, outcome: StepOutcome) => {
    const { stepId, drvPath } = r.req;
    running.delete(stepId);
    if (r.abortedFor !== undefined) {
      logs.delete(stepId);
      ev.emit("step:aborted", { stepId, drvPath, name: r.name, reason: r.abortedFor });
    } else {
      const result: Result = { type: "result", stepId, ...outcome };
      outbox.put(result);
      saveOutbox();
      ev.emit("step:finished", { stepId, drvPath, name: r.name, ...outcome, ...(outcome.outputs ? { outputs: { ...outcome.outputs } } : {}) });
      deliver(stepId);
    }
    checkDrained();
  };

  const abortStep = (stepId: string, reason: string) => {
    const r = running.get(stepId);
    if (r && r.abortedFor === undefined) {
      r.abortedFor = reason;
      r.controller.abort();
    }
    forget(stepId);
  };

  // ---- the connection ---------------------------------------------------------------------

  const clearConnectionTimers = () => {
    clearInterval(heartbeatTimer);
    clearTimeout(welcomeTimer);
    heartbeatTimer = welcomeTimer = undefined;
  };

  const heartbeat = async (socket: WebSocket, w: Welcome) => {
    if (socket !== ws) return;
    // A connection that answers nothing (not even pings) for a lease is dead: dial again.
    if (Date.now() - lastHeard > Math.max(w.leaseMs, 3 * w.heartbeatMs)) {
      lastReason = "the coordinator stopped answering";
      socket.terminate();
      return;
    }
    const freeDisk = await freeDiskBytes(opts.store);
    if (socket !== ws) return;
    send({ type: "heartbeat", load: Math.max(0, loadavg()[0] ?? 0), freeDiskBytes: Math.min(freeDisk, Number.MAX_SAFE_INTEGER), running: held() });
    socket.ping();
  };

  const onWelcome = (socket: WebSocket, w: Welcome) => {
    welcome = w;
    failures = 0;
    redirects = 0;
    tried = 0;
    clearTimeout(welcomeTimer);
    const plan = planWelcome(running.keys(), outbox.ids(), w.keep);
    for (const id of plan.abort) abortStep(id, "the coordinator gave the step to another worker while this one was away");
    for (const id of plan.forget) {
      forget(id);
      ev.emit("result:dropped", { stepId: id });
    }
    if (draining) send({ type: "drain" });
    clearInterval(heartbeatTimer);
    ev.emit("worker:connected", { url, id: identity.id, kept: w.keep.length, resent: plan.resend.length, aborted: plan.abort.length });
    for (const id of plan.resend) deliver(id);
    flushLogs();
    heartbeatTimer = setInterval(() => void heartbeat(socket, w), Math.max(MIN_HEARTBEAT_MS, w.heartbeatMs));
    void heartbeat(socket, w);
    checkDrained();
  };

  const onMessage = (socket: WebSocket, m: CoordinatorMessage) => {
    if (m.type === "welcome") return onWelcome(socket, m);
    if (m.type === "redirect") {
      try {
        redirectTo = workerSocketUrl(m.url);
      } catch {
        throw new FerryError("FERRY_FARM_PROTOCOL", `redirect to '${m.url}', which is not a farm URL`);
      }
      ev.emit("worker:redirected", { from: url, to: redirectTo });
      lastReason = `redirected to ${redirectTo}`;
      socket.close(1000, "redirected");
      return;
    }
    if (!welcome) throw new FerryError("FERRY_FARM_PROTOCOL", `'${m.type}' before 'welcome'`);
    switch (m.type) {
      case "build": {
        const current = running.get(m.stepId);
        if (current?.abortedFor !== undefined) return refuse(m, "the step's previous build is still being stopped");
        if (current) return;
        if (outbox.get(m.stepId)) return deliver(m.stepId);
        if (draining) return refuse(m, "the worker is draining");
        if (running.size >= identity.maxJobs) return refuse(m, `the worker already runs its maximum of ${identity.maxJobs} jobs`);
        return startStep(m, welcome.cache);
      }
      case "ack":
        forget(m.stepId);
        ev.emit("result:acknowledged", { stepId: m.stepId, accepted: m.accepted });
        return checkDrained();
      case "abort":
        return abortStep(m.stepId, m.reason || "aborted by the coordinator");
      case "drain":
        return startDrain("coordinator");
    }
  };

  const connect = () => {
    retryTimer = undefined;
    if (ended) return;
    viaRedirect = redirectTo !== undefined;
    url = redirectTo ?? farmUrls[at]!;
    redirectTo = undefined;
    welcome = undefined;
    lastReason = "";
    ev.emit("worker:connecting", { url, attempt: failures + 1 });
    const socket = new WebSocket(url, { headers: { authorization: `Bearer ${opts.token}` }, handshakeTimeout: 10_000, maxPayload: 64 * 1024 * 1024 });
    ws = socket;
    lastHeard = Date.now();
    welcomeTimer = setTimeout(() => {
      lastReason = "no welcome from the coordinator";
      socket.terminate();
    }, opts.welcomeTimeoutMs ?? 30_000);
    socket.on("unexpected-response", (_req, res) => {
      const status = res.statusCode ?? 0;
      if (status === 401 || status === 403) fatal ??= unauthorized(`the farm refused the worker token (HTTP ${status})`);
      lastReason = `HTTP ${status} ${res.statusMessage ?? ""}`.trim();
      res.resume();
      socket.terminate();
    });
    socket.on("open", () => {
      send(helloOf(identity, held()));
    });
    socket.on("message", (data, isBinary) => {
      if (socket !== ws) return;
      lastHeard = Date.now();
      try {
        if (isBinary) throw new FerryError("FERRY_FARM_PROTOCOL", "a binary message from the coordinator");
        onMessage(socket, parseCoordinatorMessage(Buffer.isBuffer(data) ? data.toString("utf8") : Buffer.concat(data as Buffer[]).toString("utf8")));
      } catch (e) {
        if (!isFerryError(e)) throw e;
        lastReason = e.message;
        socket.close(CLOSE_PROTOCOL_ERROR, e.message.slice(0, 120));
      }
    });
    socket.on("pong", () => {
      lastHeard = Date.now();
    });
    socket.on("error", (e) => {
      lastReason ||= e.message;
    });
    socket.on("close", (code, reasonBytes) => onClose(socket, code, reasonBytes.toString("utf8")));
  };

  const onClose = (socket: WebSocket, code: number, reason: string) => {
    if (socket !== ws) return;
    const wasWelcomed = welcome !== undefined;
    ws = undefined;
    welcome = undefined;
    clearConnectionTimers();
    const why = reason || lastReason || (code === 1006 ? "the connection dropped" : `closed by the coordinator with code ${code}`);
    if (code === CLOSE_UNAUTHORIZED) fatal ??= unauthorized(`the farm refused the worker token${reason ? ` (${reason})` : ""}`);
    if (code === CLOSE_REPLACED) {
      fatal ??= new FerryError("FERRY_WORKER_REPLACED", `another worker connected with the id '${identity.id}', so the farm closed this connection`, {
        hint: "each worker needs its own id: give the other one a different --id (or its own --worker-state-dir)",
      });
    }
    if (wasWelcomed || code !== 1006) ev.emit("worker:disconnected", { url, code, reason: why });
    if (fatal) return end(fatal);
    if (ended) return;
    if (draining && held().length === 0) return end();
    if (code === CLOSE_REDIRECT && !redirectTo && reason.includes("://")) {
      try {
        redirectTo = workerSocketUrl(reason);
      } catch {
        /* no usable URL in the reason: dial the farm again */
      }
    }
    if (redirectTo && ++redirects <= MAX_REDIRECTS) return connect();
    // Too many redirects without a welcome: the farm URL that sends them failed; the count starts again.
    const tooMany = redirectTo !== undefined;
    redirectTo = undefined;
    if (tooMany) redirects = 0;
    const plan = nextDial(at, tried, farmUrls.length, viaRedirect && !tooMany);
    at = plan.at;
    tried = plan.tried;
    if (!plan.backoff) {
      ev.emit("worker:retrying", { delayMs: 0, failures, reason: why });
      retryTimer = setTimeout(connect, 0);
      return;
    }
    failures++;
    const delayMs = reconnectDelay(failures, random(), backoff);
    ev.emit("worker:retrying", { delayMs, failures, reason: why });
    retryTimer = setTimeout(connect, delayMs);
  };

  // ---- draining and ending ----------------------------------------------------------------

  const startDrain = (by: "coordinator" | "signal") => {
    if (draining || ended) return;
    draining = true;
    ev.emit("worker:draining", { by, running: running.size, unacknowledged: outbox.size });
    if (by === "signal") send({ type: "drain" });
    checkDrained();
  };

  const checkDrained = () => {
    if (draining && !ended && held().length === 0) end();
  };

  const end = (error?: FerryError) => {
    if (ended) return;
    ended = true;
    clearConnectionTimers();
    clearTimeout(retryTimer);
    clearTimeout(logTimer);
    const settling: Promise<void>[] = [];
    for (const r of running.values()) {
      r.abortedFor ??= error ? error.message : "the worker stopped";
      r.controller.abort();
      if (r.settled) settling.push(r.settled);
    }
    const socket = ws;
    ws = undefined;
    if (socket) {
      if (socket.readyState === WebSocket.OPEN) socket.close(1000, draining ? "drained" : "stopping");
      else socket.terminate();
    }
    const finish = () => {
      void farmCache.close();
      if (error) rejectDone(error);
      else {
        if (draining && settling.length === 0) ev.emit("worker:drained", {});
        resolveDone();
      }
    };
    if (settling.length === 0) return finish();
    // Killed builds remove their build directories; give them a moment before the store closes.
    const grace = setTimeout(finish, STOP_GRACE_MS);
    grace.unref();
    void Promise.allSettled(settling).then(() => {
      clearTimeout(grace);
      finish();
    });
  };

  connect();
  return { done, drain: () => startDrain("signal"), stop: () => end() };
}

function unauthorized(message: string): FerryError {
  return new FerryError("FERRY_WORKER_UNAUTHORIZED", message, {
    hint: "pass the token the coordinator was started with (`ferry farm serve --worker-token`) as --token or FERRY_WORKER_TOKEN",
  });
}

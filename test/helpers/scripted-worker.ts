/**
 * A worker that speaks the real protocol over a real WebSocket but builds nothing: each step
 * "takes" a scripted time and ends as scripted. For testing the coordinator's side (dispatch,
 * leases, crashes) at scales real builds would make slow; the real worker has its own tests.
 */
import WebSocket from "ws";
import { PROTOCOL_VERSION, parseCoordinatorMessage, type BuildRequest } from "../../src/farm/protocol.js";

export interface ScriptedWorkerOptions {
  /** The farm's URL, or several coordinators of one farm: a failed one moves the worker on to the next. */
  readonly url: string | readonly string[];
  readonly token: string;
  readonly id: string;
  readonly systems?: readonly string[];
  readonly features?: readonly string[];
  readonly maxJobs?: number;
  readonly speedFactor?: number;
  /** How long a step takes (ms); default 5. */
  readonly duration?: (drvPath: string) => number;
  /**
   * What a step logs: `log` messages sent evenly over its duration (the first at once, the last
   * one gap before the result); default one line, "building DRV".
   */
  readonly log?: (drvPath: string) => readonly string[];
  /** How a step ends; default succeeded. */
  readonly outcome?: (drvPath: string) => "succeeded" | "failed" | "transient";
  /** Reconnect after a lost connection (default true). */
  readonly reconnect?: boolean;
  /** Send heartbeats naming the steps held, this often (ms); none by default. */
  readonly heartbeatMs?: number;
  /** Lose this build request: never build it, never name it (like a message that was never delivered). */
  readonly lose?: (drvPath: string) => boolean;
}

export interface ScriptedWorker {
  /** Every build request received, in order, with when it came (ms since the epoch). */
  readonly requests: (BuildRequest & { readonly receivedAt: number })[];
  /** Steps whose result the coordinator acknowledged, with whether it accepted it. */
  readonly acks: Map<string, boolean>;
  /** Close codes seen. */
  readonly closes: number[];
  readonly connected: () => boolean;
  /** The URL of the last connection that was welcomed. */
  readonly welcomedAt: () => string | undefined;
  readonly running: () => string[];
  /** Resolves once the coordinator welcomed this worker (again after `n` earlier welcomes). */
  welcomed(n?: number): Promise<void>;
  /** Drops the connection (reconnects after `pauseMs` if reconnect is on). */
  drop(pauseMs?: number): void;
  /** Stops for good, without a goodbye (like a killed process). */
  kill(): void;
  stop(): Promise<void>;
}

export function startScriptedWorker(opts: ScriptedWorkerOptions): ScriptedWorker {
  const requests: ScriptedWorker["requests"] = [];
  const acks = new Map<string, boolean>();
  const closes: number[] = [];
  const running = new Map<string, NodeJS.Timeout>();
  const outbox = new Map<string, string>();
  let ws: WebSocket | undefined;
  let dead = false;
  let pauseUntil = 0;
  let welcomes = 0;
  /** A redirect applies to the next connection only; after that the configured URL again. */
  let redirectTo: string | undefined;
  const urls = typeof opts.url === "string" ? [opts.url] : opts.url;
  /** The configured URL dialled (or that redirected us) last. */
  let at = 0;
  let lastWelcome: string | undefined;
  const waiters: { n: number; resolve: () => void }[] = [];

  const connect = () => {
    if (dead) return;
    const redirected = redirectTo !== undefined;
    const base = redirectTo ?? urls[at]!;
    redirectTo = undefined;
    const sock = new WebSocket(`${base.replace(/^http/, "ws")}/api/worker`, { headers: { authorization: `Bearer ${opts.token}` } });
    ws = sock;
    sock.on("open", () => {
      sock.send(
        JSON.stringify({
          type: "hello",
          protocol: PROTOCOL_VERSION,
          id: opts.id,
          systems: opts.systems ?? ["x86_64-linux"],
          features: opts.features ?? [],
          mandatoryFeatures: [],
          maxJobs: opts.maxJobs ?? 1,
          speedFactor: opts.speedFactor ?? 1,
          running: [...new Set([...running.keys(), ...outbox.keys()])],
        }),
      );
    });
    sock.on("message", (data) => {
      const m = parseCoordinatorMessage(data.toString());
      if (m.type === "welcome") {
        for (const id of [...running.keys()]) {
          if (!m.keep.includes(id)) {
            clearTimeout(running.get(id));
            running.delete(id);
          }
        }
        for (const id of [...outbox.keys()]) if (!m.keep.includes(id)) outbox.delete(id);
        for (const r of outbox.values()) sock.send(r);
        welcomes++;
        lastWelcome = base;
        for (const w of waiters.splice(0)) {
          if (welcomes > w.n) w.resolve();
          else waiters.push(w);
        }
      } else if (m.type === "build") {
        requests.push({ ...m, receivedAt: Date.now() });
        if (opts.lose?.(m.drvPath)) return;
        const t0 = Date.now();
        const duration = opts.duration?.(m.drvPath) ?? 5;
        running.set(
          m.stepId,
          setTimeout(() => {
            running.delete(m.stepId);
            const o = opts.outcome?.(m.drvPath) ?? "succeeded";
            const r = JSON.stringify({
              type: "result",
              stepId: m.stepId,
              status: o === "succeeded" ? "succeeded" : "failed",
              ...(o === "transient" ? { transient: true } : {}),
              ...(o !== "succeeded" ? { error: `scripted ${o} failure` } : { outputs: { out: m.drvPath.replace(/\.drv$/, "") } }),
              durationMs: Date.now() - t0,
            });
            outbox.set(m.stepId, r);
            if (ws?.readyState === WebSocket.OPEN) ws.send(r);
          }, duration),
        );
        const lines = opts.log?.(m.drvPath) ?? [`building ${m.drvPath}\n`];
        const sendLine = (i: number) => {
          if (!running.has(m.stepId)) return;
          if (ws?.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "log", stepId: m.stepId, data: lines[i] }));
          // A step of no duration sends its whole log in one burst.
          if (i + 1 < lines.length) {
            if (duration === 0) sendLine(i + 1);
            else setTimeout(() => sendLine(i + 1), duration / lines.length);
          }
        };
        sendLine(0);
      } else if (m.type === "ack") {
        outbox.delete(m.stepId);
        acks.set(m.stepId, m.accepted);
      } else if (m.type === "abort") {
        clearTimeout(running.get(m.stepId));
        running.delete(m.stepId);
      } else if (m.type === "redirect") {
        redirectTo = m.url;
      }
    });
    const beat = opts.heartbeatMs
      ? setInterval(() => {
          if (sock.readyState === WebSocket.OPEN) sock.send(JSON.stringify({ type: "heartbeat", load: 0, freeDiskBytes: 1e12, running: [...new Set([...running.keys(), ...outbox.keys()])] }));
        }, opts.heartbeatMs)
      : undefined;
    sock.on("close", (code) => {
      clearInterval(beat);
      closes.push(code);
      if (ws === sock) ws = undefined;
      if (dead || opts.reconnect === false || code === 4001 || code === 4004) return;
      // A configured URL that failed (or dropped us) hands over to the next; a redirect target that failed sends us back.
      if (!redirected && redirectTo === undefined) at = (at + 1) % urls.length;
      setTimeout(connect, Math.max(50, pauseUntil - Date.now()));
    });
    sock.on("error", () => undefined);
  };
  connect();

  return {
    requests,
    acks,
    closes,
    connected: () => ws?.readyState === WebSocket.OPEN,
    welcomedAt: () => lastWelcome,
    running: () => [...running.keys()],
    welcomed: (n = 0) => (welcomes > n ? Promise.resolve() : new Promise((resolve) => waiters.push({ n, resolve }))),
    drop: (pauseMs = 0) => {
      pauseUntil = Date.now() + pauseMs;
      ws?.terminate();
    },
    kill: () => {
      dead = true;
      for (const t of running.values()) clearTimeout(t);
      running.clear();
      ws?.terminate();
    },
    stop: async () => {
      dead = true;
      for (const t of running.values()) clearTimeout(t);
      if (ws && ws.readyState !== WebSocket.CLOSED) {
        await new Promise<void>((r) => {
          ws!.once("close", () => r());
          ws!.close();
        });
      }
    },
  };
}

/**
 * A scripted coordinator for worker tests: a WebSocket server on loopback at /api/worker that
 * checks the bearer token, parses every worker message with the protocol's own checks (a
 * message that fails them fails the test), and lets the test wait for messages and answer.
 */
import * as http from "node:http";
import type { AddressInfo } from "node:net";
import { WebSocketServer, type WebSocket } from "ws";
import { parseWorkerMessage, type CoordinatorMessage, type WorkerMessage } from "../../src/farm/protocol.js";

export interface Received {
  readonly at: number;
  readonly message: WorkerMessage;
}

type Waiter = { pred: (m: WorkerMessage) => boolean; resolve: (m: Received) => void };

/** One worker connection as the coordinator sees it. */
export class PeerConnection {
  readonly received: Received[] = [];
  /** Messages that broke the protocol (the test asserts this stays empty). */
  readonly protocolErrors: string[] = [];
  readonly closed: Promise<{ code: number; reason: string }>;
  readonly #ws: WebSocket;
  #waiters: Waiter[] = [];

  constructor(ws: WebSocket) {
    this.#ws = ws;
    this.closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() })));
    ws.on("message", (data) => {
      let message: WorkerMessage;
      try {
        message = parseWorkerMessage(String(data));
      } catch (e) {
        this.protocolErrors.push((e as Error).message);
        return;
      }
      const r = { at: Date.now(), message };
      this.received.push(r);
      this.#waiters = this.#waiters.filter((w) => (w.pred(message) ? (w.resolve(r), false) : true));
    });
  }

  /** A point in the stream of received messages, for `waitFor(…, { after })`. */
  mark(): number {
    return this.received.length;
  }

  /** The first message that matches, received already (after the mark `after`, if given) or still to come. */
  waitFor<T extends WorkerMessage["type"]>(
    type: T,
    pred: (m: Extract<WorkerMessage, { type: T }>) => boolean = () => true,
    { timeoutMs = 15_000, after = 0 }: { timeoutMs?: number; after?: number } = {},
  ): Promise<Received & { message: Extract<WorkerMessage, { type: T }> }> {
    const match = (m: WorkerMessage) => m.type === type && pred(m as Extract<WorkerMessage, { type: T }>);
    const seen = this.received.slice(after).find((r) => match(r.message));
    if (seen) return Promise.resolve(seen as Received & { message: Extract<WorkerMessage, { type: T }> });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no '${type}' message within ${timeoutMs} ms; got: ${this.received.map((r) => r.message.type).join(", ")}`)), timeoutMs);
      this.#waiters.push({
        pred: match,
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r as Received & { message: Extract<WorkerMessage, { type: T }> });
        },
      });
    });
  }

  of<T extends WorkerMessage["type"]>(type: T): Extract<WorkerMessage, { type: T }>[] {
    return this.received.filter((r) => r.message.type === type).map((r) => r.message as Extract<WorkerMessage, { type: T }>);
  }

  /** The log text of `stepId` received on this connection. */
  logOf(stepId: string): string {
    return this.of("log").filter((l) => l.stepId === stepId).map((l) => l.data).join("");
  }

  send(m: CoordinatorMessage): void {
    this.#ws.send(JSON.stringify(m));
  }

  close(code = 1000, reason = ""): void {
    this.#ws.close(code, reason);
  }

  /** Drops the connection without a closing handshake (a crashed coordinator, a cut cable). */
  terminate(): void {
    this.#ws.terminate();
  }
}

export class ScriptedCoordinator {
  readonly url: string;
  readonly connections: PeerConnection[] = [];
  readonly #server: http.Server;
  readonly #wss: WebSocketServer;
  #waiters: (() => void)[] = [];

  private constructor(server: http.Server, wss: WebSocketServer) {
    this.#server = server;
    this.#wss = wss;
    this.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  }

  /** Listens on 127.0.0.1; upgrades to /api/worker with `Bearer <token>` are accepted, others get 401. */
  static async start(token: string): Promise<ScriptedCoordinator> {
    const server = http.createServer((_req, res) => res.writeHead(404).end());
    const wss = new WebSocketServer({ noServer: true });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const c = new ScriptedCoordinator(server, wss);
    server.on("upgrade", (req, socket, head) => {
      if (req.url !== "/api/worker" || req.headers.authorization !== `Bearer ${token}`) {
        socket.end("HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
      }
      wss.handleUpgrade(req, socket, head, (ws) => {
        const conn = new PeerConnection(ws);
        c.connections.push(conn);
        const waiting = c.#waiters;
        c.#waiters = [];
        for (const w of waiting) w();
      });
    });
    return c;
  }

  /** The `n`th connection (0-based), once it exists. */
  connection(n: number, timeoutMs = 15_000): Promise<PeerConnection> {
    if (this.connections[n]) return Promise.resolve(this.connections[n]!);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no connection #${n} within ${timeoutMs} ms`)), timeoutMs);
      const check = () => {
        if (this.connections[n]) {
          clearTimeout(timer);
          resolve(this.connections[n]!);
        } else this.#waiters.push(check);
      };
      this.#waiters.push(check);
    });
  }

  async close(): Promise<void> {
    for (const ws of this.#wss.clients) ws.terminate();
    this.#wss.close();
    this.#server.closeAllConnections();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}

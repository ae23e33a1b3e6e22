/**
 * The coordinator: the farm's HTTP API (described in ./api/openapi.ts, served at
 * /api/openapi.json; see docs/farm-api.md), the loop that evaluates jobsets when they are due
 * and reads declarative projects' jobset files, and webhook delivery.
 *
 * The routes live in ./api/*; more can be added with `extraRoutes` (the dispatcher's worker and
 * step routes), WebSocket upgrades are handed to `onUpgrade` (the worker socket, which uses
 * `authenticate`), and `extraMetrics` appends lines to /metrics.
 */
import * as http from "node:http";
import { join } from "node:path";
import type { Duplex } from "node:stream";
import { FerryError } from "../core/errors.js";
import type { LocalStore } from "../store/local-store.js";
import type { FarmDatabase } from "./db/index.js";
import { refreshDeclaredProject } from "./declarative.js";
import { startEvaluationLoop } from "./evaluation-loop.js";
import { startWebhookDelivery, type DeliveryOptions } from "./webhooks.js";
import { createAuthenticator, tokenRoutes, type Role } from "./api/auth.js";
import { buildRoutes } from "./api/builds.js";
import type { WaitOptions } from "./api/commands.js";
import type { ApiContext } from "./api/context.js";
import { evaluationRoutes } from "./api/evaluations.js";
import { ApiError, createRouter, ok, type Method, type Route } from "./api/http.js";
import { metricsRoute } from "./api/metrics.js";
import { OPENAPI } from "./api/openapi.js";
import { projectRoutes } from "./api/projects.js";
import { webhookRoutes } from "./api/webhooks.js";
import { workerRoutes } from "./api/workers.js";
import { createLogFollowers } from "./api/step-log.js";
import { startDispatcher, type Dispatcher, type DispatcherOptions } from "./dispatch/dispatcher.js";
import { openFarmCache, type FarmCacheOptions } from "./farm-cache.js";

export type { ApiContext } from "./api/context.js";
export type { Route, Reply, ApiRequest, Access } from "./api/http.js";
export type { Role } from "./api/auth.js";

export interface CoordinatorOptions {
  readonly db: FarmDatabase;
  readonly store: LocalStore;
  readonly dataDir: string;
  readonly host?: string;
  readonly port?: number;
  readonly adminToken: string;
  readonly workerToken?: string;
  readonly readToken?: string;
  readonly evalTimeoutSeconds?: number;
  readonly evalMemoryMiB?: number;
  /** How often to look for jobsets whose check interval has passed (ms; 0 turns it off). */
  readonly checkEveryMs?: number;
  /** The shared secret of incoming push webhooks (`POST /api/hooks/git`). */
  readonly webhookSecret?: string;
  /** Outgoing webhook delivery (the database comes from `db`). */
  readonly webhooks?: Omit<DeliveryOptions, "db">;
  /** How long restart / cancel / bump wait for the scheduling leader (default 10 s). */
  readonly commandWait?: WaitOptions;
  /** More routes (the dispatcher's): plain routes, or made from the API context. */
  readonly extraRoutes?: readonly Route[] | ((api: ApiContext) => readonly Route[]);
  /** HTTP upgrade requests (the worker WebSocket at /api/worker); without it they are refused. */
  readonly onUpgrade?: (req: http.IncomingMessage, socket: Duplex, head: Buffer, api: ApiContext) => void;
  /** More Prometheus lines for /metrics (complete with their # HELP and # TYPE). */
  readonly extraMetrics?: () => Promise<string>;
  /**
   * Scheduling and workers (the dispatcher, on by default): lease and heartbeat periods, a
   * build time limit, the URL workers should use for this coordinator (default: its listen
   * address), and the farm cache (default: embedded in the data dir, on `cacheHost`:`cachePort`).
   */
  readonly dispatch?:
    | false
    | {
        readonly leaseMs?: number;
        readonly heartbeatMs?: number;
        readonly stepTimeoutSeconds?: number;
        readonly publicUrl?: string;
        readonly cacheHost?: string;
        readonly cachePort?: number;
        readonly cache?: FarmCacheOptions["external"];
        readonly scheduler?: DispatcherOptions["scheduler"];
      };
}

export interface Coordinator {
  readonly url: string;
  /** Every route the router serves. */
  readonly routes: readonly { readonly method: Method; readonly path: string }[];
  /** The role of a request's bearer token (for upgrade handlers). */
  authenticate(req: http.IncomingMessage): Promise<Role>;
  /** Runs webhook fan-out and delivery now (call after writing farm events). */
  pokeDeliveries(): void;
  close(): Promise<void>;
}

export async function startCoordinator(opts: CoordinatorOptions): Promise<Coordinator> {
  const db = opts.db.db;
  const auth = createAuthenticator(db, opts);
  const dispatch = opts.dispatch === false ? undefined : (opts.dispatch ?? {});
  const farmCache = dispatch
    ? await openFarmCache({
        dataDir: opts.dataDir,
        storeDir: opts.store.storeDir,
        host: dispatch.cacheHost ?? opts.host ?? "127.0.0.1",
        ...(dispatch.cachePort !== undefined ? { port: dispatch.cachePort } : {}),
        ...(dispatch.cache ? { external: dispatch.cache } : {}),
      })
    : undefined;
  /** Set once the server listens (the dispatcher needs the coordinator's URL). */
  let dispatcher: Dispatcher | undefined;
  let publicUrl: string | undefined;
  const deliveries = startWebhookDelivery({ db, ...opts.webhooks });
  const evaluations = startEvaluationLoop({
    evaluator: {
      db,
      store: opts.store,
      dataDir: opts.dataDir,
      ...(opts.evalTimeoutSeconds ? { timeoutSeconds: opts.evalTimeoutSeconds } : {}),
      ...(opts.evalMemoryMiB ? { memoryMiB: opts.evalMemoryMiB } : {}),
      ...(farmCache ? { publish: (paths: readonly string[]) => farmCache.publish(opts.store, paths) } : {}),
    },
    everyMs: opts.checkEveryMs ?? 5000,
    onEvaluated: () => {
      deliveries.poke();
      dispatcher?.poke();
    },
    refreshProject: async (p) => {
      const r = await refreshDeclaredProject(db, opts.dataDir, p.id);
      if (r instanceof FerryError) console.error(`ferry farm: reading the jobsets of project ${p.name} failed: ${r.code}: ${r.message}`);
    },
  });
  const ctx: ApiContext = {
    fdb: opts.db,
    db,
    auth,
    evaluations,
    dataDir: opts.dataDir,
    pokeDeliveries: deliveries.poke,
    commandWait: opts.commandWait ?? {},
    webhookSecret: opts.webhookSecret,
  };
  const logs = dispatch ? createLogFollowers({ db }) : undefined;
  const extra = [
    ...(typeof opts.extraRoutes === "function" ? opts.extraRoutes(ctx) : (opts.extraRoutes ?? [])),
    ...workerRoutes(ctx, {
      dispatcher: () => {
        if (!dispatch) return undefined;
        if (!dispatcher) throw new ApiError(503, "FERRY_FARM_STARTING", "the coordinator is still starting", "try again in a moment");
        return dispatcher;
      },
      logs,
      publicUrl: () => publicUrl,
      ...(farmCache ? { cachedLog: (drvPath: string) => farmCache.readLog(drvPath) } : {}),
    }),
  ];
  const extraMetrics = async (): Promise<string> => (opts.extraMetrics ? await opts.extraMetrics() : "") + (dispatcher?.metrics() ?? "") + (logs?.metrics() ?? "");
  const routes: Route[] = [
    { method: "GET", path: "/api/health", access: "public", run: async () => ok({ ok: true, database: opts.db.kind }) },
    { method: "GET", path: "/api/openapi.json", access: "public", run: async () => ok(OPENAPI) },
    metricsRoute(ctx, extraMetrics),
    ...projectRoutes(ctx),
    ...evaluationRoutes(ctx),
    ...buildRoutes(ctx),
    ...tokenRoutes(db),
    ...webhookRoutes(ctx),
    ...extra,
  ];
  const server = http.createServer(createRouter({ routes, authenticate: auth.authenticate, readsOpen: auth.readsOpen }));
  server.on("upgrade", (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    if (dispatcher && (req.url ?? "").split("?")[0] === "/api/worker") dispatcher.handleUpgrade(req, socket, head);
    else if (opts.onUpgrade) opts.onUpgrade(req, socket, head, ctx);
    else socket.end("HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (e: NodeJS.ErrnoException) =>
      reject(new FerryError("FERRY_FARM_LISTEN_FAILED", `cannot listen on ${opts.host ?? "127.0.0.1"}:${opts.port ?? 0}: ${e.message}`, { hint: "pick another --listen HOST:PORT" })),
    );
    server.listen(opts.port ?? 0, opts.host ?? "127.0.0.1", () => resolve());
  }).catch(async (e: unknown) => {
    await Promise.all([evaluations.close(), deliveries.close(), farmCache?.close()]);
    throw e;
  });
  const addr = server.address() as { address: string; port: number };
  const url = `http://${addr.address.includes(":") ? `[${addr.address}]` : addr.address}:${addr.port}`;
  if (dispatch && farmCache) {
    publicUrl = dispatch.publicUrl ?? url;
    dispatcher = startDispatcher({
      db: opts.db,
      publicUrl,
      cache: { url: farmCache.url, ...(farmCache.token ? { token: farmCache.token } : {}), ...(farmCache.publicKey ? { publicKey: farmCache.publicKey } : {}) },
      logDir: join(opts.dataDir, "logs"),
      authenticate: auth.authenticate,
      ...(dispatch.leaseMs ? { leaseMs: dispatch.leaseMs } : {}),
      ...(dispatch.heartbeatMs ? { heartbeatMs: dispatch.heartbeatMs } : {}),
      ...(dispatch.stepTimeoutSeconds ? { stepTimeoutSeconds: dispatch.stepTimeoutSeconds } : {}),
      ...(dispatch.scheduler ? { scheduler: dispatch.scheduler } : {}),
    });
  }
  return {
    url,
    routes: routes.map((r) => ({ method: r.method, path: r.path })),
    authenticate: auth.authenticate,
    pokeDeliveries: deliveries.poke,
    close: async () => {
      await dispatcher?.close();
      await evaluations.close();
      await deliveries.close();
      await farmCache?.close();
      await new Promise<void>((r) => {
        server.close(() => r());
        // Followed logs are cut (not ended cleanly): their clients know to come back.
        server.closeAllConnections();
      });
      logs?.close();
    },
  };
}

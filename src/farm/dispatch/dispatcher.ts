/**
 * The dispatcher: the coordinator's half of the worker protocol (src/farm/protocol.ts) and the
 * scheduling leader's loop.
 *
 * Every coordinator accepts worker connections; only the leader (see leader.ts) keeps them: the
 * others redirect workers to it. The leader holds the in-memory Scheduler of every unfinished
 * step, rebuilt from the database whenever it becomes leader, and is the only writer of step
 * state. The database stays the truth: a step runs only once its claim (status, lease owner,
 * lease expiry) is committed, and a result counts only if its sender still holds the lease.
 *
 * All changes go through one loop (`cycle`), which drains what arrived since its last turn
 * (worker hellos and disconnects, results, drains, new steps from ingest, commands from the
 * API, expired leases), writes each kind in one statement or transaction, asks the scheduler
 * what to run where, claims that in one statement, and only then sends `build` messages. Under
 * load one turn handles many events, so database round trips per step stay few.
 *
 * Crash rules: a coordinator that restarts waits one lease period before expiring leases, so
 * workers that reconnect in time keep their builds; a result is acknowledged only after it is
 * committed, and workers resend unacknowledged results; a database error drops the in-memory
 * state, which is rebuilt from the database.
 */
import * as fs from "node:fs";
import type * as http from "node:http";
import type { Duplex } from "node:stream";
import { join } from "node:path";
import { randomUUID } from "node:crypto";
import { WebSocketServer, type WebSocket } from "ws";
import { sql } from "kysely";
import { FerryError, asFerryError, errorBody } from "../../core/errors.js";
import { Scheduler, topoOrder, type SchedulerOptions, type StepSpec, type StepOutcome } from "../scheduler/index.js";
import type { FarmDatabase } from "../db/index.js";
import {
  claimAssigned,
  giveBackClaims,
  loadDurations,
  loadShares,
  loadLiveSteps,
  recordStepResults,
  renewStepLeases,
  requeueExpired,
  requeueSteps,
  settleBuilds,
  takeNewSteps,
  type StepGraph,
  writeStepResults,
  type StepOutcomeRow,
} from "../db/steps.js";
import {
  CLOSE_PROTOCOL_ERROR,
  CLOSE_REDIRECT,
  CLOSE_REPLACED,
  parseWorkerMessage,
  type CoordinatorMessage,
  type Hello,
  type Result,
} from "../protocol.js";
import { startLeadership, type Leadership } from "./leader.js";
import { settleAggregates } from "../db/builds.js";

export type Role = "admin" | "worker" | "read-only" | "none" | "wrong";

export interface DispatcherOptions {
  readonly db: FarmDatabase;
  /** The URL workers dial to reach this coordinator (sent in redirects by the others). */
  readonly publicUrl: string;
  /** The farm cache the workers substitute from and upload to. */
  readonly cache: { readonly url: string; readonly token?: string; readonly publicKey?: string };
  /** Where step logs are kept (`<logDir>/<drv base name>`). */
  readonly logDir: string;
  /** Who the request is (the worker endpoint needs the worker or admin role). */
  authenticate(req: http.IncomingMessage): Role | Promise<Role>;
  /** A lease not renewed for this long is lost (default 60 s). */
  readonly leaseMs?: number;
  /** How often workers heartbeat (default a third of the lease). */
  readonly heartbeatMs?: number;
  /** Builds are killed after this long (default none). */
  readonly stepTimeoutSeconds?: number;
  readonly scheduler?: Pick<SchedulerOptions, "retry" | "shareWindowMs" | "defaultShares" | "holdForFasterMachines">;
  /** How often the leader looks for new steps and commands when nobody pokes it (default 500 ms). */
  readonly pollMs?: number;
  readonly log?: (line: string) => void;
}

interface Session {
  readonly ws: WebSocket;
  readonly hello: Hello;
  readonly connectedAt: number;
  load: number;
  freeDiskBytes: number;
  draining: boolean;
  /** Set when the leader has taken this session in (its machine is in the scheduler). */
  welcomed: boolean;
  /** When it was welcomed (by this leader's current schedule). */
  welcomedAt: number;
  /** When each step this coordinator sent to the worker was sent. */
  readonly sent: Map<string, number>;
  /** Steps the scheduler has on this worker that its last heartbeats did not name, and how many in a row. */
  readonly missing: Map<string, number>;
}

export interface WorkerView {
  readonly id: string;
  readonly connected: boolean;
  readonly systems: readonly string[];
  readonly features: readonly string[];
  readonly maxJobs: number;
  readonly speedFactor: number;
  readonly running: readonly string[];
  readonly load: number;
  readonly freeDiskBytes: number;
  readonly draining: boolean;
}

export interface Dispatcher {
  /** Takes `GET /api/worker` upgrades. */
  handleUpgrade(req: http.IncomingMessage, socket: Duplex, head: Buffer): void;
  /** Something changed in the database (an evaluation was ingested, a command queued). */
  poke(): void;
  isLeader(): boolean;
  workers(): WorkerView[];
  /** Asks a worker to drain; false when it is not connected here. */
  drain(workerId: string): boolean;
  /** The log of a step so far (undefined when there is none). */
  logPath(drvPath: string): string;
  /** Prometheus lines about queues and workers. */
  metrics(): string;
  close(): Promise<void>;
}

const baseName = (drvPath: string) => drvPath.slice(drvPath.lastIndexOf("/") + 1);

export function startDispatcher(opts: DispatcherOptions): Dispatcher {
  const db = opts.db.db;
  const leaseMs = opts.leaseMs ?? 60_000;
  const heartbeatMs = opts.heartbeatMs ?? Math.max(100, Math.floor(leaseMs / 3));
  const pollMs = opts.pollMs ?? 500;
  const log = opts.log ?? ((l: string) => process.stderr.write(`ferry farm: ${l}\n`));
  const owner = `${process.pid}-${randomUUID().slice(0, 8)}`;
  fs.mkdirSync(opts.logDir, { recursive: true });

  const wss = new WebSocketServer({ noServer: true, maxPayload: 16 << 20 });
  const sessions = new Map<string, Session>();

  // ---- the leader's state (undefined while not leader, or after a database error) ----
  let sched: Scheduler | undefined;
  /** Step id → what a build message needs. */
  let info = new Map<string, { drvPath: string; attempts: number }>();
  let leaderSince = 0;
  let lastExpiry = 0;
  let lastRenew = 0;
  let dirty = true; // new steps or commands may be waiting
  let needRebuild = false;
  const jobsetShares = new Map<number, number>();

  // ---- what arrived since the last cycle ----
  let hellos: Session[] = [];
  let gone: Session[] = [];
  let beats: { session: Session; running: readonly string[]; at: number }[] = [];
  let results: { session: Session; msg: Result }[] = [];
  const drains: string[] = [];

  // counters for /metrics
  let dispatched = 0;
  let finished = 0;
  let refusedResults = 0;
  /** Time spent in the scheduler's dispatch, the decisions it made, and the slowest per decision. */
  let decisionSeconds = 0;
  let decisionCalls = 0;
  let decisions = 0;
  let decisionMax = 0;
  /** Time per decision of the last 10,000 dispatch calls that decided something (for quantiles). */
  const recent = new Float64Array(10_000);
  let recentAt = 0;
  /** How long dispatched steps waited in their queue (runnable until sent), per system: bucket counts, sum, count. */
  const waits = new Map<string, { buckets: number[]; sum: number; count: number }>();
  const recordWait = (system: string, seconds: number): void => {
    let w = waits.get(system);
    if (!w) waits.set(system, (w = { buckets: WAIT_BUCKETS.map(() => 0), sum: 0, count: 0 }));
    for (let i = 0; i < WAIT_BUCKETS.length; i++) if (seconds <= WAIT_BUCKETS[i]!) w.buckets[i]!++;
    w.sum += seconds;
    w.count++;
  };

  /**
   * Writes to a step's log file one after the other (appends issued at once may land in any
   * order): each write waits for the one before it on the same file. A failed write loses its
   * chunk, not the log.
   */
  const logWrites = new Map<string, Promise<void>>();
  const writeLog = (drvPath: string, write: (path: string) => Promise<void>): void => {
    const path = join(opts.logDir, baseName(drvPath));
    const next = (logWrites.get(path) ?? Promise.resolve()).then(() => write(path)).catch(() => undefined);
    logWrites.set(path, next);
    void next.then(() => {
      if (logWrites.get(path) === next) logWrites.delete(path);
    });
  };

  const send = (s: Session | undefined, m: CoordinatorMessage): boolean => {
    if (!s || s.ws.readyState !== s.ws.OPEN) return false;
    s.ws.send(JSON.stringify(m));
    return true;
  };

  const machineSpec = (s: Session, maxJobs?: number) => ({
    id: s.hello.id,
    systems: s.hello.systems,
    supportedFeatures: s.hello.features,
    mandatoryFeatures: s.hello.mandatoryFeatures,
    maxJobs: maxJobs ?? (s.draining ? 0 : s.hello.maxJobs),
    speedFactor: s.hello.speedFactor,
  });

  /** Adds or updates a machine in the scheduler. */
  const upsertMachine = (spec: ReturnType<typeof machineSpec>) => {
    if (!sched) return;
    if (sched.hasMachine(spec.id)) sched.updateMachine(spec);
    else sched.addMachine(spec);
  };

  const leadership: Leadership = startLeadership(
    { db: opts.db, owner, url: opts.publicUrl },
    {
      onGained: () => {
        log("this coordinator schedules (it is the leader)");
        needRebuild = true;
        kick();
      },
      onLost: (reason) => {
        log(`no longer the leader: ${reason}`);
        sched = undefined;
        // Workers reconnect and are sent to whoever leads now; their builds keep running.
        for (const s of sessions.values()) s.ws.close(1012, "the coordinator is changing leader");
      },
    },
  );

  /** Gives the scheduler every jobset's shares. */
  const refreshShares = async (s: Scheduler): Promise<void> => {
    for (const [id, shares] of await loadShares(db)) {
      jobsetShares.set(id, shares);
      s.setShares(String(id), shares);
    }
  };

  /** Builds the scheduler from the database: every unfinished step, the connected workers, the leases. */
  const rebuild = async (): Promise<void> => {
    const t0 = Date.now();
    sched = undefined;
    const s = new Scheduler({ ...opts.scheduler, durations: await loadDurations(db) });
    await refreshShares(s);
    info = new Map();
    depsOf.clear();
    for (const sess of sessions.values()) s.addMachine(machineSpec(sess));
    const graph = await loadLiveSteps(db);
    const now = Date.now();
    const { specs, dead } = specsOf(graph, s);
    if (dead.length) await markDead(dead);
    s.addSteps(specs, now);
    // Leases held by workers: the step keeps running there (a placeholder machine takes no new
    // work until its worker says hello).
    const requeue: string[] = [];
    for (const row of graph.steps) {
      if (row.status !== "running" || !row.leaseOwner || !s.hasStep(row.id)) continue;
      if (!s.hasMachine(row.leaseOwner)) s.addMachine({ id: row.leaseOwner, systems: [row.system], maxJobs: 0 });
      const a = s.assignTo(row.id, row.leaseOwner, row.startedAt?.getTime() ?? now, now);
      if (!a.ok) requeue.push(row.id);
    }
    await requeueSteps(db, requeue);
    sched = s;
    leaderSince = Date.now();
    needRebuild = false;
    // Workers already welcomed keep their builds: the leases just loaded put those steps back on
    // them (a hello's list of running steps is as old as the connection, so it is not asked again).
    // Should the database name a step a worker does not have, its heartbeats tell (checkBeats).
    for (const sess of sessions.values()) if (sess.welcomed) sess.welcomedAt = Date.now();
    hellos = [...sessions.values()].filter((x) => !x.welcomed);
    const c = s.counts();
    log(`scheduler ready: ${c.runnable} runnable, ${c.waiting} waiting, ${c.running} running (${Date.now() - t0} ms)`);
  };

  /** Scheduler specs of new steps, and the ones that can never run (a dependency failed before). */
  const specsOf = (graph: StepGraph, s: Scheduler): { specs: StepSpec[]; dead: { stepId: string; cause: string }[] } => {
    const rows = new Map(graph.steps.map((r) => [r.id, r]));
    const deps = new Map<string, string[]>();
    const deadCause = new Map<string, string>();
    for (const [step, dep, status] of graph.edges) {
      if (!rows.has(step)) continue;
      if (rows.has(dep) || s.hasStep(dep)) {
        let l = deps.get(step);
        if (!l) deps.set(step, (l = []));
        l.push(dep);
      } else if (status !== "succeeded") {
        // Finished without success before this scheduler knew it, or live and unknown (cannot
        // happen: live steps are taken in with the batch that made them).
        deadCause.set(step, dep);
      }
    }
    // Jobsets: a step is wanted by the jobsets of its builds and of the steps that need it.
    const wanted = new Map<string, Set<string>>();
    for (const [step, jobset] of graph.jobsets) {
      let w = wanted.get(step);
      if (!w) wanted.set(step, (w = new Set()));
      w.add(String(jobset));
    }
    const order = topo(graph.steps.map((r) => r.id), deps);
    for (let i = order.length - 1; i >= 0; i--) {
      const id = order[i]!;
      const w = wanted.get(id);
      for (const d of deps.get(id) ?? []) {
        if (!rows.has(d)) continue;
        if (deadCause.has(id) && !deadCause.has(d)) continue;
        if (!w) continue;
        let dw = wanted.get(d);
        if (!dw) wanted.set(d, (dw = new Set()));
        for (const j of w) dw.add(j);
      }
    }
    // What depends on a dead step is dead too.
    for (const id of order) {
      if (deadCause.has(id)) continue;
      for (const d of deps.get(id) ?? []) {
        if (deadCause.has(d)) {
          deadCause.set(id, d);
          break;
        }
      }
    }
    const specs: StepSpec[] = [];
    for (const id of order) {
      if (deadCause.has(id)) continue;
      const r = rows.get(id)!;
      info.set(id, { drvPath: r.drvPath, attempts: r.attempts });
      if (deps.has(id)) depsOf.set(id, deps.get(id)!);
      specs.push({
        id,
        name: r.name,
        system: r.system,
        requiredFeatures: r.features,
        deps: deps.get(id) ?? [],
        jobsets: [...(wanted.get(id) ?? [])],
        bump: r.bump,
        createdAt: r.createdAt.getTime(),
      });
    }
    return { specs, dead: [...deadCause].map(([stepId, cause]) => ({ stepId, cause })) };
  };

  const markDead = async (dead: { stepId: string; cause: string }[]) => {
    await recordStepResults(db, { outcomes: [], depFailed: dead });
  };

  /** Takes in the steps ingest wrote since the last look. */
  const intake = async (): Promise<void> => {
    const s = sched!;
    const graph = await takeNewSteps(db, 1_000_000);
    if (graph.steps.length === 0) return;
    if (graph.jobsets.some(([, jobset]) => !jobsetShares.has(jobset))) await refreshShares(s);
    const { specs, dead } = specsOf(graph, s);
    const results = s.addSteps(specs, Date.now());
    for (const r of results) if (r.ok && r.value === "depFailed") dead.push({ stepId: r.id, cause: blockerOf(s, r.id) });
    if (dead.length) await markDead(dead);
  };

  /** Some dependency of a depFailed step that blocks it. */
  const blockerOf = (s: Scheduler, id: string): string =>
    depsOf.get(id)?.find((d) => s.hasStep(d) && ["failed", "depFailed", "cancelled"].includes(s.step(d).state)) ?? id;
  /** Dependencies of steps taken in, as the scheduler got them. */
  const depsOf = new Map<string, readonly string[]>();

  // ---- commands --------------------------------------------------------------------------

  const applyCommands = async (): Promise<void> => {
    const s = sched!;
    const cmds = await sql<{ id: string; kind: string; payload: { steps?: unknown; bump?: unknown } }>`
      select id, kind, payload from farm_commands where applied_at is null order by id limit 100`.execute(db);
    for (const c of cmds.rows) {
      const ids = Array.isArray(c.payload.steps) ? c.payload.steps.map(String) : [];
      const now = Date.now();
      const known = ids.filter((id) => s.hasStep(id));
      const unknown = ids.filter((id) => !s.hasStep(id));
      const items: { id: string; ok: boolean; value?: unknown; error?: { code: string; message: string; hint?: string } }[] = [];
      const errorItem = (id: string, e: FerryError) => items.push({ id, ok: false, error: errorBody(e) });
      if (c.kind === "cancel") {
        const ended: string[] = [];
        const depFailed: { stepId: string; cause: string }[] = [];
        for (const r of s.cancel(known, now)) {
          if (!r.ok) {
            errorItem(r.id, r.error);
            continue;
          }
          items.push({ id: r.id, ok: true, value: { depFailed: r.value.depFailed } });
          ended.push(r.id);
          for (const d of r.value.depFailed) depFailed.push({ stepId: d, cause: r.id });
          if (r.value.abort) send(sessions.get(r.value.abort.machineId), { type: "abort", stepId: r.id, reason: "cancelled" });
        }
        await db.transaction().execute(async (tx) => {
          if (ended.length) {
            await sql`update steps set status = 'cancelled', finished_at = now(), lease_owner = null, lease_expires_at = null, error = 'cancelled'
              where id = any(${sql.val(ended)}::bigint[]) and status in ('queued', 'running')`.execute(tx);
          }
          await writeStepResults(tx, { outcomes: [], depFailed });
          await settleBuilds(tx, ended);
        });
        for (const id of unknown) errorItem(id, await unknownOrFinished(id));
      } else if (c.kind === "restart") {
        const requeued: string[] = [];
        for (const r of s.restart(known, now)) {
          if (!r.ok) errorItem(r.id, r.error);
          else {
            items.push({ id: r.id, ok: true, value: { requeued: r.value.requeued } });
            requeued.push(...r.value.requeued);
          }
        }
        // Steps finished before this scheduler started: restarted in the database, then taken in.
        for (const id of unknown) {
          const r = await restartInDatabase(id);
          if (r instanceof FerryError) errorItem(id, r);
          else items.push({ id, ok: true, value: { requeued: r } });
        }
        await requeueInDatabase(requeued);
        if (unknown.length) await intake();
      } else if (c.kind === "bump") {
        const bump = typeof c.payload.bump === "number" && Number.isInteger(c.payload.bump) ? c.payload.bump : 0;
        const ok: string[] = [];
        for (const r of s.bump(known, bump, now)) {
          if (!r.ok) errorItem(r.id, r.error);
          else {
            ok.push(r.id);
            items.push({ id: r.id, ok: true, value: { bump: r.value } });
          }
        }
        if (ok.length) await sql`update steps set bump = ${bump} where id = any(${sql.val(ok)}::bigint[])`.execute(db);
        for (const id of unknown) errorItem(id, await unknownOrFinished(id));
      } else {
        errorItem("-", new FerryError("FERRY_FARM_BAD_COMMAND", `unknown command '${c.kind}'`));
      }
      await sql`update farm_commands set applied_at = now(), result = ${JSON.stringify({ items })}::jsonb where id = ${c.id}`.execute(db);
    }
  };

  const unknownOrFinished = async (id: string): Promise<FerryError> => {
    const r = await sql<{ status: string }>`select status from steps where id = ${id}`.execute(db);
    const st = r.rows[0]?.status;
    if (st === undefined) return new FerryError("FERRY_FARM_UNKNOWN_STEP", `no step with id '${id}'`, { hint: "see the build's steps with GET /api/builds/ID" });
    return new FerryError("FERRY_FARM_STEP_FINISHED", `step '${id}' already ${st}`, { hint: st === "succeeded" ? "a succeeded step is not built again" : "restart it first" });
  };

  /** Steps the scheduler re-queued: queued again in the database, their builds too. */
  const requeueInDatabase = async (ids: readonly string[]) => {
    if (ids.length === 0) return;
    await db.transaction().execute(async (tx) => {
      await sql`delete from failed_paths where drv_path in (select drv_path from steps where id = any(${sql.val([...ids])}::bigint[]))`.execute(tx);
      await sql`update steps set status = 'queued', attempts = 0, finished_at = null, error = null, not_before = null, lease_owner = null, lease_expires_at = null
        where id = any(${sql.val([...ids])}::bigint[])`.execute(tx);
      const builds = await sql<{ id: string }>`update builds set status = 'queued', finished_at = null
        where status in ('failed', 'dependency-failed', 'cancelled') and id in (select build_id from build_steps where step_id = any(${sql.val([...ids])}::bigint[]))
        returning id::text as id`.execute(tx);
      // Aggregates made of them are no longer failed: queued again until their members settle.
      await settleAggregates(tx, builds.rows.map((b) => b.id));
    });
  };

  /**
   * Restarts a step the scheduler does not know (it ended before this scheduler started): the
   * step and every failed, cancelled or dependency-failed step it needs are queued again and
   * left for the intake. Returns their ids.
   */
  const restartInDatabase = async (id: string): Promise<string[] | FerryError> => {
    const r = await sql<{ status: string }>`select status from steps where id = ${id}`.execute(db);
    const st = r.rows[0]?.status;
    if (st === undefined) return unknownOrFinished(id);
    if (st === "succeeded") return new FerryError("FERRY_FARM_STEP_FINISHED", `step '${id}' already succeeded`, { hint: "a succeeded step is not built again" });
    const chain = await sql<{ id: string }>`
      with recursive blocked(id) as (
        select id from steps where id = ${id} and status in ('failed', 'dependency-failed', 'cancelled')
        union
        select d.depends_on from step_deps d join blocked b on d.step_id = b.id join steps s on s.id = d.depends_on
        where s.status in ('failed', 'dependency-failed', 'cancelled')
      ) select id from blocked`.execute(db);
    const ids = chain.rows.map((x) => String(x.id));
    await requeueInDatabase(ids);
    await sql`update steps set scheduled = false where id = any(${sql.val(ids)}::bigint[])`.execute(db);
    return ids;
  };

  // ---- the loop --------------------------------------------------------------------------

  /** Applies worker hellos: machines join, leases they still hold are kept, the rest re-queued. */
  const welcome = async (): Promise<void> => {
    const s = sched!;
    const batch = hellos;
    hellos = [];
    for (const sess of batch) {
      if (sessions.get(sess.hello.id) !== sess || sess.ws.readyState !== sess.ws.OPEN) continue;
      upsertMachine(machineSpec(sess));
      const held = new Set(s.hasMachine(sess.hello.id) ? s.machine(sess.hello.id).running : []);
      const keep = sess.hello.running.filter((id) => held.has(id));
      const lost = [...held].filter((id) => !sess.hello.running.includes(id));
      if (lost.length) {
        await requeueSteps(db, lost);
        s.requeue(lost, Date.now());
        log(`worker ${sess.hello.id} came back without ${lost.length} step(s) it was building; they are queued again`);
      }
      await renewStepLeases(db, sess.hello.id, keep, leaseMs);
      sess.welcomed = true;
      sess.welcomedAt = Date.now();
      send(sess, { type: "welcome", leaseMs, heartbeatMs, cache: opts.cache, keep });
      log(`worker ${sess.hello.id} joined (${sess.hello.systems.join(", ")}; ${sess.hello.maxJobs} job(s)${keep.length ? `; still building ${keep.length}` : ""})`);
    }
  };

  const disconnects = (): void => {
    const s = sched!;
    const batch = gone;
    gone = [];
    for (const sess of batch) {
      // Keeps its running steps until their leases expire; takes nothing new meanwhile.
      if (sessions.get(sess.hello.id) === undefined && s.hasMachine(sess.hello.id)) s.updateMachine({ ...machineSpec(sess, 0) });
    }
    for (const id of drains.splice(0)) {
      const sess = sessions.get(id);
      if (sess && s.hasMachine(id)) s.updateMachine(machineSpec(sess, 0));
    }
  };

  const processResults = async (): Promise<void> => {
    const s = sched!;
    const batch = results;
    results = [];
    if (batch.length === 0) return;
    const now = Date.now();
    const outcomes: StepOutcomeRow[] = [];
    const depFailed: { stepId: string; cause: string }[] = [];
    const acks: { session: Session; stepId: string; accepted: boolean }[] = [];
    const refusals: string[] = [];
    for (const { session, msg } of batch) {
      const id = msg.stepId;
      const who = session.hello.id;
      if (!s.hasStep(id) || s.step(id).state !== "running" || s.step(id).machineId !== who) {
        acks.push({ session, stepId: id, accepted: false });
        continue;
      }
      if (msg.status === "failed" && msg.error?.startsWith("FERRY_WORKER_REFUSED")) {
        // The worker could not take the step (draining, or full): not an attempt, just queue it again.
        refusals.push(id);
        acks.push({ session, stepId: id, accepted: true });
        continue;
      }
      const outcome: StepOutcome =
        msg.status === "succeeded"
          ? { kind: "succeeded" }
          : msg.transient
            ? { kind: "transient-failure", ...(msg.error ? { reason: msg.error } : {}) }
            : { kind: "permanent-failure", ...(msg.error ? { reason: msg.error } : {}) };
      const fr = s.finish(id, outcome, now);
      outcomes.push({
        stepId: id,
        owner: who,
        status: fr.state === "succeeded" ? "succeeded" : fr.state === "backoff" ? "queued" : "failed",
        durationMs: msg.durationMs,
        error: msg.error,
        outputs: msg.outputs,
        ...(fr.retryAt !== undefined ? { retryAt: new Date(fr.retryAt) } : {}),
      });
      for (const d of fr.depFailed) depFailed.push({ stepId: d, cause: id });
      acks.push({ session, stepId: id, accepted: true });
    }
    if (refusals.length) {
      await requeueSteps(db, refusals);
      s.requeue(refusals, now);
    }
    const r = await recordStepResults(db, { outcomes, depFailed });
    if (r.refused.length) {
      // The database and the scheduler disagree about who holds these leases: start again from the database.
      needRebuild = true;
      log(`${r.refused.length} result(s) were for leases the database no longer shows; reloading the schedule`);
    }
    const refused = new Set(r.refused);
    // Succeeded steps are recorded: the scheduler (and this loop) need only what is still live or failed.
    const done = outcomes.filter((o) => o.status === "succeeded" && !refused.has(o.stepId)).map((o) => o.stepId);
    s.forget(done);
    for (const id of done) {
      info.delete(id);
      depsOf.delete(id);
    }
    finished += outcomes.length - refused.size;
    refusedResults += acks.filter((a) => !a.accepted).length + refused.size;
    for (const a of acks) send(a.session, { type: "ack", stepId: a.stepId, accepted: a.accepted && !refused.has(a.stepId) });
  };

  /**
   * A step the scheduler has on a connected worker, which two heartbeats in a row do not name
   * although it was sent (or the worker welcomed) at least a heartbeat period before, is not
   * being built there: a claim whose build message was never sent (its leader lost the lock in
   * between), or a lease the database gave back to a worker that had dropped the step. Its
   * lease would be renewed for ever, so it is queued again (and the worker told to drop it).
   */
  const checkBeats = async (): Promise<void> => {
    const s = sched!;
    const batch = beats;
    beats = [];
    const lost: { session: Session; id: string }[] = [];
    for (const { session, running, at } of batch) {
      const id0 = session.hello.id;
      if (!session.welcomed || sessions.get(id0) !== session || !s.hasMachine(id0)) continue;
      const onIt = new Set(s.machine(id0).running);
      for (const id of session.sent.keys()) if (!onIt.has(id)) session.sent.delete(id);
      for (const id of session.missing.keys()) if (!onIt.has(id)) session.missing.delete(id);
      const named = new Set(running);
      for (const id of onIt) {
        if (named.has(id) || at - (session.sent.get(id) ?? session.welcomedAt) < heartbeatMs) {
          session.missing.delete(id);
          continue;
        }
        const n = (session.missing.get(id) ?? 0) + 1;
        session.missing.set(id, n);
        if (n === 2) lost.push({ session, id });
      }
    }
    if (lost.length === 0) return;
    const ids = lost.map((l) => l.id);
    await requeueSteps(db, ids);
    s.requeue(ids, Date.now());
    for (const { session, id } of lost) {
      session.missing.delete(id);
      session.sent.delete(id);
      send(session, { type: "abort", stepId: id, reason: "the worker does not report building it" });
    }
    log(`${ids.length} step(s) were not being built by the worker that held them; they are queued again`);
  };

  const expireLeases = async (): Promise<void> => {
    const now = Date.now();
    // Workers that are connected are alive: renew all their leases at once.
    if (now - lastRenew >= heartbeatMs) {
      lastRenew = now;
      const live = [...sessions.values()].filter((x) => x.welcomed).map((x) => x.hello.id);
      if (live.length) {
        await sql`update steps set lease_expires_at = now() + ${leaseMs} * interval '1 millisecond'
          where status = 'running' and lease_owner = any(${sql.val(live)}::text[])`.execute(db);
      }
    }
    // After a restart, give workers one lease period to come back before taking their steps.
    if (now - leaderSince < leaseMs || now - lastExpiry < Math.min(1000, leaseMs / 4)) return;
    lastExpiry = now;
    const ids = await requeueExpired(db);
    if (ids.length === 0) return;
    const s = sched!;
    for (const r of s.requeue(ids, now)) {
      if (r.ok) {
        send(sessions.get(r.value), { type: "abort", stepId: r.id, reason: "its lease expired" });
        const i = info.get(r.id);
        if (i) i.attempts++;
      }
    }
    log(`${ids.length} step(s) lost their worker (lease expired) and are queued again`);
  };

  const dispatch = async (): Promise<void> => {
    const s = sched!;
    const t0 = performance.now();
    const assignments = s.dispatch(Date.now());
    const took = (performance.now() - t0) / 1000;
    decisionSeconds += took;
    decisionCalls++;
    if (assignments.length > 0) {
      const each = took / assignments.length;
      if (each > decisionMax) decisionMax = each;
      recent[recentAt++ % recent.length] = each;
    }
    decisions += assignments.length;
    if (assignments.length === 0) return;
    const decidedAt = Date.now();
    const claimed = await claimAssigned(db, assignments.map((a) => ({ stepId: a.stepId, owner: a.machineId })), leaseMs);
    if (!leadership.isLeader()) {
      // The lock went while claiming: give the claims back (those still ours) rather than send work as a follower.
      await giveBackClaims(db, assignments.map((a) => ({ stepId: a.stepId, owner: a.machineId })));
      return;
    }
    const got = new Map(claimed.map((c) => [c.id, c]));
    if (got.size < assignments.length) {
      needRebuild = true;
      log(`${assignments.length - got.size} step(s) were not queued in the database any more; reloading the schedule`);
    }
    for (const a of assignments) {
      const c = got.get(a.stepId);
      if (!c) continue;
      dispatched++;
      const v = s.step(a.stepId);
      recordWait(v.system, Math.max(0, decidedAt - (v.runnableSince ?? decidedAt)) / 1000);
      writeLog(c.drvPath, (path) => fs.promises.writeFile(path, ""));
      const to = sessions.get(a.machineId);
      to?.sent.set(a.stepId, Date.now());
      send(to, {
        type: "build",
        stepId: a.stepId,
        drvPath: c.drvPath,
        attempt: c.attempts + 1,
        ...(opts.stepTimeoutSeconds ? { timeoutSeconds: opts.stepTimeoutSeconds } : {}),
      });
    }
  };

  let running = false;
  let again = false;
  let closed = false;

  const cycle = async (): Promise<void> => {
    if (!leadership.isLeader()) return;
    if (!sched || needRebuild) await rebuild();
    await welcome();
    disconnects();
    await processResults();
    await checkBeats();
    await expireLeases();
    if (dirty) {
      dirty = false;
      await intake();
      await applyCommands();
    }
    await dispatch();
  };

  const kick = () => {
    if (closed) return;
    if (running) {
      again = true;
      return;
    }
    running = true;
    void (async () => {
      do {
        again = false;
        try {
          await cycle();
        } catch (e) {
          // The database failed us: forget the in-memory state and start again from the database.
          log(`scheduling stopped: ${asFerryError(e).message}; retrying`);
          needRebuild = true;
          dirty = true;
          await new Promise((r) => setTimeout(r, 500));
          if (!closed) again = true;
        }
      } while (again && !closed);
      running = false;
    })();
  };

  const timer = setInterval(() => {
    dirty = true;
    kick();
  }, pollMs);

  // ---- connections -----------------------------------------------------------------------

  const accept = (ws: WebSocket) => {
    let session: Session | undefined;
    const helloTimer = setTimeout(() => ws.close(CLOSE_PROTOCOL_ERROR, "no hello"), 10_000);
    ws.on("message", (data, isBinary) => {
      let msg;
      try {
        if (isBinary) throw new FerryError("FERRY_FARM_PROTOCOL", "binary messages are not part of the protocol");
        msg = parseWorkerMessage(data.toString());
      } catch (e) {
        ws.close(CLOSE_PROTOCOL_ERROR, asFerryError(e).message.slice(0, 120));
        return;
      }
      if (!session) {
        if (msg.type !== "hello") {
          ws.close(CLOSE_PROTOCOL_ERROR, "the first message must be hello");
          return;
        }
        clearTimeout(helloTimer);
        if (!leadership.isLeader()) {
          void leadership.leaderUrl().then(
            (url) => {
              if (url && url !== opts.publicUrl) {
                ws.send(JSON.stringify({ type: "redirect", url }));
                ws.close(CLOSE_REDIRECT, "redirect to the leader");
              } else ws.close(1013, "no coordinator schedules yet; try again");
            },
            () => ws.close(1013, "the database is unreachable; try again"),
          );
          return;
        }
        session = { ws, hello: msg, connectedAt: Date.now(), load: 0, freeDiskBytes: 0, draining: false, welcomed: false, welcomedAt: 0, sent: new Map(), missing: new Map() };
        const old = sessions.get(msg.id);
        if (old) old.ws.close(CLOSE_REPLACED, "a newer connection of this worker took over");
        sessions.set(msg.id, session);
        hellos.push(session);
        kick();
        return;
      }
      switch (msg.type) {
        case "heartbeat":
          session.load = msg.load;
          session.freeDiskBytes = msg.freeDiskBytes;
          beats.push({ session, running: msg.running, at: Date.now() });
          kick();
          break;
        case "log": {
          const i = info.get(msg.stepId);
          if (i) writeLog(i.drvPath, (path) => fs.promises.appendFile(path, msg.data));
          break;
        }
        case "result":
          results.push({ session, msg });
          kick();
          break;
        case "drain":
          session.draining = true;
          drains.push(session.hello.id);
          kick();
          break;
        case "hello":
          ws.close(CLOSE_PROTOCOL_ERROR, "hello was already sent");
          break;
      }
    });
    ws.on("close", () => {
      clearTimeout(helloTimer);
      if (session && sessions.get(session.hello.id) === session) {
        sessions.delete(session.hello.id);
        gone.push(session);
        log(`worker ${session.hello.id} disconnected`);
        kick();
      }
    });
    ws.on("error", () => undefined);
  };

  const reject = (socket: Duplex, status: number, text: string) => {
    socket.end(`HTTP/1.1 ${status} ${text}\r\nContent-Type: text/plain\r\nContent-Length: ${Buffer.byteLength(text) + 1}\r\nConnection: close\r\n\r\n${text}\n`);
  };

  return {
    handleUpgrade: (req, socket, head) => {
      socket.on("error", () => undefined);
      void Promise.resolve(opts.authenticate(req)).then(
        (role) => {
          if (role !== "worker" && role !== "admin") {
            reject(socket, 401, "Unauthorized");
            return;
          }
          wss.handleUpgrade(req, socket, head, accept);
        },
        () => reject(socket, 503, "Service Unavailable"),
      );
    },
    poke: () => {
      dirty = true;
      kick();
    },
    isLeader: () => leadership.isLeader(),
    workers: () => {
      const out: WorkerView[] = [];
      for (const sess of sessions.values()) {
        const running = sched?.hasMachine(sess.hello.id) ? sched.machine(sess.hello.id).running : [];
        out.push({
          id: sess.hello.id,
          connected: true,
          systems: sess.hello.systems,
          features: sess.hello.features,
          maxJobs: sess.hello.maxJobs,
          speedFactor: sess.hello.speedFactor,
          running,
          load: sess.load,
          freeDiskBytes: sess.freeDiskBytes,
          draining: sess.draining,
        });
      }
      return out.sort((a, b) => a.id.localeCompare(b.id));
    },
    drain: (id) => {
      const sess = sessions.get(id);
      if (!sess) return false;
      sess.draining = true;
      drains.push(id);
      send(sess, { type: "drain" });
      kick();
      return true;
    },
    logPath: (drvPath) => join(opts.logDir, baseName(drvPath)),
    metrics: () => {
      const lines: string[] = [];
      const s = sched;
      lines.push("# HELP ferry_farm_leader Whether this coordinator schedules.", "# TYPE ferry_farm_leader gauge", `ferry_farm_leader ${leadership.isLeader() ? 1 : 0}`);
      lines.push("# HELP ferry_farm_workers Connected workers.", "# TYPE ferry_farm_workers gauge", `ferry_farm_workers ${sessions.size}`);
      let slots = 0;
      let busy = 0;
      for (const sess of sessions.values()) {
        slots += sess.draining ? 0 : sess.hello.maxJobs;
        busy += s?.hasMachine(sess.hello.id) ? s.machine(sess.hello.id).running.length : 0;
      }
      lines.push(
        "# HELP ferry_farm_worker_slots Build slots of connected workers, and how many are busy.",
        "# TYPE ferry_farm_worker_slots gauge",
        `ferry_farm_worker_slots ${slots}`,
        `ferry_farm_worker_slots_busy ${busy}`,
        "# HELP ferry_farm_worker_utilisation Busy slots over all slots.",
        "# TYPE ferry_farm_worker_utilisation gauge",
        `ferry_farm_worker_utilisation ${slots ? (busy / slots).toFixed(4) : 0}`,
      );
      for (const sess of sessions.values()) {
        const n = s?.hasMachine(sess.hello.id) ? s.machine(sess.hello.id).running.length : 0;
        lines.push(`ferry_farm_worker_busy{worker="${sess.hello.id}"} ${n}`, `ferry_farm_worker_load{worker="${sess.hello.id}"} ${sess.load}`);
      }
      if (s) {
        lines.push("# HELP ferry_farm_queue_runnable Runnable steps per queue (system and features).", "# TYPE ferry_farm_queue_runnable gauge");
        for (const q of s.queues()) lines.push(`ferry_farm_queue_runnable{system="${q.system}",features="${q.requiredFeatures.join(",")}"} ${q.runnable}`);
        lines.push("# HELP ferry_farm_scheduler_steps Steps the scheduler holds in memory, by state (succeeded steps are let go once recorded).", "# TYPE ferry_farm_scheduler_steps gauge");
        for (const [state, n] of Object.entries(s.counts())) lines.push(`ferry_farm_scheduler_steps{state="${state}"} ${n}`);
      }
      lines.push(
        "# HELP ferry_farm_steps_dispatched_total Steps sent to workers by this coordinator.",
        "# TYPE ferry_farm_steps_dispatched_total counter",
        `ferry_farm_steps_dispatched_total ${dispatched}`,
        `ferry_farm_steps_finished_total ${finished}`,
        `ferry_farm_results_refused_total ${refusedResults}`,
        "# HELP ferry_farm_schedule_seconds Time the scheduler spent choosing steps (calls, decisions, slowest per decision).",
        "# TYPE ferry_farm_schedule_seconds summary",
        `ferry_farm_schedule_seconds_sum ${decisionSeconds.toFixed(6)}`,
        `ferry_farm_schedule_seconds_count ${decisionCalls}`,
        `ferry_farm_schedule_decisions_total ${decisions}`,
        `ferry_farm_schedule_decision_max_seconds ${decisionMax.toFixed(6)}`,
        ...quantiles(recent.subarray(0, Math.min(recentAt, recent.length))).map(([q, v]) => `ferry_farm_schedule_decision_seconds{quantile="${q}"} ${v.toFixed(6)}`),
        "# HELP ferry_farm_queue_wait_seconds How long steps waited in their queue, from runnable (every dependency built) to sent to a worker, per system.",
        "# TYPE ferry_farm_queue_wait_seconds histogram",
      );
      for (const [system, w] of waits) {
        WAIT_BUCKETS.forEach((b, i) => lines.push(`ferry_farm_queue_wait_seconds_bucket{system="${system}",le="${b}"} ${w.buckets[i]}`));
        lines.push(
          `ferry_farm_queue_wait_seconds_bucket{system="${system}",le="+Inf"} ${w.count}`,
          `ferry_farm_queue_wait_seconds_sum{system="${system}"} ${w.sum.toFixed(3)}`,
          `ferry_farm_queue_wait_seconds_count{system="${system}"} ${w.count}`,
        );
      }
      return lines.join("\n") + "\n";
    },
    close: async () => {
      closed = true;
      clearInterval(timer);
      for (const sess of sessions.values()) sess.ws.close(1001, "the coordinator is stopping");
      while (running) await new Promise((r) => setTimeout(r, 10));
      await leadership.close();
      wss.close();
    },
  };
}

/** Upper bounds (seconds) of the queue wait histogram's buckets. */
const WAIT_BUCKETS = [1, 5, 15, 60, 300, 900, 3600, 14400] as const;

/** The 0.5, 0.9 and 0.99 quantiles of some samples (none when there are none). */
function quantiles(samples: Float64Array): [string, number][] {
  if (samples.length === 0) return [];
  const sorted = Float64Array.from(samples).sort();
  return (["0.5", "0.9", "0.99"] as const).map((q) => [q, sorted[Math.min(sorted.length - 1, Math.floor(Number(q) * sorted.length))]!]);
}

/** `ids` with dependencies first; ids on a cycle come last, in input order. */
function topo(ids: readonly string[], deps: ReadonlyMap<string, readonly string[]>): string[] {
  const out = topoOrder(ids, (id) => deps.get(id));
  if (out.length < ids.length) {
    const seen = new Set(out);
    for (const id of ids) if (!seen.has(id)) out.push(id);
  }
  return out;
}

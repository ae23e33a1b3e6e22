import { FerryError } from "../../core/errors.js";
import { IndexedHeap, type HeapItem } from "./heap.js";
import { topoOrder } from "./graph.js";
import type {
  Assignment,
  CancelValue,
  FinishResult,
  ItemResult,
  MachineSpec,
  MachineView,
  Millis,
  QueueView,
  RestartValue,
  SchedulerOptions,
  StepOutcome,
  StepSpec,
  StepState,
  StepView,
} from "./types.js";

interface Jobset {
  readonly name: string;
  shares: number;
  /** Build time charged within the share window. */
  used: Millis;
  /** The per-queue heaps of this jobset, re-keyed when `used` or `shares` change. */
  readonly queues: Set<JobsetQueue>;
}

/** A step's membership in one jobset's heap inside its queue. */
interface Entry extends HeapItem {
  readonly step: Step;
  readonly jq: JobsetQueue;
}

/** The runnable steps of one queue that one jobset wants, best first. */
interface JobsetQueue extends HeapItem {
  readonly queue: Queue;
  readonly jobset: Jobset;
  readonly heap: IndexedHeap<Entry>;
}

/** Runnable steps of one (system, required features) pair. */
interface Queue {
  readonly key: string;
  readonly system: string;
  readonly features: readonly string[];
  readonly byJobset: Map<string, JobsetQueue>;
  /** Jobset heaps by the rank of their best step. */
  readonly top: IndexedHeap<JobsetQueue>;
  runnable: number;
  readonly machines: Set<Machine>;
}

interface Machine {
  readonly id: string;
  systems: readonly string[];
  supported: ReadonlySet<string>;
  mandatory: readonly string[];
  maxJobs: number;
  speed: number;
  readonly seq: number;
  readonly running: Set<Step>;
  readonly queues: Set<Queue>;
}

/** Within one dispatch/pick call: slots promised to held steps, and predicted slot ends per machine. */
interface HoldContext {
  readonly promised: Map<Machine, number>;
  readonly ends: Map<Machine, Millis[]>;
}

interface BackoffEntry extends HeapItem {
  readonly step: Step;
}

interface Step {
  readonly id: string;
  readonly name: string;
  readonly queue: Queue;
  readonly deps: Step[];
  readonly dependents: Step[];
  readonly jobsets: Jobset[];
  ownBump: number;
  bump: number;
  readonly createdAt: Millis;
  readonly seq: number;
  readonly estimate: Millis;
  cp: Millis;
  state: StepState;
  /** Dependencies that have not succeeded. */
  pendingDeps: number;
  /** Dependencies that are failed, depFailed or cancelled. */
  blockedDeps: number;
  failedAttempts: number;
  retryAt: Millis | undefined;
  backoff: BackoffEntry | undefined;
  machine: Machine | undefined;
  startedAt: Millis | undefined;
  /** When the step last became runnable (its wait in the queue starts there). */
  runnableSince: Millis | undefined;
  entries: Entry[];
}

const LIVE: ReadonlySet<StepState> = new Set(["waiting", "runnable", "backoff", "running"]);
const BLOCKING: ReadonlySet<StepState> = new Set(["failed", "depFailed", "cancelled"]);

/** Steps compare best-first: bump, critical path, age (fair share is the jobset's, one level up). */
function stepBefore(a: Step, b: Step): boolean {
  if (a.bump !== b.bump) return a.bump > b.bump;
  if (a.cp !== b.cp) return a.cp > b.cp;
  if (a.createdAt !== b.createdAt) return a.createdAt < b.createdAt;
  return a.seq < b.seq;
}

function fifoBefore(a: Step, b: Step): boolean {
  if (a.createdAt !== b.createdAt) return a.createdAt < b.createdAt;
  return a.seq < b.seq;
}

function shareUsed(j: Jobset): number {
  return j.used / j.shares;
}

function jqBefore(a: JobsetQueue, b: JobsetQueue): boolean {
  const x = a.heap.peek()!.step;
  const y = b.heap.peek()!.step;
  if (x.bump !== y.bump) return x.bump > y.bump;
  const sa = shareUsed(a.jobset);
  const sb = shareUsed(b.jobset);
  if (sa !== sb) return sa < sb;
  return stepBefore(x, y);
}

function jqFifoBefore(a: JobsetQueue, b: JobsetQueue): boolean {
  return fifoBefore(a.heap.peek()!.step, b.heap.peek()!.step);
}

/** Machines compare best-first: faster, then less loaded, then earlier joined. */
function machineBefore(a: Machine, b: Machine): boolean {
  if (a.speed !== b.speed) return a.speed > b.speed;
  const la = a.running.size / a.maxJobs;
  const lb = b.running.size / b.maxJobs;
  if (la !== lb) return la < lb;
  return a.seq < b.seq;
}

function sortedUnique(xs: readonly string[] | undefined): string[] {
  return [...new Set(xs ?? [])].sort();
}

function serves(m: Machine, q: Queue): boolean {
  if (!m.systems.includes(q.system)) return false;
  for (const f of q.features) if (!m.supported.has(f)) return false;
  for (const f of m.mandatory) if (!q.features.includes(f)) return false;
  return true;
}

function unknownStep(id: string): FerryError {
  return new FerryError("FERRY_FARM_UNKNOWN_STEP", `no step with id '${id}'`, {
    hint: "add the step (and the steps it depends on) with addSteps first",
    details: { id },
  });
}

function unknownMachine(id: string): FerryError {
  return new FerryError("FERRY_FARM_UNKNOWN_MACHINE", `no machine with id '${id}'`, {
    hint: "the machine may have left; it must join again before it takes steps",
    details: { id },
  });
}

/**
 * The farm's scheduler: an in-memory model of steps, queues and machines that answers
 * "which step runs where" per event. It does no I/O and reads no clock: every call that
 * depends on time takes `now`, and `now` must not go backwards between calls.
 *
 * Order inside a queue: admin bump, then fair share (the jobset's build time in the share
 * window divided by its shares; a step wanted by several jobsets ranks by the least-used one),
 * then critical path (estimated, see StepView.criticalPath), then age.
 *
 * Cost contract: with n runnable steps, Q queues, M machines and S running steps, one decision
 * (`pick`, or one assignment of `dispatch`) costs O(Q·M + S + (h+1)·J·log n), where J is the
 * number of jobsets that want a step and h the steps held for a faster machine (at most the
 * slots of faster machines). Q, M, S and J are small next to n. Nothing walks the whole queue:
 * finishing a step touches its dependents, and a critical-path or bump change touches only
 * the steps whose value changes.
 */
export class Scheduler {
  readonly #steps = new Map<string, Step>();
  readonly #queues = new Map<string, Queue>();
  readonly #machines = new Map<string, Machine>();
  readonly #jobsets = new Map<string, Jobset>();
  readonly #durations = new Map<string, Millis>();
  /** The unknown-package estimate (a quantile of #durations), recomputed after enough changes. */
  #unknownEstimate: Millis | undefined;
  #durationChanges = 0;
  readonly #backoff = new IndexedHeap<BackoffEntry>((a, b) => a.step.retryAt! < b.step.retryAt! || (a.step.retryAt === b.step.retryAt && a.step.seq < b.step.seq));
  /** Build time charged to jobsets, oldest first, expired after the share window. */
  readonly #charges: { at: Millis; jobset: Jobset; ms: Millis }[] = [];
  #chargeHead = 0;
  #seq = 0;
  #machineSeq = 0;
  #now = -Infinity;

  readonly #maxAttempts: number;
  readonly #initialDelay: Millis;
  readonly #backoffFactor: number;
  readonly #window: Millis;
  readonly #defaultShares: number;
  readonly #defaultEstimate: Millis | undefined;
  readonly #unknownQuantile: number;
  readonly #hold: boolean;
  readonly #stepBefore: (a: Step, b: Step) => boolean;
  readonly #jqBefore: (a: JobsetQueue, b: JobsetQueue) => boolean;

  constructor(opts: SchedulerOptions = {}) {
    this.#maxAttempts = opts.retry?.maxAttempts ?? 5;
    this.#initialDelay = opts.retry?.initialDelayMs ?? 60_000;
    this.#backoffFactor = opts.retry?.backoffFactor ?? 3;
    this.#window = opts.shareWindowMs ?? 86_400_000;
    this.#defaultShares = opts.defaultShares ?? 100;
    this.#defaultEstimate = opts.defaultEstimateMs;
    this.#unknownQuantile = opts.unknownEstimateQuantile ?? 0.99;
    if (!(this.#unknownQuantile >= 0 && this.#unknownQuantile <= 1)) {
      throw new FerryError("FERRY_FARM_BAD_OPTION", `unknownEstimateQuantile must lie between 0 and 1, got ${String(opts.unknownEstimateQuantile)}`, {
        hint: "0.5 estimates a new package at the median measured duration, 0.99 (the default) near the longest",
      });
    }
    this.#hold = opts.holdForFasterMachines ?? true;
    const fifo = opts.ordering === "fifo";
    this.#stepBefore = fifo ? fifoBefore : stepBefore;
    this.#jqBefore = fifo ? jqFifoBefore : jqBefore;
    for (const [name, ms] of opts.durations ?? []) this.recordDuration(name, ms);
  }

  // ---- steps ----------------------------------------------------------------------------

  /**
   * Adds a batch of steps. A step may depend on steps already known or earlier/later in the
   * same batch. Every item gets a result: duplicates, unknown dependencies and cycles are
   * rejected (with a FerryError, code FERRY_FARM_DUPLICATE_STEP / _UNKNOWN_STEP /
   * _DEPENDENCY_CYCLE), as is any step that depends on a rejected one; the rest are added.
   * Known steps never gain dependencies, so a cycle can only lie within one batch. A step's
   * estimate is taken when it is added (`estimate(name)`). The value of an accepted item is the
   * step's state: runnable, waiting, or depFailed when a dependency already failed.
   */
  addSteps(specs: readonly StepSpec[], now: Millis): ItemResult<StepState>[] {
    this.#advance(now);
    const errors = new Map<string, FerryError>();
    const batch = new Map<string, StepSpec>();
    const results: ItemResult<StepState>[] = [];
    const firstIndex = new Map<string, number>();
    specs.forEach((s, i) => {
      if (this.#steps.has(s.id) || batch.has(s.id)) {
        const e = new FerryError("FERRY_FARM_DUPLICATE_STEP", `step '${s.id}' is already known`, {
          hint: "step ids are unique (one step per derivation); add the step once",
          details: { id: s.id },
        });
        results[i] = { id: s.id, ok: false, error: e };
        return;
      }
      batch.set(s.id, s);
      firstIndex.set(s.id, i);
    });
    for (const [id, s] of batch) {
      for (const d of s.deps ?? []) {
        if (!batch.has(d) && !this.#steps.has(d)) {
          errors.set(id, new FerryError("FERRY_FARM_UNKNOWN_STEP", `step '${id}' depends on unknown step '${d}'`, {
            hint: "add dependencies in the same batch or before the steps that need them",
            details: { id, dependency: d },
          }));
        }
      }
    }
    // What is never sorted sits on or behind a cycle.
    const order = topoOrder(batch.keys(), (id) => batch.get(id)!.deps);
    if (order.length < batch.size) {
      const sorted = new Set(order);
      for (const id of batch.keys()) {
        if (!sorted.has(id) && !errors.has(id)) {
          errors.set(id, new FerryError("FERRY_FARM_DEPENDENCY_CYCLE", `step '${id}' is on or behind a dependency cycle`, {
            hint: "a derivation cannot depend on itself, directly or through others",
            details: { id },
          }));
        }
      }
    }
    // Reject what depends on a rejected step (order is topological, so one pass suffices).
    for (const id of order) {
      if (errors.has(id)) continue;
      for (const d of batch.get(id)!.deps ?? []) {
        const e = errors.get(d);
        if (e) {
          errors.set(id, new FerryError(e.code, `step '${id}' depends on rejected step '${d}': ${e.message}`, { hint: e.hint ?? "", details: { id, dependency: d } }));
          break;
        }
      }
    }
    const added: Step[] = [];
    for (const id of order) {
      if (errors.has(id)) continue;
      added.push(this.#createStep(batch.get(id)!, now));
    }
    // Critical paths and bumps: the new steps in reverse topological order (their dependents
    // are all new), then the increase spreads to the already-known steps they depend on.
    const boundary = new Set<Step>();
    for (let i = added.length - 1; i >= 0; i--) {
      const s = added[i]!;
      this.#recompute(s);
      for (const d of s.deps) if (!batch.has(d.id) && LIVE.has(d.state)) boundary.add(d);
    }
    this.#propagate([...boundary]);
    for (const s of added) if (s.state === "waiting" && s.pendingDeps === 0) this.#makeRunnable(s);
    for (const [id, e] of errors) results[firstIndex.get(id)!] = { id, ok: false, error: e };
    for (const s of added) results[firstIndex.get(s.id)!] = { id: s.id, ok: true, value: s.state };
    return results;
  }

  #createStep(spec: StepSpec, now: Millis): Step {
    const features = sortedUnique(spec.requiredFeatures);
    const queue = this.#queue(spec.system, features);
    const deps = [...new Set(spec.deps ?? [])].map((d) => this.#steps.get(d)!);
    const jobsets = (spec.jobsets && spec.jobsets.length > 0 ? [...new Set(spec.jobsets)] : [""]).map((j) => this.#jobset(j));
    const s: Step = {
      id: spec.id,
      name: spec.name,
      queue,
      deps,
      dependents: [],
      jobsets,
      ownBump: spec.bump ?? 0,
      bump: spec.bump ?? 0,
      createdAt: spec.createdAt ?? now,
      seq: this.#seq++,
      estimate: this.estimate(spec.name),
      cp: 0,
      state: "waiting",
      pendingDeps: 0,
      blockedDeps: 0,
      failedAttempts: 0,
      retryAt: undefined,
      backoff: undefined,
      machine: undefined,
      startedAt: undefined,
      runnableSince: undefined,
      entries: [],
    };
    for (const d of deps) {
      d.dependents.push(s);
      if (d.state !== "succeeded") s.pendingDeps++;
      if (BLOCKING.has(d.state)) s.blockedDeps++;
    }
    if (s.blockedDeps > 0) s.state = "depFailed";
    this.#steps.set(s.id, s);
    return s;
  }

  /**
   * Reports the end of a running step. Success releases dependents whose dependencies have all
   * succeeded and records the duration (scaled to a speed-1 machine) as the estimate for the
   * package name. A transient failure is retried after a backoff (see SchedulerOptions.retry),
   * and becomes permanent after the last attempt. A permanent failure marks every step that
   * depends on it, transitively, as depFailed. Every outcome charges the elapsed time to each
   * jobset that wants the step (fair share). Throws FERRY_FARM_UNKNOWN_STEP, or
   * FERRY_FARM_STEP_NOT_RUNNING when the step is not running (e.g. a late report after a cancel).
   */
  finish(stepId: string, outcome: StepOutcome, now: Millis): FinishResult {
    this.#advance(now);
    const s = this.#steps.get(stepId);
    if (!s) throw unknownStep(stepId);
    if (s.state !== "running") {
      throw new FerryError("FERRY_FARM_STEP_NOT_RUNNING", `step '${stepId}' is ${s.state}, not running`, {
        hint: "the step was cancelled, re-queued or already reported; ignore the late result",
        details: { id: stepId, state: s.state },
      });
    }
    const m = s.machine!;
    const elapsed = Math.max(0, now - s.startedAt!);
    this.#release(s);
    this.#charge(s, elapsed, now);
    if (outcome.kind === "succeeded") {
      s.state = "succeeded";
      this.recordDuration(s.name, elapsed * m.speed);
      const released: string[] = [];
      for (const d of s.dependents) {
        d.pendingDeps--;
        if (d.pendingDeps === 0 && d.state === "waiting") {
          this.#makeRunnable(d);
          released.push(d.id);
        }
      }
      return { stepId, state: s.state, released, depFailed: [] };
    }
    s.failedAttempts++;
    if (outcome.kind === "transient-failure" && s.failedAttempts < this.#maxAttempts) {
      s.state = "backoff";
      s.retryAt = now + this.#initialDelay * Math.pow(this.#backoffFactor, s.failedAttempts - 1);
      s.backoff = { step: s, heapIndex: -1 };
      this.#backoff.push(s.backoff);
      return { stepId, state: s.state, released: [], depFailed: [], retryAt: s.retryAt };
    }
    s.state = "failed";
    const depFailed: string[] = [];
    this.#block(s, depFailed);
    return { stepId, state: s.state, released: [], depFailed };
  }

  /**
   * Cancels steps. A running step frees its slot and the result says which machine must abort
   * it. Steps that depend on a cancelled step become depFailed. Cancelling a finished step is
   * an error item (FERRY_FARM_STEP_FINISHED).
   */
  cancel(ids: readonly string[], now: Millis): ItemResult<CancelValue>[] {
    this.#advance(now);
    return ids.map((id): ItemResult<CancelValue> => {
      const s = this.#steps.get(id);
      if (!s) return { id, ok: false, error: unknownStep(id) };
      if (s.state === "succeeded" || s.state === "failed") {
        return { id, ok: false, error: new FerryError("FERRY_FARM_STEP_FINISHED", `step '${id}' already ${s.state}`, { details: { id, state: s.state } }) };
      }
      if (s.state === "cancelled") return { id, ok: true, value: { depFailed: [] } };
      const wasLive = LIVE.has(s.state);
      let abort: Assignment | undefined;
      if (s.state === "running") abort = { stepId: id, machineId: s.machine!.id };
      this.#leaveLiveState(s);
      const depFailed: string[] = [];
      s.state = "cancelled";
      if (wasLive) this.#block(s, depFailed);
      return { id, ok: true, value: abort ? { abort, depFailed } : { depFailed } };
    });
  }

  /**
   * Clears failures: a failed or cancelled step is queued again with its attempts reset, and
   * the steps it kept depFailed are released (transitively) unless another dependency still
   * blocks them. Restarting a depFailed step restarts the failed/cancelled steps that block
   * it. Restarting a step that is queued or running changes nothing; restarting a succeeded
   * step is an error item (FERRY_FARM_STEP_FINISHED).
   */
  restart(ids: readonly string[], now: Millis): ItemResult<RestartValue>[] {
    this.#advance(now);
    return ids.map((id): ItemResult<RestartValue> => {
      const s = this.#steps.get(id);
      if (!s) return { id, ok: false, error: unknownStep(id) };
      if (s.state === "succeeded") {
        return { id, ok: false, error: new FerryError("FERRY_FARM_STEP_FINISHED", `step '${id}' already succeeded`, { hint: "a succeeded step is not built again", details: { id } }) };
      }
      const requeued: string[] = [];
      // The roots of the blockage: failed/cancelled steps reachable through blocking deps.
      const roots: Step[] = [];
      const seen = new Set<Step>();
      const walk = (x: Step): void => {
        if (seen.has(x)) return;
        seen.add(x);
        if (x.state === "failed" || x.state === "cancelled") roots.push(x);
        if (x.state === "failed" || x.state === "cancelled" || x.state === "depFailed") {
          for (const d of x.deps) if (BLOCKING.has(d.state)) walk(d);
        }
      };
      walk(s);
      const revived: Step[] = [];
      // Each root stays blocking (depFailed) until none of its own dependencies blocks it.
      for (const r of roots) {
        r.failedAttempts = 0;
        r.state = "depFailed";
      }
      for (const r of roots) if (r.blockedDeps === 0 && r.state === "depFailed") this.#unblock(r, requeued, revived);
      const touched = [...revived];
      for (const x of revived) for (const d of x.deps) if (LIVE.has(d.state)) touched.push(d);
      this.#propagate(touched);
      return { id, ok: true, value: { requeued } };
    });
  }

  /**
   * Sets the admin bump of steps. The effective bump of a step is the highest bump among it
   * and the unfinished steps depending on it, so bumping a step also hurries what it needs.
   */
  bump(ids: readonly string[], bump: number, now: Millis): ItemResult<number>[] {
    this.#advance(now);
    return ids.map((id): ItemResult<number> => {
      const s = this.#steps.get(id);
      if (!s) return { id, ok: false, error: unknownStep(id) };
      s.ownBump = bump;
      this.#propagate([s]);
      return { id, ok: true, value: s.bump };
    });
  }

  /**
   * Puts a runnable step on a named machine, as already running since `startedAt`: how a
   * coordinator restores the leases it finds in its database, or a step a reconnecting worker
   * still runs. The machine may end up over its max jobs. Error items: FERRY_FARM_UNKNOWN_STEP,
   * FERRY_FARM_UNKNOWN_MACHINE, FERRY_FARM_STEP_NOT_RUNNABLE.
   */
  assignTo(stepId: string, machineId: string, startedAt: Millis, now: Millis): ItemResult<Assignment> {
    this.#advance(now);
    const s = this.#steps.get(stepId);
    if (!s) return { id: stepId, ok: false, error: unknownStep(stepId) };
    const m = this.#machines.get(machineId);
    if (!m) return { id: stepId, ok: false, error: unknownMachine(machineId) };
    if (s.state === "running" && s.machine === m) return { id: stepId, ok: true, value: { stepId, machineId } };
    if (s.state !== "runnable") {
      return { id: stepId, ok: false, error: new FerryError("FERRY_FARM_STEP_NOT_RUNNABLE", `step '${stepId}' is ${s.state}, not runnable`, { details: { id: stepId, state: s.state } }) };
    }
    const a = this.#assign(s, m, now);
    s.startedAt = Math.min(startedAt, now);
    return { id: stepId, ok: true, value: a };
  }

  /**
   * Puts running steps back in their queues without counting an attempt (their lease
   * expired: the worker vanished, the build itself did not fail). The value is the machine
   * the step was on. Error items: FERRY_FARM_UNKNOWN_STEP, FERRY_FARM_STEP_NOT_RUNNING.
   */
  requeue(ids: readonly string[], now: Millis): ItemResult<string>[] {
    this.#advance(now);
    return ids.map((id): ItemResult<string> => {
      const s = this.#steps.get(id);
      if (!s) return { id, ok: false, error: unknownStep(id) };
      if (s.state !== "running") {
        return { id, ok: false, error: new FerryError("FERRY_FARM_STEP_NOT_RUNNING", `step '${id}' is ${s.state}, not running`, { details: { id, state: s.state } }) };
      }
      const machine = s.machine!.id;
      this.#release(s);
      this.#makeRunnable(s);
      return { id, ok: true, value: machine };
    });
  }

  // ---- machines ---------------------------------------------------------------------------

  /** A machine joins. Throws FERRY_FARM_DUPLICATE_MACHINE or FERRY_FARM_BAD_MACHINE. */
  addMachine(spec: MachineSpec): void {
    if (this.#machines.has(spec.id)) {
      throw new FerryError("FERRY_FARM_DUPLICATE_MACHINE", `machine '${spec.id}' is already known`, {
        hint: "a reconnecting worker keeps its id and its running steps; remove the machine first to change it",
        details: { id: spec.id },
      });
    }
    const speed = spec.speedFactor ?? 1;
    if (!Number.isInteger(spec.maxJobs) || spec.maxJobs < 0 || !(speed > 0) || spec.systems.length === 0) {
      throw new FerryError("FERRY_FARM_BAD_MACHINE", `machine '${spec.id}' needs at least one system, an integer maxJobs ≥ 0 and a speed factor > 0`, {
        details: { id: spec.id, maxJobs: spec.maxJobs, speedFactor: speed },
      });
    }
    const mandatory = sortedUnique(spec.mandatoryFeatures);
    const m: Machine = {
      id: spec.id,
      systems: [...new Set(spec.systems)],
      supported: new Set([...(spec.supportedFeatures ?? []), ...mandatory]),
      mandatory,
      maxJobs: spec.maxJobs,
      speed,
      seq: this.#machineSeq++,
      running: new Set(),
      queues: new Set(),
    };
    this.#machines.set(m.id, m);
    for (const q of this.#queues.values()) {
      if (serves(m, q)) {
        m.queues.add(q);
        q.machines.add(m);
      }
    }
  }

  /**
   * Changes a known machine (a worker reconnected with other settings, went away for a while
   * (max jobs 0: it keeps its running steps but takes no new ones), or came back). Its running
   * steps stay; queue membership follows the new systems and features. Throws
   * FERRY_FARM_UNKNOWN_MACHINE or FERRY_FARM_BAD_MACHINE.
   */
  updateMachine(spec: MachineSpec): void {
    const m = this.#machines.get(spec.id);
    if (!m) throw unknownMachine(spec.id);
    const speed = spec.speedFactor ?? 1;
    if (!Number.isInteger(spec.maxJobs) || spec.maxJobs < 0 || !(speed > 0) || spec.systems.length === 0) {
      throw new FerryError("FERRY_FARM_BAD_MACHINE", `machine '${spec.id}' needs at least one system, an integer maxJobs ≥ 0 and a speed factor > 0`, {
        details: { id: spec.id, maxJobs: spec.maxJobs, speedFactor: speed },
      });
    }
    m.systems = [...new Set(spec.systems)];
    m.mandatory = sortedUnique(spec.mandatoryFeatures);
    m.supported = new Set([...(spec.supportedFeatures ?? []), ...m.mandatory]);
    m.maxJobs = spec.maxJobs;
    m.speed = speed;
    for (const q of m.queues) q.machines.delete(m);
    m.queues.clear();
    for (const q of this.#queues.values()) {
      if (serves(m, q)) {
        m.queues.add(q);
        q.machines.add(m);
      }
    }
  }

  /**
   * Forgets succeeded steps, so that a long-running scheduler holds the live work and its
   * failures, not its whole history. A later step must not name a forgotten step as a
   * dependency (leave out dependencies known to have succeeded). Per item: ok, or an error item
   * for an unknown step (FERRY_FARM_UNKNOWN_STEP) or one that has not succeeded
   * (FERRY_FARM_STEP_NOT_SUCCEEDED: failures stay, a restart needs them).
   */
  forget(ids: readonly string[]): ItemResult<null>[] {
    return ids.map((id): ItemResult<null> => {
      const s = this.#steps.get(id);
      if (!s) return { id, ok: false, error: unknownStep(id) };
      if (s.state !== "succeeded") {
        return {
          id,
          ok: false,
          error: new FerryError("FERRY_FARM_STEP_NOT_SUCCEEDED", `step '${id}' is ${s.state}; only succeeded steps are forgotten`, {
            hint: "forget a step once its success is recorded; failed steps stay so that a restart can requeue what they block",
            details: { id, state: s.state },
          }),
        };
      }
      // Cut the links both ways, so that what is still known does not keep the history alive.
      for (const d of s.dependents) d.deps.splice(d.deps.indexOf(s), 1);
      for (const d of s.deps) d.dependents.splice(d.dependents.indexOf(s), 1);
      s.deps.length = 0;
      s.dependents.length = 0;
      this.#steps.delete(id);
      return { id, ok: true, value: null };
    });
  }

  /** Whether a machine is known. */
  hasMachine(id: string): boolean {
    return this.#machines.has(id);
  }

  /** Whether a step is known. */
  hasStep(id: string): boolean {
    return this.#steps.has(id);
  }

  /** A machine leaves for good: its running steps are runnable again (no attempt is counted). Returns their ids. */
  removeMachine(id: string, now: Millis): string[] {
    this.#advance(now);
    const m = this.#machines.get(id);
    if (!m) throw unknownMachine(id);
    const requeued: string[] = [];
    for (const s of [...m.running]) {
      this.#release(s);
      this.#makeRunnable(s);
      requeued.push(s.id);
    }
    for (const q of m.queues) q.machines.delete(m);
    this.#machines.delete(id);
    return requeued;
  }

  /**
   * Chooses the best runnable step for one free slot of `machineId` and marks it running there.
   * Undefined when the machine is full or nothing it should build is runnable (see `dispatch`
   * for steps held for a faster machine).
   */
  pick(machineId: string, now: Millis): Assignment | undefined {
    this.#advance(now);
    const m = this.#machines.get(machineId);
    if (!m) throw unknownMachine(machineId);
    if (m.running.size >= m.maxJobs) return undefined;
    const held: Step[] = [];
    const ctx: HoldContext = { promised: new Map(), ends: new Map() };
    try {
      for (;;) {
        let best: JobsetQueue | undefined;
        for (const q of m.queues) {
          const t = q.top.peek();
          if (t && (!best || this.#jqBefore(t, best))) best = t;
        }
        if (!best) return undefined;
        const step = best.heap.peek()!.step;
        if (this.#holdForFaster(step, m, now, ctx)) {
          this.#dequeue(step);
          held.push(step);
          continue;
        }
        return this.#assign(step, m, now);
      }
    } finally {
      for (const h of held) this.#makeRunnable(h);
    }
  }

  /**
   * Fills every free slot it should: repeatedly the best runnable step among the queues that
   * some free machine serves, on the best free machine that serves its queue (faster, then
   * less loaded). A step is held back instead when a busy, faster machine is expected (from
   * the estimates of what it runs) to free a slot early enough that the chain behind the step
   * (its critical path) ends sooner there; each such slot is promised to one step per call,
   * and held steps stay queued for the next event. Returns the decisions in order.
   */
  dispatch(now: Millis): Assignment[] {
    this.#advance(now);
    const out: Assignment[] = [];
    const held: Step[] = [];
    const ctx: HoldContext = { promised: new Map(), ends: new Map() };
    for (;;) {
      let best: JobsetQueue | undefined;
      for (const q of this.#queues.values()) {
        const t = q.top.peek();
        if (!t || (best && !this.#jqBefore(t, best))) continue;
        if (this.#freeMachine(q)) best = t;
      }
      if (!best) break;
      const step = best.heap.peek()!.step;
      const m = this.#freeMachine(best.queue)!;
      if (this.#holdForFaster(step, m, now, ctx)) {
        this.#dequeue(step);
        held.push(step);
        continue;
      }
      out.push(this.#assign(step, m, now));
      ctx.ends.delete(m);
    }
    for (const h of held) this.#makeRunnable(h);
    return out;
  }

  /**
   * Whether `s` should wait for a slot of a faster, busy machine rather than start on `m` now:
   * true when some faster machine's next unpromised slot (predicted from the estimates of its
   * running steps; an overrunning step is expected to run half as long again) plus the step's
   * critical path at that speed ends before the critical path at `m`'s speed from now.
   * The chosen slot is then promised to `s`.
   */
  #holdForFaster(s: Step, m: Machine, now: Millis, ctx: HoldContext): boolean {
    if (!this.#hold) return false;
    const onM = now + s.cp / m.speed;
    let bestAt = onM;
    let bestMachine: Machine | undefined;
    for (const f of s.queue.machines) {
      if (f.speed <= m.speed || f.maxJobs === 0) continue;
      if (now + s.cp / f.speed >= bestAt) continue; // even free at once, no better
      let ends = ctx.ends.get(f);
      if (!ends) {
        ends = [];
        for (const r of f.running) {
          const elapsed = now - r.startedAt!;
          const left = r.estimate / f.speed - elapsed;
          ends.push(now + (left > 0 ? left : elapsed / 2));
        }
        ends.sort((x, y) => x - y);
        ctx.ends.set(f, ends);
      }
      const free = f.maxJobs - f.running.size;
      const k = (ctx.promised.get(f) ?? 0) - free;
      const at = k < 0 ? now : ends[k];
      if (at === undefined) continue;
      const fin = at + s.cp / f.speed;
      if (fin < bestAt) {
        bestAt = fin;
        bestMachine = f;
      }
    }
    if (!bestMachine) return false;
    ctx.promised.set(bestMachine, (ctx.promised.get(bestMachine) ?? 0) + 1);
    return true;
  }

  /** The earliest time at which a step in backoff becomes runnable, for the caller's timer. */
  nextWakeAt(): Millis | undefined {
    return this.#backoff.peek()?.step.retryAt;
  }

  // ---- estimates and fair share -----------------------------------------------------------

  /** Records a measured duration (on a speed-1 machine) for a package name; later steps of that name use it. */
  recordDuration(name: string, ms: Millis): void {
    this.#durations.set(name, ms);
    this.#durationChanges++;
  }

  /**
   * The estimate a new step of this package name gets: its last measured duration; for a
   * package never measured, `defaultEstimateMs` when set, else the `unknownEstimateQuantile`
   * of the measured durations (kept fresh to within 1% of them), else 1.
   */
  estimate(name: string): Millis {
    const known = this.#durations.get(name);
    if (known !== undefined) return known;
    if (this.#defaultEstimate !== undefined) return this.#defaultEstimate;
    if (this.#durations.size === 0) return 1;
    if (this.#unknownEstimate === undefined || this.#durationChanges > this.#durations.size / 100) {
      const all = Float64Array.from(this.#durations.values()).sort();
      this.#unknownEstimate = all[Math.round(this.#unknownQuantile * (all.length - 1))]!;
      this.#durationChanges = 0;
    }
    return this.#unknownEstimate;
  }

  /** Sets a jobset's scheduling shares (> 0). */
  setShares(jobset: string, shares: number): void {
    if (!(shares > 0)) throw new FerryError("FERRY_FARM_BAD_SHARES", `scheduling shares must be > 0, got ${shares}`, { details: { jobset, shares } });
    const j = this.#jobset(jobset);
    j.shares = shares;
    this.#rekeyJobset(j);
  }

  /** A jobset's build time in the share window divided by its shares (lower is served first). */
  shareUsed(jobset: string, now: Millis): number {
    this.#advance(now);
    const j = this.#jobsets.get(jobset);
    return j ? shareUsed(j) : 0;
  }

  // ---- views ------------------------------------------------------------------------------

  step(id: string): StepView {
    const s = this.#steps.get(id);
    if (!s) throw unknownStep(id);
    return {
      id: s.id,
      name: s.name,
      system: s.queue.system,
      requiredFeatures: s.queue.features,
      state: s.state,
      failedAttempts: s.failedAttempts,
      retryAt: s.state === "backoff" ? s.retryAt : undefined,
      machineId: s.machine?.id,
      startedAt: s.startedAt,
      runnableSince: s.runnableSince,
      estimate: s.estimate,
      criticalPath: s.cp,
      bump: s.bump,
      jobsets: s.jobsets.map((j) => j.name),
      createdAt: s.createdAt,
    };
  }

  stepIds(): string[] {
    return [...this.#steps.keys()];
  }

  machine(id: string): MachineView {
    const m = this.#machines.get(id);
    if (!m) throw unknownMachine(id);
    return {
      id: m.id,
      systems: m.systems,
      supportedFeatures: [...m.supported].sort(),
      mandatoryFeatures: m.mandatory,
      maxJobs: m.maxJobs,
      speedFactor: m.speed,
      running: [...m.running].map((s) => s.id),
    };
  }

  queues(): QueueView[] {
    return [...this.#queues.values()].map((q) => ({
      system: q.system,
      requiredFeatures: q.features,
      runnable: q.runnable,
      machines: [...q.machines].map((m) => m.id),
    }));
  }

  /** How many steps are in each state. */
  counts(): Record<StepState, number> {
    const c: Record<StepState, number> = { waiting: 0, runnable: 0, backoff: 0, running: 0, succeeded: 0, failed: 0, depFailed: 0, cancelled: 0 };
    for (const s of this.#steps.values()) c[s.state]++;
    return c;
  }

  // ---- internals --------------------------------------------------------------------------

  #queue(system: string, features: string[]): Queue {
    const key = `${system}\0${features.join("\0")}`;
    let q = this.#queues.get(key);
    if (!q) {
      q = { key, system, features, byJobset: new Map(), top: new IndexedHeap(this.#jqBefore), runnable: 0, machines: new Set() };
      this.#queues.set(key, q);
      for (const m of this.#machines.values()) {
        if (serves(m, q)) {
          m.queues.add(q);
          q.machines.add(m);
        }
      }
    }
    return q;
  }

  #jobset(name: string): Jobset {
    let j = this.#jobsets.get(name);
    if (!j) this.#jobsets.set(name, (j = { name, shares: this.#defaultShares, used: 0, queues: new Set() }));
    return j;
  }

  #freeMachine(q: Queue): Machine | undefined {
    let best: Machine | undefined;
    for (const m of q.machines) {
      if (m.running.size < m.maxJobs && (!best || machineBefore(m, best))) best = m;
    }
    return best;
  }

  #assign(s: Step, m: Machine, now: Millis): Assignment {
    this.#dequeue(s);
    s.state = "running";
    s.machine = m;
    s.startedAt = now;
    m.running.add(s);
    return { stepId: s.id, machineId: m.id };
  }

  /** Frees the machine slot of a running step. */
  #release(s: Step): void {
    s.machine!.running.delete(s);
    s.machine = undefined;
  }

  #makeRunnable(s: Step): void {
    // A step held for a faster machine is queued again without having left the queue.
    if (s.state !== "runnable") s.runnableSince = s.state === "backoff" ? Math.min(s.retryAt ?? this.#now, this.#now) : this.#now;
    s.state = "runnable";
    s.retryAt = undefined;
    const q = s.queue;
    q.runnable++;
    for (const j of s.jobsets) {
      let jq = q.byJobset.get(j.name);
      if (!jq) {
        jq = { queue: q, jobset: j, heap: new IndexedHeap<Entry>((a, b) => this.#stepBefore(a.step, b.step)), heapIndex: -1 };
        q.byJobset.set(j.name, jq);
        j.queues.add(jq);
      }
      const e: Entry = { step: s, jq, heapIndex: -1 };
      s.entries.push(e);
      jq.heap.push(e);
      q.top.upsert(jq);
    }
  }

  #dequeue(s: Step): void {
    s.queue.runnable--;
    for (const e of s.entries) {
      e.jq.heap.remove(e);
      this.#refreshTop(e.jq);
    }
    s.entries = [];
  }

  #refreshTop(jq: JobsetQueue): void {
    const top = jq.queue.top;
    if (jq.heap.size === 0) {
      if (top.has(jq)) top.remove(jq);
    } else {
      top.upsert(jq);
    }
  }

  #rekeyJobset(j: Jobset): void {
    for (const jq of j.queues) if (jq.queue.top.has(jq)) jq.queue.top.update(jq);
  }

  /** Takes a live step out of its queue, backoff heap or machine slot. */
  #leaveLiveState(s: Step): void {
    if (s.state === "runnable") this.#dequeue(s);
    else if (s.state === "backoff") {
      this.#backoff.remove(s.backoff!);
      s.backoff = undefined;
      s.retryAt = undefined;
    } else if (s.state === "running") this.#release(s);
  }

  /** `s` just became failed/depFailed/cancelled: what depends on it is blocked. */
  #block(s: Step, depFailed: string[]): void {
    const stack = [s];
    const lost: Step[] = [s];
    while (stack.length > 0) {
      const x = stack.pop()!;
      for (const d of x.dependents) {
        d.blockedDeps++;
        if (d.blockedDeps === 1 && LIVE.has(d.state)) {
          // A dependent of an unfinished step is waiting: it cannot be queued or running.
          d.state = "depFailed";
          depFailed.push(d.id);
          lost.push(d);
          stack.push(d);
        }
      }
    }
    // The blocked steps no longer count in their dependencies' critical paths.
    const touched: Step[] = [];
    for (const x of lost) for (const d of x.deps) if (LIVE.has(d.state)) touched.push(d);
    this.#propagate(touched);
  }

  /** `x` is depFailed and nothing blocks it any more: it is live again, and so, transitively, are the dependents it alone blocked. */
  #unblock(x: Step, requeued: string[], revived: Step[]): void {
    const stack = [x];
    while (stack.length > 0) {
      const y = stack.pop()!;
      if (y.pendingDeps === 0) this.#makeRunnable(y);
      else y.state = "waiting";
      requeued.push(y.id);
      revived.push(y);
      for (const d of y.dependents) {
        d.blockedDeps--;
        if (d.blockedDeps === 0 && d.state === "depFailed") stack.push(d);
      }
    }
  }

  /**
   * Recomputes critical path and effective bump from the live dependents:
   * cp = estimate + max(cp of live dependents), bump = max(own bump, bump of live dependents).
   * Returns whether either changed; a queued step is re-sifted in its heaps.
   */
  #recompute(s: Step): boolean {
    let cpBelow = 0;
    let bump = s.ownBump;
    for (const d of s.dependents) {
      if (!LIVE.has(d.state)) continue;
      if (d.cp > cpBelow) cpBelow = d.cp;
      if (d.bump > bump) bump = d.bump;
    }
    const cp = s.estimate + cpBelow;
    if (cp === s.cp && bump === s.bump) return false;
    s.cp = cp;
    s.bump = bump;
    if (s.state === "runnable") {
      for (const e of s.entries) {
        e.jq.heap.update(e);
        this.#refreshTop(e.jq);
      }
    }
    return true;
  }

  /**
   * Brings critical paths and bumps up to date after `start` (or the dependents they read)
   * changed: a worklist that recomputes a step and, when its value changed, its live
   * dependencies. Work is proportional to the steps whose value changes.
   */
  #propagate(start: readonly Step[]): void {
    const work = [...start];
    const queued = new Set<Step>(work);
    while (work.length > 0) {
      const s = work.pop()!;
      queued.delete(s);
      if (!LIVE.has(s.state)) continue;
      if (!this.#recompute(s)) continue;
      for (const d of s.deps) {
        if (LIVE.has(d.state) && !queued.has(d)) {
          queued.add(d);
          work.push(d);
        }
      }
    }
  }

  #charge(s: Step, ms: Millis, now: Millis): void {
    for (const j of s.jobsets) {
      j.used += ms;
      this.#charges.push({ at: now, jobset: j, ms });
      this.#rekeyJobset(j);
    }
  }

  /** Moves time forward: steps whose backoff ended become runnable; old charges leave the share window. */
  #advance(now: Millis): void {
    if (now < this.#now) now = this.#now;
    this.#now = now;
    for (let b = this.#backoff.peek(); b && b.step.retryAt! <= now; b = this.#backoff.peek()) {
      this.#backoff.pop();
      b.step.backoff = undefined;
      this.#makeRunnable(b.step);
    }
    const c = this.#charges;
    while (this.#chargeHead < c.length && c[this.#chargeHead]!.at + this.#window <= now) {
      const { jobset, ms } = c[this.#chargeHead++]!;
      jobset.used -= ms;
      if (jobset.used < 1e-6) jobset.used = 0;
      this.#rekeyJobset(jobset);
    }
    if (this.#chargeHead > 1024 && this.#chargeHead * 2 > c.length) {
      c.splice(0, this.#chargeHead);
      this.#chargeHead = 0;
    }
  }
}

import type { FerryError } from "../../core/errors.js";

/** Times are milliseconds on the caller's clock (virtual or real); the scheduler never reads a clock. */
export type Millis = number;

/** One derivation to build. */
export interface StepSpec {
  readonly id: string;
  /** Package name (e.g. `openssl`); earlier builds of the same name give this step's duration estimate. */
  readonly name: string;
  readonly system: string;
  readonly requiredFeatures?: readonly string[];
  /** Ids of steps that must succeed first: steps already known to the scheduler or earlier in the same batch. */
  readonly deps?: readonly string[];
  /** Jobsets that want this step (fair share). None means the default jobset `""`. */
  readonly jobsets?: readonly string[];
  /** Admin bump: higher runs first. It applies to this step and every unfinished step it depends on. */
  readonly bump?: number;
  /** Creation time (age, the last tie-breaker). Defaults to the `now` given to `addSteps`. */
  readonly createdAt?: Millis;
}

/** A build machine (a worker). */
export interface MachineSpec {
  readonly id: string;
  readonly systems: readonly string[];
  readonly supportedFeatures?: readonly string[];
  /** The machine only takes steps that require every one of these (they count as supported too). */
  readonly mandatoryFeatures?: readonly string[];
  readonly maxJobs: number;
  /** Relative speed; 2 means a step takes half as long as on a machine with speed 1. Default 1. */
  readonly speedFactor?: number;
}

/**
 * waiting: some dependency has not succeeded yet. runnable: queued. backoff: a transient failure,
 * runnable again at `retryAt`. running: assigned to a machine. depFailed: some dependency failed
 * or was cancelled.
 */
export type StepState = "waiting" | "runnable" | "backoff" | "running" | "succeeded" | "failed" | "depFailed" | "cancelled";

export interface StepView {
  readonly id: string;
  readonly name: string;
  readonly system: string;
  readonly requiredFeatures: readonly string[];
  readonly state: StepState;
  /** Failed attempts since the step was added or last restarted. */
  readonly failedAttempts: number;
  readonly retryAt: Millis | undefined;
  readonly machineId: string | undefined;
  readonly startedAt: Millis | undefined;
  /** When the step last became runnable (queued with every dependency succeeded); its wait starts there. */
  readonly runnableSince: Millis | undefined;
  /** Estimated duration on a machine of speed 1. */
  readonly estimate: Millis;
  /** Longest estimated path from this step to any sink among unfinished steps, this step included. */
  readonly criticalPath: Millis;
  /** Effective admin bump: the highest bump of this step and of the unfinished steps that depend on it. */
  readonly bump: number;
  readonly jobsets: readonly string[];
  readonly createdAt: Millis;
}

export interface MachineView {
  readonly id: string;
  readonly systems: readonly string[];
  readonly supportedFeatures: readonly string[];
  readonly mandatoryFeatures: readonly string[];
  readonly maxJobs: number;
  readonly speedFactor: number;
  readonly running: readonly string[];
}

export interface QueueView {
  readonly system: string;
  readonly requiredFeatures: readonly string[];
  readonly runnable: number;
  /** Ids of the machines that can serve this queue. An empty list means the queue's steps wait. */
  readonly machines: readonly string[];
}

/** A decision: run `stepId` on `machineId` now. The scheduler already counts the slot as taken. */
export interface Assignment {
  readonly stepId: string;
  readonly machineId: string;
}

export type StepOutcome =
  | { readonly kind: "succeeded" }
  /** A failure worth retrying (lost connection, timeout of the transfer, out of disk…). */
  | { readonly kind: "transient-failure"; readonly reason?: string }
  /** The build itself failed: cached, dependents become depFailed until the failure is cleared. */
  | { readonly kind: "permanent-failure"; readonly reason?: string };

export interface FinishResult {
  readonly stepId: string;
  /** The step's state after the outcome: succeeded, backoff or failed. */
  readonly state: StepState;
  /** Steps that became runnable because this one succeeded. */
  readonly released: readonly string[];
  /** Steps that became depFailed because this one failed for good. */
  readonly depFailed: readonly string[];
  /** When a transient failure is retried: the step is runnable again from this time on. */
  readonly retryAt?: Millis;
}

/** Per-item result of a batch operation: every item gets one, none is skipped silently. */
export type ItemResult<T> =
  | { readonly id: string; readonly ok: true; readonly value: T }
  | { readonly id: string; readonly ok: false; readonly error: FerryError };

export interface CancelValue {
  /** Set when the step was running: the machine must abort it. */
  readonly abort?: Assignment;
  readonly depFailed: readonly string[];
}

export interface RestartValue {
  /** Steps that left failed/cancelled/depFailed (this one and, transitively, those it unblocked). */
  readonly requeued: readonly string[];
}

export interface SchedulerOptions {
  /** Transient failures: attempt k (1-based) that fails is retried after initialDelay × factor^(k-1), up to maxAttempts attempts. Hydra: 60 s, 3, 5. */
  readonly retry?: { readonly maxAttempts?: number; readonly initialDelayMs?: Millis; readonly backoffFactor?: number };
  /** Fair share counts build time of the last `shareWindowMs` (Hydra: 24 h). */
  readonly shareWindowMs?: Millis;
  /** Scheduling shares of a jobset not set with `setShares` (Hydra: 100). */
  readonly defaultShares?: number;
  /** Estimate of a step whose package was never measured. Default: the `unknownEstimateQuantile` of the measured durations, or 1 when nothing was measured (so the critical path counts steps: depth). */
  readonly defaultEstimateMs?: Millis;
  /**
   * Which quantile of the measured durations a never-measured package is assumed to take
   * (default 0.99). Durations are heavy-tailed, so the risks are lopsided: a new package that
   * turns out long but was started late stretches the whole run by its length, while one
   * started early that turns out short costs next to nothing. Assuming it long starts it (and
   * what it waits for) early, on the fastest machines.
   */
  readonly unknownEstimateQuantile?: number;
  /** Measured durations (on a machine of speed 1) of earlier builds, by package name. */
  readonly durations?: Iterable<readonly [string, Millis]>;
  /** `priority` (bump, fair share, critical path, age) or `fifo` (age only; a baseline for benchmarks). */
  readonly ordering?: "priority" | "fifo";
  /** Let a step whose chain would end sooner on a busy, faster machine wait for it (see Scheduler.dispatch). Default true. */
  readonly holdForFasterMachines?: boolean;
}

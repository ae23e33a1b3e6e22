/** The farm's build worker: `startWorker` runs one; the rest is its parts, exported for the CLI and tests. */
export { startWorker, type WorkerHandle, type WorkerOptions } from "./worker.js";
export { WorkerEmitter, type WorkerEvents } from "./events.js";
export { WorkerState } from "./state.js";
export { runStep, type StepContext, type StepOutcome } from "./step.js";
export {
  checkIdentity,
  DEFAULT_BACKOFF,
  farmSocketUrls,
  generatedWorkerId,
  helloOf,
  isTransientFailure,
  LogBuffer,
  nextDial,
  Outbox,
  planWelcome,
  reconnectDelay,
  workerSocketUrl,
  type BackoffPolicy,
  type DialPlan,
  type WelcomePlan,
  type WorkerIdentity,
} from "./policy.js";

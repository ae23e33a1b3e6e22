/**
 * The farm's scheduler: pure (no I/O, no clock), incremental (work per event), and its
 * decisions are values. See Scheduler for the contracts.
 */
export { Scheduler } from "./scheduler.js";
export { topoOrder } from "./graph.js";
export type {
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

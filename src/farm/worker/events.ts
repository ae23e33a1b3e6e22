/** Events of a farm worker; the CLI's progress lines and `--json` read these. */
import { TypedEmitter } from "../../core/events.js";

export interface WorkerEvents {
  /** Dialling the coordinator (`attempt` counts from 1 since the last welcome). */
  "worker:connecting": { url: string; attempt: number };
  /** Welcomed: leases of `kept` steps survive, `resent` results went out again, `aborted` builds were stopped. */
  "worker:connected": { url: string; id: string; kept: number; resent: number; aborted: number };
  /** The connection ended; builds keep running. */
  "worker:disconnected": { url: string; code: number; reason: string };
  "worker:retrying": { delayMs: number; failures: number; reason: string };
  "worker:redirected": { from: string; to: string };
  /** No new steps are taken; running ones finish and their results are delivered. */
  "worker:draining": { by: "coordinator" | "signal"; running: number; unacknowledged: number };
  "worker:drained": Record<string, never>;
  "step:started": { stepId: string; drvPath: string; name: string; attempt: number };
  "step:log": { stepId: string; name: string; line: string };
  "step:finished": {
    stepId: string;
    drvPath: string;
    name: string;
    status: "succeeded" | "failed";
    durationMs: number;
    transient?: boolean;
    error?: string;
    outputs?: Record<string, string>;
  };
  /** Killed at the coordinator's word (or because the lease was lost); no result is sent. */
  "step:aborted": { stepId: string; drvPath: string; name: string; reason: string };
  /** Not started: the worker is draining or already runs its maximum of jobs. */
  "step:refused": { stepId: string; drvPath: string; reason: string };
  "result:acknowledged": { stepId: string; accepted: boolean };
  /** A held result the coordinator no longer wants (its lease is gone). */
  "result:dropped": { stepId: string };
}

export class WorkerEmitter extends TypedEmitter<WorkerEvents> {}

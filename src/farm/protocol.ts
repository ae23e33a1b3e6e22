/**
 * The worker protocol: JSON text messages over one WebSocket per worker, which the worker dials
 * (`GET /api/worker`, `Authorization: Bearer <worker token>`), so workers behind NAT or a
 * firewall need no open port. Pure: message types and their validation, no I/O.
 *
 * A session:
 *   worker → hello      (who it is, what it builds, which steps it is still running)
 *   coord  → welcome    (lease and heartbeat periods, the farm cache, which running steps it keeps)
 *   coord  → build      (a step to build; the worker holds its lease while it heartbeats)
 *   worker → log        (build output, live, in order)
 *   worker → result     (resent until acknowledged, across reconnects)
 *   coord  → ack        (the result is recorded, or was refused because the lease was lost)
 *   worker → heartbeat  (load, free disk; renews every lease it holds)
 *   coord  → abort      (a cancelled step, or one whose lease the worker lost)
 *   coord  → drain / worker → drain (take no new steps, finish the running ones)
 * A coordinator that is not the scheduling leader answers hello with `redirect` to the leader,
 * or, while none leads (a takeover in progress), closes with 1013 (try again later).
 * Close codes: 4001 unauthorized, 4002 protocol error, 4003 redirect, 4004 replaced by a newer
 * connection of the same worker id.
 */
import { FerryError } from "../core/errors.js";

export const PROTOCOL_VERSION = 1;

export const CLOSE_UNAUTHORIZED = 4001;
export const CLOSE_PROTOCOL_ERROR = 4002;
export const CLOSE_REDIRECT = 4003;
export const CLOSE_REPLACED = 4004;

export interface Hello {
  readonly type: "hello";
  readonly protocol: number;
  /** Stable across restarts and reconnects (leases are held by this id). */
  readonly id: string;
  readonly systems: readonly string[];
  readonly features: readonly string[];
  readonly mandatoryFeatures: readonly string[];
  readonly maxJobs: number;
  readonly speedFactor: number;
  /** Steps the worker is still building (or has results for) from an earlier connection. */
  readonly running: readonly string[];
  readonly version?: string;
}

export interface Heartbeat {
  readonly type: "heartbeat";
  /** The 1-minute load average. */
  readonly load: number;
  readonly freeDiskBytes: number;
  readonly running: readonly string[];
}

export interface LogChunk {
  readonly type: "log";
  readonly stepId: string;
  readonly data: string;
}

export interface Result {
  readonly type: "result";
  readonly stepId: string;
  readonly status: "succeeded" | "failed";
  /** A failure worth retrying elsewhere (fetching inputs, uploading, out of disk), not the build's own. */
  readonly transient?: boolean;
  readonly error?: string;
  readonly durationMs: number;
  /** Output name → store path, for a success. */
  readonly outputs?: Readonly<Record<string, string>>;
}

export interface WorkerDrain {
  readonly type: "drain";
}

export type WorkerMessage = Hello | Heartbeat | LogChunk | Result | WorkerDrain;

export interface Welcome {
  readonly type: "welcome";
  readonly leaseMs: number;
  readonly heartbeatMs: number;
  /** The farm cache: inputs are substituted from it and outputs uploaded to it. */
  readonly cache: { readonly url: string; readonly token?: string; readonly publicKey?: string };
  /** Of the steps hello named, those whose lease the worker still holds (the others must stop). */
  readonly keep: readonly string[];
}

export interface BuildRequest {
  readonly type: "build";
  readonly stepId: string;
  readonly drvPath: string;
  readonly attempt: number;
  /** Kill the build after this long without finishing. */
  readonly timeoutSeconds?: number;
}

export interface Ack {
  readonly type: "ack";
  readonly stepId: string;
  /** False when the result came too late (the lease was lost); the worker forgets it either way. */
  readonly accepted: boolean;
}

export interface Abort {
  readonly type: "abort";
  readonly stepId: string;
  readonly reason: string;
}

export interface CoordinatorDrain {
  readonly type: "drain";
}

export interface Redirect {
  readonly type: "redirect";
  /** The farm URL of the coordinator that schedules. */
  readonly url: string;
}

export type CoordinatorMessage = Welcome | BuildRequest | Ack | Abort | CoordinatorDrain | Redirect;

function bad(message: string): FerryError {
  return new FerryError("FERRY_FARM_PROTOCOL", message, { hint: "the worker and the coordinator must run the same Ferry version" });
}

const isObj = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === "object" && !Array.isArray(v);
const isStr = (v: unknown): v is string => typeof v === "string" && v.length > 0 && v.length <= 4096;
const isStrs = (v: unknown): v is string[] => Array.isArray(v) && v.length <= 100_000 && v.every(isStr);
const isNum = (v: unknown, min = 0): v is number => typeof v === "number" && Number.isFinite(v) && v >= min;

/** Parses and checks a message from a worker; throws FERRY_FARM_PROTOCOL. */
export function parseWorkerMessage(text: string): WorkerMessage {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw bad("a worker message is not JSON");
  }
  if (!isObj(v)) throw bad("a worker message is not a JSON object");
  switch (v.type) {
    case "hello":
      if (v.protocol !== PROTOCOL_VERSION) throw bad(`the worker speaks protocol ${String(v.protocol)}, this coordinator ${PROTOCOL_VERSION}`);
      if (!isStr(v.id) || !/^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$/.test(v.id)) throw bad("hello: 'id' must be a name of letters, digits and . _ : @ -");
      if (!isStrs(v.systems) || v.systems.length === 0) throw bad("hello: 'systems' must name at least one system");
      if (!isStrs(v.features) || !isStrs(v.mandatoryFeatures)) throw bad("hello: 'features' and 'mandatoryFeatures' must be lists of names");
      if (!isNum(v.maxJobs, 1) || !Number.isInteger(v.maxJobs)) throw bad("hello: 'maxJobs' must be an integer ≥ 1");
      if (!isNum(v.speedFactor) || v.speedFactor <= 0) throw bad("hello: 'speedFactor' must be > 0");
      if (!isStrs(v.running)) throw bad("hello: 'running' must be a list of step ids");
      return v as unknown as Hello;
    case "heartbeat":
      if (!isNum(v.load) || !isNum(v.freeDiskBytes) || !isStrs(v.running)) throw bad("heartbeat: needs 'load', 'freeDiskBytes' and 'running'");
      return v as unknown as Heartbeat;
    case "log":
      if (!isStr(v.stepId) || typeof v.data !== "string") throw bad("log: needs 'stepId' and 'data'");
      return v as unknown as LogChunk;
    case "result":
      if (!isStr(v.stepId) || (v.status !== "succeeded" && v.status !== "failed") || !isNum(v.durationMs)) throw bad("result: needs 'stepId', 'status' and 'durationMs'");
      if (v.error !== undefined && typeof v.error !== "string") throw bad("result: 'error' must be text");
      if (v.outputs !== undefined && (!isObj(v.outputs) || !Object.values(v.outputs).every(isStr))) throw bad("result: 'outputs' must map names to store paths");
      return v as unknown as Result;
    case "drain":
      return { type: "drain" };
    default:
      throw bad(`unknown worker message type '${String(v.type)}'`);
  }
}

/** Parses and checks a message from the coordinator; throws FERRY_FARM_PROTOCOL. */
export function parseCoordinatorMessage(text: string): CoordinatorMessage {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw bad("a coordinator message is not JSON");
  }
  if (!isObj(v)) throw bad("a coordinator message is not a JSON object");
  switch (v.type) {
    case "welcome":
      if (!isNum(v.leaseMs, 1) || !isNum(v.heartbeatMs, 1) || !isObj(v.cache) || !isStr(v.cache.url) || !isStrs(v.keep)) throw bad("welcome: needs 'leaseMs', 'heartbeatMs', 'cache.url' and 'keep'");
      return v as unknown as Welcome;
    case "build":
      if (!isStr(v.stepId) || !isStr(v.drvPath) || !isNum(v.attempt)) throw bad("build: needs 'stepId', 'drvPath' and 'attempt'");
      return v as unknown as BuildRequest;
    case "ack":
      if (!isStr(v.stepId) || typeof v.accepted !== "boolean") throw bad("ack: needs 'stepId' and 'accepted'");
      return v as unknown as Ack;
    case "abort":
      if (!isStr(v.stepId) || typeof v.reason !== "string") throw bad("abort: needs 'stepId' and 'reason'");
      return v as unknown as Abort;
    case "drain":
      return { type: "drain" };
    case "redirect":
      if (!isStr(v.url)) throw bad("redirect: needs 'url'");
      return v as unknown as Redirect;
    default:
      throw bad(`unknown coordinator message type '${String(v.type)}'`);
  }
}

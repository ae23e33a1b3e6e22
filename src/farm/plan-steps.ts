/**
 * Which derivations of an evaluation the farm must build, with their edges. Every .drv of the
 * jobs' closures is read and parsed and every output is looked up in the store: for a jobset of
 * a hundred thousand packages that is seconds of work, so the coordinator does it on a thread
 * of its own (`planStepsOffThread`), and its event loop keeps serving workers and the API.
 */
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { FerryError, errorBody, fromErrorBody, type ErrorBody } from "../core/errors.js";
import type { StoreLocation } from "../store/config.js";
import { LocalStore } from "../store/local-store.js";
import { planBuild } from "../build/plan.js";
import { readStoreDerivation } from "../build/realise.js";
import type { EvalStep } from "./db/ingest.js";

/** The derivations the jobs `drvPaths` need built, with their edges (what is valid is left out). */
export function planSteps(store: LocalStore, drvPaths: readonly string[]): EvalStep[] {
  // planBuild reads each .drv once.
  const plan = planBuild(drvPaths, { readDerivation: (p) => readStoreDerivation(store, p), isValid: (p) => store.isValid(p) });
  return plan.nodes
    .filter((n) => n.kind === "build")
    .map((n) => ({
      drvPath: n.drvPath,
      name: n.name,
      system: n.drv.system,
      features: (n.drv.env.get("requiredSystemFeatures") ?? "").split(/\s+/).filter((f) => f !== ""),
      dependsOn: n.waitsFor,
    }));
}

/**
 * Steps cross from the planning thread in pieces of this many, each sent when the previous one
 * has been taken: the receiving thread reads one piece at a time (a few milliseconds), with
 * its event loop running in between, instead of all of them in one go.
 */
const STEPS_PER_MESSAGE = 5000;

type Reply = { t: "steps"; steps: EvalStep[] } | { t: "done" } | ({ t: "error" } & ErrorBody);
interface Job {
  readonly role: "plan-steps";
  readonly loc: StoreLocation;
  readonly drvPaths: readonly string[];
}

/**
 * `planSteps` on a thread of its own, with its own handle on the store at `loc`. The .drv files
 * must be valid (and rooted by the caller) while it runs. Errors keep their codes.
 */
export function planStepsOffThread(loc: StoreLocation, drvPaths: readonly string[]): Promise<EvalStep[]> {
  return new Promise((resolve, reject) => {
    const steps: EvalStep[] = [];
    let settled = false;
    const settle = (f: () => void) => {
      if (settled) return;
      settled = true;
      f();
    };
    const worker = new Worker(new URL(import.meta.url), { workerData: { role: "plan-steps", loc, drvPaths } satisfies Job });
    worker.on("message", (m: Reply) => {
      if (m.t === "steps") {
        for (const s of m.steps) steps.push(s);
        worker.postMessage("next");
      } else if (m.t === "done") settle(() => resolve(steps));
      else settle(() => reject(fromErrorBody(m)));
    });
    worker.on("error", (e) => settle(() => reject(e)));
    worker.on("exit", (code) => settle(() => reject(new Error(`the thread planning the evaluation's steps stopped with code ${code}`))));
  });
}

/** On the planning thread: the steps, or undefined once the error is reported. */
function planOrReport(port: NonNullable<typeof parentPort>, job: Job): EvalStep[] | undefined {
  let store: LocalStore | undefined;
  try {
    store = LocalStore.open(job.loc);
    return planSteps(store, job.drvPaths);
  } catch (e) {
    const fe = e instanceof FerryError ? e : new FerryError("FERRY_FARM_PLAN_FAILED", `planning the evaluation's steps failed: ${(e as Error).message}`);
    port.postMessage({ t: "error", ...errorBody(fe) } satisfies Reply);
    return undefined;
  } finally {
    store?.close();
  }
}

const job = workerData as Job | undefined;
if (!isMainThread && parentPort && job?.role === "plan-steps") {
  const port = parentPort;
  const steps = planOrReport(port, job);
  if (steps) {
    // One piece now, the next each time the receiver asks for it ("next"), then "done".
    let at = 0;
    const send = () => {
      if (at < steps.length) {
        port.postMessage({ t: "steps", steps: steps.slice(at, (at += STEPS_PER_MESSAGE)) } satisfies Reply);
        return;
      }
      port.postMessage({ t: "done" } satisfies Reply);
      port.close();
    };
    port.on("message", send);
    send();
  }
}

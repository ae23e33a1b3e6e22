/**
 * `ferry worker`: a build machine of the farm. It dials the coordinator (so it needs no open
 * port), builds the steps it is given in the sandbox, and runs until it is drained: by the
 * coordinator, or by SIGTERM/SIGINT (a second signal stops it at once, killing its builds).
 */
import { availableParallelism } from "node:os";
import { join, resolve } from "node:path";
import { Command, Option } from "commander";
import { FerryError } from "../../core/errors.js";
import { supportedSystems } from "../../build/systems.js";
import { checkIdentity, farmSocketUrls, startWorker, WorkerEmitter, WorkerState, type WorkerEvents } from "../../farm/worker/index.js";
import { withStore, withStoreOptions, type StoreFlags } from "../store-options.js";
import { note } from "../output.js";

interface WorkerFlags extends StoreFlags {
  farm: string;
  token?: string;
  id?: string;
  systems?: string;
  features: string;
  mandatoryFeatures: string;
  maxJobs: string;
  speedFactor: string;
  cores?: string;
  sandbox: boolean;
  workerStateDir?: string;
  printBuildLogs?: boolean;
  json?: boolean;
}

const list = (text: string): string[] => text.split(/[\s,]+/).filter((w) => w !== "");

function positive(text: string, flag: string, code: string, integer: boolean): number {
  const n = Number(text);
  if (text.trim() === "" || !Number.isFinite(n) || n <= 0 || (integer && (!Number.isInteger(n) || n > 4096))) {
    throw new FerryError(code, `${flag} must be ${integer ? "a whole number from 1 to 4096" : "a number greater than 0"}, not '${text}'`, {
      hint: integer ? `e.g. ${flag} 4` : `e.g. ${flag} 2.5 (how fast this machine is relative to the others)`,
    });
  }
  return n;
}

const secs = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

/** Progress on stderr in plain words; with --json every event as a JSON line on stdout. */
function attachProgress(events: WorkerEmitter, opts: { json: boolean; printBuildLogs: boolean }): void {
  if (opts.json) {
    events.onAny((name, payload) => process.stdout.write(JSON.stringify({ event: name, ...payload }) + "\n"));
    return;
  }
  const say = (s: string) => note(`ferry worker: ${s}`);
  let everConnected = false;
  let dialling = "";
  const on = <K extends keyof WorkerEvents>(name: K, fn: (p: WorkerEvents[K]) => void) => events.on(name, fn);
  on("worker:connecting", (e) => {
    // Once per URL: the first attempt, and each move to another coordinator of the farm.
    if (e.attempt === 1 || e.url !== dialling) say(`connecting to ${e.url}`);
    dialling = e.url;
  });
  on("worker:connected", (e) => {
    const n = (k: number, what: string) => `${k} ${what}${k === 1 ? "" : "s"}`;
    const extra = [e.kept ? `${n(e.kept, "running step")} kept` : "", e.resent ? `${n(e.resent, "result")} sent again` : "", e.aborted ? `${n(e.aborted, "build")} stopped (the lease was lost)` : ""].filter((x) => x);
    say(`${everConnected ? "reconnected" : "connected"} to ${e.url} as ${e.id}${extra.length ? ` (${extra.join(", ")})` : ""}`);
    everConnected = true;
  });
  on("worker:disconnected", (e) => say(`lost the connection to ${e.url} (${e.reason}); running builds continue`));
  on("worker:retrying", (e) => say(e.delayMs === 0 ? `trying the farm's next coordinator (${e.reason})` : `${everConnected ? "reconnecting" : "cannot reach the farm yet; trying again"} in ${secs(e.delayMs)} (${e.reason})`));
  on("worker:redirected", (e) => say(`redirected to ${e.to}`));
  on("worker:draining", (e) =>
    say(`draining: taking no new builds${e.running ? `, finishing ${e.running} running` : ""}${e.unacknowledged ? `, delivering ${e.unacknowledged} results` : ""}${e.by === "signal" ? " (signal again to stop at once)" : " (asked by the coordinator)"}`),
  );
  on("worker:drained", () => say("drained; exiting"));
  on("step:started", (e) => say(`building ${e.name}${e.attempt > 1 ? ` (attempt ${e.attempt})` : ""}`));
  on("step:log", (e) => {
    if (opts.printBuildLogs) note(`${e.name}> ${e.line}`);
  });
  on("step:finished", (e) => {
    if (e.status === "succeeded") say(`built ${e.name} in ${secs(e.durationMs)}`);
    else say(`FAILED ${e.name} after ${secs(e.durationMs)}: ${e.error ?? "unknown error"}${e.transient ? " (not the build's fault: it will be retried)" : ""}`);
  });
  on("step:aborted", (e) => say(`stopped ${e.name}: ${e.reason}`));
  on("step:refused", (e) => say(`refused step ${e.stepId}: ${e.reason}`));
  on("result:dropped", (e) => say(`dropped the result of step ${e.stepId}: the farm gave the step to another worker`));
}

async function run(f: WorkerFlags): Promise<void> {
  farmSocketUrls(f.farm);
  if (!f.token) throw new FerryError("FERRY_WORKER_NO_TOKEN", "the worker needs the farm's worker token", { hint: "pass --token or set FERRY_WORKER_TOKEN (the coordinator's --worker-token)" });
  const maxJobs = positive(f.maxJobs, "--max-jobs", "FERRY_WORKER_BAD_MAX_JOBS", true);
  const speedFactor = positive(f.speedFactor, "--speed-factor", "FERRY_WORKER_BAD_SPEED_FACTOR", false);
  const cores = f.cores === undefined ? Math.max(1, Math.floor(availableParallelism() / maxJobs)) : positive(f.cores, "--cores", "FERRY_WORKER_BAD_CORES", true);
  const systems = f.systems === undefined ? supportedSystems() : list(f.systems);

  await withStore(f, async (store) => {
    const state = new WorkerState(f.workerStateDir ? resolve(f.workerStateDir) : join(store.realStateDir, "worker"));
    const identity = checkIdentity({
      id: f.id ?? state.workerId(),
      systems,
      features: list(f.features),
      mandatoryFeatures: list(f.mandatoryFeatures),
      maxJobs,
      speedFactor,
      version: "0.1.0",
    });
    const events = new WorkerEmitter();
    attachProgress(events, { json: !!f.json, printBuildLogs: !!f.printBuildLogs });
    if (!f.json) note(`ferry worker: ${identity.id}: builds for ${identity.systems.join(", ")}, ${maxJobs} at a time${identity.features.length ? `, features ${identity.features.join(", ")}` : ""}${f.sandbox ? "" : ", WITHOUT the sandbox"}`);
    const worker = startWorker({ farm: f.farm, token: f.token!, identity, store, state, sandbox: f.sandbox, cores, events });
    let signals = 0;
    const onSignal = () => {
      if (++signals === 1) return worker.drain();
      if (signals > 2) process.exit(130);
      note("ferry worker: stopping now; running builds are killed");
      process.exitCode = 130;
      worker.stop();
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
    try {
      await worker.done;
    } finally {
      process.off("SIGINT", onSignal);
      process.off("SIGTERM", onSignal);
    }
  });
}

export function workerCommand(): Command {
  return withStoreOptions(new Command("worker"))
    .description("build steps for a farm: dial the coordinator, build in the sandbox, upload to the farm cache; SIGTERM drains")
    .addOption(new Option("--farm <url[,url...]>", "the coordinator's URL (http:// or https://); several coordinators of one farm (one database) comma-separated, tried in turn when one fails").env("FERRY_FARM").makeOptionMandatory())
    .addOption(new Option("--token <token>", "the farm's worker token").env("FERRY_WORKER_TOKEN"))
    .option("--id <id>", "this worker's name at the farm (default: generated once and kept in the worker state dir)")
    .option("--systems <list>", "systems to build for, comma-separated (default: this machine's, plus those qemu-user runs through binfmt)")
    .option("--features <list>", "system features this machine offers (e.g. kvm,big-parallel)", "")
    .option("--mandatory-features <list>", "features a step must ask for to be built here", "")
    .option("-j, --max-jobs <n>", "steps to build at once", "1")
    .option("--speed-factor <x>", "how fast this machine is relative to the others (the scheduler prefers faster ones)", "1")
    .option("--cores <n>", "CPU cores each build may use (default: the machine's cores / max-jobs)")
    .option("--no-sandbox", "run builders without isolation (only for builders you trust)")
    .option("--worker-state-dir <dir>", "where the worker keeps its id and undelivered results (default: STATE-DIR/worker)")
    .option("-L, --print-build-logs", "print the builds' output on stderr")
    .option("--json", "print worker events as JSON lines on stdout")
    .action(run);
}

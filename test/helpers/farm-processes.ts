/**
 * The farm as separate processes, as users run it: `ferry farm serve` and `ferry worker`
 * children of the test, which can be stopped politely or killed with SIGKILL.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { ferryBin } from "./cli.js";

export interface FarmProcess {
  readonly child: ChildProcess;
  readonly url: string;
  readonly stderr: () => string;
  stop(): Promise<number | null>;
  kill9(): Promise<void>;
}

const exited = (child: ChildProcess) => (child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : once(child, "exit").then(() => undefined));

/** Starts `ferry farm serve ARGS` and resolves with its URL once it serves. */
export async function spawnFarmServe(args: readonly string[]): Promise<FarmProcess> {
  const child = spawn(process.execPath, [ferryBin, "farm", "serve", ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let text = "";
  let err = "";
  child.stderr!.setEncoding("utf8").on("data", (s: string) => (err += s));
  const url = await new Promise<string>((resolve, reject) => {
    child.stdout!.setEncoding("utf8").on("data", (s: string) => {
      text += s;
      const m = /serving on (http:\/\/[^\s]+)/.exec(text);
      if (m) resolve(m[1]!);
    });
    child.on("exit", (code) => reject(new Error(`ferry farm serve exited ${code}: ${err}`)));
  });
  return handle(child, url, () => err);
}

/** Starts `ferry worker --farm URL ARGS` with the worker token in its environment. */
export function spawnFerryWorker(farm: string, token: string, args: readonly string[]): FarmProcess {
  const child = spawn(process.execPath, [ferryBin, "worker", "--farm", farm, ...args], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, FERRY_WORKER_TOKEN: token } });
  let err = "";
  child.stderr!.setEncoding("utf8").on("data", (s: string) => (err += s));
  child.stdout!.resume();
  return handle(child, farm, () => err);
}

function handle(child: ChildProcess, url: string, stderr: () => string): FarmProcess {
  return {
    child,
    url,
    stderr,
    stop: async () => {
      child.kill("SIGTERM");
      await exited(child);
      return child.exitCode;
    },
    kill9: async () => {
      child.kill("SIGKILL");
      await exited(child);
    },
  };
}

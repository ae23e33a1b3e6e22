/** Runs the built `ferry` command as a user would, capturing its output. */
import { spawnSync, spawn, type ChildProcess } from "node:child_process";
import { join } from "node:path";
import { repoRoot } from "./paths.js";

export const ferryBin = join(repoRoot, "dist", "src", "cli", "main.js");

export interface RunResult {
  readonly status: number | null;
  readonly stdout: Buffer;
  readonly stderr: string;
}

export function ferry(args: string[], opts: { input?: Uint8Array; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): RunResult {
  const r = spawnSync(process.execPath, [ferryBin, ...args], {
    input: opts.input,
    env: { ...process.env, ...opts.env },
    maxBuffer: 1 << 30,
    // A command that has not exited by then is stopped, and its status is null.
    ...(opts.timeoutMs ? { timeout: opts.timeoutMs } : {}),
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr.toString() };
}

/** Like `ferry`, but fails the test with the stderr text when the command fails. */
export function ferryOk(args: string[], opts: { input?: Uint8Array; env?: NodeJS.ProcessEnv } = {}): string {
  const r = ferry(args, opts);
  if (r.status !== 0) throw new Error(`ferry ${args.join(" ")} exited ${r.status}: ${r.stderr}`);
  return r.stdout.toString();
}

export function spawnFerry(args: string[]): ChildProcess {
  return spawn(process.execPath, [ferryBin, ...args], { stdio: ["ignore", "pipe", "pipe"] });
}

/** Store flags for a store whose files live under `root` (logical dirs /nix/store, /nix/var). */
export function nixStoreFlags(root: string): string[] {
  return ["--store-dir", "/nix/store", "--state-dir", "/nix/var", "--root", root];
}

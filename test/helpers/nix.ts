/**
 * Real Nix (Debian's nix-bin 2.8) as a test peer: an offline, private configuration so it never
 * waits on the network, and chroot stores (`--store DIR`) so every test has its own store.
 */
import { spawnSync, type SpawnSyncReturns } from "node:child_process";
import { mkdirSync, writeFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

let confDir: string | undefined;

export function nixEnv(): NodeJS.ProcessEnv {
  if (!confDir) {
    confDir = mkdtempSync(join(tmpdir(), "ferry-nixconf-"));
    writeFileSync(join(confDir, "nix.conf"), "substituters =\nexperimental-features = nix-command\nrequire-sigs = true\nsandbox = false\n");
  }
  const env: NodeJS.ProcessEnv = { ...process.env, NIX_CONF_DIR: confDir, NIX_USER_CONF_FILES: "/nonexistent" };
  delete env.NIX_REMOTE;
  return env;
}

export function haveNix(): boolean {
  return spawnSync("nix-store", ["--version"], { encoding: "utf8" }).status === 0;
}

/** Runs a Nix command; throws with its stderr when it fails. */
export function nix(cmd: string, args: string[], input?: Uint8Array): Buffer {
  const r: SpawnSyncReturns<Buffer> = spawnSync(cmd, args, { env: nixEnv(), input, maxBuffer: 1 << 30 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr.toString()}`);
  return r.stdout;
}

/** A fresh chroot store root (store dir stays /nix/store; files live under the root). */
export function nixChroot(parent: string): string {
  const d = join(parent, `nixroot-${Math.random().toString(36).slice(2)}`);
  mkdirSync(d, { recursive: true });
  return d;
}

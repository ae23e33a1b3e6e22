/**
 * How a builder process is started: the command line, as a value. With the sandbox, the
 * builder runs under bubblewrap in fresh namespaces and sees only its input closure (read-only,
 * at their store paths), a writable store dir for its outputs, its build directory at /build,
 * a private /tmp, minimal /proc and /dev, and the host paths it declared (read-only). The
 * network is cut off except for fixed-output derivations, whose result is checked by hash.
 */
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import { dirname, resolve as resolvePath } from "node:path";
import { FerryError } from "../core/errors.js";

export const SANDBOX_BUILD_DIR = "/build";

export interface SandboxSpec {
  /** Logical store dir the builder sees its inputs and outputs under. */
  readonly storeDir: string;
  /** Real, writable directory mounted at storeDir: the builder creates its outputs there. */
  readonly outputStoreReal: string;
  /** Input closure: logical store path -> real location. */
  readonly inputs: readonly { readonly logical: string; readonly real: string }[];
  /** Real build directory, mounted at /build. */
  readonly buildDirReal: string;
  /** Host paths made visible read-only at the same place (e.g. /usr, /bin for declared host tools). */
  readonly hostPaths: readonly string[];
  /** Files to place in the sandbox (e.g. /etc/passwd), real path -> sandbox path. */
  readonly files: readonly { readonly real: string; readonly at: string }[];
  readonly network: boolean;
  readonly builder: string;
  readonly args: readonly string[];
}

/** The bwrap argument vector that runs the builder as `spec` says. */
export function bwrapArgs(spec: SandboxSpec): string[] {
  const a: string[] = [
    "--unshare-all",
    ...(spec.network ? ["--share-net"] : []),
    "--die-with-parent",
    "--new-session",
    "--hostname", "localhost",
    "--uid", "1000",
    "--gid", "100",
    "--proc", "/proc",
    "--dev", "/dev",
    "--tmpfs", "/tmp",
  ];
  a.push(...hostMounts(spec.hostPaths));
  a.push("--bind", spec.outputStoreReal, spec.storeDir);
  for (const i of spec.inputs) a.push("--ro-bind", i.real, i.logical);
  a.push("--bind", spec.buildDirReal, SANDBOX_BUILD_DIR);
  for (const f of spec.files) a.push("--ro-bind", f.real, f.at);
  if (spec.network && fs.existsSync("/etc/resolv.conf")) a.push("--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf");
  a.push("--chdir", SANDBOX_BUILD_DIR, "--", spec.builder, ...spec.args);
  return a;
}

/**
 * How `hostPaths` appear in the sandbox: each bound read-only, or, when it is a symlink into
 * another of them (the merged /usr of current distributions: /bin → usr/bin), the same symlink,
 * which costs bubblewrap no mount (each mount makes it re-read the mount table, so every one
 * counts for each build). Paths that do not exist are left out. Host layouts do not change
 * while Ferry runs, so each list is looked at once.
 */
function hostMounts(hostPaths: readonly string[]): readonly string[] {
  const known = hostMountsOf.get(hostPaths);
  if (known) return known;
  const isDir = (d: string) => fs.lstatSync(d, { throwIfNoEntry: false })?.isDirectory() === true;
  const a: string[] = [];
  for (const h of hostPaths) {
    const st = fs.lstatSync(h, { throwIfNoEntry: false });
    if (!st) continue;
    if (st.isSymbolicLink()) {
      const target = fs.readlinkSync(h);
      const resolved = resolvePath(dirname(h), target);
      if (hostPaths.some((d) => d !== h && (resolved === d || resolved.startsWith(d + "/")) && isDir(d))) {
        a.push("--symlink", target, h);
        continue;
      }
      if (!fs.existsSync(h)) continue; // dangling
    }
    a.push("--ro-bind", h, h);
  }
  hostMountsOf.set(hostPaths, a);
  return a;
}

const hostMountsOf = new WeakMap<readonly string[], readonly string[]>();

let bwrapChecked: { ok: boolean; why?: string } | undefined;

/** The absolute path of bwrap (the builder's PATH is not the caller's). */
export function bwrapPath(): string {
  if (process.env.FERRY_BWRAP) return process.env.FERRY_BWRAP;
  for (const d of (process.env.PATH ?? "/usr/bin:/bin").split(":")) {
    const p = `${d}/bwrap`;
    if (d && fs.existsSync(p)) return p;
  }
  return "/usr/bin/bwrap";
}

/** Whether bubblewrap is installed and can make the namespaces it needs here. */
export function sandboxAvailable(): { ok: boolean; why?: string } {
  if (bwrapChecked) return bwrapChecked;
  const r = spawnSync(bwrapPath(), ["--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"], { encoding: "utf8" });
  if (r.error) bwrapChecked = { ok: false, why: `bubblewrap (${bwrapPath()}) is not installed` };
  else if (r.status !== 0) bwrapChecked = { ok: false, why: `bubblewrap cannot create namespaces here: ${r.stderr.trim()}` };
  else bwrapChecked = { ok: true };
  return bwrapChecked;
}

export function requireSandbox(): void {
  const s = sandboxAvailable();
  if (!s.ok) {
    throw new FerryError("FERRY_BUILD_NO_SANDBOX", `cannot build in a sandbox: ${s.why}`, {
      hint: "install bubblewrap (apt-get install bubblewrap), or build without isolation with --no-sandbox if you trust every builder",
    });
  }
}

/** Host directories that declared host tools need (the tools, their libraries and loader). */
export const HOST_TOOL_PATHS: readonly string[] = ["/bin", "/usr", "/lib", "/lib64", "/lib32", "/libx32", "/etc/ld.so.cache", "/etc/alternatives"];

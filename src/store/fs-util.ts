/** Small filesystem helpers the store relies on: tree removal, fsync, canonical permissions. */
import * as fs from "node:fs";
import { createRequire } from "node:module";
import { FerryError } from "../core/errors.js";
import { join } from "node:path";
import type { ChildProcessByStdio } from "node:child_process";
import type { Readable, Writable } from "node:stream";

/** node:child_process, loaded when a sync first needs it (commands that never sync do not pay for it). */
const childProcess = (): typeof import("node:child_process") => createRequire(import.meta.url)("node:child_process") as typeof import("node:child_process");

/** Removes a tree even where Ferry made its directories read-only. Missing paths are fine. */
export function removeTree(path: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return;
    throw e;
  }
  if (st.isDirectory()) {
    if ((st.mode & 0o700) !== 0o700) fs.chmodSync(path, 0o700);
    for (const name of fs.readdirSync(path)) removeTree(join(path, name));
    fs.rmdirSync(path);
  } else {
    fs.unlinkSync(path);
  }
}

export function fsyncPath(path: string): void {
  const fd = fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Writes a file atomically: temporary name beside it, fsync, rename, fsync of the directory. */
export function writeFileAtomic(path: string, data: string | Uint8Array, mode = 0o644): void {
  const dir = path.slice(0, path.lastIndexOf("/")) || "/";
  const tmp = `${path}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
  const fd = fs.openSync(tmp, "w", mode);
  try {
    fs.writeSync(fd, typeof data === "string" ? Buffer.from(data) : data);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  try {
    fs.renameSync(tmp, path);
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    throw e;
  }
  fsyncPath(dir);
}

/** True when a process with this pid exists (it may belong to another user). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Writes all of `data` to a file descriptor, waiting out EAGAIN on non-blocking pipes. */
export function writeAllSync(fd: number, data: Uint8Array): void {
  let off = 0;
  while (off < data.length) {
    try {
      off += fs.writeSync(fd, data, off, data.length - off);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EAGAIN") throw e;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 2);
    }
  }
}

export const randomSuffix = (): string => `${process.pid}-${Math.random().toString(36).slice(2, 10)}`;

/**
 * Makes everything written to the filesystem holding `dir` durable (syncfs(2), through
 * coreutils' `sync -f`): one call for a batch of files.
 */
export function syncFilesystem(dir: string): void {
  const r = childProcess().spawnSync("sync", ["-f", dir]);
  if (r.status !== 0) throw syncError(dir, r.stderr?.toString() || r.error?.message || `exit code ${r.status}`);
}

/** `syncFilesystem` without blocking the thread, for a one-off sync. */
export function syncFilesystemAsync(dir: string): Promise<void> {
  return new Promise((resolve, reject) => {
    childProcess().execFile("sync", ["-f", dir], (e, _out, stderr) => (e ? reject(syncError(dir, String(stderr).trim() || e.message)) : resolve()));
  });
}

/**
 * Like `syncFilesystem`, without blocking the thread: the syncs run in one long-lived shell, so
 * a writer that syncs every batch starts one process, not one per sync. A sync asked for while
 * one runs waits for the next, which serves every request made meanwhile (a sync covers all
 * writes made before it starts); `close` ends the shell.
 */
export class FileSystemSyncer {
  readonly #dir: string;
  #child: ChildProcessByStdio<Writable, Readable, null> | undefined;
  /** The requests the running sync serves (undefined: none runs), and those for the next one. */
  #running: SyncRequest[] | undefined;
  #next: SyncRequest[] = [];
  #out = "";
  #runs = 0;

  constructor(dir: string) {
    this.#dir = dir;
  }

  /** How many syncs have been started (requests made while one runs share the next). */
  get runs(): number {
    return this.#runs;
  }

  sync(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#next.push({ resolve, reject });
      if (!this.#running) this.#begin();
    });
  }

  close(): void {
    this.#child?.stdin.end();
    this.#child = undefined;
  }

  #begin(): void {
    const child = (this.#child ??= this.#start());
    this.#running = this.#next;
    this.#next = [];
    this.#runs++;
    child.stdin.write("\n");
  }

  #start(): ChildProcessByStdio<Writable, Readable, null> {
    // One line in, one line out: "ok", or "fail" and sync's own message.
    const script = 'while read -r _; do if e=$(sync -f "$1" 2>&1); then echo ok; else printf "fail %s\\n" "$(echo $e)"; fi; done';
    const child = childProcess().spawn("sh", ["-c", script, "sh", this.#dir], { stdio: ["pipe", "pipe", "ignore"] });
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (d: string) => {
      this.#out += d;
      for (let nl = this.#out.indexOf("\n"); nl >= 0; nl = this.#out.indexOf("\n")) {
        const line = this.#out.slice(0, nl);
        this.#out = this.#out.slice(nl + 1);
        const served = this.#running ?? [];
        this.#running = undefined;
        if (line === "ok") for (const r of served) r.resolve();
        else for (const r of served) r.reject(syncError(this.#dir, line.replace(/^fail /, "") || "sync failed"));
        if (this.#next.length) this.#begin();
      }
    });
    const fail = (why: string) => {
      const all = [...(this.#running ?? []), ...this.#next.splice(0)];
      this.#running = undefined;
      for (const r of all) r.reject(syncError(this.#dir, why));
      if (this.#child === child) this.#child = undefined;
    };
    child.on("error", (e) => fail(e.message));
    child.on("exit", (code, signal) => fail(`the sync process stopped (${signal ?? `exit code ${code}`})`));
    child.stdin.on("error", () => undefined); // reported by "exit"
    return child;
  }
}

interface SyncRequest {
  resolve(): void;
  reject(e: Error): void;
}

function syncError(dir: string, why: string): FerryError {
  return new FerryError("FERRY_STORE_SYNC", `could not sync the file system of ${dir}: ${why}`);
}

/** True when something (a dangling symlink included) is at `p`; never follows a link. */
export function pathExists(p: string): boolean {
  return fs.lstatSync(p, { throwIfNoEntry: false }) !== undefined;
}

/** True when `p` is a symbolic link. */
export function isSymlink(p: string): boolean {
  return fs.lstatSync(p, { throwIfNoEntry: false })?.isSymbolicLink() ?? false;
}

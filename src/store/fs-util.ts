/** Small filesystem helpers the store relies on: tree removal, fsync, canonical permissions. */
import * as fs from "node:fs";
import { createRequire } from "node:module";
import { FerryError } from "../core/errors.js";
import { join } from "node:path";

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

/** Like `syncFilesystem`, without blocking the thread while the sync runs. */
export function syncFilesystemAsync(dir: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = childProcess().spawn("sync", ["-f", dir], { stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.on("error", (e) => reject(syncError(dir, e.message)));
    child.on("close", (code) => (code === 0 ? resolve() : reject(syncError(dir, stderr || `exit code ${code}`))));
  });
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

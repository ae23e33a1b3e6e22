/**
 * A binary cache in a directory (`file://DIR`, `ferry cache serve --dir DIR`): the layout Nix's
 * `file://` store writes, so either tool can read what the other wrote. Writes go to a
 * temporary file in `DIR/.ferry-tmp`, are fsync'ed and renamed into place; readers never see
 * a partial object. A write returns once its rename is durable too: the directory is fsync'ed
 * off the event loop, one fsync for all the renames into a directory made while the previous
 * one ran (group commit), so many writers share a few directory syncs. Many small objects
 * can be staged together instead (`stage`): one file-system sync for all of them.
 */
import * as fs from "node:fs";
import { join, dirname } from "node:path";
import { Readable } from "node:stream";
import { FerryError } from "../core/errors.js";
import { checkRelativeKey } from "../core/cache-layout.js";
import type { ByteRange, CacheBackend, ObjectInfo, ReadResult, StageItem, StagedObjects, WriteOptions } from "./backend.js";
import { fsyncPath, randomSuffix, syncFilesystemAsync, writeAllSync } from "../store/fs-util.js";

const TMP_DIR = ".ferry-tmp";
/** A temporary file this old was left by a process that died. */
const STALE_TMP_MS = 24 * 3600 * 1000;

function ioError(e: unknown, what: string): FerryError {
  if (e instanceof FerryError) return e;
  const code = (e as NodeJS.ErrnoException).code;
  return new FerryError(code === "EACCES" || code === "EPERM" ? "FERRY_CACHE_DENIED" : "FERRY_CACHE_IO", `${what}: ${(e as Error).message}`, {
    hint: code === "ENOSPC" ? "the cache's disk is full; run `ferry cache gc` or free space" : "check the cache directory's permissions and free space",
    cause: e,
  });
}

export function tooLarge(maxBytes: number): FerryError {
  return new FerryError("FERRY_CACHE_TOO_LARGE", `the object is larger than the limit of ${maxBytes} bytes`, {
    hint: "raise the server's --max-upload-size if such objects are expected",
  });
}

export function etagOf(st: { size: number; mtimeMs: number; ino?: number }): string {
  return `"${Math.floor(st.mtimeMs).toString(16)}-${st.size.toString(16)}${st.ino ? `-${st.ino.toString(16)}` : ""}"`;
}

/**
 * Durable renames into directories, shared: `sync(dir)` resolves after an fsync of `dir` that
 * began after the call. Callers that arrive while one runs share the next.
 */
class DirectorySyncs {
  readonly #dirs = new Map<string, { running?: Promise<void>; next?: Promise<void> }>();

  sync(dir: string): Promise<void> {
    let d = this.#dirs.get(dir);
    if (!d) this.#dirs.set(dir, (d = {}));
    const state = d;
    if (state.next) return state.next;
    const next = (async () => {
      await state.running?.catch(() => undefined);
      // From here on, callers wait for the sync after this one.
      state.next = undefined;
      const run = fsyncDirectory(dir);
      state.running = run;
      try {
        await run;
      } finally {
        if (state.running === run) state.running = undefined;
        if (!state.running && !state.next) this.#dirs.delete(dir);
      }
    })();
    state.next = next;
    return next;
  }
}

async function fsyncDirectory(dir: string): Promise<void> {
  const fh = await fs.promises.open(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export class FileBackend implements CacheBackend {
  readonly url: string;
  readonly root: string;
  readonly #dirSyncs = new DirectorySyncs();
  /** Directories known to exist (made or seen by this process); one that vanished is made again. */
  readonly #dirs = new Set<string>();

  constructor(root: string) {
    this.root = root;
    this.url = `file://${root}`;
  }

  /**
   * Opens (creating) the directory. Temporary files older than a day are removed: what a
   * process that died while writing or staging left (a live writer's files are newer).
   */
  static open(root: string): FileBackend {
    const tmpDir = join(root, TMP_DIR);
    try {
      fs.mkdirSync(tmpDir, { recursive: true });
    } catch (e) {
      throw ioError(e, `cannot create the cache directory ${root}`);
    }
    const before = Date.now() - STALE_TMP_MS;
    try {
      for (const name of fs.readdirSync(tmpDir)) {
        const p = join(tmpDir, name);
        const st = fs.lstatSync(p, { throwIfNoEntry: false });
        if (st && st.mtimeMs < before) fs.rmSync(p, { force: true, recursive: true });
      }
    } catch {
      /* leftovers are only disk space: never a reason not to open the cache */
    }
    return new FileBackend(root);
  }

  #path(key: string): string {
    return join(this.root, checkRelativeKey(key));
  }

  #info(key: string, st: fs.Stats): ObjectInfo {
    return { key, size: st.size, etag: etagOf(st), mtimeMs: st.mtimeMs };
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    const p = this.#path(key);
    try {
      const st = await fs.promises.stat(p);
      return st.isFile() ? this.#info(key, st) : undefined;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT" || (e as NodeJS.ErrnoException).code === "ENOTDIR") return undefined;
      throw ioError(e, `cannot read ${key} in ${this.url}`);
    }
  }

  async read(key: string, range?: ByteRange): Promise<ReadResult | undefined> {
    const p = this.#path(key);
    let fh: fs.promises.FileHandle;
    try {
      fh = await fs.promises.open(p, "r");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT" || (e as NodeJS.ErrnoException).code === "ENOTDIR") return undefined;
      throw ioError(e, `cannot read ${key} in ${this.url}`);
    }
    try {
      const st = await fh.stat();
      if (!st.isFile()) {
        await fh.close();
        return undefined;
      }
      const start = range?.start ?? 0;
      const end = Math.min(range?.end ?? st.size - 1, st.size - 1);
      if (start > end) {
        // At or past the end (createReadStream refuses an end before its start).
        await fh.close();
        return { info: this.#info(key, st), body: Readable.from([]), start };
      }
      const body = fh.createReadStream({ start, end, highWaterMark: 256 * 1024, autoClose: true });
      return { info: this.#info(key, st), body, start };
    } catch (e) {
      await fh.close();
      throw ioError(e, `cannot read ${key} in ${this.url}`);
    }
  }

  async readBytes(key: string): Promise<Uint8Array | undefined> {
    try {
      return await fs.promises.readFile(this.#path(key));
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === "ENOENT" || code === "ENOTDIR" || code === "EISDIR") return undefined;
      throw ioError(e, `cannot read ${key} in ${this.url}`);
    }
  }

  async write(key: string, body: Uint8Array | AsyncIterable<Uint8Array>, opts: WriteOptions = {}): Promise<ObjectInfo> {
    const final = this.#path(key);
    const tmp = join(this.root, TMP_DIR, `${randomSuffix()}-${key.replace(/\//g, "_")}`);
    let fh: fs.promises.FileHandle | undefined;
    try {
      fh = await this.#inDir(join(this.root, TMP_DIR), () => fs.promises.open(tmp, "wx", 0o644));
      let size = 0;
      const put = async (c: Uint8Array) => {
        size += c.length;
        if (opts.maxBytes !== undefined && size > opts.maxBytes) throw tooLarge(opts.maxBytes);
        let off = 0;
        while (off < c.length) off += (await fh!.write(c, off, c.length - off)).bytesWritten;
      };
      if (body instanceof Uint8Array) await put(body);
      else for await (const c of body) await put(c);
      await fh.sync();
      // The rename keeps the inode, size and mtime: the object's info is the temporary file's.
      const st = await fh.stat();
      await fh.close();
      fh = undefined;
      await this.#inDir(dirname(final), () => fs.promises.rename(tmp, final));
      await this.#dirSyncs.sync(dirname(final));
      return this.#info(key, st);
    } catch (e) {
      await fh?.close().catch(() => undefined);
      await fs.promises.rm(tmp, { force: true });
      throw ioError(e, `cannot write ${key} to ${this.url}`);
    }
  }

  /**
   * Stages small objects for `publish`: each is written whole under a temporary name (in one go:
   * they are small), then one sync of the file system makes them all durable, where `write`
   * would fsync each. Publishing renames them into place and fsyncs each directory once.
   * (syncfs reports a failed writeback from Linux 5.8 on; Debian 12 has 6.1.)
   */
  async stage(items: readonly StageItem[]): Promise<StagedObjects> {
    const tmpDir = join(this.root, TMP_DIR);
    type Staged = { tmp: string; final: string; info?: ObjectInfo };
    const staged = new Map<string, Staged>();
    const published = new Map<string, ObjectInfo>();
    // Removal is best effort: it must not hide the error that made it necessary (what it
    // misses, open() removes a day later).
    const removeStaged = () => {
      for (const s of staged.values()) {
        try {
          fs.rmSync(s.tmp, { force: true });
        } catch {
          /* left for open() */
        }
      }
      staged.clear();
    };
    try {
      for (const it of items) {
        if (staged.has(it.key)) continue; // one object per key
        const s: Staged = { tmp: join(tmpDir, `${randomSuffix()}-${it.key.replace(/\//g, "_")}`), final: this.#path(it.key) };
        staged.set(it.key, s); // before it exists: a failure removes it
        const fd = this.#inDirSync(tmpDir, () => fs.openSync(s.tmp, "wx", 0o644));
        try {
          writeAllSync(fd, it.body);
          s.info = this.#info(it.key, fs.fstatSync(fd));
        } finally {
          fs.closeSync(fd);
        }
      }
      if (staged.size) await syncFilesystemAsync(this.root);
    } catch (e) {
      removeStaged();
      throw ioError(e, `cannot stage ${items.length} objects in ${this.url}`);
    }
    return {
      publish: async (keys) => {
        const infos: ObjectInfo[] = [];
        const dirs = new Set<string>();
        try {
          for (const key of keys) {
            const again = published.get(key);
            if (again) {
              infos.push(again);
              continue;
            }
            const s = staged.get(key);
            if (!s) throw new Error(`${key} is not staged`);
            const dir = dirname(s.final);
            // The rename keeps the inode, size and mtime: the object's info is the staged file's.
            this.#inDirSync(dir, () => fs.renameSync(s.tmp, s.final));
            staged.delete(key);
            published.set(key, s.info!);
            dirs.add(dir);
            infos.push(s.info!);
          }
          for (const d of dirs) fsyncPath(d);
        } catch (e) {
          throw ioError(e, `cannot publish ${keys.length} objects in ${this.url}`);
        }
        return infos;
      },
      discard: async () => removeStaged(),
    };
  }

  /** `#inDir` for a synchronous `op`: makes `dir` first unless it is known to exist, and again if `op` finds it missing. */
  #inDirSync<T>(dir: string, op: () => T): T {
    if (!this.#dirs.has(dir)) {
      fs.mkdirSync(dir, { recursive: true });
      this.#dirs.add(dir);
    }
    try {
      return op();
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
      fs.mkdirSync(dir, { recursive: true });
      return op();
    }
  }

  /** Runs `op`, which needs `dir` to exist; makes the directory first when it is not known to exist, or when `op` says it is missing. */
  async #inDir<T>(dir: string, op: () => Promise<T>): Promise<T> {
    if (!this.#dirs.has(dir)) {
      await fs.promises.mkdir(dir, { recursive: true });
      this.#dirs.add(dir);
    }
    try {
      return await op();
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
      this.#dirs.delete(dir);
      await fs.promises.mkdir(dir, { recursive: true });
      this.#dirs.add(dir);
      return op();
    }
  }

  async delete(key: string): Promise<boolean> {
    try {
      await fs.promises.unlink(this.#path(key));
      return true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return false;
      throw ioError(e, `cannot delete ${key} in ${this.url}`);
    }
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const walk = async function* (this: FileBackend, rel: string): AsyncIterable<ObjectInfo> {
      let entries: fs.Dirent[];
      try {
        entries = await fs.promises.readdir(join(this.root, rel), { withFileTypes: true });
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === "ENOENT") return;
        throw ioError(e, `cannot list ${this.url}`);
      }
      for (const d of entries) {
        if (d.name.startsWith(".")) continue;
        const key = rel === "" ? d.name : `${rel}/${d.name}`;
        if (d.isDirectory()) {
          if (prefix.startsWith(`${key}/`) || key.startsWith(prefix) || `${key}/`.startsWith(prefix)) yield* walk.call(this, key);
        } else if (d.isFile() && key.startsWith(prefix)) {
          try {
            yield this.#info(key, await fs.promises.stat(join(this.root, key)));
          } catch (e) {
            if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw ioError(e, `cannot list ${this.url}`);
          }
        }
      }
    };
    yield* walk.call(this, "");
  }

  async close(): Promise<void> {}
}

/**
 * Unpacks a NAR onto disk. The whole object is built under a temporary name beside the
 * destination and renamed into place only once it is complete: a failed unpack leaves nothing.
 *
 * Nothing outside the destination can be written: every node is created fresh inside a
 * directory this unpack itself made (O_EXCL, mkdir), entry names are validated by the parser
 * (no '/', '.', '..', NUL; no duplicates), and symlinks from the archive are created, never
 * followed.
 */
import * as fs from "node:fs";
import { dirname, basename, join } from "node:path";
import { NarParser, type NarEvent, type NarParserLimits } from "../core/nar/parser.js";
import { FerryError } from "../core/errors.js";
import { pathExists, removeTree, randomSuffix } from "./fs-util.js";

const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;
const SLASH = Buffer.from("/");

export interface RestoreOptions {
  /** Canonical store modes (0444/0555, mtime 1) instead of 0644/0755. */
  readonly canonical?: boolean;
  /** fsync every file and directory before the final rename. */
  readonly fsync?: boolean;
}

/**
 * Receives NAR events and writes the tree at `tmpPath`. Call `abort()` on any failure; after
 * `finish()` the object is complete at `tmpPath` and the caller renames it.
 */
export class NarRestorer {
  readonly tmpPath: string;
  readonly #root: Buffer;
  readonly #opts: RestoreOptions;
  #fd: number | undefined;
  #fileExec = false;
  #filePath: Buffer | undefined;
  readonly #dirs: Buffer[] = [];

  constructor(tmpPath: string, opts: RestoreOptions = {}) {
    this.tmpPath = tmpPath;
    this.#root = Buffer.from(tmpPath);
    this.#opts = opts;
  }

  #at(path: readonly Uint8Array[]): Buffer {
    if (path.length === 0) return this.#root;
    const parts: Buffer[] = [this.#root];
    for (const p of path) parts.push(SLASH, Buffer.from(p.buffer, p.byteOffset, p.byteLength));
    return Buffer.concat(parts);
  }

  onEvent = (e: NarEvent): void => {
    try {
      this.#apply(e);
    } catch (err) {
      if (err instanceof FerryError) throw err;
      const code = (err as NodeJS.ErrnoException).code;
      throw new FerryError("FERRY_RESTORE_FAILED", `cannot unpack the archive here: ${(err as Error).message}`, {
        hint: code === "ENAMETOOLONG" ? "the archive has a name longer than this file system allows" : "check free space and permissions of the destination",
        cause: err,
      });
    }
  };

  #apply(e: NarEvent): void {
    switch (e.kind) {
      case "directory": {
        const p = this.#at(e.path);
        fs.mkdirSync(p, { mode: 0o700 });
        this.#dirs.push(p);
        return;
      }
      case "directory-end":
        return;
      case "regular": {
        const p = this.#at(e.path);
        this.#fd = fs.openSync(p, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
        this.#fileExec = e.executable;
        this.#filePath = p;
        return;
      }
      case "contents": {
        let off = 0;
        while (off < e.data.length) off += fs.writeSync(this.#fd!, e.data, off, e.data.length - off);
        return;
      }
      case "regular-end": {
        const fd = this.#fd!;
        this.#fd = undefined;
        try {
          fs.fchmodSync(fd, this.#mode(this.#fileExec));
          if (this.#opts.canonical) fs.futimesSync(fd, 1, 1);
          if (this.#opts.fsync) fs.fsyncSync(fd);
        } finally {
          fs.closeSync(fd);
        }
        this.#filePath = undefined;
        return;
      }
      case "symlink": {
        const p = this.#at(e.path);
        fs.symlinkSync(Buffer.from(e.target), p);
        if (this.#opts.canonical) fs.lutimesSync(p, 1, 1);
        return;
      }
    }
  }

  #mode(exec: boolean): number {
    if (this.#opts.canonical) return exec ? 0o555 : 0o444;
    return exec ? 0o755 : 0o644;
  }

  /** Seals directories (deepest first) and syncs them. */
  finish(): void {
    for (const d of this.#dirs.reverse()) {
      fs.chmodSync(d, this.#opts.canonical ? 0o555 : 0o755);
      if (this.#opts.canonical) fs.utimesSync(d, 1, 1);
      if (this.#opts.fsync) {
        const fd = fs.openSync(d, fs.constants.O_RDONLY);
        fs.fsyncSync(fd);
        fs.closeSync(fd);
      }
    }
  }

  abort(): void {
    if (this.#fd !== undefined) {
      fs.closeSync(this.#fd);
      this.#fd = undefined;
    }
    void this.#filePath;
    removeTree(this.tmpPath);
  }
}

/** Unpacks a NAR stream to `dest`, which must not exist yet (like `nix-store --restore`). */
export async function restoreNar(source: AsyncIterable<Uint8Array>, dest: string, limits: NarParserLimits = {}): Promise<void> {
  if (pathExists(dest)) {
    throw new FerryError("FERRY_RESTORE_EXISTS", `'${dest}' already exists`, { hint: "restore into a path that does not exist yet" });
  }
  const tmp = join(dirname(dest), `.${basename(dest)}.ferry-tmp-${randomSuffix()}`);
  const r = new NarRestorer(tmp);
  const p = new NarParser(r.onEvent, limits);
  try {
    for await (const chunk of source) p.push(chunk);
    p.end();
    r.finish();
    fs.renameSync(tmp, dest);
  } catch (e) {
    r.abort();
    throw e;
  }
}

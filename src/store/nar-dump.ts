/**
 * The NAR of a filesystem object, streamed from disk (SPEC §2), optionally copied on the way.
 *
 * Speed: the walk is synchronous (a syscall costs a few microseconds; promises would cost more
 * than the work), directory listings come with file types so only regular files are stat'ed
 * (through the open descriptor), small files are read straight into the writer's batch buffer,
 * and the hash sees large batches. Memory is one batch buffer plus one read buffer, whatever
 * the size of the tree.
 */
import * as fs from "node:fs";
import { createHasher, type HashAlgo } from "../core/digest.js";
import { FerryError } from "../core/errors.js";
import { makeHash, type Hash } from "../core/hash.js";
import { NarWriter, type NarSink } from "../core/nar/writer.js";
import { compareBytes } from "../core/nar/names.js";

const { O_RDONLY, O_NOFOLLOW, O_WRONLY, O_CREAT, O_EXCL } = fs.constants;
const SLASH = Buffer.from("/");
const BIG_READ = 1 << 20;

export interface DumpOptions {
  /**
   * Recreate the tree at this (non-existent) path while dumping it, with canonical modes
   * (0444/0555), mtime 1 as Nix sets it, and every file fsync'ed: the store's one-pass copy-and-hash.
   */
  readonly copyTo?: string;
  /** Record every regular file as non-executable (how flat objects are stored). */
  readonly stripExecutable?: boolean;
  /** Called after each regular file with its size, for progress displays. */
  readonly onFile?: (size: number) => void;
}

class Dumper {
  readonly #w: NarWriter;
  readonly #big = Buffer.allocUnsafe(BIG_READ);
  readonly #opts: DumpOptions;

  constructor(w: NarWriter, opts: DumpOptions) {
    this.#w = w;
    this.#opts = opts;
  }

  root(path: Buffer, copy: Buffer | undefined): void {
    let st: fs.Stats;
    try {
      st = fs.lstatSync(path);
    } catch (e) {
      throw new FerryError("FERRY_PATH_UNREADABLE", `cannot read '${path.toString()}': ${(e as Error).message}`, {
        hint: "check that the path exists and is readable",
      });
    }
    if (st.isDirectory()) this.#directory(path, copy);
    else if (st.isSymbolicLink()) this.#symlink(path, copy);
    else if (st.isFile()) this.#regular(path, copy);
    else this.#unsupported(path);
  }

  #unsupported(path: Buffer): never {
    throw new FerryError("FERRY_NAR_UNSUPPORTED_FILE", `'${path.toString()}' is not a regular file, directory or symlink`, {
      hint: "NAR archives hold only regular files, directories and symlinks; remove sockets, devices and pipes first",
    });
  }

  #directory(path: Buffer, copy: Buffer | undefined): void {
    const w = this.#w;
    const entries = fs.readdirSync(path, { withFileTypes: true, encoding: "buffer" }) as unknown as fs.Dirent<Buffer>[];
    entries.sort((a, b) => compareBytes(a.name, b.name));
    if (copy) fs.mkdirSync(copy, { mode: 0o700 });
    w.openDirectory();
    for (const e of entries) {
      w.openEntry(e.name);
      const child = Buffer.concat([path, SLASH, e.name]);
      const childCopy = copy ? Buffer.concat([copy, SLASH, e.name]) : undefined;
      if (e.isFile()) this.#regular(child, childCopy);
      else if (e.isDirectory()) this.#directory(child, childCopy);
      else if (e.isSymbolicLink()) this.#symlink(child, childCopy);
      else if (e.isBlockDevice() || e.isCharacterDevice() || e.isFIFO() || e.isSocket()) this.#unsupported(child);
      else this.root(child, childCopy); // DT_UNKNOWN on some filesystems: ask lstat
      w.closeEntry();
    }
    w.closeDirectory();
    if (copy) {
      fs.chmodSync(copy, 0o555);
      fs.utimesSync(copy, 1, 1);
      const fd = fs.openSync(copy, O_RDONLY);
      fs.fsyncSync(fd);
      fs.closeSync(fd);
    }
  }

  #symlink(path: Buffer, copy: Buffer | undefined): void {
    const target = fs.readlinkSync(path, { encoding: "buffer" });
    this.#w.symlink(target);
    if (copy) {
      fs.symlinkSync(target, copy);
      fs.lutimesSync(copy, 1, 1);
    }
  }

  #regular(path: Buffer, copy: Buffer | undefined): void {
    const w = this.#w;
    const fd = fs.openSync(path, O_RDONLY | O_NOFOLLOW);
    let out: number | undefined;
    try {
      const st = fs.fstatSync(fd);
      const executable = !this.#opts.stripExecutable && (st.mode & 0o100) !== 0;
      const size = st.size;
      w.openRegular(executable, size);
      if (copy) out = fs.openSync(copy, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
      let left = size;
      while (left > 0) {
        let n: number;
        if (left <= 65536) {
          const view = w.reserve(left);
          n = fs.readSync(fd, view, 0, view.length, null);
          if (n > 0 && out !== undefined) writeFully(out, view.subarray(0, n));
          if (n > 0) w.commit(n);
        } else {
          n = fs.readSync(fd, this.#big, 0, Math.min(BIG_READ, left), null);
          if (n > 0) {
            const chunk = this.#big.subarray(0, n);
            if (out !== undefined) writeFully(out, chunk);
            w.writeContents(chunk);
          }
        }
        if (n === 0) {
          throw new FerryError("FERRY_PATH_CHANGED", `'${path.toString()}' shrank while it was being read`, {
            hint: "something is writing to the file; try again once it is stable",
          });
        }
        left -= n;
      }
      w.closeRegular();
      if (out !== undefined) {
        fs.fchmodSync(out, executable ? 0o555 : 0o444);
        fs.futimesSync(out, 1, 1);
        fs.fsyncSync(out);
      }
      this.#opts.onFile?.(size);
    } finally {
      fs.closeSync(fd);
      if (out !== undefined) fs.closeSync(out);
    }
  }
}

function writeFully(fd: number, data: Uint8Array): void {
  let off = 0;
  while (off < data.length) off += fs.writeSync(fd, data, off, data.length - off);
}

/** Streams the NAR of `path` into `sink`; returns the NAR size. */
export function dumpPath(path: string, sink: NarSink, opts: DumpOptions = {}): number {
  const w = new NarWriter(sink);
  new Dumper(w, opts).root(Buffer.from(path), opts.copyTo ? Buffer.from(opts.copyTo) : undefined);
  return w.end();
}

export interface NarHashResult {
  readonly hash: Hash;
  readonly size: number;
}

/** The NAR hash and size of `path` (what `nix-hash --type sha256 PATH` prints, and more). */
export function hashPath(path: string, algo: HashAlgo = "sha256", opts: DumpOptions = {}): NarHashResult {
  const h = createHasher(algo);
  const size = dumpPath(path, (c) => h.update(c), opts);
  return { hash: makeHash(algo, h.digest()), size };
}

/** The flat hash of a regular file's bytes, streamed. */
export function hashFile(path: string, algo: HashAlgo = "sha256"): Hash {
  const h = createHasher(algo);
  let fd: number;
  try {
    fd = fs.openSync(path, O_RDONLY);
  } catch (e) {
    throw new FerryError("FERRY_PATH_UNREADABLE", `cannot read '${path}': ${(e as Error).message}`);
  }
  try {
    if (!fs.fstatSync(fd).isFile()) {
      throw new FerryError("FERRY_PATH_NOT_FILE", `'${path}' is not a regular file`, { hint: "flat hashing takes a regular file; use `ferry hash path` for directories" });
    }
    const buf = Buffer.allocUnsafe(BIG_READ);
    for (;;) {
      const n = fs.readSync(fd, buf, 0, BIG_READ, null);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    fs.closeSync(fd);
  }
  return makeHash(algo, h.digest());
}

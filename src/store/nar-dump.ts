/**
 * The NAR of a filesystem object, streamed from disk (SPEC §2), optionally copied on the way.
 *
 * Speed. Everything is synchronous: a syscall costs a few microseconds, promises would cost
 * more than the work. Directory listings come with file types, so nothing is stat'ed twice;
 * small files are read straight into the writer's batch buffer and large ones in 256 KiB reads
 * (the size that keeps both the read and the hash in cache), so the hash sees large batches.
 *
 * Large trees are walked by two threads. This thread starts the walk alone; once it has met a
 * few hundred files it starts a walker worker (kept, asleep, for later walks of this thread;
 * `prestartWalker` starts it earlier) and, when the worker is up, hands it the rest of the walk
 * from where it stands. The worker then makes the syscalls: it lists and sorts directories,
 * reads symlinks, opens, stats, reads and closes each regular file, and sends this thread a
 * stream of records (names, targets, modes, sizes and file contents, in pieces of at most
 * 128 KiB) through a shared ring. This thread copies the contents out, frames and hashes: it
 * makes no syscall of its own while the worker keeps up. When this thread is about to run out
 * of records, the worker leaves the next files for it to open and read itself, so neither
 * thread idles for long.
 *
 * Memory is bounded whatever the size of the tree: a 1 MiB record ring, the open directories'
 * listings (as in any recursive walk), the writer's batch buffer, one 256 KiB read buffer, and
 * the worker's own small heap.
 */
import * as fs from "node:fs";
import { availableParallelism } from "node:os";
import { Worker } from "node:worker_threads";
import { createHasher, type HashAlgo } from "../core/digest.js";
import { FerryError } from "../core/errors.js";
import { makeHash, type Hash } from "../core/hash.js";
import { NarWriter, type NarSink } from "../core/nar/writer.js";

const { O_RDONLY, O_NOFOLLOW, O_WRONLY, O_CREAT, O_EXCL } = fs.constants;
const SLASH = 0x2f;
const BIG_READ = 256 << 10;
const SMALL_READ = 64 << 10;

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

// ---------------------------------------------------------------------------------------------
// The protocol between this thread and the walker worker.
//
// Control words sit 16 apart (one cache line each), so the two threads do not fight over lines.
// The record ring carries int32-aligned records [kind, nameLength, ...ints] + name (+ target);
// a record never straddles the end: the writer puts WRAP there and starts again at 0. Ring
// positions are byte counters that wrap at 2^32 (the ring size divides 2^32).

const C = {
  online: 0, // worker: 1 once it waits for jobs
  job: 16, // this thread: id of the last job handed over
  doneJob: 32, // worker: id of the last job finished (its descriptors closed)
  cancel: 48, // this thread: 1 asks the worker to abandon the job
  head: 64, // worker: ring bytes written
  tail: 80, // this thread: ring bytes consumed
  wakeTail: 96, // worker, before it sleeps: this thread's flushes wake it once the tail reaches this
  mainEvents: 112, // this thread bumps it to wake the worker
  workerEvents: 128, // the worker bumps it to wake this thread
  mainWaiting: 144,
  workerWaiting: 160,
  dead: 176, // worker: 1 if it stopped on an unexpected error
  recordsDone: 192, // this thread: records consumed (published with the tail)
  chunksRead: 208, // worker, streaming a file: chunks written to the data ring
  chunksDone: 224, // this thread: chunks it has copied out
  streamFailed: 240, // worker: 1 if the file ended early, 2 if a read failed
} as const;
const CONTROL_WORDS = 256;
/** Record kinds. */
const R = { wrap: 0, dir: 1, end: 2, file: 3, symlink: 4, fileByName: 5, fail: 6, done: 7, piece: 8 } as const;
/** Operations a FAIL record names (this thread redoes them to report the error). */
const OP = { readdir: 1, readlink: 2, lstat: 3, unsupported: 4, resume: 5, read: 6, shrank: 7 } as const;
const RING_BYTES = 1 << 20;
/** A large root file is streamed by the worker in chunks of this size through a data ring of DATA_CHUNKS of them. */
const CHUNK = 2 << 20;
const DATA_CHUNKS = 4;
const STREAM_MIN = 32 << 20;
const JOB_BYTES = 64 << 10;
/** File contents travel in records of at most this many bytes (two fit in the ring at once, and more). */
const PIECE = 128 << 10;
/** With fewer records than this waiting for this thread, the worker leaves the next file for it to open. */
const BY_NAME_BELOW = 64;
/** Start the worker after this many files, hand over after this many (small trees stay here). */
const SPAWN_AFTER_FILES = 256;
const HAND_OVER_AFTER_FILES = 64;

interface WalkerData {
  readonly control: SharedArrayBuffer;
  readonly ring: SharedArrayBuffer;
  readonly job: SharedArrayBuffer;
  readonly data: SharedArrayBuffer;
  readonly layout: { C: typeof C; R: typeof R; OP: typeof OP; PIECE: number; BY_NAME_BELOW: number; CHUNK: number; openFlags: number };
}

/** The per-file calls of the walk. `stat` gives an array with the mode at [1] and the size at [8]. */
interface FileIo {
  open(path: string | Buffer, flags: number): number;
  stat(fd: number): ArrayLike<number>;
  read(fd: number, buf: Uint8Array, off: number, len: number, pos: number): number;
  close(fd: number): void;
}

/**
 * The per-file calls as cheap as Node allows: its fs binding directly (no argument checks, no
 * Stats object with four Dates per file) when the binding behaves as this code expects, which is
 * checked once (results equal the public API's, errors are thrown); the public API otherwise.
 * Self-contained: the worker runs it from its source text too.
 */
function fileIo(fsm: typeof fs): FileIo {
  const pub: FileIo = {
    open: (p, flags) => fsm.openSync(p, flags),
    stat: (fd) => {
      const st = fsm.fstatSync(fd);
      return [0, st.mode, 0, 0, 0, 0, 0, 0, st.size];
    },
    read: (fd, buf, off, len, pos) => fsm.readSync(fd, buf, off, len, pos),
    close: (fd) => fsm.closeSync(fd),
  };
  if (process.execArgv.includes("--pending-deprecation") || process.env.NODE_PENDING_DEPRECATION === "1") return pub;
  try {
    type Fn = (...args: unknown[]) => unknown;
    const b = (process as unknown as { binding(name: string): Record<string, Fn> }).binding("fs");
    const raw: FileIo = {
      open: (p, flags) => b.open!(p, flags, 0o666) as number,
      stat: (fd) => b.fstat!(fd, false, undefined, false) as Float64Array,
      read: (fd, buf, off, len, pos) => b.read!(fd, buf, off, len, pos) as number,
      close: (fd) => void b.close!(fd),
    };
    const throws = (f: () => unknown): boolean => {
      try {
        f();
        return false;
      } catch {
        return true;
      }
    };
    const fd = raw.open(process.execPath, fsm.constants.O_RDONLY);
    try {
      const st = raw.stat(fd);
      const want = fsm.fstatSync(fd);
      const got = Buffer.alloc(64);
      const n = raw.read(fd, got, 0, 64, 0);
      const wantBytes = Buffer.alloc(64);
      const m = fsm.readSync(fd, wantBytes, 0, 64, 0);
      if (st[1] !== want.mode || st[8] !== want.size || n !== m || n <= 0) return pub;
    } finally {
      raw.close(fd);
    }
    if (!throws(() => raw.open("/nonexistent/ferry-probe", fsm.constants.O_RDONLY)) || !throws(() => raw.stat(-1))) return pub;
    return raw;
  } catch {
    return pub;
  }
}

/** This thread's per-file calls. */
const io = fileIo(fs);

/**
 * The worker. It runs in its own isolate from this function's source text, so it refers to
 * nothing but its parameters and globals. Per job: rebuild the stack of open directories from
 * the hand-over message (re-listing them and skipping the entries already written), walk the
 * rest in NAR order emitting records, then emit DONE. A filesystem error becomes a record (this
 * thread redoes the operation to report it); an unexpected exception marks the worker dead so
 * this thread stops waiting.
 */
function walkerMain(io: FileIo, fsm: typeof fs, d: WalkerData): void {
  const { C, R, OP, PIECE, BY_NAME_BELOW, CHUNK, openFlags } = d.layout;
  const ctl = new Int32Array(d.control);
  const ring = new Int32Array(d.ring);
  const ringBuf = Buffer.from(d.ring);
  const RING = ringBuf.length;
  const job = new Int32Array(d.job);
  const jobBuf = Buffer.from(d.job);
  const CANCELLED = new Error("cancelled");
  const cancelled = (): boolean => Atomics.load(ctl, C.cancel) !== 0;
  const signal = (): void => {
    if (Atomics.load(ctl, C.mainWaiting) !== 0) {
      Atomics.add(ctl, C.workerEvents, 1);
      Atomics.notify(ctl, C.workerEvents);
    }
  };
  /**
   * Sleeps until this thread signals, unless `word` already moved on from `seen`. This thread's
   * routine flushes wake it only once its tail reaches `wakeTail` (by default they do not).
   */
  const sleep = (word: number, seen: number, wakeTail = (Atomics.load(ctl, C.tail) + 0x7fffffff) | 0): void => {
    Atomics.store(ctl, C.wakeTail, wakeTail);
    Atomics.store(ctl, C.workerWaiting, 1);
    const events = Atomics.load(ctl, C.mainEvents);
    if (Atomics.load(ctl, word) === seen && !cancelled()) Atomics.wait(ctl, C.mainEvents, events);
    Atomics.store(ctl, C.workerWaiting, 0);
  };

  // Names travel as latin1 strings: one char per byte, so nothing is lost, `<` is byte order,
  // and no Buffer is allocated per entry. Paths are handed to the kernel as strings (UTF-8
  // encoded by Node) only when they are ASCII, where that is the same bytes.
  const isAscii = (s: string): boolean => {
    for (let i = 0; i < s.length; i++) if (s.charCodeAt(i) > 0x7f) return false;
    return true;
  };
  const osPath = (p: string, ascii: boolean): string | Buffer => (ascii ? p : Buffer.from(p, "latin1"));
  const list = (path: string, ascii: boolean): fs.Dirent[] => {
    const entries = fsm.readdirSync(osPath(path, ascii), { withFileTypes: true, encoding: "latin1" });
    return entries.sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : 0));
  };
  interface Frame {
    readonly path: string;
    readonly ascii: boolean;
    readonly entries: fs.Dirent[];
    i: number;
  }

  /**
   * A stream job: read the open file [fd] from byte `start` to `size` into the data ring, one
   * chunk per slot, while that thread copies out and hashes the chunks before.
   */
  const stream = (): void => {
    const data = new Uint8Array(d.data);
    const slots = data.length / CHUNK;
    const fd = job[1]!;
    const size = (job[2]! >>> 0) + job[3]! * 0x100000000;
    let pos = (job[4]! >>> 0) + job[5]! * 0x100000000;
    try {
      for (let k = 0; pos < size; k++) {
        for (;;) {
          if (cancelled()) return;
          const done = Atomics.load(ctl, C.chunksDone);
          if (((k - done) | 0) < slots) break;
          sleep(C.chunksDone, done);
        }
        const n = Math.min(CHUNK, size - pos);
        const off = (k % slots) * CHUNK;
        for (let got = 0; got < n; ) {
          const r = fsm.readSync(fd, data, off + got, n - got, pos + got);
          if (r === 0) {
            Atomics.store(ctl, C.streamFailed, 1);
            return;
          }
          got += r;
        }
        pos += n;
        Atomics.store(ctl, C.chunksRead, (k + 1) | 0);
        signal();
      }
    } catch {
      Atomics.store(ctl, C.streamFailed, 2);
    }
  };

  const runJob = (): void => {
    let head = 0;
    let produced = 0; // records written
    /** Waits for `n` contiguous bytes of ring space; returns the virtual position of the record. */
    const reserve = (n: number): number => {
      if (n > RING / 4) throw new Error(`walker: a record of ${n} bytes`);
      let start = head;
      const phys = start % RING;
      if (phys + n > RING) start = (start + RING - phys) >>> 0;
      const end = (start + n) >>> 0;
      for (;;) {
        if (cancelled()) throw CANCELLED;
        const tail = Atomics.load(ctl, C.tail);
        if (((end - tail) >>> 0) <= RING) break;
        sleep(C.tail, tail, (end - RING) | 0);
      }
      if (start !== head) ring[phys >> 2] = R.wrap;
      return start;
    };
    /** Publishes the record of `n` bytes at `start`. */
    const commit = (start: number, n: number): void => {
      produced = (produced + 1) | 0;
      head = (start + n) >>> 0;
      Atomics.store(ctl, C.head, head | 0);
      signal();
    };
    /** Appends a record [kind, payload length, a, b, c, e (the first `ints` of them)] name extra. */
    const put = (kind: number, ints: number, a: number, b: number, c: number, e: number, name: string | null, extra: Uint8Array | null): void => {
      const nameLen = name === null ? 0 : name.length;
      const extraLen = extra === null ? 0 : extra.length;
      const n = (4 * (2 + ints) + nameLen + extraLen + 3) & ~3;
      const start = reserve(n);
      const w = (start % RING) >> 2;
      ring[w] = kind;
      ring[w + 1] = nameLen + extraLen;
      if (ints > 0) ring[w + 2] = a;
      if (ints > 1) ring[w + 3] = b;
      if (ints > 2) ring[w + 4] = c;
      if (ints > 3) ring[w + 5] = e;
      const off = (w + 2 + ints) << 2;
      if (name !== null) ringBuf.write(name, off, nameLen, "latin1");
      if (extra !== null) ringBuf.set(extra, off + nameLen);
      commit(start, n);
    };
    const fail = (op: number, name: string | null): never => {
      put(R.fail, 1, op, 0, 0, 0, name, null);
      while (!cancelled()) sleep(C.cancel, 0);
      throw CANCELLED;
    };
    const stack: Frame[] = [];
    const file = (f: Frame, name: string, nameAscii: boolean): void => {
      // Balance the work by the backlog of records this thread has not read yet.
      const backlog = (produced - Atomics.load(ctl, C.recordsDone)) | 0;
      if (backlog < BY_NAME_BELOW) {
        // That thread is about to run dry: let it open this file itself while this one walks on.
        put(R.fileByName, 0, 0, 0, 0, 0, name, null);
        return;
      }
      let fd = -1;
      let mode: number;
      let size: number;
      try {
        fd = io.open(osPath(f.path + "/" + name, f.ascii && nameAscii), openFlags);
        const st = io.stat(fd);
        mode = st[1]!;
        size = st[8]!;
      } catch {
        if (fd >= 0) io.close(fd);
        put(R.fileByName, 0, 0, 0, 0, 0, name, null);
        return;
      }
      try {
        // FILE [mode, size low, size high, name length] name + the first piece of the contents,
        // then PIECE records [length] bytes until `size` bytes are sent. Contents are read
        // straight into the ring.
        let pos = 0;
        let first = true;
        do {
          const len = Math.min(size - pos, PIECE);
          const ints = first ? 4 : 0;
          const payload = first ? name.length + len : len;
          const n = (4 * (2 + ints) + payload + 3) & ~3;
          const start = reserve(n);
          const w = (start % RING) >> 2;
          let off = (w + 2 + ints) << 2;
          if (first) {
            ring[w] = R.file;
            ring[w + 2] = mode;
            ring[w + 3] = size % 0x100000000 | 0;
            ring[w + 4] = Math.floor(size / 0x100000000);
            ring[w + 5] = name.length;
            ringBuf.write(name, off, name.length, "latin1");
            off += name.length;
          } else ring[w] = R.piece;
          ring[w + 1] = payload;
          for (let got = 0; got < len; ) {
            let r: number;
            try {
              r = io.read(fd, ringBuf, off + got, len - got, pos + got);
            } catch {
              fail(OP.read, name);
            }
            if (r! === 0) fail(OP.shrank, name);
            got += r!;
          }
          commit(start, n);
          pos += len;
          first = false;
        } while (pos < size);
      } finally {
        io.close(fd);
      }
    };
    const directory = (f: Frame, name: string, nameAscii: boolean): void => {
      const path = f.path + "/" + name;
      const ascii = f.ascii && nameAscii;
      let entries: fs.Dirent[];
      try {
        entries = list(path, ascii);
      } catch {
        fail(OP.readdir, name);
      }
      put(R.dir, 0, 0, 0, 0, 0, name, null);
      stack.push({ path, ascii, entries: entries!, i: 0 });
    };
    const symlink = (f: Frame, name: string, nameAscii: boolean): void => {
      let target: Buffer;
      try {
        target = fsm.readlinkSync(osPath(f.path + "/" + name, f.ascii && nameAscii), { encoding: "buffer" });
      } catch {
        fail(OP.readlink, name);
      }
      put(R.symlink, 1, name.length, 0, 0, 0, name, target!);
    };

    try {
      // The hand-over message: [rootLength, levels] root, then per level [length or -1] lastName.
      const rootLen = job[0]!;
      const levels = job[1]!;
      let off = 8;
      let path = jobBuf.toString("latin1", off, off + rootLen);
      let ascii = isAscii(path);
      off += (rootLen + 3) & ~3;
      try {
        for (let k = 0; k < levels; k++) {
          const len = job[off >> 2]!;
          off += 4;
          const last = len < 0 ? null : jobBuf.toString("latin1", off, off + len);
          if (len > 0) off += (len + 3) & ~3;
          const entries = list(path, ascii);
          let i = 0;
          if (last !== null) while (i < entries.length && entries[i]!.name <= last) i++;
          stack.push({ path, ascii, entries, i });
          if (k < levels - 1) {
            path = path + "/" + last!;
            ascii = ascii && isAscii(last!);
          }
        }
      } catch (e) {
        if (e === CANCELLED) throw e;
        fail(OP.resume, null);
      }
      for (;;) {
        const f = stack[stack.length - 1];
        if (f === undefined) break;
        if (f.i === f.entries.length) {
          stack.pop();
          put(R.end, 0, 0, 0, 0, 0, null, null);
          continue;
        }
        const e = f.entries[f.i++]!;
        const name = e.name;
        const nameAscii = isAscii(name);
        if (e.isFile()) file(f, name, nameAscii);
        else if (e.isDirectory()) directory(f, name, nameAscii);
        else if (e.isSymbolicLink()) symlink(f, name, nameAscii);
        else if (e.isBlockDevice() || e.isCharacterDevice() || e.isFIFO() || e.isSocket()) fail(OP.unsupported, name);
        else {
          let st: fs.Stats;
          try {
            st = fsm.lstatSync(osPath(f.path + "/" + name, f.ascii && nameAscii));
          } catch {
            fail(OP.lstat, name);
          }
          if (st!.isFile()) file(f, name, nameAscii);
          else if (st!.isDirectory()) directory(f, name, nameAscii);
          else if (st!.isSymbolicLink()) symlink(f, name, nameAscii);
          else fail(OP.unsupported, name);
        }
      }
      put(R.done, 0, 0, 0, 0, 0, null, null);
    } catch (e) {
      if (e !== CANCELLED) throw e;
    }
  };

  try {
    let jobId = Atomics.load(ctl, C.job);
    Atomics.store(ctl, C.doneJob, jobId);
    Atomics.store(ctl, C.online, 1);
    for (;;) {
      while (Atomics.load(ctl, C.job) === jobId) sleep(C.job, jobId);
      jobId = Atomics.load(ctl, C.job);
      if (job[0] === -1) stream();
      else runJob();
      Atomics.store(ctl, C.doneJob, jobId);
      Atomics.add(ctl, C.workerEvents, 1);
      Atomics.notify(ctl, C.workerEvents);
    }
  } catch {
    Atomics.store(ctl, C.dead, 1);
    Atomics.add(ctl, C.workerEvents, 1);
    Atomics.notify(ctl, C.workerEvents);
  }
}

/** This thread's walker worker and the memory shared with it; one per thread, kept between walks. */
class Walker {
  readonly control = new SharedArrayBuffer(CONTROL_WORDS * 4);
  readonly ringBuf = new SharedArrayBuffer(RING_BYTES);
  readonly jobBuf = new SharedArrayBuffer(JOB_BYTES);
  /** Pages of it are touched only when a large file is streamed. */
  readonly dataBuf = new SharedArrayBuffer(CHUNK * DATA_CHUNKS);
  readonly ctl = new Int32Array(this.control);
  readonly ring = new Int32Array(this.ringBuf);
  readonly ringBytes = new Uint8Array(this.ringBuf);
  readonly job = new Int32Array(this.jobBuf);
  readonly jobBytes = new Uint8Array(this.jobBuf);
  readonly data = new Uint8Array(this.dataBuf);
  worker: Worker | undefined;
  /** No worker on one CPU, nor after one failed. */
  disabled = availableParallelism() < 2;
  busy = false;
  jobId = 0;
  /** Ring read position of the current job. */
  pos = 0;
  #records = 0;
  /** `pos` at the last flush. */
  #flushed = 0;

  start(): void {
    if (this.worker || this.disabled) return;
    const data: WalkerData = {
      control: this.control,
      ring: this.ringBuf,
      job: this.jobBuf,
      data: this.dataBuf,
      layout: { C, R, OP, PIECE, BY_NAME_BELOW, CHUNK, openFlags: O_RDONLY | O_NOFOLLOW },
    };
    try {
      const src = `const fs = require("node:fs"); (${walkerMain.toString()})((${fileIo.toString()})(fs), fs, require("node:worker_threads").workerData);`;
      // The worker closes every descriptor it opens; the one a stream job reads belongs to this thread.
      this.worker = new Worker(src, { eval: true, workerData: data, name: "ferry-nar-walker", trackUnmanagedFds: false, stdin: false });
      this.worker.unref();
      // Faults surface through the dead flag; an 'error' event must not crash the process.
      this.worker.on("error", () => {
        Atomics.store(this.ctl, C.dead, 1);
        this.disabled = true;
      });
    } catch {
      this.disabled = true;
    }
  }

  /** The worker is up and has no job. */
  get ready(): boolean {
    return !this.disabled && Atomics.load(this.ctl, C.online) === 1 && Atomics.load(this.ctl, C.dead) === 0 && Atomics.load(this.ctl, C.doneJob) === this.jobId;
  }

  /** Wakes the worker from whatever it sleeps on. */
  #signal(): void {
    Atomics.add(this.ctl, C.mainEvents, 1);
    Atomics.notify(this.ctl, C.mainEvents);
  }

  wakeWorker(): void {
    if (Atomics.load(this.ctl, C.workerWaiting) !== 0) {
      this.#signal();
    }
  }

  /** Waits until `ready()` holds; throws if the worker died. */
  waitForWorker(ready: () => boolean): void {
    for (let spin = 0; spin < 100; spin++) if (ready()) return;
    for (;;) {
      Atomics.store(this.ctl, C.mainWaiting, 1);
      const seen = Atomics.load(this.ctl, C.workerEvents);
      if (ready()) break;
      if (Atomics.load(this.ctl, C.dead) !== 0) {
        Atomics.store(this.ctl, C.mainWaiting, 0);
        this.disabled = true;
        throw new Error("NAR walker worker stopped unexpectedly");
      }
      Atomics.wait(this.ctl, C.workerEvents, seen);
    }
    Atomics.store(this.ctl, C.mainWaiting, 0);
  }

  /**
   * Hands the rest of a walk to the worker: `root`, and for each open directory from the root
   * down, the name of its last entry already written (or null). False if it does not fit.
   */
  handOver(root: Buffer, lastNames: (Buffer | null)[]): boolean {
    let size = 8 + ((root.length + 3) & ~3);
    for (const n of lastNames) size += 4 + (n ? (n.length + 3) & ~3 : 0);
    if (size > JOB_BYTES) return false;
    this.job[0] = root.length;
    this.job[1] = lastNames.length;
    this.jobBytes.set(root, 8);
    let off = 8 + ((root.length + 3) & ~3);
    for (const n of lastNames) {
      this.job[off >> 2] = n ? n.length : -1;
      off += 4;
      if (n) {
        this.jobBytes.set(n, off);
        off += (n.length + 3) & ~3;
      }
    }
    Atomics.store(this.ctl, C.head, 0);
    Atomics.store(this.ctl, C.tail, 0);
    Atomics.store(this.ctl, C.recordsDone, 0);
    this.#records = 0;
    this.pos = 0;
    this.#flushed = 0;
    this.#startJob();
    return true;
  }

  #startJob(): void {
    this.jobId = (this.jobId + 1) | 0;
    Atomics.store(this.ctl, C.job, this.jobId);
    this.#signal();
  }

  /** Hands the worker the reading of the open file `fd` from byte `start` on (see `stream` in the worker). */
  handOverStream(fd: number, size: number, start: number): void {
    this.job[0] = -1;
    this.job[1] = fd;
    this.job[2] = size % 0x100000000 | 0;
    this.job[3] = Math.floor(size / 0x100000000);
    this.job[4] = start % 0x100000000 | 0;
    this.job[5] = Math.floor(start / 0x100000000);
    Atomics.store(this.ctl, C.chunksRead, 0);
    Atomics.store(this.ctl, C.chunksDone, 0);
    Atomics.store(this.ctl, C.streamFailed, 0);
    this.#startJob();
  }

  /** Waits for chunk `k` of the stream; false if the worker stopped short of it (see `streamFailed`). */
  waitForChunk(k: number): boolean {
    const ready = (): boolean => ((Atomics.load(this.ctl, C.chunksRead) - k) | 0) > 0 || Atomics.load(this.ctl, C.streamFailed) !== 0;
    if (!ready()) this.waitForWorker(ready);
    return ((Atomics.load(this.ctl, C.chunksRead) - k) | 0) > 0;
  }

  chunkDone(k: number): void {
    Atomics.store(this.ctl, C.chunksDone, (k + 1) | 0);
    this.wakeWorker();
  }

  /** Word index of the next record, once one is there. */
  next(): number {
    if (Atomics.load(this.ctl, C.head) === (this.pos | 0)) this.#waitForRecords();
    let w = (this.pos % RING_BYTES) >> 2;
    if (this.ring[w] === R.wrap) {
      this.pos = (this.pos + RING_BYTES - (this.pos % RING_BYTES)) >>> 0;
      if (Atomics.load(this.ctl, C.head) === (this.pos | 0)) this.#waitForRecords();
      w = 0;
    }
    return w;
  }

  #waitForRecords(): void {
    this.flush();
    const pos = this.pos | 0;
    this.waitForWorker(() => Atomics.load(this.ctl, C.head) !== pos);
  }

  /** Frees the record at word `w`, which has `ints` ints after its payload length. */
  consumed(w: number, ints: number): void {
    this.pos = (this.pos + ((4 * (2 + ints) + this.ring[w + 1]! + 3) & ~3)) >>> 0;
    if ((++this.#records & 7) === 0 || ((this.pos - this.#flushed) >>> 0) >= RING_BYTES / 8) this.flush();
  }

  /** Publishes the ring space this thread is done with; wakes the worker once it has the room it waits for. */
  flush(): void {
    this.#flushed = this.pos;
    Atomics.store(this.ctl, C.recordsDone, this.#records);
    Atomics.store(this.ctl, C.tail, this.pos | 0);
    if (Atomics.load(this.ctl, C.workerWaiting) !== 0 && ((this.pos - Atomics.load(this.ctl, C.wakeTail)) | 0) >= 0) {
      this.#signal();
    }
  }

  /** Ends the current job: tells the worker to stop if `cancel`, and waits until it has closed everything. */
  finish(cancel: boolean): void {
    if (cancel) {
      Atomics.store(this.ctl, C.cancel, 1);
      this.#signal();
    }
    try {
      this.waitForWorker(() => Atomics.load(this.ctl, C.doneJob) === this.jobId);
    } finally {
      Atomics.store(this.ctl, C.cancel, 0);
    }
  }
}

let shared: Walker | undefined;

interface Frame {
  readonly path: Buffer;
  readonly entries: fs.Dirent<Buffer>[];
  i: number;
}

class Dumper {
  readonly #w: NarWriter;
  readonly #walker: Walker | undefined;
  readonly #opts: DumpOptions;
  readonly #big = Buffer.allocUnsafe(BIG_READ);
  /** Paths of the open directories, root first. */
  readonly #dirs: Buffer[] = [];
  /** Names of the open directories (null for the root). */
  readonly #names: (Buffer | null)[] = [];
  /** Copy destinations of the open directories (copy mode only). */
  readonly #copies: Buffer[] = [];
  readonly #copyRoot: Buffer | undefined;
  #root: Buffer | undefined;
  #files = 0;
  /** The worker has the walk. */
  #handedOver = false;

  constructor(w: NarWriter, walker: Walker | undefined, copyTo: Buffer | undefined, opts: DumpOptions) {
    this.#w = w;
    this.#walker = walker;
    this.#copyRoot = copyTo;
    this.#opts = opts;
  }

  run(root: Buffer): void {
    this.#root = root;
    let st: fs.Stats;
    try {
      st = fs.lstatSync(root);
    } catch (e) {
      throw new FerryError("FERRY_PATH_UNREADABLE", `cannot read '${root.toString()}': ${(e as Error).message}`, {
        hint: "check that the path exists and is readable",
      });
    }
    if (st.isDirectory()) {
      try {
        this.#walk(root);
      } finally {
        if (this.#handedOver) this.#walker!.finish(true);
      }
    } else if (st.isSymbolicLink()) this.#symlink(null, fs.readlinkSync(root, { encoding: "buffer" }));
    else if (st.isFile()) this.#fileAt(null, root);
    else unsupported(root);
  }

  // ---- the walk on this thread, until the worker takes over --------------------------------

  #walk(root: Buffer): void {
    const frames: Frame[] = [{ path: root, entries: list(root), i: 0 }];
    this.#enterDirectory(null, root);
    const walker = this.#walker;
    for (;;) {
      const f = frames[frames.length - 1];
      if (!f) return;
      if (f.i === f.entries.length) {
        frames.pop();
        this.#leaveDirectory();
        continue;
      }
      if (walker && this.#files >= HAND_OVER_AFTER_FILES && (this.#files & 15) === 0) {
        if (!walker.worker && this.#files >= SPAWN_AFTER_FILES) walker.start();
        if (walker.ready && walker.handOver(root, frames.map((x) => (x.i > 0 ? x.entries[x.i - 1]!.name : null)))) {
          this.#handedOver = true;
          this.#consume();
          this.#handedOver = false;
          walker.finish(false);
          return;
        }
      }
      const e = f.entries[f.i++]!;
      const name = e.name;
      if (e.isFile()) this.#fileAt(name, childPath(f.path, name));
      else if (e.isDirectory()) {
        const path = childPath(f.path, name);
        frames.push({ path, entries: list(path), i: 0 });
        this.#enterDirectory(name, path);
      } else if (e.isSymbolicLink()) this.#symlink(name, fs.readlinkSync(childPath(f.path, name), { encoding: "buffer" }));
      else if (e.isBlockDevice() || e.isCharacterDevice() || e.isFIFO() || e.isSocket()) unsupported(childPath(f.path, name));
      else {
        // DT_UNKNOWN on some filesystems: ask lstat.
        const path = childPath(f.path, name);
        const st = fs.lstatSync(path);
        if (st.isFile()) this.#fileAt(name, path);
        else if (st.isDirectory()) {
          frames.push({ path, entries: list(path), i: 0 });
          this.#enterDirectory(name, path);
        } else if (st.isSymbolicLink()) this.#symlink(name, fs.readlinkSync(path, { encoding: "buffer" }));
        else unsupported(path);
      }
    }
  }

  // ---- the records of the worker ----------------------------------------------------------

  #consume(): void {
    const walker = this.#walker!;
    const ring = walker.ring;
    const bytes = walker.ringBytes;
    for (;;) {
      const w = walker.next();
      const kind = ring[w]!;
      const len = ring[w + 1]!;
      switch (kind) {
        case R.dir: {
          const name = copyOut(bytes, (w + 2) << 2, len);
          walker.consumed(w, 0);
          this.#enterDirectory(name, childPath(this.#dirs[this.#dirs.length - 1]!, name));
          break;
        }
        case R.end:
          walker.consumed(w, 0);
          this.#leaveDirectory();
          break;
        case R.file: {
          const mode = ring[w + 2]!;
          const size = (ring[w + 3]! >>> 0) + ring[w + 4]! * 0x100000000;
          const nameLen = ring[w + 5]!;
          const off = (w + 6) << 2;
          const name = copyOut(bytes, off, nameLen);
          const contents = new RingContents(walker, w, off + nameLen, len - nameLen, (op) => this.#redo(op, name));
          this.#w.openEntry(name);
          this.#contents(contents, mode, size, name);
          contents.end();
          this.#w.closeEntry();
          break;
        }
        case R.symlink: {
          const nameLen = ring[w + 2]!;
          const off = (w + 3) << 2;
          const name = copyOut(bytes, off, nameLen);
          const target = copyOut(bytes, off + nameLen, len - nameLen);
          walker.consumed(w, 1);
          this.#symlink(name, target);
          break;
        }
        case R.fileByName: {
          // Opened here: this thread was idle, or the worker could not open it (then this reports the error).
          const name = copyOut(bytes, (w + 2) << 2, len);
          walker.consumed(w, 0);
          this.#fileAt(name, childPath(this.#dirs[this.#dirs.length - 1]!, name));
          break;
        }
        case R.fail: {
          const op = ring[w + 2]!;
          const name = copyOut(bytes, (w + 3) << 2, len);
          walker.consumed(w, 1);
          this.#redo(op, name);
          break;
        }
        case R.done:
          walker.consumed(w, 0);
          walker.flush();
          return;
        default:
          throw new Error(`NAR walker: unknown record kind ${kind}`);
      }
    }
  }

  /** Repeats the operation the worker failed at, so the error is reported as if it ran here. */
  #redo(op: number, name: Buffer): never {
    const path = name.length > 0 ? childPath(this.#dirs[this.#dirs.length - 1]!, name) : this.#dirs[this.#dirs.length - 1]!;
    if (op === OP.unsupported) unsupported(path);
    if (op === OP.readdir) fs.readdirSync(path);
    if (op === OP.readlink) fs.readlinkSync(path);
    if (op === OP.lstat) fs.lstatSync(path);
    if (op === OP.shrank) throw shrank(path);
    if (op === OP.read) fs.readFileSync(path);
    throw new FerryError("FERRY_PATH_CHANGED", `'${path.toString()}' changed while it was being read`, {
      hint: "something is modifying the tree; try again once it is stable",
    });
  }

  // ---- writing (and copying) --------------------------------------------------------------

  #enterDirectory(name: Buffer | null, path: Buffer): void {
    const w = this.#w;
    if (name) w.openEntry(name);
    w.openDirectory();
    this.#dirs.push(path);
    this.#names.push(name);
    if (this.#copyRoot) {
      const copy = name ? childPath(this.#copies[this.#copies.length - 1]!, name) : this.#copyRoot;
      fs.mkdirSync(copy, { mode: 0o700 });
      this.#copies.push(copy);
    }
  }

  #leaveDirectory(): void {
    const w = this.#w;
    w.closeDirectory();
    this.#dirs.pop();
    if (this.#names.pop()) w.closeEntry();
    const copy = this.#copies.pop();
    if (copy) {
      fs.chmodSync(copy, 0o555);
      fs.utimesSync(copy, 1, 1);
      const fd = fs.openSync(copy, O_RDONLY);
      fs.fsyncSync(fd);
      fs.closeSync(fd);
    }
  }

  #symlink(name: Buffer | null, target: Buffer): void {
    const w = this.#w;
    if (name) w.openEntry(name);
    w.symlink(target);
    if (name) w.closeEntry();
    if (this.#copyRoot) {
      const copy = name ? childPath(this.#copies[this.#copies.length - 1]!, name) : this.#copyRoot;
      fs.symlinkSync(target, copy);
      fs.lutimesSync(copy, 1, 1);
    }
  }

  /** The regular file at `path`, opened and read here. */
  #fileAt(name: Buffer | null, path: Buffer): void {
    this.#files++;
    const fd = io.open(path, O_RDONLY | O_NOFOLLOW);
    try {
      const st = io.stat(fd);
      const mode = st[1]!;
      const size = st[8]!;
      if (name) this.#w.openEntry(name);
      if (name === null && this.#walker && !this.#walker.disabled && size >= STREAM_MIN) this.#streamed(fd, mode, size);
      else this.#contents(fd, mode, size, name);
      if (name) this.#w.closeEntry();
    } finally {
      io.close(fd);
    }
  }

  /**
   * Writes a regular file node of `size` bytes, copying it if asked. The contents come from the
   * open descriptor `src` (left open; read straight into the writer's buffer) or from the
   * worker's ring (handed on in place).
   */
  #contents(src: number | RingContents, mode: number, size: number, name: Buffer | null): void {
    const w = this.#w;
    const executable = !this.#opts.stripExecutable && (mode & 0o100) !== 0;
    w.openRegular(executable, size);
    let out: number | undefined;
    try {
      if (this.#copyRoot) {
        const copy = name ? childPath(this.#copies[this.#copies.length - 1]!, name) : this.#copyRoot;
        out = fs.openSync(copy, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
      }
      let left = size;
      while (left > 0 && typeof src !== "number") {
        const view = src.take(left);
        if (out !== undefined) writeFully(out, view);
        w.writeContents(view);
        left -= view.length;
      }
      while (left > 0 && typeof src === "number") {
        let n: number;
        if (left <= SMALL_READ) {
          const view = w.reserve(left);
          n = io.read(src, view, 0, view.length, size - left);
          if (n > 0 && out !== undefined) writeFully(out, view.subarray(0, n));
          if (n > 0) w.commit(n);
        } else {
          n = io.read(src, this.#big, 0, Math.min(BIG_READ, left), size - left);
          if (n > 0) {
            const chunk = this.#big.subarray(0, n);
            if (out !== undefined) writeFully(out, chunk);
            w.writeContents(chunk);
          }
        }
        if (n === 0) throw shrank(name ? childPath(this.#dirs[this.#dirs.length - 1]!, name) : this.#root!);
        left -= n;
      }
      w.closeRegular();
      if (out !== undefined) finishCopy(out, executable);
    } finally {
      if (out !== undefined) fs.closeSync(out);
    }
    this.#opts.onFile?.(size);
  }

  /**
   * A large root file from the open descriptor `fd`: read here until the worker is up, then read
   * by the worker a few chunks ahead while this thread hashes, so reading and hashing overlap.
   * Each chunk is copied out of shared memory first: hashing bytes another core just wrote, in
   * place, is slower than copying them.
   */
  #streamed(fd: number, mode: number, size: number): void {
    const walker = this.#walker!;
    walker.start();
    const w = this.#w;
    const executable = !this.#opts.stripExecutable && (mode & 0o100) !== 0;
    w.openRegular(executable, size);
    const chunk = Buffer.allocUnsafe(CHUNK);
    let out: number | undefined;
    let streaming = false;
    let finished = false;
    try {
      if (this.#copyRoot) out = fs.openSync(this.#copyRoot, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
      for (let pos = 0, k = 0; pos < size; ) {
        if (!streaming && size - pos > CHUNK && walker.ready) {
          walker.handOverStream(fd, size, pos);
          streaming = true;
        }
        let bytes: Buffer;
        if (streaming) {
          if (!walker.waitForChunk(k)) {
            // The worker stopped short: a read here reports why (or finds the file shrank).
            if (fs.readSync(fd, this.#big, 0, 1, pos) === 0 || Atomics.load(walker.ctl, C.streamFailed) === 1) throw shrank(this.#root!);
            throw new FerryError("FERRY_PATH_CHANGED", `'${this.#root!.toString()}' could not be read to the end`);
          }
          const n = Math.min(CHUNK, size - pos);
          const off = (k % DATA_CHUNKS) * CHUNK;
          chunk.set(walker.data.subarray(off, off + n));
          walker.chunkDone(k++);
          bytes = chunk.subarray(0, n);
        } else {
          const n = fs.readSync(fd, this.#big, 0, Math.min(BIG_READ, size - pos), pos);
          if (n === 0) throw shrank(this.#root!);
          bytes = this.#big.subarray(0, n);
        }
        if (out !== undefined) writeFully(out, bytes);
        w.writeContents(bytes);
        pos += bytes.length;
      }
      w.closeRegular();
      if (out !== undefined) finishCopy(out, executable);
      finished = true;
    } finally {
      if (streaming) walker.finish(!finished);
      if (out !== undefined) fs.closeSync(out);
    }
    this.#opts.onFile?.(size);
  }
}

/**
 * The contents of a file the worker read: the rest of its FILE record, then PIECE records.
 * Each record is freed when the next is taken (`end` frees the last one).
 */
class RingContents {
  readonly #walker: Walker;
  readonly #bytes: Uint8Array;
  readonly #failed: (op: number) => never;
  #w: number;
  #ints = 4;
  #off: number;
  #left: number;

  constructor(walker: Walker, w: number, off: number, len: number, failed: (op: number) => never) {
    this.#walker = walker;
    this.#bytes = walker.ringBytes;
    this.#failed = failed;
    this.#w = w;
    this.#off = off;
    this.#left = len;
  }

  /** The next bytes, at most `max`: a view of the ring, valid until the next call. */
  take(max: number): Uint8Array {
    const walker = this.#walker;
    while (this.#left === 0) {
      walker.consumed(this.#w, this.#ints);
      const w = walker.next();
      const kind = walker.ring[w]!;
      if (kind === R.fail) {
        const op = walker.ring[w + 2]!;
        walker.consumed(w, 1);
        this.#failed(op);
      }
      if (kind !== R.piece) throw new Error(`NAR walker: record kind ${kind} where file contents were due`);
      this.#w = w;
      this.#ints = 0;
      this.#off = (w + 2) << 2;
      this.#left = walker.ring[w + 1]!;
    }
    const n = Math.min(max, this.#left);
    const view = this.#bytes.subarray(this.#off, this.#off + n);
    this.#off += n;
    this.#left -= n;
    return view;
  }

  end(): void {
    this.#walker.consumed(this.#w, this.#ints);
  }
}

/** A copy of `len` bytes at `off` (names are short: a loop beats a native call). */
function copyOut(bytes: Uint8Array, off: number, len: number): Buffer {
  const b = Buffer.allocUnsafe(len);
  for (let i = 0; i < len; i++) b[i] = bytes[off + i]!;
  return b;
}

function list(path: Buffer): fs.Dirent<Buffer>[] {
  const entries = fs.readdirSync(path, { withFileTypes: true, encoding: "buffer" }) as unknown as fs.Dirent<Buffer>[];
  // Buffer.compare is memcmp order, the order of NAR entries.
  return entries.sort((a, b) => Buffer.compare(a.name, b.name));
}

function childPath(dir: Buffer, name: Buffer): Buffer {
  const p = Buffer.allocUnsafe(dir.length + 1 + name.length);
  dir.copy(p, 0);
  p[dir.length] = SLASH;
  name.copy(p, dir.length + 1);
  return p;
}

function shrank(path: Buffer): FerryError {
  return new FerryError("FERRY_PATH_CHANGED", `'${path.toString()}' shrank while it was being read`, {
    hint: "something is writing to the file; try again once it is stable",
  });
}

function finishCopy(out: number, executable: boolean): void {
  fs.fchmodSync(out, executable ? 0o555 : 0o444);
  fs.futimesSync(out, 1, 1);
  fs.fsyncSync(out);
}

function unsupported(path: Buffer): never {
  throw new FerryError("FERRY_NAR_UNSUPPORTED_FILE", `'${path.toString()}' is not a regular file, directory or symlink`, {
    hint: "NAR archives hold only regular files, directories and symlinks; remove sockets, devices and pipes first",
  });
}

function writeFully(fd: number, data: Uint8Array): void {
  let off = 0;
  while (off < data.length) off += fs.writeSync(fd, data, off, data.length - off);
}

/**
 * Starts this thread's walker worker now (when the machine has two CPUs or more), for a caller
 * that knows a walk is coming: it takes tens of milliseconds to boot, and a walk that finds it
 * up hands it the tree from the start.
 */
export function prestartWalker(): void {
  (shared ??= new Walker()).start();
}

/** Starts the walker worker and waits until it is up; false if there is none (one CPU, or it failed). */
export async function walkerReady(timeoutMs = 10_000): Promise<boolean> {
  prestartWalker();
  const walker = shared!;
  const deadline = Date.now() + timeoutMs;
  while (!walker.disabled && Atomics.load(walker.ctl, C.online) !== 1 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 2));
  }
  return !walker.disabled && Atomics.load(walker.ctl, C.online) === 1;
}

/** The NAR writer's batch size, and the buffer of this thread's outermost walk. */
const NAR_BATCH = 256 * 1024;
let batchBuffer: Uint8Array | undefined;

/** Streams the NAR of `path` into `sink`; returns the NAR size. */
export function dumpPath(path: string, sink: NarSink, opts: DumpOptions = {}): number {
  // One walker worker per thread; a walk started from inside a sink runs on this thread alone.
  const walker = (shared ??= new Walker());
  const mine = !walker.busy;
  // The outermost walk reuses the thread's batch buffer (sinks see views valid only during the
  // call); a walk nested in a sink gets one of its own.
  const w = new NarWriter(sink, mine ? (batchBuffer ??= new Uint8Array(NAR_BATCH)) : NAR_BATCH);
  walker.busy = true;
  try {
    new Dumper(w, mine ? walker : undefined, opts.copyTo ? Buffer.from(opts.copyTo) : undefined, opts).run(Buffer.from(path));
    // Inside: the last flush hands the sink a view of the batch buffer too.
    return w.end();
  } finally {
    if (mine) walker.busy = false;
  }
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

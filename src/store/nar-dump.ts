/**
 * The NAR of a filesystem object, streamed from disk (SPEC §2), optionally copied on the way.
 *
 * Speed. The walk is synchronous (a syscall costs a few microseconds; promises would cost more
 * than the work). It runs a bounded distance ahead of the writer: a lister reads directories
 * (with file types, so nothing is stat'ed twice) and queues the regular files it meets; a
 * read-ahead worker thread opens, stats and reads the queued files into a shared ring while
 * this thread frames and hashes what is ready. When the worker has not reached the next file
 * yet, this thread takes that file and reads it itself (straight into the writer's batch
 * buffer), so the two threads share the reading and neither waits on the other for long; on a
 * one-CPU machine or a small tree no worker is started at all. A large root file is streamed
 * by the worker in 1 MiB chunks, overlapping the read of one chunk with the hash of the last.
 *
 * Memory is bounded whatever the size of the tree: a 1 MiB ring of queued paths, an 8 MiB ring
 * of file contents, at most 4096 queued files, the writer's batch buffer and one read buffer.
 */
import * as fs from "node:fs";
import { availableParallelism } from "node:os";
import { getSystemErrorName } from "node:util";
import { Worker } from "node:worker_threads";
import { createHasher, type HashAlgo } from "../core/digest.js";
import { FerryError } from "../core/errors.js";
import { makeHash, type Hash } from "../core/hash.js";
import { NarWriter, type NarSink } from "../core/nar/writer.js";
import { compareBytes } from "../core/nar/names.js";

const { O_RDONLY, O_NOFOLLOW, O_WRONLY, O_CREAT, O_EXCL } = fs.constants;
const SLASH = 0x2f;
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

// ---------------------------------------------------------------------------------------------
// Shared memory between this thread and the read-ahead worker.
//
// Files are numbered in NAR order (a wrapping int32 index) and queued in a ring of K slots. A
// slot's state word packs the low 28 bits of the file's index with a tag, so a stale look at a
// reused slot never matches. This thread is the only producer of slots and the only consumer;
// the worker claims queued slots in order with a compare-and-swap, and this thread may claim
// (steal) a queued slot the same way. File contents flow through a byte ring in chunks of at
// most CHUNK bytes, allocated by the worker in slot order and freed by this thread in the same
// order; both sides place a chunk by the same rule (wrap to the start when it does not fit
// before the end), so only the byte counters HEAD and TAIL need sharing.

const K = 4096; // queued files at most; a power of two
const SLOT = 8; // int32 fields per slot
const F = { state: 0, pathOff: 1, pathLen: 2, mode: 3, sizeLo: 4, sizeHi: 5, end: 6, err: 7 } as const;
/** Indices into the control words. */
const C = { published: 0, consumed: 1, head: 2, tail: 3, mainEvents: 4, workerEvents: 5, mainWaiting: 6, workerWaiting: 7, cancel: 8, dead: 9 } as const;
const CONTROL_WORDS = 16;
/** Slot tags (low 3 bits of the state word). */
const T = { free: 0, queued: 1, main: 2, worker: 3, streaming: 4, done: 5, failedEarly: 6, failedLate: 7 } as const;
const DATA_RING = 8 << 20; // a power of two dividing 2^32
const CHUNK = 1 << 20; // at most DATA_RING / 2
const PATH_RING = 1 << 20;
const PATH_IN_RING_MAX = 64 << 10; // longer paths are read by this thread from their own Buffer
/** Lookahead: the lister stops when this many events wait, and resumes below half of it. */
const EVENTS_AHEAD = 4096;
/** A worker is started once a walk has queued this many files (small trees never pay for one). */
const WORKER_AFTER_FILES = 192;
/** A root file at least this large waits for the worker, to overlap its read with the hash. */
const PATIENT_ROOT_MIN = 16 << 20;
/** Cap on that wait, should the worker never come up. */
const PATIENT_WAIT_MS = 2000;

const tagged = (index: number, tag: number): number => ((index & 0x0fffffff) << 3) | tag;

interface ReaderData {
  readonly control: SharedArrayBuffer;
  readonly slots: SharedArrayBuffer;
  readonly paths: SharedArrayBuffer;
  readonly data: SharedArrayBuffer;
  readonly layout: { K: number; SLOT: number; F: typeof F; C: typeof C; T: typeof T; CHUNK: number; flags: number };
}

/**
 * The worker's loop. It runs in another isolate from its source text, so it must refer to
 * nothing but its parameters and globals. It never throws: a file it cannot read is marked
 * failed (this thread then reads it itself, or reports the error), and anything unexpected
 * marks the worker dead so that this thread stops waiting for it.
 */
function readerMain(fsm: typeof fs, d: ReaderData): void {
  const { K, SLOT, F, C, T, CHUNK, flags } = d.layout;
  const ctl = new Int32Array(d.control);
  const slots = new Int32Array(d.slots);
  const data = new Uint8Array(d.data);
  const R = data.length;
  const tag = (index: number, t: number): number => ((index & 0x0fffffff) << 3) | t;
  let head = Atomics.load(ctl, C.head) >>> 0;
  let cursor = Atomics.load(ctl, C.consumed);

  const signal = (): void => {
    if (Atomics.load(ctl, C.mainWaiting) !== 0) {
      Atomics.add(ctl, C.workerEvents, 1);
      Atomics.notify(ctl, C.workerEvents);
    }
  };
  const waitForMain = (stillBlocked: () => boolean): void => {
    Atomics.store(ctl, C.workerWaiting, 1);
    const seen = Atomics.load(ctl, C.mainEvents);
    if (stillBlocked()) Atomics.wait(ctl, C.mainEvents, seen);
    Atomics.store(ctl, C.workerWaiting, 0);
  };
  const fail = (s: number, index: number, t: number, err: number): void => {
    slots[s + F.end] = head | 0;
    slots[s + F.err] = err;
    Atomics.store(slots, s + F.state, tag(index, t));
    signal();
  };

  const readOne = (index: number, s: number): void => {
    let fd = -1;
    let size: number;
    try {
      const path = Buffer.from(d.paths, slots[s + F.pathOff]!, slots[s + F.pathLen]!);
      fd = fsm.openSync(path, flags);
      const st = fsm.fstatSync(fd);
      size = st.size;
      slots[s + F.mode] = st.mode;
      slots[s + F.sizeLo] = size % 0x100000000 | 0;
      slots[s + F.sizeHi] = Math.floor(size / 0x100000000);
    } catch {
      if (fd >= 0) fsm.closeSync(fd);
      fail(s, index, T.failedEarly, 0);
      return;
    }
    Atomics.store(slots, s + F.state, tag(index, T.streaming));
    signal();
    try {
      let left = size;
      while (left > 0) {
        const n = Math.min(CHUNK, left);
        let start = head;
        const phys = start % R;
        if (phys + n > R) start = (start + R - phys) >>> 0;
        const end = (start + n) >>> 0;
        const blocked = (): boolean => Atomics.load(ctl, C.cancel) === 0 && ((end - Atomics.load(ctl, C.tail)) >>> 0) > R;
        while (blocked()) waitForMain(blocked);
        if (Atomics.load(ctl, C.cancel) !== 0) {
          fail(s, index, T.failedLate, 0);
          return;
        }
        const off = start % R;
        let got = 0;
        while (got < n) {
          const r = fsm.readSync(fd, data, off + got, n - got, null);
          if (r === 0) {
            fail(s, index, T.failedLate, -1);
            return;
          }
          got += r;
        }
        head = end;
        Atomics.store(ctl, C.head, head | 0);
        signal();
        left -= n;
      }
    } catch (e) {
      fail(s, index, T.failedLate, typeof (e as { errno?: unknown }).errno === "number" ? (e as { errno: number }).errno : 1);
      return;
    } finally {
      fsm.closeSync(fd);
    }
    slots[s + F.end] = head | 0;
    Atomics.store(slots, s + F.state, tag(index, T.done));
    signal();
  };

  try {
    for (;;) {
      const published = Atomics.load(ctl, C.published);
      const idle = (): boolean => Atomics.load(ctl, C.cancel) !== 0 || ((Atomics.load(ctl, C.published) - cursor) | 0) <= 0;
      if (idle()) {
        waitForMain(idle);
        continue;
      }
      const s = (cursor & (K - 1)) * SLOT;
      const queued = tag(cursor, T.queued);
      if (Atomics.compareExchange(slots, s + F.state, queued, tag(cursor, T.worker)) === queued) {
        readOne(cursor, s);
        cursor = (cursor + 1) | 0;
      } else {
        // The other thread took this file: it is reading where we are, so jump a little ahead of it.
        const ahead = (Atomics.load(ctl, C.consumed) + 16) | 0;
        const next = (cursor + 1) | 0;
        cursor = ((ahead - next) | 0) > 0 ? (((ahead - published) | 0) > 0 ? published : ahead) : next;
      }
    }
  } catch {
    Atomics.store(ctl, C.dead, 1);
    Atomics.add(ctl, C.workerEvents, 1);
    Atomics.notify(ctl, C.workerEvents);
  }
}

/**
 * The queues shared with one read-ahead worker, kept for the life of the thread (the worker is
 * unref'd and sleeps between walks). Counters never reset: each walk continues where the last
 * one stopped, so a worker that wakes late can never mistake one walk's files for another's.
 */
class ReadAhead {
  readonly control = new SharedArrayBuffer(CONTROL_WORDS * 4);
  readonly slotsBuf = new SharedArrayBuffer(K * SLOT * 4);
  readonly pathsBuf = new SharedArrayBuffer(PATH_RING);
  readonly dataBuf = new SharedArrayBuffer(DATA_RING);
  readonly ctl = new Int32Array(this.control);
  readonly slots = new Int32Array(this.slotsBuf);
  readonly paths = new Uint8Array(this.pathsBuf);
  readonly data = new Uint8Array(this.dataBuf);
  /** Virtual end of each slot's path in the path ring. */
  readonly pathEnd = new Float64Array(K);
  worker: Worker | undefined;
  workerFailed = availableParallelism() < 2;
  busy = false;
  published = 0;
  consumed = 0;
  /** Data ring read position (uint32, wrapping): equals TAIL between chunks. */
  rpos = 0;
  pathHead = 0;
  pathTail = 0;

  startWorker(): void {
    if (this.worker || this.workerFailed) return;
    const d: ReaderData = {
      control: this.control,
      slots: this.slotsBuf,
      paths: this.pathsBuf,
      data: this.dataBuf,
      layout: { K, SLOT, F, C, T, CHUNK, flags: O_RDONLY | O_NOFOLLOW },
    };
    try {
      const src = `(${readerMain.toString()})(require("node:fs"), require("node:worker_threads").workerData);`;
      this.worker = new Worker(src, { eval: true, workerData: d, name: "ferry-nar-read-ahead" });
      this.worker.unref();
      // Faults surface through the dead flag; an 'error' event must not crash the process.
      this.worker.on("error", () => Atomics.store(this.ctl, C.dead, 1));
    } catch {
      this.workerFailed = true;
    }
  }

  get hasWorker(): boolean {
    return this.worker !== undefined && Atomics.load(this.ctl, C.dead) === 0;
  }

  /** Tells a sleeping worker that something changed (new files, freed ring space, cancel). */
  wakeWorker(): void {
    if (Atomics.load(this.ctl, C.workerWaiting) !== 0) {
      Atomics.add(this.ctl, C.mainEvents, 1);
      Atomics.notify(this.ctl, C.mainEvents);
    }
  }

  /** Waits until `ready()` holds; false if `timeoutMs` passed first. Throws if the worker died. */
  waitForWorker(ready: () => boolean, timeoutMs = Infinity): boolean {
    for (let spin = 0; spin < 64; spin++) if (ready()) return true;
    const deadline = timeoutMs === Infinity ? Infinity : performance.now() + timeoutMs;
    for (;;) {
      Atomics.store(this.ctl, C.mainWaiting, 1);
      const seen = Atomics.load(this.ctl, C.workerEvents);
      if (ready()) break;
      if (Atomics.load(this.ctl, C.dead) !== 0) {
        Atomics.store(this.ctl, C.mainWaiting, 0);
        throw new Error("NAR read-ahead worker stopped unexpectedly");
      }
      const left = deadline - performance.now();
      if (left <= 0) {
        Atomics.store(this.ctl, C.mainWaiting, 0);
        return ready();
      }
      Atomics.wait(this.ctl, C.workerEvents, seen, left === Infinity ? undefined : left);
    }
    Atomics.store(this.ctl, C.mainWaiting, 0);
    return true;
  }

  get pathRoom(): number {
    return PATH_RING - (this.pathHead - this.pathTail);
  }

  /** Queues the file `dir/name` (or `dir` alone when `name` is null); returns its index. */
  queue(dir: Buffer, name: Buffer | null): number {
    const len = name ? dir.length + 1 + name.length : dir.length;
    let off = this.pathHead % PATH_RING;
    if (off + len > PATH_RING) {
      this.pathHead += PATH_RING - off;
      off = 0;
    }
    this.paths.set(dir, off);
    if (name) {
      this.paths[off + dir.length] = SLASH;
      this.paths.set(name, off + dir.length + 1);
    }
    this.pathHead += len;
    const index = this.published;
    const slot = index & (K - 1);
    const s = slot * SLOT;
    this.slots[s + F.pathOff] = off;
    this.slots[s + F.pathLen] = len;
    this.pathEnd[slot] = this.pathHead;
    Atomics.store(this.slots, s + F.state, tagged(index, T.queued));
    this.published = (index + 1) | 0;
    return index;
  }

  /** Makes the queued files visible to the worker. */
  publish(): void {
    if (Atomics.load(this.ctl, C.published) === this.published) return;
    Atomics.store(this.ctl, C.published, this.published);
    this.wakeWorker();
  }

  pathOf(index: number): Buffer {
    const s = (index & (K - 1)) * SLOT;
    return Buffer.from(this.pathsBuf, this.slots[s + F.pathOff]!, this.slots[s + F.pathLen]!);
  }

  /** Marks file `index` (the oldest queued one) consumed; `end` is where its data ended, if the worker read it. */
  release(index: number, end: number | undefined): void {
    const slot = index & (K - 1);
    if (end !== undefined && end !== this.rpos) {
      this.rpos = end >>> 0;
      Atomics.store(this.ctl, C.tail, this.rpos | 0);
    }
    Atomics.store(this.slots, slot * SLOT + F.state, T.free);
    this.pathTail = this.pathEnd[slot]!;
    this.consumed = (index + 1) | 0;
    Atomics.store(this.ctl, C.consumed, this.consumed);
    this.wakeWorker();
  }

  /**
   * After a walk failed part-way: consume every file still queued, letting the worker abandon
   * the one it is reading, so the next walk starts from a clean state.
   */
  drain(): void {
    Atomics.store(this.ctl, C.cancel, 1);
    Atomics.add(this.ctl, C.mainEvents, 1);
    Atomics.notify(this.ctl, C.mainEvents);
    try {
      while (this.consumed !== this.published) {
        const index = this.consumed;
        const s = (index & (K - 1)) * SLOT;
        const q = tagged(index, T.queued);
        if (Atomics.compareExchange(this.slots, s + F.state, q, tagged(index, T.main)) === q || Atomics.load(this.slots, s + F.state) === tagged(index, T.main)) {
          this.release(index, undefined);
          continue;
        }
        const finished = (): boolean => {
          const t = Atomics.load(this.slots, s + F.state) & 7;
          return t === T.done || t === T.failedEarly || t === T.failedLate;
        };
        this.waitForWorker(finished);
        this.release(index, this.slots[s + F.end]!);
      }
    } finally {
      Atomics.store(this.ctl, C.cancel, 0);
      Atomics.add(this.ctl, C.mainEvents, 1);
      Atomics.notify(this.ctl, C.mainEvents);
    }
  }
}

let shared: ReadAhead | undefined;

/** One walk event, in NAR order. `name` is null for the root. */
const EV_DIR = 0;
const EV_DIR_END = 1;
const EV_FILE = 2;
const EV_SYMLINK = 3;
class Ev {
  constructor(
    readonly kind: number,
    readonly name: Buffer | null,
    /** EV_FILE: the file's queue index, or -1 when `bytes` holds its path instead. */
    readonly index: number,
    /** EV_SYMLINK: the target; EV_FILE with index -1: the path. */
    readonly bytes: Buffer | null,
  ) {}
}

interface Frame {
  readonly path: Buffer;
  readonly name: Buffer | null;
  readonly entries: fs.Dirent<Buffer>[];
  i: number;
}

class Dumper {
  readonly #w: NarWriter;
  readonly #ra: ReadAhead;
  readonly #opts: DumpOptions;
  readonly #big = Buffer.allocUnsafe(BIG_READ);
  // Lister state: it runs ahead of the writer, up to EVENTS_AHEAD events.
  readonly #stack: Frame[] = [];
  #events: Ev[] = [];
  #next = 0;
  #listed = false;
  #queuedFiles = 0;
  /** Wait for the worker to take the root file instead of reading it here. */
  #patientRoot = false;
  /** Copy destinations of the open directories (copy mode only). */
  readonly #copies: Buffer[] = [];

  constructor(w: NarWriter, ra: ReadAhead, opts: DumpOptions) {
    this.#w = w;
    this.#ra = ra;
    this.#opts = opts;
  }

  run(root: Buffer, copy: Buffer | undefined): void {
    let st: fs.Stats;
    try {
      st = fs.lstatSync(root);
    } catch (e) {
      throw new FerryError("FERRY_PATH_UNREADABLE", `cannot read '${root.toString()}': ${(e as Error).message}`, {
        hint: "check that the path exists and is readable",
      });
    }
    if (copy) this.#copies.push(copy);
    if (st.isDirectory()) this.#listDirectory(root, null);
    else if (st.isSymbolicLink()) this.#listSymlink(root, null);
    else if (st.isFile()) {
      this.#patientRoot = st.size >= PATIENT_ROOT_MIN;
      this.#listFile(root, null);
    } else this.#unsupported(root);
    this.#fill();
    while (this.#next < this.#events.length) {
      const ev = this.#events[this.#next++]!;
      this.#emit(ev);
      if (!this.#listed && this.#events.length - this.#next < EVENTS_AHEAD / 2) this.#fill();
    }
  }

  // ---- the lister -------------------------------------------------------------------------

  #fill(): void {
    if (this.#next > 0) {
      this.#events = this.#events.slice(this.#next);
      this.#next = 0;
    }
    const ra = this.#ra;
    while (!this.#listed && this.#events.length < EVENTS_AHEAD && ((ra.published - ra.consumed) | 0) < K && ra.pathRoom >= 2 * PATH_IN_RING_MAX) {
      this.#step();
    }
    if ((this.#queuedFiles >= WORKER_AFTER_FILES || this.#patientRoot) && !ra.worker) ra.startWorker();
    ra.publish();
  }

  #step(): void {
    const f = this.#stack[this.#stack.length - 1];
    if (!f) {
      this.#listed = true;
      return;
    }
    if (f.i === f.entries.length) {
      this.#stack.pop();
      this.#events.push(new Ev(EV_DIR_END, f.name, -1, null));
      if (this.#stack.length === 0) this.#listed = true;
      return;
    }
    const e = f.entries[f.i++]!;
    if (e.isFile()) this.#listFile(f.path, e.name);
    else if (e.isDirectory()) this.#listDirectory(childPath(f.path, e.name), e.name);
    else if (e.isSymbolicLink()) this.#listSymlink(childPath(f.path, e.name), e.name);
    else if (e.isBlockDevice() || e.isCharacterDevice() || e.isFIFO() || e.isSocket()) this.#unsupported(childPath(f.path, e.name));
    else {
      // DT_UNKNOWN on some filesystems: ask lstat.
      const path = childPath(f.path, e.name);
      const st = fs.lstatSync(path);
      if (st.isFile()) this.#listFile(f.path, e.name);
      else if (st.isDirectory()) this.#listDirectory(path, e.name);
      else if (st.isSymbolicLink()) this.#listSymlink(path, e.name);
      else this.#unsupported(path);
    }
  }

  /** `name` null: `dir` is the file itself (the root). */
  #listFile(dir: Buffer, name: Buffer | null): void {
    const len = name ? dir.length + 1 + name.length : dir.length;
    this.#queuedFiles++;
    if (len > PATH_IN_RING_MAX) this.#events.push(new Ev(EV_FILE, name, -1, name ? childPath(dir, name) : dir));
    else this.#events.push(new Ev(EV_FILE, name, this.#ra.queue(dir, name), null));
  }

  #listDirectory(path: Buffer, name: Buffer | null): void {
    const entries = fs.readdirSync(path, { withFileTypes: true, encoding: "buffer" }) as unknown as fs.Dirent<Buffer>[];
    entries.sort((a, b) => compareBytes(a.name, b.name));
    this.#events.push(new Ev(EV_DIR, name, -1, null));
    this.#stack.push({ path, name, entries, i: 0 });
  }

  #listSymlink(path: Buffer, name: Buffer | null): void {
    this.#events.push(new Ev(EV_SYMLINK, name, -1, fs.readlinkSync(path, { encoding: "buffer" })));
  }

  #unsupported(path: Buffer): never {
    throw new FerryError("FERRY_NAR_UNSUPPORTED_FILE", `'${path.toString()}' is not a regular file, directory or symlink`, {
      hint: "NAR archives hold only regular files, directories and symlinks; remove sockets, devices and pipes first",
    });
  }

  // ---- the writer side ---------------------------------------------------------------------

  #emit(ev: Ev): void {
    const w = this.#w;
    const parentCopy = this.#copies[this.#copies.length - 1];
    switch (ev.kind) {
      case EV_DIR: {
        if (ev.name) w.openEntry(ev.name);
        w.openDirectory();
        if (parentCopy) {
          const copy = ev.name ? childPath(parentCopy, ev.name) : parentCopy;
          fs.mkdirSync(copy, { mode: 0o700 });
          if (ev.name) this.#copies.push(copy);
        }
        return;
      }
      case EV_DIR_END: {
        w.closeDirectory();
        if (ev.name) w.closeEntry();
        if (parentCopy) {
          if (ev.name) this.#copies.pop();
          fs.chmodSync(parentCopy, 0o555);
          fs.utimesSync(parentCopy, 1, 1);
          const fd = fs.openSync(parentCopy, O_RDONLY);
          fs.fsyncSync(fd);
          fs.closeSync(fd);
        }
        return;
      }
      case EV_SYMLINK: {
        if (ev.name) w.openEntry(ev.name);
        w.symlink(ev.bytes!);
        if (parentCopy) {
          const copy = ev.name ? childPath(parentCopy, ev.name) : parentCopy;
          fs.symlinkSync(ev.bytes!, copy);
          fs.lutimesSync(copy, 1, 1);
        }
        if (ev.name) w.closeEntry();
        return;
      }
      default: {
        if (ev.name) w.openEntry(ev.name);
        const copy = parentCopy && ev.name ? childPath(parentCopy, ev.name) : parentCopy;
        if (ev.index < 0) this.#readHere(ev.bytes!, copy);
        else this.#queuedFile(ev.index, copy);
        if (ev.name) w.closeEntry();
      }
    }
  }

  /** The next queued file: read here if the worker has not taken it, else from the ring. */
  #queuedFile(index: number, copy: Buffer | undefined): void {
    const ra = this.#ra;
    const s = (index & (K - 1)) * SLOT;
    const queued = tagged(index, T.queued);
    const steal = (): boolean => Atomics.compareExchange(ra.slots, s + F.state, queued, tagged(index, T.main)) === queued;
    if (this.#patientRoot && ra.hasWorker) ra.waitForWorker(() => Atomics.load(ra.slots, s + F.state) !== queued, PATIENT_WAIT_MS);
    if (steal()) {
      this.#readHere(ra.pathOf(index), copy);
      ra.release(index, undefined);
      return;
    }
    const tagOf = (): number => Atomics.load(ra.slots, s + F.state) & 7;
    ra.waitForWorker(() => tagOf() >= T.streaming);
    if (tagOf() === T.failedEarly) {
      // The worker could not open or stat it; reading it here reports the error (or succeeds).
      const end = ra.slots[s + F.end]!;
      this.#readHere(ra.pathOf(index), copy);
      ra.release(index, end);
      return;
    }
    const mode = ra.slots[s + F.mode]!;
    const size = (ra.slots[s + F.sizeLo]! >>> 0) + ra.slots[s + F.sizeHi]! * 0x100000000;
    const executable = !this.#opts.stripExecutable && (mode & 0o100) !== 0;
    const w = this.#w;
    w.openRegular(executable, size);
    const out = copy ? fs.openSync(copy, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600) : undefined;
    try {
      let left = size;
      while (left > 0) {
        const n = Math.min(CHUNK, left);
        let start = ra.rpos;
        const phys = start % DATA_RING;
        if (phys + n > DATA_RING) start = (start + DATA_RING - phys) >>> 0;
        const end = (start + n) >>> 0;
        ra.waitForWorker(() => ((Atomics.load(ra.ctl, C.head) - end) | 0) >= 0 || tagOf() === T.failedLate);
        if (((Atomics.load(ra.ctl, C.head) - end) | 0) < 0) break; // failed part-way
        const chunk = ra.data.subarray(start % DATA_RING, start % DATA_RING + n);
        if (out !== undefined) writeFully(out, chunk);
        w.writeContents(chunk);
        ra.rpos = end;
        Atomics.store(ra.ctl, C.tail, end | 0);
        ra.wakeWorker();
        left -= n;
      }
      ra.waitForWorker(() => tagOf() >= T.done);
      if (tagOf() === T.failedLate) {
        const err = ra.slots[s + F.err]!;
        const path = ra.pathOf(index).toString();
        ra.release(index, ra.slots[s + F.end]!);
        if (err === -1) throw shrank(path);
        throw new FerryError("FERRY_PATH_UNREADABLE", `cannot read '${path}': ${err < 0 ? getSystemErrorName(err) : "read failed"}`);
      }
      ra.release(index, ra.slots[s + F.end]!);
      w.closeRegular();
      if (out !== undefined) finishCopy(out, executable);
    } finally {
      if (out !== undefined) fs.closeSync(out);
    }
    this.#opts.onFile?.(size);
  }

  /** Reads a regular file on this thread, small ones straight into the writer's batch buffer. */
  #readHere(path: Buffer, copy: Buffer | undefined): void {
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
        if (n === 0) throw shrank(path.toString());
        left -= n;
      }
      w.closeRegular();
      if (out !== undefined) finishCopy(out, executable);
      this.#opts.onFile?.(size);
    } finally {
      fs.closeSync(fd);
      if (out !== undefined) fs.closeSync(out);
    }
  }
}

function childPath(dir: Buffer, name: Buffer): Buffer {
  const p = Buffer.allocUnsafe(dir.length + 1 + name.length);
  dir.copy(p, 0);
  p[dir.length] = SLASH;
  name.copy(p, dir.length + 1);
  return p;
}

function shrank(path: string): FerryError {
  return new FerryError("FERRY_PATH_CHANGED", `'${path}' shrank while it was being read`, {
    hint: "something is writing to the file; try again once it is stable",
  });
}

function finishCopy(out: number, executable: boolean): void {
  fs.fchmodSync(out, executable ? 0o555 : 0o444);
  fs.futimesSync(out, 1, 1);
  fs.fsyncSync(out);
}

function writeFully(fd: number, data: Uint8Array): void {
  let off = 0;
  while (off < data.length) off += fs.writeSync(fd, data, off, data.length - off);
}

/** Streams the NAR of `path` into `sink`; returns the NAR size. */
export function dumpPath(path: string, sink: NarSink, opts: DumpOptions = {}): number {
  const w = new NarWriter(sink);
  // One read-ahead per thread; a walk started from inside a sink gets its own, without a worker.
  let ra = (shared ??= new ReadAhead());
  if (ra.busy) {
    ra = new ReadAhead();
    ra.workerFailed = true;
  }
  ra.busy = true;
  try {
    new Dumper(w, ra, opts).run(Buffer.from(path), opts.copyTo ? Buffer.from(opts.copyTo) : undefined);
  } catch (e) {
    ra.drain();
    throw e;
  } finally {
    ra.busy = false;
  }
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

/**
 * A streaming NAR writer (SPEC §2). It frames tokens into one reusable batch buffer and hands
 * full batches to a sink, so a hash or a socket sees few large chunks instead of many tiny ones.
 *
 * Contract for the sink: a chunk is only valid during the call; the writer reuses its memory.
 * The writer checks the structure it is given (entry names valid, strictly ascending, contents
 * exactly as long as announced) and throws a plain Error on misuse: callers own the walk.
 */
import { compareBytes, invalidEntryNameReason } from "./names.js";

export type NarSink = (chunk: Uint8Array) => void;

const enc = new TextEncoder();
const TOK = {
  magic: enc.encode("nix-archive-1"),
  open: enc.encode("("),
  close: enc.encode(")"),
  type: enc.encode("type"),
  regular: enc.encode("regular"),
  executable: enc.encode("executable"),
  empty: new Uint8Array(0),
  contents: enc.encode("contents"),
  symlink: enc.encode("symlink"),
  target: enc.encode("target"),
  directory: enc.encode("directory"),
  entry: enc.encode("entry"),
  name: enc.encode("name"),
  node: enc.encode("node"),
};

/** Framed tokens: each a u64 length, the bytes, zero padding to 8. */
function framed(...tokens: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(tokens.reduce((n, t) => n + 8 + Math.ceil(t.length / 8) * 8, 0));
  let off = 0;
  for (const t of tokens) {
    new DataView(out.buffer).setUint32(off, t.length, true);
    out.set(t, off + 8);
    off += 8 + Math.ceil(t.length / 8) * 8;
  }
  return out;
}

/** The fixed token runs of the hot paths, framed once. */
const RUN = {
  entryName: framed(TOK.entry, TOK.open, TOK.name),
  node: framed(TOK.node),
  regular: framed(TOK.open, TOK.type, TOK.regular, TOK.contents),
  executable: framed(TOK.open, TOK.type, TOK.regular, TOK.executable, TOK.empty, TOK.contents),
  close: framed(TOK.close),
  symlink: framed(TOK.open, TOK.type, TOK.symlink, TOK.target),
  directory: framed(TOK.open, TOK.type, TOK.directory),
};

/** Chunks at least this large bypass the batch buffer and go to the sink as they are. */
const DIRECT_WRITE_MIN = 64 * 1024;

export class NarWriter {
  readonly #sink: NarSink;
  readonly #buf: Uint8Array;
  readonly #view: DataView;
  #pos = 0;
  #written = 0;
  /** Remaining content bytes of the regular file being written, or -1 when none is open. */
  #remaining = -1;
  #contentSize = 0;
  /** Last entry name per open directory, to enforce strict ascending order. */
  readonly #dirs: (Uint8Array | null)[] = [];

  /**
   * `buffer` is the batch buffer, or its size (at least 8 bytes, one length prefix); it never
   * changes the output. A buffer given is the writer's until `end()` (one that writes many small
   * NARs in turn reuses one instead of allocating 256 KiB for each).
   */
  constructor(sink: NarSink, buffer: number | Uint8Array = 256 * 1024) {
    const size = typeof buffer === "number" ? buffer : buffer.length;
    if (!Number.isInteger(size) || size < 8) throw new Error(`NAR writer: a batch buffer of ${size} bytes cannot hold a length prefix`);
    this.#sink = sink;
    this.#buf = typeof buffer === "number" ? new Uint8Array(buffer) : buffer;
    this.#view = new DataView(this.#buf.buffer, this.#buf.byteOffset, this.#buf.byteLength);
    this.#str(TOK.magic);
  }

  /** Bytes emitted so far, flushed or not: the NAR size once `end()` returns. */
  get size(): number {
    return this.#written + this.#pos;
  }

  #ensure(n: number): void {
    if (this.#pos + n > this.#buf.length) this.flush();
  }

  #u64(n: number): void {
    this.#ensure(8);
    this.#view.setUint32(this.#pos, n >>> 0, true);
    this.#view.setUint32(this.#pos + 4, Math.floor(n / 0x100000000), true);
    this.#pos += 8;
  }

  #raw(bytes: Uint8Array): void {
    // Large pieces, and pieces that could not fit even an empty batch buffer, go out as they are.
    if (bytes.length >= DIRECT_WRITE_MIN || bytes.length > this.#buf.length) {
      this.flush();
      this.#sink(bytes);
      this.#written += bytes.length;
      return;
    }
    this.#ensure(bytes.length);
    this.#buf.set(bytes, this.#pos);
    this.#pos += bytes.length;
  }

  #pad(len: number): void {
    const p = (8 - (len % 8)) % 8;
    if (p === 0) return;
    this.#ensure(p);
    this.#buf.fill(0, this.#pos, this.#pos + p);
    this.#pos += p;
  }

  #str(bytes: Uint8Array): void {
    this.#u64(bytes.length);
    this.#raw(bytes);
    this.#pad(bytes.length);
  }

  /** Starts a regular file of exactly `size` bytes; follow with contents, then `closeRegular`. */
  openRegular(executable: boolean, size: number): void {
    this.#raw(executable ? RUN.executable : RUN.regular);
    this.#u64(size);
    this.#remaining = size;
    this.#contentSize = size;
  }

  writeContents(chunk: Uint8Array): void {
    if (chunk.length > this.#remaining) throw new Error("NAR writer: more contents than the announced size");
    this.#raw(chunk);
    this.#remaining -= chunk.length;
  }

  /**
   * A view of up to `max` free bytes of the batch buffer to read file contents straight into,
   * saving a copy; call `commit(n)` with the number of bytes actually filled.
   */
  reserve(max: number): Uint8Array {
    if (this.#buf.length - this.#pos < Math.min(max, 4096)) this.flush();
    return this.#buf.subarray(this.#pos, this.#pos + Math.min(max, this.#buf.length - this.#pos, this.#remaining));
  }

  commit(n: number): void {
    if (n > this.#remaining) throw new Error("NAR writer: more contents than the announced size");
    this.#pos += n;
    this.#remaining -= n;
  }

  /** Bytes of the open file still to be written. */
  get remaining(): number {
    return this.#remaining;
  }

  closeRegular(): void {
    if (this.#remaining !== 0) throw new Error(`NAR writer: file closed with ${this.#remaining} bytes missing`);
    this.#pad(this.#contentSize);
    this.#remaining = -1;
    this.#raw(RUN.close);
  }

  /** A whole regular file whose contents are in memory. */
  regular(executable: boolean, contents: Uint8Array): void {
    this.openRegular(executable, contents.length);
    this.writeContents(contents);
    this.closeRegular();
  }

  symlink(target: Uint8Array): void {
    this.#raw(RUN.symlink);
    this.#str(target);
    this.#raw(RUN.close);
  }

  openDirectory(): void {
    this.#raw(RUN.directory);
    this.#dirs.push(null);
  }

  /** Starts the entry `name` of the open directory; write its node, then `closeEntry`. */
  openEntry(name: Uint8Array): void {
    const depth = this.#dirs.length - 1;
    if (depth < 0) throw new Error("NAR writer: entry outside a directory");
    const why = invalidEntryNameReason(name);
    if (why) throw new Error(`NAR writer: ${why}`);
    const prev = this.#dirs[depth];
    if (prev && compareBytes(prev, name) >= 0) throw new Error("NAR writer: entries must be strictly ascending by bytes");
    this.#dirs[depth] = name;
    this.#raw(RUN.entryName);
    this.#str(name);
    this.#raw(RUN.node);
  }

  closeEntry(): void {
    this.#raw(RUN.close);
  }

  closeDirectory(): void {
    this.#dirs.pop();
    this.#raw(RUN.close);
  }

  flush(): void {
    if (this.#pos === 0) return;
    this.#sink(this.#buf.subarray(0, this.#pos));
    this.#written += this.#pos;
    this.#pos = 0;
  }

  /** Flushes what is left; returns the NAR size. */
  end(): number {
    this.flush();
    return this.#written;
  }
}

/** The NAR of a non-executable regular file around its u64 size and padded contents. */
const REGULAR_FILE = { head: framed(TOK.magic, TOK.open, TOK.type, TOK.regular, TOK.contents), tail: RUN.close };

/**
 * The whole NAR of a single non-executable regular file holding `contents`, built in `scratch`
 * when it fits (the result is then a view of it, valid until the next call) or in a new buffer.
 * The same bytes as a NarWriter's, without a writer per object: for many small objects such as
 * .drv files.
 */
export function narOfRegularFile(contents: Uint8Array, scratch?: Uint8Array): Uint8Array {
  const { head, tail } = REGULAR_FILE;
  const padded = Math.ceil(contents.length / 8) * 8;
  const size = head.length + 8 + padded + tail.length;
  const b = scratch && scratch.length >= size ? scratch.subarray(0, size) : new Uint8Array(size);
  b.set(head, 0);
  const view = new DataView(b.buffer, b.byteOffset, size);
  view.setUint32(head.length, contents.length >>> 0, true);
  view.setUint32(head.length + 4, Math.floor(contents.length / 0x100000000), true);
  const at = head.length + 8;
  b.set(contents, at);
  b.fill(0, at + contents.length, at + padded);
  b.set(tail, at + padded);
  return b;
}

/**
 * The wire format from the evaluation subprocess to its parent: length-prefixed frames, so the
 * parent finds message boundaries without scanning or unescaping the .drv texts.
 *
 * A frame is: u32 LE payload length, one kind byte, the payload. Kind TEXT carries one text
 * record (store/text-records: planned path, name, references, the text's bytes); kind JOB one
 * job, as UTF-8 strings each after its u32 LE byte length: attribute path, name, system, .drv
 * path, the number of outputs (a u32) and each output's name and path, then the meta as JSON
 * ("" for none); kind JSON carries a UTF-8 JSON object with a `t` field (`source`, `done`,
 * `error`).
 */
import { FerryError } from "../core/errors.js";
import { encodeTextRecord, maxTextRecordSize, type TextRecordSource } from "../store/text-records.js";

export const FRAME_TEXT = 0x54; // "T"
export const FRAME_JOB = 0x50; // "P"
export const FRAME_JSON = 0x4a; // "J"

/** A job as it crosses the protocol (the evaluator's EvalJob). */
export interface JobMessage {
  readonly attr: string;
  readonly name: string;
  readonly system: string;
  readonly drvPath: string;
  /** Output name -> store path. */
  readonly outputs: Readonly<Record<string, string>>;
  readonly meta: Readonly<Record<string, unknown>>;
}
const FRAME_HEADER = 5;
/** No honest frame comes near this; a length beyond it means the stream is not this protocol. */
export const MAX_FRAME = 256 * 1024 * 1024;

export function protocolError(why: string): FerryError {
  return new FerryError("FERRY_EVAL_PROTOCOL", `the evaluator sent something that is not part of its protocol (${why})`, {
    hint: "package code must not write to file descriptor 3",
  });
}

/** Collects frames in one buffer and hands it to `write` whenever `flushAt` bytes are queued. */
export class FrameWriter {
  #buf: Buffer;
  #pos = 0;
  readonly #write: (bytes: Uint8Array) => void;
  readonly #flushAt: number;

  constructor(write: (bytes: Uint8Array) => void, flushAt = 256 * 1024) {
    this.#write = write;
    this.#flushAt = flushAt;
    this.#buf = Buffer.allocUnsafe(2 * flushAt);
  }

  #reserve(n: number): void {
    if (this.#pos + n <= this.#buf.length) return;
    this.flush();
    if (n > this.#buf.length) this.#buf = Buffer.allocUnsafe(n);
  }

  #finish(start: number, kind: number, end: number): void {
    this.#buf.writeUInt32LE(end - start - FRAME_HEADER, start);
    this.#buf[start + 4] = kind;
    this.#pos = end;
    if (this.#pos >= this.#flushAt) this.flush();
  }

  text(t: TextRecordSource): void {
    this.#reserve(FRAME_HEADER + maxTextRecordSize(t));
    const start = this.#pos;
    this.#finish(start, FRAME_TEXT, encodeTextRecord(this.#buf, start + FRAME_HEADER, t));
  }

  /** Writes a job; an output is its path or something that has one (a package's output). */
  job(j: Omit<JobMessage, "outputs"> & { readonly outputs: Readonly<Record<string, string | { readonly path: string }>> }): void {
    const names = Object.keys(j.outputs);
    const pathOf = (o: string): string => {
      const v = j.outputs[o]!;
      return typeof v === "string" ? v : v.path;
    };
    let meta = "";
    for (const _ in j.meta) {
      meta = JSON.stringify(j.meta);
      break;
    }
    let max = 4 * (6 + 2 * names.length) + 3 * (j.attr.length + j.name.length + j.system.length + j.drvPath.length + meta.length);
    for (const o of names) max += 3 * (o.length + pathOf(o).length);
    this.#reserve(FRAME_HEADER + max);
    const start = this.#pos;
    let at = start + FRAME_HEADER;
    const str = (v: string) => {
      const n = this.#buf.write(v, at + 4, "utf8");
      this.#buf.writeUInt32LE(n, at);
      at += 4 + n;
    };
    str(j.attr);
    str(j.name);
    str(j.system);
    str(j.drvPath);
    this.#buf.writeUInt32LE(names.length, at);
    at += 4;
    for (const o of names) {
      str(o);
      str(pathOf(o));
    }
    str(meta);
    this.#finish(start, FRAME_JOB, at);
  }

  json(msg: { t: string } & Record<string, unknown>): void {
    const s = JSON.stringify(msg);
    this.#reserve(FRAME_HEADER + 3 * s.length);
    const start = this.#pos;
    this.#finish(start, FRAME_JSON, start + FRAME_HEADER + this.#buf.write(s, start + FRAME_HEADER, "utf8"));
  }

  flush(): void {
    if (this.#pos === 0) return;
    this.#write(this.#buf.subarray(0, this.#pos));
    this.#pos = 0;
  }
}

/**
 * Splits a byte stream into frames. `onFrame` gets each frame's kind and where its payload is:
 * `buf[start, end)`, valid only during the call (no view is made per frame). Throws a
 * FERRY_EVAL_PROTOCOL error for a stream that is not made of frames.
 */
export class FrameReader {
  /** The start of an incomplete frame, in pieces, and how many bytes it needs in all. */
  #parts: Buffer[] = [];
  #have = 0;
  #need = 0;
  readonly #onFrame: (kind: number, buf: Buffer, start: number, end: number) => void;

  constructor(onFrame: (kind: number, buf: Buffer, start: number, end: number) => void) {
    this.#onFrame = onFrame;
  }

  push(chunk: Buffer): void {
    let buf = chunk;
    if (this.#parts.length) {
      this.#parts.push(chunk);
      this.#have += chunk.length;
      if (this.#have < this.#need) return;
      buf = Buffer.concat(this.#parts, this.#have);
      this.#parts = [];
    }
    let off = 0;
    let need = FRAME_HEADER;
    while (buf.length - off >= FRAME_HEADER) {
      const len = buf.readUInt32LE(off);
      const kind = buf[off + 4]!;
      if (len > MAX_FRAME || (kind !== FRAME_TEXT && kind !== FRAME_JOB && kind !== FRAME_JSON)) throw protocolError("a malformed frame header");
      const end = off + FRAME_HEADER + len;
      if (end > buf.length) {
        need = FRAME_HEADER + len;
        break;
      }
      this.#onFrame(kind, buf, off + FRAME_HEADER, end);
      off = end;
      need = FRAME_HEADER;
    }
    if (off < buf.length) {
      this.#parts = [buf.subarray(off)];
      this.#have = buf.length - off;
      this.#need = need;
    }
  }

  /** The stream ended: anything left over is a truncated frame. */
  end(): void {
    if (this.#parts.length) throw protocolError("a truncated frame at the end");
  }
}

/**
 * Reads the JOB frame `buf[start, end)` field by field. A parent reads a hundred thousand jobs
 * at the end of a large evaluation while the evaluator waits for it, so this allocates nothing
 * but the strings it returns.
 */
class JobCursor {
  #at: number;

  constructor(
    readonly buf: Buffer,
    start: number,
    readonly end: number,
  ) {
    this.#at = start;
  }

  get done(): boolean {
    return this.#at === this.end;
  }

  u32(): number {
    const at = this.#at;
    if (this.end - at < 4) throw protocolError("a truncated job");
    this.#at = at + 4;
    return this.buf.readUInt32LE(at);
  }

  str(): string {
    const n = this.u32();
    const at = this.#at;
    if (this.end - at < n) throw protocolError("a truncated job");
    this.#at = at + n;
    // Buffer's own UTF-8 decoder, without toString's argument handling (a third of the time here).
    return (this.buf as Buffer & { utf8Slice(start: number, end: number): string }).utf8Slice(at, at + n);
  }
}

/** The job in the JOB frame `buf[start, end)`; a frame that is not one is a protocol error. */
export function decodeJob(buf: Buffer, start: number, end: number): JobMessage {
  const c = new JobCursor(buf, start, end);
  const attr = c.str();
  const name = c.str();
  const system = c.str();
  const drvPath = c.str();
  const count = c.u32();
  const outputs: Record<string, string> = {};
  for (let k = 0; k < count; k++) {
    const o = c.str();
    if (!(o in outputs)) {
      outputs[o] = c.str();
      continue;
    }
    if (Object.prototype.hasOwnProperty.call(outputs, o)) throw protocolError(`a job with two outputs named '${o}'`);
    // Defined, not assigned: an output named like an Object.prototype member (`__proto__`) is an output too.
    Object.defineProperty(outputs, o, { value: c.str(), enumerable: true, writable: true, configurable: true });
  }
  const metaText = c.str();
  if (!c.done) throw protocolError("a job with bytes after its meta");
  let meta: Record<string, unknown> = {};
  if (metaText) {
    try {
      meta = JSON.parse(metaText) as Record<string, unknown>;
    } catch {
      throw protocolError("a job whose meta is not JSON");
    }
    if (meta === null || typeof meta !== "object" || Array.isArray(meta)) throw protocolError("a job whose meta is not an object");
  }
  return { attr, name, system, drvPath, outputs, meta };
}

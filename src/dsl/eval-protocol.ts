/**
 * The wire format from the evaluation subprocess to its parent: length-prefixed frames, so the
 * parent finds message boundaries without scanning or unescaping the .drv texts.
 *
 * A frame is: u32 LE payload length, one kind byte, the payload. Kind TEXT carries one text
 * record (store/text-records: planned path, name, references, the text's bytes); kind JSON
 * carries a UTF-8 JSON object with a `t` field (`source`, `job`, `done`, `error`).
 */
import { FerryError } from "../core/errors.js";
import { encodeTextRecord, maxTextRecordSize, type TextRecordSource } from "../store/text-records.js";

export const FRAME_TEXT = 0x54; // "T"
export const FRAME_JSON = 0x4a; // "J"
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
      if (len > MAX_FRAME || (kind !== FRAME_TEXT && kind !== FRAME_JSON)) throw protocolError("a malformed frame header");
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

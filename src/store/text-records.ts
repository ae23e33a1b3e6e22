/**
 * Text objects to add (an evaluation's .drv files) in a compact binary form, so a batch can be
 * handed between threads as one transferable buffer and its contents written to files without
 * ever being decoded into strings.
 *
 * A record is: u32 LE header length, u32 LE text length, the header (UTF-8: the expected store
 * path, the name and each reference, separated by "\n"; none of them can contain a newline),
 * then the text's UTF-8 bytes. A batch is records back to back.
 */
import { FerryError } from "../core/errors.js";

export const TEXT_RECORD_PREFIX = 8;

export interface TextRecord {
  readonly expectedPath: string;
  readonly name: string;
  readonly references: readonly string[];
  /** The text's bytes: a view into the batch, valid while the batch is. */
  readonly bytes: Uint8Array;
}

export interface TextRecordSource {
  readonly storePath: string;
  readonly name: string;
  readonly text: string;
  readonly references: readonly string[];
}

/** An upper bound of the bytes `encodeTextRecord` writes for `t`. */
export function maxTextRecordSize(t: TextRecordSource): number {
  let header = t.storePath.length + t.name.length + 1;
  for (const r of t.references) header += r.length + 1;
  return TEXT_RECORD_PREFIX + 3 * (header + t.text.length);
}

/** Writes `t` as a record at `offset` of `buf` (with room for `maxTextRecordSize(t)`); returns the end. */
export function encodeTextRecord(buf: Buffer, offset: number, t: TextRecordSource): number {
  const header = t.references.length ? `${t.storePath}\n${t.name}\n${t.references.join("\n")}` : `${t.storePath}\n${t.name}`;
  const headerLen = buf.write(header, offset + TEXT_RECORD_PREFIX, "utf8");
  const textLen = buf.write(t.text, offset + TEXT_RECORD_PREFIX + headerLen, "utf8");
  buf.writeUInt32LE(headerLen, offset);
  buf.writeUInt32LE(textLen, offset + 4);
  return offset + TEXT_RECORD_PREFIX + headerLen + textLen;
}

function u32le(b: Uint8Array, at: number): number {
  return (b[at]! | (b[at + 1]! << 8) | (b[at + 2]! << 16) | (b[at + 3]! << 24)) >>> 0;
}

/** Why `bytes[start, end)` is not exactly one well-formed record, or undefined when it is. */
export function textRecordFault(bytes: Uint8Array, start: number, end: number): string | undefined {
  if (end - start < TEXT_RECORD_PREFIX) return "a text record shorter than its prefix";
  const headerLen = u32le(bytes, start);
  const textLen = u32le(bytes, start + 4);
  if (TEXT_RECORD_PREFIX + headerLen + textLen !== end - start) return "a text record whose lengths do not add up";
  return undefined;
}

/** Calls `visit` with where each record of `batch` has its header and its text, in order. */
function eachRecord(batch: Uint8Array, visit: (buf: Buffer, headerStart: number, textStart: number, end: number) => void): void {
  const buf = Buffer.from(batch.buffer, batch.byteOffset, batch.byteLength);
  let off = 0;
  while (off < batch.length) {
    if (batch.length - off < TEXT_RECORD_PREFIX) throw new Error("truncated text record batch");
    const textStart = off + TEXT_RECORD_PREFIX + u32le(batch, off);
    const end = textStart + u32le(batch, off + 4);
    if (end > batch.length) throw new Error("truncated text record batch");
    visit(buf, off + TEXT_RECORD_PREFIX, textStart, end);
    off = end;
  }
}

function badRecord(why: string): FerryError {
  return new FerryError("FERRY_STORE_BAD_TEXT_RECORD", why, { hint: "the evaluator sent a malformed plan" });
}

/**
 * The records of `batch`, in order. Lengths that do not fit are a bug of the sender (checked
 * with `textRecordFault`); header fields are only split here, the store validates them (they
 * are read as Latin-1, so anything but ASCII fails those checks).
 */
export function decodeTextRecords(batch: Uint8Array): TextRecord[] {
  const out: TextRecord[] = [];
  eachRecord(batch, (buf, headerStart, textStart, end) => {
    const fields = buf.toString("latin1", headerStart, textStart).split("\n");
    if (fields.length < 2) throw badRecord("a text object to add has no path and name");
    // An empty field would be hashed into the path as a reference and then registered as none.
    if (fields.includes("")) throw badRecord(`the text object '${fields[1]}' has an empty path, name or reference`);
    for (let k = 3; k < fields.length; k++) {
      if (!(fields[k - 1]! < fields[k]!)) throw badRecord(`the references of text object '${fields[1]}' are not sorted and distinct`);
    }
    out.push({ expectedPath: fields[0]!, name: fields[1]!, references: fields.slice(2), bytes: batch.subarray(textStart, end) });
  });
  return out;
}

/**
 * Only what writing the texts needs: each record's claimed path and its text. Whoever
 * registers them decodes the whole records (`decodeTextRecords`) and checks the claims.
 */
export function decodeTextClaims(batch: Uint8Array): { expectedPath: string; bytes: Uint8Array }[] {
  const out: { expectedPath: string; bytes: Uint8Array }[] = [];
  eachRecord(batch, (buf, headerStart, textStart, end) => {
    const nl = buf.indexOf(10, headerStart);
    if (nl < 0 || nl >= textStart) throw badRecord("a text object to add has no path and name");
    out.push({ expectedPath: buf.toString("latin1", headerStart, nl), bytes: batch.subarray(textStart, end) });
  });
  return out;
}

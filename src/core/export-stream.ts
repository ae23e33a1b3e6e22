/**
 * The `nix-store --export` stream (SPEC §8): for each object `u64(1)`, its NAR, `u64("NIXE")`,
 * `str(path)`, `u64(#refs)`, `str(ref)…`, `str(deriver | "")`, `u64(0)`; then `u64(0)`.
 */
import { FerryError } from "./errors.js";
import { NarParser, type NarEvent, type NarParserLimits } from "./nar/parser.js";

export const EXPORT_MAGIC = 0x4558494e;

export interface ExportMeta {
  readonly storePath: string;
  /** Full store paths, sorted. */
  readonly references: readonly string[];
  readonly deriver: string | undefined;
}

const enc = new TextEncoder();
const dec = new TextDecoder("utf-8", { fatal: true });

function u64(n: number): Uint8Array {
  const b = new Uint8Array(8);
  const v = new DataView(b.buffer);
  v.setUint32(0, n >>> 0, true);
  v.setUint32(4, Math.floor(n / 0x100000000), true);
  return b;
}

function str(s: string): Uint8Array {
  const bytes = enc.encode(s);
  const pad = (8 - (bytes.length % 8)) % 8;
  const out = new Uint8Array(8 + bytes.length + pad);
  out.set(u64(bytes.length), 0);
  out.set(bytes, 8);
  return out;
}

/** Bytes that come before each object's NAR. */
export function exportEntryStart(): Uint8Array {
  return u64(1);
}

/** Bytes that follow an object's NAR. */
export function exportEntryTrailer(meta: ExportMeta): Uint8Array {
  const parts = [u64(EXPORT_MAGIC), str(meta.storePath), u64(meta.references.length), ...[...meta.references].sort().map(str), str(meta.deriver ?? ""), u64(0)];
  return new Uint8Array(Buffer.concat(parts));
}

/** Bytes that end the stream. */
export function exportEnd(): Uint8Array {
  return u64(0);
}

export interface ExportHandlers {
  /** A new object starts; its NAR follows. */
  onStart(): void;
  /** Raw NAR bytes of the current object (to hash them); a view valid during the call. */
  onNarBytes(chunk: Uint8Array): void;
  /** A structural NAR event of the current object. */
  onNarEvent(e: NarEvent): void;
  /** The current object's NAR and metadata are complete. */
  onObject(meta: ExportMeta): void;
}

const MAX_TRAILER = 1 << 24;

function bad(message: string, offset: number): never {
  throw new FerryError("FERRY_EXPORT_INVALID", `invalid export stream at byte ${offset}: ${message}`, {
    hint: "the stream is corrupt or truncated; produce it again with `ferry store export` or `nix-store --export`",
    details: { offset },
  });
}

/** Reads an export stream pushed in any chunking. */
export class ExportReader {
  readonly #h: ExportHandlers;
  readonly #limits: NarParserLimits;
  #state: "marker" | "nar" | "trailer" | "done" = "marker";
  #offset = 0;
  #pending = new Uint8Array(0);
  #nar: NarParser | undefined;

  constructor(handlers: ExportHandlers, limits: NarParserLimits = {}) {
    this.#h = handlers;
    this.#limits = limits;
  }

  push(chunk: Uint8Array): void {
    let c = chunk;
    while (c.length > 0) {
      if (this.#state === "done") bad("bytes after the end of the stream", this.#offset);
      if (this.#state === "nar") {
        const used = this.#nar!.pushPartial(c);
        if (used > 0) this.#h.onNarBytes(c.subarray(0, used));
        this.#offset += used;
        c = c.subarray(used);
        if (this.#nar!.done) this.#state = "trailer";
        continue;
      }
      // marker and trailer are small: gather bytes until they parse
      const all = this.#pending.length ? new Uint8Array(Buffer.concat([this.#pending, c])) : c;
      const used = this.#state === "marker" ? this.#tryMarker(all) : this.#tryTrailer(all);
      if (used === 0) {
        if (all.length > MAX_TRAILER) bad("an object's metadata is implausibly large", this.#offset);
        this.#pending = all.slice();
        return;
      }
      const fromChunk = used - this.#pending.length;
      this.#offset += used;
      this.#pending = new Uint8Array(0);
      c = c.subarray(fromChunk);
    }
  }

  end(): void {
    if (this.#state !== "done" || this.#pending.length > 0) {
      bad(`truncated: the stream ended ${this.#state === "nar" ? "inside an object's NAR" : "before its end marker"}`, this.#offset);
    }
  }

  #tryMarker(b: Uint8Array): number {
    if (b.length < 8) return 0;
    const v = readU64(b, 0);
    if (v === 0) {
      this.#state = "done";
    } else if (v === 1) {
      this.#state = "nar";
      this.#nar = new NarParser((e) => this.#h.onNarEvent(e), this.#limits, this.#offset + 8);
      this.#h.onStart();
    } else {
      bad(`expected 0 or 1 before an object, found ${v}`, this.#offset);
    }
    return 8;
  }

  #tryTrailer(b: Uint8Array): number {
    let o = 0;
    const need = (n: number) => o + n <= b.length;
    const readStr = (): string | undefined => {
      if (!need(8)) return undefined;
      const len = readU64(b, o);
      if (len > 4096) bad(`a string of ${len} bytes in an object's metadata`, this.#offset + o);
      const total = 8 + len + ((8 - (len % 8)) % 8);
      if (!need(total)) return undefined;
      for (let k = o + 8 + len; k < o + total; k++) if (b[k] !== 0) bad("non-zero padding", this.#offset + k);
      let s: string;
      try {
        s = dec.decode(b.subarray(o + 8, o + 8 + len));
      } catch {
        return bad("a store path that is not UTF-8", this.#offset + o);
      }
      o += total;
      return s;
    };
    if (!need(8)) return 0;
    const magic = readU64(b, 0);
    if (magic !== EXPORT_MAGIC) bad(`expected the 'NIXE' marker after the NAR, found ${magic}`, this.#offset);
    o = 8;
    const storePath = readStr();
    if (storePath === undefined || !need(8)) return 0;
    const n = readU64(b, o);
    if (n > 100000) bad(`an object claims ${n} references`, this.#offset + o);
    o += 8;
    const references: string[] = [];
    for (let i = 0; i < n; i++) {
      const r = readStr();
      if (r === undefined) return 0;
      references.push(r);
    }
    const deriver = readStr();
    if (deriver === undefined || !need(8)) return 0;
    const sigFlag = readU64(b, o);
    if (sigFlag !== 0) bad("legacy export signatures are not supported", this.#offset + o);
    o += 8;
    this.#state = "marker";
    this.#h.onObject(Object.freeze({ storePath, references: references.sort(), deriver: deriver === "" ? undefined : deriver }));
    return o;
  }
}

function readU64(b: Uint8Array, o: number): number {
  const v = new DataView(b.buffer, b.byteOffset + o, 8);
  return v.getUint32(4, true) * 0x100000000 + v.getUint32(0, true);
}

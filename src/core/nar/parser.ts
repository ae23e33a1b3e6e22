/**
 * A streaming NAR parser (SPEC §2): push bytes in any chunking, get structural events out.
 * Memory stays bounded by `maxTokenLength` whatever the archive size: file contents are passed
 * through as views of the input chunks, never collected.
 *
 * Everything Nix rejects is rejected here, with the byte offset of the offending token and
 * what was expected: a wrong magic, non-zero padding, unsorted or duplicate entries, bad entry
 * names, unknown tokens, trailing bytes, truncation, and lengths over the configured limits.
 */
import { FerryError } from "../errors.js";
import { compareBytes, invalidEntryNameReason } from "./names.js";

export type NarEvent =
  /** A directory starts at `path` (the root has the empty path). */
  | { readonly kind: "directory"; readonly path: readonly Uint8Array[] }
  /** A directory's entries are all listed. */
  | { readonly kind: "directory-end"; readonly path: readonly Uint8Array[] }
  /** A regular file starts; `contents` events follow, then `regular-end`. */
  | { readonly kind: "regular"; readonly path: readonly Uint8Array[]; readonly executable: boolean; readonly size: number }
  /** A piece of the current file; valid only during the callback (it is a view of the input). */
  | { readonly kind: "contents"; readonly data: Uint8Array }
  | { readonly kind: "regular-end" }
  | { readonly kind: "symlink"; readonly path: readonly Uint8Array[]; readonly target: Uint8Array };

export interface NarParserLimits {
  /** Longest name, symlink target or keyword accepted (bytes). Default 4096. */
  readonly maxTokenLength?: number;
  /** Largest regular file accepted (bytes). Default 2^53-1. */
  readonly maxFileSize?: number;
  /** Deepest directory nesting accepted. Default 256. */
  readonly maxDepth?: number;
}

type Expect =
  | "magic" | "open" | "type" | "node-type" | "regular-next" | "exec-empty" | "contents-kw"
  | "contents" | "close-node" | "target-kw" | "target" | "dir-next" | "entry-open" | "name-kw"
  | "name" | "node-kw" | "close-entry" | "done";

const dec = new TextDecoder("utf-8", { fatal: false });

const WHAT: Record<Expect, string> = {
  "magic": "the NAR magic 'nix-archive-1'",
  "open": "'('",
  "type": "'type'",
  "node-type": "'regular', 'symlink' or 'directory'",
  "regular-next": "'executable' or 'contents'",
  "exec-empty": "an empty string after 'executable'",
  "contents-kw": "'contents'",
  "contents": "file contents",
  "close-node": "')'",
  "target-kw": "'target'",
  "target": "a symlink target",
  "dir-next": "'entry' or ')'",
  "entry-open": "'('",
  "name-kw": "'name'",
  "name": "an entry name",
  "node-kw": "'node'",
  "close-entry": "')' closing the entry",
  "done": "the end of the archive",
};

function tokenIs(tok: Uint8Array, s: string): boolean {
  if (tok.length !== s.length) return false;
  for (let i = 0; i < s.length; i++) if (tok[i] !== s.charCodeAt(i)) return false;
  return true;
}

export class NarParser {
  readonly #emit: (e: NarEvent) => void;
  readonly #maxToken: number;
  readonly #maxFile: number;
  readonly #maxDepth: number;

  #offset = 0;
  #expect: Expect = "magic";
  /** Token reading phase: length prefix, payload, padding. */
  #phase: "len" | "data" | "pad" = "len";
  readonly #lenBuf = new Uint8Array(8);
  #lenFill = 0;
  #tokLen = 0;
  #tokStart = 0;
  #tok = new Uint8Array(64);
  #tokFill = 0;
  #padLeft = 0;
  /** Path of the node being read, and the last entry name of every open directory. */
  readonly #path: Uint8Array[] = [];
  readonly #lastName: (Uint8Array | null)[] = [];
  #executable = false;
  #pendingName: Uint8Array | null = null;

  /**
   * `startOffset` is where the archive begins in a larger stream (an export stream), so that
   * error offsets point into that stream.
   */
  constructor(emit: (e: NarEvent) => void, limits: NarParserLimits = {}, startOffset = 0) {
    this.#emit = emit;
    this.#offset = startOffset;
    this.#maxToken = limits.maxTokenLength ?? 4096;
    this.#maxFile = limits.maxFileSize ?? Number.MAX_SAFE_INTEGER;
    this.#maxDepth = limits.maxDepth ?? 256;
  }

  /** Bytes consumed so far. */
  get offset(): number {
    return this.#offset;
  }

  get done(): boolean {
    return this.#expect === "done";
  }

  #fail(message: string, at = this.#tokStart): never {
    throw new FerryError("FERRY_NAR_INVALID", `invalid NAR at byte ${at}: ${message}`, {
      hint: "the archive is corrupt, truncated or not a NAR; fetch or produce it again",
      details: { offset: at, expected: WHAT[this.#expect] },
    });
  }

  /** Feeds a chunk that must hold nothing past the end of the archive. */
  push(chunk: Uint8Array): void {
    const used = this.pushPartial(chunk);
    if (used < chunk.length) this.#fail(`unexpected bytes after the end of the archive`, this.#offset);
  }

  /**
   * Feeds a chunk and returns how many of its bytes belong to the archive: fewer than its length
   * only when the archive ended inside it (an export stream continues after each NAR).
   */
  pushPartial(chunk: Uint8Array): number {
    let i = 0;
    const n = chunk.length;
    while (i < n) {
      if (this.#phase === "len") {
        if (this.#expect === "done") break;
        if (this.#lenFill === 0) this.#tokStart = this.#offset + i;
        const take = Math.min(8 - this.#lenFill, n - i);
        this.#lenBuf.set(chunk.subarray(i, i + take), this.#lenFill);
        this.#lenFill += take;
        i += take;
        if (this.#lenFill < 8) break;
        this.#lenFill = 0;
        const lo = this.#lenBuf[0]! | (this.#lenBuf[1]! << 8) | (this.#lenBuf[2]! << 16) | (this.#lenBuf[3]! << 24);
        const hi = this.#lenBuf[4]! | (this.#lenBuf[5]! << 8) | (this.#lenBuf[6]! << 16) | (this.#lenBuf[7]! << 24);
        const len = (hi >>> 0) * 0x100000000 + (lo >>> 0);
        this.#beginToken(len);
        continue;
      }
      if (this.#phase === "data") {
        const take = Math.min(this.#tokLen - this.#tokFill, n - i);
        if (this.#expect === "contents") {
          if (take > 0) this.#emit({ kind: "contents", data: chunk.subarray(i, i + take) });
        } else {
          this.#tok.set(chunk.subarray(i, i + take), this.#tokFill);
        }
        this.#tokFill += take;
        i += take;
        if (this.#tokFill < this.#tokLen) break;
        this.#endData();
        continue;
      }
      // padding
      const take = Math.min(this.#padLeft, n - i);
      for (let k = 0; k < take; k++) {
        if (chunk[i + k] !== 0) this.#fail("non-zero padding", this.#offset + i + k);
      }
      i += take;
      this.#padLeft -= take;
      if (this.#padLeft === 0) this.#endToken();
    }
    this.#offset += i;
    return i;
  }

  /** Declares the input finished; throws if the archive is incomplete. */
  end(): void {
    if (this.#expect !== "done" || this.#phase !== "len" || this.#lenFill !== 0) {
      this.#fail(`truncated: the input ended while expecting ${WHAT[this.#expect]}`, this.#offset);
    }
  }

  #beginToken(len: number): void {
    const limit = this.#expect === "contents" ? this.#maxFile : this.#maxToken;
    if (len > limit) {
      this.#fail(`a length of ${len} bytes is over the limit of ${limit} while expecting ${WHAT[this.#expect]}`);
    }
    this.#tokLen = len;
    this.#tokFill = 0;
    if (this.#expect === "contents") {
      this.#emit({ kind: "regular", path: this.#path.slice(), executable: this.#executable, size: len });
    } else if (this.#tok.length < len) {
      this.#tok = new Uint8Array(Math.max(len, this.#tok.length * 2));
    }
    this.#phase = "data";
    if (len === 0) this.#endData();
  }

  #endData(): void {
    this.#padLeft = (8 - (this.#tokLen % 8)) % 8;
    this.#phase = "pad";
    if (this.#padLeft === 0) this.#endToken();
  }

  #endToken(): void {
    this.#phase = "len";
    if (this.#expect === "contents") {
      this.#emit({ kind: "regular-end" });
      this.#expect = "close-node";
      return;
    }
    this.#onToken(this.#tok.subarray(0, this.#tokLen));
  }

  #want(tok: Uint8Array, s: string, next: Expect): void {
    if (!tokenIs(tok, s)) this.#fail(`expected ${WHAT[this.#expect]}, found ${describe(tok)}`);
    this.#expect = next;
  }

  #onToken(tok: Uint8Array): void {
    switch (this.#expect) {
      case "magic":
        return this.#want(tok, "nix-archive-1", "open");
      case "open":
        return this.#want(tok, "(", "type");
      case "type":
        return this.#want(tok, "type", "node-type");
      case "node-type":
        if (tokenIs(tok, "regular")) {
          this.#executable = false;
          this.#expect = "regular-next";
        } else if (tokenIs(tok, "symlink")) {
          this.#expect = "target-kw";
        } else if (tokenIs(tok, "directory")) {
          if (this.#lastName.length >= this.#maxDepth) this.#fail(`directories nested deeper than ${this.#maxDepth}`);
          this.#emit({ kind: "directory", path: this.#path.slice() });
          this.#lastName.push(null);
          this.#expect = "dir-next";
        } else {
          this.#fail(`unknown node type ${describe(tok)}`);
        }
        return;
      case "regular-next":
        if (tokenIs(tok, "executable")) {
          this.#executable = true;
          this.#expect = "exec-empty";
        } else if (tokenIs(tok, "contents")) {
          this.#expect = "contents";
        } else {
          this.#fail(`expected ${WHAT[this.#expect]}, found ${describe(tok)}`);
        }
        return;
      case "exec-empty":
        if (tok.length !== 0) this.#fail(`expected ${WHAT[this.#expect]}, found ${describe(tok)}`);
        this.#expect = "contents-kw";
        return;
      case "contents-kw":
        return this.#want(tok, "contents", "contents");
      case "target-kw":
        return this.#want(tok, "target", "target");
      case "target":
        if (tok.length === 0) this.#fail("a symlink has an empty target");
        if (tok.includes(0)) this.#fail("a symlink target contains a NUL byte");
        this.#emit({ kind: "symlink", path: this.#path.slice(), target: tok.slice() });
        this.#expect = "close-node";
        return;
      case "close-node":
        this.#want(tok, ")", "done");
        this.#closeNode();
        return;
      case "dir-next":
        if (tokenIs(tok, "entry")) {
          this.#expect = "entry-open";
        } else if (tokenIs(tok, ")")) {
          this.#lastName.pop();
          this.#emit({ kind: "directory-end", path: this.#path.slice() });
          this.#closeNode();
        } else {
          this.#fail(`expected ${WHAT[this.#expect]}, found ${describe(tok)}`);
        }
        return;
      case "entry-open":
        return this.#want(tok, "(", "name-kw");
      case "name-kw":
        return this.#want(tok, "name", "name");
      case "name": {
        const why = invalidEntryNameReason(tok);
        if (why) this.#fail(`${why} (${describe(tok)})`);
        const depth = this.#lastName.length - 1;
        const prev = this.#lastName[depth];
        if (prev) {
          const c = compareBytes(prev, tok);
          if (c === 0) this.#fail(`duplicate entry ${describe(tok)}`);
          if (c > 0) this.#fail(`entry ${describe(tok)} comes after ${describe(prev)}: entries must be sorted`);
        }
        this.#pendingName = tok.slice();
        this.#lastName[depth] = this.#pendingName;
        this.#expect = "node-kw";
        return;
      }
      case "node-kw":
        this.#want(tok, "node", "open");
        this.#path.push(this.#pendingName!);
        return;
      case "close-entry":
        return this.#want(tok, ")", "dir-next");
      case "contents":
      case "done":
        throw new Error("unreachable NAR parser state");
    }
  }

  /** A node's closing ')' was read: continue in the enclosing directory, or finish. */
  #closeNode(): void {
    if (this.#path.length === 0) {
      this.#expect = "done";
      return;
    }
    this.#path.pop();
    this.#expect = "close-entry";
  }
}

function describe(tok: Uint8Array): string {
  if (tok.length > 40) return `a ${tok.length}-byte string`;
  return JSON.stringify(dec.decode(tok));
}

/** Parses a whole in-memory NAR, returning its events with contents collected per file. */
export function parseNarBytes(nar: Uint8Array, limits?: NarParserLimits): NarEvent[] {
  const events: NarEvent[] = [];
  const p = new NarParser((e) => events.push(e.kind === "contents" ? { kind: "contents", data: e.data.slice() } : e), limits);
  p.push(nar);
  p.end();
  return events;
}

/**
 * In-memory file trees (the shape the conformance vectors use) and their NAR form. Used for
 * tests, vectors and small generated objects such as text files; large trees stream from disk.
 */
import { sortUtf8 } from "./names.js";
import { NarWriter } from "./writer.js";

export type NarTree =
  | { readonly type: "regular"; readonly executable: boolean; readonly contents: Uint8Array }
  | { readonly type: "symlink"; readonly target: string }
  | { readonly type: "directory"; readonly entries: Readonly<Record<string, NarTree>> };

const enc = new TextEncoder();

export function writeTree(w: NarWriter, t: NarTree): void {
  switch (t.type) {
    case "regular":
      w.regular(t.executable, t.contents);
      return;
    case "symlink":
      w.symlink(enc.encode(t.target));
      return;
    case "directory":
      w.openDirectory();
      for (const name of sortUtf8(Object.keys(t.entries))) {
        w.openEntry(enc.encode(name));
        writeTree(w, t.entries[name]!);
        w.closeEntry();
      }
      w.closeDirectory();
  }
}

/** The NAR bytes of an in-memory tree. */
export function narOfTree(t: NarTree): Uint8Array {
  const parts: Uint8Array[] = [];
  const w = new NarWriter((c) => parts.push(c.slice()));
  writeTree(w, t);
  const size = w.end();
  const out = new Uint8Array(size);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

const dec = new TextDecoder();

/** Rebuilds the in-memory tree of a parsed NAR (names and targets decoded as UTF-8). */
export function treeOfEvents(events: Iterable<import("./parser.js").NarEvent>): NarTree {
  type Dir = { type: "directory"; entries: Record<string, NarTree> };
  let root: NarTree | undefined;
  const dirs: Dir[] = [];
  let file: { executable: boolean; parts: Uint8Array[]; path: readonly Uint8Array[] } | undefined;
  const place = (path: readonly Uint8Array[], node: NarTree) => {
    if (path.length === 0) root = node;
    // defineProperty, not assignment: an entry named `__proto__` must become an own property
    else Object.defineProperty(dirs[path.length - 1]!.entries, dec.decode(path[path.length - 1]!), { value: node, enumerable: true, writable: true, configurable: true });
  };
  for (const e of events) {
    switch (e.kind) {
      case "directory": {
        const d: Dir = { type: "directory", entries: {} };
        place(e.path, d);
        dirs[e.path.length] = d;
        break;
      }
      case "directory-end":
        break;
      case "regular":
        file = { executable: e.executable, parts: [], path: e.path };
        break;
      case "contents":
        file!.parts.push(e.data.slice());
        break;
      case "regular-end": {
        const f = file!;
        place(f.path, { type: "regular", executable: f.executable, contents: new Uint8Array(Buffer.concat(f.parts)) });
        file = undefined;
        break;
      }
      case "symlink":
        place(e.path, { type: "symlink", target: dec.decode(e.target) });
        break;
    }
  }
  if (!root) throw new Error("no events");
  return root;
}

/** Rules for NAR directory entry names and their order (SPEC §2.2). */

/** Why `name` cannot be a NAR entry name, or undefined when it can. */
export function invalidEntryNameReason(name: Uint8Array): string | undefined {
  if (name.length === 0) return "an entry name is empty";
  if (name.length === 1 && name[0] === 0x2e) return "an entry is named '.'";
  if (name.length === 2 && name[0] === 0x2e && name[1] === 0x2e) return "an entry is named '..'";
  for (const b of name) {
    if (b === 0x2f) return "an entry name contains '/'";
    if (b === 0) return "an entry name contains a NUL byte";
  }
  return undefined;
}

/** Byte-wise comparison (memcmp order), the order NAR directory entries are sorted in. */
export function compareBytes(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const d = a[i]! - b[i]!;
    if (d !== 0) return d;
  }
  return a.length - b.length;
}

const utf8 = new TextEncoder();

/** Sorts strings by their UTF-8 bytes; JavaScript's default sort (UTF-16 units) differs above U+FFFF. */
export function sortUtf8(names: Iterable<string>): string[] {
  return [...names].map((s) => [s, utf8.encode(s)] as const).sort((x, y) => compareBytes(x[1], y[1])).map((x) => x[0]);
}

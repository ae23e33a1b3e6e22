/** Random file trees on disk for peer and property tests, reproducible from a seed. */
import { mkdirSync, writeFileSync, symlinkSync, chmodSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** A small deterministic PRNG (mulberry32). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const NAME_PIECES = ["a", "B", "z", "0", "9", "-", "_", ".", "é", "ß", "日本", "～", "😀", "𝄞", " ", "x y", "+", "=", "~"];

export interface TreeOptions {
  readonly maxDepth?: number;
  readonly maxEntries?: number;
  /** Probability that a file is large (crosses the reader's 1 MiB chunks). */
  readonly largeFileChance?: number;
}

/** Writes a random tree (unicode names, symlinks, executables, empty dirs and files) at `dir`. */
export function writeRandomTree(dir: string, seed: number, opts: TreeOptions = {}): void {
  const rnd = prng(seed);
  const maxDepth = opts.maxDepth ?? 3;
  const maxEntries = opts.maxEntries ?? 6;
  const large = opts.largeFileChance ?? 0.03;
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
  const name = (): string => {
    let s = "";
    const n = 1 + Math.floor(rnd() * 4);
    for (let i = 0; i < n; i++) s += pick(NAME_PIECES);
    return s === "." || s === ".." ? s + "x" : s;
  };
  const file = (p: string) => {
    const r = rnd();
    const size = r < 0.15 ? 0 : r < 1 - large ? Math.floor(rnd() * 3000) : (1 << 20) + Math.floor(rnd() * (3 << 20));
    const buf = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4096) buf[i] = Math.floor(rnd() * 256);
    writeFileSync(p, buf);
    if (rnd() < 0.3) chmodSync(p, 0o755);
  };
  const walk = (d: string, depth: number) => {
    mkdirSync(d, { recursive: true });
    const n = Math.floor(rnd() * (maxEntries + 1));
    const used = new Set<string>();
    for (let i = 0; i < n; i++) {
      const nm = name();
      if (used.has(nm)) continue;
      used.add(nm);
      const p = join(d, nm);
      const r = rnd();
      if (r < 0.5) file(p);
      else if (r < 0.7) symlinkSync(pick(["../x", "/etc/hostname", nm + "-target", "日本/語", "a".repeat(1 + Math.floor(rnd() * 200))]), p);
      else if (depth < maxDepth) walk(p, depth + 1);
      else mkdirSync(p);
    }
  };
  walk(dir, 0);
}

export function tempDir(prefix = "ferry-test-"): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

/**
 * Derivations (`.drv` files, Nix ATerm) and the digests that give them their output paths
 * (SPEC §4–§6), as Nix 2.8 writes and computes them byte for byte.
 *
 * A `Derivation` holds JavaScript strings; the file is their UTF-8 encoding. Maps and lists are
 * kept in the order the file uses (bytewise by UTF-8), and the printer sorts again anyway, so a
 * hand-built value prints correctly too.
 */
import { DIGEST_SIZE, sha256, sha256Hex } from "./digest.js";
import { FerryError } from "./errors.js";
import { isHashAlgo, makeHash, fromBase16 } from "./hash.js";
import {
  checkName,
  checkNewName,
  checkStoreDir,
  makeFixedOutputPath,
  outputPathOfHex,
  parseStorePath,
  printStorePath,
  textPathOfHex,
  type FileIngestionMethod,
} from "./store-path.js";

// ---- the value --------------------------------------------------------------------------------

/**
 * One output tuple. Input-addressed: `hashAlgo` and `hash` are "". Fixed-output: `hashAlgo` is
 * `[r:]<algo>` and `hash` the digest in lowercase hex. `path` is "" while the output is masked
 * (a draft whose paths are not computed yet).
 */
export interface DerivationOutput {
  readonly path: string;
  readonly hashAlgo: string;
  readonly hash: string;
}

/** A derivation, immutable. Map keys and lists are sorted bytewise (UTF-8) when made by this module. */
export interface Derivation {
  readonly outputs: ReadonlyMap<string, DerivationOutput>;
  /** Input derivation path → the names of the outputs used, sorted. */
  readonly inputDrvs: ReadonlyMap<string, readonly string[]>;
  readonly inputSrcs: readonly string[];
  readonly system: string;
  readonly builder: string;
  readonly args: readonly string[];
  readonly env: ReadonlyMap<string, string>;
}

type MapLike<V> = ReadonlyMap<string, V> | Readonly<Record<string, V>>;

/** What `makeDerivation` accepts: maps or plain records, any order; missing tuple fields are "". */
export interface DerivationInit {
  readonly outputs: MapLike<Partial<DerivationOutput>>;
  readonly inputDrvs?: MapLike<readonly string[]>;
  readonly inputSrcs?: readonly string[];
  readonly system: string;
  readonly builder: string;
  readonly args?: readonly string[];
  readonly env?: MapLike<string>;
}

/**
 * Compares strings by their UTF-8 bytes (= by code points), the order of every sorted list in a
 * .drv file. JavaScript's default order (UTF-16 units) differs when U+E000–U+FFFF meets a
 * character above U+FFFF.
 */
export function compareUtf8(a: string, b: string): number {
  const n = a.length < b.length ? a.length : b.length;
  for (let i = 0; i < n; i++) {
    let x = a.charCodeAt(i);
    let y = b.charCodeAt(i);
    if (x !== y) {
      if (x >= 0xd800 && y >= 0xd800) {
        // surrogates (code points above U+FFFF) sort after U+E000–U+FFFF
        x = x >= 0xe000 ? x - 0x800 : x + 0x2000;
        y = y >= 0xe000 ? y - 0x800 : y + 0x2000;
      }
      return x - y;
    }
  }
  return a.length - b.length;
}

function entriesOf<V>(m: MapLike<V> | undefined): [string, V][] {
  if (m === undefined) return [];
  if (m instanceof Map) return [...(m as ReadonlyMap<string, V>).entries()];
  return Object.entries(m as Readonly<Record<string, V>>);
}

/** True when `xs` is strictly increasing bytewise (sorted, no duplicates). */
function isSortedUnique(xs: readonly string[]): boolean {
  for (let i = 1; i < xs.length; i++) if (compareUtf8(xs[i - 1]!, xs[i]!) >= 0) return false;
  return true;
}

/**
 * Sorts `xs` in place, stably. Insertion sort for the few entries a derivation's lists have (no
 * allocation, few comparisons on the usual nearly sorted input); the built-in sort beyond that.
 */
function sortInPlace<T>(xs: T[], cmp: (a: T, b: T) => number): T[] {
  if (xs.length > 16) return xs.sort(cmp);
  for (let i = 1; i < xs.length; i++) {
    const x = xs[i]!;
    let j = i - 1;
    for (; j >= 0 && cmp(xs[j]!, x) > 0; j--) xs[j + 1] = xs[j]!;
    xs[j + 1] = x;
  }
  return xs;
}

/** JavaScript's default sort order (UTF-16 code units). */
function compareUtf16(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** `xs` sorted bytewise without duplicates; an array already so is returned as it is. */
function sortedUnique(xs: Iterable<string>): readonly string[] {
  if (Array.isArray(xs) && isSortedUnique(xs)) return xs as readonly string[];
  const sorted = sortInPlace([...xs], compareUtf8);
  let n = 0;
  for (const x of sorted) if (n === 0 || x !== sorted[n - 1]) sorted[n++] = x;
  sorted.length = n;
  return sorted;
}

function sortedMap<V>(entries: [string, V][]): Map<string, V> {
  return new Map(sortInPlace(entries, (x, y) => compareUtf8(x[0], y[0])));
}

function freezeOutput(o: Partial<DerivationOutput>): DerivationOutput {
  return Object.freeze({ path: o.path ?? "", hashAlgo: o.hashAlgo ?? "", hash: o.hash ?? "" });
}

/**
 * Makes a normalised, frozen Derivation: maps and lists sorted bytewise, duplicate inputSrcs and
 * input output names dropped. Fields are checked when printed, not here.
 */
export function makeDerivation(init: DerivationInit): Derivation {
  return Object.freeze({
    outputs: sortedMap(entriesOf(init.outputs).map(([k, v]) => [k, freezeOutput(v)])),
    inputDrvs: sortedMap(entriesOf(init.inputDrvs).map(([k, v]) => [k, Object.freeze([...sortedUnique(v)])])),
    inputSrcs: Object.freeze([...sortedUnique(init.inputSrcs ?? [])]),
    system: init.system,
    builder: init.builder,
    args: Object.freeze([...(init.args ?? [])]),
    env: sortedMap(entriesOf(init.env)),
  });
}

// ---- output kinds -------------------------------------------------------------------------------

/** True for a fixed-output derivation: exactly one output, `out`, with a hash algorithm and hash. */
export function isFixedOutput(drv: Derivation): boolean {
  if (drv.outputs.size !== 1) return false;
  const out = drv.outputs.get("out");
  return out !== undefined && out.hashAlgo !== "" && out.hash !== "";
}

/** Output name → output path ("" for a masked output), in output-name order. */
export function outputPathsOf(drv: Derivation): ReadonlyMap<string, string> {
  return new Map([...drv.outputs].map(([name, o]) => [name, o.path]));
}

interface FixedHash {
  readonly method: FileIngestionMethod;
  readonly algo: keyof typeof DIGEST_SIZE;
  readonly digest: Uint8Array;
}

/** Why the output tuple cannot be used, or undefined. Floating CA outputs are "unsupported". */
function outputProblem(name: string, o: DerivationOutput): { unsupported?: boolean; why: string } | undefined {
  if (name === "") return { why: "an output name is empty" };
  if (o.hashAlgo === "") {
    if (o.hash !== "") return { why: `output '${name}' has a hash but no hash algorithm` };
    return undefined;
  }
  const algo = o.hashAlgo.startsWith("r:") ? o.hashAlgo.slice(2) : o.hashAlgo;
  if (!isHashAlgo(algo)) return { why: `output '${name}' has the unknown hash algorithm '${o.hashAlgo}'` };
  if (o.hash === "") {
    return { unsupported: true, why: `output '${name}' is a floating content-addressed output (ca-derivations), which Ferry does not support` };
  }
  if (o.hash.length !== DIGEST_SIZE[algo] * 2 || !/^[0-9a-f]*$/.test(o.hash)) {
    return { why: `output '${name}' has the hash '${o.hash}', which is not ${DIGEST_SIZE[algo] * 2} lowercase hex digits (${algo})` };
  }
  return undefined;
}

/** Why the set of outputs cannot be used, or undefined (SPEC §4.4). */
function outputsProblem(drv: Derivation): { unsupported?: boolean; why: string } | undefined {
  if (drv.outputs.size === 0) return { why: "it has no outputs" };
  for (const [name, o] of drv.outputs) {
    const p = outputProblem(name, o);
    if (p) return p;
    if (o.hashAlgo !== "" && (name !== "out" || drv.outputs.size !== 1)) {
      return { why: `output '${name}' is fixed (it has a hash), but a fixed output must be the only output and be named 'out'` };
    }
  }
  return undefined;
}

function checkOutputs(drv: Derivation): void {
  const p = outputsProblem(drv);
  if (!p) return;
  if (p.unsupported) throw new FerryError("FERRY_DRV_UNSUPPORTED", `derivation not supported: ${p.why}`, { hint: "use input-addressed or fixed-output derivations" });
  throw new FerryError("FERRY_DRV_BAD_OUTPUTS", `derivation has unusable outputs: ${p.why}`, {
    hint: "a derivation has input-addressed outputs, or exactly one fixed output 'out' with a hash algorithm and a hex digest",
  });
}

function fixedHashOf(o: DerivationOutput): FixedHash {
  const recursive = o.hashAlgo.startsWith("r:");
  const algo = (recursive ? o.hashAlgo.slice(2) : o.hashAlgo) as FixedHash["algo"];
  return { method: recursive ? "recursive" : "flat", algo, digest: fromBase16(o.hash) };
}

/** The path of a fixed-output derivation's `out` (SPEC §3.3), from its hash; the written path is ignored. */
function fixedOutputPath(drv: Derivation, storeDir: string, name: string): string {
  const h = fixedHashOf(drv.outputs.get("out")!);
  return printStorePath(makeFixedOutputPath(storeDir, name, h.method, makeHash(h.algo, h.digest)));
}

// ---- printing -----------------------------------------------------------------------------------

export interface PrintDerivationOptions {
  /**
   * Print every output path as "" and every env entry named after an output as "" (SPEC §6.3).
   * A fixed output keeps its hashAlgo and hash, as in Nix.
   */
  readonly maskOutputs?: boolean;
}

// In a `u` regex a class range over surrogates matches only unpaired ones.
const RAW_BAD = /["\\\uD800-\uDFFF]/u;
const ESCAPE_NEEDED = /["\\\n\r\t\uD800-\uDFFF]/u;
const LONE_SURROGATE = /[\uD800-\uDFFF]/u;
const ESCAPES: Readonly<Record<string, string>> = { '"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t" };

function badField(what: string, value: string, why: string): FerryError {
  return new FerryError("FERRY_DRV_BAD_FIELD", `cannot write ${what} ${JSON.stringify(value)} into a .drv file: ${why}`, {
    hint: "output names, paths, hash fields, input paths and the system are written unescaped by Nix, so they cannot contain '\"' or '\\'; every string must be valid Unicode",
    details: { field: what, value },
  });
}

/** `s`, checked for a field Nix writes unescaped. */
function rawBody(s: string, what: string): string {
  const m = RAW_BAD.exec(s);
  if (m) throw badField(what, s, LONE_SURROGATE.test(m[0]) ? "it contains an unpaired surrogate" : `it contains ${JSON.stringify(m[0])}`);
  return s;
}

function raw(s: string, what: string): string {
  return '"' + rawBody(s, what) + '"';
}

/** `s` escaped as Nix escapes a string field, without the quotes. */
function escapedBody(s: string, what: string): string {
  if (!ESCAPE_NEEDED.test(s)) return s;
  if (LONE_SURROGATE.test(s)) throw badField(what, s, "it contains an unpaired surrogate");
  return s.replace(/["\\\n\r\t]/g, (c) => ESCAPES[c]!);
}

function escaped(s: string, what: string): string {
  return '"' + escapedBody(s, what) + '"';
}

/** The keys of `m` sorted bytewise (insertion order when that is already sorted). */
function sortedKeys(m: ReadonlyMap<string, unknown>): readonly string[] {
  const keys = [...m.keys()];
  return isSortedUnique(keys) ? keys : sortInPlace(keys, compareUtf8);
}

/**
 * A derivation's ATerm with holes where its printed forms differ (SPEC §6.2–§6.3): the path in
 * each output tuple, the inputDrvs list, and the value of each env entry named after an output.
 * Every other field is checked and written once. The text is
 * `outPre[0] path₀ outPre[1] … path₋₁ outPre[n] inputDrvs envPre[0] value₀ envPre[1] … envPre[h]`.
 */
interface AtermTemplate {
  /** Output names, sorted. */
  readonly outputs: readonly string[];
  readonly outPre: readonly string[];
  /** The env keys at the holes (output names), in order. */
  readonly envHoles: readonly string[];
  readonly envPre: readonly string[];
}

/**
 * The template of `drv` with env entries `envKeys` (sorted bytewise): a key named after an
 * output is a hole, any other takes its value from `drv.env`.
 */
function templateOf(drv: Derivation, envKeys: readonly string[]): AtermTemplate {
  const outputs = sortedKeys(drv.outputs);
  const outPre: string[] = [];
  let s = "Derive([";
  for (let i = 0; i < outputs.length; i++) {
    const name = outputs[i]!;
    const o = drv.outputs.get(name)!;
    s += `${i > 0 ? "," : ""}(${raw(name, "output name")},"`;
    outPre.push(s);
    s = `",${raw(o.hashAlgo, "hash algorithm")},${raw(o.hash, "output hash")})`;
  }
  outPre.push(s + "],[");
  s = "],[" + sortedUnique(drv.inputSrcs).map((p) => raw(p, "input source path")).join(",");
  s += `],${raw(drv.system, "system")},${escaped(drv.builder, "builder")},[`;
  s += drv.args.map((a) => escaped(a, "argument")).join(",");
  s += "],[";
  const envHoles: string[] = [];
  const envPre: string[] = [];
  for (let i = 0; i < envKeys.length; i++) {
    const key = envKeys[i]!;
    s += `${i > 0 ? "," : ""}(${escaped(key, "environment variable name")},`;
    if (drv.outputs.has(key)) {
      envHoles.push(key);
      envPre.push(s + '"');
      s = '")';
    } else {
      s += escaped(drv.env.get(key)!, `value of environment variable '${key}'`) + ")";
    }
  }
  envPre.push(s + "])");
  return { outputs, outPre, envHoles, envPre };
}

/**
 * The text of `t` with its holes filled: `paths` (checked raw values) per output, `envValues`
 * (escaped values) per env hole; both undefined for the masked form, whose holes are "".
 */
function fillTemplate(t: AtermTemplate, paths: readonly string[] | undefined, inputDrvs: string, envValues: readonly string[] | undefined): string {
  let s = t.outPre[0]!;
  for (let i = 0; i < t.outputs.length; i++) s += (paths ? paths[i]! : "") + t.outPre[i + 1]!;
  s += inputDrvs + t.envPre[0]!;
  for (let i = 0; i < t.envHoles.length; i++) s += (envValues ? envValues[i]! : "") + t.envPre[i + 1]!;
  return s;
}

/** `"a","b",…` for strings known to need no escaping. */
function quotedList(xs: readonly string[]): string {
  return xs.length === 0 ? "" : '"' + xs.join('","') + '"';
}

/** The inputDrvs list of the ATerm, without its brackets. */
function inputDrvsText(inputDrvs: ReadonlyMap<string, readonly string[]>): string {
  let s = "";
  for (const path of sortedKeys(inputDrvs)) {
    const outs = sortedUnique(inputDrvs.get(path)!);
    for (const o of outs) rawBody(o, "input output name");
    s += `${s === "" ? "" : ","}(${raw(path, "input derivation path")},[${quotedList(outs)}])`;
  }
  return s;
}

/**
 * The exact ATerm text of `drv` (SPEC §4): no whitespace, no trailing newline, lists sorted
 * bytewise, builder/args/env escaped, every other field raw. Throws FERRY_DRV_BAD_FIELD for a raw
 * field holding `"` or `\` (Nix would write an unreadable file) or any unpaired surrogate.
 */
export function printDerivation(drv: Derivation, opts: PrintDerivationOptions = {}): string {
  return printWithInputs(drv, inputDrvsText(drv.inputDrvs), opts.maskOutputs === true);
}

/** `printDerivation` with the inputDrvs list given as text. */
function printWithInputs(drv: Derivation, inputs: string, mask: boolean): string {
  const t = templateOf(drv, sortedKeys(drv.env));
  if (mask) return fillTemplate(t, undefined, inputs, undefined);
  const paths = t.outputs.map((o) => rawBody(drv.outputs.get(o)!.path, "output path"));
  const values = t.envHoles.map((k) => escapedBody(drv.env.get(k)!, `value of environment variable '${k}'`));
  return fillTemplate(t, paths, inputs, values);
}

// ---- parsing ------------------------------------------------------------------------------------

/** UTF-8 length of `s.slice(0, end)`. Unpaired surrogates count as 3 bytes (U+FFFD). */
function utf8Offset(s: string, end: number): number {
  let n = 0;
  for (let i = 0; i < end; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c < 0xdc00 && i + 1 < end && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      n += 4;
      i++;
    } else n += 3;
  }
  return n;
}

/** Offset of the first byte that is not part of well-formed UTF-8, or -1. */
function firstInvalidUtf8(b: Uint8Array): number {
  let i = 0;
  while (i < b.length) {
    const c = b[i]!;
    if (c < 0x80) {
      i++;
      continue;
    }
    let need: number;
    let lo = 0x80;
    let hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) need = 1;
    else if (c >= 0xe0 && c <= 0xef) {
      need = 2;
      if (c === 0xe0) lo = 0xa0;
      if (c === 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      need = 3;
      if (c === 0xf0) lo = 0x90;
      if (c === 0xf4) hi = 0x8f;
    } else return i;
    for (let k = 1; k <= need; k++) {
      const d = b[i + k];
      if (d === undefined || d < (k === 1 ? lo : 0x80) || d > (k === 1 ? hi : 0xbf)) return i;
    }
    i += need + 1;
  }
  return -1;
}

const PARSE_HINT =
  "a .drv file is Nix ATerm text, Derive([outputs],[inputDrvs],[inputSrcs],\"system\",\"builder\",[args],[env]), with no whitespace and no trailing newline; the file may be truncated or not written by Nix or Ferry";

function parseError(offset: number, message: string, expected: string | undefined, found: string): FerryError {
  return new FerryError("FERRY_DRV_PARSE", `not a valid derivation: at byte ${offset}, ${message}`, {
    hint: PARSE_HINT,
    details: { offset, expected, found },
  });
}

class DrvParser {
  private i = 0;
  /** Index of the next `\\` at or after the last search start; -1: none; -2: not searched yet. */
  private bsPos = -2;

  constructor(
    private readonly s: string,
    private readonly storeDir: string,
  ) {}

  private foundAt(at: number): string {
    if (at >= this.s.length) return "the end of the text";
    const cp = this.s.codePointAt(at)!;
    return JSON.stringify(String.fromCodePoint(cp));
  }

  /** Throws FERRY_DRV_PARSE: `expected` was wanted at char index `at`. */
  fail(expected: string, at = this.i): never {
    const found = this.foundAt(at);
    throw parseError(utf8Offset(this.s, at), `expected ${expected} but found ${found}`, expected, found);
  }

  /** Throws FERRY_DRV_PARSE for a well-formed but unacceptable value starting at char index `at`. */
  invalid(at: number, why: string): never {
    throw parseError(utf8Offset(this.s, at), why, undefined, this.foundAt(at));
  }

  private lit(c: string, what = `'${c}'`): void {
    if (this.s.startsWith(c, this.i)) this.i += c.length;
    else this.fail(what);
  }

  /** The next backslash at or after `from`, or -1; each search covers new text only, so parsing stays linear. */
  private nextBackslash(from: number): number {
    if (this.bsPos === -1 || this.bsPos >= from) return this.bsPos;
    return (this.bsPos = this.s.indexOf("\\", from));
  }

  private peek(c: string): boolean {
    return this.s.charCodeAt(this.i) === c.charCodeAt(0);
  }

  /** A field Nix writes unescaped: `"…"` with no `\` inside. */
  private rawString(what: string): string {
    this.lit('"', `'"' (the start of the ${what})`);
    const start = this.i;
    const end = this.s.indexOf('"', start);
    const bs = this.nextBackslash(start);
    if (bs !== -1 && (end === -1 || bs < end)) this.invalid(bs, `the ${what} contains '\\', but Nix writes it unescaped, so it cannot hold one`);
    if (end === -1) this.fail(`'"' (the end of the ${what})`, this.s.length);
    this.i = end + 1;
    return this.s.slice(start, end);
  }

  /** An escaped field: `\x` reads as x, with n, r, t as LF, CR, TAB (SPEC §4.3). */
  private escString(what: string): string {
    this.lit('"', `'"' (the start of the ${what})`);
    const s = this.s;
    let out = "";
    let from = this.i;
    for (;;) {
      const q = s.indexOf('"', from);
      let bs = this.nextBackslash(from);
      if (bs === -1 || (q !== -1 && q < bs)) {
        if (q === -1) this.fail(`'"' (the end of the ${what})`, s.length);
        out += s.slice(from, q);
        this.i = q + 1;
        return out;
      }
      out += s.slice(from, bs);
      bs++;
      if (bs >= s.length) this.fail(`an escaped character after '\\' in the ${what}`, bs);
      const c = s[bs]!;
      // an escaped astral character is one code point, two UTF-16 units
      const cp = s.codePointAt(bs)!;
      const unit = cp > 0xffff ? String.fromCodePoint(cp) : c;
      out += c === "n" ? "\n" : c === "r" ? "\r" : c === "t" ? "\t" : unit;
      from = bs + unit.length;
    }
  }

  private list<T>(item: () => T): T[] {
    this.lit("[");
    const out: T[] = [];
    if (this.peek("]")) {
      this.i++;
      return out;
    }
    for (;;) {
      out.push(item());
      if (this.peek(",")) this.i++;
      else {
        this.lit("]", "',' or ']'");
        return out;
      }
    }
  }

  /** Keeps the file's order honest: bytewise ascending, no duplicates. */
  private checkOrder(prev: string | undefined, cur: string, at: number, what: string): void {
    if (prev !== undefined && compareUtf8(prev, cur) >= 0) {
      this.invalid(at, prev === cur ? `the ${what} ${JSON.stringify(cur)} appears twice` : `the ${what}s are not sorted bytewise (${JSON.stringify(cur)} comes after ${JSON.stringify(prev)})`);
    }
  }

  private storePath(at: number, p: string, what: string): string {
    try {
      parseStorePath(this.storeDir, p);
    } catch (e) {
      this.invalid(at, `the ${what} ${JSON.stringify(p)} is not a store path in ${this.storeDir}${e instanceof Error ? ` (${e.message})` : ""}`);
    }
    return p;
  }

  parse(): Derivation {
    this.lit("Derive(", "'Derive('");

    const outputs = new Map<string, DerivationOutput>();
    let prev: string | undefined;
    const outputsAt = this.i;
    this.list(() => {
      const at = this.i;
      this.lit("(");
      const name = this.rawString("output name");
      this.checkOrder(prev, name, at, "output name");
      prev = name;
      this.lit(",");
      const pathAt = this.i;
      const path = this.rawString("output path");
      if (path !== "") this.storePath(pathAt, path, "output path");
      this.lit(",");
      const hashAlgo = this.rawString("hash algorithm");
      this.lit(",");
      const hash = this.rawString("output hash");
      this.lit(")");
      const o = Object.freeze({ path, hashAlgo, hash });
      const p = outputProblem(name, o);
      if (p) this.invalid(at, p.why);
      outputs.set(name, o);
    });
    this.lit(",");

    const inputDrvs = new Map<string, readonly string[]>();
    prev = undefined;
    this.list(() => {
      const at = this.i;
      this.lit("(");
      const pathAt = this.i;
      const path = this.rawString("input derivation path");
      this.checkOrder(prev, path, at, "input derivation");
      prev = path;
      this.storePath(pathAt, path, "input derivation path");
      if (!path.endsWith(".drv")) this.invalid(pathAt, `the input derivation path ${JSON.stringify(path)} does not end in .drv`);
      this.lit(",");
      let prevOut: string | undefined;
      const outsAt = this.i;
      const outs = this.list(() => {
        const oat = this.i;
        const o = this.rawString("input output name");
        this.checkOrder(prevOut, o, oat, "output name");
        prevOut = o;
        return o;
      });
      if (outs.length === 0) this.invalid(outsAt, `the input derivation ${JSON.stringify(path)} is used for no outputs`);
      this.lit(")");
      inputDrvs.set(path, Object.freeze(outs));
    });
    this.lit(",");

    prev = undefined;
    const inputSrcs = this.list(() => {
      const at = this.i;
      const p = this.rawString("input source path");
      this.checkOrder(prev, p, at, "input source");
      prev = p;
      return this.storePath(at, p, "input source path");
    });
    this.lit(",");
    const system = this.rawString("system");
    this.lit(",");
    const builder = this.escString("builder");
    this.lit(",");
    const args = this.list(() => this.escString("argument"));
    this.lit(",");

    const env = new Map<string, string>();
    prev = undefined;
    this.list(() => {
      const at = this.i;
      this.lit("(");
      const key = this.escString("environment variable name");
      this.checkOrder(prev, key, at, "environment variable");
      prev = key;
      this.lit(",");
      const value = this.escString("environment variable value");
      this.lit(")");
      env.set(key, value);
    });
    this.lit(")");
    if (this.i !== this.s.length) this.fail("the end of the text");

    const drv: Derivation = Object.freeze({
      outputs,
      inputDrvs,
      inputSrcs: Object.freeze(inputSrcs),
      system,
      builder,
      args: Object.freeze(args),
      env,
    });
    const p = outputsProblem(drv);
    if (p) this.invalid(outputsAt, p.why);
    return drv;
  }
}

const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * Parses a .drv file strictly: the exact grammar of SPEC §4.1, lists sorted and without
 * duplicates, paths inside `storeDir`, output tuples of a supported kind, nothing after the
 * closing `)`. Escaped fields accept `\x` for any x (SPEC §4.3), so a file with unusual escapes
 * parses but does not print back to the same bytes. Throws FERRY_DRV_PARSE with
 * `details.offset` (a byte offset) and `details.expected`.
 */
export function parseDerivation(text: string | Uint8Array, storeDir: string): Derivation {
  checkStoreDir(storeDir);
  let s: string;
  if (typeof text === "string") {
    s = text;
    const m = LONE_SURROGATE.exec(s);
    if (m) throw parseError(utf8Offset(s, m.index), "the text contains an unpaired surrogate, which no file can hold", undefined, "an unpaired surrogate");
  } else {
    const bad = firstInvalidUtf8(text);
    if (bad !== -1) throw parseError(bad, "the text is not valid UTF-8", undefined, `the byte 0x${text[bad]!.toString(16).padStart(2, "0")}`);
    s = strictUtf8.decode(text);
  }
  return new DrvParser(s, storeDir).parse();
}

// ---- hashDerivationModulo -----------------------------------------------------------------------

/** Returns the derivation stored at a .drv path (final, with output paths filled in). */
export type ResolveInput = (drvPath: string) => Derivation;

/** The unmasked hashDerivationModulo digest of an input derivation (also in hex), and its output names. */
export interface DrvHashEntry {
  readonly hash: Uint8Array;
  readonly hex: string;
  readonly outputs: readonly string[];
}

class HashEntry implements DrvHashEntry {
  constructor(
    readonly hex: string,
    readonly outputs: readonly string[],
  ) {
    Object.freeze(this);
  }

  get hash(): Uint8Array {
    return fromBase16(this.hex);
  }
}

const OUT_ONLY: readonly string[] = Object.freeze(["out"]);

/** The digest entry for `preimage`; `outputs` are the derivation's output names, sorted. */
function hashEntry(preimage: string, outputs: readonly string[]): DrvHashEntry {
  const names = outputs.length === 1 && outputs[0] === "out" ? OUT_ONLY : Object.freeze([...outputs]);
  return new HashEntry(sha256Hex(preimage), names);
}

/**
 * Memo of input digests keyed by .drv path. Share one across calls (a whole evaluation or graph)
 * so every derivation is resolved and hashed once. Entries are made by this module only: a path
 * in the memo is a valid .drv store path.
 */
export type DrvHashCache = Map<string, DrvHashEntry>;

export interface HashModuloOptions {
  /**
   * Mask this derivation's own outputs (default true): the digest its output paths are made
   * from. `false` gives the digest derivations that depend on it see.
   */
  readonly mask?: boolean;
  /** For a fixed-output derivation: the store dir and name its output path is computed from. Default: read from its written output path. */
  readonly storeDir?: string;
  readonly name?: string;
}

/** The store dir and derivation name of a .drv path (`<dir>/<hash>-<name>.drv`). */
function splitDrvPath(drvPath: string): { storeDir: string; name: string } {
  const slash = drvPath.lastIndexOf("/");
  const storeDir = drvPath.slice(0, slash);
  const sp = parseStorePath(storeDir, drvPath);
  if (!sp.name.endsWith(".drv") || sp.name.length === 4) {
    throw new FerryError("FERRY_DRV_BAD_INPUT", `'${drvPath}' is not a derivation path`, { hint: "derivation paths end in .drv" });
  }
  return { storeDir, name: sp.name.slice(0, -4) };
}

function fixedPreimage(drv: Derivation, storeDir: string, name: string): string {
  const out = drv.outputs.get("out")!;
  return `fixed:out:${out.hashAlgo}:${out.hash}:${fixedOutputPath(drv, storeDir, name)}`;
}

function topFixedPreimage(drv: Derivation, opts: HashModuloOptions): string {
  if (opts.storeDir !== undefined && opts.name !== undefined) return fixedPreimage(drv, opts.storeDir, opts.name);
  const p = drv.outputs.get("out")!.path;
  if (p === "") throw new Error("hashing a masked fixed-output derivation needs storeDir and name");
  const slash = p.lastIndexOf("/");
  const sp = parseStorePath(p.slice(0, slash), p);
  return fixedPreimage(drv, sp.storeDir, sp.name);
}

/**
 * Digests every input derivation reachable from `roots` into `cache`, depth first without
 * recursion (a 100,000-long chain is fine). Each missing path is resolved once.
 */
function hashInputs(roots: Iterable<string>, resolveInput: ResolveInput, cache: DrvHashCache): void {
  interface Frame {
    readonly path: string;
    readonly drv: Derivation;
    readonly inputs: readonly string[];
    next: number;
  }
  const stack: Frame[] = [];
  const onStack = new Set<string>();
  const push = (path: string): void => {
    const drv = resolveInput(path);
    checkOutputs(drv);
    for (const [o, out] of drv.outputs) {
      if (out.path === "") {
        throw new FerryError("FERRY_DRV_BAD_INPUT", `input derivation '${path}' is not final: its output '${o}' has no path`, {
          hint: "finalize input derivations (fill in their output paths) before using them",
        });
      }
    }
    onStack.add(path);
    stack.push({ path, drv, inputs: isFixedOutput(drv) ? [] : [...drv.inputDrvs.keys()], next: 0 });
  };
  for (const root of roots) {
    if (cache.has(root)) continue;
    push(root);
    while (stack.length > 0) {
      const f = stack[stack.length - 1]!;
      if (f.next < f.inputs.length) {
        const q = f.inputs[f.next++]!;
        if (cache.has(q)) continue;
        if (onStack.has(q)) {
          throw new FerryError("FERRY_DRV_CYCLE", `derivation '${q}' depends on itself (through '${f.path}')`, {
            hint: "derivation graphs cannot have cycles; the store or the resolver returned inconsistent derivations",
          });
        }
        push(q);
        continue;
      }
      const { storeDir, name } = splitDrvPath(f.path);
      const pre = isFixedOutput(f.drv) ? fixedPreimage(f.drv, storeDir, name) : printWithInputs(f.drv, moduloInputsText(`'${f.path}'`, f.drv, cache), false);
      cache.set(f.path, hashEntry(pre, sortedKeys(f.drv.outputs)));
      onStack.delete(f.path);
      stack.pop();
    }
  }
}

/**
 * The inputDrvs list re-keyed by the hex digest of each input, merged and sorted (SPEC §6.2), as
 * ATerm text. Inputs must be in `cache`, or in `known` (entries in the order of `drv.inputDrvs`).
 */
function moduloInputsText(self: string, drv: Derivation, cache: DrvHashCache, known?: readonly (DrvHashEntry | undefined)[]): string {
  const rows: { readonly hex: string; readonly outs: readonly string[] }[] = [];
  let i = 0;
  for (const [path, outs] of drv.inputDrvs) {
    const entry = known?.[i++] ?? cache.get(path)!;
    for (const o of outs) {
      if (!entry.outputs.includes(o)) {
        throw new FerryError("FERRY_DRV_BAD_INPUT", `derivation ${self} uses output '${o}' of '${path}', which has only ${entry.outputs.map((x) => `'${x}'`).join(", ")}`, {
          hint: "an input derivation can only be used for the outputs it declares",
        });
      }
    }
    rows.push({ hex: entry.hex, outs });
  }
  // hex digests are ASCII, so JavaScript's order is the bytewise order
  sortInPlace(rows, (a, b) => compareUtf16(a.hex, b.hex));
  let s = "";
  for (let i = 0; i < rows.length; ) {
    const hex = rows[i]!.hex;
    let outs = rows[i++]!.outs;
    if (i < rows.length && rows[i]!.hex === hex) {
      const merged = [...outs];
      while (i < rows.length && rows[i]!.hex === hex) merged.push(...rows[i++]!.outs);
      outs = merged;
    }
    // output names an input declares were checked when it was printed or parsed
    s += `${s === "" ? "" : ","}("${hex}",[${quotedList(sortedUnique(outs))}])`;
  }
  return s;
}

/**
 * The string hashDerivationModulo hashes (SPEC §6): `fixed:out:<algo>:<hex>:<path>` for a
 * fixed-output derivation; otherwise the ATerm with inputDrvs re-keyed by their digests, and,
 * with `mask` (the default), its own outputs masked.
 */
export function printDerivationModulo(drv: Derivation, resolveInput: ResolveInput, cache: DrvHashCache = new Map(), opts: HashModuloOptions = {}): string {
  checkOutputs(drv);
  if (isFixedOutput(drv)) return topFixedPreimage(drv, opts);
  hashInputs(drv.inputDrvs.keys(), resolveInput, cache);
  return printWithInputs(drv, moduloInputsText("being hashed", drv, cache), opts.mask ?? true);
}

/**
 * hashDerivationModulo (SPEC §6): the 32-byte sha256 digest an input-addressed derivation's
 * output paths are made from (masked, the default), or that dependents see (`mask: false`).
 * Input derivations come from `resolveInput`, each at most once per `cache`.
 */
export function hashDerivationModulo(drv: Derivation, resolveInput: ResolveInput, cache: DrvHashCache = new Map(), opts: HashModuloOptions = {}): Uint8Array {
  return sha256(printDerivationModulo(drv, resolveInput, cache, opts));
}

// ---- finalizing and checking --------------------------------------------------------------------

function nameOf(drv: Derivation, name: string | undefined): string {
  const n = name ?? drv.env.get("name");
  if (n === undefined) {
    throw new FerryError("FERRY_DRV_NO_NAME", "the derivation has no name", { hint: "set the env entry 'name', or pass the name explicitly" });
  }
  return n;
}

/** The references of a .drv file: its inputSrcs and inputDrvs, in JavaScript's default order. */
export function referencesOf(drv: Derivation): string[] {
  return sortInPlace([...sortedUnique(drv.inputSrcs), ...drv.inputDrvs.keys()], compareUtf16);
}

/** The .drv file's own store path (SPEC §5): a text path over its exact text, referring to inputSrcs and inputDrvs. */
export function makeDerivationPath(storeDir: string, name: string, drv: Derivation, text: string = printDerivation(drv)): string {
  return textPathOfHex(storeDir, `${name}.drv`, sha256Hex(text), referencesOf(drv));
}

/** The env keys of a final derivation: those of `drv` and its output names, sorted bytewise. */
function finalEnvKeys(drv: Derivation): readonly string[] {
  for (const o of drv.outputs.keys()) if (!drv.env.has(o)) return sortedUnique([...drv.env.keys(), ...drv.outputs.keys()]);
  return sortedKeys(drv.env);
}

/** What a derivation's contents imply: the output paths, and for an input-addressed one its final template and modulo inputDrvs. */
interface ImpliedOutputs {
  /** Output names, sorted. */
  readonly outputs: readonly string[];
  /** The path of each output. */
  readonly paths: readonly string[];
  readonly input?: { readonly template: AtermTemplate; readonly modulo: string };
}

/**
 * The output paths `drv`'s contents imply, whatever paths it has written in. For input-addressed
 * outputs, env entries named after outputs are masked (added as "" when missing, as Nix's
 * evaluator always has them). `inputs`, when the caller has looked them up: the memo entries of
 * the inputs in the order of `drv.inputDrvs` (undefined where missing), and the missing paths.
 */
function impliedOutputs(
  drv: Derivation,
  storeDir: string,
  name: string,
  resolveInput: ResolveInput,
  cache: DrvHashCache,
  inputs: { readonly missing: readonly string[]; readonly known: readonly (DrvHashEntry | undefined)[] } | undefined = undefined,
): ImpliedOutputs {
  checkOutputs(drv);
  if (isFixedOutput(drv)) return { outputs: OUT_ONLY, paths: [fixedOutputPath(drv, storeDir, name)] };
  hashInputs(inputs ? inputs.missing : drv.inputDrvs.keys(), resolveInput, cache);
  const modulo = moduloInputsText(`'${name}'`, drv, cache, inputs?.known);
  const template = templateOf(drv, finalEnvKeys(drv));
  const h = sha256Hex(fillTemplate(template, undefined, modulo, undefined));
  return { outputs: template.outputs, paths: template.outputs.map((o) => outputPathOfHex(storeDir, o, h, name)), input: { template, modulo } };
}

export interface FinalizeOptions {
  /** The derivation's name; default: its env entry `name`. */
  readonly name?: string;
  /** Shared digest memo; the finalized derivation's own digest is added to it. */
  readonly cache?: DrvHashCache;
}

export interface FinalizedDerivation {
  readonly drv: Derivation;
  /** The exact .drv file. */
  readonly text: string;
  readonly drvPath: string;
  /** Output name → output path, in output-name order. */
  readonly outputPaths: ReadonlyMap<string, string>;
  /** The .drv file's references (its inputSrcs and inputDrvs), in JavaScript's default order. */
  readonly references: readonly string[];
}

class Finalized implements FinalizedDerivation {
  readonly #draft: Derivation;
  #drv: Derivation | undefined;

  constructor(
    draft: Derivation,
    readonly text: string,
    readonly drvPath: string,
    readonly outputPaths: ReadonlyMap<string, string>,
    readonly references: readonly string[],
  ) {
    this.#draft = draft;
    Object.freeze(this);
  }

  /** The final derivation, made when first asked for. */
  get drv(): Derivation {
    if (this.#drv) return this.#drv;
    const env = new Map(this.#draft.env);
    const outputs = new Map<string, DerivationOutput>();
    for (const [o, out] of this.#draft.outputs) {
      const path = this.outputPaths.get(o)!;
      env.set(o, path);
      outputs.set(o, { ...out, path });
    }
    return (this.#drv = makeDerivation({ ...this.#draft, outputs, env }));
  }
}

/**
 * Turns a draft into a final derivation (SPEC §6, "Algorithm for generating a .drv"): computes
 * each output's path (fixed-output: from its hash; otherwise from the masked hashDerivationModulo),
 * writes it into the output tuple and into the env entry named after the output (which is added
 * if missing), then prints the .drv and computes its path. Paths already written in the draft
 * are ignored, so finalizing a final derivation returns it unchanged. The draft need not be
 * sorted (a value `makeDerivation` did not make is fine) and must not change afterwards.
 */
export function finalizeDerivation(draft: Derivation, storeDir: string, resolveInput: ResolveInput, opts: FinalizeOptions = {}): FinalizedDerivation {
  checkStoreDir(storeDir);
  const name = checkNewName(nameOf(draft, opts.name));
  checkNewName(`${name}.drv`);
  const cache = opts.cache ?? new Map<string, DrvHashEntry>();
  for (const p of draft.inputSrcs) parseStorePath(storeDir, p);
  const missing: string[] = [];
  const known: (DrvHashEntry | undefined)[] = [];
  for (const p of draft.inputDrvs.keys()) {
    // a path in the memo is a valid .drv path; only its store dir is left to check
    const entry = cache.get(p);
    if (entry !== undefined && p.lastIndexOf("/") === storeDir.length && p.startsWith(storeDir)) {
      known.push(entry);
      continue;
    }
    parseStorePath(storeDir, p);
    splitDrvPath(p);
    missing.push(p);
    known.push(undefined);
  }
  const implied = impliedOutputs(draft, storeDir, name, resolveInput, cache, { missing, known });
  const t = implied.input?.template ?? templateOf(draft, finalEnvKeys(draft));
  // a path made here is the store dir and characters that need no escaping
  const plain = !ESCAPE_NEEDED.test(storeDir);
  const paths = plain ? implied.paths : implied.paths.map((p) => rawBody(p, "output path"));
  const values = plain ? implied.paths : implied.paths.map((p, i) => escapedBody(p, `value of environment variable '${t.outputs[i]!}'`));
  const text = fillTemplate(t, paths, inputDrvsText(draft.inputDrvs), values);
  const references = referencesOf(draft);
  const drvPath = textPathOfHex(storeDir, `${name}.drv`, sha256Hex(text), references);
  // a path already in the memo has this very entry: the path is a digest of the text
  if (opts.cache) {
    cache.set(drvPath, hashEntry(implied.input ? fillTemplate(t, paths, implied.input.modulo, values) : fixedPreimage(draft, storeDir, name), t.outputs));
  }
  const outputPaths = new Map<string, string>();
  for (let i = 0; i < t.outputs.length; i++) outputPaths.set(t.outputs[i]!, implied.paths[i]!);
  return new Finalized(draft, text, drvPath, outputPaths, references);
}

export interface CheckOutputsOptions {
  /** The .drv's own path; its name is the derivation's name (as in Nix). */
  readonly drvPath?: string;
  /** The derivation's name when `drvPath` is not given; default: its env entry `name`. */
  readonly name?: string;
  readonly cache?: DrvHashCache;
}

/**
 * Throws FERRY_DRV_WRONG_OUTPUTS unless every output path written in `drv`, and every env entry
 * named after an output, is the path its contents imply (Nix refuses such a .drv too).
 */
export function checkDerivationOutputs(drv: Derivation, storeDir: string, resolveInput: ResolveInput, opts: CheckOutputsOptions = {}): void {
  checkStoreDir(storeDir);
  if (opts.drvPath !== undefined) parseStorePath(storeDir, opts.drvPath);
  const name = checkName(opts.drvPath !== undefined ? splitDrvPath(opts.drvPath).name : nameOf(drv, opts.name));
  const expected = impliedOutputs(drv, storeDir, name, resolveInput, opts.cache ?? new Map());
  const wrong: { field: string; expected: string; found: string }[] = [];
  for (let i = 0; i < expected.outputs.length; i++) {
    const o = expected.outputs[i]!;
    const path = expected.paths[i]!;
    const written = drv.outputs.get(o)!.path;
    if (written !== path) wrong.push({ field: `output '${o}'`, expected: path, found: written });
    const inEnv = drv.env.get(o);
    if (inEnv !== path) wrong.push({ field: `environment variable '${o}'`, expected: path, found: inEnv ?? "(missing)" });
  }
  if (wrong.length > 0) {
    const list = wrong.map((w) => `${w.field} is ${JSON.stringify(w.found)}, should be ${JSON.stringify(w.expected)}`).join("; ");
    throw new FerryError("FERRY_DRV_WRONG_OUTPUTS", `derivation${opts.drvPath ? ` '${opts.drvPath}'` : ` '${name}'`} has wrong output paths: ${list}`, {
      hint: "the .drv was edited after it was generated, or made by a tool that computes output paths differently; generate it again",
      details: { wrong },
    });
  }
}

// ---- JSON ---------------------------------------------------------------------------------------

/** The shape `nix show-derivation` prints for one derivation (Nix 2.8). */
export interface DerivationJson {
  outputs: Record<string, { path?: string; hashAlgo?: string; hash?: string }>;
  inputSrcs: string[];
  inputDrvs: Record<string, string[]>;
  system: string;
  builder: string;
  args: string[];
  env: Record<string, string>;
}

/** A plain object with these own properties, safe for keys like `__proto__`. */
function recordOf<V>(entries: Iterable<readonly [string, V]>): Record<string, V> {
  const r: Record<string, V> = {};
  for (const [k, v] of entries) Object.defineProperty(r, k, { value: v, enumerable: true, writable: true, configurable: true });
  return r;
}

/**
 * `drv` as `nix show-derivation` prints it: output tuples as {path, hashAlgo, hash} without the
 * empty fields, everything else as is.
 */
export function derivationToJson(drv: Derivation): DerivationJson {
  return {
    outputs: recordOf(
      [...drv.outputs].map(([name, o]) => {
        const j: { path?: string; hashAlgo?: string; hash?: string } = {};
        if (o.path !== "") j.path = o.path;
        if (o.hashAlgo !== "") j.hashAlgo = o.hashAlgo;
        if (o.hash !== "") j.hash = o.hash;
        return [name, j] as const;
      }),
    ),
    inputSrcs: [...drv.inputSrcs],
    inputDrvs: recordOf([...drv.inputDrvs].map(([p, outs]) => [p, [...outs]] as const)),
    system: drv.system,
    builder: drv.builder,
    args: [...drv.args],
    env: recordOf(drv.env),
  };
}

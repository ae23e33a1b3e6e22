/**
 * `derivation(attrs)`: Nix's primitive, with Nix's conventions (SPEC §4.5), so that the same
 * attributes give the same .drv text and paths as `nix-instantiate`:
 * every attribute but `args` goes to the environment; strings as they are, integers in
 * decimal, true as "1", false and null as "", floats like printf's %f, lists joined by spaces;
 * packages, outputs and sources become their store paths and record the dependency.
 */
import { fileURLToPath } from "node:url";
import { FerryError } from "../core/errors.js";
import { parseHash, parseHashAlgo, toBase16, type Hash, type HashAlgo } from "../core/hash.js";
import { checkNewName } from "../core/store-path.js";
import { evalContext, type ContextEntry, type EvalContext } from "./context.js";
import { OutputRef, Package, SourcePath } from "./values.js";
import { finalizeDraft, type DrvDraft } from "./finalize.js";

export type AttrValue = string | number | boolean | null | undefined | Package | OutputRef | SourcePath | readonly AttrValue[];

export interface DerivationAttrs {
  readonly name: string;
  readonly system: string;
  readonly builder: string | Package | OutputRef | SourcePath;
  readonly args?: readonly (string | Package | OutputRef | SourcePath)[];
  readonly outputs?: readonly string[];
  readonly outputHash?: string;
  readonly outputHashAlgo?: string;
  readonly outputHashMode?: "flat" | "recursive";
  readonly [attr: string]: AttrValue | readonly AttrValue[];
}

/** Ferry's own source and build folders: stack frames there are not the user's. */
const FERRY_ROOT = fileURLToPath(new URL("../../..", import.meta.url)).replace(/\/$/, "");
const OWN_DIRS = [`${FERRY_ROOT}/dist/`, `${FERRY_ROOT}/src/`, "/node_modules/"];

/** True when a stack frame's file is Ferry's own code (or a dependency's), not the user's. */
export function isOwnFrame(file: string): boolean {
  return OWN_DIRS.some((d) => file.includes(d)) || file.startsWith("node:");
}

/** Where package code called us: the first stack frame outside Ferry itself. */
export function callSite(): string | undefined {
  const stack = new Error().stack?.split("\n").slice(1) ?? [];
  for (const line of stack) {
    const m = /\(?((?:file:\/\/)?\/[^()]+?):(\d+):(\d+)\)?$/.exec(line.trim());
    if (!m) continue;
    const file = m[1]!.replace(/^file:\/\//, "");
    if (isOwnFrame(file)) continue;
    return `${file}:${m[2]}`;
  }
  return undefined;
}

export function evalError(code: string, message: string, hint?: string): FerryError {
  const at = callSite();
  return new FerryError(code, at ? `${at}: ${message}` : message, { ...(hint ? { hint } : {}), details: at ? { at } : {} });
}

function formatFloat(n: number): string {
  return n.toFixed(6);
}

/**
 * Coerces one attribute value to its environment string, reporting its context: a package,
 * output or source given as a value is an exact dependency; a string is scanned for the store
 * paths of this evaluation it mentions. (Two fixed-output derivations with the same hash share
 * an output path; a string naming that path is attributed to the first one made, while passing
 * the package itself always records the right one.)
 */
export function coerce(v: AttrValue, attr: string, onContext: (e: ContextEntry) => void, ctx: EvalContext): string {
  if (v === null || v === undefined || v === false) return "";
  if (v === true) return "1";
  if (typeof v === "string") {
    for (const e of ctx.contextOf(v)) onContext(e);
    return v;
  }
  if (typeof v === "number") {
    if (!Number.isFinite(v)) throw evalError("FERRY_EVAL_BAD_VALUE", `attribute '${attr}' is ${v}, which has no string form`);
    return Number.isInteger(v) ? String(v) : formatFloat(v);
  }
  if (Array.isArray(v)) return v.map((x) => coerce(x as AttrValue, attr, onContext, ctx)).join(" ");
  if (v instanceof Package) {
    onContext({ kind: "output", drvPath: v.drvPath, output: v.outputNames[0]! });
    return v.outPath;
  }
  if (v instanceof OutputRef) {
    onContext({ kind: "output", drvPath: v.drvPath, output: v.output });
    return v.path;
  }
  if (v instanceof SourcePath) {
    onContext({ kind: "source", path: v.path });
    return v.path;
  }
  throw evalError("FERRY_EVAL_BAD_VALUE", `attribute '${attr}' has a value of type ${typeof v} that cannot go into a derivation`, "use strings, numbers, booleans, lists, packages or sources");
}

function addEntry(e: ContextEntry, inputDrvs: Map<string, string[]>, inputSrcs: Set<string>): void {
  if (e.kind === "output") {
    const outs = inputDrvs.get(e.drvPath);
    if (!outs) inputDrvs.set(e.drvPath, [e.output]);
    else if (!outs.includes(e.output)) outs.push(e.output);
  } else {
    inputSrcs.add(e.path);
  }
}

const QUOTE_OR_BACKSLASH = /["\\]/;
const OUTPUT_NAME = /^[A-Za-z0-9+\-._?=]+$/;

/** Creates a derivation; returns the frozen package value with its computed paths. */
export function derivation(attrs: DerivationAttrs, meta: Record<string, unknown> = {}): Package {
  const ctx = evalContext();
  if (typeof attrs.name !== "string") throw evalError("FERRY_EVAL_BAD_VALUE", "a derivation needs a string 'name'");
  try {
    checkNewName(attrs.name);
  } catch (e) {
    throw evalError("FERRY_STORE_BAD_NAME", (e as Error).message, (e as FerryError).hint);
  }
  if (typeof attrs.system !== "string" || attrs.system === "") throw evalError("FERRY_EVAL_BAD_VALUE", `derivation '${attrs.name}' needs a 'system' such as x86_64-linux`);
  if (QUOTE_OR_BACKSLASH.test(attrs.system)) throw evalError("FERRY_DRV_BAD_FIELD", `system '${attrs.system}' contains a quote or backslash`);
  const outputNames = attrs.outputs ?? ["out"];
  if (outputNames.length === 0 || (outputNames.length > 1 && new Set(outputNames).size !== outputNames.length)) {
    throw evalError("FERRY_EVAL_BAD_VALUE", `derivation '${attrs.name}' has an empty or repeated 'outputs' list`);
  }
  for (const o of outputNames) {
    if (!OUTPUT_NAME.test(o) || o === "drv") throw evalError("FERRY_EVAL_BAD_VALUE", `'${o}' cannot be an output name`);
  }
  const inputDrvs = new Map<string, string[]>();
  const inputSrcs = new Set<string>();
  const env = new Map<string, string>();
  const onContext = (e: ContextEntry) => addEntry(e, inputDrvs, inputSrcs);
  for (const k of Object.keys(attrs)) {
    const v = attrs[k];
    if (k === "args" || v === undefined) continue;
    env.set(k, k === "outputs" ? outputNames.join(" ") : coerce(v as AttrValue, k, onContext, ctx));
  }
  const args = (attrs.args ?? []).map((a, i) => coerce(a as AttrValue, `args[${i}]`, onContext, ctx));
  const builder = env.get("builder")!;
  let fixed: DrvDraft["fixed"];
  if (attrs.outputHash !== undefined) {
    if (outputNames.length !== 1 || outputNames[0] !== "out") {
      throw evalError("FERRY_EVAL_BAD_VALUE", `fixed-output derivation '${attrs.name}' must have exactly one output, 'out'`);
    }
    const mode = attrs.outputHashMode ?? "flat";
    if (mode !== "flat" && mode !== "recursive") throw evalError("FERRY_EVAL_BAD_VALUE", `outputHashMode must be "flat" or "recursive", not '${String(mode)}'`);
    let hash: Hash;
    try {
      const algo: HashAlgo | undefined = attrs.outputHashAlgo ? parseHashAlgo(attrs.outputHashAlgo) : undefined;
      hash = parseHash(attrs.outputHash, algo);
    } catch (e) {
      throw evalError("FERRY_EVAL_BAD_HASH", `derivation '${attrs.name}': ${(e as Error).message}`, "give outputHash as an SRI hash (sha256-…) or with outputHashAlgo");
    }
    fixed = { method: mode, hash, hashAlgo: `${mode === "recursive" ? "r:" : ""}${hash.algo}`, hashHex: toBase16(hash.digest) };
  }
  const draft: DrvDraft = {
    name: attrs.name,
    system: attrs.system,
    builder,
    args,
    env,
    outputNames,
    inputDrvs,
    inputSrcs: [...inputSrcs],
    fixed,
  };
  const done = finalizeDraft(ctx, draft);
  for (const [o, p] of done.outputs) ctx.register(p, { kind: "output", drvPath: done.drvPath, output: o });
  return new Package({ name: attrs.name, system: attrs.system, drvPath: done.drvPath, outputs: done.outputs, meta });
}

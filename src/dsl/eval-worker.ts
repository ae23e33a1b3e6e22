/**
 * The evaluation subprocess: loads a package set (TypeScript or JavaScript), evaluates the
 * requested attributes, and streams what it found to the parent over file descriptor 3 in the
 * frames of eval-protocol. It never writes to the store; the parent does, from this plan.
 * Anything the package code prints goes to stderr.
 *
 * argv: FILE ATTR|"" STORE_DIR HOST_SYSTEM
 */
import { register } from "node:module";
import { pathToFileURL } from "node:url";
import { dirname, resolve } from "node:path";
import { FerryError } from "../core/errors.js";
import { writeAllSync } from "../store/fs-util.js";
import { hashPath } from "../store/nar-dump.js";
import { EvalContext, setEvalContext } from "./context.js";
import { Package } from "./values.js";
import { isLazySet, forceAttr } from "./package-set.js";
import { isOwnFrame } from "./derivation.js";
import { FrameWriter } from "./eval-protocol.js";

const PROTOCOL_FD = 3;

/** Frames go out in writes of about 256 KiB. */
const frames = new FrameWriter((bytes) => writeAllSync(PROTOCOL_FD, bytes));
const send = (msg: Parameters<FrameWriter["json"]>[0]): void => frames.json(msg);
const flushMessages = (): void => frames.flush();

/**
 * Calls `visit` with every package under `value` and its attribute path (`trail`: the path so
 * far, used and restored). A package that is a member of a set costs no array or generator:
 * sets of a hundred thousand packages are walked in a blink.
 */
function visitJobs(value: unknown, trail: string[], seen: Set<unknown>, visit: (attr: string, pkg: Package) => void): void {
  if (value instanceof Package) {
    visit(trail.join("."), value);
    return;
  }
  if (value === null || typeof value !== "object" || seen.has(value)) return;
  seen.add(value);
  const lazy = isLazySet(value);
  if (!lazy && Array.isArray(value)) return;
  const prefix = trail.length ? `${trail.join(".")}.` : "";
  for (const k of Object.keys(value)) {
    const v = lazy ? forceAttr(value, k, trail) : (value as Record<string, unknown>)[k];
    if (v instanceof Package) {
      visit(prefix + k, v);
      continue;
    }
    trail.push(k);
    visitJobs(v, trail, seen, visit);
    trail.pop();
  }
}

function select(root: Record<string, unknown>, attr: string): unknown {
  let v: unknown = root;
  const trail: string[] = [];
  for (const part of attr.split(".")) {
    if (v === null || typeof v !== "object" || !(part in (v as object))) {
      throw new FerryError("FERRY_EVAL_NO_ATTR", `attribute '${[...trail, part].join(".")}' is not in the package set`, {
        hint: `the package set exports: ${Object.keys(root).join(", ") || "nothing"}`,
      });
    }
    v = isLazySet(v) ? forceAttr(v, part, trail) : (v as Record<string, unknown>)[part];
    trail.push(part);
  }
  return v;
}

async function main(): Promise<void> {
  const [file, attr, storeDir, hostSystem] = process.argv.slice(2) as [string, string, string, string];
  // User code's console output must not mix with the protocol.
  console.log = console.error;
  console.info = console.error;
  register("./loader-hooks.js", import.meta.url);
  const abs = resolve(file);
  const ctx = new EvalContext({ storeDir, hostSystem, baseDir: dirname(abs) }, { hashSource: (p) => hashPath(p) }, {
    onSource: (s) => send({ t: "source", ...s }),
    onText: (t) => frames.text(t),
  });
  setEvalContext(ctx);
  let mod: Record<string, unknown>;
  try {
    mod = (await import(pathToFileURL(abs).href)) as Record<string, unknown>;
  } catch (e) {
    if (e instanceof FerryError) throw e;
    const err = e as NodeJS.ErrnoException;
    if (err?.code === "ERR_MODULE_NOT_FOUND" && String(err.message).includes(abs)) {
      throw new FerryError("FERRY_EVAL_NO_FILE", `cannot find the package set '${file}'`, { hint: "give the path of a .ts or .js module" });
    }
    throw e;
  }
  const exported: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(mod)) {
    if (k === "default" && v && typeof v === "object" && !(v instanceof Package)) {
      // Members of a default-exported set become top-level attributes; lazy members stay lazy.
      for (const key of Object.keys(v)) {
        if (isLazySet(v)) Object.defineProperty(exported, key, { enumerable: true, get: () => forceAttr(v, key, []) });
        else exported[key] = (v as Record<string, unknown>)[key];
      }
    } else exported[k] = v;
  }
  const root = attr ? select(exported, attr) : exported;
  let n = 0;
  visitJobs(root, attr ? attr.split(".") : [], new Set(), (path, pkg) => {
    frames.job({ attr: path, name: pkg.name, system: pkg.system, drvPath: pkg.drvPath, outputs: pkg.outputs, meta: pkg.meta });
    n++;
  });
  send({ t: "done", jobs: n });
  flushMessages();
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    const fe = e instanceof FerryError ? e : undefined;
    const err = e as Error;
    // Point at the package set's own line where the error happened.
    const userFrame = (err?.stack ?? "").split("\n").map((l) => /(?:file:\/\/)?(\/[^():]+):(\d+):\d+\)?$/.exec(l.trim())).find((m) => m && !isOwnFrame(m[1]!));
    const where = userFrame ? `${userFrame[1]}:${userFrame[2]}: ` : "";
    send({
      t: "error",
      code: fe?.code ?? "FERRY_EVAL_FAILED",
      message: fe ? fe.message : `${where}${err?.name ?? "Error"}: ${err?.message ?? String(e)}`,
      hint: fe?.hint,
      stack: fe ? undefined : err?.stack,
    });
    flushMessages();
    process.exit(1);
  },
);

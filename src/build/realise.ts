/**
 * The realiser: builds the derivations a request needs, in dependency order, up to `jobs` at a
 * time. Each build runs in a fresh area inside the store dir (so results rename into place),
 * usually under the bubblewrap sandbox; its outputs are canonicalised, scanned for references,
 * hash-checked when fixed, and registered atomically. Returns one outcome per derivation.
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import { join } from "node:path";
import { FerryError, errorBody } from "../core/errors.js";
import type { Derivation } from "../core/derivation.js";
import { isFixedOutput, parseDerivation } from "../core/derivation.js";
import { asFerryError, type LocalStore, type NewObject } from "../store/local-store.js";
import { pathExists, removeTree, writeFileAtomic } from "../store/fs-util.js";
import { BuildEmitter } from "./events.js";
import { LogWriter, logPathOf } from "./logs.js";
import { builtinFetchurl } from "./fetchurl.js";
import { canonicalise, checkFixedOutput, diffTrees, scanOutput } from "./outputs.js";
import { missingOutputs, planBuild, type PlanNode } from "./plan.js";
import { HOST_TOOL_PATHS, SANDBOX_BUILD_DIR, bwrapArgs, bwrapPath, requireSandbox } from "./sandbox.js";
import { supportedSystems } from "./systems.js";

/**
 * Where substitutes come from (a binary cache, another store). Lookups are batched; a
 * substituter registers a path only once it is complete and checked, and fetches whatever the
 * path references that the store lacks.
 */
export interface Substituter {
  /** Which of `paths` this substituter can provide. */
  has(paths: readonly string[]): Promise<Set<string>>;
  /** Fetches `path` (and its missing references) into the store; returns whether it is valid now. */
  substitute(path: string): Promise<boolean>;
}

export interface RealiseOptions {
  readonly jobs?: number;
  readonly cores?: number;
  readonly sandbox?: boolean;
  readonly keepFailed?: boolean;
  /** Rebuild the requested derivations and compare with what is registered. */
  readonly check?: boolean;
  /** Seconds without output before a build is killed. */
  readonly maxSilentTime?: number;
  /** Seconds a build may take in all. */
  readonly timeout?: number;
  readonly hashedMirrors?: readonly string[];
  readonly substituters?: readonly Substituter[];
  readonly events?: BuildEmitter;
  /** Cancels the realisation: running builds are killed (whole process trees), none start. */
  readonly signal?: AbortSignal;
}

export type BuildOutcome =
  | { readonly drvPath: string; readonly status: "valid"; readonly outputs: Record<string, string> }
  | { readonly drvPath: string; readonly status: "built" | "substituted"; readonly outputs: Record<string, string>; readonly checked?: { reproducible: boolean; differences: string[] } }
  | { readonly drvPath: string; readonly status: "failed"; readonly error: FerryError; readonly logPath?: string; readonly keptBuildDir?: string }
  | { readonly drvPath: string; readonly status: "dependency-failed"; readonly failedDependency: string };

const HOST_TOOL_DIRS = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"];

function outputsOf(drv: Derivation): Record<string, string> {
  return Object.fromEntries([...drv.outputs].map(([o, v]) => [o, v.path]));
}

export async function realise(store: LocalStore, targets: readonly string[], opts: RealiseOptions = {}): Promise<BuildOutcome[]> {
  const events = opts.events ?? new BuildEmitter();
  const sandbox = opts.sandbox ?? true;
  if (sandbox) requireSandbox();
  const started = Date.now();
  const drvs = new Map<string, Derivation>();
  const readDrv = (p: string) => readStoreDerivation(store, p, drvs);
  const ports = { readDerivation: readDrv, isValid: (p: string) => store.isValid(p) };
  const substitutable = new Set<string>();
  if (opts.substituters?.length && !opts.check) {
    const missing = missingOutputs(targets, ports);
    for (const s of opts.substituters) {
      const wanted = missing.filter((p) => !substitutable.has(p));
      if (wanted.length) for (const p of await s.has(wanted)) substitutable.add(p);
    }
  }
  const plan = planBuild(targets, ports, { check: opts.check ?? false, substitutable });
  // Keep what this realisation reads from being collected while it runs: the .drv files and
  // the outputs of valid derivations it builds on.
  store.addTempRoots([...new Set([...targets, ...plan.nodes.map((n) => n.drvPath), ...plan.nodes.flatMap((n) => [...n.drv.inputDrvs.keys()]), ...plan.valid.flatMap((v) => Object.values(outputsOf(readDrv(v))))])]);
  const outcomes = new Map<string, BuildOutcome>();
  for (const v of plan.valid) outcomes.set(v, { drvPath: v, status: "valid", outputs: outputsOf(readDrv(v)) });
  const toSubstitute = plan.nodes.filter((n) => n.kind === "substitute").length;
  events.emit("realise:planned", { toBuild: plan.nodes.length - toSubstitute, toSubstitute, valid: plan.valid.length });

  const jobs = Math.max(1, opts.jobs ?? 1);
  const waiting = new Map(plan.nodes.map((n) => [n.drvPath, new Set(n.waitsFor)]));
  const dependents = new Map<string, PlanNode[]>();
  for (const n of plan.nodes) for (const w of n.waitsFor) (dependents.get(w) ?? dependents.set(w, []).get(w)!).push(n);
  const ready: PlanNode[] = plan.nodes.filter((n) => n.waitsFor.length === 0);
  let running = 0;
  let remaining = plan.nodes.length;
  const checkSet = new Set(opts.check ? targets : []);

  await new Promise<void>((resolveAll) => {
    if (remaining === 0) return resolveAll();
    const finish = (node: PlanNode, outcome: BuildOutcome) => {
      outcomes.set(node.drvPath, outcome);
      remaining--;
      const ok = outcome.status === "built" || outcome.status === "substituted" || outcome.status === "valid";
      const failedFrom = outcome.status === "failed" ? node.drvPath : outcome.status === "dependency-failed" ? outcome.failedDependency : "";
      for (const d of dependents.get(node.drvPath) ?? []) {
        if (outcomes.has(d.drvPath)) continue;
        if (!ok) {
          events.emit("build:skipped", { drvPath: d.drvPath, name: d.name, reason: `dependency ${node.name} failed` });
          finish(d, { drvPath: d.drvPath, status: "dependency-failed", failedDependency: failedFrom });
          continue;
        }
        const w = waiting.get(d.drvPath)!;
        w.delete(node.drvPath);
        if (w.size === 0) ready.push(d);
      }
    };
    const pump = () => {
      while (running < jobs && ready.length) {
        const node = ready.shift()!;
        if (outcomes.has(node.drvPath)) continue;
        if (opts.signal?.aborted) {
          const error = new FerryError("FERRY_BUILD_CANCELLED", `${node.name} was not started: the build was cancelled`);
          events.emit("build:failed", { drvPath: node.drvPath, name: node.name, error: { code: error.code, message: error.message }, durationMs: 0 });
          finish(node, { drvPath: node.drvPath, status: "failed", error });
          continue;
        }
        running++;
        const work = node.kind === "substitute" ? substituteOne(store, node, opts.substituters ?? [], events) : buildOne(store, node, { ...opts, sandbox, events, check: checkSet.has(node.drvPath), readDrv });
        work
          .catch((e: unknown) => ({ drvPath: node.drvPath, status: "failed" as const, error: asFerryError(e) }))
          .then((outcome) => {
            running--;
            finish(node, outcome);
            if (remaining === 0) resolveAll();
            else pump();
          });
      }
      if (remaining === 0) resolveAll();
    };
    pump();
  });
  const list = [...targets.map((t) => outcomes.get(t)!), ...plan.nodes.filter((n) => !targets.includes(n.drvPath)).map((n) => outcomes.get(n.drvPath)!)];
  events.emit("realise:finished", {
    built: list.filter((o) => o.status === "built").length,
    substituted: list.filter((o) => o.status === "substituted").length,
    failed: list.filter((o) => o.status === "failed").length,
    skipped: list.filter((o) => o.status === "dependency-failed").length,
    durationMs: Date.now() - started,
  });
  return list;
}

/**
 * Reads and parses a .drv from the store. `memo`, when given, keeps what was read (a .drv never
 * changes): callers memoise per task, never per handle, so a long-lived coordinator or worker
 * does not keep every derivation it ever read.
 */
export function readStoreDerivation(store: LocalStore, drvPath: string, memo?: Map<string, Derivation>): Derivation {
  let d = memo?.get(drvPath);
  if (!d) {
    if (!store.isValid(drvPath)) throw new FerryError("FERRY_BUILD_NO_DRV", `derivation ${drvPath} is not in the store`, { hint: "evaluate the package set first (`ferry eval`)" });
    d = parseDerivation(fs.readFileSync(store.realPathOf(drvPath)), store.storeDir);
    memo?.set(drvPath, d);
  }
  return d;
}

/** Substitutes every output of a planned node; a substituter that fails over to the next. */
async function substituteOne(store: LocalStore, node: PlanNode, substituters: readonly Substituter[], ev: BuildEmitter): Promise<BuildOutcome> {
  const t0 = Date.now();
  ev.emit("substitute:started", { drvPath: node.drvPath, name: node.name });
  const errors: string[] = [];
  for (const out of node.drv.outputs.values()) {
    if (store.isValid(out.path)) continue;
    let ok = false;
    for (const s of substituters) {
      try {
        if (await s.substitute(out.path)) {
          ok = true;
          break;
        }
      } catch (e) {
        errors.push((e as Error).message);
      }
    }
    if (!ok) {
      const error = new FerryError("FERRY_SUBSTITUTE_FAILED", `could not substitute ${out.path}${errors.length ? `: ${errors.join("; ")}` : ""}`, {
        hint: "the substituter announced it but could not deliver it; build it with the substituter disabled",
      });
      ev.emit("build:failed", { drvPath: node.drvPath, name: node.name, error: errorBody(error), durationMs: Date.now() - t0 });
      return { drvPath: node.drvPath, status: "failed", error };
    }
  }
  ev.emit("substitute:finished", { drvPath: node.drvPath, name: node.name, durationMs: Date.now() - t0 });
  return { drvPath: node.drvPath, status: "substituted", outputs: outputsOf(node.drv) };
}

interface BuildOneOptions extends RealiseOptions {
  readonly sandbox: boolean;
  readonly events: BuildEmitter;
  readonly check: boolean;
  /** Reads a .drv (memoised for the realisation). */
  readonly readDrv: (drvPath: string) => Derivation;
}

async function buildOne(store: LocalStore, node: PlanNode, opts: BuildOneOptions): Promise<BuildOutcome> {
  const { drv, drvPath, name } = node;
  const ev = opts.events;
  const t0 = Date.now();
  const logPath = logPathOf(store.realStateDir, drvPath);
  const fail = (error: FerryError, extra: { keptBuildDir?: string; withLog?: boolean } = {}): BuildOutcome => {
    ev.emit("build:failed", {
      drvPath, name, error: errorBody(error),
      ...(extra.withLog !== false ? { logPath } : {}), durationMs: Date.now() - t0, ...(extra.keptBuildDir ? { keptBuildDir: extra.keptBuildDir } : {}),
    });
    return { drvPath, status: "failed", error, ...(extra.withLog !== false ? { logPath } : {}), ...(extra.keptBuildDir ? { keptBuildDir: extra.keptBuildDir } : {}) };
  };

  // Another derivation with the same fixed output may have produced it meanwhile.
  if (!opts.check && [...drv.outputs.values()].every((o) => store.isValid(o.path))) {
    ev.emit("build:finished", { drvPath, name, outputs: outputsOf(drv), durationMs: 0 });
    return { drvPath, status: "valid", outputs: outputsOf(drv) };
  }
  const systems = supportedSystems();
  if (drv.system !== "builtin" && !systems.includes(drv.system)) {
    return fail(new FerryError("FERRY_BUILD_WRONG_SYSTEM", `${name} is for ${drv.system}, and this machine builds for ${systems.join(", ")}`, {
      hint: drv.system === "aarch64-linux" ? "install qemu-user-static and register binfmt (aarch64 programs then run here), or build on an aarch64 machine" : "build it on a machine of that system",
    }), { withLog: false });
  }
  const hostTools = (drv.env.get("ferryHostTools") ?? "").split(" ").filter((t) => t);
  const missing = hostTools.filter((t) => !HOST_TOOL_DIRS.some((d) => fs.existsSync(join(d, t))));
  if (missing.length) {
    return fail(new FerryError("FERRY_BUILD_MISSING_HOST_TOOL", `${name} declares host tools this machine does not have: ${missing.join(", ")}`, {
      hint: "install them (e.g. apt-get install build-essential), or build on a machine that has them",
    }), { withLog: false });
  }

  // Builds without the sandbox write their outputs in place: protect those names from GC.
  // (Sandboxed outputs live in this process's build area, which GC leaves alone.)
  if (!opts.sandbox && drv.builder !== "builtin:fetchurl") store.addTempRoots([...drv.outputs.values()].map((o) => o.path));
  // Bug-for-bug with Nix: checking needs the outputs to exist already.
  if (opts.check && [...drv.outputs.values()].some((o) => !store.isValid(o.path))) {
    return fail(new FerryError("FERRY_BUILD_CHECK_NOT_BUILT", `some outputs of ${name} are not valid, so checking is not possible`, { hint: "build it first, then run --check" }), { withLog: false });
  }
  if (opts.check && !opts.sandbox) {
    return fail(new FerryError("FERRY_BUILD_CHECK_NEEDS_SANDBOX", `--check of ${name} needs the sandbox: without it the rebuild would write over the registered output`, { hint: "drop --no-sandbox" }), { withLog: false });
  }
  // The build area lives in the store dir, so finished outputs rename into place.
  const area = store.newTempPath();
  const buildDir = join(area, "build");
  const outStore = join(area, "store");
  fs.mkdirSync(buildDir, { recursive: true, mode: 0o700 });
  fs.mkdirSync(outStore, { recursive: true });
  fs.chmodSync(buildDir, 0o777);
  const log = new LogWriter(logPath);
  let keep = false;
  ev.emit("build:started", { drvPath, name, system: drv.system, logPath });
  try {
    const realOutputs = new Map<string, string>();
    for (const [o, out] of drv.outputs) {
      realOutputs.set(o, opts.sandbox || drv.builder === "builtin:fetchurl" ? join(outStore, out.path.slice(store.storeDir.length + 1)) : store.realPathOf(out.path));
    }
    if (!opts.sandbox && drv.builder !== "builtin:fetchurl") {
      if (store.loc.root) {
        throw new FerryError("FERRY_BUILD_NO_SANDBOX_ROOT", "builds without the sandbox need the store at its real place; this store has a --root prefix", { hint: "use the sandbox (drop --no-sandbox), or a store without --root" });
      }
      for (const r of realOutputs.values()) if (!store.isValid(store.storeDir + r.slice(store.realStoreDir.length))) removeTree(r);
    }

    // What the builder may see, and the candidates for its references.
    const closure = drv.builder === "builtin:fetchurl" ? [] : inputClosure(store, drv, opts.readDrv);
    if (drv.builder === "builtin:fetchurl") {
      const limits = [opts.signal, opts.timeout ? AbortSignal.timeout(opts.timeout * 1000) : undefined].filter((x): x is AbortSignal => !!x);
      await builtinFetchurl(drv, realOutputs.get("out")!, {
        hashedMirrors: opts.hashedMirrors ?? [],
        ...(limits.length ? { signal: AbortSignal.any(limits) } : {}),
        log: (l) => {
          log.write(l + "\n");
          ev.emit("build:log", { drvPath, line: l });
        },
        onProgress: (url, bytes, total) => ev.emit("fetch:progress", { drvPath, url, bytes, ...(total ? { total } : {}) }),
      });
    } else {
      await runBuilder(store, drv, { closure, buildDir, outStore, log, opts, drvPath, realOutputs });
    }

    // Collect, canonicalise, scan, check.
    const candidates = new Map<string, string>();
    for (const p of closure) candidates.set(p.slice(store.storeDir.length + 1, store.storeDir.length + 33), p);
    for (const out of drv.outputs.values()) candidates.set(out.path.slice(store.storeDir.length + 1, store.storeDir.length + 33), out.path);
    const objects: { tmpReal: string | undefined; obj: NewObject }[] = [];
    for (const [o, out] of drv.outputs) {
      const real = realOutputs.get(o)!;
      if (!pathExists(real)) {
        throw new FerryError("FERRY_BUILD_NO_OUTPUT", `the builder of ${name} finished without producing its output '${o}' (${out.path})`, { hint: `the build must create $${o}; see the log: ferry log ${drvPath}` });
      }
      canonicalise(real);
      const scanned = scanOutput(real, candidates.keys());
      const references = [...scanned.found].map((h) => candidates.get(h)!).sort();
      let ca;
      if (isFixedOutput(drv)) {
        ca = checkFixedOutput(real, out.hashAlgo, out.hash, name);
        if (references.length) {
          throw new FerryError("FERRY_BUILD_FIXED_OUTPUT_REFERENCES", `fixed-output derivation ${name} refers to store paths: ${references.join(", ")}`, { hint: "a fixed output must be self-contained; it may not mention other store paths" });
        }
      }
      objects.push({ tmpReal: opts.sandbox || drv.builder === "builtin:fetchurl" ? real : undefined, obj: { path: out.path, narHash: scanned.narHash, narSize: scanned.narSize, references, deriver: drvPath, ultimate: true, ...(ca ? { ca } : {}) } });
    }
    await log.close();
    if (opts.check) {
      const differences: string[] = [];
      let reproducible = true;
      for (const { tmpReal, obj } of objects) {
        const prev = store.queryPathInfo(obj.path);
        if (!prev) continue;
        if (Buffer.compare(Buffer.from(prev.narHash.digest), Buffer.from(obj.narHash.digest)) !== 0) {
          reproducible = false;
          const fresh = tmpReal ?? store.realPathOf(obj.path);
          for (const d of diffTrees(store.realPathOf(obj.path), fresh)) differences.push(`${obj.path}${d === "." ? "" : "/" + d}`);
        }
      }
      const checked = { reproducible, differences };
      ev.emit("build:finished", { drvPath, name, outputs: outputsOf(drv), durationMs: Date.now() - t0, checked });
      return { drvPath, status: "built", outputs: outputsOf(drv), checked };
    }
    // Contents are durable (canonicalise fsync'ed them) before the paths become valid.
    store.registerObjects(orderByReferences(objects, name));
    ev.emit("build:finished", { drvPath, name, outputs: outputsOf(drv), durationMs: Date.now() - t0 });
    return { drvPath, status: "built", outputs: outputsOf(drv) };
  } catch (e) {
    await log.close().catch(() => undefined);
    const err = asFerryError(e);
    if (opts.keepFailed) {
      keep = true;
      return fail(err, { keptBuildDir: keepBuildArea(store, area, drvPath) });
    }
    return fail(err);
  } finally {
    if (!keep) removeTree(area);
  }
}

/** Moves a failed build's area out of the store dir (where GC would collect it) into STATE/failed/. */
function keepBuildArea(store: LocalStore, area: string, drvPath: string): string {
  const dir = join(store.realStateDir, "failed");
  const dest = join(dir, `${drvPath.slice(drvPath.lastIndexOf("/") + 1, -4)}-${Date.now()}`);
  try {
    fs.mkdirSync(dir, { recursive: true });
    fs.renameSync(area, dest);
    return dest;
  } catch {
    return area; // another file system: leave it where it is
  }
}

/** Sibling outputs ordered so that each comes after the ones it references; a cycle is an error. */
function orderByReferences<T extends { obj: NewObject }>(objects: T[], name: string): T[] {
  const byPath = new Map(objects.map((o) => [o.obj.path, o]));
  const out: T[] = [];
  const state = new Map<string, 1 | 2>();
  const visit = (o: T, trail: string[]) => {
    const s = state.get(o.obj.path);
    if (s === 2) return;
    if (s === 1) {
      throw new FerryError("FERRY_BUILD_OUTPUT_CYCLE", `the outputs of ${name} refer to each other in a cycle: ${[...trail, o.obj.path].join(" -> ")}`, { hint: "one output may refer to another, but not both ways" });
    }
    state.set(o.obj.path, 1);
    for (const r of o.obj.references) {
      const dep = byPath.get(r);
      if (dep && r !== o.obj.path) visit(dep, [...trail, o.obj.path]);
    }
    state.set(o.obj.path, 2);
    out.push(o);
  };
  for (const o of objects) visit(o, []);
  return out;
}

/** Everything the builder may see: the closure of its sources and of the input outputs it uses. */
function inputClosure(store: LocalStore, drv: Derivation, readDrv: (drvPath: string) => Derivation): string[] {
  const roots: string[] = [...drv.inputSrcs];
  for (const [inDrv, outs] of drv.inputDrvs) {
    const d = readDrv(inDrv);
    for (const o of outs) roots.push(d.outputs.get(o)!.path);
  }
  return roots.length ? store.closure(roots) : [];
}

const etcDirs = new WeakMap<LocalStore, string>();

/**
 * The sandbox's /etc/passwd, /etc/group and /etc/hosts, written once per store handle (in the
 * state dir, where GC does not look) and shared read-only by every build.
 */
function sandboxEtc(store: LocalStore): string {
  let dir = etcDirs.get(store);
  if (dir) return dir;
  dir = join(store.realStateDir, "sandbox-etc");
  fs.mkdirSync(dir, { recursive: true });
  const files: Record<string, string> = {
    passwd: "root:x:0:0:Nix build user:/build:/noshell\nnixbld:x:1000:100:Nix build user:/build:/noshell\nnobody:x:65534:65534:Nobody:/:/noshell\n",
    group: "root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n",
    hosts: "127.0.0.1 localhost\n::1 localhost\n",
  };
  for (const [n, text] of Object.entries(files)) {
    const p = join(dir, n);
    if (!fs.existsSync(p) || fs.readFileSync(p, "utf8") !== text) writeFileAtomic(p, text);
  }
  etcDirs.set(store, dir);
  return dir;
}

interface RunContext {
  readonly closure: readonly string[];
  readonly buildDir: string;
  readonly outStore: string;
  readonly log: LogWriter;
  readonly opts: BuildOneOptions;
  readonly drvPath: string;
  readonly realOutputs: ReadonlyMap<string, string>;
}

/** The builder's environment (Nix's conventions), then the derivation's own variables. */
export function builderEnv(drv: Derivation, storeDir: string, buildTop: string, cores: number): Record<string, string> {
  const env: Record<string, string> = {
    PATH: "/path-not-set",
    HOME: "/homeless-shelter",
    NIX_STORE: storeDir,
    NIX_BUILD_CORES: String(cores),
    NIX_BUILD_TOP: buildTop,
    TMPDIR: buildTop,
    TEMPDIR: buildTop,
    TMP: buildTop,
    TEMP: buildTop,
    PWD: buildTop,
    TERM: "xterm-256color",
    NIX_LOG_FD: "2",
    SOURCE_DATE_EPOCH: "1",
  };
  for (const [k, v] of drv.env) env[k] = v;
  return env;
}

async function runBuilder(store: LocalStore, drv: Derivation, rc: RunContext): Promise<void> {
  const { opts, log, drvPath } = rc;
  const name = drv.env.get("name") ?? drvPath;
  const cores = opts.cores ?? 1;
  const needsHost = !drv.builder.startsWith(store.storeDir + "/") || (drv.env.get("ferryHostTools") ?? "") !== "";
  let cmd: string;
  let args: string[];
  let env: Record<string, string>;
  if (opts.sandbox) {
    const etc = sandboxEtc(store);
    cmd = bwrapPath();
    args = bwrapArgs({
      storeDir: store.storeDir,
      outputStoreReal: rc.outStore,
      inputs: rc.closure.map((p) => ({ logical: p, real: store.realPathOf(p) })),
      buildDirReal: rc.buildDir,
      hostPaths: needsHost ? HOST_TOOL_PATHS : [],
      files: ["passwd", "group", "hosts"].map((f) => ({ real: join(etc, f), at: `/etc/${f}` })),
      network: isFixedOutput(drv),
      builder: drv.builder,
      args: [...drv.args],
    });
    env = builderEnv(drv, store.storeDir, SANDBOX_BUILD_DIR, cores);
  } else {
    cmd = drv.builder;
    args = [...drv.args];
    env = builderEnv(drv, store.storeDir, rc.buildDir, cores);
  }
  await new Promise<void>((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: rc.buildDir, env, stdio: ["ignore", "pipe", "pipe"], detached: true });
    let silentTimer: NodeJS.Timeout | undefined;
    let killedFor: FerryError | undefined;
    const killTree = (why: FerryError) => {
      killedFor ??= why;
      try {
        process.kill(-child.pid!, "SIGKILL");
      } catch {
        /* already gone */
      }
    };
    const armSilent = () => {
      if (!opts.maxSilentTime) return;
      if (silentTimer) clearTimeout(silentTimer);
      silentTimer = setTimeout(() => killTree(new FerryError("FERRY_BUILD_SILENT", `${name} printed nothing for ${opts.maxSilentTime} s and was stopped`, { hint: "raise --max-silent-time if the build is just slow" })), opts.maxSilentTime * 1000);
    };
    const total = opts.timeout ? setTimeout(() => killTree(new FerryError("FERRY_BUILD_TIMEOUT", `${name} ran longer than ${opts.timeout} s and was stopped`, { hint: "raise --timeout if the build is just slow" })), opts.timeout * 1000) : undefined;
    armSilent();
    let partial = "";
    const onData = (d: Buffer) => {
      log.write(d);
      armSilent();
      partial += d.toString("utf8");
      const lines = partial.split("\n");
      partial = lines.pop()!;
      for (const line of lines) opts.events.emit("build:log", { drvPath, line });
    };
    child.stdout!.on("data", onData);
    child.stderr!.on("data", onData);
    const onSignal = () => killTree(new FerryError("FERRY_BUILD_CANCELLED", `${name} was cancelled`, { hint: "run the build again to continue; finished outputs are kept" }));
    if (opts.signal?.aborted) onSignal();
    opts.signal?.addEventListener("abort", onSignal, { once: true });
    child.on("error", (e) => reject(new FerryError("FERRY_BUILD_SPAWN", `cannot start the builder of ${name} (${cmd}): ${e.message}`, { hint: "check that the builder exists on this machine" })));
    // The builder's exit ends the build: anything it left running in its process group goes.
    child.on("exit", () => {
      try {
        process.kill(-child.pid!, "SIGKILL");
      } catch {
        /* the group is empty */
      }
    });
    child.on("close", (code, signal) => {
      if (silentTimer) clearTimeout(silentTimer);
      if (total) clearTimeout(total);
      opts.signal?.removeEventListener("abort", onSignal);
      if (partial) opts.events.emit("build:log", { drvPath, line: partial });
      if (killedFor) return reject(killedFor);
      if (code === 0) return resolve();
      reject(new FerryError("FERRY_BUILD_FAILED", `builder for ${name} failed with ${signal ? `signal ${signal}` : `exit code ${code}`}`, { hint: `see the log: ferry log ${drvPath}` }));
    });
  });
}

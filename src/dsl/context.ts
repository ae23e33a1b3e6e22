/**
 * The evaluation context: what a package set's code is evaluated against (store dir, host
 * system) and what evaluation produces besides values (the .drv texts and source objects the
 * parent process must write). Evaluation itself never writes to the store: it records a plan.
 *
 * String context: a package interpolated into a string becomes its output path. Every output
 * path and source path made during an evaluation is registered here by its hash part, so any
 * string that reaches a derivation is scanned for store paths of this evaluation and the
 * dependencies it names are recorded, the way Nix's string context does.
 */
import { FerryError } from "../core/errors.js";
import type { Hash } from "../core/hash.js";
import type { DrvHashCache } from "../core/derivation.js";

export interface EvalHostPorts {
  /** NAR hash and size of a file or tree on disk (sources are read, never written, during evaluation). */
  hashSource(absPath: string): { hash: Hash; size: number };
}

/** What a store path found in a string stands for. */
export type ContextEntry =
  | { readonly kind: "output"; readonly drvPath: string; readonly output: string }
  | { readonly kind: "source"; readonly path: string }
  | { readonly kind: "text"; readonly path: string };

/** A source object the parent must add: a file or tree on disk, and the path it must get. */
export interface PlannedSource {
  readonly storePath: string;
  readonly from: string;
  readonly name: string;
}

/** A text object (a .drv file, a generated script) the parent must write. */
export interface PlannedText {
  readonly storePath: string;
  readonly name: string;
  readonly text: string;
  readonly references: readonly string[];
}

export interface EvalSettings {
  readonly storeDir: string;
  /** The system this machine builds for natively, e.g. x86_64-linux. */
  readonly hostSystem: string;
  /** Directory relative source paths are resolved against (the package set's). */
  readonly baseDir: string;
}

/** Where the plan goes as it is made (the worker streams it to the parent). */
export interface EvalSinks {
  onSource(s: PlannedSource): void;
  onText(t: PlannedText): void;
}

export class EvalContext {
  readonly settings: EvalSettings;
  readonly ports: EvalHostPorts;
  readonly #byHash = new Map<string, ContextEntry>();
  readonly #sinks: EvalSinks;
  readonly #planned = new Set<string>();
  readonly #sourceCache = new Map<string, string>();
  /** Memo of hashDerivationModulo results by .drv path, shared by every derivation. */
  readonly drvCache: DrvHashCache = new Map();

  constructor(settings: EvalSettings, ports: EvalHostPorts, sinks: EvalSinks) {
    this.settings = settings;
    this.ports = ports;
    this.#sinks = sinks;
  }

  get storeDir(): string {
    return this.settings.storeDir;
  }

  /** Records what a store path stands for; the first record of a path stays. */
  register(path: string, entry: ContextEntry): void {
    const h = path.slice(this.storeDir.length + 1, this.storeDir.length + 33);
    if (!this.#byHash.has(h)) this.#byHash.set(h, entry);
  }

  /**
   * The context of a string: every store path of this evaluation it mentions. Paths of other
   * evaluations or typed by hand are not dependencies (and a build will not see them).
   */
  contextOf(s: string): ContextEntry[] {
    const out: ContextEntry[] = [];
    const prefix = this.storeDir + "/";
    let i = s.indexOf(prefix);
    while (i >= 0) {
      const e = this.#byHash.get(s.slice(i + prefix.length, i + prefix.length + 32));
      if (e) out.push(e);
      i = s.indexOf(prefix, i + prefix.length);
    }
    return out;
  }

  addPlannedSource(src: PlannedSource): void {
    this.register(src.storePath, { kind: "source", path: src.storePath });
    if (this.#planned.has(src.storePath)) return;
    this.#planned.add(src.storePath);
    this.#sinks.onSource(src);
  }

  /** Plans a text object; `asContext` makes strings that mention it depend on it (not for .drv files). */
  addPlannedText(t: PlannedText, asContext = false): void {
    if (asContext) this.register(t.storePath, { kind: "text", path: t.storePath });
    if (this.#planned.has(t.storePath)) return;
    this.#planned.add(t.storePath);
    this.#sinks.onText(t);
  }

  cachedSource(abs: string): string | undefined {
    return this.#sourceCache.get(abs);
  }

  cacheSource(abs: string, storePath: string): void {
    this.#sourceCache.set(abs, storePath);
  }
}

let current: EvalContext | undefined;

/** The context package code is being evaluated in. */
export function evalContext(): EvalContext {
  if (!current) {
    throw new FerryError("FERRY_EVAL_NO_CONTEXT", "Ferry packages can only be created while `ferry eval` evaluates a package set", {
      hint: "run the file with `ferry eval FILE` (or `ferry build FILE#ATTR`) instead of importing it directly",
    });
  }
  return current;
}

export function setEvalContext(ctx: EvalContext | undefined): void {
  current = ctx;
}

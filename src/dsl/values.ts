/**
 * The values package code handles: packages (derivations), their outputs, and source paths.
 * All are frozen; their store paths are computed, never typed by hand. Converting one to a
 * string (template literals included) gives its store path, and the evaluation context sees
 * that path in whatever string it lands in, which records the dependency.
 */

/** What every store value shares: its string form (in templates, JSON, concatenation) is its path. */
abstract class StoreValue {
  /** The store path this value stands for. */
  protected abstract get storePath(): string;

  toString(): string {
    return this.storePath;
  }

  [Symbol.toPrimitive](): string {
    return this.storePath;
  }

  toJSON(): string {
    return this.storePath;
  }
}

/** One output of a package: `${pkg.dev}` is the path of its `dev` output. */
export class OutputRef extends StoreValue {
  readonly drvPath: string;
  readonly output: string;
  readonly path: string;

  constructor(drvPath: string, output: string, path: string) {
    super();
    this.drvPath = drvPath;
    this.output = output;
    this.path = path;
    Object.freeze(this);
  }

  protected get storePath(): string {
    return this.path;
  }
}

/** A derivation made by `derivation`, `mkPackage`, `fetchurl` and friends. */
export class Package extends StoreValue {
  readonly name: string;
  readonly system: string;
  readonly drvPath: string;
  /** Output names in declaration order; the first is the default. */
  readonly outputNames: readonly string[];
  readonly outputs: Readonly<Record<string, OutputRef>>;
  /** Path of the default output. */
  readonly outPath: string;
  /** Extra facts for tools (pname, version, host tools, meta); never part of the identity. */
  readonly meta: Readonly<Record<string, unknown>>;

  constructor(p: { name: string; system: string; drvPath: string; outputs: readonly [string, string][]; meta?: Record<string, unknown> }) {
    super();
    this.name = p.name;
    this.system = p.system;
    this.drvPath = p.drvPath;
    this.outputNames = Object.freeze(p.outputs.map(([n]) => n));
    const outs: Record<string, OutputRef> = {};
    for (const [n, path] of p.outputs) outs[n] = new OutputRef(p.drvPath, n, path);
    this.outputs = Object.freeze(outs);
    this.outPath = outs[this.outputNames[0]!]!.path;
    this.meta = Object.freeze({ ...(p.meta ?? {}) });
    Object.freeze(this);
  }

  /** The output called `name` (throws if there is none). */
  output(name: string): OutputRef {
    const o = this.outputs[name];
    if (!o) throw new Error(`${this.name} has no output '${name}' (it has ${this.outputNames.join(", ")})`);
    return o;
  }

  get out(): OutputRef {
    return this.outputs[this.outputNames[0]!]!;
  }

  protected get storePath(): string {
    return this.outPath;
  }
}

/** A file or directory from the package set's sources, copied into the store when used. */
export class SourcePath extends StoreValue {
  readonly path: string;
  readonly from: string;

  constructor(path: string, from: string) {
    super();
    this.path = path;
    this.from = from;
    Object.freeze(this);
  }

  protected get storePath(): string {
    return this.path;
  }
}

export function isPackage(v: unknown): v is Package {
  return v instanceof Package;
}

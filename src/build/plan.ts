/**
 * The build plan, a value: which derivations of a request are built, which are substituted
 * from a cache, in what dependency order, and which are valid already. Computed from the .drv
 * files and one batched question to the substituters, before anything runs.
 */
import type { Derivation } from "../core/derivation.js";

export interface PlanNode {
  readonly drvPath: string;
  readonly drv: Derivation;
  readonly name: string;
  /** "substitute": every output comes from a substituter, so its inputs are not needed. */
  readonly kind: "build" | "substitute";
  /** Planned derivations that must finish first (a subset of inputDrvs). */
  readonly waitsFor: readonly string[];
}

export interface BuildPlan {
  /** Derivations to build or substitute, every one after those it waits for. */
  readonly nodes: readonly PlanNode[];
  /** Requested derivations whose outputs are all valid already. */
  readonly valid: readonly string[];
}

export interface PlanPorts {
  readDerivation(drvPath: string): Derivation;
  isValid(path: string): boolean;
}

export interface PlanOptions {
  /** Rebuild the targets themselves even when valid (their inputs are not). */
  readonly check?: boolean;
  /** Output paths some substituter has. */
  readonly substitutable?: ReadonlySet<string>;
}

/** Every output path of the request's derivations (and their inputs) that is not valid. */
export function missingOutputs(targets: readonly string[], ports: PlanPorts): string[] {
  const seen = new Set<string>();
  const missing: string[] = [];
  const stack = [...targets];
  while (stack.length) {
    const p = stack.pop()!;
    if (seen.has(p)) continue;
    seen.add(p);
    const drv = ports.readDerivation(p);
    const outs = [...drv.outputs.values()].map((o) => o.path);
    const absent = outs.filter((o) => !ports.isValid(o));
    missing.push(...absent);
    if (absent.length) stack.push(...drv.inputDrvs.keys());
  }
  return missing;
}

export function planBuild(targets: readonly string[], ports: PlanPorts, opts: PlanOptions = {}): BuildPlan {
  const drvs = new Map<string, Derivation>();
  const kind = new Map<string, "valid" | "build" | "substitute">();
  const order: string[] = [];
  const targetSet = new Set(targets);
  const subst = opts.substitutable ?? new Set<string>();
  const read = (p: string) => {
    let d = drvs.get(p);
    if (!d) drvs.set(p, (d = ports.readDerivation(p)));
    return d;
  };
  const classify = (p: string): "valid" | "build" | "substitute" => {
    const outs = [...read(p).outputs.values()].map((o) => o.path);
    const checking = opts.check === true && targetSet.has(p);
    if (!checking && outs.every((o) => o !== "" && ports.isValid(o))) return "valid";
    if (!checking && outs.every((o) => ports.isValid(o) || subst.has(o))) return "substitute";
    return "build";
  };
  // Iterative post-order walk: the inputs of a derivation that is built are visited before it;
  // those of a valid or substituted one are not needed at all.
  const stack: { path: string; expanded: boolean }[] = [...targets].reverse().map((path) => ({ path, expanded: false }));
  while (stack.length) {
    const top = stack.pop()!;
    if (kind.has(top.path)) continue;
    if (!top.expanded) {
      const k = classify(top.path);
      if (k !== "build") {
        kind.set(top.path, k);
        order.push(top.path);
        continue;
      }
      stack.push({ path: top.path, expanded: true });
      for (const input of read(top.path).inputDrvs.keys()) if (!kind.has(input)) stack.push({ path: input, expanded: false });
      continue;
    }
    kind.set(top.path, "build");
    order.push(top.path);
  }
  const nodes: PlanNode[] = [];
  for (const p of order) {
    const k = kind.get(p)!;
    if (k === "valid") continue;
    const drv = drvs.get(p)!;
    nodes.push(Object.freeze({
      drvPath: p,
      drv,
      name: drv.env.get("name") ?? p,
      kind: k,
      waitsFor: Object.freeze(k === "build" ? [...drv.inputDrvs.keys()].filter((i) => kind.get(i) === "build" || kind.get(i) === "substitute") : []),
    }));
  }
  return Object.freeze({ nodes: Object.freeze(nodes), valid: Object.freeze(targets.filter((t) => kind.get(t) === "valid")) });
}

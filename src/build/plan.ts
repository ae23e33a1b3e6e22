/**
 * The build plan, a value: which derivations of a request need building, in what dependency
 * order, and which are already valid. Computed from the .drv files alone, before anything runs.
 */
import type { Derivation } from "../core/derivation.js";

export interface PlanNode {
  readonly drvPath: string;
  readonly drv: Derivation;
  readonly name: string;
  /** Input derivations that need building first (a subset of inputDrvs). */
  readonly waitsFor: readonly string[];
}

export interface BuildPlan {
  /** Derivations to build, every one after those it waits for. */
  readonly nodes: readonly PlanNode[];
  /** Requested derivations whose outputs are all valid already. */
  readonly valid: readonly string[];
}

export interface PlanPorts {
  readDerivation(drvPath: string): Derivation;
  isValid(path: string): boolean;
}

/**
 * Plans the realisation of `targets`. With `check`, the targets themselves are rebuilt even when
 * valid (their inputs are not).
 */
export function planBuild(targets: readonly string[], ports: PlanPorts, opts: { check?: boolean } = {}): BuildPlan {
  const drvs = new Map<string, Derivation>();
  const needed = new Map<string, boolean>();
  const order: string[] = [];
  const targetSet = new Set(targets);
  // Iterative post-order walk: inputs are visited before the derivations that use them.
  const stack: { path: string; expanded: boolean }[] = [...targets].reverse().map((path) => ({ path, expanded: false }));
  while (stack.length) {
    const top = stack.pop()!;
    if (needed.has(top.path)) continue;
    let drv = drvs.get(top.path);
    if (!drv) drvs.set(top.path, (drv = ports.readDerivation(top.path)));
    if (!top.expanded) {
      stack.push({ path: top.path, expanded: true });
      for (const input of drv.inputDrvs.keys()) if (!needed.has(input)) stack.push({ path: input, expanded: false });
      continue;
    }
    const outputsValid = [...drv.outputs.values()].every((o) => o.path !== "" && ports.isValid(o.path));
    needed.set(top.path, !outputsValid || (opts.check === true && targetSet.has(top.path)));
    order.push(top.path);
  }
  const nodes: PlanNode[] = [];
  for (const p of order) {
    if (!needed.get(p)) continue;
    const drv = drvs.get(p)!;
    nodes.push(Object.freeze({
      drvPath: p,
      drv,
      name: drv.env.get("name") ?? p,
      waitsFor: Object.freeze([...drv.inputDrvs.keys()].filter((i) => needed.get(i))),
    }));
  }
  return Object.freeze({ nodes: Object.freeze(nodes), valid: Object.freeze(targets.filter((t) => !needed.get(t))) });
}

/** From a derivation's attributes to its final .drv: paths computed, text planned for the store. */
import { finalizeDerivation, makeDerivation } from "../core/derivation.js";
import type { Hash } from "../core/hash.js";
import type { EvalContext } from "./context.js";

export interface DrvDraft {
  readonly name: string;
  readonly system: string;
  readonly builder: string;
  readonly args: readonly string[];
  readonly env: ReadonlyMap<string, string>;
  readonly outputNames: readonly string[];
  readonly inputDrvs: ReadonlyMap<string, ReadonlySet<string>>;
  readonly inputSrcs: ReadonlySet<string>;
  readonly fixed: { readonly method: "flat" | "recursive"; readonly hash: Hash; readonly hashAlgo: string; readonly hashHex: string } | undefined;
}

export interface Finalized {
  readonly drvPath: string;
  /** Output name -> path, in the order the outputs were declared. */
  readonly outputs: readonly [string, string][];
}

export function finalizeDraft(ctx: EvalContext, d: DrvDraft): Finalized {
  const draft = makeDerivation({
    outputs: new Map(d.outputNames.map((o) => [o, d.fixed ? { hashAlgo: d.fixed.hashAlgo, hash: d.fixed.hashHex } : {}])),
    inputDrvs: new Map([...d.inputDrvs].map(([p, outs]) => [p, [...outs]])),
    inputSrcs: [...d.inputSrcs],
    system: d.system,
    builder: d.builder,
    args: d.args,
    env: d.env,
  });
  const f = finalizeDerivation(draft, ctx.storeDir, (p) => {
    throw new Error(`input derivation ${p} was not made in this evaluation`);
  }, { name: d.name, cache: ctx.drvCache });
  ctx.addPlannedText({
    storePath: f.drvPath,
    name: `${d.name}.drv`,
    text: f.text,
    references: [...d.inputSrcs, ...d.inputDrvs.keys()].sort(),
  });
  return { drvPath: f.drvPath, outputs: d.outputNames.map((o) => [o, f.outputPaths.get(o)!]) };
}

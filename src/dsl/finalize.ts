/** From a derivation's attributes to its final .drv: paths computed, text planned for the store. */
import { finalizeDerivation, type DerivationOutput } from "../core/derivation.js";
import type { Hash } from "../core/hash.js";
import type { EvalContext } from "./context.js";

export interface DrvDraft {
  readonly name: string;
  readonly system: string;
  readonly builder: string;
  readonly args: readonly string[];
  readonly env: ReadonlyMap<string, string>;
  readonly outputNames: readonly string[];
  /** Input .drv path → the names of the outputs used, without repeats. */
  readonly inputDrvs: ReadonlyMap<string, readonly string[]>;
  /** Without repeats. */
  readonly inputSrcs: readonly string[];
  readonly fixed: { readonly method: "flat" | "recursive"; readonly hash: Hash; readonly hashAlgo: string; readonly hashHex: string } | undefined;
}

export interface Finalized {
  readonly drvPath: string;
  /** Output name -> path, in the order the outputs were declared. */
  readonly outputs: readonly [string, string][];
}

const INPUT_ADDRESSED: DerivationOutput = Object.freeze({ path: "", hashAlgo: "", hash: "" });

function inputNotMade(p: string): never {
  throw new Error(`input derivation ${p} was not made in this evaluation`);
}

export function finalizeDraft(ctx: EvalContext, d: DrvDraft): Finalized {
  const output = d.fixed ? Object.freeze({ path: "", hashAlgo: d.fixed.hashAlgo, hash: d.fixed.hashHex }) : INPUT_ADDRESSED;
  const outputs = new Map<string, DerivationOutput>();
  for (const o of d.outputNames) outputs.set(o, output);
  // finalizeDerivation sorts what needs sorting; nothing changes these maps afterwards
  const draft = { outputs, inputDrvs: d.inputDrvs, inputSrcs: d.inputSrcs, system: d.system, builder: d.builder, args: d.args, env: d.env };
  const f = finalizeDerivation(draft, ctx.storeDir, inputNotMade, { name: d.name, cache: ctx.drvCache });
  ctx.addPlannedText({ storePath: f.drvPath, name: `${d.name}.drv`, text: f.text, references: f.references });
  return { drvPath: f.drvPath, outputs: d.outputNames.map((o) => [o, f.outputPaths.get(o)!]) };
}

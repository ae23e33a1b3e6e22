/** `ferry eval` and `ferry derivation show|add`: package sets to .drv files, and .drv files themselves. */
import { Command } from "commander";
import * as fs from "node:fs";
import { basename } from "node:path";
import { FerryError } from "../../core/errors.js";
import { checkDerivationOutputs, derivationToJson, parseDerivation, printDerivation, referencesOf, type Derivation } from "../../core/derivation.js";
import { evaluate, type EvalJob, type EvalProgress, type EvalStorePort } from "../../dsl/evaluate.js";
import { LocalStore } from "../../store/local-store.js";
import { StoreWriterThread } from "../../store/writer-thread.js";
import { openStore, storeLocation, withStore, withStoreOptions, type StoreFlags } from "../store-options.js";
import { out, outJson, outLines, progressLine } from "../output.js";

export { storePort } from "../../store/writer-thread.js";

export interface EvalFlags extends StoreFlags {
  attr?: string;
  json?: boolean;
  evalTimeout?: number;
  evalMemory?: number;
  dryRun?: boolean;
}

export function withEvalOptions(cmd: Command): Command {
  return cmd
    .option("--eval-timeout <seconds>", "stop evaluating after this long", (v) => Number(v), 600)
    .option("--eval-memory <MiB>", "heap limit of the evaluator", (v) => Number(v), 4096);
}

export async function evaluateToStore(file: string, attr: string | undefined, f: EvalFlags, onJob?: (j: EvalJob) => void): Promise<EvalJob[]> {
  const loc = storeLocation(f);
  // On a terminal, a line says how far a long evaluation is.
  const progress = progressLine();
  const onProgress = (p: EvalProgress) => progress.update(evalProgressText(basename(file), p), p.writing);
  const run = (port?: EvalStorePort) =>
    evaluate({
      file, attr, storeDir: loc.storeDir, timeoutSeconds: f.evalTimeout, memoryMiB: f.evalMemory,
      // On a terminal the package set's own output goes above the progress line, not through it.
      ...(progress.active ? { onProgress, onOutput: (c: Buffer) => progress.print(c) } : {}), ...(port ? { store: port } : {}), ...(onJob ? { onJob } : {}),
    });
  try {
    if (f.dryRun) return (await run()).jobs;
    // Opening the store here first creates it and reports an unusable one before evaluating.
    openStore(f).close();
    // The .drv files reach the disk after the evaluation, as the kernel writes them back: a
    // machine that stops before then loses them, and the store unregisters them when it is
    // next opened (`ferry eval` makes them again).
    return (await run(new StoreWriterThread(loc, { deferSync: true }))).jobs;
  } finally {
    progress.done();
  }
}

/** The progress line of an evaluation of `name`. */
export function evalProgressText(name: string, p: EvalProgress): string {
  const n = (x: number) => x.toLocaleString("en-US");
  if (p.writing) return `${name}: evaluated; writing the last of ${n(p.derivations)} .drv files to the store`;
  return `${name}: evaluating, ${n(p.derivations)} derivations${p.sources ? `, ${n(p.sources)} sources` : ""}${p.jobs ? `, ${n(p.jobs)} jobs` : ""}`;
}

/** Reads a .drv from the store (the file, under the store's root). */
export function readDerivation(s: LocalStore, drvPath: string): Derivation {
  const p = s.parsePath(drvPath);
  if (!p.endsWith(".drv")) throw new FerryError("FERRY_DRV_NOT_DRV", `'${drvPath}' is not a .drv path`, { hint: "give the path `ferry eval` printed for the derivation" });
  let text: string;
  try {
    text = fs.readFileSync(s.realPathOf(p), "utf8");
  } catch {
    throw new FerryError("FERRY_STORE_NOT_VALID", `'${drvPath}' is not in this store`, { hint: "evaluate the package set first (`ferry eval`)" });
  }
  return parseDerivation(text, s.storeDir);
}

export function evalCommand(): Command {
  return withEvalOptions(withStoreOptions(new Command("eval")))
    .description("evaluate a package set (a .ts/.js module) in a sandboxed subprocess, write its .drv files, print derivations and outputs")
    .argument("<file>")
    .option("-A, --attr <attr>", "only this attribute (dotted path, e.g. tools.hello)")
    .option("--json", "print one JSON object per job")
    .option("--dry-run", "evaluate and print, write nothing to the store")
    .action(async (file: string, f: EvalFlags) => {
      const jobs = await evaluateToStore(file, f.attr, f);
      if (f.json) outJson(jobs.map((j) => ({ attr: j.attr, name: j.name, system: j.system, drvPath: j.drvPath, outputs: j.outputs })));
      else outLines(jobs.map((j) => `${j.attr}\t${j.drvPath}\t${Object.values(j.outputs).join(" ")}`));
    });
}

export function derivationCommand(): Command {
  const cmd = new Command("derivation").description("inspect and add .drv files (Nix's derivation format)");
  cmd.addCommand(
    withStoreOptions(new Command("show"))
      .description("show a derivation from the store")
      .argument("<drv-path>")
      .option("--json", "print JSON like `nix show-derivation`")
      .action(async (drvPath: string, f: StoreFlags & { json?: boolean }) => {
        await withStore(f, (s) => {
          const drv = readDerivation(s, drvPath);
          if (f.json) outJson({ [s.parsePath(drvPath)]: derivationToJson(drv) });
          else {
            out(`derivation ${drvPath}`);
            out(`  system:  ${drv.system}`);
            out(`  builder: ${drv.builder} ${drv.args.map((a) => JSON.stringify(a)).join(" ")}`);
            for (const [o, v] of drv.outputs) out(`  output ${o}: ${v.path}${v.hash ? ` (fixed ${v.hashAlgo}:${v.hash})` : ""}`);
            for (const [d, outs] of drv.inputDrvs) out(`  input ${d} [${outs.join(", ")}]`);
            for (const p of drv.inputSrcs) out(`  source ${p}`);
          }
        });
      }),
  );
  cmd.addCommand(
    withStoreOptions(new Command("add"))
      .description("add a .drv (ATerm) read from standard input; its inputs must be in the store; prints its path")
      .action(async (f: StoreFlags) => {
        const chunks: Buffer[] = [];
        for await (const c of process.stdin) chunks.push(c as Buffer);
        await withStore(f, (s) => {
          const drv = parseDerivation(Buffer.concat(chunks), s.storeDir);
          for (const p of [...drv.inputSrcs, ...drv.inputDrvs.keys()]) {
            if (!s.isValid(p)) throw new FerryError("FERRY_DRV_MISSING_INPUT", `the derivation's input '${p}' is not in the store`, { hint: "add its inputs first (sources and input .drv files)" });
          }
          const name = drv.env.get("name");
          if (!name) throw new FerryError("FERRY_DRV_NO_NAME", "the derivation has no 'name' in its environment", { hint: "every derivation names itself in env.name" });
          checkDerivationOutputs(drv, s.storeDir, (p) => readDerivation(s, p), { name });
          const [r] = s.addTexts([{ name: `${name}.drv`, text: printDerivation(drv), references: referencesOf(drv) }]);
          out(r!.path);
        });
      }),
  );
  return cmd;
}

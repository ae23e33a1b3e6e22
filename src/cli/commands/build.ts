/** `ferry build` and `ferry log`. */
import { Command } from "commander";
import { FerryError } from "../../core/errors.js";
import { BuildEmitter } from "../../build/events.js";
import { realise, readStoreDerivation } from "../../build/realise.js";
import { readLog } from "../../build/logs.js";
import { withStore, withStoreOptions, type StoreFlags } from "../store-options.js";
import { evaluateToStore, withEvalOptions, type EvalFlags } from "./eval.js";
import { attachProgress, BuildHistory } from "../progress.js";
import { note, out } from "../output.js";
import { resolveSubstitutionSettings } from "../../cache/settings.js";
import { CacheSubstituter } from "../../cache/substituter.js";

interface BuildFlags extends EvalFlags {
  maxJobs: number;
  cores: number;
  sandbox: boolean;
  keepFailed?: boolean;
  check?: boolean;
  maxSilentTime?: number;
  timeout?: number;
  hashedMirror: string[];
  substituters?: string;
  trustedPublicKeys?: string;
  requireSigs: boolean;
}

/** Installables: `FILE#ATTR` (evaluated first), `FILE` (every package in it) or a `.drv` path. */
async function resolveInstallables(items: string[], f: BuildFlags): Promise<string[]> {
  const drvs: string[] = [];
  for (const it of items) {
    if (it.endsWith(".drv")) {
      drvs.push(it);
      continue;
    }
    const hash = it.lastIndexOf("#");
    const [file, attr] = hash >= 0 ? [it.slice(0, hash), it.slice(hash + 1)] : [it, undefined];
    const jobs = await evaluateToStore(file, attr, { ...f, dryRun: false });
    if (jobs.length === 0) throw new FerryError("FERRY_BUILD_NOTHING", `${it} has no packages to build`, { hint: "export packages from the module, or name one with FILE#ATTR" });
    drvs.push(...jobs.map((j) => j.drvPath));
  }
  return drvs;
}

export function buildCommand(): Command {
  return withEvalOptions(withStoreOptions(new Command("build")))
    .description("build packages (FILE#ATTR, FILE, or .drv paths) in the sandbox; prints output paths")
    .argument("<installables...>")
    .option("-j, --max-jobs <n>", "builds to run at once", (v) => Number(v), 1)
    .option("--cores <n>", "CPU cores each build may use (NIX_BUILD_CORES)", (v) => Number(v), 1)
    .option("--no-sandbox", "run builders without isolation (only for builders you trust)")
    .option("--keep-failed", "keep the build directory of a failed build")
    .option("--check", "rebuild and report whether the result is bit-for-bit the same")
    .option("--max-silent-time <s>", "stop a build that prints nothing for this long", (v) => Number(v))
    .option("--timeout <s>", "stop a build that runs longer than this", (v) => Number(v))
    .option("--hashed-mirror <url>", "content-addressed mirror for fetchurl (files at URL/sha256/<hex>); repeatable", (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option("--substituters <urls>", "binary caches to substitute from, space-separated ('' for none; default: config, $FERRY_SUBSTITUTERS)")
    .option("--trusted-public-keys <keys>", "keys whose signatures on substitutes are trusted (default: config, $FERRY_TRUSTED_PUBLIC_KEYS)")
    .option("--no-require-sigs", "accept substitutes without a trusted signature")
    .option("--json", "print build events as JSON lines on stdout")
    .action(async (items: string[], f: BuildFlags) => {
      const drvs = await resolveInstallables(items, f);
      await withStore(f, async (s) => {
        const events = new BuildEmitter();
        const mode = f.json ? "json" : process.stderr.isTTY ? "tty" : "plain";
        const progress = attachProgress(events, mode, new BuildHistory(s.realStateDir));
        const settings = resolveSubstitutionSettings({ substituters: f.substituters, trustedPublicKeys: f.trustedPublicKeys, requireSigs: f.requireSigs === false ? false : undefined });
        const substituter = settings.substituters.length ? await CacheSubstituter.open(s, settings, { token: process.env.FERRY_TOKEN, onWarning: (m) => note(`warning: ${m}`) }) : undefined;
        let outcomes;
        // Ctrl-C (or SIGTERM) cancels: builders are killed with their whole process trees.
        const cancel = new AbortController();
        const onSignal = () => cancel.abort();
        process.on("SIGINT", onSignal);
        process.on("SIGTERM", onSignal);
        try {
          outcomes = await realise(s, drvs, {
            jobs: f.maxJobs, cores: f.cores, sandbox: f.sandbox, keepFailed: !!f.keepFailed, check: !!f.check,
            ...(f.maxSilentTime ? { maxSilentTime: f.maxSilentTime } : {}), ...(f.timeout ? { timeout: f.timeout } : {}),
            hashedMirrors: [...f.hashedMirror, ...(process.env.FERRY_HASHED_MIRRORS ?? "").split(" ").filter((x) => x)],
            events,
            signal: cancel.signal,
            ...(substituter ? { substituters: [substituter] } : {}),
          });
        } finally {
          await substituter?.close();
          process.removeListener("SIGINT", onSignal);
          process.removeListener("SIGTERM", onSignal);
          progress.stop();
        }
        const mine = outcomes.filter((o) => drvs.includes(o.drvPath));
        // With --json, stdout is JSON lines: the events, then one line with every outcome.
        if (f.json) out(JSON.stringify({ results: outcomes.map((o) => ("error" in o ? { ...o, error: { code: o.error.code, message: o.error.message, hint: o.error.hint } } : o)) }));
        else for (const p of new Set(mine.flatMap((o) => ("outputs" in o ? Object.values(o.outputs) : [])))) out(p);
        const bad = outcomes.filter((o) => o.status === "failed" || o.status === "dependency-failed");
        const irreproducible = outcomes.some((o) => "checked" in o && o.checked && !o.checked.reproducible);
        if (cancel.signal.aborted) process.exitCode = 130;
        else if (bad.length || irreproducible) process.exitCode = 1;
      });
    });
}

export function logCommand(): Command {
  return withStoreOptions(new Command("log"))
    .description("print the build log of a derivation or of the output it built")
    .argument("<path>")
    .action(async (path: string, f: StoreFlags) => {
      await withStore(f, (s) => {
        let drv = path;
        if (!path.endsWith(".drv")) {
          const info = s.requirePathInfo(path);
          if (!info.deriver) throw new FerryError("FERRY_LOG_NONE", `${path} was not built here (no deriver is recorded)`);
          drv = info.deriver;
        }
        readStoreDerivation(s, s.parsePath(drv));
        process.stdout.write(readLog(s.realStateDir, s.parsePath(drv)));
      });
    });
}

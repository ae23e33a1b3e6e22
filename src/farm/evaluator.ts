/**
 * Evaluating a jobset: check out its branch (any URL git understands, local paths included;
 * checkouts are kept in `<dataDir>/checkouts`),
 * skip when the inputs did not change, run `ferry eval`'s evaluator (a sandboxed subprocess with
 * time and memory limits) into the coordinator's store, plan which derivations need building
 * (plan-steps), and ingest the evaluation. A failed checkout or evaluation is kept, with its error, for display.
 * Either way an `evaluation:finished` event is written with it.
 *
 * Aggregate jobs (`aggregate()` in the package set) carry their constituents' derivations in
 * their meta; the constituents that are jobs of the same evaluation become the build's members.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { sql, type Kysely } from "kysely";
import { FerryError, asFerryError } from "../core/errors.js";
import { LocalStore } from "../store/local-store.js";
import { evaluate, type EvalJob as DslJob } from "../dsl/evaluate.js";
import { aggregateConstituents } from "../dsl/aggregate.js";
import { StoreWriterThread } from "../store/writer-thread.js";
import { planStepsOffThread } from "./plan-steps.js";
import type { FarmSchema } from "./db/index.js";
import { ingestEvaluation, recordFailedEvaluation, type EvalJob, type IngestResult } from "./db/ingest.js";

const run = promisify(execFile);

export interface JobsetSpec {
  readonly id: number;
  readonly repo: string;
  readonly branch: string;
  readonly file: string;
  readonly attr?: string | null;
  readonly lastInputsHash?: string | null;
}

export interface EvaluatorContext {
  readonly db: Kysely<FarmSchema>;
  readonly store: LocalStore;
  /** Checkouts live under `<dataDir>/checkouts/<jobset id>-<repository hash>`. */
  readonly dataDir: string;
  readonly timeoutSeconds?: number;
  readonly memoryMiB?: number;
  /** Makes the derivations of the steps available to workers (the farm cache), before they are queued. */
  readonly publish?: (drvPaths: readonly string[]) => Promise<void>;
}

export type EvaluationOutcome =
  | { readonly kind: "unchanged"; readonly inputsHash: string; readonly revision: string }
  | { readonly kind: "evaluated"; readonly inputsHash: string; readonly revision: string; readonly result: IngestResult }
  | { readonly kind: "failed"; readonly evaluationId: string; readonly error: FerryError };

/** An error as the farm stores it for display (jobsets', evaluations' and projects' errors). */
export const errorText = (e: FerryError): string => `${e.code}: ${e.message}${e.hint ? `\nhint: ${e.hint}` : ""}`;

async function git(args: string[], cwd?: string): Promise<string> {
  try {
    const { stdout } = await run("git", args, { cwd, maxBuffer: 16 << 20, env: { ...process.env, GIT_TERMINAL_PROMPT: "0" } });
    return stdout.trim();
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    throw new FerryError("FERRY_FARM_CHECKOUT_FAILED", `git ${args[0]} failed: ${(err.stderr ?? err.message).trim()}`, {
      hint: "check the jobset's repository URL and branch, and that this machine can reach it",
    });
  }
}

/** Brings a checkout in `dir` to the head of `branch` of `repo`; returns the revision. */
export async function checkout(dir: string, repo: string, branch: string): Promise<string> {
  if (!fs.existsSync(join(dir, ".git"))) {
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(dir, { recursive: true });
    await git(["clone", "--quiet", "--branch", branch, "--single-branch", repo, dir]);
  } else {
    await git(["fetch", "--quiet", "origin", branch], dir);
    await git(["checkout", "--quiet", "--force", "FETCH_HEAD"], dir);
  }
  return git(["rev-parse", "HEAD"], dir);
}

/** The evaluator's jobs as the farm stores them: aggregates name their member jobs. */
export function farmJobs(jobs: readonly DslJob[]): EvalJob[] {
  // The jobs by derivation, made only when an aggregate asks (most jobsets have none).
  let byDrv: Map<string, string[]> | undefined;
  const jobsOf = (drvPath: string): string[] => {
    if (!byDrv) {
      byDrv = new Map();
      for (const j of jobs) {
        const attrs = byDrv.get(j.drvPath);
        if (attrs) attrs.push(j.attr);
        else byDrv.set(j.drvPath, [j.attr]);
      }
    }
    return byDrv.get(drvPath) ?? [];
  };
  return jobs.map((j) => {
    const constituents = aggregateConstituents(j.meta);
    const members = constituents?.flatMap(jobsOf).filter((m) => m !== j.attr);
    return { job: j.attr, drvPath: j.drvPath, system: j.system, outputs: j.outputs, ...(members?.length ? { members } : {}) };
  });
}

export async function evaluateJobset(ctx: EvaluatorContext, js: JobsetSpec): Promise<EvaluationOutcome> {
  // One checkout per jobset and repository: a jobset moved to another URL starts afresh.
  const dir = join(ctx.dataDir, "checkouts", `${js.id}-${createHash("sha256").update(js.repo).digest("hex").slice(0, 12)}`);
  let revision = "";
  let inputsHash = "";
  const t0 = Date.now();
  try {
    revision = await checkout(dir, js.repo, js.branch);
    inputsHash = createHash("sha256").update(JSON.stringify({ repo: js.repo, branch: js.branch, file: js.file, attr: js.attr ?? null, revision })).digest("hex");
    if (inputsHash === js.lastInputsHash) {
      await sql`update jobsets set last_checked_at = now() where id = ${js.id}`.execute(ctx.db);
      return { kind: "unchanged", inputsHash, revision };
    }
    // The .drv files are written and the steps planned on threads of their own: the
    // coordinator's event loop keeps serving workers and the API through a large evaluation.
    // The jobs' .drv files (and so their closures) are rooted, before the writer lets go of its
    // own roots, by a handle of this evaluation's own: they are needed until they are planned
    // and published (workers fetch them from the farm cache), and are anyone's to collect after.
    const roots = LocalStore.open(ctx.store.loc);
    try {
      const drvPaths: string[] = [];
      const { jobs } = await evaluate({
        file: join(dir, js.file),
        attr: js.attr ?? undefined,
        storeDir: ctx.store.storeDir,
        store: new StoreWriterThread(ctx.store.loc, { beforeRelease: () => roots.addTempRoots(drvPaths) }),
        onJob: (j) => drvPaths.push(j.drvPath),
        timeoutSeconds: ctx.timeoutSeconds ?? 600,
        memoryMiB: ctx.memoryMiB ?? 4096,
      });
      const steps = await planStepsOffThread(ctx.store.loc, drvPaths);
      if (ctx.publish && steps.length > 0) await ctx.publish(steps.map((s) => s.drvPath));
      const result = await ingestEvaluation(ctx.db, {
        jobsetId: js.id,
        inputsHash,
        revision,
        evalMs: Date.now() - t0,
        jobs: farmJobs(jobs),
        steps,
      });
      return { kind: "evaluated", inputsHash, revision, result };
    } finally {
      roots.close();
    }
  } catch (e) {
    const error = asFerryError(e);
    const text = errorText(error);
    const evaluationId = await recordFailedEvaluation(ctx.db, { jobsetId: js.id, inputsHash, revision, evalMs: Date.now() - t0, error: text });
    return { kind: "failed", evaluationId, error };
  }
}

/**
 * When jobsets are evaluated: on demand (the API), when their check interval has passed, or when
 * they were triggered (a push webhook, `POST …/trigger`). A pass claims the due jobsets with
 * `FOR UPDATE SKIP LOCKED`, so several coordinators on one database evaluate each once; a
 * one-shot jobset (state 2) is disabled after its evaluation. The same pass reads the jobset
 * declarations of declarative projects whose interval has passed.
 *
 * One evaluation runs per jobset at a time in a process; a trigger that arrives while one runs
 * starts another when it ends (the push may be newer than what is being evaluated).
 */
import { sql, type Kysely } from "kysely";
import type { FarmSchema } from "./db/index.js";
import { startLoop } from "./loop.js";
import { evaluateJobset, type EvaluationOutcome, type EvaluatorContext } from "./evaluator.js";

export interface DueJobset {
  readonly id: number;
  readonly repo: string;
  readonly branch: string;
  readonly file: string;
  readonly attr: string | null;
  readonly last_inputs_hash: string | null;
  readonly state?: number;
}

export interface DueProject {
  readonly id: number;
  readonly name: string;
}

export interface EvaluationLoopOptions {
  readonly evaluator: EvaluatorContext;
  /** How often to look for due jobsets (ms; 0: only when poked). */
  readonly everyMs: number;
  /** Called after each evaluation (it wrote an event). */
  readonly onEvaluated?: () => void;
  /** Reads a declarative project's jobset declaration (its interval passed). */
  readonly refreshProject?: (p: DueProject) => Promise<void>;
}

export interface EvaluationLoop {
  /** Evaluates a jobset now, or joins the evaluation of it that is running. */
  start(js: DueJobset): Promise<EvaluationOutcome>;
  /** Evaluations running in this process. */
  readonly running: number;
  /** Runs a pass soon (a jobset was triggered). */
  poke(): void;
  close(): Promise<void>;
}

export function startEvaluationLoop(opts: EvaluationLoopOptions): EvaluationLoop {
  const db: Kysely<FarmSchema> = opts.evaluator.db;
  const running = new Map<number, Promise<EvaluationOutcome>>();
  /** Jobsets triggered while they were being evaluated: evaluated again after. */
  const again = new Map<number, DueJobset>();
  let closed = false;

  const start = (js: DueJobset): Promise<EvaluationOutcome> => {
    let job = running.get(js.id);
    if (!job) {
      job = evaluateJobset(opts.evaluator, { id: js.id, repo: js.repo, branch: js.branch, file: js.file, attr: js.attr, lastInputsHash: js.last_inputs_hash }).finally(() => {
        running.delete(js.id);
        opts.onEvaluated?.();
        const next = again.get(js.id);
        again.delete(js.id);
        if (next && !closed) void startDue(next);
      });
      running.set(js.id, job);
    }
    return job;
  };

  /** An evaluation the loop started: the jobset's latest inputs hash is re-read first. */
  const startDue = async (js: DueJobset): Promise<void> => {
    try {
      const fresh = await sql<{ last_inputs_hash: string | null }>`select last_inputs_hash from jobsets where id = ${js.id}`.execute(db);
      await start({ ...js, last_inputs_hash: fresh.rows[0]?.last_inputs_hash ?? null });
      if (js.state === 2) await sql`update jobsets set state = 0 where id = ${js.id} and state = 2`.execute(db);
    } catch (e) {
      console.error(`ferry farm: evaluating jobset ${js.id} failed: ${(e as Error).message}`);
    }
  };

  const pass = async (): Promise<void> => {
    const due = await sql<DueJobset & { state: number; triggered: boolean }>`
      with due as (
        select id, trigger_at is not null as triggered from jobsets
        where state in (1, 2)
          and (trigger_at is not null
               or (check_interval_s > 0 and (last_checked_at is null or last_checked_at + check_interval_s * interval '1 second' <= now())))
        for update skip locked)
      update jobsets j set last_checked_at = now(), trigger_at = null from due where j.id = due.id
      returning j.id, j.repo, j.branch, j.file, j.attr, j.last_inputs_hash, j.state, due.triggered`.execute(db);
    for (const js of due.rows) {
      if (running.has(js.id)) {
        if (js.triggered) again.set(js.id, js);
        continue;
      }
      void startDue(js);
    }
    if (!opts.refreshProject) return;
    const projects = await sql<DueProject>`
      update projects set decl_checked_at = now()
      where id in (
        select id from projects
        where decl_file is not null
          and (decl_checked_at is null
               or (decl_check_interval_s > 0 and decl_checked_at + decl_check_interval_s * interval '1 second' <= now()))
        for update skip locked)
      returning id, name`.execute(db);
    for (const p of projects.rows) await opts.refreshProject(p);
  };

  const loop = startLoop("checking jobsets", opts.everyMs, pass);

  return {
    start,
    get running() {
      return running.size;
    },
    poke: loop.poke,
    close: async () => {
      closed = true;
      await loop.close();
      await Promise.allSettled(running.values());
    },
  };
}

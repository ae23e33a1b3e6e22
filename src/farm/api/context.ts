/** What the coordinator's route modules share: the database, who is calling, the loops to poke. */
import { sql, type Kysely } from "kysely";
import type { FarmDatabase, FarmSchema } from "../db/index.js";
import type { EvaluationLoop } from "../evaluation-loop.js";
import type { Authenticator } from "./auth.js";
import type { WaitOptions } from "./commands.js";
import { ApiError } from "./http.js";

export interface ApiContext {
  readonly fdb: FarmDatabase;
  readonly db: Kysely<FarmSchema>;
  readonly auth: Authenticator;
  readonly evaluations: EvaluationLoop;
  /** Where checkouts (jobsets' and declarative specs') live. */
  readonly dataDir: string;
  /** Runs webhook fan-out and delivery now (in this process). */
  pokeDeliveries(): void;
  /** How long restart/cancel/bump wait for the scheduling leader. */
  readonly commandWait: WaitOptions;
  /** The shared secret of incoming push webhooks (`X-Hub-Signature-256`, `X-Gitlab-Token`). */
  readonly webhookSecret?: string | undefined;
}

export interface JobsetRow {
  id: number;
  project_id: number;
  project: string;
  name: string;
  repo: string;
  branch: string;
  file: string;
  attr: string | null;
  check_interval_s: number;
  state: number;
  shares: number;
  last_checked_at: Date | null;
  last_inputs_hash: string | null;
  error: string | null;
  trigger_at: Date | null;
  declarative: boolean;
}

export const JOBSET_SELECT = sql`select j.id, j.project_id, p.name as project, j.name, j.repo, j.branch, j.file, j.attr, j.check_interval_s, j.state, j.shares,
  j.last_checked_at, j.last_inputs_hash, j.error, j.trigger_at, p.decl_file is not null as declarative
  from jobsets j join projects p on p.id = j.project_id`;

export async function jobsetRow(db: Kysely<FarmSchema>, project: string, jobset: string): Promise<JobsetRow> {
  const r = await sql<JobsetRow>`${JOBSET_SELECT} where p.name = ${project} and j.name = ${jobset}`.execute(db);
  const row = r.rows[0];
  if (!row) throw new ApiError(404, "FERRY_FARM_NO_JOBSET", `there is no jobset ${project}/${jobset}`, "add it with `ferry farm jobset add`; list them with `ferry farm jobset list`");
  return row;
}

export const STATE_NAMES = ["disabled", "enabled", "one-shot"] as const;

/** A jobset as the API shows it. */
export const jobsetJson = (j: JobsetRow) => ({
  project: j.project,
  jobset: j.name,
  repo: j.repo,
  branch: j.branch,
  file: j.file,
  attr: j.attr,
  checkInterval: j.check_interval_s,
  state: j.state,
  stateName: STATE_NAMES[j.state] ?? String(j.state),
  shares: j.shares,
  declarative: j.declarative,
  lastCheckedAt: j.last_checked_at,
  triggeredAt: j.trigger_at,
  error: j.error,
});

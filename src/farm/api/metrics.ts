/**
 * `GET /metrics` (Prometheus text): queue depth and oldest wait per system, step durations,
 * evaluations (count, failures, a duration histogram), webhook deliveries; then whatever the
 * rest of the coordinator adds (`extraMetrics`, e.g. the dispatcher's workers and leader).
 */
import { sql } from "kysely";
import { DELIVERY_COUNTS } from "../db/webhooks.js";
import type { ApiContext } from "./context.js";
import type { Route } from "./http.js";

/** Upper bounds of the evaluation duration histogram, in seconds. */
const EVAL_BUCKETS = [1, 5, 15, 60, 300, 900, 3600];

export function metricsRoute(ctx: ApiContext, extra?: () => Promise<string>): Route {
  const db = ctx.db;
  const metrics = async (): Promise<string> => {
    const steps = await sql<{ system: string; status: string; n: string }>`select system, status, count(*) as n from steps group by system, status order by system, status`.execute(db);
    const waits = await sql<{ system: string; s: number | null }>`
      select system, extract(epoch from now() - min(created_at))::float8 as s from steps where status = 'queued' group by system order by system`.execute(db);
    const evals = await sql<{ n: string; failed: string; ms: string | null; timed: string; buckets: string[] }>`
      select count(*) as n, count(*) filter (where error is not null) as failed, sum(eval_ms) as ms, count(eval_ms) as timed,
        array[${sql.join(EVAL_BUCKETS.map((b) => sql`count(*) filter (where eval_ms <= ${b * 1000})`))}]::bigint[] as buckets
      from evaluations`.execute(db);
    const durations = await sql<{ system: string; n: string; ms: string | null }>`
      select system, count(*) as n, sum(duration_ms) as ms from steps where duration_ms is not null group by system order by system`.execute(db);
    const hooks = await sql<{ pending: string; failed: string; delivered: string }>`select ${DELIVERY_COUNTS} from webhook_deliveries d`.execute(db);
    const e = evals.rows[0]!;
    const h = hooks.rows[0]!;
    const seconds = (ms: string | null) => (Number(ms ?? 0) / 1000).toFixed(3);
    const lines = [
      "# HELP ferry_farm_steps Steps by system and status (queued is the queue depth).",
      "# TYPE ferry_farm_steps gauge",
      ...steps.rows.map((r) => `ferry_farm_steps{system="${r.system}",status="${r.status}"} ${r.n}`),
      "# HELP ferry_farm_queue_oldest_seconds How long the oldest queued step of a system has waited.",
      "# TYPE ferry_farm_queue_oldest_seconds gauge",
      ...waits.rows.map((r) => `ferry_farm_queue_oldest_seconds{system="${r.system}"} ${(r.s ?? 0).toFixed(3)}`),
      "# HELP ferry_farm_step_duration_seconds Build time of finished steps.",
      "# TYPE ferry_farm_step_duration_seconds summary",
      ...durations.rows.flatMap((r) => [`ferry_farm_step_duration_seconds_sum{system="${r.system}"} ${seconds(r.ms)}`, `ferry_farm_step_duration_seconds_count{system="${r.system}"} ${r.n}`]),
      "# HELP ferry_farm_evaluations_total Evaluations, and how many failed.",
      "# TYPE ferry_farm_evaluations_total counter",
      `ferry_farm_evaluations_total ${e.n}`,
      `ferry_farm_evaluations_failed_total ${e.failed}`,
      "# HELP ferry_farm_evaluation_seconds Time spent evaluating.",
      "# TYPE ferry_farm_evaluation_seconds counter",
      `ferry_farm_evaluation_seconds_sum ${seconds(e.ms)}`,
      "# HELP ferry_farm_evaluation_duration_seconds How long evaluations took (checkout, evaluation, ingest).",
      "# TYPE ferry_farm_evaluation_duration_seconds histogram",
      ...EVAL_BUCKETS.map((b, i) => `ferry_farm_evaluation_duration_seconds_bucket{le="${b}"} ${e.buckets[i]}`),
      `ferry_farm_evaluation_duration_seconds_bucket{le="+Inf"} ${e.timed}`,
      `ferry_farm_evaluation_duration_seconds_sum ${seconds(e.ms)}`,
      `ferry_farm_evaluation_duration_seconds_count ${e.timed}`,
      "# HELP ferry_farm_evaluations_running Evaluations running in this coordinator.",
      "# TYPE ferry_farm_evaluations_running gauge",
      `ferry_farm_evaluations_running ${ctx.evaluations.running}`,
      "# HELP ferry_farm_webhook_deliveries Webhook deliveries by state (failed: given up).",
      "# TYPE ferry_farm_webhook_deliveries gauge",
      `ferry_farm_webhook_deliveries{state="pending"} ${h.pending}`,
      `ferry_farm_webhook_deliveries{state="failed"} ${h.failed}`,
      `ferry_farm_webhook_deliveries{state="delivered"} ${h.delivered}`,
    ];
    const more = extra ? (await extra()).trimEnd() : "";
    return lines.join("\n") + "\n" + (more ? more + "\n" : "");
  };
  return { method: "GET", path: "/metrics", access: "read", run: async () => ({ status: 200, text: await metrics(), contentType: "text/plain; version=0.0.4" }) };
}

/**
 * The farm's coordinator in the test process, on a real database and loopback HTTP: start it,
 * call its API, seed evaluations (ingested as the evaluator would), and a stand-in for the
 * scheduling leader that applies `farm_commands` the way the dispatcher does.
 */
import { join } from "node:path";
import { sql, type Kysely } from "kysely";
import { migrateFarmDatabase, openFarmDatabase, type FarmDatabase, type FarmSchema } from "../../src/farm/db/index.js";
import { ingestEvaluation, type EvalJob, type EvalStep, type IngestResult } from "../../src/farm/db/ingest.js";
import { startCoordinator, type Coordinator, type CoordinatorOptions } from "../../src/farm/coordinator.js";
import { LocalStore } from "../../src/store/local-store.js";
import { resolveStoreLocation } from "../../src/store/config.js";
import type { Engine, FarmEngines } from "./farm-db.js";

export const ADMIN = "admin-secret";
export const WORKER = "worker-secret";

export interface Answer {
  readonly status: number;
  readonly json: any; // eslint-disable-line @typescript-eslint/no-explicit-any
  readonly text: string;
  readonly headers: Headers;
}

export interface TestFarm {
  readonly c: Coordinator;
  readonly db: Kysely<FarmSchema>;
  call(method: string, path: string, opts?: { token?: string | undefined; body?: unknown; headers?: Record<string, string>; raw?: string }): Promise<Answer>;
  close(): Promise<void>;
}

/** Migrates `fdb` and starts a coordinator on it (no timers unless asked: loops run when poked). */
export async function startTestFarm(fdb: FarmDatabase, dir: string, opts: Partial<CoordinatorOptions> = {}): Promise<TestFarm> {
  const m = await migrateFarmDatabase(fdb);
  if (m.error) throw m.error;
  const store = LocalStore.open(resolveStoreLocation({ storeDir: "/ferry/store", stateDir: "/ferry/var", root: join(dir, "store") }, {}));
  // The API alone (dispatch: false): these tests answer commands with a stand-in leader; the dispatcher has its own tests.
  const c = await startCoordinator({ db: fdb, store, dataDir: dir, adminToken: ADMIN, workerToken: WORKER, checkEveryMs: 0, webhooks: { everyMs: 0 }, dispatch: false, ...opts });
  return {
    c,
    db: fdb.db,
    call: async (method, path, o = {}) => {
      const token = "token" in o ? o.token : ADMIN;
      const res = await fetch(`${c.url}${path}`, {
        method,
        headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(o.body !== undefined ? { "content-type": "application/json" } : {}), ...o.headers },
        ...(o.raw !== undefined ? { body: o.raw } : o.body !== undefined ? { body: JSON.stringify(o.body) } : {}),
      });
      const text = await res.text();
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        json = undefined;
      }
      return { status: res.status, json, text, headers: res.headers };
    },
    close: async () => {
      await c.close();
      store.close();
    },
  };
}

export const drv = (n: string): string => `/ferry/store/${n.replace(/[^a-z0-9]/g, "").padStart(32, "a").slice(0, 32)}-${n}.drv`;

export interface SeedJob {
  readonly job: string;
  /** The derivation's name (default: the job). */
  readonly drv?: string;
  /** Derivation names this one needs built first (steps of their own). */
  readonly deps?: readonly string[];
  readonly members?: readonly string[];
  /** Already built: no step. */
  readonly built?: boolean;
}

/** A project and jobset (made if missing), and an evaluation of `jobs` ingested into it. */
export async function seedEvaluation(db: Kysely<FarmSchema>, project: string, jobset: string, jobs: readonly SeedJob[], inputsHash = `h-${Math.random()}`): Promise<IngestResult & { jobsetId: number }> {
  const p = await sql<{ id: number }>`insert into projects (name) values (${project}) on conflict (name) do update set name = excluded.name returning id`.execute(db);
  const js = await sql<{ id: number }>`
    insert into jobsets (project_id, name, repo, file) values (${p.rows[0]!.id}, ${jobset}, '/src/demo', 'packages.ts')
    on conflict (project_id, name) do update set name = excluded.name returning id`.execute(db);
  const jobsetId = js.rows[0]!.id;
  const steps = new Map<string, EvalStep>();
  const addStep = (name: string, deps: readonly string[]) => {
    if (!steps.has(name)) steps.set(name, { drvPath: drv(name), name, system: "x86_64-linux", dependsOn: deps.map(drv) });
  };
  for (const j of jobs) {
    for (const d of j.deps ?? []) addStep(d, []);
    if (!j.built) addStep(j.drv ?? j.job, j.deps ?? []);
  }
  const evalJobs: EvalJob[] = jobs.map((j) => {
    const d = drv(j.drv ?? j.job);
    return { job: j.job, drvPath: d, system: "x86_64-linux", outputs: { out: d.replace(/\.drv$/, ""), dev: d.replace(/\.drv$/, "-dev") }, ...(j.members ? { members: j.members } : {}) };
  });
  const r = await ingestEvaluation(db, { jobsetId, inputsHash, revision: "0123456789abcdef", jobs: evalJobs, steps: [...steps.values()] });
  return { ...r, jobsetId };
}

/**
 * Finishes steps as the dispatcher does: the step's status, and the status of every build
 * built by it.
 */
export async function finishSteps(db: Kysely<FarmSchema>, status: string, ...drvNames: string[]): Promise<void> {
  for (const n of drvNames) {
    const s = await sql<{ id: string }>`update steps set status = ${status}, finished_at = now() where drv_path = ${drv(n)} returning id`.execute(db);
    const buildStatus = status === "running" ? "queued" : status;
    await sql`update builds set status = ${buildStatus} where id in (select build_id from build_steps where step_id = ${s.rows[0]!.id})`.execute(db);
  }
}

/**
 * A stand-in for the scheduling leader: applies pending commands as the dispatcher does (cancel
 * a queued or running step, restart a failed / dependency-failed / cancelled one, bump a
 * queued one; anything else is an item error) until stopped.
 */
export function fakeLeader(db: Kysely<FarmSchema>): { stop(): Promise<void>; applied: () => number } {
  let stopped = false;
  let applied = 0;
  const loop = (async () => {
    while (!stopped) {
      const cmds = await sql<{ id: string; kind: string; payload: { steps: string[]; bump?: number } }>`select id, kind, payload from farm_commands where applied_at is null order by id`.execute(db);
      for (const c of cmds.rows) {
        const items = [];
        for (const id of c.payload.steps) {
          const s = (await sql<{ status: string }>`select status from steps where id = ${id}`.execute(db)).rows[0];
          const allowed = { cancel: ["queued", "running"], restart: ["failed", "dependency-failed", "cancelled"], bump: ["queued", "running"] }[c.kind] ?? [];
          if (!s || !allowed.includes(s.status)) {
            items.push({ id, ok: false, error: { code: "FERRY_FARM_STEP_STATE", message: `step ${id} is ${s?.status ?? "missing"}`, hint: "look at it again" } });
            continue;
          }
          if (c.kind === "cancel") await sql`update steps set status = 'cancelled' where id = ${id}`.execute(db);
          if (c.kind === "restart") await sql`update steps set status = 'queued' where id = ${id}`.execute(db);
          if (c.kind === "bump") await sql`update steps set bump = ${c.payload.bump ?? 0} where id = ${id}`.execute(db);
          items.push({ id, ok: true, value: { status: c.kind === "cancel" ? "cancelled" : c.kind === "restart" ? "queued" : s.status } });
        }
        await sql`update farm_commands set applied_at = now(), result = ${JSON.stringify({ items })}::jsonb where id = ${c.id}`.execute(db);
        applied++;
      }
      await new Promise((r) => setTimeout(r, 10));
    }
  })();
  return {
    stop: async () => {
      stopped = true;
      await loop;
    },
    applied: () => applied,
  };
}

/** A database of its own for one test: a PGlite directory, or a new database on the PostgreSQL server. */
export async function freshDatabase(engines: FarmEngines, engine: Engine, name: string): Promise<FarmDatabase> {
  if (engine === "pglite") return engines.open("pglite", { name });
  const admin = await engines.open("postgres");
  try {
    await sql.raw(`create database "${name}"`).execute(admin.db);
  } finally {
    await admin.close();
  }
  return openFarmDatabase({ url: engines.pg().url.replace(/\/[^/]*$/, `/${name}`) });
}

/**
 * The farm's database: PostgreSQL (`--database postgres://…`) or, by default, an embedded
 * PGlite database in the data dir; the same schema and the same SQL on both. Migrations are
 * numbered modules in ./migrations, applied in order under PostgreSQL's advisory lock (Kysely's
 * Migrator), so several coordinators starting together apply each once.
 */
import * as fs from "node:fs";
import { join } from "node:path";
import { Kysely, Migrator, PostgresDialect, type Generated, type Migration, type MigrationResultSet } from "kysely";
import { FerryError } from "../../core/errors.js";
import * as m0001 from "./migrations/0001-initial.js";
import * as m0002 from "./migrations/0002-dispatch.js";
import * as m0003 from "./migrations/0003-interfaces.js";
import * as m0004 from "./migrations/0004-settle.js";

/** The migrations, in order. A new one is a new numbered module added at the end. */
const MIGRATIONS: readonly { name: string; up(db: Kysely<unknown>): Promise<void> }[] = [m0001, m0002, m0003, m0004];

export interface ProjectsTable {
  id: Generated<number>;
  name: string;
  description: Generated<string>;
  created_at: Generated<Date>;
}

export interface StepsTable {
  id: Generated<string>;
  drv_path: string;
  name: string;
  system: string;
  features: Generated<string[]>;
  status: Generated<string>;
  bump: Generated<number>;
  attempts: Generated<number>;
  not_before: Date | null;
  lease_owner: string | null;
  lease_expires_at: Date | null;
  machine: string | null;
  started_at: Date | null;
  finished_at: Date | null;
  duration_ms: number | null;
  error: string | null;
  created_at: Generated<Date>;
}

/** The tables the code queries with types; the others are reached with `sql`. */
export interface FarmSchema {
  projects: ProjectsTable;
  steps: StepsTable;
}

export interface FarmDatabase {
  readonly db: Kysely<FarmSchema>;
  readonly kind: "pglite" | "postgres";
  /** The PostgreSQL URL (for sessions of its own, like the leader lock); undefined on PGlite. */
  readonly url?: string;
  close(): Promise<void>;
}

export interface OpenOptions {
  /** postgres://… ; without it, PGlite in `dataDir`. */
  readonly url?: string | undefined;
  readonly dataDir?: string | undefined;
  /** Connections in the pool (PostgreSQL). */
  readonly poolSize?: number;
}

export async function openFarmDatabase(opts: OpenOptions): Promise<FarmDatabase> {
  if (opts.url !== undefined) {
    if (!/^postgres(ql)?:\/\//.test(opts.url)) {
      throw new FerryError("FERRY_FARM_BAD_DATABASE", `'${opts.url}' is not a PostgreSQL URL`, { hint: "use postgres://user@host:port/dbname, or leave --database out for the embedded database" });
    }
    const pg = (await import("pg")).default;
    const pool = new pg.Pool({ connectionString: opts.url, max: opts.poolSize ?? 10 });
    // A broken idle connection (the server restarted) is dropped from the pool, not fatal.
    pool.on("error", () => undefined);
    // So is one that breaks while checked out between two queries: the next query fails instead.
    pool.on("connect", (client) => client.on("error", () => undefined));
    const db = new Kysely<FarmSchema>({ dialect: new PostgresDialect({ pool }) });
    return { db, kind: "postgres", url: opts.url, close: () => db.destroy() };
  }
  if (opts.dataDir === undefined) throw new Error("openFarmDatabase needs a url or a dataDir");
  const dir = join(opts.dataDir, "pglite");
  fs.mkdirSync(dir, { recursive: true });
  const { PGlite } = await import("@electric-sql/pglite");
  const { PGliteDialect } = await import("./pglite-dialect.js");
  const pglite = new PGlite(dir);
  const db = new Kysely<FarmSchema>({ dialect: new PGliteDialect(pglite) });
  return { db, kind: "pglite", close: () => db.destroy() };
}

/** Applies the migrations not applied yet; per-migration results, never a throw for one. */
export async function migrateFarmDatabase(fdb: FarmDatabase): Promise<MigrationResultSet> {
  const migrations: Record<string, Migration> = Object.fromEntries(MIGRATIONS.map((m) => [m.name, { up: m.up }]));
  const migrator = new Migrator({
    db: fdb.db,
    provider: { getMigrations: async () => migrations },
    migrationTableName: "ferry_migrations",
    migrationLockTableName: "ferry_migrations_lock",
  });
  return migrator.migrateToLatest();
}

/** The names of the migrations this code knows, in order. */
export const migrationNames = (): string[] => MIGRATIONS.map((m) => m.name);

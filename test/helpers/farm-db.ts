/**
 * The farm's two database engines for a test file: registers before/after hooks that start a
 * PostgreSQL on loopback and make a temporary data dir for PGlite, and opens either engine.
 */
import { before, after } from "node:test";
import * as fs from "node:fs";
import { join } from "node:path";
import { openFarmDatabase, type FarmDatabase } from "../../src/farm/db/index.js";
import { tempDir } from "./fs-trees.js";
import { startPostgres, type PostgresServer } from "./postgres.js";

export type Engine = "pglite" | "postgres";

export interface FarmEngines {
  /** The PostgreSQL server (started by the hooks). */
  readonly pg: () => PostgresServer;
  readonly dir: () => string;
  open(engine: Engine, opts?: { poolSize?: number; name?: string }): Promise<FarmDatabase>;
}

export function useFarmEngines(prefix: string): FarmEngines {
  let dir = "";
  let pg: PostgresServer | undefined;
  before(async () => {
    dir = tempDir(prefix);
    pg = await startPostgres();
  });
  after(async () => {
    await pg?.destroy();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return {
    pg: () => pg!,
    dir: () => dir,
    open: (engine, opts = {}) =>
      engine === "pglite"
        ? openFarmDatabase({ dataDir: join(dir, opts.name ?? "pglite") })
        : openFarmDatabase({ url: pg!.url, ...(opts.poolSize !== undefined ? { poolSize: opts.poolSize } : {}) }),
  };
}

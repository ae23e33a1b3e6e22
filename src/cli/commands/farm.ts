/**
 * `ferry farm …`: the build farm's coordinator and its client commands (a first slice:
 * serve, jobset add, eval, builds, evals). Client commands talk to the coordinator's REST API.
 */
import * as fs from "node:fs";
import { resolve } from "node:path";
import { Command, Option } from "commander";
import { FerryError } from "../../core/errors.js";
import { LocalStore } from "../../store/local-store.js";
import { withStoreOptions, storeLocation, type StoreFlags } from "../store-options.js";
import { parseListen } from "../listen.js";
import { note, out } from "../output.js";
import { untilStopSignal } from "../signals.js";

interface ServeFlags extends StoreFlags {
  dataDir: string;
  checkEvery: number;
  listen: string;
  database?: string;
  adminToken?: string;
  workerToken?: string;
  readToken?: string;
}

async function serve(f: ServeFlags): Promise<void> {
  const { host, port } = parseListen(f.listen, "FERRY_FARM_BAD_LISTEN");
  if (!f.adminToken) throw new FerryError("FERRY_FARM_NO_TOKEN", "the farm needs an admin token", { hint: "pass --admin-token or set FERRY_ADMIN_TOKEN" });
  const dataDir = resolve(f.dataDir);
  fs.mkdirSync(dataDir, { recursive: true });
  const { openFarmDatabase, migrateFarmDatabase } = await import("../../farm/db/index.js");
  const { startCoordinator } = await import("../../farm/coordinator.js");
  const db = await openFarmDatabase({ url: f.database, dataDir });
  const migrated = await migrateFarmDatabase(db);
  if (migrated.error) {
    await db.close();
    throw new FerryError("FERRY_FARM_MIGRATION_FAILED", `the database could not be migrated: ${(migrated.error as Error).message ?? String(migrated.error)}`, {
      hint: "see the message; the database is left as it was before the failed migration",
    });
  }
  for (const r of migrated.results ?? []) note(`ferry farm: migration ${r.migrationName}: ${r.status}`);
  const store = LocalStore.open(storeLocation(f));
  const c = await startCoordinator({ db, store, dataDir, host, port, adminToken: f.adminToken, checkEveryMs: Math.round(f.checkEvery * 1000), ...(f.workerToken ? { workerToken: f.workerToken } : {}), ...(f.readToken ? { readToken: f.readToken } : {}) });
  out(`ferry farm: serving on ${c.url} (database: ${db.kind === "pglite" ? `embedded, in ${dataDir}` : "PostgreSQL"})`);
  await untilStopSignal();
  await c.close();
  await db.close();
  store.close();
}

interface ClientFlags {
  farm: string;
  token?: string;
}

const clientOptions = (cmd: Command): Command =>
  cmd
    .addOption(new Option("--farm <url>", "the coordinator's URL").env("FERRY_FARM").makeOptionMandatory())
    .addOption(new Option("--token <token>", "API token (admin for changes)").env("FERRY_TOKEN"));

async function api(f: ClientFlags, method: string, path: string, body?: unknown): Promise<unknown> {
  let res: Response;
  const url = `${f.farm.replace(/\/+$/, "")}${path}`;
  try {
    res = await fetch(url, {
      method,
      headers: { ...(f.token ? { authorization: `Bearer ${f.token}` } : {}), ...(body !== undefined ? { "content-type": "application/json" } : {}) },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    });
  } catch (e) {
    throw new FerryError("FERRY_FARM_UNREACHABLE", `cannot reach the farm at ${f.farm}: ${((e as Error).cause as Error | undefined)?.message ?? (e as Error).message}`, {
      hint: "check --farm (or FERRY_FARM) and that `ferry farm serve` runs there",
    });
  }
  const text = await res.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new FerryError("FERRY_FARM_BAD_ANSWER", `${method} ${url}: HTTP ${res.status}, not JSON`, { hint: "is --farm the coordinator's URL?" });
  }
  if (!res.ok) {
    const e = (json as { error?: { code?: string; message?: string; hint?: string } }).error ?? {};
    throw new FerryError(e.code ?? "FERRY_FARM_ERROR", e.message ?? `HTTP ${res.status}`, e.hint ? { hint: e.hint } : {});
  }
  return json;
}

const seg = (s: string) => encodeURIComponent(s);

export function farmCommand(): Command {
  const cmd = new Command("farm").description("the build farm: a coordinator (serve) and the commands that drive it");
  cmd.addCommand(
    withStoreOptions(new Command("serve"))
      .description("run the coordinator: REST API, evaluations, database (embedded PGlite in --data-dir, or --database postgres://…)")
      .requiredOption("--data-dir <dir>", "where the embedded database and the checkouts live")
      .option("--listen <host:port>", "address to listen on", "127.0.0.1:8090")
      .option("--database <url>", "a PostgreSQL URL instead of the embedded database")
      .addOption(new Option("--admin-token <token>", "token for changes (projects, jobsets, evaluations)").env("FERRY_ADMIN_TOKEN"))
      .addOption(new Option("--worker-token <token>", "token workers present").env("FERRY_WORKER_TOKEN"))
      .addOption(new Option("--read-token <token>", "token reads need (default: reads are public)").env("FERRY_READ_TOKEN"))
      .option("--check-every <seconds>", "how often to look for jobsets whose check interval has passed", (v) => Number(v), 5)
      .action(serve),
  );
  const jobset = new Command("jobset").description("manage jobsets");
  jobset.addCommand(
    clientOptions(new Command("add"))
      .description("add or change a jobset: a git repository, a branch and the package-set file to evaluate")
      .argument("<project>")
      .argument("<jobset>")
      .requiredOption("--repo <git-url>", "any URL git understands, local paths included")
      .requiredOption("--file <file>", "the package set, relative to the repository")
      .option("--branch <branch>", "branch to follow", "main")
      .option("--attr <attr>", "only this attribute of the package set")
      .option("--check-interval <seconds>", "evaluate this often (0: only on demand)", (v) => Number(v))
      .action(async (project: string, name: string, f: ClientFlags & { repo: string; file: string; branch: string; attr?: string; checkInterval?: number }) => {
        const repo = /^[a-z+]+:\/\//.test(f.repo) || f.repo.includes("@") ? f.repo : resolve(f.repo);
        const r = await api(f, "PUT", `/api/projects/${seg(project)}/jobsets/${seg(name)}`, {
          repo,
          file: f.file,
          branch: f.branch,
          ...(f.attr ? { attr: f.attr } : {}),
          ...(f.checkInterval !== undefined ? { checkInterval: f.checkInterval } : {}),
        });
        out(JSON.stringify(r));
      }),
  );
  cmd.addCommand(jobset);
  cmd.addCommand(
    clientOptions(new Command("eval"))
      .description("evaluate a jobset now")
      .argument("<project>")
      .argument("<jobset>")
      .option("--wait", "wait for the evaluation and print its outcome")
      .action(async (project: string, name: string, f: ClientFlags & { wait?: boolean }) => {
        const r = (await api(f, "POST", `/api/projects/${seg(project)}/jobsets/${seg(name)}/evaluations${f.wait ? "?wait=1" : ""}`)) as { status?: string; error?: { code: string; message: string } };
        out(JSON.stringify(r));
        if (r.status === "failed") {
          note(`error [${r.error?.code}]: the evaluation failed: ${r.error?.message}`);
          process.exitCode = 1;
        }
      }),
  );
  cmd.addCommand(
    clientOptions(new Command("builds"))
      .description("the builds of a jobset's latest evaluation: job, derivation, status")
      .argument("<project>")
      .argument("<jobset>")
      .option("--json", "one JSON object per job")
      .action(async (project: string, name: string, f: ClientFlags & { json?: boolean }) => {
        const rows = (await api(f, "GET", `/api/projects/${seg(project)}/jobsets/${seg(name)}/builds`)) as { job: string; drvPath: string; status: string }[];
        for (const b of rows) out(f.json ? JSON.stringify(b) : `${b.job}\t${b.status}\t${b.drvPath}`);
      }),
  );
  cmd.addCommand(
    clientOptions(new Command("evals"))
      .description("a jobset's evaluations, newest first")
      .argument("<project>")
      .argument("<jobset>")
      .action(async (project: string, name: string, f: ClientFlags) => {
        const rows = (await api(f, "GET", `/api/projects/${seg(project)}/jobsets/${seg(name)}/evaluations`)) as unknown[];
        for (const e of rows) out(JSON.stringify(e));
      }),
  );
  return cmd;
}

/**
 * `ferry farm …`: the build farm's coordinator (serve) and the commands that drive it through
 * its REST API (docs/farm-api.md): projects, jobsets, evaluations and their diffs, builds and
 * restart / cancel / bump, tokens and webhooks.
 */
import * as fs from "node:fs";
import { resolve } from "node:path";
import { Command, Option } from "commander";
import { FerryError } from "../../core/errors.js";
import { openStore, withStoreOptions, storeLocation, type StoreFlags } from "../store-options.js";
import { parseListen } from "../listen.js";
import { note, out, outBytes } from "../output.js";
import { untilStopSignal } from "../signals.js";
import { spawn, type ChildProcess } from "node:child_process";
import { join } from "node:path";
import { readSecretKeyFile } from "../key-files.js";
import type { CoordinatorOptions } from "../../farm/coordinator.js";
import { api, call, clientOptions, printItems, printRows, readStepLog, seg, type ClientFlags } from "./farm-client.js";

interface ServeFlags extends StoreFlags {
  dataDir: string;
  checkEvery: number;
  listen: string;
  database?: string;
  adminToken?: string;
  workerToken?: string;
  readToken?: string;
  webhookSecret?: string;
  commandWait: number;
  leaseSeconds: number;
  stepTimeout?: number;
  retryAttempts: number;
  retryDelay: number;
  publicUrl?: string;
  cacheListen?: string;
  cache?: string;
  cacheToken?: string;
  cachePublicKey?: string;
  cacheSecretKey?: string;
  dispatch: boolean;
  localWorkers?: number;
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
  const store = openStore(f);
  const c = await startCoordinator({
    db,
    store,
    dataDir,
    host,
    port,
    adminToken: f.adminToken,
    checkEveryMs: Math.round(f.checkEvery * 1000),
    commandWait: { waitMs: Math.round(f.commandWait * 1000) },
    ...(f.workerToken ? { workerToken: f.workerToken } : {}),
    ...(f.readToken ? { readToken: f.readToken } : {}),
    ...(f.webhookSecret ? { webhookSecret: f.webhookSecret } : {}),
    dispatch: f.dispatch === false ? false : dispatchOptions(f, host),
  });
  out(`ferry farm: serving on ${c.url} (database: ${db.kind === "pglite" ? `embedded, in ${dataDir}` : "PostgreSQL"})`);
  const locals = startLocalWorkers(f, c.url, dataDir);
  await untilStopSignal();
  for (const w of locals) w.kill("SIGTERM");
  await c.close();
  await db.close();
  store.close();
}

/**
 * `--local-workers N`: N `ferry worker` processes on this machine, dialling this coordinator
 * with the worker token, each with its own store under DATA-DIR/workers/<i> (same store dir as
 * the coordinator's, so paths match). They stop with the coordinator.
 */
function startLocalWorkers(f: ServeFlags, url: string, dataDir: string): ChildProcess[] {
  const n = f.localWorkers ?? 0;
  if (n === 0) return [];
  if (!f.workerToken) throw new FerryError("FERRY_FARM_NO_TOKEN", "--local-workers needs --worker-token", { hint: "pass --worker-token (any secret) so the workers can connect" });
  const store = storeLocation(f);
  return Array.from({ length: n }, (_, i) => {
    const root = join(dataDir, "workers", String(i + 1));
    const child = spawn(process.execPath, [process.argv[1]!, "worker", "--farm", url, "--id", `local-${i + 1}`, "--store-dir", store.storeDir, "--root", root, "--state-dir", store.stateDir], {
      stdio: ["ignore", "ignore", "inherit"],
      env: { ...process.env, FERRY_WORKER_TOKEN: f.workerToken },
    });
    return child;
  });
}

function positive(flag: string, v: string): number {
  const n = Number(v);
  if (!(n > 0)) throw new FerryError("FERRY_FARM_BAD_ARGUMENT", `${flag} must be a number of seconds above 0, not '${v}'`);
  return n;
}

/** The dispatcher's settings from serve's flags. */
function dispatchOptions(f: ServeFlags, host: string): NonNullable<Exclude<CoordinatorOptions["dispatch"], false>> {
  const cacheAt = f.cacheListen ? parseListen(f.cacheListen, "FERRY_FARM_BAD_LISTEN") : undefined;
  if (f.cache === undefined && (f.cacheToken || f.cachePublicKey || f.cacheSecretKey)) {
    throw new FerryError("FERRY_FARM_BAD_ARGUMENT", "--cache-token, --cache-public-key and --cache-secret-key go with --cache", { hint: "the embedded cache makes its own token and key" });
  }
  return {
    leaseMs: Math.round(f.leaseSeconds * 1000),
    ...(f.stepTimeout ? { stepTimeoutSeconds: f.stepTimeout } : {}),
    scheduler: { retry: { maxAttempts: f.retryAttempts, initialDelayMs: Math.round(f.retryDelay * 1000) } },
    ...(f.publicUrl ? { publicUrl: f.publicUrl.replace(/\/+$/, "") } : {}),
    cacheHost: cacheAt?.host ?? host,
    ...(cacheAt ? { cachePort: cacheAt.port } : {}),
    ...(f.cache
      ? {
          cache: {
            url: f.cache,
            ...(f.cacheToken ? { token: f.cacheToken } : {}),
            ...(f.cachePublicKey ? { publicKey: f.cachePublicKey } : {}),
            ...(f.cacheSecretKey ? { secretKey: readSecretKeyFile(f.cacheSecretKey) } : {}),
          },
        }
      : {}),
  };
}

const atLeastOne = (flag: string, v: string) => {
  const n = toInt(flag)(v);
  if (n < 1) throw new FerryError("FERRY_FARM_BAD_ARGUMENT", `${flag} must be 1 or more, not '${v}'`, { hint: "1 means no retry: a transient failure fails the step at once" });
  return n;
};
const STATES = ["disabled", "enabled", "one-shot"];
const toInt = (name: string) => (v: string) => {
  if (!/^-?\d+$/.test(v)) throw new FerryError("FERRY_FARM_BAD_ARGUMENT", `${name} must be an integer, not '${v}'`);
  return Number(v);
};
/** A repository given on the command line: URLs as they are, local paths made absolute. */
const repoArg = (r: string) => (/^[a-z+]+:\/\//.test(r) || r.includes("@") ? r : resolve(r));

function projectCommands(): Command {
  const project = new Command("project").description("manage projects");
  project.addCommand(
    clientOptions(new Command("add"))
      .description("add or change a project; with --declarative-file its jobsets are declared in a JSON file of a repository")
      .argument("<project>")
      .option("--description <text>", "what the project is")
      .option("--declarative-repo <git-url>", "the repository holding the jobset declaration")
      .option("--declarative-file <file>", "the declaration (JSON: jobset name → { file, branch?, attr?, checkInterval?, state?, shares?, repo? })")
      .option("--declarative-branch <branch>", "the declaration's branch", "main")
      .option("--declarative-interval <seconds>", "read the declaration this often", toInt("--declarative-interval"))
      .option("--not-declarative", "stop reading a declaration (the jobsets stay as they are)")
      .option("--json", "print the answer as JSON")
      .action(async (name: string, f: ClientFlags & { description?: string; declarativeRepo?: string; declarativeFile?: string; declarativeBranch: string; declarativeInterval?: number; notDeclarative?: boolean }) => {
        if ((f.declarativeRepo === undefined) !== (f.declarativeFile === undefined)) {
          throw new FerryError("FERRY_FARM_BAD_ARGUMENT", "--declarative-repo and --declarative-file go together", { hint: "give both, or neither" });
        }
        const declarative = f.notDeclarative
          ? null
          : f.declarativeFile
            ? { repo: repoArg(f.declarativeRepo!), file: f.declarativeFile, branch: f.declarativeBranch, ...(f.declarativeInterval !== undefined ? { checkInterval: f.declarativeInterval } : {}) }
            : undefined;
        const r = (await api(f, "PUT", `/api/projects/${seg(name)}`, { ...(f.description !== undefined ? { description: f.description } : {}), ...(declarative !== undefined ? { declarative } : {}) })) as {
          project: string;
          changes: { jobset: string; action: string }[];
        };
        if (f.json) return out(JSON.stringify(r));
        out(`project ${r.project}`);
        for (const c of r.changes) out(`  ${c.action.padEnd(9)} ${c.jobset}`);
      }),
  );
  project.addCommand(
    clientOptions(new Command("list"))
      .description("the projects")
      .option("--json", "one JSON object per project")
      .action(async (f: ClientFlags) => {
        const rows = (await api(f, "GET", "/api/projects")) as { project: string; jobsets: number; declarative: { repo: string; file: string; error: string | null } | null; description: string }[];
        printRows(f, f.json ? rows : rows.map((p) => ({ ...p, declarative: p.declarative ? `${p.declarative.file} in ${p.declarative.repo}${p.declarative.error ? " (error)" : ""}` : "-" })), ["project", "jobsets", "declarative", "description"]);
      }),
  );
  return project;
}

function jobsetCommands(): Command {
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
      .option("--check-interval <seconds>", "evaluate this often (0: only on demand)", toInt("--check-interval"))
      .option("--shares <n>", "its share of the farm against other jobsets", toInt("--shares"))
      .option("--one-shot", "evaluate once, then disable")
      .action(async (project: string, name: string, f: ClientFlags & { repo: string; file: string; branch: string; attr?: string; checkInterval?: number; shares?: number; oneShot?: boolean }) => {
        const r = await api(f, "PUT", `/api/projects/${seg(project)}/jobsets/${seg(name)}`, {
          repo: repoArg(f.repo),
          file: f.file,
          branch: f.branch,
          ...(f.attr ? { attr: f.attr } : {}),
          ...(f.checkInterval !== undefined ? { checkInterval: f.checkInterval } : {}),
          ...(f.shares !== undefined ? { shares: f.shares } : {}),
          ...(f.oneShot ? { state: 2 } : {}),
        });
        out(JSON.stringify(r));
      }),
  );
  jobset.addCommand(
    clientOptions(new Command("list"))
      .description("a project's jobsets")
      .argument("<project>")
      .option("--json", "one JSON object per jobset")
      .action(async (project: string, f: ClientFlags) => {
        const rows = (await api(f, "GET", `/api/projects/${seg(project)}/jobsets`)) as Record<string, unknown>[];
        printRows(f, f.json ? rows : rows.map((j) => ({ ...j, state: j.stateName, error: j.error ? "yes" : "-" })), ["jobset", "state", "branch", "file", "checkInterval", "error", "repo"]);
      }),
  );
  jobset.addCommand(
    clientOptions(new Command("show"))
      .description("a jobset: its settings, latest evaluation, builds by status and last error")
      .argument("<project>")
      .argument("<jobset>")
      .option("--json", "as JSON")
      .action(async (project: string, name: string, f: ClientFlags) => {
        const j = (await api(f, "GET", `/api/projects/${seg(project)}/jobsets/${seg(name)}`)) as Record<string, unknown> & {
          lastEvaluation: { id: string; revision: string | null; builds: number; error: string | null } | null;
          builds: Record<string, number>;
        };
        if (f.json) return out(JSON.stringify(j));
        for (const k of ["project", "jobset", "repo", "branch", "file", "attr", "checkInterval", "stateName", "shares", "declarative", "lastCheckedAt"]) out(`${k.padEnd(14)} ${j[k] ?? "-"}`);
        const e = j.lastEvaluation;
        out(`${"evaluation".padEnd(14)} ${e ? `${e.id} (${e.revision?.slice(0, 12) ?? "-"}): ${e.error ? "failed" : `${e.builds} builds`}` : "-"}`);
        out(`${"builds".padEnd(14)} ${Object.entries(j.builds).map(([s, n]) => `${n} ${s}`).join(", ") || "-"}`);
        if (j.error) out(`error\n${String(j.error).replace(/^/gm, "  ")}`);
      }),
  );
  for (const [verb, state] of [["enable", 1], ["disable", 0]] as const) {
    jobset.addCommand(
      clientOptions(new Command(verb))
        .description(`${verb} a jobset (${verb === "enable" ? "it is evaluated at its check interval again" : "no more evaluations; its builds stay"})`)
        .argument("<project>")
        .argument("<jobset>")
        .action(async (project: string, name: string, f: ClientFlags) => {
          const j = (await api(f, "PATCH", `/api/projects/${seg(project)}/jobsets/${seg(name)}`, { state })) as { project: string; jobset: string; state: number };
          out(`${j.project}/${j.jobset}: ${STATES[j.state]}`);
        }),
    );
  }
  jobset.addCommand(
    clientOptions(new Command("trigger"))
      .description("make a jobset due now (like a push webhook does)")
      .argument("<project>")
      .argument("<jobset>")
      .action(async (project: string, name: string, f: ClientFlags) => {
        out(JSON.stringify(await api(f, "POST", `/api/projects/${seg(project)}/jobsets/${seg(name)}/trigger`)));
      }),
  );
  return jobset;
}

function evaluationCommands(cmd: Command): void {
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
      .action(async (project: string, name: string, f: ClientFlags) => {
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
  cmd.addCommand(
    clientOptions(new Command("diff"))
      .description("what changed between two evaluations: jobs added, removed and changed, and the steps that costs")
      .argument("<project>")
      .argument("<jobset>")
      .argument("[evaluation]", "an evaluation id (default: the latest successful one)", "latest")
      .option("--against <evaluation>", "compare with this evaluation (default: the one before)")
      .option("--json", "as JSON")
      .action(async (project: string, name: string, ev: string, f: ClientFlags & { against?: string }) => {
        const d = (await api(f, "GET", `/api/projects/${seg(project)}/jobsets/${seg(name)}/evaluations/${seg(ev)}/diff${f.against ? `?against=${seg(f.against)}` : ""}`)) as {
          evaluation: { id: string; revision: string | null };
          against: { id: string; revision: string | null } | null;
          added: string[];
          removed: string[];
          changed: string[];
          stepsNeeded: number;
        };
        if (f.json) return out(JSON.stringify(d));
        const rev = (e: { revision: string | null }) => (e.revision ? ` (${e.revision.slice(0, 12)})` : "");
        out(`${project}/${name}: evaluation ${d.evaluation.id}${rev(d.evaluation)} against ${d.against ? `${d.against.id}${rev(d.against)}` : "nothing"}`);
        for (const [title, mark, jobs] of [["added", "+", d.added], ["removed", "-", d.removed], ["changed", "~", d.changed]] as const) {
          out(`${title} (${jobs.length})${jobs.length ? ":" : ""}`);
          for (const j of jobs) out(`  ${mark} ${j}`);
        }
        out(`steps needed: ${d.stepsNeeded}`);
      }),
  );
  cmd.addCommand(
    clientOptions(new Command("latest"))
      .description("a job's latest finished build (the newest that succeeded in an evaluation with nothing queued), or one output's store path")
      .argument("<project>")
      .argument("<jobset>")
      .argument("<job>")
      .argument("[output]")
      .action(async (project: string, name: string, job: string, output: string | undefined, f: ClientFlags) => {
        const b = (await api(f, "GET", `/api/projects/${seg(project)}/jobsets/${seg(name)}/jobs/${seg(job)}/latest-finished${output ? `/${seg(output)}?format=json` : ""}`)) as { path?: string };
        out(output ? b.path! : JSON.stringify(b));
      }),
  );
}

function workerCommands(): Command[] {
  return [
    clientOptions(new Command("workers"))
      .description("the build machines connected to the farm (asked of the scheduling leader)")
      .option("--json", "one JSON object per worker")
      .action(async (f: ClientFlags & { json?: boolean }) => {
        const rows = (await api(f, "GET", "/api/workers")) as Record<string, unknown>[];
        printRows(f, rows.map((w) => ({ ...w, systems: (w.systems as string[]).join(","), running: (w.running as string[]).length })), ["id", "systems", "maxJobs", "speedFactor", "running", "load", "draining"]);
      }),
    clientOptions(new Command("drain"))
      .description("let a worker finish what it builds and take nothing new (for maintenance); it leaves once done")
      .argument("<worker>", "the worker's id, as `ferry farm workers` shows it")
      .action(async (worker: string, f: ClientFlags) => {
        await api(f, "POST", `/api/workers/${seg(worker)}/drain`);
        out(`draining ${worker}`);
      }),
  ];
}

function logCommand(): Command {
  return clientOptions(new Command("log"))
    .description("a step's build log; with --follow, as it grows until the step has finished (a lost connection is resumed where it stopped)")
    .argument("<step-id>", "a step id (a build's step is shown by GET /api/builds/{id})")
    .option("--follow", "keep printing the log as the step runs; Ctrl-C stops")
    .action(async (stepId: string, f: ClientFlags & { follow?: boolean }) => {
      await readStepLog(f, stepId, { follow: f.follow === true, write: outBytes, note });
    });
}

function buildActionCommand(action: "restart" | "cancel" | "bump", description: string): Command {
  const cmd = clientOptions(new Command(action))
    .description(description)
    .argument("[project]")
    .argument("[jobset]")
    .argument("[jobs...]", "jobs of the jobset's latest evaluation (default: all)")
    .option("--build <ids...>", "builds by id instead of by jobset")
    .option("--json", "print the answer as JSON");
  if (action === "bump") cmd.option("--bump <n>", "the priority (higher first)", toInt("--bump"), 1);
  return cmd.action(async (project: string | undefined, jobset: string | undefined, jobs: string[], f: ClientFlags & { build?: string[]; bump?: number }) => {
    if ((f.build === undefined) === (project === undefined || jobset === undefined)) {
      throw new FerryError("FERRY_FARM_BAD_ARGUMENT", `name the builds to ${action}: PROJECT JOBSET [JOB…], or --build ID…`, { hint: "ids are shown by `ferry farm builds`" });
    }
    if (f.build && project !== undefined) throw new FerryError("FERRY_FARM_BAD_ARGUMENT", "give either PROJECT JOBSET [JOB…] or --build ID…, not both");
    const body = { ...(f.build ? { builds: f.build } : { project, jobset, ...(jobs.length ? { jobs } : {}) }), ...(action === "bump" ? { bump: f.bump } : {}) };
    const r = (await call(f, "POST", `/api/builds/${action}`, body)).json as Parameters<typeof printItems>[0];
    if (f.json) {
      out(JSON.stringify(r));
      if (r.items?.some((i) => !i.ok)) process.exitCode = 1;
      return;
    }
    printItems(r, (i) => {
      const v = (i.value ?? {}) as { job?: string; status?: string; steps?: unknown[]; bump?: number; pending?: boolean };
      const steps = v.steps ? `${v.steps.length} steps ${v.pending ? "to cancel" : "cancelled"}` : undefined;
      return [v.job, v.status, v.bump !== undefined ? `bump ${v.bump}` : undefined, steps, v.pending ? "(pending)" : undefined].filter((x) => x !== undefined).join("  ");
    });
  });
}

function tokenCommands(): Command {
  const token = new Command("token").description("API tokens stored by the farm (admin)");
  token.addCommand(
    clientOptions(new Command("add"))
      .description("make a token; it is printed once")
      .requiredOption("--role <role>", "admin, worker, read-only or public-read")
      .option("--description <text>", "what it is for")
      .action(async (f: ClientFlags & { role: string; description?: string }) => {
        const t = (await api(f, "POST", "/api/tokens", { role: f.role, ...(f.description ? { description: f.description } : {}) })) as { id: string; token: string };
        note(`ferry farm: token ${t.id} (${f.role}); it is not shown again`);
        out(t.token);
      }),
  );
  token.addCommand(
    clientOptions(new Command("list"))
      .description("stored tokens (not their secrets)")
      .option("--json", "one JSON object per token")
      .action(async (f: ClientFlags) => printRows(f, (await api(f, "GET", "/api/tokens")) as Record<string, unknown>[], ["id", "role", "createdAt", "description"])),
  );
  token.addCommand(
    clientOptions(new Command("remove"))
      .description("revoke a token")
      .argument("<id>")
      .action(async (id: string, f: ClientFlags) => out(JSON.stringify(await api(f, "DELETE", `/api/tokens/${seg(id)}`)))),
  );
  return token;
}

function webhookCommands(): Command {
  const webhook = new Command("webhook").description("outgoing webhooks: build and evaluation events POSTed to a URL (admin)");
  webhook.addCommand(
    clientOptions(new Command("add"))
      .description("add a webhook; its signing secret is printed once")
      .argument("<url>")
      .option("--event <kind...>", "build:finished, evaluation:finished, step:finished (default: the first two)")
      .option("--project <project>", "only this project's events")
      .option("--secret <secret>", "the HMAC secret (default: a random one)")
      .option("--description <text>", "what it is for")
      .action(async (url: string, f: ClientFlags & { event?: string[]; project?: string; secret?: string; description?: string }) => {
        const w = await api(f, "POST", "/api/webhooks", {
          url,
          ...(f.event ? { events: f.event } : {}),
          ...(f.project ? { project: f.project } : {}),
          ...(f.secret ? { secret: f.secret } : {}),
          ...(f.description ? { description: f.description } : {}),
        });
        out(JSON.stringify(w));
      }),
  );
  webhook.addCommand(
    clientOptions(new Command("list"))
      .description("webhooks and their deliveries (delivered, pending, given up)")
      .option("--json", "one JSON object per webhook")
      .action(async (f: ClientFlags) => {
        const rows = (await api(f, "GET", "/api/webhooks")) as (Record<string, unknown> & { deliveries: { delivered: number; pending: number; failed: number }; events: string[] })[];
        printRows(
          f,
          f.json ? rows : rows.map((w) => ({ ...w, events: w.events.join(","), deliveries: `${w.deliveries.delivered} delivered, ${w.deliveries.pending} pending, ${w.deliveries.failed} failed` })),
          ["id", "url", "events", "project", "deliveries"],
        );
      }),
  );
  webhook.addCommand(
    clientOptions(new Command("remove"))
      .description("remove a webhook (and its deliveries)")
      .argument("<id>")
      .action(async (id: string, f: ClientFlags) => out(JSON.stringify(await api(f, "DELETE", `/api/webhooks/${seg(id)}`)))),
  );
  return webhook;
}

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
      .addOption(new Option("--webhook-secret <secret>", "secret git hosts sign push webhooks with (POST /api/hooks/git)").env("FERRY_WEBHOOK_SECRET"))
      .option("--check-every <seconds>", "how often to look for jobsets whose check interval has passed", (v) => Number(v), 5)
      .option("--command-wait <seconds>", "how long restart / cancel / bump wait for the scheduler before answering 'queued'", (v) => Number(v), 10)
      .option("--lease-seconds <seconds>", "a step whose worker is silent this long goes to another worker", (v) => positive("--lease-seconds", v), 60)
      .option("--step-timeout <seconds>", "kill builds that run longer than this", (v) => positive("--step-timeout", v))
      .option("--retry-attempts <n>", "attempts a step gets when it fails for a transient reason (a lost worker, a transfer, the disk) before it fails for good", (v) => atLeastOne("--retry-attempts", v), 5)
      .option("--retry-delay <seconds>", "wait before the first retry; each later one waits 3 times longer", (v) => positive("--retry-delay", v), 60)
      .option("--public-url <url>", "the URL workers reach this coordinator at (default: the listen address)")
      .option("--cache-listen <host:port>", "where the embedded farm cache listens (default: the listen host, a free port)")
      .option("--cache <url>", "use this binary cache (http(s)://, s3://, file://) instead of the embedded one")
      .addOption(new Option("--cache-token <token>", "upload token of --cache (handed to workers)").env("FERRY_FARM_CACHE_TOKEN"))
      .option("--cache-public-key <key>", "public key workers trust for --cache")
      .option("--cache-secret-key <file>", "key the coordinator signs the derivations it publishes to --cache with")
      .option("--no-dispatch", "serve the API and evaluate only; another coordinator on the same database schedules")
      .option("--local-workers <n>", "also run N workers on this machine (needs --worker-token)", (v) => toInt("--local-workers")(v))
      .action(serve),
  );
  cmd.addCommand(projectCommands());
  cmd.addCommand(jobsetCommands());
  evaluationCommands(cmd);
  cmd.addCommand(logCommand());
  for (const c of workerCommands()) cmd.addCommand(c);
  cmd.addCommand(buildActionCommand("restart", "queue failed, dependency-failed or cancelled builds again"));
  cmd.addCommand(buildActionCommand("cancel", "cancel queued builds (and the steps no other queued build needs)"));
  cmd.addCommand(buildActionCommand("bump", "build queued builds sooner"));
  cmd.addCommand(tokenCommands());
  cmd.addCommand(webhookCommands());
  return cmd;
}

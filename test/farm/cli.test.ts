/**
 * The farm from the command line, as the outside tests use it: `ferry farm serve` (on
 * its embedded database, and on PostgreSQL), `ferry farm jobset add`, `ferry farm eval --wait`
 * and `ferry farm builds --json` on a git repository on disk; and the errors users meet.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { join } from "node:path";
import { ferry, ferryBin, ferryOk } from "../helpers/cli.js";
import { useFarmEngines } from "../helpers/farm-db.js";
import { spawnFarmServe } from "../helpers/farm-processes.js";
import { fakeLeader } from "../helpers/farm-api.js";
import { gitCommit, gitRepo } from "../helpers/git-repo.js";
import { openFarmDatabase } from "../../src/farm/db/index.js";
import { sql } from "kysely";

const SET = `
import { derivation } from "ferry";
export const base = derivation({ name: "base", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo base > $out"] });
export const app = derivation({ name: "app", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $base > $out"], base });
`;

/** A git repository at DIR/repo with the package set committed on main. */
const makeRepo = (dir: string): string => gitRepo(join(dir, "repo"), { "packages.ts": SET });

const serveFarm = (args: string[]) => spawnFarmServe(["--listen", "127.0.0.1:0", ...args]);

/**
 * The commands beyond the first slice, on a farm with demo/main evaluated (app and base
 * queued): projects, jobsets, diff, cancel / restart / bump (with a stand-in scheduler on
 * PostgreSQL, none on the embedded database), latest, tokens and webhooks.
 */
async function moreCommands(engine: string, c: string[], repo: string, pgUrl: string | undefined): Promise<void> {
  const a = [...c, "--token", "adm"];
  assert.match(ferryOk(["farm", "project", "list", ...c]), /^demo\s+1\s+-/m);
  assert.match(ferryOk(["farm", "jobset", "list", ...c, "demo"]), /^main\s+enabled\s+main\s+packages\.ts/m);
  assert.match(ferryOk(["farm", "jobset", "show", ...c, "demo", "main"]), /^builds\s+2 queued$/m);
  assert.equal(ferryOk(["farm", "jobset", "disable", ...a, "demo", "main"]).trim(), "demo/main: disabled");
  assert.equal(ferryOk(["farm", "jobset", "enable", ...a, "demo", "main"]).trim(), "demo/main: enabled");

  const diff = ferryOk(["farm", "diff", ...c, "demo", "main"]);
  assert.match(diff, /^demo\/main: evaluation \d+ \([0-9a-f]{12}\) against nothing$/m);
  assert.match(diff, /^added \(2\):\n {2}\+ app\n {2}\+ base\nremoved \(0\)\nchanged \(0\)\nsteps needed: 2$/m);
  assert.deepEqual((JSON.parse(ferryOk(["farm", "diff", ...c, "demo", "main", "--json"])) as { added: string[] }).added, ["app", "base"]);

  const builds = ferryOk(["farm", "builds", ...c, "demo", "main", "--json"]).trim().split("\n").map((l) => JSON.parse(l) as { id: string; job: string });
  const app = builds.find((b) => b.job === "app")!;
  const db = pgUrl ? await openFarmDatabase({ url: pgUrl }) : undefined;
  const leader = db ? fakeLeader(db.db) : undefined;
  try {
    // The stand-in scheduler runs in this process: the commands run without blocking it.
    const cancel = await ferryAsync(["farm", "cancel", ...a, "demo", "main", "app"]);
    assert.equal(cancel.status, 0, cancel.stderr);
    assert.match(cancel.stdout, new RegExp(`^ok\\s+${app.id}\\s+app\\s+cancelled\\s+1 steps ${leader ? "cancelled$" : "to cancel\\s+\\(pending\\)$"}`, "m"));
    if (!leader) assert.match(cancel.stderr, /queued, not applied yet/);
    const again = await ferryAsync(["farm", "cancel", ...a, "--build", app.id, "999999"]);
    assert.equal(again.status, 1, "per-item failures fail the command");
    assert.match(again.stdout, /^failed\s+\d+\s+\[FERRY_FARM_BUILD_FINISHED\]/m);
    assert.match(again.stdout, /^failed\s+999999\s+\[FERRY_FARM_NO_BUILD\]/m);
    const restart = JSON.parse((await ferryAsync(["farm", "restart", ...a, "--build", app.id, "--json"])).stdout) as { items: { id: string; ok: boolean; value: { pending?: boolean } }[] };
    assert.deepEqual(restart.items.map((i) => [i.ok, i.value.pending ?? false]), [[true, !leader]]);
    const bump = await ferryAsync(["farm", "bump", ...a, "demo", "main", "--bump", "7"]);
    assert.match(bump.stdout, leader ? /^ok\s+\d+\s+app\s+bump 7$/m : /^ok\s+\d+\s+app\s+bump 7\s+\(pending\)$/m);
    assert.match(ferry(["farm", "bump", ...a]).stderr, /FERRY_FARM_BAD_ARGUMENT/);
    const badRetry = ferry(["farm", "serve", "--data-dir", "/nonexistent/never-made", "--retry-attempts", "0"]);
    assert.equal(badRetry.status, 1);
    assert.match(badRetry.stderr, /FERRY_FARM_BAD_ARGUMENT.*--retry-attempts must be 1 or more/);
    if (db) {
      await sql`update steps set status = 'succeeded'`.execute(db.db);
      await sql`update builds set status = 'succeeded'`.execute(db.db);
      const path = ferryOk(["farm", "latest", ...c, "demo", "main", "app", "out"]).trim();
      assert.match(path, /^\/ferry\/store\/[0-9a-z]{32}-app$/);
    } else {
      assert.match(ferry(["farm", "latest", ...c, "demo", "main", "app", "out"]).stderr, /FERRY_FARM_NO_FINISHED_BUILD/);
    }
  } finally {
    await leader?.stop();
    await db?.close();
  }

  // Tokens: a read-only token closes reads to callers without one.
  const token = ferryOk(["farm", "token", "add", ...a, "--role", "read-only", "--description", "dashboard"]).trim();
  assert.match(token, /^ferry_/);
  assert.match(ferryOk(["farm", "token", "list", ...a]), /read-only\s+\S+\s+dashboard/);
  assert.match(ferry(["farm", "builds", ...c, "demo", "main"]).stderr, /FERRY_FARM_UNAUTHORIZED/);
  ferryOk(["farm", "builds", ...c, "--token", token, "demo", "main"]);
  const id = (JSON.parse(ferryOk(["farm", "token", "list", ...a, "--json"])) as { id: string }).id;
  ferryOk(["farm", "token", "remove", ...a, id]);
  ferryOk(["farm", "builds", ...c, "demo", "main"]);

  const hook = JSON.parse(ferryOk(["farm", "webhook", "add", ...a, "http://127.0.0.1:9/hook", "--event", "evaluation:finished", "--project", "demo"])) as { id: string; secret: string };
  assert.ok(hook.secret.length > 20);
  assert.match(ferryOk(["farm", "webhook", "list", ...a]), new RegExp(`^${hook.id}\\s+http://127.0.0.1:9/hook\\s+evaluation:finished\\s+demo\\s+0 delivered`, "m"));
  ferryOk(["farm", "webhook", "remove", ...a, hook.id]);

  // A declarative project, from a declaration committed to the repository.
  gitCommit(repo, { "jobsets.json": JSON.stringify({ nightly: { file: "packages.ts", checkInterval: 0 } }) }, `declare (${engine})`);
  assert.equal(ferryOk(["farm", "project", "add", ...a, "decl", "--declarative-repo", repo, "--declarative-file", "jobsets.json"]), "project decl\n  create    nightly\n");
  assert.match(ferry(["farm", "jobset", "disable", ...a, "decl", "nightly"]).stderr, /FERRY_FARM_DECLARATIVE/);
}

/** `ferry` without blocking this process (whose stand-in scheduler must keep running). */
async function ferryAsync(args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [ferryBin, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout!.setEncoding("utf8").on("data", (s: string) => (stdout += s));
  child.stderr!.setEncoding("utf8").on("data", (s: string) => (stderr += s));
  const [status] = (await once(child, "exit")) as [number | null];
  return { status, stdout, stderr };
}

describe("ferry farm on the command line", () => {
  const engines = useFarmEngines("ferry-farm-cli-");

  for (const engine of ["pglite", "postgres"] as const) {
    test(`serve, jobset add, eval --wait, builds --json (${engine})`, async () => {
      const dir = join(engines.dir(), engine);
      const repo = makeRepo(dir);
      const db = engine === "postgres" ? ["--database", engines.pg().url] : [];
      // --no-dispatch: commands are answered by the stand-in scheduler (PostgreSQL) or by none (PGlite).
      const farm = await serveFarm(["--data-dir", join(dir, "farm"), "--admin-token", "adm", "--worker-token", "wrk", "--command-wait", "0.3", "--no-dispatch", "--store-dir", "/ferry/store", "--state-dir", "/ferry/var", "--root", join(dir, "store"), ...db]);
      try {
        const c = ["--farm", farm.url];
        ferryOk(["farm", "jobset", "add", ...c, "--token", "adm", "demo", "main", "--repo", repo, "--file", "packages.ts"]);
        const ev = JSON.parse(ferryOk(["farm", "eval", ...c, "--token", "adm", "demo", "main", "--wait"])) as { status: string; builds: number };
        assert.equal(ev.status, "evaluated");
        assert.equal(ev.builds, 2);
        const builds = ferryOk(["farm", "builds", ...c, "demo", "main", "--json"]).trim().split("\n").map((l) => JSON.parse(l) as { job: string; drvPath: string; status: string });
        assert.deepEqual(builds.map((b) => `${b.job}:${b.status}`), ["app:queued", "base:queued"]);
        assert.ok(builds.every((b) => /^\/ferry\/store\/[0-9a-z]{32}-.*\.drv$/.test(b.drvPath)));
        const again = JSON.parse(ferryOk(["farm", "eval", ...c, "--token", "adm", "demo", "main", "--wait"])) as { status: string };
        assert.equal(again.status, "unchanged");

        // /metrics: the queue per system, the evaluations
        const metrics = await (await fetch(`${farm.url}/metrics`)).text();
        assert.match(metrics, /^ferry_farm_steps\{system="x86_64-linux",status="queued"\} 2$/m);
        assert.match(metrics, /^ferry_farm_evaluations_total 1$/m);

        await moreCommands(engine, c, repo, engine === "postgres" ? engines.pg().url : undefined);

        const errors: [string[], RegExp][] = [
          [["farm", "jobset", "add", ...c, "demo", "x", "--repo", repo, "--file", "p.ts"], /FERRY_FARM_UNAUTHORIZED/],
          [["farm", "jobset", "add", ...c, "--token", "wrong", "demo", "x", "--repo", repo, "--file", "p.ts"], /FERRY_FARM_FORBIDDEN/],
          [["farm", "eval", ...c, "--token", "adm", "demo", "nope", "--wait"], /FERRY_FARM_NO_JOBSET/],
          [["farm", "jobset", "add", ...c, "--token", "adm", "bad name!", "x", "--repo", repo, "--file", "p.ts"], /FERRY_FARM_BAD_NAME/],
          [["farm", "builds", "--farm", "http://127.0.0.1:9", "demo", "main"], /FERRY_FARM_UNREACHABLE/],
        ];
        for (const [args, re] of errors) {
          const r = ferry(args);
          assert.equal(r.status, 1, `${args.join(" ")}: ${r.stderr}`);
          assert.match(r.stderr, re);
        }
      } finally {
        assert.equal(await farm.stop(), 0);
      }
    });
  }

  test("a jobset with a check interval is evaluated by the coordinator itself", async () => {
    const dir = join(engines.dir(), "interval");
    const repo = makeRepo(dir);
    const farm = await serveFarm(["--data-dir", join(dir, "farm"), "--admin-token", "adm", "--check-every", "0.2", "--store-dir", "/ferry/store", "--state-dir", "/ferry/var", "--root", join(dir, "store")]);
    try {
      const c = ["--farm", farm.url];
      ferryOk(["farm", "jobset", "add", ...c, "--token", "adm", "demo", "auto", "--repo", repo, "--file", "packages.ts", "--check-interval", "1"]);
      let evals: unknown[] = [];
      for (let i = 0; i < 100 && evals.length === 0; i++) {
        await new Promise((r) => setTimeout(r, 100));
        evals = ferryOk(["farm", "evals", ...c, "demo", "auto"]).trim().split("\n").filter((l) => l);
      }
      assert.equal(evals.length, 1, "evaluated without being asked");
      assert.equal(ferryOk(["farm", "builds", ...c, "demo", "auto"]).trim().split("\n").length, 2);
    } finally {
      assert.equal(await farm.stop(), 0);
    }
  });
});

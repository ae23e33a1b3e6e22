/**
 * The farm from the command line, as the outside tests use it: `ferry farm serve` (on
 * its embedded database, and on PostgreSQL), `ferry farm jobset add`, `ferry farm eval --wait`
 * and `ferry farm builds --json` on a git repository on disk; and the errors users meet.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { spawn } from "node:child_process";
import { execFileSync } from "node:child_process";
import { once } from "node:events";
import { join } from "node:path";
import { ferry, ferryBin, ferryOk } from "../helpers/cli.js";
import { useFarmEngines } from "../helpers/farm-db.js";

const SET = `
import { derivation } from "ferry";
export const base = derivation({ name: "base", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo base > $out"] });
export const app = derivation({ name: "app", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $base > $out"], base });
`;

/** A git repository at DIR/repo with the package set committed on main. */
function makeRepo(dir: string): string {
  const repo = join(dir, "repo");
  fs.mkdirSync(repo, { recursive: true });
  const g = (...args: string[]) => execFileSync("git", ["-c", "user.name=t", "-c", "user.email=t@example.org", "-C", repo, ...args], { stdio: "pipe" });
  g("init", "--quiet", "--initial-branch=main");
  fs.writeFileSync(join(repo, "packages.ts"), SET);
  g("add", ".");
  g("commit", "--quiet", "-m", "one");
  return repo;
}

async function serveFarm(args: string[]): Promise<{ url: string; stop(): Promise<number | null> }> {
  const child = spawn(process.execPath, [ferryBin, "farm", "serve", "--listen", "127.0.0.1:0", ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let text = "";
  let err = "";
  child.stderr!.setEncoding("utf8").on("data", (s: string) => (err += s));
  const url = await new Promise<string>((resolve, reject) => {
    child.stdout!.setEncoding("utf8").on("data", (s: string) => {
      text += s;
      const m = /serving on (http:\/\/[^\s]+)/.exec(text);
      if (m) resolve(m[1]!);
    });
    child.on("exit", (code) => reject(new Error(`ferry farm serve exited ${code}: ${err}`)));
  });
  return {
    url,
    stop: async () => {
      child.kill("SIGTERM");
      const [code] = (await once(child, "exit")) as [number | null];
      return code;
    },
  };
}

describe("ferry farm on the command line", () => {
  const engines = useFarmEngines("ferry-farm-cli-");

  for (const engine of ["pglite", "postgres"] as const) {
    test(`serve, jobset add, eval --wait, builds --json (${engine})`, async () => {
      const dir = join(engines.dir(), engine);
      const repo = makeRepo(dir);
      const db = engine === "postgres" ? ["--database", engines.pg().url] : [];
      const farm = await serveFarm(["--data-dir", join(dir, "farm"), "--admin-token", "adm", "--worker-token", "wrk", "--store-dir", "/ferry/store", "--state-dir", "/ferry/var", "--root", join(dir, "store"), ...db]);
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

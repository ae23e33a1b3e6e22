/**
 * Declarative projects and push webhooks: a project whose jobsets are declared in a JSON file
 * of a real git repository; the file is checked before anything is written; a push (signed
 * webhook) re-reads it, creating, changing and disabling jobsets; a trigger makes a jobset due
 * and the coordinator evaluates it. On PGlite and PostgreSQL.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { join } from "node:path";
import { isFerryError } from "../../src/core/errors.js";
import { parseDeclaration, planDeclaration, type DeclaredJobset } from "../../src/farm/declarative.js";
import { parsePush, repoKey } from "../../src/farm/api/projects.js";
import { useFarmEngines } from "../helpers/farm-db.js";
import { gitCommit, gitRepo } from "../helpers/git-repo.js";
import { freshDatabase, startTestFarm, type TestFarm } from "../helpers/farm-api.js";

const DECL = { repo: "/src/decl", branch: "trunk", file: "jobsets.json" };

async function until(what: string, check: () => Promise<boolean>): Promise<void> {
  for (let i = 0; i < 300; i++) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.fail(`${what} did not happen`);
}

const jobsets = async (farm: TestFarm, project: string) =>
  Object.fromEntries(((await farm.call("GET", `/api/projects/${project}/jobsets`)).json as { jobset: string; stateName: string; branch: string; attr: string | null }[]).map((j) => [j.jobset, j]));

describe("farm declarative projects and push webhooks", () => {
  const engines = useFarmEngines("ferry-farm-decl-");

  test("a declaration is checked, with defaults filled in; the plan creates, changes and disables", () => {
    const d = parseDeclaration(JSON.stringify({ b: { file: "b.ts", state: "one-shot" }, a: { file: "a.ts", checkInterval: 0, shares: 5 }, c: { file: "c.ts", repo: "https://x/y.git" } }), DECL);
    assert.deepEqual(d.map((j) => [j.name, j.repo, j.branch, j.state, j.checkInterval, j.shares]), [
      ["a", "/src/decl", "trunk", 1, 0, 5],
      ["b", "/src/decl", "trunk", 2, 300, 100],
      ["c", "https://x/y.git", "main", 1, 300, 100],
    ]);
    const bad: [string, RegExp][] = [
      ["{", /not JSON/],
      ["[]", /not a JSON object/],
      [JSON.stringify({ "bad name": { file: "x" } }), /not a valid jobset name/],
      [JSON.stringify({ a: { file: "x", colour: 1 } }), /unknown field 'colour'/],
      [JSON.stringify({ a: {} }), /needs 'file'/],
      [JSON.stringify({ a: { file: "x", state: "paused" } }), /'state'/],
      [JSON.stringify({ a: { file: "x", checkInterval: -1 } }), /checkInterval/],
    ];
    for (const [text, re] of bad) {
      assert.throws(() => parseDeclaration(text, DECL), (e: unknown) => isFerryError(e, "FERRY_FARM_BAD_DECLARATION") && re.test(e.message) && e.hint !== undefined, text);
    }
    const j = (name: string, over: Partial<DeclaredJobset> = {}): DeclaredJobset => ({ name, repo: "/r", branch: "main", file: "f.ts", attr: null, checkInterval: 300, state: 1, shares: 100, ...over });
    const plan = planDeclaration([j("keep"), j("change"), j("gone"), j("off", { state: 0 })], [j("keep"), j("change", { attr: "x" }), j("new")]);
    assert.deepEqual(plan.map((c) => `${c.jobset}:${c.action}`), ["change:update", "gone:disable", "keep:unchanged", "new:create", "off:unchanged"]);
  });

  test("push webhooks name repositories in many shapes", () => {
    const same = ["https://GitHub.com/o/r.git", "git@github.com:o/r.git", "ssh://git@github.com/o/r/", "http://github.com/o/r"];
    assert.deepEqual(new Set(same.map(repoKey)), new Set(["github.com/o/r"]));
    assert.equal(repoKey("/srv/git/r.git/"), "/srv/git/r");
    assert.notEqual(repoKey("https://github.com/o/r"), repoKey("https://github.com/o/R"));
    const gitlab = parsePush({ ref: "refs/heads/dev", project: { git_http_url: "https://gl/o/r.git" }, repository: { git_ssh_url: "git@gl:o/r.git" } });
    assert.deepEqual(gitlab, { urls: ["git@gl:o/r.git", "https://gl/o/r.git"], branch: "dev" });
    assert.equal(parsePush({ ref: "refs/tags/v1", repository: { clone_url: "x" } }).branch, undefined);
    assert.throws(() => parsePush({ ref: "refs/heads/x" }), (e: unknown) => isFerryError(e, "FERRY_FARM_BAD_HOOK"));
  });

  for (const engine of ["pglite", "postgres"] as const) {
    test(`declarative project, push webhook and trigger through the API (${engine})`, async () => {
      const dir = join(engines.dir(), `decl-${engine}`);
      const repoPath = gitRepo(join(dir, "repo"), {
        "jobsets.json": JSON.stringify({ main: { file: "packages.ts" }, staging: { file: "packages.ts", branch: "staging", checkInterval: 0 } }),
      });
      const repo = { path: repoPath, commit: (files: Record<string, string>) => gitCommit(repoPath, files) };
      const fdb = await freshDatabase(engines, engine, "decl");
      const farm = await startTestFarm(fdb, dir, { webhookSecret: "hooksecret" });
      try {
        const put = await farm.call("PUT", "/api/projects/decl", { body: { description: "declared", declarative: { repo: repo.path, file: "jobsets.json", checkInterval: 0 } } });
        assert.equal(put.status, 200, put.text);
        assert.deepEqual(put.json.changes, [{ jobset: "main", action: "create" }, { jobset: "staging", action: "create" }]);
        assert.deepEqual(put.json.declarative.file, "jobsets.json");
        let js = await jobsets(farm, "decl");
        assert.deepEqual([js.main!.branch, js.staging!.branch, js.staging!.stateName], ["main", "staging", "enabled"]);
        assert.equal((js.main as unknown as { declarative: boolean }).declarative, true);

        const conflict = await farm.call("PUT", "/api/projects/decl/jobsets/other", { body: { repo: repo.path, file: "x.ts" } });
        assert.deepEqual([conflict.status, conflict.json.error.code], [409, "FERRY_FARM_DECLARATIVE"]);
        assert.equal((await farm.call("PATCH", "/api/projects/decl/jobsets/main", { body: { state: 0 } })).json.error.code, "FERRY_FARM_DECLARATIVE");

        // A declaration that cannot be read or is wrong changes nothing.
        for (const [decl, code] of [
          [{ repo: repo.path, file: "missing.json" }, "FERRY_FARM_NO_DECLARATION"],
          [{ repo: join(dir, "nowhere"), file: "jobsets.json" }, "FERRY_FARM_CHECKOUT_FAILED"],
          [{ repo: repo.path, file: "../etc/passwd" }, "FERRY_FARM_BAD_DECLARATION"],
          [{ file: "jobsets.json" }, "FERRY_FARM_MISSING_FIELD"],
        ] as const) {
          const r = await farm.call("PUT", "/api/projects/other", { body: { declarative: decl } });
          assert.deepEqual([r.status, r.json.error.code], [400, code], r.text);
        }
        assert.equal((await farm.call("GET", "/api/projects/other")).json.error.code, "FERRY_FARM_NO_PROJECT");

        // Push webhook: signatures are checked; a push re-reads the declaration and makes the
        // jobsets on that repository and branch due.
        repo.commit({ "jobsets.json": JSON.stringify({ main: { file: "packages.ts" }, tools: { file: "tools.ts", attr: "linux", checkInterval: 0 } }) });
        const push = JSON.stringify({ ref: "refs/heads/main", repository: { clone_url: `${repo.path}.git/`, html_url: "https://example.org/x" } });
        const hook = (headers: Record<string, string>, token?: string, raw = push) => farm.call("POST", "/api/hooks/git", { token, raw, headers: { "content-type": "application/json", ...headers } });
        assert.equal((await hook({})).json.error.code, "FERRY_FARM_UNAUTHORIZED");
        assert.equal((await hook({ "x-hub-signature-256": "sha256=00" })).json.error.code, "FERRY_FARM_BAD_SIGNATURE");
        assert.equal((await hook({ "x-gitlab-token": "nope" })).json.error.code, "FERRY_FARM_BAD_SIGNATURE");
        assert.equal((await hook({ "x-github-event": "ping" }, "admin-secret", "{}")).json.pong, true);
        const bad = JSON.stringify({ ref: "refs/heads/main" });
        assert.equal((await hook({ "x-hub-signature-256": `sha256=${createHmac("sha256", "hooksecret").update(bad).digest("hex")}` }, undefined, bad)).json.error.code, "FERRY_FARM_BAD_HOOK");
        const signed = await hook({ "x-hub-signature-256": `sha256=${createHmac("sha256", "hooksecret").update(push).digest("hex")}` });
        assert.equal(signed.status, 200, signed.text);
        assert.deepEqual(signed.json, { jobsets: ["decl/main"], projects: ["decl"] });
        await until("the declaration is re-read", async () => (await jobsets(farm, "decl")).tools !== undefined);
        js = await jobsets(farm, "decl");
        assert.deepEqual([js.staging!.stateName, js.tools!.attr, js.main!.stateName], ["disabled", "linux", "enabled"], "staging is disabled, not deleted");
        // The triggered jobset was evaluated (its package set does not exist: a failed evaluation, kept).
        await until("main is evaluated", async () => (await farm.call("GET", "/api/projects/decl/jobsets/main/evaluations")).json.length > 0);
        const evals = await farm.call("GET", "/api/projects/decl/jobsets/main/evaluations");
        assert.match(evals.json[0].error, /FERRY_EVAL_NO_FILE/);
        assert.equal((await hook({ "x-gitlab-token": "hooksecret" })).status, 200, "GitLab's token header");

        // A broken declaration is kept as the project's error; its jobsets stay as they were.
        repo.commit({ "jobsets.json": "{ nope" });
        assert.equal((await hook({}, "admin-secret")).status, 200, "the admin token works too");
        await until("the error is recorded", async () => (await farm.call("GET", "/api/projects/decl")).json.declarative.error !== null);
        assert.match((await farm.call("GET", "/api/projects/decl")).json.declarative.error, /FERRY_FARM_BAD_DECLARATION/);
        assert.equal(Object.keys(await jobsets(farm, "decl")).length, 3);

        // Trigger: the jobset becomes due and is evaluated by the loop.
        const trig = await farm.call("POST", "/api/projects/decl/jobsets/tools/trigger");
        assert.equal(trig.status, 202, trig.text);
        await until("tools is evaluated", async () => (await farm.call("GET", "/api/projects/decl/jobsets/tools/evaluations")).json.length > 0);

        // No longer declarative: the jobsets stay and can be changed by hand.
        const plain = await farm.call("PUT", "/api/projects/decl", { body: { declarative: null } });
        assert.equal(plain.json.declarative, null);
        assert.equal(plain.json.description, "declared", "the description is kept");
        assert.equal((await farm.call("PATCH", "/api/projects/decl/jobsets/main", { body: { state: 0 } })).json.stateName, "disabled");
      } finally {
        await farm.close();
        await fdb.close();
      }
    });
  }
});

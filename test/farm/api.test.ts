/**
 * The coordinator's API over loopback HTTP, on PGlite and on PostgreSQL: errors, tokens and
 * roles, evaluation diffs, latest-finished builds, build details, restart / cancel / bump
 * through the leader's command queue (a stand-in leader applies it), and the OpenAPI document
 * covering every route.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import * as http from "node:http";
import { join } from "node:path";
import { sql } from "kysely";
import { createAuthenticator } from "../../src/farm/api/auth.js";
import { recordFailedEvaluation } from "../../src/farm/db/ingest.js";
import { OPENAPI } from "../../src/farm/api/openapi.js";
import { useFarmEngines } from "../helpers/farm-db.js";
import { ADMIN, WORKER, drv, fakeLeader, finishSteps, freshDatabase, seedEvaluation, startTestFarm, type Answer, type TestFarm } from "../helpers/farm-api.js";

function isError(a: Answer, status: number, code: string): void {
  assert.equal(a.status, status, `${code}: ${a.text}`);
  assert.equal(a.json.error.code, code, a.text);
  assert.equal(typeof a.json.error.message, "string");
}

async function buildOf(farm: TestFarm, jobset: string, job: string): Promise<{ id: string; status: string; step: { id: string; status: string } | null }> {
  const r = await farm.call("GET", `/api/projects/demo/jobsets/${jobset}/builds`);
  return r.json.find((b: { job: string }) => b.job === job);
}

describe("farm API", () => {
  const engines = useFarmEngines("ferry-farm-api-");

  test("extension points: more routes, an upgrade handler that authenticates, more metrics", async () => {
    const fdb = await freshDatabase(engines, "postgres", "extend");
    const upgrades: string[] = [];
    const farm = await startTestFarm(fdb, join(engines.dir(), "extend"), {
      extraRoutes: (api) => [
        { method: "GET", path: "/api/things", access: "read", run: async () => ({ status: 200, json: [{ id: "w1", database: api.fdb.kind }] }) },
        { method: "POST", path: "/api/things/{id}/poke", access: "admin", run: async (req) => ({ status: 200, json: { poked: req.params.id } }) },
      ],
      onUpgrade: (req, socket, _head, api) => {
        void api.auth.authenticate(req).then((role) => {
          upgrades.push(`${req.url} ${role}`);
          socket.end(role === "worker" ? "HTTP/1.1 101 Switching Protocols\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\n" : "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n");
        });
      },
      extraMetrics: async () => "# TYPE ferry_farm_workers gauge\nferry_farm_workers 3\n",
    });
    try {
      assert.deepEqual((await farm.call("GET", "/api/things", { token: undefined })).json, [{ id: "w1", database: "postgres" }]);
      isError(await farm.call("POST", "/api/things/w1/poke", { token: WORKER }), 403, "FERRY_FARM_FORBIDDEN");
      assert.deepEqual((await farm.call("POST", "/api/things/w%2F1/poke")).json, { poked: "w/1" });
      assert.match((await farm.call("GET", "/metrics")).text, /^ferry_farm_evaluations_total 0\n[^]*^ferry_farm_workers 3\n$/m);
      assert.ok(farm.c.routes.some((r) => r.path === "/api/things/{id}/poke"));
      const upgrade = (token: string) =>
        new Promise<number>((resolve, reject) => {
          const req = http.request(`${farm.c.url}/api/worker`, { headers: { connection: "Upgrade", upgrade: "test", authorization: `Bearer ${token}` } });
          req.on("upgrade", (res) => resolve(res.statusCode!));
          req.on("response", (res) => resolve(res.statusCode!));
          req.on("error", reject);
          req.end();
        });
      assert.equal(await upgrade(WORKER), 101);
      assert.equal(await upgrade(ADMIN), 401, "this handler only lets workers in");
      assert.deepEqual(upgrades, ["/api/worker worker", "/api/worker admin"]);
      assert.equal(await farm.c.authenticate({ headers: { authorization: `Bearer ${WORKER}` } } as http.IncomingMessage), "worker");
    } finally {
      await farm.close();
      await fdb.close();
    }
  });

  for (const engine of ["pglite", "postgres"] as const) {
    test(`the coordinator's API (${engine})`, async (t) => {
      const fdb = await freshDatabase(engines, engine, "api");
      const farm = await startTestFarm(fdb, join(engines.dir(), `api-${engine}`), { commandWait: { waitMs: 1000, pollMs: 10 } });
      const db = farm.db;
      try {
        await t.test("bad requests get coded errors with the right status, and change nothing", async () => {
          isError(await farm.call("GET", "/api/nope"), 404, "FERRY_FARM_NOT_FOUND");
          isError(await farm.call("DELETE", "/api/projects"), 405, "FERRY_FARM_METHOD");
          isError(await farm.call("PUT", "/api/projects/p1", { raw: "{", headers: { "content-type": "application/json" } }), 400, "FERRY_FARM_BAD_JSON");
          isError(await farm.call("PUT", "/api/projects/bad%20name", { body: {} }), 400, "FERRY_FARM_BAD_NAME");
          isError(await farm.call("PUT", "/api/projects/p1/jobsets/j", { body: { file: "f.ts" } }), 400, "FERRY_FARM_MISSING_FIELD");
          isError(await farm.call("PUT", "/api/projects/p1/jobsets/j", { body: { repo: "/r", file: "f.ts", state: 5 } }), 400, "FERRY_FARM_BAD_FIELD");
          isError(await farm.call("GET", "/api/projects/p1/jobsets/j"), 404, "FERRY_FARM_NO_JOBSET");
          isError(await farm.call("GET", "/api/builds/abc"), 400, "FERRY_FARM_BAD_ID");
          isError(await farm.call("GET", "/api/builds/999999"), 404, "FERRY_FARM_NO_BUILD");
          isError(await farm.call("PATCH", "/api/projects/p1/jobsets/j", { body: { state: 0 } }), 404, "FERRY_FARM_NO_JOBSET");
          const r = await farm.call("PUT", "/api/projects/p1/jobsets/j", { body: { repo: "/r", file: "f.ts" } });
          assert.equal(r.status, 200, r.text);
          isError(await farm.call("PATCH", "/api/projects/p1/jobsets/j", { body: {} }), 400, "FERRY_FARM_MISSING_FIELD");
          const off = await farm.call("PATCH", "/api/projects/p1/jobsets/j", { body: { state: 0 } });
          assert.equal(off.json.stateName, "disabled");
          isError(await farm.call("POST", "/api/projects/p1/jobsets/j/trigger"), 409, "FERRY_FARM_JOBSET_DISABLED");
        });

        await t.test("tokens: roles, stored tokens made once and revoked, reads closed by a read-only token", async () => {
          assert.equal((await farm.call("GET", "/api/projects", { token: undefined })).status, 200, "reads are open");
          isError(await farm.call("PUT", "/api/projects/p2", { token: WORKER, body: {} }), 403, "FERRY_FARM_FORBIDDEN");
          isError(await farm.call("PUT", "/api/projects/p2", { token: undefined, body: {} }), 401, "FERRY_FARM_UNAUTHORIZED");
          isError(await farm.call("POST", "/api/tokens", { token: WORKER, body: { role: "admin" } }), 403, "FERRY_FARM_FORBIDDEN");
          isError(await farm.call("POST", "/api/tokens", { body: { role: "root" } }), 400, "FERRY_FARM_BAD_FIELD");
          const made = async (role: string) => {
            const r = await farm.call("POST", "/api/tokens", { body: { role, description: `a ${role} token` } });
            assert.equal(r.status, 201, r.text);
            assert.match(r.json.token, /^ferry_/);
            return r.json as { id: string; token: string };
          };
          const admin2 = await made("admin");
          const worker2 = await made("worker");
          const pub = await made("public-read");
          assert.equal((await farm.call("PUT", "/api/projects/p2", { token: admin2.token, body: { description: "two" } })).status, 200);
          isError(await farm.call("PUT", "/api/projects/p2", { token: worker2.token, body: {} }), 403, "FERRY_FARM_FORBIDDEN");
          const list = await farm.call("GET", "/api/tokens");
          assert.deepEqual(list.json.map((x: { role: string }) => x.role), ["admin", "worker", "public-read"]);
          assert.ok(list.json.every((x: object) => !("token" in x) && !("hash" in x)), "no secrets listed");
          assert.ok(!list.text.includes(admin2.token));

          const auth = createAuthenticator(db, { adminToken: ADMIN, workerToken: WORKER });
          assert.deepEqual(
            await Promise.all([ADMIN, WORKER, admin2.token, worker2.token, pub.token, "nonsense", ""].map((x) => auth.roleOf(x))),
            ["admin", "worker", "admin", "worker", "read-only", "wrong", "wrong"],
          );
          assert.equal(await auth.readsOpen(), true, "a public-read token does not close reads");

          const reader = await made("read-only");
          isError(await farm.call("GET", "/api/projects", { token: undefined }), 401, "FERRY_FARM_UNAUTHORIZED");
          isError(await farm.call("GET", "/metrics", { token: undefined }), 401, "FERRY_FARM_UNAUTHORIZED");
          for (const tok of [reader.token, pub.token, WORKER, ADMIN]) assert.equal((await farm.call("GET", "/api/projects", { token: tok })).status, 200);
          isError(await farm.call("GET", "/api/projects", { token: "nonsense" }), 403, "FERRY_FARM_FORBIDDEN");
          isError(await farm.call("PUT", "/api/projects/p2", { token: reader.token, body: {} }), 403, "FERRY_FARM_FORBIDDEN");
          assert.equal((await farm.call("GET", "/api/health", { token: undefined })).status, 200, "health is public");

          assert.equal((await farm.call("DELETE", `/api/tokens/${reader.id}`)).status, 200);
          assert.equal((await farm.call("GET", "/api/projects", { token: undefined })).status, 200, "reads open again");
          isError(await farm.call("DELETE", `/api/tokens/${reader.id}`), 404, "FERRY_FARM_NO_TOKEN_ID");
          assert.equal((await farm.call("DELETE", `/api/tokens/${admin2.id}`)).status, 200);
          isError(await farm.call("PUT", "/api/projects/p2", { token: admin2.token, body: {} }), 403, "FERRY_FARM_FORBIDDEN");
        });

        await t.test("diff: against the previous successful evaluation, or any other", async () => {
          const e1 = await seedEvaluation(db, "demo", "main", [{ job: "a" }, { job: "b", deps: ["lib"] }, { job: "c" }]);
          await recordFailedEvaluation(db, { jobsetId: e1.jobsetId, inputsHash: "x", evalMs: 5, error: "FERRY_EVAL_FAILED: boom" });
          const failed = (await sql<{ id: string }>`select max(id) as id from evaluations`.execute(db)).rows[0]!.id;
          const e2 = await seedEvaluation(db, "demo", "main", [{ job: "a" }, { job: "b", drv: "b2", deps: ["lib"] }, { job: "d", built: true }]);
          const latest = await farm.call("GET", "/api/projects/demo/jobsets/main/evaluations/latest/diff");
          assert.equal(latest.status, 200, latest.text);
          assert.equal(latest.json.evaluation.id, e2.evaluationId);
          assert.equal(latest.json.against.id, e1.evaluationId, "the failed evaluation in between is skipped");
          assert.deepEqual([latest.json.added, latest.json.removed, latest.json.changed, latest.json.stepsNeeded], [["d"], ["c"], ["b"], 2]);
          const first = await farm.call("GET", `/api/projects/demo/jobsets/main/evaluations/${e1.evaluationId}/diff`);
          assert.equal(first.json.against, null);
          assert.deepEqual(first.json.added, ["a", "b", "c"]);
          const back = await farm.call("GET", `/api/projects/demo/jobsets/main/evaluations/${e1.evaluationId}/diff?against=${e2.evaluationId}`);
          assert.deepEqual([back.json.added, back.json.removed, back.json.changed], [["c"], ["d"], ["b"]]);
          isError(await farm.call("GET", `/api/projects/demo/jobsets/main/evaluations/${failed}/diff`), 409, "FERRY_FARM_EVALUATION_FAILED");
          isError(await farm.call("GET", "/api/projects/demo/jobsets/main/evaluations/abc/diff"), 400, "FERRY_FARM_BAD_ID");
          isError(await farm.call("GET", "/api/projects/demo/jobsets/main/evaluations/99999/diff"), 404, "FERRY_FARM_NO_EVALUATION");
          isError(await farm.call("GET", "/api/projects/demo/jobsets/main/evaluations/latest/diff?against=99999"), 404, "FERRY_FARM_NO_EVALUATION");
        });

        await t.test("latest-finished: the newest succeeded build of an evaluation with nothing queued; build details", async () => {
          const rel = [{ job: "app", deps: ["libc"] }, { job: "tool" }, { job: "tested", deps: ["app", "tool"], members: ["app", "tool"] }];
          await seedEvaluation(db, "demo", "rel", rel);
          const url = "/api/projects/demo/jobsets/rel/jobs/app/latest-finished";
          isError(await farm.call("GET", url), 404, "FERRY_FARM_NO_FINISHED_BUILD");
          await finishSteps(db, "succeeded", "libc", "app");
          isError(await farm.call("GET", url, { token: undefined }), 404, "FERRY_FARM_NO_FINISHED_BUILD");
          await finishSteps(db, "succeeded", "tool", "tested");
          const b = await farm.call("GET", url, { token: undefined });
          assert.equal(b.status, 200, b.text);
          assert.equal(b.json.status, "succeeded");
          assert.equal(b.json.outputs.out, drv("app").replace(/\.drv$/, ""));
          const text = await farm.call("GET", `${url}/out`, { token: undefined });
          assert.equal(text.headers.get("content-type"), "text/plain; charset=utf-8");
          assert.equal(text.text, `${drv("app").replace(/\.drv$/, "")}\n`);
          const asJson = await farm.call("GET", `${url}/dev`, { headers: { accept: "application/json" } });
          assert.deepEqual(asJson.json, { build: b.json.id, job: "app", output: "dev", path: drv("app").replace(/\.drv$/, "-dev") });
          isError(await farm.call("GET", `${url}/lib`), 404, "FERRY_FARM_NO_OUTPUT");

          // A newer evaluation that is still building does not move it.
          await seedEvaluation(db, "demo", "rel", [{ job: "app", drv: "app2", deps: ["libc"] }, { job: "tool" }]);
          assert.equal((await farm.call("GET", url)).json.id, b.json.id);

          const tested = await farm.call("GET", "/api/projects/demo/jobsets/rel/jobs/tested/latest-finished");
          const detail = await farm.call("GET", `/api/builds/${tested.json.id}`);
          assert.equal(detail.json.isAggregate, true);
          assert.deepEqual(detail.json.members.map((m: { job: string; status: string }) => `${m.job}:${m.status}`), ["app:succeeded", "tool:succeeded"]);
          assert.equal(detail.json.step.status, "succeeded");
          const app = await farm.call("GET", `/api/builds/${b.json.id}`);
          assert.deepEqual(app.json.memberOf, [tested.json.id]);
          assert.equal(app.json.project, "demo");
        });

        await t.test("restart, cancel and bump go through the leader and answer per build", async () => {
          await seedEvaluation(db, "demo", "act", [{ job: "x", deps: ["base"] }, { job: "y", deps: ["base"] }, { job: "z" }]);
          const leader = fakeLeader(db);
          try {
            const bump = await farm.call("POST", "/api/builds/bump", { body: { project: "demo", jobset: "act", jobs: ["x", "nope"], bump: 5 } });
            assert.equal(bump.status, 200, bump.text);
            const byId = (a: Answer) => Object.fromEntries(a.json.items.map((i: { id: string }) => [i.id, i]));
            const x = await buildOf(farm, "act", "x");
            assert.equal(byId(bump)[x.id].ok, true);
            assert.equal(byId(bump).nope.error.code, "FERRY_FARM_NO_JOB");
            assert.equal((await sql<{ bump: number }>`select bump from steps where drv_path = ${drv("x")}`.execute(db)).rows[0]!.bump, 5);

            const cancel = await farm.call("POST", "/api/builds/cancel", { body: { builds: [x.id, "999999", "abc"] } });
            assert.equal(cancel.status, 200, cancel.text);
            const items = byId(cancel);
            assert.equal(items[x.id].value.status, "cancelled");
            assert.deepEqual(items[x.id].value.steps.map((s: { id: string; ok: boolean }) => s.ok), [true], "only x's own step: base is needed by y");
            assert.equal(items["999999"].error.code, "FERRY_FARM_NO_BUILD");
            assert.equal(items.abc.error.code, "FERRY_FARM_NO_BUILD");
            const steps = await sql<{ drv_path: string; status: string }>`select drv_path, status from steps where drv_path = any(${sql.val([drv("x"), drv("base")])}::text[]) order by drv_path`.execute(db);
            assert.deepEqual(Object.fromEntries(steps.rows.map((s) => [s.drv_path, s.status])), { [drv("x")]: "cancelled", [drv("base")]: "queued" });
            assert.equal((await buildOf(farm, "act", "x")).status, "cancelled");
            const events = await sql<{ payload: { buildId: string; status: string } }>`select payload from farm_events where kind = 'build:finished' and payload->>'buildId' = ${x.id}`.execute(db);
            assert.deepEqual(events.rows.map((e) => e.payload.status), ["cancelled"]);
            const again = await farm.call("POST", "/api/builds/cancel", { body: { builds: [x.id] } });
            assert.equal(byId(again)[x.id].error.code, "FERRY_FARM_BUILD_FINISHED");

            const restart = await farm.call("POST", "/api/builds/restart", { body: { builds: [x.id] } });
            assert.equal(byId(restart)[x.id].ok, true, restart.text);
            assert.deepEqual([(await buildOf(farm, "act", "x")).status, (await buildOf(farm, "act", "x")).step!.status], ["queued", "queued"]);
            const z = await buildOf(farm, "act", "z");
            assert.equal(byId(await farm.call("POST", "/api/builds/restart", { body: { builds: [z.id] } }))[z.id].error.code, "FERRY_FARM_NOT_RESTARTABLE");

            // The leader refuses (the step is not failed): the build keeps its status.
            await sql`update builds set status = 'failed' where id = ${z.id}`.execute(db);
            await sql`update steps set status = 'running' where drv_path = ${drv("z")}`.execute(db);
            const refused = await farm.call("POST", "/api/builds/restart", { body: { builds: [z.id] } });
            assert.equal(byId(refused)[z.id].error.code, "FERRY_FARM_STEP_STATE");
            assert.equal((await buildOf(farm, "act", "z")).status, "failed");

            isError(await farm.call("POST", "/api/builds/cancel", { body: { builds: [x.id], project: "demo", jobset: "act" } }), 400, "FERRY_FARM_BAD_FIELD");
            isError(await farm.call("POST", "/api/builds/cancel", { body: {} }), 400, "FERRY_FARM_MISSING_FIELD");
            isError(await farm.call("POST", "/api/builds/cancel", { token: WORKER, body: { builds: [x.id] } }), 403, "FERRY_FARM_FORBIDDEN");
          } finally {
            await leader.stop();
          }
          // No leader: the build is cancelled, the step change waits in the queue (202).
          const y = await buildOf(farm, "act", "y");
          const pending = await farm.call("POST", "/api/builds/cancel", { body: { builds: [y.id] } });
          assert.equal(pending.status, 202, pending.text);
          assert.equal(pending.json.applied, false);
          assert.match(pending.json.hint, /scheduler/);
          assert.equal((await buildOf(farm, "act", "y")).status, "cancelled");
          const queued = await sql<{ kind: string; payload: { steps: string[] } }>`select kind, payload from farm_commands where id = ${pending.json.command}`.execute(db);
          assert.equal(queued.rows[0]!.kind, "cancel");
          assert.equal(queued.rows[0]!.payload.steps.length, 1, "y's own step: base is needed by x again");
        });

        await t.test("metrics: queue, evaluation durations as a histogram, webhook deliveries", async () => {
          const m = await farm.call("GET", "/metrics");
          assert.equal(m.headers.get("content-type"), "text/plain; version=0.0.4");
          assert.match(m.text, /^ferry_farm_steps\{system="x86_64-linux",status="queued"\} \d+$/m);
          assert.match(m.text, /^# TYPE ferry_farm_evaluation_duration_seconds histogram$/m);
          assert.match(m.text, /^ferry_farm_evaluation_duration_seconds_bucket\{le="1"\} \d+$/m);
          assert.match(m.text, /^ferry_farm_evaluation_duration_seconds_bucket\{le="\+Inf"\} \d+$/m);
          assert.match(m.text, /^ferry_farm_webhook_deliveries\{state="pending"\} 0$/m);
        });

        await t.test("the OpenAPI document describes every route, and only routes that exist", async () => {
          const doc = await farm.call("GET", "/api/openapi.json", { token: undefined });
          assert.equal(doc.json.openapi, "3.1.0");
          const documented = Object.entries(OPENAPI.paths).flatMap(([path, ops]) =>
            Object.entries(ops as Record<string, { "x-ferry-provided-by"?: string }>).map(([m, o]) => ({ key: `${m.toUpperCase()} ${path}`, external: o["x-ferry-provided-by"] })),
          );
          const routed = new Set(farm.c.routes.map((r) => `${r.method} ${r.path}`));
          for (const r of routed) assert.ok(documented.some((d) => d.key === r), `${r} is routed but not documented`);
          for (const d of documented) assert.ok(routed.has(d.key) || d.external === "dispatcher", `${d.key} is documented but not routed`);
          assert.deepEqual(documented.filter((d) => !routed.has(d.key)).map((d) => d.key).sort(), ["GET /api/worker"]);
        });
      } finally {
        await farm.close();
        await fdb.close();
      }
    });
  }
});

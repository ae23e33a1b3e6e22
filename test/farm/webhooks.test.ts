/**
 * Outgoing webhooks, on a real HTTP receiver on loopback: an evaluation's event arrives at
 * least once, signed, after the receiver failed twice; a receiver that keeps failing is given
 * up on with the error kept; two coordinators on one PostgreSQL fan each event out once.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import * as http from "node:http";
import { createHmac } from "node:crypto";
import { join } from "node:path";
import { sql } from "kysely";
import { retryDelayMs, signBody } from "../../src/farm/webhooks.js";
import { recordFailedEvaluation } from "../../src/farm/db/ingest.js";
import { recordEvent } from "../../src/farm/db/events.js";
import { openFarmDatabase } from "../../src/farm/db/index.js";
import { useFarmEngines } from "../helpers/farm-db.js";
import { freshDatabase, seedEvaluation, startTestFarm, type TestFarm } from "../helpers/farm-api.js";

interface Received {
  readonly headers: http.IncomingHttpHeaders;
  readonly body: string;
  readonly answered: number;
}

/** A webhook receiver that answers `answer(n)` to its n-th request (from 1). */
async function receiver(answer: (n: number) => number): Promise<{ url: string; got: Received[]; close(): Promise<void> }> {
  const got: Received[] = [];
  const server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (c: Buffer) => (body += c.toString()));
    req.on("end", () => {
      const status = answer(got.length + 1);
      got.push({ headers: req.headers, body, answered: status });
      res.writeHead(status).end();
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${(server.address() as { port: number }).port}/hook`, got, close: () => new Promise((r) => server.close(() => r())) };
}

/** Pokes delivery until `done` holds (each poke runs a whole pass). */
async function deliverUntil(farms: TestFarm[], done: () => boolean | Promise<boolean>): Promise<void> {
  for (let i = 0; i < 500 && !(await done()); i++) {
    for (const f of farms) f.c.pokeDeliveries();
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.ok(await done(), "delivered in time");
}

describe("farm webhooks", () => {
  const engines = useFarmEngines("ferry-farm-webhooks-");

  test("backoff doubles from the base up to the cap", () => {
    assert.deepEqual([1, 2, 3, 4].map((n) => retryDelayMs(n)), [1000, 2000, 4000, 8000]);
    assert.equal(retryDelayMs(11), 600_000);
    assert.equal(retryDelayMs(40), 600_000);
    assert.equal(signBody("k", "{}"), `sha256=${createHmac("sha256", "k").update("{}").digest("hex")}`);
  });

  for (const engine of ["pglite", "postgres"] as const) {
    test(`an event reaches a receiver that fails twice, signed; a dead one is given up (${engine})`, async () => {
      const fdb = await freshDatabase(engines, engine, "hooks");
      const farm = await startTestFarm(fdb, join(engines.dir(), `hooks-${engine}`), { webhooks: { everyMs: 0, retryBaseMs: 5, maxAttempts: 3 } });
      const flaky = await receiver((n) => (n <= 2 ? 503 : 204));
      const dead = await receiver(() => 500);
      try {
        const db = farm.db;
        await seedEvaluation(db, "demo", "main", []);
        await sql`update farm_events set fanned_out = true`.execute(db);
        const add = (body: object) => farm.call("POST", "/api/webhooks", { body });
        const hook = await add({ url: flaky.url, events: ["evaluation:finished"], secret: "s3cret", project: "demo" });
        assert.equal(hook.status, 201, hook.text);
        assert.equal(hook.json.secret, "s3cret");
        assert.equal((await add({ url: dead.url, events: ["evaluation:finished"] })).status, 201);
        assert.equal((await add({ url: flaky.url, project: "demo", events: ["build:finished"] })).status, 201, "another kind: gets nothing here");
        assert.equal((await farm.call("POST", "/api/webhooks", { body: { url: "ftp://x" } })).json.error.code, "FERRY_FARM_BAD_FIELD");
        assert.equal((await farm.call("POST", "/api/webhooks", { body: { url: flaky.url, events: ["build:started"] } })).json.error.code, "FERRY_FARM_BAD_FIELD");
        assert.equal((await farm.call("POST", "/api/webhooks", { body: { url: flaky.url, project: "nope" } })).json.error.code, "FERRY_FARM_NO_PROJECT");

        const ev = await seedEvaluation(db, "demo", "main", [{ job: "app" }, { job: "lib", built: true }]);
        await deliverUntil([farm], () => flaky.got.some((g) => g.answered === 204));
        assert.equal(flaky.got.length, 3, "two failures, then delivered");
        const first = flaky.got[0]!;
        for (const g of flaky.got) {
          assert.equal(g.headers["x-ferry-signature-256"], `sha256=${createHmac("sha256", "s3cret").update(g.body).digest("hex")}`);
          assert.equal(g.headers["x-ferry-event"], "evaluation:finished");
          assert.equal(g.headers["x-ferry-delivery"], first.headers["x-ferry-delivery"], "the same delivery, retried");
          assert.equal(g.headers["content-type"], "application/json");
        }
        const body = JSON.parse(first.body) as { event: string; delivery: string; payload: Record<string, unknown> };
        assert.equal(body.event, "evaluation:finished");
        assert.equal(body.delivery, first.headers["x-ferry-delivery"]);
        assert.deepEqual(body.payload, { evaluationId: ev.evaluationId, project: "demo", jobset: "main", status: "succeeded", builds: 2, changed: 2, revision: "0123456789abcdef" });

        const deliveries = await farm.call("GET", `/api/webhooks/${hook.json.id}/deliveries`);
        assert.deepEqual(deliveries.json.map((d: { state: string; attempts: number; lastError: string | null }) => [d.state, d.attempts, d.lastError]), [["delivered", 3, null]]);

        await deliverUntil([farm], async () => (await farm.call("GET", "/api/webhooks")).json[1].deliveries.failed === 1);
        assert.equal(dead.got.length, 3, "given up after maxAttempts");
        const gaveUp = (await farm.call("GET", `/api/webhooks/${(await farm.call("GET", "/api/webhooks")).json[1].id}/deliveries`)).json[0];
        assert.deepEqual([gaveUp.state, gaveUp.attempts, gaveUp.lastError, gaveUp.nextAttemptAt], ["failed", 3, "attempt 3: HTTP 500", null]);
        assert.match((await farm.call("GET", "/metrics")).text, /^ferry_farm_webhook_deliveries\{state="failed"\} 1$/m);

        // A failed evaluation is an event too, with its error.
        await recordFailedEvaluation(db, { jobsetId: ev.jobsetId, inputsHash: "", evalMs: 3, error: "FERRY_FARM_CHECKOUT_FAILED: no repo" });
        await deliverUntil([farm], () => flaky.got.filter((g) => g.answered === 204).length === 2);
        const failed = JSON.parse(flaky.got.at(-1)!.body) as { payload: { status: string; error: string } };
        assert.deepEqual([failed.payload.status, failed.payload.error], ["failed", "FERRY_FARM_CHECKOUT_FAILED: no repo"]);
        const list = await farm.call("GET", "/api/webhooks");
        assert.ok(!list.text.includes("s3cret"), "secrets are not listed");
        assert.equal((await farm.call("DELETE", `/api/webhooks/${hook.json.id}`)).status, 200);
        assert.equal((await farm.call("DELETE", `/api/webhooks/${hook.json.id}`)).json.error.code, "FERRY_FARM_NO_WEBHOOK");
      } finally {
        await flaky.close();
        await dead.close();
        await farm.close();
        await fdb.close();
      }
    });
  }

  test("two coordinators on one PostgreSQL fan each event out once and deliver them all", async () => {
    const a = await freshDatabase(engines, "postgres", "hooks_two");
    const second = await openFarmDatabase({ url: engines.pg().url.replace(/\/[^/]*$/, "/hooks_two") });
    const one = await startTestFarm(a, join(engines.dir(), "two-a"), { webhooks: { everyMs: 0, retryBaseMs: 5 } });
    const two = await startTestFarm(second, join(engines.dir(), "two-b"), { webhooks: { everyMs: 0, retryBaseMs: 5 } });
    const sink = await receiver((n) => (n % 7 === 0 ? 500 : 200));
    try {
      assert.equal((await one.call("POST", "/api/webhooks", { body: { url: sink.url, events: ["step:finished"] } })).status, 201);
      const n = 60;
      for (let i = 0; i < n; i++) {
        await one.db.transaction().execute((tx) => recordEvent(tx, "step:finished", { stepId: String(i), drvPath: `/ferry/store/x-${i}.drv`, status: "succeeded" }));
        if (i % 10 === 0) {
          one.c.pokeDeliveries();
          two.c.pokeDeliveries();
        }
      }
      await deliverUntil([one, two], async () => {
        const r = await sql<{ n: string }>`select count(*) as n from webhook_deliveries where delivered_at is not null`.execute(one.db);
        return Number(r.rows[0]!.n) === n;
      });
      const rows = await sql<{ n: string; events: string }>`select count(*) as n, count(distinct event_id) as events from webhook_deliveries`.execute(one.db);
      assert.deepEqual([Number(rows.rows[0]!.n), Number(rows.rows[0]!.events)], [n, n], "one delivery per event");
      const ok = new Set(sink.got.filter((g) => g.answered === 200).map((g) => (JSON.parse(g.body) as { payload: { stepId: string } }).payload.stepId));
      assert.equal(ok.size, n, "every event arrived");
      const left = await sql<{ n: string }>`select count(*) as n from farm_events where not fanned_out`.execute(one.db);
      assert.equal(Number(left.rows[0]!.n), 0);
    } finally {
      await sink.close();
      await one.close();
      await two.close();
      await a.close();
      await second.close();
    }
  });
});

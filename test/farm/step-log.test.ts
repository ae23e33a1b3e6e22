/**
 * Following a step's log while it builds: a coordinator with its dispatcher on a real database,
 * a scripted worker that logs slowly over a real WebSocket, and clients on loopback HTTP (fetch,
 * and the built `ferry farm log --follow` behind a proxy that cuts connections).
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as net from "node:net";
import { once } from "node:events";
import { join } from "node:path";
import type { AddressInfo } from "node:net";
import { sql } from "kysely";
import { migrateFarmDatabase, openFarmDatabase, type FarmDatabase } from "../../src/farm/db/index.js";
import { createLogFollowers } from "../../src/farm/api/step-log.js";
import { spawnFerry } from "../helpers/cli.js";
import { useFarmEngines } from "../helpers/farm-db.js";
import { drv, freshDatabase, seedEvaluation, startTestFarm, WORKER, type TestFarm } from "../helpers/farm-api.js";
import { until } from "../helpers/farm-dag.js";
import { startScriptedWorker, type ScriptedWorker } from "../helpers/scripted-worker.js";

const LINES = ["configuring\n", "compiling a.c\n", "compiling b.c\n", "linking\n", "installing\n", "done\n"];
const WHOLE = LINES.join("");

interface Setup {
  readonly farm: TestFarm;
  readonly fdb: FarmDatabase;
  readonly stepId: string;
  /** Starts a worker that runs the step, logging LINES evenly over `durationMs`. */
  startWorker(): ScriptedWorker;
  close(): Promise<void>;
}

/** A coordinator (with its dispatcher) and one queued step, "app". */
async function setup(fdb: FarmDatabase, dir: string, durationMs: number): Promise<Setup> {
  // Queued before the coordinator starts: the leader takes it in when it loads the schedule.
  const m = await migrateFarmDatabase(fdb);
  if (m.error) throw m.error;
  await seedEvaluation(fdb.db, "p", "j", [{ job: "app" }]);
  const stepId = (await sql<{ id: string }>`select id::text as id from steps where drv_path = ${drv("app")}`.execute(fdb.db)).rows[0]!.id;
  const farm = await startTestFarm(fdb, dir, { dispatch: { leaseMs: 10_000 } });
  let worker: ScriptedWorker | undefined;
  return {
    farm,
    fdb,
    stepId,
    startWorker: () => (worker = startScriptedWorker({ url: farm.c.url, token: WORKER, id: "w1", duration: () => durationMs, log: () => LINES })),
    close: async () => {
      await worker?.stop();
      await farm.close();
      await fdb.close();
    },
  };
}

const stepStatus = async (db: TestFarm["db"], id: string) => (await sql<{ status: string }>`select status from steps where id = ${id}`.execute(db)).rows[0]!.status;

/** Reads a streamed answer chunk by chunk, calling `each` with the text so far. */
async function readChunks(res: Response, each: (text: string, chunk: string) => Promise<void> | void = () => undefined): Promise<string[]> {
  const chunks: string[] = [];
  const decoder = new TextDecoder();
  for await (const c of res.body!) {
    const chunk = decoder.decode(c, { stream: true });
    chunks.push(chunk);
    await each(chunks.join(""), chunk);
  }
  return chunks;
}

const followers = async (farm: TestFarm): Promise<number> => Number(/^ferry_farm_log_followers (\d+)$/m.exec((await farm.call("GET", "/metrics")).text)?.[1]);

/** File descriptors this process holds on `path`. */
const fdsOn = (path: string): number =>
  fs.readdirSync("/proc/self/fd").filter((fd) => {
    try {
      return fs.readlinkSync(`/proc/self/fd/${fd}`) === path;
    } catch {
      return false;
    }
  }).length;

/** A TCP proxy in front of `target` whose open connections can be cut. */
async function startCutter(target: string): Promise<{ url: string; cut(): void; close(): Promise<void> }> {
  const t = new URL(target);
  const open = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(t.port), t.hostname);
    const end = () => {
      client.destroy();
      upstream.destroy();
      open.delete(client);
    };
    open.add(client);
    client.pipe(upstream).on("error", end).on("close", end);
    upstream.pipe(client).on("error", end).on("close", end);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    cut: () => {
      for (const s of open) s.destroy();
    },
    close: async () => {
      for (const s of open) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

describe("following a step's log", () => {
  const engines = useFarmEngines("ferry-step-log-");

  for (const engine of ["pglite", "postgres"] as const) {
    test(`the log arrives in order while the step runs and the answer ends after its result; offset resumes without duplicates (${engine})`, async () => {
      const s = await setup(await freshDatabase(engines, engine, "follow"), join(engines.dir(), `follow-${engine}`), 1800);
      try {
        const url = `${s.farm.c.url}/api/steps/${s.stepId}/log`;
        // Followed from before the step starts: the answer waits for the log to appear.
        const res = await fetch(`${url}?follow=1`);
        s.startWorker();
        assert.equal(res.status, 200);
        assert.equal(res.headers.get("content-type"), "text/plain; charset=utf-8");
        assert.equal(res.headers.get("transfer-encoding"), "chunked");
        let statusAtFirst = "";
        let resumed: Promise<string> | undefined;
        const chunks = await readChunks(res, async (text) => {
          if (!statusAtFirst) {
            statusAtFirst = await stepStatus(s.farm.db, s.stepId);
            assert.equal(await followers(s.farm), 1);
            // A second client that had these bytes comes back with offset: it gets the rest only.
            const n = Buffer.byteLength(text);
            resumed = fetch(`${url}?follow=1&offset=${n}`).then(async (r) => text + (await r.text()));
          }
        });
        const statusAtEnd = await stepStatus(s.farm.db, s.stepId);
        assert.equal(chunks.join(""), WHOLE);
        assert.equal(statusAtFirst, "running", "the first bytes came while the step ran");
        assert.ok(chunks.length >= 3, `the log came in pieces as it was written (${chunks.length} chunks)`);
        assert.equal(statusAtEnd, "succeeded", "the answer ended once the step had finished");
        assert.equal(await resumed, WHOLE, "offset: no byte twice, none missing");

        // Without follow: what there is, from offset, with its length.
        const all = await fetch(url);
        assert.equal(all.headers.get("content-length"), String(Buffer.byteLength(WHOLE)));
        assert.equal(await all.text(), WHOLE);
        assert.equal(await (await fetch(`${url}?offset=${LINES[0]!.length}`)).text(), LINES.slice(1).join(""));
        // Following a finished step's log gives it whole and ends.
        assert.equal(await (await fetch(`${url}?follow=1`)).text(), WHOLE);
        await until("no followers", async () => (await followers(s.farm)) === 0, 2000);
      } finally {
        await s.close();
      }
    });
  }

  test("a client that goes away mid-follow (fetch aborted, or the CLI on Ctrl-C) leaves no follower and no open file; coded errors", async () => {
    const s = await setup(await freshDatabase(engines, "pglite", "gone"), join(engines.dir(), "gone"), 4000);
    try {
      const url = `${s.farm.c.url}/api/steps/${s.stepId}/log`;
      s.startWorker();
      const gone = new AbortController();
      const res = await fetch(`${url}?follow=1`, { signal: gone.signal });
      const reader = res.body!.getReader();
      const first = await reader.read();
      assert.ok(new TextDecoder().decode(first.value).startsWith(LINES[0]!));
      const path = join(fs.realpathSync(engines.dir()), "gone", "logs", drv("app").slice("/ferry/store/".length));
      assert.equal(fdsOn(path), 1, "the follower holds the log open");
      assert.equal(await followers(s.farm), 1);
      gone.abort();
      await until("the follower to leave", async () => (await followers(s.farm)) === 0, 2000);
      assert.equal(fdsOn(path), 0, "the log file is closed");
      assert.equal(await stepStatus(s.farm.db, s.stepId), "running", "it left while the step still ran");
      // Ctrl-C ends `ferry farm log --follow`; the coordinator lets go of it too.
      const cli = spawnFerry(["farm", "log", "--farm", s.farm.c.url, s.stepId, "--follow"]);
      await once(cli.stdout!, "data");
      assert.equal(await followers(s.farm), 1);
      cli.kill("SIGINT");
      assert.deepEqual(await once(cli, "close"), [null, "SIGINT"]);
      await until("the CLI's follower to leave", async () => (await followers(s.farm)) === 0, 2000);
      assert.equal(await stepStatus(s.farm.db, s.stepId), "running");

      const code = async (path: string, status: number) => {
        const r = await s.farm.call("GET", path);
        assert.equal(r.status, status, r.text);
        return r.json.error.code as string;
      };
      assert.equal(await code("/api/steps/987654/log?follow=1", 404), "FERRY_FARM_UNKNOWN_STEP");
      assert.equal(await code(`/api/steps/${s.stepId}/log?offset=-1`, 400), "FERRY_FARM_BAD_OFFSET");
      assert.equal(await code(`/api/steps/${s.stepId}/log?follow=maybe`, 400), "FERRY_FARM_BAD_QUERY");
      assert.equal(await code(`/api/steps/${s.stepId}/log?offset=999999`, 416), "FERRY_FARM_LOG_OFFSET");
      // A step that never ran here has no log (and, on the leader, no redirect).
      await seedEvaluation(s.fdb.db, "p", "j", [{ job: "later" }]);
      const later = (await sql<{ id: string }>`select id::text as id from steps where drv_path = ${drv("later")}`.execute(s.fdb.db)).rows[0]!.id;
      await sql`update steps set status = 'cancelled' where id = ${later}`.execute(s.fdb.db);
      assert.equal(await code(`/api/steps/${later}/log?follow=1`, 404), "FERRY_FARM_NO_LOG");
    } finally {
      await s.close();
    }
  });

  test("a retried step's log starts again: a follower goes on with the new attempt and ends once the step has finished", async () => {
    const fdb = await freshDatabase(engines, "postgres", "retry");
    const logs = createLogFollowers({ db: fdb.db, pollMs: 50 });
    try {
      await migrateFarmDatabase(fdb);
      await seedEvaluation(fdb.db, "p", "j", [{ job: "app" }]);
      const stepId = (await sql<{ id: string }>`update steps set status = 'running' returning id::text as id`.execute(fdb.db)).rows[0]!.id;
      const path = join(engines.dir(), "retry.log");
      fs.writeFileSync(path, "attempt 1: compiling\n");
      const got: string[] = [];
      const reading = (async () => {
        for await (const c of logs.read({ path, stepId, status: "running", offset: 0, follow: true }, new AbortController().signal)) got.push(Buffer.from(c).toString());
      })();
      await until("the first attempt's log", () => got.join("") === "attempt 1: compiling\n");
      fs.writeFileSync(path, ""); // what the dispatcher does when it runs the step again
      await new Promise((r) => setTimeout(r, 150));
      fs.appendFileSync(path, "attempt 2\n");
      await until("the second attempt's log", () => got.length === 2);
      assert.match(logs.metrics(), /^ferry_farm_log_followers 1$/m);
      await sql`update steps set status = 'succeeded'`.execute(fdb.db);
      fs.appendFileSync(path, "done\n");
      await reading;
      assert.equal(got.join(""), "attempt 1: compiling\nattempt 2\ndone\n");
      assert.match(logs.metrics(), /^ferry_farm_log_followers 0$/m);
    } finally {
      logs.close();
      await fdb.close();
    }
  });

  test("a coordinator that does not schedule sends log readers to the leader (307)", async () => {
    const fdb = await freshDatabase(engines, "postgres", "redirect");
    const s = await setup(fdb, join(engines.dir(), "redirect-leader"), 600);
    s.startWorker();
    // A second coordinator on the same database: it does not get the leader's lock.
    const fdbOther = await openFarmDatabase({ url: engines.pg().url.replace(/\/[^/]*$/, "/redirect") });
    const other = await startTestFarm(fdbOther, join(engines.dir(), "redirect-other"), { dispatch: {} });
    try {
      await until("the first coordinator to lead", async () => (await sql<{ url: string }>`select url from farm_leader`.execute(fdb.db)).rows[0]?.url === s.farm.c.url);
      const path = `/api/steps/${s.stepId}/log?follow=1&offset=0`;
      const r = await fetch(`${other.c.url}${path}`, { redirect: "manual" });
      assert.equal(r.status, 307);
      assert.equal(r.headers.get("location"), `${s.farm.c.url}${path}`);
      // Clients that follow redirects get the log from the leader.
      assert.equal(await (await fetch(`${other.c.url}${path}`)).text(), WHOLE);
    } finally {
      await other.close();
      await fdbOther.close();
      await s.close();
    }
  });

  test("ferry farm log --follow prints the whole log once across a dropped connection and exits 0 when the step ends", async () => {
    const s = await setup(await freshDatabase(engines, "pglite", "cli"), join(engines.dir(), "cli"), 2400);
    const proxy = await startCutter(s.farm.c.url);
    try {
      const worker = s.startWorker();
      await until("the step to start", () => worker.requests.length === 1);
      const child = spawnFerry(["farm", "log", "--farm", proxy.url, s.stepId, "--follow"]);
      let stdout = "";
      let stderr = "";
      let cut = false;
      child.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
      child.stdout!.setEncoding("utf8").on("data", (d: string) => {
        stdout += d;
        if (!cut) {
          cut = true;
          proxy.cut();
        }
      });
      const [code] = (await once(child, "close")) as [number | null];
      assert.equal(code, 0, stderr);
      assert.equal(stdout, WHOLE);
      assert.match(stderr, /the connection dropped .*; reconnecting from byte \d+ \(1\/5\)/);
      assert.equal(await stepStatus(s.farm.db, s.stepId), "succeeded");

      // Without --follow: the log as it is; an unknown step is a coded error.
      const plain = spawnFerry(["farm", "log", "--farm", s.farm.c.url, s.stepId]);
      let text = "";
      plain.stdout!.setEncoding("utf8").on("data", (d: string) => (text += d));
      assert.deepEqual(await once(plain, "close"), [0, null]);
      assert.equal(text, WHOLE);
      const unknown = spawnFerry(["farm", "log", "--farm", s.farm.c.url, "987654", "--follow"]);
      let err = "";
      unknown.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
      assert.deepEqual(await once(unknown, "close"), [1, null]);
      assert.match(err, /error \[FERRY_FARM_UNKNOWN_STEP\]/);
    } finally {
      await proxy.close();
      await s.close();
    }
  });
});

/**
 * `ferry worker` at the real seam: the built CLI, real bubblewrap builds, a real farm cache
 * (`ferry cache serve` with an upload token and a signing key) holding the derivations' closures,
 * and a scripted coordinator speaking protocol.ts over a real WebSocket on loopback.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as net from "node:net";
import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { join } from "node:path";
import { generateSecretKey, printPublicKey, printSecretKey } from "../../src/core/signing.js";
import { narInfoDistrust, parseNarInfo } from "../../src/core/narinfo.js";
import { CLOSE_UNAUTHORIZED, type Welcome } from "../../src/farm/protocol.js";
import { tempDir } from "../helpers/fs-trees.js";
import { ferry, ferryBin, ferryOk } from "../helpers/cli.js";
import { spawnCacheServer } from "../helpers/cache.js";
import { ScriptedCoordinator, type PeerConnection } from "../helpers/worker-peer.js";
import { FarmCacheClient } from "../../src/farm/worker/step.js";
import { LocalStore } from "../../src/store/local-store.js";
import { resolveStoreLocation } from "../../src/store/config.js";

const STORE_DIR = "/ferry/store";
const storeFlags = (root: string) => ["--store-dir", STORE_DIR, "--state-dir", "/ferry/var", "--root", root];
const WORKER_TOKEN = "worker-secret";
const UPLOAD_TOKEN = "upload-secret";
/** The `sleep` argument of the long build: unique, so its process can be found in /proc. */
const LONG_SLEEP = "59.7319";

const SET = `
import { derivation } from "ferry";
const sh = (name, script, deps = {}) => derivation({ name, system: "x86_64-linux", builder: "/bin/sh", args: ["-c", script], ...deps });
export const base = sh("base", "echo base > $out");
export const app = sh("app", "for i in 1 2 3 4; do echo line $i; /bin/sleep 0.25; done; /bin/cat $base > $out", { base });
export const broken = sh("broken", "echo about to fail; exit 3");
export const lonely = sh("lonely", "echo never built > $out");
export const orphan = sh("orphan", "/bin/cat $lonely > $out", { lonely });
export const hang = sh("hang", "echo hanging; /bin/sleep 30; echo > $out");
export const long = sh("long", "echo sleeping; /bin/sleep ${LONG_SLEEP}; echo late > $out");
const slowly = (tag) => sh("slow-" + tag, "echo start; /bin/sleep 1; echo done; echo " + tag + " > $out");
export const resend = slowly("resend");
export const drain = slowly("drain");
`;

interface Worker {
  readonly child: ChildProcess;
  stderr(): string;
  readonly exited: Promise<number | null>;
}

function spawnWorker(farm: string, root: string, extra: string[] = []): Worker {
  const child = spawn(process.execPath, [ferryBin, "worker", "--farm", farm, ...storeFlags(root), ...extra], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, FERRY_WORKER_TOKEN: WORKER_TOKEN },
  });
  let err = "";
  child.stderr!.setEncoding("utf8").on("data", (s: string) => (err += s));
  child.stdout!.resume();
  const exited = once(child, "exit").then(([code]) => code as number | null);
  return { child, stderr: () => err, exited };
}

/** Processes whose command line contains `marker`. */
function processesWith(marker: string): number[] {
  const pids: number[] = [];
  for (const p of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(p)) continue;
    try {
      if (fs.readFileSync(`/proc/${p}/cmdline`, "utf8").split("\0").includes(marker)) pids.push(Number(p));
    } catch {
      /* gone meanwhile */
    }
  }
  return pids;
}

async function until(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

describe("ferry worker", () => {
  let dir: string;
  let cache: Awaited<ReturnType<typeof spawnCacheServer>>;
  let coord: ScriptedCoordinator;
  let welcome: (keep?: string[]) => Welcome;
  let drvs: Record<string, { drvPath: string; outputs: Record<string, string> }>;
  const key = generateSecretKey("farm-cache-1");
  const workers: Worker[] = [];
  const start = (root: string, extra: string[] = [], farm = coord.url) => {
    const w = spawnWorker(farm, join(dir, root), extra);
    workers.push(w);
    return w;
  };

  before(async () => {
    dir = tempDir("ferry-worker-");
    fs.writeFileSync(join(dir, "sk"), printSecretKey(key));
    cache = await spawnCacheServer(["--dir", join(dir, "cache"), "--upload-token", UPLOAD_TOKEN, "--secret-key", join(dir, "sk"), "--store-dir", STORE_DIR]);
    coord = await ScriptedCoordinator.start(WORKER_TOKEN);
    welcome = (keep = []) => ({ type: "welcome", leaseMs: 10_000, heartbeatMs: 200, cache: { url: cache.url, token: UPLOAD_TOKEN, publicKey: printPublicKey(key) }, keep });
    // The coordinator's side: evaluate, build the input `base`, publish every .drv closure and base's output.
    fs.writeFileSync(join(dir, "set.ts"), SET);
    const farm = storeFlags(join(dir, "farm-store"));
    const jobs = JSON.parse(ferryOk(["eval", "--json", ...farm, join(dir, "set.ts")])) as { attr: string; drvPath: string; outputs: Record<string, string> }[];
    drvs = Object.fromEntries(jobs.map((j) => [j.attr, j]));
    ferryOk(["build", ...farm, drvs.base!.drvPath]);
    ferryOk(["copy", "--to", cache.url, "--token", UPLOAD_TOKEN, ...farm, ...jobs.map((j) => j.drvPath), drvs.base!.outputs.out!]);
  });

  after(async () => {
    for (const w of workers) if (w.child.exitCode === null && w.child.signalCode === null) w.child.kill("SIGKILL");
    await coord?.close();
    cache?.child.kill("SIGTERM");
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** A worker on its own store, connected and welcomed by the scripted coordinator. */
  const startWelcomed = async (root: string, extra: string[] = []) => {
    const n = coord.connections.length;
    const w = start(root, extra);
    const c = await coord.connection(n);
    const hello = (await c.waitFor("hello")).message;
    c.send(welcome());
    return { w, c, hello };
  };
  const build = (conn: PeerConnection, stepId: string, attr: string) => conn.send({ type: "build", stepId, drvPath: drvs[attr]!.drvPath, attempt: 1 });
  const resultOf = (conn: PeerConnection, stepId: string) => conn.waitFor("result", (r) => r.stepId === stepId, { timeoutMs: 30_000 });

  test("builds steps from the farm cache: outputs uploaded and signed, logs live, build failures vs transient ones, abort kills", async () => {
    const w = start("w1", ["--max-jobs", "5"]);
    const conn = await coord.connection(0);
    const hello = (await conn.waitFor("hello")).message;
    assert.equal(hello.maxJobs, 5);
    assert.equal(hello.speedFactor, 1);
    assert.ok(hello.systems.includes("x86_64-linux"), hello.systems.join());
    assert.deepEqual(hello.running, []);
    assert.match(hello.id, /^[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{8}$/);
    conn.send(welcome());
    const hb = (await conn.waitFor("heartbeat")).message;
    assert.ok(hb.freeDiskBytes > 0 && hb.load >= 0);

    build(conn, "s-app", "app");
    build(conn, "s-broken", "broken");
    build(conn, "s-orphan", "orphan");
    build(conn, "s-long", "long");
    conn.send({ type: "build", stepId: "s-hang", drvPath: drvs.hang!.drvPath, attempt: 2, timeoutSeconds: 1 });

    // A success: the log streamed while the build ran, then the result with the outputs.
    const app = await resultOf(conn, "s-app");
    assert.equal(app.message.status, "succeeded", app.message.error);
    assert.deepEqual(app.message.outputs, drvs.app!.outputs);
    const logs = conn.received.filter((r) => r.message.type === "log" && r.message.stepId === "s-app");
    assert.match(conn.logOf("s-app"), /^line 1\nline 2\nline 3\nline 4\n/);
    assert.ok(logs.length >= 2, "the log came in several batches");
    assert.ok(logs.every((l) => l.at <= app.at) && conn.received.indexOf(logs.at(-1)!) < conn.received.indexOf(app));
    assert.ok(app.at - logs[0]!.at >= 500, `the first lines arrived while the build ran (${app.at - logs[0]!.at} ms before the result)`);
    // The output is in the farm cache, signed by the cache's key, with its build log.
    const out = drvs.app!.outputs.out!;
    const res = await fetch(`${cache.url}/${out.slice(STORE_DIR.length + 1, STORE_DIR.length + 33)}.narinfo`);
    assert.equal(res.status, 200);
    const info = parseNarInfo(STORE_DIR, await res.text());
    assert.equal(info.storePath, out);
    assert.equal(narInfoDistrust(STORE_DIR, info, [key]), undefined);
    assert.notEqual(narInfoDistrust(STORE_DIR, info, [generateSecretKey("other-1")]), undefined);
    const log = await fetch(`${cache.url}/log/${drvs.app!.drvPath.slice(STORE_DIR.length + 1)}`);
    assert.match(await log.text(), /line 4/);

    // The builder's own failure is not transient; an input missing from the cache is.
    const broken = (await resultOf(conn, "s-broken")).message;
    assert.equal(broken.status, "failed");
    assert.notEqual(broken.transient, true);
    assert.match(broken.error!, /FERRY_BUILD_FAILED/);
    assert.match(conn.logOf("s-broken"), /about to fail/);
    const orphan = (await resultOf(conn, "s-orphan")).message;
    assert.equal(orphan.status, "failed");
    assert.equal(orphan.transient, true);
    assert.match(orphan.error!, /FERRY_WORKER_INPUT_UNAVAILABLE/);
    // timeoutSeconds is the build's limit: running past it is the build's own failure.
    const hang = (await resultOf(conn, "s-hang")).message;
    assert.equal(hang.status, "failed");
    assert.notEqual(hang.transient, true);
    assert.match(hang.error!, /FERRY_BUILD_TIMEOUT/);
    for (const id of ["s-app", "s-broken", "s-orphan", "s-hang"]) conn.send({ type: "ack", stepId: id, accepted: true });

    // abort: the sandboxed `sleep` goes at once, and no result comes.
    await conn.waitFor("log", (l) => l.stepId === "s-long" && l.data.includes("sleeping"));
    assert.ok(processesWith(LONG_SLEEP).length > 0, "the long build runs");
    const abortedAt = Date.now();
    const mark = conn.mark();
    conn.send({ type: "abort", stepId: "s-long", reason: "cancelled by a user" });
    await until("the long build to be killed", () => processesWith(LONG_SLEEP).length === 0, 5000);
    assert.ok(Date.now() - abortedAt < 3000);
    await conn.waitFor("heartbeat", (h) => h.running.length === 0, { after: mark });
    await until("the abort to be reported", () => /stopped long: cancelled by a user/.test(w.stderr()), 5000);
    assert.equal(conn.of("result").filter((r) => r.stepId === "s-long").length, 0);
    assert.match(w.stderr(), /built app in \d+\.\d s/);
    assert.deepEqual(conn.protocolErrors, []);

    // Nothing held: SIGTERM drains at once and exits 0.
    w.child.kill("SIGTERM");
    await conn.waitFor("drain");
    assert.equal(await w.exited, 0, w.stderr());
  });

  test("a lost connection neither fails nor restarts the build; the result is resent until acknowledged", async () => {
    const first = coord.connections.length;
    const { w, c: c1, hello: hello1 } = await startWelcomed("w2");
    build(c1, "s-resend", "resend");
    await c1.waitFor("log", (l) => l.data.includes("start"));
    c1.terminate();

    const c2 = await coord.connection(first + 1);
    const hello2 = (await c2.waitFor("hello")).message;
    assert.equal(hello2.id, hello1.id);
    assert.deepEqual(hello2.running, ["s-resend"]);
    c2.send(welcome(["s-resend"]));
    const r2 = (await resultOf(c2, "s-resend")).message;
    assert.equal(r2.status, "succeeded", r2.error);
    c2.terminate(); // before acknowledging

    const c3 = await coord.connection(first + 2);
    assert.deepEqual((await c3.waitFor("hello")).message.running, ["s-resend"]);
    c3.send(welcome(["s-resend"]));
    assert.deepEqual((await resultOf(c3, "s-resend")).message, r2);

    // Still unacknowledged when the worker is killed: the restarted worker delivers it.
    w.child.kill("SIGKILL");
    await w.exited;
    const again = start("w2");
    const c4 = await coord.connection(first + 3);
    const hello4 = (await c4.waitFor("hello")).message;
    assert.equal(hello4.id, hello1.id);
    assert.deepEqual(hello4.running, ["s-resend"]);
    c4.send(welcome(["s-resend"]));
    assert.deepEqual((await resultOf(c4, "s-resend")).message, r2);
    const acked = c4.mark();
    c4.send({ type: "ack", stepId: "s-resend", accepted: true });
    await c4.waitFor("heartbeat", (h) => h.running.length === 0, { after: acked });

    // Built once: one "start" in the streamed log, one "building" line.
    const streamed = [c1, c2, c3, c4].map((c) => c.logOf("s-resend")).join("");
    assert.equal(streamed.match(/start/g)?.length, 1, streamed);
    assert.match(streamed, /done/);
    assert.equal(w.stderr().match(/building slow-resend/g)?.length, 1, w.stderr());
    assert.doesNotMatch(again.stderr(), /building/);
    assert.match(w.stderr(), /lost the connection .*\(the connection dropped\); running builds continue/);
    assert.match(w.stderr(), /reconnected to .* \(1 running step kept\)/);
    assert.match(again.stderr(), /connected to .* \(1 running step kept, 1 result sent again\)/);
    // The coordinator drains the idle worker: it exits 0.
    c4.send({ type: "drain" });
    assert.equal(await again.exited, 0, again.stderr());
    for (const c of [c1, c2, c3, c4]) assert.deepEqual(c.protocolErrors, []);
  });

  test("SIGTERM drains: drain is sent, new steps are refused, the running one finishes and is delivered, then exit 0", async () => {
    const { w, c } = await startWelcomed("w3");
    build(c, "s-drain", "drain");
    await c.waitFor("log", (l) => l.data.includes("start"));
    w.child.kill("SIGTERM");
    await c.waitFor("drain");
    build(c, "s-late", "app");
    const late = (await resultOf(c, "s-late")).message;
    assert.equal(late.status, "failed");
    assert.equal(late.transient, true);
    assert.match(late.error!, /draining/);
    c.send({ type: "ack", stepId: "s-late", accepted: true });
    const r = (await resultOf(c, "s-drain")).message;
    assert.equal(r.status, "succeeded", r.error);
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(w.child.exitCode, null, "it waits for the acknowledgement");
    c.send({ type: "ack", stepId: "s-drain", accepted: true });
    assert.equal(await w.exited, 0, w.stderr());
    assert.match(w.stderr(), /draining: taking no new builds, finishing 1 running/);
    assert.match(w.stderr(), /drained; exiting/);

    // A second signal stops at once: the build is killed, no result is sent.
    const { w: w2, c: c2 } = await startWelcomed("w6");
    build(c2, "s-long-2", "long");
    await c2.waitFor("log", (l) => l.data.includes("sleeping"));
    w2.child.kill("SIGTERM");
    await c2.waitFor("drain");
    const t0 = Date.now();
    w2.child.kill("SIGTERM");
    assert.equal(await w2.exited, 130, w2.stderr());
    assert.ok(Date.now() - t0 < 3000);
    assert.deepEqual(processesWith(LONG_SLEEP), []);
    assert.deepEqual(c2.of("result"), []);
    assert.match(w2.stderr(), /stopping now; running builds are killed/);
  });

  test("redirect is followed; a refused token stops the worker with a coded error; the id survives restarts", async () => {
    const first = coord.connections.length;
    const w = start("w1");
    const c0 = await coord.connection(first);
    await c0.waitFor("hello");
    c0.send({ type: "redirect", url: `${coord.url}/` });
    // Closed with 4001 after hello.
    const c = await coord.connection(first + 1);
    const hello = (await c.waitFor("hello")).message;
    assert.equal(hello.id, coord.connections[0]!.of("hello")[0]!.id, "the id generated by the first run of this store");
    c.close(CLOSE_UNAUTHORIZED, "bad token");
    assert.equal(await w.exited, 1);
    assert.match(w.stderr(), /redirected to ws:\/\/127\.0\.0\.1:\d+\/api\/worker/);
    assert.match(w.stderr(), /error \[FERRY_WORKER_UNAUTHORIZED\]/);
    assert.match(w.stderr(), /hint: /);
    // Refused at the upgrade (HTTP 401).
    const w2 = start("w4", ["--token", "wrong"]);
    assert.equal(await w2.exited, 1);
    assert.match(w2.stderr(), /FERRY_WORKER_UNAUTHORIZED.*HTTP 401/);
  });

  test("an unreachable farm is retried (it is a daemon); bad settings are refused at once with codes", async () => {
    const port = await new Promise<number>((resolve) => {
      const srv = net.createServer().listen(0, "127.0.0.1", () => {
        const p = (srv.address() as net.AddressInfo).port;
        srv.close(() => resolve(p));
      });
    });
    const w = start("w5", [], `http://127.0.0.1:${port}`);
    await until("a retry message", () => /cannot reach the farm yet; trying again in \d+\.\d s \(.*ECONNREFUSED/.test(w.stderr()));
    w.child.kill("SIGTERM");
    assert.equal(await w.exited, 0, w.stderr());

    const bad = (args: string[], code: string) => {
      const r = ferry(["worker", "--token", "t", ...storeFlags(join(dir, "bad")), ...args]);
      assert.equal(r.status, 1, r.stderr);
      assert.match(r.stderr, new RegExp(`error \\[${code}\\]`));
      assert.match(r.stderr, /hint: /);
    };
    bad(["--farm", "farm.example.org"], "FERRY_WORKER_BAD_FARM_URL");
    bad(["--farm", "ftp://farm.example.org"], "FERRY_WORKER_BAD_FARM_URL");
    bad(["--farm", "http://x", "--max-jobs", "0"], "FERRY_WORKER_BAD_MAX_JOBS");
    bad(["--farm", "http://x", "--max-jobs", "two"], "FERRY_WORKER_BAD_MAX_JOBS");
    bad(["--farm", "http://x", "--speed-factor", "-1"], "FERRY_WORKER_BAD_SPEED_FACTOR");
    bad(["--farm", "http://x", "--id", "no spaces"], "FERRY_WORKER_BAD_SETTING");
    const noToken = ferry(["worker", "--farm", "http://x", ...storeFlags(join(dir, "bad"))], { env: { FERRY_WORKER_TOKEN: "" } });
    assert.match(noToken.stderr, /FERRY_WORKER_NO_TOKEN/);
  });
});

describe("the worker's farm cache client", () => {
  test("an opening is shared by steps; what it knows the cache holds does not carry over to another cache", async () => {
    const dir = tempDir("ferry-farm-cache-client-");
    const store = LocalStore.open(resolveStoreLocation({ storeDir: "/ferry/store", stateDir: "/ferry/var", root: join(dir, "store") }));
    try {
      const client = new FarmCacheClient();
      const a = { url: `file://${join(dir, "a")}` };
      fs.mkdirSync(join(dir, "a"));
      fs.writeFileSync(join(dir, "a", "nix-cache-info"), "StoreDir: /ferry/store\n");
      const s1 = await client.open(store, a);
      const s2 = await client.open(store, a);
      assert.equal(s1.substituter, s2.substituter, "one opening for both steps");
      s1.remember(["/ferry/store/00000000000000000000000000000000-x"]);
      assert.ok(s2.holds("/ferry/store/00000000000000000000000000000000-x"));
      assert.ok(!s2.holds("/ferry/store/11111111111111111111111111111111-y"));
      // The welcome names another cache: a new opening, knowing nothing yet; late news about the old one stays with it.
      const b = { url: `file://${join(dir, "b")}` };
      fs.mkdirSync(join(dir, "b"));
      fs.writeFileSync(join(dir, "b", "nix-cache-info"), "StoreDir: /ferry/store\n");
      const s3 = await client.open(store, b);
      assert.notEqual(s3.substituter, s1.substituter);
      s1.remember(["/ferry/store/22222222222222222222222222222222-z"]);
      assert.ok(!s3.holds("/ferry/store/00000000000000000000000000000000-x"));
      assert.ok(!s3.holds("/ferry/store/22222222222222222222222222222222-z"));
      for (const s of [s1, s2, s3]) s.release();
      // A cache that cannot be opened (here: for another store dir) fails the step, and the next step tries again.
      const c = { url: `file://${join(dir, "c")}` };
      fs.mkdirSync(join(dir, "c"));
      fs.writeFileSync(join(dir, "c", "nix-cache-info"), "StoreDir: /nix/store\n");
      await assert.rejects(client.open(store, c), (e: unknown) => (e as { code?: string }).code === "FERRY_CACHE_STORE_DIR_MISMATCH");
      fs.writeFileSync(join(dir, "c", "nix-cache-info"), "StoreDir: /ferry/store\n");
      const s4 = await client.open(store, c);
      s4.release();
      await client.close();
    } finally {
      store.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

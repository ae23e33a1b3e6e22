/** The worker's pure decisions: backoff, dialling address, welcome plans, the outbox, log batches, blame. */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import {
  checkIdentity,
  DISK_FULL_BYTES,
  farmSocketUrls,
  generatedWorkerId,
  helloOf,
  isTransientFailure,
  LogBuffer,
  nextDial,
  Outbox,
  planWelcome,
  reconnectDelay,
  workerSocketUrl,
  type WorkerIdentity,
} from "../../src/farm/worker/policy.js";
import { parseWorkerMessage, type Result } from "../../src/farm/protocol.js";
import { throwsFerry } from "../helpers/errors.js";

const identity: WorkerIdentity = { id: "builder-1", systems: ["x86_64-linux"], features: [], mandatoryFeatures: [], maxJobs: 2, speedFactor: 1 };

describe("worker policy", () => {
  test("reconnect delays double from 0.5 s to a 30 s cap, jittered within the upper half", () => {
    assert.equal(reconnectDelay(1, 0), 250);
    assert.equal(reconnectDelay(1, 0.999999), 500);
    assert.equal(reconnectDelay(2, 1), 1000);
    assert.equal(reconnectDelay(4, 1), 4000);
    for (const failures of [7, 8, 50, 10_000]) {
      assert.equal(reconnectDelay(failures, 1), 30_000);
      assert.equal(reconnectDelay(failures, 0), 15_000);
    }
    assert.equal(reconnectDelay(3, 0.5, { initialMs: 100, maxMs: 1000 }), 300);
  });

  test("farm URLs map to the worker endpoint; anything else is a coded error", () => {
    assert.equal(workerSocketUrl("http://farm:8090"), "ws://farm:8090/api/worker");
    assert.equal(workerSocketUrl("https://farm.example.org/"), "wss://farm.example.org/api/worker");
    assert.equal(workerSocketUrl("https://example.org/ferry/?x=1#y"), "wss://example.org/ferry/api/worker");
    assert.equal(workerSocketUrl("ws://[::1]:1"), "ws://[::1]:1/api/worker");
    for (const bad of ["farm:8090", "ftp://farm", "", "http://user:pw@farm", "/local/path"]) throwsFerry(() => workerSocketUrl(bad), "FERRY_WORKER_BAD_FARM_URL");
  });

  test("several farm URLs (comma-separated) are tried in turn: a failed one hands over to the next at once, a failed round backs off", () => {
    assert.deepEqual(farmSocketUrls("http://a:1,http://b:2"), ["ws://a:1/api/worker", "ws://b:2/api/worker"]);
    assert.deepEqual(farmSocketUrls([" http://a:1 ", "http://b:2, http://c:3"]), ["ws://a:1/api/worker", "ws://b:2/api/worker", "ws://c:3/api/worker"]);
    for (const bad of [",", "", "http://a:1,ftp://b"]) throwsFerry(() => farmSocketUrls(bad), "FERRY_WORKER_BAD_FARM_URL");
    // Three URLs: 0 fails → 1 at once → 2 at once → back to 0 after a backoff.
    assert.deepEqual(nextDial(0, 0, 3, false), { at: 1, tried: 1, backoff: false });
    assert.deepEqual(nextDial(1, 1, 3, false), { at: 2, tried: 2, backoff: false });
    assert.deepEqual(nextDial(2, 2, 3, false), { at: 0, tried: 0, backoff: true });
    // One URL: every failure backs off. A redirect target that failed: back to the URL that redirected.
    assert.deepEqual(nextDial(0, 0, 1, false), { at: 0, tried: 0, backoff: true });
    assert.deepEqual(nextDial(1, 0, 2, true), { at: 1, tried: 0, backoff: true });
  });

  test("a welcome stops the builds whose lease is gone, resends kept results and drops the others", () => {
    assert.deepEqual(planWelcome(["a", "b"], ["c", "d"], ["b", "c", "zzz"]), { abort: ["a"], resend: ["c"], forget: ["d"] });
    assert.deepEqual(planWelcome([], [], []), { abort: [], resend: [], forget: [] });
  });

  test("the outbox keeps one result per step in order and survives a JSON round trip; damaged entries are skipped", () => {
    const r = (stepId: string, status: Result["status"] = "succeeded"): Result => ({ type: "result", stepId, status, durationMs: 5, ...(status === "succeeded" ? { outputs: { out: "/ferry/store/x" } } : { error: "e", transient: true }) });
    const o = new Outbox();
    o.put(r("a"));
    o.put(r("b", "failed"));
    o.put(r("a", "failed"));
    assert.deepEqual(o.ids(), ["b", "a"]);
    assert.equal(o.get("a")!.status, "failed");
    const back = Outbox.fromJSON(JSON.parse(JSON.stringify([...o.toJSON(), { type: "result", stepId: 3 }, "junk", null])));
    assert.deepEqual(back.toJSON(), o.toJSON());
    assert.equal(back.delete("a"), true);
    assert.equal(back.delete("a"), false);
    assert.equal(back.size, 1);
    assert.equal(Outbox.fromJSON({ not: "a list" }).size, 0);
  });

  test("log batches are whole lines, bounded, and say when text was dropped", () => {
    const b = new LogBuffer(100);
    assert.equal(b.take(), undefined);
    b.push("one");
    b.push("two");
    assert.equal(b.size, 8);
    assert.equal(b.take(), "one\ntwo\n");
    assert.equal(b.pending, false);
    for (let i = 0; i < 30; i++) b.push(`line ${i}`);
    assert.ok(b.size <= 100);
    const first = b.take(20)!;
    assert.match(first, /^\[ferry worker: \d+ characters of log were not streamed/);
    assert.ok(first.endsWith("line 0\n"), "at least one line per batch, even past the chunk size");
    let rest = "";
    for (let t = b.take(20); t !== undefined; t = b.take(20)) rest += t;
    assert.equal(first.split("\n").slice(1).join("\n") + rest, Array.from({ length: 13 }, (_, i) => `line ${i}\n`).join(""));
  });

  test("only the build's own failures are final, unless the disk is full", () => {
    const plenty = 10 * DISK_FULL_BYTES;
    for (const code of ["FERRY_BUILD_FAILED", "FERRY_BUILD_TIMEOUT", "FERRY_BUILD_HASH_MISMATCH", "FERRY_BUILD_NO_OUTPUT"]) assert.equal(isTransientFailure(code, plenty), false, code);
    for (const code of ["FERRY_WORKER_INPUT_UNAVAILABLE", "FERRY_CACHE_UNREACHABLE", "FERRY_BUILD_NO_SANDBOX", "FERRY_BUILD_WRONG_SYSTEM", "FERRY_IO"]) assert.equal(isTransientFailure(code, plenty), true, code);
    assert.equal(isTransientFailure("FERRY_BUILD_FAILED", DISK_FULL_BYTES - 1), true);
  });

  test("identities are checked as the coordinator will check them; generated ids pass", () => {
    assert.doesNotThrow(() => parseWorkerMessage(JSON.stringify(helloOf(checkIdentity(identity), ["s1"]))));
    throwsFerry(() => checkIdentity({ ...identity, id: "has space" }), "FERRY_WORKER_BAD_SETTING", /letters, digits/);
    throwsFerry(() => checkIdentity({ ...identity, systems: [] }), "FERRY_WORKER_BAD_SETTING");
    throwsFerry(() => checkIdentity({ ...identity, maxJobs: 1.5 }), "FERRY_WORKER_BAD_SETTING");
    for (const host of ["vm-1", "Ünïcode host.local", "-leading", "", "x".repeat(300)]) {
      const id = generatedWorkerId(host, "0123abcdef");
      assert.doesNotThrow(() => checkIdentity({ ...identity, id }), id);
      assert.match(id, /-0123abcd$/);
    }
  });
});

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { Scheduler, type StepSpec, type StepState } from "../../src/farm/scheduler/index.js";
import { throwsFerry } from "../helpers/errors.js";

const X86 = "x86_64-linux";
const ARM = "aarch64-linux";

function step(id: string, deps: string[] = [], more: Partial<StepSpec> = {}): StepSpec {
  return { id, name: more.name ?? id, system: X86, deps, ...more };
}

/** Adds steps and asserts every item was accepted. */
function add(s: Scheduler, specs: StepSpec[], now = 0): void {
  for (const r of s.addSteps(specs, now)) assert.ok(r.ok, `step ${r.id} rejected: ${r.ok ? "" : r.error.message}`);
}

/** Picks on `machine` one at a time, finishing each pick immediately; returns the order. */
function drainOrder(s: Scheduler, machine: string, now = 0): string[] {
  const order: string[] = [];
  for (let a = s.pick(machine, now); a; a = s.pick(machine, now)) {
    order.push(a.stepId);
    s.finish(a.stepId, { kind: "succeeded" }, now);
  }
  return order;
}

describe("farm scheduler: ordering", () => {
  test("age breaks ties: older steps first", () => {
    const s = new Scheduler();
    s.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    add(s, [step("young", [], { createdAt: 20 }), step("old", [], { createdAt: 10 })], 30);
    assert.deepEqual(drainOrder(s, "m", 30), ["old", "young"]);
  });

  test("critical path (weighted by estimates) beats age", () => {
    const s = new Scheduler({ durations: [["short", 10], ["long", 1000], ["leaf", 10]] });
    s.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    add(s, [
      step("a", [], { name: "short", createdAt: 1 }),
      step("b", [], { name: "short", createdAt: 2 }),
      step("c", ["b"], { name: "long", createdAt: 2 }),
    ]);
    assert.equal(s.step("a").criticalPath, 10);
    assert.equal(s.step("b").criticalPath, 1010);
    const first = s.pick("m", 0);
    assert.equal(first?.stepId, "b");
  });

  test("fair share beats critical path; bump beats fair share", () => {
    const s = new Scheduler({ durations: [["x", 10]] });
    s.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    // The jobset "big" has used 100 s of build time; "small" none.
    add(s, [step("warm", [], { jobsets: ["big"] })]);
    assert.equal(s.pick("m", 0)?.stepId, "warm");
    s.finish("warm", { kind: "succeeded" }, 100_000);
    assert.equal(s.shareUsed("big", 100_000), 1000);
    add(s, [
      step("bigDeep", [], { name: "x", jobsets: ["big"] }),
      step("bigDeep2", ["bigDeep"], { name: "x", jobsets: ["big"] }),
      step("smallShallow", [], { name: "x", jobsets: ["small"] }),
    ], 100_000);
    assert.ok(s.step("bigDeep").criticalPath > s.step("smallShallow").criticalPath);
    assert.equal(s.pick("m", 100_000)?.stepId, "smallShallow");
    s.finish("smallShallow", { kind: "succeeded" }, 100_001);

    add(s, [step("smallAgain", [], { name: "x", jobsets: ["small"] })], 100_001);
    // small used 1 ms, big 100 s: small first, unless big's step is bumped.
    const [r] = s.bump(["bigDeep"], 5, 100_001);
    assert.ok(r?.ok);
    assert.equal(s.pick("m", 100_001)?.stepId, "bigDeep");
  });

  test("a step wanted by several jobsets ranks by the least-used of them", () => {
    const s = new Scheduler();
    s.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    add(s, [step("w1", [], { jobsets: ["a"] }), step("w2", [], { jobsets: ["b"] })]);
    s.pick("m", 0);
    s.finish("w1", { kind: "succeeded" }, 50);
    s.pick("m", 50);
    s.finish("w2", { kind: "succeeded" }, 250); // a used 50, b used 200
    add(s, [step("onlyB", [], { jobsets: ["b"], createdAt: 0 }), step("aAndB", [], { jobsets: ["b", "a"], createdAt: 5 }), step("c", [], { jobsets: ["c"], createdAt: 9 })], 250);
    assert.deepEqual(drainOrder(s, "m", 250), ["c", "aAndB", "onlyB"]);
  });

  test("scheduling shares scale the share used", () => {
    const s = new Scheduler();
    s.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    s.setShares("heavy", 1000);
    add(s, [step("h0", [], { jobsets: ["heavy"] }), step("l0", [], { jobsets: ["light"] })]);
    for (const id of ["h0", "l0"]) {
      const a = s.pick("m", 0)!;
      assert.equal(a.stepId, id);
      s.finish(id, { kind: "succeeded" }, 100);
    }
    // Both used 100 ms, but heavy has ten times the shares: heavy first.
    add(s, [step("l1", [], { jobsets: ["light"], createdAt: 0 }), step("h1", [], { jobsets: ["heavy"], createdAt: 1 })], 100);
    assert.equal(s.pick("m", 100)?.stepId, "h1");
    throwsFerry(() => s.setShares("x", 0), "FERRY_FARM_BAD_SHARES");
  });

  test("build time leaves the share window", () => {
    const s = new Scheduler({ shareWindowMs: 1000 });
    s.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    add(s, [step("a", [], { jobsets: ["j"] })]);
    s.pick("m", 0);
    s.finish("a", { kind: "succeeded" }, 300);
    assert.equal(s.shareUsed("j", 500), 3);
    assert.equal(s.shareUsed("j", 1300), 0);
  });

  test("fifo ordering ignores bump, share and critical path", () => {
    const s = new Scheduler({ ordering: "fifo", durations: [["long", 1000]] });
    s.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    add(s, [step("first", [], { createdAt: 1 }), step("deep", [], { createdAt: 2 }), step("tail", ["deep"], { name: "long", createdAt: 2, bump: 10 })]);
    assert.deepEqual(drainOrder(s, "m"), ["first", "deep", "tail"]);
  });
});

describe("farm scheduler: queues and machines", () => {
  test("a machine only gets steps of its systems", () => {
    const s = new Scheduler();
    s.addMachine({ id: "x", systems: [X86], maxJobs: 4 });
    add(s, [step("arm", [], { system: ARM }), step("intel")]);
    assert.deepEqual(s.dispatch(0), [{ stepId: "intel", machineId: "x" }]);
    assert.equal(s.pick("x", 0), undefined);
    assert.equal(s.step("arm").state, "runnable");
    s.addMachine({ id: "a", systems: [ARM], maxJobs: 1 });
    assert.deepEqual(s.dispatch(0), [{ stepId: "arm", machineId: "a" }]);
    const qs = s.queues().map((q) => `${q.system}:${q.runnable}:${q.machines.join(",")}`).sort();
    assert.deepEqual(qs, [`${ARM}:0:a`, `${X86}:0:x`]);
  });

  test("required, supported and mandatory features", () => {
    const s = new Scheduler();
    s.addMachine({ id: "plain", systems: [X86], maxJobs: 10 });
    s.addMachine({ id: "big", systems: [X86], maxJobs: 10, mandatoryFeatures: ["big-parallel"], supportedFeatures: ["kvm"] });
    add(s, [
      step("p"),
      step("bp", [], { requiredFeatures: ["big-parallel"] }),
      step("bpk", [], { requiredFeatures: ["kvm", "big-parallel"] }),
      step("k", [], { requiredFeatures: ["kvm"] }),
    ]);
    const got = Object.fromEntries(s.dispatch(0).map((a) => [a.stepId, a.machineId]));
    // "k" needs kvm, which only "big" supports, but "big" takes only big-parallel steps.
    assert.deepEqual(got, { p: "plain", bp: "big", bpk: "big" });
    assert.equal(s.step("k").state, "runnable");
    assert.equal(s.machine("big").supportedFeatures.includes("big-parallel"), true);
  });

  test("max jobs is honoured and faster, less loaded machines are preferred", () => {
    const s = new Scheduler({ holdForFasterMachines: false });
    s.addMachine({ id: "slow", systems: [X86], maxJobs: 2, speedFactor: 1 });
    s.addMachine({ id: "fast", systems: [X86], maxJobs: 2, speedFactor: 3 });
    add(s, Array.from({ length: 10 }, (_, i) => step(`s${i}`, [], { createdAt: i })));
    const as = s.dispatch(0);
    assert.equal(as.length, 4);
    assert.deepEqual(as.map((a) => a.machineId), ["fast", "fast", "slow", "slow"]);
    assert.deepEqual(as.map((a) => a.stepId), ["s0", "s1", "s2", "s3"]);
    assert.equal(s.pick("fast", 0), undefined);
    assert.deepEqual(s.dispatch(0), []);
    s.finish("s2", { kind: "succeeded" }, 5);
    assert.deepEqual(s.dispatch(5), [{ stepId: "s4", machineId: "slow" }]);
    // Equal speed: the less loaded machine gets the step.
    s.addMachine({ id: "fast2", systems: [X86], maxJobs: 4, speedFactor: 3 });
    s.finish("s0", { kind: "succeeded" }, 6);
    const [a, b] = s.dispatch(6);
    assert.equal(a?.machineId, "fast2");
    assert.equal(b?.machineId, "fast2");
  });

  test("a step whose chain ends sooner on a busy faster machine waits for it", () => {
    const s = new Scheduler({ durations: [["long", 3000], ["short", 10]] });
    s.addMachine({ id: "fast", systems: [X86], maxJobs: 1, speedFactor: 3 });
    add(s, [step("busy", [], { name: "short" })]);
    assert.deepEqual(s.dispatch(0), [{ stepId: "busy", machineId: "fast" }]);
    s.addMachine({ id: "slow", systems: [X86], maxJobs: 2, speedFactor: 1 });
    add(s, [step("crit", [], { name: "long", createdAt: 0 }), step("leaf", [], { name: "short", createdAt: 1 })], 1);
    // "crit" would take 3000 on slow but ~1003 on fast, which frees in ~3: it waits; "leaf" takes the slow slot.
    assert.deepEqual(s.dispatch(1), [{ stepId: "leaf", machineId: "slow" }]);
    assert.equal(s.step("crit").state, "runnable");
    assert.equal(s.pick("slow", 1), undefined);
    s.finish("busy", { kind: "succeeded" }, 4);
    assert.deepEqual(s.dispatch(4), [{ stepId: "crit", machineId: "fast" }]);
    // Without holding, the slow machine would have taken it.
    const t = new Scheduler({ durations: [["long", 3000], ["short", 10]], holdForFasterMachines: false });
    t.addMachine({ id: "fast", systems: [X86], maxJobs: 1, speedFactor: 3 });
    add(t, [step("busy", [], { name: "short" })]);
    t.dispatch(0);
    t.addMachine({ id: "slow", systems: [X86], maxJobs: 2, speedFactor: 1 });
    add(t, [step("crit", [], { name: "long", createdAt: 0 })], 1);
    assert.deepEqual(t.dispatch(1), [{ stepId: "crit", machineId: "slow" }]);
  });

  test("a machine that leaves hands its running steps back, without counting an attempt", () => {
    const s = new Scheduler();
    s.addMachine({ id: "m1", systems: [X86], maxJobs: 1 });
    add(s, [step("a")]);
    s.dispatch(0);
    assert.deepEqual(s.removeMachine("m1", 10), ["a"]);
    assert.equal(s.step("a").state, "runnable");
    assert.equal(s.step("a").failedAttempts, 0);
    s.addMachine({ id: "m2", systems: [X86], maxJobs: 1 });
    assert.deepEqual(s.dispatch(10), [{ stepId: "a", machineId: "m2" }]);
    throwsFerry(() => s.removeMachine("m1", 10), "FERRY_FARM_UNKNOWN_MACHINE");
    throwsFerry(() => s.pick("nope", 10), "FERRY_FARM_UNKNOWN_MACHINE");
    throwsFerry(() => s.addMachine({ id: "m2", systems: [X86], maxJobs: 1 }), "FERRY_FARM_DUPLICATE_MACHINE");
    throwsFerry(() => s.addMachine({ id: "m3", systems: [X86], maxJobs: 1.5 }), "FERRY_FARM_BAD_MACHINE");
  });

  test("restoring a lease, a machine that goes away and comes back, and a requeue after its lease expired", () => {
    const s = new Scheduler();
    add(s, [step("a"), step("b", ["a"]), step("c")]);
    // A coordinator restarting finds "a" leased to m1, which has not said hello yet.
    s.addMachine({ id: "m1", systems: [X86], maxJobs: 0 });
    const r = s.assignTo("a", "m1", 5, 10);
    assert.ok(r.ok);
    assert.equal(s.step("a").state, "running");
    assert.equal(s.step("a").startedAt, 5);
    assert.deepEqual(s.dispatch(10), [], "a machine with max jobs 0 takes nothing new");
    const again = s.assignTo("c", "nope", 10, 10);
    assert.equal(again.ok ? "" : again.error.code, "FERRY_FARM_UNKNOWN_MACHINE");
    const notRunnable = s.assignTo("b", "m1", 10, 10);
    assert.equal(notRunnable.ok ? "" : notRunnable.error.code, "FERRY_FARM_STEP_NOT_RUNNABLE");
    // m1 says hello with two slots: it keeps "a" and takes "c".
    s.updateMachine({ id: "m1", systems: [X86], maxJobs: 2 });
    assert.deepEqual(s.dispatch(11), [{ stepId: "c", machineId: "m1" }]);
    // m1 vanishes (max jobs 0); its lease on "a" expires and "a" goes elsewhere, no attempt counted.
    s.updateMachine({ id: "m1", systems: [X86], maxJobs: 0 });
    const q = s.requeue(["a", "b"], 20);
    assert.deepEqual(q.map((x) => (x.ok ? x.value : x.error.code)), ["m1", "FERRY_FARM_STEP_NOT_RUNNING"]);
    assert.equal(s.step("a").failedAttempts, 0);
    s.addMachine({ id: "m2", systems: [X86, ARM], maxJobs: 1 });
    assert.deepEqual(s.dispatch(20), [{ stepId: "a", machineId: "m2" }]);
    // A machine that changes its systems leaves the queues it no longer serves.
    s.updateMachine({ id: "m2", systems: [ARM], maxJobs: 1 });
    assert.deepEqual(s.queues().find((x) => x.system === X86)!.machines, ["m1"]);
    throwsFerry(() => s.updateMachine({ id: "zz", systems: [X86], maxJobs: 1 }), "FERRY_FARM_UNKNOWN_MACHINE");
    throwsFerry(() => s.updateMachine({ id: "m2", systems: [], maxJobs: 1 }), "FERRY_FARM_BAD_MACHINE");
  });
});

describe("farm scheduler: dependencies and estimates", () => {
  test("a step is runnable once all its dependencies succeeded", () => {
    const s = new Scheduler();
    s.addMachine({ id: "m", systems: [X86], maxJobs: 4 });
    add(s, [step("c", ["a", "b"]), step("a"), step("b")]);
    assert.equal(s.step("c").state, "waiting");
    assert.deepEqual(s.dispatch(0).map((x) => x.stepId).sort(), ["a", "b"]);
    assert.deepEqual(s.finish("a", { kind: "succeeded" }, 1).released, []);
    assert.deepEqual(s.finish("b", { kind: "succeeded" }, 2).released, ["c"]);
    assert.equal(s.step("c").state, "runnable");
    assert.equal(s.step("c").runnableSince, 2, "its wait starts when its last dependency succeeds");
    assert.equal(s.step("a").runnableSince, 0);
    // A later batch may depend on finished steps.
    add(s, [step("d", ["a"])], 3);
    assert.equal(s.step("d").state, "runnable");
  });

  test("estimates come from measured durations, scaled by machine speed", () => {
    const s = new Scheduler();
    s.addMachine({ id: "fast", systems: [X86], maxJobs: 1, speedFactor: 2 });
    assert.equal(s.estimate("gcc"), 1);
    add(s, [step("gcc-1", [], { name: "gcc" })]);
    s.dispatch(0);
    s.finish("gcc-1", { kind: "succeeded" }, 10_000);
    assert.equal(s.estimate("gcc"), 20_000);
    add(s, [step("gcc-2", [], { name: "gcc" }), step("hello-2", ["gcc-2"], { name: "hello" })], 10_000);
    assert.equal(s.step("gcc-2").estimate, 20_000);
    // Unknown names fall back to a high quantile of the measured ones (only one here).
    assert.equal(s.step("hello-2").estimate, 20_000);
    assert.equal(s.step("gcc-2").criticalPath, 40_000);
  });

  test("a never-measured package is assumed long: the 99th percentile of the measured durations", () => {
    // 1..1000 s measured: p99 is 990 s and the median 501 s (nearest rank), where the mean would be 500.5 s.
    const durations = Array.from({ length: 1000 }, (_, i) => [`p${i}`, (i + 1) * 1000] as const);
    const s = new Scheduler({ durations });
    assert.equal(s.estimate("new"), 990_000);
    assert.equal(new Scheduler({ durations, unknownEstimateQuantile: 0.5 }).estimate("new"), 501_000);
    // It follows new measurements once they are more than 1% of the known ones.
    for (let i = 0; i < 30; i++) s.recordDuration(`big${i}`, 5_000_000);
    assert.equal(s.estimate("new"), 5_000_000);
    // A new package that starts a short chain goes before a known one of medium length.
    const t = new Scheduler({ durations: [...durations, ["mid", 400_000]] });
    t.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    add(t, [step("known", [], { name: "mid" }), step("unknown", [], { name: "brand-new" })]);
    assert.deepEqual(t.dispatch(0).map((a) => a.stepId), ["unknown"]);
    throwsFerry(() => new Scheduler({ unknownEstimateQuantile: 1.5 }), "FERRY_FARM_BAD_OPTION");
  });

  test("succeeded steps can be forgotten; the rest of the graph carries on without them", () => {
    const s = new Scheduler();
    s.addMachine({ id: "m", systems: [X86], maxJobs: 2 });
    add(s, [step("a"), step("b", ["a"]), step("c", ["a", "b"]), step("x")]);
    assert.deepEqual(s.dispatch(0).map((a) => a.stepId).sort(), ["a", "x"]);
    s.finish("a", { kind: "succeeded" }, 1);
    s.finish("x", { kind: "permanent-failure" }, 1);
    const r = s.forget(["a", "x", "b", "nope"]);
    assert.deepEqual(r.map((i) => (i.ok ? "ok" : i.error.code)), ["ok", "FERRY_FARM_STEP_NOT_SUCCEEDED", "FERRY_FARM_STEP_NOT_SUCCEEDED", "FERRY_FARM_UNKNOWN_STEP"]);
    assert.equal(s.hasStep("a"), false);
    assert.equal(s.counts().succeeded, 0);
    // b and c still run in order; a later batch depends on c, not on the forgotten a.
    assert.deepEqual(s.dispatch(2).map((a) => a.stepId), ["b"]);
    add(s, [step("d", ["c"])], 3);
    assert.equal(s.step("b").criticalPath, 3);
    s.finish("b", { kind: "succeeded" }, 4);
    s.forget(["b"]);
    assert.deepEqual(s.dispatch(5).map((a) => a.stepId), ["c"]);
    s.finish("c", { kind: "succeeded" }, 6);
    assert.equal(s.step("d").state, "runnable");
    // The failure stays and can be restarted.
    assert.deepEqual(s.restart(["x"], 7).map((i) => i.ok), [true]);
    assert.equal(s.step("x").state, "runnable");
  });

  test("without measurements the critical path is the depth", () => {
    const s = new Scheduler();
    add(s, [step("a"), step("b", ["a"]), step("c", ["b"]), step("d", ["a"])]);
    assert.deepEqual(["a", "b", "c", "d"].map((id) => s.step(id).criticalPath), [3, 2, 1, 1]);
    const t = new Scheduler({ defaultEstimateMs: 7 });
    add(t, [step("a"), step("b", ["a"])]);
    assert.equal(t.step("a").criticalPath, 14);
  });

  test("critical paths of known steps grow when a later batch depends on them", () => {
    const s = new Scheduler({ durations: [["x", 5]] });
    add(s, [step("a", [], { name: "x" }), step("b", ["a"], { name: "x" })]);
    assert.equal(s.step("a").criticalPath, 10);
    add(s, [step("c", ["b"], { name: "x" }), step("d", ["c"], { name: "x" })], 1);
    assert.equal(s.step("a").criticalPath, 20);
    assert.equal(s.step("b").criticalPath, 15);
  });
});

describe("farm scheduler: failures, cancel, restart, bump", () => {
  test("a retried step's wait starts when its backoff ends, not when the scheduler next looks", () => {
    const s = new Scheduler({ retry: { maxAttempts: 3, initialDelayMs: 100, backoffFactor: 2 } });
    s.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    add(s, [step("a")]);
    s.dispatch(0);
    s.finish("a", { kind: "transient-failure" }, 10);
    assert.deepEqual(s.dispatch(150).map((x) => x.stepId), ["a"]);
    assert.equal(s.step("a").runnableSince, 110);
  });

  test("transient failures retry with exponential backoff, then fail for good", () => {
    const s = new Scheduler({ retry: { maxAttempts: 3, initialDelayMs: 100, backoffFactor: 2 } });
    s.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    add(s, [step("a"), step("b", ["a"])]);
    let now = 0;
    const expected = [100, 200];
    for (const delay of expected) {
      assert.equal(s.pick("m", now)?.stepId, "a");
      const r = s.finish("a", { kind: "transient-failure" }, now);
      assert.equal(r.state, "backoff");
      assert.equal(r.retryAt, now + delay);
      assert.equal(s.nextWakeAt(), now + delay);
      assert.equal(s.pick("m", now + delay - 1), undefined);
      now += delay;
    }
    assert.equal(s.pick("m", now)?.stepId, "a");
    const last = s.finish("a", { kind: "transient-failure" }, now);
    assert.equal(last.state, "failed");
    assert.deepEqual(last.depFailed, ["b"]);
    assert.equal(s.nextWakeAt(), undefined);
    assert.equal(s.step("a").failedAttempts, 3);
  });

  test("a permanent failure fails dependents transitively; clearing it re-queues them", () => {
    const s = new Scheduler();
    s.addMachine({ id: "m", systems: [X86], maxJobs: 4 });
    add(s, [step("a"), step("z"), step("b", ["a"]), step("c", ["b"]), step("d", ["c", "z"]), step("e", ["z"])]);
    s.dispatch(0);
    s.finish("z", { kind: "succeeded" }, 1);
    assert.equal(s.dispatch(1).length, 1); // e
    const r = s.finish("a", { kind: "permanent-failure", reason: "make: *** error 2" }, 2);
    assert.deepEqual([...r.depFailed].sort(), ["b", "c", "d"]);
    assert.equal(s.step("d").state, "depFailed");
    // A later step that depends on the failure is dependency-failed at once.
    add(s, [step("f", ["c"])], 3);
    assert.equal(s.step("f").state, "depFailed");
    // Restarting a dependent clears the cached failure that blocks it.
    const [res] = s.restart(["d"], 4);
    assert.ok(res?.ok);
    assert.deepEqual([...res.value.requeued].sort(), ["a", "b", "c", "d", "f"]);
    assert.equal(s.step("a").state, "runnable");
    assert.equal(s.step("a").failedAttempts, 0);
    assert.equal(s.step("d").state, "waiting");
    const order: string[] = [];
    for (let as = s.dispatch(5); as.length > 0; as = s.dispatch(5)) {
      for (const x of as) {
        order.push(x.stepId);
        s.finish(x.stepId, { kind: "succeeded" }, 5);
      }
    }
    assert.deepEqual(order.slice(0, 2), ["a", "b"]);
    assert.deepEqual(order.sort(), ["a", "b", "c", "d", "f"]);
  });

  test("a step blocked by two failures stays depFailed until both are cleared", () => {
    const s = new Scheduler();
    s.addMachine({ id: "m", systems: [X86], maxJobs: 4 });
    add(s, [step("a"), step("b"), step("c", ["a", "b"])]);
    s.dispatch(0);
    s.finish("a", { kind: "permanent-failure" }, 1);
    s.finish("b", { kind: "permanent-failure" }, 1);
    s.restart(["a"], 2);
    assert.equal(s.step("c").state, "depFailed");
    s.restart(["b"], 2);
    assert.equal(s.step("c").state, "waiting");
  });

  test("cancel a running step aborts it and blocks its dependents; restart brings both back", () => {
    const s = new Scheduler();
    s.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    add(s, [step("a"), step("b", ["a"]), step("q")]);
    const a = s.pick("m", 0);
    assert.equal(a?.stepId, "a");
    const [c, cq, cu] = s.cancel(["a", "q", "nope"], 1);
    assert.ok(c?.ok && cq?.ok);
    assert.deepEqual(c.value, { abort: { stepId: "a", machineId: "m" }, depFailed: ["b"] });
    assert.deepEqual(cq.value, { depFailed: [] });
    assert.ok(cu && !cu.ok && cu.error.code === "FERRY_FARM_UNKNOWN_STEP");
    assert.equal(s.machine("m").running.length, 0);
    assert.equal(s.pick("m", 1), undefined);
    throwsFerry(() => s.finish("a", { kind: "succeeded" }, 2), "FERRY_FARM_STEP_NOT_RUNNING");
    const [r] = s.restart(["a"], 3);
    assert.ok(r?.ok);
    assert.deepEqual(r.value.requeued, ["a", "b"]);
    assert.equal(s.pick("m", 3)?.stepId, "a");
    s.finish("a", { kind: "succeeded" }, 4);
    const [bad] = s.restart(["a"], 4);
    assert.ok(bad && !bad.ok && bad.error.code === "FERRY_FARM_STEP_FINISHED");
    const [bad2] = s.cancel(["a"], 4);
    assert.ok(bad2 && !bad2.ok && bad2.error.code === "FERRY_FARM_STEP_FINISHED");
  });

  test("cancel in backoff and cancel of a waiting step", () => {
    const s = new Scheduler();
    s.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    add(s, [step("a"), step("b", ["a"])]);
    s.pick("m", 0);
    s.finish("a", { kind: "transient-failure" }, 1);
    const [c] = s.cancel(["a"], 2);
    assert.ok(c?.ok);
    assert.equal(s.nextWakeAt(), undefined);
    assert.equal(s.pick("m", 1e9), undefined);
    assert.equal(s.step("b").state, "depFailed");
    const [w] = s.cancel(["b"], 3);
    assert.ok(w?.ok);
    assert.equal(s.step("b").state, "cancelled");
    s.restart(["a"], 4);
    assert.equal(s.step("b").state, "cancelled");
  });

  test("bumping a step hurries the steps it depends on", () => {
    const s = new Scheduler();
    s.addMachine({ id: "m", systems: [X86], maxJobs: 1 });
    add(s, [step("other", [], { createdAt: 0 }), step("dep", [], { createdAt: 5 }), step("top", ["dep"], { createdAt: 5 })], 5);
    assert.equal(s.step("dep").bump, 0);
    const [r] = s.bump(["top"], 10, 5);
    assert.ok(r?.ok && r.value === 10);
    assert.equal(s.step("dep").bump, 10);
    assert.equal(s.pick("m", 5)?.stepId, "dep");
    s.bump(["top"], 0, 5);
    assert.equal(s.step("top").bump, 0);
  });
});

describe("farm scheduler: bad input", () => {
  test("duplicates, unknown dependencies and cycles are per-item errors", () => {
    const s = new Scheduler();
    add(s, [step("a")]);
    const rs = s.addSteps([
      step("a"),
      step("b", ["ghost"]),
      step("c", ["b"]),
      step("d", ["e"]),
      step("e", ["d"]),
      step("self", ["self"]),
      step("f", ["a"]),
      step("f"),
    ], 0);
    const codes = rs.map((r) => (r.ok ? "ok" : r.error.code));
    assert.deepEqual(codes, [
      "FERRY_FARM_DUPLICATE_STEP",
      "FERRY_FARM_UNKNOWN_STEP",
      "FERRY_FARM_UNKNOWN_STEP",
      "FERRY_FARM_DEPENDENCY_CYCLE",
      "FERRY_FARM_DEPENDENCY_CYCLE",
      "FERRY_FARM_DEPENDENCY_CYCLE",
      "ok",
      "FERRY_FARM_DUPLICATE_STEP",
    ]);
    assert.deepEqual(rs.map((r) => r.id), ["a", "b", "c", "d", "e", "self", "f", "f"]);
    assert.deepEqual(s.stepIds().sort(), ["a", "f"]);
    throwsFerry(() => s.step("b"), "FERRY_FARM_UNKNOWN_STEP");
    throwsFerry(() => s.finish("zzz", { kind: "succeeded" }, 0), "FERRY_FARM_UNKNOWN_STEP");
    const [bu] = s.bump(["zzz"], 1, 0);
    assert.ok(bu && !bu.ok && bu.error.code === "FERRY_FARM_UNKNOWN_STEP");
  });
});

// ---- properties -------------------------------------------------------------------------

const LIVE = new Set<StepState>(["waiting", "runnable", "backoff", "running"]);

/** Critical paths and bumps recomputed from scratch over the live steps. */
function fromScratch(s: Scheduler, specs: StepSpec[]): Map<string, { cp: number; bump: number }> {
  const dependents = new Map<string, string[]>();
  for (const sp of specs) for (const d of sp.deps ?? []) (dependents.get(d) ?? dependents.set(d, []).get(d)!).push(sp.id);
  const memo = new Map<string, { cp: number; bump: number }>();
  const own = new Map(specs.map((sp) => [sp.id, sp.bump ?? 0]));
  const visit = (id: string): { cp: number; bump: number } => {
    const m = memo.get(id);
    if (m) return m;
    const v = s.step(id);
    let below = 0;
    let bump = own.get(id)!;
    for (const d of dependents.get(id) ?? []) {
      if (!LIVE.has(s.step(d).state)) continue;
      const r = visit(d);
      below = Math.max(below, r.cp);
      bump = Math.max(bump, r.bump);
    }
    const r = { cp: v.estimate + below, bump };
    memo.set(id, r);
    return r;
  };
  for (const sp of specs) if (LIVE.has(s.step(sp.id).state)) visit(sp.id);
  return memo;
}

/** A random DAG: step i depends on up to three earlier steps. */
const dagArb = fc.integer({ min: 2, max: 40 }).chain((n) =>
  fc.tuple(
    fc.constant(n),
    fc.array(fc.uniqueArray(fc.nat(), { maxLength: 3 }), { minLength: n, maxLength: n }),
    fc.array(fc.integer({ min: 1, max: 50 }), { minLength: n, maxLength: n }),
  ),
);

function dagSpecs([n, deps, _durations]: [number, number[][], number[]]): StepSpec[] {
  return Array.from({ length: n }, (_, i) => ({
    id: `s${i}`,
    name: `p${i}`,
    system: i % 3 === 0 ? ARM : X86,
    deps: i === 0 ? [] : [...new Set(deps[i]!.map((d) => `s${d % i}`))],
  }));
}

describe("farm scheduler: properties", () => {
  test("incremental critical paths and bumps equal a from-scratch recomputation", () => {
    type Op = { kind: "succeed" | "transient" | "fail" | "cancel" | "restart" | "bump" | "split"; k: number };
    const opArb: fc.Arbitrary<Op> = fc.record({
      kind: fc.constantFrom("succeed", "succeed", "succeed", "transient", "fail", "cancel", "restart", "bump", "split"),
      k: fc.nat(),
    });
    fc.assert(
      fc.property(dagArb, fc.array(opArb, { maxLength: 60 }), (dag, ops) => {
        const durations = dag[2].map((d, i) => [`p${i}`, d] as const).filter((_, i) => i % 4 !== 0);
        const s = new Scheduler({ durations, retry: { maxAttempts: 2, initialDelayMs: 1, backoffFactor: 2 } });
        s.addMachine({ id: "x", systems: [X86], maxJobs: 3 });
        s.addMachine({ id: "a", systems: [ARM], maxJobs: 2 });
        const all = dagSpecs(dag);
        // Steps arrive in two batches (the second may depend on the first).
        let known = all.slice(0, Math.ceil(all.length / 2));
        add(s, known);
        let now = 0;
        const check = (): void => {
          const want = fromScratch(s, known);
          for (const [id, v] of want) {
            const got = s.step(id);
            assert.equal(got.criticalPath, v.cp, `cp of ${id}`);
            assert.equal(got.bump, v.bump, `bump of ${id}`);
          }
        };
        check();
        for (const op of ops) {
          now += 1;
          s.dispatch(now);
          const ids = known.map((x) => x.id);
          const pickId = ids[op.k % ids.length]!;
          const running = ids.filter((id) => s.step(id).state === "running");
          const r = running[op.k % Math.max(1, running.length)];
          switch (op.kind) {
            case "succeed": if (r) s.finish(r, { kind: "succeeded" }, now); break;
            case "transient": if (r) s.finish(r, { kind: "transient-failure" }, now); break;
            case "fail": if (r) s.finish(r, { kind: "permanent-failure" }, now); break;
            case "cancel": s.cancel([pickId], now); break;
            case "restart": s.restart([pickId], now); break;
            case "bump": {
              s.bump([pickId], op.k % 5, now);
              known = known.map((x) => (x.id === pickId ? { ...x, bump: op.k % 5 } : x));
              break;
            }
            case "split": if (known.length < all.length) { const rest = all.slice(known.length); add(s, rest, now); known = [...known, ...rest]; } break;
          }
          check();
        }
      }),
      { numRuns: 150, seed: 5150 },
    );
  });

  test("forgetting succeeded steps never changes a decision", () => {
    fc.assert(
      fc.property(dagArb, fc.integer({ min: 1, max: 3 }), fc.nat(), (dag, slots, salt) => {
        const durations = dag[2].map((d, i) => [`p${i}`, d] as const).filter((_, i) => i % 3 !== 0);
        const twins = [new Scheduler({ durations }), new Scheduler({ durations })] as const;
        for (const t of twins) {
          t.addMachine({ id: "x1", systems: [X86], maxJobs: slots, speedFactor: 2 });
          t.addMachine({ id: "a1", systems: [ARM], maxJobs: slots });
        }
        const specs = dagSpecs(dag);
        // The second half arrives later, depending on steps that may have succeeded (and been forgotten).
        const half = Math.ceil(specs.length / 2);
        for (const t of twins) add(t, specs.slice(0, half));
        const [keeps, forgets] = twins;
        const running: string[] = [];
        let rnd = salt;
        let now = 0;
        let late = false;
        for (let guard = 0; guard < 10_000; guard++) {
          now++;
          if (!late && (running.length === 0 || rnd % 4 === 0)) {
            late = true;
            const rest = specs.slice(half);
            add(keeps, rest, now);
            const inBatch = new Set(rest.map((sp) => sp.id));
            add(forgets, rest.map((sp) => ({ ...sp, deps: (sp.deps ?? []).filter((d) => inBatch.has(d) || forgets.hasStep(d)) })), now);
          }
          const a = keeps.dispatch(now);
          assert.deepEqual(forgets.dispatch(now), a);
          running.push(...a.map((x) => x.stepId));
          if (running.length === 0) break;
          rnd = (rnd * 1103515245 + 12345) % 2147483648;
          const [id] = running.splice(rnd % running.length, 1);
          const fail = rnd % 11 === 0;
          for (const t of twins) t.finish(id!, fail ? { kind: "permanent-failure" } : { kind: "succeeded" }, now);
          if (!fail) assert.ok(forgets.forget([id!])[0]!.ok);
        }
        for (const sp of specs) {
          const st = keeps.step(sp.id).state;
          assert.equal(forgets.hasStep(sp.id), st !== "succeeded", `${sp.id} is ${st}`);
          if (st !== "succeeded") assert.equal(forgets.step(sp.id).state, st);
        }
      }),
      { numRuns: 150, seed: 77 },
    );
  });

  test("a full simulated run executes every step exactly once, in dependency order", () => {
    fc.assert(
      fc.property(dagArb, fc.integer({ min: 1, max: 4 }), fc.nat(), (dag, slots, salt) => {
        const s = new Scheduler({ retry: { maxAttempts: 100, initialDelayMs: 3, backoffFactor: 1.5 } });
        s.addMachine({ id: "x1", systems: [X86], maxJobs: slots, speedFactor: 2 });
        s.addMachine({ id: "x2", systems: [X86], maxJobs: 1 });
        s.addMachine({ id: "a1", systems: [ARM], maxJobs: slots });
        const specs = dagSpecs(dag);
        add(s, specs);
        const done = new Map<string, number>();
        const runs = new Map<string, number>();
        // Discrete events: (time, step); some attempts fail transiently and are retried.
        let events: { at: number; id: string; fail: boolean }[] = [];
        let now = 0;
        let rnd = salt;
        for (let guard = 0; guard < 100_000; guard++) {
          for (const a of s.dispatch(now)) {
            const sp = specs.find((x) => x.id === a.stepId)!;
            for (const d of sp.deps ?? []) assert.ok(done.has(d), `${a.stepId} started before ${d}`);
            rnd = (rnd * 1103515245 + 12345) % 2147483648;
            events.push({ at: now + 1 + (rnd % 7), id: a.stepId, fail: rnd % 5 === 0 });
          }
          if (events.length === 0) {
            const wake = s.nextWakeAt();
            if (wake === undefined) break;
            now = wake;
            continue;
          }
          events.sort((p, q) => p.at - q.at);
          const e = events[0]!;
          events = events.slice(1);
          now = e.at;
          if (e.fail) {
            s.finish(e.id, { kind: "transient-failure" }, now);
          } else {
            s.finish(e.id, { kind: "succeeded" }, now);
            runs.set(e.id, (runs.get(e.id) ?? 0) + 1);
            done.set(e.id, now);
          }
        }
        assert.equal(done.size, specs.length);
        for (const sp of specs) assert.equal(runs.get(sp.id), 1, `${sp.id} ran ${runs.get(sp.id)} times`);
        assert.equal(s.counts().succeeded, specs.length);
      }),
      { numRuns: 150, seed: 42 },
    );
  });
});

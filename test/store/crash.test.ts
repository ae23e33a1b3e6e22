/**
 * The store under hostile timing: processes killed with SIGKILL in the middle of `store add`,
 * and several processes adding the same tree at once. The store must stay valid throughout.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { ferry, ferryOk, spawnFerry } from "../helpers/cli.js";
import { prng, tempDir } from "../helpers/fs-trees.js";

function writeBulkyTree(dir: string, files: number, size: number): void {
  for (let i = 0; i < files; i++) {
    const sub = join(dir, `d${i % 20}`);
    fs.mkdirSync(sub, { recursive: true });
    const b = Buffer.alloc(size, i & 255);
    b.writeUInt32LE(i, 0);
    fs.writeFileSync(join(sub, `f${i}`), b);
  }
}

function waitExit(p: ReturnType<typeof spawnFerry>): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }> {
  let stdout = "";
  let stderr = "";
  p.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
  p.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve) => p.on("exit", (code, signal) => resolve({ code, signal, stdout, stderr })));
}

describe("crash safety and concurrency of store add", () => {
  let dir: string;
  let src: string;
  before(() => {
    dir = tempDir("ferry-crash-");
    src = join(dir, "bulky");
    writeBulkyTree(src, 1500, 16 * 1024);
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  test("kill -9 at random moments of an add leaves a valid store, and the next add completes it", async () => {
    const root = join(dir, "crash-root");
    const flags = ["--root", root];
    const expected = ferryOk(["store", "add", "--dry-run", src]).trim();
    const rnd = prng(42);
    let killedMidway = 0;
    for (let i = 0; i < 6; i++) {
      const p = spawnFerry(["store", "add", ...flags, src]);
      const done = waitExit(p);
      await new Promise((r) => setTimeout(r, 80 + Math.floor(rnd() * 700)));
      p.kill("SIGKILL");
      const r = await done;
      if (r.signal === "SIGKILL") killedMidway++;
      // Whatever happened, the store is consistent: every registered path verifies.
      const v = ferry(["store", "verify", "--json", ...flags]);
      assert.equal(v.status, 0, `verify after kill ${i}: ${v.stderr}`);
      const items = JSON.parse(v.stdout.toString()) as { path: string; status: string }[];
      assert.ok(items.every((x) => x.status === "ok"));
      assert.ok(items.every((x) => x.path === expected), "only the expected path can be registered");
      if (r.signal !== "SIGKILL") {
        // the add finished before the kill; start again from an empty store
        ferryOk(["store", "gc", ...flags]);
      }
    }
    assert.ok(killedMidway > 0, "at least one add was killed midway");
    assert.equal(ferryOk(["store", "add", ...flags, src]).trim(), expected);
    assert.equal(ferry(["store", "verify", ...flags]).status, 0);
    ferryOk(["store", "add-root", ...flags, "keep", expected]);
    const gc = JSON.parse(ferryOk(["store", "gc", "--json", ...flags])) as { deleted: string[]; leftovers: string[] };
    assert.deepEqual(gc.deleted, []);
    const entries = fs.readdirSync(join(root, "ferry", "store"));
    assert.deepEqual(entries, [expected.slice("/ferry/store/".length)], "leftovers of killed adds are gone");
  });

  test("four processes adding the same tree at once end with one valid copy and no error", async () => {
    const root = join(dir, "race-root");
    const runs = await Promise.all([0, 1, 2, 3].map(() => waitExit(spawnFerry(["store", "add", "--root", root, src]))));
    for (const r of runs) assert.equal(r.code, 0, r.stderr);
    const paths = new Set(runs.map((r) => r.stdout.trim()));
    assert.equal(paths.size, 1);
    const entries = fs.readdirSync(join(root, "ferry", "store"));
    assert.deepEqual(entries, [[...paths][0]!.slice("/ferry/store/".length)]);
    assert.equal(ferry(["store", "verify", "--root", root]).status, 0);
  });

  test("garbage collection running all the time never takes a path that is being added", async () => {
    const root = join(dir, "gc-race-root");
    const inputs = [0, 1, 2, 3, 4, 5].map((i) => {
      const d = join(dir, `gc-race-${i}`);
      writeBulkyTree(d, 200 + i, 4096);
      return d;
    });
    let stop = false;
    let gcRuns = 0;
    const gcFailures: string[] = [];
    const gcLoop = (async () => {
      while (!stop && gcFailures.length === 0) {
        const r = await waitExit(spawnFerry(["store", "gc", "--root", root]));
        if (r.code !== 0) gcFailures.push(r.stderr);
        gcRuns++;
      }
    })();
    const added: string[] = [];
    for (const [i, d] of inputs.entries()) {
      const r = await waitExit(spawnFerry(["store", "add", "--root", root, "--add-root", `r${i}`, d]));
      if (r.code !== 0) {
        stop = true;
        await gcLoop;
        assert.fail(r.stderr);
      }
      added.push(r.stdout.trim());
    }
    stop = true;
    await gcLoop;
    assert.deepEqual(gcFailures, []);
    assert.ok(gcRuns > 1, "GC ran while the adds did");
    const v = JSON.parse(ferryOk(["store", "verify", "--json", "--root", root])) as { path: string; status: string }[];
    assert.deepEqual(v.map((x) => x.path).sort(), [...added].sort(), "every added path survived, intact");
    assert.ok(v.every((x) => x.status === "ok"));
  });

  /** A package set of `n` derivations, each depending on earlier ones. */
  const writeChainSet = (file: string, n: number) =>
    fs.writeFileSync(file, `import { derivation, type Package } from "ferry";
      const pkgs: Package[] = [];
      for (let i = 0; i < ${n}; i++) pkgs.push(derivation({ name: "c" + i, system: "x86_64-linux", builder: "/bin/sh", deps: [i ? pkgs[i - 1]! : "", i > 7 ? pkgs[i >> 1]! : ""] }));
      export default Object.fromEntries(pkgs.map((p, i) => ["c" + i, p]));
    `);

  test("kill -9 during an evaluation leaves only complete files, and evaluations writing the same .drv files at once both succeed", async () => {
    const set = join(dir, "chain.ts");
    writeChainSet(set, 6000);
    const root = join(dir, "eval-crash-root");
    const flags = ["--root", root];
    const rnd = prng(7);
    for (let i = 0; i < 3; i++) {
      const p = spawnFerry(["eval", ...flags, set]);
      const done = waitExit(p);
      await new Promise((r) => setTimeout(r, 500 + Math.floor(rnd() * 2500)));
      p.kill("SIGKILL");
      await done;
      const v = ferry(["store", "verify", "--json", ...flags]);
      assert.equal(v.status, 0, `verify after kill ${i}: ${v.stderr}`);
      assert.ok((JSON.parse(v.stdout.toString()) as { status: string }[]).every((x) => x.status === "ok"));
    }
    const runs = await Promise.all([0, 1].map(() => waitExit(spawnFerry(["eval", ...flags, set]))));
    for (const r of runs) assert.equal(r.code, 0, r.stderr);
    assert.equal(runs[0]!.stdout, runs[1]!.stdout);
    const v = JSON.parse(ferryOk(["store", "verify", "--json", ...flags])) as { path: string; status: string }[];
    assert.equal(v.length, 6000, "every .drv is registered once");
    assert.ok(v.every((x) => x.status === "ok"));
    // Every name in the store is registered and complete; leftovers are only temporary names.
    const valid = new Set(v.map((x) => x.path.slice("/ferry/store/".length)));
    for (const n of fs.readdirSync(join(root, "ferry", "store"))) assert.ok(valid.has(n) || n.startsWith(".ferry-"), n);
  });
});

/** `ferry eval` as users meet it: errors that point at their line, limits, purity, cycles. */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { ferry, ferryOk } from "../helpers/cli.js";
import { tempDir } from "../helpers/fs-trees.js";
import { drvVectors, writeVectorPackageSet } from "../helpers/vector-fixture.js";
import { FRAME_JOB, FRAME_JSON, FRAME_TEXT, FrameReader, FrameWriter, decodeJob } from "../../src/dsl/eval-protocol.js";
import { decodeTextRecords } from "../../src/store/text-records.js";
import { isFerryError } from "../../src/core/errors.js";

describe("ferry eval", () => {
  let dir: string;
  before(() => {
    dir = tempDir("ferry-eval-");
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  const write = (name: string, text: string) => {
    const p = join(dir, name);
    fs.writeFileSync(p, text);
    return p;
  };

  test("writes .drv files and prints derivations and outputs; -A selects; --json", () => {
    const pkgs = writeVectorPackageSet(fs.mkdtempSync(join(dir, "vec-")));
    const root = join(dir, "r1");
    const flags = ["--root", root, "--store-dir", "/nix/store", "--state-dir", "/nix/var"];
    const one = ferryOk(["eval", ...flags, "-A", "simple", pkgs]).trim().split("\t");
    const v = drvVectors().find((x) => x.attr === "simple" && x.store_dir === "/nix/store")!;
    assert.deepEqual(one, ["simple", v.drv_path, v.outputs.out]);
    assert.equal(fs.readFileSync(join(root, v.drv_path), "utf8"), v.drv_text);
    const all = JSON.parse(ferryOk(["eval", "--json", ...flags, pkgs])) as { attr: string; drvPath: string }[];
    assert.equal(all.length, 7);
    // The .drv of a dependency is in the store with its references.
    const dep = all.find((j) => j.attr === "dependent")!;
    const info = JSON.parse(ferryOk(["store", "path-info", "--json", ...flags, dep.drvPath]))[0];
    assert.ok(info.references.some((r: string) => r.endsWith("-simple.drv")));
    assert.ok(info.references.some((r: string) => r.endsWith("-dependent-builder.sh")));
  });

  test("errors name the file and line in the package set, with a code and a hint", () => {
    const badName = write("bad-name.ts", `import { derivation } from "ferry";\n\nexport const x = derivation({ name: "has space", system: "x86_64-linux", builder: "/bin/sh" });\n`);
    const r = ferry(["eval", "--dry-run", badName]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, new RegExp(`error \\[FERRY_STORE_BAD_NAME\\]: ${badName}:3: `));
    const thrown = write("throws.ts", `import { derivation } from "ferry";\nconst n: number = 1;\nif (n) throw new Error("boom in the package set");\nexport const x = derivation({ name: "x", system: "x86_64-linux", builder: "/bin/sh" });\n`);
    const t = ferry(["eval", "--dry-run", thrown]);
    assert.match(t.stderr, new RegExp(`${thrown}:3: Error: boom in the package set`));
    const missing = ferry(["eval", "--dry-run", "-A", "nope", badName.replace("bad-name", "../vec-x/none")]);
    assert.match(missing.stderr, /FERRY_EVAL_NO_FILE/);
    // Writing to a store: the writer threads started for the plan must not keep the command alive.
    const store = ["--root", join(dir, "r-missing"), "--store-dir", "/nix/store", "--state-dir", "/nix/var"];
    const missingWriting = ferry(["eval", ...store, join(dir, "none.ts")], { timeoutMs: 60_000 });
    assert.equal(missingWriting.status, 1, `it exits with the error (${missingWriting.stderr})`);
    assert.match(missingWriting.stderr, /FERRY_EVAL_NO_FILE/);
    const ok = write("ok.ts", `import { derivation } from "ferry";\nexport const x = derivation({ name: "x", system: "x86_64-linux", builder: "/bin/sh" });\n`);
    const noAttr = ferry(["eval", "--dry-run", "-A", "y", ok]);
    assert.match(noAttr.stderr, /FERRY_EVAL_NO_ATTR.*'y'/);
    assert.match(noAttr.stderr, /hint: the package set exports: x/);
    const noHash = write("nohash.ts", `import { fetchurl } from "ferry";\nexport const src = fetchurl({ url: "https://example.org/x.tar.gz", hash: "" });\n`);
    assert.match(ferry(["eval", "--dry-run", noHash]).stderr, /FERRY_EVAL_NO_HASH/);
  });

  test("a dependency cycle in a package set is reported with the cycle and the attribute", () => {
    const cyc = write("cycle.ts", `import { packageSet, derivation } from "ferry";
      const mk = (name: string, dep?: unknown) => derivation({ name, system: "x86_64-linux", builder: "/bin/sh", dep: dep as string });
      export default packageSet((self: any) => ({
        a: () => mk("a", self.b),
        b: () => mk("b", self.c),
        c: () => mk("c", self.a),
        fine: () => mk("fine"),
      }));
    `);
    const r = ferry(["eval", "--dry-run", cyc]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /FERRY_EVAL_CYCLE\]: dependency cycle: a -> b -> c -> a \(while evaluating the attribute 'a'\)/);
    // Members that refer to each other without a cycle evaluate in any order.
    const ok = write("set.ts", `import { packageSet, derivation } from "ferry";
      export default packageSet((self: any) => ({
        top: () => derivation({ name: "top", system: "x86_64-linux", builder: "/bin/sh", dep: self.base }),
        base: () => derivation({ name: "base", system: "x86_64-linux", builder: "/bin/sh" }),
      }));
    `);
    const jobs = JSON.parse(ferryOk(["eval", "--dry-run", "--json", ok])) as { attr: string }[];
    assert.deepEqual(jobs.map((j) => j.attr).sort(), ["base", "top"]);
  });

  test("evaluation is pure: package code cannot write files or reach the network", () => {
    const target = join(dir, "side-effect");
    const evil = write("evil.ts", `import { writeFileSync } from "node:fs";\nwriteFileSync(${JSON.stringify(target)}, "x");\nexport {};\n`);
    const r = ferry(["eval", "--dry-run", evil]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /EROFS/);
    assert.ok(!fs.existsSync(target));
  });

  test("time and memory limits stop runaway evaluations", () => {
    const loop = write("loop.ts", `while (true) { /* forever */ }\nexport {};\n`);
    const t0 = Date.now();
    const r = ferry(["eval", "--dry-run", "--eval-timeout", "2", loop]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /FERRY_EVAL_TIMEOUT/);
    assert.ok(Date.now() - t0 < 15000);
    const hog = write("hog.ts", `const keep: number[][] = [];\nfor (;;) keep.push(new Array(1e6).fill(1));\nexport {};\n`);
    const m = ferry(["eval", "--dry-run", "--eval-memory", "64", hog]);
    assert.equal(m.status, 1);
    assert.match(m.stderr, /FERRY_EVAL_OUT_OF_MEMORY/);
  });

  test("a stop of the machine right after an evaluation: the next command unregisters the .drv files the disk lost, says so, and eval makes them again", () => {
    // Enough derivations that the files are not synced one by one (a small plan is).
    const pkgs = write("chain.ts", `import { derivation, type Package } from "ferry";
const pkgs: Package[] = [];
for (let i = 0; i < 40; i++) pkgs.push(derivation({ name: "c" + i, system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo > $out"], deps: pkgs.slice(-1) }));
export default Object.fromEntries(pkgs.map((p, i) => ["c" + i, p]));
`);
    const root = join(dir, "r-stop");
    const flags = ["--root", root, "--store-dir", "/nix/store", "--state-dir", "/nix/var"];
    const all = JSON.parse(ferryOk(["eval", "--json", ...flags, pkgs])) as { attr: string; drvPath: string }[];
    const drv = (attr: string) => all.find((j) => j.attr === attr)!.drvPath;
    // The evaluation did not wait for the disk: its registrations are recorded as unsynced of
    // this boot. Make it an earlier boot, and the file of c30 one the kernel never wrote.
    const db = new Database(join(root, "nix", "var", "db", "db.sqlite"));
    assert.ok((db.prepare("SELECT count(*) FROM UnsyncedRegistrations").pluck().get() as number) > 0);
    db.exec("UPDATE UnsyncedRegistrations SET boot = 'before the power cut'");
    db.close();
    const c30 = fs.readFileSync(join(root, drv("c30")));
    fs.chmodSync(join(root, drv("c30")), 0o644);
    fs.truncateSync(join(root, drv("c30")), 0);
    const r = ferry(["store", "verify", ...flags]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stderr, /ferry: the machine stopped before the kernel wrote back files registered just before: 10 paths lost their files or refer to one that did, and are no longer registered \(of 40 checked\); evaluate again/);
    assert.match(r.stderr, /30 paths checked, 0 damaged/, "what stays registered is intact");
    assert.match(ferry(["store", "path-info", ...flags, drv("c39")]).stderr, /FERRY_STORE_NOT_VALID/, "what refers to a lost file goes too");
    ferryOk(["store", "path-info", ...flags, drv("c29")]);
    const again = ferry(["store", "verify", ...flags]);
    assert.doesNotMatch(again.stderr, /machine stopped/, "settled once");
    ferryOk(["eval", ...flags, pkgs]);
    assert.deepEqual(fs.readFileSync(join(root, drv("c30"))), c30);
    ferryOk(["store", "path-info", ...flags, drv("c39")]);
  });

  test("derivation show prints Nix's JSON; derivation add accepts a true .drv and refuses a forged one", () => {
    const pkgs = writeVectorPackageSet(fs.mkdtempSync(join(dir, "vec-")));
    const root = join(dir, "r-show");
    const flags = ["--root", root, "--store-dir", "/nix/store", "--state-dir", "/nix/var"];
    ferryOk(["eval", ...flags, pkgs]);
    const v = drvVectors().find((x) => x.attr === "dependent" && x.store_dir === "/nix/store")!;
    const shown = JSON.parse(ferryOk(["derivation", "show", "--json", ...flags, v.drv_path]));
    const all = JSON.parse(fs.readFileSync(join(new URL("../../../..", import.meta.url).pathname, "shared", "conformance", "nix", "vectors", "derivations.json"), "utf8"));
    const expected = all.vectors.find((x: { drv_path: string }) => x.drv_path === v.drv_path).nix_show_derivation;
    assert.deepEqual(shown[v.drv_path], expected);
    // A second store with the inputs but not the .drv: add it from its text.
    const root2 = join(dir, "r-add");
    const flags2 = ["--root", root2, "--store-dir", "/nix/store", "--state-dir", "/nix/var"];
    ferryOk(["eval", ...flags2, "-A", "simple", pkgs]);
    const simple = drvVectors().find((x) => x.attr === "simple" && x.store_dir === "/nix/store")!;
    const multi = drvVectors().find((x) => x.attr === "multi" && x.store_dir === "/nix/store")!;
    ferryOk(["eval", ...flags2, "-A", "multi", pkgs]);
    assert.equal(ferryOk(["derivation", "add", ...flags2], { input: Buffer.from(simple.drv_text) }).trim(), simple.drv_path);
    const forged = simple.drv_text.replace(/94f9f6i31zwzwbf0kclq1naqxxi4c7v9/g, "0000000000000000000000000000000a");
    const r = ferry(["derivation", "add", ...flags2], { input: Buffer.from(forged) });
    assert.equal(r.status, 1);
    assert.match(r.stderr, /FERRY_DRV_WRONG_OUTPUTS/);
    const noInputs = ferry(["derivation", "add", "--root", join(dir, "empty"), "--store-dir", "/nix/store", "--state-dir", "/nix/var"], { input: Buffer.from(v.drv_text) });
    assert.match(noInputs.stderr, /FERRY_DRV_MISSING_INPUT/);
    void multi;
  });

  test("package code does not see the caller's environment", () => {
    const mod = write("env.ts", `import { derivation } from "ferry";
      export const x = derivation({ name: "x", system: "x86_64-linux", builder: "/bin/sh", seen: process.env.FERRY_TEST_SECRET ?? "none" });`);
    const jobs = JSON.parse(ferryOk(["eval", "--json", "--root", join(dir, "env-root"), mod], { env: { FERRY_TEST_SECRET: "hunter2" } })) as { drvPath: string }[];
    const text = fs.readFileSync(join(dir, "env-root", jobs[0]!.drvPath), "utf8");
    assert.match(text, /\("seen","none"\)/);
    assert.doesNotMatch(text, /hunter2/);
  });

  test("bytes on the protocol descriptor that are not frames, or a forged text, stop the evaluation with a code", () => {
    const garbage = write("garbage.ts", `import { writeSync } from "node:fs";\nwriteSync(3, "hello from package code\\n");\nexport {};\n`);
    const r = ferry(["eval", "--dry-run", garbage]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /FERRY_EVAL_PROTOCOL/);
    // A well-formed text frame whose planned path does not belong to its content.
    const forged = write("forged.ts", `import { writeSync } from "node:fs";
      import { derivation } from "ferry";
      const header = Buffer.from("/nix/store/00000000000000000000000000000000-x.drv\\nx.drv");
      const text = Buffer.from("forged");
      const rec = Buffer.alloc(8); rec.writeUInt32LE(header.length, 0); rec.writeUInt32LE(text.length, 4);
      const frame = Buffer.alloc(5); frame.writeUInt32LE(8 + header.length + text.length, 0); frame[4] = 0x54;
      writeSync(3, Buffer.concat([frame, rec, header, text]));
      export const ok = derivation({ name: "ok", system: "x86_64-linux", builder: "/bin/sh" });`);
    const root = join(dir, "r-forged");
    const f = ferry(["eval", "--root", root, "--store-dir", "/nix/store", "--state-dir", "/nix/var", forged]);
    assert.equal(f.status, 1);
    assert.match(f.stderr, /FERRY_STORE_PATH_MISMATCH/);
    assert.ok(!fs.existsSync(join(root, "nix/store/00000000000000000000000000000000-x.drv")));
    const left = fs.existsSync(join(root, "nix/store")) ? fs.readdirSync(join(root, "nix/store")) : [];
    assert.deepEqual(left.filter((n) => n.startsWith(".ferry-tmp-")), [], "no temporary files are left behind");
    // A planned path outside the store dir: refused before anything is written.
    const escape = write("escape.ts", fs.readFileSync(forged, "utf8").replace("/nix/store/00000000000000000000000000000000-x.drv", "/nix/store/../escape.drv"));
    const g = ferry(["eval", "--root", root, "--store-dir", "/nix/store", "--state-dir", "/nix/var", escape]);
    assert.equal(g.status, 1);
    assert.match(g.stderr, /FERRY_STORE_BAD_PATH/);
    assert.ok(!fs.existsSync(join(root, "nix/escape.drv")));
  });

  test("a message that is not an object, a text whose references repeat, or anything after the end is refused", () => {
    const frame = (kind: number, payload: string) => `(() => { const p = Buffer.from(${JSON.stringify(payload)}); const h = Buffer.alloc(5); h.writeUInt32LE(p.length, 0); h[4] = ${kind}; writeSync(3, Buffer.concat([h, p])); })();`;
    const cases: [string, string, RegExp][] = [
      ["null.ts", frame(FRAME_JSON, "null"), /FERRY_EVAL_PROTOCOL/],
      ["no-fields.ts", frame(FRAME_JSON, JSON.stringify({ t: "source" })), /FERRY_EVAL_PROTOCOL/],
      ["after-done.ts", frame(FRAME_JSON, JSON.stringify({ t: "done", jobs: 0 })) + frame(FRAME_JSON, JSON.stringify({ t: "done", jobs: 0 })), /FERRY_EVAL_PROTOCOL/],
    ];
    for (const [name, code, want] of cases) {
      const r = ferry(["eval", "--dry-run", write(name, `import { writeSync } from "node:fs";\n${code}\nexport {};\n`)]);
      assert.equal(r.status, 1, name);
      assert.match(r.stderr, want, name);
    }
    // A text record whose references repeat (its path matches its content: the check is on the plan).
    const dup = write("dup-refs.ts", `import { writeSync } from "node:fs";
      import { derivation } from "ferry";
      const a = derivation({ name: "a", system: "x86_64-linux", builder: "/bin/sh" });
      const header = Buffer.from(["/nix/store/00000000000000000000000000000000-x.drv", "x.drv", a.drvPath, a.drvPath].join("\\n"));
      const rec = Buffer.alloc(8); rec.writeUInt32LE(header.length, 0); rec.writeUInt32LE(1, 4);
      const frame = Buffer.alloc(5); frame.writeUInt32LE(9 + header.length, 0); frame[4] = ${FRAME_TEXT};
      writeSync(3, Buffer.concat([frame, rec, header, Buffer.from("x")]));
      export { a };`);
    const root = join(dir, "r-dup");
    const d = ferry(["eval", "--root", root, "--store-dir", "/nix/store", "--state-dir", "/nix/var", dup]);
    assert.equal(d.status, 1);
    assert.match(d.stderr, /FERRY_STORE_BAD_TEXT_RECORD/);
    const left = fs.existsSync(join(root, "nix/store")) ? fs.readdirSync(join(root, "nix/store")) : [];
    assert.deepEqual(left.filter((n) => n.startsWith(".ferry-tmp-")), [], "no temporary files are left behind");
    // An empty reference (a header ending in a newline) would be hashed into the path and registered as none.
    const empty = write("empty-ref.ts", fs.readFileSync(dup, "utf8").replace("a.drvPath, a.drvPath]", '""]'));
    const e = ferry(["eval", "--root", join(dir, "r-empty-ref"), "--store-dir", "/nix/store", "--state-dir", "/nix/var", empty]);
    assert.equal(e.status, 1);
    assert.match(e.stderr, /FERRY_STORE_BAD_TEXT_RECORD/);
  });

  test("texts that are not what they claim stop the evaluation as soon as the writer checks them", () => {
    // Enough false texts for a batch, then package code that never ends: the writer's refusal,
    // not the time limit, ends the evaluation, and the false files are gone.
    const forger = write("forger.ts", `import { writeSync } from "node:fs";
      const frames = [];
      for (let i = 0; i < 6000; i++) {
        const header = Buffer.from("/nix/store/" + String(i).padStart(32, "0") + "-f" + i + ".drv\\nf" + i + ".drv");
        const text = Buffer.from("forged " + i);
        const rec = Buffer.alloc(8); rec.writeUInt32LE(header.length, 0); rec.writeUInt32LE(text.length, 4);
        const frame = Buffer.alloc(5); frame.writeUInt32LE(8 + header.length + text.length, 0); frame[4] = ${FRAME_TEXT};
        frames.push(frame, rec, header, text);
      }
      writeSync(3, Buffer.concat(frames));
      for (;;) {}`);
    const root = join(dir, "r-forger");
    const r = ferry(["eval", "--eval-timeout", "300", "--root", root, "--store-dir", "/nix/store", "--state-dir", "/nix/var", forger]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /FERRY_STORE_PATH_MISMATCH/);
    const left = fs.existsSync(join(root, "nix/store")) ? fs.readdirSync(join(root, "nix/store")) : [];
    assert.deepEqual(left, [], "the false texts written before the check are removed");
  });

  test("package code that fails after thousands of derivations leaves no temporary files", () => {
    // More than one batch of texts (5,000) reaches the writer threads before the error: batches
    // prepared but not committed are removed; committed ones stay, whole.
    const late = write("late-failure.ts", `import { derivation } from "ferry";
      const pkgs = [];
      for (let i = 0; i < 20000; i++) pkgs.push(derivation({ name: "late" + i, system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo " + i] }));
      export const all = pkgs[19999];
      throw new Error("late failure");`);
    const root = join(dir, "r-late");
    const r = ferry(["eval", "--root", root, "--store-dir", "/nix/store", "--state-dir", "/nix/var", late]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /late failure/);
    const left = fs.existsSync(join(root, "nix/store")) ? fs.readdirSync(join(root, "nix/store")) : [];
    assert.deepEqual(left.filter((n) => n.startsWith(".ferry-tmp-")), [], "no temporary files are left behind");
    const v = ferry(["store", "verify", "--root", root, "--store-dir", "/nix/store", "--state-dir", "/nix/var"]);
    assert.equal(v.status, 0, v.stderr);
  });
});

describe("eval protocol frames", () => {
  const sample = () => {
    const chunks: Buffer[] = [];
    const w = new FrameWriter((b) => chunks.push(Buffer.from(b)), 64);
    w.json({ t: "source", storePath: "/nix/store/a-src", from: "/x", name: "src" });
    w.text({ storePath: "/nix/store/b-x.drv", name: "x.drv", references: ["/nix/store/a-src"], text: `Derive([("out","é\\"q")])` });
    w.text({ storePath: "/nix/store/c-y.drv", name: "y.drv", references: [], text: "y".repeat(300) });
    w.job({ attr: 'tools."é"\n', name: "y", system: "x86_64-linux", drvPath: "/nix/store/c-y.drv", outputs: { out: "/nix/store/d-y", dev: { path: "/nix/store/e-y-dev" } }, meta: { version: "1.0", tags: ["a"] } });
    w.job({ attr: "z", name: "z", system: "aarch64-linux", drvPath: "/nix/store/f-z.drv", outputs: {}, meta: {} });
    w.json({ t: "done", jobs: 0 });
    w.flush();
    return Buffer.concat(chunks);
  };
  const read = (parts: Buffer[]) => {
    const seen: string[] = [];
    const r = new FrameReader((kind, buf, start, end) => {
      const payload = buf.subarray(start, end);
      if (kind === FRAME_JSON) seen.push(JSON.parse(payload.toString()).t);
      else if (kind === FRAME_JOB) seen.push(JSON.stringify(decodeJob(buf, start, end)));
      else {
        assert.equal(kind, FRAME_TEXT);
        const [rec] = decodeTextRecords(payload);
        seen.push(`${rec!.name}:${rec!.references.join(",")}:${Buffer.from(rec!.bytes).toString()}`);
      }
    });
    for (const p of parts) r.push(p);
    r.end();
    return seen;
  };

  test("frames survive any split of the stream into chunks", () => {
    const bytes = sample();
    const whole = read([bytes]);
    assert.deepEqual(whole.slice(0, 3), ["source", `x.drv:/nix/store/a-src:Derive([("out","é\\"q")])`, `y.drv::${"y".repeat(300)}`]);
    assert.deepEqual(whole.slice(3).map((j) => (j === "done" ? j : JSON.parse(j))), [
      { attr: 'tools."é"\n', name: "y", system: "x86_64-linux", drvPath: "/nix/store/c-y.drv", outputs: { out: "/nix/store/d-y", dev: "/nix/store/e-y-dev" }, meta: { version: "1.0", tags: ["a"] } },
      { attr: "z", name: "z", system: "aarch64-linux", drvPath: "/nix/store/f-z.drv", outputs: {}, meta: {} },
      "done",
    ]);
    for (let a = 0; a <= bytes.length; a++) {
      for (const b of [a, Math.min(bytes.length, a + 1), Math.min(bytes.length, a + 7)]) {
        assert.deepEqual(read([bytes.subarray(0, a), bytes.subarray(a, b), bytes.subarray(b)]), whole, `split at ${a}/${b}`);
      }
    }
    assert.deepEqual(read([...bytes].map((x) => Buffer.from([x]))), whole);
  });

  test("a truncated stream or a bad frame header is a protocol error", () => {
    const bytes = sample();
    const code = (f: () => void) => {
      try {
        f();
      } catch (e) {
        return isFerryError(e) ? e.code : String(e);
      }
      return "none";
    };
    assert.equal(code(() => read([bytes.subarray(0, bytes.length - 1)])), "FERRY_EVAL_PROTOCOL");
    assert.equal(code(() => read([Buffer.from("hello\n")])), "FERRY_EVAL_PROTOCOL");
    const badKind = Buffer.from(bytes);
    badKind[4] = 0x21;
    assert.equal(code(() => read([badKind])), "FERRY_EVAL_PROTOCOL");
    // Job frames whose fields do not fit the frame, carry bytes after the meta, or a meta that is not an object.
    const jobFrame = (payload: Buffer) => Buffer.concat([Buffer.from([payload.length & 255, payload.length >> 8, 0, 0, FRAME_JOB]), payload]);
    const field = (v: string) => Buffer.concat([Buffer.from([Buffer.byteLength(v), 0, 0, 0]), Buffer.from(v)]);
    const fields = (meta: string) => Buffer.concat([field("a"), field("a"), field("x86_64-linux"), field("/nix/store/f-a.drv"), Buffer.from([0, 0, 0, 0]), field(meta)]);
    assert.equal(code(() => read([jobFrame(fields("{}"))])), "none");
    assert.equal(code(() => read([jobFrame(fields("{}").subarray(0, 20))])), "FERRY_EVAL_PROTOCOL");
    assert.equal(code(() => read([jobFrame(Buffer.concat([fields(""), Buffer.from("x")]))])), "FERRY_EVAL_PROTOCOL");
    assert.equal(code(() => read([jobFrame(fields("[1]"))])), "FERRY_EVAL_PROTOCOL");
    assert.equal(code(() => read([jobFrame(fields("{"))])), "FERRY_EVAL_PROTOCOL");
    // Outputs: one named like an Object.prototype member is kept; one named twice is refused.
    const withOutputs = (...names: string[]) =>
      Buffer.concat([field("a"), field("a"), field("x86_64-linux"), field("/nix/store/f-a.drv"), Buffer.from([names.length, 0, 0, 0]), ...names.flatMap((n) => [field(n), field(`/nix/store/g-${n}`)]), field("")]);
    const proto = decodeJob(jobFrame(withOutputs("__proto__", "out")), 5, 5 + withOutputs("__proto__", "out").length);
    assert.deepEqual(Object.entries(proto.outputs), [["__proto__", "/nix/store/g-__proto__"], ["out", "/nix/store/g-out"]]);
    assert.equal(code(() => read([jobFrame(withOutputs("out", "out"))])), "FERRY_EVAL_PROTOCOL");
  });
});

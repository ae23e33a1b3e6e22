/**
 * The realiser at the real seam: bubblewrap, real builders, real files. The public vectors
 * are built and must come out exactly as Nix built them: same NAR hashes, same references.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { ferry, ferryOk, spawnFerry } from "../helpers/cli.js";
import { tempDir } from "../helpers/fs-trees.js";
import { bwrapArgs } from "../../src/build/sandbox.js";
import { drvVectors, writeVectorPackageSet } from "../helpers/vector-fixture.js";

function storeFlags(root: string, storeDir = "/ferry/store"): string[] {
  return ["--root", root, "--store-dir", storeDir, "--state-dir", storeDir === "/nix/store" ? "/nix/var" : "/ferry/var"];
}

function pathInfo(flags: string[], p: string): { narHash: string; narSize: number; references: string[]; deriver?: string; ca?: string } {
  return JSON.parse(ferryOk(["store", "path-info", "--json", ...flags, p]))[0];
}

describe("realiser", () => {
  let dir: string;
  let pkgs: string;
  before(() => {
    dir = tempDir("ferry-build-");
    pkgs = writeVectorPackageSet(dir);
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  for (const storeDir of ["/nix/store", "/ferry/store"]) {
    test(`the vectors build sandboxed to exactly Nix's outputs (${storeDir})`, () => {
      const flags = storeFlags(join(dir, `vec-${storeDir.split("/")[1]}`), storeDir);
      ferryOk(["build", "-j", "2", ...flags, pkgs]);
      let checked = 0;
      for (const v of drvVectors().filter((x) => x.store_dir === storeDir)) {
        for (const [o, r] of Object.entries(v.realised ?? {})) {
          const info = pathInfo(flags, r.path);
          assert.equal(info.narHash, r.nar_hash, `${v.attr}.${o} NAR hash`);
          assert.equal(info.narSize, r.nar_size, `${v.attr}.${o} NAR size`);
          assert.deepEqual(info.references, [...r.references].sort(), `${v.attr}.${o} references`);
          checked++;
        }
      }
      assert.ok(checked >= 8);
      // Building again builds nothing.
      const again = JSON.parse(ferryOk(["build", "--json", ...flags, pkgs]).trim().split("\n").pop()!);
      assert.ok(again.results.every((r: { status: string }) => r.status === "valid"));
    });
  }

  test("a failing build keeps its log, skips its dependents, and registers nothing", () => {
    const root = join(dir, "fail");
    const mod = join(dir, "fail.ts");
    fs.writeFileSync(mod, `
      import { derivation } from "ferry";
      export const broken = derivation({ name: "broken", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo about to fail; echo details >&2; exit 3"] });
      export const after = derivation({ name: "after", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $dep > $out"], dep: broken });
      export const fine = derivation({ name: "fine", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo ok > $out"] });
    `);
    const r = ferry(["build", "--json", "--keep-failed", ...storeFlags(root), mod]);
    assert.equal(r.status, 1);
    const lines = r.stdout.toString().trim().split("\n");
    const results = JSON.parse(lines.find((l) => l.startsWith('{"results"'))!).results as { drvPath: string; status: string; error?: { code: string } }[];
    const byName = (n: string) => results.find((x) => x.drvPath.endsWith(`-${n}.drv`))!;
    assert.equal(byName("broken").status, "failed");
    assert.equal(byName("broken").error!.code, "FERRY_BUILD_FAILED");
    assert.equal(byName("after").status, "dependency-failed");
    assert.equal(byName("fine").status, "built");
    const log = ferryOk(["log", ...storeFlags(root), byName("broken").drvPath]);
    assert.match(log, /about to fail/);
    assert.match(log, /details/);
    const events = lines.filter((l) => l.startsWith('{"event"')).map((l) => JSON.parse(l));
    const failed = events.find((e) => e.event === "build:failed");
    assert.ok(failed.keptBuildDir && fs.existsSync(failed.keptBuildDir), "--keep-failed keeps the build directory");
    fs.rmSync(failed.keptBuildDir, { recursive: true, force: true });
  });

  test("a fixed output with the wrong hash fails with both hashes and registers nothing", () => {
    const root = join(dir, "fod");
    const mod = join(dir, "fod.ts");
    fs.writeFileSync(mod, `
      import { derivation } from "ferry";
      export const wrong = derivation({ name: "wrong", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo surprise > $out"],
        outputHashMode: "flat", outputHash: "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=" });
    `);
    const r = ferry(["build", ...storeFlags(root), mod]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /hash mismatch in fixed-output derivation wrong/);
    assert.match(r.stderr, /specified: sha256-47DEQpj8HBSa\+\/TImW\+5JCeuQeRkm5NMpJWZG3hSuFU=/);
    assert.match(r.stderr, /got: +sha256-/);
    const entries = fs.readdirSync(join(root, "ferry", "store")).filter((n) => !n.endsWith(".drv"));
    assert.deepEqual(entries, [], "no output and no leftover build area");
  });

  test("the sandbox hides the host and the network; fixed outputs may use the network", () => {
    const root = join(dir, "iso");
    const mod = join(dir, "iso.ts");
    fs.writeFileSync(mod, `
      import { derivation } from "ferry";
      export const probe = derivation({ name: "probe", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", [
        "exec > $out",
        "echo uid=$(/usr/bin/id -u)",
        "[ -e /root ] && echo root-visible || echo root-hidden",
        "[ -e /work ] && echo work-visible || echo work-hidden",
        "[ -e /etc/shadow ] && echo shadow-visible || echo shadow-hidden",
        "echo home=$HOME pwd=$(pwd) top=$NIX_BUILD_TOP tmp=$TMPDIR",
        "echo x > /ferry/store/intruder 2>/dev/null && echo wrote-store || echo store-closed",
        "echo interfaces: $(/usr/bin/tail -n +3 /proc/net/dev | /usr/bin/cut -d: -f1 | /usr/bin/tr -d ' ' | /usr/bin/tr '\\\\n' ' ')",
        "[ -L /bin ] && echo bin-link=$(/usr/bin/readlink /bin) || echo bin-dir",
      ].join("; ")] });
      // A fixed output may reach the network (its result is checked by hash); kept with a wrong hash to look inside.
      export const fprobe = derivation({ name: "fprobe", system: "x86_64-linux", builder: "/bin/sh",
        args: ["-c", "echo interfaces: $(/usr/bin/tail -n +3 /proc/net/dev | /usr/bin/cut -d: -f1 | /usr/bin/tr -d ' ' | /usr/bin/tr '\\\\n' ' ') > $out"],
        outputHashMode: "flat", outputHash: "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=" });
    `);
    const out = ferryOk(["build", ...storeFlags(root), `${mod}#probe`]).trim();
    const text = fs.readFileSync(join(root, out), "utf8");
    assert.match(text, /uid=1000/);
    assert.match(text, /root-hidden/);
    assert.match(text, /work-hidden/);
    assert.match(text, /shadow-hidden/);
    assert.match(text, /home=\/homeless-shelter pwd=\/build top=\/build tmp=\/build/);
    assert.doesNotMatch(text, /wrote-store\n.*intruder/);
    assert.ok(!fs.existsSync(join(root, "ferry", "store", "intruder")), "a builder cannot add to the real store");
    assert.match(text, /interfaces: lo\n/, "no network but loopback");
    // A merged-/usr host's /bin is the same symlink inside (no mount of its own), and works.
    assert.match(text, fs.lstatSync("/bin").isSymbolicLink() ? new RegExp(`bin-link=${fs.readlinkSync("/bin")}\n`) : /bin-dir\n/);
    const hostIfaces = fs.readFileSync("/proc/net/dev", "utf8").split("\n").slice(2).map((l) => l.split(":")[0]!.trim()).filter((x) => x);
    const f = ferry(["build", "--keep-failed", "--json", ...storeFlags(root), `${mod}#fprobe`]);
    assert.equal(f.status, 1);
    const kept = f.stdout.toString().split("\n").filter((l) => l.includes('"build:failed"')).map((l) => JSON.parse(l).keptBuildDir)[0] as string;
    const seen = fs.readFileSync(join(kept, "store", fs.readdirSync(join(kept, "store")).find((n) => n.endsWith("-fprobe"))!), "utf8");
    assert.equal(seen.trim(), `interfaces: ${hostIfaces.join(" ")}`, "a fixed-output build shares the host's network");
    fs.rmSync(kept, { recursive: true, force: true });
  });

  test("host paths that are symlinks into another host path become symlinks, not mounts", () => {
    const host = join(dir, "host");
    fs.mkdirSync(join(host, "usr", "bin"), { recursive: true });
    fs.symlinkSync("usr/bin", join(host, "bin"));
    fs.symlinkSync("/nonexistent/lib", join(host, "lib"));
    fs.symlinkSync(join(host, "usr"), join(host, "usr-again"));
    const args = bwrapArgs({
      storeDir: "/ferry/store", outputStoreReal: "/tmp/out", inputs: [], buildDirReal: "/tmp/build", files: [], network: false, builder: "/bin/sh", args: [],
      hostPaths: [join(host, "bin"), join(host, "usr"), join(host, "lib"), join(host, "usr-again"), join(host, "missing")],
    });
    const pairs = args.map((a, i) => `${a} ${args[i + 1]} ${args[i + 2]}`);
    assert.ok(pairs.includes(`--symlink usr/bin ${join(host, "bin")}`), "a relative link into /usr");
    assert.ok(pairs.includes(`--ro-bind ${join(host, "usr")} ${join(host, "usr")}`));
    assert.ok(pairs.includes(`--symlink ${join(host, "usr")} ${join(host, "usr-again")}`), "an absolute link to a bound directory");
    assert.ok(!args.includes(join(host, "lib")), "a dangling link is left out, like a missing path");
    assert.ok(!args.includes(join(host, "missing")));
  });

  test("--max-silent-time and --timeout stop the whole process tree", () => {
    const root = join(dir, "timeout");
    const mod = join(dir, "slow.ts");
    const marker = join(dir, "orphan-marker");
    fs.writeFileSync(mod, `
      import { derivation } from "ferry";
      export const slow = derivation({ name: "slow", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "(/bin/sleep 3; echo alive > /build/late) & /bin/sleep 30"] });
    `);
    const t0 = Date.now();
    const r = ferry(["build", "--max-silent-time", "1", "--keep-failed", "--json", ...storeFlags(root), mod]);
    assert.equal(r.status, 1);
    assert.ok(Date.now() - t0 < 15000, "stopped long before the builder would have finished");
    assert.match(r.stdout.toString(), /FERRY_BUILD_SILENT/);
    const kept = r.stdout.toString().split("\n").filter((l) => l.includes('"build:failed"')).map((l) => JSON.parse(l).keptBuildDir)[0];
    // The background child must be gone too: it would write /build/late after 3 s.
    const until = Date.now() + 4000;
    while (Date.now() < until) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 200);
    assert.ok(!fs.existsSync(join(kept, "build", "late")), "no process of the build survives it");
    fs.rmSync(kept, { recursive: true, force: true });
    void marker;
    const r2 = ferry(["build", "--timeout", "1", ...storeFlags(root), mod]);
    assert.match(r2.stderr, /ran longer than 1 s/);
  });

  test("--check tells reproducible builds from ones that are not, naming the files", () => {
    const root = join(dir, "check");
    const mod = join(dir, "check.ts");
    fs.writeFileSync(mod, `
      import { derivation } from "ferry";
      export const stable = derivation({ name: "stable", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "/bin/mkdir $out; echo same > $out/a"] });
      export const unstable = derivation({ name: "unstable", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "/bin/mkdir $out; echo same > $out/a; /bin/cat /proc/sys/kernel/random/uuid > $out/b"] });
    `);
    ferryOk(["build", ...storeFlags(root), mod]);
    const ok = ferry(["build", "--check", ...storeFlags(root), `${mod}#stable`]);
    assert.equal(ok.status, 0, ok.stderr);
    assert.match(ok.stderr, /stable: reproducible/);
    const bad = ferry(["build", "--check", ...storeFlags(root), `${mod}#unstable`]);
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /unstable: NOT reproducible/);
    assert.match(bad.stderr, /-unstable\/b/);
    assert.doesNotMatch(bad.stderr, /-unstable\/a/);
  });

  test("without bubblewrap Ferry refuses to build unless told --no-sandbox", () => {
    const mod = join(dir, "nosb.ts");
    fs.writeFileSync(mod, `import { derivation } from "ferry";
      export const x = derivation({ name: "x", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo > $out"] });`);
    const r = ferry(["build", ...storeFlags(join(dir, "nosb")), mod], { env: { FERRY_BWRAP: "/nonexistent/bwrap" } });
    assert.equal(r.status, 1);
    assert.match(r.stderr, /FERRY_BUILD_NO_SANDBOX/);
    assert.match(r.stderr, /--no-sandbox/);
  });

  test("a derivation for a system this machine cannot run is refused clearly", () => {
    const mod = join(dir, "sys.ts");
    fs.writeFileSync(mod, `import { derivation } from "ferry";
      export const x = derivation({ name: "x", system: "riscv64-linux", builder: "/bin/sh", args: ["-c", "echo > $out"] });`);
    const r = ferry(["build", ...storeFlags(join(dir, "sys")), mod]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /x is for riscv64-linux, and this machine builds for x86_64-linux/);
  });

  test("Ctrl-C cancels: the builders' process trees die and nothing new starts", async () => {
    const root = join(dir, "cancel");
    const mod = join(dir, "cancel.ts");
    fs.writeFileSync(mod, `
      import { derivation } from "ferry";
      export const slow = derivation({ name: "slow", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "(/bin/sleep 3; echo alive > /build/late) & echo started; /bin/sleep 30"] });
      export const later = derivation({ name: "later", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $slow > $out"], slow });
    `);
    const p = spawnFerry(["build", "--json", "--keep-failed", ...storeFlags(root), mod]);
    let stdout = "";
    p.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
    const exited = new Promise<number | null>((res) => p.on("exit", (code) => res(code)));
    while (!stdout.includes('"build:started"')) await new Promise((r) => setTimeout(r, 50));
    await new Promise((r) => setTimeout(r, 300));
    p.kill("SIGINT");
    assert.equal(await exited, 130);
    const failed = stdout.split("\n").filter((l) => l.includes('"build:failed"')).map((l) => JSON.parse(l));
    assert.equal(failed[0].error.code, "FERRY_BUILD_CANCELLED");
    await new Promise((r) => setTimeout(r, 3500));
    assert.ok(!fs.existsSync(join(failed[0].keptBuildDir, "build", "late")), "no process of the build survives");
    const results = JSON.parse(stdout.split("\n").find((l) => l.startsWith('{"results"'))!).results as { drvPath: string; status: string }[];
    assert.ok(results.every((r) => r.status !== "built"));
    fs.rmSync(failed[0].keptBuildDir, { recursive: true, force: true });
  });
});

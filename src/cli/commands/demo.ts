/**
 * `ferry demo`: Ferry's main job on its embedded defaults. For now: add a tree to the store,
 * sign it, export and re-import it into a second store, verify; then evaluate a small package
 * set written in TypeScript and build it in the sandbox, twice, to show it is reproducible;
 * then publish the build to a binary cache served over HTTP on loopback and substitute it
 * into a fresh store, signature checked. Later issues grow it into the farm-to-fleet story.
 */
import { Command } from "commander";
import { randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import { join } from "node:path";
import { generateSecretKey, printPublicKey, verifySignature, publicKeyOf } from "../../core/signing.js";
import { resolveStoreLocation } from "../../store/config.js";
import { LocalStore } from "../../store/local-store.js";
import { printHash } from "../../core/hash.js";
import { withStoreOptions, storeLocation, type StoreFlags } from "../store-options.js";
import { note } from "../output.js";

export function demoCommand(): Command {
  return withStoreOptions(new Command("demo"))
    .description("run a short tour of Ferry on the default store (/ferry/store unless told otherwise)")
    .action(async (f: StoreFlags) => {
      const loc = storeLocation(f);
      const work = fs.mkdtempSync(join(os.tmpdir(), "ferry-demo-"));
      const say = (s: string) => note(s);
      try {
        say(`Ferry demo: store ${loc.storeDir} (state ${loc.stateDir}${loc.root ? `, files under ${loc.root}` : ""})`);
        const src = join(work, "buoy-config");
        fs.mkdirSync(join(src, "bin"), { recursive: true });
        fs.writeFileSync(join(src, "station.conf"), "station = buoy-17\nreport-interval = 60s\n");
        fs.writeFileSync(join(src, "bin", "report"), "#!/bin/sh\necho \"buoy-17 ok\"\n", { mode: 0o755 });
        fs.symlinkSync("bin/report", join(src, "run"));
        const store = LocalStore.open(loc);
        try {
          const added = store.addPath(src);
          const info = store.requirePathInfo(added.path);
          say(`1. added a small tree -> ${added.path}`);
          say(`   NAR hash ${printHash(info.narHash, "sri")}, ${info.narSize} bytes (the same path Nix gives it)`);
          const key = generateSecretKey("ferry-demo-1");
          store.sign([added.path], key);
          const signed = store.requirePathInfo(added.path);
          const ok = signed.sigs.some((sig) => verifySignature([publicKeyOf(key)], store.fingerprint(signed), sig));
          say(`2. signed it with ${printPublicKey(key)}: signature ${ok ? "verifies" : "DOES NOT verify"}`);
          const chunks: Uint8Array[] = [];
          store.exportPaths([added.path], (c) => chunks.push(new Uint8Array(c))); // copy: the chunk is reused after the call
          const other = LocalStore.open(resolveStoreLocation({ storeDir: loc.storeDir, stateDir: loc.stateDir, root: join(work, "second-store") }));
          try {
            const { results, error } = await other.importStream((async function* () { yield* chunks; })());
            if (error) throw error;
            say(`3. exported it (${chunks.reduce((n, c) => n + c.length, 0)} bytes) and imported it into a second store: ${results.map((r) => r.status).join(", ")}`);
            const v = other.verify();
            say(`4. verified the second store: ${v.filter((x) => x.status === "ok").length}/${v.length} paths intact`);
          } finally {
            other.close();
          }
          store.addRoot("ferry-demo", added.path);
          const kept = store.gc({ dryRun: true });
          say(`5. rooted it as 'ferry-demo'; a garbage collection now would delete ${kept.deleted.length} unrooted paths and keep ${kept.roots.length} roots`);
          store.removeRoot("ferry-demo");
          const built = await demoBuild(store, work, say);
          if (built) await demoCache(store, built, work, say);
          if (built) await demoFarm(store, work, say);
          say("done. Try: ferry store path-info --json " + added.path);
        } finally {
          store.close();
        }
      } finally {
        fs.rmSync(work, { recursive: true, force: true });
      }
    });
}

const DEMO_PACKAGES = String.raw`import { derivation, runCommand } from "ferry";

// A station's configuration and the report program that reads it.
export const config = derivation({
  name: "buoy-17-config", system: "x86_64-linux", builder: "/bin/sh",
  args: ["-c", "echo 'station=buoy-17 interval=60' > $out"],
});
export const report = runCommand("buoy-report", { config }, [
  "mkdir -p $out/bin",
  "echo '#!/bin/sh' > $out/bin/report",
  "echo cat $config >> $out/bin/report",
  "chmod +x $out/bin/report",
].join("; "));
`;

/** Evaluates and builds a tiny package set, sandboxed when bubblewrap is there. */
async function demoBuild(store: LocalStore, work: string, say: (s: string) => void): Promise<string | undefined> {
  const { evaluate } = await import("../../dsl/evaluate.js");
  const { storePort } = await import("./eval.js");
  const { realise } = await import("../../build/realise.js");
  const { sandboxAvailable } = await import("../../build/sandbox.js");
  const file = join(work, "packages.ts");
  fs.writeFileSync(file, DEMO_PACKAGES);
  const { jobs } = await evaluate({ file, storeDir: store.storeDir, store: storePort(store) });
  const report = jobs.find((j) => j.attr === "report")!;
  say(`6. evaluated a package set written in TypeScript: ${jobs.length} derivations, e.g. ${report.drvPath}`);
  const sandbox = sandboxAvailable().ok;
  if (!sandbox && store.loc.root) {
    say("   (skipping the build: bubblewrap is not installed and builds without it need the store at its real place)");
    return undefined;
  }
  const first = await realise(store, [report.drvPath], { sandbox, jobs: 2 });
  const out = report.outputs.out!;
  say(`7. built it ${sandbox ? "in the bubblewrap sandbox" : "WITHOUT a sandbox (bubblewrap is not installed)"}: ${first.map((o) => o.status).join(", ")} -> ${out}`);
  if (sandbox) {
    const again = await realise(store, [report.drvPath], { sandbox, check: true });
    const c = again.find((o) => o.drvPath === report.drvPath);
    const checked = c && "checked" in c ? c.checked : undefined;
    say(`8. rebuilt it with --check: ${checked?.reproducible ? "bit-for-bit the same" : `differs in ${checked?.differences.join(", ")}`}`);
  }
  const refs = store.requirePathInfo(out).references;
  say(`   its runtime references, found by scanning: ${refs.length ? refs.join(", ") : "none"}`);
  return out;
}

/** Publishes `path`'s closure to a cache served on loopback and substitutes it into a new store. */
async function demoCache(store: LocalStore, path: string, work: string, say: (s: string) => void): Promise<void> {
  const { FileBackend } = await import("../../cache/file-backend.js");
  const { startCacheServer } = await import("../../cache/server.js");
  const { openBackend } = await import("../../cache/open.js");
  const { copyToCache } = await import("../../cache/upload.js");
  const { BinaryCache } = await import("../../cache/binary-cache.js");
  const { CacheSubstituter } = await import("../../cache/substituter.js");
  const key = generateSecretKey("ferry-demo-cache-1");
  const token = randomBytes(16).toString("hex");
  const server = await startCacheServer({ backend: FileBackend.open(join(work, "cache")), stagingDir: join(work, "cache-uploads"), secretKey: key, uploadToken: token, storeDir: store.storeDir });
  try {
    const backend = await openBackend(server.url, { token });
    const up = await copyToCache(store, backend, [path]);
    await backend.close();
    const uploaded = up.filter((r) => r.status === "ok" && r.value.uploaded).length;
    say(`9. served a binary cache on ${server.url} and uploaded the build's closure to it: ${uploaded} paths (zstd NARs, narinfos signed by the server)`);
    const device = LocalStore.open(resolveStoreLocation({ storeDir: store.storeDir, stateDir: store.loc.stateDir, root: join(work, "device-store") }));
    try {
      const sub = new CacheSubstituter(device, [await BinaryCache.open(server.url, { storeDir: store.storeDir })], { trustedKeys: [publicKeyOf(key)] });
      const got = await sub.substituteClosure([path]);
      await sub.close();
      const v = device.verify();
      say(`10. a fresh store substituted it from the cache, trusting only ${printPublicKey(key).split(":")[0]}: ${got.filter((r) => r.status === "ok").length} paths, ${v.filter((x) => x.status === "ok").length}/${v.length} intact`);
    } finally {
      device.close();
    }
  } finally {
    await server.close();
  }
}

/**
 * The farm on one machine: a coordinator on its embedded database, the package set (plus one
 * new job) as a jobset in a git repository, and one local worker that builds it in the sandbox
 * and uploads to the farm cache.
 */
async function demoFarm(store: LocalStore, work: string, say: (s: string) => void): Promise<void> {
  const { execFileSync, spawn } = await import("node:child_process");
  const { openFarmDatabase, migrateFarmDatabase } = await import("../../farm/db/index.js");
  const { startCoordinator } = await import("../../farm/coordinator.js");
  const repo = join(work, "farm-repo");
  fs.mkdirSync(repo);
  const extra = `\nexport const selfTest = derivation({ name: "buoy-17-self-test", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo checked on the farm > $out"] });\n`;
  fs.writeFileSync(join(repo, "packages.ts"), DEMO_PACKAGES + extra);
  const git = (...a: string[]) => execFileSync("git", ["-c", "user.name=demo", "-c", "user.email=demo@example.org", "-C", repo, ...a], { stdio: "ignore" });
  git("init", "--quiet", "--initial-branch=main");
  git("add", ".");
  git("commit", "--quiet", "-m", "station packages");
  const dataDir = join(work, "farm");
  const fdb = await openFarmDatabase({ dataDir });
  await migrateFarmDatabase(fdb);
  const c = await startCoordinator({ db: fdb, store, dataDir, adminToken: "demo-admin", workerToken: "demo-worker", checkEveryMs: 0, dispatch: { leaseMs: 10_000 } });
  const worker = spawn(process.execPath, [process.argv[1]!, "worker", "--farm", c.url, "--id", "demo-worker", "--store-dir", store.storeDir, "--root", join(work, "worker"), "--state-dir", store.loc.stateDir], {
    stdio: "ignore",
    env: { ...process.env, FERRY_WORKER_TOKEN: "demo-worker" },
  });
  try {
    const call = async (method: string, path: string, body?: unknown) =>
      (await (await fetch(c.url + path, { method, headers: { authorization: "Bearer demo-admin", "content-type": "application/json" }, ...(body ? { body: JSON.stringify(body) } : {}) })).json()) as Record<string, unknown>;
    await call("PUT", "/api/projects/buoys/jobsets/station", { repo, file: "packages.ts", checkInterval: 0 });
    const ev = await call("POST", "/api/projects/buoys/jobsets/station/evaluations?wait=1");
    say(`11. farm: coordinator on ${c.url} (embedded database), jobset buoys/station evaluated: ${String(ev.builds)} builds, ${String(ev.newSteps)} to build`);
    const deadline = Date.now() + 120_000;
    let builds: { job: string; status: string }[] = [];
    while (Date.now() < deadline) {
      builds = (await (await fetch(`${c.url}/api/projects/buoys/jobsets/station/builds`)).json()) as { job: string; status: string }[];
      if (builds.every((b) => b.status !== "queued")) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    say(`12. a local worker built them in the sandbox and uploaded to the farm cache: ${builds.map((b) => `${b.job} ${b.status}`).join(", ")}`);
  } finally {
    worker.kill("SIGTERM");
    await c.close();
    await fdb.close();
  }
}

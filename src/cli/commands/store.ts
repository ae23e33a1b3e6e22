/** `ferry store …`: the local store's commands. */
import { Command, Option } from "commander";
import { FerryError } from "../../core/errors.js";
import { parseHashAlgo, printHash } from "../../core/hash.js";
import { printContentAddress } from "../../core/store-path.js";
import { readSecretKeyFile } from "../key-files.js";
import { writeAllSync } from "../../store/fs-util.js";
import { computeSourcePath, type LocalStore, type PathInfo } from "../../store/local-store.js";
import { storeLocation, withStore, withStoreOptions, type StoreFlags } from "../store-options.js";
import { humanBytes, note, out, outJson, progressLine } from "../output.js";

/** The JSON shape of `nix path-info --json` (Nix 2.8), which tools already parse. */
export function pathInfoJson(info: PathInfo): Record<string, unknown> {
  return {
    path: info.path,
    narHash: printHash(info.narHash, "sri"),
    narSize: info.narSize,
    references: info.references,
    ...(info.deriver ? { deriver: info.deriver } : {}),
    registrationTime: info.registrationTime,
    ...(info.ultimate ? { ultimate: true } : {}),
    ...(info.sigs.length ? { signatures: info.sigs } : {}),
    ...(info.ca ? { ca: printContentAddress(info.ca) } : {}),
    valid: true,
  };
}

function countingProgress(verb: string) {
  const p = progressLine();
  let files = 0;
  let bytes = 0;
  return {
    onFile: (size: number) => {
      files++;
      bytes += size;
      p.update(`${verb} ${files} files, ${humanBytes(bytes)}`);
    },
    done: () => p.done(),
  };
}

export function storeCommand(): Command {
  const cmd = new Command("store").description("the local content-addressed store");

  cmd.addCommand(
    withStoreOptions(new Command("add"))
      .description("add a file or directory to the store as a source object and print its store path")
      .argument("<path>")
      .option("--name <name>", "store path name (default: the basename of PATH)")
      .option("--dry-run", "compute and print the store path without writing anything")
      .option("--add-root <name>", "also make it a GC root called NAME, with no window in which GC could take it")
      .action(async (path: string, f: StoreFlags & { name?: string; dryRun?: boolean; addRoot?: string }) => {
        const prog = countingProgress(f.dryRun ? "hashing" : "adding");
        if (f.dryRun) {
          // No store is opened: a dry run works without write access.
          const r = computeSourcePath(storeLocation(f).storeDir, path, { name: f.name, onFile: prog.onFile });
          prog.done();
          out(r.path);
          return;
        }
        await withStore(f, (s) => {
          const r = s.addPath(path, { name: f.name, onFile: prog.onFile });
          prog.done();
          // The handle's temp root protects the path until the root exists.
          if (f.addRoot) s.addRoot(f.addRoot, r.path);
          out(r.path);
        });
      }),
  );

  cmd.addCommand(
    withStoreOptions(new Command("add-fixed"))
      .description("add PATH as a fixed-output object (like `nix-store --add-fixed`)")
      .argument("<path>")
      .option("--recursive", "hash the NAR of PATH instead of its flat bytes")
      .option("--type <algo>", "hash algorithm", "sha256")
      .option("--name <name>", "store path name (default: the basename of PATH)")
      .option("--dry-run", "print the store path without writing")
      .action(async (path: string, f: StoreFlags & { recursive?: boolean; type: string; name?: string; dryRun?: boolean }) => {
        await withStore(f, (s) => {
          const r = s.addFixed(path, { recursive: !!f.recursive, algo: parseHashAlgo(f.type), name: f.name, dryRun: !!f.dryRun });
          out(r.path);
        });
      }),
  );

  cmd.addCommand(
    withStoreOptions(new Command("path-info"))
      .description("show what the store knows of PATHs (hash, size, references, signatures)")
      .argument("<paths...>")
      .option("--json", "print JSON like `nix path-info --json`")
      .option("--closure", "include everything the paths reference, recursively")
      .action(async (paths: string[], f: StoreFlags & { json?: boolean; closure?: boolean }) => {
        await withStore(f, (s) => {
          const all = f.closure ? s.closure(paths) : paths.map((p) => s.requirePathInfo(p).path);
          const infos = all.map((p) => s.requirePathInfo(p));
          if (f.json) outJson(infos.map(pathInfoJson));
          else for (const i of infos) out(`${i.path}\t${printHash(i.narHash, "sri")}\t${i.narSize}`);
        });
      }),
  );

  cmd.addCommand(
    withStoreOptions(new Command("verify"))
      .description("re-hash store objects and report any that are missing or corrupt")
      .argument("[paths...]", "only these paths (default: every valid path)")
      .option("--repair", "restore damaged paths from the configured binary caches")
      .option("--substituters <urls>", "with --repair: caches to restore from (default: config, $FERRY_SUBSTITUTERS)")
      .option("--trusted-public-keys <keys>", "with --repair: keys trusted on those caches")
      .option("--json", "print one result object per path")
      .action(async (paths: string[], f: StoreFlags & { repair?: boolean; json?: boolean; substituters?: string; trustedPublicKeys?: string }) => {
        // The cache client loads only for --repair: `ferry store …` stays quick to start.
        const settings = f.repair ? (await import("../../cache/settings.js")).resolveSubstitutionSettings({ substituters: f.substituters, trustedPublicKeys: f.trustedPublicKeys }) : undefined;
        if (settings && settings.substituters.length === 0) {
          throw new FerryError("FERRY_STORE_REPAIR_UNAVAILABLE", "--repair needs a binary cache to restore from, and no substituter is configured", {
            hint: "pass --substituters URL (and --trusted-public-keys), or set substituters in the config; without --repair, verify lists the damaged paths",
          });
        }
        await withStore(f, async (s) => {
          const p = progressLine();
          let n = 0;
          const results = s.verify(paths.length ? paths : undefined, (item) => p.update(`verified ${++n} paths (${item.path})`));
          p.done();
          const bad = results.filter((r) => r.status !== "ok");
          if (f.json && !settings) outJson(results);
          else for (const r of bad) out(`${r.status}\t${r.path}\texpected ${r.expected}${r.actual ? `, found ${r.actual}` : ""}`);
          note(`${results.length} paths checked, ${bad.length} damaged`);
          if (settings && bad.length) {
            const { CacheSubstituter } = await import("../../cache/substituter.js");
            const sub = await CacheSubstituter.open(s, settings, { token: process.env.FERRY_TOKEN });
            try {
              const repaired = await sub.repair(bad.map((r) => r.path));
              if (f.json) outJson(results.map((r) => ({ ...r, ...(r.status !== "ok" ? { repaired: repaired.find((x) => x.path === r.path)?.status === "ok" } : {}) })));
              for (const r of repaired) {
                if (r.status === "ok") note(`repaired ${r.path} from ${r.value.cache}`);
                else note(`error [${r.error.code}]: cannot repair ${r.path}: ${r.error.message}`);
              }
              const left = repaired.filter((r) => r.status === "error").length;
              note(`${bad.length - left} of ${bad.length} damaged paths repaired`);
              if (left) process.exitCode = 1;
            } finally {
              await sub.close();
            }
          } else if (bad.length) process.exitCode = 1;
        });
      }),
  );

  cmd.addCommand(
    withStoreOptions(new Command("gc"))
      .description("delete store objects that no GC root keeps alive")
      .option("--dry-run", "print what would be deleted, delete nothing")
      .option("--json", "print the result as JSON")
      .action(async (f: StoreFlags & { dryRun?: boolean; json?: boolean }) => {
        await withStore(f, (s) => {
          const r = s.gc({ dryRun: !!f.dryRun });
          if (f.json) outJson(r);
          else for (const p of r.deleted) out(p);
          note(`${f.dryRun ? "would delete" : "deleted"} ${r.deleted.length} paths (${humanBytes(r.bytesFreed)}), ${r.leftovers.length} leftovers; ${r.roots.length} roots kept`);
        });
      }),
  );

  cmd.addCommand(
    withStoreOptions(new Command("export"))
      .description("write PATHs as a `nix-store --export` stream to standard output")
      .argument("<paths...>")
      .action(async (paths: string[], f: StoreFlags) => {
        await withStore(f, (s) => s.exportPaths(paths, (c) => writeAllSync(1, c)));
      }),
  );

  cmd.addCommand(
    withStoreOptions(new Command("import"))
      .description("import a `nix-store --export` stream from standard input; prints the imported paths")
      .action(async (f: StoreFlags) => {
        await withStore(f, async (s) => {
          const { results, error } = await s.importStream(process.stdin);
          for (const r of results) {
            if (r.status === "ok") out(r.path);
            else note(`error [${r.error.code}]: ${r.path}: ${r.error.message}`);
          }
          if (error) throw error;
          if (results.some((r) => r.status === "error")) process.exitCode = 1;
        });
      }),
  );

  cmd.addCommand(
    withStoreOptions(new Command("sign"))
      .description("sign store paths with a secret key (Nix key-file format)")
      .addOption(new Option("--secret-key <file>", "secret key file").makeOptionMandatory())
      .argument("<paths...>")
      .action(async (paths: string[], f: StoreFlags & { secretKey: string }) => {
        const key = readSecretKeyFile(f.secretKey);
        await withStore(f, (s) => reportItems(s.sign(paths, key)));
      }),
  );

  cmd.addCommand(
    withStoreOptions(new Command("roots"))
      .description("list GC roots and the paths they keep")
      .action(async (f: StoreFlags) => {
        await withStore(f, (s) => {
          for (const r of s.findRoots()) out(`${r.link} -> ${r.path}`);
        });
      }),
  );

  cmd.addCommand(
    withStoreOptions(new Command("add-root"))
      .description("keep PATH (and its closure) alive under the root NAME")
      .argument("<name>")
      .argument("<path>")
      .action(async (name: string, path: string, f: StoreFlags) => {
        await withStore(f, (s) => out(s.addRoot(name, path)));
      }),
  );

  cmd.addCommand(
    withStoreOptions(new Command("remove-root"))
      .description("remove the GC root NAME")
      .argument("<name>")
      .action(async (name: string, f: StoreFlags) => {
        await withStore(f, (s) => {
          if (!s.removeRoot(name)) throw new FerryError("FERRY_STORE_NO_ROOT", `there is no GC root named '${name}'`, { hint: "`ferry store roots` lists them" });
        });
      }),
  );

  return cmd;
}

function reportItems(items: ReturnType<LocalStore["sign"]>): void {
  for (const r of items) {
    if (r.status === "ok") out(r.path);
    else note(`error [${r.error.code}]: ${r.path}: ${r.error.message}`);
  }
  if (items.some((r) => r.status === "error")) process.exitCode = 1;
}

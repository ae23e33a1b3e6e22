/** `ferry cache …`: serve a binary cache over HTTP, collect its garbage, pin what it must keep. */
import { Command, Option } from "commander";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createHash } from "node:crypto";
import { FerryError } from "../../core/errors.js";
import { classifyCacheKey } from "../../core/cache-layout.js";
import { parseCacheInfo } from "../../core/narinfo.js";
import { parseStorePath } from "../../core/store-path.js";
import { readSecretKeyFile } from "../key-files.js";
import { parseListen } from "../listen.js";
import { untilStopSignal } from "../signals.js";
import type { CacheBackend } from "../../cache/backend.js";
import { FileBackend } from "../../cache/file-backend.js";
import { openBackend } from "../../cache/open.js";
import { CacheServerEmitter, startCacheServer } from "../../cache/server.js";
import cluster from "node:cluster";
import { availableParallelism } from "node:os";
import { collectCacheGarbage, parseRoots } from "../../cache/gc.js";
import { DEFAULT_STORE_DIR } from "../../store/config.js";
import { humanBytes, note, out, outJson } from "../output.js";

interface BackendFlags {
  dir?: string;
  s3?: string;
  storeDir?: string;
}

function withBackendOptions(cmd: Command): Command {
  return cmd
    .option("--dir <dir>", "the cache is this directory (the layout of Nix's file:// caches)")
    .option("--s3 <url>", "the cache is an S3-compatible bucket: s3://bucket[/prefix][?endpoint=URL&region=R]")
    .addOption(new Option("--store-dir <dir>", "the store dir the cache is for (default: the cache's nix-cache-info, else /ferry/store)").env("FERRY_STORE_DIR"));
}

async function openCache(f: BackendFlags): Promise<{ backend: CacheBackend; name: string }> {
  if ((f.dir === undefined) === (f.s3 === undefined)) {
    throw new FerryError("FERRY_CACHE_NO_BACKEND", f.dir === undefined ? "no cache given" : "--dir and --s3 name two caches; give one", {
      hint: "give exactly one of --dir DIR or --s3 s3://bucket/prefix",
    });
  }
  if (f.dir !== undefined) {
    const dir = resolve(f.dir);
    return { backend: FileBackend.open(dir), name: dir };
  }
  if (!f.s3!.startsWith("s3://")) {
    throw new FerryError("FERRY_CACHE_BAD_URL", `'${f.s3}' is not an s3:// URL`, { hint: "use s3://bucket[/prefix][?endpoint=URL&region=R]" });
  }
  return { backend: await openBackend(f.s3!), name: f.s3! };
}

/** The store dir: the flag, else what the cache says, else Ferry's default; a contradiction is an error. */
async function cacheStoreDir(backend: CacheBackend, flag: string | undefined): Promise<string> {
  const bytes = await backend.readBytes("nix-cache-info");
  const stated = bytes ? parseCacheInfo(Buffer.from(bytes).toString("utf8"), { storeDir: "" }).storeDir : "";
  if (flag !== undefined && stated !== "" && stated !== flag) {
    throw new FerryError("FERRY_CACHE_STORE_DIR_MISMATCH", `the cache is for ${stated}, not ${flag}`, {
      hint: "drop --store-dir (and FERRY_STORE_DIR) or use a cache for that store dir",
    });
  }
  return flag ?? (stated || DEFAULT_STORE_DIR);
}

const DURATION_UNITS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 };

export function parseDuration(text: string): number {
  const m = /^(\d+(?:\.\d+)?)([smhdw])$/.exec(text.trim());
  if (text.trim() === "0") return 0;
  if (!m) {
    throw new FerryError("FERRY_CACHE_BAD_DURATION", `'${text}' is not a duration`, { hint: "use a number and a unit: 90s, 30m, 12h, 7d, 2w (or 0)" });
  }
  return Math.round(Number(m[1]) * DURATION_UNITS[m[2]!]!);
}

const SIZE_UNITS: Record<string, number> = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

export function parseSize(text: string): number {
  const m = /^(\d+)\s*([kmgt]?)(?:i?b)?$/i.exec(text.trim());
  const n = m ? Number(m[1]) * SIZE_UNITS[m[2]!.toLowerCase()]! : NaN;
  if (!m || !Number.isSafeInteger(n) || n <= 0) {
    throw new FerryError("FERRY_CACHE_BAD_SIZE", `'${text}' is not a size in bytes`, { hint: "e.g. 1048576, 512M, 4G" });
  }
  return n;
}

interface ServeFlags extends BackendFlags {
  workers?: string;
  listen: string;
  secretKey?: string;
  uploadToken?: string;
  readToken?: string;
  maxUploadSize?: string;
  priority?: string;
  stagingDir?: string;
  logRequests?: boolean;
}

/**
 * `--workers N`: N processes share the listening socket (the kernel spreads connections), each
 * with its own narinfo memory; an upload through one tells the others to forget that key. A
 * worker that dies is replaced. SIGTERM/SIGINT stop them all.
 */
async function superviseWorkers(n: number, name: string, backend: { close(): Promise<void> }): Promise<void> {
  await backend.close();
  cluster.schedulingPolicy = cluster.SCHED_NONE;
  let stopping = false;
  let listening = 0;
  const fork = () => {
    const w = cluster.fork();
    w.on("message", (m: { listening?: string; forget?: string }) => {
      // Announced once every first-generation worker accepts connections.
      if (m.listening !== undefined && ++listening === n) out(`ferry cache: serving ${name} on ${m.listening} (${n} worker processes)`);
      if (m.forget !== undefined) for (const other of Object.values(cluster.workers ?? {})) if (other && other !== w) other.send({ forget: m.forget });
    });
    w.on("exit", (code, signal) => {
      if (stopping) return;
      note(`ferry cache: worker ${w.process.pid} stopped (${signal ?? `status ${code}`}); starting another`);
      fork();
    });
  };
  for (let i = 0; i < n; i++) fork();
  await new Promise<void>((done) => {
    const stop = () => {
      stopping = true;
      const all = Object.values(cluster.workers ?? {}).filter((w) => w !== undefined);
      let left = all.length;
      if (left === 0) return done();
      for (const w of all) {
        w.once("exit", () => --left === 0 && done());
        w.disconnect();
      }
    };
    process.once("SIGTERM", stop);
    process.once("SIGINT", stop);
  });
}

async function serve(f: ServeFlags): Promise<void> {
  const { host, port } = parseListen(f.listen);
  const secretKey = f.secretKey === undefined ? undefined : readSecretKeyFile(f.secretKey);
  const maxNarSize = f.maxUploadSize === undefined ? undefined : parseSize(f.maxUploadSize);
  let priority: number | undefined;
  if (f.priority !== undefined) {
    if (!/^-?\d+$/.test(f.priority)) throw new FerryError("FERRY_CACHE_BAD_PRIORITY", `'${f.priority}' is not an integer priority`, { hint: "lower is preferred; Nix's default is 50, cache.nixos.org has 40" });
    priority = Number(f.priority);
  }
  const { backend, name } = await openCache(f);
  const storeDir = await cacheStoreDir(backend, f.storeDir);
  const stagingDir =
    f.stagingDir !== undefined ? resolve(f.stagingDir) : f.dir !== undefined ? join(resolve(f.dir), ".ferry-uploads") : join(tmpdir(), `ferry-cache-uploads-${createHash("sha256").update(name).digest("hex").slice(0, 12)}`);
  const workers = f.workers === undefined ? availableParallelism() : Number(f.workers);
  if (!Number.isInteger(workers) || workers < 1 || workers > 64) {
    throw new FerryError("FERRY_CACHE_BAD_WORKERS", `'${f.workers}' is not a number of worker processes`, { hint: "give 1 to 64; 'auto' uses one per core" });
  }
  if (workers > 1 && cluster.isPrimary) return superviseWorkers(workers, name, backend);
  const events = new CacheServerEmitter();
  events.on("cache:upload", (e) => {
    if (e.outcome !== "partial") note(`ferry cache: stored ${e.key} (${humanBytes(e.bytes)})`);
    // Sibling worker processes drop what they remember of the key.
    if (cluster.isWorker) process.send?.({ forget: e.key });
  });
  events.on("cache:rejected", (e) => {
    if (e.status >= 500) note(`ferry cache: ${e.method} ${e.key} failed: ${e.reason}`);
  });
  if (f.logRequests) events.on("cache:request", (e) => note(`${e.method} /${e.key} ${e.status} ${e.durationMs.toFixed(1)}ms`));
  const server = await startCacheServer({
    backend,
    host,
    port,
    secretKey,
    uploadToken: f.uploadToken || undefined,
    readToken: f.readToken || undefined,
    ...(maxNarSize !== undefined ? { maxNarSize } : {}),
    storeDir,
    ...(priority !== undefined ? { priority } : {}),
    stagingDir,
    events,
  });
  if (cluster.isWorker) {
    process.on("message", (m: { forget?: string }) => {
      if (typeof m?.forget === "string") server.forget(m.forget);
    });
    process.send?.({ listening: server.url });
    process.on("disconnect", () => void server.close().then(() => backend.close()).finally(() => process.exit(0)));
    return;
  }
  out(`ferry cache: serving ${name} on ${server.url}`);
  await untilStopSignal();
  await server.close().finally(() => backend.close());
}

export function cacheCommand(): Command {
  const cmd = new Command("cache").description("binary caches: serve one over HTTP (for Nix and Ferry), collect its garbage, pin roots");

  cmd.addCommand(
    withBackendOptions(new Command("serve"))
      .description("serve a binary cache over HTTP: Nix reads it as a substituter and writes it with `nix copy --to http://HOST:PORT`")
      .addHelpText("after", "\nPass tokens in FERRY_UPLOAD_TOKEN / FERRY_READ_TOKEN rather than flags (flags show in `ps`).\nNix sends them from a netrc file (`netrc-file` in nix.conf; the password is the token).")
      .option("--listen <host:port>", "address to listen on (port 0 picks a free one)", "127.0.0.1:8080")
      .option("--secret-key <file>", "sign every narinfo uploaded through the server with this key")
      .option("--workers <n>", "server processes sharing the port: a number, or 'auto' for one per core (the default, like nginx's worker_processes auto)", (v) => (v === "auto" ? String(availableParallelism()) : v))
      .addOption(new Option("--upload-token <token>", "the bearer token uploads need (no token: the server is read-only)").env("FERRY_UPLOAD_TOKEN"))
      .addOption(new Option("--read-token <token>", "the bearer token reads need (no token: reads are public)").env("FERRY_READ_TOKEN"))
      .option("--max-upload-size <bytes>", "largest NAR accepted, e.g. 4G (default 4 GiB; other objects 1 MiB)")
      .option("--priority <n>", "Priority in the generated nix-cache-info (default 40)")
      .option("--staging-dir <dir>", "where partial resumable uploads wait (default DIR/.ferry-uploads, or a temp dir for --s3)")
      .option("--log-requests", "print one line per request on stderr")
      .action(serve),
  );

  cmd.addCommand(
    withBackendOptions(new Command("gc"))
      .description("delete narinfos no root or recent build keeps, then the NARs no kept narinfo points at")
      .option("--keep-recent <duration>", "narinfos written this recently are roots (e.g. 7d, 12h)", "7d")
      .option("--grace <duration>", "NARs written this recently are kept (uploads whose narinfo is still coming)", "1h")
      .option("--dry-run", "print what would be deleted, delete nothing")
      .option("--json", "print the result as JSON")
      .action(async (f: BackendFlags & { keepRecent: string; grace: string; dryRun?: boolean; json?: boolean }) => {
        const keepRecentMs = parseDuration(f.keepRecent);
        const graceMs = parseDuration(f.grace);
        const { backend } = await openCache(f);
        try {
          const r = await collectCacheGarbage(backend, { keepRecentMs, graceMs, dryRun: !!f.dryRun });
          const p = r.plan;
          if (f.json) {
            outJson({
              dryRun: r.dryRun,
              deleted: r.deleted,
              bytesFreed: r.bytesFreed,
              failed: r.failed,
              planned: p.delete.length,
              plannedBytes: p.deleteBytes,
              kept: p.kept,
              missing: p.missing,
              items: r.dryRun ? p.delete.map((i) => ({ key: i.key, kind: i.kind, size: i.size, status: "planned", reason: i.reason })) : r.results,
            });
          } else if (r.dryRun) {
            for (const i of p.delete) out(i.key);
          } else {
            for (const i of r.results) if (i.status === "deleted") out(i.key);
            for (const i of r.results) if (i.status === "failed" || i.status === "spared") note(`${i.status} ${i.key}: ${i.reason ?? ""}`);
          }
          const did = r.dryRun ? `would delete ${p.delete.length} objects (${humanBytes(p.deleteBytes)})` : `deleted ${r.deleted} objects (${humanBytes(r.bytesFreed)})${r.failed ? `, ${r.failed} failed` : ""}`;
          note(`${did}; kept ${p.kept.narInfos} narinfos and ${p.kept.nars} NARs (${humanBytes(p.kept.bytes)})${p.missing.length ? `; ${p.missing.length} paths the kept closures need are missing` : ""}`);
          if (r.failed) process.exitCode = 1;
        } finally {
          await backend.close();
        }
      }),
  );

  cmd.addCommand(
    withBackendOptions(new Command("pin"))
      .description("make PATHs (and their closures) GC roots of the cache under NAME, replacing what NAME held")
      .argument("<name>", "the root's name: letters, digits, '.', '_' and '-'")
      .argument("<paths...>", "store paths")
      .action(async (rootName: string, paths: string[], f: BackendFlags) => {
        const key = rootKey(rootName);
        const { backend } = await openCache(f);
        try {
          const storeDir = await cacheStoreDir(backend, f.storeDir);
          for (const p of paths) parseStorePath(storeDir, p);
          await backend.write(key, Buffer.from(paths.map((p) => `${p}\n`).join("")), { contentType: "text/plain; charset=utf-8" });
          note(`pinned ${paths.length} paths as ${rootName}`);
        } finally {
          await backend.close();
        }
      }),
  );

  cmd.addCommand(
    withBackendOptions(new Command("unpin"))
      .description("remove the GC root NAME (its paths go at the next gc unless something else keeps them)")
      .argument("<name>")
      .action(async (rootName: string, f: BackendFlags) => {
        const key = rootKey(rootName);
        const { backend } = await openCache(f);
        try {
          const bytes = await backend.readBytes(key);
          if (!(await backend.delete(key))) {
            throw new FerryError("FERRY_CACHE_NO_ROOT", `the cache has no root named ${rootName}`, { hint: "list roots with `ls DIR/roots` (or the bucket's roots/ prefix)" });
          }
          note(`unpinned ${rootName} (${bytes ? parseRoots(Buffer.from(bytes).toString("utf8")).length : 0} paths)`);
        } finally {
          await backend.close();
        }
      }),
  );

  return cmd;
}

function rootKey(name: string): string {
  const key = `roots/${name}`;
  if (classifyCacheKey(key) !== "root") {
    throw new FerryError("FERRY_CACHE_BAD_ROOT_NAME", `'${name}' cannot be a root's name`, { hint: "use letters, digits, '.', '_' and '-' (at most 128, starting with a letter or digit)" });
  }
  return key;
}

/** `ferry copy --to URL PATH…` and `ferry copy --from URL PATH…`: closures to and from binary caches. */
import { Command, Option } from "commander";
import { FerryError, errorBody } from "../../core/errors.js";
import { parseCompression } from "../../core/cache-layout.js";
import { openBackend, parseCacheUrl } from "../../cache/open.js";
import { copyToCache, UploadEmitter } from "../../cache/upload.js";
import { BinaryCache } from "../../cache/binary-cache.js";
import { CacheSubstituter, SubstituteEmitter } from "../../cache/substituter.js";
import { resolveSubstitutionSettings } from "../../cache/settings.js";
import { withStore, withStoreOptions, type StoreFlags } from "../store-options.js";
import { readSecretKeyFile } from "../key-files.js";
import { humanBytes, note, out, progressLine } from "../output.js";

interface CopyFlags extends StoreFlags {
  to?: string;
  from?: string;
  token?: string;
  secretKey?: string;
  compression?: string;
  trustedPublicKeys?: string;
  requireSigs: boolean;
  jobs?: number;
  json?: boolean;
}

export function copyCommand(): Command {
  return withStoreOptions(new Command("copy"))
    .description("copy the closures of store PATHs to a binary cache (--to) or from one into the store (--from)")
    .argument("<paths...>")
    .option("--to <url>", "cache to upload to: file:///dir, /dir, s3://bucket/prefix, http(s)://host:port")
    .option("--from <url>", "cache to substitute from (same URL forms)")
    .option("--token <token>", "bearer token for an HTTP cache (default: $FERRY_TOKEN)")
    .option("--secret-key <file>", "with --to: also sign each narinfo with this key")
    .addOption(new Option("--compression <method>", "with --to: NAR compression").choices(["zstd", "xz", "bzip2", "br", "none"]).default("zstd"))
    .option("--trusted-public-keys <keys>", "with --from: keys whose signatures are trusted (space-separated; default from the config)")
    .option("--no-require-sigs", "with --from: accept narinfos without a trusted signature")
    .option("-j, --jobs <n>", "parallel transfers", (v) => Number(v))
    .option("--json", "print one JSON object with every path's outcome")
    .action(async (paths: string[], f: CopyFlags) => {
      if ((f.to === undefined) === (f.from === undefined)) {
        throw new FerryError("FERRY_USAGE", "give exactly one of --to URL and --from URL", { hint: "ferry copy --to URL PATH… uploads; ferry copy --from URL PATH… downloads" });
      }
      const token = f.token ?? process.env.FERRY_TOKEN;
      const progress = progressLine();
      await withStore(f, async (store) => {
        let results: { status: "ok" | "error"; path: string; error?: FerryError; value?: unknown }[];
        if (f.to !== undefined) {
          const backend = await openBackend(parseCacheUrl(f.to).url, { token });
          const events = new UploadEmitter();
          let done = 0;
          let total = 0;
          let bytes = 0;
          events.on("copy:planned", (e) => {
            total = e.toUpload;
            if (!f.json) note(`copying ${e.toUpload} of ${e.paths} paths to ${backend.url} (${e.present} already there)`);
          });
          events.on("path:uploaded", (e) => {
            done++;
            bytes += e.fileSize;
            progress.update(`[${done}/${total}] uploaded ${humanBytes(bytes)}`);
          });
          events.on("upload:resumed", (e) => note(`resuming the upload of ${e.path} at byte ${e.offset}`));
          try {
            results = await copyToCache(store, backend, paths, {
              compression: parseCompression(f.compression ?? "zstd"),
              ...(f.secretKey ? { secretKey: readSecretKeyFile(f.secretKey) } : {}),
              ...(f.jobs ? { jobs: f.jobs } : {}),
              events,
            });
          } finally {
            progress.done();
            await backend.close();
          }
        } else {
          const settings = resolveSubstitutionSettings({ substituters: f.from, trustedPublicKeys: f.trustedPublicKeys, requireSigs: f.requireSigs === false ? false : undefined });
          const cache = await BinaryCache.open(f.from!, { storeDir: store.storeDir, token });
          const events = new SubstituteEmitter();
          let fetched = 0;
          let total = 0;
          let bytes = 0;
          events.on("substitute:planned", (e) => {
            total = e.toFetch;
            if (!f.json) note(`copying ${e.toFetch} paths from ${cache.url} (${humanBytes(e.narBytes)} unpacked)`);
          });
          events.on("fetch:bytes", (e) => {
            bytes += e.bytes;
            progress.update(`[${fetched}/${total}] downloaded ${humanBytes(bytes)}`);
          });
          events.on("path:fetched", () => fetched++);
          const sub = new CacheSubstituter(store, [cache], { trustedKeys: settings.trustedPublicKeys, requireSigs: settings.requireSigs, ...(f.jobs ? { jobs: f.jobs } : {}), events });
          try {
            results = await sub.substituteClosure(paths);
          } finally {
            progress.done();
            await sub.close();
          }
        }
        if (f.json) {
          out(JSON.stringify({ results: results.map((r) => (r.status === "error" ? { status: r.status, path: r.path, error: errorBody(r.error!) } : r)) }));
        } else {
          for (const r of results) {
            if (r.status === "error") note(`error [${r.error!.code}]: ${r.error!.message}${r.error!.hint ? `\n  hint: ${r.error!.hint}` : ""}`);
          }
          for (const p of paths) out(store.parsePath(p));
        }
        if (results.some((r) => r.status === "error")) process.exitCode = 1;
      });
    });
}

/**
 * The farm's binary cache: where the coordinator publishes the derivations it evaluated (so
 * workers can fetch a step's .drv closure), and where workers substitute inputs from and upload
 * outputs to. By default it is embedded: a directory in the data dir served by `ferry cache
 * serve`'s server on its own port, signing with a key kept in the data dir, with an upload token
 * the coordinator hands to workers in their welcome. A farm can use an external cache instead
 * (any URL `ferry copy` takes, e.g. an S3 bucket or another `ferry cache serve`).
 */
import * as fs from "node:fs";
import { randomBytes } from "node:crypto";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { FerryError } from "../core/errors.js";
import { generateSecretKey, parseSecretKey, printPublicKey, printSecretKey, publicKeyOf, type SecretKey } from "../core/signing.js";
import { FileBackend } from "../cache/file-backend.js";
import { openBackend } from "../cache/open.js";
import type { CacheBackend } from "../cache/backend.js";
import { startCacheServer, type CacheServer } from "../cache/server.js";
import { copyToCacheOffThread, type CopySummary } from "../cache/upload-thread.js";
import type { LocalStore } from "../store/local-store.js";

export interface FarmCache {
  /** What workers are told (welcome.cache). */
  readonly url: string;
  readonly token?: string;
  readonly publicKey?: string;
  /** Uploads the closures of `paths` (derivations and their sources) from the coordinator's store. */
  publish(store: LocalStore, paths: readonly string[]): Promise<void>;
  /** The build log a worker uploaded for `drvPath` (`log/<drv base name>`), if the cache has it. */
  readLog(drvPath: string): Promise<Uint8Array | undefined>;
  close(): Promise<void>;
}

export interface FarmCacheOptions {
  readonly dataDir: string;
  /** The store dir narinfos are for. */
  readonly storeDir: string;
  /** Embedded cache: the address it listens on (default 127.0.0.1, a free port). */
  readonly host?: string;
  readonly port?: number;
  /** Use this cache instead of the embedded one. */
  readonly external?: { readonly url: string; readonly token?: string; readonly publicKey?: string; readonly secretKey?: SecretKey };
}

/** Reads a secret kept in the data dir, or makes it (mode 0600, written whole or not at all). */
function keptSecret(file: string, make: () => string): string {
  try {
    return fs.readFileSync(file, "utf8").trim();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
  }
  fs.mkdirSync(join(file, ".."), { recursive: true, mode: 0o700 });
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, make() + "\n", { mode: 0o600 });
  fs.renameSync(tmp, file);
  return fs.readFileSync(file, "utf8").trim();
}

export async function openFarmCache(opts: FarmCacheOptions): Promise<FarmCache> {
  if (opts.external) {
    const ext = opts.external;
    let backend: CacheBackend;
    try {
      backend = await openBackend(ext.url, { ...(ext.token ? { token: ext.token } : {}) });
    } catch (e) {
      throw new FerryError("FERRY_FARM_BAD_CACHE", `the farm cache '${ext.url}' cannot be opened: ${(e as Error).message}`, {
        hint: "pass a cache URL `ferry copy --to` accepts (http(s)://, s3://, file://)",
      });
    }
    return {
      url: ext.url,
      ...(ext.token ? { token: ext.token } : {}),
      ...(ext.publicKey ? { publicKey: ext.publicKey } : {}),
      publish: async (store, paths) => failIfAny(await copyToCacheOffThread(store.loc, { url: ext.url, token: ext.token }, paths, { secretKey: ext.secretKey })),
      readLog: (drvPath) => readLog(backend, drvPath),
      close: async () => undefined,
    };
  }
  const keys = join(opts.dataDir, "keys");
  const secretKey = parseSecretKey(keptSecret(join(keys, "farm-cache.secret"), () => printSecretKey(generateSecretKey("ferry-farm-1"))));
  const token = keptSecret(join(keys, "farm-cache.token"), () => randomBytes(24).toString("base64url"));
  const backend = FileBackend.open(join(opts.dataDir, "cache"));
  const server: CacheServer = await startCacheServer({
    backend,
    host: opts.host ?? "127.0.0.1",
    port: opts.port ?? 0,
    secretKey,
    uploadToken: token,
    storeDir: opts.storeDir,
    stagingDir: join(opts.dataDir, "cache-staging"),
  });
  return {
    url: server.url,
    token,
    publicKey: printPublicKey(publicKeyOf(secretKey)),
    publish: async (store, paths) => {
      failIfAny(await copyToCacheOffThread(store.loc, { url: pathToFileURL(resolve(backend.root)).href }, paths, { secretKey }));
      // The server remembers absent narinfos for a moment: tell it they exist now.
      for (const p of paths) server.forget(`${p.slice(store.storeDir.length + 1, store.storeDir.length + 33)}.narinfo`);
    },
    readLog: (drvPath) => readLog(backend, drvPath),
    close: () => server.close(),
  };
}

async function readLog(backend: CacheBackend, drvPath: string): Promise<Uint8Array | undefined> {
  const base = drvPath.slice(drvPath.lastIndexOf("/") + 1);
  return (await backend.readBytes(`log/${base}`)) ?? undefined;
}

function failIfAny(copied: CopySummary): void {
  const bad = copied.failures[0];
  if (bad) {
    throw new FerryError("FERRY_FARM_PUBLISH_FAILED", `publishing ${bad.path} to the farm cache failed: ${bad.error.message}`, {
      hint: "check the farm cache (its disk, its URL and token); the evaluation is kept and can be retried",
    });
  }
}

/**
 * `ferry copy --to`: uploads the closures of store paths to a binary cache. Paths the cache
 * has are skipped (one parallel round of narinfo lookups); the others are packed and uploaded
 * in parallel, each NAR before its narinfo, and each narinfo only after those of its
 * references, so a cache never advertises a path whose closure it lacks. Over HTTP a NAR
 * upload resumes where an interrupted one stopped.
 */
import * as fs from "node:fs";
import * as os from "node:os";
import { FerryError, errorBody } from "../core/errors.js";
import { TypedEmitter } from "../core/events.js";
import { narInfoKey, narKey, contentTypeOf, type Compression } from "../core/cache-layout.js";
import { printHash, hashEquals, printPrefixedHash } from "../core/hash.js";
import { printCacheInfo, printNarInfo, type NarInfo } from "../core/narinfo.js";
import { fingerprintPath, signMessage, type SecretKey } from "../core/signing.js";
import { parseStorePath } from "../core/store-path.js";
import { referencesFirst } from "../core/path-order.js";
import { asFerryError, type ItemOutcome, type LocalStore, type PathInfo } from "../store/local-store.js";
import type { CacheBackend } from "./backend.js";
import { HttpBackend } from "./http-backend.js";
import { packNar } from "./pack.js";
import { readLog } from "../build/logs.js";
import { mapLimit } from "./parallel.js";

export interface UploadEvents {
  "copy:planned": { paths: number; toUpload: number; present: number };
  "path:uploaded": { path: string; narSize: number; fileSize: number; durationMs: number };
  "path:failed": { path: string; error: { code: string; message: string; hint?: string } };
  "upload:resumed": { path: string; offset: number };
}

export class UploadEmitter extends TypedEmitter<UploadEvents> {}

export interface CopyToOptions {
  readonly compression?: Compression;
  /** Signs each narinfo (besides the signatures the local store has). */
  readonly secretKey?: SecretKey | undefined;
  /** Uploads at once (default 8, or the number of cores if more). */
  readonly jobs?: number;
  readonly events?: UploadEmitter;
  readonly tmpDir?: string;
  /** Paths the caller knows the cache holds (it fetched them from it, or put them there): not asked about again. */
  readonly knownPresent?: (path: string) => boolean;
}

export type UploadOutcome = ItemOutcome<{ uploaded: boolean }>;

/** Uploads the closure of `paths`; one outcome per path of the closure. */
export async function copyToCache(store: LocalStore, backend: CacheBackend, paths: readonly string[], opts: CopyToOptions = {}): Promise<UploadOutcome[]> {
  // Each path's info is read once: the closure, its order and the uploads all use it.
  const infos = closureInfos(store, paths);
  const closure = referencesFirst([...infos.keys()].sort(), (p) => infos.get(p)!.references);
  const position = new Map(closure.map((p, k) => [p, k]));
  const storeDir = store.storeDir;
  // A new cache gets its nix-cache-info first, as Nix's stores do: clients refuse a cache without one.
  if (!(await backend.stat("nix-cache-info"))) {
    await backend.write("nix-cache-info", new TextEncoder().encode(printCacheInfo({ storeDir, wantMassQuery: true, priority: 50 })), { contentType: contentTypeOf("cache-info") });
  }
  const present = await mapLimit(closure, 32, async (p) => opts.knownPresent?.(p) === true || (await backend.stat(narInfoKey(parseStorePath(storeDir, p).hashPart))) !== undefined);
  const toUpload = closure.filter((_, k) => present[k] !== true);
  opts.events?.emit("copy:planned", { paths: closure.length, toUpload: toUpload.length, present: closure.length - toUpload.length });
  const compression = opts.compression ?? "zstd";
  const tmpDir = fs.mkdtempSync(`${opts.tmpDir ?? os.tmpdir()}/ferry-copy-`);
  // A narinfo is written once those of its references are (or were already) in the cache.
  const done = new Map<string, Promise<boolean>>();
  const outcomes = new Map<string, UploadOutcome>();
  closure.forEach((p, k) => {
    if (present[k]) outcomes.set(p, { status: "ok", path: p, value: { uploaded: false } });
  });
  const ready = new Map<string, (ok: boolean) => void>();
  for (const p of toUpload) done.set(p, new Promise((res) => ready.set(p, res)));

  const uploadOne = async (path: string): Promise<void> => {
    const t0 = Date.now();
    const info = infos.get(path)!;
    let ok = false;
    try {
      const packed = await packNar(store.realPathOf(path), compression, tmpDir, info.narSize);
      try {
        if (packed.narSize !== info.narSize || !hashEquals(packed.narHash, info.narHash)) {
          throw new FerryError("FERRY_STORE_CORRUPT", `'${path}' changed on disk: its NAR hash is ${printHash(packed.narHash, "sri")}, the store recorded ${printHash(info.narHash, "sri")}`, {
            hint: "run `ferry store verify` to find every damaged path",
          });
        }
        const key = narKey(printHash(packed.fileHash, "nix32"), compression);
        if (!(await backend.stat(key))) {
          if (packed.bytes) {
            await backend.write(key, packed.bytes, { contentType: contentTypeOf("nar") });
          } else if (backend instanceof HttpBackend) {
            await backend.uploadFile(key, packed.file!, packed.fileSize, { contentType: contentTypeOf("nar"), onResume: (offset) => opts.events?.emit("upload:resumed", { path, offset }) });
          } else {
            await backend.write(key, fs.createReadStream(packed.file!, { highWaterMark: 256 * 1024 }), { contentType: contentTypeOf("nar") });
          }
        }
        // References come earlier in the order; one that does not (a reference cycle, which only
        // a corrupt database has) is not waited for, or the two would wait for each other.
        for (const r of info.references) {
          if (r !== path && done.has(r) && position.get(r)! < position.get(path)! && !(await done.get(r))) {
            throw new FerryError("FERRY_CACHE_REFERENCE_FAILED", `not publishing ${path}: its reference ${r} could not be uploaded`, { hint: "fix the reference's error and copy again" });
          }
        }
        const sigs = [...info.sigs];
        if (opts.secretKey) {
          const sig = signMessage(opts.secretKey, fingerprintPath(path, printPrefixedHash(info.narHash), info.narSize, info.references));
          if (!sigs.includes(sig)) sigs.push(sig);
        }
        const narInfo: NarInfo = {
          storePath: path,
          url: key,
          compression,
          fileHash: packed.fileHash,
          fileSize: packed.fileSize,
          narHash: info.narHash,
          narSize: info.narSize,
          references: info.references,
          ...(info.deriver ? { deriver: info.deriver } : {}),
          sigs,
          ...(info.ca ? { ca: info.ca } : {}),
        };
        await backend.write(narInfoKey(parseStorePath(storeDir, path).hashPart), new TextEncoder().encode(printNarInfo(storeDir, narInfo)), { contentType: contentTypeOf("narinfo") });
        await uploadLog(store, backend, info.deriver);
        ok = true;
        outcomes.set(path, { status: "ok", path, value: { uploaded: true } });
        opts.events?.emit("path:uploaded", { path, narSize: info.narSize, fileSize: packed.fileSize, durationMs: Date.now() - t0 });
      } finally {
        if (packed.file) fs.rmSync(packed.file, { force: true });
      }
    } catch (e) {
      const error = asFerryError(e);
      outcomes.set(path, { status: "error", path, error });
      opts.events?.emit("path:failed", { path, error: errorBody(error) });
    } finally {
      ready.get(path)!(ok);
    }
  };

  try {
    // Uploads mostly wait (on the disk or the network): more at once than there are cores.
    await mapLimit(toUpload, opts.jobs ?? Math.max(8, os.availableParallelism()), uploadOne);
  } finally {
    fs.rmSync(tmpDir, { recursive: true, force: true });
  }
  return closure.map((p) => outcomes.get(p)!);
}

/** The closure of `paths` (which must be valid), each path with its info. */
function closureInfos(store: LocalStore, paths: readonly string[]): Map<string, PathInfo> {
  const infos = new Map<string, PathInfo>();
  const stack = paths.map((p) => store.parsePath(p));
  while (stack.length) {
    const p = stack.pop()!;
    if (infos.has(p)) continue;
    const info = store.requirePathInfo(p);
    infos.set(p, info);
    for (const r of info.references) if (!infos.has(r)) stack.push(r);
  }
  return infos;
}

/**
 * Publishes the build log of `deriver` as `log/<drv base name>` (what `nix log` reads from a
 * cache) when this store built it and the cache lacks it. A missing log is not an error.
 */
async function uploadLog(store: LocalStore, backend: CacheBackend, deriver: string | undefined): Promise<void> {
  if (deriver === undefined) return;
  let text: string;
  try {
    text = readLog(store.realStateDir, deriver);
  } catch {
    return;
  }
  const key = `log/${deriver.slice(store.storeDir.length + 1)}`;
  if (await backend.stat(key)) return;
  await backend.write(key, new TextEncoder().encode(text), { contentType: contentTypeOf("log") });
}

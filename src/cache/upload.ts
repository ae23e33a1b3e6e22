/**
 * `ferry copy --to`: uploads the closures of store paths to a binary cache. Paths the cache
 * has are skipped (one parallel round of narinfo lookups); the others are packed and uploaded
 * in parallel, each NAR before its narinfo, and each narinfo only after those of its
 * references, so a cache never advertises a path whose closure it lacks. Over HTTP a NAR
 * upload resumes where an interrupted one stopped. A directory cache gets the closure staged,
 * a few thousand paths at a time: a few file-system syncs for all of them instead of two fsyncs
 * per path (a farm publishes a hundred thousand derivations per large evaluation).
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
import type { CacheBackend, StagedObjects } from "./backend.js";
import { HttpBackend } from "./http-backend.js";
import { packNar, type PackedNar } from "./pack.js";
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
  const outcomes = new Map<string, UploadOutcome>();
  closure.forEach((p, k) => {
    if (present[k]) outcomes.set(p, { status: "ok", path: p, value: { uploaded: false } });
  });

  const fail = (path: string, e: unknown) => {
    const error = asFerryError(e);
    outcomes.set(path, { status: "error", path, error });
    opts.events?.emit("path:failed", { path, error: errorBody(error) });
  };
  const uploaded = (path: string, fileSize: number, t0: number) => {
    outcomes.set(path, { status: "ok", path, value: { uploaded: true } });
    opts.events?.emit("path:uploaded", { path, narSize: infos.get(path)!.narSize, fileSize, durationMs: Date.now() - t0 });
  };
  const narInfoText = (path: string, packed: PackedNar, key: string) => printNarInfo(storeDir, narInfoOf(path, infos.get(path)!, packed, key, opts.secretKey));
  const narInfoKeyOf = (path: string) => narInfoKey(parseStorePath(storeDir, path).hashPart);

  /**
   * Any other backend gets the paths one by one, many at once: each NAR before its narinfo, and
   * each narinfo once those of its references are (or were already) in the cache.
   */
  const uploadEach = async (): Promise<void> => {
    const position = new Map(closure.map((p, k) => [p, k]));
    const done = new Map<string, Promise<boolean>>();
    const ready = new Map<string, (ok: boolean) => void>();
    for (const p of toUpload) done.set(p, new Promise((res) => ready.set(p, res)));
    const uploadOne = async (path: string): Promise<void> => {
      const t0 = Date.now();
      const info = infos.get(path)!;
      let ok = false;
      try {
        const packed = await packChecked(store, path, info, compression, tmpDir);
        try {
          const key = narKey(printHash(packed.fileHash, "nix32"), compression);
          if (!(await backend.stat(key))) await writeNar(backend, key, packed, (offset) => opts.events?.emit("upload:resumed", { path, offset }));
          // References come earlier in the order; one that does not (a reference cycle, which only
          // a corrupt database has) is not waited for, or the two would wait for each other.
          for (const r of info.references) {
            if (r !== path && done.has(r) && position.get(r)! < position.get(path)! && !(await done.get(r))) throw referenceFailed(path, r);
          }
          await backend.write(narInfoKeyOf(path), new TextEncoder().encode(narInfoText(path, packed, key)), { contentType: contentTypeOf("narinfo") });
          await uploadLog(store, backend, info.deriver);
          ok = true;
          uploaded(path, packed.fileSize, t0);
        } finally {
          if (packed.file) fs.rmSync(packed.file, { force: true });
        }
      } catch (e) {
        fail(path, e);
      } finally {
        ready.get(path)!(ok);
      }
    };
    // Uploads mostly wait (on the disk or the network): more at once than there are cores.
    await mapLimit(toUpload, opts.jobs ?? Math.max(8, os.availableParallelism()), uploadOne);
  };

  /**
   * A backend that stages (a directory) gets the closure in pieces, each in a few syncs instead
   * of two fsyncs per path: every NAR is packed; a large one is written at once (and its
   * temporary file removed), the small ones are staged and published together; then the
   * piece's narinfos are staged at once and published in rounds, each path in the round after
   * its last reference's, so a narinfo never appears before those of its references.
   */
  const uploadStaged = async (stage: NonNullable<CacheBackend["stage"]>): Promise<void> => {
    let piece: { path: string; packed: PackedNar; key: string }[] = [];
    let bytes = 0;
    let t0 = Date.now();
    const flush = async () => {
      const current = piece;
      piece = [];
      bytes = 0;
      await stagedRounds(stage, [current.filter((p) => p.packed.bytes).map((p) => ({ path: p.path, key: p.key, body: p.packed.bytes! }))], fail);
      for (const { path } of current) {
        if (outcomes.has(path)) continue;
        try {
          await uploadLog(store, backend, infos.get(path)!.deriver);
        } catch (e) {
          fail(path, e);
        }
      }
      // Rounds: a path goes after the round of each reference uploaded in this piece (earlier
      // pieces are published); one whose reference failed is not published. A reference later
      // in the order (a cycle, which only a corrupt database has) is not waited for.
      const round = new Map<string, number>();
      const rounds: { path: string; key: string; body: Uint8Array }[][] = [];
      for (const { path, packed, key } of current) {
        if (outcomes.has(path)) continue;
        let r = 0;
        let failedRef: string | undefined;
        for (const ref of infos.get(path)!.references) {
          if (ref === path) continue;
          if (outcomes.get(ref)?.status === "error") failedRef ??= ref;
          const before = round.get(ref);
          if (before !== undefined) r = Math.max(r, before + 1);
        }
        if (failedRef !== undefined) {
          fail(path, referenceFailed(path, failedRef));
          continue;
        }
        let body: Uint8Array;
        try {
          body = new TextEncoder().encode(narInfoText(path, packed, key));
        } catch (e) {
          fail(path, e);
          continue;
        }
        round.set(path, r);
        (rounds[r] ??= []).push({ path, key: narInfoKeyOf(path), body });
      }
      await stagedRounds(stage, rounds, fail);
      for (const { path, packed } of current) if (round.has(path) && !outcomes.has(path)) uploaded(path, packed.fileSize, t0);
      t0 = Date.now();
    };
    for (const path of toUpload) {
      try {
        const packed = await packChecked(store, path, infos.get(path)!, compression, tmpDir);
        const key = narKey(printHash(packed.fileHash, "nix32"), compression);
        if (packed.file) {
          try {
            if (!(await backend.stat(key))) await writeNar(backend, key, packed, (offset) => opts.events?.emit("upload:resumed", { path, offset }));
          } finally {
            fs.rmSync(packed.file, { force: true });
          }
        }
        piece.push({ path, packed, key });
        bytes += packed.bytes?.length ?? 0;
      } catch (e) {
        fail(path, e);
      }
      if (piece.length >= STAGE_PATHS || bytes >= STAGE_BYTES) await flush();
    }
    await flush();
  };

  try {
    await (backend.stage ? uploadStaged(backend.stage.bind(backend)) : uploadEach());
  } finally {
    fs.rmSync(tmpDir, { recursive: true, force: true });
  }
  return closure.map((p) => outcomes.get(p)!);
}

/** A piece for a staging backend ends at this many paths or this many bytes of small NARs (held in memory meanwhile). */
const STAGE_PATHS = 4000;
const STAGE_BYTES = 64 << 20;

/**
 * Stages every item of `rounds` at once, then publishes round after round (each once the one
 * before is durable). A failure fails every item not published yet.
 */
async function stagedRounds(
  stage: NonNullable<CacheBackend["stage"]>,
  rounds: readonly (readonly { path: string; key: string; body: Uint8Array }[])[],
  fail: (path: string, e: unknown) => void,
): Promise<void> {
  const items = rounds.flat();
  if (items.length === 0) return;
  const published = new Set<string>();
  let staged: StagedObjects | undefined;
  try {
    staged = await stage(items);
    for (const round of rounds) {
      const keys = round.map((i) => i.key);
      await staged.publish(keys);
      for (const k of keys) published.add(k);
    }
  } catch (e) {
    await staged?.discard().catch(() => undefined);
    for (const i of items) if (!published.has(i.key)) fail(i.path, e);
  }
}

/** Packs `path` and checks the NAR against what the store recorded. */
async function packChecked(store: LocalStore, path: string, info: PathInfo, compression: Compression, tmpDir: string): Promise<PackedNar> {
  const packed = await packNar(store.realPathOf(path), compression, tmpDir, info.narSize);
  if (packed.narSize !== info.narSize || !hashEquals(packed.narHash, info.narHash)) {
    if (packed.file) fs.rmSync(packed.file, { force: true });
    throw new FerryError("FERRY_STORE_CORRUPT", `'${path}' changed on disk: its NAR hash is ${printHash(packed.narHash, "sri")}, the store recorded ${printHash(info.narHash, "sri")}`, {
      hint: "run `ferry store verify` to find every damaged path",
    });
  }
  return packed;
}

/** Writes a packed NAR under `key`: from memory, or streamed from its file (resumable over HTTP). */
async function writeNar(backend: CacheBackend, key: string, packed: PackedNar, onResume: (offset: number) => void): Promise<void> {
  if (packed.bytes) {
    await backend.write(key, packed.bytes, { contentType: contentTypeOf("nar") });
  } else if (backend instanceof HttpBackend) {
    await backend.uploadFile(key, packed.file!, packed.fileSize, { contentType: contentTypeOf("nar"), onResume });
  } else {
    await backend.write(key, fs.createReadStream(packed.file!, { highWaterMark: 256 * 1024 }), { contentType: contentTypeOf("nar") });
  }
}

/** The narinfo of `path` for its packed NAR at `key`, signed with `secretKey` too when given. */
function narInfoOf(path: string, info: PathInfo, packed: PackedNar, key: string, secretKey: SecretKey | undefined): NarInfo {
  const sigs = [...info.sigs];
  if (secretKey) {
    const sig = signMessage(secretKey, fingerprintPath(path, printPrefixedHash(info.narHash), info.narSize, info.references));
    if (!sigs.includes(sig)) sigs.push(sig);
  }
  return {
    storePath: path,
    url: key,
    compression: packed.compression,
    fileHash: packed.fileHash,
    fileSize: packed.fileSize,
    narHash: info.narHash,
    narSize: info.narSize,
    references: info.references,
    ...(info.deriver ? { deriver: info.deriver } : {}),
    sigs,
    ...(info.ca ? { ca: info.ca } : {}),
  };
}

function referenceFailed(path: string, ref: string): FerryError {
  return new FerryError("FERRY_CACHE_REFERENCE_FAILED", `not publishing ${path}: its reference ${ref} could not be uploaded`, { hint: "fix the reference's error and copy again" });
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

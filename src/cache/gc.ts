/**
 * Garbage collection of a binary cache, on any CacheBackend.
 *
 * What is kept: the closures (through narinfo References) of the store paths listed in the
 * roots (`roots/<name>`, one store path per line: a release, a pinned set) and of every narinfo
 * written within the keep-recent window (recent builds); the NARs those narinfos point at; NARs
 * younger than the grace period (uploads whose narinfo has not arrived yet); everything that is
 * not a narinfo, listing or NAR (nix-cache-info, logs, roots).
 *
 * The plan is a value (`planCacheGc`, no I/O); `applyCacheGc` deletes narinfos and listings
 * first, then NARs, so a reader never finds a narinfo whose NAR is gone. Before the NARs go it
 * re-reads narinfos written since the listing and spares the NARs they point at (`nix copy`
 * skips uploading a NAR the cache already has, then writes a narinfo pointing at it), and it
 * re-checks each NAR's age just before deleting it.
 */
import { classifyCacheKey } from "../core/cache-layout.js";
import type { CacheBackend, ObjectInfo } from "./backend.js";

/** The parts of a narinfo GC follows. */
export interface NarInfoLinks {
  readonly storePath: string;
  readonly url: string;
  /** Base names or full paths of the references. */
  readonly references: readonly string[];
}

export interface GcInput {
  /** The cache's listing. */
  readonly objects: readonly ObjectInfo[];
  /** Every narinfo of the listing by key; undefined for one that could not be read or parsed. */
  readonly narInfos: ReadonlyMap<string, NarInfoLinks | undefined>;
  /** Root name → store paths. */
  readonly roots: ReadonlyMap<string, readonly string[]>;
  readonly now: number;
  /** narinfos modified within this many ms are roots (never less than the grace period). */
  readonly keepRecentMs: number;
  /** NARs and listings modified within this many ms are kept whatever points at them. */
  readonly graceMs: number;
}

export type GcKind = "narinfo" | "listing" | "nar";

export interface GcItem {
  readonly key: string;
  readonly kind: GcKind;
  readonly size: number;
  readonly mtimeMs: number;
  readonly reason: string;
}

export interface GcPlan {
  readonly now: number;
  readonly graceMs: number;
  /** In the order they are deleted: narinfos and listings, then NARs. */
  readonly delete: readonly GcItem[];
  readonly deleteBytes: number;
  readonly kept: { readonly narInfos: number; readonly nars: number; readonly other: number; readonly bytes: number };
  /** Store paths (hash parts' narinfo keys) the kept closures need but the cache lacks. */
  readonly missing: readonly string[];
  /** Every narinfo key the plan knew (so apply can tell new ones). */
  readonly knownNarInfos: ReadonlySet<string>;
}

export type GcItemStatus = "deleted" | "gone" | "spared" | "failed";

export interface GcItemResult {
  readonly key: string;
  readonly kind: GcKind;
  readonly size: number;
  readonly status: GcItemStatus;
  readonly reason?: string;
}

export interface GcReport {
  readonly plan: GcPlan;
  readonly dryRun: boolean;
  readonly results: readonly GcItemResult[];
  readonly deleted: number;
  readonly bytesFreed: number;
  readonly failed: number;
}

/** The 32-character hash part of a store path or base name. */
function hashPartOf(pathOrBase: string): string {
  const slash = pathOrBase.lastIndexOf("/");
  return pathOrBase.slice(slash + 1, slash + 33);
}

/** Reads what GC needs from narinfo text, leniently; undefined if it lacks StorePath or URL. */
export function parseNarInfoLinks(text: string): NarInfoLinks | undefined {
  let storePath: string | undefined;
  let url: string | undefined;
  let references: string[] = [];
  for (const line of text.split("\n")) {
    if (line.startsWith("StorePath: ")) storePath = line.slice(11).trim();
    else if (line.startsWith("URL: ")) url = line.slice(5).trim();
    else if (line.startsWith("References:")) references = line.slice(11).trim().split(" ").filter((r) => r !== "");
  }
  if (!storePath || !url) return undefined;
  return { storePath, url, references };
}

/** A root object's store paths: one per line; blank lines and `#` comments are ignored. */
export function parseRoots(text: string): string[] {
  return text
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "" && !l.startsWith("#"));
}

export function planCacheGc(input: GcInput): GcPlan {
  const { now, graceMs } = input;
  const recentMs = Math.max(input.keepRecentMs, graceMs);
  const byKey = new Map<string, ObjectInfo>();
  for (const o of input.objects) byKey.set(o.key, o);

  // Mark: the closure of the roots and of recent narinfos.
  const keptNarInfos = new Set<string>();
  const missing = new Set<string>();
  const queue: string[] = [];
  const visit = (narInfoKey: string) => {
    if (keptNarInfos.has(narInfoKey)) return;
    if (!byKey.has(narInfoKey)) {
      missing.add(narInfoKey);
      return;
    }
    keptNarInfos.add(narInfoKey);
    queue.push(narInfoKey);
  };
  for (const paths of input.roots.values()) for (const p of paths) visit(`${hashPartOf(p)}.narinfo`);
  for (const o of input.objects) {
    if (classifyCacheKey(o.key) === "narinfo" && now - o.mtimeMs < recentMs) visit(o.key);
  }
  while (queue.length > 0) {
    const links = input.narInfos.get(queue.pop()!);
    for (const r of links?.references ?? []) visit(`${hashPartOf(r)}.narinfo`);
  }
  const keptNars = new Set<string>();
  for (const k of keptNarInfos) {
    const url = input.narInfos.get(k)?.url;
    if (url !== undefined) keptNars.add(url);
  }

  // Sweep.
  const first: GcItem[] = [];
  const last: GcItem[] = [];
  let keptBytes = 0;
  let keptNarInfoCount = 0;
  let keptNarCount = 0;
  let other = 0;
  const young = (o: ObjectInfo) => now - o.mtimeMs < graceMs;
  for (const o of input.objects) {
    const kind = classifyCacheKey(o.key);
    const item = (k: GcKind, reason: string): GcItem => ({ key: o.key, kind: k, size: o.size, mtimeMs: o.mtimeMs, reason });
    if (kind === "narinfo") {
      if (keptNarInfos.has(o.key)) {
        keptNarInfoCount++;
        keptBytes += o.size;
      } else {
        first.push(item("narinfo", input.narInfos.get(o.key) === undefined ? "unreadable and not recent" : "not reachable from a root or a recent narinfo"));
      }
    } else if (kind === "listing") {
      const owner = `${o.key.slice(0, 32)}.narinfo`;
      if (keptNarInfos.has(owner) || (!byKey.has(owner) && young(o))) keptBytes += o.size;
      else first.push(item("listing", "its narinfo is not kept"));
    } else if (kind === "nar") {
      if (keptNars.has(o.key) || young(o)) {
        keptNarCount++;
        keptBytes += o.size;
      } else {
        last.push(item("nar", "no kept narinfo points at it"));
      }
    } else {
      other++;
    }
  }
  const del = [...first.sort((a, b) => a.key.localeCompare(b.key)), ...last.sort((a, b) => a.key.localeCompare(b.key))];
  return Object.freeze({
    now,
    graceMs,
    delete: Object.freeze(del),
    deleteBytes: del.reduce((n, i) => n + i.size, 0),
    kept: Object.freeze({ narInfos: keptNarInfoCount, nars: keptNarCount, other, bytes: keptBytes }),
    missing: Object.freeze([...missing].sort()),
    knownNarInfos: new Set([...byKey.keys()].filter((k) => classifyCacheKey(k) === "narinfo")),
  });
}

/** Runs `fn` over `items` with at most `n` at a time, keeping the order of results. */
async function mapLimit<T, R>(items: readonly T[], n: number, fn: (t: T) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, worker));
  return out;
}

export interface GcReadOptions {
  /** Default Date.now(). */
  readonly now?: number;
  readonly keepRecentMs: number;
  readonly graceMs: number;
  /** Parallel backend requests (default 16). */
  readonly concurrency?: number;
}

/** Reads the listing, narinfos and roots of a cache and plans its GC. */
export async function readCacheGcPlan(backend: CacheBackend, opts: GcReadOptions): Promise<GcPlan> {
  const now = opts.now ?? Date.now();
  const objects: ObjectInfo[] = [];
  for await (const o of backend.list("")) objects.push(o);
  const conc = opts.concurrency ?? 16;
  const narInfoKeys = objects.filter((o) => classifyCacheKey(o.key) === "narinfo").map((o) => o.key);
  const narInfos = new Map<string, NarInfoLinks | undefined>();
  await mapLimit(narInfoKeys, conc, async (k) => {
    narInfos.set(k, await readLinks(backend, k));
  });
  const roots = new Map<string, readonly string[]>();
  const rootKeys = objects.filter((o) => classifyCacheKey(o.key) === "root").map((o) => o.key);
  await mapLimit(rootKeys, conc, async (k) => {
    const bytes = await backend.readBytes(k);
    if (bytes) roots.set(k.slice("roots/".length), parseRoots(Buffer.from(bytes).toString("utf8")));
  });
  return planCacheGc({ objects, narInfos, roots, now, keepRecentMs: opts.keepRecentMs, graceMs: opts.graceMs });
}

async function readLinks(backend: CacheBackend, key: string): Promise<NarInfoLinks | undefined> {
  try {
    const bytes = await backend.readBytes(key);
    return bytes ? parseNarInfoLinks(Buffer.from(bytes).toString("utf8")) : undefined;
  } catch {
    return undefined;
  }
}

/** Deletes what the plan says, narinfos first; one result per item, never throws for an item. */
export async function applyCacheGc(backend: CacheBackend, plan: GcPlan, opts: { concurrency?: number; now?: () => number } = {}): Promise<GcItemResult[]> {
  const conc = opts.concurrency ?? 16;
  const clock = opts.now ?? Date.now;
  const del = async (i: GcItem, check?: () => Promise<string | undefined>): Promise<GcItemResult> => {
    try {
      const spare = check ? await check() : undefined;
      if (spare !== undefined) return { key: i.key, kind: i.kind, size: i.size, status: "spared", reason: spare };
      const gone = !(await backend.delete(i.key));
      return { key: i.key, kind: i.kind, size: i.size, status: gone ? "gone" : "deleted" };
    } catch (e) {
      return { key: i.key, kind: i.kind, size: i.size, status: "failed", reason: (e as Error).message };
    }
  };
  const first = plan.delete.filter((i) => i.kind !== "nar");
  const nars = plan.delete.filter((i) => i.kind === "nar");
  const results = await mapLimit(first, conc, (i) =>
    del(i, async () => {
      // A narinfo rewritten since the listing is someone's fresh upload.
      if (i.kind !== "narinfo") return undefined;
      const now = await backend.stat(i.key);
      return now !== undefined && now.mtimeMs > i.mtimeMs ? "rewritten since the listing" : undefined;
    }),
  );
  if (nars.length === 0) return results;

  // narinfos that appeared (or changed) since the listing keep their NARs.
  const wanted = new Set<string>();
  const fresh: string[] = [];
  for await (const o of backend.list("")) {
    if (classifyCacheKey(o.key) === "narinfo" && (!plan.knownNarInfos.has(o.key) || o.mtimeMs >= plan.now - 60_000)) fresh.push(o.key);
  }
  let unreadable = false;
  await mapLimit(fresh, conc, async (k) => {
    const links = await readLinks(backend, k);
    if (links) wanted.add(links.url);
    else if (!plan.knownNarInfos.has(k)) unreadable = true;
  });
  const narResults = await mapLimit(nars, conc, (i) =>
    del(i, async () => {
      if (unreadable) return "a narinfo written since the listing could not be read";
      if (wanted.has(i.key)) return "a narinfo written since the listing points at it";
      const now = await backend.stat(i.key);
      if (now !== undefined && clock() - now.mtimeMs < plan.graceMs) return "rewritten since the listing";
      return undefined;
    }),
  );
  return [...results, ...narResults];
}

/** Plans and (unless `dryRun`) applies a GC of the cache. */
export async function collectCacheGarbage(backend: CacheBackend, opts: GcReadOptions & { dryRun?: boolean }): Promise<GcReport> {
  const plan = await readCacheGcPlan(backend, opts);
  const results = opts.dryRun ? [] : await applyCacheGc(backend, plan, opts.concurrency === undefined ? {} : { concurrency: opts.concurrency });
  const deleted = results.filter((r) => r.status === "deleted");
  return Object.freeze({
    plan,
    dryRun: !!opts.dryRun,
    results,
    deleted: deleted.length,
    bytesFreed: deleted.reduce((n, r) => n + r.size, 0),
    failed: results.filter((r) => r.status === "failed").length,
  });
}

/**
 * A binary cache over HTTP (SPEC §9) in front of any CacheBackend: what Nix 2.8 reads as a
 * substituter (`http://host:port`) and writes with `nix copy --to http://host:port`.
 *
 * Reads: GET and HEAD of every key `classifyCacheKey` accepts, with ETag / Last-Modified,
 * conditional requests (304) and single byte ranges (206/416). narinfo and nix-cache-info are
 * served from a small in-memory cache (bounded, short-lived, updated by this server's own
 * writes), so the path Nix hits for every store path it looks up — mostly 404s — does no I/O
 * when it is hot.
 *
 * Writes: PUT with the upload token. The server keeps the cache consistent whatever clients
 * send and whenever it is killed:
 * - a NAR is stored only whole and only if its sha256 is the file hash its name carries;
 * - a narinfo is stored only if it parses for this cache's store dir, names a known
 *   compression, and its URL names a NAR that is already stored (with the FileSize it states);
 *   the server adds its own signature;
 * - every store is an atomic `backend.write`, so a reader never sees part of an object.
 * Resumable NAR uploads (`Content-Range: bytes START-END/TOTAL`) collect the bytes in a partial
 * file in the staging directory; the NAR reaches the backend only once whole and verified.
 *
 * Status codes: 200 read / upload of an object that already existed, 201 stored, 202 part of a
 * resumable upload accepted, 206 range, 304 not modified, 400 bad key or body, 401 no token,
 * 403 wrong token, 404 missing, 405 method (or uploads disabled), 409 conflict (narinfo before
 * its NAR, resumable upload at the wrong offset or already running), 413 too large, 416 range
 * not satisfiable, 500 backend failure.
 */
import * as http from "node:http";
import * as fs from "node:fs";
import { join } from "node:path";
import { createHash, timingSafeEqual } from "node:crypto";
import { pipeline } from "node:stream";
import type { Readable } from "node:stream";
import { FerryError, isFerryError } from "../core/errors.js";
import { TypedEmitter } from "../core/events.js";
import { classifyCacheKey, contentTypeOf, parseCompression, type CacheKeyKind } from "../core/cache-layout.js";
import { parseCacheInfo, parseNarInfo, printCacheInfo, printNarInfo } from "../core/narinfo.js";
import { printPrefixedHash, toNix32 } from "../core/hash.js";
import { parseStorePath } from "../core/store-path.js";
import { fingerprintPath, signMessage, type SecretKey } from "../core/signing.js";
import type { CacheBackend, ObjectInfo } from "./backend.js";
import { DEFAULT_STORE_DIR } from "../store/config.js";

export interface CacheServerEvents {
  /** One per finished request (only computed when someone listens). */
  "cache:request": { method: string; key: string; status: number; durationMs: number };
  /** An object was stored, or part of a resumable NAR upload was kept. */
  "cache:upload": { key: string; kind: CacheKeyKind; bytes: number; outcome: "stored" | "existed" | "partial" };
  /** A request was refused or failed; status ≥ 500 means the server or its backend failed. */
  "cache:rejected": { method: string; key: string; status: number; reason: string };
}

export class CacheServerEmitter extends TypedEmitter<CacheServerEvents> {
  #requestListeners = 0;

  override on<K extends keyof CacheServerEvents>(name: K, fn: (payload: CacheServerEvents[K]) => void): () => void {
    const off = super.on(name, fn);
    if (name !== "cache:request" && name !== ("*" as K)) return off;
    this.#requestListeners++;
    let on = true;
    return () => {
      if (on) this.#requestListeners--;
      on = false;
      off();
    };
  }

  /** Whether anyone listens to `cache:request` (timing every request is not free). */
  get timesRequests(): boolean {
    return this.#requestListeners > 0;
  }
}

export interface CacheServerOptions {
  readonly backend: CacheBackend;
  /** Default 127.0.0.1. */
  readonly host?: string;
  /** Default 0 (a free port). */
  readonly port?: number;
  /** Signs every narinfo stored through the server. */
  readonly secretKey?: SecretKey | undefined;
  /** Grants uploads (and reads). Undefined: the server is read-only. */
  readonly uploadToken?: string | undefined;
  /** Undefined: reads are public. */
  readonly readToken?: string | undefined;
  /** Largest NAR accepted, in bytes (default 4 GiB). */
  readonly maxNarSize?: number;
  /** Largest other object (narinfo, listing, log, root) accepted (default 1 MiB). */
  readonly maxObjectSize?: number;
  /** The store dir narinfos must be for (default /ferry/store); also in nix-cache-info. */
  readonly storeDir?: string;
  /** nix-cache-info's Priority when the backend has none (default 40). */
  readonly priority?: number;
  /** Where partial resumable uploads live; keep it across restarts so uploads can resume. */
  readonly stagingDir: string;
  /** Partial uploads untouched this long are removed (default 24 h). */
  readonly stagingMaxAgeMs?: number;
  /** How long a narinfo (or its absence) is served from memory (default 1000 ms). */
  readonly narInfoTtlMs?: number;
  /** How many narinfo lookups are remembered (default 20000). */
  readonly narInfoCacheEntries?: number;
  readonly events?: CacheServerEmitter;
}

export interface CacheServer {
  readonly url: string;
  readonly port: number;
  /** Drops what the server remembers of `key` (another process sharing the cache changed it). */
  forget(key: string): void;
  close(): Promise<void>;
}

const GiB = 1024 * 1024 * 1024;
const STREAM_CHUNK = 1024 * 1024;
const NOT_FOUND = Buffer.from("not found\n");
const NOT_FOUND_HEADERS = ["Content-Type", "text/plain; charset=utf-8", "Content-Length", String(NOT_FOUND.length)];

/** A small object (narinfo, nix-cache-info) as it is answered, or its absence. */
interface Entry {
  readonly body: Buffer | undefined;
  readonly etag: string;
  readonly lastModified: string;
  readonly headers: readonly string[];
  readonly expires: number;
}

/** A refusal the handler turns into a status and a short text body. */
class Refusal extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

const UPLOAD_OFFSET = "Upload-Offset";

function statusOf(e: unknown): number {
  if (e instanceof Refusal) return e.status;
  if (!isFerryError(e)) return 500;
  switch (e.code) {
    case "FERRY_CACHE_TOO_LARGE":
      return 413;
    case "FERRY_CACHE_IO":
    case "FERRY_CACHE_DENIED":
      return 500;
    case "FERRY_CACHE_UNREACHABLE":
      return 502;
    default:
      // what a client sent did not parse or check (narinfo, hash, store path, compression)
      return 400;
  }
}

function tooLarge(limit: number): FerryError {
  return new FerryError("FERRY_CACHE_TOO_LARGE", `the upload is larger than the server's limit of ${limit} bytes`, {
    hint: "raise the server's --max-upload-size if such objects are expected",
  });
}

/** Yields `body`, failing past `limit` bytes and, at the end, unless its sha256 (nix32) is `want`. */
async function* verified(body: AsyncIterable<Uint8Array>, limit: number, want: string | undefined): AsyncGenerator<Uint8Array> {
  const h = want === undefined ? undefined : createHash("sha256");
  let n = 0;
  for await (const c of body) {
    n += c.length;
    if (n > limit) throw tooLarge(limit);
    h?.update(c);
    yield c;
  }
  if (h) {
    const got = toNix32(new Uint8Array(h.digest()));
    if (got !== want) {
      throw new FerryError("FERRY_CACHE_HASH_MISMATCH", `the uploaded NAR's sha256 is ${got}, but its name says ${want}; nothing was stored`, {
        hint: "a NAR is stored under nar/<nix32 sha256 of the file>.nar[.ext]; check the client's compression and hashing",
      });
    }
  }
}

/**
 * The request body as an iterable that leaves the request alone when the consumer stops early:
 * destroying an unfinished request would drop the connection before the refusal is sent.
 */
function bodyOf(req: http.IncomingMessage): AsyncIterable<Buffer> {
  const it = (req as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
  return { [Symbol.asyncIterator]: () => ({ next: () => it.next() }) };
}

async function readBody(req: http.IncomingMessage, limit: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  let n = 0;
  for await (const c of bodyOf(req)) {
    n += c.length;
    if (n > limit) throw tooLarge(limit);
    parts.push(c);
  }
  return Buffer.concat(parts, n);
}

function hashOf(text: string): Buffer {
  return createHash("sha256").update(text).digest();
}

/** The token a request presents: `Authorization: Bearer T`, or Basic auth's password (netrc, as Nix sends). */
/**
 * Whether the request carries any of `names` (lower case), read from rawHeaders: Node builds
 * `req.headers` lazily, and the narinfo hot path does not need it.
 */
function hasHeader(req: http.IncomingMessage, names: readonly string[]): boolean {
  const raw = req.rawHeaders;
  for (let i = 0; i < raw.length; i += 2) {
    const n = raw[i]!;
    for (const want of names) if (n.length === want.length && n.toLowerCase() === want) return true;
  }
  return false;
}

const CONDITIONAL = ["if-none-match", "if-modified-since"];
const AUTHORIZATION = ["authorization"];
const CONDITIONAL_OR_AUTH = [...CONDITIONAL, ...AUTHORIZATION];

function presentedToken(req: http.IncomingMessage): string | undefined {
  const a = req.headers.authorization;
  if (a === undefined) return undefined;
  if (a.startsWith("Bearer ")) return a.slice(7).trim();
  if (a.startsWith("Basic ")) {
    const decoded = Buffer.from(a.slice(6).trim(), "base64").toString("utf8");
    const colon = decoded.indexOf(":");
    return colon >= 0 ? decoded.slice(colon + 1) : decoded;
  }
  return "";
}

type Range = { start: number; end: number } | "unsatisfiable" | undefined;

/** A single `bytes=` range against an object of `size` bytes; undefined means "serve it whole". */
export function parseRange(header: string, size: number): Range {
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === "" && m[2] === "")) return undefined;
  if (m[1] === "") {
    const n = Number(m[2]);
    if (n === 0 || size === 0) return "unsatisfiable";
    return { start: Math.max(0, size - n), end: size - 1 };
  }
  const start = Number(m[1]);
  const end = m[2] === "" ? size - 1 : Math.min(Number(m[2]), size - 1);
  if (m[2] !== "" && Number(m[2]) < start) return undefined;
  if (start >= size) return "unsatisfiable";
  return { start, end };
}

function partialName(key: string): string {
  return `${key.replace(/\//g, "_")}.partial`;
}

export async function startCacheServer(opts: CacheServerOptions): Promise<CacheServer> {
  const backend = opts.backend;
  const storeDir = opts.storeDir ?? DEFAULT_STORE_DIR;
  const maxNarSize = opts.maxNarSize ?? 4 * GiB;
  const maxObjectSize = opts.maxObjectSize ?? 1024 * 1024;
  const ttl = opts.narInfoTtlMs ?? 1000;
  const maxEntries = opts.narInfoCacheEntries ?? 20000;
  const events = opts.events;
  const stagingDir = opts.stagingDir;
  fs.mkdirSync(stagingDir, { recursive: true });
  sweepStaging(stagingDir, opts.stagingMaxAgeMs ?? 24 * 3600 * 1000);

  const uploadHash = opts.uploadToken === undefined ? undefined : hashOf(opts.uploadToken);
  const readHash = opts.readToken === undefined ? undefined : hashOf(opts.readToken);
  const allow = uploadHash ? "GET, HEAD, PUT" : "GET, HEAD";
  const startedAt = new Date().toUTCString();

  /** "upload", "read", "none" (no credentials) or "wrong". */
  const grant = (req: http.IncomingMessage): "upload" | "read" | "none" | "wrong" => {
    const t = presentedToken(req);
    if (t === undefined) return "none";
    const h = hashOf(t);
    if (uploadHash && timingSafeEqual(h, uploadHash)) return "upload";
    if (readHash && timingSafeEqual(h, readHash)) return "read";
    return "wrong";
  };

  // ---- the small-object cache -------------------------------------------------------------

  const entries = new Map<string, Entry>();
  const pending = new Map<string, Promise<Entry>>();

  const makeEntry = (kind: CacheKeyKind, body: Buffer | undefined, info: { etag: string; mtimeMs: number } | undefined): Entry => {
    const expires = Date.now() + ttl;
    if (body === undefined || info === undefined) return { body: undefined, etag: "", lastModified: "", headers: NOT_FOUND_HEADERS, expires };
    const lastModified = new Date(info.mtimeMs).toUTCString();
    const headers = ["Content-Type", contentTypeOf(kind), "Content-Length", String(body.length), "ETag", info.etag, "Last-Modified", lastModified];
    return { body, etag: info.etag, lastModified, headers, expires };
  };

  const remember = (key: string, e: Entry): Entry => {
    if (entries.size >= maxEntries && !entries.has(key)) {
      const oldest = entries.keys().next();
      if (!oldest.done) entries.delete(oldest.value);
    }
    entries.set(key, e);
    return e;
  };

  const loadEntry = async (key: string, kind: CacheKeyKind): Promise<Entry> => {
    const info = await backend.stat(key);
    const body = info ? await backend.readBytes(key) : undefined;
    if (body === undefined && kind === "cache-info") {
      const text = printCacheInfo({ storeDir, wantMassQuery: true, priority: opts.priority ?? 40 });
      return makeEntry(kind, Buffer.from(text), { etag: `"${createHash("sha256").update(text).digest("hex").slice(0, 16)}"`, mtimeMs: Date.parse(startedAt) });
    }
    return makeEntry(kind, body === undefined ? undefined : Buffer.from(body.buffer, body.byteOffset, body.byteLength), info);
  };

  /** An expired entry whose object did not change (same ETag, or still absent) is kept. */
  const revalidate = async (key: string, kind: CacheKeyKind, old: Entry): Promise<Entry> => {
    if (kind !== "narinfo") return loadEntry(key, kind);
    const info = await backend.stat(key);
    if (info === undefined && old.body === undefined) return { ...old, expires: Date.now() + ttl };
    if (info !== undefined && old.body !== undefined && info.etag === old.etag) return { ...old, expires: Date.now() + ttl };
    return loadEntry(key, kind);
  };

  const lookup = (key: string, kind: CacheKeyKind): Entry | Promise<Entry> => {
    const e = entries.get(key);
    if (e !== undefined && e.expires > Date.now()) return e;
    let p = pending.get(key);
    if (p === undefined) {
      p = (e === undefined ? loadEntry(key, kind) : revalidate(key, kind, e)).then(
        (fresh) => {
          pending.delete(key);
          return remember(key, fresh);
        },
        (err: unknown) => {
          pending.delete(key);
          throw err;
        },
      );
      pending.set(key, p);
    }
    return p;
  };

  // ---- responses ----------------------------------------------------------------------------

  const refuse = (req: http.IncomingMessage, res: http.ServerResponse, key: string, e: unknown): void => {
    const status = statusOf(e);
    const message = status === 500 && !isFerryError(e) ? "internal error" : (e as Error).message;
    events?.emit("cache:rejected", { method: req.method ?? "", key, status, reason: status === 500 ? String((e as Error)?.stack ?? e) : message });
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const body = Buffer.from(`${message}\n`);
    const headers: Record<string, string | number> = {
      "Content-Type": "text/plain; charset=utf-8",
      "Content-Length": body.length,
      ...(e instanceof Refusal ? e.headers : {}),
    };
    if (status === 401) headers["WWW-Authenticate"] = 'Bearer realm="ferry", Basic realm="ferry"';
    if (status === 405) headers["Allow"] = allow;
    // An upload refused before its body was read: do not read (possibly gigabytes) to keep the connection.
    if (req.method === "PUT" && !req.readableEnded) headers["Connection"] = "close";
    res.writeHead(status, headers);
    res.end(body);
  };

  const notFound = (res: http.ServerResponse, extra?: readonly string[]): void => {
    res.writeHead(404, extra ? [...NOT_FOUND_HEADERS, ...extra] : NOT_FOUND_HEADERS);
    res.end(NOT_FOUND);
  };

  const notModified = (req: http.IncomingMessage, etag: string, mtimeMs: number): boolean => {
    const inm = req.headers["if-none-match"];
    if (inm !== undefined) return inm === "*" || inm.split(",").some((t) => t.trim().replace(/^W\//, "") === etag);
    const ims = req.headers["if-modified-since"];
    if (ims !== undefined) {
      const t = Date.parse(ims);
      return !Number.isNaN(t) && Math.floor(mtimeMs / 1000) * 1000 <= t;
    }
    return false;
  };

  // ---- reads --------------------------------------------------------------------------------

  const serveSmall = (req: http.IncomingMessage, res: http.ServerResponse, e: Entry): void => {
    if (e.body === undefined) return notFound(res);
    if (hasHeader(req, CONDITIONAL) && notModified(req, e.etag, Date.parse(e.lastModified))) {
      res.writeHead(304, ["ETag", e.etag, "Last-Modified", e.lastModified]);
      res.end();
      return;
    }
    res.writeHead(200, e.headers as string[]);
    res.end(e.body);
  };

  const objectHeaders = (kind: CacheKeyKind, info: ObjectInfo): Record<string, string> => ({
    "Content-Type": contentTypeOf(kind),
    ETag: info.etag,
    "Last-Modified": new Date(info.mtimeMs).toUTCString(),
    "Accept-Ranges": "bytes",
  });

  const partialOffset = async (key: string): Promise<number | undefined> => {
    try {
      return (await fs.promises.stat(join(stagingDir, partialName(key)))).size;
    } catch {
      return undefined;
    }
  };

  const missing = async (req: http.IncomingMessage, res: http.ServerResponse, key: string, kind: CacheKeyKind, access: string): Promise<void> => {
    if (kind === "nar" && access === "upload") {
      const off = await partialOffset(key);
      if (off !== undefined) return notFound(res, [UPLOAD_OFFSET, String(off)]);
    }
    notFound(res);
  };

  const stream = (res: http.ServerResponse, body: Readable): void => {
    pipeline(body, res, () => undefined);
  };

  const serveObject = async (req: http.IncomingMessage, res: http.ServerResponse, key: string, kind: CacheKeyKind, access: string): Promise<void> => {
    const rangeHeader = req.headers.range;
    if (rangeHeader === undefined && req.method === "GET") {
      const r = await backend.read(key);
      if (r === undefined) return missing(req, res, key, kind, access);
      if (notModified(req, r.info.etag, r.info.mtimeMs)) {
        r.body.destroy();
        res.writeHead(304, { ETag: r.info.etag, "Last-Modified": new Date(r.info.mtimeMs).toUTCString() });
        res.end();
        return;
      }
      res.writeHead(200, { ...objectHeaders(kind, r.info), "Content-Length": r.info.size });
      return stream(res, r.body);
    }
    const info = await backend.stat(key);
    if (info === undefined) return missing(req, res, key, kind, access);
    if (notModified(req, info.etag, info.mtimeMs)) {
      res.writeHead(304, { ETag: info.etag, "Last-Modified": new Date(info.mtimeMs).toUTCString() });
      res.end();
      return;
    }
    const ifRange = req.headers["if-range"];
    const range = rangeHeader === undefined || (ifRange !== undefined && ifRange !== info.etag) ? undefined : parseRange(rangeHeader, info.size);
    if (range === "unsatisfiable") {
      res.writeHead(416, { "Content-Range": `bytes */${info.size}`, "Content-Length": 0 });
      res.end();
      return;
    }
    if (req.method === "HEAD") {
      if (range === undefined) res.writeHead(200, { ...objectHeaders(kind, info), "Content-Length": info.size });
      else res.writeHead(206, { ...objectHeaders(kind, info), "Content-Length": range.end - range.start + 1, "Content-Range": `bytes ${range.start}-${range.end}/${info.size}` });
      res.end();
      return;
    }
    const r = await backend.read(key, range);
    if (r === undefined) return missing(req, res, key, kind, access);
    if (range === undefined) {
      res.writeHead(200, { ...objectHeaders(kind, r.info), "Content-Length": r.info.size });
    } else {
      const end = Math.min(range.end, r.info.size - 1);
      res.writeHead(206, { ...objectHeaders(kind, r.info), "Content-Length": end - range.start + 1, "Content-Range": `bytes ${range.start}-${end}/${r.info.size}` });
    }
    stream(res, r.body);
  };

  // ---- writes -------------------------------------------------------------------------------

  /** Keys with a resumable upload running: one writer per partial file. */
  const appending = new Set<string>();

  const declaredLength = (req: http.IncomingMessage): number | undefined => {
    const cl = req.headers["content-length"];
    return cl === undefined ? undefined : Number(cl);
  };

  const proceed = (res: http.ServerResponse, expectContinue: boolean): void => {
    if (expectContinue) res.writeContinue();
  };

  const created = (res: http.ServerResponse, existed: boolean, extra: Record<string, string> = {}): void => {
    const body = Buffer.from(existed ? "already stored\n" : "stored\n");
    res.writeHead(existed ? 200 : 201, { "Content-Type": "text/plain; charset=utf-8", "Content-Length": body.length, ...extra });
    res.end(body);
  };

  const putNar = async (req: http.IncomingMessage, res: http.ServerResponse, key: string, expectContinue: boolean): Promise<void> => {
    const want = key.slice(4, 56);
    const existed = (await backend.stat(key)) !== undefined;
    proceed(res, expectContinue);
    // Stored again even if it existed: the fresh mtime keeps cache GC's grace period from taking
    // a NAR whose narinfo is about to arrive.
    const info = await backend.write(key, verified(bodyOf(req), maxNarSize, want), { contentType: contentTypeOf("nar"), maxBytes: maxNarSize });
    if (!appending.has(key)) await fs.promises.rm(join(stagingDir, partialName(key)), { force: true });
    events?.emit("cache:upload", { key, kind: "nar", bytes: info.size, outcome: existed ? "existed" : "stored" });
    created(res, existed);
  };

  const putNarRange = async (req: http.IncomingMessage, res: http.ServerResponse, key: string, contentRange: string, expectContinue: boolean): Promise<void> => {
    const m = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(contentRange.trim());
    if (!m) throw new Refusal(400, `Content-Range '${contentRange}' is not 'bytes START-END/TOTAL'`);
    const start = Number(m[1]);
    const end = Number(m[2]);
    const total = Number(m[3]);
    if (!(start <= end && end < total)) throw new Refusal(400, `Content-Range '${contentRange}' is not a range within the upload`);
    if (total > maxNarSize) throw tooLarge(maxNarSize);
    const expected = end - start + 1;
    const declared = declaredLength(req);
    if (declared !== undefined && declared !== expected) throw new Refusal(400, `Content-Length ${declared} does not match Content-Range '${contentRange}'`);
    if (appending.has(key)) throw new Refusal(409, `an upload of ${key} is already running`);
    appending.add(key);
    const partial = join(stagingDir, partialName(key));
    try {
      if ((await backend.stat(key)) !== undefined) {
        await fs.promises.rm(partial, { force: true });
        events?.emit("cache:upload", { key, kind: "nar", bytes: 0, outcome: "existed" });
        // The body is not needed: the NAR is already whole in the cache.
        res.setHeader("Connection", "close");
        return created(res, true);
      }
      const current = (await partialOffset(key)) ?? 0;
      if (start !== current) throw new Refusal(409, `the upload of ${key} continues at byte ${current}, not ${start}`, { [UPLOAD_OFFSET]: String(current) });
      proceed(res, expectContinue);
      let received = 0;
      const fh = await fs.promises.open(partial, "a", 0o644);
      try {
        for await (const c of bodyOf(req)) {
          if (received + c.length > expected) throw new Refusal(400, `the body is longer than Content-Range '${contentRange}' says`);
          let off = 0;
          while (off < c.length) off += (await fh.write(c, off, c.length - off)).bytesWritten;
          received += c.length;
        }
      } finally {
        await fh.close();
      }
      const size = start + received;
      if (received < expected) throw new Refusal(400, `the body ended after ${received} of ${expected} bytes`, { [UPLOAD_OFFSET]: String(size) });
      if (end + 1 < total) {
        events?.emit("cache:upload", { key, kind: "nar", bytes: received, outcome: "partial" });
        res.writeHead(202, { "Content-Length": 0, [UPLOAD_OFFSET]: String(size) });
        res.end();
        return;
      }
      try {
        const body = fs.createReadStream(partial, { highWaterMark: STREAM_CHUNK });
        const info = await backend.write(key, verified(body, maxNarSize, key.slice(4, 56)), { contentType: contentTypeOf("nar"), maxBytes: maxNarSize });
        events?.emit("cache:upload", { key, kind: "nar", bytes: info.size, outcome: "stored" });
      } catch (e) {
        // A whole upload that does not hash to its name is useless: start over.
        if (isFerryError(e, "FERRY_CACHE_HASH_MISMATCH")) await fs.promises.rm(partial, { force: true });
        throw e;
      }
      await fs.promises.rm(partial, { force: true });
      created(res, false);
    } finally {
      appending.delete(key);
    }
  };

  const putNarInfo = async (req: http.IncomingMessage, res: http.ServerResponse, key: string, expectContinue: boolean): Promise<void> => {
    proceed(res, expectContinue);
    const text = (await readBody(req, maxObjectSize)).toString("utf8");
    const info = parseNarInfo(storeDir, text);
    parseCompression(info.compression);
    const hashPart = info.storePath.slice(storeDir.length + 1, storeDir.length + 33);
    if (hashPart !== key.slice(0, 32)) throw new Refusal(400, `the narinfo is for ${info.storePath}, whose narinfo is ${hashPart}.narinfo, not ${key}`);
    if (classifyCacheKey(info.url) !== "nar") throw new Refusal(400, `the narinfo's URL '${info.url}' is not nar/<filehash>.nar[.zst|.xz|.bz2|.br] in this cache`);
    if (info.fileHash && (info.fileHash.algo !== "sha256" || toNix32(info.fileHash.digest) !== info.url.slice(4, 56))) {
      throw new Refusal(400, `the narinfo's FileHash ${printPrefixedHash(info.fileHash)} does not match its URL '${info.url}'`);
    }
    if (info.narHash.algo !== "sha256") throw new Refusal(400, `the narinfo's NarHash must be sha256, not ${info.narHash.algo}`);
    const nar = await backend.stat(info.url);
    if (nar === undefined) throw new Refusal(409, `the narinfo points at ${info.url}, which is not in the cache; upload the NAR first`);
    if (info.fileSize !== undefined && info.fileSize !== nar.size) {
      throw new Refusal(400, `the narinfo says FileSize ${info.fileSize}, but ${info.url} has ${nar.size} bytes`);
    }
    let sigs = info.sigs;
    if (opts.secretKey) {
      const ours = signMessage(opts.secretKey, fingerprintPath(info.storePath, printPrefixedHash(info.narHash), info.narSize, info.references));
      sigs = [...new Set([...info.sigs.filter((s) => !s.startsWith(`${opts.secretKey!.name}:`)), ours])];
    }
    const printed = Buffer.from(printNarInfo(storeDir, { ...info, sigs }));
    const before = await backend.readBytes(key);
    const existed = before !== undefined && Buffer.compare(Buffer.from(before), printed) === 0;
    const written = existed ? await backend.stat(key) : await backend.write(key, printed, { contentType: contentTypeOf("narinfo") });
    if (written) remember(key, makeEntry("narinfo", printed, written));
    else entries.delete(key);
    events?.emit("cache:upload", { key, kind: "narinfo", bytes: printed.length, outcome: existed ? "existed" : "stored" });
    created(res, existed);
  };

  const putSmall = async (req: http.IncomingMessage, res: http.ServerResponse, key: string, kind: CacheKeyKind, expectContinue: boolean): Promise<void> => {
    proceed(res, expectContinue);
    const body = await readBody(req, maxObjectSize);
    if (kind === "cache-info") {
      const ci = parseCacheInfo(body.toString("utf8"), { storeDir });
      if (ci.storeDir !== storeDir) throw new Refusal(400, `nix-cache-info says StoreDir ${ci.storeDir}, but this cache is for ${storeDir}`);
    } else if (kind === "root") {
      for (const line of body.toString("utf8").split("\n")) {
        const p = line.trim();
        if (p !== "" && !p.startsWith("#")) parseStorePath(storeDir, p);
      }
    }
    const existed = (await backend.stat(key)) !== undefined;
    const info = await backend.write(key, body, { contentType: contentTypeOf(kind), maxBytes: maxObjectSize });
    entries.delete(key);
    events?.emit("cache:upload", { key, kind, bytes: info.size, outcome: "stored" });
    created(res, existed);
  };

  // ---- dispatch -----------------------------------------------------------------------------

  const handle = async (req: http.IncomingMessage, res: http.ServerResponse, expectContinue: boolean): Promise<void> => {
    const url = req.url ?? "/";
    const q = url.indexOf("?");
    let key = q < 0 ? url.slice(1) : url.slice(1, q);
    let kind: CacheKeyKind | undefined;
    if (url.charCodeAt(0) === 47) {
      if (key.includes("%")) {
        try {
          key = decodeURIComponent(key);
        } catch {
          key = "%";
        }
      }
      kind = classifyCacheKey(key);
    }
    const method = req.method;
    if (events?.timesRequests) {
      const t0 = performance.now();
      res.once("finish", () => events!.emit("cache:request", { method: method ?? "", key, status: res.statusCode, durationMs: performance.now() - t0 }));
    }
    try {
      if (kind === undefined) {
        const shown = key.length > 120 ? `${key.slice(0, 120)}…` : key;
        throw new Refusal(400, `'${shown}' is not a binary cache object name (nix-cache-info, <hash>.narinfo, nar/<filehash>.nar[.ext], <hash>.ls, log/<drv>, roots/<name>)`);
      }
      if (method === "GET" || method === "HEAD") {
        let access = "read";
        if (readHash || hasHeader(req, AUTHORIZATION)) {
          const g = grant(req);
          if (g === "none" && readHash) throw new Refusal(401, "this cache needs a token to read");
          if (g === "wrong") throw new Refusal(403, "the token is not valid for this cache");
          access = g;
        }
        if (kind === "narinfo" || kind === "cache-info") {
          const e = lookup(key, kind);
          serveSmall(req, res, e instanceof Promise ? await e : e);
          return;
        }
        return await serveObject(req, res, key, kind, access);
      }
      if (method === "PUT") {
        if (!uploadHash) throw new Refusal(405, "this cache is read-only (the server has no upload token)");
        const g = grant(req);
        if (g === "none") throw new Refusal(401, "uploads need the cache's upload token (Authorization: Bearer TOKEN)");
        if (g !== "upload") throw new Refusal(403, "the token does not allow uploads to this cache");
        const declared = declaredLength(req);
        const contentRange = req.headers["content-range"];
        if (contentRange !== undefined) {
          if (kind !== "nar") throw new Refusal(400, "only NARs can be uploaded in parts (Content-Range)");
          return await putNarRange(req, res, key, contentRange, expectContinue);
        }
        const limit = kind === "nar" ? maxNarSize : maxObjectSize;
        if (declared !== undefined && declared > limit) throw tooLarge(limit);
        switch (kind) {
          case "nar":
            return await putNar(req, res, key, expectContinue);
          case "narinfo":
            return await putNarInfo(req, res, key, expectContinue);
          default:
            return await putSmall(req, res, key, kind, expectContinue);
        }
      }
      throw new Refusal(405, `method ${method} is not allowed`);
    } catch (e) {
      // The client went away mid-body: there is nobody to answer.
      if (!req.complete && (req.destroyed || req.socket.destroyed)) {
        res.destroy();
        return;
      }
      refuse(req, res, key, e);
    }
  };

  /**
   * The hot path, without promises or parsing: a plain GET of `/<hash>.narinfo` whose answer is
   * in memory and fresh, on a public cache, without conditional headers or request timing.
   * Anything else goes through `handle`. Returns whether it answered.
   */
  const answerFromMemory = (req: http.IncomingMessage, res: http.ServerResponse): boolean => {
    const url = req.url;
    if (url === undefined || url.length !== 41 || req.method !== "GET" || readHash !== undefined || events?.timesRequests) return false;
    const key = url.slice(1);
    const e = entries.get(key);
    if (e === undefined || e.expires <= Date.now() || !key.endsWith(".narinfo") || hasHeader(req, CONDITIONAL_OR_AUTH)) return false;
    serveSmall(req, res, e);
    return true;
  };

  const server = http.createServer({ keepAliveTimeout: 65_000, requestTimeout: 0, headersTimeout: 60_000 }, (req, res) => {
    if (answerFromMemory(req, res)) return;
    handle(req, res, false).catch(() => res.destroy());
  });
  server.on("checkContinue", (req: http.IncomingMessage, res: http.ServerResponse) => {
    handle(req, res, true).catch(() => res.destroy());
  });
  server.on("clientError", (_e, socket) => {
    if (socket.writable) socket.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    else socket.destroy();
  });

  await new Promise<void>((resolve, reject) => {
    server.once("error", (e: NodeJS.ErrnoException) => {
      const where = `${opts.host ?? "127.0.0.1"}:${opts.port ?? 0}`;
      reject(
        new FerryError("FERRY_CACHE_LISTEN_FAILED", `cannot listen on ${where}: ${e.message}`, {
          hint: e.code === "EADDRINUSE" ? "another program uses that port; pick another with --listen HOST:PORT (port 0 picks a free one)" : "check the address and your permissions (ports below 1024 need root)",
          cause: e,
        }),
      );
    });
    server.listen(opts.port ?? 0, opts.host ?? "127.0.0.1", () => {
      server.off("error", reject);
      resolve();
    });
  });
  const addr = server.address();
  if (addr === null || typeof addr === "string") throw new Error("the cache server has no TCP address");
  const host = addr.family === "IPv6" ? `[${addr.address}]` : addr.address;
  const url = `http://${host}:${addr.port}`;
  return {
    url,
    port: addr.port,
    forget: (key: string) => {
      entries.delete(key);
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

/** Removes partial uploads nobody has continued for `maxAgeMs`. */
function sweepStaging(dir: string, maxAgeMs: number): void {
  const now = Date.now();
  for (const name of fs.readdirSync(dir)) {
    if (!name.endsWith(".partial")) continue;
    const p = join(dir, name);
    try {
      if (now - fs.statSync(p).mtimeMs > maxAgeMs) fs.rmSync(p, { force: true });
    } catch {
      /* gone already */
    }
  }
}

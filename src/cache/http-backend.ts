/**
 * A remote binary cache over HTTP(S): GET/HEAD to read (Range for resumed downloads), PUT with a
 * bearer token to write. Connections are kept alive and shared, so a batch of narinfo lookups
 * reuses a few sockets. Large uploads from a file can resume where an interrupted one stopped
 * (`uploadFile`, the `Content-Range` protocol of `ferry cache serve`).
 */
import * as fs from "node:fs";
import * as http from "node:http";
import * as https from "node:https";
import { Readable } from "node:stream";
import { FerryError } from "../core/errors.js";
import { checkRelativeKey } from "../core/cache-layout.js";
import type { ByteRange, CacheBackend, ObjectInfo, ReadResult, WriteOptions } from "./backend.js";

/** Transport failures worth another attempt (the server may be restarting, the link flaky). */
const RETRYABLE = new Set(["ECONNRESET", "ECONNREFUSED", "EPIPE", "ETIMEDOUT", "ECONNABORTED", "EHOSTUNREACH", "ENETUNREACH", "EAI_AGAIN", "UND_ERR_SOCKET"]);

export interface HttpBackendOptions {
  readonly token?: string | undefined;
  /** Milliseconds without progress before a request is abandoned. */
  readonly timeoutMs?: number;
  readonly maxSockets?: number;
}

export function isRetryable(e: unknown): boolean {
  if (e instanceof FerryError) return e.code === "FERRY_CACHE_UNREACHABLE" || (e.details.retryable as boolean | undefined) === true;
  return RETRYABLE.has((e as NodeJS.ErrnoException).code ?? "");
}

export class HttpBackend implements CacheBackend {
  readonly url: string;
  readonly #base: URL;
  readonly #token: string | undefined;
  readonly #agent: http.Agent;
  readonly #timeoutMs: number;

  constructor(url: string, opts: HttpBackendOptions = {}) {
    this.url = url.replace(/\/+$/, "");
    this.#base = new URL(`${this.url}/`);
    this.#token = opts.token;
    this.#timeoutMs = opts.timeoutMs ?? 30_000;
    const agentOpts = { keepAlive: true, maxSockets: opts.maxSockets ?? 32, scheduling: "lifo" as const };
    this.#agent = this.#base.protocol === "https:" ? new https.Agent(agentOpts) : new http.Agent(agentOpts);
  }

  static open(url: string, opts: HttpBackendOptions = {}): HttpBackend {
    return new HttpBackend(url, opts);
  }

  /** Sends one request; resolves with the response (body unread) or a coded transport error. */
  #request(method: string, key: string, headers: Record<string, string | number> = {}, body?: Uint8Array | Readable): Promise<http.IncomingMessage> {
    const target = new URL(checkRelativeKey(key), this.#base);
    const h: Record<string, string | number> = { ...headers };
    if (this.#token) h.authorization = `Bearer ${this.#token}`;
    if (body instanceof Uint8Array) h["content-length"] = body.length;
    const mod = target.protocol === "https:" ? https : http;
    return new Promise((resolve, reject) => {
      const req = mod.request(target, { method, headers: h, agent: this.#agent }, resolve);
      req.setTimeout(this.#timeoutMs, () => req.destroy(Object.assign(new Error(`no answer within ${this.#timeoutMs / 1000} s`), { code: "ETIMEDOUT" })));
      req.on("error", (e) => reject(this.#transportError(e, method, key)));
      if (body instanceof Uint8Array) req.end(body);
      else if (body) {
        body.on("error", (e) => req.destroy(e));
        body.pipe(req);
      } else req.end();
    });
  }

  #transportError(e: Error, method: string, key: string): FerryError {
    if (e instanceof FerryError) return e;
    const code = (e as NodeJS.ErrnoException).code ?? "";
    return new FerryError("FERRY_CACHE_UNREACHABLE", `${method} ${this.url}/${key} failed: ${e.message}`, {
      hint: code === "ECONNREFUSED" ? `nothing listens at ${this.url}; is the cache server running?` : `check the network path to ${this.url}`,
      cause: e,
      details: { retryable: RETRYABLE.has(code) || code === "" },
    });
  }

  /** Turns a non-success status into a coded error (after draining the body for the reason). */
  async #statusError(res: http.IncomingMessage, method: string, key: string): Promise<FerryError> {
    let text = "";
    for await (const c of res) if (text.length < 500) text += (c as Buffer).toString("utf8");
    const status = res.statusCode ?? 0;
    const why = `${method} ${this.url}/${key}: HTTP ${status}${text.trim() ? ` (${text.trim().slice(0, 300)})` : ""}`;
    if (status === 401 || status === 403) {
      return new FerryError("FERRY_CACHE_DENIED", why, { hint: this.#token ? "the token was refused; check --token or FERRY_TOKEN" : "this cache needs a token: pass --token or set FERRY_TOKEN" });
    }
    if (status === 413) return new FerryError("FERRY_CACHE_TOO_LARGE", why, { hint: "the server refuses objects this large (its --max-upload-size)" });
    return new FerryError("FERRY_CACHE_IO", why, {
      hint: status >= 500 ? "the cache server failed; try again later or look at its log" : "the cache server refused the request",
      details: { status, retryable: status >= 500 || status === 408 || status === 429 },
    });
  }

  #info(key: string, res: http.IncomingMessage, size: number): ObjectInfo {
    const lm = res.headers["last-modified"];
    return { key, size, etag: (res.headers.etag as string | undefined) ?? "", mtimeMs: lm ? Date.parse(lm) : 0 };
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    const res = await this.#request("HEAD", key);
    res.resume();
    if (res.statusCode === 404 || res.statusCode === 410) return undefined;
    if (res.statusCode !== 200) throw await this.#statusError(res, "HEAD", key);
    return this.#info(key, res, Number(res.headers["content-length"] ?? 0));
  }

  async read(key: string, range?: ByteRange): Promise<ReadResult | undefined> {
    const headers: Record<string, string> = {};
    if (range && (range.start > 0 || range.end !== undefined)) headers.range = `bytes=${range.start}-${range.end ?? ""}`;
    const res = await this.#request("GET", key, headers);
    if (res.statusCode === 404 || res.statusCode === 410) {
      res.resume();
      return undefined;
    }
    if (res.statusCode === 206) {
      const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(res.headers["content-range"] ?? "");
      if (!m) throw new FerryError("FERRY_CACHE_IO", `GET ${this.url}/${key}: the server sent a partial answer without a valid Content-Range`, { hint: "the cache server or a proxy in between is broken" });
      return { info: this.#info(key, res, m[3] === "*" ? Number(m[2]) + 1 : Number(m[3])), body: res, start: Number(m[1]) };
    }
    if (res.statusCode === 200) return { info: this.#info(key, res, Number(res.headers["content-length"] ?? -1)), body: res, start: 0 };
    throw await this.#statusError(res, "GET", key);
  }

  async readBytes(key: string): Promise<Uint8Array | undefined> {
    const r = await this.read(key);
    if (!r) return undefined;
    const chunks: Buffer[] = [];
    try {
      for await (const c of r.body) chunks.push(c as Buffer);
    } catch (e) {
      throw this.#transportError(e as Error, "GET", key);
    }
    return Buffer.concat(chunks);
  }

  async write(key: string, body: Uint8Array | AsyncIterable<Uint8Array>, opts: WriteOptions = {}): Promise<ObjectInfo> {
    const headers: Record<string, string> = { "content-type": opts.contentType ?? "application/octet-stream" };
    const payload = body instanceof Uint8Array ? body : Readable.from(body);
    const res = await this.#request("PUT", key, headers, payload);
    if (res.statusCode !== 200 && res.statusCode !== 201 && res.statusCode !== 204) throw await this.#statusError(res, "PUT", key);
    res.resume();
    return { key, size: body instanceof Uint8Array ? body.length : -1, etag: (res.headers.etag as string | undefined) ?? "", mtimeMs: Date.now() };
  }

  /**
   * Uploads a file of `size` bytes, resuming an earlier interrupted upload of the same key:
   * asks the server how much it holds (HEAD's Upload-Offset), sends the rest with
   * Content-Range, and retries from the server's offset after a dropped connection.
   */
  async uploadFile(key: string, file: string, size: number, opts: { contentType?: string; attempts?: number; onResume?: (offset: number) => void } = {}): Promise<void> {
    let offset = await this.#uploadOffset(key);
    if (offset > 0) opts.onResume?.(offset);
    for (let attempt = 1; ; attempt++) {
      try {
        const headers: Record<string, string | number> = {
          "content-type": opts.contentType ?? "application/octet-stream",
          "content-length": size - offset,
          "content-range": size === 0 ? `bytes */0` : `bytes ${offset}-${size - 1}/${size}`,
        };
        const body = size - offset > 0 ? fs.createReadStream(file, { start: offset, highWaterMark: 256 * 1024 }) : new Uint8Array(0);
        const res = await this.#request("PUT", key, headers, body);
        if (res.statusCode === 200 || res.statusCode === 201 || res.statusCode === 204) {
          res.resume();
          return;
        }
        if (res.statusCode === 409 && res.headers["upload-offset"] !== undefined) {
          res.resume();
          offset = Number(res.headers["upload-offset"]);
          continue;
        }
        throw await this.#statusError(res, "PUT", key);
      } catch (e) {
        if (!isRetryable(e) || attempt >= (opts.attempts ?? 5)) throw e;
        await new Promise((r) => setTimeout(r, Math.min(200 * 2 ** attempt, 5000)));
        offset = await this.#uploadOffset(key).catch(() => offset);
        opts.onResume?.(offset);
      }
    }
  }

  /** How many bytes of an unfinished upload of `key` the server holds (0 when none). */
  async #uploadOffset(key: string): Promise<number> {
    const res = await this.#request("HEAD", key);
    res.resume();
    const off = res.headers["upload-offset"];
    return res.statusCode === 404 && typeof off === "string" && /^\d+$/.test(off) ? Number(off) : 0;
  }

  async delete(key: string): Promise<boolean> {
    const res = await this.#request("DELETE", key);
    if (res.statusCode === 404) {
      res.resume();
      return false;
    }
    if (res.statusCode !== 200 && res.statusCode !== 204) throw await this.#statusError(res, "DELETE", key);
    res.resume();
    return true;
  }

  // eslint-disable-next-line require-yield
  async *list(_prefix: string): AsyncIterable<ObjectInfo> {
    throw new FerryError("FERRY_CACHE_UNSUPPORTED", `${this.url} cannot be listed over HTTP`, {
      hint: "run `ferry cache gc` where the cache's directory or bucket is, with --dir or --s3",
    });
  }

  async close(): Promise<void> {
    this.#agent.destroy();
  }
}

/**
 * A binary cache in an S3 bucket or an S3-compatible server:
 *
 *   s3://bucket[/prefix][?endpoint=URL&region=R&profile=P&scheme=http|https]
 *
 * The parameters are Nix's: `region` defaults to us-east-1, `endpoint` names an S3-compatible
 * server (addressed path-style, as such servers expect), `profile` picks a profile from the AWS
 * config files, `scheme` applies to an endpoint given without one. Credentials come from the
 * AWS SDK's default chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the profile, instance
 * roles). The SDK is loaded when a backend is opened, not when Ferry starts.
 *
 * Writes are atomic because S3 makes an object visible only once it is whole: a body that fits
 * in one part is sent with one PutObject, a longer one as a multipart upload that is completed
 * only after its last part and aborted on any failure.
 */
import { createHash } from "node:crypto";
import { Readable } from "node:stream";
import type * as S3Sdk from "@aws-sdk/client-s3";
import { FerryError } from "../core/errors.js";
import { checkRelativeKey } from "../core/cache-layout.js";
import type { ByteRange, CacheBackend, ObjectInfo, ReadResult, WriteOptions } from "./backend.js";
import { tooLarge } from "./file-backend.js";

type Sdk = typeof S3Sdk;

export interface S3BackendOptions {
  /** Attempts per request, the first included (default 3). */
  readonly maxAttempts?: number;
  /** Milliseconds to wait for a connection to the server (default 10 000). */
  readonly connectTimeoutMs?: number;
  /** Milliseconds a connection may sit idle mid-request before it is given up (default 120 000). */
  readonly idleTimeoutMs?: number;
}

/** The settings an s3:// URL carries. */
export interface S3Location {
  readonly bucket: string;
  /** "" or a prefix without leading or trailing slash. */
  readonly prefix: string;
  readonly region: string;
  readonly endpoint: string | undefined;
  readonly profile: string | undefined;
}

/** Parts of a multipart upload start at this size (S3 wants ≥ 5 MiB for all but the last). */
const PART_SIZE = 8 * 1024 * 1024;
/** S3 allows 10 000 parts; the part size doubles every 1 000 parts so a NAR of any size fits. */
const PARTS_PER_SIZE = 1000;

const S3_PARAMS = new Set(["endpoint", "region", "profile", "scheme"]);
/** Nix binary cache store settings a copied URL may carry; Ferry does not act on them here. */
const NIX_STORE_PARAMS = new Set([
  "multipart-upload",
  "buffer-size",
  "write-nar-listing",
  "write-debug-info",
  "index-debug-info",
  "ls-compression",
  "log-compression",
  "narinfo-compression",
  "parallel-compression",
  "compression-level",
  "local-nar-cache",
]);

function badUrl(url: string, why: string): FerryError {
  return new FerryError("FERRY_CACHE_BAD_URL", `'${url}' is not a usable S3 cache URL: ${why}`, {
    hint: "use s3://bucket[/prefix][?region=R&endpoint=URL&profile=P]",
  });
}

/** Reads an s3:// URL; throws FERRY_CACHE_BAD_URL for anything it does not understand. */
export function parseS3Url(url: string): S3Location {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw badUrl(url, "it does not parse");
  }
  if (u.protocol !== "s3:") throw badUrl(url, "the scheme is not s3");
  const bucket = u.hostname;
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$/.test(bucket)) throw badUrl(url, `'${bucket}' is not a bucket name`);
  if (u.username || u.password || u.port) throw badUrl(url, "credentials and ports go in the environment and ?endpoint=, not in the URL");
  const prefix = decodeURIComponent(u.pathname).replace(/^\/+|\/+$/g, "");
  if (prefix !== "" && !/^[A-Za-z0-9._+=-][A-Za-z0-9._+=/-]*$/.test(prefix)) throw badUrl(url, `'${prefix}' is not a usable key prefix`);
  if (prefix !== "" && prefix.split("/").some((s) => s === "" || s === "." || s === "..")) throw badUrl(url, `'${prefix}' is not a usable key prefix`);
  for (const k of u.searchParams.keys()) {
    if (!S3_PARAMS.has(k) && !NIX_STORE_PARAMS.has(k)) throw badUrl(url, `unknown parameter '${k}' (known: ${[...S3_PARAMS].join(", ")})`);
  }
  const scheme = u.searchParams.get("scheme") ?? "https";
  if (scheme !== "http" && scheme !== "https") throw badUrl(url, `scheme must be http or https, not '${scheme}'`);
  let endpoint = u.searchParams.get("endpoint") ?? undefined;
  if (endpoint !== undefined) {
    if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(endpoint)) endpoint = `${scheme}://${endpoint}`;
    try {
      const e = new URL(endpoint);
      if (e.protocol !== "http:" && e.protocol !== "https:") throw new Error("not http(s)");
    } catch {
      throw badUrl(url, `endpoint '${endpoint}' is not an http(s) URL`);
    }
  }
  const region = u.searchParams.get("region") || "us-east-1";
  const profile = u.searchParams.get("profile") || undefined;
  return { bucket, prefix, region, endpoint, profile };
}

/** The status code of an SDK service error, if it is one. */
function statusOf(e: unknown): number | undefined {
  return (e as { $metadata?: { httpStatusCode?: number } } | undefined)?.$metadata?.httpStatusCode;
}

function nameOf(e: unknown): string {
  return (e as { name?: string } | undefined)?.name ?? "";
}

const NETWORK_CODES = new Set(["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH", "EPIPE", "ECONNABORTED"]);

function isNetworkError(e: unknown): boolean {
  const err = e as { code?: string; errors?: unknown[] } | undefined;
  if (nameOf(e) === "TimeoutError") return true;
  if (err?.code !== undefined && NETWORK_CODES.has(err.code)) return true;
  return Array.isArray(err?.errors) && err.errors.some(isNetworkError);
}

/** HeadObject answers 404 "NotFound", GetObject "NoSuchKey"; a missing bucket is not a missing object. */
function isMissing(e: unknown): boolean {
  return statusOf(e) === 404 && nameOf(e) !== "NoSuchBucket";
}

export class S3Backend implements CacheBackend {
  readonly url: string;
  readonly location: S3Location;
  readonly #sdk: Sdk;
  readonly #client: S3Sdk.S3Client;
  readonly #keyPrefix: string;
  /** What the client talks to, for messages. */
  readonly #server: string;

  private constructor(url: string, location: S3Location, sdk: Sdk, opts: S3BackendOptions) {
    this.url = url;
    this.location = location;
    this.#sdk = sdk;
    this.#keyPrefix = location.prefix === "" ? "" : `${location.prefix}/`;
    this.#server = location.endpoint ?? `S3 in ${location.region}`;
    const custom = location.endpoint !== undefined;
    this.#client = new sdk.S3Client({
      region: location.region,
      maxAttempts: opts.maxAttempts ?? 3,
      requestHandler: { connectionTimeout: opts.connectTimeoutMs ?? 10_000, socketTimeout: opts.idleTimeoutMs ?? 120_000 },
      ...(location.profile !== undefined ? { profile: location.profile } : {}),
      // S3-compatible servers are addressed path-style and often reject the SDK's newer
      // default integrity headers; every body carries a Content-MD5 instead.
      ...(custom
        ? { endpoint: location.endpoint, forcePathStyle: true, requestChecksumCalculation: "WHEN_REQUIRED", responseChecksumValidation: "WHEN_REQUIRED" }
        : { followRegionRedirects: true }),
    });
  }

  /** Opens a backend for an s3:// URL. Nothing is sent until the first request. */
  static async open(url: string, opts: S3BackendOptions = {}): Promise<S3Backend> {
    const location = parseS3Url(url);
    // The SDK warns on every Node 20 process about its future Node 22 requirement; Ferry
    // supports Node 20, so the warning only confuses users.
    process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
    const sdk = await import("@aws-sdk/client-s3");
    return new S3Backend(url, location, sdk, opts);
  }

  #key(key: string): string {
    return this.#keyPrefix + checkRelativeKey(key);
  }

  #error(e: unknown, what: string): FerryError {
    if (e instanceof FerryError) return e;
    const msg = `${what}: ${(e as Error)?.message ?? String(e)}`;
    const name = nameOf(e);
    const status = statusOf(e);
    if (isNetworkError(e)) {
      return new FerryError("FERRY_CACHE_UNREACHABLE", msg, {
        hint: `check that ${this.#server} is up and reachable from this machine`,
        cause: e,
      });
    }
    if (name === "CredentialsProviderError") {
      return new FerryError("FERRY_CACHE_DENIED", msg, {
        hint: "no AWS credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add ?profile=NAME for a profile in ~/.aws/credentials",
        cause: e,
      });
    }
    if (status === 401 || status === 403 || ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"].includes(name)) {
      return new FerryError("FERRY_CACHE_DENIED", msg, {
        hint: `${this.#server} refused the credentials or the bucket's policy does not allow this; check the access key (AWS_ACCESS_KEY_ID, ?profile=) and that it may read, write and list bucket '${this.location.bucket}' (without s3:ListBucket, S3 answers a missing object with 403)`,
        cause: e,
      });
    }
    let hint = `${this.#server} answered with an error${status ? ` (HTTP ${status})` : ""}; try again, or check the server's logs`;
    if (name === "NoSuchBucket") hint = `bucket '${this.location.bucket}' does not exist on ${this.#server}; create it or fix the URL`;
    else if (status === 301 || name === "PermanentRedirect" || name === "AuthorizationHeaderMalformed") {
      hint = `bucket '${this.location.bucket}' is in another region than ${this.location.region}; add ?region=… to the URL`;
    }
    return new FerryError("FERRY_CACHE_IO", msg, { hint, cause: e });
  }

  async #send<T>(what: string, run: (client: S3Sdk.S3Client, sdk: Sdk) => Promise<T>): Promise<T> {
    try {
      return await run(this.#client, this.#sdk);
    } catch (e) {
      throw this.#error(e, what);
    }
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    const Key = this.#key(key);
    try {
      const out = await this.#client.send(new this.#sdk.HeadObjectCommand({ Bucket: this.location.bucket, Key }));
      const size = out.ContentLength ?? 0;
      return { key, size, etag: out.ETag ?? weakEtag(size, out.LastModified), mtimeMs: out.LastModified?.getTime() ?? 0 };
    } catch (e) {
      if (isMissing(e)) return undefined;
      throw this.#error(e, `cannot read ${key} in ${this.url}`);
    }
  }

  async read(key: string, range?: ByteRange): Promise<ReadResult | undefined> {
    const Key = this.#key(key);
    const start = range?.start ?? 0;
    const empty = async () => {
      const info = await this.stat(key);
      return info && { info, body: Readable.from([]), start };
    };
    // A range that ends before it starts is not one S3 refuses: it would send the whole object.
    if (range?.end !== undefined && range.end < start) return empty();
    let out: S3Sdk.GetObjectCommandOutput;
    try {
      out = await this.#client.send(
        new this.#sdk.GetObjectCommand({ Bucket: this.location.bucket, Key, ...(range ? { Range: `bytes=${start}-${range.end ?? ""}` } : {}) }),
      );
    } catch (e) {
      if (isMissing(e)) return undefined;
      // 416: the range starts at or past the end (or the object is empty).
      if (statusOf(e) === 416 || nameOf(e) === "InvalidRange") return empty();
      throw this.#error(e, `cannot read ${key} in ${this.url}`);
    }
    const served = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(out.ContentRange ?? "");
    const size = served ? Number(served[3]) : (out.ContentLength ?? 0);
    const info = { key, size, etag: out.ETag ?? weakEtag(size, out.LastModified), mtimeMs: out.LastModified?.getTime() ?? 0 };
    const body = toReadable(out.Body);
    if (range === undefined) return { info, body, start: 0 };
    // Some S3-compatible servers ignore a range or serve a wider one (s3rver reads "bytes=0-0"
    // as "bytes=0-"): what they sent is cut down to what was asked.
    const from = served ? Number(served[1]) : 0;
    const to = served ? Number(served[2]) : size - 1;
    const end = Math.min(range.end ?? size - 1, size - 1);
    if (start > end) {
      body.destroy();
      return { info, body: Readable.from([]), start };
    }
    if (from === start && to === end) return { info, body, start };
    if (from > start || to < end) {
      body.destroy();
      throw this.#error(new Error(`asked for bytes ${start}-${end}, the server sent ${from}-${to}`), `cannot read ${key} in ${this.url}`);
    }
    return { info, body: Readable.from(sliceStream(body, start - from, end - start + 1)), start };
  }

  async readBytes(key: string): Promise<Uint8Array | undefined> {
    const Key = this.#key(key);
    try {
      const out = await this.#client.send(new this.#sdk.GetObjectCommand({ Bucket: this.location.bucket, Key }));
      return out.Body ? await out.Body.transformToByteArray() : new Uint8Array(0);
    } catch (e) {
      if (isMissing(e)) return undefined;
      throw this.#error(e, `cannot read ${key} in ${this.url}`);
    }
  }

  async write(key: string, body: Uint8Array | AsyncIterable<Uint8Array>, opts: WriteOptions = {}): Promise<ObjectInfo> {
    const Key = this.#key(key);
    const max = opts.maxBytes;
    if (body instanceof Uint8Array) {
      if (max !== undefined && body.length > max) throw tooLarge(max);
      return this.#put(key, Key, body, opts);
    }
    let chunks: Uint8Array[] = [];
    let buffered = 0;
    let total = 0;
    let upload: MultipartUpload | undefined;
    try {
      for await (const c of body) {
        total += c.length;
        if (max !== undefined && total > max) throw tooLarge(max);
        chunks.push(c);
        buffered += c.length;
        if (buffered >= (upload?.nextPartSize ?? PART_SIZE)) {
          upload ??= await this.#startUpload(key, Key, opts);
          await upload.add(Buffer.concat(chunks, buffered));
          chunks = [];
          buffered = 0;
        }
      }
      if (upload === undefined) return await this.#put(key, Key, Buffer.concat(chunks, buffered), opts);
      if (buffered > 0) await upload.add(Buffer.concat(chunks, buffered));
      const etag = await upload.complete(total);
      return { key, size: total, etag, mtimeMs: Date.now() };
    } catch (e) {
      await upload?.abort();
      throw e;
    }
  }

  /** One PutObject; S3 stores it whole or not at all. mtimeMs is this machine's clock. */
  async #put(key: string, Key: string, bytes: Uint8Array, opts: WriteOptions): Promise<ObjectInfo> {
    const out = await this.#send(`cannot write ${key} to ${this.url}`, (client, sdk) =>
      client.send(
        new sdk.PutObjectCommand({
          Bucket: this.location.bucket,
          Key,
          Body: bytes,
          ContentLength: bytes.length,
          ContentMD5: md5Base64(bytes),
          ...(opts.contentType ? { ContentType: opts.contentType } : {}),
        }),
      ),
    );
    return { key, size: bytes.length, etag: out.ETag ?? weakEtag(bytes.length, undefined), mtimeMs: Date.now() };
  }

  async #startUpload(key: string, Key: string, opts: WriteOptions): Promise<MultipartUpload> {
    const what = `cannot write ${key} to ${this.url}`;
    const out = await this.#send(what, (client, sdk) =>
      client.send(new sdk.CreateMultipartUploadCommand({ Bucket: this.location.bucket, Key, ...(opts.contentType ? { ContentType: opts.contentType } : {}) })),
    );
    if (!out.UploadId) throw this.#error(new Error("the server returned no upload id"), what);
    return new MultipartUpload(this.location.bucket, Key, out.UploadId, (run) => this.#send(what, run));
  }

  /** S3's DeleteObject does not say whether the key existed, so the answer comes from a HEAD first. */
  async delete(key: string): Promise<boolean> {
    const Key = this.#key(key);
    if ((await this.stat(key)) === undefined) return false;
    await this.#send(`cannot delete ${key} in ${this.url}`, (client, sdk) => client.send(new sdk.DeleteObjectCommand({ Bucket: this.location.bucket, Key })));
    return true;
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    let token: string | undefined;
    do {
      const out = await this.#send(`cannot list ${this.url}`, (client, sdk) =>
        client.send(new sdk.ListObjectsV2Command({ Bucket: this.location.bucket, Prefix: this.#keyPrefix + prefix, ContinuationToken: token })),
      );
      for (const o of out.Contents ?? []) {
        // Keys ending in "/" are the folder markers some consoles create, not objects.
        if (o.Key === undefined || o.Key.endsWith("/") || !o.Key.startsWith(this.#keyPrefix)) continue;
        const size = o.Size ?? 0;
        yield { key: o.Key.slice(this.#keyPrefix.length), size, etag: o.ETag ?? weakEtag(size, o.LastModified), mtimeMs: o.LastModified?.getTime() ?? 0 };
      }
      token = out.IsTruncated ? out.NextContinuationToken : undefined;
    } while (token !== undefined);
  }

  async close(): Promise<void> {
    this.#client.destroy();
  }
}

type Send = <T>(run: (client: S3Sdk.S3Client, sdk: Sdk) => Promise<T>) => Promise<T>;

/** A multipart upload with at most one part in flight while the next one is read. */
class MultipartUpload {
  readonly #parts: { PartNumber: number; ETag: string }[] = [];
  #count = 0;
  #inflight: Promise<void> | undefined;

  constructor(
    readonly bucket: string,
    readonly key: string,
    readonly uploadId: string,
    readonly send: Send,
  ) {}

  /** The size the next part should reach before it is sent. */
  get nextPartSize(): number {
    return PART_SIZE * 2 ** Math.floor(this.#count / PARTS_PER_SIZE);
  }

  async add(part: Buffer): Promise<void> {
    await this.#inflight;
    const PartNumber = ++this.#count;
    const p = this.send((client, sdk) =>
      client.send(
        new sdk.UploadPartCommand({
          Bucket: this.bucket,
          Key: this.key,
          UploadId: this.uploadId,
          PartNumber,
          Body: part,
          ContentLength: part.length,
          ContentMD5: md5Base64(part),
        }),
      ),
    ).then((out) => {
      if (!out.ETag) throw new FerryError("FERRY_CACHE_IO", `the server returned no ETag for part ${PartNumber} of ${this.key}`, { hint: "the S3 server is not compatible enough; try another one" });
      this.#parts.push({ PartNumber, ETag: out.ETag });
    });
    // Observed here so a failure is not unhandled before the next add() or complete() awaits it.
    p.catch(() => undefined);
    this.#inflight = p;
  }

  async complete(size: number): Promise<string> {
    await this.#inflight;
    const Parts = [...this.#parts].sort((a, b) => a.PartNumber - b.PartNumber);
    const out = await this.send((client, sdk) =>
      client.send(new sdk.CompleteMultipartUploadCommand({ Bucket: this.bucket, Key: this.key, UploadId: this.uploadId, MultipartUpload: { Parts } })),
    );
    return out.ETag ?? weakEtag(size, undefined);
  }

  /**
   * Best effort: the upload was never completed, so no object appeared either way. A failed
   * abort leaves parts that only the bucket's AbortIncompleteMultipartUpload lifecycle rule
   * cleans up, and the caller's original error is the one worth reporting.
   */
  async abort(): Promise<void> {
    await this.#inflight?.catch(() => undefined);
    await this.send((client, sdk) => client.send(new sdk.AbortMultipartUploadCommand({ Bucket: this.bucket, Key: this.key, UploadId: this.uploadId }))).catch(() => undefined);
  }
}

/** `length` bytes of `source` after skipping `skip`; the source is closed once they are through. */
async function* sliceStream(source: Readable, skip: number, length: number): AsyncGenerator<Buffer> {
  let left = length;
  for await (const chunk of source) {
    const c = chunk as Buffer;
    if (skip >= c.length) {
      skip -= c.length;
      continue;
    }
    const piece = c.subarray(skip, skip + Math.min(left, c.length - skip));
    skip = 0;
    left -= piece.length;
    yield piece;
    if (left === 0) return;
  }
}

/** The SDK's body in Node is an IncomingMessage (or a checksum-validating stream around one). */
function toReadable(body: unknown): Readable {
  if (body === undefined) return Readable.from([]);
  if (body instanceof Readable) return body;
  if (typeof (body as AsyncIterable<Uint8Array>)[Symbol.asyncIterator] === "function") return Readable.from(body as AsyncIterable<Uint8Array>);
  throw new Error(`unexpected S3 response body type ${Object.prototype.toString.call(body)}`);
}

function md5Base64(bytes: Uint8Array): string {
  return createHash("md5").update(bytes).digest("base64");
}

/** For servers that send no ETag: changes with the size and the modification time. */
function weakEtag(size: number, modified: Date | undefined): string {
  return `"${(modified?.getTime() ?? Date.now()).toString(16)}-${size.toString(16)}"`;
}

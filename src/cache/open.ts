/**
 * Opens the backend a cache URL names:
 *   file:///abs/dir  or  /abs/dir          a directory
 *   s3://bucket[/prefix][?endpoint=URL&region=R&profile=P]   an S3-compatible bucket
 *   http://host:port[/prefix], https://…   a remote cache (reads public or with a token,
 *                                          writes with a token)
 * Query parameters other than the ones above (Nix's `?priority=`, `?trusted=`) are kept for
 * the caller in `params` and not passed to the backend.
 */
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { FerryError } from "../core/errors.js";
import type { CacheBackend } from "./backend.js";
import { FileBackend } from "./file-backend.js";

export interface OpenOptions {
  /** Bearer token for HTTP caches (falls back to FERRY_TOKEN). */
  readonly token?: string | undefined;
}

export interface ParsedCacheUrl {
  readonly scheme: "file" | "s3" | "http";
  /** The URL without the settings Ferry reads itself (priority, trusted). */
  readonly url: string;
  readonly params: ReadonlyMap<string, string>;
}

const CLIENT_PARAMS = new Set(["priority", "trusted", "want-mass-query", "compression", "secret-key"]);

export function parseCacheUrl(text: string): ParsedCacheUrl {
  let u: URL;
  if (text.startsWith("/")) {
    // A directory, escaped (its name may hold '#', '%' or spaces); settings may follow a '?'.
    const q = text.indexOf("?");
    u = pathToFileURL(resolve(q < 0 ? text : text.slice(0, q)));
    if (q >= 0) u.search = text.slice(q);
  } else {
    try {
      u = new URL(text);
    } catch {
      throw badUrl(text);
    }
  }
  const params = new Map<string, string>();
  for (const [k, v] of [...u.searchParams]) {
    if (CLIENT_PARAMS.has(k)) {
      params.set(k, v);
      u.searchParams.delete(k);
    }
  }
  const url = u.toString().replace(/\/$/, "");
  switch (u.protocol) {
    case "file:":
      return { scheme: "file", url, params };
    case "s3:":
      return { scheme: "s3", url, params };
    case "http:":
    case "https:":
      return { scheme: "http", url, params };
    default:
      throw badUrl(text);
  }
}

function badUrl(text: string): FerryError {
  return new FerryError("FERRY_CACHE_BAD_URL", `'${text}' is not a binary cache URL`, {
    hint: "use file:///abs/dir, an absolute directory, s3://bucket/prefix or http(s)://host[:port][/prefix]",
  });
}

export async function openBackend(text: string, opts: OpenOptions = {}): Promise<CacheBackend> {
  const parsed = parseCacheUrl(text);
  switch (parsed.scheme) {
    case "file":
      return FileBackend.open(decodeURIComponent(new URL(parsed.url).pathname));
    case "s3":
      return (await import("./s3-backend.js")).S3Backend.open(parsed.url);
    case "http":
      return (await import("./http-backend.js")).HttpBackend.open(parsed.url, { token: opts.token ?? process.env.FERRY_TOKEN });
  }
}

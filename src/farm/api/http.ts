/**
 * The coordinator's HTTP plumbing: routes as values (method, an OpenAPI path template, who may
 * call it, a handler), one router that matches them, checks the caller's role, reads bodies and
 * turns errors into `{ "error": { code, message, hint } }` with the right status.
 *
 * Routes are plain data so that other parts of the farm (the dispatcher's worker and step
 * routes) can be added by passing more of them to `startCoordinator`, and so that a test can
 * compare the router's routes with the OpenAPI document.
 */
import type * as http from "node:http";
import { FerryError, errorBody, isFerryError, type ErrorBody } from "../../core/errors.js";
import { firstEvent } from "../../core/events.js";
import type { Role } from "./auth.js";

/** A FerryError with the HTTP status it is answered with. */
export class ApiError extends FerryError {
  readonly status: number;
  constructor(status: number, code: string, message: string, hint?: string) {
    super(code, message, hint === undefined ? {} : { hint });
    this.status = status;
  }
}

/** The JSON shape of an error, in responses and in per-item results. */
export { errorBody, type ErrorBody };

/**
 * Who may call a route: `public` anyone; `read` anyone when reads are open, else a token
 * (admin, worker, read-only); `admin` the admin token; `self` the handler authenticates
 * (webhooks signed with a shared secret).
 */
export type Access = "public" | "read" | "admin" | "self";

export type Method = "GET" | "POST" | "PUT" | "PATCH" | "DELETE";

export interface ApiRequest {
  readonly raw: http.IncomingMessage;
  /** Path parameters by the names in the route's template, URL-decoded. */
  readonly params: Readonly<Record<string, string>>;
  readonly query: URLSearchParams;
  /** The caller's role, already checked against the route's access. */
  readonly role: Role;
  /** The raw body (at most 1 MiB). */
  body(): Promise<Buffer>;
  /** The body as a JSON object; an empty body is `{}`. */
  json(): Promise<Record<string, unknown>>;
}

export type Reply =
  | { readonly status: number; readonly json: unknown; readonly headers?: Readonly<Record<string, string>> }
  | { readonly status: number; readonly text: string | Uint8Array; readonly contentType: string; readonly headers?: Readonly<Record<string, string>> }
  | StreamReply;

/**
 * A body sent as it is produced (chunked unless `headers` has a Content-Length). `signal` is
 * aborted when the client goes away, and the router stops pulling chunks: the producer ends and
 * releases what it holds. A producer that throws after the first chunk cuts the response short
 * (the client sees an incomplete body, not a clean end).
 */
export interface StreamReply {
  readonly status: number;
  readonly contentType: string;
  readonly headers?: Readonly<Record<string, string>>;
  stream(signal: AbortSignal): AsyncIterable<Uint8Array>;
}

export interface Route {
  readonly method: Method;
  /** An OpenAPI path template: `/api/builds/{id}`. A literal segment wins over a parameter. */
  readonly path: string;
  readonly access: Access;
  run(req: ApiRequest): Promise<Reply>;
}

export const ok = (json: unknown, status = 200): Reply => ({ status, json });

const MAX_BODY = 1 << 20;

async function readBody(req: http.IncomingMessage): Promise<Buffer> {
  const parts: Buffer[] = [];
  let n = 0;
  for await (const c of req) {
    n += (c as Buffer).length;
    if (n > MAX_BODY) throw new ApiError(413, "FERRY_FARM_TOO_LARGE", "the request body is larger than 1 MiB");
    parts.push(c as Buffer);
  }
  return Buffer.concat(parts);
}

function parseJsonObject(buf: Buffer): Record<string, unknown> {
  const text = buf.toString("utf8");
  if (text.trim() === "") return {};
  try {
    const v = JSON.parse(text) as unknown;
    if (v === null || typeof v !== "object" || Array.isArray(v)) throw new Error("not an object");
    return v as Record<string, unknown>;
  } catch (e) {
    throw new ApiError(400, "FERRY_FARM_BAD_JSON", `the request body is not a JSON object: ${(e as Error).message}`, "send a JSON object with Content-Type: application/json");
  }
}

interface Compiled {
  readonly route: Route;
  readonly re: RegExp;
  readonly names: readonly string[];
  /** Literal segments count: more literal segments match first. */
  readonly literals: number;
}

function compile(route: Route): Compiled {
  const names: string[] = [];
  const segments = route.path.split("/").slice(1);
  const re = segments
    .map((s) => {
      const m = /^\{([A-Za-z0-9_]+)\}$/.exec(s);
      if (!m) return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
      names.push(m[1]!);
      return "([^/]+)";
    })
    .join("/");
  return { route, re: new RegExp(`^/${re}$`), names, literals: segments.length - names.length };
}

/** Checks a caller's role against a route's access; throws 401/403 with a hint. */
export function checkAccess(access: Access, role: Role, readsOpen: boolean): void {
  if (access === "public" || access === "self") return;
  if (role === "wrong") throw new ApiError(403, "FERRY_FARM_FORBIDDEN", "the token is not valid here", "check --token (or FERRY_TOKEN); tokens are listed with `ferry farm token list`");
  if (access === "admin") {
    if (role === "none") throw new ApiError(401, "FERRY_FARM_UNAUTHORIZED", "this needs the admin token", "pass --token (Authorization: Bearer TOKEN)");
    if (role !== "admin") throw new ApiError(403, "FERRY_FARM_FORBIDDEN", `a ${role} token does not allow changes`, "use the admin token");
    return;
  }
  if (role === "none" && !readsOpen) throw new ApiError(401, "FERRY_FARM_UNAUTHORIZED", "this farm needs a token to read", "pass --token (Authorization: Bearer TOKEN) with a read-only, worker or admin token");
}

export interface RouterOptions {
  readonly routes: readonly Route[];
  authenticate(req: http.IncomingMessage): Promise<Role>;
  /** Whether reads need no token (no read-only token is configured). */
  readsOpen(): Promise<boolean>;
}

/** The request handler for a set of routes. */
export function createRouter(opts: RouterOptions): (req: http.IncomingMessage, res: http.ServerResponse) => void {
  const compiled = opts.routes.map(compile).sort((a, b) => b.literals - a.literals);
  const seen = new Set<string>();
  for (const c of compiled) {
    const key = `${c.route.method} ${c.route.path.replace(/\{[^}]+\}/g, "{}")}`;
    if (seen.has(key)) throw new Error(`two routes for ${key}`);
    seen.add(key);
  }
  const handle = async (req: http.IncomingMessage, url: URL): Promise<Reply> => {
    const path = url.pathname;
    const candidates = compiled.filter((c) => c.re.test(path));
    if (candidates.length === 0) throw new ApiError(404, "FERRY_FARM_NOT_FOUND", `no such endpoint: ${req.method} ${path}`, "the API is described at /api/openapi.json");
    const hit = candidates.find((c) => c.route.method === req.method);
    if (!hit) throw new ApiError(405, "FERRY_FARM_METHOD", `${req.method} is not allowed on ${path}`, `allowed: ${[...new Set(candidates.map((c) => c.route.method))].join(", ")}`);
    const m = hit.re.exec(path)!;
    const params: Record<string, string> = {};
    hit.names.forEach((n, i) => {
      try {
        params[n] = decodeURIComponent(m[i + 1]!);
      } catch {
        throw new ApiError(400, "FERRY_FARM_BAD_PATH", `'${m[i + 1]}' is not a valid URL path segment`);
      }
    });
    const role = hit.route.access === "public" ? "none" : await opts.authenticate(req);
    checkAccess(hit.route.access, role, hit.route.access === "read" && role === "none" ? await opts.readsOpen() : true);
    let body: Promise<Buffer> | undefined;
    const rawBody = () => (body ??= readBody(req));
    return hit.route.run({ raw: req, params, query: url.searchParams, role, body: rawBody, json: async () => parseJsonObject(await rawBody()) });
  };
  return (req, res) => {
    void (async () => {
      const url = new URL(req.url ?? "/", "http://x");
      let reply: Reply;
      try {
        reply = await handle(req, url);
      } catch (e) {
        const status = e instanceof ApiError ? e.status : isFerryError(e) ? 400 : 500;
        if (status === 500) console.error(`ferry farm: ${req.method} ${url.pathname}: ${(e as Error).stack ?? String(e)}`);
        reply = { status, json: { error: status === 500 ? { code: "FERRY_FARM_INTERNAL", message: "internal error", hint: "see the coordinator's log" } : errorBody(e as FerryError) } };
      }
      if ("stream" in reply) return sendStream(req, res, reply);
      const [text, type] = "json" in reply ? [JSON.stringify(reply.json), "application/json"] : [reply.text, reply.contentType];
      if (!res.headersSent) res.writeHead(reply.status, { ...reply.headers, "Content-Type": type, "Content-Length": Buffer.byteLength(text) });
      res.end(text);
    })();
  };
}

/** Resolves when a response can take more (or is closed). */
async function drained(res: http.ServerResponse): Promise<void> {
  if (res.writableNeedDrain && !res.destroyed) await firstEvent(res, ["drain", "close"]);
}

async function sendStream(req: http.IncomingMessage, res: http.ServerResponse, reply: StreamReply): Promise<void> {
  const gone = new AbortController();
  const onClose = () => gone.abort();
  res.once("close", onClose);
  res.writeHead(reply.status, { ...reply.headers, "Content-Type": reply.contentType, "X-Content-Type-Options": "nosniff" });
  // The status goes out at once, before the first chunk (a followed log may stay empty a while).
  res.flushHeaders();
  try {
    for await (const chunk of reply.stream(gone.signal)) {
      if (gone.signal.aborted) break;
      if (!res.write(chunk)) await drained(res);
    }
    res.end();
  } catch (e) {
    console.error(`ferry farm: ${req.method} ${req.url}: ${(e as Error).stack ?? String(e)}`);
    res.destroy();
  } finally {
    res.off("close", onClose);
  }
}

// ---- body fields ----------------------------------------------------------------------------

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function checkName(kind: string, v: string): string {
  if (!NAME.test(v)) throw new ApiError(400, "FERRY_FARM_BAD_NAME", `'${v}' is not a valid ${kind} name`, "use letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit");
  return v;
}

export function str(body: Record<string, unknown>, key: string, required: true): string;
export function str(body: Record<string, unknown>, key: string, required: false): string | undefined;
export function str(body: Record<string, unknown>, key: string, required: boolean): string | undefined {
  const v = body[key];
  if (v === undefined || v === null) {
    if (required) throw new ApiError(400, "FERRY_FARM_MISSING_FIELD", `'${key}' is required`);
    return undefined;
  }
  if (typeof v !== "string" || v === "") throw new ApiError(400, "FERRY_FARM_BAD_FIELD", `'${key}' must be a non-empty string`);
  return v;
}

export function int(body: Record<string, unknown>, key: string, min: number, max = Number.MAX_SAFE_INTEGER): number | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
    throw new ApiError(400, "FERRY_FARM_BAD_FIELD", `'${key}' must be an integer${max === Number.MAX_SAFE_INTEGER ? ` of at least ${min}` : ` from ${min} to ${max}`}`);
  }
  return v;
}

export function strings(body: Record<string, unknown>, key: string): string[] | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (!Array.isArray(v) || v.some((x) => typeof x !== "string" || x === "")) throw new ApiError(400, "FERRY_FARM_BAD_FIELD", `'${key}' must be a list of non-empty strings`);
  return v as string[];
}

/** A positive integer id (builds, evaluations, tokens, webhooks) as its decimal text. */
export function checkId(kind: string, v: string): string {
  if (!/^[1-9][0-9]{0,17}$/.test(v)) throw new ApiError(400, "FERRY_FARM_BAD_ID", `'${v}' is not a ${kind} id`, `${kind} ids are positive integers`);
  return v;
}

/** How `ferry farm` client commands talk to a coordinator's API, and print what it answers. */
import * as http from "node:http";
import * as https from "node:https";
import { Command, Option } from "commander";
import { FerryError } from "../../core/errors.js";
import { note, out } from "../output.js";

export interface ClientFlags {
  farm: string;
  token?: string;
  json?: boolean;
}

export const clientOptions = (cmd: Command): Command =>
  cmd
    .addOption(new Option("--farm <url>", "the coordinator's URL").env("FERRY_FARM").makeOptionMandatory())
    .addOption(new Option("--token <token>", "API token (admin for changes)").env("FERRY_TOKEN"));

export const seg = (s: string): string => encodeURIComponent(s);

export interface Answer {
  readonly status: number;
  readonly json: unknown;
}

const urlOf = (f: ClientFlags, path: string) => `${f.farm.replace(/\/+$/, "")}${path}`;

/** What a failed fetch says (undici puts the system error in `cause`). */
const reason = (e: unknown): string => ((e as Error).cause as Error | undefined)?.message ?? (e as Error).message;

const unreachable = (f: ClientFlags, e: unknown) =>
  new FerryError("FERRY_FARM_UNREACHABLE", `cannot reach the farm at ${f.farm}: ${reason(e)}`, {
    hint: "check --farm (or FERRY_FARM) and that `ferry farm serve` runs there",
    cause: e,
  });

const parseJson = (text: string): unknown => {
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return undefined;
  }
};

/** The farm's error in an answer (its code and hint). */
function farmError(status: number, json: unknown, what: string): FerryError {
  if (json === undefined) return new FerryError("FERRY_FARM_BAD_ANSWER", `${what}: HTTP ${status}, not JSON`, { hint: "is --farm the coordinator's URL?" });
  const e = (json as { error?: { code?: string; message?: string; hint?: string } }).error ?? {};
  return new FerryError(e.code ?? "FERRY_FARM_ERROR", e.message ?? `HTTP ${status}`, e.hint ? { hint: e.hint } : {});
}

/** An answer's JSON body, or its error as a FerryError. */
async function jsonOf(res: Response, what: string): Promise<unknown> {
  const json = parseJson(await res.text());
  if (json === undefined || !res.ok) throw farmError(res.status, json, what);
  return json;
}

/**
 * One API call: the answer's JSON, or its error as a FerryError (with the farm's code and hint).
 * A 307 to the scheduling leader is followed (a few hops at most) with the same method, body
 * and token: fetch would drop the token on the way to another origin.
 */
export async function call(f: ClientFlags, method: string, path: string, body?: unknown): Promise<Answer> {
  let res: Response;
  let url = urlOf(f, path);
  for (let hop = 0; ; hop++) {
    try {
      res = await fetch(url, {
        method,
        redirect: "manual",
        headers: { ...(f.token ? { authorization: `Bearer ${f.token}` } : {}), ...(body !== undefined ? { "content-type": "application/json" } : {}) },
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      });
    } catch (e) {
      throw unreachable(f, e);
    }
    const to = res.status === 307 ? res.headers.get("location") : null;
    if (to === null || hop >= 3) break;
    await res.body?.cancel();
    url = redirectTarget(url, to);
  }
  return { status: res.status, json: await jsonOf(res, `${method} ${url}`) };
}

export interface LogOptions {
  /** Keep reading as the log grows, until the step has finished. */
  readonly follow: boolean;
  /** Gets the log's bytes as they arrive. */
  write(chunk: Uint8Array): void;
  /** Tells the user about reconnections. */
  note(line: string): void;
  /** How many times in a row a lost connection is tried again (default 5). */
  readonly retries?: number;
  /** The first wait before trying again, doubled each time (default 500 ms). */
  readonly backoffMs?: number;
}

/**
 * A step's log (`GET /api/steps/{id}/log`), handed to `write` as it arrives; with `follow`, until
 * the step has finished. A connection lost on the way is opened again from the byte it stopped
 * at (`offset`), so nothing is written twice; redirects to the scheduling leader are followed
 * with the token. Through node:http rather than fetch, whose body timeout (5 minutes) would cut
 * a build that prints nothing for a while.
 */
export async function readStepLog(f: ClientFlags, stepId: string, o: LogOptions): Promise<void> {
  const retries = o.retries ?? 5;
  let offset = 0;
  let failed = 0;
  /** Whether the farm answered once: a farm never reached is an error at once, not retried. */
  let reached = false;
  const retry = async (why: string): Promise<void> => {
    failed++;
    o.note(`ferry farm: ${why}; reconnecting from byte ${offset} (${failed}/${retries})`);
    await new Promise((r) => setTimeout(r, (o.backoffMs ?? 500) * 2 ** (failed - 1)));
  };
  for (;;) {
    let res: http.IncomingMessage;
    try {
      res = await getFollowingRedirects(f, urlOf(f, `/api/steps/${seg(stepId)}/log?${o.follow ? "follow=1&" : ""}offset=${offset}`));
    } catch (e) {
      if (failed >= retries || !reached) throw unreachable(f, e);
      await retry(`the farm is unreachable (${reason(e)})`);
      continue;
    }
    const status = res.statusCode ?? 0;
    if (status < 200 || status > 299) {
      const e = farmError(status, parseJson(await textOf(res).catch(() => "")), `GET step ${stepId}'s log`);
      // Back after a drop: the log started again (the step was retried meanwhile).
      if (e.code === "FERRY_FARM_LOG_OFFSET" && offset > 0) {
        o.note(`ferry farm: step ${stepId}'s log started again (the step was retried); printing it from its start`);
        offset = 0;
        continue;
      }
      const transient = status >= 500 || e.code === "FERRY_FARM_STARTING";
      if (!transient || failed >= retries || !reached) throw e;
      await retry(`the farm answered ${e.code}`);
      continue;
    }
    reached = true;
    try {
      for await (const chunk of res as AsyncIterable<Buffer>) {
        o.write(chunk);
        offset += chunk.length;
        failed = 0;
      }
      return;
    } catch (e) {
      if (failed >= retries) {
        throw new FerryError("FERRY_FARM_LOG_DROPPED", `the connection to the farm was lost ${failed + 1} times in a row while reading step ${stepId}'s log: ${reason(e)}`, {
          hint: "check the network and the coordinator, then run the command again",
          cause: e,
        });
      }
      await retry(`the connection dropped (${reason(e)})`);
    }
  }
}

/** Where a redirect sends the request (and its token): never from https down to plain http. */
function redirectTarget(from: string, location: string): string {
  const to = new URL(location, from);
  if (new URL(from).protocol === "https:" && to.protocol !== "https:") {
    throw new FerryError("FERRY_FARM_INSECURE_REDIRECT", `the farm at ${new URL(from).origin} redirected to ${to.origin}, which is not https: the token is not sent there`, {
      hint: "give the coordinators https public URLs (--public-url), or call the leader directly",
    });
  }
  return to.href;
}

/** GET with the token, following redirects (to the scheduling leader) with the token too. */
function getFollowingRedirects(f: ClientFlags, url: string, hops = 0): Promise<http.IncomingMessage> {
  return new Promise((resolve, reject) => {
    const req = (url.startsWith("https:") ? https : http).get(url, { headers: f.token ? { authorization: `Bearer ${f.token}` } : {} }, (res) => {
      const location = res.headers.location;
      if (!location || ![301, 302, 303, 307, 308].includes(res.statusCode ?? 0) || hops === 5) return resolve(res);
      res.resume();
      try {
        resolve(getFollowingRedirects(f, redirectTarget(url, location), hops + 1));
      } catch (e) {
        reject(e);
      }
    });
    // A followed log may be silent for long: keep the connection known to be alive.
    req.on("socket", (s) => s.setKeepAlive(true, 30_000));
    req.on("error", reject);
  });
}

async function textOf(res: http.IncomingMessage): Promise<string> {
  let text = "";
  for await (const c of res as AsyncIterable<Buffer>) text += c.toString("utf8");
  return text;
}

export async function api(f: ClientFlags, method: string, path: string, body?: unknown): Promise<unknown> {
  return (await call(f, method, path, body)).json;
}

interface Item {
  id: string;
  ok: boolean;
  value?: unknown;
  error?: { code: string; message: string; hint?: string };
}

/** Prints per-item results (one line each; failures with code and hint); exit code 1 if any failed. */
export function printItems(answer: { items?: Item[]; applied?: boolean; hint?: string; command?: string }, describe: (i: Item) => string = () => ""): void {
  const items = answer.items ?? [];
  for (const i of items) {
    if (i.ok) out(`ok      ${i.id}${describe(i) ? `  ${describe(i)}` : ""}`);
    else out(`failed  ${i.id}  [${i.error?.code}] ${i.error?.message}${i.error?.hint ? ` (hint: ${i.error.hint})` : ""}`);
  }
  if (answer.applied === false) note(`ferry farm: command ${answer.command} is queued, not applied yet: ${answer.hint}`);
  if (items.length === 0) note("ferry farm: nothing matched");
  if (items.some((i) => !i.ok)) process.exitCode = 1;
}

/** Prints rows as JSON lines (`--json`) or as aligned columns. */
export function printRows(f: { json?: boolean }, rows: readonly Record<string, unknown>[], columns: readonly string[]): void {
  if (f.json) {
    for (const r of rows) out(JSON.stringify(r));
    return;
  }
  const cell = (v: unknown) => (v === null || v === undefined ? "-" : typeof v === "object" ? JSON.stringify(v) : String(v));
  const table = [columns, ...rows.map((r) => columns.map((c) => cell(r[c])))];
  const widths = columns.map((_, i) => Math.max(...table.map((row) => row[i]!.length)));
  for (const row of table) out(row.map((c, i) => (i === row.length - 1 ? c : c.padEnd(widths[i]!))).join("  "));
}

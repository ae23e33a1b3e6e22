/** How `ferry farm` client commands talk to a coordinator's API, and print what it answers. */
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

/** One API call: the answer's JSON, or its error as a FerryError (with the farm's code and hint). */
export async function call(f: ClientFlags, method: string, path: string, body?: unknown): Promise<Answer> {
  let res: Response;
  const url = `${f.farm.replace(/\/+$/, "")}${path}`;
  try {
    res = await fetch(url, {
      method,
      headers: { ...(f.token ? { authorization: `Bearer ${f.token}` } : {}), ...(body !== undefined ? { "content-type": "application/json" } : {}) },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    });
  } catch (e) {
    throw new FerryError("FERRY_FARM_UNREACHABLE", `cannot reach the farm at ${f.farm}: ${((e as Error).cause as Error | undefined)?.message ?? (e as Error).message}`, {
      hint: "check --farm (or FERRY_FARM) and that `ferry farm serve` runs there",
    });
  }
  const text = await res.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new FerryError("FERRY_FARM_BAD_ANSWER", `${method} ${url}: HTTP ${res.status}, not JSON`, { hint: "is --farm the coordinator's URL?" });
  }
  if (!res.ok) {
    const e = (json as { error?: { code?: string; message?: string; hint?: string } }).error ?? {};
    throw new FerryError(e.code ?? "FERRY_FARM_ERROR", e.message ?? `HTTP ${res.status}`, e.hint ? { hint: e.hint } : {});
  }
  return { status: res.status, json };
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

/**
 * Declarative projects (Hydra's declarative jobsets): a project names a JSON file in a git
 * repository that declares its jobsets,
 *
 *   { "main":    { "file": "packages.ts" },
 *     "staging": { "file": "packages.ts", "branch": "staging", "checkInterval": 60 },
 *     "tools":   { "repo": "https://git.example.org/tools.git", "file": "set.ts", "attr": "linux" } }
 *
 * (per jobset: file, and optionally repo — default the declaring repository —, branch — default
 * the declaring branch when the repo is the same, else main —, attr, checkInterval, state —
 * 0|1|2 or "disabled"|"enabled"|"one-shot" — and shares). The coordinator reads it when the
 * project is set up, then at its check interval (0: never by itself) and whenever a push
 * webhook names its repository and branch; jobsets are created and changed to match,
 * and jobsets it no longer declares are disabled, never deleted (their history stays). While
 * a project is declarative its jobsets are changed only through the file.
 *
 * Reading is split in three: `parseDeclaration` (text to a checked value), `planDeclaration`
 * (what to change, a pure value), `applyDeclaration` (one transaction).
 */
import * as fs from "node:fs";
import { createHash } from "node:crypto";
import { join, normalize } from "node:path";
import { sql, type Kysely, type Transaction } from "kysely";
import { FerryError, asFerryError } from "../core/errors.js";
import type { FarmSchema } from "./db/index.js";
import { checkout, errorText } from "./evaluator.js";

export interface Declaration {
  readonly repo: string;
  readonly branch: string;
  readonly file: string;
}

/** A jobset as declared (defaults filled in). */
export interface DeclaredJobset {
  readonly name: string;
  readonly repo: string;
  readonly branch: string;
  readonly file: string;
  readonly attr: string | null;
  readonly checkInterval: number;
  readonly state: number;
  readonly shares: number;
}

export type JobsetChange =
  | { readonly jobset: string; readonly action: "create" | "update"; readonly to: DeclaredJobset }
  | { readonly jobset: string; readonly action: "disable" | "unchanged" };

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const STATES: Record<string, number> = { disabled: 0, enabled: 1, "one-shot": 2 };
const KEYS = new Set(["repo", "branch", "file", "attr", "checkInterval", "state", "shares"]);

const bad = (decl: Declaration, what: string) =>
  new FerryError("FERRY_FARM_BAD_DECLARATION", `${decl.file} (${decl.repo}, branch ${decl.branch}): ${what}`, {
    hint: 'the file is a JSON object: jobset name → { "file": …, "repo"?, "branch"?, "attr"?, "checkInterval"?, "state"?, "shares"? }',
  });

/** Checks a declaration file's text; the jobsets it declares, by name. */
export function parseDeclaration(text: string, decl: Declaration): DeclaredJobset[] {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw bad(decl, `not JSON: ${(e as Error).message}`);
  }
  if (v === null || typeof v !== "object" || Array.isArray(v)) throw bad(decl, "not a JSON object of jobsets");
  return Object.entries(v as Record<string, unknown>)
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([name, spec]) => {
      const at = `jobset '${name}'`;
      if (!NAME.test(name)) throw bad(decl, `'${name}' is not a valid jobset name (letters, digits, '.', '_', '-'; at most 64)`);
      if (spec === null || typeof spec !== "object" || Array.isArray(spec)) throw bad(decl, `${at} is not an object`);
      const s = spec as Record<string, unknown>;
      for (const k of Object.keys(s)) if (!KEYS.has(k)) throw bad(decl, `${at} has an unknown field '${k}'`);
      const text = (k: string, required: boolean): string | undefined => {
        const x = s[k];
        if (x === undefined || x === null) {
          if (required) throw bad(decl, `${at} needs '${k}'`);
          return undefined;
        }
        if (typeof x !== "string" || x === "") throw bad(decl, `${at}: '${k}' must be a non-empty string`);
        return x;
      };
      const num = (k: string, min: number, dflt: number): number => {
        const x = s[k];
        if (x === undefined || x === null) return dflt;
        if (typeof x !== "number" || !Number.isInteger(x) || x < min) throw bad(decl, `${at}: '${k}' must be an integer of at least ${min}`);
        return x;
      };
      const repo = text("repo", false);
      const st = s.state;
      const state = typeof st === "string" ? STATES[st] : st === undefined || st === null ? 1 : st;
      if (typeof state !== "number" || ![0, 1, 2].includes(state)) throw bad(decl, `${at}: 'state' is 0|1|2 or "disabled"|"enabled"|"one-shot"`);
      return {
        name,
        repo: repo ?? decl.repo,
        branch: text("branch", false) ?? (repo === undefined || repo === decl.repo ? decl.branch : "main"),
        file: text("file", true)!,
        attr: text("attr", false) ?? null,
        checkInterval: num("checkInterval", 0, 300),
        state,
        shares: num("shares", 1, 100),
      };
    });
}

/** A jobset as it is now (the fields a declaration sets). */
export type ExistingJobset = DeclaredJobset;

/** What to change so that the project's jobsets are the declared ones (sorted by jobset). */
export function planDeclaration(existing: readonly ExistingJobset[], declared: readonly DeclaredJobset[]): JobsetChange[] {
  const now = new Map(existing.map((j) => [j.name, j]));
  const wanted = new Set(declared.map((d) => d.name));
  const same = (a: ExistingJobset, d: DeclaredJobset) =>
    a.repo === d.repo && a.branch === d.branch && a.file === d.file && a.attr === d.attr && a.checkInterval === d.checkInterval && a.state === d.state && a.shares === d.shares;
  const changes: JobsetChange[] = declared.map((d) => {
    const e = now.get(d.name);
    if (!e) return { jobset: d.name, action: "create", to: d };
    return same(e, d) ? { jobset: d.name, action: "unchanged" } : { jobset: d.name, action: "update", to: d };
  });
  for (const e of existing) {
    if (!wanted.has(e.name)) changes.push({ jobset: e.name, action: e.state === 0 ? "unchanged" : "disable" });
  }
  return changes.sort((a, b) => (a.jobset < b.jobset ? -1 : a.jobset > b.jobset ? 1 : 0));
}

export interface ReadDeclaration {
  readonly jobsets: DeclaredJobset[];
  /** Identifies what was read (the parsed jobsets), to skip applying the same again. */
  readonly hash: string;
  readonly revision: string;
}

/** Checks out the declaring repository (kept in `<dataDir>/checkouts`) and reads the file. */
export async function readDeclaration(dataDir: string, project: string, decl: Declaration): Promise<ReadDeclaration> {
  const dir = join(dataDir, "checkouts", `decl-${createHash("sha256").update(`${project}\n${decl.repo}`).digest("hex").slice(0, 16)}`);
  const revision = await checkout(dir, decl.repo, decl.branch);
  const rel = normalize(decl.file);
  if (rel.startsWith("..") || rel.startsWith("/")) throw bad(decl, "the file must be inside the repository");
  let text: string;
  try {
    text = fs.readFileSync(join(dir, rel), "utf8");
  } catch (e) {
    throw new FerryError("FERRY_FARM_NO_DECLARATION", `${decl.file} is not in ${decl.repo} (branch ${decl.branch}, revision ${revision.slice(0, 12)}): ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, {
      hint: "commit the jobset declaration file, or fix --declarative-file",
    });
  }
  const jobsets = parseDeclaration(text, decl);
  return { jobsets, revision, hash: createHash("sha256").update(JSON.stringify(jobsets)).digest("hex") };
}

type Tx = Transaction<FarmSchema>;

/** Applies a plan to a project's jobsets (in the caller's transaction). */
export async function applyDeclaration(tx: Tx, projectId: number, plan: readonly JobsetChange[]): Promise<void> {
  for (const c of plan) {
    if (c.action === "create" || c.action === "update") {
      const d = c.to;
      await sql`
        insert into jobsets (project_id, name, repo, branch, file, attr, check_interval_s, state, shares)
        values (${projectId}, ${d.name}, ${d.repo}, ${d.branch}, ${d.file}, ${d.attr}, ${d.checkInterval}, ${d.state}, ${d.shares})
        on conflict (project_id, name) do update set repo = excluded.repo, branch = excluded.branch, file = excluded.file, attr = excluded.attr,
          check_interval_s = excluded.check_interval_s, state = excluded.state, shares = excluded.shares`.execute(tx);
    } else if (c.action === "disable") {
      await sql`update jobsets set state = 0 where project_id = ${projectId} and name = ${c.jobset}`.execute(tx);
    }
  }
}

/** The project's jobsets as `planDeclaration` compares them (rows locked until the transaction ends). */
export async function existingJobsets(tx: Tx, projectId: number): Promise<ExistingJobset[]> {
  const r = await sql<{ name: string; repo: string; branch: string; file: string; attr: string | null; check_interval_s: number; state: number; shares: number }>`
    select name, repo, branch, file, attr, check_interval_s, state, shares from jobsets where project_id = ${projectId} order by name for update`.execute(tx);
  return r.rows.map((j) => ({ name: j.name, repo: j.repo, branch: j.branch, file: j.file, attr: j.attr, checkInterval: j.check_interval_s, state: j.state, shares: j.shares }));
}

/**
 * Re-reads a declarative project's file and applies it if it changed since it was last applied.
 * A failure is kept on the project (`decl_error`), and its jobsets are left as they were.
 */
export async function refreshDeclaredProject(db: Kysely<FarmSchema>, dataDir: string, projectId: number): Promise<JobsetChange[] | FerryError> {
  const p = await sql<{ name: string; decl_repo: string | null; decl_branch: string | null; decl_file: string | null; decl_spec_hash: string | null }>`
    select name, decl_repo, decl_branch, decl_file, decl_spec_hash from projects where id = ${projectId}`.execute(db);
  const row = p.rows[0];
  if (!row || row.decl_file === null) return [];
  try {
    const read = await readDeclaration(dataDir, row.name, { repo: row.decl_repo!, branch: row.decl_branch!, file: row.decl_file });
    return await db.transaction().execute(async (tx) => {
      const locked = await sql<{ decl_spec_hash: string | null; decl_file: string | null }>`select decl_spec_hash, decl_file from projects where id = ${projectId} for update`.execute(tx);
      const now = locked.rows[0];
      // Changed in the meantime (no longer declarative, or already applied): nothing to do.
      if (!now || now.decl_file !== row.decl_file) return [];
      if (now.decl_spec_hash === read.hash) {
        await sql`update projects set decl_error = null where id = ${projectId}`.execute(tx);
        return [];
      }
      const plan = planDeclaration(await existingJobsets(tx, projectId), read.jobsets);
      await applyDeclaration(tx, projectId, plan);
      await sql`update projects set decl_spec_hash = ${read.hash}, decl_error = null where id = ${projectId}`.execute(tx);
      return plan;
    });
  } catch (e) {
    const err = asFerryError(e);
    await sql`update projects set decl_error = ${errorText(err)} where id = ${projectId}`.execute(db);
    return err;
  }
}

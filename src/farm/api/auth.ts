/**
 * Who is calling: bearer tokens with roles. Tokens come from the command line (`--admin-token`,
 * `--worker-token`, `--read-token`) or from the `tokens` table, where only their SHA-256 is
 * kept (a token is shown once, when it is made).
 *
 * Roles:
 * - `admin`: everything (changes, evaluations, restarts, tokens, webhooks);
 * - `worker`: connects build machines (`GET /api/worker`) and reads; never changes anything;
 * - `read-only`: reads. A farm with a read-only token (flag or stored) closes reads to callers
 *   without a token;
 * - `public-read`: reads like `read-only`, but does not close reads to others (a token to hand
 *   out to a mirror script that must keep working if reads are closed later).
 * Without any read-only token, reads are open to everyone.
 */
import type * as http from "node:http";
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { sql, type Kysely } from "kysely";
import type { FarmSchema } from "../db/index.js";
import { ApiError, ok, str, checkId, type Route } from "./http.js";

/** What a caller's token allows; `none`: no token; `wrong`: a token this farm does not know. */
export type Role = "admin" | "worker" | "read-only" | "none" | "wrong";

export const TOKEN_ROLES = ["admin", "worker", "read-only", "public-read"] as const;
export type TokenRole = (typeof TOKEN_ROLES)[number];

export interface AuthOptions {
  readonly adminToken: string;
  readonly workerToken?: string | undefined;
  readonly readToken?: string | undefined;
}

export interface Authenticator {
  /** The caller's role from `Authorization: Bearer TOKEN`. */
  authenticate(req: http.IncomingMessage): Promise<Role>;
  /** The role a token gives. */
  roleOf(token: string): Promise<Role>;
  /** True when reads need no token. */
  readsOpen(): Promise<boolean>;
}

const sha256 = (t: string) => createHash("sha256").update(t).digest();

export function bearerToken(req: http.IncomingMessage): string | undefined {
  const a = req.headers.authorization;
  if (a === undefined) return undefined;
  return a.startsWith("Bearer ") ? a.slice(7).trim() : "";
}

export function createAuthenticator(db: Kysely<FarmSchema>, opts: AuthOptions): Authenticator {
  const fixed: [Buffer, Role][] = [[sha256(opts.adminToken), "admin"]];
  if (opts.workerToken) fixed.push([sha256(opts.workerToken), "worker"]);
  if (opts.readToken) fixed.push([sha256(opts.readToken), "read-only"]);
  const roleOf = async (token: string): Promise<Role> => {
    if (token === "") return "wrong";
    const h = sha256(token);
    let role: Role | undefined;
    // Compare against every flag token, so the time taken does not say which one matched.
    for (const [t, r] of fixed) if (timingSafeEqual(h, t) && role === undefined) role = r;
    if (role) return role;
    const row = await sql<{ role: TokenRole }>`select role from tokens where hash = ${h.toString("hex")}`.execute(db);
    const stored = row.rows[0]?.role;
    return stored === undefined ? "wrong" : stored === "public-read" ? "read-only" : stored;
  };
  return {
    roleOf,
    authenticate: async (req) => {
      const t = bearerToken(req);
      return t === undefined ? "none" : roleOf(t);
    },
    readsOpen: async () => {
      if (opts.readToken) return false;
      const r = await sql<{ closed: boolean }>`select exists (select 1 from tokens where role = 'read-only') as closed`.execute(db);
      return !r.rows[0]!.closed;
    },
  };
}

/** `POST|GET /api/tokens`, `DELETE /api/tokens/{id}` (admin). */
export function tokenRoutes(db: Kysely<FarmSchema>): Route[] {
  return [
    {
      method: "POST",
      path: "/api/tokens",
      access: "admin",
      run: async (req) => {
        const body = await req.json();
        const role = str(body, "role", true);
        if (!(TOKEN_ROLES as readonly string[]).includes(role)) throw new ApiError(400, "FERRY_FARM_BAD_FIELD", `'${role}' is not a token role`, `use one of ${TOKEN_ROLES.join(", ")}`);
        const description = str(body, "description", false) ?? "";
        const token = `ferry_${randomBytes(32).toString("base64url")}`;
        const r = await sql<{ id: string; created_at: Date }>`
          insert into tokens (hash, role, description) values (${sha256(token).toString("hex")}, ${role}, ${description}) returning id::text as id, created_at`.execute(db);
        return ok({ id: r.rows[0]!.id, role, description, createdAt: r.rows[0]!.created_at, token }, 201);
      },
    },
    {
      method: "GET",
      path: "/api/tokens",
      access: "admin",
      run: async () => {
        const r = await sql<{ id: string; role: string; description: string; created_at: Date }>`select id::text as id, role, description, created_at from tokens order by tokens.id`.execute(db);
        return ok(r.rows.map((t) => ({ id: t.id, role: t.role, description: t.description, createdAt: t.created_at })));
      },
    },
    {
      method: "DELETE",
      path: "/api/tokens/{id}",
      access: "admin",
      run: async (req) => {
        const id = checkId("token", req.params.id!);
        const r = await sql`delete from tokens where id = ${id}`.execute(db);
        if (Number(r.numAffectedRows ?? 0n) === 0) throw new ApiError(404, "FERRY_FARM_NO_TOKEN_ID", `there is no token ${id}`, "list them with `ferry farm token list`");
        return ok({ deleted: id });
      },
    },
  ];
}

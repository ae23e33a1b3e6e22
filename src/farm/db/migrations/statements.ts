import { sql, type Kysely } from "kysely";

/**
 * Runs a migration's SQL one statement at a time (PGlite's extended protocol takes one per
 * query). Statements end with `;` at the end of a line; `--` comments are dropped.
 */
export async function runStatements(db: Kysely<unknown>, schema: string): Promise<void> {
  for (const statement of schema.split(/;\s*\n/)) {
    const text = statement.replace(/^\s*--.*$/gm, "").trim();
    if (text !== "") await sql.raw(text).execute(db);
  }
}

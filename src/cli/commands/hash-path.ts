/**
 * `ferry hash path`, the CLI's hottest command, without commander: `main` runs it from here when
 * its arguments are plain (flags this module knows, one path), so a tree's walk starts before
 * the rest of the CLI has loaded. Anything else (help, a mistake) goes to the full parser, which
 * owns every message about usage. The encoding flags are shared with the commander definition.
 */
import { parseArgs } from "node:util";
import { parseHashAlgo, printHash, type HashEncoding } from "../../core/hash.js";
import { FerryError } from "../../core/errors.js";
import { hashPath } from "../../store/nar-dump.js";
import { out, printError } from "../output.js";

export interface EncFlags {
  type: string;
  base16?: boolean;
  base32?: boolean;
  sri?: boolean;
}

export function encodingOf(f: EncFlags): HashEncoding {
  const chosen = [f.base16 && "base16", f.base32 && "nix32", f.sri && "sri"].filter(Boolean) as HashEncoding[];
  if (chosen.length > 1) throw new FerryError("FERRY_CLI_CONFLICT", "choose one of --base16, --base32 and --sri", { hint: "give at most one encoding flag; without one the hash is printed in SRI form" });
  return chosen[0] ?? "sri";
}

/** What `ferry hash path` prints for `path`. */
export function hashPathLine(path: string, f: EncFlags): string {
  return printHash(hashPath(path, parseHashAlgo(f.type)).hash, encodingOf(f));
}

/**
 * Runs `ferry hash path ARGS` if ARGS are plain; returns the exit code, or undefined when the
 * full parser must handle them.
 */
export function runHashPath(args: readonly string[]): number | undefined {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...args],
      options: { type: { type: "string", default: "sha256" }, base16: { type: "boolean" }, base32: { type: "boolean" }, sri: { type: "boolean" } },
      allowPositionals: true,
      strict: true,
    });
  } catch {
    return undefined;
  }
  if (parsed.positionals.length !== 1) return undefined;
  try {
    out(hashPathLine(parsed.positionals[0]!, parsed.values as EncFlags));
    return 0;
  } catch (e) {
    return printError(e);
  }
}

/** Registers made-up store objects in a test store: input-addressed like build outputs. */
import * as fs from "node:fs";
import { join } from "node:path";
import type { LocalStore } from "../../src/store/local-store.js";
import { hashPath } from "../../src/store/nar-dump.js";
import { makeOutputPath, printStorePath } from "../../src/core/store-path.js";
import { sha256 } from "../../src/core/digest.js";

/**
 * Adds an input-addressed object (like a build output) holding `files`; "@REFS@" in a text file
 * is replaced by the reference paths, so the references also appear in the content.
 */
export function addObject(s: LocalStore, name: string, files: Record<string, string | Buffer>, refs: string[] = []): string {
  const path = printStorePath(makeOutputPath(s.storeDir, "out", sha256(`${name}-${Math.random()}`), name));
  const tmp = s.newTempPath();
  fs.mkdirSync(tmp);
  for (const [f, c] of Object.entries(files)) fs.writeFileSync(join(tmp, f), typeof c === "string" ? c.replaceAll("@REFS@", refs.join(" ")) : c);
  const { hash, size } = hashPath(tmp);
  s.registerObject(tmp, { path, narHash: hash, narSize: size, references: refs });
  return path;
}

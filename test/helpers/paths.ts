/**
 * Where tests find the repository and the shared folder beside it. Works from the compiled
 * file (dist/test/helpers) and from the source (test/helpers): it walks up to the directory
 * holding Ferry's package.json.
 */
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

function findRepoRoot(start: string): string {
  let dir = start;
  for (;;) {
    const pkg = join(dir, "package.json");
    if (existsSync(pkg) && (JSON.parse(readFileSync(pkg, "utf8")) as { name?: string }).name === "ferry") return dir;
    const up = dirname(dir);
    if (up === dir) throw new Error(`no Ferry package.json above ${start}`);
    dir = up;
  }
}

/** The repository root (the directory with Ferry's package.json). */
export const repoRoot = findRepoRoot(dirname(fileURLToPath(import.meta.url)));

/** The shared folder next to the repository (conformance vectors, fixtures). */
export const sharedDir = resolve(repoRoot, "..", "shared");

/** The Nix conformance vectors folder. */
export const nixVectorsDir = join(sharedDir, "conformance", "nix", "vectors");

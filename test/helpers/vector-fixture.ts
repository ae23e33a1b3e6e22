/** The public derivation vectors as a Ferry package set on disk (module, sources), for eval and build tests. */
import * as fs from "node:fs";
import { join } from "node:path";
import { nixVectorsDir, repoRoot } from "./paths.js";

type Tree = { type: "regular"; executable: boolean; contents?: string; contents_base64?: string } | { type: "symlink"; target: string } | { type: "directory"; entries: Record<string, Tree> };

export function writeTree(path: string, t: Tree): void {
  if (t.type === "directory") {
    fs.mkdirSync(path);
    for (const [n, c] of Object.entries(t.entries)) writeTree(join(path, n), c);
  } else if (t.type === "symlink") fs.symlinkSync(t.target, path);
  else fs.writeFileSync(path, t.contents_base64 !== undefined ? Buffer.from(t.contents_base64, "base64") : t.contents ?? "", { mode: t.executable ? 0o755 : 0o644 });
}

export interface DrvVector {
  attr: string;
  store_dir: string;
  drv_path: string;
  drv_text: string;
  outputs: Record<string, string>;
  realised?: Record<string, { path: string; nar_hash: string; nar_size: number; references: string[] }>;
}

export function drvVectors(): DrvVector[] {
  return JSON.parse(fs.readFileSync(join(nixVectorsDir, "derivations.json"), "utf8")).vectors;
}

/** Writes drvs.ts, its builder script and the unicode-tree source into `dir`; returns the module path. */
export function writeVectorPackageSet(dir: string): string {
  const drvs = JSON.parse(fs.readFileSync(join(nixVectorsDir, "derivations.json"), "utf8"));
  fs.writeFileSync(join(dir, "dependent-builder.sh"), drvs.nix_expressions["dependent-builder.sh"]);
  const nar = JSON.parse(fs.readFileSync(join(nixVectorsDir, "nar.json"), "utf8"));
  writeTree(join(dir, "unicode-tree"), nar.vectors.find((v: { name: string }) => v.name === "unicode-tree").tree);
  fs.copyFileSync(join(repoRoot, "test", "fixtures", "vector-drvs.ts"), join(dir, "drvs.ts"));
  return join(dir, "drvs.ts");
}

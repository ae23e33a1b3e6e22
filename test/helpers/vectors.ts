/** Loading the Nix conformance vectors and turning their tree descriptions into NarTrees. */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { NarTree } from "../../src/core/nar/tree.js";
import { nixVectorsDir } from "./paths.js";

/** A tree as the vectors write it: contents as UTF-8 text or base64. */
export type VectorTree =
  | { type: "regular"; executable: boolean; contents?: string; contents_base64?: string }
  | { type: "symlink"; target: string }
  | { type: "directory"; entries: Record<string, VectorTree> };

export interface VectorFile<V> {
  kind: string;
  nix_version: string;
  vectors: V[];
  [key: string]: unknown;
}

export function loadVectors<V>(file: string): VectorFile<V> {
  return JSON.parse(readFileSync(join(nixVectorsDir, file), "utf8")) as VectorFile<V>;
}

export function narTreeOf(t: VectorTree): NarTree {
  switch (t.type) {
    case "regular": {
      const contents =
        t.contents_base64 !== undefined ? new Uint8Array(Buffer.from(t.contents_base64, "base64")) : new TextEncoder().encode(t.contents ?? "");
      return { type: "regular", executable: t.executable, contents };
    }
    case "symlink":
      return { type: "symlink", target: t.target };
    case "directory": {
      const entries: Record<string, NarTree> = {};
      for (const [name, child] of Object.entries(t.entries)) {
        Object.defineProperty(entries, name, { value: narTreeOf(child), enumerable: true, writable: true, configurable: true });
      }
      return { type: "directory", entries };
    }
  }
}

export function fromBase64(s: string): Uint8Array {
  return new Uint8Array(Buffer.from(s, "base64"));
}

export function fromHex(s: string): Uint8Array {
  return new Uint8Array(Buffer.from(s, "hex"));
}

export function hexOf(b: Uint8Array): string {
  return Buffer.from(b).toString("hex");
}

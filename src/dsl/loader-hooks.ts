/**
 * Module loader hooks for evaluating package sets: `import … from "ferry"` resolves to this
 * Ferry (whatever directory the package set lives in), and TypeScript files have their types
 * stripped on the fly (types are not checked here; editors and `tsc` do that).
 */
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { transform } from "sucrase";

const FERRY_INDEX = new URL("../index.js", import.meta.url).href;

type Resolve = (specifier: string, context: { parentURL?: string }) => Promise<{ url: string; format?: string | null }>;
type Load = (url: string, context: { format?: string | null }) => Promise<{ format: string; source?: string | ArrayBuffer | Uint8Array | null }>;

export async function resolve(specifier: string, context: { parentURL?: string }, nextResolve: Resolve): Promise<{ url: string; format?: string | null; shortCircuit?: boolean }> {
  if (specifier === "ferry") return { url: FERRY_INDEX, shortCircuit: true };
  try {
    return await nextResolve(specifier, context);
  } catch (e) {
    // `./zlib.js` may name `./zlib.ts` (the TypeScript convention for ESM imports).
    if (specifier.startsWith(".") && specifier.endsWith(".js")) {
      try {
        return await nextResolve(specifier.slice(0, -3) + ".ts", context);
      } catch {
        /* fall through to the original error */
      }
    }
    throw e;
  }
}

export async function load(url: string, context: { format?: string | null }, nextLoad: Load): Promise<{ format: string; source?: string | ArrayBuffer | Uint8Array | null; shortCircuit?: boolean }> {
  if (url.startsWith("file:") && (url.endsWith(".ts") || url.endsWith(".mts"))) {
    const path = fileURLToPath(url);
    const text = await readFile(path, "utf8");
    // Types are stripped, not checked (fast: no compiler is loaded); line numbers are kept so
    // errors point at the user's lines.
    const out = transform(text, { transforms: ["typescript"], filePath: path, keepUnusedImports: false, disableESTransforms: true });
    return { format: "module", source: out.code, shortCircuit: true };
  }
  return nextLoad(url, context);
}

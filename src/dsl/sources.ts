/** Source files and trees from the package set's directory, copied into the store when used. */
import { isAbsolute, resolve, basename } from "node:path";
import { fileURLToPath } from "node:url";
import { makeSourcePath, printStorePath, checkNewName } from "../core/store-path.js";
import { evalContext } from "./context.js";
import { evalError } from "./derivation.js";
import { SourcePath } from "./values.js";

/**
 * A file or directory as a source object (like a path literal `./src` in Nix). Relative paths
 * are taken from the package set's directory; a `file:` URL (`new URL("./x", import.meta.url)`)
 * works too. Its store path is the one `nix-store --add` gives it.
 */
export function source(path: string | URL, opts: { name?: string } = {}): SourcePath {
  const ctx = evalContext();
  const abs = path instanceof URL ? fileURLToPath(path) : isAbsolute(path) ? path : resolve(ctx.settings.baseDir, path);
  const cached = ctx.cachedSource(abs + "\0" + (opts.name ?? ""));
  if (cached) return new SourcePath(cached, abs);
  const name = opts.name ?? basename(abs);
  try {
    checkNewName(name);
  } catch (e) {
    throw evalError("FERRY_STORE_BAD_NAME", `source '${abs}': ${(e as Error).message}`, "pass { name } to give the source a valid store name");
  }
  let hash;
  try {
    hash = ctx.ports.hashSource(abs).hash;
  } catch (e) {
    throw evalError("FERRY_EVAL_NO_SOURCE", `cannot read the source '${abs}': ${(e as Error).message}`);
  }
  const storePath = printStorePath(makeSourcePath(ctx.storeDir, name, hash));
  ctx.addPlannedSource({ storePath, from: abs, name });
  ctx.cacheSource(abs + "\0" + (opts.name ?? ""), storePath);
  return new SourcePath(storePath, abs);
}

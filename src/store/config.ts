/**
 * Where a store lives. `storeDir` is the logical directory that store paths name (it enters
 * every path's hash); `root` is an optional prefix under which the files really live, like a
 * Nix chroot store: with root /tmp/r, `/ferry/store/abc-x` is the file `/tmp/r/ferry/store/abc-x`.
 */
import { join } from "node:path";
import { checkStoreDir } from "../core/store-path.js";

export interface StoreLocation {
  /** Logical store directory, e.g. /ferry/store. */
  readonly storeDir: string;
  /** Logical state directory (database, GC roots, temp roots, logs), e.g. /ferry/var. */
  readonly stateDir: string;
  /** Prefix for where the files really are; "" for none. */
  readonly root: string;
}

export const DEFAULT_STORE_DIR = "/ferry/store";
export const DEFAULT_STATE_DIR = "/ferry/var";

export interface StoreLocationInput {
  storeDir?: string | undefined;
  stateDir?: string | undefined;
  root?: string | undefined;
}

/** Flags win over environment variables (FERRY_STORE_DIR, FERRY_STATE_DIR, FERRY_ROOT), which win over defaults. */
export function resolveStoreLocation(flags: StoreLocationInput = {}, env: NodeJS.ProcessEnv = process.env): StoreLocation {
  const storeDir = checkStoreDir(flags.storeDir ?? env.FERRY_STORE_DIR ?? DEFAULT_STORE_DIR);
  const stateDir = flags.stateDir ?? env.FERRY_STATE_DIR ?? DEFAULT_STATE_DIR;
  const rootRaw = flags.root ?? env.FERRY_ROOT ?? "";
  const root = rootRaw === "/" ? "" : rootRaw.replace(/\/+$/, "");
  return Object.freeze({ storeDir, stateDir, root });
}

/** The real filesystem path of a logical path under the root. */
export function realPath(loc: StoreLocation, logical: string): string {
  return loc.root ? join(loc.root, logical) : logical;
}

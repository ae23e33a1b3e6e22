/** The store-location options every store-touching command accepts (and their variables). */
import { Command, Option } from "commander";
import { resolveStoreLocation, type StoreLocation } from "../store/config.js";
import { LocalStore } from "../store/local-store.js";

export interface StoreFlags {
  storeDir?: string;
  stateDir?: string;
  root?: string;
}

export function withStoreOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option("--store-dir <dir>", "logical store directory (paths are named after it)").env("FERRY_STORE_DIR"))
    .addOption(new Option("--state-dir <dir>", "state directory: database, GC roots, logs").env("FERRY_STATE_DIR"))
    .addOption(new Option("--root <dir>", "keep the store's files under this prefix (like a Nix chroot store)").env("FERRY_ROOT"));
}

export function storeLocation(flags: StoreFlags): StoreLocation {
  return resolveStoreLocation({ storeDir: flags.storeDir, stateDir: flags.stateDir, root: flags.root });
}

/** Opens the store for the length of `fn`, closing it whatever happens. */
export async function withStore<T>(flags: StoreFlags, fn: (s: LocalStore) => T | Promise<T>): Promise<T> {
  const s = LocalStore.open(storeLocation(flags));
  try {
    return await fn(s);
  } finally {
    s.close();
  }
}

/** The store-location options every store-touching command accepts (and their variables). */
import { Command, Option } from "commander";
import { resolveStoreLocation, type StoreLocation } from "../store/config.js";
import { note } from "./output.js";
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

/** Opens the store at `flags`, telling on stderr what it unregistered after a stop of the machine. */
export function openStore(flags: StoreFlags): LocalStore {
  const s = LocalStore.open(storeLocation(flags));
  const lost = s.recovered?.lost.length ?? 0;
  if (lost) {
    note(`ferry: the machine stopped before the kernel wrote back files registered just before: ${lost} paths lost their files or refer to one that did, and are no longer registered (of ${s.recovered!.checked} checked); evaluate again to make them`);
  }
  return s;
}

/** Opens the store for the length of `fn`, closing it whatever happens. */
export async function withStore<T>(flags: StoreFlags, fn: (s: LocalStore) => T | Promise<T>): Promise<T> {
  const s = openStore(flags);
  try {
    return await fn(s);
  } finally {
    s.close();
  }
}

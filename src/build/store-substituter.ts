/**
 * A substituter that copies from another local store with the same store dir (a second store
 * on this machine, a shared or mounted one), through the export format, one object at a time:
 * each object is verified and registered atomically by the importing store.
 */
import type { LocalStore } from "../store/local-store.js";
import type { Substituter } from "./realise.js";

export class StoreSubstituter implements Substituter {
  readonly #target: LocalStore;
  readonly #source: LocalStore;

  constructor(target: LocalStore, source: LocalStore) {
    if (target.storeDir !== source.storeDir) throw new Error("a store can only substitute from a store with the same store dir");
    this.#target = target;
    this.#source = source;
  }

  async has(paths: readonly string[]): Promise<Set<string>> {
    return new Set(paths.filter((p) => this.#source.isValid(p)));
  }

  async substitute(path: string): Promise<boolean> {
    if (!this.#source.isValid(path)) return false;
    const needed = this.#source.topoSort(this.#source.closure([path]).filter((p) => !this.#target.isValid(p)));
    for (const p of needed) {
      const chunks: Uint8Array[] = [];
      this.#source.exportPaths([p], (c) => chunks.push(new Uint8Array(c)));
      const { error, results } = await this.#target.importStream((async function* () {
        yield* chunks;
      })());
      if (error) throw error;
      const bad = results.find((r) => r.status === "error");
      if (bad && bad.status === "error") throw bad.error;
    }
    return this.#target.isValid(path);
  }
}

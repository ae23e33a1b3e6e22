/**
 * Typed events named `noun:verb`. Emitting never throws: a listener that fails is reported
 * once on stderr and the emitter carries on (a faulty progress display must not fail a build).
 */
export type Listener<T> = (payload: T) => void;

export class TypedEmitter<Events extends { [K in keyof Events]: unknown }> {
  readonly #listeners = new Map<keyof Events, Set<Listener<never>>>();

  on<K extends keyof Events>(name: K, fn: Listener<Events[K]>): () => void {
    let set = this.#listeners.get(name);
    if (!set) this.#listeners.set(name, (set = new Set()));
    set.add(fn as Listener<never>);
    return () => set!.delete(fn as Listener<never>);
  }

  /** Listens to every event (for logs and `--json` streams). */
  onAny(fn: (name: keyof Events, payload: Events[keyof Events]) => void): () => void {
    return this.on("*" as keyof Events, fn as unknown as Listener<Events[keyof Events]>);
  }

  emit<K extends keyof Events>(name: K, payload: Events[K]): void {
    for (const key of [name, "*" as keyof Events]) {
      for (const fn of this.#listeners.get(key) ?? []) {
        try {
          if (key === name) (fn as Listener<Events[K]>)(payload);
          else (fn as unknown as (n: keyof Events, p: Events[K]) => void)(name, payload);
        } catch (e) {
          // A broken listener must not break the work it watches.
          try {
            console.error(`ferry: an event listener for '${String(name)}' failed: ${(e as Error)?.message ?? String(e)}`);
          } catch {
            /* nothing more to do */
          }
        }
      }
    }
  }
}

/** What can be listened to the Node way (an EventEmitter, `process`, a response). */
export interface Listenable {
  on(name: string, fn: () => void): unknown;
  off(name: string, fn: () => void): unknown;
}

/** Resolves with the first of `names` that `target` emits, and stops listening to all of them. */
export function firstEvent(target: Listenable, names: readonly string[]): Promise<string> {
  return new Promise<string>((resolve) => {
    const listeners = names.map((name) => [name, () => done(name)] as const);
    const done = (name: string) => {
      for (const [n, fn] of listeners) target.off(n, fn);
      resolve(name);
    };
    for (const [n, fn] of listeners) target.on(n, fn);
  });
}

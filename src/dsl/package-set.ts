/**
 * Package sets whose members refer to each other, like Nix's `rec { … }` or a fixed point:
 *
 *   export default packageSet((self) => ({
 *     zlib: () => mkPackage({ … }),
 *     libpng: () => mkPackage({ …, buildInputs: [self.zlib] }),
 *   }));
 *
 * Each member is a function (or a getter) evaluated lazily, once, on first use, so the order
 * of definition does not matter; a plain value is taken as it is. A
 * member that needs itself, directly or through others, is a dependency cycle, reported with
 * the whole chain.
 */
import { FerryError } from "../core/errors.js";

const LAZY = Symbol("ferry.lazySet");

interface LazyState {
  readonly thunks: Record<string, () => unknown>;
  readonly values: Map<string, unknown>;
  readonly inProgress: string[];
}

type Defs<T> = { [K in keyof T]: T[K] | (() => T[K]) };

/** Builds a lazily evaluated, frozen set of packages that may refer to each other via `self`. */
export function packageSet<T extends Record<string, unknown>>(define: (self: Readonly<T>) => Defs<T>): Readonly<T> {
  const state: LazyState = { thunks: {}, values: new Map(), inProgress: [] };
  const target: Record<string | symbol, unknown> = { [LAZY]: state };
  const proxy = new Proxy(target, {
    get(_t, key) {
      if (key === LAZY) return state;
      if (typeof key !== "string" || !(key in state.thunks)) return undefined;
      return force(state, key);
    },
    has: (_t, key) => typeof key === "string" && key in state.thunks,
    ownKeys: () => Object.keys(state.thunks),
    getOwnPropertyDescriptor: (_t, key) =>
      typeof key === "string" && key in state.thunks ? { enumerable: true, configurable: true, get: () => force(state, key) } : undefined,
    set: () => {
      throw new Error("package sets are immutable");
    },
    defineProperty: () => false,
    deleteProperty: () => false,
  }) as unknown as Readonly<T>;
  // Evaluating `define` only collects the member functions and getters, so `self.x` inside
  // a member's definition is not forced until that member is.
  const defs = define(proxy);
  for (const key of Object.keys(defs)) {
    const desc = Object.getOwnPropertyDescriptor(defs, key)!;
    const v: unknown = desc.value;
    state.thunks[key] = desc.get ? desc.get.bind(defs) : typeof v === "function" ? (v as () => unknown) : () => v;
  }
  return proxy;
}

function force(state: LazyState, key: string): unknown {
  if (state.values.has(key)) return state.values.get(key);
  const at = state.inProgress.indexOf(key);
  if (at >= 0) {
    const chain = [...state.inProgress.slice(at), key];
    throw new FerryError("FERRY_EVAL_CYCLE", `dependency cycle: ${chain.join(" -> ")}`, {
      hint: "a package cannot depend on itself, directly or through other packages; break the cycle",
      details: { cycle: chain },
    });
  }
  state.inProgress.push(key);
  try {
    const v = state.thunks[key]!();
    state.values.set(key, v);
    return v;
  } finally {
    state.inProgress.pop();
  }
}

export function isLazySet(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && (v as Record<symbol, unknown>)[LAZY] !== undefined;
}

/** Forces one member, naming the attribute path in any evaluation error. */
export function forceAttr(set: Record<string, unknown>, key: string, path: readonly string[]): unknown {
  try {
    return set[key];
  } catch (e) {
    if (e instanceof FerryError && !e.message.includes("while evaluating")) {
      const attr = [...path, key].join(".");
      throw new FerryError(e.code, `${e.message} (while evaluating the attribute '${attr}')`, { ...(e.hint ? { hint: e.hint } : {}), details: { ...e.details, attr } });
    }
    throw e;
  }
}

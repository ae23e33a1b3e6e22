/** Orders over step graphs, shared by the scheduler and the dispatcher's intake. Pure. */

/**
 * Kahn's order of `ids`, dependencies first (in input order among the ready ones); a
 * dependency outside `ids` is ignored. Ids on or behind a dependency cycle are left out: the
 * caller decides what they are (rejected, or appended).
 */
export function topoOrder(ids: Iterable<string>, depsOf: (id: string) => Iterable<string> | undefined): string[] {
  const all = [...ids];
  const inSet = new Set(all);
  const indeg = new Map<string, number>();
  const dependents = new Map<string, string[]>();
  for (const id of all) {
    let n = 0;
    for (const d of new Set(depsOf(id) ?? [])) {
      if (!inSet.has(d)) continue;
      n++;
      let l = dependents.get(d);
      if (!l) dependents.set(d, (l = []));
      l.push(id);
    }
    indeg.set(id, n);
  }
  const order: string[] = [];
  for (const id of all) if (indeg.get(id) === 0) order.push(id);
  for (let i = 0; i < order.length; i++) {
    for (const r of dependents.get(order[i]!) ?? []) {
      const n = indeg.get(r)! - 1;
      indeg.set(r, n);
      if (n === 0) order.push(r);
    }
  }
  return order;
}

/**
 * The order store objects are registered or uploaded in: each after the objects it references.
 * Pure: references come from the caller.
 */

/**
 * Orders `paths` so that each comes after those of its references that are among them
 * (self-references aside), otherwise in the order given. Iterative, so a chain of any length
 * is fine; `refsOf` is asked once per path. A reference cycle (which a store's own objects
 * cannot have) is broken somewhere: callers that register check each object's references.
 */
export function referencesFirst(paths: readonly string[], refsOf: (p: string) => readonly string[]): string[] {
  const wanted = new Set(paths);
  const out: string[] = [];
  const seen = new Set<string>();
  for (const root of wanted) {
    if (seen.has(root)) continue;
    seen.add(root);
    const stack: { path: string; refs: readonly string[]; next: number }[] = [{ path: root, refs: refsOf(root), next: 0 }];
    while (stack.length) {
      const top = stack[stack.length - 1]!;
      if (top.next < top.refs.length) {
        const r = top.refs[top.next++]!;
        if (r !== top.path && wanted.has(r) && !seen.has(r)) {
          seen.add(r);
          stack.push({ path: r, refs: refsOf(r), next: 0 });
        }
        continue;
      }
      out.push(top.path);
      stack.pop();
    }
  }
  return out;
}

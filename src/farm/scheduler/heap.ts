/**
 * A binary heap whose items remember their own position, so that removing an item or
 * re-sifting it after its key changed costs O(log n) without a search.
 * An item belongs to at most one IndexedHeap at a time; `heapIndex` is -1 outside any heap.
 */
export interface HeapItem {
  heapIndex: number;
}

export class IndexedHeap<T extends HeapItem> {
  readonly #items: T[] = [];
  /** `before(a, b)` is true when `a` must come out before `b`. */
  readonly #before: (a: T, b: T) => boolean;

  constructor(before: (a: T, b: T) => boolean) {
    this.#before = before;
  }

  get size(): number {
    return this.#items.length;
  }

  peek(): T | undefined {
    return this.#items[0];
  }

  has(x: T): boolean {
    return x.heapIndex >= 0 && this.#items[x.heapIndex] === x;
  }

  push(x: T): void {
    x.heapIndex = this.#items.length;
    this.#items.push(x);
    this.#up(x.heapIndex);
  }

  pop(): T | undefined {
    const top = this.#items[0];
    if (top !== undefined) this.remove(top);
    return top;
  }

  remove(x: T): void {
    const i = x.heapIndex;
    const last = this.#items.pop()!;
    x.heapIndex = -1;
    if (last === x) return;
    this.#items[i] = last;
    last.heapIndex = i;
    this.#down(this.#up(i));
  }

  /** Restores the heap order after `x`'s key changed in either direction. */
  update(x: T): void {
    this.#down(this.#up(x.heapIndex));
  }

  /** Pushes `x` if absent, otherwise re-sifts it. */
  upsert(x: T): void {
    if (this.has(x)) this.update(x);
    else this.push(x);
  }

  #up(i: number): number {
    const items = this.#items;
    const x = items[i]!;
    while (i > 0) {
      const p = (i - 1) >> 1;
      const parent = items[p]!;
      if (!this.#before(x, parent)) break;
      items[i] = parent;
      parent.heapIndex = i;
      i = p;
    }
    items[i] = x;
    x.heapIndex = i;
    return i;
  }

  #down(i: number): void {
    const items = this.#items;
    const n = items.length;
    const x = items[i]!;
    for (;;) {
      const l = 2 * i + 1;
      if (l >= n) break;
      const r = l + 1;
      let c = l;
      if (r < n && this.#before(items[r]!, items[l]!)) c = r;
      const child = items[c]!;
      if (!this.#before(child, x)) break;
      items[i] = child;
      child.heapIndex = i;
      i = c;
    }
    items[i] = x;
    x.heapIndex = i;
  }
}

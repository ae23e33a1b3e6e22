/**
 * A background pass run every `everyMs` and whenever poked, never two at once: a poke during a
 * pass runs one more pass after it. Errors are logged, not thrown (a loop must outlive them).
 */
export interface Loop {
  /** Runs a pass soon. */
  poke(): void;
  /** Stops the timer and waits for the pass in progress. */
  close(): Promise<void>;
}

export function startLoop(name: string, everyMs: number, pass: () => Promise<void>): Loop {
  let closed = false;
  let passing: Promise<void> | undefined;
  let again = false;
  const run = (): void => {
    if (closed) return;
    if (passing) {
      again = true;
      return;
    }
    passing = pass()
      .catch((e: unknown) => console.error(`ferry farm: ${name} failed: ${(e as Error).message}`))
      .finally(() => {
        passing = undefined;
        if (again) {
          again = false;
          run();
        }
      });
  };
  const timer = everyMs > 0 ? setInterval(run, everyMs) : undefined;
  return {
    poke: run,
    close: async () => {
      closed = true;
      if (timer) clearInterval(timer);
      while (passing) await passing;
    },
  };
}

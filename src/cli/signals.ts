/** Long-running commands (servers) stop on SIGTERM or SIGINT: this resolves on the first one. */
export function untilStopSignal(): Promise<void> {
  return new Promise<void>((done) => {
    const stop = () => {
      process.off("SIGTERM", stop);
      process.off("SIGINT", stop);
      done();
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
  });
}

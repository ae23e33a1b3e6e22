import { firstEvent } from "../core/events.js";

/** Long-running commands (servers) stop on SIGTERM or SIGINT: this resolves on the first one. */
export async function untilStopSignal(): Promise<void> {
  await firstEvent(process, ["SIGTERM", "SIGINT"]);
}

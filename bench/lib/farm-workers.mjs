#!/usr/bin/env node
/**
 * Protocol-level workers for bench/farm-100k, in a process of their own: W workers (default 4)
 * with J slots each that answer every build request at once with a success, so the farm's
 * own cost per step (dispatch, claims, results, builds settled) is what is measured.
 * Usage: node bench/lib/farm-workers.mjs URL TOKEN [W] [J]
 */
import { startScriptedWorker } from "../../dist/test/helpers/scripted-worker.js";

const [url, token, w = "4", j = "8"] = process.argv.slice(2);
const workers = Array.from({ length: Number(w) }, (_, i) =>
  startScriptedWorker({ url, token, id: `bench-w${i + 1}`, systems: ["x86_64-linux", "aarch64-linux"], maxJobs: Number(j), duration: () => 0 }),
);
process.on("SIGTERM", async () => {
  for (const x of workers) await x.stop();
  process.exit(0);
});

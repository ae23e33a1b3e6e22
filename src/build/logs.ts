/**
 * Build logs, kept gzip-compressed per derivation under STATE/log/<first 2 chars of the .drv
 * base name>/<rest>.gz, like Nix's layout.
 */
import * as fs from "node:fs";
import { createGzip, gunzipSync } from "node:zlib";
import { join, dirname } from "node:path";
import { FerryError } from "../core/errors.js";

export function logPathOf(realStateDir: string, drvPath: string): string {
  const base = drvPath.slice(drvPath.lastIndexOf("/") + 1);
  return join(realStateDir, "log", base.slice(0, 2), `${base.slice(2)}.gz`);
}

/** A log being written: text goes through gzip to a temporary file renamed into place on close. */
export class LogWriter {
  readonly path: string;
  readonly #tmp: string;
  readonly #gz = createGzip();
  readonly #done: Promise<void>;

  constructor(path: string) {
    this.path = path;
    fs.mkdirSync(dirname(path), { recursive: true });
    this.#tmp = `${path}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
    const out = fs.createWriteStream(this.#tmp);
    this.#gz.pipe(out);
    this.#done = new Promise((res, rej) => {
      out.on("close", () => res());
      out.on("error", rej);
    });
  }

  write(chunk: Uint8Array | string): void {
    this.#gz.write(chunk);
  }

  async close(): Promise<void> {
    this.#gz.end();
    await this.#done;
    fs.renameSync(this.#tmp, this.path);
  }
}

export function readLog(realStateDir: string, drvPath: string): string {
  const p = logPathOf(realStateDir, drvPath);
  if (!fs.existsSync(p)) {
    throw new FerryError("FERRY_LOG_NONE", `no build log is kept for ${drvPath}`, { hint: "logs exist for derivations this store built; substituted or added paths have none" });
  }
  return gunzipSync(fs.readFileSync(p)).toString("utf8");
}

/**
 * What a worker keeps on disk in its state directory: its id (so restarts keep the leases it
 * holds) and the results the coordinator has not acknowledged yet (so a restarted worker can
 * still deliver them). Both are small files written atomically.
 */
import * as fs from "node:fs";
import { randomBytes } from "node:crypto";
import { hostname } from "node:os";
import { join } from "node:path";
import { FerryError } from "../../core/errors.js";
import { writeFileAtomic } from "../../store/fs-util.js";
import { generatedWorkerId, Outbox } from "./policy.js";

export class WorkerState {
  readonly dir: string;

  constructor(dir: string) {
    this.dir = dir;
    try {
      fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    } catch (e) {
      throw new FerryError("FERRY_WORKER_STATE_DIR", `cannot use ${dir} as the worker's state directory: ${(e as Error).message}`, {
        hint: "pass a writable directory with --worker-state-dir",
      });
    }
  }

  /** The id saved by an earlier run, else a new one (saved). */
  workerId(): string {
    const file = join(this.dir, "id");
    try {
      const id = fs.readFileSync(file, "utf8").trim();
      if (id) return id;
    } catch {
      /* the first run */
    }
    const id = generatedWorkerId(hostname(), randomBytes(4).toString("hex"));
    writeFileAtomic(file, `${id}\n`);
    return id;
  }

  loadOutbox(): Outbox {
    try {
      return Outbox.fromJSON(JSON.parse(fs.readFileSync(join(this.dir, "outbox.json"), "utf8")));
    } catch {
      return new Outbox();
    }
  }

  saveOutbox(outbox: Outbox): void {
    writeFileAtomic(join(this.dir, "outbox.json"), JSON.stringify(outbox.toJSON()));
  }
}

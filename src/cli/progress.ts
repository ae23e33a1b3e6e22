/**
 * The build progress display. On a terminal: a status block redrawn in place (counts of done,
 * running, queued and failed builds; each running build with its elapsed time, an estimate
 * from earlier builds of the same name, and its last log line; downloads with sizes). Without a
 * terminal: one plain line per event that matters. With --json: every event as a JSON line.
 * It only listens to build events; it never changes what is built.
 */
import * as fs from "node:fs";
import { join, dirname } from "node:path";
import type { BuildEmitter } from "../build/events.js";
import { humanBytes } from "./output.js";

interface Running {
  name: string;
  started: number;
  lastLine: string;
  download?: { bytes: number; total?: number };
}

/** Durations of earlier builds by derivation name, for estimates (a small JSON file in the state dir). */
export class BuildHistory {
  readonly #file: string;
  readonly #data: Record<string, number>;

  constructor(stateDir: string) {
    this.#file = join(stateDir, "build-times.json");
    try {
      this.#data = JSON.parse(fs.readFileSync(this.#file, "utf8")) as Record<string, number>;
    } catch {
      this.#data = {};
    }
  }

  estimate(name: string): number | undefined {
    return this.#data[name.replace(/-[0-9][^-]*$/, "")];
  }

  record(name: string, ms: number): void {
    this.#data[name.replace(/-[0-9][^-]*$/, "")] = ms;
  }

  save(): void {
    try {
      fs.mkdirSync(dirname(this.#file), { recursive: true });
      fs.writeFileSync(this.#file, JSON.stringify(this.#data));
    } catch {
      /* estimates are a nicety */
    }
  }
}

function secs(ms: number): string {
  const s = Math.round(ms / 1000);
  return s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}

export function attachProgress(events: BuildEmitter, mode: "tty" | "plain" | "json", history?: BuildHistory): { stop(): void } {
  if (mode === "json") {
    const off = events.onAny((name, payload) => process.stdout.write(JSON.stringify({ event: name, ...(payload as object) }) + "\n"));
    return { stop: off };
  }
  const running = new Map<string, Running>();
  let total = 0;
  let done = 0;
  let failed = 0;
  let skipped = 0;
  const failures: { name: string; message: string; logPath?: string; kept?: string }[] = [];
  const offs: (() => void)[] = [];
  const say = (s: string) => process.stderr.write(s + "\n");
  let drawn = 0;
  const clear = () => {
    if (mode !== "tty" || drawn === 0) return;
    process.stderr.write(`\x1b[${drawn}A\x1b[J`);
    drawn = 0;
  };
  const draw = () => {
    if (mode !== "tty") return;
    clear();
    const width = process.stderr.columns || 100;
    const lines = [`\x1b[1m${done}/${total} done\x1b[0m, ${running.size} running, ${Math.max(0, total - done - failed - skipped - running.size)} queued, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}`];
    for (const r of running.values()) {
      const el = Date.now() - r.started;
      const est = history?.estimate(r.name);
      const dl = r.download ? ` ${humanBytes(r.download.bytes)}${r.download.total ? `/${humanBytes(r.download.total)}` : ""}` : "";
      lines.push(`  ⏵ ${r.name} ${secs(el)}${est ? ` (≈${secs(est)})` : ""}${dl}  ${r.lastLine}`.slice(0, width - 1));
    }
    process.stderr.write(lines.join("\n") + "\n");
    drawn = lines.length;
  };
  const timer = mode === "tty" ? setInterval(draw, 200) : undefined;
  offs.push(events.on("realise:planned", (p) => {
    total = p.toBuild + p.toSubstitute;
    if (mode === "plain") say(`ferry: ${p.toBuild} to build, ${p.toSubstitute} to substitute, ${p.valid} already valid`);
  }));
  offs.push(events.on("substitute:started", (b) => {
    running.set(b.drvPath, { name: `${b.name} (substituting)`, started: Date.now(), lastLine: "" });
    if (mode === "plain") say(`substituting ${b.name}`);
  }));
  offs.push(events.on("substitute:finished", (b) => {
    running.delete(b.drvPath);
    done++;
    if (mode === "plain") say(`substituted ${b.name}`);
  }));
  offs.push(events.on("build:started", (b) => {
    running.set(b.drvPath, { name: b.name, started: Date.now(), lastLine: "" });
    if (mode === "plain") say(`building ${b.name}`);
  }));
  offs.push(events.on("build:log", (l) => {
    const r = running.get(l.drvPath);
    if (r && l.line.trim()) r.lastLine = l.line.trim();
  }));
  offs.push(events.on("fetch:progress", (f) => {
    const r = running.get(f.drvPath);
    if (r) r.download = { bytes: f.bytes, ...(f.total ? { total: f.total } : {}) };
  }));
  offs.push(events.on("build:finished", (b) => {
    running.delete(b.drvPath);
    done++;
    history?.record(b.name, b.durationMs);
    if (mode === "plain") say(`built ${b.name} in ${secs(b.durationMs)}`);
    if (b.checked) {
      clear();
      say(b.checked.reproducible ? `${b.name}: reproducible (bit for bit)` : `${b.name}: NOT reproducible; differing files:\n  ${b.checked.differences.join("\n  ")}`);
    }
  }));
  offs.push(events.on("build:failed", (b) => {
    running.delete(b.drvPath);
    failed++;
    failures.push({ name: b.name, message: b.error.message, ...(b.logPath ? { logPath: b.logPath } : {}), ...(b.keptBuildDir ? { kept: b.keptBuildDir } : {}) });
    if (mode === "plain") say(`FAILED ${b.name}: ${b.error.message}`);
  }));
  offs.push(events.on("build:skipped", () => {
    skipped++;
  }));
  offs.push(events.on("realise:finished", (r) => {
    clear();
    say(`ferry: ${r.built} built, ${r.substituted ? `${r.substituted} substituted, ` : ""}${r.failed} failed, ${r.skipped} skipped because a dependency failed, in ${secs(r.durationMs)}`);
    for (const f of failures) {
      say(`  ✗ ${f.name}: ${f.message.split("\n")[0]}`);
      if (f.logPath) say(`    log: ${f.logPath}`);
      if (f.kept) say(`    build directory kept: ${f.kept}`);
    }
  }));
  return {
    stop() {
      if (timer) clearInterval(timer);
      clear();
      for (const off of offs) off();
      history?.save();
    },
  };
}

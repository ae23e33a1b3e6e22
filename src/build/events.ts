/** Events of a realisation; the progress display, logs and `--json` all read these. */
import { TypedEmitter } from "../core/events.js";

export interface BuildEvents {
  /** The plan is known: what will be built and substituted. */
  "realise:planned": { toBuild: number; toSubstitute: number; valid: number };
  "build:started": { drvPath: string; name: string; system: string; logPath: string };
  "build:log": { drvPath: string; line: string };
  "build:finished": { drvPath: string; name: string; outputs: Record<string, string>; durationMs: number; checked?: { reproducible: boolean; differences: string[] } };
  "build:failed": { drvPath: string; name: string; error: { code: string; message: string; hint?: string }; logPath?: string; durationMs: number; keptBuildDir?: string };
  "build:skipped": { drvPath: string; name: string; reason: string };
  "fetch:progress": { drvPath: string; url: string; bytes: number; total?: number };
  "substitute:started": { drvPath: string; name: string };
  "substitute:finished": { drvPath: string; name: string; durationMs: number };
  "realise:finished": { built: number; substituted: number; failed: number; skipped: number; durationMs: number };
}

export class BuildEmitter extends TypedEmitter<BuildEvents> {}

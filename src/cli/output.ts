/** How the CLI talks: results to stdout, progress and errors to stderr, one error format. */
import { FerryError } from "../core/errors.js";
import { writeAllSync } from "../store/fs-util.js";

export function out(line: string): void {
  writeAllSync(1, Buffer.from(line + "\n"));
}

/** Many lines to stdout in a few large writes (a hundred thousand jobs are not a hundred thousand syscalls). */
export function outLines(lines: Iterable<string>): void {
  let chunk: string[] = [];
  let size = 0;
  for (const line of lines) {
    chunk.push(line);
    size += line.length + 1;
    if (size >= 1 << 20) {
      writeAllSync(1, Buffer.from(chunk.join("\n") + "\n"));
      chunk = [];
      size = 0;
    }
  }
  if (chunk.length) writeAllSync(1, Buffer.from(chunk.join("\n") + "\n"));
}

/** Bytes to stdout as they are (a log that arrives in pieces). */
export function outBytes(data: Uint8Array): void {
  writeAllSync(1, data);
}

export function outJson(value: unknown): void {
  out(JSON.stringify(value, null, 2));
}

export function note(line: string): void {
  process.stderr.write(line + "\n");
}

/** The one top-level error printer: coded errors briefly with their hint, bugs with a stack. */
export function printError(e: unknown): number {
  // The reader of our output went away (`ferry … | head`): stop quietly, as Unix tools do.
  if ((e as NodeJS.ErrnoException)?.code === "EPIPE") return 0;
  if (e instanceof FerryError) {
    let s = `error [${e.code}]: ${e.message}`;
    if (e.hint) s += `\n  hint: ${e.hint}`;
    note(s);
    return 1;
  }
  const err = e as Error;
  note(`internal error (a bug in Ferry; please report it): ${err?.stack ?? String(e)}`);
  return 70;
}

/** A live progress line on a terminal, and the output it has to share the terminal with. */
export interface ProgressLine {
  /** False when nothing is shown (not a terminal): callers need not make the text. */
  readonly active: boolean;
  /** Redraws the line (at most every 100 ms, unless `force`: a change of phase). */
  update(text: string, force?: boolean): void;
  /** Prints other output (a subprocess's) above the line, which is drawn again after it. */
  print(chunk: Uint8Array | string): void;
  done(): void;
}

/** A progress line on `stream` when it is a terminal; silent otherwise (`print` still prints). */
export function progressLine(stream: Pick<NodeJS.WriteStream, "isTTY" | "write"> = process.stderr): ProgressLine {
  const tty = stream.isTTY === true;
  let last = 0;
  let text = "";
  /** The line is on the screen; output ended mid-line (the line waits for its end). */
  let shown = false;
  let midLine = false;
  const draw = () => {
    stream.write(`\r\x1b[K${text}`);
    shown = true;
  };
  return {
    active: tty,
    update(t: string, force = false) {
      if (!tty) return;
      text = t;
      const now = Date.now();
      if (midLine || (!force && now - last < 100)) return;
      last = now;
      draw();
    },
    print(chunk: Uint8Array | string) {
      if (chunk.length === 0) return;
      if (!tty) {
        stream.write(chunk);
        return;
      }
      if (shown) stream.write("\r\x1b[K");
      shown = false;
      stream.write(chunk);
      const lastByte = typeof chunk === "string" ? chunk.charCodeAt(chunk.length - 1) : chunk[chunk.length - 1];
      midLine = lastByte !== 0x0a;
      if (!midLine && text) draw();
    },
    done() {
      if (tty && shown) stream.write("\r\x1b[K");
      // What comes next starts on a line of its own, not after a half-written one.
      if (tty && midLine) stream.write("\n");
      shown = false;
      midLine = false;
    },
  };
}

export function humanBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

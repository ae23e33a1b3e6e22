/** Which systems this machine can build for: its own, and others it can run programs of. */
import * as fs from "node:fs";

let cached: string[] | undefined;

/**
 * The host's system, plus aarch64-linux when the kernel runs aarch64 programs through binfmt
 * (Debian's qemu-user-static registers `qemu-aarch64`). A machine advertises a system only when
 * it can really run its builders.
 */
export function supportedSystems(): string[] {
  if (cached) return cached;
  const arch = process.arch === "x64" ? "x86_64" : process.arch === "arm64" ? "aarch64" : process.arch;
  const out = [`${arch}-linux`];
  if (arch !== "aarch64" && binfmtEnabled("qemu-aarch64")) out.push("aarch64-linux");
  cached = out;
  return out;
}

function binfmtEnabled(entry: string): boolean {
  try {
    return fs.readFileSync(`/proc/sys/fs/binfmt_misc/${entry}`, "utf8").startsWith("enabled");
  } catch {
    return false;
  }
}

/**
 * What happens to a builder's outputs before they are registered: canonical permissions and
 * timestamps, the NAR hash, references found by scanning (SPEC §7), and for fixed outputs the
 * hash check. Pure over the files it is pointed at; registration is the caller's.
 */
import * as fs from "node:fs";
import { join } from "node:path";
import { createHasher } from "../core/digest.js";
import { FerryError } from "../core/errors.js";
import { makeHash, printHash, type Hash, type HashAlgo } from "../core/hash.js";
import { ReferenceScanner } from "../core/references.js";
import type { ContentAddress } from "../core/store-path.js";
import { dumpPath, hashFile, hashPath } from "../store/nar-dump.js";

/**
 * Makes a tree read-only with mtime 1 (Nix's canonical form; setuid/setgid bits go) and
 * durable: every file and directory is fsync'ed, so it can be registered afterwards.
 */
export function canonicalise(path: string): void {
  const st = fs.lstatSync(path);
  if (st.isSymbolicLink()) {
    fs.lutimesSync(path, 1, 1);
    return;
  }
  if (st.isDirectory()) {
    fs.chmodSync(path, 0o755);
    for (const n of fs.readdirSync(path)) canonicalise(join(path, n));
    fs.chmodSync(path, 0o555);
  } else if (!st.isFile()) {
    throw new FerryError("FERRY_BUILD_BAD_OUTPUT", `the build produced '${path}', which is not a file, directory or symlink`, { hint: "builders may only leave regular files, directories and symlinks in their outputs" });
  }
  const fd = fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  try {
    if (st.isFile()) fs.fchmodSync(fd, st.mode & 0o100 ? 0o555 : 0o444);
    fs.futimesSync(fd, 1, 1);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export interface ScannedOutput {
  readonly narHash: Hash;
  readonly narSize: number;
  /** Hash parts of the candidates found. */
  readonly found: ReadonlySet<string>;
}

/** One pass over the output's NAR: its hash, its size and the candidate hash parts it mentions. */
export function scanOutput(real: string, candidateHashParts: Iterable<string>): ScannedOutput {
  const h = createHasher("sha256");
  const scanner = new ReferenceScanner(candidateHashParts);
  const size = dumpPath(real, (c) => {
    h.update(c);
    scanner.update(c);
  });
  return { narHash: makeHash("sha256", h.digest()), narSize: size, found: scanner.found() };
}

/**
 * Checks a fixed output against its declared hash; returns its content address. A mismatch is
 * reported with both hashes, the way users fix their package (copy the right one in).
 */
export function checkFixedOutput(real: string, hashAlgo: string, expectedHex: string, name: string): ContentAddress {
  const recursive = hashAlgo.startsWith("r:");
  const algo = hashAlgo.replace(/^r:/, "") as HashAlgo;
  let got: Hash;
  if (recursive) {
    got = hashPath(real, algo).hash;
  } else {
    const st = fs.lstatSync(real);
    if (!st.isFile()) throw new FerryError("FERRY_BUILD_BAD_OUTPUT", `fixed output of ${name} must be a regular file (flat hash), but is not`, { hint: "use outputHashMode \"recursive\" for directories" });
    got = hashFile(real, algo);
  }
  const gotHex = Buffer.from(got.digest).toString("hex");
  if (gotHex !== expectedHex) {
    const want = makeHash(algo, new Uint8Array(Buffer.from(expectedHex, "hex")));
    throw new FerryError("FERRY_BUILD_HASH_MISMATCH", `hash mismatch in fixed-output derivation ${name}:\n  specified: ${printHash(want, "sri")}\n  got:       ${printHash(got, "sri")}`, {
      hint: "if the new contents are right, put the 'got' hash in the package; otherwise the source changed upstream",
      details: { specified: printHash(want, "sri"), got: printHash(got, "sri") },
    });
  }
  return { kind: "fixed", method: recursive ? "recursive" : "flat", hash: got };
}

/** Relative paths of the files whose contents or kind differ between two trees (for --check). */
export function diffTrees(a: string, b: string, rel = ""): string[] {
  const sa = fs.lstatSync(join(a, rel), { throwIfNoEntry: false });
  const sb = fs.lstatSync(join(b, rel), { throwIfNoEntry: false });
  const here = rel || ".";
  if (!sa || !sb) return [here];
  if (sa.isDirectory() && sb.isDirectory()) {
    const names = new Set([...fs.readdirSync(join(a, rel)), ...fs.readdirSync(join(b, rel))]);
    return [...names].sort().flatMap((n) => diffTrees(a, b, rel ? join(rel, n) : n));
  }
  if (sa.isSymbolicLink() && sb.isSymbolicLink()) return fs.readlinkSync(join(a, rel)) === fs.readlinkSync(join(b, rel)) ? [] : [here];
  if (sa.isFile() && sb.isFile()) {
    if ((sa.mode & 0o100) !== (sb.mode & 0o100) || sa.size !== sb.size) return [here];
    return hashFile(join(a, rel)).digest.every((x, i) => x === hashFile(join(b, rel)).digest[i]) ? [] : [here];
  }
  return [here];
}

/**
 * Ferry's `builtin:fetchurl` (Nix's builtin of the same name): downloads the file a
 * fixed-output derivation names into its output. Content-addressed mirrors come first, asked
 * by hash (`<mirror>/<algo>/<hex>`), then each URL in turn; `file://` URLs are read directly.
 * The caller verifies the hash; a mirror serving the wrong bytes just fails that check.
 */
import * as fs from "node:fs";
import { createHash } from "node:crypto";
import { fileURLToPath } from "node:url";
import { FerryError } from "../core/errors.js";
import type { Derivation } from "../core/derivation.js";

export interface FetchOptions {
  readonly hashedMirrors: readonly string[];
  readonly onProgress?: (url: string, bytes: number, total?: number) => void;
  readonly log: (line: string) => void;
  readonly signal?: AbortSignal;
}

/** Downloads into `dest` (a new file); tries every source before giving up. */
export async function builtinFetchurl(drv: Derivation, dest: string, opts: FetchOptions): Promise<void> {
  const out = drv.outputs.get("out")!;
  const algo = out.hashAlgo.replace(/^r:/, "");
  const urls = (drv.env.get("urls") ?? drv.env.get("url") ?? "").split(" ").filter((u) => u);
  const candidates = [...opts.hashedMirrors.map((m) => `${m.replace(/\/+$/, "")}/${algo}/${out.hash}`), ...urls];
  const errors: string[] = [];
  for (const url of candidates) {
    if (opts.signal?.aborted) break;
    try {
      opts.log(`fetching ${url}`);
      await fetchOne(url, dest, opts, algo, out.hash);
      if (drv.env.get("executable") === "1") fs.chmodSync(dest, 0o755);
      return;
    } catch (e) {
      errors.push(`${url}: ${(e as Error).message}`);
      opts.log(`  failed: ${(e as Error).message}`);
      fs.rmSync(dest, { force: true });
    }
  }
  if (opts.signal?.aborted) {
    throw new FerryError("FERRY_BUILD_CANCELLED", `downloading ${urls[0] ?? "the file"} was stopped (cancelled or out of time)`, { hint: "raise --timeout if the download is just slow" });
  }
  throw new FerryError("FERRY_FETCH_FAILED", `could not download ${urls[0] ?? "the file"} from any source:\n  ${errors.join("\n  ")}`, {
    hint: "check the URLs, or serve the file from a hashed mirror (--hashed-mirror URL, files at <mirror>/sha256/<hex>)",
  });
}

async function fetchOne(url: string, dest: string, opts: FetchOptions, algo: string, expectHex: string): Promise<void> {
  const h = createHash(algo);
  if (url.startsWith("file://")) {
    const src = fileURLToPath(url);
    fs.copyFileSync(src, dest, fs.constants.COPYFILE_EXCL);
    h.update(fs.readFileSync(dest));
  } else {
    const res = await fetch(url, { redirect: "follow", ...(opts.signal ? { signal: opts.signal } : {}) });
    if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
    const total = Number(res.headers.get("content-length")) || undefined;
    const fd = fs.openSync(dest, "wx", 0o644);
    let bytes = 0;
    try {
      for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
        fs.writeSync(fd, chunk);
        h.update(chunk);
        bytes += chunk.length;
        opts.onProgress?.(url, bytes, total);
      }
    } finally {
      fs.closeSync(fd);
    }
  }
  // A hashed mirror is trusted only for the file it was asked for; a URL's wrong bytes are left
  // to the caller's check so that the error shows both hashes.
  if (url.includes(`/${algo}/${expectHex}`) && h.digest("hex") !== expectHex) throw new Error("mirror served different contents");
}

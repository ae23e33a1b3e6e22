/** Binary cache fixtures: NARs and narinfos for made-up store paths, and raw HTTP requests. */
import * as http from "node:http";
import { spawn, type ChildProcess } from "node:child_process";
import { ferryBin } from "./cli.js";
import { randomBytes } from "node:crypto";
import { Readable } from "node:stream";
import { narOfTree } from "../../src/core/nar/tree.js";
import { makeHash, printPrefixedHash, toNix32 } from "../../src/core/hash.js";
import { sha256 } from "../../src/core/digest.js";
import { narKey, type Compression } from "../../src/core/cache-layout.js";
import { compressStream } from "../../src/cache/compression.js";
import { fingerprintPath, signMessage, type SecretKey } from "../../src/core/signing.js";

export interface NarFixture {
  readonly storePath: string;
  readonly hashPart: string;
  readonly nar: Uint8Array;
  /** The file as stored (compressed). */
  readonly file: Buffer;
  readonly narKey: string;
  readonly narInfoKey: string;
  readonly compression: Compression;
  readonly references: readonly string[];
}

export async function compress(bytes: Uint8Array, method: Compression): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of Readable.from([Buffer.from(bytes)]).pipe(compressStream(method))) parts.push(c as Buffer);
  return Buffer.concat(parts);
}

/** A store object of `size` random bytes (random data does not compress: sizes stay put). */
export async function makeNarFixture(opts: { storeDir?: string; name?: string; size?: number; compression?: Compression; references?: readonly string[] } = {}): Promise<NarFixture> {
  const storeDir = opts.storeDir ?? "/nix/store";
  const hashPart = toNix32(randomBytes(20));
  const storePath = `${storeDir}/${hashPart}-${opts.name ?? "fixture"}`;
  const nar = narOfTree({ type: "regular", executable: false, contents: randomBytes(opts.size ?? 1000) });
  const compression = opts.compression ?? "zstd";
  const file = await compress(nar, compression);
  return {
    storePath,
    hashPart,
    nar,
    file,
    narKey: narKey(toNix32(sha256(file)), compression),
    narInfoKey: `${hashPart}.narinfo`,
    compression,
    references: opts.references ?? [],
  };
}

/** narinfo text for the fixture, optionally signed by `key`, with fields overridden or dropped (undefined). */
export function narInfoText(f: NarFixture, opts: { key?: SecretKey; override?: Record<string, string | undefined> } = {}): string {
  const narHash = printPrefixedHash(makeHash("sha256", sha256(f.nar)));
  const fields: Record<string, string | undefined> = {
    StorePath: f.storePath,
    URL: f.narKey,
    Compression: f.compression,
    FileHash: printPrefixedHash(makeHash("sha256", sha256(f.file))),
    FileSize: String(f.file.length),
    NarHash: narHash,
    NarSize: String(f.nar.length),
    References: f.references.map((r) => r.slice(r.lastIndexOf("/") + 1)).join(" "),
    ...opts.override,
  };
  let s = "";
  for (const [k, v] of Object.entries(fields)) if (v !== undefined) s += `${k}: ${v}\n`;
  if (opts.key) s += `Sig: ${signMessage(opts.key, fingerprintPath(f.storePath, narHash, f.nar.length, f.references))}\n`;
  return s;
}

export interface HttpResult {
  readonly status: number;
  readonly headers: http.IncomingHttpHeaders;
  readonly body: Buffer;
}

/** One request with the path sent as is (fetch would normalise `..`). */
export function request(base: string, method: string, path: string, opts: { headers?: Record<string, string>; body?: Uint8Array | string } = {}): Promise<HttpResult> {
  const u = new URL(base);
  return new Promise((resolve, reject) => {
    const req = http.request({ host: u.hostname, port: u.port, method, path, headers: opts.headers, agent: false }, (res) => {
      const parts: Buffer[] = [];
      res.on("data", (c: Buffer) => parts.push(c));
      res.on("end", () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(parts) }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(opts.body);
  });
}

export const bearer = (token: string): Record<string, string> => ({ Authorization: `Bearer ${token}` });

/** A `ferry cache serve` process, resolved once it listens; `url` is the address it printed. */
export async function spawnCacheServer(args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ child: ChildProcess; url: string; stderr: () => string }> {
  // One process unless the test asks for more: fewer processes to start and to stop.
  const workers = args.includes("--workers") ? [] : ["--workers", "1"];
  const child = spawn(process.execPath, [ferryBin, "cache", "serve", "--listen", "127.0.0.1:0", ...workers, ...args], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } });
  let text = "";
  let err = "";
  child.stdout!.setEncoding("utf8");
  child.stderr!.setEncoding("utf8").on("data", (s: string) => (err += s));
  const url = await new Promise<string>((resolve, reject) => {
    child.stdout!.on("data", (s: string) => {
      text += s;
      const m = /^ferry cache: serving .* on (http:\/\/[^\s]+)/m.exec(text);
      if (m) resolve(m[1]!);
    });
    child.on("exit", (code) => reject(new Error(`ferry cache serve exited ${code}: ${err}`)));
  });
  return { child, url, stderr: () => err };
}

/**
 * narinfo and nix-cache-info (SPEC §9): parse what Nix 2.8 accepts, print what it writes.
 */
import { FerryError } from "./errors.js";
import { parseHash, printPrefixedHash, type Hash } from "./hash.js";
import { parseBaseName, parseStorePath, baseName, printStorePath, parseContentAddress, printContentAddress, pathOfContentAddress, type ContentAddress } from "./store-path.js";
import { fingerprintPath, verifySignature, type PublicKey } from "./signing.js";

export interface NarInfo {
  /** Full store path. */
  readonly storePath: string;
  readonly url: string;
  readonly compression: string;
  readonly fileHash?: Hash;
  readonly fileSize?: number;
  readonly narHash: Hash;
  readonly narSize: number;
  /** Full store paths, sorted. */
  readonly references: readonly string[];
  /** Full path of the deriver `.drv`, if known. */
  readonly deriver?: string;
  readonly sigs: readonly string[];
  readonly ca?: ContentAddress;
}

function bad(message: string, hint = "the cache served a corrupt narinfo; check the cache or try another substituter"): never {
  throw new FerryError("FERRY_NARINFO_INVALID", message, { hint });
}

/** Parses narinfo text for a cache of `storeDir`. Rejects what Nix rejects (SPEC §9.5). */
export function parseNarInfo(storeDir: string, text: string): NarInfo {
  if (text.includes("\r")) bad("narinfo has CR characters (CRLF line endings are not accepted)");
  const fields = new Map<string, string>();
  const sigs: string[] = [];
  for (const line of text.split("\n")) {
    if (line === "") continue;
    const colon = line.indexOf(": ");
    if (colon <= 0) {
      if (line.endsWith(":")) {
        fields.set(line.slice(0, -1), "");
        continue;
      }
      bad(`narinfo line '${line}' is not 'Key: value'`);
    }
    const key = line.slice(0, colon);
    const value = line.slice(colon + 2);
    if (key === "Sig") sigs.push(value);
    else fields.set(key, value);
  }
  const need = (k: string) => fields.get(k) ?? bad(`narinfo lacks the required field ${k}`);
  const storePath = need("StorePath");
  const sp = parseStorePath(storeDir, storePath);
  const url = need("URL");
  if (url === "") bad("narinfo has an empty URL");
  // Nix reads a missing or empty Compression as bzip2
  const compression = fields.get("Compression") || "bzip2";
  const parseH = (k: string, v: string): Hash => {
    try {
      return parseHash(v);
    } catch (e) {
      return bad(`narinfo ${k} '${v}' is not a valid hash: ${(e as Error).message}`);
    }
  };
  const narHash = parseH("NarHash", need("NarHash"));
  const narSizeText = need("NarSize");
  const narSize = Number(narSizeText);
  if (!/^\d+$/.test(narSizeText) || !Number.isSafeInteger(narSize) || narSize <= 0) bad(`narinfo NarSize '${narSizeText}' is not a positive integer`);
  const refsText = fields.get("References") ?? "";
  // a set, as in Nix: a repeated reference is one reference (and is signed once)
  const references = [...new Set(refsText.split(" ").filter((r) => r !== ""))].map((r) => printStorePath(parseBaseName(storeDir, r))).sort();
  const deriverText = fields.get("Deriver");
  let deriver: string | undefined;
  if (deriverText !== undefined && deriverText !== "" && deriverText !== "unknown-deriver") {
    if (deriverText.includes("/")) bad(`narinfo Deriver '${deriverText}' must be a base name, not a full path`);
    deriver = printStorePath(parseBaseName(storeDir, deriverText));
  }
  const fileHashText = fields.get("FileHash");
  const fileSizeText = fields.get("FileSize");
  const caText = fields.get("CA");
  const info: NarInfo = {
    storePath: printStorePath(sp),
    url,
    compression,
    ...(fileHashText ? { fileHash: parseH("FileHash", fileHashText) } : {}),
    ...(fileSizeText && /^\d+$/.test(fileSizeText) ? { fileSize: Number(fileSizeText) } : {}),
    narHash,
    narSize,
    references,
    ...(deriver ? { deriver } : {}),
    sigs,
    ...(caText ? { ca: parseContentAddress(caText, (s) => parseH("CA", s)) } : {}),
  };
  return Object.freeze(info);
}

/** Prints narinfo in the field order Nix writes (SPEC §9.3). */
export function printNarInfo(storeDir: string, info: NarInfo): string {
  let s = `StorePath: ${info.storePath}\nURL: ${info.url}\nCompression: ${info.compression}\n`;
  if (info.fileHash) s += `FileHash: ${printPrefixedHash(info.fileHash)}\n`;
  if (info.fileSize !== undefined) s += `FileSize: ${info.fileSize}\n`;
  s += `NarHash: ${printPrefixedHash(info.narHash)}\nNarSize: ${info.narSize}\n`;
  s += `References: ${[...info.references].sort().map((r) => baseName(parseStorePath(storeDir, r))).join(" ")}\n`;
  if (info.deriver) s += `Deriver: ${baseName(parseStorePath(storeDir, info.deriver))}\n`;
  for (const sig of info.sigs) s += `Sig: ${sig}\n`;
  if (info.ca) s += `CA: ${printContentAddress(info.ca)}\n`;
  return s;
}

export interface CacheInfo {
  readonly storeDir: string;
  readonly wantMassQuery: boolean;
  readonly priority: number;
}

export function parseCacheInfo(text: string, defaults: { storeDir: string; priority?: number }): CacheInfo {
  const fields = new Map<string, string>();
  for (const line of text.split("\n")) {
    const colon = line.indexOf(":");
    if (colon > 0) fields.set(line.slice(0, colon).trim(), line.slice(colon + 1).trim());
  }
  const prio = fields.get("Priority");
  return Object.freeze({
    storeDir: fields.get("StoreDir") ?? defaults.storeDir,
    wantMassQuery: fields.get("WantMassQuery") === "1",
    priority: prio !== undefined && /^-?\d+$/.test(prio) ? Number(prio) : (defaults.priority ?? 50),
  });
}

export function printCacheInfo(ci: CacheInfo): string {
  return `StoreDir: ${ci.storeDir}\nWantMassQuery: ${ci.wantMassQuery ? 1 : 0}\nPriority: ${ci.priority}\n`;
}

/**
 * Whether a client may register the object a narinfo describes (SPEC §9.6, Nix 2.8's rules):
 * a content-addressed object is trusted when its address, name and references make its
 * store path; any other needs a signature by one of `trustedKeys` over its fingerprint.
 * Returns undefined when trusted, else why not (naming the keys involved).
 */
export function narInfoDistrust(storeDir: string, info: NarInfo, trustedKeys: readonly PublicKey[]): string | undefined {
  if (info.ca) {
    try {
      const sp = parseStorePath(storeDir, info.storePath);
      if (printStorePath(pathOfContentAddress(storeDir, sp.name, info.ca, info.references, info.storePath)) === info.storePath) return undefined;
    } catch {
      /* a malformed address falls through to the signature check */
    }
  }
  const fp = fingerprintPath(info.storePath, printPrefixedHash(info.narHash), info.narSize, info.references);
  for (const sig of info.sigs) if (verifySignature(trustedKeys, fp, sig)) return undefined;
  const signers = [...new Set(info.sigs.map((s) => s.slice(0, Math.max(0, s.indexOf(":")))))].filter((s) => s);
  const trusted = trustedKeys.map((k) => k.name).join(", ") || "none";
  return signers.length === 0
    ? `${info.storePath} has no signature (trusted keys: ${trusted})`
    : `${info.storePath} is signed by ${signers.join(", ")}, none of them a trusted key with a valid signature (trusted keys: ${trusted})`;
}

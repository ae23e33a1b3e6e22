/**
 * Ed25519 keys in Nix's key-file format (SPEC §9.4) and signatures over store path
 * fingerprints. Secret key file: `NAME:base64(seed ‖ public)`; public: `NAME:base64(public)`.
 */
import { createPrivateKey, createPublicKey, generateKeyPairSync, sign as edSign, verify as edVerify, type KeyObject } from "node:crypto";
import { FerryError } from "./errors.js";
import { fromBase64, toBase64 } from "./hash.js";

const PKCS8_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");
const SPKI_PREFIX = Buffer.from("302a300506032b6570032100", "hex");

export interface SecretKey {
  readonly name: string;
  readonly seed: Uint8Array;
  readonly publicKey: Uint8Array;
  readonly key: KeyObject;
}

export interface PublicKey {
  readonly name: string;
  readonly publicKey: Uint8Array;
  readonly key: KeyObject;
}

function checkKeyName(name: string): string {
  if (name.length === 0 || /[:\s]/.test(name)) {
    throw new FerryError("FERRY_KEY_BAD_NAME", `'${name}' cannot be a key name`, {
      hint: "key names are non-empty and contain no ':' or white space, e.g. cache.example.org-1",
    });
  }
  return name;
}

function splitKeyText(text: string, what: string): [string, Uint8Array] {
  const t = text.trim();
  const colon = t.indexOf(":");
  if (colon <= 0) {
    throw new FerryError("FERRY_KEY_BAD_FORMAT", `the ${what} is not in Nix's key format NAME:BASE64`, {
      hint: "make keys with `ferry key generate` or `nix-store --generate-binary-cache-key`",
    });
  }
  let bytes: Uint8Array;
  try {
    bytes = fromBase64(t.slice(colon + 1));
  } catch {
    throw new FerryError("FERRY_KEY_BAD_FORMAT", `the ${what} '${t.slice(0, colon)}' has invalid base-64 key material`);
  }
  return [t.slice(0, colon), bytes];
}

function publicKeyObject(pub: Uint8Array): KeyObject {
  return createPublicKey({ key: Buffer.concat([SPKI_PREFIX, pub]), format: "der", type: "spki" });
}

export function parseSecretKey(text: string): SecretKey {
  const [name, bytes] = splitKeyText(text, "secret key");
  if (bytes.length !== 64) {
    throw new FerryError("FERRY_KEY_BAD_FORMAT", `secret key '${name}' has ${bytes.length} bytes; an ed25519 secret key file holds 64`);
  }
  const seed = bytes.slice(0, 32);
  const key = createPrivateKey({ key: Buffer.concat([PKCS8_PREFIX, seed]), format: "der", type: "pkcs8" });
  const derivedPublic = new Uint8Array(createPublicKey(key).export({ format: "der", type: "spki" })).slice(SPKI_PREFIX.length);
  if (Buffer.compare(Buffer.from(derivedPublic), Buffer.from(bytes.slice(32))) !== 0) {
    throw new FerryError("FERRY_KEY_BAD_FORMAT", `secret key '${name}' is inconsistent: its public half does not match its seed`);
  }
  return Object.freeze({ name: checkKeyName(name), seed, publicKey: derivedPublic, key });
}

export function parsePublicKey(text: string): PublicKey {
  const [name, bytes] = splitKeyText(text, "public key");
  if (bytes.length !== 32) {
    throw new FerryError("FERRY_KEY_BAD_FORMAT", `public key '${name}' has ${bytes.length} bytes; an ed25519 public key has 32`);
  }
  return Object.freeze({ name: checkKeyName(name), publicKey: bytes, key: publicKeyObject(bytes) });
}

export function generateSecretKey(name: string): SecretKey {
  checkKeyName(name);
  const { privateKey } = generateKeyPairSync("ed25519");
  const pkcs8 = new Uint8Array(privateKey.export({ format: "der", type: "pkcs8" }));
  const seed = pkcs8.slice(PKCS8_PREFIX.length);
  return parseSecretKey(`${name}:${toBase64(new Uint8Array(Buffer.concat([seed, publicFromSeed(seed)])))}`);
}

function publicFromSeed(seed: Uint8Array): Uint8Array {
  const key = createPrivateKey({ key: Buffer.concat([PKCS8_PREFIX, seed]), format: "der", type: "pkcs8" });
  return new Uint8Array(createPublicKey(key).export({ format: "der", type: "spki" })).slice(SPKI_PREFIX.length);
}

/** The key files' text, without trailing newlines (as Nix writes them). */
export function printSecretKey(k: SecretKey): string {
  return `${k.name}:${toBase64(new Uint8Array(Buffer.concat([k.seed, k.publicKey])))}`;
}

export function printPublicKey(k: { name: string; publicKey: Uint8Array }): string {
  return `${k.name}:${toBase64(k.publicKey)}`;
}

export function publicKeyOf(k: SecretKey): PublicKey {
  return Object.freeze({ name: k.name, publicKey: k.publicKey, key: publicKeyObject(k.publicKey) });
}

/** Signs a message; returns the `Sig` value `name:base64(signature)`. */
export function signMessage(k: SecretKey, message: string): string {
  return `${k.name}:${toBase64(new Uint8Array(edSign(null, Buffer.from(message, "utf8"), k.key)))}`;
}

/** True when `sig` (`name:base64`) is a valid signature of `message` by a key of that name in `keys`. */
export function verifySignature(keys: readonly PublicKey[], message: string, sig: string): boolean {
  const colon = sig.indexOf(":");
  if (colon <= 0) return false;
  const name = sig.slice(0, colon);
  let raw: Uint8Array;
  try {
    raw = fromBase64(sig.slice(colon + 1));
  } catch {
    return false;
  }
  if (raw.length !== 64) return false;
  for (const k of keys) {
    if (k.name === name && edVerify(null, Buffer.from(message, "utf8"), k.key, raw)) return true;
  }
  return false;
}

/**
 * The signed message of a store object (SPEC §9.4): `1;path;sha256:<nix32>;size;ref,ref`, with
 * the references (full paths) sorted and each listed once, as Nix's path set is.
 */
export function fingerprintPath(path: string, narHashPrefixedNix32: string, narSize: number, references: readonly string[]): string {
  if (!narHashPrefixedNix32.startsWith("sha256:")) throw new Error("fingerprints take a sha256:<nix32> NAR hash");
  return `1;${path};${narHashPrefixedNix32};${narSize};${[...new Set(references)].sort().join(",")}`;
}

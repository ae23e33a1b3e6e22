/**
 * Store paths (SPEC §3): `<storeDir>/<32 nix32 chars>-<name>`, computed from a fingerprint that
 * includes the store dir, the kind of object, its content digest and its references.
 */
import { sha256, sha256Binary } from "./digest.js";
import { FerryError } from "./errors.js";
import { compressBinaryHash, nix32Length, printHash, toBase16, toNix32, isNix32Char, type Hash } from "./hash.js";

export const HASH_PART_LENGTH = 32;
export const MAX_NAME_LENGTH = 211;

/** A parsed store path. `storeDir` has no trailing slash. */
export interface StorePath {
  readonly storeDir: string;
  readonly hashPart: string;
  readonly name: string;
}

const NAME_BAD = /[^A-Za-z0-9+\-._?=]/u;

/**
 * Why Nix 2.8 refuses `name` as a store path name, or undefined when it accepts it (SPEC §3.1):
 * 1-211 characters from `[A-Za-z0-9+\-._?=]`. This is the rule for reading paths (narinfo,
 * export streams, another store's database) and for computing the path of an object, so that
 * every path Nix 2.8 makes, `.hidden` included, can be read and checked.
 */
export function invalidNameReason(name: string): string | undefined {
  if (name.length === 0) return "the name is empty";
  if (name.length > MAX_NAME_LENGTH) return `the name is ${name.length} characters long; the limit is ${MAX_NAME_LENGTH}`;
  const bad = NAME_BAD.exec(name);
  if (bad) return `the name contains the illegal character ${JSON.stringify(bad[0])}`;
  return undefined;
}

/**
 * The stricter rule for names Ferry gives to objects it creates: Nix 2.8's rule, and no leading
 * `.`, which Nix 2.8 accepts but other Nix releases treat differently (SPEC §3.1: never generate one).
 */
export function invalidNewNameReason(name: string): string | undefined {
  return invalidNameReason(name) ?? (name.startsWith(".") ? "the name starts with '.'" : undefined);
}

function nameError(name: string, why: string): FerryError {
  return new FerryError("FERRY_STORE_BAD_NAME", `'${name}' cannot be a store path name: ${why}`, {
    hint: "store path names use letters, digits and + - . _ ? = only, at most 211 characters; Ferry gives none a leading '.'",
  });
}

/** Returns `name` if Nix 2.8 accepts it as a store path name; throws FERRY_STORE_BAD_NAME otherwise. */
export function checkName(name: string): string {
  const why = invalidNameReason(name);
  if (why) throw nameError(name, why);
  return name;
}

/** Returns `name` if Ferry may give it to a new object (see `invalidNewNameReason`); throws FERRY_STORE_BAD_NAME otherwise. */
export function checkNewName(name: string): string {
  const why = invalidNewNameReason(name);
  if (why) throw nameError(name, why);
  return name;
}

export function checkStoreDir(storeDir: string): string {
  if (!storeDir.startsWith("/") || storeDir.length < 2 || storeDir.endsWith("/") || storeDir.includes("//")) {
    throw new FerryError("FERRY_STORE_BAD_DIR", `'${storeDir}' is not a usable store directory`, {
      hint: "give an absolute path without a trailing slash, such as /ferry/store",
    });
  }
  return storeDir;
}

export function printStorePath(p: StorePath): string {
  return `${p.storeDir}/${p.hashPart}-${p.name}`;
}

/** The `hash-name` part of a store path. */
export function baseName(p: StorePath): string {
  return `${p.hashPart}-${p.name}`;
}

/** Parses `<storeDir>/<hash>-<name>` for the given store dir; subpaths are rejected. */
export function parseStorePath(storeDir: string, path: string): StorePath {
  const fail = (why: string): never => {
    throw new FerryError("FERRY_STORE_BAD_PATH", `'${path}' is not a store path in ${storeDir}: ${why}`, {
      hint: `store paths look like ${storeDir}/<32 characters of nix32>-<name>`,
    });
  };
  if (!path.startsWith(storeDir + "/")) fail(`it is not inside ${storeDir}`);
  return parseBaseName(storeDir, path.slice(storeDir.length + 1), fail);
}

/** Parses `hash-name` (a narinfo References entry) into a store path of `storeDir`. */
export function parseBaseName(storeDir: string, base: string, fail?: (why: string) => never): StorePath {
  const f = fail ?? ((why: string): never => {
    throw new FerryError("FERRY_STORE_BAD_PATH", `'${base}' is not a store path base name: ${why}`);
  });
  if (base.includes("/")) f("it names something inside a store object");
  if (base.length < HASH_PART_LENGTH + 2 || base[HASH_PART_LENGTH] !== "-") f("it has no 32-character hash part followed by '-'");
  const hashPart = base.slice(0, HASH_PART_LENGTH);
  for (let i = 0; i < hashPart.length; i++) if (!isNix32Char(hashPart.charCodeAt(i))) f(`the hash part has the character '${hashPart[i]}'`);
  const name = base.slice(HASH_PART_LENGTH + 1);
  const why = invalidNameReason(name);
  if (why) f(why);
  return Object.freeze({ storeDir, hashPart, name });
}

/** The hash part of the path for a fingerprint `type:sha256:<innerHex>:<storeDir>:<name>` (SPEC §3.2). */
function hashPartOf(storeDir: string, type: string, innerHex: string, name: string): string {
  checkStoreDir(storeDir);
  checkName(name);
  return toNix32(compressBinaryHash(sha256Binary(`${type}:sha256:${innerHex}:${storeDir}:${name}`), 20));
}

/** The path for a fingerprint `type:sha256:<hex inner>:<storeDir>:<name>` (SPEC §3.2). */
export function makeStorePath(storeDir: string, type: string, inner: Uint8Array, name: string): StorePath {
  return Object.freeze({ storeDir, hashPart: hashPartOf(storeDir, type, toBase16(inner), name), name });
}

/** True when `xs` is in JavaScript's default sort order. */
function isSorted(xs: readonly string[]): boolean {
  for (let i = 1; i < xs.length; i++) if (xs[i - 1]! > xs[i]!) return false;
  return true;
}

function typeWithRefs(base: string, references: readonly string[], self: boolean): string {
  let t = base;
  for (const r of isSorted(references) ? references : [...references].sort()) t += ":" + r;
  if (self) t += ":self";
  return t;
}

/** A source object (`nix-store --add`): `narHash` is sha256 of its NAR. */
export function makeSourcePath(storeDir: string, name: string, narHash: Hash, references: readonly string[] = [], selfReference = false): StorePath {
  if (narHash.algo !== "sha256") throw new Error("source paths are made from a sha256 NAR hash");
  return makeStorePath(storeDir, typeWithRefs("source", references, selfReference), narHash.digest, name);
}

/** A text object (`builtins.toFile`, `.drv` files): hashed by contents, with declared references. */
export function makeTextPath(storeDir: string, name: string, contentsHash: Hash, references: readonly string[] = []): StorePath {
  if (contentsHash.algo !== "sha256") throw new Error("text paths are made from a sha256 hash");
  return makeStorePath(storeDir, typeWithRefs("text", references, false), contentsHash.digest, name);
}

export type FileIngestionMethod = "flat" | "recursive";

/**
 * A fixed-output object: recursive sha256 is a source path (which may have references and a
 * self-reference); anything else is `output:out` over `fixed:out:[r:]<algo>:<hex>:`, and has no
 * references (a bug in the caller if it does).
 */
export function makeFixedOutputPath(
  storeDir: string,
  name: string,
  method: FileIngestionMethod,
  hash: Hash,
  refs: { readonly references?: readonly string[]; readonly selfReference?: boolean } = {},
): StorePath {
  const references = refs.references ?? [];
  const selfReference = refs.selfReference ?? false;
  if (method === "recursive" && hash.algo === "sha256") return makeSourcePath(storeDir, name, hash, references, selfReference);
  if (references.length > 0 || selfReference) throw new Error("only recursive sha256 fixed-output paths can have references");
  const inner = sha256(`fixed:out:${method === "recursive" ? "r:" : ""}${hash.algo}:${toBase16(hash.digest)}:`);
  return makeStorePath(storeDir, "output:out", inner, name);
}

/** The name of a derivation output's path: `name` for `out`, `name-<output>` otherwise. */
export function outputPathName(drvName: string, output: string): string {
  return output === "out" ? drvName : `${drvName}-${output}`;
}

/** An input-addressed derivation output, from the masked hashDerivationModulo digest (SPEC §6). */
export function makeOutputPath(storeDir: string, output: string, drvHash: Uint8Array, drvName: string): StorePath {
  return makeStorePath(storeDir, `output:${output}`, drvHash, outputPathName(drvName, output));
}

/**
 * `<storeDir>/<hashPart>-<name>` as one flat string (a join, not a tree of concatenations): a
 * path is hashed, sliced, compared and copied many times, and its pieces can be collected at once.
 */
function flatPath(storeDir: string, hashPart: string, name: string): string {
  return [storeDir, "/", hashPart, "-", name].join("");
}

/** `printStorePath(makeOutputPath(…))`, with the masked hashDerivationModulo digest given in hex. */
export function outputPathOfHex(storeDir: string, output: string, drvHashHex: string, drvName: string): string {
  const name = outputPathName(drvName, output);
  return flatPath(storeDir, hashPartOf(storeDir, `output:${output}`, drvHashHex, name), name);
}

/** `printStorePath(makeTextPath(…))`, with the sha256 of the contents given in hex. */
export function textPathOfHex(storeDir: string, name: string, contentsHex: string, references: readonly string[] = []): string {
  return flatPath(storeDir, hashPartOf(storeDir, typeWithRefs("text", references, false), contentsHex, name), name);
}

// ---- content-address descriptors (SPEC §3.5) ------------------------------------------------

export type ContentAddress =
  | { readonly kind: "text"; readonly hash: Hash }
  | { readonly kind: "fixed"; readonly method: FileIngestionMethod; readonly hash: Hash };

export function printContentAddress(ca: ContentAddress): string {
  if (ca.kind === "text") return `text:${ca.hash.algo}:${printHash(ca.hash, "nix32")}`;
  return `fixed:${ca.method === "recursive" ? "r:" : ""}${ca.hash.algo}:${printHash(ca.hash, "nix32")}`;
}

/**
 * Parses a content-address descriptor; `parse` reads the `algo:digest` part. A text address must
 * use sha256, as Nix requires.
 */
export function parseContentAddress(s: string, parse: (algoAndDigest: string) => Hash): ContentAddress {
  if (s.startsWith("text:")) {
    const hash = parse(s.slice(5));
    if (hash.algo !== "sha256") {
      throw new FerryError("FERRY_STORE_BAD_CA", `'${s}' is not a valid content address: text addresses use sha256, not ${hash.algo}`);
    }
    return { kind: "text", hash };
  }
  if (s.startsWith("fixed:r:")) return { kind: "fixed", method: "recursive", hash: parse(s.slice(8)) };
  if (s.startsWith("fixed:")) return { kind: "fixed", method: "flat", hash: parse(s.slice(6)) };
  throw new FerryError("FERRY_STORE_BAD_CA", `'${s}' is not a content address`, { hint: "expected text:sha256:… or fixed:[r:]algo:…" });
}

/**
 * The path a content address implies, for checking that a CA object is what it claims (as Nix
 * 2.8's `isContentAddressed` does). `references` are the object's full reference paths; one equal
 * to `claimedPath` is a self-reference. Only a `fixed:r:sha256` (source) object can have
 * references besides text objects, so any other fixed address with references is rejected with
 * FERRY_STORE_BAD_CA (Nix 2.8 aborts on it).
 */
export function pathOfContentAddress(
  storeDir: string,
  name: string,
  ca: ContentAddress,
  references: readonly string[],
  claimedPath?: string,
): StorePath {
  if (ca.kind === "text") return makeTextPath(storeDir, name, ca.hash, references);
  const others = references.filter((r) => r !== claimedPath);
  const selfReference = others.length !== references.length;
  if ((others.length > 0 || selfReference) && !(ca.method === "recursive" && ca.hash.algo === "sha256")) {
    throw new FerryError("FERRY_STORE_BAD_CA", `a ${printContentAddress(ca)} object cannot have references`, {
      hint: "only text and recursive sha256 content-addressed objects have references; the object's metadata is corrupt",
    });
  }
  return makeFixedOutputPath(storeDir, name, ca.method, ca.hash, { references: others, selfReference });
}

export { nix32Length };

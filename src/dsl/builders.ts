/** Everyday derivations: fetchurl, writeText, writeScript, runCommand, symlinkJoin. */
import { parseHash, printHash } from "../core/hash.js";
import { evalContext } from "./context.js";
import { derivation, evalError, type AttrValue } from "./derivation.js";
import type { OutputRef, Package, SourcePath } from "./values.js";

export type StoreThing = Package | OutputRef | SourcePath;

/** Host programs every shell-based builder below may use; declaring them is part of identity. */
export const BASIC_HOST_TOOLS: readonly string[] = ["sh", "cat", "chmod", "cp", "ln", "mkdir", "printf", "find"];

/** The PATH a builder gets: its inputs' bin/ directories, then the host's if it declared host tools. */
export function builderPath(inputs: readonly StoreThing[], hostTools: readonly string[]): string {
  const dirs = inputs.map((p) => `${p}/bin`);
  if (hostTools.length) dirs.push("/usr/bin", "/bin");
  return dirs.join(":");
}

export interface FetchurlArgs {
  /** One URL, or several tried in order. */
  readonly url?: string;
  readonly urls?: readonly string[];
  /** The expected hash of the file: SRI (`sha256-…`) or `sha256:…`. Required. */
  readonly hash: string;
  readonly name?: string;
  readonly executable?: boolean;
}

/**
 * A file downloaded by Ferry's built-in fetcher (Nix's `builtin:fetchurl`): a fixed-output
 * derivation, so only its hash matters to what depends on it. Content-addressed mirrors
 * (setting `hashed-mirrors`) are tried by hash before the URLs.
 */
export function fetchurl(a: FetchurlArgs): Package {
  const urls = [...(a.urls ?? []), ...(a.url ? [a.url] : [])];
  if (urls.length === 0) throw evalError("FERRY_EVAL_BAD_VALUE", "fetchurl needs a url or urls");
  if (!a.hash) throw evalError("FERRY_EVAL_NO_HASH", `fetchurl of ${urls[0]} has no hash`, "give the expected hash, e.g. hash: \"sha256-…\" (a wrong one is reported with the right one when fetched)");
  let h;
  try {
    h = parseHash(a.hash);
  } catch (e) {
    throw evalError("FERRY_EVAL_BAD_HASH", `fetchurl of ${urls[0]}: ${(e as Error).message}`);
  }
  const name = a.name ?? decodeURIComponent(urls[0]!.replace(/[?#].*$/, "").split("/").pop() || "download");
  return derivation(
    {
      name,
      system: "builtin",
      builder: "builtin:fetchurl",
      url: urls[0]!,
      urls,
      outputHash: printHash(h, "sri"),
      outputHashMode: "flat",
      executable: a.executable ?? false,
      unpack: false,
      preferLocalBuild: true,
    },
    { fetch: { urls } },
  );
}

/** A text file in the store (a derivation, so it may mention other packages). */
export function writeText(name: string, text: string, opts: { executable?: boolean } = {}): Package {
  const ctx = evalContext();
  return derivation({
    name,
    system: ctx.settings.hostSystem,
    builder: "/bin/sh",
    args: ["-c", `printf '%s' "$text" > "$out"${opts.executable ? ' && /bin/chmod +x "$out"' : ""}`],
    text,
    ferryHostTools: "sh" + (opts.executable ? " chmod" : ""),
  });
}

/** An executable script in the store. */
export function writeScript(name: string, text: string): Package {
  return writeText(name, text, { executable: true });
}

export interface RunCommandEnv {
  /** Packages whose bin/ go on PATH. */
  readonly buildInputs?: readonly StoreThing[];
  /** Host programs the script uses (default: a few basics). */
  readonly hostTools?: readonly string[];
  readonly system?: string;
  readonly [k: string]: AttrValue | readonly AttrValue[] | readonly StoreThing[] | undefined;
}

/** A derivation whose builder is a shell script. `$out` is where the result goes. */
export function runCommand(name: string, env: RunCommandEnv, script: string): Package {
  const ctx = evalContext();
  const { buildInputs = [], hostTools = BASIC_HOST_TOOLS, system, ...rest } = env;
  return derivation({
    ...(rest as Record<string, AttrValue>),
    name,
    system: system ?? ctx.settings.hostSystem,
    builder: "/bin/sh",
    args: ["-e", "-c", script],
    buildInputs: [...buildInputs],
    ferryHostTools: hostTools.join(" "),
    PATH: builderPath(buildInputs, hostTools),
  });
}

/** One tree that holds symlinks to everything in `paths` (later paths win). */
export function symlinkJoin(a: { name: string; paths: readonly StoreThing[] }): Package {
  return runCommand(
    a.name,
    { paths: [...a.paths] },
    [
      'mkdir -p "$out"',
      "for p in $paths; do",
      '  (cd "$p" && find . -type d -exec mkdir -p "$out/{}" \\; && find . \\( -type f -o -type l \\) -exec ln -sf "$p/{}" "$out/{}" \\;)',
      "done",
    ].join("\n"),
  );
}

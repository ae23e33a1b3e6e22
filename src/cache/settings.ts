/**
 * Substitution settings, read like Nix's: `substituters`, `trusted-public-keys` and
 * `require-sigs`. Sources, strongest first: command-line flags, environment
 * (FERRY_SUBSTITUTERS, FERRY_TRUSTED_PUBLIC_KEYS, FERRY_REQUIRE_SIGS), the config file
 * (FERRY_CONFIG, else /etc/ferry/ferry.conf), built-in defaults (no substituters).
 *
 * The config file has nix.conf's syntax: `name = value` lines, `#` comments, values split on
 * whitespace; `extra-substituters` / `extra-trusted-public-keys` append instead of replace.
 */
import * as fs from "node:fs";
import { FerryError } from "../core/errors.js";
import { parsePublicKey, type PublicKey } from "../core/signing.js";

export const DEFAULT_CONFIG_FILE = "/etc/ferry/ferry.conf";

export interface SubstitutionSettings {
  readonly substituters: readonly string[];
  readonly trustedPublicKeys: readonly PublicKey[];
  readonly requireSigs: boolean;
}

export interface SettingsFlags {
  readonly substituters?: string | undefined;
  readonly trustedPublicKeys?: string | undefined;
  readonly requireSigs?: boolean | undefined;
}

const words = (s: string): string[] => s.split(/\s+/).filter((w) => w !== "");

/** Parses config text into name → value (with extra-* appended to their base setting). */
export function parseConfig(text: string, file: string): Map<string, string> {
  const out = new Map<string, string>();
  text.split("\n").forEach((raw, i) => {
    const line = raw.replace(/#.*$/, "").trim();
    if (line === "") return;
    const eq = line.indexOf("=");
    if (eq <= 0) {
      throw new FerryError("FERRY_CONFIG_INVALID", `${file}:${i + 1}: '${raw.trim()}' is not 'name = value'`, { hint: "fix or remove the line" });
    }
    const name = line.slice(0, eq).trim();
    const value = line.slice(eq + 1).trim();
    if (name.startsWith("extra-")) {
      const base = name.slice("extra-".length);
      out.set(base, `${out.get(base) ?? ""} ${value}`.trim());
    } else out.set(name, value);
  });
  return out;
}

function parseKeys(text: string, source: string): PublicKey[] {
  return words(text).map((k) => {
    try {
      return parsePublicKey(k);
    } catch (e) {
      throw new FerryError("FERRY_CONFIG_INVALID", `${source}: '${k}' is not a public key: ${(e as Error).message}`, {
        hint: "keys look like name:base64 (the output of `ferry key public`)",
      });
    }
  });
}

function parseBool(text: string, source: string): boolean {
  if (/^(true|1|yes)$/i.test(text)) return true;
  if (/^(false|0|no)$/i.test(text)) return false;
  throw new FerryError("FERRY_CONFIG_INVALID", `${source}: '${text}' is not true or false`, { hint: "use true or false" });
}

export function resolveSubstitutionSettings(flags: SettingsFlags = {}, env: NodeJS.ProcessEnv = process.env): SubstitutionSettings {
  const file = env.FERRY_CONFIG ?? DEFAULT_CONFIG_FILE;
  let conf = new Map<string, string>();
  try {
    conf = parseConfig(fs.readFileSync(file, "utf8"), file);
  } catch (e) {
    if (e instanceof FerryError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== "ENOENT" || env.FERRY_CONFIG !== undefined) {
      throw new FerryError("FERRY_CONFIG_INVALID", `cannot read the config file ${file}: ${(e as Error).message}`, { hint: "fix FERRY_CONFIG or the file's permissions" });
    }
  }
  const pick = (flag: string | undefined, envName: string, confName: string): [string, string] | undefined => {
    if (flag !== undefined) return [flag, `--${confName}`];
    const e = env[envName];
    if (e !== undefined) return [e, envName];
    const c = conf.get(confName);
    return c !== undefined ? [c, `${file}: ${confName}`] : undefined;
  };
  const subs = pick(flags.substituters, "FERRY_SUBSTITUTERS", "substituters");
  const keys = pick(flags.trustedPublicKeys, "FERRY_TRUSTED_PUBLIC_KEYS", "trusted-public-keys");
  const req = flags.requireSigs !== undefined ? undefined : pick(undefined, "FERRY_REQUIRE_SIGS", "require-sigs");
  return Object.freeze({
    substituters: Object.freeze(subs ? words(subs[0]) : []),
    trustedPublicKeys: Object.freeze(keys ? parseKeys(keys[0], keys[1]) : []),
    requireSigs: flags.requireSigs ?? (req ? parseBool(req[0], req[1]) : true),
  });
}

/** Reading files a user names on the command line (key files, configs) with a coded error. */
import * as fs from "node:fs";
import { FerryError } from "../core/errors.js";
import { parseSecretKey, type SecretKey } from "../core/signing.js";

export function readText(file: string): string {
  try {
    return fs.readFileSync(file, "utf8");
  } catch (e) {
    throw new FerryError("FERRY_FILE_UNREADABLE", `cannot read '${file}': ${(e as Error).message}`);
  }
}

/** A secret key file (`ferry key generate`, `nix-store --generate-binary-cache-key`). */
export function readSecretKeyFile(file: string): SecretKey {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (e) {
    throw new FerryError("FERRY_KEY_UNREADABLE", `cannot read the secret key ${file}: ${(e as Error).message}`, {
      hint: "make one with `ferry key generate` and pass its path to --secret-key",
    });
  }
  return parseSecretKey(text);
}

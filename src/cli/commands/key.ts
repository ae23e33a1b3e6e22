/** `ferry key generate`: ed25519 signing keys in Nix's key-file format. */
import { Command, Option } from "commander";
import * as fs from "node:fs";
import { generateSecretKey, printPublicKey, printSecretKey } from "../../core/signing.js";
import { FerryError } from "../../core/errors.js";
import { writeFileAtomic } from "../../store/fs-util.js";
import { note } from "../output.js";

export function keyCommand(): Command {
  const cmd = new Command("key").description("manage signing keys (Nix key-file format)");
  cmd.addCommand(
    new Command("generate")
      .description("make a new ed25519 key pair called NAME (e.g. cache.example.org-1)")
      .argument("<name>")
      .addOption(new Option("--secret-file <file>", "where to write the secret key (mode 0600)").makeOptionMandatory())
      .addOption(new Option("--public-file <file>", "where to write the public key").makeOptionMandatory())
      .option("--force", "overwrite existing key files")
      .action((name: string, f: { secretFile: string; publicFile: string; force?: boolean }) => {
        for (const p of [f.secretFile, f.publicFile]) {
          if (!f.force && fs.existsSync(p)) {
            throw new FerryError("FERRY_KEY_EXISTS", `'${p}' already exists`, { hint: "pass --force to overwrite it, or choose another file" });
          }
        }
        const k = generateSecretKey(name);
        writeFileAtomic(f.secretFile, printSecretKey(k), 0o600);
        writeFileAtomic(f.publicFile, printPublicKey(k), 0o644);
        note(`wrote ${f.secretFile} and ${f.publicFile}; trust it with: ${printPublicKey(k)}`);
      }),
  );
  return cmd;
}

/** `ferry hash path|file|convert`: NAR and flat hashes, and conversions between encodings. */
import { Command, Option } from "commander";
import { parseHash, parseHashAlgo, printHash, type HashEncoding } from "../../core/hash.js";
import { hashFile } from "../../store/nar-dump.js";
import { out } from "../output.js";
import { encodingOf, hashPathLine, type EncFlags } from "./hash-path.js";

function withEncodingOptions(cmd: Command): Command {
  return cmd
    .option("--type <algo>", "hash algorithm: md5, sha1, sha256 or sha512", "sha256")
    .option("--base16", "print lowercase hexadecimal")
    .option("--base32", "print Nix's base-32")
    .option("--sri", "print SRI form algo-base64 (the default)");
}

export function hashCommand(): Command {
  const cmd = new Command("hash").description("compute and convert hashes the way Nix does");
  cmd.addCommand(
    withEncodingOptions(new Command("path"))
      .description("hash the NAR serialisation of PATH (what `nix-hash` and `nix hash path` print)")
      .argument("<path>")
      .action((path: string, f: EncFlags) => out(hashPathLine(path, f))),
  );
  cmd.addCommand(
    withEncodingOptions(new Command("file"))
      .description("hash the bytes of the regular file PATH (flat)")
      .argument("<path>")
      .action((path: string, f: EncFlags) => out(printHash(hashFile(path, parseHashAlgo(f.type)), encodingOf(f)))),
  );
  cmd.addCommand(
    new Command("convert")
      .description("print HASH in another encoding")
      .addOption(new Option("--to <encoding>", "target encoding").choices(["base16", "base32", "nix32", "base64", "sri"]).makeOptionMandatory())
      .option("--type <algo>", "algorithm of a bare HASH that does not name one")
      .argument("<hash>", "algo:digest, SRI (algo-base64), or a bare digest with --type")
      .action((hash: string, f: { to: string; type?: string }) => {
        const h = parseHash(hash, f.type ? parseHashAlgo(f.type) : undefined);
        const to = f.to === "base32" ? "nix32" : (f.to as HashEncoding);
        out(printHash(h, to));
      }),
  );
  return cmd;
}

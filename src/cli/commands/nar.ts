/** `ferry nar dump|restore`: NAR archives to and from standard streams. */
import { Command } from "commander";
import { dumpPath } from "../../store/nar-dump.js";
import { restoreNar } from "../../store/nar-restore.js";
import { writeAllSync } from "../../store/fs-util.js";

export function narCommand(): Command {
  const cmd = new Command("nar").description("write and unpack NAR archives (Nix's file-tree format)");
  cmd.addCommand(
    new Command("dump")
      .description("write the NAR of PATH to standard output (like `nix-store --dump`)")
      .argument("<path>")
      .action((path: string) => {
        dumpPath(path, (c) => writeAllSync(1, c));
      }),
  );
  cmd.addCommand(
    new Command("restore")
      .description("unpack a NAR from standard input into DIR, which must not exist (like `nix-store --restore`)")
      .option("--max-file-size <bytes>", "refuse files larger than this", (v) => Number(v))
      .argument("<dir>")
      .action(async (dir: string, f: { maxFileSize?: number }) => {
        await restoreNar(process.stdin, dir, f.maxFileSize ? { maxFileSize: f.maxFileSize } : {});
      }),
  );
  return cmd;
}

#!/usr/bin/env node
/**
 * The `ferry` command's entry point. A command that walks a tree (hashing, dumping or adding a
 * directory or a large file) starts the NAR walker thread before anything else loads, so the
 * thread boots while the CLI loads instead of after it; `ferry hash path` with plain arguments
 * runs without loading the rest of the CLI at all.
 */
import { lstatSync } from "node:fs";

const [command, sub] = process.argv.slice(2);
if (["hash path", "nar dump", "store add"].includes(`${command} ${sub}`)) {
  // The path is the last argument. A small file is hashed before the thread would be up.
  const st = lstatSync(process.argv.at(-1)!, { throwIfNoEntry: false });
  if (st && (st.isDirectory() || st.size >= 32 << 20)) (await import("../store/nar-dump.js")).prestartWalker();
}
const code = command === "hash" && sub === "path" ? (await import("./commands/hash-path.js")).runHashPath(process.argv.slice(4)) : undefined;
if (code === undefined) await import("./program.js");
else process.exitCode = code;

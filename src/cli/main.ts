#!/usr/bin/env node
/**
 * The `ferry` command's entry point. A command that walks a tree (hashing, dumping or adding a
 * path) starts the NAR walker thread before anything else loads, so the thread boots while the
 * rest of the CLI loads instead of after it.
 */
const WALKS = new Set(["hash path", "nar dump", "store add"]);
if (WALKS.has(`${process.argv[2]} ${process.argv[3]}`)) (await import("../store/nar-dump.js")).prestartWalker();
await import("./program.js");

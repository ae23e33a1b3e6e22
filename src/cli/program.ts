/**
 * The `ferry` command: parse, call, print. Every error goes through one handler.
 * Command modules load on demand: `ferry hash path` does not pay for SQLite or the builder.
 */
import { Command, CommanderError } from "commander";
import { printError } from "./output.js";

const COMMANDS: Record<string, () => Promise<Command>> = {
  hash: async () => (await import("./commands/hash.js")).hashCommand(),
  nar: async () => (await import("./commands/nar.js")).narCommand(),
  store: async () => (await import("./commands/store.js")).storeCommand(),
  key: async () => (await import("./commands/key.js")).keyCommand(),
  eval: async () => (await import("./commands/eval.js")).evalCommand(),
  derivation: async () => (await import("./commands/eval.js")).derivationCommand(),
  build: async () => (await import("./commands/build.js")).buildCommand(),
  log: async () => (await import("./commands/build.js")).logCommand(),
  copy: async () => (await import("./commands/copy.js")).copyCommand(),
  demo: async () => (await import("./commands/demo.js")).demoCommand(),
  cache: async () => (await import("./commands/cache.js")).cacheCommand(),
  farm: async () => (await import("./commands/farm.js")).farmCommand(),
  worker: async () => (await import("./commands/worker.js")).workerCommand(),
};

/** The program with the commands `argv` can reach (all of them for top-level help). */
export async function makeProgram(argv: readonly string[] = []): Promise<Command> {
  const program = new Command("ferry")
    .description("Ferry: reproducible builds on a farm of machines, shipped safely to fleets of devices.\nSpeaks Nix's formats: store paths, NAR, narinfo, signatures and export streams are byte-compatible with Nix 2.8.")
    .version("0.1.0")
    .showHelpAfterError("(run with --help for usage)")
    .exitOverride();
  const first = argv[2];
  // A command loads only itself; `--version` needs none; help and mistakes see them all.
  const names = first !== undefined && first in COMMANDS ? [first] : first === "--version" || first === "-V" ? [] : Object.keys(COMMANDS);
  for (const name of names) program.addCommand(await COMMANDS[name]!());
  const strict = (c: Command) => {
    c.exitOverride();
    c.allowExcessArguments(false);
    c.commands.forEach(strict);
  };
  strict(program);
  return program;
}

async function main(argv: string[]): Promise<number> {
  try {
    await (await makeProgram(argv)).parseAsync(argv);
    return typeof process.exitCode === "number" ? process.exitCode : 0;
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.exitCode === 0) return 0;
      return 2;
    }
    return printError(e);
  }
}

process.exitCode = await main(process.argv);

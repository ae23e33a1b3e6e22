#!/usr/bin/env node
/** The `ferry` command: parse, call, print. Every error goes through one handler. */
import { Command, CommanderError } from "commander";
import { hashCommand } from "./commands/hash.js";
import { narCommand } from "./commands/nar.js";
import { storeCommand } from "./commands/store.js";
import { keyCommand } from "./commands/key.js";
import { demoCommand } from "./commands/demo.js";
import { evalCommand, derivationCommand } from "./commands/eval.js";
import { buildCommand, logCommand } from "./commands/build.js";
import { printError } from "./output.js";

export function makeProgram(): Command {
  const program = new Command("ferry")
    .description("Ferry: reproducible builds on a farm of machines, shipped safely to fleets of devices.\nSpeaks Nix's formats: store paths, NAR, narinfo, signatures and export streams are byte-compatible with Nix 2.8.")
    .version("0.1.0")
    .showHelpAfterError("(run with --help for usage)")
    .exitOverride();
  for (const c of [hashCommand(), narCommand(), storeCommand(), keyCommand(), evalCommand(), derivationCommand(), buildCommand(), logCommand(), demoCommand()]) program.addCommand(c);
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
    await makeProgram().parseAsync(argv);
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

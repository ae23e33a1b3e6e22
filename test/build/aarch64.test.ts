/**
 * aarch64-linux derivations: built here when the kernel runs aarch64 programs (binfmt with
 * qemu-user, which the test command sets up), inside the sandbox; refused clearly otherwise.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { ferry } from "../helpers/cli.js";
import { tempDir } from "../helpers/fs-trees.js";
import { supportedSystems } from "../../src/build/systems.js";

describe("aarch64-linux builds", () => {
  let dir: string;
  before(() => {
    dir = tempDir("ferry-a64-");
    fs.writeFileSync(join(dir, "builder.c"), `#include <stdio.h>
#include <stdlib.h>
#include <sys/utsname.h>
int main(void) {
  struct utsname u;
  uname(&u);
  FILE *f = fopen(getenv("out"), "w");
  if (!f) return 1;
  fprintf(f, "built on %s\\n", u.machine);
  return fclose(f) != 0;
}
`);
    fs.writeFileSync(join(dir, "set.ts"), `
      import { runCommand, derivation, source } from "ferry";
      // A static aarch64 program, cross-compiled on this machine, used as a builder.
      export const armBuilder = runCommand("arm-builder", { src: source("./builder.c"), hostTools: ["aarch64-linux-gnu-gcc", "sh"] },
        "aarch64-linux-gnu-gcc -static -O2 -o $out $src");
      export const onArm = derivation({ name: "on-arm", system: "aarch64-linux", builder: armBuilder });
    `);
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  test("an aarch64-linux derivation runs its aarch64 builder in the sandbox when binfmt allows, else is refused", () => {
    const root = join(dir, "root");
    const r = ferry(["build", "--root", root, `${join(dir, "set.ts")}#onArm`]);
    if (supportedSystems().includes("aarch64-linux")) {
      assert.equal(r.status, 0, r.stderr);
      const out = r.stdout.toString().trim();
      assert.equal(fs.readFileSync(join(root, out), "utf8"), "built on aarch64\n");
    } else {
      assert.equal(r.status, 1);
      assert.match(r.stderr, /on-arm is for aarch64-linux, and this machine builds for x86_64-linux/);
      assert.match(r.stderr, /qemu-user-static/);
    }
  });
});

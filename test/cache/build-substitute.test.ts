/**
 * `ferry build` with binary caches configured: outputs a trusted cache has are substituted
 * (with their closures) instead of built; an untrusted cache is not used and the build runs.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { generateSecretKey, printPublicKey, printSecretKey } from "../../src/core/signing.js";
import { tempDir } from "../helpers/fs-trees.js";
import { ferry, ferryOk } from "../helpers/cli.js";
import * as net from "node:net";

const storeFlags = (root: string) => ["--store-dir", "/ferry/store", "--state-dir", "/ferry/var", "--root", root];

describe("ferry build with substituters", () => {
  let dir: string;
  before(() => {
    dir = tempDir("ferry-build-subst-");
    fs.writeFileSync(join(dir, "set.ts"), `
      import { derivation } from "ferry";
      export const base = derivation({ name: "base", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo base > $out"] });
      export const top = derivation({ name: "top", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $base > $out"], base });
      export const extra = derivation({ name: "extra", system: "x86_64-linux", builder: "/bin/sh", args: ["-c", "echo $top extra > $out"], top });
    `);
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  test("outputs in a trusted cache are substituted, the rest is built; a cache that is down is skipped", async () => {
    const key = generateSecretKey("build-cache-1");
    fs.writeFileSync(join(dir, "sk"), printSecretKey(key));
    const built = ferryOk(["build", ...storeFlags(join(dir, "a")), `${join(dir, "set.ts")}#top`]).trim();
    ferryOk(["copy", "--to", join(dir, "cache"), "--secret-key", join(dir, "sk"), ...storeFlags(join(dir, "a")), built]);
    // the build logs went along, under log/<drv>
    const logs = fs.readdirSync(join(dir, "cache", "log")).map((l) => l.replace(/^[0-9a-z]{32}-/, ""));
    assert.deepEqual(logs.sort(), ["base.drv", "top.drv"]);

    const run = (root: string, extra: string[], substituters = `file://${join(dir, "cache")}`) => {
      const r = ferry(["build", "--json", ...storeFlags(join(dir, root)), "--substituters", substituters, ...extra, `${join(dir, "set.ts")}#extra`]);
      assert.equal(r.status, 0, r.stderr);
      const lines = r.stdout.toString().trim().split("\n");
      return { stderr: r.stderr, events: lines.slice(0, -1).map((l) => JSON.parse(l) as { event: string; name?: string }) };
    };
    // a cache that is down comes first: it is skipped with a warning, not a failure
    const closedPort = await new Promise<number>((resolve) => {
      const srv = net.createServer().listen(0, "127.0.0.1", () => {
        const port = (srv.address() as net.AddressInfo).port;
        srv.close(() => resolve(port));
      });
    });
    const b = run("b", ["--trusted-public-keys", printPublicKey(key)], `http://127.0.0.1:${closedPort} file://${join(dir, "cache")}`);
    assert.match(b.stderr, new RegExp(`warning: not substituting from http://127\\.0\\.0\\.1:${closedPort}`));
    const events = b.events;
    const names = (kind: string) => events.filter((e) => e.event === kind).map((e) => e.name).sort();
    assert.deepEqual(names("substitute:finished"), ["top"]);
    assert.deepEqual(names("build:started"), ["extra"]);
    const info = JSON.parse(ferryOk(["store", "path-info", "--json", ...storeFlags(join(dir, "b")), built])) as unknown;
    assert.ok(JSON.stringify(info).includes(built));

    // an untrusted key: nothing is substituted, everything is built
    const other = run("c", ["--trusted-public-keys", printPublicKey(generateSecretKey("someone-else-1"))]).events;
    assert.deepEqual(other.filter((e) => e.event === "substitute:finished"), []);
    assert.deepEqual(other.filter((e) => e.event === "build:started").map((e) => e.name).sort(), ["base", "extra", "top"]);
  });
});

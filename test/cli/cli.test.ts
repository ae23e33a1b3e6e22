/** The `ferry` command as users and outside scripts call it: names, outputs, errors, help. */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { ferry, ferryOk, nixStoreFlags } from "../helpers/cli.js";
import { nix, nixChroot, haveNix } from "../helpers/nix.js";
import { tempDir, writeRandomTree } from "../helpers/fs-trees.js";
import { narOfTree } from "../../src/core/nar/tree.js";

describe("ferry CLI", () => {
  let dir: string;
  before(() => {
    dir = tempDir("ferry-cli-");
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  test("--help works on every command and subcommand", () => {
    const commandsOf = (args: string[]): string[] => {
      const text = ferryOk([...args, "--help"]);
      const section = text.split(/\nCommands:\n/)[1];
      if (!section) return [];
      return section.split("\n").map((l) => /^ {2}([a-z][a-z0-9-]*)/.exec(l)?.[1]).filter((x): x is string => !!x && x !== "help");
    };
    const seen: string[] = [];
    const visit = (args: string[]) => {
      for (const c of commandsOf(args)) {
        seen.push([...args, c].join(" "));
        visit([...args, c]);
      }
    };
    visit([]);
    for (const needed of ["hash path", "hash file", "hash convert", "nar dump", "nar restore", "store add", "store add-fixed", "store path-info", "store verify", "store gc", "store export", "store import", "store sign", "key generate"]) {
      assert.ok(seen.includes(needed), `ferry ${needed} exists`);
    }
  });

  test("hash path, hash file and hash convert print what Nix prints", { skip: !haveNix() }, () => {
    const t = join(dir, "h");
    writeRandomTree(t, 3);
    const f = join(dir, "flat.txt");
    fs.writeFileSync(f, "hello\n");
    assert.equal(ferryOk(["hash", "path", "--base16", t]).trim(), nix("nix-hash", ["--type", "sha256", t]).toString().trim());
    assert.equal(ferryOk(["hash", "path", t]).trim(), nix("nix", ["hash", "path", t]).toString().trim(), "SRI by default");
    assert.equal(ferryOk(["hash", "file", "--base32", f]).trim(), nix("nix-hash", ["--type", "sha256", "--flat", "--base32", f]).toString().trim());
    assert.equal(ferryOk(["hash", "file", "--type", "sha1", "--base16", f]).trim(), nix("nix-hash", ["--type", "sha1", "--flat", f]).toString().trim());
    const hex = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
    const n32 = nix("nix-hash", ["--type", "sha256", "--to-base32", hex]).toString().trim();
    assert.equal(ferryOk(["hash", "convert", "--to", "base32", `sha256:${hex}`]).trim(), n32);
    assert.equal(ferryOk(["hash", "convert", "--to", "base16", `sha256:${n32}`]).trim(), hex);
    const sri = ferryOk(["hash", "convert", "--to", "sri", "--type", "sha256", n32]).trim();
    assert.equal(sri, "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=");
    assert.equal(ferryOk(["hash", "convert", "--to", "base16", sri]).trim(), hex);
  });

  test("user errors print a stable code and a hint, exit 1, and never a stack trace", () => {
    const cases: [string[], string][] = [
      [["hash", "convert", "--to", "base16", "sha256:not-a-hash"], "FERRY_HASH_BAD_LENGTH"],
      [["hash", "convert", "--to", "base16", "deadbeef"], "FERRY_HASH_NO_ALGO"],
      [["hash", "path", join(dir, "does-not-exist")], "FERRY_PATH_UNREADABLE"],
      [["hash", "path", "--base16", "--base32", "/etc/hostname"], "FERRY_CLI_CONFLICT"],
      [["store", "path-info", "--root", join(dir, "r-err"), "/tmp/not-a-store-path"], "FERRY_STORE_BAD_PATH"],
      [["store", "path-info", "--root", join(dir, "r-err"), "/ferry/store/00000000000000000000000000000000-x"], "FERRY_STORE_NOT_VALID"],
      [["store", "add", "--root", join(dir, "r-err"), "--name", "has space", "/etc/hostname"], "FERRY_STORE_BAD_NAME"],
      [["store", "verify", "--repair", "--root", join(dir, "r-err")], "FERRY_STORE_REPAIR_UNAVAILABLE"],
      [["store", "add", "--store-dir", "relative/store", "/etc/hostname"], "FERRY_STORE_BAD_DIR"],
    ];
    for (const [args, code] of cases) {
      const r = ferry(args);
      assert.equal(r.status, 1, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, new RegExp(`^error \\[${code}\\]: `), args.join(" "));
      assert.match(r.stderr, /\n {2}hint: /, `${args.join(" ")} has a hint`);
      assert.doesNotMatch(r.stderr, /at .*\.js:\d+/, "no stack trace");
    }
    // Usage errors exit 2 with commander's message, also for `hash path`, which plain arguments
    // take past the full parser.
    for (const args of [["store", "add"], ["hash", "path"], ["hash", "path", "--bogus", "/etc/hostname"], ["hash", "path", "/etc/hostname", "/etc/hosts"], ["hash", "path", "--type"]]) {
      const usage = ferry(args);
      assert.equal(usage.status, 2, `${args.join(" ")}: usage errors exit 2`);
      assert.match(usage.stderr, /^error: /, args.join(" "));
    }
    assert.equal(ferryOk(["hash", "path", "--type=sha1", "--base16", "/etc/hostname"]).trim(), ferryOk(["hash", "path", "--base16", "/etc/hostname", "--type", "sha1"]).trim());
  });

  test("store options come from flags or environment variables", () => {
    const root = join(dir, "env-root");
    const f = join(dir, "env-file");
    fs.writeFileSync(f, "env\n");
    const viaEnv = ferryOk(["store", "add", f], { env: { FERRY_ROOT: root, FERRY_STORE_DIR: "/nix/store", FERRY_STATE_DIR: "/nix/var" } }).trim();
    assert.ok(viaEnv.startsWith("/nix/store/"));
    assert.ok(fs.existsSync(join(root, viaEnv)));
    assert.equal(ferryOk(["store", "path-info", ...nixStoreFlags(root), viaEnv]).split("\t")[0], viaEnv);
  });

  test("key generate + store sign make signatures Nix makes too (ed25519 is deterministic)", { skip: !haveNix() }, () => {
    const sk = join(dir, "k.sec");
    const pk = join(dir, "k.pub");
    ferryOk(["key", "generate", "cli-test-1", "--secret-file", sk, "--public-file", pk]);
    assert.equal(fs.statSync(sk).mode & 0o777, 0o600);
    assert.match(fs.readFileSync(pk, "utf8"), /^cli-test-1:[A-Za-z0-9+/]{43}=$/);
    const again = ferry(["key", "generate", "cli-test-1", "--secret-file", sk, "--public-file", pk]);
    assert.match(again.stderr, /FERRY_KEY_EXISTS/);
    const src = join(dir, "to-sign");
    writeRandomTree(src, 8);
    const root = join(dir, "sign-root");
    const p = ferryOk(["store", "add", ...nixStoreFlags(root), src]).trim();
    ferryOk(["store", "sign", ...nixStoreFlags(root), "--secret-key", sk, p]);
    const ours = JSON.parse(ferryOk(["store", "path-info", "--json", ...nixStoreFlags(root), p]))[0].signatures as string[];
    const nixRoot = nixChroot(dir);
    nix("nix-store", ["--store", nixRoot, "--add", src]);
    nix("nix", ["--store", nixRoot, "store", "sign", "--key-file", sk, p]);
    const theirs = JSON.parse(nix("nix", ["--store", nixRoot, "path-info", "--json", p]).toString())[0].signatures as string[];
    assert.deepEqual(ours, theirs);
    // and Nix accepts the key file Ferry wrote for verification
    nix("nix", ["--store", nixRoot, "store", "verify", "--trusted-public-keys", fs.readFileSync(pk, "utf8"), "--sigs-needed", "1", p]);
  });

  test("nar dump | nar restore round-trips; a bad or hostile NAR leaves nothing behind", () => {
    const src = join(dir, "rt");
    writeRandomTree(src, 17, { largeFileChance: 0.2 });
    fs.writeFileSync(join(src, "big-enough"), Buffer.alloc(3 << 20, 7));
    const nar = ferry(["nar", "dump", src]).stdout;
    const dest = join(dir, "rt-out");
    ferryOk(["nar", "restore", dest], { input: nar });
    assert.ok(ferry(["nar", "dump", dest]).stdout.equals(nar));
    const again = ferry(["nar", "restore", dest], { input: nar });
    assert.match(again.stderr, /FERRY_RESTORE_EXISTS/);

    const parent = join(dir, "hostile");
    fs.mkdirSync(parent);
    const hostile = narWithEntry("..");
    const r = ferry(["nar", "restore", join(parent, "out")], { input: hostile });
    assert.equal(r.status, 1);
    assert.match(r.stderr, /FERRY_NAR_INVALID.*byte \d+/);
    assert.deepEqual(fs.readdirSync(parent), [], "nothing written, no temporary left");
    const truncated = ferry(["nar", "restore", join(parent, "out")], { input: nar.subarray(0, Math.floor(nar.length / 2)) });
    assert.match(truncated.stderr, /FERRY_NAR_INVALID.*truncated/);
    assert.deepEqual(fs.readdirSync(parent), []);
    const big = ferry(["nar", "restore", "--max-file-size", "100", join(parent, "out")], { input: nar });
    assert.match(big.stderr, /over the limit/);
    assert.deepEqual(fs.readdirSync(parent), []);
  });
});

/** A NAR of a directory with one entry whose name bypasses the writer's checks. */
function narWithEntry(name: string): Buffer {
  const good = Buffer.from(narOfTree({ type: "directory", entries: { xx: { type: "regular", executable: false, contents: new Uint8Array([1]) } } }));
  const at = good.indexOf(Buffer.from("xx"));
  const bad = Buffer.from(good);
  bad.write(name.padEnd(2, "\0").slice(0, 2), at, "latin1");
  return bad;
}

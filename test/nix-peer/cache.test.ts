/**
 * Binary caches with real Nix 2.8 as the peer: Ferry substitutes from caches that
 * `nix copy --to file://` wrote (Nix's signatures, xz and zstd NARs), and refuses them under
 * the wrong key; Nix reads a `ferry cache serve` cache that `ferry copy --to` filled, checking
 * the server's signature.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { LocalStore } from "../../src/store/local-store.js";
import { resolveStoreLocation } from "../../src/store/config.js";
import { tempDir } from "../helpers/fs-trees.js";
import { ferry, ferryOk, nixStoreFlags } from "../helpers/cli.js";
import { nix, nixChroot } from "../helpers/nix.js";
import { addObject } from "../helpers/store-objects.js";
import { spawnCacheServer } from "../helpers/cache.js";
import { startS3Server } from "../helpers/s3-server.js";
import { spawnSync } from "node:child_process";
import { nixEnv } from "../helpers/nix.js";
import { generateSecretKey, printPublicKey, printSecretKey, publicKeyOf } from "../../src/core/signing.js";

const openNixLayout = (root: string) => LocalStore.open(resolveStoreLocation({ storeDir: "/nix/store", stateDir: "/nix/var", root }, {}));

describe("binary caches with Nix as the peer", () => {
  let dir: string;
  let nixRoot: string;
  let nixPub: string;
  let paths: { base: string; mid: string; top: string; src: string };

  before(() => {
    dir = tempDir("ferry-nixcache-");
    nixRoot = nixChroot(dir);
    nix("nix-store", ["--generate-binary-cache-key", "nix-peer-cache-1", join(dir, "nix.sk"), join(dir, "nix.pk")]);
    nixPub = fs.readFileSync(join(dir, "nix.pk"), "utf8").trim();
    // An input-addressed closure made by Ferry, imported into Nix's store, plus a source path.
    const f = openNixLayout(join(dir, "ferry-src"));
    try {
      const base = addObject(f, "base", { "lib.a": Buffer.alloc(100_000, 3) });
      const mid = addObject(f, "mid", { bin: "uses @REFS@" }, [base]);
      const top = addObject(f, "top", { bin: "uses @REFS@" }, [mid, base]);
      const chunks: Uint8Array[] = [];
      f.exportPaths([base, mid, top], (c) => chunks.push(new Uint8Array(c)));
      nix("nix-store", ["--store", nixRoot, "--import"], Buffer.concat(chunks));
      fs.mkdirSync(join(dir, "srcdir"));
      fs.writeFileSync(join(dir, "srcdir", "hello.c"), "int main(void) { return 0; }\n");
      const src = nix("nix-store", ["--store", nixRoot, "--add", join(dir, "srcdir")]).toString().trim();
      paths = { base, mid, top, src };
    } finally {
      f.close();
    }
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  for (const compression of ["xz", "zstd"]) {
    test(`Ferry substitutes from a cache nix copy wrote (${compression}), checking Nix's signatures`, () => {
      const cache = join(dir, `nix-cache-${compression}`);
      nix("nix", ["copy", "--from", nixRoot, "--to", `file://${cache}?secret-key=${join(dir, "nix.sk")}&compression=${compression}`, paths.top, paths.src]);
      const root = join(dir, `ferry-from-nix-${compression}`);
      const outText = ferryOk(["copy", "--from", `file://${cache}`, "--trusted-public-keys", nixPub, "--json", ...nixStoreFlags(root), paths.top, paths.src]);
      const results = (JSON.parse(outText) as { results: { status: string; path: string }[] }).results;
      assert.deepEqual(results.filter((r) => r.status !== "ok"), []);
      assert.equal(results.length, 4);
      const s = openNixLayout(root);
      try {
        for (const p of Object.values(paths)) assert.ok(s.isValid(p), p);
        assert.deepEqual(s.verify().filter((v) => v.status !== "ok"), []);
        assert.deepEqual([...s.queryPathInfo(paths.top)!.references].sort(), [paths.base, paths.mid].sort());
        assert.ok(s.queryPathInfo(paths.top)!.sigs.some((sig) => sig.startsWith("nix-peer-cache-1:")));
      } finally {
        s.close();
      }
      // Nix's own view of the same paths agrees with what Ferry registered
      const theirs = JSON.parse(nix("nix", ["--store", nixRoot, "path-info", "--json", paths.top]).toString())[0] as { narHash: string; narSize: number };
      const ours = JSON.parse(ferryOk(["store", "path-info", "--json", ...nixStoreFlags(root), paths.top])) as unknown;
      assert.ok(JSON.stringify(ours).includes(String(theirs.narSize)));
    });
  }

  test("a cache signed by a key Ferry does not trust is refused for input-addressed paths only", () => {
    const cache = join(dir, "nix-cache-xz");
    const root = join(dir, "ferry-wrong-key");
    const other = "someone-else-1:" + Buffer.alloc(32, 9).toString("base64");
    const r = ferry(["copy", "--from", `file://${cache}`, "--trusted-public-keys", other, ...nixStoreFlags(root), paths.top]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /signed by nix-peer-cache-1/);
    // the source path is content-addressed: its hash vouches for it, whatever the signature
    ferryOk(["copy", "--from", `file://${cache}`, "--trusted-public-keys", other, ...nixStoreFlags(root), paths.src]);
    const s = openNixLayout(root);
    try {
      assert.equal(s.isValid(paths.top), false);
      assert.equal(s.isValid(paths.src), true);
    } finally {
      s.close();
    }
  });

  for (const backend of ["dir", "s3"] as const) test(`Nix copies a closure from a Ferry cache server (${backend}), trusting only Ferry's key; nix path-info reads it`, async () => {
    const key = generateSecretKey("ferry-peer-cache-1");
    fs.writeFileSync(join(dir, "ferry.sk"), printSecretKey(key));
    const ferryPub = printPublicKey(publicKeyOf(key));
    // the Ferry side: the closure, plus a content-addressed path, uploaded over HTTP with a token
    const froot = join(dir, "ferry-src");
    const caPath = ferryOk(["store", "add", ...nixStoreFlags(froot), join(dir, "srcdir")]).trim();
    const s3 = backend === "s3" ? await startS3Server({ buckets: ["peer"] }) : undefined;
    const where = s3 ? ["--s3", s3.url("peer", "cache")] : ["--dir", join(dir, "served")];
    const server = await spawnCacheServer([...where, "--secret-key", join(dir, "ferry.sk"), "--store-dir", "/nix/store"], { FERRY_UPLOAD_TOKEN: "s3cret", ...s3?.env });
    try {
      ferryOk(["copy", "--to", server.url, "--token", "s3cret", ...nixStoreFlags(froot), paths.top, caPath]);
      const run = (args: string[]) => spawnSync("nix", args, { env: nixEnv(), encoding: "utf8" });
      // Nix, signatures required, trusting Ferry's key: the whole closure arrives intact
      const good = nixChroot(dir);
      const ok = run(["copy", "--from", server.url, "--to", good, "--option", "trusted-public-keys", ferryPub, paths.top]);
      assert.equal(ok.status, 0, ok.stderr);
      for (const p of [paths.base, paths.mid, paths.top]) assert.equal(nix("nix-store", ["--store", good, "--verify-path", p]).toString(), "");
      assert.deepEqual(nix("nix-store", ["--store", good, "-q", "--references", paths.top]).toString().trim().split("\n").sort(), [paths.base, paths.mid].sort());
      // trusting another key: Nix refuses the input-addressed path, but takes the content-addressed one
      const other = "someone-else-1:" + Buffer.alloc(32, 9).toString("base64");
      const bad = nixChroot(dir);
      const refused = run(["copy", "--from", server.url, "--to", bad, "--option", "trusted-public-keys", other, paths.top]);
      assert.notEqual(refused.status, 0);
      assert.match(refused.stderr, /lacks a valid signature/);
      const ca = run(["copy", "--from", server.url, "--to", bad, "--option", "trusted-public-keys", other, caPath]);
      assert.equal(ca.status, 0, ca.stderr);
      // nix path-info reads the narinfo as Ferry's store describes the path
      const info = (JSON.parse(nix("nix", ["path-info", "--store", server.url, "--json", paths.top]).toString()) as { path: string; narHash: string; narSize: number; references: string[]; signatures: string[] }[])[0]!;
      const ours = (JSON.parse(ferryOk(["store", "path-info", "--json", ...nixStoreFlags(froot), paths.top])) as { narHash: string; narSize: number }[])[0]!;
      assert.equal(info.path, paths.top);
      assert.equal(info.narSize, ours.narSize);
      assert.deepEqual([...info.references].sort(), [paths.base, paths.mid].sort());
      assert.ok(info.signatures.some((sig) => sig.startsWith("ferry-peer-cache-1:")));
    } finally {
      server.child.kill("SIGTERM");
      await s3?.stop();
    }
  });
});

/** Cache GC: the plan as a value, applied to a directory cache, and the `ferry cache` commands. */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { FileBackend } from "../../src/cache/file-backend.js";
import { applyCacheGc, collectCacheGarbage, planCacheGc, readCacheGcPlan, type NarInfoLinks } from "../../src/cache/gc.js";
import type { ObjectInfo } from "../../src/cache/backend.js";
import { tempDir } from "../helpers/fs-trees.js";
import { ferry, ferryOk } from "../helpers/cli.js";
import { makeNarFixture, narInfoText, type NarFixture } from "../helpers/cache.js";

const H = 3_600_000;
const D = 24 * H;
const NOW = 1_000 * D;

/** A made-up hash part from a letter (valid nix32). */
const hp = (c: string) => c.repeat(32);
const sp = (c: string) => `/nix/store/${hp(c)}-${c}`;
const nar = (c: string) => `nar/${c.repeat(52)}.nar.zst`;

describe("cache GC plan", () => {
  // a → b → c (a chain), d alone, h recent → f
  const links: Record<string, NarInfoLinks> = {
    a: { storePath: sp("a"), url: nar("a"), references: [`${hp("b")}-b`] },
    b: { storePath: sp("b"), url: nar("b"), references: [`${hp("c")}-c`, `${hp("b")}-b`] },
    c: { storePath: sp("c"), url: nar("c"), references: [`${hp("x")}-x`] },
    d: { storePath: sp("d"), url: nar("d"), references: [] },
    h: { storePath: sp("h"), url: nar("h"), references: [`${hp("f")}-f`] },
    f: { storePath: sp("f"), url: nar("f"), references: [] },
  };
  const obj = (key: string, ageMs: number, size = 100): ObjectInfo => ({ key, size, etag: `"${key}"`, mtimeMs: NOW - ageMs });
  const objects: ObjectInfo[] = [
    ...["a", "b", "c", "d", "f"].flatMap((c) => [obj(`${hp(c)}.narinfo`, 30 * D), obj(nar(c), 30 * D, 1000)]),
    obj(`${hp("h")}.narinfo`, 2 * H),
    obj(nar("h"), 30 * D, 1000),
    obj(`${hp("d")}.ls`, 30 * D),
    obj(`${hp("a")}.ls`, 30 * D),
    obj(`${hp("z")}.ls`, 10 * 60_000),
    obj(nar("y"), 10 * 60_000, 1000),
    obj(nar("w"), 2 * H, 1000),
    obj("nix-cache-info", 90 * D),
    obj("roots/release-1", 30 * D),
    obj(`log/${hp("a")}-a.drv`, 90 * D),
  ];
  const narInfos = new Map(Object.entries(links).map(([c, l]) => [`${hp(c)}.narinfo`, l]));
  const plan = planCacheGc({ objects, narInfos, roots: new Map([["release-1", [sp("a")]]]), now: NOW, keepRecentMs: D, graceMs: H });

  test("keeps the roots' closure, recent narinfos' closures, their NARs and young NARs", () => {
    const deleted = plan.delete.map((i) => i.key);
    assert.deepEqual(deleted, [`${hp("d")}.ls`, `${hp("d")}.narinfo`, nar("d"), nar("w")]);
    assert.deepEqual(plan.kept, { narInfos: 5, nars: 6, other: 3, bytes: 5 * 100 + 6 * 1000 + 100 + 100 });
    assert.deepEqual(plan.missing, [`${hp("x")}.narinfo`], "c's reference x has no narinfo");
    assert.equal(plan.deleteBytes, 100 + 100 + 1000 + 1000);
  });

  test("narinfos and listings come before every NAR; a NAR a kept narinfo points at is never planned", () => {
    const firstNar = plan.delete.findIndex((i) => i.kind === "nar");
    assert.ok(plan.delete.slice(firstNar).every((i) => i.kind === "nar"));
    for (const c of ["a", "b", "c", "h", "f"]) assert.ok(!plan.delete.some((i) => i.key === nar(c)), c);
  });

  test("with no roots and nothing recent, everything but young NARs and non-GC objects goes", () => {
    const p = planCacheGc({ objects, narInfos, roots: new Map(), now: NOW + 10 * D, keepRecentMs: D, graceMs: H });
    assert.equal(p.kept.narInfos, 0);
    assert.equal(p.kept.other, 3);
    assert.equal(p.delete.filter((i) => i.kind === "narinfo").length, 6);
  });
});

describe("cache GC on a directory", () => {
  let dir: string;
  before(() => {
    dir = tempDir("ferry-cache-gc-");
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  const put = (root: string, f: NarFixture, ageMs: number) => {
    for (const [key, body] of [
      [f.narKey, f.file],
      [f.narInfoKey, narInfoText(f)],
    ] as const) {
      const p = join(root, key);
      fs.mkdirSync(join(p, ".."), { recursive: true });
      fs.writeFileSync(p, body);
      const t = (Date.now() - ageMs) / 1000;
      fs.utimesSync(p, t, t);
    }
  };

  test("applies the plan: narinfos first, per-item results, a narinfo written meanwhile spares its NAR", async () => {
    const root = join(dir, "apply");
    const backend = FileBackend.open(root);
    const dep = await makeNarFixture({ name: "dep" });
    const kept = await makeNarFixture({ name: "kept", references: [dep.storePath] });
    const old = await makeNarFixture({ name: "old" });
    const revived = await makeNarFixture({ name: "revived" });
    for (const f of [dep, kept, old, revived]) put(root, f, 30 * D);
    fs.mkdirSync(join(root, "roots"));
    fs.writeFileSync(join(root, "roots", "release"), `# a release\n${kept.storePath}\n`);

    const plan = await readCacheGcPlan(backend, { keepRecentMs: 7 * D, graceMs: H });
    assert.deepEqual(plan.delete.map((i) => i.key).sort(), [old.narInfoKey, old.narKey, revived.narInfoKey, revived.narKey].sort());
    // After the listing, someone uploads a narinfo for a NAR the cache already had (as `nix copy` does),
    // under another store path (its hash part differs in the first character, whatever that is).
    const otherHashPart = (revived.hashPart.startsWith("0") ? "1" : "0") + revived.hashPart.slice(1);
    fs.writeFileSync(join(root, `${otherHashPart}.narinfo`), narInfoText({ ...revived, storePath: revived.storePath.replace(revived.hashPart, otherHashPart) }));
    const results = await applyCacheGc(backend, plan);
    const status = new Map(results.map((r) => [r.key, r.status]));
    assert.equal(status.get(old.narInfoKey), "deleted");
    assert.equal(status.get(old.narKey), "deleted");
    assert.equal(status.get(revived.narInfoKey), "deleted");
    assert.equal(status.get(revived.narKey), "spared");
    for (const f of [dep, kept]) {
      assert.ok(fs.existsSync(join(root, f.narInfoKey)) && fs.existsSync(join(root, f.narKey)));
    }
    assert.ok(fs.existsSync(join(root, revived.narKey)));
    assert.ok(!fs.existsSync(join(root, old.narKey)));

    const again = await collectCacheGarbage(backend, { keepRecentMs: 7 * D, graceMs: H });
    assert.equal(again.deleted, 0, "nothing more to collect");
  });

  test("ferry cache pin, gc --dry-run --json, gc and unpin", async () => {
    const root = join(dir, "cli");
    const a = await makeNarFixture({ name: "a" });
    const b = await makeNarFixture({ name: "b" });
    put(root, a, 30 * D);
    put(root, b, 30 * D);
    fs.writeFileSync(join(root, "nix-cache-info"), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n");
    ferryOk(["cache", "pin", "--dir", root, "rel-1", a.storePath]);
    assert.equal(fs.readFileSync(join(root, "roots", "rel-1"), "utf8"), `${a.storePath}\n`);
    const dry = JSON.parse(ferryOk(["cache", "gc", "--dir", root, "--dry-run", "--json"])) as { dryRun: boolean; planned: number; items: { key: string }[] };
    assert.equal(dry.dryRun, true);
    assert.deepEqual(dry.items.map((i) => i.key).sort(), [b.narInfoKey, b.narKey].sort());
    assert.ok(fs.existsSync(join(root, b.narKey)), "a dry run deletes nothing");
    const r = ferry(["cache", "gc", "--dir", root, "--keep-recent", "1d"]);
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(r.stdout.toString().trim().split("\n"), [b.narInfoKey, b.narKey]);
    assert.match(r.stderr, /deleted 2 objects .*kept 1 narinfos and 1 NARs/);
    ferryOk(["cache", "unpin", "--dir", root, "rel-1"]);
    assert.ok(!fs.existsSync(join(root, "roots", "rel-1")));
    const errors: [string[], string][] = [
      [["cache", "unpin", "--dir", root, "rel-1"], "FERRY_CACHE_NO_ROOT"],
      [["cache", "pin", "--dir", root, "../x", a.storePath], "FERRY_CACHE_BAD_ROOT_NAME"],
      [["cache", "pin", "--dir", root, "--store-dir", "/ferry/store", "x", a.storePath], "FERRY_CACHE_STORE_DIR_MISMATCH"],
      [["cache", "gc", "--dir", root, "--grace", "soon"], "FERRY_CACHE_BAD_DURATION"],
      [["cache", "gc"], "FERRY_CACHE_NO_BACKEND"],
      [["cache", "serve", "--dir", root, "--listen", "nowhere"], "FERRY_CACHE_BAD_LISTEN"],
      [["cache", "serve", "--dir", root, "--listen", "127.0.0.1:0", "--max-upload-size", "lots"], "FERRY_CACHE_BAD_SIZE"],
    ];
    for (const [args, code] of errors) {
      const e = ferry(args);
      assert.equal(e.status, 1, `${args.join(" ")}: ${e.stderr}`);
      assert.match(e.stderr, new RegExp(`^error \\[${code}\\]: .*\\n {2}hint: `), args.join(" "));
    }
  });
});

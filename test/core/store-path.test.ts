import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { digestOf, sha256, type HashAlgo } from "../../src/core/digest.js";
import { compressHash, makeHash, parseHash, toBase16, toNix32, printHash, type Hash } from "../../src/core/hash.js";
import { narOfTree } from "../../src/core/nar/tree.js";
import {
  baseName,
  checkName,
  checkNewName,
  invalidNameReason,
  makeFixedOutputPath,
  makeOutputPath,
  makeSourcePath,
  makeStorePath,
  makeTextPath,
  outputPathOfHex,
  parseBaseName,
  parseContentAddress,
  parseStorePath,
  pathOfContentAddress,
  printContentAddress,
  textPathOfHex,
  printStorePath,
  type ContentAddress,
  type StorePath,
} from "../../src/core/store-path.js";
import { throwsFerry } from "../helpers/errors.js";
import { loadVectors, narTreeOf, type VectorTree } from "../helpers/vectors.js";

interface StorePathVector {
  name: string;
  store_dir: string;
  method: "source" | "recursive" | "flat" | "text";
  algo?: HashAlgo;
  tree?: VectorTree;
  contents_utf8?: string;
  references?: string[];
  content_hash?: { algo: HashAlgo; hex: string; nix32: string; over: string };
  store_path?: string;
  nix_path_info?: { narHash: string; narSize: number; references: string[]; ca: string };
  derived?: { fingerprint: string; inner_fixed_string?: string };
  expect_error?: boolean;
  nix_error?: string;
}

const file = loadVectors<StorePathVector>("store-paths.json");
const enc = new TextEncoder();

/** What Nix hashed and stored for a vector: the content hash, the path, the stored object's NAR, and its CA. */
function compute(v: StorePathVector): { contentHash: Hash; path: StorePath; nar: Uint8Array; ca: ContentAddress } {
  switch (v.method) {
    case "source": {
      const nar = narOfTree(narTreeOf(v.tree!));
      const h = makeHash("sha256", sha256(nar));
      return { contentHash: h, path: makeSourcePath(v.store_dir, v.name, h), nar, ca: { kind: "fixed", method: "recursive", hash: h } };
    }
    case "recursive": {
      const nar = narOfTree(narTreeOf(v.tree!));
      const h = makeHash(v.algo!, digestOf(v.algo!, nar));
      return { contentHash: h, path: makeFixedOutputPath(v.store_dir, v.name, "recursive", h), nar, ca: { kind: "fixed", method: "recursive", hash: h } };
    }
    case "flat": {
      const tree = narTreeOf(v.tree!);
      assert.equal(tree.type, "regular", "flat ingestion reads a regular file");
      if (tree.type !== "regular") throw new Error("unreachable");
      const h = makeHash(v.algo!, digestOf(v.algo!, tree.contents));
      // the stored object keeps the executable bit (SPEC §3.4), so its NAR is the tree's NAR
      return { contentHash: h, path: makeFixedOutputPath(v.store_dir, v.name, "flat", h), nar: narOfTree(tree), ca: { kind: "fixed", method: "flat", hash: h } };
    }
    case "text": {
      const contents = enc.encode(v.contents_utf8!);
      const h = makeHash("sha256", sha256(contents));
      return {
        contentHash: h,
        path: makeTextPath(v.store_dir, v.name, h, v.references ?? []),
        nar: narOfTree({ type: "regular", executable: false, contents }),
        ca: { kind: "text", hash: h },
      };
    }
  }
}

describe("store-paths.json vectors", () => {
  for (const v of file.vectors.filter((x) => !x.expect_error)) {
    test(`${v.method}${v.algo ? ` ${v.algo}` : ""} ${v.name} in ${v.store_dir}`, () => {
      const { contentHash, path, nar, ca } = compute(v);
      assert.equal(printStorePath(path), v.store_path);
      assert.equal(toBase16(contentHash.digest), v.content_hash!.hex);
      assert.equal(toNix32(contentHash.digest), v.content_hash!.nix32);
      assert.equal(contentHash.algo, v.content_hash!.algo);

      // the fingerprint Nix hashed gives the path's hash part
      const fp = v.derived!.fingerprint;
      assert.equal(toNix32(compressHash(sha256(fp), 20)), path.hashPart);
      assert.ok(fp.endsWith(`:${v.store_dir}:${v.name}`));
      if (v.derived!.inner_fixed_string !== undefined) {
        assert.equal(v.derived!.inner_fixed_string, `fixed:out:${v.method === "recursive" ? "r:" : ""}${contentHash.algo}:${toBase16(contentHash.digest)}:`);
        assert.equal(fp, `output:out:sha256:${toBase16(sha256(v.derived!.inner_fixed_string))}:${v.store_dir}:${v.name}`);
      }

      // what `nix path-info --json` said about the stored object
      const info = v.nix_path_info!;
      assert.equal(printHash(makeHash("sha256", sha256(nar)), "sri"), info.narHash);
      assert.equal(nar.length, info.narSize);
      assert.deepEqual(info.references, [...(v.references ?? [])].sort());
      assert.equal(printContentAddress(ca), info.ca);

      // the CA string leads back to the same path
      const parsedCa = parseContentAddress(info.ca, (s) => parseHash(s));
      assert.deepEqual(parsedCa, ca);
      assert.equal(printStorePath(pathOfContentAddress(v.store_dir, v.name, parsedCa, info.references, v.store_path)), v.store_path);

      // and the printed path parses back
      const parsed = parseStorePath(v.store_dir, v.store_path!);
      assert.deepEqual(parsed, path);
      assert.deepEqual(parseBaseName(v.store_dir, baseName(path)), path);
    });
  }

  test("recursive sha256 is the same path as source (`--add-fixed --recursive sha256` = `--add`)", () => {
    const rec = file.vectors.filter((v) => v.method === "recursive" && v.algo === "sha256");
    assert.ok(rec.length > 0);
    for (const r of rec) {
      const src = file.vectors.find((v) => v.method === "source" && v.name === r.name && v.store_dir === r.store_dir);
      if (src) assert.equal(src.store_path, r.store_path);
    }
  });

  const errors = file.vectors.filter((x) => x.expect_error);
  test("every rejected case is accounted for", () => {
    const kinds = [...new Set(errors.map((v) => `${v.method}:${v.name}`))].sort();
    assert.deepEqual(kinds, ["flat:symlink-rel", "flat:unicode-tree", "source:dir-ü"]);
  });

  test("rejected: a name with a non-ASCII character (dir-ü)", () => {
    const cases = errors.filter((x) => x.name === "dir-ü");
    assert.ok(cases.length > 0);
    for (const v of cases) {
      assert.match(v.nix_error!, /illegal character/);
      throwsFerry(() => checkName(v.name), "FERRY_STORE_BAD_NAME", /illegal character "ü"/);
      const h = makeHash("sha256", sha256(narOfTree(narTreeOf(v.tree!))));
      throwsFerry(() => makeSourcePath(v.store_dir, v.name, h), "FERRY_STORE_BAD_NAME");
      throwsFerry(() => makeStorePath(v.store_dir, "source", h.digest, v.name), "FERRY_STORE_BAD_NAME");
      throwsFerry(() => parseStorePath(v.store_dir, `${v.store_dir}/x4jw7xziqd731sbw0ryc4zp1zidq5sf7-${v.name}`), "FERRY_STORE_BAD_PATH", /illegal character/);
    }
  });

  test("rejected: flat ingestion of a directory or a symlink (an ingestion error, not a name error)", () => {
    // Nix reads the file to hash it flat: a directory fails to read, a symlink is followed (to
    // nothing here). The names are valid; core has no flat hash of anything but a regular file.
    for (const v of errors.filter((x) => x.method === "flat")) {
      const name = v.name;
      assert.equal(v.method, "flat");
      assert.notEqual(v.tree!.type, "regular");
      assert.match(v.nix_error!, name === "unicode-tree" ? /Is a directory/ : /No such file/);
      assert.equal(checkName(v.name), v.name);
    }
  });
});

describe("store path names", () => {
  test("Nix 2.8's rule: 1-211 characters of [A-Za-z0-9+-._?=]; a leading '.' is accepted", () => {
    for (const ok of ["a", "hello-2.0", "+-._?=", "A".repeat(211), ".hidden", "..x"]) assert.equal(invalidNameReason(ok), undefined, ok);
    throwsFerry(() => checkName(""), "FERRY_STORE_BAD_NAME", /empty/);
    throwsFerry(() => checkName("a".repeat(212)), "FERRY_STORE_BAD_NAME", /212 characters/);
    for (const bad of ["a b", "a/b", "a:b", "ü", "😀", "a\nb", "a\0b", "~", "a*"]) throwsFerry(() => checkName(bad), "FERRY_STORE_BAD_NAME", /illegal character/);
    throwsFerry(() => checkName("x😀"), "FERRY_STORE_BAD_NAME", /"😀"/);
  });

  test("names for new objects never start with '.'", () => {
    throwsFerry(() => checkNewName(".hidden"), "FERRY_STORE_BAD_NAME", /starts with '\.'/);
    throwsFerry(() => checkNewName("a b"), "FERRY_STORE_BAD_NAME", /illegal/);
    assert.equal(checkNewName("a.b"), "a.b");
  });

  test("parseStorePath rejects other store dirs, subpaths, bad hash parts", () => {
    const p = "/nix/store/ij3gw72f4n5z4dz6nnzl1731p9kmjbwr-empty-file";
    throwsFerry(() => parseStorePath("/ferry/store", p), "FERRY_STORE_BAD_PATH", /not inside/);
    throwsFerry(() => parseStorePath("/nix/store", p + "/bin"), "FERRY_STORE_BAD_PATH");
    throwsFerry(() => parseStorePath("/nix/store", "/nix/store/ij3gw72f4n5z4dz6nnzl1731p9kmjbwr"), "FERRY_STORE_BAD_PATH");
    throwsFerry(() => parseStorePath("/nix/store", "/nix/store/ij3gw72f4n5z4dz6nnzl1731p9kmjbwe-x"), "FERRY_STORE_BAD_PATH", /'e'/);
    throwsFerry(() => parseStorePath("/nix/store", "/nix/store/short-x"), "FERRY_STORE_BAD_PATH");
    throwsFerry(() => parseStorePath("/nix/store", "/nix/storeij3gw72f4n5z4dz6nnzl1731p9kmjbwr-x"), "FERRY_STORE_BAD_PATH");
  });
});

describe("content addresses", () => {
  const h = makeHash("sha256", sha256("x"));

  test("text addresses use sha256", () => {
    throwsFerry(() => parseContentAddress("text:sha1:" + toNix32(digestOf("sha1", "x")), (s) => parseHash(s)), "FERRY_STORE_BAD_CA", /sha256/);
    throwsFerry(() => parseContentAddress("nar:sha256:" + toNix32(h.digest), (s) => parseHash(s)), "FERRY_STORE_BAD_CA");
  });

  test("a source address with references and a self-reference gives the source path with both", () => {
    const ref = "/nix/store/9mj7ij4cc9xajs1p0blxjm859pn9d3pn-hello-exec";
    const expected = makeSourcePath("/nix/store", "with-self", h, [ref], true);
    const claimed = printStorePath(expected);
    const ca: ContentAddress = { kind: "fixed", method: "recursive", hash: h };
    assert.deepEqual(pathOfContentAddress("/nix/store", "with-self", ca, [claimed, ref], claimed), expected);
    // without the self-reference the path is different, so a lying claim does not verify
    assert.notEqual(printStorePath(pathOfContentAddress("/nix/store", "with-self", ca, [ref], claimed)), claimed);
  });

  test("other fixed addresses cannot have references", () => {
    const flat: ContentAddress = { kind: "fixed", method: "flat", hash: h };
    throwsFerry(() => pathOfContentAddress("/nix/store", "x", flat, ["/nix/store/9mj7ij4cc9xajs1p0blxjm859pn9d3pn-hello-exec"]), "FERRY_STORE_BAD_CA");
  });

  test("derivation outputs are named name or name-output", () => {
    const d = sha256("anything");
    assert.equal(makeOutputPath("/nix/store", "out", d, "pkg").name, "pkg");
    assert.equal(makeOutputPath("/nix/store", "dev", d, "pkg").name, "pkg-dev");
  });

  test("output and text paths from a hex digest are the paths made from its bytes", () => {
    const d = sha256("anything");
    for (const o of ["out", "dev"]) assert.equal(outputPathOfHex("/nix/store", o, toBase16(d), "pkg"), printStorePath(makeOutputPath("/nix/store", o, d, "pkg")));
    const refs = ["/nix/store/9mj7ij4cc9xajs1p0blxjm859pn9d3pn-b", "/nix/store/0mj7ij4cc9xajs1p0blxjm859pn9d3pn-a"];
    assert.equal(textPathOfHex("/nix/store", "t.drv", toBase16(d), refs), printStorePath(makeTextPath("/nix/store", "t.drv", makeHash("sha256", d), refs)));
    assert.equal(textPathOfHex("/nix/store", "t.drv", toBase16(d), [...refs].sort()), textPathOfHex("/nix/store", "t.drv", toBase16(d), refs));
    throwsFerry(() => outputPathOfHex("/nix/store", "o/", toBase16(d), "pkg"), "FERRY_STORE_BAD_NAME");
    throwsFerry(() => textPathOfHex("/nix/store/", "t.drv", toBase16(d)), "FERRY_STORE_BAD_DIR");
  });
});

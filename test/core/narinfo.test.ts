import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { sha256 } from "../../src/core/digest.js";
import { hashEquals, makeHash, printHash, printPrefixedHash, toBase16 } from "../../src/core/hash.js";
import { parseCacheInfo, parseNarInfo, printCacheInfo, printNarInfo } from "../../src/core/narinfo.js";
import {
  fingerprintPath,
  generateSecretKey,
  parsePublicKey,
  parseSecretKey,
  printPublicKey,
  printSecretKey,
  publicKeyOf,
  signMessage,
  verifySignature,
} from "../../src/core/signing.js";
import { parseStorePath, pathOfContentAddress, printStorePath } from "../../src/core/store-path.js";
import { throwsFerry } from "../helpers/errors.js";
import { fromBase64, loadVectors } from "../helpers/vectors.js";

interface NarInfoVector {
  store_dir: string;
  store_path: string;
  compression: string;
  narinfo_file: string;
  narinfo_text: string;
  nar_file: string;
  nar_file_base64: string;
  nar_base64?: string;
  nar_size: number;
  references_full: string[];
  nix_cache_info: string;
  derived: { fingerprint: string };
}

const file = loadVectors<NarInfoVector>("narinfo.json");
const top = file as unknown as { key_name: string; secret_key: string; public_key: string; nix_cache_info: Record<string, string> };
const sk = parseSecretKey(top.secret_key);
const pk = parsePublicKey(top.public_key);

describe("narinfo.json keys", () => {
  test("the secret and public key files parse and agree", () => {
    assert.equal(sk.name, top.key_name);
    assert.equal(pk.name, top.key_name);
    assert.equal(sk.seed.length, 32);
    assert.deepEqual(sk.publicKey, pk.publicKey);
    assert.equal(printSecretKey(sk), top.secret_key);
    assert.equal(printPublicKey(pk), top.public_key);
    assert.equal(printPublicKey(publicKeyOf(sk)), top.public_key);
    // Nix writes key files without a newline, but a trailing one is harmless
    assert.equal(printSecretKey(parseSecretKey(top.secret_key + "\n")), top.secret_key);
  });

  test("malformed key files are rejected with coded errors", () => {
    throwsFerry(() => parsePublicKey("no-colon"), "FERRY_KEY_BAD_FORMAT");
    throwsFerry(() => parsePublicKey(":" + top.public_key.split(":")[1]), "FERRY_KEY_BAD_FORMAT");
    throwsFerry(() => parsePublicKey("k:!!!!"), "FERRY_KEY_BAD_FORMAT");
    throwsFerry(() => parsePublicKey(top.secret_key), "FERRY_KEY_BAD_FORMAT", /32/);
    throwsFerry(() => parseSecretKey(top.public_key), "FERRY_KEY_BAD_FORMAT", /64/);
    // a secret whose public half is not its seed's
    const raw = fromBase64(top.secret_key.split(":")[1]!);
    raw[40] = raw[40]! ^ 1;
    throwsFerry(() => parseSecretKey(`${top.key_name}:${Buffer.from(raw).toString("base64")}`), "FERRY_KEY_BAD_FORMAT", /inconsistent/);
    throwsFerry(() => parsePublicKey("bad name:" + top.public_key.split(":")[1]), "FERRY_KEY_BAD_NAME");
  });

  test("generated keys sign and verify, and survive printing", () => {
    const k = generateSecretKey("ferry-test-1");
    const again = parseSecretKey(printSecretKey(k));
    assert.deepEqual(again.publicKey, k.publicKey);
    const sig = signMessage(k, "message");
    assert.ok(verifySignature([publicKeyOf(again)], "message", sig));
    assert.ok(!verifySignature([pk], "message", sig));
  });

  test("nix-cache-info", () => {
    for (const [dir, text] of Object.entries(top.nix_cache_info)) {
      const ci = parseCacheInfo(text, { storeDir: "/elsewhere" });
      assert.equal(ci.storeDir, dir);
      assert.equal(ci.priority, 50);
      assert.equal(ci.wantMassQuery, false);
      assert.deepEqual(parseCacheInfo(printCacheInfo(ci), { storeDir: "/elsewhere" }), ci);
    }
    // an empty file is accepted (SPEC §9.5); the client's defaults apply
    assert.deepEqual(parseCacheInfo("", { storeDir: "/nix/store" }), { storeDir: "/nix/store", wantMassQuery: false, priority: 50 });
    assert.deepEqual(parseCacheInfo("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n", { storeDir: "/x" }), {
      storeDir: "/nix/store",
      wantMassQuery: true,
      priority: 40,
    });
  });
});

describe("narinfo.json vectors", () => {
  for (const v of file.vectors) {
    test(`${v.store_path} (${v.compression})`, () => {
      const info = parseNarInfo(v.store_dir, v.narinfo_text);
      assert.equal(printNarInfo(v.store_dir, info), v.narinfo_text);
      assert.equal(info.storePath, v.store_path);
      assert.deepEqual(info.references, v.references_full);
      assert.equal(info.compression, v.compression);
      assert.equal(info.url, v.nar_file);
      assert.equal(v.narinfo_file, `${parseStorePath(v.store_dir, v.store_path).hashPart}.narinfo`);
      assert.equal(top.nix_cache_info[v.store_dir], v.nix_cache_info);

      // the NAR file as stored, and the NAR itself
      const stored = fromBase64(v.nar_file_base64);
      assert.equal(info.fileSize, stored.length);
      assert.ok(info.fileHash && hashEquals(info.fileHash, makeHash("sha256", sha256(stored))));
      const nar = v.compression === "none" ? stored : fromBase64(v.nar_base64!);
      assert.equal(info.narSize, nar.length);
      assert.equal(info.narSize, v.nar_size);
      assert.ok(hashEquals(info.narHash, makeHash("sha256", sha256(nar))));

      // the signed fingerprint; the signature verifies and is reproduced exactly (ed25519 is deterministic)
      const fp = fingerprintPath(info.storePath, printPrefixedHash(info.narHash), info.narSize, info.references);
      assert.equal(fp, v.derived.fingerprint);
      assert.equal(info.sigs.length, 1);
      const sig = info.sigs[0]!;
      assert.ok(verifySignature([pk], fp, sig));
      assert.equal(signMessage(sk, fp), sig);

      // a content-addressed object's path follows from its CA
      if (info.ca) {
        const p = pathOfContentAddress(v.store_dir, parseStorePath(v.store_dir, info.storePath).name, info.ca, info.references, info.storePath);
        assert.equal(printStorePath(p), info.storePath);
      }
    });
  }

  test("a signature breaks when NarSize, NarHash or a reference changes, or under another key name", () => {
    const v = file.vectors.find((x) => x.references_full.length > 0)!;
    const info = parseNarInfo(v.store_dir, v.narinfo_text);
    const sig = info.sigs[0]!;
    const h = printPrefixedHash(info.narHash);
    assert.ok(verifySignature([pk], fingerprintPath(info.storePath, h, info.narSize, info.references), sig));
    assert.ok(!verifySignature([pk], fingerprintPath(info.storePath, h, info.narSize + 1, info.references), sig));
    const otherHash = printPrefixedHash(makeHash("sha256", sha256("other")));
    assert.ok(!verifySignature([pk], fingerprintPath(info.storePath, otherHash, info.narSize, info.references), sig));
    assert.ok(!verifySignature([pk], fingerprintPath(info.storePath, h, info.narSize, info.references.slice(1)), sig));
    assert.ok(!verifySignature([{ ...pk, name: "someone-else-1" }], fingerprintPath(info.storePath, h, info.narSize, info.references), sig));
    assert.ok(!verifySignature([pk], v.derived.fingerprint, sig.replace(/^[^:]*/, "someone-else-1")));
    assert.ok(!verifySignature([pk], v.derived.fingerprint, `${top.key_name}:not-base64!`));
    assert.ok(!verifySignature([pk], v.derived.fingerprint, `${top.key_name}:AAAA`));
    assert.ok(!verifySignature([], v.derived.fingerprint, sig));
  });

  test("fingerprints sort references and take sha256:<nix32> only", () => {
    assert.equal(fingerprintPath("/nix/store/p", "sha256:x", 1, ["/nix/store/b", "/nix/store/a"]), "1;/nix/store/p;sha256:x;1;/nix/store/a,/nix/store/b");
    assert.equal(fingerprintPath("/nix/store/p", "sha256:x", 1, []), "1;/nix/store/p;sha256:x;1;");
    assert.throws(() => fingerprintPath("/nix/store/p", "sha512:x", 1, []));
  });
});

/** SPEC §9.5: how strict Nix 2.8 is when it reads a narinfo. */
describe("narinfo leniency (SPEC §9.5)", () => {
  const v = file.vectors.find((x) => x.narinfo_text.includes("Deriver: ") && x.store_dir === "/nix/store")!;
  const text = v.narinfo_text;
  const lines = text.slice(0, -1).split("\n");
  const dir = v.store_dir;
  const canonical = parseNarInfo(dir, text);
  const replaceLine = (key: string, line: string | null) =>
    lines.flatMap((l) => (l.startsWith(`${key}: `) ? (line === null ? [] : [line]) : [l])).join("\n") + "\n";
  const narHashNix32 = printHash(canonical.narHash, "nix32");

  test("CRLF line endings are rejected", () => {
    throwsFerry(() => parseNarInfo(dir, text.replaceAll("\n", "\r\n")), "FERRY_NARINFO_INVALID", /CR/);
  });

  test("a NarHash without an algorithm prefix is rejected", () => {
    throwsFerry(() => parseNarInfo(dir, replaceLine("NarHash", `NarHash: ${narHashNix32}`)), "FERRY_NARINFO_INVALID", /NarHash/);
  });

  test("a NarHash in base16 or SRI is accepted", () => {
    for (const form of [`sha256:${toBase16(canonical.narHash.digest)}`, printHash(canonical.narHash, "sri")]) {
      const info = parseNarInfo(dir, replaceLine("NarHash", `NarHash: ${form}`));
      assert.ok(hashEquals(info.narHash, canonical.narHash));
      assert.equal(printNarInfo(dir, info), text);
    }
  });

  test("NarSize 0 (and other non-positive or non-numeric sizes) is rejected", () => {
    for (const bad of ["0", "-1", "", "1e3", "12x", "99999999999999999999"]) {
      throwsFerry(() => parseNarInfo(dir, replaceLine("NarSize", `NarSize: ${bad}`)), "FERRY_NARINFO_INVALID", /NarSize/);
    }
  });

  test("a Deriver given as a full path is rejected", () => {
    throwsFerry(() => parseNarInfo(dir, replaceLine("Deriver", `Deriver: ${canonical.deriver!}`)), "FERRY_NARINFO_INVALID", /Deriver/);
    assert.equal(parseNarInfo(dir, replaceLine("Deriver", "Deriver: unknown-deriver")).deriver, undefined);
  });

  test("fields in any order, and unknown fields, are accepted", () => {
    const shuffled = [...lines].reverse().concat(["System: x86_64-linux", "Future-Field: whatever: with colons"]).join("\n") + "\n";
    const info = parseNarInfo(dir, shuffled);
    assert.deepEqual(info, canonical);
    assert.equal(printNarInfo(dir, info), text);
  });

  test("a missing References line means no references", () => {
    const info = parseNarInfo(dir, replaceLine("References", null));
    assert.deepEqual(info.references, []);
    assert.match(printNarInfo(dir, info), /\nReferences: \n/);
  });

  test("missing FileHash and FileSize, and no final newline, are accepted", () => {
    const info = parseNarInfo(dir, replaceLine("FileHash", null).replace(/FileSize: \d+\n/, "").slice(0, -1));
    assert.equal(info.fileHash, undefined);
    assert.equal(info.fileSize, undefined);
    assert.ok(hashEquals(info.narHash, canonical.narHash));
  });

  test("a missing Compression reads as bzip2", () => {
    assert.equal(parseNarInfo(dir, replaceLine("Compression", null)).compression, "bzip2");
    assert.equal(parseNarInfo(dir, replaceLine("Compression", "Compression: ")).compression, "bzip2");
  });

  test("required fields and the store dir are checked", () => {
    for (const key of ["StorePath", "URL", "NarHash", "NarSize"]) {
      throwsFerry(() => parseNarInfo(dir, replaceLine(key, null)), "FERRY_NARINFO_INVALID", new RegExp(key));
    }
    throwsFerry(() => parseNarInfo(dir, replaceLine("URL", "URL: ")), "FERRY_NARINFO_INVALID", /URL/);
    throwsFerry(() => parseNarInfo("/ferry/store", text), "FERRY_STORE_BAD_PATH");
    throwsFerry(() => parseNarInfo(dir, text + "garbage line\n"), "FERRY_NARINFO_INVALID");
  });

  test("a reference listed twice is one reference, and is signed once", () => {
    const refsLine = lines.find((l) => l.startsWith("References: "))!;
    const first = refsLine.slice("References: ".length).split(" ")[0]!;
    const info = parseNarInfo(dir, replaceLine("References", `${refsLine} ${first}`));
    assert.deepEqual(info.references, canonical.references);
    assert.ok(verifySignature([pk], fingerprintPath(info.storePath, printPrefixedHash(info.narHash), info.narSize, [...info.references, info.references[0]!]), info.sigs[0]!));
  });

  test("more than one Sig is kept, in order", () => {
    const extra = "other-cache-1:" + Buffer.alloc(64).toString("base64");
    const info = parseNarInfo(dir, text + `Sig: ${extra}\n`);
    assert.deepEqual(info.sigs, [...canonical.sigs, extra]);
    // a bogus extra signature does no harm
    assert.ok(info.sigs.some((s) => verifySignature([pk], v.derived.fingerprint, s)));
  });
});

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { sha256 } from "../../src/core/digest.js";
import { compressHash, toBase16, toNix32 } from "../../src/core/hash.js";
import {
  checkDerivationOutputs,
  compareUtf8,
  derivationToJson,
  finalizeDerivation,
  hashDerivationModulo,
  isFixedOutput,
  makeDerivation,
  makeDerivationPath,
  outputPathsOf,
  parseDerivation,
  printDerivation,
  printDerivationModulo,
  type Derivation,
  type DerivationOutput,
  type DrvHashEntry,
} from "../../src/core/derivation.js";
import { FerryError } from "../../src/core/errors.js";
import { compareBytes, sortUtf8 } from "../../src/core/nar/names.js";
import { outputPathName, parseStorePath } from "../../src/core/store-path.js";
import { throwsFerry } from "../helpers/errors.js";
import { loadVectors } from "../helpers/vectors.js";

interface DrvVector {
  attr: string;
  drv_name: string;
  store_dir: string;
  drv_path: string;
  drv_text: string;
  outputs: Record<string, string>;
  drv_references: string[];
  input_drv_closure: Record<string, string>;
  nix_show_derivation: unknown;
  derived: {
    is_fixed_output: boolean;
    hash_derivation_modulo_hex: string;
    hash_derivation_modulo_preimage: string;
    output_fingerprints?: Record<string, string>;
    drv_path_fingerprint: string;
  };
}

const file = loadVectors<DrvVector>("derivations.json");
const enc = new TextEncoder();

/** Resolves input derivations from a vector's closure texts, counting the calls. */
function resolverOf(v: DrvVector): { resolve: (p: string) => Derivation; calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    resolve: (p) => {
      calls.push(p);
      const text = v.input_drv_closure[p];
      assert.ok(text !== undefined, `input ${p} is not in the vector's closure`);
      return parseDerivation(text, v.store_dir);
    },
  };
}

/** The draft an evaluator would make: output paths and env entries named after outputs blank. */
function maskedDraft(drv: Derivation): Derivation {
  const outputs = new Map<string, DerivationOutput>([...drv.outputs].map(([n, o]) => [n, { ...o, path: "" }]));
  const env = new Map([...drv.env].map(([k, val]) => [k, drv.outputs.has(k) ? "" : val]));
  return makeDerivation({ ...drv, outputs, env });
}

/** A copy of `text` with the first occurrence of `from` replaced by `to`, checked to exist. */
function replaceOnce(text: string, from: string, to: string): string {
  assert.ok(text.includes(from), `${JSON.stringify(from)} is not in the text`);
  return text.replace(from, to);
}

function label(v: DrvVector): string {
  return `${v.attr} in ${v.store_dir}`;
}

describe("derivations.json vectors", () => {
  for (const v of file.vectors) {
    describe(label(v), () => {
      const drv = parseDerivation(v.drv_text, v.store_dir);

      test("parse → print is the exact text, from a string and from bytes", () => {
        assert.equal(printDerivation(drv), v.drv_text);
        const fromBytes = parseDerivation(enc.encode(v.drv_text), v.store_dir);
        assert.deepEqual(fromBytes, drv);
        assert.equal(printDerivation(makeDerivation(drv)), v.drv_text);
      });

      test("finalizeDerivation of the masked draft gives the .drv, its path and its outputs", () => {
        const { resolve } = resolverOf(v);
        const draft = maskedDraft(drv);
        assert.ok([...outputPathsOf(draft).values()].every((p) => p === ""));
        const fin = finalizeDerivation(draft, v.store_dir, resolve);
        assert.equal(fin.text, v.drv_text);
        assert.equal(fin.drvPath, v.drv_path);
        assert.deepEqual(Object.fromEntries(fin.outputPaths), v.outputs);
        assert.deepEqual(Object.fromEntries(outputPathsOf(fin.drv)), v.outputs);
        assert.deepEqual(fin.drv, drv);
        // finalizing a final derivation changes nothing
        assert.equal(finalizeDerivation(drv, v.store_dir, resolve).text, v.drv_text);
        // the name comes from env.name unless given
        assert.equal(drv.env.get("name"), v.drv_name);
        assert.equal(finalizeDerivation(draft, v.store_dir, resolve, { name: v.drv_name }).drvPath, v.drv_path);
      });

      test("hashDerivationModulo and the derived intermediates", () => {
        const { resolve } = resolverOf(v);
        assert.equal(isFixedOutput(drv), v.derived.is_fixed_output);
        const preimage = printDerivationModulo(drv, resolve);
        assert.equal(preimage, v.derived.hash_derivation_modulo_preimage);
        const h = hashDerivationModulo(drv, resolve);
        assert.equal(toBase16(h), v.derived.hash_derivation_modulo_hex);
        assert.equal(toBase16(hashDerivationModulo(maskedDraft(drv), resolve, new Map(), { storeDir: v.store_dir, name: v.drv_name })), v.derived.hash_derivation_modulo_hex);

        for (const [o, fp] of Object.entries(v.derived.output_fingerprints ?? {})) {
          assert.equal(fp, `output:${o}:sha256:${toBase16(h)}:${v.store_dir}:${outputPathName(v.drv_name, o)}`);
          assert.equal(parseStorePath(v.store_dir, v.outputs[o]!).hashPart, toNix32(compressHash(sha256(fp), 20)));
        }

        // the .drv's own path: a text path over its exact bytes, referring to its inputs
        const refs = [...drv.inputSrcs, ...drv.inputDrvs.keys()].sort();
        assert.deepEqual(refs, v.drv_references);
        assert.equal(v.derived.drv_path_fingerprint, `text:${refs.map((r) => r + ":").join("")}sha256:${toBase16(sha256(v.drv_text))}:${v.store_dir}:${v.drv_name}.drv`);
        assert.equal(parseStorePath(v.store_dir, v.drv_path).hashPart, toNix32(compressHash(sha256(v.derived.drv_path_fingerprint), 20)));
        assert.equal(makeDerivationPath(v.store_dir, v.drv_name, drv), v.drv_path);

        // unmasked, a derivation without inputDrvs hashes to sha256 of its file (SPEC §6.3)
        if (drv.inputDrvs.size === 0 && !isFixedOutput(drv)) assert.equal(toBase16(hashDerivationModulo(drv, resolve, new Map(), { mask: false })), toBase16(sha256(v.drv_text)));
      });

      test("derivationToJson is what nix show-derivation printed", () => {
        assert.deepEqual(derivationToJson(drv), v.nix_show_derivation);
        assert.deepEqual(JSON.parse(JSON.stringify(derivationToJson(drv))), v.nix_show_derivation);
      });

      test("checkDerivationOutputs accepts it and rejects tampered copies", () => {
        const { resolve } = resolverOf(v);
        checkDerivationOutputs(drv, v.store_dir, resolve);
        checkDerivationOutputs(drv, v.store_dir, resolve, { drvPath: v.drv_path });

        const [o, path] = Object.entries(v.outputs)[0]!;
        const sp = parseStorePath(v.store_dir, path);
        const otherHash = (sp.hashPart[0] === "0" ? "1" : "0") + sp.hashPart.slice(1);
        const tamperedPath = `${v.store_dir}/${otherHash}-${sp.name}`;

        // both the tuple and the env entry changed: still not what the contents imply
        const both = parseDerivation(v.drv_text.replaceAll(path, tamperedPath), v.store_dir);
        const e = throwsFerry(() => checkDerivationOutputs(both, v.store_dir, resolve), "FERRY_DRV_WRONG_OUTPUTS");
        assert.ok(e.message.includes(tamperedPath) && e.message.includes(path), e.message);
        assert.deepEqual((e.details.wrong as { expected: string }[]).map((w) => w.expected), [path, path]);

        // only the output tuple, or only the env entry
        const tupleOnly = parseDerivation(replaceOnce(v.drv_text, `("${o}","${path}"`, `("${o}","${tamperedPath}"`), v.store_dir);
        throwsFerry(() => checkDerivationOutputs(tupleOnly, v.store_dir, resolve), "FERRY_DRV_WRONG_OUTPUTS", /output 'out'|output 'dev'/);
        const envOnly = makeDerivation({ ...drv, env: new Map([...drv.env, [o, tamperedPath]]) });
        throwsFerry(() => checkDerivationOutputs(envOnly, v.store_dir, resolve), "FERRY_DRV_WRONG_OUTPUTS", /environment variable/);

        // a changed builder changes an input-addressed output path, but not a fixed one
        const edited = makeDerivation({ ...drv, builder: "/bin/bash" });
        if (isFixedOutput(drv)) checkDerivationOutputs(edited, v.store_dir, resolve);
        else throwsFerry(() => checkDerivationOutputs(edited, v.store_dir, resolve), "FERRY_DRV_WRONG_OUTPUTS");
      });

      test("every input derivation in the closure reproduces its own path", () => {
        const { resolve } = resolverOf(v);
        for (const [p, text] of Object.entries(v.input_drv_closure)) {
          const input = parseDerivation(text, v.store_dir);
          assert.equal(printDerivation(input), text);
          const fin = finalizeDerivation(maskedDraft(input), v.store_dir, resolve);
          assert.equal(fin.drvPath, p);
          assert.equal(fin.text, text);
        }
      });
    });
  }

  test("the fixed-output rule: dependent and dependentViaAlt share their output path, not their .drv path", () => {
    for (const storeDir of ["/nix/store", "/ferry/store"]) {
      const dep = file.vectors.find((v) => v.attr === "dependent" && v.store_dir === storeDir)!;
      const alt = file.vectors.find((v) => v.attr === "dependentViaAlt" && v.store_dir === storeDir)!;
      assert.ok(dep && alt);
      const a = finalizeDerivation(maskedDraft(parseDerivation(dep.drv_text, storeDir)), storeDir, resolverOf(dep).resolve);
      const b = finalizeDerivation(maskedDraft(parseDerivation(alt.drv_text, storeDir)), storeDir, resolverOf(alt).resolve);
      assert.deepEqual(a.outputPaths, b.outputPaths);
      assert.notEqual(a.drvPath, b.drvPath);
      assert.notEqual(a.text, b.text);
      assert.equal(dep.derived.hash_derivation_modulo_preimage, alt.derived.hash_derivation_modulo_preimage);

      // the two fixed-output inputs differ as files but hash alike, and merge into one entry
      const flat = file.vectors.filter((v) => v.attr.startsWith("fixedFlat") && v.store_dir === storeDir);
      assert.equal(flat.length, 2);
      assert.notEqual(flat[0]!.drv_path, flat[1]!.drv_path);
      assert.equal(flat[0]!.derived.hash_derivation_modulo_hex, flat[1]!.derived.hash_derivation_modulo_hex);
      const both = makeDerivation({
        ...parseDerivation(dep.drv_text, storeDir),
        inputDrvs: new Map([...parseDerivation(dep.drv_text, storeDir).inputDrvs, [flat[1]!.drv_path, ["out"]]]),
      });
      const closure = { ...dep.input_drv_closure, ...alt.input_drv_closure };
      const pre = printDerivationModulo(both, (p) => parseDerivation(closure[p]!, storeDir));
      assert.equal(pre.split(flat[0]!.derived.hash_derivation_modulo_hex).length, 2, "one merged entry");
      assert.equal(pre, dep.derived.hash_derivation_modulo_preimage);
    }
  });
});

// ---- printing ---------------------------------------------------------------------------------

function sample(over: Partial<Parameters<typeof makeDerivation>[0]> = {}): Derivation {
  return makeDerivation({
    outputs: { out: { path: "/ferry/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-x" } },
    system: "x86_64-linux",
    builder: "/bin/sh",
    args: ["-c", "true"],
    env: { name: "x", out: "/ferry/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-x" },
    ...over,
  });
}

describe("printDerivation", () => {
  test("escapes builder, args and env (both sides) and nothing else", () => {
    const drv = sample({ builder: 'a"b\\c\nd\re\tf\u0001ü😀', args: ['"', "\\", "\n\r\t"], env: { 'k"\n': 'v\\"\t' } });
    const text = printDerivation(drv);
    assert.ok(text.includes(',"a\\"b\\\\c\\nd\\re\\tf\u0001ü😀",'), text);
    assert.ok(text.includes('["\\"","\\\\","\\n\\r\\t"]'), text);
    assert.ok(text.includes('("k\\"\\n","v\\\\\\"\\t")'), text);
    assert.deepEqual(parseDerivation(text, "/ferry/store"), drv);
  });

  test("sorts by UTF-8 bytes, not by UTF-16 units", () => {
    const keys = ["\uffff", "😀", "a", "\u00e9", "B", "__proto__", "10", "9"];
    const drv = sample({ env: Object.fromEntries(keys.map((k) => [k, k])) });
    const text = printDerivation(drv);
    const order = sortUtf8(keys);
    assert.deepEqual(order.slice(-2), ["\uffff", "😀"]);
    assert.deepEqual([...keys].sort(compareUtf8), order);
    let last = -1;
    for (const k of order) {
      const at = text.indexOf(`("${k}",`);
      assert.ok(at > last, `${k} out of order`);
      last = at;
    }
    // JavaScript's order puts 😀 first; the parser refuses that order
    const jsOrder = text.replace('("\uffff","\uffff"),("😀","😀")', '("😀","😀"),("\uffff","\uffff")');
    assert.notEqual(jsOrder, text);
    const e = throwsFerry(() => parseDerivation(jsOrder, "/ferry/store"), "FERRY_DRV_PARSE", /not sorted/);
    assert.equal(e.details.offset, enc.encode(jsOrder.slice(0, jsOrder.indexOf('("\uffff"'))).length);
  });

  test("refuses raw fields holding a quote or a backslash, and unpaired surrogates", () => {
    throwsFerry(() => printDerivation(sample({ system: 'x86"64' })), "FERRY_DRV_BAD_FIELD", /system/);
    throwsFerry(() => printDerivation(sample({ system: "x86\\64" })), "FERRY_DRV_BAD_FIELD", /system/);
    throwsFerry(() => printDerivation(sample({ inputSrcs: ['/ferry/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-a"b'] })), "FERRY_DRV_BAD_FIELD", /input source/);
    throwsFerry(() => printDerivation(sample({ outputs: { 'o"': {} } })), "FERRY_DRV_BAD_FIELD", /output name/);
    throwsFerry(() => printDerivation(sample({ outputs: { out: { hashAlgo: "sha\\256" } } })), "FERRY_DRV_BAD_FIELD", /hash algorithm/);
    throwsFerry(() => printDerivation(sample({ inputDrvs: { "/ferry/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-a.drv": ['o"'] } })), "FERRY_DRV_BAD_FIELD");
    throwsFerry(() => printDerivation(sample({ args: ["\ud800"] })), "FERRY_DRV_BAD_FIELD", /surrogate/);
    throwsFerry(() => printDerivation(sample({ system: "\udc00" })), "FERRY_DRV_BAD_FIELD", /surrogate/);
    // the same characters are fine where Nix escapes them
    printDerivation(sample({ builder: '"\\', env: { '"': "\\" } }));
  });

  test("masking blanks output paths and env entries named after outputs; a fixed output keeps its hash", () => {
    const drv = sample({ outputs: { out: { path: "/ferry/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-x", hashAlgo: "sha1", hash: "a".repeat(40) } } });
    assert.match(printDerivation(drv, { maskOutputs: true }), /^Derive\(\[\("out","","sha1","a{40}"\)\].*\("out",""\)\]\)$/);
  });
});

describe("printDerivation ∘ parseDerivation properties", () => {
  const str = fc.oneof(
    fc.string({ unit: "binary", maxLength: 12 }),
    fc.string({ unit: fc.constantFrom('"', "\\", "\n", "\r", "\t", "\u0001", "a", "ü", "😀", "\uffff", "\ue000"), maxLength: 8 }),
  ).filter((s) => !/[\uD800-\uDFFF]/u.test(s));

  test("compareUtf8 orders like the UTF-8 bytes", () => {
    fc.assert(
      fc.property(str, str, (a, b) => {
        assert.equal(Math.sign(compareUtf8(a, b)), Math.sign(compareBytes(enc.encode(a), enc.encode(b))));
      }),
      { numRuns: 500 },
    );
  });

  test("any derivation with printable fields prints, parses back to itself, and prints the same", () => {
    const hashPart = fc.string({ unit: fc.constantFrom(..."0123456789abcdfghijklmnpqrsvwxyz"), minLength: 32, maxLength: 32 });
    const pathArb = (suffix: string) => hashPart.map((h) => `/ferry/store/${h}-p${suffix}`);
    const outName = fc.string({ unit: fc.constantFrom(..."abcdeoutv-_."), minLength: 1, maxLength: 5 });
    const drvArb = fc.record({
      outputs: fc.dictionary(outName, pathArb(""), { minKeys: 1, maxKeys: 3 }),
      inputDrvs: fc.dictionary(pathArb(".drv"), fc.uniqueArray(outName, { minLength: 1, maxLength: 3 }), { maxKeys: 3 }),
      inputSrcs: fc.uniqueArray(pathArb(""), { maxLength: 3 }),
      system: fc.string({ unit: fc.constantFrom(..."abcx86_-ü😀"), maxLength: 12 }),
      builder: str,
      args: fc.array(str, { maxLength: 4 }),
      env: fc.dictionary(str, str, { maxKeys: 6 }),
    });
    fc.assert(
      fc.property(drvArb, (init) => {
        const drv = makeDerivation({ ...init, outputs: Object.fromEntries(Object.entries(init.outputs).map(([k, path]) => [k, { path }])) });
        const text = printDerivation(drv);
        const back = parseDerivation(text, "/ferry/store");
        assert.deepEqual(back, drv);
        assert.equal(printDerivation(back), text);
        assert.deepEqual(parseDerivation(enc.encode(text), "/ferry/store"), drv);
      }),
      { numRuns: 200 },
    );
  });
});

// ---- parse errors -----------------------------------------------------------------------------

const simple = file.vectors.find((v) => v.attr === "simple" && v.store_dir === "/nix/store")!;
const multi = file.vectors.find((v) => v.attr === "multi" && v.store_dir === "/nix/store")!;
const dependent = file.vectors.find((v) => v.attr === "dependent" && v.store_dir === "/nix/store")!;

function parseFails(text: string | Uint8Array, storeDir = "/nix/store"): FerryError {
  const e = throwsFerry(() => parseDerivation(text, storeDir), "FERRY_DRV_PARSE");
  assert.equal(typeof e.details.offset, "number");
  assert.ok(e.hint);
  return e;
}

describe("parseDerivation errors", () => {
  test("every truncation of a real .drv fails with an offset inside the text", () => {
    for (const v of [simple, multi, dependent]) {
      const bytes = enc.encode(v.drv_text);
      for (let n = 0; n < bytes.length; n++) {
        // cut at byte n, but only at character boundaries
        if (n > 0 && (bytes[n]! & 0xc0) === 0x80) continue;
        const e = parseFails(new TextDecoder().decode(bytes.subarray(0, n)));
        assert.ok((e.details.offset as number) <= n, `cut at ${n}: offset ${String(e.details.offset)}`);
      }
    }
  });

  test("offsets are bytes, past multi-byte characters", () => {
    const text = multi.drv_text.slice(0, -1); // drop the final ')'
    const e = parseFails(text);
    assert.equal(e.details.offset, enc.encode(text).length);
    assert.notEqual(e.details.offset, text.length);
    assert.match(e.message, /expected '\)'/);
  });

  test("an escape at the end of the text", () => {
    const cut = simple.drv_text.indexOf("echo hello") + 4;
    const text = simple.drv_text.slice(0, cut) + "\\";
    const e = parseFails(text);
    assert.equal(e.details.offset, text.length);
    assert.match(e.message, /escaped character/);
  });

  test("missing commas and brackets", () => {
    const t = simple.drv_text;
    // [from, to, what the parser wanted, where: bytes after the first changed byte]
    const cases: [string, string, string, number][] = [
      ['"-c","echo', '"-c""echo', "',' or ']'", 0],
      ['"x86_64-linux","/bin/sh"', '"x86_64-linux""/bin/sh"', "','", 0],
      ["Derive([", "Derive(", "'['", 0],
      ['"")],[]', '""),[]', "'('", 1],
      ['("builder","/bin/sh")', '("builder""/bin/sh")', "','", 0],
      ['("builder","/bin/sh")', '"builder","/bin/sh")', "'('", 0],
      ['("name","simple")', '("name","simple"', "')'", 0],
    ];
    for (const [from, to, expected, delta] of cases) {
      const bad = replaceOnce(t, from, to);
      let diff = 0;
      while (bad[diff] === t[diff]) diff++;
      const e = parseFails(bad);
      assert.equal(e.details.expected, expected, `${to}: ${e.message}`);
      assert.equal(e.details.offset, diff + delta, `${to}: ${e.message}`);
    }
  });

  test("quotes and backslashes in raw fields", () => {
    // a system with a quote, as Nix 2.8 would have written it
    parseFails(replaceOnce(simple.drv_text, '"x86_64-linux"', '"x86"64-linux"'));
    const e = parseFails(replaceOnce(simple.drv_text, '"x86_64-linux"', '"x86\\"64-linux"'));
    assert.match(e.message, /system contains '\\'/);
    assert.equal(e.details.offset, simple.drv_text.indexOf('"x86_64-linux"') + 4);
    parseFails(replaceOnce(simple.drv_text, '[("out","/nix', '[("o\\ut","/nix'));
  });

  test("trailing bytes, bad UTF-8, unsorted or duplicate entries, foreign paths, bad output tuples", () => {
    let e = parseFails(simple.drv_text + "\n");
    assert.equal(e.details.expected, "the end of the text");
    assert.equal(e.details.offset, simple.drv_text.length);

    const bytes = enc.encode(simple.drv_text);
    const broken = new Uint8Array(bytes);
    const at = simple.drv_text.indexOf("hello");
    broken[at] = 0xff;
    e = parseFails(broken);
    assert.equal(e.details.offset, at);
    e = throwsFerry(() => parseDerivation("Derive(\ud800", "/nix/store"), "FERRY_DRV_PARSE", /surrogate/);
    assert.equal(e.details.offset, 7);

    parseFails(replaceOnce(simple.drv_text, '("name","simple")', '("name","simple"),("name","again")'), "/nix/store");
    parseFails(replaceOnce(dependent.drv_text, '["out"]),("/nix/store/gkih', '["out","out"]),("/nix/store/gkih'));
    parseFails(simple.drv_text, "/ferry/store");
    parseFails(replaceOnce(simple.drv_text, '"out","/nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple","",""', '"out","/nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple","","abc"'));
    parseFails(replaceOnce(simple.drv_text, '"out","/nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple","",""', '"out","/nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple","sha256","abc"'));
    parseFails(replaceOnce(simple.drv_text, '"out","/nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple","",""', '"out","/nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple","md6",""'));
    e = parseFails(replaceOnce(simple.drv_text, '"out","/nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple","",""', '"out","","sha256",""'));
    assert.match(e.message, /floating/);
    e = parseFails(replaceOnce(multi.drv_text, '"dev","/nix/store/lswr9842kb77746j9rmqf8mdnrww6lx1-multi-out-dev","",""', `"dev","","sha1","${"0".repeat(40)}"`));
    assert.match(e.message, /only output/);
    parseFails('Derive([],[],[],"x","y",[],[])');
    parseFails(replaceOnce(dependent.drv_text, "simple.drv", "simple.drx"));
  });

  test("accepts \\x escapes in escaped fields (SPEC §4.3)", () => {
    const text = replaceOnce(simple.drv_text, '"echo hello > $out"', '"\\e\\c\\h\\o\\ \\😀\\n\\r\\t\\\\\\""');
    const drv = parseDerivation(text, "/nix/store");
    assert.equal(drv.args[1], 'echo 😀\n\r\t\\"');
  });
});

// ---- semantic errors --------------------------------------------------------------------------

describe("finalizeDerivation", () => {
  test("a draft that makeDerivation did not make (maps unsorted, repeated sources) finalizes as its normal form does", () => {
    const none = (): Derivation => {
      throw new Error("no inputs expected");
    };
    const cache = new Map<string, DrvHashEntry>();
    const a = finalizeDerivation(sample({ env: { name: "a" }, outputs: { out: {}, dev: {} } }), "/ferry/store", none, { cache });
    const b = finalizeDerivation(sample({ env: { name: "b" } }), "/ferry/store", none, { cache });
    const src = "/ferry/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-src";
    const draft: Derivation = {
      outputs: new Map([
        ["out", { path: "", hashAlgo: "", hash: "" }],
        ["bin", { path: "", hashAlgo: "", hash: "" }],
      ]),
      inputDrvs: new Map([
        [b.drvPath, ["out"]],
        [a.drvPath, ["out", "dev", "out"]],
      ]),
      inputSrcs: [src, src],
      system: "x86_64-linux",
      builder: "/bin/sh",
      args: ["-c", "true"],
      env: new Map([
        ["z", "1"],
        ["name", "c"],
        ["a", "2"],
      ]),
    };
    const got = finalizeDerivation(draft, "/ferry/store", none, { cache: new Map(cache) });
    const want = finalizeDerivation(makeDerivation(draft), "/ferry/store", none, { cache: new Map(cache) });
    assert.equal(got.text, want.text);
    assert.equal(got.drvPath, want.drvPath);
    assert.deepEqual([...got.outputPaths], [...want.outputPaths]);
    assert.deepEqual(got.references, [src, a.drvPath, b.drvPath].sort());
    assert.deepEqual(got.drv, want.drv);
    assert.equal(printDerivation(draft), printDerivation(makeDerivation(draft)));
  });
});

describe("finalizing and hashing errors", () => {
  const none = (): Derivation => {
    throw new Error("no inputs expected");
  };

  test("a draft without a name, with bad outputs, or with unusable inputs", () => {
    throwsFerry(() => finalizeDerivation(sample({ env: {} }), "/ferry/store", none), "FERRY_DRV_NO_NAME");
    throwsFerry(() => finalizeDerivation(sample({ outputs: {} }), "/ferry/store", none), "FERRY_DRV_BAD_OUTPUTS");
    throwsFerry(() => finalizeDerivation(sample({ outputs: { out: { hashAlgo: "sha256", hash: "00" } } }), "/ferry/store", none), "FERRY_DRV_BAD_OUTPUTS");
    throwsFerry(() => finalizeDerivation(sample({ outputs: { out: { hashAlgo: "r:sha256" } } }), "/ferry/store", none), "FERRY_DRV_UNSUPPORTED");
    throwsFerry(() => finalizeDerivation(sample({ env: { name: ".hidden" } }), "/ferry/store", none), "FERRY_STORE_BAD_NAME");
    throwsFerry(() => finalizeDerivation(sample({ inputSrcs: ["/nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-x"] }), "/ferry/store", none), "FERRY_STORE_BAD_PATH");

    const inputPath = "/ferry/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-in.drv";
    const input = finalizeDerivation(sample({ env: { name: "in" } }), "/ferry/store", none).drv;
    throwsFerry(() => finalizeDerivation(sample({ inputDrvs: { [inputPath]: ["dev"] } }), "/ferry/store", () => input), "FERRY_DRV_BAD_INPUT", /'dev'/);
    const unfinished = sample({ outputs: { out: {} } });
    throwsFerry(() => finalizeDerivation(sample({ inputDrvs: { [inputPath]: ["out"] } }), "/ferry/store", () => unfinished), "FERRY_DRV_BAD_INPUT", /not final/);
  });

  test("a store dir that needs escaping: paths raw in output tuples, escaped in env; a quote is refused", () => {
    const odd = "/fer\nry\tstore";
    const fin = finalizeDerivation(sample({ outputs: { dev: {}, out: {} } }), odd, none);
    assert.equal(fin.text, printDerivation(fin.drv));
    assert.ok(fin.text.includes(`("dev","${fin.outputPaths.get("dev")!}",`), fin.text);
    assert.ok(fin.text.includes(`("dev","${fin.outputPaths.get("dev")!.replace("\n", "\\n").replace("\t", "\\t")}")`), fin.text);
    throwsFerry(() => finalizeDerivation(sample(), '/fer"ry', none), "FERRY_DRV_BAD_FIELD", /output path/);
  });

  test("an input in the shared memo must still be in the store dir", () => {
    const cache = new Map<string, DrvHashEntry>();
    const input = finalizeDerivation(sample({ env: { name: "in" } }), "/ferry/store", none, { cache });
    finalizeDerivation(sample({ inputDrvs: { [input.drvPath]: ["out"] } }), "/ferry/store", none, { cache });
    const elsewhere = input.drvPath.replace("/ferry/store/", "/ferry/store/sub/");
    cache.set(elsewhere, cache.get(input.drvPath)!);
    throwsFerry(() => finalizeDerivation(sample({ inputDrvs: { [elsewhere]: ["out"] } }), "/ferry/store", none, { cache }), "FERRY_STORE_BAD_PATH");
    throwsFerry(() => finalizeDerivation(sample({ inputDrvs: { [input.drvPath]: ["out"] } }), "/ferry", none, { cache }), "FERRY_STORE_BAD_PATH");
  });

  test("a cycle among inputs is reported, not looped on", () => {
    const a = "/ferry/store/00000000000000000000000000000000-a.drv";
    const b = "/ferry/store/11111111111111111111111111111111-b.drv";
    const graph = new Map<string, Derivation>([
      [a, sample({ inputDrvs: { [b]: ["out"] } })],
      [b, sample({ inputDrvs: { [a]: ["out"] } })],
    ]);
    throwsFerry(() => hashDerivationModulo(sample({ inputDrvs: { [a]: ["out"] } }), (p) => graph.get(p)!), "FERRY_DRV_CYCLE");
  });
});

// ---- big graphs -------------------------------------------------------------------------------

describe("hashDerivationModulo on large graphs", () => {
  test("a 20,000-derivation graph: iterative, each derivation resolved once, memo shared", () => {
    const storeDir = "/ferry/store";
    const N = 20_000;
    const texts = new Map<string, string>();
    const paths: string[] = [];
    const cache = new Map<string, DrvHashEntry>();
    let resolves = 0;
    const resolve = (p: string): Derivation => {
      resolves++;
      return parseDerivation(texts.get(p)!, storeDir);
    };
    for (let k = 0; k < N; k++) {
      // a chain, with a second edge back to k-7 so inputs are shared and the memo matters
      const inputDrvs: Record<string, string[]> = {};
      if (k >= 1) inputDrvs[paths[k - 1]!] = ["out"];
      if (k >= 7) inputDrvs[paths[k - 7]!] = k % 2 === 0 ? ["dev", "out"] : ["dev"];
      const fin = finalizeDerivation(
        makeDerivation({ outputs: { dev: {}, out: {} }, inputDrvs, system: "x86_64-linux", builder: "/bin/sh", args: [String(k)], env: { name: `n${k}` } }),
        storeDir,
        resolve,
        { cache },
      );
      texts.set(fin.drvPath, fin.text);
      paths.push(fin.drvPath);
    }
    // finalize put every new derivation's digest in the shared memo, so nothing was resolved
    assert.equal(resolves, 0);
    assert.equal(cache.size, N);

    // from scratch: one resolve per derivation below the top, however many paths lead to it
    const top = parseDerivation(texts.get(paths[N - 1]!)!, storeDir);
    const fresh = new Map<string, DrvHashEntry>();
    const h = hashDerivationModulo(top, resolve, fresh, { mask: false });
    assert.equal(resolves, N - 1);
    assert.equal(fresh.size, N - 1);
    assert.deepEqual(h, cache.get(paths[N - 1]!)!.hash);
    for (const [p, entry] of fresh) assert.deepEqual(entry.hash, cache.get(p)!.hash);

    // and with the memo warm, nothing is resolved again
    checkDerivationOutputs(top, storeDir, resolve, { cache: fresh, drvPath: paths[N - 1]! });
    assert.equal(resolves, N - 1);
  });
});

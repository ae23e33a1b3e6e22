/**
 * Random derivation graphs written twice, as a Ferry module and as a Nix expression: the .drv
 * files Ferry writes must be byte-identical to nix-instantiate's, and Nix must build Ferry's
 * .drv files to the same outputs Ferry builds.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { ferryOk, ferryBin } from "../helpers/cli.js";
import { nix, nixChroot, haveNix } from "../helpers/nix.js";
import { prng, tempDir } from "../helpers/fs-trees.js";

interface GenDrv {
  id: string;
  name: string;
  outputs: string[];
  attrs: [string, GenValue][];
  fixed?: { content: string };
  script: string;
}
type GenValue = { s: string } | { i: number } | { b: boolean } | { ref: string; output?: string } | { list: GenValue[] } | { interp: string; ref: string; output?: string };

const TRICKY = ["plain", "with space", "quote\"d", "back\\slash", "new\nline", "tab\there", "dollar $HOME", "ünï", "emoji 😀", "brace {x}", "hash#"];

function genGraph(seed: number, n: number): GenDrv[] {
  const rnd = prng(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
  const out: GenDrv[] = [];
  for (let k = 0; k < n; k++) {
    const id = `d${k}`;
    const isFixed = k > 0 && rnd() < 0.15;
    const outputs = !isFixed && rnd() < 0.25 ? ["out", "dev"] : ["out"];
    const attrs: [string, GenValue][] = [];
    const nattrs = 1 + Math.floor(rnd() * 4);
    for (let a = 0; a < nattrs; a++) {
      const r = rnd();
      const prev = out.length ? pick(out) : undefined;
      let v: GenValue;
      if (r < 0.35) v = { s: pick(TRICKY) };
      else if (r < 0.45) v = { i: Math.floor(rnd() * 1000) - 100 };
      else if (r < 0.55) v = { b: rnd() < 0.5 };
      else if (r < 0.75 && prev) v = { ref: prev.id, ...(prev.outputs.length > 1 && rnd() < 0.5 ? { output: "dev" } : {}) };
      else if (r < 0.9 && prev) v = { interp: pick(TRICKY.slice(0, 3)), ref: prev.id };
      else v = { list: [{ s: "a" }, { i: 7 }, { b: true }, { b: false }] };
      attrs.push([`attr${a}`, v]);
    }
    let fixed: GenDrv["fixed"];
    let script: string;
    if (isFixed) {
      fixed = { content: `fixed ${k}\n` };
      script = `echo 'fixed ${k}' > $out`;
    } else {
      script = outputs.length > 1 ? "echo $attr0 > $out; /bin/mkdir $dev; echo $out > $dev/ref" : "echo \"$attr0\" > $out";
    }
    out.push({ id, name: `gen-${seed}-${k}`, outputs, attrs, ...(fixed ? { fixed } : {}), script });
  }
  return out;
}

function tsString(s: string): string {
  return JSON.stringify(s);
}

function nixString(s: string): string {
  return `"${s.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\$\{/g, "\\${").replace(/\n/g, "\\n").replace(/\t/g, "\\t")}"`;
}

function tsValue(v: GenValue): string {
  if ("s" in v) return tsString(v.s);
  if ("i" in v) return String(v.i);
  if ("b" in v) return String(v.b);
  if ("list" in v) return `[${v.list.map(tsValue).join(", ")}]`;
  if ("interp" in v) return `\`${v.interp.replace(/[`\\$]/g, (c) => "\\" + c)} \${${v.ref}${v.output ? `.outputs.${v.output}` : ""}}\``;
  return v.output ? `${v.ref}.outputs.${v.output}` : v.ref;
}

function nixValue(v: GenValue): string {
  if ("s" in v) return nixString(v.s);
  if ("i" in v) return v.i < 0 ? `(${v.i})` : String(v.i);
  if ("b" in v) return String(v.b);
  if ("list" in v) return `[ ${v.list.map(nixValue).join(" ")} ]`;
  if ("interp" in v) return `"${nixString(v.interp).slice(1, -1)} \${${v.ref}${v.output ? `.${v.output}` : ""}}"`;
  return v.output ? `${v.ref}.${v.output}` : v.ref;
}

const sha256Hex = (s: string) => spawnSync("sha256sum", { input: s }).stdout.toString().split(" ")[0]!;

function tsModule(g: GenDrv[]): string {
  const lines = [`import { derivation } from "ferry";`];
  for (const d of g) {
    const fields = [`name: ${tsString(d.name)}`, `system: "x86_64-linux"`, `builder: "/bin/sh"`, `args: ["-c", ${tsString(d.script)}]`];
    if (d.outputs.length > 1) fields.push(`outputs: ${JSON.stringify(d.outputs)}`);
    for (const [k, v] of d.attrs) fields.push(`${k}: ${tsValue(v)}`);
    if (d.fixed) fields.push(`outputHashMode: "flat"`, `outputHashAlgo: "sha256"`, `outputHash: ${tsString(sha256Hex(d.fixed.content))}`);
    lines.push(`export const ${d.id} = derivation({ ${fields.join(", ")} });`);
  }
  return lines.join("\n") + "\n";
}

function nixExpr(g: GenDrv[]): string {
  const lines = ["rec {"];
  for (const d of g) {
    const fields = [`name = ${nixString(d.name)};`, `system = "x86_64-linux";`, `builder = "/bin/sh";`, `args = [ "-c" ${nixString(d.script)} ];`];
    if (d.outputs.length > 1) fields.push(`outputs = [ ${d.outputs.map((o) => `"${o}"`).join(" ")} ];`);
    for (const [k, v] of d.attrs) fields.push(`${k} = ${nixValue(v)};`);
    if (d.fixed) fields.push(`outputHashMode = "flat";`, `outputHashAlgo = "sha256";`, `outputHash = "${sha256Hex(d.fixed.content)}";`);
    lines.push(`  ${d.id} = derivation { ${fields.join(" ")} };`);
  }
  lines.push("}");
  return lines.join("\n") + "\n";
}

describe("derivations against nix-instantiate and nix-store --realise", { skip: haveNix() ? false : "nix-bin is not installed" }, () => {
  let dir: string;
  before(() => {
    dir = tempDir("ferry-drvpeer-");
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  test("random graphs give byte-identical .drv files", () => {
    for (const seed of [101, 202, 303, 404]) {
      const g = genGraph(seed, 14);
      const tsFile = join(dir, `g${seed}.ts`);
      const nixFile = join(dir, `g${seed}.nix`);
      fs.writeFileSync(tsFile, tsModule(g));
      fs.writeFileSync(nixFile, nixExpr(g));
      const nixRoot = nixChroot(dir);
      const ferryRoot = join(dir, `ferry-${seed}`);
      const ours = JSON.parse(ferryOk(["eval", "--json", "--root", ferryRoot, "--store-dir", "/nix/store", "--state-dir", "/nix/var", tsFile])) as { attr: string; drvPath: string }[];
      for (const { attr, drvPath } of ours) {
        const theirs = nix("nix-instantiate", ["--store", nixRoot, nixFile, "-A", attr]).toString().trim().replace(/!.*$/, "");
        assert.equal(drvPath, theirs, `seed ${seed} ${attr}`);
        assert.ok(fs.readFileSync(join(ferryRoot, drvPath)).equals(fs.readFileSync(join(nixRoot, theirs))), `seed ${seed} ${attr} .drv bytes`);
      }
      assert.equal(ours.length, g.length);
    }
  });

  test("Nix builds the .drv files Ferry wrote to the same outputs Ferry builds", () => {
    const g = genGraph(555, 10);
    const tsFile = join(dir, "build.ts");
    fs.writeFileSync(tsFile, tsModule(g));
    const ferryRoot = join(dir, "ferry-build");
    const flags = ["--root", ferryRoot, "--store-dir", "/nix/store", "--state-dir", "/nix/var"];
    const jobs = JSON.parse(ferryOk(["eval", "--json", ...flags, tsFile])) as { attr: string; drvPath: string; outputs: Record<string, string> }[];
    ferryOk(["build", "-j", "2", ...flags, ...jobs.map((j) => j.drvPath)]);
    // Give Nix the .drv files (and nothing built) through an export stream.
    const drvClosure = ferryOk(["store", "path-info", "--closure", ...flags, ...jobs.map((j) => j.drvPath)]).trim().split("\n").map((l) => l.split("\t")[0]!);
    const stream = spawnSync(process.execPath, [ferryBin, "store", "export", ...flags, ...drvClosure], { maxBuffer: 1 << 28 }).stdout;
    const nixRoot = nixChroot(dir);
    nix("nix-store", ["--store", nixRoot, "--import"], stream);
    for (const j of jobs) {
      const outs = nix("nix-store", ["--store", nixRoot, "--option", "extra-sandbox-paths", "/bin /usr /lib /lib64", "--realise", j.drvPath]).toString().trim().split("\n");
      assert.deepEqual(outs.sort(), Object.values(j.outputs).sort(), `${j.attr}: Nix builds the same paths`);
      for (const p of outs) {
        const theirs = JSON.parse(nix("nix", ["--store", nixRoot, "path-info", "--json", p]).toString())[0];
        const mine = JSON.parse(ferryOk(["store", "path-info", "--json", ...flags, p]))[0];
        assert.equal(mine.narHash, theirs.narHash, `${p} NAR hash`);
        assert.deepEqual(mine.references, theirs.references, `${p} references`);
      }
    }
  });
});

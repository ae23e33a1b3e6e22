/**
 * Real C projects from `examples/packages.ts`, built for real in the bubblewrap sandbox from
 * upstream tarballs served by a hashed mirror over HTTP on loopback: zlib, libpng (against that
 * zlib) and GNU hello natively, zlib and hello cross-compiled for aarch64, and the results run
 * (the aarch64 hello under qemu-user). Every tool it needs is installed by `scripts/test`; a
 * missing one fails the test rather than skipping it.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as http from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { ferryBin, ferryOk } from "../helpers/cli.js";
import { tempDir } from "../helpers/fs-trees.js";
import { repoRoot, sharedDir } from "../helpers/paths.js";

const SOURCES = join(sharedDir, "fixtures", "sources");
const PACKAGES = join(repoRoot, "examples", "packages.ts");
const EM_X86_64 = 62;
const EM_AARCH64 = 183;

/** A content-addressed mirror: `GET /sha256/<hex>` serves the fixture with that sha256. */
async function startHashedMirror(dir: string): Promise<{ url: string; served: string[]; close: () => Promise<void> }> {
  const byHash = new Map<string, string>();
  for (const name of fs.readdirSync(dir)) {
    const p = join(dir, name);
    if (name.includes(".tar.")) byHash.set(createHash("sha256").update(fs.readFileSync(p)).digest("hex"), p);
  }
  const served: string[] = [];
  const server = http.createServer((req, res) => {
    const m = /^\/sha256\/([0-9a-f]{64})$/.exec(req.url ?? "");
    const file = m ? byHash.get(m[1]!) : undefined;
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    served.push(file);
    res.writeHead(200, { "content-length": fs.statSync(file).size });
    fs.createReadStream(file).pipe(res);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}`, served, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

/** Runs ferry without blocking this process (the mirror answers from it meanwhile). */
function ferryAsync(args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [ferryBin, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
  child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve) => child.on("close", (status) => resolve({ status, stdout, stderr })));
}

/** Runs a host program; a missing program or a failure fails the test with its output. */
function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv } = {}): string {
  const r = spawnSync(cmd, args, { encoding: "utf8", env: { ...process.env, ...opts.env } });
  if (r.error) throw new Error(`cannot run ${cmd}: ${r.error.message} (scripts/test installs the tools these tests need)`);
  assert.equal(r.status, 0, `${cmd} ${args.join(" ")} exited ${r.status}:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

function requireTool(name: string, debianPackage: string): void {
  const found = (process.env.PATH ?? "/usr/bin:/bin").split(":").some((d) => d && fs.existsSync(join(d, name)));
  assert.ok(found, `${name} is not installed: apt-get install ${debianPackage} (scripts/test does this)`);
}

/** The ELF machine field (e_machine) of a file: 62 is x86-64, 183 is aarch64. */
function elfMachine(path: string): number {
  const fd = fs.openSync(path, "r");
  try {
    const h = Buffer.alloc(20);
    fs.readSync(fd, h, 0, 20, 0);
    assert.equal(h.subarray(0, 4).toString("latin1"), "\x7fELF", `${path} is not an ELF file`);
    assert.equal(h[5], 1, `${path} is not little-endian`);
    return h.readUInt16LE(18);
  } finally {
    fs.closeSync(fd);
  }
}

function hostMachine(): number {
  if (process.arch === "x64") return EM_X86_64;
  if (process.arch === "arm64") return EM_AARCH64;
  throw new Error(`these tests know no ELF machine number for ${process.arch}`);
}

describe("real packages (examples/packages.ts), built in the sandbox", { timeout: 15 * 60_000 }, () => {
  let dir: string;
  let root: string;
  let mirror: Awaited<ReturnType<typeof startHashedMirror>>;
  /** Attribute -> output path (logical, under /ferry/store). */
  const outs = new Map<string, string>();
  const real = (logical: string) => join(root, logical);

  async function build(attrs: string[]): Promise<void> {
    const r = await ferryAsync([
      "build", ...attrs.map((a) => `${PACKAGES}#${a}`),
      "--root", root, "--hashed-mirror", mirror.url, "-j", "2", "--cores", "2",
    ]);
    assert.equal(r.status, 0, `ferry build ${attrs.join(" ")} failed:\n${r.stderr}`);
    const paths = r.stdout.trim().split("\n");
    assert.equal(paths.length, attrs.length, `one output path per package:\n${r.stdout}`);
    attrs.forEach((a, i) => outs.set(a, paths[i]!));
  }

  before(async () => {
    for (const [tool, pkg] of [["bwrap", "bubblewrap"], ["gcc", "gcc"], ["make", "make"], ["aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"], ["qemu-aarch64-static", "qemu-user-static"]] as const) {
      requireTool(tool, pkg);
    }
    dir = tempDir("ferry-real-");
    root = join(dir, "root");
    mirror = await startHashedMirror(SOURCES);
  });
  after(async () => {
    await mirror?.close();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test("the example package set type-checks", () => {
    run(process.execPath, [join(repoRoot, "node_modules", "typescript", "bin", "tsc"), "-p", join(repoRoot, "examples")]);
  });

  test("zlib, libpng and hello build from the hashed mirror, two at a time", async () => {
    await build(["zlib", "libpng", "hello"]);
    const fetched = new Set(mirror.served.map((f) => f.split("/").pop()));
    assert.deepEqual([...fetched].sort(), ["hello_2.10.orig.tar.gz", "libpng1.6_1.6.39.orig.tar.gz", "zlib_1.2.13.dfsg.orig.tar.bz2"]);
    for (const [a, p] of outs) assert.match(p, new RegExp(`^/ferry/store/[0-9a-z]{32}-${a}-`), `${a}: ${p}`);
  });

  test("hello runs and greets", () => {
    const hello = real(`${outs.get("hello")}/bin/hello`);
    assert.equal(elfMachine(hello), hostMachine());
    assert.equal(run(hello, []), "Hello, world!\n");
    assert.equal(run(hello, ["--greeting=ahoy"]), "ahoy\n");
  });

  test("libpng links the zlib it was built with, and a program using both writes and reads a PNG", () => {
    const zlib = outs.get("zlib")!;
    const libpng = outs.get("libpng")!;
    for (const f of ["lib/libz.so.1.2.13", "lib/libz.a", "include/zlib.h"]) assert.ok(fs.existsSync(real(`${zlib}/${f}`)), `zlib has ${f}`);
    for (const f of ["lib/libpng16.so.16.39.0", "include/png.h", "lib/pkgconfig/libpng16.pc"]) assert.ok(fs.existsSync(real(`${libpng}/${f}`)), `libpng has ${f}`);
    assert.equal(run(real(`${libpng}/bin/libpng-config`), ["--version"]).trim(), "1.6.39");

    // The reference scanner found zlib in libpng (its RUNPATH), so zlib is in libpng's closure.
    const info = JSON.parse(ferryOk(["store", "path-info", "--json", "--root", root, libpng])) as { path: string; references: string[] }[];
    assert.ok(info[0]!.references.includes(zlib), `libpng refers to ${zlib}: ${JSON.stringify(info[0]!.references)}`);
    assert.ok(fs.readFileSync(real(`${libpng}/lib/libpng16.so.16.39.0`)).includes(`${zlib}/lib`), "libpng's RUNPATH names the zlib it was built with");

    const src = join(dir, "pngtest.c");
    fs.writeFileSync(src, PNG_PROGRAM);
    const exe = join(dir, "pngtest");
    const flags = [libpng, zlib].flatMap((p) => [`-I${real(p)}/include`, `-L${real(p)}/lib`, `-Wl,-rpath,${real(p)}/lib`]);
    run("gcc", ["-o", exe, src, ...flags, "-lpng16", "-lz"]);
    const png = join(dir, "out.png");
    assert.equal(run(exe, [png]), "libpng 1.6.39 zlib 1.2.13: 16x8 ok\n");
    assert.deepEqual([...fs.readFileSync(png).subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  });

  test("zlib and hello cross-compile for aarch64, and the aarch64 hello runs under qemu-user", async () => {
    await build(["zlib-aarch64", "hello-aarch64"]);
    const zlib = outs.get("zlib-aarch64")!;
    const hello = outs.get("hello-aarch64")!;
    assert.notEqual(zlib, outs.get("zlib"), "the cross build is another package");
    assert.equal(elfMachine(real(`${zlib}/lib/libz.so.1.2.13`)), EM_AARCH64);
    assert.equal(elfMachine(real(`${hello}/bin/hello`)), EM_AARCH64);
    const out = run("qemu-aarch64-static", ["-L", "/usr/aarch64-linux-gnu", real(`${hello}/bin/hello`)]);
    assert.equal(out, "Hello, world!\n");
  });
});

/** Writes a 16x8 grey gradient with libpng, reads it back, checks the pixels. */
const PNG_PROGRAM = String.raw`
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <zlib.h>

int main(int argc, char **argv) {
  const int w = 16, h = 8;
  png_image img = {0};
  img.version = PNG_IMAGE_VERSION;
  img.width = w;
  img.height = h;
  img.format = PNG_FORMAT_GRAY;
  unsigned char px[16 * 8];
  for (int i = 0; i < w * h; i++) px[i] = (unsigned char)(i * 2);
  if (!png_image_write_to_file(&img, argv[1], 0, px, 0, NULL)) { fprintf(stderr, "write: %s\n", img.message); return 1; }

  png_image in = {0};
  in.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&in, argv[1])) { fprintf(stderr, "read: %s\n", in.message); return 1; }
  in.format = PNG_FORMAT_GRAY;
  unsigned char back[16 * 8];
  if (!png_image_finish_read(&in, NULL, back, 0, NULL)) { fprintf(stderr, "finish: %s\n", in.message); return 1; }
  for (int i = 0; i < w * h; i++) if (back[i] != px[i]) { fprintf(stderr, "pixel %d differs\n", i); return 1; }
  printf("libpng %s zlib %s: %ux%u ok\n", png_get_libpng_ver(NULL), zlibVersion(), in.width, in.height);
  return 0;
}
`;

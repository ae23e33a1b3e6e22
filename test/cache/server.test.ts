/** The cache server over real HTTP on loopback, in front of a directory backend. */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as http from "node:http";
import { join } from "node:path";
import { once } from "node:events";
import { FileBackend } from "../../src/cache/file-backend.js";
import { startCacheServer, CacheServerEmitter, type CacheServer, type CacheServerOptions } from "../../src/cache/server.js";
import { generateSecretKey, publicKeyOf, verifySignature, fingerprintPath } from "../../src/core/signing.js";
import { parseNarInfo } from "../../src/core/narinfo.js";
import { printPrefixedHash } from "../../src/core/hash.js";
import { tempDir } from "../helpers/fs-trees.js";
import { spawn } from "node:child_process";
import { haveNix, nix, nixChroot, nixEnv } from "../helpers/nix.js";
import { printPublicKey } from "../../src/core/signing.js";
import { bearer, makeNarFixture, narInfoText, request, spawnCacheServer, type NarFixture } from "../helpers/cache.js";

const TOKEN = "upload-secret";
const STORE = "/nix/store";

describe("cache server", () => {
  let dir: string;
  const servers: CacheServer[] = [];
  const serverKey = generateSecretKey("cache.test-1");
  const uploaderKey = generateSecretKey("builder.test-1");

  const start = async (name: string, opts: Partial<CacheServerOptions> = {}) => {
    const root = join(dir, name);
    const backend = FileBackend.open(root);
    const s = await startCacheServer({ backend, storeDir: STORE, uploadToken: TOKEN, secretKey: serverKey, stagingDir: join(root, ".ferry-uploads"), ...opts });
    servers.push(s);
    return { s, root, url: s.url };
  };

  const upload = async (url: string, f: NarFixture) => {
    assert.equal((await request(url, "PUT", `/${f.narKey}`, { headers: bearer(TOKEN), body: f.file })).status, 201);
    const r = await request(url, "PUT", `/${f.narInfoKey}`, { headers: bearer(TOKEN), body: narInfoText(f, { key: uploaderKey }) });
    assert.equal(r.status, 201, r.body.toString());
  };

  /** Files under the cache, without the server's staging and temp dirs. */
  const objects = (root: string) =>
    fs
      .readdirSync(root, { recursive: true, withFileTypes: true })
      .filter((d) => d.isFile())
      .map((d) => join(d.parentPath, d.name).slice(root.length + 1))
      .filter((p) => !p.startsWith("."))
      .sort();

  before(() => {
    dir = tempDir("ferry-cache-server-");
  });
  after(async () => {
    for (const s of servers) await s.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("nix-cache-info is generated, or served from the backend when it has one", async () => {
    const { url, root } = await start("info", { priority: 30 });
    const r = await request(url, "GET", "/nix-cache-info");
    assert.equal(r.status, 200);
    assert.equal(r.headers["content-type"], "text/x-nix-cache-info");
    assert.equal(r.body.toString(), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n");
    const { url: url2 } = await start("info2", { narInfoTtlMs: 0 });
    fs.writeFileSync(join(dir, "info2", "nix-cache-info"), "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 10\n");
    assert.match((await request(url2, "GET", "/nix-cache-info")).body.toString(), /Priority: 10/);
    assert.deepEqual(objects(root), [], "reading writes nothing");
  });

  test("a missing narinfo is a 404; bad keys and traversal are 400 with a short reason", async () => {
    const { url } = await start("keys");
    assert.equal((await request(url, "GET", "/00000000000000000000000000000000.narinfo")).status, 404);
    assert.equal((await request(url, "HEAD", "/00000000000000000000000000000000.narinfo")).status, 404);
    for (const p of ["/../etc/passwd", "/%2e%2e/etc/passwd", "/nar/%2e%2e/%2e%2e/x.narinfo", "//00000000000000000000000000000000.narinfo", "/nar/../nix-cache-info", "/foo", "/", "/nar/abc.nar", "/%ZZ", "/roots/../x"]) {
      const r = await request(url, "GET", p);
      assert.equal(r.status, 400, p);
      assert.match(r.body.toString(), /is not a binary cache object name/, p);
      assert.ok(r.body.length < 400, "the reason is short");
    }
    const del = await request(url, "DELETE", "/nix-cache-info");
    assert.equal(del.status, 405);
    assert.equal(del.headers.allow, "GET, HEAD, PUT");
  });

  test("uploads need the upload token: none 401, wrong or read-only 403, read-only server 405", async () => {
    const { url, root } = await start("auth", { readToken: "reader" });
    const f = await makeNarFixture();
    const none = await request(url, "PUT", `/${f.narKey}`, { body: f.file });
    assert.equal(none.status, 401);
    assert.match(String(none.headers["www-authenticate"]), /Bearer/);
    assert.equal((await request(url, "PUT", `/${f.narKey}`, { headers: bearer("nope"), body: f.file })).status, 403);
    assert.equal((await request(url, "PUT", `/${f.narKey}`, { headers: bearer("reader"), body: f.file })).status, 403);
    assert.deepEqual(objects(root), []);
    // reads: the read token, the upload token or Basic auth with either as password (what Nix sends from netrc)
    assert.equal((await request(url, "GET", "/nix-cache-info")).status, 401);
    assert.equal((await request(url, "GET", "/nix-cache-info", { headers: bearer("nope") })).status, 403);
    assert.equal((await request(url, "GET", "/nix-cache-info", { headers: bearer("reader") })).status, 200);
    assert.equal((await request(url, "GET", "/nix-cache-info", { headers: bearer(TOKEN) })).status, 200);
    assert.equal((await request(url, "GET", "/nix-cache-info", { headers: { Authorization: `Basic ${Buffer.from("nix:reader").toString("base64")}` } })).status, 200);
    const ro = await start("read-only", { uploadToken: undefined });
    const r = await request(ro.url, "PUT", `/${f.narKey}`, { headers: bearer(TOKEN), body: f.file });
    assert.equal(r.status, 405);
    assert.equal(r.headers.allow, "GET, HEAD");
    assert.equal((await request(ro.url, "GET", "/nix-cache-info")).status, 200, "reads are public without a read token");
  });

  test("a NAR upload is stored once verified; GET/HEAD serve it with type, length, ETag, ranges and 304", async () => {
    const { url } = await start("nar");
    const f = await makeNarFixture({ size: 5000 });
    assert.equal((await request(url, "PUT", `/${f.narKey}`, { headers: bearer(TOKEN), body: f.file })).status, 201);
    assert.equal((await request(url, "PUT", `/${f.narKey}`, { headers: bearer(TOKEN), body: f.file })).status, 200, "the same NAR again: 200");
    const g = await request(url, "GET", `/${f.narKey}`);
    assert.equal(g.status, 200);
    assert.deepEqual(g.body, f.file);
    assert.equal(g.headers["content-type"], "application/x-nix-nar");
    assert.equal(g.headers["content-length"], String(f.file.length));
    assert.equal(g.headers["accept-ranges"], "bytes");
    const etag = g.headers.etag!;
    assert.match(etag, /^".+"$/);
    assert.ok(g.headers["last-modified"]);
    const h = await request(url, "HEAD", `/${f.narKey}`);
    assert.equal(h.status, 200);
    assert.equal(h.headers["content-length"], String(f.file.length));
    assert.equal(h.body.length, 0);
    assert.equal((await request(url, "GET", `/${f.narKey}`, { headers: { "If-None-Match": etag } })).status, 304);
    assert.equal((await request(url, "GET", `/${f.narKey}`, { headers: { "If-None-Match": '"other"' } })).status, 200);
    const size = f.file.length;
    const ranges: [string, number, number][] = [
      ["bytes=0-9", 0, 9],
      ["bytes=100-", 100, size - 1],
      ["bytes=-50", size - 50, size - 1],
      ["bytes=10-999999", 10, size - 1],
    ];
    for (const [spec, a, b] of ranges) {
      const r = await request(url, "GET", `/${f.narKey}`, { headers: { Range: spec } });
      assert.equal(r.status, 206, spec);
      assert.equal(r.headers["content-range"], `bytes ${a}-${b}/${size}`, spec);
      assert.deepEqual(r.body, f.file.subarray(a, b + 1), spec);
    }
    const bad = await request(url, "GET", `/${f.narKey}`, { headers: { Range: `bytes=${size}-` } });
    assert.equal(bad.status, 416);
    assert.equal(bad.headers["content-range"], `bytes */${size}`);
    assert.equal((await request(url, "GET", `/${f.narKey}`, { headers: { Range: "bytes=0-1,5-6" } })).status, 200, "several ranges: the whole object");
    assert.equal((await request(url, "GET", `/nar/${"0".repeat(52)}.nar`)).status, 404);
  });

  test("a NAR whose body does not hash to its name, or is too large, is refused and nothing is written", async () => {
    const { url, root } = await start("nar-bad", { maxNarSize: 4000, maxObjectSize: 2000 });
    const f = await makeNarFixture({ size: 1000 });
    const g = await makeNarFixture({ size: 1000 });
    const wrong = await request(url, "PUT", `/${f.narKey}`, { headers: bearer(TOKEN), body: g.file });
    assert.equal(wrong.status, 400);
    assert.match(wrong.body.toString(), /sha256/);
    const big = await makeNarFixture({ size: 6000 });
    assert.equal((await request(url, "PUT", `/${big.narKey}`, { headers: bearer(TOKEN), body: big.file })).status, 413, "declared too large");
    // without Content-Length the limit is enforced while streaming
    const chunked = await new Promise<number>((resolve, reject) => {
      const u = new URL(url);
      const req = http.request({ host: u.hostname, port: u.port, method: "PUT", path: `/${big.narKey}`, headers: { ...bearer(TOKEN), "Transfer-Encoding": "chunked" }, agent: false }, (res) => {
        res.resume();
        resolve(res.statusCode!);
      });
      req.on("error", reject);
      req.write(big.file.subarray(0, 3000));
      setTimeout(() => req.end(big.file.subarray(3000)), 20);
    });
    assert.equal(chunked, 413, "streamed too large");
    assert.equal((await request(url, "PUT", `/${f.hashPart}.ls`, { headers: bearer(TOKEN), body: "x".repeat(3000) })).status, 413);
    assert.deepEqual(objects(root), []);
    assert.deepEqual(fs.readdirSync(join(root, ".ferry-tmp")), [], "no temporary file is left");
  });

  test("narinfo uploads are checked, signed by the server, keep the uploader's signature, and show at once", async () => {
    const { url, root } = await start("narinfo");
    const dep = await makeNarFixture({ name: "dep" });
    const f = await makeNarFixture({ name: "main", references: [dep.storePath] });
    const put = (key: string, body: string) => request(url, "PUT", `/${key}`, { headers: bearer(TOKEN), body });
    assert.equal((await request(url, "GET", `/${f.narInfoKey}`)).status, 404, "looked up (and remembered as missing) first");

    const missingNar = await put(f.narInfoKey, narInfoText(f));
    assert.equal(missingNar.status, 409, "a narinfo before its NAR");
    assert.match(missingNar.body.toString(), /upload the NAR first/);
    assert.equal((await request(url, "PUT", `/${f.narKey}`, { headers: bearer(TOKEN), body: f.file })).status, 201);

    const cases: [string, string, number, RegExp][] = [
      ["malformed", "StorePath: nonsense\nthis is not narinfo\n", 400, /narinfo|store/i],
      ["no NarHash", narInfoText(f, { override: { NarHash: undefined } }), 400, /NarHash/],
      ["unknown compression", narInfoText(f, { override: { Compression: "lzma9" } }), 400, /compression 'lzma9'/],
      ["other store dir", narInfoText(f, { override: { StorePath: f.storePath.replace("/nix/store", "/other/store") } }), 400, /store/i],
      ["other path", narInfoText(f, { override: { StorePath: dep.storePath } }), 400, /not .*\.narinfo/],
      ["URL outside nar/", narInfoText(f, { override: { URL: "../../etc/passwd" } }), 400, /URL/],
      ["FileSize", narInfoText(f, { override: { FileSize: "7" } }), 400, /FileSize 7/],
      ["FileHash", narInfoText(f, { override: { FileHash: `sha256:${"1".repeat(52)}` } }), 400, /FileHash/],
    ];
    for (const [what, text, status, re] of cases) {
      const r = await put(f.narInfoKey, text);
      assert.equal(r.status, status, `${what}: ${r.body.toString()}`);
      assert.match(r.body.toString(), re, what);
    }
    assert.deepEqual(objects(root), [f.narKey], "no narinfo was written");

    const ok = await put(f.narInfoKey, narInfoText(f, { key: uploaderKey }));
    assert.equal(ok.status, 201, ok.body.toString());
    const g = await request(url, "GET", `/${f.narInfoKey}`);
    assert.equal(g.status, 200, "the server's own write replaces the remembered 404");
    assert.equal(g.headers["content-type"], "text/x-nix-narinfo");
    const info = parseNarInfo(STORE, g.body.toString());
    assert.deepEqual(info.references, [dep.storePath]);
    const fp = fingerprintPath(info.storePath, printPrefixedHash(info.narHash), info.narSize, info.references);
    assert.equal(info.sigs.length, 2);
    assert.ok(info.sigs.some((s) => s.startsWith("builder.test-1:") && verifySignature([publicKeyOf(uploaderKey)], fp, s)), "the uploader's signature is kept");
    assert.ok(info.sigs.some((s) => s.startsWith("cache.test-1:") && verifySignature([publicKeyOf(serverKey)], fp, s)), "the server signed");
    assert.equal((await request(url, "GET", `/${f.narInfoKey}`, { headers: { "If-None-Match": g.headers.etag! } })).status, 304);
    assert.equal((await put(f.narInfoKey, g.body.toString())).status, 200, "the same narinfo again: 200, signatures not doubled");
    assert.equal(parseNarInfo(STORE, fs.readFileSync(join(root, f.narInfoKey), "utf8")).sigs.length, 2);
  });

  test("resumable NAR upload: an interrupted PUT keeps its bytes, HEAD tells the offset, the rest completes and is verified", async () => {
    const events = new CacheServerEmitter();
    const seen: string[] = [];
    events.on("cache:upload", (e) => seen.push(`${e.outcome} ${e.key}`));
    const { url, root } = await start("resume", { events });
    const f = await makeNarFixture({ size: 400_000, compression: "none" });
    const total = f.file.length;
    const path = `/${f.narKey}`;
    const partial = join(root, ".ferry-uploads", `${f.narKey.replace("/", "_")}.partial`);

    // Send 150 000 bytes of a whole-file ranged PUT, then drop the connection.
    const u = new URL(url);
    const req = http.request({ host: u.hostname, port: u.port, method: "PUT", path, agent: false, headers: { ...bearer(TOKEN), "Content-Length": String(total), "Content-Range": `bytes 0-${total - 1}/${total}` } });
    req.on("error", () => undefined);
    req.write(f.file.subarray(0, 150_000));
    for (let i = 0; i < 200 && !(fs.existsSync(partial) && fs.statSync(partial).size === 150_000); i++) await new Promise((r) => setTimeout(r, 10));
    const closed = new Promise((r) => req.on("close", r));
    req.destroy();
    await closed;
    await new Promise((r) => setTimeout(r, 50));

    const head = await request(url, "HEAD", path, { headers: bearer(TOKEN) });
    assert.equal(head.status, 404);
    assert.equal(head.headers["upload-offset"], "150000");
    assert.equal((await request(url, "HEAD", path)).headers["upload-offset"], undefined, "only uploaders see the offset");
    assert.equal((await request(url, "PUT", `/${f.narInfoKey}`, { headers: bearer(TOKEN), body: narInfoText(f) })).status, 409, "no narinfo for a partial NAR");

    const part = (a: number, b: number) => request(url, "PUT", path, { headers: { ...bearer(TOKEN), "Content-Range": `bytes ${a}-${b}/${total}` }, body: f.file.subarray(a, b + 1) });
    const wrongOffset = await part(0, 99_999);
    assert.equal(wrongOffset.status, 409);
    assert.equal(wrongOffset.headers["upload-offset"], "150000");
    const mid = await part(150_000, 299_999);
    assert.equal(mid.status, 202);
    assert.equal(mid.headers["upload-offset"], "300000");
    assert.equal((await request(url, "GET", path)).status, 404, "not readable before it is whole");
    const last = await part(300_000, total - 1);
    assert.equal(last.status, 201, last.body.toString());
    assert.deepEqual((await request(url, "GET", path)).body, f.file);
    assert.ok(!fs.existsSync(partial), "the partial is gone");
    assert.ok(seen.includes(`stored ${f.narKey}`) && seen.includes(`partial ${f.narKey}`));

    // A completed upload whose bytes do not hash to the name: refused, nothing stored, start over.
    const g = await makeNarFixture({ size: 1000, compression: "none" });
    const other = await makeNarFixture({ size: 1000, compression: "none" });
    const bad = await request(url, "PUT", `/${g.narKey}`, { headers: { ...bearer(TOKEN), "Content-Range": `bytes 0-${other.file.length - 1}/${other.file.length}` }, body: other.file });
    assert.equal(bad.status, 400);
    assert.equal((await request(url, "HEAD", `/${g.narKey}`, { headers: bearer(TOKEN) })).headers["upload-offset"], undefined);
    assert.ok(!fs.existsSync(join(root, g.narKey)));

    // A plain PUT replaces a partial.
    const h = await makeNarFixture({ size: 1000, compression: "none" });
    assert.equal((await request(url, "PUT", `/${h.narKey}`, { headers: { ...bearer(TOKEN), "Content-Range": `bytes 0-99/${h.file.length}` }, body: h.file.subarray(0, 100) })).status, 202);
    assert.equal((await request(url, "PUT", `/${h.narKey}`, { headers: bearer(TOKEN), body: h.file })).status, 201);
    assert.equal((await request(url, "HEAD", `/${h.narKey}`)).status, 200);
    assert.ok(!fs.existsSync(join(root, ".ferry-uploads", `${h.narKey.replace("/", "_")}.partial`)));
    assert.equal((await request(url, "PUT", `/${h.narInfoKey}`, { headers: { ...bearer(TOKEN), "Content-Range": "bytes 0-1/2" }, body: "ab" })).status, 400, "only NARs are uploaded in parts");
    assert.equal((await request(url, "PUT", `/${h.narKey}`, { headers: { ...bearer(TOKEN), "Content-Range": "bytes 5-1/2" }, body: "ab" })).status, 400);
  });

  test("a `ferry cache serve` killed mid-upload leaves no narinfo pointing at a missing or partial NAR", async () => {
    const root = join(dir, "killed");
    const spawnServe = () => spawnCacheServer(["--dir", root, "--upload-token", TOKEN, "--store-dir", STORE]);
    const f = await makeNarFixture({ size: 300_000, compression: "none" });
    const g = await makeNarFixture({ size: 300_000, compression: "none" });
    const first = await spawnServe();
    const u = new URL(first.url);
    const open = (path: string, headers: Record<string, string>) => {
      const req = http.request({ host: u.hostname, port: u.port, method: "PUT", path, agent: false, headers: { ...bearer(TOKEN), ...headers } });
      req.on("error", () => undefined);
      return req;
    };
    const plain = open(`/${f.narKey}`, { "Content-Length": String(f.file.length) });
    plain.write(f.file.subarray(0, 100_000));
    const ranged = open(`/${g.narKey}`, { "Content-Length": String(g.file.length), "Content-Range": `bytes 0-${g.file.length - 1}/${g.file.length}` });
    ranged.write(g.file.subarray(0, 100_000));
    const partial = join(root, ".ferry-uploads", `${g.narKey.replace("/", "_")}.partial`);
    for (let i = 0; i < 300 && !(fs.existsSync(partial) && fs.statSync(partial).size === 100_000); i++) await new Promise((r) => setTimeout(r, 10));
    first.child.kill("SIGKILL");
    await once(first.child, "exit");
    plain.destroy();
    ranged.destroy();
    assert.deepEqual(objects(root), [], "nothing but the staging area was written");

    const second = await spawnServe();
    try {
      for (const x of [f, g]) assert.equal((await request(second.url, "PUT", `/${x.narInfoKey}`, { headers: bearer(TOKEN), body: narInfoText(x) })).status, 409);
      const head = await request(second.url, "HEAD", `/${g.narKey}`, { headers: bearer(TOKEN) });
      assert.equal(head.headers["upload-offset"], "100000", "the partial survived the crash");
      const rest = await request(second.url, "PUT", `/${g.narKey}`, { headers: { ...bearer(TOKEN), "Content-Range": `bytes 100000-${g.file.length - 1}/${g.file.length}` }, body: g.file.subarray(100_000) });
      assert.equal(rest.status, 201);
      assert.equal((await request(second.url, "PUT", `/${g.narInfoKey}`, { headers: bearer(TOKEN), body: narInfoText(g) })).status, 201);
      assert.deepEqual(objects(root), [g.narInfoKey, g.narKey].sort());
    } finally {
      second.child.kill("SIGTERM");
      const [code] = (await once(second.child, "exit")) as [number | null];
      assert.equal(code, 0, "SIGTERM stops the server cleanly");
    }
  });

  test("--workers 2: processes share the port, see each other's uploads, a dead worker is replaced, SIGTERM stops all", async () => {
    const root = join(dir, "workers");
    const { child, url, stderr } = await spawnCacheServer(["--dir", root, "--upload-token", TOKEN, "--store-dir", STORE, "--workers", "2"]);
    const workerPids = () =>
      fs
        .readdirSync("/proc")
        .filter((p) => /^\d+$/.test(p))
        .filter((p) => {
          try {
            return fs.readFileSync(`/proc/${p}/stat`, "utf8").split(") ")[1]!.split(" ")[1] === String(child.pid);
          } catch {
            return false;
          }
        });
    try {
      assert.equal(workerPids().length, 2);
      const f = await makeNarFixture({ name: "shared" });
      // both workers remember the miss (fresh connections spread over them)
      for (let i = 0; i < 6; i++) assert.equal((await request(url, "GET", `/${f.narInfoKey}`)).status, 404);
      await upload(url, f);
      // within the narinfo memory's lifetime at the latest, every worker serves it
      const deadline = Date.now() + 1500;
      let ok = 0;
      while (ok < 6 && Date.now() < deadline) ok = (await request(url, "GET", `/${f.narInfoKey}`)).status === 200 ? ok + 1 : 0;
      assert.equal(ok, 6);
      const victim = workerPids()[0]!;
      process.kill(Number(victim), "SIGKILL");
      const replaced = () => workerPids().length === 2 && !workerPids().includes(victim);
      for (let i = 0, stable = 0; i < 200 && stable < 5; i++) {
        await new Promise((r) => setTimeout(r, 20));
        stable = replaced() ? stable + 1 : 0;
      }
      assert.ok(replaced(), `the dead worker ${victim} was replaced: ${workerPids().join(",")}; ${stderr()}`);
      assert.equal((await request(url, "GET", `/${f.narInfoKey}`)).status, 200);
    } finally {
      child.kill("SIGTERM");
      const [code] = (await once(child, "exit")) as [number | null];
      assert.equal(code, 0);
    }
  });

  test("a full round trip: NARs and narinfos of a closure, read back as Nix reads them", async () => {
    const { url } = await start("roundtrip");
    const dep = await makeNarFixture({ name: "dep", compression: "xz" });
    const main = await makeNarFixture({ name: "main", references: [dep.storePath], compression: "zstd" });
    await upload(url, dep);
    await upload(url, main);
    const info = parseNarInfo(STORE, (await request(url, "GET", `/${main.narInfoKey}`)).body.toString());
    assert.deepEqual((await request(url, "GET", `/${info.url}`)).body, main.file);
  });

  test("real Nix copies to the server (netrc token) and substitutes from it, checking the server's signature", { skip: !haveNix() }, async () => {
    const { url } = await start("nix");
    const nixAsync = (args: string[]) =>
      new Promise<string>((resolve, reject) => {
        const c = spawn("nix", args, { env: nixEnv() });
        let out = "";
        let err = "";
        c.stdout.on("data", (b: Buffer) => (out += b.toString()));
        c.stderr.on("data", (b: Buffer) => (err += b.toString()));
        c.on("close", (code) => (code === 0 ? resolve(out) : reject(new Error(`nix ${args.join(" ")} exited ${code}: ${err}`))));
      });
    const src = join(dir, "nix-src");
    fs.mkdirSync(src);
    fs.writeFileSync(join(src, "hello"), "hello from nix\n");
    const r1 = nixChroot(dir);
    const path = nix("nix-store", ["--store", r1, "--add", src]).toString().trim();
    const netrc = join(dir, "netrc");
    fs.writeFileSync(netrc, `machine 127.0.0.1 login nix password ${TOKEN}\n`);
    await nixAsync(["copy", "--store", r1, "--option", "netrc-file", netrc, "--to", url, path]);
    const r2 = nixChroot(dir);
    await nixAsync(["copy", "--store", r2, "--from", url, "--option", "trusted-public-keys", printPublicKey(publicKeyOf(serverKey)), path]);
    assert.equal(fs.readFileSync(join(r2, path, "hello"), "utf8"), "hello from nix\n");
  });
});

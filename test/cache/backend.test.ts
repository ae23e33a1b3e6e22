/**
 * The CacheBackend contract (src/cache/backend.ts), run against every backend: the directory
 * backend on a temporary directory and the S3 backend on a local s3rver. Backend-specific
 * behaviour (key prefixes, pagination, error mapping) follows in their own suites.
 */
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { createServer } from "node:net";
import type { Readable } from "node:stream";
import { createHash } from "node:crypto";
import type { CacheBackend } from "../../src/cache/backend.js";
import { FileBackend } from "../../src/cache/file-backend.js";
import { S3Backend, parseS3Url } from "../../src/cache/s3-backend.js";
import { openBackend } from "../../src/cache/open.js";
import { isFerryError } from "../../src/core/errors.js";
import { prng, tempDir } from "../helpers/fs-trees.js";
import { startS3Server, type S3Server } from "../helpers/s3-server.js";

const MiB = 1024 * 1024;

async function readAll(body: Readable): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of body) parts.push(c as Buffer);
  return Buffer.concat(parts);
}

/** `size` reproducible pseudo-random bytes. */
function bytes(size: number, seed: number): Buffer {
  const rnd = prng(seed);
  const b = Buffer.alloc(Math.ceil(size / 4) * 4);
  for (let i = 0; i < b.length; i += 4) b.writeUInt32LE(Math.floor(rnd() * 2 ** 32), i);
  return b.subarray(0, size);
}

/** `data` in chunks of `chunk` bytes; throws `fail` after `failAfter` bytes when given. */
async function* chunks(data: Uint8Array, chunk: number, failAfter?: number, fail = new Error("the source broke")): AsyncGenerator<Uint8Array> {
  for (let off = 0; off < data.length; off += chunk) {
    if (failAfter !== undefined && off >= failAfter) throw fail;
    yield data.subarray(off, Math.min(off + chunk, data.length));
  }
  if (failAfter !== undefined) throw fail;
}

function sha256(b: Uint8Array): string {
  return createHash("sha256").update(b).digest("hex");
}

async function keysOf(backend: CacheBackend, prefix: string): Promise<string[]> {
  const keys: string[] = [];
  for await (const o of backend.list(prefix)) keys.push(o.key);
  return keys.sort();
}

const isCode = (code: string) => (e: unknown) => {
  assert.ok(isFerryError(e, code), `expected ${code}, got ${String((e as { code?: string }).code)}: ${String(e)}`);
  return true;
};

interface Subject {
  readonly name: string;
  open(): Promise<CacheBackend>;
  cleanup(): Promise<void>;
}

function fileSubject(): Subject {
  let dir = "";
  return {
    name: "file",
    async open() {
      dir = tempDir("ferry-cache-backend-");
      return FileBackend.open(dir);
    },
    async cleanup() {
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

function s3Subject(): Subject {
  let server: S3Server | undefined;
  return {
    name: "s3",
    async open() {
      server = await startS3Server({ buckets: ["ferry"] });
      return S3Backend.open(server.url("ferry", "some/prefix"));
    },
    async cleanup() {
      await server?.stop();
    },
  };
}

const NARINFO = "0123456789abcdfghijklmnpqrsvwxyz.narinfo";
const NAR = "nar/0123456789abcdfghijklmnpqrsvwxyz0123456789abcdfghi.nar.zst";

for (const subject of [fileSubject(), s3Subject()]) {
  describe(`cache backend contract: ${subject.name}`, () => {
    let backend: CacheBackend;
    before(async () => {
      backend = await subject.open();
    });
    after(async () => {
      await backend.close();
      await subject.cleanup();
    });

    test("a written object reads back whole, by stat, read and readBytes", async () => {
      const data = Buffer.from("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n");
      const info = await backend.write("nix-cache-info", data, { contentType: "text/x-nix-cache-info" });
      assert.equal(info.key, "nix-cache-info");
      assert.equal(info.size, data.length);
      assert.match(info.etag, /^".+"$/);
      assert.deepEqual(Buffer.from((await backend.readBytes("nix-cache-info"))!), data);
      const st = await backend.stat("nix-cache-info");
      assert.equal(st?.size, data.length);
      assert.equal(st?.etag, info.etag, "stat reports the etag the write returned");
      assert.ok(st.mtimeMs > 0);
      const r = await backend.read("nix-cache-info");
      assert.ok(r);
      assert.equal(r.start, 0);
      assert.equal(r.info.size, data.length);
      assert.deepEqual(await readAll(r.body), data);
    });

    test("ranged reads return the inclusive range, clipped to the size", async () => {
      const data = bytes(1000, 1);
      await backend.write(NARINFO, chunks(data, 97));
      const cases: [{ start: number; end?: number }, number, number][] = [
        [{ start: 10 }, 10, 1000],
        [{ start: 10, end: 19 }, 10, 20],
        [{ start: 990, end: 5000 }, 990, 1000],
        [{ start: 0, end: 0 }, 0, 1],
        [{ start: 1000 }, 1000, 1000],
        [{ start: 5000, end: 6000 }, 5000, 5000],
      ];
      for (const [range, from, to] of cases) {
        const r = await backend.read(NARINFO, range);
        assert.ok(r, JSON.stringify(range));
        assert.equal(r.start, range.start, JSON.stringify(range));
        assert.equal(r.info.size, 1000, `the info has the whole object's size for ${JSON.stringify(range)}`);
        assert.deepEqual(await readAll(r.body), data.subarray(from, to), JSON.stringify(range));
      }
    });

    test("a missing object is undefined for stat, read, readBytes and delete", async () => {
      assert.equal(await backend.stat("nar/missing.nar"), undefined);
      assert.equal(await backend.read("nar/missing.nar"), undefined);
      assert.equal(await backend.read("nar/missing.nar", { start: 5 }), undefined);
      assert.equal(await backend.readBytes("nar/missing.nar"), undefined);
      assert.equal(await backend.delete("nar/missing.nar"), false);
    });

    test("delete removes an object and says so", async () => {
      await backend.write("log/to-delete", Buffer.from("x"));
      assert.equal(await backend.delete("log/to-delete"), true);
      assert.equal(await backend.stat("log/to-delete"), undefined);
      assert.equal(await backend.delete("log/to-delete"), false);
    });

    test("unsafe keys are refused with FERRY_CACHE_BAD_KEY by every operation", async () => {
      for (const key of ["../x", "/etc/passwd", "a//b", "nar/../../x", "", "./a", "a/"]) {
        await assert.rejects(backend.stat(key), isCode("FERRY_CACHE_BAD_KEY"), `stat ${key}`);
        await assert.rejects(backend.read(key), isCode("FERRY_CACHE_BAD_KEY"), `read ${key}`);
        await assert.rejects(backend.readBytes(key), isCode("FERRY_CACHE_BAD_KEY"), `readBytes ${key}`);
        await assert.rejects(backend.write(key, Buffer.from("x")), isCode("FERRY_CACHE_BAD_KEY"), `write ${key}`);
        await assert.rejects(backend.delete(key), isCode("FERRY_CACHE_BAD_KEY"), `delete ${key}`);
      }
    });

    test("etags change when the content changes, even at the same size", async () => {
      const a = await backend.write("roots/etag", Buffer.from("aaaa"));
      const b = await backend.write("roots/etag", Buffer.from("bbbb"));
      assert.notEqual(a.etag, b.etag);
      assert.equal((await backend.stat("roots/etag"))?.etag, b.etag);
      assert.deepEqual(Buffer.from((await backend.readBytes("roots/etag"))!), Buffer.from("bbbb"));
    });

    test("a write whose body fails leaves no object, and the old one where there was one", async () => {
      const fresh = "log/failed-fresh";
      const kept = "log/failed-kept";
      await backend.write(kept, Buffer.from("old content"));
      // Small (one PutObject on S3) and large (a multipart upload with a part already sent).
      for (const size of [1000, 9 * MiB]) {
        const data = bytes(size, size);
        for (const key of [fresh, kept]) {
          await assert.rejects(backend.write(key, chunks(data, 256 * 1024 > size ? 100 : 256 * 1024, size - 1)), /the source broke/);
        }
        assert.equal(await backend.stat(fresh), undefined, `nothing appears after a failed write of ${size} bytes`);
        assert.deepEqual(Buffer.from((await backend.readBytes(kept))!), Buffer.from("old content"), `the old object stays after a failed write of ${size} bytes`);
      }
      assert.deepEqual(await keysOf(backend, "log/failed"), [kept]);
    });

    test("maxBytes stops a write with FERRY_CACHE_TOO_LARGE and writes nothing", async () => {
      await assert.rejects(backend.write("log/too-large-bytes", bytes(101, 3), { maxBytes: 100 }), isCode("FERRY_CACHE_TOO_LARGE"));
      await assert.rejects(backend.write("log/too-large-stream", chunks(bytes(1000, 4), 64), { maxBytes: 999 }), isCode("FERRY_CACHE_TOO_LARGE"));
      // Past the first part of a multipart upload on S3.
      await assert.rejects(backend.write("log/too-large-big", chunks(bytes(10 * MiB, 5), MiB), { maxBytes: 9 * MiB }), isCode("FERRY_CACHE_TOO_LARGE"));
      assert.deepEqual(await keysOf(backend, "log/too-large"), []);
      const ok = await backend.write("log/exactly-max", chunks(bytes(100, 6), 7), { maxBytes: 100 });
      assert.equal(ok.size, 100);
    });

    test("a large streamed write (12 MiB, multipart on S3) round-trips byte-exact", async () => {
      const data = bytes(12 * MiB + 12345, 12);
      const info = await backend.write(NAR, chunks(data, 200 * 1024), { contentType: "application/x-nix-nar" });
      assert.equal(info.size, data.length);
      assert.equal((await backend.stat(NAR))?.etag, info.etag);
      const r = await backend.read(NAR);
      assert.ok(r);
      assert.equal(sha256(await readAll(r.body)), sha256(data));
      const across = await backend.read(NAR, { start: 8 * MiB - 10, end: 8 * MiB + 9 });
      assert.ok(across);
      assert.deepEqual(await readAll(across.body), data.subarray(8 * MiB - 10, 8 * MiB + 10), "a range across a part boundary");
    });

    test("list yields the objects under a prefix, nar/ apart from the top-level narinfos", async () => {
      const narinfo2 = "1123456789abcdfghijklmnpqrsvwxyz.narinfo";
      const nar2 = "nar/1123456789abcdfghijklmnpqrsvwxyz0123456789abcdfghi.nar";
      for (const key of ["nix-cache-info", NARINFO, narinfo2, nar2]) await backend.write(key, Buffer.from(key));
      await backend.write(NAR, bytes(10, 10));
      const all = await keysOf(backend, "");
      for (const key of ["nix-cache-info", NARINFO, narinfo2, NAR, nar2]) assert.ok(all.includes(key), `${key} is listed`);
      assert.deepEqual(
        all.filter((k) => k.endsWith(".narinfo")),
        [NARINFO, narinfo2],
      );
      const nars = await keysOf(backend, "nar/");
      assert.deepEqual(nars, [NAR, nar2]);
      assert.deepEqual(await keysOf(backend, "0123"), [NARINFO], "a prefix is a string prefix, not only a folder");
      assert.deepEqual(await keysOf(backend, "nar/1123"), [nar2]);
      assert.deepEqual(await keysOf(backend, "nothing-here/"), []);
      for await (const o of backend.list("nar/")) {
        const st = await backend.stat(o.key);
        assert.deepEqual({ size: o.size, etag: o.etag }, { size: st?.size, etag: st?.etag }, `list and stat agree on ${o.key}`);
      }
    });
  });
}

describe("S3 backend", () => {
  let server: S3Server;
  before(async () => {
    server = await startS3Server({ buckets: ["ferry", "many"] });
  });
  after(async () => {
    await server.stop();
  });

  test("openBackend opens s3:// URLs as an S3Backend", async () => {
    const b = await openBackend(`${server.url("ferry", "via-open")}&priority=30`);
    try {
      assert.ok(b instanceof S3Backend);
      await b.write("nix-cache-info", Buffer.from("StoreDir: /nix/store\n"));
      assert.equal((await b.stat("nix-cache-info"))?.size, 21);
    } finally {
      await b.close();
    }
  });

  test("keys live under the URL's prefix and are listed without it", async () => {
    const prefixed = await S3Backend.open(server.url("ferry", "a/b"));
    const root = await S3Backend.open(server.url("ferry"));
    try {
      await prefixed.write(NARINFO, Buffer.from("StorePath: x\n"));
      assert.ok((await keysOf(root, "a/b/")).includes(`a/b/${NARINFO}`));
      assert.ok((await keysOf(prefixed, "")).includes(NARINFO));
      assert.equal(await root.stat(NARINFO), undefined);
    } finally {
      await prefixed.close();
      await root.close();
    }
  });

  test("list pages through more than 1000 objects (ListObjectsV2 continuation)", async () => {
    const b = await S3Backend.open(server.url("many"));
    try {
      const n = 1050;
      let next = 0;
      const worker = async () => {
        for (let i = next++; i < n; i = next++) await b.write(`log/${String(i).padStart(32, "0")}-x.drv`, Buffer.from([i & 0xff]));
      };
      await Promise.all(Array.from({ length: 16 }, worker));
      await b.write("nix-cache-info", Buffer.from("StoreDir: /nix/store\n"));
      const logs = await keysOf(b, "log/");
      assert.equal(logs.length, n);
      assert.equal(new Set(logs).size, n, "no object is listed twice");
      assert.equal((await keysOf(b, "")).length, n + 1);
    } finally {
      await b.close();
    }
  });

  test("a closed port is FERRY_CACHE_UNREACHABLE, naming the endpoint", async () => {
    const port = await new Promise<number>((resolve) => {
      const s = createServer().listen(0, "127.0.0.1", () => {
        const p = (s.address() as { port: number }).port;
        s.close(() => resolve(p));
      });
    });
    const endpoint = `http://127.0.0.1:${port}`;
    const b = await S3Backend.open(`s3://ferry?endpoint=${encodeURIComponent(endpoint)}`, { maxAttempts: 2, connectTimeoutMs: 2000 });
    try {
      for (const op of [() => b.stat("nix-cache-info"), () => b.write("nix-cache-info", Buffer.from("x")), () => keysOf(b, "")]) {
        const e = await op().then(
          () => assert.fail("expected FERRY_CACHE_UNREACHABLE"),
          (err: unknown) => err,
        );
        assert.ok(isFerryError(e, "FERRY_CACHE_UNREACHABLE"), String(e));
        assert.ok(e.hint?.includes(endpoint), e.hint);
      }
    } finally {
      await b.close();
    }
  });

  test("unknown credentials are FERRY_CACHE_DENIED; a missing bucket is FERRY_CACHE_IO naming it", async () => {
    const saved = process.env.AWS_ACCESS_KEY_ID;
    process.env.AWS_ACCESS_KEY_ID = "NOT-AN-ACCOUNT";
    const denied = await S3Backend.open(server.url("ferry"), { maxAttempts: 1 });
    try {
      await assert.rejects(denied.stat("nix-cache-info"), isCode("FERRY_CACHE_DENIED"));
      await assert.rejects(denied.write("nix-cache-info", Buffer.from("x")), isCode("FERRY_CACHE_DENIED"));
    } finally {
      process.env.AWS_ACCESS_KEY_ID = saved;
      await denied.close();
    }
    const nobucket = await S3Backend.open(server.url("no-such-bucket"), { maxAttempts: 1 });
    try {
      const e = await nobucket.write("nix-cache-info", Buffer.from("x")).then(
        () => assert.fail("expected an error"),
        (err: unknown) => err,
      );
      assert.ok(isFerryError(e, "FERRY_CACHE_IO"), String(e));
      assert.match(e.hint ?? "", /no-such-bucket/);
    } finally {
      await nobucket.close();
    }
  });

  test("s3 URLs: Nix's parameters, defaults, and refusals", () => {
    assert.deepEqual(parseS3Url("s3://bucket"), { bucket: "bucket", prefix: "", region: "us-east-1", endpoint: undefined, profile: undefined });
    assert.deepEqual(parseS3Url("s3://my.bucket/some/prefix/?region=eu-west-1&profile=cache&endpoint=minio.local:9000&scheme=http"), {
      bucket: "my.bucket",
      prefix: "some/prefix",
      region: "eu-west-1",
      endpoint: "http://minio.local:9000",
      profile: "cache",
    });
    assert.equal(parseS3Url("s3://b?endpoint=https://s3.example.org").endpoint, "https://s3.example.org");
    assert.equal(parseS3Url("s3://b?write-nar-listing=1").bucket, "b", "Nix store settings in a copied URL are accepted");
    for (const bad of ["s3://b?endpont=http://x", "s3://b/a%2F..%2Fx", "s3://b/with%20space", "s3://b?scheme=ftp", "s3://b?endpoint=ftp://x", "s3://user:pw@b", "s3://b:9000"]) {
      assert.throws(() => parseS3Url(bad), isCode("FERRY_CACHE_BAD_URL"), bad);
    }
  });
});

/**
 * Runs s3rver on 127.0.0.1 (started by s3-server.ts as a child process; not a test itself).
 *
 *   node --openssl-legacy-provider s3-server-main.js DIR BUCKET...
 *
 * Prints `{"port":N}` on stdout once it listens and exits when stdin closes, so it never
 * outlives the test process that started it. It runs in its own process because s3rver's
 * ListObjectsV2 continuation tokens are DES-encrypted, which OpenSSL 3 only offers in its
 * legacy provider (a node flag), and because s3rver installs its own exception handlers.
 */
import { createCipheriv } from "node:crypto";
import { createRequire } from "node:module";

interface S3rverInstance {
  run(): Promise<{ port: number }>;
}
type S3rverClass = new (opts: Record<string, unknown>) => S3rverInstance;

const [dir, ...buckets] = process.argv.slice(2);
if (dir === undefined) throw new Error("usage: s3-server-main DIR BUCKET...");
try {
  createCipheriv("des", Buffer.alloc(8), Buffer.alloc(8));
} catch (e) {
  throw new Error(`s3rver needs DES for ListObjectsV2 pagination and this node has no OpenSSL legacy provider: ${(e as Error).message}`, { cause: e });
}
const S3rver = createRequire(import.meta.url)("s3rver") as S3rverClass;
const server = new S3rver({
  address: "127.0.0.1",
  port: 0,
  silent: true,
  directory: dir,
  configureBuckets: buckets.map((name) => ({ name })),
});
const { port } = await server.run();
process.stdout.write(`${JSON.stringify({ port })}\n`);
process.stdin.on("data", () => undefined);
// Exits at once: the objects live in a directory the parent removes, and waiting for clients'
// keep-alive connections to close could hang the parent's stop().
process.stdin.on("end", () => process.exit(0));

/**
 * A local S3-compatible server for tests: s3rver on 127.0.0.1 with a random port and a
 * temporary directory, in a child process (see s3-server-main.ts for why).
 *
 * Starting one sets AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in this process to s3rver's
 * account (S3RVER/S3RVER), so backends find them through the SDK's default chain as they
 * would in production; `env` carries the same for subprocesses. `stop` restores them.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export interface S3Server {
  /** http://127.0.0.1:PORT */
  readonly endpoint: string;
  /** What a subprocess needs in its environment to reach the server with the SDK's default chain. */
  readonly env: Readonly<Record<string, string>>;
  /** The s3:// cache URL of `bucket` (under `prefix`) on this server. */
  url(bucket: string, prefix?: string): string;
  /** Creates a bucket (no error if it exists). */
  createBucket(name: string): Promise<void>;
  stop(): Promise<void>;
}

export interface S3ServerOptions {
  /** Buckets to create before the server answers (default ["ferry"]). */
  readonly buckets?: readonly string[];
}

const CREDENTIALS = {
  AWS_ACCESS_KEY_ID: "S3RVER",
  AWS_SECRET_ACCESS_KEY: "S3RVER",
  // The SDK warns on every process that node 20 loses support in 2027; not news in test logs.
  AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: "true",
};

function waitForPort(child: ChildProcess): Promise<number> {
  return new Promise((resolve, reject) => {
    let out = "";
    let err = "";
    child.stdout!.setEncoding("utf8").on("data", (d: string) => {
      out += d;
      const line = out.split("\n")[0];
      if (out.includes("\n") && line !== undefined) {
        try {
          resolve((JSON.parse(line) as { port: number }).port);
        } catch {
          reject(new Error(`s3rver printed ${JSON.stringify(line)} instead of its port`));
        }
      }
    });
    child.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
    child.on("error", reject);
    child.on("exit", (code) => reject(new Error(`s3rver exited with ${code} before listening: ${err}`)));
  });
}

export async function startS3Server(opts: S3ServerOptions = {}): Promise<S3Server> {
  const dir = mkdtempSync(join(tmpdir(), "ferry-s3rver-"));
  const main = fileURLToPath(new URL("./s3-server-main.js", import.meta.url));
  const child = spawn(process.execPath, ["--openssl-legacy-provider", main, dir, ...(opts.buckets ?? ["ferry"])], {
    stdio: ["pipe", "pipe", "pipe"],
  });
  let port: number;
  try {
    port = await waitForPort(child);
  } catch (e) {
    child.kill();
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
  const endpoint = `http://127.0.0.1:${port}`;
  const saved = Object.fromEntries(Object.keys(CREDENTIALS).map((k) => [k, process.env[k]]));
  Object.assign(process.env, CREDENTIALS);
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  return {
    endpoint,
    env: { ...CREDENTIALS },
    url: (bucket, prefix) => `s3://${bucket}${prefix ? `/${prefix}` : ""}?endpoint=${encodeURIComponent(endpoint)}`,
    async createBucket(name) {
      const sdk = await import("@aws-sdk/client-s3");
      const client = new sdk.S3Client({ endpoint, region: "us-east-1", forcePathStyle: true, credentials: { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" } });
      try {
        await client.send(new sdk.CreateBucketCommand({ Bucket: name }));
      } catch (e) {
        if ((e as { name?: string }).name !== "BucketAlreadyOwnedByYou" && (e as { name?: string }).name !== "BucketAlreadyExists") throw e;
      } finally {
        client.destroy();
      }
    },
    async stop() {
      child.stdin!.end();
      await exited;
      for (const [k, v] of Object.entries(saved)) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

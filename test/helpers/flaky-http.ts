/**
 * A small static HTTP server over a cache directory that misbehaves on purpose: it can cut a
 * NAR download after some bytes (to test resumption with Range). It honours single ranges.
 * Only for tests; the real server is `ferry cache serve`.
 */
import * as fs from "node:fs";
import * as http from "node:http";
import { join } from "node:path";
import type { AddressInfo } from "node:net";

export interface FlakyServer {
  readonly url: string;
  /** Every request as "METHOD path [range]". */
  readonly log: string[];
  /** Cut the next `n` NAR responses after `bytes` bytes. */
  cutNars(n: number, bytes: number): void;
  close(): Promise<void>;
}

export async function startFlakyServer(dir: string): Promise<FlakyServer> {
  const log: string[] = [];
  let cuts = 0;
  let cutBytes = 0;
  const server = http.createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url!, "http://x").pathname).replace(/^\/+/, "");
    log.push(`${req.method} ${path}${req.headers.range ? ` ${req.headers.range}` : ""}`);
    const file = join(dir, path);
    if (path.includes("..") || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404).end();
      return;
    }
    const data = fs.readFileSync(file);
    let start = 0;
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
    if (m) start = Number(m[1]);
    const body = data.subarray(start);
    const headers = { "content-length": body.length, ...(m ? { "content-range": `bytes ${start}-${data.length - 1}/${data.length}` } : {}) };
    res.writeHead(m ? 206 : 200, headers);
    if (req.method === "HEAD") return void res.end();
    if (path.startsWith("nar/") && cuts > 0 && body.length > cutBytes) {
      cuts--;
      res.write(body.subarray(0, cutBytes), () => setTimeout(() => res.socket?.destroy(), 20));
      return;
    }
    res.end(body);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    log,
    cutNars(n, bytes) {
      cuts = n;
      cutBytes = bytes;
    },
    close: () =>
      new Promise<void>((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}

/**
 * A real PostgreSQL server for tests, started on loopback in a temporary directory with
 * Debian's binaries (initdb refuses root, so the cluster belongs to the `postgres` user when
 * the tests run as root). fsync is off: the tests check behaviour, not durability of the server.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface PostgresServer {
  readonly url: string;
  readonly port: number;
  /** Stops the server hard (like a crash) or cleanly. */
  stop(mode?: "fast" | "immediate"): Promise<void>;
  /** Starts it again on the same port and data (after stop). */
  start(): Promise<void>;
  /** Stops it and removes its data. */
  destroy(): Promise<void>;
}

function binDir(): string | undefined {
  const base = "/usr/lib/postgresql";
  if (!fs.existsSync(base)) return undefined;
  const v = fs.readdirSync(base).filter((d) => fs.existsSync(join(base, d, "bin", "initdb"))).sort((a, b) => Number(b) - Number(a))[0];
  return v === undefined ? undefined : join(base, v, "bin");
}

export function havePostgres(): boolean {
  return binDir() !== undefined;
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export async function startPostgres(): Promise<PostgresServer> {
  const bin = binDir();
  if (!bin) throw new Error("PostgreSQL is not installed (apt-get install postgresql)");
  const dir = fs.mkdtempSync(join(tmpdir(), "ferry-pg-"));
  const asRoot = process.getuid?.() === 0;
  // setpriv execs the command itself (runuser would stay in between and not pass every signal on).
  const runAs = (cmd: string, args: string[]): string[] => (asRoot ? ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", cmd, ...args] : [cmd, ...args]);
  if (asRoot) {
    fs.chmodSync(dir, 0o755);
    spawnSync("chown", ["postgres:postgres", dir]);
  }
  const data = join(dir, "data");
  const [c, ...a] = runAs(join(bin, "initdb"), ["-D", data, "-A", "trust", "-U", "ferry", "--no-sync", "-E", "UTF8"]);
  const init = spawnSync(c!, a, { encoding: "utf8" });
  if (init.status !== 0) throw new Error(`initdb failed: ${init.stderr}`);
  const port = await freePort();
  let child: ChildProcess | undefined;
  const start = async () => {
    const [cmd, ...args] = runAs(join(bin, "postgres"), ["-D", data, "-p", String(port), "-k", dir, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"]);
    child = spawn(cmd!, args, { stdio: ["ignore", "ignore", "pipe"] });
    let err = "";
    child.stderr!.on("data", (b: Buffer) => (err += b.toString()));
    for (let i = 0; i < 300; i++) {
      const ok = await new Promise<boolean>((resolve) => {
        const s = net.connect(port, "127.0.0.1", () => {
          s.end();
          resolve(true);
        });
        s.on("error", () => resolve(false));
      });
      if (ok && /ready to accept connections/.test(err)) return;
      if (child.exitCode !== null) throw new Error(`postgres exited: ${err}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`postgres did not start: ${err}`);
  };
  const stop = async (mode: "fast" | "immediate" = "fast") => {
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((r) => child!.once("exit", r));
    child.kill(mode === "fast" ? "SIGINT" : "SIGQUIT");
    await exited;
  };
  await start();
  return {
    url: `postgres://ferry@127.0.0.1:${port}/postgres`,
    port,
    stop,
    start,
    destroy: async () => {
      await stop("immediate");
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

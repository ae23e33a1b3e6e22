/**
 * A fetch worker thread: downloads, unpacks and checks NARs for the main thread's
 * substituter (fetch-nar.ts), so that unpacking, hashing and decompression use every core.
 * Messages in: FetchRequest. Messages out: FetchReply, and { bytes } progress now and then.
 */
import { parentPort } from "node:worker_threads";
import type { NarInfo } from "../core/narinfo.js";
import { asFerryError, errorBody } from "../core/errors.js";
import type { CacheBackend } from "./backend.js";
import { fetchNarToTemp } from "./fetch-nar.js";
import { openBackend } from "./open.js";

export interface FetchRequest {
  readonly id: number;
  readonly url: string;
  readonly token: string | undefined;
  readonly info: NarInfo;
  readonly tmpPath: string;
  readonly fsync: boolean;
}

export type FetchReply = { readonly id: number; readonly ok: true } | { readonly id: number; readonly ok: false; readonly error: { code: string; message: string; hint?: string } };

const port = parentPort!;
const backends = new Map<string, Promise<CacheBackend>>();
let bytes = 0;
setInterval(() => {
  if (bytes > 0) port.postMessage({ bytes });
  bytes = 0;
}, 100).unref();

port.on("message", (m: FetchRequest | "close") => {
  if (m === "close") {
    void Promise.all([...backends.values()].map(async (b) => (await b).close())).finally(() => port.close());
    return;
  }
  void (async (): Promise<FetchReply> => {
    try {
      const key = `${m.url}\0${m.token ?? ""}`;
      let be = backends.get(key);
      if (!be) backends.set(key, (be = openBackend(m.url, { token: m.token })));
      await fetchNarToTemp(await be, m.info, m.tmpPath, { fsync: m.fsync, onBytes: (n) => (bytes += n) });
      return { id: m.id, ok: true };
    } catch (e) {
      const err = asFerryError(e);
      return { id: m.id, ok: false, error: errorBody(err) };
    }
  })().then((reply) => port.postMessage(reply));
});

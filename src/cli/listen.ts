/** `--listen HOST:PORT` for the commands that serve (cache serve, farm serve). */
import { FerryError } from "../core/errors.js";

export function parseListen(text: string, code = "FERRY_CACHE_BAD_LISTEN"): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) {
    throw new FerryError(code, `'${text}' is not HOST:PORT`, {
      hint: "e.g. --listen 127.0.0.1:8080, --listen 0.0.0.0:80, --listen [::1]:8080 (port 0 picks a free port)",
    });
  }
  return { host: m[1] ?? (m[2] || "127.0.0.1"), port };
}

/**
 * Scheduling leadership: of the coordinators sharing one database, exactly one schedules and
 * talks to workers. On PostgreSQL the leader holds a session-level advisory lock on a
 * connection of its own, and loses leadership the moment that connection fails (the server
 * restarted, the network broke): PostgreSQL releases the lock with the session, so another
 * coordinator (or this one, reconnected) can take over. The leader's row in `farm_leader`
 * names its URL, so the others can redirect workers to it. On PGlite the database belongs to
 * one process, which is always the leader.
 */
import pg from "pg";
import { sql } from "kysely";
import type { FarmDatabase } from "../db/index.js";

/** The advisory lock key: "ferry-farm-leader" folded into a bigint. */
const LOCK_KEY = 0x66657272796c6561n;

export interface LeadershipEvents {
  /** This process became the leader. */
  onGained(): void;
  /** This process is no longer the leader (its lock connection failed). */
  onLost(reason: string): void;
}

export interface Leadership {
  readonly isLeader: () => boolean;
  /** The URL of the current leader, as recorded in the database (undefined when none is). */
  leaderUrl(): Promise<string | undefined>;
  close(): Promise<void>;
}

export interface LeadershipOptions {
  readonly db: FarmDatabase;
  /** An id for this process (shown in `farm_leader`). */
  readonly owner: string;
  /** The URL workers should dial to reach this coordinator. */
  readonly url: string;
  /** How often a follower tries for the lock, and the leader checks its connection (ms). */
  readonly pollMs?: number;
}

export function startLeadership(opts: LeadershipOptions, events: LeadershipEvents): Leadership {
  const db = opts.db.db;
  const pollMs = opts.pollMs ?? 1000;
  let leader = false;
  let closed = false;
  let client: pg.Client | undefined;
  let timer: NodeJS.Timeout | undefined;

  const record = () => sql`
    insert into farm_leader (id, owner, url, since) values (1, ${opts.owner}, ${opts.url}, now())
    on conflict (id) do update set owner = excluded.owner, url = excluded.url, since = excluded.since`.execute(db);

  const lose = (reason: string) => {
    const c = client;
    client = undefined;
    c?.end().catch(() => undefined);
    if (leader) {
      leader = false;
      events.onLost(reason);
    }
  };

  const tick = async (): Promise<void> => {
    if (closed) return;
    if (opts.db.kind === "pglite") {
      if (!leader) {
        await record();
        leader = true;
        events.onGained();
      }
      return;
    }
    if (client) {
      // The leader's check that its lock connection is alive.
      await client.query("select 1");
      return;
    }
    const c = new pg.Client({ connectionString: opts.db.url });
    c.on("error", (e: Error) => lose(`the leader's database connection failed: ${e.message}`));
    c.on("end", () => lose("the leader's database connection ended"));
    await c.connect();
    const r = await c.query<{ ok: boolean }>("select pg_try_advisory_lock($1) as ok", [LOCK_KEY.toString()]);
    if (!r.rows[0]?.ok) {
      await c.end();
      return;
    }
    client = c;
    await record();
    if (closed) return;
    leader = true;
    events.onGained();
  };

  let running = false;
  const loop = () => {
    if (running || closed) return;
    running = true;
    tick()
      .catch((e: unknown) => lose(`the leader's database connection failed: ${(e as Error).message}`))
      .finally(() => {
        running = false;
        if (!closed) timer = setTimeout(loop, pollMs);
      });
  };
  loop();

  return {
    isLeader: () => leader,
    leaderUrl: async () => {
      const r = await sql<{ url: string }>`select url from farm_leader where id = 1`.execute(db);
      return r.rows[0]?.url;
    },
    close: async () => {
      closed = true;
      if (timer) clearTimeout(timer);
      const c = client;
      client = undefined;
      const was = leader || opts.db.kind === "pglite";
      leader = false;
      // Leaving: no longer named as the leader (workers are not redirected to a closed door).
      if (was) await sql`delete from farm_leader where owner = ${opts.owner}`.execute(db).catch(() => undefined);
      if (c) await c.end().catch(() => undefined);
    },
  };
}

/**
 * Scheduling leadership: of the coordinators sharing one database, exactly one schedules and
 * talks to workers. On PostgreSQL the leader holds a session-level advisory lock on a
 * connection of its own, and loses leadership the moment that connection fails (the server
 * restarted, the network broke): PostgreSQL releases the lock with the session, so another
 * coordinator (or this one, reconnected) can take over. The leader's row in `farm_leader`
 * names its URL, so the others can redirect workers to it. On PGlite the database belongs to
 * one process, which is always the leader.
 *
 * Contract (PostgreSQL):
 * - A follower waits for the lock on its own connection (`pg_advisory_lock` under a
 *   `lock_timeout`, then again), so it takes over as soon as the leader's session ends.
 * - The leader checks its lock connection every `pollMs`; a check that fails or gets no answer
 *   within `pollMs` + CHECK_TIMEOUT_MS ends leadership (`onLost`) before the server would give
 *   the lock to another: the lock session asks the server to probe it with TCP keepalives that
 *   declare a silent client dead only after a longer time (SERVER_KEEPALIVE).
 * - `leaderUrl()` names a leader only while the session that holds the lock belongs to the
 *   coordinator the `farm_leader` row names (the lock connections carry the owner in their
 *   application_name), so a row left by a killed leader sends no worker to a dead address.
 */
import pg from "pg";
import { sql } from "kysely";
import type { FarmDatabase } from "../db/index.js";

/** The advisory lock key: "ferry-farm-leader" folded into a bigint. */
export const LEADER_LOCK_KEY = 0x66657272796c6561n;
const LOCK_KEY = LEADER_LOCK_KEY;
/** How pg_locks shows a bigint advisory key: its high and low 32 bits. */
const LOCK_HI = Number(LOCK_KEY >> 32n);
const LOCK_LO = Number(LOCK_KEY & 0xffffffffn);
/** The application_name prefix of lock connections (the owner follows). */
export const LEADER_APP_PREFIX = "ferry-farm-leader ";
const APP_PREFIX = LEADER_APP_PREFIX;
/** How much longer than `pollMs` a query on the lock connection may go unanswered. */
const CHECK_TIMEOUT_MS = 5000;
/**
 * How the server notices a lock session whose client vanished (no FIN: a machine or network
 * gone): keepalive probes when idle (idle, interval in s, probes) and a limit on unacknowledged
 * data (ms): the lock is freed after ~16 s, well after the leader itself stepped down.
 */
const SERVER_KEEPALIVE = { idle: 10, interval: 2, count: 3, userTimeoutMs: 16_000 } as const;
/** application_name is cut at 63 bytes; owners are ASCII ids. */
const APP_NAME_MAX = 63;

export interface LeadershipEvents {
  /** This process became the leader. */
  onGained(): void;
  /** This process is no longer the leader (its lock connection failed). */
  onLost(reason: string): void;
}

export interface Leadership {
  readonly isLeader: () => boolean;
  /** The URL of the current leader, as recorded in the database (undefined when none leads). */
  leaderUrl(): Promise<string | undefined>;
  close(): Promise<void>;
}

export interface LeadershipOptions {
  readonly db: FarmDatabase;
  /** An id for this process (shown in `farm_leader`), unique among the coordinators. */
  readonly owner: string;
  /** The URL workers should dial to reach this coordinator. */
  readonly url: string;
  /** How often the leader checks its connection, and how long a follower's wait for the lock lasts before it waits again (ms). */
  readonly pollMs?: number;
}

/**
 * The URL of the coordinator that leads, as `farm_leader` records it, but only while the
 * session holding the lock is that coordinator's (a row left by a leader that died names no
 * one). Any coordinator may ask, with or without a dispatcher of its own.
 */
export async function currentLeaderUrl(fdb: FarmDatabase): Promise<string | undefined> {
  if (fdb.kind === "pglite") {
    const r = await sql<{ url: string }>`select url from farm_leader where id = 1`.execute(fdb.db);
    return r.rows[0]?.url;
  }
  const r = await sql<{ url: string }>`
    select l.url from farm_leader l
    where l.id = 1 and exists (
      select 1 from pg_locks k join pg_stat_activity a on a.pid = k.pid
      where k.locktype = 'advisory' and k.classid = ${LOCK_HI} and k.objid = ${LOCK_LO} and k.objsubid = 1 and k.granted
        and a.application_name = left(${APP_PREFIX} || l.owner, ${APP_NAME_MAX}))`.execute(fdb.db);
  return r.rows[0]?.url;
}

export function startLeadership(opts: LeadershipOptions, events: LeadershipEvents): Leadership {
  const db = opts.db.db;
  const pollMs = opts.pollMs ?? 1000;
  let leader = false;
  let closed = false;
  /** The lock connection (a follower's, waiting for the lock, or the leader's, holding it). */
  let client: pg.Client | undefined;
  /** The backend process of `client` (to cancel a follower's wait when closing). */
  let backendPid: number | undefined;
  let timer: NodeJS.Timeout | undefined;

  const record = () => sql`
    insert into farm_leader (id, owner, url, since) values (1, ${opts.owner}, ${opts.url}, now())
    on conflict (id) do update set owner = excluded.owner, url = excluded.url, since = excluded.since`.execute(db);

  /** Drops the lock connection `c` (if it is still the current one), and leadership with it. */
  const lose = (c: pg.Client | undefined, reason: string) => {
    if (c === undefined || c !== client) return;
    client = undefined;
    c.end().catch(() => undefined);
    if (leader) {
      leader = false;
      events.onLost(reason);
    }
  };

  const connect = async (): Promise<pg.Client> => {
    const c = new pg.Client({ connectionString: opts.db.url, application_name: `${APP_PREFIX}${opts.owner}`.slice(0, APP_NAME_MAX), keepAlive: true, query_timeout: pollMs + CHECK_TIMEOUT_MS });
    c.on("error", (e: Error) => lose(c, `the leader's database connection failed: ${e.message}`));
    c.on("end", () => lose(c, "the leader's database connection ended"));
    client = c;
    backendPid = undefined;
    await c.connect();
    await c.query(`set lock_timeout = ${Math.max(1, Math.round(pollMs))}`);
    const k = SERVER_KEEPALIVE;
    // Best effort, each on its own (tcp_user_timeout is PostgreSQL 12+; a server on a Unix socket has no TCP).
    for (const [name, value] of [["tcp_keepalives_idle", k.idle], ["tcp_keepalives_interval", k.interval], ["tcp_keepalives_count", k.count], ["tcp_user_timeout", k.userTimeoutMs]] as const) {
      await c.query(`set ${name} = ${value}`).catch(() => undefined);
    }
    backendPid = (await c.query<{ pid: number }>("select pg_backend_pid() as pid")).rows[0]?.pid;
    return c;
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
    if (leader) {
      // The leader's check that its lock connection is alive.
      await client!.query("select 1");
      return;
    }
    const c = client ?? (await connect());
    try {
      await c.query("select pg_advisory_lock($1)", [LOCK_KEY.toString()]);
    } catch (e) {
      // 55P03: the lock_timeout passed (another coordinator leads); wait again.
      if ((e as { code?: string }).code === "55P03") return;
      throw e;
    }
    if (closed || c !== client) return;
    await record();
    if (closed || c !== client) return;
    leader = true;
    events.onGained();
  };

  let running = false;
  const loop = () => {
    if (running || closed) return;
    running = true;
    const wasLeader = leader;
    tick()
      .then(
        () => true,
        (e: unknown) => {
          lose(client, `the leader's database connection failed: ${(e as Error).message}`);
          return false;
        },
      )
      .then((ok) => {
        running = false;
        // A follower whose wait timed out waits again at once; the leader checks every pollMs.
        if (!closed) timer = setTimeout(loop, ok && !wasLeader && !leader ? 0 : pollMs);
      });
  };
  loop();

  return {
    isLeader: () => leader,
    leaderUrl: () => currentLeaderUrl(opts.db),
    close: async () => {
      closed = true;
      if (timer) clearTimeout(timer);
      const c = client;
      client = undefined;
      const was = leader || opts.db.kind === "pglite";
      leader = false;
      // Leaving: no longer named as the leader (workers are not redirected to a closed door).
      if (was) await sql`delete from farm_leader where owner = ${opts.owner}`.execute(db).catch(() => undefined);
      if (c) {
        // A follower's backend may be waiting for the lock: cancel the wait, so it does not take the lock after we left.
        if (!was && backendPid !== undefined) await sql`select pg_cancel_backend(${backendPid})`.execute(db).catch(() => undefined);
        await c.end().catch(() => undefined);
      }
      while (running) await new Promise((r) => setTimeout(r, 10));
    },
  };
}

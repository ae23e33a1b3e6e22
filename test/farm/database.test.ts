/**
 * The farm's database on both engines: the embedded PGlite and a real PostgreSQL started on
 * loopback. Same migrations, same SQL; migrations apply once even when coordinators start
 * together; steps are claimed with FOR UPDATE SKIP LOCKED so two coordinators never take the
 * same one; a restarted PostgreSQL is reconnected to.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { sql } from "kysely";
import { openFarmDatabase, migrateFarmDatabase, migrationNames, type FarmDatabase } from "../../src/farm/db/index.js";
import { useFarmEngines } from "../helpers/farm-db.js";

describe("farm database", () => {
  const farm = useFarmEngines("ferry-farm-db-");
  const engines = () => (["pglite", "postgres"] as const).map((name) => ({ name, open: () => farm.open(name) }));

  test("the migrations apply once on each engine, with per-migration results, and the data survives a reopen", async () => {
    for (const e of engines()) {
      const a = await e.open();
      try {
        const first = await migrateFarmDatabase(a);
        assert.equal(first.error, undefined, `${e.name}: ${String(first.error)}`);
        assert.deepEqual(first.results?.map((r) => [r.migrationName, r.status]), migrationNames().map((n) => [n, "Success"]));
        await a.db.insertInto("projects").values({ name: `p-${e.name}` }).execute();
      } finally {
        await a.close();
      }
      const b = await e.open();
      try {
        const again = await migrateFarmDatabase(b);
        assert.deepEqual(again.results, [], `${e.name}: nothing left to apply`);
        const rows = await b.db.selectFrom("projects").select("name").execute();
        assert.deepEqual(rows.map((r) => r.name), [`p-${e.name}`]);
      } finally {
        await b.close();
      }
    }
  });

  test("two coordinators starting together on PostgreSQL apply each migration once", async () => {
    const { url } = farm.pg();
    // a fresh database for this test
    const admin = await openFarmDatabase({ url });
    await sql.raw("create database together").execute(admin.db);
    await admin.close();
    const u = url.replace(/\/postgres$/, "/together");
    const dbs = await Promise.all([openFarmDatabase({ url: u }), openFarmDatabase({ url: u })]);
    try {
      const results = await Promise.all(dbs.map((d) => migrateFarmDatabase(d)));
      for (const r of results) assert.equal(r.error, undefined, String(r.error));
      const applied = results.flatMap((r) => r.results ?? []).filter((x) => x.status === "Success").map((x) => x.migrationName);
      assert.deepEqual(applied.sort(), migrationNames().sort());
    } finally {
      await Promise.all(dbs.map((d) => d.close()));
    }
  });

  test("FOR UPDATE SKIP LOCKED: two coordinators claiming at once never take the same step", async () => {
    const a = await openFarmDatabase({ url: farm.pg().url, poolSize: 4 });
    const b = await openFarmDatabase({ url: farm.pg().url, poolSize: 4 });
    try {
      await a.db.deleteFrom("steps").execute();
      const n = 200;
      await a.db
        .insertInto("steps")
        .values(Array.from({ length: n }, (_, i) => ({ drv_path: `/ferry/store/${String(i).padStart(32, "0")}-s${i}.drv`, name: `s${i}`, system: "x86_64-linux", not_before: null, lease_owner: null, lease_expires_at: null, machine: null, started_at: null, finished_at: null, duration_ms: null, error: null })))
        .execute();
      const claim = (d: FarmDatabase, owner: string) =>
        d.db.transaction().execute(async (tx) => {
          const rows = await sql<{ id: string }>`
            select id from steps where status = 'queued' and system = 'x86_64-linux'
            order by bump desc, id limit 5 for update skip locked`.execute(tx);
          const ids = rows.rows.map((r) => r.id);
          if (ids.length) await tx.updateTable("steps").set({ status: "running", lease_owner: owner }).where("id", "in", ids).execute();
          return ids;
        });
      const claimed: string[] = [];
      const worker = async (d: FarmDatabase, owner: string) => {
        for (;;) {
          const ids = await claim(d, owner);
          if (ids.length === 0) return;
          claimed.push(...ids);
        }
      };
      await Promise.all([worker(a, "a1"), worker(a, "a2"), worker(b, "b1"), worker(b, "b2")]);
      assert.equal(claimed.length, n, "every step claimed");
      assert.equal(new Set(claimed).size, n, "no step claimed twice");
      const owners = await a.db.selectFrom("steps").select(({ fn }) => ["lease_owner", fn.countAll().as("n")]).groupBy("lease_owner").execute();
      assert.ok(owners.length >= 2, "the work was shared");
    } finally {
      await a.close();
      await b.close();
    }
  });

  test("a PostgreSQL restart: queries fail while it is down, then the same handle carries on", async () => {
    const d = await openFarmDatabase({ url: farm.pg().url });
    try {
      await d.db.selectFrom("projects").selectAll().execute();
      await farm.pg().stop("immediate");
      await assert.rejects(d.db.selectFrom("projects").selectAll().execute());
      await farm.pg().start();
      let ok = false;
      for (let i = 0; i < 50 && !ok; i++) {
        try {
          await d.db.selectFrom("projects").selectAll().execute();
          ok = true;
        } catch {
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      assert.ok(ok, "reconnected after the restart");
    } finally {
      await d.close();
    }
  });

  test("a URL that is not PostgreSQL's is refused with a hint", async () => {
    await assert.rejects(openFarmDatabase({ url: "mysql://x" }), { code: "FERRY_FARM_BAD_DATABASE" });
  });
});

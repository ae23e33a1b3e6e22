/**
 * The local store's SQLite metadata: Nix's own layout (ValidPaths, Refs), with numbered
 * migrations tracked in `PRAGMA user_version`. Hashes are stored as `sha256:<base16>` like Nix.
 */
export const MIGRATIONS: readonly string[] = [
  // 1: valid paths and references
  `
  CREATE TABLE ValidPaths (
    id               INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    path             TEXT UNIQUE NOT NULL,
    hash             TEXT NOT NULL,
    registrationTime INTEGER NOT NULL,
    deriver          TEXT,
    narSize          INTEGER,
    ultimate         INTEGER,
    sigs             TEXT,
    ca               TEXT
  );
  CREATE TABLE Refs (
    referrer  INTEGER NOT NULL,
    reference INTEGER NOT NULL,
    PRIMARY KEY (referrer, reference),
    FOREIGN KEY (referrer) REFERENCES ValidPaths(id) ON DELETE CASCADE,
    FOREIGN KEY (reference) REFERENCES ValidPaths(id) ON DELETE RESTRICT
  );
  CREATE INDEX IndexReferrer ON Refs(referrer);
  CREATE INDEX IndexReference ON Refs(reference);
  `,
  // 2: a counter GC bumps whenever it deletes paths (lets writers memoise validity safely)
  `
  CREATE TABLE GcGeneration (id INTEGER PRIMARY KEY CHECK (id = 0), generation INTEGER NOT NULL);
  INSERT INTO GcGeneration (id, generation) VALUES (0, 0);
  `,
  // 3: temp roots live in the database, so rooting serialises with GC
  `
  CREATE TABLE TempRoots (owner TEXT NOT NULL, path TEXT NOT NULL);
  CREATE INDEX IndexTempRootsOwner ON TempRoots(owner);
  `,
  // 4: a temp-root row holds a whole batch of paths (newline-separated), one insert per batch
  `
  ALTER TABLE TempRoots RENAME COLUMN path TO paths;
  `,
  // 5: temp roots moved to their own database (TEMP_ROOTS_SCHEMA), so that rooting never waits
  // for a long registration transaction
  `
  DROP TABLE TempRoots;
  `,
  // 6: references in a table clustered on its key (one B-tree instead of the table, its key's
  // index and an index on referrer, which the key already serves): a third of the writes
  `
  CREATE TABLE RefsByKey (
    referrer  INTEGER NOT NULL,
    reference INTEGER NOT NULL,
    PRIMARY KEY (referrer, reference),
    FOREIGN KEY (referrer) REFERENCES ValidPaths(id) ON DELETE CASCADE,
    FOREIGN KEY (reference) REFERENCES ValidPaths(id) ON DELETE RESTRICT
  ) WITHOUT ROWID;
  INSERT INTO RefsByKey (referrer, reference) SELECT referrer, reference FROM Refs;
  DROP TABLE Refs;
  ALTER TABLE RefsByKey RENAME TO Refs;
  CREATE INDEX IndexReference ON Refs(reference);
  `,
  // 7: registrations committed before their files were durable (an evaluation's .drv files),
  // as ranges of ValidPaths ids with the boot they were made in: the next open after a crash
  // checks their files (LocalStore's settling of unsynced registrations)
  `
  CREATE TABLE UnsyncedRegistrations (
    id           INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    boot         TEXT NOT NULL,
    firstId      INTEGER NOT NULL,
    lastId       INTEGER NOT NULL,
    registeredAt INTEGER NOT NULL
  );
  `,
];

/**
 * The temp-roots database (`db/temproots.sqlite`), beside the store's: one row per rooted
 * batch of a live handle (paths newline-separated). Only live processes' rows matter, so it
 * is not synced on every commit; GC holds its write lock while it decides.
 */
export const TEMP_ROOTS_SCHEMA = `CREATE TABLE IF NOT EXISTS TempRoots (owner TEXT NOT NULL, paths TEXT NOT NULL);
  CREATE INDEX IF NOT EXISTS IndexTempRootsOwner ON TempRoots(owner);`;

export const SQL = {
  byPath: `SELECT id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca FROM ValidPaths WHERE path = ?`,
  idByPath: `SELECT id FROM ValidPaths WHERE path = ?`,
  refsOf: `SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference WHERE r.referrer = ?`,
  referrersOf: `SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.referrer WHERE r.reference = ?`,
  /** Inserts nothing (0 changes) when the path is valid already. */
  insertPath: `INSERT INTO ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO NOTHING`,
  insertRef: `INSERT OR IGNORE INTO Refs (referrer, reference) VALUES (?, ?)`,
  allPaths: `SELECT path FROM ValidPaths ORDER BY path`,
  allRefs: `SELECT a.path AS referrer, b.path AS reference FROM Refs r JOIN ValidPaths a ON a.id = r.referrer JOIN ValidPaths b ON b.id = r.reference`,
  setSigs: `UPDATE ValidPaths SET sigs = ? WHERE id = ?`,
  deleteRefsFrom: `DELETE FROM Refs WHERE referrer = ?`,
  deletePath: `DELETE FROM ValidPaths WHERE id = ?`,
  insertTempRoots: `INSERT INTO TempRoots (owner, paths) VALUES (?, ?)`,
  deleteTempRoots: `DELETE FROM TempRoots WHERE owner = ?`,
  allTempRoots: `SELECT owner, paths FROM TempRoots`,
  /** Ids of those of a JSON array of paths that are valid. */
  validAmong: `SELECT v.path, v.id FROM json_each(?) j JOIN ValidPaths v ON v.path = j.value`,
  insertUnsynced: `INSERT INTO UnsyncedRegistrations (boot, firstId, lastId, registeredAt) VALUES (?, ?, ?, ?)`,
  allUnsynced: `SELECT id, boot, firstId, lastId, registeredAt FROM UnsyncedRegistrations`,
  anyUnsynced: `SELECT 1 FROM UnsyncedRegistrations LIMIT 1`,
  /** (Ids are never reused: a record made after it was read cannot be the one deleted.) */
  deleteUnsynced: `DELETE FROM UnsyncedRegistrations WHERE id = ?`,
  /** The valid paths with ids in [?, ?], with their NAR hashes and sizes. */
  pathsInIdRange: `SELECT id, path, hash, narSize FROM ValidPaths WHERE id BETWEEN ? AND ?`,
  /** The ids of the paths in a JSON array of ids and of every path that refers to them, transitively. */
  referrerClosure: `WITH RECURSIVE c(id) AS (SELECT value FROM json_each(?) UNION SELECT r.referrer FROM Refs r JOIN c ON r.reference = c.id) SELECT c.id, v.path FROM c JOIN ValidPaths v ON v.id = c.id`,
  gcGeneration: `SELECT generation FROM GcGeneration WHERE id = 0`,
  bumpGcGeneration: `UPDATE GcGeneration SET generation = generation + 1 WHERE id = 0`,
} as const;

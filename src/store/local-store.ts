/**
 * The local store: store objects under the store dir, metadata in SQLite (Nix's layout).
 *
 * Registration contract: an object is valid once its row is committed, and only then. Content
 * is written under a temporary name in the store dir, made read-only with mtime 1, fsync'ed,
 * and renamed to its final name inside the same write transaction that inserts its row, so
 * a crash at any point leaves either a valid object or an unregistered leftover that the next
 * add replaces and GC removes. Two writers adding the same object serialise on SQLite's write
 * lock; the second finds it valid and drops its copy. Text objects (.drv files, written by the
 * hundred thousand) skip the rename: each is created exclusively under its final name after
 * the name is temp-rooted, made durable, then registered; until then it is just as invalid,
 * and a writer that finds the name taken falls back to a temporary name.
 */
import { referencesFirst } from "../core/path-order.js";
import * as fs from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { FerryError, asFerryError } from "../core/errors.js";
import { makeHash, parseHash, printHash, printPrefixedHash, toBase16, toNix32, fromBase16, hashEquals, type Hash, type HashAlgo } from "../core/hash.js";
import { createHasher, sha256, sha256Hex } from "../core/digest.js";
import {
  makeFixedOutputPath, makeSourcePath, parseStorePath, printStorePath, checkNewName, textPathOfHex,
  parseContentAddress, printContentAddress, type ContentAddress,
} from "../core/store-path.js";
import { exportEnd, exportEntryStart, exportEntryTrailer, ExportReader } from "../core/export-stream.js";
import { fingerprintPath, signMessage, type SecretKey } from "../core/signing.js";
import { narOfRegularFile } from "../core/nar/writer.js";
import { MIGRATIONS, SQL, TEMP_ROOTS_SCHEMA } from "./schema.js";
import { realPath, type StoreLocation } from "./config.js";
import { dumpPath, hashFile, hashPath } from "./nar-dump.js";
import { NarRestorer } from "./nar-restore.js";
import { fsyncPath, isSymlink, pathExists, processAlive, randomSuffix, removeTree, syncFilesystem, FileSystemSyncer } from "./fs-util.js";

export interface PathInfo {
  readonly path: string;
  readonly narHash: Hash;
  readonly narSize: number;
  /** Full store paths, sorted. */
  readonly references: readonly string[];
  readonly deriver?: string;
  readonly registrationTime: number;
  readonly sigs: readonly string[];
  readonly ca?: ContentAddress;
  /** Built or added here (not substituted). */
  readonly ultimate: boolean;
}

/** What a caller supplies to register a new object; the store fills in time and checks. */
export interface NewObject {
  readonly path: string;
  readonly narHash: Hash;
  readonly narSize: number;
  readonly references: readonly string[];
  readonly deriver?: string | undefined;
  readonly sigs?: readonly string[];
  readonly ca?: ContentAddress | undefined;
  readonly ultimate?: boolean;
}

export interface AddResult {
  readonly path: string;
  /** False when the object was already valid (or with dryRun). */
  readonly added: boolean;
  readonly narHash: Hash;
  readonly narSize: number;
}

export type ItemOutcome<T> =
  | { readonly status: "ok"; readonly path: string; readonly value: T }
  | { readonly status: "error"; readonly path: string; readonly error: FerryError };

export interface VerifyItem {
  readonly path: string;
  readonly status: "ok" | "corrupt" | "missing";
  readonly expected?: string;
  readonly actual?: string;
}

export interface GcResult {
  readonly deleted: readonly string[];
  readonly bytesFreed: number;
  readonly roots: readonly string[];
  /** Leftovers (interrupted adds, unregistered copies) removed from the store dir. */
  readonly leftovers: readonly string[];
}

interface Row {
  id: number;
  path: string;
  hash: string;
  registrationTime: number;
  deriver: string | null;
  narSize: number | null;
  ultimate: number | null;
  sigs: string | null;
  ca: string | null;
}

/** A text object to add, as bytes. */
export interface TextToAdd {
  readonly name: string;
  readonly bytes: Uint8Array;
  readonly references: readonly string[];
  readonly expectedPath?: string | undefined;
}

/** Text objects prepared for registration (see `prepareTexts`). */
export interface PreparedTexts {
  /** Per item given, in order: its path, and its NAR's hash (`sha256:<base16>`) and size. */
  readonly paths: readonly string[];
  readonly narHashes: readonly string[];
  readonly narSizes: readonly number[];
  readonly batch: PreparedBatch;
}

/**
 * What committing a prepared batch needs, as columns of plain strings and numbers (cheap to
 * hand to another thread): one entry per distinct path that was not valid when the batch was
 * prepared, in order. Each was written under its final name, created exclusively by this
 * writer and protected by its temp root (`tmpReals` entry ""), or under a temporary name when
 * something already had the final name (a leftover, or a concurrent writer).
 */
export interface PreparedBatch {
  readonly paths: readonly string[];
  /** `sha256:<base16>`, as the database keeps it. */
  readonly narHashes: readonly string[];
  readonly narSizes: readonly number[];
  /** The printed content addresses (`text:sha256:…`). */
  readonly cas: readonly string[];
  /** Each entry's references, joined by "\n" ("" for none). */
  readonly references: readonly string[];
  /** Where each entry was written when not under its final name; "" when it was. */
  readonly tmpReals: readonly string[];
  /** True once every file written is durable. */
  synced: boolean;
}

/** A row to register (the database's own fields), with where its content is. */
interface RegistrationRow {
  readonly path: string;
  readonly hash: string;
  readonly narSize: number;
  readonly deriver: string | null;
  readonly ultimate: 0 | 1;
  readonly sigs: string | null;
  readonly ca: string | null;
  readonly references: readonly string[];
  /** Where the content is, to be renamed into place; undefined: at its final name already. */
  readonly tmpReal: string | undefined;
  /** The writer created the final name itself, exclusively, and rooted it: no check, and a concurrent registration of the same path is found by the insert. */
  readonly created: boolean;
}

/**
 * Texts written but not checked or registered (`writeClaimedTexts`): for each one written, the
 * index of its item, its path, and where it was written ("" for its final name).
 */
export interface WrittenTexts {
  readonly indices: number[];
  readonly paths: string[];
  readonly tmpReals: string[];
  /** True once every file written is durable. */
  synced: boolean;
}

/** Per item: its path, its NAR's hash (`sha256:<base16>`) and size, and its content address. */
interface CheckedTexts {
  readonly paths: string[];
  readonly narHashes: string[];
  readonly narSizes: number[];
  readonly cas: string[];
}

/** The batch that commits the written ones of `items`, checked. */
function batchOf(items: readonly TextToAdd[], checked: CheckedTexts, written: WrittenTexts): PreparedBatch {
  const pick = <T>(column: readonly T[]): T[] => written.indices.map((k) => column[k]!);
  return {
    paths: written.paths,
    narHashes: pick(checked.narHashes),
    narSizes: pick(checked.narSizes),
    cas: pick(checked.cas),
    references: written.indices.map((k) => items[k]!.references.join("\n")),
    tmpReals: written.tmpReals,
    synced: written.synced,
  };
}

/** Several prepared batches as one, in order (to commit them in one transaction). */
export function mergeBatches(batches: readonly PreparedBatch[]): PreparedBatch {
  if (batches.length === 1) return batches[0]!;
  const [first, ...rest] = batches as [PreparedBatch, ...PreparedBatch[]];
  return {
    paths: first.paths.concat(...rest.map((b) => b.paths)),
    narHashes: first.narHashes.concat(...rest.map((b) => b.narHashes)),
    narSizes: first.narSizes.concat(...rest.map((b) => b.narSizes)),
    cas: first.cas.concat(...rest.map((b) => b.cas)),
    references: first.references.concat(...rest.map((b) => b.references)),
    tmpReals: first.tmpReals.concat(...rest.map((b) => b.tmpReals)),
    synced: batches.every((b) => b.synced),
  };
}

/** What opening a store found of registrations of an earlier boot whose files may not have reached the disk. */
export interface UnsyncedRecovery {
  /** Paths whose files were checked. */
  readonly checked: number;
  /** Paths unregistered (sorted): those whose files were lost, and every path that refers to one. */
  readonly lost: readonly string[];
}

interface UnsyncedMarker {
  readonly id: number;
  readonly boot: string;
  readonly firstId: number;
  readonly lastId: number;
  readonly registeredAt: number;
}

/** Unsynced registrations of this boot older than this are synced and forgotten by the next open. */
const SETTLE_UNSYNCED_AFTER_S = 60;

let cachedBootId: string | null | undefined;

/** This boot of the machine (Linux's random boot id), or undefined where it cannot be told. */
export function bootId(): string | undefined {
  if (cachedBootId === undefined) {
    try {
      cachedBootId = fs.readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim() || null;
    } catch {
      cachedBootId = null;
    }
  }
  return cachedBootId ?? undefined;
}

/** What is at `real`, the content of the valid path `path`, against its recorded NAR hash and size. */
function checkContent(path: string, real: string, narHash: Hash, narSize: number): VerifyItem {
  if (!pathExists(real)) return { path, status: "missing", expected: printHash(narHash, "sri") };
  try {
    const r = hashPath(real, narHash.algo);
    return hashEquals(r.hash, narHash) && r.size === narSize ? { path, status: "ok" } : { path, status: "corrupt", expected: printHash(narHash, "sri"), actual: printHash(r.hash, "sri") };
  } catch (e) {
    return { path, status: "corrupt", expected: printHash(narHash, "sri"), actual: `unreadable: ${(e as Error).message}` };
  }
}

const TMP_PREFIX = ".ferry-tmp-";
/** Batches up to this size fsync each file; larger ones sync the file system once. */
const SYNC_BATCH_MIN = 16;
const TRASH_PREFIX = ".ferry-trash-";

function storeError(code: string, message: string, hint?: string): FerryError {
  return new FerryError(code, message, hint === undefined ? {} : { hint });
}

export class LocalStore {
  readonly loc: StoreLocation;
  readonly realStoreDir: string;
  readonly realStateDir: string;
  readonly #db: Database.Database;
  readonly #stmts = new Map<string, Database.Statement>();
  /**
   * Row ids of paths seen valid inside write transactions. Only GC removes valid paths, and it
   * bumps the GC generation when it does; a write transaction that sees a new generation drops
   * the memo, so ids found here are valid for the rest of that transaction.
   */
  readonly #idMemo = new Map<string, number>();
  #memoGeneration = -1;
  /** This handle's temp-root owner id, `<pid>-<random>` (GC drops the rows of dead pids). */
  #tempRootOwner: string | undefined;
  /** Runs `syncPrepared`'s syncs, started when first needed. */
  #syncer: FileSystemSyncer | undefined;
  /** The temp-roots database, opened when first needed (see TEMP_ROOTS_SCHEMA). */
  #rootsDb: Database.Database | undefined;
  /** Set by `open` when it settled registrations of an earlier boot whose files may have been lost. */
  recovered: UnsyncedRecovery | undefined;
  /** Whether the last batch of texts written was mostly valid already (see `#writeTexts`). */
  #lastTextsMostlyValid = false;
  /** Text batches aborted, by their `tmpReals` array (which a checked batch shares with what was written). */
  readonly #aborted = new WeakSet<readonly string[]>();

  private constructor(loc: StoreLocation, db: Database.Database) {
    this.loc = loc;
    this.realStoreDir = realPath(loc, loc.storeDir);
    this.realStateDir = realPath(loc, loc.stateDir);
    this.#db = db;
  }

  get storeDir(): string {
    return this.loc.storeDir;
  }

  /** Prepared statements are made once per handle. */
  #stmt(sql: string): Database.Statement {
    let st = this.#stmts.get(sql);
    if (!st) this.#stmts.set(sql, (st = this.#db.prepare(sql)));
    return st;
  }

  /** Opens (creating if needed) the store at `loc`. */
  static open(loc: StoreLocation): LocalStore {
    const realStore = realPath(loc, loc.storeDir);
    const realState = realPath(loc, loc.stateDir);
    try {
      for (const d of [realStore, join(realState, "db"), join(realState, "gcroots")]) {
        fs.mkdirSync(d, { recursive: true });
      }
      fs.accessSync(realStore, fs.constants.W_OK);
    } catch (e) {
      throw new FerryError("FERRY_STORE_UNWRITABLE", `cannot use the store at ${realStore} (state ${realState}): ${(e as Error).message}`, {
        hint: "run as a user who may write there, or put the store elsewhere with --root DIR (or --store-dir/--state-dir, FERRY_ROOT)",
      });
    }
    // Wait for other writers (up to 10 minutes) rather than failing with SQLITE_BUSY.
    const db = new Database(join(realState, "db", "db.sqlite"), { timeout: 600_000 });
    // A new database gets 16 KiB pages (the path and reference indexes are shallower: a batch
    // of registrations costs about a seventh less); an existing one keeps its own.
    db.pragma("page_size = 16384");
    setWal(db);
    db.pragma("synchronous = FULL");
    // Batches of thousands of rows touch pages all over the path index: keep them in memory.
    db.pragma("cache_size = -65536");
    db.pragma("foreign_keys = ON");
    migrate(db);
    const store = new LocalStore(loc, db);
    try {
      store.#settleUnsynced();
    } catch (e) {
      db.close();
      throw e;
    }
    return store;
  }

  /**
   * Settles the registrations committed before their files were durable (`commitBatch` with
   * `deferSync`), whichever process opens the store next. Those of this boot are in the page
   * cache or on the disk: once they are a minute old, one file-system sync makes sure and their
   * records go. Those of an earlier boot may have been lost when the machine stopped: every
   * file is checked against its NAR hash, and a path whose file is wrong or missing is
   * unregistered together with every path that refers to it (`recovered` says which).
   */
  #settleUnsynced(): void {
    const markers = this.#stmt(SQL.allUnsynced).all() as UnsyncedMarker[];
    if (!markers.length) return;
    // A process that cannot tell the boot (no /proc) cannot tell a record of a stop from a
    // fresh one: it leaves them all to one that can.
    const boot = bootId();
    if (boot === undefined) return;
    const now = Math.floor(Date.now() / 1000);
    const settled = markers.filter((m) => m.boot === boot && m.registeredAt <= now - SETTLE_UNSYNCED_AFTER_S);
    if (settled.length) {
      try {
        syncFilesystem(this.realStoreDir);
        this.#db.transaction(() => {
          for (const m of settled) this.#stmt(SQL.deleteUnsynced).run(m.id);
        }).immediate();
      } catch {
        /* the records stay, and the next open tries again: nothing is lost while the machine runs */
      }
    }
    if (markers.some((m) => m.boot !== boot)) {
      try {
        this.recovered = this.#recoverEarlierBoots(boot);
      } catch (e) {
        throw new FerryError("FERRY_STORE_RECOVERY_FAILED", `the store could not check the .drv files registered before the machine last stopped: ${(e as Error).message}`, {
          hint: "fix what the message names (permissions, a full disk) and run the command again; nothing was changed",
        });
      }
    }
  }

  /** The part of `#settleUnsynced` for earlier boots, under the write lock (another process may have done it meanwhile). */
  #recoverEarlierBoots(boot: string): UnsyncedRecovery {
    let trash: string | undefined;
    const result = this.#db.transaction((): UnsyncedRecovery => {
      const markers = (this.#stmt(SQL.allUnsynced).all() as UnsyncedMarker[]).filter((m) => m.boot !== boot);
      const bad: number[] = [];
      let checked = 0;
      for (const m of markers) {
        for (const row of this.#stmt(SQL.pathsInIdRange).all(m.firstId, m.lastId) as { id: number; path: string; hash: string; narSize: number }[]) {
          checked++;
          if (checkContent(row.path, this.realPathOf(row.path), parseHash(row.hash), row.narSize).status !== "ok") bad.push(row.id);
        }
      }
      const lost = bad.length ? (this.#stmt(SQL.referrerClosure).all(JSON.stringify(bad)) as { id: number; path: string }[]) : [];
      for (const m of markers) this.#stmt(SQL.deleteUnsynced).run(m.id);
      // Their files go under the lock, into a trash removed after the commit (as GC does).
      if (lost.length) trash = this.#unregister(lost);
      return { checked, lost: lost.map((l) => l.path).sort() };
    }).immediate();
    if (trash) removeTree(trash);
    return result;
  }

  /**
   * Turns off SQLite's foreign-key checks for this handle, for a handle that only registers
   * (a plan writer's committing thread): registration looks every reference up itself and
   * refuses a missing one, so SQLite's second look is wasted there (a tenth of a large
   * registration). Nothing may delete through such a handle. With `deferSync` (every commit
   * through it is `commitBatch`'s deferred kind), its commits do not wait for the disk either:
   * a commit lost to a stop of the machine loses only registrations that could have been
   * undone anyway, and the database stays consistent (WAL with synchronous=NORMAL).
   */
  onlyRegisters(opts: { deferSync?: boolean } = {}): void {
    this.#db.pragma("foreign_keys = OFF");
    if (opts.deferSync) this.#db.pragma("synchronous = NORMAL");
  }

  close(): void {
    this.#syncer?.close();
    if (this.#rootsDb) {
      if (this.#tempRootOwner) this.#rootsDb.prepare(SQL.deleteTempRoots).run(this.#tempRootOwner);
      this.#rootsDb.close();
    }
    this.#db.close();
  }

  /** The temp-roots database; writers wait for each other and for GC, never for registrations. */
  #roots(): Database.Database {
    if (this.#rootsDb) return this.#rootsDb;
    const db = new Database(join(this.realStateDir, "db", "temproots.sqlite"), { timeout: 600_000 });
    try {
      setWal(db);
      db.pragma("synchronous = NORMAL");
      db.exec(TEMP_ROOTS_SCHEMA);
    } catch (e) {
      db.close();
      throw e;
    }
    return (this.#rootsDb = db);
  }

  realPathOf(storePath: string): string {
    return realPath(this.loc, storePath);
  }

  /** Validates a full store path of this store and returns it in canonical form. */
  parsePath(p: string): string {
    return printStorePath(parseStorePath(this.storeDir, p));
  }

  // ---- queries ------------------------------------------------------------------------------

  isValid(path: string): boolean {
    return this.#stmt(SQL.idByPath).get(path) !== undefined;
  }

  queryPathInfo(path: string): PathInfo | undefined {
    const row = this.#stmt(SQL.byPath).get(path) as Row | undefined;
    if (!row) return undefined;
    const refs = (this.#stmt(SQL.refsOf).all(row.id) as { path: string }[]).map((r) => r.path).sort();
    return rowToInfo(row, refs);
  }

  /** Like queryPathInfo, but a missing path is a user error. */
  requirePathInfo(path: string): PathInfo {
    const info = this.queryPathInfo(this.parsePath(path));
    if (!info) throw storeError("FERRY_STORE_NOT_VALID", `'${path}' is not a valid path in this store`, "add or build it first; `ferry store path-info` lists what is there");
    return info;
  }

  referrers(path: string): string[] {
    const row = this.#stmt(SQL.idByPath).get(path) as { id: number } | undefined;
    if (!row) return [];
    return (this.#stmt(SQL.referrersOf).all(row.id) as { path: string }[]).map((r) => r.path).sort();
  }

  /** The closure of `paths` under references, sorted. Every path must be valid. */
  closure(paths: readonly string[]): string[] {
    const seen = new Set<string>();
    const stack = paths.map((p) => this.requirePathInfo(p).path);
    const refsStmt = this.#stmt(SQL.refsOf);
    const idStmt = this.#stmt(SQL.idByPath);
    while (stack.length) {
      const p = stack.pop()!;
      if (seen.has(p)) continue;
      seen.add(p);
      const row = idStmt.get(p) as { id: number };
      for (const r of refsStmt.all(row.id) as { path: string }[]) if (!seen.has(r.path)) stack.push(r.path);
    }
    return [...seen].sort();
  }

  allValidPaths(): string[] {
    return (this.#stmt(SQL.allPaths).all() as { path: string }[]).map((r) => r.path);
  }

  /** `paths` ordered so that every path comes after the ones it references (among `paths`), otherwise sorted. Every path must be valid. */
  topoSort(paths: readonly string[]): string[] {
    return referencesFirst([...new Set(paths)].sort(), (p) => this.requirePathInfo(p).references);
  }

  // ---- adding -------------------------------------------------------------------------------

  /** A fresh temporary name in the store dir for an object being written. */
  newTempPath(): string {
    return join(this.realStoreDir, `${TMP_PREFIX}${randomSuffix()}`);
  }

  /**
   * Protects `path` from GC while this handle is open (Nix's temp roots): called before
   * checking validity or writing under a final name. Roots are committed rows of the
   * temp-roots database, whose write lock GC holds while it decides and deletes: either GC ran
   * first and the check sees the path gone, or GC sees the root. A path found valid after
   * rooting cannot be collected, and an invalid one being written is left alone.
   */
  addTempRoot(path: string): void {
    this.addTempRoots([path]);
  }

  /** Like `addTempRoot` for many paths: one row, one transaction. */
  addTempRoots(paths: readonly string[]): void {
    if (!paths.length) return;
    this.#tempRootOwner ??= randomSuffix();
    this.#roots().prepare(SQL.insertTempRoots).run(this.#tempRootOwner, paths.join("\n"));
  }

  /** Row ids of those of `paths` that are valid now. */
  #validIds(paths: readonly string[]): Map<string, number> {
    const rows = paths.length ? (this.#stmt(SQL.validAmong).all(JSON.stringify(paths)) as { path: string; id: number }[]) : [];
    return new Map(rows.map((r) => [r.path, r.id]));
  }

  /**
   * Moves a complete, canonicalised object from `tmpReal` to its place and registers it,
   * atomically. If the path is already valid the temporary copy is dropped. References must
   * be valid already (or be the path itself). With `tmpReal` undefined the caller has put the
   * content at its final place already.
   */
  registerObject(tmpReal: string | undefined, obj: NewObject): boolean {
    return this.registerObjects([{ tmpReal, obj }])[0]!;
  }

  /**
   * Registers several objects in one write transaction (in order, so later ones may reference
   * earlier ones). All or nothing: on any error none is registered, and every object renamed
   * into place goes back under its temporary name (for the caller to remove), except one that
   * replaced an unregistered leftover: it stays, complete but invalid, since a writer that
   * created that name in place may be about to register it. Returns, per object, whether it
   * was added (false: it was valid already).
   */
  registerObjects(items: readonly { tmpReal: string | undefined; obj: NewObject }[]): boolean[] {
    const rows = items.map(({ tmpReal, obj }): RegistrationRow => {
      const path = this.parsePath(obj.path);
      return {
        path,
        hash: `${obj.narHash.algo}:${toBase16(obj.narHash.digest)}`,
        narSize: obj.narSize,
        deriver: obj.deriver ?? null,
        ultimate: obj.ultimate ? 1 : 0,
        sigs: (obj.sigs ?? []).join(" ") || null,
        ca: obj.ca ? printContentAddress(obj.ca) : null,
        references: obj.references.map((r) => this.parsePath(r)),
        tmpReal,
        created: false,
      };
    });
    return this.#registerRows(rows);
  }

  /**
   * `registerObjects` for rows whose paths and references are canonical already. With
   * `unsyncedBoot`, the rows' files may not be durable yet: the ids inserted are recorded, in
   * the same transaction, as unsynced registrations of that boot (see `#settleUnsynced`).
   */
  #registerRows(rows: readonly RegistrationRow[], unsyncedBoot?: string): boolean[] {
    const insert = this.#stmt(SQL.insertPath);
    const idStmt = this.#stmt(SQL.idByPath);
    const refStmt = this.#stmt(SQL.insertRef);
    const moved: { tmpReal: string; finalReal: string }[] = [];
    let renamed = false;
    const txn = this.#db.transaction((): boolean[] => {
      try {
        return registerAll();
      } catch (e) {
        // Put renamed objects back under their temporary names while the lock is held: no
        // final name is ever unlinked outside the write lock.
        for (const m of moved.reverse()) fs.renameSync(m.finalReal, m.tmpReal);
        moved.length = 0;
        throw e;
      }
    });
    const registerAll = (): boolean[] => {
      const generation = (this.#stmt(SQL.gcGeneration).get() as { generation: number }).generation;
      if (generation !== this.#memoGeneration) {
        this.#idMemo.clear();
        this.#memoGeneration = generation;
      }
      // One query for the references not known yet (other than the batch's own paths, which
      // are looked up if they turn out to be valid already); single lookups for the rest.
      const own = new Set<string>();
      for (const row of rows) own.add(row.path);
      const unknown = new Set<string>();
      for (const row of rows) for (const r of row.references) if (!this.#idMemo.has(r) && !own.has(r)) unknown.add(r);
      if (unknown.size) for (const [p, id] of this.#validIds([...unknown])) this.#idMemo.set(p, id);
      const idOf = (p: string): number | undefined => {
        let id = this.#idMemo.get(p);
        if (id === undefined) {
          id = (idStmt.get(p) as { id: number } | undefined)?.id;
          if (id !== undefined) this.#idMemo.set(p, id);
        }
        return id;
      };
      const now = Math.floor(Date.now() / 1000);
      let firstId: number | undefined;
      let lastId = 0;
      const added = rows.map((row) => {
        const { path, tmpReal } = row;
        if (!row.created && idOf(path) !== undefined) return false;
        for (const r of row.references) {
          if (r !== path && idOf(r) === undefined) {
            throw storeError("FERRY_STORE_MISSING_REFERENCE", `cannot register '${path}': it references '${r}', which is not valid in this store`, "add or import the referenced paths first (its closure)");
          }
        }
        if (tmpReal !== undefined) {
          const finalReal = this.realPathOf(path);
          if (!this.#moveIntoPlace(tmpReal, finalReal)) moved.push({ tmpReal, finalReal });
          renamed = true;
        } else if (!row.created && !pathExists(this.realPathOf(path))) {
          throw storeError("FERRY_STORE_CONTENT_MISSING", `cannot register '${path}': its content is not at ${this.realPathOf(path)}`, "something removed it meanwhile; build or add it again");
        }
        const info = insert.run(path, row.hash, now, row.deriver, row.narSize, row.ultimate, row.sigs, row.ca);
        if (info.changes === 0) {
          // Only a created row gets here: another writer registered the path meanwhile.
          idOf(path);
          return false;
        }
        const id = Number(info.lastInsertRowid);
        this.#idMemo.set(path, id);
        firstId ??= id;
        lastId = id;
        for (const r of row.references) refStmt.run(id, r === path ? id : idOf(r)!);
        return true;
      });
      // Renamed names are durable before their rows commit.
      if (renamed) fsyncPath(this.realStoreDir);
      // Ids only grow, and nobody else inserts while this transaction holds the write lock:
      // the range holds exactly the rows inserted here.
      if (unsyncedBoot !== undefined && firstId !== undefined) this.#stmt(SQL.insertUnsynced).run(unsyncedBoot, firstId, lastId, now);
      return added;
    };
    try {
      const added = txn.immediate();
      rows.forEach((row, k) => {
        if (!added[k] && row.tmpReal !== undefined) removeTree(row.tmpReal);
      });
      return added;
    } catch (e) {
      this.#idMemo.clear();
      // The transaction rolled back; renamed objects are back under their temporary names (or
      // stay in place, complete, where they replaced a leftover).
      for (const row of rows) if (row.tmpReal !== undefined) removeTree(row.tmpReal);
      throw e;
    }
  }

  /**
   * Replaces the content of the valid path `path` (damaged or missing on disk) with the complete,
   * canonical tree at `tmpReal`, which the caller has checked hashes to the recorded NAR hash.
   * Done under the write lock, so it cannot race a GC or another repair.
   */
  repairContent(path: string, tmpReal: string): void {
    try {
      this.#db.transaction(() => {
        if (this.#stmt(SQL.idByPath).get(path) === undefined) throw storeError("FERRY_STORE_NOT_VALID", `'${path}' is not valid, so there is nothing to repair`);
        const finalReal = this.realPathOf(path);
        if (pathExists(finalReal)) this.#moveToTrash(finalReal);
        fs.renameSync(tmpReal, finalReal);
        fsyncPath(this.realStoreDir);
      }).immediate();
    } catch (e) {
      removeTree(tmpReal);
      throw e;
    }
  }

  /**
   * Renames a new object onto its final name, under the write lock. An unregistered file
   * already there is replaced atomically by the rename; anything rename cannot replace (a
   * directory) goes to the trash first. True when something was there.
   */
  #moveIntoPlace(tmpReal: string, finalReal: string): boolean {
    if (!pathExists(finalReal)) {
      fs.renameSync(tmpReal, finalReal);
      return false;
    }
    try {
      fs.renameSync(tmpReal, finalReal);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== "EISDIR" && code !== "ENOTDIR" && code !== "ENOTEMPTY" && code !== "EEXIST") throw e;
      this.#moveToTrash(finalReal);
      fs.renameSync(tmpReal, finalReal);
    }
    return true;
  }

  #moveToTrash(real: string): void {
    const trash = join(this.realStoreDir, `${TRASH_PREFIX}${randomSuffix()}`);
    fs.renameSync(real, trash);
    removeTree(trash);
  }

  /**
   * Adds a file or tree as a source object (`nix-store --add`): one pass reads, copies and
   * hashes it. With `dryRun` it only computes the path.
   */
  addPath(src: string, opts: { name?: string | undefined; dryRun?: boolean; onFile?: (size: number) => void } = {}): AddResult {
    if (opts.dryRun) return computeSourcePath(this.storeDir, src, opts);
    const name = checkNewName(opts.name ?? basenameOf(src));
    const tmp = this.newTempPath();
    let result: { hash: Hash; size: number };
    try {
      result = hashPath(src, "sha256", { copyTo: tmp, ...(opts.onFile ? { onFile: opts.onFile } : {}) });
    } catch (e) {
      removeTree(tmp);
      throw e;
    }
    const path = printStorePath(makeSourcePath(this.storeDir, name, result.hash));
    this.addTempRoot(path);
    const added = this.registerObject(tmp, {
      path, narHash: result.hash, narSize: result.size, references: [], ultimate: true,
      ca: { kind: "fixed", method: "recursive", hash: result.hash },
    });
    return { path, added, narHash: result.hash, narSize: result.size };
  }

  /** `nix-store --add-fixed [--recursive] ALGO PATH`. Flat objects are stored non-executable. */
  addFixed(src: string, opts: { recursive: boolean; algo: HashAlgo; name?: string | undefined; dryRun?: boolean }): AddResult {
    const name = checkNewName(opts.name ?? basenameOf(src));
    if (opts.recursive && opts.algo === "sha256") return this.addPath(src, { name, dryRun: opts.dryRun ?? false });
    if (!opts.recursive) {
      const st = fs.statSync(src, { throwIfNoEntry: false });
      if (!st || !st.isFile()) {
        throw storeError("FERRY_STORE_NOT_FILE", `'${src}' is not a regular file`, "flat fixed-output objects are single regular files; add a directory with --recursive");
      }
    }
    return this.#addCopied(src, name, opts.algo, opts.dryRun ?? false, opts.recursive);
  }

  /** Copies first, then hashes the copy: the address always describes what is stored. */
  #addCopied(src: string, name: string, algo: HashAlgo, dryRun: boolean, recursive: boolean): AddResult {
    const caOf = (p: string): ContentAddress & { kind: "fixed" } =>
      ({ kind: "fixed", method: recursive ? "recursive" : "flat", hash: recursive ? hashPath(p, algo).hash : hashFile(p, algo) });
    if (dryRun) {
      const ca = caOf(src);
      const nar = hashPath(src, "sha256", { stripExecutable: !recursive });
      return { path: printStorePath(makeFixedOutputPath(this.storeDir, name, ca.method, ca.hash)), added: false, narHash: nar.hash, narSize: nar.size };
    }
    const tmp = this.newTempPath();
    let nar: { hash: Hash; size: number };
    let ca: ContentAddress & { kind: "fixed" };
    try {
      if (recursive) {
        nar = hashPath(src, "sha256", { copyTo: tmp });
      } else {
        fs.copyFileSync(src, tmp);
        fs.chmodSync(tmp, 0o444);
        fs.utimesSync(tmp, 1, 1);
        fsyncPath(tmp);
        nar = hashPath(tmp);
      }
      ca = caOf(tmp);
    } catch (e) {
      removeTree(tmp);
      throw e;
    }
    const path = printStorePath(makeFixedOutputPath(this.storeDir, name, ca.method, ca.hash));
    this.addTempRoot(path);
    const added = this.registerObject(tmp, { path, narHash: nar.hash, narSize: nar.size, references: [], ultimate: true, ca });
    return { path, added, narHash: nar.hash, narSize: nar.size };
  }

  /**
   * Adds many text objects (an evaluation's .drv files) with one transaction per batch. Each
   * must come after the ones it references. If `expectedPath` is given it must match.
   */
  addTexts(items: readonly { name: string; text: string; references: readonly string[]; expectedPath?: string }[]): AddResult[] {
    return this.commitTexts(this.prepareTexts(items.map((it) => ({ ...it, bytes: Buffer.from(it.text) }))));
  }

  /**
   * First half of adding text objects: computes and checks every path, roots them all (one
   * temp-root row), and writes those not valid yet, each straight under its final name, which
   * is created exclusively (a name already taken gets a temporary name, renamed over it at
   * commit). Small batches fsync each file; larger ones are left for one file-system sync
   * (`syncPrepared`, or `commitTexts` does it). Nothing is registered here, so another thread
   * or process may commit meanwhile; until then the files are invalid, like a build's outputs
   * in progress. `abortTexts` removes the files of a batch that is not committed.
   */
  prepareTexts(items: readonly TextToAdd[]): PreparedTexts {
    const checked = this.#checkTexts(items);
    const written = this.#writeTexts(items, checked.paths);
    return { paths: checked.paths, narHashes: checked.narHashes, narSizes: checked.narSizes, batch: batchOf(items, checked, written) };
  }

  /**
   * `prepareTexts` split in two, for two threads: this half writes the texts under the paths
   * their records claim (`expectedPath`, which must be a store path of this store) without
   * hashing anything, so the files can be synced while `checkWrittenTexts` checks them.
   */
  writeClaimedTexts(items: readonly { readonly expectedPath: string; readonly bytes: Uint8Array }[]): WrittenTexts {
    return this.#writeTexts(items, items.map((it) => this.parsePath(it.expectedPath)));
  }

  /**
   * The second half: checks every text (the ones not written too) against the path it claims,
   * and gives the written ones as a batch to commit. On a mismatch the written files are
   * removed and FERRY_STORE_PATH_MISMATCH is thrown. `items` are the same as written's.
   */
  checkWrittenTexts(items: readonly TextToAdd[], written: WrittenTexts): PreparedBatch {
    try {
      return batchOf(items, this.#checkTexts(items), written);
    } catch (e) {
      this.abortTextsQuietly(written);
      throw e;
    }
  }

  /** `abortTexts` on the way out of an error: a failure to clean up must not hide that error (GC removes what is left). */
  abortTextsQuietly(batch: Pick<PreparedBatch, "paths" | "tmpReals">): void {
    try {
      this.abortTexts(batch);
    } catch {
      /* unregistered leftovers; GC removes them once this handle's temp roots are gone */
    }
  }

  /** Each text's path, NAR hash and content address, from its bytes; an expected path that differs is refused. */
  #checkTexts(items: readonly TextToAdd[]): CheckedTexts {
    const n = items.length;
    const checked: CheckedTexts = { paths: new Array<string>(n), narHashes: new Array<string>(n), narSizes: new Array<number>(n), cas: new Array<string>(n) };
    for (let k = 0; k < n; k++) {
      const it = items[k]!;
      const digest = sha256(it.bytes);
      const path = textPathOfHex(this.storeDir, checkNewName(it.name), toBase16(digest), it.references);
      if (it.expectedPath !== undefined && it.expectedPath !== path) {
        throw storeError("FERRY_STORE_PATH_MISMATCH", `text object '${it.name}' hashes to ${path}, not the expected ${it.expectedPath}`);
      }
      const nar = narOfRegularFile(it.bytes, narScratch);
      if (nar.buffer !== narScratch.buffer) narScratch = nar; // it did not fit: keep the larger buffer
      checked.paths[k] = path;
      checked.narHashes[k] = `sha256:${sha256Hex(nar)}`;
      checked.narSizes[k] = nar.length;
      checked.cas[k] = `text:sha256:${toNix32(digest)}`;
    }
    return checked;
  }

  /**
   * Roots `paths` (one temp-root row), then writes each item whose path is not valid, once,
   * under its final name, created exclusively (or under a temporary name when the final one
   * is taken). On failure removes what it wrote.
   *
   * A new evaluation creates every name, so looking the paths up first would be wasted: names
   * are created first and only those already taken are looked up. A batch that follows one
   * mostly valid already (an evaluation made again) looks its paths up first instead, and
   * creates only the missing ones.
   */
  #writeTexts(items: readonly { readonly bytes: Uint8Array }[], paths: readonly string[]): WrittenTexts {
    const distinct = [...new Set(paths)];
    // Rooted before the validity check: a path found valid stays valid (GC keeps it), and GC
    // leaves alone the names written below until this handle closes.
    this.addTempRoots(distinct);
    const lookUpFirst = this.#lastTextsMostlyValid;
    const validFirst = lookUpFirst ? this.#validIds(distinct) : undefined;
    const fsyncEach = items.length <= SYNC_BATCH_MIN;
    const storeDirLength = this.storeDir.length;
    // Per item: created under its final name by this writer, its name taken by something else,
    // or nothing to write (valid, or a repeat of an earlier item).
    const state = new Array<"created" | "taken" | undefined>(items.length);
    const written: WrittenTexts = { indices: [], paths: [], tmpReals: [], synced: false };
    let skippedValid: boolean;
    try {
      const seen = new Set<string>();
      const taken: string[] = [];
      for (let k = 0; k < items.length; k++) {
        const path = paths[k]!;
        if (seen.has(path) || validFirst?.has(path)) continue;
        seen.add(path);
        const created = createReadOnlyFile(this.realStoreDir + path.slice(storeDirLength), items[k]!.bytes, fsyncEach);
        if (created === "exists") {
          state[k] = "taken";
          taken.push(path);
          continue;
        }
        // Recorded before anything can fail, so that a failure removes what was started.
        state[k] = "created";
        if (created !== "created") throw created;
      }
      const valid = validFirst ?? (taken.length ? this.#validIds(taken) : undefined);
      skippedValid = (valid?.size ?? 0) > 0;
      this.#lastTextsMostlyValid = (valid?.size ?? 0) * 2 > distinct.length;
      // In order: a batch is registered in the order it was written.
      for (let k = 0; k < items.length; k++) {
        const s = state[k];
        if (s === undefined) continue;
        if (s === "taken" && valid?.has(paths[k]!)) {
          state[k] = undefined;
          continue;
        }
        const tmpReal = s === "taken" ? this.newTempPath() : "";
        written.indices.push(k);
        written.paths.push(paths[k]!);
        written.tmpReals.push(tmpReal);
        if (s === "created") continue;
        const again = createReadOnlyFile(tmpReal, items[k]!.bytes, fsyncEach);
        if (again !== "created") throw again === "exists" ? new Error(`the temporary name ${tmpReal} is taken`) : again;
      }
      // Each file is synced; their names need the directory synced too.
      if (fsyncEach && written.tmpReals.includes("")) fsyncPath(this.realStoreDir);
    } catch (e) {
      // What this writer created under final names, and the temporary copies it started.
      const made = { paths: [] as string[], tmpReals: [] as string[] };
      state.forEach((s, k) => {
        if (s === "created") {
          made.paths.push(paths[k]!);
          made.tmpReals.push("");
        }
      });
      written.tmpReals.forEach((t, j) => {
        if (t) {
          made.paths.push(written.paths[j]!);
          made.tmpReals.push(t);
        }
      });
      this.abortTextsQuietly(made);
      throw e;
    }
    // A path found valid may be one a deferring writer registered before its file reached the
    // disk (`commitBatch`'s deferSync): then this batch is synced as a whole, so that a writer
    // that syncs never hands on a path the disk could still lose.
    const leansOnUnsynced = skippedValid && this.#stmt(SQL.anyUnsynced).get() !== undefined;
    written.synced = (fsyncEach || written.paths.length === 0) && !leansOnUnsynced;
    return written;
  }

  /** Makes the files of `batch` durable with one file-system sync that runs in another process. */
  async syncPrepared(batch: { synced: boolean }): Promise<void> {
    if (batch.synced) return;
    await (this.#syncer ??= new FileSystemSyncer(this.realStoreDir)).sync();
    batch.synced = true;
  }

  /**
   * Second half: syncs the files if that is not done yet (unless `deferSync`: see below), then
   * registers the batch in one write transaction (renaming the files written under temporary
   * names into place). Its
   * paths were rooted when it was prepared, by the handle that prepared it, which must stay
   * open until now. Its references are checked against the database (a text's path was
   * computed from them, so a string that is not a valid path fails there). Removes the
   * batch's files on failure. Returns, per entry, whether it was added.
   *
   * With `deferSync` the batch is registered before its files are durable, with a record of
   * the boot it happened in: a registered path is then either intact or, after the machine
   * stopped before the kernel wrote it back, unregistered by the next open (with every path
   * that refers to it). For evaluations, whose .drv files anyone can make again.
   */
  commitBatch(batch: PreparedBatch, opts: { deferSync?: boolean } = {}): boolean[] {
    try {
      // Deferred: the files reach the disk when the kernel writes them back; if the machine
      // stops before that, the next open finds the registrations of an earlier boot and checks
      // their files. Where the boot cannot be told, the files are synced as usual.
      const unsyncedBoot = !batch.synced && opts.deferSync ? bootId() : undefined;
      if (!batch.synced && unsyncedBoot === undefined) {
        syncFilesystem(this.realStoreDir);
        batch.synced = true;
      }
      const rows = batch.paths.map((path, k): RegistrationRow => {
        const refs = batch.references[k]!;
        const tmpReal = batch.tmpReals[k]!;
        return {
          path, hash: batch.narHashes[k]!, narSize: batch.narSizes[k]!, deriver: null, ultimate: 1, sigs: null, ca: batch.cas[k]!,
          references: refs === "" ? [] : refs.split("\n"), tmpReal: tmpReal === "" ? undefined : tmpReal, created: tmpReal === "",
        };
      });
      return this.#registerRows(rows, unsyncedBoot);
    } catch (e) {
      this.abortTextsQuietly(batch);
      throw e;
    }
  }

  /** `commitBatch` with a result per prepared item. */
  commitTexts(p: PreparedTexts): AddResult[] {
    const added = this.commitBatch(p.batch);
    const byPath = new Map<string, boolean>();
    p.batch.paths.forEach((path, k) => byPath.set(path, added[k]!));
    return p.paths.map((path, k) => ({ path, narHash: parseHash(p.narHashes[k]!), narSize: p.narSizes[k]!, added: byPath.get(path) ?? false }));
  }

  /**
   * Removes the files of texts prepared but not committed. Those written under their final
   * names are unlinked under the write lock and only while invalid: another writer of the
   * same path may have registered its own copy there meanwhile.
   */
  abortTexts(batch: Pick<PreparedBatch, "paths" | "tmpReals">): void {
    // Once only: by a second time, another writer may have created one of these names
    // exclusively, and its file must not go.
    if (this.#aborted.has(batch.tmpReals)) return;
    this.#aborted.add(batch.tmpReals);
    const inPlace: string[] = [];
    batch.paths.forEach((path, k) => {
      const tmpReal = batch.tmpReals[k];
      if (tmpReal) removeTree(tmpReal);
      else if (tmpReal === "") inPlace.push(path);
    });
    if (!inPlace.length) return;
    this.#db.transaction(() => {
      const valid = this.#validIds(inPlace);
      for (const path of inPlace) if (!valid.has(path)) fs.rmSync(this.realPathOf(path), { force: true });
    }).immediate();
  }

  /** A text object (`builtins.toFile`, `.drv` files) with declared references. */
  addText(name: string, text: string, references: readonly string[] = []): AddResult {
    return this.addTexts([{ name, text, references }])[0]!;
  }

  // ---- signatures ---------------------------------------------------------------------------

  fingerprint(info: PathInfo): string {
    return fingerprintPath(info.path, printPrefixedHash(info.narHash), info.narSize, info.references);
  }

  /** Adds `key`'s signature to each path (idempotent). */
  sign(paths: readonly string[], key: SecretKey): ItemOutcome<string>[] {
    return paths.map((p) => {
      try {
        const info = this.requirePathInfo(p);
        const sig = signMessage(key, this.fingerprint(info));
        if (!info.sigs.includes(sig)) this.addSignatures(info.path, [sig]);
        return { status: "ok" as const, path: info.path, value: sig };
      } catch (e) {
        return { status: "error" as const, path: p, error: asFerryError(e) };
      }
    });
  }

  addSignatures(path: string, sigs: readonly string[]): void {
    this.#db.transaction(() => {
      const row = this.#stmt(SQL.byPath).get(path) as Row | undefined;
      if (!row) throw storeError("FERRY_STORE_NOT_VALID", `'${path}' is not valid`);
      const cur = new Set((row.sigs ?? "").split(" ").filter((s) => s));
      for (const s of sigs) cur.add(s);
      this.#stmt(SQL.setSigs).run([...cur].join(" "), row.id);
    }).immediate();
  }

  // ---- export / import ----------------------------------------------------------------------

  /** Writes `nix-store --export` bytes for `paths` (references first among them) to `write`. */
  exportPaths(paths: readonly string[], write: (chunk: Uint8Array) => void): void {
    const ordered = this.topoSort(paths.map((p) => this.requirePathInfo(p).path));
    for (const p of ordered) {
      const info = this.requirePathInfo(p);
      write(exportEntryStart());
      const h = createHasher("sha256");
      const size = dumpPath(this.realPathOf(p), (c) => {
        h.update(c);
        write(c);
      });
      const actual = makeHash("sha256", h.digest());
      if (size !== info.narSize || !hashEquals(actual, info.narHash)) {
        throw storeError("FERRY_STORE_CORRUPT", `'${p}' changed on disk: its NAR hash is ${printHash(actual, "sri")}, the store recorded ${printHash(info.narHash, "sri")}`, "run `ferry store verify` to find every damaged path");
      }
      write(exportEntryTrailer({ storePath: p, references: info.references, deriver: info.deriver }));
    }
    write(exportEnd());
  }

  /**
   * Imports a `nix-store --export` stream. Each object is unpacked to a temporary name,
   * hashed while it streams, and registered atomically once complete; a corrupt or truncated
   * stream stops the import with the objects before it imported and nothing half-done.
   */
  async importStream(source: AsyncIterable<Uint8Array>): Promise<{ results: ItemOutcome<{ added: boolean }>[]; error?: FerryError }> {
    const results: ItemOutcome<{ added: boolean }>[] = [];
    let restorer: NarRestorer | undefined;
    let hasher = createHasher("sha256");
    let narSize = 0;
    const reader = new ExportReader({
      onStart: () => {
        restorer = new NarRestorer(this.newTempPath(), { canonical: true, fsync: true });
        hasher = createHasher("sha256");
        narSize = 0;
      },
      onNarBytes: (c) => {
        hasher.update(c);
        narSize += c.length;
      },
      onNarEvent: (e) => restorer!.onEvent(e),
      onObject: (meta) => {
        const r = restorer!;
        restorer = undefined;
        try {
          r.finish();
          const path = this.parsePath(meta.storePath);
          this.addTempRoot(path);
          const added = this.registerObject(r.tmpPath, {
            path,
            narHash: makeHash("sha256", hasher.digest()),
            narSize,
            references: meta.references.map((x) => this.parsePath(x)),
            deriver: meta.deriver ? this.parsePath(meta.deriver) : undefined,
          });
          results.push({ status: "ok", path, value: { added } });
        } catch (e) {
          r.abort();
          results.push({ status: "error", path: meta.storePath, error: asFerryError(e) });
        }
      },
    });
    try {
      for await (const chunk of source) reader.push(chunk);
      reader.end();
      return { results };
    } catch (e) {
      restorer?.abort();
      return { results, error: asFerryError(e) };
    }
  }

  // ---- verification -------------------------------------------------------------------------

  /** Re-hashes every valid path (or the given ones) and reports what is missing or corrupt. */
  verify(paths?: readonly string[], onItem?: (item: VerifyItem) => void): VerifyItem[] {
    const targets = paths ? paths.map((p) => this.requirePathInfo(p).path) : this.allValidPaths();
    const out: VerifyItem[] = [];
    for (const p of targets) {
      const info = this.queryPathInfo(p)!;
      const item = checkContent(p, this.realPathOf(p), info.narHash, info.narSize);
      onItem?.(item);
      out.push(item);
    }
    return out;
  }

  // ---- roots and garbage collection ----------------------------------------------------------

  get gcRootsDir(): string {
    return join(this.realStateDir, "gcroots");
  }

  /** Makes `gcroots/NAME` a root for `path`. */
  addRoot(name: string, path: string): string {
    if (!/^[A-Za-z0-9+\-._=]+$/.test(name) || name.startsWith(".")) {
      throw storeError("FERRY_STORE_BAD_ROOT_NAME", `'${name}' cannot name a GC root`, "use letters, digits and + - . _ =");
    }
    const info = this.requirePathInfo(path);
    const link = join(this.gcRootsDir, name);
    const tmp = `${link}.tmp-${randomSuffix()}`;
    fs.symlinkSync(info.path, tmp);
    fs.renameSync(tmp, link);
    fsyncPath(this.gcRootsDir);
    return link;
  }

  removeRoot(name: string): boolean {
    try {
      fs.unlinkSync(join(this.gcRootsDir, name));
      return true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return false;
      throw e;
    }
  }

  /** Root symlinks (recursively under gcroots/) and the store paths they keep alive. */
  findRoots(): { link: string; path: string }[] {
    const out: { link: string; path: string }[] = [];
    const walk = (dir: string) => {
      let names: string[];
      try {
        names = fs.readdirSync(dir);
      } catch {
        return;
      }
      for (const n of names) {
        const link = join(dir, n);
        const st = fs.lstatSync(link, { throwIfNoEntry: false });
        if (!st) continue;
        if (st.isDirectory()) walk(link);
        else if (st.isSymbolicLink()) {
          const p = this.#rootTarget(link, 0);
          if (p) out.push({ link, path: p });
        }
      }
    };
    walk(this.gcRootsDir);
    return out;
  }

  /** Follows a root symlink (and links it points at, for indirect roots) to a valid store path. */
  #rootTarget(link: string, depth: number): string | undefined {
    if (depth > 8) return undefined;
    let target: string;
    try {
      target = fs.readlinkSync(link);
    } catch {
      return undefined;
    }
    if (target.startsWith(this.storeDir + "/")) {
      const base = target.slice(this.storeDir.length + 1).split("/")[0]!;
      const p = `${this.storeDir}/${base}`;
      return this.isValid(p) ? p : undefined;
    }
    const next = target.startsWith("/") ? target : join(link, "..", target);
    return isSymlink(next) ? this.#rootTarget(next, depth + 1) : undefined;
  }

  /** Temp roots of live handles (read under the temp-roots write lock); rows of dead processes are dropped. */
  #tempRoots(roots: Database.Database): string[] {
    const rows = roots.prepare(SQL.allTempRoots).all() as { owner: string; paths: string }[];
    const out: string[] = [];
    const dead = new Set<string>();
    for (const r of rows) {
      const pid = Number(r.owner.split("-")[0]);
      if (!Number.isInteger(pid) || (pid !== process.pid && !processAlive(pid))) dead.add(r.owner);
      else out.push(...r.paths.split("\n"));
    }
    for (const o of dead) roots.prepare(SQL.deleteTempRoots).run(o);
    return out;
  }

  /**
   * Deletes every object not reachable from a root (or a live process's temp root), and the
   * leftovers of interrupted adds. The decision and the unlinking happen under the store's
   * write lock, so an add in progress can neither lose its object nor see a half-deleted one.
   */
  gc(opts: { dryRun?: boolean } = {}): GcResult {
    // The temp-roots write lock is held from before the decision until the deletion is
    // committed, so no path can be rooted (and then written or found valid) in between.
    const roots = this.#roots();
    // The temp-roots transaction is the outer one, so it ends after the store's commits: a
    // writer that roots a path and then finds it valid cannot see it before GC's deletion of
    // it is committed.
    const plan = roots.transaction(() => this.#db.transaction(() => this.#collect(roots, opts)).immediate()).immediate();
    if (plan.trash) removeTree(plan.trash);
    return { deleted: plan.dead, bytesFreed: plan.bytes, roots: plan.roots, leftovers: plan.leftovers };
  }

  /** GC's decision and unlinking; the caller holds both write locks. */
  #collect(roots: Database.Database, opts: { dryRun?: boolean }): { dead: string[]; bytes: number; leftovers: string[]; roots: string[]; trash: string | undefined } {
    const tempRoots = this.#tempRoots(roots);
    this.#restoreInterruptedGc();
    const rootPaths = [...new Set([...this.findRoots().map((r) => r.path), ...tempRoots.filter((p) => this.isValid(p))])];
    const live = new Set(rootPaths.length ? this.closure(rootPaths) : []);
    const valid = this.allValidPaths();
    const dead = valid.filter((p) => !live.has(p));
    const validNames = new Set(valid.map((p) => p.slice(this.storeDir.length + 1)));
    // A live process may be about to register a path it is writing in place (a build
    // without the sandbox, .drv files): its temp root protects that name too.
    const rootedNames = new Set(tempRoots.map((p) => p.slice(this.storeDir.length + 1)));
    const leftovers: string[] = [];
    for (const n of fs.readdirSync(this.realStoreDir)) {
      if (validNames.has(n) || rootedNames.has(n)) continue;
      const m = /^\.ferry-(?:tmp|trash)-(\d+)-/.exec(n);
      if (m && processAlive(Number(m[1]))) continue;
      leftovers.push(n);
    }
    let bytes = 0;
    for (const p of dead) bytes += this.queryPathInfo(p)!.narSize;
    if (opts.dryRun) return { dead, bytes, leftovers, roots: rootPaths.sort(), trash: undefined };
    const idStmt = this.#stmt(SQL.idByPath);
    const trash = this.#unregister(dead.map((p) => ({ id: (idStmt.get(p) as { id: number }).id, path: p })), leftovers);
    return { dead, bytes, leftovers, roots: rootPaths.sort(), trash };
  }

  /**
   * Unregisters `paths` (ids and paths; every path referring to one must be among them) and
   * moves their files, and the store entries `leftovers`, into a new trash directory, which
   * is returned for the caller to remove once the transaction (which the caller holds) has
   * committed. Unlinking under the lock is renaming (cheap); if a rename fails, what was
   * moved goes back before the rollback restores the rows; if the process dies before the
   * commit, the next GC moves valid paths back out of its trash.
   */
  #unregister(paths: readonly { readonly id: number; readonly path: string }[], leftovers: readonly string[] = []): string {
    for (const { id } of paths) this.#stmt(SQL.deleteRefsFrom).run(id);
    for (const { id } of paths) this.#stmt(SQL.deletePath).run(id);
    if (paths.length) this.#stmt(SQL.bumpGcGeneration).run();
    const trash = join(this.realStoreDir, `${TRASH_PREFIX}${randomSuffix()}`);
    fs.mkdirSync(trash);
    const moved: [string, string][] = [];
    try {
      for (const { path } of paths) {
        const real = this.realPathOf(path);
        const to = join(trash, path.slice(this.storeDir.length + 1));
        if (renameIfPresent(real, to)) moved.push([real, to]);
      }
      for (const n of leftovers) renameIfPresent(join(this.realStoreDir, n), join(trash, n));
      fsyncPath(this.realStoreDir);
    } catch (e) {
      for (const [from, to] of moved.reverse()) fs.renameSync(to, from);
      throw e;
    }
    return trash;
  }

  /**
   * A GC killed after moving paths into its trash but before committing left valid paths
   * without content: move them back from the trash of any dead process. Runs under the lock.
   */
  #restoreInterruptedGc(): void {
    for (const n of fs.readdirSync(this.realStoreDir)) {
      const m = /^\.ferry-trash-(\d+)-/.exec(n);
      if (!m || processAlive(Number(m[1]))) continue;
      const dir = join(this.realStoreDir, n);
      let entries: string[];
      try {
        entries = fs.readdirSync(dir);
      } catch {
        continue; // a trash file, not a directory
      }
      for (const e of entries) {
        const path = `${this.storeDir}/${e}`;
        const real = join(this.realStoreDir, e);
        if (this.isValid(path) && !pathExists(real)) fs.renameSync(join(dir, e), real);
      }
    }
  }
}

/** Renames `from` to `to`; false when `from` is already gone. */
function renameIfPresent(from: string, to: string): boolean {
  try {
    fs.renameSync(from, to);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw e;
  }
}

/** The path `addPath` would give `src`, computed without a store (nothing is written). */
export function computeSourcePath(storeDir: string, src: string, opts: { name?: string | undefined; onFile?: (size: number) => void } = {}): AddResult {
  const name = checkNewName(opts.name ?? basenameOf(src));
  const { hash, size } = hashPath(src, "sha256", opts.onFile ? { onFile: opts.onFile } : {});
  return { path: printStorePath(makeSourcePath(storeDir, name, hash)), added: false, narHash: hash, narSize: size };
}

/**
 * Puts `db` in WAL mode. Switching needs a lock SQLite does not wait for (no busy handler), so
 * a database opened while another process writes can see SQLITE_BUSY here: set it only when it
 * is not WAL yet, and retry briefly.
 */
function setWal(db: Database.Database): void {
  for (let attempt = 0; ; attempt++) {
    try {
      if (db.pragma("journal_mode", { simple: true }) !== "wal") db.pragma("journal_mode = WAL");
      return;
    } catch (e) {
      if ((e as { code?: string }).code !== "SQLITE_BUSY" || attempt >= 200) throw e;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 25);
    }
  }
}

/** Brings the schema up to date. The version is read under the write lock, so processes
 * opening a new store at the same moment migrate it once. */
function migrate(db: Database.Database): void {
  const read = () => db.pragma("user_version", { simple: true }) as number;
  if (read() === MIGRATIONS.length) return;
  db.transaction(() => {
    const version = read();
    if (version > MIGRATIONS.length) {
      throw new FerryError("FERRY_STORE_DB_TOO_NEW", `the store database is at schema ${version}; this Ferry knows ${MIGRATIONS.length}`, {
        hint: "use a newer Ferry with this store",
      });
    }
    for (let v = version; v < MIGRATIONS.length; v++) db.exec(MIGRATIONS[v]!);
    db.pragma(`user_version = ${MIGRATIONS.length}`);
  }).immediate();
}

function rowToInfo(row: Row, refs: string[]): PathInfo {
  const colon = row.hash.indexOf(":");
  const algo = row.hash.slice(0, colon) as HashAlgo;
  const narHash = makeHash(algo, fromBase16(row.hash.slice(colon + 1)));
  return Object.freeze({
    path: row.path,
    narHash,
    narSize: row.narSize ?? 0,
    references: refs,
    ...(row.deriver ? { deriver: row.deriver } : {}),
    registrationTime: row.registrationTime,
    sigs: (row.sigs ?? "").split(" ").filter((s) => s),
    ...(row.ca ? { ca: parseContentAddress(row.ca, (s) => parseHash(s)) } : {}),
    ultimate: row.ultimate === 1,
  });
}

function basenameOf(p: string): string {
  const trimmed = p.replace(/\/+$/, "");
  return trimmed.slice(trimmed.lastIndexOf("/") + 1);
}

const CREATE_NEW = fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL;

/** Writes a new canonical (0444, mtime 1) file, fsync'ed unless the caller syncs a batch; removes it again on failure. */
/**
 * Creates `path` exclusively as a read-only file holding `bytes` with mtime 1. "exists" when
 * the name is taken (nothing was done); an error thrown after creating is returned, the file
 * left for the caller to remove as its contract allows.
 */
function createReadOnlyFile(path: string, bytes: Uint8Array, fsync: boolean): "created" | "exists" | Error {
  let fd: number;
  try {
    fd = fs.openSync(path, CREATE_NEW, 0o444);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "EEXIST") return "exists";
    throw e;
  }
  try {
    try {
      for (let off = 0; off < bytes.length; ) off += fs.writeSync(fd, bytes, off);
      fs.futimesSync(fd, 1, 1);
      if (fsync) fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  } catch (e) {
    return e as Error;
  }
  return "created";
}

let narScratch: Uint8Array = new Uint8Array(64 * 1024);

export { asFerryError } from "../core/errors.js";

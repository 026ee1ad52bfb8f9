/**
 * The snapshotter's metadata: one SQLite database (better-sqlite3, WAL) at
 * `<root>/metadata.db` holding every snapshot the daemon knows, with the semantics of
 * containerd's metadata storage for snapshotters (containerd/snapshots/storage):
 *
 * - Prepare and View create an `active` or `view` snapshot under a new key; its parent, when
 *   given, must exist (NotFound) and be `committed` (InvalidArgument). A taken key is
 *   AlreadyExists.
 * - Commit turns an active snapshot into a committed one under a new name (AlreadyExists when
 *   the name is taken, FailedPrecondition when the key is not active); it keeps its id, and
 *   its labels are replaced by the commit's, not inherited.
 * - Remove fails with FailedPrecondition while the snapshot has children.
 * - Update changes labels only: field paths `labels` (replace all) and `labels.<key>` (one
 *   label); no paths means all mutable fields (the labels). Any other path is InvalidArgument.
 *   A label with an empty value is not stored (as containerd's boltutil).
 *
 * Every mutation is one SQLite transaction, so a crash leaves the old state or the new one.
 * Ids are allocated from a persistent sequence and never reused (a directory named after a
 * removed snapshot's id can never be mistaken for a new snapshot's).
 *
 * A file system without space: a write transaction that cannot be written rolls back and
 * throws ResourceExhausted naming the database (so no half-written row). So that Removes, which
 * give space back, still work on a full file system, a space reserve (`metadata.reserve` next to
 * the database, 1 MiB of zeros) is kept: a Remove that finds no space deletes it, logs a warning
 * and runs again; the reserve is made again after the next write that finds room for it.
 *
 * better-sqlite3 is synchronous: each call runs on the caller's thread. The statements are
 * small indexed lookups on a local file (never on a FUSE mount), so they do not stall the
 * event loop the way a synchronous call on a FUSE path would. `synchronous = NORMAL` in WAL
 * mode: a killed process loses nothing; a power loss may lose the last transactions but
 * never leaves the database inconsistent.
 */
import Database from 'better-sqlite3';
import { closeSync, fstatSync, openSync, statSync, unlinkSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { Logger } from '../fetcher/index.js';
import { alreadyExists, failedPrecondition, invalidArgument, isNoSpace, notFound, SnapshotterError } from './errdefs.js';
import { parseFilters } from './filters.js';

export type SnapshotKind = 'active' | 'committed' | 'view';

/** A point in time as protobuf's Timestamp carries it. */
export interface Time {
  seconds: number;
  nanos: number;
}

export interface Usage {
  /** Bytes of disk used (blocks × 512 of each distinct inode). */
  size: number;
  /** Distinct inodes. */
  inodes: number;
}

/** What containerd's Stat / List answer. */
export interface SnapshotInfo {
  name: string;
  /** The parent's name, `''` for none. */
  parent: string;
  kind: SnapshotKind;
  labels: Record<string, string>;
  created: Time;
  updated: Time;
}

/** Where a remotely served (lazily loaded) snapshot's content comes from. */
export interface RemoteLayer {
  /** The layer blob's digest. */
  layerDigest: string;
  /** The SOCI index the layer's zTOC was found through. */
  indexDigest?: string;
}

/** Everything stored about one snapshot. */
export interface SnapshotRecord extends SnapshotInfo {
  /** The snapshot's id: its directory under `<root>/snapshots/`. */
  id: string;
  /** Usage recorded at commit (zeros for active and view snapshots). */
  usage: Usage;
  remote: RemoteLayer | undefined;
}

/** An active or view snapshot and the ids of its parents, nearest first (what mounts need). */
export interface MountableSnapshot {
  id: string;
  kind: 'active' | 'view';
  parentIds: string[];
}

export interface CreateOptions {
  labels?: Record<string, string>;
  /** The id to use, from {@link MetadataStore.reserveId}; a fresh one when omitted. */
  id?: string;
  remote?: RemoteLayer;
}

/** What is needed to mount a lazily served layer again (after the FUSE manager restarted). */
export interface RemoteDetails {
  imageRef: string;
  manifestDigest: string;
  layerMediaType: string;
  layerSize: number;
  ztocDigest: string;
  ztocSize: number;
  ztocMediaType: string;
}

export type LayerMode = 'lazy' | 'local' | 'fallback';

/** How a layer was last served by a Prepare with the remote labels, and why. */
export interface LayerModeRecord {
  layerDigest: string;
  mode: LayerMode;
  /** Why it is not lazy (empty for lazy). */
  reason: string;
  snapshotKey: string;
  imageRef: string;
  indexDigest?: string;
  /** Microseconds since the epoch (set by the store). */
  updatedUs?: number;
}

/** A committed, lazily served snapshot with what its mount needs. */
export interface LazySnapshot {
  id: string;
  name: string;
  layerDigest: string;
  indexDigest: string | undefined;
  details: RemoteDetails;
}

export interface CommitOptions {
  labels?: Record<string, string>;
  usage?: Usage;
  remote?: RemoteLayer;
  /** With `remote`: how to mount it again (kept in the same transaction). */
  details?: RemoteDetails;
  /** Recorded in the layer modes, in the same transaction. */
  layerMode?: LayerModeRecord;
}

/** containerd's limit on one label (labels.Validate): key and value together. */
export const MAX_LABEL_BYTES = 4096;

const SCHEMA_VERSION = 2;

/** Size of the space reserve kept next to the database (room for the log frames of many Removes). */
export const DEFAULT_RESERVE_BYTES = 1 << 20;

export interface MetadataOptions {
  /** Bytes of the space reserve (default 1 MiB; 0 = none). */
  reserveBytes?: number;
  /** Where the store says it used its reserve. */
  logger?: Logger;
}

/** ResourceExhausted for a file system without space: `<context>: no space left on the file system (<cause>)`. */
function noSpace(context: string, cause: unknown): SnapshotterError {
  const code = (cause as { code?: unknown }).code;
  const text = cause instanceof Error ? cause.message : String(cause);
  return new SnapshotterError('ResourceExhausted', `${context}: no space left on its file system (${typeof code === 'string' ? `${code}: ` : ''}${text})`, { cause });
}

interface Row {
  id: number;
  key: string;
  kind: SnapshotKind;
  parent_id: number | null;
  parent_key: string | null;
  labels: string;
  created_us: number;
  updated_us: number;
  size: number;
  inodes: number;
  remote: number;
  layer_digest: string | null;
  index_digest: string | null;
}

interface DetailsRow {
  id: number;
  image_ref: string;
  manifest_digest: string;
  layer_media_type: string;
  layer_size: number;
  ztoc_digest: string;
  ztoc_size: number;
  ztoc_media_type: string;
}

interface ModeRow {
  layer_digest: string;
  mode: LayerMode;
  reason: string;
  snapshot_key: string;
  image_ref: string;
  index_digest: string | null;
  updated_us: number;
}

function toDetails(r: DetailsRow): RemoteDetails {
  return {
    imageRef: r.image_ref,
    manifestDigest: r.manifest_digest,
    layerMediaType: r.layer_media_type,
    layerSize: r.layer_size,
    ztocDigest: r.ztoc_digest,
    ztocSize: r.ztoc_size,
    ztocMediaType: r.ztoc_media_type,
  };
}

function toMode(r: ModeRow): LayerModeRecord {
  return {
    layerDigest: r.layer_digest,
    mode: r.mode,
    reason: r.reason,
    snapshotKey: r.snapshot_key,
    imageRef: r.image_ref,
    ...(r.index_digest !== null ? { indexDigest: r.index_digest } : {}),
    updatedUs: r.updated_us,
  };
}

const SELECT_ROW = `SELECT s.id, s.key, s.kind, s.parent_id, p.key AS parent_key, s.labels, s.created_us, s.updated_us,
  s.size, s.inodes, s.remote, s.layer_digest, s.index_digest
  FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id`;

/** Microseconds since the epoch, with sub-millisecond resolution. */
function nowMicros(): number {
  return Math.round((performance.timeOrigin + performance.now()) * 1000);
}

export function microsToTime(us: number): Time {
  const seconds = Math.floor(us / 1e6);
  return { seconds, nanos: (us - seconds * 1e6) * 1000 };
}

/** Checks labels as containerd does and drops empty values (they are not stored). */
export function normalizeLabels(labels: Record<string, string> | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  if (labels === undefined) return out;
  for (const k of Object.keys(labels).sort()) {
    const v = labels[k];
    if (typeof v !== 'string') throw invalidArgument(`label ${JSON.stringify(k)}: value is not a string`);
    if (k === '') throw invalidArgument('label key must not be empty');
    const bytes = Buffer.byteLength(k) + Buffer.byteLength(v);
    if (bytes > MAX_LABEL_BYTES) {
      throw invalidArgument(`label key and value length (${bytes} bytes) greater than maximum size (${MAX_LABEL_BYTES} bytes), key: ${k.slice(0, 100)}`);
    }
    if (v !== '') out[k] = v;
  }
  return out;
}

function parseLabels(json: string, key: string): Record<string, string> {
  try {
    const v = JSON.parse(json) as unknown;
    if (v !== null && typeof v === 'object' && !Array.isArray(v)) return v as Record<string, string>;
  } catch {
    // reported below
  }
  throw new SnapshotterError('Internal', `metadata of snapshot ${key}: labels are not a JSON object`);
}

function toRecord(r: Row): SnapshotRecord {
  return {
    id: String(r.id),
    name: r.key,
    parent: r.parent_key ?? '',
    kind: r.kind,
    labels: parseLabels(r.labels, r.key),
    created: microsToTime(r.created_us),
    updated: microsToTime(r.updated_us),
    usage: { size: r.size, inodes: r.inodes },
    remote: r.remote === 1 ? { layerDigest: r.layer_digest ?? '', ...(r.index_digest !== null ? { indexDigest: r.index_digest } : {}) } : undefined,
  };
}

export function toInfo(r: SnapshotRecord): SnapshotInfo {
  return { name: r.name, parent: r.parent, kind: r.kind, labels: r.labels, created: r.created, updated: r.updated };
}

function requireKey(key: string, what: string): void {
  if (typeof key !== 'string' || key === '') throw invalidArgument(`${what} must not be empty`);
}

export class MetadataStore {
  private readonly db: Database.Database;
  private readonly stmt: {
    byKey: Database.Statement<[string], Row>;
    idOfKey: Database.Statement<[string], { id: number; kind: SnapshotKind; parent_id: number | null }>;
    all: Database.Statement<[], Row>;
    chain: Database.Statement<[number], { id: number }>;
    firstChild: Database.Statement<[number], { id: number }>;
    insert: Database.Statement<[number, string, SnapshotKind, number | null, string, number, number, number, string | null, string | null]>;
    idExists: Database.Statement<[number], { id: number }>;
    nextId: Database.Statement<[], { value: number }>;
    commit: Database.Statement<[string, string, number, number, number, number, number, string | null, string | null, number]>;
    setLabels: Database.Statement<[string, number, number]>;
    remove: Database.Statement<[number]>;
    insertDetails: Database.Statement<[number, string, string, string, number, string, number, string]>;
    detailsOf: Database.Statement<[number], DetailsRow>;
    lazy: Database.Statement<[], DetailsRow & { key: string; layer_digest: string | null; index_digest: string | null }>;
    ztocUsers: Database.Statement<[string], { n: number }>;
    upsertMode: Database.Statement<[string, LayerMode, string, string, string, string | null, number]>;
    modes: Database.Statement<[], ModeRow>;
    modeOf: Database.Statement<[string], ModeRow>;
    ids: Database.Statement<[], { id: number; key: string }>;
    totals: Database.Statement<[], { kind: SnapshotKind; count: number; size: number; inodes: number }>;
  };

  /** The space reserve next to the database (see the module comment). */
  readonly reservePath: string;
  private readonly reserveBytes: number;
  private readonly log: Logger | undefined;
  /** The reserve file is missing or shorter than it should be (topped up after the next write). */
  private reserveShort = true;

  /** Opens (creating when needed) `<root>/metadata.db`. */
  static open(root: string, opts: MetadataOptions = {}): MetadataStore {
    return new MetadataStore(join(root, 'metadata.db'), opts);
  }

  constructor(
    readonly path: string,
    opts: MetadataOptions = {},
  ) {
    this.reservePath = join(dirname(path), 'metadata.reserve');
    this.reserveBytes = opts.reserveBytes ?? DEFAULT_RESERVE_BYTES;
    this.log = opts.logger;
    let db: Database.Database;
    try {
      db = new Database(path);
    } catch (e) {
      if (isNoSpace(e)) throw noSpace(`cannot create the metadata database ${path}`, e);
      throw new SnapshotterError('Internal', `cannot open the metadata database ${path}: ${(e as Error).message}`, { cause: e });
    }
    this.db = db;
    try {
      db.pragma('journal_mode = WAL');
      db.pragma('synchronous = NORMAL');
      db.pragma('foreign_keys = ON');
      db.pragma('busy_timeout = 5000');
      this.migrate();
    } catch (e) {
      db.close();
      if (e instanceof SnapshotterError && e.kind === 'ResourceExhausted') {
        const err = new SnapshotterError('ResourceExhausted', '', { cause: e });
        err.message = `cannot set up the metadata database: ${e.message}`;
        throw err;
      }
      if (e instanceof SnapshotterError) throw e;
      if (isNoSpace(e)) throw noSpace(`cannot set up the metadata database ${path}`, e);
      throw new SnapshotterError('Internal', `cannot set up the metadata database ${path}: ${(e as Error).message}`, { cause: e });
    }
    this.ensureReserve();
    this.stmt = {
      byKey: db.prepare(`${SELECT_ROW} WHERE s.key = ?`),
      idOfKey: db.prepare('SELECT id, kind, parent_id FROM snapshots WHERE key = ?'),
      all: db.prepare(`${SELECT_ROW} ORDER BY s.key`),
      // The parent chain from a snapshot up, nearest first. The depth bound only guards
      // against a corrupted database; a real chain is acyclic (parents are older).
      chain: db.prepare(`WITH RECURSIVE chain(id, parent_id, depth) AS (
          SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
          UNION ALL
          SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id WHERE c.depth < 100000
        ) SELECT id FROM chain ORDER BY depth`),
      firstChild: db.prepare('SELECT id FROM snapshots WHERE parent_id = ? LIMIT 1'),
      insert: db.prepare(`INSERT INTO snapshots (id, key, kind, parent_id, labels, created_us, updated_us, remote, layer_digest, index_digest)
          VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`),
      idExists: db.prepare('SELECT id FROM snapshots WHERE id = ?'),
      nextId: db.prepare(`UPDATE meta SET value = value + 1 WHERE name = 'next_id' RETURNING value - 1 AS value`),
      commit: db.prepare(`UPDATE snapshots SET key = ?, kind = 'committed', labels = ?, created_us = ?, updated_us = ?, size = ?, inodes = ?,
          remote = ?, layer_digest = ?, index_digest = ? WHERE id = ?`),
      setLabels: db.prepare('UPDATE snapshots SET labels = ?, updated_us = ? WHERE id = ?'),
      remove: db.prepare('DELETE FROM snapshots WHERE id = ?'),
      ids: db.prepare('SELECT id, key FROM snapshots'),
      totals: db.prepare('SELECT kind, count(*) AS count, coalesce(sum(size), 0) AS size, coalesce(sum(inodes), 0) AS inodes FROM snapshots GROUP BY kind'),
      insertDetails: db.prepare(`INSERT INTO remote_layers (id, image_ref, manifest_digest, layer_media_type, layer_size, ztoc_digest, ztoc_size, ztoc_media_type)
          VALUES (?, ?, ?, ?, ?, ?, ?, ?)`),
      detailsOf: db.prepare('SELECT * FROM remote_layers WHERE id = ?'),
      lazy: db.prepare(`SELECT r.*, s.key, s.layer_digest, s.index_digest FROM remote_layers r JOIN snapshots s ON s.id = r.id
          WHERE s.kind = 'committed' AND s.remote = 1 ORDER BY s.id`),
      ztocUsers: db.prepare('SELECT count(*) AS n FROM remote_layers WHERE ztoc_digest = ?'),
      upsertMode: db.prepare(`INSERT INTO layer_modes (layer_digest, mode, reason, snapshot_key, image_ref, index_digest, updated_us) VALUES (?, ?, ?, ?, ?, ?, ?)
          ON CONFLICT (layer_digest) DO UPDATE SET mode = excluded.mode, reason = excluded.reason, snapshot_key = excluded.snapshot_key,
          image_ref = excluded.image_ref, index_digest = excluded.index_digest, updated_us = excluded.updated_us`),
      modes: db.prepare('SELECT * FROM layer_modes ORDER BY layer_digest'),
      modeOf: db.prepare('SELECT * FROM layer_modes WHERE layer_digest = ?'),
    };
  }

  private migrate(): void {
    const version = this.db.pragma('user_version', { simple: true }) as number;
    if (version > SCHEMA_VERSION) {
      throw new SnapshotterError(
        'FailedPrecondition',
        `metadata database ${this.path} has schema version ${version}, newer than this soci-ts supports (${SCHEMA_VERSION})`,
      );
    }
    if (version === SCHEMA_VERSION) return;
    this.write(() => {
      if (version < 1) {
        this.db.exec(`
          CREATE TABLE snapshots (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL CHECK (kind IN ('active', 'committed', 'view')),
            parent_id INTEGER REFERENCES snapshots (id) ON DELETE RESTRICT,
            labels TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(labels)),
            created_us INTEGER NOT NULL,
            updated_us INTEGER NOT NULL,
            size INTEGER NOT NULL DEFAULT 0,
            inodes INTEGER NOT NULL DEFAULT 0,
            remote INTEGER NOT NULL DEFAULT 0 CHECK (remote IN (0, 1)),
            layer_digest TEXT,
            index_digest TEXT,
            CHECK (parent_id IS NULL OR parent_id <> id)
          );
          CREATE INDEX snapshots_by_parent ON snapshots (parent_id);
          CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
          INSERT INTO meta (name, value) VALUES ('next_id', 1);
        `);
      }
      if (version < 2) {
        // Version 2: what a lazily served snapshot needs to be mounted again, and how each layer
        // asked for remotely was served (lazy, local, fallback) and why.
        this.db.exec(`
          CREATE TABLE remote_layers (
            id INTEGER PRIMARY KEY REFERENCES snapshots (id) ON DELETE CASCADE,
            image_ref TEXT NOT NULL,
            manifest_digest TEXT NOT NULL,
            layer_media_type TEXT NOT NULL,
            layer_size INTEGER NOT NULL,
            ztoc_digest TEXT NOT NULL,
            ztoc_size INTEGER NOT NULL,
            ztoc_media_type TEXT NOT NULL
          );
          CREATE INDEX remote_layers_by_ztoc ON remote_layers (ztoc_digest);
          CREATE TABLE layer_modes (
            layer_digest TEXT PRIMARY KEY,
            mode TEXT NOT NULL CHECK (mode IN ('lazy', 'local', 'fallback')),
            reason TEXT NOT NULL,
            snapshot_key TEXT NOT NULL,
            image_ref TEXT NOT NULL,
            index_digest TEXT,
            updated_us INTEGER NOT NULL
          );
        `);
      }
      this.db.pragma(`user_version = ${SCHEMA_VERSION}`);
    });
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  /**
   * Runs `fn` in one write transaction (BEGIN IMMEDIATE). A file system without space makes it
   * roll back and throw ResourceExhausted naming the database.
   */
  private write<T>(fn: () => T): T {
    let out: T;
    try {
      out = this.db.transaction(fn).immediate();
    } catch (e) {
      if (!(e instanceof SnapshotterError) && isNoSpace(e)) throw noSpace(`metadata database ${this.path}`, e);
      throw e;
    }
    if (this.reserveShort) this.ensureReserve();
    return out;
  }

  /** Makes the reserve file its full size where space allows (what fits is kept). */
  private ensureReserve(): void {
    if (this.reserveBytes <= 0) {
      this.reserveShort = false;
      return;
    }
    let fd: number | undefined;
    try {
      fd = openSync(this.reservePath, 'a', 0o600);
      let have = fstatSync(fd).size;
      const zeros = Buffer.alloc(Math.min(this.reserveBytes, 64 << 10));
      while (have < this.reserveBytes) have += writeSync(fd, zeros, 0, Math.min(zeros.length, this.reserveBytes - have));
      this.reserveShort = false;
    } catch {
      this.reserveShort = true; // no space for it now: the next write tries again
    } finally {
      if (fd !== undefined) closeSync(fd);
    }
  }

  /** Deletes the reserve so that a transaction that frees space can run on a full file system. */
  private releaseReserve(): boolean {
    let size = 0;
    try {
      size = statSync(this.reservePath).size;
      unlinkSync(this.reservePath);
    } catch {
      return false;
    }
    this.reserveShort = true;
    this.log?.warn('the file system of the metadata database is full: its space reserve was released so that a Remove can be recorded (free space on it)', {
      database: this.path,
      reserve: this.reservePath,
      bytes: size,
    });
    return size > 0;
  }

  /**
   * Allocates a snapshot id (committed at once, so it is never handed out twice, even if the
   * snapshot it was meant for is never created).
   */
  reserveId(): string {
    return this.write(() => {
      const row = this.stmt.nextId.get();
      if (row === undefined) throw new SnapshotterError('Internal', `metadata database ${this.path}: the id sequence is missing`);
      return String(row.value);
    });
  }

  /**
   * The checks of {@link create} without writing: throws the error create would throw now.
   * Returns the parent's id (undefined without a parent).
   */
  checkCreate(kind: SnapshotKind, key: string, parent: string): string | undefined {
    if (kind !== 'active' && kind !== 'view') {
      throw invalidArgument(`snapshot type ${kind} invalid; only snapshots of type Active or View can be created`);
    }
    requireKey(key, 'snapshot key');
    let parentId: string | undefined;
    if (parent !== '') {
      const p = this.stmt.idOfKey.get(parent);
      if (p === undefined) throw notFound(`missing parent ${JSON.stringify(parent)}`);
      if (p.kind !== 'committed') throw invalidArgument(`parent ${JSON.stringify(parent)} is not committed snapshot`);
      parentId = String(p.id);
    }
    if (this.stmt.idOfKey.get(key) !== undefined) throw alreadyExists(`snapshot ${key}`);
    return parentId;
  }

  /** Creates an active or view snapshot (one transaction). */
  create(kind: SnapshotKind, key: string, parent: string, opts: CreateOptions = {}): MountableSnapshot {
    const labels = JSON.stringify(normalizeLabels(opts.labels));
    return this.write((): MountableSnapshot => {
      const parentId = this.checkCreate(kind, key, parent);
      const id = opts.id !== undefined ? Number(opts.id) : Number(this.reserveIdInTx());
      if (!Number.isSafeInteger(id) || id <= 0) throw invalidArgument(`snapshot id ${String(opts.id)} is not a positive integer`);
      if (this.stmt.idExists.get(id) !== undefined) throw alreadyExists(`snapshot id ${id}`);
      const t = nowMicros();
      const r = opts.remote;
      this.stmt.insert.run(id, key, kind, parentId === undefined ? null : Number(parentId), labels, t, t, r !== undefined ? 1 : 0, r?.layerDigest ?? null, r?.indexDigest ?? null);
      return { id: String(id), kind: kind as 'active' | 'view', parentIds: parentId === undefined ? [] : this.chainIds(Number(parentId)) };
    });
  }

  private reserveIdInTx(): string {
    const row = this.stmt.nextId.get();
    if (row === undefined) throw new SnapshotterError('Internal', `metadata database ${this.path}: the id sequence is missing`);
    return String(row.value);
  }

  private chainIds(fromId: number): string[] {
    return this.stmt.chain.all(fromId).map((r) => String(r.id));
  }

  /** The full record of `key` (name of a committed snapshot or key of an active/view one). */
  get(key: string): SnapshotRecord | undefined {
    const r = this.stmt.byKey.get(key);
    return r === undefined ? undefined : toRecord(r);
  }

  /** Stat: the info, id and recorded usage of `key`; NotFound when there is none. */
  stat(key: string): SnapshotRecord {
    const r = this.get(key);
    if (r === undefined) throw notFound('snapshot does not exist');
    return r;
  }

  /** The active or view snapshot `key` with its parent chain (for Mounts). */
  mountable(key: string): MountableSnapshot {
    return this.db.transaction((): MountableSnapshot => {
      const r = this.stmt.idOfKey.get(key);
      if (r === undefined) throw notFound('snapshot does not exist');
      if (r.kind !== 'active' && r.kind !== 'view') throw failedPrecondition(`requested snapshot ${key} not active or view`);
      return { id: String(r.id), kind: r.kind, parentIds: r.parent_id === null ? [] : this.chainIds(r.parent_id) };
    }).deferred();
  }

  /**
   * Update: only labels change (`labels`, `labels.<key>`; none = all labels). Returns the
   * updated info.
   */
  update(name: string, labels: Record<string, string> | undefined, fieldpaths: readonly string[]): SnapshotRecord {
    return this.write((): SnapshotRecord => {
      const cur = this.get(name);
      if (cur === undefined) throw notFound('snapshot does not exist');
      const given = labels ?? {};
      let next: Record<string, string> = { ...cur.labels };
      if (fieldpaths.length === 0) next = { ...given };
      for (const path of fieldpaths) {
        if (path.startsWith('labels.')) {
          const k = path.slice('labels.'.length);
          next[k] = given[k] ?? '';
        } else if (path === 'labels') {
          next = { ...given };
        } else {
          throw invalidArgument(`cannot update ${JSON.stringify(path)} field on snapshot ${JSON.stringify(name)}`);
        }
      }
      const normalized = normalizeLabels(next);
      this.stmt.setLabels.run(JSON.stringify(normalized), nowMicros(), Number(cur.id));
      const after = this.get(name);
      if (after === undefined) throw new SnapshotterError('Internal', `snapshot ${name} vanished during update`);
      return after;
    });
  }

  /**
   * Commit: the active snapshot `key` becomes the committed snapshot `name` (same id). Labels
   * are the commit's (not inherited); `usage` is recorded. Returns the id.
   */
  commit(key: string, name: string, opts: CommitOptions = {}): string {
    const labels = JSON.stringify(normalizeLabels(opts.labels));
    return this.write((): string => {
      requireKey(name, 'committed snapshot name');
      if (this.stmt.idOfKey.get(name) !== undefined) throw alreadyExists(`committed snapshot ${name}`);
      const cur = this.get(key);
      if (cur === undefined) throw notFound(`failed to get active snapshot ${JSON.stringify(key)}`);
      if (cur.kind !== 'active') throw failedPrecondition(`snapshot ${JSON.stringify(key)} is not active`);
      const t = nowMicros();
      const remote = opts.remote ?? cur.remote;
      const usage = opts.usage ?? { size: 0, inodes: 0 };
      this.stmt.commit.run(
        name,
        labels,
        t,
        t,
        usage.size,
        usage.inodes,
        remote !== undefined ? 1 : 0,
        remote?.layerDigest ?? null,
        remote?.indexDigest ?? null,
        Number(cur.id),
      );
      const d = opts.details;
      if (d !== undefined) {
        if (remote === undefined) throw invalidArgument(`commit of ${key}: remote details without a remote layer`);
        this.stmt.insertDetails.run(Number(cur.id), d.imageRef, d.manifestDigest, d.layerMediaType, d.layerSize, d.ztocDigest, d.ztocSize, d.ztocMediaType);
      }
      if (opts.layerMode !== undefined) this.upsertMode(opts.layerMode, t);
      return cur.id;
    });
  }

  /** Remove: FailedPrecondition while it has children. Returns the removed record (with its remote details). */
  remove(key: string): SnapshotRecord & { details?: RemoteDetails } {
    const tx = (): SnapshotRecord & { details?: RemoteDetails } => {
      const cur = this.get(key);
      if (cur === undefined) throw notFound(`snapshot ${key}`);
      if (this.stmt.firstChild.get(Number(cur.id)) !== undefined) throw failedPrecondition('cannot remove snapshot with child');
      const d = this.stmt.detailsOf.get(Number(cur.id));
      this.stmt.remove.run(Number(cur.id));
      return d === undefined ? cur : { ...cur, details: toDetails(d) };
    };
    try {
      return this.write(tx);
    } catch (e) {
      // A Remove is how space comes back: on a full file system it may use the reserve.
      if (!isNoSpace(e) || !this.releaseReserve()) throw e;
      return this.write(tx);
    }
  }

  /** The remote details of snapshot `id`, if it is served lazily. */
  details(id: string): RemoteDetails | undefined {
    const d = this.stmt.detailsOf.get(Number(id));
    return d === undefined ? undefined : toDetails(d);
  }

  /** Every committed snapshot served lazily, with what its mount needs (by id). */
  lazySnapshots(): LazySnapshot[] {
    return this.stmt.lazy.all().map((r) => ({
      id: String(r.id),
      name: r.key,
      layerDigest: r.layer_digest ?? '',
      indexDigest: r.index_digest ?? undefined,
      details: toDetails(r),
    }));
  }

  /** How many lazily served snapshots use the zTOC. */
  ztocUsers(ztocDigest: string): number {
    return this.stmt.ztocUsers.get(ztocDigest)?.n ?? 0;
  }

  private upsertMode(m: LayerModeRecord, t: number): void {
    if (m.mode !== 'lazy' && m.mode !== 'local' && m.mode !== 'fallback') throw invalidArgument(`layer mode ${String(m.mode)}`);
    this.stmt.upsertMode.run(m.layerDigest, m.mode, m.reason, m.snapshotKey, m.imageRef, m.indexDigest ?? null, t);
  }

  /** Records how a layer was served (one transaction). */
  recordLayerMode(m: LayerModeRecord): void {
    this.write(() => this.upsertMode(m, nowMicros()));
  }

  /** Every layer's last recorded mode, by layer digest. */
  layerModes(): LayerModeRecord[] {
    return this.stmt.modes.all().map(toMode);
  }

  layerMode(layerDigest: string): LayerModeRecord | undefined {
    const r = this.stmt.modeOf.get(layerDigest);
    return r === undefined ? undefined : toMode(r);
  }

  /** Every snapshot matching any of `filters` (containerd filter syntax), ordered by name. */
  list(filters: readonly string[] = []): SnapshotRecord[] {
    const match = parseFilters(filters);
    const out: SnapshotRecord[] = [];
    for (const row of this.stmt.all.all()) {
      const r = toRecord(row);
      const ok = match((fp) => {
        switch (fp[0]) {
          case 'kind':
            return r.kind;
          case 'name':
            return r.name;
          case 'parent':
            return r.parent;
          case 'labels': {
            if (fp.length < 2) return undefined;
            const k = fp.slice(1).join('.');
            return Object.prototype.hasOwnProperty.call(r.labels, k) ? r.labels[k] : undefined;
          }
          default:
            return undefined;
        }
      });
      if (ok) out.push(r);
    }
    return out;
  }

  /** Is `id` (a directory name under snapshots/) the id of a snapshot? */
  hasId(id: string): boolean {
    if (!/^[1-9][0-9]{0,15}$/.test(id)) return false;
    return this.stmt.idExists.get(Number(id)) !== undefined;
  }

  /** id → key of every snapshot. */
  idMap(): Map<string, string> {
    return new Map(this.stmt.ids.all().map((r) => [String(r.id), r.key]));
  }

  /** Count, recorded bytes and inodes per kind (recorded usage is that of committed snapshots). */
  totals(): Record<SnapshotKind, { count: number; size: number; inodes: number }> {
    const out: Record<SnapshotKind, { count: number; size: number; inodes: number }> = {
      active: { count: 0, size: 0, inodes: 0 },
      committed: { count: 0, size: 0, inodes: 0 },
      view: { count: 0, size: 0, inodes: 0 },
    };
    for (const r of this.stmt.totals.all()) out[r.kind] = { count: r.count, size: r.size, inodes: r.inodes };
    return out;
  }
}

/**
 * The local store of SOCI artifacts under a root directory (CLI `--root`, default
 * `/var/lib/soci-ts`):
 *
 * ```
 * <root>/content/                 an OCI image layout: oci-layout, blobs/sha256/<hex>
 * <root>/indexes/<hex>.json       one record per SOCI index manifest (see IndexRecord)
 * <root>/.lock                    held while records change and blobs are collected
 * ```
 *
 * `content/index.json` is not written: concurrent writers would fight over one file. The
 * record of which indexes exist is the set of files under `indexes/`, each written whole.
 *
 * Crash and concurrency rules:
 * - Every file (blob, record, oci-layout) is written to `<name>.tmp-<pid>-<random>` in its
 *   final directory, fsynced and renamed into place, so readers see the old file or the
 *   whole new one. Blobs are content-addressed, so two writers of one blob write equal
 *   bytes. Leftover temp files are ignored by listings and removed by `gc()`.
 * - Adding a record, removing an index and `gc()` hold `<root>/.lock`. A lock whose
 *   holder process is dead (same host) is taken over. Putting blobs takes no lock.
 * - `removeIndex` collects only the blobs of the removed record that no remaining record
 *   references. A writer that put a shared zTOC just before a concurrent `removeIndex`
 *   collected it gets a `not-found` StoreError from `addIndexRecord` (which checks, under
 *   the lock, that every blob it names is present): put the blobs again and retry.
 */
import { createHash, randomBytes } from 'node:crypto';
import { link, mkdir, open, readdir, readFile, rename, stat, unlink, utimes, type FileHandle } from 'node:fs/promises';
import { hostname } from 'node:os';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  EMPTY_CONFIG_DIGEST,
  MEDIA_TYPE_OCI_MANIFEST,
  indexMediaType,
  parseSociIndex,
  type Platform,
  type SociIndexVersion,
} from '../ztoc/index.js';

export { DEFAULT_ROOT } from './defaults.js';
import { DEFAULT_ROOT } from './defaults.js';
/** Temp files (and, with `gc({ orphanBlobs: true })`, unreferenced blobs) older than this are collected. */
export const DEFAULT_GC_AGE_MS = 60 * 60 * 1000;
export const DEFAULT_LOCK_TIMEOUT_MS = 30_000;
/** A lock file still empty after this long was left by a holder that died while creating it. */
const LOCK_WRITE_GRACE_MS = 5_000;
const OCI_LAYOUT = '{"imageLayoutVersion":"1.0.0"}';
const DIGEST_RE = /^sha256:([0-9a-f]{64})$/;
const HEX_NAME_RE = /^[0-9a-f]{64}$/;
const RECORD_NAME_RE = /^([0-9a-f]{64})\.json$/;
const TEMP_MARK = '.tmp-';
const MIN_PREFIX = 6;
const CHUNK = 1 << 20;

export type StoreErrorKind =
  /** A blob, record or input file does not exist. */
  | 'not-found'
  /** A stored blob's content does not match its digest (it has been removed), or a record file is malformed. */
  | 'corrupt'
  /** Content given to put does not have the expected digest. */
  | 'digest-mismatch'
  /** A digest prefix matches more than one index. */
  | 'ambiguous'
  /** A malformed argument: digest, prefix, record. */
  | 'invalid'
  /** The store root (or a file in it) cannot be created or written by this user. */
  | 'permission'
  /** The store lock is held by a live process and was not released in time. */
  | 'locked'
  /** Any other file-system failure. */
  | 'io';

/** An error of the store. Names the thing (a path, a digest) and the reason. */
export class StoreError extends Error {
  /** What the error is about: a blob or record path, a digest, or the store root. */
  readonly subject: string;
  readonly kind: StoreErrorKind;
  constructor(kind: StoreErrorKind, subject: string, reason: string, options?: { cause?: unknown }) {
    super(`${subject}: ${reason}`, options);
    this.name = new.target.name;
    this.kind = kind;
    this.subject = subject;
  }
}

/** One zTOC of an index: the image layer it indexes and the zTOC blob. */
export interface IndexRecordZtoc {
  layerDigest: string;
  ztocDigest: string;
  ztocSize: number;
}

/** The store's record of one SOCI index manifest, in `<root>/indexes/<hex>.json`. */
export interface IndexRecord {
  /** Digest of the SOCI index manifest (a blob in `content/`). */
  digest: string;
  /** Size of the SOCI index manifest in bytes. */
  size: number;
  /** Media type of the index manifest: always the OCI image manifest type. */
  mediaType: typeof MEDIA_TYPE_OCI_MANIFEST;
  /** The SOCI index type (the manifest's config media type). */
  artifactType: string;
  format: SociIndexVersion;
  /** The image reference the index was created for, as the user gave it (normalized by the caller). */
  imageRef: string;
  /** Digest of the (platform-specific) image manifest whose layers are indexed. */
  imageManifestDigest: string;
  platform: Platform;
  /** ISO 8601, UTC. */
  createdAt: string;
  /** The zTOCs, in image layer order. Layers too small to index have none. */
  ztocs: IndexRecordZtoc[];
}

/** A record to add: `createdAt` defaults to now, `mediaType` and `artifactType` follow `format`. */
export type NewIndexRecord = Omit<IndexRecord, 'createdAt' | 'mediaType' | 'artifactType'> &
  Partial<Pick<IndexRecord, 'createdAt' | 'mediaType' | 'artifactType'>>;

export interface IndexFilter {
  imageRef?: string;
  imageManifestDigest?: string;
}

export interface RemovedIndex {
  record: IndexRecord;
  /** Blobs deleted: the index manifest and zTOCs no remaining record references. */
  removedBlobs: string[];
  /** Blobs of the record kept because another record references them (shared layers). */
  keptBlobs: string[];
}

export interface GcOptions {
  /** Remove temp files (and orphan blobs) older than this; default 1 hour. */
  maxAgeMs?: number;
  /** Also remove blobs no record references (left by a crashed `create`); default false. */
  orphanBlobs?: boolean;
}

export interface GcResult {
  /** Paths of the temp files removed. */
  removedTemp: string[];
  /** Digests of the orphan blobs removed. */
  removedBlobs: string[];
}

export interface StoreOptions {
  /** The store's root directory; created 0700 if missing. */
  root: string;
  /** How long to wait for the store lock before failing with kind `locked`; default 30 s. */
  lockTimeoutMs?: number;
}

interface LockInfo {
  pid: number;
  host: string;
  nonce: string;
  createdAt: string;
}

/** Nonces of the locks this process holds (to recognise a dead holder that had our pid). */
const heldLocks = new Set<string>();

export class ArtifactStore {
  readonly root: string;
  /** The OCI image layout directory (`oci:<contentDir>` for skopeo, umoci, oras). */
  readonly contentDir: string;
  private readonly blobDir: string;
  private readonly indexDir: string;
  private readonly lockPath: string;
  private readonly lockTimeoutMs: number;
  private ready: Promise<void> | undefined;

  constructor(options: StoreOptions) {
    if (typeof options.root !== 'string' || options.root === '') throw new StoreError('invalid', 'store', 'root is empty');
    this.root = options.root;
    this.contentDir = join(this.root, 'content');
    this.blobDir = join(this.contentDir, 'blobs', 'sha256');
    this.indexDir = join(this.root, 'indexes');
    this.lockPath = join(this.root, '.lock');
    this.lockTimeoutMs = options.lockTimeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS;
  }

  // ---------------------------------------------------------------- blobs

  /** Where the blob with this digest lives (whether or not it exists). */
  blobPath(digest: string): string {
    return join(this.blobDir, digestHex(digest));
  }

  /** Store bytes under their sha256 digest; `expectedDigest` is checked first. Idempotent. */
  async putBlob(bytes: Uint8Array, expectedDigest?: string): Promise<{ digest: string; size: number }> {
    const digest = `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
    if (expectedDigest !== undefined) {
      digestHex(expectedDigest);
      if (digest !== expectedDigest) {
        throw new StoreError('digest-mismatch', expectedDigest, `the content given (${bytes.length} bytes) has digest ${digest}`);
      }
    }
    return this.guard('cannot store the blob', async () => {
      await this.init();
      const path = this.blobPath(digest);
      if (!(await this.keepIfValid(path, digest, bytes.length))) {
        await writeAtomic(path, async (fh) => {
          await fh.writeFile(bytes);
        });
      }
      return { digest, size: bytes.length };
    });
  }

  /** Store a file's content (streamed: zTOCs can be several MB); `expectedDigest` is checked. Idempotent. */
  async putBlobFromFile(file: string, expectedDigest?: string): Promise<{ digest: string; size: number }> {
    if (expectedDigest !== undefined) digestHex(expectedDigest);
    return this.guard('cannot store the blob', async () => {
      await this.init();
      let src: FileHandle;
      try {
        src = await open(file, 'r');
      } catch (err) {
        const code = errCode(err);
        if (code === 'ENOENT') throw new StoreError('not-found', file, 'no such file', { cause: err });
        if (code === 'EACCES' || code === 'EPERM') throw new StoreError('permission', file, 'cannot read: permission denied', { cause: err });
        throw new StoreError('io', file, `cannot read: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
      }
      try {
        const size = (await src.stat()).size;
        if (expectedDigest !== undefined && (await this.keepIfValid(this.blobPath(expectedDigest), expectedDigest, size))) {
          return { digest: expectedDigest, size };
        }
        const tmp = tempName(join(this.blobDir, 'upload'));
        const dst = await open(tmp, 'wx', 0o644);
        let digest: string;
        let written = 0;
        try {
          const hash = createHash('sha256');
          const buf = Buffer.allocUnsafe(CHUNK);
          for (;;) {
            const { bytesRead } = await src.read(buf, 0, CHUNK, null);
            if (bytesRead === 0) break;
            const chunk = buf.subarray(0, bytesRead);
            hash.update(chunk);
            await dst.write(chunk, 0, bytesRead, null);
            written += bytesRead;
          }
          digest = `sha256:${hash.digest('hex')}`;
          if (expectedDigest !== undefined && digest !== expectedDigest) {
            throw new StoreError('digest-mismatch', file, `has digest ${digest}, expected ${expectedDigest}`);
          }
          await dst.sync();
        } catch (err) {
          await dst.close().catch(() => undefined);
          await unlink(tmp).catch(() => undefined);
          throw err;
        }
        await dst.close();
        await rename(tmp, this.blobPath(digest));
        await syncDir(this.blobDir);
        return { digest, size: written };
      } finally {
        await src.close();
      }
    });
  }

  async hasBlob(digest: string): Promise<boolean> {
    const path = this.blobPath(digest);
    try {
      return (await stat(path)).isFile();
    } catch (err) {
      if (errCode(err) === 'ENOENT') return false;
      throw this.fsError(err, 'cannot look up the blob');
    }
  }

  async blobSize(digest: string): Promise<number> {
    const path = this.blobPath(digest);
    try {
      return (await stat(path)).size;
    } catch (err) {
      if (errCode(err) === 'ENOENT') throw new StoreError('not-found', path, `blob ${digest} is not in the store`, { cause: err });
      throw this.fsError(err, 'cannot look up the blob');
    }
  }

  /**
   * Open a blob for reading (random access or streaming). Its content is not verified:
   * use readBlob for that, or verify the digest of what you stream.
   */
  async openBlob(digest: string): Promise<FileHandle> {
    const path = this.blobPath(digest);
    try {
      return await open(path, 'r');
    } catch (err) {
      if (errCode(err) === 'ENOENT') throw new StoreError('not-found', path, `blob ${digest} is not in the store`, { cause: err });
      throw this.fsError(err, 'cannot open the blob');
    }
  }

  /**
   * Read a whole blob and verify its sha256. A blob whose content does not match its digest
   * (truncated, altered) is removed so it can be put again, and a `corrupt` StoreError naming
   * its path is thrown. `size`, when known (from a descriptor), is checked too.
   */
  async readBlob(digest: string, options: { size?: number } = {}): Promise<Uint8Array> {
    const path = this.blobPath(digest);
    return this.guard('cannot read the blob', async () => {
      let fh: FileHandle;
      try {
        fh = await open(path, 'r');
      } catch (err) {
        if (errCode(err) === 'ENOENT') throw new StoreError('not-found', path, `blob ${digest} is not in the store`, { cause: err });
        throw err;
      }
      let bytes: Buffer;
      let ino: number;
      try {
        ino = (await fh.stat()).ino;
        bytes = await fh.readFile();
      } finally {
        await fh.close();
      }
      const actual = `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
      if (actual !== digest) {
        const how =
          options.size !== undefined && bytes.length < options.size
            ? `truncated: ${bytes.length} of ${options.size} bytes`
            : `content (${bytes.length} bytes) has digest ${actual}, not the one in its name`;
        await removeIfSameFile(path, ino);
        throw new StoreError('corrupt', path, `corrupt blob ${digest}: ${how}; removed it so it can be stored again`);
      }
      if (options.size !== undefined && bytes.length !== options.size) {
        throw new StoreError('invalid', path, `blob ${digest} is ${bytes.length} bytes, its descriptor says ${options.size}`);
      }
      return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    });
  }

  // ---------------------------------------------------------------- index records

  /**
   * Record a SOCI index. Its manifest and zTOC blobs must already be in the store (checked
   * under the lock, so a concurrent removeIndex cannot collect them afterwards); the manifest
   * must list exactly the record's zTOCs. Re-adding an index replaces its record.
   */
  async addIndexRecord(input: NewIndexRecord): Promise<IndexRecord> {
    const format = input.format;
    const record = validateRecord(
      {
        ...input,
        mediaType: input.mediaType ?? MEDIA_TYPE_OCI_MANIFEST,
        artifactType: input.artifactType ?? (format === 'v1' || format === 'v2' ? indexMediaType(format) : undefined),
        createdAt: input.createdAt ?? new Date().toISOString(),
      },
      'index record',
    );
    return this.guard('cannot add the index record', async () => {
      await this.init();
      return this.withLock(async () => {
        const manifestPath = this.blobPath(record.digest);
        let bytes: Uint8Array;
        try {
          bytes = await this.readBlob(record.digest, { size: record.size });
        } catch (err) {
          if (err instanceof StoreError && err.kind === 'not-found') throw missingBlob(manifestPath, record.digest, err);
          throw err;
        }
        let parsed;
        try {
          parsed = parseSociIndex(bytes, manifestPath);
        } catch (cause) {
          throw new StoreError('invalid', manifestPath, `index ${record.digest} is not a SOCI index manifest: ${String(cause)}`, { cause });
        }
        const mismatch = (reason: string): never => {
          throw new StoreError('invalid', record.digest, `the record does not match the index manifest: ${reason}`);
        };
        if (parsed.version !== record.format) mismatch(`the manifest is a ${parsed.version} index, the record says ${record.format}`);
        if (parsed.manifest.subject && parsed.manifest.subject.digest !== record.imageManifestDigest) {
          mismatch(`the manifest's subject is ${parsed.manifest.subject.digest}, the record says ${record.imageManifestDigest}`);
        }
        const listed = parsed.ztocs.map((z) => `${z.layerDigest} ${z.ztoc.digest} ${z.ztoc.size}`).join('\n');
        const recorded = record.ztocs.map((z) => `${z.layerDigest} ${z.ztocDigest} ${z.ztocSize}`).join('\n');
        if (listed !== recorded) mismatch('the zTOCs (layer, zTOC digest, size) differ');
        for (const z of record.ztocs) {
          const path = this.blobPath(z.ztocDigest);
          let size: number;
          try {
            size = (await stat(path)).size;
          } catch (err) {
            if (errCode(err) === 'ENOENT') throw missingBlob(path, z.ztocDigest, err);
            throw err;
          }
          if (size !== z.ztocSize) throw new StoreError('corrupt', path, `zTOC ${z.ztocDigest} is ${size} bytes, the index says ${z.ztocSize}`);
        }
        const hex = digestHex(record.digest);
        const path = join(this.indexDir, `${hex}.json`);
        const text = JSON.stringify(record, null, 2) + '\n';
        await writeAtomic(path, async (fh) => {
          await fh.writeFile(text);
        });
        return record;
      });
    });
  }

  /** The index records, newest first; optionally only those of one image reference or manifest. */
  async listIndexRecords(filter: IndexFilter = {}): Promise<IndexRecord[]> {
    return this.guard('cannot list the indexes', async () => {
      await this.init();
      const all = await this.readAllRecords();
      return all
        .filter((r) => filter.imageRef === undefined || r.imageRef === filter.imageRef)
        .filter((r) => filter.imageManifestDigest === undefined || r.imageManifestDigest === filter.imageManifestDigest)
        .sort((a, b) => Date.parse(b.createdAt) - Date.parse(a.createdAt) || (a.digest < b.digest ? -1 : a.digest > b.digest ? 1 : 0));
    });
  }

  /**
   * One index record, by `sha256:<hex>`, bare hex, or a unique prefix of at least 6 hex
   * digits (with or without `sha256:`). No match → `not-found`; several → `ambiguous`,
   * listing them.
   */
  async getIndexRecord(digestOrPrefix: string): Promise<IndexRecord> {
    return this.guard('cannot read the index record', async () => {
      await this.init();
      const hex = await this.resolveIndex(digestOrPrefix);
      return this.readRecord(hex);
    });
  }

  /**
   * Remove an index (digest or unique prefix, as getIndexRecord) and the blobs (its manifest
   * and zTOCs) that no remaining record references. zTOCs shared with other indexes stay.
   */
  async removeIndex(digestOrPrefix: string): Promise<RemovedIndex> {
    return this.guard('cannot remove the index', async () => {
      await this.init();
      return this.withLock(async () => {
        const hex = await this.resolveIndex(digestOrPrefix);
        const record = await this.readRecord(hex);
        // Read every remaining record before changing anything: a malformed one aborts here.
        const remaining = (await this.readAllRecords()).filter((r) => r.digest !== record.digest);
        const referenced = referencedBlobs(remaining);
        await unlink(join(this.indexDir, `${hex}.json`));
        await syncDir(this.indexDir);
        const removedBlobs: string[] = [];
        const keptBlobs: string[] = [];
        const candidates = [...new Set([record.digest, ...record.ztocs.map((z) => z.ztocDigest)])];
        for (const digest of candidates) {
          if (referenced.has(digest)) {
            keptBlobs.push(digest);
            continue;
          }
          try {
            await unlink(this.blobPath(digest));
          } catch (err) {
            if (errCode(err) !== 'ENOENT') throw err;
          }
          removedBlobs.push(digest);
        }
        await syncDir(this.blobDir);
        return { record, removedBlobs, keptBlobs };
      });
    });
  }

  /**
   * Remove one blob unless an index record references it (checked under the lock, so a
   * concurrent addIndexRecord either sees it gone or keeps it). Resolves true when a file was
   * removed. For blobs fetched into the store without a record (zTOCs of indexes found in a
   * registry) once nothing uses them.
   */
  async removeUnreferencedBlob(digest: string): Promise<boolean> {
    digestHex(digest);
    return this.guard('cannot remove the blob', async () => {
      await this.init();
      return this.withLock(async () => {
        if (referencedBlobs(await this.readAllRecords()).has(digest)) return false;
        try {
          await unlink(this.blobPath(digest));
        } catch (err) {
          if (errCode(err) === 'ENOENT') return false;
          throw err;
        }
        await syncDir(this.blobDir);
        return true;
      });
    });
  }

  /**
   * Remove temp files (`*.tmp-*`) older than `maxAgeMs` (default 1 hour) left by crashed
   * writers, and with `orphanBlobs` the blobs of that age no record references.
   */
  async gc(options: GcOptions = {}): Promise<GcResult> {
    const maxAge = options.maxAgeMs ?? DEFAULT_GC_AGE_MS;
    return this.guard('cannot collect garbage', async () => {
      await this.init();
      return this.withLock(async () => {
        const cutoff = Date.now() - maxAge;
        const removedTemp: string[] = [];
        const removedBlobs: string[] = [];
        const referenced = options.orphanBlobs ? referencedBlobs(await this.readAllRecords()) : new Set<string>();
        for (const dir of [this.root, this.contentDir, this.blobDir, this.indexDir]) {
          for (const name of await readdir(dir)) {
            const isTemp = name.includes(TEMP_MARK);
            const isOrphan = options.orphanBlobs === true && dir === this.blobDir && HEX_NAME_RE.test(name) && !referenced.has(`sha256:${name}`);
            if (!isTemp && !isOrphan) continue;
            const path = join(dir, name);
            let st;
            try {
              st = await stat(path);
            } catch (err) {
              if (errCode(err) === 'ENOENT') continue;
              throw err;
            }
            if (!st.isFile() || st.mtimeMs > cutoff) continue;
            try {
              await unlink(path);
            } catch (err) {
              if (errCode(err) === 'ENOENT') continue;
              throw err;
            }
            if (isTemp) removedTemp.push(path);
            else removedBlobs.push(`sha256:${name}`);
          }
        }
        return { removedTemp: removedTemp.sort(), removedBlobs: removedBlobs.sort() };
      });
    });
  }

  // ---------------------------------------------------------------- internals

  /** Create the root (0700) and the layout if missing. Read-only users of an existing store write nothing. */
  private init(): Promise<void> {
    this.ready ??= (async () => {
      await mkdir(this.root, { recursive: true, mode: 0o700 });
      await mkdir(this.blobDir, { recursive: true, mode: 0o755 });
      await mkdir(this.indexDir, { recursive: true, mode: 0o755 });
      const layout = join(this.contentDir, 'oci-layout');
      try {
        await stat(layout);
      } catch (err) {
        if (errCode(err) !== 'ENOENT') throw err;
        await writeAtomic(layout, async (fh) => {
          await fh.writeFile(OCI_LAYOUT);
        });
      }
    })().catch((err: unknown) => {
      this.ready = undefined;
      throw err instanceof StoreError ? err : this.fsError(err, 'cannot create the store');
    });
    return this.ready;
  }

  /** True (and the mtime refreshed, so gc's age rule spares it) if a valid blob is already at path. */
  private async keepIfValid(path: string, digest: string, size: number): Promise<boolean> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (err) {
      if (errCode(err) === 'ENOENT') return false;
      throw err;
    }
    try {
      if ((await fh.stat()).size !== size) return false;
      const hash = createHash('sha256');
      const buf = Buffer.allocUnsafe(CHUNK);
      for (;;) {
        const { bytesRead } = await fh.read(buf, 0, CHUNK, null);
        if (bytesRead === 0) break;
        hash.update(buf.subarray(0, bytesRead));
      }
      if (`sha256:${hash.digest('hex')}` !== digest) return false;
    } finally {
      await fh.close();
    }
    const now = new Date();
    try {
      await utimes(path, now, now);
    } catch (err) {
      // Collected by another process between the check and the touch: write it again.
      if (errCode(err) === 'ENOENT') return false;
      throw err;
    }
    return true;
  }

  private async resolveIndex(digestOrPrefix: string): Promise<string> {
    const text = digestOrPrefix.trim().toLowerCase();
    const hex = text.startsWith('sha256:') ? text.slice('sha256:'.length) : text;
    if (!/^[0-9a-f]+$/.test(hex) || hex.length < MIN_PREFIX || hex.length > 64) {
      throw new StoreError(
        'invalid',
        digestOrPrefix,
        `not an index digest: give sha256:<64 hex digits>, the hex digits, or a unique prefix of at least ${MIN_PREFIX}`,
      );
    }
    const names = await readdir(this.indexDir);
    const matches = names
      .map((n) => RECORD_NAME_RE.exec(n)?.[1])
      .filter((h): h is string => h !== undefined && h.startsWith(hex))
      .sort();
    if (matches.length === 0) throw new StoreError('not-found', digestOrPrefix, `no SOCI index in the store ${this.root} matches`);
    if (matches.length > 1) {
      throw new StoreError('ambiguous', digestOrPrefix, `matches ${matches.length} indexes: ${matches.map((h) => `sha256:${h}`).join(', ')}`);
    }
    return matches[0];
  }

  private async readRecord(hex: string): Promise<IndexRecord> {
    const path = join(this.indexDir, `${hex}.json`);
    let text: string;
    try {
      text = await readFile(path, 'utf8');
    } catch (err) {
      if (errCode(err) === 'ENOENT') throw new StoreError('not-found', path, `no SOCI index sha256:${hex} in the store`, { cause: err });
      throw err;
    }
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch (cause) {
      throw new StoreError('corrupt', path, 'the index record is not JSON', { cause });
    }
    let record: IndexRecord;
    try {
      record = validateRecord(doc, path);
    } catch (err) {
      if (err instanceof StoreError) throw new StoreError('corrupt', path, `malformed index record: ${err.message}`, { cause: err });
      throw err;
    }
    if (record.digest !== `sha256:${hex}`) throw new StoreError('corrupt', path, `the record's digest ${record.digest} is not the one in its name`);
    return record;
  }

  private async readAllRecords(): Promise<IndexRecord[]> {
    const hexes = (await readdir(this.indexDir)).map((n) => RECORD_NAME_RE.exec(n)?.[1]).filter((h): h is string => h !== undefined);
    const records = await Promise.all(
      hexes.map((hex) =>
        this.readRecord(hex).catch((err: unknown) => {
          // Removed by a concurrent removeIndex between readdir and read.
          if (err instanceof StoreError && err.kind === 'not-found') return undefined;
          throw err;
        }),
      ),
    );
    return records.filter((r): r is IndexRecord => r !== undefined);
  }

  private async withLock<T>(fn: () => Promise<T>): Promise<T> {
    const nonce = await this.acquireLock();
    try {
      return await fn();
    } finally {
      await this.releaseLock(nonce);
    }
  }

  private async acquireLock(): Promise<string> {
    const nonce = randomBytes(8).toString('hex');
    const info: LockInfo = { pid: process.pid, host: hostname(), nonce, createdAt: new Date().toISOString() };
    const deadline = Date.now() + this.lockTimeoutMs;
    let delay = 5;
    for (;;) {
      let fh: FileHandle | undefined;
      try {
        fh = await open(this.lockPath, 'wx', 0o600);
      } catch (err) {
        if (errCode(err) !== 'EEXIST') throw err;
      }
      if (fh) {
        heldLocks.add(nonce);
        try {
          await fh.writeFile(JSON.stringify(info));
          await fh.sync();
          await fh.close();
        } catch (err) {
          // Our own, still empty or partial lock: nobody takes over an unwritten lock this young.
          heldLocks.delete(nonce);
          await fh.close().catch(() => undefined);
          await unlink(this.lockPath).catch(() => undefined);
          throw err;
        }
        return nonce;
      }
      const holder = await readLock(this.lockPath);
      if (holder === undefined) continue; // released meanwhile
      if (isStale(holder)) {
        await breakLock(this.lockPath, holder);
        continue;
      }
      if (Date.now() >= deadline) {
        const who = holder.info ? `process ${holder.info.pid} on ${holder.info.host} since ${holder.info.createdAt}` : 'a process';
        throw new StoreError(
          'locked',
          this.lockPath,
          `the store is locked by ${who}; waited ${this.lockTimeoutMs} ms (remove the file if that process is gone)`,
        );
      }
      await sleep(delay);
      delay = Math.min(delay * 2, 100);
    }
  }

  private async releaseLock(nonce: string): Promise<void> {
    heldLocks.delete(nonce);
    const holder = await readLock(this.lockPath);
    // Only remove our own lock; never one that replaced it.
    if (holder?.info?.nonce === nonce) {
      await unlink(this.lockPath).catch((err: unknown) => {
        if (errCode(err) !== 'ENOENT') throw err;
      });
    }
  }

  /** Run fn, turning raw file-system errors into StoreErrors naming the file. */
  private async guard<T>(doing: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof StoreError) throw err;
      throw this.fsError(err, doing);
    }
  }

  private fsError(err: unknown, doing: string): StoreError {
    const code = errCode(err);
    const path = (err as NodeJS.ErrnoException | undefined)?.path ?? this.root;
    const advice = `use --root DIR to choose a store directory this user can write (the default ${DEFAULT_ROOT} needs root)`;
    if (code === 'EACCES' || code === 'EPERM') {
      const uid = process.getuid?.();
      return new StoreError('permission', path, `${doing}: permission denied${uid === undefined ? '' : ` (uid ${uid})`}; ${advice}`, { cause: err });
    }
    if (code === 'EROFS') return new StoreError('permission', path, `${doing}: read-only file system; ${advice}`, { cause: err });
    if (code === 'ENOENT') return new StoreError('not-found', path, `${doing}: no such file or directory`, { cause: err });
    if (code === 'ENOSPC') return new StoreError('io', path, `${doing}: no space left on the device`, { cause: err });
    const reason = err instanceof Error ? err.message : String(err);
    return new StoreError('io', path, `${doing}: ${reason}`, { cause: err });
  }
}

// -------------------------------------------------------------------- helpers

function errCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

function digestHex(digest: string): string {
  const m = typeof digest === 'string' ? DIGEST_RE.exec(digest) : null;
  if (!m) throw new StoreError('invalid', String(digest), 'not a sha256 digest (sha256:<64 lowercase hex digits>)');
  return m[1];
}

function missingBlob(path: string, digest: string, cause: unknown): StoreError {
  return new StoreError(
    'not-found',
    path,
    `blob ${digest} is not in the store (a concurrent index removal may have collected it); put it again and retry`,
    { cause },
  );
}

function referencedBlobs(records: readonly IndexRecord[]): Set<string> {
  const set = new Set<string>([EMPTY_CONFIG_DIGEST]);
  for (const r of records) {
    set.add(r.digest);
    for (const z of r.ztocs) set.add(z.ztocDigest);
  }
  return set;
}

function tempName(path: string): string {
  return `${path}${TEMP_MARK}${process.pid}-${randomBytes(6).toString('hex')}`;
}

/** Write a file atomically: temp file in the same directory, fsync, rename, fsync the directory. */
async function writeAtomic(path: string, write: (fh: FileHandle) => Promise<void>): Promise<void> {
  const tmp = tempName(path);
  const fh = await open(tmp, 'wx', 0o644);
  try {
    await write(fh);
    await fh.sync();
  } catch (err) {
    await fh.close().catch(() => undefined);
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
  await fh.close();
  try {
    await rename(tmp, path);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
  await syncDir(dirname(path));
}

async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } catch {
    // Some file systems cannot fsync a directory; the rename is still atomic.
  } finally {
    await fh.close();
  }
}

/** Unlink path only if it is still the file we read (not a good copy renamed over it since). */
async function removeIfSameFile(path: string, ino: number): Promise<void> {
  try {
    if ((await stat(path)).ino === ino) await unlink(path);
  } catch (err) {
    if (errCode(err) !== 'ENOENT') throw err;
  }
}

interface LockHolder {
  raw: string;
  info?: LockInfo;
  ino: number;
  mtimeMs: number;
}

async function readLock(path: string): Promise<LockHolder | undefined> {
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    if (errCode(err) === 'ENOENT') return undefined;
    throw err;
  }
  try {
    const st = await fh.stat();
    const raw = await fh.readFile('utf8');
    let info: LockInfo | undefined;
    try {
      const doc: unknown = JSON.parse(raw);
      if (isObject(doc) && Number.isSafeInteger(doc.pid) && typeof doc.host === 'string' && typeof doc.nonce === 'string') {
        info = { pid: doc.pid as number, host: doc.host, nonce: doc.nonce, createdAt: typeof doc.createdAt === 'string' ? doc.createdAt : '?' };
      }
    } catch {
      // Empty or partly written: judged by age.
    }
    return { raw, info, ino: st.ino, mtimeMs: st.mtimeMs };
  } finally {
    await fh.close();
  }
}

/** A lock is stale when its holder is a dead process on this host (or it was never written and is old). */
function isStale(holder: LockHolder): boolean {
  const info = holder.info;
  if (!info) return Date.now() - holder.mtimeMs > LOCK_WRITE_GRACE_MS;
  if (info.host !== hostname()) return false; // cannot tell: wait (or time out naming the holder)
  if (info.pid === process.pid) return !heldLocks.has(info.nonce);
  try {
    process.kill(info.pid, 0);
    return false;
  } catch (err) {
    return errCode(err) === 'ESRCH';
  }
}

/**
 * Take a stale lock away: rename it aside (atomic, so of several breakers only one gets a
 * given file) and delete it if it is the one judged stale; if a live lock was renamed aside
 * instead (it replaced the stale one meanwhile), put it back.
 */
async function breakLock(path: string, stale: LockHolder): Promise<void> {
  const aside = tempName(`${path}.stale`);
  try {
    await rename(path, aside);
  } catch (err) {
    if (errCode(err) === 'ENOENT') return;
    throw err;
  }
  const got = await readLock(aside);
  if (got !== undefined && got.ino === stale.ino && got.raw === stale.raw) {
    await unlink(aside).catch(() => undefined);
    return;
  }
  try {
    await link(aside, path);
  } catch (err) {
    if (errCode(err) !== 'EEXIST') throw err;
  }
  await unlink(aside).catch(() => undefined);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Check a record's shape and return it with its fields in a fixed order. */
function validateRecord(value: unknown, subject: string): IndexRecord {
  const fail = (reason: string): never => {
    throw new StoreError('invalid', subject, reason);
  };
  if (!isObject(value)) return fail('not an object');
  const v = value;
  const digest = (field: string, x: unknown): string => {
    if (typeof x !== 'string' || !DIGEST_RE.test(x)) fail(`${field} ${JSON.stringify(x)} is not a sha256 digest`);
    return x as string;
  };
  const count = (field: string, x: unknown): number => {
    if (typeof x !== 'number' || !Number.isSafeInteger(x) || x <= 0) fail(`${field} ${JSON.stringify(x)} is not a positive integer`);
    return x as number;
  };
  const text = (field: string, x: unknown): string => {
    if (typeof x !== 'string' || x === '') fail(`${field} is not a non-empty string`);
    return x as string;
  };
  const format = v.format;
  if (format !== 'v1' && format !== 'v2') return fail(`format ${JSON.stringify(format)} is not "v1" or "v2"`);
  if (v.mediaType !== MEDIA_TYPE_OCI_MANIFEST) fail(`mediaType ${JSON.stringify(v.mediaType)} is not ${MEDIA_TYPE_OCI_MANIFEST}`);
  if (v.artifactType !== indexMediaType(format)) fail(`artifactType ${JSON.stringify(v.artifactType)} is not ${indexMediaType(format)}`);
  const createdAt = text('createdAt', v.createdAt);
  if (!Number.isFinite(Date.parse(createdAt))) fail(`createdAt ${JSON.stringify(createdAt)} is not a date`);
  const p = v.platform;
  if (!isObject(p)) return fail('platform is not an object');
  const platform: Platform = { architecture: text('platform.architecture', p.architecture), os: text('platform.os', p.os) };
  if (p['os.version'] !== undefined) platform['os.version'] = text('platform.os.version', p['os.version']);
  if (p['os.features'] !== undefined) {
    const f = p['os.features'];
    if (!Array.isArray(f) || !f.every((s) => typeof s === 'string')) fail('platform.os.features is not a list of strings');
    platform['os.features'] = [...(f as string[])];
  }
  if (p.variant !== undefined) platform.variant = text('platform.variant', p.variant);
  if (!Array.isArray(v.ztocs) || v.ztocs.length === 0) return fail('ztocs is not a non-empty list');
  const ztocs = v.ztocs.map((z: unknown, i: number): IndexRecordZtoc => {
    if (!isObject(z)) return fail(`ztocs[${i}] is not an object`);
    return {
      layerDigest: digest(`ztocs[${i}].layerDigest`, z.layerDigest),
      ztocDigest: digest(`ztocs[${i}].ztocDigest`, z.ztocDigest),
      ztocSize: count(`ztocs[${i}].ztocSize`, z.ztocSize),
    };
  });
  return {
    digest: digest('digest', v.digest),
    size: count('size', v.size),
    mediaType: MEDIA_TYPE_OCI_MANIFEST,
    artifactType: indexMediaType(format),
    format,
    imageRef: text('imageRef', v.imageRef),
    imageManifestDigest: digest('imageManifestDigest', v.imageManifestDigest),
    platform,
    createdAt: new Date(Date.parse(createdAt)).toISOString(),
    ztocs,
  };
}

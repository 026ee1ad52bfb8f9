/**
 * The span caches of the lazy layer filesystem. The span manager asks them before the network:
 *
 * - {@link InflatedSpanCache} (memory): inflated spans (tar bytes, up to ~4 MiB each) keyed by
 *   (layer digest, span id), bounded in bytes, least recently used first out.
 * - {@link CompressedSpanStore} (disk): compressed spans, content-addressed by their span digest
 *   (the `sha256:<hex>` recorded in the zTOC), under a directory the caller gives
 *   (`<root>/cache/spans`):
 *
 *   ```
 *   <dir>/<hex[0..2]>/<hex>                     the span bytes whose sha256 is <hex>
 *   <dir>/<hex[0..2]>/<hex>.tmp-<pid>-<random>  a write in progress (or left by a crash)
 *   ```
 *
 *   Identical spans of identical layers share one file, and every read is self-verifying: a file
 *   whose bytes do not hash to its name is removed, never served.
 *
 * Rules of the disk store (it runs inside the process that serves FUSE):
 * - No synchronous fs call anywhere: a synchronous call on a FUSE path deadlocks the process.
 *   Everything goes through `node:fs/promises`.
 * - `get` and `put` never reject because of the disk. `get` answers `undefined` (a miss) on
 *   any failure; `put` logs and counts a failed write (ENOSPC, EACCES, EIO...) and resolves,
 *   so a read that has its bytes in memory still succeeds. `put` rejects only when the bytes
 *   given do not match the digest given (or the digest is malformed): that is a caller bug.
 * - The store owns its directory; one store per directory per process (another process's temp
 *   files are recognised by pid and left alone while that process lives).
 * - The recency order lives in memory (a Map in LRU order). A hit moves the entry in memory
 *   at once and records its new time in the file's mtime later, in a batch (`utimes` every
 *   {@link DEFAULT_MTIME_FLUSH_MS}, and on {@link CompressedSpanStore.close}), so `open` can
 *   rebuild the order after a restart by sorting on mtime.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, open, readdir, rename, stat, unlink, utimes, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { LRUCache } from 'lru-cache';
import { nullLogger, type Logger } from '../fetcher/index.js';

export const DEFAULT_INFLATED_CACHE_BYTES = 256 * 1024 * 1024;
export const DEFAULT_SPAN_STORE_BYTES = 10 * 1024 * 1024 * 1024;
/** How long recency changes wait in memory before they are written to file mtimes. */
export const DEFAULT_MTIME_FLUSH_MS = 10_000;
/** Another process's temp file older than this is a crash leftover even if its pid is alive (pid reuse). */
const TEMP_MAX_AGE_MS = 60 * 60 * 1000;
/** A put failure is logged at most this often (the rest are counted, and the count logged). */
const PUT_WARN_INTERVAL_MS = 60_000;
const STAT_CONCURRENCY = 64;
const STAMP_STEP_MS = 0.01;
const DIGEST_RE = /^sha256:([0-9a-f]{64})$/;
const HEX_RE = /^[0-9a-f]{64}$/;
const PREFIX_RE = /^[0-9a-f]{2}$/;
const TEMP_RE = /^([0-9a-f]{64})\.tmp-(\d+)-[0-9a-f]+$/;

export type CacheErrorKind =
  /** An option is out of range (a negative size, an empty directory name). */
  | 'invalid-option'
  /** A digest is not `sha256:<64 lowercase hex digits>`, or a span id is not a non-negative integer. */
  | 'invalid-digest'
  /** Bytes given to `put` do not hash to the digest given. */
  | 'digest-mismatch'
  /** The cache directory cannot be created or read (`open` only). */
  | 'io';

/** An error of the span caches; names the thing (a digest, a file, a directory) and the reason. */
export class CacheError extends Error {
  readonly kind: CacheErrorKind;
  /** What the error is about: a span digest, a file or directory path, an option name. */
  readonly subject: string;
  constructor(kind: CacheErrorKind, subject: string, reason: string, options?: { cause?: unknown }) {
    super(`${subject}: ${reason}`, options);
    this.name = new.target.name;
    this.kind = kind;
    this.subject = subject;
  }
}

// ---------------------------------------------------------------------------------------------
// Memory: inflated spans
// ---------------------------------------------------------------------------------------------

export interface InflatedSpanCacheOptions {
  /** Bound on the bytes of the cached spans (default {@link DEFAULT_INFLATED_CACHE_BYTES}). */
  maxBytes?: number;
}

export interface InflatedSpanCacheStats {
  bytes: number;
  entries: number;
  hits: number;
  misses: number;
  /** Entries pushed out to respect the byte bound. */
  evictions: number;
  /** `set` calls refused because one buffer alone exceeds the bound. */
  rejected: number;
  /** Buffers copied because they were small views of a much larger ArrayBuffer (see `set`). */
  compacted: number;
}

/** A view at least this big, over an ArrayBuffer more than twice its size, is copied on `set`. */
const COMPACT_MIN_BYTES = 64 * 1024;

/**
 * Inflated spans in memory, bounded in bytes. Buffers are stored and returned as they are (no
 * copy): callers must not modify a buffer after `set` or one returned by `get`.
 */
/** See {@link InflatedSpanCache.watch}. */
export interface SpanCacheWatcher {
  cached(spanId: number, data: Buffer): void;
  dropped(spanId: number): void;
  recentlyUsed(): Iterable<number>;
}

export class InflatedSpanCache {
  readonly maxBytes: number;
  private readonly lru: LRUCache<string, Buffer>;
  /** Span ids cached per layer, so a layer can be dropped without scanning the cache. */
  private readonly layers = new Map<string, Set<number>>();
  private counters = { hits: 0, misses: 0, evictions: 0, rejected: 0, compacted: 0 };
  /** Who holds pointers into cached spans, by layer (see watch). */
  private readonly watchers = new Map<string, Set<SpanCacheWatcher>>();

  constructor(options: InflatedSpanCacheOptions = {}) {
    this.maxBytes = sizeOption('maxBytes', options.maxBytes, DEFAULT_INFLATED_CACHE_BYTES, 1);
    this.lru = new LRUCache<string, Buffer>({
      maxSize: this.maxBytes,
      // lru-cache needs positive sizes; an empty buffer counts as 1 byte.
      sizeCalculation: (buf) => Math.max(1, buf.byteLength),
      dispose: (_buf, key, reason) => {
        // 'set' means the key was given a new value: it stays cached.
        if (reason === 'set') return;
        if (reason === 'evict') this.counters.evictions++;
        const { layer, span } = splitKey(key);
        const watching = this.watchers.get(layer);
        if (watching !== undefined) for (const w of watching) w.dropped(span);
        const spans = this.layers.get(layer);
        if (spans === undefined) return;
        spans.delete(span);
        if (spans.size === 0) this.layers.delete(layer);
      },
    });
  }

  /** The span's bytes, or undefined; a hit makes the span the most recently used. */
  get(layerDigest: string, spanId: number): Buffer | undefined {
    const buf = this.lru.get(spanKey(layerDigest, spanId));
    if (buf === undefined) this.counters.misses++;
    else this.counters.hits++;
    return buf;
  }

  /** Whether the span is cached (does not change recency or counters). */
  has(layerDigest: string, spanId: number): boolean {
    return this.lru.has(spanKey(layerDigest, spanId));
  }

  /**
   * Cache a span, evicting the least recently used spans to stay within `maxBytes`. Returns
   * false (and caches nothing, dropping any older value of the span) when `bytes` alone is
   * larger than `maxBytes`. The buffer is kept as is, except that a view of at least 64 KiB
   * over an ArrayBuffer more than twice its size is copied: keeping the view would pin the
   * whole ArrayBuffer and make the byte bound a lie.
   */
  set(layerDigest: string, spanId: number, bytes: Buffer): boolean {
    const key = spanKey(layerDigest, spanId);
    if (Math.max(1, bytes.byteLength) > this.maxBytes) {
      this.lru.delete(key);
      this.counters.rejected++;
      return false;
    }
    let buf = bytes;
    if (buf.byteLength >= COMPACT_MIN_BYTES && buf.buffer.byteLength > 2 * buf.byteLength) {
      buf = Buffer.from(buf);
      this.counters.compacted++;
    }
    // About to evict: first tell the LRU which spans were read where it could not see.
    if (this.watchers.size > 0 && this.lru.calculatedSize + Math.max(1, buf.byteLength) > this.maxBytes) this.refreshWatched();
    let spans = this.layers.get(layerDigest);
    if (spans === undefined) this.layers.set(layerDigest, (spans = new Set()));
    spans.add(spanId);
    this.lru.set(key, buf);
    const watching = this.watchers.get(layerDigest);
    if (watching !== undefined) for (const w of watching) w.cached(spanId, buf);
    return true;
  }

  /**
   * Tells `watcher` of every span of the layer cached now and from now on (`cached`) and of
   * each one leaving the cache (`dropped`, synchronously, before its buffer can be reused), and
   * asks it for the spans it has read (`recentlyUsed`) before the cache evicts anything. For a
   * reader that keeps pointers into cached spans (the native read path). Returns the unwatch.
   */
  watch(layerDigest: string, watcher: SpanCacheWatcher): () => void {
    let set = this.watchers.get(layerDigest);
    if (set === undefined) this.watchers.set(layerDigest, (set = new Set()));
    set.add(watcher);
    for (const id of this.layers.get(layerDigest) ?? []) {
      const buf = this.lru.peek(spanKey(layerDigest, id));
      if (buf !== undefined) watcher.cached(id, buf);
    }
    return () => {
      const s = this.watchers.get(layerDigest);
      if (s === undefined || !s.delete(watcher)) return;
      if (s.size === 0) this.watchers.delete(layerDigest);
    };
  }

  private refreshWatched(): void {
    for (const [layer, set] of this.watchers) {
      for (const w of set) for (const id of w.recentlyUsed()) this.lru.get(spanKey(layer, id));
    }
  }

  delete(layerDigest: string, spanId: number): boolean {
    return this.lru.delete(spanKey(layerDigest, spanId));
  }

  /** Drop every cached span of a layer; returns how many there were. */
  deleteLayer(layerDigest: string): number {
    const spans = this.layers.get(layerDigest);
    if (spans === undefined) return 0;
    const ids = [...spans];
    for (const id of ids) this.lru.delete(spanKey(layerDigest, id));
    this.layers.delete(layerDigest);
    return ids.length;
  }

  clear(): void {
    this.lru.clear();
    this.layers.clear();
  }

  /** Bytes held (the sum of the cached buffers' lengths). */
  get bytes(): number {
    return this.lru.calculatedSize;
  }

  get entries(): number {
    return this.lru.size;
  }

  stats(): InflatedSpanCacheStats {
    return { bytes: this.bytes, entries: this.entries, ...this.counters };
  }
}

function spanKey(layerDigest: string, spanId: number): string {
  if (typeof layerDigest !== 'string' || layerDigest.length === 0) {
    throw new CacheError('invalid-digest', String(layerDigest), 'not a layer digest');
  }
  if (!Number.isSafeInteger(spanId) || spanId < 0) {
    throw new CacheError('invalid-digest', `${layerDigest} span ${String(spanId)}`, 'a span id is a non-negative integer');
  }
  return `${spanId}/${layerDigest}`;
}

function splitKey(key: string): { layer: string; span: number } {
  const slash = key.indexOf('/');
  return { span: Number(key.slice(0, slash)), layer: key.slice(slash + 1) };
}

// ---------------------------------------------------------------------------------------------
// Disk: compressed spans, content-addressed
// ---------------------------------------------------------------------------------------------

export interface CompressedSpanStoreOptions {
  /** The store's directory (`<root>/cache/spans`); created 0700 with its parents if missing. */
  dir: string;
  /** Bound on the bytes of the stored files (default {@link DEFAULT_SPAN_STORE_BYTES}). */
  maxBytes?: number;
  logger?: Logger;
  /** Delay before recency changes are written to file mtimes (default {@link DEFAULT_MTIME_FLUSH_MS}). */
  mtimeFlushMs?: number;
}

export interface CompressedSpanStoreStats {
  bytes: number;
  files: number;
  hits: number;
  misses: number;
  /** Files written by `put` (a put of a span already stored writes nothing and is not counted). */
  puts: number;
  /** Writes that failed (ENOSPC, EACCES, ...): logged, the span just not cached. */
  putErrors: number;
  /** Spans not stored because one alone exceeds `maxBytes`. */
  putTooLarge: number;
  /** Files removed to stay within `maxBytes`. */
  evictions: number;
  /** Files found truncated or not matching their digest on `get`, and removed. */
  corruptDetected: number;
  /** Reads that failed for another reason than corruption (EIO, EACCES): answered as misses. */
  readErrors: number;
  /** Files removed by `delete`, `deleteMany` and `release`. */
  deletes: number;
  /** Leftover temp files removed by `open`. */
  tempFilesRemoved: number;
}

/** One stored file. A new object each time a file is (re)written: its identity is the file's generation. */
interface Entry {
  size: number;
  /** Time of last use, ms since the epoch (fractional: strictly increasing within the process). */
  stamp: number;
}

/** Temp files being written by stores in this process (so `open` never removes a live one). */
const liveTemps = new Set<string>();

/**
 * Compressed spans on disk, content-addressed by span digest, bounded in bytes with LRU
 * eviction. Create with {@link CompressedSpanStore.open}.
 *
 * Sharing: one file serves every layer that has the same span. `delete`/`deleteMany` remove
 * files unconditionally. To free a layer's spans when its snapshot is removed without
 * breaking another layer that shares them, use the holder API: `retain(holder, digests)` when
 * a layer is mounted, `release(holder)` when it goes; a file is deleted when the last holder
 * that retained it releases it. Holding is not pinning: a held file can still be evicted for
 * space (a later read refetches it). Holders live in memory only; after a restart the caller
 * retains again for the layers it mounts, and files no one retains are ordinary LRU entries.
 */
export class CompressedSpanStore {
  readonly dir: string;
  readonly maxBytes: number;
  private readonly logger: Logger;
  private readonly mtimeFlushMs: number;
  /** The stored files in LRU order (first = least recently used), by hex digest. */
  private readonly index = new Map<string, Entry>();
  private total = 0;
  /** Per-digest queue of mutations (write, unlink), so they happen in the order they were asked. */
  private readonly locks = new Map<string, Promise<void>>();
  /** Subdirectories known to exist. */
  private readonly subdirs = new Set<string>();
  private readonly held = new Map<string, Set<string>>();
  private readonly holderCounts = new Map<string, number>();
  /** Entries whose stamp is newer than their file's mtime. */
  private readonly dirty = new Set<string>();
  private flushTimer: NodeJS.Timeout | undefined;
  private flushing: Promise<void> | undefined;
  private lastStamp = 0;
  private lastPutWarn = Number.NEGATIVE_INFINITY;
  private suppressedPutWarnings = 0;
  private counters = {
    hits: 0,
    misses: 0,
    puts: 0,
    putErrors: 0,
    putTooLarge: 0,
    evictions: 0,
    corruptDetected: 0,
    readErrors: 0,
    deletes: 0,
    tempFilesRemoved: 0,
  };

  private constructor(dir: string, maxBytes: number, logger: Logger, mtimeFlushMs: number) {
    this.dir = dir;
    this.maxBytes = maxBytes;
    this.logger = logger;
    this.mtimeFlushMs = mtimeFlushMs;
  }

  /**
   * Open (creating if needed) the store in `dir`: scan the files to rebuild the byte total and
   * the LRU order (by mtime), remove leftover temp files, and evict down to `maxBytes`.
   * Rejects with a CacheError (`io`) if the directory cannot be created or listed.
   */
  static async open(options: CompressedSpanStoreOptions): Promise<CompressedSpanStore> {
    if (typeof options.dir !== 'string' || options.dir.length === 0) {
      throw new CacheError('invalid-option', 'dir', 'the span store needs a directory');
    }
    const maxBytes = sizeOption('maxBytes', options.maxBytes, DEFAULT_SPAN_STORE_BYTES, 0);
    const flushMs = sizeOption('mtimeFlushMs', options.mtimeFlushMs, DEFAULT_MTIME_FLUSH_MS, 0);
    const store = new CompressedSpanStore(options.dir, maxBytes, options.logger ?? nullLogger, flushMs);
    try {
      await mkdir(store.dir, { recursive: true, mode: 0o700 });
    } catch (err) {
      throw new CacheError('io', store.dir, `cannot create the span cache directory (${errCode(err) ?? String(err)})`, { cause: err });
    }
    await store.scan();
    await Promise.all(store.evict(undefined));
    return store;
  }

  /**
   * The span's compressed bytes if stored and intact, else undefined. Never rejects for a disk
   * problem: a truncated or altered file is removed (and logged once, and counted in
   * `corruptDetected`); another read error is logged and counted in `readErrors`.
   */
  async get(digest: string): Promise<Buffer | undefined> {
    const hex = digestHex(digest);
    const entry = this.index.get(hex);
    if (entry === undefined) {
      this.counters.misses++;
      return undefined;
    }
    this.touch(hex, entry);
    const path = this.pathOf(hex);
    let buf: Buffer;
    try {
      buf = await readUpTo(path, entry.size + 1);
    } catch (err) {
      this.counters.misses++;
      if (errCode(err) === 'ENOENT') {
        // Removed behind our back: forget it (unless it has been written again since).
        await this.withLock(hex, async () => {
          if (this.index.get(hex) === entry) this.forget(hex, entry);
        });
        this.logger.debug('span cache: file vanished', { file: path, digest });
      } else {
        this.counters.readErrors++;
        this.logger.warn('span cache: read failed', { file: path, digest, error: err });
      }
      return undefined;
    }
    const actual = sha256Hex(buf);
    if (actual !== hex) {
      this.counters.misses++;
      const reason =
        buf.length < entry.size
          ? `truncated: ${buf.length} of ${entry.size} bytes`
          : buf.length > entry.size
            ? `longer than the ${entry.size} bytes stored`
            : `content does not match its digest (sha256:${actual})`;
      await this.withLock(hex, async () => {
        // Only the first reader to see this file corrupt removes it, counts it and warns.
        if (this.index.get(hex) !== entry) return;
        this.forget(hex, entry);
        this.counters.corruptDetected++;
        this.logger.warn('span cache: corrupt file removed', { file: path, digest, reason });
        await unlinkQuiet(path);
      });
      return undefined;
    }
    this.counters.hits++;
    return buf;
  }

  /** Whether the span is stored (as far as the store knows; `get` verifies). */
  has(digest: string): boolean {
    return this.index.has(digestHex(digest));
  }

  /**
   * Store a span. Rejects with a CacheError (`digest-mismatch`) if `bytes` do not hash to
   * `digest`, and nothing else: a write failure is logged and counted (`putErrors`), and a span
   * larger than `maxBytes` alone is not kept (`putTooLarge`). Idempotent; concurrent puts of one
   * digest write the file once. Makes the span the most recently used, then evicts least
   * recently used files until the total is within `maxBytes`; resolves when they are gone.
   */
  async put(digest: string, bytes: Uint8Array): Promise<void> {
    const hex = digestHex(digest);
    const actual = sha256Hex(bytes);
    if (actual !== hex) {
      throw new CacheError('digest-mismatch', digest, `the ${bytes.byteLength} bytes given hash to sha256:${actual}`);
    }
    if (bytes.byteLength > this.maxBytes) {
      this.counters.putTooLarge++;
      this.logger.debug('span cache: span larger than the cache, not stored', { digest, size: bytes.byteLength, maxBytes: this.maxBytes });
      return;
    }
    const evicting = await this.withLock(hex, async () => {
      const existing = this.index.get(hex);
      if (existing !== undefined) {
        this.touch(hex, existing);
        return [];
      }
      const stamp = this.nextStamp();
      if (!(await this.write(hex, bytes, stamp))) return [];
      this.counters.puts++;
      this.add(hex, { size: bytes.byteLength, stamp });
      return this.evict(hex);
    });
    // Waited for outside the lock: an unlink queues behind other digests' locks.
    await Promise.all(evicting);
  }

  /** Remove a stored span (whoever holds it); returns whether a file was removed. */
  async delete(digest: string): Promise<boolean> {
    return this.remove(digestHex(digest));
  }

  /** Remove stored spans (whoever holds them); returns how many files were removed. */
  async deleteMany(digests: Iterable<string>): Promise<number> {
    const hexes = [...new Set([...digests].map(digestHex))];
    const done = await Promise.all(hexes.map((h) => this.remove(h)));
    return done.filter(Boolean).length;
  }

  /**
   * Record that `holder` (a layer digest or snapshot key) uses these spans. Idempotent per
   * holder and digest. Memory only: does not store, pin or touch anything.
   */
  retain(holder: string, digests: Iterable<string>): void {
    const hexes = [...digests].map(digestHex);
    let mine = this.held.get(holder);
    if (mine === undefined) this.held.set(holder, (mine = new Set()));
    for (const hex of hexes) {
      if (mine.has(hex)) continue;
      mine.add(hex);
      this.holderCounts.set(hex, (this.holderCounts.get(hex) ?? 0) + 1);
    }
  }

  /**
   * `holder` no longer uses these spans (default: all it retained). Each span no other holder
   * retains is deleted. Returns how many files were deleted.
   */
  async release(holder: string, digests?: Iterable<string>): Promise<number> {
    const mine = this.held.get(holder);
    if (mine === undefined) return 0;
    const hexes = digests === undefined ? [...mine] : [...digests].map(digestHex).filter((h) => mine.has(h));
    const orphans: string[] = [];
    for (const hex of hexes) {
      mine.delete(hex);
      const n = (this.holderCounts.get(hex) ?? 1) - 1;
      if (n > 0) {
        this.holderCounts.set(hex, n);
      } else {
        this.holderCounts.delete(hex);
        orphans.push(hex);
      }
    }
    if (mine.size === 0) this.held.delete(holder);
    const done = await Promise.all(orphans.map((h) => this.remove(h)));
    return done.filter(Boolean).length;
  }

  /** How many holders retain the span. */
  holders(digest: string): number {
    return this.holderCounts.get(digestHex(digest)) ?? 0;
  }

  /** Bytes of the stored files. */
  get bytes(): number {
    return this.total;
  }

  get files(): number {
    return this.index.size;
  }

  /** The stored digests, least recently used first. */
  digests(): string[] {
    return [...this.index.keys()].map((h) => `sha256:${h}`);
  }

  stats(): CompressedSpanStoreStats {
    return { bytes: this.total, files: this.index.size, ...this.counters };
  }

  /**
   * Write pending recency to file mtimes and wait for writes and removals in progress. The
   * store stays usable; call before exiting so a restart sees the latest LRU order.
   */
  async close(): Promise<void> {
    if (this.flushTimer !== undefined) clearTimeout(this.flushTimer);
    this.flushTimer = undefined;
    await this.flushMtimes();
    while (this.locks.size > 0) await Promise.all([...this.locks.values()]);
  }

  // --- internals ---------------------------------------------------------------------------

  private pathOf(hex: string): string {
    return join(this.dir, hex.slice(0, 2), hex);
  }

  /**
   * Strictly increasing ms timestamps, close to the clock. Ties within a millisecond step by
   * 10 µs: libuv truncates utimes to whole microseconds after a float conversion, so 1 µs steps
   * could collide on disk and scramble the order seen after a restart.
   */
  private nextStamp(): number {
    const now = Date.now();
    this.lastStamp = now > this.lastStamp ? now : this.lastStamp + STAMP_STEP_MS;
    return this.lastStamp;
  }

  private add(hex: string, entry: Entry): void {
    this.index.set(hex, entry);
    this.total += entry.size;
  }

  private forget(hex: string, entry: Entry): void {
    this.index.delete(hex);
    this.total -= entry.size;
    this.dirty.delete(hex);
  }

  private touch(hex: string, entry: Entry): void {
    this.index.delete(hex);
    this.index.set(hex, entry);
    entry.stamp = this.nextStamp();
    this.dirty.add(hex);
    if (this.flushTimer === undefined) {
      this.flushTimer = setTimeout(() => {
        this.flushTimer = undefined;
        void this.flushMtimes();
      }, this.mtimeFlushMs);
      this.flushTimer.unref();
    }
  }

  private async flushMtimes(): Promise<void> {
    while (this.flushing !== undefined) await this.flushing;
    if (this.dirty.size === 0) return;
    const batch = [...this.dirty];
    this.dirty.clear();
    const run = async (): Promise<void> => {
      await forEachLimit(batch, STAT_CONCURRENCY, async (hex) => {
        const entry = this.index.get(hex);
        if (entry === undefined) return;
        const t = entry.stamp / 1000;
        // A file removed or replaced meanwhile: nothing to do (a replacement has its own mtime).
        await utimes(this.pathOf(hex), t, t).catch(() => undefined);
      });
    };
    this.flushing = run();
    try {
      await this.flushing;
    } finally {
      this.flushing = undefined;
    }
  }

  /**
   * Evict least recently used files (never `keep`) until the total is within `maxBytes`. The
   * entries leave the index now; the unlinks are queued on each digest's lock and returned.
   */
  private evict(keep: string | undefined): Promise<void>[] {
    const unlinks: Promise<void>[] = [];
    for (const [hex, entry] of this.index) {
      if (this.total <= this.maxBytes) break;
      if (hex === keep) continue;
      this.forget(hex, entry);
      this.counters.evictions++;
      unlinks.push(
        this.withLock(hex, async () => {
          // A put queued before this unlink may have written the span again: keep that file.
          if (!this.index.has(hex)) await unlinkQuiet(this.pathOf(hex));
        }),
      );
    }
    return unlinks;
  }

  private remove(hex: string): Promise<boolean> {
    return this.withLock(hex, async () => {
      const entry = this.index.get(hex);
      if (entry === undefined) return false;
      this.forget(hex, entry);
      this.counters.deletes++;
      await unlinkQuiet(this.pathOf(hex));
      return true;
    });
  }

  /**
   * Write a span file: a temp file in its final directory, then rename. No fsync: a file
   * cut short or garbled by a crash fails verification on `get` and is removed, which costs
   * a refetch, not correctness. Returns false (logged and counted) on failure.
   */
  private async write(hex: string, bytes: Uint8Array, stamp: number): Promise<boolean> {
    const prefix = hex.slice(0, 2);
    const sub = join(this.dir, prefix);
    const tmp = join(sub, `${hex}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
    liveTemps.add(tmp);
    let fh: FileHandle | undefined;
    try {
      for (let attempt = 0; ; attempt++) {
        try {
          if (!this.subdirs.has(prefix)) {
            await mkdir(sub, { mode: 0o700 }).catch((err: unknown) => {
              if (errCode(err) !== 'EEXIST') throw err;
            });
            this.subdirs.add(prefix);
          }
          fh = await open(tmp, 'wx', 0o600);
          break;
        } catch (err) {
          // The subdirectory was removed behind our back: make it again, once.
          if (errCode(err) !== 'ENOENT' || attempt > 0) throw err;
          this.subdirs.delete(prefix);
        }
      }
      for (let off = 0; off < bytes.byteLength; ) {
        off += (await fh.write(bytes, off, bytes.byteLength - off, off)).bytesWritten;
      }
      await fh.utimes(stamp / 1000, stamp / 1000);
      await fh.close();
      fh = undefined;
      await rename(tmp, this.pathOf(hex));
      return true;
    } catch (err) {
      if (fh !== undefined) await fh.close().catch(() => undefined);
      await unlinkQuiet(tmp);
      this.putFailed(hex, tmp, err);
      return false;
    } finally {
      liveTemps.delete(tmp);
    }
  }

  private putFailed(hex: string, file: string, err: unknown): void {
    this.counters.putErrors++;
    const now = Date.now();
    if (now - this.lastPutWarn < PUT_WARN_INTERVAL_MS) {
      this.suppressedPutWarnings++;
      return;
    }
    this.lastPutWarn = now;
    const suppressed = this.suppressedPutWarnings;
    this.suppressedPutWarnings = 0;
    this.logger.warn('span cache: write failed, span not cached', {
      file,
      digest: `sha256:${hex}`,
      reason: errCode(err) ?? 'error',
      error: err,
      ...(suppressed > 0 ? { suppressed } : {}),
    });
  }

  /** Run `fn` after every earlier queued mutation of `hex` has finished. */
  private async withLock<T>(hex: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(hex);
    let release!: () => void;
    const mine = new Promise<void>((resolve) => (release = resolve));
    const tail = prev === undefined ? mine : prev.then(() => mine);
    this.locks.set(hex, tail);
    try {
      if (prev !== undefined) await prev;
      return await fn();
    } finally {
      release();
      if (this.locks.get(hex) === tail) this.locks.delete(hex);
    }
  }

  /** Rebuild the index from the directory (oldest mtime first) and remove leftover temp files. */
  private async scan(): Promise<void> {
    let top: string[];
    try {
      top = await readdir(this.dir);
    } catch (err) {
      throw new CacheError('io', this.dir, `cannot list the span cache directory (${errCode(err) ?? String(err)})`, { cause: err });
    }
    const found: Array<{ hex: string; size: number; mtimeNs: bigint }> = [];
    const temps: Array<{ path: string; pid: number }> = [];
    for (const prefix of top.sort()) {
      if (!PREFIX_RE.test(prefix)) continue;
      const sub = join(this.dir, prefix);
      let names: string[];
      try {
        names = await readdir(sub);
      } catch (err) {
        if (errCode(err) !== 'ENOTDIR') this.logger.warn('span cache: cannot list directory', { file: sub, error: err });
        continue;
      }
      this.subdirs.add(prefix);
      for (const name of names) {
        const m = TEMP_RE.exec(name);
        if (m !== null) temps.push({ path: join(sub, name), pid: Number(m[2]) });
        else if (HEX_RE.test(name) && name.startsWith(prefix)) found.push({ hex: name, size: 0, mtimeNs: 0n });
      }
    }
    const live: typeof found = [];
    await forEachLimit(found, STAT_CONCURRENCY, async (f) => {
      try {
        const st = await stat(this.pathOf(f.hex), { bigint: true });
        if (!st.isFile()) return;
        f.size = Number(st.size);
        f.mtimeNs = st.mtimeNs;
        live.push(f);
      } catch {
        // Gone since the listing: nothing to index.
      }
    });
    live.sort((a, b) => (a.mtimeNs < b.mtimeNs ? -1 : a.mtimeNs > b.mtimeNs ? 1 : a.hex < b.hex ? -1 : 1));
    for (const f of live) {
      const stamp = Number(f.mtimeNs) / 1e6;
      this.add(f.hex, { size: f.size, stamp });
      if (stamp > this.lastStamp) this.lastStamp = stamp;
    }
    await forEachLimit(temps, STAT_CONCURRENCY, async ({ path, pid }) => {
      if (liveTemps.has(path)) return;
      if (pid !== process.pid && pidAlive(pid)) {
        const st = await stat(path).catch(() => undefined);
        if (st === undefined || Date.now() - st.mtimeMs < TEMP_MAX_AGE_MS) return;
      }
      if (await unlinkQuiet(path)) this.counters.tempFilesRemoved++;
    });
    this.logger.debug('span cache: opened', {
      dir: this.dir,
      files: this.index.size,
      bytes: this.total,
      tempFilesRemoved: this.counters.tempFilesRemoved,
    });
  }
}

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

function sizeOption(name: string, value: number | undefined, fallback: number, min: number): number {
  if (value === undefined) return fallback;
  if (!Number.isSafeInteger(value) || value < min) {
    throw new CacheError('invalid-option', name, `must be an integer ≥ ${min}, got ${String(value)}`);
  }
  return value;
}

function digestHex(digest: string): string {
  const m = typeof digest === 'string' ? DIGEST_RE.exec(digest) : null;
  if (m === null) throw new CacheError('invalid-digest', String(digest), 'not a sha256 digest (sha256:<64 lowercase hex digits>)');
  return m[1];
}

function sha256Hex(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

function errCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

/** Unlink, ignoring a missing file (and, logged by no one, any other failure). Returns whether it removed a file. */
async function unlinkQuiet(path: string): Promise<boolean> {
  try {
    await unlink(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Read a file's first `limit` bytes into one buffer (one read call for a file in the page
 * cache). Asking one byte more than expected tells a too-long file from a good one.
 */
async function readUpTo(path: string, limit: number): Promise<Buffer> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.allocUnsafe(limit);
    let n = 0;
    while (n < limit) {
      const { bytesRead } = await fh.read(buf, n, limit - n, n);
      if (bytesRead === 0) break;
      n += bytesRead;
    }
    return buf.subarray(0, n);
  } finally {
    await fh.close();
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0); // a signal check, not an fs call
    return true;
  } catch (err) {
    return errCode(err) === 'EPERM';
  }
}

async function forEachLimit<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

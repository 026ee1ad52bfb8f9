/**
 * The span manager of one lazily mounted layer: turns a read of the layer's uncompressed tar
 * bytes into spans, and each span from unfetched → fetching → fetched (compressed, checked
 * against its span digest) → inflated. Concurrent reads of a span share one fetch and one
 * inflation; the spans a read needs are requested in the same tick so the fetcher merges
 * adjacent ones into one range request; a read returns as soon as its own bytes are inflated
 * while the rest of the span goes on into the cache; sequential reads fetch the next span ahead.
 */
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { SpanInflater, inflateEngine, type InflateEngine, type LayerIndex } from '../ztoc/index.js';
import { nullLogger, type Logger } from '../fetcher/index.js';
import type { SpanCacheWatcher } from './cache.js';

export type SpanState = 'unfetched' | 'fetching' | 'fetched' | 'inflated';

/** Where compressed spans come from: the registry (exactly these bytes, checked against `digest`). */
export interface SpanSource {
  read(offset: number, length: number, digest: string): Promise<Uint8Array>;
}

/** Inflated spans in memory (bounded in bytes by its owner). */
export interface InflatedSpanCacheLike {
  get(layerDigest: string, spanId: number): Buffer | undefined;
  set(layerDigest: string, spanId: number, data: Buffer): void;
  /** Optional: see InflatedSpanCache.watch (the native read path needs it). */
  watch?(layerDigest: string, watcher: SpanCacheWatcher): () => void;
}

/** Compressed spans on disk, content-addressed by span digest; `get` verifies, `put` never loses a read. */
export interface CompressedSpanStoreLike {
  get(digest: string): Promise<Buffer | undefined>;
  put(digest: string, bytes: Uint8Array): Promise<void>;
  has(digest: string): boolean;
}

/** A read failed: the registry did not deliver in time, or the data was bad. */
export class SpanReadError extends Error {
  readonly subject: string;
  /** The registry did not deliver within the fetch timeout (as opposed to a failed or bad fetch). */
  readonly timedOut: boolean;
  /** The caller stopped waiting (its AbortSignal), not a failure of the registry. */
  readonly aborted: boolean;
  constructor(subject: string, reason: string, options?: { cause?: unknown; timedOut?: boolean; aborted?: boolean }) {
    super(`${subject}: ${reason}`, options);
    this.name = 'SpanReadError';
    this.subject = subject;
    this.timedOut = options?.timedOut ?? false;
    this.aborted = options?.aborted ?? false;
  }
}

/** Reads this far (bytes) past the previous one still count as moving forwards (tar headers, skipped files). */
const READ_AHEAD_MAX_GAP = 1 << 20;
/** Spans fetched ahead once a forward streak has read a span's worth. */
const READ_AHEAD_STREAK_SPANS = 2;

export interface SpanManagerOptions {
  layerDigest: string;
  index: LayerIndex;
  source: SpanSource;
  memory: InflatedSpanCacheLike;
  disk?: CompressedSpanStoreLike;
  logger?: Logger;
  engine?: InflateEngine;
  /** Fetch the next span when reads are sequential. Default true. */
  readAhead?: boolean;
  /** A read that waits longer than this for the registry fails (EIO to the reader). Default 30 s. */
  fetchTimeoutMs?: number;
  /** Bytes inflated per step before yielding the event loop when nobody waits. Default 256 KiB. */
  inflateStep?: number;
}

export interface SpanCounters {
  reads: number;
  bytesRead: number;
  memoryHits: number;
  diskHits: number;
  fetches: number;
  bytesFetched: number;
  inflations: number;
  readAheads: number;
  errors: number;
}

interface Waiter {
  upTo: number;
  resolve: (buf: Buffer) => void;
  reject: (err: unknown) => void;
}

/** One span being inflated: its buffer fills forwards; waiters are released as their bytes arrive. */
interface Inflation {
  buf: Buffer;
  produced: number;
  waiters: Waiter[];
}

export class SpanManager {
  readonly layerDigest: string;
  readonly index: LayerIndex;
  readonly counters: SpanCounters = { reads: 0, bytesRead: 0, memoryHits: 0, diskHits: 0, fetches: 0, bytesFetched: 0, inflations: 0, readAheads: 0, errors: 0 };
  private readonly source: SpanSource;
  private readonly memory: InflatedSpanCacheLike;
  private readonly disk: CompressedSpanStoreLike | undefined;
  private readonly logger: Logger;
  private readonly engine: InflateEngine;
  private readonly readAhead: boolean;
  private readonly fetchTimeoutMs: number;
  private readonly inflateStep: number;
  private readonly fetching = new Map<number, Promise<Buffer>>();
  private readonly inflating = new Map<number, Inflation>();
  /** Spans known to be local (on disk or inflated): for "does this layer still need the network". */
  private readonly local = new Set<number>();
  private lastReadEnd = -1;
  /** How far the current run of forward reads has moved through the layer (see readAheadAfter). */
  private streak = 0;
  private readonly failing = new Set<number>();
  private closed = false;
  /** `read` calls not yet answered (the background fetcher yields while there are any). */
  private foreground = 0;
  /** readCachedInto's span lookups, reused (no array per warm read). */
  private readonly cachedParts: Buffer[] = [];
  /** Disk writes of fetched spans in progress, by span (fetchToDisk waits for them). */
  private readonly storing = new Map<number, Promise<void>>();

  constructor(opts: SpanManagerOptions) {
    this.layerDigest = opts.layerDigest;
    this.index = opts.index;
    this.source = opts.source;
    this.memory = opts.memory;
    this.disk = opts.disk;
    this.logger = opts.logger ?? nullLogger;
    this.engine = opts.engine ?? inflateEngine();
    this.readAhead = opts.readAhead ?? true;
    this.fetchTimeoutMs = opts.fetchTimeoutMs ?? 30_000;
    this.inflateStep = opts.inflateStep ?? 256 << 10;
    if (this.disk !== undefined) {
      const digests = this.index.ztoc.compressionInfo.spanDigests;
      for (let i = 0; i < digests.length; i++) if (this.disk.has(digests[i]!)) this.local.add(i);
    }
  }

  get spanCount(): number {
    return this.index.spans.length;
  }

  /** Spans whose compressed bytes are on disk or whose data is inflated. */
  get localSpans(): number {
    return this.local.size;
  }

  /** Reads (`read` calls) in flight: on-demand reads the background fetcher should not compete with. */
  get foregroundReads(): number {
    return this.foreground;
  }

  /** Whether fetched spans are kept on disk (without a disk store, nothing can be fetched ahead for good). */
  get diskBacked(): boolean {
    return this.disk !== undefined;
  }

  /** Whether the span is known to be local (on disk or inflated); cheap, touches no cache. */
  isLocal(spanId: number): boolean {
    return this.local.has(spanId);
  }

  /** True when every span is local: reads no longer need the registry. */
  get complete(): boolean {
    return this.local.size === this.index.spans.length;
  }

  state(spanId: number): SpanState {
    if (this.memory.get(this.layerDigest, spanId) !== undefined || this.inflating.has(spanId)) return 'inflated';
    if (this.local.has(spanId)) return 'fetched';
    if (this.fetching.has(spanId)) return 'fetching';
    return 'unfetched';
  }

  /**
   * `length` bytes of the layer's uncompressed tar from `offset` (clamped to the archive). Fails
   * with SpanReadError when the registry does not deliver within the fetch timeout.
   * `extentEnd`: where the data of the file being read ends in the tar, when the caller knows
   * (a read continuing within a file fetches the next span ahead only if the file goes on there).
   */
  async read(offset: number, length: number, extentEnd?: number): Promise<Buffer> {
    this.foreground++;
    try {
      return await this.readSpans(offset, length, extentEnd);
    } finally {
      this.foreground--;
    }
  }

  /**
   * `read` without a promise for bytes already inflated in memory: copies up to `length` bytes
   * of the tar from `offset` (clamped to the archive and to `dst`) into `dst` and returns how
   * many, or -1 (nothing copied, nothing counted) when some of them are not in memory yet, so
   * the caller goes on with `read`. A warm FUSE read is answered in the callback that asked.
   */
  readCachedInto(offset: number, length: number, dst: Buffer, extentEnd?: number): number {
    const size = this.index.ztoc.uncompressedArchiveSize;
    if (offset >= size || length <= 0 || dst.length === 0) return 0;
    const end = Math.min(size, offset + length, offset + dst.length);
    const first = this.index.spanFor(offset);
    const last = this.index.spanFor(end - 1);
    // Look every span up before copying anything, so a miss leaves no trace.
    const parts = this.cachedParts;
    parts.length = 0;
    for (let id = first; id <= last; id++) {
      const buf = this.inMemory(id, end);
      if (buf === undefined) {
        parts.length = 0;
        return -1;
      }
      parts.push(buf);
    }
    const pos = this.copySpans(parts, first, offset, end, dst);
    parts.length = 0; // hold no span past the call
    this.counters.reads++;
    this.counters.memoryHits += last - first + 1;
    this.counters.bytesRead += pos;
    if (this.readAhead) this.readAheadAfter(offset, end, last, extentEnd);
    return pos;
  }

  /** The span's inflated bytes when they are in memory up to tar offset `end` (or the span's end). */
  private inMemory(spanId: number, end: number): Buffer | undefined {
    const cached = this.memory.get(this.layerDigest, spanId);
    if (cached !== undefined) return cached;
    const running = this.inflating.get(spanId);
    if (running === undefined) return undefined;
    const span = this.index.spans[spanId]!;
    return running.produced >= Math.min(end, span.uncompressedEnd) - span.uncompressedStart ? running.buf : undefined;
  }

  private async readSpans(offset: number, length: number, extentEnd: number | undefined): Promise<Buffer> {
    const size = this.index.ztoc.uncompressedArchiveSize;
    if (offset >= size || length <= 0) return Buffer.alloc(0);
    const end = Math.min(size, offset + length);
    this.counters.reads++;
    const first = this.index.spanFor(offset);
    const last = this.index.spanFor(end - 1);
    // Ask for every span first (same tick: adjacent fetches merge), then wait.
    const pending: Array<Promise<Buffer>> = [];
    for (let id = first; id <= last; id++) {
      const span = this.index.spans[id]!;
      const upTo = Math.min(span.uncompressedEnd, end) - span.uncompressedStart;
      pending.push(this.spanData(id, upTo));
    }
    if (this.readAhead) this.readAheadAfter(offset, end, last, extentEnd);
    let parts: Buffer[];
    try {
      parts = await this.withTimeout(Promise.all(pending), `bytes ${offset}+${end - offset}`);
    } catch (err) {
      this.counters.errors++;
      // A fetch that outlived the reader's timeout is stalled: the next read must not wait on
      // it again but ask the registry anew (the stalled request ends by the fetcher's timeouts).
      if (err instanceof SpanReadError && err.timedOut) for (let id = first; id <= last; id++) this.fetching.delete(id);
      throw err;
    }
    this.counters.bytesRead += end - offset;
    if (first === last) {
      const from = offset - this.index.spans[first]!.uncompressedStart;
      return parts[0]!.subarray(from, from + (end - offset));
    }
    const out = Buffer.allocUnsafe(end - offset);
    this.copySpans(parts, first, offset, end, out);
    return out;
  }

  /** Copies tar bytes [offset, end) from the inflated spans `parts` (span `first` on) to `dst`; returns how many. */
  private copySpans(parts: readonly Buffer[], first: number, offset: number, end: number, dst: Buffer): number {
    let pos = 0;
    for (let i = 0; i < parts.length; i++) {
      const span = this.index.spans[first + i]!;
      const from = Math.max(offset, span.uncompressedStart) - span.uncompressedStart;
      const to = Math.min(end, span.uncompressedEnd) - span.uncompressedStart;
      pos += parts[i]!.copy(dst, pos, from, to);
    }
    return pos;
  }

  /**
   * Read-ahead after a read of [offset, end) ending in span `last`. A read that continues the
   * previous one (within a file) fetches the next span, unless the file (`extentEnd`) ends in
   * this one: a whole span fetched for nothing, most of a small read's bytes; a streak of reads moving forwards with
   * small gaps (file after file in tar order: `find | xargs cat`, an image's start-up reading
   * its libraries) fetches the next spans once it has read a span's worth, so that the fetch
   * of what comes next overlaps the reading of what is here. A random read resets the streak.
   */
  private readAheadAfter(offset: number, end: number, last: number, extentEnd: number | undefined): void {
    const gap = offset - this.lastReadEnd;
    // The kernel's own read-ahead answers a little out of order: a short step back is still
    // forwards. The streak is the distance moved, to the furthest byte read.
    const forwards = this.lastReadEnd >= 0 && gap >= -READ_AHEAD_MAX_GAP && gap <= READ_AHEAD_MAX_GAP;
    this.streak = forwards ? this.streak + Math.max(0, end - this.lastReadEnd) : end - offset;
    this.lastReadEnd = forwards ? Math.max(this.lastReadEnd, end) : end;
    const span = this.index.spans[last]!;
    let ahead = gap === 0 && (extentEnd === undefined || extentEnd > span.uncompressedEnd) ? 1 : 0;
    if (forwards && this.streak >= span.uncompressedEnd - span.uncompressedStart) ahead = READ_AHEAD_STREAK_SPANS;
    for (let id = last + 1; id <= last + ahead && id < this.index.spans.length; id++) this.prefetch(id);
  }

  /** Fetches (and inflates) a span in the background; errors are logged, not thrown. */
  prefetch(spanId: number): void {
    if (this.state(spanId) === 'inflated') return;
    this.counters.readAheads++;
    this.spanData(spanId, 0).catch(() => undefined);
  }

  /**
   * Makes a span local (compressed on disk) without inflating it: for the background fetcher.
   * Resolves true when it was fetched now, false when it already was local, once the span is
   * on disk. Rejects with SpanReadError when the fetch fails or times out, when the disk store
   * did not keep it (write error, span larger than the store), or when there is no disk store;
   * at once when `signal` aborts (`aborted`: the caller stops waiting; the fetch itself goes on,
   * shared with any read that needs the span, and ends by the fetcher's own timeouts).
   */
  async fetchToDisk(spanId: number, signal?: AbortSignal): Promise<boolean> {
    if (this.local.has(spanId)) return false;
    const subject = `${this.layerDigest} span ${spanId}`;
    if (this.disk === undefined) throw new SpanReadError(subject, 'no disk store to fetch into');
    if (signal?.aborted === true) throw new SpanReadError(subject, 'aborted', { aborted: true });
    const fetching = this.compressed(spanId);
    try {
      await this.withTimeout(fetching, `span ${spanId}`, signal);
    } catch (err) {
      // As in read(): a retry must not join the stalled fetch again.
      if (err instanceof SpanReadError && err.timedOut && this.fetching.get(spanId) === fetching) this.fetching.delete(spanId);
      throw err;
    }
    await this.storing.get(spanId);
    if (!this.local.has(spanId)) throw new SpanReadError(subject, 'fetched but not kept by the disk store (see its log)');
    return true;
  }

  private async withTimeout<T>(p: Promise<T>, what: string, signal?: AbortSignal): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new SpanReadError(`${this.layerDigest} ${what}`, `no data from the registry within ${this.fetchTimeoutMs} ms`, { timedOut: true })),
        this.fetchTimeoutMs,
      );
      timer.unref();
      if (signal !== undefined) {
        onAbort = () => reject(new SpanReadError(`${this.layerDigest} ${what}`, 'aborted', { aborted: true }));
        signal.addEventListener('abort', onAbort, { once: true });
      }
    });
    try {
      return await Promise.race([p, timeout]);
    } finally {
      clearTimeout(timer);
      if (onAbort !== undefined) signal?.removeEventListener('abort', onAbort);
    }
  }

  /** The span's inflated bytes, valid at least up to `upTo` (relative to the span's start). */
  private spanData(spanId: number, upTo: number): Promise<Buffer> {
    const cached = this.memory.get(this.layerDigest, spanId);
    if (cached !== undefined) {
      this.counters.memoryHits++;
      return Promise.resolve(cached);
    }
    const running = this.inflating.get(spanId);
    if (running !== undefined) return this.waitFor(running, upTo);
    return this.compressed(spanId).then((bytes) => {
      const again = this.memory.get(this.layerDigest, spanId);
      if (again !== undefined) return again;
      const inflation = this.inflating.get(spanId) ?? this.startInflation(spanId, bytes);
      return this.waitFor(inflation, upTo);
    });
  }

  private waitFor(inflation: Inflation, upTo: number): Promise<Buffer> {
    if (inflation.produced >= upTo) return Promise.resolve(inflation.buf);
    return new Promise((resolve, reject) => inflation.waiters.push({ upTo, resolve, reject }));
  }

  /** Inflates in steps; between steps, releases waiters whose bytes are there and yields the loop. */
  private startInflation(spanId: number, compressed: Buffer): Inflation {
    const span = this.index.spans[spanId]!;
    const inflation: Inflation = { buf: Buffer.allocUnsafe(span.uncompressedEnd - span.uncompressedStart), produced: 0, waiters: [] };
    this.inflating.set(spanId, inflation);
    this.counters.inflations++;
    void (async () => {
      const inflater = new SpanInflater(this.index, spanId, compressed, this.engine);
      try {
        while (inflation.produced < inflation.buf.length) {
          // On the engine's thread: steps, so that waiters are released as their bytes arrive.
          // On this one: up to the nearest waiter's need at once, at least one step.
          let target = inflation.produced + this.inflateStep;
          const most = inflater.offThread ? 1 << 20 : 4 << 20;
          for (const w of inflation.waiters) target = Math.max(target, Math.min(w.upTo, inflation.produced + most));
          target = Math.min(target, inflation.buf.length);
          await inflater.fillAsync(inflation.buf, inflation.produced, target);
          inflation.produced = inflater.produced;
          if (inflation.waiters.length > 0) {
            const still: Waiter[] = [];
            for (const w of inflation.waiters) {
              if (w.upTo <= inflation.produced) w.resolve(inflation.buf);
              else still.push(w);
            }
            inflation.waiters = still;
          }
          if (!inflater.offThread && inflation.produced < inflation.buf.length && inflation.waiters.length === 0) await yieldToLoop();
          if (this.closed) throw new SpanReadError(this.layerDigest, 'layer closed');
        }
        this.memory.set(this.layerDigest, spanId, inflation.buf);
        this.local.add(spanId);
        for (const w of inflation.waiters) w.resolve(inflation.buf);
      } catch (err) {
        this.counters.errors++;
        this.logger.error('span inflation failed', { layer: this.layerDigest, span: spanId, error: err });
        const e = err instanceof SpanReadError ? err : new SpanReadError(`${this.layerDigest} span ${spanId}`, 'cannot inflate', { cause: err });
        for (const w of inflation.waiters) w.reject(e);
      } finally {
        inflater.close();
        this.inflating.delete(spanId);
      }
    })();
    return inflation;
  }

  /** The span's compressed bytes: disk, else one shared registry fetch (digest-checked by the fetcher). */
  private compressed(spanId: number): Promise<Buffer> {
    let p = this.fetching.get(spanId);
    if (p !== undefined) return p;
    const span = this.index.spans[spanId]!;
    const digest = this.index.ztoc.compressionInfo.spanDigests[spanId]!;
    p = (async () => {
      // Only touch the disk for spans it has: misses must reach the fetcher in this same tick,
      // so that the spans of one read merge into one range request.
      const onDisk = this.disk?.has(digest) === true ? await this.disk.get(digest) : undefined;
      if (onDisk !== undefined) {
        this.counters.diskHits++;
        this.local.add(spanId);
        return onDisk;
      }
      this.counters.fetches++;
      let bytes: Uint8Array;
      try {
        bytes = await this.source.read(span.compressedStart, span.compressedEnd - span.compressedStart, digest);
      } catch (err) {
        // Log once per failing streak of a span, not on every retry by every reader.
        if (!this.failing.has(spanId)) {
          this.failing.add(spanId);
          this.logger.error('span fetch failed', { layer: this.layerDigest, span: spanId, error: err });
        }
        throw new SpanReadError(`${this.layerDigest} span ${spanId}`, 'fetch from the registry failed', { cause: err });
      }
      this.failing.delete(spanId);
      this.counters.bytesFetched += bytes.length;
      const buf = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
      if (this.disk !== undefined) {
        const disk = this.disk;
        // put resolves also when the write failed (logged by the store): local only if it is there.
        const stored = disk.put(digest, buf).then(
          () => {
            if (disk.has(digest)) this.local.add(spanId);
          },
          (err: unknown) => this.logger.warn('span not written to the disk cache', { layer: this.layerDigest, span: spanId, error: err }),
        );
        this.storing.set(spanId, stored);
        void stored.then(() => {
          if (this.storing.get(spanId) === stored) this.storing.delete(spanId);
        });
      }
      return buf;
    })();
    this.fetching.set(spanId, p);
    // Failed fetches are forgotten (the next read retries); done ones too (the bytes live in the caches).
    const forget = (): void => {
      if (this.fetching.get(spanId) === p) this.fetching.delete(spanId);
    };
    p.then(forget, forget);
    return p;
  }

  /** Stops inflations in progress; later reads fail. */
  close(): void {
    this.closed = true;
  }
}

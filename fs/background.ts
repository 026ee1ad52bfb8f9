/**
 * The background fetcher: once layers are mounted, fetches the spans they do not have yet into
 * the disk store, so that a layer stops needing the registry (every span local: "complete").
 *
 * - Bounded: a token bucket over compressed span bytes (`rateBytesPerSec`; a span larger than
 *   the bucket is let through when the bucket is full and its excess is paid for afterwards, so
 *   the average holds) and at most `concurrency` spans in flight over all layers.
 * - Polite: while any registered layer has on-demand reads in flight (SpanManager's
 *   `foregroundReads`), nothing new is started; work resumes `quietMs` after the last one.
 *   Spans a read is already fetching are not fetched twice (SpanManager shares the fetch).
 * - Ordered: layers in the order they were added, each from its first span to its last; a
 *   layer starts `startDelayMs` after it was added.
 * - Robust: a failed fetch is logged once per failing streak of a layer, the span is retried
 *   first, after a backoff that doubles per consecutive failure of that layer (up to
 *   `retryMaxMs`); nothing here throws into the event loop.
 * - When a layer becomes complete (by background or on-demand fetches), it is logged once
 *   (`layer is complete`), recorded in `stats()`, and `onLayerComplete` is called.
 *
 * Never blocks the event loop: all waits are timers, all I/O is the SpanManager's.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { nullLogger, type Logger } from '../fetcher/index.js';
import type { SpanManager } from './spans.js';

export const DEFAULT_BACKGROUND_RATE = 32 * 1024 * 1024;
export const DEFAULT_BACKGROUND_CONCURRENCY = 2;
export const DEFAULT_BACKGROUND_START_DELAY_MS = 10_000;

export interface BackgroundFetchConfig {
  /** Default true. False: nothing is fetched until `setEnabled(true)`. */
  enabled?: boolean;
  /** Compressed bytes per second over all layers (default 32 MiB/s); Infinity = unbounded. */
  rateBytesPerSec?: number;
  /** Bucket size in bytes: the largest burst (default: one second at the rate, at least 1 MiB). */
  burstBytes?: number;
  /** Spans in flight at once over all layers (default 2). */
  concurrency?: number;
  /** Wait after `add` before fetching a layer (default 10 s: let the container start first). */
  startDelayMs?: number;
  /** Quiet time after the last on-demand read before fetching again (default 200 ms). */
  quietMs?: number;
  /** How often to look whether on-demand reads are done (default 50 ms). */
  pollMs?: number;
  /** First retry delay after a failure (default 1 s), doubled per consecutive failure of the layer. */
  retryBaseMs?: number;
  /** Longest retry delay (default 60 s). */
  retryMaxMs?: number;
  logger?: Logger;
  /** Called once per layer when every span is local (errors it throws are logged). */
  onLayerComplete?: (stats: BackgroundLayerStats) => void;
}

export interface BackgroundLayerStats {
  layerDigest: string;
  spansTotal: number;
  spansLocal: number;
  /** Spans the background fetched (not those on-demand reads fetched). */
  spansFetched: number;
  /** Compressed bytes of those spans. */
  bytesFetched: number;
  /** Failed span fetches (each retried later). */
  failures: number;
  complete: boolean;
  /** When the layer was seen complete (ms since the epoch), if it is. */
  completedAt: number | undefined;
}

export interface BackgroundTotals {
  layers: number;
  layersComplete: number;
  spansFetched: number;
  bytesFetched: number;
  failures: number;
  /** Spans being fetched now. */
  inFlight: number;
}

/** A configuration value is unusable. */
export class BackgroundFetchError extends Error {
  readonly subject: string;
  constructor(subject: string, reason: string, options?: { cause?: unknown }) {
    super(`${subject}: ${reason}`, options);
    this.name = 'BackgroundFetchError';
    this.subject = subject;
  }
}

interface Layer {
  readonly spans: SpanManager;
  readonly digest: string;
  /** Not before this (ms, `Date.now()` clock). */
  eligibleAt: number;
  /** Next span to look at. */
  cursor: number;
  /** Spans that failed, to retry before going on. */
  readonly retry: number[];
  readonly inFlight: Set<number>;
  /** Consecutive failures (any span); 0 after a success. */
  failStreak: number;
  retryAt: number;
  stats: BackgroundLayerStats;
  /** Settles when this layer's in-flight fetches do (for remove). */
  readonly pending: Set<Promise<void>>;
  removed: boolean;
}

interface Job {
  layer: Layer;
  spanId: number;
  bytes: number;
}

export class BackgroundFetcher {
  private readonly rate: number;
  private readonly burst: number;
  private readonly concurrency: number;
  private readonly startDelayMs: number;
  private readonly quietMs: number;
  private readonly pollMs: number;
  private readonly retryBaseMs: number;
  private readonly retryMaxMs: number;
  private readonly logger: Logger;
  private readonly onLayerComplete: ((stats: BackgroundLayerStats) => void) | undefined;
  private readonly layers: Layer[] = [];
  private readonly abort = new AbortController();
  private enabledFlag: boolean;
  private stopped = false;
  private workers: Array<Promise<void>> = [];
  /** Resolves the current wait of idle workers (add, enable, stop, a fetch done). */
  private wakeUp: (() => void) | undefined;
  private wakeSignal: Promise<void>;
  private tokens: number;
  private tokensAt: number;
  private inFlightCount = 0;
  private sums = { spansFetched: 0, bytesFetched: 0, failures: 0 };

  constructor(config: BackgroundFetchConfig = {}) {
    this.rate = positive('rateBytesPerSec', config.rateBytesPerSec, DEFAULT_BACKGROUND_RATE);
    this.burst = positive('burstBytes', config.burstBytes, Number.isFinite(this.rate) ? Math.max(this.rate, 1 << 20) : Number.POSITIVE_INFINITY);
    this.concurrency = positive('concurrency', config.concurrency, DEFAULT_BACKGROUND_CONCURRENCY);
    if (!Number.isInteger(this.concurrency)) throw new BackgroundFetchError('concurrency', `must be a whole number, got ${this.concurrency}`);
    this.startDelayMs = nonNegative('startDelayMs', config.startDelayMs, DEFAULT_BACKGROUND_START_DELAY_MS);
    this.quietMs = nonNegative('quietMs', config.quietMs, 200);
    this.pollMs = positive('pollMs', config.pollMs, 50);
    this.retryBaseMs = positive('retryBaseMs', config.retryBaseMs, 1000);
    this.retryMaxMs = Math.max(this.retryBaseMs, nonNegative('retryMaxMs', config.retryMaxMs, 60_000));
    this.logger = config.logger ?? nullLogger;
    this.onLayerComplete = config.onLayerComplete;
    this.enabledFlag = config.enabled ?? true;
    // The bucket starts empty: no burst right at start.
    this.tokens = 0;
    this.tokensAt = Date.now();
    this.wakeSignal = this.newWakeSignal();
  }

  get enabled(): boolean {
    return this.enabledFlag && !this.stopped;
  }

  /** The off-switch: false pauses (spans in flight finish), true resumes. */
  setEnabled(on: boolean): void {
    if (this.stopped || on === this.enabledFlag) return;
    this.enabledFlag = on;
    this.logger.info(on ? 'background fetch enabled' : 'background fetch disabled');
    if (on) this.ensureWorkers();
    this.wake();
  }

  /**
   * Registers a mounted layer: its missing spans are fetched from `startDelayMs` on. A layer
   * already registered (same digest) is ignored; one without a disk store too (nothing fetched
   * could be kept).
   */
  add(spans: SpanManager): void {
    if (this.stopped) return;
    const digest = spans.layerDigest;
    if (this.layers.some((l) => l.digest === digest)) {
      this.logger.debug('background fetch: layer already registered', { layer: digest });
      return;
    }
    if (!spans.diskBacked) {
      this.logger.warn('background fetch: layer has no disk store, not fetched ahead', { layer: digest });
      return;
    }
    const layer: Layer = {
      spans,
      digest,
      eligibleAt: Date.now() + this.startDelayMs,
      cursor: 0,
      retry: [],
      inFlight: new Set(),
      failStreak: 0,
      retryAt: 0,
      stats: {
        layerDigest: digest,
        spansTotal: spans.spanCount,
        spansLocal: spans.localSpans,
        spansFetched: 0,
        bytesFetched: 0,
        failures: 0,
        complete: false,
        completedAt: undefined,
      },
      pending: new Set(),
      removed: false,
    };
    this.layers.push(layer);
    this.checkComplete(layer);
    this.ensureWorkers();
    this.wake();
  }

  /** Forgets a layer (e.g. at unmount); resolves when its spans in flight have settled. */
  async remove(layerDigest: string): Promise<void> {
    const i = this.layers.findIndex((l) => l.digest === layerDigest);
    if (i < 0) return;
    const layer = this.layers[i]!;
    layer.removed = true;
    this.layers.splice(i, 1);
    this.wake();
    await Promise.all([...layer.pending]);
  }

  /**
   * Stops for good; resolves promptly: spans in flight are abandoned (their fetches, shared with
   * any read that needs them, end by the fetcher's own timeouts or when its client closes).
   */
  async stop(): Promise<void> {
    if (!this.stopped) {
      this.stopped = true;
      this.abort.abort();
      this.wake();
    }
    await Promise.all(this.workers);
  }

  /** Per-layer progress, in the order the layers were added. */
  stats(): BackgroundLayerStats[];
  stats(layerDigest: string): BackgroundLayerStats | undefined;
  stats(layerDigest?: string): BackgroundLayerStats[] | BackgroundLayerStats | undefined {
    const snapshot = (l: Layer): BackgroundLayerStats => ({ ...l.stats, spansLocal: l.spans.localSpans });
    if (layerDigest !== undefined) {
      const l = this.layers.find((x) => x.digest === layerDigest);
      return l === undefined ? undefined : snapshot(l);
    }
    return this.layers.map(snapshot);
  }

  /** Sums over all layers. */
  totals(): BackgroundTotals {
    return {
      layers: this.layers.length,
      layersComplete: this.layers.filter((l) => l.stats.complete).length,
      ...this.sums,
      inFlight: this.inFlightCount,
    };
  }

  // --- workers -----------------------------------------------------------------------------

  private ensureWorkers(): void {
    if (this.stopped || !this.enabledFlag || this.workers.length > 0) return;
    for (let i = 0; i < this.concurrency; i++) {
      this.workers.push(
        this.worker().catch((err: unknown) => {
          // Not expected: the loop catches what it calls. Logged, never thrown.
          this.logger.error('background fetch worker failed', { error: err });
        }),
      );
    }
  }

  private newWakeSignal(): Promise<void> {
    return new Promise<void>((resolve) => {
      this.wakeUp = resolve;
    });
  }

  private wake(): void {
    const w = this.wakeUp;
    this.wakeSignal = this.newWakeSignal();
    w?.();
  }

  /** Waits `ms` or until woken or stopped. */
  private async idle(ms: number): Promise<void> {
    const woken = this.wakeSignal;
    if (this.stopped) return;
    const ac = new AbortController();
    const onStop = (): void => ac.abort();
    this.abort.signal.addEventListener('abort', onStop, { once: true });
    try {
      await Promise.race([woken, sleep(Math.max(1, Math.min(ms, 2 ** 31 - 1)), undefined, { signal: ac.signal, ref: false }).catch(() => undefined)]);
    } finally {
      ac.abort();
      this.abort.signal.removeEventListener('abort', onStop);
    }
  }

  private foregroundBusy(): boolean {
    for (const l of this.layers) if (l.spans.foregroundReads > 0) return true;
    return false;
  }

  /** Returns once no on-demand read has been in flight for `quietMs` (or when stopped/disabled). */
  private async yieldToForeground(): Promise<void> {
    let busy = this.foregroundBusy();
    while (busy && !this.stopped && this.enabledFlag) {
      while (this.foregroundBusy() && !this.stopped && this.enabledFlag) await this.sleepFor(this.pollMs);
      if (this.quietMs > 0) await this.sleepFor(this.quietMs);
      busy = this.foregroundBusy();
    }
  }

  /** A plain sleep that stop() ends early. */
  private async sleepFor(ms: number): Promise<void> {
    if (this.stopped) return;
    await sleep(ms, undefined, { signal: this.abort.signal, ref: false }).catch(() => undefined);
  }

  private async worker(): Promise<void> {
    while (!this.stopped) {
      if (!this.enabledFlag) {
        await this.idle(60_000);
        continue;
      }
      await this.yieldToForeground();
      if (this.stopped || !this.enabledFlag) continue;
      const now = Date.now();
      const { job, wakeAt } = this.pick(now);
      if (job === undefined) {
        await this.idle(wakeAt === undefined ? 60_000 : wakeAt - now);
        continue;
      }
      this.claim(job);
      let took = false;
      let ran = false;
      try {
        await this.takeTokens(job.bytes);
        took = true;
        // Waiting for tokens may have taken a while: a read may have started, the layer gone.
        if (this.stopped || !this.enabledFlag || job.layer.removed || this.foregroundBusy()) continue;
        ran = true;
        await this.run(job);
      } finally {
        if (!ran) {
          if (took) this.refund(job.bytes);
          this.unclaim(job, true);
        }
      }
    }
  }

  /** The next span to fetch, or when to look again. */
  private pick(now: number): { job?: Job; wakeAt?: number } {
    let wakeAt: number | undefined;
    const later = (t: number): void => {
      wakeAt = wakeAt === undefined ? t : Math.min(wakeAt, t);
    };
    for (const layer of this.layers) {
      this.checkComplete(layer);
      if (layer.stats.complete) continue;
      if (layer.eligibleAt > now) {
        later(layer.eligibleAt);
        continue;
      }
      if (layer.retryAt > now) {
        later(layer.retryAt);
        continue;
      }
      const spans = layer.spans;
      // Failed spans first (the registry is back, or the last try was unlucky).
      while (layer.retry.length > 0) {
        const id = layer.retry.shift()!;
        if (!spans.isLocal(id) && !layer.inFlight.has(id)) return { job: this.job(layer, id) };
      }
      while (layer.cursor < spans.spanCount) {
        const id = layer.cursor++;
        if (!spans.isLocal(id) && !layer.inFlight.has(id)) return { job: this.job(layer, id) };
      }
      if (layer.inFlight.size === 0) {
        // A pass is over but the layer is not complete (a span was evicted, or fetched by a
        // read whose disk write failed): go round again, after a pause.
        layer.cursor = 0;
        layer.retryAt = now + this.retryBaseMs;
        later(layer.retryAt);
      }
    }
    return { wakeAt };
  }

  private job(layer: Layer, spanId: number): Job {
    const s = layer.spans.index.spans[spanId]!;
    return { layer, spanId, bytes: s.compressedEnd - s.compressedStart };
  }

  private claim(job: Job): void {
    job.layer.inFlight.add(job.spanId);
    this.inFlightCount++;
  }

  private unclaim(job: Job, putBack: boolean): void {
    job.layer.inFlight.delete(job.spanId);
    this.inFlightCount--;
    if (putBack && !job.layer.spans.isLocal(job.spanId)) job.layer.retry.unshift(job.spanId);
  }

  private async run(job: Job): Promise<void> {
    const { layer, spanId } = job;
    let settle!: () => void;
    const pending = new Promise<void>((resolve) => (settle = resolve));
    layer.pending.add(pending);
    let failed = false;
    try {
      const fetched = await layer.spans.fetchToDisk(spanId, this.abort.signal);
      if (fetched) {
        layer.stats.spansFetched++;
        layer.stats.bytesFetched += job.bytes;
        this.sums.spansFetched++;
        this.sums.bytesFetched += job.bytes;
      } else {
        this.refund(job.bytes); // it was local already: no bytes moved
      }
      if (layer.failStreak > 0) {
        this.logger.info('background fetch of the layer works again', { layer: layer.digest, afterFailures: layer.failStreak });
        layer.failStreak = 0;
        layer.retryAt = 0;
      }
    } catch (err) {
      failed = true;
      if (this.stopped) return; // abandoned by stop(): not a failure of the registry
      layer.stats.failures++;
      this.sums.failures++;
      layer.failStreak++;
      const delay = Math.min(this.retryMaxMs, this.retryBaseMs * 2 ** Math.min(30, layer.failStreak - 1));
      layer.retryAt = Math.max(layer.retryAt, Date.now() + delay);
      if (layer.failStreak === 1) {
        this.logger.warn('background fetch of a span failed; retrying later', { layer: layer.digest, span: spanId, retryInMs: delay, error: err });
      }
    } finally {
      this.unclaim(job, failed);
      layer.pending.delete(pending);
      settle();
      if (!layer.removed) this.checkComplete(layer);
      this.wake();
    }
  }

  private checkComplete(layer: Layer): void {
    if (layer.stats.complete || !layer.spans.complete) return;
    layer.stats.complete = true;
    layer.stats.completedAt = Date.now();
    layer.stats.spansLocal = layer.spans.localSpans;
    this.logger.info('layer is complete', {
      layer: layer.digest,
      spans: layer.stats.spansTotal,
      fetchedInBackground: layer.stats.spansFetched,
      bytesInBackground: layer.stats.bytesFetched,
    });
    if (this.onLayerComplete !== undefined) {
      try {
        this.onLayerComplete({ ...layer.stats });
      } catch (err) {
        this.logger.warn('background fetch: onLayerComplete failed', { layer: layer.digest, error: err });
      }
    }
  }

  // --- token bucket ------------------------------------------------------------------------

  private refill(): void {
    const now = Date.now();
    if (Number.isFinite(this.rate)) this.tokens = Math.min(this.burst, this.tokens + ((now - this.tokensAt) / 1000) * this.rate);
    this.tokensAt = now;
  }

  /** Waits until `bytes` may go (a span larger than the bucket waits for a full bucket), then takes them. */
  private async takeTokens(bytes: number): Promise<void> {
    if (!Number.isFinite(this.rate)) return;
    const need = Math.min(bytes, this.burst);
    for (;;) {
      this.refill();
      if (this.tokens >= need) {
        this.tokens -= bytes; // may go below 0: the excess of a big span is paid for by waiting later
        return;
      }
      if (this.stopped) return;
      await this.sleepFor(Math.max(1, Math.ceil(((need - this.tokens) / this.rate) * 1000)));
    }
  }

  private refund(bytes: number): void {
    if (!Number.isFinite(this.rate)) return;
    this.refill();
    this.tokens = Math.min(this.burst, this.tokens + bytes);
  }
}

function positive(name: string, value: number | undefined, dflt: number): number {
  if (value === undefined) return dflt;
  if (typeof value !== 'number' || Number.isNaN(value) || value <= 0) throw new BackgroundFetchError(name, `must be a positive number, got ${String(value)}`);
  return value;
}

function nonNegative(name: string, value: number | undefined, dflt: number): number {
  if (value === undefined) return dflt;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) throw new BackgroundFetchError(name, `must be a number ≥ 0, got ${String(value)}`);
  return value;
}

/**
 * The daemon's Prometheus metrics: a prom-client registry behind a structural interface
 * ({@link MetricsSink}), so that the modules that record events never import prom-client, and
 * an HTTP endpoint ({@link startMetricsServer}) that serves `GET /metrics` as the merge of
 * several sources (the snapshotter process and the FUSE-manager process each keep their own
 * registry; the snapshotter scrapes the manager's over its RPC).
 *
 * Names. Upstream's (soci-snapshotter `fs/metrics/common/metrics.go`, namespace `soci`,
 * subsystem `fs`) where one exists, with its label names, buckets and kinds:
 *
 *   soci_fs_operation_duration_milliseconds  histogram  operation_type, layer   buckets 1, 2, 4, …, 16384
 *   soci_fs_operation_duration_microseconds  histogram  operation_type, layer   buckets 1, 2, 4, …, 1024
 *   soci_fs_operation_count                  counter    operation_type, layer
 *   soci_fs_bytes_served                     gauge      operation_type, layer
 *   soci_fs_image_operation_count_key        gauge      operation_type, image
 *
 * fed as upstream feeds them: `mount` (mountLatency), `synchronous_read` latency and
 * `synchronous_read_count` (fuseOp of a `read`, and nativeReads: reads answered without JavaScript), `node_readdir` in microseconds (fuseOp of a
 * `readdir`), the `fuse_*_failure_count` family (fuseOp with ok = false: `getattr` →
 * fuse_node_getattr_failure_count, `listxattr`/`getxattr` → fuse_node_listxattr_failure_count,
 * `lookup`, `open`, `readdir` → fuse_node_*, `read` → fuse_file_read_failure_count, anything
 * else → fuse_unknown_operation_failure_count), `background_span_fetch_count` (the growth of a
 * layer's local spans between two backgroundProgress reports), `synchronous_bytes_served`
 * (served), and any other upstream operation type through `operation()` (remote_registry_get,
 * background_fetch, fuse_mount, ztoc_fetch, soci_index_fetch, …).
 *
 * Ours, `soci_ts_*`:
 *
 *   soci_ts_fuse_operation_duration_milliseconds  histogram  op            0.0625 … 16384 ms, doubling
 *   soci_ts_fuse_operation_errors_total           counter    op
 *   soci_ts_fuse_native_reads_total               counter    layer         reads answered natively (not timed)
 *   soci_ts_fuse_native_read_bytes_total          counter    layer
 *   soci_ts_layer_fetched_bytes_total             counter    layer         compressed bytes from the registry
 *   soci_ts_layer_fetched_spans_total             counter    layer
 *   soci_ts_layer_spans_local                     gauge      layer         spans in the span cache (backgroundProgress)
 *   soci_ts_layer_spans                           gauge      layer         spans of the layer
 *   soci_ts_layer_complete                        gauge      layer         1 once every span is local, else 0
 *   soci_ts_layer_mode                            gauge      layer, mode, reason   1 for the layer's current mode
 *   soci_ts_span_cache_hits_total                 counter    kind (memory | disk)
 *   soci_ts_span_cache_misses_total               counter    kind
 *   soci_ts_fetch_errors_total                    counter    layer, kind
 *   soci_ts_fetch_retries_total                   counter    operation, cause   one per retried registry request
 *   soci_ts_fuse_manager_info                     gauge      version, build, protocol, current   1 (snapshotter only)
 *
 * plus prom-client's Node process metrics (`process_*`, `nodejs_*`: CPU, RSS, heap, fds,
 * event-loop lag, GC). A layer has exactly one soci_ts_layer_mode series (a new mode replaces
 * the old one); forgetLayer() drops every per-layer series of a layer (the FUSE manager calls it
 * when the layer's last mount goes, the snapshotter when its last snapshot is removed), so that
 * label sets do not grow without bound.
 *
 * Merging two processes. Every sample a sink exports carries the label `process` (the sink's
 * `process` option: `snapshotter` by default, `fuse-manager` for the FUSE-serving process), so
 * the two processes' series never collide, and {@link mergeExpositions} joins their texts family
 * by family: one HELP and one TYPE line per metric name, then the samples of every source. A
 * family that two sources declare with different types keeps the first source's; the other's
 * samples are dropped with a `#` comment line saying so, and so is a series (name and label
 * set) that a later source repeats. The endpoint adds `soci_ts_metrics_source_up{source}`:
 * 1 when the source answered, 0 when it failed or took longer than its timeout (its samples are
 * then missing from that scrape).
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { lstat, mkdir, unlink, chmod } from 'node:fs/promises';
import { socketAnswers } from './server.js';
import { dirname } from 'node:path';
import { createRequire } from 'node:module';
import type { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Logger } from '../fetcher/index.js';

/** prom-client, loaded at the first createMetrics() (not at import: the CLI's other commands start faster). */
type PromClient = typeof import('prom-client');
let promClient: PromClient | undefined;
function loadPromClient(): PromClient {
  return (promClient ??= createRequire(import.meta.url)('prom-client') as PromClient);
}

/** The Prometheus text format's content type (prom-client's `prometheusContentType`). */
export const PROMETHEUS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';

/** Why a layer is served the way it is: a short, stable code (the long story goes to the log). */
export type LayerModeReason =
  /** lazy: the index has a zTOC for the layer. */
  | 'ztoc'
  /** local: the image's index has no zTOC for the layer (indexers skip small layers). */
  | 'no-ztoc'
  /** local: it has a zTOC but is smaller than the daemon's min_layer_size. */
  | 'below-min-size'
  /** local: its zTOC cannot be fetched or does not fit the layer. */
  | 'bad-ztoc'
  /** fallback: no SOCI index for the image. */
  | 'no-index'
  /** fallback: an index was found but cannot be used. */
  | 'bad-index'
  /** fallback: zstd layer (no zTOC upstream either, and the daemon does not unpack zstd). */
  | 'zstd'
  /** fallback: not a layer media type the daemon knows. */
  | 'unsupported-media-type'
  /** fallback: the registry refused the credentials. */
  | 'auth'
  /** fallback: the registry failed while looking for the index. */
  | 'registry-error'
  /** fallback: FUSE cannot be used on this host. */
  | 'fuse-unavailable'
  /** fallback: the index's pull mode (v1 or v2) is disabled by config. */
  | 'mode-disabled'
  /** fallback: the snapshotter's root has no space left (zTOC, download or metadata could not be written). */
  | 'no-space';

export type LayerMode = 'lazy' | 'local' | 'fallback';

/** What the daemon's modules record. Structural: nothing outside this file imports prom-client. */
export interface MetricsSink {
  /** One FUSE operation (`read`, `lookup`, `getattr`, `readdir`, `open`, `readlink`, `getxattr`, …) on a layer. */
  fuseOp(op: string, layer: string, ms: number, ok: boolean): void;
  /** A layer mounted (from Prepare to the mount being ready). */
  mountLatency(layer: string, ms: number): void;
  /** Bytes and spans fetched from the registry for a layer (on demand or in the background). */
  fetched(layer: string, bytes: number, spans: number): void;
  /** A span cache lookup. */
  cache(kind: 'memory' | 'disk', hit: boolean): void;
  /** A failed fetch; `kind` is a short class (`timeout`, `network`, `integrity`, `auth`, `http`, …). */
  fetchError(layer: string, kind: string): void;
  /**
   * One retry of a registry request: `operation` and `cause` are the fetcher's RetryOperation
   * (`manifest`, `blob`, `blob_stream`, `range`, `referrers`, `push`) and RetryCause
   * (`http_5xx`, `http_429`, `http_408`, `connect`, `reset`, `timeout_*`, `integrity`, `protocol`, `other`).
   */
  retry(operation: string, cause: string): void;
  /** The layer now has `local` of its `total` spans in the span cache. */
  backgroundProgress(layer: string, local: number, total: number): void;
  /** Every span of the layer is local. */
  layerComplete(layer: string): void;
  /** How the layer is served, and why (a {@link LayerModeReason} code). */
  layerMode(layer: string, mode: LayerMode, reason: string): void;
  /** The exposition (Prometheus text format 0.0.4) of everything recorded; callable detached (`sources: [sink.text]`). */
  text(): Promise<string>;
  /** Latency of another upstream operation type (`remote_registry_get`, `fuse_mount`, `background_fetch`, …). */
  operation?(operationType: string, layer: string, ms: number): void;
  /** Bytes served to readers from a layer (upstream's `synchronous_bytes_served`). */
  served?(layer: string, bytes: number): void;
  /** An operation on an image (upstream's image_operation_count_key gauge, incremented). */
  imageOperation?(operationType: string, image: string): void;
  /** Drops every per-layer series of the layer. */
  forgetLayer?(layer: string): void;
  /** Reads of a layer answered natively (fs/native-read.ts) since the last report: counted, not timed. */
  nativeReads?(layer: string, reads: number, bytes: number): void;
  /** The FUSE manager the snapshotter drives: its build, and whether it is the snapshotter's own (`current`). */
  fuseManagerInfo?(info: { version: string; build: string; protocol: number; current: boolean }): void;
}

/** Records nothing; `text()` is empty. */
export const nullMetrics: MetricsSink = Object.freeze({
  fuseOp: () => undefined,
  mountLatency: () => undefined,
  fetched: () => undefined,
  cache: () => undefined,
  fetchError: () => undefined,
  retry: () => undefined,
  backgroundProgress: () => undefined,
  layerComplete: () => undefined,
  layerMode: () => undefined,
  text: () => Promise.resolve(''),
  operation: () => undefined,
  served: () => undefined,
  imageOperation: () => undefined,
  forgetLayer: () => undefined,
  nativeReads: () => undefined,
  fuseManagerInfo: () => undefined,
});

export interface CreateMetricsOptions {
  /** Value of the `process` label on every sample (default `snapshotter`). */
  process?: string;
  /** Also export the Node process metrics (default true). */
  processMetrics?: boolean;
}

/** Upstream's buckets: 1 … 16384 ms and 1 … 1024 µs, doubling. */
export const MILLISECOND_BUCKETS: readonly number[] = Object.freeze(Array.from({ length: 15 }, (_, i) => 2 ** i));
export const MICROSECOND_BUCKETS: readonly number[] = Object.freeze(Array.from({ length: 11 }, (_, i) => 2 ** i));
/** Ours for FUSE operations: 1/16 ms … 16384 ms, doubling (FUSE ops from the memory cache take microseconds). */
export const FUSE_OP_BUCKETS: readonly number[] = Object.freeze(Array.from({ length: 19 }, (_, i) => 2 ** (i - 4)));

const FUSE_FAILURE: Readonly<Record<string, string>> = Object.freeze({
  getattr: 'fuse_node_getattr_failure_count',
  fgetattr: 'fuse_file_getattr_failure_count',
  listxattr: 'fuse_node_listxattr_failure_count',
  getxattr: 'fuse_node_listxattr_failure_count',
  lookup: 'fuse_node_lookup_failure_count',
  open: 'fuse_node_open_failure_count',
  opendir: 'fuse_node_readdir_failure_count',
  readdir: 'fuse_node_readdir_failure_count',
  read: 'fuse_file_read_failure_count',
});
const FUSE_UNKNOWN_FAILURE = 'fuse_unknown_operation_failure_count';

/** Longest label value kept (longer ones are cut, so a free-text reason cannot bloat a scrape). */
const MAX_LABEL_CHARS = 200;
const label = (v: string): string => (v.length > MAX_LABEL_CHARS ? v.slice(0, MAX_LABEL_CHARS) : v);

type Labels = Record<string, string>;
/** The parts of a prom-client metric the per-layer bookkeeping uses. */
interface LabeledMetric<C> {
  labels(labels: Labels): C;
  remove(labels: Labels): void;
}
type Observer = { observe(v: number): void };
type Adder = { inc(v?: number): void };
type Setter = { set(v: number): void; inc(v?: number): void };

class PromMetrics implements MetricsSink {
  readonly registry: Registry;
  private readonly opMs: Histogram<'operation_type' | 'layer'>;
  private readonly opUs: Histogram<'operation_type' | 'layer'>;
  private readonly opCount: Counter<'operation_type' | 'layer'>;
  private readonly bytesServed: Gauge<'operation_type' | 'layer'>;
  private readonly imageOps: Gauge<'operation_type' | 'image'>;
  private readonly fuseMs: Histogram<'op'>;
  private readonly fuseErrors: Counter<'op'>;
  private readonly nativeReadCount: Counter<'layer'>;
  private readonly nativeReadBytes: Counter<'layer'>;
  private readonly fetchedBytes: Counter<'layer'>;
  private readonly fetchedSpans: Counter<'layer'>;
  private readonly spansLocal: Gauge<'layer'>;
  private readonly spansTotal: Gauge<'layer'>;
  private readonly complete: Gauge<'layer'>;
  private readonly mode: Gauge<'layer' | 'mode' | 'reason'>;
  private readonly cacheHits: Counter<'kind'>;
  private readonly cacheMisses: Counter<'kind'>;
  private readonly fetchErrors: Counter<'layer' | 'kind'>;
  private readonly retries: Counter<'operation' | 'cause'>;
  private readonly managerInfo: Gauge<'version' | 'build' | 'protocol' | 'current'>;
  /** Label children of the FUSE-op histogram by op (the hot path allocates nothing once warm). */
  private readonly fuseChildren = new Map<string, Observer>();
  /**
   * Every per-layer series this sink made, by layer, then by a key naming metric and labels:
   * the child (cached for the hot path) and what forgetLayer() needs to remove it.
   */
  private readonly perLayer = new Map<string, Map<string, { child: unknown; remove: () => void }>>();
  private readonly modes = new Map<string, { mode: string; reason: string }>();
  private readonly lastLocal = new Map<string, number>();

  constructor(opts: CreateMetricsOptions) {
    const { Registry, Histogram, Counter, Gauge, collectDefaultMetrics } = loadPromClient();
    const r = (this.registry = new Registry());
    r.setDefaultLabels({ process: opts.process ?? 'snapshotter' });
    const registers = [r];
    const perOp = ['operation_type', 'layer'] as const;
    this.opMs = new Histogram({
      name: 'soci_fs_operation_duration_milliseconds',
      help: 'Latency in milliseconds of soci snapshotter operations. Broken down by operation type and layer sha.',
      labelNames: perOp,
      buckets: [...MILLISECOND_BUCKETS],
      registers,
    });
    this.opUs = new Histogram({
      name: 'soci_fs_operation_duration_microseconds',
      help: 'Latency in microseconds of soci snapshotter operations. Broken down by operation type and layer sha.',
      labelNames: perOp,
      buckets: [...MICROSECOND_BUCKETS],
      registers,
    });
    this.opCount = new Counter({
      name: 'soci_fs_operation_count',
      help: 'The count of soci snapshotter operations. Broken down by operation type and layer sha.',
      labelNames: perOp,
      registers,
    });
    this.bytesServed = new Gauge({
      name: 'soci_fs_bytes_served',
      help: 'The number of bytes served per soci snapshotter operations. Broken down by operation type and layer sha.',
      labelNames: perOp,
      registers,
    });
    this.imageOps = new Gauge({
      name: 'soci_fs_image_operation_count_key',
      help: 'The count of soci snapshotter operations. Broken down by operation type and image digest.',
      labelNames: ['operation_type', 'image'],
      registers,
    });
    this.fuseMs = new Histogram({
      name: 'soci_ts_fuse_operation_duration_milliseconds',
      help: 'Latency in milliseconds of FUSE operations on lazily mounted layers, by operation.',
      labelNames: ['op'],
      buckets: [...FUSE_OP_BUCKETS],
      registers,
    });
    this.nativeReadCount = new Counter({
      name: 'soci_ts_fuse_native_reads_total',
      help: 'FUSE reads of a layer answered by the native read path (bytes already inflated in memory), without JavaScript; not in the latency histograms.',
      labelNames: ['layer'],
      registers,
    });
    this.nativeReadBytes = new Counter({ name: 'soci_ts_fuse_native_read_bytes_total', help: 'Bytes of the reads answered by the native read path.', labelNames: ['layer'], registers });
    this.fuseErrors = new Counter({ name: 'soci_ts_fuse_operation_errors_total', help: 'FUSE operations that answered an error, by operation.', labelNames: ['op'], registers });
    this.fetchedBytes = new Counter({ name: 'soci_ts_layer_fetched_bytes_total', help: 'Compressed bytes of a layer fetched from the registry (on demand and in the background).', labelNames: ['layer'], registers });
    this.fetchedSpans = new Counter({ name: 'soci_ts_layer_fetched_spans_total', help: 'Spans of a layer fetched from the registry.', labelNames: ['layer'], registers });
    this.spansLocal = new Gauge({ name: 'soci_ts_layer_spans_local', help: 'Spans of a layer that are in the span cache.', labelNames: ['layer'], registers });
    this.spansTotal = new Gauge({ name: 'soci_ts_layer_spans', help: 'Spans of a lazily mounted layer.', labelNames: ['layer'], registers });
    this.complete = new Gauge({ name: 'soci_ts_layer_complete', help: '1 when every span of the layer is local, else 0.', labelNames: ['layer'], registers });
    this.mode = new Gauge({
      name: 'soci_ts_layer_mode',
      help: 'How a layer is served: 1 for its current mode (lazy: FUSE over its zTOC; local: fetched and unpacked by the daemon; fallback: containerd applies it), with the reason.',
      labelNames: ['layer', 'mode', 'reason'],
      registers,
    });
    this.cacheHits = new Counter({ name: 'soci_ts_span_cache_hits_total', help: 'Span cache lookups that found the span, by cache (memory or disk).', labelNames: ['kind'], registers });
    this.cacheMisses = new Counter({ name: 'soci_ts_span_cache_misses_total', help: 'Span cache lookups that did not find the span, by cache (memory or disk).', labelNames: ['kind'], registers });
    this.fetchErrors = new Counter({ name: 'soci_ts_fetch_errors_total', help: 'Failed fetches from the registry, by layer and kind of failure.', labelNames: ['layer', 'kind'], registers });
    this.retries = new Counter({
      name: 'soci_ts_fetch_retries_total',
      help: 'Retried registry requests, by operation (manifest, blob, blob_stream, range, referrers, push) and cause of the failed attempt.',
      labelNames: ['operation', 'cause'],
      registers,
    });
    this.managerInfo = new Gauge({
      name: 'soci_ts_fuse_manager_info',
      help: 'The FUSE manager the snapshotter drives: 1 for its soci-ts version, build and protocol; current="false" when it is not the snapshotter\'s own build (it predates an upgrade).',
      labelNames: ['version', 'build', 'protocol', 'current'],
      registers,
    });
    if (opts.processMetrics !== false) collectDefaultMetrics({ register: r });
  }

  /** The child of `metric` for `labels` (which include the layer's), made once and remembered under the layer. */
  private series<C>(layer: string, key: string, metric: LabeledMetric<C>, labels: Labels): C {
    let m = this.perLayer.get(layer);
    if (m === undefined) {
      m = new Map();
      this.perLayer.set(layer, m);
    }
    let e = m.get(key);
    if (e === undefined) {
      e = { child: metric.labels(labels), remove: () => metric.remove(labels) };
      m.set(key, e);
    }
    return e.child as C;
  }

  private op<C>(metric: LabeledMetric<C>, name: string, operationType: string, layer: string): C {
    return this.series(layer, `${name}\0${operationType}`, metric, { operation_type: label(operationType), layer: label(layer) });
  }

  private byLayer<C>(metric: LabeledMetric<C>, name: string, layer: string): C {
    return this.series(layer, name, metric, { layer: label(layer) });
  }

  fuseOp(op: string, layer: string, ms: number, ok: boolean): void {
    let h = this.fuseChildren.get(op);
    if (h === undefined) {
      h = this.fuseMs.labels({ op: label(op) });
      this.fuseChildren.set(op, h);
    }
    h.observe(ms);
    if (op === 'read') {
      this.op<Observer>(this.opMs, 'ms', 'synchronous_read', layer).observe(ms);
      this.op<Adder>(this.opCount, 'n', 'synchronous_read_count', layer).inc();
    } else if (op === 'readdir') {
      this.op<Observer>(this.opUs, 'us', 'node_readdir', layer).observe(ms * 1000);
    }
    if (!ok) {
      this.fuseErrors.labels({ op: label(op) }).inc();
      this.op<Adder>(this.opCount, 'n', FUSE_FAILURE[op] ?? FUSE_UNKNOWN_FAILURE, layer).inc();
    }
  }

  mountLatency(layer: string, ms: number): void {
    this.op<Observer>(this.opMs, 'ms', 'mount', layer).observe(ms);
  }

  operation(operationType: string, layer: string, ms: number): void {
    this.op<Observer>(this.opMs, 'ms', operationType, layer).observe(ms);
  }

  nativeReads(layer: string, reads: number, bytes: number): void {
    if (reads <= 0) return;
    this.byLayer<Adder>(this.nativeReadCount, 'native_reads', layer).inc(reads);
    this.byLayer<Adder>(this.nativeReadBytes, 'native_read_bytes', layer).inc(bytes);
    // Reads all the same: upstream's count includes them (its latency histogram cannot).
    this.op<Adder>(this.opCount, 'n', 'synchronous_read_count', layer).inc(reads);
  }

  served(layer: string, bytes: number): void {
    this.op<Setter>(this.bytesServed, 'bytes', 'synchronous_bytes_served', layer).inc(bytes);
  }

  imageOperation(operationType: string, image: string): void {
    this.imageOps.labels({ operation_type: label(operationType), image: label(image) }).inc();
  }

  fetched(layer: string, bytes: number, spans: number): void {
    this.byLayer<Adder>(this.fetchedBytes, 'fetched_bytes', layer).inc(bytes);
    this.byLayer<Adder>(this.fetchedSpans, 'fetched_spans', layer).inc(spans);
  }

  cache(kind: 'memory' | 'disk', hit: boolean): void {
    (hit ? this.cacheHits : this.cacheMisses).labels({ kind }).inc();
  }

  fetchError(layer: string, kind: string): void {
    this.series<Adder>(layer, `fetch_errors\0${kind}`, this.fetchErrors, { layer: label(layer), kind: label(kind) }).inc();
  }

  retry(operation: string, cause: string): void {
    this.retries.labels({ operation: label(operation), cause: label(cause) }).inc();
  }

  backgroundProgress(layer: string, local: number, total: number): void {
    const before = this.lastLocal.get(layer);
    if (before !== undefined && local > before) this.op<Adder>(this.opCount, 'n', 'background_span_fetch_count', layer).inc(local - before);
    this.lastLocal.set(layer, local);
    this.byLayer<Setter>(this.spansLocal, 'spans_local', layer).set(local);
    this.byLayer<Setter>(this.spansTotal, 'spans', layer).set(total);
    this.byLayer<Setter>(this.complete, 'complete', layer).set(total > 0 && local >= total ? 1 : 0);
  }

  layerComplete(layer: string): void {
    this.byLayer<Setter>(this.complete, 'complete', layer).set(1);
  }

  layerMode(layer: string, mode: LayerMode, reason: string): void {
    const r = label(reason);
    const old = this.modes.get(layer);
    if (old !== undefined && old.mode === mode && old.reason === r) return;
    if (old !== undefined) {
      const key = `mode\0${old.mode}\0${old.reason}`;
      this.perLayer.get(layer)?.get(key)?.remove();
      this.perLayer.get(layer)?.delete(key);
    }
    this.modes.set(layer, { mode, reason: r });
    this.series<Setter>(layer, `mode\0${mode}\0${r}`, this.mode, { layer: label(layer), mode, reason: r }).set(1);
    if (mode === 'lazy' && !this.perLayer.get(layer)?.has('complete')) this.byLayer<Setter>(this.complete, 'complete', layer).set(0);
  }

  fuseManagerInfo(info: { version: string; build: string; protocol: number; current: boolean }): void {
    this.managerInfo.reset();
    this.managerInfo.labels({ version: label(info.version), build: label(info.build), protocol: String(info.protocol), current: String(info.current) }).set(1);
  }

  forgetLayer(layer: string): void {
    for (const e of this.perLayer.get(layer)?.values() ?? []) e.remove();
    this.perLayer.delete(layer);
    this.modes.delete(layer);
    this.lastLocal.delete(layer);
  }

  /**
   * A property, so that `sink.text` can be handed over as a metrics source on its own.
   * prom-client writes NaN as `Nan` (e.g. the event-loop lag mean before any sample): fixed here.
   */
  readonly text = async (): Promise<string> => (await this.registry.metrics()).replace(/ Nan$/gm, ' NaN');
}

/** A sink backed by its own prom-client registry (nothing global). */
export function createMetrics(opts: CreateMetricsOptions = {}): MetricsSink {
  return new PromMetrics(opts);
}

// ---------------------------------------------------------------------------------------
// Merging expositions

interface Family {
  name: string;
  help?: string;
  type?: string;
  samples: string[];
  series: Set<string>;
  /** Source index that declared the family first. */
  source: number;
}

const SUFFIXES: Readonly<Record<string, readonly string[]>> = {
  histogram: ['_bucket', '_sum', '_count'],
  summary: ['', '_sum', '_count'],
  counter: ['', '_total'],
};

/**
 * The sample's metric name, its label set in a canonical order, and where the value starts
 * (undefined: not a well-formed sample line).
 */
function seriesOf(line: string): { name: string; key: string; valueAt: number } | undefined {
  const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{|\s)/.exec(line);
  if (m === null) return undefined;
  const name = m[1]!;
  if (m[2] !== '{') return { name, key: name, valueAt: name.length };
  const pairs: string[] = [];
  let i = name.length + 1;
  for (;;) {
    while (line[i] === ' ' || line[i] === ',') i++;
    if (i >= line.length) return undefined;
    if (line[i] === '}') break;
    const eq = line.indexOf('=', i);
    if (eq < 0 || line[eq + 1] !== '"') return undefined;
    const labelName = line.slice(i, eq).trim();
    let j = eq + 2;
    let value = '';
    while (j < line.length && line[j] !== '"') {
      if (line[j] === '\\') j++;
      value += line[j] ?? '';
      j++;
    }
    if (j >= line.length) return undefined;
    pairs.push(`${labelName}=${JSON.stringify(value)}`);
    i = j + 1;
  }
  pairs.sort();
  return { name, key: `${name}{${pairs.join(',')}}`, valueAt: i + 1 };
}

/**
 * Joins Prometheus text expositions so that the result is one valid exposition: one HELP and one
 * TYPE line per metric family, each family's samples together (see the module comment for
 * conflicts). prom-client's `Nan` is written `NaN`.
 */
export function mergeExpositions(texts: readonly string[]): string {
  const families = new Map<string, Family>();
  const notes: string[] = [];
  texts.forEach((text, source) => {
    /** The family the sample lines that follow belong to; null while dropping a conflicting one. */
    let current: Family | null | undefined;
    const familyFor = (name: string): Family => {
      let f = families.get(name);
      if (f === undefined) {
        f = { name, samples: [], series: new Set(), source };
        families.set(name, f);
      }
      return f;
    };
    for (const raw of text.split('\n')) {
      const line = raw.trimEnd();
      if (line === '') continue;
      const meta = /^#\s*(HELP|TYPE)\s+([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\s(.*))?$/.exec(line);
      if (meta !== null) {
        const what = meta[1];
        const name = meta[2]!;
        const rest = meta[3] ?? '';
        const f = familyFor(name);
        if (what === 'TYPE') {
          const type = rest.trim();
          if (f.type !== undefined && f.type !== type) {
            notes.push(`# soci-ts: source ${source} declares ${name} as ${type}, source ${f.source} as ${f.type}: its samples of ${name} are dropped`);
            current = null;
            continue;
          }
          if (f.type === undefined && f.samples.length > 0) {
            notes.push(`# soci-ts: source ${source} declares ${name} as ${type} after samples without a type: its samples of ${name} are dropped`);
            current = null;
            continue;
          }
          f.type = type;
        } else if (f.help === undefined) f.help = rest;
        current = f;
        continue;
      }
      if (line.startsWith('#')) continue;
      if (current === null) continue; // a sample of the family being dropped
      const s = seriesOf(line);
      if (s === undefined) {
        notes.push(`# soci-ts: source ${source}: a line that is not a sample was dropped`);
        continue;
      }
      const suffixes = current === undefined ? undefined : (SUFFIXES[current.type ?? ''] ?? ['']);
      const target = current !== undefined && suffixes!.some((suf) => current!.name + suf === s.name) ? current : familyFor(s.name);
      if (target.series.has(s.key)) {
        notes.push(`# soci-ts: source ${source} repeats the series ${s.key.slice(0, 200)}: dropped`);
        continue;
      }
      target.series.add(s.key);
      const value = line.slice(s.valueAt).replace(/^(\s+)Nan(?=\s|$)/, '$1NaN');
      target.samples.push(line.slice(0, s.valueAt) + value);
    }
  });
  const out: string[] = [];
  for (const f of families.values()) {
    if (f.help !== undefined) out.push(`# HELP ${f.name} ${f.help}`);
    if (f.type !== undefined) out.push(`# TYPE ${f.name} ${f.type}`);
    out.push(...f.samples, '');
  }
  out.push(...notes);
  return out.join('\n') + (notes.length > 0 ? '\n' : '');
}

// ---------------------------------------------------------------------------------------
// The endpoint

/** A source of exposition text: a function, or one with a name for `soci_ts_metrics_source_up`. */
export type MetricsSource = (() => Promise<string>) | { name: string; collect: () => Promise<string>; timeoutMs?: number };

export class MetricsServerError extends Error {
  readonly address: string;
  constructor(address: string, reason: string, options?: { cause?: unknown }) {
    super(`metrics address ${address}: ${reason}`, options);
    this.name = 'MetricsServerError';
    this.address = address;
  }
}

export interface MetricsServer {
  /** Where it listens: `host:port` (the port the kernel chose for port 0) or the socket path. */
  readonly address: string;
  /** `http://host:port/metrics`, or `unix:PATH` for a socket. */
  readonly url: string;
  /** Adds a source to every later scrape (e.g. the FUSE manager once it is up). */
  addSource(source: MetricsSource): void;
  /** Stops listening (and removes the socket file). */
  close(): Promise<void>;
}

export interface MetricsServerOptions {
  logger?: Logger;
  /** Longest wait for one source per scrape (default 5 s). */
  sourceTimeoutMs?: number;
}

/** Parses `host:port`, `[v6]:port` or `/unix/path`. Throws MetricsServerError. */
export function parseMetricsAddress(address: string): { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string } {
  if (address.startsWith('/')) return { kind: 'unix', path: address };
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]\s/]+)):(\d{1,5})$/.exec(address);
  if (m === null) throw new MetricsServerError(address, 'must be HOST:PORT, [IPv6]:PORT, an absolute unix socket path, or "" (off)');
  const port = Number(m[3]);
  if (port > 65535) throw new MetricsServerError(address, `port ${port} is out of range`);
  return { kind: 'tcp', host: m[1] ?? m[2]!, port };
}

function sourceName(s: MetricsSource, i: number): string {
  return typeof s === 'function' ? String(i) : s.name;
}

async function collect(s: MetricsSource, timeoutMs: number): Promise<string> {
  const fn = typeof s === 'function' ? s : s.collect;
  const limit = typeof s === 'function' ? timeoutMs : (s.timeoutMs ?? timeoutMs);
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      fn(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no answer in ${limit} ms`)), limit);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

async function removeStaleSocket(path: string, address: string): Promise<void> {
  await mkdir(dirname(path), { recursive: true, mode: 0o711 });
  const st = await lstat(path).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return undefined;
    throw e;
  });
  if (st === undefined) return;
  if (!st.isSocket()) throw new MetricsServerError(address, 'exists and is not a socket: refusing to replace it');
  if (await socketAnswers(path)) throw new MetricsServerError(address, 'another process is already serving on this socket');
  await unlink(path);
}

/**
 * Serves `GET /metrics` (and HEAD) on `address` (`host:port`, `[v6]:port` or a unix socket
 * path, created mode 0600) as the merge of `sources` (see {@link mergeExpositions}); any other
 * path is 404, another method on /metrics 405. An empty address turns the endpoint off
 * (resolves undefined). Rejects with MetricsServerError when it cannot listen.
 */
export async function startMetricsServer(address: string, sources: ReadonlyArray<MetricsSource>, opts: MetricsServerOptions = {}): Promise<MetricsServer | undefined> {
  if (address === '') return undefined;
  const where = parseMetricsAddress(address);
  const all: MetricsSource[] = [...sources];
  const timeoutMs = opts.sourceTimeoutMs ?? 5000;
  const log = opts.logger;

  const scrape = async (): Promise<string> => {
    const results = await Promise.allSettled(all.map((s) => collect(s, timeoutMs)));
    const texts: string[] = [];
    const up: string[] = [
      '# HELP soci_ts_metrics_source_up 1 when the metrics source answered this scrape, 0 when it failed or timed out.',
      '# TYPE soci_ts_metrics_source_up gauge',
    ];
    results.forEach((r, i) => {
      const name = sourceName(all[i]!, i);
      up.push(`soci_ts_metrics_source_up{source=${JSON.stringify(name)}} ${r.status === 'fulfilled' ? 1 : 0}`);
      if (r.status === 'fulfilled') texts.push(r.value);
      else log?.warn('metrics source failed', { source: name, error: r.reason });
    });
    texts.push(up.join('\n') + '\n');
    return mergeExpositions(texts);
  };

  const handle = (req: IncomingMessage, res: ServerResponse): void => {
    const path = (req.url ?? '/').split('?')[0];
    if (path !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain; charset=utf-8' }).end('not found: the metrics are at /metrics\n');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain; charset=utf-8' }).end('method not allowed\n');
      return;
    }
    scrape().then(
      (body) => {
        res.writeHead(200, { 'content-type': PROMETHEUS_CONTENT_TYPE, 'content-length': Buffer.byteLength(body) });
        res.end(req.method === 'HEAD' ? undefined : body);
      },
      (err: unknown) => {
        log?.error('metrics scrape failed', { error: err });
        res.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' }).end('scrape failed\n');
      },
    );
  };

  const server: Server = createServer(handle);
  server.on('clientError', (_err, socket) => socket.destroy());
  if (where.kind === 'unix') await removeStaleSocket(where.path, address);
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) => reject(new MetricsServerError(address, `cannot listen: ${e.code ?? ''} ${e.message}`.trim(), { cause: e })));
    if (where.kind === 'unix') server.listen(where.path, () => resolve());
    else server.listen(where.port, where.host, () => resolve());
  });
  let bound: string;
  let url: string;
  if (where.kind === 'unix') {
    await chmod(where.path, 0o600);
    bound = where.path;
    url = `unix:${where.path}`;
  } else {
    const a = server.address();
    const port = typeof a === 'object' && a !== null ? a.port : where.port;
    const host = where.host.includes(':') ? `[${where.host}]` : where.host;
    bound = `${host}:${port}`;
    url = `http://${bound}/metrics`;
  }
  log?.info('metrics endpoint serving', { address: bound, url });
  let closing: Promise<void> | undefined;
  return {
    address: bound,
    url,
    addSource: (s) => {
      all.push(s);
    },
    close: () =>
      (closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }).then(async () => {
        if (where.kind === 'unix') await unlink(where.path).catch(() => undefined);
      })),
  };
}

/**
 * The daemon's endpoint at start-up: off for "", else {@link startMetricsServer}. When the
 * address was not configured (the default 127.0.0.1:8000) and cannot be bound, the daemon
 * serves on without metrics and says so in the log; a configured address that cannot be bound
 * is a start-up error (MetricsServerError, naming the address).
 */
export async function startDaemonMetrics(address: string, configured: boolean, sources: ReadonlyArray<MetricsSource>, logger: Logger): Promise<MetricsServer | undefined> {
  if (address === '') {
    logger.info('metrics endpoint off (metrics_address = "")');
    return undefined;
  }
  try {
    return await startMetricsServer(address, sources, { logger });
  } catch (e) {
    if (configured || !(e instanceof MetricsServerError)) throw e;
    logger.warn('metrics endpoint not started: the default address is taken; set metrics_address (or --metrics-address) to another, or "" to turn metrics off', { address, error: e.message });
    return undefined;
  }
}

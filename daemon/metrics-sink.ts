/**
 * What the snapshotter and its FUSE manager report to metrics, as a structural interface: the
 * Prometheus implementation (daemon/metrics.ts, prom-client) matches it without either side
 * importing the other. Every method is optional to call and must never throw into the caller
 * (an implementation that fails logs and goes on).
 */
export type LayerModeName = 'lazy' | 'local' | 'fallback';

export interface FuseManagerInfo {
  version: string;
  build: string;
  protocol: number;
  current: boolean;
}

export interface MetricsSink {
  /** One FUSE operation of a lazily mounted layer. */
  fuseOp(op: string, layer: string, ms: number, ok: boolean): void;
  /** Reads of a layer answered by the native read path (no JavaScript, so no fuseOp), since the last report. */
  nativeReads?(layer: string, reads: number, bytes: number): void;
  /** A lazy layer was mounted (zTOC load + FUSE mount). */
  mountLatency(layer: string, ms: number): void;
  /** Compressed bytes (and spans) fetched from the registry for a layer. */
  fetched(layer: string, bytes: number, spans: number): void;
  /** A cache lookup: `kind` is `memory` or `disk`. */
  cache(kind: string, hit: boolean): void;
  /** A failed fetch for a layer; `kind` classifies it (`timeout`, `registry`, `ztoc`, ...). */
  fetchError(layer: string, kind: string): void;
  /** Background fetch progress of a layer (spans local / total). */
  backgroundProgress(layer: string, local: number, total: number): void;
  /** Every span of the layer is local. */
  layerComplete(layer: string): void;
  /** How a layer is served, and why when it is not lazy. */
  layerMode(layer: string, mode: LayerModeName, reason: string): void;
  /** The FUSE manager in use: its build, and whether it is this snapshotter's (`current`). */
  fuseManagerInfo?(info: FuseManagerInfo): void;
  /** Drops every per-layer series of a layer that nothing serves any more (label sets stay bounded). */
  forgetLayer?(layer: string): void;
  /** Prometheus text exposition of everything recorded (for the FUSE manager's `metrics` call). */
  render?(): Promise<string> | string;
  /** The same, under daemon/metrics.ts's name for it. */
  text?(): Promise<string>;
}

/** Calls a sink method, logging instead of throwing when the sink fails. */
export function safeSink(sink: MetricsSink | undefined, onError: (err: unknown) => void): MetricsSink | undefined {
  if (sink === undefined) return undefined;
  const wrap =
    <A extends unknown[]>(fn: (...a: A) => void) =>
    (...a: A): void => {
      try {
        fn.apply(sink, a);
      } catch (err) {
        onError(err);
      }
    };
  return {
    fuseOp: wrap(sink.fuseOp),
    mountLatency: wrap(sink.mountLatency),
    fetched: wrap(sink.fetched),
    cache: wrap(sink.cache),
    fetchError: wrap(sink.fetchError),
    backgroundProgress: wrap(sink.backgroundProgress),
    layerComplete: wrap(sink.layerComplete),
    layerMode: wrap(sink.layerMode),
    ...(sink.fuseManagerInfo !== undefined ? { fuseManagerInfo: wrap(sink.fuseManagerInfo) } : {}),
    ...(sink.forgetLayer !== undefined ? { forgetLayer: wrap(sink.forgetLayer) } : {}),
    ...(sink.nativeReads !== undefined ? { nativeReads: wrap(sink.nativeReads) } : {}),
    ...(sink.render !== undefined ? { render: () => sink.render!() } : sink.text !== undefined ? { render: () => sink.text!() } : {}),
  };
}

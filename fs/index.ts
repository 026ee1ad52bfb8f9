/**
 * The lazy layer filesystem: a layer's inode table from its zTOC, the span manager (fetch,
 * verify, inflate from checkpoints), the span caches, and the FUSE mount that serves them.
 * Knows nothing of containerd.
 */
export { InodeTable, statOf, statfsOf, isWhiteout, makedev, OPAQUE_XATTR, ROOT_INO, type Node, type NodeKind, type DirEntry, type InodeTableOptions } from './inodes.js';
export { SpanManager, SpanReadError, type SpanSource, type SpanCounters, type SpanManagerOptions, type SpanState } from './spans.js';
export {
  InflatedSpanCache,
  CompressedSpanStore,
  CacheError,
  DEFAULT_INFLATED_CACHE_BYTES,
  DEFAULT_SPAN_STORE_BYTES,
  type InflatedSpanCacheOptions,
  type SpanCacheWatcher,
  type CompressedSpanStoreOptions,
} from './cache.js';
export { LayerFs, FuseError, checkFuse, type LayerFsOptions, type LayerFsCounters, type FuseErrorKind } from './layerfs.js';
export { nativeReadAvailable, threadLocalsReused, type NativeReadStats } from './native-read.js';
export { unpackLayer, removeUnpackLeftovers, UnpackError, type UnpackOptions, type UnpackResult, type UnpackErrorKind } from './unpack.js';
export {
  BackgroundFetcher,
  BackgroundFetchError,
  DEFAULT_BACKGROUND_RATE,
  DEFAULT_BACKGROUND_CONCURRENCY,
  DEFAULT_BACKGROUND_START_DELAY_MS,
  type BackgroundFetchConfig,
  type BackgroundLayerStats,
  type BackgroundTotals,
} from './background.js';

/**
 * The native read path (fs/native/fuse-fast.c): per mount, a table in the binding of every path
 * of the tree with its stat and data extent (registered at mount) and of the layer's inflated
 * spans held in the memory cache, so that a libfuse worker answers getattr (and so lookups) and
 * warm reads itself instead of waking the event loop.
 *
 * Available only when scripts/setup built fs/native into fuse-native's build/Release (the
 * binding then has the soci_fast_* functions); otherwise every read goes to JavaScript as before.
 * SOCI_TS_NATIVE_READ=0 turns it off (for comparisons).
 */
import { createRequire } from 'node:module';
import { dirname } from 'node:path';
import type { FuseStat } from 'fuse-native';
import type { LayerIndex } from '../ztoc/index.js';

interface FastBinding {
  soci_fast_attach(thread: Buffer, spans: Float64Array): number;
  soci_fast_detach(table: number): void;
  soci_fast_tree(table: number, paths: string, stats: Uint32Array, extents: Float64Array): void;
  soci_fast_span(table: number, spanId: number, data: Buffer | null): number;
  soci_fast_hits(table: number, out: Uint32Array): number;
  soci_fast_stats(table: number, out: Float64Array): void;
  soci_locals_reused_count(): number;
}

let binding: FastBinding | null | undefined;

/** fuse-native's loaded binding when it is ours (has the native read path), else null. */
function fastBinding(): FastBinding | null {
  if (binding !== undefined) return binding;
  binding = null;
  if (process.env['SOCI_TS_NATIVE_READ'] === '0') return binding;
  try {
    const require = createRequire(import.meta.url);
    // The same file fuse-native itself loaded (node-gyp-build picks build/Release first), from
    // require's cache: one module instance, one set of tables.
    const load = require('node-gyp-build') as (dir: string) => Record<string, unknown>;
    const b = load(dirname(require.resolve('fuse-native/package.json')));
    if (typeof b['soci_fast_attach'] === 'function') binding = b as unknown as FastBinding;
  } catch {
    binding = null;
  }
  return binding;
}

/** Whether reads of inflated spans are answered natively (the binding was built by scripts/setup). */
export function nativeReadAvailable(): boolean {
  return fastBinding() !== null;
}

/**
 * How many times a new libfuse worker took an ended worker's fuse-native thread locals instead
 * of new ones (fuse-fast.c), over the process; 0 without the binding.
 */
export function threadLocalsReused(): number {
  return fastBinding()?.soci_locals_reused_count() ?? 0;
}

export interface NativeReadStats {
  /** Reads the libfuse workers answered without JavaScript. */
  reads: number;
  bytes: number;
  /** getattrs (and so lookups) answered without JavaScript. */
  attrs: number;
}

/** One path of the mount for {@link NativeReadTable.tree}; `data` for a regular file. */
export interface NativeTreeEntry {
  path: string;
  /** As the JavaScript getattr answers it (times as Dates or ms numbers, as fuse-native takes them). */
  stat: FuseStat;
  data?: { offset: number; size: number };
}

/** A stat time as fuse-native's getattr reads it: ms numbers pass as they are. */
const msOf = (t: Date | number): number => (typeof t === 'number' ? t : t.getTime());

/** fuse-native's stat layout (its getStatArray): 18 uint32, 64-bit values as low, high. */
const STAT_INTS = 18;
function putStat(out: Uint32Array, at: number, st: FuseStat): void {
  const put64 = (i: number, v: number): void => {
    const low = v % 4294967296;
    out[at + i] = low;
    out[at + i + 1] = (v - low) / 4294967296;
  };
  out[at] = st.mode;
  out[at + 1] = st.uid;
  out[at + 2] = st.gid;
  put64(3, st.size);
  out[at + 5] = st.dev;
  out[at + 6] = st.nlink || 1;
  out[at + 7] = st.ino;
  out[at + 8] = st.rdev;
  out[at + 9] = st.blksize;
  put64(10, st.blocks);
  put64(12, msOf(st.atime));
  put64(14, msOf(st.mtime));
  put64(16, msOf(st.ctime));
}

/** One mount's table in the binding. Every method is cheap and synchronous; none does I/O. */
export class NativeReadTable {
  private readonly b: FastBinding;
  private readonly id: number;
  private readonly spanCount: number;
  private readonly hitsOut: Uint32Array;
  private readonly statsOut = new Float64Array(3);
  private detached = false;

  private constructor(b: FastBinding, id: number, spanCount: number) {
    this.b = b;
    this.id = id;
    this.spanCount = spanCount;
    this.hitsOut = new Uint32Array(Math.max(1, spanCount));
  }

  /**
   * A table for the mount whose fuse-native thread buffer is `thread`, over the layer's spans;
   * undefined when the native read path is not available.
   */
  static attach(thread: Buffer, index: LayerIndex): NativeReadTable | undefined {
    const b = fastBinding();
    if (b === null) return undefined;
    const pairs = new Float64Array(index.spans.length * 2);
    for (let i = 0; i < index.spans.length; i++) {
      pairs[2 * i] = index.spans[i]!.uncompressedStart;
      pairs[2 * i + 1] = index.spans[i]!.uncompressedEnd;
    }
    return new NativeReadTable(b, b.soci_fast_attach(thread, pairs), index.spans.length);
  }

  /**
   * Every path of the mount, with its stat and (regular files) its data's extent in the tar:
   * getattr, lookups and reads of these paths are then answered natively (reads while their
   * spans are in memory). The tree must be the mount's whole, unchanging tree.
   */
  tree(entries: readonly NativeTreeEntry[]): void {
    if (this.detached) return;
    const stats = new Uint32Array(entries.length * STAT_INTS);
    const extents = new Float64Array(entries.length * 2).fill(-1);
    const paths = new Array<string>(entries.length);
    for (let i = 0; i < entries.length; i++) {
      const e = entries[i]!;
      paths[i] = e.path;
      putStat(stats, i * STAT_INTS, e.stat);
      if (e.data !== undefined) {
        extents[2 * i] = e.data.offset;
        extents[2 * i + 1] = e.data.size;
      }
    }
    this.b.soci_fast_tree(this.id, paths.join('\0') + '\0', stats, extents);
  }

  /** The span's whole inflated bytes are `data` (kept alive by the table), or no longer in memory. */
  span(spanId: number, data: Buffer | undefined): void {
    if (this.detached || spanId >= this.spanCount) return;
    this.b.soci_fast_span(this.id, spanId, data ?? null);
  }

  /** Spans read natively since the last call (their recency, which the memory cache cannot see). */
  recentlyUsed(): Uint32Array {
    if (this.detached) return this.hitsOut.subarray(0, 0);
    return this.hitsOut.subarray(0, this.b.soci_fast_hits(this.id, this.hitsOut));
  }

  stats(): NativeReadStats {
    if (!this.detached) this.b.soci_fast_stats(this.id, this.statsOut);
    return { reads: this.statsOut[0]!, bytes: this.statsOut[1]!, attrs: this.statsOut[2]! };
  }

  /** Drops the table (idempotent); the spans it held are released. Later reads go to JavaScript. */
  detach(): void {
    if (this.detached) return;
    this.b.soci_fast_stats(this.id, this.statsOut); // the final figures stay readable
    this.b.soci_fast_detach(this.id);
    this.detached = true;
  }
}

/**
 * The native read path (fs/native/fuse-fast.c): per mount, a table in the binding of the files
 * JavaScript has served and of the layer's inflated spans held in the memory cache, so that a
 * libfuse worker answers a warm read itself instead of waking the event loop.
 *
 * Available only when scripts/setup built fs/native into fuse-native's build/Release (the
 * binding then has the soci_fast_* functions); otherwise every read goes to JavaScript as before.
 * SOCI_TS_NATIVE_READ=0 turns it off (for comparisons).
 */
import { createRequire } from 'node:module';
import { dirname } from 'node:path';
import type { LayerIndex } from '../ztoc/index.js';

interface FastBinding {
  soci_fast_attach(thread: Buffer, spans: Float64Array): number;
  soci_fast_detach(table: number): void;
  soci_fast_file(table: number, path: string, dataOffset: number, size: number): void;
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
}

/** One mount's table in the binding. Every method is cheap and synchronous; none does I/O. */
export class NativeReadTable {
  private readonly b: FastBinding;
  private readonly id: number;
  private readonly spanCount: number;
  private readonly hitsOut: Uint32Array;
  private readonly statsOut = new Float64Array(2);
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

  /** The file at `path` (as FUSE names it) holds tar bytes [dataOffset, dataOffset + size). */
  file(path: string, dataOffset: number, size: number): void {
    if (!this.detached) this.b.soci_fast_file(this.id, path, dataOffset, size);
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
    return { reads: this.statsOut[0]!, bytes: this.statsOut[1]! };
  }

  /** Drops the table (idempotent); the spans it held are released. Later reads go to JavaScript. */
  detach(): void {
    if (this.detached) return;
    this.b.soci_fast_stats(this.id, this.statsOut); // the final figures stay readable
    this.b.soci_fast_detach(this.id);
    this.detached = true;
  }
}

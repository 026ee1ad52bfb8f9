/**
 * Random access into a layer through its zTOC: inflate from the checkpoint
 * before an offset (prime the pending bits, preset the window) and cut out the
 * bytes asked for.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { CompressionError, ZtocError, ZtocRangeError } from './errors.js';
import {
  inflateEngine,
  WINDOW_BITS_AUTO,
  WINDOW_BITS_RAW,
  Z_NO_FLUSH,
  Z_OK,
  Z_STREAM_END,
  type InflateEngine,
  type Inflater,
  type InflateStep,
} from './inflate/index.js';
import type { LayerIndex } from './layer-index.js';
import { WINDOW_SIZE, type FileMetadata } from './types.js';

/** Random access to the compressed layer blob (a local file, or later the registry). */
export interface BlobReader {
  /** Exactly the bytes [offset, offset + length) of the blob. */
  read(offset: number, length: number): Promise<Uint8Array>;
}

export class FileBlobReader implements BlobReader {
  private constructor(private readonly handle: FileHandle, readonly path: string, readonly size: number) {}

  static async open(path: string): Promise<FileBlobReader> {
    const handle = await open(path, 'r');
    const { size } = await handle.stat();
    return new FileBlobReader(handle, path, size);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const buf = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.handle.read(buf, done, length - done, offset + done);
      if (bytesRead === 0) {
        throw new ZtocRangeError(this.path, `blob ends at ${offset + done}, reading [${offset}, +${length})`);
      }
      done += bytesRead;
    }
    return buf;
  }

  close(): Promise<void> {
    return this.handle.close();
  }
}

/** Scratch space for bytes inflated only to be skipped. One per process: inflation is synchronous. */
const discard = new Uint8Array(1 << 16);
const GZIP_TRAILER = 8;

/**
 * Inflates one span from its checkpoint, forwards only: each `fill` call writes the next bytes
 * of the span's uncompressed data. Callers that need a span's first bytes soon (a FUSE read) can
 * take them before the rest is inflated. Owns a zlib stream: call `close()` when done.
 */
export class SpanInflater {
  /** Uncompressed bytes of the span produced so far (relative to the span's start). */
  produced = 0;
  /** The span's uncompressed length. */
  readonly length: number;
  private readonly inflater: Inflater | undefined;
  private pos = 0;
  private raw = true; // until the first member end: raw mode does not consume the gzip trailer
  private ended = false;

  constructor(
    private readonly index: LayerIndex,
    readonly spanId: number,
    private readonly compressed: Uint8Array,
    engine: InflateEngine = inflateEngine(),
    /** Bytes to produce; default the span's own length (more reads on into the next spans, if `compressed` holds them). */
    length?: number,
  ) {
    const span = index.spans[spanId];
    if (span === undefined) throw new ZtocRangeError(index.subject, `no span ${spanId}`);
    this.length = length ?? span.uncompressedEnd - span.uncompressedStart;
    if (!index.compressed) {
      if (compressed.length < this.length) {
        throw new ZtocRangeError(index.subject, `span ${spanId}: ${compressed.length} bytes given, the span has ${this.length}`);
      }
      return;
    }
    const cp = index.checkpoints[spanId];
    const inflater = engine.create(WINDOW_BITS_RAW);
    try {
      if (cp.bits > 0) {
        inflater.prime(cp.bits, compressed[0] >> (8 - cp.bits));
        this.pos = 1;
      }
      inflater.setDictionary(cp.window.subarray(0, WINDOW_SIZE));
    } catch (err) {
      inflater.close();
      throw err;
    }
    this.inflater = inflater;
  }

  /**
   * Writes the span's next bytes into out[outStart, outEnd) and returns how many; fewer than
   * asked only at the span's end. Throws CompressionError on corrupt or short data.
   */
  fill(out: Uint8Array, outStart: number, outEnd: number): number {
    const want = Math.min(outEnd - outStart, this.length - this.produced);
    if (want <= 0) return 0;
    if (this.inflater === undefined) return this.copyStored(out, outStart, want);
    let written = 0;
    while (written < want && !this.ended) {
      const step = this.inflater.inflate(this.compressed, this.pos, this.compressed.length, out, outStart + written, outStart + want, Z_NO_FLUSH);
      written += step.produced;
      if (!this.afterStep(step)) break;
    }
    return this.finishFill(written, want);
  }

  /**
   * `fill` with the inflation on the engine's thread (inflateAsync), so that the event loop
   * goes on meanwhile; the same as `fill` where the engine has none. out[outStart, outEnd)
   * must not be read until it settles (bytes before outStart may be).
   */
  async fillAsync(out: Uint8Array, outStart: number, outEnd: number): Promise<number> {
    const inflateAsync = this.inflater?.inflateAsync;
    if (inflateAsync === undefined) return this.fill(out, outStart, outEnd);
    const want = Math.min(outEnd - outStart, this.length - this.produced);
    if (want <= 0) return 0;
    let written = 0;
    while (written < want && !this.ended) {
      const step = await inflateAsync(this.compressed, this.pos, this.compressed.length, out, outStart + written, outStart + want, Z_NO_FLUSH);
      written += step.produced;
      if (!this.afterStep(step)) break;
    }
    return this.finishFill(written, want);
  }

  /** Whether fillAsync inflates on another thread (else it is fill, on this one). */
  get offThread(): boolean {
    return this.inflater?.inflateAsync !== undefined;
  }

  /** A stored (uncompressed) layer's span: a copy. */
  private copyStored(out: Uint8Array, outStart: number, want: number): number {
    out.set(this.compressed.subarray(this.produced, this.produced + want), outStart);
    this.produced += want;
    return want;
  }

  /** Accounts for one inflate step: false when the loop must stop (input used up). */
  private afterStep(step: InflateStep): boolean {
    this.pos += step.consumed;
    if (step.status === Z_STREAM_END) {
      if (this.raw) {
        this.pos += GZIP_TRAILER;
        this.raw = false;
      }
      if (this.pos >= this.compressed.length) {
        this.ended = true;
        return false;
      }
      this.inflater!.reset(WINDOW_BITS_AUTO); // the next member, header and all
      return true;
    }
    const stalled = step.consumed === 0 && step.produced === 0;
    if (stalled && this.pos >= this.compressed.length) return false; // out of input: reported by finishFill
    if (step.status !== Z_OK || stalled) {
      const span = this.index.spans[this.spanId]!;
      throw new CompressionError(
        this.index.subject,
        `corrupt deflate data in span ${this.spanId} (zlib status ${step.status}) near compressed offset ${span.compressedStart + this.pos}`,
      );
    }
    return true;
  }

  private finishFill(written: number, want: number): number {
    this.produced += written;
    if (written < want) {
      const span = this.index.spans[this.spanId]!;
      throw new CompressionError(
        this.index.subject,
        `span ${this.spanId}: compressed data ended after ${this.produced} of ${this.length} bytes at uncompressed offset ${span.uncompressedStart + this.produced}`,
      );
    }
    return written;
  }

  /** Inflates and drops `n` bytes (to reach an offset inside the span). */
  skip(n: number): void {
    while (n > 0) {
      const got = this.fill(discard, 0, Math.min(n, discard.length));
      if (got === 0) break;
      n -= got;
    }
  }

  close(): void {
    this.inflater?.close();
  }
}

/**
 * Inflate `length` bytes at uncompressed `offset` (inside span `spanId`, possibly running into the
 * following spans' data if `compressed` holds it) from the span's checkpoint.
 */
export function inflateFromSpan(
  index: LayerIndex,
  spanId: number,
  compressed: Uint8Array,
  offset: number,
  length: number,
  out: Uint8Array = new Uint8Array(length),
  outStart = 0,
  engine: InflateEngine = inflateEngine(),
): Uint8Array {
  const span = index.spans[spanId];
  if (offset < span.uncompressedStart) {
    throw new ZtocRangeError(index.subject, `offset ${offset} lies before span ${spanId}`);
  }
  if (!index.compressed) {
    const from = offset - span.uncompressedStart;
    if (from + length > compressed.length) {
      throw new ZtocRangeError(index.subject, `range [${offset}, +${length}) runs past the data given for span ${spanId}`);
    }
    out.set(compressed.subarray(from, from + length), outStart);
    return out;
  }
  // A range may run past the span's own end into the next spans' data (the stream goes on).
  const inflater = new SpanInflater(index, spanId, compressed, engine, offset - span.uncompressedStart + length);
  try {
    inflater.skip(offset - span.uncompressedStart);
    inflater.fill(out, outStart, outStart + length);
    return out;
  } finally {
    inflater.close();
  }
}

/** A range to read must lie inside the uncompressed archive. */
function checkRange(index: LayerIndex, offset: number, length: number): void {
  const size = index.ztoc.uncompressedArchiveSize;
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
    throw new ZtocRangeError(index.subject, `range [${offset}, +${length}) is outside the ${size}-byte archive`);
  }
}

/** Extract uncompressed bytes [offset, offset + length) of the layer. */
export async function extractRange(
  index: LayerIndex,
  blob: BlobReader,
  offset: number,
  length: number,
  engine?: InflateEngine,
): Promise<Uint8Array> {
  checkRange(index, offset, length);
  if (length === 0) return new Uint8Array(0);
  const first = index.spanFor(offset);
  const last = index.spanFor(offset + length - 1);
  const start = index.spans[first].compressedStart;
  const end = index.spans[last].compressedEnd;
  const compressed = await blob.read(start, end - start);
  return inflateFromSpan(index, first, compressed, offset, length, undefined, 0, engine);
}

/** The data of a regular file entry. */
export async function extractFile(index: LayerIndex, blob: BlobReader, entry: FileMetadata, engine?: InflateEngine): Promise<Uint8Array> {
  if (entry.type !== 'reg') {
    throw new ZtocError(index.subject, `${JSON.stringify(entry.name)} is a ${entry.type}, not a regular file`);
  }
  return extractRange(index, blob, entry.uncompressedOffset, entry.uncompressedSize, engine);
}

/**
 * Reads through a small cache of whole inflated spans, so that reading many
 * files in offset order inflates each span once (e.g. extracting a layer).
 */
export class LayerReader {
  private readonly cache = new Map<number, Uint8Array>();

  constructor(
    readonly index: LayerIndex,
    private readonly blob: BlobReader,
    private readonly options: { cacheSpans?: number; engine?: InflateEngine } = {},
  ) {}

  private async span(id: number): Promise<Uint8Array> {
    const hit = this.cache.get(id);
    if (hit) {
      this.cache.delete(id); // re-insert: Map order is our LRU order
      this.cache.set(id, hit);
      return hit;
    }
    const s = this.index.spans[id];
    const compressed = await this.blob.read(s.compressedStart, s.compressedEnd - s.compressedStart);
    const data = inflateFromSpan(this.index, id, compressed, s.uncompressedStart, s.uncompressedEnd - s.uncompressedStart, undefined, 0, this.options.engine);
    this.cache.set(id, data);
    const limit = this.options.cacheSpans ?? 8;
    while (this.cache.size > limit) this.cache.delete(this.cache.keys().next().value as number);
    return data;
  }

  async readRange(offset: number, length: number): Promise<Uint8Array> {
    checkRange(this.index, offset, length);
    const out = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const at = offset + done;
      const id = this.index.spanFor(at);
      const data = await this.span(id);
      const from = at - this.index.spans[id].uncompressedStart;
      const n = Math.min(length - done, data.length - from);
      if (n <= 0) throw new ZtocRangeError(this.index.subject, `span ${id} does not reach offset ${at}`);
      out.set(data.subarray(from, from + n), done);
      done += n;
    }
    return out;
  }

  async readFile(entry: FileMetadata): Promise<Uint8Array> {
    if (entry.type !== 'reg') {
      throw new ZtocError(this.index.subject, `${JSON.stringify(entry.name)} is a ${entry.type}, not a regular file`);
    }
    return this.readRange(entry.uncompressedOffset, entry.uncompressedSize);
  }
}

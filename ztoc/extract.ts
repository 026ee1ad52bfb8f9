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
 * Inflate `length` bytes at uncompressed `offset` from `compressed`, which holds
 * the blob from span `spanId`'s compressed start onwards (at least up to the
 * end of the last span the range touches). Writes into `out` at `outStart`.
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
  const cp = index.checkpoints[spanId];
  const inflater = engine.create(WINDOW_BITS_RAW);
  try {
    let pos = 0;
    if (cp.bits > 0) {
      inflater.prime(cp.bits, compressed[0] >> (8 - cp.bits));
      pos = 1;
    }
    inflater.setDictionary(cp.window.subarray(0, WINDOW_SIZE));
    let skip = offset - cp.out;
    let written = 0;
    let raw = true; // until the first member end: raw mode does not consume the gzip trailer
    while (written < length) {
      const target = skip > 0 ? discard : out;
      const tStart = skip > 0 ? 0 : outStart + written;
      const tEnd = skip > 0 ? Math.min(skip, discard.length) : outStart + length;
      const step = inflater.inflate(compressed, pos, compressed.length, target, tStart, tEnd, Z_NO_FLUSH);
      pos += step.consumed;
      if (skip > 0) skip -= step.produced;
      else written += step.produced;
      if (step.status === Z_STREAM_END) {
        if (raw) {
          pos += GZIP_TRAILER;
          raw = false;
        }
        if (pos >= compressed.length) break;
        inflater.reset(WINDOW_BITS_AUTO); // the next member, header and all
        continue;
      }
      const stalled = step.consumed === 0 && step.produced === 0;
      if (stalled && pos >= compressed.length) break; // out of input: reported below
      if (step.status !== Z_OK || stalled) {
        throw new CompressionError(
          index.subject,
          `corrupt deflate data in span ${spanId} (zlib status ${step.status}) near compressed offset ${span.compressedStart + pos}`,
        );
      }
    }
    if (written < length) {
      throw new CompressionError(
        index.subject,
        `span ${spanId}: compressed data ended after ${written} of ${length} bytes at uncompressed offset ${offset}`,
      );
    }
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

/**
 * Build a zTOC from a layer blob in one streaming pass: inflate (stopping at
 * every deflate block boundary to place checkpoints), index the tar, and hash
 * each span's compressed bytes, all from the same read of the blob.
 */
import { createHash, type Hash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { encodeCheckpointBlob, type Checkpoint } from './checkpoints.js';
import { CompressionError, TarFormatError, ZtocError } from './errors.js';
import { encodeTarZinfo } from './flatbuf.js';
import {
  inflateEngine,
  WINDOW_BITS_AUTO,
  Z_BLOCK,
  Z_BUF_ERROR,
  Z_OK,
  Z_STREAM_END,
  type InflateEngine,
} from './inflate/index.js';
import { LayerIndex } from './layer-index.js';
import { TarIndexer } from './tar.js';
import { DEFAULT_SPAN_SIZE, WINDOW_SIZE, ZTOC_VERSION, type CompressionAlgorithm, type Ztoc } from './types.js';

export const DEFAULT_BUILD_TOOL = 'soci-ts v0.1.0';

export interface BuildOptions {
  /** Names the layer in errors. */
  source: string;
  /** Uncompressed bytes between checkpoints (default 4 MiB). */
  spanSize?: number;
  buildToolIdentifier?: string;
  /** Refuse layers with more tar entries than this (bounded memory). */
  maxEntries?: number;
  engine?: InflateEngine;
  /** Called with the number of compressed bytes read so far. */
  onProgress?: (compressedBytes: number) => void;
}

/** Uncompressed output buffer: 32 KiB of history (the next checkpoint's window) + room to inflate into. */
const OUTPUT_SIZE = WINDOW_SIZE + (1 << 20);
const GZIP_MAGIC_0 = 0x1f;
const GZIP_MAGIC_1 = 0x8b;
const ZSTD_MAGIC = [0x28, 0xb5, 0x2f, 0xfd];

export async function buildZtocFromFile(path: string, options: Partial<BuildOptions> = {}): Promise<Ztoc> {
  const stream = createReadStream(path, { highWaterMark: 1 << 20 });
  return buildZtoc(stream, { source: path, ...options });
}

/** Build a zTOC from a layer blob delivered as a stream of chunks. */
export async function buildZtoc(input: AsyncIterable<Uint8Array>, options: BuildOptions): Promise<Ztoc> {
  const spanSize = options.spanSize ?? DEFAULT_SPAN_SIZE;
  if (!Number.isSafeInteger(spanSize) || spanSize < 1) {
    throw new ZtocError(options.source, `span size must be a positive integer, got ${spanSize}`);
  }
  const iterator = input[Symbol.asyncIterator]();
  // Look at the first bytes to tell gzip from plain tar (upstream's "uncompressed").
  const first = await iterator.next();
  const head = first.done ? new Uint8Array(0) : first.value;
  const chunks = prepend(head, iterator);
  let algorithm: CompressionAlgorithm;
  if (head.length >= 2 && head[0] === GZIP_MAGIC_0 && head[1] === GZIP_MAGIC_1) algorithm = 'gzip';
  else if (head.length >= 4 && ZSTD_MAGIC.every((b, i) => head[i] === b)) {
    throw new ZtocError(options.source, 'zstd layers are not supported (no zTOC format for them)');
  } else algorithm = 'uncompressed';
  const state = algorithm === 'gzip' ? await indexGzip(chunks, options, spanSize) : await indexTar(chunks, options, spanSize);
  const ztoc: Ztoc = {
    version: ZTOC_VERSION,
    buildToolIdentifier: options.buildToolIdentifier ?? DEFAULT_BUILD_TOOL,
    compressedArchiveSize: state.compressedSize,
    uncompressedArchiveSize: state.archiveSize,
    files: state.files,
    compressionInfo: {
      algorithm,
      maxSpanId: state.spanDigests.length - 1,
      spanDigests: state.spanDigests,
      checkpoints: state.checkpoints,
    },
  };
  // The same checks a reader applies (names inside the root, offsets inside the archive).
  new LayerIndex(ztoc, options.source);
  return ztoc;
}

interface IndexResult {
  compressedSize: number;
  archiveSize: number;
  files: Ztoc['files'];
  spanDigests: string[];
  checkpoints: Uint8Array;
}

async function* prepend(head: Uint8Array, rest: AsyncIterator<Uint8Array>): AsyncGenerator<Uint8Array> {
  if (head.length > 0) yield head;
  for (;;) {
    const next = await rest.next();
    if (next.done) return;
    if (next.value.length > 0) yield next.value;
  }
}

function digestOf(hash: Hash): string {
  return `sha256:${hash.digest('hex')}`;
}

/** Plain tar: spans are fixed slices of the blob. */
async function indexTar(chunks: AsyncIterable<Uint8Array>, options: BuildOptions, spanSize: number): Promise<IndexResult> {
  const tar = new TarIndexer({ source: options.source, maxEntries: options.maxEntries });
  const spanDigests: string[] = [];
  let hash = createHash('sha256');
  let inSpan = 0;
  let total = 0;
  for await (const chunk of chunks) {
    tar.push(chunk, 0, chunk.length);
    let pos = 0;
    while (pos < chunk.length) {
      const take = Math.min(chunk.length - pos, spanSize - inSpan);
      hash.update(chunk.subarray(pos, pos + take));
      pos += take;
      inSpan += take;
      if (inSpan === spanSize) {
        spanDigests.push(digestOf(hash));
        hash = createHash('sha256');
        inSpan = 0;
      }
    }
    total += chunk.length;
    options.onProgress?.(total);
  }
  if (inSpan > 0) spanDigests.push(digestOf(hash));
  const { entries, archiveSize } = tar.finish();
  return { compressedSize: total, archiveSize, files: entries, spanDigests, checkpoints: encodeTarZinfo(spanSize, total) };
}

/**
 * Gzip: inflate with Z_BLOCK and apply upstream's checkpoint rule at each
 * stop: a block boundary that is not the end of a member's last block, when
 * nothing was output yet or more than `spanSize` bytes were output since the
 * previous checkpoint.
 */
async function indexGzip(chunks: AsyncIterable<Uint8Array>, options: BuildOptions, spanSize: number): Promise<IndexResult> {
  const { source } = options;
  const engine = options.engine ?? inflateEngine();
  const tar = new TarIndexer({ source, maxEntries: options.maxEntries });
  const inflater = engine.create(WINDOW_BITS_AUTO);
  // The first WINDOW_SIZE bytes hold history (zeros at first, as upstream's window).
  const out = new Uint8Array(OUTPUT_SIZE);
  let outPos = WINDOW_SIZE;
  const checkpoints: Checkpoint[] = [];
  const spanDigests: string[] = [];
  let hash: Hash | undefined; // the current span's hash; none before checkpoint 0
  let totin = 0;
  let totout = 0;
  let last = 0;
  let memberEnded = false;
  let nextMemberAt = -1; // compressed offset where the member being started began, until its header is read
  let lastByteOfPreviousChunk = 0;
  let tarError: TarFormatError | undefined;
  try {
    for await (const chunk of chunks) {
      let pos = 0;
      let hashedTo = 0; // bytes of this chunk already fed to `hash`
      while (pos < chunk.length) {
        if (memberEnded) {
          // Concatenated members (pigz and friends): start the next one.
          inflater.reset(WINDOW_BITS_AUTO);
          memberEnded = false;
          nextMemberAt = totin;
        }
        if (outPos === out.length) {
          out.copyWithin(0, outPos - WINDOW_SIZE, outPos);
          outPos = WINDOW_SIZE;
        }
        const step = inflater.inflate(chunk, pos, chunk.length, out, outPos, out.length, Z_BLOCK);
        const { status, consumed, produced, dataType } = step;
        if (produced > 0 && !tarError) {
          try {
            tar.push(out, outPos, outPos + produced);
          } catch (err) {
            // Garbage in the tar is often a corrupt gzip stream underneath: keep
            // inflating to find out, and report the deeper cause if there is one.
            if (!(err instanceof TarFormatError)) throw err;
            tarError = err;
          }
        }
        pos += consumed;
        totin += consumed;
        outPos += produced;
        totout += produced;
        if (status === Z_STREAM_END) {
          memberEnded = true;
          continue;
        }
        if (status !== Z_OK && !(status === Z_BUF_ERROR && consumed === 0 && produced === 0)) {
          if (nextMemberAt >= 0) {
            throw new CompressionError(source, `the bytes after the gzip member ending at compressed offset ${nextMemberAt} are not a gzip member`);
          }
          throw new CompressionError(source, `corrupt gzip stream near compressed offset ${totin} (zlib status ${status})`, {
            cause: tarError,
          });
        }
        if ((dataType & 128) !== 0) nextMemberAt = -1;
        if (status === Z_BUF_ERROR && outPos < out.length) break; // needs more input
        if ((dataType & 128) !== 0 && (dataType & 64) === 0 && (totout === 0 || totout - last > spanSize)) {
          const bits = dataType & 7;
          if (hash) {
            hash.update(chunk.subarray(hashedTo, pos));
            spanDigests.push(digestOf(hash));
          }
          hashedTo = pos;
          hash = createHash('sha256');
          // A span starts at the byte holding its first bits (`in - 1` when bits > 0).
          if (bits > 0) hash.update(pos > 0 ? chunk.subarray(pos - 1, pos) : Uint8Array.of(lastByteOfPreviousChunk));
          checkpoints.push({ in: totin, out: totout, bits, window: out.slice(outPos - WINDOW_SIZE, outPos) });
          last = totout;
        }
      }
      if (hash) hash.update(chunk.subarray(hashedTo));
      lastByteOfPreviousChunk = chunk[chunk.length - 1];
      options.onProgress?.(totin);
    }
  } finally {
    inflater.close();
  }
  if (!memberEnded) {
    throw new CompressionError(source, `truncated gzip stream: ended at compressed offset ${totin} inside a member`, {
      cause: tarError,
    });
  }
  if (tarError) throw tarError;
  if (!hash || checkpoints.length === 0) throw new CompressionError(source, 'gzip stream has no deflate data');
  spanDigests.push(digestOf(hash));
  const { entries, archiveSize } = tar.finish();
  return {
    compressedSize: totin,
    archiveSize,
    files: entries,
    spanDigests,
    checkpoints: encodeCheckpointBlob(spanSize, checkpoints),
  };
}

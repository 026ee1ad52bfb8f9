/**
 * zTOC and SOCI index formats: build a zTOC from a layer, (de)serialize it,
 * read ranges of the layer through it, and build/parse SOCI index manifests.
 * Pure: bytes in, structures out (the only I/O is reading local files given
 * by path).
 */
export * from './types.js';
export * from './errors.js';
export { encodeZtoc, decodeZtoc, encodeTarZinfo, decodeTarZinfo, type TarZinfo } from './flatbuf.js';
export { encodeCheckpointBlob, decodeCheckpointBlob, CHECKPOINT_SIZE, type Checkpoint, type CheckpointIndex } from './checkpoints.js';
export { buildZtoc, buildZtocFromFile, DEFAULT_BUILD_TOOL, type BuildOptions } from './build.js';
export { DEFAULT_MAX_ENTRIES, TarIndexer, parseModTime, parseOctal as parseTarOctal, parseNumeric as parseTarNumber, type TarIndexerOptions } from './tar.js';
export { LayerIndex, type Span } from './layer-index.js';
export { extractRange, extractFile, inflateFromSpan, SpanInflater, FileBlobReader, LayerReader, type BlobReader } from './extract.js';
export { normalizeName, unsafeNameReason } from './names.js';
export { ztocInfo, fileSpans, modeString, type ZtocInfo } from './info.js';
export { inflateEngine, availableEngines, type InflateEngine } from './inflate/index.js';
export * from './soci-index.js';

import { decodeZtoc } from './flatbuf.js';
import { LayerIndex } from './layer-index.js';

/** Decode and validate a serialized zTOC in one step. */
export function readZtoc(bytes: Uint8Array, subject = 'zTOC'): LayerIndex {
  return new LayerIndex(decodeZtoc(bytes, subject), subject);
}

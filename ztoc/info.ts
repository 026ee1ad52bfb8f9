/** A summary of a zTOC for people: `soci-ts ztoc info` and `ztoc list`. */
import type { LayerIndex } from './layer-index.js';
import type { FileMetadata } from './types.js';

export interface ZtocInfo {
  version: string;
  build_tool: string;
  /** Size of the serialized zTOC in bytes. */
  size: number;
  compression: string;
  compressed_archive_size: number;
  uncompressed_archive_size: number;
  span_size: number;
  num_spans: number;
  num_files: number;
  num_multi_span_files: number;
  spans: Array<{
    id: number;
    compressed_start: number;
    compressed_end: number;
    uncompressed_start: number;
    uncompressed_end: number;
    bits: number;
    digest: string;
  }>;
  files: Array<{ filename: string; offset: number; size: number; type: string; start_span: number; end_span: number }>;
}

/** The spans holding the first and last byte of an entry's data (its start span when empty). */
export function fileSpans(index: LayerIndex, f: FileMetadata): [number, number] {
  if (index.spans.length === 0 || f.uncompressedOffset >= index.ztoc.uncompressedArchiveSize) return [0, 0];
  const start = index.spanFor(f.uncompressedOffset);
  const end = f.uncompressedSize > 0 ? index.spanFor(f.uncompressedOffset + f.uncompressedSize - 1) : start;
  return [start, end];
}

export function ztocInfo(index: LayerIndex, serializedSize: number): ZtocInfo {
  const z = index.ztoc;
  let multi = 0;
  const files = z.files.map((f) => {
    const [start, end] = fileSpans(index, f);
    if (start !== end) multi++;
    return { filename: f.name, offset: f.uncompressedOffset, size: f.uncompressedSize, type: f.type, start_span: start, end_span: end };
  });
  return {
    version: z.version,
    build_tool: z.buildToolIdentifier,
    size: serializedSize,
    compression: z.compressionInfo.algorithm,
    compressed_archive_size: z.compressedArchiveSize,
    uncompressed_archive_size: z.uncompressedArchiveSize,
    span_size: index.spanSize,
    num_spans: index.spans.length,
    num_files: z.files.length,
    num_multi_span_files: multi,
    spans: index.spans.map((s) => ({
      id: s.id,
      compressed_start: s.compressedStart,
      compressed_end: s.compressedEnd,
      uncompressed_start: s.uncompressedStart,
      uncompressed_end: s.uncompressedEnd,
      bits: index.checkpoints[s.id]?.bits ?? 0,
      digest: z.compressionInfo.spanDigests[s.id],
    })),
    files,
  };
}

const TYPE_CHARS: Record<string, string> = { reg: '-', hardlink: 'h', symlink: 'l', char: 'c', block: 'b', dir: 'd', fifo: 'p' };

/** `tar -tv`-like permission string, e.g. `drwxr-xr-x`. */
export function modeString(f: FileMetadata): string {
  const m = f.mode;
  const bit = (mask: number, c: string): string => (m & mask ? c : '-');
  const exec = (x: number, special: number, set: string, unset: string): string =>
    m & special ? (m & x ? set : unset) : m & x ? 'x' : '-';
  return (
    TYPE_CHARS[f.type] +
    bit(0o400, 'r') + bit(0o200, 'w') + exec(0o100, 0o4000, 's', 'S') +
    bit(0o040, 'r') + bit(0o020, 'w') + exec(0o010, 0o2000, 's', 'S') +
    bit(0o004, 'r') + bit(0o002, 'w') + exec(0o001, 0o1000, 't', 'T')
  );
}

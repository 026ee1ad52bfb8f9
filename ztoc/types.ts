/** The data model of a zTOC, independent of its flatbuffers encoding. */

/** Entry types as upstream spells them in `FileMetadata.type`. */
export type FileType = 'reg' | 'hardlink' | 'symlink' | 'char' | 'block' | 'dir' | 'fifo';

export const FILE_TYPES: readonly FileType[] = ['reg', 'hardlink', 'symlink', 'char', 'block', 'dir', 'fifo'];

export interface FileMetadata {
  /** The header's name as written, after PAX / GNU long-name resolution. */
  name: string;
  type: FileType;
  /** Offset of the entry's data (just past its header blocks) in the uncompressed tar stream. */
  uncompressedOffset: number;
  /** The header's size field. */
  uncompressedSize: number;
  linkname: string;
  /** The header's raw mode field. */
  mode: number;
  uid: number;
  gid: number;
  uname: string;
  gname: string;
  /** RFC 3339 text, e.g. `2024-05-01T10:20:30.5Z`. */
  modTime: string;
  devmajor: number;
  devminor: number;
  /**
   * All PAX records of the entry, sorted by key (upstream calls these "xattrs").
   * Keys are text; values are *byte strings* (one char per byte, latin1) so that
   * binary xattr values (e.g. security.capability) survive: use `paxValueBytes`
   * or `paxValueText` to read them.
   */
  paxRecords: Array<[string, string]>;
}

export type CompressionAlgorithm = 'gzip' | 'uncompressed';

export interface CompressionInfo {
  algorithm: CompressionAlgorithm;
  /** Number of spans − 1 (−1 for an empty uncompressed layer). */
  maxSpanId: number;
  /** `sha256:<hex>` of each span's compressed bytes. */
  spanDigests: string[];
  /** The gzip checkpoint blob, or the flatbuffer `TarZinfo` for uncompressed layers. */
  checkpoints: Uint8Array;
}

export interface Ztoc {
  version: string;
  buildToolIdentifier: string;
  compressedArchiveSize: number;
  uncompressedArchiveSize: number;
  files: FileMetadata[];
  compressionInfo: CompressionInfo;
}

export const ZTOC_VERSION = '0.9';
export const DEFAULT_SPAN_SIZE = 1 << 22;
/** Size of the deflate window carried by each checkpoint. */
export const WINDOW_SIZE = 32768;

/** The raw bytes of a PAX record value. */
export function paxValueBytes(value: string): Uint8Array {
  return Buffer.from(value, 'latin1');
}

/** A PAX record value as UTF-8 text (PAX says values are UTF-8, xattr values need not be). */
export function paxValueText(value: string): string {
  return Buffer.from(value, 'latin1').toString('utf8');
}

/** Turn bytes into the byte-string form used for PAX values. */
export function paxValueFromBytes(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('latin1');
}

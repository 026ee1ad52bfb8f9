/**
 * Unpacks a layer blob into a plain directory in overlayfs format, as containerd's overlay
 * applier does (`archive.Apply` with `OverlayConvertWhiteout`): for layers that are not
 * mounted lazily (no zTOC), stacked as an overlay lowerdir beside the FUSE layers, and for the
 * containerd snapshotter.
 *
 * The blob streams through: sha256 of the blob bytes (checked against `digest` at the end) →
 * node:zlib gunzip (for `+gzip` media types) → sha256 of the tar (the diffID) → a tar walk whose
 * headers are parsed by ztoc's TarIndexer → the file system. Regular files are written as their
 * bytes arrive, never buffered whole. Everything goes into `dest.tmp-<random>`, renamed to
 * `dest` only when complete and verified; on any failure the temporary directory is removed.
 *
 * Paths never leave the root: names are taken relative to the root (a leading `/` is dropped,
 * as containerd does), a name with a `..` component is skipped with a warning (as GNU tar does),
 * and symlinks met in a parent path are resolved inside the root, as continuity's `RootPath`
 * does, against an in-memory model of what this layer created (the directory starts empty and
 * only we write to it). The final component is never followed (O_EXCL|O_NOFOLLOW, lchown,
 * lutimes, `setfattr -h`).
 *
 * Entries as containerd applies them: later entries replace earlier ones of the same name (a
 * directory over a directory merges: metadata replaced, xattrs added); owner (lchown), then mode
 * with setuid/setgid/sticky (chmod, after chown), xattrs from `SCHILY.xattr.*` PAX records, then
 * mtime (atime = mtime; times before 1970 or after 2262 become the epoch, as containerd's
 * boundTime); directory mtimes last. `.wh.NAME` becomes a character device 0/0 NAME with mode 0
 * and the whiteout entry's owner and mtime; `.wh..wh..opq` sets trusted.overlay.opaque=y on its
 * directory; other `.wh..wh.*` are skipped with a warning. Where this differs from containerd:
 * the root entry's metadata is applied to the root (containerd ignores it; GNU tar and umoci do
 * not); a `..` component skips the entry (containerd clamps it at the root); a whiteout of an
 * entry of the same layer, or under a path the same layer made a file (umoci writes those), is
 * ignored (containerd fails); PAX global headers are skipped; implicit parent directories copied
 * from `parents` keep the parent's mtime (containerd leaves them at the time of the unpack).
 * A hardlink whose target is not an earlier entry, or an entry whose parent is not a directory,
 * fails the unpack ('invalid-entry'), as in containerd.
 *
 * Node has no mknod(2) nor ns-precision utimes: device nodes, fifos and whiteout devices are
 * created at the end of the layer (or before a hardlink that needs one) by one GNU `tar -x` of a
 * tar we write (one child process however many whiteouts); xattrs are set by one
 * `setfattr -h --restore=-`. Times of other entries are set with lutimes, which libuv rounds
 * to the microsecond: sub-microsecond digits of a PAX mtime are dropped. No synchronous call
 * anywhere: child processes are spawned asynchronously.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes, type Hash } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { layerCompression, nullLogger, type Logger } from '../fetcher/index.js';
import { TarIndexer, ZtocError, parseModTime, parseTarNumber as parseNumeric, parseTarOctal as parseOctal, type FileMetadata } from '../ztoc/index.js';

// ---------------------------------------------------------------------------------------
// Public API

export type UnpackErrorKind =
  /** zstd or a media type that is not a layer. */
  | 'unsupported-media-type'
  /** `digest` is not `sha256:<64 hex>` or `sha512:<128 hex>`. */
  | 'invalid-digest'
  /** The blob's bytes do not hash to `digest`. */
  | 'digest-mismatch'
  /** The gzip stream or the tar ends early. */
  | 'truncated'
  /** The gzip stream or a tar header is malformed or uses an unsupported feature. */
  | 'corrupt'
  /** An entry cannot be applied: its parent is not a directory, a hardlink's target is missing, ... */
  | 'invalid-entry'
  /** `dest` already exists. */
  | 'exists'
  /** The source iterable failed (e.g. the registry connection). */
  | 'source'
  /** The signal was aborted. */
  | 'aborted'
  /** A file system operation or a helper process (tar, setfattr) failed. */
  | 'io';

/** Unpacking failed; `digest` names the layer, `kind` the class of failure, the message the reason. */
export class UnpackError extends Error {
  readonly kind: UnpackErrorKind;
  readonly digest: string;
  /** The message without the layer prefix. */
  readonly reason: string;
  constructor(digest: string, kind: UnpackErrorKind, reason: string, options?: { cause?: unknown }) {
    super(`layer ${digest}: ${reason}`, options);
    this.name = 'UnpackError';
    this.kind = kind;
    this.digest = digest;
    this.reason = reason;
  }
}

export interface UnpackOptions {
  /** The layer blob's bytes, in order (e.g. `Repository.blobStream(desc)`). */
  source: AsyncIterable<Uint8Array>;
  /** The layer's media type: OCI or Docker tar or tar+gzip (zstd is refused). */
  mediaType: string;
  /** The blob digest, checked against the bytes as they stream. */
  digest: string;
  /** The directory to create (its parent is created if missing); must not exist. */
  dest: string;
  logger?: Logger;
  signal?: AbortSignal;
  /**
   * Directories of the layers below this one, topmost first (containerd's `WithParents`): a
   * parent directory that this layer does not have an entry for (umoci leaves unchanged ones
   * out) takes the owner, mode, xattrs (but trusted.overlay.*) and mtime of the same directory in
   * the first of them that has one, so that stacked as overlay lowerdirs it does not hide them;
   * the root directory too when the layer has no root entry. May be FUSE mounts served by this
   * process: they are read with asynchronous calls, one at a time.
   */
  parents?: readonly string[];
  /**
   * syncfs the temporary directory's file system before renaming it into place, so that a
   * power loss never leaves a renamed directory with missing data (default true).
   */
  sync?: boolean;
}

export interface UnpackResult {
  /** Tar entries read (PAX / GNU meta headers not counted), whiteouts and skipped ones included. */
  entries: number;
  /** Bytes of the blob read. */
  bytes: number;
  /** Bytes of the uncompressed tar stream. */
  tarBytes: number;
  /** `sha256:` of the uncompressed tar (equals `digest` for an uncompressed layer). */
  diffID: string;
  /** Whiteouts converted (`.wh.NAME` devices plus opaque markers). */
  whiteouts: number;
  /** Entries skipped with a warning (unsafe names, unsupported whiteouts). */
  skipped: number;
  /** Wall time of the whole unpack. */
  ms: number;
}

/**
 * Unpacks the layer blob `source` into the new directory `dest` (see the module comment).
 * Rejects with UnpackError; on failure nothing is left at `dest` nor at its temporary name.
 */
export async function unpackLayer(opts: UnpackOptions): Promise<UnpackResult> {
  const started = performance.now();
  const { digest, dest } = opts;
  const logger = (opts.logger ?? nullLogger).child({ layer: digest });
  const signal = opts.signal;

  const m = /^(sha256|sha512):([0-9a-f]+)$/.exec(digest);
  const hexLength = m?.[1] === 'sha256' ? 64 : 128;
  if (m === null || m[2]?.length !== hexLength) {
    throw new UnpackError(digest, 'invalid-digest', 'not a sha256 or sha512 digest');
  }
  const algorithm = m[1] as 'sha256' | 'sha512';
  const compression = layerCompression(opts.mediaType);
  if (compression === undefined) {
    throw new UnpackError(digest, 'unsupported-media-type', `media type ${JSON.stringify(opts.mediaType)} is not a layer media type`);
  }
  if (compression === 'zstd') {
    throw new UnpackError(digest, 'unsupported-media-type', `zstd layers (${opts.mediaType}) are not supported`);
  }
  if (aborted(signal)) throw abortedError(digest, signal);

  const absDest = path.resolve(dest);
  try {
    await fsp.mkdir(path.dirname(absDest), { recursive: true });
  } catch (e) {
    throw new UnpackError(digest, 'io', `cannot create the parent of ${absDest}: ${errText(e)}`, { cause: e });
  }
  let present: boolean;
  try {
    present = await lexists(absDest);
  } catch (e) {
    throw new UnpackError(digest, 'io', `cannot check ${absDest}: ${errText(e)}`, { cause: e });
  }
  if (present) throw new UnpackError(digest, 'exists', `${absDest} already exists`);
  const tmp = `${absDest}.tmp-${randomBytes(6).toString('hex')}`;
  try {
    await fsp.mkdir(tmp, { mode: 0o777 });
  } catch (e) {
    throw new UnpackError(digest, 'io', `cannot create ${tmp}: ${errText(e)}`, { cause: e });
  }

  const blobHash = createHash(algorithm);
  const tarHash = createHash('sha256');
  const counts = { bytes: 0, tarBytes: 0, sourceDone: false };
  const applier = new Applier(tmp, digest, logger, signal, (opts.parents ?? []).map((p) => path.resolve(p)));
  const walker = new TarWalker(digest, applier);
  try {
    try {
      await applier.init();
      const src = hashed(opts.source, blobHash, counts, digest);
      const sink = async (tar: AsyncIterable<Buffer>): Promise<void> => {
        for await (const chunk of tar) {
          tarHash.update(chunk);
          counts.tarBytes += chunk.length;
          await walker.push(chunk);
        }
      };
      if (compression === 'gzip') {
        await pipeline(src, createGunzip({ chunkSize: 256 << 10 }), sink, { signal });
      } else {
        await pipeline(src, sink, { signal });
      }
      walker.finish();
    } catch (e) {
      // A blob read to its end that does not hash to its digest: that is the root cause,
      // whatever the decompressor or the tar walk made of its bytes.
      if (counts.sourceDone && !(e instanceof UnpackError && e.kind === 'source')) checkDigest(digest, blobHash, classify(digest, e, signal));
      throw classify(digest, e, signal);
    }
    checkDigest(digest, blobHash, undefined);
    await applier.finish();
    if (opts.sync !== false) await syncFs(tmp, digest, signal);
    if (aborted(signal)) throw abortedError(digest, signal);
    try {
      await fsp.rename(tmp, absDest);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EEXIST' || code === 'ENOTEMPTY') throw new UnpackError(digest, 'exists', `${absDest} appeared while unpacking`, { cause: e });
      throw new UnpackError(digest, 'io', `cannot rename ${tmp} to ${absDest}: ${errText(e)}`, { cause: e });
    }
  } catch (e) {
    await applier.abandon();
    await fsp.rm(tmp, { recursive: true, force: true }).catch((err: unknown) => {
      logger.warn('cannot remove the partial unpack directory', { dir: tmp, error: err });
    });
    throw classify(digest, e, signal);
  }
  const result: UnpackResult = {
    entries: walker.entries,
    bytes: counts.bytes,
    tarBytes: counts.tarBytes,
    diffID: `sha256:${tarHash.digest('hex')}`,
    whiteouts: applier.whiteouts,
    skipped: applier.skipped,
    ms: performance.now() - started,
  };
  logger.info('layer unpacked', { dest: absDest, entries: result.entries, bytes: result.bytes, tarBytes: result.tarBytes, ms: Math.round(result.ms) });
  return result;
}

/**
 * Removes `dest.tmp-*` siblings that a crashed unpack of `dest` left (call before unpacking
 * again, when no unpack of `dest` is running). Returns the removed paths.
 */
export async function removeUnpackLeftovers(dest: string): Promise<string[]> {
  const abs = path.resolve(dest);
  const dir = path.dirname(abs);
  const prefix = `${path.basename(abs)}.tmp-`;
  let names: string[];
  try {
    names = await fsp.readdir(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
  const removed: string[] = [];
  for (const name of names) {
    if (!name.startsWith(prefix) || !/^[0-9a-f]{12}$/.test(name.slice(prefix.length))) continue;
    const p = path.join(dir, name);
    await fsp.rm(p, { recursive: true, force: true });
    removed.push(p);
  }
  return removed;
}

// ---------------------------------------------------------------------------------------
// Pipeline helpers

async function* hashed(
  source: AsyncIterable<Uint8Array>,
  hash: Hash,
  counts: { bytes: number; sourceDone: boolean },
  digest: string,
): AsyncGenerator<Buffer, void, undefined> {
  const it = source[Symbol.asyncIterator]();
  let finished = false;
  try {
    for (;;) {
      let r: IteratorResult<Uint8Array>;
      try {
        r = await it.next();
      } catch (e) {
        finished = true; // a failed iterator is not to be returned
        throw new UnpackError(digest, 'source', `reading the blob failed after ${counts.bytes} bytes: ${errText(e)}`, { cause: e });
      }
      if (r.done === true) {
        finished = true;
        counts.sourceDone = true;
        return;
      }
      const chunk = r.value;
      if (!(chunk instanceof Uint8Array)) {
        throw new UnpackError(digest, 'source', `the source yielded ${typeof chunk}, not bytes`);
      }
      if (chunk.length === 0) continue;
      hash.update(chunk);
      counts.bytes += chunk.length;
      yield Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    }
  } finally {
    if (!finished) await it.return?.();
  }
}

function checkDigest(digest: string, hash: Hash, cause: UnpackError | undefined): void {
  const got = `${digest.slice(0, digest.indexOf(':'))}:${hash.digest('hex')}`;
  if (got !== digest) {
    const also = cause === undefined ? '' : ` (and the content is bad: ${cause.reason})`;
    throw new UnpackError(digest, 'digest-mismatch', `the blob's bytes have digest ${got}${also}`, cause === undefined ? undefined : { cause });
  }
}

/** Any error of the pipeline as an UnpackError. */
function classify(digest: string, e: unknown, signal: AbortSignal | undefined): UnpackError {
  if (e instanceof UnpackError) return e;
  if (aborted(signal)) return abortedError(digest, signal, e);
  if (e instanceof ZtocError) {
    const truncated = /\btruncated\b/.test(e.message);
    return new UnpackError(digest, truncated ? 'truncated' : 'corrupt', `bad tar: ${e.message}`, { cause: e });
  }
  const err = e as NodeJS.ErrnoException;
  if (typeof err?.code === 'string' && err.code.startsWith('Z_')) {
    // node:zlib: Z_BUF_ERROR "unexpected end of file" is a gzip stream that stops early.
    const truncated = err.code === 'Z_BUF_ERROR';
    return new UnpackError(digest, truncated ? 'truncated' : 'corrupt', `${truncated ? 'truncated' : 'bad'} gzip stream: ${err.message}`, { cause: e });
  }
  if ((e as Error)?.name === 'AbortError') return abortedError(digest, signal, e);
  return new UnpackError(digest, 'io', errText(e), { cause: e });
}

function abortedError(digest: string, signal: AbortSignal | undefined, cause?: unknown): UnpackError {
  return new UnpackError(digest, 'aborted', 'unpack aborted', { cause: signal?.reason ?? cause });
}

/** A function, so that TypeScript does not narrow `signal.aborted` across awaits. */
function aborted(signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true;
}

function errText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

async function lexists(p: string): Promise<boolean> {
  try {
    await fsp.lstat(p);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw e;
  }
}

async function syncFs(dir: string, digest: string, signal: AbortSignal | undefined): Promise<void> {
  const r = await runTool('sync', ['-f', dir], { signal });
  if (r.code !== 0) throw new UnpackError(digest, 'io', `sync -f ${dir} failed: ${r.stderr.trim()}`);
}

// ---------------------------------------------------------------------------------------
// The tar walk

const BLOCK = 512;
const MAX_META = 1 << 20; // as TarIndexer (Go's maxSpecialFileSize)
const MAX_GROUP = 8 << 20; // all meta headers of one entry
const ZERO_END = Buffer.alloc(2 * BLOCK);
const W_HEADER = 0;
const W_META = 1;
const W_DATA = 2;
const W_PAD = 3;
const W_DONE = 4;

/** Where an entry's data goes. */
interface DataSink {
  write(data: Buffer): Promise<void>;
  end(): Promise<void>;
}

/** What the walker hands entries to. */
interface EntryHandler {
  /** An entry; a sink when it has data (type 'reg' with size > 0) that is to be kept. */
  entry(e: FileMetadata, at: number): Promise<DataSink | undefined>;
}

/**
 * Frames the tar stream (header blocks, meta payloads, data, padding) and has each entry's
 * header group (PAX / GNU long-name headers and the header) parsed by ztoc's TarIndexer, so
 * names, PAX records, base-256 numbers and checksums are read exactly as for zTOCs.
 *
 * TarIndexer records metadata and skips data by counting; it shows its entries only at
 * finish(). So each group is given to a fresh indexer followed by an end-of-archive marker,
 * and a regular file's header is given with its typeflag turned into '5' (no data follows),
 * its checksum rewritten after ours has checked the original one. The data size then comes
 * from the indexer (a PAX `size` record overrides the header's).
 */
class TarWalker {
  entries = 0;
  private state = W_HEADER;
  private readonly hdr = Buffer.alloc(BLOCK);
  private fill = 0;
  private pos = 0;
  private zeroSeen = false;
  private group: Buffer[] = [];
  private groupBytes = 0;
  private groupAt = -1;
  /** The meta payload being collected (padded to blocks), or null for a skipped one ('g'). */
  private meta: Buffer | null = null;
  private metaFill = 0;
  private left = 0;
  private sink: DataSink | undefined;
  private what = '';
  private whatAt = 0;

  constructor(
    private readonly digest: string,
    private readonly handler: EntryHandler,
  ) {}

  async push(chunk: Buffer): Promise<void> {
    let p = 0;
    const end = chunk.length;
    while (p < end) {
      switch (this.state) {
        case W_HEADER: {
          const n = Math.min(BLOCK - this.fill, end - p);
          chunk.copy(this.hdr, this.fill, p, p + n);
          this.fill += n;
          p += n;
          this.pos += n;
          if (this.fill === BLOCK) {
            this.fill = 0;
            await this.onBlock(this.pos - BLOCK);
          }
          break;
        }
        case W_META: {
          const n = Math.min(this.left, end - p);
          if (this.meta !== null) chunk.copy(this.meta, this.metaFill, p, p + n);
          this.metaFill += n;
          this.left -= n;
          p += n;
          this.pos += n;
          if (this.left === 0) {
            if (this.meta !== null) this.addToGroup(this.meta);
            this.meta = null;
            this.state = W_HEADER;
          }
          break;
        }
        case W_DATA: {
          const n = Math.min(this.left, end - p);
          if (this.sink !== undefined) await this.sink.write(chunk.subarray(p, p + n));
          this.left -= n;
          p += n;
          this.pos += n;
          if (this.left === 0) {
            const sink = this.sink;
            this.sink = undefined;
            if (sink !== undefined) await sink.end();
            this.left = padding(this.pos);
            this.state = this.left > 0 ? W_PAD : W_HEADER;
            this.what = `padding after ${this.what.slice('data of '.length)}`;
          }
          break;
        }
        case W_PAD: {
          const n = Math.min(this.left, end - p);
          this.left -= n;
          p += n;
          this.pos += n;
          if (this.left === 0) this.state = W_HEADER;
          break;
        }
        default:
          return; // W_DONE: whatever follows the end marker is ignored (but hashed by the caller)
      }
    }
  }

  /** The stream ended: fails if it stops inside a header, meta payload, data or padding. */
  finish(): void {
    switch (this.state) {
      case W_DONE:
        return;
      case W_HEADER:
        if (this.fill !== 0) throw this.error(this.pos - this.fill, `truncated header: the stream ends ${this.fill} bytes into a 512-byte block`);
        return; // Go (and TarIndexer) accept a stream that ends at a block boundary without the marker
      default:
        throw this.error(this.whatAt, `truncated ${this.what}: the stream ends at offset ${this.pos}, ${this.left} bytes short`);
    }
  }

  private async onBlock(at: number): Promise<void> {
    const b = this.hdr;
    if (isZeroBlock(b)) {
      if (this.zeroSeen) this.state = W_DONE;
      else this.zeroSeen = true;
      return;
    }
    if (this.zeroSeen) throw this.error(at, 'invalid tar header: a zero block is followed by a non-zero block');
    if (this.groupAt < 0) this.groupAt = at;
    const flag = b[156];
    if (flag === 0x78 || flag === 0x4c || flag === 0x4b || flag === 0x67) {
      // PAX 'x', GNU long name 'L' / long link 'K': kept for the entry; PAX global 'g': skipped
      // (containerd ignores it; TarIndexer refuses it).
      const size = parseNumeric(b, 124, 12);
      if (Number.isNaN(size) || size < 0) throw this.error(at, `invalid tar header: bad size field of a meta header`);
      if (size > MAX_META) throw this.error(at, `meta header of ${size} bytes, over the ${MAX_META}-byte limit`);
      const padded = size + padding(size);
      const keep = flag !== 0x67;
      if (keep) this.addToGroup(Buffer.from(b));
      this.what = keep ? 'meta header payload' : 'PAX global header payload';
      this.whatAt = at;
      if (padded === 0) return;
      this.meta = keep ? Buffer.alloc(padded) : null;
      this.metaFill = 0;
      this.left = padded;
      this.state = W_META;
      return;
    }
    const entry = this.parseEntry(b, at);
    const groupAt = this.groupAt;
    this.group = [];
    this.groupBytes = 0;
    this.groupAt = -1;
    this.entries++;
    const size = entry.type === 'reg' ? entry.uncompressedSize : 0;
    entry.uncompressedOffset = this.pos;
    const sink = await this.handler.entry(entry, groupAt);
    if (size > 0) {
      this.sink = sink;
      this.left = size;
      this.state = W_DATA;
      this.what = `data of entry ${JSON.stringify(entry.name)}`;
      this.whatAt = at;
    } else if (sink !== undefined) {
      await sink.end();
    }
  }

  private addToGroup(b: Buffer): void {
    this.groupBytes += b.length;
    if (this.groupBytes > MAX_GROUP) throw this.error(this.groupAt, `meta headers of one entry exceed ${MAX_GROUP} bytes`);
    this.group.push(b);
  }

  private parseEntry(b: Buffer, at: number): FileMetadata {
    const flag = b[156];
    const regular = flag === 0x30 || flag === 0x37 || flag === 0x00;
    let header = b;
    if (regular) {
      // Check the original checksum, then hand the indexer a copy with no data.
      const { unsigned, signed } = checksums(b);
      const stored = parseOctal(b, 148, 8);
      if (stored !== unsigned && stored !== signed) {
        throw this.error(at, `invalid tar header: checksum ${stored} does not match computed ${unsigned} (signed ${signed})`);
      }
      header = Buffer.from(b);
      header[156] = 0x35;
      writeChecksum(header);
    }
    const ix = new TarIndexer({ source: this.digest, maxEntries: 1 });
    let files: FileMetadata[];
    try {
      for (const g of this.group) ix.push(g, 0, g.length);
      ix.push(header, 0, BLOCK);
      ix.push(ZERO_END, 0, ZERO_END.length);
      files = ix.finish().entries;
    } catch (e) {
      if (e instanceof ZtocError) {
        // Offsets in its message count from this entry's first header block.
        throw new UnpackError(this.digest, /\btruncated\b/.test(e.message) ? 'truncated' : 'corrupt', `bad tar entry at offset ${this.groupAt}: ${e.message}`, { cause: e });
      }
      throw e;
    }
    const f = files[0];
    if (f === undefined || files.length !== 1) throw this.error(at, 'header did not parse to one entry');
    if (regular) f.type = flag === 0x00 && f.name.endsWith('/') ? 'dir' : 'reg';
    return f;
  }

  private error(at: number, reason: string): UnpackError {
    return new UnpackError(this.digest, /^truncated/.test(reason) ? 'truncated' : 'corrupt', `bad tar at offset ${at}: ${reason}`);
  }
}

function padding(n: number): number {
  const r = n % BLOCK;
  return r === 0 ? 0 : BLOCK - r;
}

function isZeroBlock(b: Buffer): boolean {
  for (let i = 0; i < BLOCK; i++) if (b[i] !== 0) return false;
  return true;
}

/** Header sums with the checksum field read as spaces (unsigned bytes, and signed as Sun tar). */
function checksums(b: Buffer): { unsigned: number; signed: number } {
  let sum = 0;
  let high = 0;
  for (let i = 0; i < BLOCK; i++) {
    const c = i >= 148 && i < 156 ? 0x20 : b[i];
    sum += c;
    high += c >>> 7;
  }
  return { unsigned: sum, signed: sum - 256 * high };
}

function writeChecksum(b: Buffer): void {
  const { unsigned } = checksums(b);
  b.write(unsigned.toString(8).padStart(6, '0'), 148, 'latin1');
  b[154] = 0;
  b[155] = 0x20;
}

// ---------------------------------------------------------------------------------------
// Applying entries

type NodeKind = 'dir' | 'file' | 'symlink' | 'special';

/** What this layer created at a path (the directory starts empty and only we write to it). */
interface Node {
  kind: NodeKind;
  children?: Map<string, Node>;
  /** Symlink target. */
  target?: string;
  /** xattrs to set at the end (name → value); `trusted.overlay.opaque` for opaque markers. */
  xattrs?: Map<string, Buffer>;
  /** Directory mtime (lutimes argument) to set at the end, after its contents. */
  dirTime?: number;
  /** A device, fifo or whiteout not yet created on disk. */
  pending?: Special;
  /** Directory mode and group as set (a setgid directory gives new entries its group). */
  mode?: number;
  gid?: number;
}

interface DirInfo {
  uid: number;
  gid: number;
  mode: number;
  mtimeNs: bigint;
}

interface Special {
  type: 'char' | 'block' | 'fifo';
  mode: number;
  uid: number;
  gid: number;
  devmajor: number;
  devminor: number;
  mtime: { seconds: bigint; nanos: number };
}

/** An entry that cannot be applied where it is (the walk goes on without it, or fails). */
class EntryProblem extends Error {
  constructor(
    readonly fatal: boolean,
    reason: string,
    readonly notDirectory = false,
  ) {
    super(reason);
  }
}

const WHITEOUT = '.wh.';
const OPAQUE = '.wh..wh..opq';
const MAX_LINKS = 255;
/** containerd's boundTime: times outside [1970, 2262] become the epoch. */
const MAX_TIME_SECONDS = 9223372036n;

/** Non-directory entries being created at once (each a chain of fs calls on the libuv pool). */
const MAX_JOBS = 32;
/** Bytes queued for writing (over all files) before the walk waits for its current file's writes. */
const MAX_QUEUED = 16 << 20;
const noop = (): void => undefined;

class Applier implements EntryHandler {
  whiteouts = 0;
  skipped = 0;
  private readonly euid = process.geteuid?.() ?? -1;
  private readonly egid = process.getegid?.() ?? -1;
  /** Permission bits the process umask clears (probed on the root directory by `init`). */
  private umask = 0o777;
  private readonly root: Node = { kind: 'dir', children: new Map(), mode: 0o755 };
  /** Specials waiting for the next flush, in entry order: their node and path. */
  private pendingSpecials: Array<{ node: Node; rel: string }> = [];
  /** Entries being created in the background; `barrier()` waits for them all. */
  private readonly jobs = new Set<Promise<void>>();
  private jobFailure: unknown = undefined;
  /** Files opened and not yet closed (closed by `abandon` after a failure). */
  private readonly handles = new Set<fsp.FileHandle>();
  /** File data handed to background writes and not yet written. */
  private queued = 0;

  constructor(
    private readonly rootDir: string,
    private readonly digest: string,
    private readonly logger: Logger,
    private readonly signal: AbortSignal | undefined,
    private readonly parents: readonly string[],
  ) {}

  /** Learns the umask from the root directory, made with mode 0777 by the caller. */
  async init(): Promise<void> {
    const st = await fsp.stat(this.rootDir);
    this.umask = 0o777 & ~st.mode;
    await fsp.chmod(this.rootDir, 0o755);
  }

  async entry(e: FileMetadata, at: number): Promise<DataSink | undefined> {
    if (aborted(this.signal)) throw abortedError(this.digest, this.signal);
    this.rethrowJobFailure();
    try {
      return await this.apply(e);
    } catch (err) {
      if (err instanceof EntryProblem) {
        if (err.fatal) {
          throw new UnpackError(this.digest, 'invalid-entry', `entry ${JSON.stringify(e.name)} (header at offset ${at}): ${err.message}`, { cause: err });
        }
        this.skip(e, err.message);
        return undefined;
      }
      throw this.ioError(e, err);
    }
  }

  private ioError(e: FileMetadata, err: unknown): UnpackError {
    if (err instanceof UnpackError) return err;
    return new UnpackError(this.digest, 'io', `entry ${JSON.stringify(e.name)}: ${errText(err)}`, { cause: err });
  }

  private skip(e: FileMetadata, reason: string): void {
    this.skipped++;
    this.logger.warn('layer entry skipped', { entry: e.name, type: e.type, reason });
  }

  private async apply(e: FileMetadata): Promise<DataSink | undefined> {
    const parts = splitName(e.name);
    if (parts === null) throw new EntryProblem(false, "the name has a '..' component");
    if (parts.length === 0) {
      if (e.type !== 'dir') throw new EntryProblem(false, `the root entry is a ${e.type}, not a directory`);
      await this.setDirMeta(this.root, this.rootDir, e, false);
      return undefined;
    }
    const base = parts[parts.length - 1] as string;
    const isWhiteout = base.startsWith(WHITEOUT);
    let resolved: { dir: Node; rel: string };
    try {
      resolved = await this.parentDir(parts.slice(0, -1));
    } catch (err) {
      if (isWhiteout && err instanceof EntryProblem && err.notDirectory) {
        // umoci writes `d/.wh.x` after replacing directory d by a file in the same layer:
        // that file already hides all below it, so the whiteout has nothing to do.
        this.logger.debug('whiteout under a non-directory of the same layer ignored', { entry: e.name });
        return undefined;
      }
      throw err;
    }
    const { dir, rel: parentRel } = resolved;
    const children = dir.children as Map<string, Node>;

    // Whiteouts name a sibling in the (resolved) parent.
    if (isWhiteout) {
      if (base === OPAQUE) {
        (dir.xattrs ??= new Map()).set('trusted.overlay.opaque', Buffer.from('y'));
        this.whiteouts++;
        return undefined;
      }
      if (base.startsWith(WHITEOUT + WHITEOUT)) throw new EntryProblem(false, 'unsupported whiteout (only .wh.NAME and .wh..wh..opq are)');
      const name = base.slice(WHITEOUT.length);
      if (name === '' || name === '.' || name === '..') throw new EntryProblem(false, 'invalid whiteout name');
      if (children.has(name)) {
        // A whiteout hides lower layers only: what this layer itself has at NAME stays.
        this.logger.debug('whiteout of an entry of the same layer ignored', { entry: e.name });
        return undefined;
      }
      const node: Node = { kind: 'special', pending: { type: 'char', mode: 0, uid: e.uid, gid: e.gid, devmajor: 0, devminor: 0, mtime: entryTime(e) } };
      children.set(name, node);
      this.pendingSpecials.push({ node, rel: join(parentRel, name) });
      this.whiteouts++;
      return undefined;
    }

    const rel = join(parentRel, base);
    const abs = this.abs(rel);
    // A hardlink's target is resolved before anything is replaced (it may be the same path).
    const linkTarget = e.type === 'hardlink' ? this.hardlinkTarget(e) : undefined;

    const existing = children.get(base);
    if (existing !== undefined) {
      if (existing.kind === 'dir' && e.type === 'dir') {
        await this.setDirMeta(existing, abs, e, false);
        return undefined;
      }
      if (linkTarget !== undefined && linkTarget.node === existing) throw new EntryProblem(false, 'hardlink to itself');
      // Later entries replace earlier ones: the old one (and all below it) goes.
      children.delete(base);
      if (existing.pending === undefined) {
        await this.barrier();
        await fsp.rm(abs, { recursive: true, force: true });
      } else {
        this.pendingSpecials = this.pendingSpecials.filter((x) => x.node !== existing);
      }
    }

    const mode = e.mode & 0o7777;
    const [uid, gid] = owner(e);
    // A new inode belongs to us, in the group of a setgid parent: lchown only when that differs.
    const needChown = uid !== this.euid || gid !== ((dir.mode ?? 0) & 0o2000 ? (dir.gid ?? -1) : this.egid);
    switch (e.type) {
      case 'dir': {
        const node: Node = { kind: 'dir', children: new Map() };
        await fsp.mkdir(abs, mode & 0o777);
        children.set(base, node);
        await this.setDirMeta(node, abs, e, true, needChown, ((dir.mode ?? 0) & 0o2000) !== 0);
        return undefined;
      }
      case 'reg': {
        const node: Node = { kind: 'file' };
        children.set(base, node);
        this.setXattrs(node, e);
        // chmod after chown (which clears setuid/setgid), unless the create mode is already right.
        const needChmod = (mode & 0o7000) !== 0 || (mode & this.umask) !== 0;
        return this.fileSink(abs, e, mode, needChown, needChmod);
      }
      case 'symlink': {
        const node: Node = { kind: 'symlink', target: e.linkname };
        children.set(base, node);
        this.setXattrs(node, e);
        await this.job(e, async () => {
          await fsp.symlink(e.linkname, abs);
          if (needChown) await fsp.lchown(abs, uid, gid);
          await fsp.lutimes(abs, ...times(e));
        });
        return undefined;
      }
      case 'hardlink': {
        const target = linkTarget as { node: Node; rel: string };
        if (target.node.pending !== undefined) await this.flushSpecials();
        await this.barrier();
        await fsp.link(this.abs(target.rel), abs);
        const node: Node = { kind: target.node.kind, ...(target.node.kind === 'symlink' ? { target: target.node.target } : {}) };
        children.set(base, node);
        this.setXattrs(node, e);
        // containerd's order; the inode is shared, so this changes the target's metadata too.
        await fsp.lchown(abs, uid, gid);
        // No lchmod: a link to a symlink keeps its mode (containerd's handleLChmod).
        if (target.node.kind !== 'symlink') await fsp.chmod(abs, mode);
        await fsp.lutimes(abs, ...times(e));
        return undefined;
      }
      case 'char':
      case 'block':
      case 'fifo': {
        const node: Node = {
          kind: 'special',
          pending: { type: e.type, mode, uid, gid, devmajor: e.devmajor, devminor: e.devminor, mtime: entryTime(e) },
        };
        children.set(base, node);
        this.setXattrs(node, e);
        this.pendingSpecials.push({ node, rel });
        return undefined;
      }
    }
  }

  /**
   * A regular file: opened, written and finished (owner, mode, times, close) as a chain of
   * calls that runs beside the walk; the walk waits only when much of its data is queued.
   */
  private fileSink(abs: string, e: FileMetadata, mode: number, needChown: boolean, needChmod: boolean): DataSink {
    let fh: fsp.FileHandle | undefined;
    const wrap = (err: unknown): never => {
      throw this.ioError(e, err);
    };
    let chain: Promise<void> = fsp.open(abs, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, mode & 0o777).then((h) => {
      fh = h;
      this.handles.add(h);
    }, wrap);
    chain.catch(noop);
    return {
      write: async (data: Buffer): Promise<void> => {
        this.queued += data.length;
        chain = chain
          .then(async () => {
            const h = fh as fsp.FileHandle;
            let off = 0;
            while (off < data.length) off += (await h.write(data, off, data.length - off)).bytesWritten;
          })
          .catch(wrap)
          .finally(() => {
            this.queued -= data.length;
          });
        chain.catch(noop);
        if (this.queued > MAX_QUEUED) await chain;
      },
      end: async (): Promise<void> => {
        const done = chain
          .then(async () => {
            const h = fh as fsp.FileHandle;
            if (needChown) await h.chown(...owner(e));
            if (needChmod) await h.chmod(mode);
            await h.utimes(...times(e));
          })
          .catch(wrap)
          .finally(async () => {
            if (fh === undefined) return;
            this.handles.delete(fh);
            await fh.close();
          });
        await this.track(done);
      },
    };
  }

  /** Runs `fn` as a background job. */
  private job(e: FileMetadata, fn: () => Promise<void>): Promise<void> {
    return this.track(fn().catch((err: unknown) => {
      throw this.ioError(e, err);
    }));
  }

  /** Tracks a job; waits while too many run. */
  private async track(p: Promise<void>): Promise<void> {
    const q: Promise<void> = p.then(noop, (err: unknown) => {
      this.jobFailure ??= err;
    }).finally(() => this.jobs.delete(q));
    this.jobs.add(q);
    while (this.jobs.size >= MAX_JOBS) await Promise.race(this.jobs);
    this.rethrowJobFailure();
  }

  /** Waits for every background job; rethrows the first failure. */
  private async barrier(): Promise<void> {
    while (this.jobs.size > 0) await Promise.all([...this.jobs]);
    this.rethrowJobFailure();
  }

  private rethrowJobFailure(): void {
    if (this.jobFailure !== undefined) throw this.jobFailure;
  }

  /** Directory metadata now; its mtime at the end, once nothing more is created in it. */
  private async setDirMeta(node: Node, abs: string, e: FileMetadata, created: boolean, needChown = true, setgidParent = false): Promise<void> {
    const mode = e.mode & 0o7777;
    const [uid, gid] = owner(e);
    if (!created || needChown) await fsp.lchown(abs, uid, gid);
    // mkdir applied the umask (and a setgid parent adds its bit): chmod unless that was a no-op.
    if (!created || setgidParent || (mode & 0o7000) !== 0 || (mode & this.umask) !== 0) await fsp.chmod(abs, mode);
    node.mode = mode;
    node.gid = gid;
    this.setXattrs(node, e);
    node.dirTime = times(e)[1];
  }

  private setXattrs(node: Node, e: FileMetadata): void {
    for (const [k, v] of e.paxRecords) {
      if (!k.startsWith('SCHILY.xattr.')) continue;
      (node.xattrs ??= new Map()).set(k.slice('SCHILY.xattr.'.length), Buffer.from(v, 'latin1'));
    }
  }

  /**
   * The directory `parts` names, resolved inside the root (symlinks followed with the root as
   * `/`, `..` stopping at the root, as continuity's RootPath); missing directories are
   * created 0755 (containerd's mkparent).
   */
  private async parentDir(parts: readonly string[]): Promise<{ dir: Node; rel: string }> {
    const names = this.resolve(parts);
    let dir = this.root;
    let rel = '';
    for (const name of names) {
      rel = join(rel, name);
      const children = dir.children as Map<string, Node>;
      let next = children.get(name);
      if (next === undefined) {
        await fsp.mkdir(this.abs(rel), 0o755);
        await fsp.chmod(this.abs(rel), 0o755);
        next = { kind: 'dir', children: new Map(), mode: 0o755, gid: this.egid };
        children.set(name, next);
        await this.copyFromParents(rel, next);
      } else if (next.kind !== 'dir') {
        throw new EntryProblem(true, `parent ${JSON.stringify(rel)} is not a directory`, true);
      }
      dir = next;
    }
    return { dir, rel };
  }

  /**
   * containerd's mkparent with parents: the first parent layer that has `rel` gives its
   * directory's metadata; one where a component of `rel` is not a directory (a file, a symlink,
   * a whiteout) hides the layers below it, and the defaults stay.
   */
  private async copyFromParents(rel: string, node: Node): Promise<void> {
    const found = await this.findInParents(rel);
    if (found === undefined) return;
    const { st, where } = found;
    const abs = this.abs(rel);
    await fsp.lchown(abs, st.uid, st.gid);
    await fsp.chmod(abs, st.mode & 0o7777);
    node.mode = st.mode & 0o7777;
    node.gid = st.gid;
    node.dirTime = utimeValue(st.mtimeNs / 1_000_000_000n, Number(st.mtimeNs % 1_000_000_000n));
    for (const [name, value] of await readXattrs(where, this.signal)) {
      if (name.startsWith('trusted.overlay.')) continue;
      (node.xattrs ??= new Map()).set(name, value);
    }
  }

  private async findInParents(rel: string): Promise<{ st: DirInfo; where: string } | undefined> {
    const parts = rel === '' ? [] : rel.split('/');
    for (const p of this.parents) {
      let where = p;
      let st: import('node:fs').BigIntStats | undefined;
      try {
        st = await fsp.lstat(where, { bigint: true });
        for (const part of parts) {
          if (!st.isDirectory()) break;
          where = `${where}/${part}`;
          st = await fsp.lstat(where, { bigint: true });
        }
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'ENOENT') continue; // not in this layer: look further down
        throw e;
      }
      if (!st.isDirectory()) return undefined; // replaced or whited out here
      return { st: { uid: Number(st.uid), gid: Number(st.gid), mode: Number(st.mode), mtimeNs: st.mtimeNs }, where };
    }
    return undefined;
  }

  /** RootPath over the model: the resolved component names of `parts` (existing ones are dirs or missing). */
  private resolve(parts: readonly string[]): string[] {
    const stack: Array<{ name: string; node: Node | undefined }> = [];
    const todo = parts.slice().reverse();
    let links = 0;
    while (todo.length > 0) {
      const part = todo.pop() as string;
      if (part === '' || part === '.') continue;
      if (part === '..') {
        stack.pop();
        continue;
      }
      const top = stack.length === 0 ? this.root : stack[stack.length - 1]?.node;
      if (top !== undefined && top.kind !== 'dir') {
        throw new EntryProblem(true, `parent ${JSON.stringify(stack.map((x) => x.name).join('/'))} is not a directory`, true);
      }
      const node = top?.children?.get(part);
      if (node?.kind === 'symlink') {
        if (++links > MAX_LINKS) throw new EntryProblem(false, 'too many levels of symbolic links in the parent path');
        const target = node.target ?? '';
        if (target.startsWith('/')) stack.length = 0;
        for (const t of target.split('/').reverse()) todo.push(t);
        continue;
      }
      stack.push({ name: part, node });
    }
    return stack.map((x) => x.name);
  }

  /** containerd's hardlinkRootPath: the link name's parent resolved in the root, its base not followed. */
  private hardlinkTarget(e: FileMetadata): { node: Node; rel: string } {
    const parts = splitName(e.linkname);
    if (parts === null) throw new EntryProblem(false, `hardlink target ${JSON.stringify(e.linkname)} has a '..' component`);
    if (parts.length === 0) throw new EntryProblem(false, 'hardlink to the root');
    const names = this.resolve(parts.slice(0, -1));
    let dir: Node | undefined = this.root;
    for (const n of names) dir = dir?.children?.get(n);
    const base = parts[parts.length - 1] as string;
    const node = dir?.kind === 'dir' ? dir.children?.get(base) : undefined;
    if (node === undefined) throw new EntryProblem(true, `hardlink target ${JSON.stringify(e.linkname)} is not in the layer before it`);
    if (node.kind === 'dir') throw new EntryProblem(true, `hardlink target ${JSON.stringify(e.linkname)} is a directory`);
    return { node, rel: join(names.join('/'), base) };
  }

  private abs(rel: string): string {
    return rel === '' ? this.rootDir : `${this.rootDir}/${rel}`;
  }

  /** Creates the pending devices, fifos and whiteouts with one GNU tar. */
  private async flushSpecials(): Promise<void> {
    const list = this.pendingSpecials;
    this.pendingSpecials = [];
    if (list.length === 0) return;
    const parts: Buffer[] = [];
    for (const { node, rel } of list) parts.push(specialTarEntry(rel, node.pending as Special));
    parts.push(ZERO_END);
    const r = await runTool('tar', ['-x', '-f', '-', '-C', this.rootDir, '--numeric-owner', '--same-owner', '--same-permissions', '--no-overwrite-dir'], {
      input: Buffer.concat(parts),
      signal: this.signal,
    });
    if (r.code !== 0) throw new UnpackError(this.digest, 'io', `creating ${list.length} devices, fifos and whiteouts with tar failed: ${r.stderr.trim().slice(0, 2000)}`);
    for (const { node } of list) delete node.pending;
  }

  /** After the last entry: background jobs, specials, xattrs, directory times. */
  async finish(): Promise<void> {
    await this.barrier();
    // No root entry: the root takes the parents' root, as any implicit directory.
    if (this.root.dirTime === undefined && this.parents.length > 0) await this.copyFromParents('', this.root);
    await this.flushSpecials();
    await this.applyXattrs();
    // Directory mtimes last: creating entries in a directory changes its mtime.
    const dirs: Array<[string, number]> = [];
    const walk = (node: Node, rel: string): void => {
      if (node.kind !== 'dir') return;
      if (node.dirTime !== undefined) dirs.push([rel, node.dirTime]);
      for (const [name, child] of node.children ?? []) walk(child, join(rel, name));
    };
    walk(this.root, '');
    for (const [rel, t] of dirs) {
      if (aborted(this.signal)) throw abortedError(this.digest, this.signal);
      await fsp.lutimes(this.abs(rel), t, t);
    }
  }

  private async applyXattrs(): Promise<void> {
    const todo: Array<{ rel: string; name: string; value: Buffer }> = [];
    const walk = (node: Node, rel: string): void => {
      for (const [name, value] of node.xattrs ?? []) {
        // user.* xattrs are only allowed on regular files and directories (xattr(7)); containerd
        // ignores that EPERM with a warning.
        if (name.startsWith('user.') && node.kind !== 'file' && node.kind !== 'dir') {
          this.logger.warn('xattr ignored: user.* is not allowed on this file type', { entry: rel, xattr: name, kind: node.kind });
          continue;
        }
        todo.push({ rel, name, value });
      }
      for (const [name, child] of node.children ?? []) walk(child, join(rel, name));
    };
    walk(this.root, '');
    if (todo.length === 0) return;
    let dump = '';
    let last: string | undefined;
    for (const x of todo) {
      if (x.rel !== last) {
        dump += `${last === undefined ? '' : '\n'}# file: ${quote(x.rel === '' ? '.' : x.rel)}\n`;
        last = x.rel;
      }
      dump += `${quote(x.name)}=${x.value.length === 0 ? '""' : `0x${x.value.toString('hex')}`}\n`;
    }
    const r = await runTool('setfattr', ['-h', '--restore=-'], { input: Buffer.from(dump + '\n', 'utf8'), cwd: this.rootDir, signal: this.signal });
    if (r.code === 0) return;
    // One at a time, to know which failed and why.
    for (const x of todo) {
      const args = ['-h', '-n', x.name, ...(x.value.length === 0 ? [] : ['-v', `0x${x.value.toString('hex')}`]), '--', x.rel === '' ? '.' : x.rel];
      const one = await runTool('setfattr', args, { cwd: this.rootDir, signal: this.signal });
      if (one.code === 0) continue;
      if (/Operation not supported/.test(one.stderr)) {
        this.logger.warn('xattr ignored: not supported by the file system', { entry: x.rel, xattr: x.name });
        continue;
      }
      throw new UnpackError(this.digest, 'io', `setting xattr ${x.name} on ${JSON.stringify(x.rel)} failed: ${one.stderr.trim()}`);
    }
  }

  /** After a failure: lets the background jobs settle and closes what they left open. */
  async abandon(): Promise<void> {
    while (this.jobs.size > 0) await Promise.allSettled([...this.jobs]);
    for (const fh of this.handles) await fh.close().catch(noop);
    this.handles.clear();
  }
}

/** Components of a tar name relative to the root ('' and '.' dropped, so a leading '/' too); null if it has '..'. */
function splitName(name: string): string[] | null {
  const out: string[] = [];
  for (const part of name.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') return null;
    out.push(part);
  }
  return out;
}

function join(a: string, b: string): string {
  return a === '' ? b : `${a}/${b}`;
}

function owner(e: FileMetadata): [number, number] {
  if (!(e.uid >= 0 && e.uid <= 0xfffffffe && e.gid >= 0 && e.gid <= 0xfffffffe)) {
    throw new EntryProblem(true, `owner ${e.uid}:${e.gid} is out of range`);
  }
  return [e.uid, e.gid];
}

function entryTime(e: FileMetadata): { seconds: bigint; nanos: number } {
  const t = parseModTime(e.modTime);
  if (t.seconds < 0n || t.seconds > MAX_TIME_SECONDS) return { seconds: 0n, nanos: 0 };
  return t;
}

/**
 * atime and mtime for lutimes/futimes: libuv keeps microseconds, from a double; the half
 * microsecond added makes its truncation land on the right one.
 */
function times(e: FileMetadata): [number, number] {
  const t = entryTime(e);
  const v = utimeValue(t.seconds, t.nanos);
  return [v, v];
}

function utimeValue(seconds: bigint, nanos: number): number {
  const us = Math.floor(nanos / 1000);
  return us === 0 ? Number(seconds) : Number(seconds) + (us + 0.5) / 1e6;
}

/** Every xattr of `p` (not following a symlink), by `getfattr -h -d -m - -e hex`. */
async function readXattrs(p: string, signal: AbortSignal | undefined): Promise<Map<string, Buffer>> {
  const r = await runTool('getfattr', ['-h', '-d', '-m', '-', '-e', 'hex', '--absolute-names', '--', p], { signal, stdout: true });
  const out = new Map<string, Buffer>();
  // A filesystem without xattrs (a lazy layer that has none: see fs/layerfs.ts) has none to copy.
  if (r.code !== 0 && /Operation not supported/.test(r.stderr)) return out;
  if (r.code !== 0) throw new Error(`getfattr ${p} failed: ${r.stderr.trim()}`);
  for (const line of r.stdout.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const eq = line.indexOf('=');
    const name = unquote(eq < 0 ? line : line.slice(0, eq));
    const value = eq < 0 ? '' : line.slice(eq + 1);
    out.set(name, value.startsWith('0x') ? Buffer.from(value.slice(2), 'hex') : Buffer.alloc(0));
  }
  return out;
}

/** The inverse of `quote`. */
function unquote(s: string): string {
  const bytes: number[] = [];
  for (let i = 0; i < s.length; i++) {
    if (s[i] === '\\' && /^[0-7]{3}$/.test(s.slice(i + 1, i + 4))) {
      bytes.push(parseInt(s.slice(i + 1, i + 4), 8));
      i += 3;
    } else {
      for (const b of Buffer.from(s[i] as string, 'utf8')) bytes.push(b);
    }
  }
  return Buffer.from(bytes).toString('utf8');
}

/** setfattr/getfattr quoting: bytes that are not printable ASCII, '\\' and '=' as \ooo. */
function quote(s: string): string {
  let out = '';
  for (const c of Buffer.from(s, 'utf8')) {
    out += c <= 0x20 || c >= 0x7f || c === 0x5c || c === 0x3d ? `\\${c.toString(8).padStart(3, '0')}` : String.fromCharCode(c);
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// The tar of specials

/** One PAX-headed tar entry for a device, fifo or whiteout at `rel` (exact path, owner and ns mtime). */
function specialTarEntry(rel: string, s: Special): Buffer {
  const records: Array<[string, Buffer]> = [
    ['hdrcharset', Buffer.from('BINARY')],
    ['path', Buffer.from(rel, 'utf8')],
    ['uid', Buffer.from(String(s.uid))],
    ['gid', Buffer.from(String(s.gid))],
    ['mtime', Buffer.from(s.mtime.nanos === 0 ? String(s.mtime.seconds) : `${s.mtime.seconds}.${String(s.mtime.nanos).padStart(9, '0')}`)],
  ];
  const pax = Buffer.concat(records.map(([k, v]) => paxRecord(k, v)));
  const xhdr = ustarHeader({ name: 'PaxHeader', flag: 0x78, mode: 0o644, uid: 0, gid: 0, size: pax.length, mtime: 0, devmajor: 0, devminor: 0 });
  const flag = s.type === 'char' ? 0x33 : s.type === 'block' ? 0x34 : 0x36;
  const hdr = ustarHeader({
    name: 'special',
    flag,
    mode: s.mode,
    uid: s.uid <= 0o7777777 ? s.uid : 0,
    gid: s.gid <= 0o7777777 ? s.gid : 0,
    size: 0,
    mtime: Number(s.mtime.seconds <= 0o77777777777n ? s.mtime.seconds : 0n),
    devmajor: s.devmajor,
    devminor: s.devminor,
  });
  return Buffer.concat([xhdr, pax, Buffer.alloc(padding(pax.length)), hdr]);
}

function paxRecord(key: string, value: Buffer): Buffer {
  const body = Buffer.concat([Buffer.from(` ${key}=`), value, Buffer.from('\n')]);
  let len = body.length + 1;
  while (String(len).length + body.length !== len) len = String(len).length + body.length;
  return Buffer.concat([Buffer.from(String(len)), body]);
}

interface UstarFields {
  name: string;
  flag: number;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  devmajor: number;
  devminor: number;
}

function ustarHeader(f: UstarFields): Buffer {
  const b = Buffer.alloc(BLOCK);
  b.write(f.name, 0, 100, 'latin1');
  const octal = (v: number, off: number, len: number): void => {
    b.write(v.toString(8).padStart(len - 1, '0'), off, len - 1, 'latin1');
  };
  octal(f.mode, 100, 8);
  octal(f.uid, 108, 8);
  octal(f.gid, 116, 8);
  octal(f.size, 124, 12);
  octal(f.mtime, 136, 12);
  b[156] = f.flag;
  b.write('ustar\x0000', 257, 8, 'latin1');
  octal(f.devmajor, 329, 8);
  octal(f.devminor, 337, 8);
  writeChecksum(b);
  return b;
}

// ---------------------------------------------------------------------------------------
// Child processes (asynchronous only)

interface ToolResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

function runTool(cmd: string, args: readonly string[], opts: { input?: Buffer; cwd?: string; signal?: AbortSignal; stdout?: boolean }): Promise<ToolResult> {
  return new Promise<ToolResult>((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: { ...process.env, LC_ALL: 'C' },
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', opts.stdout === true ? 'pipe' : 'ignore', 'pipe'],
      signal: opts.signal,
    });
    const out: Buffer[] = [];
    child.stdout?.on('data', (b: Buffer) => out.push(b));
    const err: Buffer[] = [];
    let errBytes = 0;
    child.stderr?.on('data', (b: Buffer) => {
      if (errBytes < 64 << 10) err.push(b);
      errBytes += b.length;
    });
    child.on('error', (e: NodeJS.ErrnoException) => {
      if (e.name === 'AbortError') reject(e);
      else reject(new Error(`cannot run ${cmd}: ${e.code === 'ENOENT' ? 'not installed' : e.message}`, { cause: e }));
    });
    child.on('close', (code) => resolve({ code, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') }));
    if (opts.input !== undefined && child.stdin !== null) {
      child.stdin.on('error', () => undefined); // EPIPE when the tool exits early: its status tells
      child.stdin.end(opts.input);
    }
  });
}

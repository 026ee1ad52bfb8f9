/**
 * A streaming tar indexer: fed the uncompressed layer in chunks, it records
 * each entry's metadata and where its data starts, the way upstream's
 * toc_builder.go sees the stream through Go's archive/tar reader.
 *
 * Only header blocks and special payloads (PAX records, GNU long names) are
 * copied; file data is skipped by counting, so memory stays bounded and the
 * cost per chunk of file data is O(1).
 */

import { Buffer } from 'node:buffer';
import { LimitError, TarFormatError } from './errors.js';
import { formatModTimeNumber, modTimeInRange } from './modtime.js';
import type { FileMetadata, FileType } from './types.js';

export { formatModTime, parseModTime } from './modtime.js';

export interface TarIndexerOptions {
  /** Names the layer in errors. */
  source: string;
  /** Most entries accepted before a LimitError (default 1 << 20). */
  maxEntries?: number;
}

const BLOCK = 512;
/** Go's maxSpecialFileSize: the cap on a PAX header or GNU long name/link payload. */
const MAX_SPECIAL = 1 << 20;
export const DEFAULT_MAX_ENTRIES = 1 << 20;

// Parser states.
const S_HEADER = 0; // collecting a 512-byte header block
const S_SKIP = 1; // skipping entry data and/or padding
const S_SPECIAL = 2; // collecting a PAX / GNU long-name payload
const S_DONE = 3; // end-of-archive marker read

// Typeflags (Go's archive/tar names in comments).
const T_REG_A = 0x00; // TypeRegA, '\0'
const T_REG = 0x30; // '0'
const T_LINK = 0x31; // '1'
const T_SYMLINK = 0x32; // '2'
const T_CHAR = 0x33; // '3'
const T_BLOCK = 0x34; // '4'
const T_DIR = 0x35; // '5'
const T_FIFO = 0x36; // '6'
const T_CONT = 0x37; // '7'
const T_XHEADER = 0x78; // 'x'
const T_XGLOBAL = 0x67; // 'g'
const T_GNU_LONGNAME = 0x4c; // 'L'
const T_GNU_LONGLINK = 0x4b; // 'K'
const T_GNU_SPARSE = 0x53; // 'S'

// Header layouts (see Go's archive/tar/format.go).
const F_V7 = 0;
const F_USTAR = 1; // USTAR or PAX
const F_GNU = 2;
const F_STAR = 3;

const INT64_MIN = -(1n << 63n);
const INT64_MAX = (1n << 63n) - 1n;
const DECIMAL = /^[+-]?[0-9]+$/;

/** A stream of PAX records, parsed: key → value, last one wins (as Go's map). */
type PaxRecords = Map<string, string>;

export class TarIndexer {
  private readonly source: string;
  private readonly maxEntries: number;
  private readonly hdr = Buffer.alloc(BLOCK);
  private fill = 0;
  private state = S_HEADER;
  /** Bytes of the stream consumed so far (not counting ignored bytes after the end marker). */
  private pos = 0;
  /** Bytes still to skip in S_SKIP. */
  private skip = 0;
  /** Where the data being skipped ends (padding follows), for truncation errors. */
  private dataEnd = 0;
  /** What is being skipped or collected, for truncation errors. */
  private what = '';
  /** Offset of the header of what is being skipped or collected. */
  private whatAt = 0;
  private zeroSeen = false;

  private special: Buffer = Buffer.alloc(0);
  private specialSize = 0;
  private specialFill = 0;
  private specialType = 0;
  private specialAt = 0;

  /** Meta headers apply to the next real entry only. */
  private pax: PaxRecords | null = null;
  private longName = '';
  private longLink = '';

  private readonly entries: FileMetadata[] = [];
  private lastSeconds = NaN;
  private lastNanos = NaN;
  private lastText = '';
  private archiveSize = 0;
  private failure: unknown = null;
  private result: { entries: FileMetadata[]; archiveSize: number } | null = null;

  constructor(options: TarIndexerOptions) {
    this.source = options.source;
    const max = options.maxEntries ?? DEFAULT_MAX_ENTRIES;
    if (!Number.isSafeInteger(max) || max < 0) throw new RangeError(`maxEntries must be a non-negative integer, got ${max}`);
    this.maxEntries = max;
  }

  /** True once the end-of-archive marker was read; further bytes are ignored. */
  get done(): boolean {
    return this.state === S_DONE;
  }

  /**
   * Feeds chunk[start, end) of the uncompressed tar stream. The chunk is not
   * retained. After an error, every later call rethrows it.
   */
  push(chunk: Uint8Array, start: number, end: number): void {
    if (this.failure !== null) throw this.failure;
    if (this.result !== null) throw new TarFormatError(this.source, 'push() called after finish()');
    if (!(start >= 0 && start <= end && end <= chunk.length)) {
      throw new RangeError(`bad chunk range [${start}, ${end}) of ${chunk.length} bytes`);
    }
    try {
      this.consume(chunk, start, end);
    } catch (e) {
      this.failure = e;
      throw e;
    }
  }

  /** Ends the stream; throws if it stops inside a header, an entry's data or its padding. */
  finish(): { entries: FileMetadata[]; archiveSize: number } {
    if (this.failure !== null) throw this.failure;
    if (this.result !== null) return this.result;
    try {
      this.checkEnd();
    } catch (e) {
      this.failure = e;
      throw e;
    }
    this.result = { entries: this.entries, archiveSize: this.archiveSize };
    return this.result;
  }

  private checkEnd(): void {
    switch (this.state) {
      case S_DONE:
        return;
      case S_HEADER:
        if (this.fill !== 0) {
          throw this.error(this.pos - this.fill, `truncated header: the stream ends ${this.fill} bytes into a 512-byte block`);
        }
        // Go reports io.EOF at a block boundary, after zero or one zero block.
        this.archiveSize = this.pos;
        return;
      case S_SPECIAL:
        throw this.error(
          this.specialAt,
          `truncated ${this.what}: the stream ends after ${this.specialFill} of ${this.specialSize} bytes`,
        );
      case S_SKIP:
        if (this.pos < this.dataEnd) {
          throw this.error(
            this.whatAt,
            `truncated data of ${this.what}: the stream ends at offset ${this.pos}, data ends at ${this.dataEnd}`,
          );
        }
        throw this.error(
          this.whatAt,
          `truncated padding after ${this.what}: the stream ends at offset ${this.pos}, padding ends at ${this.pos + this.skip}`,
        );
    }
  }

  private consume(chunk: Uint8Array, start: number, end: number): void {
    let p = start;
    while (p < end) {
      const state = this.state;
      if (state === S_SKIP) {
        // File data: counted, never touched.
        const n = Math.min(this.skip, end - p);
        p += n;
        this.pos += n;
        this.skip -= n;
        if (this.skip === 0) this.state = S_HEADER;
      } else if (state === S_HEADER) {
        const n = Math.min(BLOCK - this.fill, end - p);
        // A plain loop: subarray() on a Buffer allocates a FastBuffer per header.
        const h = this.hdr;
        for (let i = 0, f = this.fill; i < n; i++) h[f + i] = chunk[p + i];
        this.fill += n;
        p += n;
        this.pos += n;
        if (this.fill === BLOCK) {
          this.fill = 0;
          this.onBlock(this.pos - BLOCK);
        }
      } else if (state === S_SPECIAL) {
        const n = Math.min(this.specialSize - this.specialFill, end - p);
        const sp = this.special;
        for (let i = 0, f = this.specialFill; i < n; i++) sp[f + i] = chunk[p + i];
        this.specialFill += n;
        p += n;
        this.pos += n;
        if (this.specialFill === this.specialSize) this.onSpecial();
      } else {
        return; // S_DONE: record padding after the end marker is ignored
      }
    }
  }

  /** A complete 512-byte block at stream offset `at` is in this.hdr. */
  private onBlock(at: number): void {
    const b = this.hdr;
    // One pass: sums for the checksum (field read as spaces) and the zero-block test.
    let sum = 0;
    let high = 0;
    let chk = 0;
    for (let i = 0; i < 148; i++) {
      const c = b[i];
      sum += c;
      high += c >>> 7;
    }
    for (let i = 148; i < 156; i++) chk |= b[i];
    for (let i = 156; i < BLOCK; i++) {
      const c = b[i];
      sum += c;
      high += c >>> 7;
    }
    if (sum === 0 && chk === 0) {
      if (this.zeroSeen) {
        this.state = S_DONE;
        this.archiveSize = this.pos;
      } else {
        this.zeroSeen = true;
      }
      return;
    }
    if (this.zeroSeen) {
      throw this.error(at, 'invalid tar header: a zero block is followed by a non-zero block');
    }

    const unsigned = sum + 8 * 0x20;
    const signed = unsigned - 256 * high; // Sun tar summed signed bytes; Go accepts both
    const stored = parseOctal(b, 148, 8);
    if (Number.isNaN(stored)) {
      throw this.error(at, `invalid tar header: unparsable checksum field ${fieldText(b, 148, 8)}`);
    }
    if (stored !== unsigned && stored !== signed) {
      throw this.error(at, `invalid tar header: checksum ${stored} does not match computed ${unsigned} (signed ${signed})`);
    }

    const format = headerFormat(b);
    const flag = b[156];

    // Go parses every numeric field of every header, meta headers included,
    // and fails the header on any bad one.
    const size = this.numeric(b, 124, 12, 'size', at);
    const mode = this.numeric(b, 100, 8, 'mode', at);
    const uid = this.numeric(b, 108, 8, 'uid', at);
    const gid = this.numeric(b, 116, 8, 'gid', at);
    const mtime = this.numeric(b, 136, 12, 'mtime', at);
    let devmajor = 0;
    let devminor = 0;
    if (format !== F_V7) {
      devmajor = this.numeric(b, 329, 8, 'devmajor', at);
      devminor = this.numeric(b, 337, 8, 'devminor', at);
    }
    if (format === F_STAR) {
      this.numeric(b, 476, 12, 'atime', at);
      this.numeric(b, 488, 12, 'ctime', at);
    }

    if (size < 0) throw this.error(at, `negative size ${size}`);

    if (flag === T_XHEADER || flag === T_GNU_LONGNAME || flag === T_GNU_LONGLINK) {
      this.startSpecial(flag, size, at);
      return;
    }
    if (flag === T_XGLOBAL) {
      throw this.error(at, 'PAX global header (typeflag \'g\') is not supported', cString(b, 0, 100));
    }

    let name = cString(b, 0, 100);
    let linkname = cString(b, 157, 100);
    let uname = '';
    let gname = '';
    if (format !== F_V7) {
      uname = cString(b, 265, 32);
      gname = cString(b, 297, 32);
      let prefix = '';
      if (format === F_USTAR) {
        prefix = cString(b, 345, 155);
      } else if (format === F_STAR) {
        prefix = cString(b, 345, 131);
      } else if (
        (b[345] !== 0 && Number.isNaN(parseNumeric(b, 345, 12))) ||
        (b[357] !== 0 && Number.isNaN(parseNumeric(b, 357, 12)))
      ) {
        // GNU: atime/ctime that do not parse mean a pre-Go1.8 writer put a
        // USTAR prefix there; Go then uses it if it is ASCII.
        const end = cEnd(b, 345, 155);
        let ascii = true;
        for (let i = 345; i < end; i++) if (b[i] >= 0x80) ascii = false;
        if (ascii) prefix = b.toString('latin1', 345, end);
      }
      if (prefix.length > 0) name = prefix + '/' + name;
    }

    let entrySize = size;
    let entryUid = uid;
    let entryGid = gid;
    let mtimeSeconds = mtime;
    let mtimeNanos = 0;
    let paxRecords: Array<[string, string]> = [];
    const pax = this.pax;
    if (pax !== null) {
      for (const [k, v] of pax) {
        if (k.startsWith('GNU.sparse.')) {
          throw this.error(at, `sparse files are not supported (PAX record ${k})`, name);
        }
        if (v === '') continue; // Go keeps the header's value
        switch (k) {
          case 'path':
            name = byteStringToUtf8(v);
            break;
          case 'linkpath':
            linkname = byteStringToUtf8(v);
            break;
          case 'uname':
            uname = byteStringToUtf8(v);
            break;
          case 'gname':
            gname = byteStringToUtf8(v);
            break;
          case 'uid':
            entryUid = this.paxInt(k, v, at, name);
            break;
          case 'gid':
            entryGid = this.paxInt(k, v, at, name);
            break;
          case 'size':
            entrySize = this.paxInt(k, v, at, name);
            break;
          case 'mtime': {
            const t = parsePaxTime(v);
            if (t === null) throw this.error(at, `invalid PAX record mtime=${JSON.stringify(v)}`, name);
            if (!modTimeInRange(t.seconds)) throw this.badYear(at, name, v);
            mtimeSeconds = Number(t.seconds);
            mtimeNanos = t.nanos;
            break;
          }
          case 'atime':
          case 'ctime':
            // Unused, but Go rejects the header if they do not parse.
            if (parsePaxTime(v) === null) throw this.error(at, `invalid PAX record ${k}=${JSON.stringify(v)}`, name);
            break;
        }
      }
      paxRecords = Array.from(pax);
      if (paxRecords.length > 1) paxRecords.sort(compareRecords);
    }
    if (this.longName !== '') name = this.longName;
    if (this.longLink !== '') linkname = this.longLink;
    this.pax = null;
    this.longName = '';
    this.longLink = '';

    let type: FileType;
    switch (flag) {
      case T_REG:
      case T_CONT:
        type = 'reg';
        break;
      case T_REG_A:
        // Legacy archives mark directories with a trailing slash only.
        type = name.endsWith('/') ? 'dir' : 'reg';
        break;
      case T_LINK:
        type = 'hardlink';
        break;
      case T_SYMLINK:
        type = 'symlink';
        break;
      case T_CHAR:
        type = 'char';
        break;
      case T_BLOCK:
        type = 'block';
        break;
      case T_DIR:
        type = 'dir';
        break;
      case T_FIFO:
        type = 'fifo';
        break;
      case T_GNU_SPARSE:
        throw this.error(at, 'sparse files are not supported (GNU typeflag \'S\')', name);
      default:
        throw this.error(at, `unsupported typeflag ${describeFlag(flag)}`, name);
    }

    if (entrySize < 0) throw this.error(at, `negative size ${entrySize}`, name);
    if (!modTimeInRange(mtimeSeconds)) throw this.badYear(at, name, String(mtimeSeconds));
    if (this.entries.length >= this.maxEntries) {
      throw new LimitError(this.source, `more than ${this.maxEntries} entries (entry ${JSON.stringify(name)}, header at offset ${at})`);
    }

    this.entries.push({
      name,
      type,
      uncompressedOffset: this.pos,
      uncompressedSize: entrySize,
      linkname,
      mode,
      uid: entryUid,
      gid: entryGid,
      uname,
      gname,
      modTime: this.modTime(mtimeSeconds, mtimeNanos),
      devmajor,
      devminor,
      paxRecords,
    });

    // Go reads no data for header-only types, whatever their size field says.
    const data = type === 'reg' ? entrySize : 0;
    if (data > 0) {
      this.startSkip(data, padding(data), `entry ${JSON.stringify(name)}`, at);
    }
  }

  /** Skips `data` bytes of data then `pad` bytes of padding. */
  /** Entries of a layer mostly share a few mtimes: remember the last one formatted. */
  private modTime(seconds: number, nanos: number): string {
    if (seconds !== this.lastSeconds || nanos !== this.lastNanos) {
      this.lastText = formatModTimeNumber(seconds, nanos);
      this.lastSeconds = seconds;
      this.lastNanos = nanos;
    }
    return this.lastText;
  }

  private startSkip(data: number, pad: number, what: string, at: number): void {
    this.dataEnd = this.pos + data;
    this.skip = data + pad;
    this.what = what;
    this.whatAt = at;
    this.state = S_SKIP;
  }

  private startSpecial(flag: number, size: number, at: number): void {
    if (size > MAX_SPECIAL) {
      throw new LimitError(
        this.source,
        `${specialName(flag)} at offset ${at} is ${size} bytes, more than the ${MAX_SPECIAL}-byte limit`,
      );
    }
    if (this.special.length < size) {
      // Grow geometrically, capped: payloads are usually a few hundred bytes.
      this.special = Buffer.allocUnsafe(Math.min(MAX_SPECIAL, Math.max(size, this.special.length * 2, 4096)));
    }
    this.specialType = flag;
    this.specialSize = size;
    this.specialFill = 0;
    this.specialAt = at;
    this.what = specialName(flag);
    this.state = S_SPECIAL;
    if (size === 0) this.onSpecial();
  }

  private onSpecial(): void {
    const size = this.specialSize;
    const at = this.specialAt;
    if (this.specialType === T_XHEADER) {
      // A later PAX header replaces an earlier one, as in Go.
      this.pax = this.parsePax(this.special, size, at);
    } else {
      const s = cString(this.special, 0, size);
      if (this.specialType === T_GNU_LONGNAME) this.longName = s;
      else this.longLink = s;
    }
    const pad = padding(size);
    if (pad > 0) this.startSkip(0, pad, this.what, at);
    else this.state = S_HEADER;
  }

  /** Records "%d %s=%s\n", validated as Go's parsePAXRecord does. */
  private parsePax(buf: Buffer, len: number, at: number): PaxRecords {
    const records: PaxRecords = new Map();
    let p = 0;
    while (p < len) {
      const recordAt = p;
      const bad = (reason: string): TarFormatError =>
        this.error(at, `malformed PAX record at byte ${recordAt} of the extended header: ${reason}`);
      let sp = p;
      while (sp < len && buf[sp] !== 0x20) sp++;
      if (sp === len) throw bad('no length field');
      // Go's strconv.ParseInt: optional sign, decimal digits.
      let i = p;
      if (buf[i] === 0x2b || buf[i] === 0x2d) i++;
      if (i === sp) throw bad('empty length');
      let n = 0;
      for (; i < sp; i++) {
        const d = buf[i] - 0x30;
        if (d < 0 || d > 9) throw bad(`length ${fieldText(buf, p, sp - p)} is not a number`);
        n = n * 10 + d;
      }
      if (buf[p] === 0x2d) n = -n;
      if (n < 5 || n > len - p) throw bad(`length ${n} out of range (${len - p} bytes left)`);
      const recEnd = p + n - 1; // the newline
      if (recEnd <= sp) throw bad(`length ${n} shorter than its own field`);
      if (buf[recEnd] !== 0x0a) throw bad('record does not end with a newline');
      let eq = sp + 1;
      while (eq < recEnd && buf[eq] !== 0x3d) eq++;
      if (eq === recEnd) throw bad('no "=" in record');
      if (eq === sp + 1) throw bad('empty key');
      const key = buf.toString('utf8', sp + 1, eq);
      const valueHasNul = hasNul(buf, eq + 1, recEnd);
      if (key === 'path' || key === 'linkpath' || key === 'uname' || key === 'gname') {
        if (valueHasNul) throw bad(`NUL in the value of ${key}`);
      } else if (hasNul(buf, sp + 1, eq)) {
        throw bad('NUL in key');
      }
      // Values are kept as byte strings: xattr values are often binary (security.capability).
      records.set(key, buf.toString('latin1', eq + 1, recEnd));
      p = recEnd + 1;
    }
    return records;
  }

  /** A header numeric field; bad syntax, overflow or a non-safe value fail the header. */
  private numeric(b: Buffer, off: number, len: number, field: string, at: number): number {
    const v = parseNumeric(b, off, len);
    if (Number.isNaN(v)) {
      throw this.error(at, `invalid tar header: bad or out-of-range ${field} field ${fieldText(b, off, len)}`);
    }
    return v;
  }

  private paxInt(key: string, value: string, at: number, name: string): number {
    const v = parseInt64(value);
    if (v === null) throw this.error(at, `invalid PAX record ${key}=${JSON.stringify(value)}`, name);
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) {
      throw this.error(at, `PAX record ${key}=${value} does not fit in a safe integer`, name);
    }
    return Number(v);
  }

  private badYear(at: number, name: string, value: string): TarFormatError {
    return this.error(at, `modification time ${value} is outside years 0000-9999 (not representable in RFC 3339)`, name);
  }

  private error(at: number, reason: string, name?: string): TarFormatError {
    const where = name === undefined ? `header at offset ${at}` : `entry ${JSON.stringify(name)} (header at offset ${at})`;
    return new TarFormatError(this.source, `${where}: ${reason}`);
  }
}

/** Bytes of padding after `n` bytes of data, up to the next 512-byte boundary. */
function padding(n: number): number {
  const r = n % BLOCK;
  return r === 0 ? 0 : BLOCK - r;
}

function headerFormat(b: Buffer): number {
  // magic "ustar\0" (USTAR/PAX, STAR with a "tar\0" trailer) or "ustar " + " \0" (GNU).
  if (b[257] !== 0x75 || b[258] !== 0x73 || b[259] !== 0x74 || b[260] !== 0x61 || b[261] !== 0x72) return F_V7;
  if (b[262] === 0) {
    return b[508] === 0x74 && b[509] === 0x61 && b[510] === 0x72 && b[511] === 0 ? F_STAR : F_USTAR;
  }
  if (b[262] === 0x20 && b[263] === 0x20 && b[264] === 0) return F_GNU;
  return F_V7;
}

/** End of a NUL-terminated string in b[off, off+len). */
function cEnd(b: Buffer, off: number, len: number): number {
  const limit = off + len;
  const e = b.indexOf(0, off);
  return e < 0 || e > limit ? limit : e;
}

/** A NUL-terminated field as UTF-8 (invalid sequences become U+FFFD). */
function cString(b: Buffer, off: number, len: number): string {
  const end = cEnd(b, off, len);
  return end === off ? '' : b.toString('utf8', off, end);
}

function hasNul(b: Buffer, start: number, end: number): boolean {
  const i = b.indexOf(0, start);
  return i >= 0 && i < end;
}

/**
 * Go's parseNumeric: base-256 when the high bit of the first byte is set
 * (two's complement, may be negative), octal otherwise. NaN when it does not
 * parse, overflows int64, or is not a safe integer.
 */
export function parseNumeric(b: Uint8Array, off: number, len: number): number {
  const first = b[off];
  if (len > 0 && (first & 0x80) !== 0) {
    const inv = (first & 0x40) !== 0 ? 0xff : 0;
    let x = 0;
    for (let i = 0; i < len; i++) {
      let c = b[off + i] ^ inv;
      if (i === 0) c &= 0x7f;
      // Beyond 2^53 the value is no longer exact; Go's own limit is 2^63.
      if (x > Number.MAX_SAFE_INTEGER / 256) return NaN;
      x = x * 256 + c;
    }
    const v = inv === 0 ? x : -x - 1;
    return Number.isSafeInteger(v) ? v : NaN;
  }
  return parseOctal(b, off, len);
}

/** Go's parseOctal: trim spaces and NULs both sides, stop at a NUL, octal digits. */
export function parseOctal(b: Uint8Array, off: number, len: number): number {
  let s = off;
  let e = off + len;
  while (s < e && (b[s] === 0x20 || b[s] === 0)) s++;
  while (e > s && (b[e - 1] === 0x20 || b[e - 1] === 0)) e--;
  if (s === e) return 0;
  let x = 0;
  for (let i = s; i < e; i++) {
    const c = b[i];
    if (c === 0) break;
    const d = c - 0x30;
    if (d < 0 || d > 7) return NaN;
    x = x * 8 + d;
  }
  return Number.isSafeInteger(x) ? x : NaN;
}

/** Go's strconv.ParseInt(s, 10, 64). */
function parseInt64(s: string): bigint | null {
  if (!DECIMAL.test(s)) return null;
  const v = BigInt(s);
  return v < INT64_MIN || v > INT64_MAX ? null : v;
}

/** Go's parsePAXTime: "%d[.%d]", sub-second digits beyond nine truncated, sign applies to both parts. */
function parsePaxTime(s: string): { seconds: bigint; nanos: number } | null {
  const dot = s.indexOf('.');
  const ss = dot < 0 ? s : s.slice(0, dot);
  const sn = dot < 0 ? '' : s.slice(dot + 1);
  let seconds = parseInt64(ss);
  if (seconds === null) return null;
  if (sn.length === 0) return { seconds, nanos: 0 };
  if (!/^[0-9]+$/.test(sn)) return null;
  let nanos = Number(sn.slice(0, 9).padEnd(9, '0'));
  if (ss.charCodeAt(0) === 0x2d && nanos > 0) {
    // time.Unix(secs, -nanos), normalised.
    seconds -= 1n;
    nanos = 1_000_000_000 - nanos;
  }
  return { seconds, nanos };
}

/** Go's sort.Strings order: UTF-8 bytes, i.e. code points (not UTF-16 units). */
function compareRecords(a: [string, string], b: [string, string]): number {
  return compareUtf8(a[0], b[0]);
}

export function compareUtf8(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    let x = a.charCodeAt(i);
    let y = b.charCodeAt(i);
    if (x === y) continue;
    // Surrogates encode code points above U+FFFF: sort them after the BMP.
    if (x >= 0xd800 && x <= 0xdfff) x += 0x10000;
    if (y >= 0xd800 && y <= 0xdfff) y += 0x10000;
    return x - y;
  }
  return a.length - b.length;
}

function specialName(flag: number): string {
  if (flag === T_XHEADER) return 'PAX extended header';
  if (flag === T_GNU_LONGNAME) return 'GNU long name header';
  return 'GNU long link header';
}

function describeFlag(flag: number): string {
  return flag >= 0x20 && flag < 0x7f ? `'${String.fromCharCode(flag)}'` : `0x${flag.toString(16).padStart(2, '0')}`;
}

/** A header field for error messages, non-printable bytes escaped. */
function fieldText(b: Uint8Array, off: number, len: number): string {
  let s = '';
  for (let i = off; i < off + len; i++) {
    const c = b[i];
    s += c >= 0x20 && c < 0x7f && c !== 0x22 && c !== 0x5c ? String.fromCharCode(c) : `\\x${c.toString(16).padStart(2, '0')}`;
  }
  return `"${s}"`;
}

/** A byte string (one char per byte, see FileMetadata.paxRecords) read as UTF-8 text. */
function byteStringToUtf8(v: string): string {
  return Buffer.from(v, 'latin1').toString('utf8');
}

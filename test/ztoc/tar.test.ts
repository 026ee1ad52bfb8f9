/**
 * The tar indexer against GNU tar as the oracle (archives built here from
 * real files in every format GNU tar writes), plus hand-made archives for
 * what GNU tar cannot produce (global headers, corrupt or truncated input).
 */

import t, { type Test } from 'tap';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { TarIndexer, formatModTime, parseModTime } from '../../ztoc/tar.js';
import { LimitError, TarFormatError, ZtocError, ZtocFormatError } from '../../ztoc/errors.js';
import { paxValueText, type FileMetadata, type FileType } from '../../ztoc/types.js';

// ---------------------------------------------------------------- helpers

type Result = { entries: FileMetadata[]; archiveSize: number };

/**
 * Indexes `buf` fed in chunks whose sizes come from `next`. Each chunk is
 * copied into one reused buffer that is scribbled over after every push, so
 * an indexer that kept a reference would see garbage.
 */
function index(buf: Uint8Array, next: () => number = () => buf.length, opts: { maxEntries?: number } = {}): Result {
  const ix = new TarIndexer({ source: 'test.tar', ...opts });
  let scratch = new Uint8Array(0);
  for (let p = 0; p < buf.length; ) {
    const n = Math.max(1, Math.min(next(), buf.length - p));
    if (scratch.length < n + 7) scratch = new Uint8Array(n + 7);
    // Offset the data inside the scratch buffer to exercise `start`.
    const start = n % 7;
    scratch.set(buf.subarray(p, p + n), start);
    ix.push(scratch, start, start + n);
    scratch.fill(0xa5);
    p += n;
  }
  return ix.finish();
}

function fixed(n: number): () => number {
  return () => n;
}

/** Deterministic PRNG (mulberry32) so failures reproduce. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

function randomSizes(seed: number, max: number): () => number {
  const r = rng(seed);
  return () => 1 + Math.floor(r() * max);
}

function expectThrow(fn: () => unknown, cls: new (...a: never[]) => Error, re: RegExp, tt: Tap, msg: string): Error | undefined {
  try {
    fn();
  } catch (e) {
    tt.ok(e instanceof cls, `${msg}: is ${cls.name} (got ${(e as Error).name}: ${(e as Error).message})`);
    tt.match((e as Error).message, re, `${msg}: message`);
    return e as Error;
  }
  tt.fail(`${msg}: did not throw`);
  return undefined;
}

type Tap = Test;

/** Feeds the whole buffer then finishes, expecting an error at either step. */
function expectIndexError(buf: Uint8Array, cls: new (...a: never[]) => Error, re: RegExp, tt: Tap, msg: string, opts?: { maxEntries?: number }): void {
  expectThrow(() => index(buf, fixed(buf.length), opts), cls, re, tt, msg);
  // The same error whatever the chunking.
  expectThrow(() => index(buf, fixed(1), opts), cls, re, tt, `${msg} (1-byte chunks)`);
}

// ------------------------------------------------- hand-made tar headers

interface Hdr {
  name?: string;
  mode?: number | Buffer;
  uid?: number | Buffer;
  gid?: number | Buffer;
  size?: number | Buffer;
  mtime?: number | Buffer;
  type?: string;
  linkname?: string;
  format?: 'ustar' | 'gnu' | 'v7' | 'star';
  uname?: string;
  gname?: string;
  devmajor?: number;
  devminor?: number;
  prefix?: string;
  /** Last-minute edits of the block before the checksum is computed. */
  edit?: (b: Buffer) => void;
  checksum?: 'unsigned' | 'signed' | number;
}

function octal(b: Buffer, off: number, len: number, v: number | Buffer): void {
  if (Buffer.isBuffer(v)) {
    v.copy(b, off, 0, len);
    return;
  }
  b.write(v.toString(8).padStart(len - 1, '0'), off, len - 1, 'latin1');
  b[off + len - 1] = 0;
}

/** A base-256 (GNU binary) numeric field of `len` bytes. */
function base256(v: bigint, len: number): Buffer {
  const b = Buffer.alloc(len);
  let x = BigInt.asUintN(8 * len, v);
  for (let i = len - 1; i >= 0; i--) {
    b[i] = Number(x & 0xffn);
    x >>= 8n;
  }
  b[0] |= 0x80;
  return b;
}

function header(h: Hdr): Buffer {
  const b = Buffer.alloc(512);
  b.write(h.name ?? 'file', 0, 100, 'utf8');
  octal(b, 100, 8, h.mode ?? 0o644);
  octal(b, 108, 8, h.uid ?? 1000);
  octal(b, 116, 8, h.gid ?? 1000);
  octal(b, 124, 12, h.size ?? 0);
  octal(b, 136, 12, h.mtime ?? 1700000000);
  b.write(h.type ?? '0', 156, 1, 'latin1');
  b.write(h.linkname ?? '', 157, 100, 'utf8');
  const format = h.format ?? 'ustar';
  if (format !== 'v7') {
    if (format === 'gnu') b.write('ustar  \0', 257, 8, 'latin1');
    else b.write('ustar\x0000', 257, 8, 'latin1');
    b.write(h.uname ?? 'user', 265, 32, 'utf8');
    b.write(h.gname ?? 'group', 297, 32, 'utf8');
    octal(b, 329, 8, h.devmajor ?? 0);
    octal(b, 337, 8, h.devminor ?? 0);
    if (h.prefix !== undefined) b.write(h.prefix, 345, format === 'star' ? 131 : 155, 'utf8');
    if (format === 'star') b.write('tar\0', 508, 4, 'latin1');
  }
  h.edit?.(b);
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < 512; i++) {
    const c = i >= 148 && i < 156 ? 0x20 : b[i];
    unsigned += c;
    signed += c >= 128 ? c - 256 : c;
  }
  const sum = typeof h.checksum === 'number' ? h.checksum : h.checksum === 'signed' ? signed : unsigned;
  b.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1');
  return b;
}

function pad512(data: Buffer): Buffer {
  const r = data.length % 512;
  return r === 0 ? data : Buffer.concat([data, Buffer.alloc(512 - r)]);
}

/** A header and its padded data; `size` defaults to the data's length. */
function entry(h: Hdr, data: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([header({ size: data.length, ...h }), pad512(data)]);
}

function paxRecord(k: string, v: string): string {
  const body = ` ${k}=${v}\n`;
  const bodyLen = Buffer.byteLength(body);
  let n = bodyLen + 1;
  while (String(n).length + bodyLen !== n) n = String(n).length + bodyLen;
  return `${n}${body}`;
}

function pax(records: Array<[string, string]>, type = 'x'): Buffer {
  const payload = Buffer.from(records.map(([k, v]) => paxRecord(k, v)).join(''), 'utf8');
  return entry({ name: 'PaxHeaders/x', type }, payload);
}

function paxRaw(payload: string | Buffer): Buffer {
  return entry({ name: 'PaxHeaders/x', type: 'x' }, Buffer.isBuffer(payload) ? payload : Buffer.from(payload, 'utf8'));
}

const END = Buffer.alloc(1024);

function tar(...parts: Buffer[]): Buffer {
  return Buffer.concat(parts);
}

// ---------------------------------------------------- GNU tar as oracle

interface Listed {
  typeChar: string;
  perms: string;
  uid: number;
  gid: number;
  size: string;
  time: string;
  name: string;
  link: string;
}

const TYPE_CHAR: Record<FileType, string> = {
  reg: '-',
  hardlink: 'h',
  symlink: 'l',
  char: 'c',
  block: 'b',
  dir: 'd',
  fifo: 'p',
};

/** The permission string `tar -tv` prints for a mode. */
function permString(mode: number): string {
  const rwx = (bits: number, special: boolean, ch: string): string =>
    (bits & 4 ? 'r' : '-') +
    (bits & 2 ? 'w' : '-') +
    (special ? (bits & 1 ? ch : ch.toUpperCase()) : bits & 1 ? 'x' : '-');
  return (
    rwx((mode >> 6) & 7, (mode & 0o4000) !== 0, 's') +
    rwx((mode >> 3) & 7, (mode & 0o2000) !== 0, 's') +
    rwx(mode & 7, (mode & 0o1000) !== 0, 't')
  );
}

const LIST_LINE = /^(\S)(\S{9}) (\d+)\/(\d+) +(\d+|\d+,\d+) (\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2}(?:\.\d+)?) +(.*)$/;

function gnuTar(args: string[], cwd?: string): Buffer {
  return execFileSync('tar', args, {
    cwd,
    env: { ...process.env, TZ: 'UTC', LC_ALL: 'C.UTF-8' },
    maxBuffer: 1 << 30,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
}

function listVerbose(archive: string): Listed[] {
  const out = gnuTar(['--numeric-owner', '--full-time', '--quoting-style=literal', '-tvf', archive]).toString('utf8');
  const lines = out.split('\n').filter((l) => l.length > 0);
  return lines.map((line) => {
    const m = LIST_LINE.exec(line);
    if (m === null) throw new Error(`unparsed tar -tv line: ${JSON.stringify(line)}`);
    let name = m[8];
    let link = '';
    if (m[1] === 'l') [name, link] = splitOnce(name, ' -> ');
    else if (m[1] === 'h') [name, link] = splitOnce(name, ' link to ');
    return { typeChar: m[1], perms: m[2], uid: Number(m[3]), gid: Number(m[4]), size: m[5], time: `${m[6]}T${m[7]}Z`, name, link };
  });
}

function splitOnce(s: string, sep: string): [string, string] {
  const i = s.indexOf(sep);
  if (i < 0) throw new Error(`no ${JSON.stringify(sep)} in ${JSON.stringify(s)}`);
  return [s.slice(0, i), s.slice(i + sep.length)];
}

function sameInstant(a: string, b: string): boolean {
  const x = parseModTime(a);
  const y = parseModTime(b);
  return x.seconds === y.seconds && x.nanos === y.nanos;
}

/** Compares our entries with `tar -tvf`, `tar -tf` and the data `tar -xO` extracts. */
function checkAgainstGnuTar(tt: Tap, archive: string, res: Result): void {
  const buf = fs.readFileSync(archive);
  const listed = listVerbose(archive);
  tt.equal(res.entries.length, listed.length, 'as many entries as tar -tv lists');
  const names = gnuTar(['--quoting-style=literal', '-tf', archive]).toString('utf8').split('\n');
  names.pop();
  tt.same(
    res.entries.map((e) => e.name),
    names,
    'names equal tar -tf',
  );
  let mismatches = 0;
  for (let i = 0; i < Math.min(listed.length, res.entries.length); i++) {
    const e = res.entries[i];
    const l = listed[i];
    const problems: string[] = [];
    if (TYPE_CHAR[e.type] !== l.typeChar) problems.push(`type ${e.type} vs ${l.typeChar}`);
    if (permString(e.mode) !== l.perms) problems.push(`mode ${e.mode.toString(8)} vs ${l.perms}`);
    if (e.uid !== l.uid || e.gid !== l.gid) problems.push(`owner ${e.uid}/${e.gid} vs ${l.uid}/${l.gid}`);
    const size = e.type === 'char' || e.type === 'block' ? `${e.devmajor},${e.devminor}` : String(e.uncompressedSize);
    if (size !== l.size) problems.push(`size ${size} vs ${l.size}`);
    if (!sameInstant(e.modTime, l.time)) problems.push(`mtime ${e.modTime} vs ${l.time}`);
    if (e.name !== l.name) problems.push(`name ${JSON.stringify(e.name)} vs ${JSON.stringify(l.name)}`);
    if ((e.type === 'symlink' || e.type === 'hardlink') && e.linkname !== l.link) {
      problems.push(`link ${JSON.stringify(e.linkname)} vs ${JSON.stringify(l.link)}`);
    }
    if (e.uncompressedOffset % 512 !== 0) problems.push(`offset ${e.uncompressedOffset} not block-aligned`);
    if (problems.length > 0) {
      mismatches++;
      if (mismatches <= 10) tt.fail(`entry ${i} ${JSON.stringify(e.name)}: ${problems.join('; ')}`);
    }
  }
  tt.equal(mismatches, 0, 'every entry matches tar -tv (type, mode, owner, size or device, mtime, name, link)');

  // Offsets: the bytes at [offset, offset + size) are what tar extracts, for every regular file.
  const regs = res.entries.filter((e) => e.type === 'reg');
  const listFile = `${archive}.names`;
  fs.writeFileSync(listFile, regs.map((e) => e.name + '\0').join(''));
  const extracted = gnuTar(['-xO', '--null', '--verbatim-files-from', '-T', listFile, '-f', archive]);
  const ours = Buffer.concat(regs.map((e) => buf.subarray(e.uncompressedOffset, e.uncompressedOffset + e.uncompressedSize)));
  tt.equal(ours.length, extracted.length, `${regs.length} regular files: as many data bytes as tar -xO`);
  tt.ok(ours.equals(extracted), 'data at each uncompressedOffset equals tar -xO output');
  // And one by one for a few files (first, largest, last).
  const sample = new Set<FileMetadata>();
  if (regs.length > 0) {
    sample.add(regs[0]);
    sample.add(regs[regs.length - 1]);
    sample.add(regs.reduce((a, b) => (b.uncompressedSize > a.uncompressedSize ? b : a)));
  }
  for (const e of sample) {
    const one = gnuTar(['-xO', '-f', archive, '--', e.name]);
    tt.ok(one.equals(buf.subarray(e.uncompressedOffset, e.uncompressedOffset + e.uncompressedSize)), `tar -xO ${e.name}`);
  }

  // archiveSize: just past the two zero blocks after the last entry's data and padding.
  const last = res.entries[res.entries.length - 1];
  const lastEnd =
    last === undefined ? 0 : last.uncompressedOffset + Math.ceil((last.type === 'reg' ? last.uncompressedSize : 0) / 512) * 512;
  tt.equal(res.archiveSize, lastEnd + 1024, 'archiveSize is past the end-of-archive marker');
  tt.ok(res.archiveSize <= buf.length && buf.subarray(res.archiveSize - 1024, res.archiveSize).every((c) => c === 0), 'marker is two zero blocks');
  tt.equal(buf.length % 10240, 0, 'GNU tar padded to its record size (so padding was ignored)');
}

function checkChunkings(tt: Tap, buf: Buffer, whole: Result, oneByte: boolean): void {
  const sizes: Array<[string, () => number]> = [
    ['511', fixed(511)],
    ['512', fixed(512)],
    ['513', fixed(513)],
    ['64 KiB', fixed(65536)],
    ['random 1..1000', randomSizes(1, 1000)],
    ['random 1..200000', randomSizes(2, 200000)],
  ];
  if (oneByte) sizes.unshift(['1', fixed(1)]);
  for (const [label, next] of sizes) {
    tt.same(index(buf, next), whole, `identical result with ${label}-byte chunks`);
  }
}

// ------------------------------------------------------------- fixtures

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'soci-ts-tar-test-'));
t.teardown(() => fs.rmSync(work, { recursive: true, force: true }));

const BUILD = String.raw`
set -euo pipefail
W="$1"
long() { local s=""; for ((i=0; i<$2; i++)); do s+="$1"; done; printf '%s' "$s"; }

# --- "special": every entry kind GNU tar can write, small data.
S="$W/special"; mkdir -p "$S"; cd "$S"
printf 'hello\n' > small.txt
: > empty
head -c 511 /dev/urandom > f511; head -c 512 /dev/urandom > f512; head -c 513 /dev/urandom > f513
head -c 70000 /dev/urandom > f70000
mkdir -p tree/a/b/c emptydir whdir
echo leaf > tree/a/b/c/leaf
ln small.txt zz-hardlink-to-small
ln -s small.txt symlink-rel
ln -s /usr/share/doc symlink-abs
LT="$(long target- 15)"
ln -s "$LT/$LT" symlink-long-target
D60="$(long d 60)"
mkdir -p "long/$D60/$D60"            # paths > 100
mkdir -p "deep/$D60/$D60/$D60/$D60/$D60"  # paths > 255
echo long1 > "long/$D60/$D60/file-in-long-dir"
echo deep1 > "deep/$D60/$D60/$D60/$D60/$D60/file-in-deep-dir"
echo longbase > "$(long n 150).txt"    # basename > 100
ln "deep/$D60/$D60/$D60/$D60/$D60/file-in-deep-dir" hardlink-to-deep  # long link target
mkfifo fifo
mknod chardev c 1 3
mknod blockdev b 7 0
setfattr -n user.foo -v bar small.txt
setfattr -n user.utf8 -v 'héllo wörld' f511
touch .wh.foo whdir/.wh..wh..opq
printf 'data' > 'ünïcødé 名前.txt'
printf 'spaces' > 'name with spaces'
chmod 4755 f512; chmod 2755 f513; chmod 1777 emptydir; chmod 600 f70000
touch -d '1969-07-20 20:17:40' before-epoch
touch -d '2021-03-04 05:06:07.123456789' small.txt
touch -d '2001-02-03 04:05:06.5' f513
touch -h -d '2011-12-13 14:15:16.000000001' symlink-rel

# --- "portable": what ustar can hold (prefix split; no long targets, no negative times).
P="$W/portable"; mkdir -p "$P"; cd "$P"
D40="$(long p 40)"
mkdir -p "$D40/$D40/$D40" dir
echo split > "$D40/$D40/$D40/file-needing-prefix"
printf 'x' > small; : > empty; head -c 1000 /dev/urandom > thousand
ln small hard; ln -s small sym; mkfifo fifo; mknod chardev c 1 3; mknod blockdev b 7 0
touch .wh.foo dir/.wh..wh..opq
touch -d '2020-01-02 03:04:05' small

# --- "v7": short names, regular files, dirs, links only.
V="$W/v7"; mkdir -p "$V/dir"; cd "$V"
echo one > dir/one; head -c 3000 /dev/urandom > three-k; ln dir/one hard; ln -s dir/one sym

# --- "bulk": real files from this machine.
B="$W/bulk"; mkdir -p "$B/doc" "$B/lib"
# awk, not head: head exits early and, under pipefail, the writer's SIGPIPE fails the script at random.
for d in $(ls /usr/share/doc | awk 'NR <= 60'); do cp -a "/usr/share/doc/$d" "$B/doc/"; done
find /usr/lib/x86_64-linux-gnu -maxdepth 1 -type f -size +200k -size -3M | sort | awk 'NR <= 8' | xargs -r cp -a -t "$B/lib/"

# --- sparse (rejected): a file with a hole.
SP="$W/sparse"; mkdir -p "$SP"; cd "$SP"
truncate -s 4M holey; printf 'end' >> holey
`;

execFileSync('bash', ['-c', BUILD, 'build', work], { stdio: ['ignore', 'inherit', 'inherit'] });

interface Archive {
  file: string;
  /** Small enough to feed one byte at a time. */
  oneByte: boolean;
}

function makeArchive(name: string, args: string[]): Archive {
  const file = path.join(work, name);
  gnuTar(['-cf', file, '--sort=name', ...args], work);
  return { file, oneByte: fs.statSync(file).size < (4 << 20) };
}

// ------------------------------------------------------------------ tests

const archives: Record<string, Archive> = {
  'gnu special': makeArchive('gnu-special.tar', ['--format=gnu', '-C', 'special', '.']),
  'gnu special, uid/gid > 2097151 (base-256)': makeArchive('gnu-big.tar', [
    '--format=gnu',
    '--owner=biguser:3000000',
    '--group=biggroup:4000000',
    '-C',
    'special',
    '.',
  ]),
  'posix special with xattrs': makeArchive('posix-special.tar', ['--format=posix', '--xattrs', '-C', 'special', '.']),
  'posix special, uid/gid > 2097151': makeArchive('posix-big.tar', [
    '--format=posix',
    '--owner=biguser:3000000',
    '--group=biggroup:4000000',
    '-C',
    'special',
    '.',
  ]),
  'ustar portable': makeArchive('ustar-portable.tar', ['--format=ustar', '-C', 'portable', '.']),
  'gnu portable (names without ./)': makeArchive('gnu-portable.tar', ['--format=gnu', '-C', 'portable', ...fs.readdirSync(path.join(work, 'portable'))]),
  'v7': makeArchive('v7.tar', ['--format=v7', '-C', 'v7', '.']),
  'gnu bulk': makeArchive('gnu-bulk.tar', ['--format=gnu', '-C', 'bulk', '.']),
  'posix bulk': makeArchive('posix-bulk.tar', ['--format=posix', '--xattrs', '-C', 'bulk', '.']),
  'ustar bulk': makeArchive('ustar-bulk.tar', ['--format=ustar', '-C', 'bulk', '.']),
};

const results = new Map<string, Result>();
for (const [label, a] of Object.entries(archives)) {
  t.test(`GNU tar oracle: ${label}`, async (tt) => {
    const buf = fs.readFileSync(a.file);
    const res = index(buf);
    results.set(label, res);
    checkAgainstGnuTar(tt, a.file, res);
    checkChunkings(tt, buf, res, a.oneByte);
  });
}

function byName(res: Result | undefined, suffix: string): FileMetadata {
  const e = res?.entries.find((x) => x.name.endsWith(suffix));
  if (e === undefined) throw new Error(`no entry ending in ${suffix}`);
  return e;
}

t.test('features seen in the GNU tar archives', async (tt) => {
  const gnu = results.get('gnu special');
  const big = results.get('gnu special, uid/gid > 2097151 (base-256)');
  const posix = results.get('posix special with xattrs');
  const posixBig = results.get('posix special, uid/gid > 2097151');
  const ustar = results.get('ustar portable');
  const v7 = results.get('v7');
  tt.ok(gnu && big && posix && posixBig && ustar && v7, 'oracle tests ran first');

  for (const [label, res] of [
    ['gnu', gnu],
    ['posix', posix],
  ] as const) {
    tt.ok(res!.entries.some((e) => e.name.length > 255 && e.type === 'reg'), `${label}: a name > 255 bytes`);
    tt.ok(res!.entries.some((e) => /\/n{150}\.txt$/.test(e.name)), `${label}: a basename > 100 bytes`);
    tt.equal(byName(res, 'symlink-long-target').linkname.length, 15 * 7 * 2 + 1, `${label}: symlink target > 100 bytes`);
    tt.ok(byName(res, 'hardlink-to-deep').linkname.endsWith('file-in-deep-dir'), `${label}: long hardlink target`);
    tt.equal(byName(res, 'hardlink-to-deep').type, 'hardlink');
    const chr = byName(res, 'chardev');
    tt.same([chr.type, chr.devmajor, chr.devminor], ['char', 1, 3], `${label}: char device 1,3`);
    const blk = byName(res, 'blockdev');
    tt.same([blk.type, blk.devmajor, blk.devminor], ['block', 7, 0], `${label}: block device 7,0`);
    tt.equal(byName(res, '/fifo').type, 'fifo', `${label}: fifo`);
    tt.equal(byName(res, '/.wh.foo').type, 'reg', `${label}: whiteout recorded as written`);
    tt.equal(byName(res, 'whdir/.wh..wh..opq').type, 'reg', `${label}: opaque marker recorded as written`);
    tt.equal(byName(res, '/before-epoch').modTime, '1969-07-20T20:17:40Z', `${label}: negative mtime`);
    tt.equal(byName(res, '/emptydir/').mode, 0o1777, `${label}: sticky dir mode`);
    tt.equal(byName(res, '/f512').mode, 0o4755, `${label}: setuid mode`);
    tt.ok(byName(res, 'ünïcødé 名前.txt').uncompressedSize === 4, `${label}: UTF-8 name`);
  }
  tt.equal(byName(gnu, 'small.txt').modTime, '2021-03-04T05:06:07Z', 'gnu: integer mtime');
  tt.equal(byName(posix, 'small.txt').modTime, '2021-03-04T05:06:07.123456789Z', 'posix: mtime with nanoseconds');
  tt.equal(byName(posix, '/f513').modTime, '2001-02-03T04:05:06.5Z', 'posix: trailing zeros of the fraction trimmed');
  tt.equal(byName(posix, 'symlink-rel').modTime, '2011-12-13T14:15:16.000000001Z', 'posix: one nanosecond');

  const xattrs = (e: FileMetadata) => e.paxRecords.filter(([k]) => k.startsWith('SCHILY.xattr.'));
  tt.same(xattrs(byName(posix, 'small.txt')), [['SCHILY.xattr.user.foo', 'bar']], 'posix: xattr recorded');
  // Values are byte strings (binary-safe); as text they read back as the UTF-8 written.
  tt.same(
    xattrs(byName(posix, '/f511')).map(([k, v]) => [k, paxValueText(v)]),
    [['SCHILY.xattr.user.utf8', 'héllo wörld']],
    'posix: UTF-8 xattr value',
  );
  for (const e of posix!.entries) {
    const keys = e.paxRecords.map(([k]) => k);
    tt.same(keys, [...keys].sort(), `posix: records of ${e.name} sorted`);
  }
  tt.same(byName(gnu, 'small.txt').paxRecords, [], 'gnu: no PAX records');

  const buf = fs.readFileSync(archives['gnu special, uid/gid > 2097151 (base-256)'].file);
  const e = byName(big, 'small.txt');
  tt.equal(buf[e.uncompressedOffset - 512 + 108] & 0x80, 0x80, 'gnu big: uid field really is base-256');
  tt.same([e.uid, e.gid, e.uname, e.gname], [3000000, 4000000, 'biguser', 'biggroup'], 'gnu big: base-256 uid/gid');
  const pe = byName(posixBig, 'small.txt');
  tt.same([pe.uid, pe.gid], [3000000, 4000000], 'posix big: uid/gid from PAX records');
  tt.ok(pe.paxRecords.some(([k, v]) => k === 'uid' && v === '3000000'), 'posix big: uid record kept');

  const split = byName(ustar, 'file-needing-prefix');
  tt.ok(split.name.length > 100, 'ustar: prefix joined with "/"');
  tt.equal(byName(v7, 'three-k').uname, '', 'v7: no user name');
  tt.equal(byName(v7, 'three-k').uncompressedSize, 3000, 'v7: size');
});

t.test('a base-256 size field in a real GNU tar: we and GNU tar read the same size and data', async (tt) => {
  // A real archive by GNU tar, then the size field of its largest regular file rewritten in
  // GNU's base-256 form (0x80, then the value big-endian in the other 11 bytes; GNU tar itself
  // writes it only for files of 8 GiB and more) and the header checksum fixed.
  const file = path.join(work, 'base256-size.tar');
  gnuTar(['--format=gnu', '-C', '/', '-cf', file, 'usr/share/doc/tar', 'usr/share/doc/gzip']);
  const buf = fs.readFileSync(file);
  // Where the header is: GNU tar's own block numbers (-R), checked against the header's bytes.
  const listed = gnuTar(['--numeric-owner', '-tvR', '-f', file]).toString('utf8').split('\n');
  let best: { block: number; size: number; name: string } | undefined;
  for (const line of listed) {
    const m = /^block (\d+): -\S+ \S+ +(\d+) \S+ \S+ (\S+)$/.exec(line);
    if (m !== null && (best === undefined || Number(m[2]) > best.size)) best = { block: Number(m[1]), size: Number(m[2]), name: m[3] };
  }
  if (best === undefined) throw new Error('no regular file in the archive');
  const at = best.block * 512;
  tt.equal(buf.toString('utf8', at, at + best.name.length), best.name, 'tar -R names the header block');
  tt.equal(parseInt(buf.toString('latin1', at + 124, at + 135), 8), best.size, 'its size field is octal before the rewrite');
  const field = Buffer.alloc(12);
  field.writeBigUInt64BE(BigInt(best.size), 4);
  field[0] = 0x80;
  field.copy(buf, at + 124);
  buf.fill(0x20, at + 148, at + 156);
  let sum = 0;
  for (let i = at; i < at + 512; i++) sum += buf[i];
  buf.write(sum.toString(8).padStart(6, '0') + '\0 ', at + 148, 8, 'latin1');
  fs.writeFileSync(file, buf);

  // GNU tar reads it without complaint (execFileSync throws on a non-zero exit).
  gnuTar(['-tf', file]);
  const res = index(buf);
  const e = res.entries.find((x) => x.name === best.name);
  tt.equal(e?.uncompressedSize, best.size, 'our size from the base-256 field is the file\'s size');
  tt.equal(e?.uncompressedOffset, at + 512, 'its data starts right after the header');
  // Every entry's size, type, name ... against tar -tv, every file's data against tar -xO.
  checkAgainstGnuTar(tt, file, res);
  checkChunkings(tt, buf, res, false);
});

t.test('GNU tar sparse files are rejected', async (tt) => {
  for (const format of ['gnu', 'posix']) {
    const file = path.join(work, `sparse-${format}.tar`);
    gnuTar(['-cf', file, `--format=${format}`, '--sparse', '-C', 'sparse', 'holey'], work);
    expectThrow(() => index(fs.readFileSync(file)), TarFormatError, /sparse files are not supported/, tt, `${format} sparse`);
  }
});

t.test('empty archives', async (tt) => {
  tt.same(index(Buffer.alloc(0)), { entries: [], archiveSize: 0 }, '0-byte stream');
  tt.same(index(END), { entries: [], archiveSize: 1024 }, 'only the end marker');
  tt.same(index(Buffer.alloc(10240)), { entries: [], archiveSize: 1024 }, 'end marker and record padding');
  tt.same(index(Buffer.alloc(512)), { entries: [], archiveSize: 512 }, 'a single zero block then EOF (Go: EOF)');
  const file = path.join(work, 'empty.tar');
  gnuTar(['-cf', file, '-T', '/dev/null']);
  tt.same(index(fs.readFileSync(file)), { entries: [], archiveSize: 1024 }, 'GNU tar archive of nothing');
  const ix = new TarIndexer({ source: 'x' });
  tt.equal(ix.done, false);
  ix.push(END, 0, 1024);
  tt.equal(ix.done, true, 'done after the marker');
  ix.push(Buffer.from('garbage after the end'), 0, 5);
  tt.same(ix.finish(), { entries: [], archiveSize: 1024 }, 'bytes after the marker ignored');
});

t.test('end of stream at an entry boundary without a marker', async (tt) => {
  const data = Buffer.from('abc');
  const buf = tar(entry({ name: 'a' }, data), entry({ name: 'b', type: '5' }));
  const res = index(buf);
  tt.equal(res.archiveSize, buf.length, 'archiveSize = stream length');
  tt.same(
    res.entries.map((e) => [e.name, e.type, e.uncompressedOffset, e.uncompressedSize]),
    [
      ['a', 'reg', 512, 3],
      ['b', 'dir', 1536, 0],
    ],
  );
});

t.test('hand-made headers: fields and formats', async (tt) => {
  const res = index(
    tar(
      entry({ name: 'v7file', format: 'v7', mode: 0o755 }, Buffer.from('v7')),
      entry({ name: 'c', prefix: 'a/b' }),
      entry({ name: 'starfile', prefix: 'star/prefix', format: 'star' }),
      // GNU: atime/ctime that do not parse → pre-Go1.8 prefix fallback.
      entry({ name: 'gnufile', format: 'gnu', prefix: 'oldprefix' }),
      entry({ name: 'gnuok', format: 'gnu', edit: (b) => octal(b, 345, 12, 1234) }),
      entry({
        name: 'spaces',
        mode: Buffer.from('  755 \0\0'),
        uid: Buffer.from('\0\0 12  \0'),
        gid: Buffer.from('       \0'),
        size: Buffer.from(' 3 \0        '),
        mtime: Buffer.from('1234567\0    '),
      }, Buffer.from('xyz')),
      entry({ name: 'signed-ü', checksum: 'signed' }),
      entry({ name: 'neg-uid', format: 'gnu', uid: base256(-5n, 8), gid: base256(3000000n, 8) }),
      entry({ name: 'regA-dir/', type: '\0', size: 700 }),
      entry({ name: 'regA-file', type: '\0' }, Buffer.from('A')),
      entry({ name: 'contiguous', type: '7' }, Buffer.alloc(600, 7)),
      entry({ name: 'sym-with-size', type: '2', linkname: 'target', size: 5000 }),
      entry({ name: '../../etc/passwd' }),
      entry({ name: '/absolute/path', type: '1', linkname: '../../escape' }),
      entry({ name: 'dev', type: '3', devmajor: 0o777777, devminor: 42 }),
      END,
    ),
  );
  const get = (n: string) => {
    const e = res.entries.find((x) => x.name === n);
    if (!e) throw new Error(`missing ${n}; have ${res.entries.map((x) => x.name).join(', ')}`);
    return e;
  };
  tt.same([get('v7file').uname, get('v7file').gname, get('v7file').mode], ['', '', 0o755], 'v7: no uname/gname');
  get('a/b/c');
  get('star/prefix/starfile');
  get('oldprefix/gnufile');
  get('gnuok');
  const sp = get('spaces');
  tt.same([sp.mode, sp.uid, sp.gid, sp.uncompressedSize, sp.modTime], [0o755, 0o12, 0, 3, formatModTime(0o1234567n, 0)], 'octal with spaces and NULs');
  get('signed-ü');
  tt.same([get('neg-uid').uid, get('neg-uid').gid], [-5, 3000000], 'base-256, negative too');
  tt.equal(get('regA-dir/').type, 'dir', "'\\0' with a trailing slash is a dir");
  tt.equal(get('regA-dir/').uncompressedSize, 700, 'size field kept');
  tt.equal(get('regA-file').type, 'reg');
  tt.equal(get('regA-file').uncompressedOffset, get('regA-dir/').uncompressedOffset + 512, 'no data skipped for the dir');
  tt.equal(get('contiguous').type, 'reg', "'7' is a regular file");
  tt.equal(get('sym-with-size').uncompressedSize, 5000);
  tt.equal(get('../../etc/passwd').uncompressedOffset, get('sym-with-size').uncompressedOffset + 512, 'header-only types skip no data (Go)');
  tt.equal(get('/absolute/path').linkname, '../../escape', 'hostile names recorded as written');
  tt.same([get('dev').devmajor, get('dev').devminor], [0o777777, 42]);
  tt.equal(res.archiveSize, get('dev').uncompressedOffset + 1024);
});

t.test('hand-made PAX and GNU long headers', async (tt) => {
  const longName = 'x/'.repeat(300) + 'name';
  const longLink = 'y/'.repeat(300) + 'link';
  const L = (s: string, type: string) => entry({ name: '././@LongLink', type, format: 'gnu' }, Buffer.from(s + '\0'));
  const res = index(
    tar(
      pax([
        ['path', 'pax/path/é'],
        ['size', '600'],
        ['uid', '5000000000'],
        ['gid', '7'],
        ['uname', 'üser'],
        ['gname', ''], // empty: keep the header's value
        ['mtime', '1700000000.5'],
        ['atime', '1700000000.25'],
        ['SCHILY.xattr.user.b', '2'],
        ['SCHILY.xattr.user.a', '1'],
        ['comment', 'first'],
        ['comment', 'second'], // last one wins
        ['z\u{1F600}', 'astral'],
        ['z\uFFFD', 'bmp'],
      ]),
      header({ name: 'ignored', size: 0, gname: 'hdrgroup' }),
      Buffer.alloc(1024, 1), // 600 bytes of data + padding, per the PAX size
      pax([['mtime', '-1.25']]),
      entry({ name: 'negative-time' }),
      pax([['path', 'replaced']]),
      pax([['linkpath', 'second-pax-wins']]), // a second PAX header replaces the first
      entry({ name: 'two-pax', type: '2', linkname: 'short' }),
      L(longName, 'L'),
      L(longLink, 'K'),
      entry({ name: 'short', type: '1', linkname: 'short', format: 'gnu' }),
      L('', 'L'), // empty long name: keep the header's
      pax([['path', 'from-pax']]),
      entry({ name: 'hdr' }),
      pax([['mtime', '253402300799.999999999']]),
      entry({ name: 'max-time' }),
      pax([['mtime', '-62167219200']]),
      entry({ name: 'min-time' }),
      entry({ name: 'after' }),
      END,
    ),
  );
  const [first, neg, two, long, hdr, max, min, after] = res.entries;
  tt.same(
    [first.name, first.uncompressedSize, first.uid, first.gid, first.uname, first.gname, first.modTime],
    ['pax/path/é', 600, 5000000000, 7, 'üser', 'hdrgroup', '2023-11-14T22:13:20.5Z'],
    'PAX overrides',
  );
  tt.same(
    first.paxRecords.map(([k]) => k),
    ['SCHILY.xattr.user.a', 'SCHILY.xattr.user.b', 'atime', 'comment', 'gid', 'gname', 'mtime', 'path', 'size', 'uid', 'uname', 'z\uFFFD', 'z\u{1F600}'],
    'records sorted by UTF-8 bytes, duplicates folded',
  );
  tt.same(first.paxRecords.find(([k]) => k === 'comment'), ['comment', 'second'], 'last record wins');
  tt.same(first.paxRecords.find(([k]) => k === 'gname'), ['gname', ''], 'empty values kept verbatim');
  tt.equal(first.uncompressedOffset, 1536, 'offset is past the PAX header, its payload and the entry header');
  tt.equal(neg.modTime, '1969-12-31T23:59:58.75Z', 'negative fractional PAX mtime');
  tt.equal(neg.uncompressedOffset, first.uncompressedOffset + 1024 + 1536);
  tt.same([two.name, two.linkname], ['two-pax', 'second-pax-wins'], 'a later PAX header replaces an earlier one');
  tt.same([long.name, long.linkname, long.type], [longName, longLink, 'hardlink'], 'GNU L and K');
  tt.same(long.paxRecords, [], 'GNU long names are not PAX records');
  tt.equal(hdr.name, 'from-pax', 'empty L ignored');
  tt.equal(max.modTime, '9999-12-31T23:59:59.999999999Z');
  tt.equal(min.modTime, '0000-01-01T00:00:00Z');
  tt.same([after.name, after.paxRecords], ['after', []], 'PAX records apply to one entry only');
});

t.test('unsupported and invalid input', async (tt) => {
  const ok = entry({ name: 'ok' }, Buffer.from('fine'));
  expectIndexError(tar(pax([['comment', 'x']], 'g'), ok, END), TarFormatError, /global header/, tt, 'PAX global header');
  expectIndexError(tar(entry({ name: 'sp', type: 'S', format: 'gnu' }), END), TarFormatError, /"sp".*sparse files are not supported/, tt, 'GNU sparse S');
  expectIndexError(
    tar(pax([['GNU.sparse.major', '1'], ['GNU.sparse.minor', '0'], ['GNU.sparse.name', 'f']]), ok, END),
    TarFormatError,
    /sparse files are not supported/,
    tt,
    'PAX sparse',
  );
  expectIndexError(tar(entry({ name: 'vol', type: 'V' }), END), TarFormatError, /"vol".*unsupported typeflag 'V'/, tt, 'volume label');
  expectIndexError(tar(entry({ name: 'ctl', type: '\x01' }), END), TarFormatError, /unsupported typeflag 0x01/, tt, 'control typeflag');

  const corrupt = tar(ok, entry({ name: 'bad', checksum: 1234 }), END);
  expectIndexError(corrupt, TarFormatError, /^test\.tar: header at offset 1024: invalid tar header: checksum 1234/, tt, 'checksum mismatch');
  const flipped = Buffer.from(tar(ok, END));
  flipped[10] ^= 1;
  expectIndexError(flipped, TarFormatError, /checksum/, tt, 'one bit flipped');
  expectIndexError(tar(entry({ name: 'x', edit: (b) => b.write('12z', 100, 'latin1') }), END), TarFormatError, /bad or out-of-range mode field/, tt, 'non-octal digit');
  const unparsable = header({ name: 'x' });
  unparsable.write('zz', 148, 'latin1');
  expectIndexError(tar(unparsable, END), TarFormatError, /unparsable checksum field "zz/, tt, 'unparsable checksum field');
  expectIndexError(tar(ok, Buffer.alloc(512), ok, END), TarFormatError, /zero block is followed by a non-zero block/, tt, 'zero block then header');

  // Truncation.
  const big = tar(entry({ name: 'big' }, Buffer.alloc(1000, 9)), END);
  expectIndexError(big.subarray(0, 700), TarFormatError, /truncated data of entry "big".*ends at offset 700, data ends at 1512/, tt, 'truncated data');
  expectIndexError(big.subarray(0, 1520), TarFormatError, /truncated padding after entry "big".*ends at offset 1520, padding ends at 1536/, tt, 'truncated padding');
  expectIndexError(big.subarray(0, 300), TarFormatError, /truncated header/, tt, 'truncated header');
  expectIndexError(tar(ok, Buffer.alloc(512)).subarray(0, 1024 + 100), TarFormatError, /truncated header/, tt, 'truncated second zero block');
  expectIndexError(pax([['path', 'p']]).subarray(0, 520), TarFormatError, /truncated PAX extended header/, tt, 'truncated PAX payload');
  // A size that lies: too big runs off the end; too small lands inside data.
  expectIndexError(tar(header({ name: 'liar', size: 4096 }), pad512(Buffer.alloc(100, 1)), END), TarFormatError, /truncated data/, tt, 'size too big');
  expectIndexError(tar(header({ name: 'liar', size: 10 }), Buffer.alloc(1024, 0x41), END), TarFormatError, /checksum/, tt, 'size too small');

  // Numbers.
  expectIndexError(tar(entry({ name: 'neg', format: 'gnu', size: base256(-1n, 12) }), END), TarFormatError, /negative size -1/, tt, 'negative base-256 size');
  expectIndexError(tar(entry({ name: 'huge', format: 'gnu', size: base256(1n << 60n, 12) }), END), TarFormatError, /size field/, tt, 'size beyond 2^53');
  expectIndexError(tar(entry({ name: 'huge', format: 'gnu', uid: base256(-(1n << 60n), 8) }), END), TarFormatError, /uid field/, tt, 'negative uid beyond 2^53');
  expectIndexError(tar(entry({ name: 'far', format: 'gnu', mtime: base256(253402300800n, 12) }), END), TarFormatError, /"far".*outside years 0000-9999/, tt, 'year 10000');
  expectIndexError(tar(pax([['mtime', '-62167219201']]), ok, END), TarFormatError, /outside years/, tt, 'year -1');
  expectIndexError(tar(pax([['size', '-1']]), ok, END), TarFormatError, /negative size -1/, tt, 'negative PAX size');
  expectIndexError(tar(pax([['size', '9007199254740992']]), ok, END), TarFormatError, /safe integer/, tt, 'PAX size beyond 2^53');
  expectIndexError(tar(pax([['uid', 'abc']]), ok, END), TarFormatError, /invalid PAX record uid="abc"/, tt, 'PAX uid not a number');
  expectIndexError(tar(pax([['gid', '99999999999999999999']]), ok, END), TarFormatError, /invalid PAX record gid/, tt, 'PAX gid beyond int64');
  expectIndexError(tar(pax([['mtime', '1.x']]), ok, END), TarFormatError, /invalid PAX record mtime/, tt, 'PAX mtime');
  expectIndexError(tar(pax([['mtime', '.5']]), ok, END), TarFormatError, /invalid PAX record mtime/, tt, 'PAX mtime without seconds');
  expectIndexError(tar(pax([['ctime', 'never']]), ok, END), TarFormatError, /invalid PAX record ctime/, tt, 'PAX ctime');

  // Malformed PAX record syntax.
  const malformed: Array<[string, string | Buffer]> = [
    ['length too short', '10 path=abc\n'],
    ['length too long', '13 path=abc\n'],
    ['no newline', '12 path=abcX'],
    ['no equals sign', '11 pathabc\n'],
    ['empty key', '9 =value\n'],
    ['NUL in path', Buffer.from('12 path=a\0c\n', 'latin1')],
    ['NUL in key', Buffer.from('12 pa\0h=abc\n', 'latin1')],
    ['length not a number', '1x path=abc\n'],
    ['no length', 'path=abc\n'],
    ['trailing NULs', Buffer.concat([Buffer.from('12 path=abc\n'), Buffer.alloc(4)])],
    ['length below 5', '3 a=\n'],
  ];
  for (const [label, payload] of malformed) {
    expectIndexError(tar(paxRaw(payload), ok, END), TarFormatError, /malformed PAX record/, tt, `PAX: ${label}`);
  }
  tt.same(index(tar(paxRaw('+13 path=abc\n'), ok, END)).entries[0].name, 'abc', 'Go accepts a "+" sign on the length');
  tt.same(index(tar(paxRaw(Buffer.from('13 comment=\0\n', 'latin1')), ok, END)).entries[0].paxRecords, [['comment', '\0']], 'NUL allowed in other values (Go)');
  tt.same(index(tar(paxRaw(''), ok, END)).entries[0].paxRecords, [], 'empty PAX header');
  tt.same(index(tar(ok, pax([['path', 'dangling']]))).entries.length, 1, 'PAX header at the end of the stream is dropped (Go: EOF)');

  // Limits.
  expectIndexError(tar(ok, ok, ok, END), LimitError, /more than 2 entries/, tt, 'maxEntries', { maxEntries: 2 });
  tt.equal(index(tar(ok, ok, END), undefined, { maxEntries: 2 }).entries.length, 2, 'exactly maxEntries is fine');
  expectIndexError(tar(header({ name: 'PaxHeaders/x', type: 'x', size: (1 << 20) + 1 }), END), LimitError, /PAX extended header .* 1048577 bytes/, tt, 'PAX payload > 1 MiB');
  expectIndexError(tar(header({ name: '././@LongLink', type: 'L', format: 'gnu', size: 1 << 21 }), END), LimitError, /GNU long name/, tt, 'long name > 1 MiB');
  const mib = Buffer.alloc(1 << 20, 0x61);
  const res = index(tar(entry({ name: '././@LongLink', type: 'L', format: 'gnu' }, mib), ok, END));
  tt.equal(res.entries[0].name.length, 1 << 20, 'a long name of exactly 1 MiB is accepted (as Go)');
});

t.test('errors are sticky and the API is checked', async (tt) => {
  const ix = new TarIndexer({ source: 'layer-x' });
  const bad = header({ name: 'bad', checksum: 1 });
  const e1 = expectThrow(() => ix.push(bad, 0, 512), TarFormatError, /^layer-x: /, tt, 'first error names the source');
  const e2 = expectThrow(() => ix.push(END, 0, 512), TarFormatError, /checksum/, tt, 'later push');
  const e3 = expectThrow(() => ix.finish(), TarFormatError, /checksum/, tt, 'finish');
  tt.equal(e1, e2, 'same error object');
  tt.equal(e1, e3, 'same error object');
  tt.ok(e1 instanceof ZtocError && (e1 as ZtocError).subject === 'layer-x');

  const ok = new TarIndexer({ source: 's' });
  ok.push(END, 0, END.length);
  const r = ok.finish();
  tt.equal(ok.finish(), r, 'finish() is idempotent');
  expectThrow(() => ok.push(END, 0, 1), TarFormatError, /after finish/, tt, 'push after finish');
  tt.throws(() => new TarIndexer({ source: 's' }).push(END, 10, 5), RangeError, 'bad range');
  tt.throws(() => new TarIndexer({ source: 's' }).push(END, 0, 5000), RangeError, 'range past the chunk');
  tt.throws(() => new TarIndexer({ source: 's', maxEntries: -1 }), RangeError, 'bad maxEntries');
});

t.test('formatModTime / parseModTime', async (tt) => {
  tt.equal(formatModTime(0n, 0), '1970-01-01T00:00:00Z');
  tt.equal(formatModTime(1714558830n, 0), '2024-05-01T10:20:30Z');
  tt.equal(formatModTime(1714558830n, 500000000), '2024-05-01T10:20:30.5Z');
  tt.equal(formatModTime(1714558830n, 120), '2024-05-01T10:20:30.00000012Z');
  tt.equal(formatModTime(-1n, 250000000), '1969-12-31T23:59:59.25Z');
  tt.equal(formatModTime(951782400n, 0), '2000-02-29T00:00:00Z', 'leap day');
  tt.equal(formatModTime(-62167219200n, 0), '0000-01-01T00:00:00Z');
  tt.equal(formatModTime(253402300799n, 999999999), '9999-12-31T23:59:59.999999999Z');
  tt.throws(() => formatModTime(253402300800n, 0), ZtocFormatError, 'year 10000');
  tt.throws(() => formatModTime(-62167219201n, 0), ZtocFormatError, 'year -1');
  tt.throws(() => formatModTime(0n, 1e9), ZtocFormatError, 'nanos out of range');

  // Against the JS Date implementation, across the whole range.
  const r = rng(42);
  for (let i = 0; i < 2000; i++) {
    const s = Math.floor(-62167219200 + r() * (253402300799 + 62167219200));
    const iso = new Date(s * 1000).toISOString().replace('.000Z', 'Z');
    const ours = formatModTime(BigInt(s), 0);
    if (ours !== iso) {
      tt.equal(ours, iso, `seconds ${s}`);
      break;
    }
    const ns = Math.floor(r() * 1e9);
    const back = parseModTime(formatModTime(BigInt(s), ns));
    if (back.seconds !== BigInt(s) || back.nanos !== ns) {
      tt.fail(`round trip ${s}.${ns}`);
      break;
    }
  }
  tt.pass('2000 random instants agree with Date and round-trip');

  tt.same(parseModTime('2024-05-01T10:20:30Z'), { seconds: 1714558830n, nanos: 0 });
  tt.same(parseModTime('2024-05-01T10:20:30.5Z'), { seconds: 1714558830n, nanos: 500000000 });
  tt.same(parseModTime('2024-05-01T12:20:30.5+02:00'), { seconds: 1714558830n, nanos: 500000000 }, 'positive zone');
  tt.same(parseModTime('2024-05-01T04:50:30-05:30'), { seconds: 1714558830n, nanos: 0 }, 'negative zone');
  tt.same(parseModTime('2024-05-01T10:20:30.1234567891234Z'), { seconds: 1714558830n, nanos: 123456789 }, 'more than 9 digits truncated');
  tt.same(parseModTime('0000-01-01T00:30:00+01:00'), { seconds: -62167219200n - 1800n, nanos: 0 }, 'zone shifting before year 0');
  for (const bad of [
    '',
    'garbage',
    '2024-05-01',
    '2024-05-01 10:20:30Z',
    '2024-05-01t10:20:30Z',
    '2024-05-01T10:20:30z',
    '2024-05-01T10:20:30',
    '2024-13-01T10:20:30Z',
    '2024-00-01T10:20:30Z',
    '2023-02-29T10:20:30Z',
    '2024-04-31T10:20:30Z',
    '2024-05-01T24:00:00Z',
    '2024-05-01T10:60:00Z',
    '2024-05-01T10:20:60Z',
    '2024-05-01T10:20:30.Z',
    '2024-05-01T10:20:30+24:00',
    '2024-05-01T10:20:30+02:60',
    '2024-05-01T10:20:30+0200',
    '+2024-05-01T10:20:30Z',
  ]) {
    tt.throws(() => parseModTime(bad), ZtocFormatError, `rejects ${JSON.stringify(bad)}`);
  }
});

t.test('performance: ~200 MB synthetic layer', async (tt) => {
  // Many small files (header-bound) plus a few large ones (skip-bound).
  const r = rng(7);
  const parts: Buffer[] = [];
  let total = 0;
  let count = 0;
  while (total < 150 << 20) {
    const size = Math.floor(r() * 1024);
    const name = `usr/share/files/dir${count % 100}/file-${count}.txt`;
    parts.push(header({ name, size }));
    if (size > 0) parts.push(Buffer.alloc(Math.ceil(size / 512) * 512));
    total += 512 + Math.ceil(size / 512) * 512;
    count++;
  }
  for (let i = 0; i < 50; i++) {
    parts.push(header({ name: `big/blob-${i}`, size: 1 << 20 }), Buffer.alloc(1 << 20));
    count++;
  }
  parts.push(END);
  const buf = Buffer.concat(parts);
  parts.length = 0;
  const chunk = 65536;
  const mb = buf.length / 1e6;
  // Twice: the first pass includes JIT warm-up.
  for (const pass of ['cold', 'warm']) {
    const start = process.hrtime.bigint();
    const ix = new TarIndexer({ source: 'perf' });
    for (let p = 0; p < buf.length; p += chunk) ix.push(buf, p, Math.min(p + chunk, buf.length));
    const res = ix.finish();
    const secs = Number(process.hrtime.bigint() - start) / 1e9;
    tt.equal(res.entries.length, count);
    tt.equal(res.archiveSize, buf.length);
    const line =
      `tar indexer (${pass}): ${mb.toFixed(0)} MB, ${count} entries in ${secs.toFixed(3)} s = ` +
      `${(mb / secs).toFixed(0)} MB/s, ${(count / secs / 1000).toFixed(0)}k entries/s (64 KiB chunks)`;
    tt.comment(line);
    console.error(line);
  }
});

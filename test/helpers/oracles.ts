/**
 * Independent oracles for zTOC tests: real zlib (test/oracle/ckpt-oracle.c), GNU tar,
 * gzip, dd, sha256sum and flatc. Nothing here imports soci-ts code, so a bug in our
 * reader cannot hide itself by agreeing with its own checker.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CommandError, FixtureError, run, testCacheDir } from './layers.js';

/** An oracle could not run or its output made no sense; names the input and the reason. */
export class OracleError extends FixtureError {}

// ---------------------------------------------------------------------------------------
// The checkpoint oracle binary

/** Finds test/oracle/ckpt-oracle.c from this module (dist/test/helpers/ or test/helpers/). */
async function oracleSource(): Promise<string> {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const candidate = path.join(dir, 'test', 'oracle', 'ckpt-oracle.c');
    try {
      await fsp.access(candidate);
      return candidate;
    } catch {
      dir = path.dirname(dir);
    }
  }
  throw new OracleError('ckpt-oracle.c', 'source not found above ' + path.dirname(fileURLToPath(import.meta.url)));
}

let oracleBinary: Promise<string> | undefined;

/**
 * Compiles ckpt-oracle.c into `cacheDir` once (keyed by the source's hash, so an edited
 * source is recompiled) and returns the binary's path.
 */
export function buildCkptOracle(cacheDir: string = testCacheDir()): Promise<string> {
  const p = (async () => {
    const src = await oracleSource();
    const hash = createHash('sha256').update(await fsp.readFile(src)).digest('hex').slice(0, 16);
    const bin = path.join(cacheDir, `ckpt-oracle-${hash}`);
    try {
      await fsp.access(bin, fsp.constants.X_OK);
      return bin;
    } catch {
      // not built yet
    }
    await fsp.mkdir(cacheDir, { recursive: true });
    const tmp = `${bin}.tmp-${process.pid}-${Math.random().toString(16).slice(2)}`;
    await run('cc', ['-O2', '-Wall', '-o', tmp, src, '-lz']);
    await fsp.rename(tmp, bin); // atomic: concurrent builders produce the same binary
    return bin;
  })();
  oracleBinary = p;
  p.catch(() => {
    if (oracleBinary === p) oracleBinary = undefined;
  });
  return p;
}

function oracle(): Promise<string> {
  return oracleBinary ?? buildCkptOracle();
}

export interface OracleCheckpoint {
  k: number;
  in: number;
  out: number;
  bits: number;
  /** SHA-256 (hex) of the bytes inflated from this checkpoint, or null when inflating failed. */
  sha256: string | null;
  /** How many bytes were produced (fewer than requested at the stream's end). */
  produced: number;
  /** SHA-256 (hex) of the stored 32 KiB window (zeros for v1's implied checkpoint 0). */
  windowSha256: string | null;
  /** Why inflating failed, or null. */
  error: string | null;
}

export interface OracleReport {
  layout: 'v1' | 'v2';
  count: number;
  spanSize: number;
  blobSize: number;
  checkpoints: OracleCheckpoint[];
}

/**
 * Runs the checkpoint oracle: inflates `len` bytes from every checkpoint of `blobPath`
 * over `layerPath`. Rejects with OracleError when the blob is malformed (exit 2); failed
 * checkpoints come back with `error` set.
 */
export async function oracleCheckpoints(blobPath: string, layerPath: string, len = 65536): Promise<OracleReport> {
  const bin = await oracle();
  let res;
  try {
    res = await run(bin, [blobPath, layerPath, String(len)], { okCodes: [0, 3] });
  } catch (e) {
    if (e instanceof CommandError) throw new OracleError(blobPath, e.stderr.trim() || e.message, { cause: e });
    throw e;
  }
  const lines = res.stdout.split('\n').filter((l) => l !== '');
  const head = /^# layout=(v[12]) count=(\d+) span_size=(\d+) blob_size=(\d+)$/.exec(lines[0] ?? '');
  if (head === null) throw new OracleError(blobPath, `unexpected oracle header: ${lines[0] ?? '(none)'}`);
  const checkpoints: OracleCheckpoint[] = [];
  for (const line of lines.slice(1)) {
    const m = /^(\d+) (\d+) (\d+) (\d) (?:([0-9a-f]{64}) (\d+) ([0-9a-f]{64})|ERROR (\d+) (.*))$/.exec(line);
    if (m === null) throw new OracleError(blobPath, `unexpected oracle line: ${line}`);
    const ok = m[5] !== undefined;
    checkpoints.push({
      k: Number(m[1]),
      in: Number(m[2]),
      out: Number(m[3]),
      bits: Number(m[4]),
      sha256: ok ? (m[5] ?? null) : null,
      produced: Number(ok ? m[6] : m[8]),
      windowSha256: ok ? (m[7] ?? null) : null,
      error: ok ? null : (m[9] ?? ''),
    });
  }
  return {
    layout: head[1] as 'v1' | 'v2',
    count: Number(head[2]),
    spanSize: Number(head[3]),
    blobSize: Number(head[4]),
    checkpoints,
  };
}

export interface SpanRange {
  index: number;
  /** First byte of the span in the compressed layer (in − 1 when bits > 0). */
  start: number;
  /** One past the span's last byte (the next checkpoint's `in`, or the layer's size). */
  end: number;
}

/** Each span's compressed byte range, as the oracle reads the blob (`--spans`). */
export async function oracleSpans(blobPath: string, layerPath: string): Promise<SpanRange[]> {
  const bin = await oracle();
  let res;
  try {
    res = await run(bin, ['--spans', blobPath, layerPath]);
  } catch (e) {
    if (e instanceof CommandError) throw new OracleError(blobPath, e.stderr.trim() || e.message, { cause: e });
    throw e;
  }
  return res.stdout
    .split('\n')
    .filter((l) => l !== '')
    .map((line) => {
      const m = /^(\d+) (\d+) (\d+)$/.exec(line);
      if (m === null) throw new OracleError(blobPath, `unexpected --spans line: ${line}`);
      return { index: Number(m[1]), start: Number(m[2]), end: Number(m[3]) };
    });
}

/**
 * Builds a v2 checkpoint blob for `layerPath` with the oracle's own zlib implementation of
 * §3's rule (reference for comparing our writer byte for byte). Returns `outBlob`.
 */
export async function oracleBuild(layerPath: string, spanSize: number, outBlob: string): Promise<string> {
  const bin = await oracle();
  await run(bin, ['--build', String(spanSize), layerPath, outBlob]);
  return outBlob;
}

export interface GzipMember {
  index: number;
  /** Offset of the member's first header byte. */
  start: number;
  /** One past the member's trailer. */
  end: number;
  headerLength: number;
  uncompressedSize: number;
}

/** The gzip members of a layer, as real zlib sees them (`--members`). */
export async function gzipMembers(layerPath: string): Promise<GzipMember[]> {
  const bin = await oracle();
  const res = await run(bin, ['--members', layerPath]);
  return res.stdout
    .split('\n')
    .filter((l) => l !== '')
    .map((line) => {
      const m = /^(\d+) (\d+) (\d+) (-?\d+) (\d+)$/.exec(line);
      if (m === null) throw new OracleError(layerPath, `unexpected --members line: ${line}`);
      return {
        index: Number(m[1]),
        start: Number(m[2]),
        end: Number(m[3]),
        headerLength: Number(m[4]),
        uncompressedSize: Number(m[5]),
      };
    });
}

/**
 * Length of the gzip member header at the start of `buf` (RFC 1952: 10 fixed bytes, then
 * FEXTRA, FNAME, FCOMMENT, FHCRC when flagged). Rejects anything that is not gzip.
 */
export function gzipHeaderLength(buf: Uint8Array, subject = 'gzip header'): number {
  if (buf.length < 10 || buf[0] !== 0x1f || buf[1] !== 0x8b) throw new OracleError(subject, 'no gzip magic');
  if (buf[2] !== 8) throw new OracleError(subject, `compression method ${String(buf[2])} is not deflate`);
  const flg = buf[3] ?? 0;
  if ((flg & 0xe0) !== 0) throw new OracleError(subject, `reserved flag bits set (0x${flg.toString(16)})`);
  let pos = 10;
  const need = (n: number): void => {
    if (pos + n > buf.length) throw new OracleError(subject, 'header truncated');
  };
  if (flg & 0x04) {
    need(2);
    pos += 2 + ((buf[pos] ?? 0) | ((buf[pos + 1] ?? 0) << 8));
  }
  for (const bit of [0x08, 0x10]) {
    if (flg & bit) {
      const nul = buf.indexOf(0, pos);
      if (nul < 0) throw new OracleError(subject, 'unterminated name/comment');
      pos = nul + 1;
    }
  }
  if (flg & 0x02) pos += 2;
  need(0);
  return pos;
}

// ---------------------------------------------------------------------------------------
// gzip -dc ranges

export interface RangeDigest {
  /** SHA-256 (hex) of the bytes found. */
  sha256: string;
  /** How many bytes there were (fewer than asked at the stream's end). */
  length: number;
}

export interface ByteRange {
  offset: number;
  /** Bytes wanted; Infinity = to the end. */
  len: number;
}

/**
 * SHA-256 of bytes [offset, offset+len) of several ranges of `gzip -dc layerPath`'s output,
 * in one streaming pass (nothing held in memory; gzip is stopped once all ranges are done).
 */
export function gzipDcRanges(layerPath: string, ranges: readonly ByteRange[]): Promise<RangeDigest[]> {
  const order = ranges.map((r, i) => ({ ...r, i })).sort((a, b) => a.offset - b.offset);
  const hashes = ranges.map(() => createHash('sha256'));
  const got = ranges.map(() => 0);
  return new Promise<RangeDigest[]>((resolve, reject) => {
    const child = spawn('gzip', ['-dc', layerPath], { stdio: ['ignore', 'pipe', 'pipe'] });
    let pos = 0;
    let next = 0; // first range in `order` not yet started
    let active: typeof order = [];
    let stopped = false;
    let stderr = '';
    const finish = (): RangeDigest[] => hashes.map((h, i) => ({ sha256: h.digest('hex'), length: got[i] ?? 0 }));
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    child.stdout.on('data', (chunk: Buffer) => {
      if (stopped) return;
      const end = pos + chunk.length;
      while (next < order.length && (order[next]?.offset ?? Infinity) < end) active.push(order[next++] as (typeof order)[number]);
      for (const r of active) {
        const from = Math.max(r.offset, pos);
        const to = Math.min(r.offset + r.len, end);
        if (to > from) {
          hashes[r.i]?.update(chunk.subarray(from - pos, to - pos));
          got[r.i] = (got[r.i] ?? 0) + (to - from);
        }
      }
      active = active.filter((r) => r.offset + r.len > end);
      pos = end;
      if (next >= order.length && active.length === 0) {
        stopped = true; // everything hashed: no need to inflate the rest
        child.kill('SIGTERM');
        resolve(finish());
      }
    });
    child.on('error', (e) => reject(new OracleError(layerPath, `gzip: ${e.message}`, { cause: e })));
    child.on('close', (code, signal) => {
      if (stopped) return;
      if (code === 0) resolve(finish());
      else reject(new CommandError('gzip', ['-dc', layerPath], code, signal, stderr));
    });
  });
}

/** SHA-256 of bytes [offset, offset+len) of `gzip -dc layerPath` (len = Infinity: to the end). */
export async function gzipDcRange(layerPath: string, offset: number, len: number): Promise<RangeDigest> {
  const [r] = await gzipDcRanges(layerPath, [{ offset, len }]);
  if (r === undefined) throw new OracleError(layerPath, 'no digest');
  return r;
}

// ---------------------------------------------------------------------------------------
// Files and spans (dd + sha256sum)

/** Pipes `cmd args` into sha256sum; returns the hex digest. */
function sha256sumOf(cmd: string, args: readonly string[]): Promise<string> {
  return new Promise<string>((resolve, reject) => {
    const src = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const sum = spawn('sha256sum', ['-b'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    src.stderr.on('data', (b: Buffer) => (err += b.toString()));
    sum.stderr.on('data', (b: Buffer) => (err += b.toString()));
    sum.stdout.on('data', (b: Buffer) => (out += b.toString()));
    src.stdout.pipe(sum.stdin);
    let srcDone: number | null | undefined;
    let sumDone: number | null | undefined;
    const done = (): void => {
      if (srcDone === undefined || sumDone === undefined) return;
      const m = /^([0-9a-f]{64}) /.exec(out);
      if (srcDone === 0 && sumDone === 0 && m !== null) resolve(m[1] ?? '');
      else reject(new CommandError(`${cmd} | sha256sum`, args, srcDone !== 0 ? srcDone : sumDone, null, err));
    };
    src.on('error', reject);
    sum.on('error', reject);
    src.on('close', (c) => ((srcDone = c), done()));
    sum.on('close', (c) => ((sumDone = c), done()));
  });
}

/** sha256sum of a whole file. */
export function fileSha256(filePath: string): Promise<string> {
  return sha256sumOf('cat', [filePath]);
}

/** sha256sum of bytes [start, end) of a file, cut with dd. */
export function fileRangeSha256(filePath: string, start: number, end: number): Promise<string> {
  return sha256sumOf('dd', [
    `if=${filePath}`,
    'bs=1M',
    'iflag=skip_bytes,count_bytes',
    `skip=${start}`,
    `count=${Math.max(0, end - start)}`,
    'status=none',
  ]);
}

/** `sha256:<hex>` per span, from the oracle's span ranges, dd and sha256sum. */
export async function spanDigests(blobPath: string, layerPath: string): Promise<string[]> {
  const spans = await oracleSpans(blobPath, layerPath);
  const out: string[] = [];
  for (const s of spans) out.push(`sha256:${await fileRangeSha256(layerPath, s.start, s.end)}`);
  return out;
}

// ---------------------------------------------------------------------------------------
// GNU tar

export interface TarTvEntry {
  /** The name as stored (e.g. `./usr/bin/`), with tar's escapes decoded. */
  name: string;
  /** `-` regular, `h` hardlink, `l` symlink, `d` dir, `c`, `b`, `p` fifo (others as tar prints them). */
  type: string;
  /** The nine permission characters, e.g. `rwsr-xr-x`. */
  mode: string;
  uid: number;
  gid: number;
  /** Size column; null for devices. */
  size: number | null;
  devMajor: number | null;
  devMinor: number | null;
  /** As printed with --full-time in UTC, e.g. `2021-03-04 05:06:07.123456789`. */
  mtime: string;
  /** Symlink or hardlink target, or null. */
  link: string | null;
  /** Xattr names (only with `{ xattrs: true }`). */
  xattrs: string[];
}

/** Decodes GNU tar's `escape` quoting (\\, \n, \t, …, \ooo octal bytes) into UTF-8 text. */
export function unescapeTarName(s: string): string {
  const bytes: number[] = [];
  const simple: Record<string, number> = { '\\': 92, a: 7, b: 8, f: 12, n: 10, r: 13, t: 9, v: 11, '?': 63, '"': 34, "'": 39 };
  const raw = Buffer.from(s, 'utf8');
  for (let i = 0; i < raw.length; i++) {
    const c = raw[i] ?? 0;
    if (c !== 92 || i + 1 >= raw.length) {
      bytes.push(c);
      continue;
    }
    const n = String.fromCharCode(raw[i + 1] ?? 0);
    const oct = /^[0-7]{3}$/.exec(String.fromCharCode(raw[i + 1] ?? 0, raw[i + 2] ?? 0, raw[i + 3] ?? 0));
    if (oct !== null) {
      bytes.push(parseInt(oct[0], 8));
      i += 3;
    } else if (simple[n] !== undefined) {
      bytes.push(simple[n] ?? 0);
      i += 1;
    } else {
      bytes.push(c);
    }
  }
  return Buffer.from(bytes).toString('utf8');
}

const TV_LINE =
  /^(\S)(\S{9})\S?\s+(\d+)\/(\d+)\s+(?:(\d+),(\d+)|(\d+))\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)\s+(.*)$/;

/**
 * `tar --numeric-owner --full-time -tvf` of a .tar or .tar.gz (tar detects gzip itself),
 * parsed. Times in UTC. With `xattrs`, runs `--xattrs -tvvf` and collects xattr names.
 */
export async function tarTv(tarOrLayerPath: string, opts: { xattrs?: boolean } = {}): Promise<TarTvEntry[]> {
  const args = ['--numeric-owner', '--full-time', '--quoting-style=escape'];
  if (opts.xattrs === true) args.push('--xattrs', '-tvvf');
  else args.push('-tvf');
  const res = await run('tar', [...args, tarOrLayerPath], { env: { ...process.env, LC_ALL: 'C', TZ: 'UTC' } });
  const entries: TarTvEntry[] = [];
  for (const line of res.stdout.split('\n')) {
    if (line === '') continue;
    const x = /^\s+x: \d+ (.*)$/.exec(line);
    if (x !== null) {
      entries.at(-1)?.xattrs.push(unescapeTarName(x[1] ?? ''));
      continue;
    }
    const m = TV_LINE.exec(line);
    if (m === null) throw new OracleError(tarOrLayerPath, `unparsed tar -tv line: ${line}`);
    const type = m[1] ?? '';
    let rest = m[9] ?? '';
    let link: string | null = null;
    const sep = type === 'l' ? ' -> ' : type === 'h' ? ' link to ' : null;
    if (sep !== null) {
      const at = rest.indexOf(sep);
      if (at < 0) throw new OracleError(tarOrLayerPath, `link without target: ${line}`);
      link = unescapeTarName(rest.slice(at + sep.length));
      rest = rest.slice(0, at);
    }
    entries.push({
      name: unescapeTarName(rest),
      type,
      mode: m[2] ?? '',
      uid: Number(m[3]),
      gid: Number(m[4]),
      size: m[7] !== undefined ? Number(m[7]) : null,
      devMajor: m[5] !== undefined ? Number(m[5]) : null,
      devMinor: m[6] !== undefined ? Number(m[6]) : null,
      mtime: m[8] ?? '',
      link,
      xattrs: [],
    });
  }
  return entries;
}

/** Names of all regular-file entries (type `-`; hardlinks excluded), in archive order. */
export async function tarListFiles(tarOrLayerPath: string): Promise<string[]> {
  return (await tarTv(tarOrLayerPath)).filter((e) => e.type === '-').map((e) => e.name);
}

/**
 * SHA-256 (hex) of `tar -xOf layer name`: the content of entry `name` exactly as stored
 * (e.g. `./a/b`). A hardlink entry prints nothing with GNU tar; ask for its target.
 */
export function tarXO(tarOrLayerPath: string, name: string): Promise<string> {
  return new Promise<string>((resolve, reject) => {
    const child = spawn('tar', ['-xOf', tarOrLayerPath, '--', name], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LC_ALL: 'C' },
    });
    const h = createHash('sha256');
    let stderr = '';
    child.stdout.on('data', (b: Buffer) => h.update(b));
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    child.on('error', (e) => reject(new OracleError(tarOrLayerPath, `tar: ${e.message}`, { cause: e })));
    child.on('close', (code, signal) => {
      if (code === 0) resolve(h.digest('hex'));
      else reject(new CommandError('tar', ['-xOf', tarOrLayerPath, name], code, signal, stderr));
    });
  });
}

// ---------------------------------------------------------------------------------------
// flatc

/**
 * Decodes a flatbuffer with flatc 2.0.8: `flatc --json --raw-binary --strict-json
 * --defaults-json -o DIR SCHEMA -- BIN` (--raw-binary: the zTOC schema has no file
 * identifier; --defaults-json: fields equal to their default are printed too). flatc does
 * not verify the buffer: garbage may crash it, which rejects with OracleError. Integers
 * beyond 2^53 lose precision in JSON.parse.
 */
export async function flatcJson(schemaPath: string, binPath: string): Promise<unknown> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'soci-ts-flatc-'));
  try {
    try {
      await run('flatc', ['--json', '--raw-binary', '--strict-json', '--defaults-json', '-o', dir, schemaPath, '--', binPath]);
    } catch (e) {
      if (e instanceof CommandError) throw new OracleError(binPath, `flatc could not decode it: ${e.message}`, { cause: e });
      throw e;
    }
    const outputs = (await fsp.readdir(dir)).filter((n) => n.endsWith('.json'));
    const out = outputs[0];
    if (outputs.length !== 1 || out === undefined) throw new OracleError(binPath, `flatc wrote ${outputs.length} JSON files`);
    return JSON.parse(await fsp.readFile(path.join(dir, out), 'utf8')) as unknown;
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
}

/**
 * The raw-inflate engines (native zlib addon and pako) against the real gzip
 * CLI, against each other (block stops), resuming mid-stream the way zTOC
 * checkpoints do, and on corrupt input.
 *
 * All data is made here from files on this machine; nothing is downloaded.
 */
import t from 'tap';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, existsSync, openSync, readFileSync, readSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { walkFiles } from '../helpers/real-files.js';
import {
  availableEngines,
  inflateEngine,
  nativeAddonPath,
  nativeLoadError,
  pakoEngine,
  WINDOW_BITS_AUTO,
  WINDOW_BITS_RAW,
  Z_BLOCK,
  Z_BUF_ERROR,
  Z_DATA_ERROR,
  Z_NO_FLUSH,
  Z_OK,
  Z_STREAM_END,
  type InflateEngine,
} from '../../ztoc/inflate/index.js';

const engines = availableEngines();
const native = engines.find((e) => e.name === 'zlib-native');
const WINDOW = 32768;

// ---------------------------------------------------------------- test data

/** Concatenates regular files (≤ 4 MiB each) under `roots` (sorted walk) up to `limit` bytes. */
async function collect(roots: string[], limit: number, keep: (path: string) => boolean): Promise<Buffer> {
  const parts: Buffer[] = [];
  let size = 0;
  for (const root of roots) {
    for await (const f of walkFiles(root)) {
      if (size >= limit) break;
      if (f.size > 4 << 20 || !keep(f.path)) continue;
      try {
        const b = await readFile(f.path);
        parts.push(b.subarray(0, Math.min(b.length, limit - size)));
        size += parts[parts.length - 1].length;
      } catch {
        // unreadable: skip
      }
    }
  }
  return Buffer.concat(parts);
}

function urandom(n: number): Buffer {
  const b = Buffer.alloc(n);
  const fd = openSync('/dev/urandom', 'r');
  try {
    for (let off = 0; off < n; ) off += readSync(fd, b, off, n - off, null);
  } finally {
    closeSync(fd);
  }
  return b;
}

const sha256 = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

interface Sample {
  name: string;
  /** The uncompressed bytes (what `gzip -dc` must give back). */
  plain: Buffer;
  gz: Buffer;
  gzPath: string;
  /** sha256 of `gzip -dc gzPath`. */
  expected: string;
  /** Single gzip member (resume tests need one deflate stream). */
  single: boolean;
}

const dir = t.testdir({});
const text = await collect(['/usr/share/perl', '/usr/share/perl5', '/usr/share/common-licenses', '/usr/include'], 4 << 20, (p) => !/\.(gz|xz|bz2|zst)$/.test(p));
const binary = await collect(['/usr/lib/x86_64-linux-gnu', '/usr/bin'], 4 << 20, () => true);
const precompressed = await collect(['/usr/share/doc', '/usr/share/man'], 2 << 20, (p) => p.endsWith('.gz'));
// Incompressible input makes gzip emit stored blocks; random data goes
// through a temp file, as the gzip CLI reads files.
const randomPath = join(dir, 'random.bin');
writeFileSync(randomPath, urandom(1 << 20));
const random = readFileSync(randomPath);
// Text and random interleaved: stored blocks that start at non-zero bit
// offsets (right after a Huffman block), then byte-aligned ones.
const mixed = Buffer.concat([
  text.subarray(0, 700_000),
  random.subarray(0, 200_000),
  binary.subarray(0, 500_000),
  random.subarray(300_000, 340_000),
  text.subarray(1_000_000, 1_500_000),
  random.subarray(500_000, 501_000),
  text.subarray(2_000_000, 2_300_000),
]);

const corpora: Array<[string, Buffer]> = [
  ['text', text],
  ['binary', binary],
  ['precompressed', precompressed],
  ['random', random],
  ['mixed', mixed],
  ['tiny', Buffer.from('hello, world\n')],
  ['empty', Buffer.alloc(0)],
];

function gunzipCli(path: string): Buffer {
  return execFileSync('gzip', ['-dc', path], { maxBuffer: 1 << 30 });
}

const samples: Sample[] = [];
for (const [name, plain] of corpora) {
  const src = join(dir, `${name}.bin`);
  writeFileSync(src, plain);
  for (const level of [1, 6, 9]) {
    const gz = execFileSync('gzip', [`-${level}`, '-n', '-c', src], { maxBuffer: 1 << 30 });
    const gzPath = join(dir, `${name}.${level}.gz`);
    writeFileSync(gzPath, gz);
    samples.push({ name: `${name} -${level}`, plain, gz, gzPath, expected: sha256(gunzipCli(gzPath)), single: true });
  }
}
{
  // Without -n gzip stores the file name and mtime (FNAME header path).
  const src = join(dir, 'text.bin');
  const gz = execFileSync('gzip', ['-6', '-c', src], { maxBuffer: 1 << 30 });
  const gzPath = join(dir, 'named.gz');
  writeFileSync(gzPath, gz);
  samples.push({ name: 'text -6 with name', plain: text, gz, gzPath, expected: sha256(gunzipCli(gzPath)), single: true });
}
{
  // Two members back to back: what `cat a.gz b.gz` gives and gzip -dc accepts.
  const a = samples.find((s) => s.name === 'text -6');
  const b = samples.find((s) => s.name === 'random -1');
  if (!a || !b) throw new Error('samples missing');
  const gz = Buffer.concat([a.gz, b.gz]);
  const gzPath = join(dir, 'multi.gz');
  writeFileSync(gzPath, gz);
  const plain = Buffer.concat([a.plain, b.plain]);
  samples.push({ name: 'two members', plain, gz, gzPath, expected: sha256(gunzipCli(gzPath)), single: false });
}

// ------------------------------------------------------------------ driver

interface Stop {
  totalIn: number;
  totalOut: number;
  dataType: number;
}

interface Run {
  sha256: string;
  totalIn: number;
  totalOut: number;
  /** Stops at block boundaries (data_type & 128). */
  stops: Stop[];
  /** sha256 over every call's (status, consumed, produced, data_type). */
  trace: string;
  calls: number;
}

/** Inflates a whole gzip file (all members) in chunks, as a reader would. */
function inflateAll(engine: InflateEngine, gz: Uint8Array, flush: number, outSize: number, inChunk: number): Run {
  const inf = engine.create(WINDOW_BITS_AUTO);
  const out = new Uint8Array(outSize);
  const hash = createHash('sha256');
  const trace = createHash('sha256');
  const traceRec = new Int32Array(4);
  const stops: Stop[] = [];
  let ip = 0;
  let op = 0;
  let totalOut = 0;
  let calls = 0;
  let idle = 0;
  try {
    for (;;) {
      const s = inf.inflate(gz, ip, Math.min(gz.length, ip + inChunk), out, op, out.length, flush);
      calls++;
      traceRec[0] = s.status;
      traceRec[1] = s.consumed;
      traceRec[2] = s.produced;
      traceRec[3] = s.dataType;
      trace.update(traceRec);
      ip += s.consumed;
      op += s.produced;
      totalOut += s.produced;
      if (s.dataType & 128) stops.push({ totalIn: ip, totalOut, dataType: s.dataType });
      if (op === out.length || s.status === Z_STREAM_END) {
        hash.update(out.subarray(0, op));
        op = 0;
      }
      if (s.status === Z_STREAM_END) {
        if (ip === gz.length) break;
        inf.reset(WINDOW_BITS_AUTO); // next gzip member
        continue;
      }
      if (s.status !== Z_OK) throw new Error(`${engine.name}: inflate status ${s.status} at input ${ip}`);
      if (ip === gz.length && s.produced === 0) throw new Error(`${engine.name}: truncated stream`);
      idle = s.consumed === 0 && s.produced === 0 ? idle + 1 : 0;
      if (idle > 2) throw new Error(`${engine.name}: no progress at input ${ip}`);
    }
  } finally {
    inf.close();
  }
  return { sha256: hash.digest('hex'), totalIn: ip, totalOut, stops, trace: trace.digest('hex'), calls };
}

/** Reads the 3-bit deflate block header that starts at bit `pos`. */
function blockHeader(gz: Uint8Array, pos: number): { final: boolean; type: number } {
  const i = pos >>> 3;
  const v = ((gz[i] | ((gz[i + 1] ?? 0) << 8)) >>> (pos & 7)) & 7;
  return { final: (v & 1) === 1, type: v >>> 1 };
}

/**
 * Resumes at a block boundary the way a zTOC checkpoint does: a raw inflater
 * primed with the boundary byte's leftover bits and seeded with the last 32
 * KiB of output. Returns up to `want` bytes of output.
 */
function resumeAt(engine: InflateEngine, gz: Uint8Array, plain: Uint8Array, stop: Stop, want: number): Uint8Array {
  const inf = engine.create(WINDOW_BITS_RAW);
  try {
    const bits = stop.dataType & 7;
    if (bits) inf.prime(bits, gz[stop.totalIn - 1] >> (8 - bits));
    const dictStart = Math.max(0, stop.totalOut - WINDOW);
    if (stop.totalOut > dictStart) inf.setDictionary(plain.subarray(dictStart, stop.totalOut));
    const out = new Uint8Array(Math.min(want, plain.length - stop.totalOut));
    let ip = stop.totalIn;
    let op = 0;
    while (op < out.length) {
      // Odd-sized input slices so resumes also cross chunk edges.
      const s = inf.inflate(gz, ip, Math.min(gz.length, ip + 10007), out, op, out.length, Z_NO_FLUSH);
      ip += s.consumed;
      op += s.produced;
      if (s.status === Z_STREAM_END) break;
      if (s.status !== Z_OK) throw new Error(`${engine.name}: resume status ${s.status}`);
    }
    return out.subarray(0, op);
  } finally {
    inf.close();
  }
}

// ------------------------------------------------------------------- tests

t.test('engines', async (t) => {
  t.ok(engines.some((e) => e === pakoEngine), 'pako is always available');
  const path = nativeAddonPath();
  t.ok(path, 'package root found');
  if (path && existsSync(path)) {
    t.ok(native, `native engine loads from ${path}`);
    t.equal(nativeLoadError(), undefined, 'no load error');
    if (!process.env.SOCI_TS_INFLATE) t.equal(inflateEngine(), native, 'native is the default');
  } else {
    t.comment(`native addon not built (${path}); testing pako only`);
  }
  t.equal(inflateEngine(), inflateEngine(), 'choice is cached');
});

t.test('SOCI_TS_INFLATE selects the engine', async (t) => {
  const index = fileURLToPath(new URL('../../ztoc/inflate/index.js', import.meta.url));
  const pick = (value: string): { status: number | null; out: string } => {
    const r = spawnSync(
      process.execPath,
      ['--input-type=module', '-e', `import { inflateEngine } from ${JSON.stringify(pathToFileURL(index).href)}; console.log(inflateEngine().name);`],
      { env: { ...process.env, SOCI_TS_INFLATE: value }, encoding: 'utf8' },
    );
    return { status: r.status, out: r.stdout.trim() };
  };
  t.same(pick('pako'), { status: 0, out: 'pako' });
  t.same(pick(''), { status: 0, out: native ? 'zlib-native' : 'pako' });
  if (native) t.same(pick('native'), { status: 0, out: 'zlib-native' });
  t.not(pick('bogus').status, 0, 'unknown value is an error');
});

t.test('(a) output equals gzip -dc', async (t) => {
  for (const engine of engines) {
    for (const sample of samples) {
      for (const [outSize, inChunk] of [
        [256 << 10, 64 << 10],
        [4093, 1021],
      ]) {
        for (const flush of [Z_NO_FLUSH, Z_BLOCK]) {
          const run = inflateAll(engine, sample.gz, flush, outSize, inChunk);
          t.equal(
            run.sha256,
            sample.expected,
            `${engine.name} ${sample.name} out=${outSize} in=${inChunk} flush=${flush}`,
          );
          t.equal(run.totalIn, sample.gz.length);
        }
      }
    }
  }
});

t.test('(b) Z_BLOCK stops agree between engines and buffer sizes', async (t) => {
  for (const sample of samples) {
    const ref = inflateAll(pakoEngine, sample.gz, Z_BLOCK, 256 << 10, 64 << 10);
    t.ok(ref.stops.length >= (sample.plain.length ? 2 : 1), `${sample.name}: ${ref.stops.length} stops`);
    // Stops are positions in the stream, independent of how it is fed.
    const small = inflateAll(pakoEngine, sample.gz, Z_BLOCK, 4093, 1021);
    t.same(small.stops, ref.stops, `${sample.name}: pako stops independent of buffer sizes`);
    t.ok(ref.stops.every((s) => (s.dataType & ~(7 | 64 | 128)) === 0), `${sample.name}: stop data_type has only bits 0-2, 64, 128`);
    if (!native) continue;
    for (const [outSize, inChunk] of [
      [256 << 10, 64 << 10],
      [4093, 1021],
    ]) {
      const nat = inflateAll(native, sample.gz, Z_BLOCK, outSize, inChunk);
      t.same(nat.stops, ref.stops, `${sample.name}: native stops == pako stops (out=${outSize} in=${inChunk})`);
      const pk = outSize === 4093 ? small : ref;
      // Not required by the interface, but worth knowing if it ever changes.
      t.equal(nat.trace, pk.trace, `${sample.name}: native and pako identical call by call (out=${outSize})`);
    }
  }
});

t.test('(c) resume from block boundaries with prime + dictionary', async (t) => {
  let stored = 0;
  let unaligned = 0;
  let unalignedStored = 0;
  let fixed = 0;
  let resumes = 0;
  for (const sample of samples.filter((s) => s.single)) {
    const stops = inflateAll(pakoEngine, sample.gz, Z_BLOCK, 256 << 10, 64 << 10).stops.filter(
      (s) => (s.dataType & 64) === 0, // after the last block there is nothing to resume
    );
    // Every stored / unaligned boundary (capped) plus an even spread of the rest.
    const picked = new Set<Stop>();
    const step = Math.max(1, Math.floor(stops.length / 12));
    for (let i = 0; i < stops.length; i += step) picked.add(stops[i]);
    let extra = 0;
    for (const s of stops) {
      const h = blockHeader(sample.gz, s.totalIn * 8 - (s.dataType & 7));
      if ((h.type === 0 || h.type === 1) && extra++ < 12) picked.add(s);
    }
    for (const s of stops.filter((s) => (s.dataType & 7) !== 0).slice(0, 6)) picked.add(s);

    for (const stop of picked) {
      const bits = stop.dataType & 7;
      const h = blockHeader(sample.gz, stop.totalIn * 8 - bits);
      t.not(h.type, 3, 'a real block header follows the boundary');
      const want = 96 << 10;
      const expect = sample.plain.subarray(stop.totalOut, stop.totalOut + want);
      for (const engine of engines) {
        const got = resumeAt(engine, sample.gz, sample.plain, stop, want);
        if (!Buffer.from(got).equals(expect)) {
          t.fail(`${engine.name} ${sample.name}: resume at in=${stop.totalIn} bits=${bits} out=${stop.totalOut} type=${h.type}`);
        } else {
          resumes++;
        }
      }
      if (h.type === 0) stored++;
      if (h.type === 1) fixed++;
      if (bits) unaligned++;
      if (bits && h.type === 0) unalignedStored++;
    }
  }
  t.comment(`resumes=${resumes} stored=${stored} fixed=${fixed} unaligned=${unaligned} unalignedStored=${unalignedStored}`);
  t.ok(resumes > 100, `${resumes} resumes compared`);
  t.ok(stored > 0, 'resumed at stored blocks');
  t.ok(fixed > 0, 'resumed at fixed-Huffman blocks');
  t.ok(unaligned > 0, 'resumed at non-zero bit offsets');
  t.ok(unalignedStored > 0, 'resumed at stored blocks with non-zero bit offsets');
});

/** Feeds `data` until the engine stops making progress or errors; never loops forever. */
function drain(engine: InflateEngine, windowBits: number, data: Uint8Array): { status: number; totalIn: number; totalOut: number } {
  const inf = engine.create(windowBits);
  const out = new Uint8Array(64 << 10);
  let ip = 0;
  let totalOut = 0;
  try {
    for (let calls = 0; ; calls++) {
      if (calls > data.length + 10_000) throw new Error(`${engine.name}: no termination`);
      const s = inf.inflate(data, ip, Math.min(data.length, ip + 4096), out, 0, out.length, Z_NO_FLUSH);
      ip += s.consumed;
      totalOut += s.produced;
      if (s.status !== Z_OK) return { status: s.status, totalIn: ip, totalOut };
    }
  } finally {
    inf.close();
  }
}

t.test('(d) corrupt input gives a negative status', async (t) => {
  const base = samples.find((s) => s.name === 'text -6');
  const mix = samples.find((s) => s.name === 'mixed -6');
  if (!base || !mix) throw new Error('samples missing');
  let seed = 0x9e3779b9;
  const rnd = (): number => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) / 2 ** 32;
  };
  const cases: Array<[string, number, Uint8Array]> = [];
  for (const src of [base, mix]) {
    for (let i = 0; i < 40; i++) {
      const bad = Buffer.from(src.gz);
      // Past the 10-byte gzip header, anywhere in deflate data or trailer.
      const at = 10 + Math.floor(rnd() * (bad.length - 10));
      bad[at] ^= 1 + Math.floor(rnd() * 255);
      cases.push([`${src.name} byte ${at} flipped`, WINDOW_BITS_AUTO, bad]);
    }
    cases.push([`${src.name} truncated`, WINDOW_BITS_AUTO, src.gz.subarray(0, src.gz.length >> 1)]);
  }
  cases.push(['garbage as gzip', WINDOW_BITS_AUTO, urandom(100_000)]);
  cases.push(['invalid block type', WINDOW_BITS_RAW, Uint8Array.of(0x07, 0, 0, 0)]);
  cases.push(['stored length mismatch', WINDOW_BITS_RAW, Uint8Array.of(0x01, 0, 0, 0, 0, 1, 2, 3)]);
  cases.push(['empty input', WINDOW_BITS_RAW, new Uint8Array(0)]);
  // Mid-stream without the dictionary: back-references reach before the start.
  const stop = inflateAll(pakoEngine, base.gz, Z_BLOCK, 256 << 10, 64 << 10).stops.find(
    (s) => s.totalOut > 1 << 20 && (s.dataType & 7) === 0,
  );
  if (stop) cases.push(['resume without dictionary', WINDOW_BITS_RAW, base.gz.subarray(stop.totalIn)]);

  for (const [name, wbits, data] of cases) {
    const results = engines.map((e) => drain(e, wbits, data));
    for (let i = 0; i < engines.length; i++) {
      t.ok(results[i].status < 0, `${engines[i].name} ${name}: status ${results[i].status}`);
    }
    if (results.length > 1) t.same(results[0], results[1], `${name}: engines agree`);
  }
  if (stop) t.equal(drain(pakoEngine, WINDOW_BITS_RAW, base.gz.subarray(stop.totalIn)).status, Z_DATA_ERROR);
  t.equal(drain(pakoEngine, WINDOW_BITS_RAW, new Uint8Array(0)).status, Z_BUF_ERROR);

  // Random bytes as raw deflate may even parse as a valid final block; all
  // that matters is a clean stop.
  for (let i = 0; i < 20; i++) {
    const data = urandom(2000 + i * 500);
    for (const e of engines) t.not(drain(e, WINDOW_BITS_RAW, data).status, Z_OK, `${e.name} raw garbage ${i}`);
  }
});

t.test('misuse throws, never crashes', async (t) => {
  const gz = samples[0].gz;
  const out = new Uint8Array(16);
  for (const engine of engines) {
    const inf = engine.create(WINDOW_BITS_AUTO);
    const n = engine.name;
    t.throws(() => inf.inflate(gz, 0, gz.length + 1, out, 0, 16, Z_NO_FLUSH), RangeError, `${n}: inEnd past input`);
    t.throws(() => inf.inflate(gz, 5, 4, out, 0, 16, Z_NO_FLUSH), RangeError, `${n}: inStart > inEnd`);
    t.throws(() => inf.inflate(gz, -1, 4, out, 0, 16, Z_NO_FLUSH), RangeError, `${n}: negative start`);
    t.throws(() => inf.inflate(gz, 0.5, 4, out, 0, 16, Z_NO_FLUSH), RangeError, `${n}: fractional start`);
    t.throws(() => inf.inflate(gz, 0, 4, out, 0, 17, Z_NO_FLUSH), RangeError, `${n}: outEnd past output`);
    t.throws(() => inf.inflate(gz, 0, 4, out, 0, 16, 9), RangeError, `${n}: bad flush`);
    t.throws(() => inf.inflate('x' as unknown as Uint8Array, 0, 0, out, 0, 16, Z_NO_FLUSH), TypeError, `${n}: input type`);
    t.throws(() => inf.prime(17, 0), RangeError, `${n}: prime bits`);
    t.throws(() => inf.reset(99), RangeError, `${n}: reset windowBits`);
    t.throws(() => inf.reset(3), RangeError, `${n}: reset invalid windowBits`);
    // A gzip stream has no raw dictionary slot: zlib says Z_STREAM_ERROR.
    t.throws(() => inf.setDictionary(new Uint8Array(10)), `${n}: dictionary on gzip stream`);
    t.throws(() => engine.create(100), RangeError, `${n}: create windowBits`);
    const s = inf.inflate(gz, 0, 100, out, 0, 16, Z_NO_FLUSH);
    t.equal(s.produced, 16, `${n}: still usable after rejected calls`);
    inf.close();
    inf.close();
    t.throws(() => inf.inflate(gz, 0, 4, out, 0, 16, Z_NO_FLUSH), `${n}: use after close`);
    t.throws(() => inf.prime(1, 1), `${n}: prime after close`);
    t.throws(() => inf.reset(WINDOW_BITS_RAW), `${n}: reset after close`);
  }
});

t.test('prime matches zlib bit accounting', async (t) => {
  // A stored block "hi" whose 3 header bits are fed through prime: primed
  // bits sit below the next input byte, so the block header comes from them.
  // BFINAL=1, BTYPE=00 -> bits 1,0,0 (LSB first) = value 1 in 3 bits.
  const rest = Uint8Array.of(2, 0, 0xfd, 0xff, 0x68, 0x69);
  for (const engine of engines) {
    const inf = engine.create(WINDOW_BITS_RAW);
    inf.prime(3, 1);
    const out = new Uint8Array(8);
    const s = inf.inflate(rest, 0, rest.length, out, 0, out.length, Z_NO_FLUSH);
    t.equal(s.status, Z_STREAM_END, `${engine.name}: primed stored block`);
    t.equal(Buffer.from(out.subarray(0, s.produced)).toString(), 'hi');
    inf.close();
    // Two primes accumulate like zlib's: 3 + 2 bits, then values above
    // `bits` are masked off.
    const inf2 = engine.create(WINDOW_BITS_RAW);
    inf2.prime(1, 1); // BFINAL
    inf2.prime(2, 0xfffc); // BTYPE=00, upper bits ignored
    const s2 = inf2.inflate(rest, 0, rest.length, out, 0, out.length, Z_NO_FLUSH);
    t.equal(s2.status, Z_STREAM_END, `${engine.name}: split prime`);
    t.equal(Buffer.from(out.subarray(0, s2.produced)).toString(), 'hi');
    inf2.close();
  }
});

t.test('inflateAsync (native): equals gzip -dc, off the event loop, busy while it runs, exits idle', async (t) => {
  if (native === undefined) return t.fail('the native engine is built by scripts/setup and must be here');
  const inflateAsyncAll = async (gz: Buffer, outSize: number): Promise<string> => {
    const inf = native.create(WINDOW_BITS_AUTO);
    const hash = createHash('sha256');
    const out = new Uint8Array(outSize);
    let pos = 0;
    try {
      for (;;) {
        const s = await inf.inflateAsync!(gz, pos, gz.length, out, 0, out.length, Z_NO_FLUSH);
        pos += s.consumed;
        hash.update(out.subarray(0, s.produced));
        if (s.status === Z_STREAM_END) {
          if (pos >= gz.length) break;
          inf.reset(WINDOW_BITS_AUTO); // the next gzip member
          continue;
        }
        if (s.status !== Z_OK) throw new Error(`status ${s.status}`);
      }
    } finally {
      inf.close();
    }
    return hash.digest('hex');
  };
  for (const sample of samples) t.equal(await inflateAsyncAll(sample.gz, 256 << 10), sample.expected, `${sample.name}: equals gzip -dc`);
  // Four streams at once (more than the addon's threads): each right.
  const four = await Promise.all(samples.slice(0, 4).map((s) => inflateAsyncAll(s.gz, 64 << 10)));
  t.same(four, samples.slice(0, 4).map((s) => s.expected), 'concurrent streams each equal gzip -dc');

  // One large step: the event loop runs while it does; the handle is busy until it settles.
  const big = samples.filter((s) => s.single).reduce((a, b) => (b.plain.length > a.plain.length ? b : a));
  const inf = native.create(WINDOW_BITS_AUTO);
  const out = new Uint8Array(big.plain.length);
  let immediateRan = false;
  setImmediate(() => (immediateRan = true));
  const pending = inf.inflateAsync!(big.gz, 0, big.gz.length, out, 0, out.length, Z_NO_FLUSH);
  t.throws(() => inf.inflate(big.gz, 0, 10, new Uint8Array(10), 0, 10, Z_NO_FLUSH), /inflateAsync job/, 'a sync call on the busy handle throws');
  t.throws(() => inf.reset(WINDOW_BITS_AUTO), /inflateAsync job/, 'reset too');
  await t.rejects(inf.inflateAsync!(big.gz, 0, 10, new Uint8Array(10), 0, 10, Z_NO_FLUSH), /inflateAsync job/, 'a second job on it too');
  inf.close(); // deferred until the job is done
  const step = await pending;
  t.ok(immediateRan, 'a setImmediate queued before the job ran before it settled');
  t.equal(step.produced, big.plain.length, 'the whole member in one step');
  t.equal(sha256(out), sha256(big.plain), 'its bytes right');
  t.throws(() => inf.inflate(big.gz, 0, 10, new Uint8Array(10), 0, 10, Z_NO_FLUSH), /ended/, 'the deferred close took effect');

  // A process whose last job is done exits by itself (the idle threads hold nothing open).
  const small = samples.find((s) => s.single && s.plain.length <= 1 << 20)!;
  const script = `import { readFileSync } from 'node:fs';
import { inflateEngine } from ${JSON.stringify(pathToFileURL(fileURLToPath(new URL('../../ztoc/inflate/index.js', import.meta.url))).href)};
const gz = readFileSync(process.argv[1]);
const inf = inflateEngine().create(47);
const s = await inf.inflateAsync(gz, 0, gz.length, new Uint8Array(2 << 20), 0, 2 << 20, 0);
console.log(s.status);`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script, small.gzPath], { encoding: 'utf8', timeout: 20_000 });
  t.equal(r.error, undefined, 'the child exited on its own (no timeout)');
  t.equal(r.stdout.trim(), String(Z_STREAM_END), 'after its inflateAsync finished the stream');
});

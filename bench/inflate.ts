/**
 * Inflate throughput: gzip -dc vs the native engine vs pako vs node:zlib.
 *
 *   node dist/bench/inflate.js [--mb 300] [--runs 3] [--no-sweep]
 *
 * Input: a ~300 MB gzip -6 file of real files from /usr, generated once into
 * bench/out/ (gitignored) and reused. Figures are MB/s (10^6 bytes) of
 * uncompressed output, best of --runs, and the ratio to `gzip -dc`.
 */
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, createWriteStream, existsSync, mkdirSync, mkdtempSync, openSync, closeSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { constants as osConstants, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { createGunzip } from 'node:zlib';
import { walkFiles } from '../test/helpers/real-files.js';
import {
  loadNativeEngine,
  nativeAddonPath,
  nativeZlibVersion,
  pakoEngine,
  WINDOW_BITS_AUTO,
  Z_BLOCK,
  Z_BUF_ERROR,
  Z_NO_FLUSH,
  Z_OK,
  Z_STREAM_END,
  type InflateEngine,
  type Inflater,
  type InflateStep,
} from '../ztoc/inflate/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function arg(name: string, def: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
}
const targetMB = arg('mb', 300);
const runs = arg('runs', 3);
const sweep = !process.argv.includes('--no-sweep');

/** <repo>/bench/out, whether running from bench/ or dist/bench/. */
function outDir(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const up = dirname(dir);
    if (up === dir) throw new Error('package.json not found');
    dir = up;
  }
  return join(dir, 'bench', 'out');
}

// ------------------------------------------------------------- input file

/** Streams real files from /usr (sorted walk) into `gzip -6` until its output reaches `bytes`. */
async function generate(path: string, bytes: number): Promise<void> {
  const tmp = `${path}.tmp`;
  const gzip = spawn('gzip', ['-6', '-n', '-c'], { stdio: ['pipe', 'pipe', 'inherit'] });
  const sink = createWriteStream(tmp);
  let written = 0;
  gzip.stdout.on('data', (b: Buffer) => {
    written += b.length;
  });
  const done = pipeline(gzip.stdout, sink);
  let fed = 0;
  // Walk /usr again if it holds less than asked.
  for (let pass = 0; written < bytes && pass < 8; pass++) {
    for await (const f of walkFiles('/usr')) {
      if (written >= bytes) break;
      let data: Buffer;
      try {
        data = readFileSync(f.path);
      } catch {
        continue;
      }
      fed += data.length;
      if (!gzip.stdin.write(data)) await new Promise((r) => gzip.stdin.once('drain', r));
    }
  }
  gzip.stdin.end();
  await done;
  renameSync(tmp, path);
  console.log(`generated ${path}: ${(fed / 1e6).toFixed(0)} MB of /usr -> ${(written / 1e6).toFixed(0)} MB gzip -6`);
}

// -------------------------------------------------------------- measuring

interface Result {
  seconds: number;
  outBytes: number;
  calls: number;
  blocks: number;
}

function now(): number {
  return Number(process.hrtime.bigint()) / 1e9;
}

/**
 * The reader loop the snapshotter runs: feed input chunks, drain a fixed
 * output buffer. `limit` bounds the input (for the buffer-size sweep).
 */
function runInflater(
  create: () => Inflater,
  gz: Uint8Array,
  flush: number,
  outSize: number,
  inChunk: number,
  limit = gz.length,
): Result {
  const out = new Uint8Array(outSize);
  const t0 = now();
  const inf = create();
  let ip = 0;
  let op = 0;
  let outBytes = 0;
  let calls = 0;
  let blocks = 0;
  for (;;) {
    const s: InflateStep = inf.inflate(gz, ip, Math.min(limit, ip + inChunk), out, op, outSize, flush);
    calls++;
    ip += s.consumed;
    op += s.produced;
    outBytes += s.produced;
    if (op === outSize) op = 0;
    if (s.dataType & 128) blocks++;
    if (s.status === Z_STREAM_END) {
      if (ip >= limit) break;
      inf.reset(WINDOW_BITS_AUTO);
    } else if (s.status !== Z_OK) {
      if (s.status === Z_BUF_ERROR && ip >= limit) break; // prefix used up
      throw new Error(`inflate status ${s.status} at ${ip}`);
    }
  }
  inf.close();
  return { seconds: now() - t0, outBytes, calls, blocks };
}

function runGzipCli(path: string): Result {
  const devnull = openSync('/dev/null', 'w');
  try {
    const t0 = now();
    const r = spawnSync('gzip', ['-dc', path], { stdio: ['ignore', devnull, 'inherit'] });
    if (r.status !== 0) throw new Error(`gzip -dc exited ${r.status}`);
    return { seconds: now() - t0, outBytes: 0, calls: 0, blocks: 0 };
  } finally {
    closeSync(devnull);
  }
}

async function runNodeZlib(gz: Uint8Array, outSize: number, inChunk: number): Promise<Result> {
  const t0 = now();
  let outBytes = 0;
  function* chunks(): Generator<Uint8Array> {
    for (let i = 0; i < gz.length; i += inChunk) yield gz.subarray(i, i + inChunk);
  }
  const gunzip = createGunzip({ chunkSize: outSize });
  gunzip.on('data', (b: Buffer) => {
    outBytes += b.length;
  });
  await pipeline(Readable.from(chunks(), { objectMode: false }), gunzip);
  return { seconds: now() - t0, outBytes, calls: 0, blocks: 0 };
}

/**
 * The addon bound to the system's libz.so.1 instead of Node's exported zlib:
 * a private copy dlopen'ed with RTLD_DEEPBIND, so its zlib references resolve
 * through its own DT_NEEDED libz first. Informational (not what production
 * loads); undefined when that is not possible here.
 */
function systemZlibEngine(): { engine: InflateEngine; version: string; cleanup: () => void } | undefined {
  const path = nativeAddonPath();
  const deep = (osConstants.dlopen as Record<string, number | undefined>).RTLD_DEEPBIND;
  if (!path || !existsSync(path) || deep === undefined) return undefined;
  const dir = mkdtempSync(join(tmpdir(), 'zinflate-sys-'));
  const cleanup = (): void => rmSync(dir, { recursive: true, force: true });
  try {
    const copy = join(dir, 'zinflate.node');
    copyFileSync(path, copy);
    const mod = { exports: {} as Record<string, unknown> };
    process.dlopen(mod, copy, (osConstants.dlopen.RTLD_NOW ?? 0) | deep);
    type H = object;
    const a = mod.exports as {
      create(w: number): H;
      inflate(h: H, i: Uint8Array, is: number, ie: number, o: Uint8Array, os: number, oe: number, f: number, r: Int32Array): void;
      reset(h: H, w: number): number;
      end(h: H): void;
      zlibVersion: string;
    };
    const engine: InflateEngine = {
      name: 'zlib-system',
      create(windowBits: number): Inflater {
        const h = a.create(windowBits);
        const r = new Int32Array(4);
        const step: InflateStep = { status: 0, consumed: 0, produced: 0, dataType: 0 };
        return {
          inflate(input, inStart, inEnd, output, outStart, outEnd, flush) {
            a.inflate(h, input, inStart, inEnd, output, outStart, outEnd, flush, r);
            step.status = r[0];
            step.consumed = r[1];
            step.produced = r[2];
            step.dataType = r[3];
            return step;
          },
          reset: (w) => void a.reset(h, w),
          prime: () => {
            throw new Error('not needed here');
          },
          setDictionary: () => {
            throw new Error('not needed here');
          },
          close: () => a.end(h),
        };
      },
    };
    return { engine, version: a.zlibVersion, cleanup };
  } catch (e) {
    cleanup();
    console.log(`(system libz variant unavailable: ${(e as Error).message})`);
    return undefined;
  }
}

// ------------------------------------------------------------------- main

async function main(): Promise<void> {
  const dir = outDir();
  mkdirSync(dir, { recursive: true });
  const path = join(dir, `inflate-${targetMB}M.gz`);
  if (!existsSync(path)) await generate(path, targetMB * 1e6);
  const gz = readFileSync(path);
  const native = loadNativeEngine();
  console.log(`input: ${path}, ${(gz.length / 1e6).toFixed(1)} MB compressed`);
  console.log(`node ${process.version}, node:zlib ${process.versions.zlib}, addon zlib ${nativeZlibVersion() ?? '(addon not built)'}`);

  // Buffer sizes: a sweep on the first 48 MB of compressed input.
  const engines: InflateEngine[] = native ? [native, pakoEngine] : [pakoEngine];
  const chosen = new Map<InflateEngine, { outSize: number; inChunk: number }>();
  for (const e of engines) chosen.set(e, { outSize: 256 * KiB, inChunk: 64 * KiB });
  if (sweep) {
    const limit = Math.min(gz.length, 48 * 1e6);
    console.log(`\nbuffer sweep (Z_NO_FLUSH, first ${(limit / 1e6).toFixed(0)} MB of input, MB/s out, best of ${runs} interleaved rounds):`);
    const grid: Array<{ e: InflateEngine; outSize: number; inChunk: number; mbs: number }> = [];
    for (const e of engines) {
      for (const outSize of [256 * KiB, 512 * KiB, 1 * MiB]) {
        for (const inChunk of [64 * KiB, 256 * KiB, 1 * MiB]) grid.push({ e, outSize, inChunk, mbs: 0 });
      }
    }
    for (let round = 0; round < runs; round++) {
      for (const g of grid) {
        const r = runInflater(() => g.e.create(WINDOW_BITS_AUTO), gz, Z_NO_FLUSH, g.outSize, g.inChunk, limit);
        g.mbs = Math.max(g.mbs, r.outBytes / 1e6 / r.seconds);
      }
    }
    for (const e of engines) {
      const mine = grid.filter((g) => g.e === e);
      const top = mine.reduce((a, b) => (b.mbs > a.mbs ? b : a));
      chosen.set(e, { outSize: top.outSize, inChunk: top.inChunk });
      console.log(`  ${e.name.padEnd(12)} ${mine.map((g) => `out ${g.outSize / KiB}K in ${g.inChunk / KiB}K: ${g.mbs.toFixed(0)}`).join(' | ')}`);
      console.log(`  ${''.padEnd(12)} fastest: out ${top.outSize / KiB} KiB, in ${top.inChunk / KiB} KiB`);
    }
  }

  console.log(`\nfull file, best of ${runs} rounds (methods interleaved so background load hits all alike):`);
  const sizes = (e: InflateEngine): { outSize: number; inChunk: number } =>
    chosen.get(e) ?? { outSize: 256 * KiB, inChunk: 64 * KiB };
  const label = (s: { outSize: number; inChunk: number }): string => `out ${s.outSize / KiB}K in ${s.inChunk / KiB}K`;
  interface Method {
    name: string;
    notes: (r: Result) => string;
    run: () => Result | Promise<Result>;
    best?: Result;
  }
  const flushes = [
    [Z_NO_FLUSH, 'Z_NO_FLUSH'],
    [Z_BLOCK, 'Z_BLOCK'],
  ] as const;
  const gzipVersion = spawnSync('gzip', ['--version']).stdout.toString().split('\n')[0];
  const methods: Method[] = [{ name: 'gzip -dc > /dev/null', notes: () => gzipVersion, run: () => runGzipCli(path) }];
  for (const e of engines) {
    const s = sizes(e);
    for (const [flush, fname] of flushes) {
      methods.push({
        name: `${e.name === 'pako' ? 'pako' : 'native engine'} ${fname}`,
        notes: (r) => `${label(s)}, ${r.calls} calls` + (flush === Z_BLOCK ? `, ${r.blocks} block stops` : ''),
        run: () => runInflater(() => e.create(WINDOW_BITS_AUTO), gz, flush, s.outSize, s.inChunk),
      });
    }
  }
  const zs = native ? sizes(native) : { outSize: 256 * KiB, inChunk: 64 * KiB };
  methods.push({
    name: 'node:zlib createGunzip',
    notes: () => `chunkSize ${zs.outSize / KiB}K, in ${zs.inChunk / KiB}K`,
    run: () => runNodeZlib(gz, zs.outSize, zs.inChunk),
  });
  const sys = native ? systemZlibEngine() : undefined;
  if (sys && native) {
    const s = sizes(native);
    for (const [flush, fname] of flushes) {
      methods.push({
        name: `(addon on system libz ${sys.version}) ${fname}`,
        notes: () => 'informational: not what production loads',
        run: () => runInflater(() => sys.engine.create(WINDOW_BITS_AUTO), gz, flush, s.outSize, s.inChunk),
      });
    }
  }
  for (let round = 0; round < runs; round++) {
    for (const m of methods) {
      const r = await m.run();
      if (!m.best || r.seconds < m.best.seconds) m.best = r;
    }
  }
  sys?.cleanup();
  const results = methods.map((m) => {
    if (!m.best) throw new Error('no runs');
    return { ...m, r: m.best };
  });
  const plainBytes = results[1]?.r.outBytes ?? 0;
  const gzipCli = results[0].r;
  gzipCli.outBytes = plainBytes;
  const rows: Array<[string, Result, string]> = results.map((m) => [m.name, m.r, m.notes(m.r)]);

  const base = gzipCli.outBytes / gzipCli.seconds;
  console.log(`uncompressed ${(plainBytes / 1e6).toFixed(0)} MB\n`);
  console.log(`${'method'.padEnd(42)} ${'MB/s'.padStart(7)} ${'x gzip'.padStart(7)} ${'seconds'.padStart(8)}  notes`);
  for (const [name, r, notes] of rows) {
    if (r.outBytes !== plainBytes) throw new Error(`${name}: produced ${r.outBytes} bytes, expected ${plainBytes}`);
    const rate = r.outBytes / r.seconds;
    console.log(
      `${name.padEnd(42)} ${(rate / 1e6).toFixed(0).padStart(7)} ${(rate / base).toFixed(2).padStart(7)} ${r.seconds.toFixed(2).padStart(8)}  ${notes}`,
    );
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exitCode = 1;
});

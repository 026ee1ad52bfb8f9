/**
 * `npm run bench:fs`: the lazy layer filesystem over a loopback registry, against the same
 * files on local disk (the unpacked copy the layer was made from) in the same run:
 * - time to first byte of a cold small file (a fresh mount per sample);
 * - sequential read MB/s of a 100 MB file, cold (nothing local) and warm (spans in our memory
 *   cache; the kernel's page cache dropped before each timed read, for both sides), warm both
 *   with the native read path (fs/native-read.ts) and with every read through JavaScript;
 * - `stat` of every file (ops/s);
 * - bytes fetched from the registry per byte read, for cold random reads;
 * - the serving process's RSS.
 * Readers are child processes (cat, dd, find), as a container's would be.
 *
 * Environment: SOCI_TS_BENCH_DIR (default /var/tmp/soci-ts-bench), SOCI_TS_BENCH_MB (layer
 * size in MB of tar, default 300), SOCI_TS_BENCH_SAMPLES (default 7).
 */
import { spawn } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, open, rename, rm, stat, writeFile } from 'node:fs/promises';
import { cpus, totalmem, tmpdir } from 'node:os';
import { join } from 'node:path';
import { startRegistry } from '../test/helpers/registry.js';
import { walkFiles } from '../test/helpers/real-files.js';
import { sha256File } from '../test/helpers/tree.js';
import { RegistryClient, type Descriptor } from '../fetcher/index.js';
import { buildZtocFromFile, LayerIndex } from '../ztoc/index.js';
import { InflatedSpanCache, LayerFs } from '../fs/index.js';
import type { RunAnswer } from './exec-runner.js';
import { ExecRunner } from './exec-runner-client.js';

const benchDir = process.env.SOCI_TS_BENCH_DIR ?? '/var/tmp/soci-ts-bench';
const targetMB = Number(process.env.SOCI_TS_BENCH_MB ?? 300);
const samples = Number(process.env.SOCI_TS_BENCH_SAMPLES ?? 7);
const BIG_FILE = 'big/real-files-100MB.bin';
const BIG_BYTES = 100 * 1000 * 1000;

function sh(script: string, stdout: 'ignore' | 'pipe' = 'ignore'): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', script], { stdio: ['ignore', stdout, 'inherit'] });
    let out = '';
    child.stdout?.on('data', (c: Buffer) => (out += c.toString()));
    child.on('error', reject);
    child.on('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`${script}: exit ${code}`))));
  });
}

async function exists(p: string): Promise<boolean> {
  return stat(p).then(
    () => true,
    () => false,
  );
}

/**
 * The local tree (real files from /usr, plus one 100 MB file made by concatenating real files)
 * and its layer (GNU tar, gzip -6). Made once, cached.
 */
async function makeLayer(): Promise<{ tree: string; layer: string }> {
  const base = join(benchDir, `fs-${targetMB}MB-v2`);
  const tree = join(base, 'tree');
  const layer = join(base, 'layer.tar.gz');
  if (await exists(layer)) return { tree, layer };
  process.stderr.write(`bench: making a ${targetMB} MB layer from real files (once; cached in ${base})\n`);
  await rm(base, { recursive: true, force: true });
  await mkdir(join(tree, 'big'), { recursive: true });
  // The big file: real files from /usr/lib, concatenated in a stable order.
  const big = await open(join(tree, BIG_FILE), 'w');
  let written = 0;
  for await (const f of walkFiles('/usr/lib')) {
    if (written >= BIG_BYTES) break;
    const fh = await open(f.path, 'r').catch(() => undefined);
    if (fh === undefined) continue;
    const buf = Buffer.allocUnsafe(Math.min(f.size, BIG_BYTES - written));
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    await fh.close();
    await big.write(buf, 0, bytesRead);
    written += bytesRead;
  }
  await big.close();
  // The rest: real files at their own paths, until the layer reaches its size.
  const list = join(base, 'files.txt');
  await sh(
    `find /usr/share /usr/lib /usr/bin -xdev -type f -size -2M -printf '%s %p\\n' 2>/dev/null | sort -k2 | ` +
      `awk -v max=${targetMB * 1e6 - BIG_BYTES} '{ total += $1; if (total > max) exit; sub(/^[0-9]+ \\//, ""); print }' > '${list}'`,
  );
  await sh(`tar -C / --no-recursion -cf - -T '${list}' 2>/dev/null | tar -C '${tree}' -xf -`);
  await sh(`tar -C '${tree}' --sort=name --numeric-owner -cf - . | gzip -6 > '${layer}.tmp'`);
  await rename(`${layer}.tmp`, layer);
  return { tree, layer };
}

/**
 * The timed readers run from a small helper process (exec-runner.js), not forked from this one:
 * this process serves the FUSE mounts, and a fork would make its heap copy-on-write just as the
 * reads it serves start (a container's reader is never the serving process's child either).
 */
let runner: ExecRunner | undefined;
const inRunner = (script: string): Promise<RunAnswer> => (runner ??= new ExecRunner()).run('sh', ['-c', script]);
const dropCaches = (): Promise<RunAnswer> => inRunner('sync; echo 3 > /proc/sys/vm/drop_caches');
/** Wall time of a script run in the helper (spawn to exit). */
const timedSh = async (script: string): Promise<number> => (await inRunner(script)).ms;

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const fmt = (n: number, d = 1): string => n.toFixed(d);

let peakRss = 0;
const rssTimer = setInterval(() => (peakRss = Math.max(peakRss, process.memoryUsage().rss)), 50);

async function main(): Promise<void> {
  const { tree, layer } = await makeLayer();
  runner = new ExecRunner(); // forked while this process is still small
  const layerSize = (await stat(layer)).size;
  const digest = `sha256:${await sha256File(layer)}`;
  const desc: Descriptor = { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest, size: layerSize };

  const reg = await startRegistry();
  const client = new RegistryClient({ hostsDir: '' });
  const work = await mkdtemp(join(tmpdir(), 'soci-ts-bench-fs-'));
  const mounts: LayerFs[] = [];
  try {
    const repo = client.repository(`${reg.host}/bench/fs:latest`);
    await repo.pushBlob(desc, async function* () {
      yield* createReadStream(layer, { highWaterMark: 1 << 20 }) as AsyncIterable<Uint8Array>;
    });
    const index = new LayerIndex(await buildZtocFromFile(layer), digest);
    const files = index.ztoc.files.filter((f) => f.type === 'reg').length;
    let n = 0;
    // One memory cache for the process, as in the daemon; emptied for every cold mount.
    const shared = new InflatedSpanCache();
    const mount = async (memory?: InflatedSpanCache, nativeReads = true): Promise<LayerFs> => {
      if (memory === undefined) {
        shared.clear();
        memory = shared;
      }
      const m = await LayerFs.mount({
        mountpoint: join(work, `m${++n}`),
        layerDigest: digest,
        index,
        source: { read: (o, l, d) => repo.readRange(desc, o, l, { digest: d }) },
        memory,
        nativeReads,
      });
      mounts.push(m);
      return m;
    };
    const umount = async (m: LayerFs): Promise<void> => {
      await m.unmount();
      mounts.splice(mounts.indexOf(m), 1);
    };

    console.log(`bench:fs — ${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, ${Math.round(totalmem() / 2 ** 30)} GiB, Node ${process.version}`);
    console.log(`layer: ${fmt(index.ztoc.uncompressedArchiveSize / 1e6)} MB of tar, ${fmt(layerSize / 1e6)} MB gzip, ${files} files, ${index.spans.length} spans of 4 MiB; loopback registry`);
    console.log('');

    // Small files: 1–16 KiB, spread over the layer.
    const small = index.ztoc.files.filter((f) => f.type === 'reg' && f.uncompressedSize >= 1024 && f.uncompressedSize <= 16384);
    const picks = Array.from({ length: samples }, (_, i) => small[Math.floor(((i + 0.5) * small.length) / samples)]!.name.replace(/^\.?\//, ''));

    // 1. Time to first byte of a cold small file (fresh mount, empty caches).
    const ttfbLazy: number[] = [];
    const ttfbLocal: number[] = [];
    for (const p of picks) {
      const m = await mount();
      await dropCaches();
      ttfbLazy.push(await timedSh(`head -c 1 '${join(m.mountpoint, p)}' > /dev/null`));
      await umount(m);
      await dropCaches();
      ttfbLocal.push(await timedSh(`head -c 1 '${join(tree, p)}' > /dev/null`));
    }

    // 2. Sequential read of the 100 MB file: cold, then warm (our caches), page cache dropped.
    const bigSize = (await stat(join(tree, BIG_FILE))).size;
    // dd's own elapsed time: the reads alone, without the start of the reader.
    const dd = async (p: string): Promise<number> => {
      const { stderr } = await inRunner(`LC_ALL=C dd if='${p}' of=/dev/null bs=1M`);
      const s = /copied, ([0-9.e+-]+) s/.exec(stderr);
      if (s === null) throw new Error(`dd printed no time: ${stderr}`);
      return Number(s[1]) * 1000;
    };
    const cold: number[] = [];
    const warm: number[] = [];
    const warmJs: number[] = [];
    const local: number[] = [];
    const runs = Math.max(1, Math.min(3, samples));
    const bigCache = new InflatedSpanCache({ maxBytes: 512 << 20 });
    const bigMount = await mount(bigCache);
    // The same spans read through JavaScript (no native read path): what the native path gains.
    const jsMount = await mount(bigCache, false);
    for (let i = 0; i < runs; i++) {
      const m = await mount();
      await dropCaches();
      cold.push(await dd(join(m.mountpoint, BIG_FILE)));
      await umount(m);
    }
    await dd(join(bigMount.mountpoint, BIG_FILE)); // fills our memory cache
    const native0 = bigMount.nativeReads;
    const reads0 = bigMount.counters.reads;
    for (let i = 0; i < runs; i++) {
      await dropCaches();
      warm.push(await dd(join(bigMount.mountpoint, BIG_FILE)));
      await dropCaches();
      warmJs.push(await dd(join(jsMount.mountpoint, BIG_FILE)));
      await dropCaches();
      local.push(await dd(join(tree, BIG_FILE)));
    }
    const nativeShare = (bigMount.nativeReads.reads - native0.reads) / Math.max(1, bigMount.counters.reads - reads0);
    await umount(bigMount);
    await umount(jsMount);
    const mbps = (ms: number): number => bigSize / 1e6 / (ms / 1000);

    // 3. stat of every file (find stats each entry), cold mount vs local after dropping caches.
    const statLazy: number[] = [];
    const statLocal: number[] = [];
    for (let i = 0; i < runs; i++) {
      const m = await mount();
      await dropCaches();
      statLazy.push(await timedSh(`find '${m.mountpoint}' -printf '%s %m\\n' > /dev/null`));
      await umount(m);
      await dropCaches();
      statLocal.push(await timedSh(`find '${tree}' -printf '%s %m\\n' > /dev/null`));
    }
    const entries = index.ztoc.files.length;
    const rssCold = process.memoryUsage().rss;

    // 4. Bytes fetched per byte read: cold random reads of 4–64 KiB from random files.
    const rm_ = await mount();
    const regs = index.ztoc.files.filter((f) => f.type === 'reg' && f.uncompressedSize > 0);
    let seed = 42;
    const rand = (k: number): number => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return seed % k;
    };
    const script: string[] = [];
    let bytesAsked = 0;
    for (let i = 0; i < 200; i++) {
      const f = regs[rand(regs.length)]!;
      const len = Math.min(f.uncompressedSize, 4096 + rand(61440));
      const off = rand(Math.max(1, f.uncompressedSize - len));
      bytesAsked += len;
      script.push(`dd if='${join(rm_.mountpoint, f.name.replace(/^\.?\//, ''))}' of=/dev/null bs=${len} count=1 iflag=skip_bytes skip=${off} status=none`);
    }
    await writeFile(join(work, 'random.sh'), script.join('\n') + '\n');
    const randomMs = await timedSh(`sh '${join(work, 'random.sh')}'`);
    const fetched = rm_.spans.counters.bytesFetched;
    await umount(rm_);

    const rows: Array<[string, string, string, string]> = [
      ['cold small file, time to first byte (median)', `${fmt(median(ttfbLazy))} ms`, `${fmt(median(ttfbLocal))} ms`, `${fmt(median(ttfbLazy) / median(ttfbLocal), 2)}× local`],
      ['100 MB file, cold sequential read', `${fmt(mbps(median(cold)))} MB/s`, `${fmt(mbps(median(local)))} MB/s`, `${fmt(mbps(median(cold)) / mbps(median(local)), 2)}×`],
      ['100 MB file, warm sequential read (goal ≥ 0.5×)', `${fmt(mbps(median(warm)))} MB/s`, `${fmt(mbps(median(local)))} MB/s`, `${fmt(mbps(median(warm)) / mbps(median(local)), 2)}×`],
      ['100 MB file, warm, every read through JavaScript', `${fmt(mbps(median(warmJs)))} MB/s`, `${fmt(mbps(median(local)))} MB/s`, `${fmt(mbps(median(warmJs)) / mbps(median(local)), 2)}× (native path: ${fmt(median(warmJs) / median(warm), 2)}× faster, ${fmt(100 * nativeShare, 0)}% of its reads native)`],
      [`stat of every entry (${entries}), cold`, `${fmt(entries / (median(statLazy) / 1000), 0)} ops/s`, `${fmt(entries / (median(statLocal) / 1000), 0)} ops/s`, `${fmt(median(statLocal) / median(statLazy), 2)}×`],
      ['cold random reads (200 × 4–64 KiB): fetched per byte read', `${fmt(fetched / bytesAsked, 1)} B/B`, '', `${fmt(fetched / 1e6)} MB fetched for ${fmt(bytesAsked / 1e6, 2)} MB read in ${fmt(randomMs / 1000, 1)} s`],
      ['serving process RSS after the cold runs', `${fmt(rssCold / 2 ** 20, 0)} MiB`, '', `peak ${fmt(peakRss / 2 ** 20, 0)} MiB (the warm run holds the 100 MB file in a 512 MiB memory cache)`],
    ];
    const w = [Math.max(...rows.map((r) => r[0].length)), 14, 14];
    console.log(`${'measure'.padEnd(w[0]!)}  ${'soci-ts lazy'.padStart(w[1]!)}  ${'local disk'.padStart(w[2]!)}  ratio`);
    for (const r of rows) console.log(`${r[0].padEnd(w[0]!)}  ${r[1].padStart(w[1]!)}  ${r[2].padStart(w[2]!)}  ${r[3]}`);
    console.log('');
    console.log('local disk = the same files unpacked on this machine\'s disk; page cache dropped before every timed read on both sides.');
  } finally {
    for (const m of mounts) await m.unmount().catch(() => undefined);
    await client.close();
    await reg.stop();
    await rm(work, { recursive: true, force: true });
    runner?.close();
    clearInterval(rssTimer);
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});

/**
 * `npm run bench:fetch`: the registry client against a loopback registry (Debian's
 * docker-registry, started here), each figure next to a baseline measured in the same run:
 *
 * - range reads (`Repository.readRange`, random offsets in a real layer blob of tens of MB) of
 *   64 KiB, 1 MiB and 4 MiB at concurrency 1, 8 and 32: throughput and p50/p99 latency, next to
 *   bare undici requests of the same ranges (same connection limit, no auth, checks or copies);
 * - a full-blob GET through `Repository.blobStream` (digest checked) against
 *   `curl -s -o /dev/null` of the same blob URL (median of a few interleaved runs each), with
 *   the CPU time per GB of each side (less sensitive to other load on the machine than wall
 *   time), and for reference bare undici GETs without and with a sha256 of the body;
 * - `soci-ts create` of a ~300 MB image (three layers of real files from /usr) against
 *   `skopeo copy docker://… dir:…` of the same image.
 *
 * Environment: SOCI_TS_BENCH_DIR (image cache, default /var/tmp/soci-ts-bench),
 * SOCI_TS_BENCH_RANGE_SECONDS (time per range configuration and side, default 3),
 * SOCI_TS_BENCH_RUNS (runs of each full-blob and create measurement, default 5).
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { cpus, loadavg, tmpdir, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Agent, request } from 'undici';
import { RegistryClient, type Descriptor } from '../fetcher/index.js';
import { buildImage, pushImage, type ImageSpec } from '../test/helpers/images.js';
import { startRegistry } from '../test/helpers/registry.js';
import { ExecRunner } from './exec-runner-client.js';

const benchDir = process.env.SOCI_TS_BENCH_DIR ?? '/var/tmp/soci-ts-bench';
const rangeSeconds = Number(process.env.SOCI_TS_BENCH_RANGE_SECONDS ?? 3);
const runs = Number(process.env.SOCI_TS_BENCH_RUNS ?? 5);
/** Each range row alternates this many slices of baseline and soci-ts. */
const SLICES = 5;
const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** ~300 MiB of tar over three layers of real files (built once with umoci, then cached). */
const IMAGE: ImageSpec = {
  name: 'bench-fetch-300MB',
  layers: [
    { kind: 'files', from: ['/usr/lib'], maxBytes: 150 << 20 },
    { kind: 'files', from: ['/usr/share', '/usr/include'], maxBytes: 100 << 20 },
    { kind: 'files', from: ['/usr/bin', '/usr/libexec', '/usr/sbin'], maxBytes: 50 << 20 },
  ],
};

const KiB = 1024;
const MiB = 1024 * 1024;

function exec(cmd: string, args: readonly string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
    child.on('error', reject);
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`${cmd} ${args.join(' ')}: exit ${code}: ${err}`))));
  });
}

async function timed(f: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await f();
  return performance.now() - t0;
}

function percentile(sorted: readonly number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  return n % 2 === 1 ? s[(n - 1) / 2]! : (s[n / 2 - 1]! + s[n / 2]!) / 2;
}

const ms = (x: number): string => (x < 10 ? x.toFixed(2) : x.toFixed(1));
const out = (line = ''): boolean => process.stdout.write(`${line}\n`);
const sizeName = (n: number): string => (n >= MiB ? `${n / MiB} MiB` : `${n / KiB} KiB`);

/** Deterministic pseudo-random offsets (the same ranges on both sides). */
function offsets(seed: number, size: number, length: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % (size - length + 1);
  };
}

interface RangeResult {
  mbps: number;
  p50: number;
  p99: number;
  n: number;
}

interface Load {
  lat: number[];
  bytes: number;
  ms: number;
}

/** `concurrency` workers issuing `read(offset)` back to back for `seconds`, added to `into`. */
async function rangeLoad(into: Load, seconds: number, concurrency: number, length: number, next: () => number, read: (offset: number) => Promise<number>): Promise<void> {
  const t0 = performance.now();
  const deadline = t0 + seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < deadline) {
        const off = next();
        const s = performance.now();
        const got = await read(off);
        into.lat.push(performance.now() - s);
        if (got !== length) throw new Error(`read ${got} bytes, not ${length}`);
        into.bytes += got;
      }
    }),
  );
  into.ms += performance.now() - t0;
}

/** One row of the full-blob comparison: wall time per run, CPU and page faults summed over runs. */
interface Row {
  label: string;
  ms: number[];
  cpuMs: number;
  faults: number;
}

function newRow(label: string): Row {
  return { label, ms: [], cpuMs: 0, faults: 0 };
}

/** Runs `f` in this process: wall time, this process's CPU (all threads) and minor page faults. */
async function inProcess(row: Row, f: () => Promise<void>): Promise<void> {
  const r0 = process.resourceUsage();
  const c0 = process.cpuUsage();
  row.ms.push(await timed(f));
  const c = process.cpuUsage(c0);
  row.cpuMs += (c.user + c.system) / 1000;
  row.faults += process.resourceUsage().minorPageFault - r0.minorPageFault;
}

/** A child-process run through `runner`: its wall time and CPU (10 ms resolution, summed over runs). */
async function children(row: Row, runner: ExecRunner, cmd: string, args: readonly string[]): Promise<void> {
  const r = await runner.run(cmd, args);
  row.ms.push(r.ms);
  row.cpuMs += r.cpuMs;
}

function summary(l: Load): RangeResult {
  const lat = [...l.lat].sort((a, b) => a - b);
  return { mbps: l.bytes / 1e6 / (l.ms / 1000), p50: percentile(lat, 50), p99: percentile(lat, 99), n: lat.length };
}

async function main(): Promise<void> {
  const started = performance.now();
  out(`machine: ${cpus().length} x ${cpus()[0]?.model ?? '?'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, node ${process.version}`);
  process.stderr.write(`bench: building the ~300 MB image (once; cached in ${benchDir})\n`);
  const image = await buildImage(benchDir, IMAGE);
  const reg = await startRegistry();
  const work = await mkdtemp(join(tmpdir(), 'soci-ts-bench-fetch-'));
  const client = new RegistryClient({ hostsDir: '', credentials: { configPath: join(work, 'no-docker-config.json'), env: {} } });
  const bare = new Agent({ connections: client.transport.connectionsPerHost, pipelining: 1, keepAliveTimeout: 30_000 });
  let runner: ExecRunner | undefined;
  try {
    process.stderr.write('bench: pushing it to a loopback registry (skopeo)\n');
    const pushed = await pushImage(image.layoutDir, image.tag, reg, 'bench/img');
    const repo = client.repository(pushed.ref);
    const layers = image.layers.map((l) => ({ ...l }));
    const totalLayers = layers.reduce((s, l) => s + l.size, 0);
    const big = layers.reduce((a, b) => (b.size > a.size ? b : a));
    const desc: Descriptor = { mediaType: big.mediaType, digest: big.digest, size: big.size };
    const blobUrl = `${reg.url}/v2/bench/img/blobs/${big.digest}`;
    out(`image: ${layers.length} layers, ${(totalLayers / 1e6).toFixed(1)} MB compressed; range and full-blob reads on a ${(big.size / 1e6).toFixed(1)} MB layer blob`);
    out(`registry: docker-registry on ${reg.host}; client: ${client.transport.connectionsPerHost} connections per host (the default)`);

    // Child processes run from here on (see ExecRunner), so that this process forks no more.
    runner = new ExecRunner();
    // Warm up: connections, the scheme probe, the registry's page cache for the blob.
    await runner.run('curl', ['-s', '-o', '/dev/null', blobUrl]);
    await repo.readRange(desc, 0, 4096);

    // ---------------------------------------------------------------- range reads
    out();
    out(`range reads, random offsets, ${rangeSeconds} s per row and side in ${SLICES} alternating slices; baseline: bare undici GETs of the same ranges (same connection limit, no auth, checks or copies)`);
    out(
      `${'size'.padEnd(8)} ${'conc'.padStart(4)} | ${'MB/s'.padStart(7)} ${'p50 ms'.padStart(7)} ${'p99 ms'.padStart(7)} ${'reads'.padStart(6)} | ${'MB/s'.padStart(7)} ${'p50 ms'.padStart(7)} ${'p99 ms'.padStart(7)} | ${'ratio'.padStart(6)}`,
    );
    out(`${''.padEnd(13)} | ${'soci-ts readRange'.padEnd(30)} | ${'baseline (undici)'.padEnd(23)} |`);
    for (const size of [64 * KiB, 1 * MiB, 4 * MiB]) {
      for (const conc of [1, 8, 32]) {
        // Alternating slices of each side, so a change in the machine's load hits both alike.
        const nextBase = offsets(size + conc, desc.size, size);
        const nextOurs = offsets(size + conc, desc.size, size);
        const b: Load = { lat: [], bytes: 0, ms: 0 };
        const o: Load = { lat: [], bytes: 0, ms: 0 };
        for (let slice = 0; slice < SLICES; slice++) {
          await rangeLoad(b, rangeSeconds / SLICES, conc, size, nextBase, async (off) => {
            const res = await request(blobUrl, { dispatcher: bare, headers: { range: `bytes=${off}-${off + size - 1}` } });
            if (res.statusCode !== 206) throw new Error(`baseline range answered ${res.statusCode}`);
            let n = 0;
            for await (const chunk of res.body as AsyncIterable<Buffer>) n += chunk.length;
            return n;
          });
          await rangeLoad(o, rangeSeconds / SLICES, conc, size, nextOurs, async (off) => (await repo.readRange(desc, off, size)).length);
        }
        const base = summary(b);
        const ours = summary(o);
        out(
          `${sizeName(size).padEnd(8)} ${String(conc).padStart(4)} | ${ours.mbps.toFixed(0).padStart(7)} ${ms(ours.p50).padStart(7)} ${ms(ours.p99).padStart(7)} ${String(ours.n).padStart(6)} | ` +
            `${base.mbps.toFixed(0).padStart(7)} ${ms(base.p50).padStart(7)} ${ms(base.p99).padStart(7)} | ${`${(ours.mbps / base.mbps).toFixed(2)}x`.padStart(6)}`,
        );
      }
    }

    // ---------------------------------------------------------------- full blob
    out();
    out(`full-blob GET of the ${(big.size / 1e6).toFixed(1)} MB layer, median of ${runs} runs each (interleaved); cpu: user+sys per GB over all runs (this process's threads, or the child processes)`);
    const rows = {
      ours: newRow('soci-ts blobStream (sha256 checked)'),
      curl: newRow('curl -s -o /dev/null (baseline)'),
      undici: newRow('(bare undici GET, body discarded)'),
      undiciSha: newRow('(bare undici GET + sha256, same thread)'),
      curlSha: newRow('(curl -s | sha256sum, for reference)'),
    };
    // One untimed download first (the range reads left other buffers in the heap).
    await runner.run('curl', ['-s', '-o', '/dev/null', blobUrl]);
    for await (const chunk of repo.blobStream(desc)) void chunk;
    const loadBefore = loadavg()[0]!;
    for (let i = 0; i < runs; i++) {
      // Only for reference: what the HTTP client under the fetcher reaches with no work per chunk,
      // and with only the digest computed per chunk (no resume, size or mapping logic).
      await inProcess(rows.undici, async () => {
        const res = await request(blobUrl, { dispatcher: bare });
        for await (const chunk of res.body as AsyncIterable<Buffer>) void chunk;
      });
      await children(rows.curl, runner, 'curl', ['-s', '-o', '/dev/null', blobUrl]);
      await inProcess(rows.undiciSha, async () => {
        const hash = createHash('sha256');
        const res = await request(blobUrl, { dispatcher: bare });
        for await (const chunk of res.body as AsyncIterable<Buffer>) hash.update(chunk);
        if (`sha256:${hash.digest('hex')}` !== desc.digest) throw new Error('bare undici GET: digest mismatch');
      });
      // Only for reference: the same download with its digest checked, as blobStream does.
      await children(rows.curlSha, runner, 'sh', ['-c', 'curl -s "$1" | sha256sum > /dev/null', 'sh', blobUrl]);
      await inProcess(rows.ours, async () => {
        let n = 0;
        for await (const chunk of repo.blobStream(desc)) n += chunk.length;
        if (n !== desc.size) throw new Error(`blobStream gave ${n} bytes`);
      });
    }
    const rate = (r: Row): number => big.size / 1e6 / (median(r.ms) / 1000);
    const cpu = (r: Row): string => `cpu ${(r.cpuMs / 1000 / ((big.size * r.ms.length) / 1e9)).toFixed(2)} s/GB`;
    const line = (r: Row, extra = ''): boolean =>
      out(`${r.label.padEnd(40)} ${rate(r).toFixed(0).padStart(6)} MB/s  ${cpu(r)}${extra}  (runs: ${r.ms.map((x) => x.toFixed(0)).join(', ')} ms)`);
    const faults = (r: Row): string => `, ${Math.round(r.faults / r.ms.length)} page faults per run`;
    line(rows.ours, faults(rows.ours));
    line(rows.curl);
    out(`${'ratio (goal >= 0.9x)'.padEnd(40)} ${`${(rate(rows.ours) / rate(rows.curl)).toFixed(2)}x`.padStart(6)}`);
    line(rows.undici, `, ${(rate(rows.undici) / rate(rows.curl)).toFixed(2)}x curl${faults(rows.undici)}`);
    line(rows.undiciSha, `, ${(rate(rows.undiciSha) / rate(rows.curl)).toFixed(2)}x curl${faults(rows.undiciSha)}`);
    line(rows.curlSha);
    out(`(1-minute load average ${loadBefore.toFixed(1)} before these runs, ${loadavg()[0]!.toFixed(1)} after, on ${cpus().length} cores)`);

    // ---------------------------------------------------------------- create vs skopeo copy
    out();
    out(`soci-ts create of the ${(totalLayers / 1e6).toFixed(0)} MB image vs skopeo copy to dir: (same image, same registry), median of ${runs} runs each (interleaved)`);
    const createMs: number[] = [];
    const skopeoMs: number[] = [];
    for (let i = 0; i < runs; i++) {
      const dir = join(work, `skopeo-${i}`);
      skopeoMs.push(await timed(() => exec('skopeo', ['copy', '--quiet', '--src-tls-verify=false', `docker://${pushed.ref}`, `dir:${dir}`])));
      await rm(dir, { recursive: true, force: true });
      const root = join(work, `root-${i}`);
      createMs.push(await timed(() => exec(join(repoRoot, 'bin', 'soci-ts'), ['create', '--root', root, '--hosts-dir', '', '--log-level', 'error', pushed.ref])));
      await rm(root, { recursive: true, force: true });
    }
    const c = median(createMs);
    const s = median(skopeoMs);
    out(`${'soci-ts create'.padEnd(40)} ${(c / 1000).toFixed(2).padStart(6)} s  (${(totalLayers / 1e6 / (c / 1000)).toFixed(0)} MB/s compressed; runs: ${createMs.map((x) => x.toFixed(0)).join(', ')} ms)`);
    out(`${'skopeo copy docker:// dir: (baseline)'.padEnd(40)} ${(s / 1000).toFixed(2).padStart(6)} s  (${(totalLayers / 1e6 / (s / 1000)).toFixed(0)} MB/s; runs: ${skopeoMs.map((x) => x.toFixed(0)).join(', ')} ms)`);
    out(`${'ratio (create time / copy time)'.padEnd(40)} ${`${(c / s).toFixed(2)}x`.padStart(6)}`);
    out();
    out(`bench took ${((performance.now() - started) / 1000).toFixed(0)} s`);
  } finally {
    runner?.close();
    await bare.close().catch(() => undefined);
    await client.close();
    await reg.stop();
    await rm(work, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exit(2);
});

/**
 * `npm run bench:ztoc`: zTOC build throughput against `gzip -dc` on the same
 * layer in the same run, the zTOC's size as a fraction of the layer, and
 * extraction latency (random 4 KiB ranges, random whole files).
 *
 * Environment: SOCI_TS_BENCH_DIR (default /var/tmp/soci-ts-bench),
 * SOCI_TS_BENCH_MB (uncompressed layer size, default 600), SOCI_TS_BENCH_SAMPLES (default 200).
 */
import { spawn } from 'node:child_process';
import { mkdir, stat, rename } from 'node:fs/promises';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import {
  availableEngines,
  buildZtocFromFile,
  encodeZtoc,
  extractFile,
  extractRange,
  FileBlobReader,
  LayerIndex,
  type InflateEngine,
} from '../ztoc/index.js';

const benchDir = process.env.SOCI_TS_BENCH_DIR ?? '/var/tmp/soci-ts-bench';
const targetMB = Number(process.env.SOCI_TS_BENCH_MB ?? 600);
const samples = Number(process.env.SOCI_TS_BENCH_SAMPLES ?? 200);

function sh(script: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', script], { stdio: ['ignore', 'ignore', 'inherit'] });
    child.on('error', reject);
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`${script}: exit ${code}`))));
  });
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(() => true, () => false);
}

/** A layer of real files from /usr, about `targetMB` MB of tar, gzip -6. */
async function makeLayer(): Promise<string> {
  await mkdir(benchDir, { recursive: true });
  const layer = join(benchDir, `usr-${targetMB}MB.tar.gz`);
  if (await exists(layer)) return layer;
  process.stderr.write(`bench: making a ${targetMB} MB layer from /usr (once; cached in ${benchDir})\n`);
  const list = join(benchDir, 'files.txt');
  // Regular files from /usr in a stable order until the size is reached.
  await sh(
    `find /usr/lib /usr/share /usr/bin /usr/include -xdev -type f -size -64M -printf '%s %p\\n' 2>/dev/null | sort -k2 | ` +
      `awk -v max=${targetMB * 1e6} '{ total += $1; if (total > max) exit; sub(/^[0-9]+ \\//, ""); print }' > '${list}'`,
  );
  await sh(`tar -C / --no-recursion -cf - -T '${list}' 2>/dev/null | gzip -6 > '${layer}.tmp'`);
  await rename(`${layer}.tmp`, layer);
  return layer;
}

async function time<T>(f: () => Promise<T>): Promise<[T, number]> {
  const t0 = performance.now();
  const r = await f();
  return [r, performance.now() - t0];
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function fmt(ms: number): string {
  return ms < 10 ? ms.toFixed(2) : ms.toFixed(1);
}

async function main(): Promise<void> {
  const layer = await makeLayer();
  const layerSize = (await stat(layer)).size;
  process.stdout.write(`machine: ${cpus().length} x ${cpus()[0]?.model ?? '?'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, node ${process.version}\n`);

  // Warm the page cache so both sides read from memory.
  await sh(`cat '${layer}' > /dev/null`);
  const [, gzipMs] = await time(() => sh(`gzip -dc '${layer}' > /dev/null`));

  let uncompressed = 0;
  const results: Array<{ engine: string; ms: number }> = [];
  let ztocBytes = 0;
  let index: LayerIndex | undefined;
  for (const engine of availableEngines()) {
    const [z, ms] = await time(() => buildZtocFromFile(layer, { engine }));
    results.push({ engine: engine.name, ms });
    uncompressed = z.uncompressedArchiveSize;
    const bytes = encodeZtoc(z);
    ztocBytes = bytes.length;
    index ??= new LayerIndex(z, layer);
  }
  if (!index) throw new Error('no inflate engine available');
  const mb = uncompressed / 1e6;
  process.stdout.write(`\nlayer: ${(layerSize / 1e6).toFixed(1)} MB gzip, ${mb.toFixed(1)} MB tar, ${index.ztoc.files.length} entries, ${index.spans.length} spans of ${index.spanSize} bytes\n`);
  process.stdout.write(`\n${'zTOC build'.padEnd(26)} ${'MB/s (tar)'.padStart(10)} ${'vs gzip -dc'.padStart(12)}\n`);
  const gzipRate = mb / (gzipMs / 1000);
  process.stdout.write(`${'gzip -dc > /dev/null'.padEnd(26)} ${gzipRate.toFixed(1).padStart(10)} ${'1.00x'.padStart(12)}\n`);
  for (const r of results) {
    const rate = mb / (r.ms / 1000);
    process.stdout.write(`${`soci-ts build (${r.engine})`.padEnd(26)} ${rate.toFixed(1).padStart(10)} ${`${(rate / gzipRate).toFixed(2)}x`.padStart(12)}\n`);
  }
  process.stdout.write(`\nzTOC size: ${ztocBytes} bytes = ${((ztocBytes / layerSize) * 100).toFixed(3)}% of the compressed layer, ${((ztocBytes / uncompressed) * 100).toFixed(3)}% of the tar\n`);

  const blob = await FileBlobReader.open(layer);
  try {
    // Warm the file cache for the blob so latency measures inflation, not disk.
    let seed = 42;
    const rand = (n: number): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    const files = index.ztoc.files.filter((f) => f.type === 'reg' && f.uncompressedSize > 0);
    process.stdout.write(`\nextraction latency from the local blob, ${samples} samples each (ms)\n`);
    process.stdout.write(`${'engine / read'.padEnd(30)} ${'median'.padStart(8)} ${'p99'.padStart(8)} ${'max'.padStart(8)}\n`);
    for (const engine of availableEngines()) {
      const measure = async (label: string, op: (e: InflateEngine) => Promise<unknown>): Promise<void> => {
        const ms: number[] = [];
        for (let i = 0; i < samples; i++) ms.push((await time(() => op(engine)))[1]);
        ms.sort((a, b) => a - b);
        process.stdout.write(`${`${engine.name} ${label}`.padEnd(30)} ${fmt(percentile(ms, 50)).padStart(8)} ${fmt(percentile(ms, 99)).padStart(8)} ${fmt(ms[ms.length - 1]).padStart(8)}\n`);
      };
      await measure('random 4 KiB', (e) => extractRange(index!, blob, rand(uncompressed - 4096), 4096, e));
      await measure('random whole file', (e) => extractFile(index!, blob, files[rand(files.length)], e));
    }
    const meanFile = files.reduce((s, f) => s + f.uncompressedSize, 0) / files.length;
    process.stdout.write(`(mean regular file size ${(meanFile / 1024).toFixed(1)} KiB; span size ${index.spanSize} bytes)\n`);
  } finally {
    await blob.close();
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exit(2);
});

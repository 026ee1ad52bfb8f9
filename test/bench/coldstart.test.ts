/**
 * `soci-ts bench coldstart` end to end with the real parts (docker-registry, containerd 1.6,
 * runc), as a user runs it: the overlayfs mode for the built-in small workload, one run, on
 * loopback. Checked against independent oracles:
 * - the container printed its ready line, and the byte count it printed equals GNU tar's
 *   extraction of the files its command names, from the image's own layer blob;
 * - bytes fetched through the bench's proxy are the image's compressed size (layers and
 *   config, as the OCI layout that was pushed lists them) plus at most the manifest and
 *   HTTP headers;
 * - results.json, report.md and chart.svg are written; soci-ts was not asked for, so it is absent;
 * - nothing is left: the bench's temp dir, its mounts and its processes are gone.
 * The same for the soci-ts mode (rpull, the snapshotter): the layers were mounted over FUSE (the
 * kernel's mount table), fewer bytes than the layers were fetched, with range requests, and the
 * command read the same bytes as tar extracts.
 * And SIGINT in the middle of a run: exit code 130, and again nothing is left.
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ColdstartResults } from '../../bench/coldstart/index.js';
import { BUILTIN_IMAGES } from '../../bench/coldstart/index.js';
import { buildImage } from '../helpers/images.js';
import { run, testCacheDir } from '../helpers/layers.js';
import { SOCI_TS_BIN } from '../helpers/snapshotter.js';

interface Ran {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function bench(args: string[], opts: { interruptWhen?: RegExp } = {}): Promise<Ran> {
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  return new Promise((resolve, reject) => {
    const child = spawn(SOCI_TS_BIN, ['bench', 'coldstart', ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let sent = false;
    child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
    child.stderr.on('data', (b: Buffer) => {
      stderr += b.toString();
      if (opts.interruptWhen !== undefined && !sent && opts.interruptWhen.test(stderr)) {
        sent = true;
        child.kill('SIGINT');
      }
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 8 * 60_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** The dirs the bench said it made: its temp dir, the registry's, containerd's. */
function benchDirs(stderr: string): string[] {
  return [/working in (\/\S+)/, /storage in (\/\S+)/, /containerd in (\/\S+)/].map((re) => re.exec(stderr)?.[1] ?? '').filter((d) => d !== '');
}

async function gone(t: Test, dirs: string[], expect: number): Promise<void> {
  t.equal(dirs.length, expect, `the bench named its dirs (${dirs.join(', ')})`);
  const info = await readFile('/proc/self/mountinfo', 'utf8');
  for (const dir of dirs) {
    await t.rejects(stat(dir), { code: 'ENOENT' }, `${dir} is removed`);
    t.same(info.split('\n').filter((l) => l.includes(dir)), [], `nothing mounted under ${dir}`);
    const procs: string[] = [];
    for (const p of await readdir('/proc')) {
      if (!/^\d+$/.test(p)) continue;
      try {
        const cmd = (await readFile(`/proc/${p}/cmdline`, 'utf8')).replace(/\0/g, ' ');
        if (cmd.includes(dir)) procs.push(`${p}: ${cmd}`);
      } catch {
        // exited
      }
    }
    t.same(procs, [], `no process mentioning ${dir} is left (registry, containerd, shims, snapshotter, watchdogs)`);
  }
}

t.test('overlayfs, small workload, one run on loopback', async (t) => {
  const out = await mkdtemp(join(tmpdir(), 'soci-ts-coldstart-test-'));
  t.teardown(() => rm(out, { recursive: true, force: true }));
  const r = await bench(['--runs', '1', '--network', 'loopback', '--mode', 'overlayfs', '--only', 'small', '--out', out, '--image-cache', testCacheDir()]);
  if (r.code !== 0) t.comment(r.stderr.slice(-3000));
  t.equal(r.code, 0, 'exit 0');
  const results = JSON.parse(await readFile(join(out, 'results.json'), 'utf8')) as ColdstartResults;
  t.same(results.modes, [{ mode: 'overlayfs', available: true }], 'only overlayfs asked for');
  t.equal(results.runs.length, 1);
  const cell = results.runs[0];
  t.match(cell, { workload: 'small', network: 'loopback', mode: 'overlayfs', status: 'ok', runs: 1 });
  const sample = cell?.samples[0];
  t.ok(sample !== undefined, 'one sample');
  if (cell === undefined || sample === undefined) return;
  t.match(sample.ready_line, /^coldstart ready: read \d+ bytes$/, 'the ready line was seen on the container stdout');
  t.ok(sample.total_ms > 0 && sample.pull_ms > 0 && sample.create_ms > 0 && sample.run_ms > 0, 'every phase timed');
  t.ok(sample.total_ms >= sample.pull_ms + sample.create_ms + sample.run_ms, 'the total covers the phases');
  t.equal(cell.median_ms, sample.total_ms, 'median of one run');

  // The image as it was pushed (the same cached layout the bench built).
  const img = await buildImage(testCacheDir(), BUILTIN_IMAGES.small);
  const layers = img.manifest.layers.reduce((a, l) => a + l.size, 0);
  const manifestSize = (await stat(join(img.layoutDir, 'blobs', 'sha256', img.manifestDigest.slice(7)))).size;
  const floor = layers + img.manifest.config.size;
  t.ok(sample.bytes_fetched >= floor, `fetched ${sample.bytes_fetched} >= layers + config (${floor})`);
  t.ok(sample.bytes_fetched <= floor + manifestSize + 64 * 1024, `fetched ${sample.bytes_fetched} <= that + manifest (${manifestSize}) + 64 KiB of HTTP headers`);
  t.equal(cell.image_bytes, floor + manifestSize, 'image_bytes is manifest + config + layers');
  t.ok(sample.blob_requests >= img.manifest.layers.length + 1, `a blob GET per layer and the config (${sample.blob_requests})`);

  // What the command read, by GNU tar from the layer blob (the files it names).
  const w = results.workloads.find((x) => x.name === 'small');
  const files = w?.command.slice(4) ?? [];
  t.ok(files.length > 0, `the command names ${files.length} files`);
  const top = img.layers[img.layers.length - 1];
  const tarCount = await run('bash', ['-c', 'f=$1; shift; tar -xzOf "$f" "$@" | wc -c', 'x', top?.path ?? '', ...files.map((f) => f.replace(/^\//, ''))]);
  t.equal(sample.bytes_read, Number(tarCount.stdout.trim()), `the command read what tar extracts of those files (${tarCount.stdout.trim()} bytes)`);
  t.equal(w?.expected_bytes_read, sample.bytes_read, 'and what the bench expected from the layer listing');

  for (const f of ['report.md', 'chart.svg']) t.ok((await stat(join(out, f))).size > 0, `${f} written`);
  t.match(await readFile(join(out, 'report.md'), 'utf8'), /\| small \| overlayfs \| 1 \|/, 'the report has the run');
  t.match(r.stdout, /loopback\s+small\s+overlayfs\s+1\s+\S+/, 'the terminal table has the run');
  await gone(t, benchDirs(r.stderr), 3);
});

t.test('soci-ts, small workload, one run on loopback: lazy, and the same bytes read', async (t) => {
  const out = await mkdtemp(join(tmpdir(), 'soci-ts-coldstart-test-'));
  t.teardown(() => rm(out, { recursive: true, force: true }));
  const r = await bench(['--runs', '1', '--network', 'loopback', '--mode', 'soci-ts', '--only', 'small', '--out', out, '--image-cache', testCacheDir()]);
  if (r.code !== 0) t.comment(r.stderr.slice(-3000));
  t.equal(r.code, 0, 'exit 0');
  const results = JSON.parse(await readFile(join(out, 'results.json'), 'utf8')) as ColdstartResults;
  t.same(results.modes, [{ mode: 'soci-ts', available: true }], 'soci-ts available in this checkout');
  const w = results.workloads.find((x) => x.name === 'small');
  t.ok(w?.soci_index?.startsWith('sha256:'), `soci-ts create --push made an index (${w?.soci_index ?? w?.soci_index_error ?? ''})`);
  t.ok((w?.layers ?? []).some((l) => l.indexed), 'with a zTOC for at least one layer');
  const cell = results.runs[0];
  t.match(cell, { workload: 'small', network: 'loopback', mode: 'soci-ts', status: 'ok', runs: 1 });
  const sample = cell?.samples[0];
  if (cell === undefined || sample === undefined) return;
  t.match(sample.ready_line, /^coldstart ready: read \d+ bytes$/, 'the ready line was seen');
  t.ok((sample.lazy_mounts ?? 0) >= 1, `FUSE mounts under the snapshotter's root while the container ran (${sample.lazy_mounts ?? 'none'}, from /proc/self/mountinfo)`);
  const img = await buildImage(testCacheDir(), BUILTIN_IMAGES.small);
  const layers = img.manifest.layers.reduce((a, l) => a + l.size, 0);
  t.ok(sample.bytes_fetched < layers, `lazily: fetched ${sample.bytes_fetched} < the layers' ${layers} bytes`);
  t.ok(sample.range_requests >= 1, `range requests for spans (${sample.range_requests})`);
  const files = w?.command.slice(4) ?? [];
  const top = img.layers[img.layers.length - 1];
  const tarCount = await run('bash', ['-c', 'f=$1; shift; tar -xzOf "$f" "$@" | wc -c', 'x', top?.path ?? '', ...files.map((f) => f.replace(/^\//, ''))]);
  t.equal(sample.bytes_read, Number(tarCount.stdout.trim()), 'through the lazy layers the command read what tar extracts');
  await gone(t, benchDirs(r.stderr), 3);
});

t.test('SIGINT during a run: exit 130, everything removed', async (t) => {
  const out = await mkdtemp(join(tmpdir(), 'soci-ts-coldstart-test-'));
  t.teardown(() => rm(out, { recursive: true, force: true }));
  const r = await bench(['--runs', '3', '--network', 'wan', '--mode', 'overlayfs', '--only', 'small', '--out', out, '--image-cache', testCacheDir()], { interruptWhen: /\[1\/3\] wan small overlayfs run 1\/3/ });
  if (r.code !== 130) t.comment(r.stderr.slice(-3000));
  t.equal(r.code, 130, 'exit 130');
  t.match(r.stderr, /SIGINT: stopping and removing everything the bench started/, 'says what it does');
  await t.rejects(stat(join(out, 'results.json')), { code: 'ENOENT' }, 'no results from an interrupted bench');
  await gone(t, benchDirs(r.stderr), 3);
});

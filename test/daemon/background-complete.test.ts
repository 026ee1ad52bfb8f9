/**
 * A lazily mounted layer that the FUSE manager's background fetcher brings home: once every
 * span is local, the snapshotter's metrics endpoint says so (`soci_ts_layer_complete{layer} 1`,
 * `soci_ts_layer_spans_local` = `soci_ts_layer_spans`), the manager logs it, and the disk cache
 * holds every span of the zTOC, each file named by the sha256 of its bytes (re-hashed here), so
 * an operator can tell the container no longer depends on the registry; and once the layer's
 * snapshot and last mount are gone, no series of the layer is left in either process. Real docker-registry,
 * `soci-ts create --push`, `soci-ts snapshotter` with its FUSE manager and metrics endpoint.
 */
import t from 'tap';
import { status } from '@grpc/grpc-js';
import { createHash } from 'node:crypto';
import { mkdtemp, readdir, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { SnapshotsClient } from '../../daemon/grpc-api.js';
import { FuseManagerClient } from '../../daemon/fuse-manager-client.js';
import { readZtoc } from '../../ztoc/index.js';
import { value } from '../helpers/exposition.js';
import { defaultImages } from '../helpers/images.js';
import { registryRequest, startRegistry } from '../helpers/registry.js';
import { pushIndexed, scrapeDaemon } from '../helpers/remote.js';
import { startSnapshotter, stopFuseManager, unmountUnder } from '../helpers/snapshotter.js';
import { run } from '../helpers/layers.js';

const work = await mkdtemp(path.join(tmpdir(), 'soci-ts-bg-complete-'));
const root = path.join(work, 'root');
const address = path.join(work, 'soci-ts.sock');
const config = path.join(work, 'config.toml');
await writeFile(config, `hosts_dir = ""\n[background_fetch]\nenabled = true\nstart_delay = "0s"\nrate = "256MiB"\n`);
const registry = await startRegistry();
t.teardown(async () => {
  await stopFuseManager(root);
  await unmountUnder(work);
  await registry.stop();
  await run('rm', ['-rf', '--one-file-system', '--', work]).catch(() => undefined);
});

const { multi } = await defaultImages();
const { pushed, layer: indexed, layerIndex } = await pushIndexed(registry, multi, 'bg/multi', path.join(work, 'create-store'));
const ztocBytes = (await registryRequest(registry, `/v2/bg/multi/blobs/${indexed.ztoc}`)).body;
const ztoc = readZtoc(ztocBytes);
const spanDigests = ztoc.ztoc.compressionInfo.spanDigests;

t.test('every span fetched in the background: the metric, the log and the disk cache agree', async (t) => {
  const d = await startSnapshotter({ root, address, args: ['--config', config, '--metrics-address', '127.0.0.1:0'], startTimeoutMs: 60_000 });
  t.teardown(() => d.stop());
  const c = await SnapshotsClient.connect(address);
  t.teardown(() => c.close());
  const target = `sha256:${'5'.repeat(64)}`;
  const labels = {
    'containerd.io/snapshot.ref': target,
    'containerd.io/snapshot/cri.image-ref': pushed.ref,
    'containerd.io/snapshot/cri.manifest-digest': pushed.manifestDigest,
    'containerd.io/snapshot/cri.layer-digest': indexed.digest,
    'containerd.io/snapshot/cri.image-layers': multi.layers.slice(layerIndex).map((l) => l.digest).join(','),
  };
  // The snapshotter preloads zTOCs it fetched ahead; here by hand: the mount then only mounts.
  for (let i = 0; i < 600 && !d.logLines().some((l) => l.msg === 'FUSE manager: started'); i++) await new Promise((r) => setTimeout(r, 100));
  const mc = await FuseManagerClient.connect(path.join(root, 'fuse-manager.sock'));
  t.teardown(() => mc.close());
  const wireOf = (d: { mediaType: string; digest: string; size: number }): { mediaType: string; digest: string; size: number } => ({ mediaType: d.mediaType, digest: d.digest, size: d.size });
  const layerDesc = pushed.layers[layerIndex]!;
  const ztocDesc = { mediaType: 'application/octet-stream', digest: indexed.ztoc, size: ztocBytes.length };
  await t.rejects(
    mc.call('preload', { imageRef: pushed.ref, layer: wireOf(layerDesc), ztoc: { ...ztocDesc, digest: `sha256:${'0'.repeat(64)}` } }),
    { name: 'FuseManagerError' },
    'preload of a zTOC the registry does not have: an error',
  );
  t.same(await mc.call('preload', { imageRef: pushed.ref, layer: wireOf(layerDesc), ztoc: ztocDesc }), { preloaded: true }, 'preload of the layer\'s zTOC');
  await t.rejects(c.prepare(`extract ${target}`, '', labels), { code: status.ALREADY_EXISTS }, 'the layer is served lazily');
  // The manager logs before it answers, but its log file is written asynchronously: wait for the line.
  let mountedLine: string | undefined;
  for (const end = Date.now() + 10_000; mountedLine === undefined && Date.now() < end; await new Promise((r) => setTimeout(r, 100))) {
    mountedLine = (await readFile(path.join(root, 'fuse-manager.log'), 'utf8')).split('\n').find((l) => l.includes('"msg":"layer mounted lazily"'));
  }
  t.match(mountedLine, /"preloaded":true/, 'the mount used the preloaded zTOC and inode table');

  let complete: number | undefined;
  let fams = await scrapeDaemon(d);
  for (const end = Date.now() + 120_000; Date.now() < end; ) {
    fams = await scrapeDaemon(d);
    complete = value(fams, 'soci_ts_layer_complete', { layer: indexed.digest, process: 'fuse-manager' });
    if (complete === 1) break;
    await new Promise((r) => setTimeout(r, 250));
  }
  t.equal(complete, 1, 'soci_ts_layer_complete{layer} is 1');
  t.equal(value(fams, 'soci_ts_layer_spans', { layer: indexed.digest, process: 'fuse-manager' }), spanDigests.length, 'soci_ts_layer_spans: the zTOC\'s span count');
  t.equal(value(fams, 'soci_ts_layer_spans_local', { layer: indexed.digest, process: 'fuse-manager' }), spanDigests.length, 'every span local');

  const onDisk = new Map<string, string>();
  const dir = path.join(root, 'cache', 'spans');
  for (const sub of await readdir(dir)) {
    for (const f of await readdir(path.join(dir, sub)).catch(() => [] as string[])) {
      onDisk.set(`sha256:${f}`, createHash('sha256').update(await readFile(path.join(dir, sub, f))).digest('hex'));
    }
  }
  t.same(spanDigests.filter((s) => !onDisk.has(s)), [], 'the disk cache holds every span of the zTOC');
  t.same([...onDisk].filter(([name, sum]) => `sha256:${sum}` !== name).map(([n]) => n), [], 'each span file hashes to its name (the span digest)');
  const log = await readFile(path.join(root, 'fuse-manager.log'), 'utf8');
  t.ok(log.split('\n').some((l) => l.includes(indexed.digest) && l.includes('"msg":"layer is complete')), 'the manager logged that the layer is complete');

  // Per-layer series leave with the layer's last snapshot and last mount: a daemon that has
  // served many images does not keep a label set for every layer it ever saw.
  const seriesOf = (f: Map<string, { samples: { name: string; labels: Record<string, string> }[] }>, proc: string): string[] =>
    [...f.values()].flatMap((fam) => fam.samples.filter((s) => s.labels.layer === indexed.digest && s.labels.process === proc).map((s) => s.name));
  fams = await scrapeDaemon(d);
  t.ok(seriesOf(fams, 'snapshotter').includes('soci_ts_layer_mode'), 'before removal: the snapshotter has the layer\'s mode series');
  t.ok(seriesOf(fams, 'fuse-manager').length > 3, 'before removal: the FUSE manager has the layer\'s series');
  // A second mount of the same layer (as a second snapshot of it would have) keeps the manager's series.
  const extra = path.join(work, 'extra-mount');
  await mc.call('mount', { mountpoint: extra, imageRef: pushed.ref, layer: wireOf(layerDesc), ztoc: ztocDesc });
  // Reads of spans in memory are answered natively in the manager, and counted as reads.
  const big = ztoc.ztoc.files.filter((f) => f.type === 'reg').sort((x, y) => y.uncompressedSize - x.uncompressedSize)[0]!;
  const name = big.name.replace(/^\.?\//, '');
  const blob = path.join(work, 'layer.blob');
  await writeFile(blob, (await registryRequest(registry, `/v2/bg/multi/blobs/${layerDesc.digest}`)).body);
  const want = path.join(work, 'big.want');
  await run('tar', ['-xzOf', blob, name], { stdoutFile: want });
  const sha = async (f: string): Promise<string> => createHash('sha256').update(await readFile(f)).digest('hex');
  t.equal(await sha(path.join(extra, name)), await sha(want), `${name} (${big.uncompressedSize} bytes): first read equals tar -xO`);
  await run('sh', ['-c', 'sync; echo 3 > /proc/sys/vm/drop_caches']);
  t.equal(await sha(path.join(extra, name)), await sha(want), 'second read (page cache dropped) equals tar -xO');
  let native: number | undefined;
  for (const end = Date.now() + 15_000; Date.now() < end; ) {
    native = value(await scrapeDaemon(d), 'soci_ts_fuse_native_reads_total', { layer: indexed.digest, process: 'fuse-manager' });
    if (native !== undefined && native > 0) break;
    await new Promise((r) => setTimeout(r, 500));
  }
  t.ok(native !== undefined && native > 0, `soci_ts_fuse_native_reads_total{layer}: ${native} reads answered natively by the FUSE manager`);
  await c.remove(target);
  fams = await scrapeDaemon(d);
  t.same(seriesOf(fams, 'snapshotter'), [], 'the snapshot removed: no series of the layer is left in the snapshotter');
  t.ok(seriesOf(fams, 'fuse-manager').includes('soci_ts_layer_complete'), 'another mount of the layer: the manager keeps its series');
  t.same(await mc.call('unmount', { mountpoint: extra, release: false }), { unmounted: true, released: 0 }, 'the other mount unmounted');
  fams = await scrapeDaemon(d);
  t.same(seriesOf(fams, 'fuse-manager'), [], 'the last mount gone: no series of the layer is left in the manager');
  // Not vacuous: the manager answered this scrape, and its text was merged into it.
  t.equal(value(fams, 'soci_ts_metrics_source_up', { source: 'fuse-manager' }), 1, 'the manager answered the scrape');
  t.ok(value(fams, 'process_resident_memory_bytes', { process: 'fuse-manager' })! > 0, 'the manager\'s own series are in the scrape');
});

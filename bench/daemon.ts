/**
 * `npm run bench:daemon`: the snapshotter daemon's Snapshots API, against containerd's built-in
 * overlayfs snapshotter in the same run, and its memory with lazily mounted layers.
 *
 * - Prepare / Mounts / Commit / Stat latency (p50, p99) over N snapshots (default 1000; chains
 *   of 10: each tenth snapshot starts a new chain, the others have the previous one as parent),
 *   each call timed alone, sequentially, on:
 *   a. `soci-ts snapshotter` directly (its socket, as containerd's proxy plugin calls it);
 *   b. containerd's Snapshots API with snapshotter "overlayfs" (containerd's own metadata
 *      layer in front of its built-in snapshotter);
 *   c. containerd's Snapshots API with snapshotter "soci-ts" (the same metadata layer in front
 *      of our daemon through the proxy plugin), so (c)/(b) compares like with like.
 *   Snapshots made through containerd are held by a lease (and carry `containerd.io/gc.root`)
 *   so containerd's GC leaves them alone; all are removed afterwards (not timed).
 * - The RSS (VmRSS of /proc/PID/status) of the snapshotter and of its FUSE manager, each on its
 *   own, before and after 20 lazily mounted layers: an image of 20 distinct gzip layers of real
 *   files from /usr (about 48 MiB of tar each, all above the 10 MiB minimum layer size; built
 *   once with umoci and cached like the test images), pushed and indexed with `soci-ts create
 *   --push`, each layer Prepared with containerd's remote-snapshot labels as containerd's
 *   unpacker sends them (parent = the chain below it), so 20 FUSE mounts of 20 zTOCs (counted in
 *   /proc/self/mountinfo and in the manager's list); background fetch off; then one small file
 *   read from each mount. The FUSE manager's RSS with the first layer mounted is printed too (it
 *   starts with the first lazy layer).
 *
 * Environment: SOCI_TS_BENCH_SNAPSHOTS (default 1000).
 */
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { status, type ServiceError } from '@grpc/grpc-js';
import { SnapshotsClient } from '../daemon/grpc-api.js';
import { readZtoc } from '../ztoc/index.js';
import { startContainerd } from '../test/helpers/containerd.js';
import { buildImage, chainIdsOf, pushImage, type ImageSpec } from '../test/helpers/images.js';
import { run, testCacheDir } from '../test/helpers/layers.js';
import { FuseManagerClient } from '../daemon/fuse-manager-client.js';
import { registryRequest, startRegistry } from '../test/helpers/registry.js';
import { fuseManagerPid, sociTs, startSnapshotter, stopFuseManager, unmountUnder } from '../test/helpers/snapshotter.js';

const N = Number(process.env.SOCI_TS_BENCH_SNAPSHOTS ?? 1000);
const CHAIN = 10;
const LAZY = 20;

/**
 * 20 distinct layers of real files (each takes files no layer below took), each about 48 MiB
 * of tar, so that every one is above soci-ts create's 10 MiB minimum layer size once gzipped.
 * /usr/lib comes last: what the smaller roots run out of is taken from it.
 */
const LAZY_IMAGE_SPEC = {
  name: 'bench-lazy20',
  layers: Array.from({ length: LAZY }, () => ({ kind: 'files' as const, from: ['/usr/bin', '/usr/include', '/usr/share', '/usr/lib'], maxBytes: 48 << 20 })),
} satisfies ImageSpec;
const OPS = ['prepare', 'mounts', 'commit', 'stat'] as const;
type Op = (typeof OPS)[number];

function quantile(sorted: readonly number[], q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
}

async function timed<T>(into: number[], f: () => Promise<T>): Promise<T> {
  const t0 = performance.now();
  const r = await f();
  into.push(performance.now() - t0);
  return r;
}

/** N snapshots through `c`: the latencies of each operation, in ms. */
async function measure(c: SnapshotsClient, tag: string): Promise<Record<Op, number[]>> {
  const lat: Record<Op, number[]> = { prepare: [], mounts: [], commit: [], stat: [] };
  const labels = { 'containerd.io/gc.root': 'bench' };
  const names: string[] = [];
  let parent = '';
  for (let i = 0; i < N; i++) {
    if (i % CHAIN === 0) parent = '';
    const key = `bench-${tag}-active-${i}`;
    const name = `bench-${tag}-${i}`;
    try {
      await timed(lat.prepare, () => c.prepare(key, parent, labels));
      await timed(lat.mounts, () => c.mounts(key));
      await timed(lat.commit, () => c.commit(name, key, labels));
      await timed(lat.stat, () => c.stat(name));
    } catch (e) {
      throw new Error(`${tag}: snapshot ${i} (parent ${parent || 'none'}): ${(e as Error).message}`, { cause: e });
    }
    names.push(name);
    parent = name;
  }
  // Children before parents; then give containerd's garbage collection time to finish.
  for (let i = names.length - 1; i >= 0; i--) await c.remove(names[i]!);
  await new Promise((r) => setTimeout(r, 3000));
  return lat;
}

async function vmRssKiB(pid: number): Promise<number> {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(await readFile(`/proc/${pid}/status`, 'utf8'));
  if (m === null) throw new Error(`no VmRSS in /proc/${pid}/status`);
  return Number(m[1]);
}

async function fuseMountpointsUnder(dir: string): Promise<string[]> {
  const info = await readFile('/proc/self/mountinfo', 'utf8');
  return info
    .split('\n')
    .map((l) => l.split(' '))
    .filter((f) => {
      const sep = f.indexOf('-');
      return (f[4] ?? '').startsWith(dir + '/') && sep !== -1 && (f[sep + 1] ?? '').startsWith('fuse');
    })
    .map((f) => f[4]!);
}

const mib = (kib: number): string => `${(kib / 1024).toFixed(1)} MiB`;
const ms = (x: number): string => (x < 10 ? x.toFixed(2) : x.toFixed(1));

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-bench-daemon-'));
  const root = join(dir, 'root');
  const address = join(dir, 'soci-ts.sock');
  const config = join(dir, 'config.toml');
  await writeFile(config, '[background_fetch]\nenabled = false\n');
  const registry = await startRegistry();
  const daemon = await startSnapshotter({ root, address, logLevel: 'warn', args: ['--config', config, '--metrics-address', ''] });
  const ctd = await startContainerd({ proxyPlugins: [{ name: 'soci-ts', address }], namespace: 'bench' });
  try {
    console.log(`bench:daemon — ${N} snapshots (chains of ${CHAIN}), ${cpus().length} CPUs, Node ${process.version}`);
    const direct = await SnapshotsClient.connect(address);
    // A lease holds what the benchmark makes (as containerd's clients do), so containerd's
    // garbage collector (run after each Remove) leaves it alone.
    const lease = 'soci-ts-bench';
    await ctd.ctr(['leases', 'create', '--id', lease, '--expires', '0']);
    const viaOverlay = await SnapshotsClient.connect(ctd.address, { snapshotter: 'overlayfs', namespace: 'bench', lease });
    const viaOurs = await SnapshotsClient.connect(ctd.address, { snapshotter: 'soci-ts', namespace: 'bench', lease });
    // Warm-up (connections, first-use costs), not counted.
    for (const [c, tag] of [[direct, 'w1'], [viaOverlay, 'w2'], [viaOurs, 'w3']] as const) await c.prepare(`warm-${tag}`, '', {});
    const results: [string, Record<Op, number[]>][] = [];
    results.push(['soci-ts (direct)', await measure(direct, 'direct')]);
    results.push(['overlayfs (containerd)', await measure(viaOverlay, 'overlay')]);
    results.push(['soci-ts (containerd)', await measure(viaOurs, 'ours')]);

    const stats = new Map<string, Record<Op, { p50: number; p99: number }>>();
    for (const [name, lat] of results) {
      const s = {} as Record<Op, { p50: number; p99: number }>;
      for (const op of OPS) {
        const sorted = [...lat[op]].sort((a, b) => a - b);
        s[op] = { p50: quantile(sorted, 0.5), p99: quantile(sorted, 0.99) };
      }
      stats.set(name, s);
    }
    console.log('\nlatency in ms, p50 / p99:');
    console.log(['op', ...results.map(([n]) => n), 'direct/overlayfs p50', 'containerd: soci-ts/overlayfs p50'].join(' | '));
    const base = stats.get('overlayfs (containerd)')!;
    for (const op of OPS) {
      const cells = results.map(([n]) => `${ms(stats.get(n)![op].p50)} / ${ms(stats.get(n)![op].p99)}`);
      const r1 = stats.get('soci-ts (direct)')![op].p50 / base[op].p50;
      const r2 = stats.get('soci-ts (containerd)')![op].p50 / base[op].p50;
      console.log([op, ...cells, `${r1.toFixed(2)}×`, `${r2.toFixed(2)}×`].join(' | '));
    }

    // ---- RSS with 20 distinct lazily mounted layers
    const snapPid = daemon.pid;
    const rss0 = await vmRssKiB(snapPid);
    const t0 = performance.now();
    const img = await buildImage(testCacheDir(), LAZY_IMAGE_SPEC);
    const pushed = await pushImage(img.layoutDir, img.tag, registry, 'bench/lazy20');
    const created = await sociTs(['create', '--push', '--root', join(dir, 'create-store'), '--hosts-dir', '', '--json', pushed.ref]);
    if (created.code !== 0) throw new Error(`soci-ts create --push: ${created.stderr}`);
    const made = JSON.parse(created.stdout) as { indexes: { layers: { digest: string; ztoc?: string; skipped?: string }[] }[] };
    const ztocOf = new Map(made.indexes[0]!.layers.flatMap((l) => (l.ztoc !== undefined ? [[l.digest, l.ztoc] as [string, string]] : [])));
    const unindexed = img.layers.filter((l) => !ztocOf.has(l.digest));
    if (unindexed.length > 0) throw new Error(`${unindexed.length} layers of ${LAZY_IMAGE_SPEC.name} have no zTOC (sizes ${unindexed.map((l) => l.size).join(', ')}; the minimum layer size is 10 MiB)`);
    console.log(`\nimage of ${img.layers.length} distinct layers from real files (${mib(img.layers.reduce((n, l) => n + l.size, 0) / 1024)} gzipped, ${img.layers.map((l) => (l.size / 1048576).toFixed(1)).join(' / ')} MiB), built, pushed and indexed in ${((performance.now() - t0) / 1000).toFixed(0)} s`);
    const chain = chainIdsOf(img);
    const perLayer: { spans: number; entries: number; small?: string }[] = [];
    let rssMgr1 = NaN;
    for (const [i, l] of img.layers.entries()) {
      const z = readZtoc((await registryRequest(registry, `/v2/bench/lazy20/blobs/${ztocOf.get(l.digest)!}`)).body);
      const small = z.ztoc.files.find((f) => f.type === 'reg' && f.uncompressedSize > 0 && f.uncompressedSize < 4096);
      perLayer.push({ spans: z.spans.length, entries: z.ztoc.files.length, ...(small !== undefined ? { small: small.name.replace(/^\.?\/+/, '') } : {}) });
      const labels = {
        'containerd.io/snapshot.ref': chain[i]!,
        'containerd.io/snapshot/cri.image-ref': pushed.ref,
        'containerd.io/snapshot/cri.manifest-digest': pushed.manifestDigest,
        'containerd.io/snapshot/cri.layer-digest': l.digest,
        'containerd.io/snapshot/cri.image-layers': img.layers.slice(i).map((x) => x.digest).join(','),
      };
      try {
        // As containerd's unpacker: layer i on the chain of the ones below it.
        await direct.prepare(`extract-${i} ${chain[i]!}`, i === 0 ? '' : chain[i - 1]!, labels);
        throw new Error(`Prepare of layer ${i} returned mounts: not served lazily (see the daemon log)\n${daemon.logs().slice(-3000)}`);
      } catch (e) {
        if ((e as ServiceError).code !== status.ALREADY_EXISTS) throw e;
      }
      if (i === 0) {
        const pid = await fuseManagerPid(root);
        if (pid !== undefined) rssMgr1 = await vmRssKiB(pid);
      }
    }
    const mgrPid = await fuseManagerPid(root);
    if (mgrPid === undefined) throw new Error('no FUSE manager');
    const mps = await fuseMountpointsUnder(root);
    const layersMounted = new Set<string>();
    const mountOf = new Map<number, string>();
    {
      const c = await FuseManagerClient.connect(join(root, 'fuse-manager.sock'));
      try {
        for (const m of (await c.call('list', {})).mounts) {
          layersMounted.add(m.layerDigest);
          const k = /^extract-(\d+) /.exec(m.tag);
          if (k !== null) mountOf.set(Number(k[1]), m.mountpoint);
        }
      } finally {
        c.close();
      }
    }
    await new Promise((r) => setTimeout(r, 2000));
    const rssSnapMounted = await vmRssKiB(snapPid);
    const rssMgrMounted = await vmRssKiB(mgrPid);
    // One small file read from each mount (the snapshot's fs dir is the layer's FUSE mount).
    let read = 0;
    for (const [i] of img.layers.entries()) {
      const small = perLayer[i]!.small;
      const mp = mountOf.get(i);
      if (small === undefined || mp === undefined) continue;
      await readFile(join(mp, small)).then(
        () => read++,
        () => undefined,
      );
    }
    await new Promise((r) => setTimeout(r, 2000));
    const rssSnap = await vmRssKiB(snapPid);
    const rssMgr = await vmRssKiB(mgrPid);
    const spans = perLayer.map((p) => p.spans);
    const entries = perLayer.map((p) => p.entries);
    console.log(
      `\nRSS (VmRSS) with ${mps.length} lazily mounted layers (${layersMounted.size} distinct layer digests; zTOCs of ${Math.min(...spans)}–${Math.max(...spans)} spans, ${Math.min(...entries)}–${Math.max(...entries)} entries, ${entries.reduce((a, b) => a + b, 0)} entries in all; background fetch off):`,
    );
    console.log('process | before any lazy layer | 1 layer mounted | 20 layers mounted | and a small file read from each');
    console.log(`snapshotter | ${mib(rss0)} | | ${mib(rssSnapMounted)} | ${mib(rssSnap)}`);
    console.log(`FUSE manager | (not running) | ${mib(rssMgr1)} | ${mib(rssMgrMounted)} | ${mib(rssMgr)} (${read} files read)`);
    console.log(`together | | | ${mib(rssSnapMounted + rssMgrMounted)} | ${mib(rssSnap + rssMgr)}`);
    for (let i = chain.length - 1; i >= 0; i--) await direct.remove(chain[i]!);
    direct.close();
    viaOverlay.close();
    viaOurs.close();
  } finally {
    await ctd.stop();
    await daemon.stop();
    await stopFuseManager(root);
    await unmountUnder(dir);
    await registry.stop();
    await run('rm', ['-rf', '--one-file-system', '--', dir]).catch(() => undefined);
  }
}

await main();

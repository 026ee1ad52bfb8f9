/**
 * The product end to end, as one story, with the real parts only: Debian's containerd 1.6 (its
 * own root, state and sockets) with `[proxy_plugins.soci-ts]` pointing at a `bin/soci-ts
 * snapshotter` this test started (metrics on a free loopback port, background fetch off so that
 * every byte fetched is one a container asked for), runc, the loopback registry behind the
 * counting fault proxy (no faults: its request log says what the registry served and when), and
 * umoci-built images (defaultImages(): `multi`, one layer above the 10 MiB minimum layer size
 * and three small ones; `small`, no layer big enough to index).
 *
 * 1. `multi` pushed with skopeo, `soci-ts create --push`, `soci-ts rpull`, then `ctr run --rm
 *    --snapshotter soci-ts` prints the sha256 of a file of the lazy layer: equal to sha256 of
 *    the same file in `umoci unpack` of the image. /metrics (strict exposition parser): the lazy
 *    layer's fetched bytes are > 0, fewer than the image's size, and equal to what the registry
 *    served for that blob (proxy log); its `soci_ts_layer_mode` is lazy.
 * 2. `small`, never indexed: rpull + `ctr run` print the right sha256 (containerd applied the
 *    layers), each of its layers not shared with `multi` (its busybox layer is multi's, whose
 *    chain the daemon holds already) has mode metric `fallback` with a reason, and a log line
 *    naming the layer says why.
 * 3. A long-running container (`ctr run -d … sleep 600`); `kill -9` of the snapshotter's
 *    process group; a restart on the same root and socket (it reattaches to the FUSE manager,
 *    which has the same pid); `ctr task exec` in the still-running container reads a file of
 *    the lazy layer whose span no GET of the blob had touched (proxy log), gets umoci's sha256,
 *    and a GET of that span shows up in the log only then.
 * Teardown: tasks killed and deleted, containers removed, containerd, snapshotter and FUSE
 * manager stopped, mounts detached, temp dirs removed.
 */
import t, { type Test } from 'tap';
import { lstat, mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readZtoc, type LayerIndex } from '../../ztoc/index.js';
import { startContainerd, type Containerd } from '../helpers/containerd.js';
import { parseExposition, samples, type MetricFamily } from '../helpers/exposition.js';
import { startFaultProxy, type FaultProxy } from '../helpers/fault-proxy.js';
import { defaultImages, pushImage, type BuiltImage, type PushedImage } from '../helpers/images.js';
import { run } from '../helpers/layers.js';
import { httpRequest, registryRequest, startRegistry, type Registry } from '../helpers/registry.js';
import { fuseManagerPid, sociTs, startSnapshotter, stopFuseManager, unmountUnder, type SnapshotterDaemon } from '../helpers/snapshotter.js';
import { sha256File } from '../helpers/tree.js';
import { scrapeDaemon } from '../helpers/remote.js';

const NS = 'e2e';
const NS_PLAIN = 'e2e-plain';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

let dir: string;
let registry: Registry;
let proxy: FaultProxy;
let daemon: SnapshotterDaemon;
let ctd: Containerd;
let multi: BuiltImage;
let small: BuiltImage;
let root: string;
let address: string;
let config: string;
/** Containers this test created, in its namespace: removed in teardown. */
const containers: { ns: string; id: string }[] = [];

t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'soci-ts-e2e-'));
  root = join(dir, 'root');
  address = join(dir, 'soci-ts.sock');
  config = join(dir, 'config.toml');
  await writeFile(config, ['[background_fetch]', 'enabled = false', ''].join('\n'));
  ({ multi, small } = await defaultImages());
  registry = await startRegistry();
  proxy = await startFaultProxy({ upstream: registry.url, seed: 6, rate: 0, faults: ['stall'] });
  daemon = await startDaemon();
  ctd = await startContainerd({ proxyPlugins: [{ name: 'soci-ts', address }] });
});

t.teardown(async () => {
  if (ctd !== undefined) {
    for (const c of containers) {
      await ctr(c.ns, ['task', 'kill', '--signal', 'SIGKILL', c.id]).catch(() => undefined);
      for (let i = 0; i < 50; i++) {
        const r = await ctr(c.ns, ['task', 'rm', '--force', c.id]).catch(() => undefined);
        if (r === undefined || r.code === 0 || /not found/.test(r.stderr)) break;
        await sleep(100);
      }
      await ctr(c.ns, ['containers', 'rm', c.id]).catch(() => undefined);
    }
    await ctd.stop();
  }
  await daemon?.stop();
  if (dir !== undefined) {
    await stopFuseManager(root);
    await unmountUnder(dir);
  }
  await proxy?.close();
  await registry?.stop();
  if (dir !== undefined) await run('rm', ['-rf', '--one-file-system', '--', dir]).catch(() => undefined);
});

function startDaemon(): Promise<SnapshotterDaemon> {
  return startSnapshotter({ root, address, args: ['--config', config, '--metrics-address', '127.0.0.1:0'] });
}

function explainOnFailure(t: Test): void {
  t.teardown(() => {
    if (!t.passing()) {
      t.comment(`containerd log (tail):\n${ctd.logs().slice(-4000)}`);
      t.comment(`daemon log (tail):\n${daemon.logs().slice(-6000)}`);
    }
  });
}

async function ctr(ns: string, args: readonly string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const global = ['--address', ctd.address, '--namespace', ns, '--connect-timeout', '10s', '--timeout', '300s'];
  const r = await run('ctr', [...global, ...args], { okCodes: Array.from({ length: 256 }, (_, i) => i) });
  return { code: r.code, stdout: r.stdout, stderr: r.stderr };
}

async function ctrOk(ns: string, args: readonly string[]): Promise<string> {
  const r = await ctr(ns, args);
  if (r.code !== 0) throw new Error(`ctr -n ${ns} ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
}


const sum = (xs: readonly { value: number }[]): number => xs.reduce((n, s) => n + s.value, 0);


/** umoci unpack of an image (the oracle): its rootfs. */
async function unpack(img: BuiltImage, name: string): Promise<string> {
  await run('umoci', ['unpack', '--image', `${img.layoutDir}:${img.tag}`, join(dir, name)]);
  return join(dir, name, 'rootfs');
}

/** The sha256 `sha256sum` printed for `file`. */
function sumOf(out: string, file: string): string | undefined {
  for (const line of out.split('\n')) {
    const m = /^([0-9a-f]{64}) {2}(.*)$/.exec(line);
    if (m !== null && m[2] === file) return m[1];
  }
  return undefined;
}

/** GET ranges (inclusive) the registry served, through the proxy, for blob `digest` (a whole GET: [0, size-1]). */
function servedRanges(digest: string, size: number): [number, number][] {
  const out: [number, number][] = [];
  for (const rec of proxy.stats.log) {
    if (rec.method !== 'GET' || !rec.url.split('?')[0]!.endsWith(`/blobs/${digest}`)) continue;
    const r = /^bytes=(\d+)-(\d*)$/.exec(rec.range ?? '');
    out.push(r === null ? [0, size - 1] : [Number(r[1]), r[2] === '' ? size - 1 : Number(r[2])]);
  }
  return out;
}

const overlaps = (ranges: readonly [number, number][], start: number, endExclusive: number): boolean => ranges.some(([a, b]) => a < endExclusive && b >= start);

// ---------------------------------------------------------------------------------------

let pushed: PushedImage;
let lazyLayer: BuiltImage['layers'][number];
let ztoc: LayerIndex;
let rootfs: string;
/** Files of the lazy layer (as the container sees them), each within one middle span, spans far apart. */
let candidates: { name: string; span: number }[];

t.test('multi-layer image: create --push, rpull, ctr run reads a lazy file right; metrics: lazy, fewer bytes than the image', async (t) => {
  explainOnFailure(t);
  const p = await pushImage(multi.layoutDir, multi.tag, registry, 'e2e/multi');
  pushed = p;
  const created = await sociTs(['create', '--push', '--root', join(dir, 'create-store'), '--json', p.ref]);
  t.equal(created.code, 0, `soci-ts create --push ${created.stderr.trim()}`);
  const made = JSON.parse(created.stdout) as { indexes: { layers: { digest: string; ztoc?: string }[] }[] };
  const indexed = made.indexes[0]!.layers.filter((l) => l.ztoc !== undefined);
  t.equal(indexed.length, 1, 'one layer has a zTOC (the others are below the minimum layer size)');
  const n = multi.layers.findIndex((l) => l.digest === indexed[0]!.digest);
  lazyLayer = multi.layers[n]!;
  ztoc = readZtoc((await registryRequest(registry, `/v2/e2e/multi/blobs/${indexed[0]!.ztoc!}`)).body);
  rootfs = await unpack(multi, 'multi-bundle');

  // Candidate files: regular, 4–64 KiB, inside one span, visible with that size in the
  // unpacked image; one per span.
  const bySpan = new Map<number, string>();
  for (const f of ztoc.ztoc.files) {
    if (f.type !== 'reg' || f.uncompressedSize < 4096 || f.uncompressedSize > 65536) continue;
    const s = ztoc.spanFor(f.uncompressedOffset);
    if (s !== ztoc.spanFor(f.uncompressedOffset + f.uncompressedSize - 1) || bySpan.has(s)) continue;
    bySpan.set(s, '/' + f.name.replace(/^\.?\/+/, ''));
  }
  candidates = [];
  for (const [span, name] of [...bySpan].sort((a, b) => a[0] - b[0])) {
    const st = await lstat(join(rootfs, name)).catch(() => undefined);
    if (st?.isFile() === true) candidates.push({ name, span });
  }
  t.ok(candidates.length >= 3, `${candidates.length} candidate files in distinct spans of the lazy layer (${ztoc.spans.length} spans)`);

  const ref = `${proxy.host}/e2e/multi:${multi.tag}`;
  proxy.resetStats();
  const r = await sociTs(['rpull', '--address', ctd.address, '--namespace', NS, '--json', ref]);
  t.equal(r.code, 0, `soci-ts rpull ${r.stderr.trim()}`);
  const pulled = JSON.parse(r.stdout) as { layers: { digest: string; outcome: string }[] };
  t.equal(pulled.layers.find((l) => l.digest === lazyLayer.digest)?.outcome, 'lazy', 'rpull: the indexed layer is lazy');
  t.same(servedRanges(lazyLayer.digest, lazyLayer.size), [], 'nothing of the lazy layer fetched by the pull itself');

  // One in the middle: the other test needs spans nobody read yet, on either side.
  const file = candidates[Math.floor(candidates.length / 2)]!;
  const id = `soci-ts-e2e-${process.pid}-run`;
  containers.push({ ns: NS, id });
  const out = await ctrOk(NS, ['run', '--rm', '--snapshotter', 'soci-ts', ref, id, 'sha256sum', file.name]);
  const want = await sha256File(join(rootfs, file.name));
  t.equal(sumOf(out, file.name), want, `ctr run: sha256 of ${file.name} (lazy layer, span ${file.span}) = umoci unpack's`);
  const ranges = servedRanges(lazyLayer.digest, lazyLayer.size);
  const sp = ztoc.spans[file.span]!;
  t.ok(overlaps(ranges, Number(sp.compressedStart), Number(sp.compressedEnd)), 'its span was fetched from the registry');

  const fams = await scrapeDaemon(daemon);
  const fetched = sum(samples(fams, 'soci_ts_layer_fetched_bytes_total', { layer: lazyLayer.digest }));
  const imageSize = multi.layers.reduce((a, l) => a + l.size, 0);
  t.ok(fetched > 0, `fetched bytes of the lazy layer: ${fetched} > 0`);
  t.ok(fetched < imageSize, `fewer than the image's size (${imageSize})`);
  t.ok(fetched < lazyLayer.size, `and than the lazy layer's (${lazyLayer.size})`);
  const served = ranges.reduce((a, [x, y]) => a + y - x + 1, 0);
  t.equal(fetched, served, 'equal to what the registry served for the blob (proxy log)');
  t.ok(sum(samples(fams, 'soci_ts_layer_fetched_spans_total', { layer: lazyLayer.digest })) >= 1, 'at least one span fetched');
  const modes = samples(fams, 'soci_ts_layer_mode', { layer: lazyLayer.digest }).filter((s) => s.value === 1);
  t.same(modes.map((s) => s.labels.mode), ['lazy'], `layer mode: lazy (${modes.map((s) => s.labels.reason).join(',')})`);
  for (const l of multi.layers.filter((x) => x.digest !== lazyLayer.digest)) {
    const m = samples(fams, 'soci_ts_layer_mode', { layer: l.digest }).filter((s) => s.value === 1);
    t.same(m.map((s) => s.labels.mode), ['local'], `small layer ${l.digest.slice(7, 19)}: local`);
  }
});

t.test('an image without an index: rpull + ctr run through the fallback, the mode says so and why', async (t) => {
  explainOnFailure(t);
  const p = await pushImage(small.layoutDir, small.tag, registry, 'e2e/plain');
  const ref = `${proxy.host}/e2e/plain:${small.tag}`;
  const r = await sociTs(['rpull', '--address', ctd.address, '--namespace', NS_PLAIN, '--json', ref]);
  t.equal(r.code, 0, `soci-ts rpull ${r.stderr.trim()}`);
  const pulled = JSON.parse(r.stdout) as { layers: { digest: string; outcome: string }[] };
  // small's busybox layer is multi's: the daemon has its chain committed already (served
  // locally for multi), so only small's own layers go through the fallback.
  const shared = new Set(multi.layers.map((l) => l.digest));
  const own = p.layers.filter((l) => !shared.has(l.digest));
  t.ok(own.length >= 1, `${own.length} layer(s) of small not in multi`);
  t.same(
    pulled.layers.filter((l) => !shared.has(l.digest)).map((l) => l.outcome),
    own.map(() => 'applied'),
    'each of them applied by containerd (fetched by rpull, the snapshotter returned mounts)',
  );
  const plainRoot = await unpack(small, 'small-bundle');
  const file = '/etc/passwd';
  const id = `soci-ts-e2e-${process.pid}-plain`;
  containers.push({ ns: NS_PLAIN, id });
  const out = await ctrOk(NS_PLAIN, ['run', '--rm', '--snapshotter', 'soci-ts', ref, id, 'sha256sum', file]);
  t.equal(sumOf(out, file), await sha256File(join(plainRoot, file)), `ctr run: sha256 of ${file} = umoci unpack's`);

  const fams = await scrapeDaemon(daemon);
  for (const l of own) {
    const m = samples(fams, 'soci_ts_layer_mode', { layer: l.digest }).filter((s) => s.value === 1);
    t.same(m.map((s) => s.labels.mode), ['fallback'], `layer ${l.digest.slice(7, 19)}: mode fallback`);
    t.same(m.map((s) => s.labels.reason), ['no-index'], 'with the reason code no-index (a bounded label value; the sentence is in the log)');
    const logged = daemon.logLines().filter((x) => typeof x.msg === 'string' && /fallback/.test(x.msg) && JSON.stringify(x).includes(l.digest));
    t.ok(logged.length >= 1, 'a log line names the layer and the fallback');
    t.ok(logged.every((x) => typeof x.reason === 'string' && x.reason !== ''), `and why: ${String(logged[0]?.reason)}`);
  }
});

t.test('kill -9 of the snapshotter, restart: a running container reads a not-yet-fetched file', async (t) => {
  explainOnFailure(t);
  t.ok(pushed !== undefined && candidates.length >= 3, 'the first test ran');
  const ref = `${proxy.host}/e2e/multi:${multi.tag}`;
  const id = `soci-ts-e2e-${process.pid}-long`;
  containers.push({ ns: NS, id });
  await ctrOk(NS, ['run', '-d', '--snapshotter', 'soci-ts', ref, id, 'sleep', '600']);
  const managerBefore = await fuseManagerPid(root);
  t.ok(managerBefore !== undefined, `a FUSE manager serves the lazy layer (pid ${String(managerBefore)})`);

  // A file whose span no GET of the blob has touched yet (proxy log).
  const fetchedSoFar = servedRanges(lazyLayer.digest, lazyLayer.size);
  const span = (c: { span: number }): [number, number] => [Number(ztoc.spans[c.span]!.compressedStart), Number(ztoc.spans[c.span]!.compressedEnd)];
  const file = candidates.find((c) => !overlaps(fetchedSoFar, ...span(c)));
  if (file === undefined) {
    t.fail(`every candidate's span was fetched already (${JSON.stringify(fetchedSoFar)})`);
    return;
  }
  const [start, end] = span(file);
  t.pass(`span ${file.span} of ${file.name} (bytes ${start}–${end}) never fetched so far`);

  const old = daemon;
  old.kill('SIGKILL');
  const gone = await old.waitExit(10_000);
  t.equal(gone?.signal, 'SIGKILL', 'the snapshotter died of SIGKILL');
  daemon = await startDaemon();
  t.not(daemon.pid, old.pid, 'a new snapshotter process');
  t.equal(await fuseManagerPid(root), managerBefore, 'the FUSE manager outlived it (same pid) and the new one reattached');
  t.ok(daemon.logLines().some((l) => typeof l.msg === 'string' && l.msg.startsWith('FUSE manager:')), 'the restarted snapshotter logs the manager it found');

  const running = await ctrOk(NS, ['task', 'ls']);
  t.match(running, new RegExp(`${id}\\s+\\d+\\s+RUNNING`), 'the container is still running');
  const before = servedRanges(lazyLayer.digest, lazyLayer.size).length;
  const out = await ctrOk(NS, ['task', 'exec', '--exec-id', `sum-${process.pid}`, id, 'sha256sum', file.name]);
  t.equal(sumOf(out, file.name), await sha256File(join(rootfs, file.name)), `ctr task exec: sha256 of ${file.name} = umoci unpack's`);
  const after = servedRanges(lazyLayer.digest, lazyLayer.size);
  t.ok(overlaps(after.slice(before), start, end), 'its span was fetched from the registry only now, after the restart');
});

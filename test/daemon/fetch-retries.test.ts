/**
 * Fetch retries in the daemon's metrics: `soci_ts_fetch_retries_total{process,operation,cause}`,
 * scraped from the real `bin/soci-ts snapshotter` (both processes: the snapshotter and its FUSE
 * manager, merged at one endpoint), must equal the retries the registry client actually made.
 *
 * A real registry behind the seeded fault proxy, which answers every other GET of each manifest
 * and blob path with a 503 or a connection reset (before the headers, or mid-body): so no
 * attempt fails twice in a row and every faulted request is retried exactly once. The
 * snapshotter is driven as containerd's unpacker drives it (Prepare with the remote labels of
 * each layer of the `multi` image, indexed by `soci-ts create --push`): it fetches manifests,
 * the config and the small layers (unpacked locally) itself, and its FUSE manager fetches the
 * zTOC and, when files of the lazy layer are read through the FUSE mount, the spans (range
 * reads). Then the scrape.
 *
 * Oracles: the proxy's own request log (which request it faulted, and how), each request
 * attributed to the process and operation that makes it by its path and Range header (the
 * layer blobs, the config, the zTOC, manifests); the file bytes from `gzip -d` of the local
 * layer blob, sliced at the offsets of the zTOC.
 */
import t from 'tap';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { createHash } from 'node:crypto';
import { SnapshotsClient } from '../../daemon/grpc-api.js';
import { readZtoc } from '../../ztoc/index.js';
import { runCli } from '../helpers/cli.js';
import { samples, value } from '../helpers/exposition.js';
import { startFaultProxy, type FaultKind } from '../helpers/fault-proxy.js';
import { chainIdsOf, defaultImages, pushImage } from '../helpers/images.js';
import { run } from '../helpers/layers.js';
import { registryRequest, startRegistry } from '../helpers/registry.js';
import { prepareRemote, remoteLabels, scrapeDaemon } from '../helpers/remote.js';
import { startSnapshotter, stopFuseManager, unmountUnder, type SnapshotterDaemon } from '../helpers/snapshotter.js';

const sha256 = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');
const work = await mkdtemp(join(tmpdir(), 'soci-ts-fetch-retries-'));
const reg = await startRegistry();
const proxy = await startFaultProxy({ upstream: reg.url, seed: 42, rate: 0, faults: ['stall'] });
let daemon: SnapshotterDaemon | undefined;
let client: SnapshotsClient | undefined;
const root = join(work, 'root');
t.teardown(async () => {
  client?.close();
  await daemon?.stop().catch(() => undefined);
  await stopFuseManager(root).catch(() => undefined);
  await unmountUnder(work);
  await proxy.close();
  await reg.stop();
  await run('rm', ['-rf', '--one-file-system', '--', work]).catch(() => undefined);
});

const image = (await defaultImages()).multi;
const chain = chainIdsOf(image);
const pushed = await pushImage(image.layoutDir, image.tag, reg, 'retries/img');
const created = await runCli(['create', pushed.ref, '--push', '--json', '--root', join(work, 'create-root'), '--hosts-dir', '']);
if (created.code !== 0) throw new Error(`create --push: ${created.stderr}`);
const createdLayers = (JSON.parse(created.stdout) as { indexes: Array<{ layers: Array<{ digest: string; ztoc?: string }> }> }).indexes[0]!.layers;
const bigN = createdLayers.findIndex((l) => l.ztoc !== undefined);
const big = image.layers[bigN]!;
const ztocDigest = createdLayers[bigN]!.ztoc!;
const ztoc = readZtoc((await registryRequest(reg, `/v2/retries/img/blobs/${ztocDigest}`)).body);
const imageRef = `${proxy.host}/retries/img:${image.tag}`;

/** Files of the lazy layer to read: regular, 4–64 KiB, each within one span, one per span. */
const norm = (n: string): string => n.replace(/^\.\//, '').replace(/\/+$/, '');
const files = (() => {
  const bySpan = new Map<number, { name: string; offset: number; size: number }>();
  for (const f of ztoc.ztoc.files) {
    if (f.type !== 'reg' || f.uncompressedSize < 4096 || f.uncompressedSize > 65536) continue;
    const s = ztoc.spanFor(f.uncompressedOffset);
    if (s !== ztoc.spanFor(f.uncompressedOffset + f.uncompressedSize - 1) || bySpan.has(s)) continue;
    bySpan.set(s, { name: norm(f.name), offset: f.uncompressedOffset, size: f.uncompressedSize });
  }
  return [...bySpan.entries()].sort((a, b) => a[0] - b[0]).map(([, f]) => f);
})();
// The oracle of their bytes: the whole layer inflated by zlib, sliced at the zTOC's offsets.
const tar = gunzipSync(await readFile(big.path));

// ------------------------------------------------------------------ faults: every other GET of each path

const FAULTS: FaultKind[] = ['status503', 'reset'];
const CAUSE: Partial<Record<string, string>> = { status503: 'http_5xx', reset: 'reset' };
const seenPaths = new Map<string, number>();
function faultEveryOther(): void {
  seenPaths.clear();
  proxy.setOptions({
    rate: 1,
    faults: FAULTS,
    retryAfter: 'never',
    match: (method, p) => {
      if (method !== 'GET' || !/^\/v2\/retries\/img\/(manifests|blobs)\/[^/]+$/.test(p)) return false;
      const n = seenPaths.get(p) ?? 0;
      seenPaths.set(p, n + 1);
      return n % 2 === 0;
    },
  });
}

/** Which process makes a request, and as which operation, by what it asks for. */
function attribute(url: string, range: string | undefined): string {
  const p = url.split('?')[0]!;
  if (p.includes('/manifests/')) return 'snapshotter manifest';
  const digest = /\/blobs\/(sha256:[0-9a-f]{64})$/.exec(p)?.[1];
  if (digest === image.configDigest) return 'snapshotter blob';
  // The snapshotter fetches the zTOC into the store ahead of the mount; the manager reads it there.
  if (digest === ztocDigest) return 'snapshotter blob';
  if (digest === big.digest && range !== undefined && /^bytes=\d+-\d+$/.test(range)) return 'fuse-manager range';
  if (digest !== undefined && digest !== big.digest && image.layers.some((l) => l.digest === digest)) return 'snapshotter blob_stream';
  return `unexpected ${url} ${range ?? ''}`;
}

/** Faulted requests in the proxy log since the last reset, by "process operation cause". */
function faultedRequests(): Map<string, number> {
  const out = new Map<string, number>();
  for (const r of proxy.stats.log) {
    if (r.outcome === 'passed') continue;
    const k = `${attribute(r.url, r.range)} ${CAUSE[r.outcome] ?? `unexpected-${r.outcome}`}`;
    out.set(k, (out.get(k) ?? 0) + 1);
  }
  return out;
}

function scrapedRetries(fams: Awaited<ReturnType<typeof scrapeDaemon>>): Map<string, number> {
  const out = new Map<string, number>();
  for (const s of samples(fams, 'soci_ts_fetch_retries_total')) out.set(`${s.labels.process} ${s.labels.operation} ${s.labels.cause}`, s.value);
  return out;
}

const sorted = (m: Map<string, number>): Array<[string, number]> => [...m].sort((a, b) => a[0].localeCompare(b[0]));
const sum = (m: Map<string, number>): number => [...m.values()].reduce((a, b) => a + b, 0);
const fuseMountpoint = async (): Promise<string | undefined> =>
  (await readFile('/proc/self/mountinfo', 'utf8'))
    .split('\n')
    .map((l) => l.split(' '))
    .find((f) => f[4]?.startsWith(root + '/') === true && f[f.indexOf('-') + 1]?.startsWith('fuse') === true)?.[4];

t.test('the fixture', async (t) => {
  t.ok(bigN >= 0, `layer ${bigN} has a zTOC (${ztoc.spans.length} spans)`);
  t.ok(files.length >= 6, `files of the lazy layer in distinct spans to read (${files.length})`);
});

t.test('retries while the snapshotter prepares the image: counted per process, operation and cause', async (t) => {
  const config = join(work, 'config.toml');
  await writeFile(config, 'hosts_dir = ""\n\n[background_fetch]\nenabled = false\n');
  const address = join(work, 'soci-ts.sock');
  daemon = await startSnapshotter({ root, address, args: ['--config', config, '--metrics-address', '127.0.0.1:0'], startTimeoutMs: 60_000 });
  client = await SnapshotsClient.connect(address, { snapshotter: 'soci-ts' });
  const before = await scrapeDaemon(daemon);
  t.same(samples(before, 'soci_ts_fetch_retries_total'), [], 'no retry before any fetch');

  proxy.resetStats();
  faultEveryOther();
  for (let i = 0; i < image.layers.length; i++) {
    const r = await prepareRemote(client, chain, i, remoteLabels(image, chain, i, imageRef, pushed.manifestDigest));
    t.ok(r.exists, `layer ${i}: ALREADY_EXISTS (${i === bigN ? 'lazy' : 'unpacked by the daemon'}) despite the faults`);
  }
  proxy.setOptions({ rate: 0 });
  const want = faultedRequests();
  t.comment(`faulted: ${JSON.stringify(sorted(want))} of ${proxy.stats.requests} requests`);
  t.ok([...want.keys()].some((k) => k.startsWith('snapshotter ')), 'the snapshotter met faults');
  t.ok([...want.keys()].some((k) => k.endsWith(' reset')) && [...want.keys()].some((k) => k.endsWith(' http_5xx')), 'both kinds of fault happened');
  t.notOk([...want.keys()].some((k) => k.includes('unexpected')), 'every faulted request is one the test can attribute');
  const fams = await scrapeDaemon(daemon);
  t.equal(value(fams, 'soci_ts_metrics_source_up', { source: 'fuse-manager' }), 1, "the FUSE manager's metrics are in the scrape");
  t.same(sorted(scrapedRetries(fams)), sorted(want), 'soci_ts_fetch_retries_total = the faulted requests, by process, operation and cause');
});

t.test('retries of range reads while files of the lazy layer are read through FUSE', async (t) => {
  const mp = await fuseMountpoint();
  t.ok(mp !== undefined, `the lazy layer is mounted (${mp ?? 'none'})`);
  if (mp === undefined || daemon === undefined) return;
  const before = scrapedRetries(await scrapeDaemon(daemon));
  proxy.resetStats();
  faultEveryOther();
  for (const f of files) {
    const data = await readFile(join(mp, f.name));
    t.equal(sha256(data), sha256(tar.subarray(f.offset, f.offset + f.size)), `${f.name} (${f.size} bytes) reads right`);
  }
  proxy.setOptions({ rate: 0 });
  const want = faultedRequests();
  t.comment(`faulted: ${JSON.stringify(sorted(want))} of ${proxy.stats.requests} requests`);
  t.same([...want.keys()].map((k) => k.split(' ').slice(0, 2).join(' ')).filter((k, i, a) => a.indexOf(k) === i), ['fuse-manager range'], 'only range reads were made, by the FUSE manager');
  t.ok((want.get('fuse-manager range http_5xx') ?? 0) > 0 && (want.get('fuse-manager range reset') ?? 0) > 0, 'with 503s and resets among them');
  const after = scrapedRetries(await scrapeDaemon(daemon));
  const grown = new Map([...after].map(([k, v]) => [k, v - (before.get(k) ?? 0)] as [string, number]).filter(([, v]) => v !== 0));
  t.same(sorted(grown), sorted(want), 'the counters grew by exactly the faulted range reads, by cause');
  t.equal(sum(grown), sum(want), `${sum(want)} retries in all`);
  const errors = samples(await scrapeDaemon(daemon), 'soci_ts_fetch_errors_total');
  t.same(errors, [], 'no fetch failed for good (every retry succeeded)');
});

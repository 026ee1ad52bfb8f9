/**
 * The background fetcher against a real registry (docker-registry behind the fault proxy, which
 * counts requests and can stall them), with a real disk store:
 * - every span becomes local; the store then holds exactly the zTOC's span digests, each file
 *   equal to `dd` of that byte range of the layer blob; reads afterwards send no request;
 * - the rate limit holds (bytes over a multi-second window, loose upper bound only);
 * - on-demand reads interleaved with it return the bytes `gzip -dc` gives, and while one is in
 *   flight the background starts nothing;
 * - a stalled registry: failures are logged once, retried, and the layer completes once the
 *   registry is back; stop() mid-way settles and nothing is requested after it; stop() with
 *   fetches hanging returns at once; disabled means no request at all.
 */
import t from 'tap';
import { createHash } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { startRegistry } from '../helpers/registry.js';
import { defaultImages, pushImage } from '../helpers/images.js';
import { startFaultProxy } from '../helpers/fault-proxy.js';
import { fileRangeSha256, gzipDcRanges } from '../helpers/oracles.js';
import { jsonLogger, RegistryClient, type Logger } from '../../fetcher/index.js';
import { buildZtocFromFile, LayerIndex } from '../../ztoc/index.js';
import { SpanManager, type InflatedSpanCacheLike, type SpanSource } from '../../fs/spans.js';
import { CompressedSpanStore } from '../../fs/cache.js';
import { BackgroundFetcher, BackgroundFetchError, type BackgroundFetchConfig, type BackgroundLayerStats } from '../../fs/background.js';

class MapCache implements InflatedSpanCacheLike {
  readonly map = new Map<string, Buffer>();
  get(layer: string, id: number): Buffer | undefined {
    return this.map.get(`${layer}/${id}`);
  }
  set(layer: string, id: number, data: Buffer): void {
    this.map.set(`${layer}/${id}`, data);
  }
}

const work = await fsp.mkdtemp(path.join(os.tmpdir(), 'soci-ts-bg-'));
t.teardown(() => fsp.rm(work, { recursive: true, force: true }));
const reg = await startRegistry();
t.teardown(() => reg.stop());
const images = await defaultImages();
const pushed = await pushImage(images.multi.layoutDir, images.multi.tag, reg, 'fs/background');
const layer = images.multi.layers.reduce((a, b) => (b.size > a.size ? b : a));
const desc = { mediaType: layer.mediaType, digest: layer.digest, size: layer.size };
const index = new LayerIndex(await buildZtocFromFile(layer.path, { spanSize: 1 << 20 }), layer.digest);
const tarSize = index.ztoc.uncompressedArchiveSize;
const spanBytes = (i: number): number => index.spans[i]!.compressedEnd - index.spans[i]!.compressedStart;
t.comment(`layer ${layer.size} bytes, ${tarSize} bytes of tar, ${index.spans.length} spans of 1 MiB`);

const proxy = await startFaultProxy({ upstream: reg.url, seed: 1, rate: 0, faults: ['stall'] });
t.teardown(() => proxy.close());
const client = new RegistryClient({ hostsDir: '', timeouts: { connectMs: 1000, firstByteMs: 500, idleMs: 500 }, retry: { attempts: 2, baseDelayMs: 10 } });
t.teardown(() => client.close());
const repo = client.repository(`${proxy.host}/${pushed.repo}:${pushed.tag}`);

/** The registry through the proxy; `hold` makes reads starting at that compressed offset wait for `release()`. */
function registrySource(d = desc): SpanSource & { hold(offset: number): () => void } {
  const held = new Map<number, Promise<void>>();
  return {
    async read(offset, length, digest) {
      await held.get(offset);
      return repo.readRange(d, offset, length, { digest });
    },
    hold(offset) {
      let release!: () => void;
      held.set(offset, new Promise<void>((r) => (release = r)));
      return () => {
        held.delete(offset);
        release();
      };
    },
  };
}

const blobGets = (): number => proxy.stats.log.filter((r) => r.method === 'GET' && r.url.includes('/blobs/')).length;
const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

let storeCount = 0;
async function freshStore(): Promise<CompressedSpanStore> {
  return CompressedSpanStore.open({ dir: path.join(work, `store-${++storeCount}`) });
}

interface LogLine {
  level: string;
  msg: string;
  layer?: string;
  [k: string]: unknown;
}
function capturingLogger(): { logger: Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  return { logger: jsonLogger('debug', { write: (l: string) => lines.push(JSON.parse(l) as LogLine) }), lines };
}

/** Polls `cond` until true; fails the test (instead of hanging) after `ms`. */
async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(20);
  }
}

function fetcher(config: BackgroundFetchConfig): BackgroundFetcher {
  const bg = new BackgroundFetcher({ startDelayMs: 0, quietMs: 20, pollMs: 10, ...config });
  t.teardown(() => bg.stop());
  return bg;
}

/** The zTOC's span digests (a set: two identical spans would share one file). */
const zTocDigests = (ix: LayerIndex): string[] => [...new Set(ix.ztoc.compressionInfo.spanDigests)].sort();

t.test('every span becomes local; the store holds exactly the span digests; reads then need no request', async (t) => {
  const store = await freshStore();
  const { logger, lines } = capturingLogger();
  const completed: BackgroundLayerStats[] = [];
  const m = new SpanManager({ layerDigest: layer.digest, index, source: registrySource(), memory: new MapCache(), disk: store });
  t.equal(m.localSpans, 0, 'nothing local at first');
  proxy.resetStats();
  const bg = fetcher({ rateBytesPerSec: Number.POSITIVE_INFINITY, logger, onLayerComplete: (s) => completed.push(s) });
  bg.add(m);
  await until(() => completed.length > 0, 60_000, 'the layer to complete');
  t.equal(m.complete, true, 'the span manager says complete');
  t.equal(m.localSpans, index.spans.length, 'every span local');
  t.same(store.digests().sort(), zTocDigests(index), `the store holds exactly the ${index.spans.length} span digests of the zTOC`);
  let bad = 0;
  for (let i = 0; i < index.spans.length; i++) {
    const bytes = await store.get(index.ztoc.compressionInfo.spanDigests[i]!);
    const s = index.spans[i]!;
    if (bytes === undefined || sha(bytes) !== (await fileRangeSha256(layer.path, s.compressedStart, s.compressedEnd))) bad++;
  }
  t.equal(bad, 0, 'each stored span equals dd of its byte range of the layer blob');
  const total = index.spans.reduce((a, _, i) => a + spanBytes(i), 0);
  const st = bg.stats(layer.digest)!;
  t.same([st.spansFetched, st.bytesFetched, st.spansLocal, st.spansTotal, st.complete], [index.spans.length, total, index.spans.length, index.spans.length, true], 'stats: all fetched by the background, Σ compressed span sizes');
  t.ok(blobGets() >= 1 && blobGets() <= index.spans.length, `${blobGets()} blob requests for ${index.spans.length} spans`);
  t.equal(completed.length, 1, 'onLayerComplete called once');
  await sleep(300);
  t.equal(completed.length, 1, 'and not again');
  const done = lines.filter((l) => l.msg === 'layer is complete');
  t.equal(done.length, 1, 'logged once');
  t.equal(done[0]?.layer, layer.digest, 'with the layer digest');
  t.equal(lines.filter((l) => l.level === 'warn' || l.level === 'error').length, 0, 'no warnings');

  // A new manager over the same store (a remount): the whole tar and random ranges, no request.
  proxy.resetStats();
  const again = new SpanManager({ layerDigest: layer.digest, index, source: registrySource(), memory: new MapCache(), disk: store });
  t.equal(again.complete, true, 'a new span manager over the store is complete at once');
  const ranges = [{ offset: 0, len: tarSize }, ...Array.from({ length: 40 }, (_, i) => ({ offset: Math.floor((tarSize * i) / 41), len: 70_000 + i * 1000 }))];
  const expected = await gzipDcRanges(layer.path, ranges);
  const got = await Promise.all(ranges.map((r) => again.read(r.offset, r.len)));
  t.equal(got.filter((g, i) => sha(g) !== expected[i]!.sha256).length, 0, `${ranges.length} reads equal gzip -dc`);
  t.equal(blobGets(), 0, 'no request to the registry');
  t.equal(again.counters.fetches, 0, 'no fetch');
});

t.test('all layers of an image (gzip and plain tar), one fetcher; remove() drops a layer', async (t) => {
  const store = await freshStore();
  const completed: string[] = [];
  const bg = fetcher({ rateBytesPerSec: Number.POSITIVE_INFINITY, concurrency: 3, onLayerComplete: (s) => completed.push(s.layerDigest) });
  const managers: SpanManager[] = [];
  for (const l of images.multi.layers) {
    const ix = new LayerIndex(await buildZtocFromFile(l.path, { spanSize: 512 << 10 }), l.digest);
    const d = { mediaType: l.mediaType, digest: l.digest, size: l.size };
    managers.push(new SpanManager({ layerDigest: l.digest, index: ix, source: registrySource(d), memory: new MapCache(), disk: store }));
  }
  t.ok(images.multi.layers.some((l) => l.mediaType.endsWith('.tar')), 'one layer is a plain tar');
  const dropped = managers[0]!;
  for (const m of managers) bg.add(m);
  bg.add(managers[1]!); // twice: ignored
  await bg.remove(dropped.layerDigest);
  t.equal(bg.stats(dropped.layerDigest), undefined, 'a removed layer has no stats');
  const kept = managers.slice(1);
  await until(() => completed.length === kept.length, 60_000, 'every remaining layer to complete');
  t.same(completed.sort(), kept.map((m) => m.layerDigest).sort(), 'each remaining layer completed once');
  const want = [...new Set(kept.flatMap((m) => zTocDigests(m.index)))].sort();
  const droppedOnly = zTocDigests(dropped.index).filter((d) => !want.includes(d));
  t.same(store.digests().sort(), want, 'the store holds exactly the span digests of the remaining layers');
  t.ok(droppedOnly.length > 0 && dropped.localSpans === 0, 'nothing of the removed layer was fetched');
  t.equal(bg.totals().layersComplete, kept.length, 'totals');
});

t.test('the rate limit holds over a multi-second window', async (t) => {
  const store = await freshStore();
  const rate = 2 << 20;
  const m = new SpanManager({ layerDigest: layer.digest, index, source: registrySource(), memory: new MapCache(), disk: store });
  proxy.resetStats();
  const bg = fetcher({ rateBytesPerSec: rate, concurrency: 2 });
  const started = Date.now();
  bg.add(m);
  await sleep(4000);
  const elapsed = (Date.now() - started) / 1000;
  const bytes = bg.stats(layer.digest)!.bytesFetched;
  const measured = bytes / elapsed;
  t.comment(`fetched ${bytes} bytes in ${elapsed.toFixed(2)} s: ${(measured / (1 << 20)).toFixed(2)} MiB/s at a limit of ${rate / (1 << 20)} MiB/s`);
  t.ok(bytes > 0, 'it made progress');
  t.ok(measured <= 2 * rate, `at most twice the rate (${(measured / rate).toFixed(2)}× the limit)`);
  t.equal(m.complete, false, 'not done yet (the layer is larger than the window allows)');
  const requested = proxy.stats.log
    .filter((r) => r.method === 'GET' && r.url.includes('/blobs/'))
    .reduce((a, r) => {
      const mm = /bytes=(\d+)-(\d+)/.exec(r.range ?? '');
      return a + (mm === null ? 0 : Number(mm[2]) - Number(mm[1]) + 1);
    }, 0);
  t.ok(requested <= 2 * rate * elapsed + 2 * Math.max(...index.spans.map((_, i) => spanBytes(i))), `the registry was asked for ${requested} bytes (in-flight spans included)`);
  // stop() in the middle of the work settles, and nothing is asked for afterwards.
  await bg.stop();
  t.equal(bg.totals().inFlight, 0, 'nothing in flight after stop()');
  const after = blobGets();
  const local = m.localSpans;
  await sleep(700);
  t.equal(blobGets(), after, 'no request after stop() resolved');
  t.equal(m.localSpans, local, 'no span made local after stop()');
  await bg.stop();
  t.pass('stop() twice is fine');
  bg.add(new SpanManager({ layerDigest: 'sha256:' + '0'.repeat(64), index, source: registrySource(), memory: new MapCache(), disk: store }));
  t.equal(bg.stats().length, 1, 'add() after stop() is ignored');
});

t.test('on-demand reads interleaved: right bytes; while one is in flight the background starts nothing', async (t) => {
  const store = await freshStore();
  const source = registrySource();
  const m = new SpanManager({ layerDigest: layer.digest, index, source, memory: new MapCache(), disk: store, readAhead: false });
  const bg = fetcher({ rateBytesPerSec: 2 << 20, concurrency: 2 });
  bg.add(m);
  await until(() => bg.stats(layer.digest)!.spansFetched >= 1, 30_000, 'the background to start');

  // Hold one read in flight (its span's request waits at our gate): the background must pause.
  // The background goes from the first span on: the last one is neither local nor being fetched.
  const heldId = index.spans.length - 1;
  const held = index.spans[heldId]!;
  t.equal(m.state(heldId), 'unfetched', `span ${heldId} not fetched yet`);
  const release = source.hold(held.compressedStart);
  const read = m.read(held.uncompressedStart, 4096);
  t.equal(m.foregroundReads, 1, 'one on-demand read in flight');
  await until(() => bg.totals().inFlight === 0, 30_000, 'background spans already in flight to settle');
  const before = bg.stats(layer.digest)!.spansFetched;
  const requestsBefore = blobGets();
  await sleep(1000);
  t.equal(bg.totals().inFlight, 0, 'nothing started while the read is in flight');
  t.equal(bg.stats(layer.digest)!.spansFetched, before, 'no span fetched meanwhile');
  t.equal(blobGets(), requestsBefore, 'no request meanwhile');
  release();
  const data = await read;
  const [e] = await gzipDcRanges(layer.path, [{ offset: held.uncompressedStart, len: 4096 }]);
  t.equal(sha(data), e!.sha256, 'the held read returns the right bytes');
  t.equal(m.foregroundReads, 0, 'no read in flight');

  // Reads from all over the layer while the background works.
  let seed = 99;
  const rand = (n: number): number => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) % n;
  };
  const ranges = Array.from({ length: 40 }, () => {
    const offset = rand(tarSize);
    return { offset, len: Math.min(tarSize - offset, 1 + rand(1 << 20)) };
  });
  const expected = await gzipDcRanges(layer.path, ranges);
  const got: Buffer[] = [];
  for (const r of ranges) {
    got.push(await m.read(r.offset, r.len));
    await sleep(rand(50));
  }
  t.equal(got.filter((g, i) => sha(g) !== expected[i]!.sha256 || g.length !== ranges[i]!.len).length, 0, `${ranges.length} reads equal gzip -dc`);
  t.ok(bg.stats(layer.digest)!.spansFetched > before, 'the background went on between reads');
  await until(() => m.complete, 60_000, 'the layer to complete');
  t.same(store.digests().sort(), zTocDigests(index), 'the store holds exactly the span digests');
});

t.test('a stalled registry: failures logged once and retried; completes once the registry is back', async (t) => {
  const store = await freshStore();
  const { logger, lines } = capturingLogger();
  const m = new SpanManager({ layerDigest: layer.digest, index, source: registrySource(), memory: new MapCache(), disk: store, fetchTimeoutMs: 1500 });
  proxy.setOptions({ rate: 1, faults: ['stall'] });
  t.teardown(() => proxy.setOptions({ rate: 0 }));
  const bg = fetcher({ rateBytesPerSec: Number.POSITIVE_INFINITY, retryBaseMs: 100, retryMaxMs: 400, logger });
  bg.add(m);
  await until(() => bg.stats(layer.digest)!.failures >= 3, 30_000, 'three failed attempts');
  t.equal(m.localSpans, 0, 'nothing local while the registry stalls');
  t.ok(proxy.stats.faults.stall > 0, `the proxy stalled ${proxy.stats.faults.stall} requests`);
  const warned = lines.filter((l) => l.msg.startsWith('background fetch of a span failed'));
  t.equal(warned.length, 1, `logged once for ${bg.stats(layer.digest)!.failures} failures`);
  proxy.setOptions({ rate: 0 });
  await until(() => m.complete, 60_000, 'the layer to complete once the registry answers');
  t.same(store.digests().sort(), zTocDigests(index), 'the store holds exactly the span digests');
  t.equal(lines.filter((l) => l.msg === 'background fetch of the layer works again').length, 1, 'recovery logged once');
  t.equal(lines.filter((l) => l.msg === 'layer is complete').length, 1, 'completion logged once');
});

t.test('stop() with spans in flight that do not arrive: returns at once, no failure counted or logged; the fetches still land', async (t) => {
  const store = await freshStore();
  const { logger, lines } = capturingLogger();
  const src = registrySource();
  // The first spans' requests hang (as at a stalled registry) until released.
  const releases = index.spans.slice(0, 4).map((s) => src.hold(s.compressedStart));
  const m = new SpanManager({ layerDigest: layer.digest, index, source: src, memory: new MapCache(), disk: store, fetchTimeoutMs: 60_000 });
  const bg = fetcher({ rateBytesPerSec: Number.POSITIVE_INFINITY, concurrency: 2, logger });
  bg.add(m);
  await until(() => bg.totals().inFlight === 2, 10_000, 'two spans in flight');
  const t0 = Date.now();
  await bg.stop();
  const ms = Date.now() - t0;
  t.ok(ms < 1000, `stop() returned in ${ms} ms with two fetches hanging (fetch timeout 60 s)`);
  t.same({ inFlight: bg.totals().inFlight, failures: bg.totals().failures }, { inFlight: 0, failures: 0 }, 'nothing in flight, no failure counted');
  t.notOk(lines.some((l) => l.level === 'warn' || l.level === 'error'), 'nothing logged as a failure');
  for (const r of releases) r();
  await until(() => m.localSpans >= 2, 10_000, 'the abandoned fetches to reach the disk store');
  t.ok(m.isLocal(0) && m.isLocal(1), 'the two spans it abandoned are on disk once the registry answered (shared fetches, not lost)');
  t.equal(bg.totals().spansFetched, 0, 'and not counted as fetched by the stopped background');
});

t.test('disabled: no request at all; the off-switch turns it on and off', async (t) => {
  const store = await freshStore();
  const m = new SpanManager({ layerDigest: layer.digest, index, source: registrySource(), memory: new MapCache(), disk: store });
  proxy.resetStats();
  const bg = fetcher({ enabled: false, rateBytesPerSec: 8 << 20 });
  bg.add(m);
  await sleep(1000);
  t.equal(blobGets(), 0, 'no request while disabled');
  t.equal(store.files, 0, 'nothing stored');
  t.equal(bg.enabled, false);
  bg.setEnabled(true);
  await until(() => bg.stats(layer.digest)!.spansFetched >= 3, 30_000, 'some spans once enabled');
  bg.setEnabled(false);
  await until(() => bg.totals().inFlight === 0, 30_000, 'in-flight spans to settle');
  const paused = blobGets();
  const fetched = bg.stats(layer.digest)!.spansFetched;
  await sleep(800);
  t.equal(blobGets(), paused, 'no request once switched off again');
  t.equal(bg.stats(layer.digest)!.spansFetched, fetched, 'no span fetched');
  bg.setEnabled(true);
  await until(() => m.complete, 60_000, 'the layer to complete when switched on again');
  t.same(store.digests().sort(), zTocDigests(index), 'complete and exact');
});

t.test('the start delay; a layer complete already; a layer without a disk store', async (t) => {
  const store = await freshStore();
  const { logger, lines } = capturingLogger();
  const m = new SpanManager({ layerDigest: layer.digest, index, source: registrySource(), memory: new MapCache(), disk: store });
  proxy.resetStats();
  const completed: string[] = [];
  const bg = fetcher({ rateBytesPerSec: Number.POSITIVE_INFINITY, startDelayMs: 3000, logger, onLayerComplete: (s) => completed.push(s.layerDigest) });
  bg.add(m);
  await sleep(1000);
  t.equal(blobGets(), 0, 'nothing requested before the start delay');
  await until(() => m.complete, 60_000, 'the layer to complete');
  await bg.stop();

  // Another fetcher, another span manager over the full store: complete at once, nothing fetched.
  proxy.resetStats();
  const bg2 = fetcher({ rateBytesPerSec: Number.POSITIVE_INFINITY, logger, onLayerComplete: (s) => completed.push(s.layerDigest) });
  bg2.add(new SpanManager({ layerDigest: layer.digest, index, source: registrySource(), memory: new MapCache(), disk: store }));
  t.equal(bg2.stats(layer.digest)!.complete, true, 'a layer whose spans are all stored is complete when added');
  t.same(completed, [layer.digest, layer.digest], 'each fetcher reported it once');
  await sleep(300);
  t.equal(blobGets(), 0, 'and nothing is requested');
  t.equal(bg2.stats(layer.digest)!.spansFetched, 0);

  const noDisk = new SpanManager({ layerDigest: 'sha256:' + '1'.repeat(64), index, source: registrySource(), memory: new MapCache() });
  bg2.add(noDisk);
  await sleep(300);
  t.equal(bg2.stats(noDisk.layerDigest), undefined, 'a layer without a disk store is not registered');
  t.ok(lines.some((l) => l.level === 'warn' && l.msg.includes('no disk store')), 'and that is logged');
  t.equal(blobGets(), 0, 'nothing requested for it');
  await t.rejects(noDisk.fetchToDisk(0), /no disk store/, 'fetchToDisk without a disk store: a typed error');
});

t.test('a disk store that cannot keep a span: typed failures, backoff, no crash', async (t) => {
  const tiny = await CompressedSpanStore.open({ dir: path.join(work, 'tiny-store'), maxBytes: 1 });
  const { logger, lines } = capturingLogger();
  const m = new SpanManager({ layerDigest: layer.digest, index, source: registrySource(), memory: new MapCache(), disk: tiny });
  await t.rejects(m.fetchToDisk(0), /not kept by the disk store/, 'fetchToDisk says the span was not kept');
  t.equal(m.isLocal(0), false, 'and the span is not counted as local');
  proxy.resetStats();
  const bg = fetcher({ rateBytesPerSec: Number.POSITIVE_INFINITY, retryBaseMs: 300, retryMaxMs: 600, logger });
  bg.add(m);
  await sleep(2500);
  const st = bg.stats(layer.digest)!;
  t.ok(st.failures >= 2, `${st.failures} failures`);
  t.ok(blobGets() < index.spans.length, `backoff: ${blobGets()} requests in 2.5 s, not one per span`);
  t.equal(lines.filter((l) => l.msg.startsWith('background fetch of a span failed')).length, 1, 'logged once');
  t.equal(st.complete, false, 'never complete');
  await bg.stop();
});

t.test('bad configuration: typed errors', async (t) => {
  for (const bad of [
    { rateBytesPerSec: 0 },
    { rateBytesPerSec: -1 },
    { rateBytesPerSec: Number.NaN },
    { concurrency: 0 },
    { concurrency: 1.5 },
    { startDelayMs: -1 },
    { burstBytes: 0 },
    { retryBaseMs: 0 },
  ] as BackgroundFetchConfig[]) {
    t.throws(() => new BackgroundFetcher(bad), BackgroundFetchError, JSON.stringify(bad));
  }
  const ok = new BackgroundFetcher({});
  t.equal(ok.enabled, true, 'enabled by default');
  await ok.stop();
});

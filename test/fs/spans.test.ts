/**
 * The span manager against a real registry: reads of a layer's tar bytes equal `gzip -dc`
 * (oracle), one fetch and one inflation per span whatever the concurrency, the spans of one read
 * in one range request, a read answered before its span is fully inflated, read-ahead, and a
 * registry that stops answering: a typed error after the fetch timeout, then recovery.
 */
import t from 'tap';
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { startRegistry } from '../helpers/registry.js';
import { defaultImages, pushImage } from '../helpers/images.js';
import { startFaultProxy } from '../helpers/fault-proxy.js';
import { gzipDcRanges } from '../helpers/oracles.js';
import { RegistryClient } from '../../fetcher/index.js';
import { buildZtocFromFile, LayerIndex } from '../../ztoc/index.js';
import { SpanManager, SpanReadError, type InflatedSpanCacheLike, type SpanSource } from '../../fs/spans.js';

class MapCache implements InflatedSpanCacheLike {
  readonly map = new Map<string, Buffer>();
  get(layer: string, id: number): Buffer | undefined {
    return this.map.get(`${layer}/${id}`);
  }
  set(layer: string, id: number, data: Buffer): void {
    this.map.set(`${layer}/${id}`, data);
  }
}

const reg = await startRegistry();
t.teardown(() => reg.stop());
const images = await defaultImages();
const pushed = await pushImage(images.multi.layoutDir, images.multi.tag, reg, 'fs/spans');
const layer = images.multi.layers.reduce((a, b) => (b.size > a.size ? b : a));
const desc = { mediaType: layer.mediaType, digest: layer.digest, size: layer.size };
const index = new LayerIndex(await buildZtocFromFile(layer.path, { spanSize: 1 << 20 }), layer.digest);
const tarSize = index.ztoc.uncompressedArchiveSize;
t.comment(`layer ${layer.size} bytes, ${tarSize} bytes of tar, ${index.spans.length} spans of 1 MiB`);

// A proxy in front of the registry: counts requests, and can be told to stall.
const proxy = await startFaultProxy({ upstream: reg.url, seed: 1, rate: 0, faults: ['stall'] });
t.teardown(() => proxy.close());
const client = new RegistryClient({ hostsDir: '', timeouts: { connectMs: 1000, firstByteMs: 500, idleMs: 500 }, retry: { attempts: 2, baseDelayMs: 10 } });
t.teardown(() => client.close());
const repo = client.repository(`${proxy.host}/${pushed.repo}:${pushed.tag}`);
const source: SpanSource = { read: (offset, length, digest) => repo.readRange(desc, offset, length, { digest }) };

function manager(opts: Partial<ConstructorParameters<typeof SpanManager>[0]> = {}): SpanManager {
  return new SpanManager({ layerDigest: layer.digest, index, source, memory: new MapCache(), ...opts });
}

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

t.test('random reads equal gzip -dc', async (t) => {
  const m = manager();
  let seed = 7;
  const rand = (n: number): number => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed % n;
  };
  const ranges = [
    { offset: 0, len: 1 },
    { offset: tarSize - 1, len: 1 },
    { offset: 0, len: tarSize },
    { offset: index.spans[3]!.uncompressedStart - 10, len: 20 },
    ...Array.from({ length: 150 }, () => {
      const offset = rand(tarSize);
      return { offset, len: Math.min(tarSize - offset, 1 + rand(3 << 20)) };
    }),
  ];
  const expected = await gzipDcRanges(layer.path, ranges);
  const got = await Promise.all(ranges.map((r) => m.read(r.offset, r.len)));
  let bad = 0;
  for (let i = 0; i < ranges.length; i++) if (sha(got[i]!) !== expected[i]!.sha256 || got[i]!.length !== ranges[i]!.len) bad++;
  t.equal(bad, 0, `${ranges.length} reads (single and cross-span, whole archive, first and last byte) equal gzip -dc`);
  t.equal(m.counters.fetches, index.spans.length, 'each span fetched once');
  t.equal(m.counters.inflations, index.spans.length, 'each span inflated once');
  t.equal((await m.read(tarSize, 10)).length, 0, 'a read at the end is empty');
});

t.test('concurrent reads of one span share one fetch and one inflation', async (t) => {
  const m = manager();
  const span = index.spans[5]!;
  const reads = Array.from({ length: 50 }, (_, i) => m.read(span.uncompressedStart + i * 1000, 4096));
  const got = await Promise.all(reads);
  const expected = await gzipDcRanges(layer.path, got.map((_, i) => ({ offset: span.uncompressedStart + i * 1000, len: 4096 })));
  t.ok(got.every((b, i) => sha(b) === expected[i]!.sha256), 'all 50 right');
  t.equal(m.counters.fetches, 1, 'one fetch');
  t.equal(m.counters.inflations, 1, 'one inflation');
});

t.test('the spans of one read come in one range request', async (t) => {
  const m = manager({ readAhead: false });
  proxy.resetStats();
  const first = index.spans[10]!;
  const last = index.spans[13]!;
  const data = await m.read(first.uncompressedStart, last.uncompressedEnd - first.uncompressedStart);
  const [expected] = await gzipDcRanges(layer.path, [{ offset: first.uncompressedStart, len: data.length }]);
  t.equal(sha(data), expected!.sha256, 'four spans right');
  t.equal(m.counters.fetches, 4, 'four spans fetched');
  const blobGets = proxy.stats.log.filter((r) => r.method === 'GET' && r.url.includes('/blobs/'));
  t.equal(blobGets.length, 1, `one HTTP request (${blobGets.map((r) => r.range).join(', ')})`);
});

t.test('a read returns before the rest of its span is inflated', async (t) => {
  const cache = new MapCache();
  const m = manager({ memory: cache, inflateStep: 64 << 10 });
  const span = index.spans[20]!;
  const data = await m.read(span.uncompressedStart, 4096);
  t.equal(data.length, 4096);
  t.equal(cache.get(layer.digest, 20), undefined, 'the span is not finished when the read returns');
  t.equal(m.state(20), 'inflated', 'but it is being inflated');
  for (let i = 0; i < 200 && cache.get(layer.digest, 20) === undefined; i++) await new Promise((r) => setTimeout(r, 5));
  t.ok(cache.get(layer.digest, 20), 'and it lands in the cache afterwards');
  const [expected] = await gzipDcRanges(layer.path, [{ offset: span.uncompressedStart, len: span.uncompressedEnd - span.uncompressedStart }]);
  t.equal(sha(cache.get(layer.digest, 20)!), expected!.sha256, 'the whole span is right');
});

t.test('readCachedInto: bytes in memory copied without a promise, anything else -1 and untouched', async (t) => {
  const m = manager({ readAhead: false });
  const a = index.spans[40]!;
  const b = index.spans[41]!;
  const dst = Buffer.alloc(3 << 20, 0xee);
  t.equal(m.readCachedInto(a.uncompressedStart, 4096, dst), -1, 'nothing in memory yet: -1');
  t.equal(m.counters.fetches, 0, 'and a miss fetches nothing');
  t.equal(dst[0], 0xee, 'and copies nothing');
  await m.read(a.uncompressedStart, b.uncompressedEnd - a.uncompressedStart); // spans 40 and 41 inflated
  for (let i = 0; i < 400 && (m.state(40) !== 'inflated' || m.state(41) !== 'inflated'); i++) await new Promise((r) => setTimeout(r, 5));
  const reads0 = m.counters.reads;
  const cases = [
    { offset: a.uncompressedStart + 123, len: 70000 }, // inside one span
    { offset: a.uncompressedEnd - 5000, len: 10000 }, // across the two
    { offset: a.uncompressedStart, len: b.uncompressedEnd - a.uncompressedStart }, // both, whole
  ];
  const expected = await gzipDcRanges(layer.path, cases);
  for (let i = 0; i < cases.length; i++) {
    const c = cases[i]!;
    const out = Buffer.alloc(c.len);
    const n = m.readCachedInto(c.offset, c.len, out);
    t.equal(n, c.len, `case ${i}: ${c.len} bytes copied`);
    t.equal(sha(out), expected[i]!.sha256, `case ${i}: equal to gzip -dc`);
  }
  t.equal(m.counters.reads - reads0, cases.length, 'each counted as a read');
  const small = Buffer.alloc(100);
  t.equal(m.readCachedInto(a.uncompressedStart, 4096, small), 100, 'clamped to the destination');
  t.equal(m.readCachedInto(b.uncompressedEnd - 10, 4096, Buffer.alloc(4096)), -1, 'running into a span not in memory: -1');
  t.equal(m.readCachedInto(tarSize, 10, dst), 0, 'at the end of the archive: 0');
  t.equal(m.counters.fetches, 2, 'only the two spans the async read needed were fetched');
});

t.test('sequential reads fetch the next span ahead', async (t) => {
  const m = manager();
  const span = index.spans[30]!;
  await m.read(span.uncompressedStart, 65536);
  await m.read(span.uncompressedStart + 65536, 65536);
  t.equal(m.counters.readAheads, 1, 'one read-ahead');
  for (let i = 0; i < 200 && m.state(31) !== 'inflated'; i++) await new Promise((r) => setTimeout(r, 5));
  t.equal(m.state(31), 'inflated', 'the next span is there before anyone reads it');
  const before = m.counters.fetches;
  const aheadBefore = m.counters.readAheads;
  await m.read(index.spans[31]!.uncompressedStart, 100);
  t.equal(m.counters.fetches - before, m.counters.readAheads - aheadBefore, 'reading it fetches nothing (but the spans it reads ahead)');
});

t.test('a file ending in the span it is read from fetches nothing ahead; one going on does', async (t) => {
  const m = manager();
  const span = index.spans[20]!;
  // A 200 KiB file in the middle of span 20, read in two contiguous requests.
  const fileEnd = span.uncompressedStart + 65536 + 204800;
  await m.read(span.uncompressedStart + 65536, 131072, fileEnd);
  await m.read(span.uncompressedStart + 65536 + 131072, 73728, fileEnd);
  t.equal(m.counters.readAheads, 0, 'no read-ahead: the file ends in span 20');
  t.equal(m.state(21), 'unfetched', 'span 21 not fetched');
  t.equal(m.counters.fetches, 1, 'only span 20 fetched');

  // The same two reads of a file that goes on into span 21.
  const n = manager();
  const longEnd = index.spans[21]!.uncompressedStart + 1000;
  await n.read(span.uncompressedStart + 65536, 131072, longEnd);
  await n.read(span.uncompressedStart + 65536 + 131072, 73728, longEnd);
  t.equal(n.counters.readAheads, 1, 'read-ahead of the span the file goes on in');
  for (let i = 0; i < 200 && n.state(21) !== 'inflated'; i++) await new Promise((r) => setTimeout(r, 5));
  t.equal(n.state(21), 'inflated', 'span 21 fetched ahead');
});

t.test('reads moving forwards with gaps (file after file) fetch two spans ahead once a span is read; random reads none', async (t) => {
  const m = manager();
  const first = index.spans[10]!;
  const spanLen = first.uncompressedEnd - first.uncompressedStart;
  // 8 KiB reads every 12 KiB (a header and some padding between files): never contiguous.
  let off = first.uncompressedStart;
  while (off + 8192 < first.uncompressedEnd - 4 * 12288) {
    await m.read(off, 8192);
    off += 12288;
  }
  t.equal(m.counters.readAheads, 0, 'no read-ahead before a span’s worth has been read');
  // A short step back (the kernel answering its own read-ahead out of order) keeps the streak.
  await m.read(off - 24576, 4096);
  for (let i = 0; i < 8 && m.counters.readAheads === 0; i++) {
    await m.read(off, 8192);
    off += 12288;
  }
  t.ok(off - first.uncompressedStart <= spanLen + 8 * 12288, 'the streak reached a span’s worth');
  t.equal(m.counters.readAheads, 2, 'then the next two spans are fetched ahead');
  for (let i = 0; i < 400 && (m.state(11) !== 'inflated' || m.state(12) !== 'inflated'); i++) await new Promise((r) => setTimeout(r, 5));
  t.equal(m.state(11), 'inflated', 'span 11 is there before anyone reads it');
  t.equal(m.state(12), 'inflated', 'and span 12');

  const r = manager();
  for (const id of [40, 5, 33, 18, 2, 27]) await r.read(index.spans[id]!.uncompressedStart + 1000, 8192);
  t.equal(r.counters.readAheads, 0, 'random reads fetch nothing ahead');
  t.equal(r.counters.fetches, 6, 'only the spans read');
});

t.test('a registry that stalls: typed error after the timeout, then recovery', async (t) => {
  const m = manager({ fetchTimeoutMs: 3000 });
  proxy.setOptions({ rate: 1, faults: ['stall'] });
  const span = index.spans[40]!;
  const started = Date.now();
  const err = await m.read(span.uncompressedStart, 100).then(
    () => undefined,
    (e: unknown) => e,
  );
  const took = Date.now() - started;
  t.type(err, SpanReadError, `typed error (${String(err)})`);
  t.ok(took < 3500, `within the fetch timeout (${took} ms)`);
  proxy.setOptions({ rate: 0 });
  const data = await m.read(span.uncompressedStart, 100);
  const [expected] = await gzipDcRanges(layer.path, [{ offset: span.uncompressedStart, len: 100 }]);
  t.equal(sha(data), expected!.sha256, 'the next read retries and succeeds');
});

t.test('a plain tar layer', async (t) => {
  const plain = images.multi.layers.find((l) => l.mediaType.endsWith('.tar'))!;
  t.ok(plain, 'the image has a plain tar layer');
  const pIndex = new LayerIndex(await buildZtocFromFile(plain.path, { spanSize: 256 << 10 }), plain.digest);
  const pDesc = { mediaType: plain.mediaType, digest: plain.digest, size: plain.size };
  const m = new SpanManager({
    layerDigest: plain.digest,
    index: pIndex,
    source: { read: (o, l, d) => repo.readRange(pDesc, o, l, { digest: d }) },
    memory: new MapCache(),
  });
  const bytes = await readFile(plain.path);
  const offset = 300_000;
  const data = await m.read(offset, 700_000);
  t.ok(data.equals(bytes.subarray(offset, offset + 700_000)), 'bytes equal the blob');
});

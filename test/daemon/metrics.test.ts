/**
 * The metrics endpoint, scraped over real HTTP (TCP and a unix socket) and parsed by a strict,
 * independent parser of the text format (test/helpers/exposition.ts):
 *
 * - upstream's names, types, label names and bucket boundaries; the values after recorded
 *   events, against counts computed here from the recorded values;
 * - ours (FUSE op histograms, fetched bytes/spans, cache, errors, retries, background progress,
 *   layer complete, one mode series per layer), forgetLayer;
 * - Node process metrics, labelled with the process;
 * - the merge of a second process's exposition (a child process with its own sink, scraped
 *   over its own socket): one HELP/TYPE block per family, both processes' series in it;
 *   a failing source and a type conflict are reported, never break the exposition;
 * - 404 elsewhere, 405 for other methods, HEAD; off for ""; bad addresses;
 * - `soci-ts snapshotter`: the endpoint from --metrics-address, from the config file, off,
 *   a configured address that is taken (start-up error), the default address taken (serves on
 *   without metrics), removed at SIGTERM.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import * as http from 'node:http';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  createMetrics,
  FUSE_OP_BUCKETS,
  MICROSECOND_BUCKETS,
  MILLISECOND_BUCKETS,
  mergeExpositions,
  nullMetrics,
  parseMetricsAddress,
  startMetricsServer,
  MetricsServerError,
} from '../../daemon/metrics.js';
import { parseConfig } from '../../daemon/config.js';
import { parseExposition, samples, value, type MetricFamily } from '../helpers/exposition.js';
import { SOCI_TS_BIN, startSnapshotter, snapshotterTempDir } from '../helpers/snapshotter.js';

interface Got {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

function get(target: { url?: string; socketPath?: string }, path = '/metrics', method = 'GET'): Promise<Got> {
  return new Promise((resolve, reject) => {
    const opts: http.RequestOptions = { method, path, agent: false };
    if (target.socketPath !== undefined) opts.socketPath = target.socketPath;
    else {
      const u = new URL(target.url!);
      opts.host = u.hostname.replace(/^\[|\]$/g, '');
      opts.port = Number(u.port);
    }
    const req = http.request(opts, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (b: Buffer) => chunks.push(b));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', reject);
    req.end();
  });
}

async function scrape(target: { url?: string; socketPath?: string }): Promise<Map<string, MetricFamily>> {
  const r = await get(target);
  if (r.status !== 200) throw new Error(`scrape answered ${r.status}: ${r.body}`);
  return parseExposition(r.body);
}

const L1 = 'sha256:' + '1'.repeat(64);
const L2 = 'sha256:' + '2'.repeat(64);

/** Expected cumulative bucket counts of `values` for `bounds` (+Inf last). */
function cumulative(values: readonly number[], bounds: readonly number[]): number[] {
  return [...bounds, Number.POSITIVE_INFINITY].map((b) => values.filter((v) => v <= b).length);
}

function buckets(fams: Map<string, MetricFamily>, family: string, match: Record<string, string>): { le: number[]; counts: number[] } {
  const s = samples(fams, family, match, `${family}_bucket`);
  return { le: s.map((x) => (x.labels.le === '+Inf' ? Number.POSITIVE_INFINITY : Number(x.labels.le))), counts: s.map((x) => x.value) };
}

t.test('bucket boundaries are upstream\'s', async (t) => {
  t.same(MILLISECOND_BUCKETS, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]);
  t.same(MICROSECOND_BUCKETS, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]);
  t.equal(FUSE_OP_BUCKETS[0], 1 / 16);
  t.equal(FUSE_OP_BUCKETS[FUSE_OP_BUCKETS.length - 1], 16384);
});

t.test('one sink over HTTP: names, types, labels, buckets and values', async (t) => {
  const m = createMetrics();
  const srv = (await startMetricsServer('127.0.0.1:0', [m.text]))!;
  t.teardown(() => srv.close());
  t.match(srv.address, /^127\.0\.0\.1:\d+$/, 'port 0: the kernel chose one');
  t.not(srv.address, '127.0.0.1:0');

  let fams = await scrape(srv);
  const types: Record<string, string> = {
    soci_fs_operation_duration_milliseconds: 'histogram',
    soci_fs_operation_duration_microseconds: 'histogram',
    soci_fs_operation_count: 'counter',
    soci_fs_bytes_served: 'gauge',
    soci_fs_image_operation_count_key: 'gauge',
    soci_ts_fuse_operation_duration_milliseconds: 'histogram',
    soci_ts_fuse_operation_errors_total: 'counter',
    soci_ts_layer_fetched_bytes_total: 'counter',
    soci_ts_layer_fetched_spans_total: 'counter',
    soci_ts_layer_spans_local: 'gauge',
    soci_ts_layer_spans: 'gauge',
    soci_ts_layer_complete: 'gauge',
    soci_ts_layer_mode: 'gauge',
    soci_ts_span_cache_hits_total: 'counter',
    soci_ts_span_cache_misses_total: 'counter',
    soci_ts_fetch_errors_total: 'counter',
    soci_ts_fetch_retries_total: 'counter',
    soci_ts_metrics_source_up: 'gauge',
    process_cpu_seconds_total: 'counter',
    process_resident_memory_bytes: 'gauge',
    process_open_fds: 'gauge',
    nodejs_heap_size_used_bytes: 'gauge',
    nodejs_eventloop_lag_seconds: 'gauge',
  };
  for (const [name, type] of Object.entries(types)) {
    t.equal(fams.get(name)?.type, type, `${name} is a ${type}`);
    t.ok((fams.get(name)?.help ?? '').length > 0, `${name} has a HELP text`);
  }
  t.ok((value(fams, 'process_resident_memory_bytes', { process: 'snapshotter' }) ?? 0) > 1 << 20, 'RSS of this process, labelled process="snapshotter"');
  t.equal(samples(fams, 'soci_fs_operation_duration_milliseconds').length, 0, 'nothing recorded yet: no series');

  // Record events.
  const mountMs = [0.4, 3, 12, 700, 20000];
  for (const ms of mountMs) m.mountLatency(L1, ms);
  const readMs = [0.05, 0.2, 0.9, 1.5, 33, 5000];
  for (const ms of readMs) m.fuseOp('read', L1, ms, true);
  m.fuseOp('read', L1, 2, false);
  const lookupMs = [0.01, 0.3, 0.3];
  for (const ms of lookupMs) m.fuseOp('lookup', L2, ms, false);
  m.fuseOp('readdir', L2, 0.0125, true); // 12.5 µs
  m.fuseOp('readlink', L2, 0.1, false);
  m.fetched(L1, 4 << 20, 1);
  m.fetched(L1, 1000, 2);
  m.fetched(L2, 77, 1);
  for (let i = 0; i < 5; i++) m.cache('memory', i < 3);
  m.cache('disk', false);
  m.fetchError(L1, 'timeout');
  m.fetchError(L1, 'timeout');
  m.fetchError(L2, 'integrity');
  m.retry('range', 'http_5xx');
  m.retry('range', 'http_5xx');
  m.retry('range', 'reset');
  m.retry('manifest', 'timeout_first_byte');
  m.layerMode(L1, 'lazy', 'ztoc');
  m.layerMode(L2, 'local', 'no-ztoc');
  m.backgroundProgress(L1, 2, 10);
  m.backgroundProgress(L1, 7, 10);
  m.operation!('remote_registry_get', L1, 40);
  m.served!(L1, 4096);
  m.served!(L1, 100);
  m.imageOperation!('mount', 'sha256:' + 'a'.repeat(64));
  m.nativeReads!(L1, 40, 40 << 17);
  m.nativeReads!(L1, 2, 100);
  m.nativeReads!(L2, 0, 0); // nothing new: no series

  fams = await scrape(srv);
  const P = { process: 'snapshotter' };
  const mount = buckets(fams, 'soci_fs_operation_duration_milliseconds', { operation_type: 'mount', layer: L1 });
  t.same(mount.le, [...MILLISECOND_BUCKETS, Number.POSITIVE_INFINITY], 'mount histogram buckets: 1 … 16384 ms and +Inf');
  t.same(mount.counts, cumulative(mountMs, MILLISECOND_BUCKETS), 'mount bucket counts = recorded values <= le');
  t.equal(value(fams, 'soci_fs_operation_duration_milliseconds', { operation_type: 'mount', layer: L1, ...P }, 'soci_fs_operation_duration_milliseconds_count'), mountMs.length);
  t.equal(value(fams, 'soci_fs_operation_duration_milliseconds', { operation_type: 'mount', layer: L1 }, 'soci_fs_operation_duration_milliseconds_sum'), mountMs.reduce((a, b) => a + b, 0));
  const labelNames = new Set(samples(fams, 'soci_fs_operation_duration_milliseconds').flatMap((s) => Object.keys(s.labels)));
  t.same([...labelNames].sort(), ['layer', 'le', 'operation_type', 'process'], 'upstream labels operation_type and layer (plus process)');

  const allReads = [...readMs, 2];
  t.same(buckets(fams, 'soci_fs_operation_duration_milliseconds', { operation_type: 'synchronous_read', layer: L1 }).counts, cumulative(allReads, MILLISECOND_BUCKETS), 'FUSE reads feed upstream synchronous_read latency');
  t.equal(value(fams, 'soci_fs_operation_count', { operation_type: 'synchronous_read_count', layer: L1 }), allReads.length + 42, 'and synchronous_read_count, with the 42 reads answered natively');
  t.equal(value(fams, 'soci_ts_fuse_native_reads_total', { layer: L1 }), 42, 'soci_ts_fuse_native_reads_total{layer}');
  t.equal(value(fams, 'soci_ts_fuse_native_read_bytes_total', { layer: L1 }), (40 << 17) + 100, 'and their bytes');
  t.equal(value(fams, 'soci_ts_fuse_native_reads_total', { layer: L2 }), undefined, 'no native reads reported: no series');
  t.equal(value(fams, 'soci_fs_operation_count', { operation_type: 'fuse_file_read_failure_count', layer: L1 }), 1, 'a failed read: fuse_file_read_failure_count');
  t.equal(value(fams, 'soci_fs_operation_count', { operation_type: 'fuse_node_lookup_failure_count', layer: L2 }), 3, 'failed lookups: fuse_node_lookup_failure_count');
  t.equal(value(fams, 'soci_fs_operation_count', { operation_type: 'fuse_unknown_operation_failure_count', layer: L2 }), 1, 'another failed op: fuse_unknown_operation_failure_count');
  const readdirUs = buckets(fams, 'soci_fs_operation_duration_microseconds', { operation_type: 'node_readdir', layer: L2 });
  t.same(readdirUs.le, [...MICROSECOND_BUCKETS, Number.POSITIVE_INFINITY], 'µs histogram buckets: 1 … 1024 µs and +Inf');
  t.same(readdirUs.counts, cumulative([12.5], MICROSECOND_BUCKETS), 'readdir in microseconds (12.5 µs)');
  t.equal(value(fams, 'soci_fs_operation_count', { operation_type: 'background_span_fetch_count', layer: L1 }), 5, 'background_span_fetch_count: local spans grew from 2 to 7');
  t.same(buckets(fams, 'soci_fs_operation_duration_milliseconds', { operation_type: 'remote_registry_get', layer: L1 }).counts, cumulative([40], MILLISECOND_BUCKETS), 'operation(): other upstream types');
  t.equal(value(fams, 'soci_fs_bytes_served', { operation_type: 'synchronous_bytes_served', layer: L1 }), 4196);
  t.equal(value(fams, 'soci_fs_image_operation_count_key', { operation_type: 'mount', image: 'sha256:' + 'a'.repeat(64) }), 1);

  const fuseRead = buckets(fams, 'soci_ts_fuse_operation_duration_milliseconds', { op: 'read' });
  t.same(fuseRead.le, [...FUSE_OP_BUCKETS, Number.POSITIVE_INFINITY], 'our FUSE histogram buckets');
  t.same(fuseRead.counts, cumulative(allReads, FUSE_OP_BUCKETS), 'FUSE read latencies by op');
  t.same(buckets(fams, 'soci_ts_fuse_operation_duration_milliseconds', { op: 'lookup' }).counts, cumulative(lookupMs, FUSE_OP_BUCKETS));
  t.equal(value(fams, 'soci_ts_fuse_operation_errors_total', { op: 'lookup' }), 3);
  t.equal(value(fams, 'soci_ts_fuse_operation_errors_total', { op: 'read' }), 1);
  t.equal(value(fams, 'soci_ts_layer_fetched_bytes_total', { layer: L1 }), (4 << 20) + 1000);
  t.equal(value(fams, 'soci_ts_layer_fetched_spans_total', { layer: L1 }), 3);
  t.equal(value(fams, 'soci_ts_layer_fetched_bytes_total', { layer: L2 }), 77);
  t.equal(value(fams, 'soci_ts_span_cache_hits_total', { kind: 'memory' }), 3);
  t.equal(value(fams, 'soci_ts_span_cache_misses_total', { kind: 'memory' }), 2);
  t.equal(value(fams, 'soci_ts_span_cache_misses_total', { kind: 'disk' }), 1);
  t.equal(value(fams, 'soci_ts_span_cache_hits_total', { kind: 'disk' }), undefined, 'no disk hit recorded: no series');
  t.equal(value(fams, 'soci_ts_fetch_errors_total', { layer: L1, kind: 'timeout' }), 2);
  t.equal(value(fams, 'soci_ts_fetch_errors_total', { layer: L2, kind: 'integrity' }), 1);
  t.equal(value(fams, 'soci_ts_fetch_retries_total', { operation: 'range', cause: 'http_5xx', ...P }), 2, 'retries by operation and cause');
  t.equal(value(fams, 'soci_ts_fetch_retries_total', { operation: 'range', cause: 'reset', ...P }), 1);
  t.equal(value(fams, 'soci_ts_fetch_retries_total', { operation: 'manifest', cause: 'timeout_first_byte', ...P }), 1);
  t.same([...new Set(samples(fams, 'soci_ts_fetch_retries_total').flatMap((s) => Object.keys(s.labels)))].sort(), ['cause', 'operation', 'process'], 'retry labels: operation, cause (plus process)');
  t.equal(value(fams, 'soci_ts_layer_spans_local', { layer: L1 }), 7);
  t.equal(value(fams, 'soci_ts_layer_spans', { layer: L1 }), 10);
  t.equal(value(fams, 'soci_ts_layer_complete', { layer: L1 }), 0, 'not complete at 7 of 10');
  t.same(samples(fams, 'soci_ts_layer_mode').map((s) => s.labels).sort((a, b) => a.layer!.localeCompare(b.layer!)), [
    { layer: L1, mode: 'lazy', reason: 'ztoc', process: 'snapshotter' },
    { layer: L2, mode: 'local', reason: 'no-ztoc', process: 'snapshotter' },
  ]);

  m.backgroundProgress(L1, 10, 10);
  m.layerMode(L1, 'fallback', 'fuse-unavailable');
  m.layerMode(L2, 'local', 'no-ztoc');
  fams = await scrape(srv);
  t.equal(value(fams, 'soci_ts_layer_complete', { layer: L1 }), 1, 'complete once every span is local');
  t.equal(value(fams, 'soci_fs_operation_count', { operation_type: 'background_span_fetch_count', layer: L1 }), 8);
  t.same(samples(fams, 'soci_ts_layer_mode', { layer: L1 }).map((s) => [s.labels.mode, s.labels.reason, s.value]), [['fallback', 'fuse-unavailable', 1]], 'a new mode replaces the old series');
  t.equal(samples(fams, 'soci_ts_layer_mode', { layer: L2 }).length, 1, 'the same mode again: still one series');
  m.layerComplete(L2);
  fams = await scrape(srv);
  t.equal(value(fams, 'soci_ts_layer_complete', { layer: L2 }), 1, 'layerComplete()');

  m.forgetLayer!(L1);
  fams = await scrape(srv);
  const mentions = (layer: string): string[] => [...fams.values()].flatMap((f) => f.samples.filter((s) => s.labels.layer === layer).map((s) => s.name));
  t.same(mentions(L1), [], 'forgetLayer: no series of the layer is left');
  t.ok(mentions(L2).length > 5, 'the other layer keeps its series');
  m.fetched(L1, 5, 1);
  fams = await scrape(srv);
  t.equal(value(fams, 'soci_ts_layer_fetched_bytes_total', { layer: L1 }), 5, 'a forgotten layer starts again from zero');
});

t.test('HTTP: 404 elsewhere, 405, HEAD, content type, a unix socket', async (t) => {
  const m = createMetrics({ process: 'x' });
  const srv = (await startMetricsServer('127.0.0.1:0', [m.text]))!;
  t.teardown(() => srv.close());
  let r = await get(srv, '/');
  t.equal(r.status, 404);
  r = await get(srv, '/metricsx');
  t.equal(r.status, 404);
  r = await get(srv, '/metrics', 'POST');
  t.equal(r.status, 405);
  t.equal(r.headers.allow, 'GET, HEAD');
  r = await get(srv, '/metrics', 'HEAD');
  t.equal(r.status, 200);
  t.equal(r.body, '');
  r = await get(srv, '/metrics?x=1');
  t.equal(r.status, 200, 'a query string is ignored');
  t.equal(r.headers['content-type'], 'text/plain; version=0.0.4; charset=utf-8');
  t.equal(Number(r.headers['content-length']), Buffer.byteLength(r.body));

  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-metrics-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const sock = join(dir, 'metrics.sock');
  const us = (await startMetricsServer(sock, [m.text]))!;
  t.equal(us.address, sock);
  t.equal(((await stat(sock)).mode & 0o777).toString(8), '600', 'socket mode 0600');
  const fams = await scrape({ socketPath: sock });
  t.ok(fams.has('soci_fs_operation_count'), 'scraped over the unix socket');
  await t.rejects(startMetricsServer(sock, [m.text]), /another process is already serving on this socket/, 'a live socket is not taken over');
  await us.close();
  await t.rejects(stat(sock), { code: 'ENOENT' }, 'close() removes the socket');

  t.equal(await startMetricsServer('', [m.text]), undefined, '"" is off');
  for (const bad of ['8000', 'localhost', 'host:99999', 'relative/path', ':80']) {
    t.throws(() => parseMetricsAddress(bad), MetricsServerError, `${bad}: refused`);
  }
  t.same(parseMetricsAddress('[::1]:9100'), { kind: 'tcp', host: '::1', port: 9100 });
  const busy = net.createServer();
  await new Promise<void>((r2) => busy.listen(0, '127.0.0.1', () => r2()));
  t.teardown(() => busy.close());
  const port = (busy.address() as net.AddressInfo).port;
  await t.rejects(startMetricsServer(`127.0.0.1:${port}`, [m.text]), /metrics address 127\.0\.0\.1:\d+: cannot listen: EADDRINUSE/, 'a taken port: error naming the address');
  t.equal(await nullMetrics.text(), '', 'nullMetrics exports nothing');
});

/** A child process with its own sink (process="fuse-manager"), serving it on a unix socket. */
async function startChildSink(dir: string): Promise<{ socket: string; stop: () => void }> {
  const socket = join(dir, 'child.sock');
  const script = join(dir, 'child.mjs');
  const metricsJs = fileURLToPath(new URL('../../daemon/metrics.js', import.meta.url));
  await writeFile(
    script,
    `import { createMetrics, startMetricsServer } from ${JSON.stringify(metricsJs)};
const m = createMetrics({ process: 'fuse-manager' });
m.fuseOp('read', ${JSON.stringify(L1)}, 3, true);
m.fuseOp('getattr', ${JSON.stringify(L1)}, 0.2, false);
m.fetched(${JSON.stringify(L1)}, 12345, 3);
m.cache('disk', true);
m.layerMode(${JSON.stringify(L1)}, 'lazy', 'ztoc');
await startMetricsServer(${JSON.stringify(socket)}, [m.text]);
process.stdout.write('ready\\n');
setInterval(() => {}, 1 << 30);
`,
  );
  const child = spawn(process.execPath, [script], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.stdout.once('data', () => resolve());
    child.once('exit', (code) => reject(new Error(`child sink exited ${code}`)));
  });
  return { socket, stop: () => child.kill('SIGKILL') };
}

t.test('two processes merged: one HELP/TYPE block per family, both processes in it', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-metrics-merge-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const child = await startChildSink(dir);
  t.teardown(child.stop);
  const m = createMetrics();
  m.fuseOp('read', L1, 5, true);
  m.mountLatency(L1, 90);
  m.fetched(L1, 100, 1);
  const fromChild = async (): Promise<string> => (await get({ socketPath: child.socket })).body;
  const srv = (await startMetricsServer('127.0.0.1:0', [{ name: 'snapshotter', collect: m.text }, { name: 'fuse-manager', collect: fromChild }]))!;
  t.teardown(() => srv.close());

  const childText = await fromChild();
  const ownText = await m.text();
  t.throws(() => parseExposition(ownText + childText), /second HELP for|comes up again/, 'the oracle: plain concatenation of the two expositions is refused');
  const raw = (await get(srv)).body;
  const fams = parseExposition(raw); // strict: throws on a second HELP/TYPE or a stray sample
  t.pass('the merged exposition parses strictly');
  for (const kind of ['HELP', 'TYPE']) {
    const names = raw.split('\n').filter((l) => l.startsWith(`# ${kind} `)).map((l) => l.split(' ')[2]);
    t.equal(new Set(names).size, names.length, `no ${kind} line twice`);
  }
  t.same(
    samples(fams, 'process_resident_memory_bytes').map((s) => s.labels.process).sort(),
    ['fuse-manager', 'snapshotter'],
    'process metrics of both processes, told apart by the process label',
  );
  const starts = samples(fams, 'process_start_time_seconds').map((s) => s.value);
  t.equal(starts.length, 2);
  t.equal(value(fams, 'soci_ts_layer_fetched_bytes_total', { layer: L1, process: 'fuse-manager' }), 12345);
  t.equal(value(fams, 'soci_ts_layer_fetched_bytes_total', { layer: L1, process: 'snapshotter' }), 100);
  t.equal(value(fams, 'soci_fs_operation_count', { operation_type: 'fuse_node_getattr_failure_count', process: 'fuse-manager' }), 1);
  t.equal(value(fams, 'soci_ts_span_cache_hits_total', { kind: 'disk', process: 'fuse-manager' }), 1);
  t.equal(samples(fams, 'soci_ts_fuse_operation_duration_milliseconds', { op: 'read' }, 'soci_ts_fuse_operation_duration_milliseconds_count').length, 2, 'one read histogram per process');
  t.equal(value(fams, 'soci_ts_metrics_source_up', { source: 'snapshotter' }), 1);
  t.equal(value(fams, 'soci_ts_metrics_source_up', { source: 'fuse-manager' }), 1);

  // The manager dies: the snapshotter's metrics are still served, and the source is down.
  child.stop();
  await new Promise((r) => setTimeout(r, 200));
  const after = parseExposition((await get(srv)).body);
  t.equal(value(after, 'soci_ts_metrics_source_up', { source: 'fuse-manager' }), 0, 'a failing source: up 0');
  t.equal(samples(after, 'process_resident_memory_bytes').map((s) => s.labels.process).join(), 'snapshotter', 'only the live process');

  // A source that never answers is cut off by the timeout.
  const slow = (await startMetricsServer('127.0.0.1:0', [m.text, { name: 'stuck', collect: () => new Promise<string>(() => undefined), timeoutMs: 300 }]))!;
  t.teardown(() => slow.close());
  t.equal(value(parseExposition((await get(slow)).body), 'soci_ts_metrics_source_up', { source: 'stuck' }), 0, 'a stuck source: up 0 after its timeout');
});

t.test('mergeExpositions: conflicts and repeats are dropped with a comment, the result stays valid', async (t) => {
  const a = '# HELP x_total a\n# TYPE x_total counter\nx_total{p="a"} 1\n# HELP h h\n# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 3\nh_count 2\n';
  const b = '# HELP x_total b\n# TYPE x_total gauge\nx_total{p="b"} 5\n# HELP y y\n# TYPE y gauge\ny{p="b"} Nan\ny{p="b"} 2\n# HELP h h2\n# TYPE h histogram\nh_bucket{le="1",p="b"} 0\nh_bucket{le="+Inf",p="b"} 1\nh_sum{p="b"} 9\nh_count{p="b"} 1\n';
  const merged = mergeExpositions([a, b]);
  const fams = parseExposition(merged);
  t.equal(fams.get('x_total')?.type, 'counter', 'the first source\'s type wins');
  t.same(samples(fams, 'x_total').map((s) => s.labels.p), ['a'], 'the conflicting samples are dropped');
  t.match(merged, /# soci-ts: source 1 declares x_total as gauge, source 0 as counter/);
  t.same(samples(fams, 'y').map((s) => s.value), [Number.NaN], 'prom-client\'s Nan is NaN; the repeated series is dropped');
  t.match(merged, /repeats the series y\{p="b"\}/);
  t.equal(samples(fams, 'h', {}, 'h_count').length, 2, 'histogram samples of both sources in one block');
  t.equal(fams.get('h')?.help, 'h', 'the first HELP text');
});

// ---------------------------------------------------------------------------------------
// The daemon

function runDaemon(args: string[], untilMs = 20_000): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const env = { ...process.env };
    delete env.NODE_OPTIONS;
    const child = spawn(SOCI_TS_BIN, ['snapshotter', ...args], { env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), untilMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stderr });
    });
  });
}

t.test('soci-ts snapshotter serves the endpoint', async (t) => {
  const dir = await snapshotterTempDir();
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const root = join(dir, 'root');
  const address = join(dir, 'd.sock');

  // --metrics-address with port 0: the log names the port.
  let d = await startSnapshotter({ root, address, args: ['--metrics-address', '127.0.0.1:0'] });
  t.teardown(() => d.stop());
  const line = d.logLines().find((l) => l.msg === 'metrics endpoint serving');
  t.ok(line, 'the log says where the endpoint serves');
  const url = String(line?.url);
  t.match(url, /^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
  const fams = await scrape({ url });
  t.equal(value(fams, 'soci_ts_metrics_source_up', { source: 'snapshotter' }), 1);
  t.ok((value(fams, 'process_resident_memory_bytes', { process: 'snapshotter' }) ?? 0) > 1 << 20, "the daemon's own process metrics");
  t.equal(fams.get('soci_fs_operation_duration_milliseconds')?.type, 'histogram', 'upstream families are registered');
  await d.stop();
  await t.rejects(get({ url }), { code: 'ECONNREFUSED' }, 'closed at SIGTERM');

  // From the config file, on a unix socket; and "" turns it off.
  const cfg = join(dir, 'config.toml');
  const msock = join(dir, 'metrics.sock');
  await writeFile(cfg, `root = "${root}"\naddress = "${address}"\nmetrics_address = "${msock}"\n`);
  d = await startSnapshotter({ root, address, configOnly: true, args: ['--config', cfg] });
  t.ok((await scrape({ socketPath: msock })).has('soci_ts_layer_mode'), 'metrics_address from the config file (a unix socket)');
  await d.stop();
  await t.rejects(stat(msock), { code: 'ENOENT' }, 'its socket is removed at SIGTERM');
  d = await startSnapshotter({ root, address, configOnly: true, args: ['--config', cfg, '--metrics-address', ''] });
  t.ok(d.logLines().some((l) => l.msg === 'metrics endpoint off (metrics_address = "")'), '--metrics-address "" overrides the file: off');
  await t.rejects(stat(msock), { code: 'ENOENT' });
  await d.stop();

  // A configured address that is taken is a start-up error naming it.
  const busy = net.createServer();
  await new Promise<void>((r) => busy.listen(0, '127.0.0.1', () => r()));
  t.teardown(() => busy.close());
  const port = (busy.address() as net.AddressInfo).port;
  const r = await runDaemon(['--root', root, '--address', address, '--metrics-address', `127.0.0.1:${port}`]);
  t.equal(r.code, 1, 'exit 1');
  t.match(r.stderr, new RegExp(`metrics address 127\\.0\\.0\\.1:${port}: cannot listen: EADDRINUSE`));
  await t.rejects(stat(address), { code: 'ENOENT' }, 'and it did not leave its gRPC socket behind');

  // The default address taken (by this test, or by anything else on the machine): the daemon serves on without metrics.
  const holder = net.createServer();
  const held = await new Promise<boolean>((resolve) => {
    holder.once('error', () => resolve(false));
    holder.listen(8000, '127.0.0.1', () => resolve(true));
  });
  t.teardown(() => (held ? holder.close() : undefined));
  await writeFile(cfg, `root = "${root}"\naddress = "${address}"\n`);
  d = await startSnapshotter({ root, address, configOnly: true, args: ['--config', cfg] });
  const warn = d.logLines().find((l) => l.msg === 'metrics endpoint not started: the default address is taken; set metrics_address (or --metrics-address) to another, or "" to turn metrics off');
  if (held) t.ok(warn, 'the default port taken: a warning, and the daemon serves (startSnapshotter listed over gRPC)');
  else t.ok(warn !== undefined || d.logLines().some((l) => l.msg === 'metrics endpoint serving'), 'port 8000 was taken by someone else: warned or served');
  await d.stop();

  // Config key checks.
  t.throws(() => parseConfig('metrics_address = "nope"\n', 'c.toml'), /c\.toml: key "metrics_address" must be HOST:PORT/);
  t.throws(() => parseConfig('metrics_address = 8000\n', 'c.toml'), /key "metrics_address" must be a string/);
  t.same(parseConfig('metrics_address = ""\n', 'c.toml'), { metricsAddress: '' });
  t.same(parseConfig('[snapshotter]\nmin_layer_size = "10MiB"\n', 'c.toml'), { minLayerSize: 10 << 20 });
  t.same(parseConfig('[snapshotter]\nmin_layer_size = 0\n', 'c.toml'), { minLayerSize: 0 });
  t.throws(() => parseConfig('[snapshotter]\nmin_layer_size = -1\n', 'c.toml'), /key "snapshotter.min_layer_size" must be a whole number of bytes, at least 0/);
  const bad = await runDaemon(['--root', root, '--address', address, '--metrics-address', 'nonsense']);
  t.equal(bad.code, 1);
  t.match(bad.stderr, /metrics address nonsense: must be HOST:PORT/);
});


/**
 * The bench's loopback proxy, in front of a real HTTP server (node:http, which also counts what
 * it served: the oracle for the proxy's counters):
 * - unshaped, it is transparent (bodies byte-identical) and counts bytes, connections and
 *   requests (blob, range and manifest requests by kind) as the server saw them;
 * - shaped, it really delays and rate-limits: each round trip on an open connection takes at
 *   least the requested RTT, a new connection's first request at least two (the handshake),
 *   downloads and uploads run at most 1.2× the requested rate, two parallel downloads share
 *   the one link, bodies stay byte-identical, and a server closing after its answer still gets
 *   its last bytes through; measureLink reports figures within those bounds;
 * - the HTTP request sniffer follows pipelined heads split anywhere, skips bodies by
 *   Content-Length and gives up on chunked bodies.
 * Bounds are generous and one-sided (never "at least this fast"): the machine is shared.
 */
import t from 'tap';
import { createHash } from 'node:crypto';
import * as http from 'node:http';
import * as net from 'node:net';
import { measureLink, RequestSniffer, ShapingProxy } from '../../bench/coldstart/index.js';

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** xorshift bytes: incompressible and the same every run. */
function bytes(n: number, seed = 1): Buffer {
  const b = Buffer.alloc(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

const BIG = bytes(4 << 20, 7);

interface Upstream {
  port: number;
  requests: number;
  rangeRequests: number;
  blobRequests: number;
  manifestRequests: number;
  bodyBytesSent: number;
  uploaded: Buffer[];
  close(): Promise<void>;
}

async function startUpstream(): Promise<Upstream> {
  const u: Upstream = { port: 0, requests: 0, rangeRequests: 0, blobRequests: 0, manifestRequests: 0, bodyBytesSent: 0, uploaded: [], close: async () => undefined };
  const server = http.createServer((req, res) => {
    u.requests++;
    const url = req.url ?? '/';
    if (url.includes('/blobs/')) u.blobRequests++;
    if (url.includes('/manifests/')) u.manifestRequests++;
    if (req.headers.range !== undefined) u.rangeRequests++;
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      if (req.method === 'PUT') u.uploaded.push(Buffer.concat(chunks));
      let body: Buffer;
      if (req.method === 'PUT') {
        body = Buffer.from('{}');
      } else if (url.startsWith('/v2/x/blobs/')) {
        const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
        body = m === null ? BIG : BIG.subarray(Number(m[1]), Number(m[2]) + 1);
        if (m !== null) res.statusCode = 206;
      } else if (url === '/close') {
        body = BIG.subarray(0, 1 << 20);
        res.setHeader('connection', 'close');
      } else {
        body = Buffer.from(url.includes('/manifests/') ? '{"schemaVersion":2}' : '{}');
      }
      res.setHeader('content-length', body.length);
      u.bodyBytesSent += body.length;
      res.end(body);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  u.port = (server.address() as net.AddressInfo).port;
  u.close = () =>
    new Promise<void>((r) => {
      server.closeAllConnections();
      server.close(() => r());
    });
  return u;
}

interface Got {
  status: number;
  body: Buffer;
  ms: number;
}

function get(port: number, path: string, opts: { agent?: http.Agent; method?: string; headers?: Record<string, string>; body?: Buffer } = {}): Promise<Got> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path, method: opts.method ?? 'GET', agent: opts.agent ?? false, headers: opts.headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks), ms: performance.now() - t0 }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.setTimeout(120_000, () => req.destroy(new Error(`GET ${path}: timeout`)));
    req.end(opts.body);
  });
}

let up: Upstream;
t.before(async () => {
  up = await startUpstream();
});
t.teardown(() => up.close());

const resetUpstream = (): void => {
  up.requests = 0;
  up.rangeRequests = 0;
  up.blobRequests = 0;
  up.manifestRequests = 0;
  up.bodyBytesSent = 0;
  up.uploaded = [];
};

t.test('unshaped: transparent, and counts what the server served', async (t) => {
  const proxy = await ShapingProxy.start({ upstreamHost: '127.0.0.1', upstreamPort: up.port });
  t.teardown(() => proxy.close());
  resetUpstream();
  const agent = new http.Agent({ keepAlive: true, maxSockets: 2 });
  t.teardown(() => agent.destroy());
  const whole = await get(proxy.port, '/v2/x/blobs/sha256:big', { agent });
  t.equal(sha(whole.body), sha(BIG), 'blob byte-identical through the proxy');
  const part = await get(proxy.port, '/v2/x/blobs/sha256:big', { agent, headers: { range: 'bytes=1000-200999' } });
  t.equal(part.status, 206);
  t.equal(sha(part.body), sha(BIG.subarray(1000, 201000)), 'range byte-identical');
  await get(proxy.port, '/v2/x/manifests/latest', { agent });
  const upload = bytes(300_000, 3);
  await get(proxy.port, '/v2/x/blobs/uploads/1', { agent, method: 'PUT', body: upload });
  await get(proxy.port, '/v2/', { agent });
  const c = proxy.snapshot();
  t.equal(c.requests, up.requests, `requests: ${c.requests} counted, ${up.requests} served`);
  t.equal(c.blobRequests, up.blobRequests - 1, 'blob GETs counted (the upload PUT is not a fetch)');
  t.equal(c.rangeRequests, up.rangeRequests, 'range requests');
  t.equal(c.manifestRequests, up.manifestRequests, 'manifest requests');
  t.equal(c.unparsedConnections, 0, 'every request stream followed');
  t.ok(c.bytesDown >= up.bodyBytesSent && c.bytesDown <= up.bodyBytesSent + 400 * up.requests, `bytes down ${c.bytesDown}: the ${up.bodyBytesSent} body bytes plus headers`);
  t.ok(c.bytesUp >= upload.length && c.bytesUp <= upload.length + 400 * up.requests, `bytes up ${c.bytesUp}: the upload plus request heads`);
  t.equal(sha(up.uploaded[0] ?? Buffer.alloc(0)), sha(upload), 'upload byte-identical');
  t.ok(c.connections >= 1 && c.connections <= 2, `connections: ${c.connections} (keep-alive, at most 2)`);
  proxy.reset();
  t.same(proxy.snapshot().bytesDown, 0, 'reset zeroes the counters');
});

t.test('shaped: delay per direction, the handshake, and the rate', async (t) => {
  const rttMs = 40;
  const bandwidthBps = 40e6;
  const proxy = await ShapingProxy.start({ upstreamHost: '127.0.0.1', upstreamPort: up.port, shape: { rttMs, bandwidthBps } });
  t.teardown(() => proxy.close());
  resetUpstream();

  const fresh = await get(proxy.port, '/v2/');
  t.ok(fresh.ms >= 2 * rttMs, `first request on a new connection: ${fresh.ms.toFixed(1)} ms >= 2 × ${rttMs} ms (handshake + request)`);

  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  t.teardown(() => agent.destroy());
  await get(proxy.port, '/v2/', { agent });
  const rtts: number[] = [];
  for (let i = 0; i < 8; i++) rtts.push((await get(proxy.port, '/v2/', { agent })).ms);
  t.ok(Math.min(...rtts) >= rttMs, `every round trip on an open connection >= ${rttMs} ms (min ${Math.min(...rtts).toFixed(1)} ms)`);

  const down = await get(proxy.port, '/v2/x/blobs/sha256:big', { agent });
  t.equal(sha(down.body), sha(BIG), 'shaped download byte-identical');
  const downRate = (BIG.length * 8) / (down.ms / 1000);
  t.ok(downRate <= 1.2 * bandwidthBps, `download ${(downRate / 1e6).toFixed(1)} Mbit/s <= 1.2 × ${bandwidthBps / 1e6} Mbit/s`);

  const upload = bytes(2 << 20, 5);
  const put = await get(proxy.port, '/v2/x/blobs/uploads/2', { agent, method: 'PUT', body: upload });
  t.equal(put.status, 200);
  t.equal(sha(up.uploaded[0] ?? Buffer.alloc(0)), sha(upload), 'shaped upload byte-identical');
  const upRate = (upload.length * 8) / (put.ms / 1000);
  t.ok(upRate <= 1.2 * bandwidthBps, `upload ${(upRate / 1e6).toFixed(1)} Mbit/s <= 1.2 × ${bandwidthBps / 1e6} Mbit/s`);

  // Two downloads at once share the one link.
  const half = 2 << 20;
  const t0 = performance.now();
  const both = await Promise.all([
    get(proxy.port, '/v2/x/blobs/sha256:big', { headers: { range: `bytes=0-${half - 1}` } }),
    get(proxy.port, '/v2/x/blobs/sha256:big', { headers: { range: `bytes=${half}-${2 * half - 1}` } }),
  ]);
  const ms = performance.now() - t0;
  t.same(both.map((b) => sha(b.body)), [sha(BIG.subarray(0, half)), sha(BIG.subarray(half, 2 * half))], 'parallel ranges byte-identical');
  const sharedRate = (2 * half * 8) / (ms / 1000);
  t.ok(sharedRate <= 1.2 * bandwidthBps, `two parallel downloads together ${(sharedRate / 1e6).toFixed(1)} Mbit/s <= 1.2 × ${bandwidthBps / 1e6} Mbit/s`);

  // A server that closes after its answer: the tail of the body still arrives.
  const closing = await get(proxy.port, '/close');
  t.equal(sha(closing.body), sha(BIG.subarray(0, 1 << 20)), 'all of a Connection: close answer arrives');

  const c = proxy.snapshot();
  t.equal(c.requests, up.requests, 'requests counted through the shaped proxy too');
});

t.test('measureLink through the shaped proxy reports figures within bounds', async (t) => {
  const rttMs = 20;
  const bandwidthBps = 100e6;
  const proxy = await ShapingProxy.start({ upstreamHost: '127.0.0.1', upstreamPort: up.port, shape: { rttMs, bandwidthBps } });
  t.teardown(() => proxy.close());
  const m = await measureLink(proxy.host, { smallPath: '/v2/', largePath: '/v2/x/blobs/sha256:big', rttSamples: 6 });
  t.ok(m.rttMs >= rttMs, `measured RTT ${m.rttMs.toFixed(2)} ms >= ${rttMs} ms`);
  t.ok(m.bandwidthBps <= 1.2 * bandwidthBps, `measured ${(m.bandwidthBps / 1e6).toFixed(1)} Mbit/s <= 1.2 × ${bandwidthBps / 1e6} Mbit/s`);
  t.equal(m.bandwidthBytes, BIG.length, 'the whole blob was read');
  t.equal(m.rttSamplesMs.length, 6);
});

t.test('bad shapes are refused with a clear error', async (t) => {
  await t.rejects(ShapingProxy.start({ upstreamHost: '127.0.0.1', upstreamPort: up.port, shape: { rttMs: -1, bandwidthBps: 1e6 } }), /round-trip time -1 ms/);
  await t.rejects(ShapingProxy.start({ upstreamHost: '127.0.0.1', upstreamPort: up.port, shape: { rttMs: 1, bandwidthBps: 0 } }), /bandwidth 0 bit\/s/);
});

t.test('the request sniffer: pipelined heads split anywhere, bodies skipped, chunked refused', (t) => {
  const stream = Buffer.from(
    'GET /v2/a/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n' +
      'PUT /v2/a/blobs/uploads/1 HTTP/1.1\r\nContent-Length: 12\r\n\r\nGET / HTTP/1' + // a body that looks like a request
      'GET /v2/a/blobs/sha256:1 HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n' +
      '\r\nHEAD /v2/a/blobs/sha256:2 HTTP/1.1\r\n\r\n',
  );
  const expected = ['GET /v2/a/manifests/latest -', 'PUT /v2/a/blobs/uploads/1 -', 'GET /v2/a/blobs/sha256:1 bytes=0-9', 'HEAD /v2/a/blobs/sha256:2 -'];
  for (const size of [1, 2, 3, 5, 7, 64, stream.length]) {
    const seen: string[] = [];
    const s = new RequestSniffer((m, target, h) => seen.push(`${m} ${target} ${h.get('range') ?? '-'}`));
    for (let i = 0; i < stream.length; i += size) s.push(stream.subarray(i, i + size));
    t.same(seen, expected, `chunks of ${size} bytes`);
    t.notOk(s.failed);
  }
  const chunked = new RequestSniffer(() => undefined);
  chunked.push(Buffer.from('POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n'));
  t.ok(chunked.failed, 'a chunked body stops the count');
  const garbage = new RequestSniffer(() => undefined);
  garbage.push(Buffer.from('\x16\x03\x01 not http\r\n\r\n'));
  t.ok(garbage.failed, 'a non-HTTP stream stops the count');
  t.end();
});

/**
 * The fault-injecting proxy itself, in front of a real docker-registry, checked with Node's
 * own http client and fetch: transparent at rate 0, and each fault kind does what it says.
 */
import t from 'tap';
import { createCipheriv, createHash } from 'node:crypto';
import * as http from 'node:http';
import { FAULT_KINDS, redirectToScheme, startFaultProxy, type FaultKind, type FaultProxy } from './helpers/fault-proxy.js';
import { startRegistry, type Registry } from './helpers/registry.js';

const REPO = 'faultproxy/blob';
// Deterministic bytes (AES-CTR keystream): the blob's digest is part of each request's fault seed,
// so a fixed blob makes every run draw the same faults.
const blob = createCipheriv('aes-256-ctr', Buffer.alloc(32, 7), Buffer.alloc(16)).update(Buffer.alloc((1 << 20) + 123));
const digest = `sha256:${createHash('sha256').update(blob).digest('hex')}`;
const blobPath = `/v2/${REPO}/blobs/${digest}`;
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

interface Outcome {
  status?: number;
  headers?: http.IncomingHttpHeaders;
  /** What arrived, also when the exchange failed midway. */
  body: Buffer;
  error?: Error;
  reusedSocket: boolean;
  ms: number;
}

interface SendOptions {
  method?: string;
  headers?: Record<string, string>;
  body?: Buffer;
  agent?: http.Agent | false;
  timeoutMs?: number;
}

/** One request with node:http; never rejects: failures land in `error`, with the bytes so far. */
function send(url: string, opts: SendOptions = {}): Promise<Outcome> {
  const start = performance.now();
  return new Promise((resolve) => {
    const out: Outcome = { body: Buffer.alloc(0), reusedSocket: false, ms: 0 };
    const chunks: Buffer[] = [];
    let done = false;
    const finish = (error?: Error): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      out.body = Buffer.concat(chunks);
      out.ms = performance.now() - start;
      if (error !== undefined) out.error = error;
      resolve(out);
    };
    const req = http.request(url, { method: opts.method ?? 'GET', headers: opts.headers, agent: opts.agent ?? false }, (res) => {
      out.status = res.statusCode;
      out.headers = res.headers;
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', (e) => finish(e));
      res.on('end', () => finish());
      res.on('close', () => finish(res.complete ? undefined : new Error('response closed before its end')));
    });
    out.reusedSocket = req.reusedSocket;
    const timer = setTimeout(() => req.destroy(new Error('timeout')), opts.timeoutMs ?? 10_000);
    req.on('error', (e) => finish(e));
    req.end(opts.body);
  });
}

let registry: Registry;
let proxy: FaultProxy;

t.before(async () => {
  registry = await startRegistry();
  proxy = await startFaultProxy({ upstream: registry.url, seed: 1, rate: 0, faults: [] });
});
t.teardown(async () => {
  await proxy?.close();
  await registry?.stop();
});

/** Sets the proxy to inject only `faults` (at rate 1 unless told) and zeroes its stats. */
function only(faults: FaultKind[], more: Parameters<FaultProxy['setOptions']>[0] = {}): void {
  proxy.setOptions({ rate: 1, faults, ...more });
  proxy.resetStats();
}

t.test('rate 0: transparent, uploads included', async (t) => {
  only([], { rate: 0 });
  // Monolithic upload through the proxy: the request body is forwarded, Location stays on the proxy.
  const post = await send(`${proxy.url}/v2/${REPO}/blobs/uploads/`, { method: 'POST', headers: { 'content-length': '0' } });
  t.equal(post.status, 202, 'upload started');
  const location = String(post.headers?.location);
  t.ok(location.startsWith(`${proxy.url}/v2/${REPO}/blobs/uploads/`), `Location rewritten to the proxy: ${location}`);
  const put = await send(`${location}${location.includes('?') ? '&' : '?'}digest=${digest}`, {
    method: 'PUT',
    headers: { 'content-type': 'application/octet-stream', 'content-length': String(blob.length) },
    body: blob,
  });
  t.equal(put.status, 201, `upload done: ${put.body.toString()}`);
  t.equal(put.headers?.['docker-content-digest'], digest);
  t.ok(String(put.headers?.location).startsWith(proxy.url), 'the blob Location points at the proxy');

  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    const get = await send(`${proxy.url}${blobPath}`, { agent });
    t.equal(get.status, 200);
    t.equal(get.body.length, blob.length);
    t.ok(get.body.equals(blob), 'byte-identical');
    t.equal(get.headers?.['docker-content-digest'], digest, 'Docker-Content-Digest passed through');
    t.equal(get.headers?.['content-length'], String(blob.length));

    const head = await send(`${proxy.url}${blobPath}`, { method: 'HEAD', agent });
    t.equal(head.status, 200);
    t.equal(head.headers?.['content-length'], String(blob.length));
    t.equal(head.reusedSocket, true, 'keep-alive: the second request reuses the connection');

    const range = await send(`${proxy.url}${blobPath}`, { headers: { range: 'bytes=1000-1999' }, agent });
    t.equal(range.status, 206);
    t.equal(range.headers?.['content-range'], `bytes 1000-1999/${blob.length}`);
    t.ok(range.body.equals(blob.subarray(1000, 2000)), 'range bytes identical');
    const tail = await send(`${proxy.url}${blobPath}`, { headers: { range: `bytes=${blob.length - 10}-` }, agent });
    t.equal(tail.status, 206);
    t.ok(tail.body.equals(blob.subarray(blob.length - 10)));

    // Errors pass through unchanged, challenge headers and all.
    const missing = await send(`${proxy.url}/v2/${REPO}/blobs/sha256:${'0'.repeat(64)}`, { agent });
    t.equal(missing.status, 404);
    t.match(missing.body.toString(), /BLOB_UNKNOWN/);
  } finally {
    agent.destroy();
  }
  t.equal(proxy.stats.passed, proxy.stats.requests, 'everything passed');
  t.same(Object.values(proxy.stats.faults), FAULT_KINDS.map(() => 0), 'no faults');
});

t.test('by default only blob GET/HEAD get faults', async (t) => {
  only(['status500']);
  t.equal((await send(`${proxy.url}/v2/`)).status, 200, '/v2/ untouched');
  t.equal((await send(`${proxy.url}/v2/${REPO}/manifests/latest`)).status, 404, 'manifests untouched (the registry answers)');
  t.equal((await send(`${proxy.url}${blobPath}`, { method: 'HEAD' })).status, 500, 'blob HEAD faulted');
  t.equal((await send(`${proxy.url}${blobPath}`)).status, 500, 'blob GET faulted');
  proxy.setOptions({ match: (method, path) => method === 'GET' && path === '/v2/' });
  t.equal((await send(`${proxy.url}/v2/`)).status, 500, 'a custom match');
  t.equal((await send(`${proxy.url}${blobPath}`)).status, 200);
  proxy.setOptions({ match: undefined });
  t.equal(proxy.stats.faults.status500, 3);
});

t.test('reset: the socket dies, before the headers or mid-body', async (t) => {
  only(['reset']);
  const outs = await Promise.all(Array.from({ length: 8 }, () => send(`${proxy.url}${blobPath}`)));
  for (const o of outs) {
    t.ok(o.error !== undefined, `an error: ${o.error?.message}`);
    if (o.status !== undefined) t.ok(o.body.length < blob.length, `headers came, then ${o.body.length} bytes and the reset`);
  }
  const details = proxy.stats.log.map((r) => r.detail ?? '');
  t.ok(details.includes('before-headers'), 'some before the headers');
  t.ok(details.some((d) => d.startsWith('mid-body@')), 'some mid-body');
  t.equal(proxy.stats.faults.reset, 8);
  const head = await send(`${proxy.url}${blobPath}`, { method: 'HEAD' });
  t.ok(head.error !== undefined, 'HEAD is reset too');
});

t.test('truncate: the true Content-Length, fewer bytes, then the connection ends', async (t) => {
  only(['truncate']);
  for (let i = 0; i < 3; i++) {
    const o = await send(`${proxy.url}${blobPath}`);
    t.equal(o.status, 200);
    t.equal(o.headers?.['content-length'], String(blob.length), 'Content-Length is the whole blob');
    t.ok(o.body.length < blob.length, `got ${o.body.length} of ${blob.length} bytes`);
    t.ok(o.error !== undefined, `the client sees the short body: ${o.error?.message}`);
    t.ok(o.body.equals(blob.subarray(0, o.body.length)), 'what came is right');
  }
  const r = await send(`${proxy.url}${blobPath}`, { headers: { range: 'bytes=0-65535' } });
  t.equal(r.status, 206);
  t.ok(r.body.length < 65536, 'a range is truncated too');
  t.equal(proxy.stats.faults.truncate, 4);
});

t.test('flip: same length, one byte different', async (t) => {
  only(['flip']);
  for (let i = 0; i < 3; i++) {
    const o = await send(`${proxy.url}${blobPath}`);
    t.equal(o.status, 200);
    t.equal(o.error, undefined);
    t.equal(o.body.length, blob.length, 'length unchanged');
    t.not(sha(o.body), sha(blob), 'digest differs');
    const diffs: number[] = [];
    for (let j = 0; j < blob.length; j++) if (o.body[j] !== blob[j]) diffs.push(j);
    t.equal(diffs.length, 1, `one byte differs (at ${diffs[0]})`);
    t.match(proxy.stats.log.at(-1)?.detail, new RegExp(`^flip@${diffs[0]}\\^`));
  }
  const r = await send(`${proxy.url}${blobPath}`, { headers: { range: 'bytes=100-4195' } });
  t.equal(r.status, 206);
  t.equal(r.body.length, 4096);
  t.not(sha(r.body), sha(blob.subarray(100, 4196)), 'a range is flipped too');
  const head = await send(`${proxy.url}${blobPath}`, { method: 'HEAD' });
  t.equal(head.status, 200, 'HEAD has no body to flip: passed');
  t.equal(proxy.stats.faults.flip, 4);
});

t.test('ignoreRange: 200 and the whole blob', async (t) => {
  only(['ignoreRange']);
  const o = await send(`${proxy.url}${blobPath}`, { headers: { range: 'bytes=10-19' } });
  t.equal(o.status, 200);
  t.equal(o.headers?.['content-range'], undefined);
  t.ok(o.body.equals(blob), 'the whole blob');
  const plain = await send(`${proxy.url}${blobPath}`);
  t.equal(plain.status, 200, 'no Range: nothing to ignore');
  t.equal(proxy.stats.faults.ignoreRange, 1);
  t.equal(proxy.stats.passed, 1);
});

t.test('redirectLoop: 307 to itself, forever', async (t) => {
  only(['redirectLoop']);
  const first = await send(`${proxy.url}${blobPath}`);
  t.equal(first.status, 307);
  const loc1 = String(first.headers?.location);
  t.equal(new URL(loc1).origin, proxy.url);
  t.equal(new URL(loc1).pathname, blobPath, 'same path');
  proxy.setOptions({ rate: 0 }); // the loop goes on even when no new faults are drawn
  const second = await send(loc1);
  t.equal(second.status, 307);
  const loc2 = String(second.headers?.location);
  t.equal(new URL(loc2).pathname, blobPath);
  t.not(loc2, loc1, 'a query counter changes');
  proxy.setOptions({ rate: 1 });
  await t.rejects(fetch(`${proxy.url}${blobPath}`), 'fetch gives up on the loop');
  t.equal(proxy.stats.faults.redirectLoop, 2);
  t.ok(proxy.stats.loopHops >= 20, `hops: ${proxy.stats.loopHops}`);
});

t.test('redirectToStorage: a signed URL that works, then answers 403', async (t) => {
  only(['redirectToStorage']);
  const o = await send(`${proxy.url}${blobPath}`);
  t.equal(o.status, 307);
  const loc = new URL(String(o.headers?.location));
  t.equal(loc.host, proxy.host);
  t.match(loc.pathname, /^\/_storage\/[0-9a-f]+\/v2\//);
  t.ok(loc.pathname.endsWith(blobPath), 'carries the registry path');

  const got = await send(loc.href);
  t.equal(got.status, 200);
  t.ok(got.body.equals(blob), 'storage serves the blob');
  const part = await send(loc.href, { headers: { range: 'bytes=5-9' } });
  t.equal(part.status, 206);
  t.ok(part.body.equals(blob.subarray(5, 10)));
  t.equal(proxy.stats.storageWithAuthorization, 0);
  await send(loc.href, { method: 'HEAD', headers: { authorization: 'Bearer leaked' } });
  t.equal(proxy.stats.storageWithAuthorization, 1, 'a client sending credentials to storage is counted');

  const viaFetch = await fetch(`${proxy.url}${blobPath}`);
  t.equal(viaFetch.status, 200);
  t.ok(viaFetch.url.includes('/_storage/'), 'fetch followed to storage');
  t.equal(sha(Buffer.from(await viaFetch.arrayBuffer())), sha(blob));

  proxy.expireStorageUrls();
  const expired = await send(loc.href);
  t.equal(expired.status, 403);
  t.match(expired.body.toString(), /AccessDenied/);
  const again = await send(`${proxy.url}${blobPath}`);
  t.equal(again.status, 307, 're-resolving via the registry URL gives a fresh one');
  t.equal((await send(String(again.headers?.location))).status, 200);

  proxy.setOptions({ storageTtlMs: 150, storageHostname: 'localhost' });
  const short = await send(`${proxy.url}${blobPath}`);
  const shortLoc = new URL(String(short.headers?.location));
  t.equal(shortLoc.host, `localhost:${proxy.port}`, 'storage on another origin');
  t.equal((await send(shortLoc.href.replace('localhost', '127.0.0.1'), { method: 'HEAD' })).status, 200);
  await new Promise((r) => setTimeout(r, 250));
  t.equal((await send(shortLoc.href.replace('localhost', '127.0.0.1'))).status, 403, 'expired after its TTL');
  t.equal(proxy.stats.storageDenied, 2);

  const missing = await send(`${proxy.url}/v2/${REPO}/blobs/sha256:${'1'.repeat(64)}`);
  t.equal(missing.status, 404, 'an unknown blob is not redirected: the registry answers');
  proxy.setOptions({ storageTtlMs: undefined, storageHostname: undefined });
});

t.test('status429/503/500: distribution errors, Retry-After sometimes', async (t) => {
  only(['status429'], { retryAfterSeconds: 2 });
  const outs: Outcome[] = [];
  for (let i = 0; i < 12; i++) outs.push(await send(`${proxy.url}${blobPath}`));
  for (const o of outs) {
    t.equal(o.status, 429);
    const body = JSON.parse(o.body.toString()) as { errors: { code: string }[] };
    t.equal(body.errors[0]?.code, 'TOOMANYREQUESTS');
  }
  const withRA = outs.filter((o) => o.headers?.['retry-after'] !== undefined);
  t.ok(withRA.length > 0 && withRA.length < outs.length, `Retry-After on ${withRA.length} of ${outs.length}`);
  for (const o of withRA) t.equal(o.headers?.['retry-after'], '2');

  only(['status503'], { retryAfter: 'always' });
  const u = await send(`${proxy.url}${blobPath}`);
  t.equal(u.status, 503);
  t.equal(u.headers?.['retry-after'], '2');
  t.match(u.body.toString(), /UNAVAILABLE/);

  only(['status500'], { retryAfter: undefined, retryAfterSeconds: undefined });
  const e = await send(`${proxy.url}${blobPath}`);
  t.equal(e.status, 500);
  t.equal(e.headers?.['retry-after'], undefined);
  t.match(e.body.toString(), /UNKNOWN/);
});

t.test('stall: no answer, or a late one', async (t) => {
  only(['stall']);
  const o = await send(`${proxy.url}${blobPath}`, { timeoutMs: 500 });
  t.equal(o.status, undefined, 'no response within 500 ms');
  t.equal(o.error?.message, 'timeout');
  proxy.setOptions({ stallMs: 300 });
  const late = await send(`${proxy.url}${blobPath}`, { headers: { range: 'bytes=0-99' } });
  t.equal(late.status, 206);
  t.ok(late.ms >= 280, `answered after ${late.ms.toFixed(0)} ms`);
  t.ok(late.body.equals(blob.subarray(0, 100)));
  proxy.setOptions({ stallMs: undefined });
});

t.test('slowBody: the right bytes, slowly', async (t) => {
  only(['slowBody'], { slowBodyChunkBytes: 4096, slowBodyDelayMs: 50 });
  const o = await send(`${proxy.url}${blobPath}`, { headers: { range: 'bytes=0-16383' } });
  t.equal(o.status, 206);
  t.ok(o.body.equals(blob.subarray(0, 16384)));
  t.ok(o.ms >= 150, `took ${o.ms.toFixed(0)} ms`);
  proxy.setOptions({ slowBodyChunkBytes: undefined, slowBodyDelayMs: undefined });
});

t.test('redirectToScheme: a 307 to ftp://', async (t) => {
  only([], { rate: 0 });
  redirectToScheme(proxy, 'ftp');
  const o = await send(`${proxy.url}${blobPath}`);
  t.equal(o.status, 307);
  t.equal(String(o.headers?.location), `ftp://${proxy.host}${blobPath}`);
  await t.rejects(fetch(`${proxy.url}${blobPath}`), 'fetch refuses a non-HTTP(S) redirect');
  t.equal((await send(`${proxy.url}/v2/`)).status, 200, 'other paths untouched');
  proxy.setOptions({ schemeRedirect: undefined });
  t.equal((await send(`${proxy.url}${blobPath}`, { method: 'HEAD' })).status, 200);
});

t.test('the seed decides: same seed same faults, concurrency or not', async (t) => {
  const outcomes = async (seed: number, concurrent: boolean): Promise<string[]> => {
    const p = await startFaultProxy({ upstream: registry.url, seed, rate: 0.5, faults: ['status500', 'status503', 'ignoreRange'] });
    try {
      const ranges = Array.from({ length: 16 }, (_, i) => `bytes=${i * 10}-${i * 10 + 9}`);
      const one = async (range: string): Promise<string> => {
        const o = await send(`${p.url}${blobPath}`, { headers: { range } });
        return `${range}:${o.status ?? o.error?.message}`;
      };
      if (concurrent) return await Promise.all(ranges.map(one));
      const out: string[] = [];
      for (const r of ranges) out.push(await one(r));
      return out;
    } finally {
      await p.close();
    }
  };
  const a = await outcomes(7, false);
  t.same(await outcomes(7, true), a, 'same seed, concurrent: same outcome per request');
  t.notSame(await outcomes(8, false), a, 'another seed: other faults');
  const statuses = new Set(a.map((s) => s.split(':')[1]));
  t.ok(statuses.has('206') && statuses.size > 1, `a mix: ${[...statuses].join(' ')}`);
});

t.test('close() returns promptly with sockets open, stalled and mid-body', async (t) => {
  const p = await startFaultProxy({ upstream: registry.url, seed: 3, rate: 1, faults: ['stall'] });
  const agent = new http.Agent({ keepAlive: true });
  try {
    const stalled = [1, 2, 3].map(() => send(`${p.url}${blobPath}`, { timeoutMs: 5000 }));
    // An idle keep-alive connection.
    const idle = await send(`${p.url}/v2/`, { agent });
    t.equal(idle.status, 200);
    // A slow body in progress.
    p.setOptions({ faults: ['slowBody'], slowBodyChunkBytes: 1024, slowBodyDelayMs: 200 });
    const slow = send(`${p.url}${blobPath}`, { timeoutMs: 5000 });
    await new Promise((r) => setTimeout(r, 300));
    t.equal(p.stats.faults.stall, 3);
    t.equal(p.stats.faults.slowBody, 1);
    const start = performance.now();
    await p.close();
    const took = performance.now() - start;
    t.ok(took < 500, `close() took ${took.toFixed(0)} ms`);
    for (const o of await Promise.all(stalled)) t.ok(o.error !== undefined && o.error.message !== 'timeout', `stalled request ended: ${o.error?.message}`);
    const s = await slow;
    t.ok(s.error !== undefined && s.body.length < blob.length, `slow body cut: ${s.body.length} bytes, ${s.error?.message}`);
    await p.close(); // idempotent
  } finally {
    agent.destroy();
    await p.close();
  }
});

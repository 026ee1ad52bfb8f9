/**
 * The registry client's retry observer (`onRetry`): every retry is reported once, with the
 * operation that was retried and the cause of the failed attempt. A real registry behind the
 * seeded fault proxy (test/helpers/fault-proxy.ts) answers 503 and 429 and resets connections
 * (before the headers and mid-body) on manifest and blob requests; the client fetches
 * manifests, a whole small blob, range reads of a layer and a streamed layer download.
 *
 * Oracle: the proxy's own log of what it did to each request. With attempts to spare (no read
 * may run out of them, which the test checks: every call must succeed with the right bytes),
 * each request the proxy faulted is followed by exactly one retry, so the events per
 * (operation, cause) must equal the proxy's faulted requests per (phase, fault kind). Then the
 * causes the proxy cannot produce: a refused connection (`connect`) and a stalled answer
 * (`timeout_first_byte`); and an observer that throws does not break the fetch.
 */
import t, { type Test } from 'tap';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RegistryClient, retryCause, TimeoutError, type RegistryClientOptions, type RetryEvent } from '../../fetcher/index.js';
import { startFaultProxy, type FaultKind, type FaultProxy } from '../helpers/fault-proxy.js';
import { defaultImages, pushImage } from '../helpers/images.js';
import { startRegistry } from '../helpers/registry.js';

const sha256 = (b: Uint8Array): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

const work = await mkdtemp(join(tmpdir(), 'soci-ts-retries-'));
t.teardown(() => rm(work, { recursive: true, force: true }));
const reg = await startRegistry();
t.teardown(() => reg.stop());
const image = (await defaultImages()).small;
const pushed = await pushImage(image.layoutDir, image.tag, reg, 'retries/img');
const layer = image.layers.reduce((a, b) => (b.size > a.size ? b : a));
const layerBytes = await readFile(layer.path);

const FAULTS: FaultKind[] = ['status503', 'status429', 'reset'];
const CAUSE: Partial<Record<string, RetryEvent['cause']>> = { status503: 'http_5xx', status429: 'http_429', reset: 'reset' };

const proxy: FaultProxy = await startFaultProxy({
  upstream: reg.url,
  seed: 7,
  rate: 0.4,
  faults: FAULTS,
  retryAfter: 'sometimes',
  retryAfterSeconds: 1,
  // Manifests and blobs (GET and HEAD), not the /v2/ probe.
  match: (method, p) => (method === 'GET' || method === 'HEAD') && /^\/v2\/.+\/(manifests|blobs)\/[^/]+$/.test(p),
});
t.teardown(() => proxy.close());

const clients: RegistryClient[] = [];
t.teardown(() => Promise.all(clients.map((c) => c.close())));
function newClient(extra: Partial<RegistryClientOptions>): RegistryClient {
  const c = new RegistryClient({
    hostsDir: '',
    plainHttp: true,
    credentials: { configPath: join(work, 'no-docker-config.json'), env: {} },
    // Attempts to spare: at a fault rate of 0.4, running out of 25 has odds of 1e-10.
    retry: { attempts: 25, baseDelayMs: 1, maxDelayMs: 5, maxRetryAfterMs: 5 },
    timeouts: { connectMs: 2000, firstByteMs: 2000, idleMs: 2000 },
    ...extra,
  });
  clients.push(c);
  return c;
}

const events: RetryEvent[] = [];
const client = newClient({ onRetry: (e) => events.push(e) });
const repo = client.repository(`${proxy.host}/retries/img:${image.tag}`);

/** Faulted requests in the proxy's log since the last reset, by the cause they must be reported as. */
function faulted(): Map<string, number> {
  const out = new Map<string, number>();
  for (const r of proxy.stats.log) {
    if (r.outcome === 'passed') continue;
    const cause = CAUSE[r.outcome];
    if (cause === undefined) throw new Error(`unexpected proxy outcome ${r.outcome} for ${r.method} ${r.url}`);
    out.set(cause, (out.get(cause) ?? 0) + 1);
  }
  return out;
}

function reported(operation: string, since: number): Map<string, number> {
  const out = new Map<string, number>();
  for (const e of events.slice(since)) {
    if (e.operation !== operation) continue;
    out.set(e.cause, (out.get(e.cause) ?? 0) + 1);
  }
  return out;
}

const sorted = (m: Map<string, number>): Array<[string, number]> => [...m].sort((a, b) => a[0].localeCompare(b[0]));
const totals = { requests: 0, faults: 0 };

async function phase(t: Test, operation: string, body: () => Promise<void>): Promise<void> {
  proxy.resetStats();
  const since = events.length;
  await body();
  const want = faulted();
  const got = reported(operation, since);
  totals.requests += proxy.stats.requests;
  totals.faults += [...want.values()].reduce((a, b) => a + b, 0);
  t.ok([...want.values()].reduce((a, b) => a + b, 0) > 0, `${operation}: the proxy faulted some requests (${JSON.stringify(sorted(want))} of ${proxy.stats.requests})`);
  t.same(sorted(got), sorted(want), `${operation}: one retry reported per faulted request, by cause`);
  t.equal(events.length - since, [...got.values()].reduce((a, b) => a + b, 0), `${operation}: no retry reported under another operation`);
  t.ok(
    events.slice(since).every((e) => e.retry >= 1 && e.delayMs >= 0 && (e.cause.startsWith('http_') ? e.status !== undefined && retryCause(e.error) === e.cause : e.status === undefined)),
    `${operation}: events carry the retry number, the delay, the status of http causes and the error`,
  );
}

t.test('manifests: GET by tag and digest, HEAD', async (t) => {
  await phase(t, 'manifest', async () => {
    for (let i = 0; i < 20; i++) {
      const m = await repo.fetchManifest(i % 2 === 0 ? image.tag : pushed.manifestDigest);
      t.equal(m.descriptor.digest, pushed.manifestDigest, `fetch ${i}: the manifest`);
      const d = await repo.statManifest(image.tag);
      t.equal(d?.digest, pushed.manifestDigest, `HEAD ${i}: the manifest`);
    }
  });
});

t.test('a whole small blob (the config), and HEAD of the layer', async (t) => {
  await phase(t, 'blob', async () => {
    for (let i = 0; i < 20; i++) {
      const b = await repo.fetchBlob(image.manifest.config);
      t.equal(sha256(b), image.configDigest, `config ${i}`);
      t.equal(await repo.statBlob(layer.digest), layer.size, `HEAD ${i}`);
    }
  });
});

t.test('range reads of the layer, checked against the local file', async (t) => {
  await phase(t, 'range', async () => {
    const step = Math.floor(layer.size / 40);
    for (let off = 0; off + step <= layer.size; off += step) {
      const want = layerBytes.subarray(off, off + Math.min(step, 8192));
      const got = await repo.readRange({ mediaType: layer.mediaType, digest: layer.digest, size: layer.size }, off, want.length, { digest: sha256(want) });
      t.ok(got.equals(want), `bytes ${off}+${want.length}`);
    }
  });
});

t.test('the streamed download of the layer, resumed after breaks', async (t) => {
  await phase(t, 'blob_stream', async () => {
    for (let i = 0; i < 8; i++) {
      const parts: Buffer[] = [];
      for await (const c of repo.blobStream({ mediaType: layer.mediaType, digest: layer.digest, size: layer.size })) parts.push(c);
      t.equal(sha256(Buffer.concat(parts)), layer.digest, `download ${i}: the layer`);
    }
  });
  t.comment(`${totals.faults} faults over ${totals.requests} requests in all`);
});

t.test('causes the proxy cannot make: a refused connection, a stalled answer', async (t) => {
  // A port nothing listens on (bound, then closed).
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  const port = (srv.address() as AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  const seen: RetryEvent[] = [];
  const refused = newClient({ onRetry: (e) => seen.push(e), retry: { attempts: 3, baseDelayMs: 1, maxDelayMs: 2, maxRetryAfterMs: 2 } });
  await t.rejects(refused.repository(`127.0.0.1:${port}/x/y:z`).fetchManifest(), 'refused: the fetch fails after its attempts');
  t.same(
    seen.map((e) => [e.operation, e.cause, e.retry]),
    [
      ['manifest', 'connect', 1],
      ['manifest', 'connect', 2],
    ],
    'two retries of three attempts, cause connect',
  );

  const stalls = await startFaultProxy({ upstream: reg.url, seed: 1, rate: 1, faults: ['stall'], match: (m, p) => m === 'GET' && p.includes('/manifests/') });
  t.teardown(() => stalls.close());
  seen.length = 0;
  const slow = newClient({ onRetry: (e) => seen.push(e), retry: { attempts: 2, baseDelayMs: 1, maxDelayMs: 2, maxRetryAfterMs: 2 }, timeouts: { connectMs: 2000, firstByteMs: 300, idleMs: 2000 } });
  const err = await slow
    .repository(`${stalls.host}/retries/img:${image.tag}`)
    .fetchManifest()
    .then(
      () => undefined,
      (e: unknown) => e,
    );
  t.ok(err instanceof TimeoutError, 'stalled: a TimeoutError after its attempts');
  t.same(seen.map((e) => [e.operation, e.cause]), [['manifest', 'timeout_first_byte']], 'one retry, cause timeout_first_byte');
  t.equal(stalls.stats.faults.stall, 2, 'the proxy stalled both attempts');
});

t.test('an observer that throws: the fetch goes on, the retries still happen', async (t) => {
  const throwing = newClient({
    onRetry: () => {
      throw new Error('observer bug');
    },
  });
  proxy.resetStats();
  const r = throwing.repository(`${proxy.host}/retries/img:${image.tag}`);
  for (let i = 0; i < 10; i++) t.equal((await r.fetchManifest()).descriptor.digest, pushed.manifestDigest, `fetch ${i}`);
  t.ok([...faulted().values()].reduce((a, b) => a + b, 0) > 0, 'some requests were faulted (and retried)');
});

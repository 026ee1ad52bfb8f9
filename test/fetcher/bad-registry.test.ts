/**
 * The registry client against registries that lie, break or stall: what a real registry never
 * does, so each case is a small `node:http` server on loopback that misbehaves in one way. Every
 * case runs with small timeouts and retry delays, must end promptly, and must leave no
 * unhandled rejection behind.
 */
import t, { type Test } from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import * as http from 'node:http';
import * as https from 'node:https';
import type * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  AuthError,
  IntegrityError,
  jsonLogger,
  MEDIA_TYPE_OCI_INDEX,
  MEDIA_TYPE_OCI_LAYER_GZIP,
  MEDIA_TYPE_OCI_MANIFEST,
  ProtocolError,
  RegistryClient,
  RegistryError,
  TimeoutError,
  TooLargeError,
  type Descriptor,
  type RegistryClientOptions,
} from '../../fetcher/index.js';
import { run } from '../helpers/layers.js';

// ------------------------------------------------------------------- no unhandled rejections

// Collected here and checked by the last test (tap reports them too, but less clearly).
const unhandled: unknown[] = [];
process.on('unhandledRejection', (reason) => {
  unhandled.push(reason);
});

// ------------------------------------------------------------------- fixtures

const sha256 = (b: Uint8Array): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;
const blob = randomBytes(1 << 20);
const desc: Descriptor = { mediaType: MEDIA_TYPE_OCI_LAYER_GZIP, digest: sha256(blob), size: blob.length };
const corrupt = Buffer.from(blob);
corrupt[corrupt.length >> 1] ^= 0xff;

const manifestA = Buffer.from(
  JSON.stringify({
    schemaVersion: 2,
    mediaType: MEDIA_TYPE_OCI_MANIFEST,
    config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256(Buffer.from('{}')), size: 2 },
    layers: [desc],
  }),
);
const manifestB = Buffer.from(JSON.stringify({ ...JSON.parse(manifestA.toString()), annotations: { b: 'yes' } }));

let tmp: string;
t.before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'soci-ts-bad-registry-'));
});
t.teardown(() => rm(tmp, { recursive: true, force: true }));

// ------------------------------------------------------------------- fake servers

interface Seen {
  method: string;
  path: string;
  headers: http.IncomingHttpHeaders;
  at: number;
}

interface Fake {
  host: string;
  origin: string;
  seen: Seen[];
  /** Requests whose path matches. */
  count(re: RegExp): number;
  close(): Promise<void>;
}

type Handler = (req: http.IncomingMessage, res: http.ServerResponse, n: number) => void | Promise<void>;

/** A server on a free loopback port; close() destroys every connection. */
async function serve(handler: Handler, tls?: { key: Buffer; cert: Buffer }): Promise<Fake> {
  const seen: Seen[] = [];
  const sockets = new Set<net.Socket>();
  const onRequest = (req: http.IncomingMessage, res: http.ServerResponse): void => {
    seen.push({ method: req.method ?? '', path: req.url ?? '', headers: req.headers, at: performance.now() });
    Promise.resolve(handler(req, res, seen.length)).catch(() => res.destroy());
  };
  const server = tls === undefined ? http.createServer(onRequest) : https.createServer(tls, onRequest);
  server.on('connection', (s: net.Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as net.AddressInfo).port;
  const host = `127.0.0.1:${port}`;
  return {
    host,
    origin: `${tls === undefined ? 'http' : 'https'}://${host}`,
    seen,
    count: (re) => seen.filter((s) => re.test(s.path)).length,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Serves `data` as a blob, with Range support (206 + Content-Range). */
function sendBlob(req: http.IncomingMessage, res: http.ServerResponse, data: Buffer): void {
  const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
  if (m === null) {
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': data.length, 'docker-content-digest': desc.digest });
    res.end(req.method === 'HEAD' ? undefined : data);
    return;
  }
  const start = Number(m[1]);
  const end = m[2] === '' ? data.length - 1 : Math.min(Number(m[2]), data.length - 1);
  res.writeHead(206, { 'content-type': 'application/octet-stream', 'content-length': end - start + 1, 'content-range': `bytes ${start}-${end}/${data.length}` });
  res.end(data.subarray(start, end + 1));
}

function sendJson(res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string | number> = {}): void {
  const bytes = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': bytes.length, ...headers });
  res.end(bytes);
}

const logLines: string[] = [];
const logger = jsonLogger('debug', { write: (l: string) => logLines.push(l) });

/** A client with small timeouts and fast retries (3 attempts) that reads no docker config. */
function client(t: Test, extra: Partial<RegistryClientOptions> = {}): RegistryClient {
  const c = new RegistryClient({
    hostsDir: '',
    credentials: { configPath: join(tmp, 'no-such-config.json') },
    timeouts: { connectMs: 1000, firstByteMs: 1000, idleMs: 1000 },
    retry: { attempts: 3, baseDelayMs: 5, maxDelayMs: 20, maxRetryAfterMs: 3000 },
    logger,
    ...extra,
  });
  t.teardown(() => c.close());
  return c;
}

async function fake(t: Test, handler: Handler, tls?: { key: Buffer; cert: Buffer }): Promise<Fake> {
  const f = await serve(handler, tls);
  t.teardown(() => f.close());
  return f;
}

/** The rejection of `p` (fails the test if it resolves), and how long it took. */
async function failure(p: Promise<unknown>): Promise<{ err: unknown; ms: number }> {
  const t0 = performance.now();
  try {
    await p;
  } catch (err) {
    return { err, ms: performance.now() - t0 };
  }
  throw new Error('expected a failure, got success');
}

async function drain(it: AsyncIterable<Buffer>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of it) parts.push(c);
  return Buffer.concat(parts);
}

/**
 * Longest a request may take to time out after `ms`: undici runs its header and body timeouts on
 * a coarse clock (FastTimer, about 1 s resolution), so a 200 ms timeout fires after 200-1200 ms.
 */
const late = (ms: number): number => ms + 1100;

const BLOB_PATH = /\/blobs\/sha256:/;
const MANIFEST_PATH = /\/manifests\//;
const opts = { timeout: 15_000 };

// ------------------------------------------------------------------- manifests

t.test('a manifest whose content does not hash to the digest asked for: IntegrityError', opts, async (t) => {
  const f = await fake(t, (_req, res) => sendJson(res, 200, JSON.parse(manifestB.toString()), { 'content-type': MEDIA_TYPE_OCI_MANIFEST, 'docker-content-digest': sha256(manifestA) }));
  // The exact bytes of B, not a re-serialisation.
  const c = client(t);
  const { err } = await failure(c.repository(`${f.host}/team/app`).fetchManifest(sha256(manifestA)));
  t.type(err, IntegrityError);
  t.match((err as Error).message, /not the one asked for/);
  t.equal(f.count(MANIFEST_PATH), 3, 'retried (a broken proxy may be transient), then refused');
});

t.test("a tag's manifest whose Docker-Content-Digest disagrees with the content: IntegrityError", opts, async (t) => {
  let stated = sha256(manifestB);
  const f = await fake(t, (_req, res) => {
    res.writeHead(200, { 'content-type': MEDIA_TYPE_OCI_MANIFEST, 'content-length': manifestA.length, 'docker-content-digest': stated });
    res.end(manifestA);
  });
  const c = client(t);
  const repo = c.repository(`${f.host}/team/app:v1`);
  const { err } = await failure(repo.fetchManifest());
  t.type(err, IntegrityError);
  t.match((err as Error).message, /but the registry says sha256:/);
  stated = sha256(manifestA);
  const ok = await repo.fetchManifest();
  t.equal(ok.descriptor.digest, sha256(manifestA), 'control: with the right header the same bytes are accepted');
  t.ok(ok.bytes.equals(manifestA));
});

t.test('a manifest announcing 5 GB: TooLargeError at once, without reading the body', opts, async (t) => {
  let closedAt = 0;
  const f = await fake(t, (_req, res) => {
    res.writeHead(200, { 'content-type': MEDIA_TYPE_OCI_MANIFEST, 'content-length': String(5 * 1024 ** 3) });
    res.write(Buffer.alloc(1024, 0x20));
    res.on('close', () => (closedAt = performance.now()));
  });
  const c = client(t);
  const { err, ms } = await failure(c.repository(`${f.host}/team/app:v1`).fetchManifest());
  t.type(err, TooLargeError);
  t.match((err as Error).message, /manifest of 5368709120 bytes is over the 4194304-byte limit/);
  t.ok(ms < 500, `failed in ${ms.toFixed(0)} ms (timeouts are 1000 ms)`);
  t.equal(f.count(MANIFEST_PATH), 1, 'not retried');
  for (let i = 0; i < 100 && closedAt === 0; i++) await new Promise((r) => setTimeout(r, 10));
  t.ok(closedAt > 0, 'the client dropped the connection');
});

t.test('a chunked manifest body that never ends: TooLargeError past 4 MiB', opts, async (t) => {
  let written = 0;
  let stopped = false;
  const chunk = Buffer.alloc(64 << 10, 0x20);
  const f = await fake(t, async (_req, res) => {
    res.writeHead(200, { 'content-type': MEDIA_TYPE_OCI_MANIFEST }); // no length: chunked
    res.on('close', () => (stopped = true));
    while (!res.destroyed && written < 1 << 30) {
      written += chunk.length;
      if (!res.write(chunk)) {
        await new Promise<void>((resolve) => {
          const done = (): void => {
            res.off('drain', done).off('close', done);
            resolve();
          };
          res.on('drain', done).on('close', done);
        });
      }
    }
  });
  const c = client(t);
  const { err, ms } = await failure(c.repository(`${f.host}/team/app:v1`).fetchManifest());
  t.type(err, TooLargeError);
  t.match((err as Error).message, /manifest is over the 4194304-byte limit/);
  t.ok(ms < 3000, `failed in ${ms.toFixed(0)} ms`);
  for (let i = 0; i < 200 && !stopped; i++) await new Promise((r) => setTimeout(r, 10));
  t.ok(stopped, 'the client closed the connection: the server stopped writing');
  t.ok(written < 64 << 20, `the server got to write ${(written / 2 ** 20).toFixed(1)} MiB, not forever`);
});

// ------------------------------------------------------------------- blobs

t.test('a blob with the wrong content: IntegrityError from fetchBlob, blobStream and digest-checked readRange', opts, async (t) => {
  const f = await fake(t, (req, res) => sendBlob(req, res, corrupt));
  const c = client(t);
  const repo = c.repository(`${f.host}/team/app`);
  const a = await failure(repo.fetchBlob(desc, 4 << 20));
  t.type(a.err, IntegrityError, 'fetchBlob');
  t.equal(f.count(BLOB_PATH), 3, 'fetchBlob retried, then refused');
  const b = await failure(drain(repo.blobStream(desc)));
  t.type(b.err, IntegrityError, 'blobStream');
  const mid = blob.length >> 1;
  const digest = sha256(blob.subarray(mid - 10, mid + 10));
  const r = await failure(repo.readRange(desc, mid - 10, 20, { digest }));
  t.type(r.err, IntegrityError, 'readRange with a digest');
  t.match((r.err as Error).message, /do not match their digest/);
  t.ok((await repo.readRange(desc, 0, 100)).equals(blob.subarray(0, 100)), 'control: an untouched range reads fine');
});

t.test('206 with a Content-Range other than the one asked for: ProtocolError after the retries', opts, async (t) => {
  const wrong: Array<[string, (s: number, e: number) => string | undefined]> = [
    ['shifted by one', (s, e) => `bytes ${s + 1}-${e + 1}/${blob.length}`],
    ['shorter', (s, e) => `bytes ${s}-${e - 1}/${blob.length}`],
    ['another total size', (s, e) => `bytes ${s}-${e}/${blob.length + 1}`],
    ['garbage', () => 'bytes lots'],
    ['missing', () => undefined],
  ];
  for (const [name, cr] of wrong) {
    const f = await fake(t, (req, res) => {
      const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '')!;
      const s = Number(m[1]);
      const e = Number(m[2]);
      const headers: Record<string, string | number> = { 'content-length': e - s + 1 };
      const v = cr(s, e);
      if (v !== undefined) headers['content-range'] = v;
      res.writeHead(206, headers);
      res.end(blob.subarray(s, e + 1));
    });
    const c = client(t);
    const { err } = await failure(c.repository(`${f.host}/team/app`).readRange(desc, 1000, 500));
    t.type(err, ProtocolError, name);
    t.match((err as Error).message, /asked for bytes 1000-1499\/1048576, got Content-Range/, `${name}: says what was asked`);
    t.equal(f.count(BLOB_PATH), 3, `${name}: 3 attempts`);
  }
  // The unknown-total form is valid.
  const ok = await fake(t, (req, res) => {
    const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '')!;
    const s = Number(m[1]);
    const e = Number(m[2]);
    res.writeHead(206, { 'content-length': e - s + 1, 'content-range': `bytes ${s}-${e}/*` });
    res.end(blob.subarray(s, e + 1));
  });
  t.ok((await client(t).repository(`${ok.host}/team/app`).readRange(desc, 1000, 500)).equals(blob.subarray(1000, 1500)), '"bytes s-e/*" is accepted');
});

t.test('200 to a Range request: the right window of a verified whole blob, or IntegrityError', opts, async (t) => {
  const before = logLines.length;
  let data = blob;
  const f = await fake(t, (req, res) => {
    res.writeHead(200, { 'content-length': data.length });
    res.end(data);
  });
  const c = client(t);
  const repo = c.repository(`${f.host}/team/app`);
  const reads = await Promise.all([repo.readRange(desc, 0, 1), repo.readRange(desc, 300_000, 70_000), repo.readRange(desc, blob.length - 1, 1)]);
  t.ok(reads[0]!.equals(blob.subarray(0, 1)), 'first byte');
  t.ok(reads[1]!.equals(blob.subarray(300_000, 370_000)), 'a middle window');
  t.ok(reads[2]!.equals(blob.subarray(blob.length - 1)), 'last byte');
  t.ok((await repo.readRange(desc, 5, 10)).equals(blob.subarray(5, 15)), 'a later read');
  const warnings = logLines.slice(before).filter((l) => l.includes('ignored a Range request'));
  t.equal(warnings.length, 1, 'warned once per registry');

  data = corrupt;
  const { err } = await failure(repo.readRange(desc, 0, 10));
  t.type(err, IntegrityError, 'a wrong whole blob is refused even though the window itself is intact');
  t.match((err as Error).message, /whole-blob answer has digest/);
  data = blob.subarray(0, blob.length - 1);
  const short = await failure(repo.readRange(desc, 0, 10));
  t.type(short.err, ProtocolError, 'a whole blob of the wrong size is refused');
});

// ------------------------------------------------------------------- redirects

t.test('a redirect to ftp:// is refused', opts, async (t) => {
  const f = await fake(t, (_req, res) => {
    res.writeHead(307, { location: 'ftp://127.0.0.1/blob' });
    res.end();
  });
  const { err } = await failure(client(t).repository(`${f.host}/team/app`).fetchBlob(desc, 4 << 20));
  t.type(err, ProtocolError);
  t.match((err as Error).message, /redirect to a ftp: URL refused/);
  t.equal(f.seen.length, 1, 'not retried');
});

t.test('a redirect loop is cut after 5 hops', opts, async (t) => {
  const f = await fake(t, (req, res) => {
    res.writeHead(302, { location: `/loop/${Number(/\d+$/.exec(req.url ?? '')?.[0] ?? 0) + 1}` });
    res.end();
  });
  const { err } = await failure(client(t).repository(`${f.host}/team/app`).readRange(desc, 0, 10));
  t.type(err, ProtocolError);
  t.match((err as Error).message, /more than 5 redirects/);
  t.equal(f.seen.length, 6, 'the request and 5 redirects, not retried');
});

t.test('a redirect from https to plain http is refused', opts, async (t) => {
  const key = join(tmp, 'tls.key');
  const cert = join(tmp, 'tls.crt');
  await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=127.0.0.1']);
  const plain = await fake(t, (req, res) => sendBlob(req, res, blob));
  const other = randomBytes(1000);
  const otherDesc: Descriptor = { ...desc, digest: sha256(other), size: other.length };
  const secure = await fake(
    t,
    (req, res) => {
      if (req.url === '/storage/other') return sendBlob(req, res, other);
      const target = req.url?.includes(otherDesc.digest) === true ? '/storage/other' : `${plain.origin}/storage/blob`;
      res.writeHead(307, { location: target });
      res.end();
    },
    { key: await readFile(key), cert: await readFile(cert) },
  );
  const hostsDir = join(tmp, 'certs.d');
  await mkdir(join(hostsDir, secure.host), { recursive: true });
  await writeFile(join(hostsDir, secure.host, 'hosts.toml'), `server = "https://${secure.host}"\nskip_verify = true\n`);
  const repo = client(t, { hostsDir }).repository(`${secure.host}/team/app`);
  t.ok((await repo.fetchBlob(otherDesc)).equals(other), 'control: an https → https redirect is followed');
  const { err } = await failure(repo.fetchBlob(desc, 4 << 20));
  t.type(err, ProtocolError);
  t.match((err as Error).message, /redirect from https to plain http refused/);
  t.equal(plain.seen.length, 0, 'nothing was sent to the plain-http URL');
});

t.test('an expired storage redirect is resolved again through the registry, without credentials leaking', opts, async (t) => {
  const used = new Set<string>();
  let signed = 0;
  const storage = await fake(t, (req, res) => {
    const sig = new URL(req.url ?? '/', 'http://x').searchParams.get('sig') ?? '';
    if (used.has(sig)) {
      res.writeHead(403, { 'content-type': 'application/xml' });
      res.end('<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>');
      return;
    }
    used.add(sig);
    sendBlob(req, res, blob);
  });
  const auth = `Basic ${Buffer.from('alice:open-sesame').toString('base64')}`;
  const registry = await fake(t, (req, res) => {
    if (req.headers.authorization !== auth) return sendJson(res, 401, { errors: [{ code: 'UNAUTHORIZED' }] }, { 'www-authenticate': 'Basic realm="fake"' });
    res.writeHead(307, { location: `${storage.origin}/bucket/blob?sig=${++signed}` });
    res.end();
  });
  const repo = client(t, { credentials: { user: 'alice:open-sesame' } }).repository(`${registry.host}/team/app`);
  t.ok((await repo.readRange(desc, 0, 4096)).equals(blob.subarray(0, 4096)), 'first read: registry → storage');
  t.ok((await repo.readRange(desc, 8192, 4096)).equals(blob.subarray(8192, 12288)), 'second read: the stored URL has expired → registry again');
  t.ok((await repo.readRange(desc, 20000, 10)).equals(blob.subarray(20000, 20010)), 'third read');
  t.same(
    storage.seen.map((s) => new URL(s.path, 'http://x').searchParams.get('sig')),
    ['1', '1', '2', '2', '3'],
    'each signed URL worked once and was refused the second time',
  );
  t.equal(registry.count(BLOB_PATH), 4, 'the registry was asked once per fresh URL (plus the first 401)');
  t.notOk(
    storage.seen.some((s) => s.headers.authorization !== undefined),
    'no Authorization header went to the storage host',
  );
});

// ------------------------------------------------------------------- auth

t.test('a malformed WWW-Authenticate header: AuthError', opts, async (t) => {
  const f = await fake(t, (_req, res) => sendJson(res, 401, { errors: [{ code: 'UNAUTHORIZED' }] }, { 'www-authenticate': 'Bearer realm="https://auth.example/token' }));
  const { err } = await failure(client(t).repository(`${f.host}/team/app:v1`).fetchManifest());
  t.type(err, AuthError);
  t.match((err as Error).message, /malformed WWW-Authenticate header: unterminated quoted string/);
  t.equal(f.seen.length, 1, 'not retried');
});

t.test('a token endpoint that never answers: TimeoutError after the first-byte timeout, within the retry budget', opts, async (t) => {
  const tokenServer = await fake(t, () => {
    // Never answers; close() destroys the socket.
  });
  const f = await fake(t, (req, res) => {
    if (req.headers.authorization === undefined) {
      return sendJson(res, 401, { errors: [{ code: 'UNAUTHORIZED' }] }, { 'www-authenticate': `Bearer realm="${tokenServer.origin}/token",service="fake"` });
    }
    sendJson(res, 200, {});
  });
  const c = client(t, { timeouts: { connectMs: 1000, firstByteMs: 300, idleMs: 1000 }, retry: { attempts: 2, baseDelayMs: 5, maxDelayMs: 10, maxRetryAfterMs: 1000 } });
  const { err, ms } = await failure(c.repository(`${f.host}/team/app:v1`).fetchManifest());
  t.type(err, TimeoutError);
  t.equal((err as TimeoutError).phase, 'first-byte');
  t.match((err as Error).message, /^token endpoint http:\/\/127\.0\.0\.1:\d+\/token: no response within 300 ms/);
  t.equal(tokenServer.seen.length, 2, 'two attempts in all: the token fetch does not multiply the retries');
  t.ok(ms >= 2 * 300 && ms < 2 * late(300), `took ${ms.toFixed(0)} ms (2 attempts of 300 ms, on undici's coarse clock)`);
});

// ------------------------------------------------------------------- timeouts and retries

t.test('a body that stalls: TimeoutError("idle") from every kind of read', opts, async (t) => {
  const f = await fake(t, (req, res) => {
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    if (MANIFEST_PATH.test(req.url ?? '')) {
      res.writeHead(200, { 'content-type': MEDIA_TYPE_OCI_MANIFEST, 'content-length': manifestA.length });
      res.write(manifestA.subarray(0, 10));
    } else if (range !== null) {
      const s = Number(range[1]);
      const e = range[2] === '' ? blob.length - 1 : Number(range[2]);
      res.writeHead(206, { 'content-length': e - s + 1, 'content-range': `bytes ${s}-${e}/${blob.length}` });
      res.write(blob.subarray(s, s + 10));
    } else {
      res.writeHead(200, { 'content-length': blob.length });
      res.write(blob.subarray(0, 1000));
    }
    // ...and nothing more.
  });
  const c = client(t, { timeouts: { connectMs: 1000, firstByteMs: 1000, idleMs: 200 }, retry: { attempts: 2, baseDelayMs: 5, maxDelayMs: 10, maxRetryAfterMs: 1000 } });
  const repo = c.repository(`${f.host}/team/app:v1`);
  const results = await Promise.all([
    failure(repo.fetchManifest()),
    failure(repo.fetchBlob(desc, 4 << 20)),
    failure(repo.readRange(desc, 100, 5000)),
    failure(drain(repo.blobStream(desc))),
  ]);
  for (const [name, r] of ['fetchManifest', 'fetchBlob', 'readRange', 'blobStream'].map((n, i) => [n, results[i]!] as const)) {
    t.type(r.err, TimeoutError, name);
    t.equal((r.err as TimeoutError).phase, 'idle', `${name}: phase`);
    t.ok(r.ms >= 2 * 200 && r.ms < 2 * late(200), `${name}: ${r.ms.toFixed(0)} ms (2 attempts of 200 ms, on undici's coarse clock)`);
  }
  t.same(
    f.seen.filter((s) => s.headers.range?.endsWith('-') === true).map((s) => s.headers.range),
    ['bytes=1000-'],
    'blobStream resumed after the 1000 bytes it had',
  );
});

t.test('503 with Retry-After: 1, then success: waits about a second', opts, async (t) => {
  const f = await fake(t, (_req, res, n) => {
    if (n === 1) return sendJson(res, 503, { errors: [{ code: 'UNAVAILABLE', message: 'busy' }] }, { 'retry-after': '1' });
    res.writeHead(200, { 'content-type': MEDIA_TYPE_OCI_MANIFEST, 'content-length': manifestA.length });
    res.end(manifestA);
  });
  const t0 = performance.now();
  const m = await client(t).repository(`${f.host}/team/app:v1`).fetchManifest();
  const ms = performance.now() - t0;
  t.equal(m.descriptor.digest, sha256(manifestA));
  t.equal(f.seen.length, 2);
  const gap = f.seen[1]!.at - f.seen[0]!.at;
  t.ok(gap >= 950 && ms < 2500, `second request ${gap.toFixed(0)} ms after the first`);
});

t.test('429 forever: RegistryError after the configured attempts', opts, async (t) => {
  const f = await fake(t, (_req, res) => sendJson(res, 429, { errors: [{ code: 'TOOMANYREQUESTS', message: 'slow down\u0007\nplease' }] }));
  const { err, ms } = await failure(client(t).repository(`${f.host}/team/app:v1`).fetchManifest());
  t.type(err, RegistryError);
  t.equal((err as RegistryError).status, 429);
  t.equal((err as RegistryError).code, 'TOOMANYREQUESTS');
  t.match((err as Error).message, /fetching the manifest failed: HTTP 429 TOOMANYREQUESTS \(slow down  please\)$/);
  t.equal(f.seen.length, 3);
  t.ok(ms < 1000, `${ms.toFixed(0)} ms`);
});

t.test('a connection reset mid-body: blobStream resumes with a Range request and the digest checks out', opts, async (t) => {
  for (const resumeWith of ['206', '200'] as const) {
    const f = await fake(t, async (req, res, n) => {
      if (n === 1) {
        res.writeHead(200, { 'content-length': blob.length });
        await new Promise<void>((r) => res.write(blob.subarray(0, 300_000), () => r()));
        await new Promise((r) => setTimeout(r, 50));
        req.socket.resetAndDestroy();
        return;
      }
      if (resumeWith === '200') {
        res.writeHead(200, { 'content-length': blob.length });
        res.end(blob);
        return;
      }
      sendBlob(req, res, blob);
    });
    const got = await drain(client(t).repository(`${f.host}/team/app`).blobStream(desc));
    t.ok(got.equals(blob), `resumed (server answers ${resumeWith}): the whole blob, byte for byte`);
    t.equal(f.seen.length, 2);
    const range = f.seen[1]!.headers.range ?? '';
    const m = /^bytes=(\d+)-$/.exec(range);
    t.ok(m !== null && Number(m[1]) > 0 && Number(m[1]) <= 300_000, `resumed with ${JSON.stringify(range)}`);
  }
});

// ------------------------------------------------------------------- the referrers API

t.test('a registry with the referrers API: OCI-Subject is honoured, pages are followed by Link', opts, async (t) => {
  const subject = { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: sha256(manifestA), size: manifestA.length };
  const entry = (n: number, artifactType: string): Descriptor => ({ mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: sha256(Buffer.from(`artifact ${n}`)), size: 100 + n, artifactType });
  const pages = [
    [entry(1, 'application/vnd.amazon.soci.index.v1+json'), entry(2, 'application/vnd.example.sbom')],
    [entry(3, 'application/vnd.amazon.soci.index.v1+json')],
  ];
  let linkOrigin = '';
  const f = await fake(t, (req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    if (req.method === 'PUT' && url.pathname.startsWith('/v2/team/app/manifests/')) {
      req.resume();
      req.on('end', () => {
        res.writeHead(201, { 'oci-subject': subject.digest, 'docker-content-digest': url.pathname.slice('/v2/team/app/manifests/'.length), 'content-length': 0 });
        res.end();
      });
      return;
    }
    if (url.pathname === `/v2/team/app/referrers/${subject.digest}`) {
      const page = Number(url.searchParams.get('page') ?? '0');
      const headers: Record<string, string> = { 'content-type': MEDIA_TYPE_OCI_INDEX };
      if (page === 0) headers.link = `<${linkOrigin}/v2/team/app/referrers/${subject.digest}?page=1&n=2>; rel="next"`;
      return sendJson(res, 200, { schemaVersion: 2, mediaType: MEDIA_TYPE_OCI_INDEX, manifests: pages[page] ?? [] }, headers);
    }
    sendJson(res, 404, { errors: [{ code: 'NOT_FOUND' }] });
  });
  const repo = client(t).repository(`${f.host}/team/app`);
  const artifact = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MEDIA_TYPE_OCI_MANIFEST, artifactType: 'application/vnd.example.sbom', config: { mediaType: 'application/vnd.oci.empty.v1+json', digest: sha256(Buffer.from('{}')), size: 2 }, layers: [desc], subject }));
  const pushed = await repo.pushManifest(artifact, MEDIA_TYPE_OCI_MANIFEST);
  t.same(pushed, { descriptor: { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: sha256(artifact), size: artifact.length }, subjectAccepted: true, referrersTagUpdated: false });
  t.equal(f.count(/\/manifests\/sha256-/), 0, 'the fallback tag was not touched');

  const all = await repo.referrers(subject.digest);
  t.equal(all.source, 'api');
  t.same(all.descriptors, [...pages[0]!, ...pages[1]!], 'both pages, in order');
  const soci = await repo.referrers(subject.digest, 'application/vnd.amazon.soci.index.v1+json');
  t.same(soci.descriptors.map((d) => d.size), [101, 103], 'filtered by artifactType (the server ignored the filter)');
  t.ok(f.seen.some((s) => s.path.includes('artifactType=application%2Fvnd.amazon.soci.index.v1%2Bjson')), 'the filter was sent');

  linkOrigin = 'http://127.0.0.2:1';
  const { err } = await failure(repo.referrers(subject.digest));
  t.type(err, ProtocolError, 'a Link to another origin is refused');
  t.match((err as Error).message, /referrers Link points to another origin/);
});

t.test('no unhandled rejections were left behind', async (t) => {
  await new Promise((r) => setTimeout(r, 50));
  t.same(unhandled.map((e) => String(e)), []);
});

/**
 * hosts.toml against real registries (Debian's docker-registry): HTTPS with a CA made here by
 * openssl (trusted through `ca`, `skip_verify`, Docker's `ca.crt` layout, client certificates),
 * mirrors in front of a registry (the `ns` parameter, falling back to the server on 404 or a dead
 * mirror, push only to endpoints with the capability), `header` tables (registry, mirror and token
 * server), what `plainHttp` changes, and containerd's HTTPS-first default for loopback hosts with
 * a port (one TLS attempt per client and host, seen on the wire through a TCP relay).
 *
 * `0.0.0.0:PORT` serves as a registry host that is not loopback-looking: Linux connects 0.0.0.0 to
 * the local host, so it reaches a registry on 127.0.0.1, yet the client's defaults for it are
 * those of a remote registry (https, verified). The server certificate names both addresses.
 */
import t, { type Test } from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import * as http from 'node:http';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  defaultHosts,
  FetcherError,
  MEDIA_TYPE_OCI_MANIFEST,
  NetworkError,
  NotFoundError,
  RegistryClient,
  type Descriptor,
  type Logger,
  type RegistryClientOptions,
} from '../../fetcher/index.js';
import { startFaultProxy, type FaultProxy } from '../helpers/fault-proxy.js';
import { buildImage, DEFAULT_IMAGE_SPECS, pushImage, type BuiltImage, type PushedImage } from '../helpers/images.js';
import { run, testCacheDir } from '../helpers/layers.js';
import { registryRequest, startRegistry, type Registry, type RegistryConfig, type RegistryTlsOptions } from '../helpers/registry.js';

const unhandled: unknown[] = [];
process.on('unhandledRejection', (reason) => {
  unhandled.push(reason);
});
t.teardown(() => {
  if (unhandled.length > 0) t.fail(`unhandled rejections: ${unhandled.map((e) => String(e)).join('; ')}`);
});

const sha256 = (b: Uint8Array): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

const work = await mkdtemp(join(tmpdir(), 'soci-ts-hosts-integration-'));
t.teardown(() => rm(work, { recursive: true, force: true }));

// ------------------------------------------------------------------- certificates (openssl)

interface Pki {
  dir: string;
  caCert: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
}

/** A CA, a server certificate for 127.0.0.1 and 0.0.0.0 (IP SANs), and a client certificate. */
async function makePki(dir: string): Promise<Pki> {
  await mkdir(dir, { recursive: true });
  const p = (n: string): string => join(dir, n);
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  await run('openssl', [
    'req', '-x509', ...ec, '-keyout', p('ca.key'), '-out', p('ca.crt'), '-days', '2', '-subj', '/CN=soci-ts test CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
  ]);
  const leaf = async (name: string, cn: string, ext: string): Promise<void> => {
    await writeFile(p(`${name}.ext`), ext);
    await run('openssl', ['req', ...ec, '-keyout', p(`${name}.key`), '-out', p(`${name}.csr`), '-subj', `/CN=${cn}`]);
    await run('openssl', [
      'x509', '-req', '-in', p(`${name}.csr`), '-CA', p('ca.crt'), '-CAkey', p('ca.key'), '-CAcreateserial',
      '-out', p(`${name}.crt`), '-days', '2', '-extfile', p(`${name}.ext`),
    ]);
  };
  await leaf('server', '127.0.0.1', 'subjectAltName=IP:127.0.0.1,IP:0.0.0.0\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n');
  await leaf('client', 'soci-ts test client', 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n');
  return { dir, caCert: p('ca.crt'), serverCert: p('server.crt'), serverKey: p('server.key'), clientCert: p('client.crt'), clientKey: p('client.key') };
}

// ------------------------------------------------------------------- a header-recording proxy

interface Recorded {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
}

interface Recorder {
  readonly url: string;
  readonly host: string;
  readonly log: Recorded[];
  /** `http://host:port` of the server requests go to (settable after start). */
  upstream: string;
  close(): Promise<void>;
}

/** A plain reverse proxy on loopback that records each request's method, URL and headers. */
async function startRecorder(upstream = ''): Promise<Recorder> {
  const log: Recorded[] = [];
  const rec = { upstream } as Recorder;
  const server = http.createServer((req, res) => {
    log.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers });
    const target = new URL(req.url ?? '/', rec.upstream);
    const headers = { ...req.headers, host: target.host };
    const up = http.request(target, { method: req.method, headers, agent: false }, (upRes) => {
      res.writeHead(upRes.statusCode ?? 502, upRes.headers);
      upRes.pipe(res);
    });
    up.on('error', () => {
      if (!res.headersSent) res.writeHead(502);
      res.end();
    });
    req.pipe(up);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  Object.assign(rec, {
    url: `http://127.0.0.1:${port}`,
    host: `127.0.0.1:${port}`,
    log,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  });
  return rec;
}

/** A TCP relay on loopback that notes how each connection began: a TLS handshake record (22) or not. */
interface TcpTap {
  readonly host: string;
  /** First byte the client sent on each connection, in order. */
  readonly firstBytes: number[];
  close(): Promise<void>;
}

async function startTcpTap(upstreamPort: number): Promise<TcpTap> {
  const firstBytes: number[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    sockets.add(client);
    const up = net.connect(upstreamPort, '127.0.0.1');
    sockets.add(up);
    client.once('data', (d: Buffer) => firstBytes.push(d[0]!));
    client.pipe(up).pipe(client);
    const kill = (): void => {
      client.destroy();
      up.destroy();
    };
    client.on('error', kill).on('close', kill);
    up.on('error', kill).on('close', kill);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    host: `127.0.0.1:${port}`,
    firstBytes,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** A loopback port nothing listens on. */
async function deadPort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

// ------------------------------------------------------------------- fixtures

const pki = await makePki(join(work, 'pki'));
const serverTls: RegistryTlsOptions = { certFile: pki.serverCert, keyFile: pki.serverKey, caFile: pki.caCert };

const tokenRecorder = await startRecorder();
t.teardown(() => tokenRecorder.close());

const [tlsReg, mtlsReg, plainReg, emptyReg, tokenReg, small] = await Promise.all([
  startRegistry({ tls: serverTls }),
  startRegistry({ tls: { ...serverTls, clientCaFiles: [pki.caCert], clientCertFile: pki.clientCert, clientKeyFile: pki.clientKey } }),
  startRegistry(),
  startRegistry(),
  // Token auth whose realm is the recorder in front of the helper's issuer: token requests are seen.
  startRegistry({
    auth: 'token',
    config: (c: RegistryConfig) => {
      const token = (c.auth as { token: { realm: string } }).token;
      const realm = new URL(token.realm);
      tokenRecorder.upstream = realm.origin;
      token.realm = `${tokenRecorder.url}${realm.pathname}`;
    },
  }),
  buildImage(testCacheDir(), DEFAULT_IMAGE_SPECS.small),
]);
for (const r of [tlsReg, mtlsReg, plainReg, emptyReg, tokenReg]) t.teardown(() => r.stop());

const [onTls, onPlain] = await Promise.all([pushImage(small.layoutDir, small.tag, tlsReg, 'tls/small'), pushImage(small.layoutDir, small.tag, plainReg, 'mirror/small')]);

const dead = `127.0.0.1:${await deadPort()}`;

/** The host as a client sees a remote registry: not loopback, so https and verification by default. */
const remoteAlias = (r: Registry): string => `0.0.0.0:${r.port}`;

const clients: RegistryClient[] = [];
t.teardown(() => Promise.all(clients.map((c) => c.close())));

function client(hostsDir: string, more: Partial<RegistryClientOptions> = {}): RegistryClient {
  const c = new RegistryClient({
    hostsDir,
    // No docker config of this machine's may leak in.
    credentials: { configPath: join(work, 'no-docker-config.json'), env: {} },
    retry: { attempts: 2, baseDelayMs: 10, maxDelayMs: 50 },
    timeouts: { connectMs: 3000, firstByteMs: 10_000, idleMs: 10_000 },
    ...more,
  });
  clients.push(c);
  return c;
}

let dirCount = 0;
/** A fresh certs.d directory holding `files` (paths relative to it). */
async function certsDir(files: Record<string, string | { copyFrom: string }>): Promise<string> {
  const dir = join(work, `certs.d-${++dirCount}`);
  await mkdir(dir, { recursive: true });
  for (const [name, content] of Object.entries(files)) {
    const file = join(dir, name);
    await mkdir(join(file, '..'), { recursive: true });
    if (typeof content === 'string') await writeFile(file, content);
    else await copyFile(content.copyFrom, file);
  }
  return dir;
}

/**
 * Pulls `repo:tag` on `host` through `c`: the manifest (digest as pushed), a range of the
 * first layer (bytes as in the local layout) and the config blob.
 */
async function checkPull(t: Test, c: RegistryClient, host: string, pushed: PushedImage, image: BuiltImage): Promise<void> {
  const repo = c.repository(`${host}/${pushed.repo}:${pushed.tag}`);
  const m = await repo.fetchManifest();
  t.equal(m.descriptor.digest, pushed.manifestDigest, 'manifest digest as pushed');
  const layer = image.layers[image.layers.length - 1]!;
  const desc: Descriptor = { mediaType: layer.mediaType, digest: layer.digest, size: layer.size };
  const offset = Math.floor(layer.size / 3);
  const length = Math.min(4096, layer.size - offset);
  const want = (await readFile(layer.path)).subarray(offset, offset + length);
  t.ok((await repo.readRange(desc, offset, length)).equals(want), `readRange(${offset}, ${length}) equals the layer's bytes`);
  const config = await repo.fetchBlob({ mediaType: 'application/vnd.oci.image.config.v1+json', digest: pushed.configDigest, size: pushed.manifest.config.size });
  t.equal(sha256(config), pushed.configDigest, 'config blob fetched');
}

/** Runs `fn`, which must reject; returns the error and how long it took. */
async function failure(fn: () => Promise<unknown>): Promise<{ err: unknown; ms: number }> {
  const start = Date.now();
  try {
    await fn();
  } catch (err) {
    return { err, ms: Date.now() - start };
  }
  return { err: undefined, ms: Date.now() - start };
}

/** A logger that keeps the messages (e.g. 'retrying'). */
function recordingLogger(lines: string[]): Logger {
  const l: Logger = {
    debug: (m) => void lines.push(m),
    info: (m) => void lines.push(m),
    warn: (m) => void lines.push(m),
    error: (m) => void lines.push(m),
    child: () => l,
  };
  return l;
}

/** A TLS verification failure: typed, explained, prompt, and not retried (retrying cannot help). */
const tlsFailure = (t: Test, r: { err: unknown; ms: number; log: string[] }, what: string): void => {
  t.type(r.err, NetworkError, `${what}: a NetworkError (${String(r.err)})`);
  t.equal(r.log.filter((m) => m === 'retrying').length, 0, `${what}: not retried`);
  t.match(String((r.err as Error | undefined)?.message), /TLS/, `${what}: the message says TLS`);
  t.match(String((r.err as Error | undefined)?.message), /hosts\.toml/, `${what}: the message points at hosts.toml`);
  t.ok(r.ms < 10_000, `${what}: fails promptly (${r.ms} ms)`);
};

// ------------------------------------------------------------------- 1. TLS

t.test('TLS registry, no trust configured: a typed TLS error naming hosts.toml', async (t) => {
  // A registry host that is not loopback: https by default, verified against the system roots only.
  const host = remoteAlias(tlsReg);
  t.equal((await client('').endpoints(host))[0]?.url, `https://${host}/v2`, 'default endpoint is https');
  const log: string[] = [];
  const r = await failure(() => client('', { logger: recordingLogger(log) }).repository(`${host}/tls/small:${onTls.tag}`).fetchManifest());
  tlsFailure(t, { ...r, log }, 'no hosts dir');

  // hosts.toml naming the https server, but no CA.
  const dir = await certsDir({ [`${tlsReg.host}/hosts.toml`]: `server = "https://${tlsReg.host}"\n` });
  const log2: string[] = [];
  const r2 = await failure(() => client(dir, { logger: recordingLogger(log2) }).repository(`${tlsReg.host}/tls/small:${onTls.tag}`).fetchManifest());
  tlsFailure(t, { ...r2, log: log2 }, 'hosts.toml without ca');
});

t.test('TLS registry on loopback with a port and no configuration', async (t) => {
  // The client's default for 127.0.0.1:PORT is plain HTTP with verification skipped. containerd
  // (hosts.go) turns such a host (skip_verify set = TLS configured, port not 80) into "https first,
  // then HTTP" (docker.NewHTTPFallback), so ctr pulls from a self-signed loopback registry. Either
  // that, or a TLS error telling what to configure, is acceptable; an opaque HTTP 400 ("Client
  // sent an HTTP request to an HTTPS server") is not.
  const r = await failure(() => client('').repository(`${tlsReg.host}/tls/small:${onTls.tag}`).fetchManifest());
  if (r.err === undefined) {
    t.pass('pulled over https with verification skipped, as containerd does');
  } else {
    t.type(r.err, NetworkError, `a NetworkError, not ${String(r.err)}`);
    t.match(String((r.err as Error).message), /TLS|HTTPS/i, 'the message says the registry speaks TLS');
    t.ok(r.ms < 10_000, `fails promptly (${r.ms} ms)`);
  }

  // On the wire (a TCP relay in front of the registry, so the host is 127.0.0.1:<relay port>):
  // every connection the client opens is TLS.
  const tap = await startTcpTap(tlsReg.port);
  t.teardown(() => tap.close());
  await checkPull(t, client(''), tap.host, onTls, small);
  t.ok(tap.firstBytes.length > 0 && tap.firstBytes.every((b) => b === 22), `every connection began with a TLS handshake (${tap.firstBytes.join(',')})`);
});

t.test('plain-HTTP registry on loopback with a port and no configuration: HTTPS tried once, then HTTP', async (t) => {
  // containerd's default for 127.0.0.1:PORT (HTTPS first, HTTP fallback) must cost one TLS
  // attempt per client and host, not one per request.
  const tap = await startTcpTap(plainReg.port);
  t.teardown(() => tap.close());
  const c = client('');
  await checkPull(t, c, tap.host, onPlain, small);
  const repo = c.repository(`${tap.host}/${onPlain.repo}:${onPlain.tag}`);
  const layer = small.layers[small.layers.length - 1]!;
  const desc: Descriptor = { mediaType: layer.mediaType, digest: layer.digest, size: layer.size };
  const want = await readFile(layer.path);
  // Concurrent reads far apart (not merged into one request), so several connections open.
  const step = Math.floor(layer.size / 8);
  const reads = await Promise.all(Array.from({ length: 8 }, (_, i) => repo.readRange(desc, i * step, 100)));
  t.ok(reads.every((b, i) => b.equals(want.subarray(i * step, i * step + 100))), '8 concurrent range reads equal the layer bytes');
  await checkPull(t, c, tap.host, onPlain, small);
  const tlsAttempts = tap.firstBytes.filter((b) => b === 22).length;
  t.equal(tlsAttempts, 1, `one TLS attempt in all (connections began with ${tap.firstBytes.join(',')})`);
  t.ok(tap.firstBytes.length >= 2, 'and the requests went over plain HTTP');

  // --plain-http: no TLS attempt at all.
  const tap2 = await startTcpTap(plainReg.port);
  t.teardown(() => tap2.close());
  await checkPull(t, client('', { plainHttp: true }), tap2.host, onPlain, small);
  t.notOk(tap2.firstBytes.includes(22), `--plain-http: no TLS attempt (${tap2.firstBytes.join(',')})`);
});

t.test('TLS registry trusted through hosts.toml ca', async (t) => {
  // Directory named host:port (containerd also accepts it; host_port_ is tried first).
  const dir = await certsDir({ [`${tlsReg.host}/hosts.toml`]: `server = "https://${tlsReg.host}"\nca = "${pki.caCert}"\n` });
  const c = client(dir);
  t.equal((await c.endpoints(tlsReg.host))[0]?.url, `https://${tlsReg.host}/v2`);
  await checkPull(t, c, tlsReg.host, onTls, small);

  // host_port_ directory, a server without scheme (https) and a ca path relative to the directory.
  const dir2 = await certsDir({
    [`127.0.0.1_${tlsReg.port}_/hosts.toml`]: `server = "${tlsReg.host}"\nca = ["my-ca.pem"]\n`,
    [`127.0.0.1_${tlsReg.port}_/my-ca.pem`]: { copyFrom: pki.caCert },
  });
  await checkPull(t, client(dir2), tlsReg.host, onTls, small);

  // The CA on a non-loopback host name (hostname verification against the IP SAN 0.0.0.0).
  const alias = remoteAlias(tlsReg);
  const dir3 = await certsDir({ [`${alias}/hosts.toml`]: `ca = "${pki.caCert}"\n` });
  await checkPull(t, client(dir3), alias, onTls, small);
});

t.test('TLS registry with skip_verify', async (t) => {
  const dir = await certsDir({ [`${tlsReg.host}/hosts.toml`]: `server = "https://${tlsReg.host}"\nskip_verify = true\n` });
  await checkPull(t, client(dir), tlsReg.host, onTls, small);
  const alias = remoteAlias(tlsReg);
  const dir2 = await certsDir({ [`${alias}/hosts.toml`]: `server = "https://${alias}"\nskip_verify = true\n` });
  await checkPull(t, client(dir2), alias, onTls, small);
});

t.test("TLS registry trusted through Docker's ca.crt layout (no hosts.toml)", async (t) => {
  const alias = remoteAlias(tlsReg);
  const dir = await certsDir({ [`${alias}/ca.crt`]: { copyFrom: pki.caCert } });
  await checkPull(t, client(dir), alias, onTls, small);

  // The same on 127.0.0.1:PORT. containerd: a CA configured and a port other than 80 make the
  // default http endpoint try HTTPS first, so this works there.
  const dir2 = await certsDir({ [`127.0.0.1_${tlsReg.port}_/ca.crt`]: { copyFrom: pki.caCert } });
  const c = client(dir2);
  t.equal((await c.endpoints(tlsReg.host))[0]?.caPaths[0], join(dir2, `127.0.0.1_${tlsReg.port}_`, 'ca.crt'), 'ca.crt found');
  const r = await failure(() => checkPull(t, c, tlsReg.host, onTls, small));
  t.equal(r.err, undefined, `loopback host with only a ca.crt pulls over https (${String(r.err)})`);
});

t.test('TLS registry requiring a client certificate', async (t) => {
  const payload = randomBytes(3000);
  const desc: Descriptor = { mediaType: 'application/octet-stream', digest: sha256(payload), size: payload.length };

  const withCert = await certsDir({
    [`${mtlsReg.host}/hosts.toml`]: `server = "https://${mtlsReg.host}"\nca = "${pki.caCert}"\nclient = [["${pki.clientCert}", "${pki.clientKey}"]]\n`,
  });
  const repo = client(withCert).repository(`${mtlsReg.host}/mtls/blob:latest`);
  t.equal(await repo.pushBlob(desc, payload), 'uploaded', 'push with the client certificate');
  t.ok((await repo.fetchBlob(desc)).equals(payload), 'read back');
  t.ok((await repo.readRange(desc, 1000, 100)).equals(payload.subarray(1000, 1100)), 'range read');
  await t.rejects(repo.fetchManifest('nope'), NotFoundError, 'a missing tag is a NotFoundError: the TLS part worked');

  // Docker's layout: ca.crt plus client.cert/client.key.
  const alias = remoteAlias(mtlsReg);
  const legacy = await certsDir({
    [`${alias}/ca.crt`]: { copyFrom: pki.caCert },
    [`${alias}/client.cert`]: { copyFrom: pki.clientCert },
    [`${alias}/client.key`]: { copyFrom: pki.clientKey },
  });
  t.ok((await client(legacy).repository(`${alias}/mtls/blob:latest`).fetchBlob(desc)).equals(payload), "client certificate from Docker's layout");

  // Without the client certificate: refused during the handshake. With TLS 1.3 the server's
  // "certificate required" alert reaches undici only as "other side closed" (UND_ERR_SOCKET), so
  // the message cannot name the cause; typed and prompt is what is asked here.
  const noCert = await certsDir({ [`${mtlsReg.host}/hosts.toml`]: `server = "https://${mtlsReg.host}"\nca = "${pki.caCert}"\n` });
  const r = await failure(() => client(noCert).repository(`${mtlsReg.host}/mtls/blob:latest`).fetchBlob(desc));
  t.type(r.err, NetworkError, `no client certificate: a NetworkError (${String(r.err)})`);
  t.ok(r.ms < 10_000, `fails promptly (${r.ms} ms)`);
});

// ------------------------------------------------------------------- 2. mirrors

const nsOf = (url: string): string | null => new URL(url, 'http://x').searchParams.get('ns');

t.test('a mirror serves pulls for a registry that is down, told ns=<registry>', async (t) => {
  const proxy: FaultProxy = await startFaultProxy({ upstream: plainReg.url, seed: 1, rate: 0, faults: [] });
  t.teardown(() => proxy.close());
  const dir = await certsDir({
    [`${dead}/hosts.toml`]: `[host."http://${proxy.host}"]\n  capabilities = ["pull", "resolve"]\n`,
  });
  const c = client(dir);
  const eps = await c.endpoints(dead);
  t.same(eps.map((e) => e.url), [`http://${proxy.host}/v2`, `http://${dead}/v2`], 'mirror first, then the server');
  await checkPull(t, c, dead, onPlain, small);
  const log = proxy.stats.log;
  t.ok(log.some((r) => r.method === 'GET' && r.url.startsWith(`/v2/mirror/small/manifests/${onPlain.tag}?`)), 'manifest came through the mirror');
  t.ok(log.some((r) => r.method === 'GET' && r.url.includes('/blobs/') && r.range !== undefined), 'range read came through the mirror');
  t.same([...new Set(log.map((r) => nsOf(r.url)))], [dead], `every mirror request carried ns=${dead}`);
});

t.test('a mirror without the image (404) or down: the client falls back to the server', async (t) => {
  const proxy = await startFaultProxy({ upstream: emptyReg.url, seed: 1, rate: 0, faults: [] });
  t.teardown(() => proxy.close());
  const dir = await certsDir({
    [`${plainReg.host}/hosts.toml`]: `server = "http://${plainReg.host}"\n\n[host."http://${proxy.host}"]\n  capabilities = ["pull", "resolve"]\n`,
  });
  await checkPull(t, client(dir), plainReg.host, onPlain, small);
  const log = proxy.stats.log;
  t.ok(log.some((r) => r.url.startsWith(`/v2/mirror/small/manifests/${onPlain.tag}?`)), 'the mirror was asked for the manifest first');
  t.ok(log.some((r) => r.url.includes('/blobs/')), 'and for blobs');
  t.same([...new Set(log.map((r) => nsOf(r.url)))], [plainReg.host], 'with ns=<registry host>');

  // A mirror nobody listens on.
  const dir2 = await certsDir({
    [`${plainReg.host}/hosts.toml`]: `[host."http://${dead}"]\n  capabilities = ["pull", "resolve"]\n`,
  });
  const start = Date.now();
  await checkPull(t, client(dir2), plainReg.host, onPlain, small);
  t.ok(Date.now() - start < 10_000, 'promptly');
});

t.test('hosts.toml headers reach the mirror, the server and the token server', async (t) => {
  const mirror = await startRecorder(emptyReg.url);
  const server = await startRecorder(plainReg.url);
  t.teardown(() => Promise.all([mirror.close(), server.close()]));
  const dir = await certsDir({
    [`${dead}/hosts.toml`]: [
      `server = "http://${server.host}"`,
      '[header]',
      '  X-Soci-Root = "root-value"',
      `[host."http://${mirror.host}"]`,
      '  capabilities = ["pull", "resolve"]',
      `  [host."http://${mirror.host}".header]`,
      '    x-soci-mirror = ["m1", "m2"]',
      '',
    ].join('\n'),
  });
  await checkPull(t, client(dir), dead, onPlain, small);
  t.ok(mirror.log.length > 0 && server.log.length > 0, `both asked (mirror ${mirror.log.length}, server ${server.log.length})`);
  for (const r of mirror.log) {
    t.equal(r.headers['x-soci-mirror'], 'm1, m2', `mirror ${r.method} ${r.url.split('?')[0]}: its header`);
    t.equal(r.headers['x-soci-root'], undefined, 'not the root one');
    t.equal(nsOf(r.url), dead, 'ns');
  }
  for (const r of server.log) {
    t.equal(r.headers['x-soci-root'], 'root-value', `server ${r.method} ${r.url.split('?')[0]}: the root header`);
    t.equal(r.headers['x-soci-mirror'], undefined, "not the mirror's");
  }

  // Token auth: the realm is the token recorder in front of the issuer.
  const creds = tokenReg.credentials!;
  const dir2 = await certsDir({ [`${tokenReg.host}/hosts.toml`]: '[header]\n  x-soci-root = "to-the-token-server-too"\n' });
  const before = tokenRecorder.log.length;
  const c = client(dir2, { credentials: { user: `${creds.username}:${creds.password}`, configPath: join(work, 'no-docker-config.json'), env: {} } });
  await t.rejects(c.repository(`${tokenReg.host}/some/repo:none`).fetchManifest(), NotFoundError, 'authenticated, then 404');
  const seen = tokenRecorder.log.slice(before);
  t.ok(seen.length > 0, 'a token was requested');
  for (const r of seen) t.equal(r.headers['x-soci-root'], 'to-the-token-server-too', 'token request carried the header');
});

t.test('push goes to the server, never to a mirror without the push capability', async (t) => {
  const proxy = await startFaultProxy({ upstream: plainReg.url, seed: 1, rate: 0, faults: [] });
  t.teardown(() => proxy.close());
  const dir = await certsDir({
    [`${plainReg.host}/hosts.toml`]: `[host."http://${proxy.host}"]\n  capabilities = ["pull", "resolve"]\n`,
  });
  const repo = client(dir).repository(`${plainReg.host}/pushed/here:v1`);
  const config = Buffer.from('{}');
  const layer = randomBytes(5000);
  const configDesc: Descriptor = { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256(config), size: config.length };
  const layerDesc: Descriptor = { mediaType: 'application/vnd.oci.image.layer.v1.tar', digest: sha256(layer), size: layer.length };
  t.equal(await repo.pushBlob(configDesc, config), 'uploaded');
  t.equal(await repo.pushBlob(layerDesc, layer, { chunkSize: 2048 }), 'uploaded', 'chunked upload');
  const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MEDIA_TYPE_OCI_MANIFEST, config: configDesc, layers: [layerDesc] }));
  await repo.pushManifest(manifest, MEDIA_TYPE_OCI_MANIFEST, 'v1');
  t.same(proxy.stats.log, [], 'the mirror saw nothing of the push');
  const direct = await registryRequest(plainReg, '/v2/pushed/here/manifests/v1', { headers: { accept: MEDIA_TYPE_OCI_MANIFEST } });
  t.equal(direct.status, 200, 'the server has the manifest');
  t.equal(sha256(direct.body), sha256(manifest), 'as pushed');

  // Pulling it back goes through the mirror.
  t.equal((await repo.fetchManifest('v1')).descriptor.digest, sha256(manifest), 'pulled back');
  t.ok((await repo.readRange(layerDesc, 4000, 1000)).equals(layer.subarray(4000)), 'range read back');
  t.ok(proxy.stats.log.length >= 2 && proxy.stats.log.every((r) => r.method === 'GET' && nsOf(r.url) === plainReg.host), 'pulls via the mirror');

  // No endpoint may push: a typed error, nothing sent.
  const dir2 = await certsDir({ [`${plainReg.host}/hosts.toml`]: `server = "http://${plainReg.host}"\ncapabilities = ["pull", "resolve"]\n` });
  await t.rejects(client(dir2).repository(`${plainReg.host}/pushed/here:v1`).pushBlob(layerDesc, layer), FetcherError, 'no push endpoint: FetcherError');
});

// ------------------------------------------------------------------- 3. plain HTTP

t.test('plainHttp: the default endpoint of a registry without configuration', async (t) => {
  // Documented defaults, without connecting (containerd's hosts.go).
  const d = (host: string, plain = false): { url: string; skipVerify: boolean } => {
    const e = defaultHosts(host, plain ? { defaultScheme: 'http' } : {})[0]!;
    return { url: e.url, skipVerify: e.skipVerify };
  };
  t.same(d('127.0.0.1:5000'), { url: 'http://127.0.0.1:5000/v2', skipVerify: true }, 'loopback with a port: http');
  t.same(d('localhost:5000'), { url: 'http://localhost:5000/v2', skipVerify: true });
  t.same(d('127.0.0.1:443'), { url: 'https://127.0.0.1:443/v2', skipVerify: true }, 'loopback on 443: https, unverified');
  t.same(d('127.0.0.1'), { url: 'https://127.0.0.1/v2', skipVerify: true }, 'loopback without a port: https, unverified');
  t.same(d('127.0.0.1:80'), { url: 'http://127.0.0.1:80/v2', skipVerify: false }, 'loopback on 80: http');
  t.same(d('0.0.0.0:5000'), { url: 'https://0.0.0.0:5000/v2', skipVerify: false }, 'other hosts: https, verified');
  t.same(d('registry.example.com:5000'), { url: 'https://registry.example.com:5000/v2', skipVerify: false });
  t.same(d('127.0.0.1:443', true), { url: 'http://127.0.0.1:443/v2', skipVerify: false }, '--plain-http wins on loopback');
  t.same(d('registry.example.com', true), { url: 'http://registry.example.com/v2', skipVerify: false }, '--plain-http: http');
  t.same(d('docker.io', true), { url: 'https://registry-1.docker.io/v2', skipVerify: false }, 'except Docker Hub');

  // Against a plain registry under a non-loopback name: https fails with a hint, plainHttp works.
  const host = remoteAlias(plainReg);
  const r = await failure(() => client('').repository(`${host}/mirror/small:${onPlain.tag}`).fetchManifest());
  t.type(r.err, NetworkError, `https to a plain-HTTP registry: NetworkError (${String(r.err)})`);
  t.match(String((r.err as Error | undefined)?.message), /plain-http/, 'the message suggests --plain-http');
  t.ok(r.ms < 10_000, `fails promptly (${r.ms} ms)`);
  const plain = client('', { plainHttp: true });
  t.equal((await plain.endpoints(host))[0]?.url, `http://${host}/v2`);
  await checkPull(t, plain, host, onPlain, small);

  // A hosts.toml without server takes the default scheme too; an explicit https server is kept.
  const dir = await certsDir({ [`${host}/hosts.toml`]: '[header]\n  x-anything = "1"\n' });
  await checkPull(t, client(dir, { plainHttp: true }), host, onPlain, small);
  const alias = remoteAlias(tlsReg);
  const dir2 = await certsDir({ [`${alias}/hosts.toml`]: `server = "https://${alias}"\nca = "${pki.caCert}"\n` });
  const c2 = client(dir2, { plainHttp: true });
  t.equal((await c2.endpoints(alias))[0]?.scheme, 'https', 'explicit https server stays https under plainHttp');
  await checkPull(t, c2, alias, onTls, small);
});

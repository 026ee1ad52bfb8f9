/**
 * containerd hosts.toml (certs.d) semantics, read from real files in a temporary directory.
 */
import t from 'tap';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, defaultHosts, FetcherError, loadHosts, readHostsConfig, type HostConfig } from '../../fetcher/index.js';

let root: string;

t.before(async () => {
  root = await mkdtemp(join(tmpdir(), 'soci-ts-hosts-'));
});
t.teardown(() => rm(root, { recursive: true, force: true }));

/** A fresh certs.d directory holding the given files (paths relative to it). */
async function certsDir(files: Record<string, string>): Promise<string> {
  const dir = await mkdtemp(join(root, 'certs.d-'));
  for (const [name, text] of Object.entries(files)) {
    await mkdir(join(dir, name, '..'), { recursive: true });
    await writeFile(join(dir, name), text);
  }
  return dir;
}

const ALL = ['pull', 'resolve', 'push', 'referrers'];

function endpoint(url: string, more: Partial<HostConfig> = {}): HostConfig {
  const m = /^(https?):\/\/([^/]+)(.*)$/.exec(url)!;
  return {
    url,
    scheme: m[1] as 'http' | 'https',
    host: m[2]!,
    path: m[3]!,
    capabilities: ALL as HostConfig['capabilities'],
    skipVerify: false,
    caPaths: [],
    clientCertPairs: [],
    headers: {},
    overridePath: false,
    ...more,
  };
}

t.test('no configuration: the registry itself', async (t) => {
  const empty = await certsDir({});
  t.same(await loadHosts(empty, 'ghcr.io'), [endpoint('https://ghcr.io/v2')]);
  t.same(await loadHosts(undefined, 'ghcr.io'), [endpoint('https://ghcr.io/v2')]);
  t.same(await loadHosts(join(root, 'does-not-exist'), 'docker.io'), [endpoint('https://registry-1.docker.io/v2')]);
  t.same(defaultHosts('registry.example.com:5000'), [endpoint('https://registry.example.com:5000/v2')]);
  // Loopback with a port: plain HTTP, verification skipped (containerd tries HTTPS first, then HTTP).
  t.same(defaultHosts('localhost:5000'), [endpoint('http://localhost:5000/v2', { skipVerify: true })]);
  t.same(defaultHosts('127.0.0.1:80'), [endpoint('http://127.0.0.1:80/v2')]);
  t.same(defaultHosts('localhost'), [endpoint('https://localhost/v2', { skipVerify: true })]);
  t.same(defaultHosts('[::1]:5000'), [endpoint('http://[::1]:5000/v2', { skipVerify: true })]);
  // An explicit default scheme (--plain-http) wins, except for Docker Hub.
  t.same(defaultHosts('registry.example.com', { defaultScheme: 'http' }), [endpoint('http://registry.example.com/v2')]);
  t.same(defaultHosts('docker.io', { defaultScheme: 'http' }), [endpoint('https://registry-1.docker.io/v2')]);
});

t.test('mirrors first, in file order, then the server', async (t) => {
  const dir = await certsDir({
    'docker.io/hosts.toml': `
server = "https://registry-1.docker.io"

[host."https://public-mirror.example.com"]
  capabilities = ["pull"]

[host."http://192.168.31.250:5000/prefix/"]
  capabilities = ["pull", "RESOLVE"]
  skip_verify = true

[host."mirror-no-scheme.example.com"]
  capabilities = ["resolve", "pull", "pull"]

[host."https://mirror-bak.registry/us"]

[host."https://non-compliant.registry/v2/upstream"]
  capabilities = ["pull"]
  override_path = true

[host."https://already.registry/v2"]
`,
  });
  const got = await readHostsConfig(dir, 'docker.io');
  t.equal(got.dir, join(dir, 'docker.io'));
  t.same(got.warnings, []);
  t.same(got.endpoints, [
    endpoint('https://public-mirror.example.com/v2', { capabilities: ['pull'] }),
    endpoint('http://192.168.31.250:5000/prefix/v2', { capabilities: ['pull', 'resolve'], skipVerify: true }),
    endpoint('https://mirror-no-scheme.example.com/v2', { capabilities: ['pull', 'resolve'] }),
    endpoint('https://mirror-bak.registry/us/v2'),
    endpoint('https://non-compliant.registry/v2/upstream', { capabilities: ['pull'], overridePath: true }),
    endpoint('https://already.registry/v2'),
    endpoint('https://registry-1.docker.io/v2'),
  ]);
});

t.test('server replaces the default; root settings apply to it', async (t) => {
  const dir = await certsDir({
    'registry.example.com/hosts.toml': `
server = "registry.example.com:8443"
capabilities = ["pull", "resolve"]
skip_verify = false
ca = "root-ca.pem"
dial_timeout = "1.5s"
`,
    'quay.io/hosts.toml': `
# no server: the registry itself, with these TLS settings; capabilities are all (containerd ignores them here)
capabilities = ["pull"]
skip_verify = true
ca = ["/etc/certs/a.pem", "b.pem"]
override_path = true
`,
  });
  t.same(await loadHosts(dir, 'registry.example.com'), [
    endpoint('https://registry.example.com:8443/v2', {
      capabilities: ['pull', 'resolve'],
      caPaths: [join(dir, 'registry.example.com', 'root-ca.pem')],
      dialTimeoutMs: 1500,
    }),
  ]);
  t.same(await loadHosts(dir, 'quay.io'), [
    endpoint('https://quay.io/v2', { skipVerify: true, caPaths: ['/etc/certs/a.pem', join(dir, 'quay.io', 'b.pem')], overridePath: true }),
  ]);
});

t.test('ca as string and array, client certificates in every form', async (t) => {
  const dir = await certsDir({
    'ghcr.io/hosts.toml': `
[host."https://m1.example"]
  ca = "/etc/certs/mirror.pem"
  client = "/etc/certs/client.pem"
[host."https://m2.example"]
  ca = ["/etc/certs/test-1-ca.pem", "relative/special.pem"]
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"], ["client.pem", ""]]
[host."https://m3.example"]
  client = ["/etc/certs/client-1.pem", "c2.pem"]
`,
  });
  const base = join(dir, 'ghcr.io');
  const got = await loadHosts(dir, 'ghcr.io');
  t.same(
    got.map((h) => ({ url: h.url, caPaths: h.caPaths, clientCertPairs: h.clientCertPairs })),
    [
      { url: 'https://m1.example/v2', caPaths: ['/etc/certs/mirror.pem'], clientCertPairs: [{ certPath: '/etc/certs/client.pem' }] },
      {
        url: 'https://m2.example/v2',
        caPaths: ['/etc/certs/test-1-ca.pem', join(base, 'relative/special.pem')],
        clientCertPairs: [{ certPath: '/etc/certs/client.cert', keyPath: '/etc/certs/client.key' }, { certPath: join(base, 'client.pem') }],
      },
      { url: 'https://m3.example/v2', caPaths: [], clientCertPairs: [{ certPath: '/etc/certs/client-1.pem' }, { certPath: join(base, 'c2.pem') }] },
      { url: 'https://ghcr.io/v2', caPaths: [], clientCertPairs: [] },
    ],
  );
});

t.test('header tables', async (t) => {
  const dir = await certsDir({
    'ghcr.io/hosts.toml': `
[header]
  x-custom-1 = "custom header"
  x-custom-1-2 = "another custom header"

[host."https://mirror.registry"]
  capabilities = ["pull"]
  [host."https://mirror.registry".header]
    x-custom-2 = ["value1", "value2"]
    Authorization = "Bearer not-logged"
    __proto__ = "odd but harmless"
`,
  });
  const [mirror, server] = await loadHosts(dir, 'ghcr.io');
  t.same(Object.entries(mirror!.headers), [
    ['x-custom-2', ['value1', 'value2']],
    ['Authorization', ['Bearer not-logged']],
    ['__proto__', ['odd but harmless']],
  ]);
  t.equal(Object.getPrototypeOf(mirror!.headers), Object.prototype);
  t.same(server!.headers, { 'x-custom-1': ['custom header'], 'x-custom-1-2': ['another custom header'] });
});

t.test('host directories: port forms and the _default fallback', async (t) => {
  const dir = await certsDir({
    '_default/hosts.toml': '[host."https://registry.example.com"]\n  capabilities = ["pull", "resolve"]\n',
    '127.0.0.1:5000/hosts.toml': 'server = "http://127.0.0.1:5000"\n',
    'myregistry.io_5000_/hosts.toml': '[host."https://underscore.example"]\n',
    'myregistry.io:5000/hosts.toml': '[host."https://colon.example"]\n',
    // A host-specific directory replaces _default entirely (no merging), even without hosts.toml.
    'quay.io/README': 'not a certificate',
  });
  t.same(
    (await loadHosts(dir, 'gcr.io')).map((h) => h.url),
    ['https://registry.example.com/v2', 'https://gcr.io/v2'],
    '_default mirror, then the registry itself',
  );
  t.same((await loadHosts(dir, 'docker.io')).map((h) => h.url), ['https://registry.example.com/v2', 'https://registry-1.docker.io/v2']);
  t.same(await loadHosts(dir, '127.0.0.1:5000'), [endpoint('http://127.0.0.1:5000/v2')]);
  t.same(
    (await loadHosts(dir, 'myregistry.io:5000')).map((h) => h.url),
    ['https://underscore.example/v2', 'https://myregistry.io:5000/v2'],
    'host_port_ is looked at before host:port',
  );
  t.same(await loadHosts(dir, 'quay.io'), [endpoint('https://quay.io/v2')]);
  t.equal((await readHostsConfig(dir, 'gcr.io')).dir, join(dir, '_default'));
});

t.test("docker's certificate file layout when there is no hosts.toml", async (t) => {
  const dir = await certsDir({
    'registry.example.com:5000/ca.crt': 'x',
    'registry.example.com:5000/extra.crt': 'x',
    'registry.example.com:5000/client.cert': 'x',
    'registry.example.com:5000/client.key': 'x',
    'registry.example.com:5000/keyless.cert': 'x',
    'registry.example.com:5000/notes.txt': 'x',
    'registry.example.com:5000/sub.crt/inner': 'a directory named like a certificate is skipped',
    // An empty hosts.toml counts as none.
    'empty.example/hosts.toml': '',
    'empty.example/ca.crt': 'x',
  });
  const d = join(dir, 'registry.example.com:5000');
  t.same(await loadHosts(dir, 'registry.example.com:5000'), [
    endpoint('https://registry.example.com:5000/v2', {
      caPaths: [join(d, 'ca.crt'), join(d, 'extra.crt')],
      clientCertPairs: [{ certPath: join(d, 'client.cert'), keyPath: join(d, 'client.key') }, { certPath: join(d, 'keyless.cert') }],
    }),
  ]);
  t.same(await loadHosts(dir, 'empty.example'), [endpoint('https://empty.example/v2', { caPaths: [join(dir, 'empty.example', 'ca.crt')] })]);
});

t.test('unknown keys and shadowed certificate files are warnings', async (t) => {
  const dir = await certsDir({
    'ghcr.io/hosts.toml': `
server = "https://ghcr.io"
proxy = "http://proxy:8080"
[host."https://m.example"]
  capabilites = ["pull"]
  server = "https://nested.example"
`,
    'ghcr.io/ignored.crt': 'x',
  });
  const got = await readHostsConfig(dir, 'ghcr.io');
  const file = join(dir, 'ghcr.io', 'hosts.toml');
  t.same(got.warnings, [
    `${file}: unknown key host."https://m.example"."capabilites" ignored`,
    `${file}: unknown key host."https://m.example"."server" ignored`,
    `${file}: unknown key "proxy" ignored`,
    `${join(dir, 'ghcr.io')}: *.crt/*.cert files ignored because hosts.toml exists (name them with "ca"/"client" instead)`,
  ]);
  t.same(got.endpoints.map((h) => [h.url, h.capabilities]), [
    ['https://m.example/v2', ALL],
    ['https://ghcr.io/v2', ALL],
  ]);
  const seen: string[] = [];
  await loadHosts(dir, 'ghcr.io', { onWarning: (w) => seen.push(w) });
  t.same(seen, got.warnings);
});

t.test('malformed files are ConfigErrors naming the file and line', async (t) => {
  const dir = await certsDir({
    'bad.example/hosts.toml': 'server = "https://bad.example"\n\n[host."https://m"]\n  capabilities = ["pull"\n  skip_verify = true\n',
    'dup.example/hosts.toml': '[header]\nx = "secret-value-1"\nx = "secret-value-2"\n',
  });
  const file = join(dir, 'bad.example', 'hosts.toml');
  const err = await loadHosts(dir, 'bad.example').then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(err instanceof ConfigError && err instanceof FetcherError);
  if (err instanceof ConfigError) {
    t.equal(err.subject, file);
    t.equal(typeof err.line, 'number');
    t.ok(err.line! >= 4 && err.line! <= 5, `line ${err.line}`);
    t.match(err.message, new RegExp(`^${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:${err.line}:\\d+: invalid TOML`));
  }
  const dup = await loadHosts(dir, 'dup.example').then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(dup instanceof ConfigError);
  if (dup instanceof ConfigError) {
    t.equal(dup.line, 3);
    t.notMatch(dup.message, /secret-value/, 'no excerpt of the file in the message');
  }
});

t.test('wrongly typed values are ConfigErrors', async (t) => {
  const cases: Array<[string, RegExp]> = [
    ['[host."https://m"]\ncapabilities = ["pull", "fly"]\n', /unknown capability "fly"/],
    ['capabilities = "pull"\n', /capabilities must be an array of strings/],
    ['skip_verify = "yes"\n', /skip_verify must be a boolean/],
    ['ca = 1\n', /ca must be a string or an array of strings/],
    ['ca = ["a", 2]\n', /ca must be a string or an array of strings/],
    ['client = [["a", "b", "c"]]\n', /client entries must be/],
    ['client = 3\n', /client must be a path/],
    ['header = "x"\n', /header must be a table/],
    ['[header]\nx = 1\n', /header "x" must be a string or an array of strings/],
    ['server = 5\n', /server must be a string/],
    ['server = "ftp://x.example"\n', /must be an http or https URL/],
    ['server = "https://"\n', /no valid host/],
    ['server = "https://user:pw@x.example"\n', /no valid host/],
    ['host = "x"\n', /"host" must be a table/],
    ['[host]\n"https://m" = 1\n', /must be a table/],
    ['[host.""]\n', /has no URL/],
    ['dial_timeout = "soon"\n', /dial_timeout must be a duration/],
    ['override_path = "yes"\n', /override_path must be a boolean/],
  ];
  for (const [text, reason] of cases) {
    const dir = await certsDir({ 'x.example/hosts.toml': text });
    await t.rejects(loadHosts(dir, 'x.example'), reason, JSON.stringify(text));
    await t.rejects(loadHosts(dir, 'x.example'), ConfigError);
    await loadHosts(dir, 'x.example').catch((e: unknown) => t.notMatch(String(e), /pw@/, 'no userinfo in the message'));
  }
  await t.rejects(loadHosts(root, '../etc'), ConfigError, 'a host that is not a host name is refused');
});

/**
 * Image reference parsing against the distribution/reference grammar and docker's normalisation.
 */
import t from 'tap';
import {
  FetcherError,
  InvalidReferenceError,
  isLoopbackHost,
  isPlainHttpByDefault,
  isValidRegistryHost,
  parseReference,
  registryApiHost,
  splitHostPort,
} from '../../fetcher/index.js';

const D = 'sha256:' + 'ab'.repeat(32);
const long255 = 'a'.repeat(255);

interface Valid {
  text: string;
  canonical: string;
  host: string;
  repository: string;
  tag?: string;
  digest?: string;
  familiar: string;
}

const valid: Valid[] = [
  { text: 'ubuntu', canonical: 'docker.io/library/ubuntu:latest', host: 'docker.io', repository: 'library/ubuntu', tag: 'latest', familiar: 'ubuntu' },
  { text: 'ubuntu:22.04', canonical: 'docker.io/library/ubuntu:22.04', host: 'docker.io', repository: 'library/ubuntu', tag: '22.04', familiar: 'ubuntu' },
  { text: 'user/app', canonical: 'docker.io/user/app:latest', host: 'docker.io', repository: 'user/app', tag: 'latest', familiar: 'user/app' },
  { text: 'docker.io/ubuntu', canonical: 'docker.io/library/ubuntu:latest', host: 'docker.io', repository: 'library/ubuntu', tag: 'latest', familiar: 'ubuntu' },
  { text: 'docker.io/library/ubuntu:x', canonical: 'docker.io/library/ubuntu:x', host: 'docker.io', repository: 'library/ubuntu', tag: 'x', familiar: 'ubuntu' },
  { text: 'index.docker.io/ubuntu', canonical: 'docker.io/library/ubuntu:latest', host: 'docker.io', repository: 'library/ubuntu', tag: 'latest', familiar: 'ubuntu' },
  { text: 'index.docker.io/user/app', canonical: 'docker.io/user/app:latest', host: 'docker.io', repository: 'user/app', tag: 'latest', familiar: 'user/app' },
  // Nested paths under library/ keep the prefix in the familiar name.
  { text: 'library/a/b', canonical: 'docker.io/library/a/b:latest', host: 'docker.io', repository: 'library/a/b', tag: 'latest', familiar: 'library/a/b' },
  { text: 'localhost/app', canonical: 'localhost/app:latest', host: 'localhost', repository: 'app', tag: 'latest', familiar: 'localhost/app' },
  { text: 'localhost:5000/app:v1', canonical: 'localhost:5000/app:v1', host: 'localhost:5000', repository: 'app', tag: 'v1', familiar: 'localhost:5000/app' },
  // A single component is always a Docker Hub name, even "localhost" or "localhost:5000" (a tag).
  { text: 'localhost', canonical: 'docker.io/library/localhost:latest', host: 'docker.io', repository: 'library/localhost', tag: 'latest', familiar: 'localhost' },
  { text: 'localhost:5000', canonical: 'docker.io/library/localhost:5000', host: 'docker.io', repository: 'library/localhost', tag: '5000', familiar: 'localhost' },
  { text: '127.0.0.1:5000/ns/app@' + D, canonical: '127.0.0.1:5000/ns/app@' + D, host: '127.0.0.1:5000', repository: 'ns/app', digest: D, familiar: '127.0.0.1:5000/ns/app' },
  { text: '[::1]:5000/app', canonical: '[::1]:5000/app:latest', host: '[::1]:5000', repository: 'app', tag: 'latest', familiar: '[::1]:5000/app' },
  { text: '[fe80::1]/x', canonical: '[fe80::1]/x:latest', host: '[fe80::1]', repository: 'x', tag: 'latest', familiar: '[fe80::1]/x' },
  { text: 'registry.example.com/a/b/c:tag', canonical: 'registry.example.com/a/b/c:tag', host: 'registry.example.com', repository: 'a/b/c', tag: 'tag', familiar: 'registry.example.com/a/b/c' },
  { text: 'my-registry:8443/team/app', canonical: 'my-registry:8443/team/app:latest', host: 'my-registry:8443', repository: 'team/app', tag: 'latest', familiar: 'my-registry:8443/team/app' },
  // Host names may be uppercase; an uppercase first component is taken as a host (docker does the same).
  { text: 'Example.COM/app', canonical: 'Example.COM/app:latest', host: 'Example.COM', repository: 'app', tag: 'latest', familiar: 'Example.COM/app' },
  { text: 'Foo/bar', canonical: 'Foo/bar:latest', host: 'Foo', repository: 'bar', tag: 'latest', familiar: 'Foo/bar' },
  // Tag and digest together: both kept.
  { text: 'ghcr.io/o/r:v1@' + D, canonical: 'ghcr.io/o/r:v1@' + D, host: 'ghcr.io', repository: 'o/r', tag: 'v1', digest: D, familiar: 'ghcr.io/o/r' },
  { text: 'ubuntu@' + D, canonical: 'docker.io/library/ubuntu@' + D, host: 'docker.io', repository: 'library/ubuntu', digest: D, familiar: 'ubuntu' },
  { text: 'a__b/c-d.e_f--g:UPPER_tag.1-x', canonical: 'docker.io/a__b/c-d.e_f--g:UPPER_tag.1-x', host: 'docker.io', repository: 'a__b/c-d.e_f--g', tag: 'UPPER_tag.1-x', familiar: 'a__b/c-d.e_f--g' },
  { text: 'quay.io/x:' + 'T'.repeat(128), canonical: 'quay.io/x:' + 'T'.repeat(128), host: 'quay.io', repository: 'x', tag: 'T'.repeat(128), familiar: 'quay.io/x' },
  { text: 'quay.io/' + long255, canonical: `quay.io/${long255}:latest`, host: 'quay.io', repository: long255, tag: 'latest', familiar: 'quay.io/' + long255 },
  // From distribution/reference's own normalisation tests.
  { text: 'LOCALDOMAIN/debian', canonical: 'LOCALDOMAIN/debian:latest', host: 'LOCALDOMAIN', repository: 'debian', tag: 'latest', familiar: 'LOCALDOMAIN/debian' },
  { text: '192.168.0.1:80', canonical: 'docker.io/library/192.168.0.1:80', host: 'docker.io', repository: 'library/192.168.0.1', tag: '80', familiar: '192.168.0.1' },
  { text: 'docker.io/' + 'ab'.repeat(32), canonical: `docker.io/library/${'ab'.repeat(32)}:latest`, host: 'docker.io', repository: 'library/' + 'ab'.repeat(32), tag: 'latest', familiar: 'ab'.repeat(32) },
  { text: '[fc00:1:2:3:4:5:6:7]:5000/library/debian', canonical: '[fc00:1:2:3:4:5:6:7]:5000/library/debian:latest', host: '[fc00:1:2:3:4:5:6:7]:5000', repository: 'library/debian', tag: 'latest', familiar: '[fc00:1:2:3:4:5:6:7]:5000/library/debian' },
  { text: 'quay.io/0x', canonical: 'quay.io/0x:latest', host: 'quay.io', repository: '0x', tag: 'latest', familiar: 'quay.io/0x' },
];

t.test('valid references', async (t) => {
  for (const v of valid) {
    const ref = parseReference(v.text);
    t.same(
      { canonical: ref.toString(), host: ref.host, repository: ref.repository, tag: ref.tag, digest: ref.digest, familiar: ref.familiarName, name: ref.name },
      { canonical: v.canonical, host: v.host, repository: v.repository, tag: v.tag, digest: v.digest, familiar: v.familiar, name: `${v.host}/${v.repository}` },
      v.text.length > 80 ? `${v.text.slice(0, 80)}…` : v.text,
    );
    // The canonical form parses to itself.
    t.equal(parseReference(ref.toString()).toString(), ref.toString());
  }
});

const invalid: Array<[string, RegExp]> = [
  ['', /at least one component/],
  ['ab'.repeat(32), /64-byte hexadecimal/],
  ['Ubuntu', /must be lowercase/],
  ['user/App', /must be lowercase/],
  ['docker.io/Library/ubuntu', /must be lowercase/],
  ['example.com/Team/app:v1', /must be lowercase/],
  ['a..b', /invalid reference format/],
  ['-a', /invalid reference format/],
  ['a-', /invalid reference format/],
  ['a___b', /invalid reference format/],
  ['a_-b', /invalid reference format/],
  ['docker.io/', /invalid reference format/],
  ['/app', /invalid reference format/],
  ['a//b', /invalid reference format/],
  ['app/', /invalid reference format/],
  ['ubuntu:', /tag must match/],
  ['ubuntu:-x', /tag must match/],
  ['ubuntu:.x', /tag must match/],
  ['ubuntu:a:b', /tag must match/],
  ['ubuntu:' + 'a'.repeat(129), /tag must match/],
  ['quay.io/' + 'a'.repeat(256), /not be more than 255 characters/],
  ['ubuntu@', /bad digest/],
  ['ubuntu:tag@', /bad digest/],
  ['ubuntu@sha256:abc', /bad digest/],
  ['ubuntu@sha512:' + 'ab'.repeat(64), /unsupported digest algorithm "sha512"/],
  ['ubuntu@md5:' + 'ab'.repeat(16), /unsupported digest algorithm "md5"/],
  ['ubuntu@sha256:' + 'AB'.repeat(32), /64 lowercase hexadecimal/],
  ['ubuntu@sha256:' + 'ab'.repeat(33), /64 lowercase hexadecimal/],
  ['host:abc/app', /bad registry host/],
  ['[::1/app', /bad registry host/],
  ['[::1]:/app', /bad registry host/],
  ['under_score.com/app', /bad registry host/],
  ['-host.com/app', /bad registry host/],
  ['https://docker.io/ubuntu', /bad registry host/],
  ['[fc00::1]:5000', /invalid reference format/],
  ['fc00::1:5000/debian', /bad registry host/],
  ['[fe80::1%eth0]:5000/debian', /bad registry host/],
  ['[2001:db8:3:4::192.0.2.33]:5000/debian', /bad registry host/],
  ['____/____', /invalid reference format/],
  [' ubuntu', /invalid reference format/],
  ['ubuntu latest', /invalid reference format/],
];

t.test('invalid references', async (t) => {
  for (const [text, reason] of invalid) {
    const label = text.length > 60 ? `${text.slice(0, 60)}…` : JSON.stringify(text);
    t.throws(() => parseReference(text), reason, label);
    try {
      parseReference(text);
    } catch (err) {
      t.ok(err instanceof InvalidReferenceError && err instanceof FetcherError, `${label}: typed error`);
      if (err instanceof FetcherError) t.match(err.subject, /^reference "/, `${label}: subject names the reference`);
    }
  }
});

t.test('error subject of a huge reference is truncated', async (t) => {
  const text = 'A'.repeat(10_000);
  t.throws(() => parseReference(text), InvalidReferenceError);
  try {
    parseReference(text);
  } catch (err) {
    t.ok(err instanceof Error && err.message.length < 500);
  }
});

t.test('registry hosts', async (t) => {
  t.equal(registryApiHost('docker.io'), 'registry-1.docker.io');
  t.equal(registryApiHost('ghcr.io'), 'ghcr.io');
  t.equal(registryApiHost('localhost:5000'), 'localhost:5000');
  t.ok(isValidRegistryHost('127.0.0.1:5000'));
  t.ok(isValidRegistryHost('[::1]:5000'));
  t.notOk(isValidRegistryHost('../etc'));
  t.notOk(isValidRegistryHost('a/b'));
  t.same(splitHostPort('[::1]:5000'), { hostname: '::1', port: '5000' });
  t.same(splitHostPort('[::1]'), { hostname: '::1', port: undefined });
  t.same(splitHostPort('example.com:443'), { hostname: 'example.com', port: '443' });
  t.same(splitHostPort('example.com'), { hostname: 'example.com' });
});

t.test('loopback and plain HTTP defaults', async (t) => {
  const cases: Array<[string, boolean, boolean]> = [
    // host, loopback, plain HTTP by default
    ['localhost:5000', true, true],
    ['localhost:80', true, true],
    ['localhost', true, false], // no port: containerd uses https (verification skipped)
    ['localhost:443', true, false],
    ['127.0.0.1:5000', true, true],
    ['127.10.20.30:5000', true, true],
    ['127.0.0.1', true, false],
    ['[::1]:5000', true, true],
    ['[0:0:0:0:0:0:0:1]:5000', true, true],
    ['[::ffff:127.0.0.1]:5000', true, true],
    ['[::2]:5000', false, false],
    ['[::]:5000', false, false],
    ['[::ffff:10.0.0.1]:5000', false, false],
    ['127.0.0.256:5000', false, false],
    ['0127.0.0.1:5000', false, false],
    ['10.0.0.1:5000', false, false],
    ['registry.example.com:5000', false, false],
    ['localhost.example.com:5000', false, false],
    ['LOCALHOST:5000', false, false], // containerd compares the name exactly
    ['docker.io', false, false],
  ];
  for (const [host, loopback, plain] of cases) {
    t.equal(isLoopbackHost(host), loopback, `${host} loopback`);
    t.equal(isPlainHttpByDefault(host), plain, `${host} plain http`);
  }
});

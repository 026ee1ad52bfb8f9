/**
 * Registry credentials: --user, docker's config.json (auths, credHelpers, credsStore) and real
 * credential-helper executables speaking the docker-credential-helpers protocol.
 */
import t from 'tap';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import {
  authConfigKey,
  convertToHostname,
  CredentialsError,
  dockerConfigPath,
  FetcherError,
  parseUserOption,
  redact,
  resolveCredentials,
  runCredentialHelper,
  type Credentials,
} from '../../fetcher/index.js';

let root: string;
let binDir: string;
let env: NodeJS.ProcessEnv;

const b64 = (s: string): string => Buffer.from(s).toString('base64');

/** Helpers as real executables. They log what they were asked to $root/asked.log. */
const helpers: Record<string, string> = {
  // Answers from the server URL read on stdin (sent without a newline, as docker does).
  fake: `#!/bin/sh
[ "$1" = get ] || { echo "unsupported action $1"; exit 2; }
url=$(cat)
printf '%s\\n' "$url" >> "$ASKED_LOG"
case "$url" in
  https://index.docker.io/v1/) printf '{"ServerURL":"%s","Username":"<token>","Secret":"hub-refresh-token"}\\n' "$url" ;;
  registry.example.com:5000) printf '{"ServerURL":"%s","Username":"alice","Secret":"s3cret-from-helper"}' "$url" ;;
  empty.example) printf '{"ServerURL":"%s","Username":"","Secret":""}' "$url" ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
`,
  store: `#!/bin/sh
url=$(cat)
printf '{"Username":"store-user","Secret":"store-s3cret"}'
`,
  hang: `#!/bin/sh
exec sleep 30
`,
  fail: `#!/bin/sh
cat > /dev/null
echo "error getting credentials - err: exit status 1, out: keychain locked"
exit 1
`,
  failstderr: `#!/bin/sh
echo "helper crashed on stderr" >&2
exit 3
`,
  garbage: `#!/bin/sh
cat > /dev/null
echo "hello, here is s3cret-garbage"
`,
  notobject: `#!/bin/sh
echo '["s3cret-array"]'
`,
  badtypes: `#!/bin/sh
echo '{"Username": 1, "Secret": "s3cret-typed"}'
`,
  noexec: `#!/bin/sh
echo '{}'
`,
};

t.before(async () => {
  root = await mkdtemp(join(tmpdir(), 'soci-ts-creds-'));
  binDir = join(root, 'bin');
  await mkdir(binDir);
  for (const [name, script] of Object.entries(helpers)) {
    const file = join(binDir, `docker-credential-${name}`);
    await writeFile(file, script);
    await chmod(file, name === 'noexec' ? 0o644 : 0o755);
  }
  env = { PATH: `${binDir}${delimiter}${process.env['PATH'] ?? '/usr/bin:/bin'}`, HOME: root, ASKED_LOG: join(root, 'asked.log') };
});
t.teardown(() => rm(root, { recursive: true, force: true }));

/** Writes a config.json in a fresh directory and returns its path. */
async function config(doc: unknown): Promise<string> {
  const dir = await mkdtemp(join(root, 'docker-'));
  const path = join(dir, 'config.json');
  await writeFile(path, typeof doc === 'string' ? doc : JSON.stringify(doc, null, 2));
  return path;
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => undefined,
    (e: unknown) => e,
  );
}

t.test('keys and paths', async (t) => {
  t.equal(authConfigKey('docker.io'), 'https://index.docker.io/v1/');
  t.equal(authConfigKey('index.docker.io'), 'https://index.docker.io/v1/');
  t.equal(authConfigKey('registry-1.docker.io'), 'https://index.docker.io/v1/');
  t.equal(authConfigKey('ghcr.io'), 'ghcr.io');
  t.equal(authConfigKey('localhost:5000'), 'localhost:5000');
  t.equal(convertToHostname('https://registry.example.com:5000/v2/'), 'registry.example.com:5000');
  t.equal(convertToHostname('http://registry.example.com'), 'registry.example.com');
  t.equal(convertToHostname('https://index.docker.io/v1/'), 'index.docker.io');
  t.equal(convertToHostname('registry.example.com/some/path'), 'registry.example.com');
  t.equal(convertToHostname('registry.example.com:5000'), 'registry.example.com:5000');
  t.equal(convertToHostname('https://[::1]:5000/v2/'), '[::1]:5000');
  t.equal(dockerConfigPath({ DOCKER_CONFIG: '/etc/dc', HOME: '/home/x' }), '/etc/dc/config.json');
  t.equal(dockerConfigPath({ HOME: '/home/x' }), '/home/x/.docker/config.json');
});

t.test('--user', async (t) => {
  t.same(parseUserOption('alice:pa:ss'), { username: 'alice', password: 'pa:ss' });
  t.same(parseUserOption('alice:'), { username: 'alice', password: '' });
  t.throws(() => parseUserOption('alice'), CredentialsError);
  t.throws(() => parseUserOption(':secret-only'), CredentialsError);
  try {
    parseUserOption(':secret-only');
  } catch (err) {
    t.notMatch(String(err), /secret-only/);
  }
  // Wins over a config file that has something else.
  const path = await config({ auths: { 'ghcr.io': { auth: b64('bob:pw') } } });
  t.same(await resolveCredentials('ghcr.io', { user: 'alice:pw2', configPath: path, env }), { username: 'alice', password: 'pw2' });
});

t.test('auths entries', async (t) => {
  const path = await config({
    auths: {
      'https://index.docker.io/v1/': { auth: b64('hubuser:hubpass') },
      'registry.example.com:5000': { username: 'plain', password: 'plainpass' },
      'https://legacy.example.com/v1/': { auth: b64('legacy:legacypass\0\0') },
      'http://insecure.example:8080': { auth: b64('ins:inspass') },
      'token.example': { identitytoken: 'refresh-token-value', auth: b64('u:p') },
      'Mixed.Case.example': { Username: 'mc', Password: 'mcpass' },
      'empty.example': {},
      'ghcr.io': { auth: '', email: 'x@example.com' },
    },
  });
  const get = (host: string): Promise<Credentials | undefined> => resolveCredentials(host, { configPath: path, env });
  t.same(await get('docker.io'), { username: 'hubuser', password: 'hubpass' });
  t.same(await get('index.docker.io'), { username: 'hubuser', password: 'hubpass' });
  t.same(await get('registry.example.com:5000'), { username: 'plain', password: 'plainpass' });
  t.same(await get('legacy.example.com'), { username: 'legacy', password: 'legacypass' }, 'URL key reduced to the host; NULs trimmed');
  t.same(await get('insecure.example:8080'), { username: 'ins', password: 'inspass' });
  t.same(await get('token.example'), { identityToken: 'refresh-token-value' });
  t.same(await get('Mixed.Case.example'), { username: 'mc', password: 'mcpass' }, 'field names match case-insensitively');
  t.equal(await get('empty.example'), undefined);
  t.equal(await get('ghcr.io'), undefined);
  t.equal(await get('registry.example.com'), undefined, 'the port is part of the key');
  t.equal(await get('quay.io'), undefined);
});

t.test('Docker Hub under other spellings of its key', async (t) => {
  const path = await config({ auths: { 'index.docker.io': { auth: b64('u1:p1') } } });
  t.same(await resolveCredentials('docker.io', { configPath: path, env }), { username: 'u1', password: 'p1' });
  const path2 = await config({ auths: { 'https://registry-1.docker.io/v2/': { auth: b64('u2:p2') } } });
  t.same(await resolveCredentials('docker.io', { configPath: path2, env }), { username: 'u2', password: 'p2' });
});

t.test('where the config file is', async (t) => {
  const dir = await mkdtemp(join(root, 'dc-'));
  await writeFile(join(dir, 'config.json'), JSON.stringify({ auths: { 'ghcr.io': { auth: b64('envuser:envpass') } } }));
  t.same(await resolveCredentials('ghcr.io', { env: { ...env, DOCKER_CONFIG: dir } }), { username: 'envuser', password: 'envpass' });
  const home = await mkdtemp(join(root, 'home-'));
  await mkdir(join(home, '.docker'));
  await writeFile(join(home, '.docker', 'config.json'), JSON.stringify({ auths: { 'ghcr.io': { auth: b64('homeuser:homepass') } } }));
  t.same(await resolveCredentials('ghcr.io', { env: { ...env, HOME: home } }), { username: 'homeuser', password: 'homepass' });
  t.equal(await resolveCredentials('ghcr.io', { configPath: join(root, 'missing', 'config.json'), env }), undefined, 'no file: anonymous');
  t.equal(await resolveCredentials('ghcr.io', { configPath: await config(''), env }), undefined, 'empty file: anonymous');
});

t.test('malformed config files never leak secrets', async (t) => {
  const cases: Array<[unknown, RegExp]> = [
    ['{\n  "auths": {\n    "ghcr.io": { "auth": "c2VjcmV0LXZhbHVl" ,, }\n  }\n}\n', /not valid JSON at line 3/],
    ['[1]', /must be a JSON object/],
    [{ auths: 'secret-value' }, /auths must be an object/],
    [{ auths: { 'ghcr.io': 'secret-value' } }, /auths\["ghcr.io"\] must be an object/],
    [{ auths: { 'ghcr.io': { auth: 'secret-value!' } } }, /auths\["ghcr.io"\].auth is not valid base64/],
    [{ auths: { 'ghcr.io': { auth: b64('secret-value') } } }, /must encode user:password/],
    [{ auths: { 'ghcr.io': { auth: b64(':secret-value') } } }, /must encode user:password/],
    [{ auths: { 'ghcr.io': { password: 12345 } } }, /password must be a string/],
    [{ credHelpers: 'secret-value' }, /credHelpers must be an object/],
    [{ credsStore: 1 }, /credsStore must be a string/],
    [{ credHelpers: { 'ghcr.io': 7 } }, /must be a string/],
  ];
  for (const [doc, reason] of cases) {
    const path = await config(doc);
    const err = await rejection(resolveCredentials('ghcr.io', { configPath: path, env }));
    t.ok(err instanceof CredentialsError && err instanceof FetcherError, `${reason}: typed`);
    t.match(String(err), reason);
    if (err instanceof CredentialsError) t.equal(err.subject, path, 'names the file');
    t.notMatch(String(err), /secret-value|c2VjcmV0/, 'no secret in the message');
    t.notMatch(String((err as Error).cause ?? ''), /secret-value|c2VjcmV0/, 'no secret in the cause');
  }
});

t.test('credential helpers: the real protocol', async (t) => {
  const path = await config({
    auths: { 'registry.example.com:5000': { auth: b64('fileuser:filepass') }, 'https://index.docker.io/v1/': {} },
    credHelpers: { 'registry.example.com:5000': 'fake', 'https://index.docker.io/v1/': 'fake', 'empty.example': 'fake', 'none.example': 'fake' },
  });
  const get = (host: string): Promise<Credentials | undefined> => resolveCredentials(host, { configPath: path, env });
  t.same(await get('registry.example.com:5000'), { username: 'alice', password: 's3cret-from-helper' }, 'helper wins over auths');
  t.same(await get('docker.io'), { identityToken: 'hub-refresh-token' }, '<token> username means an identity token');
  t.equal(await get('empty.example'), undefined, 'empty answer: anonymous');
  t.equal(await get('none.example'), undefined, '"credentials not found" is not an error');
  t.equal(await get('ghcr.io'), undefined, 'no helper for this host and no credsStore: auths only');

  const asked = (await readFile(join(root, 'asked.log'), 'utf8')).trim().split('\n');
  t.same(asked, ['registry.example.com:5000', 'https://index.docker.io/v1/', 'empty.example', 'none.example'], 'server URLs sent on stdin');
});

t.test('credsStore', async (t) => {
  const path = await config({
    auths: { 'ghcr.io': { auth: b64('fileuser:filepass') } },
    credsStore: 'store',
    credHelpers: { 'registry.example.com:5000': 'fake' },
  });
  t.same(await resolveCredentials('ghcr.io', { configPath: path, env }), { username: 'store-user', password: 'store-s3cret' }, 'the store, not auths');
  t.same(await resolveCredentials('registry.example.com:5000', { configPath: path, env }), { username: 'alice', password: 's3cret-from-helper' }, 'credHelpers before credsStore');
});

t.test('failing helpers are CredentialsErrors', async (t) => {
  const cases: Array<[string, RegExp]> = [
    ['missing', /docker-credential-missing: credential helper not found in PATH/],
    ['noexec', /not executable/],
    ['fail', /exited with status 1: error getting credentials - err: exit status 1, out: keychain locked/],
    ['failstderr', /exited with status 3: helper crashed on stderr/],
    ['garbage', /not a JSON object/],
    ['notobject', /not a JSON object/],
    ['badtypes', /needs string "Username" and "Secret"/],
    ['../../bin/sh', /invalid credential helper name/],
  ];
  for (const [helper, reason] of cases) {
    const path = await config({ credsStore: helper });
    const err = await rejection(resolveCredentials('ghcr.io', { configPath: path, env }));
    t.ok(err instanceof CredentialsError, `${helper}: typed`);
    t.match(String(err), reason, helper);
    t.notMatch(String(err), /s3cret/, `${helper}: nothing the helper printed as an answer`);
  }
});

t.test('a hanging helper times out', async (t) => {
  const started = Date.now();
  const err = await rejection(runCredentialHelper('hang', 'ghcr.io', { env, timeoutMs: 300 }));
  const took = Date.now() - started;
  t.ok(err instanceof CredentialsError);
  t.match(String(err), /docker-credential-hang: credential helper timed out after 300 ms/);
  t.ok(took >= 250 && took < 5000, `returned after ${took} ms`);
  // Through the config too.
  const path = await config({ credHelpers: { 'ghcr.io': 'hang' } });
  await t.rejects(resolveCredentials('ghcr.io', { configPath: path, env, helperTimeoutMs: 200 }), /timed out after 200 ms/);
});

t.test('redact', async (t) => {
  t.equal(redact(undefined), 'anonymous');
  t.equal(redact({ username: 'alice', password: 's3cret' }), 'user "alice" with password (redacted)');
  t.equal(redact({ identityToken: 's3cret-token' }), 'identity token (redacted)');
  t.notMatch(redact({ username: 'alice', password: 's3cret' }), /s3cret|6/);
});

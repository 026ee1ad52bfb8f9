/**
 * The registry harness itself: a real docker-registry with no auth, basic auth and token
 * auth; images built with umoci and pushed with skopeo; and nothing left running afterwards.
 */
import t from 'tap';
import { open, readdir, readFile, stat } from 'node:fs/promises';
import { defaultImages, MEDIA_TYPES, pushImage, type DefaultImages } from './helpers/images.js';
import { CommandError, hasCommand } from './helpers/layers.js';
import {
  fetchToken,
  httpRequest,
  parseChallenge,
  registryRequest,
  RegistryError,
  skopeoCopy,
  startRegistry,
  TokenError,
  type Registry,
} from './helpers/registry.js';

const started: Registry[] = [];
const track = (r: Registry): Registry => (started.push(r), r);
const ms = (since: number): string => `${((performance.now() - since) / 1000).toFixed(1)} s`;

async function headBytes(file: string, start: number, length: number): Promise<Buffer> {
  const fh = await open(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, start);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** State letter of /proc/PID/stat, or undefined when the process is gone. */
async function procState(pid: number): Promise<string | undefined> {
  try {
    const s = await readFile(`/proc/${pid}/stat`, 'utf8');
    return s.slice(s.lastIndexOf(')') + 2).split(' ')[0];
  } catch {
    return undefined;
  }
}

/** Every pid whose process group is `pgid`. */
async function groupMembers(pgid: number): Promise<number[]> {
  const out: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const s = await readFile(`/proc/${name}/stat`, 'utf8');
      const fields = s.slice(s.lastIndexOf(')') + 2).split(' ');
      if (Number(fields[2]) === pgid) out.push(Number(name));
    } catch {
      // exited meanwhile
    }
  }
  return out;
}

const missing: string[] = [];
for (const cmd of ['docker-registry', 'skopeo', 'umoci', 'htpasswd', 'openssl']) if (!(await hasCommand(cmd))) missing.push(cmd);
if (missing.length > 0) {
  t.plan(0, `not installed: ${missing.join(', ')} (scripts/setup installs them)`);
} else {
  let images: DefaultImages;
  let imagesTime = '';
  t.before(async () => {
    const t0 = performance.now();
    images = await defaultImages();
    imagesTime = ms(t0);
  });

  t.test('auth none: push the multi image, manifest and ranged blob reads', async (t) => {
    const t0 = performance.now();
    const reg = track(await startRegistry());
    t.teardown(() => reg.stop());
    t.comment(`default images ready in ${imagesTime}; registry up in ${ms(t0)} on ${reg.host}`);
    t.match(reg.host, /^127\.0\.0\.1:\d+$/);
    t.equal(reg.url, `http://${reg.host}`);
    t.equal(reg.auth, 'none');
    t.equal(reg.credentials, undefined);
    t.ok((await stat(reg.rootDir)).isDirectory(), 'rootDir exists while running');

    const v2 = await httpRequest(`${reg.url}/v2/`);
    t.equal(v2.status, 200, 'GET /v2/ is 200');

    const local = images.multi;
    t.ok(local.layers.length >= 4, 'multi has at least 4 layers');
    t.same(
      local.layers.map((l) => l.mediaType),
      [MEDIA_TYPES.layerGzip, MEDIA_TYPES.layerGzip, MEDIA_TYPES.layerGzip, MEDIA_TYPES.layerTar],
      'busybox, big, tiny gzip layers and one plain tar',
    );
    const big = local.layers[1];
    t.ok(big !== undefined && big.size > 10 << 20, `big layer is over the 10 MiB min layer size (${big?.size})`);
    const plain = local.layers[3];
    t.equal(plain?.digest, plain?.diffId, 'a plain tar layer digest is its diff_id');

    const t1 = performance.now();
    const pushed = await pushImage(local.layoutDir, local.tag, reg, 'test/multi');
    t.comment(`pushed multi (${local.layers.reduce((a, l) => a + l.size, 0)} bytes) in ${ms(t1)}`);
    t.equal(pushed.ref, `${reg.host}/test/multi:${local.tag}`);
    t.equal(pushed.manifestDigest, local.manifestDigest, 'skopeo kept the manifest byte-identical');
    t.equal(pushed.configDigest, local.configDigest);
    t.same(
      pushed.layers,
      local.layers.map((l) => ({ digest: l.digest, size: l.size, mediaType: l.mediaType })),
      'registry serves the layout layers',
    );

    const byDigest = await registryRequest(reg, `/v2/test/multi/manifests/${pushed.manifestDigest}`, { headers: { accept: MEDIA_TYPES.manifest } });
    t.equal(byDigest.status, 200, 'manifest by digest');
    t.equal(byDigest.headers['content-type'], MEDIA_TYPES.manifest);
    t.equal(byDigest.headers['docker-content-digest'], pushed.manifestDigest);
    t.ok(byDigest.body.equals(await readFile(`${local.layoutDir}/blobs/sha256/${local.manifestDigest.slice(7)}`)), 'manifest bytes equal the layout blob');

    const tags = await registryRequest(reg, '/v2/test/multi/tags/list');
    t.same(JSON.parse(tags.body.toString()), { name: 'test/multi', tags: [local.tag] });

    for (const [i, l] of local.layers.entries()) {
      const head = await registryRequest(reg, `/v2/test/multi/blobs/${l.digest}`, { method: 'HEAD' });
      t.equal(head.status, 200, `HEAD layer ${i}`);
      t.equal(Number(head.headers['content-length']), l.size, `layer ${i} Content-Length`);
      t.equal(head.headers['docker-content-digest'], l.digest);

      const ranged = await registryRequest(reg, `/v2/test/multi/blobs/${l.digest}`, { headers: { range: 'bytes=0-99' } });
      const want = Math.min(100, l.size);
      t.equal(ranged.status, 206, `layer ${i} Range 0-99 is 206`);
      t.equal(ranged.headers['content-range'], `bytes 0-${want - 1}/${l.size}`, `layer ${i} Content-Range`);
      t.ok(ranged.body.equals(await headBytes(l.path, 0, want)), `layer ${i} first bytes equal the layout blob`);
    }
    // A range in the middle of the big layer, as a lazy fetcher asks for spans.
    if (big !== undefined) {
      const start = Math.floor(big.size / 2);
      const res = await registryRequest(reg, `/v2/test/multi/blobs/${big.digest}`, { headers: { range: `bytes=${start}-${start + 65535}` } });
      t.equal(res.status, 206);
      t.equal(res.headers['content-range'], `bytes ${start}-${start + 65535}/${big.size}`);
      t.ok(res.body.equals(await headBytes(big.path, start, 65536)), '64 KiB from the middle of the big layer match');
    }
  });

  t.test('auth basic: challenge, push with and without credentials', async (t) => {
    const reg = track(await startRegistry({ auth: 'basic', users: { alice: 'wonderland', bob: 'builder' } }));
    t.teardown(() => reg.stop());
    t.same(reg.credentials, { username: 'alice', password: 'wonderland' }, 'credentials are the first user');

    const anon = await httpRequest(`${reg.url}/v2/`);
    t.equal(anon.status, 401, 'anonymous /v2/ is 401');
    const ch = parseChallenge(anon.headers['www-authenticate'] as string | undefined);
    t.equal(ch?.scheme, 'Basic');
    t.equal(ch?.params.realm, 'soci-ts-test');
    t.equal((await registryRequest(reg, '/v2/')).status, 200, 'with credentials: 200');
    t.equal((await registryRequest(reg, '/v2/', { creds: { username: 'bob', password: 'builder' } })).status, 200, 'second user too');
    t.equal((await registryRequest(reg, '/v2/', { creds: { username: 'alice', password: 'nope' } })).status, 401, 'wrong password: 401');

    const small = images.small;
    await t.rejects(
      skopeoCopy(small.ociRef, `docker://${reg.host}/test/small:${small.tag}`),
      CommandError,
      'skopeo push without credentials fails',
    );
    const pushed = await pushImage(small.layoutDir, small.tag, reg, 'test/small');
    t.equal(pushed.manifestDigest, small.manifestDigest, 'push with credentials works');
    const blob = await registryRequest(reg, `/v2/test/small/blobs/${small.layers[0]?.digest ?? ''}`, { headers: { range: 'bytes=0-99' } });
    t.equal(blob.status, 206);
  });

  t.test('auth token: challenge, token from the realm, Bearer reads, skopeo push', async (t) => {
    const reg = track(await startRegistry({ auth: 'token' }));
    t.teardown(() => reg.stop());
    const issuer = reg.issuer;
    if (issuer === undefined) throw new Error('token registry without an issuer');
    const creds = reg.credentials;
    if (creds === undefined) throw new Error('token registry without credentials');

    const anon = await httpRequest(`${reg.url}/v2/`);
    t.equal(anon.status, 401);
    const ch = parseChallenge(anon.headers['www-authenticate'] as string | undefined);
    t.equal(ch?.scheme, 'Bearer');
    t.equal(ch?.params.realm, issuer.realm, 'challenge names the realm');
    t.equal(ch?.params.service, issuer.service, 'and the service');
    t.match(String(anon.headers['www-authenticate']), /^Bearer realm="[^"]+",service="[^"]+"/);

    const small = images.small;
    const before = reg.tokenRequests;
    const pushed = await pushImage(small.layoutDir, small.tag, reg, 'test/small');
    t.equal(pushed.manifestDigest, small.manifestDigest, 'skopeo push through the token flow');
    t.ok(reg.tokenRequests > before, `skopeo and the read-back asked the issuer (${reg.tokenRequests - before} requests)`);
    t.ok(issuer.requests.some((r) => r.user === creds.username && r.scopes.includes('repository:test/small:pull,push') && r.status === 200), 'a pull,push grant for the repo');

    const manifestPath = `/v2/test/small/manifests/${small.tag}`;
    const noToken = await httpRequest(`${reg.url}${manifestPath}`, { headers: { accept: MEDIA_TYPES.manifest } });
    t.equal(noToken.status, 401);
    const mch = parseChallenge(noToken.headers['www-authenticate'] as string | undefined);
    t.equal(mch?.params.scope, 'repository:test/small:pull', 'manifest challenge names the pull scope');

    const tok = await fetchToken(issuer.realm, { service: issuer.service, scope: 'repository:test/small:pull,push' }, creds);
    t.equal(tok.token, tok.access_token);
    t.ok(tok.expires_in > 0 && !Number.isNaN(Date.parse(tok.issued_at)), 'expires_in and issued_at');
    const [h, p] = tok.token.split('.').slice(0, 2).map((s) => JSON.parse(Buffer.from(s, 'base64url').toString('utf8')) as Record<string, unknown>);
    t.ok(h !== undefined && Array.isArray(h.x5c), 'JWT header carries x5c');
    t.same(p?.access, [{ type: 'repository', name: 'test/small', actions: ['pull', 'push'] }]);

    const withToken = await httpRequest(`${reg.url}${manifestPath}`, { headers: { accept: MEDIA_TYPES.manifest, authorization: `Bearer ${tok.token}` } });
    t.equal(withToken.status, 200, 'GET manifest with Bearer token');
    t.equal(withToken.headers['docker-content-digest'], small.manifestDigest);

    // The registry really checks the token: a grant for another repo, a bad signature.
    const other = await fetchToken(issuer.realm, { service: issuer.service, scope: 'repository:test/other:pull' }, creds);
    t.equal((await httpRequest(`${reg.url}${manifestPath}`, { headers: { accept: MEDIA_TYPES.manifest, authorization: `Bearer ${other.token}` } })).status, 401, 'token for another repo: 401');
    const forged = tok.token.slice(0, -4) + (tok.token.endsWith('AAAA') ? 'BBBB' : 'AAAA');
    t.equal((await httpRequest(`${reg.url}${manifestPath}`, { headers: { accept: MEDIA_TYPES.manifest, authorization: `Bearer ${forged}` } })).status, 401, 'bad signature: 401');
    // The libtrust-style kid header works with this registry as well.
    issuer.options.keyHeader = 'kid';
    const kidTok = await fetchToken(issuer.realm, { service: issuer.service, scope: 'repository:test/small:pull' }, creds);
    const kidRes = await httpRequest(`${reg.url}${manifestPath}`, { headers: { accept: MEDIA_TYPES.manifest, authorization: `Bearer ${kidTok.token}` } });
    t.equal(kidRes.status, 200, 'kid-signed token: 200');
    issuer.options.keyHeader = 'x5c';

    const noCreds = await fetchToken(issuer.realm, { service: issuer.service, scope: 'repository:test/small:pull' }).catch((e: unknown) => e);
    t.ok(noCreds instanceof TokenError && noCreds.status === 401, 'no credentials: 401, no token');
    await t.rejects(fetchToken(issuer.realm, { scope: 'repository:test/small:pull' }, { username: creds.username, password: 'wrong' }), TokenError);
    await t.rejects(
      skopeoCopy(small.ociRef, `docker://${reg.host}/test/nocreds:${small.tag}`),
      CommandError,
      'skopeo push without credentials fails',
    );

    issuer.options.fail = true;
    const failed = await fetchToken(issuer.realm, { scope: 'repository:test/small:pull' }, creds).catch((e: unknown) => e);
    t.ok(failed instanceof TokenError && failed.status === 500, 'fail option: 500');
    issuer.options.fail = false;
  });

  t.test('a registry that cannot start reports its log', async (t) => {
    const err = await startRegistry({
      config: (c) => {
        c.storage = { nosuchdriver: {} };
      },
    }).then(
      (r) => (track(r), undefined),
      (e: unknown) => e,
    );
    t.ok(err instanceof RegistryError, 'RegistryError');
    t.match((err as Error).message, /exited/);
    t.match((err as RegistryError).log, /nosuchdriver/, 'the log names the problem');
  });

  t.test('everything stops', async (t) => {
    t.ok(started.length >= 3, `${started.length} registries were started`);
    await Promise.all(started.map((r) => r.stop()));
    await Promise.all(started.map((r) => r.stop())); // idempotent
    for (const r of started) {
      t.equal(r.running, false);
      t.equal(await procState(r.pid), undefined, `registry pid ${r.pid} is gone (not even a zombie)`);
      t.same(await groupMembers(r.pid), [], `nothing left in process group ${r.pid}`);
      t.equal(await procState(r.watchdogPid), undefined, `watchdog ${r.watchdogPid} is gone`);
      await t.rejects(stat(r.rootDir), { code: 'ENOENT' }, 'rootDir removed');
      await t.rejects(httpRequest(`${r.url}/v2/`, { timeoutMs: 1000 }), 'port no longer answers');
    }
  });
}

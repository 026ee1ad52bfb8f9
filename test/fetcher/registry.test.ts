/**
 * The registry client against a real registry (Debian's docker-registry, distribution 2.8) with
 * no auth, basic auth and token auth. The oracles are independent of the client: what skopeo
 * pushed and what `skopeo inspect --raw` shows, the registry's own answers (registryRequest) and
 * access log, the OCI layout's blob files, and sha256sum.
 */
import t, { type Test } from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  AuthError,
  FetcherError,
  IntegrityError,
  jsonLogger,
  MEDIA_TYPE_DOCKER_LAYER_GZIP,
  MEDIA_TYPE_DOCKER_MANIFEST,
  MEDIA_TYPE_OCI_EMPTY,
  MEDIA_TYPE_OCI_INDEX,
  MEDIA_TYPE_OCI_MANIFEST,
  NotFoundError,
  referrersTag,
  RegistryClient,
  RegistryError,
  selectManifests,
  type Descriptor,
  type RegistryClientOptions,
} from '../../fetcher/index.js';
import { buildSociIndex, EMPTY_CONFIG_BYTES, MEDIA_TYPE_SOCI_INDEX_V1 } from '../../ztoc/soci-index.js';
import { defaultImages, pushImage, type BuiltImage, type DefaultImages, type PushedImage } from '../helpers/images.js';
import { hasCommand, run } from '../helpers/layers.js';
import { registryRequest, skopeoCopy, startRegistry, type Registry, type RegistryAuth } from '../helpers/registry.js';

const sha256 = (b: Uint8Array): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;
const MODES: readonly RegistryAuth[] = ['none', 'basic', 'token'];
const FAST_RETRY = { attempts: 3, baseDelayMs: 5, maxDelayMs: 20, maxRetryAfterMs: 1000 };
const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

const missing: string[] = [];
for (const cmd of ['docker-registry', 'skopeo', 'umoci', 'htpasswd', 'openssl', 'sha256sum']) if (!(await hasCommand(cmd))) missing.push(cmd);

if (missing.length > 0) {
  t.plan(0, `not installed: ${missing.join(', ')} (scripts/setup installs them)`);
} else {
  let images: DefaultImages;
  let tmp: string;
  const regs = {} as Record<RegistryAuth, Registry>;
  /** The small image as pushed by skopeo to `small:latest` of each registry. */
  const small = {} as Record<RegistryAuth, PushedImage>;
  /** The multi image on the no-auth registry (`multi:latest`). */
  let multi: PushedImage;
  const logLines: string[] = [];
  const logger = jsonLogger('debug', { write: (l: string) => logLines.push(l) });

  t.before(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'soci-ts-registry-test-'));
    images = await defaultImages();
    const started = await Promise.all(
      MODES.map((auth) =>
        startRegistry({
          auth,
          // The access log (one line per request) is how these tests count requests.
          config: (c) => void (c.log = { level: 'warn', formatter: 'text', accesslog: { disabled: false } }),
        }),
      ),
    );
    MODES.forEach((m, i) => (regs[m] = started[i]!));
    const pushed = await Promise.all([
      ...MODES.map((m) => pushImage(images.small.layoutDir, images.small.tag, regs[m], 'small')),
      pushImage(images.multi.layoutDir, images.multi.tag, regs.none, 'multi'),
    ]);
    MODES.forEach((m, i) => (small[m] = pushed[i]!));
    multi = pushed[3]!;
  });
  t.teardown(async () => {
    await Promise.all(MODES.map((m) => regs[m]?.stop()));
    if (tmp !== undefined) await rm(tmp, { recursive: true, force: true });
  });

  /** A client for `reg` with its credentials (`--user`) and no docker config. */
  const clientFor = (t: Test, reg: Registry, extra: Partial<RegistryClientOptions> = {}): RegistryClient => {
    const c = new RegistryClient({
      hostsDir: '',
      credentials: reg.credentials === undefined ? { configPath: join(tmp, 'no-config.json') } : { user: `${reg.credentials.username}:${reg.credentials.password}` },
      retry: FAST_RETRY,
      logger,
      ...extra,
    });
    t.teardown(() => c.close());
    return c;
  };

  /** `skopeo inspect --raw` of `repo:ref`, as bytes. */
  const skopeoRaw = async (reg: Registry, repoRef: string): Promise<Buffer> => {
    const out = join(tmp, `raw-${randomBytes(4).toString('hex')}`);
    const creds = reg.credentials === undefined ? [] : ['--creds', `${reg.credentials.username}:${reg.credentials.password}`];
    await run('skopeo', ['inspect', '--raw', '--tls-verify=false', ...creds, `docker://${reg.host}/${repoRef}`], { stdoutFile: out });
    return readFile(out);
  };

  /** A blob straight from the registry (its own answer). */
  const registryBlob = async (reg: Registry, repo: string, digest: string): Promise<Buffer> => {
    const res = await registryRequest(reg, `/v2/${repo}/blobs/${digest}`);
    if (res.status !== 200) throw new Error(`GET blob ${repo}@${digest}: HTTP ${res.status}`);
    return res.body;
  };

  /** Requests for `path` (e.g. `/v2/small/blobs/sha256:…`) in the registry's access log, by status. */
  const accessLog = (reg: Registry, method: string, path: string, opts: { prefix?: boolean } = {}): number[] => {
    const out: number[] = [];
    const re = /"([A-Z]+) (\S+) HTTP\/1\.1" (\d{3}) /;
    for (const line of reg.logs().split('\n')) {
      const m = re.exec(line);
      if (m !== null && m[1] === method && (opts.prefix === true ? m[2]!.startsWith(path) : m[2] === path)) out.push(Number(m[3]));
    }
    return out;
  };
  /** The access log trails the answers a little: wait until it holds `want` lines for `path`, then a bit more. */
  const settledCount = async (reg: Registry, method: string, path: string, want: number, opts: { prefix?: boolean } = {}): Promise<number> => {
    for (let i = 0; i < 100 && accessLog(reg, method, path, opts).length < want; i++) await new Promise((r) => setTimeout(r, 20));
    await new Promise((r) => setTimeout(r, 100));
    return accessLog(reg, method, path, opts).length;
  };

  const layerDesc = (img: BuiltImage, i: number): Descriptor => {
    const l = img.layers[i]!;
    return { mediaType: l.mediaType, digest: l.digest, size: l.size };
  };

  // ----------------------------------------------------------------- manifests

  t.test('manifests by tag, by digest and by descriptor are what skopeo pushed', async (t) => {
    for (const mode of MODES) {
      const reg = regs[mode];
      const pushed = small[mode];
      const repo = clientFor(t, reg).repository(`${reg.host}/small:latest`);
      const byTag = await repo.fetchManifest();
      t.equal(byTag.descriptor.digest, pushed.manifestDigest, `${mode}: digest by tag`);
      t.ok(byTag.bytes.equals(pushed.manifestBytes), `${mode}: bytes by tag`);
      t.ok(byTag.bytes.equals(await skopeoRaw(reg, 'small:latest')), `${mode}: bytes equal skopeo inspect --raw`);
      t.same(byTag.descriptor, { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: pushed.manifestDigest, size: pushed.manifestBytes.length }, `${mode}: descriptor`);
      t.equal(byTag.parsed.kind, 'manifest');
      if (byTag.parsed.kind === 'manifest') {
        t.same(byTag.parsed.manifest.layers.map((l) => l.digest), images.small.layers.map((l) => l.digest), `${mode}: layers are the layout's`);
        t.equal(byTag.parsed.manifest.config.digest, images.small.configDigest);
      }
      const byDigest = await repo.fetchManifest(pushed.manifestDigest);
      t.ok(byDigest.bytes.equals(pushed.manifestBytes), `${mode}: bytes by digest`);
      const byDesc = await repo.fetchManifest(byTag.descriptor);
      t.same(byDesc.descriptor, byTag.descriptor, `${mode}: by descriptor`);
      t.same(await repo.statManifest('latest'), byTag.descriptor, `${mode}: statManifest (HEAD) by tag`);
      t.same(await repo.statManifest(pushed.manifestDigest), byTag.descriptor, `${mode}: statManifest by digest`);
      t.equal(await repo.statManifest('no-such-tag'), undefined, `${mode}: statManifest of a missing tag`);
      await t.rejects(repo.fetchManifest('no-such-tag'), NotFoundError, `${mode}: a missing tag is NotFoundError`);
      await t.rejects(clientFor(t, reg).repository(`${reg.host}/no/such/repo:latest`).fetchManifest(), NotFoundError, `${mode}: a missing repository too`);
    }
  });

  t.test('a Docker v2 schema 2 manifest (skopeo --format v2s2)', async (t) => {
    const reg = regs.basic;
    await skopeoCopy(images.small.ociRef, `docker://${reg.host}/small-docker:v2s2`, { destCreds: reg.credentials, extraArgs: ['--format', 'v2s2'] });
    const raw = await skopeoRaw(reg, 'small-docker:v2s2');
    const repo = clientFor(t, reg).repository(`${reg.host}/small-docker:v2s2`);
    const m = await repo.fetchManifest();
    t.ok(m.bytes.equals(raw), 'bytes equal skopeo inspect --raw');
    t.same(m.descriptor, { mediaType: MEDIA_TYPE_DOCKER_MANIFEST, digest: sha256(raw), size: raw.length });
    t.equal(m.parsed.mediaType, MEDIA_TYPE_DOCKER_MANIFEST);
    if (m.parsed.kind !== 'manifest') return t.fail('not a manifest');
    t.same(new Set(m.parsed.manifest.layers.map((l) => l.mediaType)), new Set([MEDIA_TYPE_DOCKER_LAYER_GZIP]), 'docker layer media types');
    const config = await repo.fetchBlob(m.parsed.manifest.config);
    t.ok(config.equals(await registryBlob(reg, 'small-docker', m.parsed.manifest.config.digest)), 'its config blob');
    t.same(await repo.statManifest('v2s2'), m.descriptor, 'statManifest gives the docker media type');
  });

  t.test('an image index: fetched, a platform selected, the chosen manifest fetched', async (t) => {
    const reg = regs.token;
    const base = JSON.parse(small.token.manifestBytes.toString('utf8')) as Record<string, unknown>;
    // A second manifest over the same blobs, for "arm64".
    const arm = Buffer.from(JSON.stringify({ ...base, annotations: { 'org.example.arch': 'arm64' } }));
    const put = async (ref: string, body: Buffer, mediaType: string): Promise<void> => {
      const res = await registryRequest(reg, `/v2/small/manifests/${ref}`, { method: 'PUT', headers: { 'content-type': mediaType }, body });
      if (res.status !== 201) throw new Error(`PUT ${ref}: HTTP ${res.status} ${res.body.toString()}`);
    };
    await put('arm64', arm, MEDIA_TYPE_OCI_MANIFEST);
    const index = {
      schemaVersion: 2,
      mediaType: MEDIA_TYPE_OCI_INDEX,
      manifests: [
        { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: small.token.manifestDigest, size: small.token.manifestBytes.length, platform: { os: 'linux', architecture: 'amd64' } },
        { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: sha256(arm), size: arm.length, platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } },
        // A buildkit-style attestation entry: never selected.
        { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: sha256(arm), size: arm.length, platform: { os: 'unknown', architecture: 'unknown' } },
      ],
    };
    const indexBytes = Buffer.from(JSON.stringify(index, null, 2));
    await put('multiarch', indexBytes, MEDIA_TYPE_OCI_INDEX);

    const repo = clientFor(t, reg).repository(`${reg.host}/small:multiarch`);
    const got = await repo.fetchManifest();
    t.ok(got.bytes.equals(await skopeoRaw(reg, 'small:multiarch')), 'index bytes equal skopeo inspect --raw');
    t.same(got.descriptor, { mediaType: MEDIA_TYPE_OCI_INDEX, digest: sha256(indexBytes), size: indexBytes.length });
    if (got.parsed.kind !== 'index') return t.fail('not an index');
    const [armDesc] = selectManifests(got.parsed.index, { platform: 'linux/arm64' });
    t.equal(armDesc?.digest, sha256(arm), 'linux/arm64 selects the arm64 entry');
    const armManifest = await repo.fetchManifest(armDesc!);
    t.ok(armManifest.bytes.equals(arm), 'and fetching it gives those bytes');
    const [amd] = selectManifests(got.parsed.index, { platform: 'linux/amd64' });
    t.ok((await repo.fetchManifest(amd!)).bytes.equals(small.token.manifestBytes), 'linux/amd64 selects the image skopeo pushed');
    t.equal(selectManifests(got.parsed.index, { all: true }).length, 2, 'the attestation entry is not an image');
  });

  // ----------------------------------------------------------------- whole blobs

  t.test('fetchBlob and blobStream give the layout blob files, byte for byte', async (t) => {
    for (const mode of MODES) {
      const reg = regs[mode];
      const repo = clientFor(t, reg).repository(`${reg.host}/small`);
      const config = { mediaType: 'application/vnd.oci.image.config.v1+json', digest: images.small.configDigest, size: 0 };
      const configFile = await readFile(join(images.small.layoutDir, 'blobs/sha256', images.small.configDigest.slice(7)));
      config.size = configFile.length;
      t.ok((await repo.fetchBlob(config)).equals(configFile), `${mode}: config`);
      for (const [i, layer] of images.small.layers.entries()) {
        const file = await readFile(layer.path);
        const d = layerDesc(images.small, i);
        t.ok((await repo.fetchBlob(d)).equals(file), `${mode}: fetchBlob of layer ${i}`);
        const parts: Buffer[] = [];
        for await (const c of repo.blobStream(d)) parts.push(c);
        t.ok(Buffer.concat(parts).equals(file), `${mode}: blobStream of layer ${i}`);
        t.equal(await repo.statBlob(layer.digest), layer.size, `${mode}: statBlob of layer ${i}`);
      }
      const absent = sha256(randomBytes(16));
      t.equal(await repo.statBlob(absent), undefined, `${mode}: statBlob of a missing blob`);
      await t.rejects(repo.fetchBlob({ mediaType: 'application/octet-stream', digest: absent, size: 16 }), NotFoundError, `${mode}: a missing blob is NotFoundError`);
      await t.rejects(repo.fetchBlob(layerDesc(images.small, 0), 1000), /over the 1000-byte limit/, `${mode}: fetchBlob's size limit`);
    }
    // The big layer of the multi image, checked against sha256sum of the file.
    const big = images.multi.layers.reduce((a, b) => (b.size > a.size ? b : a));
    const repo = clientFor(t, regs.none).repository(`${regs.none.host}/multi`);
    const hash = createHash('sha256');
    let n = 0;
    for await (const c of repo.blobStream({ mediaType: big.mediaType, digest: big.digest, size: big.size })) {
      hash.update(c);
      n += c.length;
    }
    const sum = (await run('sha256sum', [big.path])).stdout.split(' ')[0];
    t.equal(`sha256:${hash.digest('hex')}`, `sha256:${sum}`, `blobStream of the ${(big.size / 2 ** 20).toFixed(1)} MiB layer matches sha256sum of the file`);
    t.equal(n, big.size);
  });

  // ----------------------------------------------------------------- range reads

  t.test('300 random concurrent range reads equal slices of the blob file', async (t) => {
    const big = images.multi.layers.reduce((a, b) => (b.size > a.size ? b : a));
    const idx = images.multi.layers.indexOf(big);
    const file = await readFile(big.path);
    const d = layerDesc(images.multi, idx);
    const repo = clientFor(t, regs.none).repository(`${regs.none.host}/multi`);
    let seed = 0x5eed;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return Math.floor((seed / 2 ** 32) * n);
    };
    const ranges: Array<[number, number]> = [
      [0, 1],
      [big.size - 1, 1],
      [0, big.size],
      [big.size - 4096, 4096],
    ];
    while (ranges.length < 300) {
      const kind = rnd(4);
      const len = kind === 0 ? 1 : kind === 1 ? 1 + rnd(4096) : kind === 2 ? 1 + rnd(256 << 10) : 1 + rnd(2 << 20);
      ranges.push([rnd(big.size - len + 1), len]);
    }
    const before = accessLog(regs.none, 'GET', `/v2/multi/blobs/${big.digest}`).length;
    // Half issued in one tick (they coalesce), half in bursts of 5 over many ticks.
    const results: Array<Promise<Buffer>> = ranges.slice(0, 150).map(([o, l]) => repo.readRange(d, o, l));
    for (let i = 150; i < 300; i += 5) {
      for (const [o, l] of ranges.slice(i, i + 5)) results.push(repo.readRange(d, o, l));
      await tick();
    }
    const got = await Promise.all(results);
    let bad = 0;
    for (const [i, [o, l]] of ranges.entries()) if (!got[i]!.equals(file.subarray(o, o + l))) bad++;
    t.equal(bad, 0, 'every one of the 300 reads equals the file slice (first byte, last byte, whole blob, 1 B to 2 MiB)');
    const requests = (await settledCount(regs.none, 'GET', `/v2/multi/blobs/${big.digest}`, before + 1)) - before;
    t.ok(requests > 1 && requests < 300, `${requests} requests for 300 reads`);

    // And through token auth: concurrent first requests meet the challenge together.
    const sreg = regs.token;
    const sfile = await readFile(images.small.layers[0]!.path);
    const sdesc = layerDesc(images.small, 0);
    const srepo = clientFor(t, sreg).repository(`${sreg.host}/small`);
    const tokensBefore = sreg.tokenRequests;
    const sr: Array<[number, number]> = Array.from({ length: 40 }, () => {
      const len = 1 + rnd(20000);
      return [rnd(sdesc.size - len + 1), len];
    });
    const sgot = await Promise.all(sr.map(([o, l]) => repo && srepo.readRange(sdesc, o, l)));
    t.ok(sr.every(([o, l], i) => sgot[i]!.equals(sfile.subarray(o, o + l))), 'token auth: 40 concurrent reads are right');
    t.equal(sreg.tokenRequests - tokensBefore, 1, 'and needed one token');
  });

  t.test('reads of adjacent ranges in one tick are coalesced into fewer requests', async (t) => {
    const reg = regs.none;
    const data = randomBytes(1 << 20);
    const d: Descriptor = { mediaType: 'application/octet-stream', digest: sha256(data), size: data.length };
    const c = clientFor(t, reg);
    const path = (repo: string): string => `/v2/${repo}/blobs/${d.digest}`;
    const run64 = async (repo: string, mode: 'one tick' | 'one at a time' | 'gaps', client = c): Promise<number> => {
      const r = client.repository(`${reg.host}/${repo}`);
      t.equal(await r.pushBlob(d, data), 'uploaded');
      const reads: Array<[number, number]> = Array.from({ length: 64 }, (_, i) => [mode === 'gaps' ? i * 4097 : i * 4096, 4096]);
      const got: Buffer[] = [];
      if (mode === 'one at a time') for (const [o, l] of reads) got.push(await r.readRange(d, o, l));
      else got.push(...(await Promise.all(reads.map(([o, l]) => r.readRange(d, o, l)))));
      t.ok(reads.every(([o, l], i) => got[i]!.equals(data.subarray(o, o + l))), `${repo}: bytes right`);
      return settledCount(reg, 'GET', path(repo), 1);
    };
    t.equal(await run64('coalesce-tick', 'one tick'), 1, '64 adjacent 4 KiB reads in one tick: one request');
    t.equal(await run64('coalesce-serial', 'one at a time'), 64, 'the same reads one after another: 64 requests');
    t.equal(await run64('coalesce-gaps', 'gaps'), 64, 'reads with 1-byte gaps between them are not merged');
    const capped = clientFor(t, reg, { maxCoalescedBytes: 64 << 10 });
    t.equal(await run64('coalesce-capped', 'one tick', capped), 4, 'maxCoalescedBytes 64 KiB: 4 requests of 16 reads');
    const ranges = accessLog(reg, 'GET', path('coalesce-tick'));
    t.same(ranges, [206], 'the merged request was answered with 206');
  });

  t.test('per-range digests: checked, refetched, and a bad one does not spoil its neighbours', async (t) => {
    const reg = regs.none;
    const data = randomBytes(256 << 10);
    const d: Descriptor = { mediaType: 'application/octet-stream', digest: sha256(data), size: data.length };
    const c = clientFor(t, reg);
    const repo = c.repository(`${reg.host}/span-digests`);
    await repo.pushBlob(d, data);
    const span = (o: number, l: number): string => sha256(data.subarray(o, o + l));
    t.ok((await repo.readRange(d, 1000, 5000, { digest: span(1000, 5000) })).equals(data.subarray(1000, 6000)), 'a matching digest');
    const [good, bad] = await Promise.allSettled([
      repo.readRange(d, 0, 1000, { digest: span(0, 1000) }),
      repo.readRange(d, 1000, 1000, { digest: span(0, 1000) }),
    ]);
    t.equal(good.status, 'fulfilled', 'the good range of the merged pair resolves');
    t.equal(bad.status, 'rejected', 'the bad one is refused');
    if (bad.status === 'rejected') {
      t.type(bad.reason, IntegrityError);
      t.match((bad.reason as Error).message, /bytes 1000\+1000 do not match their digest sha256:/);
    }
    const n = await settledCount(reg, 'GET', `/v2/span-digests/blobs/${d.digest}`, 4);
    t.equal(n, 4, 'one request for the first read, one for the pair, two refetches of the bad range (3 attempts)');
  });

  t.test('a range outside the blob is refused without a request', async (t) => {
    const reg = regs.none;
    const repo = clientFor(t, reg).repository(`${reg.host}/multi`);
    const d = layerDesc(images.multi, 0);
    const before = accessLog(reg, 'GET', `/v2/multi/blobs/${d.digest}`).length;
    const bad: Array<[number, number]> = [
      [d.size - 1, 2],
      [d.size, 1],
      [-1, 1],
      [0, -1],
      [0.5, 1],
      [0, Number.MAX_SAFE_INTEGER + 2],
      [Number.NaN, 1],
    ];
    for (const [o, l] of bad) {
      const err = await repo.readRange(d, o, l).then(
        () => undefined,
        (e: unknown) => e,
      );
      t.type(err, FetcherError, `${o}+${l}`);
      t.match((err as Error)?.message, /is outside the blob's \d+ bytes/);
    }
    t.same(await repo.readRange(d, d.size, 0), Buffer.alloc(0), 'an empty read at the end is fine');
    await new Promise((r) => setTimeout(r, 150));
    t.equal(accessLog(reg, 'GET', `/v2/multi/blobs/${d.digest}`).length, before, 'no request was sent');
  });

  // ----------------------------------------------------------------- push

  t.test('pushBlob: monolithic, chunked, exists, mounted — in every auth mode', async (t) => {
    for (const mode of MODES) {
      const reg = regs[mode];
      const c = clientFor(t, reg);
      const repo = c.repository(`${reg.host}/pushes`);
      const a = randomBytes(300_000);
      const da: Descriptor = { mediaType: 'application/octet-stream', digest: sha256(a), size: a.length };
      t.equal(await repo.pushBlob(da, a), 'uploaded', `${mode}: monolithic upload`);
      t.ok((await registryBlob(reg, 'pushes', da.digest)).equals(a), `${mode}: the registry serves the same bytes`);
      t.equal(await repo.pushBlob(da, a), 'exists', `${mode}: second push: exists`);

      const b = randomBytes(300_000);
      const db: Descriptor = { mediaType: 'application/octet-stream', digest: sha256(b), size: b.length };
      const progress: number[] = [];
      t.equal(await repo.pushBlob(db, b, { chunkSize: 64 << 10, onProgress: (n) => progress.push(n) }), 'uploaded', `${mode}: chunked upload`);
      t.same(progress, [65536, 131072, 196608, 262144, 300000], `${mode}: 5 chunks`);
      t.equal(sha256(await registryBlob(reg, 'pushes', db.digest)), db.digest, `${mode}: the chunked blob is byte-identical`);
      await settledCount(reg, 'PATCH', '/v2/pushes/blobs/uploads/', 5, { prefix: true });
      t.same(accessLog(reg, 'PATCH', '/v2/pushes/blobs/uploads/', { prefix: true }), [202, 202, 202, 202, 202], `${mode}: the registry saw 5 PATCH requests`);

      // From a stream of odd-sized pieces.
      const cdata = randomBytes(250_001);
      const dc: Descriptor = { mediaType: 'application/octet-stream', digest: sha256(cdata), size: cdata.length };
      const pieces = async function* (): AsyncGenerator<Uint8Array> {
        for (let o = 0; o < cdata.length; o += 77_777) yield cdata.subarray(o, o + 77_777);
      };
      t.equal(await repo.pushBlob(dc, pieces, { chunkSize: 100_000 }), 'uploaded', `${mode}: streamed upload`);
      t.equal(sha256(await registryBlob(reg, 'pushes', dc.digest)), dc.digest, `${mode}: the streamed blob is byte-identical`);

      const other = c.repository(`${reg.host}/pushes-other`);
      const tokensBefore = reg.tokenRequests;
      t.equal(await other.pushBlob(da, a, { mountFrom: ['no-such-repo', 'pushes'] }), 'mounted', `${mode}: mounted from another repository (after one that lacks it)`);
      // A refused mount's upload is used for the upload: one POST, no second one.
      const lonely = randomBytes(1000);
      const dl: Descriptor = { mediaType: 'application/octet-stream', digest: sha256(lonely), size: lonely.length };
      const postsBefore = accessLog(reg, 'POST', '/v2/pushes-other/blobs/uploads/', { prefix: true }).filter((s) => s === 202).length;
      t.equal(await other.pushBlob(dl, lonely, { mountFrom: ['pushes'] }), 'uploaded', `${mode}: not mountable: uploaded`);
      t.equal(sha256(await registryBlob(reg, 'pushes-other', dl.digest)), dl.digest, `${mode}: and served`);
      await settledCount(reg, 'POST', '/v2/pushes-other/blobs/uploads/', postsBefore + 1, { prefix: true });
      t.equal(accessLog(reg, 'POST', '/v2/pushes-other/blobs/uploads/', { prefix: true }).filter((s) => s === 202).length - postsBefore, 1, `${mode}: through the upload the mount request opened`);
      t.ok((await registryBlob(reg, 'pushes-other', da.digest)).equals(a), `${mode}: the mounted blob is served`);
      if (mode === 'token') {
        const scopes = reg.issuer!.requests.slice(tokensBefore).map((r) => r.scopes.join(' '));
        t.ok(
          scopes.some((s) => s.includes('repository:pushes:pull') && s.includes('repository:pushes-other:pull,push')),
          `the mount's token carried pull on the source: ${JSON.stringify(scopes)}`,
        );
      }

      // Data that does not match the descriptor.
      const lie: Descriptor = { ...da, digest: sha256(randomBytes(8)) };
      await t.rejects(repo.pushBlob(lie, a), RegistryError, `${mode}: monolithic upload of the wrong bytes: the registry refuses`);
      await t.rejects(repo.pushBlob(lie, a, { chunkSize: 100_000 }), IntegrityError, `${mode}: chunked upload of the wrong bytes: refused before committing`);
    }
  });

  t.test('an image pushed with the client is what skopeo reads back and copies', async (t) => {
    const reg = regs.token;
    const c = clientFor(t, reg);
    const repo = c.repository(`${reg.host}/ours`);
    const img = images.small;
    const configBytes = await readFile(join(img.layoutDir, 'blobs/sha256', img.configDigest.slice(7)));
    const results: string[] = [];
    results.push(await repo.pushBlob({ mediaType: img.manifest.config.mediaType, digest: img.configDigest, size: configBytes.length }, configBytes));
    for (const [i, l] of img.layers.entries()) {
      // The first layer is mounted from skopeo's push; the second uploaded from the file.
      const data = await readFile(l.path);
      results.push(await repo.pushBlob(layerDesc(img, i), data, i === 0 ? { mountFrom: ['small'] } : { chunkSize: 256 << 10 }));
    }
    t.same(results, ['uploaded', 'mounted', 'uploaded']);
    const manifestBytes = await readFile(join(img.layoutDir, 'blobs/sha256', img.manifestDigest.slice(7)));
    const res = await repo.pushManifest(manifestBytes, MEDIA_TYPE_OCI_MANIFEST, 'v1');
    t.same(res, { descriptor: { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: img.manifestDigest, size: manifestBytes.length }, subjectAccepted: false, referrersTagUpdated: false });
    t.ok((await skopeoRaw(reg, 'ours:v1')).equals(manifestBytes), 'skopeo inspect --raw shows the manifest pushed');
    const out = join(tmp, 'copied');
    await skopeoCopy(`docker://${reg.host}/ours:v1`, `oci:${out}:v1`, { srcCreds: reg.credentials });
    const copied = await readFile(join(out, 'blobs/sha256', img.layers[1]!.digest.slice(7)));
    t.ok(copied.equals(await readFile(img.layers[1]!.path)), 'skopeo copied it back out, digests verified');
  });

  // ----------------------------------------------------------------- referrers

  t.test('SOCI-like artifacts with a subject: the fallback referrers tag, merged, filtered', async (t) => {
    const reg = regs.token;
    const c = clientFor(t, reg);
    const repo = c.repository(`${reg.host}/small`);
    const subject = { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: small.token.manifestDigest, size: small.token.manifestBytes.length };
    t.same(await repo.referrers(subject.digest), { descriptors: [], source: 'tag' }, 'nothing yet (registry 2.8 has no referrers API)');

    const ztoc = randomBytes(10_000);
    const ztocDesc: Descriptor = { mediaType: 'application/octet-stream', digest: sha256(ztoc), size: ztoc.length };
    const empty: Descriptor = { mediaType: MEDIA_TYPE_OCI_EMPTY, digest: sha256(EMPTY_CONFIG_BYTES), size: 2 };
    await repo.pushBlob(ztocDesc, ztoc);
    await repo.pushBlob(empty, EMPTY_CONFIG_BYTES);
    const layer0 = small.token.layers[0]!;
    const soci = buildSociIndex({
      version: 'v1',
      layers: [{ layer: layer0, ztoc: { digest: ztocDesc.digest, size: ztocDesc.size }, spanSize: 4 << 20 }],
      subject,
      buildToolIdentifier: 'soci-ts registry test',
    });
    const r1 = await repo.pushManifest(soci.bytes, MEDIA_TYPE_OCI_MANIFEST);
    t.same(r1, { descriptor: { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: soci.descriptor.digest, size: soci.bytes.length }, subjectAccepted: false, referrersTagUpdated: true });
    const first = await repo.referrers(subject.digest);
    t.equal(first.source, 'tag');
    t.same(
      first.descriptors,
      [{ mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: soci.descriptor.digest, size: soci.bytes.length, artifactType: MEDIA_TYPE_SOCI_INDEX_V1, annotations: soci.manifest.annotations }],
      'the SOCI index is listed, with its artifact type from the config media type and its annotations',
    );

    // A second artifact, OCI 1.1 style (artifactType field, empty config).
    const sbomType = 'application/vnd.example.sbom.v1+json';
    const sbom = Buffer.from(
      JSON.stringify({ schemaVersion: 2, mediaType: MEDIA_TYPE_OCI_MANIFEST, artifactType: sbomType, config: empty, layers: [ztocDesc], subject }),
    );
    t.equal((await repo.pushManifest(sbom, MEDIA_TYPE_OCI_MANIFEST)).referrersTagUpdated, true);
    const both = await repo.referrers(subject.digest);
    t.same(both.descriptors.map((d) => [d.digest, d.artifactType]), [
      [soci.descriptor.digest, MEDIA_TYPE_SOCI_INDEX_V1],
      [sha256(sbom), sbomType],
    ], 'the second is merged after the first');
    t.same((await repo.referrers(subject.digest, sbomType)).descriptors.map((d) => d.digest), [sha256(sbom)], 'artifactType filter: the SBOM');
    t.same((await repo.referrers(subject.digest, MEDIA_TYPE_SOCI_INDEX_V1)).descriptors.map((d) => d.digest), [soci.descriptor.digest], 'artifactType filter: the SOCI index');
    t.same((await repo.referrers(subject.digest, 'application/x-none')).descriptors, [], 'artifactType filter: nothing');
    t.equal((await repo.pushManifest(soci.bytes, MEDIA_TYPE_OCI_MANIFEST)).referrersTagUpdated, false, 'pushing the first again does not list it twice');

    const tag = referrersTag(subject.digest);
    t.match(tag, /^sha256-[0-9a-f]{64}$/);
    const raw = await skopeoRaw(reg, `small:${tag}`);
    const shown = JSON.parse(raw.toString('utf8')) as { mediaType: string; manifests: Descriptor[] };
    t.equal(shown.mediaType, MEDIA_TYPE_OCI_INDEX, 'skopeo sees an OCI index under the fallback tag');
    t.same(shown.manifests, (await repo.referrers(subject.digest)).descriptors, 'listing exactly what referrers() returns');
    t.ok((await repo.fetchManifest(tag)).bytes.equals(raw));
  });

  // ----------------------------------------------------------------- token auth

  t.test('token auth: tokens are cached, refreshed before expiry, and replaced when refused', async (t) => {
    const reg = regs.token;
    const issuer = reg.issuer!;
    const d = layerDesc(images.small, 1);
    const file = await readFile(images.small.layers[1]!.path);

    // Many requests, one token.
    let before = reg.tokenRequests;
    const repo = clientFor(t, reg).repository(`${reg.host}/small:latest`);
    await repo.fetchManifest();
    for (let i = 0; i < 20; i++) t.ok((await repo.readRange(d, i * 1000, 100)).equals(file.subarray(i * 1000, i * 1000 + 100)));
    await Promise.all(Array.from({ length: 20 }, () => repo.statBlob(d.digest)));
    await repo.fetchBlob(d);
    t.equal(reg.tokenRequests - before, 1, '42 requests, 1 token request');

    // Short-lived tokens are refreshed by the client (10 s before expiry).
    issuer.options.expiresIn = 11;
    try {
      before = reg.tokenRequests;
      const r2 = clientFor(t, reg).repository(`${reg.host}/small:latest`);
      await r2.statBlob(d.digest);
      await r2.statBlob(d.digest);
      t.equal(reg.tokenRequests - before, 1, 'an 11 s token is used while it has more than 10 s left');
      await new Promise((r) => setTimeout(r, 1100));
      await r2.statBlob(d.digest);
      t.equal(reg.tokenRequests - before, 2, 'and replaced when it has less');
    } finally {
      issuer.options.expiresIn = undefined;
    }

    // A token the registry refuses although the client thinks it valid (revoked, or clocks
    // apart): its JWT expired 100 s ago (beyond the registry's 60 s leeway), its answer says 300 s.
    const mint = issuer.mint.bind(issuer);
    let minted = 0;
    issuer.mint = (sub, access, o) => (minted++ === 0 ? mint(sub, access, { expiresIn: 300, issuedAt: new Date(Date.now() - 400_000) }) : mint(sub, access, o));
    try {
      before = reg.tokenRequests;
      const r3 = clientFor(t, reg).repository(`${reg.host}/small:latest`);
      // 16 concurrent reads far apart (16 requests): all meet the refusal of the same token.
      const offsets = Array.from({ length: 16 }, (_, i) => i * 40_000);
      const got = await Promise.all(offsets.map((o) => r3.readRange(d, o, 10)));
      t.ok(offsets.every((o, i) => got[i]!.equals(file.subarray(o, o + 10))), 'all 16 reads succeed');
      t.equal(reg.tokenRequests - before, 2, 'the refused token was replaced once, for all of them');
      const refused = reg.logs().split('\n').filter((l) => l.includes('token expired') || l.includes('invalid token')).length;
      t.ok(refused > 0, 'the registry did refuse the first token');
    } finally {
      issuer.mint = mint;
    }
  });

  t.test('wrong credentials: AuthError, and the password appears nowhere', async (t) => {
    for (const mode of ['basic', 'token'] as const) {
      const reg = regs[mode];
      const secret = `Wr0ng-Secret-${mode}-${randomBytes(4).toString('hex')}`;
      const b64 = Buffer.from(`soci:${secret}`).toString('base64');
      const lines: string[] = [];
      const c = clientFor(t, reg, { credentials: { user: `soci:${secret}` }, logger: jsonLogger('debug', { write: (l: string) => lines.push(l) }) });
      const err = await c
        .repository(`${reg.host}/small:latest`)
        .fetchManifest()
        .then(
          () => undefined,
          (e: unknown) => e as Error,
        );
      t.type(err, AuthError, `${mode}: AuthError`);
      t.match(err?.message, mode === 'basic' ? /the registry refused the credentials: HTTP 401/ : /token endpoint refused the credentials/, `${mode}: says why`);
      const texts = [err?.message ?? '', String(err), err?.stack ?? '', JSON.stringify(lines), JSON.stringify(err), inspectChain(err)];
      t.notOk(texts.some((s) => s.includes(secret) || s.includes(b64)), `${mode}: the password is in no message, stack, cause or log line`);
    }
  });

  t.test('no credentials: AuthError saying so', async (t) => {
    for (const mode of ['basic', 'token'] as const) {
      const reg = regs[mode];
      const c = clientFor(t, reg, { credentials: { configPath: join(tmp, 'no-config.json') } });
      const err = await c.repository(`${reg.host}/small:latest`).fetchManifest().then(
        () => undefined,
        (e: unknown) => e as Error,
      );
      t.type(err, AuthError, mode);
      t.match(err?.message, mode === 'basic' ? /no credentials for this registry \(docker login, or --user\)/ : /token endpoint requires credentials \(docker login or --user\)/, `${mode}: says so`);
    }
  });

  t.test('credentials from a DOCKER_CONFIG config.json auths entry', async (t) => {
    for (const mode of ['basic', 'token'] as const) {
      const reg = regs[mode];
      const dir = await mkdtemp(join(tmp, 'docker-config-'));
      const { username, password } = reg.credentials!;
      await writeFile(join(dir, 'config.json'), JSON.stringify({ auths: { [reg.host]: { auth: Buffer.from(`${username}:${password}`).toString('base64') } } }));
      const c = clientFor(t, reg, { credentials: { env: { DOCKER_CONFIG: dir } } });
      const m = await c.repository(`${reg.host}/small:latest`).fetchManifest();
      t.equal(m.descriptor.digest, small[mode].manifestDigest, `${mode}: pulled with the config.json credentials`);
    }
  });
}

/** Every message and stack along an error's cause chain. */
function inspectChain(err: unknown): string {
  const out: string[] = [];
  for (let e = err, i = 0; e instanceof Error && i < 10; e = e.cause, i++) out.push(e.message, e.stack ?? '', JSON.stringify(e));
  return out.join('\n');
}

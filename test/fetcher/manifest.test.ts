/**
 * Manifests and indexes: parsing real umoci/skopeo output, strict validation of every field,
 * media-type negotiation, schema 1 refusal, and containerd's platform normalisation and selection.
 */
import t from 'tap';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FetcherError } from '../../fetcher/errors.js';
import {
  compatiblePlatforms,
  formatPlatform,
  hostPlatform,
  isIndexMediaType,
  isLayerMediaType,
  isManifestMediaType,
  layerCompression,
  MANIFEST_ACCEPT,
  ManifestError,
  MAX_MANIFEST_BYTES,
  MEDIA_TYPE_DOCKER_CONFIG,
  MEDIA_TYPE_DOCKER_LAYER,
  MEDIA_TYPE_DOCKER_LAYER_FOREIGN,
  MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP,
  MEDIA_TYPE_DOCKER_LAYER_GZIP,
  MEDIA_TYPE_DOCKER_LAYER_ZSTD,
  MEDIA_TYPE_DOCKER_MANIFEST,
  MEDIA_TYPE_DOCKER_MANIFEST_LIST,
  MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST,
  MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST,
  MEDIA_TYPE_OCI_CONFIG,
  MEDIA_TYPE_OCI_INDEX,
  MEDIA_TYPE_OCI_LAYER,
  MEDIA_TYPE_OCI_LAYER_GZIP,
  MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE,
  MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_GZIP,
  MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_ZSTD,
  MEDIA_TYPE_OCI_LAYER_ZSTD,
  MEDIA_TYPE_OCI_MANIFEST,
  normalizePlatform,
  parseDigest,
  parseManifest,
  parsePlatform,
  platformMatches,
  selectManifests,
  sha256Digest,
  type Descriptor,
  type ImageIndex,
  type ImageManifest,
  type ParsedManifest,
  type Platform,
} from '../../fetcher/manifest.js';
import { run } from '../helpers/layers.js';

const REF = 'registry.example:5000/team/app:v1';
const enc = (v: unknown): Uint8Array => new TextEncoder().encode(typeof v === 'string' ? v : JSON.stringify(v));
const D = (c: string): string => 'sha256:' + c.repeat(64);

function asManifest(r: ParsedManifest): ImageManifest {
  if (r.kind !== 'manifest') throw new Error(`expected a manifest, got ${r.kind}`);
  return r.manifest;
}
function asIndex(r: ParsedManifest): ImageIndex {
  if (r.kind !== 'index') throw new Error(`expected an index, got ${r.kind}`);
  return r.index;
}

// ---------------------------------------------------------------------------------------
// Real fixtures: an OCI layout made by umoci from real files, and skopeo's Docker v2s2 copy.

interface Fixture {
  dir: string;
  layout: string;
  /** index.json of the OCI layout, as written by umoci. */
  layoutIndexBytes: Buffer;
  /** The amd64 image's manifest blob (three layers) and its digest. */
  amdBytes: Buffer;
  amdDigest: string;
  /** The same image re-configured as linux/arm64 by umoci config. */
  armBytes: Buffer;
  armDigest: string;
  /** skopeo copy --format v2s2 of the amd64 image. */
  dockerBytes: Buffer;
}

let fx: Fixture;

async function blob(layout: string, digest: string): Promise<Buffer> {
  return readFile(join(layout, 'blobs', 'sha256', digest.slice('sha256:'.length)));
}

t.before(async () => {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-manifest-'));
  const layout = join(dir, 'layout');
  await run('umoci', ['init', '--layout', layout]);
  await run('umoci', ['new', '--image', `${layout}:amd`]);
  await run('umoci', ['config', '--image', `${layout}:amd`, '--os', 'linux', '--architecture', 'amd64']);
  // Three layers of real files, so layers[2] exists.
  await run('umoci', ['insert', '--image', `${layout}:amd`, '/usr/share/doc/bash', '/x']);
  await run('umoci', ['insert', '--image', `${layout}:amd`, '/etc/os-release', '/y/os-release']);
  await run('umoci', ['insert', '--image', `${layout}:amd`, '/usr/share/doc/bash', '/z']);
  await run('umoci', ['config', '--image', `${layout}:amd`, '--architecture', 'arm64', '--tag', 'arm']);
  const out = join(dir, 'docker');
  await run('skopeo', ['copy', '--quiet', '--format', 'v2s2', `oci:${layout}:amd`, `dir:${out}`]);

  const layoutIndexBytes = await readFile(join(layout, 'index.json'));
  const layoutIndex = JSON.parse(layoutIndexBytes.toString('utf8')) as { manifests: Descriptor[] };
  const byTag = (tag: string): string => {
    const d = layoutIndex.manifests.find((m) => m.annotations?.['org.opencontainers.image.ref.name'] === tag);
    if (d === undefined) throw new Error(`no tag ${tag} in ${layout}`);
    return d.digest;
  };
  fx = {
    dir,
    layout,
    layoutIndexBytes,
    amdDigest: byTag('amd'),
    amdBytes: await blob(layout, byTag('amd')),
    armDigest: byTag('arm'),
    armBytes: await blob(layout, byTag('arm')),
    dockerBytes: await readFile(join(out, 'manifest.json')),
  };
});
t.teardown(async () => {
  if (fx !== undefined) await rm(fx.dir, { recursive: true, force: true });
});

t.test('media types', async (t) => {
  t.same(
    MANIFEST_ACCEPT.split(',').map((s) => s.trim()).sort(),
    [MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST].sort(),
    'Accept lists the four manifest types',
  );
  t.equal(MEDIA_TYPE_OCI_MANIFEST, 'application/vnd.oci.image.manifest.v1+json');
  t.equal(MEDIA_TYPE_DOCKER_MANIFEST_LIST, 'application/vnd.docker.distribution.manifest.list.v2+json');
  t.ok(isIndexMediaType(MEDIA_TYPE_OCI_INDEX) && isIndexMediaType(MEDIA_TYPE_DOCKER_MANIFEST_LIST));
  t.notOk(isIndexMediaType(MEDIA_TYPE_OCI_MANIFEST) || isIndexMediaType('application/json'));
  t.ok(isManifestMediaType(MEDIA_TYPE_OCI_MANIFEST) && isManifestMediaType(MEDIA_TYPE_DOCKER_MANIFEST));
  t.notOk(isManifestMediaType(MEDIA_TYPE_OCI_INDEX) || isManifestMediaType(MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST));

  const table: [string, 'gzip' | 'zstd' | 'none' | undefined][] = [
    [MEDIA_TYPE_OCI_LAYER, 'none'],
    [MEDIA_TYPE_OCI_LAYER_GZIP, 'gzip'],
    [MEDIA_TYPE_OCI_LAYER_ZSTD, 'zstd'],
    [MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE, 'none'],
    [MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_GZIP, 'gzip'],
    [MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_ZSTD, 'zstd'],
    [MEDIA_TYPE_DOCKER_LAYER, 'none'],
    [MEDIA_TYPE_DOCKER_LAYER_GZIP, 'gzip'],
    [MEDIA_TYPE_DOCKER_LAYER_ZSTD, 'zstd'],
    [MEDIA_TYPE_DOCKER_LAYER_FOREIGN, 'none'],
    [MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP, 'gzip'],
    [MEDIA_TYPE_OCI_CONFIG, undefined],
    [MEDIA_TYPE_OCI_MANIFEST, undefined],
    ['application/vnd.oci.image.layer.v1.tar+gzip+encrypted', undefined],
    ['application/vnd.example+gzip', undefined],
    ['', undefined],
  ];
  for (const [mt, want] of table) {
    t.equal(layerCompression(mt), want, `${mt || '(empty)'} → ${want}`);
    t.equal(isLayerMediaType(mt), want !== undefined);
  }
});

t.test('digests', async (t) => {
  t.equal(sha256Digest(new Uint8Array()), 'sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855');
  // Blob file names in an OCI layout are their digests: an independent oracle.
  t.equal(sha256Digest(fx.amdBytes), fx.amdDigest);
  t.equal(sha256Digest(fx.armBytes), fx.armDigest);

  t.same(parseDigest(D('a')), { algorithm: 'sha256', hex: 'a'.repeat(64) });
  t.same(parseDigest('sha512:' + '0'.repeat(128)), { algorithm: 'sha512', hex: '0'.repeat(128) });
  for (const bad of [
    '',
    'sha256:',
    'sha256:' + 'a'.repeat(63),
    'sha256:' + 'a'.repeat(65),
    'sha256:' + 'A'.repeat(64),
    'sha256:' + 'g'.repeat(64),
    'sha512:' + 'a'.repeat(64),
    'md5:' + 'a'.repeat(32),
    'SHA256:' + 'a'.repeat(64),
    ' sha256:' + 'a'.repeat(64),
    'sha256:' + 'a'.repeat(64) + '\n',
    'a'.repeat(64),
  ]) {
    t.throws(() => parseDigest(bad), ManifestError, `rejects ${JSON.stringify(bad)}`);
  }
  const err = t.throws(() => parseDigest('sha256:abc')) as ManifestError;
  t.ok(err instanceof FetcherError);
  t.match(err.message, /sha256:abc.*64 hex digits, not 3/);
});

t.test('real OCI manifest from umoci', async (t) => {
  const raw = JSON.parse(fx.amdBytes.toString('utf8')) as ImageManifest;
  for (const ct of [MEDIA_TYPE_OCI_MANIFEST, `${MEDIA_TYPE_OCI_MANIFEST}; charset=utf-8`, undefined, 'application/json', 'application/octet-stream']) {
    const r = parseManifest(fx.amdBytes, ct, REF);
    t.equal(r.kind, 'manifest', `Content-Type ${ct}`);
    t.equal(r.mediaType, MEDIA_TYPE_OCI_MANIFEST);
    t.same(asManifest(r), raw, 'parsed manifest equals the JSON');
  }
  const m = asManifest(parseManifest(fx.amdBytes, MEDIA_TYPE_OCI_MANIFEST, REF));
  t.equal(m.layers.length, 3);
  t.equal(m.config.mediaType, MEDIA_TYPE_OCI_CONFIG);
  for (const l of m.layers) {
    t.equal(layerCompression(l.mediaType), 'gzip');
    parseDigest(l.digest);
    // The blob is in the layout, with the size the manifest claims.
    t.equal((await blob(fx.layout, l.digest)).length, l.size);
  }
  const config = JSON.parse((await blob(fx.layout, m.config.digest)).toString('utf8')) as { architecture: string; os: string };
  t.same([config.os, config.architecture], ['linux', 'amd64']);
});

t.test('real OCI index (umoci index.json)', async (t) => {
  const r = parseManifest(fx.layoutIndexBytes, undefined, 'layout/index.json');
  t.equal(r.kind, 'index');
  t.equal(r.mediaType, MEDIA_TYPE_OCI_INDEX, 'detected from `manifests`');
  const index = asIndex(r);
  t.same(index, JSON.parse(fx.layoutIndexBytes.toString('utf8')));
  t.same(index.manifests.map((d) => d.annotations?.['org.opencontainers.image.ref.name']).sort(), ['amd', 'arm']);
  // umoci's index carries no platforms: nothing to select from.
  t.throws(() => selectManifests(index, { platform: 'linux/amd64' }), { name: 'ManifestError', message: /no image manifests with a platform/ });
});

t.test('real Docker v2 schema 2 manifest from skopeo', async (t) => {
  const raw = JSON.parse(fx.dockerBytes.toString('utf8')) as ImageManifest;
  t.equal(raw.mediaType, MEDIA_TYPE_DOCKER_MANIFEST);
  for (const ct of [MEDIA_TYPE_DOCKER_MANIFEST, undefined, 'application/json; charset=utf-8']) {
    const r = parseManifest(fx.dockerBytes, ct, REF);
    t.equal(r.mediaType, MEDIA_TYPE_DOCKER_MANIFEST, `Content-Type ${ct}`);
    t.same(asManifest(r), raw);
  }
  const m = asManifest(parseManifest(fx.dockerBytes, MEDIA_TYPE_DOCKER_MANIFEST, REF));
  const oci = asManifest(parseManifest(fx.amdBytes, MEDIA_TYPE_OCI_MANIFEST, REF));
  t.equal(m.config.mediaType, MEDIA_TYPE_DOCKER_CONFIG);
  t.same(m.layers.map((l) => l.mediaType), [MEDIA_TYPE_DOCKER_LAYER_GZIP, MEDIA_TYPE_DOCKER_LAYER_GZIP, MEDIA_TYPE_DOCKER_LAYER_GZIP]);
  t.same(m.layers.map((l) => [l.digest, l.size]), oci.layers.map((l) => [l.digest, l.size]), 'same blobs as the OCI image');
  t.same(m.layers.map((l) => layerCompression(l.mediaType)), ['gzip', 'gzip', 'gzip']);

  // The Docker manifest says what it is; served as OCI, that is a disagreement.
  t.throws(() => parseManifest(fx.dockerBytes, MEDIA_TYPE_OCI_MANIFEST, REF), {
    name: 'ManifestError',
    subject: REF,
    path: 'mediaType',
    message: /disagrees with the Content-Type/,
  });
  // A Docker manifest served with the OCI index type disagrees too.
  t.throws(() => parseManifest(fx.dockerBytes, MEDIA_TYPE_OCI_INDEX, REF), { name: 'ManifestError', path: 'mediaType' });
});

/** A real multi-platform index / manifest list built from the fixture's manifests and configs. */
async function realIndex(mediaType: string | undefined, dockerList = false): Promise<Uint8Array> {
  const entry = async (bytes: Buffer, mt: string): Promise<Descriptor> => {
    const m = JSON.parse(bytes.toString('utf8')) as ImageManifest;
    const config = JSON.parse((await blob(fx.layout, m.config.digest)).toString('utf8')) as { architecture: string; os: string };
    return { mediaType: mt, digest: sha256Digest(bytes), size: bytes.length, platform: { architecture: config.architecture, os: config.os } };
  };
  const manifests = dockerList
    ? [await entry(fx.dockerBytes, MEDIA_TYPE_DOCKER_MANIFEST)]
    : [await entry(fx.amdBytes, MEDIA_TYPE_OCI_MANIFEST), await entry(fx.armBytes, MEDIA_TYPE_OCI_MANIFEST)];
  const doc: Record<string, unknown> = { schemaVersion: 2, manifests };
  if (mediaType !== undefined) doc['mediaType'] = mediaType;
  return enc(doc);
}

t.test('multi-platform index and Docker manifest list built from the real manifests', async (t) => {
  const idx = asIndex(parseManifest(await realIndex(MEDIA_TYPE_OCI_INDEX), MEDIA_TYPE_OCI_INDEX, REF));
  t.same(idx.manifests.map((d) => formatPlatform(d.platform!)), ['linux/amd64', 'linux/arm64']);
  t.same(selectManifests(idx, { platform: 'linux/amd64' }).map((d) => d.digest), [fx.amdDigest]);
  t.same(selectManifests(idx, { platform: 'linux/arm64/v8' }).map((d) => d.digest), [fx.armDigest]);
  t.same(selectManifests(idx, { all: true }).map((d) => d.digest), [fx.amdDigest, fx.armDigest]);

  const list = parseManifest(await realIndex(MEDIA_TYPE_DOCKER_MANIFEST_LIST, true), MEDIA_TYPE_DOCKER_MANIFEST_LIST, REF);
  t.equal(list.kind, 'index');
  t.equal(list.mediaType, MEDIA_TYPE_DOCKER_MANIFEST_LIST);
  const [picked] = selectManifests(asIndex(list), { platform: 'linux/amd64' });
  t.equal(picked!.mediaType, MEDIA_TYPE_DOCKER_MANIFEST);
  t.equal(picked!.digest, sha256Digest(fx.dockerBytes));
});

t.test('Docker manifest list served as an OCI index disagrees', async (t) => {
  const bytes = await realIndex(MEDIA_TYPE_DOCKER_MANIFEST_LIST, true);
  t.throws(() => parseManifest(bytes, MEDIA_TYPE_OCI_INDEX, REF), {
    name: 'ManifestError',
    path: 'mediaType',
    message: new RegExp(`${REF}: mediaType: "${MEDIA_TYPE_DOCKER_MANIFEST_LIST.replace(/\./g, '\\.').replace(/\+/g, '\\+')}" disagrees`),
  });
  t.equal(parseManifest(bytes, 'application/json', REF).mediaType, MEDIA_TYPE_DOCKER_MANIFEST_LIST, 'generic Content-Type: the JSON decides');
});

// ---------------------------------------------------------------------------------------
// Validation, table-driven: each case mutates a valid manifest (the real one) or index.

/** Loosely typed on purpose: the cases write wrong types into the document. */
type Mutation = (doc: Record<string, any>) => void;
interface BadCase {
  name: string;
  kind: 'manifest' | 'index';
  mutate: Mutation;
  path?: string;
  message: RegExp;
  /** Only with the Content-Type given (`header`) or only without it (`body`); default both. */
  only?: 'header' | 'body';
}

const badCases: BadCase[] = [
  // digests
  { name: 'uppercase hex', kind: 'manifest', mutate: (d) => (d.layers[2].digest = 'sha256:' + 'A'.repeat(64)), path: 'layers[2].digest', message: /not a digest/ },
  { name: 'short digest', kind: 'manifest', mutate: (d) => (d.layers[2].digest = 'sha256:abcd'), path: 'layers[2].digest', message: /needs 64 hex digits, not 4/ },
  { name: 'long sha512', kind: 'manifest', mutate: (d) => (d.config.digest = 'sha512:' + 'a'.repeat(129)), path: 'config.digest', message: /needs 128 hex digits/ },
  { name: 'unknown algorithm', kind: 'manifest', mutate: (d) => (d.layers[0].digest = 'md5:' + 'a'.repeat(32)), path: 'layers[0].digest', message: /not a digest/ },
  { name: 'digest with path', kind: 'manifest', mutate: (d) => (d.layers[0].digest = 'sha256:../../etc/passwd'), path: 'layers[0].digest', message: /not a digest/ },
  { name: 'digest number', kind: 'manifest', mutate: (d) => (d.layers[1].digest = 42), path: 'layers[1].digest', message: /want a string, got a number/ },
  { name: 'digest missing', kind: 'manifest', mutate: (d) => delete d.config.digest, path: 'config.digest', message: /want a string, got missing/ },
  // sizes
  { name: 'negative size', kind: 'manifest', mutate: (d) => (d.layers[2].size = -1), path: 'layers[2].size', message: /non-negative integer/ },
  { name: 'fractional size', kind: 'manifest', mutate: (d) => (d.layers[0].size = 1.5), path: 'layers[0].size', message: /non-negative integer/ },
  { name: 'unsafe size', kind: 'manifest', mutate: (d) => (d.layers[0].size = 2 ** 53), path: 'layers[0].size', message: /non-negative integer/ },
  { name: 'huge size', kind: 'manifest', mutate: (d) => (d.layers[0].size = 1e300), path: 'layers[0].size', message: /non-negative integer/ },
  { name: 'string size', kind: 'manifest', mutate: (d) => (d.config.size = '292'), path: 'config.size', message: /want a number, got a string/ },
  { name: 'null size', kind: 'manifest', mutate: (d) => (d.config.size = null), path: 'config.size', message: /got null/ },
  { name: 'missing size', kind: 'manifest', mutate: (d) => delete d.layers[1].size, path: 'layers[1].size', message: /got missing/ },
  // media types
  { name: 'empty media type', kind: 'manifest', mutate: (d) => (d.layers[0].mediaType = ''), path: 'layers[0].mediaType', message: /empty media type/ },
  { name: 'media type number', kind: 'manifest', mutate: (d) => (d.layers[0].mediaType = 7), path: 'layers[0].mediaType', message: /want a string/ },
  { name: 'media type garbage', kind: 'manifest', mutate: (d) => (d.layers[0].mediaType = 'tar\u0000gzip'), path: 'layers[0].mediaType', message: /is not a media type/ },
  { name: 'media type without subtype', kind: 'manifest', mutate: (d) => (d.config.mediaType = 'application'), path: 'config.mediaType', message: /is not a media type/ },
  { name: 'media type missing', kind: 'manifest', mutate: (d) => delete d.config.mediaType, path: 'config.mediaType', message: /got missing/ },
  { name: 'empty artifactType', kind: 'manifest', mutate: (d) => (d.artifactType = ''), path: 'artifactType', message: /empty media type/ },
  // urls
  { name: 'urls not an array', kind: 'manifest', mutate: (d) => (d.layers[1].urls = 'https://x/'), path: 'layers[1].urls', message: /want an array/ },
  { name: 'url not a string', kind: 'manifest', mutate: (d) => (d.layers[1].urls = ['https://x/', 5]), path: 'layers[1].urls[1]', message: /want a string, got a number/ },
  { name: 'url not a URL', kind: 'manifest', mutate: (d) => (d.layers[1].urls = ['not a url']), path: 'layers[1].urls[0]', message: /is not a URL/ },
  { name: 'file URL', kind: 'manifest', mutate: (d) => (d.layers[1].urls = ['file:///etc/shadow']), path: 'layers[1].urls[0]', message: /only http and https/ },
  // annotations
  { name: 'annotations array', kind: 'manifest', mutate: (d) => (d.layers[0].annotations = ['a']), path: 'layers[0].annotations', message: /got an array/ },
  { name: 'annotations null', kind: 'manifest', mutate: (d) => (d.annotations = null), path: 'annotations', message: /got null/ },
  { name: 'annotation value number', kind: 'manifest', mutate: (d) => (d.config.annotations = { 'org.example.n': 1 }), path: 'config.annotations["org.example.n"]', message: /want a string, got a number/ },
  { name: 'annotation value object', kind: 'manifest', mutate: (d) => (d.annotations = { ok: 'x', bad: {} }), path: 'annotations.bad', message: /got a object/ },
  // structure
  { name: 'config missing', kind: 'manifest', mutate: (d) => delete d.config, path: 'config', message: /missing/ },
  { name: 'config a string', kind: 'manifest', mutate: (d) => (d.config = D('a')), path: 'config', message: /want a descriptor object, got a string/ },
  { name: 'layers missing', kind: 'manifest', mutate: (d) => delete d.layers, path: 'layers', message: /want an array of descriptors, got missing/ },
  { name: 'layers an object', kind: 'manifest', mutate: (d) => (d.layers = { 0: d.layers[0] }), path: 'layers', message: /got a object/ },
  { name: 'layer null', kind: 'manifest', mutate: (d) => (d.layers[1] = null), path: 'layers[1]', message: /got null/ },
  { name: 'subject bad digest', kind: 'manifest', mutate: (d) => (d.subject = { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: 'sha256:x', size: 1 }), path: 'subject.digest', message: /not a digest/ },
  { name: 'schemaVersion missing', kind: 'manifest', mutate: (d) => delete d.schemaVersion, path: 'schemaVersion', message: /missing \(want 2\)/ },
  { name: 'schemaVersion 3', kind: 'manifest', mutate: (d) => (d.schemaVersion = 3), path: 'schemaVersion', message: /3 is not supported/ },
  { name: 'schemaVersion string', kind: 'manifest', mutate: (d) => (d.schemaVersion = '2'), path: 'schemaVersion', message: /"2" is not supported/ },
  { name: 'mediaType not a string', kind: 'manifest', mutate: (d) => (d.mediaType = ['x']), path: 'mediaType', message: /want a string, got an array/ },
  { name: 'unknown mediaType', kind: 'manifest', mutate: (d) => (d.mediaType = 'application/vnd.oci.artifact.manifest.v1+json'), path: 'mediaType', message: /unsupported media type/ , only: 'body' },
  { name: 'manifest with manifests', kind: 'manifest', mutate: (d) => ((d.mediaType = MEDIA_TYPE_OCI_MANIFEST), (d.manifests = [])), path: 'manifests', message: /must not have index fields/ , only: 'header' },
  // index entries
  { name: 'platform not an object', kind: 'index', mutate: (d) => (d.manifests[0].platform = 'linux/amd64'), path: 'manifests[0].platform', message: /want an object, got a string/ },
  { name: 'platform without architecture', kind: 'index', mutate: (d) => delete d.manifests[1].platform.architecture, path: 'manifests[1].platform.architecture', message: /got missing/ },
  { name: 'platform os number', kind: 'index', mutate: (d) => (d.manifests[1].platform.os = 1), path: 'manifests[1].platform.os', message: /got a number/ },
  { name: 'platform variant', kind: 'index', mutate: (d) => (d.manifests[1].platform.variant = true), path: 'manifests[1].platform.variant', message: /got a boolean/ },
  { name: 'platform os.features', kind: 'index', mutate: (d) => (d.manifests[0].platform['os.features'] = ['a', 2]), path: 'manifests[0].platform["os.features"][1]', message: /got a number/ },
  { name: 'platform os.version', kind: 'index', mutate: (d) => (d.manifests[0].platform['os.version'] = 10), path: 'manifests[0].platform["os.version"]', message: /got a number/ },
  { name: 'index entry bad digest', kind: 'index', mutate: (d) => (d.manifests[1].digest = 'sha256:' + 'f'.repeat(63)), path: 'manifests[1].digest', message: /needs 64/ },
  { name: 'index entry artifactType', kind: 'index', mutate: (d) => (d.manifests[1].artifactType = 'x'), path: 'manifests[1].artifactType', message: /not a media type/ },
  { name: 'manifests missing', kind: 'index', mutate: (d) => delete d.manifests, path: 'manifests', message: /got missing/ , only: 'header' },
  { name: 'index with layers', kind: 'index', mutate: (d) => (d.layers = []), path: 'layers', message: /must not have manifest fields/ , only: 'header' },
  { name: 'index with config', kind: 'index', mutate: (d) => (d.config = {}), path: 'config', message: /must not have manifest fields/ , only: 'header' },
];

t.test('validation failures name the subject and the JSON path', async (t) => {
  const manifestDoc = fx.amdBytes.toString('utf8');
  const indexDoc = new TextDecoder().decode(await realIndex(MEDIA_TYPE_OCI_INDEX));
  for (const c of badCases) {
    const doc = JSON.parse(c.kind === 'manifest' ? manifestDoc : indexDoc) as Record<string, unknown>;
    c.mutate(doc);
    const ct = c.kind === 'manifest' ? MEDIA_TYPE_OCI_MANIFEST : MEDIA_TYPE_OCI_INDEX;
    // With the Content-Type, and (where the case does not depend on it) without: the JSON decides.
    for (const header of [ct, undefined]) {
      if ((c.only === 'header' && header === undefined) || (c.only === 'body' && header !== undefined)) continue;
      let err: unknown;
      try {
        parseManifest(enc(doc), header, REF);
      } catch (e) {
        err = e;
      }
      if (!(err instanceof ManifestError)) {
        t.fail(`${c.name} (${header ?? 'no Content-Type'}): expected ManifestError, got ${String(err)}`);
        continue;
      }
      t.ok(err instanceof FetcherError, `${c.name}: a FetcherError`);
      t.equal(err.subject, REF, `${c.name}: subject`);
      if (c.path !== undefined) {
        t.equal(err.path, c.path, `${c.name}: path`);
        t.ok(err.message.startsWith(`${REF}: ${c.path}: `), `${c.name}: message starts with subject and path: ${err.message}`);
      }
      t.match(err.message, c.message, `${c.name}: reason`);
    }
  }
});

t.test('the parsed objects hold only checked fields', async (t) => {
  const doc = JSON.parse(fx.amdBytes.toString('utf8')) as Record<string, any>;
  doc['unknownTop'] = { evil: true };
  doc.layers[0].unknown = 1;
  doc.layers[0].annotations = { 'org.example': 'y' };
  // An own "__proto__" key can only come from JSON text (a literal would set the prototype).
  const text = JSON.stringify(doc).replace('"annotations":{', '"annotations":{"__proto__":"polluted",');
  const m = asManifest(parseManifest(enc(text), undefined, REF));
  t.notOk('unknownTop' in m);
  t.notOk('unknown' in m.layers[0]!);
  const ann = m.layers[0]!.annotations!;
  t.equal(Object.getPrototypeOf(ann), Object.prototype, 'prototype untouched');
  t.equal(Object.getOwnPropertyDescriptor(ann, '__proto__')?.value, 'polluted', '__proto__ is a plain key');
  t.equal(ann['org.example'], 'y');
  t.equal(({} as Record<string, unknown>)['polluted'], undefined);

  // Valid edge values pass: size 0, sha512, http(s) urls, empty layers (umoci new makes such images).
  const edge = {
    schemaVersion: 2,
    config: { mediaType: 'application/vnd.oci.empty.v1+json', digest: 'sha512:' + 'c'.repeat(128), size: 0 },
    layers: [],
    subject: { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: D('d'), size: Number.MAX_SAFE_INTEGER, urls: ['http://a.example/b', 'https://c.example/'] },
    artifactType: 'application/vnd.example.thing',
  };
  const r = asManifest(parseManifest(enc(edge), MEDIA_TYPE_OCI_MANIFEST, REF));
  t.same(r, edge);
});

t.test('not a manifest at all', async (t) => {
  const cases: [string, Uint8Array, RegExp][] = [
    ['empty body', new Uint8Array(), /not JSON/],
    ['text', enc('<html>rate limited</html>'), /not JSON/],
    ['truncated', enc('{"schemaVersion": 2, "layers": ['), /not JSON/],
    ['invalid UTF-8', new Uint8Array([0x7b, 0xff, 0x7d]), /not UTF-8/],
    ['array', enc([]), /want a JSON object, got an array/],
    ['string', enc('"manifest"'), /want a JSON object, got a string/],
    ['null', enc('null'), /want a JSON object, got null/],
    ['number', enc('2'), /want a JSON object, got a number/],
    ['empty object', enc({}), /neither a manifest .* nor an index/],
    ['only schemaVersion', enc({ schemaVersion: 2 }), /neither a manifest/],
    ['ambiguous', enc({ schemaVersion: 2, manifests: [], layers: [], config: {} }), /ambiguous/],
  ];
  for (const [name, bytes, re] of cases) {
    t.throws(() => parseManifest(bytes, undefined, REF), { name: 'ManifestError', subject: REF, message: re }, name);
  }
  const big = new Uint8Array(MAX_MANIFEST_BYTES + 1).fill(0x20);
  t.throws(() => parseManifest(big, MEDIA_TYPE_OCI_MANIFEST, REF), { name: 'ManifestError', message: /more than the 4194304/ }, 'too large');
  const err = t.throws(() => parseManifest(enc('{'), undefined, REF)) as ManifestError;
  t.ok(err.cause instanceof SyntaxError, 'the JSON error is the cause');
});

t.test('media type from Content-Type and body', async (t) => {
  const manifest = { schemaVersion: 2, config: { mediaType: MEDIA_TYPE_OCI_CONFIG, digest: D('1'), size: 2 }, layers: [] };
  const index = { schemaVersion: 2, manifests: [] };
  const m = enc(manifest);
  const withType = (doc: object, mediaType: string): Uint8Array => enc({ ...doc, mediaType });

  t.equal(parseManifest(m, undefined, REF).mediaType, MEDIA_TYPE_OCI_MANIFEST, 'neither: `layers`/`config` make a manifest');
  t.equal(parseManifest(enc(index), undefined, REF).mediaType, MEDIA_TYPE_OCI_INDEX, 'neither: `manifests` makes an index');
  t.equal(parseManifest(enc({ schemaVersion: 2, layers: [], config: manifest.config }), '', REF).kind, 'manifest');
  t.equal(parseManifest(m, MEDIA_TYPE_DOCKER_MANIFEST, REF).mediaType, MEDIA_TYPE_DOCKER_MANIFEST, 'header only');
  t.equal(parseManifest(m, `  ${MEDIA_TYPE_OCI_MANIFEST.toUpperCase()} ; charset="utf-8"`, REF).mediaType, MEDIA_TYPE_OCI_MANIFEST, 'header case and parameters ignored');
  t.equal(parseManifest(withType(manifest, MEDIA_TYPE_DOCKER_MANIFEST), 'text/plain; charset=utf-8', REF).mediaType, MEDIA_TYPE_DOCKER_MANIFEST, 'generic header: body decides');
  t.equal(parseManifest(withType(index, MEDIA_TYPE_DOCKER_MANIFEST_LIST), MEDIA_TYPE_DOCKER_MANIFEST_LIST, REF).kind, 'index', 'both agree');
  const r = parseManifest(withType(index, MEDIA_TYPE_OCI_INDEX), undefined, REF);
  t.equal(asIndex(r).mediaType, MEDIA_TYPE_OCI_INDEX, 'the body mediaType is kept on the object');

  const disagree: [Uint8Array, string][] = [
    [withType(manifest, MEDIA_TYPE_OCI_MANIFEST), MEDIA_TYPE_DOCKER_MANIFEST],
    [withType(manifest, MEDIA_TYPE_OCI_MANIFEST), MEDIA_TYPE_OCI_INDEX],
    [withType(index, MEDIA_TYPE_OCI_INDEX), MEDIA_TYPE_DOCKER_MANIFEST_LIST],
    [withType(manifest, MEDIA_TYPE_DOCKER_MANIFEST), 'application/vnd.example.other+json'],
  ];
  for (const [bytes, ct] of disagree) {
    t.throws(() => parseManifest(bytes, ct, REF), { name: 'ManifestError', path: 'mediaType', message: /disagrees with the Content-Type/ }, `body vs ${ct}`);
  }
  // The declared kind must fit the document.
  t.throws(() => parseManifest(enc(index), MEDIA_TYPE_OCI_MANIFEST, REF), { name: 'ManifestError', path: 'manifests', message: /must not have index fields/ });
  t.throws(() => parseManifest(m, MEDIA_TYPE_DOCKER_MANIFEST_LIST, REF), { name: 'ManifestError', path: 'config', message: /must not have manifest fields/ });
  t.throws(() => parseManifest(m, 'application/vnd.oci.image.config.v1+json', REF), { name: 'ManifestError', message: /unsupported media type "application\/vnd\.oci\.image\.config\.v1\+json"/ });
  t.throws(() => parseManifest(m, 'application/vnd.docker.distribution.manifest.v3+json', REF), { name: 'ManifestError', message: /unsupported media type/ });
});

t.test('schema 1 is refused clearly', async (t) => {
  const v1 = {
    schemaVersion: 1,
    name: 'team/app',
    tag: 'v1',
    architecture: 'amd64',
    fsLayers: [{ blobSum: D('a') }],
    history: [{ v1Compatibility: '{}' }],
  };
  const cases: [string, Uint8Array, string | undefined][] = [
    ['v1+json Content-Type', enc(v1), MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST],
    ['prettyjws Content-Type', enc(v1), MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST],
    ['prettyjws with parameters, body not even read', enc('garbage'), `${MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST}; charset=utf-8`],
    ['schemaVersion 1, no Content-Type', enc(v1), undefined],
    ['schemaVersion 1, generic Content-Type', enc(v1), 'application/json'],
    ['schemaVersion 1 served as schema 2', enc(v1), MEDIA_TYPE_DOCKER_MANIFEST],
    ['body media type v1', enc({ ...v1, schemaVersion: 2, mediaType: MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST }), undefined],
  ];
  for (const [name, bytes, ct] of cases) {
    t.throws(() => parseManifest(bytes, ct, REF), { name: 'ManifestError', subject: REF, message: /schema 1 is not supported/ }, name);
  }
});

// ---------------------------------------------------------------------------------------
// Platforms

t.test('normalizePlatform: containerd normalisation table', async (t) => {
  const table: [Platform, Platform][] = [
    [{ os: 'linux', architecture: 'aarch64' }, { os: 'linux', architecture: 'arm64' }],
    [{ os: 'linux', architecture: 'arm64', variant: 'v8' }, { os: 'linux', architecture: 'arm64' }],
    [{ os: 'linux', architecture: 'arm64', variant: '8' }, { os: 'linux', architecture: 'arm64' }],
    [{ os: 'linux', architecture: 'aarch64', variant: 'V8' }, { os: 'linux', architecture: 'arm64' }],
    [{ os: 'linux', architecture: 'arm64', variant: 'v8.2' }, { os: 'linux', architecture: 'arm64', variant: 'v8.2' }],
    [{ os: 'linux', architecture: 'x86_64' }, { os: 'linux', architecture: 'amd64' }],
    [{ os: 'linux', architecture: 'x86-64' }, { os: 'linux', architecture: 'amd64' }],
    [{ os: 'linux', architecture: 'amd64', variant: 'v1' }, { os: 'linux', architecture: 'amd64' }],
    [{ os: 'linux', architecture: 'amd64', variant: 'v3' }, { os: 'linux', architecture: 'amd64', variant: 'v3' }],
    [{ os: 'Linux', architecture: 'AMD64' }, { os: 'linux', architecture: 'amd64' }],
    [{ os: 'linux', architecture: 'i386' }, { os: 'linux', architecture: '386' }],
    [{ os: 'linux', architecture: 'armhf' }, { os: 'linux', architecture: 'arm', variant: 'v7' }],
    [{ os: 'linux', architecture: 'armel' }, { os: 'linux', architecture: 'arm', variant: 'v6' }],
    [{ os: 'linux', architecture: 'arm' }, { os: 'linux', architecture: 'arm', variant: 'v7' }],
    [{ os: 'linux', architecture: 'arm', variant: '7' }, { os: 'linux', architecture: 'arm', variant: 'v7' }],
    [{ os: 'linux', architecture: 'arm', variant: '6' }, { os: 'linux', architecture: 'arm', variant: 'v6' }],
    [{ os: 'linux', architecture: 'arm', variant: 'v5' }, { os: 'linux', architecture: 'arm', variant: 'v5' }],
    [{ os: 'MacOS', architecture: 'arm64' }, { os: 'darwin', architecture: 'arm64' }],
    [{ os: 'linux', architecture: 's390x' }, { os: 'linux', architecture: 's390x' }],
    [
      { os: 'windows', architecture: 'amd64', 'os.version': '10.0.17763.1', 'os.features': ['win32k', 'a', 'win32k'] },
      { os: 'windows', architecture: 'amd64', 'os.version': '10.0.17763.1', 'os.features': ['a', 'win32k'] },
    ],
  ];
  for (const [input, want] of table) {
    const before = structuredClone(input);
    t.same(normalizePlatform(input), want, formatPlatform(input));
    t.same(input, before, 'input not modified');
  }
});

t.test('parsePlatform and formatPlatform', async (t) => {
  const host: Platform = { os: 'linux', architecture: 'arm64', variant: 'v8' };
  const table: [string, Platform, string][] = [
    ['linux/arm64/v8', { os: 'linux', architecture: 'arm64' }, 'linux/arm64'],
    ['linux/arm64', { os: 'linux', architecture: 'arm64' }, 'linux/arm64'],
    ['linux/aarch64', { os: 'linux', architecture: 'arm64' }, 'linux/arm64'],
    ['linux/amd64', { os: 'linux', architecture: 'amd64' }, 'linux/amd64'],
    ['linux/x86_64', { os: 'linux', architecture: 'amd64' }, 'linux/amd64'],
    ['linux/amd64/v3', { os: 'linux', architecture: 'amd64', variant: 'v3' }, 'linux/amd64/v3'],
    ['linux/arm', { os: 'linux', architecture: 'arm', variant: 'v7' }, 'linux/arm/v7'],
    ['linux/arm/v6', { os: 'linux', architecture: 'arm', variant: 'v6' }, 'linux/arm/v6'],
    ['linux/armhf', { os: 'linux', architecture: 'arm', variant: 'v7' }, 'linux/arm/v7'],
    ['LINUX/I386', { os: 'linux', architecture: '386' }, 'linux/386'],
    ['linux', { os: 'linux', architecture: 'arm64' }, 'linux/arm64'],
    ['windows', { os: 'windows', architecture: 'arm64' }, 'windows/arm64'],
    ['amd64', { os: 'linux', architecture: 'amd64' }, 'linux/amd64'],
    ['aarch64', { os: 'linux', architecture: 'arm64' }, 'linux/arm64'],
    ['armel', { os: 'linux', architecture: 'arm', variant: 'v6' }, 'linux/arm/v6'],
    ['windows(10.0.17763)/amd64', { os: 'windows', architecture: 'amd64', 'os.version': '10.0.17763' }, 'windows(10.0.17763)/amd64'],
    [
      'windows(10.0.20348+win32k+a%2Bb)/amd64',
      { os: 'windows', architecture: 'amd64', 'os.version': '10.0.20348', 'os.features': ['a+b', 'win32k'] },
      'windows(10.0.20348+a%2Bb+win32k)/amd64',
    ],
  ];
  for (const [spec, want, formatted] of table) {
    const p = parsePlatform(spec, host);
    t.same(p, want, spec);
    t.equal(formatPlatform(p), formatted, `format ${spec}`);
    t.same(parsePlatform(formatPlatform(p), host), p, `round trip ${spec}`);
  }
  t.equal(formatPlatform({ os: '', architecture: 'amd64' }), 'unknown');
  t.equal(formatPlatform({ os: 'linux', architecture: 'arm64', variant: 'v8' }), 'linux/arm64/v8', 'format does not normalise');
  t.same(parsePlatform('linux'), { ...normalizePlatform(hostPlatform()), os: 'linux' }, 'os only: the host architecture by default');

  for (const bad of ['', 'linux/*', '*', 'linux/arm/v7/extra', 'linux//arm', 'linux/arm 64', '/amd64', 'notanos', 'linux(', 'linux/amd64/', 'plan 9']) {
    t.throws(() => parsePlatform(bad, host), { name: 'ManifestError', message: /invalid platform/ }, `rejects ${JSON.stringify(bad)}`);
  }
});

t.test('hostPlatform', async (t) => {
  const table: [Parameters<typeof hostPlatform>[0], Platform][] = [
    [{ platform: 'linux', arch: 'x64' }, { os: 'linux', architecture: 'amd64' }],
    [{ platform: 'linux', arch: 'arm64' }, { os: 'linux', architecture: 'arm64', variant: 'v8' }],
    [{ platform: 'linux', arch: 'arm', armVersion: '6' }, { os: 'linux', architecture: 'arm', variant: 'v6' }],
    [{ platform: 'linux', arch: 'arm', armVersion: 7 }, { os: 'linux', architecture: 'arm', variant: 'v7' }],
    [{ platform: 'linux', arch: 'arm' }, { os: 'linux', architecture: 'arm', variant: 'v7' }],
    [{ platform: 'linux', arch: 'ia32' }, { os: 'linux', architecture: '386' }],
    [{ platform: 'linux', arch: 'ppc64', endianness: 'LE' }, { os: 'linux', architecture: 'ppc64le' }],
    [{ platform: 'aix', arch: 'ppc64', endianness: 'BE' }, { os: 'aix', architecture: 'ppc64' }],
    [{ platform: 'linux', arch: 's390x' }, { os: 'linux', architecture: 's390x' }],
    [{ platform: 'linux', arch: 'riscv64' }, { os: 'linux', architecture: 'riscv64' }],
    [{ platform: 'win32', arch: 'x64' }, { os: 'windows', architecture: 'amd64' }],
    [{ platform: 'darwin', arch: 'arm64' }, { os: 'darwin', architecture: 'arm64', variant: 'v8' }],
  ];
  for (const [env, want] of table) t.same(hostPlatform(env), want, JSON.stringify(env));
  const here = hostPlatform();
  t.equal(here.os, process.platform === 'win32' ? 'windows' : process.platform);
  const arch = ({ x64: 'amd64', arm64: 'arm64', arm: 'arm', ia32: '386' } as Record<string, string>)[process.arch];
  if (arch !== undefined) t.equal(here.architecture, arch, `this host (${process.arch})`);
});

t.test('platformMatches', async (t) => {
  const table: [string, string, boolean][] = [
    ['linux/arm64', 'linux/arm64/v8', true],
    ['linux/arm64/v8', 'linux/arm64', true],
    ['linux/aarch64', 'linux/arm64', true],
    ['linux/arm', 'linux/arm/v7', true],
    ['linux/armhf', 'linux/arm', true],
    ['linux/arm/v7', 'linux/arm/v6', false],
    ['linux/arm/v6', 'linux/arm/v7', false],
    ['linux/amd64', 'linux/386', false],
    ['linux/amd64', 'linux/x86_64', true],
    ['linux/amd64', 'linux/amd64/v2', false],
    ['linux/amd64', 'windows/amd64', false],
    ['linux/arm64', 'linux/arm64/v8.2', false],
  ];
  for (const [want, have, ok] of table) {
    t.equal(platformMatches(parsePlatform(want), parsePlatform(have)), ok, `${want} vs ${have}`);
  }
  const lx = (p: Partial<Platform>): Platform => ({ os: 'linux', architecture: 'amd64', ...p });
  t.ok(platformMatches(lx({ 'os.features': ['a', 'b'] }), lx({ 'os.features': ['b'] })), "image's features a subset");
  t.ok(platformMatches(lx({ 'os.features': ['a'] }), lx({})), 'image without features');
  t.notOk(platformMatches(lx({ 'os.features': ['a'] }), lx({ 'os.features': ['c'] })), 'a feature the host lacks');
  t.notOk(platformMatches(lx({}), lx({ 'os.features': ['a'] })));
  t.ok(platformMatches(lx({ 'os.version': '1' }), lx({ 'os.version': '2' })), 'os.version ignored off windows');

  const win = (v?: string): Platform => ({ os: 'windows', architecture: 'amd64', ...(v === undefined ? {} : { 'os.version': v }) });
  t.ok(platformMatches(win('10.0.17763.100'), win('10.0.17763.5')), 'pre-2022 host: same build');
  t.notOk(platformMatches(win('10.0.17763.100'), win('10.0.20348.1')), 'pre-2022 host: other build');
  t.ok(platformMatches(win('10.0.26100.1'), win('10.0.20348.2')), '2022+ host runs LTSC 2022 images');
  t.notOk(platformMatches(win('10.0.26100.1'), win('10.0.17763.2')), '2022+ host does not run 2019 images');
  t.notOk(platformMatches(win('10.0.20348.1'), win('10.0.26100.1')), 'newer image than host');
  t.ok(platformMatches(win(), win('10.0.17763.5')), 'no host version: any');
  t.ok(platformMatches(win('10.0.17763.1'), win()), 'no image version: any');
});

t.test('compatiblePlatforms: containerd Only order', async (t) => {
  const f = (spec: string): string[] => compatiblePlatforms(spec).map(formatPlatform);
  t.same(f('linux/amd64'), ['linux/amd64', 'linux/386'], 'amd64 also runs 386 (as containerd Only)');
  t.same(f('linux/amd64/v3'), ['linux/amd64/v3', 'linux/amd64/v2', 'linux/amd64', 'linux/386']);
  t.same(f('linux/386'), ['linux/386']);
  t.same(f('linux/arm64'), ['linux/arm64', 'linux/arm/v8', 'linux/arm/v7', 'linux/arm/v6', 'linux/arm/v5']);
  t.same(f('linux/arm64/v8'), f('linux/arm64'));
  t.same(f('linux/arm64/v8.2'), ['linux/arm64/v8.2', 'linux/arm64/v8.1', 'linux/arm64', 'linux/arm/v8', 'linux/arm/v7', 'linux/arm/v6', 'linux/arm/v5']);
  t.same(f('linux/arm64/v9.1'), [
    'linux/arm64/v9.1', 'linux/arm64/v9', 'linux/arm64/v8.6', 'linux/arm64/v8.5', 'linux/arm64/v8.4', 'linux/arm64/v8.3',
    'linux/arm64/v8.2', 'linux/arm64/v8.1', 'linux/arm64', 'linux/arm/v8', 'linux/arm/v7', 'linux/arm/v6', 'linux/arm/v5',
  ]);
  t.same(f('linux/arm'), ['linux/arm/v7', 'linux/arm/v6', 'linux/arm/v5']);
  t.same(f('linux/arm/v6'), ['linux/arm/v6', 'linux/arm/v5']);
  t.same(f('linux/arm/v5'), ['linux/arm/v5']);
  t.same(f('linux/riscv64'), ['linux/riscv64']);
  t.same(compatiblePlatforms({ os: 'linux', architecture: 'aarch64' }).map(formatPlatform), f('linux/arm64'));
});

/** An index of descriptors with the given platforms (`null`: no platform). */
function indexOf(entries: (string | null | Partial<Descriptor>)[]): ImageIndex {
  return {
    schemaVersion: 2,
    mediaType: MEDIA_TYPE_OCI_INDEX,
    manifests: entries.map((e, i) => {
      const base: Descriptor = { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: D(((i % 15) + 1).toString(16)), size: 100 + i };
      if (e === null) return base;
      if (typeof e === 'string') {
        const [os, architecture, variant] = e.split('/');
        return { ...base, platform: { os: os!, architecture: architecture!, ...(variant === undefined ? {} : { variant }) } };
      }
      return { ...base, ...e };
    }),
  };
}
const attestation = (i: number): Partial<Descriptor> => ({
  platform: { os: 'unknown', architecture: 'unknown' },
  annotations: { 'vnd.docker.reference.type': 'attestation-manifest', 'vnd.docker.reference.digest': D(String(i)) },
});

t.test('selectManifests', async (t) => {
  // A buildkit-style index: images, then their attestation manifests, plus a SOCI v2 index entry.
  const idx = indexOf([
    { platform: { os: 'linux', architecture: 'amd64' }, artifactType: 'application/vnd.amazon.soci.index.v2+json' },
    'linux/amd64',
    'linux/arm64/v8',
    'linux/arm/v7',
    'linux/ppc64le',
    attestation(2),
    attestation(3),
    null,
    { mediaType: MEDIA_TYPE_OCI_INDEX, platform: { os: 'linux', architecture: 'amd64' } },
  ]);
  const pick = (platform: string | Platform): string => {
    const got = selectManifests(idx, { platform });
    t.equal(got.length, 1);
    return got[0]!.digest;
  };
  const digestOf = (i: number): string => idx.manifests[i]!.digest;

  t.equal(pick('linux/amd64'), digestOf(1), 'amd64: the image, not the SOCI index before it');
  t.equal(pick('linux/arm64'), digestOf(2), 'arm64 matches arm64/v8');
  t.equal(pick('linux/arm64/v8'), digestOf(2));
  t.equal(pick({ os: 'linux', architecture: 'aarch64' }), digestOf(2));
  t.equal(pick('linux/arm'), digestOf(3));
  t.equal(pick('linux/arm/v8'), digestOf(3), 'arm/v8 falls back to v7');
  t.equal(pick('linux/ppc64le'), digestOf(4));

  const all = selectManifests(idx, { all: true });
  t.same(all.map((d) => formatPlatform(d.platform!)), ['linux/amd64', 'linux/arm64/v8', 'linux/arm/v7', 'linux/ppc64le'], 'all: images only, index order');
  t.same(selectManifests(idx, { all: true, platform: 'linux/s390x' }), all, 'all ignores platform');

  const err = t.throws(() => selectManifests(idx, { platform: 'linux/arm/v6', subject: REF })) as ManifestError;
  t.ok(err instanceof ManifestError);
  t.equal(err.subject, REF);
  t.equal(err.message, `${REF}: no image manifest for platform linux/arm/v6; available: linux/amd64, linux/arm64, linux/arm/v7, linux/ppc64le`);
  t.throws(() => selectManifests(idx, { platform: 'windows/amd64' }), { name: 'ManifestError', subject: 'image index', message: /no image manifest for platform windows\/amd64; available: linux\/amd64/ });
  t.throws(() => selectManifests(idx, { platform: 'linux/amd64/v2/x' }), { name: 'ManifestError', message: /invalid platform/ });

  // arm64 host: 32-bit arm images in Only's order, whatever the index order.
  const armOnly = indexOf(['linux/arm/v5', 'linux/arm/v6', 'linux/arm/v7']);
  t.equal(selectManifests(armOnly, { platform: 'linux/arm64' })[0]!.digest, armOnly.manifests[2]!.digest, 'arm64 host takes arm/v7 first');
  t.equal(selectManifests(armOnly, { platform: 'linux/arm/v6' })[0]!.digest, armOnly.manifests[1]!.digest);
  t.throws(() => selectManifests(armOnly, { platform: 'linux/amd64' }), { message: /available: linux\/arm\/v5, linux\/arm\/v6, linux\/arm\/v7/ });

  // amd64 host: 386 accepted when it is all there is, amd64 preferred when both are.
  t.equal(selectManifests(indexOf(['linux/386']), { platform: 'linux/amd64' }).length, 1);
  const both = indexOf(['linux/386', 'linux/amd64']);
  t.equal(selectManifests(both, { platform: 'linux/amd64' })[0]!.digest, both.manifests[1]!.digest);
  t.throws(() => selectManifests(indexOf(['linux/amd64']), { platform: 'linux/386' }), ManifestError, '386 host does not run amd64');

  // Ties: the first in the index wins, as containerd's stable sort.
  const twice = indexOf(['linux/arm64', 'linux/arm64/v8', 'linux/aarch64']);
  t.equal(selectManifests(twice, { platform: 'linux/arm64' })[0]!.digest, twice.manifests[0]!.digest);

  // Variants: arm64/v8.2 host prefers v8.2, then v8.1, then plain arm64.
  const revs = indexOf(['linux/arm64', 'linux/arm64/v8.1', 'linux/arm64/v8.2', 'linux/arm64/v9']);
  t.equal(selectManifests(revs, { platform: 'linux/arm64/v8.2' })[0]!.platform!.variant, 'v8.2');
  t.equal(selectManifests(revs, { platform: 'linux/arm64/v8.1' })[0]!.platform!.variant, 'v8.1');
  t.equal(selectManifests(revs, { platform: 'linux/arm64' })[0]!.platform!.variant, undefined);

  // Only attestations (or nothing with a platform): a clear error, for one or all.
  const attOnly = indexOf([attestation(1), null, { platform: { os: 'linux', architecture: '' } }]);
  t.throws(() => selectManifests(attOnly, { all: true, subject: REF }), { name: 'ManifestError', message: /no image manifests: the index lists no image manifests with a platform/ });
  t.throws(() => selectManifests(attOnly, { platform: 'linux/amd64' }), { message: /lists no image manifests with a platform/ });

  // Windows: os.version decides.
  const winIdx = indexOf([
    { platform: { os: 'windows', architecture: 'amd64', 'os.version': '10.0.17763.5329' } },
    { platform: { os: 'windows', architecture: 'amd64', 'os.version': '10.0.20348.2227' } },
  ]);
  t.equal(selectManifests(winIdx, { platform: { os: 'windows', architecture: 'amd64', 'os.version': '10.0.20348.100' } })[0]!.digest, winIdx.manifests[1]!.digest);
  t.equal(selectManifests(winIdx, { platform: 'windows(10.0.17763.1)/amd64' })[0]!.digest, winIdx.manifests[0]!.digest);

  // Default platform: the host's.
  const hostIdx = indexOf([formatPlatform(normalizePlatform(hostPlatform()))]);
  t.equal(selectManifests(hostIdx).length, 1, 'default platform is the host');
});

/**
 * Finding an image's SOCI index against a real registry (CNCF registry 2.8: no referrers API,
 * so v1 indexes are found through the sha256-<hex> fallback tag): an index pushed by
 * `soci-ts create --push` (v1), one made by `soci-ts convert` (v2), one only in the local store,
 * none at all; the choice among several; corrupt index manifests and zTOCs give typed errors.
 * Oracles: the registry's own answers (the fallback tag, the converted image index, blob bytes
 * hashed here) and the image layout skopeo pushed.
 */
import t, { type Test } from 'tap';
import { createHash } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startRegistry, registryRequest } from './helpers/registry.js';
import { defaultImages, pushImage } from './helpers/images.js';
import { RegistryClient, MEDIA_TYPE_OCI_INDEX, type Descriptor, type Repository } from '../fetcher/index.js';
import { ANNOTATION_INDEX_DIGEST, EMPTY_CONFIG_DIGEST, MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_SOCI_INDEX_V1, MEDIA_TYPE_SOCI_INDEX_V2, ANNOTATION_LAYER_DIGEST, ANNOTATION_LAYER_MEDIA_TYPE } from '../ztoc/index.js';
import { ArtifactStore } from '../daemon/store.js';
import { resolveImages } from '../daemon/workflow.js';
import { DiscoverError, discoverIndex, pickNewest, type DiscoverTarget } from '../daemon/discover.js';

/** Index digests the subtests below create (the pull-mode subtest uses them). */
const made = { v1: '', local: '', v2: '', v2Ref: '' };
import { runCli, type CliResult } from './helpers/cli.js';

const cli = (args: string[]): Promise<CliResult> => runCli(args);

const sha = (b: Uint8Array): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

const reg = await startRegistry();
t.teardown(() => reg.stop());
const image = (await defaultImages()).multi;
const plain = await pushImage(image.layoutDir, image.tag, reg, 'discover/plain');
const v1 = await pushImage(image.layoutDir, image.tag, reg, 'discover/v1');
const work = await mkdtemp(join(tmpdir(), 'soci-ts-discover-'));
t.teardown(() => rm(work, { recursive: true, force: true }));
const client = new RegistryClient({ hostsDir: '', credentials: { configPath: join(work, 'no-docker-config.json') } });
t.teardown(() => client.close());
const common = (root: string): string[] => ['--root', join(work, root), '--hosts-dir', ''];
const indexedLayers = image.layers.filter((l) => l.size >= 10 << 20).map((l) => l.digest);

async function target(ref: string): Promise<{ repo: Repository; target: DiscoverTarget }> {
  const repo = client.repository(ref);
  const r = await resolveImages(repo, {});
  const img = r.images[0]!;
  return { repo, target: { descriptor: img.descriptor, manifest: img.manifest, index: r.index } };
}

async function rejectsWith(t: Test, p: Promise<unknown>, kind: string, re: RegExp, what: string): Promise<void> {
  try {
    await p;
    t.fail(`${what}: resolved`);
  } catch (err) {
    t.ok(err instanceof DiscoverError, `${what}: a DiscoverError (${(err as Error).message})`);
    t.equal((err as DiscoverError).kind, kind, `${what}: kind ${kind}`);
    t.match((err as Error).message, re, `${what}: message`);
  }
}

t.test('pickNewest: by created annotation, then later position', async (t) => {
  const d = (digit: string, created?: string): Descriptor => ({
    mediaType: MEDIA_TYPE_OCI_MANIFEST,
    digest: `sha256:${digit.repeat(64)}`,
    size: 1,
    ...(created === undefined ? {} : { annotations: { 'org.opencontainers.image.created': created } }),
  });
  t.equal(pickNewest([]), undefined);
  t.equal(pickNewest([d('1'), d('2')])?.digest, d('2').digest, 'no dates: the later entry');
  t.equal(pickNewest([d('1', '2030-01-01T00:00:00Z'), d('2', '2020-01-01T00:00:00Z'), d('3')])?.digest, d('1').digest, 'the newest date wins over position');
  t.equal(pickNewest([d('1', 'not a date'), d('2')])?.digest, d('2').digest, 'an unparsable date counts as none');
  t.equal(pickNewest([d('1', '2030-01-01T00:00:00Z'), d('2', '2030-01-01T00:00:00Z')])?.digest, d('2').digest, 'equal dates: the later entry');
});

t.test('v1: pushed by create --push, found through the fallback tag', async (t) => {
  const r = await cli(['create', v1.ref, '--push', '--json', ...common('root-v1')]);
  t.equal(r.code, 0, r.stderr);
  const created = (JSON.parse(r.stdout) as { indexes: Array<{ index: string }> }).indexes[0]!.index;
  made.v1 = created;
  // Oracle: what the registry holds under the fallback tag.
  const raw = await registryRequest(reg, `/v2/discover/v1/manifests/${v1.manifestDigest.replace(':', '-')}`, { headers: { accept: MEDIA_TYPE_OCI_INDEX } });
  t.equal(raw.status, 200, 'the fallback tag exists');
  const listed = (JSON.parse(raw.body.toString('utf8')) as { manifests: Descriptor[] }).manifests.filter((m) => m.artifactType === MEDIA_TYPE_SOCI_INDEX_V1);
  t.same(listed.map((m) => m.digest), [created], 'the registry lists the created index');

  const store = new ArtifactStore({ root: join(work, 'cache-v1') });
  const { repo, target: tg } = await target(v1.ref);
  const found = await discoverIndex(repo, tg, { store });
  t.equal(found.source, 'v1', 'found as v1 (the store is empty)');
  t.equal(found.digest, created, 'the index create pushed');
  t.equal(found.version, 'v1');
  t.same([...found.ztocs.keys()].sort(), [...indexedLayers].sort(), 'one zTOC per layer of at least 10 MiB');
  for (const layer of image.layers) {
    if (!indexedLayers.includes(layer.digest)) {
      t.equal(found.ztocFor(layer.digest), undefined, `no zTOC for the small layer ${layer.digest.slice(0, 19)}`);
      await rejectsWith(t, found.loadZtoc(layer.digest), 'no-ztoc', /has no zTOC for this layer/, 'zTOC of a small layer');
      continue;
    }
    const desc = found.ztocFor(layer.digest)!;
    const blob = await registryRequest(reg, `/v2/discover/v1/blobs/${desc.digest}`);
    t.equal(sha(blob.body), desc.digest, 'the registry serves the zTOC under its digest');
    const [a, b] = await Promise.all([found.loadZtoc(layer.digest), found.loadZtoc(layer.digest)]);
    t.equal(a, b, 'concurrent loads share one fetch');
    t.equal(a.ztoc.compressedArchiveSize, layer.size, 'the zTOC indexes a blob of the layer size');
    t.ok(await store.hasBlob(desc.digest), 'the fetched zTOC is kept in the store');
    t.equal(sha(await store.readBlob(desc.digest)), desc.digest, 'byte-identical');
  }
  // Without a store, the same.
  const again = await discoverIndex(repo, tg);
  t.equal(again.digest, created, 'no store: the same index');
});

t.test('store only: create without --push', async (t) => {
  const r = await cli(['create', plain.ref, '--json', ...common('root-local')]);
  t.equal(r.code, 0, r.stderr);
  const created = (JSON.parse(r.stdout) as { indexes: Array<{ index: string }> }).indexes[0]!.index;
  made.local = created;
  const { repo, target: tg } = await target(plain.ref);
  const store = new ArtifactStore({ root: join(work, 'root-local') });
  const found = await discoverIndex(repo, tg, { store });
  t.equal(found.source, 'store');
  t.equal(found.digest, created, 'the index in the store');
  const layer = indexedLayers[0]!;
  const z = await found.loadZtoc(layer);
  t.equal(z.ztoc.compressedArchiveSize, image.layers.find((l) => l.digest === layer)!.size, 'zTOC read from the store');
  // The registry has no index for this image: without the store, nothing.
  await rejectsWith(t, discoverIndex(repo, tg), 'no-index', /discover\/plain@sha256:[0-9a-f]{64}: no SOCI index: .*no com\.amazon\.soci\.index-digest annotation.*no v1 SOCI index among its referrers \(fallback tag sha256-/, 'no store');
  await rejectsWith(t, discoverIndex(repo, tg, { store: new ArtifactStore({ root: join(work, 'empty') }) }), 'no-index', /none in the local store/, 'an empty store');
});

t.test('v2: a SOCI-enabled image made by convert', async (t) => {
  const dst = `${reg.host}/discover/v2:soci`;
  const r = await cli(['convert', plain.ref, dst, '--json', ...common('root-v2')]);
  t.equal(r.code, 0, r.stderr);
  // Oracle: the image index the registry serves, and the manifest body's annotation.
  const raw = await registryRequest(reg, '/v2/discover/v2/manifests/soci', { headers: { accept: MEDIA_TYPE_OCI_INDEX } });
  const index = JSON.parse(raw.body.toString('utf8')) as { manifests: Descriptor[] };
  const sociEntry = index.manifests.find((m) => m.artifactType === MEDIA_TYPE_SOCI_INDEX_V2)!;
  const imageEntry = index.manifests.find((m) => m.artifactType === undefined)!;
  t.equal(imageEntry.annotations?.[ANNOTATION_INDEX_DIGEST], sociEntry.digest);
  const { repo, target: tg } = await target(dst);
  t.equal(tg.descriptor.digest, imageEntry.digest, 'the rewritten image manifest is selected');
  const found = await discoverIndex(repo, tg, { store: new ArtifactStore({ root: join(work, 'cache-v2') }) });
  t.equal(found.source, 'v2');
  t.equal(found.version, 'v2');
  t.equal(found.digest, sociEntry.digest, 'the index the image index lists');
  const z = await found.loadZtoc(indexedLayers[0]!);
  t.ok(z.spans.length > 0, 'its zTOC loads from the registry');
  // The annotation alone is enough (no image index to look in).
  const bare = await discoverIndex(repo, { descriptor: tg.descriptor, manifest: tg.manifest });
  t.equal(bare.digest, sociEntry.digest, 'found through the manifest body annotation alone');
  made.v2 = sociEntry.digest;
  made.v2Ref = dst;
});

t.test('pull modes: an index of a disabled version is never used, and the error says which and how to enable it', async (t) => {
  t.ok(made.v1 !== '' && made.v2 !== '' && made.local !== '', 'the v1, v2 and store-only indexes of the subtests above');
  const v1Only = await target(v1.ref);
  const v2Only = await target(made.v2Ref);
  const none = await target(plain.ref);
  const noV1 = { v1: false, v2: true };
  const noV2 = { v1: true, v2: false };

  const e1 = await discoverIndex(v1Only.repo, v1Only.target, { pullModes: noV1 }).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(e1 instanceof DiscoverError && e1.kind === 'mode-disabled', `v1 only, v1 disabled: mode-disabled (${(e1 as Error).message})`);
  t.same((e1 as DiscoverError).disabled.map((d) => [d.version, d.digest]), [['v1', made.v1]], 'it names the v1 index the registry lists (seen through the fallback tag)');
  t.match((e1 as Error).message, /SOCI index only in a disabled pull mode: the image has a v1 index .*fallback tag sha256-.*v1 discovery is disabled; to use it, set enable = true under \[pull_modes\.soci_v1\] in the daemon config/);
  t.equal((await discoverIndex(v1Only.repo, v1Only.target, { pullModes: noV2 })).digest, made.v1, 'v1 only, v2 disabled: the v1 index');

  await rejectsWith(t, discoverIndex(v2Only.repo, v2Only.target, { pullModes: noV2 }), 'mode-disabled', /the image has a v2 index .*com\.amazon\.soci\.index-digest annotation.*set enable = true under \[pull_modes\.soci_v2\]/, 'v2 only, v2 disabled');
  const e2 = await discoverIndex(v2Only.repo, v2Only.target, { pullModes: noV2 }).catch((e: unknown) => e as DiscoverError);
  t.same((e2 as DiscoverError).disabled.map((d) => [d.version, d.digest]), [['v2', made.v2]], 'it names the v2 index of the SOCI-enabled image');
  t.equal((await discoverIndex(v2Only.repo, v2Only.target, { pullModes: noV1 })).digest, made.v2, 'v2 only, v1 disabled: the v2 index');

  // The local store: its v1 record (create without --push) is passed over when v1 is disabled.
  const localStore = new ArtifactStore({ root: join(work, 'root-local') });
  t.equal((await discoverIndex(none.repo, none.target, { store: localStore, pullModes: noV2 })).source, 'store', 'v1 enabled: the store record');
  const e3 = await discoverIndex(none.repo, none.target, { store: localStore, pullModes: noV1 }).catch((e: unknown) => e as DiscoverError);
  t.equal((e3 as DiscoverError).kind, 'mode-disabled', 'v1 disabled: mode-disabled');
  t.same((e3 as DiscoverError).disabled.map((d) => [d.version, d.digest, d.where]), [['v1', made.local, `the local store ${localStore.root}`]], 'naming the record in the store');

  // Nothing anywhere: no-index, saying what was not looked at.
  await rejectsWith(t, discoverIndex(none.repo, none.target, { pullModes: { v1: false, v2: false } }), 'no-index', /no SOCI index: no com\.amazon\.soci\.index-digest annotation \(not a SOCI-enabled image; v2 discovery is disabled anyway\); v1 discovery is disabled \(\[pull_modes\.soci_v1\] enable = false\)$/, 'no index, both disabled');

  // An explicit index digest is used whatever the modes say (as upstream).
  const explicit = await discoverIndex(v1Only.repo, v1Only.target, { pullModes: { v1: false, v2: false }, indexDigest: made.v1 });
  t.same([explicit.source, explicit.digest, explicit.version], ['explicit', made.v1, 'v1'], 'an explicit v1 index with both modes disabled: used');
});

t.test('several v1 indexes, corrupt zTOCs and corrupt index manifests', async (t) => {
  const { repo, target: tg } = await target(v1.ref);
  const good = await discoverIndex(repo, tg);
  const layer = indexedLayers[0]!;
  const layerDesc = image.layers.find((l) => l.digest === layer)!;
  const ztoc = good.ztocFor(layer)!;
  const subject = { mediaType: tg.descriptor.mediaType, digest: tg.descriptor.digest, size: tg.descriptor.size };
  const indexBytes = (layers: Descriptor[], created: string): Buffer =>
    Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MEDIA_TYPE_OCI_MANIFEST,
        config: { mediaType: MEDIA_TYPE_SOCI_INDEX_V1, digest: EMPTY_CONFIG_DIGEST, size: 2 },
        layers,
        subject,
        annotations: { 'org.opencontainers.image.created': created },
      }),
    );
  const annotated = (d: { digest: string; size: number }): Descriptor => ({
    mediaType: 'application/octet-stream',
    digest: d.digest,
    size: d.size,
    annotations: { [ANNOTATION_LAYER_DIGEST]: layer, [ANNOTATION_LAYER_MEDIA_TYPE]: layerDesc.mediaType },
  });

  // A newer valid index (dated): chosen over the undated one, wherever it is listed.
  const newer = indexBytes([annotated(ztoc)], '2090-01-01T00:00:00Z');
  await repo.pushManifest(newer, MEDIA_TYPE_OCI_MANIFEST);
  const older = indexBytes([annotated(ztoc)], '2080-01-01T00:00:00Z');
  await repo.pushManifest(older, MEDIA_TYPE_OCI_MANIFEST);
  const chosen = await discoverIndex(repo, tg);
  t.equal(chosen.digest, sha(newer), 'the newest by created annotation, though listed before an older one');

  // Newest: an index whose zTOC is not a zTOC (the image config blob).
  const notZtoc = indexBytes([annotated({ digest: image.configDigest, size: v1.manifest.config.size })], '2098-01-01T00:00:00Z');
  await repo.pushManifest(notZtoc, MEDIA_TYPE_OCI_MANIFEST);
  const bad = await discoverIndex(repo, tg);
  t.equal(bad.digest, sha(notZtoc), 'the newest index is chosen');
  await rejectsWith(t, bad.loadZtoc(layer), 'bad-ztoc', new RegExp(`zTOC ${image.configDigest} \\(layer ${layer}\\): malformed`), 'a blob that is not a zTOC');

  // Newest: an index manifest whose zTOC descriptor lacks the layer annotation.
  const malformed = indexBytes([{ mediaType: 'application/octet-stream', digest: ztoc.digest, size: ztoc.size }], '2099-01-01T00:00:00Z');
  await repo.pushManifest(malformed, MEDIA_TYPE_OCI_MANIFEST);
  await rejectsWith(
    t,
    discoverIndex(repo, tg),
    'bad-index',
    new RegExp(`discover/v1@${tg.descriptor.digest}: SOCI index ${sha(malformed)} is malformed: .*com\\.amazon\\.soci\\.image-layer-digest`),
    'an index without layer annotations',
  );
});

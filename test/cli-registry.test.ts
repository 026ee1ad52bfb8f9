/**
 * The seed's workflow end to end against a real registry (token auth): skopeo pushes an image,
 * `soci-ts create --push` indexes and pushes it, then the index is discovered the way a reader
 * discovers it (referrers, here the fallback tag), every zTOC is read back, and files extracted
 * over HTTP range requests equal `tar -xO` of the same layer. Then `push`, `index`, `convert`
 * and the user errors.
 */
import t from 'tap';
import { createHash } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runCli, type CliResult } from './helpers/cli.js';
import { startRegistry, registryRequest, skopeoCopy } from './helpers/registry.js';
import { defaultImages, pushImage } from './helpers/images.js';
import { run } from './helpers/layers.js';
import { RegistryClient, MEDIA_TYPE_OCI_INDEX, type Descriptor } from '../fetcher/index.js';
import { LayerReader, MEDIA_TYPE_SOCI_INDEX_V1, MEDIA_TYPE_SOCI_INDEX_V2, ANNOTATION_INDEX_DIGEST, ANNOTATION_IMAGE_MANIFEST_DIGEST, parseSociIndex, readZtoc } from '../ztoc/index.js';


function cli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  return runCli(args, { env: { ...process.env, ...env } });
}

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

const reg = await startRegistry({ auth: 'token' });
t.teardown(() => reg.stop());
const creds = reg.credentials!;
const user = `${creds.username}:${creds.password}`;
const images = await defaultImages();
const image = images.multi;
const pushed = await pushImage(image.layoutDir, image.tag, reg, 'soci/multi');
const work = await mkdtemp(join(tmpdir(), 'soci-ts-cli-registry-'));
t.teardown(() => rm(work, { recursive: true, force: true }));
const root = join(work, 'root');
// No docker config of the machine's may leak in: credentials come from --user only.
const env = { DOCKER_CONFIG: join(work, 'docker') };
const common = ['--root', root, '--user', user, '--hosts-dir', ''];

t.test('create --push, then discover, read back and extract over range requests', async (t) => {
  const r = await cli(['create', pushed.ref, '--push', '--min-layer-size', '1MiB', '--json', ...common], env);
  t.equal(r.code, 0, `exit 0 (${r.stderr.trim()})`);
  t.notOk(r.stderr.includes(creds.password), 'password never printed');
  const out = JSON.parse(r.stdout) as { indexes: Array<{ index: string; manifest: string; layers: Array<{ digest: string; ztoc?: string; skipped?: string }> }>; pushed: string[] };
  t.equal(out.indexes.length, 1, 'one index (one platform)');
  const created = out.indexes[0]!;
  t.equal(created.manifest, pushed.manifestDigest, 'index is for the pushed manifest');
  t.same(created.layers.map((l) => l.digest), pushed.layers.map((l) => l.digest), 'layer table in image order');
  const expectIndexed = pushed.layers.map((l) => l.size >= 1 << 20);
  t.same(created.layers.map((l) => l.ztoc !== undefined), expectIndexed, 'layers >= 1 MiB indexed, smaller ones skipped');
  for (const l of created.layers) if (l.ztoc === undefined) t.match(l.skipped, /smaller than the minimum layer size/, 'skip reason given');
  t.same(out.pushed, [created.index], 'the index was pushed');

  // Oracle: the registry's own answer for the fallback tag.
  const tag = pushed.manifestDigest.replace(':', '-');
  const raw = await registryRequest(reg, `/v2/soci/multi/manifests/${tag}`, { headers: { accept: MEDIA_TYPE_OCI_INDEX } });
  t.equal(raw.status, 200, 'fallback tag sha256-<hex> exists in the registry');
  const tagIndex = JSON.parse(raw.body.toString('utf8')) as { mediaType: string; manifests: Descriptor[] };
  t.equal(tagIndex.mediaType, MEDIA_TYPE_OCI_INDEX);
  const entry = tagIndex.manifests.find((m) => m.digest === created.index);
  t.ok(entry, 'fallback index lists the SOCI index');
  t.equal(entry?.artifactType, MEDIA_TYPE_SOCI_INDEX_V1, 'with the v1 artifact type');

  // Discovery as a reader does it, through our client.
  const client = new RegistryClient({ hostsDir: '', credentials: { user, configPath: join(work, 'none.json') } });
  t.teardown(() => client.close());
  const repo = client.repository(pushed.ref);
  const found = await repo.referrers(pushed.manifestDigest, MEDIA_TYPE_SOCI_INDEX_V1);
  t.equal(found.source, 'tag', 'registry 2.8 has no referrers API: found through the fallback tag');
  t.same(found.descriptors.map((d) => d.digest), [created.index]);
  const indexManifest = await repo.fetchManifest(found.descriptors[0]!);
  const parsed = parseSociIndex(indexManifest.bytes, created.index);
  t.equal(parsed.version, 'v1');
  t.equal(parsed.manifest.subject?.digest, pushed.manifestDigest, 'subject is the image manifest');
  t.equal(parsed.ztocs.length, expectIndexed.filter(Boolean).length, 'one zTOC per indexed layer');

  for (const z of parsed.ztocs) {
    const layer = image.layers.find((l) => l.digest === z.layerDigest)!;
    t.ok(layer, `zTOC names a layer of the image (${z.layerDigest})`);
    const ztocBytes = await repo.fetchBlob(z.ztoc);
    const index = readZtoc(ztocBytes, z.ztoc.digest);
    t.equal(index.ztoc.compressedArchiveSize, layer.size, 'zTOC indexes a blob of the layer size');
    const desc = { mediaType: layer.mediaType, digest: layer.digest, size: layer.size };
    const reader = new LayerReader(index, { read: (offset, length) => repo.readRange(desc, offset, length) }, { cacheSpans: 4 });
    const regs = index.ztoc.files.filter((f) => f.type === 'reg').sort((a, b) => a.uncompressedOffset - b.uncompressedOffset);
    const ours = createHash('sha256');
    let bytes = 0;
    for (const f of regs) {
      const data = await reader.readFile(f);
      ours.update(data);
      bytes += data.length;
    }
    // Oracle: GNU tar extracting the same files, in the same order, from the local layer blob.
    const list = join(work, `${layer.digest.slice(7, 19)}.names`);
    await writeFile(list, regs.map((f) => `${f.name}\0`).join(''));
    const extracted = join(work, `${layer.digest.slice(7, 19)}.out`);
    const gz = !z.layerMediaType.endsWith('.tar') && !z.layerMediaType.endsWith('tar');
    await run('tar', [gz ? '-xzO' : '-xO', '--null', '--verbatim-files-from', '-T', list, '-f', layer.path], { stdoutFile: extracted });
    const { stdout } = await run('sha256sum', [extracted]);
    t.equal(ours.digest('hex'), stdout.split(' ')[0], `${regs.length} files (${bytes} bytes) of ${layer.digest.slice(0, 19)} read over HTTP ranges equal tar -xO`);
  }
});

t.test('push again: idempotent; index list/info/rm', async (t) => {
  const again = await cli(['push', pushed.ref, '--json', ...common], env);
  t.equal(again.code, 0, again.stderr);
  const res = JSON.parse(again.stdout) as Array<{ uploaded: number; existing: number; referrersTagUpdated: boolean }>;
  t.equal(res[0]?.uploaded, 0, 'nothing uploaded twice');
  t.ok((res[0]?.existing ?? 0) > 0, 'blobs found present');
  t.equal(res[0]?.referrersTagUpdated, false, 'fallback tag already lists it');

  const list = await cli(['index', 'list', pushed.ref, '--json', '--root', root]);
  t.equal(list.code, 0, list.stderr);
  const records = JSON.parse(list.stdout) as Array<{ digest: string; manifest: string; format: string }>;
  t.equal(records.length, 1);
  t.equal(records[0]?.manifest, pushed.manifestDigest);
  const info = await cli(['index', 'info', records[0]!.digest.slice(7, 17), '--root', root]);
  t.equal(info.code, 0, info.stderr);
  t.equal((JSON.parse(info.stdout) as { subject: { digest: string } }).subject.digest, pushed.manifestDigest, 'info by prefix prints the manifest');
  const table = await cli(['index', 'list', '--root', root]);
  t.match(table.stdout, /^DIGEST\s+FORMAT\s+PLATFORM/, 'table header');

  const other = await cli(['create', pushed.ref, '--format', 'v2', ...common], env);
  t.equal(other.code, 0, other.stderr);
  t.match(other.stdout, /zTOC reused from the store/, 'the layer indexed before is not streamed again');
  const all = JSON.parse((await cli(['index', 'list', '--json', '--root', root])).stdout) as Array<{ digest: string; format: string }>;
  const v2 = all.find((r) => r.format === 'v2')!;
  const removed = await cli(['index', 'rm', v2.digest, '--root', root]);
  t.equal(removed.code, 0, removed.stderr);
  t.match(removed.stdout, /kept for other indexes/, 'shared zTOC kept');
  const left = JSON.parse((await cli(['index', 'list', '--json', '--root', root])).stdout) as unknown[];
  t.equal(left.length, 1, 'the v1 index remains');
});

t.test('convert: a SOCI-enabled image that skopeo can copy', async (t) => {
  const dst = `${reg.host}/soci/multi-converted:soci`;
  const r = await cli(['convert', pushed.ref, dst, '--json', ...common], env);
  t.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { index: string };
  const raw = await registryRequest(reg, '/v2/soci/multi-converted/manifests/soci', { headers: { accept: MEDIA_TYPE_OCI_INDEX } });
  t.equal(raw.status, 200);
  t.equal(`sha256:${sha(raw.body)}`, out.index, 'the registry serves the image index convert reported');
  const index = JSON.parse(raw.body.toString('utf8')) as { manifests: Descriptor[] };
  const images = index.manifests.filter((m) => m.artifactType === undefined);
  const socis = index.manifests.filter((m) => m.artifactType === MEDIA_TYPE_SOCI_INDEX_V2);
  t.equal(images.length, 1, 'one image manifest');
  t.equal(socis.length, 1, 'one v2 SOCI index');
  t.equal(images[0]!.annotations?.[ANNOTATION_INDEX_DIGEST], socis[0]!.digest, 'image descriptor names its SOCI index');
  t.equal(socis[0]!.annotations?.[ANNOTATION_IMAGE_MANIFEST_DIGEST], images[0]!.digest, 'SOCI index names its image manifest');
  t.same(socis[0]!.platform, images[0]!.platform, 'same platform');
  const m = await registryRequest(reg, `/v2/soci/multi-converted/manifests/${images[0]!.digest}`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } });
  const manifest = JSON.parse(m.body.toString('utf8')) as { mediaType: string; layers: Descriptor[]; annotations?: Record<string, string> };
  t.equal(manifest.mediaType, 'application/vnd.oci.image.manifest.v1+json');
  t.same(manifest.layers, pushed.manifest.layers, 'layers shared with the source, unchanged');
  t.equal(manifest.annotations?.[ANNOTATION_INDEX_DIGEST], socis[0]!.digest, 'annotation in the manifest body too');
  // Oracle: skopeo copies the whole thing (every manifest and blob, digests checked).
  await skopeoCopy(`docker://${dst}`, `oci:${join(work, 'converted')}:soci`, { srcCreds: creds, extraArgs: ['--all'] });
  t.pass('skopeo copy --all of the converted image succeeded');
});

t.test('user errors: one line, exit 1, no secrets', async (t) => {
  const missing = await cli(['create', `${reg.host}/soci/multi:nope`, ...common], env);
  t.equal(missing.code, 1);
  t.match(missing.stderr, /^soci-ts: .*soci\/multi:nope: manifest not found\n$/);
  const notCreated = await cli(['push', pushed.ref, '--root', join(work, 'empty-root'), '--user', user, '--hosts-dir', ''], env);
  t.equal(notCreated.code, 1);
  t.match(notCreated.stderr, /run soci-ts create first/);
  const wrong = await cli(['create', pushed.ref, '--root', root, '--user', `${creds.username}:not-the-password-xyzzy`, '--hosts-dir', ''], env);
  t.equal(wrong.code, 1, 'wrong password: user error');
  t.match(wrong.stderr, /refused the credentials/);
  t.notOk(wrong.stderr.includes('xyzzy'), 'the password is not in the message');
  const anon = await cli(['create', pushed.ref, '--root', root, '--hosts-dir', ''], env);
  t.equal(anon.code, 1);
  t.match(anon.stderr, /requires credentials|no credentials/);
  const badRef = await cli(['create', 'UPPER/case', '--root', root]);
  t.equal(badRef.code, 1);
  t.match(badRef.stderr, /^soci-ts: /);
});

/**
 * `soci-ts explain REF` against a real registry (CNCF registry 2.8: v1 indexes are found
 * through the sha256-<hex> fallback tag) with images built by umoci and pushed by skopeo:
 * indexed by `soci-ts create --push` (v1, found through the registry with an empty store, and
 * through the store that create filled), converted by `soci-ts convert` (v2), one with no
 * index, one with a zstd and a foreign layer added, one behind basic auth.
 * Oracles: the registry's own answers (the image manifest's layers, the SOCI index manifest
 * under the fallback tag with its zTOC descriptors, the converted image index's annotation) and
 * what `create --json` reported while building the zTOCs (span counts).
 */
import t from 'tap';
import { createHash } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startRegistry, registryRequest } from './helpers/registry.js';
import { defaultImages, getManifest, pushImage, type OciManifest } from './helpers/images.js';
import { RegistryClient, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST as OCI_MANIFEST, type Descriptor } from '../fetcher/index.js';
import { ANNOTATION_INDEX_DIGEST, ANNOTATION_LAYER_DIGEST, MEDIA_TYPE_SOCI_INDEX_V1 } from '../ztoc/index.js';
import type { Explanation } from '../daemon/explain.js';
import { runCli, type CliResult } from './helpers/cli.js';

const cli = (args: string[]): Promise<CliResult> => runCli(args);

const sha = (b: Uint8Array): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

const reg = await startRegistry();
t.teardown(() => reg.stop());
const image = (await defaultImages()).multi;
const v1 = await pushImage(image.layoutDir, image.tag, reg, 'explain/v1');
const plain = await pushImage(image.layoutDir, image.tag, reg, 'explain/plain');
const work = await mkdtemp(join(tmpdir(), 'soci-ts-explain-'));
t.teardown(() => rm(work, { recursive: true, force: true }));
// No daemon config of the machine's may leak in: an empty one.
const noConfig = join(work, 'empty.toml');
await writeFile(noConfig, '');
const common = (root: string): string[] => ['--root', join(work, root), '--hosts-dir', '', '--config', noConfig];

interface CreatedLayer {
  digest: string;
  ztoc?: string;
  ztocSize?: number;
  spans?: number;
}

async function explainJson(ref: string, root: string, extra: string[] = []): Promise<Explanation> {
  const r = await cli(['explain', ref, '--json', ...common(root), ...extra]);
  if (r.code !== 0) throw new Error(`explain ${ref} exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as Explanation;
}

/** The SOCI index manifest the registry lists under the fallback tag of `manifestDigest`. */
async function registryIndex(repo: string, manifestDigest: string): Promise<{ digest: string; ztocs: Map<string, Descriptor> }> {
  const tag = await registryRequest(reg, `/v2/${repo}/manifests/${manifestDigest.replace(':', '-')}`, { headers: { accept: MEDIA_TYPE_OCI_INDEX } });
  const entry = (JSON.parse(tag.body.toString('utf8')) as { manifests: Descriptor[] }).manifests.find((m) => m.artifactType === MEDIA_TYPE_SOCI_INDEX_V1)!;
  const m = await registryRequest(reg, `/v2/${repo}/manifests/${entry.digest}`, { headers: { accept: OCI_MANIFEST } });
  const layers = (JSON.parse(m.body.toString('utf8')) as { layers: Descriptor[] }).layers;
  return { digest: entry.digest, ztocs: new Map(layers.map((l) => [l.annotations![ANNOTATION_LAYER_DIGEST]!, l])) };
}

const created = await cli(['create', v1.ref, '--push', '--min-layer-size', '1MiB', '--json', ...common('root-create').slice(0, 4)]);
if (created.code !== 0) throw new Error(`create --push: ${created.stderr}`);
const createdLayers = (JSON.parse(created.stdout) as { indexes: Array<{ index: string; layers: CreatedLayer[] }> }).indexes[0]!.layers;

t.test('v1 index found through the registry: one row per layer, lazy where a zTOC is', async (t) => {
  const e = await explainJson(v1.ref, 'root-empty');
  const oracle = await registryIndex('explain/v1', v1.manifestDigest);
  t.same(e.index, { digest: oracle.digest, version: 'v1', source: 'v1' }, 'the index the registry lists under the fallback tag, found as v1 (empty store)');
  t.equal(e.manifest, v1.manifestDigest);
  t.match(e.discovery, /referrers/);
  t.same(
    e.layers.map((l) => [l.digest, l.size, l.mediaType]),
    v1.manifest.layers.map((l) => [l.digest, l.size, l.mediaType]),
    "one row per layer, in the manifest's order, with the registry's digest, size and media type",
  );
  t.ok(oracle.ztocs.size >= 1 && oracle.ztocs.size < e.layers.length, 'some layers indexed, some not (the fixture has both)');
  for (const l of e.layers) {
    const z = oracle.ztocs.get(l.digest);
    const c = createdLayers.find((x) => x.digest === l.digest)!;
    if (z !== undefined) {
      t.equal(l.mode, 'lazy', `layer ${l.n}: lazy`);
      t.equal(l.reason, 'ztoc');
      t.same(l.ztoc, { digest: z.digest, size: z.size, spans: c.spans }, `layer ${l.n}: the zTOC of the registry's index, spans as create counted them`);
      t.match(l.detail, new RegExp(`${c.spans} spans?, fetched on demand`));
    } else {
      t.equal(l.mode, 'local', `layer ${l.n}: not in the index: local (the daemon unpacks it)`);
      t.equal(l.reason, 'no-ztoc');
      t.equal(l.ztoc, undefined);
      t.match(l.detail, /the index has no zTOC for it .*under the indexers' default minimum layer size.*the daemon fetches and unpacks it/);
    }
  }

  // The same image with the store create filled: found there first.
  const fromStore = await explainJson(v1.ref, 'root-create');
  t.equal(fromStore.index?.source, 'store', 'with create\'s store: the local store');
  t.equal(fromStore.index?.digest, oracle.digest);
  t.same(fromStore.layers.map((l) => l.mode), e.layers.map((l) => l.mode));

  // The table.
  const r = await cli(['explain', v1.ref, ...common('root-empty')]);
  t.equal(r.code, 0, r.stderr);
  t.comment(r.stdout);
  const lines = r.stdout.trimEnd().split('\n');
  t.equal(lines[0], `image: ${v1.ref} (${v1.manifestDigest}, linux/amd64)`);
  t.match(lines[1], new RegExp(`^index: v1 ${oracle.digest} \\(from the v1 referrers`), 'the header names the index');
  t.match(lines[2], /^LAYER\s+DIGEST\s+SIZE\s+MEDIA TYPE\s+MODE\s+SPANS\s+ZTOC\s+REASON$/);
  t.equal(lines.length, 3 + e.layers.length + 1, 'header, column names, one row per layer, summary');
  e.layers.forEach((l, i) => t.match(lines[3 + i], new RegExp(`^${l.n}\\s+${l.digest.slice(7, 19)}\\s+.*\\s${l.mode}\\s+.*${l.reason}: `), `row ${i}`));
  const lazy = e.layers.filter((l) => l.mode === 'lazy').length;
  t.equal(lines[lines.length - 1], `${e.layers.length} layers: ${lazy} lazy, ${e.layers.length - lazy} local, 0 fallback`);
});

t.test("the daemon's min_layer_size: from --min-layer-size or the config file", async (t) => {
  const big = await explainJson(v1.ref, 'root-empty', ['--min-layer-size', '100MiB']);
  const indexed = big.layers.filter((l) => l.ztoc !== undefined);
  t.ok(indexed.length > 0);
  for (const l of indexed) {
    t.equal(l.mode, 'local', `layer ${l.n} has a zTOC but is under 100 MiB: local`);
    t.equal(l.reason, 'below-min-size');
    t.match(l.detail, new RegExp(`\\(${l.size} < ${100 << 20} bytes\\)`));
  }
  const cfg = join(work, 'daemon.toml');
  await writeFile(cfg, '[snapshotter]\nmin_layer_size = "100MiB"\n');
  const viaConfig = await explainJson(v1.ref, 'root-empty', ['--config', cfg]);
  t.same(viaConfig.layers.map((l) => [l.mode, l.reason]), big.layers.map((l) => [l.mode, l.reason]), 'min_layer_size from the config file');
  const over = await explainJson(v1.ref, 'root-empty', ['--config', cfg, '--min-layer-size', '0']);
  t.same(over.layers.filter((l) => l.ztoc !== undefined).map((l) => l.mode), indexed.map(() => 'lazy'), '--min-layer-size 0 overrides the file');
  await writeFile(cfg, 'min_layer_siz = 1\n');
  const r = await cli(['explain', v1.ref, ...common('root-empty'), '--config', cfg]);
  t.equal(r.code, 1);
  t.match(r.stderr, /daemon\.toml: unknown key "min_layer_siz"/);
});

t.test('no index: every layer falls back, and the header says where discovery looked', async (t) => {
  const e = await explainJson(plain.ref, 'root-empty');
  t.equal(e.index, null);
  t.equal(e.layers.length, plain.manifest.layers.length);
  for (const l of e.layers) {
    t.equal(l.mode, 'fallback');
    t.equal(l.reason, 'no-index');
    t.match(l.detail, /the image has no SOCI index \(see the index line\): containerd fetches and applies it/);
  }
  t.match(e.discovery, new RegExp(`none in the local store ${join(work, 'root-empty')}`), 'looked in the local store');
  t.match(e.discovery, /no com\.amazon\.soci\.index-digest annotation/, 'for the v2 annotation');
  t.match(e.discovery, new RegExp(`fallback tag ${plain.manifestDigest.replace(':', '-')}`), 'and the referrers fallback tag');
  const r = await cli(['explain', plain.ref, ...common('root-empty')]);
  t.equal(r.code, 0);
  t.comment(r.stdout);
  t.match(r.stdout.split('\n')[1], /^index: none \(no SOCI index: none in the local store/);
  t.match(r.stdout, new RegExp(`${plain.manifest.layers.length} layers: 0 lazy, 0 local, ${plain.manifest.layers.length} fallback`));
});

t.test('v2: a SOCI-enabled image made by convert', async (t) => {
  const dst = `${reg.host}/explain/v2:soci`;
  const c = await cli(['convert', v1.ref, dst, '--min-layer-size', '1MiB', ...common('root-convert').slice(0, 4)]);
  t.equal(c.code, 0, c.stderr);
  // Oracle: the image index the registry serves, and its manifest's index annotation.
  const top = await registryRequest(reg, '/v2/explain/v2/manifests/soci', { headers: { accept: MEDIA_TYPE_OCI_INDEX } });
  const entries = (JSON.parse(top.body.toString('utf8')) as { manifests: Descriptor[] }).manifests;
  const imageEntry = entries.find((m) => m.mediaType === OCI_MANIFEST && m.artifactType === undefined)!;
  const m = await getManifest(reg, 'explain/v2', imageEntry.digest);
  const body = JSON.parse(m.bytes.toString('utf8')) as OciManifest;
  const indexDigest = body.annotations![ANNOTATION_INDEX_DIGEST]!;
  const e = await explainJson(dst, 'root-empty');
  t.same(e.index, { digest: indexDigest, version: 'v2', source: 'v2' }, 'the index named by the manifest annotation, as v2');
  t.equal(e.manifest, imageEntry.digest, 'the platform manifest of the image index');
  t.same(e.layers.map((l) => l.digest), body.layers.map((l) => l.digest));
  t.ok(e.layers.some((l) => l.mode === 'lazy'));
  const r = await cli(['explain', dst, '--platform', 'linux/s390x', ...common('root-empty')]);
  t.equal(r.code, 1, 'a platform the image does not have: exit 1');
  t.match(r.stderr, /no image manifest for platform linux\/s390x; available: linux\/amd64/);
});

t.test('zstd and foreign layers in an indexed image: fallback with their reason', async (t) => {
  const client = new RegistryClient({ hostsDir: '', credentials: { configPath: join(work, 'no-docker.json') } });
  t.teardown(() => client.close());
  const repo = client.repository(`${reg.host}/explain/odd:1`);
  const zstdBlob = Buffer.from('zstd layer stand-in: explain and create never read it');
  const foreignBlob = Buffer.from('not a layer at all');
  const zstd: Descriptor = { mediaType: 'application/vnd.oci.image.layer.v1.tar+zstd', digest: sha(zstdBlob), size: zstdBlob.length };
  const foreign: Descriptor = { mediaType: 'application/vnd.example.foreign', digest: sha(foreignBlob), size: foreignBlob.length };
  await repo.pushBlob(zstd, zstdBlob);
  await repo.pushBlob(foreign, foreignBlob);
  for (const l of v1.manifest.layers) await repo.pushBlob(l, new Uint8Array(), { mountFrom: ['explain/v1'] });
  await repo.pushBlob(v1.manifest.config, new Uint8Array(), { mountFrom: ['explain/v1'] });
  const manifest = { ...v1.manifest, layers: [...v1.manifest.layers, zstd, foreign] };
  await repo.pushManifest(Buffer.from(JSON.stringify(manifest)), OCI_MANIFEST, '1');
  const c = await cli(['create', `${reg.host}/explain/odd:1`, '--push', '--min-layer-size', '1MiB', '--json', ...common('root-odd').slice(0, 4)]);
  t.equal(c.code, 0, c.stderr);
  const e = await explainJson(`${reg.host}/explain/odd:1`, 'root-empty');
  t.equal(e.index?.version, 'v1');
  const n = v1.manifest.layers.length;
  t.same([e.layers[n]?.mode, e.layers[n]?.reason], ['fallback', 'zstd'], 'the zstd layer: fallback, zstd');
  t.match(e.layers[n]?.detail, /zstd layer: no zTOC .*containerd applies it/);
  t.same([e.layers[n + 1]?.mode, e.layers[n + 1]?.reason], ['fallback', 'unsupported-media-type'], 'the foreign layer: fallback, unsupported media type');
  t.match(e.layers[n + 1]?.detail, /application\/vnd\.example\.foreign/);
  t.ok(e.layers.slice(0, n).some((l) => l.mode === 'lazy'), 'the other layers as before');
});

t.test('auth failure and bad input', async (t) => {
  const authReg = await startRegistry({ auth: 'basic' });
  t.teardown(() => authReg.stop());
  const pushed = await pushImage(image.layoutDir, image.tag, authReg, 'explain/auth');
  const creds = authReg.credentials!;
  const env = ['--user', `${creds.username}:wrong-${creds.password}`];
  let r = await cli(['explain', pushed.ref, ...common('root-empty'), ...env]);
  t.equal(r.code, 1, 'wrong password: exit 1');
  t.match(r.stderr, /401|unauthorized|authentication/i, 'says authentication failed');
  t.notOk(r.stderr.includes(creds.password), 'the password is never printed');
  r = await cli(['explain', pushed.ref, '--json', ...common('root-empty'), '--user', `${creds.username}:${creds.password}`]);
  t.equal(r.code, 0, r.stderr);
  t.equal((JSON.parse(r.stdout) as Explanation).index, null, 'the right password: explained (no index)');

  r = await cli(['explain', 'Not A Reference', ...common('root-empty')]);
  t.equal(r.code, 1);
  t.match(r.stderr, /Not A Reference/);
  r = await cli(['explain', `${reg.host}/explain/missing:1`, ...common('root-empty')]);
  t.equal(r.code, 1, 'an image that is not there: exit 1');
  t.match(r.stderr, /explain\/missing/);
});

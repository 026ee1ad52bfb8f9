/**
 * `[pull_modes.soci_v1]` / `[pull_modes.soci_v2]` `enable` in the real `bin/soci-ts snapshotter`,
 * against a real registry (CNCF registry 2.8: v1 indexes through the sha256-<hex> fallback tag)
 * with two images of the same layers: one indexed only with a v1 index (`soci-ts create --push`),
 * one only as a SOCI-enabled image (`soci-ts convert`: a v2 index). Two daemons, one with v1
 * disabled, one with v2 disabled, are driven through the Snapshots gRPC API as containerd's
 * unpacker drives them (Prepare with the remote labels, parent = the previous chain ID).
 *
 * With a version disabled, every layer of the image indexed only in that version falls back
 * (the daemon answers mounts, not ALREADY_EXISTS), and says why in all three places: the log
 * line (`mode-disabled` reason naming the version and the config section that enables it), the
 * `soci_ts_layer_mode{reason="mode-disabled"}` series, and the row of `soci-ts explain --config`
 * with the daemon's config file. With the version enabled (the other daemon), the layer is
 * lazy: ALREADY_EXISTS, a FUSE mount, `soci_ts_layer_mode{mode="lazy"}`, explain says lazy.
 *
 * Oracles: the registry's own answers (the fallback tag's v1 index, the converted image's
 * annotation), /proc/self/mountinfo, the chain IDs from the config's diff_ids.
 */
import t, { type Test } from 'tap';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SnapshotsClient } from '../../daemon/grpc-api.js';
import type { Explanation } from '../../daemon/explain.js';
import { MEDIA_TYPE_OCI_INDEX, type Descriptor } from '../../fetcher/index.js';
import { ANNOTATION_INDEX_DIGEST, MEDIA_TYPE_SOCI_INDEX_V1 } from '../../ztoc/index.js';
import { runCli } from '../helpers/cli.js';
import { samples } from '../helpers/exposition.js';
import { chainIdsOf, defaultImages, getManifest, pushImage } from '../helpers/images.js';
import { run } from '../helpers/layers.js';
import { registryRequest, startRegistry } from '../helpers/registry.js';
import { prepareRemote, remoteLabels, scrapeDaemon } from '../helpers/remote.js';
import { startSnapshotter, stopFuseManager, unmountUnder, type SnapshotterDaemon } from '../helpers/snapshotter.js';

const work = await mkdtemp(join(tmpdir(), 'soci-ts-pull-modes-'));
const reg = await startRegistry();
const daemons: Array<{ d: SnapshotterDaemon; c: SnapshotsClient; root: string }> = [];
t.teardown(async () => {
  for (const { d, c, root } of daemons) {
    c.close();
    await d.stop().catch(() => undefined);
    await stopFuseManager(root).catch(() => undefined);
  }
  await unmountUnder(work);
  await reg.stop();
  await run('rm', ['-rf', '--one-file-system', '--', work]).catch(() => undefined);
});

// ------------------------------------------------------------------ the images and their indexes

const image = (await defaultImages()).multi;
const chain = chainIdsOf(image);
const plain = await pushImage(image.layoutDir, image.tag, reg, 'modes/plain');
const v1 = await pushImage(image.layoutDir, image.tag, reg, 'modes/v1');
const cliCommon = (root: string): string[] => ['--root', join(work, root), '--hosts-dir', ''];
const created = await runCli(['create', v1.ref, '--push', '--json', ...cliCommon('create-v1')]);
if (created.code !== 0) throw new Error(`create --push: ${created.stderr}`);
const v2Ref = `${reg.host}/modes/v2:soci`;
const converted = await runCli(['convert', plain.ref, v2Ref, ...cliCommon('convert-v2')]);
if (converted.code !== 0) throw new Error(`convert: ${converted.stderr}`);

// Oracle: what the registry holds. The v1 image's fallback tag lists its v1 index ...
const tag = await registryRequest(reg, `/v2/modes/v1/manifests/${v1.manifestDigest.replace(':', '-')}`, { headers: { accept: MEDIA_TYPE_OCI_INDEX } });
const v1Index = (JSON.parse(tag.body.toString('utf8')) as { manifests: Descriptor[] }).manifests.find((m) => m.artifactType === MEDIA_TYPE_SOCI_INDEX_V1)!.digest;
// ... and the SOCI-enabled image's manifest names its v2 index.
const top = JSON.parse((await registryRequest(reg, '/v2/modes/v2/manifests/soci', { headers: { accept: MEDIA_TYPE_OCI_INDEX } })).body.toString('utf8')) as { manifests: Descriptor[] };
const v2Manifest = top.manifests.find((m) => m.artifactType === undefined)!.digest;
const v2Body = JSON.parse((await getManifest(reg, 'modes/v2', v2Manifest)).bytes.toString('utf8')) as { annotations?: Record<string, string>; layers: Descriptor[] };
const v2Index = v2Body.annotations![ANNOTATION_INDEX_DIGEST]!;
const bigN = image.layers.findIndex((l) => l.size >= 10 << 20);
const big = image.layers[bigN]!;

interface Case {
  version: 'v1' | 'v2';
  ref: string;
  manifest: string;
  index: string;
}
const CASES: Record<'v1' | 'v2', Case> = {
  v1: { version: 'v1', ref: v1.ref, manifest: v1.manifestDigest, index: v1Index },
  v2: { version: 'v2', ref: v2Ref, manifest: v2Manifest, index: v2Index },
};

// ------------------------------------------------------------------ the daemons

async function startDaemon(name: string, toml: string): Promise<{ d: SnapshotterDaemon; c: SnapshotsClient; root: string; config: string }> {
  const root = join(work, name);
  const address = join(work, `${name}.sock`);
  const config = join(work, `${name}.toml`);
  await writeFile(config, `hosts_dir = ""\n\n[background_fetch]\nenabled = false\n\n${toml}`);
  const d = await startSnapshotter({ root, address, args: ['--config', config, '--metrics-address', '127.0.0.1:0'], startTimeoutMs: 60_000 });
  const c = await SnapshotsClient.connect(address, { snapshotter: 'soci-ts' });
  daemons.push({ d, c, root });
  return { d, c, root, config };
}

const noV1 = await startDaemon('no-v1', '[pull_modes.soci_v1]\nenable = false\n');
const noV2 = await startDaemon('no-v2', '[pull_modes]\n  [pull_modes.soci_v2]\n  enable = false\n');

async function explain(ref: string, config: string): Promise<Explanation> {
  const r = await runCli(['explain', ref, '--json', '--config', config, ...cliCommon('explain-empty')]);
  if (r.code !== 0) throw new Error(`explain ${ref}: ${r.stderr}`);
  return JSON.parse(r.stdout) as Explanation;
}

async function fuseMounts(root: string): Promise<string[]> {
  return (await readFile('/proc/self/mountinfo', 'utf8'))
    .split('\n')
    .map((l) => l.split(' '))
    .filter((f) => f[4] !== undefined && f[4].startsWith(root + '/') && f[f.indexOf('-') + 1]?.startsWith('fuse'))
    .map((f) => f[4]!);
}

function modeSeries(fams: Awaited<ReturnType<typeof scrapeDaemon>>, layer: string): Array<[string | undefined, string | undefined, number]> {
  return samples(fams, 'soci_ts_layer_mode', { layer, process: 'snapshotter' }).map((s) => [s.labels.mode, s.labels.reason, s.value]);
}

/** Prepares layers 0..bigN as the unpacker would; a fallback is committed as containerd would after applying it. */
async function pull(c: SnapshotsClient, which: Case): Promise<boolean[]> {
  const exists: boolean[] = [];
  for (let i = 0; i <= bigN; i++) {
    const r = await prepareRemote(c, chain, i, remoteLabels(image, chain, i, which.ref, which.manifest));
    exists.push(r.exists);
    if (!r.exists) await c.commit(chain[i]!, r.key);
  }
  return exists;
}

/** Removes the chain again (top first), so that the next image of the same layers is prepared afresh. */
async function unpull(c: SnapshotsClient): Promise<void> {
  for (let i = bigN; i >= 0; i--) await c.remove(chain[i]!);
}

async function disabledFallsBack(t: Test, daemon: { d: SnapshotterDaemon; c: SnapshotsClient; root: string; config: string }, which: Case): Promise<void> {
  const section = `[pull_modes.soci_${which.version}]`;
  const sectionRe = section.replace(/[[\].]/g, '\\$&');
  const exists = await pull(daemon.c, which);
  t.same(exists, exists.map(() => false), `every layer answered with mounts (the fallback), none ALREADY_EXISTS`);
  t.same(await fuseMounts(daemon.root), [], 'nothing mounted over FUSE');

  const lines = daemon.d.logLines().filter((l) => l.msg === 'layer not served remotely: containerd applies it (fallback to the overlay path)' && l.image === which.ref);
  t.equal(lines.length, bigN + 1, 'one fallback log line per layer');
  const line = lines.find((l) => l.layer === big.digest);
  t.match(line, { level: 'info' }, 'the indexed layer: logged at info, with its digest');
  t.match(
    String(line?.reason),
    new RegExp(`^SOCI index only in a disabled pull mode: the image has a ${which.version} index \\(${which.index}, .*${which.version} discovery is disabled; to use it, set enable = true under ${sectionRe} in the daemon config`),
    `the reason names the version, the index the registry holds and the section that enables it: ${String(line?.reason)}`,
  );

  const fams = await scrapeDaemon(daemon.d);
  for (let i = 0; i <= bigN; i++) t.same(modeSeries(fams, image.layers[i]!.digest), [['fallback', 'mode-disabled', 1]], `layer ${i}: soci_ts_layer_mode{mode="fallback",reason="mode-disabled"} = 1`);

  const e = await explain(which.ref, daemon.config);
  t.equal(e.index, null, 'explain with the daemon config: no index used');
  t.match(e.discovery, new RegExp(`the image has a ${which.version} index \\(${which.index}.*set enable = true under ${sectionRe}`), 'its discovery line names the index and the section');
  for (let i = 0; i <= bigN; i++) t.same([e.layers[i]?.mode, e.layers[i]?.reason], ['fallback', 'mode-disabled'], `explain row ${i}: fallback, mode-disabled (as the daemon)`);
  const text = await runCli(['explain', which.ref, '--config', daemon.config, ...cliCommon('explain-empty')]);
  t.equal(text.code, 0, text.stderr);
  const row = text.stdout.split('\n').find((l) => l.startsWith(`${bigN} `));
  t.match(row, /\sfallback\s.*mode-disabled: its SOCI index is of a disabled pull mode/, `the table row of the indexed layer: ${row ?? ''}`);
  t.match(text.stdout.split('\n')[1], new RegExp(`^index: none \\(SOCI index only in a disabled pull mode: .*${sectionRe}`), 'the header says why');
  await unpull(daemon.c);
}

async function enabledIsLazy(t: Test, daemon: { d: SnapshotterDaemon; c: SnapshotsClient; root: string; config: string }, which: Case): Promise<void> {
  const exists = await pull(daemon.c, which);
  t.same(exists, exists.map(() => true), 'every layer ALREADY_EXISTS (lazy, or unpacked by the daemon)');
  t.equal((await fuseMounts(daemon.root)).length, 1, 'the indexed layer is mounted over FUSE');
  const lazy = daemon.d.logLines().filter((l) => l.msg === 'layer mounted lazily: committed as a remote snapshot' && l.layer === big.digest);
  t.match(lazy.at(-1), { index: which.index }, `logged as mounted lazily, from the ${which.version} index the registry holds`);
  t.same(modeSeries(await scrapeDaemon(daemon.d), big.digest), [['lazy', 'ztoc', 1]], 'soci_ts_layer_mode{mode="lazy",reason="ztoc"} = 1');
  const e = await explain(which.ref, daemon.config);
  t.same(e.index, { digest: which.index, version: which.version, source: which.version }, `explain with the daemon config: the ${which.version} index`);
  t.same([e.layers[bigN]?.mode, e.layers[bigN]?.reason], ['lazy', 'ztoc'], 'explain: the indexed layer is lazy');
  await unpull(daemon.c);
  t.same(await fuseMounts(daemon.root), [], 'removed: unmounted again');
}

t.test('the fixture: the v1 image has only a v1 index, the SOCI-enabled image only a v2 one, of the same layers', async (t) => {
  t.match(v1Index, /^sha256:[0-9a-f]{64}$/);
  t.match(v2Index, /^sha256:[0-9a-f]{64}$/);
  const v2Tag = await registryRequest(reg, `/v2/modes/v2/manifests/${v2Manifest.replace(':', '-')}`, { headers: { accept: MEDIA_TYPE_OCI_INDEX } });
  t.equal(v2Tag.status, 404, 'the SOCI-enabled image has no v1 referrers');
  t.equal(v1.manifest.annotations?.[ANNOTATION_INDEX_DIGEST], undefined, 'the v1 image has no v2 annotation');
  t.same(v2Body.layers.map((l) => l.digest), image.layers.map((l) => l.digest), 'the same layers (so the same chain IDs)');
  t.ok(bigN > 0, `layer ${bigN} is indexed (${big.size} bytes)`);
});

t.test('v1 disabled: the image with only a v1 index falls back, and says so in the log, the metric and explain', (t) => disabledFallsBack(t, noV1, CASES.v1));
t.test('v1 disabled: the SOCI-enabled image (v2) is lazy', (t) => enabledIsLazy(t, noV1, CASES.v2));
t.test('v2 disabled: the SOCI-enabled image falls back, and says so in the log, the metric and explain', (t) => disabledFallsBack(t, noV2, CASES.v2));
t.test('v2 disabled: the image with a v1 index is lazy', (t) => enabledIsLazy(t, noV2, CASES.v1));

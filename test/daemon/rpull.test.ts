/**
 * `soci-ts rpull` end to end with the real parts: Debian's containerd 1.6 with
 * `[proxy_plugins.soci-ts]` pointing at a `soci-ts snapshotter` this test started, runc, the
 * loopback registry and umoci-built images (defaultImages(): `multi`, four layers, gzip and
 * plain tar; `small`). rpull runs as the CLI (`bin/soci-ts rpull`), as a user runs it.
 *
 * Oracles: containerd's own pull (`ctr images pull --snapshotter overlayfs` of the same image
 * in another namespace) for the content labels and the snapshot chain; `umoci unpack` for the
 * files a container sees; the OCI layout (config diff_ids → chain IDs, manifest digests) for
 * what must be where; `ctr` for what containerd holds.
 *
 * - rpull of a single-manifest image: `ctr images ls` shows it with the manifest's digest;
 *   `ctr content ls` holds exactly manifest, config and the four layers, with exactly the
 *   labels containerd's pull sets (GC references, distribution source, uncompressed; the
 *   snapshot reference under our snapshotter's name); the snapshots are the chain IDs with
 *   the parents overlayfs has; each carries the remote-snapshot labels (snapshot.ref, CRI
 *   image-ref, manifest and layer digest, image-layers); no lease is left behind.
 * - `ctr run --rm --snapshotter soci-ts` sees exactly the files of umoci unpack.
 * - A second rpull changes nothing: every layer "already present", nothing fetched but the
 *   manifest and config, content, labels, snapshots and image record as before.
 * - A manifest list: the platform's manifest is pulled (and --platform picks the other one),
 *   the index's labels name every manifest as containerd's do, the image record targets it.
 * - A layer blob missing from the registry: exit code 1, one line naming the layer and the
 *   reason; no extract snapshot left (nor any active snapshot in the daemon), no ingest, no
 *   image record. A layer blob corrupted on the way (fault proxy flipping a byte): the digest
 *   mismatch is reported; no ingest (it had megabytes in it; rpull aborts it, and the lease's
 *   end would let containerd's GC take it too), no layer blob, no extract snapshot, no image.
 * - Errors, one line and exit code 1: no socket, a snapshotter containerd does not have
 *   (naming the proxy plugin block), an image that does not exist, a proxy plugin whose
 *   daemon is not running.
 * - An image indexed with `bin/soci-ts create --push` (a containerd and snapshotter of its
 *   own): every layer answered ALREADY_EXISTS, the zTOC-covered one lazy (labelled
 *   `containerd.io/snapshot/remote`), the small ones unpacked by the snapshotter; no layer
 *   blob in the content store, nothing fetched by rpull but manifest and config; the chain
 *   committed; `ctr run` sees exactly umoci unpack's files; a second rpull: all present.
 * - CRI's image-layers label is cut before 4096 bytes as containerd's getLayers does (pure).
 */
import t, { type Test } from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { SnapshotsClient } from '../../daemon/grpc-api.js';
import { imageLayersLabel, LABEL_CRI_IMAGE_LAYERS, MAX_LABEL_BYTES } from '../../daemon/rpull.js';
import { parseCtrTable, startContainerd, type Containerd } from '../helpers/containerd.js';
import { chainIdsOf, defaultImages, pushImage, type BuiltImage, type PushedImage } from '../helpers/images.js';
import { CommandError, run, type RunResult } from '../helpers/layers.js';
import { startFaultProxy } from '../helpers/fault-proxy.js';
import { registryRequest, skopeoCopy, startRegistry, type Registry } from '../helpers/registry.js';
import { sociTs, startSnapshotter, stopFuseManager, unmountUnder, type SnapshotterDaemon } from '../helpers/snapshotter.js';
import { treeSums } from '../helpers/tree.js';

let dir: string;
let registry: Registry;
let daemon: SnapshotterDaemon;
let ctd: Containerd;
let multi: BuiltImage;
let small: BuiltImage;
let pushed: PushedImage;
let address: string;
let containerSeq = 0;

t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'soci-ts-rpull-test-'));
  address = join(dir, 'soci-ts.sock');
  ({ multi, small } = await defaultImages());
  registry = await startRegistry();
  pushed = await pushImage(multi.layoutDir, multi.tag, registry, 'soci-ts-rpull/multi');
  daemon = await startSnapshotter({ root: join(dir, 'soci-root'), address });
  ctd = await startContainerd({ proxyPlugins: [{ name: 'soci-ts', address }] });
});

t.teardown(async () => {
  await ctd?.stop();
  await daemon?.stop();
  if (dir !== undefined) {
    await stopFuseManager(join(dir, 'soci-root'));
    await unmountUnder(dir);
  }
  await registry?.stop();
  if (dir !== undefined) await run('rm', ['-rf', '--one-file-system', '--', dir]).catch(() => undefined);
});

function explainOnFailure(t: Test): void {
  t.teardown(() => {
    if (!t.passing()) {
      t.comment(`containerd log (tail):\n${ctd.logs().slice(-4000)}`);
      t.comment(`daemon log (tail):\n${daemon.logs().slice(-4000)}`);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Running things

interface JsonLayer {
  digest: string;
  mediaType: string;
  size: number;
  diffId: string;
  chainId: string;
  outcome: 'lazy' | 'local' | 'applied' | 'present';
  fetchedBytes: number;
  blobInStore?: boolean;
}
interface JsonResult {
  image: string;
  namespace: string;
  snapshotter: string;
  target: { mediaType: string; digest: string; size: number };
  manifest: string;
  config: string;
  platform?: string;
  chainId: string;
  imageRecord: string;
  fetchedBytes: number;
  layers: JsonLayer[];
}

async function rpullJson(t: Test, ns: string, ref: string, extra: readonly string[] = [], c: Containerd = ctd): Promise<JsonResult> {
  const r = await sociTs(['rpull', '--address', c.address, '--namespace', ns, '--json', ...extra, ref]);
  if (r.code !== 0) throw new Error(`rpull ${ref} failed (${r.code}): ${r.stderr}`);
  t.equal(r.stderr, '', 'rpull printed nothing on stderr (not a terminal)');
  return JSON.parse(r.stdout) as JsonResult;
}

async function ctrIn(ns: string, args: readonly string[], c: Containerd = ctd): Promise<RunResult> {
  const global = ['--address', c.address, '--namespace', ns, '--connect-timeout', '10s', '--timeout', '300s'];
  try {
    return await run('ctr', [...global, ...args]);
  } catch (e) {
    if (e instanceof CommandError) return { code: e.code ?? -1, stdout: '', stderr: e.stderr };
    throw e;
  }
}

async function ctrOk(ns: string, args: readonly string[], c: Containerd = ctd): Promise<string> {
  const r = await ctrIn(ns, args, c);
  if (r.code !== 0) throw new Error(`ctr -n ${ns} ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
}

// ---------------------------------------------------------------------------------------
// What containerd holds, through ctr

/** `ctr content ls`: digest → labels (ctr prints `k=v` joined by commas; a value may hold commas). */
async function contentOf(ns: string, c: Containerd = ctd): Promise<Map<string, Record<string, string>>> {
  const out = new Map<string, Record<string, string>>();
  const lines = (await ctrOk(ns, ['content', 'ls'], c)).split('\n').slice(1).filter((l) => l.trim() !== '');
  for (const line of lines) {
    const cells = line.split('\t').filter((c) => c !== '');
    const digest = cells[0]!;
    const text = cells.at(-1)!;
    const labels: Record<string, string> = {};
    if (text !== '-' && cells.length > 3) {
      let last: string | undefined;
      for (const part of text.split(',')) {
        const eq = part.indexOf('=');
        if (eq === -1 && last !== undefined) labels[last] += `,${part}`;
        else {
          last = part.slice(0, eq);
          labels[last] = part.slice(eq + 1);
        }
      }
    }
    out.set(digest, labels);
  }
  return out;
}

/** The labels with the snapshotter's name in `containerd.io/gc.ref.snapshot.<name>` replaced. */
function neutral(content: Map<string, Record<string, string>>, snapshotter: string): Record<string, Record<string, string>> {
  const out: Record<string, Record<string, string>> = {};
  for (const [d, labels] of content) {
    const l: Record<string, string> = {};
    for (const [k, v] of Object.entries(labels)) l[k === `containerd.io/gc.ref.snapshot.${snapshotter}` ? 'containerd.io/gc.ref.snapshot.SNAPSHOTTER' : k] = v;
    out[d] = l;
  }
  return out;
}

async function snapshotsOf(ns: string, snapshotter: string, c: Containerd = ctd): Promise<Record<string, string>[]> {
  return parseCtrTable(await ctrOk(ns, ['snapshots', '--snapshotter', snapshotter, 'ls'], c)).sort((a, b) => (a.KEY ?? '').localeCompare(b.KEY ?? ''));
}

async function imagesOf(ns: string, c: Containerd = ctd): Promise<Record<string, string>[]> {
  return parseCtrTable(await ctrOk(ns, ['images', 'ls'], c));
}

// ---------------------------------------------------------------------------------------
// Oracles from the OCI layout

async function configOf(img: BuiltImage): Promise<{ rootfs: { diff_ids: string[] } }> {
  return JSON.parse(await readFile(join(img.layoutDir, 'blobs', 'sha256', img.configDigest.slice(7)), 'utf8')) as { rootfs: { diff_ids: string[] } };
}




function parseSums(text: string): Map<string, string> {
  const got = new Map<string, string>();
  for (const line of text.split('\n')) {
    const m = /^([0-9a-f]{64}) {2}(.*)$/.exec(line);
    if (m !== null) got.set(m[2]!, m[1]!);
  }
  return got;
}

// ---------------------------------------------------------------------------------------

const NS = 'rpull-a';
const NS_CTR = 'rpull-b';

t.test('rpull: image record, content, labels and snapshots as containerd\'s own pull', async (t) => {
  explainOnFailure(t);
  const chain = chainIdsOf(multi);
  const diffIds = (await configOf(multi)).rootfs.diff_ids;
  t.equal(chain.length, 4, 'four layers');

  const r = await rpullJson(t, NS, pushed.ref);
  t.equal(r.image, pushed.ref, 'the image record is named REF');
  t.equal(r.namespace, NS);
  t.equal(r.snapshotter, 'soci-ts');
  t.equal(r.manifest, pushed.manifestDigest, 'the manifest the registry serves');
  t.equal(r.config, multi.configDigest);
  t.equal(r.target.digest, pushed.manifestDigest, 'target: the manifest (no index here)');
  t.equal(r.imageRecord, 'created');
  t.equal(r.chainId, chain[3], 'the top chain ID');
  t.same(
    r.layers.map((l) => [l.digest, l.diffId, l.chainId, l.outcome, l.fetchedBytes]),
    pushed.layers.map((l, i) => [l.digest, diffIds[i], chain[i], 'applied', l.size]),
    'every layer fetched whole (its size in bytes) and applied (no SOCI index: the snapshotter returned mounts)',
  );

  // containerd's own pull of the same image, into overlayfs, in another namespace.
  const out = await ctrOk(NS_CTR, ['images', 'pull', '--plain-http', '--snapshotter', 'overlayfs', pushed.ref]);
  t.match(out, /done/, 'ctr images pull (the oracle)');

  const ours = await imagesOf(NS);
  const theirs = await imagesOf(NS_CTR);
  t.same(
    ours.map((i) => [i.REF, i.TYPE, i.DIGEST]),
    [[pushed.ref, 'application/vnd.oci.image.manifest.v1+json', pushed.manifestDigest]],
    'ctr images ls: the image, with the manifest digest',
  );
  t.same(
    ours.map((i) => [i.REF, i.TYPE, i.DIGEST, i.SIZE, i.PLATFORMS]),
    theirs.map((i) => [i.REF, i.TYPE, i.DIGEST, i.SIZE, i.PLATFORMS]),
    'the same image row as after ctr images pull',
  );

  const content = await contentOf(NS);
  t.same(
    [...content.keys()].sort(),
    [pushed.manifestDigest, multi.configDigest, ...pushed.layers.map((l) => l.digest)].sort(),
    'ctr content ls: exactly manifest, config and the four (applied) layers',
  );
  t.same(neutral(content, 'soci-ts'), neutral(await contentOf(NS_CTR), 'overlayfs'), 'the content labels of containerd\'s pull, key for key and value for value');
  const m = content.get(pushed.manifestDigest)!;
  t.equal(m['containerd.io/gc.ref.content.config'], multi.configDigest, 'manifest → config GC reference');
  t.same(
    pushed.layers.map((_, i) => m[`containerd.io/gc.ref.content.l.${i}`]),
    pushed.layers.map((l) => l.digest),
    'manifest → layer GC references',
  );
  t.equal(content.get(multi.configDigest)!['containerd.io/gc.ref.snapshot.soci-ts'], chain[3], 'config → top snapshot GC reference, for soci-ts');
  t.same(
    pushed.layers.map((l) => content.get(l.digest)!['containerd.io/uncompressed']),
    diffIds,
    'each layer labelled with its diff_id',
  );
  t.equal(m[`containerd.io/distribution.source.127.0.0.1`], 'soci-ts-rpull/multi', 'distribution source: host without port = repository');

  const snaps = await snapshotsOf(NS, 'soci-ts');
  const expected = chain.map((k, i) => ({ KEY: k, PARENT: i === 0 ? '' : chain[i - 1]!, KIND: 'Committed' })).sort((a, b) => a.KEY.localeCompare(b.KEY));
  t.same(snaps, expected, 'one committed snapshot per chain ID, parent = the previous chain ID, no extract key left');
  t.same(snaps, await snapshotsOf(NS_CTR, 'overlayfs'), 'the same snapshots as containerd made in overlayfs');

  for (const [i, k] of chain.entries()) {
    const info = JSON.parse(await ctrOk(NS, ['snapshots', '--snapshotter', 'soci-ts', 'info', k])) as { Labels?: Record<string, string> };
    const labels = info.Labels ?? {};
    t.same(
      {
        ref: labels['containerd.io/snapshot.ref'],
        image: labels['containerd.io/snapshot/cri.image-ref'],
        manifest: labels['containerd.io/snapshot/cri.manifest-digest'],
        layer: labels['containerd.io/snapshot/cri.layer-digest'],
        layers: labels['containerd.io/snapshot/cri.image-layers'],
      },
      {
        ref: k,
        image: pushed.ref,
        manifest: pushed.manifestDigest,
        layer: pushed.layers[i]!.digest,
        layers: pushed.layers.slice(i).map((l) => l.digest).join(','),
      },
      `layer ${i}: the remote-snapshot labels on its snapshot`,
    );
  }
  const leases = parseCtrTable(await ctrOk(NS, ['leases', 'ls']));
  t.same(leases, [], 'the pull\'s lease is gone');
});

let unpacked: Promise<string> | undefined;
/** umoci unpack of multi (once): its rootfs. */
function umociRootfs(): Promise<string> {
  unpacked ??= run('umoci', ['unpack', '--image', `${multi.layoutDir}:${multi.tag}`, join(dir, 'bundle')]).then(() => join(dir, 'bundle', 'rootfs'));
  return unpacked;
}

t.test('ctr run on the rpulled image sees exactly the files of umoci unpack', async (t) => {
  explainOnFailure(t);
  const want = await treeSums(await umociRootfs());
  t.ok(want.size > 1000, `the oracle has ${want.size} regular files`);
  const id = `soci-ts-rpull-${process.pid}-${++containerSeq}`;
  const got = parseSums(await ctrOk(NS, ['run', '--rm', '--snapshotter', 'soci-ts', pushed.ref, id, 'sh', '-c', 'find / -xdev -type f -exec sha256sum {} +']));
  t.equal(got.size, want.size, 'as many regular files');
  t.same([...want.keys()].filter((p) => !got.has(p)), [], 'no file of the image is missing');
  t.same([...got.keys()].filter((p) => !want.has(p)), [], 'no file the image does not have');
  t.same([...want].filter(([p, h]) => got.has(p) && got.get(p) !== h).map(([p]) => p), [], 'every file has the content of the image');
  t.equal(got.get('/bin/busybox'), want.get('/bin/busybox'), 'sha256sum /bin/busybox as in the image');
});

t.test('a second rpull is a no-op', async (t) => {
  explainOnFailure(t);
  const contentBefore = await contentOf(NS);
  const snapsBefore = await snapshotsOf(NS, 'soci-ts');
  const imagesBefore = await imagesOf(NS);
  const r = await sociTs(['rpull', '--address', ctd.address, '--namespace', NS, pushed.ref]);
  t.equal(r.code, 0, 'exit code 0');
  const lines = r.stdout.split('\n').filter((l) => l !== '');
  t.equal(lines.length, 1, 'one summary line');
  t.match(lines[0], /4 layers \(0 lazy, 0 fetched and applied, 4 already present\)/, 'every layer already present');
  t.match(lines[0], /image unchanged/, 'the image record left as it was');
  const j = await rpullJson(t, NS, pushed.ref);
  t.same(
    j.layers.map((l) => [l.outcome, l.fetchedBytes]),
    pushed.layers.map(() => ['present', 0]),
    'JSON: present, nothing fetched',
  );
  t.equal(j.fetchedBytes, pushed.manifestBytes.length + (await readFile(join(multi.layoutDir, 'blobs', 'sha256', multi.configDigest.slice(7)))).length, 'only the manifest and config read from the registry (to resolve REF)');
  t.same(await contentOf(NS), contentBefore, 'content and labels unchanged');
  t.same(await snapshotsOf(NS, 'soci-ts'), snapsBefore, 'snapshots unchanged');
  t.same(await imagesOf(NS), imagesBefore, 'image record unchanged');
});

/** The host's architecture in OCI terms and another one. */
function architectures(): { here: string; other: string } {
  const here = process.arch === 'x64' ? 'amd64' : process.arch === 'arm64' ? 'arm64' : process.arch;
  return { here, other: here === 'amd64' ? 'arm64' : 'amd64' };
}

async function putManifest(repo: string, tag: string, mediaType: string, bytes: Buffer): Promise<string> {
  const res = await registryRequest(registry, `/v2/${repo}/manifests/${tag}`, { method: 'PUT', headers: { 'content-type': mediaType }, body: bytes });
  if (res.status !== 201) throw new Error(`PUT manifest ${repo}:${tag}: HTTP ${res.status} ${res.body.toString('utf8').slice(0, 300)}`);
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

async function putBlob(repo: string, bytes: Buffer): Promise<string> {
  const digest = `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
  const start = await registryRequest(registry, `/v2/${repo}/blobs/uploads/`, { method: 'POST' });
  if (start.status !== 202) throw new Error(`POST upload ${repo}: HTTP ${start.status}`);
  const loc = new URL(String(start.headers.location), registry.url);
  loc.searchParams.set('digest', digest);
  const done = await registryRequest(registry, `${loc.pathname}${loc.search}`, { method: 'PUT', headers: { 'content-type': 'application/octet-stream' }, body: bytes });
  if (done.status !== 201) throw new Error(`PUT blob ${repo}: HTTP ${done.status} ${done.body.toString('utf8').slice(0, 300)}`);
  return digest;
}

t.test('a manifest list: the platform\'s manifest, labels as containerd\'s, --platform', async (t) => {
  explainOnFailure(t);
  const repo = pushed.repo;
  // small next to multi in the same repository (an index names manifests of its repository).
  await skopeoCopy(`oci:${small.layoutDir}:${small.tag}`, `docker://${registry.host}/${repo}:small`, { extraArgs: ['--preserve-digests'] });
  const smallManifest = await readFile(join(small.layoutDir, 'blobs', 'sha256', small.manifestDigest.slice(7)));
  const smallPushed = { manifestDigest: small.manifestDigest, manifestBytes: smallManifest };
  const { here, other } = architectures();
  const index = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      manifests: [
        { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: smallPushed.manifestDigest, size: smallPushed.manifestBytes.length, platform: { os: 'linux', architecture: other } },
        { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: pushed.manifestDigest, size: pushed.manifestBytes.length, platform: { os: 'linux', architecture: here } },
      ],
    }),
  );
  const indexDigest = await putManifest(repo, 'idx', 'application/vnd.oci.image.index.v1+json', index);
  const ref = `${registry.host}/${repo}:idx`;

  const r = await rpullJson(t, 'rpull-idx-a', ref);
  t.equal(r.target.digest, indexDigest, 'the image record targets the index');
  t.equal(r.target.mediaType, 'application/vnd.oci.image.index.v1+json');
  t.equal(r.manifest, pushed.manifestDigest, `the ${here} manifest (this host's)`);
  t.equal(r.platform, `linux/${here}`);
  await ctrOk('rpull-idx-b', ['images', 'pull', '--plain-http', '--snapshotter', 'overlayfs', '--platform', `linux/${here}`, ref]);
  const ours = await contentOf('rpull-idx-a');
  t.same(
    [...ours.keys()].sort(),
    [indexDigest, pushed.manifestDigest, multi.configDigest, ...pushed.layers.map((l) => l.digest)].sort(),
    'index, the one manifest, its config and layers (not the other platform\'s manifest)',
  );
  t.same(ours.get(indexDigest)?.['containerd.io/gc.ref.content.m.0'], smallPushed.manifestDigest, 'the index references every manifest (m.0: the other platform\'s)');
  t.same(ours.get(indexDigest)?.['containerd.io/gc.ref.content.m.1'], pushed.manifestDigest, 'm.1: this platform\'s');
  t.same(neutral(ours, 'soci-ts'), neutral(await contentOf('rpull-idx-b'), 'overlayfs'), 'the content labels of ctr images pull of the index');
  t.same(
    (await imagesOf('rpull-idx-a')).map((i) => [i.REF, i.TYPE, i.DIGEST]),
    (await imagesOf('rpull-idx-b')).map((i) => [i.REF, i.TYPE, i.DIGEST]),
    'the same image record as ctr\'s',
  );

  const o = await rpullJson(t, 'rpull-idx-c', ref, ['--platform', `linux/${other}`]);
  t.equal(o.manifest, smallPushed.manifestDigest, `--platform linux/${other} pulls the other manifest`);
  t.equal(o.layers.length, small.layers.length);
  const chain = chainIdsOf(small);
  t.same((await snapshotsOf('rpull-idx-c', 'soci-ts')).map((s) => s.KEY).sort(), [...chain].sort(), 'its chain IDs');
});

/**
 * Pushes `repo:v1`: small's first layer plus a gzip layer of `bytes` random bytes nobody else
 * has (so no namespace of containerd has it either); its diff_id is made up (the layer is
 * never applied: the tests break its download).
 */
async function pushWithOddLayer(repo: string, bytes: number): Promise<{ base: BuiltImage['layers'][number]; odd: string }> {
  const base = small.layers[0]!;
  await putBlob(repo, await readFile(base.path));
  const odd = gzipSync(randomBytes(bytes), { level: 0 });
  const oddDigest = await putBlob(repo, odd);
  const diffIds = [base.diffId, `sha256:${createHash('sha256').update(randomBytes(32)).digest('hex')}`];
  const config = Buffer.from(JSON.stringify({ architecture: architectures().here, os: 'linux', config: {}, rootfs: { type: 'layers', diff_ids: diffIds } }));
  const configDigest = await putBlob(repo, config);
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: configDigest, size: config.length },
      layers: [
        { mediaType: base.mediaType, digest: base.digest, size: base.size },
        { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: oddDigest, size: odd.length },
      ],
    }),
  );
  await putManifest(repo, 'v1', 'application/vnd.oci.image.manifest.v1+json', manifest);
  return { base, odd: oddDigest };
}

t.test('a layer blob missing from the registry: clear error, no half snapshot, no image', async (t) => {
  explainOnFailure(t);
  const repo = 'soci-ts-rpull/broken';
  const ns = 'rpull-broken';
  const { base, odd: goneDigest } = await pushWithOddLayer(repo, 64 << 10);
  const del = await registryRequest(registry, `/v2/${repo}/blobs/${goneDigest}`, { method: 'DELETE' });
  t.equal(del.status, 202, 'the registry deleted the blob');
  t.equal((await registryRequest(registry, `/v2/${repo}/blobs/${goneDigest}`, { method: 'HEAD' })).status, 404, 'and no longer has it');

  const ref = `${registry.host}/${repo}:v1`;
  const r = await sociTs(['rpull', '--address', ctd.address, '--namespace', ns, ref]);
  t.equal(r.code, 1, 'exit code 1 (a user error)');
  t.equal(r.stdout, '', 'no summary');
  const err = r.stderr.trimEnd();
  t.notOk(err.includes('\n'), `one line: ${err}`);
  t.match(err, new RegExp(`layer 2/2 \\(${goneDigest}\\)`), 'names the layer');
  t.match(err, /blob not found/, 'and the reason');
  t.match(err, /extract snapshot was removed/, 'and says the extract snapshot is gone');

  // containerd's GC may already have dropped the first layer's snapshot too: the lease is gone
  // and no image holds it (containerd's own pull leaves the same).
  const snaps = await snapshotsOf(ns, 'soci-ts');
  t.same(
    snaps.filter((s) => !(s.KEY === base.diffId && s.PARENT === '' && s.KIND === 'Committed')),
    [],
    `no extract key left, at most the first layer's committed snapshot (${snaps.length})`,
  );
  // containerd removes a snapshot from its metadata at once and from the snapshotter in its
  // next garbage collection: wait (up to a minute) for the daemon to see it go.
  const direct = await SnapshotsClient.connect(address);
  t.teardown(() => direct.close());
  let active: string[] = [];
  for (const deadline = Date.now() + 60_000; ; ) {
    active = (await direct.list()).infos.filter((i) => i.kind !== 'COMMITTED').map((i) => i.name);
    if (active.length === 0 || Date.now() > deadline) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  t.same(active, [], 'the daemon holds no active (half) snapshot at all');
  t.same(parseCtrTable(await ctrOk(ns, ['content', 'active'])), [], 'no half-written ingest in the content store');
  t.same(await imagesOf(ns), [], 'no image record');
  t.notOk((await contentOf(ns)).has(goneDigest), 'the missing layer is not in the content store');
});

t.test('a layer blob corrupted on the way: digest mismatch, nothing half-written left', async (t) => {
  explainOnFailure(t);
  const repo = 'soci-ts-rpull/corrupt';
  const ns = 'rpull-corrupt';
  const { odd } = await pushWithOddLayer(repo, 6 << 20);
  // Every GET of that blob has one byte flipped, after some megabytes went into containerd.
  const proxy = await startFaultProxy({
    upstream: registry.url,
    seed: 7,
    rate: 1,
    faults: ['flip'],
    match: (method, path) => method === 'GET' && path.endsWith(`/blobs/${odd}`),
  });
  t.teardown(() => proxy.close());
  const r = await sociTs(['rpull', '--address', ctd.address, '--namespace', ns, `${proxy.host}/${repo}:v1`]);
  t.equal(r.code, 1, 'exit code 1');
  const err = r.stderr.trimEnd();
  t.notOk(err.includes('\n'), `one line: ${err}`);
  t.match(err, new RegExp(`layer 2/2 \\(${odd}\\)`), 'names the layer');
  t.match(err, /digest/, 'says the digest did not match');
  t.ok(proxy.stats.faults.flip >= 1, `the proxy corrupted ${proxy.stats.faults.flip} download(s)`);
  t.same(parseCtrTable(await ctrOk(ns, ['content', 'active'])), [], 'no half-written ingest left');
  t.notOk((await contentOf(ns)).has(odd), 'the layer is not in the content store');
  t.same((await snapshotsOf(ns, 'soci-ts')).filter((s) => s.KIND !== 'Committed'), [], 'no extract snapshot left');
  t.same(await imagesOf(ns), [], 'no image record');
});

t.test('errors: one line, exit code 1', async (t) => {
  explainOnFailure(t);
  const noSocket = join(dir, 'no-such.sock');
  const a = await sociTs(['rpull', '--address', noSocket, pushed.ref]);
  t.equal(a.code, 1, 'missing socket: exit code 1');
  t.match(a.stderr, new RegExp(`^soci-ts: ${noSocket.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: no containerd socket there`), `names the socket: ${a.stderr.trim()}`);
  t.notOk(a.stderr.trimEnd().includes('\n'), 'one line');

  const b = await sociTs(['rpull', '--address', ctd.address, '--snapshotter', 'no-such-snapshotter', pushed.ref]);
  t.equal(b.code, 1, 'unknown snapshotter: exit code 1');
  t.match(b.stderr, /containerd has no snapshotter "no-such-snapshotter" \(it has: [^)]*soci-ts[^)]*\)/, 'says which snapshotters containerd has');
  t.match(b.stderr, /\[proxy_plugins\.no-such-snapshotter\] type = "snapshot" address = /, 'and which proxy plugin block is missing');
  t.notOk(b.stderr.trimEnd().includes('\n'), 'one line');

  const c = await sociTs(['rpull', '--address', ctd.address, '--namespace', 'rpull-err', `${registry.host}/soci-ts-rpull/no-such-image:v1`]);
  t.equal(c.code, 1, 'image not found: exit code 1');
  t.match(c.stderr, /no-such-image:v1: manifest not found/, `names the image: ${c.stderr.trim()}`);
  t.same(await imagesOf('rpull-err'), [], 'no image record');

  // containerd with the proxy plugin configured but no daemon on its socket.
  const absent = join(dir, 'absent.sock');
  const lonely = await startContainerd({ proxyPlugins: [{ name: 'soci-ts', address: absent }] });
  t.teardown(() => lonely.stop());
  const d = await sociTs(['rpull', '--address', lonely.address, '--namespace', 'rpull-err', pushed.ref]);
  t.equal(d.code, 1, 'snapshotter not running: exit code 1');
  t.match(d.stderr, /cannot reach the snapshotter "soci-ts"/, `says containerd cannot reach it: ${d.stderr.trim()}`);
  t.ok(d.stderr.includes(absent), 'names its socket (from the plugin\'s exports)');
  t.notOk(d.stderr.trimEnd().includes('\n'), 'one line');
  const lonelyImages = await run('ctr', ['--address', lonely.address, '--namespace', 'rpull-err', 'images', 'ls']);
  t.same(parseCtrTable(lonelyImages.stdout), [], 'no image record');
});

t.test('an indexed image: every layer served by the snapshotter, no layer blob in the content store, ctr run works', async (t) => {
  // A containerd and snapshotter of its own: containerd links a snapshot a remote snapshotter
  // answered ALREADY_EXISTS for to any committed snapshot of the backend with the same
  // snapshot.ref and parent, in any namespace, so the other tests' applied snapshots of the
  // same layers would stand in for the lazy ones.
  const root2 = join(dir, 'lazy-root');
  const address2 = join(dir, 'lazy.sock');
  const daemon2 = await startSnapshotter({ root: root2, address: address2 });
  const ctd2 = await startContainerd({ proxyPlugins: [{ name: 'soci-ts', address: address2 }] });
  t.teardown(async () => {
    await ctd2.stop();
    await daemon2.stop();
    await stopFuseManager(root2);
    await unmountUnder(root2);
  });
  t.teardown(() => {
    if (!t.passing()) {
      t.comment(`containerd log (tail):\n${ctd2.logs().slice(-4000)}`);
      t.comment(`daemon log (tail):\n${daemon2.logs().slice(-6000)}`);
    }
  });

  const repo = 'soci-ts-rpull/indexed';
  const ns = 'rpull-lazy';
  const p = await pushImage(multi.layoutDir, multi.tag, registry, repo);
  const created = await sociTs(['create', '--push', '--root', join(dir, 'create-store'), '--json', p.ref]);
  t.equal(created.code, 0, `soci-ts create --push ${created.stderr.trim()}`);
  const made = JSON.parse(created.stdout) as { indexes: { layers: { digest: string; ztoc?: string }[] }[] };
  const indexed = new Set(made.indexes[0]!.layers.filter((l) => l.ztoc !== undefined).map((l) => l.digest));
  t.ok(indexed.size >= 1, `${indexed.size} layer(s) have a zTOC (the others are below the minimum layer size)`);

  // Through the snapshotter's control socket (ROOT/control.sock): the snapshotter pulls.
  const r = await rpullJson(t, ns, p.ref, ['--root', root2], ctd2);
  t.equal(daemon2.logLines().filter((l) => l.msg === 'rpull served for a client').length, 1, 'the snapshotter did the pull (rpull --root ROOT found its control socket)');
  // As soon as the manifest was known, before containerd's first Prepare mounted a layer, the
  // snapshotter started fetching the image's zTOCs.
  const msgs = daemon2.logLines().map((l) => l.msg);
  const warmed = daemon2.logLines().find((l) => l.msg === 'image warmed for its pull: index found, zTOCs fetching ahead');
  t.equal(warmed?.ztocs, indexed.size, `warmed: ${indexed.size} zTOC(s) fetched ahead`);
  t.ok(msgs.indexOf('image warmed for its pull: index found, zTOCs fetching ahead') < msgs.indexOf('layer mounted lazily: committed as a remote snapshot'), 'before the first layer was mounted');
  const chain = chainIdsOf(multi);
  t.same(
    r.layers.map((l) => [l.digest, l.chainId, l.outcome, l.fetchedBytes]),
    p.layers.map((l, i) => [l.digest, chain[i], indexed.has(l.digest) ? 'lazy' : 'local', 0]),
    'ALREADY_EXISTS for every layer: lazy where a zTOC covers it, unpacked by the snapshotter otherwise; rpull fetched none',
  );
  t.equal(r.fetchedBytes, p.manifestBytes.length + (await readFile(join(multi.layoutDir, 'blobs', 'sha256', multi.configDigest.slice(7)))).length, 'rpull read only the manifest and config');
  const content = await contentOf(ns, ctd2);
  t.same([...content.keys()].sort(), [p.manifestDigest, multi.configDigest].sort(), 'ctr content ls: manifest and config, no layer blob');
  const m = content.get(p.manifestDigest)!;
  t.same(
    p.layers.map((_, i) => m[`containerd.io/gc.ref.content.l.${i}`]),
    p.layers.map((l) => l.digest),
    'the manifest references its layers all the same, as containerd\'s pull labels it',
  );
  t.equal(content.get(multi.configDigest)!['containerd.io/gc.ref.snapshot.soci-ts'], chain[3], 'config → top snapshot');
  t.same(
    await snapshotsOf(ns, 'soci-ts', ctd2),
    chain.map((k, i) => ({ KEY: k, PARENT: i === 0 ? '' : chain[i - 1]!, KIND: 'Committed' })).sort((a, b) => a.KEY.localeCompare(b.KEY)),
    'the committed chain, as if containerd had applied the layers',
  );
  for (const [i, k] of chain.entries()) {
    const info = JSON.parse(await ctrOk(ns, ['snapshots', '--snapshotter', 'soci-ts', 'info', k], ctd2)) as { Labels?: Record<string, string> };
    t.equal(info.Labels?.['containerd.io/snapshot/remote'], indexed.has(p.layers[i]!.digest) ? 'remote snapshot' : undefined, `layer ${i}: the remote label as served`);
  }

  const want = await treeSums(await umociRootfs());
  const id = `soci-ts-rpull-${process.pid}-${++containerSeq}`;
  const got = parseSums(await ctrOk(ns, ['run', '--rm', '--snapshotter', 'soci-ts', p.ref, id, 'sh', '-c', 'find / -xdev -type f -exec sha256sum {} +'], ctd2));
  t.equal(got.size, want.size, 'ctr run: as many regular files as umoci unpack');
  t.same([...want].filter(([f, h]) => got.get(f) !== h).map(([f]) => f), [], 'every file has the content of the image, lazy layers included');

  const again = await rpullJson(t, ns, p.ref, ['--root', root2, '--in-process'], ctd2);
  t.same(again.layers.map((l) => l.outcome), p.layers.map(() => 'present'), 'a second rpull (--in-process): all present');
  t.equal(daemon2.logLines().filter((l) => l.msg === 'rpull served for a client').length, 1, '--in-process: pulled in the CLI, not by the snapshotter');
  const third = await rpullJson(t, ns, p.ref, ['--root', root2], ctd2);
  const bare = (x: JsonResult): Record<string, unknown> => ({ ...x, seconds: 0 });
  t.same(bare(third), bare(again), 'through the snapshotter: the same JSON result as in the CLI process (but the time)');

  // Errors relayed from the snapshotter: the same one line and exit code as in the CLI's process.
  for (const where of [['--in-process'], []]) {
    const e = await sociTs(['rpull', '--root', root2, ...where, '--address', ctd2.address, '--namespace', ns, `${registry.host}/soci-ts-rpull/no-such-image:v1`]);
    t.equal(e.code, 1, `${where.join(' ') || 'through the snapshotter'}: image not found, exit code 1`);
    t.match(e.stderr, /^soci-ts: .*no-such-image:v1: manifest not found/, `names the image: ${e.stderr.trim()}`);
    t.notOk(e.stderr.trimEnd().includes('\n'), 'one line');
    const noSocket = await sociTs(['rpull', '--root', root2, ...where, '--address', join(dir, 'no-such.sock'), p.ref]);
    t.equal(noSocket.code, 1, `${where.join(' ') || 'through the snapshotter'}: no containerd socket, exit code 1`);
    t.match(noSocket.stderr, /no containerd socket there/, `says so: ${noSocket.stderr.trim()}`);
  }
  // The CLI's log lines come back from the snapshotter to its stderr.
  const logged = await sociTs(['rpull', '--root', root2, '--log-level', 'debug', '--address', ctd2.address, '--namespace', ns, p.ref]);
  t.equal(logged.code, 0, 'rpull --log-level debug through the snapshotter');
  t.match(logged.stderr, /"msg":"lease created"/, 'its debug lines are on the CLI\'s stderr');
});

t.test('cri.image-layers stops before key + value exceed 4096 bytes (containerd getLayers)', async (t) => {
  const layers = Array.from({ length: 80 }, (_, i) => ({
    mediaType: i % 7 === 3 ? 'application/vnd.example.not-a-layer' : 'application/vnd.oci.image.layer.v1.tar+gzip',
    digest: `sha256:${createHash('sha256').update(String(i)).digest('hex')}`,
    size: 1,
  }));
  const value = imageLayersLabel(layers);
  const digests = value.split(',');
  const layerDigests = layers.filter((l) => l.mediaType.startsWith('application/vnd.oci.image.layer.')).map((l) => l.digest);
  t.same(digests, layerDigests.slice(0, digests.length), 'a prefix of the layers (non-layers skipped), in order');
  t.ok(Buffer.byteLength(LABEL_CRI_IMAGE_LAYERS) + value.length <= MAX_LABEL_BYTES, `fits: ${value.length} bytes`);
  t.ok(Buffer.byteLength(LABEL_CRI_IMAGE_LAYERS) + value.length + 1 + layerDigests[digests.length]!.length > MAX_LABEL_BYTES, 'the next digest would not fit');
  t.ok(digests.length < layerDigests.length, 'so some are left out');
  t.equal(imageLayersLabel(layers.slice(0, 3)), layerDigests.slice(0, 3).join(','), 'a short list is whole');
});

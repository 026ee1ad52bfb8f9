/**
 * `rpull`: pull an image into containerd for a snapshotter, over containerd's gRPC API, the way
 * containerd 1.6's client-side pull with unpack does it (client.Pull with WithPullUnpack and
 * CRI's snapshotter annotations), so that a remote snapshotter can serve layers lazily.
 *
 * 1. A lease for the whole pull (random id, `containerd.io/gc.expire` 24 h ahead), sent with
 *    every request in the `containerd-lease` header, deleted at the end: what the pull writes
 *    is safe from garbage collection until the image record holds it.
 * 2. The image from the registry: the manifest list (if any) → the manifest for the platform
 *    → the config. Each goes into the content store (ingest ref `index-`/`manifest-`/
 *    `config-<digest>` as containerd's remotes.MakeRefKey), with the labels containerd sets:
 *    `containerd.io/gc.ref.content.m.<i>` (manifests of an index: every one, not only the
 *    platform's, as SetChildrenMappedLabels runs before the platform filter),
 *    `containerd.io/gc.ref.content.config` and `containerd.io/gc.ref.content.l.<i>` (a
 *    manifest's config and layers), `containerd.io/gc.ref.content.<i>` (other children) and
 *    `containerd.io/distribution.source.<hostname>` = the repository (a sorted set of
 *    repositories; the host without its port, as Go's url.Hostname()).
 * 3. For each layer in order, with the chain ID from the config's diff_ids: a committed
 *    snapshot of that chain ID already there → "present". Otherwise Prepare(key =
 *    `extract-<unique> <chainID>`, parent = the previous chain ID) with the labels
 *    `containerd.io/snapshot.ref` = chain ID and CRI's `containerd.io/snapshot/cri.image-ref`,
 *    `.manifest-digest`, `.layer-digest`, `.image-layers` (this and the following layers'
 *    digests, comma-separated, cut before the first digest that would make key + value exceed
 *    4096 bytes, as pkg/snapshotters.getLayers), plus the layer's own `containerd.io/snapshot/`
 *    annotations. ALREADY_EXISTS with the chain ID then present → the snapshotter served the
 *    layer itself (remote snapshot, "lazy"). Otherwise the layer blob is streamed into the
 *    content store (digest and size verified by the fetcher and by containerd's commit),
 *    Diff.Apply'd onto the Prepare mounts (its result must be the diff_id), committed under the
 *    chain ID with the same labels, and labelled `containerd.io/uncompressed` = diff_id
 *    ("applied"). Any failure after Prepare removes the extract snapshot.
 * 4. The config gets `containerd.io/gc.ref.snapshot.<snapshotter>` = the top chain ID, and the
 *    image record (name = REF, target = the top descriptor) is created, or updated when it
 *    points elsewhere (left alone when it already points at the same target).
 *
 * Unlike containerd's unpacker, a layer's blob is downloaded only once its Prepare asked for
 * it: containerd starts downloading every later layer as soon as one needs fetching, which
 * would fetch layers a remote snapshotter was about to serve lazily.
 */
import { randomBytes } from 'node:crypto';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { stat } from 'node:fs/promises';
import {
  FetcherError,
  isManifestMediaType,
  parsePlatform,
  hostPlatform,
  formatPlatform,
  selectManifests,
  type Descriptor,
  type ImageManifest,
  type ImageReference,
  type Logger,
  type Platform,
  type Repository,
  MEDIA_TYPE_DOCKER_CONFIG,
  MEDIA_TYPE_OCI_CONFIG,
  MEDIA_TYPE_DOCKER_MANIFEST,
  MEDIA_TYPE_OCI_MANIFEST,
  MEDIA_TYPE_DOCKER_MANIFEST_LIST,
  MEDIA_TYPE_OCI_INDEX,
} from '../fetcher/index.js';
import { ContainerdApiError, ContainerdClient, hasCode, type ContentInfo, type PluginRecord, type ProtoDescriptor } from './containerd-client.js';
import type { SnapshotsClient, ProtoInfo, ProtoMount } from './grpc-api.js';
import { createHash } from 'node:crypto';

export { DEFAULT_CONTAINERD_ADDRESS, DEFAULT_NAMESPACE, DEFAULT_RPULL_SNAPSHOTTER, describeLayer } from './rpull-report.js';
import { mb } from './rpull-report.js';

export const LABEL_SNAPSHOT_REF = 'containerd.io/snapshot.ref';
export const LABEL_CRI_IMAGE_REF = 'containerd.io/snapshot/cri.image-ref';
export const LABEL_CRI_MANIFEST_DIGEST = 'containerd.io/snapshot/cri.manifest-digest';
export const LABEL_CRI_LAYER_DIGEST = 'containerd.io/snapshot/cri.layer-digest';
export const LABEL_CRI_IMAGE_LAYERS = 'containerd.io/snapshot/cri.image-layers';
export const LABEL_UNCOMPRESSED = 'containerd.io/uncompressed';
export const LABEL_GC_EXPIRE = 'containerd.io/gc.expire';
/** What a remote snapshotter (upstream soci, ours) sets on a snapshot it mounted lazily. */
export const LABEL_REMOTE_SNAPSHOT = 'containerd.io/snapshot/remote';
const LABEL_DISTRIBUTION_SOURCE = 'containerd.io/distribution.source';
const INHERITED_LABEL_PREFIX = 'containerd.io/snapshot/';
/** containerd's limit on a label's key plus value (labels.Validate). */
export const MAX_LABEL_BYTES = 4096;
const SNAPSHOTTER_PLUGIN_TYPE = 'io.containerd.snapshotter.v1';
/** How long the lease protects the pull (containerd's client default). */
const LEASE_LIFETIME_MS = 24 * 3600 * 1000;

// ---------------------------------------------------------------------------------------
// Errors

/** rpull could not do its job; `subject` is what it was about (socket, image, layer), `reason` why. */
export class RpullError extends Error {
  readonly subject: string;
  readonly reason: string;
  constructor(subject: string, reason: string, options?: { cause?: unknown }) {
    super(`${subject}: ${reason}`, options);
    this.name = 'RpullError';
    this.subject = subject;
    this.reason = reason;
  }
}

// ---------------------------------------------------------------------------------------
// Results

/**
 * - `lazy`: the snapshotter answered Prepare with ALREADY_EXISTS and marked the snapshot
 *   `containerd.io/snapshot/remote` (it mounted the layer lazily); nothing fetched or applied
 *   by rpull.
 * - `local`: the snapshotter answered ALREADY_EXISTS without that mark: it fetched and
 *   unpacked the layer itself (an indexed image's layer without a zTOC, as upstream does).
 * - `applied`: rpull put the blob in the content store (or found it there), applied it with
 *   containerd's differ and committed the snapshot.
 * - `present`: a committed snapshot of this chain ID was already there.
 */
export type LayerOutcome = 'lazy' | 'local' | 'applied' | 'present';

export interface RpullLayer {
  index: number;
  digest: string;
  mediaType: string;
  size: number;
  diffId: string;
  chainId: string;
  outcome: LayerOutcome;
  /** Bytes downloaded from the registry for it (0 unless applied from a fresh download). */
  fetchedBytes: number;
  /** Applied only: the blob was already in the content store (no download). */
  blobInStore?: boolean;
}

export interface RpullResult {
  /** The image record's name (REF, canonical). */
  image: string;
  /** The image record's target: the manifest list or the manifest. */
  target: Descriptor;
  manifest: Descriptor;
  config: Descriptor;
  platform?: Platform;
  snapshotter: string;
  namespace: string;
  /** The chain ID of the whole image (the snapshot a container starts from). */
  chainId: string;
  layers: RpullLayer[];
  /** What happened to the image record. */
  imageRecord: 'created' | 'updated' | 'unchanged';
  /** Bytes downloaded from the registry (manifests, config and layers). */
  fetchedBytes: number;
  seconds: number;
}

export type RpullEvent =
  | { type: 'layer-start'; index: number; count: number; digest: string; size: number }
  | { type: 'layer-progress'; index: number; count: number; digest: string; done: number; total: number }
  | { type: 'layer-applying'; index: number; count: number; digest: string }
  | { type: 'layer-done'; index: number; count: number; layer: RpullLayer };

export interface RpullOptions {
  /** containerd's socket. */
  address: string;
  namespace: string;
  /** The snapshotter containerd knows (a proxy plugin's name). */
  snapshotter: string;
  /** `os/arch[/variant]` for a manifest list; default the host's. */
  platform?: string;
  logger: Logger;
  onEvent?: (e: RpullEvent) => void;
  signal?: AbortSignal;
  /**
   * Called once the image manifest is known (its digest and layer digests), before the config
   * fetch and the layers: a snapshotter serving this pull starts its index discovery and zTOC
   * downloads then. Must not throw.
   */
  onManifest?: (m: { imageRef: string; manifestDigest: string; layers: string[] }) => void;
}

// ---------------------------------------------------------------------------------------
// containerd's media type and label rules

/** containerd's images.IsLayerType. */
export function isContainerdLayerType(mt: string): boolean {
  if (mt.startsWith('application/vnd.oci.image.layer.')) return true;
  const base = mt.split('+')[0];
  return (
    base === 'application/vnd.docker.image.rootfs.diff.tar' ||
    base === 'application/vnd.docker.image.rootfs.diff.tar.gzip' ||
    base === 'application/vnd.docker.image.rootfs.foreign.diff.tar' ||
    base === 'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip'
  );
}

const CHECKPOINT_CONFIG_TYPES = new Set([
  'application/vnd.containerd.container.criu.checkpoint.criu.tar',
  'application/vnd.containerd.container.checkpoint.config.v1+proto',
]);

/** containerd's images.IsKnownConfig. */
function isKnownConfig(mt: string): boolean {
  return mt === MEDIA_TYPE_DOCKER_CONFIG || mt === MEDIA_TYPE_OCI_CONFIG || CHECKPOINT_CONFIG_TYPES.has(mt);
}

/**
 * The GC reference labels of a parent on its children, as containerd's
 * images.SetChildrenMappedLabels with ChildGCLabels: config → `…content.config`, manifests →
 * `…content.m.<i>`, layers → `…content.l.<i>`, anything else → `…content.<i>`, each index
 * counted per prefix.
 */
export function childGcLabels(children: readonly Descriptor[]): Record<string, string> {
  const out: Record<string, string> = {};
  const counts = new Map<string, number>();
  for (const ch of children) {
    let key: string;
    if (isKnownConfig(ch.mediaType)) key = 'containerd.io/gc.ref.content.config';
    else if (ch.mediaType === MEDIA_TYPE_DOCKER_MANIFEST || ch.mediaType === MEDIA_TYPE_OCI_MANIFEST) key = 'containerd.io/gc.ref.content.m.';
    else if (isContainerdLayerType(ch.mediaType)) key = 'containerd.io/gc.ref.content.l.';
    else key = 'containerd.io/gc.ref.content.';
    const idx = counts.get(key) ?? 0;
    counts.set(key, idx + 1);
    if (idx > 0 || key.endsWith('.')) key = `${key}${idx}`;
    out[key] = ch.digest;
  }
  return out;
}

/** containerd's remotes.MakeRefKey: the ingest ref of a descriptor. */
export function ingestRef(desc: Descriptor): string {
  const name = desc.annotations?.['org.opencontainers.image.ref.name'];
  const key = name === undefined ? desc.digest : `${name}@${desc.digest}`;
  const mt = desc.mediaType;
  if (mt === MEDIA_TYPE_DOCKER_MANIFEST || mt === MEDIA_TYPE_OCI_MANIFEST) return `manifest-${key}`;
  if (mt === MEDIA_TYPE_DOCKER_MANIFEST_LIST || mt === MEDIA_TYPE_OCI_INDEX) return `index-${key}`;
  if (isContainerdLayerType(mt)) return `layer-${key}`;
  if (isKnownConfig(mt)) return `config-${key}`;
  return `unknown-${key}`;
}

/** The distribution source label key and repository for a reference (docker.AppendDistributionSourceLabel). */
export function distributionSource(ref: ImageReference): { key: string; repo: string } {
  let host = ref.host;
  // Go's url.Hostname(): without the port, IPv6 without brackets.
  if (host.startsWith('[')) host = host.slice(1, host.indexOf(']'));
  else if (host.includes(':')) host = host.slice(0, host.lastIndexOf(':'));
  return { key: `${LABEL_DISTRIBUTION_SOURCE}.${host}`, repo: ref.repository };
}

/** containerd's appendDistributionSourceLabel: the sorted, de-duplicated set of repositories. */
export function appendDistributionSource(existing: string | undefined, repo: string): string {
  const repos = new Set((existing ?? '').split(',').filter((r) => r !== ''));
  repos.add(repo);
  return [...repos].sort().join(',');
}

/**
 * CRI's `cri.image-layers` value: the digests of `layers` (this and the following ones),
 * comma-separated, as many as fit with the key into {@link MAX_LABEL_BYTES} (getLayers).
 */
export function imageLayersLabel(layers: readonly Descriptor[], key = LABEL_CRI_IMAGE_LAYERS): string {
  let out = '';
  for (const l of layers) {
    if (!isContainerdLayerType(l.mediaType)) continue;
    const item = out === '' ? l.digest : `,${l.digest}`;
    if (Buffer.byteLength(key) + Buffer.byteLength(out + item) > MAX_LABEL_BYTES) break;
    out += item;
  }
  return out;
}

/** The chain IDs of a list of diff IDs (OCI image spec: ChainID(n) = sha256(ChainID(n-1) + " " + DiffID(n))). */
export function chainIds(diffIds: readonly string[]): string[] {
  const out: string[] = [];
  for (const d of diffIds) {
    const prev = out.at(-1);
    out.push(prev === undefined ? d : `sha256:${createHash('sha256').update(`${prev} ${d}`).digest('hex')}`);
  }
  return out;
}

/** A random id as containerd's leases.WithRandomID and the unpacker's uniquePart: `<ns of the second>-<4 base64url chars>`. */
function uniquePart(): string {
  const ns = Number(process.hrtime.bigint() % 1_000_000_000n);
  return `${ns}-${randomBytes(3).toString('base64url')}`;
}

/** Go's time.RFC3339 in UTC. */
function rfc3339(ms: number): string {
  return new Date(ms).toISOString().replace(/\.\d{3}Z$/, 'Z');
}

function toProto(d: Descriptor): ProtoDescriptor {
  return { media_type: d.mediaType, digest: d.digest, size: d.size, annotations: d.annotations ?? {} };
}

// ---------------------------------------------------------------------------------------
// Checks before pulling

/** Fails with a clear RpullError unless a containerd answers on `address`. */
async function checkSocket(address: string): Promise<void> {
  const path = address.startsWith('unix:') ? address.slice('unix:'.length) : address;
  let st: Awaited<ReturnType<typeof stat>>;
  try {
    st = await stat(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new RpullError(path, 'no containerd socket there (is containerd running? --address names its socket)', { cause: err });
    if (code === 'EACCES') throw new RpullError(path, 'permission denied on the containerd socket (run as root)', { cause: err });
    throw new RpullError(path, `cannot reach the containerd socket: ${(err as Error).message}`, { cause: err });
  }
  if (!st.isSocket()) throw new RpullError(path, 'not a unix socket (--address names containerd\'s socket)');
}

/** The snapshotter's plugin record; fails naming the config block to add when it is missing. */
async function checkSnapshotter(ctd: ContainerdClient, name: string): Promise<PluginRecord> {
  let plugins: PluginRecord[];
  try {
    plugins = await ctd.plugins([], { timeoutMs: 15_000 });
  } catch (err) {
    if (hasCode(err, GrpcStatus.UNAVAILABLE) || hasCode(err, GrpcStatus.DEADLINE_EXCEEDED)) {
      throw new RpullError(ctd.address, `containerd does not answer (${(err as ContainerdApiError).details || 'unavailable'})`, { cause: err });
    }
    throw err;
  }
  const snapshotters = plugins.filter((p) => p.type === SNAPSHOTTER_PLUGIN_TYPE);
  const plugin = snapshotters.find((p) => p.id === name);
  if (plugin === undefined) {
    const working = snapshotters.filter((p) => p.init_err === null || p.init_err.message === '').map((p) => p.id);
    throw new RpullError(
      ctd.address,
      `containerd has no snapshotter "${name}" (it has: ${working.join(', ') || 'none'}); add to its config.toml ` +
        `[proxy_plugins.${name}] type = "snapshot" address = "/run/soci-ts/soci-ts.sock" (the socket of \`soci-ts snapshotter\`) and restart containerd`,
    );
  }
  if (plugin.init_err !== null && plugin.init_err.message !== '') {
    throw new RpullError(ctd.address, `containerd's snapshotter "${name}" failed to start: ${plugin.init_err.message}`);
  }
  return plugin;
}

// ---------------------------------------------------------------------------------------
// The pull

interface Ctx {
  ctd: ContainerdClient;
  sn: SnapshotsClient;
  repo: Repository;
  ref: ImageReference;
  opts: RpullOptions;
  source: { key: string; repo: string };
  fetched: number;
  plugin: PluginRecord;
}

/**
 * Puts `desc` into the content store (unless it is there) and sets `labels` plus the
 * distribution source label, updating only what differs. `data` gives the bytes when needed.
 */
async function storeContent(
  c: Ctx,
  desc: Descriptor,
  labels: Record<string, string>,
  data: () => AsyncIterable<Uint8Array>,
  onProgress?: (done: number, total: number) => void,
): Promise<{ info: ContentInfo | undefined; written: boolean }> {
  let info = await c.ctd.contentInfo(desc.digest);
  let written = false;
  if (info === undefined) {
    const want = { ...labels, [c.source.key]: c.source.repo };
    const outcome = await c.ctd.writeBlob(ingestRef(desc), { digest: desc.digest, size: desc.size }, data, { labels: want, onProgress, signal: c.opts.signal });
    written = outcome !== 'exists';
    info = await c.ctd.contentInfo(desc.digest);
    if (info === undefined) throw new RpullError(desc.digest, 'containerd does not list the blob it just committed');
  }
  const have = info.labels;
  const want: Record<string, string> = { ...labels, [c.source.key]: appendDistributionSource(have[c.source.key], c.source.repo) };
  const paths = Object.keys(want).filter((k) => have[k] !== want[k]);
  if (paths.length > 0) {
    info = await c.ctd.contentUpdate(
      desc.digest,
      want,
      paths.map((k) => `labels.${k}`),
    );
  }
  return { info, written };
}

async function* bufferSource(bytes: Uint8Array): AsyncGenerator<Uint8Array> {
  yield bytes;
}

/** Pulls `ref` into containerd for `opts.snapshotter`; see the module comment. */
export async function rpull(repo: Repository, opts: RpullOptions): Promise<RpullResult> {
  const started = performance.now();
  const ref = repo.ref;
  const imageName = ref.toString();
  await checkSocket(opts.address);
  const base = await ContainerdClient.connect(opts.address, { namespace: opts.namespace });
  try {
    const plugin = await checkSnapshotter(base, opts.snapshotter);
    const leaseId = uniquePart();
    await base.leaseCreate(leaseId, { [LABEL_GC_EXPIRE]: rfc3339(Date.now() + LEASE_LIFETIME_MS) });
    opts.logger.debug('lease created', { lease: leaseId });
    const ctd = base.withLease(leaseId);
    try {
      const sn = await ctd.snapshots(opts.snapshotter);
      const c: Ctx = { ctd, sn, repo, ref, opts, source: distributionSource(ref), fetched: 0, plugin };
      return await pull(c, imageName, started);
    } catch (err) {
      if (opts.signal?.aborted === true && !(err instanceof RpullError && err.reason.startsWith('interrupted'))) {
        throw new RpullError(imageName, 'interrupted', { cause: err });
      }
      throw err;
    } finally {
      await base.leaseDelete(leaseId).catch((err: unknown) => opts.logger.warn('could not delete the lease', { lease: leaseId, error: err }));
    }
  } finally {
    base.close();
  }
}

async function pull(c: Ctx, imageName: string, started: number): Promise<RpullResult> {
  const { repo, opts } = c;
  // ---- manifests and config
  const top = await repo.fetchManifest();
  c.fetched += top.bytes.length;
  let platform: Platform | undefined;
  let manifestDesc: Descriptor;
  let manifest: ImageManifest;
  let manifestBytes: Buffer;
  if (top.parsed.kind === 'index') {
    const index = top.parsed.index;
    await storeContent(c, top.descriptor, childGcLabels(index.manifests), () => bufferSource(top.bytes));
    const want = opts.platform === undefined ? hostPlatform() : parsePlatform(opts.platform);
    const [chosen] = selectManifests(index, { platform: want, subject: imageName });
    const m = await repo.fetchManifest(chosen!);
    c.fetched += m.bytes.length;
    if (m.parsed.kind !== 'manifest') throw new RpullError(`${repo.ref.name}@${chosen!.digest}`, 'the index entry for the platform is itself an index (nested indexes are not supported)');
    platform = chosen!.platform;
    manifestDesc = { mediaType: m.descriptor.mediaType, digest: m.descriptor.digest, size: m.descriptor.size };
    manifest = m.parsed.manifest;
    manifestBytes = m.bytes;
  } else {
    manifestDesc = top.descriptor;
    manifest = top.parsed.manifest;
    manifestBytes = top.bytes;
  }
  if (!isManifestMediaType(manifestDesc.mediaType)) throw new RpullError(imageName, `not an image manifest: ${manifestDesc.mediaType}`);
  opts.onManifest?.({ imageRef: imageName, manifestDigest: manifestDesc.digest, layers: manifest.layers.filter((l) => isContainerdLayerType(l.mediaType)).map((l) => l.digest) });
  await storeContent(c, manifestDesc, childGcLabels([manifest.config, ...manifest.layers]), () => bufferSource(manifestBytes));

  const configBytes = await repo.fetchBlob(manifest.config, 16 << 20);
  c.fetched += configBytes.length;
  await storeContent(c, manifest.config, {}, () => bufferSource(configBytes));
  let diffIds: string[];
  try {
    const config = JSON.parse(configBytes.toString('utf8')) as { rootfs?: { diff_ids?: unknown } };
    const ids = config.rootfs?.diff_ids;
    if (!Array.isArray(ids) || !ids.every((d) => typeof d === 'string' && /^sha256:[0-9a-f]{64}$/.test(d))) throw new Error('rootfs.diff_ids is not a list of sha256 digests');
    diffIds = ids as string[];
  } catch (err) {
    throw new RpullError(`${repo.ref.name}@${manifest.config.digest}`, `bad image config: ${(err as Error).message}`, { cause: err });
  }
  const layers = manifest.layers.filter((l) => isContainerdLayerType(l.mediaType));
  if (layers.length !== diffIds.length) {
    throw new RpullError(imageName, `number of layers and diffIDs don't match: ${layers.length} != ${diffIds.length}`);
  }

  // ---- layers
  const chain = chainIds(diffIds);
  const results: RpullLayer[] = [];
  for (let i = 0; i < layers.length; i++) {
    if (opts.signal?.aborted === true) throw new RpullError(imageName, 'interrupted');
    const layer = await unpackLayer(c, imageName, manifestDesc, layers, i, diffIds[i]!, chain[i]!, i === 0 ? '' : chain[i - 1]!);
    results.push(layer);
    opts.onEvent?.({ type: 'layer-done', index: i, count: layers.length, layer });
  }
  const topChain = chain.at(-1) ?? '';

  // ---- the config references the snapshot, the image record the content
  if (topChain !== '') {
    const key = `containerd.io/gc.ref.snapshot.${opts.snapshotter}`;
    const info = await c.ctd.contentInfo(manifest.config.digest);
    if (info?.labels[key] !== topChain) await c.ctd.contentUpdate(manifest.config.digest, { [key]: topChain }, [`labels.${key}`]);
  }
  const target: ProtoDescriptor = toProto({ mediaType: top.descriptor.mediaType, digest: top.descriptor.digest, size: top.descriptor.size });
  const existing = await c.ctd.imageGet(imageName);
  let imageRecord: RpullResult['imageRecord'];
  if (existing?.target !== null && existing?.target !== undefined && existing.target.digest === target.digest && existing.target.media_type === target.media_type && existing.target.size === target.size) {
    imageRecord = 'unchanged';
  } else {
    imageRecord = await createOrUpdateImage(c.ctd, { name: imageName, labels: {}, target });
  }
  return {
    image: imageName,
    target: { mediaType: top.descriptor.mediaType, digest: top.descriptor.digest, size: top.descriptor.size },
    manifest: manifestDesc,
    config: { mediaType: manifest.config.mediaType, digest: manifest.config.digest, size: manifest.config.size },
    ...(platform === undefined ? {} : { platform }),
    snapshotter: opts.snapshotter,
    namespace: opts.namespace,
    chainId: topChain,
    layers: results,
    imageRecord,
    fetchedBytes: c.fetched,
    seconds: Number(((performance.now() - started) / 1000).toFixed(3)),
  };
}

/** containerd's createNewImage: Create, and on ALREADY_EXISTS Update (Create again if it vanished meanwhile). */
async function createOrUpdateImage(ctd: ContainerdClient, image: { name: string; labels: Record<string, string>; target: ProtoDescriptor }): Promise<'created' | 'updated'> {
  for (let attempt = 0; ; attempt++) {
    try {
      await ctd.imageCreate(image);
      return 'created';
    } catch (err) {
      if (!hasCode(err, GrpcStatus.ALREADY_EXISTS)) throw err;
    }
    try {
      await ctd.imageUpdate(image);
      return 'updated';
    } catch (err) {
      if (!hasCode(err, GrpcStatus.NOT_FOUND) || attempt >= 3) throw err;
    }
  }
}

async function snapshotInfo(sn: SnapshotsClient, key: string): Promise<ProtoInfo | undefined> {
  try {
    return await sn.stat(key);
  } catch (err) {
    if (hasCode(err, GrpcStatus.NOT_FOUND)) return undefined;
    throw ContainerdApiError.from('Snapshots.Stat', key, err);
  }
}

function layerSubject(i: number, count: number, digest: string): string {
  return `layer ${i + 1}/${count} (${digest})`;
}

/** One layer: present, lazy (ALREADY_EXISTS from Prepare) or fetched, applied and committed. */
async function unpackLayer(
  c: Ctx,
  imageName: string,
  manifestDesc: Descriptor,
  layers: readonly Descriptor[],
  i: number,
  diffId: string,
  chainId: string,
  parent: string,
): Promise<RpullLayer> {
  const { sn, opts } = c;
  const desc = layers[i]!;
  const count = layers.length;
  const subject = layerSubject(i, count, desc.digest);
  const base: Omit<RpullLayer, 'outcome'> = { index: i, digest: desc.digest, mediaType: desc.mediaType, size: desc.size, diffId, chainId, fetchedBytes: 0 };
  opts.onEvent?.({ type: 'layer-start', index: i, count, digest: desc.digest, size: desc.size });
  const log = opts.logger.child({ layer: desc.digest, chainId });

  if ((await snapshotInfo(sn, chainId)) !== undefined) {
    log.debug('layer snapshot already present');
    return { ...base, outcome: 'present' };
  }

  const labels: Record<string, string> = {};
  for (const [k, v] of Object.entries(desc.annotations ?? {})) {
    if (k === LABEL_SNAPSHOT_REF || k.startsWith(INHERITED_LABEL_PREFIX)) labels[k] = v;
  }
  labels[LABEL_CRI_IMAGE_REF] = imageName;
  labels[LABEL_CRI_LAYER_DIGEST] = desc.digest;
  labels[LABEL_CRI_IMAGE_LAYERS] = imageLayersLabel(layers.slice(i));
  labels[LABEL_CRI_MANIFEST_DIGEST] = manifestDesc.digest;
  labels[LABEL_SNAPSHOT_REF] = chainId;

  // Prepare, as the unpacker: up to 3 tries with a fresh key when ALREADY_EXISTS does not
  // come with the chain ID's snapshot.
  let key = '';
  let mounts: ProtoMount[] | undefined;
  for (let attempt = 1; attempt <= 3 && mounts === undefined; attempt++) {
    key = `extract-${uniquePart()} ${chainId}`;
    try {
      mounts = await sn.prepare(key, parent, labels);
    } catch (err) {
      if (!hasCode(err, GrpcStatus.ALREADY_EXISTS)) throw prepareError(c, subject, key, err);
      const served = await snapshotInfo(sn, chainId);
      if (served !== undefined) {
        const lazy = served.labels[LABEL_REMOTE_SNAPSHOT] !== undefined;
        log.info(lazy ? 'the snapshotter mounted the layer lazily (remote snapshot)' : 'the snapshotter fetched and unpacked the layer itself', { key });
        return { ...base, outcome: lazy ? 'lazy' : 'local' };
      }
      log.debug('extraction snapshot already exists, chain id not found; trying again', { key });
    }
  }
  if (mounts === undefined) throw new RpullError(subject, `unable to prepare extraction snapshot: ALREADY_EXISTS three times without snapshot ${chainId}`);

  // From here on, any failure removes the extract snapshot.
  try {
    let blobInStore = true;
    await storeContent(
      c,
      desc,
      {},
      () => {
        blobInStore = false;
        return countBytes(c.repo.blobStream(desc, { signal: opts.signal }), (n) => {
          base.fetchedBytes += n;
          c.fetched += n;
        });
      },
      (done, total) => opts.onEvent?.({ type: 'layer-progress', index: i, count, digest: desc.digest, done, total }),
    );
    opts.onEvent?.({ type: 'layer-applying', index: i, count, digest: desc.digest });
    const applied = await c.ctd.diffApply(toProto(desc), mounts);
    if (applied.digest !== diffId) throw new RpullError(subject, `wrong diff id calculated on extraction: ${applied.digest}, the config says ${diffId}`);
    try {
      await sn.commit(chainId, key, labels);
    } catch (err) {
      if (hasCode(err, GrpcStatus.ALREADY_EXISTS)) {
        // Someone else committed it meanwhile (the unpacker treats this as done).
        await removeQuietly(sn, key, log);
        return { ...base, outcome: 'present' };
      }
      throw ContainerdApiError.from('Snapshots.Commit', `${chainId} from ${key}`, err);
    }
    const info = await c.ctd.contentInfo(desc.digest);
    if (info?.labels[LABEL_UNCOMPRESSED] !== diffId) await c.ctd.contentUpdate(desc.digest, { [LABEL_UNCOMPRESSED]: diffId }, [`labels.${LABEL_UNCOMPRESSED}`]);
    log.debug('layer applied', { key, fetchedBytes: base.fetchedBytes });
    return { ...base, outcome: 'applied', blobInStore };
  } catch (err) {
    await removeQuietly(sn, key, log);
    if (opts.signal?.aborted === true) throw new RpullError(subject, 'interrupted (the extract snapshot was removed)', { cause: err });
    if (err instanceof RpullError) throw err;
    const reason = err instanceof FetcherError ? `fetching the layer failed: ${err.message}` : err instanceof Error ? err.message : String(err);
    throw new RpullError(subject, `${reason} (the extract snapshot was removed)`, { cause: err });
  }
}

function prepareError(c: Ctx, subject: string, key: string, err: unknown): Error {
  const e = ContainerdApiError.from('Snapshots.Prepare', key, err);
  if (e.code === GrpcStatus.UNAVAILABLE) {
    const where = c.plugin.exports.address;
    return new RpullError(
      subject,
      `containerd cannot reach the snapshotter "${c.opts.snapshotter}"${where === undefined ? '' : ` at ${where}`} (is \`soci-ts snapshotter\` running there?): ${e.details}`,
      { cause: err },
    );
  }
  return new RpullError(subject, `failed to prepare extraction snapshot: ${e.message}`, { cause: err });
}

async function removeQuietly(sn: SnapshotsClient, key: string, log: Logger): Promise<void> {
  try {
    await sn.remove(key);
  } catch (err) {
    if (!hasCode(err, GrpcStatus.NOT_FOUND)) log.error('failed to remove the extract snapshot', { key, error: err });
  }
}

async function* countBytes(source: AsyncIterable<Uint8Array>, add: (n: number) => void): AsyncGenerator<Uint8Array> {
  for await (const chunk of source) {
    add(chunk.byteLength);
    yield chunk;
  }
}


/** The final one-line summary. */
export function summarize(r: RpullResult): string {
  const n = (o: LayerOutcome): number => r.layers.filter((l) => l.outcome === o).length;
  const parts = [`${n('lazy')} lazy`, ...(n('local') > 0 ? [`${n('local')} unpacked by the snapshotter`] : []), `${n('applied')} fetched and applied`, `${n('present')} already present`];
  return (
    `${r.image}: ${r.layers.length} layers (${parts.join(', ')}) for snapshotter ${r.snapshotter}` +
    `${r.platform === undefined ? '' : `, ${formatPlatform(r.platform)}`}; image ${r.imageRecord} (${r.target.digest}); ${mb(r.fetchedBytes)} fetched in ${r.seconds} s`
  );
}

/** The result as `soci-ts rpull --json` prints it. */
export function rpullResultJson(r: RpullResult): object {
  return {
    image: r.image,
    namespace: r.namespace,
    snapshotter: r.snapshotter,
    target: r.target,
    manifest: r.manifest.digest,
    config: r.config.digest,
    ...(r.platform === undefined ? {} : { platform: formatPlatform(r.platform) }),
    chainId: r.chainId,
    imageRecord: r.imageRecord,
    fetchedBytes: r.fetchedBytes,
    seconds: r.seconds,
    layers: r.layers.map((l) => ({
      digest: l.digest,
      mediaType: l.mediaType,
      size: l.size,
      diffId: l.diffId,
      chainId: l.chainId,
      outcome: l.outcome,
      fetchedBytes: l.fetchedBytes,
      ...(l.blobInStore === undefined ? {} : { blobInStore: l.blobInStore }),
    })),
  };
}

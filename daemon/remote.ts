/**
 * Remote snapshots: the snapshotter's side of containerd's remote-snapshot protocol (see
 * ../shared/docs/soci-format.md §6), served through the FUSE manager (daemon/fuse-manager.ts).
 *
 * A Prepare whose labels name a target (`containerd.io/snapshot.ref`) and the image, manifest and
 * layer (`containerd.io/snapshot/cri.*`) is handled here, once the active snapshot exists:
 *
 * 1. The image's SOCI index is found (discoverIndex: the local store, the image's v2 annotation,
 *    v1 referrers, as far as the pull modes allow; an explicit
 *    `containerd.io/snapshot/remote/soci.index.digest` label wins), once per manifest digest
 *    (cached; "no index", or one only in a disabled pull mode, is cached for a minute).
 * 2. `lazy`: the layer has a zTOC (and is at least `min_layer_size`): the FUSE manager mounts it
 *    at the snapshot's fs dir; the snapshot is committed under the target with upstream's remote
 *    labels and what a remount needs (one transaction), and containerd is told ALREADY_EXISTS.
 * 3. `local`: the image has an index but this layer has no zTOC: the daemon downloads and
 *    unpacks it itself (parents = the parent chain's fs dirs, topmost first), commits it, and
 *    answers ALREADY_EXISTS too. Downloads of the image's other zTOC-less layers (from
 *    `cri.image-layers`) start at once, a few at a time, so they overlap.
 * 4. `fallback`: no index (or one only in a disabled pull mode), or anything failed (registry,
 *    zTOC, FUSE manager): the active snapshot is answered with its normal overlay mounts and
 *    containerd applies the layer. The reason is logged (info for "no index" and a disabled mode,
 *    warn for failures) with the layer digest and snapshot key, kept in the metadata (layer
 *    modes) and given to the metrics sink.
 *
 * Restart safety: the FUSE manager outlives the snapshotter. At start (when there are lazy
 * snapshots or a manager answers) and whenever the connection is lost, the snapshotter
 * connects again (starting a new manager when none answers) and reconciles: mounts the manager
 * has that no snapshot owns are unmounted (and their spans released); committed lazy snapshots
 * the manager does not serve are mounted again, and every active or view snapshot built on one of
 * them is logged as having lost its mounts (a running container there cannot read those layers).
 */
import { lchown, lstat, mkdir, rm, rmdir } from 'node:fs/promises';
import { join } from 'node:path';
import {
  AuthError,
  FetcherError,
  parseReference,
  type Descriptor,
  type ImageIndex,
  type ImageManifest,
  type Logger,
  type RegistryClient,
  type Repository,
} from '../fetcher/index.js';
import { DiscoverError, discoverIndex, prefetchZtoc, type DiscoveredIndex, type PullModes } from './discover.js';
import { diskUsage } from './diskusage.js';
import { isNoSpace } from './errdefs.js';
import {
  connectOrStartFuseManager,
  describeBuild,
  FuseManagerClient,
  FuseManagerIncompatibleError,
  upgradeAdvice,
  type ManagerBuildMatch,
  type ManagerLaunch,
} from './fuse-manager-client.js';
import { FuseManagerError, type HelloResult, type ManagedMount, type WireDescriptor } from './fuse-protocol.js';
import { buildIdentity } from './version.js';
import { configDiffIds, downloadLayerBlob, LayerSetupError, Semaphore, unpackLayerFile } from './layers.js';
import type { LayerModeRecord, MetadataStore, RemoteDetails, SnapshotRecord, Usage } from './metadata.js';
import { safeSink, type LayerModeName, type MetricsSink } from './metrics-sink.js';
import type { LayerModeReason } from './metrics.js';
import type { ArtifactStore } from './store.js';
import { detach, mountsUnder } from './sysmount.js';

export const LABEL_TARGET = 'containerd.io/snapshot.ref';
export const LABEL_IMAGE_REF = 'containerd.io/snapshot/cri.image-ref';
export const LABEL_MANIFEST_DIGEST = 'containerd.io/snapshot/cri.manifest-digest';
export const LABEL_LAYER_DIGEST = 'containerd.io/snapshot/cri.layer-digest';
export const LABEL_IMAGE_LAYERS = 'containerd.io/snapshot/cri.image-layers';
export const LABEL_INDEX_DIGEST = 'containerd.io/snapshot/remote/soci.index.digest';
export const LABEL_REMOTE = 'containerd.io/snapshot/remote';
export const REMOTE_LABEL_VALUE = 'remote snapshot';
export const LABEL_REMOTE_NAMESPACE = 'containerd.io/snapshot/remote/namespace';
export const LABEL_HAS_INDEX = 'containerd.io/snapshot/remote/has.soci.index.digest';

const DIGEST_RE = /^sha256:[0-9a-f]{64}$/;
const NO_INDEX_TTL_MS = 60_000;
const IMAGE_CACHE_ENTRIES = 64;
const DOWNLOAD_CONCURRENCY = 3;
/**
 * zTOCs of an image's later layers fetched ahead into the store, this many at a time: one, in
 * layer order, because containerd prepares the layers bottom up, so on a thin link the first
 * layer's zTOC should not share the bandwidth with the others (each is preloaded as it lands).
 */
const ZTOC_PREFETCH_CONCURRENCY = 1;
const UNUSED_DOWNLOAD_MS = 10 * 60_000;
const RECONNECT_MIN_MS = 1000;
const RECONNECT_MAX_MS = 60_000;

/** What the remote labels of a Prepare ask for. */
export interface RemoteRequest {
  target: string;
  imageRef: string;
  manifestDigest: string;
  layerDigest: string;
  /** This layer and the ones after it (`cri.image-layers`), when given. */
  imageLayers: string[];
  indexDigest?: string;
}

export type LabelsVerdict =
  /** No target label: an ordinary Prepare. */
  | { kind: 'none' }
  /** A target but not (all of) the image labels: containerd applies the layer. */
  | { kind: 'incomplete'; target: string; missing: string[] }
  | { kind: 'remote'; request: RemoteRequest }
  /** The labels are there but malformed. */
  | { kind: 'invalid'; target: string; reason: string };

export function parseRemoteLabels(labels: Record<string, string>): LabelsVerdict {
  const target = labels[LABEL_TARGET];
  if (target === undefined || target === '') return { kind: 'none' };
  const need = [LABEL_IMAGE_REF, LABEL_MANIFEST_DIGEST, LABEL_LAYER_DIGEST];
  const missing = need.filter((k) => labels[k] === undefined || labels[k] === '');
  if (missing.length > 0) return { kind: 'incomplete', target, missing };
  const manifestDigest = labels[LABEL_MANIFEST_DIGEST]!;
  const layerDigest = labels[LABEL_LAYER_DIGEST]!;
  const indexDigest = labels[LABEL_INDEX_DIGEST];
  for (const [k, v] of [
    [LABEL_MANIFEST_DIGEST, manifestDigest],
    [LABEL_LAYER_DIGEST, layerDigest],
    ...(indexDigest !== undefined && indexDigest !== '' ? [[LABEL_INDEX_DIGEST, indexDigest]] : []),
  ] as Array<[string, string]>) {
    if (!DIGEST_RE.test(v)) return { kind: 'invalid', target, reason: `label ${k} is not a sha256 digest (${JSON.stringify(v.slice(0, 100))})` };
  }
  try {
    parseReference(labels[LABEL_IMAGE_REF]!);
  } catch (err) {
    return { kind: 'invalid', target, reason: `label ${LABEL_IMAGE_REF}: ${err instanceof Error ? err.message : String(err)}` };
  }
  const imageLayers = (labels[LABEL_IMAGE_LAYERS] ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter((s) => DIGEST_RE.test(s));
  return {
    kind: 'remote',
    request: {
      target,
      imageRef: labels[LABEL_IMAGE_REF]!,
      manifestDigest,
      layerDigest,
      imageLayers,
      ...(indexDigest !== undefined && indexDigest !== '' ? { indexDigest } : {}),
    },
  };
}

export interface RemoteSettings {
  /** Layers with a zTOC but smaller than this are unpacked locally (default 0). */
  minLayerSize: number;
  /** How the FUSE manager is started (socket, arguments, log file). */
  manager: ManagerLaunch;
  /** How often to reconcile the manager's mounts with the metadata (default 5 min; 0 = never). */
  sweepIntervalMs?: number;
  /** Which SOCI index versions discovery may use (`[pull_modes.*] enable`; default both). */
  pullModes?: PullModes;
  /**
   * Start the FUSE manager when the snapshotter starts (default), so that the first lazy pull
   * does not wait for a process to start; `false` starts it at the first lazy layer.
   */
  startManagerAtOpen?: boolean;
}

export interface RemoteDeps {
  root: string;
  metadata: MetadataStore;
  store: ArtifactStore;
  client: RegistryClient;
  logger: Logger;
  fsPath: (id: string) => string;
  settings: RemoteSettings;
  metrics?: MetricsSink;
}

/** The active snapshot a remote Prepare works on. */
export interface PreparingSnapshot {
  id: string;
  key: string;
  parentIds: readonly string[];
  labels: Record<string, string>;
  namespace?: string;
}

export type PrepareOutcome = { committed: true; mode: 'lazy' | 'local' } | { committed: false; reason: string };

/** One image (manifest digest) as far as remote snapshots care. */
interface ImageInfo {
  repo: Repository;
  manifest: ImageManifest;
  descriptor: Descriptor;
  index: DiscoveredIndex | undefined;
  /** Why there is no index (where discovery looked, or the disabled pull mode that has one). */
  noIndex: { reason: string; code: 'no-index' | 'mode-disabled' } | undefined;
  diffIds: Promise<Array<string | undefined>>;
  at: number;
}

/** A failure that makes a layer fall back; `level` is how loudly it is logged. */
/** The layer-mode metric carries a short stable code; the sentence goes to the log and the metadata. */
type ReasonCode = LayerModeReason;

class Fallback extends Error {
  constructor(
    readonly reason: string,
    readonly level: 'info' | 'warn',
    readonly code: ReasonCode,
    options?: { cause?: unknown },
  ) {
    super(reason, options);
    this.name = 'Fallback';
  }
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function wire(d: Descriptor): WireDescriptor {
  return { mediaType: d.mediaType, digest: d.digest, size: d.size, ...(d.urls !== undefined && d.urls.length > 0 ? { urls: d.urls } : {}) };
}

/** Layer blobs downloaded ahead for local unpacking, shared by Prepares of one layer, a few at a time. */
class LayerDownloads {
  private readonly started = new Map<string, Promise<string>>();
  private readonly limit = new Semaphore(DOWNLOAD_CONCURRENCY);
  private readonly abort = new AbortController();
  constructor(
    private readonly dir: string,
    private readonly logger: Logger,
  ) {}

  private start(repo: Repository, desc: Descriptor): Promise<string> {
    const file = join(this.dir, `${desc.digest.replace(/^sha256:/, '')}.${process.pid}.${Math.random().toString(36).slice(2, 10)}`);
    const p = this.limit.run(async () => {
      if (this.abort.signal.aborted) throw new Error('the snapshotter is shutting down');
      await downloadLayerBlob(repo, desc, file, this.abort.signal);
      return file;
    });
    p.catch(() => undefined);
    return p;
  }

  /** Starts downloading a blob (if not started) for a later `take`; dropped when not taken within 10 minutes. */
  prefetch(repo: Repository, desc: Descriptor): void {
    if (this.started.has(desc.digest) || this.abort.signal.aborted) return;
    this.logger.debug('downloading a layer ahead for local unpacking', { layer: desc.digest });
    const p = this.start(repo, desc);
    this.started.set(desc.digest, p);
    p.then(
      (file) => {
        setTimeout(() => {
          if (this.started.get(desc.digest) !== p) return;
          this.started.delete(desc.digest);
          void rm(file, { force: true });
          this.logger.debug('a layer downloaded ahead was not used; removed', { layer: desc.digest });
        }, UNUSED_DOWNLOAD_MS).unref();
      },
      () => {
        if (this.started.get(desc.digest) === p) this.started.delete(desc.digest);
      },
    );
  }

  /** The downloaded blob's file (the caller owns and removes it): a prefetched one, or a new download. */
  take(repo: Repository, desc: Descriptor): Promise<string> {
    const p = this.started.get(desc.digest);
    this.started.delete(desc.digest);
    return p ?? this.start(repo, desc);
  }

  async close(): Promise<void> {
    this.abort.abort();
    const all = [...this.started.values()];
    this.started.clear();
    await Promise.allSettled(all);
    await rm(this.dir, { recursive: true, force: true }).catch(() => undefined);
  }
}

export class RemoteSnapshots {
  private readonly log: Logger;
  private readonly sink: MetricsSink | undefined;
  private readonly images = new Map<string, Promise<ImageInfo>>();
  private readonly downloads: LayerDownloads;
  /** zTOC digest → its fetch into the store, started by an earlier Prepare of the image. */
  private readonly ztocFetches = new Map<string, Promise<void>>();
  private readonly ztocLimit = new Semaphore(ZTOC_PREFETCH_CONCURRENCY);
  /** Mountpoints a Prepare is mounting right now (reconcile leaves them alone). */
  private readonly mounting = new Set<string>();
  private client: FuseManagerClient | undefined;
  private instance: string | undefined;
  private managerPid: number | undefined;
  private managerBuild: { hello: HelloResult; match: ManagerBuildMatch } | undefined;
  private connecting: Promise<FuseManagerClient> | undefined;
  private reconnectDelay = RECONNECT_MIN_MS;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private sweepTimer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(private readonly deps: RemoteDeps) {
    this.log = deps.logger;
    this.sink = safeSink(deps.metrics, (err) => deps.logger.warn('metrics sink failed', { error: err }));
    this.downloads = new LayerDownloads(join(deps.root, 'downloads'), deps.logger);
  }

  /**
   * At start: removes leftover downloads, and when there are lazy snapshots (or a manager is
   * running) connects to the manager and reconciles. Never rejects: a manager that cannot be
   * reached is logged, and tried again on the next request.
   */
  async open(): Promise<void> {
    // The build id (a hash of the modules) is needed at the first connection to a manager.
    void buildIdentity().catch(() => undefined);
    await rm(join(this.deps.root, 'downloads'), { recursive: true, force: true }).catch(() => undefined);
    const lazy = this.deps.metadata.lazySnapshots().length;
    const running = await FuseManagerClient.connect(this.deps.settings.manager.socket, 2000).then(
      (c) => {
        c.close();
        return true;
      },
      () => false,
    );
    if (lazy > 0 || running) {
      try {
        await this.manager();
      } catch (err) {
        // A manager this build cannot drive serves running containers: refuse to start rather than misdrive it.
        if (err instanceof FuseManagerIncompatibleError) throw err;
        this.log.error('FUSE manager unavailable at start: lazy snapshots are not served until it can be started', { lazySnapshots: lazy, error: err });
        this.scheduleReconnect();
      }
    } else if (this.deps.settings.startManagerAtOpen !== false) {
      // Starting a manager takes most of a second: not on the first lazy pull's path. Not awaited
      // (the snapshotter serves meanwhile); a failure here is tried again at the first lazy layer.
      this.manager().catch((err: unknown) => this.log.warn('FUSE manager not started at start: starting it again at the first lazy layer', { error: err }));
    }
    const every = this.deps.settings.sweepIntervalMs ?? 5 * 60_000;
    if (every > 0) {
      this.sweepTimer = setInterval(() => void this.sweep(), every);
      this.sweepTimer.unref();
    }
  }

  /**
   * Before a snapshot on these parents is prepared or mounted: when one of them is served lazily
   * and the manager connection is down, connect (starting a manager and mounting them again).
   */
  async ensureServed(parentIds: readonly string[]): Promise<void> {
    if (this.client !== undefined && !this.client.closed) return;
    if (!parentIds.some((id) => this.deps.metadata.details(id) !== undefined)) return;
    await this.manager().catch((err: unknown) => this.log.error('FUSE manager unavailable: lazily served parents cannot be read', { error: err }));
  }

  /** The pid of the FUSE manager in use (undefined before the first connection). */
  get fuseManagerPid(): number | undefined {
    return this.managerPid;
  }

  /** The build of the FUSE manager in use and how it relates to this one (undefined before the first connection). */
  get fuseManagerBuild(): { hello: HelloResult; match: ManagerBuildMatch } | undefined {
    return this.managerBuild;
  }

  // ---------------------------------------------------------------- the FUSE manager

  /** A connected client, connecting (and starting a manager, and reconciling) when needed. */
  manager(): Promise<FuseManagerClient> {
    if (this.closed) return Promise.reject(new FuseManagerError('unavailable', '', 'the snapshotter is shutting down'));
    if (this.client !== undefined && !this.client.closed) return Promise.resolve(this.client);
    this.connecting ??= (async () => {
      const r = await connectOrStartFuseManager(this.deps.settings.manager, this.log);
      if (this.closed) {
        // Shut down while the manager was starting: a connection kept now would keep the process alive.
        r.client.close();
        throw new FuseManagerError('unavailable', '', 'the snapshotter is shutting down');
      }
      const before = this.instance;
      this.client = r.client;
      this.instance = r.hello.instance;
      this.managerPid = r.hello.pid;
      r.client.onClose(() => this.onManagerLost(r.client));
      const how = r.started ? 'started' : before === undefined ? 'attached to the running one' : before === r.hello.instance ? 'reconnected' : 'attached to another one';
      this.log.info(`FUSE manager: ${how}`, {
        pid: r.hello.pid,
        instance: r.hello.instance,
        startedAt: r.hello.startedAt,
        mounts: r.hello.mounts,
        version: r.hello.version,
        build: r.hello.build,
        protocol: r.hello.protocol,
        ...(r.replaced !== undefined ? { replacedPid: r.replaced.pid, replacedVersion: r.replaced.version, replacedBuild: r.replaced.build } : {}),
      });
      const ours = await buildIdentity();
      this.managerBuild = { hello: r.hello, match: r.match };
      if (r.match === 'compatible') {
        this.log.warn(`the FUSE manager runs another build of soci-ts (${describeBuild(r.hello)}; this snapshotter: ${describeBuild(ours)}): reattached, it keeps serving its ${r.hello.mounts} mount(s); ${upgradeAdvice(r.hello.pid)}`, {
          pid: r.hello.pid,
          managerVersion: r.hello.version,
          managerBuild: r.hello.build ?? null,
          managerProtocol: r.hello.protocol,
          version: ours.version,
          build: ours.build,
          protocol: ours.protocol,
        });
      }
      this.sink?.fuseManagerInfo?.({ version: r.hello.version, build: r.hello.build ?? 'unknown', protocol: r.hello.protocol, current: r.match === 'same' });
      await this.reconcile(r.client);
      this.reconnectDelay = RECONNECT_MIN_MS;
      return r.client;
    })();
    const p = this.connecting;
    void p.then(
      () => (this.connecting = undefined),
      () => (this.connecting = undefined),
    );
    return p;
  }

  private onManagerLost(c: FuseManagerClient): void {
    if (this.closed || this.client !== c) return;
    this.client = undefined;
    this.log.warn('lost the connection to the FUSE manager; connecting again (starting a new one if it died)', { pid: this.managerPid });
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.closed || this.reconnectTimer !== undefined) return;
    const delay = this.reconnectDelay;
    this.reconnectDelay = Math.min(RECONNECT_MAX_MS, delay * 2);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      this.manager().catch((err: unknown) => {
        this.log.error('FUSE manager still unavailable', { error: err, retryInMs: this.reconnectDelay });
        this.scheduleReconnect();
      });
    }, delay);
    this.reconnectTimer.unref();
  }

  /** Periodic: reconcile when connected (leaked mounts, lost ones). */
  private async sweep(): Promise<void> {
    const c = this.client;
    if (c === undefined || c.closed || this.closed) return;
    await this.reconcile(c).catch((err: unknown) => this.log.warn('periodic FUSE mount sweep failed', { error: err }));
  }

  /**
   * Makes the manager's mounts match the metadata: unmounts what no snapshot owns, mounts the
   * committed lazy snapshots it lacks, and logs the active snapshots that lost mounts.
   */
  private async reconcile(c: FuseManagerClient): Promise<void> {
    const { mounts } = await c.call('list', {});
    const lazy = this.deps.metadata.lazySnapshots();
    const wanted = new Map(lazy.map((l) => [this.deps.fsPath(l.id), l]));
    const have = new Map(mounts.map((m) => [m.mountpoint, m]));
    let removed = 0;
    for (const m of mounts) {
      const w = wanted.get(m.mountpoint);
      if (this.mounting.has(m.mountpoint) || (w !== undefined && w.layerDigest === m.layerDigest)) continue;
      this.log.warn('unmounting a lazy layer no snapshot owns (left by a Prepare or Remove that did not finish)', { mountpoint: m.mountpoint, layer: m.layerDigest, tag: m.tag });
      try {
        await c.call('unmount', { mountpoint: m.mountpoint, release: true });
        have.delete(m.mountpoint);
        removed++;
      } catch (err) {
        this.log.error('cannot unmount a leaked lazy layer', { mountpoint: m.mountpoint, error: err });
      }
    }
    const remounted: string[] = [];
    const failed: string[] = [];
    let kept = 0;
    for (const l of lazy) {
      const mp = this.deps.fsPath(l.id);
      if (have.get(mp)?.layerDigest === l.layerDigest) {
        kept++;
        continue;
      }
      const d = l.details;
      try {
        await c.call('mount', {
          mountpoint: mp,
          imageRef: d.imageRef,
          layer: { mediaType: d.layerMediaType, digest: l.layerDigest, size: d.layerSize },
          ztoc: { mediaType: d.ztocMediaType, digest: d.ztocDigest, size: d.ztocSize },
          tag: l.name,
        });
        remounted.push(l.id);
        this.log.info('mounted a lazy snapshot again', { key: l.name, layer: l.layerDigest, mountpoint: mp });
      } catch (err) {
        failed.push(l.id);
        this.log.error('cannot mount a lazy snapshot again: new containers on it will fail to read it until it can', { key: l.name, layer: l.layerDigest, mountpoint: mp, error: err });
      }
    }
    const lostIds = new Set([...remounted, ...failed]);
    const lost: Array<{ key: string; kind: string; layers: string[] }> = [];
    if (lostIds.size > 0) {
      const byId = new Map(lazy.map((l) => [l.id, l]));
      for (const s of this.deps.metadata.list()) {
        if (s.kind === 'committed') continue;
        let chain: string[];
        try {
          chain = this.deps.metadata.mountable(s.name).parentIds;
        } catch {
          continue;
        }
        const layers = chain.filter((id) => lostIds.has(id)).map((id) => byId.get(id)!.layerDigest);
        if (layers.length === 0) continue;
        lost.push({ key: s.name, kind: s.kind, layers });
        this.log.warn('active snapshot lost its lazily mounted layers: a container running on it cannot read them any more (new containers can; restart it)', {
          key: s.name,
          kind: s.kind,
          layers,
        });
      }
    }
    this.log.info('FUSE manager reconciled', { pid: this.managerPid, kept, remounted: remounted.length, failed: failed.length, removed, lostActive: lost.map((l) => l.key) });
  }

  // ---------------------------------------------------------------- Prepare

  /**
   * Serves the layer of a remote Prepare (see the module comment). `s` is the new active
   * snapshot (row and directories exist). Resolves `committed` when the snapshot was committed
   * under the target (the caller answers ALREADY_EXISTS), else the fallback reason (the caller
   * answers the active snapshot's mounts). Never rejects for a registry, zTOC or FUSE problem.
   */
  async prepare(s: PreparingSnapshot, req: RemoteRequest): Promise<PrepareOutcome> {
    const log = this.log.child({ key: s.key, layer: req.layerDigest });
    let info: ImageInfo;
    let layer: Descriptor;
    try {
      info = await this.imageInfo(req);
      const found = info.manifest.layers.find((l) => l.digest === req.layerDigest);
      if (found === undefined) throw new Fallback(`image manifest ${req.manifestDigest} has no layer ${req.layerDigest}`, 'warn', 'registry-error');
      layer = found;
      if (info.index === undefined) {
        const why = info.noIndex ?? { reason: 'not found', code: 'no-index' };
        throw new Fallback(why.code === 'mode-disabled' ? why.reason : `no SOCI index for the image (${why.reason})`, 'info', why.code);
      }
    } catch (err) {
      return this.fallback(s, req, undefined, err, log);
    }
    const index = info.index;
    // The image has an index: start the FUSE manager now (a new process takes a few hundred
    // ms), while this layer unpacks or the zTOCs download; the mount that needs it reports a failure.
    this.manager().catch(() => undefined);
    this.prefetchLocalLayers(info, req);
    this.prefetchZtocs(info, req);
    const ztoc = index.ztocFor(layer.digest);
    const small = ztoc !== undefined && layer.size < this.deps.settings.minLayerSize;
    try {
      if (ztoc !== undefined && !small) {
        await this.prepareLazy(s, req, info, layer, ztoc, log);
        return { committed: true, mode: 'lazy' };
      }
      const why = ztoc === undefined ? `SOCI index ${index.digest} has no zTOC for the layer` : `the layer (${layer.size} bytes) is smaller than min_layer_size (${this.deps.settings.minLayerSize})`;
      await this.prepareLocal(s, req, info, layer, why, ztoc === undefined ? 'no-ztoc' : 'below-min-size', log);
      return { committed: true, mode: 'local' };
    } catch (err) {
      return this.fallback(s, req, index.digest, err, log);
    }
  }

  private fallback(s: PreparingSnapshot, req: RemoteRequest, indexDigest: string | undefined, err: unknown, log: Logger): PrepareOutcome {
    const reason = err instanceof Fallback ? err.reason : message(err);
    const level = err instanceof Fallback ? err.level : 'warn';
    log[level]('layer not served remotely: containerd applies it (fallback to the overlay path)', { image: req.imageRef, target: req.target, reason, ...(err instanceof Fallback ? {} : { error: err }) });
    // A root without space anywhere in the cause chain (a download, the metadata) says so.
    this.recordMode(s, req, 'fallback', reason, isNoSpace(err) ? 'no-space' : err instanceof Fallback ? err.code : 'registry-error', indexDigest);
    return { committed: false, reason };
  }

  private recordMode(s: PreparingSnapshot, req: RemoteRequest, mode: LayerModeName, reason: string, code: ReasonCode, indexDigest: string | undefined): LayerModeRecord {
    const rec: LayerModeRecord = { layerDigest: req.layerDigest, mode, reason, snapshotKey: s.key, imageRef: req.imageRef, ...(indexDigest !== undefined ? { indexDigest } : {}) };
    if (mode === 'fallback') {
      try {
        this.deps.metadata.recordLayerMode(rec);
      } catch (e) {
        this.log.warn('cannot record the layer mode', { layer: req.layerDigest, error: e });
      }
    }
    this.sink?.layerMode(req.layerDigest, mode, code);
    return rec;
  }

  private imageInfo(req: RemoteRequest): Promise<ImageInfo> {
    // Per repository: the same manifest pushed to two repositories may be indexed in one only.
    const key = `${parseReference(req.imageRef).name}@${req.manifestDigest} ${req.indexDigest ?? ''}`;
    const cached = this.images.get(key);
    if (cached !== undefined) {
      // Refresh LRU order; "no index" expires, so an index pushed later is found.
      this.images.delete(key);
      this.images.set(key, cached);
      return cached.then((i) => {
        if (i.index === undefined && Date.now() - i.at > NO_INDEX_TTL_MS) {
          if (this.images.get(key) === cached) this.images.delete(key);
          return this.imageInfo(req);
        }
        return i;
      });
    }
    const p = this.loadImageInfo(req);
    this.images.set(key, p);
    p.catch(() => {
      if (this.images.get(key) === p) this.images.delete(key);
    });
    while (this.images.size > IMAGE_CACHE_ENTRIES) this.images.delete(this.images.keys().next().value!);
    return p;
  }

  private async loadImageInfo(req: RemoteRequest): Promise<ImageInfo> {
    const repo = this.deps.client.repository(req.imageRef);
    let fetched;
    try {
      fetched = await repo.fetchManifest(req.manifestDigest);
    } catch (err) {
      throw new Fallback(`cannot fetch image manifest ${req.manifestDigest} from ${repo.ref.name}: ${message(err)}`, 'warn', err instanceof AuthError ? 'auth' : 'registry-error', { cause: err });
    }
    if (fetched.parsed.kind !== 'manifest') throw new Fallback(`${req.manifestDigest} is an image index, not an image manifest`, 'warn', 'bad-index');
    const manifest = fetched.parsed.manifest;
    // A SOCI-enabled (v2) image is listed in the image index the manifest was picked from.
    let imageIndex: ImageIndex | undefined;
    if (repo.ref.digest === undefined || repo.ref.digest !== req.manifestDigest) {
      try {
        const top = await repo.fetchManifest();
        if (top.parsed.kind === 'index' && top.parsed.index.manifests.some((m) => m.digest === req.manifestDigest)) imageIndex = top.parsed.index;
      } catch (err) {
        this.log.debug('cannot fetch the image reference (for v2 SOCI index entries)', { image: req.imageRef, error: err });
      }
    }
    let index: DiscoveredIndex | undefined;
    let noIndex: ImageInfo['noIndex'];
    try {
      index = await discoverIndex(
        repo,
        { descriptor: fetched.descriptor, manifest, index: imageIndex },
        { store: this.deps.store, logger: this.log, indexDigest: req.indexDigest, pullModes: this.deps.settings.pullModes },
      );
    } catch (err) {
      if (err instanceof DiscoverError && err.kind === 'no-index') noIndex = { reason: err.reason.replace(/^no SOCI index: /, ''), code: 'no-index' };
      else if (err instanceof DiscoverError && err.kind === 'mode-disabled') noIndex = { reason: err.reason, code: 'mode-disabled' };
      else if (err instanceof DiscoverError || err instanceof FetcherError) throw new Fallback(`SOCI index discovery failed: ${message(err)}`, 'warn', err instanceof AuthError ? 'auth' : 'bad-index', { cause: err });
      else throw err;
    }
    return { repo, manifest, descriptor: fetched.descriptor, index, noIndex, diffIds: configDiffIds(repo, manifest.config, manifest.layers.length), at: Date.now() };
  }

  /**
   * Starts, for an image whose manifest a pull in this process has just fetched, what its first
   * remote Prepare would start (index discovery, the zTOC and local-layer downloads, the FUSE
   * manager), so that they overlap the pull's own config fetch and content writes instead of
   * waiting for containerd's first Prepare. `layers`: the layer digests in order. Never throws;
   * a failure is logged at debug and left to the Prepares.
   */
  warm(imageRef: string, manifestDigest: string, layers: readonly string[]): void {
    if (layers.length === 0) return;
    const req: RemoteRequest = { target: '', imageRef, manifestDigest, layerDigest: layers[0]!, imageLayers: [...layers] };
    this.imageInfo(req).then(
      (info) => {
        if (info.index === undefined) return;
        this.manager().catch(() => undefined);
        const before = this.ztocFetches.size;
        this.prefetchLocalLayers(info, req, true);
        this.prefetchZtocs(info, req);
        this.log.info('image warmed for its pull: index found, zTOCs fetching ahead', { image: imageRef, index: info.index.digest, ztocs: this.ztocFetches.size - before });
      },
      (err: unknown) => this.log.debug('warming an image for its pull failed (its Prepares try again)', { image: imageRef, error: err }),
    );
  }

  /**
   * Starts downloading this and the following layers that will be unpacked locally
   * (`ahead`: no layer is being prepared yet, so none of them is wanted when already committed).
   */
  private prefetchLocalLayers(info: ImageInfo, req: RemoteRequest, ahead = false): void {
    const wanted = new Set(req.imageLayers.length > 0 ? req.imageLayers : [req.layerDigest]);
    for (const l of info.manifest.layers) {
      if (!wanted.has(l.digest)) continue;
      const z = info.index?.ztocFor(l.digest);
      if (z !== undefined && l.size >= this.deps.settings.minLayerSize) continue;
      // Already committed (another image shares it at the same chain position): nothing to fetch.
      if ((ahead || l.digest !== req.layerDigest) && this.deps.metadata.layerMode(l.digest)?.mode === 'local') continue;
      this.downloads.prefetch(info.repo, l);
    }
  }

  /**
   * Starts fetching into the store the zTOCs of this and the following layers that will be
   * mounted lazily, so that their Prepares (containerd sends them one after another) only mount.
   */
  private prefetchZtocs(info: ImageInfo, req: RemoteRequest): void {
    const index = info.index;
    if (index === undefined) return;
    const wanted = new Set(req.imageLayers.length > 0 ? req.imageLayers : [req.layerDigest]);
    for (const l of info.manifest.layers) {
      if (!wanted.has(l.digest) || l.size < this.deps.settings.minLayerSize) continue;
      const z = index.ztocFor(l.digest);
      if (z === undefined || this.ztocFetches.has(z.digest)) continue;
      const p = this.ztocLimit
        .run(() => prefetchZtoc(info.repo, z, l, { store: this.deps.store, logger: this.log }))
        .then(() => this.preloadZtoc(req.imageRef, l, z))
        .catch((err: unknown) => this.log.debug('fetching a zTOC ahead failed (its mount fetches it again)', { layer: l.digest, ztoc: z.digest, error: err }))
        .finally(() => {
          if (this.ztocFetches.get(z.digest) === p) this.ztocFetches.delete(z.digest);
        });
      this.ztocFetches.set(z.digest, p);
    }
  }

  /**
   * Asks the manager to parse a stored zTOC and build its inode table before the layer's
   * Prepare comes (about 100 ms a layer of this work leaves the mount). Not awaited by the
   * mount; a manager without `preload` (an older build) or any failure only costs that time.
   */
  private preloadZtoc(imageRef: string, layer: Descriptor, ztoc: Descriptor): void {
    const c = this.client;
    if (c === undefined || c.closed) return;
    c.call('preload', { imageRef, layer: wire(layer), ztoc: wire(ztoc) }).catch((err: unknown) => this.log.debug('preloading a zTOC failed (its mount parses it)', { layer: layer.digest, ztoc: ztoc.digest, error: err }));
  }

  private async prepareLazy(s: PreparingSnapshot, req: RemoteRequest, info: ImageInfo, layer: Descriptor, ztoc: Descriptor, log: Logger): Promise<void> {
    const mountpoint = this.deps.fsPath(s.id);
    this.mounting.add(mountpoint);
    try {
      // A fetch of this zTOC already under way: the manager reads it from the store afterwards.
      await this.ztocFetches.get(ztoc.digest);
      let c: FuseManagerClient;
      try {
        c = await this.manager();
      } catch (err) {
        throw new Fallback(`the FUSE manager is unavailable: ${message(err)}`, 'warn', 'fuse-unavailable', { cause: err });
      }
      let mounted: ManagedMount;
      try {
        mounted = await c.call('mount', { mountpoint, imageRef: req.imageRef, layer: wire(layer), ztoc: wire(ztoc), tag: s.key });
      } catch (err) {
        const kind = err instanceof FuseManagerError ? err.kind : undefined;
        const why = kind === 'bad-ztoc' ? 'the zTOC is unusable' : kind === 'no-space' ? 'the root has no space for the layer' : 'the FUSE manager cannot mount the layer';
        throw new Fallback(`${why}: ${message(err)}`, 'warn', kind === 'bad-ztoc' ? 'bad-ztoc' : kind === 'no-space' ? 'no-space' : 'fuse-unavailable', { cause: err });
      }
      const details: RemoteDetails = {
        imageRef: req.imageRef,
        manifestDigest: req.manifestDigest,
        layerMediaType: layer.mediaType,
        layerSize: layer.size,
        ztocDigest: ztoc.digest,
        ztocSize: ztoc.size,
        ztocMediaType: ztoc.mediaType,
      };
      const labels: Record<string, string> = { ...s.labels, [LABEL_REMOTE]: REMOTE_LABEL_VALUE, [LABEL_HAS_INDEX]: 'true' };
      if (s.namespace !== undefined && s.namespace !== '') labels[LABEL_REMOTE_NAMESPACE] = s.namespace;
      const indexDigest = info.index!.digest;
      try {
        this.deps.metadata.commit(s.key, req.target, {
          labels,
          usage: mounted.usage,
          remote: { layerDigest: layer.digest, indexDigest },
          details,
          layerMode: { layerDigest: layer.digest, mode: 'lazy', reason: '', snapshotKey: s.key, imageRef: req.imageRef, indexDigest },
        });
      } catch (err) {
        await c.call('unmount', { mountpoint, release: false }).catch((e: unknown) => log.error('cannot unmount after a failed commit (the next sweep does)', { mountpoint, error: e }));
        throw new Fallback(`cannot commit the lazy snapshot: ${message(err)}`, 'warn', 'registry-error', { cause: err });
      }
      this.recordMode(s, req, 'lazy', '', 'ztoc', indexDigest);
      log.info('layer mounted lazily: committed as a remote snapshot', { target: req.target, index: indexDigest, ztoc: ztoc.digest, spans: mounted.spans, local: mounted.localSpans, mountMs: mounted.mountMs });
    } finally {
      this.mounting.delete(mountpoint);
    }
  }

  private async prepareLocal(s: PreparingSnapshot, req: RemoteRequest, info: ImageInfo, layer: Descriptor, why: string, code: ReasonCode, log: Logger): Promise<void> {
    const dest = this.deps.fsPath(s.id);
    const subject = `${info.repo.ref.name}@${layer.digest}`;
    const st = await lstat(dest);
    const n = info.manifest.layers.findIndex((l) => l.digest === layer.digest);
    const diffIds = await info.diffIds;
    const t0 = performance.now();
    await rmdir(dest); // created empty by Prepare; unpackLayer makes it anew
    try {
      const file = await this.downloads.take(info.repo, layer);
      await unpackLayerFile({ file, desc: layer, dest, parents: s.parentIds.map((id) => this.deps.fsPath(id)), diffId: diffIds[n], subject, logger: log });
    } catch (err) {
      // Back to the empty upper dir of the normal path.
      await rm(dest, { recursive: true, force: true }).catch(() => undefined);
      await mkdir(dest, { mode: 0o755 });
      await lchown(dest, st.uid, st.gid).catch(() => undefined);
      const unpackCode: ReasonCode = layer.mediaType.includes('zstd') ? 'zstd' : 'registry-error';
      if (err instanceof LayerSetupError) throw new Fallback(`cannot unpack the layer locally: ${err.reason}`, 'warn', unpackCode, { cause: err });
      throw new Fallback(`cannot unpack the layer locally: ${message(err)}`, 'warn', unpackCode, { cause: err });
    }
    let usage: Usage;
    try {
      usage = await diskUsage(dest);
    } catch (err) {
      usage = { size: 0, inodes: 0 };
      log.warn('disk usage of an unpacked layer failed', { path: dest, error: err });
    }
    const indexDigest = info.index!.digest;
    const labels: Record<string, string> = { ...s.labels };
    try {
      this.deps.metadata.commit(s.key, req.target, {
        labels,
        usage,
        layerMode: { layerDigest: layer.digest, mode: 'local', reason: why, snapshotKey: s.key, imageRef: req.imageRef, indexDigest },
      });
    } catch (err) {
      await rm(dest, { recursive: true, force: true }).catch(() => undefined);
      await mkdir(dest, { mode: 0o755 });
      await lchown(dest, st.uid, st.gid).catch(() => undefined);
      throw new Fallback(`cannot commit the unpacked snapshot: ${message(err)}`, 'warn', 'registry-error', { cause: err });
    }
    this.recordMode(s, req, 'local', why, code, indexDigest);
    log.info('layer unpacked by the snapshotter: committed', { target: req.target, reason: why, ms: Math.round(performance.now() - t0), size: usage.size });
  }

  // ---------------------------------------------------------------- Remove and Cleanup

  /**
   * After the metadata of a lazily served snapshot is gone: unmounts it (releasing its spans
   * from the disk cache), detaches whatever is left at its fs dir, and drops its zTOC from the
   * artifact store when no other snapshot or index record uses it.
   */
  async removed(rec: SnapshotRecord & { details?: RemoteDetails }): Promise<void> {
    const mountpoint = this.deps.fsPath(rec.id);
    const log = this.log.child({ key: rec.name, layer: rec.remote?.layerDigest });
    try {
      const c = await this.manager();
      const r = await c.call('unmount', { mountpoint, release: true });
      let released = r.released;
      const d = rec.details;
      // Not mounted (no manager served it when it was removed): release its spans by its zTOC.
      if (!r.unmounted && d !== undefined) released = (await c.call('release', { ztoc: { mediaType: d.ztocMediaType, digest: d.ztocDigest, size: d.ztocSize } })).released;
      log.info('lazy snapshot removed: layer unmounted', { mountpoint, unmounted: r.unmounted, spansReleased: released });
    } catch (err) {
      log.warn('cannot unmount the removed lazy snapshot through the FUSE manager; detaching it', { mountpoint, error: err });
    }
    await this.detachUnder(mountpoint, log);
    const ztoc = rec.details?.ztocDigest;
    if (ztoc !== undefined && this.deps.metadata.ztocUsers(ztoc) === 0) {
      try {
        const gone = await this.deps.store.removeUnreferencedBlob(ztoc);
        log.info(gone ? 'zTOC removed from the store (no snapshot or index uses it)' : 'zTOC kept in the store (an index record references it)', { ztoc });
      } catch (err) {
        log.warn('cannot remove the zTOC from the store', { ztoc, error: err });
      }
    }
  }

  /**
   * After a snapshot's metadata is gone: when no snapshot of its layer is left, the layer's
   * metrics series (its mode) go too, so label sets do not grow with every layer ever prepared.
   */
  layerRemoved(layerDigest: string): void {
    try {
      if (this.deps.metadata.list().some((r) => r.remote?.layerDigest === layerDigest)) return;
    } catch (err) {
      // Metrics are not worth failing a removal for: the series stay until the next removal of the layer.
      this.log.warn('cannot tell whether other snapshots use the layer; its metrics are kept', { layer: layerDigest, error: err });
      return;
    }
    this.sink?.forgetLayer?.(layerDigest);
  }

  /** Before a directory without metadata is removed: unmount what the manager serves under it, detach the rest. */
  async releaseUnder(dir: string): Promise<void> {
    const under = await mountsUnder(dir);
    if (under.length === 0) return;
    const c = this.client !== undefined && !this.client.closed ? this.client : undefined;
    for (const m of under) {
      if (c !== undefined && m.fstype.startsWith('fuse')) await c.call('unmount', { mountpoint: m.mountpoint, release: true }).catch(() => undefined);
    }
    await this.detachUnder(dir, this.log);
  }

  private async detachUnder(dir: string, log: Logger): Promise<void> {
    for (const m of await mountsUnder(dir)) {
      try {
        await detach(m.mountpoint);
        log.info('detached a leftover mount', { mountpoint: m.mountpoint, fstype: m.fstype });
      } catch (err) {
        log.warn('cannot detach a leftover mount', { mountpoint: m.mountpoint, error: err });
      }
    }
  }

  /** Status of a lazy snapshot's layer, from the manager. */
  async layerStatus(id: string): Promise<unknown> {
    const c = await this.manager();
    return c.call('status', { mountpoint: this.deps.fsPath(id) });
  }

  /**
   * The FUSE manager's metrics as Prometheus text, or '' while none runs: a scrape must never
   * start a manager (FuseManagerError `unsupported` when it has no sink).
   */
  async managerMetrics(): Promise<string> {
    const c = this.client !== undefined && !this.client.closed ? this.client : undefined;
    if (c === undefined) return '';
    return (await c.call('metrics', {})).text;
  }

  /** Stops timers and downloads and disconnects; the FUSE manager keeps running (and serving). */
  async close(): Promise<void> {
    this.closed = true;
    if (this.reconnectTimer !== undefined) clearTimeout(this.reconnectTimer);
    if (this.sweepTimer !== undefined) clearInterval(this.sweepTimer);
    await this.downloads.close();
    // A manager start in flight (the one at start, say) finishes first, then its connection is closed.
    const connecting = this.connecting;
    if (connecting !== undefined) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([connecting.catch(() => undefined), new Promise<void>((r) => (timer = setTimeout(r, 10_000)))]);
      clearTimeout(timer);
    }
    this.client?.close();
    this.client = undefined;
  }
}

/**
 * The FUSE manager: the long-lived process that serves every lazily mounted layer of the
 * snapshotter (as stargz-snapshotter's fuse manager does), so that a crash, `kill -9` or an
 * upgrade of the snapshotter leaves running containers reading their files, lazily.
 *
 * The snapshotter starts it detached (its own session: `soci-ts fuse-manager --root R --socket
 * S`, hidden command) and talks to it over the unix socket S with the protocol of
 * daemon/fuse-protocol.ts. It owns, for all its layers:
 * - the registry client (credentials from the docker config, credential helpers and the hosts
 *   directory, resolved by this process itself, so a restart of either process loses no auth);
 * - the artifact store under the root (zTOCs are read from it, or fetched and kept there);
 * - the memory cache of inflated spans and the disk cache of compressed spans
 *   (`<root>/cache/spans`), each mount holding its layer's spans (released on `unmount` with
 *   `release`, so the cache stays tied to what containerd holds);
 * - the background fetcher (fs's BackgroundFetcher), which makes every span of its layers local
 *   after a start delay, at a bounded rate, yielding to on-demand reads.
 *
 * It keeps no state on disk: its mounts live as long as it does. When it dies, its FUSE mounts
 * die with it (ENOTCONN); the next snapshotter start (or request) starts a new manager and mounts
 * the committed remote snapshots again. On SIGTERM it unmounts everything and exits.
 *
 * Nothing here blocks the event loop: FUSE requests of its own mounts are answered from promises;
 * mount(8)/umount(8) and /proc reads are asynchronous.
 */
import { randomUUID } from 'node:crypto';
import { unlink } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { isAbsolute } from 'node:path';
import { performance } from 'node:perf_hooks';
import { FetcherError, type Descriptor, type Logger, type RegistryClient, type Repository } from '../fetcher/index.js';
import { BackgroundFetcher, CompressedSpanStore, FuseError, InflatedSpanCache, InodeTable, SpanReadError, type LayerFs, type LayerFsOptions, type NativeReadStats } from '../fs/index.js';
import { readZtoc, type LayerIndex } from '../ztoc/index.js';
import { DiscoverError, loadZtoc } from './discover.js';
import {
  descriptorProblem,
  FuseManagerError,
  LineSplitter,
  METHOD_NAMES,
  type HelloResult,
  type LayerStatus,
  type ManagedMount,
  type MethodName,
  type MountParams,
  type PreloadParams,
  type UnmountParams,
  type WireDescriptor,
  type UnmountResult,
} from './fuse-protocol.js';
import { isNoSpace } from './errdefs.js';
import { mountLazyLayer } from './layers.js';
import { safeSink, type MetricsSink } from './metrics-sink.js';
import type { ArtifactStore } from './store.js';
import { detach, mountsUnder, runCommand } from './sysmount.js';
import { listenOwnerOnly, prepareSocketPath } from './server.js';
import { buildIdentity, type BuildIdentity } from './version.js';

export interface BackgroundSettings {
  /** Default true. */
  enabled?: boolean;
  /** Compressed bytes per second over all layers. */
  rateBytesPerSec?: number;
  /** Wait after a mount before fetching its layer. */
  startDelayMs?: number;
}

export interface FuseManagerOptions {
  /** The snapshotter's root: the span cache is `<root>/cache/spans`. */
  root: string;
  /** The unix socket to serve on (created 0600; a live socket is never taken over). */
  socket: string;
  client: RegistryClient;
  store: ArtifactStore;
  logger: Logger;
  /** A FUSE read waiting longer than this for the registry gets EIO (default 30 s). */
  fetchTimeoutMs?: number;
  /** Bound of the inflated-span memory cache (fs default 256 MiB). */
  memoryCacheBytes?: number;
  /** Bound of the compressed-span disk cache (fs default 10 GiB). */
  diskCacheBytes?: number;
  background?: BackgroundSettings;
  metrics?: MetricsSink;
  /**
   * With no mount and no connection for this long, call `onIdle` (0 or absent = never): a
   * manager a snapshotter started at its own start does not outlive it when it served nothing.
   */
  idleExitMs?: number;
  onIdle?: () => void;
}

/** zTOCs preloaded at once, at most; and how long one waits for its mount. */
const PRELOAD_MAX = 32;
const PRELOAD_TTL_MS = 120_000;

interface Preloaded {
  index: LayerIndex;
  inodes: InodeTable;
}

function wireToDescriptor(w: WireDescriptor): Descriptor {
  return { mediaType: w.mediaType, digest: w.digest, size: w.size, ...(w.urls !== undefined ? { urls: w.urls } : {}) };
}

interface Entry {
  fs: LayerFs;
  params: MountParams;
  mountedAt: string;
  mountMs: number;
  /** Cleared when the mount is taken down: a late callback then records nothing (no series comes back after forgetLayer). */
  live: { on: boolean };
  /** The mount's native reads already reported to the metrics sink. */
  nativeReported: NativeReadStats;
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Classifies what went wrong while mounting into a wire error. */
function toManagerError(err: unknown, subject: string): FuseManagerError {
  if (err instanceof FuseManagerError) return err;
  if (isNoSpace(err)) return new FuseManagerError('no-space', subject, `no space left for it under the root: ${message(err)}`, { cause: err });
  if (err instanceof DiscoverError) return new FuseManagerError('bad-ztoc', '', err.message, { cause: err });
  if (err instanceof FetcherError) return new FuseManagerError('registry', '', err.message, { cause: err });
  if (err instanceof FuseError) return new FuseManagerError('fuse', '', err.message, { cause: err });
  return new FuseManagerError('internal', subject, message(err), { cause: err });
}

function fetchErrorKind(err: unknown): string {
  if (err instanceof SpanReadError && err.timedOut) return 'timeout';
  if (err instanceof FetcherError) return 'registry';
  return 'other';
}

export class FuseManager {
  readonly instance = randomUUID();
  readonly startedAt = new Date().toISOString();
  private readonly mounts = new Map<string, Entry>();
  private readonly locks = new Map<string, Promise<unknown>>();
  private readonly connections = new Set<Socket>();
  private readonly sink: MetricsSink | undefined;
  private readonly memory: LayerFsOptions['memory'];
  private readonly inflated: InflatedSpanCache;
  private stopping: Promise<void> | undefined;
  private progressTimer: NodeJS.Timeout | undefined;
  private idleTimer: NodeJS.Timeout | undefined;
  private readonly preloaded = new Map<string, Promise<Preloaded>>();

  private constructor(
    private readonly opts: FuseManagerOptions,
    private readonly server: Server,
    private readonly disk: CompressedSpanStore,
    memory: InflatedSpanCache,
    private readonly background: BackgroundFetcher,
    sink: MetricsSink | undefined,
    private readonly identity: BuildIdentity,
  ) {
    this.sink = sink;
    this.inflated = memory;
    // Cache hits and misses reach the sink through thin wrappers (only with a sink).
    this.memory =
      sink === undefined
        ? memory
        : {
            get: (layer, span) => {
              const v = memory.get(layer, span);
              sink.cache('memory', v !== undefined);
              return v;
            },
            set: (layer, span, data) => memory.set(layer, span, data),
            watch: (layer, watcher) => memory.watch(layer, watcher),
          };
    if (sink !== undefined) {
      this.progressTimer = setInterval(() => {
        for (const e of this.mounts.values()) {
          sink.backgroundProgress(e.params.layer.digest, e.fs.spans.localSpans, e.fs.spans.spanCount);
          this.reportNativeReads(e);
        }
      }, 5000);
      this.progressTimer.unref();
    }
  }

  /** Opens the caches and serves on `opts.socket`. Rejects when the socket is live (another manager). */
  static async start(opts: FuseManagerOptions): Promise<FuseManager> {
    const logger = opts.logger;
    const sink = safeSink(opts.metrics, (err) => logger.warn('metrics sink failed', { error: err }));
    await prepareSocketPath(opts.socket);
    // Hashing the modules for the build id takes a while: alongside opening the cache.
    const identityP = buildIdentity();
    const disk = await CompressedSpanStore.open({ dir: `${opts.root}/cache/spans`, maxBytes: opts.diskCacheBytes, logger });
    const memory = new InflatedSpanCache({ maxBytes: opts.memoryCacheBytes });
    const bg = opts.background ?? {};
    const background = new BackgroundFetcher({
      enabled: bg.enabled,
      rateBytesPerSec: bg.rateBytesPerSec,
      startDelayMs: bg.startDelayMs,
      logger,
      onLayerComplete: (st) => {
        // The span gauges too, at once (the periodic update may be seconds away).
        sink?.backgroundProgress(st.layerDigest, st.spansLocal, st.spansTotal);
        sink?.layerComplete(st.layerDigest);
      },
    });
    const server = createServer();
    const identity = await identityP;
    const self = new FuseManager(opts, server, disk, memory, background, sink, identity);
    server.on('connection', (s) => self.serve(s));
    await listenOwnerOnly(server, opts.socket);
    server.on('error', (err) => logger.error('FUSE manager socket error', { error: err }));
    logger.info('FUSE manager serving', { socket: opts.socket, root: opts.root, pid: process.pid, instance: self.instance, version: identity.version, build: identity.build, protocol: identity.protocol });
    self.checkIdle();
    return self;
  }

  private isIdle(): boolean {
    return this.connections.size === 0 && this.mounts.size === 0 && this.locks.size === 0 && this.stopping === undefined;
  }

  /** Arms the idle timer when nothing is mounted and nobody is connected; disarms it otherwise. */
  private checkIdle(): void {
    const ms = this.opts.idleExitMs ?? 0;
    if (ms <= 0 || this.opts.onIdle === undefined) return;
    if (!this.isIdle()) {
      if (this.idleTimer !== undefined) clearTimeout(this.idleTimer);
      this.idleTimer = undefined;
      return;
    }
    this.idleTimer ??= setTimeout(() => {
      this.idleTimer = undefined;
      if (!this.isIdle()) return;
      this.opts.logger.info('idle: nothing mounted and no snapshotter connected; exiting', { idleMs: ms });
      this.opts.onIdle?.();
    }, ms);
  }

  get size(): number {
    return this.mounts.size;
  }

  // ---------------------------------------------------------------- connections

  private serve(sock: Socket): void {
    this.connections.add(sock);
    this.checkIdle();
    sock.on('close', () => {
      this.connections.delete(sock);
      this.checkIdle();
    });
    sock.on('error', (err) => this.opts.logger.debug('FUSE manager connection error', { error: err }));
    const send = (obj: unknown): void => {
      if (sock.destroyed) return;
      sock.write(JSON.stringify(obj) + '\n');
    };
    const splitter = new LineSplitter(
      (line) => {
        let req: { id?: unknown; method?: unknown; params?: unknown };
        try {
          const v = JSON.parse(line) as unknown;
          if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not a JSON object');
          req = v as typeof req;
        } catch (err) {
          send({ id: null, error: new FuseManagerError('invalid', '', `request is not a JSON object: ${message(err)}`).toWire() });
          sock.end();
          return;
        }
        const id = req.id;
        const t0 = performance.now();
        this.dispatch(req.method, req.params).then(
          (result) => {
            this.opts.logger.debug('request answered', { method: req.method, id, ms: Math.round((performance.now() - t0) * 1000) / 1000 });
            send({ id, result });
          },
          (err: unknown) => {
            const e = toManagerError(err, String(req.method));
            if (e.kind === 'internal') this.opts.logger.error('FUSE manager request failed', { method: req.method, error: err });
            else this.opts.logger.debug('request refused', { method: req.method, id, kind: e.kind, error: e.message });
            send({ id, error: e.toWire() });
          },
        );
      },
      () => {
        send({ id: null, error: new FuseManagerError('invalid', '', 'request line too long').toWire() });
        sock.end();
      },
    );
    sock.on('data', (b: Buffer) => splitter.push(b));
  }

  /** Runs a request; never throws synchronously (a bad request must not take the process down). */
  private dispatch(method: unknown, params: unknown): Promise<unknown> {
    try {
      return this.dispatchUnsafe(method, params);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private dispatchUnsafe(method: unknown, params: unknown): Promise<unknown> {
    if (typeof method !== 'string' || !(METHOD_NAMES as readonly string[]).includes(method)) {
      return Promise.reject(new FuseManagerError('invalid', '', `unknown method ${JSON.stringify(method)} (known: ${METHOD_NAMES.join(', ')})`));
    }
    if (this.stopping !== undefined && method !== 'hello') return Promise.reject(new FuseManagerError('unavailable', '', 'the FUSE manager is shutting down'));
    const p = (typeof params === 'object' && params !== null ? params : {}) as Record<string, unknown>;
    switch (method as MethodName) {
      case 'hello':
        return Promise.resolve(this.hello());
      case 'mount':
        return this.mount(checkMountParams(p));
      case 'unmount':
        return this.unmount(checkUnmountParams(p));
      case 'list':
        return Promise.resolve({ mounts: [...this.mounts.keys()].sort().map((m) => this.describe(m, false)) });
      case 'status':
        return Promise.resolve(this.status(checkMountpoint(p.mountpoint)));
      case 'release': {
        const problem = descriptorProblem(p.ztoc, 'ztoc');
        if (problem !== undefined) throw new FuseManagerError('invalid', '', problem);
        return this.release(p.ztoc as MountParams['ztoc']);
      }
      case 'metrics':
        return this.metrics();
      case 'preload':
        return this.preload(checkPreloadParams(p));
    }
  }

  /**
   * Parses a zTOC and builds its inode table now (the snapshotter asks while an image's first
   * layers are being prepared), so that its mount only mounts. Kept until that mount (or a
   * while); at most PRELOAD_MAX at once.
   */
  private async preload(params: PreloadParams): Promise<{ preloaded: boolean }> {
    if (this.preloaded.has(params.ztoc.digest)) return { preloaded: true };
    if (this.preloaded.size >= PRELOAD_MAX) return { preloaded: false };
    const log = this.opts.logger.child({ layer: params.layer.digest });
    const p = (async (): Promise<Preloaded> => {
      const repo = this.opts.client.repository(params.imageRef);
      const index = await loadZtoc(repo, wireToDescriptor(params.ztoc), wireToDescriptor(params.layer), { store: this.opts.store, logger: log });
      return { index, inodes: InodeTable.fromLayer(index) };
    })();
    this.preloaded.set(params.ztoc.digest, p);
    const timer = setTimeout(() => {
      if (this.preloaded.get(params.ztoc.digest) === p) this.preloaded.delete(params.ztoc.digest);
    }, PRELOAD_TTL_MS);
    timer.unref();
    try {
      await p;
      return { preloaded: true };
    } catch (err) {
      if (this.preloaded.get(params.ztoc.digest) === p) this.preloaded.delete(params.ztoc.digest);
      throw toManagerError(err, params.ztoc.digest);
    }
  }

  /** The preloaded zTOC (and inode table) of `digest`, taken (a mount uses it once), or undefined. */
  private async takePreloaded(digest: string): Promise<Preloaded | undefined> {
    const p = this.preloaded.get(digest);
    if (p === undefined) return undefined;
    this.preloaded.delete(digest);
    return p.catch(() => undefined);
  }

  // ---------------------------------------------------------------- operations

  hello(): HelloResult {
    const b = this.identity;
    return {
      protocol: b.protocol,
      oldestProtocol: b.oldestProtocol,
      version: b.version,
      build: b.build,
      pid: process.pid,
      instance: this.instance,
      startedAt: this.startedAt,
      root: this.opts.root,
      mounts: this.mounts.size,
      memoryCacheBytes: this.inflated.bytes,
    };
  }

  /** Runs `fn` after every earlier operation on `mountpoint` settled. */
  private locked<T>(mountpoint: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(mountpoint) ?? Promise.resolve();
    const p = prev.then(fn, fn);
    const tail = p.then(
      () => undefined,
      () => undefined,
    );
    this.locks.set(mountpoint, tail);
    void tail.then(() => {
      if (this.locks.get(mountpoint) === tail) this.locks.delete(mountpoint);
      this.checkIdle();
    });
    return p;
  }

  private describe(mountpoint: string, existing: boolean): ManagedMount {
    const e = this.mounts.get(mountpoint);
    if (e === undefined) throw new FuseManagerError('not-found', mountpoint, 'nothing is mounted here by the FUSE manager');
    const spans = e.fs.spans;
    return {
      mountpoint,
      layerDigest: e.params.layer.digest,
      layerSize: e.params.layer.size,
      imageRef: e.params.imageRef,
      ztocDigest: e.params.ztoc.digest,
      tag: e.params.tag ?? '',
      spans: spans.spanCount,
      localSpans: spans.localSpans,
      complete: spans.complete,
      mountedAt: e.mountedAt,
      mountMs: e.mountMs,
      usage: { size: e.fs.table.totalFileBlocks * 4096, inodes: e.fs.table.count },
      ...(existing ? { existing: true } : {}),
    };
  }

  mount(params: MountParams): Promise<ManagedMount> {
    return this.locked(params.mountpoint, async () => {
      const { mountpoint, layer } = params;
      const log = this.opts.logger.child({ layer: layer.digest, mountpoint });
      const have = this.mounts.get(mountpoint);
      if (have !== undefined) {
        if (have.params.layer.digest === layer.digest) return this.describe(mountpoint, true);
        throw new FuseManagerError('busy', mountpoint, `already holds layer ${have.params.layer.digest}`);
      }
      // A mount left here by a manager that died (ENOTCONN) or anything else: detach it.
      for (const m of await mountsUnder(mountpoint)) {
        log.warn('detaching a leftover mount before mounting', { at: m.mountpoint, fstype: m.fstype });
        await detach(m.mountpoint);
      }
      const t0 = performance.now();
      let repo: Repository;
      try {
        repo = this.opts.client.repository(params.imageRef);
      } catch (err) {
        throw new FuseManagerError('invalid', params.imageRef, `not an image reference: ${message(err)}`, { cause: err });
      }
      const layerDesc = wireToDescriptor(layer);
      const ztocDesc = wireToDescriptor(params.ztoc);
      const pre = await this.takePreloaded(ztocDesc.digest);
      const ztoc = pre?.index ?? (await loadZtoc(repo, ztocDesc, layerDesc, { store: this.opts.store, logger: log }));
      const sink = this.sink;
      const digest = layer.digest;
      const disk = this.disk;
      const live = { on: true };
      const fs = await mountLazyLayer({
        repo,
        layer: layerDesc,
        ztoc,
        ...(pre !== undefined ? { inodes: pre.inodes } : {}),
        mountpoint,
        memory: this.memory,
        disk:
          sink === undefined
            ? disk
            : {
                get: async (d) => {
                  const v = await disk.get(d);
                  sink.cache('disk', v !== undefined);
                  return v;
                },
                put: (d, b) => disk.put(d, b),
                has: (d) => disk.has(d),
              },
        logger: log,
        fetchTimeoutMs: this.opts.fetchTimeoutMs,
        ...(sink === undefined
          ? {}
          : {
              onOp: (op: string, ms: number, ok: boolean) => {
                if (live.on) sink.fuseOp(op, digest, ms, ok);
              },
              onFetch: (bytes: number) => {
                if (live.on) sink.fetched(digest, bytes, 1);
              },
              onFetchError: (err: unknown) => {
                if (live.on) sink.fetchError(digest, fetchErrorKind(err));
              },
            }),
      });
      const mountMs = Math.round(performance.now() - t0);
      this.disk.retain(mountpoint, ztoc.ztoc.compressionInfo.spanDigests);
      this.mounts.set(mountpoint, { fs, params, mountedAt: new Date().toISOString(), mountMs, live, nativeReported: { reads: 0, bytes: 0, attrs: 0 } });
      this.background.add(fs.spans);
      sink?.mountLatency(digest, mountMs);
      log.info('layer mounted lazily', { image: params.imageRef, ztoc: params.ztoc.digest, spans: fs.spans.spanCount, local: fs.spans.localSpans, ms: mountMs, preloaded: pre !== undefined, tag: params.tag });
      return this.describe(mountpoint, false);
    });
  }

  unmount(params: UnmountParams): Promise<UnmountResult> {
    return this.locked(params.mountpoint, async () => {
      const { mountpoint } = params;
      const e = this.mounts.get(mountpoint);
      if (e === undefined) {
        // Not ours: a dead mount of an earlier manager may still sit there.
        for (const m of await mountsUnder(mountpoint)) {
          if (!m.fstype.startsWith('fuse')) continue;
          this.opts.logger.info('detaching a leftover FUSE mount', { mountpoint: m.mountpoint, fstype: m.fstype });
          await detach(m.mountpoint);
        }
        return { unmounted: false, released: 0 };
      }
      await this.takeDown(mountpoint, e);
      const released = params.release === true ? await this.disk.release(mountpoint) : 0;
      this.opts.logger.info('layer unmounted', { layer: e.params.layer.digest, mountpoint, released, tag: e.params.tag });
      return { unmounted: true, released };
    });
  }

  /** Reports the mount's native reads since the last report (they never pass through onOp). */
  private reportNativeReads(e: Entry): void {
    const now = e.fs.nativeReads;
    const reads = now.reads - e.nativeReported.reads;
    if (reads <= 0 || !e.live.on) return;
    this.sink?.nativeReads?.(e.params.layer.digest, reads, now.bytes - e.nativeReported.bytes);
    e.nativeReported = now;
  }

  private async takeDown(mountpoint: string, e: Entry): Promise<void> {
    this.mounts.delete(mountpoint);
    const digest = e.params.layer.digest;
    await this.background.remove(digest);
    // Another mount of the same layer keeps being fetched in the background.
    let shared = false;
    for (const other of this.mounts.values()) {
      if (other.params.layer.digest === digest) {
        this.background.add(other.fs.spans);
        shared = true;
        break;
      }
    }
    // Inflated spans of a layer nobody mounts any more are memory wasted (the disk cache keeps the compressed ones).
    if (!shared) this.inflated.deleteLayer(digest);
    try {
      await e.fs.unmount();
    } catch (err) {
      this.opts.logger.warn('FUSE unmount failed; detaching lazily', { mountpoint, error: err });
      const r = await runCommand('umount', ['-l', mountpoint]);
      if (r.code !== 0) throw new FuseManagerError('fuse', mountpoint, `cannot unmount: ${message(err)}; umount -l: ${r.stderr}`, { cause: err });
    } finally {
      this.reportNativeReads(e); // a layer still mounted elsewhere keeps its count
      e.live.on = false;
      // The layer's series (FUSE ops, fetched bytes, progress, complete) go with its last mount,
      // else every layer ever mounted keeps its label sets for the manager's lifetime.
      if (![...this.mounts.values()].some((o) => o.params.layer.digest === digest)) this.sink?.forgetLayer?.(digest);
    }
  }

  status(mountpoint: string): LayerStatus {
    const e = this.mounts.get(mountpoint);
    if (e === undefined) throw new FuseManagerError('not-found', mountpoint, 'nothing is mounted here by the FUSE manager');
    const spans = e.fs.spans;
    const bg = this.background.stats(e.params.layer.digest);
    return {
      mountpoint,
      layerDigest: e.params.layer.digest,
      spansTotal: spans.spanCount,
      spansLocal: spans.localSpans,
      complete: spans.complete,
      bytesFetched: spans.counters.bytesFetched,
      fetches: spans.counters.fetches,
      reads: spans.counters.reads + e.fs.nativeReads.reads,
      fuseOps: e.fs.counters.ops,
      fuseErrors: e.fs.counters.errors,
      ...(bg !== undefined ? { background: { spansFetched: bg.spansFetched, bytesFetched: bg.bytesFetched, failures: bg.failures, complete: bg.complete } } : {}),
    };
  }

  /** Deletes the unheld spans of a zTOC's layer from the disk cache (see the protocol). */
  private async release(ztoc: MountParams['ztoc']): Promise<{ released: number }> {
    let bytes: Uint8Array;
    try {
      if (!(await this.opts.store.hasBlob(ztoc.digest))) return { released: 0 };
      bytes = await this.opts.store.readBlob(ztoc.digest, { size: ztoc.size });
    } catch (err) {
      throw new FuseManagerError('bad-ztoc', ztoc.digest, `cannot read the zTOC from the store: ${message(err)}`, { cause: err });
    }
    let digests: readonly string[];
    try {
      digests = readZtoc(bytes, `zTOC ${ztoc.digest}`).ztoc.compressionInfo.spanDigests;
    } catch (err) {
      throw new FuseManagerError('bad-ztoc', ztoc.digest, `malformed: ${message(err)}`, { cause: err });
    }
    const unheld = digests.filter((d) => this.disk.holders(d) === 0);
    const released = await this.disk.deleteMany(unheld);
    this.opts.logger.info('spans of an unmounted layer released', { ztoc: ztoc.digest, released, held: digests.length - unheld.length });
    return { released };
  }

  private async metrics(): Promise<{ text: string }> {
    if (this.sink?.render === undefined) throw new FuseManagerError('unsupported', '', 'this FUSE manager has no metrics sink');
    return { text: await this.sink.render() };
  }

  /** Stops serving, unmounts every layer (spans stay in the disk cache), flushes the caches. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      const log = this.opts.logger;
      if (this.progressTimer !== undefined) clearInterval(this.progressTimer);
      if (this.idleTimer !== undefined) clearTimeout(this.idleTimer);
      const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
      for (const s of this.connections) s.destroy();
      await closed;
      await this.background.stop().catch((err: unknown) => log.warn('background fetcher did not stop cleanly', { error: err }));
      for (const [mountpoint, e] of [...this.mounts]) {
        await this.locked(mountpoint, () => this.takeDown(mountpoint, e)).catch((err: unknown) => log.error('unmount at shutdown failed', { mountpoint, error: err }));
      }
      await this.disk.close().catch((err: unknown) => log.warn('span cache not flushed', { error: err }));
      await this.opts.client.close().catch(() => undefined);
      await unlink(this.opts.socket).catch(() => undefined);
      log.info('FUSE manager stopped', { socket: this.opts.socket });
    })();
    return this.stopping;
  }
}

function checkMountpoint(v: unknown): string {
  if (typeof v !== 'string' || !isAbsolute(v) || v.includes('\n')) throw new FuseManagerError('invalid', '', 'mountpoint must be an absolute path');
  return v.replace(/\/+$/, '') || '/';
}

function checkMountParams(p: Record<string, unknown>): MountParams {
  const mountpoint = checkMountpoint(p.mountpoint);
  if (typeof p.imageRef !== 'string' || p.imageRef === '') throw new FuseManagerError('invalid', mountpoint, 'imageRef must be an image reference');
  for (const [k, what] of [
    ['layer', 'layer'],
    ['ztoc', 'ztoc'],
  ] as const) {
    const problem = descriptorProblem(p[k], what);
    if (problem !== undefined) throw new FuseManagerError('invalid', mountpoint, problem);
  }
  if (p.tag !== undefined && typeof p.tag !== 'string') throw new FuseManagerError('invalid', mountpoint, 'tag must be a string');
  return { mountpoint, imageRef: p.imageRef, layer: p.layer as MountParams['layer'], ztoc: p.ztoc as MountParams['ztoc'], ...(p.tag !== undefined ? { tag: p.tag as string } : {}) };
}

function checkPreloadParams(p: Record<string, unknown>): PreloadParams {
  if (typeof p.imageRef !== 'string' || p.imageRef === '') throw new FuseManagerError('invalid', '', 'imageRef must be an image reference');
  for (const k of ['layer', 'ztoc'] as const) {
    const problem = descriptorProblem(p[k], k);
    if (problem !== undefined) throw new FuseManagerError('invalid', '', problem);
  }
  return { imageRef: p.imageRef, layer: p.layer as PreloadParams['layer'], ztoc: p.ztoc as PreloadParams['ztoc'] };
}

function checkUnmountParams(p: Record<string, unknown>): UnmountParams {
  const mountpoint = checkMountpoint(p.mountpoint);
  if (p.release !== undefined && typeof p.release !== 'boolean') throw new FuseManagerError('invalid', mountpoint, 'release must be a boolean');
  return { mountpoint, release: p.release === true };
}

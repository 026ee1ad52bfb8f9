/**
 * The snapshotter: containerd's overlayfs snapshotter behaviour on top of
 * {@link MetadataStore}. Layout under the root:
 *
 *   <root>/metadata.db          the metadata (SQLite)
 *   <root>/snapshots/<id>/fs    the snapshot's files (upperdir of an active snapshot)
 *   <root>/snapshots/<id>/work  overlayfs workdir (active snapshots only)
 *
 * Mounts, as containerd's overlayfs snapshotter returns them:
 * - active, no parent: a read-write bind mount of its own fs (`rw`, `rbind`);
 * - active with parents: overlay with `lowerdir` = the parents' fs dirs, nearest first,
 *   `upperdir` = its fs, `workdir` = its work;
 * - view, no parent: a read-only bind mount of its own (empty) fs;
 * - view with one parent: a read-only bind mount of the parent's fs;
 * - view with several parents: overlay with `lowerdir` only (read-only).
 * `index=off` is added to overlay mounts when the kernel has the overlay `index` parameter.
 * (`userxattr`, which containerd adds for rootless overlay in a user namespace, is not: the
 * daemon runs as root.)
 *
 * Remote snapshots (daemon/remote.ts): a Prepare with containerd's remote-snapshot labels is
 * served lazily through the FUSE manager (the snapshot's fs dir is the layer's FUSE mount, so
 * children stack it as a lowerdir like any other) or unpacked by the daemon, committed under the
 * target name, and answered ALREADY_EXISTS; when that cannot be done it falls back to the normal
 * overlay path, with the reason logged.
 *
 * Every file system call is asynchronous. A new snapshot's directory is made under a temporary
 * name and renamed to its id before the metadata row is written, and a removed snapshot's
 * row goes before its directory: a crash can leave a directory without metadata (Cleanup and
 * the startup sweep remove it), never metadata without a directory.
 */
import { access, lchown, lstat, mkdir, readdir, rename, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Logger, RegistryClient } from '../fetcher/index.js';
import { diskUsage } from './diskusage.js';
import { alreadyExists, invalidArgument, SnapshotterError, wrapError } from './errdefs.js';
import { MetadataStore, toInfo, type MountableSnapshot, type SnapshotInfo, type SnapshotKind, type Usage } from './metadata.js';
import type { MetricsSink } from './metrics-sink.js';
import { parseRemoteLabels, RemoteSnapshots, type RemoteSettings } from './remote.js';
import type { ArtifactStore } from './store.js';
import { mountsUnder } from './sysmount.js';

export interface Mount {
  type: string;
  source: string;
  target: string;
  options: string[];
}

export interface SnapshotterOptions {
  /** The root directory (created 0700 when missing). */
  root: string;
  logger: Logger;
  /** Run Cleanup once at open, removing directories left without metadata (default true). */
  sweepOnOpen?: boolean;
  /** Serve Prepares with the remote-snapshot labels remotely (without: always the overlay path). */
  remote?: {
    client: RegistryClient;
    store: ArtifactStore;
    settings: RemoteSettings;
    metrics?: MetricsSink;
  };
}

/** What a gRPC call carries besides its request (containerd's namespace header). */
export interface CallContext {
  namespace?: string;
}

const TEMP_PREFIX = 'new-';

/**
 * mkdir -p: each missing directory made on its own, so that a failure is reported as it is
 * (Node's recursive mkdir says ENOENT when the file system has no inode left).
 */
async function makeDirs(dir: string, mode: number): Promise<void> {
  const missing: string[] = [];
  for (let d = dir; ; d = dirname(d)) {
    try {
      await lstat(d);
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT' || dirname(d) === d) throw e;
      missing.unshift(d);
    }
  }
  for (const d of missing) {
    try {
      await mkdir(d, { mode });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
  }
}

export class Snapshotter {
  /** Directory names under snapshots/ that in-flight operations own: Cleanup leaves them. */
  private readonly inflight = new Set<string>();
  /** Remote Prepares in progress, by target: one at a time per target. */
  private readonly targets = new Map<string, Promise<unknown>>();
  private closed = false;
  remote: RemoteSnapshots | undefined;

  private constructor(
    readonly root: string,
    readonly metadata: MetadataStore,
    private readonly log: Logger,
    private readonly indexOff: boolean,
  ) {}

  static async open(opts: SnapshotterOptions): Promise<Snapshotter> {
    const root = opts.root;
    try {
      await makeDirs(join(root, 'snapshots'), 0o700);
    } catch (e) {
      throw wrapError(e, `cannot create the snapshotter root ${root}`);
    }
    const metadata = MetadataStore.open(root, { logger: opts.logger });
    let indexOff = false;
    try {
      await access('/sys/module/overlay/parameters/index');
      indexOff = true;
    } catch {
      // the kernel has no overlay index feature (or no overlay module loaded): nothing to turn off
    }
    const s = new Snapshotter(root, metadata, opts.logger, indexOff);
    if (opts.remote !== undefined) {
      s.remote = new RemoteSnapshots({
        root,
        metadata,
        store: opts.remote.store,
        client: opts.remote.client,
        logger: opts.logger,
        fsPath: (id) => s.fsPath(id),
        settings: opts.remote.settings,
        metrics: opts.remote.metrics,
      });
      // Before the sweep: mounts no snapshot owns are unmounted first, lost ones mounted again.
      try {
        await s.remote.open();
      } catch (e) {
        await s.close();
        throw e;
      }
    }
    if (opts.sweepOnOpen ?? true) {
      try {
        const removed = await s.cleanup();
        if (removed.length > 0) opts.logger.info('startup sweep removed directories without metadata', { root, removed });
      } catch (e) {
        opts.logger.warn('startup sweep failed', { root, error: e });
      }
    }
    return s;
  }

  private snapshotsDir(): string {
    return join(this.root, 'snapshots');
  }
  fsPath(id: string): string {
    return join(this.root, 'snapshots', id, 'fs');
  }
  workPath(id: string): string {
    return join(this.root, 'snapshots', id, 'work');
  }

  private check(): void {
    if (this.closed) throw new SnapshotterError('Unavailable', 'the snapshotter is shutting down');
  }

  async prepare(key: string, parent: string, labels: Record<string, string> = {}, ctx: CallContext = {}): Promise<Mount[]> {
    const verdict = parseRemoteLabels(labels);
    if (verdict.kind === 'none') return this.createSnapshot('active', key, parent, labels);
    const remote = this.remote;
    if (verdict.kind !== 'remote' || remote === undefined) {
      const why =
        verdict.kind === 'incomplete'
          ? `the Prepare has no ${verdict.missing.join(', ')} label (CRI with snapshot annotations disabled, or a client that does not pass them)`
          : verdict.kind === 'invalid'
            ? verdict.reason
            : 'remote snapshots are disabled (snapshotter.remote = false)';
      this.log.info('layer applied by containerd: not served remotely', { key, target: verdict.kind === 'remote' ? verdict.request.target : verdict.target, reason: why });
      return this.createSnapshot('active', key, parent, labels);
    }
    const req = verdict.request;
    // One remote Prepare per target at a time: the second finds the first's commit.
    const prev = this.targets.get(req.target) ?? Promise.resolve();
    const run = async (): Promise<Mount[]> => {
      this.check();
      if (this.metadata.get(req.target) !== undefined) throw alreadyExists(`target snapshot ${JSON.stringify(req.target)}`);
      await remote.ensureServed(this.parentChainIds(parent));
      return this.createSnapshot('active', key, parent, labels, async (s) => {
        const outcome = await remote.prepare({ id: s.id, key, parentIds: s.parentIds, labels, namespace: ctx.namespace }, req);
        if (outcome.committed) throw alreadyExists(`target snapshot ${JSON.stringify(req.target)}`);
        return this.mountsOf(s);
      });
    };
    const p = prev.then(run, run);
    const tail = p.then(
      () => undefined,
      () => undefined,
    );
    this.targets.set(req.target, tail);
    void tail.then(() => {
      if (this.targets.get(req.target) === tail) this.targets.delete(req.target);
    });
    return p;
  }

  view(key: string, parent: string, labels: Record<string, string> = {}): Promise<Mount[]> {
    return this.createSnapshot('view', key, parent, labels);
  }

  /** The ids of `parent` and its parents (empty for none or an unknown parent). */
  private parentChainIds(parent: string): string[] {
    if (parent === '') return [];
    const p = this.metadata.get(parent);
    if (p === undefined) return [];
    return [p.id, ...(p.parent === '' ? [] : this.parentChainIds(p.parent))];
  }

  private async createSnapshot(
    kind: SnapshotKind,
    key: string,
    parent: string,
    labels: Record<string, string>,
    then?: (s: MountableSnapshot) => Promise<Mount[]>,
  ): Promise<Mount[]> {
    this.check();
    if (then === undefined && this.remote !== undefined && parent !== '') await this.remote.ensureServed(this.parentChainIds(parent));
    let parentId: string | undefined;
    try {
      // Fail fast, before touching the disk; the transaction below checks again.
      parentId = this.metadata.checkCreate(kind, key, parent);
    } catch (e) {
      throw wrapError(e, 'failed to create snapshot');
    }
    let id: string;
    try {
      id = this.metadata.reserveId();
    } catch (e) {
      throw wrapError(e, 'failed to create snapshot');
    }
    // Ids are never reused, so `new-<id>` is this call's alone; both names are marked before
    // they exist, so Cleanup never sees them unowned.
    const tempName = `${TEMP_PREFIX}${id}`;
    this.inflight.add(id);
    this.inflight.add(tempName);
    let td: string | undefined = join(this.snapshotsDir(), tempName);
    let final: string | undefined;
    try {
      await mkdir(td, { mode: 0o700 });
      await mkdir(join(td, 'fs'), { mode: 0o755 });
      if (kind === 'active') await mkdir(join(td, 'work'), { mode: 0o711 });
      if (parentId !== undefined) {
        // The new upper dir gets the owner of the parent's root, as containerd does.
        const st = await lstat(this.fsPath(parentId));
        await lchown(join(td, 'fs'), st.uid, st.gid);
      }
      final = join(this.snapshotsDir(), id);
      await rename(td, final);
      td = undefined;
      let s: MountableSnapshot;
      try {
        s = this.metadata.create(kind, key, parent, { labels, id });
      } catch (e) {
        throw wrapError(e, 'failed to create snapshot');
      }
      final = undefined;
      this.log.debug('snapshot created', { key, parent, kind, id });
      if (then !== undefined) return await then(s);
      return this.mounts(s);
    } catch (e) {
      for (const dir of [td, final]) {
        if (dir !== undefined) await rm(dir, { recursive: true, force: true }).catch((err: unknown) => this.log.warn('cannot remove a failed snapshot directory', { path: dir, error: err }));
      }
      if (e instanceof SnapshotterError) throw e;
      throw wrapError(e, 'failed to create prepare snapshot dir');
    } finally {
      this.inflight.delete(id);
      this.inflight.delete(tempName);
    }
  }

  async mounts(snapshot: MountableSnapshot): Promise<Mount[]>;
  async mounts(key: string): Promise<Mount[]>;
  async mounts(arg: string | MountableSnapshot): Promise<Mount[]> {
    let s: MountableSnapshot;
    if (typeof arg === 'string') {
      this.check();
      try {
        s = this.metadata.mountable(arg);
      } catch (e) {
        throw wrapError(e, 'failed to get active mount');
      }
      if (this.remote !== undefined) await this.remote.ensureServed(s.parentIds);
    } else s = arg;
    return this.mountsOf(s);
  }

  /** containerd overlayfs snapshotter's mounts(). */
  mountsOf(s: MountableSnapshot): Mount[] {
    if (s.parentIds.length === 0) {
      return [{ type: 'bind', source: this.fsPath(s.id), target: '', options: [s.kind === 'view' ? 'ro' : 'rw', 'rbind'] }];
    }
    const options: string[] = [];
    if (this.indexOff) options.push('index=off');
    if (s.kind === 'active') {
      options.push(`workdir=${this.workPath(s.id)}`, `upperdir=${this.fsPath(s.id)}`);
    } else if (s.parentIds.length === 1) {
      return [{ type: 'bind', source: this.fsPath(s.parentIds[0]), target: '', options: ['ro', 'rbind'] }];
    }
    options.push(`lowerdir=${s.parentIds.map((p) => this.fsPath(p)).join(':')}`);
    return [{ type: 'overlay', source: 'overlay', target: '', options }];
  }

  async commit(name: string, key: string, labels: Record<string, string> = {}): Promise<void> {
    this.check();
    const cur = this.metadata.stat(key); // NotFound unwrapped, as containerd's Commit
    this.inflight.add(cur.id);
    try {
      let usage: Usage = { size: 0, inodes: 0 };
      if (cur.kind === 'active') {
        try {
          usage = await diskUsage(this.fsPath(cur.id));
        } catch (e) {
          throw wrapError(e, `failed to commit snapshot ${key}: disk usage of ${this.fsPath(cur.id)}`);
        }
      }
      try {
        this.metadata.commit(key, name, { labels, usage });
      } catch (e) {
        throw wrapError(e, 'failed to commit snapshot');
      }
      this.log.debug('snapshot committed', { key, name, id: cur.id, size: usage.size, inodes: usage.inodes });
    } finally {
      this.inflight.delete(cur.id);
    }
  }

  async remove(key: string): Promise<void> {
    this.check();
    let removed;
    try {
      removed = this.metadata.remove(key);
    } catch (e) {
      throw wrapError(e, `failed to remove snapshot ${key}`);
    }
    // The metadata is gone: the directory goes now; if that fails, Cleanup retries.
    const dir = join(this.snapshotsDir(), removed.id);
    this.inflight.add(removed.id);
    try {
      if (removed.details !== undefined && this.remote !== undefined) await this.remote.removed(removed);
      else if (this.remote !== undefined) await this.remote.releaseUnder(dir);
      if (removed.remote !== undefined) this.remote?.layerRemoved(removed.remote.layerDigest);
      // Never recurse into a mount (a FUSE layer that could not be detached): Cleanup retries.
      const left = await mountsUnder(dir);
      if (left.length > 0) this.log.warn('snapshot directory still has mounts; leaving it for Cleanup', { key, path: dir, mounts: left.map((m) => m.mountpoint) });
      else await rm(dir, { recursive: true, force: true });
    } catch (e) {
      this.log.warn('failed to remove directory', { key, path: dir, error: e });
    } finally {
      this.inflight.delete(removed.id);
    }
    this.log.debug('snapshot removed', { key, id: removed.id, kind: removed.kind });
  }

  async stat(key: string): Promise<SnapshotInfo> {
    this.check();
    return toInfo(this.metadata.stat(key));
  }

  async update(name: string, labels: Record<string, string>, fieldpaths: readonly string[]): Promise<SnapshotInfo> {
    this.check();
    if (name === '') throw invalidArgument('snapshot name must not be empty');
    return toInfo(this.metadata.update(name, labels, fieldpaths));
  }

  async list(filters: readonly string[] = []): Promise<SnapshotInfo[]> {
    this.check();
    return this.metadata.list(filters).map(toInfo);
  }

  /**
   * Usage: for an active snapshot the disk usage of its fs dir now (a walk of the tree); for
   * committed and view snapshots the usage recorded at commit (zero for views).
   */
  async usage(key: string): Promise<Usage> {
    this.check();
    const r = this.metadata.stat(key);
    if (r.kind !== 'active') return r.usage;
    this.inflight.add(r.id);
    try {
      return await diskUsage(this.fsPath(r.id));
    } catch (e) {
      throw wrapError(e, `disk usage of snapshot ${key} (${this.fsPath(r.id)})`);
    } finally {
      this.inflight.delete(r.id);
    }
  }

  /**
   * Cleanup: removes every directory under snapshots/ that no snapshot owns (leftovers of
   * removals that failed, of crashes, temporary dirs). Returns the removed paths.
   */
  async cleanup(): Promise<string[]> {
    this.check();
    const dir = this.snapshotsDir();
    const removed: string[] = [];
    for (const name of await readdir(dir)) {
      // Checked right before each removal: a snapshot created while this loop awaits is
      // either in flight (marked before its directory exists) or in the metadata by now.
      if (this.inflight.has(name) || this.metadata.hasId(name)) continue;
      const p = join(dir, name);
      try {
        if (this.remote !== undefined) await this.remote.releaseUnder(p);
        const left = await mountsUnder(p);
        if (left.length > 0) {
          this.log.warn('directory without metadata still has mounts; not removing it', { path: p, mounts: left.map((m) => m.mountpoint) });
          continue;
        }
        await rm(p, { recursive: true, force: true });
        removed.push(p);
      } catch (e) {
        this.log.warn('failed to remove directory', { path: p, error: e });
      }
    }
    if (removed.length > 0) this.log.info('cleanup removed directories without metadata', { removed: removed.length });
    else this.log.debug('cleanup: nothing to remove');
    return removed;
  }

  /**
   * Refuses new calls, stops remote work (the FUSE manager keeps serving) and closes the
   * database (call after the server stopped taking calls).
   */
  async close(): Promise<void> {
    this.closed = true;
    await this.remote?.close().catch((e: unknown) => this.log.warn('remote snapshots did not close cleanly', { error: e }));
    this.metadata.close();
  }
}

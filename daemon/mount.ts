/**
 * Mounting a whole image read-only at a directory: each layer with a zTOC as a lazy FUSE
 * filesystem (`fs/` LayerFs), each layer without one downloaded and unpacked (overlay format),
 * all stacked with overlayfs at DIR (a single layer: a read-only bind mount).
 *
 * Under the root directory (`--root`, default /var/lib/soci-ts):
 *
 * ```
 * <root>/mounts/<id>/state.json    the mount's state (written atomically; see MountState)
 * <root>/mounts/<id>/layers/<n>    FUSE mountpoints of the lazily mounted layers (n = layer index, 0 = bottom)
 * <root>/mounts/<id>/unpacked/<n>  layers unpacked for this mount (removed at unmount)
 * <root>/mounts/<id>/downloads/<n> layer blobs being downloaded for unpacking (removed once unpacked)
 * <root>/layers/<hex>              unpacked layers shared with others (used read-only when present)
 * <root>/cache/spans               compressed spans on disk, shared by every lazily mounted layer
 * ```
 *
 * `<id>` is derived from DIR's real path, so one DIR has one state and a mount left by a crashed
 * process is found and cleaned up by the next mount or umount of that DIR.
 *
 * The process that mounts serves the FUSE layers; it must never block its event loop or make
 * file-system calls into DIR or its own FUSE mounts (the kernel would wait on this very process).
 * mount(8) and umount(8) run as async child processes for the same reason.
 */
import { createHash } from 'node:crypto';
import { mkdir, open, readdir, readFile, realpath, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  formatPlatform,
  layerCompression,
  normalizePlatform,
  type Descriptor,
  type Logger,
  type RegistryClient,
  type Repository,
} from '../fetcher/index.js';
import { DEFAULT_SPAN_SIZE } from '../ztoc/index.js';
import { BackgroundFetcher, CompressedSpanStore, FuseError, InflatedSpanCache, LayerFs, checkFuse } from '../fs/index.js';
import type { ArtifactStore } from './store.js';
import { createIndexes, resolveImages, WorkflowError, DEFAULT_MIN_LAYER_SIZE } from './workflow.js';
import { DiscoverError, discoverIndex, type DiscoveredIndex, type IndexSource } from './discover.js';
import { configDiffIds, downloadLayerBlob, LayerSetupError, mountLazyLayer, Semaphore, unpackLayerFile } from './layers.js';
import { detachAll as sysDetachAll, isMountpoint, runCommand, SysMountError } from './sysmount.js';

export type MountErrorKind =
  /** Mounting needs root. */
  | 'not-root'
  /** /dev/fuse or the kernel's fuse filesystem is missing. */
  | 'no-fuse'
  /** The kernel has no overlay filesystem. */
  | 'no-overlay'
  /** DIR does not exist, is not a directory, or is not empty. */
  | 'bad-dir'
  /** DIR is mounted by a live soci-ts process already. */
  | 'busy'
  /** The image has no SOCI index and --build-index was not given. */
  | 'no-index'
  /** A layer's content does not match the image config (diff_id). */
  | 'bad-layer'
  /** mount(8), a FUSE mount or an unpack failed. */
  | 'mount-failed'
  /** umount(8) or a FUSE unmount failed. */
  | 'unmount-failed'
  /** DIR is not a soci-ts mount (no state for it). */
  | 'not-mounted';

/** A mount or unmount failed. Names the directory (or layer) and the reason. */
export class MountError extends Error {
  readonly kind: MountErrorKind;
  readonly subject: string;
  constructor(kind: MountErrorKind, subject: string, reason: string, options?: { cause?: unknown }) {
    super(`${subject}: ${reason}`, options);
    this.name = 'MountError';
    this.kind = kind;
    this.subject = subject;
  }
}

export type LayerMode = 'lazy' | 'unpacked';

export interface MountedLayerState {
  /** Layer index in the image, 0 = bottom. */
  n: number;
  digest: string;
  mediaType: string;
  size: number;
  mode: LayerMode;
  /** The directory stacked into the overlay (a FUSE mountpoint, or an unpacked tree). */
  path: string;
  /** An unpacked tree under `<root>/layers` shared with others (never removed by unmount). */
  shared?: boolean;
}

/** What `<root>/mounts/<id>/state.json` holds. */
export interface MountState {
  version: 1;
  id: string;
  /** The process serving the FUSE layers. */
  pid: number;
  /** Its start time (field 22 of /proc/PID/stat), so a reused pid is not taken for it. */
  pidStart: string;
  /** Real path of the mounted directory. */
  dir: string;
  image: string;
  manifest: string;
  platform: string;
  /** The SOCI index used (`built`: made while mounting with --build-index); absent when no layer is lazy. */
  index?: { digest: string; source: IndexSource | 'built' };
  layers: MountedLayerState[];
  /** How DIR is mounted: overlayfs over the layers, or a read-only bind of the single layer. */
  top: 'overlay' | 'bind';
  /** False while mounting (a state left so by a crash is cleaned up by the next mount or umount). */
  ready: boolean;
  createdAt: string;
}

export interface MountOptions {
  /** Image reference (a tag or digest; an image index is resolved to one platform). */
  ref: string;
  /** Directory to mount at: must exist and be empty. */
  dir: string;
  /** The root directory (store, caches, mount states). */
  root: string;
  client: RegistryClient;
  store: ArtifactStore;
  logger: Logger;
  /** Platform of a multi-platform image (default: this host's). */
  platform?: string;
  /** Build zTOCs while mounting when the image has no index (streaming each big layer once). */
  buildIndex?: boolean;
  /** With buildIndex: layers below this get no zTOC (default 10 MiB). */
  minLayerSize?: number;
  /** With buildIndex: span size of the zTOCs (default 4 MiB). */
  spanSize?: number;
  /** A FUSE read waiting longer than this for the registry gets EIO (default 30 s). */
  fetchTimeoutMs?: number;
  /** Fetch every span of the lazy layers into the disk cache after a quiet period (default true). */
  backgroundFetch?: boolean;
  /** Bound of the in-memory inflated-span cache, shared by the layers (default 256 MiB). */
  memoryCacheBytes?: number;
  /** Bound of the on-disk span cache (default 10 GiB). */
  diskCacheBytes?: number;
  /** Layers downloaded at once for unpacking (default 3; they are applied bottom-up, one at a time). */
  unpackConcurrency?: number;
}

const STATE_VERSION = 1;
const BACKGROUND_DELAY_MS = 10_000;

/** The id of DIR's mount: 16 hex digits of the sha256 of its real path. */
export function mountId(realDir: string): string {
  return createHash('sha256').update(realDir).digest('hex').slice(0, 16);
}

export function mountBase(root: string, id: string): string {
  return join(root, 'mounts', id);
}

function errCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

// ------------------------------------------------------------------ processes and mounts

export { readMountInfo, type MountInfoEntry } from './sysmount.js';

/** Lazily detaches every mount at or below `path` (deepest first); for cleaning up after a crash. */
async function detachAll(path: string, logger: Logger): Promise<void> {
  try {
    await sysDetachAll(path, logger);
  } catch (err) {
    if (err instanceof SysMountError) throw new MountError('unmount-failed', err.subject, `cannot detach a leftover mount: ${err.message.slice(err.subject.length + 2)}`, { cause: err });
    throw err;
  }
}

/** Unmounts DIR (overlay or bind): normally, else lazily when it is busy. */
async function unmountTop(dir: string, logger: Logger): Promise<void> {
  if (!(await isMountpoint(dir))) return;
  const r = await runCommand('umount', [dir]);
  if (r.code === 0) return;
  logger.warn('unmount failed; detaching lazily (the mount goes when the last user leaves it)', { dir, error: r.stderr });
  const lazy = await runCommand('umount', ['-l', dir]);
  if (lazy.code !== 0) throw new MountError('unmount-failed', dir, `umount failed: ${lazy.stderr || r.stderr}`);
}

/** Start time of a process (field 22 of /proc/PID/stat), or undefined when it is gone. */
export async function processStart(pid: number): Promise<string | undefined> {
  try {
    const text = await readFile(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) is in parentheses and may hold spaces: count from its end.
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    // A zombie (state Z) has exited; it only waits for its parent to reap it.
    if (fields[0] === 'Z' || fields[0] === 'X') return undefined;
    return fields[19];
  } catch {
    return undefined;
  }
}

/** Whether the process that wrote a state still runs. */
export async function stateProcessAlive(state: Pick<MountState, 'pid' | 'pidStart'>): Promise<boolean> {
  const start = await processStart(state.pid);
  return start !== undefined && start === state.pidStart;
}

// ------------------------------------------------------------------ state files

async function writeState(base: string, state: MountState): Promise<void> {
  const path = join(base, 'state.json');
  const tmp = `${path}.tmp-${process.pid}`;
  const fh = await open(tmp, 'w', 0o644);
  try {
    await fh.writeFile(JSON.stringify(state, null, 2) + '\n');
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
}

/** The state of mount `id`, or undefined when there is none (or it is unreadable, which is reported). */
export async function readState(root: string, id: string): Promise<MountState | undefined> {
  const path = join(mountBase(root, id), 'state.json');
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if (errCode(err) === 'ENOENT') return undefined;
    throw new MountError('not-mounted', path, `cannot read the mount state: ${message(err)}`, { cause: err });
  }
  try {
    const s = JSON.parse(text) as MountState;
    if (s.version !== STATE_VERSION || typeof s.dir !== 'string' || !Number.isSafeInteger(s.pid) || !Array.isArray(s.layers)) throw new Error('not a soci-ts mount state');
    return s;
  } catch (err) {
    throw new MountError('not-mounted', path, `malformed mount state: ${message(err)}`, { cause: err });
  }
}

/** Every mount state under root (unreadable ones skipped). */
export async function listStates(root: string): Promise<MountState[]> {
  let ids: string[];
  try {
    ids = await readdir(join(root, 'mounts'));
  } catch (err) {
    if (errCode(err) === 'ENOENT') return [];
    throw err;
  }
  const out: MountState[] = [];
  for (const id of ids.filter((n) => /^[0-9a-f]{16}$/.test(n))) {
    const s = await readState(root, id).catch(() => undefined);
    if (s !== undefined) out.push(s);
  }
  return out;
}

/**
 * Removes what a dead mount left: mounts at DIR and under the mount's directory (lazily
 * detached), the unpacked layers and the state. Never touches shared layers under <root>/layers.
 */
export async function cleanupMount(root: string, id: string, dir: string | undefined, logger: Logger): Promise<void> {
  const base = mountBase(root, id);
  if (dir !== undefined) await detachAll(dir, logger);
  await detachAll(base, logger);
  await rm(base, { recursive: true, force: true });
}

// ------------------------------------------------------------------ checks

async function checkRootAndFuse(): Promise<void> {
  if (process.getuid?.() !== 0) throw new MountError('not-root', 'mount', 'mounting an image needs root (run as root, or with sudo)');
  try {
    await checkFuse();
  } catch (err) {
    if (err instanceof FuseError) throw new MountError(err.kind === 'not-root' ? 'not-root' : 'no-fuse', err.subject, err.message.slice(err.subject.length + 2), { cause: err });
    throw err;
  }
}

async function checkOverlay(): Promise<void> {
  const text = await readFile('/proc/filesystems', 'utf8').catch(() => '');
  if (!/\boverlay\b/.test(text)) {
    throw new MountError('no-overlay', '/proc/filesystems', 'the kernel has no overlay filesystem, needed to stack the layers (modprobe overlay, or a kernel with CONFIG_OVERLAY_FS)');
  }
}

/**
 * DIR's real path. A DIR that cannot be resolved itself (a leftover mount whose FUSE server
 * died answers ENOTCONN) is named by its parent's real path and its own name.
 */
export async function resolveDir(dir: string): Promise<string> {
  try {
    return await realpath(dir);
  } catch (err) {
    if (errCode(err) === 'ENOENT') throw new MountError('bad-dir', dir, 'no such directory (create it first)', { cause: err });
    try {
      return join(await realpath(dirname(dir)), basename(dir));
    } catch {
      throw new MountError('bad-dir', dir, `cannot resolve: ${message(err)}`, { cause: err });
    }
  }
}

/** Checks that DIR (a real path) is an empty directory. */
export async function checkMountDir(dir: string, real: string): Promise<void> {
  let st;
  try {
    st = await stat(real);
  } catch (err) {
    throw new MountError('bad-dir', dir, `cannot stat: ${message(err)}`, { cause: err });
  }
  if (!st.isDirectory()) throw new MountError('bad-dir', dir, 'not a directory');
  const names = await readdir(real);
  if (names.length > 0) throw new MountError('bad-dir', dir, `not an empty directory (${names.length} entries; mount on an empty one)`);
  if (/[:,\n]/.test(real)) throw new MountError('bad-dir', dir, "the path has ':' or ',' or a newline, which overlayfs options cannot carry");
}

// ------------------------------------------------------------------ the mount

interface LayerPlan {
  n: number;
  desc: Descriptor;
  diffId: string | undefined;
  mode: LayerMode;
  path: string;
  shared: boolean;
}

/** A mounted image. `unmount` takes everything down in order (overlay, FUSE layers, files). */
export class ImageMount {
  private closing: Promise<void> | undefined;
  private background: BackgroundFetcher | undefined;

  constructor(
    readonly root: string,
    readonly state: MountState,
    readonly layerFs: readonly LayerFs[],
    private readonly logger: Logger,
    private readonly diskStore: CompressedSpanStore | undefined,
  ) {}

  get id(): string {
    return this.state.id;
  }

  get dir(): string {
    return this.state.dir;
  }

  get lazyLayers(): number {
    return this.state.layers.filter((l) => l.mode === 'lazy').length;
  }

  get unpackedLayers(): number {
    return this.state.layers.filter((l) => l.mode === 'unpacked').length;
  }

  /**
   * After a quiet period, fetches every span of the lazy layers into the disk cache at a bounded
   * rate, yielding to reads (fs's BackgroundFetcher), so the image keeps working without the
   * registry. Stops at unmount.
   */
  startBackgroundFetch(startDelayMs = BACKGROUND_DELAY_MS): void {
    if (this.layerFs.length === 0 || this.diskStore === undefined) return;
    this.background = new BackgroundFetcher({ startDelayMs, logger: this.logger });
    for (const fs of this.layerFs) this.background.add(fs.spans);
  }

  /** Unmounts DIR, then every FUSE layer, then removes the unpacked layers and the state. Idempotent. */
  unmount(): Promise<void> {
    this.closing ??= (async () => {
      await this.background?.stop();
      await unmountTop(this.dir, this.logger);
      const failures: string[] = [];
      for (const fs of [...this.layerFs].reverse()) {
        try {
          await fs.unmount();
        } catch (err) {
          this.logger.warn('FUSE unmount failed; detaching lazily', { mountpoint: fs.mountpoint, error: err });
          const r = await runCommand('umount', ['-l', fs.mountpoint]);
          if (r.code !== 0) failures.push(`${fs.mountpoint}: ${r.stderr}`);
        }
      }
      await this.diskStore?.close().catch((err: unknown) => this.logger.warn('span cache not flushed', { error: err }));
      if (failures.length > 0) throw new MountError('unmount-failed', this.dir, `FUSE layers left mounted: ${failures.join('; ')}`);
      await cleanupMount(this.root, this.id, undefined, this.logger);
      this.logger.info('image unmounted', { dir: this.dir, image: this.state.image });
    })();
    return this.closing;
  }
}

/**
 * Mounts an image at `opts.dir` (see the module comment). Rejects with MountError (not root,
 * no FUSE, no overlayfs, DIR not an empty directory, DIR busy, no index without buildIndex, a
 * mount that failed), DiscoverError (an index that cannot be used), or the fetcher's errors;
 * whatever was mounted before a failure is taken down again.
 */
export async function mountImage(opts: MountOptions): Promise<ImageMount> {
  const { logger, store, root } = opts;
  await checkRootAndFuse();
  const dir = await resolveDir(opts.dir);
  const id = mountId(dir);
  const base = mountBase(root, id);

  const previous = await readState(root, id).catch(() => undefined);
  if (previous !== undefined && (await stateProcessAlive(previous))) {
    throw new MountError('busy', opts.dir, `already a soci-ts mount (served by pid ${previous.pid}); run soci-ts umount ${opts.dir} first`);
  }
  if (previous !== undefined || (await stat(base).catch(() => undefined)) !== undefined) {
    logger.warn('cleaning up after a previous mount of this directory that did not end cleanly', { dir, pid: previous?.pid });
    await cleanupMount(root, id, dir, logger);
  }
  await checkMountDir(opts.dir, dir);

  const repo = opts.client.repository(opts.ref);
  const resolved = await resolveImages(repo, { platform: opts.platform });
  const image = resolved.images[0]!;
  const subject = `${repo.ref.toString()}@${image.descriptor.digest}`;
  const discoverTarget = { descriptor: image.descriptor, manifest: image.manifest, index: resolved.index };

  let index: DiscoveredIndex | undefined;
  let indexSource: IndexSource | 'built' | undefined;
  try {
    index = await discoverIndex(repo, discoverTarget, { store, logger });
    indexSource = index.source;
  } catch (err) {
    if (!(err instanceof DiscoverError) || err.kind !== 'no-index') throw err;
    if (opts.buildIndex !== true) {
      const why = err.message.slice(err.subject.length + 2).replace(/^no SOCI index: /, '');
      throw new MountError('no-index', subject, `the image has no SOCI index (${why}); pass --build-index to build zTOCs while mounting, or index it first with soci-ts create --push`, { cause: err });
    }
    index = await buildIndex(repo, image, discoverTarget, opts);
    indexSource = index === undefined ? undefined : 'built';
  }

  const diffIds = await configDiffIds(repo, image.manifest.config, image.manifest.layers.length);
  const plan: LayerPlan[] = [];
  for (const [n, desc] of image.manifest.layers.entries()) {
    const lazy = index?.ztocFor(desc.digest) !== undefined;
    let path: string;
    let shared = false;
    if (lazy) path = join(base, 'layers', String(n));
    else {
      const sharedPath = join(root, 'layers', desc.digest.replace(/^sha256:/, ''));
      shared = (await stat(sharedPath).catch(() => undefined))?.isDirectory() === true;
      path = shared ? sharedPath : join(base, 'unpacked', String(n));
      if (layerCompression(desc.mediaType) === undefined) throw new MountError('mount-failed', `${repo.ref.name}@${desc.digest}`, `not a layer media type (${desc.mediaType})`);
    }
    plan.push({ n, desc, diffId: diffIds[n], mode: lazy ? 'lazy' : 'unpacked', path, shared });
  }
  if (plan.length === 0) throw new MountError('mount-failed', subject, 'the image has no layers');
  if (plan.some((p) => /[:,\n]/.test(p.path))) throw new MountError('bad-dir', root, "the root path has ':' or ',' or a newline, which overlayfs options cannot carry");
  if (plan.length > 1) await checkOverlay();

  const state: MountState = {
    version: STATE_VERSION,
    id,
    pid: process.pid,
    pidStart: (await processStart(process.pid)) ?? '',
    dir,
    image: repo.ref.toString(),
    manifest: image.descriptor.digest,
    platform: formatPlatform(normalizePlatform(image.platform)),
    ...(index !== undefined && indexSource !== undefined ? { index: { digest: index.digest, source: indexSource } } : {}),
    layers: plan.map((p) => ({ n: p.n, digest: p.desc.digest, mediaType: p.desc.mediaType, size: p.desc.size, mode: p.mode, path: p.path, ...(p.shared ? { shared: true } : {}) })),
    top: plan.length > 1 ? 'overlay' : 'bind',
    ready: false,
    createdAt: new Date().toISOString(),
  };
  await mkdir(join(root, 'mounts'), { recursive: true, mode: 0o700 });
  try {
    await mkdir(base, { mode: 0o700 }); // exclusive: a concurrent mount of the same DIR fails here
  } catch (err) {
    if (errCode(err) === 'EEXIST') throw new MountError('busy', opts.dir, 'another soci-ts mount of this directory is in progress');
    throw err;
  }
  await writeState(base, state);

  const layerFs: LayerFs[] = [];
  let diskStore: CompressedSpanStore | undefined;
  const abort = new AbortController();
  try {
    const lazy = plan.filter((p) => p.mode === 'lazy');
    if (lazy.length > 0) diskStore = await CompressedSpanStore.open({ dir: join(root, 'cache', 'spans'), maxBytes: opts.diskCacheBytes, logger });
    const memory = new InflatedSpanCache({ maxBytes: opts.memoryCacheBytes });
    const failFast = (): void => abort.abort();
    const mountLazy = async (p: LayerPlan): Promise<void> => {
      const ztoc = await index!.loadZtoc(p.desc.digest);
      if (abort.signal.aborted) return;
      const fs = await mountLazyLayer({ repo, layer: p.desc, ztoc, mountpoint: p.path, memory, disk: diskStore, logger, fetchTimeoutMs: opts.fetchTimeoutMs });
      layerFs.push(fs);
    };
    // Unpacked layers download in parallel (a few at a time) but are applied bottom-up, each once
    // the layers below it are in place: a directory a layer only implies takes the metadata of
    // the same directory below (containerd's WithParents), so stacking does not hide it.
    const downloads = new Semaphore(opts.unpackConcurrency ?? 3);
    const unpack = async (p: LayerPlan, below: ReadonlyArray<Promise<void>>): Promise<void> => {
      const file = join(base, 'downloads', String(p.n));
      const subject = `${repo.ref.name}@${p.desc.digest}`;
      try {
        await downloads.run(async () => {
          if (abort.signal.aborted) return;
          try {
            await downloadLayerBlob(repo, p.desc, file, abort.signal);
          } catch (err) {
            if (err instanceof LayerSetupError && err.cause instanceof Error && 'subject' in err.cause) throw err.cause; // the fetcher's errors name the blob
            throw err;
          }
        });
        await Promise.all(below);
        if (abort.signal.aborted) return;
        const parents = plan.slice(0, p.n).reverse().map((l) => l.path);
        await unpackLayerFile({ file, desc: p.desc, dest: p.path, parents, diffId: p.diffId, subject, logger, signal: abort.signal });
      } catch (err) {
        if (err instanceof LayerSetupError) throw new MountError(err.kind === 'bad-layer' ? 'bad-layer' : 'mount-failed', err.subject, err.reason, { cause: err });
        throw err;
      } finally {
        await rm(file, { force: true });
      }
    };
    const ready: Array<Promise<void>> = [];
    for (const p of plan) {
      const below = ready.slice(0, p.n);
      const job = p.mode === 'lazy' ? mountLazy(p) : p.shared ? Promise.resolve() : unpack(p, below);
      job.catch(failFast);
      ready.push(job);
    }
    const settled = await Promise.allSettled(ready);
    const failed = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
    if (abort.signal.aborted) throw new MountError('mount-failed', opts.dir, 'aborted');
    await rm(join(base, 'downloads'), { recursive: true, force: true });

    // Leftmost lowerdir is the topmost layer.
    const lowers = [...plan].reverse().map((p) => p.path);
    const r =
      plan.length > 1
        ? await runCommand('mount', ['-t', 'overlay', 'soci-ts', '-o', `ro,lowerdir=${lowers.join(':')}`, dir])
        : await runCommand('mount', ['--bind', '-o', 'ro', lowers[0]!, dir]);
    if (r.code !== 0) throw new MountError('mount-failed', opts.dir, `${plan.length > 1 ? 'overlay' : 'bind'} mount failed: ${r.stderr}`);
    state.ready = true;
    await writeState(base, state);
  } catch (err) {
    abort.abort();
    logger.warn('mount failed; taking down what was mounted', { dir, error: err });
    await unmountTop(dir, logger).catch(() => undefined);
    for (const fs of layerFs) await fs.unmount().catch(() => undefined);
    await diskStore?.close().catch(() => undefined);
    await cleanupMount(root, id, dir, logger).catch((e: unknown) => logger.error('cleanup after a failed mount failed', { dir, error: e }));
    throw err instanceof FuseError ? new MountError('mount-failed', err.subject, err.message.slice(err.subject.length + 2), { cause: err }) : err;
  }
  // Mount order of the FUSE layers is completion order; keep them in image order.
  layerFs.sort((a, b) => plan.findIndex((p) => p.path === a.mountpoint) - plan.findIndex((p) => p.path === b.mountpoint));
  logger.info('image mounted', { dir, image: state.image, manifest: state.manifest, lazy: layerFs.length, unpacked: plan.length - layerFs.length, index: state.index });
  const m = new ImageMount(root, state, layerFs, logger, diskStore);
  if (opts.backgroundFetch !== false) m.startBackgroundFetch();
  return m;
}

/** --build-index: zTOCs for the big layers (streamed once each), recorded in the store, then used. */
async function buildIndex(
  repo: Repository,
  image: Awaited<ReturnType<typeof resolveImages>>['images'][number],
  target: Parameters<typeof discoverIndex>[1],
  opts: MountOptions,
): Promise<DiscoveredIndex | undefined> {
  try {
    await createIndexes(repo, [image], {
      client: opts.client,
      store: opts.store,
      logger: opts.logger,
      spanSize: opts.spanSize ?? DEFAULT_SPAN_SIZE,
      minLayerSize: opts.minLayerSize ?? DEFAULT_MIN_LAYER_SIZE,
      format: 'v1',
    });
  } catch (err) {
    if (err instanceof WorkflowError && /no layer can be indexed/.test(err.message)) {
      opts.logger.info('no layer is big enough for a zTOC: every layer is unpacked', { image: image.descriptor.digest });
      return undefined;
    }
    throw err;
  }
  return discoverIndex(repo, target, { store: opts.store, logger: opts.logger, sources: ['store'] });
}

// ------------------------------------------------------------------ unmount by directory

export interface UnmountResult {
  state: MountState;
  /** How it ended: the serving process unmounted; it had to be killed; it was already gone. */
  how: 'signalled' | 'killed' | 'cleaned-up';
}

/**
 * Unmounts the soci-ts mount at `dir`: signals the serving process (SIGTERM) and waits for it
 * to unmount and exit; after `timeoutMs` kills it (SIGKILL) and detaches what is left; a state
 * whose process is gone is cleaned up directly. Rejects with MountError `not-mounted` when DIR
 * has no soci-ts state under root.
 */
export async function unmountDir(dir: string, root: string, logger: Logger, timeoutMs = 30_000): Promise<UnmountResult> {
  const real = await resolveDir(dir).catch(() => undefined); // gone: find it by the path given
  const states = await listStates(root);
  const state = states.find((s) => s.dir === real) ?? states.find((s) => s.dir === dir);
  if (state === undefined) {
    const mounted = real !== undefined && (await isMountpoint(real));
    throw new MountError('not-mounted', dir, `not a soci-ts mount (no mount state in ${join(root, 'mounts')}${mounted ? '; something else is mounted there' : ''})`);
  }
  let how: UnmountResult['how'] = 'cleaned-up';
  if (await stateProcessAlive(state)) {
    process.kill(state.pid, 'SIGTERM');
    how = 'signalled';
    const deadline = Date.now() + timeoutMs;
    while (await stateProcessAlive(state)) {
      if (Date.now() > deadline) {
        logger.warn('the serving process did not unmount in time; killing it', { pid: state.pid, dir: state.dir });
        try {
          process.kill(state.pid, 'SIGKILL');
        } catch {
          // gone meanwhile
        }
        how = 'killed';
        for (let i = 0; i < 50 && (await stateProcessAlive(state)); i++) await sleep(100);
        break;
      }
      await sleep(100);
    }
  }
  // Whatever the process left (nothing, after a clean exit).
  await cleanupMount(root, state.id, state.dir, logger);
  return { state, how };
}

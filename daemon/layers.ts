/**
 * One image layer made usable on this host, the two ways soci-ts does it, shared by
 * `soci-ts mount` (daemon/mount.ts) and the snapshotter's FUSE manager and remote snapshots:
 *
 * - lazily: {@link mountLazyLayer} mounts the layer's zTOC as a read-only FUSE filesystem (fs/
 *   LayerFs) whose reads fetch spans from the registry (range reads, digest-checked), through the
 *   process's shared memory and disk span caches;
 * - locally: {@link downloadLayerBlob} streams the blob to a file, {@link unpackLayerFile}
 *   unpacks it (overlay format, containerd's WithParents for directories the layer only implies)
 *   into a new directory and checks its diff_id against the image config.
 *
 * Errors are {@link LayerSetupError}s naming the layer (`repo@digest`) and the reason; callers map
 * them to their own error classes.
 */
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { dirname } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Descriptor, Logger, Repository } from '../fetcher/index.js';
import type { LayerIndex } from '../ztoc/index.js';
import { LayerFs, unpackLayer, type LayerFsOptions, type UnpackResult } from '../fs/index.js';

export type LayerSetupErrorKind =
  /** The blob could not be downloaded. */
  | 'download'
  /** The blob could not be unpacked (malformed, I/O). */
  | 'unpack'
  /** The unpacked content does not match the image config's diff_id. */
  | 'bad-layer';

export class LayerSetupError extends Error {
  readonly kind: LayerSetupErrorKind;
  readonly subject: string;
  readonly reason: string;
  constructor(kind: LayerSetupErrorKind, subject: string, reason: string, options?: { cause?: unknown }) {
    super(`${subject}: ${reason}`, options);
    this.name = 'LayerSetupError';
    this.kind = kind;
    this.subject = subject;
    this.reason = reason;
  }
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** What a FUSE layer reports per operation and per registry fetch (all optional). */
export interface LayerObserver {
  /** After every FUSE operation. */
  onOp?: (op: string, ms: number, ok: boolean) => void;
  /** After every successful span fetch from the registry (compressed bytes). */
  onFetch?: (bytes: number) => void;
  /** After a failed span fetch. */
  onFetchError?: (err: unknown) => void;
}

export interface LazyLayerOptions extends LayerObserver {
  repo: Repository;
  layer: Descriptor;
  ztoc: LayerIndex;
  /** The zTOC's inode table, when built beforehand. */
  inodes?: LayerFsOptions['inodes'];
  mountpoint: string;
  memory: LayerFsOptions['memory'];
  disk?: LayerFsOptions['disk'];
  logger: Logger;
  fetchTimeoutMs?: number;
}

/** Mounts one layer lazily (see the module comment). Rejects with fs's FuseError. */
export function mountLazyLayer(opts: LazyLayerOptions): Promise<LayerFs> {
  const { repo, layer } = opts;
  return LayerFs.mount({
    mountpoint: opts.mountpoint,
    layerDigest: layer.digest,
    index: opts.ztoc,
    inodes: opts.inodes,
    source: {
      read: async (offset, length, digest) => {
        try {
          const bytes = await repo.readRange(layer, offset, length, { digest });
          opts.onFetch?.(bytes.length);
          return bytes;
        } catch (err) {
          opts.onFetchError?.(err);
          throw err;
        }
      },
    },
    memory: opts.memory,
    disk: opts.disk,
    logger: opts.logger,
    fetchTimeoutMs: opts.fetchTimeoutMs,
    onOp: opts.onOp,
  });
}

/** Downloads a layer blob to `file` (its directory is created). Rejects with LayerSetupError `download`. */
export async function downloadLayerBlob(repo: Repository, desc: Descriptor, file: string, signal?: AbortSignal): Promise<void> {
  const subject = `${repo.ref.name}@${desc.digest}`;
  await mkdir(dirname(file), { recursive: true });
  try {
    await pipeline(Readable.from(repo.blobStream(desc, { signal })), createWriteStream(file), { signal });
  } catch (err) {
    await rm(file, { force: true });
    throw new LayerSetupError('download', subject, `cannot download the layer: ${message(err)}`, { cause: err });
  }
}

export interface UnpackFileOptions {
  /** The downloaded blob (removed afterwards, whatever the outcome). */
  file: string;
  desc: Descriptor;
  /** The directory to create. */
  dest: string;
  /** The directories of the layers below, topmost first. */
  parents: readonly string[];
  /** The image config's diff_id of the layer, checked when given. */
  diffId?: string;
  /** For messages: `repo@digest`. */
  subject: string;
  logger: Logger;
  signal?: AbortSignal;
}

/**
 * Unpacks a downloaded layer blob into the new directory `dest` and checks its diff_id. On
 * failure nothing is left at `dest`. Rejects with LayerSetupError `unpack` or `bad-layer`.
 */
export async function unpackLayerFile(opts: UnpackFileOptions): Promise<UnpackResult> {
  let result: UnpackResult;
  try {
    result = await unpackLayer({
      source: createReadStream(opts.file),
      mediaType: opts.desc.mediaType,
      digest: opts.desc.digest,
      dest: opts.dest,
      parents: opts.parents,
      logger: opts.logger,
      signal: opts.signal,
    });
  } catch (err) {
    throw new LayerSetupError('unpack', opts.subject, `cannot unpack the layer: ${message(err)}`, { cause: err });
  } finally {
    await rm(opts.file, { force: true });
  }
  if (opts.diffId !== undefined && result.diffID !== opts.diffId) {
    await rm(opts.dest, { recursive: true, force: true });
    throw new LayerSetupError('bad-layer', opts.subject, `unpacked content has diff_id ${result.diffID}, the image config says ${opts.diffId}`);
  }
  return result;
}

/** The config's diff_ids (one per layer), or an empty list when the config has none usable. */
export async function configDiffIds(repo: Repository, config: Descriptor, layers: number): Promise<Array<string | undefined>> {
  try {
    const bytes = await repo.fetchBlob(config, 16 << 20);
    const doc = JSON.parse(bytes.toString('utf8')) as { rootfs?: { diff_ids?: unknown } };
    const ids = doc.rootfs?.diff_ids;
    if (Array.isArray(ids) && ids.length === layers && ids.every((d) => typeof d === 'string')) return ids as string[];
  } catch (err) {
    repo.client.logger.warn('cannot read the image config: unpacked layers are not checked against diff_ids', { config: config.digest, error: err });
  }
  return [];
}

/** At most `limit` calls of `run` at a time. */
export class Semaphore {
  private active = 0;
  private readonly waiting: Array<() => void> = [];
  constructor(private readonly limit: number) {}

  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.active >= this.limit) await new Promise<void>((r) => this.waiting.push(r));
    this.active++;
    try {
      return await fn();
    } finally {
      this.active--;
      this.waiting.shift()?.();
    }
  }
}

/**
 * Driving the soci-ts snapshotter the way containerd's unpacker drives a remote snapshotter:
 * Prepare of each layer with the remote labels (`containerd.io/snapshot.ref` = the chain ID,
 * the `containerd.io/snapshot/cri.*` labels, parent = the previous chain ID), ALREADY_EXISTS
 * or the mounts; and the daemon's metrics endpoint, scraped and parsed strictly.
 */
import { randomBytes } from 'node:crypto';
import { status, type ServiceError } from '@grpc/grpc-js';
import type { ProtoMount, SnapshotsClient } from '../../daemon/grpc-api.js';
import { parseExposition, type MetricFamily } from './exposition.js';
import { pushImage, type BuiltImage, type PushedImage } from './images.js';
import { httpRequest, type Registry } from './registry.js';
import { sociTs, type SnapshotterDaemon } from './snapshotter.js';

export const LABEL_TARGET = 'containerd.io/snapshot.ref';
export const LABEL_IMAGE_REF = 'containerd.io/snapshot/cri.image-ref';
export const LABEL_MANIFEST = 'containerd.io/snapshot/cri.manifest-digest';
export const LABEL_LAYER = 'containerd.io/snapshot/cri.layer-digest';
export const LABEL_LAYERS = 'containerd.io/snapshot/cri.image-layers';

/** The labels containerd's unpacker puts on the Prepare of layer `i` of `image` (pulled as `imageRef`, manifest `manifestDigest`). */
export function remoteLabels(image: BuiltImage, chain: readonly string[], i: number, imageRef: string, manifestDigest: string): Record<string, string> {
  return {
    [LABEL_TARGET]: chain[i]!,
    [LABEL_IMAGE_REF]: imageRef,
    [LABEL_MANIFEST]: manifestDigest,
    [LABEL_LAYER]: image.layers[i]!.digest,
    [LABEL_LAYERS]: image.layers
      .slice(i)
      .map((l) => l.digest)
      .join(','),
  };
}

export type PrepareResult = { exists: true; details: string } | { exists: false; mounts: ProtoMount[]; key: string };

/** Prepare of layer `i` on the previous chain ID, with an unpacker-style key: ALREADY_EXISTS, or the mounts (the fallback). */
export async function prepareRemote(c: SnapshotsClient, chain: readonly string[], i: number, labels: Record<string, string>): Promise<PrepareResult> {
  const key = `extract-${i}-${randomBytes(4).toString('hex')} ${chain[i]}`;
  try {
    const mounts = await c.prepare(key, i === 0 ? '' : chain[i - 1]!, labels);
    return { exists: false, mounts, key };
  } catch (e) {
    const err = e as ServiceError;
    if (err.code === status.ALREADY_EXISTS) return { exists: true, details: err.details };
    throw e;
  }
}

/** The exposition at the daemon's metrics endpoint (its URL from the `metrics endpoint serving` log line). */
export async function scrapeDaemon(d: SnapshotterDaemon): Promise<Map<string, MetricFamily>> {
  const line = d.logLines().find((l) => l.msg === 'metrics endpoint serving');
  const url = line?.url;
  if (typeof url !== 'string') throw new Error(`no 'metrics endpoint serving' log line: ${d.logs().slice(-2000)}`);
  const r = await httpRequest(url);
  if (r.status !== 200) throw new Error(`GET ${url}: ${r.status}`);
  return parseExposition(r.body.toString('utf8'), { requireHelpAndType: true });
}

/**
 * Pushes `image` to `registry` as `repo` and indexes it with `soci-ts create --push` (its store
 * under `storeRoot`): the pushed image and its first layer that got a zTOC (and that layer's index).
 */
export async function pushIndexed(registry: Registry, image: BuiltImage, repo: string, storeRoot: string): Promise<{ pushed: PushedImage; layer: { digest: string; ztoc: string }; layerIndex: number }> {
  const pushed = await pushImage(image.layoutDir, image.tag, registry, repo);
  const created = await sociTs(['create', '--push', '--root', storeRoot, '--hosts-dir', '', '--json', pushed.ref]);
  if (created.code !== 0) throw new Error(`soci-ts create --push: ${created.stderr}`);
  const made = JSON.parse(created.stdout) as { indexes: { layers: { digest: string; ztoc?: string }[] }[] };
  const indexed = made.indexes[0]?.layers.find((l) => l.ztoc !== undefined);
  if (indexed?.ztoc === undefined) throw new Error(`soci-ts create --push made no zTOC for ${pushed.ref}`);
  return { pushed, layer: { digest: indexed.digest, ztoc: indexed.ztoc }, layerIndex: image.layers.findIndex((l) => l.digest === indexed.digest) };
}

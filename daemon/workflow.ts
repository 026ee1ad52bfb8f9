/**
 * The index workflows behind `soci-ts create`, `push` and `convert`: read an image straight from
 * its registry, stream each layer once into a zTOC, record indexes in the local store, and push
 * them (v1: by referrers/fallback tag; v2: a SOCI-enabled image index at a new reference).
 */
import {
  FetcherError,
  MEDIA_TYPE_OCI_INDEX,
  MEDIA_TYPE_OCI_MANIFEST as OCI_MANIFEST,
  MEDIA_TYPE_OCI_CONFIG,
  layerCompression,
  isIndexMediaType,
  hostPlatform,
  formatPlatform,
  parsePlatform,
  selectManifests,
  type Descriptor,
  type ImageIndex,
  type ImageManifest,
  type Platform,
  type Logger,
  type RegistryClient,
  type Repository,
} from '../fetcher/index.js';
import {
  buildSociIndex,
  buildZtoc,
  encodeZtoc,
  readZtoc,
  EMPTY_CONFIG_BYTES,
  EMPTY_CONFIG_DIGEST,
  ANNOTATION_INDEX_DIGEST,
  ANNOTATION_IMAGE_MANIFEST_DIGEST,
  MEDIA_TYPE_SOCI_INDEX_V2,
  parseSociIndex,
  DEFAULT_BUILD_TOOL,
  type IndexedLayer,
  type SociIndexVersion,
} from '../ztoc/index.js';
import type { ArtifactStore, IndexRecord } from './store.js';

/** Layers smaller than this get no zTOC by default (upstream's CLI default). */
export const DEFAULT_MIN_LAYER_SIZE = 10 << 20;

export class WorkflowError extends Error {
  readonly subject: string;
  constructor(subject: string, reason: string, options?: { cause?: unknown }) {
    super(`${subject}: ${reason}`, options);
    this.name = 'WorkflowError';
    this.subject = subject;
  }
}

export interface LayerOutcome {
  digest: string;
  mediaType: string;
  size: number;
  /** Set when the layer got a zTOC. */
  ztoc?: { digest: string; size: number; spans: number; files: number };
  /** The zTOC already was in the store (same layer, same span size): not fetched again. */
  reused?: boolean;
  /** Why the layer has no zTOC. */
  skipped?: string;
}

export interface CreatedIndex {
  record: IndexRecord;
  /** The image manifest the index is for. */
  image: Descriptor;
  platform: Platform;
  layers: LayerOutcome[];
}

export interface CreateOptions {
  client: RegistryClient;
  store: ArtifactStore;
  logger: Logger;
  spanSize: number;
  minLayerSize: number;
  format: SociIndexVersion;
  platform?: string;
  allPlatforms?: boolean;
  /** Layers streamed at once. */
  concurrency?: number;
  /** Progress: compressed bytes streamed so far, of `total`. */
  onProgress?: (done: number, total: number) => void;
  buildToolIdentifier?: string;
}

export interface ImageTarget {
  /** The image manifest (platform-specific). */
  descriptor: Descriptor;
  manifest: ImageManifest;
  bytes: Buffer;
  platform: Platform;
}

/**
 * The platform-specific image manifests of `repo`'s reference: every image one with
 * `all`, else the one for `platform` (default: this host's).
 */
export async function resolveImages(repo: Repository, opts: { platform?: string; all?: boolean }): Promise<{ top: Descriptor; topBytes: Buffer; index?: ImageIndex; images: ImageTarget[] }> {
  const top = await repo.fetchManifest();
  const want = opts.platform === undefined ? hostPlatform() : parsePlatform(opts.platform);
  if (top.parsed.kind === 'index') {
    const chosen = selectManifests(top.parsed.index, { platform: want, all: opts.all, subject: repo.ref.toString() });
    const images: ImageTarget[] = [];
    for (const d of chosen) {
      const m = await repo.fetchManifest(d);
      if (m.parsed.kind !== 'manifest') throw new WorkflowError(`${repo.ref.name}@${d.digest}`, 'an index entry is itself an index (nested indexes are not supported)');
      images.push({ descriptor: { ...m.descriptor, platform: d.platform }, manifest: m.parsed.manifest, bytes: m.bytes, platform: d.platform ?? want });
    }
    return { top: top.descriptor, topBytes: top.bytes, index: top.parsed.index, images };
  }
  const manifest = top.parsed.manifest;
  const platform = await configPlatform(repo, manifest.config).catch((err: unknown) => {
    repo.client.logger.debug('image config has no platform; assuming the requested one', { error: err });
    return want;
  });
  return { top: top.descriptor, topBytes: top.bytes, images: [{ descriptor: top.descriptor, manifest, bytes: top.bytes, platform }] };
}

/** os/architecture/variant from an image config blob. */
async function configPlatform(repo: Repository, config: Descriptor): Promise<Platform> {
  const bytes = await repo.fetchBlob(config, 16 << 20);
  const parsed = JSON.parse(bytes.toString('utf8')) as { os?: unknown; architecture?: unknown; variant?: unknown };
  if (typeof parsed.os !== 'string' || typeof parsed.architecture !== 'string') throw new WorkflowError(config.digest, 'config has no os/architecture');
  const p: Platform = { os: parsed.os, architecture: parsed.architecture };
  if (typeof parsed.variant === 'string' && parsed.variant !== '') p.variant = parsed.variant;
  return p;
}

/** Why a layer gets no zTOC, or undefined if it gets one. */
export function skipReason(layer: Descriptor, minLayerSize: number): string | undefined {
  const compression = layerCompression(layer.mediaType);
  if (compression === undefined) return `not a layer media type (${layer.mediaType})`;
  if (compression === 'zstd') return 'zstd layers are not supported (as upstream)';
  if (layer.urls !== undefined && layer.urls.length > 0) return 'non-distributable layer (served from external URLs)';
  if (layer.size < minLayerSize) return `smaller than the minimum layer size (${minLayerSize} bytes)`;
  return undefined;
}

/** A zTOC already in the store for this layer at this span size, if any. */
async function storedZtoc(store: ArtifactStore, layerDigest: string, spanSize: number): Promise<{ digest: string; size: number; spans: number; files: number } | undefined> {
  for (const rec of await store.listIndexRecords()) {
    const z = rec.ztocs.find((e) => e.layerDigest === layerDigest);
    if (z === undefined) continue;
    try {
      const bytes = await store.readBlob(z.ztocDigest);
      const index = readZtoc(bytes, z.ztocDigest);
      if (index.spanSize !== spanSize) continue;
      return { digest: z.ztocDigest, size: z.ztocSize, spans: index.spans.length, files: index.ztoc.files.length };
    } catch {
      continue; // a missing or corrupt blob: build afresh
    }
  }
  return undefined;
}

async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!, i);
    }
  });
  await Promise.all(workers);
  return out;
}

/**
 * Builds zTOCs for the layers of each image target and records one index per image.
 * Each layer is streamed once from the registry (or reused from the store).
 */
export async function createIndexes(repo: Repository, targets: readonly ImageTarget[], opts: CreateOptions): Promise<CreatedIndex[]> {
  const { store, logger } = opts;
  // Every distinct layer to index, once, across platforms.
  const plan = new Map<string, { layer: Descriptor; skipped?: string }>();
  for (const t of targets) for (const layer of t.manifest.layers) if (!plan.has(layer.digest)) plan.set(layer.digest, { layer, skipped: skipReason(layer, opts.minLayerSize) });
  const built = new Map<string, LayerOutcome>();
  const todo: Descriptor[] = [];
  for (const { layer, skipped } of plan.values()) {
    if (skipped !== undefined) {
      built.set(layer.digest, { digest: layer.digest, mediaType: layer.mediaType, size: layer.size, skipped });
      continue;
    }
    const existing = await storedZtoc(store, layer.digest, opts.spanSize);
    if (existing !== undefined) built.set(layer.digest, { digest: layer.digest, mediaType: layer.mediaType, size: layer.size, ztoc: existing, reused: true });
    else todo.push(layer);
  }
  const total = todo.reduce((s, l) => s + l.size, 0);
  const progress = new Map<string, number>();
  const report = (): void => opts.onProgress?.([...progress.values()].reduce((a, b) => a + b, 0), total);
  await mapLimit(todo, opts.concurrency ?? 2, async (layer) => {
    const started = Date.now();
    let ztoc;
    try {
      ztoc = await buildZtoc(repo.blobStream(layer), {
        source: `${repo.ref.name}@${layer.digest}`,
        spanSize: opts.spanSize,
        buildToolIdentifier: opts.buildToolIdentifier ?? DEFAULT_BUILD_TOOL,
        onProgress: (n) => {
          progress.set(layer.digest, n);
          report();
        },
      });
    } catch (err) {
      if (err instanceof FetcherError) throw err;
      throw new WorkflowError(`${repo.ref.name}@${layer.digest}`, `cannot index layer: ${(err as Error).message}`, { cause: err });
    }
    const bytes = encodeZtoc(ztoc);
    const stored = await store.putBlob(bytes);
    const spans = ztoc.compressionInfo.maxSpanId + 1;
    built.set(layer.digest, { digest: layer.digest, mediaType: layer.mediaType, size: layer.size, ztoc: { ...stored, spans, files: ztoc.files.length } });
    logger.info('layer indexed', { layer: layer.digest, bytes: layer.size, spans, ztocBytes: stored.size, ms: Date.now() - started });
  });

  await store.putBlob(EMPTY_CONFIG_BYTES, EMPTY_CONFIG_DIGEST);
  const out: CreatedIndex[] = [];
  for (const t of targets) {
    const layers = t.manifest.layers.map((l) => built.get(l.digest)!);
    const indexed: IndexedLayer[] = [];
    for (const o of layers) if (o.ztoc !== undefined) indexed.push({ layer: { mediaType: o.mediaType, digest: o.digest, size: o.size }, ztoc: { digest: o.ztoc.digest, size: o.ztoc.size }, spanSize: opts.spanSize });
    if (indexed.length === 0) {
      throw new WorkflowError(
        `${repo.ref.name}@${t.descriptor.digest}`,
        `no layer can be indexed (${layers.map((l) => l.skipped).filter((s, i, a) => a.indexOf(s) === i).join('; ')}); lower --min-layer-size to index small layers`,
      );
    }
    const serialized = buildSociIndex({
      version: opts.format,
      layers: indexed,
      subject: opts.format === 'v1' ? { mediaType: t.descriptor.mediaType, digest: t.descriptor.digest, size: t.descriptor.size } : undefined,
      buildToolIdentifier: opts.buildToolIdentifier ?? DEFAULT_BUILD_TOOL,
    });
    await store.putBlob(serialized.bytes, serialized.descriptor.digest);
    const record = await store.addIndexRecord({
      digest: serialized.descriptor.digest,
      size: serialized.descriptor.size,
      format: opts.format,
      imageRef: repo.ref.toString(),
      imageManifestDigest: t.descriptor.digest,
      platform: t.platform,
      ztocs: indexed.map((l) => ({ layerDigest: l.layer.digest, ztocDigest: l.ztoc.digest, ztocSize: l.ztoc.size })),
    });
    out.push({ record, image: t.descriptor, platform: t.platform, layers });
  }
  return out;
}

/** Pushes the `{}` config, the zTOCs and the index manifest of `record` to `repo`. */
async function pushIndexArtifacts(repo: Repository, store: ArtifactStore, record: IndexRecord, logger: Logger): Promise<{ uploaded: number; existed: number; referrersTagUpdated: boolean }> {
  let uploaded = 0;
  let existed = 0;
  const count = (r: string): void => {
    if (r === 'exists') existed++;
    else uploaded++;
  };
  count(await repo.pushBlob({ mediaType: 'application/vnd.amazon.soci.index.v1+json', digest: EMPTY_CONFIG_DIGEST, size: EMPTY_CONFIG_BYTES.length }, EMPTY_CONFIG_BYTES));
  for (const z of record.ztocs) {
    const bytes = await store.readBlob(z.ztocDigest);
    count(await repo.pushBlob({ mediaType: 'application/octet-stream', digest: z.ztocDigest, size: z.ztocSize }, bytes));
  }
  const manifestBytes = await store.readBlob(record.digest);
  parseSociIndex(manifestBytes, record.digest); // never push something we would not read
  const pushed = await repo.pushManifest(Buffer.from(manifestBytes), OCI_MANIFEST);
  logger.info('index pushed', { index: record.digest, repository: repo.ref.name, referrersApi: pushed.subjectAccepted, fallbackTagUpdated: pushed.referrersTagUpdated });
  return { uploaded, existed, referrersTagUpdated: pushed.referrersTagUpdated };
}

export interface PushedIndex {
  record: IndexRecord;
  uploadedBlobs: number;
  existingBlobs: number;
  referrersTagUpdated: boolean;
}

/**
 * Pushes the v1 indexes recorded for `repo`'s image (the selected platforms' manifests) so that
 * readers discover them through referrers or the fallback tag.
 */
export async function pushIndexes(repo: Repository, store: ArtifactStore, images: readonly ImageTarget[], logger: Logger): Promise<PushedIndex[]> {
  const out: PushedIndex[] = [];
  for (const image of images) {
    const records = (await store.listIndexRecords({ imageManifestDigest: image.descriptor.digest })).filter((r) => r.format === 'v1');
    if (records.length === 0) {
      throw new WorkflowError(`${repo.ref.toString()} (${formatPlatform(image.platform)})`, `no v1 SOCI index in the local store for manifest ${image.descriptor.digest}; run soci-ts create first`);
    }
    // The newest (records are sorted newest first).
    const record = records[0]!;
    const r = await pushIndexArtifacts(repo, store, record, logger);
    out.push({ record, uploadedBlobs: r.uploaded, existingBlobs: r.existed, referrersTagUpdated: r.referrersTagUpdated });
  }
  return out;
}

// ------------------------------------------------------------------------ convert (v2)

/** Copies a blob between repositories: nothing if present, a mount on the same registry, else a streamed copy. */
async function copyBlob(src: Repository, dst: Repository, desc: Descriptor): Promise<string> {
  const sameRegistry = src.ref.host === dst.ref.host;
  return dst.pushBlob(desc, () => src.blobStream(desc), { mountFrom: sameRegistry ? [src.ref.repository] : [] });
}

export interface ConvertResult {
  /** The SOCI-enabled image index pushed to the destination. */
  index: Descriptor;
  created: CreatedIndex[];
}

/**
 * `convert SRC DST`: builds v2 indexes for the selected platforms and pushes to DST an OCI image
 * index that holds every image manifest of SRC re-serialised as OCI (those indexed annotated
 * with their index's digest) plus the SOCI index manifests, sharing SRC's layers.
 */
export async function convertImage(src: Repository, dst: Repository, opts: CreateOptions): Promise<ConvertResult> {
  const { logger } = opts;
  const resolved = await resolveImages(src, { platform: opts.platform, all: opts.allPlatforms });
  const created = await createIndexes(src, resolved.images, { ...opts, format: 'v2' });
  const indexFor = new Map(created.map((c) => [c.image.digest, c]));

  // Every manifest of the source (all platforms), re-serialised.
  let entries: Descriptor[];
  if (resolved.index !== undefined) entries = resolved.index.manifests;
  else entries = [{ ...resolved.top, platform: resolved.images[0]!.platform }];

  const outManifests: Descriptor[] = [];
  const sociEntries: Descriptor[] = [];
  for (const entry of entries) {
    const fetched = await src.fetchManifest(entry);
    if (fetched.parsed.kind !== 'manifest' || entry.artifactType !== undefined || isIndexMediaType(entry.mediaType)) {
      // Attestations, signatures, nested indexes: copied unchanged.
      if (fetched.parsed.kind === 'manifest') {
        await copyBlob(src, dst, fetched.parsed.manifest.config);
        for (const l of fetched.parsed.manifest.layers) await copyBlob(src, dst, l);
      }
      if (entry.artifactType === MEDIA_TYPE_SOCI_INDEX_V2) continue; // an existing SOCI index: replaced below
      await dst.pushManifest(fetched.bytes, fetched.descriptor.mediaType);
      outManifests.push(entry);
      continue;
    }
    const m = fetched.parsed.manifest;
    await copyBlob(src, dst, m.config);
    for (const l of m.layers) await copyBlob(src, dst, l);
    const made = indexFor.get(entry.digest);
    const annotations: Record<string, string> = { ...(m.annotations ?? {}) };
    if (made !== undefined) annotations[ANNOTATION_INDEX_DIGEST] = made.record.digest;
    const rewritten: ImageManifest = {
      schemaVersion: 2,
      mediaType: OCI_MANIFEST,
      config: { ...m.config, mediaType: MEDIA_TYPE_OCI_CONFIG },
      layers: m.layers,
      ...(m.subject !== undefined ? { subject: m.subject } : {}),
      ...(Object.keys(annotations).length > 0 ? { annotations } : {}),
    };
    const bytes = Buffer.from(JSON.stringify(rewritten));
    const pushed = await dst.pushManifest(bytes, OCI_MANIFEST);
    const desc: Descriptor = { mediaType: OCI_MANIFEST, digest: pushed.descriptor.digest, size: bytes.length };
    if (entry.platform !== undefined) desc.platform = entry.platform;
    if (rewritten.annotations !== undefined) desc.annotations = rewritten.annotations;
    outManifests.push(desc);
    if (made !== undefined) {
      await pushIndexArtifacts(dst, opts.store, made.record, logger);
      const sociDesc: Descriptor = {
        mediaType: OCI_MANIFEST,
        digest: made.record.digest,
        size: made.record.size,
        artifactType: MEDIA_TYPE_SOCI_INDEX_V2,
        platform: made.platform,
        annotations: { [ANNOTATION_IMAGE_MANIFEST_DIGEST]: desc.digest },
      };
      sociEntries.push(sociDesc);
      made.record = await opts.store.addIndexRecord({ ...made.record, imageRef: dst.ref.toString(), imageManifestDigest: desc.digest });
      made.image = desc;
    }
  }
  const index: ImageIndex = { schemaVersion: 2, mediaType: MEDIA_TYPE_OCI_INDEX, manifests: [...outManifests, ...sociEntries] };
  if (resolved.index?.annotations !== undefined) index.annotations = resolved.index.annotations;
  const bytes = Buffer.from(JSON.stringify(index));
  const tag = dst.ref.tag ?? 'latest';
  const pushed = await dst.pushManifest(bytes, MEDIA_TYPE_OCI_INDEX, tag);
  logger.info('SOCI-enabled image pushed', { image: dst.ref.toString(), index: pushed.descriptor.digest, platforms: created.map((c) => formatPlatform(c.platform)) });
  return { index: pushed.descriptor, created };
}

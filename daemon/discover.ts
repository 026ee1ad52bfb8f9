/**
 * Finding the SOCI index of an image (one platform-specific image manifest), in this order:
 *
 * 1. `store`: the local artifact store (`soci-ts create` records, pushed or not): the newest
 *    record (by `createdAt`) for the manifest digest.
 * 2. `v2`: a SOCI-enabled image (`soci-ts convert`, upstream `soci convert`): the manifest
 *    body's `com.amazon.soci.index-digest` annotation, else an entry of the image index it was
 *    selected from with artifact type `application/vnd.amazon.soci.index.v2+json` and
 *    `com.amazon.soci.image-manifest-digest` naming the manifest.
 * 3. `v1`: referrers of the manifest digest with artifact type
 *    `application/vnd.amazon.soci.index.v1+json` (the referrers API, or the `sha256-<hex>`
 *    fallback tag where the registry has none). Of several, the newest by the
 *    `org.opencontainers.image.created` annotation wins; entries without it count as older
 *    than any with it; ties go to the later entry in the list (pushers append to the fallback
 *    tag, so later is newer), so the choice is the same for the same registry answer.
 *
 * The first source that has an index is used; an index that is there but unusable (not a
 * SOCI index, for another image, missing from the store) is a `bad-index` error rather than
 * a silent fall-through, so what gets mounted never depends on which source happened to fail.
 *
 * Pull modes (`pullModes`, the daemon's `[pull_modes.soci_v1]` / `[pull_modes.soci_v2]`
 * `enable`): an index of a disabled version is never used, wherever it is found (store records
 * of that format are passed over; the v2 annotation is not followed; the referrers are not
 * asked). Only when no enabled mode has an index does discovery look at the disabled ones
 * (the v2 annotation costs nothing; for v1, one referrers request without retries), to say
 * why: `mode-disabled`, naming the version, the index and the config key that enables it,
 * rather than `no-index`. An explicit index digest is used whatever its version (as upstream).
 *
 * zTOCs are fetched lazily, once each (`loadZtoc`): from the store when it has the blob, else
 * from the registry (the fetcher checks the digest); fetched zTOCs are put into the store so
 * the next mount needs no network for them.
 */
import {
  FetcherError,
  type Descriptor,
  type ImageIndex,
  type ImageManifest,
  type Logger,
  type Repository,
} from '../fetcher/index.js';
import {
  ANNOTATION_IMAGE_MANIFEST_DIGEST,
  ANNOTATION_INDEX_DIGEST,
  MEDIA_TYPE_OCI_MANIFEST,
  MEDIA_TYPE_SOCI_INDEX_V1,
  MEDIA_TYPE_SOCI_INDEX_V2,
  ZtocError,
  parseSociIndex,
  readZtoc,
  type LayerIndex,
  type ParsedSociIndex,
  type SociIndexVersion,
} from '../ztoc/index.js';
import { StoreError, type ArtifactStore } from './store.js';

/** Where the index was found; `explicit`: named by the caller (e.g. a snapshot label). */
export type IndexSource = 'store' | 'v2' | 'v1' | 'explicit';

export type DiscoverErrorKind =
  /** No source has an index for the image. */
  | 'no-index'
  /** No enabled pull mode has an index, but a disabled one has (see `DiscoverError.disabled`). */
  | 'mode-disabled'
  /** An index was found but cannot be used (malformed, not a SOCI index, for another image, missing). */
  | 'bad-index'
  /** The index has no zTOC for the layer asked about. */
  | 'no-ztoc'
  /** A zTOC could not be fetched or is malformed or does not fit its layer. */
  | 'bad-ztoc';

/** Which SOCI index versions discovery may use. */
export interface PullModes {
  v1: boolean;
  v2: boolean;
}

export const DEFAULT_PULL_MODES: Readonly<PullModes> = Object.freeze({ v1: true, v2: true });

/** The config section whose `enable` turns a version's discovery on. */
export const PULL_MODE_SECTION: Readonly<Record<SociIndexVersion, string>> = Object.freeze({ v1: '[pull_modes.soci_v1]', v2: '[pull_modes.soci_v2]' });

/** An index discovery saw but did not use because its version is disabled. */
export interface DisabledIndex {
  version: SociIndexVersion;
  digest: string;
  /** Where it was seen, in words. */
  where: string;
}

/** Discovery failed. Names the image (or zTOC) and the reason. */
export class DiscoverError extends Error {
  readonly kind: DiscoverErrorKind;
  /** The image (`repo@digest`), index or zTOC the error is about. */
  readonly subject: string;
  /** For `mode-disabled`: the indexes of disabled versions. */
  readonly disabled: readonly DisabledIndex[];
  constructor(kind: DiscoverErrorKind, subject: string, reason: string, options?: { cause?: unknown; disabled?: readonly DisabledIndex[] }) {
    super(`${subject}: ${reason}`, options);
    this.name = 'DiscoverError';
    this.kind = kind;
    this.subject = subject;
    this.disabled = options?.disabled ?? [];
  }

  /** The message without the subject in front. */
  get reason(): string {
    return this.message.startsWith(`${this.subject}: `) ? this.message.slice(this.subject.length + 2) : this.message;
  }
}

/** The image to find an index for: a platform-specific manifest, and the index it came from. */
export interface DiscoverTarget {
  descriptor: Descriptor;
  manifest: ImageManifest;
  /** The image index the manifest was selected from (v2 SOCI indexes are listed there). */
  index?: ImageIndex;
}

export interface DiscoverOptions {
  /** The local artifact store: searched first, and keeps fetched zTOCs. */
  store?: ArtifactStore;
  logger?: Logger;
  /** Sources to try, in order (default: store, v2, v1). */
  sources?: readonly IndexSource[];
  /** Largest zTOC fetched (default 512 MiB). */
  maxZtocBytes?: number;
  /**
   * Use exactly this SOCI index manifest (from the store when it has the blob, else the
   * registry) instead of searching the sources; an unusable one is `bad-index`. Used whatever
   * the pull modes say.
   */
  indexDigest?: string;
  /** Which index versions may be used (default: both). */
  pullModes?: PullModes;
}

const DEFAULT_SOURCES: readonly IndexSource[] = ['store', 'v2', 'v1'];
const DEFAULT_MAX_ZTOC_BYTES = 512 << 20;
const ANNOTATION_CREATED = 'org.opencontainers.image.created';

/** A SOCI index found for an image; zTOCs load on demand. */
export class DiscoveredIndex {
  private readonly loaded = new Map<string, Promise<LayerIndex>>();
  private readonly layers: ReadonlyMap<string, Descriptor>;

  constructor(
    private readonly repo: Repository,
    readonly image: Descriptor,
    manifest: ImageManifest,
    readonly source: IndexSource,
    /** The SOCI index manifest's descriptor. */
    readonly descriptor: Descriptor,
    readonly parsed: ParsedSociIndex,
    /** zTOC descriptors by image layer digest (only layers of this image). */
    readonly ztocs: ReadonlyMap<string, Descriptor>,
    private readonly store: ArtifactStore | undefined,
    private readonly logger: Logger,
    private readonly maxZtocBytes: number,
  ) {
    this.layers = new Map(manifest.layers.map((l) => [l.digest, l]));
  }

  get digest(): string {
    return this.descriptor.digest;
  }

  get version(): SociIndexVersion {
    return this.parsed.version;
  }

  /** The zTOC descriptor of an image layer, if the index has one. */
  ztocFor(layerDigest: string): Descriptor | undefined {
    return this.ztocs.get(layerDigest);
  }

  /**
   * The parsed zTOC of an image layer (fetched once; concurrent callers share the fetch).
   * Rejects with DiscoverError `no-ztoc` when the index has none, `bad-ztoc` when it cannot be
   * fetched, is malformed or indexes a blob of another size than the layer.
   */
  loadZtoc(layerDigest: string): Promise<LayerIndex> {
    let p = this.loaded.get(layerDigest);
    if (p === undefined) {
      p = this.fetchZtoc(layerDigest);
      this.loaded.set(layerDigest, p);
      p.catch(() => this.loaded.delete(layerDigest)); // a later call may try again
    }
    return p;
  }

  private async fetchZtoc(layerDigest: string): Promise<LayerIndex> {
    const desc = this.ztocs.get(layerDigest);
    const layer = this.layers.get(layerDigest);
    if (desc === undefined || layer === undefined) {
      throw new DiscoverError('no-ztoc', `${this.repo.ref.name}@${layerDigest}`, `SOCI index ${this.digest} has no zTOC for this layer`);
    }
    return loadZtoc(this.repo, desc, layer, { store: this.store, logger: this.logger, maxZtocBytes: this.maxZtocBytes });
  }
}

/**
 * The parsed zTOC `desc` of the image layer `layer`: from the store when it has the blob intact,
 * else from the registry (digest-checked by the fetcher; then kept in the store). Rejects with
 * DiscoverError `bad-ztoc` when it cannot be fetched, is malformed or indexes a blob of another
 * size than the layer.
 */
export async function loadZtoc(
  repo: Repository,
  desc: Descriptor,
  layer: Descriptor,
  opts: { store?: ArtifactStore; logger?: Logger; maxZtocBytes?: number } = {},
): Promise<LayerIndex> {
  const subject = `zTOC ${desc.digest} (layer ${layer.digest})`;
  const bytes = await ztocBytes(repo, desc, subject, opts);
  let index: LayerIndex;
  try {
    index = readZtoc(bytes, subject);
  } catch (err) {
    throw new DiscoverError('bad-ztoc', subject, `malformed: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
  if (index.ztoc.compressedArchiveSize !== layer.size) {
    throw new DiscoverError('bad-ztoc', subject, `indexes a blob of ${index.ztoc.compressedArchiveSize} bytes, but the layer has ${layer.size}`);
  }
  return index;
}

/**
 * Fetches a layer's zTOC into the store ahead of its mount (the FUSE manager then reads it from
 * there), unless the store has it. Digest-checked by the fetcher; not parsed (loadZtoc does).
 */
export async function prefetchZtoc(repo: Repository, desc: Descriptor, layer: Descriptor, opts: { store: ArtifactStore; logger?: Logger; maxZtocBytes?: number }): Promise<void> {
  await ztocBytes(repo, desc, `zTOC ${desc.digest} (layer ${layer.digest})`, opts);
}

/** A zTOC's bytes: the store's copy when it is intact, else the registry's (then kept in the store). */
async function ztocBytes(repo: Repository, desc: Descriptor, subject: string, opts: { store?: ArtifactStore; logger?: Logger; maxZtocBytes?: number }): Promise<Uint8Array> {
  const logger = opts.logger ?? repo.client.logger;
  const store = opts.store;
  const maxZtocBytes = opts.maxZtocBytes ?? DEFAULT_MAX_ZTOC_BYTES;
  if (store !== undefined) {
    try {
      if (await store.hasBlob(desc.digest)) return await store.readBlob(desc.digest, { size: desc.size });
    } catch (err) {
      // A corrupt copy has been removed by the store; fetch it again.
      logger.warn('zTOC in the store unusable; fetching it from the registry', { ztoc: desc.digest, error: err });
    }
  }
  if (desc.size > maxZtocBytes) throw new DiscoverError('bad-ztoc', subject, `${desc.size} bytes is over the ${maxZtocBytes}-byte limit`);
  let bytes: Uint8Array;
  try {
    bytes = await repo.fetchBlob(desc, maxZtocBytes);
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new DiscoverError('bad-ztoc', subject, `cannot fetch it from ${repo.ref.name}: ${reason}`, { cause: err });
  }
  if (store !== undefined) {
    await store.putBlob(bytes, desc.digest).catch((err: unknown) => logger.warn('cannot keep the zTOC in the store', { ztoc: desc.digest, error: err }));
  }
  return bytes;
}

function imageSubject(repo: Repository, image: Descriptor): string {
  return `${repo.ref.name}@${image.digest}`;
}

/** Parses a SOCI index manifest and keeps the zTOCs of layers of this image. */
function parseIndex(bytes: Uint8Array, indexDigest: string, target: DiscoverTarget, subject: string, logger: Logger): { parsed: ParsedSociIndex; ztocs: Map<string, Descriptor> } {
  let parsed: ParsedSociIndex;
  try {
    parsed = parseSociIndex(bytes, `SOCI index ${indexDigest}`);
  } catch (err) {
    throw new DiscoverError('bad-index', subject, `SOCI index ${indexDigest} is malformed: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
  if (parsed.version === 'v1' && parsed.manifest.subject !== undefined && parsed.manifest.subject.digest !== target.descriptor.digest) {
    throw new DiscoverError('bad-index', subject, `SOCI index ${indexDigest} is for image manifest ${parsed.manifest.subject.digest}, not this one`);
  }
  const layerDigests = new Set(target.manifest.layers.map((l) => l.digest));
  const ztocs = new Map<string, Descriptor>();
  for (const z of parsed.ztocs) {
    if (!layerDigests.has(z.layerDigest)) {
      logger.warn('SOCI index has a zTOC for a layer the image does not have; ignored', { index: indexDigest, layer: z.layerDigest });
      continue;
    }
    ztocs.set(z.layerDigest, z.ztoc);
  }
  for (const u of parsed.unknown) logger.info('SOCI index lists an artifact of an unknown media type; ignored', { index: indexDigest, mediaType: u.mediaType, digest: u.digest });
  if (ztocs.size === 0) throw new DiscoverError('bad-index', subject, `SOCI index ${indexDigest} has no zTOC for any layer of this image`);
  return { parsed, ztocs };
}

/** Newest first by the created annotation, then later list position first. */
export function pickNewest(candidates: readonly Descriptor[]): Descriptor | undefined {
  let best: { d: Descriptor; t: number; i: number } | undefined;
  candidates.forEach((d, i) => {
    const text = d.annotations?.[ANNOTATION_CREATED];
    const parsed = text === undefined ? Number.NaN : Date.parse(text);
    const t = Number.isFinite(parsed) ? parsed : Number.NEGATIVE_INFINITY;
    if (best === undefined || t > best.t || (t === best.t && i > best.i)) best = { d, t, i };
  });
  return best?.d;
}

async function fromStore(
  repo: Repository,
  target: DiscoverTarget,
  store: ArtifactStore,
  logger: Logger,
  modes: PullModes,
  disabled: DisabledIndex[],
): Promise<{ descriptor: Descriptor; bytes: Uint8Array } | undefined> {
  const subject = imageSubject(repo, target.descriptor);
  const all = await store.listIndexRecords({ imageManifestDigest: target.descriptor.digest });
  const records = all.filter((r) => modes[r.format]);
  for (const version of ['v1', 'v2'] as const) {
    const newest = all.find((r) => r.format === version);
    if (!modes[version] && newest !== undefined) disabled.push({ version, digest: newest.digest, where: `the local store ${store.root}` });
  }
  const record = records[0];
  if (record === undefined) return undefined;
  if (records.length > 1) logger.debug('several indexes in the store for the image; using the newest', { image: target.descriptor.digest, index: record.digest, others: records.slice(1).map((r) => r.digest) });
  try {
    const bytes = await store.readBlob(record.digest, { size: record.size });
    return { descriptor: { mediaType: record.mediaType, digest: record.digest, size: record.size, artifactType: record.artifactType }, bytes };
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new DiscoverError('bad-index', subject, `the store ${store.root} records SOCI index ${record.digest} for this image, but cannot read it: ${reason}`, { cause: err });
  }
}

function v2Candidate(target: DiscoverTarget): Descriptor | string | undefined {
  const named = target.manifest.annotations?.[ANNOTATION_INDEX_DIGEST] ?? target.descriptor.annotations?.[ANNOTATION_INDEX_DIGEST];
  const entries = target.index?.manifests ?? [];
  if (named !== undefined) return entries.find((e) => e.digest === named) ?? named;
  const listed = entries.filter((e) => e.artifactType === MEDIA_TYPE_SOCI_INDEX_V2 && e.annotations?.[ANNOTATION_IMAGE_MANIFEST_DIGEST] === target.descriptor.digest);
  return pickNewest(listed);
}

async function fetchIndexManifest(repo: Repository, ref: Descriptor | string, subject: string, source: IndexSource): Promise<{ descriptor: Descriptor; bytes: Uint8Array }> {
  const digest = typeof ref === 'string' ? ref : ref.digest;
  try {
    const m = await repo.fetchManifest(ref);
    if (m.parsed.kind !== 'manifest') throw new DiscoverError('bad-index', subject, `SOCI index ${digest} (${source}) is an image index, not a manifest`);
    return { descriptor: { ...m.descriptor, artifactType: m.parsed.manifest.config.mediaType }, bytes: m.bytes };
  } catch (err) {
    if (err instanceof DiscoverError) throw err;
    const reason = err instanceof Error ? err.message : String(err);
    throw new DiscoverError('bad-index', subject, `cannot fetch SOCI index ${digest} (${source}): ${reason}`, { cause: err });
  }
}

/**
 * Finds the SOCI index of one image manifest (see the module comment for the order and the
 * choice among several). Rejects with DiscoverError: `no-index` when no source has one,
 * `bad-index` when the one found cannot be used. Registry failures while looking (the
 * referrers request) reject with the fetcher's error.
 */
export async function discoverIndex(repo: Repository, target: DiscoverTarget, opts: DiscoverOptions = {}): Promise<DiscoveredIndex> {
  const logger = opts.logger ?? repo.client.logger;
  const subject = imageSubject(repo, target.descriptor);
  const modes = opts.pullModes ?? DEFAULT_PULL_MODES;
  const tried: string[] = [];
  const disabled: DisabledIndex[] = [];
  const fallbackTag = `fallback tag ${target.descriptor.digest.replace(':', '-')}`;
  if (opts.indexDigest !== undefined) {
    let found: { descriptor: Descriptor; bytes: Uint8Array } | undefined;
    if (opts.store !== undefined) {
      try {
        if (await opts.store.hasBlob(opts.indexDigest)) {
          const bytes = await opts.store.readBlob(opts.indexDigest);
          const parsedTop = JSON.parse(Buffer.from(bytes).toString('utf8')) as { mediaType?: unknown; config?: { mediaType?: unknown } };
          found = {
            descriptor: {
              mediaType: typeof parsedTop.mediaType === 'string' ? parsedTop.mediaType : MEDIA_TYPE_OCI_MANIFEST,
              digest: opts.indexDigest,
              size: bytes.length,
              ...(typeof parsedTop.config?.mediaType === 'string' ? { artifactType: parsedTop.config.mediaType } : {}),
            },
            bytes,
          };
        }
      } catch (err) {
        logger.warn('SOCI index in the store unusable; fetching it from the registry', { index: opts.indexDigest, error: err });
        found = undefined;
      }
    }
    found ??= await fetchIndexManifest(repo, opts.indexDigest, subject, 'explicit');
    const { parsed, ztocs } = parseIndex(found.bytes, found.descriptor.digest, target, subject, logger);
    logger.info('SOCI index found', { image: target.descriptor.digest, index: found.descriptor.digest, source: 'explicit', version: parsed.version, ztocs: ztocs.size });
    return new DiscoveredIndex(repo, target.descriptor, target.manifest, 'explicit', found.descriptor, parsed, ztocs, opts.store, logger, opts.maxZtocBytes ?? DEFAULT_MAX_ZTOC_BYTES);
  }
  const sources = opts.sources ?? DEFAULT_SOURCES;
  for (const source of sources) {
    let found: { descriptor: Descriptor; bytes: Uint8Array } | undefined;
    if (source === 'store') {
      if (opts.store === undefined) continue;
      found = await fromStore(repo, target, opts.store, logger, modes, disabled);
      if (found === undefined) tried.push(`none in the local store ${opts.store.root}${modes.v1 && modes.v2 ? '' : ' of an enabled version'}`);
    } else if (source === 'v2') {
      const candidate = v2Candidate(target);
      if (candidate === undefined) tried.push(`no ${ANNOTATION_INDEX_DIGEST} annotation (not a SOCI-enabled image${modes.v2 ? '' : '; v2 discovery is disabled anyway'})`);
      else if (!modes.v2) {
        disabled.push({ version: 'v2', digest: typeof candidate === 'string' ? candidate : candidate.digest, where: `the image's ${ANNOTATION_INDEX_DIGEST} annotation (a SOCI-enabled image)` });
        tried.push(`v2 discovery is disabled (${PULL_MODE_SECTION.v2} enable = false)`);
      } else found = await fetchIndexManifest(repo, candidate, subject, 'v2');
    } else {
      if (!modes.v1) {
        tried.push(`v1 discovery is disabled (${PULL_MODE_SECTION.v1} enable = false)`);
        continue;
      }
      const referrers = await repo.referrers(target.descriptor.digest, MEDIA_TYPE_SOCI_INDEX_V1);
      const candidates = referrers.descriptors.filter((d) => d.mediaType === MEDIA_TYPE_OCI_MANIFEST);
      const chosen = pickNewest(candidates);
      if (chosen !== undefined) {
        if (candidates.length > 1) logger.debug('several v1 SOCI indexes; using the newest', { image: target.descriptor.digest, index: chosen.digest, count: candidates.length });
        found = await fetchIndexManifest(repo, chosen, subject, 'v1');
      } else tried.push(`no v1 SOCI index among its referrers (${referrers.source === 'api' ? 'referrers API' : fallbackTag})`);
    }
    if (found === undefined) continue;
    const { parsed, ztocs } = parseIndex(found.bytes, found.descriptor.digest, target, subject, logger);
    if (source === 'v2' && parsed.version !== 'v2') logger.warn('the SOCI-enabled image names a v1 index', { index: found.descriptor.digest });
    if (!modes[parsed.version]) {
      // A v1 index named by a SOCI-enabled image's annotation, or a store record whose format says otherwise.
      disabled.push({ version: parsed.version, digest: found.descriptor.digest, where: source === 'store' ? `the local store ${opts.store?.root ?? ''}` : SOURCE_WORDS[source] });
      tried.push(`${SOURCE_WORDS[source]} names a ${parsed.version} index, and ${parsed.version} discovery is disabled`);
      continue;
    }
    logger.info('SOCI index found', { image: target.descriptor.digest, index: found.descriptor.digest, source, version: parsed.version, ztocs: ztocs.size });
    return new DiscoveredIndex(repo, target.descriptor, target.manifest, source, found.descriptor, parsed, ztocs, opts.store, logger, opts.maxZtocBytes ?? DEFAULT_MAX_ZTOC_BYTES);
  }
  // Nothing usable. A disabled v1 is looked at now, only to say why.
  if (!modes.v1 && sources.includes('v1')) {
    try {
      const referrers = await repo.referrers(target.descriptor.digest, MEDIA_TYPE_SOCI_INDEX_V1, { attempts: 1 });
      const chosen = pickNewest(referrers.descriptors.filter((d) => d.mediaType === MEDIA_TYPE_OCI_MANIFEST));
      if (chosen !== undefined) disabled.push({ version: 'v1', digest: chosen.digest, where: `its referrers (${referrers.source === 'api' ? 'referrers API' : fallbackTag})` });
    } catch (err) {
      logger.debug('cannot look for a v1 index (v1 discovery is disabled anyway)', { image: target.descriptor.digest, error: err });
      tried.push(`(whether it has a v1 index could not be checked: ${err instanceof Error ? err.message : String(err)})`);
    }
  }
  const unique = disabled.filter((d, i) => disabled.findIndex((e) => e.version === d.version && e.digest === d.digest) === i);
  if (unique.length > 0) {
    const what = unique.map((d) => `a ${d.version} index (${d.digest}, in ${d.where})`).join(' and ');
    const enable = [...new Set(unique.map((d) => d.version))].map((v) => `set enable = true under ${PULL_MODE_SECTION[v]} in the daemon config`).join(' and ');
    throw new DiscoverError('mode-disabled', subject, `SOCI index only in a disabled pull mode: the image has ${what}, but ${[...new Set(unique.map((d) => d.version))].join(' and ')} discovery is disabled; to use it, ${enable} (looked: ${tried.join('; ')})`, {
      disabled: unique,
    });
  }
  throw new DiscoverError('no-index', subject, `no SOCI index: ${tried.join('; ')}`);
}

const SOURCE_WORDS: Record<IndexSource, string> = {
  store: 'the local store',
  v2: `the image's ${ANNOTATION_INDEX_DIGEST} annotation`,
  v1: "the image's v1 referrers",
  explicit: 'the index digest given explicitly',
};

/** Errors of discovery are the user's to act on (exit code 1). */
export function isDiscoverUserError(err: unknown): boolean {
  return err instanceof DiscoverError || err instanceof FetcherError || err instanceof StoreError || err instanceof ZtocError;
}

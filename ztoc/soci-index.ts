/**
 * SOCI index manifests (v1 and v2, `../shared/docs/soci-format.md` §5): an OCI
 * image manifest whose config descriptor carries the index type and whose
 * layers are the zTOC blobs, each annotated with the image layer it indexes.
 */
import { createHash } from 'node:crypto';
import { IndexFormatError } from './errors.js';

export const MEDIA_TYPE_SOCI_INDEX_V1 = 'application/vnd.amazon.soci.index.v1+json';
export const MEDIA_TYPE_SOCI_INDEX_V2 = 'application/vnd.amazon.soci.index.v2+json';
export const MEDIA_TYPE_ZTOC = 'application/octet-stream';
export const MEDIA_TYPE_PREFETCH = 'application/vnd.amazon.soci.prefetch.v1+json';
export const MEDIA_TYPE_OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';

export const ANNOTATION_LAYER_DIGEST = 'com.amazon.soci.image-layer-digest';
export const ANNOTATION_LAYER_MEDIA_TYPE = 'com.amazon.soci.image-layer-mediaType';
export const ANNOTATION_SPAN_SIZE = 'com.amazon.soci.span-size';
export const ANNOTATION_BUILD_TOOL = 'com.amazon.soci.build-tool-identifier';
export const ANNOTATION_DISABLE_XATTRS = 'com.amazon.soci.disable-xattrs';
export const ANNOTATION_IMAGE_MANIFEST_DIGEST = 'com.amazon.soci.image-manifest-digest';
export const ANNOTATION_INDEX_DIGEST = 'com.amazon.soci.index-digest';

/** The two-byte config blob `{}` every SOCI index points at; it must exist in the registry. */
export const EMPTY_CONFIG_BYTES = new TextEncoder().encode('{}');
export const EMPTY_CONFIG_DIGEST = 'sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a';

export type SociIndexVersion = 'v1' | 'v2';

export interface Platform {
  architecture: string;
  os: string;
  'os.version'?: string;
  'os.features'?: string[];
  variant?: string;
}

/** An OCI content descriptor (fields in the order Go's encoder writes them). */
export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  urls?: string[];
  annotations?: Record<string, string>;
  platform?: Platform;
  artifactType?: string;
}

export interface SociIndexManifest {
  schemaVersion: 2;
  mediaType: typeof MEDIA_TYPE_OCI_MANIFEST;
  config: Descriptor;
  /** zTOC descriptors (and optional prefetch artifacts), in image layer order. */
  layers: Descriptor[];
  subject?: Descriptor;
  annotations?: Record<string, string>;
}

export interface IndexedLayer {
  /** The image layer's descriptor. */
  layer: Pick<Descriptor, 'mediaType' | 'digest' | 'size'>;
  /** The zTOC blob's digest and size. */
  ztoc: { digest: string; size: number };
  spanSize: number;
  /** Set the disable-xattrs annotation (the layer has no xattrs and no opaque markers). */
  disableXattrs?: boolean;
}

export interface BuildIndexOptions {
  version: SociIndexVersion;
  layers: readonly IndexedLayer[];
  /** v1 only: the image manifest the index applies to. */
  subject?: Pick<Descriptor, 'mediaType' | 'digest' | 'size'>;
  buildToolIdentifier: string;
  prefetch?: readonly Descriptor[];
}

export interface SerializedIndex {
  manifest: SociIndexManifest;
  bytes: Uint8Array;
  descriptor: Descriptor;
}

export function indexMediaType(version: SociIndexVersion): string {
  return version === 'v1' ? MEDIA_TYPE_SOCI_INDEX_V1 : MEDIA_TYPE_SOCI_INDEX_V2;
}

export function sha256Digest(bytes: Uint8Array): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

export function buildSociIndex(options: BuildIndexOptions): SerializedIndex {
  if (options.layers.length === 0) throw new IndexFormatError('SOCI index', 'no layer has a zTOC: the index would be empty');
  if (options.version === 'v1' && !options.subject) throw new IndexFormatError('SOCI index', 'a v1 index needs a subject');
  if (options.version === 'v2' && options.subject) throw new IndexFormatError('SOCI index', 'a v2 index has no subject');
  const artifactType = indexMediaType(options.version);
  const layers: Descriptor[] = options.layers.map((l) => {
    const annotations: Record<string, string> = {
      [ANNOTATION_LAYER_DIGEST]: l.layer.digest,
      [ANNOTATION_LAYER_MEDIA_TYPE]: l.layer.mediaType,
      [ANNOTATION_SPAN_SIZE]: String(l.spanSize),
    };
    if (l.disableXattrs) annotations[ANNOTATION_DISABLE_XATTRS] = 'true';
    return { mediaType: MEDIA_TYPE_ZTOC, digest: l.ztoc.digest, size: l.ztoc.size, annotations: sortKeys(annotations) };
  });
  for (const p of options.prefetch ?? []) layers.push(p);
  const manifest: SociIndexManifest = {
    schemaVersion: 2,
    mediaType: MEDIA_TYPE_OCI_MANIFEST,
    config: { mediaType: artifactType, digest: EMPTY_CONFIG_DIGEST, size: EMPTY_CONFIG_BYTES.length },
    layers,
    ...(options.subject
      ? { subject: { mediaType: options.subject.mediaType, digest: options.subject.digest, size: options.subject.size } }
      : {}),
    annotations: { [ANNOTATION_BUILD_TOOL]: options.buildToolIdentifier },
  };
  const bytes = new TextEncoder().encode(JSON.stringify(manifest));
  return {
    manifest,
    bytes,
    descriptor: { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: sha256Digest(bytes), size: bytes.length, artifactType },
  };
}

/** Go's encoding/json writes map keys sorted; do the same so equal indexes are equal bytes. */
function sortKeys(record: Record<string, string>): Record<string, string> {
  return Object.fromEntries(Object.entries(record).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

const DIGEST_RE = /^sha256:[0-9a-f]{64}$/;

export interface ParsedSociIndex {
  version: SociIndexVersion;
  manifest: SociIndexManifest;
  /** zTOC entries by image layer digest. */
  ztocs: Array<{ layerDigest: string; layerMediaType: string; ztoc: Descriptor; spanSize?: number; disableXattrs: boolean }>;
  prefetch: Descriptor[];
  /** Descriptors of media types we do not know (skipped, reported so callers can log them). */
  unknown: Descriptor[];
}

/** Parse and validate a SOCI index manifest (v1 or v2). */
export function parseSociIndex(bytes: Uint8Array | string, subject = 'SOCI index'): ParsedSociIndex {
  const fail = (reason: string): never => {
    throw new IndexFormatError(subject, reason);
  };
  let doc: unknown;
  try {
    doc = JSON.parse(typeof bytes === 'string' ? bytes : new TextDecoder().decode(bytes));
  } catch (cause) {
    throw new IndexFormatError(subject, 'not JSON', { cause });
  }
  if (!isObject(doc)) return fail('not a JSON object');
  if (doc.schemaVersion !== 2) fail(`schemaVersion is ${JSON.stringify(doc.schemaVersion)}, not 2`);
  if (doc.mediaType !== undefined && doc.mediaType !== MEDIA_TYPE_OCI_MANIFEST) {
    fail(`mediaType is ${JSON.stringify(doc.mediaType)}, not ${MEDIA_TYPE_OCI_MANIFEST}`);
  }
  const config = parseDescriptor(doc.config, 'config', fail);
  const version: SociIndexVersion =
    config.mediaType === MEDIA_TYPE_SOCI_INDEX_V1
      ? 'v1'
      : config.mediaType === MEDIA_TYPE_SOCI_INDEX_V2
        ? 'v2'
        : fail(`config media type ${JSON.stringify(config.mediaType)} is not a SOCI index type`);
  if (!Array.isArray(doc.layers)) return fail('layers is not an array');
  const layers = doc.layers.map((l, i) => parseDescriptor(l, `layers[${i}]`, fail));
  const subjectDesc = doc.subject === undefined ? undefined : parseDescriptor(doc.subject, 'subject', fail);
  if (doc.annotations !== undefined && !isStringRecord(doc.annotations)) fail('annotations are not a string map');
  const ztocs: ParsedSociIndex['ztocs'] = [];
  const prefetch: Descriptor[] = [];
  const unknown: Descriptor[] = [];
  for (const [i, d] of layers.entries()) {
    const layerDigest = d.annotations?.[ANNOTATION_LAYER_DIGEST];
    if (d.mediaType === MEDIA_TYPE_ZTOC) {
      if (!layerDigest || !DIGEST_RE.test(layerDigest)) fail(`layers[${i}] has no valid ${ANNOTATION_LAYER_DIGEST} annotation`);
      const spanText = d.annotations?.[ANNOTATION_SPAN_SIZE];
      const spanSize = spanText === undefined ? undefined : Number(spanText);
      if (spanSize !== undefined && !(Number.isSafeInteger(spanSize) && spanSize > 0)) {
        fail(`layers[${i}] has span size annotation ${JSON.stringify(spanText)}`);
      }
      ztocs.push({
        layerDigest: layerDigest as string,
        layerMediaType: d.annotations?.[ANNOTATION_LAYER_MEDIA_TYPE] ?? '',
        ztoc: d,
        spanSize,
        disableXattrs: d.annotations?.[ANNOTATION_DISABLE_XATTRS] === 'true',
      });
    } else if (d.mediaType === MEDIA_TYPE_PREFETCH) prefetch.push(d);
    else unknown.push(d);
  }
  const manifest: SociIndexManifest = {
    schemaVersion: 2,
    mediaType: MEDIA_TYPE_OCI_MANIFEST,
    config,
    layers,
    ...(subjectDesc ? { subject: subjectDesc } : {}),
    ...(doc.annotations ? { annotations: doc.annotations as Record<string, string> } : {}),
  };
  return { version, manifest, ztocs, prefetch, unknown };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function isStringRecord(v: unknown): v is Record<string, string> {
  return isObject(v) && Object.values(v).every((x) => typeof x === 'string');
}

function parseDescriptor(v: unknown, what: string, fail: (reason: string) => never): Descriptor {
  if (!isObject(v)) return fail(`${what} is not a descriptor object`);
  if (typeof v.mediaType !== 'string' || v.mediaType === '') fail(`${what} has no mediaType`);
  if (typeof v.digest !== 'string' || !DIGEST_RE.test(v.digest)) fail(`${what} digest ${JSON.stringify(v.digest)} is not a sha256 digest`);
  if (typeof v.size !== 'number' || !Number.isSafeInteger(v.size) || v.size < 0) fail(`${what} size ${JSON.stringify(v.size)} is invalid`);
  if (v.annotations !== undefined && !isStringRecord(v.annotations)) fail(`${what} annotations are not a string map`);
  return v as unknown as Descriptor;
}

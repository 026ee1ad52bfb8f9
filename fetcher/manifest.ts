/**
 * OCI / Docker v2 image manifests and indexes: media types, strict parsing and platform selection.
 *
 * Everything here is pure (bytes in, structures out). Parsing is strict on purpose: a registry is
 * untrusted input, so every descriptor is checked (digest grammar, size, media type, URLs,
 * annotations) and the returned objects hold only the fields we know, rebuilt from checked
 * values. Unknown fields are ignored, as the OCI image spec asks.
 *
 * Platform semantics follow containerd's `platforms` package: `Normalize`, the matcher (os,
 * architecture and variant equal after normalisation; the image's os.features a subset of the
 * wanted ones) and `Only` (the wanted platform first, then what it can also run: older arm64
 * revisions and 32-bit arm for arm64, older arm variants for arm, older amd64 levels and 386 for
 * amd64).
 */

import { createHash } from 'node:crypto';
import { endianness } from 'node:os';
import { FetcherError } from './errors.js';

/** A manifest or index is malformed, unsupported, or no manifest fits the wanted platform. */
export class ManifestError extends FetcherError {
  /** JSON path of the offending field (`layers[2].digest`), when the problem is one field. */
  readonly path?: string;
  constructor(subject: string, reason: string, options?: { cause?: unknown; path?: string }) {
    super(subject, options?.path === undefined ? reason : `${options.path}: ${reason}`, options);
    this.path = options?.path;
  }
}

// ---------------------------------------------------------------------------------------
// Media types

export const MEDIA_TYPE_OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
export const MEDIA_TYPE_OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
export const MEDIA_TYPE_DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json';
export const MEDIA_TYPE_DOCKER_MANIFEST_LIST = 'application/vnd.docker.distribution.manifest.list.v2+json';
/** Docker image manifest schema 1 (unsigned and signed): not supported, only recognised to say so. */
export const MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST = 'application/vnd.docker.distribution.manifest.v1+json';
export const MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST = 'application/vnd.docker.distribution.manifest.v1+prettyjws';

export const MEDIA_TYPE_OCI_CONFIG = 'application/vnd.oci.image.config.v1+json';
export const MEDIA_TYPE_DOCKER_CONFIG = 'application/vnd.docker.container.image.v1+json';
/** The OCI empty descriptor's media type (the two-byte blob `{}`). */
export const MEDIA_TYPE_OCI_EMPTY = 'application/vnd.oci.empty.v1+json';

export const MEDIA_TYPE_OCI_LAYER = 'application/vnd.oci.image.layer.v1.tar';
export const MEDIA_TYPE_OCI_LAYER_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';
export const MEDIA_TYPE_OCI_LAYER_ZSTD = 'application/vnd.oci.image.layer.v1.tar+zstd';
export const MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE = 'application/vnd.oci.image.layer.nondistributable.v1.tar';
export const MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_GZIP = 'application/vnd.oci.image.layer.nondistributable.v1.tar+gzip';
export const MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_ZSTD = 'application/vnd.oci.image.layer.nondistributable.v1.tar+zstd';
export const MEDIA_TYPE_DOCKER_LAYER = 'application/vnd.docker.image.rootfs.diff.tar';
export const MEDIA_TYPE_DOCKER_LAYER_GZIP = 'application/vnd.docker.image.rootfs.diff.tar.gzip';
export const MEDIA_TYPE_DOCKER_LAYER_ZSTD = 'application/vnd.docker.image.rootfs.diff.tar.zstd';
export const MEDIA_TYPE_DOCKER_LAYER_FOREIGN = 'application/vnd.docker.image.rootfs.foreign.diff.tar';
export const MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP = 'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip';

/** The Accept header for a manifest request: both index types first, then both manifest types. */
export const MANIFEST_ACCEPT = [
  MEDIA_TYPE_OCI_INDEX,
  MEDIA_TYPE_OCI_MANIFEST,
  MEDIA_TYPE_DOCKER_MANIFEST_LIST,
  MEDIA_TYPE_DOCKER_MANIFEST,
].join(', ');

/**
 * The largest manifest or index accepted, in bytes (4 MiB: what the distribution spec asks
 * registries to accept at least). A client should stop reading a manifest body past this.
 */
export const MAX_MANIFEST_BYTES = 4 << 20;

export type LayerCompression = 'gzip' | 'zstd' | 'none';

const LAYER_COMPRESSION: ReadonlyMap<string, LayerCompression> = new Map<string, LayerCompression>([
  [MEDIA_TYPE_OCI_LAYER, 'none'],
  [MEDIA_TYPE_OCI_LAYER_GZIP, 'gzip'],
  [MEDIA_TYPE_OCI_LAYER_ZSTD, 'zstd'],
  [MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE, 'none'],
  [MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_GZIP, 'gzip'],
  [MEDIA_TYPE_OCI_LAYER_NONDISTRIBUTABLE_ZSTD, 'zstd'],
  [MEDIA_TYPE_DOCKER_LAYER, 'none'],
  [MEDIA_TYPE_DOCKER_LAYER_GZIP, 'gzip'],
  [MEDIA_TYPE_DOCKER_LAYER_ZSTD, 'zstd'],
  [MEDIA_TYPE_DOCKER_LAYER_FOREIGN, 'none'],
  [MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP, 'gzip'],
]);

/** True for the OCI image index and the Docker manifest list. */
export function isIndexMediaType(mediaType: string): boolean {
  return mediaType === MEDIA_TYPE_OCI_INDEX || mediaType === MEDIA_TYPE_DOCKER_MANIFEST_LIST;
}

/** True for the OCI image manifest and the Docker v2 schema 2 manifest. */
export function isManifestMediaType(mediaType: string): boolean {
  return mediaType === MEDIA_TYPE_OCI_MANIFEST || mediaType === MEDIA_TYPE_DOCKER_MANIFEST;
}

/** True for Docker schema 1 manifests (signed or not), which we do not support. */
export function isSchema1MediaType(mediaType: string): boolean {
  return mediaType === MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST || mediaType === MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST;
}

/**
 * The compression of a layer media type (OCI, OCI non-distributable, Docker, Docker foreign);
 * `undefined` when the media type is not a layer type we know (exact match, no guessing from a
 * `+gzip` suffix).
 */
export function layerCompression(mediaType: string): LayerCompression | undefined {
  return LAYER_COMPRESSION.get(mediaType);
}

/** True for a known layer media type. */
export function isLayerMediaType(mediaType: string): boolean {
  return LAYER_COMPRESSION.has(mediaType);
}

// ---------------------------------------------------------------------------------------
// Types

/** An OCI platform (image-spec `platform` object). */
export interface Platform {
  architecture: string;
  os: string;
  variant?: string;
  'os.version'?: string;
  'os.features'?: string[];
}

/** An OCI content descriptor. */
export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  urls?: string[];
  annotations?: Record<string, string>;
  platform?: Platform;
  artifactType?: string;
}

/** An OCI image manifest or a Docker v2 schema 2 manifest. */
export interface ImageManifest {
  schemaVersion: 2;
  mediaType?: string;
  artifactType?: string;
  config: Descriptor;
  layers: Descriptor[];
  subject?: Descriptor;
  annotations?: Record<string, string>;
}

/** An OCI image index or a Docker manifest list. */
export interface ImageIndex {
  schemaVersion: 2;
  mediaType?: string;
  artifactType?: string;
  manifests: Descriptor[];
  subject?: Descriptor;
  annotations?: Record<string, string>;
}

/** What `parseManifest` found; `mediaType` is the type it settled on (never a generic one). */
export type ParsedManifest =
  | { kind: 'manifest'; manifest: ImageManifest; mediaType: string }
  | { kind: 'index'; index: ImageIndex; mediaType: string };

export type DigestAlgorithm = 'sha256' | 'sha512';

// ---------------------------------------------------------------------------------------
// Digests

const DIGEST_HEX_LENGTH: Readonly<Record<DigestAlgorithm, number>> = { sha256: 64, sha512: 128 };
const DIGEST_RE = /^(sha256|sha512):([a-f0-9]+)$/;

/** Why `s` is not a digest we accept, or undefined when it is one. */
function digestProblem(s: string): string | undefined {
  const m = DIGEST_RE.exec(s);
  if (m === null) return `${show(s)} is not a digest (want sha256:<64 hex> or sha512:<128 hex>, lowercase)`;
  const want = DIGEST_HEX_LENGTH[m[1] as DigestAlgorithm];
  if (m[2]!.length !== want) return `${show(s)} is not a digest: ${m[1]} needs ${want} hex digits, not ${m[2]!.length}`;
  return undefined;
}

/** Splits and checks a digest: `sha256:<64 lowercase hex>` or `sha512:<128 lowercase hex>`. */
export function parseDigest(s: string): { algorithm: DigestAlgorithm; hex: string } {
  if (typeof s !== 'string') throw new ManifestError('digest', `${show(s)} is not a string`);
  const problem = digestProblem(s);
  if (problem !== undefined) throw new ManifestError(clip(s), problem);
  const colon = s.indexOf(':');
  return { algorithm: s.slice(0, colon) as DigestAlgorithm, hex: s.slice(colon + 1) };
}

/** `sha256:<hex>` of the bytes. */
export function sha256Digest(bytes: Uint8Array): string {
  return 'sha256:' + createHash('sha256').update(bytes).digest('hex');
}

// ---------------------------------------------------------------------------------------
// Parsing

/** Content-Types that say nothing about which manifest this is; the JSON decides. */
const GENERIC_CONTENT_TYPES: ReadonlySet<string> = new Set([
  '',
  'application/json',
  'application/octet-stream',
  'binary/octet-stream',
  'text/plain',
]);

// RFC 6838 restricted-name, for type and subtype (OCI requires descriptors' media types to comply).
const RESTRICTED_NAME = '[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}';
const MEDIA_TYPE_RE = new RegExp(`^${RESTRICTED_NAME}/${RESTRICTED_NAME}$`);

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type JsonObject = { [key: string]: Json };

function isObject(v: Json | undefined): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A JSON rendering of a value for an error message, cut short. */
function show(v: unknown): string {
  let s: string;
  try {
    s = JSON.stringify(v) ?? String(v);
  } catch {
    s = String(v);
  }
  return clip(s);
}

function clip(s: string, max = 80): string {
  return s.length > max ? `${s.slice(0, max)}…` : s;
}

function typeName(v: Json | undefined): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (v === undefined) return 'missing';
  return `a ${typeof v}`;
}

/** `parent.key` or `parent["odd key"]`. */
function childPath(parent: string, key: string): string {
  const name = /^[A-Za-z_][A-Za-z0-9_]*$/.test(key) ? key : undefined;
  if (name !== undefined) return parent === '' ? name : `${parent}.${name}`;
  return `${parent}[${show(key)}]`;
}

/** Checks fields of one JSON document, throwing ManifestErrors that name subject and path. */
class Checker {
  constructor(readonly subject: string) {}

  fail(path: string, reason: string): never {
    throw new ManifestError(this.subject, reason, path === '' ? {} : { path });
  }

  string(obj: JsonObject, key: string, path: string): string {
    const p = childPath(path, key);
    const v = obj[key];
    if (typeof v !== 'string') this.fail(p, `want a string, got ${typeName(v)}`);
    return v;
  }

  optString(obj: JsonObject, key: string, path: string): string | undefined {
    return obj[key] === undefined ? undefined : this.string(obj, key, path);
  }

  mediaType(obj: JsonObject, key: string, path: string): string {
    const v = this.string(obj, key, path);
    if (v === '') this.fail(childPath(path, key), 'empty media type');
    if (!MEDIA_TYPE_RE.test(v)) this.fail(childPath(path, key), `${show(v)} is not a media type`);
    return v;
  }

  optMediaType(obj: JsonObject, key: string, path: string): string | undefined {
    return obj[key] === undefined ? undefined : this.mediaType(obj, key, path);
  }

  digest(obj: JsonObject, key: string, path: string): string {
    const v = this.string(obj, key, path);
    const problem = digestProblem(v);
    if (problem !== undefined) this.fail(childPath(path, key), problem);
    return v;
  }

  size(obj: JsonObject, key: string, path: string): number {
    const p = childPath(path, key);
    const v = obj[key];
    if (typeof v !== 'number') this.fail(p, `want a number, got ${typeName(v)}`);
    if (!Number.isSafeInteger(v) || v < 0) this.fail(p, `${show(v)} is not a non-negative integer below 2^53`);
    return v;
  }

  stringArray(obj: JsonObject, key: string, path: string): string[] {
    const p = childPath(path, key);
    const v = obj[key];
    if (!Array.isArray(v)) this.fail(p, `want an array, got ${typeName(v)}`);
    return v.map((item, i) => {
      if (typeof item !== 'string') this.fail(`${p}[${i}]`, `want a string, got ${typeName(item)}`);
      return item;
    });
  }

  urls(obj: JsonObject, key: string, path: string): string[] {
    const urls = this.stringArray(obj, key, path);
    urls.forEach((u, i) => {
      let url: URL;
      try {
        url = new URL(u);
      } catch {
        this.fail(`${childPath(path, key)}[${i}]`, `${show(u)} is not a URL`);
      }
      if (url.protocol !== 'http:' && url.protocol !== 'https:') {
        this.fail(`${childPath(path, key)}[${i}]`, `${show(u)}: only http and https URLs are allowed`);
      }
    });
    return urls;
  }

  annotations(obj: JsonObject, key: string, path: string): Record<string, string> {
    const p = childPath(path, key);
    const v = obj[key];
    if (!isObject(v)) this.fail(p, `want an object of strings, got ${typeName(v)}`);
    // fromEntries defines own properties, so a "__proto__" key stays a plain key.
    return Object.fromEntries(
      Object.entries(v).map(([k, value]) => {
        if (typeof value !== 'string') this.fail(childPath(p, k), `want a string, got ${typeName(value)}`);
        return [k, value];
      }),
    );
  }

  platform(obj: JsonObject, key: string, path: string): Platform {
    const p = childPath(path, key);
    const v = obj[key];
    if (!isObject(v)) this.fail(p, `want an object, got ${typeName(v)}`);
    const out: Platform = { architecture: this.string(v, 'architecture', p), os: this.string(v, 'os', p) };
    const variant = this.optString(v, 'variant', p);
    if (variant !== undefined) out.variant = variant;
    const osVersion = this.optString(v, 'os.version', p);
    if (osVersion !== undefined) out['os.version'] = osVersion;
    if (v['os.features'] !== undefined) out['os.features'] = this.stringArray(v, 'os.features', p);
    return out;
  }

  descriptor(v: Json | undefined, path: string): Descriptor {
    if (!isObject(v)) this.fail(path, `want a descriptor object, got ${typeName(v)}`);
    const d: Descriptor = {
      mediaType: this.mediaType(v, 'mediaType', path),
      digest: this.digest(v, 'digest', path),
      size: this.size(v, 'size', path),
    };
    if (v['urls'] !== undefined) d.urls = this.urls(v, 'urls', path);
    if (v['annotations'] !== undefined) d.annotations = this.annotations(v, 'annotations', path);
    if (v['platform'] !== undefined) d.platform = this.platform(v, 'platform', path);
    const artifactType = this.optMediaType(v, 'artifactType', path);
    if (artifactType !== undefined) d.artifactType = artifactType;
    return d;
  }

  descriptors(obj: JsonObject, key: string): Descriptor[] {
    const v = obj[key];
    if (!Array.isArray(v)) this.fail(key, `want an array of descriptors, got ${typeName(v)}`);
    return v.map((item, i) => this.descriptor(item, `${key}[${i}]`));
  }
}

/** The media type part of a Content-Type header, lowercased, without parameters. */
function bareContentType(contentType: string | undefined): string {
  if (contentType === undefined) return '';
  const semi = contentType.indexOf(';');
  return (semi === -1 ? contentType : contentType.slice(0, semi)).trim().toLowerCase();
}

const SCHEMA1_REASON =
  'Docker image manifest schema 1 is not supported (deprecated and removed from registries); ' +
  'push the image again with a current client to get a schema 2 or OCI manifest';

/**
 * Parses and validates a manifest or index.
 *
 * The type comes from `mediaType` (the response's Content-Type; parameters are ignored and
 * generic types like `application/json` or `application/octet-stream` count as absent) and the
 * JSON's own `mediaType`: when both are given they must agree; when neither is, the document
 * is an index if it has `manifests` and a manifest if it has `config` or `layers` (having both
 * is refused). Schema 1 is refused with a message saying so. `subject` (e.g. the reference)
 * names the document in errors, which also give the JSON path of the bad field.
 */
export function parseManifest(bytes: Uint8Array, mediaType: string | undefined, subject: string): ParsedManifest {
  const c: Checker = new Checker(subject);
  const declared = bareContentType(mediaType);
  const headerType = GENERIC_CONTENT_TYPES.has(declared) ? undefined : declared;
  if (headerType !== undefined && isSchema1MediaType(headerType)) c.fail('', SCHEMA1_REASON);
  if (bytes.byteLength > MAX_MANIFEST_BYTES) {
    c.fail('', `${bytes.byteLength} bytes is more than the ${MAX_MANIFEST_BYTES} a manifest may have`);
  }

  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch (err) {
    throw new ManifestError(subject, 'not UTF-8 text', { cause: err });
  }
  let doc: Json;
  try {
    doc = JSON.parse(text) as Json;
  } catch (err) {
    throw new ManifestError(subject, `not JSON (${err instanceof Error ? err.message : String(err)})`, { cause: err });
  }
  if (!isObject(doc)) c.fail('', `want a JSON object, got ${typeName(doc)}`);

  const bodyType = doc['mediaType'] === undefined ? undefined : c.string(doc, 'mediaType', '');
  if (doc['schemaVersion'] === 1 || (bodyType !== undefined && isSchema1MediaType(bodyType))) c.fail('', SCHEMA1_REASON);
  if (headerType !== undefined && bodyType !== undefined && headerType !== bodyType) {
    c.fail('mediaType', `${show(bodyType)} disagrees with the Content-Type ${show(headerType)}`);
  }

  let type = headerType ?? bodyType;
  if (type === undefined) {
    const hasManifests = doc['manifests'] !== undefined;
    const hasManifestFields = doc['config'] !== undefined || doc['layers'] !== undefined;
    if (hasManifests && hasManifestFields) {
      c.fail('', 'ambiguous document: it has both `manifests` (an index) and `config`/`layers` (a manifest), and no media type');
    }
    if (!hasManifests && !hasManifestFields) {
      c.fail('', 'neither a manifest (no `config`, `layers`) nor an index (no `manifests`), and no media type');
    }
    type = hasManifests ? MEDIA_TYPE_OCI_INDEX : MEDIA_TYPE_OCI_MANIFEST;
  }
  const isIndex = isIndexMediaType(type);
  if (!isIndex && !isManifestMediaType(type)) {
    c.fail(bodyType === type ? 'mediaType' : '', `unsupported media type ${show(type)} (want one of ${MANIFEST_ACCEPT})`);
  }

  const version = doc['schemaVersion'];
  if (version !== 2) {
    c.fail('schemaVersion', version === undefined ? 'missing (want 2)' : `${show(version)} is not supported (want 2)`);
  }
  // A document valid as both kinds could be read differently by different clients; refuse it.
  if (isIndex && (doc['config'] !== undefined || doc['layers'] !== undefined)) {
    c.fail(doc['config'] !== undefined ? 'config' : 'layers', `an index (${type}) must not have manifest fields`);
  }
  if (!isIndex && doc['manifests'] !== undefined) {
    c.fail('manifests', `a manifest (${type}) must not have index fields`);
  }

  const artifactType = c.optMediaType(doc, 'artifactType', '');
  const subjectDesc = doc['subject'] === undefined ? undefined : c.descriptor(doc['subject'], 'subject');
  const annotations = doc['annotations'] === undefined ? undefined : c.annotations(doc, 'annotations', '');

  if (isIndex) {
    const index: ImageIndex = { schemaVersion: 2, manifests: c.descriptors(doc, 'manifests') };
    if (bodyType !== undefined) index.mediaType = bodyType;
    if (artifactType !== undefined) index.artifactType = artifactType;
    if (subjectDesc !== undefined) index.subject = subjectDesc;
    if (annotations !== undefined) index.annotations = annotations;
    return { kind: 'index', index, mediaType: type };
  }
  if (doc['config'] === undefined) c.fail('config', 'missing');
  const manifest: ImageManifest = {
    schemaVersion: 2,
    config: c.descriptor(doc['config'], 'config'),
    layers: c.descriptors(doc, 'layers'),
  };
  if (bodyType !== undefined) manifest.mediaType = bodyType;
  if (artifactType !== undefined) manifest.artifactType = artifactType;
  if (subjectDesc !== undefined) manifest.subject = subjectDesc;
  if (annotations !== undefined) manifest.annotations = annotations;
  return { kind: 'manifest', manifest, mediaType: type };
}

// ---------------------------------------------------------------------------------------
// Platforms

/** Operating systems a one-word specifier is taken as (Go's GOOS list, as containerd). */
const KNOWN_OS: ReadonlySet<string> = new Set([
  'aix', 'android', 'darwin', 'dragonfly', 'freebsd', 'hurd', 'illumos', 'ios', 'js', 'linux',
  'nacl', 'netbsd', 'openbsd', 'plan9', 'solaris', 'windows', 'zos',
]);

/** Architectures a one-word specifier is taken as (Go's GOARCH list, as containerd). */
const KNOWN_ARCH: ReadonlySet<string> = new Set([
  '386', 'amd64', 'amd64p32', 'arm', 'armbe', 'arm64', 'arm64be', 'ppc64', 'ppc64le', 'loong64',
  'mips', 'mipsle', 'mips64', 'mips64le', 'mips64p32', 'mips64p32le', 'ppc', 'riscv', 'riscv64',
  's390', 's390x', 'sparc', 'sparc64', 'wasm',
]);

function normalizeOs(os: string): string {
  const lower = os.toLowerCase();
  return lower === 'macos' ? 'darwin' : lower;
}

function normalizeArch(architecture: string, variant: string): { architecture: string; variant: string } {
  const arch = architecture.toLowerCase();
  const v = variant.toLowerCase();
  switch (arch) {
    case 'i386':
      return { architecture: '386', variant: '' };
    case 'x86_64':
    case 'x86-64':
    case 'amd64':
      return { architecture: 'amd64', variant: v === 'v1' ? '' : v };
    case 'aarch64':
    case 'arm64':
      return { architecture: 'arm64', variant: v === '8' || v === 'v8' ? '' : v };
    case 'armhf':
      return { architecture: 'arm', variant: 'v7' };
    case 'armel':
      return { architecture: 'arm', variant: 'v6' };
    case 'arm':
      if (v === '' || v === '7') return { architecture: 'arm', variant: 'v7' };
      if (v === '5' || v === '6' || v === '8') return { architecture: 'arm', variant: `v${v}` };
      return { architecture: 'arm', variant: v };
    default:
      return { architecture: arch, variant: v };
  }
}

/**
 * The canonical form of a platform, as containerd's `Normalize`: os lowercased (`macos` →
 * `darwin`); `aarch64` → arm64, `x86_64`/`x86-64` → amd64, `i386` → 386, `armhf` → arm/v7,
 * `armel` → arm/v6; arm's default variant is v7 (written out), while arm64's v8 and amd64's v1
 * are the defaults and dropped; `os.features` sorted without duplicates.
 */
export function normalizePlatform(p: Platform): Platform {
  const { architecture, variant } = normalizeArch(p.architecture, p.variant ?? '');
  const out: Platform = { architecture, os: normalizeOs(p.os) };
  if (variant !== '') out.variant = variant;
  if (p['os.version'] !== undefined && p['os.version'] !== '') out['os.version'] = p['os.version'];
  if (p['os.features'] !== undefined && p['os.features'].length > 0) {
    out['os.features'] = [...new Set(p['os.features'])].sort();
  }
  return out;
}

function encodeOsOption(s: string): string {
  return s.replace(/[%+()/]/g, (ch) => `%${ch.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')}`);
}

function decodeOsOption(s: string, spec: string): string {
  if (!s.includes('%')) return s;
  try {
    return decodeURIComponent(s);
  } catch (err) {
    throw new ManifestError(clip(spec), `bad percent-encoding in ${show(s)}`, { cause: err });
  }
}

/**
 * `os/arch[/variant]`, with `os(version+feature…)` when the platform has an os.version or
 * os.features (containerd's `FormatAll`); `unknown` when the os is empty. Not normalised: pass
 * the result of `normalizePlatform` for the canonical spelling.
 */
export function formatPlatform(p: Platform): string {
  if (p.os === '') return 'unknown';
  let os = p.os;
  const version = p['os.version'] ?? '';
  const features = [...(p['os.features'] ?? [])].sort();
  if (version !== '' || features.length > 0) {
    os += `(${encodeOsOption(version)}${features.map((f) => `+${encodeOsOption(f)}`).join('')})`;
  }
  return [os, p.architecture, p.variant ?? ''].filter((s) => s !== '').join('/');
}

const OS_PART_RE = /^([A-Za-z0-9_-]+)(?:\(([A-Za-z0-9_.%-]*)((?:\+[A-Za-z0-9_.%-]+)*)\))?$/;
const PART_RE = /^[A-Za-z0-9_.-]+$/;

/**
 * Parses a platform specifier — `os`, `arch`, `os/arch` or `os/arch/variant`, the os optionally
 * `os(version+feature+…)` — into a normalised platform (so `linux/aarch64` gives linux/arm64
 * and `linux/arm64/v8` equals `linux/arm64`). A single word is an os if it is a known one
 * (the architecture then comes from `defaults`), else a known architecture (the os from
 * `defaults`). `defaults` is the host platform unless given.
 */
export function parsePlatform(spec: string, defaults?: Platform): Platform {
  const bad: (reason: string) => never = (reason) => {
    throw new ManifestError(clip(spec), `invalid platform: ${reason}`);
  };
  if (typeof spec !== 'string' || spec === '') bad('empty specifier');
  if (spec.includes('*')) bad('wildcards are not supported');
  const parts = spec.split('/');
  if (parts.length > 3) bad('want os, arch, os/arch or os/arch/variant');
  const osMatch = OS_PART_RE.exec(parts[0]!);
  if (osMatch === null) bad(`${show(parts[0])} is not a valid os`);
  for (const part of parts.slice(1)) {
    if (!PART_RE.test(part)) bad(`${show(part)} is not a valid architecture or variant`);
  }
  const os = normalizeOs(osMatch[1]!);
  const version = decodeOsOption(osMatch[2] ?? '', spec);
  const features = (osMatch[3] ?? '').split('+').slice(1).map((f) => decodeOsOption(f, spec));
  const withOptions = (p: Platform): Platform => {
    const out = { ...p };
    if (version !== '') out['os.version'] = version;
    if (features.length > 0) out['os.features'] = features;
    return normalizePlatform(out);
  };

  if (parts.length === 1) {
    const base = defaults ?? hostPlatform();
    if (KNOWN_OS.has(os)) {
      const p: Platform = { os, architecture: base.architecture };
      if (base.variant !== undefined) p.variant = base.variant;
      return withOptions(p);
    }
    if (version !== '' || features.length > 0) bad(`${show(parts[0])} is not a known os`);
    const { architecture, variant } = normalizeArch(parts[0]!, '');
    if (!KNOWN_ARCH.has(architecture)) bad(`${show(parts[0])} is neither a known os nor a known architecture`);
    return normalizePlatform({ os: base.os, architecture, variant });
  }
  return withOptions({ os, architecture: parts[1]!, variant: parts[2] ?? '' });
}

/** What the host environment looks like; the fields default to `process`'s. */
export interface HostEnvironment {
  /** A `process.platform` value (default: this process's). */
  platform?: string;
  /** A `process.arch` value (default: this process's). */
  arch?: string;
  /** `process.config.variables.arm_version` (default: this process's), for 32-bit arm. */
  armVersion?: string | number;
  /** For ppc64: `os.endianness()` (default: this machine's). */
  endianness?: 'BE' | 'LE';
}

const NODE_OS: Readonly<Record<string, string>> = { win32: 'windows', sunos: 'solaris' };
const NODE_ARCH: Readonly<Record<string, string>> = { x64: 'amd64', ia32: '386', mipsel: 'mipsle' };

/**
 * The platform of this host (or of `env`), as containerd's default: x64 → amd64, arm64 →
 * arm64/v8, arm → arm with variant `v<arm_version>` from node's build config (v7 when absent),
 * ia32 → 386, ppc64 → ppc64le on little-endian, win32 → windows.
 */
export function hostPlatform(env: HostEnvironment = {}): Platform {
  const nodeOs = env.platform ?? process.platform;
  const nodeArch = env.arch ?? process.arch;
  const os = NODE_OS[nodeOs] ?? nodeOs;
  let architecture = NODE_ARCH[nodeArch] ?? nodeArch;
  let variant: string | undefined;
  if (architecture === 'arm64') {
    variant = 'v8';
  } else if (architecture === 'arm') {
    const fromConfig = (process.config?.variables as Readonly<Record<string, unknown>> | undefined)?.['arm_version'];
    const armVersion = env.armVersion ?? (env.arch === undefined ? fromConfig : undefined);
    const n = typeof armVersion === 'number' || typeof armVersion === 'string' ? String(armVersion) : '';
    variant = /^[0-9]+$/.test(n) ? `v${n}` : 'v7';
  } else if (architecture === 'ppc64' && (env.endianness ?? endianness()) === 'LE') {
    architecture = 'ppc64le';
  }
  const p: Platform = { os, architecture };
  if (variant !== undefined) p.variant = variant;
  return p;
}

/** Windows `major.minor.build` of an os.version, or undefined. */
function windowsBuild(version: string | undefined): [number, number, number] | undefined {
  const m = /^(\d+)\.(\d+)\.(\d+)(?:\.|$)/.exec(version ?? '');
  if (m === null) return undefined;
  const parts = [Number(m[1]), Number(m[2]), Number(m[3])] as [number, number, number];
  return parts[0] <= 255 && parts[1] <= 255 && parts[2] <= 65535 ? parts : undefined;
}

/** Windows Server 2022: from this build on, hosts also run older stable-ABI (LTSC 2022+) images. */
const WINDOWS_LTSC_2022 = 20348;

function windowsVersionCompatible(hostVersion: string | undefined, imageVersion: string | undefined): boolean {
  const host = windowsBuild(hostVersion);
  if (host === undefined || imageVersion === undefined || imageVersion === '') return true;
  const image = windowsBuild(imageVersion) ?? [0, 0, 0];
  if (host[0] !== image[0] || host[1] !== image[1]) return false;
  if (host[2] < WINDOWS_LTSC_2022) return host[2] === image[2];
  return image[2] >= WINDOWS_LTSC_2022 && image[2] <= host[2];
}

/**
 * Whether an image's platform `have` runs where `want` is wanted, strictly (containerd's
 * matcher): os, architecture and variant equal after normalisation, `have`'s os.features a
 * subset of `want`'s, and for windows the os.version compatible. No fallback to older variants:
 * see `compatiblePlatforms` and `selectManifests` for that.
 */
export function platformMatches(want: Platform, have: Platform): boolean {
  const w = normalizePlatform(want);
  const h = normalizePlatform(have);
  if (w.os !== h.os || w.architecture !== h.architecture || (w.variant ?? '') !== (h.variant ?? '')) return false;
  if (w.os === 'windows' && !windowsVersionCompatible(want['os.version'], have['os.version'])) return false;
  const wanted = new Set(w['os.features'] ?? []);
  return (h['os.features'] ?? []).every((f) => wanted.has(f));
}

function sibling(p: Platform, architecture: string, variant: string): Platform {
  const out: Platform = { ...p, architecture };
  if (variant === '') delete out.variant;
  else out.variant = variant;
  return out;
}

function vector(p: Platform): Platform[] {
  const out: Platform[] = [p];
  const variant = p.variant ?? '';
  const level = /^v?([0-9]+)$/.exec(variant);
  switch (p.architecture) {
    case 'amd64': {
      const n = level === null ? 0 : Number(level[1]);
      for (let v = n - 1; v >= 1; v--) out.push(sibling(p, 'amd64', `v${v}`));
      out.push(sibling(p, '386', ''));
      break;
    }
    case 'arm': {
      const n = level === null ? 0 : Number(level[1]);
      if (n > 5) for (let v = n - 1; v >= 5; v--) out.push(sibling(p, 'arm', `v${v}`));
      break;
    }
    case 'arm64': {
      const v = variant === '' ? 'v8' : variant;
      const m = /^v([0-9]+)(?:\.([0-9]+))?$/.exec(v);
      if (m !== null && Number(m[1]) >= 8) {
        let major = Number(m[1]);
        let minor = m[2] !== undefined && v.length === 4 ? Number(m[2]) : 0;
        const revision = (maj: number, min: number): string => (min === 0 ? `v${maj}` : `v${maj}.${min}`);
        if (major === 9) {
          for (let i = minor - 1; i >= 0; i--) out.push(sibling(p, 'arm64', revision(9, i)));
          // Armv9.x is a superset of Armv8.(x+5).
          minor += 5;
          major = 8;
          out.push(sibling(p, 'arm64', `v8.${minor}`));
        }
        for (let i = minor - 1; i >= 0; i--) out.push(sibling(p, 'arm64', revision(major, i)));
      }
      const armVariant = v.startsWith('v8.') || v.startsWith('v9.') ? 'v8' : v;
      out.push(...vector(sibling(p, 'arm', armVariant)));
      break;
    }
  }
  return out;
}

/**
 * The platforms `want` runs, best first (containerd's `Only`): itself; for amd64/vN the lower
 * amd64 levels, then 386; for arm/vN, arm down to v5; for arm64, older arm64 revisions (v9.x →
 * v9.x-1…v9, v8.x+5…v8) then 32-bit arm from v8 down to v5.
 */
export function compatiblePlatforms(want: Platform | string): Platform[] {
  const p = typeof want === 'string' ? parsePlatform(want) : normalizePlatform(want);
  return vector(p).map(normalizePlatform);
}

/** Whether a descriptor in an index is an image for a real platform (not an attestation, SOCI index or other artifact). */
function isImageEntry(d: Descriptor): d is Descriptor & { platform: Platform } {
  const p = d.platform;
  if (p === undefined || p.os === '' || p.architecture === '') return false;
  if (p.os === 'unknown' || p.architecture === 'unknown') return false;
  if (d.artifactType !== undefined) return false;
  return isManifestMediaType(d.mediaType);
}

export interface SelectOptions {
  /** The wanted platform (a specifier like `linux/arm64` or a Platform); default: the host's. */
  platform?: Platform | string;
  /** Return every image manifest of the index, in index order (`platform` is then ignored). */
  all?: boolean;
  /** Names the index in errors (e.g. the reference); default `image index`. */
  subject?: string;
}

/**
 * The image manifests of an index to use. Only entries that are images are considered: a
 * manifest media type, a platform that is not missing or `unknown/unknown` (buildkit's
 * attestation manifests), and no `artifactType` (SOCI v2 indexes, signatures, SBOMs).
 *
 * With `all`, every such entry in index order. Otherwise the single best for the platform by
 * containerd's `Only` order (`compatiblePlatforms`); among equally good entries the first in the
 * index wins. Throws ManifestError listing the available platforms when none fits.
 */
export function selectManifests(index: ImageIndex, opts: SelectOptions = {}): Descriptor[] {
  const subject = opts.subject ?? 'image index';
  const images = index.manifests.filter(isImageEntry);
  const available = (): string =>
    images.length === 0 ? 'the index lists no image manifests with a platform' : `available: ${[...new Set(images.map((d) => formatPlatform(normalizePlatform(d.platform))))].join(', ')}`;
  if (opts.all === true) {
    if (images.length === 0) throw new ManifestError(subject, 'no image manifests: ' + available());
    return images;
  }
  const want = opts.platform === undefined ? normalizePlatform(hostPlatform()) : typeof opts.platform === 'string' ? parsePlatform(opts.platform) : normalizePlatform(opts.platform);
  const order = compatiblePlatforms(want);
  let best: Descriptor | undefined;
  let bestRank = order.length;
  for (const d of images) {
    const rank = order.findIndex((p) => platformMatches(p, d.platform));
    if (rank !== -1 && rank < bestRank) {
      best = d;
      bestRank = rank;
    }
  }
  if (best === undefined) throw new ManifestError(subject, `no image manifest for platform ${formatPlatform(want)}; ${available()}`);
  return [best];
}

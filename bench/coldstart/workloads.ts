/**
 * Workloads: parsing a workloads file, the built-in set (images built from real files on this
 * machine with umoci, commands chosen from the images' own file lists), and getting each
 * image into the bench's registry.
 *
 * The built-in set:
 * - `large-read-few`: a ~300 MB (of tar) image in five layers — busybox, then /usr/lib,
 *   /usr/share + /usr/include, /usr/bin + /usr/libexec + /usr/sbin — whose command reads a
 *   few MB (a run of consecutive files, in the layer's tar order, from the middle of each of
 *   the three big layers: an application's own files sit together in its layer) and prints
 *   its ready line; the case lazy loading is for.
 * - `large-read-all`: the same image, reading every regular file (the worst case).
 * - `small`: an image under 20 MB (busybox and ~12 MB of files), reading about 1 MB. Its
 *   layers are below `soci-ts create`'s default 10 MiB minimum, so it is indexed with
 *   `--min-layer-size 1MiB` (lazy loading of a small image, not a fallback to a full pull).
 *
 * Every built-in command reports what it read: `coldstart ready: read N bytes`.
 */
import { readFile } from 'node:fs/promises';
import { buildZtocFromFile, normalizeName, type FileMetadata } from '../../ztoc/index.js';
import { buildImage, pushImage, readImage, type BuiltImage, type ImageSpec, type PushedImage } from '../../test/helpers/images.js';
import { skopeoCopy, type Registry } from '../../test/helpers/registry.js';
import { getManifest } from '../../test/helpers/images.js';
import { BenchError } from './proc.js';
import type { Workload } from './types.js';

export class WorkloadError extends BenchError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'WorkloadError';
  }
}

export const READY_LINE = 'coldstart ready';

export const BUILTIN_IMAGES = Object.freeze({
  large: {
    name: 'coldstart-300MB',
    layers: [
      { kind: 'busybox' },
      { kind: 'files', from: ['/usr/lib'], maxBytes: 150 << 20 },
      { kind: 'files', from: ['/usr/share', '/usr/include'], maxBytes: 100 << 20 },
      { kind: 'files', from: ['/usr/bin', '/usr/libexec', '/usr/sbin'], maxBytes: 50 << 20 },
    ],
  } satisfies ImageSpec,
  small: {
    name: 'coldstart-small',
    layers: [{ kind: 'busybox' }, { kind: 'files', from: ['/usr/share/perl5', '/usr/share/i18n', '/usr/share/zoneinfo'], maxBytes: 12 << 20 }],
  } satisfies ImageSpec,
});

export type BuiltinImage = keyof typeof BUILTIN_IMAGES;

// ---------------------------------------------------------------------------------------
// Parsing

const isStringArray = (v: unknown): v is string[] => Array.isArray(v) && v.every((x) => typeof x === 'string');

/** Validates a workloads file's content: an array, or `{ "workloads": [...] }`. */
export function parseWorkloads(text: string, file: string): Workload[] {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw new WorkloadError(`${file}: not JSON: ${(e as Error).message}`, { cause: e });
  }
  const list = Array.isArray(doc) ? doc : typeof doc === 'object' && doc !== null && Array.isArray((doc as { workloads?: unknown }).workloads) ? (doc as { workloads: unknown[] }).workloads : undefined;
  if (list === undefined) throw new WorkloadError(`${file}: expected an array of workloads or { "workloads": [...] }`);
  if (list.length === 0) throw new WorkloadError(`${file}: no workloads`);
  const names = new Set<string>();
  return list.map((raw, i) => {
    const at = `${file}: workload ${i + 1}`;
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new WorkloadError(`${at}: not an object`);
    const o = raw as Record<string, unknown>;
    for (const k of Object.keys(o)) {
      if (!['name', 'image', 'command', 'readyLine', 'createArgs', 'description'].includes(k)) throw new WorkloadError(`${at}: unknown key "${k}" (keys: name, image, command, readyLine, createArgs, description)`);
    }
    if (typeof o.name !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(o.name)) throw new WorkloadError(`${at}: "name" must be 1-64 characters of letters, digits, . _ - (got ${JSON.stringify(o.name)})`);
    if (names.has(o.name)) throw new WorkloadError(`${at}: duplicate name "${o.name}"`);
    names.add(o.name);
    if (typeof o.image !== 'string' || o.image === '') throw new WorkloadError(`${at} (${o.name}): "image" must be a non-empty string (builtin:NAME, oci:DIR[:TAG] or a registry reference)`);
    if (o.image.startsWith('builtin:') && !(o.image.slice(8) in BUILTIN_IMAGES)) throw new WorkloadError(`${at} (${o.name}): no built-in image "${o.image.slice(8)}" (there are: ${Object.keys(BUILTIN_IMAGES).join(', ')})`);
    let command: string[];
    if (typeof o.command === 'string' && o.command !== '') command = ['/bin/sh', '-c', o.command];
    else if (isStringArray(o.command) && o.command.length > 0) command = o.command;
    else throw new WorkloadError(`${at} (${o.name}): "command" must be a non-empty array of strings or a shell command string`);
    if (typeof o.readyLine !== 'string' || o.readyLine === '') throw new WorkloadError(`${at} (${o.name}): "readyLine" must be a non-empty string`);
    if (o.createArgs !== undefined && !isStringArray(o.createArgs)) throw new WorkloadError(`${at} (${o.name}): "createArgs" must be an array of strings`);
    if (o.description !== undefined && typeof o.description !== 'string') throw new WorkloadError(`${at} (${o.name}): "description" must be a string`);
    return {
      name: o.name,
      image: o.image,
      command,
      readyLine: o.readyLine,
      ...(o.createArgs !== undefined ? { createArgs: o.createArgs as string[] } : {}),
      ...(o.description !== undefined ? { description: o.description as string } : {}),
    };
  });
}

export async function readWorkloadsFile(file: string): Promise<Workload[]> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new WorkloadError(`${file}: cannot read: ${(e as Error).message}`, { cause: e });
  }
  return parseWorkloads(text, file);
}

// ---------------------------------------------------------------------------------------
// The built-in set

export interface LayerFile {
  path: string;
  size: number;
  offset: number;
}

/** Regular files of a layer blob in tar order (listed through our zTOC builder). */
async function layerFiles(blobPath: string): Promise<{ files: LayerFile[]; all: FileMetadata[]; tarSize: number }> {
  const z = await buildZtocFromFile(blobPath);
  const files = z.files.filter((f) => f.type === 'reg').map((f) => ({ path: '/' + normalizeName(f.name), size: f.uncompressedSize, offset: f.uncompressedOffset }));
  files.sort((a, b) => a.offset - b.offset);
  return { files, all: z.files, tarSize: z.uncompressedArchiveSize };
}

/** Consecutive non-empty regular files from the middle of the layer, about `bytes` in all. */
export function pickRun(files: readonly LayerFile[], tarSize: number, bytes: number): LayerFile[] {
  const startAt = files.findIndex((f) => f.offset >= tarSize / 2);
  const start = startAt < 0 ? 0 : startAt;
  const out: LayerFile[] = [];
  let sum = 0;
  for (let i = start; i < files.length && sum < bytes; i++) {
    const f = files[i] as LayerFile;
    // Paths a shell argument list carries safely; skip the odd one with a newline.
    if (f.size === 0 || /[\n\0]/.test(f.path)) continue;
    out.push(f);
    sum += f.size;
  }
  return out;
}

const reportRead = (expr: string): string => `echo "${READY_LINE}: read $(${expr} | wc -c | tr -d ' ') bytes"`;

/** The command reading `files` (absolute paths in the image) and printing the ready line. */
export function readFilesCommand(files: readonly string[]): string[] {
  return ['/bin/sh', '-c', `PATH=/bin; ${reportRead('cat -- "$@"')}`, 'coldstart', ...files];
}

/** The command reading every regular file under `roots` and printing the ready line. */
export function readAllCommand(roots: readonly string[]): string[] {
  return ['/bin/sh', '-c', `PATH=/bin; ${reportRead(`find ${roots.map((r) => `'${r}'`).join(' ')} -type f -exec cat -- {} +`)}`];
}

export interface BuiltinWorkloads {
  workloads: Workload[];
  images: Map<string, BuiltImage>;
  /** What each built-in command should read (bytes of the files it names). */
  expectedRead: Map<string, number>;
}

/** Builds (or takes from `cacheDir`) the built-in images and makes the three workloads. */
export async function builtinWorkloads(cacheDir: string, which: ReadonlySet<string> | undefined, progress: (s: string) => void): Promise<BuiltinWorkloads> {
  const want = (n: string): boolean => which === undefined || which.has(n);
  const images = new Map<string, BuiltImage>();
  const workloads: Workload[] = [];
  const expectedRead = new Map<string, number>();
  if (want('large-read-few') || want('large-read-all')) {
    progress('building (or reusing) the ~300 MB image from real files (the first time takes a few minutes)');
    const img = await buildImage(cacheDir, BUILTIN_IMAGES.large);
    images.set('builtin:large', img);
    const listed = await Promise.all(img.layers.map((l) => layerFiles(l.path)));
    if (want('large-read-few')) {
      const picked = listed.slice(1).flatMap((l) => pickRun(l.files, l.tarSize, 2 << 20));
      workloads.push({
        name: 'large-read-few',
        description: `~300 MB image, the command reads ${(picked.reduce((a, f) => a + f.size, 0) / 1e6).toFixed(1)} MB`,
        image: 'builtin:large',
        command: readFilesCommand(picked.map((f) => f.path)),
        readyLine: READY_LINE,
      });
      expectedRead.set('large-read-few', picked.reduce((a, f) => a + f.size, 0));
    }
    if (want('large-read-all')) {
      const roots = topDirs(listed.flatMap((l) => l.all));
      workloads.push({ name: 'large-read-all', description: '~300 MB image, the command reads every file', image: 'builtin:large', command: readAllCommand(roots), readyLine: READY_LINE });
      expectedRead.set('large-read-all', readAllBytes(listed.flatMap((l) => l.all)));
    }
  }
  if (want('small')) {
    progress('building (or reusing) the small image');
    const img = await buildImage(cacheDir, BUILTIN_IMAGES.small);
    images.set('builtin:small', img);
    const listed = await Promise.all(img.layers.map((l) => layerFiles(l.path)));
    const last = listed[listed.length - 1] as { files: LayerFile[]; tarSize: number };
    const picked = pickRun(last.files, last.tarSize, 1 << 20);
    workloads.push({
      name: 'small',
      description: `small image, the command reads ${(picked.reduce((a, f) => a + f.size, 0) / 1e6).toFixed(1)} MB`,
      image: 'builtin:small',
      command: readFilesCommand(picked.map((f) => f.path)),
      readyLine: READY_LINE,
      createArgs: ['--min-layer-size', '1MiB'],
    });
    expectedRead.set('small', picked.reduce((a, f) => a + f.size, 0));
  }
  return { workloads, images, expectedRead };
}

/** Top-level directories holding regular files, without the kernel's mount points. */
function topDirs(entries: readonly FileMetadata[]): string[] {
  const s = new Set<string>();
  for (const e of entries) {
    if (e.type !== 'reg') continue;
    const first = normalizeName(e.name).split('/')[0];
    if (first !== undefined && first !== '' && !['proc', 'sys', 'dev'].includes(first)) s.add('/' + first);
  }
  return [...s].sort();
}

/** Bytes `find -type f -exec cat` reads: every regular file's size, hardlinks counted again. */
function readAllBytes(entries: readonly FileMetadata[]): number {
  const size = new Map<string, number>();
  for (const e of entries) if (e.type === 'reg') size.set(normalizeName(e.name), e.uncompressedSize);
  let sum = 0;
  for (const e of entries) {
    if (e.type === 'reg') sum += e.uncompressedSize;
    else if (e.type === 'hardlink') sum += size.get(normalizeName(e.linkname)) ?? 0;
  }
  return sum;
}

// ---------------------------------------------------------------------------------------
// Into the bench's registry

export interface StagedImage {
  source: string;
  pushed: PushedImage;
  /** manifest + config + layers. */
  imageBytes: number;
  layerBytes: number;
}

function repoFor(source: string, index: number): string {
  const slug = source.replace(/^builtin:|^oci:|^docker:\/\//, '').replace(/[^a-z0-9]+/gi, '-').replace(/^-+|-+$/g, '').toLowerCase().slice(0, 40) || 'image';
  return `coldstart/${index}-${slug}`;
}

/** Puts `source` into `registry` (skopeo; digests preserved) and reads back what it serves. */
export async function stageImage(source: string, index: number, registry: Registry, builtins: ReadonlyMap<string, BuiltImage>): Promise<StagedImage> {
  const repo = repoFor(source, index);
  let pushed: PushedImage;
  if (source.startsWith('builtin:')) {
    const img = builtins.get(source);
    if (img === undefined) throw new WorkloadError(`${source}: not built`);
    pushed = await pushImage(img.layoutDir, img.tag, registry, repo);
  } else if (source.startsWith('oci:')) {
    const rest = source.slice(4);
    const m = /^(.*?)(?::([A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?$/.exec(rest);
    const dir = m?.[1] ?? rest;
    const tag = m?.[2] ?? 'latest';
    try {
      await readImage(dir, tag);
    } catch (e) {
      throw new WorkloadError(`${source}: not an OCI layout with tag ${tag}: ${(e as Error).message}`, { cause: e });
    }
    pushed = await pushImage(dir, tag, registry, repo);
  } else {
    const from = source.startsWith('docker://') ? source : `docker://${source}`;
    await skopeoCopy(from, `docker://${registry.host}/${repo}:latest`, { timeoutMs: 30 * 60_000, extraArgs: ['--preserve-digests'] });
    const man = await getManifest(registry, repo, 'latest');
    const manifest = JSON.parse(man.bytes.toString('utf8')) as PushedImage['manifest'];
    if (!Array.isArray(manifest.layers)) throw new WorkloadError(`${source}: not a single-platform image manifest (${man.mediaType})`);
    pushed = {
      ref: `${registry.host}/${repo}:latest`,
      digestRef: `${registry.host}/${repo}@${man.digest}`,
      repo,
      tag: 'latest',
      manifestDigest: man.digest,
      manifest,
      manifestBytes: man.bytes,
      configDigest: manifest.config.digest,
      layers: manifest.layers.map((l) => ({ digest: l.digest, size: l.size, mediaType: l.mediaType })),
    };
  }
  const layerBytes = pushed.layers.reduce((a, l) => a + l.size, 0);
  return { source, pushed, layerBytes, imageBytes: pushed.manifestBytes.length + pushed.manifest.config.size + layerBytes };
}

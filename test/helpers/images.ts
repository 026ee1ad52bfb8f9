/**
 * Runnable OCI images built from real files on this machine with umoci (no docker), cached
 * as OCI layouts, and pushed to a test registry with skopeo.
 *
 * A layout dir is built under a temporary sibling name and renamed into place, so an existing
 * one is complete; a lock dir keeps two test processes from building the same image at once.
 */
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { cached, exists, FixtureError, FixtureUnavailableError, FIXTURE_VERSION, hasCommand, run, testCacheDir, tree } from './layers.js';
import { RegistryError, registryRequest, skopeoCopy, type Registry } from './registry.js';

/** Bump when a recipe below changes, so cached layouts of the old recipe are not reused. */
export const IMAGE_FIXTURE_VERSION = 1;

export const MEDIA_TYPES = Object.freeze({
  manifest: 'application/vnd.oci.image.manifest.v1+json',
  index: 'application/vnd.oci.image.index.v1+json',
  config: 'application/vnd.oci.image.config.v1+json',
  layerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
  layerTar: 'application/vnd.oci.image.layer.v1.tar',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerManifestList: 'application/vnd.docker.distribution.manifest.list.v2+json',
});

// ---------------------------------------------------------------------------------------
// Specs

interface RecipeBase {
  /** Store this layer as a plain (uncompressed) tar instead of umoci's gzip. */
  uncompressed?: boolean;
}

/** `/bin/busybox` (busybox-static) with its applets as symlinks, /etc/passwd and /etc/group. */
export interface BusyboxRecipe extends RecipeBase {
  kind: 'busybox';
}

/**
 * Real files (and symlinks) from `from`, at their own paths, about `maxBytes` of tar
 * (default 8 MiB) split evenly over the roots; files another layer of the image already
 * took are skipped, so each layer adds new content.
 */
export interface FilesRecipe extends RecipeBase {
  kind: 'files';
  from: readonly string[];
  maxBytes?: number;
  /** Largest single file taken (default 8 MiB). */
  maxFileBytes?: number;
}

/** A tiny layer: a text file and `bytes` (default 4 KiB) of pseudo-random data under /srv. */
export interface SmallRecipe extends RecipeBase {
  kind: 'small';
  bytes?: number;
}

/**
 * The `special` tree of layers.ts (hardlinks, symlinks with long targets, names over 100 and
 * paths over 255 bytes, 255-byte and UTF-8 names, user.* xattrs, char and block devices, a
 * fifo, odd modes and owners, sub-second and extreme mtimes) copied to `at` in the image,
 * without its `whiteout/` directory (files named `.wh.*` would be whiteouts in an image layer).
 */
export interface SpecialTreeRecipe extends RecipeBase {
  kind: 'special-tree';
  /** Absolute path in the image. */
  at: string;
}

/**
 * Changes to files of lower layers, which umoci repack records as `.wh.NAME` whiteouts
 * (deletions) and new entries: `remove` exact paths; `removeFirst`: under each root, the first
 * `files` regular files and the first `dirs` directories with at least two entries (bytewise
 * order of the paths); `write`: files (re)written with this text.
 */
export interface ChangeRecipe extends RecipeBase {
  kind: 'change';
  remove?: readonly string[];
  removeFirst?: ReadonlyArray<{ under: string; files: number; dirs: number }>;
  write?: Readonly<Record<string, string>>;
}

/**
 * A hand-made layer (umoci repack never writes opaque markers; it lists each deleted child
 * instead): each directory gets `DIR/.wh..wh..opq` right after its own entry, then new
 * contents (`new-0.txt`, `new-1.txt`, `new-sub/inner.txt`). `dirs` are absolute paths that
 * must exist below; `firstDirUnder`: under each root, the first directory (bytewise) with at
 * least two entries. The tar (GNU, pax, numeric owner 0:0) is added with `umoci raw add-layer`.
 */
export interface OpaqueRecipe extends RecipeBase {
  kind: 'opaque';
  dirs?: readonly string[];
  firstDirUnder?: readonly string[];
}

export type LayerRecipe = BusyboxRecipe | FilesRecipe | SmallRecipe | SpecialTreeRecipe | ChangeRecipe | OpaqueRecipe;

export interface ImageSpec {
  /** Names the cache dir (default `image`). */
  name?: string;
  /** The tag inside the OCI layout (default `latest`). */
  tag?: string;
  layers: readonly LayerRecipe[];
  /** Default `['/bin/sh']`. */
  cmd?: readonly string[];
}

// ---------------------------------------------------------------------------------------
// Results

export interface OciDescriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

export interface OciManifest {
  schemaVersion: number;
  mediaType?: string;
  config: OciDescriptor;
  layers: OciDescriptor[];
  annotations?: Record<string, string>;
}

interface OciIndex {
  schemaVersion: number;
  manifests: OciDescriptor[];
}

interface OciConfig {
  rootfs: { type: string; diff_ids: string[] };
  [key: string]: unknown;
}

export interface ImageLayer {
  digest: string;
  size: number;
  mediaType: string;
  /** sha256 of the uncompressed tar (from the config). */
  diffId: string;
  /** The blob file in the layout. */
  path: string;
}

export interface BuiltImage {
  layoutDir: string;
  tag: string;
  /** `oci:DIR:TAG`, for skopeo. */
  ociRef: string;
  manifestDigest: string;
  manifest: OciManifest;
  configDigest: string;
  layers: ImageLayer[];
}

export interface PushedLayer {
  digest: string;
  size: number;
  mediaType: string;
}

export interface PushedImage {
  /** `HOST/REPO:TAG` (for ctr pull and the like). */
  ref: string;
  /** `HOST/REPO@sha256:…` */
  digestRef: string;
  repo: string;
  tag: string;
  manifestDigest: string;
  manifest: OciManifest;
  /** The manifest bytes the registry served. */
  manifestBytes: Buffer;
  configDigest: string;
  layers: PushedLayer[];
}

// ---------------------------------------------------------------------------------------
// Layer contents

async function requireTool(name: string, pkg: string): Promise<void> {
  if (!(await hasCommand(name))) throw new FixtureUnavailableError(name, `not installed (Debian package ${pkg})`);
}

async function addBusybox(rootfs: string): Promise<void> {
  const bin = path.join(rootfs, 'bin');
  await fsp.mkdir(bin, { recursive: true });
  const busybox = '/usr/bin/busybox';
  if (!(await exists(busybox))) throw new FixtureUnavailableError(busybox, 'not installed (Debian package busybox-static)');
  await fsp.copyFile(busybox, path.join(bin, 'busybox'));
  await fsp.chmod(path.join(bin, 'busybox'), 0o755);
  const applets = (await run(busybox, ['--list'])).stdout.split('\n').filter((a) => a !== '' && a !== 'busybox' && !a.includes('/'));
  for (const a of applets) await fsp.symlink('busybox', path.join(bin, a));
  await fsp.mkdir(path.join(rootfs, 'etc'), { recursive: true });
  await fsp.writeFile(path.join(rootfs, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n');
  await fsp.writeFile(path.join(rootfs, 'etc/group'), 'root:x:0:\nnogroup:x:65534:\n');
  for (const d of ['root', 'tmp', 'proc', 'sys', 'dev']) await fsp.mkdir(path.join(rootfs, d), { recursive: true });
  await fsp.chmod(path.join(rootfs, 'tmp'), 0o1777);
}

interface Found {
  path: string;
  size: number;
  type: 'f' | 'l';
}

/** Regular files and symlinks under `root` (one find, sorted bytewise). */
async function findUnder(root: string): Promise<Found[]> {
  if (!(await exists(root))) return [];
  const res = await run('find', [root, '-xdev', '(', '-type', 'f', '-o', '-type', 'l', ')', '-printf', '%y %s %p\\0'], { okCodes: [0, 1] });
  const out: Found[] = [];
  for (const rec of res.stdout.split('\0')) {
    const m = /^([fl]) (\d+) (.*)$/s.exec(rec);
    if (m !== null) out.push({ type: m[1] as 'f' | 'l', size: Number(m[2]), path: m[3] ?? '' });
  }
  out.sort((a, b) => Buffer.compare(Buffer.from(a.path), Buffer.from(b.path)));
  return out;
}

/** Copies absolute paths into `rootfs` at the same paths (tar pipe: keeps modes, links, mtimes). */
async function copyInto(paths: readonly string[], rootfs: string, listFile: string): Promise<void> {
  await fsp.writeFile(listFile, paths.map((p) => p.replace(/^\/+/, '') + '\0').join(''));
  try {
    // Through a shell only for the pipe; every path goes in by file, never by the command line.
    await run('sh', ['-c', 'tar -C / --no-recursion --null -T "$1" -cf - | tar -C "$2" -xpf -', 'copy', listFile, rootfs], {
      okCodes: [0, 1], // tar -c exits 1 for "file changed as we read it"
    });
  } finally {
    await fsp.rm(listFile, { force: true });
  }
}

async function addFiles(rootfs: string, r: FilesRecipe, taken: Set<string>, scratch: string): Promise<void> {
  const maxFile = r.maxFileBytes ?? 8 << 20;
  let budget = r.maxBytes ?? 8 << 20;
  const picked: string[] = [];
  for (let i = 0; i < r.from.length; i++) {
    const share = budget / (r.from.length - i); // leftovers of a small root go to the next
    let used = 0;
    for (const f of await findUnder(r.from[i] ?? '')) {
      if (used >= share) break;
      if (taken.has(f.path) || (f.type === 'f' && f.size > maxFile)) continue;
      const cost = 512 + (f.type === 'f' ? Math.ceil(f.size / 512) * 512 : 0);
      if (used + cost > share && used > 0) continue;
      taken.add(f.path);
      picked.push(f.path);
      used += cost;
    }
    budget -= used;
  }
  if (picked.length === 0) throw new FixtureError(rootfs, `no files found under ${r.from.join(', ')}`);
  await copyInto(picked, rootfs, scratch);
}

async function addSmall(rootfs: string, r: SmallRecipe, index: number): Promise<void> {
  const dir = path.join(rootfs, 'srv', `small-${index}`);
  await fsp.mkdir(dir, { recursive: true });
  await fsp.writeFile(path.join(dir, 'hello.txt'), `hello from layer ${index} of a soci-ts test image\n`);
  // xorshift32: incompressible-ish bytes, the same on every build.
  const data = Buffer.alloc(r.bytes ?? 4096);
  let x = 0x9e3779b9 ^ index;
  for (let i = 0; i < data.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    data[i] = x & 0xff;
  }
  await fsp.writeFile(path.join(dir, 'data.bin'), data);
}

/** Paths (absolute in the image) of regular files and directories under `root` in rootfs, bytewise sorted. */
async function entriesUnder(rootfs: string, root: string): Promise<Array<{ path: string; type: 'f' | 'd'; children: number }>> {
  const abs = path.join(rootfs, root);
  if (!(await exists(abs))) throw new FixtureError(abs, 'not in the image being built');
  const res = await run('find', [abs, '-mindepth', '1', '(', '-type', 'f', '-o', '-type', 'd', ')', '-printf', '%y %p\\0']);
  const out: Array<{ path: string; type: 'f' | 'd'; children: number }> = [];
  for (const rec of res.stdout.split('\0')) {
    const m = /^([fd]) (.*)$/s.exec(rec);
    if (m === null) continue;
    const p = '/' + path.relative(rootfs, m[2] ?? '');
    const children = m[1] === 'd' ? (await fsp.readdir(m[2] ?? '')).length : 0;
    out.push({ path: p, type: m[1] as 'f' | 'd', children });
  }
  out.sort((a, b) => Buffer.compare(Buffer.from(a.path), Buffer.from(b.path)));
  return out;
}

async function addSpecialTree(rootfs: string, r: SpecialTreeRecipe, cacheDir: string): Promise<void> {
  const src = await tree(cacheDir, 'special');
  const dest = path.join(rootfs, r.at);
  await fsp.mkdir(dest, { recursive: true });
  // tar keeps hardlinks, devices, the fifo, owners, modes, xattrs and (nanosecond) mtimes.
  await run('sh', ['-c', 'tar -C "$1" --exclude=./whiteout --numeric-owner --xattrs "--xattrs-include=*" -cf - . | tar -C "$2" --numeric-owner --same-owner --xattrs "--xattrs-include=*" -xpf -', 'copy', src, dest]);
}

async function applyChange(rootfs: string, r: ChangeRecipe): Promise<void> {
  const doomed = [...(r.remove ?? [])];
  for (const pick of r.removeFirst ?? []) {
    const all = await entriesUnder(rootfs, pick.under);
    const files = all.filter((e) => e.type === 'f').slice(0, pick.files);
    const dirs = all.filter((e) => e.type === 'd' && e.children >= 2 && !files.some((f) => f.path.startsWith(e.path + '/'))).slice(0, pick.dirs);
    if (files.length < pick.files || dirs.length < pick.dirs) throw new FixtureError(pick.under, `fewer than ${pick.files} files or ${pick.dirs} directories to remove`);
    doomed.push(...files.map((f) => f.path), ...dirs.map((d) => d.path));
  }
  for (const p of doomed) {
    const abs = path.join(rootfs, p);
    if (!(await exists(abs))) throw new FixtureError(abs, 'cannot remove: not in the image being built');
    await fsp.rm(abs, { recursive: true });
  }
  for (const [p, text] of Object.entries(r.write ?? {})) {
    const abs = path.join(rootfs, p);
    await fsp.mkdir(path.dirname(abs), { recursive: true });
    await fsp.rm(abs, { force: true }); // a new inode: never write through a hardlink of a lower layer
    await fsp.writeFile(abs, text);
  }
}

/** Builds the opaque layer's tar at `tarPath` and applies the same change to rootfs. */
async function makeOpaqueLayer(rootfs: string, r: OpaqueRecipe, tarPath: string, staging: string): Promise<void> {
  const dirs = [...(r.dirs ?? [])];
  for (const under of r.firstDirUnder ?? []) {
    const d = (await entriesUnder(rootfs, under)).find((e) => e.type === 'd' && e.children >= 2 && !dirs.includes(e.path));
    if (d === undefined) throw new FixtureError(under, 'no directory with two entries to make opaque');
    dirs.push(d.path);
  }
  if (dirs.length === 0) throw new FixtureError('opaque layer', 'no directories given');
  const names: string[] = [];
  await fsp.mkdir(staging, { recursive: true });
  for (const [i, d] of dirs.entries()) {
    const rel = d.replace(/^\/+/, '');
    if (!(await fsp.stat(path.join(rootfs, rel))).isDirectory()) throw new FixtureError(d, 'not a directory in the image being built');
    const dir = path.join(staging, rel);
    await fsp.mkdir(path.join(dir, 'new-sub'), { recursive: true });
    await fsp.writeFile(path.join(dir, '.wh..wh..opq'), '');
    await fsp.writeFile(path.join(dir, 'new-0.txt'), `opaque layer: new contents of ${d}\n`);
    await fsp.writeFile(path.join(dir, 'new-1.txt'), `second new file ${i}\n`);
    await fsp.writeFile(path.join(dir, 'new-sub', 'inner.txt'), 'inner\n');
    // Parents first (a layer names every directory it touches), then the directory, its marker, the rest.
    const parts = rel.split('/');
    for (let k = 1; k < parts.length; k++) {
      const parent = parts.slice(0, k).join('/');
      if (!names.includes(parent)) names.push(parent);
    }
    names.push(rel, `${rel}/.wh..wh..opq`, `${rel}/new-0.txt`, `${rel}/new-1.txt`, `${rel}/new-sub`, `${rel}/new-sub/inner.txt`);
  }
  // The staging parents get the image's modes so the layer does not change them.
  for (const n of names) {
    const inImage = path.join(rootfs, n);
    if (!n.endsWith('.txt') && !n.endsWith('.opq') && !n.endsWith('new-sub') && (await exists(inImage))) {
      const st = await fsp.stat(inImage);
      await fsp.chmod(path.join(staging, n), st.mode & 0o7777);
      await fsp.utimes(path.join(staging, n), st.atime, st.mtime);
    }
  }
  const list = `${tarPath}.list`;
  await fsp.writeFile(list, names.map((n) => `${n}\0`).join(''));
  try {
    await run('tar', ['-C', staging, '--format=pax', '--numeric-owner', '--owner=0', '--group=0', '--no-recursion', '--null', '-T', list, '-cf', tarPath, '--pax-option=delete=atime,delete=ctime']);
  } finally {
    await fsp.rm(list, { force: true });
  }
  // The same change in the bundle, so a later repack diffs against the right state.
  for (const d of dirs) {
    const abs = path.join(rootfs, d);
    for (const child of await fsp.readdir(abs)) await fsp.rm(path.join(abs, child), { recursive: true });
    await run('sh', ['-c', 'tar -C "$1" --exclude=.wh..wh..opq -cf - "$2" | tar -C "$3" -xpf -', 'copy', staging, d.replace(/^\/+/, ''), rootfs]);
  }
}

// ---------------------------------------------------------------------------------------
// Layout reading and plain-tar conversion

const blobPath = (layoutDir: string, digest: string): string => {
  const [alg, hex] = digest.split(':');
  if (alg === undefined || hex === undefined || !/^[a-z0-9]+$/.test(alg) || !/^[a-f0-9]+$/.test(hex)) throw new FixtureError(digest, 'not a digest');
  return path.join(layoutDir, 'blobs', alg, hex);
};

const readJson = async <T>(file: string): Promise<T> => JSON.parse(await fsp.readFile(file, 'utf8')) as T;

function tagDescriptor(index: OciIndex, tag: string, layoutDir: string): OciDescriptor {
  const d = index.manifests.find((m) => m.annotations?.['org.opencontainers.image.ref.name'] === tag);
  if (d === undefined) throw new FixtureError(layoutDir, `no tag ${tag} in index.json`);
  return d;
}

/**
 * Chain IDs of the image's layers from its config's diff_ids (OCI image spec: the first is
 * its diff_id, then sha256 of "PARENT DIFF_ID"): the snapshot keys containerd uses.
 */
export function chainIdsOf(img: BuiltImage): string[] {
  const out: string[] = [];
  for (const { diffId } of img.layers) {
    const prev = out.at(-1);
    out.push(prev === undefined ? diffId : `sha256:${createHash('sha256').update(`${prev} ${diffId}`).digest('hex')}`);
  }
  return out;
}

/** Reads a tagged image of an OCI layout: manifest, config digest, layers with diff_ids and blob paths. */
export async function readImage(layoutDir: string, tag: string): Promise<BuiltImage> {
  const index = await readJson<OciIndex>(path.join(layoutDir, 'index.json'));
  const desc = tagDescriptor(index, tag, layoutDir);
  const manifest = await readJson<OciManifest>(blobPath(layoutDir, desc.digest));
  const config = await readJson<OciConfig>(blobPath(layoutDir, manifest.config.digest));
  const diffIds = config.rootfs.diff_ids;
  if (diffIds.length !== manifest.layers.length) throw new FixtureError(layoutDir, `${diffIds.length} diff_ids for ${manifest.layers.length} layers`);
  return {
    layoutDir,
    tag,
    ociRef: `oci:${layoutDir}:${tag}`,
    manifestDigest: desc.digest,
    manifest,
    configDigest: manifest.config.digest,
    layers: manifest.layers.map((l, i) => ({
      digest: l.digest,
      size: l.size,
      mediaType: l.mediaType,
      diffId: diffIds[i] ?? '',
      path: blobPath(layoutDir, l.digest),
    })),
  };
}

async function writeBlob(layoutDir: string, data: Buffer): Promise<OciDescriptor & { mediaType: '' }> {
  const digest = `sha256:${createHash('sha256').update(data).digest('hex')}`;
  await fsp.writeFile(blobPath(layoutDir, digest), data);
  return { mediaType: '', digest, size: data.length };
}

/**
 * Replaces gzip layers `which` (indexes) of the tagged image by their plain tar: the
 * decompressed blob is the new blob (its digest is the diff_id, which the config already
 * has), the manifest is rewritten and index.json points at it.
 */
async function uncompressLayers(layoutDir: string, tag: string, which: readonly number[]): Promise<void> {
  if (which.length === 0) return;
  const indexPath = path.join(layoutDir, 'index.json');
  const index = await readJson<OciIndex>(indexPath);
  const desc = tagDescriptor(index, tag, layoutDir);
  const manifest = await readJson<OciManifest>(blobPath(layoutDir, desc.digest));
  const config = await readJson<OciConfig>(blobPath(layoutDir, manifest.config.digest));
  for (const i of which) {
    const layer = manifest.layers[i];
    if (layer === undefined) throw new FixtureError(layoutDir, `no layer ${i}`);
    if (layer.mediaType !== MEDIA_TYPES.layerGzip) throw new FixtureError(layoutDir, `layer ${i} is ${layer.mediaType}, not gzip`);
    const tmp = path.join(layoutDir, 'blobs', `uncompress-${i}.tmp`);
    const hash = createHash('sha256');
    let size = 0;
    const tee = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        hash.update(chunk);
        size += chunk.length;
        cb(null, chunk);
      },
    });
    await pipeline(createReadStream(blobPath(layoutDir, layer.digest)), createGunzip(), tee, createWriteStream(tmp));
    const digest = `sha256:${hash.digest('hex')}`;
    if (config.rootfs.diff_ids[i] !== digest) {
      throw new FixtureError(layoutDir, `layer ${i}: uncompressed digest ${digest} differs from diff_id ${String(config.rootfs.diff_ids[i])}`);
    }
    await fsp.rename(tmp, blobPath(layoutDir, digest));
    manifest.layers[i] = { ...layer, mediaType: MEDIA_TYPES.layerTar, digest, size };
  }
  const m = await writeBlob(layoutDir, Buffer.from(JSON.stringify(manifest)));
  index.manifests = index.manifests.map((d) => (d === desc ? { ...d, digest: m.digest, size: m.size } : d));
  await fsp.writeFile(indexPath, JSON.stringify(index));
}

// ---------------------------------------------------------------------------------------
// Building

const normalize = (spec: ImageSpec | readonly LayerRecipe[]): ImageSpec => (Array.isArray(spec) ? { layers: spec } : (spec as ImageSpec));

function specKey(spec: ImageSpec): string {
  // Images with the special tree depend on layers.ts's FIXTURE_VERSION too (only those: the
  // keys of the other specs stay as they were).
  const tree = spec.layers.some((l) => l.kind === 'special-tree') ? { tree: FIXTURE_VERSION } : {};
  const canon = JSON.stringify({ v: IMAGE_FIXTURE_VERSION, tag: spec.tag ?? 'latest', cmd: spec.cmd ?? ['/bin/sh'], layers: spec.layers, ...tree });
  return createHash('sha256').update(canon).digest('hex').slice(0, 16);
}

/** The layout dir `buildImage` uses for `spec` under `cacheDir` (built or not). */
export function imageDir(cacheDir: string, spec: ImageSpec | readonly LayerRecipe[]): string {
  const s = normalize(spec);
  const name = (s.name ?? 'image').replace(/[^A-Za-z0-9_.-]/g, '_');
  return path.join(cacheDir, `image-${name}-${specKey(s)}-v${IMAGE_FIXTURE_VERSION}`);
}

/**
 * Builds (or reuses) an OCI layout holding one tagged image: `umoci new`, the config, then
 * one `umoci repack` (one gzip layer) per recipe (an `opaque` recipe: `umoci raw add-layer` of
 * a hand-made tar, then a fresh unpack of the bundle when more recipes follow); layers marked
 * `uncompressed` are turned into plain tars afterwards. The layout is cached under `cacheDir`
 * by a key of the spec.
 */
export async function buildImage(cacheDir: string, specOrLayers: ImageSpec | readonly LayerRecipe[]): Promise<BuiltImage> {
  const spec = normalize(specOrLayers);
  const tag = spec.tag ?? 'latest';
  if (spec.layers.length === 0) throw new FixtureError('buildImage', 'an image needs at least one layer');
  const dir = await cached(imageDir(cacheDir, spec), async (tmp) => {
    await requireTool('umoci', 'umoci');
    const bundle = `${tmp}.bundle`;
    const img = `${tmp}:${tag}`;
    try {
      await run('umoci', ['init', '--layout', tmp]);
      await run('umoci', ['new', '--image', img]);
      const cfg = ['config', '--image', img, '--config.env', 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'];
      for (const c of spec.cmd ?? ['/bin/sh']) cfg.push('--config.cmd', c);
      await run('umoci', cfg);
      await run('umoci', ['unpack', '--image', img, bundle]);
      const rootfs = path.join(bundle, 'rootfs');
      const taken = new Set<string>();
      for (const [i, r] of spec.layers.entries()) {
        const history = ['--history.created_by', `soci-ts test layer ${i}: ${r.kind}`];
        if (r.kind === 'opaque') {
          const tarPath = `${tmp}.opaque-${i}.tar`;
          try {
            await makeOpaqueLayer(rootfs, r, tarPath, `${tmp}.opaque-${i}`);
            await run('umoci', ['raw', 'add-layer', ...history, '--image', img, tarPath]);
          } finally {
            await fsp.rm(tarPath, { force: true });
            await fsp.rm(`${tmp}.opaque-${i}`, { recursive: true, force: true });
          }
          if (i + 1 < spec.layers.length) {
            // umoci's record of the bundle predates the added layer: unpack afresh.
            await fsp.rm(bundle, { recursive: true, force: true });
            await run('umoci', ['unpack', '--image', img, bundle]);
          }
          continue;
        }
        switch (r.kind) {
          case 'busybox':
            await addBusybox(rootfs);
            break;
          case 'files':
            await addFiles(rootfs, r, taken, `${tmp}.list`);
            break;
          case 'small':
            await addSmall(rootfs, r, i);
            break;
          case 'special-tree':
            await addSpecialTree(rootfs, r, cacheDir);
            break;
          case 'change':
            await applyChange(rootfs, r);
            break;
        }
        // --refresh-bundle: the next repack diffs against this state, so each adds one layer.
        await run('umoci', ['repack', '--refresh-bundle', ...history, '--image', img, bundle]);
      }
      await uncompressLayers(tmp, tag, spec.layers.flatMap((r, i) => (r.uncompressed === true ? [i] : [])));
      await run('umoci', ['gc', '--layout', tmp]); // drop the intermediate manifests and blobs
    } finally {
      await fsp.rm(bundle, { recursive: true, force: true });
    }
  });
  return readImage(dir, tag);
}

// ---------------------------------------------------------------------------------------
// Default images

export const DEFAULT_IMAGE_SPECS = Object.freeze({
  /** busybox + ~1 MiB of /usr/share/doc: every layer under the 10 MiB minimum layer size. */
  small: {
    name: 'small',
    layers: [{ kind: 'busybox' }, { kind: 'files', from: ['/usr/share/doc'], maxBytes: 1 << 20 }],
  } satisfies ImageSpec,
  /**
   * busybox; ~48 MiB (about 17 MiB gzipped, above the 10 MiB minimum layer size) of real files from /usr/lib and /usr/share; a tiny layer; and ~4 MiB of
   * /usr/share/zoneinfo, i18n, perl5 as a plain (uncompressed) tar.
   */
  multi: {
    name: 'multi',
    layers: [
      { kind: 'busybox' },
      { kind: 'files', from: ['/usr/lib', '/usr/share'], maxBytes: 48 << 20 },
      { kind: 'small' },
      { kind: 'files', from: ['/usr/share/zoneinfo', '/usr/share/i18n', '/usr/share/perl5'], maxBytes: 4 << 20, uncompressed: true },
    ],
  } satisfies ImageSpec,
});

/**
 * The image of the mount test: every kind of entry a layer filesystem must show, in upper
 * layers over lower ones, and one layer big enough to be mounted lazily:
 * 0. busybox (about 1 MB: below the 10 MiB minimum layer size, so unpacked);
 * 1. about 128 MiB of tar from /usr/share and /usr/lib (tens of MB gzipped: indexed, mounted lazily);
 * 2. the special tree at /srv/special (hardlinks, symlinks, long names, user.* xattrs,
 *    devices, a fifo, modes, owners, odd mtimes);
 * 3. deletions: a busybox applet, two files of /srv/special, and from layer 1 the first three
 *    files and first directory under /usr/share (whiteouts `.wh.NAME`), plus a rewritten file;
 * 4. opaque directories (`.wh..wh..opq`, hand-made): /srv/special/docs and the first
 *    directory under /usr/lib, each with new contents.
 */
export const MOUNT_IMAGE_SPEC = Object.freeze({
  name: 'mount',
  layers: [
    { kind: 'busybox' },
    { kind: 'files', from: ['/usr/share', '/usr/lib'], maxBytes: 256 << 20 },
    { kind: 'special-tree', at: '/srv/special' },
    {
      kind: 'change',
      remove: ['/bin/vi', '/srv/special/empty/file', '/srv/special/utf8/日本語.txt'],
      removeFirst: [{ under: '/usr/share', files: 3, dirs: 1 }],
      write: { '/srv/special/times/half': 'rewritten in an upper layer\n' },
    },
    { kind: 'opaque', dirs: ['/srv/special/docs'], firstDirUnder: ['/usr/lib'] },
  ],
} satisfies ImageSpec);

export interface DefaultImages {
  small: BuiltImage;
  multi: BuiltImage;
}

/** The two standard test images (built once, then cached under `cacheDir`). */
export async function defaultImages(cacheDir: string = testCacheDir()): Promise<DefaultImages> {
  const [small, multi] = await Promise.all([buildImage(cacheDir, DEFAULT_IMAGE_SPECS.small), buildImage(cacheDir, DEFAULT_IMAGE_SPECS.multi)]);
  return { small, multi };
}

// ---------------------------------------------------------------------------------------
// Pushing

const MANIFEST_ACCEPT = [MEDIA_TYPES.manifest, MEDIA_TYPES.index, MEDIA_TYPES.dockerManifest, MEDIA_TYPES.dockerManifestList].join(', ');

/** GETs a manifest from the registry (auth handled) and checks its digest. */
export async function getManifest(registry: Registry, repo: string, reference: string): Promise<{ digest: string; mediaType: string; bytes: Buffer }> {
  const res = await registryRequest(registry, `/v2/${repo}/manifests/${reference}`, { headers: { accept: MANIFEST_ACCEPT } });
  if (res.status !== 200) {
    throw new RegistryError(`GET manifest ${repo}:${reference} answered ${res.status}: ${res.body.toString('utf8').slice(0, 300)}`);
  }
  const digest = `sha256:${createHash('sha256').update(res.body).digest('hex')}`;
  const said = res.headers['docker-content-digest'];
  if (typeof said === 'string' && said !== digest) throw new RegistryError(`manifest ${repo}:${reference}: Docker-Content-Digest ${said} but body hashes to ${digest}`);
  return { digest, mediaType: String(res.headers['content-type'] ?? ''), bytes: res.body };
}

/**
 * Pushes `layoutDir:tag` to `registry` as `repo:tag` with skopeo (with the registry's
 * credentials when it has auth), then reads back what the registry serves. With
 * `--preserve-digests`, since skopeo otherwise gzips plain-tar layers on the way to a
 * docker:// registry: the registry then serves exactly the layout's manifest and blobs.
 */
export async function pushImage(layoutDir: string, tag: string, registry: Registry, repo: string): Promise<PushedImage> {
  await skopeoCopy(`oci:${layoutDir}:${tag}`, `docker://${registry.host}/${repo}:${tag}`, {
    destCreds: registry.credentials,
    extraArgs: ['--preserve-digests'],
  });
  const m = await getManifest(registry, repo, tag);
  const manifest = JSON.parse(m.bytes.toString('utf8')) as OciManifest;
  if (!Array.isArray(manifest.layers)) throw new RegistryError(`manifest of ${repo}:${tag} has no layers (${m.mediaType})`);
  return {
    ref: `${registry.host}/${repo}:${tag}`,
    digestRef: `${registry.host}/${repo}@${m.digest}`,
    repo,
    tag,
    manifestDigest: m.digest,
    manifest,
    manifestBytes: m.bytes,
    configDigest: manifest.config.digest,
    layers: manifest.layers.map((l) => ({ digest: l.digest, size: l.size, mediaType: l.mediaType })),
  };
}

/**
 * unpackLayer against independent oracles:
 * - GNU tar extraction of the same layer as root (`tar -xpf --same-owner --xattrs
 *   --xattrs-include='*' --numeric-owner`) followed by the documented whiteout conversion
 *   (`.wh.NAME` → a mode-0 0/0 character device NAME with the whiteout's owner and mtime,
 *   `.wh..wh..opq` → trusted.overlay.opaque=y on its directory, other `.wh..wh.*` dropped):
 *   every path's type, mode, owner, size, mtime (to the microsecond: Node's utimes limit),
 *   symlink target, rdev, xattrs, hardlink identity and content sha256 must be equal, for the
 *   'special' and 'usr-small' fixture layers, gzip and plain, fed from a file stream;
 * - `umoci unpack` of a real three-layer image with whiteouts (built here with umoci from real
 *   files): our layers, fetched from a real registry through the fetcher and stacked as
 *   overlayfs lowerdirs, must show exactly umoci's rootfs; our diffIDs must be the config's;
 * - hand-made hostile tars: nothing is written outside the destination (a sentinel directory
 *   and a secret file outside are compared before and after);
 * - truncated gzip, truncated tar, corrupt gzip, digest mismatch, zstd, abort, a failing source:
 *   typed UnpackErrors naming the digest, and no directory left behind.
 * Prints unpack MB/s against `tar -xzf` of the same layer (a figure, not an assertion).
 */
import t from 'tap';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import * as fsp from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { RegistryClient, jsonLogger, MEDIA_TYPE_OCI_LAYER, MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_OCI_LAYER_ZSTD, MEDIA_TYPE_DOCKER_LAYER_GZIP, type Logger } from '../../fetcher/index.js';
import { UnpackError, removeUnpackLeftovers, unpackLayer, type UnpackResult } from '../../fs/unpack.js';
import { cached, layer, run, testCacheDir, SPECIAL, type LayerSpec } from '../helpers/layers.js';
import { defaultImages, pushImage, readImage, type BuiltImage } from '../helpers/images.js';
import { startRegistry } from '../helpers/registry.js';

const CACHE = testCacheDir();
const work = await fsp.mkdtemp(path.join(tmpdir(), 'soci-ts-unpack-'));
t.teardown(() => fsp.rm(work, { recursive: true, force: true }));
let seq = 0;
const fresh = (name: string): string => path.join(work, `${name}-${++seq}`);

// ---------------------------------------------------------------------------------------
// Helpers

const sha256 = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

async function fileDigest(p: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(p)) h.update(c as Buffer);
  return `sha256:${h.digest('hex')}`;
}

interface LogLine {
  level: string;
  msg: string;
  [k: string]: unknown;
}

function captureLogger(): { logger: Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  return { logger: jsonLogger('debug', { write: (l: string) => lines.push(JSON.parse(l) as LogLine) }), lines };
}

async function unpackFile(file: string, mediaType: string, dest: string, logger?: Logger): Promise<UnpackResult> {
  return unpackLayer({ source: createReadStream(file, { highWaterMark: 64 << 10 }), mediaType, digest: await fileDigest(file), dest, logger });
}

async function unpackBytes(bytes: Buffer, mediaType: string, dest: string, opts: { digest?: string; logger?: Logger } = {}): Promise<UnpackResult> {
  async function* src(): AsyncGenerator<Buffer> {
    for (let i = 0; i < bytes.length; i += 7000) yield bytes.subarray(i, i + 7000); // odd chunks: headers split across them
  }
  return unpackLayer({ source: src(), mediaType, digest: opts.digest ?? `sha256:${sha256(bytes)}`, dest, logger: opts.logger });
}

/** What the oracle compares of each path. */
interface Stat {
  type: string;
  mode: string;
  uid: number;
  gid: number;
  size: number;
  mtimeUs: string;
  target: string;
  rdev: string;
  xattrs: string;
  sha256: string;
  /** Other names of the same inode (hardlink identity). */
  links: string;
}

const TYPE_BITS: Record<number, string> = { 0o040000: 'dir', 0o100000: 'file', 0o120000: 'symlink', 0o020000: 'char', 0o060000: 'block', 0o010000: 'fifo' };

/** Every path under `root` (root itself as '.'), with getfattr's view of its xattrs. */
async function snapshot(root: string): Promise<Map<string, Stat>> {
  const out = new Map<string, Stat>();
  const inodes = new Map<string, string[]>();
  const keyOf = new Map<string, string>();
  const walk = async (rel: string): Promise<void> => {
    const abs = rel === '.' ? root : path.join(root, rel);
    const st = await fsp.lstat(abs, { bigint: true });
    const type = TYPE_BITS[Number(st.mode) & 0o170000] ?? `mode ${st.mode.toString(8)}`;
    let target = '';
    let digest = '';
    if (type === 'symlink') target = await fsp.readlink(abs);
    if (type === 'file') {
      const h = createHash('sha256');
      for await (const c of createReadStream(abs)) h.update(c as Buffer);
      digest = h.digest('hex');
    }
    out.set(rel, {
      type,
      mode: (Number(st.mode) & 0o7777).toString(8),
      uid: Number(st.uid),
      gid: Number(st.gid),
      size: type === 'file' || type === 'symlink' ? Number(st.size) : 0,
      mtimeUs: (st.mtimeNs / 1000n).toString(),
      target,
      rdev: type === 'char' || type === 'block' ? `${Number(st.rdev) >> 8 & 0xfff}:${(Number(st.rdev) & 0xff) | ((Number(st.rdev) >> 12) & 0xfff00)}` : '',
      xattrs: '',
      sha256: digest,
      links: '',
    });
    if (type !== 'dir') {
      const key = `${st.dev}:${st.ino}`;
      keyOf.set(rel, key);
      inodes.set(key, [...(inodes.get(key) ?? []), rel]);
    } else {
      for (const name of (await fsp.readdir(abs)).sort()) await walk(rel === '.' ? name : `${rel}/${name}`);
    }
  };
  await walk('.');
  for (const [rel, key] of keyOf) {
    const names = inodes.get(key) ?? [];
    if (names.length > 1) (out.get(rel) as Stat).links = names.filter((n) => n !== rel).sort().join(',');
  }
  // xattrs: getfattr over the whole tree (-P/-h: never follow symlinks; -m -: every namespace).
  const dump = (await run('getfattr', ['-R', '-P', '-h', '-d', '-m', '-', '-e', 'hex', '.'], { cwd: root, okCodes: [0, 1] })).stdout;
  let cur: Stat | undefined;
  for (const line of dump.split('\n')) {
    if (line.startsWith('# file: ')) {
      const rel = unescapeOctal(line.slice(8));
      cur = out.get(rel === '.' ? '.' : rel.replace(/^\.\//, ''));
      if (cur === undefined) throw new Error(`getfattr named ${JSON.stringify(rel)}, not in the walk of ${root}`);
    } else if (line !== '' && cur !== undefined) {
      cur.xattrs += (cur.xattrs === '' ? '' : ' ') + line;
    }
  }
  return out;
}

function unescapeOctal(s: string): string {
  const bytes: number[] = [];
  for (let i = 0; i < s.length; i++) {
    if (s[i] === '\\' && /^[0-7]{3}$/.test(s.slice(i + 1, i + 4))) {
      bytes.push(parseInt(s.slice(i + 1, i + 4), 8));
      i += 3;
    } else {
      for (const b of Buffer.from(s[i] as string, 'utf8')) bytes.push(b);
    }
  }
  return Buffer.from(bytes).toString('utf8');
}

/** Differences between two snapshots, as readable lines. */
function differences(got: Map<string, Stat>, want: Map<string, Stat>, ignore: (rel: string, field: keyof Stat) => boolean = () => false): string[] {
  const out: string[] = [];
  for (const [rel, w] of want) {
    const g = got.get(rel);
    if (g === undefined) {
      out.push(`missing ${rel}`);
      continue;
    }
    for (const k of Object.keys(w) as Array<keyof Stat>) {
      if (g[k] !== w[k] && !ignore(rel, k)) out.push(`${rel}: ${k} ${JSON.stringify(g[k])} != ${JSON.stringify(w[k])}`);
    }
  }
  for (const rel of got.keys()) if (!want.has(rel)) out.push(`extra ${rel}`);
  return out;
}

async function lstatOrNull(p: string): Promise<import('node:fs').Stats | null> {
  try {
    return await fsp.lstat(p);
  } catch {
    return null;
  }
}

/** Entries of `dir` that an unpack of `dest` left: `dest` itself and its temporary names. */
async function leftovers(dest: string): Promise<string[]> {
  const names = await fsp.readdir(path.dirname(dest)).catch(() => [] as string[]);
  return names.filter((n) => n === path.basename(dest) || n.startsWith(`${path.basename(dest)}.tmp-`));
}

/**
 * The oracle: GNU tar extraction as root, then the whiteout conversion the module documents
 * (with the parent directories' mtimes put back, as tar had set them).
 */
async function tarOracle(layerPath: string, dest: string): Promise<void> {
  await fsp.mkdir(dest);
  // Exit 2 only for whiteouts under a path the layer made a file (umoci writes those): GNU tar
  // cannot create them ("Not a directory"), and they have nothing to hide.
  // --delay-directory-restore: directory times at the end, as the tar need not keep a
  // directory's entries together (umoci sorts `d.x/...` between `d/` and `d/f`).
  const res = await run('tar', ['-xpf', layerPath, '-C', dest, '--same-owner', '--xattrs', '--xattrs-include=*', '--numeric-owner', '--delay-directory-restore'], { okCodes: [0, 2] });
  if (res.code === 2) {
    const errors = res.stderr.split('\n').filter((l) => l !== '' && !/^tar: Exiting with failure status/.test(l));
    const other = errors.filter((l) => !/^tar: .*\/\.wh\.[^/:]*: Cannot open: Not a directory$/.test(l));
    if (other.length > 0 || errors.length === 0) throw new Error(`tar -x of ${layerPath} failed: ${res.stderr}`);
  }
  const whiteouts: string[] = [];
  const find = async (rel: string): Promise<void> => {
    for (const ent of await fsp.readdir(path.join(dest, rel), { withFileTypes: true })) {
      const r = rel === '' ? ent.name : `${rel}/${ent.name}`;
      if (ent.name.startsWith('.wh.')) whiteouts.push(r);
      else if (ent.isDirectory()) await find(r);
    }
  };
  await find('');
  for (const wh of whiteouts) {
    const abs = path.join(dest, wh);
    const parent = path.dirname(abs);
    const parentTime = (await fsp.lstat(parent, { bigint: true })).mtimeNs;
    const st = await fsp.lstat(abs, { bigint: true });
    const base = path.basename(wh);
    await fsp.rm(abs);
    if (base === '.wh..wh..opq') {
      await run('setfattr', ['-n', 'trusted.overlay.opaque', '-v', 'y', parent]);
    } else if (!base.startsWith('.wh..wh.')) {
      const target = path.join(parent, base.slice(4));
      await run('mknod', ['-m', '0', target, 'c', '0', '0']);
      await fsp.lchown(target, Number(st.uid), Number(st.gid));
      await run('touch', ['-h', '-d', `@${st.mtimeNs / 1_000_000_000n}.${String(st.mtimeNs % 1_000_000_000n).padStart(9, '0')}`, target]);
    }
    await run('touch', ['-h', '-d', `@${parentTime / 1_000_000_000n}.${String(parentTime % 1_000_000_000n).padStart(9, '0')}`, parent]);
  }
}

/** `gzip -dc | sha256sum` and `| wc -c` (or of the file itself when it is not gzip). */
async function tarOf(layerPath: string): Promise<{ size: number; digest: string }> {
  const head = Buffer.alloc(2);
  const fh = await fsp.open(layerPath, 'r');
  await fh.read(head, 0, 2, 0);
  await fh.close();
  const cat = head[0] === 0x1f && head[1] === 0x8b ? 'gzip -dc "$1"' : 'cat "$1"';
  const res = await run('sh', ['-c', `${cat} | sha256sum; ${cat} | wc -c`, 'sh', layerPath]);
  const [sumLine, sizeLine] = res.stdout.trim().split('\n');
  return { size: Number(sizeLine?.trim()), digest: `sha256:${sumLine?.split(' ')[0] ?? ''}` };
}

// ---------------------------------------------------------------------------------------
// A tar writer for hand-made (hostile) layers

interface TarEntry {
  name: string;
  type?: '0' | '1' | '2' | '3' | '4' | '5' | '6' | 'g';
  data?: string | Buffer;
  linkname?: string;
  mode?: number;
  uid?: number;
  gid?: number;
  mtime?: number;
  devmajor?: number;
  devminor?: number;
  /** Extra PAX records (e.g. SCHILY.xattr.*). */
  pax?: Record<string, string>;
}

function paxRecord(k: string, v: string): Buffer {
  const body = Buffer.from(` ${k}=${v}\n`, 'utf8');
  let len = body.length + 1;
  while (String(len).length + body.length !== len) len = String(len).length + body.length;
  return Buffer.concat([Buffer.from(String(len)), body]);
}

function header(name: string, type: string, size: number, e: TarEntry): Buffer {
  const b = Buffer.alloc(512);
  b.write(name, 0, 100, 'utf8');
  const oct = (v: number, off: number, len: number): void => void b.write(v.toString(8).padStart(len - 1, '0'), off, len - 1, 'latin1');
  oct(e.mode ?? (type === '5' ? 0o755 : 0o644), 100, 8);
  oct(e.uid ?? 0, 108, 8);
  oct(e.gid ?? 0, 116, 8);
  oct(size, 124, 12);
  oct(e.mtime ?? 1700000000, 136, 12);
  b.write(type, 156, 1, 'latin1');
  b.write((e.linkname ?? '').slice(0, 100), 157, 100, 'utf8');
  b.write('ustar\x0000', 257, 8, 'latin1');
  oct(e.devmajor ?? 0, 329, 8);
  oct(e.devminor ?? 0, 337, 8);
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (const c of b) sum += c;
  b.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1');
  return b;
}

const pad = (n: number): Buffer => Buffer.alloc((512 - (n % 512)) % 512);

function makeTar(entries: readonly TarEntry[], end = true): Buffer {
  const parts: Buffer[] = [];
  for (const e of entries) {
    const type = e.type ?? '0';
    const data = typeof e.data === 'string' ? Buffer.from(e.data) : (e.data ?? Buffer.alloc(0));
    const records: Buffer[] = [];
    if (Buffer.byteLength(e.name) > 100) records.push(paxRecord('path', e.name));
    if (e.linkname !== undefined && Buffer.byteLength(e.linkname) > 100) records.push(paxRecord('linkpath', e.linkname));
    for (const [k, v] of Object.entries(e.pax ?? {})) records.push(paxRecord(k, v));
    if (records.length > 0) {
      const p = Buffer.concat(records);
      parts.push(header('PaxHeaders/x', type === 'g' ? 'g' : 'x', p.length, {} as TarEntry), p, pad(p.length));
      if (type === 'g') continue;
    }
    parts.push(header(e.name, type, data.length, e), data, pad(data.length));
  }
  if (end) parts.push(Buffer.alloc(1024));
  return Buffer.concat(parts);
}

// ---------------------------------------------------------------------------------------
// 1. The fixture layers against GNU tar + whiteout conversion

const FIXTURES: Array<{ spec: LayerSpec; mediaType: string }> = [
  { spec: { tree: 'special', format: 'posix', compression: 'gzip-6' }, mediaType: MEDIA_TYPE_OCI_LAYER_GZIP },
  { spec: { tree: 'special', format: 'posix', compression: 'none' }, mediaType: MEDIA_TYPE_OCI_LAYER },
  { spec: { tree: 'special', format: 'gnu', compression: 'multi-member' }, mediaType: MEDIA_TYPE_DOCKER_LAYER_GZIP },
  { spec: { tree: 'usr-small', format: 'gnu', compression: 'gzip-6' }, mediaType: MEDIA_TYPE_OCI_LAYER_GZIP },
  { spec: { tree: 'usr-small', format: 'posix', compression: 'none' }, mediaType: MEDIA_TYPE_OCI_LAYER },
];

for (const { spec, mediaType } of FIXTURES) {
  t.test(`${spec.tree} ${spec.format} ${spec.compression}: equal to GNU tar + whiteout conversion`, async (t) => {
    const file = await layer(CACHE, spec);
    const ours = fresh('ours');
    const oracle = fresh('oracle');
    const { logger, lines } = captureLogger();
    const res = await unpackFile(file, mediaType, ours, logger);
    await tarOracle(file, oracle);
    const [got, want] = await Promise.all([snapshot(ours), snapshot(oracle)]);
    const diff = differences(got, want);
    t.same(diff.slice(0, 30), [], `${want.size} paths: type, mode, owner, size, mtime (µs), target, rdev, xattrs, hardlinks and sha256 equal`);

    const tar = await tarOf(file);
    const listed = (await run('tar', ['-tf', file])).stdout.split('\n').filter((l) => l !== '').length;
    t.equal(res.diffID, tar.digest, 'diffID is sha256 of gzip -dc');
    t.equal(res.tarBytes, tar.size, 'tarBytes is the size of gzip -dc');
    t.equal(res.bytes, (await fsp.stat(file)).size, 'bytes is the blob size');
    t.equal(res.entries, listed, 'entries counts what tar -t lists');
    t.same(await leftovers(ours), [path.basename(ours)], 'no temporary directory left');
    t.same(lines.filter((l) => l.level === 'warn'), [], 'no warnings');

    if (spec.tree === 'special') {
      t.equal(res.whiteouts, 2, 'two whiteouts converted');
      const wh = got.get('whiteout/foo');
      t.match(wh, { type: 'char', mode: '0', rdev: '0:0', uid: 0, gid: 0 }, '.wh.foo became a 0/0 character device with mode 0');
      t.notOk(got.has('whiteout/.wh.foo') || got.has('whiteout/opq/.wh..wh..opq'), 'whiteout files themselves are not created');
      t.equal(got.get('whiteout/opq')?.xattrs, 'trusted.overlay.opaque=0x79', 'opaque marker became trusted.overlay.opaque=y');
      t.equal(got.get('whiteout/opq/kept')?.type, 'file', 'the opaque directory keeps its own entries');
      t.equal(got.get('links/hard-b')?.links, 'links/hard-a,other/hard-c', 'hardlinks share one inode');
      t.equal(got.get('modes/all-bits')?.mode, '7777', 'setuid/setgid/sticky kept (chmod after chown)');
      t.equal(got.get('owners/big-ids')?.uid, SPECIAL.owners['owners/big-ids'][0], 'big uid');
      t.equal(got.get('dev/big-numbers')?.rdev, '300:70000', 'device numbers');
      if (spec.format === 'posix') {
        t.match(got.get('xattr/file')?.xattrs, /user\.foo=0x626172/, 'xattrs from PAX records');
        // PAX carries ns; Node's utimes keeps µs (libuv): the documented truncation, exactly.
        const st = await fsp.lstat(path.join(ours, 'times/subsecond'), { bigint: true });
        t.equal(st.mtimeNs, 1614834367123456000n, 'sub-second mtime kept to the microsecond');
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// 2. A real image with whiteouts: from the registry, stacked as overlay lowerdirs = umoci unpack

/** A 3-layer image built with umoci from real files: layer 2 deletes, replaces and re-types; layer 3 re-creates. */
async function whiteoutImage(): Promise<BuiltImage> {
  const dir = await cached(path.join(CACHE, 'image-unpack-whiteouts-v2'), async (tmp) => {
    const bundle = `${tmp}.bundle`;
    const img = `${tmp}:latest`;
    try {
      await run('umoci', ['init', '--layout', tmp]);
      await run('umoci', ['new', '--image', img]);
      await run('umoci', ['unpack', '--image', img, bundle]);
      const r = path.join(bundle, 'rootfs');
      const sh = (script: string): Promise<unknown> => run('sh', ['-euc', script, 'sh', r]);
      await sh(`cd "$1"
        mkdir -p usr/share etc gone opq dir-to-file dev
        for p in bash coreutils tar gzip sed grep findutils; do [ -d /usr/share/doc/$p ] && cp -a /usr/share/doc/$p usr/share/ || true; done
        cp -a /usr/share/zoneinfo/Europe usr/share/zoneinfo-europe 2>/dev/null || cp -a /usr/share/doc/apt usr/share/zoneinfo-europe
        echo keep > etc/keep.txt; echo one > gone/a; echo two > gone/b; mkdir gone/sub; echo three > gone/sub/c
        echo a > opq/a; echo b > opq/b; echo f > file-to-dir; echo c > dir-to-file/child
        ln -s usr/share lnk; echo linked > etc/hard1; ln etc/hard1 etc/hard2
        echo suid > etc/suid; chown 1000:1000 etc/suid; chmod 4755 etc/suid
        mkfifo dev/fifo; mknod dev/null-like c 1 3
        setfattr -n user.layer -v one etc/keep.txt
        touch -h -d @1600000000 etc etc/keep.txt lnk`);
      await run('umoci', ['repack', '--refresh-bundle', '--image', img, bundle]);
      await sh(`cd "$1"
        rm -rf gone opq/a usr/share/bash/README* etc/hard2
        rm file-to-dir; mkdir file-to-dir; echo now-a-dir > file-to-dir/x
        rm -rf dir-to-file; echo now-a-file > dir-to-file
        chmod 0700 etc/keep.txt; echo changed >> usr/share/coreutils/copyright
        mkdir -p new/deeper; echo n > new/deeper/n; setfattr -n user.dirattr -v d new
        rm lnk; ln -s etc lnk
        touch -h -d @1600000000 etc`);
      await run('umoci', ['repack', '--refresh-bundle', '--image', img, bundle]);
      await sh(`cd "$1"
        mkdir gone; echo back > gone/again; rm -rf new/deeper; echo hard2 > etc/hard2
        # etc keeps the mtime layer 2 recorded, so this layer has a file in an unlisted (implicit) directory.
        touch -h -d @1600000000 etc`);
      await run('umoci', ['repack', '--refresh-bundle', '--image', img, bundle]);
      await run('umoci', ['gc', '--layout', tmp]);
    } finally {
      await fsp.rm(bundle, { recursive: true, force: true });
    }
  });
  return readImage(dir, 'latest');
}

const registryImages: Array<{ name: string; image: () => Promise<BuiltImage> }> = [
  { name: 'whiteouts', image: whiteoutImage },
  { name: 'multi', image: async () => (await defaultImages()).multi },
];

for (const { name, image: build } of registryImages) t.test(`${name}: a real image from the registry, stacked as overlay lowerdirs, equals umoci unpack`, async (t) => {
  const image = await build();
  t.comment(`${image.layers.length} layers: ${image.layers.map((l) => `${l.mediaType.split('.').pop()} ${l.size}`).join(', ')}`);
  const reg = await startRegistry();
  t.teardown(() => reg.stop());
  const pushed = await pushImage(image.layoutDir, image.tag, reg, `unpack/${name}`);
  const client = new RegistryClient({ hostsDir: '' });
  t.teardown(() => client.close());
  const repo = client.repository(`${reg.host}/${pushed.repo}:${pushed.tag}`);

  // The intended wiring: the fetcher's blob stream straight into unpackLayer.
  const dirs: string[] = [];
  for (const [i, desc] of pushed.layers.entries()) {
    const dest = fresh(`layer${i}`);
    const parents = [...dirs].reverse();
    const res = await unpackLayer({ source: repo.blobStream(desc), mediaType: desc.mediaType, digest: desc.digest, dest, parents });
    t.equal(res.diffID, image.layers[i]?.diffId, `layer ${i}: diffID equals the config's diff_id`);
    t.equal(res.bytes, desc.size, `layer ${i}: ${desc.size} blob bytes`);
    dirs.push(dest);
    // Each layer on its own against GNU tar of the same blob.
    const oracle = fresh(`layer${i}-tar`);
    const blob = image.layers[i]?.path ?? '';
    await tarOracle(blob, oracle);
    // Directories without an entry in this layer take their metadata from the parents (checked
    // in the merged view below), where GNU tar makes them 0755 and now.
    const listed = new Set((await run('tar', ['-tf', blob])).stdout.split('\n').filter((n) => n !== '').map((n) => n.replace(/^(\.\/)+|\/+$/g, '') || '.'));
    const implicit = (rel: string, field: string): boolean => !listed.has(rel) && ['mtimeUs', 'mode', 'uid', 'gid', 'xattrs'].includes(field);
    const ownSnap = await snapshot(dest);
    t.same(differences(ownSnap, await snapshot(oracle), implicit).slice(0, 30), [], `layer ${i} equals GNU tar + whiteout conversion`);
    if (i > 0 && name === 'whiteouts') {
      const implicitDirs = [...ownSnap.keys()].filter((rel) => !listed.has(rel) && ownSnap.get(rel)?.type === 'dir');
      t.ok(implicitDirs.length > 0, `layer ${i} has implicit parent directories (${implicitDirs.slice(0, 4).join(', ')})`);
    }
  }
  if (name === 'whiteouts') {
    const whiteoutsIn2 = (await snapshot(dirs[1] ?? '')).get('gone');
    t.match(whiteoutsIn2, { type: 'char', rdev: '0:0' }, 'layer 1 holds the whiteout of gone/');
  }

  const bundle = fresh('umoci');
  await run('umoci', ['unpack', '--image', `${image.layoutDir}:${image.tag}`, bundle]);
  const mnt = fresh('merged');
  await fsp.mkdir(mnt);
  await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${[...dirs].reverse().join(':')}`, mnt]);
  t.teardown(() => run('umount', [mnt]).catch(() => undefined));
  const [got, want] = await Promise.all([snapshot(mnt), snapshot(path.join(bundle, 'rootfs'))]);
  if (name === 'whiteouts') {
    t.ok(want.has('gone/again') && !want.has('gone/a') && !want.has('opq/a') && want.get('dir-to-file')?.type === 'file', 'umoci applied the whiteouts');
  }
  // Hardlink identity through overlayfs: lower inodes are reported per layer; compare names only.
  t.same(differences(got, want).slice(0, 30), [], `the merged view equals umoci's rootfs (${want.size} paths)`);
  await run('umount', [mnt]);
});

// ---------------------------------------------------------------------------------------
// 3. Semantics on hand-made layers

t.test('later entries replace earlier ones; directories merge; same-layer whiteouts; PAX global headers', async (t) => {
  const { logger, lines } = captureLogger();
  const dest = fresh('replace');
  const tar = makeTar([
    { name: './', type: '5', mode: 0o750, uid: 7, gid: 8, mtime: 1600000001 },
    { name: 'g', type: 'g', pax: { comment: 'a global header (git archive writes one)' } },
    { name: 'd/', type: '5', mode: 0o700, mtime: 1600000002, pax: { 'SCHILY.xattr.user.first': 'x' } },
    { name: 'd/a', data: 'first a' },
    { name: 'd/', type: '5', mode: 0o755, uid: 5, gid: 6, mtime: 1600000003, pax: { 'SCHILY.xattr.user.second': 'y' } },
    { name: 'd/b', data: 'b' },
    { name: 'f', data: 'a file that becomes a directory' },
    { name: 'f/', type: '5' },
    { name: 'f/inside', data: 'inside' },
    { name: 'x/', type: '5' },
    { name: 'x/child', data: 'gone with x' },
    { name: 'x', data: 'a directory replaced by a file' },
    { name: 's', type: '2', linkname: 'd' },
    { name: 's', data: 'a symlink replaced by a file' },
    { name: 'same', data: 'kept: a whiteout does not hide its own layer' },
    { name: '.wh.same', mode: 0o600 },
    { name: '.wh.later' , uid: 3, gid: 4 },
    { name: 'later', data: 'replaces the whiteout device' },
    { name: '.wh..wh.plnk', type: '5' },
    { name: 'dev/c', type: '3', devmajor: 5, devminor: 1 },
    { name: 'dev/hard-to-c', type: '1', linkname: 'dev/c' },
    { name: 'lnk', type: '2', linkname: 'd/a', pax: { 'SCHILY.xattr.user.on-symlink': 'refused by the kernel' } },
    { name: 'lnk-hard', type: '1', linkname: 'lnk' },
    { name: 'a/b/c/implicit', data: 'parents created 0755' },
  ]);
  const res = await unpackBytes(tar, MEDIA_TYPE_OCI_LAYER, dest, { logger });
  const s = await snapshot(dest);
  t.match(s.get('.'), { mode: '750', uid: 7, gid: 8, mtimeUs: '1600000001000000' }, 'the root entry sets the root directory');
  t.match(s.get('d'), { type: 'dir', mode: '755', uid: 5, gid: 6, mtimeUs: '1600000003000000', xattrs: 'user.first=0x78 user.second=0x79' }, 'dir over dir merges (last metadata, both xattrs), mtime set after its contents');
  t.ok(s.has('d/a') && s.has('d/b'), 'merged directory keeps entries from before and after');
  t.match(s.get('f'), { type: 'dir' }, 'file replaced by a directory');
  t.match(s.get('x'), { type: 'file', sha256: sha256(Buffer.from('a directory replaced by a file')) }, 'directory replaced by a file');
  t.notOk(s.has('x/child'), 'the replaced directory went with its contents');
  t.match(s.get('s'), { type: 'file' }, 'symlink replaced by a file');
  t.match(s.get('same'), { type: 'file' }, 'a whiteout does not hide an entry of its own layer');
  t.match(s.get('later'), { type: 'file' }, 'an entry after its whiteout replaces the device');
  t.notOk(s.has('.wh..wh.plnk') || s.has('.wh.plnk'), 'other .wh..wh.* entries are skipped');
  t.equal(s.get('dev/hard-to-c')?.links, 'dev/c', 'hardlink to a device node');
  t.equal(s.get('lnk-hard')?.links, 'lnk', 'hardlink to a symlink');
  t.equal(s.get('lnk')?.xattrs, '', 'user.* xattr on a symlink not set');
  t.ok(lines.some((l) => l.level === 'warn' && l.xattr === 'user.on-symlink'), 'and warned about');
  t.match(s.get('a/b'), { type: 'dir', mode: '755', uid: 0 }, 'implicit parents are 0755 root');
  t.equal(res.whiteouts, 1, 'one whiteout kept as a device (the other replaced; the same-layer one ignored)');
  t.ok(lines.some((l) => l.level === 'warn' && l.entry === '.wh..wh.plnk'), 'the skipped .wh..wh.plnk is named in a warning');
  t.equal(res.entries, 24 - 1, 'entries: every header but the global one');
});

t.test('hostile layers write nothing outside the destination', async (t) => {
  const outside = fresh('outside');
  const sentinel = path.join(outside, 'sentinel');
  await fsp.mkdir(sentinel, { recursive: true });
  await fsp.writeFile(path.join(outside, 'secret'), 'secret contents\n');
  const before = await snapshot(outside);
  const rel = (p: string, from: string): string => path.relative(from, p);

  interface Case {
    name: string;
    entries: TarEntry[];
    /** Entries expected in a warning (skipped). */
    warns?: string[];
    /** Expected inside dest afterwards (path → type). */
    inside?: Record<string, string>;
    /** The unpack must fail with this kind instead. */
    fails?: string;
  }
  const destFor = (c: string): string => path.join(work, `hostile-${c}`);
  const cases: Case[] = [
    { name: 'absolute-name', entries: [{ name: `${sentinel}/pwned`, data: 'x' }], inside: { [sentinel.slice(1) + '/pwned']: 'file' } },
    { name: 'dotdot', entries: [{ name: `../../../../../../../..${sentinel}/pwned`, data: 'x' }, { name: `a/../../${rel(sentinel, work)}/pwned`, data: 'x' }], warns: [`../../../../../../../..${sentinel}/pwned`, `a/../../${rel(sentinel, work)}/pwned`] },
    {
      name: 'symlink-parent-absolute',
      entries: [{ name: 'evil', type: '2', linkname: sentinel }, { name: 'evil/pwned', data: 'x' }, { name: 'evil/.wh.gone' }, { name: 'evil/opq/.wh..wh..opq' }],
      inside: { [sentinel.slice(1) + '/pwned']: 'file', [sentinel.slice(1) + '/gone']: 'char', [sentinel.slice(1) + '/opq']: 'dir', evil: 'symlink' },
    },
    {
      name: 'symlink-parent-relative',
      entries: [{ name: 'd/', type: '5' }, { name: 'd/evil', type: '2', linkname: '../../../../../../../../../..' + sentinel }, { name: 'd/evil/pwned', data: 'x' }],
      inside: { [sentinel.slice(1) + '/pwned']: 'file' },
    },
    {
      name: 'symlink-chain',
      entries: [{ name: 'l1', type: '2', linkname: 'l2' }, { name: 'l2', type: '2', linkname: '/' }, { name: 'l1/tmp/pwned', data: 'x' }, { name: `l1${outside}/secret`, data: 'overwritten?' }],
      inside: { 'tmp/pwned': 'file', [outside.slice(1) + '/secret']: 'file' },
    },
    { name: 'symlink-loop', entries: [{ name: 'loop1', type: '2', linkname: 'loop2' }, { name: 'loop2', type: '2', linkname: 'loop1' }, { name: 'loop1/x', data: 'x' }], warns: ['loop1/x'] },
    { name: 'symlink-then-file', entries: [{ name: 'f', type: '2', linkname: path.join(outside, 'secret') }, { name: 'f', data: 'not through the link' }], inside: { f: 'file' } },
    { name: 'symlink-then-dir', entries: [{ name: 'd', type: '2', linkname: sentinel }, { name: 'd/', type: '5' }, { name: 'd/x', data: 'x' }], inside: { d: 'dir', 'd/x': 'file' } },
    { name: 'hardlink-dotdot', entries: [{ name: 'h', type: '1', linkname: `../../../../../../../..${outside}/secret` }], warns: ['h'] },
    { name: 'hardlink-absolute', entries: [{ name: 'h', type: '1', linkname: path.join(outside, 'secret') }], fails: 'invalid-entry' },
    { name: 'hardlink-through-symlink', entries: [{ name: 'sl', type: '2', linkname: outside }, { name: 'h', type: '1', linkname: 'sl/secret' }], fails: 'invalid-entry' },
    { name: 'whiteout-names', entries: [{ name: 'w/.wh..' }, { name: 'w/.wh.' }, { name: '../.wh.x' }], warns: ['w/.wh..', 'w/.wh.', '../.wh.x'] },
    { name: 'pax-path', entries: [{ name: 'innocent', data: 'x', pax: { path: `/..${sentinel}/pwned-pax` } }], warns: [`/..${sentinel}/pwned-pax`] },
  ];
  for (const c of cases) {
    const dest = destFor(c.name);
    const { logger, lines } = captureLogger();
    const tar = makeTar(c.entries);
    if (c.fails !== undefined) {
      await t.rejects(unpackBytes(tar, MEDIA_TYPE_OCI_LAYER, dest, { logger }), { name: 'UnpackError', kind: c.fails }, `${c.name}: fails with ${c.fails}`);
      t.same(await leftovers(dest), [], `${c.name}: nothing left at dest`);
    } else {
      await unpackBytes(tar, MEDIA_TYPE_OCI_LAYER, dest, { logger });
      const warned = lines.filter((l) => l.level === 'warn').map((l) => l.entry);
      t.same(warned, c.warns ?? [], `${c.name}: skipped entries named in warnings`);
      const s = await snapshot(dest);
      for (const [p, type] of Object.entries(c.inside ?? {})) t.equal(s.get(p)?.type, type, `${c.name}: ${p} written inside dest`);
    }
    t.same(differences(await snapshot(outside), before), [], `${c.name}: nothing outside changed`);
    t.same(await fsp.readdir(sentinel), [], `${c.name}: sentinel still empty`);
  }
  t.equal((await fsp.stat(path.join(outside, 'secret'))).nlink, 1, 'no hardlink to the secret was made');
});

// ---------------------------------------------------------------------------------------
// 4. Bad input: typed errors, nothing left behind

t.test('truncated, corrupt, mismatched, unsupported, aborted, failing source', async (t) => {
  const gzFile = await layer(CACHE, { tree: 'special', format: 'posix', compression: 'gzip-6' });
  const tarFile = await layer(CACHE, { tree: 'special', format: 'posix', compression: 'none' });
  const gz = await fsp.readFile(gzFile);
  const plain = await fsp.readFile(tarFile);
  const expectError = async (name: string, p: Promise<unknown>, kind: string, digest: string, reason: RegExp, dest: string): Promise<void> => {
    const err = await p.then(() => null, (e: unknown) => e);
    t.type(err, UnpackError, `${name}: an UnpackError`);
    const u = err as UnpackError;
    t.equal(u.kind, kind, `${name}: kind ${kind}`);
    t.equal(u.digest, digest, `${name}: names the digest`);
    t.ok(u.message.includes(digest) && reason.test(u.message), `${name}: message names digest and reason (${u.message.slice(0, 200)})`);
    t.same(await leftovers(dest), [], `${name}: no directory left`);
  };

  const cutGz = gz.subarray(0, Math.floor(gz.length / 2));
  let d = fresh('cut-gz');
  await expectError('truncated gzip', unpackBytes(cutGz, MEDIA_TYPE_OCI_LAYER_GZIP, d), 'truncated', `sha256:${sha256(cutGz)}`, /gzip/, d);

  // Inside a file's data (the 1 MiB library), then inside a header.
  const cutData = plain.subarray(0, Math.floor(plain.length / 2));
  d = fresh('cut-tar');
  await expectError('truncated tar (data)', unpackBytes(cutData, MEDIA_TYPE_OCI_LAYER, d), 'truncated', `sha256:${sha256(cutData)}`, /truncated/, d);
  const cutHeader = plain.subarray(0, 512 * 3 + 100);
  d = fresh('cut-hdr');
  await expectError('truncated tar (header)', unpackBytes(cutHeader, MEDIA_TYPE_OCI_LAYER, d), 'truncated', `sha256:${sha256(cutHeader)}`, /truncated header/, d);

  const corrupt = Buffer.from(gz);
  for (let i = 2000; i < 2100; i++) corrupt[i] ^= 0x5a;
  d = fresh('corrupt');
  // Flipped deflate bytes: zlib may reject them, or inflate garbage that the tar walk rejects.
  await expectError('corrupt gzip', unpackBytes(corrupt, MEDIA_TYPE_OCI_LAYER_GZIP, d), 'corrupt', `sha256:${sha256(corrupt)}`, /bad gzip|bad tar/, d);

  const badHeader = Buffer.from(plain);
  badHeader[0] ^= 1; // the first header's checksum no longer matches
  d = fresh('bad-header');
  await expectError('bad tar checksum', unpackBytes(badHeader, MEDIA_TYPE_OCI_LAYER, d), 'corrupt', `sha256:${sha256(badHeader)}`, /checksum/, d);

  const wrong = `sha256:${sha256(Buffer.from('something else'))}`;
  d = fresh('mismatch');
  await expectError('digest mismatch', unpackBytes(gz, MEDIA_TYPE_OCI_LAYER_GZIP, d, { digest: wrong }), 'digest-mismatch', wrong, new RegExp(`sha256:${sha256(gz)}`), d);
  d = fresh('mismatch-cut');
  await expectError('digest mismatch of a truncated blob', unpackBytes(cutGz, MEDIA_TYPE_OCI_LAYER_GZIP, d, { digest: `sha256:${sha256(gz)}` }), 'digest-mismatch', `sha256:${sha256(gz)}`, /truncated/, d);

  let pulled = 0;
  async function* counting(): AsyncGenerator<Buffer> {
    pulled++;
    yield gz;
  }
  d = fresh('zstd');
  await expectError('zstd', unpackLayer({ source: counting(), mediaType: MEDIA_TYPE_OCI_LAYER_ZSTD, digest: `sha256:${sha256(gz)}`, dest: d }), 'unsupported-media-type', `sha256:${sha256(gz)}`, /zstd/, d);
  d = fresh('json');
  await expectError('not a layer', unpackLayer({ source: counting(), mediaType: 'application/json', digest: `sha256:${sha256(gz)}`, dest: d }), 'unsupported-media-type', `sha256:${sha256(gz)}`, /application\/json/, d);
  t.equal(pulled, 0, 'an unsupported media type reads nothing');
  d = fresh('baddigest');
  await expectError('bad digest', unpackLayer({ source: counting(), mediaType: MEDIA_TYPE_OCI_LAYER, digest: 'md5:abc', dest: d }), 'invalid-digest', 'md5:abc', /digest/, d);

  const exists = fresh('exists');
  await fsp.mkdir(exists);
  const err = await unpackBytes(gz, MEDIA_TYPE_OCI_LAYER_GZIP, exists).then(() => null, (e: unknown) => e);
  t.match(err, { name: 'UnpackError', kind: 'exists' }, 'an existing dest is refused');
  t.same(await fsp.readdir(exists), [], 'and left alone');

  const ac = new AbortController();
  async function* slow(): AsyncGenerator<Buffer> {
    for (let i = 0; i < plain.length; i += 65536) {
      if (i === 65536 * 4) ac.abort(new Error('test abort'));
      yield plain.subarray(i, i + 65536);
    }
  }
  d = fresh('abort');
  const aborted = await unpackLayer({ source: slow(), mediaType: MEDIA_TYPE_OCI_LAYER, digest: `sha256:${sha256(plain)}`, dest: d, signal: ac.signal }).then(() => null, (e: unknown) => e);
  t.match(aborted, { name: 'UnpackError', kind: 'aborted' }, 'abort: kind aborted');
  t.same(await leftovers(d), [], 'abort: no directory left');

  async function* failing(): AsyncGenerator<Buffer> {
    yield gz.subarray(0, 100000);
    throw new Error('connection reset by the test');
  }
  d = fresh('source');
  await expectError('failing source', unpackLayer({ source: failing(), mediaType: MEDIA_TYPE_OCI_LAYER_GZIP, digest: `sha256:${sha256(gz)}`, dest: d }), 'source', `sha256:${sha256(gz)}`, /connection reset by the test/, d);

  // A crash leaves dest.tmp-*: removeUnpackLeftovers clears them, and only them.
  const crashed = fresh('crashed');
  await fsp.mkdir(`${crashed}.tmp-0123456789ab`);
  await fsp.mkdir(`${crashed}.tmp-other`);
  t.same(await removeUnpackLeftovers(crashed), [`${crashed}.tmp-0123456789ab`], 'removeUnpackLeftovers removes the crash leftover');
  t.ok(await lstatOrNull(`${crashed}.tmp-other`), 'and nothing that is not one');
});

// ---------------------------------------------------------------------------------------
// 5. Throughput (printed, not asserted)

t.test('throughput against tar -xzf', async (t) => {
  const file = await layer(CACHE, { tree: 'usr-small', format: 'gnu', compression: 'gzip-6' });
  const size = (await fsp.stat(file)).size;
  const ours = fresh('bench-ours');
  const res = await unpackFile(file, MEDIA_TYPE_OCI_LAYER_GZIP, ours);
  const noSync = fresh('bench-nosync');
  const t1 = performance.now();
  await unpackLayer({ source: createReadStream(file), mediaType: MEDIA_TYPE_OCI_LAYER_GZIP, digest: await fileDigest(file), dest: noSync, sync: false });
  const msNoSync = performance.now() - t1;
  const theirs = fresh('bench-tar');
  await fsp.mkdir(theirs);
  const t0 = performance.now();
  await run('tar', ['-xzpf', file, '-C', theirs, '--numeric-owner']);
  const msTar = performance.now() - t0;
  const mb = (bytes: number, ms: number): string => ((bytes / 1e6) / (ms / 1000)).toFixed(1);
  t.comment(`usr-small layer: ${size} gzip bytes, ${res.tarBytes} tar bytes, ${res.entries} entries`);
  t.comment(`unpackLayer: ${res.ms.toFixed(0)} ms with syncfs (${mb(res.tarBytes, res.ms)} MB/s of tar), ${msNoSync.toFixed(0)} ms without (${mb(res.tarBytes, msNoSync)} MB/s)`);
  t.comment(`tar -xzf:    ${msTar.toFixed(0)} ms (${mb(res.tarBytes, msTar)} MB/s of tar)`);
  t.same(differences(await snapshot(ours), await snapshot(theirs), (rel) => rel === '.').slice(0, 10), [], 'both trees are the same');
});


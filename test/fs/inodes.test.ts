/**
 * The inode table of a layer against what applying the layer gives on disk.
 *
 * Oracle: GNU tar extracting the same layer as root (`tar -xpf --same-owner --xattrs
 * --xattrs-include='*' --numeric-owner`), walked with lstat, readlink and getfattr. For every
 * path: type, full st_mode, uid, gid, size, mtime (seconds + nanoseconds, the zTOC's own
 * precision), symlink target, device major/minor, xattrs, nlink and hardlink identity (paths
 * that share an inode on disk share one ino in the table); regular files' bytes at their data
 * offset against the file tar wrote.
 *
 * Overlay mode (the default) is checked against the extraction with the documented whiteout
 * conversion applied to it (`.wh.NAME` → a 0/0 character device NAME with mode 0 and the
 * entry's owner, `.wh..wh..opq` → `trusted.overlay.opaque=y` on its directory), and entry by
 * entry against `tar -tv`; `{ overlay: false }` equals the extraction as it is.
 *
 * Edge cases (hand-written tar headers) are checked against tar -x of the same archive where
 * GNU tar agrees with containerd; where they differ, against tar -x of an archive spelling out
 * what containerd's applier produces (the fs/inodes.ts header documents which side wins).
 */
import t, { type Test } from 'tap';
import { createHash } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { buildZtocFromFile, LayerIndex } from '../../ztoc/index.js';
import { InodeTable, isWhiteout, makedev, OPAQUE_XATTR, statfsOf, statOf, type Node } from '../../fs/inodes.js';
import { layer, run, testCacheDir, SPECIAL } from '../helpers/layers.js';
import { gzipDcRanges, tarTv } from '../helpers/oracles.js';
import { defaultImages } from '../helpers/images.js';

const cache = testCacheDir();
// Directories tar makes for missing parents get 0777 & ~umask: the 0755 containerd uses.
process.umask(0o022);
const work = await fsp.mkdtemp(path.join(os.tmpdir(), 'soci-ts-inodes-'));
t.teardown(() => fsp.rm(work, { recursive: true, force: true }));

const S_IFMT = 0o170000;
const S_IFCHR = 0o020000;
const TYPES: Record<number, string> = {
  0o040000: 'dir',
  0o100000: 'reg',
  0o120000: 'symlink',
  0o020000: 'char',
  0o060000: 'block',
  0o010000: 'fifo',
};

// ---------------------------------------------------------------------------------------
// Records: one per path, from the disk or from the table

interface Rec {
  type: string;
  /** Full st_mode. */
  mode: number;
  uid: number;
  gid: number;
  /** Regular files and symlinks only (a directory's size is the file system's business). */
  size: number | undefined;
  mtime: string;
  target: string | undefined;
  /** `major,minor` of devices. */
  dev: string | undefined;
  nlink: number;
  /** Sorted `name=hex` pairs. */
  xattrs: string[];
  /** Inode identity (disk ino or table ino), only compared as a partition of the paths. */
  id: string;
  /** Regular files: offset of the data in the tar stream (table only). */
  dataOffset?: number;
}

/** glibc's major()/minor() of a 64-bit dev_t (written out here, not makedev's inverse in fs/). */
function majorMinor(dev: bigint): string {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return `${major},${minor}`;
}

function timeOf(ns: bigint): string {
  let sec = ns / 1_000_000_000n;
  let nsec = ns % 1_000_000_000n;
  if (nsec < 0n) {
    sec -= 1n;
    nsec += 1_000_000_000n;
  }
  return `${sec}.${String(nsec).padStart(9, '0')}`;
}

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');
const sha256 = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

/** Undoes getfattr's quoting of file names (`\ooo` octal escapes). */
function unescapeGetfattr(s: string): string {
  const raw = Buffer.from(s, 'utf8');
  const out: number[] = [];
  for (let i = 0; i < raw.length; i++) {
    const c = raw[i]!;
    const oct = c === 92 ? /^[0-7]{3}/.exec(raw.subarray(i + 1, i + 4).toString('latin1')) : null;
    if (oct !== null) {
      out.push(parseInt(oct[0], 8));
      i += 3;
    } else {
      out.push(c);
    }
  }
  return Buffer.from(out).toString('utf8');
}

/** Every xattr under `dir` (symlinks not followed): `/rel/path` → sorted `name=hex`. */
async function diskXattrs(dir: string): Promise<Map<string, string[]>> {
  const res = await run('getfattr', ['-R', '-P', '-h', '-d', '-m', '-', '-e', 'hex', '--absolute-names', dir], { okCodes: [0, 1] });
  const out = new Map<string, string[]>();
  let current: string[] | undefined;
  for (const line of res.stdout.split('\n')) {
    if (line.startsWith('# file: ')) {
      const abs = unescapeGetfattr(line.slice('# file: '.length));
      const rel = path.relative(dir, abs);
      current = [];
      out.set(rel === '' ? '/' : '/' + rel, current);
    } else if (line !== '' && current !== undefined) {
      const eq = line.indexOf('=');
      const name = eq < 0 ? line : line.slice(0, eq);
      const value = eq < 0 ? '' : line.slice(eq + 1);
      if (!value.startsWith('0x') && value !== '') throw new Error(`getfattr: unexpected value in ${JSON.stringify(line)}`);
      current.push(`${unescapeGetfattr(name)}=${value.slice(2)}`);
    }
  }
  for (const v of out.values()) v.sort();
  return out;
}

/** lstat/readlink/getfattr of everything under `dir`, keyed `/rel/path` (the root is `/`). */
async function walkDisk(dir: string): Promise<Map<string, Rec>> {
  const xattrs = await diskXattrs(dir);
  const out = new Map<string, Rec>();
  const visit = async (abs: string, rel: string): Promise<void> => {
    const st = await fsp.lstat(abs, { bigint: true });
    const mode = Number(st.mode);
    const type = TYPES[mode & S_IFMT] ?? `unknown ${(mode & S_IFMT).toString(8)}`;
    out.set(rel, {
      type,
      mode,
      uid: Number(st.uid),
      gid: Number(st.gid),
      size: type === 'reg' || type === 'symlink' ? Number(st.size) : undefined,
      mtime: timeOf(st.mtimeNs),
      target: type === 'symlink' ? await fsp.readlink(abs) : undefined,
      dev: type === 'char' || type === 'block' ? majorMinor(st.rdev) : undefined,
      nlink: Number(st.nlink),
      xattrs: xattrs.get(rel) ?? [],
      id: `disk:${st.ino}`,
    });
    if (type === 'dir') {
      for (const name of await fsp.readdir(abs)) await visit(path.join(abs, name), rel === '/' ? `/${name}` : `${rel}/${name}`);
    }
  };
  await visit(dir, '/');
  return out;
}

function recOf(node: Node): Rec {
  return {
    type: node.kind,
    mode: node.mode,
    uid: node.uid,
    gid: node.gid,
    size: node.kind === 'reg' || node.kind === 'symlink' ? node.size : undefined,
    mtime: `${node.mtimeSec}.${String(node.mtimeNsec).padStart(9, '0')}`,
    target: node.target,
    dev: node.kind === 'char' || node.kind === 'block' ? majorMinor(BigInt(node.rdev)) : undefined,
    nlink: node.nlink,
    xattrs: [...node.xattrs].map(([k, v]) => `${k}=${hex(v)}`).sort(),
    id: `table:${node.ino}`,
    dataOffset: node.kind === 'reg' ? node.dataOffset : undefined,
  };
}

/** Every path of the table (through readdir from the root), keyed like walkDisk. */
function walkTable(table: InodeTable): Map<string, Rec> {
  const out = new Map<string, Rec>();
  const visit = (node: Node, rel: string): void => {
    out.set(rel, recOf(node));
    for (const e of table.readdir(node.ino) ?? []) visit(e.node, rel === '/' ? `/${e.name}` : `${rel}/${e.name}`);
  };
  visit(table.root, '/');
  return out;
}

const FIELDS = ['type', 'mode', 'uid', 'gid', 'size', 'mtime', 'target', 'dev', 'nlink', 'xattrs'] as const;

/** Paths sharing an identity with `p` (itself included), sorted. */
function peers(recs: Map<string, Rec>): Map<string, string> {
  const byId = new Map<string, string[]>();
  for (const [p, r] of recs) {
    if (r.type === 'dir') continue;
    const list = byId.get(r.id) ?? [];
    list.push(p);
    byId.set(r.id, list);
  }
  const out = new Map<string, string>();
  for (const list of byId.values()) for (const p of list) out.set(p, list.sort().join(' '));
  return out;
}

/** Asserts that two path → record maps agree on every field and on hardlink identity. */
function compareTrees(t: Test, got: Map<string, Rec>, want: Map<string, Rec>, what: string): void {
  const missing = [...want.keys()].filter((p) => !got.has(p));
  const extra = [...got.keys()].filter((p) => !want.has(p));
  t.same(missing, [], `${what}: no path of the oracle is missing`);
  t.same(extra, [], `${what}: no path the oracle lacks`);
  const bad: string[] = [];
  for (const [p, w] of want) {
    const g = got.get(p);
    if (g === undefined) continue;
    for (const f of FIELDS) {
      const a = JSON.stringify(g[f]);
      const b = JSON.stringify(w[f]);
      if (a !== b) bad.push(`${p}: ${f} ${f === 'mode' ? g.mode.toString(8) : a}, oracle ${f === 'mode' ? w.mode.toString(8) : b}`);
    }
  }
  t.same(bad.slice(0, 40), [], `${what}: ${want.size} paths agree on ${FIELDS.join(', ')} (${bad.length} differences)`);
  const gp = peers(got);
  const wp = peers(want);
  const linkBad: string[] = [];
  for (const [p, w] of wp) if (gp.has(p) && gp.get(p) !== w) linkBad.push(`${p}: table shares its inode with [${gp.get(p)}], disk with [${w}]`);
  t.same(linkBad.slice(0, 20), [], `${what}: hardlink identity as on disk (${[...wp.values()].filter((v) => v.includes(' ')).length} linked names)`);
}

/** A tree as comparable text: paths and fields, not inode numbers. */
function shape(recs: Map<string, Rec>): string {
  return JSON.stringify([...recs].sort(([a], [b]) => (a < b ? -1 : 1)).map(([p, r]) => [p, ...FIELDS.map((f) => r[f])]));
}

/** Extracts `layerPath` into a fresh directory with GNU tar as root; returns it and tar's stderr. */
async function extract(layerPath: string, name: string, okCodes: number[] = [0]): Promise<{ dir: string; stderr: string; code: number }> {
  const dir = path.join(work, name);
  await fsp.rm(dir, { recursive: true, force: true });
  await fsp.mkdir(dir, { mode: 0o755 });
  await fsp.chmod(dir, 0o755);
  const res = await run(
    'tar',
    ['-xpf', layerPath, '--delay-directory-restore', '--same-owner', '--xattrs', '--xattrs-include=*', '--numeric-owner', '-C', dir],
    { okCodes, env: { ...process.env, LC_ALL: 'C' } },
  );
  // tar warns about timestamps in the future (times/y2100) and names with a leading '/': harmless.
  const stderr = res.stderr
    .split('\n')
    .filter((l) => l !== '' && !/time stamp .* in the future/.test(l) && !/Removing leading .\/. from member names/.test(l))
    .join('\n');
  return { dir, stderr, code: res.code };
}

async function tableOf(layerPath: string, overlay?: boolean): Promise<{ table: InodeTable; index: LayerIndex }> {
  const index = new LayerIndex(await buildZtocFromFile(layerPath, { spanSize: 256 << 10 }), layerPath);
  return { table: InodeTable.fromLayer(index, overlay === undefined ? {} : { overlay }), index };
}

/** Regular files: the tar bytes at the table's data offset equal the file tar wrote. */
async function compareData(t: Test, layerPath: string, table: Map<string, Rec>, dir: string): Promise<void> {
  const files = [...table].filter(([, r]) => r.type === 'reg');
  const ranges = files.map(([, r]) => ({ offset: r.dataOffset!, len: r.size! }));
  let digests: string[];
  if (layerPath.endsWith('.gz')) {
    digests = (await gzipDcRanges(layerPath, ranges)).map((d) => d.sha256);
  } else {
    const bytes = await fsp.readFile(layerPath);
    digests = ranges.map((r) => sha256(bytes.subarray(r.offset, r.offset + r.len)));
  }
  let bad = 0;
  for (let i = 0; i < files.length; i++) {
    const onDisk = sha256(await fsp.readFile(path.join(dir, files[i]![0])));
    if (onDisk !== digests[i]) bad++;
  }
  t.equal(bad, 0, `${files.length} regular files: the bytes at their data offset equal what tar wrote`);
}

/**
 * The documented overlay conversion, applied to an extraction: `.wh.NAME` → a character
 * device 0/0, mode 0, the whiteout's owner and mtime (unless NAME is in the layer too, then
 * NAME is kept); `.wh..wh..opq` → trusted.overlay.opaque=y on its directory; other `.wh..wh.`
 * names vanish.
 */
function overlayConvert(disk: Map<string, Rec>): Map<string, Rec> {
  const out = new Map<string, Rec>();
  for (const [p, r] of disk) out.set(p, { ...r, xattrs: [...r.xattrs] });
  for (const [p, r] of disk) {
    const base = path.posix.basename(p);
    const dir = path.posix.dirname(p);
    if (!base.startsWith('.wh.')) continue;
    out.delete(p);
    if (base === '.wh..wh..opq') {
      const d = out.get(dir)!;
      d.xattrs = [...d.xattrs, `${OPAQUE_XATTR}=${hex(Buffer.from('y'))}`].sort();
    } else if (!base.startsWith('.wh..wh.')) {
      const original = path.posix.join(dir, base.slice(4));
      if (disk.has(original)) continue;
      out.set(original, { type: 'char', mode: S_IFCHR, uid: r.uid, gid: r.gid, size: undefined, mtime: r.mtime, target: undefined, dev: '0,0', nlink: 1, xattrs: [], id: `whiteout:${original}` });
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Real layers

const specialPosix = await layer(cache, { tree: 'special', format: 'posix', compression: 'gzip-6' });
const specialGnu = await layer(cache, { tree: 'special', format: 'gnu', compression: 'gzip-9' });
const usrSmall = await layer(cache, { tree: 'usr-small', format: 'posix', compression: 'gzip-6' });

t.test('special tree (pax): the table equals tar -x', async (t) => {
  const { table } = await tableOf(specialPosix, false);
  const { dir, stderr } = await extract(specialPosix, 'special-posix');
  t.equal(stderr, '', 'tar extracted everything');
  const disk = await walkDisk(dir);
  const got = walkTable(table);
  compareTrees(t, got, disk, 'overlay: false');
  await compareData(t, specialPosix, got, dir);

  // The fixture really has what the comparison is meant to cover.
  const subsecond = got.get('/' + Object.keys(SPECIAL.mtimes)[0])!;
  t.equal(subsecond.mtime, '1614834367.123456789', 'the zTOC keeps nanoseconds (pax mtime) and they reach the table');
  t.equal(got.get('/links/hard-a')!.nlink, 3, 'a file with three names');
  t.same(got.get('/dev/big-numbers')!.dev, '300,70000', 'a device number beyond 8/12 bits');
  t.ok(got.get('/xattr/file')!.xattrs.length >= 3, 'user xattrs present');
  t.equal(got.get('/modes/all-bits')!.mode & 0o7777, 0o7777, 'setuid, setgid and sticky bits');
  t.equal(got.get('/whiteout/.wh.foo')?.type, 'reg', 'without overlay, a whiteout is the file tar has');
  t.equal(got.get('/whiteout/opq/.wh..wh..opq')?.type, 'reg', 'and so is the opaque marker');
  t.equal(table.warningCount, 0, 'no warnings');
});

t.test('special tree (pax), overlay mode: whiteouts as containerd makes them', async (t) => {
  const { table } = await tableOf(specialPosix);
  const { dir } = await extract(specialPosix, 'special-posix-ovl');
  const disk = overlayConvert(await walkDisk(dir));
  compareTrees(t, walkTable(table), disk, 'overlay');

  // Entry by entry against the tar listing.
  const tv = await tarTv(specialPosix);
  const whiteouts = tv.filter((e) => path.posix.basename(e.name.replace(/\/$/, '')).startsWith('.wh.'));
  t.equal(whiteouts.length, SPECIAL.whiteouts.length, `tar lists ${whiteouts.length} whiteout entries`);
  for (const e of whiteouts) {
    const base = path.posix.basename(e.name);
    const parent = path.posix.dirname(e.name);
    t.equal(table.resolve(e.name), undefined, `${e.name} is not shown under its own name`);
    if (base === '.wh..wh..opq') {
      const d = table.resolve(parent)!;
      t.equal(d.kind, 'dir', `${parent} is a directory`);
      t.same(d.xattrs.get(OPAQUE_XATTR), Buffer.from('y'), `${parent} carries ${OPAQUE_XATTR}=y`);
      t.ok(table.resolve(path.posix.join(parent, 'kept')), 'what the opaque directory holds in this layer stays');
    } else {
      const node = table.resolve(path.posix.join(parent, base.slice(4)))!;
      t.ok(node !== undefined && isWhiteout(node), `${e.name} → a whiteout named ${base.slice(4)}`);
      t.equal(node.mode, S_IFCHR, 'a character device with permission bits 0');
      t.equal(node.rdev, 0, 'device 0/0');
      t.same([node.uid, node.gid], [e.uid, e.gid], "the whiteout entry's owner");
      t.equal(node.size, 0);
    }
  }
  const whiteoutDir = table.resolve('whiteout')!;
  t.notOk(whiteoutDir.xattrs.has(OPAQUE_XATTR), 'a directory without the marker is not opaque');
});

t.test('special tree (GNU format: long names, no pax): the table equals tar -x', async (t) => {
  const { table } = await tableOf(specialGnu, false);
  const { dir, stderr } = await extract(specialGnu, 'special-gnu');
  t.equal(stderr, '', 'tar extracted everything');
  const got = walkTable(table);
  compareTrees(t, got, await walkDisk(dir), 'GNU format');
  await compareData(t, specialGnu, got, dir);
  t.ok(got.has('/' + SPECIAL.longNames[1]), 'a 300-byte path');
});

t.test('usr-small: real files, the table equals tar -x; statfs counts', async (t) => {
  const { table } = await tableOf(usrSmall);
  const { dir, stderr } = await extract(usrSmall, 'usr-small');
  t.equal(stderr, '', 'tar extracted everything');
  const disk = await walkDisk(dir);
  const got = walkTable(table);
  compareTrees(t, got, disk, 'usr-small');
  await compareData(t, usrSmall, got, dir);

  // statfs against the disk: distinct inodes, and 4 KiB blocks of distinct regular files.
  const inodes = new Map<string, Rec>();
  for (const r of disk.values()) inodes.set(r.id, r);
  const regs = [...inodes.values()].filter((r) => r.type === 'reg');
  const st = statfsOf(table);
  t.equal(st.files, inodes.size, `files = ${inodes.size} inodes on disk (root included)`);
  t.equal(table.count, inodes.size, 'count = the same');
  t.equal(st.blocks, regs.reduce((a, r) => a + Math.ceil(r.size! / 4096), 0), `blocks = Σ ⌈size/4096⌉ over ${regs.length} files`);
  t.equal(table.totalFileBytes, regs.reduce((a, r) => a + r.size!, 0), 'totalFileBytes = Σ sizes on disk');
  t.same([st.bfree, st.bavail, st.ffree, st.favail, st.flag, st.bsize], [0, 0, 0, 0, 1, 4096], 'read-only, nothing free');
});

t.test('special tree: statfs and stat of nodes', async (t) => {
  const { table } = await tableOf(specialPosix, false);
  const { dir } = await extract(specialPosix, 'special-statfs');
  const disk = await walkDisk(dir);
  const ids = new Set([...disk.values()].map((r) => r.id));
  t.equal(statfsOf(table).files, ids.size, `files = ${ids.size} distinct inodes (three names of one file count once)`);
  const node = table.resolve('links/hard-b')!;
  const st = statOf(node);
  t.same(
    [st.ino, st.mode, st.uid, st.gid, st.size, st.nlink, st.blocks, st.mtime.getTime()],
    [node.ino, node.mode, node.uid, node.gid, node.size, 3, Math.ceil(node.size / 512), node.mtimeSec * 1000],
    'statOf carries the node',
  );
  const sub = table.resolve('times/subsecond')!;
  t.equal(sub.mtime.getTime(), 1614834367123, 'mtime as a Date: milliseconds');
  t.equal(statOf(table.resolve('dev/null-like')!).rdev, makedev(1, 3), 'rdev of a device');
});

t.test('umoci image layers (leading-slash or ./ names, symlink farms): each equals tar -x', async (t) => {
  const images = await defaultImages();
  for (const l of images.multi.layers) {
    const { table } = await tableOf(l.path);
    const { dir, stderr } = await extract(l.path, `multi-${l.digest.slice(7, 19)}`);
    t.equal(stderr, '', `${l.digest}: tar extracted everything`);
    const disk = await walkDisk(dir);
    // Parents the layer does not list: tar makes them "now", the table at the epoch (documented).
    const listed = new Set((await tarTv(l.path)).map((e) => '/' + e.name.split('/').filter((p) => p !== '' && p !== '.').join('/')));
    let implicit = 0;
    for (const [p, r] of disk) {
      if (r.type === 'dir' && !listed.has(p)) {
        t.same([r.mode, r.uid, r.gid], [0o040755, 0, 0], `${p}: not in the layer, tar made it 0755 root:root`);
        r.mtime = '0.000000000';
        implicit++;
      }
    }
    t.comment(`${l.digest}: ${implicit} implicit parent directories`);
    const hasWhiteouts = [...disk.keys()].some((p) => path.posix.basename(p).startsWith('.wh.'));
    compareTrees(t, walkTable(table), hasWhiteouts ? overlayConvert(disk) : disk, `${l.digest} (${disk.size} paths${hasWhiteouts ? ', whiteouts' : ''})`);
  }
});

t.test('inode numbers are deterministic and dense', async (t) => {
  const a = (await tableOf(specialPosix)).table;
  const b = (await tableOf(specialPosix)).table;
  t.equal(a.count, b.count, 'same count');
  let differ = 0;
  for (let ino = 1; ino <= a.count; ino++) {
    const x = a.get(ino)!;
    const y = b.get(ino)!;
    if (x.ino !== ino || y.ino !== ino || a.pathOf(ino) !== b.pathOf(ino) || JSON.stringify(recOf(x)) !== JSON.stringify(recOf(y))) differ++;
  }
  t.equal(differ, 0, `two builds from two zTOCs give inodes 1..${a.count} the same paths and attributes`);
  t.equal(a.root.ino, 1, 'the root is 1');
  t.equal(a.get(0), undefined, 'no inode 0');
  t.equal(a.get(a.count + 1), undefined, 'none past the count');
  const seen = new Set<number>();
  for (const r of walkTable(a).values()) seen.add(Number(r.id.slice('table:'.length)));
  t.equal(seen.size, a.count, 'every inode is reachable from the root');
  // Breadth first, children in name order: a directory's children come after it, and siblings in order.
  let bad = 0;
  for (let ino = 1; ino <= a.count; ino++) {
    const entries = a.readdir(ino) ?? [];
    for (let i = 1; i < entries.length; i++) {
      const p = entries[i - 1]!.node;
      const q = entries[i]!.node;
      if (p.parent === ino && q.parent === ino && p.ino > q.ino) bad++;
    }
    for (const e of entries) if (e.node.parent === ino && e.node.ino <= ino) bad++;
  }
  t.equal(bad, 0, 'numbered breadth first, siblings in name order');
});

// ---------------------------------------------------------------------------------------
// Hand-written archives

interface Entry {
  name: string;
  /** Tar typeflag: '0' file, '1' hardlink, '2' symlink, '3' char, '4' block, '5' dir, '6' fifo. */
  type?: string;
  mode?: number;
  uid?: number;
  gid?: number;
  mtime?: number;
  linkname?: string;
  data?: string;
  major?: number;
  minor?: number;
  /** PAX records (before this entry). */
  pax?: Array<[string, string]>;
}

const MTIME = 1700000000;

function octal(n: number, width: number): string {
  return n.toString(8).padStart(width - 1, '0') + '\0';
}

function ustarHeader(e: Entry, size: number): Buffer {
  const b = Buffer.alloc(512);
  if (Buffer.byteLength(e.name) > 100 || Buffer.byteLength(e.linkname ?? '') > 100) throw new Error(`name too long for this writer: ${e.name}`);
  b.write(e.name, 0, 100, 'utf8');
  b.write(octal(e.mode ?? (e.type === '5' ? 0o755 : 0o644), 8), 100, 'ascii');
  b.write(octal(e.uid ?? 0, 8), 108, 'ascii');
  b.write(octal(e.gid ?? 0, 8), 116, 'ascii');
  b.write(octal(size, 12), 124, 'ascii');
  b.write(octal(e.mtime ?? MTIME, 12), 136, 'ascii');
  b.write('        ', 148, 'ascii');
  b.write(e.type ?? '0', 156, 'ascii');
  b.write(e.linkname ?? '', 157, 100, 'utf8');
  b.write('ustar\0' + '00', 257, 'ascii');
  b.write(octal(e.major ?? 0, 8), 329, 'ascii');
  b.write(octal(e.minor ?? 0, 8), 337, 'ascii');
  let sum = 0;
  for (const x of b) sum += x;
  b.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'ascii');
  return b;
}

const padded = (d: Buffer): Buffer => (d.length % 512 === 0 ? d : Buffer.concat([d, Buffer.alloc(512 - (d.length % 512))]));

function paxRecords(records: ReadonlyArray<[string, string]>): Buffer {
  let out = '';
  for (const [k, v] of records) {
    const body = ` ${k}=${v}\n`;
    const bodyLen = Buffer.byteLength(body);
    let len = bodyLen + 1;
    while (String(len).length + bodyLen !== len) len = String(len).length + bodyLen;
    out += len + body;
  }
  return Buffer.from(out, 'utf8');
}

/** A ustar archive of `entries` in this order (with pax headers where asked). */
async function writeTar(file: string, entries: readonly Entry[]): Promise<string> {
  const parts: Buffer[] = [];
  for (const e of entries) {
    if (e.pax !== undefined) {
      const d = paxRecords(e.pax);
      parts.push(ustarHeader({ name: 'PaxHeaders/entry', type: 'x' }, d.length), padded(d));
    }
    const data = Buffer.from(e.data ?? '');
    parts.push(ustarHeader(e, data.length));
    if (data.length > 0) parts.push(padded(data));
  }
  parts.push(Buffer.alloc(1024));
  await fsp.writeFile(file, Buffer.concat(parts));
  return file;
}

const ROOT: Entry = { name: './', type: '5', mode: 0o755 };
const dir = (name: string, more: Partial<Entry> = {}): Entry => ({ name, type: '5', ...more });
const file = (name: string, data: string, more: Partial<Entry> = {}): Entry => ({ name, data, ...more });
const symlink = (name: string, linkname: string): Entry => ({ name, type: '2', linkname, mode: 0o777 });
const hardlink = (name: string, linkname: string): Entry => ({ name, type: '1', linkname });

interface EdgeCase {
  name: string;
  entries: Entry[];
  /** What containerd's applier gives, as an archive GNU tar extracts without conflict; absent when tar already agrees. */
  containerd?: Entry[];
  /** tar -x of `entries` fails (exit 2) and this is in its message. */
  tarFails?: RegExp;
  /** The table warns (skipped or reinterpreted entries). */
  warns?: boolean;
  overlay?: boolean;
  check?: (t: Test, table: InodeTable) => void;
}

const EDGE_CASES: EdgeCase[] = [
  {
    name: 'a later file replaces an earlier one',
    entries: [ROOT, file('a', 'one', { mode: 0o755, uid: 7 }), file('a', 'second', { mode: 0o600, mtime: MTIME + 5 })],
  },
  {
    name: 'a directory over a directory merges (later mode, owner, mtime; xattrs added)',
    entries: [
      ROOT,
      dir('d/', { mode: 0o700, pax: [['SCHILY.xattr.user.first', 'one']] }),
      file('d/f', 'inside'),
      dir('d/', { mode: 0o750, uid: 5, gid: 6, mtime: 1600000000, pax: [['SCHILY.xattr.user.second', 'two']] }),
    ],
    // GNU tar with --delay-directory-restore keeps only the last header's xattrs; containerd
    // sets each header's xattrs as it goes, so both stay.
    containerd: [
      ROOT,
      dir('d/', { mode: 0o750, uid: 5, gid: 6, mtime: 1600000000, pax: [['SCHILY.xattr.user.first', 'one'], ['SCHILY.xattr.user.second', 'two']] }),
      file('d/f', 'inside'),
    ],
  },
  {
    name: 'a file over an empty directory replaces it',
    entries: [ROOT, dir('d/'), file('d', 'now a file')],
  },
  {
    name: 'a directory over a file replaces it',
    entries: [ROOT, file('d', 'a file first'), dir('d/', { mode: 0o711 }), file('d/x', 'x')],
  },
  {
    name: 'a file over a non-empty directory replaces the directory and its contents (containerd)',
    entries: [ROOT, dir('d/'), file('d/f', 'x'), dir('d/sub/'), file('d/sub/g', 'y'), file('d', 'file wins')],
    tarFails: /d: Cannot open: File exists/,
    containerd: [ROOT, file('d', 'file wins')],
  },
  {
    name: 'a symlink over a non-empty directory replaces it (containerd)',
    entries: [ROOT, dir('d/'), file('d/f', 'x'), symlink('d', 'elsewhere')],
    tarFails: /Cannot create symlink/,
    containerd: [ROOT, symlink('d', 'elsewhere')],
  },
  {
    name: 'entries after a directory is replaced by a symlink go where the symlink points (containerd)',
    entries: [ROOT, dir('b/'), dir('a/'), file('a/f1', 'one'), symlink('a', 'b'), file('a/f2', 'two')],
    tarFails: /Cannot create symlink/,
    containerd: [ROOT, dir('b/'), file('b/f2', 'two'), symlink('a', 'b')],
  },
  {
    name: 'missing parents are made 0755 root:root (mtime: the epoch)',
    entries: [ROOT, file('a/b/c', 'deep', { uid: 9 }), file('a/other', 'o')],
    containerd: [ROOT, dir('a/', { mtime: 0 }), dir('a/b/', { mtime: 0 }), file('a/b/c', 'deep', { uid: 9 }), file('a/other', 'o')],
    check: (t, table) => {
      const a = table.resolve('a')!;
      t.same([a.mode, a.uid, a.gid, a.mtimeSec], [0o040755, 0, 0, 0], 'implicit a/: 0755, 0:0, the epoch');
    },
  },
  {
    name: 'no root entry: the root is 0755 root:root',
    entries: [file('x', 'x', { mode: 0o640 })],
    check: (t, table) => {
      t.same([table.root.mode, table.root.uid, table.root.gid, table.root.mtimeSec, table.root.nlink], [0o040755, 0, 0, 0, 2], 'root attributes');
    },
  },
  {
    name: 'hard links: one inode, nlink = names; a replaced name leaves the others on the old inode',
    entries: [ROOT, file('a', 'first a', { mode: 0o640, uid: 3 }), hardlink('b', 'a'), dir('sub/'), hardlink('sub/c', './a'), file('a', 'new a'), hardlink('d', 'b')],
  },
  {
    name: 'hard links to a symlink, a fifo and a device',
    entries: [ROOT, symlink('s', 'target'), hardlink('s2', 's'), { name: 'p', type: '6' }, hardlink('p2', 'p'), { name: 'c', type: '3', major: 1, minor: 5 }, hardlink('c2', 'c')],
  },
  {
    name: 'a hard link to itself',
    entries: [ROOT, file('a', 'a'), hardlink('a', 'a')],
  },
  {
    name: 'a hard link through a symlinked directory',
    entries: [ROOT, dir('real/'), file('real/f', 'f'), symlink('via', 'real'), hardlink('g', 'via/f')],
  },
  {
    name: 'a hard link to a missing target is skipped',
    entries: [ROOT, hardlink('x', 'nope'), file('y', 'y')],
    tarFails: /Cannot hard link/,
    warns: true,
  },
  {
    name: 'a hard link to a directory is skipped',
    entries: [ROOT, dir('d/'), hardlink('x', 'd')],
    tarFails: /Cannot hard link/,
    warns: true,
  },
  {
    name: 'an entry below a relative symlink goes where it points',
    entries: [ROOT, dir('dir/'), symlink('link', 'dir'), file('link/f', 'via link')],
    check: (t, table) => {
      t.equal(table.resolve('link/f'), undefined, 'resolve does not follow symlinks');
      t.equal(table.resolve('dir/f')?.kind, 'reg', 'the file is in the target directory');
    },
  },
  {
    name: 'an entry below an absolute symlink stays inside the root (containerd)',
    entries: [ROOT, dir('dir/'), dir('sub/'), symlink('sub/link', '/dir'), file('sub/link/f', 'via abs')],
    tarFails: /link\/f: Cannot open: Not a directory/,
    containerd: [ROOT, dir('dir/'), file('dir/f', 'via abs'), dir('sub/'), symlink('sub/link', '/dir')],
  },
  {
    name: "'..' in a symlink stops at the root (containerd)",
    entries: [ROOT, dir('dir/'), dir('sub/'), symlink('sub/link', '../../../dir'), file('sub/link/f', 'via dotdot'), symlink('sub/up', '..'), file('sub/up/top', 'at the root')],
    tarFails: /Not a directory/,
    containerd: [ROOT, dir('dir/'), file('dir/f', 'via dotdot'), file('top', 'at the root'), dir('sub/'), symlink('sub/link', '../../../dir'), symlink('sub/up', '..')],
  },
  {
    name: 'a symlink to a missing directory: parents made where it points',
    entries: [ROOT, symlink('link', 'made/here'), file('link/f', 'f')],
    tarFails: /Cannot open|Not a directory|No such file/,
    containerd: [ROOT, symlink('link', 'made/here'), dir('made/', { mtime: 0 }), dir('made/here/', { mtime: 0 }), file('made/here/f', 'f')],
  },
  {
    name: 'an entry below a file is skipped',
    entries: [ROOT, file('f', 'f'), file('f/x', 'x')],
    tarFails: /Not a directory/,
    warns: true,
  },
  {
    name: 'a symlink loop is skipped',
    entries: [ROOT, symlink('a', 'b'), symlink('b', 'a'), file('a/x', 'x')],
    tarFails: /Too many levels of symbolic links/,
    warns: true,
  },
  {
    name: 'a directory over a symlink replaces the symlink',
    entries: [ROOT, dir('real/'), symlink('l', 'real'), dir('l/', { mode: 0o700 }), file('l/f', 'in the new directory')],
  },
  {
    name: 'names spelled differently are one path (/x, ./x, x/, a//b)',
    entries: [ROOT, dir('/d/'), file('./d//f', 'one'), file('d/f', 'two'), dir('./d/e'), file('/d/./e/g', 'g')],
  },
  {
    name: 'devices, fifos, modes and pax times',
    entries: [
      ROOT,
      { name: 'blk', type: '4', major: 8, minor: 1, mode: 0o660, gid: 6 },
      { name: 'chr', type: '3', major: 4095, minor: 1048575, mode: 0o620 },
      { name: 'fifo', type: '6', mode: 0o600 },
      file('suid', 's', { mode: 0o4711 }),
      dir('sticky/', { mode: 0o1777 }),
      file('ns', 'n', { pax: [['mtime', '1234567890.000000001']] }),
      file('old', 'o', { pax: [['mtime', '86400.5']] }),
    ],
  },
  {
    name: 'overlay: a whiteout of a name the layer also has keeps the name',
    overlay: true,
    entries: [ROOT, file('a', 'kept'), file('.wh.a', ''), file('.wh.b', '', { uid: 4, gid: 5, mtime: MTIME + 1 }), dir('d/'), file('d/.wh..wh..opq', ''), file('d/.wh..wh.plnk', ''), file('d/in', 'in')],
    containerd: [
      ROOT,
      file('a', 'kept'),
      { name: 'b', type: '3', mode: 0, uid: 4, gid: 5, mtime: MTIME + 1, major: 0, minor: 0 },
      dir('d/', { pax: [[`SCHILY.xattr.${OPAQUE_XATTR}`, 'y']] }),
      file('d/in', 'in'),
    ],
    warns: true,
  },
];

for (const c of EDGE_CASES) {
  t.test(`edge case: ${c.name}`, async (t) => {
    const slug = c.name.replace(/[^a-z0-9]+/gi, '-').slice(0, 60);
    const tarPath = await writeTar(path.join(work, `${slug}.tar`), c.entries);
    const { table } = await tableOf(tarPath, c.overlay ?? false);
    const tarRun = await extract(tarPath, `${slug}-x`, [0, 2]);
    if (c.tarFails !== undefined) {
      t.equal(tarRun.code, 2, 'GNU tar refuses an entry');
      t.match(tarRun.stderr, c.tarFails, `GNU tar: ${tarRun.stderr.split('\n')[0]}`);
    } else {
      t.equal(tarRun.stderr, '', 'GNU tar extracts it without complaint');
    }
    const got = walkTable(table);
    if (c.containerd === undefined) {
      const disk = await walkDisk(tarRun.dir);
      if (c.entries[0] !== ROOT) {
        // No root entry: the extraction's root is our mkdir (0755 root:root) and its mtime is
        // whenever tar wrote into it; the table's is the epoch (checked in `check`).
        disk.get('/')!.mtime = got.get('/')!.mtime;
      }
      compareTrees(t, got, disk, 'tar -x of the archive');
    } else {
      const equivalent = await writeTar(path.join(work, `${slug}-containerd.tar`), c.containerd);
      const eq = await extract(equivalent, `${slug}-containerd-x`);
      t.equal(eq.stderr, '', 'the archive spelling out containerd’s result extracts cleanly');
      compareTrees(t, got, await walkDisk(eq.dir), 'what containerd applies');
      if (c.tarFails === undefined) {
        const plain = await walkDisk(tarRun.dir);
        t.not(shape(plain), shape(await walkDisk(eq.dir)), 'and GNU tar alone gives something else (the case is real)');
      }
    }
    if (c.warns === true) t.ok(table.warningCount > 0, `warned: ${table.warnings.join('; ')}`);
    else t.equal(table.warningCount, 0, 'no warnings');
    c.check?.(t, table);
  });
}

// ---------------------------------------------------------------------------------------
// A large directory, lookups

t.test('a directory of 5000 entries: readdirPage covers it exactly once, in order', async (t) => {
  const names: string[] = [];
  let seed = 12345;
  const rand = (n: number): number => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) % n;
  };
  const alphabet = 'abcXYZ019._-é日🚀';
  const chars = [...alphabet];
  const seen = new Set<string>();
  while (names.length < 5000) {
    let n = '';
    const len = 1 + rand(12);
    for (let i = 0; i < len; i++) n += chars[rand(chars.length)];
    if (n === '.' || n === '..' || n.startsWith('.wh.') || seen.has(n)) continue;
    seen.add(n);
    names.push(n);
  }
  const entries: Entry[] = [ROOT, dir('big/')];
  for (const [i, n] of names.entries()) entries.push(i % 7 === 0 ? dir(`big/${n}/`) : file(`big/${n}`, String(i)));
  const tarPath = await writeTar(path.join(work, 'big.tar'), entries);
  const { table } = await tableOf(tarPath);
  const { dir: out } = await extract(tarPath, 'big-x');
  const onDisk = (await fsp.readdir(path.join(out, 'big'))).sort();
  const big = table.resolve('big')!;

  for (const limit of [1, 37, 100, 4999, 5000, 100000]) {
    const got: string[] = [];
    let offset = 0;
    let pages = 0;
    let badPages = 0;
    for (;;) {
      const page = table.readdirPage(big.ino, offset, limit)!;
      pages++;
      if (page.entries.length > limit || page.next !== offset + page.entries.length) badPages++;
      page.entries.forEach((e) => got.push(e.name));
      if (page.done || pages > 10000) break;
      offset = page.next;
    }
    t.equal(badPages, 0, `limit ${limit}: every page holds at most ${limit} entries and next = offset + entries`);
    t.same(got, onDisk, `limit ${limit}: ${pages} pages give the ${onDisk.length} names tar wrote, each once, in name order`);
  }
  const mid = table.readdirPage(big.ino, 2500, 10)!;
  t.same(
    mid.entries.map((e) => e.name),
    onDisk.slice(2500, 2510),
    'a page from the middle (resuming at a FUSE offset)',
  );
  const end = table.readdirPage(big.ino, 5000, 10)!;
  t.same([end.entries.length, end.done, end.next], [0, true, 5000], 'at the end: empty and done');
  const past = table.readdirPage(big.ino, 1e9, 10)!;
  t.same([past.entries.length, past.done], [0, true], 'past the end: empty and done');
  t.same(table.readdirPage(big.ino, -5, 2)!.entries.map((e) => e.name), onDisk.slice(0, 2), 'a negative offset starts at 0');
  t.equal(table.readdirPage(table.resolve(`big/${names[1]}`)!.ino, 0, 10), undefined, 'not a directory: undefined');
  t.equal(big.nlink, 2 + names.filter((_, i) => i % 7 === 0).length, 'nlink = 2 + subdirectories');
  t.equal(big.nlink, Number((await fsp.lstat(path.join(out, 'big'))).nlink), 'as on disk');
  let lookups = 0;
  for (const n of names) if (table.lookup(big.ino, n)?.name === n) lookups++;
  t.equal(lookups, names.length, 'every name found by lookup');
});

t.test('lookup and resolve of missing names', async (t) => {
  const { table } = await tableOf(specialPosix);
  const docs = table.resolve('docs')!;
  t.equal(table.lookup(table.root.ino, 'nope'), undefined, 'missing name in the root');
  t.equal(table.lookup(docs.ino, ''), undefined, 'empty name');
  t.equal(table.lookup(docs.ino, '.'), undefined, "'.' is not an entry");
  t.equal(table.lookup(docs.ino, '..'), undefined, "'..' is not an entry");
  const aFile = table.readdir(docs.ino)![0]!.node;
  t.equal(table.lookup(aFile.ino, 'x'), undefined, 'lookup in a file');
  t.equal(table.lookup(999_999, 'x'), undefined, 'lookup in an unknown inode');
  t.equal(table.lookup(0, 'docs'), undefined, 'lookup in inode 0');
  t.equal(table.resolve('docs/nope'), undefined, 'resolve of a missing file');
  t.equal(table.resolve('nope/docs'), undefined, 'resolve below a missing directory');
  t.equal(table.resolve(`docs/${aFile.name}/x`), undefined, 'resolve below a file');
  t.equal(table.resolve('links/rel/' + aFile.name), undefined, 'resolve does not follow symlinks');
  t.equal(table.resolve('whiteout/.wh.foo'), undefined, 'the whiteout entry itself is gone in overlay mode');
  t.equal(table.resolve(''), table.root, "'' is the root");
  t.equal(table.resolve('/'), table.root, "'/' is the root");
  t.equal(table.resolve('/docs/'), docs, 'leading and trailing slashes');
  t.equal(table.resolve('./docs'), docs, "'./docs'");
  t.equal(table.lookup(table.root.ino, 'docs'), docs, 'lookup of a present name');
  t.equal(table.readdir(aFile.ino), undefined, 'readdir of a file');
  t.equal(table.pathOf(aFile.ino), `/docs/${aFile.name}`, 'pathOf');
  t.match(table.pathOf(999_999), /unknown inode/, 'pathOf an unknown inode');
});

t.test('mod_time text as upstream zTOCs write it (zone offsets, fractions) against date(1)', async (t) => {
  const tarPath = await writeTar(path.join(work, 'times.tar'), [ROOT, file('f', 'x')]);
  const index = new LayerIndex(await buildZtocFromFile(tarPath), tarPath);
  const texts = [
    '2021-03-04T07:06:07.5+02:00',
    '2021-03-04T05:06:07.123456789Z',
    '2021-03-03T23:36:07.000000001-05:30',
    '1969-12-31T23:59:59.25Z',
    '1900-01-01T00:00:00Z',
    '9999-12-31T23:59:59.999999999Z',
    '2024-02-29T12:00:00Z',
  ];
  for (const text of texts) {
    index.ztoc.files[1]!.modTime = text;
    const node = InodeTable.fromLayer(index).resolve('f')!;
    const { stdout } = await run('date', ['-u', '-d', text, '+%s.%N']);
    const [sec, nsec] = stdout.trim().split('.');
    t.same([node.mtimeSec, node.mtimeNsec], [Number(sec), Number(nsec)], `${text} = ${stdout.trim()} (date -d)`);
  }
  for (const bad of ['yesterday', '2021-13-01T00:00:00Z', '2021-03-04 05:06:07Z', '']) {
    index.ztoc.files[1]!.modTime = bad;
    const table = InodeTable.fromLayer(index);
    t.same([table.resolve('f')!.mtimeSec, table.warningCount], [0, 1], `${JSON.stringify(bad)}: the epoch, with a warning`);
  }
});

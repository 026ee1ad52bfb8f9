/**
 * A directory tree as a comparable snapshot: every path's type, mode, owner, size, mtime,
 * symlink target, device numbers, xattrs, hardlink group and content hash. Built only with
 * async calls and async child processes, so it can walk a FUSE mount served by the same
 * process (a sync call there would deadlock).
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { lstat, readdir, readlink } from 'node:fs/promises';
import * as path from 'node:path';
import type { Test } from 'tap';

export type EntryType = 'dir' | 'reg' | 'symlink' | 'char' | 'block' | 'fifo' | 'socket';

export interface TreeEntry {
  type: EntryType;
  /** Permission, setuid, setgid and sticky bits. */
  perm: number;
  uid: number;
  gid: number;
  /** Regular files and symlinks; 0 otherwise. */
  size: number;
  /** Modification time in whole milliseconds (FUSE via fuse-native carries no more). */
  mtimeMs: number;
  target?: string;
  /** Devices: "major,minor". */
  rdev?: string;
  /** name → hex value. */
  xattrs: Record<string, string>;
  /** Regular files: sha256 hex of the contents. */
  sha256?: string;
  ino: number;
  /** `dev:ino`: the file's identity (hardlinks share it). */
  id: string;
  nlink: number;
}

export interface SnapshotOptions {
  /** Hash regular files (default true). */
  hash?: boolean;
  /** xattr names matching this are kept (default: all). */
  xattrFilter?: RegExp;
}

function typeOf(st: Awaited<ReturnType<typeof lstat>>): EntryType {
  if (st.isDirectory()) return 'dir';
  if (st.isFile()) return 'reg';
  if (st.isSymbolicLink()) return 'symlink';
  if (st.isCharacterDevice()) return 'char';
  if (st.isBlockDevice()) return 'block';
  if (st.isFIFO()) return 'fifo';
  return 'socket';
}

function major(rdev: number): number {
  return Number((BigInt(rdev) >> 8n) & 0xfffn) | Number((BigInt(rdev) >> 32n) & ~0xfffn);
}
function minor(rdev: number): number {
  return Number(BigInt(rdev) & 0xffn) | Number((BigInt(rdev) >> 12n) & ~0xffn);
}


/** getfattr escapes `\` and unprintable bytes as `\ooo` octal. */
function unescapeOctal(s: string): string {
  const bytes: number[] = [];
  const raw = Buffer.from(s, 'utf8');
  for (let i = 0; i < raw.length; i++) {
    if (raw[i] === 0x5c && i + 3 < raw.length && /^[0-7]{3}$/.test(raw.subarray(i + 1, i + 4).toString('latin1'))) {
      bytes.push(parseInt(raw.subarray(i + 1, i + 4).toString('latin1'), 8));
      i += 3;
    } else bytes.push(raw[i]!);
  }
  return Buffer.from(bytes).toString('utf8');
}

/** Every xattr under `root` (symlinks not followed), by path relative to root. */
export function treeXattrs(root: string): Promise<Map<string, Record<string, string>>> {
  return new Promise((resolve, reject) => {
    const child = spawn('getfattr', ['-R', '-d', '-m', '-', '-e', 'hex', '--absolute-names', '-h', root], { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (c: Buffer) => out.push(c));
    child.stderr.on('data', (c: Buffer) => (err += c.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      // getfattr exits 1 when some file has no xattrs support; only a missing binary is fatal.
      if (code !== 0 && code !== 1) return reject(new Error(`getfattr ${root}: exit ${code}: ${err}`));
      const map = new Map<string, Record<string, string>>();
      let current: Record<string, string> | undefined;
      for (const line of Buffer.concat(out).toString('utf8').split('\n')) {
        if (line.startsWith('# file: ')) {
          const abs = unescapeOctal(line.slice(8));
          const rel = path.relative(root, abs) || '.';
          current = {};
          map.set(rel, current);
        } else if (current !== undefined && line.includes('=')) {
          const eq = line.indexOf('=');
          const v = line.slice(eq + 1);
          current[unescapeOctal(line.slice(0, eq))] = v.startsWith('0x') ? v.slice(2) : Buffer.from(v.replace(/^"|"$/g, '')).toString('hex');
        } else if (current !== undefined && line === '') current = undefined;
      }
      resolve(map);
    });
  });
}

/** Whole milliseconds (rounded down) of a time in nanoseconds, exactly. */
function floorMs(ns: bigint): number {
  const ms = ns / 1_000_000n;
  return Number(ns % 1_000_000n < 0n ? ms - 1n : ms);
}

/** A snapshot of the tree under `root`, by relative path ('.' for root itself). */
export async function snapshotTree(root: string, opts: SnapshotOptions = {}): Promise<Map<string, TreeEntry>> {
  const hash = opts.hash ?? true;
  const out = new Map<string, TreeEntry>();
  const xattrs = await treeXattrs(root);
  const walk = async (rel: string): Promise<void> => {
    const abs = rel === '.' ? root : path.join(root, rel);
    // bigint: overlayfs inode numbers can use all 64 bits.
    const st = await lstat(abs, { bigint: true });
    const type = typeOf(st);
    const xa: Record<string, string> = {};
    for (const [k, v] of Object.entries(xattrs.get(rel) ?? {})) if (opts.xattrFilter === undefined || opts.xattrFilter.test(k)) xa[k] = v;
    const e: TreeEntry = {
      type,
      perm: Number(st.mode) & 0o7777,
      uid: Number(st.uid),
      gid: Number(st.gid),
      size: type === 'reg' || type === 'symlink' ? Number(st.size) : 0,
      mtimeMs: floorMs(st.mtimeNs),
      xattrs: xa,
      ino: Number(st.ino),
      id: `${st.dev}:${st.ino}`,
      nlink: Number(st.nlink),
    };
    if (type === 'symlink') e.target = await readlink(abs);
    if (type === 'char' || type === 'block') e.rdev = `${major(Number(st.rdev))},${minor(Number(st.rdev))}`;
    if (type === 'reg' && hash) e.sha256 = await sha256File(abs);
    out.set(rel, e);
    if (type === 'dir') {
      const names = (await readdir(abs)).sort();
      for (const n of names) await walk(rel === '.' ? n : path.join(rel, n));
    }
  };
  await walk('.');
  return out;
}

/**
 * Paths grouped by file identity (device and inode: overlayfs keeps each layer's device apart),
 * for regular files with more than one name.
 */
export function hardlinkGroups(tree: Map<string, TreeEntry>): string[][] {
  const byId = new Map<string, string[]>();
  for (const [p, e] of tree) if (e.type === 'reg') byId.set(e.id, [...(byId.get(e.id) ?? []), p]);
  return [...byId.values()].filter((g) => g.length > 1).map((g) => g.sort()).sort((a, b) => (a[0]! < b[0]! ? -1 : 1));
}

/**
 * What of an entry is compared with an oracle's: everything but inode numbers and directory
 * link counts (overlayfs and FUSE count those differently); `mtime` false leaves the time out.
 */
export function entryFields(e: TreeEntry, mtime = true): Record<string, unknown> {
  return {
    type: e.type,
    perm: e.perm.toString(8),
    uid: e.uid,
    gid: e.gid,
    size: e.size,
    mtimeMs: mtime ? e.mtimeMs : undefined,
    target: e.target,
    rdev: e.rdev,
    xattrs: e.xattrs,
    sha256: e.sha256,
    nlink: e.type === 'dir' ? undefined : e.nlink,
  };
}

/**
 * The differences between two snapshots, path by path: `fields` picks what is compared of an
 * entry (undefined values are not compared when both sides have them undefined).
 */
export function diffTrees(got: Map<string, TreeEntry>, oracle: Map<string, TreeEntry>, fields: (p: string, e: TreeEntry) => Record<string, unknown>): string[] {
  const diffs: string[] = [];
  for (const [p, want] of oracle) {
    const have = got.get(p);
    if (have === undefined) {
      diffs.push(`${p}: missing`);
      continue;
    }
    const a = fields(p, have);
    const b = fields(p, want);
    for (const k of Object.keys(b)) if (JSON.stringify(a[k]) !== JSON.stringify(b[k])) diffs.push(`${p}: ${k} ${JSON.stringify(a[k])} != oracle ${JSON.stringify(b[k])}`);
  }
  for (const p of got.keys()) if (!oracle.has(p)) diffs.push(`${p}: not in the oracle`);
  return diffs;
}

export interface CompareOptions {
  /** Compare mtimes (default true). */
  mtime?: boolean;
  /** Paths to leave out of the comparison. */
  ignore?: (p: string) => boolean;
  /** Also compare directory mtimes (default true). */
  dirMtime?: boolean;
}

/**
 * Asserts `actual` equals `expected` path by path (one summary assertion listing the
 * differences), and that hardlink groups are the same.
 */
export function compareTrees(t: Test, actual: Map<string, TreeEntry>, expected: Map<string, TreeEntry>, label: string, opts: CompareOptions = {}): void {
  const ignore = opts.ignore ?? (() => false);
  const keep = (m: Map<string, TreeEntry>): Map<string, TreeEntry> => new Map([...m].filter(([p]) => !ignore(p)));
  const got = keep(actual);
  const want = keep(expected);
  const diffs = diffTrees(got, want, (_p, e) => entryFields(e, opts.mtime !== false && !(e.type === 'dir' && opts.dirMtime === false)));
  t.same(diffs.slice(0, 50), [], `${label}: ${expected.size} paths equal (${diffs.length} differences)`);
  t.same(hardlinkGroups(got), hardlinkGroups(want), `${label}: same hardlink groups`);
}

/** sha256 (hex) of a file's contents, streamed. */
export function sha256File(p: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    createReadStream(p, { highWaterMark: 1 << 20 })
      .on('data', (c) => h.update(c))
      .on('error', reject)
      .on('end', () => resolve(h.digest('hex')));
  });
}

/** sha256 of every regular file under `root`, by `/`-rooted path inside it. */
export async function treeSums(root: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const walk = async (d: string, rel: string): Promise<void> => {
    for (const e of await readdir(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      const r = `${rel}/${e.name}`;
      if (e.isDirectory()) await walk(p, r);
      else if (e.isFile()) out.set(r, await sha256File(p));
    }
  };
  await walk(root, '');
  return out;
}

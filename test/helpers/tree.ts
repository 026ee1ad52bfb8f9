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

function sha256File(p: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    createReadStream(p, { highWaterMark: 1 << 20 })
      .on('data', (c) => h.update(c))
      .on('error', reject)
      .on('end', () => resolve(h.digest('hex')));
  });
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

/** A snapshot of the tree under `root`, by relative path ('.' for root itself). */
export async function snapshotTree(root: string, opts: SnapshotOptions = {}): Promise<Map<string, TreeEntry>> {
  const hash = opts.hash ?? true;
  const out = new Map<string, TreeEntry>();
  const xattrs = await treeXattrs(root);
  const walk = async (rel: string): Promise<void> => {
    const abs = rel === '.' ? root : path.join(root, rel);
    const st = await lstat(abs);
    const type = typeOf(st);
    const xa: Record<string, string> = {};
    for (const [k, v] of Object.entries(xattrs.get(rel) ?? {})) if (opts.xattrFilter === undefined || opts.xattrFilter.test(k)) xa[k] = v;
    const e: TreeEntry = {
      type,
      perm: st.mode & 0o7777,
      uid: st.uid,
      gid: st.gid,
      size: type === 'reg' || type === 'symlink' ? st.size : 0,
      mtimeMs: Math.floor(st.mtimeMs),
      xattrs: xa,
      ino: st.ino,
      nlink: st.nlink,
    };
    if (type === 'symlink') e.target = await readlink(abs);
    if (type === 'char' || type === 'block') e.rdev = `${major(st.rdev)},${minor(st.rdev)}`;
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

/** Paths grouped by inode, for regular files with more than one name. */
export function hardlinkGroups(tree: Map<string, TreeEntry>): string[][] {
  const byIno = new Map<number, string[]>();
  for (const [p, e] of tree) if (e.type === 'reg') byIno.set(e.ino, [...(byIno.get(e.ino) ?? []), p]);
  return [...byIno.values()].filter((g) => g.length > 1).map((g) => g.sort()).sort((a, b) => a[0]!.localeCompare(b[0]!));
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
 * Asserts `actual` equals `expected` path by path (one assertion per difference, one summary
 * assertion per tree), and that hardlink groups are the same.
 */
export function compareTrees(t: Test, actual: Map<string, TreeEntry>, expected: Map<string, TreeEntry>, label: string, opts: CompareOptions = {}): void {
  const ignore = opts.ignore ?? (() => false);
  const diffs: string[] = [];
  const fields = (e: TreeEntry, isDir: boolean): Record<string, unknown> => ({
    type: e.type,
    perm: e.perm.toString(8),
    uid: e.uid,
    gid: e.gid,
    size: e.size,
    ...(opts.mtime === false || (isDir && opts.dirMtime === false) ? {} : { mtimeMs: e.mtimeMs }),
    target: e.target,
    rdev: e.rdev,
    xattrs: e.xattrs,
    sha256: e.sha256,
    nlink: e.type === 'dir' ? undefined : e.nlink,
  });
  for (const [p, want] of expected) {
    if (ignore(p)) continue;
    const got = actual.get(p);
    if (got === undefined) {
      diffs.push(`${p}: missing`);
      continue;
    }
    const a = fields(got, got.type === 'dir');
    const b = fields(want, want.type === 'dir');
    for (const k of Object.keys(b)) {
      if (JSON.stringify(a[k]) !== JSON.stringify(b[k])) diffs.push(`${p}: ${k} ${JSON.stringify(a[k])} != expected ${JSON.stringify(b[k])}`);
    }
  }
  for (const p of actual.keys()) if (!ignore(p) && !expected.has(p)) diffs.push(`${p}: unexpected`);
  t.same(diffs.slice(0, 50), [], `${label}: ${expected.size} paths equal (${diffs.length} differences)`);
  const keep = (m: Map<string, TreeEntry>): Map<string, TreeEntry> => new Map([...m].filter(([p]) => !ignore(p)));
  t.same(hardlinkGroups(keep(actual)), hardlinkGroups(keep(expected)), `${label}: same hardlink groups`);
}

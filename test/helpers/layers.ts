/**
 * Test layers built from real files on this machine (never downloaded, never checked in).
 *
 * Every artifact (tree, tar, compressed layer) is built under a temporary sibling name and
 * renamed into place, so an existing path is always complete: "exists" means "built".
 * A lock directory next to the target keeps two test processes (tap runs 2 jobs) from
 * building the same thing twice. Names carry FIXTURE_VERSION so that changing a recipe
 * here invalidates old caches.
 */
import { spawn } from 'node:child_process';
import { createReadStream, createWriteStream } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { constants as zconst, createGzip } from 'node:zlib';

/** Bump when a recipe below changes, so cached artifacts of the old recipe are not reused. */
export const FIXTURE_VERSION = 2;

export type TreeKind = 'special' | 'usr-small' | 'usr-large';
export type TarFormat = 'gnu' | 'posix' | 'ustar';
/**
 * `gzip-N`: the gzip CLI reading stdin (10-byte header, no name, mtime 0);
 * `gzip-named`: gzip -6 on the file, so the header carries FNAME and an mtime (header > 10 bytes);
 * `node-zlib`: Node's zlib.createGzip (default level);
 * `multi-member`: the tar cut in 3 byte ranges, each gzip -6'd, concatenated;
 * `pigz`: pigz -6 (needs the pigz package); `none`: the plain tar.
 */
export type Compression =
  | 'gzip-1'
  | 'gzip-6'
  | 'gzip-9'
  | 'gzip-named'
  | 'node-zlib'
  | 'multi-member'
  | 'pigz'
  | 'none';
export const COMPRESSIONS: readonly Compression[] = [
  'gzip-1',
  'gzip-6',
  'gzip-9',
  'gzip-named',
  'node-zlib',
  'multi-member',
  'pigz',
  'none',
];

export interface LayerSpec {
  tree: TreeKind;
  format: TarFormat;
  compression: Compression;
}

/**
 * Degenerate layers: `empty-gzip` = `gzip < /dev/null` (a gzip member with an empty body),
 * `eof-tar` = GNU tar of nothing (only zero blocks, padded to a 10 KiB record),
 * `eof-tar-gz` = that tar gzipped, `zero-bytes` = a 0-byte file.
 */
export type EdgeLayerKind = 'empty-gzip' | 'eof-tar' | 'eof-tar-gz' | 'zero-bytes';

// ---------------------------------------------------------------------------------------
// Errors

/** A fixture could not be built; names the artifact and the reason. */
export class FixtureError extends Error {
  readonly subject: string;
  constructor(subject: string, reason: string, options?: { cause?: unknown }) {
    super(`${subject}: ${reason}`, options);
    this.name = new.target.name;
    this.subject = subject;
  }
}

/** A tool the fixture needs is not installed (tests turn this into t.skip). */
export class FixtureUnavailableError extends FixtureError {}

/** A child process failed; carries its exit status and stderr. */
export class CommandError extends FixtureError {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stderr: string;
  constructor(cmd: string, args: readonly string[], code: number | null, signal: NodeJS.Signals | null, stderr: string) {
    const how = signal !== null ? `killed by ${signal}` : `exit ${String(code)}`;
    super(`${cmd} ${args.join(' ')}`.slice(0, 300), `${how}: ${stderr.trim().slice(0, 2000)}`);
    this.code = code;
    this.signal = signal;
    this.stderr = stderr;
  }
}

// ---------------------------------------------------------------------------------------
// Processes

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** File to connect to stdin (default: /dev/null). */
  stdinFile?: string;
  /** File to write stdout to instead of capturing it. */
  stdoutFile?: string;
  /** Open stdoutFile for appending instead of truncating. */
  appendStdout?: boolean;
  /** Exit codes that count as success (default [0]). */
  okCodes?: readonly number[];
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Spawns a command (no shell), waits for it, rejects with CommandError on failure. */
export async function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const stdin = opts.stdinFile !== undefined ? await fsp.open(opts.stdinFile, 'r') : undefined;
  const stdout =
    opts.stdoutFile !== undefined ? await fsp.open(opts.stdoutFile, opts.appendStdout === true ? 'a' : 'w') : undefined;
  try {
    return await new Promise<RunResult>((resolve, reject) => {
      const child = spawn(cmd, args, {
        cwd: opts.cwd,
        env: opts.env ?? process.env,
        stdio: [stdin?.fd ?? 'ignore', stdout?.fd ?? 'pipe', 'pipe'],
      });
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      child.stdout?.on('data', (b: Buffer) => out.push(b));
      child.stderr?.on('data', (b: Buffer) => err.push(b));
      child.on('error', (e: NodeJS.ErrnoException) => {
        if (e.code === 'ENOENT') reject(new FixtureUnavailableError(cmd, 'command not found', { cause: e }));
        else reject(new FixtureError(cmd, `cannot spawn: ${e.message}`, { cause: e }));
      });
      child.on('close', (code, signal) => {
        const stderrText = Buffer.concat(err).toString('utf8');
        if (code !== null && (opts.okCodes ?? [0]).includes(code)) {
          resolve({ code, stdout: Buffer.concat(out).toString('utf8'), stderr: stderrText });
        } else {
          reject(new CommandError(cmd, args, code, signal, stderrText));
        }
      });
    });
  } finally {
    await stdin?.close();
    await stdout?.close();
  }
}

const commandCache = new Map<string, Promise<boolean>>();

/** True when `name` is an executable on PATH. */
export function hasCommand(name: string): Promise<boolean> {
  let p = commandCache.get(name);
  if (p === undefined) {
    p = (async () => {
      for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(':')) {
        if (dir === '') continue;
        try {
          await fsp.access(path.join(dir, name), fsp.constants.X_OK);
          return true;
        } catch {
          // not in this PATH entry
        }
      }
      return false;
    })();
    commandCache.set(name, p);
  }
  return p;
}

async function requireCommand(name: string, pkg: string): Promise<void> {
  if (!(await hasCommand(name))) {
    throw new FixtureUnavailableError(name, `not installed (Debian package ${pkg})`);
  }
}

// ---------------------------------------------------------------------------------------
// Cache and locking

/** The cache directory shared by test runs: $SOCI_TS_TEST_CACHE or /var/tmp/soci-ts-test-cache. */
export function testCacheDir(): string {
  const env = process.env.SOCI_TS_TEST_CACHE;
  return env !== undefined && env !== '' ? env : '/var/tmp/soci-ts-test-cache';
}

export async function exists(p: string): Promise<boolean> {
  try {
    await fsp.lstat(p);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw e;
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Takes `${target}.lock` (a directory holding the owner's pid); breaks locks of dead owners. */
async function acquireLock(target: string, timeoutMs: number): Promise<() => Promise<void>> {
  const lock = `${target}.lock`;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await fsp.mkdir(lock);
      await fsp.writeFile(path.join(lock, 'pid'), String(process.pid));
      return async () => {
        await fsp.rm(lock, { recursive: true, force: true });
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    // Someone holds it: stale if its owner is gone (or never wrote its pid, for a while).
    let stale = false;
    try {
      const pid = Number((await fsp.readFile(path.join(lock, 'pid'), 'utf8')).trim());
      stale = !Number.isInteger(pid) || pid <= 0 || !pidAlive(pid);
    } catch {
      try {
        stale = Date.now() - (await fsp.stat(lock)).mtimeMs > 30_000;
      } catch {
        stale = false; // vanished meanwhile: just retry
      }
    }
    if (stale) {
      await fsp.rm(lock, { recursive: true, force: true });
      continue;
    }
    if (Date.now() > deadline) throw new FixtureError(target, `timed out waiting for lock ${lock}`);
    await sleep(200);
  }
}

const inFlight = new Map<string, Promise<string>>();

/**
 * Returns `target` once it exists, building it with `build(tmp)` if needed: `build` writes
 * a file or directory at `tmp`, which is then renamed to `target`.
 */
export function cached(target: string, build: (tmp: string) => Promise<void>): Promise<string> {
  const key = path.resolve(target);
  let p = inFlight.get(key);
  if (p === undefined) {
    p = (async () => {
      if (await exists(key)) return key;
      await fsp.mkdir(path.dirname(key), { recursive: true });
      const release = await acquireLock(key, 15 * 60_000);
      try {
        if (await exists(key)) return key; // another process built it while we waited
        // Leftovers of crashed builds (we hold the lock, so none is live).
        const base = path.basename(key);
        for (const name of await fsp.readdir(path.dirname(key))) {
          if (name.startsWith(`${base}.tmp-`)) await fsp.rm(path.join(path.dirname(key), name), { recursive: true, force: true });
        }
        const tmp = `${key}.tmp-${process.pid}`;
        try {
          await build(tmp);
          await fsp.rename(tmp, key);
        } catch (e) {
          await fsp.rm(tmp, { recursive: true, force: true });
          throw e;
        }
        return key;
      } finally {
        await release();
      }
    })();
    inFlight.set(key, p);
    // Forget failures so a later call can retry.
    p.catch(() => inFlight.delete(key));
  }
  return p;
}

// ---------------------------------------------------------------------------------------
// Trees

/** Fixed mtime (2024-01-02T03:04:05Z) given to every special-tree entry without a special one. */
const FIXED_MTIME = 1704164645;

const LONG_TARGET =
  '../' + 'long-symlink-target-component/'.repeat(5) + 'and-a-final-name-that-does-not-exist.txt'; // > 100 chars
const NAME_255_ASCII = 'n'.repeat(251) + '.txt';
const NAME_255_UTF8 = 'é'.repeat(126) + 'xyz'; // 126 × 2 + 3 = 255 bytes
const DEEP_120 = `deep/${'d'.repeat(60)}/${'f'.repeat(50)}.txt`;
const DEEP_300_DIRS = Array.from({ length: 9 }, (_, i) => `level${i}-${'x'.repeat(24)}`).join('/');
const DEEP_300 = `deep/${DEEP_300_DIRS}/${'g'.repeat(40)}.txt`;

/**
 * What makeTree('special') creates, relative to the tree root, so tests can look entries up
 * in listings. `docs/` additionally holds up to 20 real `copyright` files from /usr/share/doc,
 * and `lib/` one real 256 KiB–2 MiB file from /usr/lib.
 */
export const SPECIAL = Object.freeze({
  hardlinks: ['links/hard-a', 'links/hard-b', 'other/hard-c'] as const,
  symlinks: Object.freeze({
    'links/rel': '../docs',
    'links/abs': '/usr/share/doc',
    'links/dangling': 'does/not/exist',
    'links/long': LONG_TARGET,
    'links/to-hard': 'hard-a',
  }),
  longNames: [DEEP_120, DEEP_300] as const,
  name255: [`names/${NAME_255_ASCII}`, `names/${NAME_255_UTF8}`] as const,
  utf8: ['utf8/héllo wörld.txt', 'utf8/日本語.txt', 'utf8/rocket-🚀.txt', 'utf8/tab\there.txt'] as const,
  emptyFiles: ['empty/file', 'empty/another'] as const,
  emptyDirs: ['empty/dir', 'empty/nested/a/b'] as const,
  fifo: 'dev/fifo',
  charDevices: Object.freeze({ 'dev/null-like': [1, 3], 'dev/big-numbers': [300, 70000] } as const),
  blockDevices: Object.freeze({ 'dev/loop-like': [7, 0] } as const),
  xattrs: Object.freeze({
    'xattr/file': Object.freeze({ 'user.foo': 'bar', 'user.spaces': 'a value with spaces', 'user.empty': '' }),
    'xattr/dir': Object.freeze({ 'user.dirattr': 'on a directory' }),
    'xattr/long': Object.freeze({ 'user.long': 'v'.repeat(1000) }),
  }),
  whiteouts: ['whiteout/.wh.foo', 'whiteout/opq/.wh..wh..opq'] as const,
  modes: Object.freeze({
    'modes/setuid': 0o4755,
    'modes/setgid': 0o2755,
    'modes/sticky-dir': 0o1777,
    'modes/no-perms': 0o000,
    'modes/all-bits': 0o7777,
  }),
  owners: Object.freeze({
    'owners/big-ids': [3000000, 3000001],
    'owners/user': [1000, 1000],
    'owners/nobody': [65534, 65534],
    'owners/big-dir': [4000000, 4000000],
  } as const),
  /** Paths with a sub-second (or otherwise notable) mtime: seconds.nanoseconds since the epoch. */
  mtimes: Object.freeze({
    'times/subsecond': '1614834367.123456789',
    'times/half': '1614834367.5',
    'times/epoch': '0',
    'times/y2100': '4102444800',
  }),
});

interface FoundFile {
  type: 'f' | 'l';
  size: number;
  /** Absolute path. */
  path: string;
  /** Symlink target ('' for regular files). */
  target: string;
}

/** Lists regular files and symlinks under the existing roots (one `find`, sorted bytewise). */
async function findFiles(roots: readonly string[]): Promise<FoundFile[]> {
  const present: string[] = [];
  for (const r of roots) if (await exists(r)) present.push(r);
  if (present.length === 0) return [];
  const res = await run('find', [...present, '-xdev', '(', '-type', 'f', '-o', '-type', 'l', ')', '-printf', '%y %s %p\\0%l\\0'], {
    okCodes: [0, 1], // unreadable corners of /usr are not worth failing for
  });
  const parts = res.stdout.split('\0');
  const files: FoundFile[] = [];
  for (let i = 0; i + 1 < parts.length; i += 2) {
    const head = parts[i] ?? '';
    const m = /^([fl]) (\d+) (.*)$/s.exec(head);
    if (m === null) continue;
    files.push({ type: m[1] as 'f' | 'l', size: Number(m[2]), path: m[3] ?? '', target: parts[i + 1] ?? '' });
  }
  files.sort((a, b) => Buffer.compare(Buffer.from(a.path), Buffer.from(b.path)));
  return files;
}

/**
 * Names every tar format and our tar -tv parsing handle: valid UTF-8, printable, no " -> "
 * or " link to " (ambiguous in listings), short enough for ustar (name 100 + prefix 155).
 */
function portableName(f: FoundFile): boolean {
  const p = f.path;
  if (p.includes('\uFFFD') || /[\x00-\x1f\x7f\\]/.test(p) || p.includes(' -> ') || p.includes(' link to ')) return false;
  if (Buffer.byteLength(p) > 180 || Buffer.byteLength(path.basename(p)) > 90) return false;
  if (f.type === 'l' && (Buffer.byteLength(f.target) > 90 || /[\x00-\x1f\x7f\\]/.test(f.target) || f.target.includes('\uFFFD')))
    return false;
  return true;
}

/** Copies absolute paths (files/symlinks) into `dest`, keeping their /usr-relative layout. */
async function copyPaths(paths: readonly string[], dest: string, renameUsrTo?: string): Promise<void> {
  const list = `${dest}.list`;
  await fsp.writeFile(list, paths.map((p) => p.replace(/^\/+/, '') + '\0').join(''));
  try {
    const transform = renameUsrTo !== undefined ? [`--transform=s,^usr/,${renameUsrTo}/,`] : [];
    await new Promise<void>((resolve, reject) => {
      const src = spawn('tar', ['-C', '/', '--no-recursion', '--null', '-T', list, ...transform, '-cf', '-'], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      const dst = spawn('tar', ['-C', dest, '-xpf', '-'], { stdio: ['pipe', 'ignore', 'pipe'] });
      let srcErr = '';
      let dstErr = '';
      src.stderr.on('data', (b: Buffer) => (srcErr += b.toString()));
      dst.stderr.on('data', (b: Buffer) => (dstErr += b.toString()));
      src.stdout.pipe(dst.stdin);
      let srcCode: number | null | undefined;
      let dstCode: number | null | undefined;
      const done = (): void => {
        if (srcCode === undefined || dstCode === undefined) return;
        // tar -c exits 1 for "file changed as we read it": harmless for a fixture.
        if ((srcCode === 0 || srcCode === 1) && dstCode === 0) resolve();
        else reject(new FixtureError(dest, `copy from /usr failed (tar -c ${String(srcCode)}: ${srcErr.trim()}; tar -x ${String(dstCode)}: ${dstErr.trim()})`));
      };
      src.on('error', reject);
      dst.on('error', reject);
      src.on('close', (c) => ((srcCode = c), done()));
      dst.on('close', (c) => ((dstCode = c), done()));
    });
  } finally {
    await fsp.rm(list, { force: true });
  }
}

/** Bytes an entry adds to a tar: header + data padded to 512. */
const tarCost = (f: FoundFile): number => 512 + (f.type === 'f' ? Math.ceil(f.size / 512) * 512 : 0);

interface UsrRecipe {
  roots: readonly string[];
  /** Target tar size in bytes. */
  budget: number;
  /** Largest ordinary file taken. */
  maxSmall: number;
  /** How many big files (8–48 MiB) to include first. */
  bigFiles: number;
}

const USR_RECIPES: Record<'usr-small' | 'usr-large', UsrRecipe> = {
  'usr-small': {
    roots: ['/usr/share/doc', '/usr/share/man', '/usr/share/perl5', '/usr/share/perl', '/usr/lib/python3', '/usr/share'],
    budget: 30 << 20,
    maxSmall: 2 << 20,
    bigFiles: 0,
  },
  'usr-large': {
    roots: ['/usr/share', '/usr/lib', '/usr/bin', '/usr/sbin', '/usr/libexec'],
    budget: 350 << 20,
    maxSmall: 1 << 20,
    bigFiles: 4,
  },
};

async function buildUsrTree(dest: string, recipe: UsrRecipe): Promise<void> {
  const all = (await findFiles(recipe.roots)).filter(portableName);
  const seen = new Set<string>();
  const picked: FoundFile[] = [];
  let total = 1024;
  const take = (f: FoundFile): void => {
    if (seen.has(f.path)) return;
    seen.add(f.path);
    picked.push(f);
    total += tarCost(f);
  };
  // A few big files, spread over the candidates, so that files span several 4 MiB spans.
  const big = all.filter((f) => f.type === 'f' && f.size > 8 << 20 && f.size <= 48 << 20);
  for (let i = 0; i < recipe.bigFiles && i < big.length; i++) {
    const f = big[Math.floor((i * big.length) / recipe.bigFiles)];
    if (f !== undefined) take(f);
  }
  for (const f of all) {
    if (total >= recipe.budget) break;
    if (f.type === 'f' && f.size > recipe.maxSmall) continue;
    take(f);
  }
  if (picked.length === 0) throw new FixtureError(dest, `no files found under ${recipe.roots.join(', ')}`);
  await fsp.mkdir(dest, { recursive: true });
  await copyPaths(picked.map((f) => f.path), dest);
  // A /usr smaller than the budget: repeat the same files under renamed roots.
  const once = total;
  for (let copy = 2; total < recipe.budget; copy++) {
    if (copy > 64) throw new FixtureError(dest, `/usr is too small: ${total} bytes after ${copy - 1} copies`);
    await copyPaths(picked.map((f) => f.path), dest, `usr-copy${copy}`);
    total += once - 1024;
  }
  // Directory mtimes would be "now": pin them so rebuilt trees list the same.
  await run('find', [dest, '-type', 'd', '-exec', 'touch', '-h', '-c', '-d', `@${FIXED_MTIME}`, '{}', '+']);
}

async function buildSpecialTree(dest: string): Promise<void> {
  await requireCommand('setfattr', 'attr');
  if (process.getuid?.() !== 0) throw new FixtureUnavailableError(dest, 'the special tree needs root (mknod, chown)');

  const mk = async (rel: string): Promise<string> => {
    const p = path.join(dest, rel);
    await fsp.mkdir(path.dirname(p), { recursive: true });
    return p;
  };
  const write = async (rel: string, data: string | Buffer): Promise<string> => {
    const p = await mk(rel);
    await fsp.writeFile(p, data);
    return p;
  };

  // Real files: copyright texts and one mid-size library.
  const docs = (await findFiles(['/usr/share/doc']))
    .filter((f) => f.type === 'f' && path.basename(f.path) === 'copyright' && portableName(f))
    .slice(0, 20);
  await fsp.mkdir(path.join(dest, 'docs'), { recursive: true });
  for (const f of docs) {
    await fsp.copyFile(f.path, path.join(dest, 'docs', `${path.basename(path.dirname(f.path))}.copyright`));
  }
  const libs = (await findFiles(['/usr/lib/x86_64-linux-gnu', '/usr/lib'])).filter(
    (f) => f.type === 'f' && f.size >= 256 << 10 && f.size <= 2 << 20 && portableName(f),
  );
  // Prefer a shared library (realistic binary content); any mid-size file will do.
  const lib = libs.find((f) => /\.so(\.|$)/.test(path.basename(f.path))) ?? libs[0];
  if (lib === undefined || docs.length === 0) throw new FixtureError(dest, 'no real files found in /usr/share/doc or /usr/lib');
  await fsp.mkdir(path.join(dest, 'lib'), { recursive: true });
  await fsp.copyFile(lib.path, path.join(dest, 'lib', path.basename(lib.path)));

  // Hardlinks: one real file under three names, in two directories.
  const [h0, ...hRest] = SPECIAL.hardlinks;
  const firstDoc = docs[0];
  if (firstDoc === undefined) throw new FixtureError(dest, 'no copyright file found');
  await fsp.copyFile(firstDoc.path, await mk(h0));
  for (const h of hRest) await fsp.link(path.join(dest, h0), await mk(h));

  for (const [rel, target] of Object.entries(SPECIAL.symlinks)) await fsp.symlink(target, await mk(rel));
  for (const rel of [...SPECIAL.longNames, ...SPECIAL.name255, ...SPECIAL.utf8]) {
    await write(rel, `real-ish content of ${rel}\n`);
  }
  for (const rel of SPECIAL.emptyFiles) await write(rel, '');
  for (const rel of SPECIAL.emptyDirs) await fsp.mkdir(path.join(dest, rel), { recursive: true });

  await run('mkfifo', [await mk(SPECIAL.fifo)]);
  for (const [rel, [maj, min]] of Object.entries(SPECIAL.charDevices)) {
    await run('mknod', [await mk(rel), 'c', String(maj), String(min)]);
  }
  for (const [rel, [maj, min]] of Object.entries(SPECIAL.blockDevices)) {
    await run('mknod', [await mk(rel), 'b', String(maj), String(min)]);
  }

  for (const [rel, attrs] of Object.entries(SPECIAL.xattrs)) {
    const p = rel.endsWith('dir') ? (await fsp.mkdir(path.join(dest, rel), { recursive: true }), path.join(dest, rel)) : await write(rel, `file with xattrs: ${rel}\n`);
    for (const [k, v] of Object.entries(attrs)) {
      // setfattr -v "" is rejected on some versions; no -v sets an empty value.
      await run('setfattr', v === '' ? ['-n', k, p] : ['-n', k, '-v', v, p]);
    }
  }

  await write(SPECIAL.whiteouts[0], '');
  await write(SPECIAL.whiteouts[1], '');
  await write('whiteout/opq/kept', 'kept after the opaque marker\n');

  for (const [rel, mode] of Object.entries(SPECIAL.modes)) {
    const p = rel.endsWith('-dir') ? (await fsp.mkdir(path.join(dest, rel), { recursive: true }), path.join(dest, rel)) : await write(rel, `mode ${mode.toString(8)}\n`);
    await fsp.chmod(p, mode); // chmod after create: umask does not touch it
  }
  for (const [rel, [uid, gid]] of Object.entries(SPECIAL.owners)) {
    const p = rel.endsWith('-dir') ? (await fsp.mkdir(path.join(dest, rel), { recursive: true }), path.join(dest, rel)) : await write(rel, `owned by ${uid}:${gid}\n`);
    await fsp.lchown(p, uid, gid);
  }
  // A symlink owned by someone else, too.
  await fsp.symlink('../owners/user', await mk('links/owned-link'));
  await fsp.lchown(path.join(dest, 'links/owned-link'), 1000, 1000);

  for (const rel of Object.keys(SPECIAL.mtimes)) await write(rel, `time ${rel}\n`);

  // Times last (mknod, link, setfattr all touch directory mtimes). touch -h: never follow
  // symlinks nor open fifos; nanosecond precision that fs.utimes (a double) cannot give.
  const everything = (await run('find', [dest, '-print0'])).stdout.split('\0').filter((p) => p !== '');
  for (let i = 0; i < everything.length; i += 500) {
    await run('touch', ['-h', '-c', '-d', `@${FIXED_MTIME}`, ...everything.slice(i, i + 500)]);
  }
  for (const [rel, t] of Object.entries(SPECIAL.mtimes)) await run('touch', ['-h', '-c', '-d', `@${t}`, path.join(dest, rel)]);
}

/**
 * Builds a tree of kind `kind` at `dir` (reused when `dir` already exists; built under a
 * temporary name and renamed, so an existing `dir` is complete). Returns `dir`.
 */
export function makeTree(dir: string, kind: TreeKind): Promise<string> {
  return cached(dir, (tmp) => (kind === 'special' ? buildSpecialTree(tmp) : buildUsrTree(tmp, USR_RECIPES[kind])));
}

// ---------------------------------------------------------------------------------------
// Tar

/**
 * Tars `treeDir` (names `./…`, sorted, numeric owners) with GNU tar in `format`; `posix` also
 * stores xattrs and omits atime/ctime records (they change on every read). Reused when
 * `outPath` exists. `ustar` cannot hold the special tree (big uids, long names): that fails
 * with a CommandError naming the entries.
 */
export function makeTar(treeDir: string, outPath: string, format: TarFormat): Promise<string> {
  return cached(outPath, async (tmp) => {
    const args = ['--format', format, '--sort=name', '--numeric-owner', '-C', treeDir, '-cf', tmp];
    if (format === 'posix') {
      args.push('--xattrs', "--xattrs-include=*", '--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime');
    }
    await run('tar', [...args, '.'], { env: { ...process.env, LC_ALL: 'C' } });
  });
}

// ---------------------------------------------------------------------------------------
// Compression

async function gzipRange(tarPath: string, start: number, end: number, outPath: string): Promise<void> {
  // gzip -6 over stdin fed from a byte range: a complete member per call, appended.
  const out = await fsp.open(outPath, 'a');
  try {
    await new Promise<void>((resolve, reject) => {
      const child = spawn('gzip', ['-6', '-c', '-n'], { stdio: ['pipe', out.fd, 'pipe'] });
      const { stdin, stderr } = child;
      if (stdin === null || stderr === null) throw new FixtureError(outPath, 'gzip spawned without pipes');
      let err = '';
      stderr.on('data', (b: Buffer) => (err += b.toString()));
      child.on('error', reject);
      child.on('close', (code, signal) =>
        code === 0 ? resolve() : reject(new CommandError('gzip', ['-6', '-c', '-n'], code, signal, err)),
      );
      const src = end > start ? createReadStream(tarPath, { start, end: end - 1 }) : null;
      if (src === null) stdin.end();
      else pipeline(src, stdin).catch(reject);
    });
  } finally {
    await out.close();
  }
}

/**
 * Compresses `tarPath` into `outPath` (reused when it exists). Rejects with
 * FixtureUnavailableError for `pigz` when pigz is not installed.
 */
export function compress(tarPath: string, outPath: string, how: Compression): Promise<string> {
  return cached(outPath, async (tmp) => {
    switch (how) {
      case 'gzip-1':
      case 'gzip-6':
      case 'gzip-9':
        // stdin: no FNAME, mtime 0, a plain 10-byte header.
        await run('gzip', [`-${how.slice(5)}`, '-c'], { stdinFile: tarPath, stdoutFile: tmp });
        return;
      case 'gzip-named':
        // On a named file gzip stores its name and mtime: header longer than 10 bytes.
        await run('gzip', ['-6', '-c', '-N', tarPath], { stdoutFile: tmp });
        return;
      case 'node-zlib':
        await pipeline(createReadStream(tarPath), createGzip({ level: zconst.Z_DEFAULT_COMPRESSION }), createWriteStream(tmp));
        return;
      case 'multi-member': {
        const size = (await fsp.stat(tarPath)).size;
        const cuts = [0, Math.floor(size / 3), Math.floor((2 * size) / 3), size];
        await fsp.writeFile(tmp, '');
        for (let i = 0; i + 1 < cuts.length; i++) await gzipRange(tarPath, cuts[i] ?? 0, cuts[i + 1] ?? 0, tmp);
        return;
      }
      case 'pigz':
        await requireCommand('pigz', 'pigz');
        await run('pigz', ['-6', '-c', '-p', '2'], { stdinFile: tarPath, stdoutFile: tmp });
        return;
      case 'none':
        await fsp.copyFile(tarPath, tmp);
        return;
    }
  });
}

// ---------------------------------------------------------------------------------------
// Layers

const treeName = (kind: TreeKind): string => `tree-${kind}-v${FIXTURE_VERSION}`;

/** The cached tree of `kind` under `cacheDir`. */
export function tree(cacheDir: string, kind: TreeKind): Promise<string> {
  return makeTree(path.join(cacheDir, treeName(kind)), kind);
}

/** The cached uncompressed tar of `kind` in `format` under `cacheDir`. */
export async function layerTar(cacheDir: string, kind: TreeKind, format: TarFormat): Promise<string> {
  const dir = await tree(cacheDir, kind);
  return makeTar(dir, path.join(cacheDir, `${kind}-${format}-v${FIXTURE_VERSION}.tar`), format);
}

/** The cached layer for `spec` under `cacheDir` (tree, tar and compression built on demand). */
export async function layer(cacheDir: string, spec: LayerSpec): Promise<string> {
  const tarPath = await layerTar(cacheDir, spec.tree, spec.format);
  if (spec.compression === 'none') return tarPath;
  const out = path.join(cacheDir, `${spec.tree}-${spec.format}-${spec.compression}-v${FIXTURE_VERSION}.tar.gz`);
  return compress(tarPath, out, spec.compression);
}

const OUR_PREFIXES = ['tree-special-', 'tree-usr-small-', 'tree-usr-large-', 'special-', 'usr-small-', 'usr-large-', 'edge-'];

/**
 * Removes artifacts of other FIXTURE_VERSIONs from `cacheDir` (the usr-large ones are
 * ~0.5 GB). Only names this module creates are touched; returns the removed names.
 */
export async function pruneStaleFixtures(cacheDir: string): Promise<string[]> {
  let names: string[];
  try {
    names = await fsp.readdir(cacheDir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
  const removed: string[] = [];
  for (const name of names) {
    const m = /-v(\d+)(?:\.tar|\.tar\.gz|\.gz|\.bin)?$/.exec(name);
    if (m === null || Number(m[1]) === FIXTURE_VERSION || !OUR_PREFIXES.some((p) => name.startsWith(p))) continue;
    await fsp.rm(path.join(cacheDir, name), { recursive: true, force: true });
    removed.push(name);
  }
  return removed;
}

/** The cached degenerate layer `kind` under `cacheDir`. */
export function edgeLayer(cacheDir: string, kind: EdgeLayerKind): Promise<string> {
  const ext = kind === 'eof-tar' ? '.tar' : kind === 'zero-bytes' ? '.bin' : '.gz';
  return cached(path.join(cacheDir, `edge-${kind}-v${FIXTURE_VERSION}${ext}`), async (tmp) => {
    switch (kind) {
      case 'empty-gzip':
        await run('gzip', ['-c'], { stdinFile: '/dev/null', stdoutFile: tmp });
        return;
      case 'eof-tar':
        // GNU tar of no files: just the end-of-archive zero blocks, padded to one record.
        await run('tar', ['-cf', tmp, '--files-from', '/dev/null']);
        return;
      case 'eof-tar-gz': {
        const t = await edgeLayer(cacheDir, 'eof-tar');
        await run('gzip', ['-6', '-c'], { stdinFile: t, stdoutFile: tmp });
        return;
      }
      case 'zero-bytes':
        await fsp.writeFile(tmp, '');
        return;
    }
  });
}

// ---------------------------------------------------------------------------------------
// A layer with one large directory

/** Bump when largeDirLayer's recipe changes. */
const LARGE_DIR_VERSION = 2;
/** The directory of the large-directory layer holding every entry (`./many`). */
export const LARGE_DIR = 'many';
/** Two more files of that layer, root-owned copies of a real file: mode 0644 and mode 0600. */
export const LARGE_DIR_PERMS = Object.freeze({ open: 'private/open-0644', secret: 'private/secret-0600' });

/**
 * A gzip layer whose directory `many/` holds several thousand entries made from this machine's
 * files: a copy of every file of at most 8 KiB under /usr/share/doc, named by its path there
 * (`pkg--copyright`, `/` → `--`), and a symlink for every name in /usr/bin (to that file).
 * Names of real length and character sets, in no convenient order. Also LARGE_DIR_PERMS (for
 * permission checks as another user). Cached under `cacheDir`.
 */
export async function largeDirLayer(cacheDir: string): Promise<string> {
  const treeDir = await cached(path.join(cacheDir, `tree-large-dir-v${LARGE_DIR_VERSION}`), async (tmp) => {
    const dir = path.join(tmp, LARGE_DIR);
    await fsp.mkdir(dir, { recursive: true });
    const copy = async (from: string): Promise<void> => {
      let names: string[];
      try {
        names = (await fsp.readdir(from)).sort();
      } catch {
        return;
      }
      for (const name of names) {
        const p = path.join(from, name);
        const st = await fsp.lstat(p).catch(() => undefined);
        if (st === undefined) continue;
        if (st.isDirectory()) await copy(p);
        else if (st.isFile() && st.size <= 8192) {
          const flat = path.relative('/usr/share/doc', p).split(path.sep).join('--');
          if (Buffer.byteLength(flat) <= 255) await fsp.copyFile(p, path.join(dir, flat)).catch(() => undefined);
        }
      }
    };
    await copy('/usr/share/doc');
    for (const name of (await fsp.readdir('/usr/bin').catch(() => [] as string[])).sort()) {
      await fsp.symlink(path.join('/usr/bin', name), path.join(dir, `bin-${name}`)).catch(() => undefined);
    }
    const n = (await fsp.readdir(dir)).length;
    await fsp.mkdir(path.join(tmp, 'private'), { mode: 0o755 });
    for (const [rel, mode] of [[LARGE_DIR_PERMS.open, 0o644], [LARGE_DIR_PERMS.secret, 0o600]] as const) {
      await fsp.copyFile('/usr/share/common-licenses/GPL-3', path.join(tmp, rel)).catch(() => fsp.writeFile(path.join(tmp, rel), `${rel}\n`));
      await fsp.chmod(path.join(tmp, rel), mode);
      await fsp.chown(path.join(tmp, rel), 0, 0);
    }
    await fsp.chmod(path.join(tmp, 'private'), 0o755);
    await fsp.chmod(tmp, 0o755);
    if (n < 2000) throw new FixtureUnavailableError('/usr/share/doc', `only ${n} entries for the large directory (want at least 2000 from /usr/share/doc and /usr/bin)`);
  });
  const tarPath = await makeTar(treeDir, path.join(cacheDir, `large-dir-gnu-v${LARGE_DIR_VERSION}.tar`), 'gnu');
  return compress(tarPath, path.join(cacheDir, `large-dir-gnu-gzip-6-v${LARGE_DIR_VERSION}.tar.gz`), 'gzip-6');
}

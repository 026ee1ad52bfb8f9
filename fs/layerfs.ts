/**
 * One lazily loaded layer as a read-only FUSE filesystem (fuse-native over libfuse2): metadata
 * from the layer's inode table (built from its zTOC, no I/O), file data through the layer's span
 * manager (range reads from the registry, verified, inflated from checkpoints, cached).
 *
 * Every operation answers from memory or from a promise; nothing here does sync I/O or runs a
 * child process synchronously (either would deadlock the kernel request it serves). A read that
 * the registry cannot serve within the fetch timeout gets EIO; the next read tries again.
 *
 * fuse-native limits worth knowing: times reach the kernel at millisecond precision, and times
 * before the epoch are shown as the epoch.
 */
import { constants as osConstants } from 'node:os';
import { access, mkdir, readdir, readFile, realpath, stat, writeFile } from 'node:fs/promises';
import { performance } from 'node:perf_hooks';
import Fuse, { type FuseOps, type FuseStat } from 'fuse-native';
import { nullLogger, type Logger } from '../fetcher/index.js';
import type { LayerIndex } from '../ztoc/index.js';
import { InodeTable, ROOT_INO, statfsOf, type Node } from './inodes.js';
import { NativeReadTable, type NativeReadStats, type NativeTreeEntry } from './native-read.js';
import { SpanManager, type CompressedSpanStoreLike, type InflatedSpanCacheLike, type SpanSource } from './spans.js';

const E = osConstants.errno;
const EIO = -E.EIO;
const ENOENT = -E.ENOENT;
const EROFS = -E.EROFS;
const EISDIR = -E.EISDIR;
const ENOTDIR = -E.ENOTDIR;
const EINVAL = -E.EINVAL;
const ENODATA = -E.ENODATA;
const ENOSYS = -E.ENOSYS;
const ERANGE = -E.ERANGE;
const EBADF = -E.EBADF;
const W_OK = 2;
/** Entries and attributes never change: let the kernel cache them for an hour. */
const CACHE_TIMEOUT_S = 3600;
const DEFAULT_KERNEL_READ_AHEAD_KIB = 1024;

export type FuseErrorKind = 'unavailable' | 'not-root' | 'mount-failed' | 'unmount-failed';

/** FUSE is missing, we may not use it, or a mount or unmount failed. */
export class FuseError extends Error {
  readonly kind: FuseErrorKind;
  /** The mountpoint, or `/dev/fuse`. */
  readonly subject: string;
  constructor(kind: FuseErrorKind, subject: string, reason: string, options?: { cause?: unknown }) {
    super(`${subject}: ${reason}`, options);
    this.name = 'FuseError';
    this.kind = kind;
    this.subject = subject;
  }
}

/** Rejects with a FuseError saying what is missing when this process cannot mount FUSE. */
export async function checkFuse(): Promise<void> {
  if (process.getuid?.() !== 0) throw new FuseError('not-root', 'FUSE', 'mounting a layer needs root (run as root, or with sudo)');
  try {
    await access('/dev/fuse');
  } catch (err) {
    throw new FuseError('unavailable', '/dev/fuse', 'not present: this kernel or container has no FUSE (load the fuse module, or pass --device /dev/fuse)', { cause: err });
  }
  const filesystems = await readFile('/proc/filesystems', 'utf8').catch(() => '');
  if (filesystems !== '' && !/\bfuse\b/.test(filesystems)) throw new FuseError('unavailable', '/proc/filesystems', 'the kernel lists no fuse filesystem');
}

export interface LayerFsOptions {
  /** Directory to mount on: created if missing, must be empty. */
  mountpoint: string;
  layerDigest: string;
  /** The layer's zTOC. */
  index: LayerIndex;
  /** The inode table of `index`, when built beforehand (InodeTable.fromLayer(index)). */
  inodes?: InodeTable;
  /** Compressed bytes of the layer blob (the registry). */
  source: SpanSource;
  /** Inflated spans, shared by every layer of the process. */
  memory: InflatedSpanCacheLike;
  /** Compressed spans on disk, shared. */
  disk?: CompressedSpanStoreLike;
  logger?: Logger;
  /** A read waiting longer than this for the registry gets EIO. Default 30 s. */
  fetchTimeoutMs?: number;
  /** Fetch the next span ahead on sequential reads. Default true. */
  readAhead?: boolean;
  /** `allow_other` + `default_permissions`, so containers read as any user. Default true. */
  allowOther?: boolean;
  /**
   * Answer getattr (and so lookups) of every path, and reads whose spans are in the memory
   * cache, in the libfuse worker (native-read.ts) instead of JavaScript. Default true; without
   * the binding built by scripts/setup (or with SOCI_TS_NATIVE_READ=0) everything goes to JavaScript.
   */
  nativeReads?: boolean;
  /** Called after every FUSE operation JavaScript answers (for latency metrics; getattrs and reads answered natively are counted in `counters`, not timed). */
  onOp?: (op: string, ms: number, ok: boolean) => void;
  /**
   * The kernel's read-ahead for the mount, in KiB (its bdi `read_ahead_kb`; 0 leaves the
   * kernel's). libfuse 2 asks for at most 128 KiB a request and the kernel reads ahead 128 KiB,
   * so a sequential reader waits for one request after another; more read-ahead keeps several
   * in flight. Default 1024.
   */
  kernelReadAheadKiB?: number;
}

export interface LayerFsCounters {
  ops: number;
  errors: number;
  reads: number;
  bytesRead: number;
}

/** fuse-native with `use_ino` (our inode numbers, so hardlinks share one) and ERANGE-correct xattr ops. */
class LayerFuse extends Fuse {
  /** The mount's fuse-native thread buffer (for the native read path), once mounted. */
  get thread(): Buffer | null {
    return this._thread;
  }

  get threadLocals(): number {
    return this._threads.size;
  }

  protected override _fuseOptions(): string {
    const base = super._fuseOptions();
    // The tree never changes: the kernel may also remember names that are not there (overlayfs
    // looks each name up in every lower layer above the one that has it).
    const ours = `use_ino,ro,negative_timeout=${CACHE_TIMEOUT_S}`;
    return base === '' ? `-o${ours}` : `${base},${ours}`;
  }

  // fuse-native copies a value into the kernel's buffer without checking its size; libfuse would
  // then read past the buffer. Answer ERANGE when the value does not fit, as the kernel expects.
  protected override _op_getxattr(signal: (...args: unknown[]) => void, path: string, name: string, valueBuf: Buffer, position: number): void {
    const getxattr = this.ops.getxattr;
    if (getxattr === undefined) return void signal(ENODATA, valueBuf.buffer);
    getxattr(path, name, position, (err, value) => {
      if (err !== 0) return signal(err, valueBuf.buffer);
      if (value === undefined || value === null) return signal(ENODATA, valueBuf.buffer);
      if (valueBuf.length === 0) return signal(value.length, valueBuf.buffer);
      if (value.length > valueBuf.length) return signal(ERANGE, valueBuf.buffer);
      value.copy(valueBuf);
      return signal(value.length, valueBuf.buffer);
    });
  }

  protected override _op_listxattr(signal: (...args: unknown[]) => void, path: string, listBuf: Buffer): void {
    const listxattr = this.ops.listxattr;
    if (listxattr === undefined) return void signal(0, listBuf.buffer);
    listxattr(path, (err, list) => {
      if (err !== 0 || list === undefined) return signal(err === 0 ? EIO : err, listBuf.buffer);
      let size = 0;
      for (const n of list) size += Buffer.byteLength(n) + 1;
      if (listBuf.length === 0) return signal(size, listBuf.buffer);
      if (size > listBuf.length) return signal(ERANGE, listBuf.buffer);
      let p = 0;
      for (const n of list) {
        p += listBuf.write(n, p);
        listBuf[p++] = 0;
      }
      return signal(p, listBuf.buffer);
    });
  }
}

/**
 * Sets the read-ahead of the filesystem mounted at `mountpoint` (its backing device, found in
 * /proc/self/mountinfo: no request to the mount itself). Best effort: without a writable sysfs
 * (a container, not root) the kernel's default stays, and that is logged.
 */
async function setKernelReadAhead(mountpoint: string, kib: number, logger: Logger): Promise<void> {
  const file = await readFile('/proc/self/mountinfo', 'utf8')
    .then((text) => {
      // Fields: id parent major:minor root mountpoint ...; the last matching line is the top mount.
      let dev: string | undefined;
      for (const line of text.split('\n')) {
        const f = line.split(' ');
        if (f[4] !== undefined && unescapeMountinfo(f[4]) === mountpoint) dev = f[2];
      }
      return dev === undefined ? undefined : `/sys/class/bdi/${dev}/read_ahead_kb`;
    })
    .catch(() => undefined);
  if (file === undefined) return void logger.debug('kernel read-ahead left as it is: mount not found in mountinfo', { mountpoint });
  await writeFile(file, `${Math.round(kib)}\n`).then(
    () => logger.debug('kernel read-ahead set', { file, kib }),
    (err: unknown) => logger.debug('kernel read-ahead left as it is', { file, error: err }),
  );
}

/** mountinfo escapes space, tab, newline and backslash as octal. */
function unescapeMountinfo(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

function mountAsync(f: Fuse): Promise<void> {
  return new Promise((resolve, reject) => f.mount((err) => (err ? reject(err) : resolve())));
}

function unmountAsync(f: Fuse): Promise<void> {
  return new Promise((resolve, reject) => f.unmount((err) => (err ? reject(err) : resolve())));
}

function toFuseStat(n: Node): FuseStat {
  // fuse-native takes ms numbers as well as Dates; times before the epoch cannot be encoded.
  const ms = Math.max(0, n.mtimeSec * 1000 + Math.floor(n.mtimeNsec / 1e6)) as unknown as Date;
  return {
    mode: n.mode,
    uid: n.uid,
    gid: n.gid,
    size: n.size,
    dev: 0,
    nlink: n.nlink,
    ino: n.ino,
    rdev: n.rdev,
    blksize: 4096,
    blocks: n.kind === 'reg' ? Math.ceil(n.size / 512) : 0,
    atime: ms,
    mtime: ms,
    ctime: ms,
  };
}

interface PendingRead {
  cb: (bytesOrErr: number) => void;
}

export class LayerFs {
  readonly mountpoint: string;
  readonly layerDigest: string;
  readonly table: InodeTable;
  readonly spans: SpanManager;
  /** Counts of the ops JavaScript answered; `counters` adds the reads answered natively. */
  private readonly own: LayerFsCounters = { ops: 0, errors: 0, reads: 0, bytesRead: 0 };
  /** The native read path's table of this mount (see native-read.ts), when available. */
  private native: NativeReadTable | undefined;
  private unwatch: (() => void) | undefined;
  private readonly logger: Logger;
  private readonly fuse: LayerFuse;
  private readonly onOp: ((op: string, ms: number, ok: boolean) => void) | undefined;
  /** Reads waiting for data: answered with EIO at unmount so the FUSE threads are never left waiting. */
  private readonly pending = new Set<PendingRead>();
  private stats: FuseStat[] | undefined;
  private closing: Promise<void> | undefined;
  private mounted = false;

  private constructor(opts: LayerFsOptions, table: InodeTable) {
    this.mountpoint = opts.mountpoint;
    this.layerDigest = opts.layerDigest;
    this.table = table;
    this.logger = (opts.logger ?? nullLogger).child({ layer: opts.layerDigest });
    this.onOp = opts.onOp;
    this.spans = new SpanManager({
      layerDigest: opts.layerDigest,
      index: opts.index,
      source: opts.source,
      memory: opts.memory,
      disk: opts.disk,
      logger: this.logger,
      readAhead: opts.readAhead,
      fetchTimeoutMs: opts.fetchTimeoutMs,
    });
    const allowOther = opts.allowOther ?? true;
    this.fuse = new LayerFuse(opts.mountpoint, this.ops(), {
      force: true,
      mkdir: true,
      // Our own fetch timeout answers EIO; fuse-native's would answer ETIMEDOUT at 15 s.
      timeout: false,
      allowOther,
      defaultPermissions: allowOther,
      kernelCache: true,
      entryTimeout: CACHE_TIMEOUT_S,
      attrTimeout: CACHE_TIMEOUT_S,
      fsname: `soci-ts:${opts.layerDigest.replace(/^sha256:/, '').slice(0, 12)}`,
      subtype: 'soci-ts',
    });
  }

  /** Builds the layer's inode table and mounts it at `opts.mountpoint`. */
  static async mount(opts: LayerFsOptions): Promise<LayerFs> {
    await checkFuse();
    const table = opts.inodes ?? InodeTable.fromLayer(opts.index);
    await mkdir(opts.mountpoint, { recursive: true }).catch((err: unknown) => {
      throw new FuseError('mount-failed', opts.mountpoint, 'cannot create the mountpoint', { cause: err });
    });
    const st = await stat(opts.mountpoint).catch((err: unknown) => {
      throw new FuseError('mount-failed', opts.mountpoint, 'cannot stat the mountpoint (a stale mount? try `fusermount -uz`)', { cause: err });
    });
    if (!st.isDirectory()) throw new FuseError('mount-failed', opts.mountpoint, 'not a directory');
    const names = await readdir(opts.mountpoint);
    if (names.length > 0) throw new FuseError('mount-failed', opts.mountpoint, `not empty (${names.length} entries)`);
    // As mountinfo will name it (before the mount: resolving it after would ask the mount).
    const realMountpoint = await realpath(opts.mountpoint).catch(() => opts.mountpoint);
    const fs = new LayerFs(opts, table);
    const t0 = performance.now();
    try {
      await mountAsync(fs.fuse);
    } catch (err) {
      fs.spans.close();
      throw new FuseError('mount-failed', opts.mountpoint, `fuse mount failed: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
    }
    fs.mounted = true;
    if (opts.nativeReads !== false) fs.attachNative(opts.memory);
    const readAhead = opts.kernelReadAheadKiB ?? DEFAULT_KERNEL_READ_AHEAD_KIB;
    if (readAhead > 0) await setKernelReadAhead(realMountpoint, readAhead, fs.logger);
    fs.logger.info('layer mounted', { mountpoint: opts.mountpoint, inodes: table.count, spans: fs.spans.spanCount, ms: Math.round(performance.now() - t0) });
    if (table.warningCount > 0) fs.logger.warn('layer entries shown differently from the tar', { count: table.warningCount, first: table.warnings.slice(0, 5) });
    return fs;
  }

  /** What the kernel asked of this mount, the getattrs and reads answered natively included. */
  get counters(): LayerFsCounters {
    const n = this.native?.stats();
    if (n === undefined) return { ...this.own };
    return { ops: this.own.ops + n.reads + n.attrs, errors: this.own.errors, reads: this.own.reads + n.reads, bytesRead: this.own.bytesRead + n.bytes };
  }

  /**
   * fuse-native thread locals made for this mount: one per libfuse worker that reached
   * JavaScript, unless an ended worker's were reused (fs/native/fuse-fast.c). For diagnostics.
   */
  get threadLocals(): number {
    return this.fuse.threadLocals;
  }

  /** Reads and getattrs answered by the libfuse workers without JavaScript (zero without the native read path). */
  get nativeReads(): NativeReadStats {
    return this.native?.stats() ?? { reads: 0, bytes: 0, attrs: 0 };
  }

  private attachNative(memory: LayerFsOptions['memory']): void {
    const thread = this.fuse.thread;
    if (memory.watch === undefined || thread === null) return;
    try {
      this.native = NativeReadTable.attach(thread, this.spans.index);
    } catch (err) {
      this.logger.warn('native read path unavailable for this mount; reads go through JavaScript', { error: err });
      return;
    }
    const native = this.native;
    if (native === undefined) return;
    native.tree(this.treeEntries());
    this.unwatch = memory.watch(this.layerDigest, {
      cached: (id, data) => native.span(id, data),
      dropped: (id) => native.span(id, undefined),
      recentlyUsed: () => native.recentlyUsed(),
    });
  }

  /** Every path of the tree as FUSE names it, with the stat getattr answers (walked from the root, as readdir lists it). */
  private treeEntries(): NativeTreeEntry[] {
    const out: NativeTreeEntry[] = [];
    const add = (path: string, n: Node): void => {
      out.push({ path, stat: this.statOf(n), ...(n.kind === 'reg' ? { data: { offset: n.dataOffset, size: n.size } } : {}) });
    };
    const root = this.table.get(ROOT_INO);
    if (root === undefined) return out;
    add('/', root);
    const dirs: Array<[string, Node]> = [['', root]];
    for (let d = dirs.pop(); d !== undefined; d = dirs.pop()) {
      for (const e of this.table.readdir(d[1].ino) ?? []) {
        const path = `${d[0]}/${e.name}`;
        add(path, e.node);
        if (e.node.kind === 'dir') dirs.push([path, e.node]);
      }
    }
    return out;
  }

  private detachNative(): void {
    this.unwatch?.();
    this.unwatch = undefined;
    this.native?.detach();
  }

  /** Unmounts (idempotent). Reads still waiting for the registry get EIO. */
  unmount(): Promise<void> {
    this.closing ??= (async () => {
      // From here every read goes to JavaScript, which answers as a closing mount does.
      this.detachNative();
      this.spans.close();
      for (const p of this.pending) p.cb(EIO);
      this.pending.clear();
      if (!this.mounted) return;
      try {
        await unmountAsync(this.fuse);
      } catch (err) {
        throw new FuseError('unmount-failed', this.mountpoint, `unmount failed: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
      }
      this.mounted = false;
      this.logger.info('layer unmounted', { mountpoint: this.mountpoint });
    })();
    return this.closing;
  }

  private node(path: string): Node | undefined {
    return this.table.resolve(path);
  }

  /** Stats of every inode, made once (an immutable tree: getattr and readdir reuse them). */
  private statOf(n: Node): FuseStat {
    this.stats ??= new Array<FuseStat>(this.table.count + 1);
    return (this.stats[n.ino] ??= toFuseStat(n));
  }

  private done(op: string, t0: number, ok: boolean): void {
    this.own.ops++;
    if (!ok) this.own.errors++;
    this.onOp?.(op, performance.now() - t0, ok);
  }

  private ops(): FuseOps {
    // Each op answers from memory; any exception becomes EIO, never a crash of the process.
    const guard = <A extends unknown[]>(op: string, fail: (...a: A) => void, body: (...a: A) => void) => {
      return (...a: A): void => {
        try {
          body(...a);
        } catch (err) {
          this.logger.error('FUSE operation failed', { op, error: err });
          this.own.errors++;
          fail(...a);
        }
      };
    };
    const ops: FuseOps = {
      init: (cb) => cb(0),
      getattr: guard(
        'getattr',
        (_p, cb) => cb(EIO),
        (path, cb) => {
          const t0 = performance.now();
          const n = this.node(path);
          this.done('getattr', t0, n !== undefined);
          if (n === undefined) return cb(ENOENT);
          cb(0, this.statOf(n));
        },
      ),
      fgetattr: guard(
        'fgetattr',
        (_p, _fd, cb) => cb(EIO),
        (path, fd, cb) => {
          const n = this.table.get(fd) ?? this.node(path);
          if (n === undefined) return cb(ENOENT);
          cb(0, this.statOf(n));
        },
      ),
      access: guard(
        'access',
        (_p, _m, cb) => cb(EIO),
        (path, mode, cb) => {
          const n = this.node(path);
          if (n === undefined) return cb(ENOENT);
          cb(mode & W_OK ? EROFS : 0);
        },
      ),
      statfs: guard(
        'statfs',
        (_p, cb) => cb(EIO),
        (_path, cb) => cb(0, statfsOf(this.table)),
      ),
      readlink: guard(
        'readlink',
        (_p, cb) => cb(EIO),
        (path, cb) => {
          const n = this.node(path);
          if (n === undefined) return cb(ENOENT);
          if (n.kind !== 'symlink' || n.target === undefined) return cb(EINVAL);
          cb(0, n.target);
        },
      ),
      // No opendir (nor releasedir): libfuse opens directories itself, a round trip into JS less
      // per directory listed; the kernel sends opendir only for a directory it looked up.
      readdir: guard(
        'readdir',
        (_p, cb) => cb(EIO),
        (path, cb) => {
          const t0 = performance.now();
          const n = this.node(path);
          const entries = n === undefined ? undefined : this.table.readdir(n.ino);
          this.done('readdir', t0, entries !== undefined);
          if (n === undefined) return cb(ENOENT);
          if (entries === undefined) return cb(ENOTDIR);
          const names = new Array<string>(entries.length + 2);
          const stats = new Array<FuseStat>(entries.length + 2);
          names[0] = '.';
          stats[0] = this.statOf(n);
          names[1] = '..';
          stats[1] = this.statOf(this.table.get(n.parent) ?? n);
          for (let i = 0; i < entries.length; i++) {
            names[i + 2] = entries[i]!.name;
            stats[i + 2] = this.statOf(entries[i]!.node);
          }
          cb(0, names, stats);
        },
      ),
      // ENOSYS from open is the kernel's zero-message open (Linux ≥ 3.14): from then on it opens
      // and releases files of this mount without asking us or libfuse (two round trips per file
      // opened), keeping the page cache (FOPEN_KEEP_CACHE). The mount is read-only: the kernel
      // refuses writable opens itself, and it checks permissions (default_permissions). read
      // and fgetattr then get fd 0 and go by path. No release or releasedir either.
      open: (_path, _flags, cb) => {
        this.done('open', performance.now(), true);
        cb(ENOSYS);
      },
      read: guard(
        'read',
        (_p, _fd, _b, _l, _pos, cb) => cb(EIO),
        (path, fd, buf, len, pos, cb) => this.read(path, fd, buf, len, pos, cb),
      ),
      getxattr: guard(
        'getxattr',
        (_p, _n, _pos, cb) => cb(EIO),
        (path, name, _position, cb) => {
          const n = this.node(path);
          if (n === undefined) return cb(ENOENT);
          const v = n.xattrs.get(name);
          if (v === undefined) return cb(ENODATA);
          cb(0, v);
        },
      ),
      listxattr: guard(
        'listxattr',
        (_p, cb) => cb(EIO),
        (path, cb) => {
          const n = this.node(path);
          if (n === undefined) return cb(ENOENT);
          cb(0, [...n.xattrs.keys()]);
        },
      ),
    };
    // A layer without xattrs (most are) has no xattr ops: libfuse answers ENOSYS, and the kernel
    // then answers every getxattr of the mount itself (EOPNOTSUPP, which overlayfs and the
    // capability check take as "none"). overlayfs asks each file it looks up for
    // trusted.overlay.metacopy: a round trip into JS per file otherwise.
    if (!this.table.hasXattrs) {
      delete ops.getxattr;
      delete ops.listxattr;
    }
    return ops;
  }

  private read(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (bytesOrErr: number) => void): void {
    const t0 = performance.now();
    const n = this.table.get(fd) ?? this.node(path);
    if (n === undefined) return cb(EBADF);
    if (n.kind !== 'reg') return cb(EISDIR);
    this.own.reads++;
    const want = Math.min(len, n.size - pos);
    if (want <= 0) {
      this.done('read', t0, true);
      return cb(0);
    }
    const cached = this.spans.readCachedInto(n.dataOffset + pos, want, buf, n.dataOffset + n.size);
    if (cached >= 0) {
      this.own.bytesRead += cached;
      this.done('read', t0, true);
      return cb(cached);
    }
    const pending: PendingRead = { cb };
    this.pending.add(pending);
    this.spans.read(n.dataOffset + pos, want, n.dataOffset + n.size).then(
      (data) => {
        if (!this.pending.delete(pending)) return; // answered at unmount
        const copied = data.copy(buf, 0, 0, Math.min(data.length, len));
        this.own.bytesRead += copied;
        this.done('read', t0, true);
        cb(copied);
      },
      (err: unknown) => {
        if (!this.pending.delete(pending)) return;
        // The span manager logs the fetch failure once per streak; this is the reader's view.
        this.logger.debug('read failed', { path, offset: pos, length: want, error: err });
        this.done('read', t0, false);
        cb(EIO);
      },
    );
  }
}

/**
 * A FUSE filesystem of one regular file whose writes wait until released: a log file on a disk
 * (or network filesystem) that stopped answering. A process writing to it with write(2) blocks
 * in the kernel; one that writes asynchronously goes on. Served by this process (fuse-native),
 * so the test process must not touch it with sync calls.
 */
import Fuse, { type FuseOps, type FuseStat } from 'fuse-native';

export interface StallingFile {
  /** The file's path (inside the mountpoint). */
  readonly path: string;
  /** Writes waiting now. */
  held(): number;
  /** Writes received so far (held ones included). */
  writes(): number;
  /** What was written (released writes only), in order. */
  contents(): Buffer;
  /** Answers the held writes, and every later one at once. */
  release(): void;
  unmount(): Promise<void>;
}

type WriteOp = (path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (bytesOrErr: number) => void) => void;

export async function mountStallingFile(mountpoint: string, name = 'log'): Promise<StallingFile> {
  const chunks: Buffer[] = [];
  let size = 0;
  let holding = true;
  let writes = 0;
  const held: Array<() => void> = [];
  const now = new Date();
  const stat = (mode: number, bytes: number): FuseStat => ({ mode, uid: 0, gid: 0, size: bytes, dev: 0, nlink: 1, ino: 0, rdev: 0, blksize: 4096, blocks: Math.ceil(bytes / 512), atime: now, mtime: now, ctime: now });
  const file = `/${name}`;
  const write: WriteOp = (p, _fd, buf, len, _pos, cb) => {
    if (p !== file) return cb(Fuse.ENOENT);
    writes++;
    const copy = Buffer.from(buf.subarray(0, len)); // fuse-native's buffer is only valid during the call
    const answer = (): void => {
      chunks.push(copy);
      size += copy.length;
      cb(copy.length);
    };
    if (holding) held.push(answer);
    else answer();
  };
  const ops: FuseOps & { write: WriteOp; truncate: (p: string, n: number, cb: (err: number) => void) => void } = {
    getattr: (p, cb) => (p === '/' ? cb(0, stat(0o40755, 0)) : p === file ? cb(0, stat(0o100644, size)) : cb(Fuse.ENOENT)),
    open: (p, _flags, cb) => (p === file ? cb(0, 1) : cb(Fuse.ENOENT)),
    release: (_p, _fd, cb) => cb(0),
    write,
    truncate: (_p, _n, cb) => cb(0),
  };
  const fuse = new Fuse(mountpoint, ops, { force: true, mkdir: true, timeout: false, fsname: 'soci-ts-test-stall' });
  await new Promise<void>((resolve, reject) => fuse.mount((err) => (err ? reject(err) : resolve())));
  return {
    path: `${mountpoint}${file}`,
    held: () => held.length,
    writes: () => writes,
    contents: () => Buffer.concat(chunks),
    release: () => {
      holding = false;
      for (const answer of held.splice(0)) answer();
    },
    unmount: () => new Promise<void>((resolve, reject) => fuse.unmount((err) => (err ? reject(err) : resolve()))),
  };
}

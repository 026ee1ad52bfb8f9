// The part of fuse-native's (untyped, CommonJS) API that fs/layerfs.ts uses.
declare module 'fuse-native' {
  type Cb<T = void> = T extends void ? (err: number) => void : (err: number, value?: T) => void;

  export interface FuseStat {
    mode: number;
    uid: number;
    gid: number;
    size: number;
    dev: number;
    nlink: number;
    ino: number;
    rdev: number;
    blksize: number;
    blocks: number;
    atime: Date;
    mtime: Date;
    ctime: Date;
  }

  export interface FuseStatfs {
    bsize: number;
    frsize: number;
    blocks: number;
    bfree: number;
    bavail: number;
    files: number;
    ffree: number;
    favail: number;
    fsid: number;
    flag: number;
    namemax: number;
  }

  export interface FuseOps {
    init?(cb: Cb): void;
    access?(path: string, mode: number, cb: Cb): void;
    statfs?(path: string, cb: Cb<FuseStatfs>): void;
    getattr?(path: string, cb: Cb<FuseStat>): void;
    fgetattr?(path: string, fd: number, cb: Cb<FuseStat>): void;
    readlink?(path: string, cb: Cb<string>): void;
    open?(path: string, flags: number, cb: Cb<number>): void;
    opendir?(path: string, flags: number, cb: Cb<number>): void;
    read?(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (bytesOrErr: number) => void): void;
    release?(path: string, fd: number, cb: Cb): void;
    releasedir?(path: string, fd: number, cb: Cb): void;
    readdir?(path: string, cb: (err: number, names?: string[], stats?: FuseStat[]) => void): void;
    getxattr?(path: string, name: string, position: number, cb: (err: number, value?: Buffer | null) => void): void;
    listxattr?(path: string, cb: (err: number, list?: string[]) => void): void;
  }

  export interface FuseOptions {
    force?: boolean;
    mkdir?: boolean;
    timeout?: number | false;
    allowOther?: boolean;
    defaultPermissions?: boolean;
    kernelCache?: boolean;
    fsname?: string;
    subtype?: string;
    entryTimeout?: number;
    attrTimeout?: number;
    maxRead?: number;
    debug?: boolean;
  }

  type Signal = (...args: unknown[]) => void;

  class Fuse {
    constructor(mnt: string, ops: FuseOps, opts?: FuseOptions);
    readonly mnt: string;
    readonly ops: FuseOps;
    opts: FuseOptions;
    mount(cb: (err: Error | null) => void): void;
    unmount(cb: (err: Error | null) => void): void;
    /** fuse-native's fuse_thread_t of the mount (set by mount). */
    protected _thread: Buffer | null;
    /** fuse-native's thread locals, one buffer per libfuse worker it made them for. */
    protected _threads: Set<Buffer>;
    protected _fuseOptions(): string;
    protected _op_getxattr(signal: Signal, path: string, name: string, valueBuf: Buffer, position: number): void;
    protected _op_listxattr(signal: Signal, path: string, listBuf: Buffer): void;
    static unmount(mnt: string, cb: (err: Error | null) => void): void;
    static readonly EIO: number;
    static readonly ENOENT: number;
    static readonly EROFS: number;
    static readonly ENOTDIR: number;
    static readonly EISDIR: number;
    static readonly EINVAL: number;
    static readonly ENODATA: number;
    static readonly ERANGE: number;
    static readonly EBADF: number;
  }
  export default Fuse;
}

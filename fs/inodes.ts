/**
 * The inode table of one lazily mounted layer: the metadata half of the read-only layer
 * filesystem, built from the layer's zTOC alone. Pure: no I/O, no FUSE.
 *
 * The tree is what applying the layer's tar produces: GNU tar `-xp --same-owner --xattrs` as
 * root, and containerd's overlay applier (archive.Apply with OverlayConvertWhiteout), which
 * agree on nearly everything. Entries are applied in tar order:
 * - a later entry with the same name replaces the earlier one, except that a directory over a
 *   directory merges (the later header's mode, owner and mtime; xattrs are added);
 * - a hard link is another name for its target's inode (target attributes, `nlink` = number of
 *   names); a link to a missing target or to a directory is skipped with a warning (GNU tar
 *   reports the entry and goes on; containerd fails the whole layer);
 * - missing parent directories are created as upstream soci-snapshotter does: mode 0755,
 *   owner 0:0 (mtime: the epoch; upstream leaves Go's zero time);
 * - parents that are symlinks are followed inside the layer's root (containerd's RootPath:
 *   absolute targets start at the root, `..` stops at the root);
 * - where GNU tar refuses an entry that containerd applies, containerd wins: a non-directory
 *   over a non-empty directory replaces the whole directory (GNU tar: "Cannot open: File
 *   exists"), and entries below an absolute or `..` symlink go where it points (GNU tar
 *   extracts such symlinks last, so the entry fails with ENOTDIR). Where both refuse (a parent
 *   that is a file, a link to a directory), the entry is skipped with a warning.
 * - overlay mode (the default): `.wh.NAME` becomes the whiteout containerd creates, a 0/0
 *   character device named NAME with permission bits 0 and the entry's owner; when NAME is also
 *   in the layer, NAME wins (as upstream soci shows it; containerd fails the layer when NAME
 *   came first). `.wh..wh..opq` is hidden and sets `trusted.overlay.opaque` = `y` on its
 *   directory; other `.wh..wh.*` names (AUFS metadata) are hidden.
 *
 * Inode numbers are dense and deterministic: breadth-first over the final tree with children in
 * name order, root = 1; the same zTOC always gives the same numbers.
 */
import { paxValueBytes, parseModTime, type FileMetadata, type LayerIndex } from '../ztoc/index.js';

export type NodeKind = 'dir' | 'reg' | 'symlink' | 'char' | 'block' | 'fifo';

export const S_IFMT = 0o170000;
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;
export const S_IFCHR = 0o020000;
export const S_IFBLK = 0o060000;
export const S_IFIFO = 0o010000;

const TYPE_BITS: Record<NodeKind, number> = {
  dir: S_IFDIR,
  reg: S_IFREG,
  symlink: S_IFLNK,
  char: S_IFCHR,
  block: S_IFBLK,
  fifo: S_IFIFO,
};

export const ROOT_INO = 1;
/** Extended attribute overlayfs reads to make a directory opaque (what containerd sets). */
export const OPAQUE_XATTR = 'trusted.overlay.opaque';
const WHITEOUT_PREFIX = '.wh.';
const WHITEOUT_META_PREFIX = '.wh..wh.';
const WHITEOUT_OPAQUE = '.wh..wh..opq';
const XATTR_PREFIX = 'SCHILY.xattr.';
/** Symlinks followed while resolving one path (containerd's RootPath allows 255). */
const MAX_LINKS = 255;
/** Warnings kept in `warnings`; `warningCount` counts them all. */
const MAX_WARNINGS = 1000;

/** One inode: what getattr, readlink, getxattr and open need. */
export interface Node {
  readonly ino: number;
  readonly kind: NodeKind;
  /** Full st_mode: S_IF* type bits | permission, setuid, setgid and sticky bits. */
  readonly mode: number;
  readonly uid: number;
  readonly gid: number;
  /** Regular file: data bytes; symlink: bytes of the target; others 0. */
  readonly size: number;
  /** Devices: Linux makedev(major, minor); others 0. */
  readonly rdev: number;
  /** Names of a non-directory; 2 + subdirectories for a directory. */
  readonly nlink: number;
  /** Modification time (millisecond precision; `mtimeSec` + `mtimeNsec` are exact). */
  readonly mtime: Date;
  readonly mtimeSec: number;
  readonly mtimeNsec: number;
  /** Regular file: offset of its data in the uncompressed tar stream; -1 otherwise. */
  readonly dataOffset: number;
  /** Symlink target; undefined otherwise. */
  readonly target: string | undefined;
  /** Extended attributes (name → value bytes); shared and empty for most nodes. */
  readonly xattrs: ReadonlyMap<string, Buffer>;
  /** Inode of the directory holding this node's first name (in inode order); the root's is itself. */
  readonly parent: number;
  /** This node's first name in `parent` ('' for the root). */
  readonly name: string;
}

export interface DirEntry {
  readonly name: string;
  readonly node: Node;
}

export interface InodeTableOptions {
  /**
   * Show whiteouts as overlayfs does (0/0 character devices, the opaque xattr), as containerd's
   * overlay snapshotter would have unpacked the layer. Default true; false lists entries as tar has them.
   */
  overlay?: boolean;
}

/** A page of a directory listing. */
export interface DirPage {
  /** Entries at positions `offset`, `offset + 1`, …; the FUSE `off` of entries[i] (the cookie to resume after it) is offset + i + 1. */
  readonly entries: ReadonlyArray<DirEntry>;
  /** Offset to pass for the next page (= the directory's size when done). */
  readonly next: number;
  readonly done: boolean;
}

/** What statfs reports for a layer. */
export interface LayerStatfs {
  bsize: number;
  frsize: number;
  /** Σ ⌈size / 4096⌉ over the regular files (each inode once). */
  blocks: number;
  bfree: number;
  bavail: number;
  /** Inodes in the table. */
  files: number;
  ffree: number;
  favail: number;
  fsid: number;
  /** ST_RDONLY. */
  flag: number;
  namemax: number;
}

/** A stat record in the shape fuse-native's getattr callback takes. */
export interface NodeStat {
  mode: number;
  uid: number;
  gid: number;
  size: number;
  dev: number;
  nlink: number;
  ino: number;
  rdev: number;
  blksize: number;
  /** 512-byte blocks. */
  blocks: number;
  atime: Date;
  mtime: Date;
  ctime: Date;
}

const EMPTY_XATTRS: ReadonlyMap<string, Buffer> = new Map();
const NO_ENTRIES: ReadonlyArray<DirEntry> = Object.freeze([]);

class Inode implements Node {
  ino = 0;
  nlink = 0;
  parent = 0;
  name = '';
  /** Children while building (directories only). */
  building: Map<string, Inode> | undefined;
  /** Children sorted by name, once built (directories only). */
  entries: DirEntry[] | undefined = undefined;

  constructor(
    public kind: NodeKind,
    public mode: number,
    public uid: number,
    public gid: number,
    public size: number,
    public rdev: number,
    public mtimeSec: number,
    public mtimeNsec: number,
    public dataOffset: number,
    public target: string | undefined,
    public xattrs: ReadonlyMap<string, Buffer>,
  ) {
    this.building = kind === 'dir' ? new Map() : undefined;
  }

  get mtime(): Date {
    return new Date(this.mtimeSec * 1000 + Math.floor(this.mtimeNsec / 1e6));
  }
}

export class InodeTable {
  /** Why entries were skipped or shown differently (first 1000; `warningCount` counts all). */
  readonly warnings: readonly string[];
  readonly warningCount: number;
  /** Σ size over the regular files, each inode once. */
  readonly totalFileBytes: number;
  /** Σ ⌈size / 4096⌉ over the regular files. */
  readonly totalFileBlocks: number;
  /** Whether any inode has an xattr (opaque-directory markers included). */
  readonly hasXattrs: boolean;

  private constructor(
    /** Index = inode number; [0] is unused. */
    private readonly nodes: readonly Inode[],
    built: Built,
  ) {
    this.warnings = built.warnings;
    this.warningCount = built.warningCount;
    this.totalFileBytes = built.totalFileBytes;
    this.totalFileBlocks = built.totalFileBlocks;
    let xattrs = false;
    for (let ino = ROOT_INO; ino < nodes.length && !xattrs; ino++) xattrs = nodes[ino]!.xattrs.size > 0;
    this.hasXattrs = xattrs;
  }

  /** Builds the table of a layer from its (validated) zTOC. */
  static fromLayer(index: LayerIndex, opts: InodeTableOptions = {}): InodeTable {
    const b = new Builder(opts.overlay ?? true);
    const files = index.ztoc.files;
    for (let i = 0; i < files.length; i++) b.add(files[i]);
    const built = b.finish();
    return new InodeTable(built.nodes, built);
  }

  get root(): Node {
    return this.nodes[ROOT_INO];
  }

  /** Number of inodes (the root, whiteouts and implicit directories included). */
  get count(): number {
    return this.nodes.length - 1;
  }

  get(ino: number): Node | undefined {
    return ino >= ROOT_INO && ino < this.nodes.length ? this.nodes[ino] : undefined;
  }

  /** The child `name` of directory `parentIno`; undefined if absent or not a directory. */
  lookup(parentIno: number, name: string): Node | undefined {
    const entries = this.get(parentIno) === undefined ? undefined : this.nodes[parentIno].entries;
    if (entries === undefined) return undefined;
    const i = findEntry(entries, name);
    return i >= 0 ? entries[i].node : undefined;
  }

  /** A path under the root (`/usr/bin`, `usr/bin/`), without following symlinks. */
  resolve(path: string): Node | undefined {
    let node: Inode | undefined = this.nodes[ROOT_INO];
    for (const part of path.split('/')) {
      if (part === '' || part === '.') continue;
      const entries: DirEntry[] | undefined = node.entries;
      if (entries === undefined) return undefined;
      const i = findEntry(entries, part);
      if (i < 0) return undefined;
      node = entries[i].node as Inode;
    }
    return node;
  }

  /** The directory's entries in name order (UTF-16 code unit order), `.` and `..` not included; undefined if not a directory. */
  readdir(ino: number): ReadonlyArray<DirEntry> | undefined {
    return this.get(ino) === undefined ? undefined : this.nodes[ino].entries;
  }

  /**
   * At most `limit` entries from position `offset` (0 = the first entry): what a FUSE readdir
   * with offsets needs. The listing never changes, so offsets stay valid between calls.
   */
  readdirPage(ino: number, offset: number, limit: number): DirPage | undefined {
    const entries = this.readdir(ino);
    if (entries === undefined) return undefined;
    const start = Math.min(Math.max(0, Math.floor(offset)), entries.length);
    const end = Math.min(entries.length, start + Math.max(0, Math.floor(limit)));
    return {
      entries: start === 0 && end === entries.length ? entries : entries.slice(start, end),
      next: end,
      done: end === entries.length,
    };
  }

  /** `/`-rooted path of the node's first name, for logs. */
  pathOf(ino: number): string {
    const parts: string[] = [];
    let node = this.get(ino);
    if (node === undefined) return `<unknown inode ${ino}>`;
    while (node.ino !== ROOT_INO) {
      parts.push(node.name);
      node = this.nodes[node.parent];
    }
    return '/' + parts.reverse().join('/');
  }
}

/** What a FUSE statfs should report for this layer (read-only, nothing free). */
export function statfsOf(table: InodeTable): LayerStatfs {
  return {
    bsize: 4096,
    frsize: 4096,
    blocks: table.totalFileBlocks,
    bfree: 0,
    bavail: 0,
    files: table.count,
    ffree: 0,
    favail: 0,
    fsid: 0,
    flag: 1,
    namemax: 255,
  };
}

/** The stat of a node (atime and ctime = mtime, st_blocks in 512-byte units). */
export function statOf(node: Node): NodeStat {
  const mtime = node.mtime;
  return {
    mode: node.mode,
    uid: node.uid,
    gid: node.gid,
    size: node.size,
    dev: 0,
    nlink: node.nlink,
    ino: node.ino,
    rdev: node.rdev,
    blksize: 4096,
    blocks: node.kind === 'reg' ? Math.ceil(node.size / 512) : 0,
    atime: mtime,
    mtime,
    ctime: mtime,
  };
}

/** Whether a node is an overlayfs whiteout (a 0/0 character device). */
export function isWhiteout(node: Node): boolean {
  return node.kind === 'char' && node.rdev === 0;
}

/** Linux makedev (glibc's encoding): major in bits 8–19 and 32+, minor in bits 0–7 and 20+. */
export function makedev(major: number, minor: number): number {
  // Arithmetic, not bit operators: the result can exceed 32 bits.
  const majLo = major % 0x1000;
  const majHi = Math.floor(major / 0x1000);
  const minLo = minor % 0x100;
  const minHi = Math.floor(minor / 0x100);
  return minLo + majLo * 0x100 + minHi * 0x100000 + majHi * 0x100000000000;
}

// ---------------------------------------------------------------------------------------

interface Built {
  nodes: Inode[];
  warnings: string[];
  warningCount: number;
  totalFileBytes: number;
  totalFileBlocks: number;
}

class Builder {
  private readonly root: Inode;
  private readonly warnings: string[] = [];
  private warningCount = 0;
  /** Last resolved parent directory: tar lists a directory's entries together. */
  private cachedParentKey: string | undefined = undefined;
  private cachedParent: Inode | undefined = undefined;
  private lastModTime = '';
  private lastSec = 0;
  private lastNsec = 0;

  constructor(private readonly overlay: boolean) {
    this.root = new Inode('dir', S_IFDIR | 0o755, 0, 0, 0, 0, 0, 0, -1, undefined, EMPTY_XATTRS);
  }

  private warn(text: string): void {
    if (this.warningCount++ < MAX_WARNINGS) this.warnings.push(text);
  }

  add(f: FileMetadata): void {
    const name = normalize(f.name);
    if (name === undefined) {
      this.warn(`${JSON.stringify(f.name)}: '..' in the name: skipped`);
      return;
    }
    if (name === '') {
      if (f.type === 'dir') this.mergeDir(this.root, f);
      else this.warn(`${JSON.stringify(f.name)}: a ${f.type} entry names the root: skipped`);
      return;
    }
    const slash = name.lastIndexOf('/');
    const parentKey = slash < 0 ? '' : name.slice(0, slash);
    const base = slash < 0 ? name : name.slice(slash + 1);
    let parent: Inode;
    if (parentKey === this.cachedParentKey && this.cachedParent !== undefined) {
      parent = this.cachedParent;
    } else {
      const found = this.walk(parentKey === '' ? [] : parentKey.split('/'), true);
      if (typeof found === 'string') {
        this.warn(`${JSON.stringify(f.name)}: ${found}: skipped`);
        return;
      }
      parent = found;
      this.cachedParentKey = parentKey;
      this.cachedParent = parent;
    }
    const children = parent.building as Map<string, Inode>;
    const existing = children.get(base);

    if (f.type === 'hardlink') {
      const target = this.linkTarget(f.linkname);
      if (typeof target === 'string') {
        this.warn(`${JSON.stringify(f.name)}: hard link to ${JSON.stringify(f.linkname)}: ${target}: skipped`);
        return;
      }
      if (target.kind === 'dir') {
        this.warn(`${JSON.stringify(f.name)}: hard link to directory ${JSON.stringify(f.linkname)}: skipped`);
        return;
      }
      if (target === existing) return; // a link to itself: tar finds it already in place
      this.bind(children, base, existing, target);
      return;
    }
    if (f.type === 'dir' && existing !== undefined && existing.kind === 'dir') {
      this.mergeDir(existing, f);
      return;
    }
    this.bind(children, base, existing, this.newNode(f));
  }

  /** Puts `node` at `base`, replacing what was there (a replaced directory goes with its subtree). */
  private bind(children: Map<string, Inode>, base: string, existing: Inode | undefined, node: Inode): void {
    if (existing !== undefined && (existing.kind === 'dir' || existing.kind === 'symlink')) {
      // A cached walk may go through what is replaced.
      this.cachedParentKey = undefined;
      this.cachedParent = undefined;
    }
    children.set(base, node);
  }

  /**
   * Resolves directory components from the root, following symlinks inside the root
   * (absolute targets from the root, `..` never above it). With `create`, missing directories
   * are made (mode 0755, 0:0); without, a missing one is an error. Returns the directory, or why not.
   */
  private walk(components: readonly string[], create: boolean): Inode | string {
    const todo = components.slice().reverse();
    let stack: Inode[] = [this.root];
    let links = 0;
    const seen: string[] = [];
    while (todo.length > 0) {
      const c = todo.pop() as string;
      if (c === '' || c === '.') continue;
      if (c === '..') {
        if (stack.length > 1) stack.pop();
        continue;
      }
      const cur = stack[stack.length - 1];
      const children = cur.building as Map<string, Inode>;
      seen.push(c);
      let child = children.get(c);
      if (child === undefined) {
        if (!create) return `${seen.join('/')} does not exist`;
        child = new Inode('dir', S_IFDIR | 0o755, 0, 0, 0, 0, 0, 0, -1, undefined, EMPTY_XATTRS);
        children.set(c, child);
      }
      if (child.kind === 'dir') {
        stack.push(child);
      } else if (child.kind === 'symlink') {
        if (++links > MAX_LINKS) return `too many levels of symbolic links at ${seen.join('/')}`;
        const target = child.target as string;
        if (target.startsWith('/')) stack = [this.root];
        const parts = target.split('/');
        for (let i = parts.length - 1; i >= 0; i--) todo.push(parts[i]);
      } else {
        return `${seen.join('/')} is not a directory`;
      }
    }
    return stack[stack.length - 1];
  }

  /** A hard link's target: its directory resolved (symlinks followed), its last component not. */
  private linkTarget(linkname: string): Inode | string {
    const name = normalize(linkname);
    if (name === undefined) return "'..' in the target";
    if (name === '') return 'the target is the root';
    const parts = name.split('/');
    const base = parts.pop() as string;
    const dir = this.walk(parts, false);
    if (typeof dir === 'string') return `no such target (${dir})`;
    const target = (dir.building as Map<string, Inode>).get(base);
    return target ?? 'no such target (GNU tar: "Cannot hard link")';
  }

  private mergeDir(dir: Inode, f: FileMetadata): void {
    dir.mode = S_IFDIR | (f.mode & 0o7777);
    dir.uid = f.uid;
    dir.gid = f.gid;
    this.setMtime(dir, f);
    const added = this.xattrsOf(f, 'dir');
    if (added.size > 0) {
      if (dir.xattrs.size === 0) dir.xattrs = added;
      else dir.xattrs = new Map([...dir.xattrs, ...added]);
    }
  }

  private newNode(f: FileMetadata): Inode {
    let kind: NodeKind;
    let size = 0;
    let rdev = 0;
    let dataOffset = -1;
    let target: string | undefined;
    let perm = f.mode & 0o7777;
    switch (f.type) {
      case 'reg':
        kind = 'reg';
        size = f.uncompressedSize;
        dataOffset = f.uncompressedOffset;
        break;
      case 'symlink':
        kind = 'symlink';
        target = f.linkname;
        size = Buffer.byteLength(target);
        perm = 0o777; // Linux symlinks have no mode of their own
        break;
      case 'char':
      case 'block':
        kind = f.type;
        rdev = makedev(f.devmajor, f.devminor);
        break;
      case 'dir':
      case 'fifo':
        kind = f.type;
        break;
      default:
        throw new Error(`inode table: unexpected entry type ${String(f.type)} for ${JSON.stringify(f.name)}`);
    }
    const node = new Inode(kind, TYPE_BITS[kind] | perm, f.uid, f.gid, size, rdev, 0, 0, dataOffset, target, EMPTY_XATTRS);
    this.setMtime(node, f);
    node.xattrs = this.xattrsOf(f, kind);
    return node;
  }

  private xattrsOf(f: FileMetadata, kind: NodeKind): ReadonlyMap<string, Buffer> {
    let out: Map<string, Buffer> | undefined;
    for (const [key, value] of f.paxRecords) {
      if (!key.startsWith(XATTR_PREFIX)) continue;
      const name = key.slice(XATTR_PREFIX.length);
      if (name === '') continue;
      if (name.startsWith('user.') && kind !== 'reg' && kind !== 'dir') {
        // The kernel refuses user.* on symlinks, devices and fifos (EPERM); tar and containerd go on without it.
        this.warn(`${JSON.stringify(f.name)}: xattr ${name} on a ${kind}: dropped (Linux allows user.* only on files and directories)`);
        continue;
      }
      out ??= new Map();
      out.set(name, Buffer.from(paxValueBytes(value)));
    }
    return out ?? EMPTY_XATTRS;
  }

  private setMtime(node: Inode, f: FileMetadata): void {
    if (f.modTime !== this.lastModTime) {
      const t = parseTime(f.modTime);
      if (t === undefined) {
        this.warn(`${JSON.stringify(f.name)}: unreadable mod_time ${JSON.stringify(f.modTime)}: the epoch used`);
        node.mtimeSec = 0;
        node.mtimeNsec = 0;
        return;
      }
      this.lastModTime = f.modTime;
      this.lastSec = t.sec;
      this.lastNsec = t.nsec;
    }
    node.mtimeSec = this.lastSec;
    node.mtimeNsec = this.lastNsec;
  }

  /** Applies whiteouts to one directory's children (overlay mode). */
  private convertWhiteouts(dir: Inode, children: Map<string, Inode>, dirPath: () => string): void {
    let names: string[] | undefined;
    for (const name of children.keys()) {
      if (name.startsWith(WHITEOUT_PREFIX)) (names ??= []).push(name);
    }
    if (names === undefined) return;
    for (const name of names) {
      const wh = children.get(name) as Inode;
      children.delete(name);
      if (name === WHITEOUT_OPAQUE) {
        const xattrs = new Map(dir.xattrs);
        xattrs.set(OPAQUE_XATTR, Buffer.from('y'));
        dir.xattrs = xattrs;
        continue;
      }
      if (name.startsWith(WHITEOUT_META_PREFIX)) {
        this.warn(`${dirPath()}${name}: AUFS metadata, hidden`);
        continue;
      }
      const original = name.slice(WHITEOUT_PREFIX.length);
      if (original === '') {
        this.warn(`${dirPath()}${name}: whiteout without a name: hidden`);
        continue;
      }
      if (children.has(original)) {
        this.warn(`${dirPath()}${name}: ${original} is in the same layer and is kept (containerd refuses the layer when ${original} comes first)`);
        continue;
      }
      children.set(original, new Inode('char', S_IFCHR, wh.uid, wh.gid, 0, 0, wh.mtimeSec, wh.mtimeNsec, -1, undefined, EMPTY_XATTRS));
    }
  }

  finish(): Built {
    const nodes: Inode[] = [this.root, this.root]; // [0] is a placeholder: get() never returns it
    const root = this.root;
    root.ino = ROOT_INO;
    root.parent = ROOT_INO;
    let totalFileBytes = 0;
    let totalFileBlocks = 0;
    // Breadth first; `nodes` doubles as the queue (directories are visited in inode order).
    for (let q = ROOT_INO; q < nodes.length; q++) {
      const dir = nodes[q];
      const children = dir.building;
      if (children === undefined) continue;
      dir.building = undefined;
      if (this.overlay) this.convertWhiteouts(dir, children, () => pathOfBuilt(nodes, dir));
      const names = [...children.keys()].sort();
      const entries: DirEntry[] = new Array<DirEntry>(names.length);
      let subdirs = 0;
      for (let i = 0; i < names.length; i++) {
        const name = names[i];
        const node = children.get(name) as Inode;
        entries[i] = { name, node };
        if (node.ino === 0) {
          node.ino = nodes.length;
          node.parent = dir.ino;
          node.name = name;
          nodes.push(node);
          if (node.kind === 'reg') {
            totalFileBytes += node.size;
            totalFileBlocks += Math.ceil(node.size / 4096);
          }
        }
        if (node.kind === 'dir') subdirs++;
        else node.nlink++;
      }
      dir.entries = entries;
      dir.nlink = 2 + subdirs;
    }
    return { nodes, warnings: this.warnings, warningCount: this.warningCount, totalFileBytes, totalFileBlocks };
  }
}

function pathOfBuilt(nodes: readonly Inode[], dir: Inode): string {
  const parts: string[] = [];
  let n = dir;
  while (n.ino !== ROOT_INO) {
    parts.push(n.name);
    n = nodes[n.parent];
  }
  return '/' + parts.reverse().map((p) => p + '/').join('');
}

/** Binary search in entries sorted by name (code unit order); the index or -1. */
function findEntry(entries: readonly DirEntry[], name: string): number {
  let lo = 0;
  let hi = entries.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const n = entries[mid].name;
    if (n === name) return mid;
    if (n < name) lo = mid + 1;
    else hi = mid - 1;
  }
  return -1;
}

/**
 * `./usr/bin/`, `/usr//bin` → `usr/bin`; the root → ''; undefined for a `..` component
 * (LayerIndex refuses those; this is the second line of defence).
 */
function normalize(name: string): string | undefined {
  let s = 0;
  let e = name.length;
  // Fast path: strip leading `/` and `./`, trailing `/`; fall back when anything odd remains.
  for (;;) {
    if (name.charCodeAt(s) === 0x2f) s++;
    else if (name.charCodeAt(s) === 0x2e && name.charCodeAt(s + 1) === 0x2f) s += 2;
    else break;
  }
  while (e > s && name.charCodeAt(e - 1) === 0x2f) e--;
  const core = s === 0 && e === name.length ? name : name.slice(s, e);
  if (core === '.' || core === '..' || core.includes('//') || core.includes('/.') || core.startsWith('..')) {
    const parts: string[] = [];
    for (const p of core.split('/')) {
      if (p === '' || p === '.') continue;
      if (p === '..') return undefined;
      parts.push(p);
    }
    return parts.join('/');
  }
  return core;
}

/** The zTOC's RFC 3339 mod_time as seconds and nanoseconds (ztoc's parser); undefined when malformed. */
function parseTime(text: string): { sec: number; nsec: number } | undefined {
  try {
    const t = parseModTime(text);
    return { sec: Number(t.seconds), nsec: t.nanos };
  } catch {
    return undefined;
  }
}

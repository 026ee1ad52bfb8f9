/**
 * The FUSE manager's protocol: newline-delimited JSON over a unix socket (mode 0600).
 *
 * Each request is one line `{"id": N, "method": "...", "params": {...}}`; each answer is one line
 * with the same id, `{"id": N, "result": {...}}` or `{"id": N, "error": {"kind", "subject",
 * "message"}}`. Requests on one connection may be answered out of order (they run concurrently;
 * operations on one mountpoint are serialized by the manager). A line longer than
 * {@link MAX_LINE_BYTES} or one that is not a JSON object closes the connection after an
 * `invalid` error.
 *
 * Versions. `hello` is the handshake and stays the same in every protocol version: a
 * snapshotter of any build can ask any manager which build it is (`version`, `build`) and which
 * protocols it speaks (`oldestProtocol` … `protocol`; a manager without `oldestProtocol` speaks
 * `protocol` only). The snapshotter drives a manager when their protocol ranges overlap
 * ({@link protocolsOverlap}); a manager of another build is reattached (and reported), replaced
 * when it serves no mount, and refused when the protocols do not overlap (see
 * daemon/fuse-manager-client.ts). A change to any other method's params or results that an
 * older peer would misread is a new protocol number.
 *
 * Methods (params → result):
 * - `hello` {} → {@link HelloResult}: protocol versions, build, pid, instance id (new each start).
 * - `mount` {@link MountParams} → {@link ManagedMount}: mount a layer lazily at a mountpoint;
 *   the same layer at the same mountpoint again answers the existing mount.
 * - `unmount` {@link UnmountParams} → {@link UnmountResult}.
 * - `list` {} → {mounts: ManagedMount[]}.
 * - `status` {mountpoint} → {@link LayerStatus}.
 * - `release` {ztoc} → {released}: delete from the disk cache the spans of a layer that is not
 *   mounted (its snapshot was removed while no manager served it), except spans a mount holds;
 *   the zTOC is read from the artifact store (nothing is released when it is not there).
 * - `metrics` {} → {text}: Prometheus text of the manager's metrics sink (`unsupported` without one).
 */

/** The protocol this build speaks (the newest it knows). */
export const FUSE_MANAGER_PROTOCOL = 1;
/** The oldest protocol this build still speaks. */
export const OLDEST_FUSE_MANAGER_PROTOCOL = 1;

/** Whether two peers share a protocol (ranges `oldestProtocol` … `protocol`, inclusive). */
export function protocolsOverlap(a: { protocol: number; oldestProtocol?: number }, b: { protocol: number; oldestProtocol?: number }): boolean {
  const lo = Math.max(a.oldestProtocol ?? a.protocol, b.oldestProtocol ?? b.protocol);
  const hi = Math.min(a.protocol, b.protocol);
  return lo <= hi;
}
/** Longest request or answer line. */
export const MAX_LINE_BYTES = 8 << 20;

export type FuseManagerErrorKind =
  /** The request is malformed (unknown method, missing or wrong-typed params). */
  | 'invalid'
  /** Nothing is mounted at the mountpoint named. */
  | 'not-found'
  /** The mountpoint holds another layer's mount. */
  | 'busy'
  /** The zTOC cannot be fetched, does not verify, is malformed or does not fit the layer. */
  | 'bad-ztoc'
  /** The registry refused or failed (auth, not found, network). */
  | 'registry'
  /** FUSE is unavailable, or a FUSE mount or unmount failed. */
  | 'fuse'
  /** The snapshotter root's file system has no space left (the zTOC or a span could not be stored). */
  | 'no-space'
  /** The manager has no such feature (e.g. no metrics sink). */
  | 'unsupported'
  /** The manager is not running or not reachable, or it is shutting down. */
  | 'unavailable'
  /** Anything else (a bug). */
  | 'internal';

const KINDS: ReadonlySet<string> = new Set<FuseManagerErrorKind>(['invalid', 'not-found', 'busy', 'bad-ztoc', 'registry', 'fuse', 'no-space', 'unsupported', 'unavailable', 'internal']);

/** An error of the FUSE manager, as it crosses the wire: kind, subject (a path, digest), message. */
export class FuseManagerError extends Error {
  readonly kind: FuseManagerErrorKind;
  readonly subject: string;
  constructor(kind: FuseManagerErrorKind, subject: string, reason: string, options?: { cause?: unknown }) {
    super(subject === '' ? reason : `${subject}: ${reason}`, options);
    this.name = 'FuseManagerError';
    this.kind = kind;
    this.subject = subject;
  }

  toWire(): WireError {
    return { kind: this.kind, subject: this.subject, message: this.message };
  }

  static fromWire(w: unknown): FuseManagerError {
    const o = (typeof w === 'object' && w !== null ? w : {}) as Partial<WireError>;
    const kind = typeof o.kind === 'string' && KINDS.has(o.kind) ? (o.kind as FuseManagerErrorKind) : 'internal';
    const subject = typeof o.subject === 'string' ? o.subject : '';
    const message = typeof o.message === 'string' ? o.message : 'the FUSE manager answered an error without a message';
    const e = new FuseManagerError(kind, subject, '');
    e.message = message;
    return e;
  }
}

export interface WireError {
  kind: FuseManagerErrorKind;
  subject: string;
  message: string;
}

export interface WireDescriptor {
  mediaType: string;
  digest: string;
  size: number;
  urls?: string[];
}

export interface HelloResult {
  /** The newest protocol the manager speaks. */
  protocol: number;
  /** The oldest protocol it speaks (absent from managers before it was added: `protocol` only). */
  oldestProtocol?: number;
  /** soci-ts release of the manager. */
  version: string;
  /** Digest of the manager's compiled modules (absent from managers before it was added). */
  build?: string;
  pid: number;
  /** Random, new at every start of a manager: a changed instance means its mounts are gone. */
  instance: string;
  /** ISO 8601. */
  startedAt: string;
  root: string;
  mounts: number;
  /** Bytes of inflated spans in the manager's memory cache (absent from managers before it was added). */
  memoryCacheBytes?: number;
}

export interface MountParams {
  /** Absolute path; created if missing, must be empty (or hold a dead mount, which is detached). */
  mountpoint: string;
  /** Where to fetch from: the image reference (its repository is used). */
  imageRef: string;
  layer: WireDescriptor;
  /** The layer's zTOC: taken from the artifact store when there, else fetched from the repository. */
  ztoc: WireDescriptor;
  /** Metadata to keep with the mount and report in `list` (e.g. the snapshot key). */
  tag?: string;
}

export interface PreloadParams {
  imageRef: string;
  layer: WireDescriptor;
  ztoc: WireDescriptor;
}

export interface ManagedMount {
  mountpoint: string;
  layerDigest: string;
  layerSize: number;
  imageRef: string;
  ztocDigest: string;
  tag: string;
  spans: number;
  localSpans: number;
  complete: boolean;
  /** ISO 8601. */
  mountedAt: string;
  /** Milliseconds the mount took (zTOC load and FUSE mount). */
  mountMs: number;
  /** What the layer occupies as a file system: 4 KiB blocks of its files, and its inodes. */
  usage: { size: number; inodes: number };
  /** True when this call found the mount already there. */
  existing?: boolean;
}

export interface UnmountParams {
  mountpoint: string;
  /** Release the layer's spans from the disk cache (deleted when no other mount holds them). */
  release?: boolean;
}

export interface UnmountResult {
  unmounted: boolean;
  /** Span files deleted from the disk cache. */
  released: number;
}

export interface LayerStatus {
  mountpoint: string;
  layerDigest: string;
  spansTotal: number;
  spansLocal: number;
  complete: boolean;
  /** Compressed bytes fetched from the registry by this mount (reads and background). */
  bytesFetched: number;
  fetches: number;
  reads: number;
  fuseOps: number;
  fuseErrors: number;
  /** The background fetcher's view of the layer, when it runs. */
  background?: { spansFetched: number; bytesFetched: number; failures: number; complete: boolean };
}

export interface MetricsResult {
  text: string;
}

export interface Methods {
  hello: { params: Record<string, never>; result: HelloResult };
  mount: { params: MountParams; result: ManagedMount };
  unmount: { params: UnmountParams; result: UnmountResult };
  list: { params: Record<string, never>; result: { mounts: ManagedMount[] } };
  status: { params: { mountpoint: string }; result: LayerStatus };
  release: { params: { ztoc: WireDescriptor }; result: { released: number } };
  metrics: { params: Record<string, never>; result: MetricsResult };
  /**
   * Reads and parses a zTOC (and builds its inode table) ahead of its mount, which then only
   * mounts. Managers before it was added answer "unknown method"; that only costs the time.
   */
  preload: { params: PreloadParams; result: { preloaded: boolean } };
}

export type MethodName = keyof Methods;

export const METHOD_NAMES: readonly MethodName[] = ['hello', 'mount', 'unmount', 'list', 'status', 'release', 'metrics', 'preload'];

/**
 * Splits a byte stream into lines, refusing one longer than `max` bytes (then calls `onTooLong`
 * once and stops).
 */
export class LineSplitter {
  private parts: Buffer[] = [];
  private size = 0;
  private dead = false;
  constructor(
    private readonly onLine: (line: string) => void,
    private readonly onTooLong: () => void,
    private readonly max = MAX_LINE_BYTES,
  ) {}

  push(chunk: Buffer): void {
    if (this.dead) return;
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, start);
      if (nl < 0) break;
      const piece = chunk.subarray(start, nl);
      if (this.size + piece.length > this.max) return this.overflow();
      const line = this.parts.length === 0 ? piece.toString('utf8') : Buffer.concat([...this.parts, piece]).toString('utf8');
      this.parts = [];
      this.size = 0;
      start = nl + 1;
      if (line.trim() !== '') this.onLine(line);
      if (this.dead) return;
    }
    const rest = chunk.subarray(start);
    if (rest.length === 0) return;
    if (this.size + rest.length > this.max) return this.overflow();
    this.parts.push(Buffer.from(rest));
    this.size += rest.length;
  }

  private overflow(): void {
    this.dead = true;
    this.parts = [];
    this.onTooLong();
  }
}

/** Checks a wire descriptor's shape; returns a reason when it is malformed. */
export function descriptorProblem(d: unknown, what: string): string | undefined {
  if (typeof d !== 'object' || d === null) return `${what} must be an object`;
  const o = d as Record<string, unknown>;
  if (typeof o.digest !== 'string' || !/^sha256:[0-9a-f]{64}$/.test(o.digest)) return `${what}.digest must be a sha256 digest`;
  if (typeof o.size !== 'number' || !Number.isSafeInteger(o.size) || o.size < 0) return `${what}.size must be a non-negative integer`;
  if (typeof o.mediaType !== 'string' || o.mediaType === '') return `${what}.mediaType must be a string`;
  if (o.urls !== undefined && (!Array.isArray(o.urls) || !o.urls.every((u) => typeof u === 'string'))) return `${what}.urls must be strings`;
  return undefined;
}

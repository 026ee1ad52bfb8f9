/**
 * containerd's Snapshots gRPC API from the project's own .proto files (daemon/proto/), and the
 * TypeScript shapes of its messages as @grpc/proto-loader presents them. The same files also
 * define the containerd services `rpull` calls (content, images, leases, diff, introspection;
 * their clients are in containerd-client.ts).
 *
 * The files are parsed with protobufjs and handed to proto-loader's `fromJSON`, so the service
 * is defined by exactly these files: protobufjs' `load` would replace any import under
 * `google/protobuf/` with its own bundled copies, and our Timestamp, FieldMask and Empty would
 * go unused.
 *
 * proto-loader options (they decide the JavaScript shapes below):
 * - `keepCase: true`: field names as in the .proto (`created_at`, `update_mask`);
 * - `longs: Number`: int64 (usage sizes and inodes, timestamp seconds) as numbers; exact up to
 *   2^53, far beyond any real size;
 * - `enums: String`: `Kind` as `'ACTIVE'`, `'COMMITTED'`, `'VIEW'`, `'UNKNOWN'`;
 * - `defaults: true`: absent scalar fields read as `''`/`0`, repeated as `[]`, maps as `{}`,
 *   absent messages as `null`;
 * - `oneofs: true` (none are used here).
 */
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';
import { access, readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';

export const SNAPSHOTS_SERVICE = 'containerd.services.snapshots.v1.Snapshots';

export const PROTO_LOADER_OPTIONS: protoLoader.Options = Object.freeze({
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});

/** The .proto files, dependencies first, relative to the proto directory. */
export const PROTO_FILES: readonly string[] = Object.freeze([
  'google/protobuf/empty.proto',
  'google/protobuf/timestamp.proto',
  'google/protobuf/field_mask.proto',
  'google/protobuf/any.proto',
  'google/rpc/status.proto',
  'containerd/types/mount.proto',
  'containerd/types/descriptor.proto',
  'containerd/types/platform.proto',
  'containerd/services/content/v1/content.proto',
  'containerd/services/images/v1/images.proto',
  'containerd/services/leases/v1/leases.proto',
  'containerd/services/diff/v1/diff.proto',
  'containerd/services/introspection/v1/introspection.proto',
  'containerd/services/snapshots/v1/snapshots.proto',
]);

// ---------------------------------------------------------------------------------------
// Message shapes (with the options above)

export interface ProtoTimestamp {
  seconds: number;
  nanos: number;
}

export interface ProtoMount {
  type: string;
  source: string;
  target: string;
  options: string[];
}

export type ProtoKind = 'UNKNOWN' | 'VIEW' | 'ACTIVE' | 'COMMITTED';

export interface ProtoInfo {
  name: string;
  parent: string;
  kind: ProtoKind;
  created_at: ProtoTimestamp | null;
  updated_at: ProtoTimestamp | null;
  labels: Record<string, string>;
}

export interface PrepareSnapshotRequest {
  snapshotter: string;
  key: string;
  parent: string;
  labels: Record<string, string>;
}
export type ViewSnapshotRequest = PrepareSnapshotRequest;
export interface MountsResponse {
  mounts: ProtoMount[];
}
export interface KeyRequest {
  snapshotter: string;
  key: string;
}
export interface CommitSnapshotRequest {
  snapshotter: string;
  name: string;
  key: string;
  labels: Record<string, string>;
}
export interface InfoResponse {
  info: ProtoInfo | null;
}
export interface UpdateSnapshotRequest {
  snapshotter: string;
  info: ProtoInfo | null;
  update_mask: { paths: string[] } | null;
}
export interface ListSnapshotsRequest {
  snapshotter: string;
  filters: string[];
}
export interface ListSnapshotsResponse {
  info: ProtoInfo[];
}
export interface UsageResponse {
  size: number;
  inodes: number;
}
export interface CleanupRequest {
  snapshotter: string;
}
export type Empty = Record<string, never>;

// ---------------------------------------------------------------------------------------
// Loading

export class ProtoLoadError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ProtoLoadError';
  }
}

/** The proto directory: daemon/proto of the checkout (next to the sources or, from dist/, two levels up). */
export async function protoDir(): Promise<string> {
  const candidates = [fileURLToPath(new URL('./proto/', import.meta.url)), fileURLToPath(new URL('../../daemon/proto/', import.meta.url))];
  for (const dir of candidates) {
    try {
      await access(join(dir, PROTO_FILES[PROTO_FILES.length - 1]));
      return dir;
    } catch {
      // next
    }
  }
  throw new ProtoLoadError(`the .proto files are missing: looked for ${PROTO_FILES[PROTO_FILES.length - 1]} under ${candidates.join(' and ')}`);
}

let cached: Promise<protoLoader.PackageDefinition> | undefined;

/** Parses our .proto files (once per process) into a proto-loader package definition. */
export function loadPackageDefinition(): Promise<protoLoader.PackageDefinition> {
  cached ??= (async () => {
    const dir = await protoDir();
    const root = new protobuf.Root();
    const loaded = new Set<string>();
    for (const file of PROTO_FILES) {
      const text = await readFile(join(dir, file), 'utf8');
      let parsed: protobuf.IParserResult;
      try {
        parsed = protobuf.parse(text, root, { keepCase: true });
      } catch (e) {
        throw new ProtoLoadError(`${join(dir, file)}: ${(e as Error).message}`, { cause: e });
      }
      for (const imp of parsed.imports ?? []) {
        if (!loaded.has(imp)) throw new ProtoLoadError(`${file} imports ${imp}, which is not loaded before it`);
      }
      loaded.add(file);
    }
    try {
      root.resolveAll();
    } catch (e) {
      throw new ProtoLoadError(`resolving the .proto files in ${dir}: ${(e as Error).message}`, { cause: e });
    }
    return protoLoader.fromJSON(root.toJSON(), PROTO_LOADER_OPTIONS);
  })();
  cached.catch(() => {
    cached = undefined;
  });
  return cached;
}

/** The Snapshots service definition (for Server.addService and clients). */
export async function snapshotsServiceDefinition(): Promise<grpc.ServiceDefinition> {
  const def = await loadPackageDefinition();
  const svc = def[SNAPSHOTS_SERVICE];
  if (svc === undefined || !('Prepare' in svc)) throw new ProtoLoadError(`${SNAPSHOTS_SERVICE} is not in the .proto files`);
  return svc as unknown as grpc.ServiceDefinition;
}

/** A gRPC address for a unix socket path (`unix:` + absolute path), or the address as given. */
export function grpcAddress(socketOrAddress: string): string {
  return socketOrAddress.startsWith('unix:') ? socketOrAddress : `unix:${socketOrAddress}`;
}

// ---------------------------------------------------------------------------------------
// Client

type Unary<Req, Res> = (req: Req, metadata: grpc.Metadata, cb: (err: grpc.ServiceError | null, res?: Res) => void) => grpc.ClientUnaryCall;

/** The raw client methods (callback style), as grpc-js generates them. */
export interface SnapshotsRawClient extends grpc.Client {
  Prepare: Unary<PrepareSnapshotRequest, MountsResponse>;
  View: Unary<ViewSnapshotRequest, MountsResponse>;
  Mounts: Unary<KeyRequest, MountsResponse>;
  Commit: Unary<CommitSnapshotRequest, Empty>;
  Remove: Unary<KeyRequest, Empty>;
  Stat: Unary<KeyRequest, InfoResponse>;
  Update: Unary<UpdateSnapshotRequest, InfoResponse>;
  List: (req: ListSnapshotsRequest, metadata: grpc.Metadata) => grpc.ClientReadableStream<ListSnapshotsResponse>;
  Usage: Unary<KeyRequest, UsageResponse>;
  Cleanup: Unary<CleanupRequest, Empty>;
}

/**
 * A promise-based client of a Snapshots service: a soci-ts daemon's socket, or containerd's
 * own socket (pass `namespace` there: containerd requires the `containerd-namespace` header).
 */
export class SnapshotsClient {
  private constructor(
    readonly raw: SnapshotsRawClient,
    private readonly snapshotter: string,
    private readonly namespace: string | undefined,
    private readonly lease: string | undefined = undefined,
  ) {}

  /**
   * `lease` (containerd only): requests carry the `containerd-lease` header, so that what they
   * create belongs to that lease. `channel`: share an existing channel instead of opening one.
   */
  static async connect(address: string, opts: { snapshotter?: string; namespace?: string; lease?: string; channel?: grpc.Channel } = {}): Promise<SnapshotsClient> {
    const def = await loadPackageDefinition();
    const Ctor = grpc.loadPackageDefinition(def).containerd as grpc.GrpcObject;
    const services = (Ctor.services as grpc.GrpcObject).snapshots as grpc.GrpcObject;
    const Snapshots = (services.v1 as grpc.GrpcObject).Snapshots as grpc.ServiceClientConstructor;
    const clientOptions = opts.channel === undefined ? {} : { channelOverride: opts.channel };
    const raw = new Snapshots(grpcAddress(address), grpc.credentials.createInsecure(), clientOptions) as unknown as SnapshotsRawClient;
    return new SnapshotsClient(raw, opts.snapshotter ?? '', opts.namespace, opts.lease);
  }

  private md(): grpc.Metadata {
    const m = new grpc.Metadata();
    if (this.namespace !== undefined) m.set('containerd-namespace', this.namespace);
    if (this.lease !== undefined) m.set('containerd-lease', this.lease);
    return m;
  }

  private unary<Req, Res>(fn: Unary<Req, Res>, req: Req): Promise<Res> {
    return new Promise((resolve, reject) => {
      fn.call(this.raw, req, this.md(), (err, res) => {
        if (err !== null) reject(err);
        else resolve(res as Res);
      });
    });
  }

  prepare(key: string, parent = '', labels: Record<string, string> = {}): Promise<ProtoMount[]> {
    return this.unary(this.raw.Prepare, { snapshotter: this.snapshotter, key, parent, labels }).then((r) => r.mounts);
  }
  view(key: string, parent = '', labels: Record<string, string> = {}): Promise<ProtoMount[]> {
    return this.unary(this.raw.View, { snapshotter: this.snapshotter, key, parent, labels }).then((r) => r.mounts);
  }
  mounts(key: string): Promise<ProtoMount[]> {
    return this.unary(this.raw.Mounts, { snapshotter: this.snapshotter, key }).then((r) => r.mounts);
  }
  async commit(name: string, key: string, labels: Record<string, string> = {}): Promise<void> {
    await this.unary(this.raw.Commit, { snapshotter: this.snapshotter, name, key, labels });
  }
  async remove(key: string): Promise<void> {
    await this.unary(this.raw.Remove, { snapshotter: this.snapshotter, key });
  }
  async stat(key: string): Promise<ProtoInfo> {
    const r = await this.unary(this.raw.Stat, { snapshotter: this.snapshotter, key });
    if (r.info === null) throw new Error(`Stat ${key}: the answer has no info`);
    return r.info;
  }
  async update(name: string, labels: Record<string, string>, paths: string[] = []): Promise<ProtoInfo> {
    const info: ProtoInfo = { name, parent: '', kind: 'UNKNOWN', created_at: null, updated_at: null, labels };
    const r = await this.unary(this.raw.Update, { snapshotter: this.snapshotter, info, update_mask: paths.length > 0 ? { paths } : null });
    if (r.info === null) throw new Error(`Update ${name}: the answer has no info`);
    return r.info;
  }
  /** All matching snapshots, and the number of stream messages they came in. */
  list(filters: string[] = []): Promise<{ infos: ProtoInfo[]; messages: number }> {
    return new Promise((resolve, reject) => {
      const infos: ProtoInfo[] = [];
      let messages = 0;
      const stream = this.raw.List({ snapshotter: this.snapshotter, filters }, this.md());
      stream.on('data', (m: ListSnapshotsResponse) => {
        messages++;
        infos.push(...m.info);
      });
      stream.on('error', reject);
      stream.on('end', () => resolve({ infos, messages }));
    });
  }
  usage(key: string): Promise<UsageResponse> {
    return this.unary(this.raw.Usage, { snapshotter: this.snapshotter, key });
  }
  async cleanup(): Promise<void> {
    await this.unary(this.raw.Cleanup, { snapshotter: this.snapshotter });
  }
  close(): void {
    this.raw.close();
  }
}

/**
 * A promise client of the containerd services `rpull` calls over containerd's own gRPC socket:
 * content (Info, Update, List, Status, streaming Write, Abort), images (Get, Create, Update),
 * leases (Create, Delete), diff (Apply), introspection (Plugins) and, through
 * {@link SnapshotsClient}, snapshots. The services come from the project's own .proto files
 * (grpc-api.ts loads them); every request carries the `containerd-namespace` header and, with
 * {@link ContainerdClient.withLease}, the `containerd-lease` header, as containerd's Go client
 * sends them.
 *
 * Every failed call becomes a {@link ContainerdApiError} naming the method, the thing it was
 * about and containerd's message, with the gRPC code kept for callers that branch on it
 * (ALREADY_EXISTS, NOT_FOUND).
 */
import * as grpc from '@grpc/grpc-js';
import { grpcAddress, loadPackageDefinition, SnapshotsClient, SNAPSHOTS_SERVICE, type ProtoMount, type ProtoTimestamp } from './grpc-api.js';

export const CONTENT_SERVICE = 'containerd.services.content.v1.Content';
export const IMAGES_SERVICE = 'containerd.services.images.v1.Images';
export const LEASES_SERVICE = 'containerd.services.leases.v1.Leases';
export const DIFF_SERVICE = 'containerd.services.diff.v1.Diff';
export const INTROSPECTION_SERVICE = 'containerd.services.introspection.v1.Introspection';

/** containerd's lease header (leases.GRPCHeader). */
export const LEASE_HEADER = 'containerd-lease';
/** containerd's namespace header. */
export const NAMESPACE_HEADER = 'containerd-namespace';

/** Bytes per Write message (containerd's server accepts messages up to 16 MiB). */
export const WRITE_CHUNK_BYTES = 1 << 20;
/** Write messages sent before waiting for the oldest answer. */
const WRITE_WINDOW = 4;

// ---------------------------------------------------------------------------------------
// Message shapes (proto-loader options of grpc-api.ts: keepCase, longs as numbers, enums as
// strings, defaults filled in)

export interface ProtoDescriptor {
  media_type: string;
  digest: string;
  size: number;
  annotations: Record<string, string>;
}

export interface ContentInfo {
  digest: string;
  size: number;
  created_at: ProtoTimestamp | null;
  updated_at: ProtoTimestamp | null;
  labels: Record<string, string>;
}

export interface ContentStatus {
  started_at: ProtoTimestamp | null;
  updated_at: ProtoTimestamp | null;
  ref: string;
  offset: number;
  total: number;
  expected: string;
}

export type WriteAction = 'STAT' | 'WRITE' | 'COMMIT';

interface WriteContentRequest {
  action: WriteAction;
  ref?: string;
  total?: number;
  expected?: string;
  offset?: number;
  data?: Uint8Array;
  labels?: Record<string, string>;
}

interface WriteContentResponse {
  action: WriteAction;
  started_at: ProtoTimestamp | null;
  updated_at: ProtoTimestamp | null;
  offset: number;
  total: number;
  digest: string;
}

export interface ImageRecord {
  name: string;
  labels: Record<string, string>;
  target: ProtoDescriptor | null;
  created_at: ProtoTimestamp | null;
  updated_at: ProtoTimestamp | null;
}

export interface LeaseRecord {
  id: string;
  created_at: ProtoTimestamp | null;
  labels: Record<string, string>;
}

export interface PluginRecord {
  type: string;
  id: string;
  requires: string[];
  platforms: { os: string; architecture: string; variant: string }[];
  exports: Record<string, string>;
  capabilities: string[];
  init_err: { code: number; message: string } | null;
}

// ---------------------------------------------------------------------------------------
// Errors

/** A containerd API call failed. `code` is the gRPC status code containerd answered. */
export class ContainerdApiError extends Error {
  readonly code: grpc.status;
  /** `Service.Method`, e.g. `Content.Write`. */
  readonly method: string;
  /** What the call was about (a digest, ref, image name or key), or ''. */
  readonly subject: string;
  /** containerd's own message. */
  readonly details: string;

  constructor(method: string, subject: string, code: grpc.status, details: string, options?: { cause?: unknown }) {
    super(`containerd ${method}${subject === '' ? '' : ` ${subject}`}: ${details === '' ? grpc.status[code] : details} (${grpc.status[code] ?? code})`, options);
    this.name = 'ContainerdApiError';
    this.method = method;
    this.subject = subject;
    this.code = code;
    this.details = details;
  }

  static from(method: string, subject: string, err: unknown): ContainerdApiError {
    if (err instanceof ContainerdApiError) return err;
    const e = err as Partial<grpc.ServiceError> | undefined;
    if (e !== undefined && typeof e.code === 'number') return new ContainerdApiError(method, subject, e.code, e.details ?? '', { cause: err });
    return new ContainerdApiError(method, subject, grpc.status.UNKNOWN, err instanceof Error ? err.message : String(err), { cause: err });
  }
}

/** True for a gRPC error (ours or grpc-js's) with this code. */
export function hasCode(err: unknown, code: grpc.status): boolean {
  return typeof (err as { code?: unknown } | undefined)?.code === 'number' && (err as { code: number }).code === code;
}

// ---------------------------------------------------------------------------------------
// Client

type UnaryFn = (req: object, md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res?: unknown) => void) => grpc.ClientUnaryCall;

interface Clients {
  content: grpc.Client;
  images: grpc.Client;
  leases: grpc.Client;
  diff: grpc.Client;
  introspection: grpc.Client;
}

export interface ConnectOptions {
  /** containerd namespace (ctr's `--namespace`). */
  namespace: string;
}

export interface CallOpts {
  /** Give up after this many milliseconds (DEADLINE_EXCEEDED). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface WriteBlobOptions {
  /** Labels set at commit. */
  labels?: Record<string, string>;
  /** Bytes written so far (and the total), after each answered chunk. */
  onProgress?: (written: number, total: number) => void;
  signal?: AbortSignal;
}

/** How a blob got into the content store. */
export type WriteOutcome =
  /** The data was streamed and committed. */
  | 'written'
  /** containerd had it already (ALREADY_EXISTS on the first message). */
  | 'exists'
  /** containerd had the bytes (another namespace, or a completed earlier write) and committed them without data. */
  | 'committed-without-data';

/**
 * Generates the message codecs of every method rpull uses (protobufjs builds them at a type's
 * first use), so that a long-running process's first pull does not pay for it. No I/O.
 */
export async function warmContainerdCodecs(): Promise<void> {
  const def = await loadPackageDefinition();
  for (const service of [CONTENT_SERVICE, IMAGES_SERVICE, LEASES_SERVICE, DIFF_SERVICE, INTROSPECTION_SERVICE, SNAPSHOTS_SERVICE]) {
    const svc = def[service] as unknown as grpc.ServiceDefinition | undefined;
    if (svc === undefined) continue;
    for (const m of Object.values(svc)) {
      try {
        m.requestSerialize({});
        m.responseDeserialize(Buffer.alloc(0));
      } catch {
        // A message with required fields: its codec exists now all the same.
      }
    }
  }
}

export class ContainerdClient {
  private constructor(
    readonly address: string,
    readonly namespace: string,
    readonly lease: string | undefined,
    private readonly channel: grpc.Channel,
    private readonly clients: Clients,
    private readonly owner: boolean,
  ) {}

  /** A client of containerd's socket (nothing is sent until the first call). */
  static async connect(address: string, opts: ConnectOptions): Promise<ContainerdClient> {
    const def = await loadPackageDefinition();
    const channel = new grpc.Channel(grpcAddress(address), grpc.credentials.createInsecure(), {});
    const make = (service: string): grpc.Client => {
      const svc = def[service];
      if (svc === undefined) throw new Error(`${service} is not in the .proto files`);
      const Ctor = grpc.makeClientConstructor(svc as unknown as grpc.ServiceDefinition, service);
      return new Ctor(grpcAddress(address), grpc.credentials.createInsecure(), { channelOverride: channel });
    };
    const clients: Clients = {
      content: make(CONTENT_SERVICE),
      images: make(IMAGES_SERVICE),
      leases: make(LEASES_SERVICE),
      diff: make(DIFF_SERVICE),
      introspection: make(INTROSPECTION_SERVICE),
    };
    return new ContainerdClient(address, opts.namespace, undefined, channel, clients, true);
  }

  /** The same connection, with every request in lease `id` (undefined: none). */
  withLease(id: string | undefined): ContainerdClient {
    return new ContainerdClient(this.address, this.namespace, id, this.channel, this.clients, false);
  }

  /** A Snapshots client of snapshotter `name` through containerd, on this connection (and lease). */
  snapshots(name: string): Promise<SnapshotsClient> {
    return SnapshotsClient.connect(this.address, { snapshotter: name, namespace: this.namespace, lease: this.lease, channel: this.channel });
  }

  /** Closes the connection (only the client made by connect() owns it). */
  close(): void {
    if (this.owner) this.channel.close();
  }

  private md(): grpc.Metadata {
    const m = new grpc.Metadata();
    m.set(NAMESPACE_HEADER, this.namespace);
    if (this.lease !== undefined) m.set(LEASE_HEADER, this.lease);
    return m;
  }

  private callOptions(opts: CallOpts | undefined): grpc.CallOptions {
    return opts?.timeoutMs === undefined ? {} : { deadline: Date.now() + opts.timeoutMs };
  }

  private unary<Res>(client: grpc.Client, service: string, method: string, subject: string, req: object, opts?: CallOpts): Promise<Res> {
    const fn = (client as unknown as Record<string, UnaryFn>)[method];
    const label = `${service.split('.').pop() ?? service}.${method}`;
    if (typeof fn !== 'function') return Promise.reject(new Error(`${label} is not in the .proto files`));
    return new Promise<Res>((resolve, reject) => {
      const call = fn.call(client, req, this.md(), this.callOptions(opts), (err, res) => {
        opts?.signal?.removeEventListener('abort', onAbort);
        if (err !== null) reject(ContainerdApiError.from(label, subject, err));
        else resolve(res as Res);
      });
      const onAbort = (): void => call.cancel();
      if (opts?.signal?.aborted === true) call.cancel();
      else opts?.signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  // ----------------------------------------------------------------- content

  /** The content store's record of `digest`, or undefined when it has none (in this namespace). */
  async contentInfo(digest: string, opts?: CallOpts): Promise<ContentInfo | undefined> {
    try {
      const r = await this.unary<{ info: ContentInfo | null }>(this.clients.content, CONTENT_SERVICE, 'Info', digest, { digest }, opts);
      return r.info ?? undefined;
    } catch (err) {
      if (hasCode(err, grpc.status.NOT_FOUND)) return undefined;
      throw err;
    }
  }

  /** Sets the labels named by `paths` (`labels.<key>`) to their values in `labels` (absent: removed). */
  async contentUpdate(digest: string, labels: Record<string, string>, paths: readonly string[], opts?: CallOpts): Promise<ContentInfo> {
    const r = await this.unary<{ info: ContentInfo | null }>(
      this.clients.content,
      CONTENT_SERVICE,
      'Update',
      digest,
      { info: { digest, size: 0, labels }, update_mask: { paths: [...paths] } },
      opts,
    );
    if (r.info === null) throw new ContainerdApiError('Content.Update', digest, grpc.status.UNKNOWN, 'the answer has no info');
    return r.info;
  }

  /** Every content record matching any of the filters (all without filters). */
  contentList(filters: readonly string[] = [], opts?: CallOpts): Promise<ContentInfo[]> {
    return new Promise((resolve, reject) => {
      const fn = (this.clients.content as unknown as Record<string, (req: object, md: grpc.Metadata, o: grpc.CallOptions) => grpc.ClientReadableStream<{ info: ContentInfo[] }>>).List;
      const stream = fn!.call(this.clients.content, { filters: [...filters] }, this.md(), this.callOptions(opts));
      const out: ContentInfo[] = [];
      stream.on('data', (m: { info: ContentInfo[] }) => out.push(...m.info));
      stream.on('error', (e: unknown) => reject(ContainerdApiError.from('Content.List', '', e)));
      stream.on('end', () => resolve(out));
    });
  }

  /** The ongoing write of `ref`, or undefined. */
  async contentStatus(ref: string, opts?: CallOpts): Promise<ContentStatus | undefined> {
    try {
      const r = await this.unary<{ status: ContentStatus | null }>(this.clients.content, CONTENT_SERVICE, 'Status', ref, { ref }, opts);
      return r.status ?? undefined;
    } catch (err) {
      if (hasCode(err, grpc.status.NOT_FOUND)) return undefined;
      throw err;
    }
  }

  /** Drops the ongoing write of `ref` (NOT_FOUND is not an error). */
  async contentAbort(ref: string, opts?: CallOpts): Promise<void> {
    try {
      await this.unary(this.clients.content, CONTENT_SERVICE, 'Abort', ref, { ref }, opts);
    } catch (err) {
      if (!hasCode(err, grpc.status.NOT_FOUND)) throw err;
    }
  }

  /**
   * Writes the blob `expected` (digest and size) under the ingest `ref` as containerd's
   * remote writer does: STAT with the expected digest and total (ALREADY_EXISTS: the store
   * has it; an offset equal to the size: the store has the bytes and the write is committed
   * without data), then the data from `source` in WRITE messages at increasing offsets
   * (from 0, which restarts a partial earlier write), then COMMIT with the expected size,
   * digest and labels, which containerd verifies. `source` is only called when data is
   * needed. When the source or a message fails, the write is cancelled and the ingest
   * aborted, so nothing half-written stays.
   */
  async writeBlob(ref: string, expected: { digest: string; size: number }, source: () => AsyncIterable<Uint8Array>, opts: WriteBlobOptions = {}): Promise<WriteOutcome> {
    const subject = `${ref} (${expected.digest})`;
    const call = (this.clients.content as unknown as Record<string, (md: grpc.Metadata) => grpc.ClientDuplexStream<WriteContentRequest, WriteContentResponse>>).Write!.call(
      this.clients.content,
      this.md(),
    );
    const answers = new AnswerQueue(call);
    const onAbort = (): void => call.cancel();
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    // After a STAT that was answered, containerd holds an ingest for `ref`: a failure aborts it.
    let ingestOpen = false;
    try {
      if (opts.signal?.aborted === true) throw opts.signal.reason ?? new Error('aborted');
      await send(call, { action: 'STAT', ref, total: expected.size, expected: expected.digest });
      let stat: WriteContentResponse;
      try {
        stat = await answers.next();
      } catch (err) {
        if (hasCode(err, grpc.status.ALREADY_EXISTS)) return 'exists';
        throw err;
      }
      ingestOpen = true;
      let outcome: WriteOutcome = 'committed-without-data';
      let offset = 0;
      if (stat.offset !== expected.size) {
        outcome = 'written';
        let outstanding = 0;
        const expectOffsets: number[] = [];
        const settle = async (): Promise<void> => {
          const r = await answers.next();
          const want = expectOffsets.shift();
          outstanding--;
          if (r.offset !== want) throw new ContainerdApiError('Content.Write', subject, grpc.status.DATA_LOSS, `containerd is at offset ${r.offset} after a write that should end at ${String(want)}`);
          opts.onProgress?.(r.offset, expected.size);
        };
        let pending: Buffer[] = [];
        let pendingBytes = 0;
        const flush = async (): Promise<void> => {
          if (pendingBytes === 0) return;
          const data = pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingBytes);
          pending = [];
          pendingBytes = 0;
          await send(call, { action: 'WRITE', offset, data });
          offset += data.length;
          expectOffsets.push(offset);
          outstanding++;
          if (outstanding >= WRITE_WINDOW) await settle();
        };
        for await (const chunk of source()) {
          let c = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
          while (c.length > 0) {
            const take = Math.min(c.length, WRITE_CHUNK_BYTES - pendingBytes);
            pending.push(c.subarray(0, take));
            pendingBytes += take;
            c = c.subarray(take);
            if (pendingBytes >= WRITE_CHUNK_BYTES) await flush();
          }
        }
        await flush();
        while (outstanding > 0) await settle();
        if (offset !== expected.size) {
          throw new ContainerdApiError('Content.Write', subject, grpc.status.DATA_LOSS, `the source gave ${offset} bytes, the descriptor says ${expected.size}`);
        }
      } else {
        offset = expected.size;
      }
      await send(call, { action: 'COMMIT', total: expected.size, expected: expected.digest, offset, labels: opts.labels ?? {} });
      let committed: WriteContentResponse;
      try {
        committed = await answers.next();
      } catch (err) {
        // Another writer committed the same digest meanwhile.
        if (hasCode(err, grpc.status.ALREADY_EXISTS)) return 'exists';
        throw err;
      }
      if (committed.digest !== '' && committed.digest !== expected.digest) {
        throw new ContainerdApiError('Content.Write', subject, grpc.status.DATA_LOSS, `containerd committed digest ${committed.digest}`);
      }
      call.end();
      await answers.closed();
      return outcome;
    } catch (err) {
      call.cancel();
      if (ingestOpen) await this.abortWhenUnlocked(ref);
      if (err instanceof ContainerdApiError || !hasGrpcShape(err)) throw err;
      throw ContainerdApiError.from('Content.Write', subject, err);
    } finally {
      opts.signal?.removeEventListener('abort', onAbort);
    }
  }

  /**
   * Aborts the ingest `ref` of a cancelled write. containerd releases the ref's lock when it
   * notices the cancellation, which may be a moment later: Abort is retried briefly.
   */
  private async abortWhenUnlocked(ref: string): Promise<void> {
    for (let attempt = 0; attempt < 20; attempt++) {
      try {
        await this.contentAbort(ref, { timeoutMs: 10_000 });
        if ((await this.contentStatus(ref, { timeoutMs: 10_000 })) === undefined) return;
      } catch {
        // retried below
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  // ----------------------------------------------------------------- images

  async imageGet(name: string, opts?: CallOpts): Promise<ImageRecord | undefined> {
    try {
      const r = await this.unary<{ image: ImageRecord | null }>(this.clients.images, IMAGES_SERVICE, 'Get', name, { name }, opts);
      return r.image ?? undefined;
    } catch (err) {
      if (hasCode(err, grpc.status.NOT_FOUND)) return undefined;
      throw err;
    }
  }

  async imageCreate(image: { name: string; labels: Record<string, string>; target: ProtoDescriptor }, opts?: CallOpts): Promise<ImageRecord> {
    const r = await this.unary<{ image: ImageRecord | null }>(this.clients.images, IMAGES_SERVICE, 'Create', image.name, { image }, opts);
    if (r.image === null) throw new ContainerdApiError('Images.Create', image.name, grpc.status.UNKNOWN, 'the answer has no image');
    return r.image;
  }

  /** Without `paths`, labels and target are replaced (containerd's client does this after a pull). */
  async imageUpdate(image: { name: string; labels: Record<string, string>; target: ProtoDescriptor }, paths: readonly string[] = [], opts?: CallOpts): Promise<ImageRecord> {
    const r = await this.unary<{ image: ImageRecord | null }>(
      this.clients.images,
      IMAGES_SERVICE,
      'Update',
      image.name,
      { image, update_mask: paths.length === 0 ? null : { paths: [...paths] } },
      opts,
    );
    if (r.image === null) throw new ContainerdApiError('Images.Update', image.name, grpc.status.UNKNOWN, 'the answer has no image');
    return r.image;
  }

  // ----------------------------------------------------------------- leases

  async leaseCreate(id: string, labels: Record<string, string>, opts?: CallOpts): Promise<LeaseRecord> {
    const r = await this.unary<{ lease: LeaseRecord | null }>(this.clients.leases, LEASES_SERVICE, 'Create', id, { id, labels }, opts);
    if (r.lease === null) throw new ContainerdApiError('Leases.Create', id, grpc.status.UNKNOWN, 'the answer has no lease');
    return r.lease;
  }

  async leaseDelete(id: string, sync = false, opts?: CallOpts): Promise<void> {
    await this.unary(this.clients.leases, LEASES_SERVICE, 'Delete', id, { id, sync }, opts);
  }

  async leaseList(filters: readonly string[] = [], opts?: CallOpts): Promise<LeaseRecord[]> {
    const r = await this.unary<{ leases: LeaseRecord[] }>(this.clients.leases, LEASES_SERVICE, 'List', '', { filters: [...filters] }, opts);
    return r.leases;
  }

  // ----------------------------------------------------------------- diff

  /** Applies the layer blob `desc` (from the content store) onto `mounts`; the uncompressed result. */
  async diffApply(desc: ProtoDescriptor, mounts: readonly ProtoMount[], opts?: CallOpts): Promise<ProtoDescriptor> {
    const r = await this.unary<{ applied: ProtoDescriptor | null }>(this.clients.diff, DIFF_SERVICE, 'Apply', desc.digest, { diff: desc, mounts: [...mounts], payloads: {} }, opts);
    if (r.applied === null) throw new ContainerdApiError('Diff.Apply', desc.digest, grpc.status.UNKNOWN, 'the answer has no applied descriptor');
    return r.applied;
  }

  // ----------------------------------------------------------------- introspection

  async plugins(filters: readonly string[] = [], opts?: CallOpts): Promise<PluginRecord[]> {
    const r = await this.unary<{ plugins: PluginRecord[] }>(this.clients.introspection, INTROSPECTION_SERVICE, 'Plugins', '', { filters: [...filters] }, opts);
    return r.plugins;
  }
}

function hasGrpcShape(err: unknown): boolean {
  return typeof (err as { code?: unknown } | undefined)?.code === 'number' && typeof (err as { details?: unknown }).details === 'string';
}

/** Writes one message, waiting for the stream to drain when its buffer is full. */
function send(call: grpc.ClientDuplexStream<WriteContentRequest, WriteContentResponse>, msg: WriteContentRequest): Promise<void> {
  return new Promise((resolve, reject) => {
    try {
      if (call.write(msg)) resolve();
      else call.once('drain', () => resolve());
    } catch (err) {
      reject(err);
    }
  });
}

/** The answers of a duplex stream, in order, as promises; the stream's error fails the waiting ones. */
class AnswerQueue {
  private readonly ready: WriteContentResponse[] = [];
  private readonly waiting: { resolve: (r: WriteContentResponse) => void; reject: (e: unknown) => void }[] = [];
  private error: unknown;
  private ended = false;
  private readonly endWaiters: (() => void)[] = [];

  constructor(stream: grpc.ClientDuplexStream<WriteContentRequest, WriteContentResponse>) {
    stream.on('data', (r: WriteContentResponse) => {
      const w = this.waiting.shift();
      if (w !== undefined) w.resolve(r);
      else this.ready.push(r);
    });
    stream.on('error', (e: unknown) => {
      this.error = e;
      for (const w of this.waiting.splice(0)) w.reject(e);
      this.finish();
    });
    stream.on('end', () => {
      if (this.error === undefined) this.error = new Error('the stream ended without an answer');
      for (const w of this.waiting.splice(0)) w.reject(this.error);
      this.finish();
    });
    stream.on('status', () => this.finish());
  }

  private finish(): void {
    this.ended = true;
    for (const w of this.endWaiters.splice(0)) w();
  }

  next(): Promise<WriteContentResponse> {
    const r = this.ready.shift();
    if (r !== undefined) return Promise.resolve(r);
    if (this.error !== undefined) return Promise.reject(this.error);
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject }));
  }

  /** Resolves when the stream has ended or failed. */
  closed(): Promise<void> {
    if (this.ended) return Promise.resolve();
    return new Promise((resolve) => this.endWaiters.push(resolve));
  }
}

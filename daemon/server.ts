/**
 * The snapshotter daemon's gRPC server: containerd's `containerd.services.snapshots.v1.Snapshots`
 * on a unix socket, backed by {@link Snapshotter}. containerd reaches it through a proxy plugin:
 *
 *   [proxy_plugins.soci-ts]
 *     type = "snapshot"
 *     address = "/run/soci-ts/soci-ts.sock"
 *
 * Errors go out with containerd's errdefs → gRPC mapping (NotFound, AlreadyExists,
 * FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable, Unimplemented; anything else Unknown) and
 * containerd-style messages.
 */
import * as grpc from '@grpc/grpc-js';
import { chmod, lstat, mkdir, unlink } from 'node:fs/promises';
import { connect, type Server as NetServer } from 'node:net';
import { dirname } from 'node:path';
import type { Logger } from '../fetcher/index.js';
import { grpcCodeOf, invalidArgument, SnapshotterError } from './errdefs.js';
import {
  grpcAddress,
  snapshotsServiceDefinition,
  type CleanupRequest,
  type CommitSnapshotRequest,
  type Empty,
  type InfoResponse,
  type KeyRequest,
  type ListSnapshotsRequest,
  type ListSnapshotsResponse,
  type MountsResponse,
  type PrepareSnapshotRequest,
  type ProtoInfo,
  type ProtoKind,
  type UpdateSnapshotRequest,
  type UsageResponse,
} from './grpc-api.js';
import type { SnapshotInfo, SnapshotKind } from './metadata.js';
import { Snapshotter, type CallContext, type SnapshotterOptions } from './snapshotter.js';

export { DEFAULT_ADDRESS, DEFAULT_ROOT } from './defaults.js';

/** Infos per List stream message (containerd's snapshots service sends batches of 100 too). */
export const LIST_BATCH = 100;

/** containerd's default maximum gRPC message size (16 MiB). */
const MAX_MESSAGE_BYTES = 16 << 20;

const KIND_TO_PROTO: Record<SnapshotKind, ProtoKind> = { active: 'ACTIVE', committed: 'COMMITTED', view: 'VIEW' };

export function toProtoInfo(i: SnapshotInfo): ProtoInfo {
  return {
    name: i.name,
    parent: i.parent,
    kind: KIND_TO_PROTO[i.kind],
    created_at: i.created,
    updated_at: i.updated,
    labels: i.labels,
  };
}

export class ServerStartError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ServerStartError';
  }
}

export interface ServerOptions {
  root: string;
  /** Socket path (or `unix:PATH`). */
  address: string;
  logger: Logger;
  /** Remote snapshots (see daemon/remote.ts); without, every snapshot takes the overlay path. */
  remote?: SnapshotterOptions['remote'];
}

/** Is something accepting connections on this unix socket? */
export function socketAnswers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    const done = (v: boolean): void => {
      s.destroy();
      resolve(v);
    };
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
    s.setTimeout(2000, () => done(false));
  });
}

/**
 * Listens on unix socket `path` and makes it owner-only (0600: connecting needs write
 * permission, which the usual umask leaves to the owner already).
 */
export async function listenOwnerOnly(server: NetServer, path: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => {
      server.off('error', reject);
      resolve();
    });
  });
  await chmod(path, 0o600);
}

/** Removes a stale socket file; refuses a live socket or a file that is not a socket. */
export async function prepareSocketPath(path: string): Promise<void> {
  await mkdir(dirname(path), { recursive: true, mode: 0o711 });
  let st;
  try {
    st = await lstat(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  if (!st.isSocket()) throw new ServerStartError(`${path} exists and is not a socket: refusing to replace it`);
  if (await socketAnswers(path)) throw new ServerStartError(`${path}: another process is already serving on this socket`);
  await unlink(path);
}

export class SnapshotterServer {
  private stopping: Promise<void> | undefined;

  private constructor(
    readonly server: grpc.Server,
    readonly snapshotter: Snapshotter,
    readonly socketPath: string,
    private readonly log: Logger,
  ) {}

  /** Opens the snapshotter under `root` and serves it on `address`. */
  static async start(opts: ServerOptions): Promise<SnapshotterServer> {
    const socketPath = opts.address.startsWith('unix:') ? opts.address.slice('unix:'.length).replace(/^\/\/(?=\/)/, '') : opts.address;
    if (!socketPath.startsWith('/')) throw new ServerStartError(`address ${opts.address}: must be an absolute unix socket path`);
    const service = await snapshotsServiceDefinition();
    await prepareSocketPath(socketPath);
    const snapshotter = await Snapshotter.open({ root: opts.root, logger: opts.logger, remote: opts.remote });
    const server = new grpc.Server({
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    });
    const self = new SnapshotterServer(server, snapshotter, socketPath, opts.logger);
    server.addService(service, self.handlers());
    try {
      await new Promise<void>((resolve, reject) => {
        server.bindAsync(grpcAddress(socketPath), grpc.ServerCredentials.createInsecure(), (err) => (err ? reject(err) : resolve()));
      });
      // root only: the socket hands out mounts of the host's file systems.
      await chmod(socketPath, 0o600);
    } catch (e) {
      server.forceShutdown();
      await snapshotter.close();
      throw new ServerStartError(`cannot serve on ${socketPath}: ${(e as Error).message}`, { cause: e });
    }
    opts.logger.info('snapshotter serving', { address: socketPath, root: opts.root });
    return self;
  }

  /** Stops taking calls, lets the ones in flight finish (up to `graceMs`), closes the metadata. */
  stop(graceMs = 10_000): Promise<void> {
    this.stopping ??= (async () => {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          this.log.warn('calls still running at shutdown: cancelling them', { graceMs });
          this.server.forceShutdown();
          resolve();
        }, graceMs);
        this.server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      await this.snapshotter.close();
      await unlink(this.socketPath).catch(() => undefined);
      this.log.info('snapshotter stopped', { address: this.socketPath });
    })();
    return this.stopping;
  }

  private fail(method: string, fields: Record<string, unknown>, err: unknown): grpc.ServiceError {
    const code = grpcCodeOf(err);
    const message = err instanceof Error ? err.message : String(err);
    const unexpected = !(err instanceof SnapshotterError) || err.kind === 'Internal';
    if (unexpected) this.log.error(`${method} failed`, { ...fields, error: err });
    else this.log.debug(`${method} refused`, { ...fields, code: grpc.status[code], error: message });
    const e = new Error(message) as grpc.ServiceError;
    e.code = code;
    e.details = message;
    e.metadata = new grpc.Metadata();
    return e;
  }

  private unary<Req, Res>(
    method: string,
    fields: (req: Req) => Record<string, unknown>,
    fn: (req: Req, ctx: CallContext) => Promise<Res>,
  ): grpc.handleUnaryCall<Req, Res> {
    return (call, callback) => {
      const req = call.request;
      const ns = call.metadata.get('containerd-namespace')[0];
      fn(req, { namespace: typeof ns === 'string' ? ns : undefined }).then(
        (res) => callback(null, res),
        (err: unknown) => callback(this.fail(method, fields(req), err)),
      );
    };
  }

  private handlers(): grpc.UntypedServiceImplementation {
    const s = this.snapshotter;
    const key = (r: { key: string }): Record<string, unknown> => ({ key: r.key });
    const mounts = (m: Awaited<ReturnType<Snapshotter['prepare']>>): MountsResponse => ({ mounts: m });
    return {
      Prepare: this.unary<PrepareSnapshotRequest, MountsResponse>('Prepare', (r) => ({ key: r.key, parent: r.parent }), async (r, ctx) => mounts(await s.prepare(r.key, r.parent, r.labels, ctx))),
      View: this.unary<PrepareSnapshotRequest, MountsResponse>('View', (r) => ({ key: r.key, parent: r.parent }), async (r) => mounts(await s.view(r.key, r.parent, r.labels))),
      Mounts: this.unary<KeyRequest, MountsResponse>('Mounts', key, async (r) => mounts(await s.mounts(r.key))),
      Commit: this.unary<CommitSnapshotRequest, Empty>('Commit', (r) => ({ key: r.key, name: r.name }), async (r) => {
        await s.commit(r.name, r.key, r.labels);
        return {};
      }),
      Remove: this.unary<KeyRequest, Empty>('Remove', key, async (r) => {
        await s.remove(r.key);
        return {};
      }),
      Stat: this.unary<KeyRequest, InfoResponse>('Stat', key, async (r) => ({ info: toProtoInfo(await s.stat(r.key)) })),
      Update: this.unary<UpdateSnapshotRequest, InfoResponse>('Update', (r) => ({ key: r.info?.name }), async (r) => {
        if (r.info === null) throw invalidArgument('update without info');
        const info = await s.update(r.info.name, r.info.labels, r.update_mask?.paths ?? []);
        return { info: toProtoInfo(info) };
      }),
      List: (call: grpc.ServerWritableStream<ListSnapshotsRequest, ListSnapshotsResponse>) => {
        void this.list(call);
      },
      Usage: this.unary<KeyRequest, UsageResponse>('Usage', key, async (r) => s.usage(r.key)),
      Cleanup: this.unary<CleanupRequest, Empty>('Cleanup', () => ({}), async () => {
        await s.cleanup();
        return {};
      }),
    };
  }

  private async list(call: grpc.ServerWritableStream<ListSnapshotsRequest, ListSnapshotsResponse>): Promise<void> {
    try {
      const infos = await this.snapshotter.list(call.request.filters);
      for (let i = 0; i < infos.length && !call.cancelled; i += LIST_BATCH) {
        const ok = call.write({ info: infos.slice(i, i + LIST_BATCH).map(toProtoInfo) });
        if (!ok) {
          await new Promise<void>((resolve) => {
            call.once('drain', () => resolve());
            call.once('cancelled', () => resolve());
          });
        }
      }
      call.end();
    } catch (err) {
      call.emit('error', this.fail('List', { filters: call.request.filters }, err));
    }
  }
}

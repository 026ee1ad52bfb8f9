/**
 * systemd socket activation (sd_listen_fds(3)): systemd opens the listening socket of
 * `soci-ts-snapshotter.socket` and starts the daemon with it as fd 3, telling it so with
 * `LISTEN_PID` (the daemon's own pid: the variables are meant for this process, not for a
 * child that inherited them), `LISTEN_FDS` (how many fds from 3 on) and optionally
 * `LISTEN_FDNAMES` (colon-separated names).
 *
 * grpc-js cannot bind to an existing fd (`Server.bindAsync` takes `unix:PATH` and TCP
 * addresses only), but it can serve connections it is handed
 * (`Server.createConnectionInjector`, grpc-js >= 1.10): a `net.Server` listens on the passed
 * fd (`listen({ fd })` adopts it, libuv accepts on it) and every connection it accepts is
 * injected into the gRPC server, which then speaks HTTP/2 on it exactly as on its own socket.
 * No proxying, no second hop.
 */
import * as grpc from '@grpc/grpc-js';
import { fstat } from 'node:fs';
import { readFile, readlink, unlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { Server as NetServer, type Socket } from 'node:net';
import type { Logger } from '../fetcher/index.js';

/** The first fd systemd passes (SD_LISTEN_FDS_START). */
export const SD_LISTEN_FDS_START = 3;

export class SocketActivationError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(`socket activation: ${message}`, options);
    this.name = 'SocketActivationError';
  }
}

export interface ListenFds {
  /** The passed fds: 3, 4, … */
  fds: number[];
  /** Their names from LISTEN_FDNAMES (`unknown` where none was given, as sd_listen_fds_with_names). */
  names: string[];
}

/**
 * The fds systemd passed to this process, or undefined when it passed none (no LISTEN_PID, or
 * one naming another process: the variables were inherited). Throws SocketActivationError on
 * malformed values. With `unset` (default true) the variables are removed from `env`, so that
 * children of the daemon do not see them (as sd_listen_fds(1) does).
 */
export function listenFds(env: NodeJS.ProcessEnv = process.env, pid: number = process.pid, unset = true): ListenFds | undefined {
  const pidText = env.LISTEN_PID;
  const countText = env.LISTEN_FDS;
  const namesText = env.LISTEN_FDNAMES;
  if (unset) {
    delete env.LISTEN_PID;
    delete env.LISTEN_FDS;
    delete env.LISTEN_FDNAMES;
  }
  if (pidText === undefined || countText === undefined) return undefined;
  if (!/^\d+$/.test(pidText)) throw new SocketActivationError(`LISTEN_PID=${JSON.stringify(pidText)} is not a process id`);
  if (Number(pidText) !== pid) return undefined;
  if (!/^\d+$/.test(countText) || Number(countText) > 1024) throw new SocketActivationError(`LISTEN_FDS=${JSON.stringify(countText)} is not a number of fds`);
  const n = Number(countText);
  if (n === 0) return undefined;
  const fds = Array.from({ length: n }, (_, i) => SD_LISTEN_FDS_START + i);
  const given = namesText === undefined ? [] : namesText.split(':');
  return { fds, names: fds.map((_, i) => given[i] || 'unknown') };
}

export interface ActivatedListener {
  /** The passed fd. */
  fd: number;
  /** Its LISTEN_FDNAMES name (`unknown` without one). */
  name: string;
  /** The path the socket is bound to (from /proc), or `fd N` where it cannot be told. */
  address: string;
}

/**
 * The path a unix socket fd is bound to, from /proc (libuv knows no name for an adopted fd):
 * /proc/self/fd/N names the socket's inode, /proc/net/unix lists each socket's inode and path.
 */
async function unixSocketPath(fd: number): Promise<string | undefined> {
  try {
    const link = await readlink(`/proc/self/fd/${fd}`);
    const inode = /^socket:\[(\d+)\]$/.exec(link)?.[1];
    if (inode === undefined) return undefined;
    for (const line of (await readFile('/proc/net/unix', 'utf8')).split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols[6] === inode && cols[7] !== undefined && cols[7].startsWith('/')) return cols.slice(7).join(' ');
    }
  } catch {
    // no /proc: the address stays "fd N"
  }
  return undefined;
}

function isSocketFd(fd: number): Promise<boolean> {
  return new Promise((resolve, reject) => fstat(fd, (err, st) => (err ? reject(err) : resolve(st.isSocket()))));
}

/**
 * The listening socket systemd passed (the first one; others are ignored with a warning), not
 * yet accepted on, or undefined when the process was not socket-activated.
 */
export async function activatedListener(logger: Logger, env: NodeJS.ProcessEnv = process.env, pid: number = process.pid): Promise<ActivatedListener | undefined> {
  const passed = listenFds(env, pid);
  if (passed === undefined) return undefined;
  const fd = passed.fds[0]!;
  if (passed.fds.length > 1) logger.warn('socket activation passed several fds; serving on the first only', { fds: passed.fds, names: passed.names });
  let socket: boolean;
  try {
    socket = await isSocketFd(fd);
  } catch (e) {
    throw new SocketActivationError(`fd ${fd} (LISTEN_FDS=${passed.fds.length}) is not open: ${(e as Error).message}`, { cause: e });
  }
  if (!socket) throw new SocketActivationError(`fd ${fd} is not a socket`);
  return { fd, name: passed.names[0]!, address: (await unixSocketPath(fd)) ?? `fd ${fd}` };
}

/**
 * Serves `grpcServer` on the passed socket: a net.Server adopts the fd (`listen({ fd })`) and
 * each connection it accepts is injected into the gRPC server. The handler is in place before
 * the first accept, so connections that queued in the backlog while the daemon started are
 * served too. Resolves, once accepting, to a function that stops accepting (the gRPC server's
 * own shutdown closes the connections it serves).
 */
export async function serveOnListener(grpcServer: grpc.Server, listener: ActivatedListener, logger: Logger): Promise<() => Promise<void>> {
  const injector = grpcServer.createConnectionInjector(grpc.ServerCredentials.createInsecure());
  const server = new NetServer();
  server.on('connection', (s: Socket) => injector.injectConnection(s));
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(new SocketActivationError(`cannot accept on fd ${listener.fd}: ${e.message}`, { cause: e })));
    server.listen({ fd: listener.fd }, () => resolve());
  });
  server.on('error', (e) => logger.error('socket-activated listener failed', { fd: listener.fd, error: e }));
  // Stops accepting at once (net.Server's close callback would wait for the connections, which
  // the gRPC server's shutdown ends). An adopted fd has no path libuv knows of, so closing it
  // leaves systemd's socket file alone.
  return () => {
    if (server.listening) server.close();
    return Promise.resolve();
  };
}

/** What {@link serveMaybeActivated} needs of the daemon's server. */
export interface GrpcServing {
  readonly server: grpc.Server;
  readonly socketPath: string;
  stop(): Promise<void>;
}

/**
 * Starts the daemon's gRPC server through `start(address)`: on `address` as usual, or, when
 * systemd passed a listening socket, on that socket. In the activated case `start` is given a
 * private socket path next to the activated one (`.soci-ts-<pid>.grpc.sock`), which is unbound
 * and removed again at once, because SnapshotterServer binds a path of its own; the server is
 * then reachable only through the activated socket. `stop()` stops accepting on the activated
 * socket (leaving systemd's socket file in place), then stops the server.
 */
export async function serveMaybeActivated<S extends GrpcServing>(
  address: string,
  logger: Logger,
  start: (address: string) => Promise<S>,
): Promise<{ serving: S; activated?: ActivatedListener; stop(): Promise<void> }> {
  const listener = await activatedListener(logger);
  if (listener === undefined) {
    const serving = await start(address);
    return { serving, stop: () => serving.stop() };
  }
  const dir = listener.address.startsWith('/') ? dirname(listener.address) : dirname(address.replace(/^unix:/, ''));
  const privatePath = join(dir, `.soci-ts-${process.pid}.grpc.sock`);
  const serving = await start(privatePath);
  serving.server.unbind(`unix:${privatePath}`);
  await unlink(privatePath).catch(() => undefined);
  let stopAccepting: () => Promise<void>;
  try {
    stopAccepting = await serveOnListener(serving.server, listener, logger);
  } catch (e) {
    await serving.stop();
    throw e;
  }
  if (listener.address !== address && listener.address !== address.replace(/^unix:/, '')) {
    logger.info('socket-activated: serving on the socket systemd passed, not on the configured address', { activated: listener.address, configured: address });
  }
  logger.info('snapshotter serving on the socket-activated listener', { fd: listener.fd, name: listener.name, address: listener.address });
  return {
    serving,
    activated: listener,
    stop: async () => {
      await stopAccepting();
      await serving.stop();
    },
  };
}

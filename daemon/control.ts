/**
 * The snapshotter's control socket (`<root>/control.sock`, mode 0600): commands that a running
 * snapshotter does faster than a fresh process, because it is warm (modules loaded, protobuf
 * code generated, connections open). Today one: `rpull`, so that `soci-ts rpull` does not pay
 * Node's start-up and the containerd client's set-up on every pull (about a second on a
 * 2-core machine, which is most of a lazy pull of a small image).
 *
 * One request per connection, JSON lines: the client sends `{ method, params }`; the server
 * answers with any number of `{ event }` and `{ log }` lines, then one `{ result }` or
 * `{ error }` line, and closes. A client that goes away aborts its request.
 *
 * This module is the client side and the wire types; it imports nothing heavy, so that the
 * CLI can use it before it knows whether it needs the fetcher or gRPC at all.
 */
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { LineSplitter } from './fuse-protocol.js';

export const CONTROL_SOCKET_NAME = 'control.sock';

/** The control socket of the snapshotter whose root is `root`. */
export function controlSocketPath(root: string): string {
  return join(root, CONTROL_SOCKET_NAME);
}

/** What `soci-ts rpull` hands the snapshotter: its own flags, so the outcome is the same as in-process. */
export interface RpullRequest {
  ref: string;
  /** containerd's socket. */
  address: string;
  namespace: string;
  snapshotter: string;
  platform?: string;
  plainHttp: boolean;
  /** `user:password` (never logged). */
  user?: string;
  hostsDir: string;
  /**
   * The client's DOCKER_CONFIG, HOME and PATH: the docker config and the credential helpers
   * are the ones `soci-ts rpull` would use in its own process.
   */
  env: Record<string, string>;
  logLevel: 'debug' | 'info' | 'warn' | 'error';
}

export interface RpullReply {
  /** The result as `soci-ts rpull --json` prints it. */
  json: unknown;
  /** The one-line summary `soci-ts rpull` prints. */
  summary: string;
}

export interface ControlMethods {
  rpull: { params: RpullRequest; result: RpullReply };
}

/** `user`: the request failed for a reason the user can act on (exit code 1); `internal`: a bug (exit code 2). */
export interface WireControlError {
  kind: 'user' | 'internal';
  message: string;
}

export type ControlLine = { event: unknown } | { log: string } | { result: unknown } | { error: WireControlError };

/** The snapshotter answered the request with an error. */
export class ControlRequestError extends Error {
  constructor(
    message: string,
    readonly kind: 'user' | 'internal',
  ) {
    super(message);
    this.name = 'ControlRequestError';
  }
}

/** The connection to the control socket broke during a request (the snapshotter stopped or crashed). */
export class ControlConnectionError extends Error {
  constructor(socket: string, reason: string, options?: { cause?: unknown }) {
    super(`${socket}: ${reason}`, options);
    this.name = 'ControlConnectionError';
  }
}

/**
 * Connects to a control socket; undefined when no snapshotter serves it (no file, refused,
 * not ours to use), so that the caller can do the work itself.
 */
export function connectControl(socket: string, timeoutMs = 1000): Promise<Socket | undefined> {
  return new Promise((resolve) => {
    const s = connect(socket);
    const timer = setTimeout(() => {
      s.destroy();
      resolve(undefined);
    }, timeoutMs);
    s.once('connect', () => {
      clearTimeout(timer);
      s.removeAllListeners('error');
      resolve(s);
    });
    s.once('error', () => {
      clearTimeout(timer);
      resolve(undefined);
    });
  });
}

export interface CallHandlers {
  onEvent?: (e: unknown) => void;
  onLog?: (line: string) => void;
  signal?: AbortSignal;
}

/** Sends one request on a connected control socket and waits for its result. */
export function callControl<M extends keyof ControlMethods>(
  sock: Socket,
  socketPath: string,
  method: M,
  params: ControlMethods[M]['params'],
  h: CallHandlers = {},
): Promise<ControlMethods[M]['result']> {
  return new Promise((resolve, reject) => {
    let settled = false;
    const finish = (err: Error | undefined, value?: unknown): void => {
      if (settled) return;
      settled = true;
      h.signal?.removeEventListener('abort', onAbort);
      sock.destroy();
      if (err !== undefined) reject(err);
      else resolve(value as ControlMethods[M]['result']);
    };
    const onAbort = (): void => finish(h.signal?.reason instanceof Error ? h.signal.reason : new Error('aborted'));
    if (h.signal?.aborted === true) return onAbort();
    h.signal?.addEventListener('abort', onAbort, { once: true });
    const splitter = new LineSplitter(
      (line) => {
        let msg: Record<string, unknown>;
        try {
          msg = JSON.parse(line) as Record<string, unknown>;
        } catch {
          return finish(new ControlConnectionError(socketPath, 'the snapshotter sent a line that is not JSON'));
        }
        if ('event' in msg) h.onEvent?.(msg.event);
        else if (typeof msg.log === 'string') h.onLog?.(msg.log);
        else if ('result' in msg) finish(undefined, msg.result);
        else if (typeof msg.error === 'object' && msg.error !== null) {
          const e = msg.error as Partial<WireControlError>;
          finish(new ControlRequestError(String(e.message ?? 'unknown error'), e.kind === 'user' ? 'user' : 'internal'));
        }
      },
      () => finish(new ControlConnectionError(socketPath, 'the snapshotter sent an over-long line')),
    );
    sock.on('data', (b: Buffer) => splitter.push(b));
    sock.on('error', (err) => finish(new ControlConnectionError(socketPath, `connection failed: ${err.message}`, { cause: err })));
    sock.on('close', () => finish(new ControlConnectionError(socketPath, 'the snapshotter closed the connection before answering (did it stop?)')));
    sock.write(JSON.stringify({ method, params }) + '\n');
  });
}

/** The server side of the snapshotter's control socket (see control.ts for the protocol). */
import { unlink } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import type { Logger } from '../fetcher/index.js';
import { LineSplitter } from './fuse-protocol.js';
import type { ControlLine, ControlMethods } from './control.js';
import { listenOwnerOnly, prepareSocketPath } from './server.js';

/** A request's context: where its events and log lines go, and its abort signal (the client left). */
export interface ControlContext {
  emit(event: unknown): void;
  log(line: string): void;
  signal: AbortSignal;
}

export type ControlHandlers = {
  [M in keyof ControlMethods]: (params: Record<string, unknown>, ctx: ControlContext) => Promise<ControlMethods[M]['result']>;
};

/** How long a connection may stay without sending its request. */
const REQUEST_WAIT_MS = 10_000;

export interface ControlServerOptions {
  socket: string;
  logger: Logger;
  handlers: ControlHandlers;
  /** Errors the user can act on (exit code 1 on the client); others are internal (exit code 2). */
  isUserError(err: unknown): boolean;
}

/** A request line that is not a request: answered with a user error, the connection closed. */
class BadRequestError extends Error {
  constructor(reason: string) {
    super(`bad control request: ${reason}`);
    this.name = 'BadRequestError';
  }
}

export class ControlServer {
  private readonly connections = new Set<Socket>();
  private stopping: Promise<void> | undefined;

  private constructor(
    private readonly server: Server,
    private readonly opts: ControlServerOptions,
  ) {}

  static async start(opts: ControlServerOptions): Promise<ControlServer> {
    await prepareSocketPath(opts.socket);
    const server = createServer();
    const self = new ControlServer(server, opts);
    server.on('connection', (s) => self.serve(s));
    await listenOwnerOnly(server, opts.socket);
    server.on('error', (err) => opts.logger.error('control socket error', { socket: opts.socket, error: err }));
    return self;
  }

  private serve(sock: Socket): void {
    this.connections.add(sock);
    const ac = new AbortController();
    let started = false;
    sock.on('close', () => {
      this.connections.delete(sock);
      ac.abort(new Error('the client went away'));
    });
    sock.on('error', (err) => this.opts.logger.debug('control connection error', { error: err }));
    // A client that connects and says nothing does not hold a connection for ever.
    sock.setTimeout(REQUEST_WAIT_MS, () => {
      if (!started) sock.destroy();
    });
    const send = (line: ControlLine): void => {
      if (!sock.destroyed) sock.write(JSON.stringify(line) + '\n');
    };
    const fail = (err: unknown): void => {
      const user = err instanceof BadRequestError || this.opts.isUserError(err);
      const message = err instanceof Error ? err.message : String(err);
      if (!user) this.opts.logger.error('control request failed', { error: err });
      send({ error: { kind: user ? 'user' : 'internal', message: user ? message : `internal error: ${message}` } });
      sock.end();
    };
    const splitter = new LineSplitter(
      (line) => {
        if (started) return;
        started = true;
        sock.setTimeout(0);
        let req: { method?: unknown; params?: unknown };
        try {
          req = JSON.parse(line) as typeof req;
        } catch {
          return fail(new BadRequestError('not JSON'));
        }
        const method = req.method;
        if (typeof method !== 'string' || !Object.prototype.hasOwnProperty.call(this.opts.handlers, method)) return fail(new BadRequestError(`unknown method ${JSON.stringify(method)}`));
        if (typeof req.params !== 'object' || req.params === null) return fail(new BadRequestError('params must be an object'));
        const handler = this.opts.handlers[method as keyof ControlMethods];
        const ctx: ControlContext = { emit: (event) => send({ event }), log: (l) => send({ log: l }), signal: ac.signal };
        handler(req.params as Record<string, unknown>, ctx).then(
          (result) => {
            send({ result });
            sock.end();
          },
          (err: unknown) => fail(err),
        );
      },
      () => fail(new BadRequestError('line too long')),
    );
    sock.on('data', (b: Buffer) => splitter.push(b));
  }

  /** Stops accepting, aborts requests in flight (their clients see the connection close). Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
      for (const s of this.connections) s.destroy();
      await closed;
      await unlink(this.opts.socket).catch(() => undefined);
    })();
    return this.stopping;
  }
}

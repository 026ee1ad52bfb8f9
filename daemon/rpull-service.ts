/**
 * `rpull` served by a running snapshotter over its control socket: the same pull as
 * `soci-ts rpull` in its own process (daemon/rpull.ts), with the client's flags and the
 * client's docker config and credential helpers, its events and log lines sent back.
 */
import { FetcherError, isLogLevel, jsonLogger, parseReference, RegistryClient, type Logger } from '../fetcher/index.js';
import type { ControlContext } from './control-server.js';
import type { RpullReply, RpullRequest } from './control.js';
import { ContainerdApiError } from './containerd-client.js';
import { rpull, rpullResultJson, RpullError, summarize } from './rpull.js';
import type { registryTuning } from './cli-util.js';

/** A control request whose fields are not what `soci-ts rpull` sends. */
export class RpullRequestError extends Error {
  constructor(reason: string) {
    super(`rpull request: ${reason}`);
    this.name = 'RpullRequestError';
  }
}

function str(p: Record<string, unknown>, k: string, optional = false): string | undefined {
  const v = p[k];
  if (v === undefined && optional) return undefined;
  if (typeof v !== 'string') throw new RpullRequestError(`${k} must be a string`);
  return v;
}

/** Checks a request's shape (it comes over a socket; only root can connect, but not only soci-ts). */
export function checkRpullRequest(p: Record<string, unknown>): RpullRequest {
  const env = p.env;
  if (typeof env !== 'object' || env === null || Object.values(env).some((v) => typeof v !== 'string')) throw new RpullRequestError('env must be an object of strings');
  const logLevel = str(p, 'logLevel')!;
  if (!isLogLevel(logLevel)) throw new RpullRequestError(`logLevel ${JSON.stringify(logLevel)} is not one of debug, info, warn, error`);
  if (typeof p.plainHttp !== 'boolean') throw new RpullRequestError('plainHttp must be a boolean');
  return {
    ref: str(p, 'ref')!,
    address: str(p, 'address')!,
    namespace: str(p, 'namespace')!,
    snapshotter: str(p, 'snapshotter')!,
    platform: str(p, 'platform', true),
    plainHttp: p.plainHttp,
    user: str(p, 'user', true),
    hostsDir: str(p, 'hostsDir')!,
    env: env as Record<string, string>,
    logLevel,
  };
}

/** The control socket's `rpull` handler; `log` is the daemon's own logger (one line per request). */
export function rpullHandler(
  log: Logger,
  tuning: ReturnType<typeof registryTuning>,
  /** The serving snapshotter's remote snapshots (see RemoteSnapshots.warm), when it has them. */
  remote?: { warm(imageRef: string, manifestDigest: string, layers: readonly string[]): void },
): (params: Record<string, unknown>, ctx: ControlContext) => Promise<RpullReply> {
  return async (params, ctx) => {
    const req = checkRpullRequest(params);
    const ref = parseReference(req.ref);
    // The client's log lines go back to the client's stderr, as in its own process.
    const logger = jsonLogger(req.logLevel, { write: (line: string) => ctx.log(line) });
    const client = new RegistryClient({
      hostsDir: req.hostsDir,
      plainHttp: req.plainHttp,
      credentials: { user: req.user, env: req.env },
      ...tuning,
      logger,
    });
    const t0 = Date.now();
    try {
      const r = await rpull(client.repository(ref), {
        address: req.address,
        namespace: req.namespace,
        snapshotter: req.snapshotter,
        platform: req.platform,
        logger,
        onEvent: (e) => ctx.emit(e),
        signal: ctx.signal,
        // The Prepares this pull sends come to this snapshotter (whose control socket the client found).
        ...(remote !== undefined
          ? { onManifest: (m: { imageRef: string; manifestDigest: string; layers: string[] }) => remote.warm(m.imageRef, m.manifestDigest, m.layers) }
          : {}),
      });
      log.info('rpull served for a client', { image: r.image, namespace: r.namespace, layers: r.layers.length, lazy: r.layers.filter((l) => l.outcome === 'lazy').length, ms: Date.now() - t0 });
      return { json: rpullResultJson(r), summary: summarize(r) };
    } catch (err) {
      log.info('rpull for a client failed', { image: ref.toString(), ms: Date.now() - t0, error: err });
      throw err;
    } finally {
      await client.close().catch(() => undefined);
    }
  };
}

/** Errors of a served rpull that are the user's (exit code 1 on the client), as in its own process. */
export function isRpullServiceUserError(err: unknown): boolean {
  return err instanceof RpullRequestError || err instanceof RpullError || err instanceof ContainerdApiError || err instanceof FetcherError;
}

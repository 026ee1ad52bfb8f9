/**
 * The HTTP layer under the registry client: undici agents (one per TLS setup, keep-alive, a
 * bounded number of connections per origin), one-attempt requests with the three timeouts
 * mapped to typed errors, bounded body reads, and the retry loop (exponential backoff with
 * jitter, `Retry-After` honoured) that the registry operations run their attempts in.
 */
import { readFile } from 'node:fs/promises';
import { connect as netConnect, isIP } from 'node:net';
import { Duplex } from 'node:stream';
import { connect as tlsConnect, rootCertificates } from 'node:tls';
import { setTimeout as sleep } from 'node:timers/promises';
import { Agent, request, type Dispatcher } from 'undici';
import { FetcherError, IntegrityError, NetworkError, ProtocolError, RegistryError, TimeoutError, TooLargeError, ConfigError } from './errors.js';
import type { ClientCertPair } from './hosts.js';
import type { Logger } from './log.js';

export interface Timeouts {
  /** TCP + TLS connect. */
  connectMs: number;
  /** From sending the request to the response headers. */
  firstByteMs: number;
  /** Longest silence between two pieces of a response body. */
  idleMs: number;
}

export const DEFAULT_TIMEOUTS: Readonly<Timeouts> = Object.freeze({ connectMs: 10_000, firstByteMs: 30_000, idleMs: 30_000 });

export interface RetryOptions {
  /** Attempts in all, the first included. */
  attempts: number;
  /** First backoff; doubles per attempt, with jitter. */
  baseDelayMs: number;
  maxDelayMs: number;
  /** A `Retry-After` longer than this is cut to it (a registry cannot park a read for an hour). */
  maxRetryAfterMs: number;
}

export const DEFAULT_RETRY: Readonly<RetryOptions> = Object.freeze({ attempts: 5, baseDelayMs: 200, maxDelayMs: 5_000, maxRetryAfterMs: 30_000 });

export interface TlsSettings {
  caPaths: readonly string[];
  skipVerify: boolean;
  clientCertPairs: readonly ClientCertPair[];
}

export interface HttpRequest {
  method: string;
  url: URL;
  headers: Record<string, string>;
  body?: Uint8Array | AsyncIterable<Uint8Array>;
  tls?: TlsSettings;
  /** Connect timeout for this endpoint (hosts.toml `dial_timeout`), else the transport's. */
  connectTimeoutMs?: number;
  /** Where this registry's TLS is configured (a hosts.toml path), for the message of a TLS failure. */
  tlsConfigFile?: string;
  /**
   * Bytes the response body buffers before the socket is paused (undici's default: 64 KiB). More
   * keeps a fast sender going while the consumer is busy with a chunk (hashing, inflating).
   */
  highWaterMark?: number;
  signal?: AbortSignal;
}

export type ResponseBody = Dispatcher.ResponseData['body'];

export interface HttpResponse {
  status: number;
  headers: Dispatcher.ResponseData['headers'];
  body: ResponseBody;
}

/** First value of a response header (names are lowercase in undici). */
export function header(res: HttpResponse, name: string): string | undefined {
  const v = res.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

// ------------------------------------------------------------------- transient errors

const transient = new WeakMap<Error, { retryAfterMs?: number }>();

/** Marks an error as worth retrying (optionally after the server's `Retry-After`). */
export function markTransient<E extends Error>(err: E, retryAfterMs?: number): E {
  transient.set(err, retryAfterMs === undefined ? {} : { retryAfterMs });
  return err;
}

export function isTransient(err: unknown): boolean {
  return err instanceof Error && transient.has(err);
}

/** `Retry-After` as delay-seconds or an HTTP date, in ms from now; undefined when absent or unreadable. */
export function parseRetryAfter(value: string | undefined, now = Date.now()): number | undefined {
  if (value === undefined) return undefined;
  const v = value.trim();
  if (/^\d+$/.test(v)) return Number(v) * 1000;
  const t = Date.parse(v);
  return Number.isFinite(t) ? Math.max(0, t - now) : undefined;
}

/** URL without query or fragment: storage redirects carry signatures in the query. */
export function safeUrl(url: URL | string): string {
  try {
    const u = typeof url === 'string' ? new URL(url) : url;
    return `${u.protocol}//${u.host}${u.pathname}${u.search === '' ? '' : '?…'}`;
  } catch {
    return '<unparsable URL>';
  }
}

const NETWORK_CODES = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENETDOWN',
  'EAI_AGAIN',
  'UND_ERR_SOCKET',
  'UND_ERR_CLOSED',
  'UND_ERR_DESTROYED',
  'UND_ERR_RES_CONTENT_LENGTH_MISMATCH',
  'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH',
  'HPE_INVALID_CONSTANT',
  'HPE_INVALID_CHUNK_SIZE',
  'HPE_UNEXPECTED_CONTENT_LENGTH',
  'HPE_INVALID_CONTENT_LENGTH',
]);

/**
 * OpenSSL's certificate verification results as Node reports them (`err.code`), plus Node's own
 * host name check: the server speaks TLS, but its certificate is not trusted here.
 */
const CERT_VERIFY_CODES = new Set([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_CRL',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'UNABLE_TO_DECRYPT_CRL_SIGNATURE',
  'UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY',
  'CERT_SIGNATURE_FAILURE',
  'CRL_SIGNATURE_FAILURE',
  'CERT_NOT_YET_VALID',
  'CERT_HAS_EXPIRED',
  'CRL_NOT_YET_VALID',
  'CRL_HAS_EXPIRED',
  'ERROR_IN_CERT_NOT_BEFORE_FIELD',
  'ERROR_IN_CERT_NOT_AFTER_FIELD',
  'ERROR_IN_CRL_LAST_UPDATE_FIELD',
  'ERROR_IN_CRL_NEXT_UPDATE_FIELD',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'CERT_CHAIN_TOO_LONG',
  'CERT_REVOKED',
  'INVALID_CA',
  'PATH_LENGTH_EXCEEDED',
  'INVALID_PURPOSE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'HOSTNAME_MISMATCH',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);

/** Where a registry's TLS is configured, when the caller did not say. */
const DEFAULT_TLS_CONFIG_FILE = '<hosts dir>/<host>/hosts.toml';

function errCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

/**
 * Turns an undici/socket error into a typed one naming `subject`; connection and timeout
 * failures are marked transient. TLS failures are not (retrying cannot help): their message says
 * what to configure in `tlsConfigFile` (the registry's hosts.toml). Typed errors pass through.
 */
export function mapNetworkError(err: unknown, subject: string, timeouts: Timeouts, tlsConfigFile = DEFAULT_TLS_CONFIG_FILE): Error {
  if (err instanceof FetcherError) return err;
  const code = errCode(err);
  switch (code) {
    case 'UND_ERR_CONNECT_TIMEOUT':
      return markTransient(new TimeoutError(subject, 'connect', `no connection within ${timeouts.connectMs} ms`, { cause: err }));
    case 'UND_ERR_HEADERS_TIMEOUT':
      return markTransient(new TimeoutError(subject, 'first-byte', `no response within ${timeouts.firstByteMs} ms`, { cause: err }));
    case 'UND_ERR_BODY_TIMEOUT':
      return markTransient(new TimeoutError(subject, 'idle', `response body stalled for ${timeouts.idleMs} ms`, { cause: err }));
    case 'UND_ERR_ABORTED':
    case 'ABORT_ERR':
      return new NetworkError(subject, 'request aborted', { cause: err });
    case 'ENOTFOUND':
      return new NetworkError(subject, 'host name not found', { cause: err });
    default:
      break;
  }
  if (code !== undefined && NETWORK_CODES.has(code)) {
    return markTransient(new NetworkError(subject, `connection failed (${code})`, { cause: err }));
  }
  if (code !== undefined && CERT_VERIFY_CODES.has(code)) {
    const detail = err instanceof Error ? `: ${err.message.replace(/[^\x20-\x7e]/g, ' ').slice(0, 200)}` : '';
    return new NetworkError(
      subject,
      `TLS certificate verification failed (${code}${detail}); to trust the registry's CA, name its file with ca = "<file>" in ${tlsConfigFile} ` +
        `(or put it next to it as a *.crt file), or set skip_verify = true there`,
      { cause: err },
    );
  }
  if (code !== undefined && (code.startsWith('ERR_TLS') || code.includes('CERT') || code.startsWith('ERR_SSL') || code === 'EPROTO')) {
    return new NetworkError(
      subject,
      `TLS failed (${code}); for a registry with its own CA set ca = "<file>" in ${tlsConfigFile}, for a plain-HTTP one use --plain-http ` +
        `(or server = "http://..." there)`,
      { cause: err },
    );
  }
  const message = err instanceof Error ? err.message : String(err);
  // Unknown socket-level failures are retried: a broken connection is the common case.
  return markTransient(new NetworkError(subject, `request failed: ${message}`, { cause: err }));
}

// ------------------------------------------------------------------- transport

export interface TransportOptions {
  timeouts?: Partial<Timeouts>;
  /** Parallel connections (and so requests) per origin; more requests queue. Default 8. */
  connectionsPerHost?: number;
  userAgent?: string;
  logger: Logger;
}

/** Agents per TLS setup, one-attempt requests with typed errors. */
export class Transport {
  readonly timeouts: Timeouts;
  readonly connectionsPerHost: number;
  readonly userAgent: string;
  readonly logger: Logger;
  private readonly agents = new Map<string, Promise<Agent>>();
  private closed = false;

  constructor(opts: TransportOptions) {
    this.timeouts = { ...DEFAULT_TIMEOUTS, ...opts.timeouts };
    this.connectionsPerHost = opts.connectionsPerHost ?? 8;
    this.userAgent = opts.userAgent ?? 'soci-ts';
    this.logger = opts.logger;
  }

  private agent(tls: TlsSettings | undefined, connectTimeoutMs: number): Promise<Agent> {
    const key = JSON.stringify([tls?.caPaths ?? [], tls?.skipVerify ?? false, tls?.clientCertPairs ?? [], connectTimeoutMs]);
    let a = this.agents.get(key);
    if (a === undefined) {
      a = this.makeAgent(tls, connectTimeoutMs);
      this.agents.set(key, a);
      a.catch(() => this.agents.delete(key));
    }
    return a;
  }

  private async makeAgent(tls: TlsSettings | undefined, connectTimeoutMs: number): Promise<Agent> {
    const connect: Record<string, unknown> = { timeout: connectTimeoutMs };
    if (tls !== undefined) {
      if (tls.caPaths.length > 0) {
        const extra = await Promise.all(tls.caPaths.map((p) => readPem(p, 'CA certificate')));
        connect.ca = [...rootCertificates, ...extra];
      }
      if (tls.skipVerify) connect.rejectUnauthorized = false;
      const pair = tls.clientCertPairs[0];
      if (pair !== undefined) {
        connect.cert = await readPem(pair.certPath, 'client certificate');
        connect.key = await readPem(pair.keyPath ?? pair.certPath, 'client key');
      }
    }
    return new Agent({
      connections: this.connectionsPerHost,
      pipelining: 1,
      keepAliveTimeout: 30_000,
      headersTimeout: this.timeouts.firstByteMs,
      bodyTimeout: this.timeouts.idleMs,
      connect,
    });
  }

  /**
   * One request, no retries, no redirects followed. Network failures and timeouts become typed
   * errors naming `subject`, marked transient.
   */
  async send(req: HttpRequest, subject: string): Promise<HttpResponse> {
    if (this.closed) throw new NetworkError(subject, 'the registry client is closed');
    const dispatcher = await this.agent(req.tls, req.connectTimeoutMs ?? this.timeouts.connectMs);
    const headers: Record<string, string> = { 'user-agent': this.userAgent, ...req.headers };
    try {
      const res = await request(req.url, {
        method: req.method as Dispatcher.HttpMethod,
        headers,
        body: req.body as Dispatcher.DispatchOptions['body'],
        dispatcher,
        signal: req.signal,
        ...(req.highWaterMark === undefined ? {} : { highWaterMark: req.highWaterMark }),
      });
      // Body errors surface when read; map them there (readBody), not as unhandled events. An
      // unread body that breaks, or one we destroy() unread (undici then emits a
      // RequestAbortedError), would otherwise be an uncaught 'error' event that kills the process.
      res.body.on('error', () => undefined);
      return { status: res.statusCode, headers: res.headers, body: res.body };
    } catch (err) {
      // Requests in flight when the client closed fail for good (not retried on new connections).
      if (this.closed) throw new NetworkError(subject, 'the registry client is closed', { cause: err });
      throw mapNetworkError(err, subject, this.timeouts, req.tlsConfigFile);
    }
  }

  /**
   * Whether the server at `url`'s host and port speaks TLS: connects, sends a TLS ClientHello and
   * looks at the first byte of the answer. A TLS record (handshake or alert) means TLS; anything
   * else (an HTTP 400), the connection closed or reset unanswered, or no answer within the timeout
   * means plain HTTP (containerd falls back to HTTP on an `HTTP/` answer and on a handshake
   * timeout). Nothing is verified here and no request is sent. A failed TCP connect is the same
   * typed (transient) error a request gets.
   */
  probeTls(url: URL, subject: string, connectTimeoutMs = this.timeouts.connectMs): Promise<'https' | 'http'> {
    const hostname = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
    const port = url.port === '' ? 443 : Number(url.port);
    const timeouts = { ...this.timeouts, connectMs: connectTimeoutMs };
    return new Promise((resolve, reject) => {
      let settled = false;
      const raw = netConnect({ host: hostname, port });
      let hello: ReturnType<typeof tlsConnect> | undefined;
      const settle = (outcome: 'https' | 'http' | Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        raw.destroy();
        hello?.destroy();
        if (outcome instanceof Error) reject(outcome);
        else resolve(outcome);
      };
      let timer = setTimeout(() => {
        const err = Object.assign(new Error(`connect timeout after ${connectTimeoutMs} ms`), { code: 'UND_ERR_CONNECT_TIMEOUT' });
        settle(mapNetworkError(err, subject, timeouts));
      }, connectTimeoutMs);
      let connected = false;
      // Before the connection: refused, unreachable. After it: reset by a server that took our
      // ClientHello for a broken request.
      raw.on('error', (err) => settle(connected ? 'http' : mapNetworkError(err, subject, timeouts)));
      raw.once('connect', () => {
        connected = true;
        clearTimeout(timer);
        timer = setTimeout(() => settle('http'), connectTimeoutMs);
        // 22 = handshake record (ServerHello), 21 = alert: a TLS server, whatever it thinks of us.
        raw.once('data', (first: Buffer) => settle(first[0] === 22 || first[0] === 21 ? 'https' : 'http'));
        raw.once('end', () => settle('http'));
        raw.once('close', () => settle('http'));
        // TLS writes its ClientHello through this; the answer is read above, not handed back.
        const relay = new Duplex({
          read() {},
          write(chunk: Buffer, _enc, cb) {
            if (raw.destroyed) cb();
            else raw.write(chunk, () => cb());
          },
        });
        hello = tlsConnect({ socket: relay, rejectUnauthorized: false, ...(isIP(hostname) === 0 ? { servername: hostname } : {}) });
        hello.on('error', () => undefined);
      });
    });
  }

  /** Closes every connection; requests in flight fail, and so does every later one (not retried). */
  async close(): Promise<void> {
    this.closed = true;
    const agents = [...this.agents.values()];
    this.agents.clear();
    await Promise.all(agents.map(async (p) => (await p.catch(() => undefined))?.destroy().catch(() => undefined)));
  }
}

async function readPem(path: string, what: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (err) {
    throw new ConfigError(path, `cannot read ${what}`, { cause: err });
  }
}

// ------------------------------------------------------------------- bodies

/**
 * Reads a whole body into one buffer. With `expected`, exactly that many bytes must come (fewer:
 * transient NetworkError, the connection broke; more: ProtocolError). Without it, at most `max`
 * bytes are accepted (TooLargeError, checked against `Content-Length` before reading).
 */
export async function readBody(
  res: HttpResponse,
  subject: string,
  timeouts: Timeouts,
  limits: { expected?: number; max: number; what: string },
): Promise<Buffer> {
  const declared = header(res, 'content-length');
  const declaredLength = declared === undefined || !/^\d+$/.test(declared) ? undefined : Number(declared);
  const cap = limits.expected ?? limits.max;
  if (declaredLength !== undefined && declaredLength > cap) {
    res.body.destroy();
    if (limits.expected === undefined) throw new TooLargeError(subject, `${limits.what} of ${declaredLength} bytes is over the ${limits.max}-byte limit`);
    throw new ProtocolError(subject, `${limits.what}: server announced ${declaredLength} bytes, expected ${limits.expected}`);
  }
  const size = limits.expected ?? declaredLength;
  const out = size === undefined ? undefined : Buffer.allocUnsafe(size);
  const chunks: Buffer[] = [];
  let got = 0;
  try {
    for await (const chunk of res.body as AsyncIterable<Buffer>) {
      if (got + chunk.length > cap) {
        res.body.destroy();
        if (limits.expected === undefined) throw new TooLargeError(subject, `${limits.what} is over the ${limits.max}-byte limit`);
        throw new ProtocolError(subject, `${limits.what}: server sent more than the ${limits.expected} bytes asked for`);
      }
      if (out !== undefined && got + chunk.length <= out.length) chunk.copy(out, got);
      else chunks.push(chunk);
      got += chunk.length;
    }
  } catch (err) {
    throw mapNetworkError(err, subject, timeouts);
  }
  if (limits.expected !== undefined && got !== limits.expected) {
    throw markTransient(new NetworkError(subject, `${limits.what}: body ended after ${got} of ${limits.expected} bytes`));
  }
  if (out === undefined) return Buffer.concat(chunks, got);
  if (got < out.length) {
    // Content-Length said more than came (undici normally reports this itself).
    throw markTransient(new NetworkError(subject, `${limits.what}: body ended after ${got} of ${out.length} bytes`));
  }
  return out;
}

/** Drops a body we do not need, without letting a huge or stalled one hold the connection. */
export function discardBody(res: HttpResponse): void {
  res.body.dump({ limit: 65536 }).catch(() => undefined);
}

/**
 * The error for a non-success status, with the registry's error code and message when the body
 * is a distribution error document. 5xx, 429 and 408 are transient (with `Retry-After`).
 */
export async function statusError(res: HttpResponse, subject: string, what: string, timeouts: Timeouts): Promise<RegistryError> {
  let code: string | undefined;
  let detail = '';
  try {
    const body = await readBody(res, subject, timeouts, { max: 65536, what: 'error body' });
    const parsed = JSON.parse(body.toString('utf8')) as { errors?: Array<{ code?: unknown; message?: unknown }> };
    const first = parsed.errors?.[0];
    if (typeof first?.code === 'string') code = first.code.slice(0, 64);
    if (typeof first?.message === 'string') detail = first.message;
  } catch {
    res.body.destroy();
  }
  // Registry messages are attacker-controlled text: one line, printable, short.
  detail = detail.replace(/[^\x20-\x7e]/g, ' ').slice(0, 200);
  const reason = `${what}: HTTP ${res.status}${code === undefined ? '' : ` ${code}`}${detail === '' ? '' : ` (${detail})`}`;
  const err = new RegistryError(subject, reason, { status: res.status, code });
  if (res.status >= 500 || res.status === 429 || res.status === 408) {
    markTransient(err, parseRetryAfter(header(res, 'retry-after')));
  }
  return err;
}

// ------------------------------------------------------------------- retries

/** What a retried request was doing: the registry operation whose attempt failed. */
export type RetryOperation =
  /** GET or HEAD of a manifest or image index (tags and digests, the referrers fallback tag included). */
  | 'manifest'
  /** GET or HEAD of a whole small blob (a config, a zTOC, an index). */
  | 'blob'
  /** The streamed download of a whole layer, resumed with a Range request. */
  | 'blob_stream'
  /** A range read of a blob (the spans of a lazily served layer). */
  | 'range'
  /** A page of the referrers API. */
  | 'referrers'
  /** Pushing a blob or a manifest. */
  | 'push';

/** Why an attempt was retried: a short, stable class of its error (see {@link retryCause}). */
export type RetryCause =
  /** The server answered 5xx. */
  | 'http_5xx'
  /** 429 Too Many Requests (throttled). */
  | 'http_429'
  /** 408 Request Timeout. */
  | 'http_408'
  /** No TCP connection (refused, unreachable, DNS not answering). */
  | 'connect'
  /** The connection broke: reset, closed early, a body shorter than announced. */
  | 'reset'
  /** No connection within the connect timeout. */
  | 'timeout_connect'
  /** No response headers within the first-byte timeout. */
  | 'timeout_first_byte'
  /** The body stalled longer than the idle timeout. */
  | 'timeout_idle'
  /** The bytes did not match their digest (or expected size). */
  | 'integrity'
  /** A malformed answer worth asking again (a wrong Content-Range). */
  | 'protocol'
  | 'other';

/** One retry: the attempt that failed, what it was doing and why, and the wait before the next. */
export interface RetryEvent {
  operation: RetryOperation;
  cause: RetryCause;
  /** The thing fetched (reference, blob), as in errors. */
  subject: string;
  /** 1 for the first retry (the second attempt), and so on. */
  retry: number;
  delayMs: number;
  /** The HTTP status of the failed attempt, for the `http_*` causes. */
  status?: number;
  error: unknown;
}

/** Called once per retry, before the wait. Must not throw (a throw is logged and ignored). */
export type RetryObserver = (event: RetryEvent) => void;

const CONNECT_CODES = new Set(['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH', 'ENETDOWN', 'EAI_AGAIN', 'ETIMEDOUT']);

/** The first string `code` along an error's cause chain. */
function codeInChain(err: unknown): string | undefined {
  for (let e: unknown = err, depth = 0; e !== undefined && e !== null && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    const code = errCode(e);
    if (code !== undefined) return code;
  }
  return undefined;
}

/** The {@link RetryCause} of a (transient) error of this module. */
export function retryCause(err: unknown): RetryCause {
  if (err instanceof RegistryError && err.status !== undefined) {
    if (err.status >= 500) return 'http_5xx';
    if (err.status === 429) return 'http_429';
    if (err.status === 408) return 'http_408';
  }
  if (err instanceof TimeoutError) return err.phase === 'connect' ? 'timeout_connect' : err.phase === 'first-byte' ? 'timeout_first_byte' : 'timeout_idle';
  if (err instanceof NetworkError) {
    const code = codeInChain(err.cause);
    return code !== undefined && CONNECT_CODES.has(code) ? 'connect' : 'reset';
  }
  if (err instanceof IntegrityError) return 'integrity';
  if (err instanceof ProtocolError) return 'protocol';
  return 'other';
}

/** The delay before retry n+1 after `err` (see {@link withRetries}). */
export function retryDelay(err: unknown, n: number, retry: RetryOptions): number {
  const hint = err instanceof Error ? transient.get(err)?.retryAfterMs : undefined;
  const exp = Math.min(retry.maxDelayMs, retry.baseDelayMs * 2 ** n);
  return hint !== undefined ? Math.min(hint, retry.maxRetryAfterMs) : exp / 2 + Math.random() * (exp / 2);
}

/** Tells `observer` about a retry (logging it at debug level), never throwing. */
export function noteRetry(logger: Logger, observer: RetryObserver | undefined, operation: RetryOperation | undefined, subject: string, err: unknown, retry: number, delayMs: number): void {
  const cause = retryCause(err);
  logger.debug('retrying', { subject, operation, cause, attempt: retry, delayMs: Math.round(delayMs), error: err });
  if (observer === undefined || operation === undefined) return;
  try {
    observer({ operation, cause, subject, retry, delayMs, ...(err instanceof RegistryError && err.status !== undefined ? { status: err.status } : {}), error: err });
  } catch (e) {
    logger.warn('retry observer failed', { error: e });
  }
}

/**
 * Runs `attempt` until it succeeds, a non-transient error comes, or attempts run out. The delay
 * before retry n is a random value in [d/2, d] with d = base * 2^n capped at max, or the server's
 * `Retry-After` (capped) when it gave one. Each retry is logged and, with `observe`, reported
 * to its observer as `observe.operation`.
 */
export async function withRetries<T>(
  subject: string,
  retry: RetryOptions,
  logger: Logger,
  attempt: (n: number) => Promise<T>,
  signal?: AbortSignal,
  observe?: { operation: RetryOperation; observer: RetryObserver | undefined },
): Promise<T> {
  for (let n = 0; ; n++) {
    try {
      return await attempt(n);
    } catch (err) {
      if (!isTransient(err) || n + 1 >= retry.attempts || signal?.aborted === true) throw err;
      const delay = retryDelay(err, n, retry);
      noteRetry(logger, observe?.observer, observe?.operation, subject, err, n + 1, delay);
      await sleep(delay, undefined, { signal }).catch(() => undefined);
    }
  }
}

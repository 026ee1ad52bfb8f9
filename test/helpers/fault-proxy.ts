/**
 * A fault-injecting HTTP/1.1 reverse proxy on loopback, for testing a registry client against
 * the failures real registries and their blob storage produce: resets, stalls, 5xx and 429,
 * truncated and corrupted bodies, servers that ignore Range, redirect loops, S3-style signed
 * storage URLs that expire, and slow bodies.
 *
 * Which request gets which fault is decided by a PRNG seeded per request from
 * (seed, method, path, Range, n-th time this key was seen), so a run is reproducible even
 * when a client issues requests concurrently in varying order.
 *
 * Bodies are streamed (never buffered whole); every socket, timer and upstream request is
 * torn down by close().
 */
import { createHash } from 'node:crypto';
import * as http from 'node:http';
import type * as net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

// ---------------------------------------------------------------------------------------
// Types

export type FaultKind =
  | 'reset'
  | 'stall'
  | 'status500'
  | 'status503'
  | 'status429'
  | 'truncate'
  | 'flip'
  | 'ignoreRange'
  | 'redirectLoop'
  | 'redirectToStorage'
  | 'slowBody';

export const FAULT_KINDS: readonly FaultKind[] = Object.freeze([
  'reset',
  'stall',
  'status500',
  'status503',
  'status429',
  'truncate',
  'flip',
  'ignoreRange',
  'redirectLoop',
  'redirectToStorage',
  'slowBody',
]);

export type RequestMatcher = (method: string, path: string) => boolean;

export interface FaultProxyOptions {
  /** The real server, e.g. `http://127.0.0.1:5000`. */
  upstream: string;
  /** Seeds the per-request PRNG (mulberry32). */
  seed: number;
  /** Probability 0..1 that a matching request gets a fault. */
  rate: number;
  /** Kinds that may be chosen, uniformly. */
  faults: FaultKind[];
  /** Requests that may get faults (path without query). Default: GET/HEAD of `/v2/<name>/blobs/<digest>`. */
  match?: RequestMatcher;
  /** Retry-After on 429/503 (default 1). */
  retryAfterSeconds?: number;
  /** Whether 429/503 carry Retry-After: `sometimes` (by seed, half the time; default), `always`, `never`. */
  retryAfter?: 'sometimes' | 'always' | 'never';
  /** How long `stall` holds a request before answering it normally (default: forever, until the client or close() ends it). */
  stallMs?: number;
  /** Lifetime of a storage URL handed out by `redirectToStorage` (default 60 s); afterwards it answers 403. */
  storageTtlMs?: number;
  /**
   * Host name used in storage URLs (default `127.0.0.1`); the proxy's port is appended. Use
   * `localhost` to make storage a different origin than the registry (a client must then not
   * send the registry's Authorization there).
   */
  storageHostname?: string;
  /** `slowBody`: bytes per write (default 4096). */
  slowBodyChunkBytes?: number;
  /** `slowBody`: pause after each write (default 100 ms). */
  slowBodyDelayMs?: number;
  /**
   * Matching requests (all methods) always answer 307 to `<scheme>://<proxy host><path>`, before
   * any random fault is considered (default match: the fault match). See redirectToScheme().
   */
  schemeRedirect?: { scheme: string; match?: RequestMatcher } | undefined;
}

/** What happened to one request (kept for the last 10 000 requests). */
export interface FaultRecord {
  method: string;
  /** Path and query as the client sent it. */
  url: string;
  range: string | undefined;
  /** The fault applied, or what else answered the request. */
  outcome: FaultKind | 'passed' | 'loopHop' | 'storageDenied' | 'schemeRedirect';
  /** Sub-choice or reason, e.g. `before-headers`, `mid-body@1234`, `not-applicable:truncate`. */
  detail?: string;
}

export interface FaultProxyStats {
  /** Every request received (storage URLs included). */
  requests: number;
  /** Faults applied, by kind (a redirect loop counts once, its hops in loopHops). */
  faults: Record<FaultKind, number>;
  /** Requests forwarded unchanged (including those whose drawn fault did not apply, e.g. `flip` on a HEAD). */
  passed: number;
  /** Follow-ups of a redirect loop answered with another 307. */
  loopHops: number;
  /** Requests to storage URLs (valid or not). */
  storageRequests: number;
  /** Storage requests that carried an Authorization header (a client leaking registry credentials). */
  storageWithAuthorization: number;
  /** Storage requests refused with 403 (expired or unknown token). */
  storageDenied: number;
  /** Answers from the schemeRedirect option. */
  schemeRedirects: number;
  /** Per-request outcomes, oldest first. */
  log: FaultRecord[];
}

export interface FaultProxy {
  /** `http://127.0.0.1:<port>` */
  readonly url: string;
  /** `127.0.0.1:<port>` */
  readonly host: string;
  readonly port: number;
  readonly stats: FaultProxyStats;
  /** The options in force (a copy). */
  readonly options: Readonly<FaultProxyOptions>;
  /** Changes options mid-test (applies to requests that arrive afterwards). */
  setOptions(partial: Partial<FaultProxyOptions>): void;
  /** Makes every storage URL handed out so far answer 403 from now on. */
  expireStorageUrls(): void;
  /** Zeroes the stats. */
  resetStats(): void;
  /** Closes the server and destroys every open socket (client and upstream); never hangs. Idempotent. */
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------
// Helpers

/** Default fault match: GET/HEAD of a blob (not an upload). */
export const BLOB_GET: RequestMatcher = (method, path) =>
  (method === 'GET' || method === 'HEAD') && /^\/v2\/.+\/blobs\/(?!uploads\/)[^/]+$/.test(path);

/** mulberry32: a small fast 32-bit PRNG, enough for choosing faults. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function seedFor(...parts: readonly (string | number)[]): number {
  return createHash('sha256').update(parts.join('\u0000')).digest().readUInt32LE(0);
}

/** Makes a matching request answer 307 to `<scheme>://<proxy host><path>` (e.g. `ftp`), to check a client refuses it. */
export function redirectToScheme(proxy: FaultProxy, scheme: string, match?: RequestMatcher): void {
  proxy.setOptions({ schemeRedirect: { scheme, match } });
}

const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'te', 'trailer', 'upgrade', 'proxy-authorization', 'proxy-authenticate']);

function copyHeaders(h: http.IncomingHttpHeaders, drop: readonly string[] = []): http.OutgoingHttpHeaders {
  const out: http.OutgoingHttpHeaders = {};
  for (const [k, v] of Object.entries(h)) {
    if (v === undefined || HOP_BY_HOP.has(k) || drop.includes(k)) continue;
    out[k] = v;
  }
  return out;
}

const LOOP_PARAM = '_faultproxy_loop';
const STORAGE_PREFIX = '/_storage/';
const MAX_LOG = 10_000;

interface StorageGrant {
  expiresAt: number;
  authorization: string | undefined;
}

function emptyStats(): FaultProxyStats {
  const faults = {} as Record<FaultKind, number>;
  for (const k of FAULT_KINDS) faults[k] = 0;
  return { requests: 0, faults, passed: 0, loopHops: 0, storageRequests: 0, storageWithAuthorization: 0, storageDenied: 0, schemeRedirects: 0, log: [] };
}

function validate(o: FaultProxyOptions): void {
  if (!(o.rate >= 0 && o.rate <= 1)) throw new RangeError(`fault proxy: rate must be within 0..1, got ${o.rate}`);
  if (!Number.isInteger(o.seed)) throw new RangeError(`fault proxy: seed must be an integer, got ${o.seed}`);
  for (const f of o.faults) if (!FAULT_KINDS.includes(f)) throw new RangeError(`fault proxy: unknown fault kind ${String(f)}`);
  const u = new URL(o.upstream);
  if (u.protocol !== 'http:') throw new RangeError(`fault proxy: upstream must be http://, got ${o.upstream}`);
}

// ---------------------------------------------------------------------------------------
// The proxy

/** One request in flight: aborted when its client goes away or the proxy closes. */
interface Exchange {
  req: http.IncomingMessage;
  res: http.ServerResponse;
  signal: AbortSignal;
  rec: FaultRecord;
}

class Proxy implements FaultProxy {
  url = '';
  host = '';
  port = 0;
  stats: FaultProxyStats = emptyStats();
  private opts: FaultProxyOptions;
  private upstreamUrl: URL;
  private readonly server: http.Server;
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  private readonly sockets = new Set<net.Socket>();
  private readonly closing = new AbortController();
  private readonly seen = new Map<string, number>();
  private readonly grants = new Map<string, StorageGrant>();
  private grantCounter = 0;
  private closed: Promise<void> | undefined;

  constructor(opts: FaultProxyOptions) {
    validate(opts);
    this.opts = { ...opts, faults: [...opts.faults] };
    this.upstreamUrl = new URL(opts.upstream);
    this.server = http.createServer((req, res) => this.handle(req, res));
    this.server.on('connection', (s: net.Socket) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
    // A client that resets us mid-request must not crash the test process.
    this.server.on('clientError', (_e, s: net.Socket) => s.destroy());
  }

  get options(): Readonly<FaultProxyOptions> {
    return { ...this.opts, faults: [...this.opts.faults] };
  }

  async listen(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(0, '127.0.0.1', () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    this.server.unref(); // a forgotten close() must not keep the test process alive
    this.port = (this.server.address() as net.AddressInfo).port;
    this.host = `127.0.0.1:${this.port}`;
    this.url = `http://${this.host}`;
  }

  setOptions(partial: Partial<FaultProxyOptions>): void {
    const next: FaultProxyOptions = { ...this.opts, ...partial, faults: [...(partial.faults ?? this.opts.faults)] };
    validate(next);
    this.opts = next;
    this.upstreamUrl = new URL(next.upstream);
  }

  expireStorageUrls(): void {
    for (const g of this.grants.values()) g.expiresAt = 0;
  }

  resetStats(): void {
    this.stats = emptyStats();
  }

  close(): Promise<void> {
    this.closed ??= (async () => {
      this.closing.abort();
      const done = new Promise<void>((resolve) => this.server.close(() => resolve()));
      this.server.closeAllConnections();
      for (const s of this.sockets) s.destroy();
      this.agent.destroy();
      // server.close() waits for its sockets' 'close'; they are destroyed, but never wait long.
      await Promise.race([done, sleep(1000, undefined, { ref: false })]);
    })();
    return this.closed;
  }

  // -------------------------------------------------------------------------------------

  private record(rec: FaultRecord): void {
    this.stats.log.push(rec);
    if (this.stats.log.length > MAX_LOG) this.stats.log.splice(0, this.stats.log.length - MAX_LOG);
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.stats.requests++;
    const method = req.method ?? 'GET';
    const rawUrl = req.url ?? '/';
    const q = rawUrl.indexOf('?');
    const path = q < 0 ? rawUrl : rawUrl.slice(0, q);
    const range = typeof req.headers.range === 'string' ? req.headers.range : undefined;
    const rec: FaultRecord = { method, url: rawUrl, range, outcome: 'passed' };
    this.record(rec);
    const ac = new AbortController();
    res.on('close', () => ac.abort());
    const signal = AbortSignal.any([ac.signal, this.closing.signal]);
    const ex: Exchange = { req, res, signal, rec };
    try {
      this.route(ex, method, rawUrl, path, range);
    } catch (e) {
      this.fail(ex, e);
    }
  }

  private route(ex: Exchange, method: string, rawUrl: string, path: string, range: string | undefined): void {
    const o = this.opts;
    if (path.startsWith(STORAGE_PREFIX)) return this.storage(ex, method, rawUrl);

    const sr = o.schemeRedirect;
    if (sr !== undefined && (sr.match ?? o.match ?? BLOB_GET)(method, path)) {
      this.stats.schemeRedirects++;
      ex.rec.outcome = 'schemeRedirect';
      return this.redirect(ex, `${sr.scheme}://${this.host}${rawUrl}`);
    }

    const params = new URLSearchParams(rawUrl.slice(path.length + 1));
    const loop = params.get(LOOP_PARAM);
    if (loop !== null) {
      // Once in a loop, always in the loop.
      this.stats.loopHops++;
      ex.rec.outcome = 'loopHop';
      params.set(LOOP_PARAM, String(Number(loop) + 1));
      return this.redirect(ex, `${this.url}${path}?${params.toString()}`);
    }

    const matched = (o.match ?? BLOB_GET)(method, path);
    const rng = this.rngFor(method, path, range);
    const kind = matched ? this.draw(rng) : undefined;
    if (kind === undefined) return this.pass(ex, rawUrl, {});
    this.apply(ex, kind, rng, method, path, rawUrl, range);
  }

  /** Per-request PRNG: reproducible per (seed, method, path, range, occurrence). */
  private rngFor(method: string, path: string, range: string | undefined): () => number {
    const key = `${method} ${path} ${range ?? ''}`;
    const n = (this.seen.get(key) ?? 0) + 1;
    this.seen.set(key, n);
    return mulberry32(seedFor(this.opts.seed, key, n));
  }

  private draw(rng: () => number): FaultKind | undefined {
    const o = this.opts;
    const hit = rng() < o.rate;
    const pick = rng();
    if (!hit || o.faults.length === 0) return undefined;
    return o.faults[Math.min(o.faults.length - 1, Math.floor(pick * o.faults.length))];
  }

  private apply(
    ex: Exchange,
    kind: FaultKind,
    rng: () => number,
    method: string,
    path: string,
    rawUrl: string,
    range: string | undefined,
    storage?: Pick<PassOptions, 'authorization'>,
  ): void {
    const o = this.opts;
    const hasBody = method !== 'HEAD';
    const viaStorage = storage !== undefined;
    const pass = (p: PassOptions): void => this.pass(ex, rawUrl, { ...storage, ...p });
    const notApplicable = (): void => {
      ex.rec.detail = `not-applicable:${kind}`;
      pass({});
    };
    const applied = (detail?: string): void => {
      this.stats.faults[kind]++;
      ex.rec.outcome = kind;
      if (detail !== undefined) ex.rec.detail = detail;
    };
    switch (kind) {
      case 'reset': {
        const midBody = hasBody && rng() < 0.5;
        if (!midBody) {
          applied('before-headers');
          ex.req.resume();
          ex.req.socket.resetAndDestroy();
          return;
        }
        // The cut point is chosen once the length is known (in pass()).
        return pass({ cut: { how: 'reset', at: rng() }, onApplied: (d) => applied(d) });
      }
      case 'stall': {
        applied(o.stallMs === undefined ? 'forever' : `${o.stallMs}ms`);
        if (o.stallMs === undefined) {
          ex.req.resume();
          return; // until the client or close() ends it
        }
        sleep(o.stallMs, undefined, { signal: ex.signal }).then(
          () => pass({}),
          () => undefined,
        );
        return;
      }
      case 'status500':
      case 'status503':
      case 'status429': {
        const status = kind === 'status500' ? 500 : kind === 'status503' ? 503 : 429;
        const code = status === 500 ? 'UNKNOWN' : status === 503 ? 'UNAVAILABLE' : 'TOOMANYREQUESTS';
        const message = status === 500 ? 'unknown error' : status === 503 ? 'service unavailable' : 'too many requests';
        const headers: http.OutgoingHttpHeaders = { 'content-type': 'application/json; charset=utf-8', 'docker-distribution-api-version': 'registry/2.0' };
        const ra = rng();
        const mode = o.retryAfter ?? 'sometimes';
        if (status !== 500 && (mode === 'always' || (mode === 'sometimes' && ra < 0.5))) headers['retry-after'] = String(o.retryAfterSeconds ?? 1);
        applied(headers['retry-after'] !== undefined ? `retry-after=${String(headers['retry-after'])}` : undefined);
        ex.req.resume();
        const body = JSON.stringify({ errors: [{ code, message: `${message} (injected by fault proxy)`, detail: null }] }) + '\n';
        headers['content-length'] = Buffer.byteLength(body);
        ex.res.writeHead(status, headers);
        ex.res.end(hasBody ? body : undefined);
        return;
      }
      case 'truncate':
        if (!hasBody) return notApplicable();
        return pass({ cut: { how: 'truncate', at: rng() }, onApplied: (d) => applied(d) });
      case 'flip':
        if (!hasBody) return notApplicable();
        return pass({ flip: { at: rng(), mask: 1 + Math.floor(rng() * 255) }, onApplied: (d) => applied(d) });
      case 'ignoreRange':
        if (range === undefined) return notApplicable();
        applied();
        return pass({ dropRange: true });
      case 'redirectLoop': {
        if (viaStorage) return notApplicable();
        applied();
        const params = new URLSearchParams(rawUrl.slice(path.length + 1));
        params.set(LOOP_PARAM, '1');
        return this.redirect(ex, `${this.url}${path}?${params.toString()}`);
      }
      case 'redirectToStorage':
        if (viaStorage || method !== 'GET') return notApplicable();
        return this.redirectToStorage(ex, rawUrl, () => applied());
      case 'slowBody':
        if (!hasBody) return notApplicable();
        applied(`${o.slowBodyChunkBytes ?? 4096}B/${o.slowBodyDelayMs ?? 100}ms`);
        return pass({ slow: true });
    }
  }

  private redirect(ex: Exchange, location: string): void {
    ex.req.resume();
    ex.res.writeHead(307, { location, 'content-length': 0 });
    ex.res.end();
  }

  /** Like a registry backed by S3: check the blob exists (HEAD upstream), then 307 to a signed URL. */
  private redirectToStorage(ex: Exchange, rawUrl: string, applied: () => void): void {
    const headers = this.upstreamHeaders(ex.req, ['range', 'if-range']);
    const head = http.request(this.upstreamTarget(rawUrl), { method: 'HEAD', headers, agent: this.agent, signal: ex.signal }, (up) => {
      up.resume();
      if (up.statusCode !== 200) {
        // Not there, or auth needed: let the registry answer the GET itself.
        ex.rec.detail = `not-applicable:redirectToStorage (HEAD ${up.statusCode ?? 0})`;
        return this.pass(ex, rawUrl, {});
      }
      applied();
      const token = createHash('sha256').update(`${this.opts.seed} ${++this.grantCounter} ${rawUrl}`).digest('hex').slice(0, 24);
      const auth = ex.req.headers.authorization;
      this.grants.set(token, { expiresAt: Date.now() + (this.opts.storageTtlMs ?? 60_000), authorization: auth });
      const host = `${this.opts.storageHostname ?? '127.0.0.1'}:${this.port}`;
      this.redirect(ex, `http://${host}${STORAGE_PREFIX}${token}${rawUrl}`);
    });
    head.on('error', (e) => this.fail(ex, e));
    head.end();
  }

  /** A storage URL: `/_storage/<token>/<registry path and query>`. */
  private storage(ex: Exchange, method: string, rawUrl: string): void {
    this.stats.storageRequests++;
    if (ex.req.headers.authorization !== undefined) this.stats.storageWithAuthorization++;
    const rest = rawUrl.slice(STORAGE_PREFIX.length);
    const slash = rest.indexOf('/');
    const token = slash < 0 ? rest : rest.slice(0, slash);
    const target = slash < 0 ? '/' : rest.slice(slash);
    const grant = this.grants.get(token);
    ex.req.resume();
    if (method !== 'GET' && method !== 'HEAD') {
      ex.res.writeHead(405, { 'content-type': 'application/xml', allow: 'GET, HEAD' });
      ex.res.end('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>MethodNotAllowed</Code></Error>\n');
      return;
    }
    if (grant === undefined || grant.expiresAt <= Date.now()) {
      this.stats.storageDenied++;
      ex.rec.outcome = 'storageDenied';
      ex.rec.detail = grant === undefined ? 'unknown token' : 'expired';
      const body = `<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>${grant === undefined ? 'Invalid signature' : 'Request has expired'}</Message></Error>\n`;
      ex.res.writeHead(403, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body) });
      ex.res.end(method === 'HEAD' ? undefined : body);
      return;
    }
    const q = target.indexOf('?');
    const path = q < 0 ? target : target.slice(0, q);
    const range = typeof ex.req.headers.range === 'string' ? ex.req.headers.range : undefined;
    // The signature stands in for credentials: the registry's Authorization is used upstream, the client's ignored.
    const override = { authorization: grant.authorization };
    const matched = (this.opts.match ?? BLOB_GET)(method, path);
    const rng = this.rngFor(method, `${STORAGE_PREFIX}${path}`, range);
    const kind = matched ? this.draw(rng) : undefined;
    if (kind === undefined) return this.pass(ex, target, { authorization: override });
    // Faults other than redirects apply to storage too.
    this.apply(ex, kind, rng, method, path, target, range, { authorization: override });
  }

  private upstreamTarget(pathAndQuery: string): URL {
    return new URL(pathAndQuery, this.upstreamUrl);
  }

  private upstreamHeaders(req: http.IncomingMessage, drop: readonly string[]): http.OutgoingHttpHeaders {
    const h = copyHeaders(req.headers, ['host', ...drop]);
    h.host = this.upstreamUrl.host;
    return h;
  }

  /** Location pointing at upstream → the same path on the proxy (the client stays on the proxy). */
  private rewriteLocation(loc: string): string {
    try {
      const u = new URL(loc);
      if (u.origin === this.upstreamUrl.origin) return `${this.url}${u.pathname}${u.search}${u.hash}`;
    } catch {
      // relative: resolves against the proxy already
    }
    return loc;
  }

  /**
   * Forwards the request upstream and streams the answer back, optionally mangling the body:
   * cut it short (truncate: end the socket; reset: RST), flip one byte, or send it slowly.
   */
  private pass(ex: Exchange, pathAndQuery: string, how: PassOptions): void {
    const { req, res } = ex;
    if (how.onApplied === undefined && ex.rec.outcome === 'passed') this.stats.passed++;
    const headers = this.upstreamHeaders(req, how.dropRange === true ? ['range', 'if-range'] : []);
    if (how.authorization !== undefined) {
      delete headers.authorization;
      if (how.authorization.authorization !== undefined) headers.authorization = how.authorization.authorization;
    }
    const method = req.method ?? 'GET';
    const up = http.request(this.upstreamTarget(pathAndQuery), { method, headers, agent: this.agent, signal: ex.signal }, (upRes) => {
      void this.respond(ex, method, upRes, how);
    });
    up.on('error', (e) => this.fail(ex, e));
    if (req.readableEnded) up.end();
    else req.pipe(up);
  }

  private async respond(ex: Exchange, method: string, upRes: http.IncomingMessage, how: PassOptions): Promise<void> {
    const { res, signal } = ex;
    const status = upRes.statusCode ?? 502;
    const out = copyHeaders(upRes.headers);
    if (typeof out.location === 'string') out.location = this.rewriteLocation(out.location);
    const lengthHeader = upRes.headers['content-length'];
    const length = lengthHeader !== undefined ? Number(lengthHeader) : undefined;
    const bodyOk = method !== 'HEAD' && (status === 200 || status === 206) && length !== 0;

    let cutAt: number | undefined;
    let flipAt: number | undefined;
    if (how.cut !== undefined || how.flip !== undefined) {
      if (!bodyOk) {
        // Nothing to mangle (an error answer, an empty body): the fault does not apply.
        ex.rec.detail = `not-applicable (status ${status}, length ${lengthHeader ?? 'unknown'})`;
        this.stats.passed++;
      } else if (how.cut !== undefined) {
        // Unknown length: cut somewhere in the first 64 KiB.
        cutAt = Math.floor(how.cut.at * (length ?? 65536));
        how.onApplied?.(`${how.cut.how === 'reset' ? 'mid-body' : 'truncate'}@${cutAt}`);
      } else if (how.flip !== undefined) {
        flipAt = Math.floor(how.flip.at * (length ?? 65536));
        how.onApplied?.(`flip@${flipAt}^0x${how.flip.mask.toString(16)}`);
      }
    }
    const o = this.opts;
    const slow = how.slow === true ? { chunk: Math.max(1, o.slowBodyChunkBytes ?? 4096), delayMs: o.slowBodyDelayMs ?? 100 } : undefined;

    res.writeHead(status, upRes.statusMessage, out);
    if (cutAt !== undefined || slow !== undefined) res.flushHeaders();

    const write = (b: Buffer): Promise<void> =>
      new Promise((resolve, reject) => {
        if (signal.aborted) return reject(new Error('aborted'));
        const onAbort = (): void => reject(new Error('aborted'));
        signal.addEventListener('abort', onAbort, { once: true });
        res.write(b, (err) => {
          signal.removeEventListener('abort', onAbort);
          if (err) reject(err);
          else resolve();
        });
      });

    let sent = 0;
    try {
      for await (const c of upRes) {
        let chunk = c as Buffer;
        if (flipAt !== undefined && flipAt >= sent && flipAt < sent + chunk.length) {
          chunk = Buffer.from(chunk); // do not touch a buffer someone else may hold
          chunk[flipAt - sent] ^= how.flip?.mask ?? 0xff;
        }
        if (cutAt !== undefined && sent + chunk.length > cutAt) {
          const part = chunk.subarray(0, cutAt - sent);
          if (part.length > 0) await write(part);
          sent += part.length;
          break;
        }
        if (slow !== undefined) {
          for (let i = 0; i < chunk.length; i += slow.chunk) {
            await write(chunk.subarray(i, i + slow.chunk));
            await sleep(slow.delayMs, undefined, { signal });
          }
        } else if (!res.write(chunk)) {
          await new Promise<void>((resolve, reject) => {
            const onAbort = (): void => reject(new Error('aborted'));
            signal.addEventListener('abort', onAbort, { once: true });
            res.once('drain', () => {
              signal.removeEventListener('abort', onAbort);
              resolve();
            });
          });
        }
        sent += chunk.length;
      }
      if (cutAt === undefined) {
        res.end();
        return;
      }
      // Cut: the upstream connection is mid-response, so it cannot be reused.
      upRes.destroy();
      const socket = res.socket;
      if (socket === null) return;
      if (how.cut?.how === 'truncate') {
        socket.end(); // FIN after what was written: a clean close, too early
      } else {
        await sleep(10, undefined, { signal }); // let the bytes leave before the RST
        socket.resetAndDestroy();
      }
    } catch {
      upRes.destroy();
      res.destroy();
    }
  }

  private fail(ex: Exchange, e: unknown): void {
    if (ex.signal.aborted) return; // the client left or we are closing: nothing to tell
    if (!ex.res.headersSent) {
      const body = JSON.stringify({ errors: [{ code: 'UNKNOWN', message: `fault proxy: upstream failed: ${(e as Error).message}`, detail: null }] }) + '\n';
      ex.res.writeHead(502, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
      ex.res.end(body);
    } else {
      ex.res.destroy();
    }
  }
}

interface PassOptions {
  dropRange?: boolean;
  cut?: { how: 'truncate' | 'reset'; at: number };
  flip?: { at: number; mask: number };
  slow?: boolean;
  /** Replace the client's Authorization upstream (storage URLs): the value, or none. */
  authorization?: { authorization: string | undefined };
  /** Called with a detail when a body fault is actually applied. */
  onApplied?: (detail: string) => void;
}

/** Starts a fault proxy on a free loopback port. */
export async function startFaultProxy(opts: FaultProxyOptions): Promise<FaultProxy> {
  const p = new Proxy(opts);
  await p.listen();
  return p;
}

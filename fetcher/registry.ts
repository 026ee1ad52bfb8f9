/**
 * The OCI distribution client: a {@link RegistryClient} holds connections, credentials and tokens;
 * a {@link Repository} (one image repository on one registry) resolves and fetches manifests,
 * streams and range-reads blobs, pushes blobs and manifests, and lists referrers (the API or the
 * `sha256-<hex>` fallback tag). Everything fetched is checked against its digest before use.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { AuthError, FetcherError, IntegrityError, NetworkError, NotFoundError, ProtocolError, RegistryError, TimeoutError } from './errors.js';
import { Authorizer, repositoryScope, parseTokenResponse, basicAuthorization, type Challenge, type TokenResponse } from './auth.js';
import { resolveCredentials, type Credentials, type CredentialsOptions } from './credentials.js';
import { prefersHttps, readHostsConfig, withScheme, type HostCapability, type HostConfig, type HostsConfig } from './hosts.js';
import {
  DEFAULT_RETRY,
  Transport,
  discardBody,
  header,
  markTransient,
  mapNetworkError,
  readBody,
  safeUrl,
  statusError,
  withRetries,
  isTransient,
  noteRetry,
  retryDelay,
  type HttpResponse,
  type RetryObserver,
  type RetryOperation,
  type RetryOptions,
  type Timeouts,
} from './http.js';
import { nullLogger, type Logger } from './log.js';
import { MANIFEST_ACCEPT, MEDIA_TYPE_OCI_INDEX, parseManifest, sha256Digest, type Descriptor, type ImageIndex, type ParsedManifest } from './manifest.js';
import { parseReference, registryApiHost, type ImageReference } from './reference.js';

export interface RegistryClientOptions {
  /** containerd `certs.d` directory with `<host>/hosts.toml`; default `/etc/containerd/certs.d`; '' for none. */
  hostsDir?: string;
  /** Talk plain HTTP to registries without a hosts.toml (`--plain-http`). */
  plainHttp?: boolean;
  credentials?: CredentialsOptions;
  timeouts?: Partial<Timeouts>;
  retry?: Partial<RetryOptions>;
  /** Parallel connections per origin. Default 8. */
  connectionsPerHost?: number;
  /** Largest manifest or index accepted. Default 4 MiB. */
  maxManifestBytes?: number;
  /** Largest single request that adjacent range reads are merged into. Default 16 MiB. */
  maxCoalescedBytes?: number;
  userAgent?: string;
  logger?: Logger;
  /**
   * Told about every retry of a registry request (the operation, the cause, the delay), e.g. to
   * count them in metrics. Must not throw.
   */
  onRetry?: RetryObserver;
}

export const DEFAULT_HOSTS_DIR = '/etc/containerd/certs.d';
export const DEFAULT_MAX_MANIFEST_BYTES = 4 << 20;
const MAX_REDIRECTS = 5;
/** A storage URL a registry redirected a blob to is reused for range reads this long at most. */
const REDIRECT_TTL_MS = 5 * 60_000;
const TOKEN_ANSWER_MAX = 1 << 20;
/**
 * Body buffering of a whole-blob download before the socket is paused. undici's 64 KiB default
 * pauses a fast (loopback, LAN) sender each time the consumer hashes or inflates a chunk. This
 * sets how much may queue, not the chunk size: chunks stay the socket's 64 KiB reads (Node's
 * fixed read size) either way. Against the loopback registry on a quiet 2-core machine, 1 MiB
 * ran at 0.83x curl vs 0.58x for 64 KiB (2.1 vs 2.4 s CPU per GB; 18 interleaved runs each);
 * on a loaded one the two were within the noise.
 */
const BLOB_STREAM_HIGH_WATER_MARK = 1 << 20;

export interface FetchedManifest {
  descriptor: Descriptor;
  bytes: Buffer;
  parsed: ParsedManifest;
}

export interface ReadRangeOptions {
  /** Digest of exactly these bytes (a zTOC span's digest): checked, refetched on mismatch. */
  digest?: string;
  signal?: AbortSignal;
}

export type PushBlobResult = 'exists' | 'mounted' | 'uploaded';

export interface PushBlobOptions {
  /** Repositories on the same registry to mount the blob from instead of uploading it. */
  mountFrom?: readonly string[];
  /** Upload in PATCH chunks of this size; 0 (default for buffers) uploads in one PUT. */
  chunkSize?: number;
  /** Called with bytes sent so far. */
  onProgress?: (sent: number) => void;
}

export interface PushManifestResult {
  descriptor: Descriptor;
  /** The registry processed the `subject` (answered `OCI-Subject`): it serves the referrers API. */
  subjectAccepted: boolean;
  /** The fallback referrers tag was written (the registry has no referrers API). */
  referrersTagUpdated: boolean;
}

export interface ReferrersResult {
  descriptors: Descriptor[];
  /** Where they came from: the referrers API or the `sha256-<hex>` fallback tag. */
  source: 'api' | 'tag';
}

/** Holds connections, credentials and tokens for any number of repositories. */
export class RegistryClient {
  readonly transport: Transport;
  readonly retry: RetryOptions;
  readonly logger: Logger;
  readonly maxManifestBytes: number;
  readonly maxCoalescedBytes: number;
  private readonly hostsDir: string;
  private readonly plainHttp: boolean;
  private readonly credentialsOptions: CredentialsOptions;
  private readonly configsByHost = new Map<string, Promise<HostsConfig>>();
  /** The hosts.toml each registry host is (or would be) configured in, for TLS error messages. */
  private readonly tlsConfigFiles = new Map<string, string>();
  /** Endpoints tried over HTTPS first (see `prefersHttps`): the scheme found for each, once. */
  private readonly decidedSchemes = new WeakMap<HostConfig, Promise<HostConfig>>();
  private readonly credentialsByHost = new Map<string, Promise<Credentials | undefined>>();
  private readonly authorizers = new Map<string, Authorizer>();
  private readonly warnedNoRange = new Set<string>();
  private readonly onRetry: RetryObserver | undefined;

  constructor(opts: RegistryClientOptions = {}) {
    this.logger = opts.logger ?? nullLogger;
    this.onRetry = opts.onRetry;
    this.transport = new Transport({ timeouts: opts.timeouts, connectionsPerHost: opts.connectionsPerHost, userAgent: opts.userAgent, logger: this.logger });
    this.retry = { ...DEFAULT_RETRY, ...opts.retry };
    this.maxManifestBytes = opts.maxManifestBytes ?? DEFAULT_MAX_MANIFEST_BYTES;
    this.maxCoalescedBytes = opts.maxCoalescedBytes ?? 16 << 20;
    this.hostsDir = opts.hostsDir ?? DEFAULT_HOSTS_DIR;
    this.plainHttp = opts.plainHttp ?? false;
    this.credentialsOptions = opts.credentials ?? {};
  }

  /** A repository by reference (`host/repo[:tag][@digest]`); the tag or digest is its default target. */
  repository(ref: ImageReference | string): Repository {
    return new Repository(this, typeof ref === 'string' ? parseReference(ref) : ref);
  }

  /** @internal Endpoints for a registry host, mirrors first. */
  endpoints(host: string): Promise<HostConfig[]> {
    let p = this.configsByHost.get(host);
    if (p === undefined) {
      p = readHostsConfig(this.hostsDir === '' ? undefined : this.hostsDir, host, { defaultScheme: this.plainHttp ? 'http' : undefined });
      this.configsByHost.set(host, p);
      p.then(
        (config) => {
          for (const warning of config.warnings) this.logger.warn('hosts configuration', { host, warning });
          const file =
            config.dir !== undefined
              ? join(config.dir, 'hosts.toml')
              : this.hostsDir === ''
                ? `<a directory given with --hosts-dir>/${host}/hosts.toml`
                : join(this.hostsDir, host, 'hosts.toml');
          this.tlsConfigFiles.set(host, file);
        },
        () => this.configsByHost.delete(host),
      );
    }
    return p.then((config) => config.endpoints);
  }

  /** @internal Where the TLS of registry `host` is configured (its hosts.toml), for error messages. */
  tlsConfigFile(host: string): string | undefined {
    return this.tlsConfigFiles.get(host);
  }

  /**
   * @internal The endpoint to send to: itself, or for an endpoint to try over HTTPS first, the
   * HTTPS or the HTTP one, as a TLS probe of its server found (once per endpoint; a failed probe
   * is not remembered).
   */
  effectiveEndpoint(endpoint: HostConfig, subject: string): Promise<HostConfig> {
    if (!prefersHttps(endpoint)) return Promise.resolve(endpoint);
    let p = this.decidedSchemes.get(endpoint);
    if (p === undefined) {
      p = this.transport.probeTls(new URL(withScheme(endpoint, 'https').url), subject, endpoint.dialTimeoutMs).then((scheme) => {
        this.logger.info(scheme === 'https' ? 'endpoint speaks TLS: using https' : 'endpoint does not speak TLS: using plain http', { endpoint: endpoint.url });
        const decided = scheme === 'https' ? withScheme(endpoint, 'https') : endpoint;
        this.decidedSchemes.set(decided, Promise.resolve(decided));
        return decided;
      });
      this.decidedSchemes.set(endpoint, p);
      p.catch(() => this.decidedSchemes.delete(endpoint));
    }
    return p;
  }

  /** @internal */
  credentials(host: string): Promise<Credentials | undefined> {
    let p = this.credentialsByHost.get(host);
    if (p === undefined) {
      p = resolveCredentials(host, this.credentialsOptions);
      this.credentialsByHost.set(host, p);
      p.catch(() => this.credentialsByHost.delete(host));
    }
    return p;
  }

  /** @internal The authorizer of one endpoint (its challenge and tokens). */
  authorizer(endpoint: HostConfig): Authorizer {
    let a = this.authorizers.get(endpoint.url);
    if (a === undefined) {
      a = new Authorizer(
        (host) => this.credentials(host),
        (challenge, scopes, credentials) => this.fetchToken(endpoint, challenge, scopes, credentials),
      );
      this.authorizers.set(endpoint.url, a);
    }
    return a;
  }

  /** @internal Runs `attempt` in the retry loop (see withRetries), each retry reported as `operation`. */
  retrying<T>(operation: RetryOperation, subject: string, attempts: number | undefined, attempt: (n: number) => Promise<T>, signal?: AbortSignal): Promise<T> {
    const retry = attempts === undefined ? this.retry : { ...this.retry, attempts: Math.max(1, attempts) };
    return withRetries(subject, retry, this.logger, attempt, signal, { operation, observer: this.onRetry });
  }

  /** @internal Reports a retry made by a loop of its own (a resumed download). */
  noteRetry(operation: RetryOperation, subject: string, err: unknown, retry: number, delayMs: number): void {
    noteRetry(this.logger, this.onRetry, operation, subject, err, retry, delayMs);
  }

  /** @internal Warns once per endpoint that it ignores Range. */
  noteRangeIgnored(endpoint: string): void {
    if (this.warnedNoRange.has(endpoint)) return;
    this.warnedNoRange.add(endpoint);
    this.logger.warn('registry ignored a Range request and sent the whole blob; reads from it will be slow', { endpoint });
  }

  private async fetchToken(endpoint: HostConfig, challenge: Challenge, scopes: readonly string[], credentials: Credentials | undefined): Promise<TokenResponse> {
    const realm = new URL(challenge.params.realm!);
    const subject = `token endpoint ${safeUrl(realm)}`;
    const extraHeaders = flattenHeaders(endpoint.headers);
    // One attempt: every operation that needs a token already runs in a retry loop of its own
    // (a failed token fetch is not cached, so its next attempt asks again). Retrying here too
    // would multiply the attempts, and the time to fail, by up to 3.
    return withRetries(subject, { ...this.retry, attempts: 1 }, this.logger, async () => {
      const url = new URL(realm);
      const headers: Record<string, string> = { ...extraHeaders, accept: 'application/json' };
      let body: Uint8Array | undefined;
      let method = 'GET';
      if (credentials !== undefined && 'identityToken' in credentials) {
        // OAuth2 refresh-token grant, as docker and containerd do with identity tokens.
        method = 'POST';
        const form = new URLSearchParams({ grant_type: 'refresh_token', refresh_token: credentials.identityToken, client_id: 'soci-ts' });
        if (challenge.params.service !== undefined) form.set('service', challenge.params.service);
        if (scopes.length > 0) form.set('scope', scopes.join(' '));
        body = Buffer.from(form.toString());
        headers['content-type'] = 'application/x-www-form-urlencoded';
      } else {
        if (challenge.params.service !== undefined) url.searchParams.set('service', challenge.params.service);
        for (const s of scopes) url.searchParams.append('scope', s);
        const basic = credentials === undefined ? undefined : basicAuthorization(credentials);
        if (basic !== undefined) headers.authorization = basic;
      }
      const sent = Date.now();
      const res = await this.transport.send({ method, url, headers, body, tls: endpoint.scheme === 'https' ? endpoint : undefined }, subject);
      if (res.status !== 200) {
        const err = await statusError(res, subject, 'token request failed', this.transport.timeouts);
        if (res.status === 401 || res.status === 403) {
          throw new AuthError(subject, credentials === undefined ? 'token endpoint requires credentials (docker login or --user)' : 'token endpoint refused the credentials', {
            status: res.status,
            cause: err,
          });
        }
        if (isTransient(err)) throw err;
        throw new AuthError(subject, err.message.slice(subject.length + 2), { status: res.status, cause: err });
      }
      const text = (await readBody(res, subject, this.transport.timeouts, { max: TOKEN_ANSWER_MAX, what: 'token answer' })).toString('utf8');
      return parseTokenResponse(text, subject, sent);
    });
  }

  /** Closes every connection; requests in flight and later ones then fail (NetworkError, not retried). */
  close(): Promise<void> {
    return this.transport.close();
  }
}

function flattenHeaders(h: Record<string, string[]>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(h)) out[k.toLowerCase()] = v.join(', ');
  return out;
}

interface RangePart {
  offset: number;
  length: number;
  digest?: string;
  resolve: (b: Buffer) => void;
  reject: (e: unknown) => void;
}

interface Sent {
  res: HttpResponse;
  /** URL that answered (after redirects). */
  url: URL;
  endpoint: HostConfig;
}

interface SendOptions {
  method: string;
  /** Path under `/v2/<repository>/`, already escaped. */
  path: string;
  query?: Record<string, string>;
  headers?: Record<string, string>;
  body?: Uint8Array;
  capability: HostCapability;
  /** `pull` or `pull,push`. */
  actions: readonly string[];
  /** More scopes (e.g. pull on a repository to mount from). */
  extraScopes?: readonly string[];
  /** Follow redirects (blob GETs). */
  follow?: boolean;
  /** Response body buffering before the socket is paused (see HttpRequest.highWaterMark). */
  highWaterMark?: number;
  /** An absolute URL (an upload location) instead of `path`; it must be on the endpoint's origin or be followed with auth. */
  url?: URL;
  endpoint?: HostConfig;
  subject: string;
}

/** One repository on one registry. */
export class Repository {
  /** Storage URLs blobs were redirected to: digest → URL and until when it is reused. */
  private readonly redirects = new Map<string, { url: URL; until: number; endpoint: HostConfig }>();
  private readonly batches = new Map<string, { desc: Descriptor; parts: RangePart[] }>();
  private flushScheduled = false;

  constructor(
    readonly client: RegistryClient,
    readonly ref: ImageReference,
  ) {}

  get name(): string {
    return this.ref.repository;
  }

  private get logger(): Logger {
    return this.client.logger;
  }

  // ------------------------------------------------------------- requests

  /**
   * Sends one request to the first endpoint with the capability (mirrors, then the server),
   * authenticating as challenged, following redirects when asked. A mirror that fails or lacks
   * the content passes the request on to the next endpoint.
   */
  private async send(opts: SendOptions): Promise<Sent> {
    const all = await this.client.endpoints(this.ref.host);
    const endpoints = opts.endpoint !== undefined ? [opts.endpoint] : all.filter((e) => e.capabilities.includes(opts.capability));
    if (endpoints.length === 0) throw new FetcherError(this.ref.host, `no endpoint in hosts.toml has the "${opts.capability}" capability`);
    let lastError: unknown;
    for (let i = 0; i < endpoints.length; i++) {
      let endpoint = endpoints[i]!;
      const isLast = i === endpoints.length - 1;
      try {
        endpoint = await this.client.effectiveEndpoint(endpoint, opts.subject);
        const sent = await this.sendTo(endpoint, opts);
        if (!isLast && (sent.res.status === 404 || sent.res.status >= 500)) {
          discardBody(sent.res);
          this.logger.debug('mirror could not serve; trying the next endpoint', { endpoint: endpoint.url, status: sent.res.status });
          continue;
        }
        return sent;
      } catch (err) {
        if (isLast || !(err instanceof FetcherError) || err instanceof AuthError) throw err;
        lastError = err;
        this.logger.warn('mirror failed; trying the next endpoint', { endpoint: endpoint.url, error: err });
      }
    }
    throw lastError;
  }

  private baseUrl(endpoint: HostConfig, path: string, query?: Record<string, string>): URL {
    const url = new URL(`${endpoint.url}/${this.ref.repository}/${path}`);
    if (query !== undefined) for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v);
    // containerd tells a mirror which registry the image is from.
    if (endpoint.host !== registryApiHost(this.ref.host) && endpoint.host !== this.ref.host) url.searchParams.set('ns', this.ref.host);
    return url;
  }

  private async sendTo(endpoint: HostConfig, opts: SendOptions): Promise<Sent> {
    const authorizer = this.client.authorizer(endpoint);
    const scopes = [repositoryScope(this.ref.repository, opts.actions), ...(opts.extraScopes ?? [])];
    const transport = this.client.transport;
    const tls = endpoint.scheme === 'https' ? endpoint : undefined;
    let url = opts.url ?? this.baseUrl(endpoint, opts.path, opts.query);
    const origin = url.origin;
    const fixed = { ...flattenHeaders(endpoint.headers), ...opts.headers };
    const tlsConfigFile = this.client.tlsConfigFile(this.ref.host);
    let authAttempts = 0;
    for (let hops = 0; ; ) {
      const sameOrigin = url.origin === origin;
      const authorization = sameOrigin ? await authorizer.authorization(endpoint.host, scopes) : undefined;
      const headers = { ...(sameOrigin ? fixed : (opts.headers ?? {})) };
      if (authorization !== undefined) headers.authorization = authorization;
      const res = await transport.send(
        { method: opts.method, url, headers, body: opts.body, tls, connectTimeoutMs: endpoint.dialTimeoutMs, tlsConfigFile, highWaterMark: opts.highWaterMark },
        opts.subject,
      );
      if ((res.status === 401 || res.status === 403) && sameOrigin) {
        const challenge = header(res, 'www-authenticate');
        // A 403 is worth a new token only if a token was sent (it may have expired).
        const retry =
          authAttempts < 2 &&
          (res.status === 401 || authorization?.startsWith('Bearer ') === true) &&
          (await authorizer.refused(endpoint.host, challenge, authorization, `${opts.subject} (${endpoint.host})`));
        if (retry) {
          discardBody(res);
          authAttempts++;
          continue;
        }
        const err = await statusError(res, opts.subject, 'access denied', transport.timeouts);
        const creds = await this.client.credentials(endpoint.host);
        const hint = creds === undefined ? 'no credentials for this registry (docker login, or --user)' : 'the registry refused the credentials';
        throw new AuthError(opts.subject, `${hint}: HTTP ${res.status}${err.code === undefined ? '' : ` ${err.code}`}`, { status: res.status, code: err.code, cause: err });
      }
      if (res.status >= 300 && res.status < 400 && res.status !== 304 && opts.follow === true) {
        discardBody(res);
        const location = header(res, 'location');
        if (location === undefined) throw new ProtocolError(opts.subject, `HTTP ${res.status} redirect without a Location`);
        let next: URL;
        try {
          next = new URL(location, url);
        } catch (err) {
          throw new ProtocolError(opts.subject, 'redirect to an unparsable URL', { cause: err });
        }
        if (next.protocol !== 'http:' && next.protocol !== 'https:') {
          throw new ProtocolError(opts.subject, `redirect to a ${next.protocol.replace(/:$/, '')}: URL refused (only http and https are followed)`);
        }
        if (url.protocol === 'https:' && next.protocol === 'http:') {
          throw new ProtocolError(opts.subject, `redirect from https to plain http refused (${safeUrl(next)})`);
        }
        if (++hops > MAX_REDIRECTS) throw new ProtocolError(opts.subject, `more than ${MAX_REDIRECTS} redirects (a redirect loop?), last to ${safeUrl(next)}`);
        url = next;
        continue;
      }
      return { res, url, endpoint };
    }
  }

  // ------------------------------------------------------------- manifests

  /**
   * Fetches the manifest or index named by `reference` (a tag or digest; default: the
   * reference's digest, else its tag), checked against its digest (the one asked for, or the
   * `Docker-Content-Digest` the registry states for a tag) and the size limit.
   */
  async fetchManifest(reference?: string | Descriptor, opts: { attempts?: number } = {}): Promise<FetchedManifest> {
    const target = typeof reference === 'object' ? reference.digest : (reference ?? this.ref.digest ?? this.ref.tag ?? 'latest');
    const byDigest = target.includes(':');
    const subject = `${this.ref.name}${byDigest ? '@' : ':'}${target}`;
    const expectedSize = typeof reference === 'object' ? reference.size : undefined;
    const limit = this.client.maxManifestBytes;
    if (expectedSize !== undefined && expectedSize > limit) throw new ProtocolError(subject, `manifest of ${expectedSize} bytes is over the ${limit}-byte limit`);
    return this.client.retrying('manifest', subject, opts.attempts, async () => {
      const { res } = await this.send({
        method: 'GET',
        path: `manifests/${encodeURIComponent(target).replace(/%3A/g, ':')}`,
        headers: { accept: MANIFEST_ACCEPT },
        capability: byDigest ? 'pull' : 'resolve',
        actions: ['pull'],
        follow: true,
        subject,
      });
      if (res.status === 404) {
        const err = await statusError(res, subject, 'manifest not found', this.client.transport.timeouts);
        throw new NotFoundError(subject, 'manifest not found', { status: 404, code: err.code, cause: err });
      }
      if (res.status !== 200) throw await statusError(res, subject, 'fetching the manifest failed', this.client.transport.timeouts);
      const bytes = await readBody(res, subject, this.client.transport.timeouts, { max: limit, what: 'manifest' });
      const digest = sha256Digest(bytes);
      if (byDigest && digest !== target) {
        throw markTransient(new IntegrityError(subject, `manifest content has digest ${digest}, not the one asked for`));
      }
      const stated = header(res, 'docker-content-digest');
      if (!byDigest && stated !== undefined && stated.startsWith('sha256:') && stated !== digest) {
        throw markTransient(new IntegrityError(subject, `manifest content has digest ${digest}, but the registry says ${stated}`));
      }
      if (expectedSize !== undefined && bytes.length !== expectedSize) {
        throw new IntegrityError(subject, `manifest is ${bytes.length} bytes, its descriptor says ${expectedSize}`);
      }
      const parsed = parseManifest(bytes, header(res, 'content-type'), subject);
      return { descriptor: { mediaType: parsed.mediaType, digest, size: bytes.length }, bytes, parsed };
    });
  }

  /** The descriptor of a manifest by tag or digest, or undefined when it does not exist (HEAD). */
  async statManifest(reference: string): Promise<Descriptor | undefined> {
    const subject = `${this.ref.name}:${reference}`;
    return this.client.retrying('manifest', subject, undefined, async () => {
      const { res } = await this.send({ method: 'HEAD', path: `manifests/${reference}`, headers: { accept: MANIFEST_ACCEPT }, capability: 'resolve', actions: ['pull'], follow: true, subject });
      discardBody(res);
      if (res.status === 404) return undefined;
      if (res.status !== 200) throw await statusError(res, subject, 'HEAD manifest failed', this.client.transport.timeouts);
      const digest = header(res, 'docker-content-digest');
      const size = Number(header(res, 'content-length'));
      const mediaType = header(res, 'content-type');
      if (digest === undefined || !Number.isSafeInteger(size) || mediaType === undefined) {
        // Not every registry states these on HEAD: fetch instead.
        return (await this.fetchManifest(reference)).descriptor;
      }
      return { mediaType: mediaType.split(';')[0]!.trim(), digest, size };
    });
  }

  // ------------------------------------------------------------- blobs

  private blobSubject(digest: string): string {
    return `${this.ref.name}@${digest}`;
  }

  /** Size of a blob if the registry has it (HEAD), else undefined. */
  async statBlob(digest: string): Promise<number | undefined> {
    const subject = this.blobSubject(digest);
    return this.client.retrying('blob', subject, undefined, async () => {
      const { res } = await this.send({ method: 'HEAD', path: `blobs/${digest}`, capability: 'pull', actions: ['pull'], follow: true, subject });
      discardBody(res);
      if (res.status === 404) return undefined;
      if (res.status !== 200) throw await statusError(res, subject, 'HEAD blob failed', this.client.transport.timeouts);
      const size = Number(header(res, 'content-length'));
      return Number.isSafeInteger(size) ? size : undefined;
    });
  }

  /** A whole small blob (a config, a zTOC), checked against its digest and size. */
  async fetchBlob(desc: Descriptor, maxBytes = 64 << 20): Promise<Buffer> {
    const subject = this.blobSubject(desc.digest);
    if (desc.size > maxBytes) throw new ProtocolError(subject, `blob of ${desc.size} bytes is over the ${maxBytes}-byte limit for a whole-blob read`);
    return this.client.retrying('blob', subject, undefined, async () => {
      const res = await this.getBlob(desc, subject, undefined);
      if (res.status !== 200 && res.status !== 206) throw await statusError(res, subject, 'fetching the blob failed', this.client.transport.timeouts);
      const bytes = await readBody(res, subject, this.client.transport.timeouts, { expected: desc.size, max: maxBytes, what: 'blob' });
      const digest = sha256Digest(bytes);
      if (digest !== desc.digest) throw markTransient(new IntegrityError(subject, `blob content has digest ${digest}`));
      return bytes;
    });
  }

  /**
   * GET of a blob (whole or a range), through the storage URL it was last redirected to while
   * that is fresh; an expired or refused storage URL is dropped and the registry asked again.
   */
  private async getBlob(desc: Descriptor, subject: string, range: string | undefined, highWaterMark?: number): Promise<HttpResponse> {
    const headers: Record<string, string> = {};
    if (range !== undefined) headers.range = range;
    const cached = this.redirects.get(desc.digest);
    if (cached !== undefined && cached.until > Date.now()) {
      try {
        const res = await this.client.transport.send(
          { method: 'GET', url: cached.url, headers, tls: cached.endpoint.scheme === 'https' ? cached.endpoint : undefined, highWaterMark },
          subject,
        );
        if (res.status === 200 || res.status === 206) return res;
        discardBody(res);
        this.logger.debug('storage URL refused; asking the registry again', { blob: desc.digest, status: res.status });
      } catch (err) {
        this.logger.debug('storage URL failed; asking the registry again', { blob: desc.digest, error: err });
      }
      this.redirects.delete(desc.digest);
    }
    const { res, url, endpoint } = await this.send({ method: 'GET', path: `blobs/${desc.digest}`, headers, capability: 'pull', actions: ['pull'], follow: true, subject, highWaterMark });
    if ((res.status === 200 || res.status === 206) && url.origin !== new URL(endpoint.url).origin) {
      this.redirects.set(desc.digest, { url, until: Date.now() + REDIRECT_TTL_MS, endpoint });
    }
    if (res.status === 404) {
      const err = await statusError(res, subject, 'blob not found', this.client.transport.timeouts);
      throw new NotFoundError(subject, 'blob not found', { status: 404, code: err.code, cause: err });
    }
    return res;
  }

  /**
   * Streams a whole blob, resuming with a Range request where a connection broke, and checks size
   * and digest at the end (an IntegrityError then means: discard what was read).
   */
  async *blobStream(desc: Descriptor, opts: { signal?: AbortSignal } = {}): AsyncGenerator<Buffer, void, undefined> {
    const subject = this.blobSubject(desc.digest);
    const hash = createHash('sha256');
    let received = 0;
    const timeouts = this.client.transport.timeouts;
    for (let attempt = 0; ; attempt++) {
      let res: HttpResponse | undefined;
      try {
        res = await this.getBlob(desc, subject, received > 0 ? `bytes=${received}-` : undefined, BLOB_STREAM_HIGH_WATER_MARK);
        let skip = 0;
        if (res.status === 206 && received > 0) {
          const cr = parseContentRange(header(res, 'content-range'));
          if (cr === undefined || cr.start !== received || (cr.total !== undefined && cr.total !== desc.size)) {
            throw new ProtocolError(subject, `resumed download answered with Content-Range ${JSON.stringify(header(res, 'content-range') ?? '')}`);
          }
        } else if (res.status === 200) {
          skip = received;
        } else {
          throw await statusError(res, subject, 'fetching the blob failed', timeouts);
        }
        try {
          for await (const raw of res.body as AsyncIterable<Buffer>) {
            let chunk = raw;
            if (skip > 0) {
              const n = Math.min(skip, chunk.length);
              skip -= n;
              chunk = chunk.subarray(n);
              if (chunk.length === 0) continue;
            }
            if (received + chunk.length > desc.size) throw new IntegrityError(subject, `blob is larger than its descriptor's ${desc.size} bytes`);
            hash.update(chunk);
            received += chunk.length;
            yield chunk;
          }
        } catch (err) {
          if (err instanceof FetcherError) throw err;
          const mapped = mapNetworkError(err, subject, timeouts);
          if (mapped instanceof TimeoutError) throw mapped; // a stalled body is a timeout, not a break
          throw markTransient(new NetworkError(subject, `download broke after ${received} bytes`, { cause: err }));
        }
        if (received !== desc.size) throw markTransient(new NetworkError(subject, `download ended after ${received} of ${desc.size} bytes`));
        break;
      } catch (err) {
        res?.body.destroy();
        if (!isTransient(err) || attempt + 1 >= this.client.retry.attempts || opts.signal?.aborted === true) throw err;
        const delay = retryDelay(err, attempt, this.client.retry);
        this.logger.debug('resuming blob download', { blob: desc.digest, received, attempt: attempt + 1, error: err });
        this.client.noteRetry('blob_stream', subject, err, attempt + 1, delay);
        await new Promise((r) => setTimeout(r, delay));
      }
    }
    const digest = `sha256:${hash.digest('hex')}`;
    if (digest !== desc.digest) throw new IntegrityError(subject, `blob content has digest ${digest}`);
  }

  // ------------------------------------------------------------- range reads

  /**
   * `length` bytes of blob `desc` from `offset`. Reads issued in the same tick for the same blob
   * that touch or overlap are merged into one request (up to maxCoalescedBytes). With a digest,
   * the bytes are checked and refetched on mismatch.
   */
  readRange(desc: Descriptor, offset: number, length: number, opts: ReadRangeOptions = {}): Promise<Buffer> {
    const subject = this.blobSubject(desc.digest);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > desc.size) {
      return Promise.reject(new FetcherError(subject, `range ${offset}+${length} is outside the blob's ${desc.size} bytes`));
    }
    if (length === 0) return Promise.resolve(Buffer.alloc(0));
    return new Promise<Buffer>((resolve, reject) => {
      const part: RangePart = { offset, length, digest: opts.digest, resolve, reject };
      let batch = this.batches.get(desc.digest);
      if (batch === undefined) {
        batch = { desc, parts: [] };
        this.batches.set(desc.digest, batch);
      }
      batch.parts.push(part);
      if (!this.flushScheduled) {
        this.flushScheduled = true;
        setImmediate(() => this.flushBatches());
      }
    });
  }

  private flushBatches(): void {
    this.flushScheduled = false;
    const batches = [...this.batches.values()];
    this.batches.clear();
    for (const { desc, parts } of batches) {
      parts.sort((a, b) => a.offset - b.offset);
      let group: RangePart[] = [];
      let start = 0;
      let end = 0;
      for (const p of parts) {
        const pEnd = p.offset + p.length;
        if (group.length > 0 && p.offset <= end && Math.max(end, pEnd) - start <= this.client.maxCoalescedBytes) {
          group.push(p);
          end = Math.max(end, pEnd);
          continue;
        }
        if (group.length > 0) void this.fetchGroup(desc, group);
        group = [p];
        start = p.offset;
        end = pEnd;
      }
      if (group.length > 0) void this.fetchGroup(desc, group);
    }
  }

  private async fetchGroup(desc: Descriptor, parts: RangePart[]): Promise<void> {
    const subject = this.blobSubject(desc.digest);
    let remaining = parts;
    try {
      await this.client.retrying('range', subject, undefined, async () => {
        let start = Number.POSITIVE_INFINITY;
        let end = 0;
        for (const p of remaining) {
          start = Math.min(start, p.offset);
          end = Math.max(end, p.offset + p.length);
        }
        const bytes = await this.fetchRangeOnce(desc, start, end - start, subject);
        const failed: RangePart[] = [];
        for (const p of remaining) {
          const slice = bytes.subarray(p.offset - start, p.offset - start + p.length);
          if (p.digest !== undefined && sha256Digest(slice) !== p.digest) failed.push(p);
          else p.resolve(slice);
        }
        remaining = failed;
        if (failed.length > 0) {
          throw markTransient(new IntegrityError(subject, `bytes ${failed[0]!.offset}+${failed[0]!.length} do not match their digest ${failed[0]!.digest}`));
        }
      });
    } catch (err) {
      for (const p of remaining) p.reject(err);
    }
  }

  /** One range request (no retries), validated: 206 with the exact Content-Range, or a checked whole blob. */
  private async fetchRangeOnce(desc: Descriptor, offset: number, length: number, subject: string): Promise<Buffer> {
    const timeouts = this.client.transport.timeouts;
    const last = offset + length - 1;
    const res = await this.getBlob(desc, subject, `bytes=${offset}-${last}`);
    if (res.status === 206) {
      const raw = header(res, 'content-range');
      const cr = parseContentRange(raw);
      if (cr === undefined || cr.start !== offset || cr.end !== last || (cr.total !== undefined && cr.total !== desc.size)) {
        res.body.destroy();
        throw markTransient(new ProtocolError(subject, `asked for bytes ${offset}-${last}/${desc.size}, got Content-Range ${JSON.stringify((raw ?? '').slice(0, 80))}`));
      }
      return readBody(res, subject, timeouts, { expected: length, max: length, what: `range ${offset}-${last}` });
    }
    if (res.status === 200) return this.rangeFromWholeBlob(res, desc, offset, length, subject);
    throw await statusError(res, subject, `range ${offset}-${last} failed`, timeouts);
  }

  /**
   * A server that ignored Range sent the whole blob: stream it, keep the window, and hand it on
   * only if the whole blob matches its digest (a 200 proves nothing about the bytes otherwise).
   */
  private async rangeFromWholeBlob(res: HttpResponse, desc: Descriptor, offset: number, length: number, subject: string): Promise<Buffer> {
    this.client.noteRangeIgnored(this.ref.host);
    const declared = header(res, 'content-length');
    if (declared !== undefined && Number(declared) !== desc.size) {
      res.body.destroy();
      throw markTransient(new ProtocolError(subject, `server ignored Range and sent ${declared} bytes; the blob has ${desc.size}`));
    }
    const out = Buffer.allocUnsafe(length);
    const hash = createHash('sha256');
    let pos = 0;
    try {
      for await (const chunk of res.body as AsyncIterable<Buffer>) {
        if (pos + chunk.length > desc.size) {
          res.body.destroy();
          throw markTransient(new IntegrityError(subject, `blob is larger than its descriptor's ${desc.size} bytes`));
        }
        hash.update(chunk);
        const from = Math.max(offset, pos);
        const to = Math.min(offset + length, pos + chunk.length);
        if (from < to) chunk.copy(out, from - offset, from - pos, to - pos);
        pos += chunk.length;
      }
    } catch (err) {
      if (err instanceof FetcherError) throw err;
      const mapped = mapNetworkError(err, subject, this.client.transport.timeouts);
      if (mapped instanceof TimeoutError) throw mapped;
      throw markTransient(new NetworkError(subject, `whole-blob answer broke after ${pos} bytes`, { cause: err }));
    }
    if (pos !== desc.size) throw markTransient(new NetworkError(subject, `whole-blob answer ended after ${pos} of ${desc.size} bytes`));
    const digest = `sha256:${hash.digest('hex')}`;
    if (digest !== desc.digest) throw markTransient(new IntegrityError(subject, `whole-blob answer has digest ${digest}`));
    return out;
  }

  // ------------------------------------------------------------- push

  /**
   * Pushes a blob unless the repository has it: mounted from another repository of the same
   * registry when possible, else uploaded (one PUT, or PATCH chunks). `source` is the bytes or a
   * function that opens them afresh (called again if an upload must restart).
   */
  async pushBlob(desc: Descriptor, source: Uint8Array | (() => AsyncIterable<Uint8Array>), opts: PushBlobOptions = {}): Promise<PushBlobResult> {
    const subject = this.blobSubject(desc.digest);
    const timeouts = this.client.transport.timeouts;
    const push = ['pull', 'push'];
    return this.client.retrying('push', subject, undefined, async () => {
      const head = await this.send({ method: 'HEAD', path: `blobs/${desc.digest}`, capability: 'push', actions: push, follow: true, subject });
      discardBody(head.res);
      if (head.res.status === 200) return 'exists';
      if (head.res.status !== 404) throw await statusError(head.res, subject, 'HEAD blob failed', timeouts);

      let location: URL | undefined;
      const endpoint = head.endpoint;
      const sources = (opts.mountFrom ?? []).filter((from) => from !== this.ref.repository);
      for (const from of sources) {
        const { res } = await this.send({
          method: 'POST',
          path: 'blobs/uploads/',
          query: { mount: desc.digest, from },
          capability: 'push',
          actions: push,
          extraScopes: [repositoryScope(from, ['pull'])],
          endpoint,
          subject,
        });
        discardBody(res);
        if (res.status === 201) return 'mounted';
        if (res.status === 202) {
          // Not mounted from `from` (the registry lacks the blob there, or cannot mount): it opened
          // an upload instead. Keep the first such upload for uploading, and try the next source.
          // (Uploads opened and then not used are left to the registry's purging: cancelling one
          // takes the `delete` action, which a pull/push token does not carry.)
          location ??= this.uploadLocation(res, endpoint, subject);
        }
        this.logger.debug('blob mount refused', { blob: desc.digest, from, status: res.status });
      }
      if (location === undefined) {
        const { res } = await this.send({ method: 'POST', path: 'blobs/uploads/', capability: 'push', actions: push, endpoint, subject });
        if (res.status !== 202) throw await statusError(res, subject, 'starting the upload failed', timeouts);
        discardBody(res);
        location = this.uploadLocation(res, endpoint, subject);
      }

      const chunkSize = opts.chunkSize ?? (source instanceof Uint8Array ? 0 : 8 << 20);
      let final: HttpResponse;
      if (chunkSize === 0 && source instanceof Uint8Array) {
        const url = withDigest(location, desc.digest);
        ({ res: final } = await this.send({
          method: 'PUT',
          path: '',
          url,
          headers: { 'content-type': 'application/octet-stream', 'content-length': String(source.length) },
          body: source,
          capability: 'push',
          actions: push,
          endpoint,
          subject,
        }));
        opts.onProgress?.(source.length);
      } else {
        let sent = 0;
        const hash = createHash('sha256');
        for await (const chunk of rechunk(source instanceof Uint8Array ? [source] : source(), chunkSize || 8 << 20)) {
          hash.update(chunk);
          const { res } = await this.send({
            method: 'PATCH',
            path: '',
            url: location,
            headers: {
              'content-type': 'application/octet-stream',
              'content-length': String(chunk.length),
              'content-range': `${sent}-${sent + chunk.length - 1}`,
            },
            body: chunk,
            capability: 'push',
            actions: push,
            endpoint,
            subject,
          });
          if (res.status !== 202) throw await statusError(res, subject, `uploading bytes ${sent}+${chunk.length} failed`, timeouts);
          discardBody(res);
          location = this.uploadLocation(res, endpoint, subject);
          sent += chunk.length;
          opts.onProgress?.(sent);
        }
        if (sent !== desc.size || `sha256:${hash.digest('hex')}` !== desc.digest) {
          throw new IntegrityError(subject, `the data given for upload (${sent} bytes) does not match the descriptor`);
        }
        ({ res: final } = await this.send({ method: 'PUT', path: '', url: withDigest(location, desc.digest), headers: { 'content-length': '0' }, capability: 'push', actions: push, endpoint, subject }));
      }
      if (final.status !== 201 && final.status !== 204) throw await statusError(final, subject, 'finishing the upload failed', timeouts);
      discardBody(final);
      const stated = header(final, 'docker-content-digest');
      if (stated !== undefined && stated !== desc.digest) throw new IntegrityError(subject, `registry stored the upload as ${stated}`);
      return 'uploaded';
    });
  }

  private uploadLocation(res: HttpResponse, endpoint: HostConfig, subject: string): URL {
    const location = header(res, 'location');
    if (location === undefined) throw new ProtocolError(subject, 'upload answer without a Location');
    let url: URL;
    try {
      url = new URL(location, endpoint.url);
    } catch (err) {
      throw new ProtocolError(subject, 'upload Location is not a URL', { cause: err });
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new ProtocolError(subject, `upload Location uses ${url.protocol}, not http(s)`);
    return url;
  }

  /**
   * Pushes a manifest or index under `reference` (a tag; default: its digest). When it has a
   * `subject` and the registry does not answer `OCI-Subject` (no referrers API), the fallback tag
   * `sha256-<subject hex>` is updated to list it, as the distribution spec asks of clients.
   */
  async pushManifest(bytes: Uint8Array, mediaType: string, reference?: string): Promise<PushManifestResult> {
    const digest = sha256Digest(bytes);
    const target = reference ?? digest;
    const subject = `${this.ref.name}${target.includes(':') ? '@' : ':'}${target}`;
    const parsed = parseManifest(bytes, mediaType, subject);
    const res = await this.client.retrying('push', subject, undefined, async () => {
      const { res } = await this.send({
        method: 'PUT',
        path: `manifests/${target}`,
        headers: { 'content-type': mediaType, 'content-length': String(bytes.length) },
        body: bytes,
        capability: 'push',
        actions: ['pull', 'push'],
        subject,
      });
      if (res.status !== 201 && res.status !== 200 && res.status !== 204) throw await statusError(res, subject, 'pushing the manifest failed', this.client.transport.timeouts);
      discardBody(res);
      return res;
    });
    const stated = header(res, 'docker-content-digest');
    if (stated !== undefined && stated !== digest) throw new IntegrityError(subject, `registry stored the manifest as ${stated}, not ${digest}`);
    const descriptor: Descriptor = { mediaType, digest, size: bytes.length };
    const doc = parsed.kind === 'manifest' ? parsed.manifest : parsed.index;
    const subjectAccepted = header(res, 'oci-subject') !== undefined;
    let referrersTagUpdated = false;
    if (doc.subject !== undefined && !subjectAccepted) {
      const entry: Descriptor = { ...descriptor };
      const artifactType = doc.artifactType ?? (parsed.kind === 'manifest' ? parsed.manifest.config.mediaType : undefined);
      if (artifactType !== undefined) entry.artifactType = artifactType;
      if (doc.annotations !== undefined) entry.annotations = doc.annotations;
      referrersTagUpdated = await this.addToReferrersTag(doc.subject.digest, entry);
    }
    return { descriptor, subjectAccepted, referrersTagUpdated };
  }

  /** Adds `entry` to the fallback referrers index of `subjectDigest` (no-op if listed). */
  private async addToReferrersTag(subjectDigest: string, entry: Descriptor): Promise<boolean> {
    const tag = referrersTag(subjectDigest);
    let index: ImageIndex = { schemaVersion: 2, mediaType: MEDIA_TYPE_OCI_INDEX, manifests: [] };
    try {
      const current = await this.fetchManifest(tag);
      if (current.parsed.kind !== 'index') throw new ProtocolError(`${this.ref.name}:${tag}`, 'the referrers tag does not hold an image index');
      index = current.parsed.index;
    } catch (err) {
      if (!(err instanceof NotFoundError)) throw err;
    }
    if (index.manifests.some((m) => m.digest === entry.digest)) return false;
    const next: ImageIndex = { schemaVersion: 2, mediaType: MEDIA_TYPE_OCI_INDEX, manifests: [...index.manifests, entry] };
    if (index.annotations !== undefined) next.annotations = index.annotations;
    await this.pushManifest(Buffer.from(JSON.stringify(next)), MEDIA_TYPE_OCI_INDEX, tag);
    return true;
  }

  // ------------------------------------------------------------- referrers

  /**
   * Manifests that name `subjectDigest` as their subject, optionally only of `artifactType`:
   * from the referrers API, or, where the registry answers 404 there, from the fallback tag.
   * `attempts` bounds the attempts of each request (default: the client's retry policy).
   */
  async referrers(subjectDigest: string, artifactType?: string, opts: { attempts?: number } = {}): Promise<ReferrersResult> {
    const subject = `${this.ref.name}@${subjectDigest} referrers`;
    const timeouts = this.client.transport.timeouts;
    const descriptors: Descriptor[] = [];
    let path = `referrers/${subjectDigest}`;
    let query: Record<string, string> | undefined = artifactType === undefined ? undefined : { artifactType };
    for (let page = 0; page < 100; page++) {
      const { res, url } = await this.client.retrying('referrers', subject, opts.attempts, () =>
        this.send({ method: 'GET', path, query, headers: { accept: MEDIA_TYPE_OCI_INDEX }, capability: 'referrers', actions: ['pull'], follow: true, subject }),
      );
      if (res.status === 404 || res.status === 400 || res.status === 405) {
        discardBody(res);
        if (page > 0) throw new RegistryError(subject, `referrers page ${page + 1} answered HTTP ${res.status}`, { status: res.status });
        return { descriptors: await this.referrersFromTag(subjectDigest, artifactType, opts.attempts), source: 'tag' };
      }
      if (res.status !== 200) throw await statusError(res, subject, 'listing referrers failed', timeouts);
      const bytes = await readBody(res, subject, timeouts, { max: this.client.maxManifestBytes, what: 'referrers index' });
      const parsed = parseManifest(bytes, MEDIA_TYPE_OCI_INDEX, subject);
      if (parsed.kind !== 'index') throw new ProtocolError(subject, 'referrers answer is not an image index');
      descriptors.push(...parsed.index.manifests);
      const next = nextLink(header(res, 'link'), url);
      if (next === undefined) break;
      if (next.origin !== url.origin) throw new ProtocolError(subject, 'referrers Link points to another origin');
      path = next.pathname.replace(/^.*\/referrers\//, 'referrers/');
      query = Object.fromEntries(next.searchParams);
    }
    return { descriptors: artifactType === undefined ? descriptors : descriptors.filter((d) => d.artifactType === artifactType), source: 'api' };
  }

  private async referrersFromTag(subjectDigest: string, artifactType: string | undefined, attempts?: number): Promise<Descriptor[]> {
    try {
      const { parsed } = await this.fetchManifest(referrersTag(subjectDigest), { attempts });
      if (parsed.kind !== 'index') throw new ProtocolError(`${this.ref.name}:${referrersTag(subjectDigest)}`, 'the referrers tag does not hold an image index');
      return parsed.index.manifests.filter((d) => artifactType === undefined || d.artifactType === artifactType);
    } catch (err) {
      if (err instanceof NotFoundError) return [];
      throw err;
    }
  }
}

/** The fallback referrers tag of a digest: `sha256-<hex>`. */
export function referrersTag(digest: string): string {
  return digest.replace(':', '-');
}

export interface ContentRange {
  start: number;
  end: number;
  total?: number;
}

/** `bytes <start>-<end>/<total|*>`. */
export function parseContentRange(value: string | undefined): ContentRange | undefined {
  if (value === undefined) return undefined;
  const m = /^\s*bytes\s+(\d+)-(\d+)\/(\d+|\*)\s*$/i.exec(value);
  if (m === null) return undefined;
  const start = Number(m[1]);
  const end = Number(m[2]);
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || end < start) return undefined;
  const out: ContentRange = { start, end };
  if (m[3] !== '*') out.total = Number(m[3]);
  return out;
}

function withDigest(location: URL, digest: string): URL {
  const url = new URL(location);
  url.searchParams.set('digest', digest);
  return url;
}

/** `<url>; rel="next"` from a Link header, resolved against the request URL. */
function nextLink(link: string | undefined, base: URL): URL | undefined {
  if (link === undefined) return undefined;
  for (const part of link.split(',')) {
    const m = /<([^>]*)>\s*;\s*rel="?next"?/i.exec(part);
    if (m !== null) {
      try {
        return new URL(m[1]!, base);
      } catch {
        return undefined;
      }
    }
  }
  return undefined;
}

/** Re-slices an async stream of buffers into chunks of exactly `size` bytes (the last shorter). */
async function* rechunk(source: Iterable<Uint8Array> | AsyncIterable<Uint8Array>, size: number): AsyncGenerator<Buffer> {
  let buf = Buffer.allocUnsafe(size);
  let fill = 0;
  for await (const piece of source) {
    let off = 0;
    while (off < piece.length) {
      const n = Math.min(size - fill, piece.length - off);
      buf.set(piece.subarray(off, off + n), fill);
      fill += n;
      off += n;
      if (fill === size) {
        yield buf;
        buf = Buffer.allocUnsafe(size);
        fill = 0;
      }
    }
  }
  if (fill > 0) yield buf.subarray(0, fill);
}

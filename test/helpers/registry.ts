/**
 * A real OCI registry for tests: Debian's `docker-registry` (CNCF distribution 2.8) on a free
 * loopback port, with no auth, htpasswd basic auth, or token auth backed by a small token
 * issuer that this process serves on loopback.
 *
 * Nothing outlives the test process: each registry is a direct child in its own process group
 * (stop() kills the group and reaps it), an `exit` hook kills what is still running, and a
 * detached watchdog shell (reading a pipe from us) kills the group and removes the temp dir
 * if this process dies without running hooks (SIGKILL from a runner's timeout).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, createPrivateKey, randomBytes, randomUUID, sign as cryptoSign, X509Certificate, type KeyObject } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as http from 'node:http';
import * as https from 'node:https';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { CommandError, FixtureUnavailableError, run } from './layers.js';

// ---------------------------------------------------------------------------------------
// Types and errors

export type RegistryAuth = 'none' | 'basic' | 'token';

export interface Credentials {
  username: string;
  password: string;
}

/** Knobs to make the token issuer misbehave; mutable on `registry.issuer.options` mid-test. */
export interface IssuerOptions {
  /** `expires_in` (and the JWT's exp) in seconds; default 300. The registry allows 60 s leeway. */
  expiresIn?: number;
  /** Wait this long before answering each token request. */
  delayMs?: number;
  /** Answer every token request with HTTP 500 (or this status). */
  fail?: boolean | number;
  /**
   * How the JWT names its signing key: `x5c` (the certificate chain) or `kid` (libtrust key
   * id of the certificate's key). Registry 2.8 accepts both; default `x5c`.
   */
  keyHeader?: 'x5c' | 'kid';
}

export interface StartRegistryOptions {
  auth?: RegistryAuth;
  /** user → password (default: one user, `soci`, with a random password). */
  users?: Record<string, string>;
  issuer?: IssuerOptions;
  /** How long to wait for `GET /v2/` to answer (default 15 s). */
  startTimeoutMs?: number;
  /** Edits the registry config (a plain object, written as YAML/JSON) before start. */
  config?: (config: RegistryConfig) => void;
  /** Serve HTTPS (`http.tls`) instead of plain HTTP; `url` is then `https://…`. */
  tls?: RegistryTlsOptions;
}

/**
 * TLS for a test registry: PEM files the caller made (e.g. with openssl). The helper's own
 * requests (readiness probe, registryRequest, getManifest) trust `caFile` and present the client
 * certificate when one is given.
 */
export interface RegistryTlsOptions {
  /** Server certificate (`http.tls.certificate`); must name 127.0.0.1 (IP SAN). */
  certFile: string;
  /** Its key (`http.tls.key`). */
  keyFile: string;
  /** The CA that signed `certFile`. */
  caFile: string;
  /** CAs of required client certificates (`http.tls.clientcas`): the registry then demands one. */
  clientCaFiles?: readonly string[];
  /** Client certificate and key the helper presents (needed with `clientCaFiles`). */
  clientCertFile?: string;
  clientKeyFile?: string;
}

/** The registry's YAML config as an object (JSON is valid YAML, so it is written as JSON). */
export type RegistryConfig = { [key: string]: JsonValue };
export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };

/** One access grant inside a token (the distribution token spec's `access` claim). */
export interface TokenAccess {
  type: string;
  name: string;
  actions: string[];
}

/** What the token issuer answers. */
export interface TokenResponse {
  token: string;
  access_token: string;
  expires_in: number;
  issued_at: string;
}

/** One request the token issuer saw (for tests asserting on the flow). */
export interface TokenRequestRecord {
  user: string | null;
  scopes: string[];
  service: string | null;
  status: number;
}

export interface TokenIssuer {
  /** The realm URL the registry's challenge names. */
  readonly realm: string;
  readonly service: string;
  /** The `iss` claim the registry trusts. */
  readonly issuer: string;
  /** Mutable: change to make later requests misbehave. */
  options: IssuerOptions;
  /** Token requests received so far (answered or not). */
  readonly tokenRequests: number;
  readonly requests: readonly TokenRequestRecord[];
  /** Signs a token directly (for tests that need odd grants, expired tokens, ...). */
  mint(subject: string, access: readonly TokenAccess[], opts?: { expiresIn?: number; issuedAt?: Date }): string;
}

export interface Registry {
  /** `127.0.0.1:PORT` */
  readonly host: string;
  /** `http://127.0.0.1:PORT` (`https://` with the `tls` option) */
  readonly url: string;
  /** The TLS files, when started with the `tls` option. */
  readonly tls?: RegistryTlsOptions;
  readonly port: number;
  readonly auth: RegistryAuth;
  /** The first user's credentials (undefined when auth is `none`). */
  readonly credentials: Credentials | undefined;
  readonly users: Readonly<Record<string, string>>;
  /** The temp dir holding config, storage, htpasswd/certs; removed by stop(). */
  readonly rootDir: string;
  /** The registry process (also its process group id). */
  readonly pid: number;
  /** The watchdog shell's pid. */
  readonly watchdogPid: number;
  /** Only for `token` auth. */
  readonly issuer: TokenIssuer | undefined;
  /** Token requests the issuer received (0 without token auth). */
  readonly tokenRequests: number;
  /** The registry's captured stdout+stderr (last 256 KiB). */
  logs(): string;
  /** True until stop() is called or the process exits. */
  readonly running: boolean;
  /** Kills the registry's process group, removes rootDir, stops the issuer. Idempotent. */
  stop(): Promise<void>;
}

/** The registry could not be started or misbehaved; carries its log when there is one. */
export class RegistryError extends Error {
  readonly log: string;
  constructor(message: string, log = '', options?: { cause?: unknown }) {
    super(log.trim() === '' ? message : `${message}\n--- registry log ---\n${log.trim().slice(-4000)}`, options);
    this.name = new.target.name;
    this.log = log;
  }
}

/** A token request was refused or failed. */
export class TokenError extends Error {
  readonly status: number;
  readonly body: string;
  constructor(message: string, status: number, body: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.status = status;
    this.body = body;
  }
}

// ---------------------------------------------------------------------------------------
// Plain HTTP (node:http, no keep-alive: nothing lingers after a test)

export interface HttpResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

export interface HttpRequestOptions {
  method?: string;
  headers?: Record<string, string>;
  body?: Buffer | string;
  /** Whole-request timeout (default 30 s). */
  timeoutMs?: number;
  /** For https URLs: the CA to trust and the client certificate to present. */
  tls?: RegistryTlsOptions;
}

function tlsRequestOptions(tls: RegistryTlsOptions | undefined): https.RequestOptions {
  if (tls === undefined) return {};
  const out: https.RequestOptions = { ca: readFileSync(tls.caFile) };
  if (tls.clientCertFile !== undefined) out.cert = readFileSync(tls.clientCertFile);
  if (tls.clientKeyFile !== undefined) out.key = readFileSync(tls.clientKeyFile);
  return out;
}

export function httpRequest(url: string, opts: HttpRequestOptions = {}): Promise<HttpResponse> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  return new Promise((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined;
    const fail = (e: Error): void => {
      clearTimeout(timer);
      reject(e);
    };
    const onResponse = (res: http.IncomingMessage): void => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', fail);
      res.on('end', () => {
        clearTimeout(timer);
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) });
      });
    };
    const base = { method: opts.method ?? 'GET', headers: opts.headers, agent: false as const };
    const req = url.startsWith('https:') ? https.request(url, { ...base, ...tlsRequestOptions(opts.tls) }, onResponse) : http.request(url, base, onResponse);
    timer = setTimeout(() => req.destroy(new Error(`${opts.method ?? 'GET'} ${url}: no answer in ${timeoutMs} ms`)), timeoutMs);
    req.on('error', fail);
    req.end(opts.body);
  });
}

/** A parsed `WWW-Authenticate` challenge: scheme plus its key="value" parameters. */
export interface AuthChallenge {
  scheme: string;
  params: Record<string, string>;
}

export function parseChallenge(header: string | undefined): AuthChallenge | undefined {
  if (header === undefined) return undefined;
  const m = /^\s*(\S+)\s*(.*)$/s.exec(header);
  if (m === null) return undefined;
  const params: Record<string, string> = {};
  // key="quoted, maybe with commas" or key=token
  for (const p of (m[2] ?? '').matchAll(/([A-Za-z0-9_-]+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))/g)) {
    params[(p[1] ?? '').toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : (p[3] ?? '');
  }
  return { scheme: m[1] ?? '', params };
}

const basicHeader = (c: Credentials): string => `Basic ${Buffer.from(`${c.username}:${c.password}`).toString('base64')}`;

/** Asks the realm for a token (GET with basic credentials, per the distribution token spec). */
export async function fetchToken(
  realm: string,
  params: { service?: string; scope?: string | readonly string[] },
  creds?: Credentials,
): Promise<TokenResponse> {
  const u = new URL(realm);
  if (params.service !== undefined) u.searchParams.set('service', params.service);
  const scopes = typeof params.scope === 'string' ? [params.scope] : (params.scope ?? []);
  for (const s of scopes) u.searchParams.append('scope', s);
  if (creds !== undefined) u.searchParams.set('account', creds.username);
  const res = await httpRequest(u.toString(), { headers: creds !== undefined ? { authorization: basicHeader(creds) } : {} });
  const text = res.body.toString('utf8');
  if (res.status !== 200) throw new TokenError(`token request to ${realm} answered ${res.status}: ${text.slice(0, 300)}`, res.status, text);
  try {
    return JSON.parse(text) as TokenResponse;
  } catch (e) {
    throw new TokenError(`token response from ${realm} is not JSON`, res.status, text, { cause: e });
  }
}

export interface RegistryRequestOptions extends HttpRequestOptions {
  /** Credentials to use; `null` for anonymous (default: the registry's own credentials). */
  creds?: Credentials | null;
}

/**
 * One request to the registry (`pathAndQuery` starts with `/v2/`), doing the auth dance its
 * kind needs: basic credentials up front, or for token auth the challenge → token → retry.
 */
export async function registryRequest(reg: Registry, pathAndQuery: string, opts: RegistryRequestOptions = {}): Promise<HttpResponse> {
  const creds = opts.creds === null ? undefined : (opts.creds ?? reg.credentials);
  const headers = { ...opts.headers };
  if (reg.auth === 'basic' && creds !== undefined) headers.authorization = basicHeader(creds);
  const url = `${reg.url}${pathAndQuery}`;
  if (reg.tls !== undefined && opts.tls === undefined) opts = { ...opts, tls: reg.tls };
  const res = await httpRequest(url, { ...opts, headers });
  if (res.status !== 401 || reg.auth !== 'token') return res;
  const ch = parseChallenge(res.headers['www-authenticate'] as string | undefined);
  if (ch === undefined || ch.scheme.toLowerCase() !== 'bearer' || ch.params.realm === undefined) return res;
  const tok = await fetchToken(ch.params.realm, { service: ch.params.service, scope: ch.params.scope?.split(' ') }, creds);
  return httpRequest(url, { ...opts, headers: { ...headers, authorization: `Bearer ${tok.token}` } });
}

// ---------------------------------------------------------------------------------------
// skopeo

export interface SkopeoCopyOptions {
  /** `user:pass` or Credentials for the destination registry. */
  destCreds?: Credentials | string;
  srcCreds?: Credentials | string;
  /** Kill skopeo after this long (default 120 s). */
  timeoutMs?: number;
  /** More skopeo copy flags. */
  extraArgs?: readonly string[];
}

const credArg = (c: Credentials | string): string => (typeof c === 'string' ? c : `${c.username}:${c.password}`);

/**
 * `skopeo copy` (async, with a timeout); plain HTTP towards docker:// registries. Rejects
 * with CommandError (exit status and stderr) when skopeo fails.
 */
export async function skopeoCopy(src: string, dst: string, opts: SkopeoCopyOptions = {}): Promise<{ stdout: string; stderr: string }> {
  // --insecure-policy: no dependence on /etc/containers/policy.json being there.
  const args = ['--insecure-policy', 'copy', '--dest-tls-verify=false'];
  if (src.startsWith('docker://')) args.push('--src-tls-verify=false');
  if (opts.destCreds !== undefined) args.push('--dest-creds', credArg(opts.destCreds));
  if (opts.srcCreds !== undefined) args.push('--src-creds', credArg(opts.srcCreds));
  args.push(...(opts.extraArgs ?? []), src, dst);
  return execTimed('skopeo', args, opts.timeoutMs ?? 120_000);
}

/** Spawns without a shell and kills the command after `timeoutMs`. */
async function execTimed(cmd: string, args: readonly string[], timeoutMs: number): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(e.code === 'ENOENT' ? new FixtureUnavailableError(cmd, 'command not found', { cause: e }) : e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve({ stdout, stderr });
      else reject(new CommandError(cmd, args, code, signal, timedOut ? `timed out after ${timeoutMs} ms\n${stderr}` : stderr));
    });
  });
}

// ---------------------------------------------------------------------------------------
// Token issuer

/** base64url without padding. */
const b64url = (b: Buffer | string): string => Buffer.from(b).toString('base64url');

/** libtrust's key id: sha256 of the DER SPKI, first 240 bits, base32, groups of 4 joined by ':'. */
function libtrustKeyId(spkiDer: Buffer): string {
  const sum = createHash('sha256').update(spkiDer).digest().subarray(0, 30);
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = 0;
  let value = 0;
  let out = '';
  for (const byte of sum) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
    value &= (1 << bits) - 1;
  }
  return (out.match(/.{1,4}/g) ?? []).join(':');
}

interface IssuerKeys {
  key: KeyObject;
  certDer: Buffer;
  kid: string;
}

/** An EC P-256 key and a self-signed certificate for it (the registry's rootcertbundle). */
async function makeSigningKey(dir: string): Promise<IssuerKeys & { certPath: string }> {
  const keyPath = path.join(dir, 'token-key.pem');
  const certPath = path.join(dir, 'token-cert.pem');
  await run('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', keyPath, '-out', certPath, '-days', '7', '-subj', '/CN=soci-ts test token issuer',
  ]);
  const key = createPrivateKey(await fsp.readFile(keyPath));
  const cert = new X509Certificate(await fsp.readFile(certPath));
  const spki = cert.publicKey.export({ type: 'spki', format: 'der' });
  return { key, certDer: cert.raw, kid: libtrustKeyId(spki), certPath };
}

class Issuer implements TokenIssuer {
  realm = '';
  readonly service: string;
  readonly issuer = 'soci-ts-test-issuer';
  options: IssuerOptions;
  readonly requests: TokenRequestRecord[] = [];
  private server: http.Server | undefined;

  constructor(
    private readonly keys: IssuerKeys,
    private readonly users: Readonly<Record<string, string>>,
    options: IssuerOptions,
    service: string,
  ) {
    this.options = { ...options };
    this.service = service;
  }

  get tokenRequests(): number {
    return this.requests.length;
  }

  mint(subject: string, access: readonly TokenAccess[], opts: { expiresIn?: number; issuedAt?: Date } = {}): string {
    const iat = Math.floor((opts.issuedAt ?? new Date()).getTime() / 1000);
    const exp = iat + (opts.expiresIn ?? this.options.expiresIn ?? 300);
    const header =
      (this.options.keyHeader ?? 'x5c') === 'x5c'
        ? { typ: 'JWT', alg: 'ES256', x5c: [this.keys.certDer.toString('base64')] }
        : { typ: 'JWT', alg: 'ES256', kid: this.keys.kid };
    const claims = { iss: this.issuer, sub: subject, aud: this.service, exp, nbf: iat - 1, iat, jti: randomUUID(), access };
    const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
    // JWS ES256 wants raw r||s, not DER.
    const sig = cryptoSign('sha256', Buffer.from(input), { key: this.keys.key, dsaEncoding: 'ieee-p1363' });
    return `${input}.${b64url(sig)}`;
  }

  async listen(): Promise<void> {
    const server = http.createServer((req, res) => void this.handle(req, res));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    server.unref(); // a forgotten stop() must not keep the test process alive
    const addr = server.address() as net.AddressInfo;
    this.realm = `http://127.0.0.1:${addr.port}/token`;
    this.server = server;
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const u = new URL(req.url ?? '/', 'http://x');
    const scopes = u.searchParams.getAll('scope').flatMap((s) => s.split(' ')).filter((s) => s !== '');
    const record: TokenRequestRecord = { user: null, scopes, service: u.searchParams.get('service'), status: 0 };
    this.requests.push(record);
    const answer = (status: number, body: unknown, headers: Record<string, string> = {}): void => {
      record.status = status;
      res.writeHead(status, { 'content-type': 'application/json', ...headers });
      res.end(JSON.stringify(body));
    };
    if (this.options.delayMs !== undefined && this.options.delayMs > 0) await new Promise((r) => setTimeout(r, this.options.delayMs));
    if (u.pathname !== '/token' || req.method !== 'GET') return answer(404, { errors: [{ code: 'NOT_FOUND' }] });
    if (this.options.fail !== undefined && this.options.fail !== false) {
      return answer(typeof this.options.fail === 'number' ? this.options.fail : 500, { errors: [{ code: 'UNAVAILABLE', message: 'issuer told to fail' }] });
    }
    // Only known users get tokens (no anonymous pulls): tests of "no credentials" then fail.
    const m = /^Basic\s+(\S+)$/i.exec(req.headers.authorization ?? '');
    const decoded = m !== null ? Buffer.from(m[1] ?? '', 'base64').toString('utf8') : '';
    const colon = decoded.indexOf(':');
    const user = colon > 0 ? decoded.slice(0, colon) : '';
    if (colon <= 0 || !Object.hasOwn(this.users, user) || this.users[user] !== decoded.slice(colon + 1)) {
      return answer(401, { errors: [{ code: 'UNAUTHORIZED', message: 'bad or missing credentials' }] }, { 'www-authenticate': 'Basic realm="soci-ts-test-issuer"' });
    }
    record.user = user;
    // Every user may do everything it asks for: repository:NAME:pull,push and the like.
    const access: TokenAccess[] = [];
    for (const s of scopes) {
      const first = s.indexOf(':');
      const last = s.lastIndexOf(':');
      if (first <= 0 || last <= first) continue;
      access.push({ type: s.slice(0, first), name: s.slice(first + 1, last), actions: s.slice(last + 1).split(',').filter((a) => a !== '') });
    }
    const issuedAt = new Date();
    const token = this.mint(user, access, { issuedAt });
    answer(200, { token, access_token: token, expires_in: this.options.expiresIn ?? 300, issued_at: issuedAt.toISOString() });
  }

  async close(): Promise<void> {
    const server = this.server;
    if (server === undefined) return;
    this.server = undefined;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

// ---------------------------------------------------------------------------------------
// Process handling

const live = new Set<RegistryHandle>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // Only synchronous work runs in 'exit': signal the groups, remove the dirs.
  process.on('exit', () => {
    for (const r of live) {
      try {
        process.kill(-r.pid, 'SIGKILL');
      } catch {
        // already gone
      }
      rmSync(r.rootDir, { recursive: true, force: true });
    }
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Keeps the last `max` characters of a stream. */
class Tail {
  private text = '';
  constructor(private readonly max: number) {}
  push(s: string): void {
    this.text += s;
    if (this.text.length > this.max * 2) this.text = this.text.slice(-this.max);
  }
  toString(): string {
    return this.text.slice(-this.max);
  }
}

function unrefStream(s: unknown): void {
  if (s instanceof net.Socket) s.unref();
}

class RegistryHandle implements Registry {
  readonly host: string;
  readonly url: string;
  private exited = false;
  private exitWaiters: (() => void)[] = [];
  private stopping: Promise<void> | undefined;
  readonly pid: number;
  readonly watchdogPid: number;

  constructor(
    readonly port: number,
    readonly auth: RegistryAuth,
    readonly users: Readonly<Record<string, string>>,
    readonly rootDir: string,
    readonly issuer: Issuer | undefined,
    private readonly child: ChildProcess,
    private readonly watchdog: ChildProcess,
    private readonly log: Tail,
    readonly tls?: RegistryTlsOptions,
  ) {
    this.host = `127.0.0.1:${port}`;
    this.url = `${tls === undefined ? 'http' : 'https'}://${this.host}`;
    if (child.pid === undefined || watchdog.pid === undefined) throw new RegistryError('registry or watchdog has no pid');
    this.pid = child.pid;
    this.watchdogPid = watchdog.pid;
    // 'close', not 'exit': by then its stderr is read to the end, so error messages show all of it.
    child.on('close', () => {
      this.exited = true;
      for (const w of this.exitWaiters.splice(0)) w();
    });
  }

  get credentials(): Credentials | undefined {
    if (this.auth === 'none') return undefined;
    const [username, password] = Object.entries(this.users)[0] ?? [];
    return username !== undefined && password !== undefined ? { username, password } : undefined;
  }

  get tokenRequests(): number {
    return this.issuer?.tokenRequests ?? 0;
  }

  get running(): boolean {
    return !this.exited && this.stopping === undefined;
  }

  get hasExited(): boolean {
    return this.exited;
  }

  logs(): string {
    return this.log.toString();
  }

  /** Resolves when the registry process has exited (or after `ms`, with false). */
  waitExit(ms: number): Promise<boolean> {
    if (this.exited) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), ms);
      this.exitWaiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  stop(): Promise<void> {
    this.stopping ??= this.doStop();
    return this.stopping;
  }

  private async doStop(): Promise<void> {
    const signal = (sig: NodeJS.Signals): void => {
      try {
        process.kill(-this.pid, sig);
      } catch {
        // group already gone
      }
    };
    if (!this.exited) {
      signal('SIGTERM');
      if (!(await this.waitExit(3000))) {
        signal('SIGKILL');
        await this.waitExit(5000);
      }
    }
    // The watchdog is not needed any more: SIGKILL it (closing its stdin would make it kill a
    // process group id that is free by now and could be reused) and reap it.
    const watchdogDone = new Promise<void>((resolve) => {
      if (this.watchdog.exitCode !== null || this.watchdog.signalCode !== null) resolve();
      else this.watchdog.once('exit', () => resolve());
    });
    this.watchdog.kill('SIGKILL');
    await Promise.race([watchdogDone, sleep(3000)]);
    await fsp.rm(this.rootDir, { recursive: true, force: true });
    await this.issuer?.close();
    live.delete(this);
  }
}

function defaultUsers(): Record<string, string> {
  return { soci: `pw-${randomBytes(6).toString('hex')}` };
}

async function htpasswdFile(dir: string, users: Readonly<Record<string, string>>): Promise<string> {
  const lines: string[] = [];
  // bcrypt (-B) is the only hash registry 2.8 accepts.
  for (const [u, p] of Object.entries(users)) lines.push((await run('htpasswd', ['-Bbn', u, p])).stdout.trim());
  const file = path.join(dir, 'htpasswd');
  await fsp.writeFile(file, lines.join('\n') + '\n');
  return file;
}

/**
 * Starts a registry on a free loopback port and waits until `GET /v2/` answers (200, or 401
 * with auth). Rejects with RegistryError (holding the registry's log) if it exits or does not
 * answer in time.
 */
export async function startRegistry(opts: StartRegistryOptions = {}): Promise<Registry> {
  const auth = opts.auth ?? 'none';
  const users = opts.users ?? defaultUsers();
  if (auth !== 'none' && Object.keys(users).length === 0) throw new RegistryError(`auth ${auth} needs at least one user`);
  installExitHook();
  const rootDir = await fsp.mkdtemp(path.join(tmpdir(), 'soci-ts-registry-'));
  let issuer: Issuer | undefined;
  try {
    const config: RegistryConfig = {
      version: '0.1',
      log: { level: 'warn', formatter: 'text', accesslog: { disabled: true } },
      storage: {
        filesystem: { rootdirectory: path.join(rootDir, 'storage') },
        delete: { enabled: true },
        maintenance: { uploadpurging: { enabled: false } },
      },
      // A fixed secret: without one the registry warns at start.
      http: { addr: '', secret: randomBytes(16).toString('hex') },
    };
    if (auth === 'basic') {
      config.auth = { htpasswd: { realm: 'soci-ts-test', path: await htpasswdFile(rootDir, users) } };
    } else if (auth === 'token') {
      const keys = await makeSigningKey(rootDir);
      issuer = new Issuer(keys, users, opts.issuer ?? {}, 'soci-ts-test-registry');
      await issuer.listen();
      config.auth = { token: { realm: issuer.realm, service: issuer.service, issuer: issuer.issuer, rootcertbundle: keys.certPath } };
    }
    if (opts.tls !== undefined) {
      const tls: { [k: string]: JsonValue } = { certificate: opts.tls.certFile, key: opts.tls.keyFile };
      if (opts.tls.clientCaFiles !== undefined) tls.clientcas = [...opts.tls.clientCaFiles];
      (config.http as { [k: string]: JsonValue }).tls = tls;
    }
    opts.config?.(config);

    // A port found free may be taken before the registry binds it: retry on that only.
    for (let attempt = 1; ; attempt++) {
      const port = await freePort();
      (config.http as { [k: string]: JsonValue }).addr = `127.0.0.1:${port}`;
      const configPath = path.join(rootDir, 'config.yml');
      await fsp.writeFile(configPath, JSON.stringify(config, null, 2));
      try {
        const reg = await launch(port, auth, users, rootDir, issuer, configPath, opts.startTimeoutMs ?? 15_000, opts.tls);
        return reg;
      } catch (e) {
        if (attempt < 5 && e instanceof RegistryError && /address already in use/.test(e.log)) continue;
        throw e;
      }
    }
  } catch (e) {
    await issuer?.close();
    await fsp.rm(rootDir, { recursive: true, force: true });
    throw e;
  }
}

async function launch(
  port: number,
  auth: RegistryAuth,
  users: Readonly<Record<string, string>>,
  rootDir: string,
  issuer: Issuer | undefined,
  configPath: string,
  timeoutMs: number,
  tls?: RegistryTlsOptions,
): Promise<RegistryHandle> {
  const log = new Tail(256 << 10);
  // detached: its own process group, so stop() can kill the group.
  const child = spawn('docker-registry', ['serve', configPath], { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  const spawned = await new Promise<Error | undefined>((resolve) => {
    child.once('spawn', () => resolve(undefined));
    child.once('error', (e) => resolve(e));
  });
  if (spawned !== undefined || child.pid === undefined) {
    const code = (spawned as NodeJS.ErrnoException | undefined)?.code;
    if (code === 'ENOENT') throw new FixtureUnavailableError('docker-registry', 'not installed (Debian package docker-registry)', { cause: spawned });
    throw new RegistryError('cannot spawn docker-registry', '', { cause: spawned });
  }
  child.stdout?.on('data', (b: Buffer) => log.push(b.toString()));
  child.stderr?.on('data', (b: Buffer) => log.push(b.toString()));
  // The registry must not keep a test process alive that forgot stop(): the exit hook kills it.
  child.unref();
  unrefStream(child.stdout);
  unrefStream(child.stderr);
  // The watchdog outlives a SIGKILLed test process (own group): EOF on its stdin means we are gone.
  const watchdog = spawn('sh', ['-c', 'read _ignored; kill -s KILL -- "-$1" 2>/dev/null; rm -rf -- "$2"', 'soci-ts-registry-watchdog', String(child.pid), rootDir], {
    detached: true,
    stdio: ['pipe', 'ignore', 'ignore'],
  });
  watchdog.on('error', () => undefined); // sh is always there; a failure only loses the safety net
  watchdog.unref();
  unrefStream(watchdog.stdin);

  const reg = new RegistryHandle(port, auth, users, rootDir, issuer, child, watchdog, log, tls);
  live.add(reg);
  const want = auth === 'none' ? 200 : 401;
  const deadline = Date.now() + timeoutMs;
  let last = 'no answer yet';
  let lastError: unknown;
  try {
    for (;;) {
      if (reg.hasExited) {
        throw new RegistryError(`docker-registry exited (code ${String(child.exitCode)}, signal ${String(child.signalCode)}) before answering on ${reg.host}`, log.toString());
      }
      try {
        const res = await httpRequest(`${reg.url}/v2/`, { timeoutMs: 1000, tls });
        if (res.status === want) return reg;
        last = `GET /v2/ answered ${res.status}, expected ${want}`;
      } catch (e) {
        last = (e as Error).message;
        lastError = e;
      }
      if (Date.now() > deadline) {
        throw new RegistryError(`registry on ${reg.host} not ready after ${timeoutMs} ms (${last})`, log.toString(), { cause: lastError });
      }
      await sleep(50);
    }
  } catch (e) {
    // Kill this attempt but keep rootDir for a retry; the caller removes it on failure.
    const signal = (): void => {
      try {
        process.kill(-reg.pid, 'SIGKILL');
      } catch {
        // gone
      }
    };
    signal();
    await reg.waitExit(3000);
    watchdog.kill('SIGKILL');
    live.delete(reg);
    throw e;
  }
}

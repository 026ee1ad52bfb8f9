/**
 * Registry endpoints from containerd's `hosts.toml` layout (the `certs.d` directory), following
 * containerd's `remotes/docker/config/hosts.go`:
 *
 * - the host directory is the first that exists of `<dir>/<host>_<port>_` (hosts with a port),
 *   `<dir>/<host>` and `<dir>/_default`;
 * - with a `hosts.toml` there, the `[host."…"]` tables (mirrors) come first in file order, then the
 *   root `server` (default: the registry itself, `registry-1.docker.io` for `docker.io`);
 * - with no (or an empty) `hosts.toml`, Docker's layout is read instead: `*.crt` are CA files,
 *   `*.cert` client certificates with the matching `*.key`;
 * - with no directory at all, the registry itself is the only endpoint;
 * - an `http` endpoint with TLS configured (a CA, a client certificate or `skip_verify`, which the
 *   defaults set for loopback hosts) on a port other than 80 is HTTPS first, plain HTTP when the
 *   server does not speak TLS (containerd's `docker.NewHTTPFallback`): see {@link prefersHttps}.
 */

import { readdir, readFile, stat } from 'node:fs/promises';
import { isAbsolute, join, posix } from 'node:path';
import { parse as parseToml, TomlError } from 'smol-toml';
import { ConfigError } from './errors.js';
import { isLoopbackHost, isValidRegistryHost, registryApiHost, splitHostPort } from './reference.js';

export type HostCapability = 'pull' | 'resolve' | 'push' | 'referrers';

/** Capabilities in containerd's canonical order; an endpoint without `capabilities` has them all. */
const ALL_CAPABILITIES: readonly HostCapability[] = ['pull', 'resolve', 'push', 'referrers'];

export interface ClientCertPair {
  /** PEM certificate file (it holds the key too when `keyPath` is absent). */
  certPath: string;
  keyPath?: string;
}

/** One endpoint to try, in order. */
export interface HostConfig {
  /** `scheme://host[:port]` plus the API root path, e.g. `https://registry-1.docker.io/v2`. */
  url: string;
  scheme: 'http' | 'https';
  /** `host[:port]` to connect to (IPv6 in brackets). */
  host: string;
  /** API root path: `/v2` by default, `<prefix>/v2`, or the path as given with `override_path`. */
  path: string;
  capabilities: HostCapability[];
  skipVerify: boolean;
  /** Absolute paths of extra CA certificate files (added to the system roots). */
  caPaths: string[];
  clientCertPairs: ClientCertPair[];
  /** Extra request headers (names as written in the file). */
  headers: Record<string, string[]>;
  overridePath: boolean;
  /** Connect timeout from `dial_timeout`, when set. */
  dialTimeoutMs?: number;
}

export interface HostsConfig {
  /** Endpoints to try in order; never empty. */
  endpoints: HostConfig[];
  /** Things containerd silently ignores (unknown keys, shadowed files), for the caller to log. */
  warnings: string[];
  /** The host directory used, if one was found. */
  dir?: string;
}

export interface HostsOptions {
  /**
   * Scheme of the default endpoint (containerd's `DefaultScheme`, ctr's `--plain-http`). Unset:
   * https, except plain HTTP for loopback hosts with a port (see `isPlainHttpByDefault`), with
   * verification skipped, which makes the client try HTTPS first (see `prefersHttps`).
   */
  defaultScheme?: 'http' | 'https';
}

const ROOT_KEYS = new Set(['server', 'host', 'capabilities', 'ca', 'client', 'skip_verify', 'header', 'override_path', 'dial_timeout']);
const HOST_KEYS = new Set(['capabilities', 'ca', 'client', 'skip_verify', 'header', 'override_path', 'dial_timeout']);

type Table = Record<string, unknown>;

/** An endpoint as read from the file, before the default server fills in a missing one. */
interface ParsedHost {
  scheme?: 'http' | 'https';
  host?: string;
  path?: string;
  capabilities: HostCapability[];
  skipVerify?: boolean;
  caPaths: string[];
  clientCertPairs: ClientCertPair[];
  headers: Record<string, string[]>;
  overridePath: boolean;
  dialTimeoutMs?: number;
}

function emptyHost(): ParsedHost {
  return { capabilities: [...ALL_CAPABILITIES], caPaths: [], clientCertPairs: [], headers: {}, overridePath: false };
}

function isTable(v: unknown): v is Table {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Date);
}

function errnoCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

/** containerd's hostDirectory: `host:port` → `host_port_` (colons are awkward in paths). */
function hostDirectory(host: string): string {
  const idx = host.lastIndexOf(':');
  return idx > 0 ? `${host.slice(0, idx)}_${host.slice(idx + 1)}_` : host;
}

/** Candidate host directories in containerd's order (Unix). */
function hostPaths(root: string, host: string): string[] {
  const ported = hostDirectory(host);
  return [...(ported !== host ? [join(root, ported)] : []), join(root, host), join(root, '_default')];
}

async function findHostDir(root: string, host: string): Promise<string | undefined> {
  for (const p of hostPaths(root, host)) {
    try {
      await stat(p);
      return p;
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') throw new ConfigError(p, 'cannot read host directory', { cause: err });
    }
  }
  return undefined;
}

/** Go's time.ParseDuration, in milliseconds (non-negative only). */
function parseGoDuration(text: string): number | undefined {
  if (text === '0') return 0;
  const units: Record<string, number> = { ns: 1e-6, us: 1e-3, 'µs': 1e-3, 'μs': 1e-3, ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
  const re = /(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)/y;
  let total = 0;
  let pos = text.startsWith('+') ? 1 : 0;
  if (pos === text.length) return undefined;
  while (pos < text.length) {
    re.lastIndex = pos;
    const m = re.exec(text);
    if (m === null) return undefined;
    total += Number(m[1]) * units[m[2]!]!;
    pos = re.lastIndex;
  }
  return total;
}

class FileParser {
  readonly warnings: string[] = [];
  constructor(
    readonly file: string,
    readonly baseDir: string,
  ) {}

  fail(reason: string): never {
    throw new ConfigError(this.file, reason);
  }

  absPath(p: string): string {
    return isAbsolute(p) ? p : join(this.baseDir, p);
  }

  stringList(value: unknown, what: string): string[] {
    if (typeof value === 'string') return [value];
    if (Array.isArray(value) && value.every((v): v is string => typeof v === 'string')) return value;
    return this.fail(`${what} must be a string or an array of strings`);
  }

  /** Parses one endpoint table; `server` is the table name (mirrors) or the root `server` value. */
  endpoint(server: string | undefined, table: Table, where: string, known: Set<string>): ParsedHost {
    const result = emptyHost();
    for (const key of Object.keys(table)) {
      if (!known.has(key)) this.warnings.push(`${this.file}: unknown key ${where}${JSON.stringify(key)} ignored`);
    }
    const overridePath = table['override_path'];
    if (overridePath !== undefined) {
      if (typeof overridePath !== 'boolean') this.fail(`${where}override_path must be a boolean`);
      result.overridePath = overridePath;
    }
    if (server !== undefined && server !== '') Object.assign(result, this.serverUrl(server, result.overridePath, where));

    const skipVerify = table['skip_verify'];
    if (skipVerify !== undefined) {
      if (typeof skipVerify !== 'boolean') this.fail(`${where}skip_verify must be a boolean`);
      result.skipVerify = skipVerify;
    }

    const caps = table['capabilities'];
    if (caps !== undefined) {
      if (!Array.isArray(caps)) this.fail(`${where}capabilities must be an array of strings`);
      const list = this.stringList(caps, `${where}capabilities`);
      // An empty list means "all", as in containerd (it only looks at non-empty lists).
      if (list.length > 0) {
        const wanted = new Set<string>();
        for (const c of list) {
          const lower = c.toLowerCase();
          if (!(ALL_CAPABILITIES as readonly string[]).includes(lower)) this.fail(`${where}capabilities: unknown capability ${JSON.stringify(c)}`);
          wanted.add(lower);
        }
        result.capabilities = ALL_CAPABILITIES.filter((c) => wanted.has(c));
      }
    }

    const ca = table['ca'];
    if (ca !== undefined) result.caPaths = this.stringList(ca, `${where}ca`).map((p) => this.absPath(p));

    const client = table['client'];
    if (client !== undefined) result.clientCertPairs = this.clientPairs(client, where);

    const header = table['header'];
    if (header !== undefined) {
      if (!isTable(header)) this.fail(`${where}header must be a table`);
      for (const [name, value] of Object.entries(header)) {
        // Never echo header values: they are often Authorization tokens.
        const values = this.stringList(value, `${where}header ${JSON.stringify(name)}`);
        // defineProperty: a header named "__proto__" must stay a header, not replace the prototype.
        Object.defineProperty(result.headers, name, { value: values, enumerable: true, writable: true, configurable: true });
      }
    }

    const dial = table['dial_timeout'];
    if (dial !== undefined) {
      const ms = typeof dial === 'string' ? parseGoDuration(dial) : undefined;
      if (ms === undefined) this.fail(`${where}dial_timeout must be a duration string such as "1s" or "500ms"`);
      result.dialTimeoutMs = ms;
    }
    return result;
  }

  clientPairs(value: unknown, where: string): ClientCertPair[] {
    if (typeof value === 'string') return [{ certPath: this.absPath(value) }];
    if (!Array.isArray(value)) return this.fail(`${where}client must be a path, an array of paths or an array of [cert, key] pairs`);
    return value.map((item): ClientCertPair => {
      if (typeof item === 'string') return { certPath: this.absPath(item) };
      if (Array.isArray(item) && item.length === 2 && item.every((v): v is string => typeof v === 'string')) {
        const [cert, key] = item as [string, string];
        // An empty key means the key is in the certificate file.
        return key === '' ? { certPath: this.absPath(cert) } : { certPath: this.absPath(cert), keyPath: this.absPath(key) };
      }
      return this.fail(`${where}client entries must be paths or [cert, key] pairs of paths`);
    });
  }

  /** containerd's server URL rules: https when no scheme, `/v2` appended unless already there or override_path. */
  serverUrl(server: string, overridePath: boolean, where: string): Pick<ParsedHost, 'scheme' | 'host' | 'path'> {
    // Shown in errors without any user:password@ part.
    const shown = JSON.stringify(server.replace(/\/\/[^/?#]*@/, '//…@'));
    const withScheme = /^[A-Za-z][A-Za-z0-9+.-]*:\/\//.test(server) ? server : `https://${server}`;
    const m = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)([^?#]*)/.exec(withScheme);
    const scheme = m?.[1]?.toLowerCase();
    if (m === null || (scheme !== 'http' && scheme !== 'https')) this.fail(`${where}server ${shown} must be an http or https URL`);
    const host = m[2]!;
    if (!isValidRegistryHost(host)) this.fail(`${where}server ${shown} has no valid host[:port]`);
    let path = m[3]!;
    if (path !== '') {
      path = posix.normalize(path);
      // A bare "/" is no path (containerd would make it "//v2").
      path = path === '/' ? '' : path.replace(/\/+$/, '');
    }
    if (!overridePath && !path.endsWith('/v2')) path = `${path}/v2`;
    return { scheme, host, path };
  }
}

function parseHostsFile(file: string, baseDir: string, text: string): { hosts: ParsedHost[]; warnings: string[] } {
  let doc: Table;
  try {
    doc = parseToml(text);
  } catch (err) {
    if (err instanceof TomlError) {
      // The first line is the reason; the rest is a code excerpt, left out because header values may be secrets.
      const reason = (err.message.split('\n')[0] ?? 'invalid TOML').replace(/^Invalid TOML document:\s*/, '');
      throw new ConfigError(file, `invalid TOML: ${reason}`, { line: err.line, column: err.column });
    }
    throw new ConfigError(file, 'invalid TOML', { cause: err });
  }
  const p: FileParser = new FileParser(file, baseDir); // annotated so p.fail() narrows types
  const hosts: ParsedHost[] = [];
  const mirrors = doc['host'];
  if (mirrors !== undefined) {
    if (!isTable(mirrors)) p.fail('"host" must be a table of [host."<url>"] sections');
    // Object key order is the order tables first appear in the file, which is what containerd uses.
    for (const [name, table] of Object.entries(mirrors)) {
      const where = `host.${JSON.stringify(name)}.`;
      if (!isTable(table)) p.fail(`${where.slice(0, -1)} must be a table`);
      if (name === '') p.fail('host."" has no URL');
      hosts.push(p.endpoint(name, table, where, HOST_KEYS));
    }
  }
  const server = doc['server'];
  if (server !== undefined && typeof server !== 'string') p.fail('server must be a string');
  hosts.push(p.endpoint(server, doc, '', ROOT_KEYS));
  return { hosts, warnings: p.warnings };
}

/** Docker's certs.d layout: `*.crt` CA files, `*.cert` client certificates with an optional `*.key`. */
async function loadCertFiles(dir: string): Promise<ParsedHost> {
  const host = emptyHost();
  let names: string[];
  try {
    const entries = await readdir(dir, { withFileTypes: true });
    names = entries.filter((e) => !e.isDirectory()).map((e) => e.name).sort();
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return host;
    throw new ConfigError(dir, 'cannot list host directory', { cause: err });
  }
  for (const name of names) {
    if (name.endsWith('.crt')) host.caPaths.push(join(dir, name));
    if (name.endsWith('.cert')) {
      const certPath = join(dir, name);
      const keyPath = join(dir, `${name.slice(0, -'.cert'.length)}.key`);
      try {
        await stat(keyPath);
        host.clientCertPairs.push({ certPath, keyPath });
      } catch (err) {
        if (errnoCode(err) !== 'ENOENT') throw new ConfigError(keyPath, 'cannot read key file', { cause: err });
        host.clientCertPairs.push({ certPath });
      }
    }
  }
  return host;
}

/** Fills the server of the last endpoint when the file left it out, as containerd does. */
function fillDefault(parsed: ParsedHost, host: string, opts: HostsOptions): void {
  parsed.path = '/v2';
  parsed.capabilities = [...ALL_CAPABILITIES];
  parsed.host = registryApiHost(host);
  if (host !== parsed.host) {
    parsed.scheme = 'https';
  } else if (opts.defaultScheme !== undefined) {
    parsed.scheme = opts.defaultScheme;
  } else if (isLoopbackHost(host)) {
    const { port } = splitHostPort(host);
    parsed.scheme = port === undefined || port === '' || port === '443' ? 'https' : 'http';
    // containerd skips verification for loopback unless the port says plain HTTP outright.
    if (port !== '80') parsed.skipVerify = true;
  } else {
    parsed.scheme = 'https';
  }
}

function finish(parsed: ParsedHost): HostConfig {
  const scheme = parsed.scheme ?? 'https';
  const host = parsed.host ?? '';
  const path = parsed.path ?? '';
  const out: HostConfig = {
    url: `${scheme}://${host}${path}`,
    scheme,
    host,
    path,
    capabilities: parsed.capabilities,
    skipVerify: parsed.skipVerify ?? false,
    caPaths: parsed.caPaths,
    clientCertPairs: parsed.clientCertPairs,
    headers: parsed.headers,
    overridePath: parsed.overridePath,
  };
  if (parsed.dialTimeoutMs !== undefined) out.dialTimeoutMs = parsed.dialTimeoutMs;
  return out;
}

/**
 * Whether `endpoint` is to be tried over HTTPS before plain HTTP: containerd's rule for an
 * `http` endpoint that has TLS configured (CA files, client certificates or `skip_verify`, which
 * the defaults set for loopback hosts) on an explicit port other than 80, where the protocol is
 * ambiguous. containerd then sends HTTPS and falls back to HTTP (remembering it per host) when the
 * server answers the TLS handshake with plain HTTP or not at all; the registry client decides once
 * per endpoint in the same way. (containerd also counts a `skip_verify = false` written out; here
 * only a true one counts.)
 */
export function prefersHttps(endpoint: HostConfig): boolean {
  if (endpoint.scheme !== 'http') return false;
  const { port } = splitHostPort(endpoint.host);
  if (port === undefined || port === '' || port === '80') return false;
  return endpoint.skipVerify || endpoint.caPaths.length > 0 || endpoint.clientCertPairs.length > 0;
}

/** `endpoint` with another scheme (and URL). */
export function withScheme(endpoint: HostConfig, scheme: 'http' | 'https'): HostConfig {
  return { ...endpoint, scheme, url: `${scheme}://${endpoint.host}${endpoint.path}` };
}

/** The endpoint list for a registry host with no configuration at all. */
export function defaultHosts(host: string, opts: HostsOptions = {}): HostConfig[] {
  const parsed = emptyHost();
  fillDefault(parsed, host, opts);
  return [finish(parsed)];
}

/**
 * Reads the endpoints for registry `host` (as in the image reference: `docker.io`,
 * `127.0.0.1:5000`) from `configDir` (e.g. `/etc/containerd/certs.d`), with warnings.
 * Throws {@link ConfigError} for unreadable or malformed files (containerd would log and fall back
 * to the certificate files; a broken mirror config is better reported than half-applied).
 */
export async function readHostsConfig(configDir: string | undefined, host: string, opts: HostsOptions = {}): Promise<HostsConfig> {
  if (!isValidRegistryHost(host)) throw new ConfigError(host, 'not a valid registry host[:port]');
  const dir = configDir === undefined || configDir === '' ? undefined : await findHostDir(configDir, host);
  if (dir === undefined) return { endpoints: defaultHosts(host, opts), warnings: [] };

  const file = join(dir, 'hosts.toml');
  let text = '';
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw new ConfigError(file, 'cannot read file', { cause: err });
  }
  let parsed: ParsedHost[];
  let warnings: string[] = [];
  if (text.length === 0) {
    parsed = [await loadCertFiles(dir)];
  } else {
    ({ hosts: parsed, warnings } = parseHostsFile(file, dir, text));
    const shadowed = await loadCertFiles(dir).catch(() => emptyHost());
    if (shadowed.caPaths.length > 0 || shadowed.clientCertPairs.length > 0) {
      warnings.push(`${dir}: *.crt/*.cert files ignored because hosts.toml exists (name them with "ca"/"client" instead)`);
    }
  }
  const last = parsed[parsed.length - 1]!;
  if (last.host === undefined) fillDefault(last, host, opts);
  return { endpoints: parsed.map(finish), warnings, dir };
}

/**
 * The ordered endpoints for registry `host`: mirrors first, then the server. Warnings (keys
 * containerd ignores) go to `onWarning` when given.
 */
export async function loadHosts(
  configDir: string | undefined,
  host: string,
  opts: HostsOptions & { onWarning?: (message: string) => void } = {},
): Promise<HostConfig[]> {
  const { endpoints, warnings } = await readHostsConfig(configDir, host, opts);
  for (const w of warnings) opts.onWarning?.(w);
  return endpoints;
}

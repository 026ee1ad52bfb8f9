/**
 * Image references, parsed as docker and containerd do (distribution/reference: `regexp.go`,
 * `normalize.go`, `ParseNormalizedNamed` plus the default `latest` tag):
 *
 *   [host[:port]/]path[:tag][@digest]
 *
 * Familiar Docker Hub names are expanded: `ubuntu` → `docker.io/library/ubuntu:latest`,
 * `user/app` → `docker.io/user/app:latest`, `index.docker.io/x` → `docker.io/library/x`.
 */

import { InvalidReferenceError } from './errors.js';

/** Canonical domain of Docker Hub in references. */
export const DOCKER_HUB_DOMAIN = 'docker.io';
/** Legacy Docker Hub domain, canonicalised to `docker.io`. */
const LEGACY_DOCKER_HUB_DOMAIN = 'index.docker.io';
/** Host that actually serves the registry API for Docker Hub. */
export const DOCKER_HUB_API_HOST = 'registry-1.docker.io';
const OFFICIAL_REPO_PREFIX = 'library/';
const DEFAULT_TAG = 'latest';
/** Longest repository path (without the host) the grammar allows. */
export const MAX_REPOSITORY_LENGTH = 255;

// The grammar pieces of distribution/reference regexp.go, ASCII only as in Go's RE2.
const alphanumeric = '[a-z0-9]+';
const separator = '(?:[._]|__|[-]+)';
const pathComponent = `${alphanumeric}(?:${separator}${alphanumeric})*`;
const remoteName = `${pathComponent}(?:/${pathComponent})*`;
const domainNameComponent = '(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])';
const domainName = `${domainNameComponent}(?:\\.${domainNameComponent})*`;
const ipv6address = '\\[(?:[a-fA-F0-9:]+)\\]';
const domainAndPort = `(?:${domainName}|${ipv6address})(?::[0-9]+)?`;
const tagPat = '[\\w][\\w.-]{0,127}';
const digestPat = '[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9a-fA-F]{32,}';

const anchoredDomain = new RegExp(`^${domainAndPort}$`);
const anchoredRemoteName = new RegExp(`^${remoteName}$`);
const anchoredTag = new RegExp(`^${tagPat}$`);
const anchoredDigest = new RegExp(`^${digestPat}$`);
const anchoredIdentifier = /^[a-f0-9]{64}$/;
const sha256Encoded = /^[a-f0-9]{64}$/;

/** A parsed, normalised image reference. */
export interface ImageReference {
  /** Registry host as written (with port), `docker.io` for Docker Hub. Not the API host: see {@link registryApiHost}. */
  readonly host: string;
  /** Repository path without the host, e.g. `library/ubuntu`. */
  readonly repository: string;
  /** Tag; `latest` when the text had neither tag nor digest. */
  readonly tag?: string;
  /** Digest, always `sha256:<64 lowercase hex>`. */
  readonly digest?: string;
  /** `host/repository`. */
  readonly name: string;
  /** The short name docker shows: `ubuntu`, `user/app`, `ghcr.io/o/r` (no tag or digest). */
  readonly familiarName: string;
  /** Canonical form: `host/repository[:tag][@digest]`. */
  toString(): string;
}

class Reference implements ImageReference {
  constructor(
    readonly host: string,
    readonly repository: string,
    readonly tag: string | undefined,
    readonly digest: string | undefined,
  ) {}

  get name(): string {
    return `${this.host}/${this.repository}`;
  }

  get familiarName(): string {
    if (this.host !== DOCKER_HUB_DOMAIN) return this.name;
    // Only single-level official images lose the `library/` prefix (familiarizeName).
    const rest = this.repository.startsWith(OFFICIAL_REPO_PREFIX)
      ? this.repository.slice(OFFICIAL_REPO_PREFIX.length)
      : undefined;
    return rest !== undefined && !rest.includes('/') ? rest : this.repository;
  }

  toString(): string {
    return `${this.name}${this.tag === undefined ? '' : `:${this.tag}`}${this.digest === undefined ? '' : `@${this.digest}`}`;
  }
}

/** References are arbitrary user input: error messages show at most 200 characters of a part. */
function shorten(text: string): string {
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}

function subjectOf(text: string): string {
  return `reference ${JSON.stringify(shorten(text))}`;
}

/**
 * Splits a name into domain and remainder like `splitDockerDomain`: the first component is a host
 * only if it is `localhost`, contains `.` or `:`, or has an uppercase letter (repository paths
 * are lowercase, so an uppercase first component can only be a host name).
 */
function splitDockerDomain(text: string): { domain: string; remainder: string } {
  const slash = text.indexOf('/');
  if (slash === -1) return { domain: DOCKER_HUB_DOMAIN, remainder: OFFICIAL_REPO_PREFIX + text };
  const first = text.slice(0, slash);
  const rest = text.slice(slash + 1);
  let domain: string;
  let remainder: string;
  if (first === 'localhost') {
    [domain, remainder] = [first, rest];
  } else if (first === LEGACY_DOCKER_HUB_DOMAIN) {
    [domain, remainder] = [DOCKER_HUB_DOMAIN, rest];
  } else if (first.includes('.') || first.includes(':') || first.toLowerCase() !== first) {
    [domain, remainder] = [first, rest];
  } else {
    [domain, remainder] = [DOCKER_HUB_DOMAIN, text];
  }
  if (domain === DOCKER_HUB_DOMAIN && !remainder.includes('/')) remainder = OFFICIAL_REPO_PREFIX + remainder;
  return { domain, remainder };
}

/**
 * Parses an image reference as docker/containerd do. Throws {@link InvalidReferenceError} for
 * anything the grammar rejects, and for digests other than `sha256:<64 lowercase hex>`.
 * A reference with both tag and digest keeps both (the digest is what should be fetched).
 */
export function parseReference(text: string): ImageReference {
  const subject = subjectOf(text);
  if (text === '') throw new InvalidReferenceError(subject, 'repository name must have at least one component');
  if (anchoredIdentifier.test(text)) {
    throw new InvalidReferenceError(subject, 'invalid repository name, cannot specify 64-byte hexadecimal strings');
  }
  const { domain, remainder } = splitDockerDomain(text);

  // The repository part ends at the first `:` (tag) or `@` (digest); paths contain neither.
  const at = remainder.indexOf('@');
  const beforeDigest = at === -1 ? remainder : remainder.slice(0, at);
  const digest = at === -1 ? undefined : remainder.slice(at + 1);
  const colon = beforeDigest.indexOf(':');
  const repository = colon === -1 ? beforeDigest : beforeDigest.slice(0, colon);
  const tag = colon === -1 ? undefined : beforeDigest.slice(colon + 1);

  if (repository.toLowerCase() !== repository) {
    throw new InvalidReferenceError(subject, `invalid reference format: repository name (${shorten(repository)}) must be lowercase`);
  }
  if (!anchoredDomain.test(domain)) throw new InvalidReferenceError(subject, `invalid reference format: bad registry host ${JSON.stringify(shorten(domain))}`);
  if (!anchoredRemoteName.test(repository)) throw new InvalidReferenceError(subject, 'invalid reference format');
  if (tag !== undefined && !anchoredTag.test(tag)) {
    throw new InvalidReferenceError(subject, 'invalid reference format: tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}');
  }
  if (digest !== undefined && !anchoredDigest.test(digest)) throw new InvalidReferenceError(subject, 'invalid reference format: bad digest');
  if (repository.length > MAX_REPOSITORY_LENGTH) {
    throw new InvalidReferenceError(subject, `repository name must not be more than ${MAX_REPOSITORY_LENGTH} characters`);
  }
  if (digest !== undefined) {
    const sep = digest.indexOf(':');
    const algorithm = digest.slice(0, sep);
    if (algorithm !== 'sha256') throw new InvalidReferenceError(subject, `unsupported digest algorithm ${JSON.stringify(algorithm)} (only sha256 is supported)`);
    if (!sha256Encoded.test(digest.slice(sep + 1))) {
      throw new InvalidReferenceError(subject, 'invalid sha256 digest: must be 64 lowercase hexadecimal characters');
    }
  }
  return new Reference(domain, repository, tag === undefined && digest === undefined ? DEFAULT_TAG : tag, digest);
}

/** True when `host` (with optional port) is a valid registry host as the reference grammar has it. */
export function isValidRegistryHost(host: string): boolean {
  return anchoredDomain.test(host);
}

/** Host that serves the registry API for a reference host: `registry-1.docker.io` for Docker Hub. */
export function registryApiHost(host: string): string {
  return host === DOCKER_HUB_DOMAIN ? DOCKER_HUB_API_HOST : host;
}

/** Splits `host[:port]` (IPv6 in brackets) into hostname (brackets removed) and port. */
export function splitHostPort(host: string): { hostname: string; port?: string } {
  if (host.startsWith('[')) {
    const close = host.indexOf(']');
    if (close !== -1) {
      const rest = host.slice(close + 1);
      return { hostname: host.slice(1, close), port: rest.startsWith(':') ? rest.slice(1) : undefined };
    }
  }
  const colon = host.lastIndexOf(':');
  // A bare IPv6 address has several colons and no port.
  if (colon === -1 || host.indexOf(':') !== colon) return { hostname: host };
  return { hostname: host.slice(0, colon), port: host.slice(colon + 1) };
}

/** True for `localhost`, 127.0.0.0/8 and ::1, with or without a port (containerd's `IsLocalhost`). */
export function isLoopbackHost(host: string): boolean {
  const { hostname } = splitHostPort(host);
  if (hostname === 'localhost') return true;
  const v4 = parseIpv4(hostname);
  if (v4 !== undefined) return v4[0] === 127;
  const v6 = parseIpv6(hostname);
  if (v6 === undefined) return false;
  // ::1, or an IPv4-mapped loopback address (::ffff:127.x.y.z), as Go's IP.IsLoopback has it.
  if (v6.slice(0, 7).every((g) => g === 0) && v6[7] === 1) return true;
  return v6.slice(0, 5).every((g) => g === 0) && v6[5] === 0xffff && v6[6]! >> 8 === 127;
}

/** Dotted-quad IPv4 as Go's ParseIP accepts it (no leading zeros), or undefined. */
function parseIpv4(text: string): number[] | undefined {
  const parts = text.split('.');
  if (parts.length !== 4) return undefined;
  const out: number[] = [];
  for (const part of parts) {
    if (!/^(?:0|[1-9][0-9]{0,2})$/.test(part) || Number(part) > 255) return undefined;
    out.push(Number(part));
  }
  return out;
}

/** IPv6 text (with `::` and an optional trailing dotted quad) as eight 16-bit groups, or undefined. */
function parseIpv6(text: string): number[] | undefined {
  let body = text;
  const tailGroups: number[] = [];
  const lastColon = body.lastIndexOf(':');
  if (lastColon !== -1 && body.slice(lastColon + 1).includes('.')) {
    const v4 = parseIpv4(body.slice(lastColon + 1));
    if (v4 === undefined) return undefined;
    tailGroups.push((v4[0]! << 8) | v4[1]!, (v4[2]! << 8) | v4[3]!);
    // Keep a trailing `::` intact (`::ffff:1.2.3.4` → `::ffff`, `::1.2.3.4` → `::`).
    body = body.slice(0, body[lastColon - 1] === ':' ? lastColon + 1 : lastColon);
  }
  const halves = body.split('::');
  if (halves.length > 2) return undefined;
  const parse = (s: string): number[] | undefined => {
    if (s === '') return [];
    const groups = s.split(':');
    if (groups.some((g) => !/^[0-9a-fA-F]{1,4}$/.test(g))) return undefined;
    return groups.map((g) => parseInt(g, 16));
  };
  const head = parse(halves[0]!);
  const tail = halves.length === 2 ? parse(halves[1]!) : [];
  if (head === undefined || tail === undefined) return undefined;
  const given = head.length + tail.length + tailGroups.length;
  if (halves.length === 1) return given === 8 ? [...head, ...tailGroups] : undefined;
  if (given > 7) return undefined;
  return [...head, ...Array<number>(8 - given).fill(0), ...tail, ...tailGroups];
}

/**
 * Whether containerd would talk plain HTTP to `host` when no hosts.toml says otherwise: loopback
 * hosts (localhost, 127.0.0.0/8, ::1) with a port other than 443. A loopback host without a port
 * or on 443 is HTTPS (with verification skipped); port 80 is plain HTTP. containerd also tries
 * HTTPS first on ambiguous ports (not 80) and falls back to HTTP on a TLS handshake error.
 */
export function isPlainHttpByDefault(host: string): boolean {
  if (!isLoopbackHost(host)) return false;
  const { port } = splitHostPort(host);
  return port !== undefined && port !== '' && port !== '443';
}

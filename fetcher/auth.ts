/**
 * Registry authentication: the `WWW-Authenticate` challenge, basic auth, and bearer tokens from
 * the registry's token endpoint (the distribution token flow), cached per realm, service and scope
 * set until shortly before they expire, and thrown away when the registry refuses them.
 */
import { AuthError } from './errors.js';
import type { Credentials } from './credentials.js';

export interface Challenge {
  /** Lowercased scheme: `basic`, `bearer`, ... */
  scheme: string;
  /** Parameter names lowercased, values unquoted. */
  params: Record<string, string>;
}

const TOKEN_CHAR = /[!#$%&'*+\-.^_`|~0-9A-Za-z]/;
/** token68 (RFC 7235), then optional space, then a comma or the end. */
const TOKEN68 = /[A-Za-z0-9\-._~+/]+=*[ \t]*(?=,|$)/y;

/**
 * Parses a `WWW-Authenticate` header value (RFC 7235: one or more challenges, each a scheme and
 * comma-separated `name=value` or `name="quoted"` parameters). Throws {@link AuthError} naming
 * `subject` when it is malformed; the header value itself is not echoed (it is not secret, but
 * it is attacker-controlled and may be huge).
 */
export function parseWwwAuthenticate(header: string, subject: string): Challenge[] {
  const fail = (why: string): never => {
    throw new AuthError(subject, `malformed WWW-Authenticate header: ${why}`);
  };
  if (header.length > 16384) fail('longer than 16 KiB');
  const out: Challenge[] = [];
  let i = 0;
  const n = header.length;
  const skipSpace = (): void => {
    while (i < n && (header[i] === ' ' || header[i] === '\t')) i++;
  };
  const token = (): string => {
    const start = i;
    while (i < n && TOKEN_CHAR.test(header[i]!)) i++;
    return header.slice(start, i);
  };
  const quoted = (): string => {
    // header[i] === '"'
    i++;
    let v = '';
    while (i < n && header[i] !== '"') {
      if (header[i] === '\\') {
        i++;
        if (i >= n) break;
      }
      v += header[i];
      i++;
    }
    if (i >= n) fail('unterminated quoted string');
    i++;
    return v;
  };
  skipSpace();
  while (i < n) {
    // Empty list elements are allowed (",,").
    if (header[i] === ',') {
      i++;
      skipSpace();
      continue;
    }
    const scheme = token();
    if (scheme === '') fail(`unexpected character at position ${i}`);
    const challenge: Challenge = { scheme: scheme.toLowerCase(), params: {} };
    out.push(challenge);
    const afterScheme = i;
    skipSpace();
    // `scheme 1*SP token68`: the token68 is the whole challenge and runs to a comma or the end
    // (it may hold "/" and "+", and "=" only as padding). It is not kept: no scheme we use has one.
    if (i > afterScheme && i < n && header[i] !== ',') {
      TOKEN68.lastIndex = i;
      if (TOKEN68.test(header)) {
        i = TOKEN68.lastIndex;
        continue;
      }
    }
    // Parameters until the next scheme (a token followed by space or end, not by '=').
    for (;;) {
      skipSpace();
      if (i >= n) break;
      if (header[i] === ',') {
        i++;
        continue;
      }
      const save = i;
      const name = token();
      if (name === '') fail(`unexpected character at position ${i}`);
      skipSpace();
      if (header[i] !== '=') {
        // A token68 (e.g. `Negotiate abc==`) or the next challenge's scheme.
        if (Object.keys(challenge.params).length === 0 && i < n && header[i] !== ',' && !TOKEN_CHAR.test(header[i]!)) {
          fail(`unexpected character at position ${i}`);
        }
        i = save;
        break;
      }
      i++;
      skipSpace();
      if (header[i] === '=' || i >= n || header[i] === ',') fail(`parameter ${JSON.stringify(name)} has no value`);
      const value = header[i] === '"' ? quoted() : token();
      if (value === '' && header[i - 1] !== '"') fail(`parameter ${JSON.stringify(name)} has no value`);
      challenge.params[name.toLowerCase()] = value;
      skipSpace();
      if (i < n && header[i] !== ',') fail(`expected "," at position ${i}`);
    }
  }
  if (out.length === 0) fail('no challenge');
  return out;
}

/** `repository:<name>:<actions>` scopes for a set of repositories. */
export function repositoryScope(repository: string, actions: readonly string[]): string {
  return `repository:${repository}:${actions.join(',')}`;
}

export interface TokenResponse {
  token: string;
  /** Absolute expiry in ms since the epoch. */
  expiresAt: number;
}

/** Seconds a token is assumed to live when the server does not say (the distribution spec's default). */
export const DEFAULT_TOKEN_LIFETIME_S = 60;
/** Tokens are dropped this long before they expire, so a request does not race the expiry. */
const EXPIRY_MARGIN_MS = 10_000;

// Visible ASCII only: a token goes into a header.
const SAFE_TOKEN = /^[\x21-\x7e]+$/;

/**
 * Parses a token endpoint's JSON answer (`token` or `access_token`, `expires_in`, `issued_at`).
 * `now` is when the request was sent.
 */
export function parseTokenResponse(body: string, realm: string, now: number): TokenResponse {
  let parsed: unknown;
  try {
    parsed = JSON.parse(body);
  } catch (err) {
    throw new AuthError(realm, 'token endpoint answered with something that is not JSON', { cause: err });
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new AuthError(realm, 'token endpoint answer is not a JSON object');
  }
  const o = parsed as Record<string, unknown>;
  const token = typeof o.token === 'string' && o.token !== '' ? o.token : o.access_token;
  if (typeof token !== 'string' || token === '') throw new AuthError(realm, 'token endpoint answer has no token');
  if (!SAFE_TOKEN.test(token) || token.length > 65536) throw new AuthError(realm, 'token endpoint answered with a token that cannot be sent in a header');
  let lifetime = DEFAULT_TOKEN_LIFETIME_S;
  if (typeof o.expires_in === 'number' && Number.isFinite(o.expires_in) && o.expires_in > 0) lifetime = o.expires_in;
  let issued = now;
  if (typeof o.issued_at === 'string') {
    const t = Date.parse(o.issued_at);
    // Trust issued_at only when clocks roughly agree; a skewed server clock must not expire tokens early.
    if (Number.isFinite(t) && Math.abs(t - now) < 60_000) issued = Math.min(t, now);
  }
  return { token, expiresAt: issued + lifetime * 1000 };
}

export function basicAuthorization(credentials: Credentials): string | undefined {
  if (!('username' in credentials)) return undefined;
  return `Basic ${Buffer.from(`${credentials.username}:${credentials.password}`, 'utf8').toString('base64')}`;
}

/** One registry host's last challenge and the tokens obtained for it. */
interface HostAuthState {
  challenge?: Challenge;
  tokens: Map<string, Promise<TokenResponse>>;
}

/** Fetches a token from a realm; supplied by the HTTP layer (it owns connections and timeouts). */
export type TokenFetcher = (challenge: Challenge, scopes: readonly string[], credentials: Credentials | undefined) => Promise<TokenResponse>;

/**
 * Authorization header values per registry host. The first request to a host goes without auth;
 * its 401 challenge is remembered so that later requests authenticate up front.
 */
export class Authorizer {
  private readonly hosts = new Map<string, HostAuthState>();

  constructor(
    private readonly credentialsFor: (host: string) => Promise<Credentials | undefined>,
    private readonly fetchToken: TokenFetcher,
    private readonly now: () => number = Date.now,
  ) {}

  private state(host: string): HostAuthState {
    let s = this.hosts.get(host);
    if (s === undefined) {
      s = { tokens: new Map() };
      this.hosts.set(host, s);
    }
    return s;
  }

  /** The `Authorization` value to send to `host` for `scopes`, or undefined before any challenge. */
  async authorization(host: string, scopes: readonly string[]): Promise<string | undefined> {
    const s = this.hosts.get(host);
    if (s?.challenge === undefined) return undefined;
    const credentials = await this.credentialsFor(host);
    if (s.challenge.scheme === 'basic') {
      return credentials === undefined ? undefined : basicAuthorization(credentials);
    }
    if (s.challenge.scheme !== 'bearer') return undefined;
    // The request knows its repository and actions; the challenge's own scope (from whichever
    // request met the 401) is used only when the request has none.
    const allScopes = scopes.length > 0 ? [...new Set(scopes)].sort() : mergeScopes([], s.challenge.params.scope);
    const key = `${s.challenge.params.realm}\n${s.challenge.params.service ?? ''}\n${allScopes.join(' ')}`;
    const cached = s.tokens.get(key);
    if (cached !== undefined) {
      const t = await cached.catch(() => undefined);
      if (t !== undefined && t.expiresAt - EXPIRY_MARGIN_MS > this.now()) return `Bearer ${t.token}`;
      if (s.tokens.get(key) === cached) s.tokens.delete(key);
    }
    let pending = s.tokens.get(key);
    if (pending === undefined) {
      pending = this.fetchToken(s.challenge, allScopes, credentials);
      s.tokens.set(key, pending);
      // A failed fetch is not cached: the next request asks again.
      pending.catch(() => {
        if (s.tokens.get(key) === pending) s.tokens.delete(key);
      });
    }
    return `Bearer ${(await pending).token}`;
  }

  /**
   * Records a 401's challenge (or a 403 that may come from an expired token) and drops the token
   * that was refused. Returns true when retrying with fresh authorization can help: a new or
   * changed challenge, or a refused token (tokens can be revoked or expire early).
   */
  async refused(host: string, wwwAuthenticate: string | undefined, sentAuthorization: string | undefined, subject: string): Promise<boolean> {
    const s = this.state(host);
    let challenge: Challenge | undefined;
    if (wwwAuthenticate !== undefined && wwwAuthenticate !== '') {
      const all = parseWwwAuthenticate(wwwAuthenticate, subject);
      challenge = all.find((c) => c.scheme === 'bearer') ?? all.find((c) => c.scheme === 'basic');
      if (challenge === undefined) throw new AuthError(subject, `registry asks for an unsupported auth scheme (${all.map((c) => c.scheme).join(', ')})`);
      if (challenge.scheme === 'bearer') validateRealm(challenge, subject);
    }
    const previous = s.challenge;
    if (challenge !== undefined) s.challenge = challenge;
    if (sentAuthorization === undefined) return s.challenge !== undefined;
    if (sentAuthorization.startsWith('Bearer ')) {
      const token = sentAuthorization.slice(7);
      for (const [key, p] of s.tokens) {
        const t = await p.catch(() => undefined);
        // While we waited, a concurrent refusal may have put a fresh token under this key: keep that.
        if ((t === undefined || t.token === token) && s.tokens.get(key) === p) s.tokens.delete(key);
      }
      // The refused token is out of the cache now: dropped here, or by a concurrent request that
      // met the same refusal first and is fetching (or has fetched) a new one. Either way a retry
      // sends a different token; the caller bounds how often it retries.
      return true;
    }
    // Basic credentials were refused: sending them again cannot help.
    return !sameChallenge(previous, s.challenge) && s.challenge?.scheme === 'bearer';
  }

  /** Forgets a host's challenge and tokens (used by tests and on credential changes). */
  reset(host?: string): void {
    if (host === undefined) this.hosts.clear();
    else this.hosts.delete(host);
  }
}

function sameChallenge(a: Challenge | undefined, b: Challenge | undefined): boolean {
  if (a === undefined || b === undefined) return a === b;
  return a.scheme === b.scheme && a.params.realm === b.params.realm && a.params.service === b.params.service && a.params.scope === b.params.scope;
}

function validateRealm(c: Challenge, subject: string): void {
  const realm = c.params.realm;
  if (realm === undefined || realm === '') throw new AuthError(subject, 'malformed WWW-Authenticate header: bearer challenge without a realm');
  let url: URL;
  try {
    url = new URL(realm);
  } catch (err) {
    throw new AuthError(subject, 'malformed WWW-Authenticate header: the bearer realm is not a URL', { cause: err });
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw new AuthError(subject, `bearer realm uses ${url.protocol.replace(/:$/, '')}, not http(s)`);
  }
}

/** The request's scopes plus the challenge's (space separated), deduplicated and sorted. */
function mergeScopes(scopes: readonly string[], challengeScope: string | undefined): string[] {
  const set = new Set(scopes);
  if (challengeScope !== undefined) for (const s of challengeScope.split(' ')) if (s !== '') set.add(s);
  return [...set].sort();
}


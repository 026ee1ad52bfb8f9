/**
 * Registry authentication logic without a network: the `WWW-Authenticate` parser (RFC 7235
 * challenges, quoting, token68, malformed headers), the token endpoint's answer, and the
 * Authorizer's challenge memory, token cache, expiry and refusal handling with a fake token
 * fetcher. The real token flow against a real registry is in registry.test.ts.
 */
import t from 'tap';
import { Authorizer, parseTokenResponse, parseWwwAuthenticate, type Challenge, type TokenFetcher, type TokenResponse } from '../../fetcher/auth.js';
import type { Credentials } from '../../fetcher/credentials.js';
import { AuthError } from '../../fetcher/errors.js';

const SUBJECT = 'registry.example/app (registry.example)';

t.test('parseWwwAuthenticate: well-formed challenges', async (t) => {
  const cases: Array<[string, string, Challenge[]]> = [
    [
      'the distribution token challenge',
      'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:team/app:pull,push"',
      [{ scheme: 'bearer', params: { realm: 'https://auth.example/token', service: 'registry.example', scope: 'repository:team/app:pull,push' } }],
    ],
    ['basic', 'Basic realm="Registry Realm"', [{ scheme: 'basic', params: { realm: 'Registry Realm' } }]],
    [
      'scheme and parameter names are case-insensitive, values are not',
      'BEARER Realm="https://A.example/Token", SERVICE=Reg.Example',
      [{ scheme: 'bearer', params: { realm: 'https://A.example/Token', service: 'Reg.Example' } }],
    ],
    [
      'two challenges in one header',
      'Basic realm="a", Bearer realm="https://x.example/t", service="s"',
      [
        { scheme: 'basic', params: { realm: 'a' } },
        { scheme: 'bearer', params: { realm: 'https://x.example/t', service: 's' } },
      ],
    ],
    [
      "RFC 7235's own example: escaped quotes, a token value, two challenges",
      'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"',
      [
        { scheme: 'newauth', params: { realm: 'apps', type: '1', title: 'Login to "apps"' } },
        { scheme: 'basic', params: { realm: 'simple' } },
      ],
    ],
    [
      'commas and equals signs inside quoted strings',
      'Bearer realm="https://x.example/t?a=1,b=2",scope="repository:a:pull,push repository:b:pull"',
      [{ scheme: 'bearer', params: { realm: 'https://x.example/t?a=1,b=2', scope: 'repository:a:pull,push repository:b:pull' } }],
    ],
    ['an escaped backslash', 'Basic realm="a\\\\b"', [{ scheme: 'basic', params: { realm: 'a\\b' } }]],
    ['an empty quoted value', 'Basic realm=""', [{ scheme: 'basic', params: { realm: '' } }]],
    ['whitespace around "=" and ","', 'Bearer   realm = "x" ,  service = "y"  ', [{ scheme: 'bearer', params: { realm: 'x', service: 'y' } }]],
    ['empty list elements', ' , Basic realm="x",, ', [{ scheme: 'basic', params: { realm: 'x' } }]],
    ['a scheme without parameters', 'Basic', [{ scheme: 'basic', params: {} }]],
    ['two bare schemes', 'Negotiate, Basic realm="x"', [{ scheme: 'negotiate', params: {} }, { scheme: 'basic', params: { realm: 'x' } }]],
    ['a token68 with padding', 'Negotiate abc==', [{ scheme: 'negotiate', params: {} }]],
    ['a token68 without padding is not a second challenge', 'Negotiate YIIBhgYGKwYBBQUC', [{ scheme: 'negotiate', params: {} }]],
    ['a token68 with "/" and "+"', 'Negotiate a+b/c9==', [{ scheme: 'negotiate', params: {} }]],
    [
      'a token68 followed by another challenge',
      'Negotiate YIIB+g/x=, Bearer realm="https://x.example/t"',
      [
        { scheme: 'negotiate', params: {} },
        { scheme: 'bearer', params: { realm: 'https://x.example/t' } },
      ],
    ],
    ['a parameter later repeated: the last wins', 'Basic realm="a", realm="b"', [{ scheme: 'basic', params: { realm: 'b' } }]],
  ];
  for (const [name, header, want] of cases) {
    let got: Challenge[] | Error;
    try {
      got = parseWwwAuthenticate(header, SUBJECT);
    } catch (err) {
      got = err as Error;
    }
    t.same(got, want, name);
  }
});

t.test('parseWwwAuthenticate: malformed headers are AuthErrors that do not echo the header', async (t) => {
  const secretish = 'zz-not-to-be-echoed-zz';
  const cases: Array<[string, string]> = [
    ['empty', ''],
    ['only commas and spaces', ' , ,'],
    ['a parameter without a scheme', `realm="${secretish}"`],
    ['an unterminated quoted string', `Bearer realm="${secretish}`],
    ['a backslash at the very end', `Bearer realm="${secretish}\\`],
    ['parameters without the comma between', `Bearer realm="${secretish}" service="y"`],
    ['a parameter without a value after another', `Bearer realm="${secretish}",service=`],
    ['a parameter without a value before a comma', `Bearer realm="x", service=, scope="${secretish}"`],
    ['a character that is not a token', `Bearer @realm="${secretish}"`],
    ['non-ASCII in a token value', `Bearer realm=caf\u00e9${secretish}`],
    ['a control character', `Bearer realm="x",\u0001service="${secretish}"`],
    ['longer than 16 KiB', `Bearer realm="${secretish}${'a'.repeat(17000)}"`],
  ];
  for (const [name, header] of cases) {
    const err = (() => {
      try {
        return parseWwwAuthenticate(header, SUBJECT);
      } catch (e) {
        return e;
      }
    })();
    t.type(err, AuthError, name);
    if (!(err instanceof AuthError)) continue;
    t.match(err.message, /^registry\.example\/app \(registry\.example\): malformed WWW-Authenticate header: /, `${name}: names the subject and says why`);
    t.notOk(err.message.includes(secretish), `${name}: the header value is not echoed`);
    t.equal(err.subject, SUBJECT, `${name}: subject`);
  }
});

t.test('parseTokenResponse', async (t) => {
  const now = Date.UTC(2024, 0, 1, 12, 0, 0);
  const iso = (ms: number): string => new Date(ms).toISOString();
  const ok: Array<[string, unknown, TokenResponse]> = [
    ['token and expires_in', { token: 'abc', expires_in: 300 }, { token: 'abc', expiresAt: now + 300_000 }],
    ['access_token only: the default lifetime of 60 s', { access_token: 'xyz' }, { token: 'xyz', expiresAt: now + 60_000 }],
    ['token wins over access_token', { token: 't1', access_token: 't2', expires_in: 10 }, { token: 't1', expiresAt: now + 10_000 }],
    ['an empty token falls back to access_token', { token: '', access_token: 't2' }, { token: 't2', expiresAt: now + 60_000 }],
    ['issued_at shortly before now counts from then', { token: 'a', expires_in: 100, issued_at: iso(now - 20_000) }, { token: 'a', expiresAt: now + 80_000 }],
    ['issued_at in the future (skew) counts from now', { token: 'a', expires_in: 100, issued_at: iso(now + 20_000) }, { token: 'a', expiresAt: now + 100_000 }],
    ['issued_at an hour off (a wrong clock) is ignored', { token: 'a', expires_in: 100, issued_at: iso(now - 3_600_000) }, { token: 'a', expiresAt: now + 100_000 }],
    ['issued_at unparsable is ignored', { token: 'a', expires_in: 100, issued_at: 'yesterday-ish' }, { token: 'a', expiresAt: now + 100_000 }],
    ['expires_in 0 means the default', { token: 'a', expires_in: 0 }, { token: 'a', expiresAt: now + 60_000 }],
    ['negative expires_in means the default', { token: 'a', expires_in: -5 }, { token: 'a', expiresAt: now + 60_000 }],
    ['expires_in as a string means the default', { token: 'a', expires_in: '300' }, { token: 'a', expiresAt: now + 60_000 }],
    ['fractional expires_in', { token: 'a', expires_in: 1.5 }, { token: 'a', expiresAt: now + 1_500 }],
    ['a long JWT-like token', { token: `${'A'.repeat(4000)}.b-c_d~e` }, { token: `${'A'.repeat(4000)}.b-c_d~e`, expiresAt: now + 60_000 }],
  ];
  for (const [name, body, want] of ok) t.same(parseTokenResponse(JSON.stringify(body), 'realm', now), want, name);

  const secret = 'sek\u00e9ret token';
  const bad: Array<[string, string, RegExp]> = [
    ['not JSON', '<html>', /not JSON/],
    ['a JSON array', '["a"]', /not a JSON object/],
    ['JSON null', 'null', /not a JSON object/],
    ['no token at all', '{"expires_in":300}', /no token/],
    ['a token that is not a string', '{"token":42}', /no token/],
    ['empty token and access_token', '{"token":"","access_token":""}', /no token/],
    ['a token with a space and non-ASCII', JSON.stringify({ token: secret }), /cannot be sent in a header/],
    ['a token with CR LF (header injection)', JSON.stringify({ token: 'abc\r\nX-Evil: 1' }), /cannot be sent in a header/],
    ['a token over 64 KiB', JSON.stringify({ token: 'a'.repeat(65537) }), /cannot be sent in a header/],
  ];
  for (const [name, body, re] of bad) {
    t.throws(() => parseTokenResponse(body, 'token endpoint http://auth.example/token', now), AuthError, name);
    try {
      parseTokenResponse(body, 'token endpoint http://auth.example/token', now);
    } catch (err) {
      t.match((err as Error).message, re, `${name}: reason`);
      t.notOk((err as Error).message.includes('sek'), `${name}: the token is not echoed`);
      t.match((err as Error).message, /^token endpoint http:\/\/auth\.example\/token: /, `${name}: names the realm`);
    }
  }
});

// ------------------------------------------------------------------- Authorizer

const HOST = 'registry.example';
const BEARER = 'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:team/app:pull"';
const PULL = 'repository:team/app:pull';

interface FakeFetcher {
  fetch: TokenFetcher;
  calls: Array<{ challenge: Challenge; scopes: readonly string[]; credentials: Credentials | undefined }>;
  /** Next answers (a lifetime in ms, or an error); after them, 300 s tokens. */
  script: Array<number | Error>;
  /** Resolves pending fetches (they wait until this is called when `hold` is set). */
  hold: boolean;
  release(): void;
}

function fakeFetcher(clock: { now: number }): FakeFetcher {
  let n = 0;
  const waiting: Array<() => void> = [];
  const f: FakeFetcher = {
    calls: [],
    script: [],
    hold: false,
    release: () => {
      for (const w of waiting.splice(0)) w();
    },
    fetch: async (challenge, scopes, credentials) => {
      f.calls.push({ challenge, scopes: [...scopes], credentials });
      const step = f.script.shift() ?? 300_000;
      if (f.hold) await new Promise<void>((r) => waiting.push(r));
      else await Promise.resolve();
      if (step instanceof Error) throw step;
      n++;
      return { token: `tok${n}`, expiresAt: clock.now + step };
    },
  };
  return f;
}

/** An Authorizer with a fake clock and token fetcher; `null`: no credentials. */
function authorizer(creds: Credentials | null = { username: 'u', password: 'p' }) {
  const clock = { now: 1_000_000 };
  const fetcher = fakeFetcher(clock);
  const a = new Authorizer(async () => creds ?? undefined, fetcher.fetch, () => clock.now);
  return { a, clock, fetcher };
}

t.test('Authorizer: nothing is sent before a challenge; basic after a basic challenge', async (t) => {
  const { a, fetcher } = authorizer({ username: 'alice', password: 'pw:with:colons' });
  t.equal(await a.authorization(HOST, [PULL]), undefined, 'no challenge yet: no Authorization');
  t.equal(await a.refused(HOST, 'Basic realm="r"', undefined, SUBJECT), true, 'a first challenge: retry');
  t.equal(await a.authorization(HOST, [PULL]), `Basic ${Buffer.from('alice:pw:with:colons').toString('base64')}`);
  t.equal(await a.authorization('other.example', [PULL]), undefined, 'challenges are per host');
  t.equal(await a.refused(HOST, 'Basic realm="r"', 'Basic xyz', SUBJECT), false, 'refused basic credentials: retrying cannot help');
  t.equal(fetcher.calls.length, 0, 'no token fetched for basic');

  const anon = authorizer(null);
  t.equal(await anon.a.refused(HOST, 'Basic realm="r"', undefined, SUBJECT), true);
  t.equal(await anon.a.authorization(HOST, [PULL]), undefined, 'basic without credentials: nothing to send');
});

t.test('Authorizer: bearer tokens are fetched once per scope set and shared by concurrent requests', async (t) => {
  const { a, fetcher } = authorizer();
  t.equal(await a.refused(HOST, BEARER, undefined, SUBJECT), true);
  fetcher.hold = true;
  const many = Promise.all(Array.from({ length: 20 }, () => a.authorization(HOST, [PULL])));
  await new Promise((r) => setImmediate(r));
  fetcher.release();
  const got = await many;
  t.same(new Set(got), new Set(['Bearer tok1']), 'all 20 got the same token');
  t.equal(fetcher.calls.length, 1, 'one token request for 20 concurrent requests');
  fetcher.hold = false;
  t.equal(fetcher.calls[0]!.challenge.params.realm, 'https://auth.example/token');
  t.same(fetcher.calls[0]!.scopes, [PULL]);
  t.same(fetcher.calls[0]!.credentials, { username: 'u', password: 'p' });

  t.equal(await a.authorization(HOST, [PULL]), 'Bearer tok1', 'cached');
  t.equal(await a.authorization(HOST, [PULL, PULL]), 'Bearer tok1', 'duplicate scopes are the same set');
  const push = ['repository:team/app:pull,push', 'repository:team/base:pull'];
  t.equal(await a.authorization(HOST, push), 'Bearer tok2', 'another scope set: another token');
  t.same(fetcher.calls[1]!.scopes, [...push].sort(), 'scopes sorted');
  t.equal(await a.authorization(HOST, [...push].reverse()), 'Bearer tok2', 'scope order does not matter');
  t.equal(fetcher.calls.length, 2);
  t.equal(await a.authorization(HOST, []), 'Bearer tok1', "no scopes: the challenge's scope (the same set as PULL)");
  t.equal(fetcher.calls.length, 2);
});

t.test('Authorizer: tokens are refreshed shortly before they expire', async (t) => {
  const { a, clock, fetcher } = authorizer();
  await a.refused(HOST, BEARER, undefined, SUBJECT);
  fetcher.script.push(60_000);
  t.equal(await a.authorization(HOST, [PULL]), 'Bearer tok1');
  clock.now += 45_000;
  t.equal(await a.authorization(HOST, [PULL]), 'Bearer tok1', '15 s left: still used');
  clock.now += 6_000;
  t.equal(await a.authorization(HOST, [PULL]), 'Bearer tok2', '9 s left: refreshed');
  t.equal(fetcher.calls.length, 2);
});

t.test('Authorizer: a failed token fetch is not cached', async (t) => {
  const { a, fetcher } = authorizer();
  await a.refused(HOST, BEARER, undefined, SUBJECT);
  fetcher.script.push(new AuthError('token endpoint', 'refused'));
  await t.rejects(a.authorization(HOST, [PULL]), AuthError);
  t.equal(await a.authorization(HOST, [PULL]), 'Bearer tok1', 'the next request asks again');
  t.equal(fetcher.calls.length, 2);
});

t.test('Authorizer: a refused token is dropped, and every request that sent it may retry', async (t) => {
  const { a, fetcher } = authorizer();
  await a.refused(HOST, BEARER, undefined, SUBJECT);
  const first = await a.authorization(HOST, [PULL]);
  t.equal(first, 'Bearer tok1');
  // Three requests were in flight with tok1 and all come back 401 (the token was revoked).
  t.equal(await a.refused(HOST, BEARER, first, SUBJECT), true, 'the first refusal drops the token');
  t.equal(await a.authorization(HOST, [PULL]), 'Bearer tok2', 'the first retry gets a new token');
  t.equal(await a.refused(HOST, BEARER, first, SUBJECT), true, 'a later refusal of the same old token may retry too');
  t.equal(await a.refused(HOST, BEARER, first, SUBJECT), true, 'and so may a third');
  t.equal(await a.authorization(HOST, [PULL]), 'Bearer tok2', 'they share the new token: it was not dropped');
  t.equal(fetcher.calls.length, 2);

  // Concurrently, as the registry client does it.
  const { a: b, fetcher: f2 } = authorizer();
  await b.refused(HOST, BEARER, undefined, SUBJECT);
  const old = await b.authorization(HOST, [PULL]);
  const retries = await Promise.all(
    Array.from({ length: 10 }, async () => ((await b.refused(HOST, BEARER, old, SUBJECT)) ? b.authorization(HOST, [PULL]) : undefined)),
  );
  t.same(new Set(retries), new Set(['Bearer tok2']), '10 concurrent refusals all retry with one new token');
  t.equal(f2.calls.length, 2);
});

t.test('Authorizer: challenges that cannot be used', async (t) => {
  const { a } = authorizer();
  const cases: Array<[string, string, RegExp]> = [
    ['only an unsupported scheme', 'Negotiate abc==', /unsupported auth scheme \(negotiate\)/],
    ['bearer without a realm', 'Bearer service="x"', /bearer challenge without a realm/],
    ['bearer with an empty realm', 'Bearer realm=""', /bearer challenge without a realm/],
    ['bearer realm that is not a URL', 'Bearer realm="not a url"', /the bearer realm is not a URL/],
    ['bearer realm that is not http(s)', 'Bearer realm="file:///etc/passwd"', /bearer realm uses file, not http\(s\)/],
    ['malformed header', 'Bearer realm="x', /malformed WWW-Authenticate/],
  ];
  for (const [name, header, re] of cases) {
    await t.rejects(a.refused(HOST, header, undefined, SUBJECT), AuthError, name);
    await a.refused(HOST, header, undefined, SUBJECT).catch((e: Error) => t.match(e.message, re, `${name}: reason`));
  }
  t.equal(await a.authorization(HOST, [PULL]), undefined, 'no usable challenge was recorded');
  t.equal(
    await a.refused(HOST, 'Negotiate abc==, Basic realm="r", Bearer realm="https://a.example/t"', undefined, SUBJECT),
    true,
    'bearer is preferred among several',
  );
  t.match(await a.authorization(HOST, [PULL]), /^Bearer /);
});

t.test('Authorizer: a changed challenge makes a retry worthwhile; reset forgets', async (t) => {
  const { a, fetcher } = authorizer();
  await a.refused(HOST, 'Basic realm="r"', undefined, SUBJECT);
  t.equal(await a.refused(HOST, BEARER, 'Basic abc', SUBJECT), true, 'basic refused, but the registry now asks for bearer');
  t.equal(await a.authorization(HOST, [PULL]), 'Bearer tok1');
  a.reset(HOST);
  t.equal(await a.authorization(HOST, [PULL]), undefined, 'reset: no challenge');
  await a.refused(HOST, BEARER, undefined, SUBJECT);
  t.equal(await a.authorization(HOST, [PULL]), 'Bearer tok2', 'reset dropped the cached token too');
  t.equal(fetcher.calls.length, 2);
});

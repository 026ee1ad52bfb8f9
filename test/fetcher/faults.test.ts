/**
 * The registry client under faults: a seeded fault-injecting proxy (test/helpers/fault-proxy.ts)
 * sits between the client and a real registry and resets connections, stalls, answers
 * 500/503/429, truncates bodies, flips bytes, answers 200 to a Range request, redirects in
 * loops, redirects to (expiring) storage URLs and sends bodies slowly. Over 1000 range reads of
 * a real ~17 MiB gzip layer, span-aligned and checked against the span digests of a zTOC built
 * from the local layer file, go through it in waves; adjacent spans are issued in the same tick
 * so that coalesced reads meet the faults too.
 *
 * Every read must give exactly the bytes of the local layer file (the oracle) or a typed
 * FetcherError, and settle within a bound computed from the timeouts and the retry policy; no
 * unhandled rejection or uncaught exception may occur; heap and array-buffer memory must not
 * grow across waves; every fault kind must actually have happened. Then three small cases: a
 * redirect to ftp:// (ProtocolError, one request), storage URLs that expire behind a basic-auth
 * registry (reads re-resolve; Authorization never goes to storage), and stall-only (TimeoutError
 * after attempts × first-byte timeout + backoff, measured).
 *
 * The seed is printed; SOCI_TS_FAULT_SEED=<integer> reruns with another.
 */
import t from 'tap';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import {
  FetcherError,
  ProtocolError,
  RegistryClient,
  TimeoutError,
  type Descriptor,
  type Logger,
  type RegistryClientOptions,
  type RetryOptions,
  type Timeouts,
} from '../../fetcher/index.js';
import { buildZtocFromFile, LayerIndex } from '../../ztoc/index.js';
import { FAULT_KINDS, mulberry32, redirectToScheme, startFaultProxy, type FaultKind, type FaultProxy } from '../helpers/fault-proxy.js';
import { defaultImages, pushImage, type ImageLayer } from '../helpers/images.js';
import { startRegistry } from '../helpers/registry.js';

// ------------------------------------------------------------------- no unhandled anything

const stray: string[] = [];
process.on('unhandledRejection', (reason) => {
  stray.push(`unhandledRejection: ${reason instanceof Error ? (reason.stack ?? reason.message) : String(reason)}`);
});
process.on('uncaughtException', (err) => {
  stray.push(`uncaughtException: ${err.stack ?? err.message}`);
});
t.teardown(() => {
  if (stray.length > 0) t.fail(`unhandled rejections / uncaught exceptions:\n${stray.join('\n')}`);
});

// ------------------------------------------------------------------- parameters

const DEFAULT_SEED = 20_240_611;
const SEED = process.env.SOCI_TS_FAULT_SEED === undefined || process.env.SOCI_TS_FAULT_SEED === '' ? DEFAULT_SEED : Number(process.env.SOCI_TS_FAULT_SEED);
if (!Number.isSafeInteger(SEED)) throw new Error(`SOCI_TS_FAULT_SEED must be an integer, got ${JSON.stringify(process.env.SOCI_TS_FAULT_SEED)}`);
t.comment(`fault seed ${SEED} (rerun with SOCI_TS_FAULT_SEED=${SEED})`);

const FAULT_RATE = 0.25;
const SPAN_SIZE = 256 << 10;
const WAVES = 32;
const WAVE_READS = 32;
const TIMEOUTS: Timeouts = { connectMs: 1000, firstByteMs: 1000, idleMs: 1000 };
const RETRY: RetryOptions = { attempts: 4, baseDelayMs: 20, maxDelayMs: 200, maxRetryAfterMs: 300 };
/** slowBody: 32 KiB every 40 ms (800 KiB/s): slow, but far from the idle timeout. */
const SLOW_CHUNK = 32 << 10;
const SLOW_DELAY_MS = 40;
/** Longest run of adjacent spans issued in one tick. */
const MAX_RUN = 4;
/**
 * undici runs its header and body timeouts on its "fast timers", which tick every 499 ms: a
 * timeout fires up to about half a second after it is due (measured: 1000 ms → 1000..1500 ms).
 */
const TIMER_SLACK_MS = 500;

/**
 * Longest time one attempt of a range read may take. An attempt sends at most two requests that
 * can stall until the first-byte timeout (the cached storage URL, which then falls back to the
 * registry, and the storage URL the registry redirects to afresh; redirect-loop hops are answered
 * at once), connects once (loopback), may see one idle timeout, and transfers its body: the
 * transfer allowance covers a slowBody of the largest coalesced group (set below, from the real
 * span sizes) plus a second for a whole-blob answer and scheduling on a busy event loop (the
 * proxy shares this process).
 */
function attemptBoundMs(slowBodyMs: number): number {
  return TIMEOUTS.connectMs + 2 * (TIMEOUTS.firstByteMs + TIMER_SLACK_MS) + (TIMEOUTS.idleMs + TIMER_SLACK_MS) + slowBodyMs + 1000;
}
/** All attempts plus the longest backoff (or capped Retry-After) between each two. */
function readBoundMs(slowBodyMs: number): number {
  return RETRY.attempts * attemptBoundMs(slowBodyMs) + (RETRY.attempts - 1) * Math.max(RETRY.maxDelayMs, RETRY.maxRetryAfterMs);
}

// ------------------------------------------------------------------- memory

/** A real gc() (so that samples measure what is retained, not what is pending collection). */
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

interface MemSample {
  heapUsed: number;
  arrayBuffers: number;
  rss: number;
}
function sampleMemory(): MemSample {
  gc();
  gc();
  const m = process.memoryUsage();
  return { heapUsed: m.heapUsed, arrayBuffers: m.arrayBuffers, rss: m.rss };
}
const MiB = 1 << 20;
const mib = (n: number): string => `${(n / MiB).toFixed(1)} MiB`;

// ------------------------------------------------------------------- fixtures

const sha256 = (b: Uint8Array): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

const work = await mkdtemp(join(tmpdir(), 'soci-ts-faults-'));
t.teardown(() => rm(work, { recursive: true, force: true }));

const clients: RegistryClient[] = [];
const proxies: FaultProxy[] = [];
t.teardown(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await Promise.all(proxies.map((p) => p.close()));
});

function newClient(extra: Partial<RegistryClientOptions> = {}): RegistryClient {
  const c = new RegistryClient({
    hostsDir: '',
    plainHttp: true,
    // No docker config of the machine's: no credentials unless a case gives some.
    credentials: { configPath: join(work, 'no-docker-config.json'), env: {} },
    timeouts: TIMEOUTS,
    retry: RETRY,
    // More connections than reads in flight: no read waits behind another's stall, so the bound holds.
    connectionsPerHost: 2 * WAVE_READS,
    ...extra,
  });
  clients.push(c);
  return c;
}

async function newProxy(opts: Parameters<typeof startFaultProxy>[0]): Promise<FaultProxy> {
  const p = await startFaultProxy(opts);
  proxies.push(p);
  return p;
}

const images = await defaultImages();
const registry = await startRegistry();
t.teardown(() => registry.stop());
const pushed = await pushImage(images.multi.layoutDir, images.multi.tag, registry, 'faults/multi');

/** The largest gzip layer of `multi` (~17 MiB) and its local file. */
const bigLayer: ImageLayer = images.multi.layers.filter((l) => l.mediaType.endsWith('gzip')).sort((a, b) => b.size - a.size)[0]!;
const oracle = await readFile(bigLayer.path);
const desc: Descriptor = { mediaType: bigLayer.mediaType, digest: bigLayer.digest, size: bigLayer.size };
const index = new LayerIndex(await buildZtocFromFile(bigLayer.path, { spanSize: SPAN_SIZE }));
const spanDigests = index.ztoc.compressionInfo.spanDigests;
const spans = index.spans.map((s) => ({ id: s.id, start: s.compressedStart, end: s.compressedEnd, digest: spanDigests[s.id]! }));

t.test('fixture: the oracle and the zTOC agree', async (t) => {
  t.ok(pushed.layers.some((l) => l.digest === desc.digest && l.size === desc.size), 'the registry serves the layer');
  t.equal(sha256(oracle), desc.digest, 'the local layer file is the blob');
  t.ok(desc.size > 10 * MiB, `the layer is big (${mib(desc.size)})`);
  t.ok(spans.length >= 50, `many spans (${spans.length} of ${SPAN_SIZE >> 10} KiB uncompressed)`);
  t.ok(
    spans.every((s) => sha256(oracle.subarray(s.start, s.end)) === s.digest),
    'every span digest is the sha256 of its compressed byte range',
  );
});

// ------------------------------------------------------------------- the big run

type Outcome = 'ok' | 'wrong-bytes' | 'untyped' | 'hung' | string; // string: the FetcherError class

interface ReadResult {
  span: number;
  outcome: Outcome;
  ms: number;
  detail?: string;
}

t.test(`${WAVES * WAVE_READS} range reads through the fault proxy (seed ${SEED}, rate ${FAULT_RATE})`, async (t) => {
  const maxGroupBytes = Math.max(...spans.map((_, i) => spans[Math.min(spans.length - 1, i + MAX_RUN - 1)]!.end - spans[i]!.start));
  const slowBodyMs = Math.ceil(maxGroupBytes / SLOW_CHUNK) * SLOW_DELAY_MS;
  const boundMs = readBoundMs(slowBodyMs);
  t.comment(`per-read bound ${boundMs} ms (attempts ${RETRY.attempts} × ${attemptBoundMs(slowBodyMs)} ms + backoff); largest group ${mib(maxGroupBytes)}`);

  const proxy = await newProxy({
    upstream: registry.url,
    seed: SEED,
    rate: FAULT_RATE,
    faults: [...FAULT_KINDS],
    // Storage on another origin: the client caches the storage URL and sends later reads there.
    storageHostname: 'localhost',
    slowBodyChunkBytes: SLOW_CHUNK,
    slowBodyDelayMs: SLOW_DELAY_MS,
  });
  const logged = new Map<string, number>();
  const counting: Logger = {
    debug: (msg) => void logged.set(msg, (logged.get(msg) ?? 0) + 1),
    info: (msg) => void logged.set(msg, (logged.get(msg) ?? 0) + 1),
    warn: (msg) => void logged.set(msg, (logged.get(msg) ?? 0) + 1),
    error: (msg) => void logged.set(msg, (logged.get(msg) ?? 0) + 1),
    child: () => counting,
  };
  const client = newClient({ logger: counting });
  const repo = client.repository(`${proxy.host}/${pushed.repo}:${pushed.tag}`);

  // The manifest path is not faulted (the proxy's default match is blob GET/HEAD): resolve through it.
  const manifest = await repo.fetchManifest();
  t.equal(manifest.descriptor.digest, pushed.manifestDigest, 'manifest through the proxy');

  const plan = mulberry32(SEED ^ 0x5eed);
  const results: ReadResult[] = [];
  const mem: MemSample[] = [];
  let maxInFlight = 0;
  let inFlight = 0;

  /** One read with a watchdog: never rejects; a read past the bound is recorded as hung. */
  const read = (spanId: number): Promise<void> => {
    const s = spans[spanId]!;
    const started = performance.now();
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    let timer: NodeJS.Timeout | undefined;
    const watchdog = new Promise<ReadResult>((resolve) => {
      timer = setTimeout(() => resolve({ span: spanId, outcome: 'hung', ms: performance.now() - started }), boundMs);
    });
    const settled = repo.readRange(desc, s.start, s.end - s.start, { digest: s.digest }).then(
      (bytes): ReadResult => {
        const ms = performance.now() - started;
        if (bytes.equals(oracle.subarray(s.start, s.end))) return { span: spanId, outcome: 'ok', ms };
        return { span: spanId, outcome: 'wrong-bytes', ms, detail: `${bytes.length} bytes, sha256 ${sha256(bytes)}` };
      },
      (err: unknown): ReadResult => {
        const ms = performance.now() - started;
        if (err instanceof FetcherError) return { span: spanId, outcome: err.constructor.name, ms, detail: err.message };
        return { span: spanId, outcome: 'untyped', ms, detail: err instanceof Error ? (err.stack ?? err.message) : String(err) };
      },
    );
    return Promise.race([settled, watchdog]).then((r) => {
      clearTimeout(timer);
      inFlight--;
      results.push(r);
    });
  };

  const started = performance.now();
  for (let w = 0; w < WAVES; w++) {
    // A wave: WAVE_READS reads, as single spans and runs of 2..MAX_RUN adjacent spans. Half the
    // waves issue everything in one tick (the coalescer merges whatever touches); the others
    // yield between jobs, so that each run is a batch of its own.
    const sameTick = plan() < 0.5;
    const reads: Promise<void>[] = [];
    while (reads.length < WAVE_READS) {
      const run = plan() < 0.5 ? 1 : Math.min(WAVE_READS - reads.length, 2 + Math.floor(plan() * (MAX_RUN - 1)));
      const first = Math.floor(plan() * (spans.length - run + 1));
      for (let i = 0; i < run; i++) reads.push(read(first + i));
      if (!sameTick) await new Promise((r) => setImmediate(r));
    }
    await Promise.all(reads);
    mem.push(sampleMemory());
  }
  const elapsed = performance.now() - started;

  // ---- correctness: exactly right, or typed
  const wrong = results.filter((r) => r.outcome === 'wrong-bytes');
  const untyped = results.filter((r) => r.outcome === 'untyped');
  const hung = results.filter((r) => r.outcome === 'hung');
  const ok = results.filter((r) => r.outcome === 'ok');
  const typed = results.filter((r) => !['ok', 'wrong-bytes', 'untyped', 'hung'].includes(r.outcome));
  const byClass: Record<string, number> = {};
  for (const r of typed) byClass[r.outcome] = (byClass[r.outcome] ?? 0) + 1;
  const show = (rs: ReadResult[]): string =>
    rs
      .slice(0, 5)
      .map((r) => `span ${r.span} after ${Math.round(r.ms)} ms: ${r.detail ?? ''}`)
      .join('\n');

  t.equal(results.length, WAVES * WAVE_READS, `${results.length} reads settled`);
  t.equal(wrong.length, 0, `no read returned wrong bytes\n${show(wrong)}`);
  t.equal(untyped.length, 0, `every error is a FetcherError\n${show(untyped)}`);
  t.equal(hung.length, 0, `no read took longer than ${boundMs} ms\n${show(hung)}`);
  const okRate = ok.length / results.length;
  t.ok(okRate >= 0.95, `most reads succeed: ${ok.length}/${results.length} (${(okRate * 100).toFixed(1)} %)\n${show(typed)}`);
  t.ok(maxInFlight <= WAVE_READS, `at most ${WAVE_READS} reads in flight (${maxInFlight})`);
  t.same(stray, [], 'no unhandled rejection or uncaught exception');

  // ---- every fault kind happened
  const faults = proxy.stats.faults;
  for (const k of FAULT_KINDS) t.ok(faults[k] > 0, `fault ${k} happened (${faults[k]} times)`);
  t.ok(proxy.stats.storageRequests > 0, `storage URLs were used (${proxy.stats.storageRequests} requests)`);
  t.equal(proxy.stats.storageWithAuthorization, 0, 'no Authorization went to storage');

  // ---- memory: after two waves of warm-up, retained memory stays flat
  const base = mem[1]!;
  const last = mem[mem.length - 1]!;
  const peak = (k: keyof MemSample): number => Math.max(...mem.slice(1).map((m) => m[k]));
  const heapGrowth = last.heapUsed - base.heapUsed;
  const bufGrowth = last.arrayBuffers - base.arrayBuffers;
  const heapPeakGrowth = peak('heapUsed') - base.heapUsed;
  const rssGrowth = last.rss - base.rss;
  t.ok(heapGrowth < 8 * MiB, `heapUsed after the last wave within 8 MiB of wave 2 (${mib(base.heapUsed)} → ${mib(last.heapUsed)}, peak +${mib(heapPeakGrowth)})`);
  t.ok(heapPeakGrowth < 16 * MiB, `heapUsed after any wave within 16 MiB of wave 2 (peak +${mib(heapPeakGrowth)})`);
  t.ok(bufGrowth < 16 * MiB, `arrayBuffers after the last wave within 16 MiB of wave 2 (${mib(base.arrayBuffers)} → ${mib(last.arrayBuffers)})`);
  t.ok(rssGrowth < 96 * MiB, `rss after the last wave within 96 MiB of wave 2 (${mib(base.rss)} → ${mib(last.rss)})`);

  const maxMs = Math.max(...results.map((r) => r.ms));
  const kinds = FAULT_KINDS.map((k) => `${k}=${faults[k]}`).join(' ');
  const classes = Object.entries(byClass)
    .map(([k, v]) => `${k}=${v}`)
    .join(' ');
  // The distinct reasons of the typed errors (numbers blanked), for the log.
  const reasons = new Map<string, number>();
  for (const r of typed) {
    const reason = (r.detail ?? '').replace(/^.*?@sha256:[0-9a-f]{64}: /, '').replace(/\?….*$/, '').replace(/\b\d+\b/g, 'N');
    const key = `${r.outcome}: ${reason}`;
    reasons.set(key, (reasons.get(key) ?? 0) + 1);
  }
  for (const [k, v] of reasons) t.comment(`${v} × ${k}`);
  t.comment(
    `seed ${SEED}: reads ${results.length}, ok ${ok.length}, typed errors ${typed.length}${classes === '' ? '' : ` (${classes})`}, ` +
      `wrong ${wrong.length}, untyped ${untyped.length}, hung ${hung.length}; slowest read ${Math.round(maxMs)} ms (bound ${boundMs}); ` +
      `client retries ${logged.get('retrying') ?? 0}, storage fallbacks ${(logged.get('storage URL refused; asking the registry again') ?? 0) + (logged.get('storage URL failed; asking the registry again') ?? 0)}; ` +
      `proxy requests ${proxy.stats.requests}, passed ${proxy.stats.passed}, faults ${kinds}, loop hops ${proxy.stats.loopHops}, ` +
      `storage ${proxy.stats.storageRequests} (denied ${proxy.stats.storageDenied}); elapsed ${(elapsed / 1000).toFixed(1)} s; ` +
      `heap ${mib(base.heapUsed)} → ${mib(last.heapUsed)} (+${mib(heapGrowth)}, peak +${mib(heapPeakGrowth)}), ` +
      `arrayBuffers +${mib(bufGrowth)}, rss +${mib(rssGrowth)}`,
  );
});

// ------------------------------------------------------------------- small cases

t.test('a redirect to ftp:// is a ProtocolError, with no retry storm', async (t) => {
  const proxy = await newProxy({ upstream: registry.url, seed: SEED, rate: 0, faults: [] });
  redirectToScheme(proxy, 'ftp');
  const repo = newClient().repository(`${proxy.host}/${pushed.repo}:${pushed.tag}`);
  const s = spans[3]!;
  const started = performance.now();
  const err = await repo.readRange(desc, s.start, s.end - s.start, { digest: s.digest }).then(
    () => undefined,
    (e: unknown) => e,
  );
  const ms = performance.now() - started;
  t.ok(err instanceof ProtocolError, `ProtocolError (${String(err)})`);
  t.match(String((err as Error | undefined)?.message), /ftp/, 'the message names the scheme');
  t.equal(proxy.stats.schemeRedirects, 1, 'one request: a refused scheme is not retried');
  t.equal(proxy.stats.requests, 1, 'nothing else was sent');
  t.ok(ms < 1000, `fails at once (${Math.round(ms)} ms)`);
});

t.test('expiring storage redirects behind basic auth: reads re-resolve, no Authorization to storage', async (t) => {
  const authRegistry = await startRegistry({ auth: 'basic' });
  t.teardown(() => authRegistry.stop());
  const small = await pushImage(images.small.layoutDir, images.small.tag, authRegistry, 'faults/small');
  const layer = images.small.layers.slice().sort((a, b) => b.size - a.size)[0]!;
  const bytes = await readFile(layer.path);
  const d: Descriptor = { mediaType: layer.mediaType, digest: layer.digest, size: layer.size };
  t.ok(small.layers.some((l) => l.digest === d.digest), 'layer pushed');

  // Every blob GET redirects to storage on another origin (localhost vs 127.0.0.1): the client
  // must follow without the registry's Authorization.
  const proxy = await newProxy({ upstream: authRegistry.url, seed: SEED, rate: 1, faults: ['redirectToStorage'], storageHostname: 'localhost' });
  const creds = authRegistry.credentials!;
  const repo = newClient({ credentials: { user: `${creds.username}:${creds.password}`, configPath: join(work, 'no-docker-config.json'), env: {} } }).repository(
    `${proxy.host}/${small.repo}:${small.tag}`,
  );
  const ranges = Array.from({ length: 8 }, (_, i) => {
    const len = Math.floor(d.size / 8);
    return { offset: i * len, length: i === 7 ? d.size - 7 * len : len };
  });
  const check = async (what: string, rs: typeof ranges): Promise<void> => {
    const got = await Promise.all(rs.map((r) => repo.readRange(d, r.offset, r.length, { digest: sha256(bytes.subarray(r.offset, r.offset + r.length)) })));
    t.ok(
      got.every((b, i) => b.equals(bytes.subarray(rs[i]!.offset, rs[i]!.offset + rs[i]!.length))),
      `${what}: the right bytes`,
    );
  };

  await check('first read (redirected)', ranges.slice(0, 1));
  const redirectsAfterFirst = proxy.stats.faults.redirectToStorage;
  t.equal(redirectsAfterFirst, 1, 'the registry redirected once');
  t.equal(proxy.stats.storageRequests, 1, 'storage served it');

  await check('second read (cached storage URL)', ranges.slice(1, 2));
  t.equal(proxy.stats.faults.redirectToStorage, redirectsAfterFirst, 'the storage URL was reused, no new redirect');
  t.equal(proxy.stats.storageRequests, 2);

  proxy.expireStorageUrls();
  await check('after expiry', ranges.slice(2, 3));
  t.equal(proxy.stats.storageDenied, 1, 'the expired URL was refused once');
  t.equal(proxy.stats.faults.redirectToStorage, redirectsAfterFirst + 1, 'the client asked the registry again and was redirected anew');

  // Expired again, with several reads (separate requests, not coalesced) in flight at once.
  proxy.expireStorageUrls();
  await Promise.all(ranges.slice(3).map((r, i) => new Promise((res) => setTimeout(res, i)).then(() => check(`concurrent read ${i} after expiry`, [r]))));
  t.ok(proxy.stats.storageDenied >= 2, `expired again and refused (${proxy.stats.storageDenied} refusals in all)`);

  t.equal(proxy.stats.storageWithAuthorization, 0, 'no request to storage carried Authorization');
  t.ok(proxy.stats.storageRequests >= 4, `storage requests: ${proxy.stats.storageRequests}`);
});

t.test('stall only: TimeoutError after attempts × first-byte timeout + backoff', async (t) => {
  const proxy = await newProxy({ upstream: registry.url, seed: SEED, rate: 1, faults: ['stall'] });
  const repo = newClient().repository(`${proxy.host}/${pushed.repo}:${pushed.tag}`);
  const s = spans[5]!;
  const started = performance.now();
  const err = await repo.readRange(desc, s.start, s.end - s.start, { digest: s.digest }).then(
    () => undefined,
    (e: unknown) => e,
  );
  const ms = performance.now() - started;
  t.ok(err instanceof TimeoutError, `TimeoutError (${String(err)})`);
  t.equal((err as TimeoutError | undefined)?.phase, 'first-byte', 'in the first-byte phase');
  t.equal(proxy.stats.faults.stall, RETRY.attempts, `${RETRY.attempts} attempts, each stalled`);
  t.equal(proxy.stats.requests, RETRY.attempts, 'no more requests than attempts');
  // Backoff before retry n is in [d/2, d] with d = base·2^n (capped).
  let minBackoff = 0;
  let maxBackoff = 0;
  for (let n = 0; n < RETRY.attempts - 1; n++) {
    const d = Math.min(RETRY.maxDelayMs, RETRY.baseDelayMs * 2 ** n);
    minBackoff += d / 2;
    maxBackoff += d;
  }
  const low = RETRY.attempts * TIMEOUTS.firstByteMs + minBackoff;
  const high = RETRY.attempts * (TIMEOUTS.firstByteMs + TIMER_SLACK_MS) + maxBackoff + 250;
  t.ok(ms >= low - 20, `not before ${Math.round(low)} ms (${Math.round(ms)} ms)`);
  t.ok(ms <= high, `not after ${Math.round(high)} ms (${Math.round(ms)} ms)`);
  t.comment(`stall only: TimeoutError after ${Math.round(ms)} ms (expected ${Math.round(low)}..${Math.round(high)} ms)`);
});

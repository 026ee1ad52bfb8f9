/**
 * The span caches on a real file system, with real file contents from /usr/lib as spans:
 * content addressing checked against coreutils' `sha256sum`, corruption (truncated, altered,
 * too long) detected and removed, concurrent puts, LRU eviction and its order across a
 * restart, crash leftovers, shared spans released by holders, an unwritable directory (as
 * uid 65534) and a full file system (a 64 KiB tmpfs); the memory cache's byte bound and
 * layer removal; and a throughput figure for 4 MiB spans against plain readFile/writeFile.
 */
import t, { type Test } from 'tap';
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { appendFile, chmod, mkdir, mkdtemp, readdir, readFile, rm, stat, truncate, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { jsonLogger, type Logger } from '../../fetcher/index.js';
import { CacheError, CompressedSpanStore, InflatedSpanCache } from '../../fs/cache.js';
import { walkFiles } from '../helpers/real-files.js';

const run = promisify(execFile);
const CACHE_JS = fileURLToPath(new URL('../../fs/cache.js', import.meta.url));
const KiB = 1024;
const MiB = 1024 * 1024;

// --- real data ------------------------------------------------------------------------------

/** About 128 MiB of real file contents from /usr/lib, concatenated in a stable order. */
const DATA: Buffer = await (async () => {
  const want = 128 * MiB;
  const parts: Buffer[] = [];
  let have = 0;
  for await (const f of walkFiles('/usr/lib')) {
    if (f.size > 64 * MiB) continue;
    let b: Buffer;
    try {
      b = await readFile(f.path);
    } catch {
      continue;
    }
    parts.push(b);
    have += b.length;
    if (have >= want) break;
  }
  return Buffer.concat(parts).subarray(0, want);
})();
t.ok(DATA.length >= 64 * MiB, `${DATA.length} bytes of real data from /usr/lib`);

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');
const digestOf = (b: Uint8Array): string => `sha256:${sha(b)}`;

interface Span {
  digest: string;
  hex: string;
  bytes: Buffer;
}

let cursor = 0;
/** `count` spans of real data, each with a digest no earlier span had (identical files exist in /usr/lib). */
function spans(count: number, size: number | ((i: number) => number)): Span[] {
  const out: Span[] = [];
  while (out.length < count) {
    const n = typeof size === 'number' ? size : size(out.length);
    if (cursor + n > DATA.length) cursor = (cursor % 4093) + 1; // wrap to a new alignment
    const bytes = DATA.subarray(cursor, cursor + n);
    cursor += n;
    const hex = sha(bytes);
    if (seen.has(hex)) continue;
    seen.add(hex);
    out.push({ digest: `sha256:${hex}`, hex, bytes });
  }
  return out;
}
const seen = new Set<string>();

// --- helpers --------------------------------------------------------------------------------

const root = await mkdtemp(join(tmpdir(), 'soci-cache-test-'));
t.teardown(() => rm(root, { recursive: true, force: true }));
let dirs = 0;
const newDir = (): string => join(root, `store${dirs++}`, 'cache', 'spans');

interface LogLine {
  level: string;
  msg: string;
  [k: string]: unknown;
}
function captureLogger(): { logger: Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  return { lines, logger: jsonLogger('debug', { write: (l: string) => lines.push(JSON.parse(l) as LogLine) }) };
}

const fileOf = (dir: string, hex: string): string => join(dir, hex.slice(0, 2), hex);

async function exists(p: string): Promise<boolean> {
  return stat(p).then(
    () => true,
    () => false,
  );
}

/** Every file under dir, split into span files (by hex name) and temp files. */
async function listDir(dir: string): Promise<{ spans: Map<string, number>; temps: string[]; other: string[] }> {
  const out = { spans: new Map<string, number>(), temps: [] as string[], other: [] as string[] };
  for (const sub of await readdir(dir)) {
    const sp = join(dir, sub);
    if (!(await stat(sp)).isDirectory()) {
      out.other.push(sp);
      continue;
    }
    for (const name of await readdir(sp)) {
      const p = join(sp, name);
      if (name.includes('.tmp-')) out.temps.push(p);
      else if (/^[0-9a-f]{64}$/.test(name) && name.startsWith(sub)) out.spans.set(name, (await stat(p)).size);
      else out.other.push(p);
    }
  }
  return out;
}

/**
 * The store's view equals the disk: the same files, the byte total is the sum of their sizes,
 * no temp files, and `sha256sum` (the oracle) says each file's content hashes to its name.
 */
async function checkConsistent(t: Test, store: CompressedSpanStore): Promise<void> {
  await store.close();
  const disk = await listDir(store.dir);
  t.same(disk.temps, [], 'no temp files left');
  t.same([...disk.spans.keys()].sort(), store.digests().map((d) => d.slice(7)).sort(), 'the index lists exactly the files on disk');
  t.equal(store.bytes, [...disk.spans.values()].reduce((a, b) => a + b, 0), 'bytes = the sum of the file sizes');
  t.equal(store.files, disk.spans.size, 'files = the number of files');
  const paths = [...disk.spans.keys()].map((h) => fileOf(store.dir, h));
  if (paths.length === 0) return;
  const { stdout } = await run('sha256sum', paths, { maxBuffer: 1 << 24 });
  const bad = stdout
    .trim()
    .split('\n')
    .map((line) => /^([0-9a-f]{64}) [ *](.+)$/.exec(line))
    .filter((m) => m === null || !m[2].endsWith(`/${m[1].slice(0, 2)}/${m[1]}`));
  t.same(bad, [], `sha256sum: all ${paths.length} files are named <hex[0..2]>/<hex> of their content`);
}

async function cacheError(p: Promise<unknown>): Promise<CacheError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof CacheError) return err;
    throw err;
  }
  throw new Error('expected a CacheError, got success');
}

function runNode(args: string[], prefix: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const env = { ...process.env };
    delete env.NODE_OPTIONS;
    const [cmd, ...pre] = prefix;
    const child = spawn(cmd, [...pre, process.execPath, ...args], { env, cwd: '/', stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** A small deterministic PRNG (mulberry32). */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

// --- disk store -----------------------------------------------------------------------------

t.test('round trip: content-addressed files that sha256sum agrees with', async (t) => {
  const { logger, lines } = captureLogger();
  const dir = newDir();
  const store = await CompressedSpanStore.open({ dir, logger });
  t.equal((await stat(dir)).mode & 0o777, 0o700, 'the directory is created 0700');
  const sizes = [1, 100, 4 * KiB, 64 * KiB + 3, 1 * MiB, 4 * MiB - 17, 4 * MiB + 1234];
  const ss = spans(20, (i) => sizes[i % sizes.length]);
  for (const s of ss) await store.put(s.digest, s.bytes);
  for (const s of ss) {
    const got = await store.get(s.digest);
    t.ok(got !== undefined && got.equals(s.bytes), `get returns the ${s.bytes.length} bytes put`);
    t.ok(store.has(s.digest));
  }
  const file = fileOf(dir, ss[0].hex);
  t.equal((await stat(file)).mode & 0o777, 0o600, 'span files are 0600');
  t.equal((await stat(join(dir, ss[0].hex.slice(0, 2)))).mode & 0o777, 0o700, 'subdirectories are 0700');
  const { stdout } = await run('sha256sum', [file]);
  t.equal(stdout.split(' ')[0], ss[0].hex, 'sha256sum of the stored file is its name');
  const total = ss.reduce((a, s) => a + s.bytes.length, 0);
  t.match(store.stats(), { bytes: total, files: 20, puts: 20, hits: 20, misses: 0, evictions: 0, corruptDetected: 0, putErrors: 0 });

  await store.put(ss[3].digest, Buffer.from(ss[3].bytes)); // same content, another buffer
  t.equal(store.stats().puts, 20, 'a second put of a stored span writes nothing');
  t.equal(await store.get(digestOf(Buffer.from('never stored'))), undefined, 'an unknown digest is a miss');
  t.equal(store.stats().misses, 1);
  t.same(lines.filter((l) => l.level === 'warn'), [], 'no warnings');
  await checkConsistent(t, store);
});

t.test('put refuses bytes that do not match the digest, and malformed digests', async (t) => {
  const store = await CompressedSpanStore.open({ dir: newDir() });
  const [a, b] = spans(2, 10 * KiB);
  const err = await cacheError(store.put(a.digest, b.bytes));
  t.match(err, { name: 'CacheError', kind: 'digest-mismatch', subject: a.digest });
  t.match(err.message, b.hex, 'names the digest the bytes have');
  t.notOk(store.has(a.digest));
  t.equal(store.files, 0);
  for (const bad of ['sha256:ABC', `sha512:${a.hex}`, a.hex, `sha256:${a.hex.toUpperCase()}`]) {
    t.match(await cacheError(store.put(bad, a.bytes)), { kind: 'invalid-digest', subject: bad });
    t.match(await cacheError(store.get(bad)), { kind: 'invalid-digest' });
  }
  t.match(await cacheError(CompressedSpanStore.open({ dir: newDir(), maxBytes: -1 })), { kind: 'invalid-option', subject: 'maxBytes' });
  await checkConsistent(t, store);
});

t.test('corrupt files are never served: removed, warned once, counted; the next put works', async (t) => {
  const { logger, lines } = captureLogger();
  const dir = newDir();
  const store = await CompressedSpanStore.open({ dir, logger });
  const [s1, s2, s3, s4] = spans(4, 256 * KiB);
  for (const s of [s1, s2, s3, s4]) await store.put(s.digest, s.bytes);

  const cases: Array<[string, Span, (p: string) => Promise<void>, RegExp]> = [
    ['truncated', s1, (p) => truncate(p, 1000), /truncated: 1000 of 262144 bytes/],
    [
      'a flipped byte',
      s2,
      async (p) => {
        const b = await readFile(p);
        b[b.length >> 1] ^= 0x40;
        await writeFile(p, b);
      },
      /content does not match its digest \(sha256:[0-9a-f]{64}\)/,
    ],
    ['a byte appended', s3, (p) => appendFile(p, 'x'), /longer than the 262144 bytes stored/],
    ['emptied', s4, (p) => truncate(p, 0), /truncated: 0 of 262144 bytes/],
  ];
  let n = 0;
  for (const [what, s, damage, reason] of cases) {
    const file = fileOf(dir, s.hex);
    await damage(file);
    const before = store.bytes;
    // Several readers at once see the same bad file: one removal, one warning.
    const got = await Promise.all(Array.from({ length: 8 }, () => store.get(s.digest)));
    n++;
    t.same(got, Array(8).fill(undefined), `${what}: get answers undefined`);
    t.notOk(await exists(file), `${what}: the file is gone`);
    t.notOk(store.has(s.digest));
    t.equal(store.bytes, before - s.bytes.length, `${what}: its bytes leave the total`);
    t.equal(store.stats().corruptDetected, n, `${what}: counted once`);
    const warns = lines.filter((l) => l.level === 'warn' && l.digest === s.digest);
    t.equal(warns.length, 1, `${what}: one warning`);
    t.match(warns[0], { msg: /corrupt/, file, reason });
    await store.put(s.digest, s.bytes);
    t.ok((await store.get(s.digest))?.equals(s.bytes), `${what}: put again, then served`);
  }
  await checkConsistent(t, store);
});

t.test('a file removed behind the store is a miss, forgotten, without a warning', async (t) => {
  const { logger, lines } = captureLogger();
  const dir = newDir();
  const store = await CompressedSpanStore.open({ dir, logger });
  const [s] = spans(1, 8 * KiB);
  await store.put(s.digest, s.bytes);
  await rm(fileOf(dir, s.hex));
  t.equal(await store.get(s.digest), undefined);
  t.notOk(store.has(s.digest));
  t.match(store.stats(), { bytes: 0, files: 0, corruptDetected: 0, readErrors: 0 });
  t.equal(lines.filter((l) => l.level === 'warn').length, 0);
  await rm(join(dir, s.hex.slice(0, 2)), { recursive: true });
  await store.put(s.digest, s.bytes);
  t.ok((await store.get(s.digest))?.equals(s.bytes), 'a removed subdirectory is made again');
});

t.test('200 concurrent puts of the same and of different digests', async (t) => {
  const store = await CompressedSpanStore.open({ dir: newDir() });
  const ss = spans(50, (i) => 16 * KiB + i * 997);
  const same = spans(1, 300 * KiB)[0];
  const ops = Array.from({ length: 200 }, (_, i) => (i % 2 === 0 ? store.put(same.digest, Buffer.from(same.bytes)) : store.put(ss[(i >> 1) % 50].digest, ss[(i >> 1) % 50].bytes)));
  await Promise.all(ops);
  t.equal(store.files, 51, '51 distinct spans stored');
  t.equal(store.stats().puts, 51, 'each written once');
  for (const s of [same, ...ss]) t.ok((await store.get(s.digest))?.equals(s.bytes));
  await checkConsistent(t, store);
});

t.test('concurrent puts, gets, deletes and evictions keep the index equal to the disk', async (t) => {
  const { logger, lines } = captureLogger();
  const store = await CompressedSpanStore.open({ dir: newDir(), maxBytes: 2 * MiB, logger });
  const ss = spans(40, (i) => 64 * KiB + i * 4099);
  const rnd = prng(42);
  const ops: Promise<unknown>[] = [];
  let served = 0;
  for (let i = 0; i < 600; i++) {
    const s = ss[Math.floor(rnd() * ss.length)];
    const other = ss[(i * 7) % ss.length];
    const r = rnd();
    const delay = rnd() * 200;
    const op = async (): Promise<void> => {
      await sleep(delay); // spread over 200 ms so that operations overlap at every stage
      if (r < 0.5) await store.put(s.digest, s.bytes);
      else if (r < 0.9) {
        const b = await store.get(s.digest);
        if (b !== undefined) {
          served++;
          if (!b.equals(s.bytes)) throw new Error(`wrong bytes for ${s.digest}`);
        }
      } else if (r < 0.97) await store.delete(s.digest);
      else await store.deleteMany([s.digest, other.digest]);
    };
    ops.push(op());
  }
  await Promise.all(ops);
  // How many concurrent gets find their span depends on the timing of the puts and evictions
  // around them (0 under heavy disk load, 45–120 otherwise); each one served was checked above.
  t.comment(`${served} concurrent gets were served`);
  await store.put(ss[0]!.digest, ss[0]!.bytes);
  t.ok((await store.get(ss[0]!.digest))?.equals(ss[0]!.bytes), 'afterwards a put span is served, bytes equal');
  t.ok(store.bytes <= 2 * MiB, `total ${store.bytes} within the bound`);
  t.ok(store.stats().evictions > 0, `${store.stats().evictions} evictions happened`);
  t.comment(JSON.stringify(store.stats()));
  t.equal(lines.filter((l) => l.level === 'warn').length, 0, 'no corruption, no failures');
  await checkConsistent(t, store);
});

t.test('eviction keeps the total within maxBytes, least recently used first', async (t) => {
  const dir = newDir();
  const size = 256 * KiB;
  const store = await CompressedSpanStore.open({ dir, maxBytes: 10 * size });
  const ss = spans(13, size);
  for (const s of ss.slice(0, 10)) await store.put(s.digest, s.bytes);
  t.equal(store.bytes, 10 * size);
  // Use 0, 1, 2 (gets) and 6 (a put of a stored span): the oldest are now 3, 4, 5.
  for (const i of [0, 1, 2]) t.ok(await store.get(ss[i].digest));
  await store.put(ss[6].digest, ss[6].bytes);
  for (const s of ss.slice(10)) await store.put(s.digest, s.bytes);
  const kept = ss.map((s, i) => [i, s] as const).filter(([, s]) => store.has(s.digest)).map(([i]) => i);
  t.same(kept, [0, 1, 2, 6, 7, 8, 9, 10, 11, 12], 'spans 3, 4, 5 were evicted');
  for (const i of [3, 4, 5]) t.notOk(await exists(fileOf(dir, ss[i].hex)), `span ${i}'s file is gone once put resolves`);
  t.match(store.stats(), { bytes: 10 * size, evictions: 3 });
  t.same(
    store.digests(),
    [7, 8, 9, 0, 1, 2, 6, 10, 11, 12].map((i) => ss[i].digest),
    'digests() lists least recently used first',
  );

  // A span bigger than the whole store is not kept, and evicts nothing.
  const [big] = spans(1, 10 * size + 1);
  await store.put(big.digest, big.bytes);
  t.notOk(store.has(big.digest));
  t.notOk(await exists(fileOf(dir, big.hex)));
  t.match(store.stats(), { putTooLarge: 1, evictions: 3, files: 10 });

  // A span that fits alone but not beside the others evicts them all, never itself.
  const [large] = spans(1, 10 * size);
  await store.put(large.digest, large.bytes);
  t.same(store.digests(), [large.digest]);
  await checkConsistent(t, store);

  const none = await CompressedSpanStore.open({ dir: newDir(), maxBytes: 0 });
  await none.put(ss[0].digest, ss[0].bytes);
  t.match(none.stats(), { files: 0, putTooLarge: 1 }, 'maxBytes 0 keeps nothing');
});

t.test('restart: totals and LRU order come back from the files (mtimes)', async (t) => {
  const dir = newDir();
  const size = 64 * KiB;
  const ss = spans(6, (i) => size + i);
  const first = await CompressedSpanStore.open({ dir, mtimeFlushMs: 60_000 });
  for (const s of ss) await first.put(s.digest, s.bytes);
  for (const i of [2, 0, 4]) await first.get(ss[i].digest);
  const order = [1, 3, 5, 2, 0, 4].map((i) => ss[i].digest);
  t.same(first.digests(), order);
  await first.close(); // writes the recency of the three gets to mtimes

  const second = await CompressedSpanStore.open({ dir });
  t.equal(second.files, 6);
  t.equal(second.bytes, ss.reduce((a, s) => a + s.bytes.length, 0));
  t.same(second.digests(), order, 'the same LRU order after reopening');
  t.ok((await second.get(ss[1].digest))?.equals(ss[1].bytes), 'files are served after a restart');
  await second.close();

  // Reopened with a smaller bound: the least recently used go first.
  const third = await CompressedSpanStore.open({ dir, maxBytes: 3 * size + 100 });
  t.same(third.digests(), [0, 4, 1].map((i) => ss[i].digest), 'kept the three most recently used');
  t.equal(third.stats().evictions, 3);
  await checkConsistent(t, third);
});

t.test('open removes leftover temp files of dead writers, keeps live ones and other files', async (t) => {
  const { logger, lines } = captureLogger();
  const dir = newDir();
  const [s, x] = spans(2, 32 * KiB);
  const first = await CompressedSpanStore.open({ dir });
  await first.put(s.digest, s.bytes);
  await first.close();
  const dead = await new Promise<number>((resolve, reject) => {
    const c = spawn('true');
    c.on('error', reject);
    c.on('close', () => resolve(c.pid ?? 0));
  });
  const sub = join(dir, x.hex.slice(0, 2));
  await mkdir(sub, { recursive: true });
  const leftovers = {
    deadWriter: join(sub, `${x.hex}.tmp-${dead}-0a1b2c`),
    ourPidNotLive: join(sub, `${x.hex}.tmp-${process.pid}-3d4e5f`),
    livePidOld: join(sub, `${x.hex}.tmp-1-777777`),
  };
  const livePidRecent = join(sub, `${x.hex}.tmp-1-888888`);
  const unrelated = join(dir, 'README');
  for (const p of [...Object.values(leftovers), livePidRecent]) await writeFile(p, x.bytes.subarray(0, 1000));
  const old = (Date.now() - 2 * 3600_000) / 1000;
  await utimes(leftovers.livePidOld, old, old);
  await writeFile(unrelated, 'not a span');

  const store = await CompressedSpanStore.open({ dir, logger });
  for (const [what, p] of Object.entries(leftovers)) t.notOk(await exists(p), `removed: ${what}`);
  t.ok(await exists(livePidRecent), 'kept: a recent temp file of a live process (pid 1)');
  t.ok(await exists(unrelated), 'kept: a file that is not the store’s');
  t.match(store.stats(), { files: 1, bytes: s.bytes.length, tempFilesRemoved: 3 }, 'temp files are not counted');
  t.match(lines.find((l) => l.msg === 'span cache: opened'), { files: 1, tempFilesRemoved: 3 });
  await rm(livePidRecent);
  await rm(unrelated);
  await checkConsistent(t, store);
});

t.test('holders: a span shared by two layers survives until the last one releases it', async (t) => {
  const dir = newDir();
  const store = await CompressedSpanStore.open({ dir });
  const [shared, onlyA, onlyB, unheld] = spans(4, 20 * KiB);
  for (const s of [shared, onlyA, onlyB, unheld]) await store.put(s.digest, s.bytes);
  const layerA = 'sha256:' + 'a'.repeat(64);
  const layerB = 'sha256:' + 'b'.repeat(64);
  store.retain(layerA, [shared.digest, onlyA.digest]);
  store.retain(layerA, [shared.digest]); // idempotent per holder
  store.retain(layerB, [shared.digest, onlyB.digest]);
  t.equal(store.holders(shared.digest), 2);
  t.equal(store.holders(onlyA.digest), 1);

  t.equal(await store.release(layerA), 1, 'releasing A deletes only what A alone held');
  t.notOk(await exists(fileOf(dir, onlyA.hex)));
  t.ok(await exists(fileOf(dir, shared.hex)), 'the shared span survives');
  t.ok((await store.get(shared.digest))?.equals(shared.bytes));
  t.equal(store.holders(shared.digest), 1);
  t.equal(await store.release(layerA), 0, 'releasing twice is harmless');

  t.equal(await store.release(layerB, [shared.digest]), 1, 'a partial release');
  t.notOk(store.has(shared.digest));
  t.ok(store.has(onlyB.digest));
  t.equal(await store.release(layerB), 1);
  t.same(store.digests(), [unheld.digest], 'a span no one retained stays (an ordinary LRU entry)');

  // delete/deleteMany ignore holders: the caller decides.
  store.retain(layerA, [unheld.digest]);
  t.equal(await store.deleteMany([unheld.digest, onlyA.digest]), 1);
  t.equal(await store.release(layerA), 0, 'a release of a span deleted meanwhile deletes nothing');
  t.match(store.stats(), { deletes: 4, files: 0, bytes: 0 });
  await checkConsistent(t, store);
});

t.test('an unwritable directory (uid 65534): put does not throw, it counts and warns', async (t) => {
  const base = join(root, 'ro');
  const dir = join(base, 'spans');
  const seed = await CompressedSpanStore.open({ dir });
  const [kept, s] = spans(2, 64 * KiB);
  await seed.put(kept.digest, kept.bytes);
  await seed.close();
  // Readable but not writable by others: the root-owned tree is 0555 / files 0644.
  await chmod(root, 0o711);
  await chmod(base, 0o755);
  await chmod(dir, 0o555);
  await chmod(join(dir, kept.hex.slice(0, 2)), 0o555);
  await chmod(fileOf(dir, kept.hex), 0o644);
  t.teardown(() => chmod(root, 0o700));
  const probe = `
    const [js, dir, digest, input, keptDigest, missing] = process.argv.slice(1);
    const { readFile } = await import('node:fs/promises');
    const { CompressedSpanStore } = await import(js);
    const lines = [];
    const logger = { debug() {}, info() {}, warn(msg, f) { lines.push({ msg, ...f, error: undefined }); }, error() {}, child() { return logger; } };
    const store = await CompressedSpanStore.open({ dir, logger });
    const bytes = await readFile(input);
    await store.put(digest, bytes);
    const got = await store.get(digest);
    const kept = await store.get(keptDigest);
    let openErr;
    try { await CompressedSpanStore.open({ dir: missing }); } catch (e) { openErr = { name: e.name, kind: e.kind, subject: e.subject, message: e.message, cause: e.cause && e.cause.code }; }
    process.stdout.write(JSON.stringify({ uid: process.getuid(), stats: store.stats(), got: got === undefined ? null : got.length, kept: kept ? kept.length : null, lines, openErr }));
  `;
  const input = join(base, 'span-input');
  await writeFile(input, s.bytes, { mode: 0o644 });
  const missing = join(dir, 'sub', 'spans');
  const r = await runNode(
    ['--input-type=module', '-e', probe, CACHE_JS, dir, s.digest, input, kept.digest, missing],
    ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'],
  );
  t.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout) as {
    uid: number;
    stats: Record<string, number>;
    got: number | null;
    kept: number | null;
    lines: Array<Record<string, unknown>>;
    openErr: Record<string, unknown>;
  };
  t.equal(out.uid, 65534);
  t.match(out.stats, { putErrors: 1, puts: 0, files: 1 }, 'the failed write is counted, the readable span is indexed');
  t.equal(out.got, null, 'the span was not cached');
  t.equal(out.kept, kept.bytes.length, 'a readable span is still served');
  t.equal(out.lines.length, 1);
  t.match(out.lines[0], { msg: /write failed/, reason: 'EACCES', digest: s.digest, file: new RegExp(`^${dir}/`) });
  t.match(out.openErr, { name: 'CacheError', kind: 'io', subject: missing, cause: 'EACCES' }, 'open names the directory it cannot create');
  t.same((await listDir(dir)).temps, [], 'nothing left behind');
});

t.test('a full file system (64 KiB tmpfs): put does not throw, leaves no temp file', async (t) => {
  const mnt = join(root, 'tiny');
  await mkdir(mnt);
  try {
    await run('mount', ['-t', 'tmpfs', '-o', 'size=64k,mode=0700', 'tmpfs', mnt]);
  } catch (err) {
    t.plan(0, `cannot mount a tmpfs here: ${(err as Error).message.split('\n')[0]}`);
    return;
  }
  t.teardown(() => run('umount', [mnt]).then(() => undefined));
  const { logger, lines } = captureLogger();
  const store = await CompressedSpanStore.open({ dir: join(mnt, 'spans'), logger });
  const [big, big2, small] = [...spans(2, 256 * KiB), ...spans(1, 8 * KiB)];
  await store.put(big.digest, big.bytes);
  await store.put(big2.digest, big2.bytes);
  t.match(store.stats(), { putErrors: 2, puts: 0, files: 0, bytes: 0 });
  const warns = lines.filter((l) => l.level === 'warn');
  t.equal(warns.length, 1, 'repeated failures are logged once a minute, not per put');
  t.match(warns[0], { msg: /write failed/, reason: 'ENOSPC', digest: big.digest });
  t.same((await listDir(store.dir)).temps, [], 'the partial temp file is removed');
  await store.put(small.digest, small.bytes);
  t.ok((await store.get(small.digest))?.equals(small.bytes), 'a span that fits is stored afterwards');
  await checkConsistent(t, store);
});

// --- memory cache ---------------------------------------------------------------------------

t.test('inflated span cache: a byte bound, LRU eviction, no copies', async (t) => {
  const cache = new InflatedSpanCache({ maxBytes: 10 * MiB });
  const L = 'sha256:' + '1'.repeat(64);
  const [a, b, c, d] = spans(4, 4 * MiB).map((s) => Buffer.from(s.bytes)); // own ArrayBuffers
  t.ok(cache.set(L, 0, a));
  t.ok(cache.set(L, 1, b));
  t.equal(cache.get(L, 0), a, 'get returns the very buffer set (no copy)');
  t.ok(cache.set(L, 2, c)); // 12 MiB > 10: evicts the least recently used, span 1
  t.match(cache.stats(), { bytes: 8 * MiB, entries: 2, evictions: 1, hits: 1, misses: 0 });
  t.notOk(cache.has(L, 1));
  t.equal(cache.get(L, 1), undefined);
  t.equal(cache.get(L, 0), a); // now 2 is the oldest
  cache.set(L, 3, d);
  t.same([0, 1, 2, 3].map((i) => cache.has(L, i)), [true, false, false, true]);
  t.match(cache.stats(), { bytes: 8 * MiB, entries: 2, evictions: 2, hits: 2, misses: 1 });
  t.ok(cache.bytes <= cache.maxBytes);

  t.notOk(cache.set(L, 9, Buffer.alloc(10 * MiB + 1)), 'a buffer bigger than the bound is refused');
  t.equal(cache.stats().rejected, 1);
  t.notOk(cache.has(L, 9));

  const view = a.subarray(0, 100 * KiB);
  cache.set(L, 5, view);
  const got = cache.get(L, 5);
  t.not(got, view, 'a small view of a big ArrayBuffer is copied, not pinned');
  t.ok(got?.equals(view));
  t.equal(got?.buffer.byteLength, 100 * KiB);
  t.equal(cache.stats().compacted, 1);
  const small = Buffer.from('tiny, from the pool');
  cache.set(L, 6, small);
  t.equal(cache.get(L, 6), small, 'small buffers are never copied');

  t.throws(() => cache.set(L, -1, small), CacheError);
  t.throws(() => cache.get(L, 1.5), CacheError);
  t.throws(() => new InflatedSpanCache({ maxBytes: 0 }), CacheError);
});

t.test('inflated span cache: deleteLayer frees one layer’s spans only', async (t) => {
  const cache = new InflatedSpanCache({ maxBytes: 8 * MiB });
  const L1 = 'sha256:' + '1'.repeat(64);
  const L2 = 'sha256:' + '2'.repeat(64);
  const bufs = spans(8, (i) => 250 * KiB + i).map((s) => Buffer.from(s.bytes));
  for (let i = 0; i < 5; i++) cache.set(L1, i, bufs[i]);
  for (let i = 0; i < 3; i++) cache.set(L2, i, bufs[5 + i]);
  cache.set(L1, 2, bufs[0]); // a new value for a cached span
  const l2Bytes = bufs.slice(5).reduce((a, b) => a + b.length, 0);
  t.equal(cache.entries, 8);
  t.equal(cache.deleteLayer(L1), 5);
  t.equal(cache.entries, 3);
  t.equal(cache.bytes, l2Bytes, 'only the other layer’s bytes remain');
  t.same([0, 1, 2].map((i) => cache.get(L2, i)), bufs.slice(5));
  t.equal(cache.deleteLayer(L1), 0);

  // Spans evicted for space leave the layer's set too.
  const tight = new InflatedSpanCache({ maxBytes: 1 * MiB });
  for (let i = 0; i < 8; i++) tight.set(L1, i, bufs[i]);
  t.equal(tight.entries, 4);
  t.equal(tight.deleteLayer(L1), 4, 'counts only what was still cached');
  t.equal(tight.bytes, 0);
  t.equal(tight.stats().evictions, 4);
});

t.test('inflated span cache: a watcher sees every span of its layer come and go, and its reads count as uses', async (t) => {
  const cache = new InflatedSpanCache({ maxBytes: 1 * MiB });
  const L1 = 'sha256:' + '1'.repeat(64);
  const L2 = 'sha256:' + '2'.repeat(64);
  const bufs = spans(10, 250 * KiB).map((s) => Buffer.from(s.bytes));
  cache.set(L1, 0, bufs[0]);
  cache.set(L2, 0, bufs[1]);
  // What the native read path keeps: span → buffer, exactly as the cache holds it.
  const held = new Map<number, Buffer>();
  let used: number[] = [];
  const log: string[] = [];
  const unwatch = cache.watch(L1, {
    cached: (id, data) => {
      held.set(id, data);
      log.push(`+${id}`);
    },
    dropped: (id) => {
      held.delete(id);
      log.push(`-${id}`);
    },
    recentlyUsed: () => {
      const u = used;
      used = [];
      return u;
    },
  });
  t.same(log, ['+0'], 'spans cached before the watch are told at once; other layers are not');
  t.equal(held.get(0), bufs[0], 'the very buffer the cache holds');
  cache.set(L1, 1, bufs[2]);
  cache.set(L1, 2, bufs[3]);
  t.same(log, ['+0', '+1', '+2']);
  // Full (4 × 250 KiB with L2's span): the next set evicts the least recently used. The
  // watcher read span 0 where the cache could not see it, so span 0 stays and L2's goes.
  used = [0];
  cache.set(L1, 3, bufs[4]);
  t.ok(cache.has(L1, 0), 'a span the watcher reported used is kept');
  t.notOk(cache.has(L2, 0), 'the least recently used one goes instead');
  cache.set(L1, 4, bufs[5]); // evicts span 1 now (nothing reported)
  t.notOk(cache.has(L1, 1));
  t.same(log, ['+0', '+1', '+2', '+3', '-1', '+4'], 'the eviction is told during the set, before the new span');
  cache.set(L1, 2, bufs[6]); // a new value for a cached span
  t.equal(held.get(2), bufs[6], 'a replaced span is told with its new buffer');
  cache.delete(L1, 3);
  t.notOk(held.has(3), 'delete is told');
  cache.deleteLayer(L1);
  t.equal(held.size, 0, 'deleteLayer is told span by span');
  cache.set(L1, 5, bufs[7]);
  cache.clear();
  t.equal(held.size, 0, 'clear is told');
  t.same([...held.keys()], []);
  for (const [id, buf] of held) t.equal(cache.get(L1, id), buf);
  unwatch();
  cache.set(L1, 6, bufs[8]);
  t.notOk(held.has(6), 'after unwatch nothing is told');
  unwatch(); // idempotent
});

// --- throughput -----------------------------------------------------------------------------

t.test('throughput of 4 MiB spans (put, get) against writeFile/readFile in the same run', async (t) => {
  const count = 24;
  const rounds = 3;
  const ss = spans(count, 4 * MiB);
  const mb = (count * 4 * MiB) / 1e6;
  const rate = (ms: number): string => `${(mb / (ms / 1000)).toFixed(0)} MB/s`;
  const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[xs.length >> 1];
  const time = async (fn: () => Promise<void>): Promise<number> => {
    const t0 = performance.now();
    await fn();
    return performance.now() - t0;
  };
  const m = { hash: [] as number[], write: [] as number[], put: [] as number[], read: [] as number[], get: [] as number[], par: [] as number[] };
  for (let r = 0; r < rounds; r++) {
    // Each round writes fresh files (a put of a stored span writes nothing) and alternates
    // baseline and store, so that a noisy neighbour hurts both alike.
    const baseDir = join(root, `bench-base-${r}`);
    await mkdir(baseDir);
    const store = await CompressedSpanStore.open({ dir: newDir() });
    m.hash.push(
      await time(async () => {
        for (const s of ss) sha(s.bytes);
      }),
    );
    m.write.push(
      await time(async () => {
        for (const s of ss) await writeFile(join(baseDir, s.hex), s.bytes);
      }),
    );
    m.put.push(
      await time(async () => {
        for (const s of ss) await store.put(s.digest, s.bytes);
      }),
    );
    m.read.push(
      await time(async () => {
        for (const s of ss) await readFile(join(baseDir, s.hex));
      }),
    );
    let ok = 0;
    m.get.push(
      await time(async () => {
        for (const s of ss) if ((await store.get(s.digest))?.length === s.bytes.length) ok++;
      }),
    );
    t.equal(ok, count, `round ${r}: every get served`);
    m.par.push(
      await time(async () => {
        await Promise.all(ss.map((s) => store.get(s.digest)));
      }),
    );
    await store.close();
    await rm(baseDir, { recursive: true });
    await rm(store.dir, { recursive: true });
  }
  t.comment(`${count} spans of 4 MiB (${mb.toFixed(0)} MB of /usr/lib), page cache warm, median of ${rounds} rounds:`);
  t.comment(`  put ${rate(median(m.put))} (sha256 + temp file + rename) vs writeFile ${rate(median(m.write))}, sha256 alone ${rate(median(m.hash))}`);
  t.comment(`  get ${rate(median(m.get))} (read + sha256 verify) vs readFile ${rate(median(m.read))}; ${count} gets at once ${rate(median(m.par))}`);
  t.comment(`  per span: put ${(median(m.put) / count).toFixed(2)} ms, get ${(median(m.get) / count).toFixed(2)} ms`);
});

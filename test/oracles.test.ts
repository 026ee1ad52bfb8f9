/**
 * Checks that the test fixtures and the independent oracles are themselves sound, before
 * any zTOC test relies on them. Builds the special and usr-small trees (cached); the
 * usr-large layer is checked only when SOCI_TS_TEST_LARGE=1 or it is already cached.
 */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createHash } from 'node:crypto';
import t, { type test as tapTest } from 'tap';
import {
  COMPRESSIONS,
  CommandError,
  FIXTURE_VERSION,
  FixtureUnavailableError,
  SPECIAL,
  edgeLayer,
  hasCommand,
  layer,
  layerTar,
  makeTar,
  pruneStaleFixtures,
  run,
  testCacheDir,
  tree,
  type Compression,
  type LayerSpec,
} from './helpers/layers.js';
import {
  OracleError,
  buildCkptOracle,
  fileSha256,
  flatcJson,
  gzipDcRange,
  gzipDcRanges,
  gzipHeaderLength,
  gzipMembers,
  oracleBuild,
  oracleCheckpoints,
  oracleSpans,
  spanDigests,
  tarListFiles,
  tarTv,
  tarXO,
  unescapeTarName,
  type TarTvEntry,
} from './helpers/oracles.js';

const cache = testCacheDir();
const pruned = await pruneStaleFixtures(cache);
if (pruned.length > 0) t.comment(`removed stale fixtures: ${pruned.join(', ')}`);
const WIN = 32768;
const CP = 8 + 8 + 1 + WIN;

/** Times a build step and reports it (build times matter: the lead asked for them). */
async function timed<T>(tt: Tt, what: string, f: () => Promise<T>): Promise<T> {
  const t0 = Date.now();
  const r = await f();
  tt.comment(`${what}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  return r;
}

// A subtest's type: the argument of tap's test() last overload, (cb: (t) => any).
type Tt = Parameters<Parameters<typeof tapTest>[0]>[0];

/** A v2 (or v1) checkpoint blob built by hand from the spec's table, not by our writer. */
function handBlob(cps: readonly { in: number; out: number; bits: number; window?: Buffer }[], spanSize = 1 << 22, v1 = false): Buffer {
  const stored = v1 ? cps.slice(1) : cps;
  const b = Buffer.alloc(12 + stored.length * CP);
  b.writeInt32LE(cps.length, 0);
  b.writeBigInt64LE(BigInt(spanSize), 4);
  stored.forEach((c, i) => {
    const at = 12 + i * CP;
    b.writeBigInt64LE(BigInt(c.in), at);
    b.writeBigInt64LE(BigInt(c.out), at + 8);
    b.writeUInt8(c.bits, at + 16);
    c.window?.copy(b, at + 17);
  });
  return b;
}

async function skipIfUnavailable<T>(tt: Tt, f: () => Promise<T>): Promise<T | undefined> {
  try {
    return await f();
  } catch (e) {
    if (e instanceof FixtureUnavailableError) {
      tt.pass(e.message, { skip: e.message });
      return undefined;
    }
    throw e;
  }
}

const byName = (entries: readonly TarTvEntry[]): Map<string, TarTvEntry> =>
  new Map(entries.map((e) => [e.name.replace(/^\.\//, '').replace(/\/$/, ''), e]));

const scratch = async (tt: Tt): Promise<string> => {
  const dir = path.join(cache, 'scratch', `oracles-${process.pid}-${Math.random().toString(16).slice(2)}`);
  await fsp.mkdir(dir, { recursive: true });
  tt.teardown(() => fsp.rm(dir, { recursive: true, force: true }));
  return dir;
};

t.test('the special tree layer lists every entry we created (GNU tar)', async (t) => {
  const gz = await timed(t, 'special tree + posix tar + gzip-6', () =>
    layer(cache, { tree: 'special', format: 'posix', compression: 'gzip-6' }),
  );
  const entries = byName(await tarTv(gz, { xattrs: true }));

  const [h0, h1, h2] = SPECIAL.hardlinks;
  t.equal(entries.get(h0)?.type, '-', 'first name of the hardlinked file is a regular entry');
  for (const h of [h1, h2]) {
    t.equal(entries.get(h)?.type, 'h', `${h} is a hardlink`);
    t.equal(entries.get(h)?.link, `./${h0}`, `${h} links to ${h0}`);
  }
  for (const [name, target] of Object.entries(SPECIAL.symlinks)) {
    t.equal(entries.get(name)?.type, 'l', `${name} is a symlink`);
    t.equal(entries.get(name)?.link, target, `${name} -> ${target}`);
  }
  t.ok(Buffer.byteLength(SPECIAL.symlinks['links/long']) > 100, 'the long symlink target exceeds 100 bytes');
  for (const n of SPECIAL.longNames) t.equal(entries.get(n)?.type, '-', `long name (${Buffer.byteLength(n)} bytes) present`);
  t.ok(Buffer.byteLength(SPECIAL.longNames[1]) > 255, 'one path exceeds 255 bytes');
  for (const n of SPECIAL.name255) {
    t.equal(Buffer.byteLength(path.basename(n)), 255, 'a 255-byte component');
    t.equal(entries.get(n)?.type, '-', `${n.slice(0, 20)}… present`);
  }
  for (const n of SPECIAL.utf8) t.equal(entries.get(n)?.type, '-', `UTF-8 name ${JSON.stringify(n)} present`);
  for (const n of SPECIAL.emptyFiles) t.equal(entries.get(n)?.size, 0, `${n} is empty`);
  for (const n of SPECIAL.emptyDirs) t.equal(entries.get(n)?.type, 'd', `${n} is a directory`);
  t.equal(entries.get(SPECIAL.fifo)?.type, 'p', 'fifo');
  for (const [n, [maj, min]] of Object.entries(SPECIAL.charDevices)) {
    t.match(entries.get(n), { type: 'c', devMajor: maj, devMinor: min }, `char device ${n}`);
  }
  for (const [n, [maj, min]] of Object.entries(SPECIAL.blockDevices)) {
    t.match(entries.get(n), { type: 'b', devMajor: maj, devMinor: min }, `block device ${n}`);
  }
  for (const [n, attrs] of Object.entries(SPECIAL.xattrs)) {
    t.same([...(entries.get(n)?.xattrs ?? [])].sort(), Object.keys(attrs).sort(), `xattrs of ${n} visible with tar --xattrs -tvvf`);
  }
  for (const n of SPECIAL.whiteouts) t.equal(entries.get(n)?.type, '-', `whiteout ${n} is a plain file`);
  t.equal(entries.get('modes/setuid')?.mode, 'rwsr-xr-x');
  t.equal(entries.get('modes/setgid')?.mode, 'rwxr-sr-x');
  t.equal(entries.get('modes/sticky-dir')?.mode, 'rwxrwxrwt');
  t.equal(entries.get('modes/no-perms')?.mode, '---------');
  t.equal(entries.get('modes/all-bits')?.mode, 'rwsrwsrwt');
  for (const [n, [uid, gid]] of Object.entries(SPECIAL.owners)) t.match(entries.get(n), { uid, gid }, `owner of ${n}`);
  t.equal(entries.get('times/subsecond')?.mtime, '2021-03-04 05:06:07.123456789', 'nanosecond mtime survives in PAX');
  t.equal(entries.get('times/half')?.mtime, '2021-03-04 05:06:07.5');
  t.equal(entries.get('times/epoch')?.mtime, '1970-01-01 00:00:00');
  t.equal(entries.get('times/y2100')?.mtime, '2100-01-01 00:00:00');
  t.ok([...entries.keys()].some((n) => n.startsWith('docs/') && n.endsWith('.copyright')), 'real copyright files');
  t.ok([...entries.keys()].some((n) => n.startsWith('lib/') && n !== 'lib'), 'a real library file');

  // GNU format holds the same entries (long names via L/K records, big ids in base-256).
  const gnu = byName(await tarTv(await layer(cache, { tree: 'special', format: 'gnu', compression: 'none' })));
  t.same([...gnu.keys()].sort(), [...entries.keys()].sort(), 'gnu and posix tars list the same names');
  t.match(gnu.get('owners/big-ids'), { uid: 3000000, gid: 3000001 });
  t.equal(gnu.get('times/subsecond')?.mtime, '2021-03-04 05:06:07', 'gnu format keeps whole seconds');

  // ustar cannot represent the special tree; the failure is loud, not a silently short tar.
  const special = await tree(cache, 'special');
  const out = path.join(await scratch(t), 'special.ustar');
  await t.rejects(makeTar(special, out, 'ustar'), CommandError, 'ustar rejects big uids and long names');
  await t.rejects(fsp.access(out), 'no half-written ustar left behind');
});

t.test('a regular file read back with tar -xO equals the file in the tree', async (t) => {
  const special = await tree(cache, 'special');
  const gz = await layer(cache, { tree: 'special', format: 'posix', compression: 'gzip-6' });
  const files = await tarListFiles(gz);
  const lib = files.find((n) => n.startsWith('./lib/'));
  t.ok(lib, 'the library is listed as a regular file');
  if (lib === undefined) return;
  t.equal(await tarXO(gz, lib), await fileSha256(path.join(special, lib)));
  t.notOk(files.includes(`./${SPECIAL.hardlinks[1]}`), 'hardlinks are not regular files');
  const utf = SPECIAL.utf8[3];
  t.equal(await tarXO(gz, `./${utf}`), await fileSha256(path.join(special, utf)), 'names with a tab survive the escape round trip');
  t.equal(unescapeTarName('a\\303\\251\\tb\\\\'), 'aé\tb\\');
});

t.test('every compression variant inflates to the original tar bytes', async (t) => {
  for (const tr of ['special', 'usr-small'] as const) {
    for (const format of ['posix', 'gnu', 'ustar'] as const) {
      if (tr === 'special' && format === 'ustar') continue; // cannot be built (tested above)
      const tarPath = await timed(t, `${tr} ${format} tar`, () => layerTar(cache, tr, format));
      const want = await fileSha256(tarPath);
      const size = (await fsp.stat(tarPath)).size;
      const variants: readonly Compression[] = format === 'posix' || tr === 'special' ? COMPRESSIONS : ['gzip-6'];
      for (const compression of variants) {
        if (compression === 'none') continue;
        const spec: LayerSpec = { tree: tr, format, compression };
        const gz = await skipIfUnavailable(t, () => timed(t, `${tr} ${format} ${compression}`, () => layer(cache, spec)));
        if (gz === undefined) continue;
        const got = await gzipDcRange(gz, 0, Infinity);
        t.equal(got.length, size, `${tr}/${format}/${compression}: length`);
        t.equal(got.sha256, want, `${tr}/${format}/${compression}: sha256`);
      }
    }
  }
  const small = await layerTar(cache, 'usr-small', 'gnu');
  const size = (await fsp.stat(small)).size;
  t.ok(size >= 20e6 && size <= 45e6, `usr-small is 20–40 MB (${(size / 1e6).toFixed(1)} MB)`);
  t.same(
    (await tarListFiles(small)).sort(),
    (await tarListFiles(await layerTar(cache, 'usr-small', 'ustar'))).sort(),
    'ustar and gnu tars of usr-small hold the same files',
  );
});

t.test('gzip members and headers', async (t) => {
  const tarPath = await layerTar(cache, 'special', 'posix');
  const tarSize = (await fsp.stat(tarPath)).size;

  const multi = await layer(cache, { tree: 'special', format: 'posix', compression: 'multi-member' });
  const members = await gzipMembers(multi);
  t.equal(members.length, 3, 'multi-member has 3 gzip members');
  t.equal(members[0]?.start, 0);
  for (let i = 1; i < members.length; i++) t.equal(members[i]?.start, members[i - 1]?.end, `member ${i} follows member ${i - 1}`);
  t.equal(members.at(-1)?.end, (await fsp.stat(multi)).size, 'the last member ends at the file end');
  t.equal(members.reduce((s, m) => s + m.uncompressedSize, 0), tarSize, 'members inflate to the whole tar');
  const bytes = await fsp.readFile(multi);
  for (const m of members) t.equal(gzipHeaderLength(bytes.subarray(m.start), multi), m.headerLength, `member ${m.index} header length`);

  const plain = await layer(cache, { tree: 'special', format: 'posix', compression: 'gzip-6' });
  t.equal(gzipHeaderLength(await fsp.readFile(plain)), 10, 'gzip from stdin: 10-byte header');
  t.equal((await gzipMembers(plain)).length, 1, 'gzip -6 writes one member');
  const named = await layer(cache, { tree: 'special', format: 'posix', compression: 'gzip-named' });
  const namedBytes = await fsp.readFile(named);
  t.equal((namedBytes[3] ?? 0) & 0x08, 0x08, 'gzip on a named file sets FNAME');
  t.equal(
    gzipHeaderLength(namedBytes),
    10 + Buffer.byteLength(`special-posix-v${FIXTURE_VERSION}.tar`) + 1,
    'header holds the tar name and its NUL',
  );
  t.equal((await gzipMembers(named))[0]?.headerLength, gzipHeaderLength(namedBytes), 'zlib agrees on the header length');
  t.throws(() => gzipHeaderLength(Buffer.from('not gzip at all')), OracleError);
});

t.test('degenerate layers', async (t) => {
  const empty = await edgeLayer(cache, 'empty-gzip');
  t.equal((await gzipDcRange(empty, 0, Infinity)).length, 0, 'empty gzip inflates to nothing');
  t.match(await gzipMembers(empty), [{ uncompressedSize: 0, headerLength: 10 }]);
  const eof = await edgeLayer(cache, 'eof-tar');
  const eofBytes = await fsp.readFile(eof);
  t.ok(eofBytes.length >= 1024 && eofBytes.every((b) => b === 0), `end-marker tar is ${eofBytes.length} zero bytes`);
  t.same(await tarTv(eof), [], 'and lists no entries');
  const eofGz = await edgeLayer(cache, 'eof-tar-gz');
  t.equal((await gzipDcRange(eofGz, 0, Infinity)).sha256, await fileSha256(eof));
  t.equal((await fsp.stat(await edgeLayer(cache, 'zero-bytes'))).size, 0);
});

t.test('ckpt oracle reproduces gzip -dc from a hand-made checkpoint 0', async (t) => {
  await buildCkptOracle(cache);
  const dir = await scratch(t);
  const specs: Compression[] = ['gzip-1', 'gzip-6', 'gzip-9', 'gzip-named', 'node-zlib', 'multi-member', 'pigz'];
  for (const compression of specs) {
    if (compression === 'pigz' && !(await hasCommand('pigz'))) {
      t.pass('pigz', { skip: 'pigz is not installed (Debian package pigz)' });
      continue;
    }
    const gz = await layer(cache, { tree: 'special', format: 'posix', compression });
    const hdr = gzipHeaderLength(await fsp.readFile(gz), gz);
    const blob = path.join(dir, `${compression}.blob`);
    await fsp.writeFile(blob, handBlob([{ in: hdr, out: 0, bits: 0 }]));
    const rep = await oracleCheckpoints(blob, gz, 65536);
    t.match(rep, { layout: 'v2', count: 1, spanSize: 1 << 22 }, `${compression}: header`);
    const want = await gzipDcRange(gz, 0, 65536);
    t.equal(rep.checkpoints[0]?.sha256, want.sha256, `${compression}: first 64 KiB match gzip -dc (header ${hdr} bytes)`);
    // All of it: crosses member ends for multi-member (trailer skip, then a gzip-mode reset).
    const all = await oracleCheckpoints(blob, gz, 1 << 30);
    const whole = await gzipDcRange(gz, 0, Infinity);
    t.equal(all.checkpoints[0]?.produced, whole.length, `${compression}: stops at stream end`);
    t.equal(all.checkpoints[0]?.sha256, whole.sha256, `${compression}: whole stream matches`);
  }

  const gz = await layer(cache, { tree: 'special', format: 'posix', compression: 'gzip-6' });
  const v1 = path.join(dir, 'v1.blob');
  await fsp.writeFile(v1, handBlob([{ in: 10, out: 0, bits: 0 }], 1 << 22, true));
  const r1 = await oracleCheckpoints(v1, gz);
  t.match(r1, { layout: 'v1', count: 1, blobSize: 12 }, 'a 12-byte blob with count 1 is v1');
  t.equal(r1.checkpoints[0]?.sha256, (await gzipDcRange(gz, 0, 65536)).sha256, 'v1 implied checkpoint 0 inflates');

  const wrongIn = path.join(dir, 'wrong-in.blob');
  await fsp.writeFile(wrongIn, handBlob([{ in: 11, out: 0, bits: 0 }]));
  const rw = await oracleCheckpoints(wrongIn, gz);
  t.not(rw.checkpoints[0]?.sha256, (await gzipDcRange(gz, 0, 65536)).sha256, 'a wrong `in` does not reproduce the data');

  const bad = async (name: string, data: Buffer, why: RegExp): Promise<void> => {
    const p = path.join(dir, name);
    await fsp.writeFile(p, data);
    await t.rejects(oracleCheckpoints(p, gz), { name: 'OracleError', message: why }, name);
  };
  await bad('short', Buffer.alloc(5), /shorter than its 12-byte header/);
  await bad('size', Buffer.concat([handBlob([{ in: 10, out: 0, bits: 0 }]), Buffer.alloc(3)]), /matches neither v2/);
  await bad('bits', handBlob([{ in: 10, out: 0, bits: 9 }]), /bits 9 > 7/);
  await bad('beyond', handBlob([{ in: 1e12, out: 0, bits: 0 }]), /beyond the layer/);
  await bad('order', handBlob([{ in: 10, out: 5, bits: 0 }, { in: 20, out: 1, bits: 0 }]), /out 1 < previous 5/);
});

/**
 * The oracle's own builder (§3's rule on real zlib) and its checker agree with gzip -dc at
 * every checkpoint, window included, and its span ranges tile the layer. This is what the
 * zTOC tests will run against our writer's blobs.
 */
async function checkAllCheckpoints(t: Tt, gz: string, spanSize: number, blob: string): Promise<void> {
  const built = await oracleBuild(gz, spanSize, blob);
  const rep = await oracleCheckpoints(built, gz, 65536);
  t.ok(rep.count >= 2, `${path.basename(gz)}: ${rep.count} checkpoints`);
  const cps = rep.checkpoints;
  t.same(cps.filter((c) => c.error !== null), [], 'every checkpoint inflates');
  const ranges = cps.flatMap((c) => [
    { offset: c.out, len: 65536 },
    { offset: Math.max(0, c.out - WIN), len: Math.min(WIN, c.out) },
  ]);
  const digests = await gzipDcRanges(gz, ranges);
  const zeros = (n: number): Buffer => Buffer.alloc(n);
  let bad = 0;
  let withBits = 0;
  cps.forEach((c, i) => {
    const data = digests[2 * i];
    const win = digests[2 * i + 1];
    if (c.bits > 0) withBits++;
    if (data?.sha256 !== c.sha256 || data?.length !== c.produced) bad++;
    // The stored window is the 32 KiB before `out`, zero-filled in front near the start.
    if (c.out >= WIN && win?.sha256 !== c.windowSha256) bad++;
    if (c.out === 0 && createHash('sha256').update(zeros(WIN)).digest('hex') !== c.windowSha256) bad++;
    if (i > 0 && c.out - (cps[i - 1]?.out ?? 0) <= spanSize && c.out !== 0) bad++;
  });
  t.equal(bad, 0, 'data, windows and spacing match gzip -dc at every checkpoint');
  t.comment(`${withBits} of ${cps.length} checkpoints have pending bits`);
  const spans = await oracleSpans(built, gz);
  const size = (await fsp.stat(gz)).size;
  t.equal(spans.length, cps.length, 'one span per checkpoint');
  t.equal(spans.at(-1)?.end, size, 'the last span ends at the layer end');
  t.ok(
    spans.every((s, i) => s.start === (cps[i]?.in ?? 0) - ((cps[i]?.bits ?? 0) > 0 ? 1 : 0) && (i === 0 || spans[i - 1]?.end === cps[i]?.in)),
    'span i is [in_i - (bits_i > 0), in_{i+1})',
  );
  const sd = await spanDigests(built, gz);
  t.ok(sd.length === cps.length && sd.every((d) => /^sha256:[0-9a-f]{64}$/.test(d)), 'span digests computed with dd | sha256sum');
}

t.test('oracle builder and checker agree with gzip -dc on usr-small', async (t) => {
  const dir = await scratch(t);
  for (const compression of ['gzip-6', 'multi-member', 'pigz', 'gzip-named'] as const) {
    const gz = await skipIfUnavailable(t, () => layer(cache, { tree: 'usr-small', format: 'posix', compression }));
    if (gz === undefined) continue;
    await t.test(compression, (t) => checkAllCheckpoints(t, gz, 1 << 20, path.join(dir, `${compression}.blob`)));
  }
});

t.test('the ckpt oracle notices corrupted checkpoints, and reads v1 blobs', async (t) => {
  const dir = await scratch(t);
  const gz = await layer(cache, { tree: 'usr-small', format: 'posix', compression: 'gzip-6' });
  const good = await oracleBuild(gz, 1 << 20, path.join(dir, 'good.blob'));
  const blob = await fsp.readFile(good);
  const rep = await oracleCheckpoints(good, gz);
  const k = rep.checkpoints.findIndex((c) => c.bits > 0 && c.out >= WIN);
  t.ok(k > 0, `checkpoint ${k} has pending bits`);
  const cp = rep.checkpoints[k];
  if (cp === undefined) return;
  const want = await gzipDcRange(gz, cp.out, 65536);
  t.equal(cp.sha256, want.sha256, 'unmodified checkpoint reproduces gzip -dc');

  const mutate = async (name: string, patch: (b: Buffer, at: number) => void): Promise<void> => {
    const b = Buffer.from(blob);
    patch(b, 12 + k * CP);
    const p = path.join(dir, `${name}.blob`);
    await fsp.writeFile(p, b);
    const got = (await oracleCheckpoints(p, gz)).checkpoints[k];
    t.ok(got !== undefined && (got.error !== null || got.sha256 !== want.sha256), `${name}: detected (${got?.error ?? 'different bytes'})`);
  };
  await mutate('zeroed window', (b, at) => b.fill(0, at + 17, at + 17 + WIN));
  await mutate('bits off by one', (b, at) => b.writeUInt8(cp.bits === 7 ? 6 : cp.bits + 1, at + 16));
  await mutate('bits dropped', (b, at) => b.writeUInt8(0, at + 16));
  await mutate('in + 1', (b, at) => b.writeBigInt64LE(BigInt(cp.in + 1), at));

  // The same checkpoints without checkpoint 0 form a v1 blob (count unchanged).
  const v1 = Buffer.concat([blob.subarray(0, 12), blob.subarray(12 + CP)]);
  const v1Path = path.join(dir, 'v1.blob');
  await fsp.writeFile(v1Path, v1);
  const r1 = await oracleCheckpoints(v1Path, gz);
  t.equal(r1.layout, 'v1');
  t.same(
    r1.checkpoints.map((c) => [c.in, c.out, c.bits, c.sha256]),
    rep.checkpoints.map((c) => [c.in, c.out, c.bits, c.sha256]),
    'v1 and v2 give the same checkpoints (gzip -6 from stdin: checkpoint 0 is in = 10)',
  );
});

t.test('flatcJson decodes a flatbuffer made by flatc itself', async (t) => {
  const dir = await scratch(t);
  const schema = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'ztoc', 'fbs', 'ztoc.fbs');
  await fsp.access(schema);
  const json = path.join(dir, 'sample.json');
  await fsp.writeFile(
    json,
    JSON.stringify({
      version: '0.9',
      build_tool_identifier: 'oracle self-test',
      compressed_archive_size: 123456789,
      toc: { metadata: [{ name: 'a/b', type: 'reg', uncompressed_offset: 512, uid: 3000000, xattrs: [{ key: 'k', value: 'v' }] }] },
      compression_info: { max_span_id: 0, span_digests: ['sha256:00'], checkpoints: [1, 2, 3] },
    }),
  );
  await run('flatc', ['-b', '-o', dir, schema, json]);
  const decoded = await flatcJson(schema, path.join(dir, 'sample.bin'));
  t.match(decoded, {
    version: '0.9',
    compressed_archive_size: 123456789,
    uncompressed_archive_size: 0,
    toc: { metadata: [{ name: 'a/b', type: 'reg', uncompressed_offset: 512, uid: 3000000, mode: 0, xattrs: [{ key: 'k', value: 'v' }] }] },
    compression_info: { compression_algorithm: 'Gzip', max_span_id: 0, checkpoints: [1, 2, 3] },
  });
  const garbage = path.join(dir, 'garbage.bin');
  await fsp.writeFile(garbage, 'garbage\n');
  await t.rejects(flatcJson(schema, garbage), OracleError, 'undecodable input rejects');
});

const largeWanted = process.env.SOCI_TS_TEST_LARGE === '1';
const largeCached = await fsp
  .access(path.join(cache, `usr-large-gnu-gzip-6-v${FIXTURE_VERSION}.tar.gz`))
  .then(() => true)
  .catch(() => false);

t.test('usr-large: size, big files, and every checkpoint', { skip: largeWanted || largeCached ? false : 'set SOCI_TS_TEST_LARGE=1 to build the ~350 MB layer' }, async (t) => {
  const tarPath = await timed(t, 'usr-large tree + gnu tar', () => layerTar(cache, 'usr-large', 'gnu'));
  const gz = await timed(t, 'usr-large gzip-6', () => layer(cache, { tree: 'usr-large', format: 'gnu', compression: 'gzip-6' }));
  const size = (await fsp.stat(tarPath)).size;
  t.ok(size >= 300e6 && size <= 420e6, `usr-large tar is ${(size / 1e6).toFixed(0)} MB`);
  const entries = await tarTv(tarPath);
  const files = entries.filter((e) => e.type === '-');
  t.ok(files.filter((e) => (e.size ?? 0) > 8 << 20).length >= 3, 'a few files > 8 MiB');
  t.ok(files.filter((e) => (e.size ?? 0) < 64 << 10).length >= 2000, `thousands of small files (${files.length} files)`);
  await checkAllCheckpoints(t, gz, 1 << 22, path.join(await scratch(t), 'large.blob'));
});

/**
 * Bad input: corrupt and truncated layers, lying tars, inconsistent or
 * hostile zTOCs. Each must give a typed error naming the thing and the reason.
 */
import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import {
  buildZtoc,
  buildZtocFromFile,
  CompressionError,
  decodeZtoc,
  encodeCheckpointBlob,
  decodeCheckpointBlob,
  encodeZtoc,
  LayerIndex,
  LimitError,
  readZtoc,
  TarFormatError,
  ZtocError,
  ZtocFormatError,
  type Ztoc,
} from '../../ztoc/index.js';

const run = promisify(execFile);
let dir: string;
let good: Uint8Array; // a real gzip layer
let goodZtoc: Ztoc;

t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'soci-ts-bad-'));
  await run('sh', ['-c', `tar -C / --sort=name -cf - usr/share/doc/tar usr/share/doc/gzip | gzip -6 > '${dir}/good.tar.gz'`]);
  good = await readFile(join(dir, 'good.tar.gz'));
  goodZtoc = await buildZtocFromFile(join(dir, 'good.tar.gz'), { spanSize: 16 << 10 });
});
t.teardown(() => rm(dir, { recursive: true, force: true }));

async function buildFrom(name: string, data: Uint8Array): Promise<unknown> {
  const path = join(dir, name);
  await writeFile(path, data);
  try {
    await buildZtocFromFile(path, { spanSize: 16 << 10 });
    return undefined;
  } catch (err) {
    return err;
  }
}

t.test('truncated gzip stream', async (t) => {
  for (const cut of [good.length - 1, good.length - 9, Math.floor(good.length / 2), 12]) {
    const err = await buildFrom('truncated.tar.gz', good.subarray(0, cut));
    t.type(err, CompressionError, `cut at ${cut}`);
    t.match(String(err), /truncated\.tar\.gz/, 'names the file');
  }
});

t.test('corrupt gzip stream', async (t) => {
  const bad = Buffer.from(good); // a copy (Buffer.slice would share memory)
  for (let i = 200; i < 260; i++) bad[i] ^= 0x5a;
  const err = await buildFrom('corrupt.tar.gz', bad);
  t.type(err, CompressionError);
  t.match(String(err), /corrupt\.tar\.gz: .*(corrupt|invalid)/);
  const crc = Buffer.from(good);
  crc[crc.length - 6] ^= 1; // the CRC32 in the trailer
  t.type(await buildFrom('crc.tar.gz', crc), CompressionError, 'a bad CRC is caught');
});

t.test('garbage after the gzip stream', async (t) => {
  const err = await buildFrom('trailing.tar.gz', Buffer.concat([good, Buffer.from('this is not gzip at all')]));
  t.type(err, CompressionError);
  t.match(String(err), /after the gzip member/);
});

t.test('a tar that lies about sizes', async (t) => {
  const { stdout: raw } = await run('gzip', ['-dc', join(dir, 'good.tar.gz')], { encoding: 'buffer', maxBuffer: 1 << 30 });
  // Find the first regular file header and claim it is much bigger than the archive.
  const reg = goodZtoc.files.find((f) => f.type === 'reg' && f.name.length < 100 && f.uncompressedSize > 0);
  t.ok(reg, 'the layer has a regular file');
  const pos = reg!.uncompressedOffset - 512;
  t.equal(raw[pos + 156], 0x30, 'its header is one block before its data');
  const lying = Buffer.from(raw);
  lying.write('77777777777\0', pos + 124, 'latin1');
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 32 : lying[pos + i];
  lying.write(sum.toString(8).padStart(6, '0') + '\0 ', pos + 148, 'latin1');
  const err = await buildFrom('lying.tar.gz', gzipSync(lying));
  t.type(err, TarFormatError);
  t.match(String(err), /lying\.tar\.gz/);
});

t.test('sparse entries are rejected with a clear error', async (t) => {
  await run('sh', ['-c', `cd '${dir}' && truncate -s 10M sparse.bin && echo data >> sparse.bin && tar --format=gnu -S -cf - sparse.bin | gzip > sparse.tar.gz`]);
  try {
    await buildZtocFromFile(join(dir, 'sparse.tar.gz'));
    t.fail('accepted a sparse file');
  } catch (err) {
    t.type(err, TarFormatError);
    t.match(String(err), /sparse/);
  }
});

t.test('zstd layers are refused by name', async (t) => {
  const err = await buildFrom('layer.tar.zst', Uint8Array.of(0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0));
  t.type(err, ZtocError);
  t.match(String(err), /zstd/);
});

/** A stream of `count` tar headers of empty files, made on the fly (never held in memory). */
async function* manyEntries(count: number): AsyncGenerator<Uint8Array> {
  const header = Buffer.alloc(512);
  header.write('0000644\0', 100, 'latin1');
  header.write('0000000\0', 108, 'latin1');
  header.write('0000000\0', 116, 'latin1');
  header.write('00000000000\0', 124, 'latin1');
  header.write('14000000000\0', 136, 'latin1');
  header[156] = 0x30;
  header.write('ustar\0' + '00', 257, 'latin1');
  const perChunk = 2048;
  for (let done = 0; done < count; ) {
    const n = Math.min(perChunk, count - done);
    const chunk = Buffer.alloc(n * 512);
    for (let k = 0; k < n; k++) {
      const h = chunk.subarray(k * 512, (k + 1) * 512);
      header.copy(h);
      h.write(`f${done + k}`.padEnd(20, '\0'), 0, 'latin1');
      let sum = 0;
      for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 32 : h[i];
      h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'latin1');
    }
    done += n;
    yield chunk;
  }
  yield Buffer.alloc(1024);
}

t.test('10^7 entries: refused at the entry limit, in bounded memory and time', async (t) => {
  const started = Date.now();
  const before = process.memoryUsage().rss;
  try {
    await buildZtoc(manyEntries(10_000_000), { source: 'huge.tar', maxEntries: 100_000 });
    t.fail('accepted 10^7 entries');
  } catch (err) {
    t.type(err, LimitError);
    t.match(String(err), /huge\.tar/);
  }
  const grown = process.memoryUsage().rss - before;
  t.ok(grown < 512 << 20, `memory grew by ${(grown / 2 ** 20).toFixed(0)} MiB`);
  t.ok(Date.now() - started < 60_000, `stopped after ${Date.now() - started} ms`);
  // Below the limit the same stream is fine.
  const z = await buildZtoc(manyEntries(5000), { source: 'many.tar', maxEntries: 100_000 });
  t.equal(z.files.length, 5000);
});

function reencode(mutate: (z: Ztoc) => void): Uint8Array {
  const z = structuredClone(goodZtoc);
  mutate(z);
  return encodeZtoc(z);
}

function expectFormatError(t: Test, bytes: Uint8Array, pattern: RegExp): void {
  try {
    readZtoc(bytes, 'bad.ztoc');
    t.fail(`accepted; expected ${pattern}`);
  } catch (err) {
    t.type(err, ZtocFormatError);
    t.match(String(err), pattern);
    t.match(String(err), /bad\.ztoc/);
  }
}

t.test('zTOC with offsets past the archive', async (t) => {
  const reg = goodZtoc.files.findIndex((f) => f.type === 'reg' && f.uncompressedSize > 0);
  expectFormatError(t, reencode((z) => (z.files[reg].uncompressedOffset = z.uncompressedArchiveSize + 512)), /outside the/);
  expectFormatError(t, reencode((z) => (z.files[reg].uncompressedSize = z.uncompressedArchiveSize)), /outside the/);
  expectFormatError(t, reencode((z) => (z.compressedArchiveSize = 100)), /outside the 100-byte archive/);
});

t.test('zTOC whose span count does not match its checkpoints', async (t) => {
  expectFormatError(t, reencode((z) => (z.compressionInfo.maxSpanId += 1)), /max_span_id/);
  expectFormatError(
    t,
    reencode((z) => {
      z.compressionInfo.maxSpanId += 1;
      z.compressionInfo.spanDigests.push(z.compressionInfo.spanDigests[0]);
    }),
    /checkpoints but max_span_id/,
  );
  expectFormatError(t, reencode((z) => (z.compressionInfo.checkpoints = z.compressionInfo.checkpoints.subarray(0, 100))), /checkpoint blob/);
  expectFormatError(t, reencode((z) => (z.compressionInfo.spanDigests[0] = 'md5:abc')), /not a sha256 digest/);
});

t.test('zTOC with hostile names', async (t) => {
  expectFormatError(t, reencode((z) => (z.files[1].name = '../../etc/passwd')), /'\.\.' component/);
  expectFormatError(t, reencode((z) => (z.files[1].name = 'usr/../../x')), /'\.\.' component/);
  // A leading slash stays inside the root (as containerd and GNU tar read it).
  const rooted = readZtoc(reencode((z) => (z.files[1].name = '/etc/shadow')));
  t.equal(rooted.file('etc/shadow')?.name, '/etc/shadow', 'a leading slash names a path under the root');
  expectFormatError(
    t,
    reencode((z) => {
      z.files[1].type = 'hardlink';
      z.files[1].linkname = '../outside';
    }),
    /hardlink/,
  );
});

t.test('names with a leading slash (umoci writes the root as "/") are paths under the root', async (t) => {
  await run('sh', ['-c', `cd '${dir}' && mkdir -p rooted/etc && echo hi > rooted/etc/motd && tar --format=pax -cf rooted.tar -P -C rooted --transform 's,^\\./,/,;s,^\\.$,/,' . && gzip -kf rooted.tar`]);
  const listed = (await run('tar', ['-tPf', join(dir, 'rooted.tar')])).stdout.split('\n').filter((l) => l !== '');
  t.ok(listed.includes('/') && listed.includes('/etc/motd'), `tar holds rooted names (${listed.join(' ')})`);
  const z = await buildZtocFromFile(join(dir, 'rooted.tar.gz'));
  const index = new LayerIndex(z);
  t.equal(index.file('etc/motd')?.name, '/etc/motd', 'found under the root');
});

t.test('the builder refuses layers with hostile names', async (t) => {
  await run('sh', ['-c', `cd '${dir}' && mkdir -p h && echo x > h/f && tar --format=gnu -cf evil.tar -C h f --transform 's,^f,../../escape,' -P && gzip -kf evil.tar`]);
  const err = await buildFrom('evil.tar.gz', await readFile(join(dir, 'evil.tar.gz')));
  t.type(err, ZtocError);
  t.match(String(err), /'\.\.' component/);
});

t.test('checkpoint blob: v1 layout is read, broken ones are refused', async (t) => {
  const index = new LayerIndex(goodZtoc);
  const cps = index.checkpoints;
  const v2 = encodeCheckpointBlob(1 << 14, cps);
  const v1 = v2.slice();
  // v1 drops checkpoint 0 (implied at in=10) but keeps count.
  v1.copyWithin(12, 12 + 32785);
  const v1blob = v1.subarray(0, v2.length - 32785);
  const parsed = decodeCheckpointBlob(v1blob);
  t.equal(parsed.layout, 'v1');
  t.equal(parsed.checkpoints.length, cps.length);
  t.equal(parsed.checkpoints[0].in, 10);
  t.same(parsed.checkpoints.slice(1).map((c) => [c.in, c.out, c.bits]), cps.slice(1).map((c) => [c.in, c.out, c.bits]));
  t.throws(() => decodeCheckpointBlob(v2.subarray(0, 100), 'x'), { name: 'ZtocFormatError' });
  const backwards = v2.slice();
  new DataView(backwards.buffer).setBigInt64(12 + 32785, 1n, true); // checkpoint 1 before checkpoint 0
  backwards[12 + 32785 + 16] = 0;
  if (cps.length > 1 && cps[0].in > 0) t.throws(() => decodeCheckpointBlob(backwards, 'x'), /goes back/);
  const bits = v2.slice();
  bits[12 + 16] = 9;
  t.throws(() => decodeCheckpointBlob(bits, 'x'), /9 bits/);
  t.same(decodeZtoc(encodeZtoc(goodZtoc)), goodZtoc);
});

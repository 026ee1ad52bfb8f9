/**
 * The zTOC flatbuffer against flatc (an independent implementation of the
 * same schema): flatc decodes what we write, we decode what flatc writes, and
 * a fuzzed zTOC never crashes or hangs the reader.
 */
import t from 'tap';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import {
  buildZtocFromFile,
  decodeZtoc,
  encodeZtoc,
  LayerIndex,
  paxValueBytes,
  paxValueText,
  readZtoc,
  ZtocError,
  type Ztoc,
} from '../../ztoc/index.js';

const run = promisify(execFile);
const SCHEMA = join(process.cwd(), 'ztoc/fbs/ztoc.fbs');

async function flatcDecode(dir: string, bin: Uint8Array): Promise<Record<string, unknown>> {
  const path = join(dir, 'z.bin');
  await writeFile(path, bin);
  await run('flatc', ['--json', '--raw-binary', '--strict-json', '--defaults-json', '-o', dir, SCHEMA, '--', path]);
  return JSON.parse(await readFile(join(dir, 'z.json'), 'utf8')) as Record<string, unknown>;
}

let dir: string;
let layer: string;
let ztoc: Ztoc;
let bytes: Uint8Array;

t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'soci-ts-flatbuf-'));
  layer = join(dir, 'layer.tar.gz');
  // A small real layer: Debian's docs for a few packages, with PAX records from --format=posix.
  await run('sh', ['-c', `tar -C / --format=posix --sort=name -cf - usr/share/doc/tar usr/share/doc/gzip usr/share/doc/bash | gzip -6 > '${layer}'`]);
  ztoc = await buildZtocFromFile(layer, { spanSize: 64 << 10 });
  bytes = encodeZtoc(ztoc);
});
t.teardown(() => rm(dir, { recursive: true, force: true }));

t.test('round trip build -> bytes -> read is lossless', async (t) => {
  const back = decodeZtoc(bytes);
  t.same(back, ztoc);
  t.ok(ztoc.files.length > 10, `layer has ${ztoc.files.length} entries`);
  t.ok(ztoc.compressionInfo.maxSpanId >= 1, 'several spans');
  t.same(encodeZtoc(back), bytes, 'encoding is deterministic');
});

t.test('flatc decodes our zTOC with the project schema', async (t) => {
  const json = await flatcDecode(dir, bytes);
  t.equal(json.version, '0.9');
  t.equal(json.build_tool_identifier, ztoc.buildToolIdentifier);
  t.equal(Number(json.compressed_archive_size), ztoc.compressedArchiveSize);
  t.equal(Number(json.uncompressed_archive_size), ztoc.uncompressedArchiveSize);
  const info = json.compression_info as Record<string, unknown>;
  t.equal(info.compression_algorithm, 'Gzip');
  t.equal(info.max_span_id, ztoc.compressionInfo.maxSpanId);
  t.same(info.span_digests, ztoc.compressionInfo.spanDigests);
  t.same(info.checkpoints, Array.from(ztoc.compressionInfo.checkpoints));
  const files = (json.toc as { metadata: Array<Record<string, unknown>> }).metadata;
  t.equal(files.length, ztoc.files.length);
  for (const [i, f] of ztoc.files.entries()) {
    const g = files[i];
    const same =
      g.name === f.name &&
      g.type === f.type &&
      Number(g.uncompressed_offset) === f.uncompressedOffset &&
      Number(g.uncompressed_size) === f.uncompressedSize &&
      g.linkname === f.linkname &&
      Number(g.mode) === f.mode &&
      g.uid === f.uid &&
      g.gid === f.gid &&
      g.uname === f.uname &&
      g.gname === f.gname &&
      g.mod_time === f.modTime &&
      Number(g.devmajor) === f.devmajor &&
      Number(g.devminor) === f.devminor &&
      JSON.stringify((g.xattrs as Array<{ key: string; value: string }>).map((x) => [x.key, x.value])) ===
        JSON.stringify(f.paxRecords.map(([k, v]) => [k, paxValueText(v)]));
    if (!same) {
      t.fail(`entry ${i} differs: flatc ${JSON.stringify(g)} vs ours ${JSON.stringify(f)}`);
      return;
    }
  }
  t.pass('every entry matches field by field');
});

t.test('we read a zTOC written by flatc from JSON', async (t) => {
  const json = {
    version: '0.9',
    build_tool_identifier: 'flatc-written',
    compressed_archive_size: ztoc.compressedArchiveSize,
    uncompressed_archive_size: ztoc.uncompressedArchiveSize,
    toc: {
      metadata: ztoc.files.map((f) => ({
        name: f.name,
        type: f.type,
        uncompressed_offset: f.uncompressedOffset,
        uncompressed_size: f.uncompressedSize,
        linkname: f.linkname,
        mode: f.mode,
        uid: f.uid,
        gid: f.gid,
        uname: f.uname,
        gname: f.gname,
        mod_time: f.modTime,
        devmajor: f.devmajor,
        devminor: f.devminor,
        xattrs: f.paxRecords.map(([key, value]) => ({ key, value: paxValueText(value) })),
      })),
    },
    compression_info: {
      compression_algorithm: 'Gzip',
      max_span_id: ztoc.compressionInfo.maxSpanId,
      span_digests: ztoc.compressionInfo.spanDigests,
      checkpoints: Array.from(ztoc.compressionInfo.checkpoints),
    },
  };
  const jsonPath = join(dir, 'written.json');
  await writeFile(jsonPath, JSON.stringify(json));
  await run('flatc', ['-b', '-o', dir, SCHEMA, jsonPath]);
  const bin = await readFile(join(dir, 'written.bin'));
  t.not(Buffer.compare(bin, Buffer.from(bytes)), 0, 'flatc wrote different bytes than we did');
  const back = readZtoc(bin, 'flatc zTOC').ztoc;
  t.same({ ...back, buildToolIdentifier: ztoc.buildToolIdentifier }, ztoc);
});

t.test('fuzz: mutated zTOCs give a ZtocError or a valid zTOC, never a crash or a hang', async (t) => {
  // A seeded generator so a failure can be replayed.
  let seed = 0x2545f491;
  const rand = (n: number): number => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) % n;
  };
  // Mutations aimed at the metadata part mostly (the checkpoint blob is big and opaque).
  const metaEnd = Math.min(bytes.length, 64 << 10);
  const iterations = 3000;
  let rejected = 0;
  let accepted = 0;
  const started = Date.now();
  for (let i = 0; i < iterations; i++) {
    let m: Uint8Array;
    switch (rand(5)) {
      case 0: // flip bits
        m = bytes.slice();
        for (let k = 0, n = 1 + rand(8); k < n; k++) m[rand(metaEnd)] ^= 1 << rand(8);
        break;
      case 1: // overwrite with random bytes
        m = bytes.slice();
        for (let k = 0, n = 1 + rand(16); k < n; k++) m[rand(m.length)] = rand(256);
        break;
      case 2: // truncate
        m = bytes.slice(0, rand(bytes.length));
        break;
      case 3: // plant a huge 32-bit value (offsets, lengths)
        m = bytes.slice();
        new DataView(m.buffer).setUint32(rand(metaEnd - 4) & ~3, [0xffffffff, 0x7fffffff, 0x80000000, bytes.length][rand(4)], true);
        break;
      default: // random garbage
        m = new Uint8Array(rand(256));
        for (let k = 0; k < m.length; k++) m[k] = rand(256);
    }
    try {
      new LayerIndex(decodeZtoc(m, 'fuzzed'), 'fuzzed');
      accepted++;
    } catch (err) {
      if (!(err instanceof ZtocError)) {
        t.fail(`iteration ${i}: ${String(err)} is not a ZtocError`);
        return;
      }
      rejected++;
    }
  }
  t.equal(accepted + rejected, iterations);
  // Mutations inside strings decode fine; the point is that nothing else escapes.
  t.ok(rejected > 0 && accepted > 0, `${rejected} of ${iterations} mutations rejected with ZtocError, ${accepted} decoded`);
  t.ok(Date.now() - started < 120_000, 'finished');
});

t.test('not a flatbuffer at all', async (t) => {
  for (const junk of [new Uint8Array(0), new TextEncoder().encode('{"not": "a ztoc"}'), new Uint8Array(4096).fill(0xff)]) {
    t.throws(() => readZtoc(junk, 'junk.ztoc'), { name: 'ZtocFormatError' });
  }
  try {
    readZtoc(new TextEncoder().encode('hello world, this is not a zTOC'), 'junk.ztoc');
    t.fail('accepted junk');
  } catch (err) {
    t.match(String(err), /junk\.ztoc/, 'error names the file');
  }
});

t.test('binary xattr values survive tar -> zTOC -> bytes -> zTOC', async (t) => {
  const src = join(dir, 'xattr-src');
  const value = Buffer.from([0x01, 0x00, 0x00, 0x02, 0x80, 0xff, 0xc3, 0x28, 0x00, 0x9f]);
  await run('sh', ['-c', `mkdir -p '${src}' && echo cap > '${src}/bin' && setfattr -n user.bin -v 0x${value.toString('hex')} '${src}/bin'`]);
  const tarGz = join(dir, 'xattr.tar.gz');
  await run('sh', ['-c', `tar -C '${src}' --format=posix --xattrs --xattrs-include='*' -cf - bin | gzip > '${tarGz}'`]);
  const z = await buildZtocFromFile(tarGz);
  const rec = z.files[0].paxRecords.find(([k]) => k === 'SCHILY.xattr.user.bin');
  t.ok(rec, 'the xattr is recorded');
  t.same(Buffer.from(paxValueBytes(rec![1])), value, 'exact bytes from the tar');
  const back = decodeZtoc(encodeZtoc(z)).files[0].paxRecords.find(([k]) => k === 'SCHILY.xattr.user.bin');
  t.same(Buffer.from(paxValueBytes(back![1])), value, 'exact bytes after a round trip');
});

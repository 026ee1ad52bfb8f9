/**
 * The zTOC flatbuffer against flatc (an independent implementation of the
 * same schema): flatc decodes what we write, we decode what flatc writes, and
 * a fuzzed zTOC never crashes or hangs the reader.
 */
import { seededRandom } from '../helpers/random.js';
import t, { type Test } from 'tap';
import { execFile, fork } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
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
import { tarTv } from '../helpers/oracles.js';
import type { FuzzJob, FuzzMessage } from './fuzz-extract-child.js';

const run = promisify(execFile);
const SCHEMA = join(process.cwd(), 'ztoc/fbs/ztoc.fbs');
const ZINFO_SCHEMA = join(process.cwd(), 'ztoc/fbs/zinfo.fbs');
const CHILD = fileURLToPath(new URL('./fuzz-extract-child.js', import.meta.url));

async function flatcDecode(dir: string, bin: Uint8Array, schema = SCHEMA, name = 'z'): Promise<Record<string, unknown>> {
  const path = join(dir, `${name}.bin`);
  await writeFile(path, bin);
  await run('flatc', ['--json', '--raw-binary', '--strict-json', '--defaults-json', '-o', dir, schema, '--', path]);
  return JSON.parse(await readFile(join(dir, `${name}.json`), 'utf8')) as Record<string, unknown>;
}

let dir: string;
let layer: string;
let plain: string;
let ztoc: Ztoc;
let bytes: Uint8Array;

t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'soci-ts-flatbuf-'));
  layer = join(dir, 'layer.tar.gz');
  // A small real layer: Debian's docs for a few packages, with PAX records from --format=posix;
  // gzipped, and the same tar as an uncompressed layer.
  plain = join(dir, 'layer.tar');
  await run('sh', ['-c', `tar -C / --format=posix --sort=name -cf '${plain}' usr/share/doc/tar usr/share/doc/gzip usr/share/doc/bash && gzip -6 < '${plain}' > '${layer}'`]);
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

t.test('strings many entries share are stored once, and flatc reads them back per entry', async (t) => {
  // Without the checkpoints (most of this small layer's zTOC, and they hold file text).
  const fileTable = encodeZtoc({ ...ztoc, compressionInfo: { ...ztoc.compressionInfo, checkpoints: new Uint8Array(0) } });
  const occurrences = (needle: string): number => {
    const hay = Buffer.from(fileTable);
    const n = Buffer.from(needle);
    let count = 0;
    for (let at = hay.indexOf(n); at !== -1; at = hay.indexOf(n, at + 1)) count++;
    return count;
  };
  // Debian's docs are owned by root:root and all carry the same type: one copy of each string.
  const rootOwned = ztoc.files.filter((f) => f.uname === 'root').length;
  t.ok(rootOwned > 10, `${rootOwned} entries owned by root`);
  t.equal(occurrences('root'), 1, 'the owner name "root" is in the buffer once');
  t.equal(occurrences('reg'), 1, 'the type "reg" is in the buffer once');
  // flatc, writing the same zTOC from its own JSON, stores a copy per field: ours is smaller.
  const json = await flatcDecode(dir, fileTable, SCHEMA, 'shared');
  const jsonPath = join(dir, 'shared-in.json');
  await writeFile(jsonPath, JSON.stringify(json));
  await run('flatc', ['-b', '-o', dir, SCHEMA, jsonPath]);
  const flatcBytes = await readFile(join(dir, 'shared-in.bin'));
  t.ok(fileTable.length < flatcBytes.length * 0.8, `ours ${fileTable.length} B < 0.8 × flatc's ${flatcBytes.length} B`);
  t.same(decodeZtoc(flatcBytes).files, ztoc.files, 'both hold the same file table');
});

t.test('flatc decodes the zTOC of an uncompressed layer: fields against tar -tv, tar -xO and the file', async (t) => {
  const spanSize = 64 << 10;
  const z = await buildZtocFromFile(plain, { spanSize });
  const json = await flatcDecode(dir, encodeZtoc(z), SCHEMA, 'plain');
  const fileSize = (await stat(plain)).size;
  const info = json.compression_info as Record<string, unknown>;
  t.equal(info.compression_algorithm, 'Uncompressed');
  t.equal(Number(json.compressed_archive_size), fileSize, 'compressed_archive_size is the file size');
  // Past the two zero blocks that end the archive: GNU tar's block number of the first (-R).
  const eof = /^block (\d+): \*\* Block of NULs \*\*$/m.exec((await run('tar', ['-tR', '-f', plain])).stdout);
  t.ok(eof, 'tar -R shows the end of the archive');
  t.equal(Number(json.uncompressed_archive_size), (Number(eof?.[1]) + 2) * 512, 'uncompressed_archive_size ends after the two zero blocks');
  const spans = Math.ceil(fileSize / spanSize);
  t.equal(info.max_span_id, spans - 1, `${spans} spans of ${spanSize} bytes over the file`);
  const digests: string[] = [];
  for (let k = 0; k < spans; k++) {
    const { stdout } = await run('sh', ['-c', `dd if='${plain}' bs=${spanSize} skip=${k} count=1 status=none | sha256sum`]);
    digests.push(`sha256:${stdout.slice(0, 64)}`);
  }
  t.same(info.span_digests, digests, 'span digests are sha256sum of each span of the file');
  const zinfo = await flatcDecode(dir, Uint8Array.from(info.checkpoints as number[]), ZINFO_SCHEMA, 'plain-zinfo');
  t.same({ version: zinfo.version, span_size: Number(zinfo.span_size), size: Number(zinfo.size) }, { version: 2, span_size: spanSize, size: fileSize }, 'checkpoints hold a TarZinfo (flatc, zinfo.fbs)');

  // The file table against GNU tar, and each regular file's bytes at its offset against tar -xO.
  const files = (json.toc as { metadata: Array<Record<string, unknown>> }).metadata;
  const tv = await tarTv(plain);
  t.equal(files.length, tv.length, 'as many entries as tar -tv');
  const TYPES: Record<string, string> = { '-': 'reg', d: 'dir', l: 'symlink', h: 'hardlink', c: 'char', b: 'block', p: 'fifo' };
  const got = files.map((f) => [f.name, f.type, Number(f.uncompressed_size), f.uid, f.gid, f.linkname || null]);
  const want = tv.map((e) => [e.name, TYPES[e.type], e.size, e.uid, e.gid, e.link]);
  t.same(got, want, 'names, types, sizes, owners and link targets equal tar -tv');
  const regs = files.filter((f) => f.type === 'reg');
  const listFile = join(dir, 'plain.names');
  await writeFile(listFile, regs.map((f) => `${String(f.name)}\0`).join(''));
  const extracted = await new Promise<Buffer>((resolve, reject) => {
    execFile('tar', ['-xO', '--null', '--verbatim-files-from', '-T', listFile, '-f', plain], { encoding: 'buffer', maxBuffer: 1 << 28 }, (err, out) =>
      err ? reject(err) : resolve(out),
    );
  });
  const raw = await readFile(plain);
  const atOffsets = Buffer.concat(regs.map((f) => raw.subarray(Number(f.uncompressed_offset), Number(f.uncompressed_offset) + Number(f.uncompressed_size))));
  t.ok(regs.length > 5 && atOffsets.equals(extracted), `the bytes at each of ${regs.length} files' uncompressed_offset are what tar -xO extracts`);
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


/** A field extraction depends on, by where its bytes lie in an encoded zTOC. */
interface Site {
  pos: number;
  width: 1 | 8;
}

/**
 * The fields extraction depends on, found in the encoded bytes: every checkpoint's compressed and
 * uncompressed offsets (int64) and bit count (uint8), at the places soci-format.md gives them in
 * the checkpoint blob (12-byte header; per checkpoint in, out, bits, 32 KiB window), and each
 * regular file's data offset and size (int64 in the flatbuffer table, found by value after the blob).
 */
function extractionSites(bytes: Uint8Array, z: Ztoc): Site[] {
  const buf = Buffer.from(bytes);
  const blob = Buffer.from(z.compressionInfo.checkpoints);
  const blobAt = buf.indexOf(blob.subarray(0, 64));
  if (blobAt < 0) throw new Error('checkpoint blob not found in the zTOC bytes');
  const sites: Site[] = [];
  if (z.compressionInfo.algorithm === 'gzip') {
    const count = blob.readInt32LE(0);
    for (let k = 0; k < count; k++) {
      const at = blobAt + 12 + k * (8 + 8 + 1 + 32768);
      sites.push({ pos: at, width: 8 }, { pos: at + 8, width: 8 }, { pos: at + 16, width: 1 });
    }
  }
  const after = blobAt + blob.length;
  for (const f of z.files) {
    if (f.type !== 'reg') continue;
    for (const v of [f.uncompressedOffset, f.uncompressedSize]) {
      if (v === 0) continue; // flatbuffers leave out fields equal to their default
      const le = Buffer.alloc(8);
      le.writeBigInt64LE(BigInt(v));
      const at = buf.indexOf(le, after);
      if (at >= 0) sites.push({ pos: at, width: 8 });
    }
  }
  return sites;
}

/**
 * One mutant of `bytes`: mostly aimed at the metadata part (the checkpoint blob is big and
 * opaque), and at `sites`, small shifts of the offsets, sizes and bit counts extraction uses.
 */
function mutate(bytes: Uint8Array, rand: (n: number) => number, sites: readonly Site[] = []): Uint8Array {
  const metaEnd = Math.min(bytes.length, 64 << 10);
  let m: Uint8Array;
  switch (rand(sites.length > 0 ? 7 : 5)) {
    case 5: // shift a field extraction uses by a little (a lot is refused at decode time)
    case 6: {
      m = bytes.slice();
      const site = sites[rand(sites.length)];
      const view = new DataView(m.buffer);
      if (site.width === 1) view.setUint8(site.pos, rand(8));
      else {
        const deltas = [1, 7, 8, 512, 4096, 1 + rand(1 << 16)];
        const delta = BigInt(deltas[rand(deltas.length)] * (rand(2) === 0 ? -1 : 1));
        const v = view.getBigInt64(site.pos, true) + delta;
        view.setBigInt64(site.pos, v < 0n ? 0n : v, true);
      }
      break;
    }
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
  return m;
}

t.test('fuzz: mutated zTOCs give a ZtocError or a valid zTOC, never a crash or a hang', async (t) => {
  const rand = seededRandom(0x2545f491);
  const sites = extractionSites(bytes, ztoc);
  const iterations = 3000;
  let rejected = 0;
  let accepted = 0;
  const started = Date.now();
  for (let i = 0; i < iterations; i++) {
    const m = mutate(bytes, rand, sites);
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

/**
 * Mutants that decode are used: files and ranges are extracted through them from the real
 * layer blob, in a child process (fuzz-extract-child.ts) so that a hang is cut off by a time
 * bound per attempt and a crash (a signal, an abort in the native addon) is seen as the child
 * dying. Each attempt must give bytes or one of ztoc/errors.ts's classes; which one is not
 * checked (a mutated offset may well point at other valid data).
 */
async function fuzzExtraction(t: Test, layerPath: string, original: Uint8Array, seed: number, iterations: number, expectErrors: boolean): Promise<void> {
  const sites = extractionSites(original, decodeZtoc(original));
  const ATTEMPT_MS = 15_000; // generous: attempts take milliseconds, the machine is shared
  const child = fork(CHILD, [layerPath], { serialization: 'advanced', stdio: ['ignore', 'inherit', 'pipe', 'ipc'] });
  let stderr = '';
  child.stderr?.on('data', (b: Buffer) => (stderr += b.toString()));
  const inbox: FuzzMessage[] = [];
  let wake: (() => void) | undefined;
  let exit: string | undefined;
  child.on('message', (m: FuzzMessage) => {
    inbox.push(m);
    wake?.();
  });
  child.on('exit', (code, signal) => {
    exit = signal !== null ? `killed by ${signal}` : `exited ${String(code)}`;
    wake?.();
  });
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const next = async (): Promise<FuzzMessage | string> => {
    for (;;) {
      const m = inbox.shift();
      if (m !== undefined) return m;
      if (exit !== undefined) return `the child ${exit}: ${stderr.trim().slice(0, 2000)}`;
      const timedOut = await new Promise<boolean>((resolve) => {
        const timer = setTimeout(() => resolve(true), ATTEMPT_MS);
        wake = () => {
          clearTimeout(timer);
          resolve(false);
        };
      });
      wake = undefined;
      if (timedOut && inbox.length === 0 && exit === undefined) return `no answer within ${ATTEMPT_MS} ms`;
    }
  };

  const ready = await next();
  if (typeof ready === 'string' || ready.type !== 'ready') {
    t.fail(`fuzz child did not start: ${JSON.stringify(ready)}`);
    return;
  }
  const rand = seededRandom(seed);
  let accepted = 0;
  let withBytes = 0;
  const typed = new Map<string, number>();
  const started = Date.now();
  for (let i = 0; i < iterations; i++) {
    const m = mutate(original, rand, sites);
    try {
      new LayerIndex(decodeZtoc(m, 'fuzzed'), 'fuzzed');
    } catch {
      continue; // rejected: the test above checks how
    }
    accepted++;
    child.send({ i, bytes: m, seed: seed + i } satisfies FuzzJob);
    let current = 'decoding';
    for (;;) {
      const msg = await next();
      if (typeof msg === 'string') {
        t.fail(`seed ${seed} iteration ${i}: ${current}: ${msg}`);
        child.kill('SIGKILL');
        return;
      }
      if (msg.type === 'begin') current = msg.what;
      else if (msg.type === 'end') {
        const o = msg.outcome;
        if (o.kind === 'untyped') {
          t.fail(`seed ${seed} iteration ${i}: ${msg.what}: not one of ztoc/errors.ts's classes: ${o.text}`);
          child.kill('SIGKILL');
          return;
        }
        if (o.kind === 'bytes') withBytes++;
        else typed.set(o.name, (typed.get(o.name) ?? 0) + 1);
        current = 'after ' + msg.what;
      } else if (msg.type === 'done') {
        if (!msg.decoded) t.fail(`iteration ${i}: the child could not decode a mutant the parent decoded`);
        break;
      }
    }
  }
  child.disconnect();
  const errors = [...typed.entries()].map(([k, v]) => `${v} ${k}`).join(', ');
  t.ok(accepted > 0 && withBytes > 0, `${accepted} of ${iterations} mutants decoded; their extractions gave bytes ${withBytes} times, typed errors: ${errors || 'none'} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
  // Through a gzip zTOC a shifted checkpoint fails to inflate; an uncompressed layer's reads are
  // copies inside bounds the decoder already checked, so they all give bytes.
  if (expectErrors) t.ok(typed.size > 0, 'some extractions through mutants fail, with typed errors');
}

t.test('fuzz: extracting through mutants that decode gives bytes or a typed error, never a hang or a crash', async (t) => {
  await fuzzExtraction(t, layer, bytes, 0x1b873593, 1500, true);
});

t.test('fuzz: the same through mutants of an uncompressed layer\'s zTOC', async (t) => {
  const z = await buildZtocFromFile(plain, { spanSize: 64 << 10 });
  t.equal(z.compressionInfo.algorithm, 'uncompressed');
  await fuzzExtraction(t, plain, encodeZtoc(z), 0x85ebca6b, 600, false);
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

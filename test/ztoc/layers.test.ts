/**
 * zTOCs of real layers against independent oracles:
 * - the file table against GNU tar's `tar -tv`;
 * - the checkpoint blob byte for byte against the C oracle's own builder
 *   (upstream's rule on real zlib), and every checkpoint inflated by real zlib
 *   against `gzip -dc` at that offset;
 * - span digests against dd | sha256sum of the span's byte range;
 * - every regular file read through the zTOC against `tar -xO`;
 * - random ranges against `gzip -dc`.
 */
import { seededRandom } from '../helpers/random.js';
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  availableEngines,
  buildZtocFromFile,
  decodeZtoc,
  encodeZtoc,
  extractFile,
  extractRange,
  FileBlobReader,
  LayerIndex,
  LayerReader,
  modeString,
  paxValueBytes,
  type FileMetadata,
  type Ztoc,
} from '../../ztoc/index.js';
import { edgeLayer, layer, run, testCacheDir, type EdgeLayerKind, type LayerSpec } from '../helpers/layers.js';
import {
  gzipDcRanges,
  oracleBuild,
  oracleCheckpoints,
  spanDigests,
  tarTv,
  type TarTvEntry,
} from '../helpers/oracles.js';

const cache = testCacheDir();
let work: string;
t.before(async () => {
  work = await mkdtemp(join(tmpdir(), 'soci-ts-layers-'));
});
t.teardown(() => rm(work, { recursive: true, force: true }));

const sha256 = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');


/** `2021-03-04T05:06:07.5Z` and tar's `2021-03-04 05:06:07.500000000` as [seconds, nanos]. */
function timeKey(text: string): string {
  const m = /^(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)(?:\.(\d+))?Z?$/.exec(text);
  if (!m) return `unparsable ${text}`;
  const nanos = (m[3] ?? '').padEnd(9, '0');
  return `${m[1]} ${m[2]}.${nanos}`;
}

const TYPE_CHAR: Record<string, string> = { reg: '-', hardlink: 'h', symlink: 'l', dir: 'd', char: 'c', block: 'b', fifo: 'p' };

function compareWithTarTv(t: Test, files: FileMetadata[], tv: TarTvEntry[]): void {
  t.equal(files.length, tv.length, 'as many entries as tar lists');
  let mismatches = 0;
  for (let i = 0; i < Math.min(files.length, tv.length); i++) {
    const f = files[i];
    const e = tv[i];
    const ours = {
      name: f.name,
      type: TYPE_CHAR[f.type],
      mode: modeString(f).slice(1),
      uid: f.uid,
      gid: f.gid,
      size: f.type === 'char' || f.type === 'block' ? null : f.uncompressedSize,
      dev: f.type === 'char' || f.type === 'block' ? `${f.devmajor},${f.devminor}` : null,
      mtime: timeKey(f.modTime),
      link: f.type === 'symlink' || f.type === 'hardlink' ? f.linkname : null,
    };
    const theirs = {
      name: e.name,
      type: e.type,
      mode: e.mode,
      uid: e.uid,
      gid: e.gid,
      size: e.size,
      dev: e.devMajor === null ? null : `${e.devMajor},${e.devMinor}`,
      mtime: timeKey(e.mtime),
      link: e.link,
    };
    if (JSON.stringify(ours) !== JSON.stringify(theirs)) {
      if (mismatches++ < 5) t.same(ours, theirs, `entry ${i} ${f.name}`);
    }
  }
  t.equal(mismatches, 0, `every entry matches tar -tv (${files.length} entries)`);
}

/**
 * sha256 of every regular file via one `tar -xO` run, split by the sizes
 * `tar -tv` reports (both GNU tar; nothing of ours).
 */
async function tarXOHashes(layerPath: string, regs: TarTvEntry[]): Promise<Map<string, string>> {
  const list = join(work, 'names.lst');
  await writeFile(list, regs.map((e) => `${e.name}\0`).join(''));
  const hashes = new Map<string, string>();
  if (regs.length === 0) return hashes; // tar refuses an empty archive (a 0-byte layer)
  const child = spawn('tar', ['-xOf', layerPath, '--null', '--verbatim-files-from', '--no-wildcards', '--no-recursion', '-T', list], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let i = 0;
  let hash = createHash('sha256');
  let left = regs[0]?.size ?? 0;
  const finishEmpty = (): void => {
    while (i < regs.length && left === 0) {
      hashes.set(regs[i].name, hash.digest('hex'));
      hash = createHash('sha256');
      i++;
      left = regs[i]?.size ?? 0;
    }
  };
  finishEmpty();
  for await (const chunk of child.stdout as AsyncIterable<Buffer>) {
    let pos = 0;
    while (pos < chunk.length) {
      if (i >= regs.length) throw new Error('tar -xO wrote more than the listed sizes');
      const n = Math.min(left, chunk.length - pos);
      hash.update(chunk.subarray(pos, pos + n));
      pos += n;
      left -= n;
      finishEmpty();
    }
  }
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  if (code !== 0) throw new Error(`tar -xO exited ${code}`);
  if (i !== regs.length) throw new Error(`tar -xO ended after ${i} of ${regs.length} files`);
  return hashes;
}

interface Case {
  name: string;
  path: () => Promise<string>;
  spanSize: number;
  /** Check every file through the CLI for this many files (it spawns a process each). */
  cliFiles: number;
  engines: 'all' | 'default';
}

const specLayer = (spec: LayerSpec, spanSize: number, cliFiles = 0, engines: Case['engines'] = 'default'): Case => ({
  name: `${spec.tree}/${spec.format}/${spec.compression}`,
  path: () => layer(cache, spec),
  spanSize,
  cliFiles,
  engines,
});
const edge = (kind: EdgeLayerKind): Case => ({ name: `edge/${kind}`, path: () => edgeLayer(cache, kind), spanSize: 1 << 16, cliFiles: 0, engines: 'all' });

const cases: Case[] = [
  specLayer({ tree: 'special', format: 'posix', compression: 'gzip-6' }, 1 << 16, 3, 'all'),
  specLayer({ tree: 'special', format: 'gnu', compression: 'gzip-9' }, 1 << 16),
  specLayer({ tree: 'special', format: 'gnu', compression: 'none' }, 1 << 16, 2),
  specLayer({ tree: 'special', format: 'posix', compression: 'gzip-named' }, 1 << 15),
  specLayer({ tree: 'usr-small', format: 'gnu', compression: 'gzip-1' }, 1 << 20, 0, 'all'),
  specLayer({ tree: 'usr-small', format: 'gnu', compression: 'gzip-9' }, 1 << 20),
  specLayer({ tree: 'usr-small', format: 'posix', compression: 'node-zlib' }, 1 << 20),
  specLayer({ tree: 'usr-small', format: 'gnu', compression: 'multi-member' }, 1 << 20, 0, 'all'),
  specLayer({ tree: 'usr-small', format: 'gnu', compression: 'pigz' }, 1 << 20),
  edge('empty-gzip'),
  edge('eof-tar'),
  edge('eof-tar-gz'),
  edge('zero-bytes'),
  // A layer of a few hundred MB at the default span size.
  specLayer({ tree: 'usr-large', format: 'gnu', compression: 'gzip-6' }, 1 << 22, 5),
];

for (const c of cases) {
  t.test(c.name, async (t) => {
    const layerPath = await c.path();
    const blob = await FileBlobReader.open(layerPath);
    t.teardown(() => blob.close());
    const engines = c.engines === 'all' ? availableEngines() : [availableEngines()[0]];
    let ztoc: Ztoc | undefined;
    let bytes: Uint8Array | undefined;
    for (const engine of engines) {
      const z = await buildZtocFromFile(layerPath, { spanSize: c.spanSize, engine });
      const b = encodeZtoc(z);
      if (bytes) t.equal(Buffer.compare(b, bytes), 0, `${engine.name} builds the same zTOC bytes`);
      ztoc ??= z;
      bytes ??= b;
    }
    if (!ztoc || !bytes) throw new Error('no engine');
    t.same(decodeZtoc(bytes), ztoc, 'round trip through bytes is lossless');
    const index = new LayerIndex(ztoc, layerPath);
    t.equal(ztoc.compressedArchiveSize, blob.size, 'compressed size is the blob size');

    const tv = await tarTv(layerPath).catch((err: unknown) => (c.name === 'edge/zero-bytes' ? [] : Promise.reject(err)));
    compareWithTarTv(t, ztoc.files, tv);

    if (ztoc.compressionInfo.algorithm === 'gzip') {
      const ourBlob = join(work, 'ours.zinfo');
      await writeFile(ourBlob, ztoc.compressionInfo.checkpoints);
      const theirs = await readFile(await oracleBuild(layerPath, c.spanSize, join(work, 'oracle.zinfo')));
      t.equal(Buffer.compare(Buffer.from(ztoc.compressionInfo.checkpoints), theirs), 0, `checkpoint blob equals the oracle's byte for byte (${index.spans.length} checkpoints)`);

      const report = await oracleCheckpoints(ourBlob, layerPath, 65536);
      t.equal(report.layout, 'v2');
      const failed = report.checkpoints.filter((cp) => cp.error !== null);
      t.same(failed, [], 'real zlib inflates from every checkpoint');
      const expected = await gzipDcRanges(layerPath, report.checkpoints.map((cp) => ({ offset: cp.out, len: cp.produced })));
      const bad = report.checkpoints.filter((cp, i) => cp.sha256 !== expected[i].sha256);
      t.same(bad.map((cp) => cp.k), [], 'every checkpoint gives exactly the bytes gzip -dc gives at its offset');
      const withBits = report.checkpoints.filter((cp) => cp.bits > 0).length;
      t.comment(`${report.checkpoints.length} checkpoints, ${withBits} with pending bits`);
      const full = report.checkpoints.filter((cp) => cp.out >= 32768);
      const windows = await gzipDcRanges(layerPath, full.map((cp) => ({ offset: cp.out - 32768, len: 32768 })));
      t.same(full.filter((cp, i) => cp.windowSha256 !== windows[i].sha256).map((cp) => cp.k), [], 'windows are the 32 KiB before each checkpoint');
    }
    t.same(ztoc.compressionInfo.spanDigests, await spanDigestsOf(layerPath, index), 'span digests equal sha256sum of each span\'s bytes');

    // Every regular file, in order, through the span cache, against tar -xO.
    const regs = tv.filter((e) => e.type === '-');
    const expectedHashes = await tarXOHashes(layerPath, regs);
    const reader = new LayerReader(index, blob);
    let wrong = 0;
    let checked = 0;
    for (const f of ztoc.files) {
      if (f.type !== 'reg') continue;
      const got = sha256(await reader.readFile(f));
      if (got !== expectedHashes.get(f.name) && wrong++ < 5) t.fail(`${f.name}: content differs from tar -xO`);
      checked++;
    }
    t.equal(checked, regs.length, 'read every regular file');
    t.equal(wrong, 0, `all ${checked} regular files equal tar -xO`);

    // Direct extraction (no cache) of a sample, with each engine.
    const files = ztoc.files.filter((f) => f.type === 'reg');
    const rand = seededRandom(files.length + 7);
    for (const engine of engines) {
      let sampleWrong = 0;
      for (let k = 0; k < Math.min(40, files.length); k++) {
        const f = files[rand(files.length)];
        if (sha256(await extractFile(index, blob, f, engine)) !== expectedHashes.get(f.name)) sampleWrong++;
      }
      t.equal(sampleWrong, 0, `${engine.name}: direct extraction of a sample of files`);
    }

    // Random ranges against gzip -dc (plain tar layers: against the file itself).
    const size = ztoc.uncompressedArchiveSize;
    if (size > 0) {
      const ranges = Array.from({ length: 60 }, (_, k) => {
        const length = k % 3 === 0 ? 4096 : 1 + rand(Math.min(size, 3 << 20));
        const offset = rand(Math.max(1, size - length + 1));
        return { offset, len: Math.min(length, size - offset) };
      });
      const want = ztoc.compressionInfo.algorithm === 'gzip' ? await gzipDcRanges(layerPath, ranges) : await Promise.all(ranges.map(async (r) => ({ sha256: sha256(await blob.read(r.offset, r.len)) })));
      let rangeWrong = 0;
      for (const [k, r] of ranges.entries()) {
        if (sha256(await extractRange(index, blob, r.offset, r.len)) !== want[k].sha256) rangeWrong++;
      }
      t.equal(rangeWrong, 0, `${ranges.length} random ranges equal gzip -dc`);
    }

    // The CLI end to end: ztoc build, then get-file for a few files.
    if (c.cliFiles > 0) {
      const out = join(work, 'cli.ztoc');
      await run('bin/soci-ts', ['ztoc', 'build', layerPath, '-o', out, '--span-size', String(c.spanSize)]);
      t.equal(Buffer.compare(await readFile(out), Buffer.from(bytes)), 0, 'CLI writes the same zTOC');
      const big = [...files].sort((a, b) => b.uncompressedSize - a.uncompressedSize).slice(0, c.cliFiles);
      for (const f of big) {
        const dest = join(work, 'got-file');
        await run('bin/soci-ts', ['ztoc', 'get-file', out, layerPath, f.name], { stdoutFile: dest });
        t.equal(sha256(await readFile(dest)), expectedHashes.get(f.name), `get-file ${f.name} (${f.uncompressedSize} bytes) to stdout`);
        await run('bin/soci-ts', ['ztoc', 'get-file', out, layerPath, f.name, '-o', dest]);
        t.equal(sha256(await readFile(dest)), expectedHashes.get(f.name), `get-file ${f.name} -o`);
      }
    }
  });
}

/** Span digests through the oracle's span ranges (gzip) or fixed slices (plain tar), hashed with sha256sum via dd. */
async function spanDigestsOf(layerPath: string, index: LayerIndex): Promise<string[]> {
  if (index.compressed) {
    const blobPath = join(work, 'digests.zinfo');
    await writeFile(blobPath, index.ztoc.compressionInfo.checkpoints);
    return spanDigests(blobPath, layerPath);
  }
  const out: string[] = [];
  for (const s of index.spans) {
    const { stdout } = await run('sh', ['-c', `tail -c +${s.compressedStart + 1} '${layerPath}' | head -c ${s.compressedEnd - s.compressedStart} | sha256sum`]);
    out.push(`sha256:${String(stdout).slice(0, 64)}`);
  }
  return out;
}

/**
 * `getfattr -d -m - -e hex -h -R .` in `dir`: every extended attribute of every path (namespaces
 * user, trusted, security alike), as hex, by path relative to `dir`.
 */
async function getfattrDump(dir: string): Promise<Map<string, Map<string, string>>> {
  const { stdout } = await run('getfattr', ['-d', '-m', '-', '-e', 'hex', '-h', '-R', '.'], { cwd: dir });
  const out = new Map<string, Map<string, string>>();
  let current: Map<string, string> | undefined;
  for (const line of stdout.split('\n')) {
    const file = /^# file: (.*)$/.exec(line);
    if (file !== null) {
      current = new Map();
      out.set((file[1] ?? '').replace(/^\.\//, ''), current);
    } else if (line !== '') {
      const m = /^([^=]+)(?:=0x([0-9a-f]*))?$/.exec(line);
      if (m === null || current === undefined) throw new Error(`unparsed getfattr line: ${line}`);
      current.set(m[1] ?? '', m[2] ?? '');
    }
  }
  return out;
}

t.test('xattrs: the zTOC holds what tar --xattrs -x restores (read back by getfattr)', async (t) => {
  // Files with xattrs in three namespaces, text and binary values (a NUL, bytes >= 0x80, a
  // newline and "=" in a value, an empty value, a 2000-byte one, a real capability), a
  // directory with one; tarred by GNU tar as PAX SCHILY.xattr records.
  const src = join(work, 'xattr-tree');
  await mkdir(join(src, 'dir/inner'), { recursive: true });
  const files: Record<string, Array<[string, string | null]>> = {
    plain: [['user.x', 'hello world'], ['user.eq', 'a=b\nc'], ['user.empty', null]],
    binary: [['user.bin', '0x00ff80c32800'], ['trusted.t', 'a trusted value']],
    long: [['user.long', 'L'.repeat(2000)]],
    cap: [['security.capability', '0x0100000200040000000000000000000000000000']],
    none: [],
    'dir/inner/file': [['user.deep', 'in a subdirectory']],
  };
  for (const [name, attrs] of Object.entries(files)) {
    await writeFile(join(src, name), `content of ${name}\n`);
    for (const [k, v] of attrs) await run('setfattr', v === null ? ['-n', k, join(src, name)] : ['-n', k, '-v', v, join(src, name)]);
  }
  await run('setfattr', ['-n', 'user.dir', '-v', 'on a directory', join(src, 'dir')]);
  const tarPath = join(work, 'xattrs.tar');
  await run('tar', ['--xattrs', '--xattrs-include=*', '--format=posix', '--sort=name', '-C', src, '-cf', tarPath, '.']);
  const layerPath = `${tarPath}.gz`;
  await run('gzip', ['-6', '-c'], { stdinFile: tarPath, stdoutFile: layerPath });

  // The oracle: GNU tar restores the xattrs onto real files; getfattr reads them back.
  const restored = join(work, 'xattr-restored');
  await mkdir(restored, { recursive: true });
  await run('tar', ['--xattrs', '--xattrs-include=*', '-C', restored, '-xf', layerPath]);
  const oracle = await getfattrDump(restored);
  t.ok(oracle.get('cap')?.has('security.capability') && oracle.get('binary')?.has('trusted.t'), 'tar restored security.* and trusted.* too');

  for (const path of [layerPath, tarPath]) {
    const z = await buildZtocFromFile(path, { spanSize: 1 << 16 });
    const zt = decodeZtoc(encodeZtoc(z)); // as read back from the bytes
    let compared = 0;
    let withAttrs = 0;
    for (const f of zt.files) {
      const rel = f.name.replace(/^\.\//, '').replace(/\/$/, '') || '.';
      const ours = Object.fromEntries(
        f.paxRecords.filter(([k]) => k.startsWith('SCHILY.xattr.')).map(([k, v]) => [k.slice('SCHILY.xattr.'.length), Buffer.from(paxValueBytes(v)).toString('hex')]),
      );
      const theirs = Object.fromEntries(oracle.get(rel) ?? new Map<string, string>());
      t.same(ours, theirs, `${path.endsWith('.gz') ? 'gzip' : 'tar'} ${rel}: xattrs equal getfattr's`);
      compared++;
      if (Object.keys(theirs).length > 0) withAttrs++;
    }
    t.equal(withAttrs, oracle.size, 'every path getfattr lists is an entry of the zTOC');
    t.ok(compared > 6, `${compared} entries compared`);
  }
});

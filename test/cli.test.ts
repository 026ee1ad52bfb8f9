/** The CLI as a user meets it: help, exit codes, one-line errors, JSON output. */
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { layer as cachedLayer, run, testCacheDir, type LayerSpec } from './helpers/layers.js';
import { tarTv, unescapeTarName, type TarTvEntry } from './helpers/oracles.js';
import { mountTmpfs } from './helpers/tmpfs.js';
import type { FileMetadata } from '../ztoc/index.js';

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

function cli(args: string[]): Promise<Result> {
  const started = performance.now();
  return new Promise((resolve, reject) => {
    // A clean environment: no test-runner loaders, as a user's shell would have.
    const env = { ...process.env };
    delete env.NODE_OPTIONS;
    const child = spawn('bin/soci-ts', args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr, ms: performance.now() - started }));
  });
}

let dir: string;
let layer: string;
t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'soci-ts-cli-'));
  layer = join(dir, 'layer.tar.gz');
  await new Promise<void>((resolve, reject) => {
    const p = spawn('sh', ['-c', `tar -C / -cf - usr/share/doc/tar usr/share/doc/gzip | gzip > '${layer}'`]);
    p.on('close', (c) => (c === 0 ? resolve() : reject(new Error(`tar exited ${c}`))));
  });
});
t.teardown(() => rm(dir, { recursive: true, force: true }));

t.test('--help on every command, exit 0', async (t) => {
  for (const args of [[], ['ztoc'], ['ztoc', 'build'], ['ztoc', 'info'], ['ztoc', 'list'], ['ztoc', 'get-file'], ['version'], ['snapshotter'], ['explain'], ['install-systemd'], ['rpull']]) {
    const r = await cli([...args, '--help']);
    t.equal(r.code, 0, `${args.join(' ')} --help`);
    t.match(r.stdout, /^Usage: soci-ts/, `${args.join(' ')} prints usage`);
  }
  const root = await cli(['--help']);
  t.match(root.stdout, /Exit codes: 0 success, 1 user error/);
  t.comment(`start-up to --help: ${root.ms.toFixed(0)} ms`);
});

t.test('user errors exit 1 with one line naming the thing', async (t) => {
  const missing = await cli(['ztoc', 'info', join(dir, 'nope.ztoc')]);
  t.equal(missing.code, 1);
  t.match(missing.stderr, /nope\.ztoc/);
  t.equal(missing.stderr.trim().split('\n').length, 1, 'one line');

  await writeFile(join(dir, 'junk.ztoc'), 'definitely not a flatbuffer');
  const junk = await cli(['ztoc', 'info', join(dir, 'junk.ztoc')]);
  t.equal(junk.code, 1);
  t.match(junk.stderr, /^soci-ts: .*junk\.ztoc: not a valid zTOC flatbuffer/);

  const badSize = await cli(['ztoc', 'build', layer, '-o', join(dir, 'x'), '--span-size', 'lots']);
  t.equal(badSize.code, 1);
  t.match(badSize.stderr, /"lots" is not a size/);

  const noOutput = await cli(['ztoc', 'build', layer]);
  t.equal(noOutput.code, 1);
  t.match(noOutput.stderr, /--output/);

  const unknown = await cli(['frobnicate']);
  t.equal(unknown.code, 1);

  await writeFile(join(dir, 'truncated.tar.gz'), (await import('node:fs')).readFileSync(layer).subarray(0, 5000));
  const truncated = await cli(['ztoc', 'build', join(dir, 'truncated.tar.gz'), '-o', join(dir, 't.ztoc')]);
  t.equal(truncated.code, 1);
  t.match(truncated.stderr, /truncated\.tar\.gz: truncated gzip stream/);
});

t.test('build, info --json, list, get-file', async (t) => {
  const out = join(dir, 'layer.ztoc');
  const built = await cli(['ztoc', 'build', layer, '-o', out, '--span-size', '64KiB', '--json']);
  t.equal(built.code, 0, built.stderr);
  const b = JSON.parse(built.stdout) as { spans: number; files: number; digest: string };
  t.ok(b.spans > 1 && b.files > 5);
  t.match(b.digest, /^sha256:[0-9a-f]{64}$/);

  const info = await cli(['ztoc', 'info', out, '--json']);
  t.equal(info.code, 0);
  const i = JSON.parse(info.stdout) as Record<string, unknown> & { spans: unknown[]; files: Array<Record<string, unknown>> };
  for (const key of ['version', 'build_tool', 'size', 'span_size', 'num_spans', 'num_files', 'num_multi_span_files', 'files']) {
    t.ok(key in i, `info has upstream's ${key}`);
  }
  t.equal(i.version, '0.9');
  t.equal(i.span_size, 65536);
  t.equal(i.num_spans, b.spans);
  t.equal(i.spans.length, b.spans);
  t.same(Object.keys(i.files[0]), ['filename', 'offset', 'size', 'type', 'start_span', 'end_span']);

  const list = await cli(['ztoc', 'list', out]);
  t.equal(list.code, 0);
  t.match(list.stdout, /^drwx.* usr\/share\/doc\/tar\/$/m, 'tar -tv-like lines');

  const dirAsFile = await cli(['ztoc', 'get-file', out, layer, 'usr/share/doc/tar']);
  t.equal(dirAsFile.code, 1);
  t.match(dirAsFile.stderr, /is a dir, not a regular file/);
  const absent = await cli(['ztoc', 'get-file', out, layer, 'no/such/file']);
  t.equal(absent.code, 1);
  t.match(absent.stderr, /no such file/);
  const wrongLayer = await cli(['ztoc', 'get-file', out, join(dir, 'truncated.tar.gz'), 'usr/share/doc/tar/NEWS.gz']);
  t.equal(wrongLayer.code, 1);
  t.match(wrongLayer.stderr, /indexes a layer of/);
});

// ---------------------------------------------------------------------------------------
// `ztoc list` against GNU tar's listing of the same layer

const cache = testCacheDir();
const TAR_ENV = { ...process.env, LC_ALL: 'C.UTF-8', TZ: 'UTC' };

/** RFC 3339 (`2021-03-04T05:06:07.5Z`, ours) or `--full-time` (`2021-03-04 05:06:07.5`, tar's) as one form. */
function timeKey(text: string): string {
  const m = /^(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z?$/.exec(text);
  return m ? `${m[1]} ${m[2]}.${(m[3] ?? '').padEnd(9, '0')}` : `unparsable: ${text}`;
}

interface ListRow {
  mode: string;
  owner: string;
  size: string;
  time: string;
  /** The name, then ` -> target` or ` link to target`. */
  rest: string;
}

// Columns are split on whitespace: both pad columns, but differently (tar right-aligns sizes
// and pads after short times; we left-align every column), which is layout, not content.
const OUR_LINE = /^(\S{10})\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S.*)$/s;
const TAR_LINE = /^(\S{10}) (\S+)\s+(\S+) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)\s+(\S.*)$/s;

function parseRows(text: string, re: RegExp, what: string): ListRow[] {
  return text
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => {
      const m = re.exec(l);
      if (m === null) throw new Error(`${what}: unparsed line ${JSON.stringify(l)}`);
      return { mode: m[1] ?? '', owner: m[2] ?? '', size: m[3] ?? '', time: m[4] ?? '', rest: m[5] ?? '' };
    });
}

/** `tar -tv` as a user runs it (owner names from the headers), in UTC with full times. */
async function tarListing(path: string): Promise<ListRow[]> {
  const { stdout } = await run('tar', ['--full-time', '--quoting-style=escape', '-tvf', path], { env: TAR_ENV });
  // Normalised: tar quotes names (a tab is `\t`, a backslash `\\`); we print them as stored.
  // And the date: tar prints `--full-time`, we print the zTOC's RFC 3339 text.
  return parseRows(stdout, TAR_LINE, `tar -tvf ${path}`).map((r) => ({ ...r, time: timeKey(r.time), rest: unescapeTarName(r.rest) }));
}

/** `rwsr-xr-x` as permission bits (0o4755), from tar's text alone. */
function permBits(s: string): number {
  let m = 0;
  for (let i = 0; i < 9; i++) {
    const c = s[i];
    if (c === 'rwxrwxrwx'[i] || c === 's' || c === 't') m |= 1 << (8 - i);
  }
  if (s[2] === 's' || s[2] === 'S') m |= 0o4000;
  if (s[5] === 's' || s[5] === 'S') m |= 0o2000;
  if (s[8] === 't' || s[8] === 'T') m |= 0o1000;
  return m;
}

const TAR_TYPE: Record<string, string> = { '-': 'reg', h: 'hardlink', l: 'symlink', d: 'dir', c: 'char', b: 'block', p: 'fifo' };

const listLayers: Array<{ name: string; path: () => Promise<string>; xattrs: boolean }> = [
  // GNU long names and links, hardlinks, symlinks, devices, fifo, odd modes and owners, sub-second
  // times, PAX xattrs; gzip.
  ...([
    [{ tree: 'special', format: 'posix', compression: 'gzip-6' }, true],
    [{ tree: 'special', format: 'gnu', compression: 'none' }, false],
    [{ tree: 'usr-small', format: 'gnu', compression: 'gzip-1' }, false],
  ] as Array<[LayerSpec, boolean]>).map(([spec, xattrs]) => ({
    name: `${spec.tree}/${spec.format}/${spec.compression}`,
    path: () => cachedLayer(cache, spec),
    xattrs,
  })),
  // Made without --numeric-owner: owner names (root/root) in the headers.
  { name: 'usr/share/doc (owner names)', path: async () => layer, xattrs: false },
];

for (const l of listLayers) {
  t.test(`ztoc list equals tar -tv: ${l.name}`, async (t) => {
    const path = await l.path();
    const out = join(dir, 'list.ztoc');
    const built = await cli(['ztoc', 'build', path, '-o', out]);
    t.equal(built.code, 0, built.stderr);

    const list = await cli(['ztoc', 'list', out]);
    t.equal(list.code, 0, list.stderr);
    const ours = parseRows(list.stdout, OUR_LINE, 'ztoc list').map((r) => ({ ...r, time: timeKey(r.time) }));
    const theirs = await tarListing(path);
    t.equal(ours.length, theirs.length, `as many lines as tar -tv (${theirs.length})`);
    let bad = 0;
    for (let i = 0; i < Math.max(ours.length, theirs.length); i++) {
      if (JSON.stringify(ours[i]) !== JSON.stringify(theirs[i]) && bad++ < 5) t.same(ours[i], theirs[i], `line ${i + 1}`);
    }
    t.equal(bad, 0, 'every line has tar -tv\'s mode, owner, size, time, name and link target');
    if (l.name.includes('owner names')) t.ok(theirs.every((r) => r.owner === 'root/root'), 'tar shows owner names here, and so do we');

    // --json: every field tar -tv shows, against tar (numeric owners, xattr names with -tvv).
    const json = await cli(['ztoc', 'list', out, '--json']);
    t.equal(json.code, 0, json.stderr);
    const files = JSON.parse(json.stdout) as FileMetadata[];
    const tv: TarTvEntry[] = await tarTv(path, { xattrs: l.xattrs });
    t.equal(files.length, tv.length, 'as many entries as tar -tv');
    let jsonBad = 0;
    for (let i = 0; i < Math.min(files.length, tv.length); i++) {
      const f = files[i];
      const e = tv[i];
      const device = f.type === 'char' || f.type === 'block';
      const got = {
        name: f.name,
        type: f.type,
        size: device ? null : f.uncompressedSize,
        dev: device ? [f.devmajor, f.devminor] : null,
        perm: f.mode & 0o7777,
        uid: f.uid,
        gid: f.gid,
        // tar -tv shows a header's owner name, or the number when the name is empty.
        owner: `${f.uname === '' ? f.uid : f.uname}/${f.gname === '' ? f.gid : f.gname}`,
        time: timeKey(f.modTime),
        link: f.type === 'symlink' || f.type === 'hardlink' ? f.linkname : null,
        xattrs: l.xattrs ? f.paxRecords.map(([k]) => k).filter((k) => k.startsWith('SCHILY.xattr.')).map((k) => k.slice(13)).sort() : [],
      };
      const want = {
        name: e.name,
        type: TAR_TYPE[e.type] ?? `tar type ${e.type}`,
        size: e.size,
        dev: e.devMajor === null ? null : [e.devMajor, e.devMinor],
        perm: permBits(e.mode),
        uid: e.uid,
        gid: e.gid,
        owner: theirs[i]?.owner,
        time: timeKey(e.mtime),
        link: e.link,
        xattrs: [...e.xattrs].sort(),
      };
      if (JSON.stringify(got) !== JSON.stringify(want) && jsonBad++ < 5) t.same(got, want, `entry ${i} ${f.name}`);
      if (got.link === null && f.linkname !== '' && jsonBad++ < 5) t.fail(`entry ${i} ${f.name}: a ${f.type} with linkname ${f.linkname}`);
    }
    t.equal(jsonBad, 0, `--json fields equal tar -tv for all ${files.length} entries`);
    if (l.xattrs) t.ok(tv.some((e) => e.xattrs.length > 0), 'the layer has xattrs to compare');
  });
}

// ---------------------------------------------------------------------------------------
// Exit code 2

t.test('exit 2: a failure that is not the user\'s input (the disk fills up while writing the zTOC)', async (t) => {
  // The one real way to reach the internal-error path without a bug or a test hook: the
  // machine fails under the command. A 16 KiB tmpfs cannot hold the 50 KiB zTOC.
  const fs = await mountTmpfs(join(dir, 'full'), { sizeBytes: 16 << 10 });
  t.teardown(() => fs.unmount());
  const out = join(fs.dir, 'out.ztoc');
  const r = await cli(['ztoc', 'build', await cachedLayer(cache, { tree: 'special', format: 'posix', compression: 'gzip-6' }), '-o', out]);
  t.equal(r.code, 2, 'exit code 2');
  t.match(r.stderr, /^soci-ts: internal error: .*ENOSPC/, 'says internal error, and why');
  t.match(r.stderr, /\n\s+at /, 'with a stack');
  t.equal(r.stdout, '', 'prints no result');
  const left = await readdir(fs.dir);
  t.notOk(left.includes('out.ztoc'), 'no zTOC at the output path (written atomically)');
  t.same(left, [], 'no temp file left behind by the failed write');
});

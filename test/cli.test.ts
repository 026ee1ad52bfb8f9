/** The CLI as a user meets it: help, exit codes, one-line errors, JSON output. */
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

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

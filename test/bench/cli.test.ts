/**
 * `soci-ts bench coldstart` as a user meets it before anything runs: help, and bad input
 * (workloads files, flags) refused with exit code 1 and one line naming the file, workload or
 * flag — before the bench builds or starts anything. The parsers of durations, rates and
 * workloads files on their own.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseWorkloads, readWorkloadsFile } from '../../bench/coldstart/index.js';
import { parseBandwidth, parseDuration } from '../../daemon/cli-bench.js';
import { SOCI_TS_BIN } from '../helpers/snapshotter.js';

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
}

function cli(args: string[]): Promise<Result> {
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  return new Promise((resolve, reject) => {
    const child = spawn(SOCI_TS_BIN, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

let dir: string;
t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'soci-ts-bench-cli-'));
});
t.teardown(() => rm(dir, { recursive: true, force: true }));

t.test('help', async (t) => {
  for (const args of [['bench'], ['bench', 'coldstart']]) {
    const r = await cli([...args, '--help']);
    t.equal(r.code, 0, `${args.join(' ')} --help`);
    t.match(r.stdout, /^Usage: soci-ts bench/);
  }
  const r = await cli(['bench', 'coldstart', '--help']);
  for (const flag of ['--workloads', '--runs', '--network', '--out', '--ideal', '--rtt', '--bandwidth']) t.match(r.stdout, flag, `documents ${flag}`);
  t.match(r.stdout, /--runs 1 --network loopback/, 'names the quick check');
});

t.test('bad input: exit 1, one line, nothing started', async (t) => {
  const cases: Array<{ name: string; file?: string; content?: string; args?: string[]; want: RegExp }> = [
    { name: 'missing workloads file', args: ['--workloads', join(dir, 'nope.json')], want: /nope\.json: cannot read/ },
    { name: 'not JSON', file: 'junk.json', content: '{ nope', want: /junk\.json: not JSON/ },
    { name: 'not a list', file: 'obj.json', content: '{"a": 1}', want: /obj\.json: expected an array of workloads/ },
    { name: 'empty', file: 'empty.json', content: '[]', want: /empty\.json: no workloads/ },
    { name: 'unknown key', file: 'key.json', content: '[{"name":"a","image":"builtin:small","command":["x"],"readyLine":"r","ready_line":"r"}]', want: /workload 1: unknown key "ready_line"/ },
    { name: 'bad command', file: 'cmd.json', content: '[{"name":"a","image":"builtin:small","command":[1],"readyLine":"r"}]', want: /workload 1 \(a\): "command" must be/ },
    { name: 'no ready line', file: 'ready.json', content: '[{"name":"a","image":"builtin:small","command":"true"}]', want: /workload 1 \(a\): "readyLine" must be/ },
    { name: 'duplicate name', file: 'dup.json', content: '[{"name":"a","image":"builtin:small","command":"x","readyLine":"r"},{"name":"a","image":"builtin:small","command":"x","readyLine":"r"}]', want: /workload 2: duplicate name "a"/ },
    { name: 'unknown built-in image', file: 'img.json', content: '[{"name":"a","image":"builtin:huge","command":"x","readyLine":"r"}]', want: /no built-in image "huge"/ },
    { name: 'bad name', file: 'name.json', content: '[{"name":"a b","image":"builtin:small","command":"x","readyLine":"r"}]', want: /"name" must be/ },
    { name: '--only of an unknown workload', args: ['--only', 'nope'], want: /--only: no built-in workload "nope" \(there are: large-read-few, large-read-all, small\)/ },
    { name: 'bad --rtt', args: ['--rtt', 'soon'], want: /"soon" is not a duration/ },
    { name: 'bad --bandwidth', args: ['--bandwidth', 'fast'], want: /"fast" is not a rate/ },
    { name: 'bad --runs', args: ['--runs', '0'], want: /"0" is not a positive whole number/ },
    { name: 'bad --network', args: ['--network', 'moon'], want: /moon/ },
  ];
  for (const c of cases) {
    const args = [...(c.args ?? [])];
    if (c.file !== undefined) {
      await writeFile(join(dir, c.file), c.content ?? '');
      args.push('--workloads', join(dir, c.file));
    }
    const r = await cli(['bench', 'coldstart', ...args, '--out', join(dir, 'out')]);
    t.equal(r.code, 1, `${c.name}: exit 1`);
    t.match(r.stderr, c.want, `${c.name}: names the problem`);
    t.notMatch(r.stderr, /working in|starting/, `${c.name}: refused before anything started`);
    t.ok(r.stderr.trim().split('\n').length <= 2, `${c.name}: one line (plus commander's hint)`);
  }
});

t.test('parsers', async (t) => {
  t.equal(parseDuration('20ms'), 20);
  t.equal(parseDuration('20'), 20, 'a bare number is ms');
  t.equal(parseDuration('1.5s'), 1500);
  t.equal(parseDuration('20m'), 20 * 60_000);
  t.equal(parseDuration('500us'), 0.5);
  t.throws(() => parseDuration('20 parsecs'));
  t.equal(parseBandwidth('100mbit'), 100e6);
  t.equal(parseBandwidth('1gbit'), 1e9);
  t.equal(parseBandwidth('12.5mbps'), 100e6, "tc's bps units are bytes per second");
  t.equal(parseBandwidth('64000'), 64000, 'a bare number is bit/s');
  t.throws(() => parseBandwidth('0mbit'));

  const w = parseWorkloads('{"workloads":[{"name":"a","image":"oci:/x:y","command":"echo hi","readyLine":"hi","createArgs":["--min-layer-size","1MiB"]}]}', 'f.json');
  t.same(w, [{ name: 'a', image: 'oci:/x:y', command: ['/bin/sh', '-c', 'echo hi'], readyLine: 'hi', createArgs: ['--min-layer-size', '1MiB'] }], 'a string command runs with /bin/sh -c; createArgs kept');
  const example = await readWorkloadsFile(fileURLToPath(new URL('../../../bench/coldstart/workloads.example.json', import.meta.url)));
  t.same(
    example.map((x) => x.name),
    ['small-echo', 'large-list-share', 'layout-image'],
    'the example workloads file in the repository parses',
  );
});

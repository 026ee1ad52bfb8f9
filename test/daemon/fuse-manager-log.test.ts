/**
 * The FUSE manager's log file is bounded: size-capped rotation (daemon/log-file.ts), exercised
 * on its own (a burst of numbered lines, an oversized line, a file over the cap at open, a full
 * file system) and through a real `soci-ts fuse-manager` process writing a debug line per
 * request. Oracle: the files on disk, read back: every file within the cap, no file past the
 * number kept, every line a JSON object, and the numbered lines of the kept files a contiguous
 * run ending at the last one written (nothing lost at a rotation, nothing out of order).
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { FuseManagerClient } from '../../daemon/fuse-manager-client.js';
import { LogFileError, RotatingLogFile } from '../../daemon/log-file.js';
import { SOCI_TS_BIN } from '../helpers/snapshotter.js';
import { mountTmpfs } from '../helpers/tmpfs.js';

const work = await mkdtemp(path.join(tmpdir(), 'soci-ts-fm-log-'));
t.teardown(() => rm(work, { recursive: true, force: true }));
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The log files of `file` (file, file.1, …) with their sizes, and every other name in the directory. */
async function logFiles(file: string): Promise<{ files: Map<string, number>; others: string[] }> {
  const dir = path.dirname(file);
  const base = path.basename(file);
  const files = new Map<string, number>();
  const others: string[] = [];
  for (const n of await readdir(dir)) {
    if (n === base || new RegExp(`^${base.replace(/\./g, '\\.')}\\.\\d+$`).test(n)) files.set(n, (await stat(path.join(dir, n))).size);
    else others.push(n);
  }
  return { files, others };
}

/** Lines of file.N … file.1, file (oldest first), each parsed; a line that is not a JSON object fails the test. */
async function readAll(t: Test, file: string, keep: number): Promise<Record<string, unknown>[]> {
  const out: Record<string, unknown>[] = [];
  let bad = 0;
  for (let i = keep; i >= 0; i--) {
    const text = await readFile(i === 0 ? file : `${file}.${i}`, 'utf8').catch(() => '');
    if (text !== '' && !text.endsWith('\n')) bad++;
    for (const l of text.split('\n')) {
      if (l === '') continue;
      try {
        const v = JSON.parse(l) as unknown;
        if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
        out.push(v as Record<string, unknown>);
      } catch {
        bad++;
      }
    }
  }
  t.equal(bad, 0, 'every line of every file is a whole JSON object');
  return out;
}

function contiguousTail(t: Test, seqs: number[], last: number, what: string): void {
  t.ok(seqs.length > 0, `${what}: some lines kept`);
  const first = seqs[0]!;
  const want = Array.from({ length: last - first + 1 }, (_, i) => first + i);
  t.same(seqs, want, `${what}: the kept lines are ${first}…${last}, in order, none missing`);
}

t.test('a burst of lines: rotated at the cap, whole lines only, the newest kept contiguously', async (t) => {
  const file = path.join(work, 'a', 'x.log');
  await mkdir(path.dirname(file));
  const log = await RotatingLogFile.open({ path: file, maxBytes: 4096, keep: 2 });
  const N = 2000;
  let seed = 7;
  const rnd = (): number => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
  for (let i = 0; i < N; i++) log.write(JSON.stringify({ level: 'info', msg: 'line', seq: i, pad: 'x'.repeat(Math.floor(rnd() * 500)) }) + '\n');
  await log.close();
  const { files, others } = await logFiles(file);
  t.same([...files.keys()].sort(), ['x.log', 'x.log.1', 'x.log.2'], 'the file and two rotated ones, no more');
  t.same(others, [], 'nothing else in the directory');
  for (const [n, size] of files) t.ok(size <= 4096 && size > 0, `${n}: ${size} bytes, within the 4096-byte cap`);
  t.ok(log.rotations > 10, `rotated ${log.rotations} times`);
  const lines = await readAll(t, file, 2);
  contiguousTail(t, lines.map((l) => l.seq as number), N - 1, 'burst');
  // Filled close to the cap: a rotation happens only when the next line does not fit.
  const longest = 600;
  t.ok(files.get('x.log.1')! > 4096 - longest, `a rotated file is full up to less than one line (${files.get('x.log.1')} bytes)`);
});

t.test('an oversized line, a file over the cap at open, keep = 0', async (t) => {
  const dir = path.join(work, 'b');
  await mkdir(dir);
  const file = path.join(dir, 'y.log');
  await writeFile(file, `${JSON.stringify({ old: true, pad: 'o'.repeat(5000) })}\n`);
  const log = await RotatingLogFile.open({ path: file, maxBytes: 2048, keep: 1 });
  log.write(JSON.stringify({ seq: 0, msg: 'first' }));
  log.write(JSON.stringify({ seq: 1, msg: 'huge', pad: 'h'.repeat(10_000) }));
  log.write(JSON.stringify({ seq: 2, msg: 'after' }));
  await log.close();
  const { files } = await logFiles(file);
  t.same([...files.keys()].sort(), ['y.log', 'y.log.1'], 'one rotated file kept');
  const rotated = (await readFile(`${file}.1`, 'utf8')).trim();
  t.match(JSON.parse(rotated), { old: true }, 'the old over-cap file was rotated away before the first new line');
  const lines = await readAll(t, file, 0);
  t.match(lines, [{ seq: 0 }, { level: 'warn', msg: /longer than the log file size limit/, head: 'huge', limit: 2048 }, { seq: 2 }], 'the oversized line is replaced by a note naming it');
  t.ok(files.get('y.log')! <= 2048);

  const z = path.join(dir, 'z.log');
  const log0 = await RotatingLogFile.open({ path: z, maxBytes: 1024, keep: 0 });
  for (let i = 0; i < 100; i++) log0.write(JSON.stringify({ seq: i, pad: 'z'.repeat(40) }));
  await log0.close();
  const z0 = await logFiles(z);
  t.same([...z0.files.keys()], ['z.log'], 'keep = 0: only the file itself');
  contiguousTail(t, (await readAll(t, z, 0)).map((l) => l.seq as number), 99, 'keep = 0');

  await t.rejects(RotatingLogFile.open({ path: z, maxBytes: 100 }), LogFileError, 'a cap under 1 KiB is refused');
  await t.rejects(RotatingLogFile.open({ path: path.join(dir, 'no', 'such', 'dir.log') }), { name: 'LogFileError', message: /no[/]such[/]dir\.log: cannot open: .*ENOENT/ });
});

t.test('a full file system: lines are dropped and counted, never half-written; the count is logged once space returns', async (t) => {
  const fs = await mountTmpfs(path.join(work, 'full'), { sizeBytes: 256 << 10 });
  t.teardown(() => fs.unmount());
  const file = path.join(fs.dir, 'f.log');
  const log = await RotatingLogFile.open({ path: file, maxBytes: 64 << 10, keep: 1 });
  log.write(JSON.stringify({ seq: 0 }));
  await log.flush();
  await fs.fill();
  for (let i = 1; i <= 50; i++) log.write(JSON.stringify({ seq: i, pad: 'f'.repeat(200) }));
  await log.flush();
  await fs.free();
  log.write(JSON.stringify({ seq: 51, msg: 'space again' }));
  await log.close();
  const lines = await readAll(t, file, 1);
  const note = lines.find((l) => l.msg === 'log lines dropped (the log file could not take them)');
  t.ok(note !== undefined, 'a note says lines were dropped');
  t.match(note, { level: 'warn', lastError: /ENOSPC|no space/i }, 'with the error');
  const kept = lines.filter((l) => typeof l.seq === 'number').map((l) => l.seq as number);
  t.equal(kept[0], 0, 'the line before the disk filled is there');
  t.equal(kept[kept.length - 1], 51, 'the line after space returned is there');
  t.equal((note!.dropped as number) + kept.length, 52, `every line is either kept or counted as dropped (${String(note!.dropped)} dropped)`);
});

t.test('a real FUSE manager process: its log stays within the cap while it serves a flood of requests', async (t) => {
  const root = path.join(work, 'fm');
  await mkdir(root);
  const socket = path.join(root, 'fm.sock');
  const file = path.join(root, 'fuse-manager.log');
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  const child = spawn(
    SOCI_TS_BIN,
    ['fuse-manager', '--root', root, '--socket', socket, '--hosts-dir', '', '--no-background', '--log-level', 'debug', '--log-file', file, '--log-max-size', '16KiB', '--log-files', '2'],
    { env, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  child.stdout.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr.on('data', (b: Buffer) => (out += b.toString()));
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  t.teardown(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  let c: FuseManagerClient | undefined;
  for (const end = Date.now() + 20_000; c === undefined && Date.now() < end; ) {
    c = await FuseManagerClient.connect(socket, 1000).catch(() => undefined);
    if (c === undefined) await sleep(100);
  }
  if (c === undefined) throw new Error(`the FUSE manager did not start:\n${out}`);
  const hello = await c.hello();
  t.equal(hello.pid, child.pid, 'the manager answers');
  // Each request is answered with a debug line naming its id; send many, 200 at a time.
  const N = 3000;
  let lastId = 0;
  for (let i = 0; i < N; i += 200) {
    const batch = Array.from({ length: 200 }, () => c!.call('list', {}));
    await Promise.all(batch);
  }
  lastId = 1 + N; // hello was id 1
  c.close();
  child.kill('SIGTERM');
  t.equal(await exited, 0, 'SIGTERM: it exits 0');
  t.equal(out, '', 'nothing on its stdout/stderr: every line went to the log file');
  const { files } = await logFiles(file);
  t.same([...files.keys()].sort(), ['fuse-manager.log', 'fuse-manager.log.1', 'fuse-manager.log.2'], 'the log and two rotated files');
  for (const [n, size] of files) t.ok(size <= 16 << 10, `${n}: ${size} bytes, within the 16 KiB cap`);
  const lines = await readAll(t, file, 2);
  const ids = lines.filter((l) => l.msg === 'request answered').map((l) => l.id as number);
  contiguousTail(t, ids, lastId, 'request lines');
  t.match(lines[lines.length - 1], { msg: 'FUSE manager stopped', component: 'fuse-manager' }, 'the last line, written at shutdown, is there');
});

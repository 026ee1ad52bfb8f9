/**
 * The snapshotter daemon over its gRPC socket (the real `bin/soci-ts snapshotter` process):
 * status codes and messages of every refusal; the mounts it answers, mounted for real
 * (bind, overlay with upper/work, read-only views) and checked by writing through them;
 * Usage against `du`; List batching and filters; Cleanup; concurrent Prepares of one key;
 * restart after SIGKILL with the startup sweep; graceful SIGTERM; config files and start-up
 * errors.
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { link, lstat, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Metadata, status, type ServiceError } from '@grpc/grpc-js';
import { SnapshotsClient, type ProtoMount } from '../../daemon/grpc-api.js';
import { run } from '../helpers/layers.js';
import { SOCI_TS_BIN, startSnapshotter, type SnapshotterDaemon } from '../helpers/snapshotter.js';

interface Setup {
  dir: string;
  root: string;
  address: string;
  daemon: SnapshotterDaemon;
  client: SnapshotsClient;
}

const mounted: string[] = [];

async function setup(t: Test): Promise<Setup> {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-server-'));
  const root = join(dir, 'root');
  const address = join(dir, 'run', 'soci-ts.sock');
  const daemon = await startSnapshotter({ root, address });
  const client = await SnapshotsClient.connect(address, { snapshotter: 'soci-ts' });
  t.teardown(async () => {
    client.close();
    for (const m of mounted.splice(0).reverse()) await run('umount', [m], { okCodes: [0, 1, 32] }).catch(() => undefined);
    await daemon.stop();
    await rm(dir, { recursive: true, force: true });
  });
  return { dir, root, address, daemon, client };
}

/** Expects a gRPC error with `code` and a message matching `re`. */
async function grpcRefuses(t: Test, p: Promise<unknown>, code: status, re: RegExp, what: string): Promise<void> {
  try {
    await p;
    t.fail(`${what}: expected ${status[code]}, but it succeeded`);
  } catch (e) {
    const err = e as ServiceError;
    t.equal(err.code, code, `${what}: ${status[code]} (got ${status[err.code] ?? String(err.code)})`);
    t.match(err.details, re, `${what}: ${JSON.stringify(err.details)}`);
  }
}

/** Mounts an answer of the snapshotter at `target` the way containerd would (mount(8) with the options). */
async function mountAt(m: ProtoMount, target: string): Promise<void> {
  await mkdir(target, { recursive: true });
  if (m.type === 'bind') {
    // mount(8) does the bind first and applies `ro` with a remount, as containerd's mount does.
    await run('mount', ['-o', m.options.join(','), m.source, target]);
  } else {
    await run('mount', ['-t', m.type, m.source, target, '-o', m.options.join(',')]);
  }
  mounted.push(target);
}

async function umount(target: string): Promise<void> {
  await run('umount', [target]);
  mounted.splice(mounted.indexOf(target), 1);
}

function optionValue(m: ProtoMount, name: string): string | undefined {
  const o = m.options.find((x) => x.startsWith(`${name}=`));
  return o?.slice(name.length + 1);
}

async function writeFails(path: string): Promise<string> {
  try {
    await writeFile(path, 'x');
    return 'succeeded';
  } catch (e) {
    return (e as NodeJS.ErrnoException).code ?? 'error';
  }
}

t.test('refusals: gRPC codes and containerd-style messages', async (t) => {
  const { client } = await setup(t);
  await client.prepare('a', '');
  await grpcRefuses(t, client.prepare('a', ''), status.ALREADY_EXISTS, /^failed to create snapshot: snapshot a: already exists$/, 'Prepare of a taken key');
  await grpcRefuses(t, client.prepare('b', 'nope'), status.NOT_FOUND, /^failed to create snapshot: missing parent "nope": not found$/, 'Prepare on a missing parent');
  await grpcRefuses(t, client.view('b', 'a'), status.INVALID_ARGUMENT, /^failed to create snapshot: parent "a" is not committed snapshot: invalid argument$/, 'View of an active parent');
  await grpcRefuses(t, client.prepare('', ''), status.INVALID_ARGUMENT, /snapshot key must not be empty/, 'Prepare with no key');
  await grpcRefuses(t, client.prepare('big', '', { k: 'v'.repeat(5000) }), status.INVALID_ARGUMENT, /greater than maximum size \(4096 bytes\)/, 'Prepare with an oversized label');
  await client.commit('A', 'a');
  await client.prepare('b', 'A');
  await client.view('v', 'A');
  await grpcRefuses(t, client.commit('A', 'b'), status.ALREADY_EXISTS, /^failed to commit snapshot: committed snapshot A: already exists$/, 'Commit to a taken name');
  await grpcRefuses(t, client.commit('V', 'v'), status.FAILED_PRECONDITION, /^failed to commit snapshot: snapshot "v" is not active: failed precondition$/, 'Commit of a view');
  await grpcRefuses(t, client.commit('X', 'nope'), status.NOT_FOUND, /^snapshot does not exist: not found$/, 'Commit of a missing key');
  await grpcRefuses(t, client.remove('A'), status.FAILED_PRECONDITION, /^failed to remove snapshot A: cannot remove snapshot with child: failed precondition$/, 'Remove with children');
  await grpcRefuses(t, client.remove('nope'), status.NOT_FOUND, /^failed to remove snapshot nope: snapshot nope: not found$/, 'Remove of a missing key');
  await grpcRefuses(t, client.mounts('A'), status.FAILED_PRECONDITION, /^failed to get active mount: requested snapshot A not active or view: failed precondition$/, 'Mounts of a committed snapshot');
  await grpcRefuses(t, client.mounts('nope'), status.NOT_FOUND, /^failed to get active mount: snapshot does not exist: not found$/, 'Mounts of a missing key');
  await grpcRefuses(t, client.stat('nope'), status.NOT_FOUND, /^snapshot does not exist: not found$/, 'Stat of a missing key');
  await grpcRefuses(t, client.usage('nope'), status.NOT_FOUND, /^snapshot does not exist: not found$/, 'Usage of a missing key');
  await grpcRefuses(t, client.update('A', { x: '1' }, ['parent']), status.INVALID_ARGUMENT, /^cannot update "parent" field on snapshot "A": invalid argument$/, 'Update of the parent');
  await grpcRefuses(t, client.update('nope', {}, []), status.NOT_FOUND, /^snapshot does not exist: not found$/, 'Update of a missing snapshot');
  await grpcRefuses(
    t,
    new Promise((resolve, reject) => client.raw.Update({ snapshotter: 'soci-ts', info: null, update_mask: null }, new Metadata(), (e, r) => (e ? reject(e) : resolve(r)))),
    status.INVALID_ARGUMENT,
    /update without info/,
    'Update without info',
  );
  await grpcRefuses(t, client.list(['kind==']), status.INVALID_ARGUMENT, /^filters: parse error .*: invalid argument$/, 'List with a bad filter');

  // The answers that did succeed.
  const info = await client.stat('A');
  t.equal(info.kind, 'COMMITTED');
  const u = await client.update('A', { team: 'x', other: 'y' }, ['labels.team']);
  t.same(u.labels, { team: 'x' }, 'Update labels.team sets only that label');
  t.equal(u.name, 'A');
  t.ok(u.updated_at !== null && u.created_at !== null && u.updated_at.seconds * 1e9 + u.updated_at.nanos >= u.created_at.seconds * 1e9 + u.created_at.nanos, 'timestamps');
});

t.test('mounts as containerd overlayfs answers them, mounted for real', async (t) => {
  const { dir, root, client } = await setup(t);
  const mnt = (n: string): string => join(dir, 'mnt', n);

  // Base layer: a read-write bind of its own fs.
  const [base] = await client.prepare('base-tmp', '');
  t.equal(base.type, 'bind');
  t.same(base.options, ['rw', 'rbind']);
  t.match(base.source, new RegExp(`^${root}/snapshots/\\d+/fs$`));
  await mountAt(base, mnt('base'));
  await writeFile(join(mnt('base'), 'from-base'), 'base\n');
  await writeFile(join(mnt('base'), 'to-delete'), 'gone soon\n');
  await umount(mnt('base'));
  t.equal(await readFile(join(base.source, 'from-base'), 'utf8'), 'base\n', 'written through the bind mount into the fs dir');
  await client.commit('base', 'base-tmp');

  // A child: overlay with upperdir/workdir of its own and the base as lowerdir.
  const [child] = await client.prepare('child-tmp', 'base');
  t.equal(child.type, 'overlay');
  t.equal(child.source, 'overlay');
  t.equal(optionValue(child, 'lowerdir'), base.source, 'lowerdir: the parent fs');
  const upper = optionValue(child, 'upperdir');
  const work = optionValue(child, 'workdir');
  t.match(upper, new RegExp(`^${root}/snapshots/\\d+/fs$`));
  t.equal(work, upper?.replace(/\/fs$/, '/work'), 'workdir next to upperdir');
  t.same(await client.mounts('child-tmp'), [child], 'Mounts answers what Prepare did');
  await mountAt(child, mnt('child'));
  t.equal(await readFile(join(mnt('child'), 'from-base'), 'utf8'), 'base\n', 'the lower layer shows through');
  await writeFile(join(mnt('child'), 'from-child'), 'child\n');
  await rm(join(mnt('child'), 'to-delete'));
  await umount(mnt('child'));
  const wh = await lstat(join(upper as string, 'to-delete'));
  t.ok(wh.isCharacterDevice() && wh.rdev === 0, 'deleting a lower file left an overlay whiteout (0/0 char device) in upperdir');
  t.equal(await readFile(join(upper as string, 'from-child'), 'utf8'), 'child\n', 'new files land in upperdir');
  t.equal(await readFile(join(base.source, 'to-delete'), 'utf8'), 'gone soon\n', 'the committed lower layer is untouched');
  await client.commit('child', 'child-tmp');

  // A view of one parent: a read-only bind of the parent's fs.
  const [v1] = await client.view('v1', 'base');
  t.same(v1, { type: 'bind', source: base.source, target: '', options: ['ro', 'rbind'] }, 'view of one layer: ro bind of the parent');
  await mountAt(v1, mnt('v1'));
  t.equal(await readFile(join(mnt('v1'), 'from-base'), 'utf8'), 'base\n');
  t.equal(await writeFails(join(mnt('v1'), 'nope')), 'EROFS', 'the view is read-only');
  await umount(mnt('v1'));

  // A view of two layers: overlay with lowerdirs only (no upper: read-only).
  const [v2] = await client.view('v2', 'child');
  t.equal(v2.type, 'overlay');
  t.equal(optionValue(v2, 'lowerdir'), `${upper}:${base.source}`, 'lowerdir: nearest parent first');
  t.equal(optionValue(v2, 'upperdir'), undefined, 'no upperdir');
  await mountAt(v2, mnt('v2'));
  t.same((await readdir(mnt('v2'))).sort(), ['from-base', 'from-child'], 'merged view: the whiteout hides the deleted file');
  t.equal(await writeFails(join(mnt('v2'), 'nope')), 'EROFS', 'read-only');
  await umount(mnt('v2'));

  // A view with no parent: a read-only bind of its own empty fs.
  const [v0] = await client.view('v0', '');
  t.equal(v0.type, 'bind');
  t.same(v0.options, ['ro', 'rbind']);
  t.same(await readdir(v0.source), [], 'empty');
  t.equal((await stat(join(v0.source, '..', 'work')).catch(() => undefined)) === undefined, true, 'views have no work dir');

  // The owner of a child's fs follows the parent's root, as containerd does.
  const [own] = await client.prepare('owner-tmp', '');
  await run('chown', ['1234:2345', own.source]);
  await client.commit('owner', 'owner-tmp');
  const [ownChild] = await client.prepare('owner-child', 'owner');
  const st = await stat(optionValue(ownChild, 'upperdir') as string);
  t.same([st.uid, st.gid], [1234, 2345], 'new upperdir owned like the parent fs');
});

async function du(path: string): Promise<{ size: number; inodes: number }> {
  const size = Number((await run('du', ['-s', '-B1', path])).stdout.split('\t')[0]);
  const inodes = Number((await run('du', ['-s', '--inodes', path])).stdout.split('\t')[0]);
  return { size, inodes };
}

t.test('usage: du of an active snapshot, recorded at commit, zero for views', async (t) => {
  const { client } = await setup(t);
  const [m] = await client.prepare('u', '');
  const fs = m.source;
  await mkdir(join(fs, 'd/e'), { recursive: true });
  await writeFile(join(fs, 'd/big'), Buffer.alloc(300_000, 7));
  await writeFile(join(fs, 'd/e/small'), 'hi');
  await link(join(fs, 'd/big'), join(fs, 'd/e/big-link')); // counted once
  await run('truncate', ['-s', '50M', join(fs, 'sparse')]); // no blocks
  const active = await client.usage('u');
  t.same(active, await du(fs), `active: as du -s -B1 / --inodes (${active.size} bytes, ${active.inodes} inodes)`);
  await client.commit('U', 'u');
  const committed = await client.usage('U');
  t.same(committed, active, 'committed: the usage recorded at commit');
  await writeFile(join(fs, 'late'), Buffer.alloc(100_000, 1));
  t.same(await client.usage('U'), committed, 'committed usage is the recorded one, not a new walk');
  await client.view('uv', 'U');
  t.same(await client.usage('uv'), { size: 0, inodes: 0 }, 'views: zero, as containerd');
});

t.test('List: everything in batches of 100, ordered, filtered', async (t) => {
  const { client } = await setup(t);
  await client.prepare('b0', '');
  await client.commit('base', 'b0');
  const keys: string[] = [];
  for (let i = 0; i < 249; i++) {
    const k = `snap-${String(i).padStart(3, '0')}`;
    keys.push(k);
    await client.prepare(k, 'base', { n: String(i % 3) });
  }
  const all = await client.list();
  t.equal(all.infos.length, 250);
  t.equal(all.messages, 3, '250 infos in 3 stream messages');
  t.same(
    all.infos.map((i) => i.name),
    ['base', ...keys].sort(),
    'ordered by name',
  );
  const n1 = await client.list(['labels.n==1,kind==active']);
  t.equal(n1.infos.length, 83);
  t.ok(n1.infos.every((i) => i.labels.n === '1' && i.kind === 'ACTIVE'));
  const two = await client.list(['name==base', 'name==snap-007']);
  t.same(
    two.infos.map((i) => i.name),
    ['base', 'snap-007'],
    'any of several filters',
  );
  t.equal((await client.list(['kind==view'])).messages, 0, 'nothing matches: no messages, a clean end');
});

t.test('Remove frees the directory; Cleanup removes directories without metadata', async (t) => {
  const { root, client } = await setup(t);
  const [keep] = await client.prepare('keep', '');
  const [gone] = await client.prepare('gone', '');
  await client.remove('gone');
  t.equal(await stat(join(gone.source, '..')).catch(() => 'absent'), 'absent', 'Remove removed the snapshot directory');
  const snaps = join(root, 'snapshots');
  await mkdir(join(snaps, '987654', 'fs'), { recursive: true });
  await mkdir(join(snaps, 'new-42', 'fs'), { recursive: true });
  await writeFile(join(snaps, 'stray-file'), 'x');
  await client.cleanup();
  t.same((await readdir(snaps)).sort(), [keep.source.split('/').at(-2)], 'only the live snapshot directory is left');
  t.ok((await stat(keep.source)).isDirectory());
});

t.test('concurrent Prepares of one key: one wins, nothing leaks', async (t) => {
  const { root, client } = await setup(t);
  const results = await Promise.allSettled(Array.from({ length: 20 }, () => client.prepare('same', '')));
  const ok = results.filter((r) => r.status === 'fulfilled');
  const codes = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected').map((r) => (r.reason as ServiceError).code);
  t.equal(ok.length, 1, 'exactly one Prepare succeeded');
  t.same(codes, Array(19).fill(status.ALREADY_EXISTS), 'the others: ALREADY_EXISTS');
  t.equal((await readdir(join(root, 'snapshots'))).length, 1, 'one directory, no leftovers of the losers');
  const distinct = await Promise.all(Array.from({ length: 20 }, (_, i) => client.prepare(`d${i}`, '')));
  t.equal(new Set(distinct.map((m) => m[0].source)).size, 20, '20 concurrent distinct Prepares: 20 directories');
  t.equal((await client.list()).infos.length, 21);
});

t.test('restart: SIGKILL, then the same root serves the same snapshots; startup sweep', async (t) => {
  const { root, address, daemon, client } = await setup(t);
  await client.prepare('a', '', { l: '1' });
  await client.commit('A', 'a', { c: '2' });
  const [m] = await client.prepare('b', 'A');
  const before = { a: await client.stat('A'), b: await client.stat('b'), list: await client.list() };
  daemon.kill('SIGKILL');
  t.same((await daemon.waitExit(5000))?.signal, 'SIGKILL');
  // While it is down, a crash leftover appears.
  await mkdir(join(root, 'snapshots', 'new-77', 'fs'), { recursive: true });

  const again = await startSnapshotter({ root, address });
  t.teardown(() => again.stop());
  const c2 = await SnapshotsClient.connect(address);
  t.teardown(() => c2.close());
  t.same(await c2.stat('A'), before.a, 'committed snapshot as before');
  t.same(await c2.stat('b'), before.b, 'active snapshot as before');
  t.same(await c2.mounts('b'), [m], 'same mounts');
  t.same(await c2.list(), before.list);
  t.equal(await stat(join(root, 'snapshots', 'new-77')).catch(() => 'absent'), 'absent', 'startup sweep removed the leftover');
  t.ok(
    again.logLines().some((l) => l.msg === 'startup sweep removed directories without metadata'),
    'and said so in the log',
  );
  await c2.prepare('c', 'A');
  t.equal((await c2.list()).infos.length, 3, 'and it keeps working');

  // Graceful stop: SIGTERM ends with exit code 0 and removes the socket.
  again.kill('SIGTERM');
  t.same(await again.waitExit(10_000), { code: 0, signal: null }, 'SIGTERM: exit 0');
  t.equal(await stat(address).catch(() => 'absent'), 'absent', 'socket removed');
});

interface Ran {
  code: number | null;
  stderr: string;
}

function runDaemon(args: string[], untilMs = 20_000): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const env = { ...process.env };
    delete env.NODE_OPTIONS;
    const child = spawn(SOCI_TS_BIN, ['snapshotter', ...args], { env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), untilMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stderr });
    });
  });
}

t.test('config file and start-up errors', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-server-config-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const cfg = join(dir, 'config.toml');

  await writeFile(cfg, 'root = "/tmp/x"\nmetrics_adress = "127.0.0.1:8000"\n');
  let r = await runDaemon(['--config', cfg]);
  t.equal(r.code, 1, 'unknown key: exit 1');
  t.match(r.stderr, /config\.toml: unknown key "metrics_adress"/, 'names the key and the file');

  await writeFile(cfg, 'root = 5\n');
  r = await runDaemon(['--config', cfg]);
  t.equal(r.code, 1);
  t.match(r.stderr, /key "root" must be a string \(got 5\)/, 'type error names the key');

  await writeFile(cfg, 'root = "relative/dir"\n');
  r = await runDaemon(['--config', cfg]);
  t.match(r.stderr, /key "root" must be an absolute path/);

  await writeFile(cfg, 'root = [\n');
  r = await runDaemon(['--config', cfg]);
  t.equal(r.code, 1);
  t.match(r.stderr, /config\.toml: not valid TOML \(line/, 'TOML syntax error with its position');

  r = await runDaemon(['--config', join(dir, 'missing.toml')]);
  t.equal(r.code, 1);
  t.match(r.stderr, /missing\.toml: cannot read/);

  // A valid file: its root and address are used.
  const root = join(dir, 'root');
  const address = join(dir, 'd.sock');
  await writeFile(cfg, `root = "${root}"\naddress = "${address}"\nlog_level = "warn"\n`);
  let d = await startSnapshotter({ root, address, configOnly: true, args: ['--config', cfg] });
  t.ok((await stat(join(root, 'metadata.db'))).isFile(), 'root from the file holds metadata.db');
  t.ok((await stat(address)).isSocket(), 'serving on the address from the file');
  t.notOk(d.logLines().some((l) => l.level === 'info'), 'log_level = "warn" from the file: no info lines');
  await d.stop();

  // Flags override the file.
  const flagAddress = join(dir, 'flag.sock');
  d = await startSnapshotter({ root, address: flagAddress, args: ['--config', cfg] });
  t.equal(await stat(address).catch(() => 'absent'), 'absent', '--address overrides the file');
  t.ok(d.logLines().some((l) => l.level === 'info'), '--log-level (debug) overrides the file (warn)');
  await d.stop();
  d = await startSnapshotter({ root, address, configOnly: true, args: ['--config', cfg] });
  t.teardown(() => d.stop());

  // A second daemon on a live socket refuses to start instead of stealing it.
  r = await runDaemon(['--root', join(dir, 'root2'), '--address', address]);
  t.equal(r.code, 1, 'second daemon: exit 1');
  t.match(r.stderr, /d\.sock: another process is already serving on this socket/);
  const c = await SnapshotsClient.connect(address);
  t.teardown(() => c.close());
  t.same((await c.list()).infos, [], 'the first daemon still serves');

  // A path that is not a socket is not replaced.
  const notSock = join(dir, 'plain-file');
  await writeFile(notSock, 'keep me');
  r = await runDaemon(['--root', join(dir, 'root3'), '--address', notSock]);
  t.equal(r.code, 1);
  t.match(r.stderr, /plain-file exists and is not a socket/);
  t.equal(await readFile(notSock, 'utf8'), 'keep me');
});

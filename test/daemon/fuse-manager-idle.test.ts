/**
 * `soci-ts fuse-manager --idle-exit`: a manager the snapshotter starts at its own start (so that
 * the first lazy pull does not wait for it) must not outlive a snapshotter that never mounted
 * anything. Real `soci-ts fuse-manager` processes; the oracle is the process itself (exit, its
 * socket on disk) and its log.
 */
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { access, mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { FuseManagerClient } from '../../daemon/fuse-manager-client.js';
import { SOCI_TS_BIN } from '../helpers/snapshotter.js';

const work = await mkdtemp(path.join(tmpdir(), 'soci-ts-fm-idle-'));
t.teardown(() => rm(work, { recursive: true, force: true }));
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Started {
  child: ChildProcess;
  socket: string;
  logFile: string;
  exited: Promise<number | null>;
  exitedWithin(ms: number): Promise<boolean>;
}

async function startManager(name: string, idleExit: string): Promise<Started> {
  const root = path.join(work, name);
  const socket = path.join(root, 'fuse-manager.sock');
  const logFile = path.join(root, 'fuse-manager.log');
  await mkdir(root, { recursive: true });
  const child = spawn(SOCI_TS_BIN, ['fuse-manager', '--root', root, '--socket', socket, '--hosts-dir', '', '--no-background', '--log-file', logFile, '--idle-exit', idleExit], { stdio: 'ignore' });
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  for (const end = Date.now() + 30_000; Date.now() < end; ) {
    const ok = await access(socket).then(
      () => true,
      () => false,
    );
    if (ok) break;
    if (child.exitCode !== null) throw new Error(`fuse-manager exited with ${child.exitCode}: ${await readFile(logFile, 'utf8').catch(() => '')}`);
    await sleep(50);
  }
  return {
    child,
    socket,
    logFile,
    exited,
    exitedWithin: (ms) => Promise.race([exited.then(() => true), sleep(ms).then(() => false)]),
  };
}

t.test('nobody connects: the manager exits after the idle time, removing its socket', async (t) => {
  const m = await startManager('alone', '1500');
  const t0 = Date.now();
  t.ok(await m.exitedWithin(15_000), 'it exited on its own');
  t.equal(await m.exited, 0, 'exit code 0');
  t.ok(Date.now() - t0 >= 1000, `not before the idle time (${Date.now() - t0} ms after its socket appeared)`);
  await t.rejects(access(m.socket), 'its socket is removed');
  const log = await readFile(m.logFile, 'utf8');
  t.match(log, /"msg":"idle: nothing mounted and no snapshotter connected; exiting"/, 'the reason is logged');
});

t.test('a connected client keeps it; it exits only once the client has gone for the idle time', async (t) => {
  const m = await startManager('connected', '1500');
  const c = await FuseManagerClient.connect(m.socket);
  const hello = await c.hello();
  t.equal(hello.pid, m.child.pid, 'the client talks to this manager');
  t.notOk(await m.exitedWithin(4000), 'still running 4 s later while connected (idle time 1.5 s)');
  // A short disconnection (the snapshotter's probe at start, a reconnect) does not stop it.
  c.close();
  await sleep(300);
  const c2 = await FuseManagerClient.connect(m.socket);
  t.notOk(await m.exitedWithin(3000), 'reconnected within the idle time: still running');
  c2.close();
  t.ok(await m.exitedWithin(15_000), 'exited once nobody was connected for the idle time');
  t.equal(await m.exited, 0, 'exit code 0');
});

t.test('without --idle-exit (0, the default for a manager started by hand) it keeps running', async (t) => {
  const m = await startManager('forever', '0');
  t.notOk(await m.exitedWithin(3000), 'still running after 3 s with nobody connected');
  m.child.kill('SIGTERM');
  t.equal(await m.exited, 0, 'SIGTERM: exit code 0');
});

t.test('descriptors inherited beyond stdio are closed at start (a pipe of the parent gets its EOF)', async (t) => {
  const root = path.join(work, 'inherit');
  await mkdir(root, { recursive: true });
  const socket = path.join(root, 'fuse-manager.sock');
  // fd 200 of the manager: the write end of a pipe without O_CLOEXEC, as a parent's leaked fd
  // is (Node marks the stdio it passes beyond 2, and low inherited fds, close-on-exec; not 200).
  const child = spawn('/bin/bash', ['-c', 'exec 200>&3 3>&-; exec "$@"', 'sh', SOCI_TS_BIN, 'fuse-manager', '--root', root, '--socket', socket, '--hosts-dir', '', '--no-background', '--log-file', path.join(root, 'log')], {
    stdio: ['ignore', 'ignore', 'ignore', 'pipe'],
  });
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const extra = child.stdio[3] as NodeJS.ReadableStream;
  extra.resume();
  const ended = new Promise<boolean>((resolve) => extra.once('end', () => resolve(true)));
  t.ok(await Promise.race([ended, sleep(30_000).then(() => false)]), 'the pipe reached EOF: the manager no longer holds it');
  t.equal(child.exitCode, null, 'while the manager runs on');
  child.kill('SIGTERM');
});

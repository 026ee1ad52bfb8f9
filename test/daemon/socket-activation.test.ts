/**
 * Socket activation as systemd does it: the test opens a listening unix socket, and a tiny
 * wrapper script (`LISTEN_PID=$$ … exec soci-ts snapshotter`, so that LISTEN_PID is the
 * daemon's own pid, as systemd sets it) starts the daemon with the socket as fd 3.
 * Asserted over gRPC (the real client): a call made before the daemon even started is answered
 * once it runs (connections queue in the socket's backlog, the point of activation); the daemon
 * serves Prepare/List on the passed socket and binds none of its own (the configured address
 * stays absent, the private bind is gone); SIGTERM leaves the socket file in place (systemd owns
 * it). Inherited variables (LISTEN_PID of another process) are ignored; a LISTEN_FDS with no
 * open fd 3 is a start-up error. The LISTEN_* parsing itself is checked on its own.
 */
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { chmod, link, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import * as net from 'node:net';
import { join } from 'node:path';
import { SnapshotsClient } from '../../daemon/grpc-api.js';
import { listenFds, SocketActivationError } from '../../daemon/socket-activation.js';
import { SOCI_TS_BIN, snapshotterTempDir } from '../helpers/snapshotter.js';

t.test('LISTEN_* variables', async (t) => {
  t.same(listenFds({ LISTEN_PID: '42', LISTEN_FDS: '1' }, 42), { fds: [3], names: ['unknown'] });
  t.same(listenFds({ LISTEN_PID: '42', LISTEN_FDS: '2', LISTEN_FDNAMES: 'a:b' }, 42), { fds: [3, 4], names: ['a', 'b'] });
  t.equal(listenFds({ LISTEN_PID: '41', LISTEN_FDS: '1' }, 42), undefined, 'for another process: ignored');
  t.equal(listenFds({ LISTEN_FDS: '1' }, 42), undefined, 'no LISTEN_PID: not activated');
  t.equal(listenFds({ LISTEN_PID: '42', LISTEN_FDS: '0' }, 42), undefined);
  t.throws(() => listenFds({ LISTEN_PID: 'x', LISTEN_FDS: '1' }, 42), SocketActivationError);
  t.throws(() => listenFds({ LISTEN_PID: '42', LISTEN_FDS: 'many' }, 42), /LISTEN_FDS="many" is not a number of fds/);
  const env: NodeJS.ProcessEnv = { LISTEN_PID: '42', LISTEN_FDS: '1', LISTEN_FDNAMES: 'x', OTHER: 'y' };
  listenFds(env, 42);
  t.same(env, { OTHER: 'y' }, 'the variables are removed, so children do not inherit them');
});

interface Daemon {
  child: ChildProcess;
  log: () => string;
  exited: Promise<number | null>;
}

/** Starts `wrapper soci-ts snapshotter ARGS` with `fd3` (if any) as its fd 3. */
function startWrapped(wrapper: string, args: string[], fd3: number | undefined): Daemon {
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  const stdio: Array<'ignore' | 'pipe' | number> = ['ignore', 'ignore', 'pipe'];
  if (fd3 !== undefined) stdio.push(fd3);
  const child = spawn(wrapper, [SOCI_TS_BIN, 'snapshotter', ...args], { env, stdio, detached: true });
  let log = '';
  child.stderr!.on('data', (b: Buffer) => (log += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  return { child, log: () => log, exited };
}

const logLines = (log: string): Array<Record<string, unknown>> =>
  log
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);

/**
 * A listening unix socket bound at `path`, its fd, and a close of this process's copy that
 * leaves `path` in place (libuv unlinks the path it bound when it closes the socket: a hard
 * link keeps the socket file, and is renamed back afterwards).
 */
async function listeningSocket(dir: string, path: string): Promise<{ fd: number; closeOurs: () => Promise<void> }> {
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  const keep = join(dir, 'keep.sock');
  await link(path, keep);
  const fd = (server as unknown as { _handle: { fd: number } })._handle.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('no fd for the listening socket');
  return {
    fd,
    closeOurs: async () => {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await rename(keep, path);
    },
  };
}

t.test('the daemon serves on the socket systemd passed as fd 3', async (t) => {
  const dir = await snapshotterTempDir();
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const wrapper = join(dir, 'activate.sh');
  // What systemd does for a .socket unit: the fd is 3, LISTEN_PID the exec()ed process. The
  // sleep makes sure that the test's first call comes before the daemon runs.
  await writeFile(wrapper, '#!/bin/sh\nsleep 1\nLISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=soci-ts.sock exec "$@"\n');
  await chmod(wrapper, 0o755);
  const activated = join(dir, 'activated.sock');
  const configured = join(dir, 'configured.sock');
  const root = join(dir, 'root');
  const sock = await listeningSocket(dir, activated);

  const d = startWrapped(wrapper, ['--root', root, '--address', configured, '--metrics-address', '', '--log-level', 'debug'], sock.fd);
  t.teardown(() => {
    try {
      process.kill(-d.child.pid!, 'SIGKILL');
    } catch {
      // gone
    }
  });
  await sock.closeOurs(); // the wrapper holds the only listening copy now
  t.ok((await stat(activated)).isSocket(), 'closing our copy left the socket file');

  // A client call before the daemon runs (the wrapper still sleeps): it waits in the backlog.
  const early = await SnapshotsClient.connect(activated);
  t.teardown(() => early.close());
  const earlyList = early.list();
  t.notOk(logLines(d.log()).some((l) => l.msg === 'snapshotter serving'), 'the call is made before the daemon serves');

  const listed = await Promise.race([earlyList, d.exited.then((code) => Promise.reject(new Error(`daemon exited ${code}: ${d.log()}`)))]);
  t.same(listed.infos, [], 'a call made before the daemon started is answered by it');

  const c = await SnapshotsClient.connect(activated);
  t.teardown(() => c.close());
  const mounts = await c.prepare('k1');
  t.equal(mounts.length, 1, 'Prepare over the activated socket');
  t.same((await c.list()).infos.map((i) => i.name), ['k1']);
  await t.rejects(stat(configured), { code: 'ENOENT' }, 'the configured address is not bound');
  t.same((await readdir(dir)).filter((n) => n.endsWith('.grpc.sock')), [], 'the private bind is gone');
  const lines = logLines(d.log());
  const served = lines.find((l) => l.msg === 'snapshotter serving on the socket-activated listener');
  t.ok(served, 'the log says it serves on the activated socket');
  t.equal(served?.fd, 3);
  t.equal(served?.name, 'soci-ts.sock', 'with its LISTEN_FDNAMES name');
  t.equal(served?.address, activated);

  process.kill(-d.child.pid!, 'SIGTERM');
  t.equal(await d.exited, 0, 'SIGTERM: exit 0');
  t.ok((await stat(activated)).isSocket(), 'the socket file stays (systemd owns it)');
});

t.test('inherited or broken activation', async (t) => {
  const dir = await snapshotterTempDir();
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const root = join(dir, 'root');
  const configured = join(dir, 'configured.sock');

  // LISTEN_PID of another process (inherited): ignored, the daemon binds its own address.
  const inherited = join(dir, 'inherited.sh');
  await writeFile(inherited, '#!/bin/sh\nLISTEN_PID=1 LISTEN_FDS=1 exec "$@"\n');
  await chmod(inherited, 0o755);
  const d = startWrapped(inherited, ['--root', root, '--address', configured, '--metrics-address', ''], undefined);
  t.teardown(() => {
    try {
      process.kill(-d.child.pid!, 'SIGKILL');
    } catch {
      // gone
    }
  });
  let ok = false;
  for (let i = 0; i < 200 && !ok; i++) {
    ok = (await stat(configured).catch(() => undefined))?.isSocket() === true && logLines(d.log()).some((l) => l.msg === 'snapshotter serving');
    if (!ok) await new Promise((r) => setTimeout(r, 100));
  }
  t.ok(ok, 'serves on its configured address');
  const c = await SnapshotsClient.connect(configured);
  t.teardown(() => c.close());
  t.same((await c.list()).infos, []);
  process.kill(-d.child.pid!, 'SIGTERM');
  t.equal(await d.exited, 0);

  // LISTEN_FDS=1 for this process but fd 3 is a plain file: a start-up error.
  const broken = join(dir, 'broken.sh');
  await writeFile(broken, '#!/bin/sh\nexec 3<"$0"\nLISTEN_PID=$$ LISTEN_FDS=1 exec "$@"\n');
  await chmod(broken, 0o755);
  const b = startWrapped(broken, ['--root', root, '--address', configured, '--metrics-address', ''], undefined);
  t.equal(await b.exited, 1, 'exit 1');
  t.match(b.log(), /socket activation: fd 3 is not a socket/);
  await t.rejects(stat(configured), { code: 'ENOENT' }, 'and it bound nothing');
});

/**
 * A FUSE manager of another build after an upgrade of soci-ts: the snapshotter restarted as a
 * different build (SOCI_TS_TEST_VERSION / SOCI_TS_TEST_FUSE_PROTOCOL make a real `soci-ts
 * snapshotter` process believe it is one) finds the running manager, which serves a lazily
 * mounted layer, and:
 * - with a protocol in common: reattaches (the same manager, the same FUSE mount), warns naming
 *   both builds and how to upgrade, and says so in `soci_ts_fuse_manager_info{current="false"}`;
 * - with no protocol in common: refuses to start (exit code 1) with an error naming both builds,
 *   the manager's pid and what to do, and leaves the manager and its mount untouched;
 * - when the manager serves no mount: replaces it with one of its own build.
 * Oracles: the manager's pid and instance (hello), /proc/self/mountinfo (mount ids), a file read
 * through the mount against the layer's tar, the processes' exit codes, the scraped metrics.
 */
import t from 'tap';
import { createHash } from 'node:crypto';
import * as http from 'node:http';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { status, type ServiceError } from '@grpc/grpc-js';
import { SnapshotsClient } from '../../daemon/grpc-api.js';
import { FuseManagerClient } from '../../daemon/fuse-manager-client.js';
import { SOCI_TS_VERSION } from '../../daemon/version.js';
import { readZtoc } from '../../ztoc/index.js';
import { defaultImages } from '../helpers/images.js';
import { pushIndexed } from '../helpers/remote.js';
import { run } from '../helpers/layers.js';
import { registryRequest, startRegistry } from '../helpers/registry.js';
import { startSnapshotter, SnapshotterDaemonError, stopFuseManager, unmountUnder, type SnapshotterDaemon } from '../helpers/snapshotter.js';
import { parseExposition, value } from '../helpers/exposition.js';

const work = await mkdtemp(path.join(tmpdir(), 'soci-ts-fm-upgrade-'));
const root = path.join(work, 'root');
const address = path.join(work, 'soci-ts.sock');
const metricsSock = path.join(work, 'metrics.sock');
const socket = path.join(root, 'fuse-manager.sock');
const config = path.join(work, 'config.toml');
await writeFile(config, `hosts_dir = ""\nmetrics_address = ${JSON.stringify(metricsSock)}\n[background_fetch]\nenabled = false\n`);

const daemons: SnapshotterDaemon[] = [];
const registry = await startRegistry();
t.teardown(async () => {
  for (const d of daemons) await d.stop().catch(() => undefined);
  await stopFuseManager(root);
  await unmountUnder(work);
  await registry.stop();
  await run('rm', ['-rf', '--one-file-system', '--', work]).catch(() => undefined);
});

const { multi } = await defaultImages();
const { pushed, layer: indexed, layerIndex: layerN } = await pushIndexed(registry, multi, 'upgrade/multi', path.join(work, 'create-store'));
const ztoc = readZtoc((await registryRequest(registry, `/v2/upgrade/multi/blobs/${indexed.ztoc}`)).body);
const probe = ztoc.ztoc.files.find((f) => f.type === 'reg' && f.uncompressedSize > 1000 && f.uncompressedSize < 100_000)!;
// The oracle: the file as the layer's tar has it.
const oracleDir = path.join(work, 'oracle');
await run('mkdir', ['-p', oracleDir]);
await run('tar', ['-xzf', multi.layers[layerN]!.path, '-C', oracleDir, probe.name]);
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const probeSha = sha(await readFile(path.join(oracleDir, probe.name)));

const target = `sha256:${'7'.repeat(64)}`;
const labels = {
  'containerd.io/snapshot.ref': target,
  'containerd.io/snapshot/cri.image-ref': pushed.ref,
  'containerd.io/snapshot/cri.manifest-digest': pushed.manifestDigest,
  'containerd.io/snapshot/cri.layer-digest': indexed.digest,
  'containerd.io/snapshot/cri.image-layers': multi.layers.slice(layerN).map((l) => l.digest).join(','),
};

async function start(env: NodeJS.ProcessEnv = {}): Promise<{ d: SnapshotterDaemon; c: SnapshotsClient }> {
  const d = await startSnapshotter({ root, address, args: ['--config', config], env, startTimeoutMs: 60_000 });
  daemons.push(d);
  return { d, c: await SnapshotsClient.connect(address) };
}

async function hello(): Promise<{ pid: number; instance: string; version: string; build?: string; protocol: number; mounts: number }> {
  const c = await FuseManagerClient.connect(socket);
  try {
    return await c.hello();
  } finally {
    c.close();
  }
}

async function fuseMounts(): Promise<string[]> {
  const info = await readFile('/proc/self/mountinfo', 'utf8');
  return info
    .split('\n')
    .map((l) => l.split(' '))
    .filter((f) => (f[4] ?? '').startsWith(root + '/') && (f[f.indexOf('-') + 1] ?? '').startsWith('fuse'))
    .map((f) => `${f[0]} ${f[4]}`);
}

function scrape(): Promise<string> {
  return new Promise((resolve, reject) => {
    http
      .get({ socketPath: metricsSock, path: '/metrics' }, (res) => {
        let body = '';
        res.on('data', (b: Buffer) => (body += b.toString()));
        res.on('end', () => resolve(body));
      })
      .on('error', reject);
  });
}

async function readProbe(): Promise<string> {
  const [m] = await fuseMounts();
  return sha(await readFile(path.join(m!.split(' ')[1]!, probe.name)));
}

let first: { pid: number; instance: string; build?: string };
t.test('this build: a lazily mounted layer in a FUSE manager of the same build', async (t) => {
  const { d, c } = await start();
  await t.rejects(c.prepare(`extract ${target}`, '', labels), { code: status.ALREADY_EXISTS }, 'the layer is served lazily (ALREADY_EXISTS)');
  first = await hello();
  t.match(first, { version: SOCI_TS_VERSION, protocol: 1, mounts: 1 }, 'the manager reports its build');
  t.match(first.build, /^[0-9a-f]{12}$/, 'with a build id');
  t.equal(await readProbe(), probeSha, `${probe.name} reads right through the mount`);
  const fams = parseExposition(await scrape());
  t.equal(value(fams, 'soci_ts_fuse_manager_info', { version: SOCI_TS_VERSION, build: first.build!, protocol: '1', current: 'true', process: 'snapshotter' }), 1, 'soci_ts_fuse_manager_info: current="true"');
  c.close();
  await d.stop();
});

t.test('another build with a protocol in common: reattached, warned about, reported as not current', async (t) => {
  const mountsBefore = await fuseMounts();
  const { d, c } = await start({ SOCI_TS_TEST_VERSION: '9.9.9-test' });
  const now = await hello();
  t.equal(now.pid, first.pid, 'the same FUSE manager process');
  t.equal(now.instance, first.instance, 'the same instance (not restarted)');
  t.same(await fuseMounts(), mountsBefore, 'the same FUSE mount (mount id)');
  const warn = d.logLines().find((l) => typeof l.msg === 'string' && l.msg.startsWith('the FUSE manager runs another build of soci-ts'));
  t.ok(warn !== undefined, 'a warning says the manager runs another build');
  t.match(warn, { level: 'warn', pid: first.pid, managerVersion: SOCI_TS_VERSION, managerBuild: first.build, version: '9.9.9-test', managerProtocol: 1, protocol: 1 }, 'naming both builds');
  t.match(String(warn?.msg), new RegExp(`soci-ts ${SOCI_TS_VERSION.replace(/\./g, '\\.')}, build ${first.build}.*this snapshotter: soci-ts 9\\.9\\.9-test.*kill -TERM ${first.pid}`), 'and how to upgrade it');
  t.match(d.logLines().find((l) => l.msg === 'FUSE manager reconciled'), { kept: 1, remounted: 0, removed: 0 }, 'its mount is kept');
  const fams = parseExposition(await scrape());
  t.equal(value(fams, 'soci_ts_fuse_manager_info', { version: SOCI_TS_VERSION, build: first.build!, current: 'false', process: 'snapshotter' }), 1, 'soci_ts_fuse_manager_info{current="false"} names the manager\'s build');
  t.equal((await c.stat(target)).labels['containerd.io/snapshot/remote'], 'remote snapshot', 'Stat of the lazy snapshot');
  t.equal(await readProbe(), probeSha, 'the file still reads');
  c.close();
  await d.stop();
});

t.test('another build with no protocol in common: the snapshotter refuses to start, the manager is left alone', async (t) => {
  const mountsBefore = await fuseMounts();
  let err: unknown;
  try {
    await start({ SOCI_TS_TEST_VERSION: '2.0.0-test', SOCI_TS_TEST_FUSE_PROTOCOL: '2' });
  } catch (e) {
    err = e;
  }
  t.ok(err instanceof SnapshotterDaemonError, 'it does not serve');
  const msg = (err as Error).message;
  t.match(msg, /exited \(code 1,/, 'exit code 1 (a user error)');
  t.match(msg, new RegExp(`soci-ts: the running FUSE manager on ${socket.replace(/[.]/g, '\\.')} \\(pid ${first.pid}; soci-ts ${SOCI_TS_VERSION.replace(/\./g, '\\.')}, build ${first.build}, FUSE manager protocol 1\\) cannot be driven by this snapshotter \\(soci-ts 2\\.0\\.0-test, build [0-9a-f]{12}, FUSE manager protocol 2\\)`), 'the error names both builds and protocols and the pid');
  t.match(msg, new RegExp(`serves 1 lazily mounted layer.*kill -TERM ${first.pid}.*go back to soci-ts ${SOCI_TS_VERSION.replace(/\./g, '\\.')}`), 'and what to do');
  const now = await hello();
  t.equal(now.instance, first.instance, 'the manager runs on');
  t.equal(now.mounts, 1, 'with its mount');
  t.same(await fuseMounts(), mountsBefore, 'the same FUSE mount');
  t.equal(await readProbe(), probeSha, 'the file still reads');
});

t.test('a manager of another build that serves no mount is replaced by one of this build', async (t) => {
  // Remove the lazy snapshot with this build's snapshotter: the manager is left idle.
  {
    const { d, c } = await start();
    await c.remove(target);
    t.equal((await hello()).mounts, 0, 'the manager serves nothing now');
    t.equal((await hello()).pid, first.pid);
    c.close();
    await d.stop();
  }
  const { d, c } = await start({ SOCI_TS_TEST_VERSION: '3.0.0-test', SOCI_TS_TEST_FUSE_PROTOCOL: '3' });
  const now = await hello();
  t.not(now.pid, first.pid, 'another FUSE manager process');
  t.match(now, { version: '3.0.0-test', protocol: 3, mounts: 0 }, "of the snapshotter's build");
  // Exited: gone, or a zombie its new parent (whatever reaps orphans here) has not reaped yet.
  // (It may still be tearing down its address space for a moment after its cmdline went empty.)
  const procState = (): Promise<string> =>
    readFile(`/proc/${first.pid}/stat`, 'utf8').then(
      (st) => st.slice(st.lastIndexOf(')') + 2, st.lastIndexOf(')') + 3),
      () => 'gone',
    );
  let state = await procState();
  for (let i = 0; i < 50 && state !== 'gone' && state !== 'Z'; i++) {
    await new Promise((r) => setTimeout(r, 100));
    state = await procState();
  }
  t.ok(state === 'gone' || state === 'Z', `the old manager exited (${state === 'gone' ? 'reaped' : 'a zombie not reaped yet'})`);
  t.ok(
    d.logLines().some((l) => l.msg === 'replacing an idle FUSE manager of another build (it serves no mount)' && l.pid === first.pid && l.managerVersion === SOCI_TS_VERSION && l.version === '3.0.0-test'),
    'the replacement is logged with both builds',
  );
  t.match(d.logLines().find((l) => l.msg === 'FUSE manager: started'), { replacedPid: first.pid, version: '3.0.0-test' }, 'and the new one named');
  // The new manager serves lazy layers.
  try {
    await c.prepare(`extract-2 ${target}`, '', labels);
    t.fail('Prepare answered mounts: not served lazily');
  } catch (e) {
    t.equal((e as ServiceError).code, status.ALREADY_EXISTS, 'a lazy Prepare works with the new manager');
  }
  t.equal(await readProbe(), probeSha, 'the file reads through the new manager');
  const fams = parseExposition(await scrape());
  t.equal(value(fams, 'soci_ts_fuse_manager_info', { version: '3.0.0-test', protocol: '3', current: 'true', process: 'snapshotter' }), 1, 'soci_ts_fuse_manager_info: current again');
  c.close();
  await d.stop();
});

/**
 * Remote snapshots end to end, as root with FUSE and overlayfs: a real registry with token auth
 * (behind the counting fault proxy), the mount test's image (MOUNT_IMAGE_SPEC: one big layer
 * indexed, four small ones; whiteouts, opaque dirs, hardlinks, devices) pushed with skopeo and
 * indexed with `bin/soci-ts create --push`, and the real `bin/soci-ts snapshotter` driven through
 * the Snapshots gRPC API the way containerd's unpacker drives a remote snapshotter: Prepare of
 * each layer with the remote labels (`containerd.io/snapshot.ref` = the chain ID, the
 * `containerd.io/snapshot/cri.*` labels), parent = the previous chain ID.
 *
 * Oracles: the chain IDs computed here from the config's diff_ids; `umoci unpack` of the same
 * image (every path: type, mode, owner, size, mtime, target, rdev, user.* xattrs, sha256,
 * hardlink identity); the fault proxy's log of what the registry served; /proc/self/mountinfo;
 * /proc/PID/stat (sessions and process groups); the span digests of the zTOC against the files
 * of the disk cache; the snapshotter's JSON log lines.
 *
 * Credentials reach the snapshotter and its FUSE manager only through the docker config file
 * named in the daemon config (the registry answers 401 without a token), so restarts of either
 * process must find them again on their own.
 */
import t, { type Test } from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { access, lstat, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { status, type ServiceError } from '@grpc/grpc-js';
import { SnapshotsClient, type ProtoMount } from '../../daemon/grpc-api.js';
import { connect as netConnect } from 'node:net';
import { FuseManagerClient } from '../../daemon/fuse-manager-client.js';
import { FuseManager } from '../../daemon/fuse-manager.js';
import { FuseManagerError } from '../../daemon/fuse-protocol.js';
import type { MetricsSink } from '../../daemon/metrics-sink.js';
import { ArtifactStore } from '../../daemon/store.js';
import { nullLogger, RegistryClient } from '../../fetcher/index.js';
import { readZtoc, type LayerIndex } from '../../ztoc/index.js';
import { httpRequest, startRegistry, registryRequest } from '../helpers/registry.js';
import { startFaultProxy } from '../helpers/fault-proxy.js';
import { buildImage, pushImage, MOUNT_IMAGE_SPEC } from '../helpers/images.js';
import { run, testCacheDir } from '../helpers/layers.js';
import { tarTv } from '../helpers/oracles.js';
import { diffTrees, entryFields, hardlinkGroups, snapshotTree, type TreeEntry } from '../helpers/tree.js';
import { SOCI_TS_BIN, startSnapshotter, type SnapshotterDaemon } from '../helpers/snapshotter.js';
import { runCli, type CliResult } from '../helpers/cli.js';
import { LABEL_MANIFEST, prepareRemote as prepareOnChain, remoteLabels as unpackerLabels, type PrepareResult } from '../helpers/remote.js';

const LABEL_REMOTE = 'containerd.io/snapshot/remote';

const work = await mkdtemp(path.join(tmpdir(), 'soci-ts-remote-'));
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const sha256 = (b: Uint8Array | string): string => createHash('sha256').update(b).digest('hex');

// ------------------------------------------------------------------ cleanup of what we start

const managerPids = new Set<number>();
const daemons: SnapshotterDaemon[] = [];
const holders: ChildProcess[] = [];
process.on('exit', () => {
  for (const pid of managerPids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
});

async function mountsUnder(...dirs: string[]): Promise<Array<{ id: number; mountpoint: string; fstype: string }>> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  const out: Array<{ id: number; mountpoint: string; fstype: string }> = [];
  for (const l of text.split('\n')) {
    if (l === '') continue;
    const f = l.split(' ');
    const sep = f.indexOf('-');
    const mp = f[4]!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    if (dirs.some((d) => mp === d || mp.startsWith(d + '/'))) out.push({ id: Number(f[0]), mountpoint: mp, fstype: f[sep + 1]! });
  }
  return out;
}

/** Whether a process runs (a zombie does not). */
async function alive(pid: number): Promise<boolean> {
  const st = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  return st !== '' && !/^\) [ZX] /.test(st.slice(st.lastIndexOf(')')));
}

async function waitDead(pid: number, ms = 15_000): Promise<boolean> {
  for (const end = Date.now() + ms; Date.now() < end; ) {
    if (!(await alive(pid))) return true;
    await sleep(50);
  }
  return false;
}

/** pgrp and session of a process (fields 5 and 6 of /proc/PID/stat). */
async function groupOf(pid: number): Promise<{ pgrp: number; session: number }> {
  const st = await readFile(`/proc/${pid}/stat`, 'utf8');
  const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
  return { pgrp: Number(f[2]), session: Number(f[3]) };
}

async function managerHello(socket: string): Promise<{ pid: number; instance: string }> {
  const c = await FuseManagerClient.connect(socket);
  try {
    const h = await c.hello();
    managerPids.add(h.pid);
    return h;
  } finally {
    c.close();
  }
}

async function managerList(socket: string): Promise<Array<{ mountpoint: string; layerDigest: string; mountedAt: string }>> {
  const c = await FuseManagerClient.connect(socket);
  try {
    managerPids.add((await c.hello()).pid);
    return (await c.call('list', {})).mounts;
  } finally {
    c.close();
  }
}

t.teardown(async () => {
  for (const h of holders) h.kill('SIGKILL');
  for (const d of daemons) await d.stop().catch(() => undefined);
  // Every FUSE manager these daemons started (also ones a failed test never asked about).
  for (const socket of [managerSocket, socket4, socket5]) await managerHello(socket).catch(() => undefined);
  // Overlays first (they use the FUSE layers), then the FUSE managers (SIGTERM unmounts), then the rest.
  for (const m of (await mountsUnder(work)).filter((x) => x.fstype === 'overlay').sort((a, b) => b.id - a.id)) await run('umount', ['-l', m.mountpoint]).catch(() => undefined);
  for (const pid of managerPids) {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      continue;
    }
    if (!(await waitDead(pid, 20_000))) process.kill(pid, 'SIGKILL');
  }
  for (const m of (await mountsUnder(work)).sort((a, b) => b.mountpoint.length - a.mountpoint.length)) await run('umount', ['-l', m.mountpoint]).catch(() => undefined);
  await proxy.close();
  await reg.stop();
  await rm(work, { recursive: true, force: true });
});

// ------------------------------------------------------------------ the registry, the image, the index

const reg = await startRegistry({ auth: 'token' });
const proxy = await startFaultProxy({ upstream: reg.url, seed: 11, rate: 0, faults: ['stall'] });
const creds = reg.credentials!;
const dockerDir = path.join(work, 'docker');
await mkdir(dockerDir);
const dockerConfig = path.join(dockerDir, 'config.json');
const auth = Buffer.from(`${creds.username}:${creds.password}`).toString('base64');
await writeFile(dockerConfig, JSON.stringify({ auths: { [proxy.host]: { auth }, [reg.host]: { auth } } }));
const cliEnv = { ...process.env, DOCKER_CONFIG: dockerDir };

function cli(args: string[]): Promise<CliResult> {
  return runCli(args, { env: cliEnv, bin: SOCI_TS_BIN });
}

const image = await buildImage(testCacheDir(), MOUNT_IMAGE_SPEC);
const pushed = await pushImage(image.layoutDir, image.tag, reg, 'remote/img');
await pushImage(image.layoutDir, image.tag, reg, 'remote/noindex');
const imageRef = `${proxy.host}/remote/img:${image.tag}`;
const created = await cli(['create', imageRef, '--push', '--json', '--root', path.join(work, 'create-root'), '--hosts-dir', '']);
if (created.code !== 0) throw new Error(`soci-ts create --push failed: ${created.stderr}`);
const createdIndex = (JSON.parse(created.stdout) as { indexes: Array<{ index: string; layers: Array<{ digest: string; ztoc?: string }> }> }).indexes[0]!;
const bigN = createdIndex.layers.findIndex((l) => l.ztoc !== undefined);
const big = image.layers[bigN]!;
const ztocDigest = createdIndex.layers[bigN]!.ztoc!;
const ztoc: LayerIndex = readZtoc((await registryRequest(reg, `/v2/remote/img/blobs/${ztocDigest}`)).body);
const imageSize = image.layers.reduce((n, l) => n + l.size, 0);

// Chain IDs as containerd computes them (identity.ChainIDs over the config's diff_ids).
const chain: string[] = [];
for (const [i, l] of image.layers.entries()) chain.push(i === 0 ? l.diffId : `sha256:${sha256(`${chain[i - 1]} ${l.diffId}`)}`);

function remoteLabels(i: number, repo = 'remote/img', manifest = pushed.manifestDigest): Record<string, string> {
  return unpackerLabels(image, chain, i, `${proxy.host}/${repo}:${image.tag}`, manifest);
}

/** Prepare with the remote labels, as containerd's unpacker: ALREADY_EXISTS or the mounts. */
const prepareRemote = (c: SnapshotsClient, i: number, labels = remoteLabels(i)): Promise<PrepareResult> => prepareOnChain(c, chain, i, labels);

async function grpcCode(p: Promise<unknown>): Promise<status | 'ok'> {
  try {
    await p;
    return 'ok';
  } catch (e) {
    return (e as ServiceError).code;
  }
}

/** Bytes the registry served (through the proxy) for blob `digest` since the last reset (all blobs without one). */
function served(digest?: string): number {
  let n = 0;
  const sizes = new Map<string, number>([...image.layers.map((l) => [l.digest, l.size] as [string, number])]);
  for (const rec of proxy.stats.log) {
    const m = /^\/v2\/[^?]+\/blobs\/(sha256:[0-9a-f]{64})/.exec(rec.url);
    if (rec.method !== 'GET' || m === null || (digest !== undefined && m[1] !== digest)) continue;
    const r = /^bytes=(\d+)-(\d+)$/.exec(rec.range ?? '');
    n += r !== null ? Number(r[2]) - Number(r[1]) + 1 : (sizes.get(m[1]!) ?? 0);
  }
  return n;
}

async function mountAt(m: ProtoMount[], target: string): Promise<void> {
  await mkdir(target, { recursive: true });
  if (m.length !== 1) throw new Error(`expected one mount, got ${JSON.stringify(m)}`);
  const x = m[0]!;
  if (x.type === 'bind') await run('mount', ['-o', x.options.join(','), x.source, target]);
  else await run('mount', ['-t', x.type, x.source, target, '-o', x.options.join(',')]);
}

function optionValue(m: ProtoMount, name: string): string | undefined {
  return m.options.find((o) => o.startsWith(`${name}=`))?.slice(name.length + 1);
}

function logLines(d: SnapshotterDaemon, msg: string | RegExp): Record<string, unknown>[] {
  return d.logLines().filter((l) => (typeof msg === 'string' ? l.msg === msg : msg.test(String(l.msg))));
}

async function waitForLog(d: SnapshotterDaemon, msg: string | RegExp, count = 1, ms = 60_000): Promise<Record<string, unknown>[]> {
  for (const end = Date.now() + ms; Date.now() < end; ) {
    const l = logLines(d, msg);
    if (l.length >= count) return l;
    await sleep(100);
  }
  return logLines(d, msg);
}

// ------------------------------------------------------------------ the oracle

const oracleBundle = path.join(work, 'oracle');
await run('umoci', ['unpack', '--image', `${image.layoutDir}:${image.tag}`, oracleBundle]);
const oracleRoot = path.join(oracleBundle, 'rootfs');
const USER_XATTRS = /^user\./;
const oracle = await snapshotTree(oracleRoot, { xattrFilter: USER_XATTRS });
const norm = (name: string): string => name.replace(/^\.\//, '').replace(/\/+$/, '') || '.';
const names = (await Promise.all(image.layers.map((l) => tarTv(l.path)))).map((l) => l.map((e) => norm(e.name)));

/**
 * Directories whose topmost layer has no entry of its own for them, when that layer is the lazy
 * one: a lazy layer shows a directory it only implies with the epoch as its time (as upstream
 * soci does), a flat unpack keeps the lower layer's time. Their mtimes are not compared.
 */
const lazyImplied = new Set<string>();
{
  const ancestors = (p: string): string[] => {
    const out = ['.'];
    const parts = p.split('/');
    for (let i = 1; i < parts.length; i++) out.push(parts.slice(0, i).join('/'));
    return out;
  };
  for (const [p, e] of oracle) {
    if (e.type !== 'dir') continue;
    for (let k = names.length - 1; k >= 0; k--) {
      if (names[k]!.includes(p)) break;
      if (names[k]!.some((n) => n !== p && ancestors(n).includes(p))) {
        if (k === bigN) lazyImplied.add(p);
        break;
      }
    }
  }
}

async function compareWithOracle(t: Test, dir: string, label: string): Promise<void> {
  const got = await snapshotTree(dir, { xattrFilter: USER_XATTRS });
  // The root of an active snapshot's overlay is its (new) upper dir, as with containerd's overlayfs.
  const fields = (p: string, e: TreeEntry): Record<string, unknown> => entryFields(e, !(e.type === 'dir' && (lazyImplied.has(p) || p === '.')));
  const diffs = diffTrees(got, oracle, fields);
  t.same(diffs.slice(0, 40), [], `${label}: all ${oracle.size} paths equal umoci unpack's (${diffs.length} differences; mtimes of the root and of ${lazyImplied.size} directories only implied by the lazy layer not compared)`);
  // Hardlinks: in the overlay a file's identity is (device, inode).
  const want = hardlinkGroups(oracle);
  t.ok(want.length > 0, `${label}: the oracle has hardlinks`);
  t.same(hardlinkGroups(got), want, `${label}: the same hardlink groups`);
}

/** Files of the big layer, visible as they are in the merged image, each within one span, in distinct middle spans. */
const lazyFiles = (() => {
  const bySpan = new Map<number, { name: string; size: number; span: number }>();
  for (const f of ztoc.ztoc.files) {
    if (f.type !== 'reg' || f.uncompressedSize < 4096 || f.uncompressedSize > 65536) continue;
    const s = ztoc.spanFor(f.uncompressedOffset);
    if (s === 0 || s + 2 >= ztoc.spans.length || s !== ztoc.spanFor(f.uncompressedOffset + f.uncompressedSize - 1)) continue;
    if (oracle.get(norm(f.name))?.size !== f.uncompressedSize) continue;
    if (!bySpan.has(s)) bySpan.set(s, { name: norm(f.name), size: f.uncompressedSize, span: s });
  }
  // Every other span, so that a read's read-ahead never covers the next file's span.
  return [...bySpan.values()].sort((a, b) => a.span - b.span).filter((_, i) => i % 3 === 0);
})();
const spanBytes = (id: number): number => ztoc.spans[id]!.compressedEnd - ztoc.spans[id]!.compressedStart;

async function readChecked(t: Test, root: string, f: { name: string; span: number }, label: string): Promise<void> {
  const data = await readFile(path.join(root, f.name));
  t.equal(sha256(data), oracle.get(f.name)!.sha256, `${label}: ${f.name} (${data.length} bytes, span ${f.span}) reads right`);
}

// ------------------------------------------------------------------ the daemons

const root = path.join(work, 'root');
const address = path.join(work, 'run', 'soci-ts.sock');
const managerSocket = path.join(root, 'fuse-manager.sock');
const configFile = path.join(work, 'config.toml');
await writeFile(configFile, `hosts_dir = ""\ndocker_config = ${JSON.stringify(dockerConfig)}\n\n[background_fetch]\nenabled = false\n`);

async function startDaemon(r = root, a = address, cfg = configFile): Promise<{ d: SnapshotterDaemon; c: SnapshotsClient }> {
  const d = await startSnapshotter({ root: r, address: a, args: ['--config', cfg], startTimeoutMs: 60_000 });
  daemons.push(d);
  const c = await SnapshotsClient.connect(a, { snapshotter: 'soci-ts' });
  return { d, c };
}

let s1: { d: SnapshotterDaemon; c: SnapshotsClient };
let lazyMountpoint = '';
let containerMounts: ProtoMount[] = [];
const rootfs = path.join(work, 'rootfs');

t.test('the fixture: one big layer indexed, four small ones without a zTOC', async (t) => {
  t.equal(createdIndex.layers.filter((l) => l.ztoc !== undefined).length, 1, 'one zTOC');
  t.equal(image.layers.length, 5);
  t.ok(lazyFiles.length >= 4, `files of the big layer in distinct spans to read (${lazyFiles.length})`);
  const anon = await httpRequest(`${reg.url}/v2/remote/img/manifests/${image.tag}`);
  t.equal(anon.status, 401, 'the registry refuses requests without a token');
});

t.test('Prepare of every layer with the remote labels: ALREADY_EXISTS, committed under the chain ID', async (t) => {
  s1 = await startDaemon();
  const { d, c } = s1;
  // fuse_manager_at_start (default true): the manager is up before the first pull needs it.
  t.equal((await waitForLog(d, 'FUSE manager: started')).length, 1, 'the FUSE manager is started with the snapshotter, before any Prepare');
  t.equal((await managerList(managerSocket)).length, 0, 'serving nothing yet');
  proxy.resetStats();
  for (let i = 0; i < image.layers.length; i++) {
    const r = await prepareRemote(c, i);
    t.ok(r.exists, `layer ${i} (${i === bigN ? 'indexed' : 'no zTOC'}): ALREADY_EXISTS`);
    if (r.exists) t.match(r.details, /^target snapshot "sha256:[0-9a-f]{64}": already exists$/, 'with the target in the message');
  }
  const infos = (await c.list()).infos;
  t.same(infos.map((i) => i.name).sort(), [...chain].sort(), 'exactly the chain IDs exist (no extract-* keys left)');
  for (let i = 0; i < image.layers.length; i++) {
    const info = await c.stat(chain[i]!);
    t.equal(info.kind, 'COMMITTED', `${i}: committed`);
    t.equal(info.parent, i === 0 ? '' : chain[i - 1], `${i}: parent is the previous chain ID`);
    const want = remoteLabels(i);
    for (const [k, v] of Object.entries(want)) t.equal(info.labels[k], v, `${i}: label ${k}`);
    if (i === bigN) {
      t.equal(info.labels[LABEL_REMOTE], 'remote snapshot', 'the lazy layer: containerd.io/snapshot/remote');
      t.equal(info.labels['containerd.io/snapshot/remote/has.soci.index.digest'], 'true');
    } else t.equal(info.labels[LABEL_REMOTE], undefined, `${i}: unpacked locally, not a remote snapshot`);
  }
  t.equal(logLines(d, 'layer mounted lazily: committed as a remote snapshot').length, 1, 'one layer mounted lazily (log)');
  const local = logLines(d, 'layer unpacked by the snapshotter: committed');
  t.equal(local.length, 4, 'four unpacked by the daemon (log)');
  t.ok(local.every((l) => /has no zTOC for the layer/.test(String(l.reason)) && typeof l.key === 'string' && typeof l.layer === 'string'), 'each with its reason, key and layer');

  const h = await managerHello(managerSocket);
  const list = await managerList(managerSocket);
  t.equal(list.length, 1, 'the FUSE manager serves one layer');
  t.equal(list[0]?.layerDigest, big.digest, 'the big layer');
  lazyMountpoint = list[0]!.mountpoint;
  t.match(lazyMountpoint, new RegExp(`^${root}/snapshots/\\d+/fs$`), "at the snapshot's fs dir");
  const fuse = await mountsUnder(root);
  t.same(fuse.map((m) => [m.mountpoint, m.fstype]), [[lazyMountpoint, 'fuse.soci-ts']], 'mountinfo: one FUSE mount, there');
  const g = await groupOf(h.pid);
  const gd = await groupOf(d.pid);
  t.not(g.session, gd.session, 'the FUSE manager runs in its own session');
  t.not(g.pgrp, gd.pgrp, 'and its own process group');
  t.equal(served(big.digest), 0, 'no byte of the big layer fetched yet (only its zTOC)');
  const db = new Database(path.join(root, 'metadata.db'), { readonly: true });
  try {
    const modes = db.prepare('SELECT layer_digest, mode FROM layer_modes ORDER BY layer_digest').all() as Array<{ layer_digest: string; mode: string }>;
    t.same(new Map(modes.map((m) => [m.layer_digest, m.mode])), new Map(image.layers.map((l, i) => [l.digest, i === bigN ? 'lazy' : 'local'])), 'metadata: layer modes');
  } finally {
    db.close();
  }
});

t.test('an active snapshot on top: overlay over the fs dirs, mounted for real; reads fetch only their spans', async (t) => {
  const { c } = s1;
  containerMounts = await c.prepare('container-1', chain.at(-1)!);
  const m = containerMounts[0]!;
  t.equal(m.type, 'overlay');
  const lowers = optionValue(m, 'lowerdir')!.split(':');
  t.equal(lowers.length, image.layers.length, 'one lowerdir per layer');
  t.equal(lowers[image.layers.length - 1 - bigN], lazyMountpoint, 'the lazy layer is its FUSE mountpoint');
  t.ok(optionValue(m, 'upperdir') !== undefined && optionValue(m, 'workdir') !== undefined, 'upperdir and workdir');
  await mountAt(containerMounts, rootfs);
  proxy.resetStats();
  for (const f of lazyFiles.slice(0, 3)) await readChecked(t, rootfs, f, 'lazy');
  const bigServed = served(big.digest);
  const need = lazyFiles.slice(0, 3).reduce((n, f) => n + spanBytes(f.span), 0);
  const max = lazyFiles.slice(0, 3).reduce((n, f) => n + spanBytes(f.span) + spanBytes(f.span + 1), 0);
  t.ok(bigServed >= need && bigServed <= max, `the registry served the files' spans, at most one read-ahead each (${need} <= ${bigServed} <= ${max})`);
  t.ok(served() < imageSize / 4, `well below the image size (${served()} of ${imageSize} bytes)`);
  t.comment(`figure: reading 3 files (${lazyFiles.slice(0, 3).reduce((n, f) => n + f.size, 0)} bytes) fetched ${bigServed} bytes of the ${big.size}-byte lazy layer; image ${imageSize} bytes`);
});

let holder: ChildProcess;
t.test('kill -9 of the snapshotter while a reader holds the rootfs: files not fetched yet still read', async (t) => {
  holder = spawn('sleep', ['600'], { cwd: rootfs, stdio: 'ignore' });
  holders.push(holder);
  const before = await managerHello(managerSocket);
  const fuseBefore = await mountsUnder(root);
  s1.c.close();
  s1.d.kill('SIGKILL');
  t.ok((await s1.d.waitExit(10_000))?.signal === 'SIGKILL', 'the snapshotter is dead');
  t.ok(await alive(before.pid), 'the FUSE manager lives on');
  proxy.resetStats();
  await readChecked(t, rootfs, lazyFiles[3]!, 'after the kill');
  t.ok(served(big.digest) >= spanBytes(lazyFiles[3]!.span), 'fetched from the registry now (it was not local), with the credentials the manager found itself');
  t.same(await mountsUnder(root), fuseBefore, 'the same FUSE mount (same mount id)');
});

let s2: { d: SnapshotterDaemon; c: SnapshotsClient };
t.test('restart: the snapshotter reattaches to the running FUSE manager, no remount', async (t) => {
  const before = await managerHello(managerSocket);
  const fuseBefore = await mountsUnder(root);
  const listBefore = await managerList(managerSocket);
  s2 = await startDaemon();
  const rec = await waitForLog(s2.d, 'FUSE manager reconciled');
  t.equal(rec.length, 1, 'reconciled once at start');
  t.match(rec[0], { kept: 1, remounted: 0, removed: 0, failed: 0 }, 'kept the one mount, remounted nothing');
  t.equal(logLines(s2.d, 'FUSE manager: attached to the running one').length, 1, 'attached (log)');
  t.equal((await managerHello(managerSocket)).instance, before.instance, 'the same FUSE manager');
  t.same(await mountsUnder(root), fuseBefore, 'the same FUSE mount (mount id)');
  // Spans may become local meanwhile (the read-ahead of the last read may land after listBefore): the mount itself is compared.
  const mountOnly = (l: Array<Record<string, unknown>>): unknown[] => l.map(({ localSpans: _l, complete: _c, ...rest }) => rest);
  t.same(mountOnly(await managerList(managerSocket)), mountOnly(listBefore), 'the same mount in the FUSE manager (mounted at the same time)');
  t.same(await s2.c.mounts('container-1'), containerMounts, 'Mounts answers as before');
  t.equal((await s2.c.stat(chain[bigN]!)).labels[LABEL_REMOTE], 'remote snapshot', 'Stat works');
  await readChecked(t, rootfs, lazyFiles[0]!, 'after the restart');
});

const rootfs2 = path.join(work, 'rootfs2');
t.test('kill -9 of the FUSE manager: the next snapshotter start mounts the lazy snapshot again and names the lost active one', async (t) => {
  const old = await managerHello(managerSocket);
  const oldList = await managerList(managerSocket);
  s2.c.close();
  s2.d.kill('SIGKILL');
  await s2.d.waitExit(10_000);
  process.kill(old.pid, 'SIGKILL');
  t.ok(await waitDead(old.pid), 'the FUSE manager is dead');
  const err = await readFile(path.join(rootfs, lazyFiles[5]?.name ?? lazyFiles[4]!.name)).then(
    () => undefined,
    (e: NodeJS.ErrnoException) => e.code,
  );
  t.ok(err === 'ENOTCONN' || err === 'ECONNABORTED' || err === 'EIO', `the running container's lazy files are gone with it (${String(err)})`);
  const s3 = await startDaemon();
  s2 = s3;
  const rec = await waitForLog(s3.d, 'FUSE manager reconciled');
  t.match(rec[0], { kept: 0, remounted: 1, failed: 0 }, 'remounted the committed lazy snapshot');
  const lost = logLines(s3.d, /^active snapshot lost its lazily mounted layers/);
  t.same(
    lost.map((l) => [l.key, l.layers]),
    [['container-1', [big.digest]]],
    'the log names the active snapshot that lost its mounts, and the layer',
  );
  t.equal(lost[0]?.level, 'warn');
  const now = await managerHello(managerSocket);
  t.not(now.pid, old.pid, 'a new FUSE manager');
  const fuse = await mountsUnder(root);
  t.equal(fuse.length, 1, 'one FUSE mount again');
  t.equal(fuse[0]?.mountpoint, lazyMountpoint, 'at the same place');
  const list = await managerList(managerSocket);
  t.equal(list.length, 1);
  t.ok(list[0]!.mountedAt > oldList[0]!.mountedAt, `a new mount (mounted ${list[0]!.mountedAt}, the old one ${oldList[0]!.mountedAt})`);
  // A new container reads; what was read before comes from the disk cache, not the registry.
  const m2 = await s3.c.prepare('container-2', chain.at(-1)!);
  await mountAt(m2, rootfs2);
  proxy.resetStats();
  await readChecked(t, rootfs2, lazyFiles[0]!, 'new container');
  t.equal(served(big.digest), 0, 'a span fetched before the crash is served from the disk cache');
  await readChecked(t, rootfs2, lazyFiles[4]!, 'new container, a span not fetched before');
  t.ok(served(big.digest) > 0, 'that one came from the registry');
});

t.test("the whole rootfs of a new container equals umoci unpack's", async (t) => {
  await compareWithOracle(t, rootfs2, 'lazy (mounted again by a new FUSE manager) + locally unpacked layers');
});

t.test('kill -9 of the FUSE manager while the snapshotter runs: it starts a new one and remounts at once', async (t) => {
  const d = s2.d;
  const old = await managerHello(managerSocket);
  const before = logLines(d, 'FUSE manager reconciled').length;
  process.kill(old.pid, 'SIGKILL');
  t.ok(await waitDead(old.pid), 'killed');
  const rec = await waitForLog(d, 'FUSE manager reconciled', before + 1);
  t.equal(rec.length, before + 1, 'reconciled again without a request');
  t.match(rec.at(-1), { remounted: 1, failed: 0 });
  t.ok(logLines(d, /^lost the connection to the FUSE manager/).length >= 1, 'the lost connection is logged');
  const lostNow = logLines(d, /^active snapshot lost its lazily mounted layers/).map((l) => l.key);
  t.same([...new Set(lostNow)].sort(), ['container-1', 'container-2'], 'both active snapshots reported');
  t.not((await managerHello(managerSocket)).pid, old.pid, 'a new FUSE manager');
  const m3 = await s2.c.prepare('container-3', chain.at(-1)!);
  const rootfs3 = path.join(work, 'rootfs3');
  await mountAt(m3, rootfs3);
  await readChecked(t, rootfs3, lazyFiles[1]!, 'container on the remounted layer');
  await run('umount', [rootfs3]);
  await s2.c.remove('container-3');
});

t.test('Remove of the lazy snapshot: unmounted, spans released from the disk cache, zTOC dropped', async (t) => {
  const { c } = s2;
  holder.kill('SIGKILL');
  for (const dir of [rootfs2, rootfs]) await run('umount', [dir]).catch(() => run('umount', ['-l', dir]));
  await c.remove('container-2');
  await c.remove('container-1');
  const spanFiles = async (): Promise<Set<string>> => {
    const out = new Set<string>();
    const dir = path.join(root, 'cache', 'spans');
    for (const sub of await readdir(dir).catch(() => [] as string[])) {
      const st = await lstat(path.join(dir, sub));
      if (st.isDirectory()) for (const f of await readdir(path.join(dir, sub))) out.add(`sha256:${f}`);
    }
    return out;
  };
  const digests = ztoc.ztoc.compressionInfo.spanDigests;
  const before = await spanFiles();
  t.ok(digests.some((d) => before.has(d)), `spans of the layer are in the disk cache (${digests.filter((d) => before.has(d)).length} of ${digests.length})`);
  const ztocBlob = path.join(root, 'content', 'blobs', 'sha256', ztocDigest.slice('sha256:'.length));
  await t.resolves(access(ztocBlob), 'the zTOC is in the store');
  for (let i = chain.length - 1; i > bigN; i--) await c.remove(chain[i]!);
  const helloBefore = await FuseManagerClient.connect(managerSocket).then(async (mc) => {
    try {
      return await mc.hello();
    } finally {
      mc.close();
    }
  });
  t.ok((helloBefore.memoryCacheBytes ?? 0) > 0, `inflated spans of the read files are in the manager's memory (${helloBefore.memoryCacheBytes} bytes)`);
  t.equal(await grpcCode(c.remove(chain[bigN]!)), 'ok', 'Remove of the lazy snapshot');
  t.same(await mountsUnder(root), [], 'no FUSE mount left');
  t.same(await managerList(managerSocket), [], 'the FUSE manager serves nothing');
  const helloAfter = await FuseManagerClient.connect(managerSocket).then(async (mc) => {
    try {
      return await mc.hello();
    } finally {
      mc.close();
    }
  });
  t.equal(helloAfter.memoryCacheBytes, 0, "the layer's inflated spans left the memory cache with its last mount");
  const after = await spanFiles();
  t.same(digests.filter((d) => after.has(d)), [], "none of the layer's spans is left in the disk cache");
  await t.rejects(access(ztocBlob), 'the zTOC is gone from the store');
  await t.rejects(access(lazyMountpoint), 'the snapshot directory is gone');
  for (let i = bigN - 1; i >= 0; i--) await c.remove(chain[i]!);
  t.same((await c.list()).infos, [], 'no snapshot left');
});

// ------------------------------------------------------------------ fallbacks and bad input

const root4 = path.join(work, 'root4');
const address4 = path.join(work, 'run', 'soci-ts-4.sock');
const socket4 = path.join(root4, 'fuse-manager.sock');
let s4: { d: SnapshotterDaemon; c: SnapshotsClient };

// This one starts its FUSE manager on demand.
const configOnDemand = path.join(work, 'config-on-demand.toml');
await writeFile(configOnDemand, `hosts_dir = ""\ndocker_config = ${JSON.stringify(dockerConfig)}\n\n[snapshotter]\nfuse_manager_at_start = false\n\n[background_fetch]\nenabled = false\n`);

t.test('an image without an index: the normal overlay path, the reason logged and recorded', async (t) => {
  s4 = await startDaemon(root4, address4, configOnDemand);
  const { d, c } = s4;
  const r0 = await prepareRemote(c, 0, remoteLabels(0, 'remote/noindex'));
  t.notOk(r0.exists, 'not ALREADY_EXISTS');
  if (r0.exists) return;
  t.same(r0.mounts.map((m) => [m.type, m.options]), [['bind', ['rw', 'rbind']]], 'a plain bind mount of the empty snapshot (no parent), for containerd to apply the tar into');
  const why = logLines(d, /^layer not served remotely/);
  t.equal(why.length, 1, 'one fallback logged');
  t.match(why[0], { level: 'info', key: r0.key, layer: image.layers[0]!.digest }, 'at info, with the snapshot key and layer digest');
  t.match(String(why[0]?.reason), /^no SOCI index for the image \(.*referrers.*\)$/, `the reason says where discovery looked: ${String(why[0]?.reason)}`);
  // As containerd does after applying: commit; then the next layer gets overlay mounts.
  await c.commit(chain[0]!, r0.key);
  const r1 = await prepareRemote(c, 1, remoteLabels(1, 'remote/noindex'));
  t.notOk(r1.exists);
  if (!r1.exists) {
    t.equal(r1.mounts[0]?.type, 'overlay', 'the next layer: plain overlay');
    t.equal(optionValue(r1.mounts[0]!, 'lowerdir'), path.join(root4, 'snapshots', (await snapshotId(root4, chain[0]!))!, 'fs'));
    await c.remove(r1.key);
  }
  await t.rejects(access(socket4), 'with fuse_manager_at_start = false, no FUSE manager was started for an image without an index');
  const db = new Database(path.join(root4, 'metadata.db'), { readonly: true });
  try {
    const row = db.prepare('SELECT mode, reason, snapshot_key FROM layer_modes WHERE layer_digest = ?').get(image.layers[1]!.digest) as { mode: string; reason: string; snapshot_key: string } | undefined;
    t.match(row, { mode: 'fallback', reason: /^no SOCI index/, snapshot_key: r1.exists ? '' : r1.key }, 'the reason is kept in the metadata');
  } finally {
    db.close();
  }
});

async function snapshotId(r: string, key: string): Promise<string | undefined> {
  const db = new Database(path.join(r, 'metadata.db'), { readonly: true });
  try {
    return (db.prepare('SELECT id FROM snapshots WHERE key = ?').get(key) as { id: number } | undefined)?.id.toString();
  } finally {
    db.close();
  }
}

t.test('bad input: a manifest not in the registry, a zTOC that does not verify → fallback with the reason, nothing half-written, nothing mounted', async (t) => {
  const { d, c } = s4;
  const missing = `sha256:${sha256('no such manifest')}`;
  const labels = { ...remoteLabels(1), [LABEL_MANIFEST]: missing };
  const r = await prepareRemote(c, 1, labels);
  t.notOk(r.exists, 'manifest not in the registry: the normal path');
  if (!r.exists) {
    t.equal(r.mounts[0]?.type, 'overlay');
    const why = logLines(d, /^layer not served remotely/).at(-1);
    t.match(why, { level: 'warn', key: r.key }, 'logged at warn with the key');
    t.match(String(why?.reason), new RegExp(`cannot fetch image manifest ${missing}.*`), String(why?.reason));
    t.equal(await grpcCode(c.stat(chain[1]!)), status.NOT_FOUND, 'nothing committed under the target');
    t.equal((await c.stat(r.key)).kind, 'ACTIVE', 'the active snapshot is there for containerd to apply');
    await c.remove(r.key);
  }

  // The index of remote/img, but its zTOC blob corrupted on the way: the digest check fails.
  proxy.setOptions({ rate: 1, faults: ['flip'], match: (method, p) => method === 'GET' && p === `/v2/remote/img/blobs/${ztocDigest}` });
  try {
    const r2 = await prepareRemote(c, 1, remoteLabels(1));
    t.notOk(r2.exists, 'zTOC that does not verify: the normal path');
    if (!r2.exists) {
      t.equal(r2.mounts[0]?.type, 'overlay');
      const why = logLines(d, /^layer not served remotely/).at(-1);
      t.match(why, { level: 'warn', key: r2.key, layer: big.digest });
      t.match(String(why?.reason), new RegExp(`zTOC is unusable: .*${ztocDigest}`), String(why?.reason));
      t.match(String(why?.reason), /digest/i, 'the reason is the digest check');
      t.equal(await grpcCode(c.stat(chain[1]!)), status.NOT_FOUND, 'nothing committed under the target');
      await c.remove(r2.key);
    }
  } finally {
    proxy.setOptions({ rate: 0, faults: ['stall'], match: undefined });
  }
  t.same(await managerList(socket4), [], 'the FUSE manager holds no mount');
  t.same(await mountsUnder(root4), [], 'nothing mounted under the root');
  await t.rejects(access(path.join(root4, 'content', 'blobs', 'sha256', ztocDigest.slice(7))), 'the bad zTOC was not kept in the store');
  t.same(
    (await c.list()).infos.map((i) => i.name),
    [chain[0]],
    'only the committed bottom layer remains',
  );
});

t.test('startup sweep: a mount the FUSE manager holds that no snapshot owns is unmounted, its directory removed', async (t) => {
  const stray = path.join(root4, 'snapshots', '999999', 'fs');
  const mc = await FuseManagerClient.connect(socket4);
  try {
    await mc.call('mount', {
      mountpoint: stray,
      imageRef: `${proxy.host}/remote/img:${image.tag}`,
      layer: { mediaType: big.mediaType, digest: big.digest, size: big.size },
      ztoc: { mediaType: 'application/octet-stream', digest: ztocDigest, size: (await registryRequest(reg, `/v2/remote/img/blobs/${ztocDigest}`)).body.length },
      tag: 'stray',
    });
  } finally {
    mc.close();
  }
  t.same((await mountsUnder(root4)).map((m) => m.mountpoint), [stray], 'a stray lazy mount (as a crash between mount and commit leaves)');
  await s4.d.stop();
  s4.c.close();
  s4 = await startDaemon(root4, address4);
  const rec = await waitForLog(s4.d, 'FUSE manager reconciled');
  t.match(rec[0], { removed: 1, kept: 0 }, 'reconcile unmounted it');
  t.equal(logLines(s4.d, /^unmounting a lazy layer no snapshot owns/).length, 1, 'and said so');
  t.same(await mountsUnder(root4), [], 'nothing mounted');
  await t.rejects(access(path.dirname(stray)), 'the startup sweep removed its directory');
  t.same(await managerList(socket4), [], 'the FUSE manager holds nothing');
});

t.test('the FUSE manager protocol: typed errors across the wire', async (t) => {
  const c = await FuseManagerClient.connect(socket4);
  const refused = async (p: Promise<unknown>, kind: string, re: RegExp, what: string): Promise<void> => {
    try {
      await p;
      t.fail(`${what}: expected a ${kind} error`);
    } catch (e) {
      const err = e as FuseManagerError;
      t.ok(err instanceof FuseManagerError, `${what}: a FuseManagerError`);
      t.equal(err.kind, kind, `${what}: kind ${kind}`);
      t.match(err.message, re, `${what}: ${err.message}`);
    }
  };
  const layer = { mediaType: big.mediaType, digest: big.digest, size: big.size };
  const z = { mediaType: 'application/octet-stream', digest: ztocDigest, size: 1 };
  try {
    await refused(c.call('nope' as 'hello', {}), 'invalid', /unknown method "nope"/, 'unknown method');
    await refused(c.call('status', { mountpoint: path.join(root4, 'nothing') }), 'not-found', /nothing is mounted here/, 'status of nothing');
    await refused(c.call('mount', { mountpoint: 'relative/dir', imageRef, layer, ztoc: z }), 'invalid', /absolute path/, 'relative mountpoint');
    await refused(c.call('mount', { mountpoint: path.join(work, 'm1'), imageRef, layer: { ...layer, digest: 'sha256:xyz' }, ztoc: z }), 'invalid', /layer\.digest must be a sha256 digest/, 'bad digest');
    const missing = { ...z, digest: `sha256:${sha256('no such ztoc')}` };
    await refused(c.call('mount', { mountpoint: path.join(work, 'm2'), imageRef, layer, ztoc: missing }), 'bad-ztoc', new RegExp(`zTOC ${missing.digest}.*cannot fetch it`), 'zTOC not in the registry');
    // The fuse-manager command records into its own prom-client registry: the call answers its exposition.
    const exposition = (await c.call('metrics', {})).text;
    t.match(exposition, /# TYPE soci_fs_operation_duration_milliseconds histogram/, 'metrics: the manager answers Prometheus text with upstream names');
    t.match(exposition, /process="fuse-manager"/, "metrics: the manager's series are labelled process=fuse-manager");
    t.same(await c.call('unmount', { mountpoint: path.join(work, 'm3') }), { unmounted: false, released: 0 }, 'unmount of nothing: nothing done');
    t.same(await mountsUnder(work + '/m1', work + '/m2'), [], 'nothing mounted by the refused requests');
  } finally {
    c.close();
  }
  // A line that is not JSON: an error line without an id, and the connection is closed.
  const answer = await new Promise<string>((resolve, reject) => {
    const s = netConnect(socket4);
    let got = '';
    s.on('data', (b: Buffer) => (got += b.toString()));
    s.on('close', () => resolve(got));
    s.on('error', reject);
    s.write('this is not json\n');
  });
  const msg = JSON.parse(answer.trim()) as { id: unknown; error: { kind: string; message: string } };
  t.equal(msg.id, null, 'no id');
  t.equal(msg.error.kind, 'invalid');
  t.match(msg.error.message, /not a JSON object/);
});

const root5 = path.join(work, 'root5');
const address5 = path.join(work, 'run', 'soci-ts-5.sock');
const socket5 = path.join(root5, 'fuse-manager.sock');
t.test('background fetch in the FUSE manager: every span of the lazy layer becomes local; SIGTERM unmounts', async (t) => {
  const cfg = path.join(work, 'config5.toml');
  await writeFile(cfg, `hosts_dir = ""\ndocker_config = ${JSON.stringify(dockerConfig)}\n[background_fetch]\nenabled = true\nstart_delay = 0\nrate = "512MiB"\n`);
  const { d, c } = await startDaemon(root5, address5, cfg);
  for (const i of [0, 1]) t.ok((await prepareRemote(c, i)).exists, `layer ${i}: ALREADY_EXISTS`);
  const [m] = await managerList(socket5);
  t.ok(m !== undefined, 'the big layer is mounted');
  const mc = await FuseManagerClient.connect(socket5);
  let st;
  try {
    for (const end = Date.now() + 120_000; Date.now() < end; ) {
      st = await mc.call('status', { mountpoint: m!.mountpoint });
      if (st.complete) break;
      await sleep(200);
    }
  } finally {
    mc.close();
  }
  t.ok(st?.complete, 'the layer becomes complete without any read');
  t.equal(st?.spansLocal, ztoc.spans.length, `all ${ztoc.spans.length} spans local`);
  t.equal(st?.reads, 0, 'no reads were made');
  t.ok((st?.background?.spansFetched ?? 0) > 0, `the background fetcher fetched them (${st?.background?.spansFetched})`);
  const files = new Set<string>();
  const dir = path.join(root5, 'cache', 'spans');
  for (const sub of await readdir(dir)) for (const f of await readdir(path.join(dir, sub)).catch(() => [] as string[])) files.add(`sha256:${f}`);
  t.same(ztoc.ztoc.compressionInfo.spanDigests.filter((x) => !files.has(x)), [], 'every span digest is a file of the disk cache');
  const log = await readFile(path.join(root5, 'fuse-manager.log'), 'utf8');
  t.match(log, /"msg":"layer is complete"/, "the FUSE manager's log says so");
  await d.stop();
  c.close();
  const h = await managerHello(socket5);
  process.kill(h.pid, 'SIGTERM');
  t.ok(await waitDead(h.pid, 30_000), 'SIGTERM: the FUSE manager exits');
  t.same(await mountsUnder(root5), [], 'and leaves nothing mounted');
  await t.rejects(access(socket5), 'its socket is removed');

  // The spans stay on disk; a layer removed while no manager served it is released by its zTOC.
  const zsize = (await registryRequest(reg, `/v2/remote/img/blobs/${ztocDigest}`)).body.length;
  const mgr = await FuseManager.start({
    root: root5,
    socket: path.join(root5, 'fm2.sock'),
    client: new RegistryClient({ hostsDir: '', credentials: { configPath: dockerConfig } }),
    store: new ArtifactStore({ root: root5 }),
    logger: nullLogger,
    background: { enabled: false },
  });
  try {
    const mc2 = await FuseManagerClient.connect(path.join(root5, 'fm2.sock'));
    try {
      const z = { mediaType: 'application/octet-stream', digest: ztocDigest, size: zsize };
      const r = await mc2.call('release', { ztoc: z });
      t.equal(r.released, new Set(ztoc.ztoc.compressionInfo.spanDigests).size, 'release by zTOC deletes every span file of the layer');
      const left = new Set<string>();
      for (const sub of await readdir(dir)) for (const f of await readdir(path.join(dir, sub)).catch(() => [] as string[])) left.add(`sha256:${f}`);
      t.same(ztoc.ztoc.compressionInfo.spanDigests.filter((x) => left.has(x)), [], 'none left in the disk cache');
      t.same(await mc2.call('release', { ztoc: z }), { released: 0 }, 'a second release finds nothing');
    } finally {
      mc2.close();
    }
  } finally {
    await mgr.stop();
  }
});

t.test('metrics sink: the FUSE manager reports FUSE operations, fetched bytes, cache lookups and mount latency; its metrics call renders the sink', async (t) => {
  const root6 = path.join(work, 'root6');
  const socket6 = path.join(root6, 'fm.sock');
  const seen = { ops: new Map<string, number>(), fetched: 0, fetches: 0, memory: 0, disk: 0, mounts: [] as Array<[string, number]>, other: [] as string[] };
  const sink: MetricsSink = {
    fuseOp: (op, layer, _ms, ok) => {
      if (layer === big.digest && ok) seen.ops.set(op, (seen.ops.get(op) ?? 0) + 1);
    },
    mountLatency: (layer, ms) => seen.mounts.push([layer, ms]),
    fetched: (layer, bytes, spans) => {
      if (layer !== big.digest) return;
      seen.fetched += bytes;
      seen.fetches += spans;
    },
    cache: (kind) => {
      if (kind === 'memory') seen.memory++;
      else if (kind === 'disk') seen.disk++;
    },
    fetchError: (layer, kind) => seen.other.push(`fetchError ${layer} ${kind}`),
    backgroundProgress: () => undefined,
    layerComplete: () => undefined,
    layerMode: () => undefined,
    render: () => `soci_fs_test_fetched_bytes ${seen.fetched}\n`,
  };
  const client = new RegistryClient({ hostsDir: '', credentials: { configPath: dockerConfig } });
  const mgr = await FuseManager.start({ root: root6, socket: socket6, client, store: new ArtifactStore({ root: root6 }), logger: nullLogger, background: { enabled: false }, metrics: sink });
  try {
    const mc = await FuseManagerClient.connect(socket6);
    try {
      const mp = path.join(root6, 'layer');
      const zsize = (await registryRequest(reg, `/v2/remote/img/blobs/${ztocDigest}`)).body.length;
      const m = await mc.call('mount', { mountpoint: mp, imageRef, layer: { mediaType: big.mediaType, digest: big.digest, size: big.size }, ztoc: { mediaType: 'application/octet-stream', digest: ztocDigest, size: zsize } });
      t.equal(m.spans, ztoc.spans.length, 'mounted');
      t.same(seen.mounts.map(([l]) => l), [big.digest], 'mount latency reported once, for the layer');
      proxy.resetStats();
      const f = lazyFiles[2]!;
      const data = await readFile(path.join(mp, f.name));
      t.equal(sha256(data), oracle.get(f.name)!.sha256, `${f.name} reads right from the layer mount`);
      t.equal(seen.fetched, served(big.digest), `fetched bytes reported = bytes the registry served (${seen.fetched})`);
      t.ok(seen.fetches >= 1, 'span fetches counted');
      // getattr and lookups are answered in the libfuse workers (the native path, not timed);
      // the cold read and the open reach JavaScript and are reported.
      t.ok((seen.ops.get('read') ?? 0) >= 1 && (seen.ops.get('open') ?? 0) >= 1, `FUSE operations reported (${[...seen.ops].map(([k, v]) => `${k}=${v}`).join(' ')})`);
      t.ok(seen.memory >= 1, `memory cache lookups reported (${seen.memory})`);
      t.same(seen.other, [], 'no fetch errors');
      t.same(await mc.call('metrics', {}), { text: `soci_fs_test_fetched_bytes ${seen.fetched}\n` }, "the metrics call answers the sink's text");
      const u = await mc.call('unmount', { mountpoint: mp, release: true });
      t.ok(u.unmounted && u.released <= seen.fetches, `unmounted, its spans released (${u.released})`);
      t.same(await mountsUnder(root6), [], 'nothing left mounted');
    } finally {
      mc.close();
    }
  } finally {
    await mgr.stop();
  }
});

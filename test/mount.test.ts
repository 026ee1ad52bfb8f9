/**
 * `soci-ts mount` and `umount` end to end, as root with FUSE and overlayfs, against a real
 * registry: an image with every kind of entry (MOUNT_IMAGE_SPEC: hardlinks, symlinks, long
 * names, user.* xattrs, devices, a fifo, whiteouts of lower files, opaque directories, one big
 * layer of real files) is pushed with skopeo and indexed with `soci-ts create --push`; then
 * `bin/soci-ts mount` (a child process, background mode) mounts it through a counting proxy.
 *
 * The oracle is `umoci unpack` of the same image (a flat rootfs) and GNU tar's listing of each
 * layer. Every path is compared: type, mode, uid, gid, size, mtime, symlink target, rdev,
 * user.* xattrs, sha256 of regular files, nlink, and hardlink identity (same device and inode
 * in the mount where the oracle has one inode). Times at millisecond precision: fuse-native
 * hands the kernel milliseconds. Two things overlayfs shows differently from a flat unpack by
 * design, and which are therefore not compared: a directory's nlink (overlayfs reports 1 for
 * merged directories), and the mtime of a directory that its topmost layer only implies when
 * that layer is mounted lazily (a layer lists only what changed; a lazy layer shows a parent it
 * does not list with the epoch as its time, as upstream soci does, while a flat unpack keeps the
 * lower layer's time). Unpacked layers take such a directory's metadata from the layers below
 * (containerd's WithParents), so there it is compared.
 */
import t, { type Test } from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { lstat, mkdir, mkdtemp, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { startRegistry, registryRequest, httpRequest } from './helpers/registry.js';
import { startFaultProxy } from './helpers/fault-proxy.js';
import { buildImage, pushImage, MOUNT_IMAGE_SPEC } from './helpers/images.js';
import { run, testCacheDir } from './helpers/layers.js';
import { tarTv } from './helpers/oracles.js';
import { diffTrees, entryFields, hardlinkGroups, snapshotTree, type TreeEntry } from './helpers/tree.js';
import { readZtoc } from '../ztoc/index.js';
import { RegistryClient } from '../fetcher/index.js';
import { unpackLayer } from '../fs/index.js';
import { ArtifactStore } from '../daemon/store.js';
import type { MountState } from '../daemon/mount.js';
import { runCli, type CliResult } from './helpers/cli.js';
import { mountStallingFile } from './helpers/stall-fs.js';


const work = await mkdtemp(path.join(tmpdir(), 'soci-ts-mount-'));
// No docker config of the machine's may leak in.
const env = { ...process.env, DOCKER_CONFIG: path.join(work, 'docker') };

function cli(args: string[], opts: { uid?: number } = {}): Promise<CliResult> {
  return runCli(args, { env, ...(opts.uid === undefined ? {} : { wrapper: ['setpriv', `--reuid=${opts.uid}`, `--regid=${opts.uid}`, '--clear-groups'] }) });
}

interface MountInfo {
  mountpoint: string;
  fstype: string;
}

async function mounts(): Promise<MountInfo[]> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  return text
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => {
      const f = l.split(' ');
      const sep = f.indexOf('-');
      return { mountpoint: f[4]!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))), fstype: f[sep + 1]! };
    });
}

/** Mounts at or below any of `paths`. */
async function mountsUnder(...paths: string[]): Promise<MountInfo[]> {
  return (await mounts()).filter((m) => paths.some((p) => m.mountpoint === p || m.mountpoint.startsWith(p + '/')));
}

/** Whether a process runs (a zombie, exited and waiting to be reaped, does not). */
async function alive(pid: number): Promise<boolean> {
  const st = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  return st !== '' && !/^\) [ZX] /.test(st.slice(st.lastIndexOf(')')));
}

async function waitDead(pid: number): Promise<boolean> {
  for (let i = 0; i < 200; i++) {
    if (!(await alive(pid))) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}

async function stateOf(root: string): Promise<MountState> {
  const ids = (await readdir(path.join(root, 'mounts'))).filter((n) => /^[0-9a-f]{16}$/.test(n));
  if (ids.length !== 1) throw new Error(`expected one mount state under ${root}, found ${ids.length}`);
  return JSON.parse(await readFile(path.join(root, 'mounts', ids[0]!, 'state.json'), 'utf8')) as MountState;
}

const reg = await startRegistry();
const proxy = await startFaultProxy({ upstream: reg.url, seed: 1, rate: 0, faults: ['stall'] });
t.teardown(async () => {
  // Whatever a failed test left mounted: detach it (deepest first), then the temp dir.
  for (const m of (await mountsUnder(work)).sort((a, b) => b.mountpoint.length - a.mountpoint.length)) await run('umount', ['-l', m.mountpoint]).catch(() => undefined);
  await proxy.close();
  await reg.stop();
  await rm(work, { recursive: true, force: true });
});

const image = await buildImage(testCacheDir(), MOUNT_IMAGE_SPEC);
const pushed = await pushImage(image.layoutDir, image.tag, reg, 'mount/img');
const common = (root: string): string[] => ['--root', root, '--hosts-dir', ''];

// Index it as a user would: v1 index pushed (found through the fallback tag on registry 2.8).
const created = await cli(['create', pushed.ref, '--push', '--json', ...common(path.join(work, 'create-root'))]);
if (created.code !== 0) throw new Error(`soci-ts create --push failed: ${created.stderr}`);
const createdLayers = (JSON.parse(created.stdout) as { indexes: Array<{ layers: Array<{ digest: string; ztoc?: string }> }> }).indexes[0]!.layers;
const big = createdLayers.filter((l) => l.ztoc !== undefined);

// Oracles: umoci's flat unpack, and GNU tar's listing of every layer.
const oracleBundle = path.join(work, 'oracle');
await run('umoci', ['unpack', '--image', `${image.layoutDir}:${image.tag}`, oracleBundle]);
const oracleRoot = path.join(oracleBundle, 'rootfs');
const USER_XATTRS = /^user\./;
const oracle = await snapshotTree(oracleRoot, { xattrFilter: USER_XATTRS });
const listings = await Promise.all(image.layers.map((l) => tarTv(l.path)));
const norm = (name: string): string => name.replace(/^\.\//, '').replace(/\/+$/, '') || '.';
const names = listings.map((l) => l.map((e) => norm(e.name)));

/** Directories whose topmost layer (the one overlayfs takes them from) has no entry of its own for them: path → that layer. */
const implicitDirs = new Map<string, number>();
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
      const explicit = names[k]!.includes(p);
      const implied = names[k]!.some((n) => n !== p && ancestors(n).includes(p));
      if (explicit) break;
      if (implied) {
        implicitDirs.set(p, k);
        break;
      }
    }
  }
}

/** Compares a mounted tree with the oracle (see the module comment for what is left out). */
async function compareWithOracle(t: Test, dir: string, label: string, lazy: ReadonlySet<number>): Promise<void> {
  const got = await snapshotTree(dir, { xattrFilter: USER_XATTRS });
  const skipMtime = new Set([...implicitDirs].filter(([, k]) => lazy.has(k)).map(([p]) => p));
  const fields = (p: string, e: TreeEntry): Record<string, unknown> => entryFields(e, !(e.type === 'dir' && skipMtime.has(p)));
  const diffs = diffTrees(got, oracle, fields);
  t.same(diffs.slice(0, 40), [], `${label}: all ${oracle.size} paths equal the oracle (${diffs.length} differences; mtimes of ${skipMtime.size} directories only implied by a lazy layer not compared)`);

  // Hardlinks: the oracle is one file system (inode numbers identify); overlayfs keeps each
  // layer's device apart, so identity in the mount is (device, inode).
  const want = hardlinkGroups(oracle);
  t.ok(want.length > 0, `${label}: the oracle has hardlinks (${want.map((g) => g.length).join(', ')} names)`);
  t.same(hardlinkGroups(got), want, `${label}: the same hardlink groups`);
}

/** Whiteouts and opaque markers of the layers, checked explicitly against the mount. */
async function checkWhiteouts(t: Test, dir: string): Promise<void> {
  let whiteouts = 0;
  let opaque = 0;
  for (const [k, layerNames] of names.entries()) {
    for (const n of layerNames) {
      const base = path.posix.basename(n);
      const parent = path.posix.dirname(n);
      if (base === '.wh..wh..opq') {
        opaque++;
        const below = names.slice(0, k).flat().filter((x) => x.startsWith(parent + '/') && !path.posix.basename(x).startsWith('.wh.'));
        t.ok(below.length > 0, `opaque ${parent}: lower layers have ${below.length} entries under it`);
        const upper = new Set(names.slice(k).flat().filter((x) => path.posix.dirname(x) === parent && !path.posix.basename(x).startsWith('.wh.')).map((x) => path.posix.basename(x)));
        t.same((await readdir(path.join(dir, parent))).sort(), [...upper].sort(), `opaque ${parent}: only the upper layers' entries are shown`);
      } else if (base.startsWith('.wh.')) {
        whiteouts++;
        const target = parent === '.' ? base.slice(4) : `${parent}/${base.slice(4)}`;
        t.ok(names.slice(0, k).some((l) => l.includes(target)), `whiteout ${target}: a lower layer has it`);
        const gone = await lstat(path.join(dir, target)).then(
          () => false,
          (e: NodeJS.ErrnoException) => e.code === 'ENOENT',
        );
        t.ok(gone, `whiteout ${target}: absent from the mount`);
        t.notOk(oracle.has(target), `whiteout ${target}: absent from the oracle too`);
      }
    }
  }
  t.ok(whiteouts >= 3 && opaque >= 2, `the image has whiteouts (${whiteouts}) and opaque markers (${opaque})`);
}

const mountRoot = path.join(work, 'mount-root');
const dir = path.join(work, 'mnt');
await mkdir(dir);
const bigLayer = image.layers.find((l) => l.digest === big[0]?.digest)!;

t.test('the fixture: one layer indexed, the others below the minimum size', async (t) => {
  t.equal(big.length, 1, 'one layer has a zTOC');
  t.ok(bigLayer.size >= 10 << 20, `it is above 10 MiB (${bigLayer.size} bytes)`);
  t.equal(createdLayers.length - big.length, 4, 'four small layers');
});

t.test('mount in the background through the proxy, compare with umoci unpack', async (t) => {
  const ref = `${proxy.host}/mount/img:${image.tag}`;
  const r = await cli(['mount', ref, dir, '--no-background-fetch', ...common(mountRoot)]);
  t.equal(r.code, 0, `exit 0 (${r.stderr.trim()})`);
  t.match(r.stdout, new RegExp(`^mounted ${ref} at ${dir}: 1 layer lazily \\(FUSE\\), 4 layers unpacked; SOCI index sha256:[0-9a-f]{64} \\(v1\\); served by pid \\d+\\n$`), 'one line: what was mounted how');
  const state = await stateOf(mountRoot);
  t.ok(await alive(state.pid), 'the serving process runs');
  t.equal(state.ready, true);
  t.same(state.layers.map((l) => l.mode), image.layers.map((l) => (l.digest === bigLayer.digest ? 'lazy' : 'unpacked')), 'the big layer lazy, the others unpacked');
  const m = await mountsUnder(dir, mountRoot);
  t.same(m.map((x) => x.fstype).sort(), ['fuse.soci-ts', 'overlay'], 'an overlay at DIR over one FUSE layer');

  // One small file of the big layer: only its span crosses the network.
  const index = readZtoc((await registryRequest(reg, `/v2/mount/img/blobs/${big[0]!.ztoc}`)).body);
  const mid = Math.floor(index.spans.length / 2);
  const candidates = index.ztoc.files.filter((f) => {
    if (f.type !== 'reg' || f.uncompressedSize < 4096 || f.uncompressedSize > 65536) return false;
    const s = index.spanFor(f.uncompressedOffset);
    return s > 0 && s + 1 < index.spans.length && s === index.spanFor(f.uncompressedOffset + f.uncompressedSize - 1) && oracle.get(norm(f.name))?.size === f.uncompressedSize;
  });
  const file = candidates.sort((a, b) => Math.abs(index.spanFor(a.uncompressedOffset) - mid) - Math.abs(index.spanFor(b.uncompressedOffset) - mid))[0]!;
  t.ok(file, 'a small file of the big layer in a middle span');
  const span = index.spanFor(file.uncompressedOffset);
  proxy.resetStats();
  const data = await readFile(path.join(dir, norm(file.name)));
  t.equal(createHash('sha256').update(data).digest('hex'), oracle.get(norm(file.name))!.sha256, `${norm(file.name)} (${data.length} bytes) reads right`);
  const blobPath = `/v2/mount/img/blobs/${bigLayer.digest}`;
  let served = 0;
  for (const rec of proxy.stats.log) {
    if (rec.method !== 'GET' || rec.url.split('?')[0] !== blobPath) continue;
    const m = /^bytes=(\d+)-(\d+)$/.exec(rec.range ?? '');
    served += m === null ? bigLayer.size : Number(m[2]) - Number(m[1]) + 1;
  }
  const spanBytes = (id: number): number => index.spans[id]!.compressedEnd - index.spans[id]!.compressedStart;
  t.ok(served >= spanBytes(span), `the registry served at least the file's span (${served} >= ${spanBytes(span)})`);
  t.ok(served <= spanBytes(span) + spanBytes(span + 1), `at most its span and one read ahead (${served} <= ${spanBytes(span) + spanBytes(span + 1)})`);
  t.ok(served < bigLayer.size / 4, `well below the layer (${served} of ${bigLayer.size} bytes)`);
  t.comment(`figure: reading ${data.length} bytes fetched ${served} bytes of the ${bigLayer.size}-byte layer (${index.spans.length} spans)`);

  await compareWithOracle(t, dir, 'lazy + unpacked', new Set([image.layers.indexOf(bigLayer)]));
  await checkWhiteouts(t, dir);
});

t.test('umount: nothing left mounted, the serving process gone', async (t) => {
  const state = await stateOf(mountRoot);
  const r = await cli(['umount', dir, '--root', mountRoot]);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, new RegExp(`^unmounted ${dir} \\(served by pid ${state.pid}, which unmounted and exited\\)\\n$`));
  t.same(await mountsUnder(dir, mountRoot), [], 'no mounts at DIR or under the root');
  t.ok(await waitDead(state.pid), 'the serving process exited');
  t.same((await readdir(path.join(mountRoot, 'mounts'))).filter((n) => !n.endsWith('.log')), [], 'the mount state is gone');
  t.same(await readdir(dir), [], 'DIR is empty again');
  const again = await cli(['umount', dir, '--root', mountRoot]);
  t.equal(again.code, 1, 'a second umount: user error');
  t.match(again.stderr, /^soci-ts: .*: not a soci-ts mount \(no mount state in .*\)\n$/);
});

t.test('user errors: one line, exit 1, nothing mounted', async (t) => {
  const full = path.join(work, 'full');
  await mkdir(full);
  await writeFile(path.join(full, 'keep'), 'x');
  const notEmpty = await cli(['mount', pushed.ref, full, ...common(mountRoot)]);
  t.equal(notEmpty.code, 1);
  t.match(notEmpty.stderr, /^soci-ts: .*full: not an empty directory \(1 entries; mount on an empty one\)\n$/);
  t.same(await readdir(full), ['keep'], 'DIR untouched');

  const missing = await cli(['mount', pushed.ref, path.join(work, 'nope'), ...common(mountRoot)]);
  t.equal(missing.code, 1);
  t.match(missing.stderr, /nope: no such directory/);

  await pushImage(image.layoutDir, image.tag, reg, 'mount/noindex');
  const none = await cli(['mount', `${reg.host}/mount/noindex:${image.tag}`, dir, ...common(mountRoot)]);
  t.equal(none.code, 1, 'image without an index');
  t.match(none.stderr, /^soci-ts: .*mount\/noindex:latest@sha256:[0-9a-f]{64}: the image has no SOCI index \(.*\); pass --build-index to build zTOCs while mounting, or index it first with soci-ts create --push\n$/);
  t.same(await mountsUnder(dir, mountRoot, full), [], 'nothing mounted');

  const notMount = await cli(['umount', full, '--root', mountRoot]);
  t.equal(notMount.code, 1);
  t.match(notMount.stderr, /full: not a soci-ts mount/);

  // As another user (the checkout must be readable by nobody for node to start).
  const canRun = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '-e', `require('fs').accessSync(${JSON.stringify(path.resolve('dist/daemon/main.js'))})`]).then(
    () => true,
    () => false,
  );
  await t.test('not root', { skip: canRun ? false : 'the checkout is not readable by uid 65534: cannot run soci-ts as another user here' }, async (t) => {
    const nobody = await cli(['mount', pushed.ref, dir, ...common(path.join(work, 'nobody-root'))], { uid: 65534 });
    t.equal(nobody.code, 1, 'not root: user error');
    t.match(nobody.stderr, /^soci-ts: mount: mounting an image needs root/);
  });
});

interface Foreground {
  child: ChildProcess;
  /** The one line it prints once mounted (rejects if it exits first). */
  line: Promise<string>;
  /** Its exit code (null: killed by a signal). */
  exited: Promise<number | null>;
  /** What it wrote to stderr so far (when stderr is a pipe to us). */
  stderr(): string;
}

/** `soci-ts mount ARGS --foreground` as a child process; `stderrFd` gives it that stderr instead of a pipe. */
function foreground(args: string[], opts: { stderrFd?: number } = {}): Foreground {
  const child: ChildProcess = spawn('bin/soci-ts', ['mount', ...args, '--foreground'], { env, stdio: ['ignore', 'pipe', opts.stderrFd ?? 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const line = new Promise<string>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (b: Buffer) => {
      out += b.toString();
      if (out.includes('\n')) resolve(out);
    });
    void exited.then((code) => reject(new Error(`soci-ts mount --foreground exited ${code}: ${stderr}`)));
  });
  line.catch(() => undefined);
  return { child, line, exited, stderr: () => stderr };
}

t.test('no FUSE, no overlayfs: a clear message, exit 1, nothing mounted (in a mount namespace of its own)', async (t) => {
  const root = path.join(work, 'nofuse-root');
  const nDir = path.join(work, 'mnt-nofuse');
  await mkdir(nDir);
  // Runs soci-ts in a private mount namespace where SETUP has been done first (never the host's).
  const isolated = (setup: string, args: string[]): Promise<CliResult> =>
    runCli(args, { env, wrapper: ['unshare', '--mount', '--propagation', 'private', 'sh', '-ec', `${setup}; exec "$@"`, 'sh'] });

  // No /dev/fuse: a tmpfs over /dev holding only null (what node and the spawns need).
  const noFuse = await isolated('mount -t tmpfs -o mode=755 none /dev; mknod -m 666 /dev/null c 1 3', ['mount', `${reg.host}/mount/img:${image.tag}`, nDir, ...common(root)]);
  t.equal(noFuse.code, 1, `exit 1 (${noFuse.stderr.trim()})`);
  t.match(noFuse.stderr, /^soci-ts: \/dev\/fuse: not present: this kernel or container has no FUSE \(load the fuse module, or pass --device \/dev\/fuse\)\n$/, 'one line saying what is missing and what to do');

  // No overlay filesystem: /proc/filesystems without it (fuse still listed).
  const fake = path.join(work, 'filesystems-without-overlay');
  await writeFile(fake, (await readFile('/proc/filesystems', 'utf8')).split('\n').filter((l) => !/\boverlay\b/.test(l)).join('\n'));
  const noOverlay = await isolated(`mount --bind ${fake} /proc/filesystems`, ['mount', `${reg.host}/mount/img:${image.tag}`, nDir, ...common(root)]);
  t.equal(noOverlay.code, 1, `exit 1 (${noOverlay.stderr.trim()})`);
  t.match(noOverlay.stderr, /^soci-ts: \/proc\/filesystems: the kernel has no overlay filesystem, needed to stack the layers \(modprobe overlay, or a kernel with CONFIG_OVERLAY_FS\)\n$/, 'one line saying what is missing and what to do');

  t.same(await mountsUnder(nDir, root), [], 'nothing mounted');
  t.same(await readdir(nDir), [], 'DIR untouched');
  const states = await readdir(path.join(root, 'mounts')).catch(() => [] as string[]);
  t.same(states.filter((n) => !n.endsWith('.log')), [], 'no mount state left');
});

t.test('--build-index in the foreground: every layer lazy, built on the fly, SIGTERM unmounts', async (t) => {
  const root = path.join(work, 'build-root');
  const fgDir = path.join(work, 'mnt-fg');
  await mkdir(fgDir);
  proxy.resetStats();
  const { child, line: linePromise, exited } = foreground([`${proxy.host}/mount/noindex:${image.tag}`, fgDir, '--build-index', '--min-layer-size', '1', '--no-background-fetch', ...common(root)]);
  const line = await linePromise;
  // Building the index streamed each layer once: by the time it is mounted (nothing read yet),
  // every layer blob was asked for exactly once, whole, and no byte of it twice.
  const blobReads = new Map<string, { gets: number; bytes: number }>();
  for (const rec of proxy.stats.log) {
    const m = /^\/v2\/mount\/noindex\/blobs\/(sha256:[0-9a-f]{64})$/.exec(rec.url.split('?')[0]!);
    if (rec.method !== 'GET' || m === null) continue;
    const layerDesc = image.layers.find((l) => l.digest === m[1]);
    if (layerDesc === undefined) continue;
    const r = /^bytes=(\d+)-(\d+)$/.exec(rec.range ?? '');
    const got = blobReads.get(m[1]!) ?? { gets: 0, bytes: 0 };
    got.gets++;
    got.bytes += r === null ? layerDesc.size : Number(r[2]) - Number(r[1]) + 1;
    blobReads.set(m[1]!, got);
  }
  t.same(
    image.layers.map((l) => ({ layer: l.digest, ...(blobReads.get(l.digest) ?? { gets: 0, bytes: 0 }) })),
    image.layers.map((l) => ({ layer: l.digest, gets: 1, bytes: l.size })),
    `--build-index fetched each of the ${image.layers.length} layer blobs once, whole (requests and bytes asked for, through the proxy)`,
  );
  t.match(line, /^mounted .* 5 layers lazily \(FUSE\), 0 layers unpacked; SOCI index sha256:[0-9a-f]{64} \(built\); served by pid \d+\n$/, 'every layer mounted lazily, with an index built now');
  const records = await new ArtifactStore({ root }).listIndexRecords({ imageManifestDigest: pushed.manifestDigest });
  t.equal(records.length, 1, 'the built index is kept in the store');
  t.equal(records[0]?.ztocs.length, 5, 'with a zTOC for every layer');
  t.equal((await mountsUnder(fgDir, root)).filter((m) => m.fstype === 'fuse.soci-ts').length, 5, 'five FUSE layers');
  await compareWithOracle(t, fgDir, 'all lazy', new Set(image.layers.map((_, i) => i)));
  await checkWhiteouts(t, fgDir);
  child.kill('SIGTERM');
  t.equal(await exited, 0, 'SIGTERM: unmounted and exit 0');
  t.same(await mountsUnder(fgDir, root), [], 'nothing left mounted');
});

t.test('--foreground: SIGINT unmounts cleanly and exits 0; the last log lines reach stderr', async (t) => {
  const root = path.join(work, 'sigint-root');
  const fgDir = path.join(work, 'mnt-sigint');
  await mkdir(fgDir);
  const fg = foreground([`${proxy.host}/mount/img:${image.tag}`, fgDir, '--no-background-fetch', '--log-level', 'info', ...common(root)]);
  t.match(await fg.line, /^mounted .* 1 layer lazily \(FUSE\), 4 layers unpacked/, 'mounted');
  const state = await stateOf(root);
  t.equal(state.pid, fg.child.pid, 'served by the foreground process itself');
  t.ok((await lstat(path.join(fgDir, 'bin/busybox'))).isFile(), 'the mount serves');
  fg.child.kill('SIGINT');
  t.equal(await fg.exited, 0, 'SIGINT: unmounted and exit 0');
  t.same(await mountsUnder(fgDir, root), [], 'nothing left mounted');
  t.same((await readdir(path.join(root, 'mounts'))).filter((n) => !n.endsWith('.log')), [], 'the mount state is gone');
  const lines = fg.stderr().split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as { msg: string; signal?: string });
  t.ok(lines.some((l) => l.msg === 'stop signal: unmounting' && l.signal === 'SIGINT'), 'it logged the signal');
  t.equal(lines.at(-1)?.msg, 'image unmounted', 'and its last line, written after the unmount, was not lost');
});

t.test('the serving process never blocks on its log: stderr a file whose writes hang, the mount still comes up and serves', async (t) => {
  const root = path.join(work, 'stall-log-root');
  const fDir = path.join(work, 'mnt-stall-log');
  await mkdir(fDir);
  // A log file on a filesystem that stopped answering (served by this process; async calls only).
  const logFs = await mountStallingFile(path.join(work, 'stall-log-fs'));
  let fg: Foreground | undefined;
  try {
    const fh = await open(logFs.path, 'a');
    fg = foreground([`${proxy.host}/mount/img:${image.tag}`, fDir, '--no-background-fetch', '--log-level', 'debug', ...common(root)], { stderrFd: fh.fd });
    await fh.close();
    const line = await Promise.race([fg.line, new Promise<string>((_, reject) => setTimeout(() => reject(new Error('no mount within 30 s: blocked writing its log?')), 30_000))]);
    t.match(line, /^mounted .* 1 layer lazily/, 'mounted while its first log write still hangs');
    t.equal(logFs.held(), 1, 'one write to the log is waiting (one writer, the lines behind it queued)');
    // Reads through FUSE (files of the lazy layer) while the log is stuck.
    const lazyFiles = names[image.layers.indexOf(bigLayer)]!.filter((n) => oracle.get(n)?.type === 'reg').slice(0, 20);
    let right = 0;
    for (const n of lazyFiles) {
      const data = await readFile(path.join(fDir, n));
      if (createHash('sha256').update(data).digest('hex') === oracle.get(n)!.sha256) right++;
    }
    t.equal(right, lazyFiles.length, `${lazyFiles.length} files of the lazy layer read right`);
    fg.child.kill('SIGTERM');
    logFs.release();
    t.equal(await fg.exited, 0, 'SIGTERM: unmounted and exit 0');
    t.same(await mountsUnder(fDir, root), [], 'nothing left mounted');
    const msgs = logFs
      .contents()
      .toString('utf8')
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => (JSON.parse(l) as { msg: string }).msg);
    t.ok(msgs.includes('image mounted'), `the lines queued behind the stuck write were written once it returned (${msgs.length} lines in ${logFs.writes()} writes)`);
    t.equal(msgs.at(-1), 'image unmounted', 'up to the last one');
  } finally {
    logFs.release();
    if (fg !== undefined && fg.child.exitCode === null) {
      fg.child.kill('SIGKILL');
      await fg.exited;
    }
    await logFs.unmount();
  }
});

t.test('a crashed serving process: the next mount and umount clean up', async (t) => {
  const crashDir = path.join(work, 'mnt-crash');
  await mkdir(crashDir);
  const ref = `${reg.host}/mount/img:${image.tag}`;
  // An unpack of the bottom layer already under <root>/layers: used as it is, never removed.
  const bottom = image.layers[0]!;
  const shared = path.join(mountRoot, 'layers', bottom.digest.slice('sha256:'.length));
  const client = new RegistryClient({ hostsDir: '' });
  const desc = { mediaType: bottom.mediaType, digest: bottom.digest, size: bottom.size };
  await unpackLayer({ source: client.repository(ref).blobStream(desc), mediaType: bottom.mediaType, digest: bottom.digest, dest: shared });
  await client.close();
  const first = await cli(['mount', ref, crashDir, '--no-background-fetch', ...common(mountRoot)]);
  t.equal(first.code, 0, first.stderr);
  const s1 = await stateOf(mountRoot);
  t.same(s1.layers[0], { n: 0, digest: bottom.digest, mediaType: bottom.mediaType, size: bottom.size, mode: 'unpacked', path: shared, shared: true }, 'the shared unpack of the bottom layer is used');
  process.kill(s1.pid, 'SIGKILL');
  t.ok(await waitDead(s1.pid), 'killed');
  t.ok((await mountsUnder(crashDir)).length > 0, 'its overlay is left behind');

  const second = await cli(['mount', ref, crashDir, '--no-background-fetch', ...common(mountRoot)]);
  t.equal(second.code, 0, `mounting again over the leftovers works (${second.stderr.trim()})`);
  const s2 = await stateOf(mountRoot);
  t.not(s2.pid, s1.pid, 'a new serving process');
  t.equal((await lstat(path.join(crashDir, 'bin/busybox'))).isFile(), true, 'the new mount serves');
  t.equal((await mountsUnder(crashDir)).length, 1, 'one mount at DIR (the old one detached)');

  process.kill(s2.pid, 'SIGKILL');
  t.ok(await waitDead(s2.pid), 'killed again');
  const r = await cli(['umount', crashDir, '--root', mountRoot]);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /its process \(pid \d+\) was gone; leftovers cleaned up/);
  t.same(await mountsUnder(crashDir, mountRoot), [], 'nothing left mounted');
  t.same((await readdir(path.join(mountRoot, 'mounts'))).filter((n) => !n.endsWith('.log')), [], 'no state left');
  t.ok((await lstat(path.join(shared, 'bin/busybox'))).isFile(), 'the shared unpack is still there');
});

t.test('background fetch: after the quiet period every span is local; the mount then works without the registry', async (t) => {
  const root = path.join(work, 'bg-root');
  const bgDir = path.join(work, 'mnt-bg');
  await mkdir(bgDir);
  const r = await cli(['mount', `${proxy.host}/mount/img:${image.tag}`, bgDir, '--log-level', 'info', ...common(root)]);
  t.equal(r.code, 0, r.stderr);
  const state = await stateOf(root);
  const log = path.join(root, 'mounts', `${state.id}.log`);
  let done = false;
  for (let i = 0; i < 1200 && !done; i++) {
    done = (await readFile(log, 'utf8')).includes('"msg":"layer is complete"');
    if (!done) await new Promise((res) => setTimeout(res, 100));
  }
  t.ok(done, 'the serving process reports the lazy layer fetched');
  // Oracle for "local": the span digests of the zTOC, as files of the disk cache.
  const index = readZtoc((await registryRequest(reg, `/v2/mount/img/blobs/${big[0]!.ztoc}`)).body);
  const cached = new Set<string>();
  const cacheDir = path.join(root, 'cache', 'spans');
  for (const sub of await readdir(cacheDir)) {
    const st = await lstat(path.join(cacheDir, sub));
    if (st.isDirectory()) for (const f of await readdir(path.join(cacheDir, sub))) cached.add(f);
    else cached.add(sub);
  }
  const missing = index.ztoc.compressionInfo.spanDigests.filter((d) => !cached.has(d.slice('sha256:'.length)));
  t.same(missing, [], `all ${index.spans.length} spans are in the disk cache`);
  // The registry "goes down" for blobs: every file still reads right.
  proxy.setOptions({ rate: 1, faults: ['status500'] });
  try {
    const probe = await httpRequest(`${proxy.url}/v2/mount/img/blobs/${bigLayer.digest}`, { headers: { range: 'bytes=0-99' } });
    t.equal(probe.status, 500, 'the proxy now fails blob reads');
    await compareWithOracle(t, bgDir, 'registry down after background fetch', new Set([image.layers.indexOf(bigLayer)]));
  } finally {
    proxy.setOptions({ rate: 0, faults: ['stall'] });
  }
  const u = await cli(['umount', bgDir, '--root', root]);
  t.equal(u.code, 0, u.stderr);
  t.same(await mountsUnder(bgDir, root), [], 'nothing left mounted');
});

t.test('umount while the registry stalls a background fetch and a read: prompt, clean, the reader gets an error', async (t) => {
  const root = path.join(work, 'stall-root');
  const sDir = path.join(work, 'mnt-stall');
  await mkdir(sDir);
  const r = await cli(['mount', `${proxy.host}/mount/img:${image.tag}`, sDir, '--log-level', 'info', ...common(root)]);
  t.equal(r.code, 0, r.stderr);
  const state = await stateOf(root);
  const index = readZtoc((await registryRequest(reg, `/v2/mount/img/blobs/${big[0]!.ztoc}`)).body);
  // A file of the lazy layer in a late span (the background fetch starts from the first).
  const late = index.ztoc.files.find((f) => f.type === 'reg' && f.uncompressedSize > 0 && index.spanFor(f.uncompressedOffset) >= index.spans.length - 2 && oracle.get(norm(f.name))?.size === f.uncompressedSize);
  t.ok(late, 'a file of the lazy layer in one of its last spans');
  proxy.resetStats();
  proxy.setOptions({ rate: 1, faults: ['stall'] });
  try {
    // The background fetch starts after its 10 s quiet period: wait for its first stalled request.
    const blobPath = `/v2/mount/img/blobs/${bigLayer.digest}`;
    const stalled = (): number => proxy.stats.log.filter((x) => x.method === 'GET' && x.url.split('?')[0] === blobPath && x.outcome === 'stall').length;
    for (let i = 0; i < 300 && stalled() === 0; i++) await new Promise((res) => setTimeout(res, 100));
    t.ok(stalled() > 0, `the background fetch has a request stalled (${stalled()})`);
    // A reader in a child process (its read blocks in the kernel, waiting on the mount).
    const reader = spawn('cat', [path.join(sDir, norm(late!.name))], { stdio: ['ignore', 'ignore', 'pipe'] });
    let readerErr = '';
    reader.stderr.on('data', (b: Buffer) => (readerErr += b.toString()));
    const readerDone = new Promise<number | null>((res) => reader.on('close', (code) => res(code)));
    const before = stalled();
    for (let i = 0; i < 100 && stalled() === before; i++) await new Promise((res) => setTimeout(res, 50));
    t.ok(stalled() > before, 'the read is stalled too');
    const t0 = Date.now();
    const u = await cli(['umount', sDir, '--root', root]);
    const ms = Date.now() - t0;
    t.equal(u.code, 0, u.stderr);
    t.match(u.stdout, /which unmounted and exited\)/, 'the serving process unmounted and exited by itself (not killed)');
    t.ok(ms < 10_000, `umount took ${ms} ms (its --timeout is 30 s; the fetch timeout 30 s)`);
    const code = await Promise.race([readerDone, new Promise<'hung'>((res) => setTimeout(() => res('hung'), 10_000))]);
    t.not(code, 'hung', 'the reader did not hang');
    t.not(code, 0, `the reader failed (exit ${String(code)})`);
    t.match(readerErr, /Input\/output error|Transport endpoint is not connected/, `with EIO or ENOTCONN: ${readerErr.trim()}`);
    t.ok(await waitDead(state.pid), 'the serving process is gone');
    t.same(await mountsUnder(sDir, root), [], 'nothing left mounted (/proc/self/mountinfo)');
    const log = await readFile(path.join(root, 'mounts', `${state.id}.log`), 'utf8');
    t.match(log, /"msg":"image unmounted"/, 'its log ends with the unmount');
  } finally {
    proxy.setOptions({ rate: 0, faults: ['stall'] });
  }
});

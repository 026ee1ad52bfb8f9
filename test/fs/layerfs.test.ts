/**
 * One layer mounted lazily over FUSE from a real registry, against `tar -x` of the same layer
 * (the oracle, with the overlay whiteout conversion containerd applies): every path's type,
 * mode, owner, size, mtime, symlink target, device numbers, xattrs, hardlink identity and
 * sha256. Then what a lazy mount promises: a small file costs only its spans, concurrent
 * readers get the right bytes whatever the cache size, a registry outage (stalled, or its port
 * closed) is EIO (never wrong bytes, never a hang) and recovers, a failing span is logged once, a
 * flipped byte is caught (and logged as a digest mismatch), the disk cache survives a remount, an
 * unmount with reads in flight completes, a directory of thousands of entries lists in full
 * (against `tar -tf`), and another user reads through allow_other + default_permissions as on
 * the `tar -x` copy.
 *
 * Everything here is async: this process serves the FUSE mounts it reads.
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmod, mkdtemp, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { startRegistry } from '../helpers/registry.js';
import { startFaultProxy } from '../helpers/fault-proxy.js';
import { largeDirLayer, layer, run, testCacheDir, LARGE_DIR, LARGE_DIR_PERMS, type LayerSpec } from '../helpers/layers.js';
import { compareTrees, snapshotTree, type TreeEntry } from '../helpers/tree.js';
import { jsonLogger, RegistryClient, type Descriptor, type Logger } from '../../fetcher/index.js';
import { buildZtocFromFile, LayerIndex } from '../../ztoc/index.js';
import { CompressedSpanStore, InflatedSpanCache, LayerFs, nativeReadAvailable, threadLocalsReused, type LayerFsOptions } from '../../fs/index.js';

const work = await mkdtemp(path.join(tmpdir(), 'soci-ts-layerfs-'));
const mounted = new Set<LayerFs>();
t.teardown(async () => {
  for (const m of mounted) await m.unmount().catch(() => undefined);
  await rm(work, { recursive: true, force: true });
});

const reg = await startRegistry();
t.teardown(() => reg.stop());
const proxy = await startFaultProxy({ upstream: reg.url, seed: 3, rate: 0, faults: ['stall'] });
t.teardown(() => proxy.close());
const client = new RegistryClient({ hostsDir: '', timeouts: { connectMs: 1000, firstByteMs: 1000, idleMs: 1000 }, retry: { attempts: 2, baseDelayMs: 10 } });
t.teardown(() => client.close());
const repo = client.repository(`${proxy.host}/fs/layerfs:latest`);

interface Pushed {
  file: string;
  desc: Descriptor;
  index: LayerIndex;
  oracle: string;
}

const sha256 = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

/** Pushes a layer file as a blob and builds its zTOC. */
async function pushBlob(file: string, gzip: boolean, spanSize: number): Promise<{ desc: Descriptor; index: LayerIndex }> {
  const bytes = await readFile(file);
  const desc: Descriptor = {
    mediaType: gzip ? 'application/vnd.oci.image.layer.v1.tar+gzip' : 'application/vnd.oci.image.layer.v1.tar',
    digest: `sha256:${sha256(bytes)}`,
    size: bytes.length,
  };
  await repo.pushBlob(desc, bytes);
  return { desc, index: new LayerIndex(await buildZtocFromFile(file, { spanSize }), desc.digest) };
}

/** Pushes a fixture layer as a blob, builds its zTOC and extracts it with GNU tar (the oracle). */
async function pushLayer(spec: LayerSpec, spanSize: number): Promise<Pushed> {
  const file = await layer(testCacheDir(), spec);
  const { desc, index } = await pushBlob(file, spec.compression !== 'none', spanSize);
  const oracle = path.join(work, `oracle-${spec.tree}-${spec.format}-${spec.compression}`);
  await run('mkdir', ['-p', oracle]);
  await run('tar', ['-xpf', file, '--same-owner', '--numeric-owner', '--xattrs', '--xattrs-include=*', '-C', oracle]);
  return { file, desc, index, oracle };
}

let mountCount = 0;
async function mountLayer(p: Pushed, opts: Partial<LayerFsOptions> = {}): Promise<LayerFs> {
  const m = await LayerFs.mount({
    mountpoint: path.join(work, `mnt-${++mountCount}`),
    layerDigest: p.desc.digest,
    index: p.index,
    source: { read: (offset, length, digest) => repo.readRange(p.desc, offset, length, { digest }) },
    memory: new InflatedSpanCache(),
    fetchTimeoutMs: 3000,
    ...opts,
  });
  mounted.add(m);
  return m;
}

async function unmount(m: LayerFs): Promise<void> {
  await m.unmount();
  mounted.delete(m);
}

/** Bytes of the blob the registry was asked for through the proxy since the last reset. */
function bytesServed(): number {
  let n = 0;
  for (const r of proxy.stats.log) {
    if (r.method !== 'GET' || r.range === undefined) continue;
    for (const part of r.range.replace(/^bytes=/, '').split(',')) {
      const [a, b] = part.split('-').map(Number);
      n += b! - a! + 1;
    }
  }
  return n;
}

/**
 * What containerd's overlay applier makes of the tar extraction: `.wh.NAME` → a 0/0 character
 * device NAME with no permission bits (unless NAME itself is in the layer), `.wh..wh..opq` →
 * `trusted.overlay.opaque=y` on its directory, other `.wh..wh.*` hidden.
 */
function overlayConvert(tree: Map<string, TreeEntry>): Map<string, TreeEntry> {
  const out = new Map(tree);
  for (const [p, e] of tree) {
    const base = path.basename(p);
    if (!base.startsWith('.wh.')) continue;
    out.delete(p);
    const dir = path.dirname(p);
    if (base === '.wh..wh..opq') {
      const d = out.get(dir)!;
      out.set(dir, { ...d, xattrs: { ...d.xattrs, 'trusted.overlay.opaque': Buffer.from('y').toString('hex') } });
    } else if (!base.startsWith('.wh..wh.')) {
      const name = path.join(dir, base.slice(4));
      if (!tree.has(name)) out.set(name, { type: 'char', perm: 0, uid: e.uid, gid: e.gid, size: 0, mtimeMs: e.mtimeMs, rdev: '0,0', xattrs: {}, ino: e.ino, id: `whiteout:${name}`, nlink: 1 });
    }
  }
  return out;
}

const special = await pushLayer({ tree: 'special', format: 'posix', compression: 'gzip-6' }, 64 << 10);
const usr = await pushLayer({ tree: 'usr-small', format: 'gnu', compression: 'gzip-6' }, 1 << 20);
t.comment(`special layer: ${special.desc.size} bytes, ${special.index.spans.length} spans; usr-small: ${usr.desc.size} bytes, ${usr.index.spans.length} spans`);

async function checkAgainstTar(tt: Test, p: Pushed, label: string): Promise<void> {
  const want = overlayConvert(await snapshotTree(p.oracle));
  // Both ways of answering: getattr, lookups and warm reads in the libfuse workers (the
  // default), and everything through JavaScript.
  for (const nativeReads of [true, false]) {
    const how = `${label}, ${nativeReads ? 'native getattr and reads' : 'all through JavaScript'}`;
    const m = await mountLayer(p, { nativeReads });
    const got = await snapshotTree(m.mountpoint);
    // The root is the mountpoint / the extraction dir: its own attributes are not the layer's.
    compareTrees(tt, got, want, how, { ignore: (q) => q === '.' });
    tt.ok(m.spans.counters.fetches > 0, `${how}: data came through range reads (${m.spans.counters.fetches} fetches)`);
    const native = m.nativeReads;
    if (nativeReads) tt.ok(native.attrs >= got.size - 1, `${how}: ${native.attrs} getattrs answered natively for ${got.size} paths`);
    else tt.equal(native.attrs + native.reads, 0, `${how}: nothing answered natively`);
    await unmount(m);
  }
}

t.test('single-layer mount equals tar -x: special tree (hardlinks, symlinks, long names, xattrs, devices, whiteouts)', async (tt) => {
  await checkAgainstTar(tt, special, 'special');
});

t.test('single-layer mount equals tar -x: real files from /usr', async (tt) => {
  await checkAgainstTar(tt, usr, 'usr-small');
});

t.test('statfs, ENOENT, EROFS, readdir of a large tree', async (tt) => {
  const m = await mountLayer(usr);
  const df = await run('stat', ['-f', '-c', '%b %S %c', m.mountpoint]);
  const [blocks, bsize, files] = df.stdout.trim().split(' ').map(Number);
  tt.equal(bsize, 4096, 'statfs block size');
  tt.equal(files, m.table.count, 'statfs counts the inodes');
  tt.ok(blocks! > 0, 'statfs blocks');
  await tt.rejects(stat(path.join(m.mountpoint, 'no/such/file')), { code: 'ENOENT' }, 'missing path: ENOENT');
  const someFile = [...(await snapshotTree(m.mountpoint, { hash: false }))].find(([, e]) => e.type === 'reg')![0];
  await tt.rejects(open(path.join(m.mountpoint, someFile), 'r+'), { code: 'EROFS' }, 'open for writing: EROFS');
  await tt.rejects(run('touch', [path.join(m.mountpoint, 'new-file')]), 'creating a file fails');
  await unmount(m);
});

/** The mount's read-ahead as the kernel has it: its bdi's read_ahead_kb, found through mountinfo. */
async function kernelReadAheadKiB(mountpoint: string): Promise<number> {
  const line = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter((l) => l.split(' ')[4] === mountpoint).at(-1);
  if (line === undefined) throw new Error(`${mountpoint} not in mountinfo`);
  return Number(await readFile(`/sys/class/bdi/${line.split(' ')[2]}/read_ahead_kb`, 'utf8'));
}

t.test('the kernel reads ahead 1 MiB by default, as configured, or as the kernel had it', async (tt) => {
  const plain = await mountLayer(usr, { kernelReadAheadKiB: 0 });
  const kernels = await kernelReadAheadKiB(plain.mountpoint);
  const byDefault = await mountLayer(usr);
  const big = await mountLayer(usr, { kernelReadAheadKiB: 4096 });
  tt.equal(await kernelReadAheadKiB(byDefault.mountpoint), 1024, 'default: 1024 KiB');
  tt.equal(await kernelReadAheadKiB(big.mountpoint), 4096, 'kernelReadAheadKiB 4096');
  tt.not(kernels, 1024, `0 leaves the kernel's own (${kernels} KiB)`);
  // The reads behind a bigger read-ahead still return the right bytes.
  const file = (await smallFiles(usr, 1 << 20)).at(-1)!;
  const want = sha256(await readFile(path.join(usr.oracle, file)));
  for (const m of [plain, byDefault, big]) tt.equal(sha256(await readFile(path.join(m.mountpoint, file))), want, `${file} right with ${await kernelReadAheadKiB(m.mountpoint)} KiB`);
  for (const m of [plain, byDefault, big]) await unmount(m);
});

t.test('zero-message opens: after the first open the kernel opens files by itself, and keeps their pages', async (tt) => {
  const ops = new Map<string, number>();
  const m = await mountLayer(usr, { onOp: (op) => ops.set(op, (ops.get(op) ?? 0) + 1) });
  const files = (await smallFiles(usr, 64 << 10)).slice(0, 40);
  for (const f of files) tt.equal(sha256(await readFile(path.join(m.mountpoint, f))), sha256(await readFile(path.join(usr.oracle, f))), `${f} right`);
  tt.equal(ops.get('open'), 1, `${files.length} files opened, one open reached us`);
  const reads = m.counters.reads;
  for (const f of files) await readFile(path.join(m.mountpoint, f));
  tt.equal(m.counters.reads, reads, 'reading them again comes from the page cache (no FUSE read)');
  await unmount(m);
});

t.test('xattr ops only where the layer has xattrs: elsewhere the kernel answers "not supported" itself', async (tt) => {
  const plain = await mountLayer(usr);
  const withXattrs = await mountLayer(special);
  tt.equal(plain.table.hasXattrs, false, 'usr-small has no xattrs');
  tt.equal(withXattrs.table.hasXattrs, true, 'the special tree has');
  const file = (await smallFiles(usr, 64 << 10))[0]!;
  const none = await run('getfattr', ['-n', 'user.nothing', path.join(plain.mountpoint, file)]).then(
    () => 'found',
    (err: unknown) => String(err),
  );
  tt.match(none, /Operation not supported/, `no xattrs in the layer: ${none.split('\n').find((l) => /getfattr|not supported/.test(l)) ?? none}`);
  const specialFile = (await smallFiles(special, 1 << 20))[0]!;
  const absent = await run('getfattr', ['-n', 'user.nothing', path.join(withXattrs.mountpoint, specialFile)]).then(
    () => 'found',
    (err: unknown) => String(err),
  );
  tt.match(absent, /No such attribute/, 'a layer with xattrs: an absent one is "no such attribute"');
  await unmount(plain);
  await unmount(withXattrs);
});

/** A small regular file of the big layer and its oracle bytes. */
async function smallFiles(p: Pushed, max: number): Promise<string[]> {
  const tree = await snapshotTree(p.oracle, { hash: false });
  return [...tree].filter(([, e]) => e.type === 'reg' && e.size > 0 && e.size <= max).map(([q]) => q);
}

t.test('reading one small file fetches only its spans', async (tt) => {
  const m = await mountLayer(usr);
  const [name] = (await smallFiles(usr, 8192)).slice(-1);
  proxy.resetStats();
  const got = await readFile(path.join(m.mountpoint, name!));
  const want = await readFile(path.join(usr.oracle, name!));
  tt.equal(sha256(got), sha256(want), `${name}: right bytes`);
  const served = bytesServed();
  const maxSpan = Math.max(...usr.index.spans.map((s) => s.compressedEnd - s.compressedStart));
  tt.ok(served > 0 && served <= 2 * maxSpan, `registry served ${served} bytes for a ${want.length}-byte file (at most two spans: ${2 * maxSpan})`);
  tt.ok(served < usr.desc.size / 4, `well below the layer's ${usr.desc.size} bytes`);
  await unmount(m);
});

async function concurrentReaders(tt: Test, memoryBytes: number): Promise<void> {
  const memory = new InflatedSpanCache({ maxBytes: memoryBytes });
  const m = await mountLayer(usr, { memory, readAhead: true });
  const tree = await snapshotTree(usr.oracle, { hash: false });
  const files = [...tree].filter(([, e]) => e.type === 'reg' && e.size > 0).map(([q, e]) => ({ q, size: e.size }));
  let seed = memoryBytes % 997;
  const rand = (n: number): number => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed % n;
  };
  let wrong = 0;
  let reads = 0;
  const reader = async (): Promise<void> => {
    for (let i = 0; i < 8; i++) {
      const f = files[rand(files.length)]!;
      const offset = rand(f.size);
      const length = 1 + rand(Math.min(256 << 10, f.size - offset));
      const [a, b] = await Promise.all([readAt(path.join(m.mountpoint, f.q), offset, length), readAt(path.join(usr.oracle, f.q), offset, length)]);
      reads++;
      if (!a.equals(b)) wrong++;
    }
  };
  await Promise.all(Array.from({ length: 64 }, reader));
  tt.equal(reads, 512, '64 readers × 8 random ranges');
  tt.equal(wrong, 0, 'every range equals the oracle');
  const stats = memory.stats();
  tt.comment(`memory cache ${memoryBytes} bytes: ${stats.evictions} evictions, ${m.spans.counters.fetches} fetches, ${m.spans.counters.inflations} inflations`);
  if (memoryBytes < 4 << 20) tt.ok(stats.evictions > 0, 'the tiny cache evicted spans');
  await unmount(m);
}

async function readAt(p: string, offset: number, length: number): Promise<Buffer> {
  const fh = await open(p, 'r');
  try {
    const buf = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await fh.read(buf, done, length - done, offset + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return buf.subarray(0, done);
  } finally {
    await fh.close();
  }
}

t.test('64 concurrent readers, tiny memory cache (evictions)', (tt) => concurrentReaders(tt, 2 << 20));
t.test('64 concurrent readers, large memory cache', (tt) => concurrentReaders(tt, 512 << 20));

const dropPageCache = (): Promise<unknown> => run('sh', ['-c', 'sync; echo 3 > /proc/sys/vm/drop_caches']);

/** Reads every file of the list through the mount and compares each with the oracle; returns how many differ. */
async function readAllAgainstOracle(m: LayerFs, p: Pushed, names: readonly string[]): Promise<number> {
  let wrong = 0;
  for (const q of names) {
    const [a, b] = await Promise.all([readFile(path.join(m.mountpoint, q)), readFile(path.join(p.oracle, q))]);
    if (!a.equals(b)) wrong++;
  }
  return wrong;
}

t.test('warm reads are answered natively, with the right bytes, also while spans leave the memory cache', async (tt) => {
  tt.ok(nativeReadAvailable(), 'scripts/setup built the native read path into fuse-native');
  const tree = await snapshotTree(usr.oracle, { hash: false });
  const names = [...tree].filter(([, e]) => e.type === 'reg' && e.size > 0).map(([q]) => q);
  const big = [...tree].filter(([, e]) => e.type === 'reg').sort((a, b) => b[1].size - a[1].size)[0]!;

  // A large memory cache: the second pass over every file is answered without JavaScript.
  const m = await mountLayer(usr, { memory: new InflatedSpanCache({ maxBytes: 512 << 20 }) });
  tt.equal(await readAllAgainstOracle(m, usr, names), 0, `first pass: ${names.length} files equal the oracle`);
  const fetches = m.spans.counters.fetches;
  const first = m.nativeReads;
  await dropPageCache(); // else the kernel answers the second pass from its page cache
  tt.equal(await readAllAgainstOracle(m, usr, names), 0, 'second pass: every file equals the oracle');
  const second = m.nativeReads;
  tt.ok(second.reads - first.reads >= names.length / 2, `second pass: ${second.reads - first.reads} reads answered natively (${names.length} files)`);
  tt.ok(second.bytes - first.bytes >= big[1].size, `${second.bytes - first.bytes} bytes copied natively (largest file ${big[1].size})`);
  tt.equal(m.spans.counters.fetches, fetches, 'nothing fetched again');
  tt.ok(m.counters.reads >= second.reads && m.counters.bytesRead >= second.bytes, 'the mount counters include the native reads');
  await unmount(m);
  tt.same(m.nativeReads, second, 'the figures stay readable after unmount');

  // nativeReads: false: every read goes to JavaScript.
  const js = await mountLayer(usr, { memory: new InflatedSpanCache({ maxBytes: 512 << 20 }), nativeReads: false });
  tt.equal(await readAllAgainstOracle(js, usr, [big[0]]), 0);
  await dropPageCache();
  tt.equal(await readAllAgainstOracle(js, usr, [big[0]]), 0);
  tt.equal(js.nativeReads.reads, 0, 'nativeReads: false answers nothing natively');
  await unmount(js);

  // A memory cache of three spans: spans are registered and dropped all the time under the
  // readers; a span dropped while registered would be read after its buffer was reused.
  const memory = new InflatedSpanCache({ maxBytes: 3 << 20 });
  const tiny = await mountLayer(usr, { memory });
  let wrong = 0;
  for (let pass = 0; pass < 3; pass++) {
    await dropPageCache();
    const quarter = Math.ceil(names.length / 4);
    const parts = [0, 1, 2, 3].map((i) => names.slice(i * quarter, (i + 1) * quarter));
    wrong += (await Promise.all(parts.map((part) => readAllAgainstOracle(tiny, usr, part)))).reduce((x, y) => x + y, 0);
  }
  tt.equal(wrong, 0, '3 passes of 4 concurrent readers over every file: all equal the oracle');
  tt.ok(memory.stats().evictions > 0, `the tiny cache evicted ${memory.stats().evictions} spans`);
  tt.ok(tiny.nativeReads.reads > 0, `${tiny.nativeReads.reads} reads answered natively between evictions`);
  await unmount(tiny);
});

t.test('libfuse workers that end leave their thread locals to the next ones (no growth burst after burst)', async (tt) => {
  const m = await mountLayer(usr, { memory: new InflatedSpanCache({ maxBytes: 512 << 20 }), nativeReads: false });
  const tree = await snapshotTree(usr.oracle, { hash: false });
  const names = [...tree].filter(([, e]) => e.type === 'reg' && e.size > 0).map(([q]) => q);
  const reused0 = threadLocalsReused();
  const sizes: number[] = [];
  // sha256sum of every file, 64 processes at a time (readers in this process would be only
  // libuv's 4 threads): libfuse starts workers for them, and ends all but 10 once idle.
  const list = path.join(work, 'burst-files');
  await writeFile(list, names.map((q) => `${q}\0`).join(''));
  // The shell changes into the mount, not spawn's cwd: libuv waits for the child's exec on the
  // event loop, and a chdir into this process's own mount before it would never be answered.
  const sums = async (dir: string): Promise<string> =>
    (await run('sh', ['-c', `cd '${dir}' && xargs -0 -a '${list}' -P 64 -n 8 sha256sum | sort -k2`])).stdout;
  const want = await sums(usr.oracle);
  for (let burst = 0; burst < 4; burst++) {
    await dropPageCache();
    tt.equal(await sums(m.mountpoint), want, `burst ${burst + 1}: ${names.length} files, 64 readers at a time, equal the oracle`);
    await new Promise((r) => setTimeout(r, 200));
    sizes.push(m.threadLocals);
  }
  const reused = threadLocalsReused() - reused0;
  tt.comment(`thread locals after each burst: ${sizes.join(', ')}; reused ${reused} times`);
  tt.ok(reused > 0, 'new workers took ended workers\' locals');
  tt.ok(sizes[3]! <= sizes[0]! + 8, `bursts 2–4 made few new locals (${sizes[0]} after the first, ${sizes[3]} after the fourth)`);
  await unmount(m);
});

t.test('registry outage: EIO within the timeout, then recovery; never wrong bytes', async (tt) => {
  const m = await mountLayer(usr, { fetchTimeoutMs: 1500, readAhead: false });
  const names = await smallFiles(usr, 4096);
  proxy.setOptions({ rate: 1, faults: ['stall'] });
  const t0 = Date.now();
  await tt.rejects(readFile(path.join(m.mountpoint, names[0]!)), { code: 'EIO' }, 'read during the outage: EIO');
  const ms = Date.now() - t0;
  tt.ok(ms < 10_000, `EIO after ${ms} ms (fetch timeout 1500 ms)`);
  proxy.setOptions({ rate: 0 });
  const got = await readFile(path.join(m.mountpoint, names[0]!));
  tt.ok(got.equals(await readFile(path.join(usr.oracle, names[0]!))), 'registry back: the same read succeeds with the right bytes');
  await unmount(m);
});

/** A logger that keeps its lines (parsed) for assertions. */
function capturingLogger(): { logger: Logger; lines: Array<{ msg: string; span?: number; error?: unknown }> } {
  const lines: Array<{ msg: string; span?: number; error?: unknown }> = [];
  return { logger: jsonLogger('debug', { write: (l: string) => lines.push(JSON.parse(l) as { msg: string }) }), lines };
}

t.test('a flipped byte in a served span is caught by the span digest', async (tt) => {
  const log = capturingLogger();
  const m = await mountLayer(usr, { fetchTimeoutMs: 2000, readAhead: false, logger: log.logger });
  const names = await smallFiles(usr, 4096);
  const name = names[Math.floor(names.length / 2)]!;
  proxy.resetStats();
  proxy.setOptions({ rate: 1, faults: ['flip'] });
  const r = await readFile(path.join(m.mountpoint, name)).then(
    (b) => ({ ok: true as const, b }),
    (e: NodeJS.ErrnoException) => ({ ok: false as const, code: e.code }),
  );
  proxy.setOptions({ rate: 0 });
  tt.ok(proxy.stats.faults.flip > 0, `the proxy flipped a byte in ${proxy.stats.faults.flip} responses`);
  tt.same(r, { ok: false, code: 'EIO' }, 'every response corrupt: EIO, never the wrong bytes');
  const caught = log.lines.filter((l) => l.msg === 'span fetch failed' && /do not match their digest/.test(JSON.stringify(l.error)));
  tt.ok(caught.length > 0, `the mismatch was detected and logged (${JSON.stringify(caught[0]?.error)})`);
  tt.ok(m.spans.counters.errors > 0, `and counted (${m.spans.counters.errors} read errors)`);
  const want = await readFile(path.join(usr.oracle, name));
  const again = await readFile(path.join(m.mountpoint, name));
  tt.ok(again.equals(want), 'the next read (clean registry) returns the right bytes');
  await unmount(m);
});

t.test('a failing span: every read gets EIO, the cause is logged once per span', async (tt) => {
  const log = capturingLogger();
  const m = await mountLayer(usr, { readAhead: false, logger: log.logger });
  const names = await smallFiles(usr, 4096);
  const name = names[Math.floor(names.length / 3)]!;
  proxy.resetStats();
  proxy.setOptions({ rate: 1, faults: ['status500'] });
  let eio = 0;
  for (let i = 0; i < 5; i++) {
    const code = await readFile(path.join(m.mountpoint, name)).then(
      () => 'ok',
      (e: NodeJS.ErrnoException) => e.code,
    );
    if (code === 'EIO') eio++;
  }
  proxy.setOptions({ rate: 0 });
  tt.equal(eio, 5, 'five reads, five EIOs');
  tt.ok(proxy.stats.faults.status500 >= 5, `the registry failed ${proxy.stats.faults.status500} requests`);
  const failed = log.lines.filter((l) => l.msg === 'span fetch failed');
  const spans = [...new Set(failed.map((l) => l.span))];
  tt.ok(spans.length >= 1, `the failure was logged (spans ${spans.join(', ')})`);
  tt.equal(failed.length, spans.length, `once per span (${failed.length} lines for ${spans.length} span(s), ${m.spans.counters.errors} failed reads)`);
  tt.match(JSON.stringify(failed[0]?.error), /500/, 'naming the cause (HTTP 500)');
  const got = await readFile(path.join(m.mountpoint, name));
  tt.ok(got.equals(await readFile(path.join(usr.oracle, name))), 'the registry back: the read succeeds');
  await unmount(m);
});

/** A TCP forwarder to the registry on a port of its own: closed, that port refuses connections; opened again, it forwards. */
async function forwarder(target: number): Promise<{ port: number; close(): Promise<void>; open(): Promise<void> }> {
  let server: net.Server | undefined;
  const sockets = new Set<net.Socket>();
  let port = 0;
  const open = async (): Promise<void> => {
    const s = net.createServer((down) => {
      const up = net.connect(target, '127.0.0.1');
      for (const x of [down, up]) {
        sockets.add(x);
        x.on('close', () => sockets.delete(x));
        x.on('error', () => undefined);
      }
      down.on('close', () => up.destroy());
      up.on('close', () => down.destroy());
      down.pipe(up).pipe(down);
    });
    await new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      s.listen(port, '127.0.0.1', () => resolve());
    });
    port = (s.address() as net.AddressInfo).port;
    server = s;
  };
  const close = async (): Promise<void> => {
    const s = server;
    server = undefined;
    for (const x of sockets) x.destroy();
    if (s !== undefined) await new Promise<void>((resolve) => s.close(() => resolve()));
  };
  await open();
  return { port, close, open };
}

t.test('a refused connection (registry gone, port closed): EIO within the fetch timeout; it recovers when the registry is back', async (tt) => {
  const fwd = await forwarder(reg.port);
  const c = new RegistryClient({ hostsDir: '', timeouts: { connectMs: 1000, firstByteMs: 1000, idleMs: 1000 }, retry: { attempts: 2, baseDelayMs: 10 } });
  try {
    const direct = c.repository(`127.0.0.1:${fwd.port}/fs/layerfs:latest`);
    const log = capturingLogger();
    const m = await mountLayer(usr, { fetchTimeoutMs: 3000, readAhead: false, logger: log.logger, source: { read: (offset, length, digest) => direct.readRange(usr.desc, offset, length, { digest }) } });
    const names = await smallFiles(usr, 4096);
    const name = names[Math.floor((names.length * 2) / 3)]!;
    await fwd.close();
    const refused = await new Promise<string>((resolve) => {
      const s = net.connect(fwd.port, '127.0.0.1');
      s.on('connect', () => (s.destroy(), resolve('connected')));
      s.on('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? 'error'));
    });
    tt.equal(refused, 'ECONNREFUSED', 'the port refuses connections');
    const t0 = Date.now();
    await tt.rejects(readFile(path.join(m.mountpoint, name)), { code: 'EIO' }, 'a read: EIO');
    const ms = Date.now() - t0;
    tt.ok(ms < 3000 + 1000, `within the fetch timeout (${ms} ms; timeout 3000 ms)`);
    tt.ok(log.lines.some((l) => l.msg === 'span fetch failed' && /ECONNREFUSED/.test(JSON.stringify(l.error))), 'the cause logged: ECONNREFUSED');
    await fwd.open();
    const got = await readFile(path.join(m.mountpoint, name));
    tt.ok(got.equals(await readFile(path.join(usr.oracle, name))), 'the registry back on its port: the same read succeeds with the right bytes');
    await unmount(m);
  } finally {
    await fwd.close();
    await c.close();
  }
});

t.test('the disk cache survives a remount: no request for spans already fetched', async (tt) => {
  const dir = path.join(work, 'spans');
  const disk1 = await CompressedSpanStore.open({ dir });
  const m1 = await mountLayer(usr, { disk: disk1, readAhead: false });
  const names = (await smallFiles(usr, 65536)).slice(0, 40);
  for (const n of names) await readFile(path.join(m1.mountpoint, n));
  await unmount(m1);
  await disk1.close();

  const disk2 = await CompressedSpanStore.open({ dir });
  tt.ok(disk2.files > 0, `the store holds ${disk2.files} spans after reopening`);
  const m2 = await mountLayer(usr, { disk: disk2, memory: new InflatedSpanCache() });
  proxy.resetStats();
  for (const n of names) {
    const got = await readFile(path.join(m2.mountpoint, n));
    if (!got.equals(await readFile(path.join(usr.oracle, n)))) tt.fail(`${n}: wrong bytes from the disk cache`);
  }
  tt.equal(proxy.stats.requests, 0, 'the second mount read the same files without any request');
  tt.ok(m2.spans.counters.diskHits > 0, `${m2.spans.counters.diskHits} disk hits`);
  await unmount(m2);
  await disk2.close();
});

t.test('unmount with reads in flight completes, and the readers get an error', async (tt) => {
  const m = await mountLayer(usr, { fetchTimeoutMs: 60_000, readAhead: false });
  const names = await smallFiles(usr, 4096);
  proxy.setOptions({ rate: 1, faults: ['stall'] });
  // Readers in child processes: their syscalls block on the mount, not on our event loop.
  const readers = names.slice(0, 4).map(
    (n) =>
      new Promise<number | null>((resolve) => {
        const c = spawn('cat', [path.join(m.mountpoint, n)], { stdio: 'ignore' });
        c.on('close', (code) => resolve(code));
      }),
  );
  await new Promise((r) => setTimeout(r, 500));
  const t0 = Date.now();
  await m.unmount();
  mounted.delete(m);
  tt.ok(Date.now() - t0 < 10_000, `unmount completed in ${Date.now() - t0} ms`);
  const codes = await Promise.all(readers);
  tt.ok(codes.every((c) => c !== 0), `every stalled reader failed (exit codes ${codes.join(',')})`);
  proxy.setOptions({ rate: 0 });
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
  tt.notOk(mountinfo.includes(m.mountpoint), 'the mountpoint is gone from mountinfo');
});

/** The large-directory layer (helpers/layers.ts), pushed and indexed once. */
let largeDir: Promise<{ file: string; desc: Descriptor; index: LayerIndex }> | undefined;
const largeDirPushed = (): Promise<{ file: string; desc: Descriptor; index: LayerIndex }> =>
  (largeDir ??= largeDirLayer(testCacheDir()).then(async (file) => ({ file, ...(await pushBlob(file, true, 1 << 20)) })));

t.test('a directory of several thousand entries: the full listing, as tar -tf has it', async (tt) => {
  const { file, desc, index } = await largeDirPushed();
  // The oracle: GNU tar's own listing of the layer, entries directly in the directory.
  const listing = (await run('tar', ['--quoting-style=literal', '-tf', file], { env: { ...process.env, LC_ALL: 'C' } })).stdout.split('\n');
  const prefix = `./${LARGE_DIR}/`;
  const want = listing.filter((n) => n.startsWith(prefix) && n.length > prefix.length && !n.slice(prefix.length).replace(/\/$/, '').includes('/')).map((n) => n.slice(prefix.length).replace(/\/$/, ''));
  want.sort();
  tt.ok(want.length >= 2000, `the layer's directory has ${want.length} entries`);
  const m = await mountLayer({ file, desc, index, oracle: '' });
  const dir = path.join(m.mountpoint, LARGE_DIR);
  const got = (await readdir(dir)).sort();
  tt.equal(got.length, want.length, `readdir returns ${got.length} names`);
  tt.same(got, want, 'the same names as tar -tf');
  // Another process (ls: getdents64 with its own buffer size, so the listing is read in many
  // pieces at offsets), twice: the same list each time.
  for (const round of [1, 2]) {
    const ls = (await run('ls', ['-1', '-f', '--quoting-style=literal', dir], { env: { ...process.env, LC_ALL: 'C' } })).stdout.split('\n').filter((n) => n !== '' && n !== '.' && n !== '..');
    tt.same(ls.sort(), want, `ls -f (round ${round}): the same names`);
  }
  const st = await stat(path.join(dir, want[want.length - 1]!)).catch((e: NodeJS.ErrnoException) => e.code);
  tt.not(typeof st, 'string', 'the last entry of the listing resolves');
  await unmount(m);
});

t.test('another user reads through allow_other + default_permissions exactly as on the tar -x copy', async (tt) => {
  const { file, desc, index } = await largeDirPushed();
  const oracle = path.join(work, 'oracle-perms');
  await run('mkdir', ['-p', oracle]);
  await run('tar', ['-xpf', file, '--same-owner', '--numeric-owner', '-C', oracle, './private']);
  // The paths to the mount and the oracle must be traversable by that user.
  await chmod(work, 0o755);
  await chmod(oracle, 0o755);
  const m = await mountLayer({ file, desc, index, oracle });
  const asNobody = async (p: string): Promise<{ code: number; out: string; err: string }> => {
    const r = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'sha256sum', p], { okCodes: [0, 1] });
    return { code: r.code, out: r.stdout.split(' ')[0] ?? '', err: r.stderr.replace(p, 'FILE').trim() };
  };
  for (const q of [LARGE_DIR_PERMS.open, LARGE_DIR_PERMS.secret]) {
    const st = await stat(path.join(oracle, q));
    tt.same([st.uid, (st.mode & 0o777).toString(8)], [0, q === LARGE_DIR_PERMS.open ? '644' : '600'], `${q}: root-owned, mode as named (in the oracle)`);
    const mine = await asNobody(path.join(m.mountpoint, q));
    const theirs = await asNobody(path.join(oracle, q));
    tt.same(mine, theirs, `uid 65534 reading ${q}: the same outcome as on the oracle (exit ${theirs.code}${theirs.err === '' ? '' : `, ${theirs.err}`})`);
  }
  tt.equal((await asNobody(path.join(m.mountpoint, LARGE_DIR_PERMS.open))).code, 0, 'the 0644 file reads');
  tt.match((await asNobody(path.join(m.mountpoint, LARGE_DIR_PERMS.secret))).err, /Permission denied/, 'the 0600 one: EACCES');
  const rootRead = await run('sha256sum', [path.join(m.mountpoint, LARGE_DIR_PERMS.secret)]);
  tt.equal(rootRead.stdout.split(' ')[0], (await asNobody(path.join(m.mountpoint, LARGE_DIR_PERMS.open))).out, 'root reads the 0600 one (same content as the 0644 copy)');
  await unmount(m);
});

t.test('mount errors: a non-empty mountpoint', async (tt) => {
  const dir = path.join(work, 'not-empty');
  await run('mkdir', ['-p', dir]);
  await run('touch', [path.join(dir, `f-${randomBytes(2).toString('hex')}`)]);
  await tt.rejects(mountLayer(usr, { mountpoint: dir }), { name: 'FuseError', kind: 'mount-failed', message: /not empty/ });
});

/**
 * A snapshotter root on a file system without space (issue 6, bad input): a real `soci-ts
 * snapshotter` on a small tmpfs of the test's own, filled (every data block, or every inode).
 *
 * - startup on a full root: exit code 1 and one line naming the path and "no space";
 * - Prepare / Commit that run out of space: RESOURCE_EXHAUSTED (containerd's errdefs class
 *   ErrResourceExhausted) with a message naming the cause and the path;
 * - afterwards: no half-written row (List and Stat agree with what succeeded; the database,
 *   read by the test itself, holds exactly those rows), no directory without a row, no
 *   temporary directory, nothing mounted;
 * - Remove still works on the full root (it is how space is given back);
 * - once space is freed, Prepare and Commit work again, the same keys included.
 */
import t, { type Test } from 'tap';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { status, type ServiceError } from '@grpc/grpc-js';
import { SnapshotsClient } from '../../daemon/grpc-api.js';
import { sociTs, startSnapshotter, stopFuseManager, type SnapshotterDaemon } from '../helpers/snapshotter.js';
import { FuseManagerClient } from '../../daemon/fuse-manager-client.js';
import { defaultImages } from '../helpers/images.js';
import { pushIndexed } from '../helpers/remote.js';
import { startRegistry } from '../helpers/registry.js';
import { mountTmpfs, type Tmpfs } from '../helpers/tmpfs.js';

const work = await mkdtemp(path.join(tmpdir(), 'soci-ts-full-root-'));
const daemons: SnapshotterDaemon[] = [];
const filesystems: Tmpfs[] = [];
t.teardown(async () => {
  for (const d of daemons) await d.stop().catch(() => undefined);
  for (const f of filesystems) await f.unmount();
  await rm(work, { recursive: true, force: true });
});

async function tmpfs(name: string, sizeBytes: number, inodes?: number): Promise<Tmpfs> {
  const f = await mountTmpfs(path.join(work, name), { sizeBytes, inodes });
  filesystems.push(f);
  return f;
}

async function start(root: string, address: string): Promise<{ d: SnapshotterDaemon; c: SnapshotsClient }> {
  const d = await startSnapshotter({ root, address, logLevel: 'info', args: ['--metrics-address', ''] });
  daemons.push(d);
  return { d, c: await SnapshotsClient.connect(address) };
}

async function code(p: Promise<unknown>): Promise<{ code: status | 'ok'; details: string }> {
  try {
    await p;
    return { code: 'ok', details: '' };
  } catch (e) {
    return { code: (e as ServiceError).code, details: (e as ServiceError).details };
  }
}

/** The snapshots table as the database file has it (read by the test, not through the daemon). */
function rows(root: string): Map<string, { id: number; kind: string }> {
  const db = new Database(path.join(root, 'metadata.db'), { readonly: true, fileMustExist: true });
  try {
    return new Map((db.prepare('SELECT id, key, kind FROM snapshots').all() as Array<{ id: number; key: string; kind: string }>).map((r) => [r.key, { id: r.id, kind: r.kind }]));
  } finally {
    db.close();
  }
}

async function fuseOrOverlayMountsUnder(dir: string): Promise<string[]> {
  return (await readFile('/proc/self/mountinfo', 'utf8'))
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((m) => m.startsWith(dir + '/'));
}

/** Every kind of consistency the brief asks for, against the daemon's answers and the disk. */
async function consistent(t: Test, c: SnapshotsClient, root: string, want: Map<string, string>, label: string, mounted: string[] = []): Promise<void> {
  const listed = new Map((await c.list()).infos.map((i) => [i.name, i.kind.toLowerCase()]));
  t.same(Object.fromEntries([...listed].sort()), Object.fromEntries([...want].sort()), `${label}: List answers exactly the snapshots that were made`);
  const db = rows(root);
  t.same(Object.fromEntries([...db].map(([k, v]) => [k, v.kind]).sort()), Object.fromEntries([...want].sort()), `${label}: the database holds exactly those rows`);
  const dirs = (await readdir(path.join(root, 'snapshots'))).sort();
  t.same(dirs, [...db.values()].map((r) => String(r.id)).sort(), `${label}: one directory per row under snapshots/, none else (no temporary or orphaned directory)`);
  t.same(await fuseOrOverlayMountsUnder(root), mounted.map((k) => path.join(root, 'snapshots', String(db.get(k)?.id), 'fs')), `${label}: ${mounted.length === 0 ? 'nothing mounted under the root' : `mounted: only the lazy layers of ${mounted.join(', ')}`}`);
}

t.test('startup on a full root fails with exit code 1 naming the path and the lack of space; nothing half-written', async (t) => {
  const fs = await tmpfs('start', 4 << 20);
  const root = path.join(fs.dir, 'root');
  await fs.fill();
  const r = await sociTs(['snapshotter', '--root', root, '--address', path.join(work, 'start.sock'), '--metrics-address', '']);
  t.equal(r.code, 1, `exit code 1 (${r.stderr.trim().split('\n').pop()})`);
  const last = r.stderr.trim().split('\n').pop() ?? '';
  t.match(last, /^soci-ts: /, 'a one-line error');
  t.match(last, /no space left/i, 'saying there is no space');
  t.match(last, new RegExp(root.replace(/[.]/g, '\\.')), 'naming the root');
  await fs.free();
  const { c, d } = await start(root, path.join(work, 'start.sock'));
  await consistent(t, c, root, new Map(), 'after freeing space');
  t.equal((await code(c.prepare('a', ''))).code, 'ok', 'then it works');
  c.close();
  await d.stop();
});

t.test('startup with every inode taken fails the same way', async (t) => {
  const fs = await tmpfs('inodes', 4 << 20, 64);
  const root = path.join(fs.dir, 'root');
  await fs.fill({ blocks: false, inodes: true });
  const r = await sociTs(['snapshotter', '--root', root, '--address', path.join(work, 'inodes.sock'), '--metrics-address', '']);
  const last = r.stderr.trim().split('\n').pop() ?? '';
  t.equal(r.code, 1, `exit code 1 (${last})`);
  t.match(last, /^soci-ts: .*(ENOSPC|no space left)/i, 'a one-line error saying there is no space');
  t.match(last, new RegExp(root.replace(/[.]/g, '\\.')), 'naming the path');
});

t.test('Prepare, Commit and Remove on a root that fills up', async (t) => {
  const fs = await tmpfs('ops', 8 << 20);
  const root = path.join(fs.dir, 'root');
  const address = path.join(work, 'ops.sock');
  let { c, d } = await start(root, address);
  const want = new Map<string, string>();
  // A chain and some active snapshots, made while there is space.
  await c.prepare('base-active', '');
  await c.commit('base', 'base-active');
  want.set('base', 'committed');
  for (let i = 0; i < 5; i++) {
    await c.prepare(`pending-${i}`, 'base');
    want.set(`pending-${i}`, 'active');
  }
  await consistent(t, c, root, want, 'before');
  await fs.fill();

  // Prepare until the metadata cannot grow (the database may have room for a few rows in pages it holds).
  let failed: { code: status | 'ok'; details: string } | undefined;
  let made = 0;
  for (let i = 0; i < 500 && failed === undefined; i++) {
    const r = await code(c.prepare(`full-${i}`, 'base'));
    if (r.code === 'ok') {
      want.set(`full-${i}`, 'active');
      made++;
    } else failed = { ...r, details: `full-${i}: ${r.details}` };
  }
  t.ok(failed !== undefined, `a Prepare fails once the root is full (after ${made} that still fit)`);
  t.equal(failed?.code, status.RESOURCE_EXHAUSTED, `RESOURCE_EXHAUSTED (${failed?.details})`);
  t.match(failed?.details, /no space left/i, 'the message says there is no space');
  t.match(failed?.details, new RegExp(root.replace(/[.]/g, '\\.')), 'and names where');
  await consistent(t, c, root, want, 'after the failed Prepare');
  const failedKey = failed?.details.split(':')[0] ?? '';
  t.equal((await code(c.stat(failedKey))).code, status.NOT_FOUND, `Stat of the key that failed (${failedKey}): NOT_FOUND`);

  // Commit until one fails.
  let cfailed: { code: status | 'ok'; details: string; key: string } | undefined;
  for (let i = 0; i < 5 && cfailed === undefined; i++) {
    const r = await code(c.commit(`pending-${i}-committed`, `pending-${i}`));
    if (r.code === 'ok') {
      want.delete(`pending-${i}`);
      want.set(`pending-${i}-committed`, 'committed');
    } else cfailed = { ...r, key: `pending-${i}` };
  }
  t.ok(cfailed !== undefined, 'a Commit fails on the full root');
  t.equal(cfailed?.code, status.RESOURCE_EXHAUSTED, `RESOURCE_EXHAUSTED (${cfailed?.details})`);
  t.match(cfailed?.details, /no space left/i, 'the message says there is no space');
  await consistent(t, c, root, want, 'after the failed Commit');
  if (cfailed !== undefined) {
    t.equal((await c.stat(cfailed.key)).kind, 'ACTIVE', 'the snapshot whose Commit failed is still active under its key');
    t.equal((await code(c.stat(`${cfailed.key}-committed`))).code, status.NOT_FOUND, 'and its new name does not exist');
  }

  // A restart on the full root: it has its database already, so it starts (reads only).
  c.close();
  await d.stop();
  ({ c, d } = await start(root, address));
  await consistent(t, c, root, want, 'after a restart on the full root');

  // Remove gives space back: it must work on a full root (the metadata's space reserve makes room for it).
  const reserve = path.join(root, 'metadata.reserve');
  t.equal((await stat(reserve)).size, 1 << 20, 'the metadata keeps a 1 MiB space reserve');
  const victim = [...want].find(([k, kind]) => kind === 'active' && k.startsWith('full-'))?.[0] ?? 'pending-4';
  const rr = await code(c.remove(victim));
  t.equal(rr.code, 'ok', `Remove of ${victim} works on the full root (${rr.details})`);
  if (rr.code === 'ok') want.delete(victim);
  t.ok(
    d.logLines().some((l) => l.level === 'warn' && String(l.msg).startsWith('the file system of the metadata database is full: its space reserve was released') && l.bytes === 1 << 20),
    'the snapshotter says it used the space reserve',
  );
  await consistent(t, c, root, want, 'after Remove on the full root');

  // Space again: everything works, the keys that failed included.
  await fs.free();
  t.equal((await code(c.prepare(failedKey, 'base'))).code, 'ok', `Prepare of ${failedKey} works after freeing space`);
  want.set(failedKey, 'active');
  if (cfailed !== undefined) {
    t.equal((await code(c.commit(`${cfailed.key}-committed`, cfailed.key))).code, 'ok', 'the Commit that failed works now');
    want.delete(cfailed.key);
    want.set(`${cfailed.key}-committed`, 'committed');
  }
  await consistent(t, c, root, want, 'after freeing space');
  t.equal((await stat(reserve)).size, 1 << 20, 'the space reserve is made again once there is room');
  c.close();
  await d.stop();
});

t.test('Prepare with every inode taken: RESOURCE_EXHAUSTED, no row, no directory', async (t) => {
  const fs = await tmpfs('ops-inodes', 8 << 20, 400);
  const root = path.join(fs.dir, 'root');
  const address = path.join(work, 'ops-inodes.sock');
  const { c, d } = await start(root, address);
  await c.prepare('base-active', '');
  await c.commit('base', 'base-active');
  const want = new Map([['base', 'committed']]);
  await fs.fill({ blocks: false, inodes: true });
  const r = await code(c.prepare('no-inode', 'base'));
  t.equal(r.code, status.RESOURCE_EXHAUSTED, `RESOURCE_EXHAUSTED (${r.details})`);
  t.match(r.details, /ENOSPC|no space left/i, 'saying there is no space');
  t.match(r.details, new RegExp(path.join(root, 'snapshots').replace(/[.]/g, '\\.')), 'naming the directory it could not make');
  await consistent(t, c, root, want, 'after the failed Prepare');
  await fs.free();
  t.equal((await code(c.prepare('no-inode', 'base'))).code, 'ok', 'works once inodes are free');
  want.set('no-inode', 'active');
  await consistent(t, c, root, want, 'after freeing inodes');
  c.close();
  await d.stop();
});

t.test('a lazy Prepare on a full root: RESOURCE_EXHAUSTED, no FUSE mount leaked; Remove of a lazy snapshot unmounts it', async (t) => {
  const registry = await startRegistry();
  t.teardown(() => registry.stop());
  const { multi } = await defaultImages();
  const { pushed, layer: indexed, layerIndex: n } = await pushIndexed(registry, multi, 'full/multi', path.join(work, 'create-store'));
  const labels = (target: string): Record<string, string> => ({
    'containerd.io/snapshot.ref': target,
    'containerd.io/snapshot/cri.image-ref': pushed.ref,
    'containerd.io/snapshot/cri.manifest-digest': pushed.manifestDigest,
    'containerd.io/snapshot/cri.layer-digest': indexed.digest,
    'containerd.io/snapshot/cri.image-layers': multi.layers.slice(n).map((l) => l.digest).join(','),
  });
  const fs = await tmpfs('lazy', 32 << 20);
  const root = path.join(fs.dir, 'root');
  t.teardown(() => stopFuseManager(root));
  const cfg = path.join(work, 'lazy.toml');
  await writeFile(cfg, 'hosts_dir = ""\n[background_fetch]\nenabled = false\n');
  const address = path.join(work, 'lazy.sock');
  const d = await startSnapshotter({ root, address, logLevel: 'info', args: ['--metrics-address', '', '--config', cfg], startTimeoutMs: 60_000 });
  daemons.push(d);
  const c = await SnapshotsClient.connect(address);
  const t1 = `sha256:${'1'.repeat(64)}`;
  const t2 = `sha256:${'2'.repeat(64)}`;
  t.equal((await code(c.prepare(`extract ${t1}`, '', labels(t1)))).code, status.ALREADY_EXISTS, 'with space: the layer is served lazily');
  const want = new Map([[t1, 'committed']]);
  await consistent(t, c, root, want, 'lazy, with space', [t1]);
  await fs.fill();
  const r = await code(c.prepare(`extract ${t2}`, '', labels(t2)));
  t.equal(r.code, status.RESOURCE_EXHAUSTED, `on the full root: RESOURCE_EXHAUSTED (${r.details})`);
  t.match(r.details, /no space left/i);
  await consistent(t, c, root, want, 'after the failed lazy Prepare', [t1]);
  const mc = await FuseManagerClient.connect(path.join(root, 'fuse-manager.sock'));
  try {
    t.same((await mc.call('list', {})).mounts.map((m) => m.tag), [`extract ${t1}`], 'the FUSE manager holds the one lazy mount, nothing else');
  } finally {
    mc.close();
  }
  t.equal((await code(c.remove(t1))).code, 'ok', 'Remove of the lazy snapshot on the full root');
  want.delete(t1);
  await consistent(t, c, root, want, 'after Remove of the lazy snapshot on the full root');
  await fs.free();
  t.equal((await code(c.prepare(`extract ${t2}`, '', labels(t2)))).code, status.ALREADY_EXISTS, 'with space again: served lazily');
  want.set(t2, 'committed');
  await consistent(t, c, root, want, 'lazy, after freeing space', [t2]);
  await c.remove(t2);
  c.close();
  await d.stop();
});

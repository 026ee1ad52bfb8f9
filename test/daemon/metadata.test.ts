/**
 * The snapshot metadata store on a real SQLite file: containerd's storage semantics (kinds,
 * parents that must be committed, commit under a new name, removal blocked by children,
 * label-only updates, filters), the error classes and gRPC codes of each refusal, parent
 * chains, persistence and never-reused ids across reopen, failed operations leaving the
 * database unchanged, and a writer process SIGKILLed mid-stream leaving a consistent database
 * that holds every operation it reported done (checked with SQLite's own integrity and foreign
 * key checks and against a model of the operations).
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import { status } from '@grpc/grpc-js';
import { SnapshotterError, type ErrorKind } from '../../daemon/errdefs.js';
import { MAX_LABEL_BYTES, MetadataStore, type SnapshotRecord } from '../../daemon/metadata.js';
import { applyOp, modelAfter, planOps, type Model } from '../helpers/metadata-ops.js';

async function tempStore(t: Test): Promise<{ dir: string; store: MetadataStore }> {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-metadata-'));
  const store = MetadataStore.open(dir);
  t.teardown(async () => {
    store.close();
    await rm(dir, { recursive: true, force: true });
  });
  return { dir, store };
}

/** Asserts `fn` throws a SnapshotterError of `kind` whose message matches `re`. */
function refuses(t: Test, fn: () => unknown, kind: ErrorKind, re: RegExp, what: string): void {
  try {
    fn();
    t.fail(`${what}: expected ${kind}, but it succeeded`);
  } catch (e) {
    if (!(e instanceof SnapshotterError)) {
      t.fail(`${what}: expected a SnapshotterError, got ${String(e)}`);
      return;
    }
    t.equal(e.kind, kind, `${what}: ${kind}`);
    t.match(e.message, re, `${what}: message ${JSON.stringify(e.message)}`);
  }
}

/** Everything observable, to compare before/after a refused operation. */
function dump(store: MetadataStore): unknown {
  return { list: store.list(), ids: [...store.idMap()], totals: store.totals() };
}

t.test('prepare, view, commit: kinds, parents and refusals as containerd storage', async (t) => {
  const { store } = await tempStore(t);
  const a = store.create('active', 'a', '', { labels: { x: '1' } });
  t.same(a.parentIds, [], 'no parent: empty chain');
  t.equal(a.kind, 'active');
  const sa = store.stat('a');
  t.equal(sa.kind, 'active');
  t.equal(sa.parent, '');
  t.same(sa.labels, { x: '1' });

  refuses(t, () => store.create('active', 'b', 'a'), 'InvalidArgument', /^parent "a" is not committed snapshot: invalid argument$/, 'parent is active');
  refuses(t, () => store.create('view', 'b', 'nope'), 'NotFound', /^missing parent "nope": not found$/, 'missing parent');
  refuses(t, () => store.create('active', 'a', ''), 'AlreadyExists', /^snapshot a: already exists$/, 'key taken');
  refuses(t, () => store.create('active', '', ''), 'InvalidArgument', /must not be empty/, 'empty key');
  refuses(t, () => store.create('committed', 'z', ''), 'InvalidArgument', /only snapshots of type Active or View can be created/, 'committed cannot be created');

  const before = store.stat('a');
  const id = store.commit('a', 'A', { labels: { y: '2' }, usage: { size: 8192, inodes: 3 } });
  t.equal(id, a.id, 'commit keeps the id');
  refuses(t, () => store.stat('a'), 'NotFound', /^snapshot does not exist: not found$/, 'the active key is gone');
  const A = store.stat('A');
  t.equal(A.kind, 'committed');
  t.same(A.labels, { y: '2' }, 'labels are the commit\'s, not inherited');
  t.same(A.usage, { size: 8192, inodes: 3 }, 'usage recorded');
  t.ok(A.created.seconds * 1e9 + A.created.nanos >= before.created.seconds * 1e9 + before.created.nanos, 'created is the commit time');

  const b = store.create('active', 'b', 'A');
  t.same(b.parentIds, [A.id], 'chain of one');
  const v = store.create('view', 'v', 'A');
  t.equal(v.kind, 'view');
  store.create('active', 'c', '');
  refuses(t, () => store.commit('b', 'A'), 'AlreadyExists', /^committed snapshot A: already exists$/, 'commit to a taken name');
  refuses(t, () => store.commit('b', 'c'), 'AlreadyExists', /^committed snapshot c: already exists$/, 'names and keys share one namespace');
  refuses(t, () => store.commit('nope', 'N'), 'NotFound', /^failed to get active snapshot "nope": not found$/, 'commit of a missing key');
  refuses(t, () => store.commit('v', 'N'), 'FailedPrecondition', /^snapshot "v" is not active: failed precondition$/, 'commit of a view');
  refuses(t, () => store.commit('A', 'N'), 'FailedPrecondition', /is not active/, 'commit of a committed snapshot');
  refuses(t, () => store.mountable('A'), 'FailedPrecondition', /^requested snapshot A not active or view: failed precondition$/, 'mounts of a committed snapshot');
  refuses(t, () => store.mountable('nope'), 'NotFound', /^snapshot does not exist: not found$/, 'mounts of a missing key');

  // gRPC codes of the classes (containerd's errdefs.ToGRPC).
  const codes: [ErrorKind, number][] = [
    ['NotFound', status.NOT_FOUND],
    ['AlreadyExists', status.ALREADY_EXISTS],
    ['FailedPrecondition', status.FAILED_PRECONDITION],
    ['InvalidArgument', status.INVALID_ARGUMENT],
    ['Unavailable', status.UNAVAILABLE],
    ['NotImplemented', status.UNIMPLEMENTED],
  ];
  for (const [kind, code] of codes) t.equal(new SnapshotterError(kind, 'x').grpcCode, code, `${kind} → gRPC ${status[code]}`);
});

t.test('parent chains: nearest first, through many levels', async (t) => {
  const { store } = await tempStore(t);
  const ids: string[] = [];
  let parent = '';
  for (let i = 0; i < 120; i++) {
    const s = store.create('active', `tmp-${i}`, parent);
    t.same(s.parentIds, [...ids].reverse(), `level ${i}: the chain is the committed ids, nearest first`);
    store.commit(`tmp-${i}`, `layer-${i}`);
    ids.push(s.id);
    parent = `layer-${i}`;
  }
  const top = store.create('view', 'top-view', parent);
  t.equal(top.parentIds.length, 120);
  t.equal(top.parentIds[0], ids[119]);
  t.equal(top.parentIds[119], ids[0]);
  t.same(store.mountable('top-view'), top, 'mountable() answers the same chain later');
});

t.test('remove: blocked by children, then bottom-up', async (t) => {
  const { store } = await tempStore(t);
  store.create('active', 'a', '');
  store.commit('a', 'A');
  store.create('active', 'b', 'A');
  store.commit('b', 'B');
  store.create('view', 'v', 'B');
  const pre = dump(store);
  refuses(t, () => store.remove('A'), 'FailedPrecondition', /^cannot remove snapshot with child: failed precondition$/, 'remove A (child B)');
  refuses(t, () => store.remove('B'), 'FailedPrecondition', /cannot remove snapshot with child/, 'remove B (child view v)');
  refuses(t, () => store.remove('nope'), 'NotFound', /^snapshot nope: not found$/, 'remove a missing key');
  t.same(dump(store), pre, 'refused removals change nothing');
  t.equal(store.remove('v').kind, 'view');
  t.equal(store.remove('B').kind, 'committed');
  t.equal(store.remove('A').kind, 'committed');
  t.same(store.list(), [], 'all gone');
});

t.test('update: labels only, with containerd field paths', async (t) => {
  const { store } = await tempStore(t);
  store.create('active', 'a', '', { labels: { keep: 'k', drop: 'd' } });
  const before = store.stat('a');
  await new Promise((r) => setTimeout(r, 5));

  let u = store.update('a', { add: 'new', ignored: 'x' }, ['labels.add']);
  t.same(u.labels, { add: 'new', drop: 'd', keep: 'k' }, 'labels.KEY sets that one label only');
  t.same(u.created, before.created, 'created unchanged');
  t.ok(u.updated.seconds * 1e9 + u.updated.nanos > before.updated.seconds * 1e9 + before.updated.nanos, 'updated moves');

  u = store.update('a', {}, ['labels.drop']);
  t.same(u.labels, { add: 'new', keep: 'k' }, 'labels.KEY with no value removes the label');

  u = store.update('a', { only: '1' }, ['labels']);
  t.same(u.labels, { only: '1' }, '`labels` replaces all labels');

  u = store.update('a', { whole: '2', empty: '' }, []);
  t.same(u.labels, { whole: '2' }, 'no paths: all mutable fields (the labels); empty values are not stored');

  const pre = dump(store);
  for (const path of ['parent', 'kind', 'name', 'created_at', 'labelsx']) {
    refuses(t, () => store.update('a', { z: '1' }, ['labels.z', path]), 'InvalidArgument', new RegExp(`^cannot update "${path}" field on snapshot "a": invalid argument$`), `path ${path}`);
  }
  t.same(dump(store), pre, 'a refused update changes nothing, not even the labels named before the bad path');
  refuses(t, () => store.update('nope', {}, []), 'NotFound', /^snapshot does not exist: not found$/, 'update of a missing snapshot');
});

t.test('labels: containerd size limit, empty values dropped', async (t) => {
  const { store } = await tempStore(t);
  const k = 'containerd.io/snapshot/x';
  store.create('active', 'fits', '', { labels: { [k]: 'v'.repeat(MAX_LABEL_BYTES - k.length) } });
  t.equal(store.stat('fits').labels[k]?.length, MAX_LABEL_BYTES - k.length, 'key+value of exactly 4096 bytes is accepted');
  const pre = dump(store);
  refuses(t, () => store.create('active', 'big', '', { labels: { [k]: 'v'.repeat(MAX_LABEL_BYTES - k.length + 1) } }), 'InvalidArgument', /greater than maximum size \(4096 bytes\)/, '4097 bytes');
  refuses(t, () => store.create('active', 'big', '', { labels: { [k]: 'é'.repeat(2100) } }), 'InvalidArgument', /greater than maximum size/, 'the limit counts UTF-8 bytes, not characters');
  refuses(t, () => store.create('active', 'nokey', '', { labels: { '': 'v' } }), 'InvalidArgument', /label key must not be empty/, 'empty label key');
  t.same(dump(store), pre, 'refused creations leave nothing behind');
  store.create('active', 'e', '', { labels: { a: '', b: 'x' } });
  t.same(store.stat('e').labels, { b: 'x' }, 'empty label values are not stored');
});

t.test('list with containerd filters', async (t) => {
  const { store } = await tempStore(t);
  store.create('active', 'base-tmp', '', { labels: { 'containerd.io/snapshot.ref': 'sha256:aa' } });
  store.commit('base-tmp', 'sha256:base', { labels: { 'a.b': 'dotted', team: 'x' } });
  store.create('active', 'work', 'sha256:base', { labels: { team: 'y' } });
  store.create('view', 'look', 'sha256:base');
  store.create('active', 'lonely', '');
  const names = (filters: string[]): string[] => store.list(filters).map((r: SnapshotRecord) => r.name);

  t.same(names([]), ['lonely', 'look', 'sha256:base', 'work'], 'no filter: everything, ordered by name');
  t.same(names(['kind==committed']), ['sha256:base']);
  t.same(names(['kind==active']), ['lonely', 'work']);
  t.same(names(['kind!=active']), ['look', 'sha256:base']);
  t.same(names(['parent==sha256:base']), ['look', 'work'], 'value with a colon, unquoted');
  t.same(names(['parent=="sha256:base",kind==view']), ['look'], 'comma: all selectors must match; quoted value');
  t.same(names(['kind==view', 'name==lonely']), ['lonely', 'look'], 'several filters: any may match');
  t.same(names(['name~=^sha256:']), ['sha256:base'], 'regular expression');
  t.same(names(['name~=/o.e/']), ['lonely'], 'regular expression in /…/');
  t.same(names(['labels.team']), ['sha256:base', 'work'], 'presence of a label');
  t.same(names(['labels.team==y']), ['work']);
  t.same(names(['labels."a.b"==dotted']), ['sha256:base'], 'quoted label key with a dot');
  t.same(names(['labels.a.b==dotted']), ['sha256:base'], 'dotted fieldpath joins into the label key');
  t.same(names(['labels.nothing!=""']), [], '!= with an empty value: absent counts as empty, as containerd');
  t.same(names(['labels.team!=x']), ['lonely', 'look', 'work'], '!=: snapshots without the label match too');
  t.same(names(['  kind == committed  ']), ['sha256:base'], 'spaces around tokens');
  for (const bad of ['kind==', 'kind=committed', '==x', 'kind==a,', 'labels."unterminated', 'name~=[']) {
    refuses(t, () => store.list([bad]), 'InvalidArgument', /^filters: parse error/, `syntax error ${JSON.stringify(bad)}`);
  }
});

t.test('persistence: reopen keeps everything; ids are never reused', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-metadata-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  let store = MetadataStore.open(dir);
  store.create('active', 'a', '', { labels: { l: '1' } });
  store.commit('a', 'A', { usage: { size: 4096, inodes: 1 } });
  const b = store.create('active', 'b', 'A');
  const before = store.list();
  store.close();

  store = MetadataStore.open(dir);
  t.same(store.list(), before, 'same records after reopen');
  t.same(store.mountable('b'), b, 'same chain after reopen');
  store.remove('b');
  store.close();

  store = MetadataStore.open(dir);
  const c = store.create('active', 'c', 'A');
  t.ok(Number(c.id) > Number(b.id), `the id of removed b (${b.id}) is not handed out again (got ${c.id})`);
  const reserved = store.reserveId();
  t.ok(Number(reserved) > Number(c.id), 'reserveId continues the sequence');
  t.equal(store.hasId(reserved), false, 'a reserved id is no snapshot');
  t.equal(store.hasId(c.id), true);
  t.equal(store.hasId('new-5'), false, 'non-numeric names are never ids');
  refuses(t, () => store.create('active', 'd', '', { id: c.id }), 'AlreadyExists', /snapshot id/, 'an id in use cannot be given to a new snapshot');
  store.close();

  // A database written by a newer schema is refused, not misread.
  const raw = new Database(join(dir, 'metadata.db'));
  raw.pragma('user_version = 99');
  raw.close();
  t.throws(() => MetadataStore.open(dir), /schema version 99, newer than this soci-ts supports/, 'newer schema refused');
});

t.test('totals per kind', async (t) => {
  const { store } = await tempStore(t);
  store.create('active', 'a', '');
  store.commit('a', 'A', { usage: { size: 100, inodes: 2 } });
  store.create('active', 'b', 'A');
  store.commit('b', 'B', { usage: { size: 50, inodes: 1 } });
  store.create('active', 'x', 'B');
  store.create('view', 'y', 'B');
  t.same(store.totals(), {
    active: { count: 1, size: 0, inodes: 0 },
    committed: { count: 2, size: 150, inodes: 3 },
    view: { count: 1, size: 0, inodes: 0 },
  });
});

const METADATA_JS = fileURLToPath(new URL('../../daemon/metadata.js', import.meta.url));
const OPS_JS = fileURLToPath(new URL('../helpers/metadata-ops.js', import.meta.url));

/**
 * Runs the op stream in a child that appends one line per completed op to a progress file
 * (a synchronous write to a regular file: once it returns, the line survives the process);
 * SIGKILLs it, while it is still working, as soon as `killAfter` lines are there. Resolves
 * with the number of lines (operations reported done).
 */
async function crashWriter(dir: string, seed: number, total: number, killAfter: number): Promise<number> {
  const progress = join(dir, 'progress');
  const code = `
    const { openSync, writeSync } = await import('node:fs');
    const { MetadataStore } = await import(${JSON.stringify(METADATA_JS)});
    const { planOps } = await import(${JSON.stringify(OPS_JS)});
    const ops = planOps(${seed}, ${total});
    const fd = openSync(${JSON.stringify(progress)}, 'a');
    const store = MetadataStore.open(${JSON.stringify(dir)});
    let i = 0;
    for (const o of ops) {
      if (o.op === 'prepare') store.create('active', o.key, o.parent, { labels: o.labels });
      else if (o.op === 'view') store.create('view', o.key, o.parent);
      else if (o.op === 'commit') store.commit(o.key, o.name, { labels: o.labels, usage: { size: 4096, inodes: 1 } });
      else if (o.op === 'remove') store.remove(o.key);
      else store.update(o.key, o.labels, ['labels']);
      writeSync(fd, 'done ' + (i++) + '\\n');
    }
    process.stderr.write('finished all operations\\n');
  `;
  await writeFile(progress, '');
  const child = spawn(process.execPath, ['--input-type=module', '-e', code], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const closed = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('close', (c, sig) => resolve({ code: c, signal: sig })));
  let exited = false;
  void closed.then(() => (exited = true));
  const lines = async (): Promise<number> => (await readFile(progress, 'utf8')).split('\n').length - 1;
  while (!exited && (await lines()) < killAfter) await new Promise((r) => setTimeout(r, 1));
  child.kill('SIGKILL');
  const end = await closed;
  if (end.signal !== 'SIGKILL') throw new Error(`writer ended with code ${String(end.code)} before it was killed: ${stderr}`);
  return lines();
}

function modelOf(store: MetadataStore): Model {
  return new Map(store.list().map((r) => [r.name, { kind: r.kind, parent: r.parent, labels: r.labels }]));
}

t.test('a writer SIGKILLed mid-stream leaves a consistent database with every reported operation', async (t) => {
  for (const [seed, killAfter] of [
    [11, 60],
    [23, 250],
    [37, 700],
  ] as const) {
    const dir = await mkdtemp(join(tmpdir(), 'soci-ts-metadata-crash-'));
    t.teardown(() => rm(dir, { recursive: true, force: true }));
    const total = 50000;
    const reported = await crashWriter(dir, seed, total, killAfter);
    t.ok(reported >= killAfter && reported < total, `seed ${seed}: killed after ${reported} of ${total} operations`);

    const raw = new Database(join(dir, 'metadata.db'));
    t.equal(raw.pragma('integrity_check', { simple: true }), 'ok', `seed ${seed}: integrity_check`);
    t.same(raw.pragma('foreign_key_check'), [], `seed ${seed}: foreign_key_check finds no dangling parent`);
    const badParents = raw
      .prepare("SELECT c.key FROM snapshots c JOIN snapshots p ON p.id = c.parent_id WHERE p.kind <> 'committed'")
      .all();
    t.same(badParents, [], `seed ${seed}: every parent is committed`);
    raw.close();

    const store = MetadataStore.open(dir);
    const got = modelOf(store);
    const ops = planOps(seed, total);
    // The op in flight at the kill either committed entirely or not at all.
    const exact = modelAfter(ops, reported);
    const withNext = modelAfter(ops, reported + 1);
    const matches = (m: Model): boolean => JSON.stringify([...m].sort()) === JSON.stringify([...got].sort());
    let actual = -1; // for the failure message: how many operations the database does hold
    if (!matches(exact) && !matches(withNext)) {
      const m: Model = new Map();
      for (let n = 0; n <= total && actual < 0; n++) {
        if (matches(m)) actual = n;
        else if (n < total) applyOp(m, ops[n]);
      }
    }
    t.ok(matches(exact) || matches(withNext), `seed ${seed}: the database holds the ${reported} reported operations (or one more), nothing half-done`, { actual });
    store.close();
  }
});

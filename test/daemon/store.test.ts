/**
 * The artifact store on a real file system: content-addressed blobs (checked against
 * `sha256sum`), corrupt-blob detection, index records and prefix lookup, garbage collection
 * that keeps shared zTOCs, crash leftovers, the lock, concurrent writer processes, and an
 * unwritable root seen by a non-root user.
 */
import t, { type Test } from 'tap';
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { chmod, mkdir, mkdtemp, open, readdir, readFile, rm, stat, truncate, utimes, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import {
  buildSociIndex,
  buildZtocFromFile,
  EMPTY_CONFIG_BYTES,
  EMPTY_CONFIG_DIGEST,
  encodeZtoc,
  MEDIA_TYPE_OCI_MANIFEST,
  MEDIA_TYPE_SOCI_INDEX_V1,
  MEDIA_TYPE_SOCI_INDEX_V2,
  sha256Digest,
  type SerializedIndex,
  type SociIndexVersion,
} from '../../ztoc/index.js';
import { ArtifactStore, StoreError, type IndexRecord, type NewIndexRecord } from '../../daemon/store.js';
import { walkFiles } from '../helpers/real-files.js';

const run = promisify(execFile);
const STORE_JS = fileURLToPath(new URL('../../daemon/store.js', import.meta.url));
const LAYER_MEDIA_TYPE = 'application/vnd.oci.image.layer.v1.tar+gzip';
const PLATFORM = { architecture: 'amd64', os: 'linux' };

interface Layer {
  digest: string;
  size: number;
  ztocPath: string;
  ztocBytes: Uint8Array;
  ztocDigest: string;
}

let dir: string;
const layers: Layer[] = [];
let n = 0;

/** A fresh store root under the test directory. */
function freshRoot(): string {
  return join(dir, `store-${n++}`, 'root');
}

t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'soci-ts-store-'));
  // Real layers from this machine's docs, and their real zTOCs.
  for (const [i, docs] of [['tar', 'gzip'], ['coreutils'], ['bash'], ['apt']].entries()) {
    const layerPath = join(dir, `layer${i}.tar.gz`);
    const paths = docs.map((d) => `usr/share/doc/${d}`).join(' ');
    await run('sh', ['-c', `tar -C / --sort=name -cf - ${paths} | gzip -6 > '${layerPath}'`]);
    const layerBytes = await readFile(layerPath);
    const ztocBytes = encodeZtoc(await buildZtocFromFile(layerPath, { spanSize: 64 << 10 }));
    const ztocPath = join(dir, `layer${i}.ztoc`);
    await writeFile(ztocPath, ztocBytes);
    layers.push({ digest: sha256Digest(layerBytes), size: layerBytes.length, ztocPath, ztocBytes, ztocDigest: sha256Digest(ztocBytes) });
  }
});
t.teardown(() => rm(dir, { recursive: true, force: true }));

const imageManifestDigest = (name: string): string => sha256Digest(new TextEncoder().encode(`image manifest ${name}`));

function makeIndex(version: SociIndexVersion, which: number[], image: string, tool = 'soci-ts test'): SerializedIndex {
  return buildSociIndex({
    version,
    layers: which.map((i) => ({
      layer: { mediaType: LAYER_MEDIA_TYPE, digest: layers[i].digest, size: layers[i].size },
      ztoc: { digest: layers[i].ztocDigest, size: layers[i].ztocBytes.length },
      spanSize: 64 << 10,
    })),
    subject: version === 'v1' ? { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: imageManifestDigest(image), size: 1234 } : undefined,
    buildToolIdentifier: tool,
  });
}

function recordOf(index: SerializedIndex, version: SociIndexVersion, which: number[], image: string, createdAt?: string): NewIndexRecord {
  return {
    digest: index.descriptor.digest,
    size: index.descriptor.size,
    format: version,
    imageRef: `registry.example/${image}:latest`,
    imageManifestDigest: imageManifestDigest(image),
    platform: PLATFORM,
    ...(createdAt ? { createdAt } : {}),
    ztocs: which.map((i) => ({ layerDigest: layers[i].digest, ztocDigest: layers[i].ztocDigest, ztocSize: layers[i].ztocBytes.length })),
  };
}

/** Put an index's manifest and zTOCs, then record it. */
async function addIndex(store: ArtifactStore, version: SociIndexVersion, which: number[], image: string, createdAt?: string) {
  const index = makeIndex(version, which, image);
  await store.putBlob(index.bytes, index.descriptor.digest);
  for (const i of which) await store.putBlob(layers[i].ztocBytes);
  const record = await store.addIndexRecord(recordOf(index, version, which, image, createdAt));
  return { index, record };
}

async function storeError(p: Promise<unknown>): Promise<StoreError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof StoreError) return err;
    throw err;
  }
  throw new Error('expected a StoreError, got success');
}

/** Every blob file's name must be the sha256 of its content, by coreutils' sha256sum. */
async function checkBlobsWithSha256sum(t: Test, root: string): Promise<string[]> {
  const blobDir = join(root, 'content', 'blobs', 'sha256');
  const names = (await readdir(blobDir)).sort();
  if (names.length === 0) return names;
  const { stdout } = await run('sha256sum', names, { cwd: blobDir, maxBuffer: 1 << 24 });
  const bad = stdout
    .trim()
    .split('\n')
    .map((line) => /^([0-9a-f]{64}) [ *](.+)$/.exec(line))
    .filter((m) => !m || m[1] !== m[2]);
  t.same(bad, [], `sha256sum: all ${names.length} blob names equal their content hash`);
  return names;
}

/** Files anywhere under root whose name marks them as temp files. */
async function tempFiles(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string): Promise<void> => {
    for (const e of await readdir(d, { withFileTypes: true })) {
      if (e.isDirectory()) await walk(join(d, e.name));
      else if (e.name.includes('.tmp-')) out.push(join(d, e.name));
    }
  };
  await walk(root);
  return out;
}

function childEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  return env;
}

function runNode(args: string[], opts: { prefix?: string[]; cwd?: string } = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const [cmd, ...pre] = opts.prefix ?? [];
    const child = spawn(cmd ?? process.execPath, [...pre, ...(cmd ? [process.execPath] : []), ...args], {
      env: childEnv(),
      cwd: opts.cwd ?? '/',
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** The pid of a process that has exited. */
function deadPid(): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn('true');
    child.on('error', reject);
    child.on('close', () => resolve(child.pid as number));
  });
}

t.test('a new store: root created 0700, an OCI layout, content-addressed blobs', async (t) => {
  const root = freshRoot();
  const store = new ArtifactStore({ root });
  const put = await store.putBlob(layers[0].ztocBytes);
  t.equal(put.digest, layers[0].ztocDigest);
  t.equal(put.size, layers[0].ztocBytes.length);
  t.equal((await stat(root)).mode & 0o777, 0o700, 'root is 0700');
  t.equal(await readFile(join(root, 'content', 'oci-layout'), 'utf8'), '{"imageLayoutVersion":"1.0.0"}');
  t.equal(store.blobPath(put.digest), join(root, 'content', 'blobs', 'sha256', put.digest.slice(7)));
  t.ok(await store.hasBlob(put.digest));
  t.notOk(await store.hasBlob(layers[1].ztocDigest));
  t.equal(await store.blobSize(put.digest), layers[0].ztocBytes.length);
  t.same(Buffer.from(await store.readBlob(put.digest)), Buffer.from(layers[0].ztocBytes));
  const fh = await store.openBlob(put.digest);
  try {
    const head = Buffer.alloc(16);
    await fh.read(head, 0, 16, 0);
    t.same(head, Buffer.from(layers[0].ztocBytes.subarray(0, 16)), 'openBlob gives random access');
  } finally {
    await fh.close();
  }
  t.match(await storeError(store.openBlob(layers[1].ztocDigest)), { kind: 'not-found' });
  t.match(await storeError(store.blobSize(layers[1].ztocDigest)), { kind: 'not-found' });
  t.match(await storeError(store.hasBlob('sha256:abc')), { kind: 'invalid' });
  t.same(await checkBlobsWithSha256sum(t, root), [put.digest.slice(7)]);

  // An existing root keeps its mode.
  const existing = join(dir, 'existing-root');
  await mkdir(existing, { mode: 0o755 });
  await chmod(existing, 0o755);
  await new ArtifactStore({ root: existing }).listIndexRecords();
  t.equal((await stat(existing)).mode & 0o777, 0o755, 'an existing root keeps its mode');
});

t.test('putBlob and putBlobFromFile are idempotent and check the expected digest', async (t) => {
  const root = freshRoot();
  const store = new ArtifactStore({ root });
  const bytes = layers[1].ztocBytes;
  const a = await store.putBlob(bytes, layers[1].ztocDigest);
  const b = await store.putBlob(bytes);
  t.same(a, b, 'same result twice');

  const wrong = await storeError(store.putBlob(bytes, layers[2].ztocDigest));
  t.equal(wrong.kind, 'digest-mismatch');
  t.match(wrong.message, layers[1].ztocDigest, 'names the actual digest');
  t.notOk(await store.hasBlob(layers[2].ztocDigest), 'nothing stored under the wrong digest');

  const f1 = await store.putBlobFromFile(layers[2].ztocPath);
  t.same(f1, { digest: layers[2].ztocDigest, size: layers[2].ztocBytes.length });
  const f2 = await store.putBlobFromFile(layers[2].ztocPath, layers[2].ztocDigest);
  t.same(f2, f1, 'again, with the digest');
  const fileWrong = await storeError(store.putBlobFromFile(layers[3].ztocPath, layers[0].ztocDigest));
  t.equal(fileWrong.kind, 'digest-mismatch');
  t.equal(fileWrong.subject, layers[3].ztocPath, 'names the file');
  t.notOk(await store.hasBlob(layers[0].ztocDigest));
  t.notOk(await store.hasBlob(layers[3].ztocDigest), 'a mismatching upload is not kept under its real digest either');
  const missing = await storeError(store.putBlobFromFile(join(dir, 'no-such-file')));
  t.equal(missing.kind, 'not-found');
  t.same(await tempFiles(root), [], 'no temp files left by failed puts');
  await checkBlobsWithSha256sum(t, root);

  // A damaged blob is replaced by a put, not kept because the name exists.
  await truncate(store.blobPath(layers[1].ztocDigest), 10);
  await store.putBlob(bytes);
  t.same(Buffer.from(await store.readBlob(layers[1].ztocDigest)), Buffer.from(bytes), 'put repairs a damaged blob');
  await truncate(store.blobPath(layers[2].ztocDigest), 10);
  await store.putBlobFromFile(layers[2].ztocPath, layers[2].ztocDigest);
  t.equal(await store.blobSize(layers[2].ztocDigest), layers[2].ztocBytes.length, 'putBlobFromFile repairs too');
});

t.test('readBlob detects truncated and altered blobs, names them and removes them', async (t) => {
  const root = freshRoot();
  const store = new ArtifactStore({ root });
  const { digest, size } = await store.putBlob(layers[0].ztocBytes);
  const path = store.blobPath(digest);

  await truncate(path, size - 100);
  const cut = await storeError(store.readBlob(digest, { size }));
  t.equal(cut.kind, 'corrupt');
  t.equal(cut.subject, path, 'names the blob path');
  t.match(cut.message, `truncated: ${size - 100} of ${size} bytes`);
  t.notOk(await store.hasBlob(digest), 'the corrupt file was removed');
  t.match(await storeError(store.readBlob(digest)), { kind: 'not-found' }, 'then it reads as missing');

  await store.putBlob(layers[0].ztocBytes);
  t.equal((await store.readBlob(digest)).length, size, 'put again, it reads');

  const fh = await open(path, 'r+');
  const one = Buffer.alloc(1);
  await fh.read(one, 0, 1, 1000);
  one[0] ^= 0x01;
  await fh.write(one, 0, 1, 1000);
  await fh.close();
  const flipped = await storeError(store.readBlob(digest));
  t.equal(flipped.kind, 'corrupt');
  t.match(flipped.message, /has digest sha256:[0-9a-f]{64}, not the one in its name/);
  t.notOk(await store.hasBlob(digest), 'removed');

  await store.putBlob(layers[0].ztocBytes);
  const wrongSize = await storeError(store.readBlob(digest, { size: size + 1 }));
  t.equal(wrongSize.kind, 'invalid', 'a wrong descriptor size is the caller’s problem');
  t.ok(await store.hasBlob(digest), 'and does not remove a good blob');
});

t.test('index records: add, list newest first with filters, get by digest, hex or prefix', async (t) => {
  const root = freshRoot();
  const store = new ArtifactStore({ root });
  await store.putBlob(EMPTY_CONFIG_BYTES, EMPTY_CONFIG_DIGEST);
  const a = await addIndex(store, 'v1', [0, 1], 'alpha', '2024-05-01T10:00:00Z');
  const b = await addIndex(store, 'v2', [2], 'beta', '2024-05-02T10:00:00.000Z');
  const c = await addIndex(store, 'v1', [3], 'gamma');

  t.same(a.record, {
    digest: a.index.descriptor.digest,
    size: a.index.descriptor.size,
    mediaType: MEDIA_TYPE_OCI_MANIFEST,
    artifactType: MEDIA_TYPE_SOCI_INDEX_V1,
    format: 'v1',
    imageRef: 'registry.example/alpha:latest',
    imageManifestDigest: imageManifestDigest('alpha'),
    platform: PLATFORM,
    createdAt: '2024-05-01T10:00:00.000Z',
    ztocs: [0, 1].map((i) => ({ layerDigest: layers[i].digest, ztocDigest: layers[i].ztocDigest, ztocSize: layers[i].ztocBytes.length })),
  });
  t.equal(b.record.artifactType, MEDIA_TYPE_SOCI_INDEX_V2);
  const onDisk = JSON.parse(await readFile(join(root, 'indexes', `${a.index.descriptor.digest.slice(7)}.json`), 'utf8')) as IndexRecord;
  t.same(onDisk, a.record, 'the record file is the record, as JSON');

  const all = await store.listIndexRecords();
  t.same(
    all.map((r) => r.imageRef),
    ['registry.example/gamma:latest', 'registry.example/beta:latest', 'registry.example/alpha:latest'],
    'newest first',
  );
  t.same((await store.listIndexRecords({ imageRef: 'registry.example/beta:latest' })).map((r) => r.digest), [b.record.digest]);
  t.same((await store.listIndexRecords({ imageManifestDigest: imageManifestDigest('alpha') })).map((r) => r.digest), [a.record.digest]);
  t.same(await store.listIndexRecords({ imageRef: 'nope' }), []);

  const hex = a.record.digest.slice(7);
  for (const ref of [a.record.digest, hex, hex.slice(0, 12), `sha256:${hex.slice(0, 8)}`, hex.toUpperCase().slice(0, 10)]) {
    t.equal((await store.getIndexRecord(ref)).digest, a.record.digest, `found by ${ref}`);
  }
  t.match(await storeError(store.getIndexRecord(hex.slice(0, 5))), { kind: 'invalid' }, 'a prefix under 6 digits');
  t.match(await storeError(store.getIndexRecord('not-a-digest')), { kind: 'invalid' });
  const absent = (hex[0] === '0' ? '1' : '0').repeat(64);
  t.match(await storeError(store.getIndexRecord(absent)), { kind: 'not-found' });

  // Two indexes whose digests share their first 6 hex digits: found by trying build tool names.
  const seen = new Map<string, number>();
  let pair: [number, number] | undefined;
  for (let i = 0; i < 200_000 && !pair; i++) {
    const p = makeIndex('v1', [0], 'delta', `tool ${i}`).descriptor.digest.slice(7, 13);
    const j = seen.get(p);
    if (j === undefined) seen.set(p, i);
    else pair = [j, i];
  }
  if (!pair) throw new Error('no 6-digit collision found');
  const twins = pair.map((i) => makeIndex('v1', [0], 'delta', `tool ${i}`));
  for (const ix of twins) {
    await store.putBlob(ix.bytes);
    await store.addIndexRecord(recordOf(ix, 'v1', [0], 'delta'));
  }
  const prefix = twins[0].descriptor.digest.slice(7, 13);
  const amb = await storeError(store.getIndexRecord(prefix));
  t.equal(amb.kind, 'ambiguous');
  for (const ix of twins) t.match(amb.message, ix.descriptor.digest, 'lists each candidate');
  const removeAmb = await storeError(store.removeIndex(prefix));
  t.equal(removeAmb.kind, 'ambiguous', 'removeIndex refuses an ambiguous prefix');
  let k = 6;
  while (twins[0].descriptor.digest.slice(7, 7 + k) === twins[1].descriptor.digest.slice(7, 7 + k)) k++;
  t.equal((await store.getIndexRecord(twins[1].descriptor.digest.slice(7, 7 + k))).digest, twins[1].descriptor.digest, 'a longer prefix is unique');
  t.equal(c.record.format, 'v1');
});

t.test('addIndexRecord refuses records that do not match the store', async (t) => {
  const root = freshRoot();
  const store = new ArtifactStore({ root });
  const index = makeIndex('v1', [0, 1], 'alpha');
  const record = recordOf(index, 'v1', [0, 1], 'alpha');

  const noManifest = await storeError(store.addIndexRecord(record));
  t.equal(noManifest.kind, 'not-found');
  t.match(noManifest.message, index.descriptor.digest);
  await store.putBlob(index.bytes);
  await store.putBlob(layers[0].ztocBytes);
  const noZtoc = await storeError(store.addIndexRecord(record));
  t.equal(noZtoc.kind, 'not-found', 'a zTOC blob is missing');
  t.equal(noZtoc.subject, store.blobPath(layers[1].ztocDigest));
  await store.putBlob(layers[1].ztocBytes);

  t.match(await storeError(store.addIndexRecord({ ...record, format: 'v2' })), { kind: 'invalid' }, 'format differs from the manifest');
  t.match(await storeError(store.addIndexRecord({ ...record, ztocs: record.ztocs.slice(1) })), { kind: 'invalid' }, 'zTOCs differ');
  t.match(await storeError(store.addIndexRecord({ ...record, imageManifestDigest: imageManifestDigest('other') })), { kind: 'invalid' }, 'subject differs');
  t.match(await storeError(store.addIndexRecord({ ...record, digest: 'sha256:1234' })), { kind: 'invalid' });
  t.match(await storeError(store.addIndexRecord({ ...record, imageRef: '' })), { kind: 'invalid' });
  t.match(await storeError(store.addIndexRecord({ ...record, createdAt: 'yesterday' })), { kind: 'invalid' });
  t.same(await store.listIndexRecords(), [], 'nothing recorded');
  t.equal((await store.addIndexRecord(record)).digest, index.descriptor.digest, 'the right record is accepted');
  t.equal((await store.addIndexRecord(record)).digest, index.descriptor.digest, 'and again (replaces it)');
  t.equal((await store.listIndexRecords()).length, 1);
});

t.test('removeIndex collects unreferenced blobs and keeps zTOCs shared with other indexes', async (t) => {
  const root = freshRoot();
  const store = new ArtifactStore({ root });
  await store.putBlob(EMPTY_CONFIG_BYTES, EMPTY_CONFIG_DIGEST);
  // Two images sharing layer 1.
  const a = await addIndex(store, 'v1', [0, 1], 'alpha');
  const b = await addIndex(store, 'v2', [1, 2], 'beta');

  const removedA = await store.removeIndex(a.record.digest.slice(7, 19));
  t.equal(removedA.record.digest, a.record.digest);
  t.same(removedA.removedBlobs.sort(), [a.record.digest, layers[0].ztocDigest].sort(), 'its manifest and its own zTOC');
  t.same(removedA.keptBlobs, [layers[1].ztocDigest], 'the shared zTOC is kept');
  t.notOk(await store.hasBlob(a.record.digest));
  t.notOk(await store.hasBlob(layers[0].ztocDigest));
  t.equal((await store.readBlob(layers[1].ztocDigest)).length, layers[1].ztocBytes.length, 'the shared zTOC still reads');
  t.same((await store.listIndexRecords()).map((r) => r.digest), [b.record.digest]);
  t.match(await storeError(store.getIndexRecord(a.record.digest)), { kind: 'not-found' });
  t.match(await storeError(store.removeIndex(a.record.digest)), { kind: 'not-found' }, 'removing twice');

  const removedB = await store.removeIndex(b.record.digest);
  t.same(removedB.removedBlobs.sort(), [b.record.digest, layers[1].ztocDigest, layers[2].ztocDigest].sort());
  t.same(removedB.keptBlobs, []);
  t.same(await readdir(join(root, 'indexes')), []);
  t.same(await readdir(join(root, 'content', 'blobs', 'sha256')), [EMPTY_CONFIG_DIGEST.slice(7)], 'only the config blob remains');
  await t.resolves(stat(join(root, 'content', 'oci-layout')));
});

t.test('crash leftovers: temp files are ignored by listings and collected by gc after an hour', async (t) => {
  const root = freshRoot();
  const store = new ArtifactStore({ root });
  const a = await addIndex(store, 'v1', [0], 'alpha');
  const hex = a.record.digest.slice(7);
  const old = new Date(Date.now() - 2 * 3600_000);
  const blobDir = join(root, 'content', 'blobs', 'sha256');
  const oldTemps = [
    join(blobDir, `${layers[1].ztocDigest.slice(7)}.tmp-4242-aaaaaa`),
    join(blobDir, 'upload.tmp-4242-bbbbbb'),
    join(root, 'indexes', `${hex}.json.tmp-4242-cccccc`),
    join(root, 'indexes', `${'f'.repeat(64)}.json.tmp-4242-dddddd`),
    join(root, '.lock.stale.tmp-4242-eeeeee'),
  ];
  const freshTemp = join(blobDir, 'upload.tmp-4243-ffffff');
  for (const p of [...oldTemps, freshTemp]) await writeFile(p, 'half a file {');
  for (const p of oldTemps) await utimes(p, old, old);
  // An orphan blob (a create that crashed before recording) old and fresh.
  const orphanOld = await store.putBlob(layers[2].ztocBytes);
  await utimes(store.blobPath(orphanOld.digest), old, old);
  const orphanFresh = await store.putBlob(layers[3].ztocBytes);

  t.same((await store.listIndexRecords()).map((r) => r.digest), [a.record.digest], 'temp record files are not records');
  t.match(await storeError(store.getIndexRecord('ffffff')), { kind: 'not-found' }, 'nor found by prefix');
  t.equal((await store.getIndexRecord(hex.slice(0, 6))).digest, a.record.digest, 'a temp twin does not make a prefix ambiguous');

  const plain = await store.gc();
  t.same(plain.removedTemp, [...oldTemps].sort(), 'old temp files removed');
  t.same(plain.removedBlobs, [], 'orphans kept unless asked');
  t.same(await tempFiles(root), [freshTemp], 'a fresh temp file (a writer at work) is kept');
  t.ok(await store.hasBlob(orphanOld.digest));

  const withOrphans = await store.gc({ orphanBlobs: true });
  t.same(withOrphans.removedBlobs, [orphanOld.digest], 'an old orphan blob is removed');
  t.ok(await store.hasBlob(orphanFresh.digest), 'a fresh one is kept (its index may be on its way)');
  t.ok(await store.hasBlob(a.record.digest), 'referenced blobs are kept');
  t.ok(await store.hasBlob(layers[0].ztocDigest));

  const now = await store.gc({ maxAgeMs: 0, orphanBlobs: true });
  t.same(now.removedTemp, [freshTemp]);
  t.same(now.removedBlobs, [orphanFresh.digest]);
  t.same((await store.listIndexRecords()).length, 1);
  await checkBlobsWithSha256sum(t, root);
});

t.test('a malformed record file stops removal instead of losing blobs', async (t) => {
  const root = freshRoot();
  const store = new ArtifactStore({ root });
  const a = await addIndex(store, 'v1', [0], 'alpha');
  const b = await addIndex(store, 'v1', [0, 1], 'beta');
  const bPath = join(root, 'indexes', `${b.record.digest.slice(7)}.json`);
  const good = await readFile(bPath, 'utf8');
  await writeFile(bPath, good.slice(0, 40));
  const err = await storeError(store.removeIndex(a.record.digest));
  t.equal(err.kind, 'corrupt');
  t.equal(err.subject, bPath, 'names the record file');
  t.ok(await store.hasBlob(layers[0].ztocDigest), 'the zTOC b needs was not collected');
  t.equal((await store.getIndexRecord(a.record.digest)).digest, a.record.digest, 'a is still recorded');
  await writeFile(bPath, good);
  t.same((await store.removeIndex(a.record.digest)).keptBlobs, [layers[0].ztocDigest]);
});

t.test('the lock: a dead holder is taken over, a live one is waited for', async (t) => {
  const root = freshRoot();
  const store = new ArtifactStore({ root, lockTimeoutMs: 400 });
  const a = await addIndex(store, 'v1', [0], 'alpha');
  const lockPath = join(root, '.lock');
  const lockOf = (pid: number) => JSON.stringify({ pid, host: hostname(), nonce: 'x', createdAt: new Date().toISOString() });

  await writeFile(lockPath, lockOf(await deadPid()));
  const b = await addIndex(store, 'v1', [1], 'beta');
  t.equal(b.record.imageRef, 'registry.example/beta:latest', 'a lock of a dead process is taken over');
  await t.rejects(stat(lockPath), { code: 'ENOENT' }, 'and released');

  const old = new Date(Date.now() - 60_000);
  await writeFile(lockPath, '');
  await utimes(lockPath, old, old);
  await store.gc();
  await t.rejects(stat(lockPath), { code: 'ENOENT' }, 'an old, never written lock is taken over');

  const sleeper = spawn('sleep', ['30']);
  t.teardown(() => {
    sleeper.kill();
  });
  await writeFile(lockPath, lockOf(sleeper.pid as number));
  const started = Date.now();
  const locked = await storeError(store.removeIndex(a.record.digest));
  t.equal(locked.kind, 'locked');
  t.equal(locked.subject, lockPath);
  t.match(locked.message, `process ${sleeper.pid}`, 'names the holder');
  t.ok(Date.now() - started >= 400, 'after waiting the timeout');
  t.equal((await store.getIndexRecord(a.record.digest)).digest, a.record.digest, 'nothing removed; reads take no lock');

  await writeFile(lockPath, '');
  t.match(await storeError(store.gc()), { kind: 'locked' }, 'a fresh empty lock (a holder writing it) is respected');

  await writeFile(lockPath, lockOf(sleeper.pid as number));
  const patient = new ArtifactStore({ root, lockTimeoutMs: 10_000 });
  const pending = patient.removeIndex(a.record.digest);
  setTimeout(() => sleeper.kill('SIGKILL'), 300);
  const removed = await pending;
  t.equal(removed.record.digest, a.record.digest, 'proceeds once the holder dies');
  await t.rejects(stat(lockPath), { code: 'ENOENT' });

  // In one process, concurrent callers queue on the lock.
  const c = await addIndex(patient, 'v1', [2], 'gamma');
  const d = await addIndex(patient, 'v1', [3], 'delta');
  const [rc, rd] = await Promise.all([patient.removeIndex(c.record.digest), patient.removeIndex(d.record.digest), patient.gc()]);
  t.same([rc.record.digest, rd.record.digest], [c.record.digest, d.record.digest]);
  t.same((await patient.listIndexRecords()).map((r) => r.digest), [b.record.digest]);
});

const WORKER = String.raw`
import { readFile } from 'node:fs/promises';
const [storeJs, planPath, id] = process.argv.slice(2);
const { ArtifactStore, StoreError } = await import(storeJs);
const plan = JSON.parse(await readFile(planPath, 'utf8'));
const store = new ArtifactStore({ root: plan.root });
const me = plan.workers[Number(id)];
const log = { retries: 0 };
async function putAll(index) {
  await store.putBlobFromFile(index.manifestFile, index.record.digest);
  for (const z of index.ztocFiles) {
    if (z.fromFile) await store.putBlobFromFile(z.path);
    else await store.putBlob(await readFile(z.path), z.digest);
  }
}
async function add(index) {
  for (let attempt = 0; ; attempt++) {
    await putAll(index);
    try {
      return await store.addIndexRecord(index.record);
    } catch (err) {
      // A concurrent removal collected a shared zTOC between our put and our record: put again.
      if (!(err instanceof StoreError) || err.kind !== 'not-found' || attempt > 50) throw err;
      log.retries++;
    }
  }
}
for (let round = 0; round < plan.rounds; round++) {
  await store.putBlobFromFile(plan.bigFile);
  for (const index of me.add) await add(index);
  if (me.cycle) {
    await add(me.cycle);
    await store.removeIndex(me.cycle.record.digest.slice(7, 20));
  }
}
process.stdout.write(String(log.retries));
`;

t.test('four processes writing at once leave a consistent store', async (t) => {
  const root = freshRoot();
  const setup = new ArtifactStore({ root });
  // A big blob (real files, > 8 MB) that all four put at once.
  const bigFile = join(dir, 'big.bin');
  const out = createWriteStream(bigFile);
  let total = 0;
  for await (const f of walkFiles('/usr/share')) {
    if (total >= 9 << 20) break;
    const data = await readFile(f.path).catch(() => undefined);
    if (!data) continue;
    out.write(data);
    total += data.length;
  }
  await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
  const bigDigest = sha256Digest(await readFile(bigFile));

  const spec = async (version: SociIndexVersion, which: number[], image: string) => {
    const index = makeIndex(version, which, image);
    const manifestFile = join(dir, `manifest-${image}.json`);
    await writeFile(manifestFile, index.bytes);
    return {
      manifestFile,
      record: recordOf(index, version, which, image),
      ztocFiles: which.map((i, k) => ({ path: layers[i].ztocPath, digest: layers[i].ztocDigest, fromFile: k % 2 === 0 })),
    };
  };
  // Two workers add and remove indexes sharing layer 3's zTOC over and over, so one's removal
  // can collect that zTOC between the other's put and record (the documented retry path).
  const cycled = [await spec('v1', [0, 3], 'cycled'), await spec('v2', [3], 'cycled2')];
  const workers = [
    { add: [await spec('v1', [0, 1], 'w0'), await spec('v2', [0, 1, 2], 'shared')] },
    { add: [await spec('v1', [0, 2], 'w1'), await spec('v2', [0, 1, 2], 'shared')] },
    { add: [await spec('v2', [0], 'w2'), await spec('v2', [0, 1, 2], 'shared')], cycle: cycled[1] },
    { add: [await spec('v1', [1, 2], 'w3')], cycle: cycled[0] },
  ];
  const planPath = join(dir, 'plan.json');
  await writeFile(planPath, JSON.stringify({ root, bigFile, rounds: 12, workers }));
  const workerPath = join(dir, 'worker.mjs');
  await writeFile(workerPath, WORKER);

  const results = await Promise.all(workers.map((_, id) => runNode([workerPath, STORE_JS, planPath, String(id)])));
  for (const [id, r] of results.entries()) t.equal(r.code, 0, `worker ${id} succeeded${r.code === 0 ? '' : `: ${r.stderr}`}`);
  t.comment(`puts retried after a concurrent collection, per worker: ${results.map((r) => r.stdout).join(' ')}`);

  t.equal(await readFile(join(root, 'content', 'oci-layout'), 'utf8'), '{"imageLayoutVersion":"1.0.0"}');
  const names = await checkBlobsWithSha256sum(t, root);
  t.ok(names.includes(bigDigest.slice(7)), 'the big blob is there, whole');
  t.same(await tempFiles(root), [], 'no temp files left');
  await t.rejects(stat(join(root, '.lock')), { code: 'ENOENT' }, 'the lock is released');

  const records = await setup.listIndexRecords();
  const expected = new Set(workers.flatMap((w) => w.add.map((s) => s.record.digest)));
  t.same(new Set(records.map((r) => r.digest)), expected, 'each worker’s indexes and the shared one; the cycled one removed');
  t.equal(records.length, 5);
  for (const r of records) {
    await setup.readBlob(r.digest, { size: r.size });
    for (const z of r.ztocs) await setup.readBlob(z.ztocDigest, { size: z.ztocSize });
  }
  for (const c of cycled) t.notOk(await setup.hasBlob(c.record.digest), 'a cycled index manifest was collected');
  t.notOk(await setup.hasBlob(layers[3].ztocDigest), 'and the zTOC only the cycled indexes had');
  t.pass('every recorded blob reads and verifies');
});

t.test('an unwritable root gives a permission error that suggests --root', async (t) => {
  const probe = String.raw`
    const { ArtifactStore } = await import(process.argv[1]);
    const out = [];
    for (const [root, op] of JSON.parse(process.argv[2])) {
      const store = new ArtifactStore({ root });
      try {
        if (op === 'put') await store.putBlob(new TextEncoder().encode('x'));
        else await store.listIndexRecords();
        out.push({ ok: true });
      } catch (err) {
        out.push({ name: err.name, kind: err.kind, subject: err.subject, message: err.message });
      }
    }
    process.stdout.write(JSON.stringify(out));
  `;
  const privateRoot = join(dir, 'private', 'soci'); // dir is root's 0700 temp dir
  const readable = join(dir, 'readable-store');
  const shared = new ArtifactStore({ root: readable });
  await shared.putBlob(EMPTY_CONFIG_BYTES);
  await chmod(readable, 0o755);
  await chmod(dir, 0o711);
  t.teardown(() => chmod(dir, 0o700));
  const cases = [
    [privateRoot, 'list'],
    ['/var/lib/soci-ts', 'list'],
    [readable, 'list'],
    [readable, 'put'],
  ];
  const r = await runNode(['--input-type=module', '-e', probe, STORE_JS, JSON.stringify(cases)], {
    prefix: ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'],
  });
  t.equal(r.code, 0, r.stderr);
  const results = JSON.parse(r.stdout) as Array<{ ok?: true; name?: string; kind?: string; subject?: string; message?: string }>;
  t.match(results[0], { name: 'StoreError', kind: 'permission', message: /permission denied \(uid 65534\).*--root DIR/ });
  t.match(results[0].subject, dir, 'names the directory it could not create');
  t.match(results[1], { name: 'StoreError', kind: 'permission', message: /--root/ }, 'the default root, as a non-root user');
  t.same(results[2], { ok: true }, 'a readable store can be listed by another user');
  t.match(results[3], { name: 'StoreError', kind: 'permission', subject: join(readable, 'content', 'blobs', 'sha256') + '/' });
  t.match(results[3].message, /--root/);
});

/**
 * `soci-ts install-systemd` and the units in systemd/: the files it writes (parsed here as
 * systemd reads unit files: sections, `Key=Value`, comments), idempotence, the repository's
 * copies being exactly its output with the defaults, `systemd-analyze verify` of what it wrote
 * (when the machine has systemd-analyze; it runs without a running systemd), and, with
 * systemd's own `systemd-socket-activate` where present, the daemon started the way the units
 * say: ExecStart from the .service, the socket of the .socket's ListenStream, started at the
 * first connection, answering it over gRPC.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SnapshotsClient } from '../daemon/grpc-api.js';
import { hasCommand, run } from './helpers/layers.js';
import { SOCI_TS_BIN } from './helpers/snapshotter.js';

const REPO_UNITS = fileURLToPath(new URL('../../systemd/', import.meta.url));

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

function cli(args: string[]): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const env = { ...process.env };
    delete env.NODE_OPTIONS;
    const child = spawn(SOCI_TS_BIN, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

/** systemd's unit file syntax (systemd.syntax(7)), enough for these files: sections of Key=Value, # and ; comments. */
function parseUnit(text: string): Map<string, Map<string, string[]>> {
  const sections = new Map<string, Map<string, string[]>>();
  let current: Map<string, string[]> | undefined;
  for (const [i, raw] of text.split('\n').entries()) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const sec = /^\[([A-Za-z]+)\]$/.exec(line);
    if (sec !== null) {
      if (sections.has(sec[1]!)) throw new Error(`line ${i + 1}: section [${sec[1]}] twice`);
      current = new Map();
      sections.set(sec[1]!, current);
      continue;
    }
    const kv = /^([A-Za-z][A-Za-z0-9]*)=(.*)$/.exec(line);
    if (kv === null || current === undefined) throw new Error(`line ${i + 1}: not Key=Value in a section: ${line}`);
    const values = current.get(kv[1]!) ?? [];
    values.push(kv[2]!);
    current.set(kv[1]!, values);
  }
  return sections;
}

function one(u: Map<string, Map<string, string[]>>, section: string, key: string): string | undefined {
  const v = u.get(section)?.get(key);
  if (v !== undefined && v.length !== 1) throw new Error(`${section}.${key} set ${v.length} times`);
  return v?.[0];
}

const SERVICE = 'soci-ts-snapshotter.service';
const SOCKET = 'soci-ts-snapshotter.socket';

t.test('install-systemd writes the units, idempotently', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-systemd-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const prefix = join(dir, 'units');
  const args = ['install-systemd', '--prefix', prefix, '--bin', '/opt/soci ts/bin/soci-ts', '--config', '/etc/x/config.toml', '--address', '/run/x/x.sock'];
  let r = await cli(args);
  t.equal(r.code, 0, r.stderr);
  t.same(r.stdout.split('\n').filter((l) => /^(wrote|unchanged) /.test(l)), [`wrote ${join(prefix, SERVICE)}`, `wrote ${join(prefix, SOCKET)}`], 'prints what it wrote');
  t.match(r.stdout, /note: \/etc\/x\/config\.toml does not exist yet/, 'says that the config file is missing');

  const service = parseUnit(await readFile(join(prefix, SERVICE), 'utf8'));
  const socket = parseUnit(await readFile(join(prefix, SOCKET), 'utf8'));
  t.same([...service.keys()], ['Unit', 'Service', 'Install']);
  t.same([...socket.keys()], ['Unit', 'Socket', 'Install']);
  t.equal(one(service, 'Service', 'ExecStart'), '"/opt/soci ts/bin/soci-ts" snapshotter --config /etc/x/config.toml', 'ExecStart: --bin (quoted, it has a space) and the config path');
  t.equal(one(service, 'Service', 'KillMode'), 'process', 'KillMode=process: a stop or restart leaves the FUSE manager running');
  t.equal(one(service, 'Service', 'Type'), 'simple', 'Type=simple (no sd_notify)');
  t.equal(one(service, 'Service', 'Restart'), 'on-failure');
  t.match(one(service, 'Service', 'LimitNOFILE'), /^\d+$/);
  t.ok(Number(one(service, 'Service', 'LimitNOFILE')) >= 65536);
  t.equal(one(service, 'Unit', 'Requires'), SOCKET);
  t.match(one(service, 'Unit', 'After'), new RegExp(SOCKET.replace('.', '\\.')));
  t.equal(one(service, 'Install', 'WantedBy'), 'multi-user.target');
  t.equal(one(service, 'Install', 'Also'), SOCKET);
  t.equal(one(socket, 'Socket', 'ListenStream'), '/run/x/x.sock', 'ListenStream = --address');
  t.equal(one(socket, 'Socket', 'SocketMode'), '0600');
  t.equal(one(socket, 'Socket', 'Service'), SERVICE);
  t.equal(one(socket, 'Install', 'WantedBy'), 'sockets.target');
  const text = await readFile(join(prefix, SERVICE), 'utf8');
  t.match(text, /# KillMode=process: .*\n(# .*\n)*KillMode=process/, 'a comment says why KillMode=process');

  const before = await stat(join(prefix, SERVICE));
  r = await cli(args);
  t.equal(r.code, 0);
  t.same(r.stdout.split('\n').filter((l) => /^(wrote|unchanged) /.test(l)), [`unchanged ${join(prefix, SERVICE)}`, `unchanged ${join(prefix, SOCKET)}`], 'a second run changes nothing');
  t.equal((await stat(join(prefix, SERVICE))).ino, before.ino, 'the file was not rewritten');

  await writeFile(join(prefix, SOCKET), 'edited by hand\n');
  r = await cli(args);
  t.same(r.stdout.split('\n').filter((l) => /^(wrote|unchanged) /.test(l)), [`unchanged ${join(prefix, SERVICE)}`, `wrote ${join(prefix, SOCKET)}`], 'a changed file is written again');
  t.equal(one(parseUnit(await readFile(join(prefix, SOCKET), 'utf8')), 'Socket', 'ListenStream'), '/run/x/x.sock');

  r = await cli(['install-systemd', '--prefix', prefix, '--bin', 'relative/soci-ts']);
  t.equal(r.code, 1, 'a relative --bin: exit 1');
  t.match(r.stderr, /--bin relative\/soci-ts: must be an absolute path/);
});

t.test("the repository's systemd/ files are install-systemd's output with the defaults", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-systemd-repo-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const r = await cli(['install-systemd', '--prefix', dir, '--bin', '/usr/local/bin/soci-ts']);
  t.equal(r.code, 0, r.stderr);
  for (const name of [SERVICE, SOCKET]) {
    t.equal(await readFile(join(REPO_UNITS, name), 'utf8'), await readFile(join(dir, name), 'utf8'), `systemd/${name}`);
  }
  const service = parseUnit(await readFile(join(REPO_UNITS, SERVICE), 'utf8'));
  t.equal(one(service, 'Service', 'ExecStart'), '/usr/local/bin/soci-ts snapshotter --config /etc/soci-ts/config.toml');
  t.equal(one(parseUnit(await readFile(join(REPO_UNITS, SOCKET), 'utf8')), 'Socket', 'ListenStream'), '/run/soci-ts/soci-ts.sock');
});

t.test('systemd-analyze verify accepts the units', { skip: !(await hasCommand('systemd-analyze')) && 'no systemd-analyze on this machine (the units were parsed above)' }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-systemd-verify-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  let r = await cli(['install-systemd', '--prefix', dir, '--bin', SOCI_TS_BIN]);
  t.equal(r.code, 0, r.stderr);
  const v = await run('systemd-analyze', ['verify', join(dir, SERVICE), join(dir, SOCKET)], { okCodes: [0, 1] });
  t.equal(v.code, 0, `verify exits 0 (${v.stderr.trim()})`);
  t.equal(v.stderr.trim(), '', 'and warns about nothing (no unknown key or section, ExecStart executable)');
  // The check can fail: a unit whose ExecStart is not there.
  r = await cli(['install-systemd', '--prefix', dir, '--bin', join(dir, 'missing', 'soci-ts')]);
  const bad = await run('systemd-analyze', ['verify', join(dir, SERVICE), join(dir, SOCKET)], { okCodes: [0, 1] });
  t.not(bad.code, 0, 'a missing ExecStart binary fails verify');
  t.match(bad.stderr, /is not executable/);
});

t.test('started as the units say, through systemd-socket-activate', { skip: !(await hasCommand('systemd-socket-activate')) && 'no systemd-socket-activate on this machine' }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-systemd-run-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const cfg = join(dir, 'config.toml');
  const address = join(dir, 'run', 'soci-ts.sock');
  await writeFile(cfg, `root = "${join(dir, 'root')}"\naddress = "${join(dir, 'unused.sock')}"\nmetrics_address = ""\n`);
  const r = await cli(['install-systemd', '--prefix', dir, '--bin', SOCI_TS_BIN, '--config', cfg, '--address', address]);
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /does not exist/);
  const exec = one(parseUnit(await readFile(join(dir, SERVICE), 'utf8')), 'Service', 'ExecStart')!.split(' ');
  const listen = one(parseUnit(await readFile(join(dir, SOCKET), 'utf8')), 'Socket', 'ListenStream')!;
  const fdname = one(parseUnit(await readFile(join(dir, SOCKET), 'utf8')), 'Socket', 'FileDescriptorName')!;
  await run('mkdir', ['-p', join(dir, 'run')]);
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  const child = spawn('systemd-socket-activate', ['-l', listen, `--fdname=${fdname}`, '--', ...exec], { env, stdio: ['ignore', 'ignore', 'pipe'], detached: true });
  let log = '';
  child.stderr.on('data', (b: Buffer) => (log += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  t.teardown(() => {
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      // gone
    }
  });
  for (let i = 0; i < 100 && (await stat(listen).catch(() => undefined)) === undefined; i++) await new Promise((res) => setTimeout(res, 100));
  t.ok((await stat(listen)).isSocket(), 'systemd-socket-activate listens on ListenStream');
  t.notMatch(log, /snapshotter serving/, 'the daemon does not run before the first connection');
  const c = await SnapshotsClient.connect(listen);
  t.teardown(() => c.close());
  t.same((await c.list()).infos, [], 'the first connection starts the daemon, which answers it');
  t.match(log, /"msg":"snapshotter serving on the socket-activated listener".*"name":"soci-ts\.sock"/, 'it serves on the passed socket, named by FileDescriptorName');
  await t.rejects(stat(join(dir, 'unused.sock')), { code: 'ENOENT' }, "the config's own address stays unbound");
  process.kill(-child.pid!, 'SIGTERM');
  await exited;
});

/**
 * The README's first command, end to end: scripts/demo (registry, create --push, lazy mount,
 * containerd + soci-ts snapshotter, a container started lazily next to a full pull, metrics),
 * run on free ports in a directory of its own. Its own checks (sha256 against tar) make it
 * fail on a wrong byte; this test asserts it finished and said what the README promises.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

const dir = await mkdtemp(path.join(tmpdir(), 'soci-ts-demo-test-'));
t.teardown(() => rm(dir, { recursive: true, force: true }));

t.test('scripts/demo runs end to end', async (t) => {
  const env = { ...process.env, SOCI_TS_DEMO_DIR: dir, SOCI_TS_DEMO_PORT: String(await freePort()), SOCI_TS_DEMO_METRICS_PORT: String(await freePort()), SOCI_TS_DEMO_SKIP_SETUP: '1' };
  const { code, out } = await new Promise<{ code: number | null; out: string }>((resolve) => {
    const child = spawn('scripts/demo', [], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr.on('data', (c: Buffer) => (out += c.toString()));
    const timer = setTimeout(() => child.kill('SIGTERM'), 10 * 60_000);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, out });
    });
  });
  t.equal(code, 0, `the demo exits 0${code === 0 ? '' : `:\n${out.slice(-4000)}`}`);
  t.match(out, /the file read through the pushed zTOC equals tar's/, 'a file through the pushed zTOC');
  t.match(out, /the file read through the lazy mount equals tar's/, 'a file through soci-ts mount');
  t.match(out, /\d+ layers \(\d+ lazy,/, 'rpull reports lazy layers');
  t.match(out, /the file read in both containers equals tar's/, 'both containers read the right bytes');
  const m = /soci-ts \(lazy\) (\d+) ms, overlayfs \(full pull\) (\d+) ms/.exec(out);
  t.ok(m, 'start times of both modes printed');
  const f = /the lazy layers fetched (\d+) KiB from the registry; the image's layers are (\d+) KiB/.exec(out);
  t.ok(f !== null && Number(f[1]) > 0 && Number(f[1]) < Number(f[2]), `metrics: fewer bytes fetched than the image (${f?.[1]} < ${f?.[2]} KiB)`);
  t.comment(m?.[0] ?? '', f?.[0] ?? '');
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
  t.notOk(mountinfo.includes('soci-ts-demo-run.'), 'nothing the demo mounted is left');
  t.match(out, /demo: done/);
});

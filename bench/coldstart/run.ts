/**
 * The cold-start benchmark: for each network, workload, run and mode, time the start of a
 * container from nothing to its ready line, with containerd's real parts.
 *
 * Set-up (not timed): the workload images are built/copied and pushed to a loopback
 * `docker-registry`; `soci-ts create --push` indexes them (its local store is then thrown
 * away, so the lazy side fetches its index and zTOCs like a fresh machine); a counting proxy
 * (loopback) and a shaping proxy (simulated WAN) are started in front of the registry and
 * measured; containerd is started with the `soci-ts` proxy plugin, and `soci-ts snapshotter`.
 *
 * One run of one mode (timed; `REF` names the image through the network's proxy):
 * 1. pull: `ctr images pull --plain-http REF` (overlayfs: fetch every layer and unpack it) or
 *    `soci-ts rpull … REF` (soci-ts: the image with remote-snapshot labels, indexed layers
 *    mounted lazily) — from spawn to exit;
 * 2. create: `ctr containers create [--snapshotter soci-ts] REF ID CMD…` — spawn to exit (the
 *    container's writable snapshot and its spec);
 * 3. run: `ctr tasks start ID` — from spawn to the first stdout line containing the ready line.
 * The total is from the pull's spawn to the ready line (the three phases plus the gaps between
 * the commands). Three ctr processes instead of one `ctr run` cost a few tens of ms of
 * process start-up, alike for both modes. Bytes fetched are what the proxy passed from the
 * registry to clients from the pull's start to the ready line (bodies and HTTP headers).
 *
 * Between runs: the container, the image (`ctr images rm --sync`), every content blob,
 * lease and snapshot left are removed; the soci-ts snapshotter keeps running if it holds
 * nothing (no mount, span or zTOC; checked), else (and with --cold-daemon) it is restarted on a
 * fresh root; the page cache is dropped (`/proc/sys/vm/drop_caches`).
 */
import { access, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { FuseManagerClient } from '../../daemon/fuse-manager-client.js';
import { cpus, hostname, loadavg, release, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { inflateEngine } from '../../ztoc/index.js';
import { startContainerd, type Containerd } from '../../test/helpers/containerd.js';
import { startRegistry, type Registry } from '../../test/helpers/registry.js';
import { startSnapshotter, type SnapshotterDaemon } from '../../test/helpers/snapshotter.js';
import { abortable, BenchError, Cleanup, exec, mountsUnder, removeTree, stopProcessesMentioning } from './proc.js';
import { measureLink, ShapingProxy } from './proxy.js';
import { renderTable, writeReport } from './report.js';
import { idealMs, speedups, summarize, targetChecks, unavailable } from './stats.js';
import type { ColdstartOptions, ColdstartResults, MachineInfo, ModeInfo, ModeName, NetworkInfo, NetworkName, RunSummary, Sample, Workload, WorkloadInfo } from './types.js';
import { builtinWorkloads, readWorkloadsFile, stageImage, WorkloadError, type StagedImage } from './workloads.js';
import type { BuiltImage } from '../../test/helpers/images.js';

/** The checkout (dist/bench/coldstart → ../../..). */
export const REPO_ROOT = fileURLToPath(new URL('../../../', import.meta.url));
export const SOCI_TS = join(REPO_ROOT, 'bin', 'soci-ts');
export const DEFAULT_OUT_DIR = join(REPO_ROOT, 'bench', 'results', 'coldstart');
export const DEFAULT_IMAGE_CACHE = process.env.SOCI_TS_BENCH_DIR ?? '/var/tmp/soci-ts-bench';

const NAMESPACE = 'coldstart';
const SNAPSHOTTER = 'soci-ts';

export const METHOD = [
  'Each run starts from nothing: no image, content, snapshots or leases in containerd, and the page cache dropped (`echo 3 > /proc/sys/vm/drop_caches`). containerd keeps running between runs, and so does the soci-ts snapshotter (with its FUSE manager), as on a host: the bench checks after every lazy run that it holds nothing (no FUSE mount, no inflated span in memory, no span on disk, no zTOC in its store, no snapshot directory) and restarts it on a fresh root otherwise, or before every run with --cold-daemon.',
  'pull/unpack: `ctr images pull --plain-http REF` (overlayfs: every layer fetched and unpacked) or `soci-ts rpull --address … --namespace … --snapshotter soci-ts --plain-http REF` (soci-ts: indexed layers become lazy remote snapshots), timed from spawn to exit.',
  'create: `ctr containers create [--snapshotter soci-ts] REF ID CMD…`, spawn to exit. run: `ctr tasks start ID`, from spawn to the first stdout line containing the ready line. The total runs from the pull\'s spawn to that line, gaps included; three ctr commands instead of one `ctr run` add a few tens of ms of process start-up to both modes alike.',
  'Bytes fetched: what a loopback TCP proxy in front of the registry passed from the registry to its clients (bodies and HTTP headers), from the start of the pull to the ready line; all clients (ctr, rpull, the snapshotter) reach the registry only through it.',
  'WAN: the same proxy delays each direction by half the RTT, makes a new connection wait one RTT (its handshake), and passes each direction through a shared FIFO "wire" at the bandwidth with a bounded buffer (max(256 KiB, one bandwidth-delay product)); this kernel has no netem. Not modelled: loss and TCP slow start over the WAN. The measured figures are a small request\'s round trip on an open connection and one large blob read\'s throughput, through the proxy, before the runs.',
  'ideal: the bytes the lazy run fetched, at the bandwidth (the configured one for the WAN, the measured loopback throughput for loopback).',
  'Modes alternate their order from run to run; medians over the runs, spread min–max.',
];

export interface ColdstartRunResult {
  results: ColdstartResults;
  files: { json: string; markdown: string; svg: string };
  table: string;
}

interface Cell {
  workload: Workload;
  staged: StagedImage;
  info: WorkloadInfo;
}

interface Env {
  opts: ColdstartOptions;
  progress: (s: string) => void;
  warn: (s: string) => void;
  cleanup: Cleanup;
  dir: string;
  ctd: Containerd;
  snap: SnapshotterState | undefined;
  proxies: Map<NetworkName, ShapingProxy>;
  seq: number;
}

interface SnapshotterState {
  address: string;
  root: string;
  daemon: SnapshotterDaemon | undefined;
  generation: number;
}

// ---------------------------------------------------------------------------------------
// Small helpers

const checkAborted = (signal: AbortSignal | undefined): void => {
  if (signal?.aborted === true) throw signal.reason as Error;
};

async function firstLine(cmd: string, args: string[]): Promise<string> {
  try {
    const r = await exec(cmd, args, { timeoutMs: 20_000 });
    return (r.stdout + r.stderr).trim().split('\n')[0] ?? '';
  } catch (e) {
    return `unknown (${(e as Error).message.slice(0, 120)})`;
  }
}

async function machineInfo(): Promise<MachineInfo> {
  let os = 'unknown';
  try {
    const rel = await readFile('/etc/os-release', 'utf8');
    os = /^PRETTY_NAME="?([^"\n]*)"?/m.exec(rel)?.[1] ?? os;
  } catch {
    // keep unknown
  }
  let commit = 'unknown';
  try {
    const r = await exec('git', ['-C', REPO_ROOT, 'rev-parse', '--short', 'HEAD'], { timeoutMs: 10_000 });
    const dirty = await exec('git', ['-C', REPO_ROOT, 'status', '--porcelain', '--untracked-files=no'], { timeoutMs: 10_000 });
    commit = r.stdout.trim() + (dirty.stdout.trim() === '' ? '' : ' (with uncommitted changes)');
  } catch {
    // not a git checkout
  }
  return {
    hostname: hostname(),
    os,
    kernel: release(),
    cpu_model: cpus()[0]?.model ?? 'unknown',
    cpus: cpus().length,
    memory_bytes: totalmem(),
    node: process.version,
    containerd: await firstLine('containerd', ['--version']),
    runc: await firstLine('runc', ['--version']),
    registry: await firstLine('docker-registry', ['--version']),
    soci_ts_commit: commit,
    inflate_engine: inflateEngine().name,
    load_average_start: loadavg(),
    load_average_end: [],
  };
}

async function haveCommand(name: string): Promise<boolean> {
  for (const d of (process.env.PATH ?? '/usr/bin:/bin').split(':')) {
    if (d === '') continue;
    try {
      await access(join(d, name), 1);
      return true;
    } catch {
      // not here
    }
  }
  return false;
}

/** Whether `soci-ts rpull` has `--json` (per-layer outcomes); set by sociUnavailable. */
let rpullJson = false;

/** Why soci-ts mode cannot run here, or undefined when it can. */
async function sociUnavailable(): Promise<string | undefined> {
  try {
    await access(SOCI_TS);
  } catch {
    return `${SOCI_TS} not found`;
  }
  try {
    await access(join(REPO_ROOT, 'dist', 'daemon', 'main.js'));
  } catch {
    return 'soci-ts is not built (run scripts/setup or npm run build)';
  }
  try {
    // commander answers `--help` of an unknown command with the main help: look at the command list.
    const help = await exec(SOCI_TS, ['--help'], { timeoutMs: 30_000 });
    if (!/^\s+rpull\b/m.test(help.stdout)) return 'this soci-ts has no `rpull` command (lazy pulls into containerd have not landed in this checkout)';
    const rpullHelp = await exec(SOCI_TS, ['rpull', '--help'], { timeoutMs: 30_000 });
    rpullJson = /--json\b/.test(rpullHelp.stdout);
  } catch (e) {
    return `soci-ts --help failed: ${(e as Error).message.slice(0, 200)}`;
  }
  try {
    await access('/dev/fuse');
  } catch {
    return '/dev/fuse is missing';
  }
  return undefined;
}

async function dropCaches(): Promise<boolean> {
  try {
    await exec('sync', [], { timeoutMs: 120_000 });
    await writeFile('/proc/sys/vm/drop_caches', '3\n');
    return true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------
// containerd state between runs

async function ctr(env: Env, args: readonly string[], timeoutMs = 120_000, okCodes: readonly number[] = [0]) {
  return exec('ctr', ['--address', env.ctd.address, '--namespace', NAMESPACE, ...args], { timeoutMs, okCodes, label: `ctr ${args.slice(0, 2).join(' ')}` });
}

const lines = (s: string): string[] => s.split('\n').map((l) => l.trim()).filter((l) => l !== '');

/** Removes every container, image, lease, content blob and snapshot of the bench namespace. */
async function emptyContainerd(env: Env, snapshotters: readonly string[]): Promise<string[]> {
  const leftovers: string[] = [];
  for (const id of lines((await ctr(env, ['tasks', 'ls', '-q'])).stdout)) {
    await ctr(env, ['tasks', 'kill', '-s', 'SIGKILL', id], 30_000, [0, 1]);
    await ctr(env, ['tasks', 'rm', '-f', id], 30_000, [0, 1]);
  }
  for (const id of lines((await ctr(env, ['containers', 'ls', '-q'])).stdout)) await ctr(env, ['containers', 'rm', id], 60_000, [0, 1]);
  for (const ref of lines((await ctr(env, ['images', 'ls', '-q'])).stdout)) await ctr(env, ['images', 'rm', '--sync', ref], 120_000, [0, 1]);
  for (const id of lines((await ctr(env, ['leases', 'ls', '-q'])).stdout)) await ctr(env, ['leases', 'rm', '--sync', id], 60_000, [0, 1]);
  // What garbage collection left (nothing, normally).
  const blobs = lines((await ctr(env, ['content', 'ls', '-q'])).stdout);
  if (blobs.length > 0) {
    leftovers.push(`${blobs.length} content blobs`);
    await ctr(env, ['content', 'rm', ...blobs], 60_000, [0, 1]);
  }
  for (const sn of snapshotters) {
    for (let round = 0; round < 64; round++) {
      const keys = lines((await ctr(env, ['snapshots', '--snapshotter', sn, 'ls'])).stdout)
        .slice(1)
        .map((l) => l.split(/\s+/)[0] ?? '')
        .filter((k) => k !== '');
      if (keys.length === 0) break;
      if (round === 0) leftovers.push(`${keys.length} ${sn} snapshots`);
      // Children first: whatever can go this round goes, the rest the next.
      for (const k of keys) await ctr(env, ['snapshots', '--snapshotter', sn, 'rm', k], 60_000, [0, 1]);
    }
  }
  return leftovers;
}

/** Stops the snapshotter, removes its root (mounts included), starts it on a fresh root. */
async function restartSnapshotter(env: Env, logLabel?: string): Promise<void> {
  const s = env.snap;
  if (s === undefined) return;
  if (s.daemon !== undefined) {
    await s.daemon.stop();
    if (env.opts.keepLogs === true && logLabel !== undefined) await keepLogs(env, s, logLabel);
    env.cleanup.untrackGroup(s.daemon.pid);
    // What it started in a session of its own (the FUSE manager, `--root` under its root) goes too.
    await stopProcessesMentioning(s.root);
    await removeTree(s.root);
    s.daemon = undefined;
  }
  s.generation++;
  s.root = join(env.dir, 'snapshotter', String(s.generation));
  await mkdir(s.root, { recursive: true });
  s.daemon = await startSnapshotter({ root: s.root, address: s.address, logLevel: env.opts.logLevel ?? 'info', startTimeoutMs: 60_000 });
  env.cleanup.trackGroup(s.daemon.pid);
  // A host's snapshotter runs long before a pull: its FUSE manager (started with it) is up.
  await waitManagerStarted(s.daemon, 60_000);
}

/**
 * After a lazy run, once containerd holds nothing: the snapshotter keeps running (containerd
 * does too, for both modes), as on a host, if it holds nothing either: no FUSE mount, no
 * inflated span in memory, no span on disk, no zTOC in its store, no snapshot directory.
 * Otherwise (or with --cold-daemon) it is restarted on a fresh root.
 */
async function settleSnapshotter(env: Env, label: string): Promise<void> {
  const s = env.snap;
  if (s?.daemon === undefined || env.opts.coldDaemon === true) return restartSnapshotter(env, label);
  if (env.opts.keepLogs === true) await keepLogs(env, s, label);
  const left = await snapshotterLeftovers(s.root);
  if (left.length === 0) return;
  env.warn(`after ${label}: the soci-ts snapshotter still holds ${left.join(', ')}: restarting it on a fresh root`);
  await restartSnapshotter(env);
}

/** What a snapshotter root still holds that would make the next run warmer than cold. */
export async function snapshotterLeftovers(root: string): Promise<string[]> {
  const out: string[] = [];
  const files = async (dir: string, depth: number): Promise<number> => {
    let n = 0;
    for (const e of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
      if (e.isDirectory() && depth > 0) n += await files(join(dir, e.name), depth - 1);
      else n++;
    }
    return n;
  };
  const spans = await files(join(root, 'cache', 'spans'), 1);
  if (spans > 0) out.push(`${spans} span file(s) on disk`);
  const blobs = await files(join(root, 'content', 'blobs', 'sha256'), 0);
  if (blobs > 0) out.push(`${blobs} blob(s) (zTOCs) in its store`);
  const snaps = await files(join(root, 'snapshots'), 0);
  if (snaps > 0) out.push(`${snaps} snapshot director(ies)`);
  try {
    const c = await FuseManagerClient.connect(join(root, 'fuse-manager.sock'), 5000);
    try {
      const h = await c.hello();
      if (h.mounts > 0) out.push(`${h.mounts} FUSE mount(s)`);
      if ((h.memoryCacheBytes ?? 0) > 0) out.push(`${h.memoryCacheBytes} bytes of inflated spans in memory`);
    } finally {
      c.close();
    }
  } catch (e) {
    out.push(`a FUSE manager that does not answer (${(e as Error).message})`);
  }
  return out;
}

/** Resolves once the snapshotter logged its FUSE manager started (it starts one at its own start). */
async function waitManagerStarted(d: SnapshotterDaemon, ms: number): Promise<void> {
  for (const end = Date.now() + ms; Date.now() < end; ) {
    if (d.logLines().some((l) => l.msg === 'FUSE manager: started')) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new BenchError(`the soci-ts snapshotter did not start its FUSE manager within ${ms} ms`);
}

/** Copies the stopped snapshotter's log and its FUSE manager's log to OUT/logs/LABEL-*.log. */
async function keepLogs(env: Env, s: SnapshotterState, label: string): Promise<void> {
  const dir = join(env.opts.outDir, 'logs');
  const slug = label.replace(/[^A-Za-z0-9._-]+/g, '-');
  try {
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, `${slug}-snapshotter.log`), s.daemon?.logs() ?? '');
    const manager = await readFile(join(s.root, 'fuse-manager.log')).catch(() => Buffer.alloc(0));
    await writeFile(join(dir, `${slug}-fuse-manager.log`), manager);
  } catch (e) {
    env.warn(`cannot keep the logs of ${label}: ${(e as Error).message}`);
  }
}

// ---------------------------------------------------------------------------------------
// One run

/** Layers `rpull --json` reports as served lazily (outcome "lazy"), or null if it does not say. */
export function countLazy(json: string): number | null {
  try {
    const doc = JSON.parse(json) as { layers?: Array<{ outcome?: unknown }> };
    if (!Array.isArray(doc.layers)) return null;
    return doc.layers.filter((l) => l.outcome === 'lazy').length;
  } catch {
    return null;
  }
}

/** What the ready line says the command read (`read N bytes`), if it says. */
export function parseBytesRead(line: string): number | null {
  const m = /read\s+(\d+)\s+bytes/.exec(line);
  return m === null ? null : Number(m[1]);
}

async function runOnce(env: Env, cell: Cell, network: NetworkName, mode: ModeName, run: number): Promise<Sample> {
  const proxy = env.proxies.get(network);
  if (proxy === undefined) throw new BenchError(`no proxy for ${network}`);
  const { opts } = env;
  const ref = `${proxy.host}/${cell.staged.pushed.repo}:${cell.staged.pushed.tag}`;
  const id = `coldstart-${++env.seq}`;
  const timeoutMs = opts.stepTimeoutMs;
  const signal = opts.signal;
  const dropped = await dropCaches();
  proxy.reset();
  let lazyLayers: number | null = null;
  const t0 = performance.now();
  if (mode === 'overlayfs') {
    await exec('ctr', ['--address', env.ctd.address, '--namespace', NAMESPACE, 'images', 'pull', '--plain-http', ref], { timeoutMs, signal, label: 'ctr images pull' });
  } else {
    const s = env.snap;
    if (s === undefined) throw new BenchError('soci-ts snapshotter not running');
    const pulled = await exec(SOCI_TS, ['rpull', '--address', env.ctd.address, '--namespace', NAMESPACE, '--snapshotter', SNAPSHOTTER, '--plain-http', ...(rpullJson ? ['--json'] : []), ref], {
      timeoutMs,
      signal,
      label: 'soci-ts rpull',
      env: { ...process.env, SOCI_TS_ROOT: s.root },
    });
    if (rpullJson) lazyLayers = countLazy(pulled.stdout);
  }
  const t1 = performance.now();
  const snapArgs = mode === 'soci-ts' ? ['--snapshotter', SNAPSHOTTER] : [];
  await exec('ctr', ['--address', env.ctd.address, '--namespace', NAMESPACE, 'containers', 'create', ...snapArgs, '--', ref, id, ...cell.workload.command], {
    timeoutMs,
    signal,
    label: 'ctr containers create',
  });
  const t2 = performance.now();
  let lazyMounts: number | null = null;
  if (mode === 'soci-ts' && env.snap !== undefined) lazyMounts = (await mountsUnder(env.snap.root)).filter((m) => m.fstype.startsWith('fuse')).length;
  let ready: { at: number; line: string; bytes: ReturnType<ShapingProxy['snapshot']> } | undefined;
  const t2b = performance.now();
  const started = exec('ctr', ['--address', env.ctd.address, '--namespace', NAMESPACE, 'tasks', 'start', id], {
    timeoutMs,
    signal,
    label: 'ctr tasks start',
    okCodes: [0],
    onLine: (line) => {
      if (ready === undefined && line.includes(cell.workload.readyLine)) ready = { at: performance.now(), line, bytes: proxy.snapshot() };
    },
  });
  try {
    await started;
  } catch (e) {
    if (ready === undefined) throw e;
    // Ready, then failed: the start counted; say so.
    env.warn(`${cell.workload.name} ${mode} run ${run}: the command failed after its ready line: ${(e as Error).message}`);
  }
  const r = ready;
  if (r === undefined) throw new BenchError(`${cell.workload.name}: the container exited without printing a line containing ${JSON.stringify(cell.workload.readyLine)}`);
  const after = proxy.snapshot();
  return {
    run,
    total_ms: r.at - t0,
    pull_ms: t1 - t0,
    create_ms: t2 - t1,
    run_ms: r.at - t2b,
    bytes_fetched: r.bytes.bytesDown,
    bytes_fetched_total: after.bytesDown,
    requests: r.bytes.requests,
    blob_requests: r.bytes.blobRequests,
    range_requests: r.bytes.rangeRequests,
    connections: r.bytes.connections,
    bytes_read: parseBytesRead(r.line),
    lazy_mounts: lazyMounts,
    lazy_layers: lazyLayers,
    ready_line: r.line,
    page_cache_dropped: dropped,
  };
}

// ---------------------------------------------------------------------------------------
// The bench

export async function runColdstart(opts: ColdstartOptions): Promise<ColdstartRunResult> {
  const progress = opts.progress ?? ((s: string) => process.stderr.write(`coldstart: ${s}\n`));
  const warn = (s: string): void => progress(`warning: ${s}`);
  const startedAt = new Date();
  const t0 = performance.now();
  const signal = opts.signal;

  // Checks first: bad input fails before anything is built or started.
  let workloads: Workload[] | undefined;
  if (opts.workloadsFile !== undefined) workloads = await readWorkloadsFile(opts.workloadsFile);
  const only = opts.only === undefined ? undefined : new Set(opts.only);
  if (only !== undefined && workloads !== undefined) {
    for (const n of only) if (!workloads.some((w) => w.name === n)) throw new WorkloadError(`--only: no workload "${n}" in ${opts.workloadsFile ?? ''} (there are: ${workloads.map((w) => w.name).join(', ')})`);
  }
  if (only !== undefined && workloads === undefined) {
    const builtin = ['large-read-few', 'large-read-all', 'small'];
    for (const n of only) if (!builtin.includes(n)) throw new WorkloadError(`--only: no built-in workload "${n}" (there are: ${builtin.join(', ')})`);
  }
  if (typeof process.getuid === 'function' && process.getuid() !== 0) throw new BenchError('the cold-start bench needs root (containerd, runc, overlayfs, FUSE, drop_caches)');
  for (const [cmd, pkg] of [
    ['containerd', 'containerd'],
    ['ctr', 'containerd'],
    ['runc', 'runc'],
    ['docker-registry', 'docker-registry'],
    ['skopeo', 'skopeo'],
    ['umoci', 'umoci'],
  ] as const) {
    if (!(await haveCommand(cmd))) throw new BenchError(`${cmd} is not installed (Debian package ${pkg}; scripts/setup installs it)`);
  }

  const modes: ModeInfo[] = [];
  for (const m of opts.modes) {
    if (m === 'overlayfs') modes.push({ mode: m, available: true });
    else {
      const why = await sociUnavailable();
      modes.push(why === undefined ? { mode: m, available: true } : { mode: m, available: false, reason: why });
      if (why !== undefined) progress(`soci-ts mode unavailable: ${why}`);
    }
  }
  const sociOn = modes.some((m) => m.mode === 'soci-ts' && m.available);
  const machine = await machineInfo();

  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-coldstart-'));
  const cleanup = new Cleanup(dir, warn);
  progress(`working in ${dir} (removed at the end)`);
  const summaries: RunSummary[] = [];
  const networks: NetworkInfo[] = [];
  const infos: WorkloadInfo[] = [];
  try {
    // Images.
    let builtImages = new Map<string, BuiltImage>();
    const expected = new Map<string, number>();
    if (workloads === undefined) {
      const b = await abortable(builtinWorkloads(opts.imageCacheDir, only, progress), signal);
      workloads = b.workloads;
      builtImages = b.images;
      for (const [k, v] of b.expectedRead) expected.set(k, v);
    } else {
      if (only !== undefined) workloads = workloads.filter((w) => only.has(w.name));
      const needed = new Set(workloads.map((w) => w.image).filter((s) => s.startsWith('builtin:')));
      if (needed.size > 0) {
        const { buildImage } = await import('../../test/helpers/images.js');
        const { BUILTIN_IMAGES } = await import('./workloads.js');
        for (const s of needed) {
          progress(`building (or reusing) ${s}`);
          builtImages.set(s, await abortable(buildImage(opts.imageCacheDir, BUILTIN_IMAGES[s.slice(8) as keyof typeof BUILTIN_IMAGES]), signal));
        }
      }
    }
    checkAborted(signal);

    progress('starting the registry');
    const registry: Registry = await abortable(startRegistry({ startTimeoutMs: 60_000 }), signal);
    cleanup.add('registry', () => registry.stop());
    progress(`registry on ${registry.host}, storage in ${registry.rootDir}`);
    const staged = new Map<string, StagedImage>();
    for (const w of workloads) {
      if (staged.has(w.image)) continue;
      progress(`pushing ${w.image}`);
      staged.set(w.image, await abortable(stageImage(w.image, staged.size, registry, builtImages), signal));
    }

    // Indexes.
    const cells: Cell[] = [];
    const indexed = new Map<string, { digest: string | null; error?: string; layers: Set<string> }>();
    for (const w of workloads) {
      const s = staged.get(w.image) as StagedImage;
      const key = `${w.image}\0${JSON.stringify(w.createArgs ?? [])}`;
      let idx = indexed.get(key);
      if (idx === undefined && sociOn) {
        progress(`indexing ${w.image}: soci-ts create --push ${(w.createArgs ?? []).join(' ')}`);
        const store = join(dir, 'create-store');
        try {
          const r = await exec(SOCI_TS, ['create', '--push', '--json', ...(w.createArgs ?? []), `${registry.host}/${s.pushed.repo}:${s.pushed.tag}`], {
            timeoutMs: 30 * 60_000,
            signal,
            label: 'soci-ts create --push',
            env: { ...process.env, SOCI_TS_ROOT: store },
          });
          const out = JSON.parse(r.stdout) as { indexes: Array<{ index: string; layers: Array<{ digest: string; ztoc?: string }> }> };
          const first = out.indexes[0];
          idx = { digest: first?.index ?? null, layers: new Set((first?.layers ?? []).filter((l) => l.ztoc !== undefined).map((l) => l.digest)) };
        } catch (e) {
          if (signal?.aborted === true) throw e;
          idx = { digest: null, error: (e as Error).message.slice(0, 300), layers: new Set() };
          warn(`no SOCI index for ${w.name}: ${idx.error ?? ''}`);
        } finally {
          // A fresh machine has no local zTOCs: the lazy side fetches them.
          await rm(store, { recursive: true, force: true });
        }
        indexed.set(key, idx);
      }
      const info: WorkloadInfo = {
        name: w.name,
        ...(w.description !== undefined ? { description: w.description } : {}),
        source: w.image,
        ref: `${s.pushed.repo}:${s.pushed.tag}`,
        command: w.command,
        readyLine: w.readyLine,
        image_bytes: s.imageBytes,
        layer_bytes: s.layerBytes,
        layers: s.pushed.layers.map((l) => ({ digest: l.digest, size: l.size, media_type: l.mediaType, indexed: idx?.layers.has(l.digest) ?? false })),
        soci_index: idx?.digest ?? null,
        ...(idx?.error !== undefined ? { soci_index_error: idx.error } : {}),
        ...(expected.has(w.name) ? { expected_bytes_read: expected.get(w.name) } : {}),
      };
      infos.push(info);
      cells.push({ workload: w, staged: s, info });
    }
    checkAborted(signal);

    // Networks.
    const proxies = new Map<NetworkName, ShapingProxy>();
    const largest = [...staged.values()].flatMap((s) => s.pushed.layers.map((l) => ({ repo: s.pushed.repo, ...l }))).sort((a, b) => b.size - a.size)[0];
    for (const n of opts.networks) {
      const shape = n === 'wan' ? { rttMs: opts.rttMs, bandwidthBps: opts.bandwidthBps } : undefined;
      const proxy = await ShapingProxy.start({ upstreamHost: '127.0.0.1', upstreamPort: registry.port, ...(shape !== undefined ? { shape } : {}) });
      cleanup.add(`${n} proxy`, () => proxy.close());
      proxies.set(n, proxy);
      const info: NetworkInfo = {
        name: n,
        requested: shape === undefined ? null : { rtt_ms: shape.rttMs, bandwidth_mbit: shape.bandwidthBps / 1e6 },
        measured: null,
        how: shape === undefined ? 'loopback TCP through the counting proxy (no shaping)' : 'user-space proxy on loopback: per-direction delay of RTT/2, handshake RTT, shared FIFO wire at the bandwidth',
      };
      if (largest !== undefined) {
        progress(`measuring the ${n} link through the proxy`);
        try {
          const rangeBytes = Math.min(largest.size, shape === undefined ? 64 << 20 : Math.max(1 << 20, Math.round((shape.bandwidthBps / 8) * 2)));
          const m = await abortable(measureLink(proxy.host, { smallPath: '/v2/', largePath: `/v2/${largest.repo}/blobs/${largest.digest}`, rangeBytes }), signal);
          info.measured = { rtt_ms: m.rttMs, bandwidth_mbit: m.bandwidthBps / 1e6 };
        } catch (e) {
          if (signal?.aborted === true) throw e;
          info.measure_error = (e as Error).message;
        }
      }
      networks.push(info);
    }

    progress('starting containerd' + (sociOn ? ' and the soci-ts snapshotter' : ''));
    const snapAddress = join(dir, 'soci-ts.sock');
    const ctd = await abortable(startContainerd({ proxyPlugins: [{ name: SNAPSHOTTER, address: snapAddress }], namespace: NAMESPACE, startTimeoutMs: 60_000 }), signal);
    cleanup.add('containerd', () => ctd.stop());
    progress(`containerd in ${ctd.dir}`);
    const env: Env = { opts, progress, warn, cleanup, dir, ctd, snap: undefined, proxies, seq: 0 };
    if (sociOn) {
      env.snap = { address: snapAddress, root: '', daemon: undefined, generation: 0 };
      cleanup.add('soci-ts snapshotter', async () => {
        const s = env.snap;
        if (s?.daemon !== undefined) {
          // Its snapshots first (containerd would otherwise keep asking it to), then the daemon.
          await s.daemon.stop();
          await stopProcessesMentioning(s.root);
          await removeTree(s.root);
        }
      });
      await restartSnapshotter(env);
    }

    // The runs.
    const total = opts.networks.length * cells.length * opts.runs * modes.length;
    let done = 0;
    for (const network of opts.networks) {
      const netInfo = networks.find((n) => n.name === network);
      for (const cell of cells) {
        const samples = new Map<ModeName, Sample[]>(modes.map((m) => [m.mode, []]));
        const failed = new Map<ModeName, string>();
        for (let run = 1; run <= opts.runs; run++) {
          const order = run % 2 === 1 ? modes : [...modes].reverse();
          for (const m of order) {
            done++;
            if (!m.available || failed.has(m.mode)) continue;
            checkAborted(signal);
            const label = `[${done}/${total}] ${network} ${cell.workload.name} ${m.mode} run ${run}/${opts.runs}`;
            try {
              const s = await runOnce(env, cell, network, m.mode, run);
              samples.get(m.mode)?.push(s);
              progress(`${label}: ${(s.total_ms / 1000).toFixed(2)} s (pull ${(s.pull_ms / 1000).toFixed(2)}, create ${(s.create_ms / 1000).toFixed(2)}, run ${(s.run_ms / 1000).toFixed(2)}), ${(s.bytes_fetched / 1e6).toFixed(1)} MB fetched`);
            } catch (e) {
              if (signal?.aborted === true) throw e;
              const msg = (e as Error).message;
              progress(`${label}: failed: ${msg}`);
              // A first run that fails will fail again: give up on this cell.
              if ((samples.get(m.mode)?.length ?? 0) === 0) failed.set(m.mode, msg);
            } finally {
              if (signal?.aborted !== true) {
                const left = await emptyContainerd(env, m.mode === 'soci-ts' ? [SNAPSHOTTER, 'overlayfs'] : ['overlayfs']).catch((e: unknown) => [`cleanup failed: ${(e as Error).message}`]);
                if (left.length > 0) warn(`after ${label}: removed leftovers: ${left.join(', ')}`);
                if (m.mode === 'soci-ts') await settleSnapshotter(env, `${network}-${cell.workload.name}-run${run}`);
              }
            }
          }
        }
        for (const m of modes) {
          const base = { workload: cell.workload.name, network, mode: m.mode, image_bytes: cell.staged.imageBytes };
          if (!m.available) {
            summaries.push(unavailable(base, m.reason ?? 'unavailable'));
            continue;
          }
          const sum = summarize(base, samples.get(m.mode) ?? [], failed.get(m.mode));
          if (m.mode === 'soci-ts') {
            const bw = network === 'wan' ? opts.bandwidthBps : (netInfo?.measured?.bandwidth_mbit ?? 0) * 1e6;
            sum.ideal_ms = sum.bytes_fetched !== null && bw > 0 ? idealMs(sum.bytes_fetched, bw) : null;
          }
          summaries.push(sum);
        }
      }
    }
  } finally {
    await cleanup.run();
  }

  machine.load_average_end = loadavg();
  const sp = speedups(summaries);
  const results: ColdstartResults = {
    version: 1,
    started_at: startedAt.toISOString(),
    finished_at: new Date().toISOString(),
    duration_s: (performance.now() - t0) / 1000,
    options: {
      runs: opts.runs,
      networks: opts.networks,
      modes: opts.modes,
      ideal: opts.ideal,
      rtt_ms: opts.rttMs,
      bandwidth_mbit: opts.bandwidthBps / 1e6,
      workloads_file: opts.workloadsFile ?? null,
    },
    machine,
    modes,
    networks,
    workloads: infos,
    runs: summaries,
    speedups: sp,
    targets: targetChecks(summaries, sp, opts.networks),
    method: METHOD,
  };
  const files = await writeReport(results, opts.outDir);
  return { results, files, table: renderTable(results) };
}

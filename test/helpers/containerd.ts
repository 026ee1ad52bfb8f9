/**
 * A real containerd for tests: Debian's containerd 1.6 started with a config written into a
 * temp dir (its own root, state, gRPC and ttrpc sockets; the CRI plugin disabled), optionally
 * with proxy snapshotter plugins, and `ctr` bound to it.
 *
 * Readiness: the gRPC socket exists and `ctr version` gets the server's answer. Failures
 * (containerd exits, or is not ready in time) reject with ContainerdError carrying its log.
 *
 * Nothing outlives the test: containerd runs in its own process group; stop() SIGTERMs it
 * (SIGKILL after 5 s), kills runc shims started for this containerd (their command line names
 * its socket), unmounts whatever is still mounted under the temp dir and removes it. An `exit`
 * hook does the same synchronously, and a detached watchdog shell does it if this process is
 * SIGKILLed.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { rmSync } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { CommandError, FixtureError, FixtureUnavailableError, run, type RunResult } from './layers.js';

export interface ProxyPlugin {
  /** The plugin name (what `--snapshotter NAME` selects). */
  name: string;
  /** Default `snapshot`. */
  type?: 'snapshot' | 'content';
  /** The plugin's unix socket. */
  address: string;
}

export interface StartContainerdOptions {
  proxyPlugins?: readonly ProxyPlugin[];
  /** How long to wait for readiness (default 30 s). */
  startTimeoutMs?: number;
  /** containerd log level (default `info`). */
  logLevel?: 'debug' | 'info' | 'warn' | 'error';
  /** Namespace for ctr (default `default`). */
  namespace?: string;
  /** TOML appended to the generated config (extra plugin settings). */
  extraConfig?: string;
}

export interface CtrOptions {
  /** Exit codes that count as success (default [0]); others reject with CommandError. */
  okCodes?: readonly number[];
  /** Give up after this long (ctr's --timeout; default none). */
  timeoutMs?: number;
}

export interface Containerd {
  /** The temp dir holding config, root, state and sockets; removed by stop(). */
  readonly dir: string;
  /** The gRPC socket (`ctr -a`). */
  readonly address: string;
  readonly configPath: string;
  /** containerd's root (content store, metadata, built-in snapshotters). */
  readonly root: string;
  readonly state: string;
  readonly namespace: string;
  /** containerd's pid (also its process group id). */
  readonly pid: number;
  /** True until stop() or the process exits. */
  readonly running: boolean;
  /** containerd's stdout+stderr (last 512 KiB). */
  logs(): string;
  /** Runs `ctr --address ADDRESS --namespace NS ARGS…`. */
  ctr(args: readonly string[], opts?: CtrOptions): Promise<RunResult>;
  /** Stops containerd and its shims, unmounts leftovers, removes `dir`. Idempotent. */
  stop(): Promise<void>;
}

/** containerd could not be started or misbehaved; `log` is its output. */
export class ContainerdError extends FixtureError {
  constructor(
    reason: string,
    readonly log: string,
    options?: { cause?: unknown },
  ) {
    super('containerd', `${reason}${log === '' ? '' : `\n--- containerd log (tail) ---\n${log.slice(-8000)}`}`, options);
  }
}

/** TOML string literal. */
const q = (s: string): string => JSON.stringify(s);

/** The config.toml for a containerd rooted in `dir`. */
export function containerdConfig(dir: string, opts: StartContainerdOptions = {}): string {
  const lines = [
    'version = 2',
    `root = ${q(path.join(dir, 'root'))}`,
    `state = ${q(path.join(dir, 'state'))}`,
    // No kubelet here: the CRI plugin only adds start-up time and CNI warnings.
    'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
    '',
    '[grpc]',
    `  address = ${q(path.join(dir, 'containerd.sock'))}`,
    '',
    '[ttrpc]',
    `  address = ${q(path.join(dir, 'containerd.sock.ttrpc'))}`,
    '',
    '[debug]',
    `  level = ${q(opts.logLevel ?? 'info')}`,
  ];
  for (const p of opts.proxyPlugins ?? []) {
    lines.push('', `[proxy_plugins.${q(p.name)}]`, `  type = ${q(p.type ?? 'snapshot')}`, `  address = ${q(p.address)}`);
  }
  if (opts.extraConfig !== undefined) lines.push('', opts.extraConfig);
  return lines.join('\n') + '\n';
}

// ---------------------------------------------------------------------------------------
// Process handling

const live = new Set<ContainerdHandle>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const c of live) c.killSync();
  });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

class Tail {
  private text = '';
  constructor(private readonly max: number) {}
  push(s: string): void {
    this.text += s;
    if (this.text.length > this.max * 2) this.text = this.text.slice(-this.max);
  }
  toString(): string {
    return this.text.slice(-this.max);
  }
}

/** Mount points at or under `dir`, deepest first (from /proc/self/mountinfo). */
async function mountsUnder(dir: string): Promise<string[]> {
  const info = await fsp.readFile('/proc/self/mountinfo', 'utf8');
  return mountsUnderText(info, dir);
}

function mountsUnderText(info: string, dir: string): string[] {
  const out: string[] = [];
  for (const line of info.split('\n')) {
    const mp = line.split(' ')[4];
    if (mp === undefined) continue;
    // mountinfo escapes space, tab, newline and backslash as octal.
    const p = mp.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    if (p === dir || p.startsWith(dir + '/')) out.push(p);
  }
  return out.sort((a, b) => b.length - a.length);
}

/** Pids of processes whose command line contains `needle` as one argument. */
async function pidsWithArg(needle: string): Promise<number[]> {
  const out: number[] = [];
  for (const name of await fsp.readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const args = (await fsp.readFile(`/proc/${name}/cmdline`, 'utf8')).split('\0');
      if (args.includes(needle)) out.push(Number(name));
    } catch {
      // exited meanwhile
    }
  }
  return out;
}

class ContainerdHandle implements Containerd {
  readonly address: string;
  readonly configPath: string;
  readonly root: string;
  readonly state: string;
  readonly pid: number;
  private exited = false;
  private exitWaiters: (() => void)[] = [];
  private stopping: Promise<void> | undefined;

  constructor(
    readonly dir: string,
    readonly namespace: string,
    private readonly child: ChildProcess,
    private readonly watchdog: ChildProcess,
    private readonly log: Tail,
  ) {
    this.address = path.join(dir, 'containerd.sock');
    this.configPath = path.join(dir, 'config.toml');
    this.root = path.join(dir, 'root');
    this.state = path.join(dir, 'state');
    if (child.pid === undefined) throw new ContainerdError('no pid', '');
    this.pid = child.pid;
    child.on('close', () => {
      this.exited = true;
      for (const w of this.exitWaiters.splice(0)) w();
    });
  }

  get running(): boolean {
    return !this.exited && this.stopping === undefined;
  }

  get hasExited(): boolean {
    return this.exited;
  }

  logs(): string {
    return this.log.toString();
  }

  async ctr(args: readonly string[], opts: CtrOptions = {}): Promise<RunResult> {
    const global = ['--address', this.address, '--namespace', this.namespace, '--connect-timeout', '10s'];
    if (opts.timeoutMs !== undefined) global.push('--timeout', `${Math.ceil(opts.timeoutMs / 1000)}s`);
    return run('ctr', [...global, ...args], { okCodes: opts.okCodes });
  }

  waitExit(ms: number): Promise<boolean> {
    if (this.exited) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), ms);
      this.exitWaiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  private signal(sig: NodeJS.Signals): void {
    try {
      process.kill(-this.pid, sig);
    } catch {
      // group gone
    }
  }

  stop(): Promise<void> {
    this.stopping ??= this.doStop();
    return this.stopping;
  }

  private async doStop(): Promise<void> {
    if (!this.exited) {
      this.signal('SIGTERM');
      if (!(await this.waitExit(5000))) {
        this.signal('SIGKILL');
        await this.waitExit(5000);
      }
    }
    // Shims outlive containerd by design (own session): find them by the socket they name.
    for (const pid of await pidsWithArg(this.address)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
    for (const m of await mountsUnder(this.dir)) {
      await run('umount', ['-l', m], { okCodes: [0, 1, 32] }).catch(() => undefined);
    }
    this.watchdog.kill('SIGKILL');
    // --one-file-system: never descend into something still mounted.
    await run('rm', ['-rf', '--one-file-system', '--', this.dir], { okCodes: [0, 1] }).catch(() => undefined);
    live.delete(this);
  }

  /** For the exit hook: synchronous best effort. */
  killSync(): void {
    this.signal('SIGKILL');
    try {
      const info = spawnSync('cat', ['/proc/self/mountinfo'], { encoding: 'utf8' }).stdout;
      for (const m of mountsUnderText(info ?? '', this.dir)) spawnSync('umount', ['-l', m]);
    } catch {
      // best effort
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Is something accepting connections on this unix socket? */
function socketAnswers(p: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(p);
    const done = (v: boolean): void => {
      s.destroy();
      resolve(v);
    };
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
    s.setTimeout(1000, () => done(false));
  });
}

/** Starts containerd in a fresh temp dir and waits until it answers `ctr version`. */
export async function startContainerd(opts: StartContainerdOptions = {}): Promise<Containerd> {
  installExitHook();
  const dir = await fsp.mkdtemp(path.join(tmpdir(), 'soci-ts-containerd-'));
  const configPath = path.join(dir, 'config.toml');
  await fsp.writeFile(configPath, containerdConfig(dir, opts));

  const log = new Tail(512 << 10);
  const child = spawn('containerd', ['--config', configPath], { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  const spawned = await new Promise<Error | undefined>((resolve) => {
    child.once('spawn', () => resolve(undefined));
    child.once('error', (e) => resolve(e));
  });
  if (spawned !== undefined || child.pid === undefined) {
    await fsp.rm(dir, { recursive: true, force: true });
    if ((spawned as NodeJS.ErrnoException | undefined)?.code === 'ENOENT') {
      throw new FixtureUnavailableError('containerd', 'not installed (Debian package containerd)', { cause: spawned });
    }
    throw new ContainerdError('cannot spawn containerd', '', { cause: spawned });
  }
  child.stdout?.on('data', (b: Buffer) => log.push(b.toString()));
  child.stderr?.on('data', (b: Buffer) => log.push(b.toString()));
  child.unref();
  for (const s of [child.stdout, child.stderr]) if (s instanceof net.Socket) s.unref();

  // Outlives a SIGKILLed test process (own group): EOF on its stdin means we are gone.
  const script =
    'read _ignored; kill -s KILL -- "-$1" 2>/dev/null; ' +
    'for p in /proc/[0-9]*; do tr "\\0" "\\n" < "$p/cmdline" 2>/dev/null | grep -qxF -- "$2/containerd.sock" && kill -s KILL "${p#/proc/}" 2>/dev/null; done; ' +
    'awk -v d="$2" \'$5 == d || index($5, d "/") == 1 { print $5 }\' /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m"; done; ' +
    'rm -rf --one-file-system -- "$2"';
  const watchdog = spawn('sh', ['-c', script, 'soci-ts-containerd-watchdog', String(child.pid), dir], { detached: true, stdio: ['pipe', 'ignore', 'ignore'] });
  watchdog.on('error', () => undefined);
  watchdog.unref();
  if (watchdog.stdin instanceof net.Socket) watchdog.stdin.unref();

  const handle = new ContainerdHandle(dir, opts.namespace ?? 'default', child, watchdog, log);
  live.add(handle);
  const timeoutMs = opts.startTimeoutMs ?? 30_000;
  const deadline = Date.now() + timeoutMs;
  let last = 'socket not there yet';
  try {
    for (;;) {
      if (handle.hasExited) {
        throw new ContainerdError(`containerd exited (code ${String(child.exitCode)}, signal ${String(child.signalCode)}) before it was ready`, log.toString());
      }
      if (await socketAnswers(handle.address)) {
        try {
          const v = await run('ctr', ['--address', handle.address, '--connect-timeout', '2s', 'version']);
          if (/Server:/.test(v.stdout)) return handle;
          last = `ctr version printed no server part: ${v.stdout.slice(0, 200)}`;
        } catch (e) {
          last = e instanceof CommandError ? e.stderr.trim().slice(0, 300) : (e as Error).message;
        }
      }
      if (Date.now() > deadline) throw new ContainerdError(`not ready after ${timeoutMs} ms (${last})`, log.toString());
      await sleep(100);
    }
  } catch (e) {
    await handle.stop();
    throw e;
  }
}

// ---------------------------------------------------------------------------------------
// Parsing ctr's tables

/** Rows of a ctr table (header line first): cells split on runs of 2+ spaces or column starts. */
export function parseCtrTable(text: string): Record<string, string>[] {
  const lines = text.split('\n').filter((l) => l.trim() !== '');
  const header = lines[0];
  if (header === undefined) return [];
  // Column starts are where header words begin; ctr pads with spaces (tabwriter).
  const cols: { name: string; start: number }[] = [];
  const re = /\S+/g;
  for (let m = re.exec(header); m !== null; m = re.exec(header)) cols.push({ name: m[0], start: m.index });
  return lines.slice(1).map((line) => {
    const row: Record<string, string> = {};
    cols.forEach((c, i) => {
      const end = i + 1 < cols.length ? cols[i + 1].start : line.length;
      row[c.name] = line.slice(c.start, end).trim();
    });
    return row;
  });
}

/**
 * The snapshotter's side of the FUSE manager (daemon/fuse-manager.ts): a client of its socket
 * protocol (daemon/fuse-protocol.ts), and starting the manager when none answers.
 *
 * The manager is started as `node <this CLI> fuse-manager ...` detached from the snapshotter: its
 * own session and process group (setsid), stdin closed, so that neither a signal to the
 * snapshotter's process group, nor systemd's `KillMode=process` stop, nor the snapshotter's death
 * reaches it. It writes its JSON log lines itself (`--log-file`, rotated by size: see
 * daemon/log-file.ts); its stdout and stderr (what is not a log line: a crash's stack trace, Node's
 * warnings) go to a separate file, started afresh at each start with the previous one kept as
 * `<file>.1`.
 */
import { spawn } from 'node:child_process';
import { mkdir, open, readFile, rename, stat } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { dirname } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../fetcher/index.js';
import { FuseManagerError, LineSplitter, protocolsOverlap, type HelloResult, type MethodName, type Methods } from './fuse-protocol.js';
import { buildIdentity, type BuildIdentity } from './version.js';

/** How long a call may take before the client gives up on it (mounts fetch a zTOC first). */
const CALL_TIMEOUT_MS: Record<MethodName, number> = {
  hello: 10_000,
  mount: 300_000,
  unmount: 60_000,
  list: 30_000,
  status: 30_000,
  release: 60_000,
  metrics: 30_000,
  preload: 60_000,
};

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  timer: NodeJS.Timeout;
}

export class FuseManagerClient {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private closedFlag = false;
  private readonly closeListeners: Array<(err: Error | undefined) => void> = [];

  private constructor(
    private readonly sock: Socket,
    readonly socketPath: string,
  ) {
    const splitter = new LineSplitter(
      (line) => this.onLine(line),
      () => this.fail(new FuseManagerError('internal', socketPath, 'the FUSE manager sent an over-long line')),
    );
    sock.on('data', (b: Buffer) => splitter.push(b));
    sock.on('error', (err) => this.fail(new FuseManagerError('unavailable', socketPath, `connection to the FUSE manager failed: ${err.message}`, { cause: err })));
    sock.on('close', () => this.fail(new FuseManagerError('unavailable', socketPath, 'the FUSE manager closed the connection')));
  }

  /** Connects to a manager's socket; rejects with FuseManagerError `unavailable` when nothing answers. */
  static connect(socketPath: string, timeoutMs = 5000): Promise<FuseManagerClient> {
    return new Promise((resolve, reject) => {
      const sock = connect(socketPath);
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new FuseManagerError('unavailable', socketPath, `no FUSE manager answers within ${timeoutMs} ms`));
      }, timeoutMs);
      sock.once('connect', () => {
        clearTimeout(timer);
        sock.removeAllListeners('error');
        resolve(new FuseManagerClient(sock, socketPath));
      });
      sock.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(new FuseManagerError('unavailable', socketPath, `no FUSE manager is running (${err.code ?? err.message})`, { cause: err }));
      });
    });
  }

  get closed(): boolean {
    return this.closedFlag;
  }

  /** Called once when the connection ends (the manager died or closed it, or close() was called). */
  onClose(fn: (err: Error | undefined) => void): void {
    if (this.closedFlag) fn(undefined);
    else this.closeListeners.push(fn);
  }

  call<M extends MethodName>(method: M, params: Methods[M]['params']): Promise<Methods[M]['result']> {
    if (this.closedFlag) return Promise.reject(new FuseManagerError('unavailable', this.socketPath, 'the connection to the FUSE manager is closed'));
    const id = this.nextId++;
    const ms = (CALL_TIMEOUT_MS as Record<string, number | undefined>)[method] ?? 30_000;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new FuseManagerError('unavailable', this.socketPath, `the FUSE manager did not answer ${method} within ${ms} ms`));
      }, ms);
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, timer });
      this.sock.write(JSON.stringify({ id, method, params }) + '\n');
    });
  }

  hello(): Promise<HelloResult> {
    return this.call('hello', {});
  }

  close(): void {
    if (this.closedFlag) return;
    this.fail(undefined);
    this.sock.destroy();
  }

  private onLine(line: string): void {
    let msg: { id?: unknown; result?: unknown; error?: unknown };
    try {
      msg = JSON.parse(line) as typeof msg;
    } catch {
      this.fail(new FuseManagerError('internal', this.socketPath, 'the FUSE manager sent a line that is not JSON'));
      return;
    }
    if (typeof msg.id !== 'number') {
      // An error about the connection itself (a request it could not parse).
      if (msg.error !== undefined) this.fail(FuseManagerError.fromWire(msg.error));
      return;
    }
    const p = this.pending.get(msg.id);
    if (p === undefined) return;
    this.pending.delete(msg.id);
    clearTimeout(p.timer);
    if (msg.error !== undefined) p.reject(FuseManagerError.fromWire(msg.error));
    else p.resolve(msg.result);
  }

  private fail(err: Error | undefined): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    const e = err ?? new FuseManagerError('unavailable', this.socketPath, 'the connection to the FUSE manager is closed');
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(e);
    }
    this.pending.clear();
    this.sock.destroy();
    for (const fn of this.closeListeners.splice(0)) fn(err);
  }
}

export interface ManagerLaunch {
  socket: string;
  /** Arguments after `fuse-manager` (root, socket, settings, its log file). */
  args: readonly string[];
  /** The manager's log (named in errors; its last lines are quoted when it does not start). */
  logFile: string;
  /** stdout and stderr of the manager go here (default: `logFile` with `.out` for `.log`). */
  outFile?: string;
  /** How long to wait for a started manager to answer (default 30 s). */
  startTimeoutMs?: number;
}

/** Where the manager's stdout and stderr go. */
export function managerOutFile(launch: ManagerLaunch): string {
  return launch.outFile ?? launch.logFile.replace(/(\.log)?$/, '.out');
}

/** The command line that runs this CLI again (the node binary, its flags, the script). */
function selfCommand(): { cmd: string; args: string[] } {
  const script = process.argv[1];
  if (script === undefined) throw new FuseManagerError('unavailable', 'fuse-manager', 'cannot tell which script runs the CLI (process.argv[1] is missing)');
  return { cmd: process.execPath, args: [...process.execArgv, script] };
}

/**
 * Starts a FUSE manager detached (see the module comment) and waits until it answers `hello`.
 * Rejects with FuseManagerError `unavailable` naming the log file when it exits or does not answer.
 */
export async function startFuseManager(launch: ManagerLaunch, logger: Logger): Promise<{ client: FuseManagerClient; hello: HelloResult }> {
  await mkdir(dirname(launch.logFile), { recursive: true, mode: 0o700 });
  const outFile = managerOutFile(launch);
  // The previous manager's output (why it died, maybe) is kept once.
  const prev = await stat(outFile).catch(() => undefined);
  if (prev !== undefined && prev.size > 0) await rename(outFile, `${outFile}.1`).catch(() => undefined);
  const out = await open(outFile, 'w', 0o600);
  const self = selfCommand();
  let child;
  try {
    child = spawn(self.cmd, [...self.args, 'fuse-manager', ...launch.args], { detached: true, stdio: ['ignore', out.fd, out.fd] });
  } finally {
    await out.close();
  }
  let exited: string | undefined;
  child.on('exit', (code, signal) => (exited = `exited with code ${String(code)}, signal ${String(signal)}`));
  child.on('error', (err) => (exited = `could not start: ${err.message}`));
  child.unref();
  logger.info('started a FUSE manager', { pid: child.pid, socket: launch.socket, log: launch.logFile });
  const deadline = Date.now() + (launch.startTimeoutMs ?? 30_000);
  let last: unknown;
  for (;;) {
    if (exited !== undefined) {
      // Another manager may have won the race for the socket: use it.
      const c = await tryHello(launch.socket);
      if (c !== undefined) return c;
      const tails: string[] = [];
      for (const f of [outFile, launch.logFile]) {
        const tail = (await readFile(f, 'utf8').catch(() => '')).trim().split('\n').slice(-5).join('\n');
        if (tail !== '') tails.push(`last lines of ${f}:\n${tail}`);
      }
      throw new FuseManagerError('unavailable', launch.socket, `the FUSE manager ${exited}; ${tails.length > 0 ? tails.join('\n') : `${outFile} and ${launch.logFile} say nothing`}`);
    }
    const c = await tryHello(launch.socket).catch((err: unknown) => {
      last = err;
      return undefined;
    });
    if (c !== undefined) return c;
    if (Date.now() > deadline) {
      throw new FuseManagerError('unavailable', launch.socket, `the FUSE manager (pid ${String(child.pid)}) does not answer after ${launch.startTimeoutMs ?? 30_000} ms (${last instanceof Error ? last.message : 'no answer'}); see ${launch.logFile}`);
    }
    await sleep(100);
  }
}

async function tryHello(socket: string): Promise<{ client: FuseManagerClient; hello: HelloResult } | undefined> {
  let client: FuseManagerClient;
  try {
    client = await FuseManagerClient.connect(socket, 2000);
  } catch {
    return undefined;
  }
  try {
    return { client, hello: await client.hello() };
  } catch {
    client.close();
    return undefined;
  }
}

/** How a running manager's build relates to this process's. */
export type ManagerBuildMatch =
  /** The same version and build. */
  | 'same'
  /** Another version or build that speaks a protocol this one speaks. */
  | 'compatible'
  /** No protocol in common. */
  | 'incompatible';

export function matchBuild(hello: HelloResult, ours: BuildIdentity): ManagerBuildMatch {
  if (!protocolsOverlap(hello, ours)) return 'incompatible';
  return hello.version === ours.version && hello.build === ours.build ? 'same' : 'compatible';
}

/** `soci-ts 0.1.0, build abc123…, FUSE manager protocol 1` (or protocols 1–2). */
export function describeBuild(b: { version: string; build?: string; protocol: number; oldestProtocol?: number }): string {
  const lo = b.oldestProtocol ?? b.protocol;
  return `soci-ts ${b.version}, build ${b.build ?? 'unknown (it predates build ids)'}, FUSE manager protocol ${lo === b.protocol ? String(b.protocol) : `${lo}–${b.protocol}`}`;
}

/** What to do about a manager of another build (it is named by pid). */
export function upgradeAdvice(pid: number): string {
  return `to move its mounts to this build, stop the containers that run on lazily pulled images, then \`kill -TERM ${pid}\` (the manager unmounts its layers and exits); the snapshotter then starts a FUSE manager of its own build and mounts the lazy snapshots again (a manager that serves no mount is replaced at the snapshotter's start without this)`;
}

/**
 * The running FUSE manager speaks no protocol this snapshotter speaks, and it serves mounts
 * (running containers read through it), so it is left alone and the snapshotter does not drive it.
 */
export class FuseManagerIncompatibleError extends Error {
  constructor(
    readonly socket: string,
    readonly manager: HelloResult,
    readonly ours: BuildIdentity,
  ) {
    super(
      `the running FUSE manager on ${socket} (pid ${manager.pid}; ${describeBuild(manager)}) cannot be driven by this snapshotter (${describeBuild(ours)}): ` +
        `no FUSE manager protocol in common. It serves ${manager.mounts} lazily mounted layer(s) for running containers, so it is left running and untouched. ` +
        `To fix: ${upgradeAdvice(manager.pid)}; or go back to soci-ts ${manager.version} until then.`,
    );
    this.name = 'FuseManagerIncompatibleError';
  }
}

export interface ConnectedManager {
  client: FuseManagerClient;
  hello: HelloResult;
  /** A new manager was started (none answered, or an idle one of another build was replaced). */
  started: boolean;
  /** How the manager's build relates to ours ('same' for one we started). */
  match: ManagerBuildMatch;
  /** The pid of a manager of another build that was replaced because it served no mount. */
  replaced?: HelloResult;
}

/** Whether /proc/PID/cmdline is a soci-ts fuse-manager's (so a pid from a socket is not some other process). */
async function isFuseManagerProcess(pid: number): Promise<boolean> {
  const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  return cmd.split('\0').includes('fuse-manager');
}

/** SIGTERMs an idle manager and waits until it is gone (its socket stops answering and the process ends). */
async function stopIdleManager(hello: HelloResult, socket: string, timeoutMs = 30_000): Promise<void> {
  if (await isFuseManagerProcess(hello.pid)) {
    try {
      process.kill(hello.pid, 'SIGTERM');
    } catch {
      // gone already
    }
  }
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const gone = !(await isFuseManagerProcess(hello.pid));
    const c = gone ? await tryHello(socket) : undefined;
    c?.client.close();
    if (gone && (c === undefined || c.hello.instance !== hello.instance)) return;
    if (Date.now() > deadline) throw new FuseManagerError('unavailable', socket, `the idle FUSE manager of another build (pid ${hello.pid}) did not exit within ${timeoutMs} ms of SIGTERM`);
    await sleep(100);
  }
}

/**
 * Connects to the running manager, or starts one. A running manager of another build is:
 * reattached when it serves mounts and shares a protocol (`match: 'compatible'`: the caller
 * reports it); replaced by one of this build when it serves no mount; refused with
 * {@link FuseManagerIncompatibleError} when it serves mounts and shares no protocol.
 */
export async function connectOrStartFuseManager(launch: ManagerLaunch, logger: Logger): Promise<ConnectedManager> {
  const ours = await buildIdentity();
  const running = await tryHello(launch.socket);
  let replaced: HelloResult | undefined;
  if (running !== undefined) {
    const match = matchBuild(running.hello, ours);
    if (match === 'same') return { ...running, started: false, match };
    if (running.hello.mounts > 0) {
      if (match === 'compatible') return { ...running, started: false, match };
      running.client.close();
      throw new FuseManagerIncompatibleError(launch.socket, running.hello, ours);
    }
    running.client.close();
    logger.warn('replacing an idle FUSE manager of another build (it serves no mount)', {
      pid: running.hello.pid,
      managerVersion: running.hello.version,
      managerBuild: running.hello.build,
      managerProtocol: running.hello.protocol,
      version: ours.version,
      build: ours.build,
      protocol: ours.protocol,
    });
    await stopIdleManager(running.hello, launch.socket);
    replaced = running.hello;
  }
  const started = await startFuseManager(launch, logger);
  // Another snapshotter may have won the race for the socket with a manager of its own.
  const match = matchBuild(started.hello, ours);
  if (match === 'incompatible') {
    started.client.close();
    throw new FuseManagerIncompatibleError(launch.socket, started.hello, ours);
  }
  return { ...started, started: true, match, ...(replaced !== undefined ? { replaced } : {}) };
}

/**
 * The soci-ts snapshotter daemon for tests: `bin/soci-ts snapshotter` of this checkout as a
 * child process (own process group) on a socket and root of the caller's choosing, ready when
 * it answers a gRPC List on its socket.
 *
 * kill('SIGKILL') simulates a crash; start() again with the same root and socket is a restart.
 * Nothing outlives the test: an `exit` hook SIGKILLs what is still running.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { SnapshotsClient } from '../../daemon/grpc-api.js';
import { FuseManagerClient } from '../../daemon/fuse-manager-client.js';
import { CommandError, FixtureError, run, type RunResult } from './layers.js';

/** bin/soci-ts of this checkout (dist/test/helpers → ../../../bin). */
export const SOCI_TS_BIN = fileURLToPath(new URL('../../../bin/soci-ts', import.meta.url));

export interface StartSnapshotterOptions {
  /** The daemon's root (e.g. under {@link snapshotterTempDir}; the caller removes it). */
  root: string;
  /** Its socket. */
  address: string;
  /** `--log-level` (default debug; not passed with configOnly). */
  logLevel?: 'debug' | 'info' | 'warn' | 'error';
  /** Pass no --root/--address/--log-level: `args` name a config file with the same root and address. */
  configOnly?: boolean;
  /** More arguments after `snapshotter`. */
  args?: readonly string[];
  startTimeoutMs?: number;
  /** More environment variables (on top of this process's). */
  env?: NodeJS.ProcessEnv;
}

export class SnapshotterDaemonError extends FixtureError {
  constructor(
    reason: string,
    readonly log: string,
    options?: { cause?: unknown },
  ) {
    super('soci-ts snapshotter', `${reason}${log === '' ? '' : `\n--- daemon log (tail) ---\n${log.slice(-6000)}`}`, options);
  }
}

export interface SnapshotterDaemon {
  readonly root: string;
  readonly address: string;
  readonly pid: number;
  /** stderr (JSON log lines) of this process, last 1 MiB. */
  logs(): string;
  /** Parsed log lines. */
  logLines(): Record<string, unknown>[];
  kill(signal: NodeJS.Signals): void;
  /** Resolves with the exit code or signal once the process ended (or undefined after `ms`). */
  waitExit(ms: number): Promise<{ code: number | null; signal: NodeJS.Signals | null } | undefined>;
  /** SIGTERM, then SIGKILL after 5 s. */
  stop(): Promise<void>;
}

const live = new Set<ChildProcess>();
let hooked = false;

function hook(): void {
  if (hooked) return;
  hooked = true;
  process.on('exit', () => {
    for (const c of live) {
      try {
        if (c.pid !== undefined) process.kill(-c.pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A temp dir for a daemon's root and socket; remove it with `fsp.rm` when done. */
export function snapshotterTempDir(): Promise<string> {
  return fsp.mkdtemp(path.join(tmpdir(), 'soci-ts-snapshotter-'));
}

export async function startSnapshotter(opts: StartSnapshotterOptions): Promise<SnapshotterDaemon> {
  hook();
  const { root, address } = opts;
  const flags = opts.configOnly === true ? [] : ['--root', root, '--address', address, '--log-level', opts.logLevel ?? 'debug'];
  const args = ['snapshotter', ...flags, ...(opts.args ?? [])];
  // As a user would run it: without the test runner's loaders.
  const env = { ...process.env, ...opts.env };
  delete env.NODE_OPTIONS;
  const child = spawn(SOCI_TS_BIN, args, { detached: true, env, stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  child.stderr?.on('data', (b: Buffer) => {
    log += b.toString();
    if (log.length > 2 << 20) log = log.slice(-(1 << 20));
  });
  child.unref();
  if (child.stderr instanceof net.Socket) child.stderr.unref();
  live.add(child);
  let exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  const waiters: (() => void)[] = [];
  child.on('close', (code, signal) => {
    exit = { code, signal };
    live.delete(child);
    for (const w of waiters.splice(0)) w();
  });
  const pid = await new Promise<number>((resolve, reject) => {
    child.once('spawn', () => resolve(child.pid as number));
    child.once('error', (e) => reject(new SnapshotterDaemonError(`cannot start ${SOCI_TS_BIN}`, '', { cause: e })));
  });

  const daemon: SnapshotterDaemon = {
    root,
    address,
    pid,
    logs: () => log.slice(-(1 << 20)),
    logLines: () =>
      log
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => {
          try {
            return JSON.parse(l) as Record<string, unknown>;
          } catch {
            return { unparsed: l };
          }
        }),
    kill: (signal) => {
      try {
        process.kill(-pid, signal);
      } catch {
        // gone
      }
    },
    waitExit: (ms) =>
      exit !== undefined
        ? Promise.resolve(exit)
        : new Promise((resolve) => {
            const timer = setTimeout(() => resolve(undefined), ms);
            waiters.push(() => {
              clearTimeout(timer);
              resolve(exit);
            });
          }),
    stop: async () => {
      if (exit !== undefined) return;
      daemon.kill('SIGTERM');
      if ((await daemon.waitExit(5000)) === undefined) {
        daemon.kill('SIGKILL');
        await daemon.waitExit(5000);
      }
    },
  };

  const timeoutMs = opts.startTimeoutMs ?? 20_000;
  const deadline = Date.now() + timeoutMs;
  let last: unknown = 'no answer yet';
  for (;;) {
    if (exit !== undefined) throw new SnapshotterDaemonError(`exited (code ${String(exit.code)}, signal ${String(exit.signal)}) before serving`, log);
    try {
      await fsp.access(address);
      const c = await SnapshotsClient.connect(address);
      try {
        await c.list();
        return daemon;
      } finally {
        c.close();
      }
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      await daemon.stop();
      throw new SnapshotterDaemonError(`not serving on ${address} after ${timeoutMs} ms (${(last as Error).message ?? String(last)})`, log, { cause: last });
    }
    await sleep(100);
  }
}

/** bin/soci-ts with its result whatever the exit code 0–2 (without the test runner's loaders). */
export async function sociTs(args: readonly string[], opts: { env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  const env = { ...process.env, ...opts.env };
  delete env.NODE_OPTIONS;
  try {
    return await run(SOCI_TS_BIN, args, { env, okCodes: [0, 1, 2] });
  } catch (e) {
    if (e instanceof CommandError) return { code: e.code ?? -1, stdout: '', stderr: e.stderr };
    throw e;
  }
}

/** The pid of the FUSE manager serving `<root>/fuse-manager.sock`, or undefined when none answers. */
export async function fuseManagerPid(root: string): Promise<number | undefined> {
  try {
    const c = await FuseManagerClient.connect(path.join(root, 'fuse-manager.sock'));
    try {
      return (await c.hello()).pid;
    } finally {
      c.close();
    }
  } catch {
    return undefined;
  }
}

/**
 * The FUSE manager a snapshotter started for its lazy layers outlives it by design: SIGTERM it
 * (it unmounts its layers), SIGKILL after 20 s.
 */
export async function stopFuseManager(root: string): Promise<void> {
  const pid = await fuseManagerPid(root);
  if (pid === undefined) return; // never started
  const alive = (): boolean => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  process.kill(pid, 'SIGTERM');
  for (const end = Date.now() + 20_000; alive() && Date.now() < end; ) await sleep(100);
  if (alive()) process.kill(pid, 'SIGKILL');
}

/** Lazily unmounts whatever is still mounted at or under `root`, deepest first. */
export async function unmountUnder(root: string): Promise<void> {
  const mounts = (await fsp.readFile('/proc/self/mountinfo', 'utf8'))
    .split('\n')
    .map((l) => (l.split(' ')[4] ?? '').replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))))
    .filter((m) => m === root || m.startsWith(root + '/'))
    .sort((a, b) => b.length - a.length);
  for (const m of mounts) await run('umount', ['-l', m]).catch(() => undefined);
}

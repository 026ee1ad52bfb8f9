/**
 * Processes and cleanup for the cold-start bench: commands with a timeout, an abort signal
 * and stdout line callbacks; a LIFO stack of cleanup steps; a synchronous exit hook and a
 * detached watchdog so that a bench killed outright still leaves no process group, mount
 * or temp dir behind.
 */
import { spawn, spawnSync } from 'node:child_process';
import { appendFileSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as net from 'node:net';

export class BenchError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BenchError';
  }
}

/** A command failed, timed out or was aborted; names it and carries its output's tail. */
export class StepError extends BenchError {
  constructor(
    readonly step: string,
    reason: string,
    readonly stderr: string,
    options?: { cause?: unknown },
  ) {
    super(`${step}: ${reason}${stderr.trim() === '' ? '' : `: ${stderr.trim().split('\n').slice(-6).join(' | ').slice(-1200)}`}`, options);
    this.name = 'StepError';
  }
}

/** The bench was interrupted (SIGINT, SIGTERM). */
export class InterruptedError extends BenchError {
  constructor(readonly signalName: string) {
    super(`interrupted by ${signalName}`);
    this.name = 'InterruptedError';
  }
}

export interface ExecOptions {
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Each stdout line (without the newline), as it arrives. */
  onLine?: (line: string) => void;
  okCodes?: readonly number[];
  /** How to name the command in errors (default: the command and its first arguments). */
  label?: string;
}

export interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
  ms: number;
}

const TAIL = 256 << 10;

/** Spawns `cmd args` (no shell), resolves when it exits with an ok code; else StepError. */
export function exec(cmd: string, args: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
  const label = opts.label ?? [cmd, ...args.slice(0, 3)].join(' ');
  return new Promise((resolve, reject) => {
    if (opts.signal?.aborted === true) {
      reject(opts.signal.reason instanceof Error ? opts.signal.reason : new StepError(label, 'aborted', ''));
      return;
    }
    const t0 = performance.now();
    const child = spawn(cmd, args, { env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let partial = '';
    let why: string | undefined;
    child.stdout.on('data', (b: Buffer) => {
      const s = b.toString('utf8');
      if (stdout.length < TAIL * 2) stdout += s;
      if (opts.onLine !== undefined) {
        partial += s;
        let i: number;
        while ((i = partial.indexOf('\n')) >= 0) {
          const line = partial.slice(0, i).replace(/\r$/, '');
          partial = partial.slice(i + 1);
          opts.onLine(line);
        }
      }
    });
    child.stderr.on('data', (b: Buffer) => {
      stderr += b.toString('utf8');
      if (stderr.length > TAIL * 2) stderr = stderr.slice(-TAIL);
    });
    const kill = (reason: string): void => {
      why ??= reason;
      child.kill('SIGKILL');
    };
    const timer = opts.timeoutMs !== undefined ? setTimeout(() => kill(`timed out after ${Math.round(opts.timeoutMs ?? 0)} ms`), opts.timeoutMs) : undefined;
    const onAbort = (): void => kill('aborted');
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    child.on('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
      reject(new StepError(label, e.code === 'ENOENT' ? `${cmd}: command not found` : `cannot spawn: ${e.message}`, '', { cause: e }));
    });
    child.on('close', (code, sig) => {
      clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
      if (partial !== '' && opts.onLine !== undefined) opts.onLine(partial.replace(/\r$/, ''));
      const ms = performance.now() - t0;
      if (why === 'aborted' && opts.signal?.reason instanceof Error) reject(opts.signal.reason);
      else if (why !== undefined) reject(new StepError(label, why, stderr));
      else if (code !== null && (opts.okCodes ?? [0]).includes(code)) resolve({ code, stdout, stderr, ms });
      else reject(new StepError(label, code === null ? `killed by ${String(sig)}` : `exit status ${code}`, stderr || stdout));
    });
  });
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted === true) return reject(signal.reason as Error);
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = (): void => {
      clearTimeout(t);
      reject(signal?.reason as Error);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** Rejects as soon as `signal` aborts (the operation itself goes on; its result is dropped). */
export function abortable<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (signal === undefined) return p;
  if (signal.aborted) {
    p.catch(() => undefined);
    return Promise.reject(signal.reason as Error);
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => {
      p.catch(() => undefined);
      reject(signal.reason as Error);
    };
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e);
      },
    );
  });
}

// ---------------------------------------------------------------------------------------
// Mounts

function unescapeMount(p: string): string {
  return p.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** Mount points at or under `dir` (deepest first) with their fs type, from /proc/self/mountinfo. */
export function mountsUnderText(info: string, dir: string): Array<{ path: string; fstype: string }> {
  const out: Array<{ path: string; fstype: string }> = [];
  for (const line of info.split('\n')) {
    const fields = line.split(' ');
    const mp = fields[4];
    if (mp === undefined) continue;
    const p = unescapeMount(mp);
    const dash = fields.indexOf('-');
    const fstype = dash >= 0 ? (fields[dash + 1] ?? '') : '';
    if (p === dir || p.startsWith(dir + '/')) out.push({ path: p, fstype });
  }
  return out.sort((a, b) => b.path.length - a.path.length);
}

export async function mountsUnder(dir: string): Promise<Array<{ path: string; fstype: string }>> {
  return mountsUnderText(await fsp.readFile('/proc/self/mountinfo', 'utf8'), dir);
}

/** Lazily unmounts everything under `dir` and removes it (never crossing into a mount). */
export async function removeTree(dir: string): Promise<void> {
  for (const m of await mountsUnder(dir)) await exec('umount', ['-l', m.path], { okCodes: [0, 1, 32] }).catch(() => undefined);
  await exec('rm', ['-rf', '--one-file-system', '--', dir], { okCodes: [0, 1] }).catch(() => undefined);
}

/**
 * Stops the processes naming `path` (or a path under it) in their arguments: SIGTERM, then
 * SIGKILL for those still there after `graceMs`.
 */
export async function stopProcessesMentioning(path: string, graceMs = 5000): Promise<number> {
  const pids = await pidsMentioning(path);
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      // gone
    }
  }
  const deadline = Date.now() + graceMs;
  let left = pids;
  while (left.length > 0 && Date.now() < deadline) {
    await sleep(100);
    left = left.filter((pid) => {
      try {
        process.kill(pid, 0);
        return true;
      } catch {
        return false;
      }
    });
  }
  for (const pid of left) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  return pids.length;
}

/** Pids of processes with `needle` in one of their arguments (or as a prefix of one). */
export async function pidsMentioning(needle: string): Promise<number[]> {
  const out: number[] = [];
  for (const name of await fsp.readdir('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      const args = (await fsp.readFile(`/proc/${name}/cmdline`, 'utf8')).split('\0');
      if (args.some((a) => a === needle || a.startsWith(needle + '/'))) out.push(Number(name));
    } catch {
      // exited meanwhile
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Cleanup

type Step = { name: string; fn: () => Promise<void> };

/**
 * Cleanup steps, run last-in first-out by run() (each at most once, failures reported and
 * the rest still run). A sync exit hook and a detached watchdog cover `dir` (the bench's temp
 * dir) and the process groups registered with `trackGroup` when this process dies without
 * running them (exit without cleanup; SIGKILL).
 */
export class Cleanup {
  private steps: Step[] = [];
  private groups = new Set<number>();
  private watchdog: ReturnType<typeof spawn> | undefined;
  private readonly exitHook = (): void => this.runSync();

  constructor(
    readonly dir: string,
    private readonly warn: (msg: string) => void,
  ) {
    process.on('exit', this.exitHook);
    // A shell in its own group, reading a pipe from us: EOF means we are gone.
    const script =
      'read _ignored; ' +
      'if [ -f "$1/.pgids" ]; then for g in $(cat "$1/.pgids"); do kill -s KILL -- "-$g" 2>/dev/null; done; fi; ' +
      // Processes of their own session that name a path under the dir (the FUSE manager).
      'for p in /proc/[0-9]*; do n=${p#/proc/}; [ "$n" = "$$" ] && continue; tr "\\0" "\\n" < "$p/cmdline" 2>/dev/null | grep -qF -- "$1/" && kill -s KILL "$n" 2>/dev/null; done; sleep 1; ' +
      'awk -v d="$1" \'$5 == d || index($5, d "/") == 1 { print $5 }\' /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m"; done; ' +
      'rm -rf --one-file-system -- "$1"';
    const w = spawn('sh', ['-c', script, 'soci-ts-coldstart-watchdog', dir], { detached: true, stdio: ['pipe', 'ignore', 'ignore'] });
    w.on('error', () => undefined);
    w.unref();
    if (w.stdin instanceof net.Socket) w.stdin.unref();
    this.watchdog = w;
  }

  add(name: string, fn: () => Promise<void>): Step {
    const s = { name, fn };
    this.steps.push(s);
    return s;
  }

  /** Runs one step now (and forgets it). */
  async runStep(s: Step): Promise<void> {
    const i = this.steps.indexOf(s);
    if (i < 0) return;
    this.steps.splice(i, 1);
    try {
      await s.fn();
    } catch (e) {
      this.warn(`cleanup: ${s.name}: ${(e as Error).message}`);
    }
  }

  /** A process group the watchdog kills if we die (e.g. the snapshotter daemon). */
  trackGroup(pgid: number): void {
    this.groups.add(pgid);
    try {
      appendFileSync(`${this.dir}/.pgids`, `${pgid}\n`);
    } catch {
      // dir gone: nothing to track any more
    }
  }

  untrackGroup(pgid: number): void {
    this.groups.delete(pgid);
  }

  async run(): Promise<void> {
    while (this.steps.length > 0) {
      const s = this.steps.pop() as Step;
      try {
        await s.fn();
      } catch (e) {
        this.warn(`cleanup: ${s.name}: ${(e as Error).message}`);
      }
    }
    await removeTree(this.dir);
    process.off('exit', this.exitHook);
    this.watchdog?.kill('SIGKILL');
    this.watchdog = undefined;
  }

  /** Best effort from the exit hook: kill groups and processes naming the dir, unmount, remove the dir. */
  private runSync(): void {
    for (const g of this.groups) {
      try {
        process.kill(-g, 'SIGKILL');
      } catch {
        // gone
      }
    }
    try {
      for (const name of readdirSync('/proc')) {
        if (!/^\d+$/.test(name) || Number(name) === process.pid || Number(name) === this.watchdog?.pid) continue;
        try {
          if (readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0').some((a) => a.startsWith(this.dir + '/'))) process.kill(Number(name), 'SIGKILL');
        } catch {
          // exited meanwhile
        }
      }
    } catch {
      // no /proc
    }
    try {
      const info = spawnSync('cat', ['/proc/self/mountinfo'], { encoding: 'utf8' }).stdout ?? '';
      for (const m of mountsUnderText(info, this.dir)) spawnSync('umount', ['-l', m.path]);
      spawnSync('rm', ['-rf', '--one-file-system', '--', this.dir]);
    } catch {
      rmSync(this.dir, { recursive: true, force: true });
    }
    this.watchdog?.kill('SIGKILL');
  }
}

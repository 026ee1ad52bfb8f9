/**
 * The host's mount table and mount(8)/umount(8), for every process that mounts: `soci-ts mount`,
 * the snapshotter and its FUSE manager. Everything is asynchronous: mount(8) and umount(8) run as
 * async child processes, and /proc/self/mountinfo is read with an async read, so that a process
 * serving FUSE mounts never blocks its event loop on them.
 */
import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import type { Logger } from '../fetcher/index.js';

/** A mount or unmount command failed. Names the path and the reason. */
export class SysMountError extends Error {
  readonly subject: string;
  constructor(subject: string, reason: string, options?: { cause?: unknown }) {
    super(`${subject}: ${reason}`, options);
    this.name = 'SysMountError';
    this.subject = subject;
  }
}

/** Runs a command (async, never a sync spawn), resolving with its exit code and stderr. */
export function runCommand(cmd: string, args: readonly string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (b: Buffer) => {
      if (stderr.length < 8192) stderr += b.toString('utf8');
    });
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code: code ?? (signal !== null ? 128 : 1), stderr: stderr.trim() }));
  });
}

export interface MountInfoEntry {
  /** The mount's id (field 1 of mountinfo): a new mount at the same place gets a new id. */
  id: number;
  mountpoint: string;
  fstype: string;
  source: string;
}

/** `\040`-style escapes of /proc/self/mountinfo. */
function unescapeMountInfo(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** The mounts of this process's mount namespace. */
export async function readMountInfo(): Promise<MountInfoEntry[]> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  const out: MountInfoEntry[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const fields = line.split(' ');
    const sep = fields.indexOf('-');
    if (sep < 5 || fields.length < sep + 3) continue;
    out.push({ id: Number(fields[0]), mountpoint: unescapeMountInfo(fields[4]!), fstype: fields[sep + 1]!, source: unescapeMountInfo(fields[sep + 2]!) });
  }
  return out;
}

export async function isMountpoint(path: string): Promise<boolean> {
  return (await readMountInfo()).some((m) => m.mountpoint === path);
}

/** Mounts at or below `path`, deepest first. */
export async function mountsUnder(path: string): Promise<MountInfoEntry[]> {
  const below = (await readMountInfo()).filter((m) => m.mountpoint === path || m.mountpoint.startsWith(path + '/'));
  return below.sort((a, b) => b.mountpoint.length - a.mountpoint.length || b.id - a.id);
}

/** Lazily detaches the mount at `path` (umount -l, else fusermount -uz). */
export async function detach(path: string): Promise<void> {
  const r = await runCommand('umount', ['-l', path]);
  if (r.code === 0) return;
  const f = await runCommand('fusermount', ['-uz', path]).catch(() => ({ code: 1, stderr: 'fusermount not found' }));
  if (f.code !== 0) throw new SysMountError(path, `cannot detach the mount: ${r.stderr || f.stderr}`);
}

/** Lazily detaches every mount at or below `path` (deepest first); for cleaning up after a crash. */
export async function detachAll(path: string, logger: Logger): Promise<number> {
  let n = 0;
  // Stacked mounts at one place are listed once each: umount -l takes the top one each time.
  for (const m of await mountsUnder(path)) {
    await detach(m.mountpoint);
    n++;
    logger.info('detached a leftover mount', { mountpoint: m.mountpoint, fstype: m.fstype });
  }
  return n;
}

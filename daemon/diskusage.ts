/**
 * Disk usage of a directory tree as containerd computes it (continuity's fs.DiskUsage): every
 * distinct inode (device, inode number) under the root, the root included, counted once, with
 * its allocated blocks × 512 bytes. The same as `du -s -B1` and `du -s --inodes`.
 *
 * Asynchronous all the way (lstat and readdir through libuv's pool), with a bounded number of
 * calls in flight, so the event loop keeps serving while a large tree is walked.
 */
import { lstat, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { Usage } from './metadata.js';

export interface DiskUsageOptions {
  /** lstat/readdir calls in flight at most (default 16). */
  concurrency?: number;
  signal?: AbortSignal;
}

export async function diskUsage(root: string, opts: DiskUsageOptions = {}): Promise<Usage> {
  const limit = Math.max(1, opts.concurrency ?? 16);
  const seen = new Set<string>();
  let size = 0;
  const queue: string[] = [root];
  let active = 0;
  let failed: unknown;

  await new Promise<void>((resolve, reject) => {
    const visit = async (path: string): Promise<void> => {
      const st = await lstat(path, { bigint: true });
      const id = `${st.dev}:${st.ino}`;
      if (!seen.has(id)) {
        seen.add(id);
        size += Number(st.blocks) * 512;
      }
      if (st.isDirectory()) {
        for (const name of await readdir(path)) queue.push(join(path, name));
      }
    };
    let settled = false;
    const pump = (): void => {
      if (failed === undefined && opts.signal?.aborted === true) {
        failed = opts.signal.reason ?? new Error('disk usage walk aborted');
      }
      while (failed === undefined && active < limit && queue.length > 0) {
        const next = queue.pop() as string;
        active++;
        visit(next).then(
          () => {
            active--;
            pump();
          },
          (e: NodeJS.ErrnoException) => {
            active--;
            // A file removed while walking is not an error (the tree is live); the root is.
            if (!(e.code === 'ENOENT' && next !== root)) failed ??= e;
            pump();
          },
        );
      }
      if (!settled && active === 0 && (failed !== undefined || queue.length === 0)) {
        settled = true;
        if (failed !== undefined) reject(failed);
        else resolve();
      }
    };
    pump();
  });
  return { size, inodes: seen.size };
}

/**
 * A small tmpfs of the test's own (as root), to run things on a file system that fills up:
 * `fill()` takes every free data block (a file of zeros written until ENOSPC) and, with
 * `inodes`, every free inode (empty files until ENOSPC); `free()` gives them back.
 * On a full tmpfs, directories and empty files can still be made unless the inodes are full too.
 */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { run } from './layers.js';

export interface Tmpfs {
  readonly dir: string;
  /** Bytes available to an unprivileged writer right now (statfs). */
  available(): Promise<number>;
  /** Takes every free block (unless `blocks: false`) and, with `inodes`, every free inode; resolves the bytes taken. */
  fill(opts?: { blocks?: boolean; inodes?: boolean }): Promise<number>;
  /** Removes what fill() made. */
  free(): Promise<void>;
  /** Lazily unmounts it and removes its mountpoint. */
  unmount(): Promise<void>;
}

const FILLER = '.filler';

export async function mountTmpfs(dir: string, opts: { sizeBytes: number; inodes?: number }): Promise<Tmpfs> {
  await fsp.mkdir(dir, { recursive: true });
  const o = [`size=${opts.sizeBytes}`, ...(opts.inodes !== undefined ? [`nr_inodes=${opts.inodes}`] : []), 'mode=0755'];
  await run('mount', ['-t', 'tmpfs', '-o', o.join(','), 'tmpfs', dir]);
  const fillerDir = path.join(dir, FILLER);
  return {
    dir,
    available: async () => {
      const s = await fsp.statfs(dir);
      return s.bavail * s.bsize;
    },
    fill: async (f = {}) => {
      await fsp.mkdir(fillerDir, { recursive: true });
      let taken = 0;
      if (f.blocks !== false) {
        const fh = await fsp.open(path.join(fillerDir, 'blocks'), 'a');
        try {
          // Big chunks first, then small ones, down to one byte: nothing is left.
          for (const chunk of [1 << 20, 64 << 10, 4096, 512, 1]) {
            const buf = Buffer.alloc(chunk);
            for (;;) {
              try {
                const { bytesWritten } = await fh.write(buf);
                taken += bytesWritten;
                if (bytesWritten < chunk) break;
              } catch (e) {
                if ((e as NodeJS.ErrnoException).code === 'ENOSPC') break;
                throw e;
              }
            }
          }
        } finally {
          await fh.close();
        }
      }
      if (f.inodes === true) {
        for (let i = 0; ; i++) {
          try {
            await (await fsp.open(path.join(fillerDir, `i${i}`), 'wx')).close();
          } catch (e) {
            if ((e as NodeJS.ErrnoException).code === 'ENOSPC') break;
            throw e;
          }
        }
      }
      return taken;
    },
    free: () => fsp.rm(fillerDir, { recursive: true, force: true }),
    unmount: async () => {
      await run('umount', ['-l', dir]).catch(() => undefined);
      await fsp.rmdir(dir).catch(() => undefined);
    },
  };
}

/** Real files from this machine, in a stable (sorted) order, for test and benchmark data. */
import { lstat, readdir } from 'node:fs/promises';
import { join } from 'node:path';

/**
 * Regular, non-empty files under `root` in sorted depth-first order, with their
 * sizes. Unreadable entries are skipped (a test machine's /usr has a few).
 */
export async function* walkFiles(root: string): AsyncGenerator<{ path: string; size: number }> {
  let names: string[];
  try {
    names = (await readdir(root)).sort();
  } catch {
    return;
  }
  for (const name of names) {
    const p = join(root, name);
    let st;
    try {
      st = await lstat(p);
    } catch {
      continue;
    }
    if (st.isDirectory()) yield* walkFiles(p);
    else if (st.isFile() && st.size > 0) yield { path: p, size: st.size };
  }
}

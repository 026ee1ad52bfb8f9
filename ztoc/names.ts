/** Tar entry names: normalisation, and the checks that keep a layer inside its root. */

/**
 * `./usr/bin/`, `usr/bin` and `/usr//bin` all name `usr/bin`; the root is ``.
 * Does not resolve `..` (see `unsafeNameReason`).
 */
export function normalizeName(name: string): string {
  const parts: string[] = [];
  for (const part of name.split('/')) {
    if (part === '' || part === '.') continue;
    parts.push(part);
  }
  return parts.join('/');
}

/**
 * Why a name would escape the layer's root (or is unusable), or undefined if it is fine. A
 * leading `/` is not an escape: containerd and GNU tar read `/usr/bin` in a layer as `usr/bin`
 * under the root, and real images carry such names (umoci writes the root as `/`).
 */
export function unsafeNameReason(name: string): string | undefined {
  if (name.length === 0) return 'empty name';
  if (name.includes('\0')) return 'name contains a NUL byte';
  for (const part of name.split('/')) {
    if (part === '..') return "path contains a '..' component";
  }
  return undefined;
}

/**
 * What `soci-ts rpull` needs before it knows where the pull runs (here or in the snapshotter):
 * its defaults and the per-layer line. Type-only imports, so the CLI loads no gRPC for them.
 */
import type { RpullLayer } from './rpull.js';

export const DEFAULT_CONTAINERD_ADDRESS = '/run/containerd/containerd.sock';
export const DEFAULT_NAMESPACE = 'default';
export const DEFAULT_RPULL_SNAPSHOTTER = 'soci-ts';

function short(digest: string): string {
  return digest.replace(/^sha256:/, '').slice(0, 12);
}

/** Bytes for humans: B, kB or MB. */
export function mb(b: number): string {
  return b >= 1e6 ? `${(b / 1e6).toFixed(1)} MB` : b >= 1e3 ? `${(b / 1e3).toFixed(1)} kB` : `${b} B`;
}

/** One line per layer for humans. */
export function describeLayer(l: RpullLayer, count: number): string {
  const what =
    l.outcome === 'lazy'
      ? 'lazy (mounted by the snapshotter)'
      : l.outcome === 'local'
        ? 'local (fetched and unpacked by the snapshotter)'
        : l.outcome === 'present'
          ? 'already present'
          : l.blobInStore === true
            ? 'applied (blob already in the content store)'
            : `fetched (${mb(l.fetchedBytes)}) and applied`;
  return `layer ${l.index + 1}/${count} ${short(l.digest)}: ${what}`;
}

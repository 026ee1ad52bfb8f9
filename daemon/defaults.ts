/**
 * Default paths, in a module that imports nothing, so that a command can name them in its
 * options and `--help` without loading the modules that use them.
 */

/** The snapshotter's root and the local store of indexes and zTOCs. */
export const DEFAULT_ROOT = '/var/lib/soci-ts';
/** The snapshotter's gRPC socket (containerd's proxy plugin address). */
export const DEFAULT_ADDRESS = '/run/soci-ts/soci-ts.sock';
/** containerd's certs.d directory; the fetcher's DEFAULT_HOSTS_DIR (a test keeps them equal). */
export const DEFAULT_CERTS_DIR = '/etc/containerd/certs.d';

/**
 * The snapshotter daemon's configuration file (TOML). Keys, all optional, with defaults:
 *
 *   root = "/var/lib/soci-ts"                # metadata.db, snapshots/, the artifact store and the span cache live here
 *   address = "/run/soci-ts/soci-ts.sock"    # the unix socket containerd's proxy plugin dials
 *   log_level = "info"                       # debug | info | warn | error
 *   metrics_address = "127.0.0.1:8000"       # Prometheus GET /metrics: HOST:PORT, [IPv6]:PORT or a unix socket path; "" = off
 *   hosts_dir = "/etc/containerd/certs.d"    # containerd's certs.d layout (hosts.toml: mirrors, CAs, plain HTTP); "" = none
 *   docker_config = ""                       # config.json with auths and credential helpers; "" = $DOCKER_CONFIG or ~/.docker
 *
 *   [snapshotter]
 *   remote = true                            # serve layers of SOCI-indexed images remotely (Prepare with the remote labels)
 *   min_layer_size = 0                       # layers with a zTOC but smaller than this are unpacked by the daemon instead (bytes; "10MiB")
 *   fuse_manager_address = ""                # the FUSE manager's socket; "" = <root>/fuse-manager.sock
 *   fuse_manager_at_start = true             # start the FUSE manager with the snapshotter (false: at the first lazy layer)
 *   fuse_manager_log_max_size = "10MiB"      # <root>/fuse-manager.log is rotated before it grows past this
 *   fuse_manager_log_files = 3               # rotated logs kept (fuse-manager.log.1 … .3; 0 = none)
 *
 *   [blob]
 *   fetch_timeout = "30s"                    # a read of a lazy layer waiting longer for the registry fails with EIO
 *   max_retries = 4                          # a failed registry request (reset, timeout, 5xx, 429) is tried again this often, with backoff
 *   connect_timeout = "10s"                  # TCP + TLS connect to a registry
 *   response_timeout = "30s"                 # to the response headers, and the longest silence in a body
 *   max_connections_per_host = 8             # parallel connections (so parallel range reads) per registry host
 *
 *   [background_fetch]
 *   enabled = true                           # fetch the rest of each lazy layer into the disk cache after a quiet period
 *   rate = "32MiB"                           # compressed bytes per second, over all layers
 *   start_delay = "10s"                      # wait after a layer is mounted before fetching it
 *
 *   [cache]
 *   memory_size = "256MiB"                   # inflated spans in the FUSE manager's memory
 *   disk_size = "10GiB"                      # compressed spans on disk (<root>/cache/spans)
 *
 *   [pull_modes.soci_v1]
 *   enable = true                            # use v1 SOCI indexes (found through the image's referrers); upstream's default: false
 *
 *   [pull_modes.soci_v2]
 *   enable = true                            # use v2 SOCI indexes (SOCI-enabled images, `soci-ts convert`)
 *
 * Sizes are a number of bytes or a string with a unit (`4MiB`, `512KiB`, `1GiB`); durations a
 * number of seconds or a string (`30s`, `500ms`, `2m`). Command-line flags override the file. An
 * unknown key (or section) or a value of the wrong type is an error naming the key and the file.
 * Sections nest (`[pull_modes.soci_v1]` is the table `soci_v1` in the table `pull_modes`); a key
 * is named by its dotted path (`pull_modes.soci_v1.enable`).
 */
import { readFile } from 'node:fs/promises';
import { parse as parseToml, TomlError } from 'smol-toml';
import { DEFAULT_HOSTS_DIR, isLogLevel, type LogLevel } from '../fetcher/index.js';
import { DEFAULT_ADDRESS, DEFAULT_ROOT } from './defaults.js';
import { parseMetricsAddress } from './metrics.js';
import { DEFAULT_LOG_FILES, DEFAULT_LOG_MAX_BYTES } from './log-file.js';

export const DEFAULT_CONFIG_PATH = '/etc/soci-ts/config.toml';
export const DEFAULT_METRICS_ADDRESS = '127.0.0.1:8000';

export interface SnapshotterConfig {
  root: string;
  address: string;
  logLevel: LogLevel;
  /** '' = no metrics endpoint. */
  metricsAddress: string;
  hostsDir: string;
  /** '' = the default docker config location. */
  dockerConfig: string;
  remote: boolean;
  minLayerSize: number;
  /** '' = `<root>/fuse-manager.sock`. */
  fuseManagerAddress: string;
  /** Start the FUSE manager with the snapshotter rather than at the first lazy layer. */
  fuseManagerAtStart: boolean;
  fuseManagerLogMaxBytes: number;
  fuseManagerLogFiles: number;
  fetchTimeoutMs: number;
  /** Retries of a failed registry request (attempts = 1 + this). */
  maxRetries: number;
  connectTimeoutMs: number;
  responseTimeoutMs: number;
  maxConnectionsPerHost: number;
  backgroundFetch: boolean;
  backgroundRate: number;
  backgroundStartDelayMs: number;
  memoryCacheBytes: number;
  diskCacheBytes: number;
  /** `[pull_modes.soci_v1] enable`: discovery may use v1 SOCI indexes. */
  sociV1: boolean;
  /** `[pull_modes.soci_v2] enable`: discovery may use v2 SOCI indexes. */
  sociV2: boolean;
}

export const DEFAULT_CONFIG: Readonly<SnapshotterConfig> = Object.freeze({
  root: DEFAULT_ROOT,
  address: DEFAULT_ADDRESS,
  logLevel: 'info',
  metricsAddress: DEFAULT_METRICS_ADDRESS,
  hostsDir: DEFAULT_HOSTS_DIR,
  dockerConfig: '',
  remote: true,
  // As upstream's daemon: every layer with a zTOC is mounted lazily.
  minLayerSize: 0,
  fuseManagerAddress: '',
  fuseManagerAtStart: true,
  fuseManagerLogMaxBytes: DEFAULT_LOG_MAX_BYTES,
  fuseManagerLogFiles: DEFAULT_LOG_FILES,
  fetchTimeoutMs: 30_000,
  maxRetries: 4,
  connectTimeoutMs: 10_000,
  responseTimeoutMs: 30_000,
  maxConnectionsPerHost: 8,
  backgroundFetch: true,
  backgroundRate: 32 << 20,
  backgroundStartDelayMs: 10_000,
  memoryCacheBytes: 256 << 20,
  diskCacheBytes: 10 * 1024 * 1024 * 1024,
  // Both on (upstream since v0.10: v1 off, v2 on): `soci-ts create --push`, the way most of our
  // users index images, makes v1 indexes. See the README.
  sociV1: true,
  sociV2: true,
});

export class ConfigError extends Error {
  constructor(
    readonly file: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${file}: ${message}`, options);
    this.name = 'ConfigError';
  }
}

/** Turns a TOML value into the setting, or throws a string saying what is wrong. */
type Converter = (v: unknown) => unknown;

const absolutePath: Converter = (v) => {
  if (typeof v !== 'string') throw 'must be a string';
  if (!v.startsWith('/')) throw 'must be an absolute path';
  return v;
};

const pathOrEmpty: Converter = (v) => {
  if (typeof v !== 'string') throw 'must be a string';
  if (v !== '' && !v.startsWith('/')) throw 'must be an absolute path or ""';
  return v;
};

const boolean: Converter = (v) => {
  if (typeof v !== 'boolean') throw 'must be true or false';
  return v;
};

const SIZE_UNITS: Record<string, number> = { '': 1, b: 1, k: 1 << 10, kib: 1 << 10, kb: 1000, m: 1 << 20, mib: 1 << 20, mb: 1e6, g: 1 << 30, gib: 1 << 30, gb: 1e9 };

const size =
  (min: number): Converter =>
  (v) => {
    let n: number;
    if (typeof v === 'number' || typeof v === 'bigint') n = Number(v);
    else if (typeof v === 'string') {
      const m = /^\s*(\d+)\s*([a-zA-Z]*)\s*$/.exec(v);
      const unit = m === null ? undefined : SIZE_UNITS[m[2]!.toLowerCase()];
      if (m === null || unit === undefined) throw 'must be a size (a number of bytes, or e.g. "4MiB", "512KiB")';
      n = Number(m[1]) * unit;
    } else throw 'must be a size (a number of bytes, or e.g. "4MiB", "512KiB")';
    if (!Number.isSafeInteger(n) || n < min) throw `must be a whole number of bytes, at least ${min}`;
    return n;
  };

const count =
  (min: number, max: number): Converter =>
  (v) => {
    const n = typeof v === 'number' || typeof v === 'bigint' ? Number(v) : NaN;
    if (!Number.isSafeInteger(n) || n < min || n > max) throw `must be a whole number from ${min} to ${max}`;
    return n;
  };

const duration: Converter = (v) => {
  let ms: number;
  if (typeof v === 'number' || typeof v === 'bigint') ms = Number(v) * 1000;
  else if (typeof v === 'string') {
    const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$/.exec(v);
    if (m === null) throw 'must be a duration (seconds, or e.g. "30s", "500ms", "2m")';
    ms = Number(m[1]) * (m[2] === 'ms' ? 1 : m[2] === 'm' ? 60_000 : 1000);
  } else throw 'must be a duration (seconds, or e.g. "30s", "500ms", "2m")';
  if (!Number.isFinite(ms) || ms < 0) throw 'must be a non-negative duration';
  return Math.round(ms);
};

const positiveDuration: Converter = (v) => {
  const ms = duration(v) as number;
  if (ms <= 0) throw 'must be a positive duration';
  return ms;
};

/** Keys by their dotted path (`section.key` for keys of a `[section]`). */
const KEYS: Record<string, { field: keyof SnapshotterConfig; convert: Converter }> = {
  root: { field: 'root', convert: absolutePath },
  address: { field: 'address', convert: absolutePath },
  log_level: {
    field: 'logLevel',
    convert: (v) => {
      if (typeof v === 'string' && isLogLevel(v)) return v;
      throw 'must be one of "debug", "info", "warn", "error"';
    },
  },
  metrics_address: {
    field: 'metricsAddress',
    convert: (v) => {
      if (typeof v !== 'string') throw 'must be a string';
      try {
        if (v !== '') parseMetricsAddress(v);
      } catch (e) {
        throw (e as Error).message.replace(/^metrics address .*?: /, '');
      }
      return v;
    },
  },
  hosts_dir: { field: 'hostsDir', convert: pathOrEmpty },
  docker_config: { field: 'dockerConfig', convert: pathOrEmpty },
  'snapshotter.remote': { field: 'remote', convert: boolean },
  'snapshotter.min_layer_size': { field: 'minLayerSize', convert: size(0) },
  'snapshotter.fuse_manager_address': { field: 'fuseManagerAddress', convert: pathOrEmpty },
  'snapshotter.fuse_manager_at_start': { field: 'fuseManagerAtStart', convert: boolean },
  'snapshotter.fuse_manager_log_max_size': { field: 'fuseManagerLogMaxBytes', convert: size(1024) },
  'snapshotter.fuse_manager_log_files': { field: 'fuseManagerLogFiles', convert: count(0, 100) },
  'blob.fetch_timeout': { field: 'fetchTimeoutMs', convert: positiveDuration },
  'blob.max_retries': { field: 'maxRetries', convert: count(0, 20) },
  'blob.connect_timeout': { field: 'connectTimeoutMs', convert: positiveDuration },
  'blob.response_timeout': { field: 'responseTimeoutMs', convert: positiveDuration },
  'blob.max_connections_per_host': { field: 'maxConnectionsPerHost', convert: count(1, 256) },
  'background_fetch.enabled': { field: 'backgroundFetch', convert: boolean },
  'background_fetch.rate': { field: 'backgroundRate', convert: size(1) },
  'background_fetch.start_delay': { field: 'backgroundStartDelayMs', convert: duration },
  'cache.memory_size': { field: 'memoryCacheBytes', convert: size(1) },
  'cache.disk_size': { field: 'diskCacheBytes', convert: size(1) },
  'pull_modes.soci_v1.enable': { field: 'sociV1', convert: boolean },
  'pull_modes.soci_v2.enable': { field: 'sociV2', convert: boolean },
};

/** Every table a key lives in, nested ones by their dotted path (`pull_modes`, `pull_modes.soci_v1`). */
const SECTIONS = new Set(
  Object.keys(KEYS).flatMap((k) => {
    const parts = k.split('.');
    return parts.slice(0, -1).map((_, i) => parts.slice(0, i + 1).join('.'));
  }),
);

function isTable(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Date);
}

/** Parses config text (`file` names it in errors) into the settings it sets. */
export function parseConfig(text: string, file: string): Partial<SnapshotterConfig> {
  let doc: Record<string, unknown>;
  try {
    doc = parseToml(text) as Record<string, unknown>;
  } catch (e) {
    const where = e instanceof TomlError ? ` (line ${e.line}, column ${e.column})` : '';
    throw new ConfigError(file, `not valid TOML${where}: ${(e as Error).message.split('\n')[0]}`, { cause: e });
  }
  const out: Partial<SnapshotterConfig> = {};
  const entries: Array<[string, unknown]> = [];
  const flatten = (table: Record<string, unknown>, prefix: string): void => {
    for (const [k, v] of Object.entries(table)) {
      const path = prefix === '' ? k : `${prefix}.${k}`;
      if (SECTIONS.has(path)) {
        if (!isTable(v)) throw new ConfigError(file, `key "${path}" must be a table ([${path}]) (got ${JSON.stringify(typeof v === 'bigint' ? Number(v) : v)})`);
        flatten(v, path);
      } else entries.push([path, v]);
    }
  };
  flatten(doc, '');
  for (const [k, v] of entries) {
    const spec = KEYS[k];
    if (spec === undefined) throw new ConfigError(file, `unknown key "${k}" (known: ${Object.keys(KEYS).join(', ')})`);
    let value: unknown;
    try {
      value = spec.convert(v);
    } catch (problem) {
      if (typeof problem !== 'string') throw problem;
      throw new ConfigError(file, `key "${k}" ${problem} (got ${JSON.stringify(typeof v === 'bigint' ? Number(v) : v)})`);
    }
    (out as Record<string, unknown>)[spec.field] = value;
  }
  return out;
}

/**
 * Reads a config file. `required`: a missing file is an error (a path the user gave);
 * otherwise a missing file means defaults (the default path).
 */
export async function readConfig(file: string, required: boolean): Promise<Partial<SnapshotterConfig>> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    if (!required && (e as NodeJS.ErrnoException).code === 'ENOENT') return {};
    throw new ConfigError(file, `cannot read: ${(e as Error).message}`, { cause: e });
  }
  return parseConfig(text, file);
}

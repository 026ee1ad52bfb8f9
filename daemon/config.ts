/**
 * The snapshotter daemon's configuration file (TOML). Keys, all optional, with defaults:
 *
 *   root = "/var/lib/soci-ts"                # metadata.db and snapshots/ live here
 *   address = "/run/soci-ts/soci-ts.sock"    # the unix socket containerd's proxy plugin dials
 *   log_level = "info"                       # debug | info | warn | error
 *   metrics_address = "127.0.0.1:8000"       # Prometheus GET /metrics: HOST:PORT, [IPv6]:PORT or a unix socket path; "" = off
 *   min_layer_size = 0                       # bytes (or "10MiB"): smaller layers are fetched and unpacked even with a zTOC
 *
 * Command-line flags override the file. An unknown key or a value of the wrong type is an
 * error naming the key and the file.
 */
import { readFile } from 'node:fs/promises';
import { parse as parseToml, TomlError } from 'smol-toml';
import { isLogLevel, type LogLevel } from '../fetcher/index.js';
import { DEFAULT_ADDRESS, DEFAULT_ROOT } from './server.js';
import { parseSize } from './cli-util.js';
import { parseMetricsAddress } from './metrics.js';

export const DEFAULT_CONFIG_PATH = '/etc/soci-ts/config.toml';
export const DEFAULT_METRICS_ADDRESS = '127.0.0.1:8000';

export interface SnapshotterConfig {
  root: string;
  address: string;
  logLevel: LogLevel;
  metricsAddress: string;
  minLayerSize: number;
}

export const DEFAULT_CONFIG: Readonly<SnapshotterConfig> = Object.freeze({
  root: DEFAULT_ROOT,
  address: DEFAULT_ADDRESS,
  logLevel: 'info',
  metricsAddress: DEFAULT_METRICS_ADDRESS,
  minLayerSize: 0,
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

type Checker = (v: unknown) => string | undefined;

const absolutePath: Checker = (v) => (typeof v !== 'string' ? 'must be a string' : v.startsWith('/') ? undefined : 'must be an absolute path');

const metricsAddress: Checker = (v) => {
  if (typeof v !== 'string') return 'must be a string';
  try {
    if (v !== '') parseMetricsAddress(v);
    return undefined;
  } catch (e) {
    return (e as Error).message.replace(/^metrics address .*?: /, '');
  }
};

/** A whole number of bytes >= 0, or a size string ("10MiB"); the parsed value replaces the string. */
const byteSize: Checker = (v) => {
  if (typeof v === 'number') return Number.isSafeInteger(v) && v >= 0 ? undefined : 'must be a whole number of bytes >= 0';
  if (typeof v !== 'string') return 'must be a number of bytes or a size such as "10MiB"';
  try {
    parseSize(v);
    return undefined;
  } catch (e) {
    return `must be a number of bytes or a size: ${(e as Error).message}`;
  }
};
const toBytes = (v: unknown): number => (typeof v === 'string' ? parseSize(v) : Number(v));

const KEYS: Record<string, { field: keyof SnapshotterConfig; check: Checker; convert?: (v: unknown) => unknown }> = {
  root: { field: 'root', check: absolutePath },
  address: { field: 'address', check: absolutePath },
  log_level: {
    field: 'logLevel',
    check: (v) => (typeof v === 'string' && isLogLevel(v) ? undefined : 'must be one of "debug", "info", "warn", "error"'),
  },
  metrics_address: { field: 'metricsAddress', check: metricsAddress },
  min_layer_size: { field: 'minLayerSize', check: byteSize, convert: toBytes },
};

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
  for (const [k, v] of Object.entries(doc)) {
    const spec = KEYS[k];
    if (spec === undefined) throw new ConfigError(file, `unknown key "${k}" (known: ${Object.keys(KEYS).join(', ')})`);
    const problem = spec.check(v);
    if (problem !== undefined) throw new ConfigError(file, `key "${k}" ${problem} (got ${JSON.stringify(v)})`);
    (out as Record<string, unknown>)[spec.field] = spec.convert === undefined ? v : spec.convert(v);
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

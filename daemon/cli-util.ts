/** Helpers shared by the CLI's commands: errors, argument parsers, progress, tables, files. */
import { InvalidArgumentError, Option, type Command } from 'commander';
import type { LogLevel } from '../fetcher/index.js';
import { DEFAULT_CERTS_DIR, DEFAULT_ROOT } from './defaults.js';
import { rename, unlink, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

/** Ends the CLI with this exit code after printing the message (a failure relayed from the serving child). */
export class ExitCodeError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
    this.name = 'ExitCodeError';
  }
}

/** A mistake of the user's (bad argument, missing file): exit code 1. */
export class UsageError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'UsageError';
  }
}

const SIZE_UNITS: Record<string, number> = { '': 1, k: 1 << 10, kib: 1 << 10, m: 1 << 20, mib: 1 << 20, g: 1 << 30, gib: 1 << 30 };

/** Parse `4194304`, `4MiB`, `512k`. */
export function parseSize(text: string): number {
  const m = /^\s*(\d+)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? SIZE_UNITS[m[2].toLowerCase()] : undefined;
  if (!m || unit === undefined) throw new InvalidArgumentError(`"${text}" is not a size (e.g. 4194304, 4MiB, 512KiB)`);
  const n = Number(m[1]) * unit;
  if (!Number.isSafeInteger(n) || n <= 0) throw new InvalidArgumentError(`"${text}" is not a positive size`);
  return n;
}

export function parseCount(text: string): number {
  const n = Number(text);
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(n) || n <= 0) {
    throw new InvalidArgumentError(`"${text}" is not a positive whole number`);
  }
  return n;
}

/** Write a file atomically: a crash leaves the old file or the new one, never half of one. */
export async function writeAtomic(path: string, data: Uint8Array): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
  try {
    await writeFile(tmp, data);
    await rename(tmp, path);
  } catch (err) {
    // A full disk or a failed rename leaves no half-written temp file behind.
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
}

export function progress(label: string, total: number): ((n: number) => void) | undefined {
  if (!process.stderr.isTTY || total <= 0) return undefined;
  let lastDraw = 0;
  return (n: number) => {
    const now = Date.now();
    if (now - lastDraw < 100 && n < total) return;
    lastDraw = now;
    const pct = Math.min(100, Math.floor((n / total) * 100));
    const width = 30;
    const bar = '#'.repeat(Math.floor((pct / 100) * width)).padEnd(width, '.');
    process.stderr.write(`\r${label} [${bar}] ${pct}% ${(n / 1e6).toFixed(1)}/${(total / 1e6).toFixed(1)} MB`);
    if (n >= total) process.stderr.write('\n');
  };
}

export function printTable(rows: string[][]): void {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  for (const r of rows) process.stdout.write(r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]))).join('  ') + '\n');
}


/** The `[blob]` keys of the daemon config that tune its registry clients. */
export interface RegistrySettings {
  maxRetries: number;
  connectTimeoutMs: number;
  responseTimeoutMs: number;
  maxConnectionsPerHost: number;
}

/** The `[blob]` registry settings as RegistryClient options (the snapshotter's from its config, the FUSE manager's from its flags). */
export function registryTuning(c: RegistrySettings): {
  retry: { attempts: number };
  timeouts: { connectMs: number; firstByteMs: number; idleMs: number };
  connectionsPerHost: number;
} {
  return {
    retry: { attempts: c.maxRetries + 1 },
    timeouts: { connectMs: c.connectTimeoutMs, firstByteMs: c.responseTimeoutMs, idleMs: c.responseTimeoutMs },
    connectionsPerHost: c.maxConnectionsPerHost,
  };
}

/** The registry flags of create, push, convert, index, mount, explain and rpull. */
export interface RegistryOptions {
  root: string;
  plainHttp?: boolean;
  user?: string;
  hostsDir: string;
  logLevel: LogLevel;
}

export function addRegistryOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option('--root <dir>', 'local store of indexes and zTOCs').env('SOCI_TS_ROOT').default(DEFAULT_ROOT))
    .option('--plain-http', 'talk plain HTTP to the registry (loopback registries with a port already are)')
    .option('-u, --user <user:password>', 'registry credentials (default: ~/.docker/config.json and its credential helpers)')
    .addOption(new Option('--hosts-dir <dir>', 'containerd certs.d directory (mirrors, CAs, plain HTTP)').default(DEFAULT_CERTS_DIR))
    .addOption(
      new Option('--log-level <level>', 'JSON log lines on stderr at this level and above')
        .choices(['debug', 'info', 'warn', 'error'])
        .default('warn'),
    );
}

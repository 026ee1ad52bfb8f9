/**
 * systemd units for the snapshotter daemon, and `soci-ts install-systemd`, which writes them.
 *
 * The units in the repository's `systemd/` directory are exactly what {@link renderUnits}
 * makes with the defaults (the test checks it), so the two never drift apart.
 */
import { spawn } from 'node:child_process';
import { mkdir, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command } from 'commander';
import { DEFAULT_CONFIG_PATH } from './config.js';
import { DEFAULT_ADDRESS } from './server.js';
import { UsageError } from './cli-util.js';

export const SERVICE_UNIT = 'soci-ts-snapshotter.service';
export const SOCKET_UNIT = 'soci-ts-snapshotter.socket';
export const DEFAULT_UNIT_DIR = '/etc/systemd/system';
/** The ExecStart binary of the units shipped in systemd/. */
export const DEFAULT_UNIT_BIN = '/usr/local/bin/soci-ts';

export interface UnitOptions {
  /** The soci-ts executable ExecStart runs. */
  bin: string;
  /** The config file the daemon reads (`--config`). */
  config: string;
  /** The socket systemd listens on for the daemon (ListenStream). */
  address: string;
}

export const DEFAULT_UNIT_OPTIONS: Readonly<UnitOptions> = Object.freeze({ bin: DEFAULT_UNIT_BIN, config: DEFAULT_CONFIG_PATH, address: DEFAULT_ADDRESS });

export class SystemdError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'SystemdError';
  }
}

/** Quotes a word for ExecStart= when it needs it (systemd's own quoting rules: "…" with \ escapes). */
function execWord(w: string): string {
  if (/^[A-Za-z0-9_@%+=:,./-]+$/.test(w)) return w;
  return `"${w.replace(/\\/g, '\\\\').replace(/"/g, '\\"')}"`;
}

function checkPath(what: string, p: string): void {
  if (!p.startsWith('/')) throw new UsageError(`${what} ${p}: must be an absolute path`);
  if (/[\n\r]/.test(p)) throw new UsageError(`${what}: a path with a newline cannot go into a unit file`);
}

/** The two unit files' text, by file name. */
export function renderUnits(opts: UnitOptions = DEFAULT_UNIT_OPTIONS): Record<string, string> {
  checkPath('--bin', opts.bin);
  checkPath('--config', opts.config);
  checkPath('--address', opts.address);
  if (/\s|%/.test(opts.address)) throw new UsageError(`--address ${opts.address}: ListenStream= cannot take a path with spaces or %`);
  const service = `# soci-ts: the containerd snapshotter daemon (written by \`soci-ts install-systemd\`).
# containerd reaches it through a proxy plugin in its config.toml:
#   [proxy_plugins.soci-ts]
#     type = "snapshot"
#     address = "${opts.address}"
[Unit]
Description=soci-ts snapshotter (lazy loading of SOCI-indexed container images for containerd)
Requires=${SOCKET_UNIT}
After=${SOCKET_UNIT} network-online.target
Wants=network-online.target
Before=containerd.service

[Service]
# Simple: the daemon does not speak sd_notify. Socket activation makes that harmless: systemd
# holds the listening socket from boot, and containerd's first connections wait in its backlog
# until the daemon accepts them.
Type=simple
ExecStart=${execWord(opts.bin)} snapshotter --config ${execWord(opts.config)}
# KillMode=process: stopping or restarting the service signals only the snapshotter process.
# The FUSE-manager process it starts serves the files of lazily loaded layers to running
# containers; with the default KillMode=control-group systemd would kill it too, and every
# running container would lose its root file system. The restarted snapshotter reattaches to it.
KillMode=process
Restart=on-failure
RestartSec=1s
# Each lazily mounted layer holds /dev/fuse, cache files and registry connections open.
LimitNOFILE=1048576
# It mounts FUSE and overlayfs for containerd: root, no further sandboxing.

[Install]
WantedBy=multi-user.target
Also=${SOCKET_UNIT}
`;
  const socket = `# soci-ts: the socket containerd's proxy plugin dials; systemd passes it to the daemon as fd 3.
[Unit]
Description=soci-ts snapshotter socket

[Socket]
ListenStream=${opts.address}
SocketMode=0600
DirectoryMode=0711
FileDescriptorName=soci-ts.sock
Service=${SERVICE_UNIT}

[Install]
WantedBy=sockets.target
`;
  return { [SERVICE_UNIT]: service, [SOCKET_UNIT]: socket };
}

export interface InstallResult {
  path: string;
  action: 'wrote' | 'unchanged';
}

/** Writes the units into `dir` (atomically; a file that already has the same text is left alone). */
export async function installUnits(dir: string, opts: UnitOptions): Promise<InstallResult[]> {
  const units = renderUnits(opts);
  await mkdir(dir, { recursive: true, mode: 0o755 });
  const out: InstallResult[] = [];
  for (const [name, text] of Object.entries(units)) {
    const path = join(dir, name);
    const old = await readFile(path, 'utf8').catch((e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') return undefined;
      throw e;
    });
    if (old === text) {
      out.push({ path, action: 'unchanged' });
      continue;
    }
    const tmp = join(dir, `.${name}.${process.pid}.tmp`);
    await writeFile(tmp, text, { mode: 0o644 });
    await rename(tmp, path);
    out.push({ path, action: 'wrote' });
  }
  return out;
}

function systemctl(args: string[]): Promise<void> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn('systemctl', args, { stdio: ['ignore', 'inherit', 'pipe'] });
    let err = '';
    child.stderr.on('data', (b: Buffer) => (err += b.toString()));
    child.on('error', (e) => reject(new SystemdError(`systemctl ${args.join(' ')}: ${e.message}`, { cause: e })));
    child.on('close', (code) => (code === 0 ? resolvePromise() : reject(new SystemdError(`systemctl ${args.join(' ')} failed (exit ${code}): ${err.trim().split('\n')[0] ?? ''}`))));
  });
}

/** This checkout's bin/soci-ts (dist/daemon/systemd.js → ../../bin). */
function thisBin(): string {
  return resolve(fileURLToPath(new URL('../../bin/soci-ts', import.meta.url)));
}

interface InstallFlags {
  prefix: string;
  bin?: string;
  config: string;
  address: string;
  now?: boolean;
}

export function installSystemdCommand(): Command {
  return new Command('install-systemd')
    .description(`write the systemd units ${SERVICE_UNIT} and ${SOCKET_UNIT} (idempotent; enables and starts nothing unless --now)`)
    .option('--prefix <dir>', 'directory for the unit files', DEFAULT_UNIT_DIR)
    .option('--bin <path>', "the soci-ts executable ExecStart runs (default: this checkout's bin/soci-ts)")
    .option('--config <file>', 'the config file the daemon reads', DEFAULT_CONFIG_PATH)
    .option('--address <socket>', "the socket systemd listens on (containerd's proxy plugin address)", DEFAULT_ADDRESS)
    .option('--now', `then systemctl daemon-reload, enable --now ${SOCKET_UNIT}, enable ${SERVICE_UNIT}`)
    .action(async (flags: InstallFlags) => {
      const bin = flags.bin ?? thisBin();
      const prefix = resolve(flags.prefix);
      const results = await installUnits(prefix, { bin, config: flags.config, address: flags.address });
      for (const r of results) process.stdout.write(`${r.action} ${r.path}\n`);
      const configExists = await stat(flags.config).then(
        () => true,
        () => false,
      );
      if (!configExists) process.stdout.write(`note: ${flags.config} does not exist yet; the daemon refuses to start without it (an empty file means the defaults)\n`);
      if (flags.now) {
        await systemctl(['daemon-reload']);
        await systemctl(['enable', '--now', SOCKET_UNIT]);
        await systemctl(['enable', SERVICE_UNIT]);
        process.stdout.write(`enabled and started ${SOCKET_UNIT}; enabled ${SERVICE_UNIT} (it starts at boot, or at containerd's first connection)\n`);
      } else if (prefix === DEFAULT_UNIT_DIR && results.some((r) => r.action === 'wrote')) {
        process.stdout.write(`next: systemctl daemon-reload && systemctl enable --now ${SOCKET_UNIT} && systemctl enable ${SERVICE_UNIT}\n`);
      }
    });
}

export function isSystemdUserError(err: unknown): boolean {
  return err instanceof SystemdError;
}

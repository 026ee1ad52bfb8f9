/**
 * `soci-ts fuse-manager` (hidden): the FUSE manager process the snapshotter starts (see
 * daemon/fuse-manager.ts). Runs until SIGTERM or SIGINT, then unmounts its layers and exits 0.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { jsonLogger, RegistryClient, type LogLevel } from '../fetcher/index.js';
import { parseSize, registryTuning } from './cli-util.js';
import { FuseManager } from './fuse-manager.js';
import { DEFAULT_LOG_FILES, DEFAULT_LOG_MAX_BYTES, RotatingLogFile } from './log-file.js';
import { createMetrics } from './metrics.js';
import { ArtifactStore } from './store.js';
import { closeSync, readdirSync, readFileSync } from 'node:fs';

const O_CLOEXEC = 0o2000000;

/**
 * Closes the file descriptors this process inherited beyond stdio (a systemd-activated socket,
 * a pipe of whoever started the snapshotter): the manager outlives its parent, and a pipe it
 * held open would keep the parent's parent waiting for EOF, a socket would stay in use. Node
 * and libuv open everything with O_CLOEXEC, so a descriptor without it was inherited. At
 * start, before anything is served (sync calls are fine here). Returns the closed fds.
 */
export function closeInheritedFds(): number[] {
  const closed: number[] = [];
  let fds: string[];
  try {
    fds = readdirSync('/proc/self/fd');
  } catch {
    return closed;
  }
  for (const name of fds) {
    const fd = Number(name);
    if (!Number.isInteger(fd) || fd <= 2) continue;
    try {
      const flags = /^flags:\s+([0-7]+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
      if (flags === null || (parseInt(flags[1]!, 8) & O_CLOEXEC) !== 0) continue;
      closeSync(fd);
      closed.push(fd);
    } catch {
      // gone meanwhile (the directory's own fd), or not ours to close
    }
  }
  return closed;
}

interface Flags {
  root: string;
  socket: string;
  hostsDir: string;
  dockerConfig?: string;
  fetchTimeout: number;
  maxRetries: number;
  connectTimeout: number;
  responseTimeout: number;
  connectionsPerHost: number;
  memoryCache?: number;
  diskCache?: number;
  background: boolean;
  backgroundRate?: number;
  backgroundDelay: number;
  logLevel: LogLevel;
  logFile?: string;
  idleExit: number;
  logMaxSize: number;
  logFiles: number;
}

const files = (v: string): number => {
  const n = Number(v);
  if (!/^\d+$/.test(v.trim()) || n > 100) throw new InvalidArgumentError(`"${v}" is not a number of files from 0 to 100`);
  return n;
};

const retries = (v: string): number => {
  const n = Number(v);
  if (!/^\d+$/.test(v.trim()) || n > 20) throw new InvalidArgumentError(`"${v}" is not a number of retries from 0 to 20`);
  return n;
};

const connections = (v: string): number => {
  const n = Number(v);
  if (!/^\d+$/.test(v.trim()) || n < 1 || n > 256) throw new InvalidArgumentError(`"${v}" is not a number of connections from 1 to 256`);
  return n;
};

const ms = (v: string): number => {
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0) throw new InvalidArgumentError(`"${v}" is not a number of milliseconds`);
  return n;
};

export function fuseManagerCommand(): Command {
  const cmd = new Command('fuse-manager')
    .description('internal: the process that serves the snapshotter\'s lazily mounted layers (started by `soci-ts snapshotter`)')
    .requiredOption('--root <dir>', 'the snapshotter root (artifact store, span cache)')
    .requiredOption('--socket <path>', 'unix socket to serve on')
    .addOption(new Option('--hosts-dir <dir>', 'containerd certs.d directory').default('/etc/containerd/certs.d'))
    .option('--docker-config <file>', 'docker config.json with auths and credential helpers (default: $DOCKER_CONFIG or ~/.docker)')
    .addOption(new Option('--fetch-timeout <ms>', 'a read waiting longer for the registry gets EIO').argParser(ms).default(30_000))
    .addOption(new Option('--max-retries <n>', 'retries of a failed registry request').argParser(retries).default(4))
    .addOption(new Option('--connect-timeout <ms>', 'TCP + TLS connect to a registry').argParser(ms).default(10_000))
    .addOption(new Option('--response-timeout <ms>', 'to the response headers, and the longest silence in a body').argParser(ms).default(30_000))
    .addOption(new Option('--connections-per-host <n>', 'parallel connections per registry host').argParser(connections).default(8))
    .addOption(new Option('--memory-cache <size>', 'bound of the inflated-span memory cache').argParser(parseSize))
    .addOption(new Option('--disk-cache <size>', 'bound of the compressed-span disk cache').argParser(parseSize))
    .option('--no-background', 'do not fetch the rest of the layers in the background')
    .addOption(new Option('--background-rate <size>', 'background fetch: compressed bytes per second').argParser(parseSize))
    .addOption(new Option('--background-delay <ms>', 'background fetch: wait after a mount').argParser(ms).default(10_000))
    .addOption(new Option('--log-level <level>', 'JSON log lines at this level and above').choices(['debug', 'info', 'warn', 'error']).default('info'))
    .addOption(new Option('--idle-exit <ms>', 'exit after this long with nothing mounted and no snapshotter connected (0 = never)').argParser(ms).default(0))
    .option('--log-file <path>', 'write the log lines to this file, rotated by size (default: stderr)')
    .addOption(new Option('--log-max-size <size>', 'with --log-file: rotate before the file grows past this').argParser(parseSize).default(DEFAULT_LOG_MAX_BYTES, '10MiB'))
    .addOption(new Option('--log-files <n>', 'with --log-file: rotated files kept (FILE.1 … FILE.N)').argParser(files).default(DEFAULT_LOG_FILES))
    .action(async (f: Flags) => {
      const inherited = closeInheritedFds();
      // Written asynchronously (a synchronous write to a file on stderr would stall FUSE requests).
      const logFile = f.logFile !== undefined ? await RotatingLogFile.open({ path: f.logFile, maxBytes: f.logMaxSize, keep: f.logFiles }) : undefined;
      const logger = jsonLogger(f.logLevel, logFile ?? process.stderr, { component: 'fuse-manager' });
      // Credentials come from the docker config and its helpers, read by this process (each
      // time a registry asks), never handed over by the snapshotter.
      // Its own registry; the snapshotter's endpoint merges it in (process="fuse-manager").
      const metrics = createMetrics({ process: 'fuse-manager' });
      const client = new RegistryClient({
        hostsDir: f.hostsDir,
        credentials: f.dockerConfig !== undefined ? { configPath: f.dockerConfig } : {},
        ...registryTuning({ maxRetries: f.maxRetries, connectTimeoutMs: f.connectTimeout, responseTimeoutMs: f.responseTimeout, maxConnectionsPerHost: f.connectionsPerHost }),
        logger,
        onRetry: (e) => metrics.retry(e.operation, e.cause),
      });
      if (inherited.length > 0) logger.debug('closed inherited file descriptors', { fds: inherited });
      const store = new ArtifactStore({ root: f.root });
      // Keeps the process alive while it serves (FUSE threads alone may not).
      const keepAlive = setInterval(() => undefined, 1 << 30);
      let manager: FuseManager;
      let idle: (() => void) | undefined;
      try {
        manager = await FuseManager.start({
          root: f.root,
          socket: f.socket,
          client,
          store,
          logger,
          fetchTimeoutMs: f.fetchTimeout,
          memoryCacheBytes: f.memoryCache,
          diskCacheBytes: f.diskCache,
          background: { enabled: f.background, rateBytesPerSec: f.backgroundRate, startDelayMs: f.backgroundDelay },
          metrics,
          idleExitMs: f.idleExit,
          onIdle: () => idle?.(),
        });
      } catch (err) {
        clearInterval(keepAlive);
        await client.close().catch(() => undefined);
        logger.error('FUSE manager cannot start', { error: err });
        await logFile?.close();
        throw err;
      }
      await new Promise<void>((resolve) => {
        const stop = (): void => {
          process.off('SIGTERM', onSignal);
          process.off('SIGINT', onSignal);
          manager.stop().then(resolve, (e: unknown) => {
            logger.error('shutdown failed', { error: e });
            resolve();
          });
        };
        const onSignal = (sig: NodeJS.Signals): void => {
          logger.info('stop signal: unmounting every layer', { signal: sig, mounts: manager.size });
          stop();
        };
        process.on('SIGTERM', onSignal);
        process.on('SIGINT', onSignal);
        idle = stop;
        // A hangup (the terminal that started it is gone) is not a reason to stop serving.
        process.on('SIGHUP', () => logger.info('SIGHUP ignored'));
      });
      clearInterval(keepAlive);
      await logFile?.close();
    });
  return cmd;
}

/** `soci-ts snapshotter`: the containerd snapshotter daemon (runs until SIGTERM or SIGINT). */
import { join } from 'node:path';
import { Command, Option } from 'commander';
import { jsonLogger, RegistryClient, type LogLevel } from '../fetcher/index.js';
import { ConfigError, DEFAULT_CONFIG, DEFAULT_CONFIG_PATH, readConfig, type SnapshotterConfig } from './config.js';
import { registryTuning } from './cli-util.js';
import { ArtifactStore } from './store.js';
import { FuseManagerIncompatibleError } from './fuse-manager-client.js';
import type { SnapshotterOptions } from './snapshotter.js';
import { ServerStartError, SnapshotterServer } from './server.js';
import { SnapshotterError } from './errdefs.js';
import { ProtoLoadError } from './grpc-api.js';
import { createMetrics, MetricsServerError, parseMetricsAddress, startDaemonMetrics, type MetricsSink } from './metrics.js';
import { serveMaybeActivated, SocketActivationError } from './socket-activation.js';
import { controlSocketPath } from './control.js';
import { ControlServer } from './control-server.js';
import { isRpullServiceUserError, rpullHandler } from './rpull-service.js';
import { warmContainerdCodecs } from './containerd-client.js';

interface Flags {
  config?: string;
  root?: string;
  address?: string;
  logLevel?: LogLevel;
  metricsAddress?: string;
}

export function snapshotterCommand(): Command {
  return new Command('snapshotter')
    .description("serve containerd's Snapshots API on a unix socket (a containerd proxy snapshotter plugin); runs until SIGTERM or SIGINT")
    .option('--config <file>', `TOML config file (keys root, address, log_level, hosts_dir, docker_config, [snapshotter], [blob], [background_fetch], [cache], [pull_modes.soci_v1], [pull_modes.soci_v2]; default ${DEFAULT_CONFIG_PATH}, when it exists)`)
    .option('--root <dir>', `directory for the metadata database and the snapshots (default ${DEFAULT_CONFIG.root})`)
    .option('--address <socket>', `unix socket to serve on (default ${DEFAULT_CONFIG.address})`)
    .addOption(new Option('--log-level <level>', `JSON log lines on stderr at this level and above (default ${DEFAULT_CONFIG.logLevel})`).choices(['debug', 'info', 'warn', 'error']))
    .option('--metrics-address <address>', `Prometheus endpoint GET /metrics: HOST:PORT, [IPv6]:PORT or a unix socket path; "" turns it off (default ${DEFAULT_CONFIG.metricsAddress})`)
    .addHelpText(
      'after',
      `
containerd uses the daemon through a proxy plugin in its config.toml:

  [proxy_plugins.soci-ts]
    type = "snapshot"
    address = "${DEFAULT_CONFIG.address}"

then e.g. \`ctr images pull --snapshotter soci-ts REF\` and \`ctr run --snapshotter soci-ts REF ID\`.
Snapshots live under ROOT/snapshots/<id>/{fs,work}, their metadata in ROOT/metadata.db (SQLite).
A Prepare with containerd's remote-snapshot labels (CRI, soci-ts rpull) of a SOCI-indexed image is
served lazily: the layer is mounted over FUSE by the FUSE manager, a separate long-lived process
the snapshotter starts (socket ROOT/fuse-manager.sock, log ROOT/fuse-manager.log rotated by size,
stdout/stderr ROOT/fuse-manager.out) so that running containers keep reading their files when the
snapshotter restarts.
Started by systemd with a socket (soci-ts install-systemd), it serves on the socket systemd passes.
Metrics of both processes are served together at GET /metrics on the metrics address.`,
    )
    .action(async (flags: Flags) => {
      const file = flags.config ?? DEFAULT_CONFIG_PATH;
      const fromFile = await readConfig(file, flags.config !== undefined);
      const config = { ...DEFAULT_CONFIG, ...fromFile };
      if (flags.root !== undefined) config.root = flags.root;
      if (flags.address !== undefined) config.address = flags.address;
      if (flags.logLevel !== undefined) config.logLevel = flags.logLevel;
      if (flags.metricsAddress !== undefined) {
        if (flags.metricsAddress !== '') parseMetricsAddress(flags.metricsAddress); // MetricsServerError naming it
        config.metricsAddress = flags.metricsAddress;
      }
      const logger = jsonLogger(config.logLevel, process.stderr, { component: 'snapshotter' });
      // ---- hooks (daemon/metrics.ts, daemon/socket-activation.ts): the metrics endpoint, a socket-activated listener.
      const metrics = createMetrics({ process: 'snapshotter' });
      const client = new RegistryClient({
        hostsDir: config.hostsDir,
        credentials: config.dockerConfig !== '' ? { configPath: config.dockerConfig } : {},
        ...registryTuning(config),
        logger,
        onRetry: (e) => metrics.retry(e.operation, e.cause),
      });
      const metricsConfigured = flags.metricsAddress !== undefined || fromFile.metricsAddress !== undefined;
      const endpoint = await startDaemonMetrics(config.metricsAddress, metricsConfigured, [{ name: 'snapshotter', collect: metrics.text }], logger);
      const remote = remoteOptions(config, client, metrics);
      const server = await serveMaybeActivated(config.address, logger, (address) => SnapshotterServer.start({ root: config.root, address, logger, remote })).catch(async (e: unknown) => {
        await endpoint?.close();
        await client.close().catch(() => undefined);
        throw e;
      });
      // The FUSE manager's own metrics, fetched over its socket at each scrape (once it runs).
      const remoteSnapshots = server.serving.snapshotter.remote;
      if (remoteSnapshots !== undefined) endpoint?.addSource({ name: 'fuse-manager', collect: () => remoteSnapshots.managerMetrics() });
      // ---- end of hooks
      // `soci-ts rpull` asks this warm process to pull (ROOT/control.sock); without it, rpull pulls in its own process.
      const controlSocket = controlSocketPath(config.root);
      const control = await ControlServer.start({
        socket: controlSocket,
        logger,
        handlers: { rpull: rpullHandler(logger, registryTuning(config), remoteSnapshots) },
        isUserError: isRpullServiceUserError,
      }).catch((err: unknown) => {
        logger.warn('control socket not served: soci-ts rpull pulls in its own process', { socket: controlSocket, error: err });
        return undefined;
      });
      if (control !== undefined) setTimeout(() => void warmContainerdCodecs().catch(() => undefined), 100).unref();
      await new Promise<void>((resolve) => {
        const onSignal = (sig: NodeJS.Signals): void => {
          logger.info('shutting down', { signal: sig });
          process.off('SIGTERM', onSignal);
          process.off('SIGINT', onSignal);
          Promise.resolve(control?.stop())
            .then(() => server.stop())
            .then(() => endpoint?.close())
            .then(() => client.close())
            .then(resolve, (e: unknown) => {
              logger.error('shutdown failed', { error: e });
              resolve();
            });
        };
        process.on('SIGTERM', onSignal);
        process.on('SIGINT', onSignal);
      });
    });
}

/** A FUSE manager this snapshotter starts exits after this long with no mount and no snapshotter connected. */
export const MANAGER_IDLE_EXIT_MS = 30_000;

/** Remote snapshots as the config asks (undefined when `snapshotter.remote = false`). */
export function remoteOptions(config: SnapshotterConfig, client: RegistryClient, metrics?: MetricsSink): SnapshotterOptions['remote'] {
  if (!config.remote) return undefined;
  const socket = config.fuseManagerAddress !== '' ? config.fuseManagerAddress : join(config.root, 'fuse-manager.sock');
  const args = [
    '--root',
    config.root,
    '--socket',
    socket,
    '--hosts-dir',
    config.hostsDir,
    ...(config.dockerConfig !== '' ? ['--docker-config', config.dockerConfig] : []),
    '--fetch-timeout',
    String(config.fetchTimeoutMs),
    '--max-retries',
    String(config.maxRetries),
    '--connect-timeout',
    String(config.connectTimeoutMs),
    '--response-timeout',
    String(config.responseTimeoutMs),
    '--connections-per-host',
    String(config.maxConnectionsPerHost),
    '--memory-cache',
    String(config.memoryCacheBytes),
    '--disk-cache',
    String(config.diskCacheBytes),
    ...(config.backgroundFetch ? [] : ['--no-background']),
    '--background-rate',
    String(config.backgroundRate),
    '--background-delay',
    String(config.backgroundStartDelayMs),
    '--log-level',
    config.logLevel,
    '--log-file',
    join(config.root, 'fuse-manager.log'),
    '--log-max-size',
    String(config.fuseManagerLogMaxBytes),
    '--log-files',
    String(config.fuseManagerLogFiles),
    // Started by this snapshotter: gone once nothing is mounted and no snapshotter is connected.
    '--idle-exit',
    String(MANAGER_IDLE_EXIT_MS),
  ];
  return {
    client,
    store: new ArtifactStore({ root: config.root }),
    settings: {
      minLayerSize: config.minLayerSize,
      manager: { socket, args, logFile: join(config.root, 'fuse-manager.log') },
      pullModes: { v1: config.sociV1, v2: config.sociV2 },
      startManagerAtOpen: config.fuseManagerAtStart,
    },
    metrics,
  };
}

/** Errors of the snapshotter command that are the user's to fix (exit code 1). */
export function isSnapshotterUserError(err: unknown): boolean {
  return (
    err instanceof ConfigError ||
    err instanceof ServerStartError ||
    err instanceof ProtoLoadError ||
    err instanceof MetricsServerError ||
    err instanceof SocketActivationError ||
    err instanceof FuseManagerIncompatibleError ||
    (err instanceof SnapshotterError && err.kind !== 'Internal')
  );
}

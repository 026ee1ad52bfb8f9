/**
 * `soci-ts mount REF DIR` and `soci-ts umount DIR`.
 *
 * Without --foreground, `mount` starts a detached `soci-ts mount --foreground --ready-fd 3 ...`
 * (its own session; stdout and stderr appended to `<root>/mounts/<id>.log`), waits for the one
 * JSON line it writes to fd 3 once DIR is mounted (or failed), prints one line and exits. The
 * child serves the FUSE layers until SIGTERM (what `umount` sends), SIGINT or SIGHUP, then
 * unmounts everything and exits 0.
 */
import { spawn } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { mkdir, open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { isLogLevel, jsonLogger, parseReference } from '../fetcher/index.js';
import { DEFAULT_SPAN_SIZE } from '../ztoc/index.js';
import { addRegistryOptions, setup, type RegistryOptions } from './cli-registry.js';
import { AsyncFdSink } from './log-sink.js';
import { parseSize, UsageError } from './cli-util.js';
import { DEFAULT_ROOT } from './store.js';
import { DEFAULT_MIN_LAYER_SIZE } from './workflow.js';
import { MountError, mountBase, mountId, mountImage, resolveDir, unmountDir, type ImageMount } from './mount.js';
import { DiscoverError } from './discover.js';
import { CacheError, FuseError } from '../fs/index.js';
import { ExitCodeError } from './cli-util.js';

export { ExitCodeError };


/** `30s`, `500ms`, `2m`, or a number of seconds. */
export function parseDuration(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$/.exec(text);
  if (m === null) throw new InvalidArgumentError(`"${text}" is not a duration (e.g. 30s, 500ms, 2m)`);
  const n = Number(m[1]) * (m[2] === 'ms' ? 1 : m[2] === 'm' ? 60_000 : 1000);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError(`"${text}" is not a positive duration`);
  return Math.round(n);
}

interface MountFlags extends RegistryOptions {
  buildIndex?: boolean;
  foreground?: boolean;
  platform?: string;
  fetchTimeout: number;
  backgroundFetch: boolean;
  minLayerSize: number;
  spanSize: number;
  readyFd?: number;
}

/** What the serving child reports on its ready fd (one JSON line). */
interface ReadyMessage {
  ok: boolean;
  message?: string;
  dir?: string;
  image?: string;
  pid?: number;
  lazy?: number;
  unpacked?: number;
  index?: { digest: string; source: string };
}

function summary(m: ImageMount): string {
  const s = m.state;
  const lazy = m.lazyLayers;
  const unpacked = m.unpackedLayers;
  const layers = (n: number): string => `${n} layer${n === 1 ? '' : 's'}`;
  const index = s.index === undefined ? 'no SOCI index' : `SOCI index ${s.index.digest} (${s.index.source})`;
  return `mounted ${s.image} at ${s.dir}: ${layers(lazy)} lazily (FUSE), ${layers(unpacked)} unpacked; ${index}; served by pid ${s.pid}`;
}

function readyMessage(m: ImageMount): ReadyMessage {
  return { ok: true, message: summary(m), dir: m.dir, image: m.state.image, pid: m.state.pid, lazy: m.lazyLayers, unpacked: m.unpackedLayers, index: m.state.index };
}

function writeFd(fd: number, msg: ReadyMessage): Promise<void> {
  return new Promise((resolve) => {
    const s = createWriteStream('', { fd, autoClose: true });
    s.on('error', () => resolve()); // the parent is gone: nobody to tell
    s.end(JSON.stringify(msg) + '\n', () => resolve());
  });
}

/** Resolves when one of the stop signals arrives (installed at once, so an early signal is not lost). */
function stopSignal(): { promise: Promise<string>; dispose: () => void } {
  let resolve!: (s: string) => void;
  const promise = new Promise<string>((r) => (resolve = r));
  const handlers = (['SIGTERM', 'SIGINT', 'SIGHUP'] as const).map((sig) => {
    const h = (): void => resolve(sig);
    process.on(sig, h);
    return [sig, h] as const;
  });
  return { promise, dispose: () => handlers.forEach(([sig, h]) => process.off(sig, h)) };
}

async function serveForeground(refText: string, dirText: string, opts: MountFlags): Promise<void> {
  const stop = stopSignal();
  // Keeps the process alive while it serves (signal handlers and FUSE threads alone may not).
  const keepAlive = setInterval(() => undefined, 1 << 30);
  // This process serves FUSE: its log lines (from FUSE reads too) must never block on stderr,
  // which is the mount's log file in the background, or a pipe nobody may be reading.
  const sink = await AsyncFdSink.open(2);
  try {
    await serveWith(refText, dirText, opts, stop, keepAlive, sink);
  } finally {
    // Lines of the unmount (or of a failed mount) reach the log before the process ends.
    await sink.close(5000);
  }
}

async function serveWith(refText: string, dirText: string, opts: MountFlags, stop: ReturnType<typeof stopSignal>, keepAlive: NodeJS.Timeout, sink: AsyncFdSink): Promise<void> {
  const { client, store, logger } = setup(opts, sink);
  let m: ImageMount;
  try {
    parseReference(refText);
    m = await mountImage({
      ref: refText,
      dir: dirText,
      root: opts.root,
      client,
      store,
      logger,
      platform: opts.platform,
      buildIndex: opts.buildIndex === true,
      minLayerSize: opts.minLayerSize,
      spanSize: opts.spanSize,
      fetchTimeoutMs: opts.fetchTimeout,
      backgroundFetch: opts.backgroundFetch,
    });
  } catch (err) {
    clearInterval(keepAlive);
    stop.dispose();
    await client.close().catch(() => undefined);
    if (opts.readyFd !== undefined) await writeFd(opts.readyFd, { ok: false, message: err instanceof Error ? err.message : String(err) });
    throw err;
  }
  try {
    if (opts.readyFd !== undefined) await writeFd(opts.readyFd, readyMessage(m));
    else process.stdout.write(summary(m) + '\n');
    const sig = await stop.promise;
    logger.info('stop signal: unmounting', { signal: sig, dir: m.dir });
    await m.unmount();
  } finally {
    clearInterval(keepAlive);
    stop.dispose();
    await client.close().catch(() => undefined);
  }
}

/** Starts the serving child and relays its outcome. */
async function mountBackground(dirText: string, opts: MountFlags): Promise<void> {
  const root = opts.root;
  const dir = await resolveDir(dirText);
  await mkdir(join(root, 'mounts'), { recursive: true, mode: 0o700 });
  const logPath = `${mountBase(root, mountId(dir))}.log`;
  const log = await open(logPath, 'a', 0o600);
  const script = process.argv[1];
  if (script === undefined) throw new Error('cannot tell which script runs the CLI (process.argv[1] is missing)');
  const args = [...process.execArgv, script, ...process.argv.slice(2), '--foreground', '--ready-fd', '3'];
  let child;
  try {
    child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', log.fd, log.fd, 'pipe'] });
  } finally {
    await log.close();
  }
  const exited = new Promise<number>((resolve) => {
    child.on('exit', (code, signal) => resolve(code ?? (signal !== null ? 128 : 2)));
    child.on('error', () => resolve(2));
  });
  const forward = (): void => void child.kill('SIGTERM');
  process.on('SIGINT', forward);
  try {
    const pipe = child.stdio[3] as NodeJS.ReadableStream | null;
    let text = '';
    if (pipe !== null) {
      for await (const chunk of pipe) text += chunk.toString();
    }
    const line = text.split('\n').find((l) => l.trim() !== '');
    let msg: ReadyMessage | undefined;
    try {
      msg = line === undefined ? undefined : (JSON.parse(line) as ReadyMessage);
    } catch {
      msg = undefined;
    }
    if (msg?.ok === true) {
      child.unref();
      process.stdout.write(`${msg.message ?? `mounted at ${dir}`}\n`);
      return;
    }
    const code = await exited;
    if (msg?.message !== undefined) throw new ExitCodeError(code === 2 ? `internal error: ${msg.message} (the stack is in ${logPath})` : msg.message, code === 0 ? 1 : code);
    const tail = (await readFile(logPath, 'utf8').catch(() => '')).trim().split('\n').slice(-5).join('\n');
    throw new ExitCodeError(`the mount process exited (code ${code}) without mounting; last lines of ${logPath}:\n${tail}`, 2);
  } finally {
    process.off('SIGINT', forward);
  }
}

function mountCommand(): Command {
  const cmd = new Command('mount')
    .description(
      'mount an image read-only at DIR: layers with a zTOC lazily over FUSE (fetching only what is read), the others downloaded and unpacked, stacked with overlayfs. ' +
        'Runs in the background (a detached process serves the mount until `soci-ts umount DIR`) unless --foreground. Needs root, /dev/fuse and overlayfs.',
    )
    .argument('<ref>', 'image reference, e.g. 127.0.0.1:5000/app:latest')
    .argument('<dir>', 'an existing, empty directory')
    .option('--build-index', 'when the image has no SOCI index, build zTOCs while mounting (each big layer streamed once, kept in the store)')
    .addOption(new Option('--min-layer-size <size>', 'with --build-index: layers smaller than this are unpacked instead').argParser(parseSize).default(DEFAULT_MIN_LAYER_SIZE, '10MiB'))
    .addOption(new Option('--span-size <size>', 'with --build-index: uncompressed bytes between checkpoints').argParser(parseSize).default(DEFAULT_SPAN_SIZE, '4MiB'))
    .option('--foreground', 'serve the mount in this process until SIGINT or SIGTERM, then unmount and exit')
    .option('--platform <os/arch[/variant]>', "which image of a multi-platform image (default: this host's)")
    .addOption(new Option('--fetch-timeout <duration>', 'a read waiting longer for the registry fails with EIO').argParser(parseDuration).default(30_000, '30s'))
    .option('--no-background-fetch', 'do not fetch the rest of the lazy layers into the disk cache after a quiet period')
    .addOption(new Option('--ready-fd <fd>', 'internal: report readiness as a JSON line on this fd').argParser((v) => Number.parseInt(v, 10)).hideHelp());
  addRegistryOptions(cmd);
  cmd.addHelpText(
    'after',
    '\nPrints one line: DIR, how many layers were mounted lazily and how many unpacked, and the index used.\n' +
      'Exit codes: 0 mounted (background) or unmounted cleanly after a signal (--foreground); 1 user error (not root, no FUSE or overlayfs, DIR not an empty directory, no index and no --build-index, a registry failure); 2 internal error.',
  );
  cmd.action(async (refText: string, dirText: string, opts: MountFlags) => {
    if (!isLogLevel(opts.logLevel)) throw new UsageError(`--log-level: ${opts.logLevel} is not one of debug, info, warn, error`);
    parseReference(refText);
    if (process.getuid?.() !== 0) throw new MountError('not-root', 'mount', 'mounting an image needs root (run as root, or with sudo)');
    if (opts.foreground === true) await serveForeground(refText, dirText, opts);
    else await mountBackground(dirText, opts);
  });
  return cmd;
}

function umountCommand(): Command {
  const cmd = new Command('umount')
    .description('unmount an image mounted by `soci-ts mount`: signal the process serving it, wait for it to unmount (killing it after --timeout), remove what is left')
    .argument('<dir>', 'the directory the image is mounted at')
    .addOption(new Option('--root <dir>', 'root directory (where mount states are)').env('SOCI_TS_ROOT').default(DEFAULT_ROOT))
    .addOption(new Option('--timeout <duration>', 'how long to wait for the serving process before killing it').argParser(parseDuration).default(30_000, '30s'))
    .addOption(new Option('--log-level <level>', 'JSON log lines on stderr at this level and above').choices(['debug', 'info', 'warn', 'error']).default('warn'));
  cmd.addHelpText('after', '\nExit codes: 0 unmounted; 1 DIR is not a soci-ts mount, or not root; 2 internal error.');
  cmd.action(async (dirText: string, opts: { root: string; timeout: number; logLevel: string }) => {
    if (!isLogLevel(opts.logLevel)) throw new UsageError(`--log-level: ${opts.logLevel} is not one of debug, info, warn, error`);
    if (process.getuid?.() !== 0) throw new MountError('not-root', 'umount', 'unmounting needs root (run as root, or with sudo)');
    const r = await unmountDir(dirText, opts.root, jsonLogger(opts.logLevel), opts.timeout);
    const how = r.how === 'signalled' ? `served by pid ${r.state.pid}, which unmounted and exited` : r.how === 'killed' ? `pid ${r.state.pid} did not stop in time and was killed; leftovers detached` : `its process (pid ${r.state.pid}) was gone; leftovers cleaned up`;
    process.stdout.write(`unmounted ${r.state.dir} (${how})\n`);
  });
  return cmd;
}

export function mountCommands(): Command[] {
  return [mountCommand(), umountCommand()];
}

/** Errors of mounting are the user's to act on (exit code 1). */
export function isMountUserError(err: unknown): boolean {
  return err instanceof MountError || err instanceof DiscoverError || err instanceof FuseError || err instanceof CacheError;
}

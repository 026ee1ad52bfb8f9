/**
 * `soci-ts rpull`: pull an image into containerd for the soci-ts snapshotter (see rpull.ts).
 * When a soci-ts snapshotter serves ROOT/control.sock, it does the pull (it is warm: no
 * module loading, no protobuf code generation, no new connections; control.ts); otherwise
 * the pull runs in this process. This module imports neither gRPC nor the fetcher until the
 * in-process path needs them.
 */
import { Command, Option } from 'commander';
import type { Socket } from 'node:net';
import { addRegistryOptions, ExitCodeError, type RegistryOptions } from './cli-util.js';
import { callControl, connectControl, ControlConnectionError, ControlRequestError, controlSocketPath, type RpullRequest } from './control.js';
import { DEFAULT_CONTAINERD_ADDRESS, DEFAULT_NAMESPACE, DEFAULT_RPULL_SNAPSHOTTER, describeLayer, mb } from './rpull-report.js';
import type { RpullEvent } from './rpull.js';

interface Flags extends RegistryOptions {
  address: string;
  namespace: string;
  snapshotter: string;
  platform?: string;
  json?: boolean;
  inProcess?: boolean;
}


/** Per-layer progress on a terminal's stderr (nothing otherwise). */
function terminalProgress(): ((e: RpullEvent) => void) | undefined {
  if (!process.stderr.isTTY) return undefined;
  let lastDraw = 0;
  return (e) => {
    if (e.type === 'layer-start') {
      process.stderr.write(`\rlayer ${e.index + 1}/${e.count} ${e.digest.slice(7, 19)}: preparing\x1b[K`);
    } else if (e.type === 'layer-progress') {
      const now = Date.now();
      if (now - lastDraw < 100 && e.done < e.total) return;
      lastDraw = now;
      const pct = e.total > 0 ? Math.min(100, Math.floor((e.done / e.total) * 100)) : 100;
      process.stderr.write(`\rlayer ${e.index + 1}/${e.count} ${e.digest.slice(7, 19)}: fetching ${pct}% ${mb(e.done)}/${mb(e.total)}\x1b[K`);
    } else if (e.type === 'layer-applying') {
      process.stderr.write(`\rlayer ${e.index + 1}/${e.count} ${e.digest.slice(7, 19)}: applying\x1b[K`);
    } else {
      process.stderr.write(`\r${describeLayer(e.layer, e.count)}\x1b[K\n`);
    }
  };
}

export function rpullCommand(): Command {
  const cmd = new Command('rpull')
    .description(
      'pull an image into containerd for a snapshotter, over containerd\'s API, the way containerd\'s unpacker does: ' +
        'layers the snapshotter serves lazily are neither fetched nor applied; the others are fetched, applied and committed',
    )
    .argument('<ref>', 'image reference, e.g. 127.0.0.1:5000/app:latest (also the image record\'s name)')
    .addOption(new Option('-a, --address <socket>', "containerd's gRPC socket").default(DEFAULT_CONTAINERD_ADDRESS))
    .addOption(new Option('-n, --namespace <ns>', 'containerd namespace').env('CONTAINERD_NAMESPACE').default(DEFAULT_NAMESPACE))
    .addOption(new Option('--snapshotter <name>', 'the snapshotter (containerd proxy plugin name)').default(DEFAULT_RPULL_SNAPSHOTTER))
    .option('--platform <os/arch[/variant]>', "which image of a multi-platform image (default: this host's)")
    .option('--json', 'print the result (per-layer outcome) as JSON')
    .option('--in-process', 'pull in this process even when the snapshotter at ROOT/control.sock could');
  addRegistryOptions(cmd);
  const rootOption = cmd.options.find((o) => o.long === '--root');
  if (rootOption !== undefined) rootOption.description = "the soci-ts snapshotter's root: the snapshotter serving ROOT/control.sock does the pull (it is warm); without one, the pull runs in this process";
  cmd.addHelpText(
    'after',
    `
Per layer: "lazy" (the snapshotter answered Prepare with ALREADY_EXISTS and mounted the layer
lazily), "local" (ALREADY_EXISTS, but the snapshotter fetched and unpacked the layer itself, as
for an indexed image's small layers), "fetched and applied" (blob streamed into containerd's
content store, applied by containerd's differ, committed), or "already present" (the chain
ID's snapshot exists).
Afterwards \`ctr run --snapshotter soci-ts REF ID CMD\` runs the image.`,
  );
  cmd.action(async (refText: string, opts: Flags) => {
    const ac = new AbortController();
    const onSignal = (): void => ac.abort(new ExitCodeError(`${refText}: interrupted`, 1));
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    try {
      const socket = controlSocketPath(opts.root);
      const sock = opts.inProcess === true ? undefined : await connectControl(socket);
      if (sock !== undefined) await rpullInSnapshotter(sock, socket, refText, opts, ac.signal);
      else await rpullInProcess(refText, opts, ac.signal);
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
  });
  return cmd;
}

async function rpullInSnapshotter(sock: Socket, socket: string, refText: string, opts: Flags, signal: AbortSignal): Promise<void> {
  const env: Record<string, string> = {};
  for (const k of ['DOCKER_CONFIG', 'HOME', 'PATH']) {
    const v = process.env[k];
    if (v !== undefined) env[k] = v;
  }
  const req: RpullRequest = {
    ref: refText,
    address: opts.address,
    namespace: opts.namespace,
    snapshotter: opts.snapshotter,
    ...(opts.platform !== undefined ? { platform: opts.platform } : {}),
    plainHttp: opts.plainHttp === true,
    ...(opts.user !== undefined ? { user: opts.user } : {}),
    hostsDir: opts.hostsDir,
    env,
    logLevel: opts.logLevel,
  };
  const progress = terminalProgress();
  try {
    const reply = await callControl(sock, socket, 'rpull', req, {
      onEvent: (e) => progress?.(e as RpullEvent),
      onLog: (line) => process.stderr.write(line.endsWith('\n') ? line : `${line}\n`),
      signal,
    });
    if (opts.json === true) process.stdout.write(JSON.stringify(reply.json, null, 2) + '\n');
    else process.stdout.write(reply.summary + '\n');
  } catch (err) {
    // The snapshotter classified it as this process would have: 1 for the user's, 2 for ours.
    if (err instanceof ControlRequestError) throw new ExitCodeError(err.message, err.kind === 'user' ? 1 : 2);
    throw err;
  }
}

async function rpullInProcess(refText: string, opts: Flags, signal: AbortSignal): Promise<void> {
  const [{ parseReference }, { setup }, { rpull, rpullResultJson, summarize }] = await Promise.all([import('../fetcher/index.js'), import('./cli-registry.js'), import('./rpull.js')]);
  const ref = parseReference(refText);
  const { client, logger } = setup(opts);
  try {
    const result = await rpull(client.repository(ref), {
      address: opts.address,
      namespace: opts.namespace,
      snapshotter: opts.snapshotter,
      platform: opts.platform,
      logger,
      onEvent: terminalProgress(),
      signal,
    });
    if (opts.json === true) process.stdout.write(JSON.stringify(rpullResultJson(result), null, 2) + '\n');
    else process.stdout.write(summarize(result) + '\n');
  } finally {
    await client.close();
  }
}

/**
 * Errors of rpull that are the user's to act on (exit code 1): containerd's answers included,
 * and the snapshotter going away mid-pull. By name, so that classifying loads no gRPC.
 */
export function isRpullUserError(err: unknown): boolean {
  return err instanceof ControlConnectionError || (err instanceof Error && (err.name === 'RpullError' || err.name === 'ContainerdApiError'));
}

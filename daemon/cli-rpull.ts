/** `soci-ts rpull`: pull an image into containerd for the soci-ts snapshotter (see rpull.ts). */
import { Command, Option } from 'commander';
import { formatPlatform, parseReference } from '../fetcher/index.js';
import { addRegistryOptions, setup, type RegistryOptions } from './cli-registry.js';
import { ContainerdApiError } from './containerd-client.js';
import {
  DEFAULT_CONTAINERD_ADDRESS,
  DEFAULT_NAMESPACE,
  DEFAULT_RPULL_SNAPSHOTTER,
  describeLayer,
  rpull,
  RpullError,
  summarize,
  type RpullEvent,
  type RpullResult,
} from './rpull.js';

interface Flags extends RegistryOptions {
  address: string;
  namespace: string;
  snapshotter: string;
  platform?: string;
  json?: boolean;
}

function mb(n: number): string {
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : n >= 1e3 ? `${(n / 1e3).toFixed(1)} kB` : `${n} B`;
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

function resultJson(r: RpullResult): object {
  return {
    image: r.image,
    namespace: r.namespace,
    snapshotter: r.snapshotter,
    target: r.target,
    manifest: r.manifest.digest,
    config: r.config.digest,
    ...(r.platform === undefined ? {} : { platform: formatPlatform(r.platform) }),
    chainId: r.chainId,
    imageRecord: r.imageRecord,
    fetchedBytes: r.fetchedBytes,
    seconds: r.seconds,
    layers: r.layers.map((l) => ({
      digest: l.digest,
      mediaType: l.mediaType,
      size: l.size,
      diffId: l.diffId,
      chainId: l.chainId,
      outcome: l.outcome,
      fetchedBytes: l.fetchedBytes,
      ...(l.blobInStore === undefined ? {} : { blobInStore: l.blobInStore }),
    })),
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
    .option('--json', 'print the result (per-layer outcome) as JSON');
  addRegistryOptions(cmd);
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
    const ref = parseReference(refText);
    const { client, logger } = setup(opts);
    const ac = new AbortController();
    const onSignal = (): void => ac.abort(new RpullError(ref.toString(), 'interrupted'));
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    try {
      const result = await rpull(client.repository(ref), {
        address: opts.address,
        namespace: opts.namespace,
        snapshotter: opts.snapshotter,
        platform: opts.platform,
        logger,
        onEvent: terminalProgress(),
        signal: ac.signal,
      });
      if (opts.json === true) process.stdout.write(JSON.stringify(resultJson(result), null, 2) + '\n');
      else process.stdout.write(summarize(result) + '\n');
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      await client.close();
    }
  });
  return cmd;
}

/** Errors of rpull that are the user's to act on (exit code 1): containerd's answers included. */
export function isRpullUserError(err: unknown): boolean {
  return err instanceof RpullError || err instanceof ContainerdApiError;
}

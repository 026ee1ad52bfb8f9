/**
 * `soci-ts explain REF`: how the snapshotter would serve each layer of an image, and why, by
 * running the same discovery as `mount` and the daemon (discover.ts: the local store, the v2
 * annotation, v1 referrers or the fallback tag) without pulling anything but the manifests,
 * the SOCI index and the zTOCs (each a few hundred KiB at most).
 *
 * Per layer, one of (reason codes are the daemon's `soci_ts_layer_mode` reasons):
 * - `lazy` (ztoc): the index has a zTOC for it: mounted over FUSE, spans fetched on demand;
 * - `local`: the image is indexed but this layer is not served lazily: the daemon fetches and
 *   unpacks it itself, as upstream does (`no-ztoc`: the index has no zTOC for it, usually
 *   because it is under the indexer's minimum layer size; `below-min-size`: it has one but is
 *   smaller than the daemon's min_layer_size; `bad-ztoc`: its zTOC cannot be fetched or does
 *   not fit the layer);
 * - `fallback`: containerd fetches and applies it the normal way (`no-index`, with where
 *   discovery looked; `mode-disabled`: the only index is of a version the daemon's pull modes
 *   disable, named with the config key that enables it; `bad-index`; `auth`; `registry-error`;
 *   `zstd`; `unsupported-media-type`).
 *
 * The daemon's config file (`--config`) gives min_layer_size and the pull modes, so the rows
 * are what that daemon would do.
 */
import { Command, Option } from 'commander';
import { AuthError, FetcherError, formatPlatform, layerCompression, normalizePlatform, type Descriptor, type Logger, type Repository } from '../fetcher/index.js';
import { addRegistryOptions, setup, type RegistryOptions } from './cli-registry.js';
import { parseSize } from './cli-util.js';
import { DEFAULT_CONFIG, DEFAULT_CONFIG_PATH, readConfig } from './config.js';
import { DiscoverError, discoverIndex, type DiscoveredIndex, type IndexSource, type PullModes } from './discover.js';
import type { LayerMode, LayerModeReason } from './metrics.js';
import type { ArtifactStore } from './store.js';
import { resolveImages, DEFAULT_MIN_LAYER_SIZE } from './workflow.js';

export interface ExplainedLayer {
  /** Position in the manifest, 0 = bottom. */
  n: number;
  digest: string;
  size: number;
  mediaType: string;
  mode: LayerMode;
  reason: LayerModeReason;
  /** One sentence for people. */
  detail: string;
  /** For layers with a zTOC in the index. */
  ztoc?: { digest: string; size: number; spans?: number };
}

export interface Explanation {
  image: string;
  manifest: string;
  platform: string;
  /** The index discovery found, or null. */
  index: { digest: string; version: 'v1' | 'v2'; source: IndexSource } | null;
  /** Where discovery looked and what it found (or why nothing). */
  discovery: string;
  layers: ExplainedLayer[];
}

export interface ExplainOptions {
  store?: ArtifactStore;
  logger?: Logger;
  platform?: string;
  /** The daemon's min_layer_size: smaller layers are fetched and unpacked even with a zTOC (default 0). */
  minLayerSize?: number;
  /** The daemon's pull modes (default: both enabled). */
  pullModes?: PullModes;
}

const SOURCE_TEXT: Record<IndexSource, string> = {
  store: 'the local store',
  v2: "the image's com.amazon.soci.index-digest annotation (a SOCI-enabled image, v2)",
  v1: 'the v1 referrers of the image manifest: referrers API or sha256-<hex> fallback tag',
  explicit: 'the index digest given explicitly',
};

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Runs discovery for the image at `repo` and says how each layer would be served. */
export async function explainImage(repo: Repository, opts: ExplainOptions = {}): Promise<Explanation> {
  const logger = opts.logger ?? repo.client.logger;
  const minLayerSize = opts.minLayerSize ?? 0;
  const resolved = await resolveImages(repo, { platform: opts.platform });
  const image = resolved.images[0]!;
  const target = { descriptor: image.descriptor, manifest: image.manifest, index: resolved.index };

  let index: DiscoveredIndex | undefined;
  let none: { reason: LayerModeReason; detail: string } | undefined;
  try {
    index = await discoverIndex(repo, target, { store: opts.store, logger, pullModes: opts.pullModes });
  } catch (err) {
    if (err instanceof DiscoverError) {
      none = { reason: err.kind === 'no-index' || err.kind === 'mode-disabled' ? err.kind : 'bad-index', detail: err.reason };
    } else if (err instanceof AuthError) none = { reason: 'auth', detail: `authentication failed while looking for the index: ${message(err)}` };
    else if (err instanceof FetcherError) none = { reason: 'registry-error', detail: `the registry failed while looking for the index: ${message(err)}` };
    else throw err;
  }

  const layers: ExplainedLayer[] = [];
  for (const [n, desc] of image.manifest.layers.entries()) {
    const base = { n, digest: desc.digest, size: desc.size, mediaType: desc.mediaType };
    if (index === undefined) {
      const why =
        none!.reason === 'no-index'
          ? 'the image has no SOCI index'
          : none!.reason === 'mode-disabled'
            ? 'its SOCI index is of a disabled pull mode'
            : none!.reason === 'bad-index'
              ? 'its SOCI index is unusable'
              : 'no index could be looked up';
      layers.push({ ...base, mode: 'fallback', reason: none!.reason, detail: `${why} (see the index line): containerd fetches and applies it` });
      continue;
    }
    layers.push(await explainLayer(base, desc, index, minLayerSize));
  }
  return {
    image: repo.ref.toString(),
    manifest: image.descriptor.digest,
    platform: formatPlatform(normalizePlatform(image.platform)),
    index: index === undefined ? null : { digest: index.digest, version: index.version, source: index.source },
    discovery: index === undefined ? none!.detail : `SOCI index ${index.digest} (${index.version}) from ${SOURCE_TEXT[index.source]}`,
    layers,
  };
}

async function explainLayer(base: Omit<ExplainedLayer, 'mode' | 'reason' | 'detail'>, desc: Descriptor, index: DiscoveredIndex, minLayerSize: number): Promise<ExplainedLayer> {
  const compression = layerCompression(desc.mediaType);
  if (compression === undefined) return { ...base, mode: 'fallback', reason: 'unsupported-media-type', detail: `not a layer media type the daemon knows (${desc.mediaType}): containerd applies it` };
  const z = index.ztocFor(desc.digest);
  if (z === undefined) {
    if (compression === 'zstd') return { ...base, mode: 'fallback', reason: 'zstd', detail: 'zstd layer: no zTOC (as upstream) and the daemon does not unpack zstd: containerd applies it' };
    const small = desc.size < DEFAULT_MIN_LAYER_SIZE ? ` (it is ${size(desc.size)}, under the indexers' default minimum layer size of ${DEFAULT_MIN_LAYER_SIZE >> 20} MiB)` : '';
    return { ...base, mode: 'local', reason: 'no-ztoc', detail: `the index has no zTOC for it${small}: the daemon fetches and unpacks it` };
  }
  const ztoc: ExplainedLayer['ztoc'] = { digest: z.digest, size: z.size };
  let spans: number;
  try {
    const li = await index.loadZtoc(desc.digest);
    spans = li.ztoc.compressionInfo.maxSpanId + 1;
  } catch (err) {
    return { ...base, ztoc, mode: 'local', reason: 'bad-ztoc', detail: `its zTOC is unusable (${message(err)}): the daemon fetches and unpacks it` };
  }
  ztoc.spans = spans;
  if (desc.size < minLayerSize) {
    return { ...base, ztoc, mode: 'local', reason: 'below-min-size', detail: `smaller than the daemon's min_layer_size (${desc.size} < ${minLayerSize} bytes): the daemon fetches and unpacks it` };
  }
  return { ...base, ztoc, mode: 'lazy', reason: 'ztoc', detail: `mounted lazily over FUSE: ${spans} span${spans === 1 ? '' : 's'}, fetched on demand` };
}

function short(digest: string): string {
  return digest.replace(/^sha256:/, '').slice(0, 12);
}

function size(n: number): string {
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : n >= 1e3 ? `${(n / 1e3).toFixed(1)} kB` : `${n} B`;
}

function mediaTypeShort(mt: string): string {
  return mt.replace(/^application\/vnd\.(oci\.image|docker\.image\.rootfs)\./, '').replace(/^layer\.v1\./, '');
}

/** The human form: a header naming the index (or 'none' and why), then one row per layer. */
export function formatExplanation(e: Explanation): string {
  const lines: string[] = [];
  lines.push(`image: ${e.image} (${e.manifest}, ${e.platform})`);
  lines.push(e.index === null ? `index: none (${e.discovery})` : `index: ${e.index.version} ${e.index.digest} (from ${SOURCE_TEXT[e.index.source]})`);
  const rows = [['LAYER', 'DIGEST', 'SIZE', 'MEDIA TYPE', 'MODE', 'SPANS', 'ZTOC', 'REASON']];
  for (const l of e.layers) {
    rows.push([String(l.n), short(l.digest), size(l.size), mediaTypeShort(l.mediaType), l.mode, l.ztoc?.spans === undefined ? '-' : String(l.ztoc.spans), l.ztoc === undefined ? '-' : size(l.ztoc.size), `${l.reason}: ${l.detail}`]);
  }
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  for (const r of rows) lines.push(r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!))).join('  '));
  const counts = (['lazy', 'local', 'fallback'] as const).map((m) => `${e.layers.filter((l) => l.mode === m).length} ${m}`);
  lines.push(`${e.layers.length} layers: ${counts.join(', ')}`);
  return lines.join('\n') + '\n';
}

interface ExplainFlags extends RegistryOptions {
  platform?: string;
  json?: boolean;
  config?: string;
  minLayerSize?: number;
}

export function explainCommand(): Command {
  const cmd = new Command('explain')
    .description('say how the snapshotter would serve each layer of an image (lazy / local / fallback) and why, running the same index discovery without pulling')
    .argument('<ref>', 'image reference')
    .option('--platform <os/arch[/variant]>', "which image of a multi-platform image (default: this host's)")
    .option('--json', 'print the explanation as JSON')
    .option('--config <file>', `the daemon's config file, for min_layer_size and [pull_modes] (default ${DEFAULT_CONFIG_PATH}, when it exists)`)
    .addOption(new Option('--min-layer-size <size>', "the daemon's min_layer_size, overriding the config (layers smaller are fetched and unpacked even with a zTOC)").argParser((v) => (v === '0' ? 0 : parseSize(v))));
  addRegistryOptions(cmd);
  return cmd.action(async (ref: string, flags: ExplainFlags) => {
    const fromConfig = await readConfig(flags.config ?? DEFAULT_CONFIG_PATH, flags.config !== undefined);
    const minLayerSize = flags.minLayerSize ?? fromConfig.minLayerSize ?? 0;
    const { client, store, logger } = setup(flags);
    try {
      const pullModes = { v1: fromConfig.sociV1 ?? DEFAULT_CONFIG.sociV1, v2: fromConfig.sociV2 ?? DEFAULT_CONFIG.sociV2 };
      const e = await explainImage(client.repository(ref), { store, logger, platform: flags.platform, minLayerSize, pullModes });
      process.stdout.write(flags.json ? JSON.stringify(e, null, 2) + '\n' : formatExplanation(e));
    } finally {
      await client.close().catch(() => undefined);
    }
  });
}

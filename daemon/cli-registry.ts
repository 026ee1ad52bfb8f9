/**
 * CLI commands that talk to registries and the local store: `create`, `push`, `convert` and
 * `index list|info|rm`.
 */
import { Command, Option } from 'commander';
import {
  FetcherError,
  RegistryClient,
  formatPlatform,
  isLogLevel,
  jsonLogger,
  parseReference,
  DEFAULT_HOSTS_DIR,
  type LineSink,
  type Logger,
  type LogLevel,
} from '../fetcher/index.js';
import { ZtocError, DEFAULT_SPAN_SIZE } from '../ztoc/index.js';
import { ArtifactStore, StoreError, DEFAULT_ROOT, type IndexRecord } from './store.js';
import { addRegistryOptions, type RegistryOptions } from './cli-util.js';
export { addRegistryOptions, type RegistryOptions } from './cli-util.js';
import { parseSize, printTable, UsageError } from './cli-util.js';
import {
  convertImage,
  createIndexes,
  pushIndexes,
  resolveImages,
  WorkflowError,
  DEFAULT_MIN_LAYER_SIZE,
  type CreatedIndex,
  type PushedIndex,
} from './workflow.js';


interface PlatformOptions {
  platform?: string;
  allPlatforms?: boolean;
}

interface CreateFlags extends RegistryOptions, PlatformOptions {
  spanSize: number;
  minLayerSize: number;
  format: 'v1' | 'v2';
  push?: boolean;
  json?: boolean;
}

/** --root, --plain-http, --user, --hosts-dir, --log-level: the options every registry command takes. */
function addPlatformOptions(cmd: Command): Command {
  return cmd
    .option('--platform <os/arch[/variant]>', "which image of a multi-platform image (default: this host's)")
    .option('--all-platforms', 'every platform of a multi-platform image');
}

/** The client, store and logger the registry options ask for; log lines go to `sink` (default stderr). */
export function setup(opts: RegistryOptions, sink?: LineSink): { client: RegistryClient; store: ArtifactStore; logger: Logger } {
  if (!isLogLevel(opts.logLevel)) throw new UsageError(`--log-level: ${opts.logLevel} is not one of debug, info, warn, error`);
  const logger = sink === undefined ? jsonLogger(opts.logLevel) : jsonLogger(opts.logLevel, sink);
  const client = new RegistryClient({
    hostsDir: opts.hostsDir,
    plainHttp: opts.plainHttp === true,
    credentials: { user: opts.user },
    logger,
  });
  return { client, store: new ArtifactStore({ root: opts.root }), logger };
}

function short(digest: string): string {
  return digest.replace(/^sha256:/, '').slice(0, 12);
}

function mb(n: number): string {
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : n >= 1e3 ? `${(n / 1e3).toFixed(1)} kB` : `${n} B`;
}

/** A progress line on a terminal's stderr, redrawn at most 10 times a second. */
function progressLine(label: string): ((done: number, total: number) => void) | undefined {
  if (!process.stderr.isTTY) return undefined;
  let last = 0;
  const started = Date.now();
  return (done, total) => {
    const now = Date.now();
    if (now - last < 100 && done < total) return;
    last = now;
    const pct = total > 0 ? Math.min(100, Math.floor((done / total) * 100)) : 100;
    const width = 30;
    const bar = '#'.repeat(Math.floor((pct / 100) * width)).padEnd(width, '.');
    const rate = done / Math.max(0.001, (now - started) / 1000);
    process.stderr.write(`\r${label} [${bar}] ${pct}% ${mb(done)}/${mb(total)} ${mb(rate)}/s `);
    if (done >= total) process.stderr.write('\n');
  };
}

function createdJson(c: CreatedIndex): object {
  return {
    index: c.record.digest,
    format: c.record.format,
    image: c.record.imageRef,
    manifest: c.image.digest,
    platform: formatPlatform(c.platform),
    layers: c.layers.map((l) => ({
      digest: l.digest,
      mediaType: l.mediaType,
      size: l.size,
      ...(l.ztoc === undefined ? {} : { ztoc: l.ztoc.digest, ztocSize: l.ztoc.size, spans: l.ztoc.spans, files: l.ztoc.files, reused: l.reused === true }),
      ...(l.skipped === undefined ? {} : { skipped: l.skipped }),
    })),
  };
}

function printCreated(c: CreatedIndex): void {
  process.stdout.write(`${c.record.format} SOCI index ${c.record.digest}\n  image ${c.record.imageRef} (${formatPlatform(c.platform)}, manifest ${c.image.digest})\n\n`);
  printTable([
    ['LAYER', 'SIZE', 'SPANS', 'ZTOC SIZE', 'NOTE'],
    ...c.layers.map((l) => [
      short(l.digest),
      mb(l.size),
      l.ztoc === undefined ? '-' : String(l.ztoc.spans),
      l.ztoc === undefined ? '-' : mb(l.ztoc.size),
      l.skipped !== undefined ? `skipped: ${l.skipped}` : l.reused === true ? 'zTOC reused from the store' : '',
    ]),
  ]);
  process.stdout.write('\n');
}

function printPushed(p: PushedIndex, repo: string): void {
  process.stdout.write(
    `pushed ${p.record.digest} to ${repo} (${p.uploadedBlobs} blobs uploaded, ${p.existingBlobs} already there${p.referrersTagUpdated ? '; fallback referrers tag updated' : ''})\n`,
  );
}

function createCommand(): Command {
  const cmd = new Command('create')
    .description('build a SOCI index for an image in a registry: stream each layer once, store zTOCs and the index locally')
    .argument('<ref>', 'image reference, e.g. 127.0.0.1:5000/app:latest')
    .addOption(new Option('--span-size <size>', 'uncompressed bytes between checkpoints').argParser(parseSize).default(DEFAULT_SPAN_SIZE, '4MiB'))
    .addOption(new Option('--min-layer-size <size>', 'layers smaller than this get no zTOC (they are pulled whole)').argParser(parseSize).default(DEFAULT_MIN_LAYER_SIZE, '10MiB'))
    .addOption(new Option('--format <version>', 'v1: index with a subject, found through referrers; v2: for `convert`-style images').choices(['v1', 'v2']).default('v1'))
    .option('--push', 'push the index (v1) to the image repository afterwards')
    .option('--json', 'print the result as JSON');
  addPlatformOptions(cmd);
  addRegistryOptions(cmd);
  cmd.action(async (refText: string, opts: CreateFlags) => {
    if (opts.push === true && opts.format !== 'v1') throw new UsageError('--push pushes v1 indexes; for v2 use `soci-ts convert SRC DST`');
    const ref = parseReference(refText);
    const { client, store, logger } = setup(opts);
    try {
      const repo = client.repository(ref);
      const resolved = await resolveImages(repo, { platform: opts.platform, all: opts.allPlatforms });
      const created = await createIndexes(repo, resolved.images, {
        client,
        store,
        logger,
        spanSize: opts.spanSize,
        minLayerSize: opts.minLayerSize,
        format: opts.format,
        onProgress: progressLine('indexing'),
      });
      let pushed: PushedIndex[] = [];
      if (opts.push === true) pushed = await pushIndexes(repo, store, resolved.images, logger);
      if (opts.json === true) {
        process.stdout.write(JSON.stringify({ indexes: created.map(createdJson), pushed: pushed.map((p) => p.record.digest) }, null, 2) + '\n');
      } else {
        for (const c of created) printCreated(c);
        for (const p of pushed) printPushed(p, ref.name);
      }
    } finally {
      await client.close();
    }
  });
  return cmd;
}

function pushCommand(): Command {
  const cmd = new Command('push')
    .description('push the v1 SOCI index made by `create` (zTOCs + index manifest) to the image repository, discoverable through referrers or the sha256-<digest> tag')
    .argument('<ref>', 'image reference')
    .option('--json', 'print the result as JSON');
  addPlatformOptions(cmd);
  addRegistryOptions(cmd);
  cmd.action(async (refText: string, opts: RegistryOptions & PlatformOptions & { json?: boolean }) => {
    const ref = parseReference(refText);
    const { client, store, logger } = setup(opts);
    try {
      const repo = client.repository(ref);
      const resolved = await resolveImages(repo, { platform: opts.platform, all: opts.allPlatforms });
      const pushed = await pushIndexes(repo, store, resolved.images, logger);
      if (opts.json === true) {
        process.stdout.write(
          JSON.stringify(pushed.map((p) => ({ index: p.record.digest, manifest: p.record.imageManifestDigest, uploaded: p.uploadedBlobs, existing: p.existingBlobs, referrersTagUpdated: p.referrersTagUpdated })), null, 2) + '\n',
        );
      } else for (const p of pushed) printPushed(p, ref.name);
    } finally {
      await client.close();
    }
  });
  return cmd;
}

function convertCommand(): Command {
  const cmd = new Command('convert')
    .description('make a SOCI-enabled image (v2): build indexes for SRC and push to DST an image index sharing SRC\'s layers')
    .argument('<src>', 'source image reference')
    .argument('<dst>', 'destination image reference (a tag)')
    .addOption(new Option('--span-size <size>', 'uncompressed bytes between checkpoints').argParser(parseSize).default(DEFAULT_SPAN_SIZE, '4MiB'))
    .addOption(new Option('--min-layer-size <size>', 'layers smaller than this get no zTOC').argParser(parseSize).default(DEFAULT_MIN_LAYER_SIZE, '10MiB'))
    .option('--json', 'print the result as JSON');
  addPlatformOptions(cmd);
  addRegistryOptions(cmd);
  cmd.action(async (srcText: string, dstText: string, opts: CreateFlags) => {
    const src = parseReference(srcText);
    const dst = parseReference(dstText);
    if (dst.digest !== undefined) throw new UsageError(`${dstText}: the destination must be a tag, not a digest`);
    const { client, store, logger } = setup(opts);
    try {
      const result = await convertImage(client.repository(src), client.repository(dst), {
        client,
        store,
        logger,
        spanSize: opts.spanSize,
        minLayerSize: opts.minLayerSize,
        format: 'v2',
        platform: opts.platform,
        allPlatforms: opts.allPlatforms,
        onProgress: progressLine('indexing'),
      });
      if (opts.json === true) {
        process.stdout.write(JSON.stringify({ image: dst.toString(), index: result.index.digest, indexes: result.created.map(createdJson) }, null, 2) + '\n');
      } else {
        for (const c of result.created) printCreated(c);
        process.stdout.write(`pushed SOCI-enabled image ${dst.toString()} (image index ${result.index.digest})\n`);
      }
    } finally {
      await client.close();
    }
  });
  return cmd;
}

function recordJson(r: IndexRecord): object {
  return {
    digest: r.digest,
    format: r.format,
    image: r.imageRef,
    manifest: r.imageManifestDigest,
    platform: formatPlatform(r.platform),
    ztocs: r.ztocs.length,
    created: r.createdAt,
  };
}

function indexCommand(): Command {
  const index = new Command('index').description('SOCI indexes in the local store');
  const list = new Command('list')
    .description('list indexes, newest first (optionally only those of one image)')
    .argument('[ref]', 'image reference: by repository and tag, or by manifest digest')
    .addOption(new Option('--root <dir>', 'local store').env('SOCI_TS_ROOT').default(DEFAULT_ROOT))
    .option('--json', 'print as JSON')
    .action(async (refText: string | undefined, opts: { root: string; json?: boolean }) => {
      const store = new ArtifactStore({ root: opts.root });
      let records = await store.listIndexRecords();
      if (refText !== undefined) {
        const ref = parseReference(refText);
        records = records.filter((r) => {
          if (ref.digest !== undefined) return r.imageManifestDigest === ref.digest;
          const theirs = parseReference(r.imageRef);
          return theirs.name === ref.name && (theirs.tag ?? 'latest') === (ref.tag ?? 'latest');
        });
      }
      if (opts.json === true) {
        process.stdout.write(JSON.stringify(records.map(recordJson), null, 2) + '\n');
        return;
      }
      if (records.length === 0) {
        process.stderr.write(refText === undefined ? `no SOCI indexes in ${opts.root}\n` : `no SOCI indexes for ${refText} in ${opts.root}\n`);
        return;
      }
      printTable([
        ['DIGEST', 'FORMAT', 'PLATFORM', 'IMAGE', 'MANIFEST', 'ZTOCS', 'CREATED'],
        ...records.map((r) => [short(r.digest), r.format, formatPlatform(r.platform), r.imageRef, short(r.imageManifestDigest), String(r.ztocs.length), r.createdAt]),
      ]);
    });
  const info = new Command('info')
    .description('print an index manifest (pretty JSON)')
    .argument('<digest>', 'index digest (sha256:…, hex, or a unique prefix of at least 6 hex digits)')
    .addOption(new Option('--root <dir>', 'local store').env('SOCI_TS_ROOT').default(DEFAULT_ROOT))
    .action(async (digest: string, opts: { root: string }) => {
      const store = new ArtifactStore({ root: opts.root });
      const record = await store.getIndexRecord(digest);
      const bytes = await store.readBlob(record.digest);
      process.stdout.write(JSON.stringify(JSON.parse(Buffer.from(bytes).toString('utf8')), null, 2) + '\n');
    });
  const rm = new Command('rm')
    .description('remove indexes and the zTOCs no other index uses')
    .argument('<digest...>', 'index digests (or unique prefixes)')
    .addOption(new Option('--root <dir>', 'local store').env('SOCI_TS_ROOT').default(DEFAULT_ROOT))
    .action(async (digests: string[], opts: { root: string }) => {
      const store = new ArtifactStore({ root: opts.root });
      for (const d of digests) {
        const removed = await store.removeIndex(d);
        process.stdout.write(`removed ${removed.record.digest} (${removed.removedBlobs.length} blobs deleted, ${removed.keptBlobs.length} kept for other indexes)\n`);
      }
    });
  return index.addCommand(list).addCommand(info).addCommand(rm);
}

export function registryCommands(): Command[] {
  return [createCommand(), pushCommand(), convertCommand(), indexCommand()];
}

/** Errors of registries, the store and the workflows are the user's to act on (exit code 1). */
export function isRegistryUserError(err: unknown): boolean {
  return err instanceof FetcherError || err instanceof StoreError || err instanceof WorkflowError || err instanceof ZtocError;
}

/** `soci-ts ztoc …` (build and inspect zTOCs of local layers) and `soci-ts version`. */
import { Command, Option } from 'commander';
import { readFile } from 'node:fs/promises';
import { parseCount, parseSize, printTable, progress, UsageError, writeAtomic } from './cli-util.js';
import {
  buildZtocFromFile,
  encodeZtoc,
  extractFile,
  FileBlobReader,
  inflateEngine,
  LayerIndex,
  decodeZtoc,
  modeString,
  sha256Digest,
  ZtocError,
  ztocInfo,
  DEFAULT_SPAN_SIZE,
  DEFAULT_MAX_ENTRIES,
} from '../ztoc/index.js';
import { SOCI_TS_VERSION as VERSION } from './version.js';

async function readZtocFile(path: string): Promise<{ index: LayerIndex; size: number }> {
  const bytes = await readFile(path);
  return { index: new LayerIndex(decodeZtoc(bytes, path), path), size: bytes.length };
}

export function ztocCommand(): Command {
  const ztoc = new Command('ztoc').description('build and inspect zTOCs (per-layer indexes)');

  ztoc
    .command('build')
    .description('build the zTOC of a local layer blob (.tar.gz or .tar)')
    .argument('<layer>', 'layer blob: gzip-compressed or plain tar')
    .requiredOption('-o, --output <file>', 'where to write the zTOC')
    .addOption(new Option('--span-size <size>', 'uncompressed bytes between checkpoints').argParser(parseSize).default(DEFAULT_SPAN_SIZE, '4MiB'))
    .addOption(
      new Option('--max-entries <n>', 'refuse layers with more tar entries (bounds memory)')
        .argParser((v) => parseCount(v))
        .default(DEFAULT_MAX_ENTRIES),
    )
    .option('--json', 'print the result as JSON')
    .action(async (layer: string, opts: { output: string; spanSize: number; maxEntries: number; json?: boolean }) => {
      const { stat } = await import('node:fs/promises');
      const total = (await stat(layer)).size;
      const started = performance.now();
      const z = await buildZtocFromFile(layer, {
        spanSize: opts.spanSize,
        maxEntries: opts.maxEntries,
        onProgress: progress('indexing', total),
      });
      const bytes = encodeZtoc(z);
      await writeAtomic(opts.output, bytes);
      const seconds = (performance.now() - started) / 1000;
      const result = {
        ztoc: opts.output,
        digest: sha256Digest(bytes),
        size: bytes.length,
        layer,
        layer_size: z.compressedArchiveSize,
        compression: z.compressionInfo.algorithm,
        spans: z.compressionInfo.maxSpanId + 1,
        files: z.files.length,
        seconds: Number(seconds.toFixed(3)),
      };
      if (opts.json) process.stdout.write(JSON.stringify(result, null, 2) + '\n');
      else {
        process.stdout.write(
          `${opts.output}: ${result.digest} (${result.size} bytes), ${result.files} entries, ${result.spans} spans, ` +
            `${result.compression} layer of ${result.layer_size} bytes, in ${result.seconds} s\n`,
        );
      }
    });

  ztoc
    .command('info')
    .description('show a zTOC: version, build tool, sizes, spans and files')
    .argument('<ztoc>', 'zTOC file')
    .option('--json', 'print everything as JSON (the fields of upstream soci\'s `ztoc info`, plus spans)')
    .action(async (path: string, opts: { json?: boolean }) => {
      const { index, size } = await readZtocFile(path);
      const info = ztocInfo(index, size);
      if (opts.json) {
        process.stdout.write(JSON.stringify(info, null, 2) + '\n');
        return;
      }
      const lines = [
        ['version', info.version],
        ['build tool', info.build_tool],
        ['zTOC size', `${info.size} bytes`],
        ['compression', info.compression],
        ['layer size', `${info.compressed_archive_size} bytes compressed, ${info.uncompressed_archive_size} bytes of tar`],
        ['span size', String(info.span_size)],
        ['spans', String(info.num_spans)],
        ['files', `${info.num_files} (${info.num_multi_span_files} of them across several spans)`],
      ];
      printTable(lines.map(([k, v]) => [`${k}:`, v]));
      process.stdout.write('\n');
      printTable([
        ['SPAN', 'COMPRESSED', 'UNCOMPRESSED', 'BITS', 'DIGEST'],
        ...info.spans.map((s) => [
          String(s.id),
          `${s.compressed_start}-${s.compressed_end}`,
          `${s.uncompressed_start}-${s.uncompressed_end}`,
          String(s.bits),
          s.digest,
        ]),
      ]);
    });

  ztoc
    .command('list')
    .description('list the entries of a zTOC, like `tar -tv`')
    .argument('<ztoc>', 'zTOC file')
    .option('--json', 'print the entries as JSON')
    .action(async (path: string, opts: { json?: boolean }) => {
      const { index } = await readZtocFile(path);
      if (opts.json) {
        process.stdout.write(JSON.stringify(index.ztoc.files, null, 2) + '\n');
        return;
      }
      const rows = index.ztoc.files.map((f) => {
        const owner = `${f.uname || f.uid}/${f.gname || f.gid}`;
        const size = f.type === 'char' || f.type === 'block' ? `${f.devmajor},${f.devminor}` : String(f.uncompressedSize);
        const link = f.type === 'symlink' ? ` -> ${f.linkname}` : f.type === 'hardlink' ? ` link to ${f.linkname}` : '';
        return [modeString(f), owner, size, f.modTime, f.name + link];
      });
      if (rows.length > 0) printTable(rows);
    });

  ztoc
    .command('get-file')
    .description('extract one file of a layer through its zTOC')
    .argument('<ztoc>', 'zTOC file')
    .argument('<layer>', 'the layer blob the zTOC was built from')
    .argument('<path>', 'path of the file inside the layer')
    .option('-o, --output <file>', 'write the file here instead of stdout')
    .action(async (ztocPath: string, layer: string, path: string, opts: { output?: string }) => {
      const { index } = await readZtocFile(ztocPath);
      let entry = index.file(path);
      // Follow hardlinks to the entry that holds the data.
      for (let hops = 0; entry?.type === 'hardlink' && hops < 64; hops++) entry = index.file(entry.linkname);
      if (!entry) throw new UsageError(`${path}: no such file in ${ztocPath}`);
      if (entry.type !== 'reg') throw new UsageError(`${path}: is a ${entry.type}, not a regular file`);
      const blob = await FileBlobReader.open(layer);
      try {
        if (blob.size !== index.ztoc.compressedArchiveSize) {
          throw new UsageError(
            `${layer}: ${blob.size} bytes, but ${ztocPath} indexes a layer of ${index.ztoc.compressedArchiveSize} bytes`,
          );
        }
        const data = await extractFile(index, blob, entry);
        if (opts.output) await writeAtomic(opts.output, data);
        else await writeToStdout(data);
      } finally {
        await blob.close();
      }
    });

  return ztoc;
}

function writeToStdout(data: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => {
    process.stdout.write(data, (err) => (err ? reject(err) : resolve()));
  });
}

export function versionCommand(): Command {
  return new Command('version').description('print the version, the inflate engine and whether FUSE reads have the native path').action(async () => {
    // Loaded here only: the fs module loads the FUSE binding.
    const { nativeReadAvailable } = await import('../fs/index.js');
    const reads = nativeReadAvailable() ? 'native' : 'javascript';
    process.stdout.write(`soci-ts ${VERSION} (node ${process.version}, inflate: ${inflateEngine().name}, fuse reads: ${reads})\n`);
  });
}

/** zTOC errors are about the user's input (a layer, a zTOC file). */
export function isZtocUserError(err: unknown): boolean {
  return err instanceof ZtocError;
}

/**
 * The `soci-ts` command line. Exit codes: 0 ok, 1 user error (bad input or
 * usage; one line on stderr), 2 internal error.
 */
import { Command, CommanderError, Option } from 'commander';
import { readFile } from 'node:fs/promises';
import { ExitCodeError, parseCount, parseSize, printTable, progress, UsageError, writeAtomic } from './cli-util.js';
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

export { SOCI_TS_VERSION as VERSION } from './version.js';
import { SOCI_TS_VERSION as VERSION } from './version.js';
export { UsageError, parseSize } from './cli-util.js';

async function readZtocFile(path: string): Promise<{ index: LayerIndex; size: number }> {
  const bytes = await readFile(path);
  return { index: new LayerIndex(decodeZtoc(bytes, path), path), size: bytes.length };
}

function ztocCommand(): Command {
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

/** A group of top-level commands and how to tell its users' errors from ours. */
interface CommandGroup {
  commands: Command[];
  hidden?: boolean;
  isUserError?: (err: unknown) => boolean;
}

/**
 * Every top-level command, by name, with the module that defines it. A command's module (and
 * what it imports: undici, gRPC, SQLite, FUSE, prom-client) is loaded only when that command
 * runs, so `soci-ts rpull` does not pay for the snapshotter's dependencies at start-up.
 */
const COMMAND_GROUPS: ReadonlyArray<{ names: readonly string[]; load: () => Promise<CommandGroup> }> = [
  { names: ['ztoc'], load: async () => ({ commands: [ztocCommand()] }) },
  {
    names: ['create', 'push', 'convert', 'index'],
    load: async () => {
      const m = await import('./cli-registry.js');
      return { commands: m.registryCommands(), isUserError: m.isRegistryUserError };
    },
  },
  {
    names: ['mount', 'umount'],
    load: async () => {
      const m = await import('./cli-mount.js');
      return { commands: m.mountCommands(), isUserError: m.isMountUserError };
    },
  },
  {
    names: ['snapshotter'],
    load: async () => {
      const m = await import('./cli-snapshotter.js');
      return { commands: [m.snapshotterCommand()], isUserError: m.isSnapshotterUserError };
    },
  },
  {
    names: ['explain'],
    load: async () => {
      const [m, r] = await Promise.all([import('./explain.js'), import('./cli-registry.js')]);
      return { commands: [m.explainCommand()], isUserError: r.isRegistryUserError };
    },
  },
  {
    names: ['install-systemd'],
    load: async () => {
      const m = await import('./systemd.js');
      return { commands: [m.installSystemdCommand()], isUserError: m.isSystemdUserError };
    },
  },
  {
    names: ['fuse-manager'],
    load: async () => {
      const m = await import('./cli-fuse-manager.js');
      return { commands: [m.fuseManagerCommand()], hidden: true };
    },
  },
  {
    names: ['rpull'],
    load: async () => {
      const m = await import('./cli-rpull.js');
      return { commands: [m.rpullCommand()], isUserError: m.isRpullUserError };
    },
  },
  {
    names: ['bench'],
    load: async () => {
      const m = await import('./cli-bench.js');
      return { commands: [m.benchCommand()], isUserError: m.isBenchUserError };
    },
  },
  { names: ['version'], load: async () => ({ commands: [versionCommand()] }) },
];

function versionCommand(): Command {
  return new Command('version').description('print version and the inflate engine in use').action(() => {
    process.stdout.write(`soci-ts ${VERSION} (node ${process.version}, inflate: ${inflateEngine().name})\n`);
  });
}

/**
 * The program with the commands `argv` needs: only the named command's group when the first
 * argument names one, else every command (top-level help, `help CMD`, a typo to report).
 */
export async function buildProgram(argv: readonly string[] = []): Promise<{ program: Command }> {
  const program = new Command('soci-ts')
    .description('Lazy-loading container images with Seekable OCI (SOCI) indexes')
    .version(VERSION)
    .showHelpAfterError('(run with --help for usage)')
    .addHelpText(
      'after',
      '\nExit codes: 0 success, 1 user error (bad arguments or input; one line on stderr), 2 internal error.',
    );
  const first = argv[2];
  const named = COMMAND_GROUPS.find((g) => first !== undefined && g.names.includes(first));
  const groups = await Promise.all((named !== undefined ? [named] : COMMAND_GROUPS).map((g) => g.load()));
  for (const g of groups) for (const c of g.commands) program.addCommand(c, g.hidden === true ? { hidden: true } : {});
  return { program };
}

/**
 * Whether any command group calls this error the user's (a command may fail with another
 * group's errors: rpull with the fetcher's, explain with the config's). Only on the error path,
 * so every group's module is loaded here rather than at start-up.
 */
async function isCommandUserError(err: unknown): Promise<boolean> {
  const groups = await Promise.all(COMMAND_GROUPS.map((g) => g.load().catch(() => undefined)));
  return groups.some((g) => g?.isUserError?.(err) === true);
}

/** Is this error the user's to fix (bad input, missing file) rather than ours? */
async function isUserError(err: unknown): Promise<boolean> {
  if (err instanceof UsageError || err instanceof ZtocError) return true;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOENT' || code === 'EACCES' || code === 'EISDIR' || code === 'ENOTDIR' || code === 'EPERM') return true;
  return isCommandUserError(err);
}

export async function main(argv: string[]): Promise<number> {
  const { program } = await buildProgram(argv);
  program.exitOverride();
  program.configureOutput({ writeErr: (s) => process.stderr.write(s) });
  for (const cmd of program.commands) {
    cmd.exitOverride();
    for (const sub of cmd.commands) sub.exitOverride();
    // commander's own usage errors (missing argument, bad choice) end as exit code 1 too.
  }
  try {
    await program.parseAsync(argv);
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) {
      // --help and --version end here with exit code 0.
      return err.exitCode === 0 ? 0 : 1;
    }
    if (err instanceof ExitCodeError) {
      // A failure relayed from another soci-ts process (the mount's serving child), which decided the code.
      process.stderr.write(`soci-ts: ${err.message}\n`);
      return err.exitCode;
    }
    if (await isUserError(err)) {
      process.stderr.write(`soci-ts: ${(err as Error).message}\n`);
      return 1;
    }
    process.stderr.write(`soci-ts: internal error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    return 2;
  }
}

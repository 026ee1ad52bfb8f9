/**
 * The `soci-ts` command line. Exit codes: 0 ok, 1 user error (bad input or
 * usage; one line on stderr), 2 internal error.
 */
import { Command, CommanderError } from 'commander';
import { ExitCodeError, UsageError } from './cli-util.js';

export { SOCI_TS_VERSION as VERSION } from './version.js';
import { SOCI_TS_VERSION as VERSION } from './version.js';
export { UsageError, parseSize } from './cli-util.js';

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
  {
    names: ['ztoc'],
    load: async () => {
      const m = await import('./cli-ztoc.js');
      return { commands: [m.ztocCommand()], isUserError: m.isZtocUserError };
    },
  },
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
  {
    names: ['version'],
    load: async () => {
      const m = await import('./cli-ztoc.js');
      return { commands: [m.versionCommand()] };
    },
  },
];

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
  if (err instanceof UsageError) return true;
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

/** `soci-ts bench coldstart`: the cold-start benchmark (the logic is in bench/coldstart/). */
import { Command, InvalidArgumentError, Option } from 'commander';
import { parseCount } from './cli-util.js';
import { ExitCodeError } from './cli-util.js';
import { BenchError } from '../bench/coldstart/proc.js';
import type { ModeName, NetworkName } from '../bench/coldstart/types.js';

const DURATION_UNITS: Record<string, number> = { us: 1e-3, µs: 1e-3, ms: 1, s: 1000, m: 60_000, min: 60_000, h: 3_600_000 };

/** `20ms`, `0.5s`, `20m`, `1h` (a bare number is milliseconds) → ms. */
export function parseDuration(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zµ]*)\s*$/i.exec(text);
  const unit = m === null ? undefined : DURATION_UNITS[(m[2] ?? '').toLowerCase() || 'ms'];
  if (m === null || unit === undefined) throw new InvalidArgumentError(`"${text}" is not a duration (e.g. 20ms, 1.5s, 20m)`);
  const ms = Number(m[1]) * unit;
  if (!Number.isFinite(ms) || ms < 0) throw new InvalidArgumentError(`"${text}" is not a duration`);
  return ms;
}

/** tc's units: `bit kbit mbit gbit` are bits/s, `bps kbps mbps gbps` bytes/s (a bare number is bit/s) → bit/s. */
export function parseBandwidth(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$/i.exec(text);
  const units: Record<string, number> = { '': 1, bit: 1, kbit: 1e3, mbit: 1e6, gbit: 1e9, bps: 8, kbps: 8e3, mbps: 8e6, gbps: 8e9 };
  const unit = m === null ? undefined : units[(m[2] ?? '').toLowerCase()];
  if (m === null || unit === undefined) throw new InvalidArgumentError(`"${text}" is not a rate (e.g. 100mbit, 1gbit; tc's bps units are bytes/s)`);
  const bps = Number(m[1]) * unit;
  if (!(bps > 0) || !Number.isFinite(bps)) throw new InvalidArgumentError(`"${text}" is not a positive rate`);
  return bps;
}

interface Flags {
  workloads?: string;
  only?: string;
  runs: number;
  network: 'loopback' | 'wan' | 'both';
  mode: 'overlayfs' | 'soci-ts' | 'both';
  out?: string;
  ideal?: boolean;
  keepLogs?: boolean;
  logLevel?: 'debug' | 'info' | 'warn' | 'error';
  coldDaemon?: boolean;
  rtt: number;
  bandwidth: number;
  timeout: number;
  imageCache?: string;
}

function coldstartCommand(): Command {
  return new Command('coldstart')
    .description('time container cold starts from a loopback registry (and a simulated WAN): overlayfs full pull vs soci-ts lazy pull')
    .option('--workloads <file>', 'workloads JSON: [{ "name", "image", "command", "readyLine" }] (default: the built-in set, built from real files)')
    .option('--only <names>', 'run only these workloads (comma-separated names)')
    .addOption(new Option('--runs <n>', 'runs per workload, network and mode').argParser((v) => parseCount(v)).default(5))
    .addOption(new Option('--network <which>', 'loopback, a simulated WAN, or both').choices(['loopback', 'wan', 'both']).default('both'))
    .addOption(new Option('--mode <which>', 'overlayfs (ctr pull + run), soci-ts (rpull + run), or both').choices(['overlayfs', 'soci-ts', 'both']).default('both'))
    .option('--out <dir>', 'where results.json, report.md and chart.svg go (default: bench/results/coldstart in the checkout)')
    .option('--ideal', 'also show the ideal: the bytes the lazy run fetched, at the bandwidth')
    .option('--keep-logs', "keep the snapshotter's and the FUSE manager's logs of every soci-ts run (OUT/logs/)")
    .addOption(new Option('--log-level <level>', "the soci-ts snapshotter's and FUSE manager's log level (what --keep-logs keeps)").choices(['debug', 'info', 'warn', 'error']).default('info'))
    .option('--cold-daemon', 'restart the soci-ts snapshotter (and its FUSE manager) on a fresh root before every lazy run, as right after a boot (default: it keeps running, checked to hold nothing, like containerd)')
    .addOption(new Option('--rtt <duration>', 'round-trip time of the simulated WAN').argParser(parseDuration).default(20, '20ms'))
    .addOption(new Option('--bandwidth <rate>', 'bandwidth of the simulated WAN, each way (tc units: 100mbit, 1gbit)').argParser(parseBandwidth).default(100e6, '100mbit'))
    .addOption(new Option('--timeout <duration>', 'limit for each step (pull, create, run to ready)').argParser(parseDuration).default(20 * 60_000, '20m'))
    .option('--image-cache <dir>', 'where the built-in images are built and kept (default $SOCI_TS_BENCH_DIR or /var/tmp/soci-ts-bench)')
    .addHelpText(
      'after',
      `
Needs root, containerd, runc, docker-registry, skopeo and umoci (scripts/setup installs them).
Every run starts from nothing (image, content, snapshots, span caches removed; page cache
dropped); the time is from the start of the pull to the ready line on the container's stdout.
The bench starts its own registry, proxies, containerd and snapshotter and removes them (and
its temp dir) when done, failed or interrupted (Ctrl-C).

A full run (both networks, 3 workloads, 2 modes, 5 runs) takes a while; the quick check is
  soci-ts bench coldstart --runs 1 --network loopback`,
    )
    .action(async (flags: Flags) => {
      const bench = await import('../bench/coldstart/index.js');
      const { FixtureError } = await import('../test/helpers/layers.js');
      const networks: NetworkName[] = flags.network === 'both' ? ['loopback', 'wan'] : [flags.network];
      const modes: ModeName[] = flags.mode === 'both' ? ['overlayfs', 'soci-ts'] : [flags.mode];
      const ac = new AbortController();
      let interrupted: string | undefined;
      const onSignal = (sig: NodeJS.Signals): void => {
        if (interrupted !== undefined) {
          process.stderr.write(`coldstart: ${sig} again: exiting now (the exit hooks remove what is left)\n`);
          process.exit(130);
        }
        interrupted = sig;
        process.stderr.write(`\ncoldstart: ${sig}: stopping and removing everything the bench started (${sig} again to force)\n`);
        ac.abort(new bench.InterruptedError(sig));
      };
      const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
      for (const s of signals) process.on(s, onSignal);
      try {
        const r = await bench.runColdstart({
          ...(flags.workloads !== undefined ? { workloadsFile: flags.workloads } : {}),
          ...(flags.only !== undefined ? { only: flags.only.split(',').map((s) => s.trim()).filter((s) => s !== '') } : {}),
          runs: flags.runs,
          networks,
          modes,
          outDir: flags.out ?? bench.DEFAULT_OUT_DIR,
          ideal: flags.ideal === true,
          keepLogs: flags.keepLogs === true,
          ...(flags.logLevel !== undefined ? { logLevel: flags.logLevel } : {}),
          coldDaemon: flags.coldDaemon === true,
          rttMs: flags.rtt,
          bandwidthBps: flags.bandwidth,
          stepTimeoutMs: flags.timeout,
          imageCacheDir: flags.imageCache ?? bench.DEFAULT_IMAGE_CACHE,
          signal: ac.signal,
        });
        process.stdout.write(`\n${r.table}\nwrote ${r.files.json}, ${r.files.markdown}, ${r.files.svg}\n`);
      } catch (e) {
        if (interrupted !== undefined) throw new ExitCodeError(`bench coldstart interrupted by ${interrupted}; what it started was stopped and removed`, 130);
        if (e instanceof FixtureError) throw new BenchError(e.message, { cause: e });
        throw e;
      } finally {
        for (const s of signals) process.off(s, onSignal);
      }
    });
}

export function benchCommand(): Command {
  return new Command('bench').description('benchmarks of the whole system').addCommand(coldstartCommand());
}

/** Errors of the bench command that are the user's (or the machine's) to fix: exit code 1. */
export function isBenchUserError(err: unknown): boolean {
  return err instanceof BenchError;
}

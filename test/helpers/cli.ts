/** Runs `bin/soci-ts` as a child process (the CLI as a user runs it) and collects its output. */
import { spawn } from 'node:child_process';

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface RunCliOptions {
  env?: NodeJS.ProcessEnv;
  /** The soci-ts to run (default `bin/soci-ts`, relative to the checkout the tests run in). */
  bin?: string;
  /** A command that runs it, e.g. `['setpriv', '--reuid=1000', …]`: runs `wrapper… bin args…`. */
  wrapper?: readonly string[];
}

export function runCli(args: readonly string[], opts: RunCliOptions = {}): Promise<CliResult> {
  const bin = opts.bin ?? 'bin/soci-ts';
  const [cmd, ...argv] = opts.wrapper !== undefined && opts.wrapper.length > 0 ? [...opts.wrapper, bin, ...args] : [bin, ...args];
  return new Promise((resolve, reject) => {
    const child = spawn(cmd!, argv, { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') }));
  });
}

/**
 * A helper process for benchmarks that time child processes next to in-process work: it runs the
 * commands it is sent, so that the measuring process itself never forks between its timed runs.
 *
 * Why: spawning a child (libuv forks) marks every page of the parent's heap copy-on-write; the
 * parent's next writes to that memory then each take a page fault. Measured on the loopback
 * registry: a 60 MB blob download right after spawning `true` took 8,000-10,000 more minor faults
 * and about twice the time of one with no spawn before it. A benchmark that interleaves
 * `curl` runs with in-process downloads would charge that to the in-process side.
 *
 * Protocol: JSON lines on stdin `{ "id", "cmd", "args" }`; answers on stdout
 * `{ "id", "ms", "cpuMs", "code", "stderr" }`: wall time from spawn to exit, the CPU time the
 * command's processes used (this process's reaped-children time, 10 ms resolution), the exit
 * code, and the tail of its stderr. Ends when stdin closes.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

export interface RunRequest {
  id: number;
  cmd: string;
  args: string[];
}

export interface RunAnswer {
  id: number;
  ms: number;
  cpuMs: number;
  code: number | null;
  stderr: string;
}

const CLK_TCK = 100; // USER_HZ: the unit of /proc/<pid>/stat times on Linux

/** CPU time of this process's children that have exited and been reaped (cutime + cstime). */
function childrenCpuMs(): number {
  const stat = readFileSync('/proc/self/stat', 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // fields[0] is field 3 (state)
  return ((Number(fields[13]) + Number(fields[14])) * 1000) / CLK_TCK;
}

function run(req: RunRequest): Promise<RunAnswer> {
  return new Promise((resolve) => {
    const c0 = childrenCpuMs();
    const t0 = performance.now();
    const child = spawn(req.cmd, req.args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
    const done = (code: number | null, extra = ''): void => resolve({ id: req.id, ms: performance.now() - t0, cpuMs: childrenCpuMs() - c0, code, stderr: stderr + extra });
    child.on('error', (err) => done(null, err.message));
    child.on('close', (code) => done(code));
  });
}

async function main(): Promise<void> {
  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line.trim() === '') continue;
    const answer = await run(JSON.parse(line) as RunRequest);
    process.stdout.write(`${JSON.stringify(answer)}\n`);
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`exec-runner: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(2);
});

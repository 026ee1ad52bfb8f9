/**
 * The measuring side of exec-runner.js: a benchmark's child processes run from that helper, so
 * that the benchmark process does not fork between its own timed runs (see there: a fork makes
 * the heap copy-on-write, and the next in-process work pays thousands of page faults for it).
 */
import { spawn, type ChildProcessByStdio } from 'node:child_process';
import { createInterface } from 'node:readline';
import type { Readable, Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import type { RunAnswer } from './exec-runner.js';

export class ExecRunner {
  private readonly child: ChildProcessByStdio<Writable, Readable, null>;
  private readonly waiting = new Map<number, (a: RunAnswer) => void>();
  private nextId = 0;
  private failed: Error | undefined;

  constructor() {
    this.child = spawn(process.execPath, [fileURLToPath(new URL('./exec-runner.js', import.meta.url))], { stdio: ['pipe', 'pipe', 'inherit'] });
    const lines = createInterface({ input: this.child.stdout });
    lines.on('line', (line) => {
      const a = JSON.parse(line) as RunAnswer;
      this.waiting.get(a.id)?.(a);
      this.waiting.delete(a.id);
    });
    this.child.on('exit', (code) => {
      this.failed = new Error(`exec-runner exited (code ${code})`);
      for (const w of this.waiting.values()) w({ id: -1, ms: NaN, cpuMs: NaN, code: null, stderr: this.failed.message });
      this.waiting.clear();
    });
  }

  /** Runs `cmd args` in the runner: its wall time, CPU time and stderr's tail; throws unless it exits 0. */
  async run(cmd: string, args: readonly string[]): Promise<RunAnswer> {
    if (this.failed !== undefined) throw this.failed;
    const id = this.nextId++;
    const answer = await new Promise<RunAnswer>((resolve) => {
      this.waiting.set(id, resolve);
      this.child.stdin.write(`${JSON.stringify({ id, cmd, args })}\n`);
    });
    if (answer.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${answer.code}: ${answer.stderr}`);
    return answer;
  }

  close(): void {
    this.child.stdin.end();
  }
}

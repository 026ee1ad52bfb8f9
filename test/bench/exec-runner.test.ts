/**
 * bench/exec-runner.js, the helper process bench:fetch runs its child processes from: it answers
 * each request with the command's exit code, its stderr, its wall time and the CPU time it used
 * (checked against a command that burns a known amount of CPU, measured by the shell's own
 * `times`), answers requests in order, and exits when its stdin closes.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import type { RunAnswer } from '../../bench/exec-runner.js';

const RUNNER = fileURLToPath(new URL('../../bench/exec-runner.js', import.meta.url));

function startRunner(): { ask: (cmd: string, args: string[]) => Promise<RunAnswer>; end: () => Promise<number | null> } {
  const child = spawn(process.execPath, [RUNNER], { stdio: ['pipe', 'pipe', 'inherit'] });
  const answers: RunAnswer[] = [];
  let wake: (() => void) | undefined;
  createInterface({ input: child.stdout }).on('line', (l) => {
    answers.push(JSON.parse(l) as RunAnswer);
    wake?.();
  });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  let id = 0;
  return {
    ask: async (cmd, args) => {
      const mine = id++;
      child.stdin.write(`${JSON.stringify({ id: mine, cmd, args })}\n`);
      for (;;) {
        const a = answers.find((x) => x.id === mine);
        if (a !== undefined) return a;
        await new Promise<void>((r) => (wake = r));
      }
    },
    end: () => {
      child.stdin.end();
      return exited;
    },
  };
}

t.test('exit codes, stderr and wall time of each command', async (t) => {
  const r = startRunner();
  const ok = await r.ask('true', []);
  t.equal(ok.code, 0, 'true exits 0');
  t.ok(ok.ms > 0 && ok.ms < 10_000, `wall time is measured (${ok.ms.toFixed(1)} ms)`);
  const bad = await r.ask('sh', ['-c', 'echo broken >&2; exit 3']);
  t.equal(bad.code, 3, 'the exit code is passed on');
  t.match(bad.stderr, /broken/, 'and the tail of stderr');
  const slow = await r.ask('sleep', ['0.3']);
  t.ok(slow.ms >= 290, `sleep 0.3 takes at least 290 ms of wall time (${slow.ms.toFixed(0)})`);
  t.ok(slow.cpuMs < 100, `but little CPU (${slow.cpuMs} ms)`);
  const missing = await r.ask('/nonexistent/command', []);
  t.equal(missing.code, null, 'a command that cannot start has no exit code');
  t.match(missing.stderr, /ENOENT/, 'and says why');
  t.equal(await r.end(), 0, 'the runner exits 0 when its stdin closes');
});

t.test("CPU time of the command's processes, against the shell's own account", async (t) => {
  const r = startRunner();
  // The shell burns CPU in a loop, then prints its own user+system time (`times`, first line).
  const burn = 'i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done; times >&2';
  const a = await r.ask('sh', ['-c', burn]);
  t.equal(a.code, 0);
  const m = /^(\d+)m([\d.]+)s (\d+)m([\d.]+)s/.exec(a.stderr);
  t.ok(m, `times printed a line (${JSON.stringify(a.stderr)})`);
  const own = (Number(m![1]) * 60 + Number(m![2]) + Number(m![3]) * 60 + Number(m![4])) * 1000;
  t.ok(own >= 100, `the loop used a measurable amount of CPU (${own} ms)`);
  t.ok(Math.abs(a.cpuMs - own) <= 30 + 0.1 * own, `the runner's figure (${a.cpuMs} ms) matches the shell's (${own} ms)`);
  t.ok(a.cpuMs <= a.ms + 20, 'and is not more than the wall time of a one-process command');
  t.equal(await r.end(), 0);
});

/**
 * The child process of flatbuf.test.ts's extraction fuzz (not a test file itself): decodes
 * each mutated zTOC it is sent and, when it decodes, extracts files and ranges through it from
 * the real layer blob (argv[2]). It reports before and after every attempt, so the parent can
 * bound each attempt's time and, when this process dies (a signal, an abort in the native
 * addon, running out of memory), name the attempt that killed it.
 */
import { seededRandom } from '../helpers/random.js';
import {
  availableEngines,
  decodeZtoc,
  extractFile,
  extractRange,
  FileBlobReader,
  LayerIndex,
  LayerReader,
  ZtocError,
} from '../../ztoc/index.js';

export interface FuzzJob {
  i: number;
  bytes: Uint8Array;
  /** Seeds the choice of files and ranges. */
  seed: number;
}

/** What one attempt gave: bytes, one of the project's typed errors, or anything else. */
export type FuzzOutcome =
  | { kind: 'bytes'; length: number }
  | { kind: 'typed'; name: string; message: string }
  | { kind: 'untyped'; text: string };

export type FuzzMessage =
  | { type: 'ready' }
  | { type: 'begin'; i: number; what: string }
  | { type: 'end'; i: number; what: string; outcome: FuzzOutcome }
  | { type: 'done'; i: number; decoded: boolean };

function outcomeOf(err: unknown): FuzzOutcome {
  if (err instanceof ZtocError) return { kind: 'typed', name: err.name, message: err.message.slice(0, 300) };
  return { kind: 'untyped', text: err instanceof Error ? (err.stack ?? err.message) : String(err) };
}

async function main(): Promise<void> {
  const send = process.send?.bind(process);
  const layerPath = process.argv[2];
  if (send === undefined || layerPath === undefined) {
    process.stderr.write('fuzz-extract-child: run by test/ztoc/flatbuf.test.ts, with an IPC channel and a layer path\n');
    process.exitCode = 1;
    return;
  }
  const post = (m: FuzzMessage): Promise<void> => new Promise((resolve, reject) => send(m, undefined, {}, (e) => (e ? reject(e) : resolve())));
  const blob = await FileBlobReader.open(layerPath);
  const engines = availableEngines();
  let queue = Promise.resolve();
  process.on('message', (job: FuzzJob) => {
    queue = queue.then(() => runJob(job)).catch((e: unknown) => {
      process.stderr.write(`fuzz-extract-child: ${String(e)}\n`);
      process.exit(3);
    });
  });
  process.on('disconnect', () => void blob.close());

  async function attempt(i: number, what: string, fn: () => Promise<Uint8Array>): Promise<void> {
    await post({ type: 'begin', i, what });
    let outcome: FuzzOutcome;
    try {
      const bytes = await fn();
      outcome = bytes instanceof Uint8Array ? { kind: 'bytes', length: bytes.length } : { kind: 'untyped', text: `returned ${typeof bytes}` };
    } catch (err) {
      outcome = outcomeOf(err);
    }
    await post({ type: 'end', i, what, outcome });
  }

  async function runJob(job: FuzzJob): Promise<void> {
    const rand = seededRandom(job.seed);
    let index: LayerIndex;
    try {
      index = new LayerIndex(decodeZtoc(job.bytes, 'fuzzed'), 'fuzzed');
    } catch {
      // The parent checks decoding on its own; only accepted mutants are extracted from.
      await post({ type: 'done', i: job.i, decoded: false });
      return;
    }
    const engine = engines[job.i % engines.length];
    const regs = index.ztoc.files.filter((f) => f.type === 'reg');
    for (let k = 0; k < 3 && regs.length > 0; k++) {
      const f = regs[rand(regs.length)];
      await attempt(job.i, `extractFile ${JSON.stringify(f.name)} [${f.uncompressedOffset}, +${f.uncompressedSize}] (${engine.name})`, () =>
        extractFile(index, blob, f, engine),
      );
    }
    const size = index.ztoc.uncompressedArchiveSize;
    for (let k = 0; k < 2; k++) {
      const offset = rand(size + 1);
      const length = Math.min(rand(256 << 10) + 1, size - offset);
      await attempt(job.i, `extractRange [${offset}, +${length}] (${engine.name})`, () => extractRange(index, blob, offset, length, engine));
    }
    // The span-cached reader the file system uses.
    if (regs.length > 0) {
      const f = regs[rand(regs.length)];
      await attempt(job.i, `LayerReader.readFile ${JSON.stringify(f.name)} (${engine.name})`, () => new LayerReader(index, blob, { engine }).readFile(f));
    }
    await post({ type: 'done', i: job.i, decoded: true });
  }

  await post({ type: 'ready' });
}

void main();

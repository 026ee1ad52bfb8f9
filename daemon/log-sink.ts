/**
 * Log lines to an inherited file descriptor (the serving process's stderr) without ever
 * blocking the event loop: for a process that serves FUSE, a log line written with write(2)
 * from a FUSE request path waits for whatever is behind the descriptor (a slow disk, a full
 * pipe nobody reads), and the reader that triggered the line waits with it. Node's
 * process.stderr writes files and pipes synchronously on Linux, so it is not used.
 *
 * - A pipe, FIFO or socket is written through a non-blocking libuv stream (net.Socket): a full
 *   pipe only queues. No thread is held, so the process can always exit.
 * - Anything else (a regular file, as `soci-ts mount` in the background has: `<id>.log`; a
 *   terminal; /dev/null) is written by one asynchronous writer (fs.write in libuv's thread pool),
 *   in order, in batches.
 *
 * Queued bytes are bounded (`maxPendingBytes`, default 4 MiB): past it, new lines are dropped
 * and counted, and the next line written says how many. `flush(ms)` waits (at most `ms`) for the
 * queue to empty: the serving process calls it after unmounting. At process exit, lines still
 * queued for a file are written synchronously (nothing is served any more); a pipe's are lost
 * only when its reader did not read them before the flush timed out.
 */
import { fstat, write, writeSync, type Stats } from 'node:fs';
import net from 'node:net';
import type { LineSink } from '../fetcher/index.js';

export const DEFAULT_SINK_MAX_PENDING = 4 << 20;

export interface AsyncFdSinkOptions {
  /** Bytes queued before new lines are dropped (default 4 MiB). */
  maxPendingBytes?: number;
}

function fstatAsync(fd: number): Promise<Stats> {
  return new Promise((resolve, reject) => fstat(fd, (err, st) => (err ? reject(err) : resolve(st))));
}

function writeAsync(fd: number, buf: Buffer, off: number): Promise<number> {
  return new Promise((resolve, reject) => write(fd, buf, off, buf.length - off, null, (err, n) => (err ? reject(err) : resolve(n))));
}

export class AsyncFdSink implements LineSink {
  /** `stream`: a non-blocking libuv stream (pipes, sockets); `file`: thread-pool writes. */
  readonly kind: 'stream' | 'file';
  readonly fd: number;
  private readonly maxPending: number;
  private socket: net.Socket | undefined;
  private queue: Buffer[] = [];
  private queued = 0;
  private writing: Promise<void> | undefined;
  private dropped = 0;
  private broken = false;
  private closed = false;
  private readonly onExit = (): void => this.flushSync();

  private constructor(fd: number, kind: 'stream' | 'file', opts: AsyncFdSinkOptions) {
    this.fd = fd;
    this.kind = kind;
    this.maxPending = opts.maxPendingBytes ?? DEFAULT_SINK_MAX_PENDING;
    if (kind === 'stream') {
      const s = new net.Socket({ fd, readable: false, writable: true });
      s.on('error', () => {
        // The reader went away (EPIPE): nowhere to log any more.
        this.broken = true;
      });
      s.unref();
      this.socket = s;
    } else {
      process.on('exit', this.onExit);
    }
  }

  /** A sink for `fd` (default 2, stderr), of the kind its file type needs. */
  static async open(fd = 2, opts: AsyncFdSinkOptions = {}): Promise<AsyncFdSink> {
    const st = await fstatAsync(fd);
    return new AsyncFdSink(fd, st.isFIFO() || st.isSocket() ? 'stream' : 'file', opts);
  }

  /** Bytes accepted but not written yet. */
  get pendingBytes(): number {
    return this.kind === 'stream' ? (this.socket?.writableLength ?? 0) : this.queued;
  }

  /** Queues one line; never blocks, never throws. False when it was dropped. */
  write(line: string): boolean {
    if (this.closed || this.broken) return false;
    const b = Buffer.from(line.endsWith('\n') ? line : `${line}\n`, 'utf8');
    if (this.pendingBytes + b.length > this.maxPending) {
      this.dropped++;
      return false;
    }
    const out = this.dropped > 0 ? Buffer.concat([this.droppedNote(), b]) : b;
    this.dropped = 0;
    if (this.socket !== undefined) {
      this.socket.write(out);
      return true;
    }
    this.queue.push(out);
    this.queued += out.length;
    this.kick();
    return true;
  }

  /** Starts the writer unless it runs; it starts again for lines queued as it finished. */
  private kick(): void {
    if (this.writing !== undefined) return;
    this.writing = this.drain().finally(() => {
      this.writing = undefined;
      if (this.queue.length > 0) this.kick();
    });
  }

  private droppedNote(): Buffer {
    const note = { time: new Date().toISOString(), level: 'warn', msg: 'log lines dropped (the log could not take them fast enough)', dropped: this.dropped };
    return Buffer.from(`${JSON.stringify(note)}\n`, 'utf8');
  }

  private async drain(): Promise<void> {
    while (this.queue.length > 0) {
      const batch = this.queue.splice(0, 1024);
      const data = batch.length === 1 ? batch[0]! : Buffer.concat(batch);
      let off = 0;
      try {
        while (off < data.length) {
          try {
            off += await writeAsync(this.fd, data, off);
          } catch (err) {
            // A descriptor someone made non-blocking: wait a little and go on.
            if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
            await new Promise((r) => setTimeout(r, 20).unref());
          }
        }
      } catch {
        this.dropped += batch.length;
      } finally {
        this.queued -= data.length;
      }
    }
  }

  /** Resolves true once everything queued so far is written, false when `timeoutMs` passed first. */
  async flush(timeoutMs = 5000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (this.pendingBytes > 0 && !this.broken) {
      const left = deadline - Date.now();
      if (left <= 0) return false;
      if (this.socket !== undefined) {
        const s = this.socket;
        await new Promise<void>((resolve) => {
          const done = (): void => {
            clearTimeout(timer);
            s.off('drain', done);
            resolve();
          };
          const timer = setTimeout(done, left);
          s.once('drain', done);
        });
      } else {
        await Promise.race([this.writing, new Promise((r) => setTimeout(r, left).unref())]);
      }
    }
    return this.pendingBytes === 0;
  }

  /** Flushes (at most `timeoutMs`); later lines are ignored. The descriptor stays open. */
  async close(timeoutMs = 5000): Promise<boolean> {
    const ok = await this.flush(timeoutMs);
    this.closed = true;
    return ok;
  }

  /** At exit, a file's queue is written synchronously (the process serves nothing any more). */
  private flushSync(): void {
    // (A batch the asynchronous writer has in hand still lands after these: a file's writes do not stall.)
    for (const b of this.queue.splice(0)) {
      try {
        writeSync(this.fd, b);
      } catch {
        return;
      }
    }
  }
}

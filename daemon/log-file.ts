/**
 * A size-bounded log file for a long-lived process (the FUSE manager): JSON lines appended to
 * `path`, rotated to `path.1`, `path.2`, … `path.<keep>` (the oldest deleted) before a line
 * would take the current file past `maxBytes`. So the files together stay within
 * `(keep + 1) × maxBytes`, and every file holds whole lines only.
 *
 * Nothing here blocks the event loop: `write` only queues the line; one asynchronous writer
 * (fs/promises) appends the queue in batches, renames and reopens. Lines are written in the
 * order they were queued and none is lost to a rotation (the line that does not fit opens the
 * next file). What can be lost is said in the log itself:
 * - a queue above `maxPendingBytes` (a stalled disk) drops new lines, counted;
 * - a write that fails (ENOSPC, EIO) drops its batch, counted;
 * - a line longer than `maxBytes` is replaced by a short line saying so;
 * and the next successful write starts with a `warn` line giving the counts and the last error.
 * At process exit, lines still queued are written synchronously (the process is ending; nothing
 * is served any more).
 */
import { closeSync, existsSync, openSync, renameSync, rmSync, unlinkSync, writeSync } from 'node:fs';
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import type { LineSink } from '../fetcher/index.js';

export const DEFAULT_LOG_MAX_BYTES = 10 << 20;
export const DEFAULT_LOG_FILES = 3;

export interface RotatingLogOptions {
  path: string;
  /** Rotate before the file would grow past this (bytes; default 10 MiB). */
  maxBytes?: number;
  /** Rotated files kept besides the current one (default 3; 0 = the file is started afresh). */
  keep?: number;
  /** Queue bound while the disk is slow (default 4 MiB or maxBytes, whichever is larger). */
  maxPendingBytes?: number;
}

export class LogFileError extends Error {
  constructor(
    readonly path: string,
    reason: string,
    options?: { cause?: unknown },
  ) {
    super(`log file ${path}: ${reason}`, options);
    this.name = 'LogFileError';
  }
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

export class RotatingLogFile implements LineSink {
  readonly path: string;
  readonly maxBytes: number;
  readonly keep: number;
  private readonly maxPending: number;
  private fh: FileHandle | undefined;
  /** Bytes in the current file (as written by this process). */
  private size: number;
  private queue: Buffer[] = [];
  private pendingBytes = 0;
  private draining: Promise<void> | undefined;
  private closed = false;
  private dropped = 0;
  private lastError: string | undefined;
  private readonly onExit = (): void => this.flushSync();
  /** Rotations done (for tests and the log). */
  rotations = 0;

  private constructor(path: string, fh: FileHandle, size: number, opts: RotatingLogOptions) {
    this.path = path;
    this.fh = fh;
    this.size = size;
    this.maxBytes = opts.maxBytes ?? DEFAULT_LOG_MAX_BYTES;
    this.keep = opts.keep ?? DEFAULT_LOG_FILES;
    this.maxPending = opts.maxPendingBytes ?? Math.max(4 << 20, this.maxBytes);
    process.on('exit', this.onExit);
  }

  /** Opens (creating, mode 0600) the log file for appending. */
  static async open(opts: RotatingLogOptions): Promise<RotatingLogFile> {
    const maxBytes = opts.maxBytes ?? DEFAULT_LOG_MAX_BYTES;
    const keep = opts.keep ?? DEFAULT_LOG_FILES;
    if (!Number.isSafeInteger(maxBytes) || maxBytes < 1024) throw new LogFileError(opts.path, `the size limit must be at least 1024 bytes (got ${maxBytes})`);
    if (!Number.isSafeInteger(keep) || keep < 0 || keep > 100) throw new LogFileError(opts.path, `the number of rotated files must be 0 to 100 (got ${keep})`);
    let fh: FileHandle;
    try {
      fh = await open(opts.path, 'a', 0o600);
    } catch (err) {
      throw new LogFileError(opts.path, `cannot open: ${message(err)}`, { cause: err });
    }
    const size = (await fh.stat()).size;
    return new RotatingLogFile(opts.path, fh, size, { ...opts, maxBytes, keep });
  }

  /** Queues one line (with its newline); never blocks, never throws. */
  write(line: string): boolean {
    if (this.closed) return false;
    let b: Buffer = Buffer.from(line.endsWith('\n') ? line : `${line}\n`, 'utf8');
    if (b.length > this.maxBytes) b = this.oversized(b);
    if (this.pendingBytes + b.length > this.maxPending) {
      this.dropped++;
      return false;
    }
    this.queue.push(b);
    this.pendingBytes += b.length;
    this.kick();
    return true;
  }

  /** Starts the writer unless it runs; it starts again if lines arrived while it finished. */
  private kick(): void {
    if (this.draining !== undefined) return;
    this.draining = this.drain()
      .catch((err: unknown) => {
        this.lastError = message(err);
      })
      .finally(() => {
        this.draining = undefined;
        if (this.queue.length > 0) this.kick();
      });
  }

  /** Resolves once every line queued so far is written (or dropped). */
  async flush(): Promise<void> {
    while (this.draining !== undefined) await this.draining;
  }

  /** Flushes and closes the file; later writes are ignored. */
  async close(): Promise<void> {
    await this.flush();
    this.closed = true;
    process.off('exit', this.onExit);
    const fh = this.fh;
    this.fh = undefined;
    await fh?.close().catch(() => undefined);
  }

  /** A short line standing for one too long for any file. */
  private oversized(b: Buffer): Buffer {
    let head = '';
    try {
      const o = JSON.parse(b.toString('utf8')) as { msg?: unknown; time?: unknown; level?: unknown };
      head = typeof o.msg === 'string' ? o.msg.slice(0, 200) : '';
    } catch {
      head = b.subarray(0, 200).toString('utf8');
    }
    const note = { time: new Date().toISOString(), level: 'warn', msg: 'log line dropped: longer than the log file size limit', bytes: b.length, limit: this.maxBytes, head };
    return Buffer.from(`${JSON.stringify(note)}\n`, 'utf8');
  }

  /** The line reporting what was dropped since the last successful write. */
  private droppedNote(): Buffer {
    const note = { time: new Date().toISOString(), level: 'warn', msg: 'log lines dropped (the log file could not take them)', dropped: this.dropped, lastError: this.lastError };
    return Buffer.from(`${JSON.stringify(note)}\n`, 'utf8');
  }

  private async drain(): Promise<void> {
    while (this.queue.length > 0) {
      if (this.dropped > 0) {
        const note = this.droppedNote();
        this.dropped = 0;
        this.queue.unshift(note);
        this.pendingBytes += note.length;
      }
      // The next line opens a new file when it does not fit in this one (every line fits an empty file).
      if (this.size > 0 && this.size + this.queue[0]!.length > this.maxBytes) await this.rotate();
      const batch: Buffer[] = [];
      let bytes = 0;
      do {
        const b = this.queue.shift()!;
        this.pendingBytes -= b.length;
        batch.push(b);
        bytes += b.length;
      } while (this.queue.length > 0 && batch.length < 1024 && this.size + bytes + this.queue[0]!.length <= this.maxBytes);
      let off = 0;
      try {
        this.fh ??= await open(this.path, 'a', 0o600);
        const data = batch.length === 1 ? batch[0]! : Buffer.concat(batch, bytes);
        while (off < data.length) {
          const { bytesWritten } = await this.fh.write(data, off, data.length - off);
          off += bytesWritten;
        }
        this.size += data.length;
        this.lastError = undefined;
      } catch (err) {
        this.dropped += batch.length;
        this.lastError = message(err);
        const fh = this.fh;
        this.fh = undefined;
        // A write cut short (the disk filled up in the middle of the batch) is undone, so the file
        // holds whole lines only; then the file is reopened (and recounted) at the next write.
        if (off > 0) await fh?.truncate(this.size).catch(() => undefined);
        await fh?.close().catch(() => undefined);
        this.size = await this.currentSize();
      }
    }
  }

  private async currentSize(): Promise<number> {
    try {
      const fh = await open(this.path, 'a', 0o600);
      try {
        return (await fh.stat()).size;
      } finally {
        await fh.close();
      }
    } catch {
      return 0;
    }
  }

  /** path → path.1 → … → path.<keep> (deleted past that); a new empty path. */
  private async rotate(): Promise<void> {
    const fh = this.fh;
    this.fh = undefined;
    await fh?.close().catch(() => undefined);
    try {
      if (this.keep === 0) await unlink(this.path).catch(ignoreMissing);
      else {
        await unlink(`${this.path}.${this.keep}`).catch(ignoreMissing);
        for (let i = this.keep - 1; i >= 1; i--) await rename(`${this.path}.${i}`, `${this.path}.${i + 1}`).catch(ignoreMissing);
        await rename(this.path, `${this.path}.1`).catch(ignoreMissing);
      }
      this.rotations++;
    } catch (err) {
      // Keep appending to what is there; the size check rotates again at the next batch.
      this.lastError = `rotation failed: ${message(err)}`;
    }
    this.size = await this.currentSize();
    if (this.size > 0) {
      // The renames failed and the file is still there: start it afresh rather than grow past the limit.
      await unlink(this.path).catch(() => undefined);
      this.size = await this.currentSize();
    }
  }

  /** At exit: appends what is still queued, synchronously (the process serves nothing any more), rotating as drain does. */
  private flushSync(): void {
    const fh = this.fh;
    this.fh = undefined;
    if (fh !== undefined) {
      try {
        closeSync(fh.fd);
      } catch {
        // already closed
      }
    }
    for (const b of this.queue.splice(0)) {
      try {
        if (this.size > 0 && this.size + b.length > this.maxBytes) {
          if (this.keep === 0) unlinkSync(this.path);
          else {
            rmSync(`${this.path}.${this.keep}`, { force: true });
            for (let i = this.keep - 1; i >= 1; i--) if (existsSync(`${this.path}.${i}`)) renameSync(`${this.path}.${i}`, `${this.path}.${i + 1}`);
            renameSync(this.path, `${this.path}.1`);
          }
          this.size = 0;
        }
        const fd = openSync(this.path, 'a', 0o600);
        try {
          writeSync(fd, b);
          this.size += b.length;
        } finally {
          closeSync(fd);
        }
      } catch {
        // nowhere left to say it
      }
    }
    this.pendingBytes = 0;
  }
}

function ignoreMissing(err: unknown): void {
  if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
}

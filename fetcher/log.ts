/**
 * Structured logging: JSON lines with a level, a message and fields. Every module takes a
 * {@link Logger}; the CLI and the daemon decide where lines go. Callers never pass secrets as
 * fields (no credentials, tokens, Authorization headers or signed URLs' queries).
 */

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  /** A logger that adds `fields` to every line. */
  child(fields: LogFields): Logger;
}

const LEVELS: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export function isLogLevel(s: string): s is LogLevel {
  return Object.prototype.hasOwnProperty.call(LEVELS, s);
}

/** Something that takes whole lines (a stream, an array in tests). */
export interface LineSink {
  write(line: string): unknown;
}

class JsonLinesLogger implements Logger {
  constructor(
    private readonly sink: LineSink,
    private readonly min: number,
    private readonly base: LogFields,
  ) {}

  private emit(level: LogLevel, msg: string, fields?: LogFields): void {
    if (LEVELS[level] < this.min) return;
    const line: LogFields = { time: new Date().toISOString(), level, msg, ...this.base };
    if (fields !== undefined) for (const [k, v] of Object.entries(fields)) line[k] = serialisable(v);
    let text: string;
    try {
      text = JSON.stringify(line);
    } catch {
      text = JSON.stringify({ time: line.time, level, msg, note: 'fields not serialisable' });
    }
    this.sink.write(`${text}\n`);
  }

  debug(msg: string, fields?: LogFields): void {
    this.emit('debug', msg, fields);
  }
  info(msg: string, fields?: LogFields): void {
    this.emit('info', msg, fields);
  }
  warn(msg: string, fields?: LogFields): void {
    this.emit('warn', msg, fields);
  }
  error(msg: string, fields?: LogFields): void {
    this.emit('error', msg, fields);
  }
  child(fields: LogFields): Logger {
    return new JsonLinesLogger(this.sink, this.min, { ...this.base, ...fields });
  }
}

/** Errors become `{ name, message, code?, cause? }`; bigints become strings. */
function serialisable(v: unknown, depth = 0): unknown {
  if (v instanceof Error) {
    const out: LogFields = { name: v.name, message: v.message };
    const code = (v as { code?: unknown }).code;
    if (typeof code === 'string' || typeof code === 'number') out.code = code;
    if (v.cause !== undefined && depth < 3) out.cause = serialisable(v.cause, depth + 1);
    return out;
  }
  if (typeof v === 'bigint') return v.toString();
  return v;
}

/** JSON lines to `sink` (default stderr) at `level` and above. */
export function jsonLogger(level: LogLevel = 'info', sink: LineSink = process.stderr, fields: LogFields = {}): Logger {
  return new JsonLinesLogger(sink, LEVELS[level], fields);
}

/** Discards everything (a level above every real one). */
export const nullLogger: Logger = new JsonLinesLogger({ write: () => true }, Number.POSITIVE_INFINITY, {});

/**
 * Typed errors of the fetcher module. Each names the thing (reference, file, host, helper) and the
 * reason. Messages never carry secrets: no passwords, tokens, auth strings or header values, and no
 * excerpts of files that may hold them.
 */

export class FetcherError extends Error {
  /** What the error is about: an image reference, a file path, a registry host or a helper name. */
  readonly subject: string;
  constructor(subject: string, reason: string, options?: { cause?: unknown }) {
    super(`${subject}: ${reason}`, options);
    this.name = new.target.name;
    this.subject = subject;
  }
}

/** An image reference does not follow the distribution reference grammar. */
export class InvalidReferenceError extends FetcherError {}

/** A registry configuration file (hosts.toml, certs.d layout) is unreadable or malformed. */
export class ConfigError extends FetcherError {
  /** 1-based line of the problem in `subject`, when known. */
  readonly line?: number;
  /** 1-based column of the problem in `subject`, when known. */
  readonly column?: number;
  constructor(
    subject: string,
    reason: string,
    options?: { cause?: unknown; line?: number; column?: number },
  ) {
    const at = options?.line === undefined ? '' : `:${options.line}${options.column === undefined ? '' : `:${options.column}`}`;
    super(`${subject}${at}`, reason, options);
    // Keep `subject` the bare file so callers can match on it; the position lives in line/column.
    (this as { subject: string }).subject = subject;
    this.line = options?.line;
    this.column = options?.column;
  }
}

/** Credentials could not be obtained: a bad --user value, a malformed docker config, a failing helper. */
export class CredentialsError extends FetcherError {}

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

/**
 * A registry (or a storage URL it redirected to) answered, but not with what was asked: an HTTP
 * error status, a registry error document, a refused request. `status` is the HTTP status and
 * `code` the distribution error code (`MANIFEST_UNKNOWN`, `DENIED`, ...) when the body had one.
 */
export class RegistryError extends FetcherError {
  readonly status?: number;
  readonly code?: string;
  constructor(subject: string, reason: string, options?: { cause?: unknown; status?: number; code?: string }) {
    super(subject, reason, options);
    this.status = options?.status;
    this.code = options?.code;
  }
}

/** The manifest, blob, tag or repository does not exist (HTTP 404). */
export class NotFoundError extends RegistryError {}

/**
 * Authentication failed: no or wrong credentials (401/403 after authenticating), a malformed
 * `WWW-Authenticate` challenge, a token endpoint that fails or answers nonsense.
 */
export class AuthError extends RegistryError {}

/** The connection failed or broke (refused, reset, closed early) and retries did not help. */
export class NetworkError extends FetcherError {}

export type TimeoutPhase = 'connect' | 'first-byte' | 'idle';

/** Nothing arrived in time: connecting, waiting for the response headers, or between body bytes. */
export class TimeoutError extends FetcherError {
  readonly phase: TimeoutPhase;
  constructor(subject: string, phase: TimeoutPhase, reason: string, options?: { cause?: unknown }) {
    super(subject, reason, options);
    this.phase = phase;
  }
}

/** Content does not match its digest (or its expected size): never handed on. */
export class IntegrityError extends FetcherError {}

/**
 * The server broke the protocol: a wrong `Content-Range` or length, a redirect loop or a redirect
 * to something that is not HTTP(S), a missing `Location`, a body larger than allowed.
 */
export class ProtocolError extends FetcherError {}

/** A response is larger than the client accepts for its kind (manifests, token answers, error bodies). */
export class TooLargeError extends ProtocolError {}

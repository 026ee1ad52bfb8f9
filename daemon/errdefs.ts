/**
 * Errors of the snapshotter, classified as containerd's `errdefs` classifies them, and their
 * gRPC status codes (containerd's errdefs.ToGRPC mapping).
 *
 * Messages follow containerd's Go style: context first, the class last, e.g.
 * `snapshot default/3/abc: already exists`. containerd's errdefs.FromGRPC strips a trailing
 * `: <class>` and re-adds it, so a message written this way reads the same after the round
 * trip through containerd's proxy client.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';

export type ErrorKind =
  | 'InvalidArgument'
  | 'NotFound'
  | 'AlreadyExists'
  | 'FailedPrecondition'
  | 'ResourceExhausted'
  | 'Unavailable'
  | 'NotImplemented'
  | 'Internal';

/** The class names containerd's errdefs use in messages. */
const CLASS_TEXT: Record<ErrorKind, string> = {
  InvalidArgument: 'invalid argument',
  NotFound: 'not found',
  AlreadyExists: 'already exists',
  FailedPrecondition: 'failed precondition',
  ResourceExhausted: 'resource exhausted',
  Unavailable: 'unavailable',
  NotImplemented: 'not implemented',
  Internal: 'internal',
};

/** containerd's errdefs.ToGRPC. */
const GRPC_CODE: Record<ErrorKind, GrpcStatus> = {
  InvalidArgument: GrpcStatus.INVALID_ARGUMENT,
  NotFound: GrpcStatus.NOT_FOUND,
  AlreadyExists: GrpcStatus.ALREADY_EXISTS,
  FailedPrecondition: GrpcStatus.FAILED_PRECONDITION,
  // containerd/errdefs' ErrResourceExhausted (containerd 1.6's client reads it as ErrUnknown with the message).
  ResourceExhausted: GrpcStatus.RESOURCE_EXHAUSTED,
  Unavailable: GrpcStatus.UNAVAILABLE,
  NotImplemented: GrpcStatus.UNIMPLEMENTED,
  Internal: GrpcStatus.UNKNOWN,
};

/**
 * A snapshot operation failed for a reason of class `kind`. `message` is the full text with
 * the class appended (`<context>: <class>`), as containerd prints it.
 */
export class SnapshotterError extends Error {
  readonly kind: ErrorKind;

  constructor(kind: ErrorKind, context: string, options?: { cause?: unknown }) {
    super(context === '' ? CLASS_TEXT[kind] : `${context}: ${CLASS_TEXT[kind]}`, options);
    this.name = 'SnapshotterError';
    this.kind = kind;
  }

  /** The same class with more context in front (Go's `fmt.Errorf("ctx: %w", err)`). */
  wrap(context: string): SnapshotterError {
    const e = new SnapshotterError(this.kind, '', { cause: this });
    e.message = `${context}: ${this.message}`;
    return e;
  }

  get grpcCode(): GrpcStatus {
    return GRPC_CODE[this.kind];
  }
}

/** Error codes that mean the file system has no space (or no inode, or no quota) left. */
const NO_SPACE_CODES: ReadonlySet<string> = new Set(['ENOSPC', 'EDQUOT', 'SQLITE_FULL']);

/** Whether `err` (or an error in its cause chain) is a file system out of space or inodes. */
export function isNoSpace(err: unknown): boolean {
  for (let e = err, depth = 0; e !== undefined && e !== null && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    if (e instanceof SnapshotterError && e.kind === 'ResourceExhausted') return true;
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && NO_SPACE_CODES.has(code)) return true;
  }
  return false;
}

/**
 * Adds context to a classified error; a file system out of space becomes ResourceExhausted;
 * other errors become Internal with the context.
 */
export function wrapError(err: unknown, context: string): SnapshotterError {
  if (err instanceof SnapshotterError) return err.wrap(context);
  const text = err instanceof Error ? err.message : String(err);
  if (isNoSpace(err)) return new SnapshotterError('ResourceExhausted', `${context}: ${text}`, { cause: err });
  const e = new SnapshotterError('Internal', '', { cause: err });
  e.message = `${context}: ${text}`;
  return e;
}

export const notFound = (context: string): SnapshotterError => new SnapshotterError('NotFound', context);
export const alreadyExists = (context: string): SnapshotterError => new SnapshotterError('AlreadyExists', context);
export const failedPrecondition = (context: string): SnapshotterError => new SnapshotterError('FailedPrecondition', context);
export const invalidArgument = (context: string): SnapshotterError => new SnapshotterError('InvalidArgument', context);

export function isKind(err: unknown, kind: ErrorKind): boolean {
  return err instanceof SnapshotterError && err.kind === kind;
}

/** The gRPC status code for any error: classified ones by class, anything else UNKNOWN (as containerd does). */
export function grpcCodeOf(err: unknown): GrpcStatus {
  return err instanceof SnapshotterError ? err.grpcCode : GrpcStatus.UNKNOWN;
}

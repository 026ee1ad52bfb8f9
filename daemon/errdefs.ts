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
  | 'Unavailable'
  | 'NotImplemented'
  | 'Internal';

/** The class names containerd's errdefs use in messages. */
const CLASS_TEXT: Record<ErrorKind, string> = {
  InvalidArgument: 'invalid argument',
  NotFound: 'not found',
  AlreadyExists: 'already exists',
  FailedPrecondition: 'failed precondition',
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

/** Adds context to a classified error; other errors become Internal with the context. */
export function wrapError(err: unknown, context: string): SnapshotterError {
  if (err instanceof SnapshotterError) return err.wrap(context);
  const text = err instanceof Error ? err.message : String(err);
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

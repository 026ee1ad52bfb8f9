/** Typed errors of the zTOC module. Each names the thing (file, digest, offset) and the reason. */

export class ZtocError extends Error {
  /** What the error is about: a file path, a digest, or "zTOC". */
  readonly subject: string;
  constructor(subject: string, reason: string, options?: { cause?: unknown }) {
    super(`${subject}: ${reason}`, options);
    this.name = new.target.name;
    this.subject = subject;
  }
}

/** The tar stream inside a layer is malformed or uses an unsupported feature. */
export class TarFormatError extends ZtocError {}

/** The compressed stream (gzip/deflate) is corrupt or truncated. */
export class CompressionError extends ZtocError {}

/** A serialized zTOC (flatbuffer or checkpoint blob) is malformed. */
export class ZtocFormatError extends ZtocError {}

/** A requested range or file does not exist or lies outside the archive. */
export class ZtocRangeError extends ZtocError {}

/** A SOCI index manifest is malformed. */
export class IndexFormatError extends ZtocError {}

/** A resource limit (entries, name length, header size) was exceeded. */
export class LimitError extends ZtocError {}

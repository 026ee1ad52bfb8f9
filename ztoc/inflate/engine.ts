/**
 * A raw zlib inflater, the one primitive both building (stop at deflate block
 * boundaries) and extracting (resume from a checkpoint) need. Two engines
 * implement it: a N-API addon over the system's zlib (fast) and pako (the
 * pure-JS fallback where the addon is not built).
 */

/** zlib return codes we act on. */
export const Z_OK = 0;
export const Z_STREAM_END = 1;
export const Z_NEED_DICT = 2;
export const Z_BUF_ERROR = -5;
export const Z_DATA_ERROR = -3;

/** zlib flush modes we use. */
export const Z_NO_FLUSH = 0;
export const Z_BLOCK = 5;

/** windowBits: 47 = 32 + 15, automatic zlib/gzip header detection; -15 = raw deflate. */
export const WINDOW_BITS_AUTO = 47;
export const WINDOW_BITS_RAW = -15;

/**
 * What one `inflate` call did. Each inflater owns one result object and
 * overwrites it on every call (no allocation per call on the hot path).
 */
export interface InflateStep {
  /** zlib's return code (Z_OK, Z_STREAM_END, Z_BUF_ERROR, or a negative error). */
  status: number;
  /** Bytes of input consumed by this call. */
  consumed: number;
  /** Bytes of output written by this call. */
  produced: number;
  /** zlib's `data_type` after the call (bits 0-2 unused bits, 64 last block, 128 block boundary). */
  dataType: number;
}

export interface Inflater {
  /**
   * Inflate from input[inStart, inEnd) into output[outStart, outEnd).
   * Returns the inflater's own step object, overwritten by its next call.
   */
  inflate(
    input: Uint8Array,
    inStart: number,
    inEnd: number,
    output: Uint8Array,
    outStart: number,
    outEnd: number,
    flush: number,
  ): InflateStep;
  /**
   * The same call on another thread (the native engine's own threads), so that a large
   * step does not hold up the event loop; absent where the engine has none (pako). Until it
   * settles, the inflater must not be used, `input` must not change and output[outStart,
   * outEnd) must not be read. Resolves with the inflater's own step object.
   */
  inflateAsync?(
    input: Uint8Array,
    inStart: number,
    inEnd: number,
    output: Uint8Array,
    outStart: number,
    outEnd: number,
    flush: number,
  ): Promise<InflateStep>;
  /** inflateReset2: start a new stream (e.g. the next gzip member). */
  reset(windowBits: number): void;
  /** inflatePrime: insert `bits` (0-16) bits of `value` into the input stream. */
  prime(bits: number, value: number): void;
  /** inflateSetDictionary (raw streams: call right after creation/reset and prime). */
  setDictionary(dictionary: Uint8Array): void;
  /** inflateEnd; the inflater must not be used afterwards. Idempotent. */
  close(): void;
}

export interface InflateEngine {
  /** "zlib-native" or "pako". */
  readonly name: string;
  create(windowBits: number): Inflater;
}

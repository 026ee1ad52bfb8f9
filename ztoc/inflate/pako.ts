/**
 * The pure-JS inflate engine, on pako 3's zlib port. Used where the native
 * addon is not built, and as the reference the native engine is tested
 * against (pako is a line-by-line port of zlib's inflate.c, so block stops,
 * data_type and bit accounting match zlib's).
 */
import {
  ZStream,
  zlibInflate,
  zlibInflateEnd,
  zlibInflateInit2,
  zlibInflateReset2,
  zlibInflateSetDictionary,
} from 'pako';
import type { Z_FlushMode } from 'pako';
import type { InflateEngine, InflateStep, Inflater } from './engine.js';

/** The two fields of pako's (untyped) inflate state that inflatePrime touches. */
interface PakoBitState {
  hold: number;
  bits: number;
}

/** Same contract as the native addon: misuse throws, it never reaches pako. */
function checkRange(buf: Uint8Array, start: number, end: number, what: string): void {
  if (!(buf instanceof Uint8Array)) throw new TypeError(`${what} must be a Uint8Array`);
  if (!Number.isInteger(start) || !Number.isInteger(end) || start < 0 || start > end || end > buf.length) {
    throw new RangeError(`${what} range [${start}, ${end}) is not within [0, ${buf.length}]`);
  }
}

function checkWindowBits(windowBits: number): void {
  if (!Number.isInteger(windowBits) || windowBits < -15 || windowBits > 47) {
    throw new RangeError(`windowBits must be an integer in [-15, 47], got ${windowBits}`);
  }
}

function zlibCallFailed(fn: string, status: number, msg: string): Error {
  const text = `${fn} failed: ${msg || 'status'} (${status})`;
  // Z_STREAM_ERROR means bad parameters or state, i.e. caller misuse.
  return status === -2 ? new RangeError(text) : new Error(text);
}

/** Parked in the stream between calls so it does not pin the caller's buffers. */
const EMPTY = new Uint8Array(0);

class PakoInflater implements Inflater {
  private readonly strm = new ZStream();
  private readonly step: InflateStep = { status: 0, consumed: 0, produced: 0, dataType: 0 };
  private closed = false;

  constructor(windowBits: number) {
    checkWindowBits(windowBits);
    const status = zlibInflateInit2(this.strm, windowBits);
    if (status !== 0) throw zlibCallFailed('inflateInit2', status, this.strm.msg);
    this.park();
  }

  inflate(
    input: Uint8Array,
    inStart: number,
    inEnd: number,
    output: Uint8Array,
    outStart: number,
    outEnd: number,
    flush: number,
  ): InflateStep {
    this.checkOpen();
    checkRange(input, inStart, inEnd, 'input');
    checkRange(output, outStart, outEnd, 'output');
    if (!Number.isInteger(flush) || flush < 0 || flush > 6) {
      throw new RangeError(`flush must be an integer in [0, 6], got ${flush}`);
    }
    const s = this.strm;
    // pako indexes input/output by next_in/next_out: point it at the
    // caller's ranges instead of copying them.
    s.input = input;
    s.next_in = inStart;
    s.avail_in = inEnd - inStart;
    // pako types output as Uint8Array<ArrayBuffer>; it only indexes and
    // subarrays it, which works on any Uint8Array (Buffer, shared memory).
    s.output = output as Uint8Array<ArrayBuffer>;
    s.next_out = outStart;
    s.avail_out = outEnd - outStart;
    const step = this.step;
    step.status = zlibInflate(s, flush as Z_FlushMode);
    step.consumed = s.next_in - inStart;
    step.produced = s.next_out - outStart;
    step.dataType = s.data_type;
    this.park();
    return step;
  }

  reset(windowBits: number): void {
    this.checkOpen();
    checkWindowBits(windowBits);
    const status = zlibInflateReset2(this.strm, windowBits);
    if (status !== 0) throw zlibCallFailed('inflateReset2', status, this.strm.msg);
  }

  /**
   * pako has no inflatePrime; this is zlib's, applied to pako's state. pako
   * keeps zlib's bit accumulator (`hold`, LSB first, `bits` valid bits) as a
   * JS number that may transiently hold a negative int32 when bits reaches
   * 32, hence the `>>> 0` normalisation.
   */
  prime(bits: number, value: number): void {
    this.checkOpen();
    if (!Number.isInteger(bits) || bits < 0 || bits > 16) {
      throw new RangeError(`bits must be an integer in [0, 16], got ${bits}`);
    }
    if (!Number.isInteger(value)) throw new RangeError(`value must be an integer, got ${value}`);
    if (bits === 0) return;
    const state = this.strm.state as PakoBitState;
    if (state.bits + bits > 32) throw zlibCallFailed('inflatePrime', -2, 'bit buffer overflow');
    const v = value & ((1 << bits) - 1);
    state.hold = ((state.hold >>> 0) + v * 2 ** state.bits) >>> 0;
    state.bits += bits;
  }

  setDictionary(dictionary: Uint8Array): void {
    this.checkOpen();
    if (!(dictionary instanceof Uint8Array)) throw new TypeError('dictionary must be a Uint8Array');
    const status = zlibInflateSetDictionary(this.strm, dictionary);
    if (status !== 0) throw zlibCallFailed('inflateSetDictionary', status, this.strm.msg);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    zlibInflateEnd(this.strm);
  }

  private park(): void {
    this.strm.input = EMPTY;
    this.strm.output = EMPTY as Uint8Array<ArrayBuffer>;
    this.strm.next_in = this.strm.avail_in = this.strm.next_out = this.strm.avail_out = 0;
  }

  private checkOpen(): void {
    if (this.closed) throw new Error('inflater has been closed');
  }
}

export const pakoEngine: InflateEngine = {
  name: 'pako',
  create(windowBits: number): Inflater {
    return new PakoInflater(windowBits);
  },
};

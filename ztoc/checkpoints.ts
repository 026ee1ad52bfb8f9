/**
 * The gzip checkpoint blob (upstream's "zinfo", `../shared/docs/soci-format.md` §3):
 * little-endian, tightly packed: int32 count, int64 span_size, then per
 * checkpoint int64 in, int64 out, uint8 bits, 32 KiB window.
 */
import { ZtocFormatError } from './errors.js';
import { WINDOW_SIZE } from './types.js';

export const BLOB_HEADER_SIZE = 12;
export const CHECKPOINT_SIZE = 8 + 8 + 1 + WINDOW_SIZE;
/** Where checkpoint 0 lies in the v1 layout, which left it out. */
const V1_IMPLIED_IN = 10;

export interface Checkpoint {
  /** Offset in the compressed blob of the first full byte after the checkpoint. */
  in: number;
  /** Offset in the uncompressed stream. */
  out: number;
  /** 0, or 1-7 bits of the byte at `in - 1` that belong to the next block. */
  bits: number;
  /** The 32 KiB of output preceding `out` (zero-filled at the front where fewer exist). */
  window: Uint8Array;
}

export interface CheckpointIndex {
  spanSize: number;
  checkpoints: Checkpoint[];
  /** Which layout the blob used (we always write v2). */
  layout: 'v1' | 'v2';
}

export function encodeCheckpointBlob(spanSize: number, checkpoints: readonly Checkpoint[]): Uint8Array {
  const blob = new Uint8Array(BLOB_HEADER_SIZE + checkpoints.length * CHECKPOINT_SIZE);
  const view = new DataView(blob.buffer);
  view.setInt32(0, checkpoints.length, true);
  view.setBigInt64(4, BigInt(spanSize), true);
  let pos = BLOB_HEADER_SIZE;
  for (const cp of checkpoints) {
    view.setBigInt64(pos, BigInt(cp.in), true);
    view.setBigInt64(pos + 8, BigInt(cp.out), true);
    view.setUint8(pos + 16, cp.bits);
    blob.set(cp.window.subarray(0, WINDOW_SIZE), pos + 17);
    pos += CHECKPOINT_SIZE;
  }
  return blob;
}

/** Parse a checkpoint blob; windows are views into `blob` (no copy). */
export function decodeCheckpointBlob(blob: Uint8Array, subject = 'zTOC'): CheckpointIndex {
  const fail = (reason: string): never => {
    throw new ZtocFormatError(subject, `gzip checkpoint blob: ${reason}`);
  };
  if (blob.byteLength < BLOB_HEADER_SIZE) fail(`only ${blob.byteLength} bytes, shorter than its header`);
  const view = new DataView(blob.buffer, blob.byteOffset, blob.byteLength);
  const count = view.getInt32(0, true);
  const spanSize = Number(view.getBigInt64(4, true));
  if (count < 1) fail(`checkpoint count is ${count}`);
  if (!(spanSize > 0 && Number.isSafeInteger(spanSize))) fail(`span size is ${spanSize}`);
  const v2Size = BLOB_HEADER_SIZE + count * CHECKPOINT_SIZE;
  const v1Size = v2Size - CHECKPOINT_SIZE;
  let layout: 'v1' | 'v2';
  if (blob.byteLength === v2Size) layout = 'v2';
  else if (blob.byteLength === v1Size) layout = 'v1';
  else {
    return fail(
      `${blob.byteLength} bytes do not hold ${count} checkpoints (expected ${v2Size}, or ${v1Size} in the v1 layout)`,
    );
  }
  const checkpoints: Checkpoint[] = [];
  if (layout === 'v1') {
    checkpoints.push({ in: V1_IMPLIED_IN, out: 0, bits: 0, window: new Uint8Array(WINDOW_SIZE) });
  }
  for (let pos = BLOB_HEADER_SIZE; pos < blob.byteLength; pos += CHECKPOINT_SIZE) {
    const k = checkpoints.length;
    const inOff = Number(view.getBigInt64(pos, true));
    const outOff = Number(view.getBigInt64(pos + 8, true));
    const bits = view.getUint8(pos + 16);
    if (!Number.isSafeInteger(inOff) || inOff < 0) fail(`checkpoint ${k} has compressed offset ${inOff}`);
    if (!Number.isSafeInteger(outOff) || outOff < 0) fail(`checkpoint ${k} has uncompressed offset ${outOff}`);
    if (bits > 7) fail(`checkpoint ${k} has ${bits} bits`);
    if (bits > 0 && inOff < 1) fail(`checkpoint ${k} has bits but compressed offset 0`);
    const prev = checkpoints[k - 1];
    if (prev && (inOff < prev.in || outOff < prev.out)) {
      fail(`checkpoint ${k} (in ${inOff}, out ${outOff}) goes back from checkpoint ${k - 1} (in ${prev.in}, out ${prev.out})`);
    }
    checkpoints.push({ in: inOff, out: outOff, bits, window: blob.subarray(pos + 17, pos + 17 + WINDOW_SIZE) });
  }
  return { spanSize, checkpoints, layout };
}

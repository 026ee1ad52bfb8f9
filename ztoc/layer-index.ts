/**
 * A zTOC checked for consistency and prepared for lookups: spans with their
 * compressed and uncompressed ranges, and files by normalised path.
 */
import { decodeCheckpointBlob, type Checkpoint } from './checkpoints.js';
import { ZtocFormatError, ZtocRangeError } from './errors.js';
import { decodeTarZinfo } from './flatbuf.js';
import { normalizeName, unsafeNameReason } from './names.js';
import { ZTOC_VERSION, type FileMetadata, type Ztoc } from './types.js';

export interface Span {
  id: number;
  /** First byte of the blob this span needs (the checkpoint's `in`, or the byte before it when it has bits). */
  compressedStart: number;
  /** One past the span's last byte in the blob. */
  compressedEnd: number;
  uncompressedStart: number;
  uncompressedEnd: number;
}

const DIGEST_RE = /^sha256:[0-9a-f]{64}$/;
const TAR_BLOCK = 512;

export class LayerIndex {
  readonly spans: readonly Span[];
  /** Gzip checkpoints by span id (empty for uncompressed layers). */
  readonly checkpoints: readonly Checkpoint[];
  readonly spanSize: number;
  private byName: Map<string, FileMetadata> | undefined;

  constructor(readonly ztoc: Ztoc, readonly subject = 'zTOC') {
    const fail = (reason: string): never => {
      throw new ZtocFormatError(subject, reason);
    };
    if (ztoc.version !== ZTOC_VERSION) fail(`unsupported zTOC version ${JSON.stringify(ztoc.version)} (expected ${ZTOC_VERSION})`);
    const { compressedArchiveSize: csize, uncompressedArchiveSize: usize } = ztoc;
    if (csize < 0 || usize < 0) fail(`negative archive size (compressed ${csize}, uncompressed ${usize})`);
    const info = ztoc.compressionInfo;
    const spanCount = info.maxSpanId + 1;
    if (info.spanDigests.length !== spanCount) {
      fail(`max_span_id ${info.maxSpanId} does not match the ${info.spanDigests.length} span digests`);
    }
    info.spanDigests.forEach((d, i) => {
      if (!DIGEST_RE.test(d)) fail(`span ${i} digest ${JSON.stringify(d.slice(0, 80))} is not a sha256 digest`);
    });
    const spans: Span[] = [];
    if (info.algorithm === 'gzip') {
      const cps = decodeCheckpointBlob(info.checkpoints, subject);
      if (cps.checkpoints.length !== spanCount) {
        fail(`${cps.checkpoints.length} checkpoints but max_span_id ${info.maxSpanId} says ${spanCount} spans`);
      }
      this.checkpoints = cps.checkpoints;
      this.spanSize = cps.spanSize;
      cps.checkpoints.forEach((cp, i) => {
        const next = cps.checkpoints[i + 1];
        const span: Span = {
          id: i,
          compressedStart: cp.in - (cp.bits > 0 ? 1 : 0),
          compressedEnd: next ? next.in : csize,
          uncompressedStart: cp.out,
          uncompressedEnd: next ? next.out : Math.max(usize, cp.out),
        };
        if (span.compressedEnd > csize || span.compressedStart > span.compressedEnd) {
          fail(`span ${i} covers compressed bytes [${span.compressedStart}, ${span.compressedEnd}) outside the ${csize}-byte archive`);
        }
        spans.push(span);
      });
    } else {
      const zinfo = decodeTarZinfo(info.checkpoints, subject);
      if (zinfo.spanSize < 1) fail(`uncompressed layer has span size ${zinfo.spanSize}`);
      if (zinfo.size !== csize) fail(`tar zinfo size ${zinfo.size} differs from the archive size ${csize}`);
      if (usize > csize) fail(`uncompressed layer: archive size ${usize} exceeds blob size ${csize}`);
      const expected = Math.ceil(csize / zinfo.spanSize);
      if (expected !== spanCount) fail(`a ${csize}-byte layer in ${zinfo.spanSize}-byte spans has ${expected} spans, not ${spanCount}`);
      this.checkpoints = [];
      this.spanSize = zinfo.spanSize;
      for (let i = 0; i < spanCount; i++) {
        const start = i * zinfo.spanSize;
        const end = Math.min(start + zinfo.spanSize, csize);
        spans.push({ id: i, compressedStart: start, compressedEnd: end, uncompressedStart: start, uncompressedEnd: end });
      }
    }
    this.spans = spans;
    this.checkFiles(fail);
  }

  private checkFiles(fail: (reason: string) => never): void {
    const usize = this.ztoc.uncompressedArchiveSize;
    let nextHeader = 0;
    let sorted = true;
    for (const [i, f] of this.ztoc.files.entries()) {
      const unsafe = unsafeNameReason(f.name);
      if (unsafe) fail(`entry ${i} ${JSON.stringify(f.name)}: ${unsafe}`);
      if (f.type === 'hardlink') {
        const bad = unsafeNameReason(f.linkname);
        if (bad) fail(`hardlink ${JSON.stringify(f.name)} -> ${JSON.stringify(f.linkname)}: ${bad}`);
      }
      if (f.uncompressedOffset < 0 || f.uncompressedSize < 0 || f.uncompressedOffset + f.uncompressedSize > usize) {
        fail(
          `entry ${JSON.stringify(f.name)} data [${f.uncompressedOffset}, +${f.uncompressedSize}) lies outside the ${usize}-byte archive`,
        );
      }
      if (f.uncompressedOffset < nextHeader) sorted = false;
      nextHeader = alignToBlock(f.uncompressedOffset + f.uncompressedSize);
    }
    if (!sorted) {
      // Upstream sorts by offset and then requires entries not to overlap; do the same.
      const byOffset = [...this.ztoc.files].sort((a, b) => a.uncompressedOffset - b.uncompressedOffset);
      let next = 0;
      for (const f of byOffset) {
        if (f.uncompressedOffset < next) fail(`entry ${JSON.stringify(f.name)} overlaps the previous entry's data`);
        next = alignToBlock(f.uncompressedOffset + f.uncompressedSize);
      }
    }
  }

  get compressed(): boolean {
    return this.ztoc.compressionInfo.algorithm === 'gzip';
  }

  /** The span holding uncompressed offset `offset` (the last one starting at or before it). */
  spanFor(offset: number): number {
    if (offset < 0 || offset >= this.ztoc.uncompressedArchiveSize) {
      throw new ZtocRangeError(this.subject, `offset ${offset} is outside the ${this.ztoc.uncompressedArchiveSize}-byte archive`);
    }
    let lo = 0;
    let hi = this.spans.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.spans[mid].uncompressedStart <= offset) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /** Find a file by path; `./`, leading `/` and trailing `/` do not matter. */
  file(path: string): FileMetadata | undefined {
    if (!this.byName) {
      this.byName = new Map();
      for (const f of this.ztoc.files) this.byName.set(normalizeName(f.name), f);
    }
    return this.byName.get(normalizeName(path));
  }
}

function alignToBlock(n: number): number {
  return Math.ceil(n / TAR_BLOCK) * TAR_BLOCK;
}

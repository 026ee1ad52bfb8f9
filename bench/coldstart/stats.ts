/** Medians, spreads and the per-workload speed-ups of the cold-start results. */
import type { ModeName, NetworkName, RunSummary, Sample, Speedup, Spread } from './types.js';

/** Quantile by linear interpolation between closest ranks (q in [0, 1]). */
export function quantile(values: readonly number[], q: number): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const pos = (s.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  const a = s[lo] as number;
  const b = s[hi] as number;
  return a + (b - a) * (pos - lo);
}

export const median = (values: readonly number[]): number => quantile(values, 0.5);

export function spread(values: readonly number[]): Spread | null {
  if (values.length === 0) return null;
  return { min: Math.min(...values), p25: quantile(values, 0.25), p75: quantile(values, 0.75), max: Math.max(...values) };
}

const medianOf = (samples: readonly Sample[], f: (s: Sample) => number | null): number | null => {
  const xs = samples.map(f).filter((x): x is number => x !== null && Number.isFinite(x));
  return xs.length === 0 ? null : median(xs);
};

/** The summary of one (workload, network, mode) from its completed samples. */
export function summarize(
  base: { workload: string; network: NetworkName; mode: ModeName; image_bytes: number },
  samples: readonly Sample[],
  failure?: string,
): RunSummary {
  const ok = samples.length > 0;
  return {
    ...base,
    status: failure !== undefined ? 'failed' : ok ? 'ok' : 'failed',
    ...(failure !== undefined ? { reason: failure } : ok ? {} : { reason: 'no run completed' }),
    runs: samples.length,
    median_ms: medianOf(samples, (s) => s.total_ms),
    spread_ms: spread(samples.map((s) => s.total_ms)),
    pull_ms: medianOf(samples, (s) => s.pull_ms),
    create_ms: medianOf(samples, (s) => s.create_ms),
    run_ms: medianOf(samples, (s) => s.run_ms),
    bytes_fetched: medianOf(samples, (s) => s.bytes_fetched),
    bytes_fetched_total: medianOf(samples, (s) => s.bytes_fetched_total),
    requests: medianOf(samples, (s) => s.requests),
    bytes_read: medianOf(samples, (s) => s.bytes_read),
    samples: [...samples],
  };
}

/** A summary for a mode that could not run at all. */
export function unavailable(base: { workload: string; network: NetworkName; mode: ModeName; image_bytes: number }, reason: string): RunSummary {
  return {
    ...base,
    status: 'unavailable',
    reason,
    runs: 0,
    median_ms: null,
    spread_ms: null,
    pull_ms: null,
    create_ms: null,
    run_ms: null,
    bytes_fetched: null,
    bytes_fetched_total: null,
    requests: null,
    bytes_read: null,
    samples: [],
  };
}

/** Time to move `bytes` at `bitsPerSecond`, ms. */
export const idealMs = (bytes: number, bitsPerSecond: number): number => ((bytes * 8) / bitsPerSecond) * 1000;

/** overlayfs median / soci-ts median for every (workload, network) where both completed. */
export function speedups(runs: readonly RunSummary[]): Speedup[] {
  const out: Speedup[] = [];
  for (const lazy of runs) {
    if (lazy.mode !== 'soci-ts' || lazy.status !== 'ok' || lazy.median_ms === null) continue;
    const full = runs.find((r) => r.mode === 'overlayfs' && r.workload === lazy.workload && r.network === lazy.network);
    if (full === undefined || full.status !== 'ok' || full.median_ms === null) continue;
    const s: Speedup = {
      workload: lazy.workload,
      network: lazy.network,
      overlayfs_ms: full.median_ms,
      soci_ms: lazy.median_ms,
      ratio: full.median_ms / lazy.median_ms,
    };
    if (lazy.ideal_ms !== undefined) {
      s.ideal_ms = lazy.ideal_ms;
      s.vs_ideal = lazy.ideal_ms === null || lazy.ideal_ms <= 0 ? null : lazy.median_ms / lazy.ideal_ms;
    }
    out.push(s);
  }
  return out;
}

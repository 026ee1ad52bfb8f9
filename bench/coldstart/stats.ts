/** Medians, spreads and the per-workload speed-ups of the cold-start results. */
import type { ModeName, NetworkName, RunSummary, Sample, Speedup, Spread, TargetCheck } from './types.js';

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

/**
 * The targets on the built-in workloads: on large-read-few, lazy >= 3x faster than
 * the full pull on loopback and >= 5x over the WAN, within 1.5x of the ideal, bytes fetched
 * <= 1.3x the bytes the command read; on large-read-all, lazy <= 1.2x the full-pull time.
 */
export function targetChecks(runs: readonly RunSummary[], sp: readonly Speedup[], networks: readonly NetworkName[]): TargetCheck[] {
  const out: TargetCheck[] = [];
  const has = (w: string): boolean => runs.some((r) => r.workload === w);
  const check = (target: string, workload: string, network: NetworkName, value: number | null | undefined, limit: number, kind: 'min' | 'max'): void => {
    const v = value === undefined || value === null || !Number.isFinite(value) ? null : value;
    out.push({ target, workload, network, value: v, limit, kind, met: v === null ? null : kind === 'min' ? v >= limit : v <= limit });
  };
  const speed = (w: string, n: NetworkName): Speedup | undefined => sp.find((s) => s.workload === w && s.network === n);
  const lazy = (w: string, n: NetworkName): RunSummary | undefined => runs.find((r) => r.workload === w && r.network === n && r.mode === 'soci-ts' && r.status === 'ok');
  if (has('large-read-few')) {
    if (networks.includes('loopback')) check('lazy start ≥ 3× faster than the full pull (loopback)', 'large-read-few', 'loopback', speed('large-read-few', 'loopback')?.ratio, 3, 'min');
    if (networks.includes('wan')) check('lazy start ≥ 5× faster than the full pull (WAN)', 'large-read-few', 'wan', speed('large-read-few', 'wan')?.ratio, 5, 'min');
    if (networks.includes('wan')) check('lazy start within 1.5× of the ideal (WAN)', 'large-read-few', 'wan', speed('large-read-few', 'wan')?.vs_ideal, 1.5, 'max');
    for (const n of networks) {
      const r = lazy('large-read-few', n);
      const ratio = r?.bytes_fetched !== null && r?.bytes_fetched !== undefined && r.bytes_read !== null && r.bytes_read > 0 ? r.bytes_fetched / r.bytes_read : null;
      check(`bytes fetched ≤ 1.3× the bytes the command reads (${n})`, 'large-read-few', n, ratio, 1.3, 'max');
    }
  }
  if (has('large-read-all')) {
    for (const n of networks) {
      const s = speed('large-read-all', n);
      check(`read-everything: lazy ≤ 1.2× the full-pull time (${n})`, 'large-read-all', n, s === undefined ? null : s.soci_ms / s.overlayfs_ms, 1.2, 'max');
    }
  }
  return out;
}

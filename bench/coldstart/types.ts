/** The shapes of the cold-start benchmark: workloads, options, and results.json. */

export type ModeName = 'overlayfs' | 'soci-ts';
export type NetworkName = 'loopback' | 'wan';

export const MODES: readonly ModeName[] = ['overlayfs', 'soci-ts'];
export const NETWORKS: readonly NetworkName[] = ['loopback', 'wan'];

/**
 * One workload (the shape of the soci benchmark's workload files, in camelCase):
 * `image` is where the image comes from — `builtin:NAME` (built by the bench from real files),
 * `oci:DIR[:TAG]` (an OCI layout), or a registry reference (`docker://HOST/REPO:TAG` or
 * `HOST/REPO:TAG`, copied with skopeo) — and is pushed to the bench's own loopback registry;
 * `command` runs in the container (argv; a string runs with `/bin/sh -c`); the container is
 * ready when a line of its stdout contains `readyLine`.
 */
export interface Workload {
  name: string;
  image: string;
  command: string[];
  readyLine: string;
  /** Extra arguments for `soci-ts create` (e.g. `["--min-layer-size", "1MiB"]`). */
  createArgs?: string[];
  description?: string;
}

export interface ColdstartOptions {
  /** Workloads file (JSON: an array of workloads or `{ "workloads": [...] }`); default: the built-in set. */
  workloadsFile?: string;
  /** Only these workloads (by name). */
  only?: string[];
  runs: number;
  networks: NetworkName[];
  modes: ModeName[];
  outDir: string;
  ideal: boolean;
  rttMs: number;
  bandwidthBps: number;
  /** Per step (pull, create, run to ready) timeout, ms. */
  stepTimeoutMs: number;
  /** Cache dir for the built-in images. */
  imageCacheDir: string;
  /** Keep the snapshotter's and the FUSE manager's logs of every soci-ts run under OUT/logs/. */
  keepLogs?: boolean;
  /** The soci-ts snapshotter's log level (default info). */
  logLevel?: 'debug' | 'info' | 'warn' | 'error';
  /** Restart the soci-ts snapshotter on a fresh root before every lazy run (default: keep it running when it holds nothing). */
  coldDaemon?: boolean;
  /** Where progress lines go (default stderr). */
  progress?: (line: string) => void;
  /** Abort (Ctrl-C): the bench stops, cleans up and rejects with the signal's reason. */
  signal?: AbortSignal;
}

export interface Sample {
  run: number;
  /** Start of the pull to the ready line. */
  total_ms: number;
  pull_ms: number;
  create_ms: number;
  /** Start of `ctr tasks start` to the ready line. */
  run_ms: number;
  /** Registry → client bytes from the start of the pull to the ready line. */
  bytes_fetched: number;
  /** …and until the container had exited (background fetches included). */
  bytes_fetched_total: number;
  requests: number;
  blob_requests: number;
  range_requests: number;
  connections: number;
  /** What the command reported it read (`read N bytes` in the ready line), if it did. */
  bytes_read: number | null;
  /** FUSE mounts under the snapshotter's root once the container was created (soci-ts mode). */
  lazy_mounts: number | null;
  /**
   * Layers `soci-ts rpull --json` reported as taken over by the snapshotter (outcome "lazy":
   * it answered Prepare with ALREADY_EXISTS — mounted lazily, or unpacked by the daemon itself).
   */
  lazy_layers: number | null;
  ready_line: string;
  /** Whether the page cache was dropped before this run. */
  page_cache_dropped: boolean;
}

export interface Spread {
  min: number;
  p25: number;
  p75: number;
  max: number;
}

export interface RunSummary {
  workload: string;
  network: NetworkName;
  mode: ModeName;
  status: 'ok' | 'unavailable' | 'failed';
  /** Why not ok. */
  reason?: string;
  /** Samples that completed. */
  runs: number;
  median_ms: number | null;
  spread_ms: Spread | null;
  /** Medians of the phases (they need not add up to median_ms exactly). */
  pull_ms: number | null;
  create_ms: number | null;
  run_ms: number | null;
  bytes_fetched: number | null;
  bytes_fetched_total: number | null;
  requests: number | null;
  /** Compressed size of the image: manifest + config + layers. */
  image_bytes: number;
  /** What the command reported it read (median), if it reports. */
  bytes_read: number | null;
  /** soci-ts: bytes_fetched at the network's bandwidth (configured; measured for loopback). */
  ideal_ms?: number | null;
  samples: Sample[];
}

export interface LinkFigures {
  rtt_ms: number;
  bandwidth_mbit: number;
}

export interface NetworkInfo {
  name: NetworkName;
  /** What was asked for (none for loopback). */
  requested: LinkFigures | null;
  /** Measured through the proxy before the runs: a small request's round trip, a large blob's throughput. */
  measured: LinkFigures | null;
  measure_error?: string;
  how: string;
}

export interface LayerInfo {
  digest: string;
  size: number;
  media_type: string;
  /** Has a zTOC in the image's SOCI index. */
  indexed: boolean;
}

export interface WorkloadInfo {
  name: string;
  description?: string;
  source: string;
  /** repository:tag in the bench's registry. */
  ref: string;
  command: string[];
  readyLine: string;
  image_bytes: number;
  /** Sum of the layers' compressed sizes. */
  layer_bytes: number;
  layers: LayerInfo[];
  /** Digest of the SOCI index `soci-ts create --push` made, or null. */
  soci_index: string | null;
  soci_index_error?: string;
  /** Built-in workloads: the bytes of the files the command reads (from the layers' tar listings). */
  expected_bytes_read?: number;
}

export interface ModeInfo {
  mode: ModeName;
  available: boolean;
  reason?: string;
}

export interface MachineInfo {
  hostname: string;
  os: string;
  kernel: string;
  cpu_model: string;
  cpus: number;
  memory_bytes: number;
  node: string;
  containerd: string;
  runc: string;
  registry: string;
  soci_ts_commit: string;
  inflate_engine: string;
  load_average_start: number[];
  load_average_end: number[];
}

export interface Speedup {
  workload: string;
  network: NetworkName;
  overlayfs_ms: number;
  soci_ms: number;
  /** overlayfs median / soci-ts median. */
  ratio: number;
  ideal_ms?: number | null;
  /** soci-ts median / ideal. */
  vs_ideal?: number | null;
}

/** One of the targets, checked on the measured figures (not a test: a figure to beat). */
export interface TargetCheck {
  target: string;
  workload: string;
  network: NetworkName;
  /** The measured figure (a ratio), or null when it could not be measured. */
  value: number | null;
  /** The limit: value >= limit (kind 'min') or value <= limit (kind 'max'). */
  limit: number;
  kind: 'min' | 'max';
  met: boolean | null;
}

export interface ColdstartResults {
  version: 1;
  started_at: string;
  finished_at: string;
  duration_s: number;
  options: {
    runs: number;
    networks: NetworkName[];
    modes: ModeName[];
    ideal: boolean;
    rtt_ms: number;
    bandwidth_mbit: number;
    workloads_file: string | null;
  };
  machine: MachineInfo;
  modes: ModeInfo[];
  networks: NetworkInfo[];
  workloads: WorkloadInfo[];
  runs: RunSummary[];
  speedups: Speedup[];
  /** The targets on the built-in workloads. */
  targets: TargetCheck[];
  /** How the figures were taken (also in the markdown report). */
  method: string[];
}

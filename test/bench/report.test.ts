/**
 * The cold-start report from a given results object (no containerd here: the figures are made
 * up, the rendering is what is tested):
 * - results.json holds exactly the object;
 * - chart.svg parses as XML (Python's xml.etree, an independent parser) and has one bar per
 *   mode per workload per network (plus the ideal with --ideal), each bar's height
 *   proportional to its median, and the speed-up ratio of each workload printed;
 * - report.md has a row per (network, workload, mode), the speed-ups, the requested and measured
 *   link figures and the machine;
 * - a mode that is unavailable shows as such everywhere and gets no number (no bar height, no
 *   median), and text is escaped (a name with & < " stays XML).
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  METHOD,
  renderTable,
  speedups,
  summarize,
  targetChecks,
  unavailable,
  writeReport,
  type ColdstartResults,
  type ModeName,
  type NetworkName,
  type RunSummary,
  type Sample,
} from '../../bench/coldstart/index.js';

const WORKLOADS = ['large-read-few', 'large-read-all', 'small'];
const NETWORKS: NetworkName[] = ['loopback', 'wan'];
const MODES: ModeName[] = ['overlayfs', 'soci-ts'];

/** Deterministic made-up samples: totals `base * (1 + k/10)` for k = 0..4. */
function samples(base: number, fetched: number): Sample[] {
  return [0, 3, 1, 4, 2].map((k, i) => ({
    run: i + 1,
    total_ms: base * (1 + k / 10),
    pull_ms: base * 0.6 * (1 + k / 10),
    create_ms: 30,
    run_ms: base * 0.4 * (1 + k / 10) - 30,
    bytes_fetched: fetched + k * 1000,
    bytes_fetched_total: fetched * 2,
    requests: 10 + k,
    blob_requests: 8,
    range_requests: 4,
    connections: 3,
    bytes_read: 6_000_000,
    lazy_mounts: 3,
    lazy_layers: 3,
    ready_line: 'coldstart ready: read 6000000 bytes',
    page_cache_dropped: true,
  }));
}

function makeResults(opts: { sociAvailable: boolean; ideal: boolean; names?: string[] }): ColdstartResults {
  const names = opts.names ?? WORKLOADS;
  const runs: RunSummary[] = [];
  names.forEach((w, wi) => {
    for (const n of NETWORKS) {
      for (const m of MODES) {
        const base = { workload: w, network: n, mode: m, image_bytes: 113_000_000 };
        if (m === 'soci-ts' && !opts.sociAvailable) {
          runs.push(unavailable(base, 'this soci-ts has no `rpull` command'));
          continue;
        }
        const ms = (m === 'overlayfs' ? 9000 : 2000 + wi * 3000) * (n === 'wan' ? 2 : 1);
        const s = summarize(base, samples(ms, m === 'overlayfs' ? 113_000_000 : 9_000_000 * (wi + 1)));
        if (m === 'soci-ts') s.ideal_ms = ((s.bytes_fetched ?? 0) * 8 * 1000) / 100e6;
        runs.push(s);
      }
    }
  });
  return {
    version: 1,
    started_at: '2026-01-02T03:04:05.000Z',
    finished_at: '2026-01-02T03:24:05.000Z',
    duration_s: 1200,
    options: { runs: 5, networks: NETWORKS, modes: MODES, ideal: opts.ideal, rtt_ms: 20, bandwidth_mbit: 100, workloads_file: null },
    machine: {
      hostname: 'testhost',
      os: 'Debian GNU/Linux 12 (bookworm)',
      kernel: '6.1.0',
      cpu_model: 'Test CPU',
      cpus: 2,
      memory_bytes: 24 << 30,
      node: 'v20.0.0',
      containerd: 'containerd 1.6.20',
      runc: 'runc 1.1.5',
      registry: 'docker-registry 2.8.2',
      soci_ts_commit: 'abc1234',
      inflate_engine: 'zlib-native',
      load_average_start: [1, 2, 3],
      load_average_end: [1.5, 2, 3],
    },
    modes: [{ mode: 'overlayfs', available: true }, opts.sociAvailable ? { mode: 'soci-ts', available: true } : { mode: 'soci-ts', available: false, reason: 'this soci-ts has no `rpull` command' }],
    networks: [
      { name: 'loopback', requested: null, measured: { rtt_ms: 1.7, bandwidth_mbit: 2800 }, how: 'loopback' },
      { name: 'wan', requested: { rtt_ms: 20, bandwidth_mbit: 100 }, measured: { rtt_ms: 22.5, bandwidth_mbit: 99.7 }, how: 'proxy' },
    ],
    workloads: names.map((w) => ({
      name: w,
      source: 'builtin:large',
      ref: `coldstart/0-large:latest`,
      command: ['/bin/sh', '-c', 'echo "coldstart ready"'],
      readyLine: 'coldstart ready',
      image_bytes: 113_000_000,
      layer_bytes: 112_990_000,
      layers: [{ digest: 'sha256:' + 'a'.repeat(64), size: 112_990_000, media_type: 'application/vnd.oci.image.layer.v1.tar+gzip', indexed: true }],
      soci_index: 'sha256:' + 'b'.repeat(64),
    })),
    runs,
    speedups: speedups(runs),
    targets: targetChecks(runs, speedups(runs), NETWORKS),
    method: METHOD,
  };
}

interface SvgElement {
  tag: string;
  attrs: Record<string, string>;
  text: string;
}

/** Every element of the SVG with its attributes and text, parsed by Python's xml.etree. */
function parseSvg(file: string): SvgElement[] {
  const py = [
    'import json, sys, xml.etree.ElementTree as ET',
    'root = ET.parse(sys.argv[1]).getroot()',
    'out = [{"tag": e.tag.split("}")[-1], "attrs": dict(e.attrib), "text": "".join(e.itertext())} for e in root.iter()]',
    'print(json.dumps({"root": root.tag, "elements": out}))',
  ].join('\n');
  const r = spawnSync('python3', ['-c', py, file], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`python3 could not parse ${file} as XML: ${r.stderr}`);
  const doc = JSON.parse(r.stdout) as { root: string; elements: SvgElement[] };
  if (doc.root !== '{http://www.w3.org/2000/svg}svg') throw new Error(`root element is ${doc.root}, not svg`);
  return doc.elements;
}

const bars = (els: SvgElement[]): SvgElement[] => els.filter((e) => e.tag === 'rect' && (e.attrs.class ?? '').split(' ').includes('bar'));

function medianOf(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 === 1 ? (s[(s.length - 1) / 2] as number) : ((s[s.length / 2 - 1] as number) + (s[s.length / 2] as number)) / 2;
}

t.test('results.json, report.md and chart.svg from a results object with both modes', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-report-test-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const results = makeResults({ sociAvailable: true, ideal: false });
  const files = await writeReport(results, dir);
  t.same(JSON.parse(await readFile(files.json, 'utf8')), results, 'results.json is the object');
  t.ok(Array.isArray(results.runs) && results.runs.every((r) => 'workload' in r && 'network' in r && 'mode' in r && 'median_ms' in r && 'bytes_fetched' in r && 'image_bytes' in r), 'each run has the fields the issue names');

  // Medians and speed-ups against our own arithmetic on the samples.
  for (const r of results.runs) t.equal(r.median_ms, medianOf(r.samples.map((s) => s.total_ms)), `median of ${r.network} ${r.workload} ${r.mode}`);
  t.equal(results.speedups.length, WORKLOADS.length * NETWORKS.length, 'a speed-up per workload and network');
  for (const s of results.speedups) {
    const full = results.runs.find((r) => r.workload === s.workload && r.network === s.network && r.mode === 'overlayfs');
    const lazy = results.runs.find((r) => r.workload === s.workload && r.network === s.network && r.mode === 'soci-ts');
    t.equal(s.ratio, (full?.median_ms ?? NaN) / (lazy?.median_ms ?? NaN), `speed-up of ${s.network} ${s.workload}`);
  }

  const els = parseSvg(files.svg);
  const b = bars(els);
  t.equal(b.length, WORKLOADS.length * NETWORKS.length * MODES.length, 'one bar per mode per workload per network');
  for (const n of NETWORKS) {
    for (const w of WORKLOADS) {
      for (const m of MODES) {
        const these = b.filter((e) => e.attrs['data-network'] === n && e.attrs['data-workload'] === w && e.attrs['data-mode'] === m);
        t.equal(these.length, 1, `exactly one bar for ${n} ${w} ${m}`);
      }
    }
  }
  // Heights are proportional to the medians (same scale within a network's panel).
  for (const n of NETWORKS) {
    const inPanel = b.filter((e) => e.attrs['data-network'] === n);
    const scale = inPanel.map((e) => {
      const r = results.runs.find((x) => x.network === n && x.workload === e.attrs['data-workload'] && x.mode === e.attrs['data-mode']);
      return Number(e.attrs.height) / (r?.median_ms ?? NaN);
    });
    const lo = Math.min(...scale);
    const hi = Math.max(...scale);
    t.ok(lo > 0 && hi / lo < 1.01, `${n}: bar height / median is the same for every bar (${lo}..${hi})`);
  }
  // The speed-up of each workload is printed in the chart.
  const sp = els.filter((e) => e.tag === 'text' && e.attrs.class === 'speedup');
  t.equal(sp.length, WORKLOADS.length * NETWORKS.length, 'a speed-up label per workload and network');
  for (const s of results.speedups) {
    const label = sp.find((e) => e.attrs['data-workload'] === s.workload && e.attrs['data-network'] === s.network);
    const want = s.ratio >= 10 ? s.ratio.toFixed(1) : s.ratio.toFixed(2);
    t.match(label?.text ?? '', new RegExp(`${want.replace('.', '\\.')}×`), `${s.network} ${s.workload}: ${want}× in the chart`);
  }

  const md = await readFile(files.markdown, 'utf8');
  for (const r of results.runs) {
    const row = md.split('\n').find((l) => l.startsWith(`| ${r.workload} | ${r.mode} |`) && md.indexOf(l) > md.indexOf(`## Results: ${r.network}`));
    t.ok(row !== undefined, `markdown row for ${r.network} ${r.workload} ${r.mode}`);
  }
  t.match(md, /\| wan \| 20\.00 ms \| 22\.50 ms \| 100\.0 Mbit\/s \| 99\.7 Mbit\/s \|/, 'requested and measured WAN figures side by side');
  t.match(md, /## Speed-up per workload/, 'speed-up section');
  for (const s of results.speedups) t.match(md, new RegExp(`\\| ${s.network} \\| ${s.workload} \\| .* \\| \\*\\*${(s.ratio >= 10 ? s.ratio.toFixed(1) : s.ratio.toFixed(2)).replace('.', '\\.')}×\\*\\* \\|`), `markdown speed-up ${s.network} ${s.workload}`);
  t.match(md, /Test CPU/, 'machine description');
  t.notMatch(md, /\| ideal \|/, 'no ideal column without --ideal');

  // The targets, against arithmetic on the made-up medians.
  const target = (re: RegExp, n: NetworkName) => results.targets.find((c) => re.test(c.target) && c.network === n);
  const few = (n: NetworkName, m: ModeName) => results.runs.find((r) => r.workload === 'large-read-few' && r.network === n && r.mode === m);
  const all = (n: NetworkName, m: ModeName) => results.runs.find((r) => r.workload === 'large-read-all' && r.network === n && r.mode === m);
  const fewLoop = (few('loopback', 'overlayfs')?.median_ms ?? NaN) / (few('loopback', 'soci-ts')?.median_ms ?? NaN);
  t.match(target(/≥ 3× faster/, 'loopback'), { value: fewLoop, limit: 3, kind: 'min', met: fewLoop >= 3 }, `loopback speed-up target (${fewLoop})`);
  const fewWan = (few('wan', 'overlayfs')?.median_ms ?? NaN) / (few('wan', 'soci-ts')?.median_ms ?? NaN);
  t.match(target(/≥ 5× faster/, 'wan'), { value: fewWan, met: fewWan >= 5 }, `WAN speed-up target (${fewWan})`);
  const bytesRatio = (few('wan', 'soci-ts')?.bytes_fetched ?? NaN) / (few('wan', 'soci-ts')?.bytes_read ?? NaN);
  t.match(target(/bytes fetched ≤ 1\.3×/, 'wan'), { value: bytesRatio, met: bytesRatio <= 1.3 }, `bytes target (${bytesRatio})`);
  const readAll = (all('loopback', 'soci-ts')?.median_ms ?? NaN) / (all('loopback', 'overlayfs')?.median_ms ?? NaN);
  t.match(target(/read-everything/, 'loopback'), { value: readAll, limit: 1.2, kind: 'max', met: readAll <= 1.2 }, `read-everything target (${readAll})`);
  t.ok(results.targets.some((c) => c.met === true) && results.targets.some((c) => c.met === false), 'the made-up figures meet some targets and miss others');
  t.match(md, /## The issue's targets/, 'targets section');
  t.match(md, /\| lazy start ≥ 5× faster than the full pull \(WAN\) \| large-read-few \| 4\.50× \| ≥ 5\.00× \| \*\*no\*\* \|/, 'a missed target is marked');

  const table = renderTable(results);
  t.match(table, /speed-up \(overlayfs median \/ soci-ts median\):/, 'terminal table lists the speed-ups');
  t.match(table, /wan: 20\.00 ms RTT, 100\.0 Mbit\/s → 22\.50 ms RTT, 99\.7 Mbit\/s/, 'terminal shows requested → measured');
});

t.test('--ideal adds an ideal bar per workload and the ideal columns', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-report-test-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const results = makeResults({ sociAvailable: true, ideal: true });
  const files = await writeReport(results, dir);
  const b = bars(parseSvg(files.svg));
  t.equal(b.length, WORKLOADS.length * NETWORKS.length * (MODES.length + 1), 'modes plus the ideal');
  const ideal = b.filter((e) => e.attrs['data-mode'] === 'ideal');
  for (const e of ideal) {
    const lazy = results.runs.find((r) => r.network === e.attrs['data-network'] && r.workload === e.attrs['data-workload'] && r.mode === 'soci-ts');
    t.equal(Number(e.attrs['data-ms']), Number((lazy?.ideal_ms ?? NaN).toFixed(1)), `ideal bar of ${e.attrs['data-network']} ${e.attrs['data-workload']} is the lazy bytes at the bandwidth`);
  }
  const md = await readFile(files.markdown, 'utf8');
  t.match(md, /\| network \| workload \| overlayfs \| soci-ts \| speed-up \| ideal \| soci-ts \/ ideal \|/, 'ideal columns in the speed-up table');
  for (const s of results.speedups) t.equal(s.vs_ideal, s.soci_ms / (s.ideal_ms ?? NaN), `soci-ts / ideal of ${s.network} ${s.workload}`);
  t.match(renderTable(results), /IDEAL/, 'terminal table has the ideal column');
});

t.test('an unavailable mode: named with its reason, no numbers, no bar height', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'soci-ts-report-test-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const results = makeResults({ sociAvailable: false, ideal: true, names: ['large-read-few', 'a&b<c"d'] });
  t.same(results.speedups, [], 'no speed-up without the lazy figures');
  const files = await writeReport(results, dir);
  const els = parseSvg(files.svg); // escaping: the odd name still parses
  const b = bars(els);
  t.equal(b.length, 2 * NETWORKS.length * (MODES.length + 1), 'a bar (or its placeholder) per mode per workload, and the ideal');
  const missing = b.filter((e) => e.attrs.class === 'bar missing');
  t.equal(missing.length, 2 * NETWORKS.length * 2, 'soci-ts and ideal are placeholders');
  for (const e of missing) {
    t.equal(e.attrs.height, '0', 'placeholder has no height');
    t.notOk('data-ms' in e.attrs, 'placeholder carries no figure');
  }
  t.ok(b.some((e) => e.attrs['data-workload'] === 'a&b<c"d'), 'the name survives escaping');
  const md = await readFile(files.markdown, 'utf8');
  t.match(md, /\*\*soci-ts: unavailable: this soci-ts has no `rpull` command\*\*/, 'the reason, once, at the top');
  t.notMatch(md, /## Speed-up per workload/, 'no speed-up section');
  const json = JSON.parse(await readFile(files.json, 'utf8')) as ColdstartResults;
  for (const r of json.runs.filter((x) => x.mode === 'soci-ts')) {
    t.equal(r.status, 'unavailable');
    t.equal(r.median_ms, null, 'no median');
    t.equal(r.bytes_fetched, null, 'no bytes');
  }
  t.match(renderTable(results), /loopback large-read-few soci-ts: unavailable: this soci-ts has no `rpull` command/, 'terminal names the reason');
  t.ok(results.targets.length > 0 && results.targets.every((c) => c.value === null && c.met === null), 'targets not measured, not judged');
});

/**
 * The cold-start report from a results object: a terminal table, `results.json`, a markdown
 * report and an SVG bar chart (written by hand: one group per workload and network, one bar
 * per mode — plus the ideal with `--ideal` — with the min–max spread as whiskers, the phases as
 * shading inside the bar, and the speed-up ratio above each group).
 */
import { mkdir, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { ColdstartResults, ModeName, NetworkName, RunSummary, Speedup } from './types.js';

// ---------------------------------------------------------------------------------------
// Formatting

export function fmtMs(ms: number | null | undefined): string {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return '-';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 10_000) return `${(ms / 1000).toFixed(2)} s`;
  return `${(ms / 1000).toFixed(1)} s`;
}

export function fmtBytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !Number.isFinite(n)) return '-';
  if (n < 1e3) return `${Math.round(n)} B`;
  if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
  if (n < 1e9) return `${(n / 1e6).toFixed(1)} MB`;
  return `${(n / 1e9).toFixed(2)} GB`;
}

export const fmtRatio = (r: number | null | undefined): string => (r === null || r === undefined || !Number.isFinite(r) ? '-' : `${r >= 10 ? r.toFixed(1) : r.toFixed(2)}×`);

const fmtMbit = (m: number | null | undefined): string => (m === null || m === undefined || !Number.isFinite(m) ? '-' : m >= 1000 ? `${(m / 1000).toFixed(2)} Gbit/s` : `${m.toFixed(1)} Mbit/s`);

const fmtRtt = (ms: number | null | undefined): string => (ms === null || ms === undefined || !Number.isFinite(ms) ? '-' : ms < 1 ? `${(ms * 1000).toFixed(0)} µs` : `${ms.toFixed(2)} ms`);

function spreadText(r: RunSummary): string {
  if (r.spread_ms === null) return '-';
  return `${fmtMs(r.spread_ms.min)} – ${fmtMs(r.spread_ms.max)}`;
}

function statusText(r: RunSummary): string {
  return r.status === 'ok' ? fmtMs(r.median_ms) : r.status;
}

const speedupFor = (results: ColdstartResults, workload: string, network: NetworkName): Speedup | undefined =>
  results.speedups.find((s) => s.workload === workload && s.network === network);

function orderedRuns(results: ColdstartResults): RunSummary[] {
  const net = (n: NetworkName): number => results.options.networks.indexOf(n);
  const wl = (w: string): number => results.workloads.findIndex((x) => x.name === w);
  const mode = (m: ModeName): number => results.options.modes.indexOf(m);
  return [...results.runs].sort((a, b) => net(a.network) - net(b.network) || wl(a.workload) - wl(b.workload) || mode(a.mode) - mode(b.mode));
}

function pad(rows: string[][]): string {
  const widths = (rows[0] ?? []).map((_, c) => Math.max(...rows.map((r) => [...(r[c] ?? '')].length)));
  return rows.map((r) => r.map((cell, c) => (c === r.length - 1 ? cell : cell + ' '.repeat((widths[c] ?? 0) - [...cell].length))).join('  ').trimEnd()).join('\n');
}

// ---------------------------------------------------------------------------------------
// Terminal

export function renderTable(results: ColdstartResults): string {
  const ideal = results.options.ideal;
  const header = ['NETWORK', 'WORKLOAD', 'MODE', 'RUNS', 'MEDIAN', 'SPREAD (MIN – MAX)', 'PULL', 'CREATE', 'RUN', 'FETCHED', 'IMAGE', ...(ideal ? ['IDEAL'] : []), 'SPEED-UP'];
  const rows: string[][] = [header];
  const notes: string[] = [];
  for (const r of orderedRuns(results)) {
    const s = r.mode === 'soci-ts' ? speedupFor(results, r.workload, r.network) : undefined;
    rows.push([
      r.network,
      r.workload,
      r.mode,
      String(r.runs),
      statusText(r),
      spreadText(r),
      fmtMs(r.pull_ms),
      fmtMs(r.create_ms),
      fmtMs(r.run_ms),
      fmtBytes(r.bytes_fetched),
      fmtBytes(r.image_bytes),
      ...(ideal ? [r.mode === 'soci-ts' ? fmtMs(r.ideal_ms) : ''] : []),
      s === undefined ? '' : fmtRatio(s.ratio),
    ]);
    if (r.status !== 'ok') notes.push(`${r.network} ${r.workload} ${r.mode}: ${r.status}: ${r.reason ?? ''}`);
  }
  const lines = [pad(rows)];
  if (results.speedups.length > 0) {
    lines.push('', 'speed-up (overlayfs median / soci-ts median):');
    for (const s of results.speedups) {
      const idealPart = ideal && s.ideal_ms !== undefined ? `; ideal ${fmtMs(s.ideal_ms)}, soci-ts takes ${fmtRatio(s.vs_ideal)} the ideal` : '';
      lines.push(`  ${s.network} ${s.workload}: ${fmtMs(s.overlayfs_ms)} / ${fmtMs(s.soci_ms)} = ${fmtRatio(s.ratio)}${idealPart}`);
    }
  }
  lines.push('', 'network (requested → measured through the proxy):');
  for (const n of results.networks) {
    const req = n.requested === null ? 'no shaping' : `${fmtRtt(n.requested.rtt_ms)} RTT, ${fmtMbit(n.requested.bandwidth_mbit)}`;
    const got = n.measured === null ? `not measured (${n.measure_error ?? 'unknown'})` : `${fmtRtt(n.measured.rtt_ms)} RTT, ${fmtMbit(n.measured.bandwidth_mbit)}`;
    lines.push(`  ${n.name}: ${req} → ${got}`);
  }
  if (notes.length > 0) lines.push('', ...notes);
  return lines.join('\n') + '\n';
}

// ---------------------------------------------------------------------------------------
// Markdown

const mdCell = (s: string): string => s.replace(/\|/g, '\\|').replace(/\n/g, ' ');
const mdRow = (cells: readonly string[]): string => `| ${cells.map(mdCell).join(' | ')} |`;
const mdTable = (header: readonly string[], rows: readonly (readonly string[])[]): string =>
  [mdRow(header), mdRow(header.map(() => '---')), ...rows.map(mdRow)].join('\n');

export function renderMarkdown(results: ColdstartResults, opts: { chartFile?: string } = {}): string {
  const o = results.options;
  const out: string[] = [];
  out.push('# Cold start: soci-ts (lazy) against overlayfs (full pull)', '');
  out.push(
    `Measured ${results.started_at} on ${results.machine.hostname} (${results.machine.cpus} × ${results.machine.cpu_model}), ` +
      `${o.runs} run${o.runs === 1 ? '' : 's'} per cell, caches emptied between runs; the whole bench took ${(results.duration_s / 60).toFixed(1)} min. ` +
      'Time is from the start of the pull to the ready line on the container\'s stdout; every figure is a median with its min–max spread.',
    '',
  );
  if (opts.chartFile !== undefined) out.push(`![cold start chart](${opts.chartFile})`, '');

  const unavailable = results.modes.filter((m) => !m.available);
  for (const m of unavailable) out.push(`**${m.mode}: unavailable: ${m.reason ?? 'unknown reason'}** (no figures for it below).`, '');

  if (results.speedups.length > 0) {
    out.push('## Speed-up per workload', '');
    out.push(
      mdTable(
        ['network', 'workload', 'overlayfs', 'soci-ts', 'speed-up', ...(o.ideal ? ['ideal', 'soci-ts / ideal'] : [])],
        results.speedups.map((s) => [
          s.network,
          s.workload,
          fmtMs(s.overlayfs_ms),
          fmtMs(s.soci_ms),
          `**${fmtRatio(s.ratio)}**`,
          ...(o.ideal ? [fmtMs(s.ideal_ms), fmtRatio(s.vs_ideal)] : []),
        ]),
      ),
      '',
    );
  }

  if (results.targets.length > 0) {
    out.push("## The issue's targets", '');
    out.push(
      mdTable(
        ['target', 'workload', 'measured', 'limit', 'met'],
        results.targets.map((c) => [c.target, c.workload, c.value === null ? 'not measured' : fmtRatio(c.value), `${c.kind === 'min' ? '≥' : '≤'} ${fmtRatio(c.limit)}`, c.met === null ? '-' : c.met ? 'yes' : '**no**']),
      ),
      '',
    );
  }

  out.push('## Networks', '');
  out.push(
    mdTable(
      ['network', 'requested RTT', 'measured RTT', 'requested bandwidth', 'measured bandwidth', 'how'],
      results.networks.map((n) => [
        n.name,
        n.requested === null ? '-' : fmtRtt(n.requested.rtt_ms),
        n.measured === null ? `not measured: ${n.measure_error ?? ''}` : fmtRtt(n.measured.rtt_ms),
        n.requested === null ? '-' : fmtMbit(n.requested.bandwidth_mbit),
        n.measured === null ? '-' : fmtMbit(n.measured.bandwidth_mbit),
        n.how,
      ]),
    ),
    '',
  );

  for (const net of o.networks) {
    const rows = orderedRuns(results).filter((r) => r.network === net);
    if (rows.length === 0) continue;
    out.push(`## Results: ${net}`, '');
    out.push(
      mdTable(
        ['workload', 'mode', 'runs', 'median', 'spread (min – max)', 'pull / unpack', 'create', 'run to ready', 'fetched', 'read by the command', 'image', ...(o.ideal ? ['ideal'] : []), 'speed-up'],
        rows.map((r) => {
          const s = r.mode === 'soci-ts' ? speedupFor(results, r.workload, r.network) : undefined;
          return [
            r.workload,
            r.mode,
            String(r.runs),
            r.status === 'ok' ? fmtMs(r.median_ms) : r.status === 'unavailable' ? 'unavailable (see above)' : `failed: ${r.reason ?? ''}`,
            spreadText(r),
            fmtMs(r.pull_ms),
            fmtMs(r.create_ms),
            fmtMs(r.run_ms),
            fmtBytes(r.bytes_fetched),
            fmtBytes(r.bytes_read),
            fmtBytes(r.image_bytes),
            ...(o.ideal ? [r.mode === 'soci-ts' ? fmtMs(r.ideal_ms) : ''] : []),
            s === undefined ? '' : fmtRatio(s.ratio),
          ];
        }),
      ),
      '',
    );
  }

  out.push('## Workloads', '');
  out.push(
    mdTable(
      ['workload', 'image', 'layers (indexed)', 'image bytes', 'SOCI index', 'command', 'ready line'],
      results.workloads.map((w) => [
        w.name + (w.description !== undefined ? ` — ${w.description}` : ''),
        w.source,
        `${w.layers.length} (${w.layers.filter((l) => l.indexed).length})`,
        fmtBytes(w.image_bytes),
        w.soci_index ?? `none${w.soci_index_error !== undefined ? `: ${w.soci_index_error}` : ''}`,
        '`' + abbreviate(w.command.join(' '), 160) + '`',
        '`' + w.readyLine + '`',
      ]),
    ),
    '',
  );

  out.push('## Machine', '');
  const m = results.machine;
  out.push(
    mdTable(
      ['', ''],
      [
        ['host', m.hostname],
        ['OS', `${m.os}, kernel ${m.kernel}`],
        ['CPU', `${m.cpus} × ${m.cpu_model}`],
        ['memory', fmtBytes(m.memory_bytes)],
        ['load average (1, 5, 15 min) at start / end', `${m.load_average_start.map((x) => x.toFixed(2)).join(', ')} / ${m.load_average_end.map((x) => x.toFixed(2)).join(', ')}`],
        ['node', m.node],
        ['containerd', m.containerd],
        ['runc', m.runc],
        ['registry', m.registry],
        ['soci-ts', `${m.soci_ts_commit} (inflate: ${m.inflate_engine})`],
      ],
    ),
    '',
  );

  out.push('## Method', '', ...results.method.map((l) => `- ${l}`), '');
  return out.join('\n');
}

function abbreviate(s: string, n: number): string {
  return s.length <= n ? s : `${s.slice(0, n - 1)}…`;
}

// ---------------------------------------------------------------------------------------
// SVG

const xml = (s: string): string => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');

const MODE_COLORS: Record<string, string> = { overlayfs: '#7f8c9a', 'soci-ts': '#2b7bd6', ideal: '#5cb85c' };

/** A "nice" axis maximum and tick step for values up to `max`. */
function niceAxis(max: number): { top: number; step: number } {
  if (!(max > 0)) return { top: 1, step: 0.2 };
  const raw = max / 5;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= raw) ?? 10 * mag;
  return { top: Math.ceil(max / step) * step, step };
}

interface BarSpec {
  label: string;
  color: string;
  run?: RunSummary;
  ms: number | null;
  mode: string;
}

export function renderSvg(results: ColdstartResults): string {
  const o = results.options;
  const workloads = results.workloads.map((w) => w.name);
  const networks = o.networks.filter((n) => results.runs.some((r) => r.network === n));
  const barKinds: string[] = [...o.modes, ...(o.ideal && o.modes.includes('soci-ts') ? ['ideal'] : [])];
  const W = 980;
  const panelH = 330;
  const top = 84;
  const left = 70;
  const right = 20;
  const plotW = W - left - right;
  const plotH = 210;
  const H = top + networks.length * panelH + 20;
  const parts: string[] = [];
  parts.push(`<?xml version="1.0" encoding="UTF-8"?>`);
  parts.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="12">`);
  parts.push(`<rect x="0" y="0" width="${W}" height="${H}" fill="#ffffff"/>`);
  parts.push(`<text x="${W / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">${xml(`Cold start: pull to ready line (median of ${o.runs} run${o.runs === 1 ? '' : 's'}; whiskers: min–max)`)}</text>`);
  // Legend
  let lx = left;
  for (const k of barKinds) {
    parts.push(`<rect class="legend" x="${lx}" y="38" width="14" height="14" fill="${MODE_COLORS[k] ?? '#999'}"/>`);
    const label = k === 'ideal' ? 'ideal (lazy bytes at the bandwidth)' : k;
    parts.push(`<text x="${lx + 20}" y="50">${xml(label)}</text>`);
    lx += 40 + label.length * 7;
  }
  parts.push(`<text x="${left}" y="70" fill="#555">${xml('shading inside a bar, bottom up: pull / create / run to ready (medians, scaled to the bar)')}</text>`);

  networks.forEach((net, ni) => {
    const y0 = top + ni * panelH;
    const netInfo = results.networks.find((n) => n.name === net);
    const netLabel =
      netInfo === undefined
        ? net
        : `${net}${netInfo.requested !== null ? ` (requested ${fmtRtt(netInfo.requested.rtt_ms)} RTT, ${fmtMbit(netInfo.requested.bandwidth_mbit)}` : ' ('}${netInfo.measured !== null ? `${netInfo.requested !== null ? '; ' : ''}measured ${fmtRtt(netInfo.measured.rtt_ms)}, ${fmtMbit(netInfo.measured.bandwidth_mbit)})` : ')'}`;
    parts.push(`<g class="panel" data-network="${xml(net)}">`);
    parts.push(`<text x="${left}" y="${y0 + 16}" font-size="14" font-weight="bold">${xml(netLabel)}</text>`);
    const bars: BarSpec[][] = workloads.map((w) =>
      barKinds.map((k) => {
        if (k === 'ideal') {
          const lazy = results.runs.find((r) => r.workload === w && r.network === net && r.mode === 'soci-ts');
          return { label: 'ideal', color: MODE_COLORS.ideal ?? '#5cb85c', ms: lazy?.status === 'ok' ? (lazy.ideal_ms ?? null) : null, mode: 'ideal' };
        }
        const run = results.runs.find((r) => r.workload === w && r.network === net && r.mode === k);
        return { label: k, color: MODE_COLORS[k] ?? '#999', run, ms: run?.status === 'ok' ? run.median_ms : null, mode: k };
      }),
    );
    const maxVal = Math.max(0, ...bars.flat().map((b) => Math.max(b.ms ?? 0, b.run?.spread_ms?.max ?? 0)));
    const axis = niceAxis(maxVal / 1000);
    const plotTop = y0 + 40;
    const yOf = (seconds: number): number => plotTop + plotH - (seconds / axis.top) * plotH;
    // Axis and grid
    for (let v = 0; v <= axis.top + 1e-9; v += axis.step) {
      const y = yOf(v);
      parts.push(`<line x1="${left}" y1="${y.toFixed(1)}" x2="${left + plotW}" y2="${y.toFixed(1)}" stroke="#e3e3e3"/>`);
      parts.push(`<text x="${left - 6}" y="${(y + 4).toFixed(1)}" text-anchor="end" fill="#555">${xml(`${Number(v.toFixed(3))} s`)}</text>`);
    }
    parts.push(`<line x1="${left}" y1="${plotTop}" x2="${left}" y2="${plotTop + plotH}" stroke="#333"/>`);
    parts.push(`<line x1="${left}" y1="${plotTop + plotH}" x2="${left + plotW}" y2="${plotTop + plotH}" stroke="#333"/>`);
    const groupW = plotW / Math.max(1, workloads.length);
    workloads.forEach((w, wi) => {
      const gx = left + wi * groupW;
      const barW = Math.min(70, (groupW * 0.7) / Math.max(1, barKinds.length));
      const gap = (groupW - barW * barKinds.length) / 2;
      parts.push(`<g class="group" data-workload="${xml(w)}">`);
      (bars[wi] ?? []).forEach((b, bi) => {
        const x = gx + gap + bi * barW;
        const attrs = `data-network="${xml(net)}" data-workload="${xml(w)}" data-mode="${xml(b.mode)}"`;
        if (b.ms === null) {
          const why = b.run?.status ?? 'unavailable';
          parts.push(`<rect class="bar missing" ${attrs} data-status="${xml(why)}" x="${(x + 2).toFixed(1)}" y="${plotTop + plotH}" width="${(barW - 4).toFixed(1)}" height="0" fill="none"/>`);
          parts.push(`<text x="${(x + barW / 2).toFixed(1)}" y="${plotTop + plotH - 6}" text-anchor="middle" fill="#a33" font-size="10">${xml(why)}</text>`);
          return;
        }
        const h = (b.ms / 1000 / axis.top) * plotH;
        const y = plotTop + plotH - h;
        parts.push(`<rect class="bar" ${attrs} data-ms="${b.ms.toFixed(1)}" x="${(x + 2).toFixed(1)}" y="${y.toFixed(1)}" width="${(barW - 4).toFixed(1)}" height="${h.toFixed(1)}" fill="${b.color}"><title>${xml(`${w} / ${b.label}: ${fmtMs(b.ms)}`)}</title></rect>`);
        const r = b.run;
        if (r !== undefined) {
          // Phase shading, bottom up: pull, create, run.
          const phases = [r.pull_ms ?? 0, r.create_ms ?? 0, r.run_ms ?? 0];
          const sum = phases.reduce((a, c) => a + c, 0);
          if (sum > 0) {
            let yy = plotTop + plotH;
            phases.forEach((p, pi) => {
              const ph = (p / sum) * h;
              yy -= ph;
              parts.push(`<rect class="segment" data-phase="${['pull', 'create', 'run'][pi]}" x="${(x + 2).toFixed(1)}" y="${yy.toFixed(1)}" width="${(barW - 4).toFixed(1)}" height="${ph.toFixed(1)}" fill="#000000" fill-opacity="${[0.25, 0.1, 0][pi]}"/>`);
            });
          }
          if (r.spread_ms !== null) {
            const cx = x + barW / 2;
            const y1 = yOf(r.spread_ms.min / 1000);
            const y2 = yOf(r.spread_ms.max / 1000);
            parts.push(`<line class="whisker" x1="${cx.toFixed(1)}" y1="${y1.toFixed(1)}" x2="${cx.toFixed(1)}" y2="${y2.toFixed(1)}" stroke="#222"/>`);
            parts.push(`<line class="whisker" x1="${(cx - 5).toFixed(1)}" y1="${y2.toFixed(1)}" x2="${(cx + 5).toFixed(1)}" y2="${y2.toFixed(1)}" stroke="#222"/>`);
            parts.push(`<line class="whisker" x1="${(cx - 5).toFixed(1)}" y1="${y1.toFixed(1)}" x2="${(cx + 5).toFixed(1)}" y2="${y1.toFixed(1)}" stroke="#222"/>`);
          }
        }
        const labelY = Math.min(y, r?.spread_ms ? yOf(r.spread_ms.max / 1000) : y) - 4;
        parts.push(`<text class="value" x="${(x + barW / 2).toFixed(1)}" y="${labelY.toFixed(1)}" text-anchor="middle" font-size="10">${xml(fmtMs(b.ms))}</text>`);
      });
      parts.push(`<text x="${(gx + groupW / 2).toFixed(1)}" y="${plotTop + plotH + 18}" text-anchor="middle" font-weight="bold">${xml(w)}</text>`);
      const s = speedupFor(results, w, net);
      const sText = s === undefined ? 'speed-up: -' : `soci-ts ${fmtRatio(s.ratio)} ${s.ratio >= 1 ? 'faster' : '(slower)'}`;
      parts.push(`<text class="speedup" data-workload="${xml(w)}" data-network="${xml(net)}" x="${(gx + groupW / 2).toFixed(1)}" y="${plotTop + plotH + 36}" text-anchor="middle" fill="${s !== undefined && s.ratio >= 1 ? '#1d6b1d' : '#555'}">${xml(sText)}</text>`);
      parts.push('</g>');
    });
    parts.push('</g>');
  });
  parts.push('</svg>');
  return parts.join('\n') + '\n';
}

// ---------------------------------------------------------------------------------------
// Files

export interface WrittenReport {
  json: string;
  markdown: string;
  svg: string;
}

async function writeFileAtomic(path: string, text: string): Promise<void> {
  const tmp = `${path}.${process.pid}.tmp`;
  await writeFile(tmp, text);
  await rename(tmp, path);
}

/** Writes DIR/results.json, DIR/report.md and DIR/chart.svg. */
export async function writeReport(results: ColdstartResults, dir: string): Promise<WrittenReport> {
  await mkdir(dir, { recursive: true });
  const out = { json: join(dir, 'results.json'), markdown: join(dir, 'report.md'), svg: join(dir, 'chart.svg') };
  await writeFileAtomic(out.json, JSON.stringify(results, null, 2) + '\n');
  await writeFileAtomic(out.svg, renderSvg(results));
  await writeFileAtomic(out.markdown, renderMarkdown(results, { chartFile: 'chart.svg' }));
  return out;
}

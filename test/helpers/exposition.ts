/**
 * A strict parser of the Prometheus text exposition format (0.0.4), written from the format's
 * description independently of daemon/metrics.ts, as the oracle of the metrics tests. It
 * rejects (ExpositionError naming the line) what a careful scraper would:
 *
 * - a HELP or TYPE line for a name seen in a HELP/TYPE line before (each at most once), a TYPE
 *   after samples of its family, an unknown type;
 * - a sample that belongs to no family with both HELP and TYPE (when `requireHelpAndType`,
 *   the default): a family is the most recent HELP/TYPE name, and its samples are the name
 *   itself (counter, gauge, untyped), `_bucket`/`_sum`/`_count` (histogram), or the name,
 *   `_sum`, `_count` (summary);
 * - samples of a family that are not contiguous (the family came up again later);
 * - a malformed metric or label name, a label value with an unknown escape, a label named
 *   twice in one sample, a value that is not a Go float (`NaN`, `+Inf`, `-Inf` spelled so),
 *   a repeated series (same name and label set);
 * - histograms whose buckets per label set are not strictly increasing in `le`, do not end in
 *   `+Inf`, have decreasing counts, or whose `_count` differs from the `+Inf` bucket or lack
 *   `_sum`/`_count`; counters with negative values.
 */
export class ExpositionError extends Error {
  constructor(
    readonly lineNo: number,
    reason: string,
    readonly line: string,
  ) {
    super(`line ${lineNo}: ${reason}: ${JSON.stringify(line.slice(0, 300))}`);
    this.name = 'ExpositionError';
  }
}

export type MetricType = 'counter' | 'gauge' | 'histogram' | 'summary' | 'untyped';

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export interface MetricFamily {
  name: string;
  help: string | undefined;
  type: MetricType | undefined;
  samples: Sample[];
}

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set<MetricType>(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

function parseValue(text: string): number | undefined {
  if (text === 'NaN') return Number.NaN;
  if (text === '+Inf' || text === 'Inf') return Number.POSITIVE_INFINITY;
  if (text === '-Inf') return Number.NEGATIVE_INFINITY;
  if (!/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(text)) return undefined;
  return Number(text);
}

function memberOf(family: MetricFamily, sampleName: string): boolean {
  const n = family.name;
  switch (family.type) {
    case 'histogram':
      return sampleName === `${n}_bucket` || sampleName === `${n}_sum` || sampleName === `${n}_count`;
    case 'summary':
      return sampleName === n || sampleName === `${n}_sum` || sampleName === `${n}_count`;
    default:
      return sampleName === n;
  }
}

/** Parses `name{a="b",...} value [timestamp]`. */
function parseSample(line: string, lineNo: number): Sample {
  const m = /^([^{\s]+)/.exec(line);
  if (m === null || !NAME.test(m[1]!)) throw new ExpositionError(lineNo, 'bad metric name', line);
  const name = m[1]!;
  let i = name.length;
  const labels: Record<string, string> = {};
  if (line[i] === '{') {
    i++;
    for (;;) {
      if (line[i] === '}') {
        i++;
        break;
      }
      const eq = line.indexOf('=', i);
      if (eq < 0) throw new ExpositionError(lineNo, 'label without =', line);
      const ln = line.slice(i, eq);
      if (!LABEL.test(ln)) throw new ExpositionError(lineNo, `bad label name ${JSON.stringify(ln)}`, line);
      if (Object.hasOwn(labels, ln)) throw new ExpositionError(lineNo, `label ${ln} twice`, line);
      if (line[eq + 1] !== '"') throw new ExpositionError(lineNo, 'label value not quoted', line);
      let j = eq + 2;
      let v = '';
      for (;;) {
        const c = line[j];
        if (c === undefined) throw new ExpositionError(lineNo, 'unterminated label value', line);
        if (c === '"') break;
        if (c === '\\') {
          const e = line[j + 1];
          if (e === '\\') v += '\\';
          else if (e === '"') v += '"';
          else if (e === 'n') v += '\n';
          else throw new ExpositionError(lineNo, `unknown escape \\${e ?? ''}`, line);
          j += 2;
          continue;
        }
        v += c;
        j++;
      }
      labels[ln] = v;
      i = j + 1;
      if (line[i] === ',') i++;
      else if (line[i] !== '}') throw new ExpositionError(lineNo, 'expected , or } after a label', line);
    }
  }
  if (line[i] !== ' ') throw new ExpositionError(lineNo, 'no space before the value', line);
  const parts = line.slice(i + 1).split(' ');
  if (parts.length < 1 || parts.length > 2) throw new ExpositionError(lineNo, 'expected a value and at most a timestamp', line);
  const value = parseValue(parts[0]!);
  if (value === undefined) throw new ExpositionError(lineNo, `bad value ${JSON.stringify(parts[0])}`, line);
  if (parts[1] !== undefined && !/^-?\d+$/.test(parts[1])) throw new ExpositionError(lineNo, 'bad timestamp', line);
  return { name, labels, value };
}

function seriesKey(s: Sample): string {
  return `${s.name}{${Object.keys(s.labels)
    .sort()
    .map((k) => `${k}=${JSON.stringify(s.labels[k])}`)
    .join(',')}}`;
}

function checkHistogram(f: MetricFamily): void {
  const groups = new Map<string, { buckets: Array<{ le: number; count: number }>; sum?: number; count?: number }>();
  for (const s of f.samples) {
    const rest = { ...s.labels };
    delete rest.le;
    const key = seriesKey({ name: '', labels: rest, value: 0 });
    let g = groups.get(key);
    if (g === undefined) {
      g = { buckets: [] };
      groups.set(key, g);
    }
    if (s.name.endsWith('_bucket')) {
      const le = s.labels.le === undefined ? undefined : parseValue(s.labels.le);
      if (le === undefined || Number.isNaN(le)) throw new Error(`${f.name}: bucket without a numeric le (${JSON.stringify(s.labels)})`);
      g.buckets.push({ le, count: s.value });
    } else if (s.name.endsWith('_sum')) g.sum = s.value;
    else g.count = s.value;
  }
  for (const [key, g] of groups) {
    const b = g.buckets;
    if (b.length === 0 || b[b.length - 1]!.le !== Number.POSITIVE_INFINITY) throw new Error(`${f.name}${key}: buckets do not end in +Inf`);
    for (let i = 1; i < b.length; i++) {
      if (!(b[i]!.le > b[i - 1]!.le)) throw new Error(`${f.name}${key}: le not increasing`);
      if (b[i]!.count < b[i - 1]!.count) throw new Error(`${f.name}${key}: bucket counts decrease`);
    }
    if (g.sum === undefined || g.count === undefined) throw new Error(`${f.name}${key}: no _sum or _count`);
    if (g.count !== b[b.length - 1]!.count) throw new Error(`${f.name}${key}: _count ${g.count} is not the +Inf bucket's ${b[b.length - 1]!.count}`);
  }
}

export function parseExposition(text: string, opts: { requireHelpAndType?: boolean } = {}): Map<string, MetricFamily> {
  const strict = opts.requireHelpAndType !== false;
  const families = new Map<string, MetricFamily>();
  const helpSeen = new Set<string>();
  const typeSeen = new Set<string>();
  const closed = new Set<string>();
  const series = new Set<string>();
  let current: MetricFamily | undefined;
  const open = (name: string): MetricFamily => {
    if (current !== undefined && current.name !== name) closed.add(current.name);
    if (closed.has(name)) throw new Error(`family ${name} comes up again after other families`);
    let f = families.get(name);
    if (f === undefined) {
      f = { name, help: undefined, type: undefined, samples: [] };
      families.set(name, f);
    }
    current = f;
    return f;
  };
  const lines = text.split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  lines.forEach((line, idx) => {
    const lineNo = idx + 1;
    if (line === '') return;
    if (line.startsWith('#')) {
      const m = /^# (HELP|TYPE) (\S+)(?: (.*))?$/.exec(line);
      if (m === null) return; // a comment
      const [, what, name, rest] = m as unknown as [string, string, string, string | undefined];
      if (!NAME.test(name)) throw new ExpositionError(lineNo, 'bad metric name', line);
      let f: MetricFamily;
      try {
        f = current?.name === name ? current : open(name);
      } catch (e) {
        throw new ExpositionError(lineNo, (e as Error).message, line);
      }
      if (what === 'HELP') {
        if (helpSeen.has(name)) throw new ExpositionError(lineNo, `second HELP for ${name}`, line);
        helpSeen.add(name);
        const help = rest ?? '';
        if (/\\[^\\n]/.test(help.replace(/\\\\/g, ''))) throw new ExpositionError(lineNo, 'unknown escape in HELP', line);
        f.help = help.replace(/\\(\\|n)/g, (_, c: string) => (c === 'n' ? '\n' : '\\'));
      } else {
        if (typeSeen.has(name)) throw new ExpositionError(lineNo, `second TYPE for ${name}`, line);
        if (f.samples.length > 0) throw new ExpositionError(lineNo, `TYPE for ${name} after its samples`, line);
        typeSeen.add(name);
        if (!TYPES.has(rest as MetricType)) throw new ExpositionError(lineNo, `unknown type ${JSON.stringify(rest)}`, line);
        f.type = rest as MetricType;
      }
      return;
    }
    const s = parseSample(line, lineNo);
    let f: MetricFamily;
    if (current !== undefined && memberOf(current, s.name)) f = current;
    else {
      if (strict) throw new ExpositionError(lineNo, `sample of no HELP/TYPE block (the open block is ${current?.name ?? 'none'})`, line);
      try {
        f = open(s.name);
      } catch (e) {
        throw new ExpositionError(lineNo, (e as Error).message, line);
      }
    }
    if (strict && (f.help === undefined || f.type === undefined)) throw new ExpositionError(lineNo, `family ${f.name} lacks ${f.help === undefined ? 'HELP' : 'TYPE'}`, line);
    const key = seriesKey(s);
    if (series.has(key)) throw new ExpositionError(lineNo, 'repeated series', line);
    series.add(key);
    if (f.type === 'counter' && s.value < 0) throw new ExpositionError(lineNo, 'negative counter', line);
    f.samples.push(s);
  });
  for (const f of families.values()) if (f.type === 'histogram') checkHistogram(f);
  return families;
}

/** The samples of `family` (the sample name, e.g. `x_bucket`, when given) whose labels include `match`. */
export function samples(families: Map<string, MetricFamily>, family: string, match: Record<string, string> = {}, sampleName?: string): Sample[] {
  const f = families.get(family);
  if (f === undefined) return [];
  return f.samples.filter((s) => (sampleName === undefined || s.name === sampleName) && Object.entries(match).every(([k, v]) => s.labels[k] === v));
}

/** The one sample matching, or undefined (throws when several match). */
export function value(families: Map<string, MetricFamily>, family: string, match: Record<string, string> = {}, sampleName?: string): number | undefined {
  const found = samples(families, family, match, sampleName);
  if (found.length > 1) throw new Error(`${family} ${JSON.stringify(match)}: ${found.length} samples match`);
  return found[0]?.value;
}

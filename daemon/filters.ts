/**
 * containerd's filter syntax (package `filters`), as `List` receives it:
 *
 *   selectors := selector ("," selector)*        all must match
 *   selector  := fieldpath [operator value]     no operator: the field is present
 *   fieldpath := field ("." field)*
 *   field     := quoted | [A-Za-z0-9_-]+
 *   operator  := "==" | "!=" | "~="             equal, not equal, regular expression
 *   value     := quoted | [^\s,]+
 *   quoted    := "..." (Go escapes) | /.../ | |...|
 *
 * Several filter strings match when any of them does. A snapshot exposes the fields
 * `name`, `parent`, `kind` (`active`, `committed`, `view`) and `labels.<key>` (a key with dots
 * is written as several fields or quoted).
 */
import { invalidArgument, type SnapshotterError } from './errdefs.js';

/** Looks a field path up on the object being matched: its value, or undefined when absent. */
export type FieldLookup = (fieldpath: readonly string[]) => string | undefined;

export type Filter = (lookup: FieldLookup) => boolean;

type Operator = 'present' | '==' | '!=' | '~=';

interface Selector {
  fieldpath: string[];
  op: Operator;
  value: string;
  re?: RegExp;
}

class FilterSyntaxError extends Error {}

const isFieldChar = (c: string): boolean => /^[A-Za-z0-9_-]$/.test(c);
const isQuote = (c: string): boolean => c === '"' || c === '/' || c === '|';
const isSpace = (c: string): boolean => /^\s$/u.test(c);

class Parser {
  private pos = 0;

  constructor(private readonly input: string) {}

  private fail(msg: string): never {
    const at = Math.min(this.pos, this.input.length);
    throw new FilterSyntaxError(`parse error at offset ${at} of ${JSON.stringify(this.input)}: ${msg}`);
  }

  private skipSpace(): void {
    while (this.pos < this.input.length && isSpace(this.input[this.pos])) this.pos++;
  }

  private peek(): string | undefined {
    this.skipSpace();
    return this.input[this.pos];
  }

  parse(): Selector[] {
    const out: Selector[] = [this.selector()];
    for (;;) {
      const c = this.peek();
      if (c === undefined) return out;
      if (c !== ',') this.fail(`unexpected input ${JSON.stringify(c)}`);
      this.pos++;
      out.push(this.selector());
    }
  }

  private selector(): Selector {
    const fieldpath = [this.field()];
    while (this.peek() === '.') {
      this.pos++;
      fieldpath.push(this.field());
    }
    const c = this.peek();
    if (c === undefined || c === ',') return { fieldpath, op: 'present', value: '' };
    const op = this.operator();
    const value = this.value();
    const sel: Selector = { fieldpath, op, value };
    if (op === '~=') {
      try {
        sel.re = new RegExp(value, 'u');
      } catch (e) {
        this.fail(`bad regular expression ${JSON.stringify(value)}: ${(e as Error).message}`);
      }
    }
    return sel;
  }

  private field(): string {
    const c = this.peek();
    if (c === undefined) this.fail('expected a field, found the end');
    if (isQuote(c)) return this.quoted();
    const start = this.pos;
    while (this.pos < this.input.length && isFieldChar(this.input[this.pos])) this.pos++;
    if (this.pos === start) this.fail(`expected a field or a quoted string, found ${JSON.stringify(c)}`);
    return this.input.slice(start, this.pos);
  }

  private operator(): Operator {
    this.skipSpace();
    const start = this.pos;
    while (this.pos < this.input.length && '=!~'.includes(this.input[this.pos])) this.pos++;
    const op = this.input.slice(start, this.pos);
    if (op === '==' || op === '!=' || op === '~=') return op;
    this.pos = start;
    return this.fail(op === '' ? 'expected an operator ("==", "!=" or "~=")' : `unsupported operator ${JSON.stringify(op)}`);
  }

  private value(): string {
    const c = this.peek();
    if (c === undefined) this.fail('expected a value, found the end');
    if (isQuote(c)) return this.quoted();
    const start = this.pos;
    while (this.pos < this.input.length && this.input[this.pos] !== ',' && !isSpace(this.input[this.pos])) this.pos++;
    return this.input.slice(start, this.pos);
  }

  /** A quoted string starting at pos: Go escapes inside "..."; /.../ and |...| only escape their quote and backslash. */
  private quoted(): string {
    const q = this.input[this.pos];
    this.pos++;
    let out = '';
    for (;;) {
      const c = this.input[this.pos];
      if (c === undefined || c === '\n') this.fail('quoted string not terminated');
      this.pos++;
      if (c === q) return out;
      if (c !== '\\') {
        out += c;
        continue;
      }
      const e = this.input[this.pos];
      if (e === undefined) this.fail('quoted string not terminated');
      this.pos++;
      if (e === q || e === '\\') {
        out += q !== '"' && e === '\\' ? '\\\\' : e;
        continue;
      }
      if (q !== '"') {
        // In /regex/ and |regex| other escapes belong to the regular expression.
        out += `\\${e}`;
        continue;
      }
      const simple: Record<string, string> = { a: '\x07', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t', v: '\v' };
      if (simple[e] !== undefined) {
        out += simple[e];
        continue;
      }
      const digits = (n: number, base: number): number => {
        const text = this.input.slice(this.pos, this.pos + n);
        const re = base === 8 ? /^[0-7]+$/ : /^[0-9a-fA-F]+$/;
        if (text.length !== n || !re.test(text)) this.fail(`illegal escape sequence \\${e}${text}`);
        this.pos += n;
        return parseInt(text, base);
      };
      if (e >= '0' && e <= '7') {
        this.pos--;
        out += String.fromCharCode(digits(3, 8));
      } else if (e === 'x') out += String.fromCharCode(digits(2, 16));
      else if (e === 'u') out += String.fromCodePoint(digits(4, 16));
      else if (e === 'U') out += String.fromCodePoint(digits(8, 16));
      else this.fail(`illegal escape sequence \\${e}`);
    }
  }
}

function matches(sel: Selector, lookup: FieldLookup): boolean {
  const v = lookup(sel.fieldpath);
  switch (sel.op) {
    case 'present':
      return v !== undefined;
    case '==':
      return v !== undefined && v === sel.value;
    case '!=':
      // As containerd: an absent field counts as the empty string here.
      return (v ?? '') !== sel.value;
    case '~=':
      return v !== undefined && sel.re !== undefined && sel.re.test(v);
  }
}

/** One filter string: all its selectors must match. An empty string matches everything. */
export function parseFilter(text: string): Filter {
  if (text === '') return () => true;
  const sels = new Parser(text).parse();
  return (lookup) => sels.every((s) => matches(s, lookup));
}

/**
 * Any of `filters` must match (all objects when there are none). A syntax error is an
 * InvalidArgument error naming the filter.
 */
export function parseFilters(filters: readonly string[]): Filter {
  if (filters.length === 0) return () => true;
  let parsed: Filter[];
  try {
    parsed = filters.map(parseFilter);
  } catch (e) {
    if (e instanceof FilterSyntaxError) throw invalidArgument(`filters: ${e.message}`) as SnapshotterError;
    throw e;
  }
  return (lookup) => parsed.some((f) => f(lookup));
}

/**
 * `FileMetadata.modTime` text: Go's `time.Time.MarshalText` (RFC 3339 with up
 * to nine fractional digits, trailing zeros trimmed). We always write UTC
 * (`Z`); upstream writes the build machine's zone, so readers accept offsets.
 */

import { ZtocFormatError } from './errors.js';

/** 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z: the years MarshalText can write. */
export const MIN_MODTIME_SECONDS = -62167219200;
export const MAX_MODTIME_SECONDS = 253402300799;

const MIN_BIG = BigInt(MIN_MODTIME_SECONDS);
const MAX_BIG = BigInt(MAX_MODTIME_SECONDS);

/** Whether `seconds` since the epoch falls in years 0000–9999 (UTC). */
export function modTimeInRange(seconds: number | bigint): boolean {
  return typeof seconds === 'bigint'
    ? seconds >= MIN_BIG && seconds <= MAX_BIG
    : seconds >= MIN_MODTIME_SECONDS && seconds <= MAX_MODTIME_SECONDS;
}

/**
 * Formats a Unix time as Go's MarshalText does, in UTC.
 * Go refuses years outside 0000–9999 (MarshalText fails, upstream then writes
 * an empty string); we throw instead so that no unreadable zTOC is produced.
 */
export function formatModTime(seconds: bigint, nanos: number): string {
  if (!modTimeInRange(seconds)) {
    throw new ZtocFormatError('mod_time', `${seconds}s since the epoch is outside years 0000-9999`);
  }
  return formatModTimeNumber(Number(seconds), nanos);
}

/** `formatModTime` for callers that already checked the range (no BigInt per entry). */
export function formatModTimeNumber(seconds: number, nanos: number): string {
  if (!Number.isInteger(nanos) || nanos < 0 || nanos > 999_999_999) {
    throw new ZtocFormatError('mod_time', `nanoseconds ${nanos} outside 0-999999999`);
  }
  if (!Number.isSafeInteger(seconds) || !modTimeInRange(seconds)) {
    throw new ZtocFormatError('mod_time', `${seconds}s since the epoch is outside years 0000-9999`);
  }
  const days = Math.floor(seconds / 86400);
  const secOfDay = seconds - days * 86400;
  const { year, month, day } = civilFromDays(days);
  const hh = Math.floor(secOfDay / 3600);
  const mm = Math.floor((secOfDay % 3600) / 60);
  const ss = secOfDay % 60;
  let text = `${pad(year, 4)}-${pad(month, 2)}-${pad(day, 2)}T${pad(hh, 2)}:${pad(mm, 2)}:${pad(ss, 2)}`;
  if (nanos !== 0) {
    let frac = pad(nanos, 9);
    let end = frac.length;
    while (frac.charCodeAt(end - 1) === 0x30) end--;
    frac = frac.slice(0, end);
    text += '.' + frac;
  }
  return text + 'Z';
}

const RFC3339 = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:(Z)|([+-])(\d{2}):(\d{2}))$/;

/**
 * Parses RFC 3339 text as Go's `time.Time.UnmarshalText` does: `T` and `Z`
 * upper case, any number of fractional digits (beyond nine truncated), zones
 * `Z` or `±hh:mm`. Returns the UTC instant.
 */
export function parseModTime(text: string): { seconds: bigint; nanos: number } {
  const m = RFC3339.exec(text);
  if (m === null) throw badModTime(text, 'not RFC 3339 (YYYY-MM-DDThh:mm:ss[.frac](Z|±hh:mm))');
  const year = Number(m[1]);
  const month = Number(m[2]);
  const day = Number(m[3]);
  const hour = Number(m[4]);
  const minute = Number(m[5]);
  const second = Number(m[6]);
  if (month < 1 || month > 12) throw badModTime(text, 'month out of range');
  if (day < 1 || day > daysInMonth(year, month)) throw badModTime(text, 'day out of range');
  if (hour > 23) throw badModTime(text, 'hour out of range');
  if (minute > 59) throw badModTime(text, 'minute out of range');
  if (second > 59) throw badModTime(text, 'second out of range');
  let nanos = 0;
  if (m[7] !== undefined) nanos = Number(m[7].slice(0, 9).padEnd(9, '0'));
  let offset = 0;
  if (m[8] === undefined) {
    const zh = Number(m[10]);
    const zm = Number(m[11]);
    if (zh > 23) throw badModTime(text, 'zone offset hour out of range');
    if (zm > 59) throw badModTime(text, 'zone offset minute out of range');
    offset = (zh * 3600 + zm * 60) * (m[9] === '-' ? -1 : 1);
  }
  const local = daysFromCivil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second;
  return { seconds: BigInt(local - offset), nanos };
}

function badModTime(text: string, reason: string): ZtocFormatError {
  return new ZtocFormatError('mod_time', `${JSON.stringify(text)}: ${reason}`);
}

function pad(n: number, width: number): string {
  return String(n).padStart(width, '0');
}

function isLeap(y: number): boolean {
  return (y % 4 === 0 && y % 100 !== 0) || y % 400 === 0;
}

function daysInMonth(y: number, m: number): number {
  if (m === 2) return isLeap(y) ? 29 : 28;
  return m === 4 || m === 6 || m === 9 || m === 11 ? 30 : 31;
}

// Howard Hinnant's proleptic Gregorian day algorithms (exact for any year).
function civilFromDays(days: number): { year: number; month: number; day: number } {
  const z = days + 719468;
  const era = Math.floor(z / 146097);
  const doe = z - era * 146097;
  const yoe = Math.floor((doe - Math.floor(doe / 1460) + Math.floor(doe / 36524) - Math.floor(doe / 146096)) / 365);
  const doy = doe - (365 * yoe + Math.floor(yoe / 4) - Math.floor(yoe / 100));
  const mp = Math.floor((5 * doy + 2) / 153);
  const day = doy - Math.floor((153 * mp + 2) / 5) + 1;
  const month = mp < 10 ? mp + 3 : mp - 9;
  const year = yoe + era * 400 + (month <= 2 ? 1 : 0);
  return { year, month, day };
}

function daysFromCivil(year: number, month: number, day: number): number {
  const y = month <= 2 ? year - 1 : year;
  const era = Math.floor(y / 400);
  const yoe = y - era * 400;
  const mp = month > 2 ? month - 3 : month + 9;
  const doy = Math.floor((153 * mp + 2) / 5) + day - 1;
  const doe = yoe * 365 + Math.floor(yoe / 4) - Math.floor(yoe / 100) + doy;
  return era * 146097 + doe - 719468;
}

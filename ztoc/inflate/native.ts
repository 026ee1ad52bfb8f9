/**
 * The native inflate engine: ztoc/native/zinflate.c, a N-API addon over zlib.
 * Optional: when the addon has not been built, loadNativeEngine() returns
 * undefined and callers fall back to pako.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { InflateEngine, InflateStep, Inflater } from './engine.js';

/** Opaque z_stream handle created by the addon. */
declare const handleBrand: unique symbol;
type Handle = { readonly [handleBrand]: true };

/** The addon's exports (see the calling convention in zinflate.c). */
interface ZinflateAddon {
  create(windowBits: number): Handle;
  inflate(
    handle: Handle,
    input: Uint8Array,
    inStart: number,
    inEnd: number,
    output: Uint8Array,
    outStart: number,
    outEnd: number,
    flush: number,
    result: Int32Array,
  ): void;
  /** Absent from addons built before it existed. */
  inflateAsync?(
    handle: Handle,
    input: Uint8Array,
    inStart: number,
    inEnd: number,
    output: Uint8Array,
    outStart: number,
    outEnd: number,
    flush: number,
    result: Int32Array,
    callback: (err: Error | null) => void,
  ): void;
  reset(handle: Handle, windowBits: number): number;
  prime(handle: Handle, bits: number, value: number): number;
  setDictionary(handle: Handle, dictionary: Uint8Array): number;
  end(handle: Handle): void;
  readonly zlibVersion: string;
}

const PACKAGE_NAME = 'soci-ts';
const ADDON_PATH = ['ztoc', 'native', 'build', 'Release', 'zinflate.node'];

/**
 * The repository root: the nearest ancestor holding soci-ts's package.json.
 * This module runs both from source (ztoc/inflate/) and compiled
 * (dist/ztoc/inflate/), while the addon is built at <root>/ztoc/native/.
 */
function findPackageRoot(from: string): string | undefined {
  for (let dir = from; ; ) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg)) {
      try {
        if ((JSON.parse(readFileSync(pkg, 'utf8')) as { name?: unknown }).name === PACKAGE_NAME) return dir;
      } catch {
        // Unreadable or not JSON: not ours, keep walking.
      }
    }
    const parent = dirname(dir);
    if (parent === dir) return undefined;
    dir = parent;
  }
}

/** Why the addon did not load, when it exists but failed (for diagnostics). */
let loadError: Error | undefined;
let cached: { engine: InflateEngine | undefined; zlibVersion?: string } | undefined;

export function nativeAddonPath(): string | undefined {
  const root = findPackageRoot(dirname(fileURLToPath(import.meta.url)));
  return root === undefined ? undefined : join(root, ...ADDON_PATH);
}

/** The error from loading an addon that exists but would not load, if any. */
export function nativeLoadError(): Error | undefined {
  loadNativeEngine();
  return loadError;
}

function isAddon(x: unknown): x is ZinflateAddon {
  const a = x as Partial<Record<keyof ZinflateAddon, unknown>> | null;
  return (
    typeof a === 'object' &&
    a !== null &&
    typeof a.create === 'function' &&
    typeof a.inflate === 'function' &&
    typeof a.reset === 'function' &&
    typeof a.prime === 'function' &&
    typeof a.setDictionary === 'function' &&
    typeof a.end === 'function' &&
    typeof a.zlibVersion === 'string'
  );
}

function zlibCallFailed(fn: string, status: number): Error {
  const text = `${fn} failed with zlib status ${status}`;
  // Z_STREAM_ERROR means bad parameters or state, i.e. caller misuse.
  return status === -2 ? new RangeError(text) : new Error(text);
}

class NativeInflater implements Inflater {
  private readonly handle: Handle;
  /** Filled by the addon in place: [status, consumed, produced, data_type]. */
  private readonly result = new Int32Array(4);
  private readonly step: InflateStep = { status: 0, consumed: 0, produced: 0, dataType: 0 };

  constructor(
    private readonly addon: ZinflateAddon,
    windowBits: number,
  ) {
    this.handle = addon.create(windowBits);
    if (typeof addon.inflateAsync === 'function') this.inflateAsync = this.inflateOnThread.bind(this);
  }

  inflate(
    input: Uint8Array,
    inStart: number,
    inEnd: number,
    output: Uint8Array,
    outStart: number,
    outEnd: number,
    flush: number,
  ): InflateStep {
    this.addon.inflate(this.handle, input, inStart, inEnd, output, outStart, outEnd, flush, this.result);
    return this.readStep();
  }

  /** The step object, from what the addon wrote into `result`. */
  private readStep(): InflateStep {
    const r = this.result;
    const step = this.step;
    step.status = r[0];
    step.consumed = r[1];
    step.produced = r[2];
    step.dataType = r[3];
    return step;
  }

  /** inflate() on one of the addon's threads (see Inflater.inflateAsync); set when the addon has it. */
  readonly inflateAsync?: Inflater['inflateAsync'];

  private inflateOnThread(
    input: Uint8Array,
    inStart: number,
    inEnd: number,
    output: Uint8Array,
    outStart: number,
    outEnd: number,
    flush: number,
  ): Promise<InflateStep> {
    return new Promise((resolve, reject) => {
      this.addon.inflateAsync!(this.handle, input, inStart, inEnd, output, outStart, outEnd, flush, this.result, (err) => {
        if (err !== null) return reject(err);
        resolve(this.readStep());
      });
    });
  }

  reset(windowBits: number): void {
    const status = this.addon.reset(this.handle, windowBits);
    if (status !== 0) throw zlibCallFailed('inflateReset2', status);
  }

  prime(bits: number, value: number): void {
    const status = this.addon.prime(this.handle, bits, value);
    if (status !== 0) throw zlibCallFailed('inflatePrime', status);
  }

  setDictionary(dictionary: Uint8Array): void {
    const status = this.addon.setDictionary(this.handle, dictionary);
    if (status !== 0) throw zlibCallFailed('inflateSetDictionary', status);
  }

  close(): void {
    this.addon.end(this.handle);
  }
}

/**
 * The native engine, or undefined when the addon is not built (or is built
 * but will not load, e.g. for another Node ABI: see nativeLoadError()).
 */
export function loadNativeEngine(): InflateEngine | undefined {
  if (cached) return cached.engine;
  let engine: InflateEngine | undefined;
  let zlibVersion: string | undefined;
  const path = nativeAddonPath();
  if (path !== undefined && existsSync(path)) {
    try {
      const addon: unknown = createRequire(import.meta.url)(path);
      if (!isAddon(addon)) throw new Error(`${path} does not export the zinflate API`);
      zlibVersion = addon.zlibVersion;
      engine = {
        name: 'zlib-native',
        create: (windowBits: number): Inflater => new NativeInflater(addon, windowBits),
      };
    } catch (e) {
      loadError = e instanceof Error ? e : new Error(String(e));
    }
  }
  cached = { engine, zlibVersion };
  return engine;
}

/** The version of the zlib the addon actually runs (undefined without the addon). */
export function nativeZlibVersion(): string | undefined {
  loadNativeEngine();
  return cached?.zlibVersion;
}

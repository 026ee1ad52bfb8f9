/**
 * Picks the raw-inflate engine: the native zlib addon when it is built,
 * pako otherwise. SOCI_TS_INFLATE=pako forces pako (e.g. to rule the addon
 * out when debugging); SOCI_TS_INFLATE=native makes a missing addon an error.
 */
import type { InflateEngine } from './engine.js';
import { loadNativeEngine, nativeLoadError } from './native.js';
import { pakoEngine } from './pako.js';

export * from './engine.js';
export { pakoEngine } from './pako.js';
export { loadNativeEngine, nativeAddonPath, nativeLoadError, nativeZlibVersion } from './native.js';

let chosen: InflateEngine | undefined;

/** The engine to use, chosen once per process. */
export function inflateEngine(): InflateEngine {
  if (chosen) return chosen;
  const want = process.env.SOCI_TS_INFLATE ?? '';
  switch (want) {
    case 'pako':
      chosen = pakoEngine;
      break;
    case 'native': {
      const native = loadNativeEngine();
      if (!native) {
        const why = nativeLoadError();
        throw new Error(
          'SOCI_TS_INFLATE=native but the zinflate addon is not available' +
            (why ? `: ${why.message}` : ' (build it with `npm run build:native`)'),
        );
      }
      chosen = native;
      break;
    }
    case '':
    case 'auto':
      chosen = loadNativeEngine() ?? pakoEngine;
      break;
    default:
      throw new Error(`SOCI_TS_INFLATE must be "pako", "native" or "auto", not ${JSON.stringify(want)}`);
  }
  return chosen;
}

/** Every engine that can run here, native first (for tests and benchmarks). */
export function availableEngines(): InflateEngine[] {
  const native = loadNativeEngine();
  return native ? [native, pakoEngine] : [pakoEngine];
}

/**
 * What build of soci-ts this process runs, for the handshake between the snapshotter and a FUSE
 * manager that may have been started by an older (or newer) build (see daemon/fuse-protocol.ts):
 *
 * - `version`: the release (package.json's version);
 * - `build`: a digest of the compiled modules the daemon runs (daemon/, fs/, fetcher/, ztoc/
 *   next to this file), so that a rebuild of the same version is a different build too;
 * - `protocol` / `oldestProtocol`: the FUSE manager protocols this build speaks.
 *
 * For tests only, two environment variables make a process believe it is another build:
 * `SOCI_TS_TEST_VERSION` (its version, and a build id derived from it) and
 * `SOCI_TS_TEST_FUSE_PROTOCOL` (the one FUSE manager protocol it speaks). A FUSE manager started
 * by such a snapshotter inherits them, as a manager of that build would be.
 */
import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { FUSE_MANAGER_PROTOCOL, OLDEST_FUSE_MANAGER_PROTOCOL } from './fuse-protocol.js';

export const SOCI_TS_VERSION = '0.1.0';

export interface BuildIdentity {
  version: string;
  /** 12 hex digits. */
  build: string;
  protocol: number;
  oldestProtocol: number;
}

const MODULE_DIRS = ['daemon', 'fs', 'fetcher', 'ztoc'];

async function modulesDigest(): Promise<string> {
  const top = dirname(dirname(fileURLToPath(import.meta.url)));
  const h = createHash('sha256');
  for (const d of MODULE_DIRS) {
    const files = await readdir(join(top, d), { recursive: true }).catch(() => [] as string[]);
    for (const f of files.filter((x) => x.endsWith('.js')).sort()) {
      const data = await readFile(join(top, d, f)).catch(() => undefined);
      if (data === undefined) continue;
      h.update(`${d}/${f}\0${data.length}\0`);
      h.update(data);
    }
  }
  return h.digest('hex').slice(0, 12);
}

let identity: Promise<BuildIdentity> | undefined;

/** This process's build (computed once: the module files are read at the first call). */
export function buildIdentity(): Promise<BuildIdentity> {
  identity ??= (async () => {
    const fakeVersion = process.env.SOCI_TS_TEST_VERSION;
    const fakeProtocol = process.env.SOCI_TS_TEST_FUSE_PROTOCOL;
    const protocol = fakeProtocol !== undefined && /^\d+$/.test(fakeProtocol) ? Number(fakeProtocol) : undefined;
    return {
      version: fakeVersion !== undefined && fakeVersion !== '' ? fakeVersion : SOCI_TS_VERSION,
      build: fakeVersion !== undefined && fakeVersion !== '' ? createHash('sha256').update(`test:${fakeVersion}`).digest('hex').slice(0, 12) : await modulesDigest(),
      protocol: protocol ?? FUSE_MANAGER_PROTOCOL,
      oldestProtocol: protocol ?? OLDEST_FUSE_MANAGER_PROTOCOL,
    };
  })();
  return identity;
}

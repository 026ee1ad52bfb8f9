/**
 * The `[blob]` registry keys reach the registry client the daemon makes (registryTuning, used by
 * the snapshotter; the FUSE manager gets the same values as flags): max_retries counted at a
 * loopback HTTP server that always answers 503 to a manifest request.
 */
import t from 'tap';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { RegistryClient } from '../../fetcher/index.js';
import { DEFAULT_CONFIG } from '../../daemon/config.js';
import { registryTuning } from '../../daemon/cli-util.js';
import { remoteOptions } from '../../daemon/cli-snapshotter.js';

async function server(handler: (req: IncomingMessage, res: ServerResponse) => void): Promise<{ host: string; close: () => Promise<void> }> {
  const s = createServer(handler);
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as AddressInfo).port;
  return {
    host: `127.0.0.1:${port}`,
    close: () =>
      new Promise<void>((r) => {
        s.closeAllConnections();
        s.close(() => r());
      }),
  };
}

for (const maxRetries of [0, 2]) {
  t.test(`max_retries = ${maxRetries}: ${maxRetries + 1} requests for a manifest the registry keeps answering 503`, async (t) => {
    let manifestRequests = 0;
    const srv = await server((req, res) => {
      if (req.url?.includes('/manifests/') === true) manifestRequests++;
      res.writeHead(req.url === '/v2/' ? 200 : 503, { 'content-type': 'text/plain' });
      res.end('unavailable');
    });
    t.teardown(srv.close);
    const tuning = registryTuning({ ...DEFAULT_CONFIG, maxRetries });
    // Short backoff for the test; the attempts are the config's.
    const client = new RegistryClient({ hostsDir: '', plainHttp: true, ...tuning, retry: { ...tuning.retry, baseDelayMs: 1, maxDelayMs: 5 } });
    t.teardown(() => client.close());
    t.equal(client.retry.attempts, maxRetries + 1, 'the client makes 1 + max_retries attempts');
    await t.rejects(client.repository(`${srv.host}/app:1`).fetchManifest(), 'the fetch fails');
    t.equal(manifestRequests, maxRetries + 1, `the server saw ${maxRetries + 1} manifest requests`);
  });
}

t.test('registryTuning maps every [blob] key; the FUSE manager gets them as flags', async (t) => {
  const cfg = { ...DEFAULT_CONFIG, root: '/srv/soci', maxRetries: 3, connectTimeoutMs: 2000, responseTimeoutMs: 45_000, maxConnectionsPerHost: 16 };
  t.same(registryTuning(cfg), { retry: { attempts: 4 }, timeouts: { connectMs: 2000, firstByteMs: 45_000, idleMs: 45_000 }, connectionsPerHost: 16 });
  const client = new RegistryClient({ hostsDir: '' });
  t.teardown(() => client.close());
  const args = remoteOptions(cfg, client)?.settings.manager.args ?? [];
  const flag = (name: string): string | undefined => args[args.indexOf(name) + 1];
  t.same(
    ['--max-retries', '--connect-timeout', '--response-timeout', '--connections-per-host'].map(flag),
    ['3', '2000', '45000', '16'],
    'the manager is started with the same values',
  );
});

/**
 * The snapshotter's control socket (daemon/control.ts, control-server.ts) on a real unix
 * socket: a request's events, log lines and result reach the client in order; errors keep
 * their kind (user or internal); malformed requests get a user error; a client that goes away
 * aborts its request; the socket is the owner's only.
 * The rpull handler itself is tested end to end in rpull.test.ts.
 */
import t from 'tap';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { nullLogger } from '../../fetcher/index.js';
import { callControl, connectControl, ControlRequestError, controlSocketPath, type RpullRequest } from '../../daemon/control.js';
import { ControlServer, type ControlContext } from '../../daemon/control-server.js';

const work = await mkdtemp(path.join(tmpdir(), 'soci-ts-control-'));
t.teardown(() => rm(work, { recursive: true, force: true }));

class UserFault extends Error {}

let aborted: Promise<unknown> | undefined;
let behaviour: 'ok' | 'user' | 'internal' | 'hang' = 'ok';
const socket = controlSocketPath(work);
const server = await ControlServer.start({
  socket,
  logger: nullLogger,
  isUserError: (e) => e instanceof UserFault,
  handlers: {
    rpull: async (params: Record<string, unknown>, ctx: ControlContext) => {
      ctx.emit({ type: 'layer-start', index: 0 });
      ctx.log('{"level":"info","msg":"one"}\n');
      if (behaviour === 'user') throw new UserFault('no such image');
      if (behaviour === 'internal') throw new TypeError('a bug');
      if (behaviour === 'hang') {
        aborted = new Promise((resolve) => ctx.signal.addEventListener('abort', () => resolve(ctx.signal.reason), { once: true }));
        await aborted;
      }
      return { json: { ref: params.ref }, summary: `pulled ${String(params.ref)}` };
    },
  },
});
t.teardown(() => server.stop());

const req = (ref: string): RpullRequest => ({ ref, address: '/x', namespace: 'n', snapshotter: 's', plainHttp: false, hostsDir: '', env: {}, logLevel: 'info' });

async function call(ref: string, onEvent?: (e: unknown) => void, onLog?: (l: string) => void): Promise<unknown> {
  const sock = await connectControl(socket);
  if (sock === undefined) throw new Error('no control socket');
  return callControl(sock, socket, 'rpull', req(ref), { onEvent, onLog });
}

t.test('the socket is the owner\'s only', async (t) => {
  t.equal((await stat(socket)).mode & 0o777, 0o600);
});

t.test('events, log lines and the result reach the client', async (t) => {
  behaviour = 'ok';
  const events: unknown[] = [];
  const logs: string[] = [];
  const r = await call('a/b:1', (e) => events.push(e), (l) => logs.push(l));
  t.same(r, { json: { ref: 'a/b:1' }, summary: 'pulled a/b:1' });
  t.same(events, [{ type: 'layer-start', index: 0 }]);
  t.same(logs, ['{"level":"info","msg":"one"}\n']);
});

t.test('errors keep their kind', async (t) => {
  behaviour = 'user';
  const u = await call('x').catch((e: unknown) => e);
  t.ok(u instanceof ControlRequestError);
  t.match(u, { kind: 'user', message: 'no such image' });
  behaviour = 'internal';
  const i = await call('x').catch((e: unknown) => e);
  t.match(i, { kind: 'internal', message: /^internal error: a bug$/ });
});

async function rawExchange(line: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(socket);
    let out = '';
    s.on('data', (b: Buffer) => (out += b.toString()));
    s.on('close', () => resolve(out));
    s.on('error', reject);
    s.write(line);
  });
}

t.test('malformed requests: a user error naming the problem, then the connection closes', async (t) => {
  t.match(JSON.parse(await rawExchange('not json\n')), { error: { kind: 'user', message: 'bad control request: not JSON' } });
  t.match(JSON.parse(await rawExchange('{"method":"rm -rf","params":{}}\n')), { error: { kind: 'user', message: /unknown method "rm -rf"/ } });
  t.match(JSON.parse(await rawExchange('{"method":"rpull"}\n')), { error: { kind: 'user', message: /params must be an object/ } });
});

t.test('a client that goes away aborts its request', async (t) => {
  behaviour = 'hang';
  aborted = undefined;
  const sock = await connectControl(socket);
  if (sock === undefined) throw new Error('no control socket');
  const ac = new AbortController();
  const p = callControl(sock, socket, 'rpull', req('slow'), { signal: ac.signal }).catch((e: unknown) => e);
  for (let i = 0; i < 100 && aborted === undefined; i++) await new Promise((r) => setTimeout(r, 20));
  t.ok(aborted !== undefined, 'the handler runs');
  ac.abort(new Error('Ctrl-C'));
  t.match(await p, { message: 'Ctrl-C' }, 'the client gets its own abort reason');
  t.match(await aborted, { message: 'the client went away' }, "the handler's signal is aborted");
});

t.test('no snapshotter on the socket: connectControl says so (undefined), quickly', async (t) => {
  const t0 = Date.now();
  t.equal(await connectControl(path.join(work, 'none.sock')), undefined);
  t.ok(Date.now() - t0 < 1000, 'within its timeout');
});

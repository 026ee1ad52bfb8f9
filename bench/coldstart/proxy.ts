/**
 * A loopback TCP proxy in front of the registry that counts what passes and, optionally,
 * simulates a WAN link: a one-way delay per direction (half the round trip) and a rate limit
 * (a shared bottleneck per direction). This kernel has no `netem`, so latency has to be added
 * in user space; doing the rate here too keeps everything in one process that is gone when
 * the bench is (nothing to remove from the host's network configuration).
 *
 * The link model, per direction: chunks from all connections go through one FIFO "wire" of
 * `bandwidth` bits/s (a chunk departs when the wire is free, taking size/bandwidth), and arrive
 * one-way delay later. The bottleneck buffer is bounded: while more than `queueBytes` wait for
 * the wire, every source feeding it is paused (TCP flow control then holds the sender), so a
 * bulk download cannot delay a small request by more than the buffer's drain time. A new
 * connection's first bytes from the client wait one round trip (the TCP handshake the
 * loopback accept does not pay). Not modelled: loss, and the slow-start ramp of a real TCP
 * connection over the WAN (both legs of the proxy are loopback TCP).
 *
 * Counting: bytes each way (registry → client is what a pull "fetches": bodies and headers),
 * connections, and HTTP/1.1 requests by kind, read from the client → registry stream
 * (request heads, skipping bodies by Content-Length; a chunked request body stops the count
 * for that connection, which a pull never sends).
 */
import * as http from 'node:http';
import * as net from 'node:net';

export interface LinkShape {
  /** Round-trip time added, ms (half each way). */
  rttMs: number;
  /** Rate of each direction, bits per second. */
  bandwidthBps: number;
  /** Bottleneck buffer per direction, bytes (default max(256 KiB, one bandwidth-delay product)). */
  queueBytes?: number;
}

export interface ProxyOptions {
  upstreamHost: string;
  upstreamPort: number;
  /** No shape: a counting pass-through. */
  shape?: LinkShape;
  /** Pause a connection's source while this many bytes wait in its destination socket (default 4 MiB). */
  socketHighWater?: number;
}

export interface ProxyCounters {
  /** Bytes registry → client (what was fetched). */
  bytesDown: number;
  /** Bytes client → registry. */
  bytesUp: number;
  connections: number;
  /** HTTP requests seen (null once a connection's request stream could not be followed). */
  requests: number;
  /** …of which GET/HEAD of `/v2/…/blobs/…`. */
  blobRequests: number;
  /** …of which with a `Range` header. */
  rangeRequests: number;
  /** …of which GET/HEAD of `/v2/…/manifests/…`. */
  manifestRequests: number;
  /** Connections whose request stream could not be followed (requests undercounted). */
  unparsedConnections: number;
}

export class ProxyError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ProxyError';
  }
}

const zeroCounters = (): ProxyCounters => ({
  bytesDown: 0,
  bytesUp: 0,
  connections: 0,
  requests: 0,
  blobRequests: 0,
  rangeRequests: 0,
  manifestRequests: 0,
  unparsedConnections: 0,
});

// ---------------------------------------------------------------------------------------
// HTTP request sniffing

const MAX_HEAD = 64 << 10;

/** Follows HTTP/1.1 request heads in a client → server byte stream. */
export class RequestSniffer {
  private head: Buffer[] = [];
  private headLen = 0;
  private skip = 0;
  private broken = false;

  constructor(private readonly onRequest: (method: string, target: string, headers: Map<string, string>) => void) {}

  get failed(): boolean {
    return this.broken;
  }

  push(chunk: Buffer): void {
    let buf = chunk;
    while (!this.broken && buf.length > 0) {
      if (this.skip > 0) {
        const n = Math.min(this.skip, buf.length);
        this.skip -= n;
        buf = buf.subarray(n);
        continue;
      }
      // Look for the end of the head across what we hold and this chunk.
      const held = this.headLen;
      const joined = held === 0 ? buf : Buffer.concat([...this.head, buf]);
      const from = Math.max(0, held - 3);
      const end = joined.indexOf('\r\n\r\n', from);
      if (end < 0) {
        if (joined.length > MAX_HEAD) {
          this.broken = true;
          return;
        }
        this.head = [joined];
        this.headLen = joined.length;
        return;
      }
      const headText = joined.subarray(0, end).toString('latin1');
      this.head = [];
      this.headLen = 0;
      buf = joined.subarray(end + 4);
      this.parseHead(headText);
    }
  }

  private parseHead(text: string): void {
    const lines = text.split('\r\n');
    // Tolerate stray CRLFs between requests (RFC 9112 §2.2).
    while (lines.length > 0 && lines[0] === '') lines.shift();
    const m = /^([A-Z]+) (\S+) HTTP\/1\.[01]$/.exec(lines[0] ?? '');
    if (m === null) {
      this.broken = true;
      return;
    }
    const headers = new Map<string, string>();
    for (const l of lines.slice(1)) {
      const i = l.indexOf(':');
      if (i > 0) headers.set(l.slice(0, i).trim().toLowerCase(), l.slice(i + 1).trim());
    }
    if (headers.has('transfer-encoding')) {
      this.broken = true; // chunked body: not followed (pulls never send one)
    } else {
      const cl = Number(headers.get('content-length') ?? '0');
      if (!Number.isSafeInteger(cl) || cl < 0) this.broken = true;
      else this.skip = cl;
    }
    this.onRequest(m[1] ?? '', m[2] ?? '', headers);
  }
}

// ---------------------------------------------------------------------------------------
// The simulated link

interface WireItem {
  pipe: Pipe;
  chunk: Buffer | null; // null: end of stream
  deliverAt: number;
}

/** One direction of the link: a FIFO wire at a rate, then a fixed delay. */
class Lane {
  private freeAt = 0;
  private items: WireItem[] = [];
  private head = 0;
  private timer: NodeJS.Timeout | undefined;
  private readonly sources = new Set<Pipe>();
  private congested = false;
  private resumeTimer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(
    private readonly bytesPerMs: number,
    private readonly delayMs: number,
    private readonly queueBytes: number,
  ) {}

  /** Bytes waiting for the wire (submitted, not yet departed). */
  backlog(now: number): number {
    return Math.max(0, (this.freeAt - now) * this.bytesPerMs);
  }

  get isCongested(): boolean {
    return this.congested;
  }

  attach(p: Pipe): void {
    this.sources.add(p);
  }

  detach(p: Pipe): void {
    this.sources.delete(p);
  }

  send(pipe: Pipe, chunk: Buffer | null): void {
    const now = performance.now();
    const start = Math.max(now, this.freeAt);
    this.freeAt = start + (chunk === null ? 0 : chunk.length / this.bytesPerMs);
    this.items.push({ pipe, chunk, deliverAt: this.freeAt + this.delayMs });
    this.arm(now);
    if (!this.congested && this.backlog(now) > this.queueBytes) {
      this.congested = true;
      for (const s of this.sources) s.updateFlow();
      this.scheduleResume(now);
    }
  }

  private scheduleResume(now: number): void {
    // When the backlog will have drained to half the buffer.
    const at = this.freeAt - this.queueBytes / 2 / this.bytesPerMs;
    clearTimeout(this.resumeTimer);
    this.resumeTimer = setTimeout(() => {
      const t = performance.now();
      if (this.backlog(t) > this.queueBytes / 2) {
        this.scheduleResume(t);
        return;
      }
      this.congested = false;
      for (const s of this.sources) s.updateFlow();
    }, Math.max(0, at - now));
  }

  private arm(now: number): void {
    if (this.timer !== undefined || this.closed) return;
    const next = this.items[this.head];
    if (next === undefined) return;
    // libuv's clock is a cached, whole-millisecond one: a timer may fire a little before
    // performance.now() reaches the due time; deliver() then re-arms, so nothing arrives early.
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.deliver();
    }, Math.max(1, Math.ceil(next.deliverAt - now)));
  }

  private deliver(): void {
    const now = performance.now();
    while (this.head < this.items.length && (this.items[this.head]?.deliverAt ?? Infinity) <= now) {
      const it = this.items[this.head] as WireItem;
      this.items[this.head] = undefined as unknown as WireItem;
      this.head++;
      it.pipe.arrive(it.chunk);
    }
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    this.arm(now);
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    clearTimeout(this.resumeTimer);
    this.items = [];
    this.head = 0;
    this.sources.clear();
  }
}

/** One direction of one connection: reads `src`, writes `dst`, through a lane or directly. */
class Pipe {
  private inFlight = 0;
  private held: Buffer[] = [];
  private holdUntil = 0;
  private holdTimer: NodeJS.Timeout | undefined;
  private ended = false;
  private paused = false;

  constructor(
    private readonly src: net.Socket,
    private readonly dst: net.Socket,
    private readonly lane: Lane | undefined,
    private readonly highWater: number,
    private readonly onBytes: (chunk: Buffer) => void,
  ) {
    lane?.attach(this);
    src.on('data', (chunk: Buffer) => this.onData(chunk));
    src.on('end', () => this.onEnd());
    dst.on('drain', () => this.updateFlow());
  }

  /** Hold what the client sends until `t` (the handshake). */
  holdFor(ms: number): void {
    this.holdUntil = performance.now() + ms;
    this.holdTimer = setTimeout(() => this.release(), ms);
  }

  private release(): void {
    this.holdUntil = 0;
    this.holdTimer = undefined;
    const held = this.held;
    this.held = [];
    for (const c of held) this.forward(c);
    if (this.ended) this.forwardEnd();
  }

  private onData(chunk: Buffer): void {
    this.onBytes(chunk);
    if (this.holdUntil > 0) {
      this.held.push(chunk);
      return;
    }
    this.forward(chunk);
  }

  private forward(chunk: Buffer): void {
    if (this.dst.destroyed) return;
    if (this.lane === undefined) {
      this.dst.write(chunk);
    } else {
      this.inFlight += chunk.length;
      this.lane.send(this, chunk);
    }
    this.updateFlow();
  }

  private onEnd(): void {
    this.ended = true;
    if (this.holdUntil > 0) return;
    this.forwardEnd();
  }

  private forwardEnd(): void {
    if (this.dst.destroyed) return;
    if (this.lane === undefined) this.dst.end();
    else this.lane.send(this, null);
  }

  /** Called by the lane when a chunk (or the end) reaches the far side. */
  arrive(chunk: Buffer | null): void {
    if (this.dst.destroyed) return;
    if (chunk === null) {
      this.dst.end();
      this.lane?.detach(this);
      return;
    }
    this.inFlight -= chunk.length;
    this.dst.write(chunk);
    this.updateFlow();
  }

  updateFlow(): void {
    if (this.src.destroyed) return;
    const stop = this.dst.writableLength + this.inFlight > this.highWater || (this.lane?.isCongested ?? false);
    if (stop && !this.paused) {
      this.paused = true;
      this.src.pause();
    } else if (!stop && this.paused) {
      this.paused = false;
      this.src.resume();
    }
  }

  dispose(): void {
    clearTimeout(this.holdTimer);
    this.lane?.detach(this);
  }
}

// ---------------------------------------------------------------------------------------
// The proxy

export class ShapingProxy {
  private counters = zeroCounters();
  private readonly sockets = new Set<net.Socket>();
  private readonly down: Lane | undefined;
  private readonly up: Lane | undefined;

  private constructor(
    private readonly server: net.Server,
    readonly port: number,
    readonly options: ProxyOptions,
  ) {
    const s = options.shape;
    if (s !== undefined) {
      const bytesPerMs = s.bandwidthBps / 8 / 1000;
      const queue = s.queueBytes ?? Math.max(256 << 10, Math.ceil(bytesPerMs * s.rttMs));
      this.down = new Lane(bytesPerMs, s.rttMs / 2, queue);
      this.up = new Lane(bytesPerMs, s.rttMs / 2, queue);
    }
    server.on('connection', (c) => this.onConnection(c));
  }

  /** `127.0.0.1:PORT`: what clients use instead of the registry's address. */
  get host(): string {
    return `127.0.0.1:${this.port}`;
  }

  get shaped(): boolean {
    return this.options.shape !== undefined;
  }

  static async start(options: ProxyOptions): Promise<ShapingProxy> {
    const s = options.shape;
    if (s !== undefined) {
      if (!(Number.isFinite(s.rttMs) && s.rttMs >= 0)) throw new ProxyError(`round-trip time ${s.rttMs} ms is not a non-negative number`);
      if (!(Number.isFinite(s.bandwidthBps) && s.bandwidthBps > 0)) throw new ProxyError(`bandwidth ${s.bandwidthBps} bit/s is not a positive number`);
    }
    // Half-open: an end from one side is forwarded (after the link delay) as an end to the other.
    const server = net.createServer({ noDelay: true, allowHalfOpen: true });
    const port = await new Promise<number>((resolve, reject) => {
      server.once('error', (e) => reject(new ProxyError(`cannot listen on 127.0.0.1: ${e.message}`, { cause: e })));
      server.listen(0, '127.0.0.1', () => resolve((server.address() as net.AddressInfo).port));
    });
    return new ShapingProxy(server, port, options);
  }

  /** Counters since the start or the last reset. */
  snapshot(): ProxyCounters {
    return { ...this.counters };
  }

  reset(): void {
    this.counters = zeroCounters();
  }

  private onConnection(client: net.Socket): void {
    const c = this.counters;
    c.connections++;
    const upstream = net.connect({ host: this.options.upstreamHost, port: this.options.upstreamPort, noDelay: true, allowHalfOpen: true });
    this.sockets.add(client);
    this.sockets.add(upstream);
    const highWater = this.options.socketHighWater ?? 4 << 20;
    const sniffer = new RequestSniffer((method, target, headers) => {
      const k = this.counters;
      k.requests++;
      if ((method === 'GET' || method === 'HEAD') && /^\/v2\/.+\/blobs\//.test(target)) {
        k.blobRequests++;
        if (headers.has('range')) k.rangeRequests++;
      }
      if ((method === 'GET' || method === 'HEAD') && /^\/v2\/.+\/manifests\//.test(target)) k.manifestRequests++;
    });
    let snifferFailed = false;
    const up = new Pipe(client, upstream, this.up, highWater, (chunk) => {
      this.counters.bytesUp += chunk.length;
      if (!snifferFailed) {
        sniffer.push(chunk);
        if (sniffer.failed) {
          snifferFailed = true;
          this.counters.unparsedConnections++;
        }
      }
    });
    const down = new Pipe(upstream, client, this.down, highWater, (chunk) => {
      this.counters.bytesDown += chunk.length;
    });
    if (this.options.shape !== undefined && this.options.shape.rttMs > 0) up.holdFor(this.options.shape.rttMs);
    const close = (): void => {
      up.dispose();
      down.dispose();
      client.destroy();
      upstream.destroy();
      this.sockets.delete(client);
      this.sockets.delete(upstream);
    };
    // Ends travel through the pipes (delayed like data). An error ends both sides at once; a
    // closed client makes the upstream pointless; a closed upstream may still have its last
    // bytes and its end on the way to the client, which closes when those arrived.
    client.on('error', close);
    upstream.on('error', close);
    client.on('close', close);
    upstream.on('close', () => {
      this.sockets.delete(upstream);
      up.dispose();
    });
  }

  async close(): Promise<void> {
    this.down?.close();
    this.up?.close();
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

// ---------------------------------------------------------------------------------------
// Measuring a link

export interface LinkMeasurement {
  /** Median round trip of a small request on an open connection, ms. */
  rttMs: number;
  /** All round trips measured, ms. */
  rttSamplesMs: number[];
  /** Throughput of one large download, bits per second (first byte to last). */
  bandwidthBps: number;
  /** Bytes of that download. */
  bandwidthBytes: number;
}

export interface MeasureOptions {
  /** A small GET answered quickly (e.g. `/v2/`). */
  smallPath: string;
  /** A large GET (e.g. a blob); `rangeBytes` limits it with a Range header. */
  largePath: string;
  rangeBytes?: number;
  /** Round trips to take (default 10). */
  rttSamples?: number;
  timeoutMs?: number;
}

/** Measures the round trip and throughput through `host:port` with plain HTTP/1.1. */
export async function measureLink(hostPort: string, opts: MeasureOptions): Promise<LinkMeasurement> {
  const [host, portText] = hostPort.split(':');
  const port = Number(portText);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const timeoutMs = opts.timeoutMs ?? 120_000;
  const get = (path: string, headers: Record<string, string>, onChunk?: (n: number) => void): Promise<number> =>
    new Promise((resolve, reject) => {
      const req = http.request({ host, port, path, method: 'GET', agent, headers, timeout: timeoutMs }, (res) => {
        let n = 0;
        res.on('data', (b: Buffer) => {
          n += b.length;
          onChunk?.(b.length);
        });
        res.on('end', () => {
          if ((res.statusCode ?? 0) >= 400) reject(new ProxyError(`GET ${path} through ${hostPort} answered ${res.statusCode}`));
          else resolve(n);
        });
        res.on('error', reject);
      });
      req.on('timeout', () => req.destroy(new ProxyError(`GET ${path} through ${hostPort}: no answer in ${timeoutMs} ms`)));
      req.on('error', reject);
      req.end();
    });
  try {
    await get(opts.smallPath, {}); // opens the connection (pays the handshake)
    const rtts: number[] = [];
    for (let i = 0; i < (opts.rttSamples ?? 10); i++) {
      const t0 = performance.now();
      await get(opts.smallPath, {});
      rtts.push(performance.now() - t0);
    }
    let first = 0;
    let firstBytes = 0;
    let last = 0;
    const headers: Record<string, string> = opts.rangeBytes !== undefined ? { range: `bytes=0-${opts.rangeBytes - 1}` } : {};
    const total = await get(opts.largePath, headers, (n) => {
      const t = performance.now();
      if (first === 0) {
        first = t;
        firstBytes = n;
      }
      last = t;
    });
    const seconds = (last - first) / 1000;
    const sorted = [...rtts].sort((a, b) => a - b);
    const mid = sorted.length / 2;
    const rttMs = sorted.length % 2 === 1 ? (sorted[Math.floor(mid)] ?? NaN) : ((sorted[mid - 1] ?? NaN) + (sorted[mid] ?? NaN)) / 2;
    return { rttMs, rttSamplesMs: rtts, bandwidthBps: seconds > 0 ? ((total - firstBytes) * 8) / seconds : Infinity, bandwidthBytes: total };
  } finally {
    agent.destroy();
  }
}

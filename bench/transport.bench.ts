/**
 * Transport benchmarks, side by side in one run:
 *
 * - loopback throughput of one stream: raw node:net (1 MiB writes, honouring `write() === false`)
 *   vs ferry's `tcp()` Connection (1 MiB writes, awaiting each) vs a FramedConnection sending PAGES
 *   frames of 256 raw 4 KiB pages and decoding them on the other side — interleaved rounds, medians;
 * - the shaper's accuracy: rate measured at the receiver vs the configured cap, over real TCP on the
 *   real clock, at 100 Mbit/s and 1 Gbit/s (and 1 Gbit/s with 10 ms of latency, which must not cost
 *   throughput).
 */
import net from 'node:net';
import { randomFillSync } from 'node:crypto';
import { median, type BenchContext, type BenchSuite } from './harness.js';
import { benchTcp, connect, pinServer } from './congestion.js';
import { Encoding, type Frame } from '../src/core/protocol/index.js';
import { FramedConnection, type Connection } from '../src/core/transport/index.js';
import { shaped } from '../src/core/transport/shaped.js';
import { realClock } from '../src/node/clock.js';
import { copyBytes } from '../src/node/vm/memory-access.js';

const MiB = 1 << 20;
const PAGE = 4096;

function randomBytes(n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let off = 0; off < n; off += 65536) randomFillSync(b, off, Math.min(65536, n - off));
  return b;
}

/**
 * Raw node:net: one socket, `block`-sized writes; the receiver hands each chunk to `receive` (by
 * default it drops it). Returns ms from the first write to the last byte received.
 */
export async function rawTcp(total: number, block: Uint8Array, receive?: (chunk: Buffer, offset: number) => void): Promise<number> {
  let done!: (ms: number) => void;
  const finished = new Promise<number>((r) => { done = r; });
  let t0 = 0;
  const server = net.createServer((s) => {
    let n = 0;
    s.on('data', (c: Buffer) => {
      receive?.(c.subarray(0, Math.min(c.length, total - n)), n);
      n += c.length;
      if (n >= total) done(performance.now() - t0);
    });
    s.on('error', () => undefined);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const { port } = pinServer(server).address() as net.AddressInfo;
  const sock = connect(port, { noDelay: true });
  await new Promise<void>((r) => sock.once('connect', () => r()));
  t0 = performance.now();
  for (let sent = 0; sent < total; sent += block.length) {
    if (!sock.write(block)) await new Promise<void>((r) => sock.once('drain', () => r()));
  }
  const ms = await finished;
  sock.destroy();
  server.close();
  return ms;
}

/**
 * Raw node:net as {@link rawTcp}, but the receiver copies every byte into a fresh shared
 * WebAssembly.Memory big enough for them — what any migration must do with guest memory, page
 * faults of fresh memory included (the memory is allocated before the clock starts, never touched
 * before the bytes arrive). The copy moves whole words at any chunk alignment (copyBytes).
 */
export function rawTcpIntoFreshMemory(total: number, block: Uint8Array): Promise<number> {
  const pages = Math.ceil(total / 65536);
  const into = new Uint8Array(new WebAssembly.Memory({ initial: pages, maximum: pages, shared: true }).buffer);
  const bounce = new Uint8Array(1 << 16);
  return rawTcp(total, block, (c, n) => copyBytes(into, n, c, bounce));
}

/** A ferry transport pair over loopback TCP, the listener closed once accepted. */
async function tcpPair(): Promise<[Connection, Connection]> {
  const t = benchTcp();
  let accept!: (c: Connection) => void;
  const accepted = new Promise<Connection>((r) => { accept = r; });
  const l = await t.listen({ onConnection: (c) => accept(c) });
  const ours = await t.dial(l.address);
  const theirs = await accepted;
  await l.close();
  return [ours, theirs];
}

async function ferryTcp(total: number, block: Uint8Array): Promise<number> {
  const [a, b] = await tcpPair();
  const reading = (async () => {
    let n = 0;
    for await (const c of b) n += c.length;
    return n;
  })();
  const t0 = performance.now();
  for (let sent = 0; sent < total; sent += block.length) await a.write(block);
  await a.close();
  const n = await reading;
  const ms = performance.now() - t0;
  await b.close();
  if (n !== total) throw new Error(`ferry tcp delivered ${n} of ${total} bytes`);
  return ms;
}

async function framedTcp(total: number, pages: Uint8Array): Promise<number> {
  const [a, b] = await tcpPair();
  const fa = new FramedConnection(a);
  const fb = new FramedConnection(b);
  const perFrame = 256;
  const frames = Math.ceil(total / (perFrame * PAGE));
  const reading = (async () => {
    let n = 0;
    for await (const f of fb) if (f.type === 'PAGES') n += f.pages.length;
    return n;
  })();
  const t0 = performance.now();
  for (let i = 0; i < frames; i++) {
    const frame: Frame = {
      type: 'PAGES', seq: 1, demand: false,
      pages: Array.from({ length: perFrame }, (_, p) => ({ index: i * perFrame + p, encoding: Encoding.RAW, data: pages.subarray(p * PAGE, (p + 1) * PAGE) })),
    };
    await fa.send(frame);
  }
  await fa.close();
  const n = await reading;
  const ms = performance.now() - t0;
  await fb.close();
  if (n !== frames * perFrame) throw new Error(`framed tcp delivered ${n} of ${frames * perFrame} pages`);
  return ms;
}

async function throughput(ctx: BenchContext): Promise<void> {
  const total = (ctx.quick ? 128 : 512) * MiB;
  const rounds = ctx.quick ? 3 : 5;
  const block = randomBytes(MiB);
  const raw: number[] = [];
  const ferry: number[] = [];
  const framed: number[] = [];
  // One warm-up pass of each, then interleaved rounds.
  await rawTcp(32 * MiB, block);
  await ferryTcp(32 * MiB, block);
  await framedTcp(32 * MiB, block);
  for (let r = 0; r < rounds; r++) {
    raw.push(total / 1e6 / (await rawTcp(total, block)));
    ferry.push(total / 1e6 / (await ferryTcp(total, block)));
    framed.push(total / 1e6 / (await framedTcp(total, block)));
  }
  const note = `${total / MiB} MiB one stream, median of ${rounds} interleaved rounds`;
  ctx.report({ metric: 'loopback.raw-net', value: median(raw), unit: 'GB/s', note: `node:net, 1 MiB writes; ${note}` });
  ctx.report({ metric: 'loopback.ferry-tcp', value: median(ferry), unit: 'GB/s', note });
  ctx.report({ metric: 'loopback.ferry-tcp.vs-raw', value: median(ferry) / median(raw), unit: '×' });
  ctx.report({ metric: 'loopback.framed-pages', value: median(framed), unit: 'GB/s', note: `PAGES frames of 256 raw pages, encoded and decoded; ${note}` });
  ctx.report({ metric: 'loopback.framed-pages.vs-raw', value: median(framed) / median(raw), unit: '×' });
}

/**
 * Sends `seconds` worth of bytes at the cap through a shaped TCP connection and measures the rate
 * at the receiver in steady state: from the moment it had half of the bytes to the last byte. The
 * first half absorbs the bucket's allowance — sent at once without latency, or over the first few
 * hundred ms with it, while the wire window (not the bucket) limits the pace. The whole-transfer
 * rate is given in the note.
 */
async function capAccuracy(ctx: BenchContext, label: string, capBitsPerSec: number, latencyMs: number, seconds: number): Promise<void> {
  const cap = capBitsPerSec / 8;
  const total = Math.round((cap * seconds) / MiB) * MiB;
  const [a, b] = await tcpPair();
  const s = shaped(a, { bandwidthBytesPerSec: cap, latencyMs, clock: realClock() });
  const block = randomBytes(MiB);
  const marks: { t: number; n: number }[] = [];
  const reading = (async () => {
    let n = 0;
    let next = 0;
    for await (const c of b) {
      n += c.length;
      if (n >= next) {
        marks.push({ t: performance.now(), n });
        next = n + total / 1000;
      }
    }
    marks.push({ t: performance.now(), n });
    return n;
  })();
  const t0 = performance.now();
  for (let sent = 0; sent < total; sent += MiB) await s.write(block);
  await s.close();
  const n = await reading;
  await b.close();
  if (n !== total) throw new Error(`shaped tcp delivered ${n} of ${total} bytes`);
  const from = marks.find((m) => m.n >= total / 2)!;
  const end = marks.at(-1)!;
  const steady = (end.n - from.n) / ((end.t - from.t) / 1000);
  const whole = total / ((end.t - t0) / 1000);
  const ratio = steady / cap;
  const note = `${(steady / 1e6).toFixed(1)} MB/s steady vs cap ${(cap / 1e6).toFixed(1)} MB/s, ${total / MiB} MiB${latencyMs ? `, ${latencyMs} ms latency` : ''}; whole transfer incl. the initial burst ${(whole / cap).toFixed(3)}× cap`;
  ctx.report({ metric: `cap-${label}.cap-accuracy`, value: ratio, unit: '×', target: '>= 0.95', note });
  ctx.report({ metric: `cap-${label}.cap-accuracy`, value: ratio, unit: '×', target: '<= 1.05' });
}

const suite: BenchSuite = {
  name: 'transport',
  description: 'loopback throughput: raw node:net vs ferry tcp() vs framed PAGES; shaper accuracy at 100 Mbit/s and 1 Gbit/s',
  async run(ctx) {
    await throughput(ctx);
    const secs = ctx.quick ? 1 : 2.5;
    await capAccuracy(ctx, '100Mbit', 100e6, 0, secs);
    await capAccuracy(ctx, '1Gbit', 1e9, 0, secs);
    await capAccuracy(ctx, '1Gbit+10ms', 1e9, 10, secs);
  },
};
export default suite;

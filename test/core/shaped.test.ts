import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setImmediate as tick } from 'node:timers/promises';
import { VirtualClock } from '../../src/core/clock.js';
import { InvalidArgumentError } from '../../src/core/errors.js';
import { TransportError, TransportErrorCode, memoryPair, type Connection } from '../../src/core/transport/index.js';
import { shaped } from '../../src/core/transport/shaped.js';
import { TokenBucket } from '../../src/core/rate.js';
import { fillPattern, patternByte } from './transport-suite.test.js';

// Powers of two keep the virtual-time arithmetic exact: a 64 KiB chunk at 1 MiB/s takes 62.5 ms.
const KiB = 1024;
const RATE = 1024 * KiB;
const CHUNK = 64 * KiB;
const settle = () => tick();

interface Arrival { t: number; total: number }

/** Reads to the end, checking the pattern and noting when each chunk arrived (virtual ms). */
async function record(conn: Connection, clock: VirtualClock, seed: number): Promise<Arrival[]> {
  const log: Arrival[] = [];
  let n = 0;
  for await (const c of conn) {
    for (let i = 0; i < c.length; i++) if (c[i] !== patternByte(seed, n + i)) assert.fail(`byte ${n + i} differs`);
    n += c.length;
    log.push({ t: clock.now(), total: n });
  }
  return log;
}

async function writeAll(conn: Connection, seed: number, total: number, writeBytes: number): Promise<void> {
  for (let off = 0; off < total; off += writeBytes) await conn.write(fillPattern(seed, off, Math.min(writeBytes, total - off)));
  await conn.close();
}

test('shaped: bytes leave at the cap, the bucket\'s burst first (virtual time, exact)', async () => {
  const clock = new VirtualClock();
  const [a, b] = memoryPair();
  const s = shaped(a, { bandwidthBytesPerSec: RATE, burstBytes: CHUNK, chunkBytes: CHUNK, clock });
  const total = 17 * CHUNK;
  const reading = record(b, clock, 1);
  const writing = writeAll(s, 1, total, 256 * KiB);
  await clock.runUntilSettled(Number.POSITIVE_INFINITY, settle);
  await writing;
  const log = await reading;
  // Chunk k leaves once the bucket has refilled k chunks' worth: at k × 62.5 ms.
  assert.deepEqual(log.map((x) => x.t), Array.from({ length: 17 }, (_, k) => k * 62.5));
  assert.equal(log.at(-1)!.total, total);
  for (const x of log) assert.ok(x.total <= CHUNK + (RATE * x.t) / 1000, `${x.total} bytes by ${x.t} ms exceeds burst + rate × t`);
  // 1 MiB beyond the burst in exactly one second.
  assert.equal(log.at(-1)!.t, 1000);
  await b.close();
  assert.equal(await s.closed, undefined);
});


/**
 * A virtual clock whose timers fire on whole milliseconds, at least one after they were set, as
 * node's do: a wait shorter than a millisecond takes one.
 */
class MillisecondTimers extends VirtualClock {
  override sleep(ms: number, signal?: AbortSignal): Promise<void> {
    return super.sleep(Math.max(1, Math.ceil(this.now() + ms) - this.now()), signal);
  }
}

test('shaped: small writes get the cap too, even when the bucket is shallower than a timer tick', async () => {
  // 64 MiB/s with a 16 KiB bucket: the bucket holds a quarter of a millisecond of rate. Paced a
  // 4 KiB write at a time, each wait took a whole millisecond and let 16 KiB through: a quarter of
  // the cap. Gathered into 64 KiB chunks, each tick carries one, as it does for large writes (the
  // tick's rounding costs 2.4 % of the cap here, whatever the writes).
  const rate = 64 * 1024 * KiB;
  const total = 1024 * CHUNK; // 64 MiB: one second at the cap
  const took = new Map<number, number>();
  for (const writeBytes of [4 * KiB, 12 * KiB, CHUNK, 256 * KiB]) {
    const clock = new MillisecondTimers();
    const [a, b] = memoryPair();
    const s = shaped(a, { bandwidthBytesPerSec: rate, burstBytes: 16 * KiB, chunkBytes: CHUNK, clock });
    const reading = record(b, clock, 7);
    const writing = writeAll(s, 7, total, writeBytes);
    await clock.runUntilSettled(Number.POSITIVE_INFINITY, settle);
    await writing;
    const log = await reading;
    assert.equal(log.at(-1)!.total, total);
    const ms = log.at(-1)!.t;
    assert.ok(ms >= ((total - 16 * KiB) / rate) * 1000, `${writeBytes} B writes: ${ms} ms is faster than the cap allows`);
    assert.ok(ms <= 1000 / 0.95, `${writeBytes} B writes: 64 MiB took ${ms} ms at a cap of 64 MiB/s (${((1000 / ms) * 100).toFixed(0)} % of it)`);
    took.set(writeBytes, ms);
  }
  assert.ok(took.get(4 * KiB)! <= took.get(256 * KiB)! + 2, `4 KiB writes took ${took.get(4 * KiB)} ms, 256 KiB writes ${took.get(256 * KiB)} ms`);
});

test('shaped: connections sharing one bucket hold the cap together (a migration\'s parallel streams)', async () => {
  const clock = new VirtualClock();
  const bucket = new TokenBucket({ rateBytesPerSec: RATE, burstBytes: CHUNK });
  const pairs = [memoryPair(), memoryPair(), memoryPair()];
  const total = 8 * CHUNK;
  const readings = pairs.map(([, b], i) => record(b, clock, 10 + i));
  const writings = pairs.map(([a], i) => writeAll(shaped(a, { bucket, chunkBytes: CHUNK, clock }), 10 + i, total, 256 * KiB));
  await clock.runUntilSettled(Number.POSITIVE_INFINITY, settle);
  await Promise.all(writings);
  const logs = await Promise.all(readings);
  // 24 chunks through one 1 MiB/s bucket: the burst, then one chunk per 62.5 ms across all three.
  const end = Math.max(...logs.map((l) => l.at(-1)!.t));
  assert.equal(end, (3 * total - CHUNK) / RATE * 1000);
  for (const l of logs) assert.equal(l.at(-1)!.total, total);
  const arrivals = logs.flat().sort((x, y) => x.t - y.t);
  let sum = 0;
  const per = new Map<number, number>();
  for (const l of logs) for (let k = 0; k < l.length; k++) per.set(l[k].t, (per.get(l[k].t) ?? 0) + l[k].total - (k ? l[k - 1].total : 0));
  for (const t of [...per.keys()].sort((x, y) => x - y)) {
    sum += per.get(t)!;
    assert.ok(sum <= CHUNK + (RATE * t) / 1000, `${sum} bytes by ${t} ms exceeds burst + rate × t for the three together`);
  }
  assert.ok(arrivals.length >= 24);
  for (const [, b] of pairs) await b.close();
});

test('shaped: latency delays every chunk by exactly latencyMs and costs no throughput', async () => {
  for (const latencyMs of [50, 500]) {
    const clock = new VirtualClock();
    const [a, b] = memoryPair();
    const s = shaped(a, { bandwidthBytesPerSec: RATE, burstBytes: CHUNK, chunkBytes: CHUNK, latencyMs, clock });
    const reading = record(b, clock, 2);
    const writing = writeAll(s, 2, 17 * CHUNK, 256 * KiB);
    await clock.runUntilSettled(Number.POSITIVE_INFINITY, settle);
    await writing;
    const log = await reading;
    // Same pacing as without latency, shifted by it: the chunks are on the wire together.
    assert.deepEqual(log.map((x) => x.t), Array.from({ length: 17 }, (_, k) => k * 62.5 + latencyMs), `latency ${latencyMs}`);
  }
});

test('shaped: with a bucket deeper than the bandwidth-delay product, latency still only shifts the stream', async () => {
  const burst = 8 * CHUNK;
  const total = 4 << 20;
  const run = async (latencyMs: number) => {
    const clock = new VirtualClock();
    const [a, b] = memoryPair();
    const s = shaped(a, { bandwidthBytesPerSec: RATE, burstBytes: burst, chunkBytes: CHUNK, latencyMs, clock });
    const reading = record(b, clock, 10);
    const writing = writeAll(s, 10, total, 256 * KiB);
    await clock.runUntilSettled(Number.POSITIVE_INFINITY, settle);
    await writing;
    return reading;
  };
  const direct = await run(0);
  const delayed = await run(50); // 51 200 bytes in flight at the cap: far below the burst
  assert.deepEqual(delayed, direct.map((x) => ({ t: x.t + 50, total: x.total })));
  for (const x of direct) assert.ok(x.total <= burst + (RATE * x.t) / 1000, `${x.total} bytes by ${x.t} ms`);
  assert.equal(direct.at(-1)!.t, ((total - burst) / RATE) * 1000);
});

test('shaped: latency without a cap delays each write and pipelines them', async () => {
  const clock = new VirtualClock();
  const [a, b] = memoryPair();
  const s = shaped(a, { latencyMs: 10, clock });
  const reading = record(b, clock, 3);
  const writing = (async () => {
    for (let i = 0; i < 4; i++) {
      await s.write(fillPattern(3, i * 1000, 1000));
      await clock.sleep(1);
    }
    await s.close();
  })();
  await clock.runUntilSettled(Number.POSITIVE_INFINITY, settle);
  await writing;
  assert.deepEqual((await reading).map((x) => x.t), [10, 11, 12, 13]);
});

test('shaped: writes and deliveries that land just as the pacer or the wire goes idle are never stranded', async () => {
  // A writer woken as the last chunk leaves writes again a few microtasks later — just as the wire
  // (or the pacer) is going idle. The driver runs every event of an instant in one synchronous
  // batch, as real timers fire, and latencies are whole multiples of a chunk's pacing time, so the
  // pacer's and the wire's wake-ups meet too.
  const chunk = 4 * KiB;
  const perChunk = (chunk / RATE) * 1000;
  for (let seed = 1; seed <= 60; seed++) {
    const clock = new VirtualClock();
    const [a, b] = memoryPair();
    const s = shaped(a, { bandwidthBytesPerSec: RATE, burstBytes: chunk, chunkBytes: chunk, latencyMs: (seed % 4) * perChunk, clock, highWaterMark: [0, 1, 16 * KiB][seed % 3] });
    let x = seed;
    const rnd = (n: number) => { x = (x * 48271) % 2147483647; return x % n; };
    let total = 0;
    const writing = (async () => {
      for (let i = 0; i < 40; i++) {
        const n = 1 + rnd(3 * chunk);
        await s.write(fillPattern(11, total, n));
        total += n;
        for (let k = rnd(4); k > 0; k--) await Promise.resolve();
      }
      await s.close();
    })();
    const reading = record(b, clock, 11);
    for (;;) {
      await settle();
      const next = clock.peek();
      if (next === null) break;
      clock.runUntil(next);
    }
    let finished = false;
    void writing.then(() => { finished = true; });
    await settle();
    assert.ok(finished, `seed ${seed}: the writer is stuck with ${total} bytes written`);
    assert.equal((await reading).at(-1)!.total, total);
  }
});

test('shaped: close resolves once everything has been delivered; writes after close fail with CLOSED', async () => {
  const clock = new VirtualClock();
  const [a, b] = memoryPair();
  const s = shaped(a, { bandwidthBytesPerSec: RATE, burstBytes: CHUNK, chunkBytes: CHUNK, latencyMs: 20, clock });
  const reading = record(b, clock, 4);
  await s.write(fillPattern(4, 0, 4 * CHUNK));
  let closedAt = -1;
  const closing = s.close().then(() => { closedAt = clock.now(); });
  await assert.rejects(s.write(new Uint8Array(1)), (e) => e instanceof TransportError && e.code === TransportErrorCode.CLOSED);
  await clock.runUntilSettled(Number.POSITIVE_INFINITY, settle);
  await closing;
  const log = await reading;
  assert.equal(log.at(-1)!.total, 4 * CHUNK);
  assert.equal(closedAt, 3 * 62.5 + 20);
  await b.close();
  assert.equal(await s.closed, undefined);
  s.abort(); // after a clean close: no effect
  assert.equal(await s.closed, undefined);
});

test('shaped: a reader that stops reading stops the writer (backpressure through the shaper)', async () => {
  const clock = new VirtualClock();
  const [a, b] = memoryPair({ highWaterMark: 64 * KiB });
  const hwm = 128 * KiB;
  const s = shaped(a, { bandwidthBytesPerSec: RATE, chunkBytes: CHUNK, highWaterMark: hwm, clock });
  const total = 4 << 20;
  let resolved = 0;
  const writing = (async () => {
    for (let off = 0; off < total; off += CHUNK) {
      await s.write(fillPattern(5, off, CHUNK));
      resolved += CHUNK;
    }
    await s.close();
  })();
  await clock.runUntilSettled(20_000, settle);
  // Nobody reads: the memory pipe holds its mark plus one chunk, the shaper its own mark.
  assert.ok(resolved > 0 && resolved <= hwm + 64 * KiB + CHUNK, `writer ran ${resolved} bytes ahead of a reader that never read`);
  const reading = record(b, clock, 5);
  await clock.runUntilSettled(Number.POSITIVE_INFINITY, settle);
  await writing;
  assert.equal((await reading).at(-1)!.total, total);
});

test('shaped: after a stall underneath, the catch-up burst is bounded by the wire window and the bucket', async () => {
  const clock = new VirtualClock();
  const [a, b] = memoryPair({ highWaterMark: 64 * KiB });
  const latencyMs = 100;
  const s = shaped(a, { bandwidthBytesPerSec: RATE, burstBytes: CHUNK, chunkBytes: CHUNK, latencyMs, clock });
  const total = 8 << 20;
  const writing = writeAll(s, 6, total, 256 * KiB);
  await clock.runUntilSettled(5_000, settle); // the reader is absent for 5 s
  const log = await Promise.all([record(b, clock, 6), clock.runUntilSettled(Number.POSITIVE_INFINITY, settle), writing]).then(([l]) => l);
  assert.equal(log.at(-1)!.total, total);
  const atResume = log.filter((x) => x.t === 5_000).at(-1)!.total;
  // Memory pipe (its mark + a chunk) + the wire (bandwidth-delay product + burst + 2 chunks) + the bucket.
  const bound = 64 * KiB + CHUNK + (RATE * latencyMs) / 1000 + CHUNK + 2 * CHUNK + CHUNK;
  assert.ok(atResume <= bound, `${atResume} bytes arrived at once after the stall (bound ${bound})`);
  // From then on the cap holds again.
  const end = log.at(-1)!;
  assert.ok(end.total - atResume <= bound + (RATE * (end.t - 5_000)) / 1000);
});

test('shaped: abort drops what is being shaped, fails our writes with ABORTED and the peer with RESET', async () => {
  const clock = new VirtualClock();
  const [a, b] = memoryPair();
  const s = shaped(a, { bandwidthBytesPerSec: RATE, burstBytes: CHUNK, chunkBytes: CHUNK, latencyMs: 10, clock, highWaterMark: CHUNK });
  const it = b[Symbol.asyncIterator]();
  const pending = s.write(fillPattern(7, 0, 8 * CHUNK));
  await clock.runUntilSettled(100, settle); // chunk 0 delivered at 10 ms, chunk 1 at 72.5 ms
  const boom = new Error('boom');
  s.abort(boom);
  await assert.rejects(pending, (e) => e instanceof TransportError && e.code === TransportErrorCode.ABORTED && (e.cause as Error).message === 'boom');
  await assert.rejects(s.write(new Uint8Array(1)), (e) => e instanceof TransportError && e.code === TransportErrorCode.ABORTED);
  await assert.rejects(s.close(), (e) => e instanceof TransportError && e.code === TransportErrorCode.ABORTED);
  await assert.rejects(s[Symbol.asyncIterator]().next(), (e) => e instanceof TransportError && e.code === TransportErrorCode.ABORTED);
  assert.equal((await s.closed)?.code, TransportErrorCode.ABORTED);
  await assert.rejects(it.next(), (e) => e instanceof TransportError && e.code === TransportErrorCode.RESET);
  // Its timers are gone with it.
  await clock.runUntilSettled(Number.POSITIVE_INFINITY, settle);
  assert.equal(clock.pending, 0);
});

test('shaped: the peer\'s abort fails a write that waits in the shaper with RESET', async () => {
  const clock = new VirtualClock();
  const [a, b] = memoryPair();
  const s = shaped(a, { bandwidthBytesPerSec: RATE, chunkBytes: CHUNK, clock, highWaterMark: CHUNK });
  const pending = s.write(fillPattern(8, 0, 8 * CHUNK));
  await clock.runUntilSettled(50, settle);
  b.abort(new Error('gone'));
  await assert.rejects(pending, (e) => e instanceof TransportError && e.code === TransportErrorCode.RESET);
  await assert.rejects(s.write(new Uint8Array(1)), (e) => e instanceof TransportError && e.code === TransportErrorCode.RESET);
  assert.equal((await s.closed)?.code, TransportErrorCode.RESET);
  await clock.runUntilSettled(Number.POSITIVE_INFINITY, settle);
  assert.equal(clock.pending, 0);
});

test('shaped: only our direction is shaped; the peer\'s bytes come straight through', async () => {
  const clock = new VirtualClock();
  const [a, b] = memoryPair();
  const s = shaped(a, { bandwidthBytesPerSec: RATE, latencyMs: 1000, clock });
  assert.equal(s.localAddress, a.localAddress);
  assert.equal(s.remoteAddress, a.remoteAddress);
  await b.write(fillPattern(9, 0, 1000));
  await b.close();
  const log = await record(s, clock, 9);
  assert.deepEqual(log, [{ t: 0, total: 1000 }]);
  await s.close();
});

test('shaped: nothing to shape returns the connection itself; bad settings are refused', () => {
  const clock = new VirtualClock();
  const [a] = memoryPair();
  assert.equal(shaped(a, { clock }), a);
  assert.throws(() => shaped(a, { latencyMs: -1, clock }), InvalidArgumentError);
  assert.throws(() => shaped(a, { bandwidthBytesPerSec: 0, clock }), InvalidArgumentError);
  assert.throws(() => shaped(a, { bandwidthBytesPerSec: RATE, chunkBytes: 0, clock }), InvalidArgumentError);
  assert.throws(() => shaped(a, { bandwidthBytesPerSec: RATE, highWaterMark: -5, clock }), InvalidArgumentError);
});

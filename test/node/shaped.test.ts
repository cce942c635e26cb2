// The shaper on the real clock: the transport contract over memory and TCP, and frames intact over
// TCP. Functional only — its timing is checked in virtual time (test/core/shaped.test.ts) and
// measured in bench/transport.bench.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { AbortError } from '../../src/core/errors.js';
import { Encoding, type Frame } from '../../src/core/protocol/index.js';
import { DEFAULT_MEMORY_HIGH_WATER_MARK, FramedConnection, MemoryNetwork, memory, type Connection } from '../../src/core/transport/index.js';
import { shapedTransport } from '../../src/core/transport/shaped.js';
import { realClock } from '../../src/node/clock.js';
import { tcp } from '../../src/node/transport/tcp.js';
import { transportComplianceSuite } from '../core/transport-suite.test.js';

const clock = realClock();
const link = { bandwidthBytesPerSec: 1e9, latencyMs: 1, clock };

transportComplianceSuite('shaped memory', {
  setup: async () => shapedTransport(memory({ network: new MemoryNetwork() }), { ...link, highWaterMark: 256 << 10 }),
  backpressureBytes: 4 << 20,
  // The shaper's mark, then the memory pipe's mark plus the chunk that crossed it.
  maxInFlightBytes: (256 << 10) + DEFAULT_MEMORY_HIGH_WATER_MARK + (64 << 10),
  largeTransferBytes: 16 << 20,
});

transportComplianceSuite('shaped tcp', {
  setup: async () => shapedTransport(tcp(), link),
  backpressureBytes: 48 << 20,
  resetMayLookLikeEnd: true,
  largeTransferBytes: 32 << 20,
});

test('real clock: sleep waits at least as long as asked and honours its AbortSignal', async () => {
  for (const ms of [0, 0.3, 1.5, 7]) {
    const t0 = clock.now();
    await clock.sleep(ms);
    assert.ok(clock.now() - t0 >= ms, `slept ${clock.now() - t0} ms for ${ms}`);
  }
  const ac = new AbortController();
  const p = clock.sleep(60_000, ac.signal);
  ac.abort(new Error('enough'));
  await assert.rejects(p, (e) => e instanceof AbortError && (e.cause as Error).message === 'enough');
  await assert.rejects(clock.sleep(1, ac.signal), AbortError);
});

test('PAGES frames cross a shaped TCP link intact, with latency, both ways shaped', async () => {
  const t = shapedTransport(tcp(), { bandwidthBytesPerSec: 200e6, latencyMs: 5, clock });
  const pageSize = 4096;
  const batches = 24;
  const page = (b: number, p: number) => {
    const d = new Uint8Array(pageSize);
    for (let i = 0; i < pageSize; i += 4) d[i] = (b * 31 + p * 7 + i) & 0xff;
    return d;
  };
  let served: Promise<number> | undefined;
  const l = await t.listen({
    onConnection: (c: Connection) => {
      served = (async () => {
        const f = new FramedConnection(c);
        let pages = 0;
        for await (const frame of f) {
          assert.equal(frame.type, 'PAGES');
          if (frame.type !== 'PAGES') continue;
          for (const p of frame.pages) {
            assert.deepEqual(p.data, page(frame.seq, p.index));
            pages++;
          }
          await f.send({ type: 'ACK', acked: 'PAGES', value: frame.seq });
        }
        await f.close();
        return pages;
      })();
    },
  });
  const f = new FramedConnection(await t.dial(l.address));
  const acks: number[] = [];
  const reading = (async () => {
    for await (const frame of f) if (frame.type === 'ACK') acks.push(frame.value);
  })();
  for (let b = 0; b < batches; b++) {
    const frame: Frame = { type: 'PAGES', seq: b, demand: false, pages: Array.from({ length: 256 }, (_, p) => ({ index: b * 256 + p, encoding: Encoding.RAW, data: page(b, b * 256 + p) })) };
    await f.send(frame);
  }
  await f.close();
  await reading;
  assert.deepEqual(acks, Array.from({ length: batches }, (_, b) => b));
  assert.ok(served);
  assert.equal(await served, batches * 256);
  assert.equal(await f.closed, undefined);
  await l.close();
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LinkShaper, TokenBucket, transferTimeMs } from '../../src/core/rate.js';
import { VirtualClock } from '../../src/core/clock.js';
import { InvalidArgumentError } from '../../src/core/errors.js';

/** A greedy sender in virtual time: reserve a chunk, wait the delay, send, repeat. */
function simulate(bucket: TokenBucket, chunk: (i: number) => number, periodMs: number): number {
  const clock = new VirtualClock();
  let sent = 0;
  let i = 0;
  const loop = () => {
    const bytes = chunk(i++);
    const delay = bucket.reserve(bytes, clock.now());
    clock.after(delay, () => {
      sent += bytes;
      if (clock.now() < periodMs) loop();
    });
  };
  loop();
  clock.runUntil(periodMs);
  return sent;
}

test('token bucket: long-run rate of a greedy sender is within 5 % of the cap (virtual time)', () => {
  const rate = 10e6;
  for (const chunk of [1500, 65536, 1 << 20, 3 << 20]) {
    const b = new TokenBucket({ rateBytesPerSec: rate, burstBytes: 256 * 1024 });
    const sent = simulate(b, () => chunk, 60_000);
    const achieved = sent / 60;
    assert.ok(Math.abs(achieved - rate) / rate < 0.05, `chunk ${chunk}: ${achieved} B/s vs cap ${rate}`);
  }
});

test('token bucket: variable chunk sizes still converge to the cap', () => {
  const b = new TokenBucket({ rateBytesPerSec: 5e6 });
  const sent = simulate(b, (i) => 1000 + ((i * 7919) % 200_000), 120_000);
  const achieved = sent / 120;
  assert.ok(Math.abs(achieved - 5e6) / 5e6 < 0.05, `${achieved}`);
});

test('token bucket: a full bucket grants the burst immediately, then charges time', () => {
  const b = new TokenBucket({ rateBytesPerSec: 1000, burstBytes: 500, startMs: 0 });
  assert.equal(b.reserve(500, 0), 0);
  assert.equal(b.reserve(250, 0), 250); // 250 B of debt at 1000 B/s
  assert.equal(b.reserve(0, 250), 0);
  assert.equal(b.available(1250), 500); // refilled, capped at the burst
  assert.equal(b.reserve(2000, 10_000), 1500); // larger than the burst: waits
});

test('token bucket: idle time does not bank more than the burst', () => {
  const b = new TokenBucket({ rateBytesPerSec: 1e6, burstBytes: 1e5, startMs: 0 });
  assert.equal(b.available(3_600_000), 1e5);
  assert.throws(() => new TokenBucket({ rateBytesPerSec: 0 }), InvalidArgumentError);
  assert.throws(() => b.reserve(-1, 0), InvalidArgumentError);
});

test('token bucket: setRate takes effect from then on', () => {
  const b = new TokenBucket({ rateBytesPerSec: 1000, burstBytes: 1, startMs: 0 });
  b.reserve(1, 0);
  b.setRate(2000, 0);
  assert.equal(b.reserve(2000, 0), 1000);
});

test('link shaper serialises FIFO and adds latency', () => {
  const link = { bandwidthBytesPerSec: 1e6, latencyMs: 20 };
  assert.equal(transferTimeMs(link, 1e6), 1020);
  const s = new LinkShaper(link);
  assert.deepEqual(s.send(1000, 0), { startMs: 0, departMs: 1, arriveMs: 21 });
  assert.deepEqual(s.send(2000, 0), { startMs: 1, departMs: 3, arriveMs: 23 });
  assert.deepEqual(s.send(1000, 10), { startMs: 10, departMs: 11, arriveMs: 31 });
  assert.equal(s.idleAt(), 11);
  assert.throws(() => new LinkShaper({ bandwidthBytesPerSec: 0, latencyMs: 0 }), InvalidArgumentError);
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  AutoConverge, DirtyHistory, PrecopyStopPolicy, choosePageOrder, decidePrecopyStop, deferHotPages, dynamicRateLimit,
  estimateDowntimeMs, isNotConverging, orderPages, throttleForRatio, type PrecopyRoundStats,
} from '../../src/core/policy/precopy.js';
import { Bitmap } from '../../src/core/bitmap.js';

const MiB = 1024 * 1024;
/** 256 MiB VM, 100 MB/s link, round 5: nothing triggers by default. */
function stats(over: Partial<PrecopyRoundStats> = {}): PrecopyRoundStats {
  return {
    round: 5, pagesSentRound: 10_000, pagesSentTotal: 120_000, bytesSentTotal: 120_000 * 4096, memoryBytes: 256 * MiB,
    dirtyPages: 20_000, bandwidthBytesPerSec: 100e6, dirtyRateBytesPerSec: 50e6, ...over,
  };
}

test('estimateDowntimeMs is eq. (2): dirty bytes over bandwidth', () => {
  assert.equal(estimateDowntimeMs(1000, 4096e3), 1000); // 1000 pages × 4096 B at 4.096 MB/s = 1 s
  assert.equal(estimateDowntimeMs(0, 0, 4096, 7), 7);
  assert.equal(estimateDowntimeMs(1, 0), Infinity);
});

test('baseline stats do not stop', () => {
  const d = decidePrecopyStop(stats(), [30_000, 25_000]);
  assert.equal(d.stop, false);
  assert.equal(d.reason, 'continue');
  assert.ok(Math.abs(d.estimatedDowntimeMs - 819.2) < 1e-9);
  assert.equal(d.notConverging, false);
});

test('converged: remaining dirty pages fit the downtime budget (and only then)', () => {
  // 300 ms at 100 MB/s = 30e6 B = 7324.2 pages.
  assert.equal(decidePrecopyStop(stats({ dirtyPages: 7324 }), []).reason, 'converged');
  assert.equal(decidePrecopyStop(stats({ dirtyPages: 7325 }), []).reason, 'continue');
  assert.equal(decidePrecopyStop(stats({ dirtyPages: 7325 }), [], { downtimeBudgetMs: 301 }).reason, 'converged');
  // fixed downtime part eats into the budget
  assert.equal(decidePrecopyStop(stats({ dirtyPages: 7324 }), [], { fixedDowntimeMs: 10 }).reason, 'continue');
  // absolute page threshold (Xen's 50) even with unknown bandwidth
  assert.equal(decidePrecopyStop(stats({ dirtyPages: 50, bandwidthBytesPerSec: 0 }), [], { dirtyPageThreshold: 50 }).reason, 'converged');
  assert.equal(decidePrecopyStop(stats({ dirtyPages: 51, bandwidthBytesPerSec: 0 }), [], { dirtyPageThreshold: 50 }).reason, 'continue');
});

test('round-limit: after maxRounds live rounds (0-based round index), not before', () => {
  assert.equal(decidePrecopyStop(stats({ round: 28 }), []).reason, 'continue');
  assert.equal(decidePrecopyStop(stats({ round: 29 }), []).reason, 'round-limit');
  assert.equal(decidePrecopyStop(stats({ round: 3 }), [], { maxRounds: 4 }).reason, 'round-limit');
  assert.equal(decidePrecopyStop(stats({ round: 2 }), [], { maxRounds: 4 }).reason, 'continue');
});

test('sent-too-much: more than maxSentRatio × memory on the wire', () => {
  const mem = 256 * MiB;
  assert.equal(decidePrecopyStop(stats({ bytesSentTotal: 3 * mem }), []).reason, 'continue');
  const d = decidePrecopyStop(stats({ bytesSentTotal: 3 * mem + 1 }), []);
  assert.equal(d.stop, true);
  assert.equal(d.reason, 'sent-too-much');
  assert.equal(decidePrecopyStop(stats({ bytesSentTotal: 2 * mem + 1 }), [], { maxSentRatio: 2 }).reason, 'sent-too-much');
});

test('converged wins over the other stop reasons', () => {
  assert.equal(decidePrecopyStop(stats({ round: 40, bytesSentTotal: 1e12, dirtyPages: 10 }), []).reason, 'converged');
  assert.equal(decidePrecopyStop(stats({ round: 40, bytesSentTotal: 1e12 }), []).reason, 'round-limit');
});

test('not converging: k rounds without a new low in the dirty count', () => {
  assert.equal(isNotConverging([100, 90, 80, 70], 3), false);
  assert.equal(isNotConverging([100, 80, 90, 85, 81], 3), true);
  assert.equal(isNotConverging([100, 80, 90, 85, 79], 3), false);
  assert.equal(isNotConverging([100, 100, 100], 3), false); // not enough history
  assert.equal(isNotConverging([100, 100, 100, 100], 3), true);
  const flat = decidePrecopyStop(stats({ dirtyPages: 20_000 }), [19_000, 20_500, 21_000, 20_000]);
  assert.equal(flat.notConverging, true);
  assert.equal(flat.stop, false, 'flag only by default');
  const s = decidePrecopyStop(stats({ dirtyPages: 20_000 }), [19_000, 20_500, 21_000, 20_000], { stopWhenNotConverging: true });
  assert.deepEqual([s.stop, s.reason], [true, 'not-converging']);
  const shrinking = decidePrecopyStop(stats({ dirtyPages: 18_000 }), [19_000, 20_500, 21_000], { stopWhenNotConverging: true });
  assert.equal(shrinking.reason, 'continue');
  // A budget the fixed part alone fills can never be met: rounds go on only while they shrink the dirty set.
  const history = [19_000, 20_500, 21_000, 20_000];
  const unattainable = decidePrecopyStop(stats({ dirtyPages: 20_000 }), history, { downtimeBudgetMs: 5, fixedDowntimeMs: 6 });
  assert.deepEqual([unattainable.stop, unattainable.reason], [true, 'not-converging']);
  assert.equal(decidePrecopyStop(stats({ dirtyPages: 18_000 }), history.slice(0, 3), { downtimeBudgetMs: 5, fixedDowntimeMs: 6 }).reason, 'continue', 'still shrinking');
  assert.equal(decidePrecopyStop(stats({ dirtyPages: 20_000 }), history, { downtimeBudgetMs: 5, fixedDowntimeMs: 4 }).reason, 'continue', 'a budget pages can still meet: flag only');
});

test('PrecopyStopPolicy keeps the dirty history across rounds', () => {
  const p = new PrecopyStopPolicy({ notConvergingRounds: 2, stopWhenNotConverging: true });
  assert.equal(p.decide(stats({ round: 0, dirtyPages: 30_000 })).reason, 'continue');
  assert.equal(p.decide(stats({ round: 1, dirtyPages: 31_000 })).reason, 'continue');
  assert.equal(p.decide(stats({ round: 2, dirtyPages: 30_500 })).reason, 'not-converging');
  assert.deepEqual(p.history, [30_000, 31_000, 30_500]);
});

test('auto-converge: triggers after two too-dirty rounds, steps up and caps', () => {
  const a = new AutoConverge();
  assert.equal(a.onRound(40, 100), 0); // 40 % ≤ 50 %: not too dirty
  assert.equal(a.onRound(60, 100), 0); // first too-dirty round
  assert.equal(a.onRound(60, 100), 0.2); // second → initial
  assert.equal(a.onRound(60, 100), 0.2);
  assert.ok(Math.abs(a.onRound(60, 100) - 0.3) < 1e-12); // +increment every 2 high rounds
  const seen: number[] = [];
  for (let i = 0; i < 40; i++) seen.push(a.onRound(1000, 100));
  assert.equal(Math.max(...seen), 0.99);
  assert.equal(a.throttle, 0.99);
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i] >= seen[i - 1], 'never relaxes');
  const b = new AutoConverge({ initial: 0.5, increment: 0.25, max: 0.9, triggerRounds: 1 });
  assert.deepEqual([b.onRound(10, 10), b.onRound(10, 10), b.onRound(10, 10), b.onRound(0, 10)], [0.5, 0.75, 0.9, 0.9]);
});

test('throttleForRatio: the one-step throttle that makes λ = targetRatio', () => {
  assert.equal(throttleForRatio(200e6, 100e6), 0.75); // 200 MB/s × (1 − 0.75) = 50 MB/s = 0.5 × 100 MB/s
  assert.equal(throttleForRatio(40e6, 100e6), 0, 'already below the target');
  assert.equal(throttleForRatio(1e12, 1e6), 0.99, 'capped');
  assert.equal(throttleForRatio(0, 1e6), 0);
  assert.equal(throttleForRatio(100e6, 100e6, 0.25), 0.75);
});

test('dynamic rate limiting (Clark): previous dirty rate + increment, clamped; atMax at the ceiling', () => {
  assert.deepEqual(dynamicRateLimit(null), { rateBytesPerSec: 12.5e6, atMax: false });
  assert.deepEqual(dynamicRateLimit(1e6), { rateBytesPerSec: 12.5e6, atMax: false });
  assert.deepEqual(dynamicRateLimit(20e6), { rateBytesPerSec: 26.25e6, atMax: false });
  assert.deepEqual(dynamicRateLimit(60e6), { rateBytesPerSec: 62.5e6, atMax: true });
});

function bm(size: number, pages: number[]): Bitmap {
  const b = new Bitmap(size);
  for (const p of pages) b.set(p);
  return b;
}

test('hot pages (dirty in each of the last k rounds) are deferred; they return once they cool', () => {
  const h = new DirtyHistory(16);
  h.record(bm(16, [1, 2, 3]));
  let r = deferHotPages(bm(16, [1, 2, 3]), h, 2);
  assert.deepEqual([...r.deferred], [], 'no deferral before k rounds of history');
  h.record(bm(16, [2, 3, 4]));
  r = deferHotPages(bm(16, [2, 3, 4]), h, 2);
  assert.deepEqual([...r.deferred], [2, 3]);
  assert.deepEqual([...r.send], [4]);
  // next round: page 2 dirtied again, page 3 not; candidates = harvest ∪ deferred
  h.record(bm(16, [2, 9]));
  const candidates = bm(16, [2, 9]);
  candidates.or(r.deferred);
  r = deferHotPages(candidates, h, 2);
  assert.deepEqual([...r.deferred], [2]);
  assert.deepEqual([...r.send], [3, 9]);
  assert.equal(h.streak(2), 3);
  assert.equal(h.streak(3), 0);
  assert.equal(h.roundsSinceDirty(3), 1);
  assert.equal(h.roundsSinceDirty(0), 8);
});

test('cold-first order sends the least recently dirtied pages first, hottest last', () => {
  const h = new DirtyHistory(8);
  h.record(bm(8, [0, 1, 2]));
  h.record(bm(8, [1, 3]));
  h.record(bm(8, [1, 4, 5]));
  // roundsSinceDirty: 0→2, 1→0, 2→2, 3→1, 4→0, 5→0, 6,7→never
  const cand = bm(8, [0, 1, 2, 3, 4, 5, 6]);
  assert.deepEqual([...orderPages(cand, h, 'cold-first')], [6, 0, 2, 3, 1, 4, 5]);
  assert.deepEqual([...orderPages(cand, h, 'ascending')], [0, 1, 2, 3, 4, 5, 6]);
});

test('CBP learns per-context dirty probabilities and orders by them', () => {
  const n = 64;
  const h = new DirtyHistory(n, { order: 2 });
  // even pages dirty every round; odd pages alternate (dirty on even rounds)
  for (let r = 0; r < 10; r++) {
    const d = new Bitmap(n);
    for (let p = 0; p < n; p++) if (p % 2 === 0 || r % 2 === 0) d.set(p);
    h.record(d);
  }
  // after round 9 (odd): odd pages' last bits are ...10 → context 0b10 → next is dirty (p = 1)
  assert.equal(h.predictContext(0b11), 1);
  assert.equal(h.predictContext(0b10), 1);
  assert.equal(h.predictContext(0b01), 0);
  assert.equal(h.predictContext(0b00), 0.5, 'unseen context');
  const h2 = new DirtyHistory(4, { order: 2 });
  for (let r = 0; r < 6; r++) h2.record(bm(4, r % 2 === 0 ? [0, 1] : [0]));
  // page 1 pattern after 6 rounds (last round odd → clean): bits ..10 → predicts dirty; after round 5 page0 is 11 → dirty
  // page 2,3 never dirty → context 00 → learnt probability 0
  const order = [...orderPages(bm(4, [0, 1, 2, 3]), h2, 'predicted')];
  assert.deepEqual(order.slice(0, 2), [2, 3]);
  assert.equal(choosePageOrder(0, h2), 'ascending');
  assert.equal(choosePageOrder(3, h2), 'predicted');
  assert.equal(choosePageOrder(1, new DirtyHistory(4)), 'ascending');
  const one = new DirtyHistory(4);
  one.record(bm(4, [1]));
  assert.equal(choosePageOrder(1, one), 'cold-first');
});

test('an option left undefined keeps its default (callers may pass optional settings straight through)', () => {
  const stats = { round: 1, pagesSentRound: 100, pagesSentTotal: 1000, bytesSentTotal: 4096 * 1000, memoryBytes: 4096 * 1000, dirtyPages: 7324, bandwidthBytesPerSec: 100e6, dirtyRateBytesPerSec: 1e6 };
  const withUndefined = decidePrecopyStop(stats, [], { downtimeBudgetMs: undefined, maxRounds: undefined, maxSentRatio: undefined });
  assert.deepEqual(withUndefined, decidePrecopyStop(stats, []));
  assert.equal(withUndefined.reason, 'converged', '7324 pages fit the default 300 ms at 100 MB/s');
  assert.equal(decidePrecopyStop(stats, [], { downtimeBudgetMs: 100 }).reason, 'continue');
});

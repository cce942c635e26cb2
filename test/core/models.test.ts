import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  AvgDirtyRate, HistDirtyCurve, constantDirty, downtimeMs, hybridModel, liveBytes, liveTimeMs, migrationTimeMs, postcopyModel,
  precopyClosedForm, precopyRounds, roundBytes, roundTimeMs, roundsToConverge,
} from '../../src/core/models.js';

// 1 GB VM (decimal, so the hand arithmetic is exact), 100 MB/s link, 25 MB/s dirtying: λ = 0.25.
const input = { memoryBytes: 1e9, bandwidthBytesPerSec: 1e8, dirtyRateBytesPerSec: 2.5e7 };
const close = (a: number, b: number, rel = 1e-12) => assert.ok(Math.abs(a - b) <= rel * Math.max(1, Math.abs(b)), `${a} vs ${b}`);

test('eq. (1) and (2) by hand', () => {
  assert.equal(migrationTimeMs(1e9, 1e8), 10_000);
  // t_d = d·l·t_n / b: 2.5e7 B/s × 0.625 s / 1e8 B/s = 0.15625 s
  assert.equal(downtimeMs(2.5e7, 625, 1e8), 156.25);
});

test('eq. (3)/(4): per-round data and duration by hand', () => {
  assert.deepEqual([0, 1, 2, 3].map((i) => roundBytes(input, i)), [1e9, 2.5e8, 6.25e7, 1.5625e7]);
  assert.deepEqual([0, 1, 2, 3].map((i) => roundTimeMs(input, i)), [10_000, 2500, 625, 156.25]);
});

test('eq. (5)/(6): live-round totals by hand', () => {
  close(liveBytes(input, 2), 1.3125e9);
  close(liveTimeMs(input, 2), 13_125);
  close(liveBytes(input, 0), 1e9);
  assert.equal(liveBytes({ ...input, dirtyRateBytesPerSec: 1e8 }, 4), 5e9, 'λ = 1');
});

test('recurrence with the pre-copy stop policy matches the hand computation and the closed form', () => {
  const p = precopyRounds(input.memoryBytes, input.bandwidthBytesPerSec, constantDirty(input.dirtyRateBytesPerSec));
  // after round 0 the estimate is 2500 ms, after round 1 625 ms, after round 2 156.25 ms ≤ 300 ms
  assert.equal(p.reason, 'converged');
  assert.deepEqual(p.rounds, [{ bytes: 1e9, timeMs: 10_000 }, { bytes: 2.5e8, timeMs: 2500 }, { bytes: 6.25e7, timeMs: 625 }]);
  assert.equal(p.stopCopyBytes, 1.5625e7);
  assert.equal(p.downtimeMs, 156.25);
  assert.equal(p.totalBytes, 1.328125e9);
  assert.equal(p.totalTimeMs, 13_281.25);
  const n = roundsToConverge(input, 300);
  assert.equal(n, 2);
  const c = precopyClosedForm(input, n);
  close(c.downtimeMs, p.downtimeMs);
  close(c.totalBytes, p.totalBytes);
  close(c.totalTimeMs, p.totalTimeMs);
  close(c.liveBytes, 1.3125e9);
});

test('closed form and recurrence agree to rounding for awkward numbers', () => {
  const x = { memoryBytes: 3 * 1024 ** 3 + 12345, bandwidthBytesPerSec: 117e6 / 7, dirtyRateBytesPerSec: 9.3e6 / 3 };
  const p = precopyRounds(x.memoryBytes, x.bandwidthBytesPerSec, constantDirty(x.dirtyRateBytesPerSec), { downtimeBudgetMs: 50 });
  assert.equal(p.reason, 'converged');
  const n = p.rounds.length - 1;
  assert.equal(roundsToConverge(x, 50), n);
  const c = precopyClosedForm(x, n);
  close(c.totalBytes, p.totalBytes);
  close(c.totalTimeMs, p.totalTimeMs);
  close(c.downtimeMs, p.downtimeMs);
  p.rounds.forEach((r, i) => {
    close(r.bytes, roundBytes(x, i));
    close(r.timeMs, roundTimeMs(x, i));
  });
});

test('roundsToConverge is inclusive at an exact power of λ and infinite for λ ≥ 1', () => {
  // budget 156.25 ms ⇔ v_mem·λ^(n+1)/b ≤ 0.15625 s ⇔ λ^(n+1) ≤ 1/64 = 0.25^3
  assert.equal(roundsToConverge(input, 156.25), 2);
  assert.equal(roundsToConverge(input, 156.24), 3);
  assert.equal(roundsToConverge(input, 2500), 0);
  assert.equal(roundsToConverge({ ...input, dirtyRateBytesPerSec: 1e8 }, 300), Infinity);
});

test('a non-converging VM stops on the hard limits', () => {
  const p = precopyRounds(1e9, 1e8, constantDirty(1e8));
  // every round resends 1e9; after round 3 4e9 > 3 × 1e9 has been sent
  assert.equal(p.reason, 'sent-too-much');
  assert.equal(p.rounds.length, 4);
  const q = precopyRounds(1e9, 1e8, constantDirty(1e8), { maxSentRatio: 100, maxRounds: 5 });
  assert.equal(q.reason, 'round-limit');
  assert.equal(q.rounds.length, 5);
});

test('post-copy and hybrid models by hand', () => {
  assert.deepEqual(postcopyModel({ memoryBytes: 1e9, bandwidthBytesPerSec: 1e8, stateBytes: 1e6, softBytes: 2e8 }), { downtimeMs: 10, totalBytes: 8.01e8, totalTimeMs: 8010 });
  const h = hybridModel({ ...input, stateBytes: 1e6 }, 2);
  assert.equal(h.postcopyBytes, 6.25e7);
  assert.equal(h.totalBytes, 1.3135e9);
  close(h.totalTimeMs, 13_135);
  assert.equal(h.downtimeMs, 10);
});

test('AVG: duration-weighted mean rate over a window, fed to the constant-rate model', () => {
  const a = new AvgDirtyRate(2);
  assert.equal(a.rate(), null);
  a.observe(9e9, 1000); // falls out of the window
  a.observe(2e7, 1000);
  a.observe(9e7, 3000);
  assert.equal(a.rate(), 2.75e7);
  assert.deepEqual(a.predict(1e9, 1e8), precopyRounds(1e9, 1e8, constantDirty(2.75e7)));
});

test('HIST: a saturating working set keeps every later round at the working-set size', () => {
  // 100 MB working set, fully dirtied within 100 ms, then nothing new
  const h = new HistDirtyCurve([{ ms: 100, bytes: 1e8 }, { ms: 1e6, bytes: 1e8 }], 1e9);
  assert.equal(h.at(50), 5e7);
  assert.equal(h.at(5000), 1e8);
  const p = h.predict(1e8);
  // each later round resends the 1e8-byte working set (1000 ms, 1000 ms estimated downtime): stops when > 3e9 sent
  assert.equal(p.reason, 'sent-too-much');
  assert.equal(p.rounds.length, 22);
  assert.equal(p.rounds[5].bytes, 1e8);
  assert.throws(() => new HistDirtyCurve([{ ms: 1, bytes: 5 }, { ms: 2, bytes: 4 }], 10));
});

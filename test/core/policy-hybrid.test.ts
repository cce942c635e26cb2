import { test } from 'node:test';
import assert from 'node:assert/strict';
import { HybridSwitchPolicy, decideHybridSwitch } from '../../src/core/policy/hybrid.js';
import type { PrecopyRoundStats } from '../../src/core/policy/precopy.js';

const MiB = 1024 * 1024;
function stats(over: Partial<PrecopyRoundStats> = {}): PrecopyRoundStats {
  return {
    round: 1, pagesSentRound: 10_000, pagesSentTotal: 80_000, bytesSentTotal: 80_000 * 4096, memoryBytes: 256 * MiB,
    dirtyPages: 20_000, bandwidthBytesPerSec: 100e6, dirtyRateBytesPerSec: 50e6, ...over,
  };
}

test('keeps pre-copying while rounds shrink within the bound', () => {
  const d = decideHybridSwitch(stats(), [30_000]);
  assert.deepEqual([d.action, d.reason], ['continue-precopy', 'continue']);
});

test('finishes with stop-and-copy when the downtime budget is already met', () => {
  const d = decideHybridSwitch(stats({ dirtyPages: 100 }), [30_000]);
  assert.deepEqual([d.action, d.reason], ['stop-and-copy', 'converged']);
});

test('switches to post-copy at the pre-copy round bound', () => {
  assert.equal(decideHybridSwitch(stats({ round: 2 }), [30_000, 25_000]).reason, 'round-bound');
  assert.equal(decideHybridSwitch(stats({ round: 2 }), [30_000, 25_000], { maxPrecopyRounds: 4 }).action, 'continue-precopy');
});

test('switches to post-copy when pre-copy is not converging', () => {
  const d = decideHybridSwitch(stats({ round: 4, dirtyPages: 21_000 }), [20_000, 22_000, 21_500, 20_500], { maxPrecopyRounds: 10, notConvergingRounds: 3 });
  assert.deepEqual([d.action, d.reason], ['switch-to-postcopy', 'not-converging']);
  assert.equal(d.precopy.notConverging, true);
  const shrinking = decideHybridSwitch(stats({ round: 4, dirtyPages: 19_000 }), [20_000, 22_000, 21_500, 20_500], { maxPrecopyRounds: 10, notConvergingRounds: 3 });
  assert.equal(shrinking.action, 'continue-precopy');
});

test('switches when the guest dirties at least as fast as the link drains (λ ≥ 1), but not in round 0', () => {
  assert.equal(decideHybridSwitch(stats({ dirtyRateBytesPerSec: 100e6 }), [30_000], { maxPrecopyRounds: 10 }).reason, 'dirty-rate');
  assert.equal(decideHybridSwitch(stats({ dirtyRateBytesPerSec: 99e6 }), [30_000], { maxPrecopyRounds: 10 }).reason, 'continue');
  assert.equal(decideHybridSwitch(stats({ round: 0, dirtyRateBytesPerSec: 200e6 }), [], { maxPrecopyRounds: 10 }).reason, 'continue');
});

test('pre-copy hard stops become switches', () => {
  const d = decideHybridSwitch(stats({ bytesSentTotal: 4 * 256 * MiB }), [30_000], { maxPrecopyRounds: 10 });
  assert.deepEqual([d.action, d.reason], ['switch-to-postcopy', 'sent-too-much']);
});

test('HybridSwitchPolicy tracks the dirty history itself', () => {
  const p = new HybridSwitchPolicy({ maxPrecopyRounds: 10, notConvergingRounds: 2 });
  assert.equal(p.decide(stats({ round: 0, dirtyPages: 30_000 })).action, 'continue-precopy');
  assert.equal(p.decide(stats({ round: 1, dirtyPages: 30_000 })).action, 'continue-precopy');
  const d = p.decide(stats({ round: 2, dirtyPages: 31_000 }));
  assert.deepEqual([d.action, d.reason], ['switch-to-postcopy', 'not-converging']);
});

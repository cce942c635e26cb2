import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeStopReason } from '../../src/core/policy/reasons.js';
import { decidePrecopyStop, type PrecopyRoundStats } from '../../src/core/policy/precopy.js';
import { decideHybridSwitch } from '../../src/core/policy/hybrid.js';

test('stop reasons: each policy code in words, the code kept after them', () => {
  assert.equal(describeStopReason('converged', 'precopy'), 'pre-copy converged: the pages still dirty fit the downtime budget (converged)');
  // A pre-copy that did not converge says its stop-and-copy went beyond the budget; hybrid that it switched.
  assert.match(describeStopReason('sent-too-much', 'precopy'), /^pre-copy had sent its limit .* without converging; the stop-and-copy sent everything still dirty, beyond what the downtime budget allows \(sent-too-much\)$/);
  assert.match(describeStopReason('sent-too-much', 'hybrid'), /without converging; hybrid switched to post-copy \(sent-too-much\)$/);
  assert.match(describeStopReason('round-limit', 'precopy'), /round limit without converging; the stop-and-copy .* \(round-limit\)$/);
  assert.match(describeStopReason('dirty-rate', 'hybrid'), /as fast as the link sends it; hybrid switched to post-copy \(dirty-rate\)$/);
  assert.equal(describeStopReason('postcopy', 'postcopy'), 'post-copy from the start (postcopy)');
  assert.equal(describeStopReason('something-new', 'precopy'), 'something-new');
});

test('stop reasons: every code the policies can give has words', () => {
  const stats = (o: Partial<PrecopyRoundStats>): PrecopyRoundStats => ({ round: 1, pagesSentRound: 256, pagesSentTotal: 512, memoryBytes: 1 << 20, bytesSentTotal: 1 << 20, dirtyPages: 100, bandwidthBytesPerSec: 1e6, dirtyRateBytesPerSec: 1e5, ...o });
  const codes = new Set<string>();
  for (const s of [stats({ dirtyPages: 0 }), stats({ round: 29 }), stats({ round: 2 }), stats({ bytesSentTotal: 4 << 20 }), stats({ dirtyRateBytesPerSec: 1e7 }), stats({})]) {
    codes.add(decidePrecopyStop(s, [10, 20, 30, 40], { stopWhenNotConverging: true }).reason);
    codes.add(decideHybridSwitch(s, [10, 20, 30, 40]).reason);
    codes.add(decideHybridSwitch(s, []).reason);
    codes.add(decidePrecopyStop(s, []).reason);
  }
  codes.delete('continue');
  assert.equal(codes.size, 6, `codes reached: ${[...codes].join(', ')}`);
  for (const c of codes) assert.notEqual(describeStopReason(c, 'precopy'), c, `no words for ${c}`);
});

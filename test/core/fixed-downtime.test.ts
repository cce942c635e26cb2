import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FixedDowntimeLearner } from '../../src/core/policy/fixed-downtime.js';

const run = (downtimeMs: number | null, estimatedDowntimeMs: number | null, fixedDowntimeMs: number | null = 0) => ({ downtimeMs, estimatedDowntimeMs, fixedDowntimeMs });

test('fixed downtime learnt: the median of what eq. (2) missed, per destination, from the newest 8 migrations', () => {
  const l = new FixedDowntimeLearner();
  assert.equal(l.fixedFor('b:1'), 0, 'nothing learnt yet');
  l.record('b:1', run(5, 1)); // missed 4
  assert.equal(l.fixedFor('b:1'), 4);
  // An estimate that held 3 ms of fixed part already: eq. (2) was 2 of its 5, the miss 7 − 2.
  l.record('b:1', run(7, 5, 3));
  assert.equal(l.fixedFor('b:1'), 4.5, 'the median of 4 and 5');
  l.record('b:1', run(1, 2)); // faster than eq. (2) said: no fixed part, not a negative one
  assert.equal(l.fixedFor('b:1'), 4);
  // Post-copy, or a hybrid that switched, made no estimate: it teaches nothing.
  l.record('b:1', run(3, null));
  l.record('b:1', run(null, null, null));
  assert.equal(l.samples('b:1'), 3);
  assert.equal(l.fixedFor('c:1'), 0, 'another destination learns apart');
  for (let i = 0; i < 8; i++) l.record('b:1', run(11, 1)); // the newest 8 miss 10 each
  assert.equal(l.samples('b:1'), 8);
  assert.equal(l.fixedFor('b:1'), 10, 'the older ones are forgotten');
  assert.deepEqual(JSON.parse(JSON.stringify(l)), { 'b:1': { ms: 10, migrations: 8 } });
});

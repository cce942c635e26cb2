import { test } from 'node:test';
import assert from 'node:assert/strict';
import { precopyBytesLeft, sampledDirtyCurve, type PrecopyForecastInput } from '../../src/core/policy/forecast.js';
import { HybridSwitchPolicy } from '../../src/core/policy/hybrid.js';
import { PrecopyStopPolicy } from '../../src/core/policy/precopy.js';

const MiB = 1 << 20;
const PAGE = 4096;

function input(o: Partial<PrecopyForecastInput>): PrecopyForecastInput {
  return { round: 1, roundBytes: 32 * MiB, leftBytes: 32 * MiB, bytesSentTotal: 32 * MiB, pagesSentTotal: 8192, memoryBytes: 32 * MiB, bandwidthBytesPerSec: 25e6, dirtyRateBytesPerSec: 25e6, history: [8192], ...o };
}

test('forecast: a pre-copy that cannot converge runs until its limit on bytes sent, then copies what is dirty', () => {
  // The case that showed the old ETA wrong: 32 MiB in use, all of it dirtied as fast as the link
  // sends it. Rounds 1-3 each send 32 MiB; after round 3, 128 MiB sent is over 3 × 32 MiB and the
  // stop-and-copy sends the last 32 MiB. (The ETA had said 1.3 s, what one round takes, then 0.)
  const policy = new PrecopyStopPolicy();
  const left = precopyBytesLeft(input({}), (s, h) => policy.ends(s, h));
  assert.equal(left, 4 * 32 * MiB);
  // Halfway through round 2: 16 MiB of it, round 3, the final round.
  assert.equal(precopyBytesLeft(input({ round: 2, leftBytes: 16 * MiB, bytesSentTotal: 80 * MiB, history: [8192, 8192] }), (s, h) => policy.ends(s, h)), 16 * MiB + 2 * 32 * MiB);
  assert.equal(policy.history.length, 0, 'a forecast records nothing in the policy');
});

test('forecast: a converging pre-copy shrinks its rounds by the dirty rate over the bandwidth, as eq. (3) says, until they fit the budget', () => {
  // Dirtying at a quarter of the link: each round a quarter of the one before, from a 1 GiB first
  // pass just finished, until the dirty set goes in the 300 ms budget.
  const b = 100e6;
  const d = 25e6;
  const policy = new PrecopyStopPolicy();
  const left = precopyBytesLeft(input({ round: 0, roundBytes: 1024 * MiB, leftBytes: 0, bytesSentTotal: 1024 * MiB, pagesSentTotal: 262144, memoryBytes: 1024 * MiB, bandwidthBytesPerSec: b, dirtyRateBytesPerSec: d, history: [] }), (s, h) => policy.ends(s, h))!;
  // Eq. (3): v_{i+1} = v_i · d / b, each round's set dirtied while the one before went; the last
  // one, the first to fit the budget at the bandwidth, is the stop-and-copy's.
  let v = 1024 * MiB;
  let want = 0;
  for (;;) {
    v = (v * d) / b;
    want += v;
    if ((v / b) * 1000 <= 300) break;
  }
  assert.ok(Math.abs(left - want) <= PAGE, `forecast ${left} B, eq. (3) ${want} B`);
  // Round 1 would be 256 MiB (2.7 s), round 2 64 MiB (671 ms), round 3 16 MiB (168 ms): stop.
  assert.ok(Math.abs(left - (256 + 64 + 16) * MiB) <= 3 * PAGE);
});

test('forecast: hybrid ends at its bounded rounds and pushes what is dirty; nothing known gives nothing or null', () => {
  const hybrid = new HybridSwitchPolicy({ maxPrecopyRounds: 3, maxDirtyToBandwidth: 10 });
  // Round 1 in progress; round 2 is the last pre-copy round (3 bounded), then the push of 32 MiB.
  assert.equal(precopyBytesLeft(input({}), (s, h) => hybrid.ends(s, h)), 32 * MiB + 32 * MiB + 32 * MiB);
  const policy = new PrecopyStopPolicy();
  // During the first pass no dirty rate is known yet: only the rest of the pass.
  assert.equal(precopyBytesLeft(input({ round: 0, leftBytes: 5 * MiB, dirtyRateBytesPerSec: 0, history: [] }), (s, h) => policy.ends(s, h)), 5 * MiB);
  assert.equal(precopyBytesLeft(input({ bandwidthBytesPerSec: 0 }), (s, h) => policy.ends(s, h)), null);
  assert.equal(precopyBytesLeft(input({}), () => false), null, 'a policy that never stops has no forecast');
});

test('HIST: a working set that fills up early is forecast as full every round, where the rate over a long pass said it would shrink', () => {
  // Sampled during a 2.6 s first pass: 8192 pages (32 MiB) dirty within 50 ms, then no more.
  const samples: [number, number][] = [[20, 3300], [40, 6500], [60, 8192], [300, 8192], [1300, 8192], [2600, 8192]];
  const curve = sampledDirtyCurve(samples)!;
  assert.equal(curve(10), 1650 * PAGE, 'interpolated from zero before the first sample');
  assert.equal(curve(30), 4900 * PAGE);
  assert.equal(curve(2000), 8192 * PAGE);
  assert.equal(curve(10_000), 8192 * PAGE, 'flat past the last sample: the set has filled');
  // The rate over the pass says 32 MiB per 2.6 s (12.3 MiB/s): forecast from it, round 1 would
  // leave 16 MiB dirty and the rounds would shrink until they fit the budget. The curve says every
  // round leaves the whole 32 MiB: pre-copy runs to its limit on bytes sent, then copies 32 MiB.
  const policy = new PrecopyStopPolicy();
  const at = input({ bandwidthBytesPerSec: 25e6, dirtyRateBytesPerSec: (32 * MiB) / 2.6 });
  const byRate = precopyBytesLeft(at, (s, h) => policy.ends(s, h))!;
  const byCurve = precopyBytesLeft({ ...at, dirty: curve }, (s, h) => policy.ends(s, h));
  assert.equal(byCurve, 4 * 32 * MiB);
  assert.ok(byRate < 2 * 32 * MiB, `the rate alone forecast ${byRate / MiB} MiB`);
  assert.equal(sampledDirtyCurve([[20, 3300]]), null, 'one sample is no curve');
  // Past the last sample a curve still climbing goes on at its last quarter's slope.
  const climbing = sampledDirtyCurve([[100, 100], [200, 200], [300, 300], [400, 400]])!;
  assert.equal(climbing(600), 600 * PAGE);
});

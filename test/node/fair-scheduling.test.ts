import { test } from 'node:test';
import assert from 'node:assert/strict';
import { getPriority } from 'node:os';
import { LATENCY_SLICE_US, fairScheduling, setFairScheduling } from '../../src/node/fair-scheduling.js';

test('fair scheduling: a thread asks for the latency slice and gets it where the kernel keeps slices, then goes back to the default', () => {
  const before = fairScheduling();
  assert.equal(before.nice, getPriority(0), 'the nice value is the one the kernel reports');
  try {
    setFairScheduling(before.nice, LATENCY_SLICE_US);
    const during = fairScheduling();
    assert.equal(during.nice, before.nice, 'the nice value is kept');
    // A kernel with slices of its own (Linux ≥ 6.12) reports one for every fair thread.
    if (before.sliceUs > 0) assert.equal(during.sliceUs, LATENCY_SLICE_US);
    else assert.equal(during.sliceUs, 0, 'no slices here: none reported');
  } finally {
    setFairScheduling(before.nice, 0);
  }
  assert.deepEqual(fairScheduling(), before, 'slice 0 is the kernel’s default again');
});

test('fair scheduling: a nice value the thread may take is set with the slice, and read back', () => {
  const before = fairScheduling();
  const lower = Math.min(19, before.nice + 1); // lowering priority is always permitted
  try {
    setFairScheduling(lower, LATENCY_SLICE_US);
    assert.equal(fairScheduling().nice, lower);
    assert.equal(getPriority(0), lower, 'node:os sees the same value');
  } finally {
    try {
      setFairScheduling(before.nice, 0);
    } catch {
      // Raising it back needs CAP_SYS_NICE: without it this thread stays one lower.
    }
  }
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { defaultStreams } from '../../src/node/agent/agent.js';

test('default parallel streams come from the mode and core count: one per core for pre-copy and hybrid where streams send from threads, else one per four cores; at least 1, at most 4', () => {
  const cores = [1, 2, 3, 4, 7, 8, 12, 16, 64];
  const perFour = [1, 1, 1, 1, 1, 2, 3, 4, 4];
  for (const mode of ['precopy', 'hybrid'] as const) {
    assert.deepEqual(cores.map((c) => defaultStreams(mode, c, true)), [1, 2, 3, 4, 4, 4, 4, 4, 4], mode);
    assert.deepEqual(cores.map((c) => defaultStreams(mode, c, false)), perFour, mode);
  }
  assert.deepEqual(cores.map((c) => defaultStreams('postcopy', c, true)), perFour, 'post-copy, with threads');
  assert.deepEqual(cores.map((c) => defaultStreams('postcopy', c, false)), perFour, 'post-copy, without');
});

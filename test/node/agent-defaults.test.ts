import { test } from 'node:test';
import assert from 'node:assert/strict';
import { defaultStreams } from '../../src/node/agent/agent.js';

test('default parallel streams come from the core count: one per core where streams send from threads, else one per four cores; at least 1, at most 4', () => {
  assert.deepEqual([1, 2, 3, 4, 7, 8, 12, 16, 64].map((c) => defaultStreams(c, true)), [1, 2, 3, 4, 4, 4, 4, 4, 4]);
  assert.deepEqual([1, 2, 3, 4, 7, 8, 12, 16, 64].map((c) => defaultStreams(c, false)), [1, 1, 1, 1, 1, 2, 3, 4, 4]);
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Bitmap } from '../../src/core/bitmap.js';

/** Runs of consecutive members, the slow way. */
function runsOf(members: number[]): [number, number][] {
  const out: [number, number][] = [];
  for (const p of members) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === p) last[1]++;
    else out.push([p, 1]);
  }
  return out;
}

test('Bitmap.runs: consecutive set bits as [first, count], across full and partial words, matching the members', () => {
  let seed = 7;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
  for (const [size, density] of [[1, 1], [31, 1], [32, 1], [33, 0.5], [100, 0], [1000, 0.97], [4096, 0.5], [5000, 0.02]] as const) {
    const b = new Bitmap(size);
    for (let i = 0; i < size; i++) if (rnd() < density) b.set(i);
    // Whole words set and runs across word edges.
    if (size >= 200) b.setRange(60, 170);
    const members = [...b];
    assert.deepEqual([...b.runs()], runsOf(members), `size ${size}, density ${density}`);
  }
  const full = new Bitmap(96);
  full.setAll();
  assert.deepEqual([...full.runs()], [[0, 96]]);
  assert.deepEqual([...new Bitmap(64).runs()], []);
});

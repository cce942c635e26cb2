import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Bitmap } from '../../src/core/bitmap.js';
import { absentAtSwitchover, warmSwitchover } from '../../src/core/engine/common.js';

/** A small deterministic PRNG (xorshift32), so a failure names its seed. */
function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    return x / 2 ** 32;
  };
}

/** Bits set with probability `p`, or long runs of set and clear bits (as real bitmaps have). */
function randomBits(size: number, r: () => number): Bitmap {
  const b = new Bitmap(size);
  const style = r();
  if (style < 0.2) return b;
  if (style < 0.35) { b.setAll(); return b; }
  if (style < 0.7) {
    for (let i = 0; i < size;) {
      const len = 1 + Math.floor(r() * 200);
      if (r() < 0.5) b.setRange(i, Math.min(size, i + len));
      i += len;
    }
    return b;
  }
  const p = r();
  for (let i = 0; i < size; i++) if (r() < p) b.set(i);
  return b;
}

test('absentAtSwitchover: the absent pages, their count and the cleared hashes are those of the plain computation, for 300 random cases', () => {
  for (let seed = 1; seed <= 300; seed++) {
    const r = prng(seed);
    const size = 1 + Math.floor(r() * 3000);
    const pages = Math.max(1, Math.min(size, Math.floor(r() * size * 1.2)));
    const received = randomBits(size, r);
    const stale = randomBits(pages, r);
    const soft = randomBits(pages, r);
    const hashes = new BigUint64Array(pages).map((_, i) => BigInt(i + 1));
    const { absent, missing } = absentAtSwitchover(size, pages, received.words, stale.words, soft.words, hashes);
    // The plain computation, page by page.
    const want: number[] = [];
    for (let p = 0; p < pages; p++) if ((!received.get(p) || stale.get(p)) && !soft.get(p)) want.push(p);
    assert.deepEqual([...absent], want, `seed ${seed}: absent pages`);
    assert.equal(missing, want.length, `seed ${seed}: count`);
    assert.equal(absent.size, size);
    for (let p = 0; p < pages; p++) {
      const cleared = want.includes(p) || soft.get(p);
      assert.equal(hashes[p], cleared ? 0n : BigInt(p + 1), `seed ${seed}: hash of page ${p}`);
    }
  }
});

test('absentAtSwitchover: stale and soft bitmaps shorter than the pages (empty on the wire) count as clear', () => {
  const hashes = new BigUint64Array(70).fill(5n);
  const received = new Bitmap(100);
  received.setRange(0, 64);
  const { absent, missing } = absentAtSwitchover(100, 70, received.words, new Uint32Array(0), new Uint32Array(0), hashes);
  assert.deepEqual([...absent], [64, 65, 66, 67, 68, 69]);
  assert.equal(missing, 6);
  assert.deepEqual([...hashes.subarray(60)], [5n, 5n, 5n, 5n, 0n, 0n, 0n, 0n, 0n, 0n]);
});

test('warmSwitchover: the sample STATE and SWITCHOVER survive their round trip (it lacks all but its last page, up to 64 Ki pages)', () => {
  for (const pages of [1, 2, 31, 32, 33, 1000, 65535, 65536]) assert.equal(warmSwitchover(pages), pages - 1, `${pages} pages`);
  // Larger VMs warm on a 64 Ki-page sample: enough for the loops, without a VM-sized scratch array.
  for (const pages of [65537, 1 << 20]) assert.equal(warmSwitchover(pages), 65535, `${pages} pages`);
  assert.equal(warmSwitchover(0), 0, 'an empty VM warms on one page');
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseSize, parseDuration, parseBandwidth } from '../../src/core/units.js';
import { InvalidArgumentError } from '../../src/core/errors.js';
import { Bitmap } from '../../src/core/bitmap.js';

test('parseSize understands binary and decimal units', () => {
  assert.equal(parseSize('512MiB'), 512 * 1024 * 1024);
  assert.equal(parseSize('4096'), 4096);
  assert.equal(parseSize('1.5GiB'), 1.5 * 1024 ** 3);
  assert.equal(parseSize('64kb'), 64000);
  assert.throws(() => parseSize('12 parsecs'), InvalidArgumentError);
  assert.throws(() => parseSize('-1MiB'), InvalidArgumentError);
});

test('parseDuration and parseBandwidth', () => {
  assert.equal(parseDuration('300ms'), 300);
  assert.equal(parseDuration('2s'), 2000);
  assert.equal(parseDuration('250us'), 0.25);
  assert.equal(parseBandwidth('1Gbit'), 125_000_000);
  assert.equal(parseBandwidth('50MB/s'), 50_000_000);
  assert.throws(() => parseBandwidth('fast'), InvalidArgumentError);
  assert.throws(() => parseDuration('soon'), InvalidArgumentError);
});

test('Bitmap set/iterate/count', () => {
  const b = new Bitmap(100);
  for (const i of [0, 5, 31, 32, 63, 99]) b.set(i);
  assert.deepEqual([...b], [0, 5, 31, 32, 63, 99]);
  assert.equal(b.count(), 6);
  b.clear(31);
  assert.equal(b.get(31), false);
  b.setAll();
  assert.equal(b.count(), 100);
  assert.deepEqual([...b].slice(-2), [98, 99]);
});

test('Bitmap.select: every page set in all of `all` and in none of `none`, page by page, and nothing from `bits` on', () => {
  const rnd = (seed: number) => { let x = seed; return () => ((x = (x * 1103515245 + 12345) >>> 0) >>> 16) & 1; };
  for (const [size, bits] of [[100, 100], [100, 70], [96, 64], [129, 33], [64, 0], [200, 300]] as const) {
    const r = rnd(size + bits);
    const [a, b, c] = [new Bitmap(size), new Bitmap(size), new Bitmap(size)];
    for (let p = 0; p < size; p++) {
      if (r()) a.set(p);
      if (r()) b.set(p);
      if (r()) c.set(p);
    }
    const short = new Bitmap(40); // shorter operands count as clear past their end
    for (let p = 0; p < 40; p += 3) short.set(p);
    const cases: [Bitmap[], Bitmap[], (p: number) => boolean][] = [
      [[a], [b, c], (p) => a.get(p) && !b.get(p) && !c.get(p)],
      [[a, b], [c], (p) => a.get(p) && b.get(p) && !c.get(p)],
      [[], [a, c], (p) => !a.get(p) && !c.get(p)],
      [[], [], () => true],
      [[a, short], [], (p) => a.get(p) && p < 40 && p % 3 === 0],
      [[b], [short], (p) => b.get(p) && !(p < 40 && p % 3 === 0)],
    ];
    for (const [all, none, want] of cases) {
      const got = Bitmap.select(size, bits, all, none);
      const expected: number[] = [];
      for (let p = 0; p < Math.min(size, bits); p++) if (want(p)) expected.push(p);
      assert.deepEqual([...got], expected, `size ${size}, bits ${bits}`);
      assert.equal(got.size, size);
    }
  }
});

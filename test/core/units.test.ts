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

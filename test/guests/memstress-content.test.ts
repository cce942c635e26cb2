/**
 * memstress content modes (zero=, text=, dup=, dupseed=, repeat=, wcontent=): the built guest on the
 * bare test host, its pages classified from their bytes alone and checked against what init prints,
 * with the project's real zstd and lz4 codecs measuring how they compress.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { RunStatus } from '../../src/core/abi.js';
import { lz4, zstd } from '../../src/node/codec/blob.js';
import { BareHost, GuestAbort } from '../helpers/bare-host.js';

const PAGE = 4096;
const GOLDEN = 0x9e3779b97f4a7c15n;
const U64 = (1n << 64n) - 1n;

const CLASSES = ['zero', 'text', 'dup', 'repeat', 'random'] as const;
type PageClass = (typeof CLASSES)[number];
type Counts = Record<PageClass, number>;

interface Booted { h: BareHost; base: number; mem: number; pages: number; counts: Counts }

function guest(name: string): string {
  const p = fileURLToPath(new URL(`../../../build/guests/${name}.wasm`, import.meta.url));
  assert.ok(existsSync(p), `${p} is missing: run node scripts/build-guests.mjs`);
  return p;
}

/** The regex of test/guests/guests.test.ts: the content counts are appended after what it reads. */
const REGION = /memstress: region (\d+) mem=(\d+) wss=(\d+) pattern=\S+(?: hotbytes=(\d+))?/;
const LINE = /memstress: region (\d+) mem=(\d+) wss=\d+ pattern=\S+(?: hotbytes=\d+)? write=\d+ seed=\d+ zero=(\d+) text=(\d+) dup=(\d+) repeat=(\d+) random=(\d+)\n/;

function boot(config: string): Booted {
  const h = BareHost.boot(guest('memstress'), { config });
  assert.match(h.console, REGION);
  const m = LINE.exec(h.console);
  assert.ok(m, `memstress prints its region and content: ${h.console}`);
  const [base, mem, zero, text, dup, repeat, random] = m.slice(1).map(Number);
  return { h, base, mem, pages: Math.floor(mem / PAGE), counts: { zero, text, dup, repeat, random } };
}

const page = (b: Booted, p: number) => b.h.bytes().subarray(b.base + p * PAGE, b.base + (p + 1) * PAGE);
const hash = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');
const isZero = (bytes: Uint8Array) => bytes.every((c) => c === 0);
const isText = (bytes: Uint8Array) => bytes.every((c) => c === 10 || (c >= 32 && c < 127));
const same = (x: Uint8Array, y: Uint8Array) => Buffer.from(x.buffer, x.byteOffset, x.length).equals(y);
const digest = (b: Booted) => hash(b.h.bytes());

/** Shannon entropy of the byte values, in bits per byte. */
function entropy(bytes: Uint8Array): number {
  const n = new Array<number>(256).fill(0);
  for (const c of bytes) n[c]++;
  let e = 0;
  for (const k of n) if (k) e -= (k / bytes.length) * Math.log2(k / bytes.length);
  return e;
}

/**
 * Each page's class from bytes alone. `twin` is the same configuration booted with another seed
 * (same mem, dup and dupseed): a non-zero page identical to the twin's page at the same place is
 * dup; a non-zero page whose bytes occur more than once in the VM is repeat.
 */
function classify(b: Booted, twin: Booted): PageClass[] {
  const seen = new Map<string, number>();
  const hashes: string[] = [];
  for (let p = 0; p < b.pages; p++) {
    const hx = hash(page(b, p));
    hashes.push(hx);
    seen.set(hx, (seen.get(hx) ?? 0) + 1);
  }
  return hashes.map((hx, p) => {
    const bytes = page(b, p);
    if (isZero(bytes)) return 'zero';
    if (same(bytes, page(twin, p))) return 'dup';
    if (isText(bytes)) return 'text';
    if (seen.get(hx)! > 1) return 'repeat';
    return 'random';
  });
}

function tally(classes: PageClass[]): Counts {
  const c: Counts = { zero: 0, text: 0, dup: 0, repeat: 0, random: 0 };
  for (const k of classes) c[k]++;
  return c;
}

const pagesOf = (classes: PageClass[], k: PageClass) => classes.flatMap((c, p) => (c === k ? [p] : []));

const MIX = 'mem=8MiB zero=0.1 text=0.25 dup=0.2 repeat=0.05';
const FRACTIONS: Record<Exclude<PageClass, 'random'>, number> = { zero: 0.1, text: 0.25, dup: 0.2, repeat: 0.05 };

test('memstress content: page classes by content match the printed counts and the fractions, interleaved', () => {
  const a = boot(`${MIX} seed=1 dupseed=7`);
  const b = boot(`${MIX} seed=2 dupseed=7`);
  assert.equal(a.pages, 2048);
  for (const [k, f] of Object.entries(FRACTIONS)) {
    const n = a.counts[k as PageClass];
    assert.ok(Math.abs(n - f * a.pages) < 1, `${k}=${n} for ${f} of ${a.pages} pages`);
  }
  assert.equal(CLASSES.reduce((n, k) => n + a.counts[k], 0), a.pages);
  assert.deepEqual(b.counts, a.counts, 'the counts depend on mem and the fractions only');
  const classes = classify(a, b);
  assert.deepEqual(tally(classes), a.counts);
  // interleaved: every eighth of the region holds roughly its share of every class
  for (let slice = 0; slice < 8; slice++) {
    const part = tally(classes.slice(slice * 256, (slice + 1) * 256));
    for (const k of CLASSES) {
      const want = (a.counts[k] / a.pages) * 256;
      assert.ok(part[k] >= 0.4 * want && part[k] <= 1.6 * want, `slice ${slice}: ${k}=${part[k]}, expected about ${want.toFixed(1)}`);
    }
  }
});

test('memstress content: zero pages are zero, text pages compress ~3× and have low entropy, the others do not compress', () => {
  const a = boot(`${MIX} seed=3 dupseed=7`);
  const classes = classify(a, boot(`${MIX} seed=4 dupseed=7`));
  const z = zstd();
  const l = lz4();
  const size = (out: Uint8Array | null) => out?.length ?? PAGE;
  for (const p of pagesOf(classes, 'zero')) assert.ok(isZero(page(a, p)));
  let zBytes = 0;
  let lBytes = 0;
  const text = pagesOf(classes, 'text');
  for (const p of text) {
    const bytes = page(a, p);
    const zs = size(z.compress(bytes));
    assert.ok(zs <= PAGE / 2, `text page ${p}: zstd ${zs} bytes`);
    assert.ok(entropy(bytes) < 5, `text page ${p}: ${entropy(bytes).toFixed(2)} bits/byte`);
    zBytes += zs;
    lBytes += size(l.compress(bytes));
  }
  const zRatio = (text.length * PAGE) / zBytes;
  const lRatio = (text.length * PAGE) / lBytes;
  assert.ok(zRatio >= 2.5 && zRatio <= 4, `text pages: zstd ${zRatio.toFixed(2)}×`);
  assert.ok(lRatio >= 1.6 && lRatio <= 3, `text pages: lz4 ${lRatio.toFixed(2)}×`);
  for (const k of ['random', 'dup', 'repeat'] as const) {
    for (const p of pagesOf(classes, k)) {
      const bytes = page(a, p);
      assert.equal(z.compress(bytes), null, `${k} page ${p} compresses with zstd`);
      assert.ok(entropy(bytes) > 7.8, `${k} page ${p}: ${entropy(bytes).toFixed(2)} bits/byte`);
    }
  }
});

test('memstress content: dup pages are the same bytes at the same places across seeds, distinct within a VM, and follow dupseed', () => {
  const a = boot(`${MIX} seed=1 dupseed=7`);
  const b = boot(`${MIX} seed=2 dupseed=7`);
  const c = boot(`${MIX} seed=1 dupseed=8`);
  const classesA = classify(a, b);
  const classesB = classify(b, a);
  const dupA = pagesOf(classesA, 'dup');
  assert.equal(dupA.length, a.counts.dup);
  assert.deepEqual(pagesOf(classesB, 'dup'), dupA, 'same positions in both VMs');
  assert.equal(new Set(dupA.map((p) => hash(page(a, p)))).size, dupA.length, 'dup pages are pairwise distinct');
  // every other page differs between the two seeds, except pages zero in both
  for (let p = 0; p < a.pages; p++) {
    if (classesA[p] === 'dup' || (classesA[p] === 'zero' && classesB[p] === 'zero')) continue;
    assert.ok(!same(page(a, p), page(b, p)), `page ${p} (${classesA[p]} / ${classesB[p]}) is the same across seeds`);
  }
  // another dupseed: other positions, and none of a's dup content anywhere in c
  const classesC = classify(c, boot(`${MIX} seed=2 dupseed=8`));
  const dupC = pagesOf(classesC, 'dup');
  assert.equal(dupC.length, a.counts.dup);
  assert.notDeepEqual(dupC, dupA);
  const inC = new Set(Array.from({ length: c.pages }, (_, p) => hash(page(c, p))));
  for (const p of dupA) assert.ok(!inC.has(hash(page(a, p))), `a's dup page ${p} appears in the VM with another dupseed`);
});

test('memstress content: repeat pages are copies of 4 templates; random pages are what memstress always wrote', () => {
  const a = boot(`${MIX} seed=5 dupseed=7`);
  const classes = classify(a, boot(`${MIX} seed=6 dupseed=7`));
  const groups = new Map<string, number>();
  for (const p of pagesOf(classes, 'repeat')) {
    const hx = hash(page(a, p));
    groups.set(hx, (groups.get(hx) ?? 0) + 1);
  }
  assert.equal(groups.size, 4);
  const sizes = [...groups.values()];
  assert.equal(sizes.reduce((x, y) => x + y, 0), a.counts.repeat);
  assert.ok(Math.max(...sizes) - Math.min(...sizes) <= 1, `templates used round-robin: ${sizes}`);
  const random = pagesOf(classes, 'random');
  assert.equal(new Set(random.map((p) => hash(page(a, p)))).size, random.length, 'random pages are pairwise distinct');
  // word i of a random page is (i × golden) xor one constant that depends on the seed, as without content modes
  const plain = boot('mem=8MiB seed=5');
  assert.deepEqual(plain.counts, { zero: 0, text: 0, dup: 0, repeat: 0, random: 2048 });
  const mixOf = (b: Booted, word: number) => new DataView(b.h.memory.buffer).getBigUint64(b.base + word * 8, true) ^ ((BigInt(word) * GOLDEN) & U64);
  const mix = mixOf(plain, 0);
  for (let w = 0; w < plain.mem / 8; w += 97) assert.equal(mixOf(plain, w), mix);
  for (const p of random) for (let w = p * 512; w < (p + 1) * 512; w += 31) assert.equal(mixOf(a, w), mix, `random page ${p}`);
});

test('memstress content: same configuration and seed → the same memory', () => {
  const config = `${MIX} seed=9 dupseed=3`;
  assert.equal(digest(boot(config)), digest(boot(config)));
  assert.notEqual(digest(boot(config)), digest(boot(`${MIX} seed=10 dupseed=3`)));
  assert.notEqual(digest(boot(config)), digest(boot(`${MIX} seed=9 dupseed=4`)));
});

test('memstress content: edge configurations', () => {
  // fractions that sum to 1 (0.1 + 0.2 + 0.3 + 0.4 is 1.0000000000000002 in floating point)
  const full = boot('mem=4MiB zero=0.1 text=0.2 dup=0.3 repeat=0.4');
  assert.deepEqual(full.counts, { zero: 102, text: 204, dup: 307, repeat: 409, random: 2 });
  const zero = boot('mem=4MiB zero=1');
  assert.deepEqual(zero.counts, { zero: 1024, text: 0, dup: 0, repeat: 0, random: 0 });
  assert.ok(isZero(zero.h.bytes().subarray(zero.base, zero.base + zero.mem)));
  // a partial last page is random and not counted
  const odd = boot('mem=1000000 text=0.5');
  assert.deepEqual(odd.counts, { zero: 0, text: 122, dup: 0, repeat: 0, random: 122 });
  assert.ok(!isZero(odd.h.bytes().subarray(odd.base + 244 * PAGE, odd.base + odd.mem)));
  // explicit zeros are the default (the region only: the configuration text itself is in memory too)
  const region = (b: Booted) => hash(b.h.bytes().subarray(b.base, b.base + b.mem));
  assert.equal(region(boot('mem=2MiB zero=0 text=0 dup=0 repeat=0 wcontent=keep')), region(boot('mem=2MiB')));
  // hotcold's hotbytes stays where guests.test.ts reads it
  const hc = boot('mem=2MiB pattern=hotcold dup=0.5');
  assert.equal(Number(REGION.exec(hc.h.console)![4]), Math.floor((0.1 * hc.mem) / 8) * 8);
  assert.equal(hc.counts.dup, 256);
});

test('memstress content: bad content configuration is refused with a named error', () => {
  const refused: [string, RegExp][] = [
    ['zero=0.6 text=0.5', /zero \+ text \+ dup \+ repeat must not exceed 1/],
    ['dup=0.5 repeat=0.3 zero=0.3', /must not exceed 1/],
    ['repeat=1.5', /repeat must be a fraction between 0 and 1/],
    ['text=2', /text must be a fraction between 0 and 1/],
    ['dup=-0.1', /bad configuration value/], // the console names the key: "config: bad value for 'dup'"
    ['zero=lots', /bad configuration value/],
    ['text=0.5x', /bad configuration value/],
    ['dup=0.5 dupseed=seven', /bad configuration value/],
    ['wcontent=bogus', /wcontent must be random or keep/],
  ];
  for (const [config, message] of refused) {
    assert.throws(() => BareHost.boot(guest('memstress'), { config: `mem=1MiB ${config}` }), (e: unknown) => e instanceof GuestAbort && message.test(e.message), config);
  }
});

test('memstress content: wcontent=keep dirties zero, dup and repeat pages without changing them and keeps text pages text', () => {
  for (const pattern of ['uniform', 'hotcold', 'zipf', 'sequential']) {
    for (const write of [1, 8]) {
      const config = `${MIX} pattern=${pattern} write=${write} dupseed=7`;
      const a = boot(`${config} seed=1 wcontent=keep`);
      const classes = classify(a, boot(`${config} seed=2`));
      const before = a.h.bytes().slice();
      const writes = pattern === 'sequential' ? (a.mem / write) * 1.5 : 400_000;
      assert.equal(a.h.run(writes), RunStatus.RUNNING);
      assert.equal(a.h.progress(), BigInt(writes));
      const changed = new Set<number>();
      for (let p = 0; p < a.pages; p++) {
        const off = a.base + p * PAGE;
        if (!same(before.subarray(off, off + PAGE), page(a, p))) changed.add(p);
      }
      const where = `${pattern}/${write}`;
      for (const k of ['zero', 'dup', 'repeat'] as const) {
        for (const p of pagesOf(classes, k)) assert.ok(!changed.has(p), `${where}: ${k} page ${p} changed`);
      }
      for (const p of pagesOf(classes, 'text')) assert.ok(isText(page(a, p)), `${where}: text page ${p} holds non-text`);
      // the hottest pages of every pattern are among the first 256; there, text and random pages change
      for (const k of ['text', 'random'] as const) {
        const hot = pagesOf(classes, k).filter((p) => p < 16);
        assert.ok(hot.length > 0 && hot.every((p) => changed.has(p)), `${where}: ${k} pages ${hot} not all written`);
      }
    }
  }
  // wcontent=random (the default) writes random words whatever the page
  const r = boot(`${MIX} seed=1 dupseed=7`);
  const classes = classify(r, boot(`${MIX} seed=2 dupseed=7`));
  r.h.run(400_000);
  for (const p of pagesOf(classes, 'zero')) assert.ok(!isZero(page(r, p)), `zero page ${p} still zero after random writes`);
  for (const p of pagesOf(classes, 'text')) assert.ok(!isText(page(r, p)), `text page ${p} still text after random writes`);
});

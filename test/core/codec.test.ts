import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import binaryen from 'binaryen';
import {
  CodecError, CodecErrorCode, CompressionController, DEFAULT_CODEC_IDS, ThroughputController, DedupIndex, DedupStore, MAX_ENCODED_PAGE_BYTES, RAW_CODEC_ID,
  ZERO_CODEC_ID, ZERO_SCAN_WASM, decodeBatch, encodeBatch, packBatch, unpackBatch, ZERO_SCAN_WASM_SHARED, adaptiveDecoder, adaptiveEncoder, chain, classifyPage, codecFail,
  dedup, isZeroJs, pageHash, readVarint, sampleEntropy, writeVarint, xbzrle, xbzrleDecodePage, zero, zeroScanner,
  type BlobCodec, type PageCodec,
} from '../../src/core/codec/index.js';
import { FerryError } from '../../src/core/errors.js';
import { PAGE_SIZE } from '../../src/core/pages.js';
import { PageSlab } from '../../src/core/codec/page-slab.js';
import { codecSuite } from '../helpers/codec-suite.js';
import { concat, corpus, gangCorpus, mutate, randomPage, rng, textPage } from '../helpers/page-corpus.js';

await codecSuite({ name: 'zero', setup: () => ({ kind: 'page', codec: zero() }), skip: { truncation: 'a zero page carries no bytes: nothing to truncate' } });
await codecSuite({ name: 'zero (JS path, no SIMD)', setup: () => ({ kind: 'page', codec: zero({ simd: false }) }), skip: { truncation: 'a zero page carries no bytes: nothing to truncate' } });
await codecSuite({ name: 'xbzrle', setup: () => ({ kind: 'page', codec: xbzrle({ cacheBytes: 1 << 20 }) }) });
await codecSuite({ name: 'xbzrle (4-page cache: constant eviction)', setup: () => ({ kind: 'page', codec: xbzrle({ cacheBytes: 4 * PAGE_SIZE }) }) });
await codecSuite({ name: 'dedup', setup: () => ({ kind: 'page', codec: dedup({ indexInit: { capacityBytes: 1 << 20 }, storeInit: { capacityBytes: 1 << 20 } }) }) });
await codecSuite({
  name: 'dedup (every hash collides)',
  setup: () => ({ kind: 'page', codec: dedup({ indexInit: { capacityBytes: 64 * PAGE_SIZE, hash: () => 42 }, storeInit: { capacityBytes: 64 * PAGE_SIZE } }) }),
});
await codecSuite({
  name: 'chain zero+xbzrle+dedup',
  setup: () => ({ kind: 'page', codec: chain([zero(), xbzrle({ cacheBytes: 1 << 20 }), dedup({ indexInit: { capacityBytes: 1 << 20 }, storeInit: { capacityBytes: 1 << 20 } })]) }),
});

/** Sender → receiver loop over a page codec, with the destination's memory as a map. */
function link(codec: PageCodec) {
  const enc = codec.createEncoder();
  const dec = codec.createDecoder();
  const dest = new Map<number, Uint8Array>();
  return {
    enc, dec, dest,
    send(i: number, page: Uint8Array) {
      const d = dest.get(i) ?? new Uint8Array(PAGE_SIZE);
      dest.set(i, d);
      const e = enc.encode(i, page);
      if (e) dec.decode(i, e.codecId, e.bytes, d); else { d.set(page); dec.delivered(i, d); }
      return e;
    },
  };
}

describe('codec errors', () => {
  test('CodecError is a named FerryError with a stable code', () => {
    try {
      codecFail(CodecErrorCode.CORRUPT, 'x');
    } catch (e) {
      assert.ok(e instanceof CodecError && e instanceof FerryError);
      assert.equal(e.name, 'CodecError');
      assert.equal(e.code, 'ERR_CODEC_CORRUPT');
    }
  });
  test('varints: round trip, bounds, minimal encoding', () => {
    const buf = new Uint8Array(8);
    for (const v of [0, 1, 127, 128, 4096, 2 ** 21, 2 ** 28 - 1]) {
      const n = writeVarint(buf, 0, v);
      assert.deepEqual(readVarint(buf, 0, 'v'), [v, n]);
    }
    assert.throws(() => readVarint(new Uint8Array([0x80, 0x00]), 0, 'v'), CodecError);
    assert.throws(() => readVarint(new Uint8Array([0x80, 0x80, 0x80, 0x80, 0x01]), 0, 'v'), CodecError);
    assert.throws(() => readVarint(new Uint8Array([0x80]), 0, 'v'), CodecError);
  });
});

describe('packed batches', () => {
  const make = () => {
    const codec = chain([zero(), xbzrle({ cacheBytes: 1 << 20 }), dedup()]);
    const pages = corpus('mixed', 20, 4).pages;
    return { codec, pages, packed: packBatch(encodeBatch(codec.createEncoder(), pages.map((_, i) => i), concat(pages))) };
  };

  test('malformed headers and entries are refused with named codes', () => {
    const { packed } = make();
    const code = (buf: Uint8Array, c: string, limits?: { maxPages?: number }) =>
      assert.throws(() => unpackBatch(buf, limits), (e: unknown) => e instanceof CodecError && e.code === c);
    code(packed.subarray(0, 4), CodecErrorCode.CORRUPT);
    const v = packed.slice(); v[0] = 2; code(v, CodecErrorCode.CORRUPT);
    const huge = packed.slice(); new DataView(huge.buffer).setUint32(1, 0xffffffff, true); code(huge, CodecErrorCode.LIMIT);
    code(packed, CodecErrorCode.LIMIT, { maxPages: 19 });
    const many = packed.slice(); new DataView(many.buffer).setUint32(1, 4000, true); assert.throws(() => unpackBatch(many), CodecError);
    code(many.subarray(0, 5 + 100), CodecErrorCode.CORRUPT); // 4000 entries cannot fit in 105 bytes
    const len = packed.slice(); new DataView(len.buffer).setUint32(5 + 5, 0x7fffffff, true); code(len, CodecErrorCode.LIMIT);
    const short = packed.slice(); new DataView(short.buffer).setUint32(5 + 5, 1, true); code(short, CodecErrorCode.CORRUPT);
    code(packed.subarray(0, packed.length - 1), CodecErrorCode.CORRUPT);
    const extra = new Uint8Array(packed.length + 1); extra.set(packed); code(extra, CodecErrorCode.CORRUPT);
  });

  test('bit flips anywhere in a packed batch: a CodecError or pages within bounds, never another error', () => {
    const { codec, packed } = make();
    const r = rng(50);
    for (let k = 0; k < 400; k++) {
      const b = packed.slice();
      const bit = Math.floor(r() * b.length * 8);
      b[bit >> 3] ^= 1 << (bit & 7);
      try {
        const batch = unpackBatch(b);
        decodeBatch(codec.createDecoder(), batch, new Uint8Array(batch.count * PAGE_SIZE));
      } catch (e) {
        assert.ok(e instanceof CodecError, `bit ${bit}: ${(e as Error).name}: ${(e as Error).message}`);
      }
    }
  });

  test('batch helpers refuse wrong sizes (caller errors)', () => {
    const enc = zero().createEncoder();
    assert.throws(() => encodeBatch(enc, [1, 2], new Uint8Array(PAGE_SIZE)), RangeError);
    assert.throws(() => encodeBatch(enc, [1, 2], new Uint8Array(2 * PAGE_SIZE), { maxPages: 1 }), RangeError);
    assert.throws(() => encodeBatch(enc, [1, 2], new Uint8Array(2 * PAGE_SIZE), { out: new Uint8Array(2 * MAX_ENCODED_PAGE_BYTES - 1) }), RangeError);
  });

  test('a batch encoded into a reused buffer, packed whole or a chosen subset at a time, unpacks to the same entries', () => {
    const codec = chain([zero(), dedup()]);
    const enc = codec.createEncoder();
    const out = new Uint8Array(20 * MAX_ENCODED_PAGE_BYTES);
    const pages = corpus('mixed', 20, 5).pages;
    const batch = encodeBatch(enc, pages.map((_, i) => 100 + i), concat(pages), { out });
    assert.equal(batch.bytes.buffer, out.buffer, 'the entries went into the buffer given');
    const keep = [17, 3, 9];
    const some = unpackBatch(packBatch(batch, keep));
    const all = unpackBatch(packBatch(batch));
    assert.deepEqual([...some.indices], [117, 103, 109], 'the chosen entries, in the order chosen');
    keep.forEach((k, j) => {
      assert.equal(some.codecIds[j], all.codecIds[k]);
      assert.deepEqual(some.bytes.subarray(some.offsets[j], some.offsets[j + 1]), all.bytes.subarray(all.offsets[k], all.offsets[k + 1]));
    });
    // Packed, the entries are copies: encoding the next batch into the same buffer leaves them alone.
    const packed = packBatch(batch, keep);
    const before = packed.slice();
    encodeBatch(enc, pages.map((_, i) => 200 + i), concat(corpus('random', 20, 6).pages), { out });
    assert.deepEqual(packed, before);
  });
});

describe('zero', () => {
  test('the embedded Wasm is what binaryen builds from the WAT', () => {
    const wat = (shared: boolean) => `(module (import "e" "m" (memory 0 ${shared ? '65536 shared' : ''}))
      (func $z (export "z") (param $p i32) (param $n i32) (result i32) (local $end i32)
        (local.set $end (i32.add (local.get $p) (local.get $n)))
        (block $out (loop $l (br_if $out (i32.ge_u (local.get $p) (local.get $end)))
          (if (v128.any_true (v128.or (v128.or (v128.load (local.get $p)) (v128.load offset=16 (local.get $p)))
                                      (v128.or (v128.load offset=32 (local.get $p)) (v128.load offset=48 (local.get $p)))))
            (then (return (i32.const 0))))
          (local.set $p (i32.add (local.get $p) (i32.const 64))) (br $l)))
        (i32.const 1))
      (func (export "f") (param $p i32) (param $count i32) (param $zero i32) (result i32) (local $k i32)
        (block $out (loop $l (br_if $out (i32.ge_u (local.get $k) (local.get $count)))
          (br_if $out (i32.eq (call $z (i32.add (local.get $p) (i32.shl (local.get $k) (i32.const 12))) (i32.const 4096)) (local.get $zero)))
          (local.set $k (i32.add (local.get $k) (i32.const 1))) (br $l)))
        (local.get $k)))`;
    for (const [shared, bytes] of [[false, ZERO_SCAN_WASM], [true, ZERO_SCAN_WASM_SHARED]] as const) {
      const m = binaryen.parseText(wat(shared));
      m.setFeatures(binaryen.Features.SIMD128 | binaryen.Features.Atomics);
      assert.ok(m.validate());
      m.optimize();
      assert.deepEqual(m.emitBinary(), bytes);
      m.dispose();
    }
  });

  test('SIMD and JS agree, byte by byte, including the -0 word pattern and unaligned views', () => {
    const s = zeroScanner();
    assert.ok(s.simd, 'Wasm SIMD should be available on Node 20');
    const buf = new Uint8Array(PAGE_SIZE + 3);
    const views = [buf.subarray(0, PAGE_SIZE), buf.subarray(3, PAGE_SIZE + 3)];
    for (const page of views) {
      assert.ok(s.isZero(page) && isZeroJs(page));
      for (const at of [0, 7, 63, 64, 2047, PAGE_SIZE - 1]) {
        page[at] = at === 7 ? 0x80 : 1; // 0x80 at byte 7: a Float64 -0, which `!== 0` would miss
        assert.equal(s.isZero(page), false, `byte ${at}`);
        assert.equal(isZeroJs(page), false);
        page[at] = 0;
      }
    }
  });

  test('scans a WebAssembly.Memory in place (shared and plain), and zeroMap over a batch', () => {
    for (const shared of [false, true]) {
      const memory = new WebAssembly.Memory({ initial: 2, maximum: 4, shared });
      const s = zeroScanner({ memory });
      const u8 = new Uint8Array(memory.buffer);
      u8[5 * PAGE_SIZE + 100] = 9;
      const out = new Uint8Array(32);
      assert.equal(s.zeroMap(u8.subarray(0, 32 * PAGE_SIZE), out), 31);
      assert.equal(out[5], 0);
      assert.ok(s.isZero(u8.subarray(4 * PAGE_SIZE, 5 * PAGE_SIZE)));
      assert.ok(!s.isZero(u8.subarray(5 * PAGE_SIZE, 6 * PAGE_SIZE)));
    }
    const s = zeroScanner();
    const pages = concat(corpus('mixed', 300, 2).pages);
    const out = new Uint8Array(300);
    assert.equal(s.zeroMap(pages, out), 60);
  });

  test('zeroMap finds every zero page of a run, in place, through scratch and in JS alike', () => {
    // Stretches of zero and non-zero pages (one scan call per stretch): each page's one non-zero
    // byte anywhere in it, runs of every length, starting anywhere, longer than the 1 MiB scratch.
    const r = rng(7);
    const n = 700;
    const memory = new WebAssembly.Memory({ initial: Math.ceil((n * PAGE_SIZE) / 65536), shared: true, maximum: 1024 });
    const u8 = new Uint8Array(memory.buffer);
    const zeroPage: boolean[] = [];
    for (let p = 0; p < n;) {
      const len = 1 + Math.floor(r() * (r() < 0.2 ? 300 : 6));
      const z = r() < 0.5;
      for (let k = 0; k < len && p < n; k++, p++) {
        zeroPage[p] = z;
        if (!z) u8[p * PAGE_SIZE + Math.floor(r() * PAGE_SIZE)] = 1 + Math.floor(r() * 255);
      }
    }
    const copy = u8.slice(0, n * PAGE_SIZE); // not in the scanner's memory: scanned through scratch
    const scanners = [zeroScanner({ memory }), zeroScanner(), zeroScanner({ simd: false })];
    for (const [from, count] of [[0, n], [1, 299], [37, 1], [256, 444], [3, 0]]) {
      const want = zeroPage.slice(from, from + count).map((z) => (z ? 1 : 0));
      for (const [i, sc] of scanners.entries()) {
        for (const src of [u8, copy]) {
          const out = new Uint8Array(count + 2).fill(7);
          const zeros = sc.zeroMap(src.subarray(from * PAGE_SIZE, (from + count) * PAGE_SIZE), out);
          assert.deepEqual([...out.subarray(0, count)], want, `scanner ${i}, pages ${from}+${count}`);
          assert.deepEqual([...out.subarray(count)], [7, 7], 'slots past the pages are left alone');
          assert.equal(zeros, want.filter((z) => z === 1).length);
        }
      }
    }
  });

  test('encodes only zero pages, with the protocol ZERO id and no bytes', () => {
    const l = link(zero());
    assert.deepEqual(l.send(0, new Uint8Array(PAGE_SIZE)), { codecId: ZERO_CODEC_ID, bytes: new Uint8Array(0) });
    assert.equal(l.send(1, textPage(rng(1))), null);
    assert.deepEqual(l.enc.stats(), { pages: 2, zeros: 1 });
  });
});

describe('xbzrle', () => {
  test('first sight is a miss (raw), a re-dirtied page is a hit (small delta), noise overflows', () => {
    const l = link(xbzrle({ cacheBytes: 16 * PAGE_SIZE }));
    const r = rng(3);
    const p = textPage(r);
    assert.equal(l.send(7, p), null);
    const q = mutate(p, 0.01, r);
    const e = l.send(7, q)!;
    assert.ok(e.bytes.length < 200, `delta of 1 % is ${e.bytes.length} bytes`);
    assert.deepEqual(l.dest.get(7), q);
    const unchanged = l.send(7, q)!;
    assert.deepEqual(unchanged.bytes, new Uint8Array([0x80, 0x20]), 'an unchanged page is one 4096-byte zero run');
    assert.equal(l.send(7, randomPage(r)), null, 'a rewritten page overflows');
    assert.deepEqual(l.enc.stats(), { pages: 4, hits: 2, misses: 1, overflows: 1, evictions: 0, bytesIn: 4 * PAGE_SIZE, bytesOut: e.bytes.length + 2, cachedPages: 1 });
  });

  test('pages at unaligned offsets encode like aligned ones', () => {
    const r = rng(40);
    const p = textPage(r);
    const q = mutate(p, 0.05, r);
    const buf = new Uint8Array(PAGE_SIZE + 1);
    const view = buf.subarray(1);
    for (const codec of [xbzrle({ cacheBytes: 4 * PAGE_SIZE }), dedup({ indexInit: { capacityBytes: 4 * PAGE_SIZE } })]) {
      const l = link(codec);
      view.set(p);
      l.send(0, view);
      view.set(q);
      l.send(0, view);
      l.send(1, view);
      assert.deepEqual(l.dest.get(0), q);
      assert.deepEqual(l.dest.get(1), q);
    }
  });

  test('LRU eviction: the least recently sent page leaves the cache first', () => {
    const l = link(xbzrle({ cacheBytes: 3 * PAGE_SIZE }));
    const r = rng(4);
    const pages = [0, 1, 2, 3].map(() => textPage(r));
    for (const i of [0, 1, 2]) l.send(i, pages[i]);
    l.send(0, mutate(pages[0], 0.01, r)); // 0 is now most recent; 1 is least recent
    l.send(3, pages[3]); // evicts 1
    assert.equal(l.enc.stats().evictions, 1);
    assert.notEqual(l.send(0, pages[0]), null, 'page 0 still cached');
    assert.equal(l.send(1, pages[1]), null, 'page 1 was evicted: miss');
  });

  test('delivered() keeps the cache in step when a page goes another way', () => {
    const codec = xbzrle({ cacheBytes: 8 * PAGE_SIZE });
    const enc = codec.createEncoder();
    const r = rng(6);
    const p = textPage(r);
    enc.encode(1, p);
    const other = textPage(r);
    enc.delivered(1, other); // e.g. sent by dedup: the destination now holds `other`
    const next = mutate(other, 0.01, r);
    const e = enc.encode(1, next)!;
    const dest = other.slice();
    xbzrleDecodePage(e.bytes, dest);
    assert.deepEqual(dest, next);
  });

  test('a page delivered as zero keeps no copy; its next version is a small delta against zero', () => {
    const codec = xbzrle({ cacheBytes: 8 * PAGE_SIZE });
    const enc = codec.createEncoder() as ReturnType<typeof codec.createEncoder> & { stats(): { cachedPages: number; hits: number } };
    const r = rng(14);
    const p = textPage(r);
    enc.encode(3, p);
    assert.equal(enc.stats().cachedPages, 1);
    enc.deliveredZero!(3); // e.g. the zero codec sent it: the destination holds zeros now
    for (let i = 10; i < 20; i++) enc.deliveredZero!(i);
    assert.equal(enc.stats().cachedPages, 0, 'zero pages take no slot, and page 3 gave its slot back');
    const sparse = new Uint8Array(PAGE_SIZE);
    sparse.set(textPage(r).subarray(0, 40), 100);
    for (const i of [3, 15]) {
      const e = enc.encode(i, sparse)!;
      assert.ok(e !== null && e.bytes.length < 60, `page ${i}: a delta against zero, ${e?.bytes.length} bytes`);
      const dest = new Uint8Array(PAGE_SIZE);
      xbzrleDecodePage(e.bytes, dest);
      assert.deepEqual(dest, sparse);
    }
    assert.equal(enc.stats().hits, 2);
    assert.equal(enc.stats().cachedPages, 2, 'each is cached once it holds data');
    assert.equal(enc.encode(30, sparse), null, 'a page never seen is still a miss');
  });

  test('in a chain, zero pages never fill the XBZRLE cache, and a page that went zero is a delta against zero', () => {
    const l = link(chain([zero(), xbzrle({ cacheBytes: 4 * PAGE_SIZE })]));
    const r = rng(15);
    const empty = new Uint8Array(PAGE_SIZE);
    for (let i = 0; i < 100; i++) l.send(i, empty);
    const p = textPage(r);
    l.send(200, p);
    assert.equal(l.enc.stats()['xbzrle.cachedPages'], 1, 'only the page with data is cached');
    l.send(200, empty);
    assert.equal(l.enc.stats()['xbzrle.cachedPages'], 0);
    const sparse = new Uint8Array(PAGE_SIZE);
    sparse[7] = 1;
    for (const i of [5, 200]) {
      const e = l.send(i, sparse)!;
      assert.equal(e.codecId, DEFAULT_CODEC_IDS.xbzrle, `page ${i} went as an XBZRLE delta`);
      assert.ok(e.bytes.length < 16);
      assert.deepEqual(l.dest.get(i), sparse);
    }
  });

  test('property: random mutations round trip against the previous version', () => {
    fc.assert(fc.property(
      fc.uint8Array({ minLength: PAGE_SIZE, maxLength: PAGE_SIZE }),
      fc.array(fc.array(fc.tuple(fc.nat(PAGE_SIZE - 1), fc.uint8Array({ minLength: 1, maxLength: 300 })), { maxLength: 40 }), { minLength: 1, maxLength: 5 }),
      (start, rounds) => {
        const l = link(xbzrle({ cacheBytes: 4 * PAGE_SIZE }));
        let cur = start.slice();
        l.send(0, cur);
        for (const writes of rounds) {
          cur = cur.slice();
          for (const [at, bytes] of writes) cur.set(bytes.subarray(0, PAGE_SIZE - at), at);
          const e = l.send(0, cur);
          if (e) assert.ok(e.bytes.length < PAGE_SIZE);
          assert.deepEqual(l.dest.get(0), cur);
        }
      },
    ), { numRuns: 300 });
  });

  test('the decoder refuses non-canonical deltas (empty runs, overlong, short coverage)', () => {
    const page = new Uint8Array(PAGE_SIZE);
    for (const bad of [[], [0x00], [0x01, 0x00], [0x80, 0x20, 0x01, 0x05], [0x0a, 0x01, 0x07, 0x00, 0x01, 0x07], [0x00, 0x01, 0x07]]) {
      assert.throws(() => xbzrleDecodePage(new Uint8Array(bad), page), CodecError, JSON.stringify(bad));
    }
    xbzrleDecodePage(new Uint8Array([0x00, 0x01, 0x07, 0xff, 0x1f]), page);
    assert.equal(page[0], 7);
  });
});

describe('dedup', () => {
  test('a repeated content is a 5-byte reference; a definition is 5 bytes over raw', () => {
    const l = link(dedup({ indexInit: { capacityBytes: 1 << 20 }, storeInit: { capacityBytes: 1 << 20 } }));
    const p = textPage(rng(8));
    assert.equal(l.send(0, p)!.bytes.length, PAGE_SIZE + 5);
    assert.equal(l.send(9, p)!.bytes.length, 5);
    assert.deepEqual(l.dest.get(9), p);
    assert.ok(PAGE_SIZE + 5 <= MAX_ENCODED_PAGE_BYTES);
  });

  test('collision-safe: a hash that always collides only costs misses, never a wrong page', () => {
    const index = new DedupIndex({ capacityBytes: 64 * PAGE_SIZE, hash: () => 1 });
    const l = link(dedup({ index, storeInit: { capacityBytes: 64 * PAGE_SIZE } }));
    const r = rng(9);
    const pages = [textPage(r), textPage(r), textPage(r)];
    for (let k = 0; k < 9; k++) {
      l.send(k, pages[k % 3]);
      assert.deepEqual(l.dest.get(k), pages[k % 3]);
    }
    assert.ok(index.collisions > 0);
  });

  test('gang migration: VMs share one index and one store; shared pages cross once', () => {
    const vms = gangCorpus(3, 40, 0.5);
    const index = new DedupIndex({ capacityBytes: 1 << 20 });
    const store = new DedupStore({ capacityBytes: 1 << 20 });
    const codec = dedup({ index, store });
    let wire = 0;
    for (const mem of vms) {
      const l = link(codec);
      mem.forEach((p, i) => { wire += l.send(i, p)!.bytes.length; });
      mem.forEach((p, i) => assert.deepEqual(l.dest.get(i), p));
    }
    const shared = 20 * (PAGE_SIZE + 5) + 2 * 20 * 5;
    assert.ok(wire <= shared + 3 * 20 * (PAGE_SIZE + 5), `wire ${wire}`);
    assert.ok(wire < 3 * 40 * PAGE_SIZE * 0.7);
  });

  test('a reference ahead of its definition (or after eviction) is ERR_CODEC_STATE, page unchanged', () => {
    const sender = dedup({ indexInit: { capacityBytes: 2 * PAGE_SIZE } }).createEncoder();
    const r = rng(10);
    const a = textPage(r);
    const def = sender.encode(0, a)!;
    const ref = sender.encode(1, a)!;
    const dec = dedup({ storeInit: { capacityBytes: 2 * PAGE_SIZE } }).createDecoder();
    const page = new Uint8Array(PAGE_SIZE).fill(3);
    assert.throws(() => dec.decode(1, ref.codecId, ref.bytes, page), (e: unknown) => e instanceof CodecError && e.code === CodecErrorCode.STATE);
    assert.ok(page.every((b) => b === 3));
    dec.decode(0, def.codecId, def.bytes, page);
    dec.decode(1, ref.codecId, ref.bytes, page);
    assert.deepEqual(page, a);
    // Two more definitions evict `a` from both rings; the sender then defines it again.
    sender.encode(2, textPage(r));
    sender.encode(3, textPage(r));
    assert.equal(sender.encode(4, a)!.bytes.length, PAGE_SIZE + 5);
  });

  test('pageHash spreads distinct pages (no collisions among 5000 text/random pages)', () => {
    const r = rng(12);
    const seen = new Set<number>();
    for (let k = 0; k < 5000; k++) seen.add(pageHash(k % 2 ? textPage(r) : randomPage(r)));
    assert.equal(seen.size, 5000);
  });
});

describe('page slab (codec caches)', () => {
  test('slots across chunks read back what was written; memory is taken only for chunks written', () => {
    const slab = new PageSlab(600); // chunks of 256 pages: 256 + 256 + 88
    assert.equal(slab.allocatedBytes, 0);
    const r = rng(12);
    const pages = new Map([0, 255, 256, 599].map((s) => [s, textPage(r)]));
    slab.set(0, pages.get(0)!);
    assert.equal(slab.allocatedBytes, 256 * PAGE_SIZE, 'one chunk for slot 0');
    slab.set(599, pages.get(599)!);
    assert.equal(slab.allocatedBytes, (256 + 88) * PAGE_SIZE, 'the last chunk holds only the slots that remain');
    slab.set(255, pages.get(255)!);
    slab.set(256, pages.get(256)!);
    assert.equal(slab.allocatedBytes, 600 * PAGE_SIZE);
    for (const [s, p] of pages) {
      assert.deepEqual(slab.bytes(s), p, `slot ${s}`);
      assert.deepEqual(new Uint8Array(slab.words(s).slice().buffer), p, `slot ${s} as words`);
    }
    assert.deepEqual(slab.bytes(1), new Uint8Array(PAGE_SIZE), 'a slot never written reads zero');
    assert.throws(() => slab.set(600, pages.get(0)!), RangeError);
    assert.throws(() => slab.bytes(-1), RangeError);
    assert.throws(() => new PageSlab(0), RangeError);
  });

  test('an xbzrle cache and a dedup ring larger than a chunk: pages in every chunk hit, and a big cache costs only what it holds', () => {
    const r = rng(13);
    const pages = Array.from({ length: 600 }, () => textPage(r));
    const l = link(xbzrle({ cacheBytes: 600 * PAGE_SIZE }));
    pages.forEach((p, i) => assert.equal(l.send(i, p), null));
    const next = pages.map((p) => mutate(p, 0.01, r));
    next.forEach((p, i) => {
      assert.notEqual(l.send(i, p), null, `page ${i} is a hit`);
      assert.deepEqual(l.dest.get(i), p);
    });
    assert.equal(l.enc.stats().hits, 600);
    const index = new DedupIndex({ capacityBytes: 1 << 30 });
    const store = new DedupStore({ capacityBytes: 1 << 30 });
    const d = link(dedup({ index, store }));
    pages.forEach((p, i) => d.send(i, p));
    pages.forEach((p, i) => {
      assert.equal(d.send(1000 + i, p)!.bytes.length, 5, `content ${i} is a reference`);
      assert.deepEqual(d.dest.get(1000 + i), p);
    });
    assert.ok(index.allocatedBytes <= 1024 * PAGE_SIZE && store.allocatedBytes <= 1024 * PAGE_SIZE, `1 GiB rings holding 600 pages took ${index.allocatedBytes} and ${store.allocatedBytes} bytes`);
  });
});

describe('chain', () => {
  test('first codec that encodes wins; others stay in step', () => {
    const l = link(chain([zero(), xbzrle({ cacheBytes: 1 << 20 }), dedup()]));
    const r = rng(13);
    const p = textPage(r);
    assert.equal(l.send(0, new Uint8Array(PAGE_SIZE))!.codecId, ZERO_CODEC_ID);
    assert.equal(l.send(1, p)!.codecId, 3, 'new content: xbzrle misses, dedup defines');
    assert.equal(l.send(2, p)!.bytes.length, 5, 'same content elsewhere: dedup reference');
    const q = mutate(p, 0.01, r);
    assert.equal(l.send(1, q)!.codecId, 2, 're-dirtied: xbzrle delta');
    l.send(1, new Uint8Array(PAGE_SIZE)); // zero now; xbzrle must hear it
    const z1 = new Uint8Array(PAGE_SIZE);
    z1[10] = 1;
    const e = l.send(1, z1)!;
    assert.equal(e.codecId, 2);
    assert.ok(e.bytes.length < 10);
    assert.deepEqual(l.dest.get(1), z1);
    const s = l.enc.stats();
    assert.equal(s['zero.wins'], 2);
    assert.ok(s['xbzrle.hits'] >= 2);
  });

  test('all parts decline: raw; delivered() reaches every part', () => {
    const codec = chain([xbzrle({ cacheBytes: 4 * PAGE_SIZE })]);
    const enc = codec.createEncoder();
    const dec = codec.createDecoder();
    const r = rng(41);
    const p = textPage(r);
    assert.equal(enc.encode(0, p), null);
    const other = textPage(r);
    enc.delivered(0, other);
    dec.delivered(0, other);
    const next = mutate(other, 0.01, r);
    const e = enc.encode(0, next)!;
    const page = other.slice();
    dec.decode(0, e.codecId, e.bytes, page);
    assert.deepEqual(page, next);
    assert.equal(enc.stats().raw, 1);
    assert.ok('xbzrle.pages' in dec.stats());
    assert.throws(() => chain([]), RangeError);
  });

  test('refuses two parts with one id', () => {
    assert.throws(() => chain([xbzrle(), xbzrle()]), RangeError);
  });
});

describe('adaptive (MECOM)', () => {
  test('entropy estimate and classes: zero / low (text, sparse) / high (random)', () => {
    const r = rng(14);
    assert.equal(classifyPage(new Uint8Array(PAGE_SIZE)), 'zero');
    assert.equal(classifyPage(textPage(r)), 'low');
    assert.equal(classifyPage(randomPage(r)), 'high');
    assert.ok(sampleEntropy(randomPage(r)) > 6.8);
    assert.ok(sampleEntropy(textPage(r)) < 5.5);
  });

  test('controller: slow link + fast compressor turns on; fast link + slow compressor turns off', () => {
    const c = new CompressionController({ intervalMs: 100, initiallyOn: false });
    c.recordLink(10e6, 1000); // 10 MB/s link
    c.recordCompress(1e6, 0.4e6, 2); // 500 MB/s, ratio 0.4
    assert.equal(c.evaluate(0).enabled, true);
    assert.ok(Math.abs(c.assess().effectiveRate - 25e6) < 1);
    const d = new CompressionController({ intervalMs: 100, alpha: 1 });
    d.recordLink(3e9, 1000); // 3 GB/s loopback
    d.recordCompress(1e6, 0.4e6, 2.5); // 400 MB/s
    assert.equal(d.evaluate(0).enabled, false);
    assert.equal(d.flips, 1);
  });

  test('controller: re-evaluates only every intervalMs, has hysteresis, probes while off', () => {
    const c = new CompressionController({ intervalMs: 1000, alpha: 1, probeEvery: 4, onMargin: 0.2, offMargin: 0, initiallyOn: false });
    c.recordLink(100e6, 1000);
    c.recordCompress(1e6, 1e6, 1); // ratio 1: no gain
    assert.equal(c.evaluate(0).enabled, false);
    c.recordCompress(1e6, 0.9e6, 1); // 1.11× — inside the hysteresis band: stays off
    assert.equal(c.evaluate(500).enabled, false);
    assert.equal(c.evaluate(1000).enabled, false);
    c.recordCompress(1e6, 0.5e6, 1); // 2×
    assert.equal(c.evaluate(1500).enabled, false, 'not yet re-evaluated');
    assert.equal(c.evaluate(2000).enabled, true);
    c.recordCompress(1e6, 0.9e6, 1); // 1.11×: above offMargin, stays on
    assert.equal(c.evaluate(3000).enabled, true);
    c.recordLink(5e9, 1000); // the link got much faster: compressing at 1 GB/s now slows the stream
    const decisions: boolean[] = [];
    for (let k = 0; k < 8; k++) decisions.push(c.shouldCompress(4000 + k));
    assert.deepEqual(decisions, [false, false, false, true, false, false, false, true]);
  });

  /** An in-core stand-in compressor (run-length of equal bytes) so core tests need no native code. */
  function rle(): BlobCodec {
    return {
      name: 'rle', id: 9, maxRawBytes: 4 << 20,
      compress(raw) {
        const out: number[] = [raw.length & 0xff, (raw.length >> 8) & 0xff, (raw.length >> 16) & 0xff, raw.length >>> 24];
        for (let i = 0; i < raw.length;) {
          let n = 1;
          while (i + n < raw.length && raw[i + n] === raw[i] && n < 255) n++;
          out.push(n, raw[i]);
          i += n;
        }
        return out.length < raw.length ? new Uint8Array(out) : null;
      },
      decompress(blob) {
        const n = new DataView(blob.buffer, blob.byteOffset, blob.byteLength).getUint32(0, true);
        if (n > this.maxRawBytes) codecFail(CodecErrorCode.LIMIT, 'too big');
        const out = new Uint8Array(n);
        let o = 0;
        for (let i = 4; i + 1 < blob.length; i += 2) { out.fill(blob[i + 1], o, o + blob[i]); o += blob[i]; }
        if (o !== n) codecFail(CodecErrorCode.CORRUPT, 'short');
        return out;
      },
    };
  }

  test('round trip: low-entropy pages compressed as one blob, the rest plain, decoded in order', () => {
    const r = rng(15);
    const pageCodec = chain([zero(), xbzrle({ cacheBytes: 1 << 20 }), dedup()]);
    const enc = adaptiveEncoder({ pageCodec, compressor: rle(), lowEntropyBits: 7 });
    const dec = adaptiveDecoder({ pageCodec, compressors: [rle()] });
    const sparse = corpus('sparse', 20, 5).pages;
    const src = [...sparse, ...corpus('random', 10, 6).pages, ...corpus('zero', 5).pages];
    const indices = src.map((_, i) => i);
    const dest = src.map(() => new Uint8Array(PAGE_SIZE));
    for (const pages of [src, src.map((p) => mutate(p, 0.01, r))]) {
      const parts = enc.encodeBatch(indices, concat(pages));
      dec.decodeParts(parts, (i) => dest[i]);
      dest.forEach((d, i) => assert.deepEqual(d, pages[i], `page ${i}`));
    }
    // A compressor that never wins: low-entropy pages go plain and still round trip.
    const never: BlobCodec = { ...rle(), compress: () => null };
    const enc2 = adaptiveEncoder({ pageCodec: chain([zero()]), compressor: never });
    const parts2 = enc2.encodeBatch(indices, concat(src));
    assert.ok(parts2.every((p) => p.blobCodecId === RAW_CODEC_ID));
    adaptiveDecoder({ pageCodec: chain([zero()]) }).decodeParts(parts2, (i) => dest[i]);
    dest.forEach((d, i) => assert.deepEqual(d, src[i]));
    const s = enc.stats();
    assert.ok(s.compressedBatches >= 1 && s.low >= 20 && s.high >= 10 && s.zero >= 5, JSON.stringify(s));
    assert.throws(() => enc.encodeBatch([1, 1], concat([src[0], src[1]])), RangeError);
    assert.throws(() => dec.decodeParts([{ blobCodecId: 77, pages: 1, bytes: new Uint8Array(8) }], (i) => dest[i]), (e: unknown) => e instanceof CodecError && e.code === CodecErrorCode.UNKNOWN);
    assert.throws(() => dec.decodeParts([{ blobCodecId: RAW_CODEC_ID, pages: 1, bytes: new Uint8Array([1, 255, 255, 255, 255]) }], (i) => dest[i]), CodecError);
  });
});

test('ThroughputController keeps the mode that moves pages faster, re-measures the other, ignores pauses', () => {
  // A stream that moves 1 MiB batches at `on` MiB/s compressing and `off` MiB/s not.
  const run = (on: number, off: number, batches: number, pauseEvery = 0) => {
    const c = new ThroughputController({ windowMs: 100, exploreEvery: 4 });
    let t = 0;
    const modes: boolean[] = [];
    for (let i = 0; i < batches; i++) {
      const m = c.shouldCompress();
      modes.push(m);
      c.recordSent(1 << 20, t);
      t += 1000 / (m ? on : off);
      if (pauseEvery && i % pauseEvery === pauseEvery - 1) t += 5000; // a long pause (ACK wait) counts for nothing
    }
    return { c, modes };
  };
  const slowLink = run(300, 100, 400);
  assert.equal(slowLink.c.assess().enabled, true);
  assert.ok(Math.abs(slowLink.c.assess().speedup - 3) < 0.05, `speedup ${slowLink.c.assess().speedup}`);
  const tail = slowLink.modes.slice(-100);
  assert.ok(tail.filter((m) => m).length > 70 && tail.some((m) => !m), 'mostly on, with windows off to re-measure');
  const fastLink = run(100, 400, 600);
  assert.equal(fastLink.c.assess().enabled, false);
  assert.ok(fastLink.modes.slice(-100).filter((m) => !m).length > 70, 'mostly off');
  assert.equal(fastLink.c.flips, 1);
  // Pauses between rounds do not count as sending time: the measured rates stay the same.
  const paused = run(300, 100, 400, 7);
  assert.ok(Math.abs(paused.c.assess().rateOn / (300 * (1 << 20)) - 1) < 0.05);
});

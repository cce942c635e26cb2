import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  CodecError, CodecErrorCode, CompressionController, adaptiveDecoder, adaptiveEncoder, chain, dedup, xbzrle, zero,
} from '../../src/core/codec/index.js';
import { PAGE_SIZE } from '../../src/core/pages.js';
import { DEFAULT_MAX_RAW_BYTES, lz4, zstd } from '../../src/node/codec/index.js';
import { codecSuite } from '../helpers/codec-suite.js';
import { concat, corpus, mutate, rng } from '../helpers/page-corpus.js';

await codecSuite({ name: 'lz4', setup: () => ({ kind: 'blob', codec: lz4() }) });
await codecSuite({ name: 'zstd level 1', setup: () => ({ kind: 'blob', codec: zstd() }) });
await codecSuite({ name: 'zstd level 6, 64 KiB cap', setup: () => ({ kind: 'blob', codec: zstd({ level: 6, maxRawBytes: 64 * 1024 }) }), pages: 8 });

describe('blob codecs', () => {
  test('default cap holds a packed 1 MiB batch', () => {
    assert.ok(DEFAULT_MAX_RAW_BYTES >= (1 << 20) + 256 * 9 + 5);
  });

  test('a zstd frame without its size, or with trailing bytes, is refused', () => {
    const c = zstd();
    const blob = c.compress(concat(corpus('text', 4, 3).pages))!;
    const extra = new Uint8Array(blob.length + 3);
    extra.set(blob);
    assert.throws(() => c.decompress(extra), CodecError);
    const noFrame = blob.slice(0, 4);
    assert.throws(() => c.decompress(noFrame), CodecError);
  });

  test('each zstd blob is its own: compressing the next batch (in the same scratch) leaves earlier blobs intact', () => {
    const c = zstd();
    const a = concat(corpus('text', 8, 21).pages);
    const b = concat(corpus('text', 200, 22).pages); // larger than the first: the scratch is reused, not outgrown
    const blobA = c.compress(a)!;
    const copyA = blobA.slice();
    const blobB = c.compress(b)!;
    assert.deepEqual(blobA, copyA, 'the first blob was not overwritten');
    assert.deepEqual(c.decompress(blobA), a);
    assert.deepEqual(c.decompress(blobB), b);
  });

  test('lz4 refuses a size prefix that disagrees with the data', () => {
    const c = lz4();
    const blob = c.compress(concat(corpus('text', 4, 3).pages))!.slice();
    new DataView(blob.buffer).setUint32(0, 4 * PAGE_SIZE - 1, true);
    assert.throws(() => c.decompress(blob), (e: unknown) => e instanceof CodecError && e.code === CodecErrorCode.CORRUPT);
  });
});

describe('adaptive with native compressors', () => {
  for (const make of [lz4, zstd]) {
    test(`${make.name}: mixed batches round trip through zero/xbzrle/dedup + blob compression`, () => {
      const r = rng(2);
      const pageCodec = chain([zero(), xbzrle({ cacheBytes: 1 << 20 }), dedup({ indexInit: { capacityBytes: 1 << 20 }, storeInit: { capacityBytes: 1 << 20 } })]);
      const controller = new CompressionController();
      const enc = adaptiveEncoder({ pageCodec, compressor: make(), controller });
      const dec = adaptiveDecoder({ pageCodec, compressors: [lz4(), zstd()] });
      const src = corpus('mixed', 200, 8).pages;
      const indices = src.map((_, i) => i);
      const dest = src.map(() => new Uint8Array(PAGE_SIZE));
      let wire = 0;
      for (const pages of [src, src.map((p) => mutate(p, 0.02, r))]) {
        const parts = enc.encodeBatch(indices, concat(pages));
        wire += parts.reduce((n, p) => n + p.bytes.length, 0);
        dec.decodeParts(parts, (i) => dest[i]);
        dest.forEach((d, i) => assert.deepEqual(d, pages[i], `page ${i}`));
      }
      assert.ok(wire < 2 * 200 * PAGE_SIZE * 0.5, `wire ${wire}`);
      assert.ok(Number.isFinite(controller.assess().ratio));
    });
  }
});

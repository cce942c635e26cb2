/**
 * The codec conformance suite (libp2p's interface-compliance-tests, hono's common.case file): one
 * function of `{ name, setup, teardown }` that every page codec and every blob codec runs.
 *
 * Page codecs: round trips over every corpus for two rounds (second round: mostly-equal re-dirtied
 * pages and repeats), per page and through batches + pack/unpack; every strict prefix of an
 * encoded page refused; bit flips, garbage and huge lengths refused with a CodecError or decoded
 * into a page-sized page (no other error, no write outside the page, page unchanged on refusal);
 * unknown ids refused; encoded sizes within MAX_ENCODED_PAGE_BYTES.
 * Blob codecs: the same over packed 1 MiB batches, plus declared raw lengths beyond the cap.
 * Cases that do not apply are skipped with the reason.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  CodecError, CodecErrorCode, MAX_ENCODED_PAGE_BYTES, RAW_CODEC_ID, decodeBatch, decodeOne, encodeBatch, packBatch, unpackBatch,
  type BlobCodec, type EncodedPage, type PageCodec, type PageDecoder,
} from '../../src/core/codec/index.js';
import { PAGE_SIZE } from '../../src/core/pages.js';
import { CORPUS_NAMES, concat, corpus, mutate, rng } from './page-corpus.js';

export type CodecSubject = { kind: 'page'; codec: PageCodec } | { kind: 'blob'; codec: BlobCodec };

export type CaseName = 'round-trip' | 'batch' | 'streaming' | 'truncation' | 'bit-flips' | 'garbage' | 'huge-lengths' | 'unknown-id' | 'size-limits';

export interface CodecSuiteOptions {
  name: string;
  setup(): CodecSubject | Promise<CodecSubject>;
  teardown?(): void | Promise<void>;
  /** Cases to skip, each with its reason. */
  skip?: Partial<Record<CaseName, string>>;
  /** Pages per corpus (default 64). */
  pages?: number;
}

const GUARD = 64;

/** A destination page with guard bytes on both sides, to catch writes outside it. */
function guarded(content?: Uint8Array): { page: Uint8Array; intact(): boolean } {
  const buf = new Uint8Array(GUARD + PAGE_SIZE + GUARD).fill(0xa5);
  const page = buf.subarray(GUARD, GUARD + PAGE_SIZE);
  if (content) page.set(content); else page.fill(0);
  return {
    page,
    intact() {
      for (let i = 0; i < GUARD; i++) if (buf[i] !== 0xa5 || buf[GUARD + PAGE_SIZE + i] !== 0xa5) return false;
      return true;
    },
  };
}

/** Runs `fn`; passes if it returns or throws a CodecError; anything else fails the test. */
function codecErrorOrOk(fn: () => void, what: string): 'ok' | 'refused' {
  try {
    fn();
    return 'ok';
  } catch (e) {
    if (e instanceof CodecError) {
      assert.ok((Object.values(CodecErrorCode) as string[]).includes(e.code), `${what}: unexpected code ${e.code}`);
      return 'refused';
    }
    assert.fail(`${what}: threw ${(e as Error)?.name}: ${(e as Error)?.message} instead of a CodecError`);
  }
}

interface Sent { index: number; enc: EncodedPage | null; page: Uint8Array; before: Uint8Array }

/**
 * Sends two rounds of a corpus through a fresh encoder/decoder pair, checking every page, and
 * returns what was sent (with the destination content each entry was decoded against).
 */
function twoRounds(codec: PageCodec, name: (typeof CORPUS_NAMES)[number], count: number): Sent[] {
  const src = corpus(name, count, 11).pages;
  const r = rng(99);
  const enc = codec.createEncoder();
  const dec = codec.createDecoder();
  const dest = src.map(() => new Uint8Array(PAGE_SIZE));
  const sent: Sent[] = [];
  const round = (pages: Uint8Array[]) => pages.forEach((page, i) => {
    const before = dest[i].slice();
    const e = enc.encode(i, page);
    if (e) {
      assert.ok(e.bytes.length <= MAX_ENCODED_PAGE_BYTES, `${name} page ${i}: ${e.bytes.length} encoded bytes`);
      assert.notEqual(e.codecId, RAW_CODEC_ID);
      assert.ok(dec.ids.includes(e.codecId), `decoder does not list id ${e.codecId}`);
      const g = guarded(dest[i]);
      dec.decode(i, e.codecId, e.bytes, g.page);
      assert.ok(g.intact(), 'decoder wrote outside the page');
      dest[i].set(g.page);
    } else {
      dest[i].set(page);
      dec.delivered(i, dest[i]);
    }
    assert.deepEqual(dest[i], page, `${name} page ${i} differs after decoding`);
    sent.push({ index: i, enc: e, page: page.slice(), before });
  });
  round(src);
  // Second round: half the pages re-dirtied a little, a quarter unchanged, a quarter replaced by another page.
  round(src.map((p, i) => (i % 4 < 2 ? mutate(p, 0.02, r) : i % 4 === 2 ? p : src[(i * 7) % src.length])));
  return sent;
}

function pageCases(opts: CodecSuiteOptions, get: () => PageCodec): void {
  const count = opts.pages ?? 64;
  const skip = opts.skip ?? {};

  test('round trip on every corpus, two rounds, per page', { skip: skip['round-trip'] ?? false }, () => {
    for (const name of CORPUS_NAMES) twoRounds(get(), name, count);
  });

  test('batches: encodeBatch → pack → unpack → decodeBatch', { skip: skip.batch ?? false }, () => {
    const codec = get();
    const enc = codec.createEncoder();
    const dec = codec.createDecoder();
    const r = rng(5);
    const src = corpus('mixed', count, 3).pages;
    const indices = src.map((_, i) => i * 3);
    const dest = new Uint8Array(src.length * PAGE_SIZE);
    for (const pages of [src, src.map((p) => mutate(p, 0.05, r))]) {
      const b = unpackBatch(packBatch(encodeBatch(enc, indices, concat(pages))));
      assert.deepEqual([...b.indices], indices);
      decodeBatch(dec, b, dest);
      assert.deepEqual(dest, concat(pages));
    }
  });

  test('streaming: input fed in pieces', { skip: skip.streaming ?? 'page codecs decode whole framed entries; there is no streaming decoder to feed byte by byte' }, () => {});

  test('truncation: every strict prefix of an encoded page is refused, page unchanged', { skip: skip.truncation ?? false }, () => {
    for (const name of CORPUS_NAMES) {
      const codec = get();
      const sent = twoRounds(codec, name, 16).filter((s) => s.enc && s.enc.bytes.length > 0);
      for (const s of sent.slice(0, 12)) {
        const dec = replayDecoder(codec, sent, s);
        const bytes = s.enc!.bytes;
        const cuts = bytes.length <= 64 ? [...Array(bytes.length).keys()] : [0, 1, 2, 3, 4, 5, 6, 7, bytes.length >> 1, bytes.length - 2, bytes.length - 1];
        for (const cut of cuts) {
          const g = guarded(s.before);
          assert.throws(() => dec.decode(s.index, s.enc!.codecId, bytes.subarray(0, cut), g.page), CodecError, `${name} page ${s.index} cut at ${cut}/${bytes.length}`);
          assert.deepEqual(g.page, s.before, 'a refused decode changed the page');
          assert.ok(g.intact());
        }
      }
    }
  });

  test('bit flips: refused with a CodecError or decoded within the page', { skip: skip['bit-flips'] ?? false }, () => {
    const r = rng(17);
    for (const name of CORPUS_NAMES) {
      const codec = get();
      const sent = twoRounds(codec, name, 16).filter((s) => s.enc && s.enc.bytes.length > 0);
      for (const s of sent.slice(0, 8)) {
        const dec = replayDecoder(codec, sent, s);
        for (let k = 0; k < 64; k++) {
          const bytes = s.enc!.bytes.slice();
          const bit = Math.floor(r() * bytes.length * 8);
          bytes[bit >> 3] ^= 1 << (bit & 7);
          const g = guarded(s.before);
          const res = codecErrorOrOk(() => dec.decode(s.index, s.enc!.codecId, bytes, g.page), `${name} bit ${bit}`);
          if (res === 'refused') assert.deepEqual(g.page, s.before, 'a refused decode changed the page');
          assert.ok(g.intact(), 'decoder wrote outside the page');
        }
      }
    }
  });

  test('garbage: random bytes under every id the decoder knows', { skip: skip.garbage ?? false }, () => {
    const r = rng(23);
    const dec = get().createDecoder();
    for (const id of dec.ids) {
      for (let k = 0; k < 300; k++) {
        const len = k < 20 ? k : Math.floor(r() * (MAX_ENCODED_PAGE_BYTES + 8));
        const bytes = new Uint8Array(len).map(() => Math.floor(r() * 256));
        const g = guarded();
        const before = g.page.slice();
        const res = codecErrorOrOk(() => dec.decode(k, id, bytes, g.page), `garbage of ${len} bytes`);
        if (res === 'refused') assert.deepEqual(g.page, before);
        assert.ok(g.intact(), 'decoder wrote outside the page');
      }
    }
  });

  test('huge lengths: oversized input and maximal varints/ids are refused', { skip: skip['huge-lengths'] ?? false }, () => {
    const dec = get().createDecoder();
    const inputs = [
      new Uint8Array(1 << 20).fill(0x01),
      new Uint8Array(MAX_ENCODED_PAGE_BYTES + 1),
      new Uint8Array([0xff, 0xff, 0xff, 0xff, 0x0f]),
      new Uint8Array([0x80, 0x80, 0x80, 0x80, 0x80, 0x01]),
      new Uint8Array([0x52, 0xff, 0xff, 0xff, 0xff]),
      new Uint8Array([0x44, 0xff, 0xff, 0xff, 0xff]),
      new Uint8Array([0x00, 0xff, 0xff, 0x03, 0x01]),
    ];
    for (const id of dec.ids) {
      for (const bytes of inputs) {
        const g = guarded();
        assert.throws(() => dec.decode(0, id, bytes, g.page), CodecError, `id ${id}, ${bytes.length} bytes`);
        assert.ok(g.intact());
      }
    }
  });

  test('unknown codec id is refused with ERR_CODEC_UNKNOWN', { skip: skip['unknown-id'] ?? false }, () => {
    const dec = get().createDecoder();
    for (let id = 2; id < 256; id++) {
      if (dec.ids.includes(id)) continue;
      assert.throws(() => dec.decode(0, id, new Uint8Array(0), new Uint8Array(PAGE_SIZE)), (e: unknown) => e instanceof CodecError && e.code === CodecErrorCode.UNKNOWN);
    }
    // RAW is handled by decodeOne (the batch path), with its own size check.
    assert.throws(() => decodeOne(dec, 0, RAW_CODEC_ID, new Uint8Array(10), new Uint8Array(PAGE_SIZE)), CodecError);
  });

  test('size limits: encoded pages fit MAX_ENCODED_PAGE_BYTES; encoders own their output', { skip: skip['size-limits'] ?? false }, () => {
    const enc = get().createEncoder();
    const r = rng(31);
    for (const name of CORPUS_NAMES) {
      for (const [i, page] of corpus(name, 32, 13).pages.entries()) {
        const live = page.slice();
        const e = enc.encode(i, live);
        if (!e) continue;
        assert.ok(e.bytes.length <= MAX_ENCODED_PAGE_BYTES);
        const copy = e.bytes.slice();
        live.set(mutate(live, 0.5, r)); // the caller reuses its buffer: the result must not change
        assert.deepEqual(e.bytes, copy, 'encoded bytes alias the input page');
      }
    }
  });
}

/**
 * A decoder brought to the state it had just before `target` was decoded (replays earlier entries),
 * so stateful decoders (dedup) see references they can resolve.
 */
function replayDecoder(codec: PageCodec, sent: Sent[], target: Sent): PageDecoder {
  const dec = codec.createDecoder();
  for (const s of sent) {
    if (s === target) break;
    const page = s.before.slice();
    if (s.enc) dec.decode(s.index, s.enc.codecId, s.enc.bytes, page);
    else dec.delivered(s.index, s.page);
  }
  return dec;
}

function blobCases(opts: CodecSuiteOptions, get: () => BlobCodec): void {
  const count = opts.pages ?? 64;
  const skip = opts.skip ?? {};
  const samples = () => CORPUS_NAMES.map((name) => ({ name, raw: concat(corpus(name, count, 21).pages) }));

  test('round trip on every corpus (one batch each), and a 1 MiB packed batch', { skip: skip['round-trip'] ?? false }, () => {
    const c = get();
    for (const { name, raw } of samples()) {
      const blob = c.compress(raw);
      if (name === 'random') assert.equal(blob, null, 'random pages should not compress');
      if (name === 'zero' || name === 'text') assert.ok(blob && blob.length < raw.length / 2, `${name} should compress well`);
      if (blob) assert.deepEqual(c.decompress(blob), raw, name);
    }
    // As many pages as fit the codec's cap, up to a 1 MiB batch.
    const n = Math.min(256, Math.floor((c.maxRawBytes - 5) / (PAGE_SIZE + 9)));
    const big = concat(corpus('mixed', n, 4).pages);
    const b = { count: n, indices: new Uint32Array(n).map((_, i) => i), codecIds: new Uint8Array(n), offsets: new Uint32Array(n + 1).map((_, i) => i * PAGE_SIZE), bytes: big };
    const packed = packBatch(b);
    const blob = c.compress(packed);
    assert.ok(blob);
    assert.deepEqual(unpackBatch(c.decompress(blob)).bytes, big);
  });

  test('batch', { skip: skip.batch ?? 'a blob codec is itself the batch layer (covered by round trip)' }, () => {});
  test('streaming: input fed in pieces', { skip: skip.streaming ?? 'blob codecs decode one whole blob; ferry uses no streaming (de)compressor' }, () => {});

  test('truncation: every tested prefix is refused', { skip: skip.truncation ?? false }, () => {
    const c = get();
    for (const { name, raw } of samples()) {
      const blob = c.compress(raw);
      if (!blob) continue;
      const cuts = [0, 1, 2, 3, 4, 5, 8, 16, blob.length >> 1, blob.length - 2, blob.length - 1];
      for (const cut of cuts) assert.throws(() => c.decompress(blob.subarray(0, cut)), CodecError, `${name} cut at ${cut}/${blob.length}`);
    }
  });

  test('bit flips: refused with a CodecError or decoded to the declared length', { skip: skip['bit-flips'] ?? false }, () => {
    const c = get();
    const r = rng(41);
    for (const { raw } of samples()) {
      const blob = c.compress(raw);
      if (!blob) continue;
      for (let k = 0; k < 100; k++) {
        const b = blob.slice();
        const bit = Math.floor(r() * b.length * 8);
        b[bit >> 3] ^= 1 << (bit & 7);
        let out: Uint8Array | undefined;
        codecErrorOrOk(() => { out = c.decompress(b); }, `bit ${bit}`);
        if (out) assert.ok(out.length <= c.maxRawBytes);
      }
    }
  });

  test('garbage: random blobs are refused or bounded', { skip: skip.garbage ?? false }, () => {
    const c = get();
    const r = rng(43);
    for (let k = 0; k < 300; k++) {
      const b = new Uint8Array(Math.floor(r() * 4096)).map(() => Math.floor(r() * 256));
      let out: Uint8Array | undefined;
      codecErrorOrOk(() => { out = c.decompress(b); }, `garbage ${k}`);
      if (out) assert.ok(out.length <= c.maxRawBytes);
    }
  });

  test('huge lengths: a declared raw size beyond the cap is refused with ERR_CODEC_LIMIT', { skip: skip['huge-lengths'] ?? false }, () => {
    const c = get();
    const blob = c.compress(concat(corpus('text', 8, 2).pages))!;
    for (const n of [c.maxRawBytes + 1, 0x7fffffff, 0xffffffff]) {
      const b = blob.slice();
      new DataView(b.buffer).setUint32(0, n >>> 0, true);
      assert.throws(() => c.decompress(b), (e: unknown) => e instanceof CodecError && e.code === CodecErrorCode.LIMIT);
    }
    // A declared size that is allowed but wrong is corrupt, not a short/long buffer.
    const b = blob.slice();
    new DataView(b.buffer).setUint32(0, 12345, true);
    assert.throws(() => c.decompress(b), CodecError);
  });

  test('unknown-id', { skip: skip['unknown-id'] ?? 'blob ids are dispatched by the adaptive decoder (tested there)' }, () => {});

  test('size limits: input beyond maxRawBytes is a caller error; output never exceeds it', { skip: skip['size-limits'] ?? false }, () => {
    const c = get();
    assert.throws(() => c.compress(new Uint8Array(c.maxRawBytes + 1)), RangeError);
    const blob = c.compress(new Uint8Array(c.maxRawBytes));
    assert.ok(blob);
    assert.equal(c.decompress(blob).length, c.maxRawBytes);
  });
}

/**
 * Registers the suite for one codec under `describe(name)`. `setup` runs once (awaited here, so
 * test files `await codecSuite(...)` at top level); page codecs are factories, so every case still
 * builds fresh encoder/decoder halves. `teardown` runs after the last case.
 */
export async function codecSuite(opts: CodecSuiteOptions): Promise<void> {
  const subject = await opts.setup();
  describe(`codec conformance: ${opts.name} (${subject.kind} codec)`, () => {
    if (opts.teardown) after(async () => { await opts.teardown!(); });
    if (subject.kind === 'page') pageCases(opts, () => subject.codec);
    else blobCases(opts, () => subject.codec);
  });
}

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { InvalidArgumentError, ProtocolError } from '../../src/core/errors.js';
import { mulberry32 } from '../helpers/prng.js';
import {
  DEFAULT_LIMITS, Encoding, FrameDecoder, FrameTypeId, HEADER_BYTES, ProtocolErrorCode, decodeFrame, encodeFrame,
  clipUtf8, encodeHello, encodePages, encodeRunHead, encodeState, PROTOCOL_VERSION, type Frame, type HelloFrame,
} from '../../src/core/protocol/index.js';

function page(seed: number, size = 4096): Uint8Array {
  const p = new Uint8Array(size);
  for (let i = 0; i < size; i++) p[i] = (i * 31 + seed * 7) & 0xff;
  return p;
}

const SHA = 'ab'.repeat(32);

const hello: HelloFrame = {
  type: 'HELLO',
  minVersion: 1,
  maxVersion: PROTOCOL_VERSION,
  vmName: 'web-1 ✓',
  memoryBytes: 4 * 2 ** 30,
  guestBytes: 2 ** 20,
  pageSize: 4096,
  moduleSha256: SHA,
  moduleBytes: 123_456,
  config: '{"cpus":1}',
  offer: { modes: ['precopy', 'postcopy', 'hybrid'], maxStreams: 4, codecs: [{ id: 2, name: 'xbzrle' }, { id: 3, name: 'lz4' }] },
};

/** One frame of every type (both HELLO_ACK forms), with values near the edges of their fields. */
const SAMPLE_FRAMES: Frame[] = [
  hello,
  { type: 'HELLO_ACK', accepted: true, version: PROTOCOL_VERSION, mode: 'hybrid', streams: 2, codecs: [{ id: 3, name: 'lz4' }] },
  { type: 'HELLO_ACK', accepted: false, code: 'ERR_NO_CAPACITY', message: 'no room for 4 GiB' },
  { type: 'MODULE', totalBytes: 10, offset: 4, chunk: new Uint8Array([1, 2, 3, 4, 5, 6]) },
  { type: 'MODULE', totalBytes: 0, offset: 0, chunk: new Uint8Array(0) },
  {
    type: 'PAGES', seq: 3, demand: false, pages: [
      { index: 0, encoding: Encoding.RAW, data: page(1) },
      { index: 7, encoding: Encoding.ZERO, data: new Uint8Array(0) },
      { index: 0xffffffff, encoding: Encoding.RAW, data: page(2) },
    ],
  },
  { type: 'PAGES', seq: 42, demand: true, pages: [{ index: 9, encoding: Encoding.RAW, data: page(3) }] },
  { type: 'ROUND_END', round: 5, pages: 1000, dirty: 37 },
  {
    type: 'STATE', guestBytes: 3 * 65536,
    globals: [
      { type: 'i32', value: -2147483648 }, { type: 'i32', value: 2147483647 }, { type: 'i64', value: -(2n ** 63n) },
      { type: 'i64', value: 2n ** 63n - 1n }, { type: 'f32', bits: 0x7fc00001 }, { type: 'f64', bits: 0xfff8000000000001n },
    ],
    devices: { version: 1, net: { rx: [] }, console: { partial: '' }, nested: [1, 'two', null, { three: true }] },
    soft: { size: 70, words: new Uint32Array([0x80000001, 0, 0x3f]) },
  },
  { type: 'STATE', guestBytes: 0, globals: [], devices: {}, soft: { size: 0, words: new Uint32Array(0) } },
  { type: 'SWITCHOVER', pagesRemaining: 0, digest: { algorithm: 'sha256', hex: 'cd'.repeat(32) }, stale: { size: 0, words: new Uint32Array(0) } },
  { type: 'SWITCHOVER', pagesRemaining: 12345, digest: null, stale: { size: 40, words: new Uint32Array([0xffff0000, 0xff]) } },
  { type: 'RESUMED', pagesMissing: 777 },
  { type: 'ACK', acked: 'ROUND_END', value: 5 },
  { type: 'PAGE_REQUEST', id: 99, pages: [5, 0, 0xffffffff] },
  { type: 'PUSH_DONE', pagesSent: 4096 },
  { type: 'COMPLETE', digest: { algorithm: 'xxh64', hex: '0123456789abcdef' }, faultWaits: null },
  { type: 'COMPLETE', digest: null, faultWaits: null },
  { type: 'COMPLETE', digest: { algorithm: 'sha256', hex: 'ab'.repeat(32) }, faultWaits: { count: 2260, meanMs: 0.398, p50Ms: 0.332, p99Ms: 2.43, maxMs: 16.54 } },
  { type: 'ERROR', code: 'ERR_DIGEST_MISMATCH', message: 'memory differs after migration — ünïcode' },
  { type: 'CANCEL', reason: 'operator asked' },
  { type: 'PING', seq: 1, time: 1234.5678 },
  { type: 'PONG', seq: 1, time: -0.25 },
  { ...hello, vmName: 'gang-member', gang: 'gang-7' },
  { ...hello, vmName: 'named', guest: 'kv-✓'.repeat(9) + 'k' },
  { type: 'HELLO_ACK', accepted: true, version: PROTOCOL_VERSION, mode: 'postcopy', streams: 4, codecs: [], token: '0123456789abcdef'.repeat(2) },
  { type: 'HELLO_ACK', accepted: true, version: PROTOCOL_VERSION, mode: 'hybrid', streams: 1, codecs: [], token: 'fe'.repeat(16), faultPort: 65535 },
  { type: 'JOIN', token: 'fe'.repeat(16), stream: 3, role: 'data' },
  { type: 'JOIN', token: '00'.repeat(16), stream: 0, role: 'fault' },
  { type: 'BATCH', seq: 2, demand: false, blobCodec: 3, pages: 17, data: new Uint8Array([9, 8, 7, 6]) },
  { type: 'BATCH', seq: 7, demand: true, blobCodec: 0, pages: 1, data: new Uint8Array(0) },
  { type: 'RUN', seq: 4, extents: [{ first: 5, count: 1, data: page(4) }] },
  { type: 'RUN', seq: 0, extents: [{ first: 0, count: 2, data: concat([page(5), page(6)]) }, { first: 2, count: 1, data: page(7) }, { first: 0xffffffff, count: 1, data: page(8) }] },
];

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

/** Structural equality that compares typed arrays by content (decoded views may be subarrays). */
function norm(v: unknown): unknown {
  if (v instanceof Uint8Array) return { u8: Array.from(v) };
  if (v instanceof Uint32Array) return { u32: Array.from(v) };
  if (Array.isArray(v)) return v.map(norm);
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, norm(x)]));
  return v;
}

function decoderFor(): FrameDecoder {
  return new FrameDecoder({ encodings: [2, 3] });
}

function expectCode(fn: () => unknown, code: string): ProtocolError {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof ProtocolError, `expected ProtocolError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    return e;
  }
  assert.fail(`expected ${code}, nothing was thrown`);
}

const types = new Set(SAMPLE_FRAMES.map((f) => f.type));
test('the samples cover every frame type', () => {
  assert.deepEqual([...types].sort(), Object.keys(FrameTypeId).sort());
});

test('JOIN and BATCH refuse what they cannot carry', () => {
  // A data stream is 1.., the fault channel is stream 0; unknown roles are malformed.
  const join = encodeFrame({ type: 'JOIN', token: 'ab'.repeat(16), stream: 1, role: 'data' }).slice();
  const jv = new DataView(join.buffer);
  jv.setUint16(8 + 16, 0, true);
  expectCode(() => decodeFrame(join), ProtocolErrorCode.MALFORMED);
  jv.setUint16(8 + 16, 1, true);
  jv.setUint8(8 + 18, 7);
  expectCode(() => decodeFrame(join), ProtocolErrorCode.MALFORMED);
  assert.throws(() => encodeFrame({ type: 'JOIN', token: 'ab'.repeat(16), stream: 2, role: 'fault' }), /out of range/);
  assert.throws(() => encodeFrame({ type: 'JOIN', token: 'xyz', stream: 1, role: 'data' }), /hex/);
  // A blob codec that was not agreed is refused; 0 (packed, uncompressed) always works.
  const batch = encodeFrame({ type: 'BATCH', seq: 0, demand: false, blobCodec: 9, pages: 1, data: new Uint8Array(3) });
  expectCode(() => decodeFrame(batch), ProtocolErrorCode.UNKNOWN_ENCODING);
  assert.equal((decodeFrame(batch, { encodings: [9] }) as { blobCodec: number }).blobCodec, 9);
  expectCode(() => decodeFrame(encodeFrame({ type: 'BATCH', seq: 0, demand: false, blobCodec: 0, pages: 5000, data: new Uint8Array(3) })), ProtocolErrorCode.LIMIT);
  const zero = encodeFrame({ type: 'BATCH', seq: 0, demand: false, blobCodec: 0, pages: 1, data: new Uint8Array(0) }).slice();
  new DataView(zero.buffer).setUint32(8 + 5, 0, true);
  expectCode(() => decodeFrame(zero), ProtocolErrorCode.MALFORMED);
  // HELLO_ACK's token is 0 or 16 bytes.
  const ack = encodeFrame({ type: 'HELLO_ACK', accepted: true, version: PROTOCOL_VERSION, mode: 'precopy', streams: 1, codecs: [], token: '11'.repeat(16) }).slice();
  ack[8 + 1 + 2 + 1 + 2 + 1] = 15;
  expectCode(() => decodeFrame(ack), ProtocolErrorCode.MALFORMED);
  // A fault port needs the token its JOIN presents: refused on both sides.
  const noToken = encodeFrame({ type: 'HELLO_ACK', accepted: true, version: PROTOCOL_VERSION, mode: 'postcopy', streams: 1, codecs: [] }).slice();
  new DataView(noToken.buffer).setUint16(noToken.length - 2, 4000, true);
  expectCode(() => decodeFrame(noToken), ProtocolErrorCode.MALFORMED);
  assert.throws(() => encodeFrame({ type: 'HELLO_ACK', accepted: true, version: PROTOCOL_VERSION, mode: 'postcopy', streams: 1, codecs: [], faultPort: 4000 }), /needs a session token/);
  assert.throws(() => encodeFrame({ type: 'HELLO_ACK', accepted: true, version: PROTOCOL_VERSION, mode: 'postcopy', streams: 1, codecs: [], token: '11'.repeat(16), faultPort: 70000 }), /not in 1\.\.65535/);
});

test('every frame type round-trips through encodeFrame and FrameDecoder', () => {
  for (const f of SAMPLE_FRAMES) {
    const bytes = encodeFrame(f);
    const view = new DataView(bytes.buffer, bytes.byteOffset);
    assert.equal(view.getUint32(0, true), bytes.length - HEADER_BYTES, `${f.type} length field`);
    assert.equal(view.getUint8(4), FrameTypeId[f.type]);
    const d = decoderFor();
    const out = d.push(bytes);
    assert.equal(out.length, 1);
    assert.deepEqual(norm(out[0]), norm(f), f.type);
    assert.equal(d.bufferedBytes, 0);
    d.end();
  }
});

test('a stream of every frame decodes identically whole, byte by byte, and split at any point', () => {
  const stream = concat(SAMPLE_FRAMES.map((f) => encodeFrame(f)));
  const expected = norm(SAMPLE_FRAMES);

  assert.deepEqual(norm(decoderFor().push(stream)), expected);

  const d = decoderFor();
  const bytewise: Frame[] = [];
  for (let i = 0; i < stream.length; i++) bytewise.push(...d.push(stream.subarray(i, i + 1)));
  d.end();
  assert.deepEqual(norm(bytewise), expected);

  // Every single split point (one cut) and a sweep of two cuts.
  for (let cut = 0; cut <= stream.length; cut += 1) {
    const d2 = decoderFor();
    const got = [...d2.push(stream.slice(0, cut)), ...d2.push(stream.slice(cut))];
    if (cut % 997 === 0 || cut === stream.length) assert.deepEqual(norm(got), expected, `cut at ${cut}`);
    else assert.equal(got.length, SAMPLE_FRAMES.length, `cut at ${cut}`);
  }
  for (let a = 1; a < stream.length; a += 409) {
    for (let b = a; b <= stream.length; b += 613) {
      const d3 = decoderFor();
      const got = [...d3.push(stream.slice(0, a)), ...d3.push(stream.slice(a, b)), ...d3.push(stream.slice(b))];
      assert.deepEqual(norm(got), expected, `cuts at ${a}, ${b}`);
    }
  }
});

test('the decoder never holds more than one incomplete frame', () => {
  const stream = concat(SAMPLE_FRAMES.map((f) => encodeFrame(f)));
  const d = decoderFor();
  let max = 0;
  for (let i = 0; i < stream.length; i += 100) {
    d.push(stream.subarray(i, i + 100));
    max = Math.max(max, d.bufferedBytes);
  }
  const largest = Math.max(...SAMPLE_FRAMES.map((f) => encodeFrame(f).length));
  assert.ok(max < largest, `buffered ${max}, largest frame ${largest}`);
  assert.ok(d.maxBufferedBytes === HEADER_BYTES + DEFAULT_LIMITS.maxPayloadBytes);
});

test('a full 4096-page batch fits the default frame limit', () => {
  const pages = Array.from({ length: DEFAULT_LIMITS.maxPagesPerBatch }, (_, i) => ({ index: i, encoding: Encoding.RAW, data: page(i) }));
  const bytes = encodePages({ seq: 1, demand: false, pages });
  const f = decodeFrame(bytes);
  assert.equal(f.type, 'PAGES');
  if (f.type === 'PAGES') {
    assert.equal(f.pages.length, 4096);
    assert.deepEqual(f.pages[4095].data, page(4095));
  }
});

function header(length: number, type: number, flags = 0, reserved = 0): Uint8Array {
  const h = new Uint8Array(8);
  const v = new DataView(h.buffer);
  v.setUint32(0, length, true);
  v.setUint8(4, type);
  v.setUint8(5, flags);
  v.setUint16(6, reserved, true);
  return h;
}

test('header errors are named and refused before the payload arrives', () => {
  expectCode(() => new FrameDecoder().push(header(16, 0x77)), ProtocolErrorCode.UNKNOWN_TYPE);
  expectCode(() => new FrameDecoder().push(header(0, 0)), ProtocolErrorCode.UNKNOWN_TYPE);
  expectCode(() => new FrameDecoder().push(header(0xffffffff, FrameTypeId.PAGES)), ProtocolErrorCode.FRAME_TOO_LARGE);
  expectCode(() => new FrameDecoder({ maxPayloadBytes: 1000 }).push(header(1001, FrameTypeId.MODULE)), ProtocolErrorCode.FRAME_TOO_LARGE);
  // A small type claiming a big payload is refused at the header, not after buffering it.
  expectCode(() => new FrameDecoder().push(header(1 << 20, FrameTypeId.ERROR)), ProtocolErrorCode.FRAME_TOO_LARGE);
  expectCode(() => new FrameDecoder().push(header(12, FrameTypeId.PING, 0, 1)), ProtocolErrorCode.MALFORMED);
  expectCode(() => new FrameDecoder().push(header(12, FrameTypeId.PING, 0x01)), ProtocolErrorCode.MALFORMED);
  expectCode(() => new FrameDecoder().push(header(8, FrameTypeId.PAGES, 0x02)), ProtocolErrorCode.MALFORMED);
  expectCode(() => new FrameDecoder().push(header(11, FrameTypeId.ROUND_END)), ProtocolErrorCode.TRUNCATED);
  expectCode(() => new FrameDecoder().push(header(13, FrameTypeId.ROUND_END)), ProtocolErrorCode.FRAME_TOO_LARGE);
});

function patched(f: Frame, at: number, bytes: number[]): Uint8Array {
  const b = encodeFrame(f).slice();
  b.set(bytes, HEADER_BYTES + at);
  return b;
}

test('HELLO guest: at most 64 bytes on the wire (LIMIT past it); clipUtf8 cuts a longer name at a character', () => {
  // The guest is HELLO's last field: its length is the u16 just before its bytes.
  const named = encodeFrame({ ...hello, guest: 'g'.repeat(64) }).slice();
  const at = named.length - 64 - 2;
  assert.equal(new DataView(named.buffer).getUint16(at, true), 64);
  assert.equal((decodeFrame(named) as HelloFrame).guest, 'g'.repeat(64));
  const long = new Uint8Array(named.length + 1);
  long.set(named);
  long[long.length - 1] = 0x67;
  new DataView(long.buffer).setUint32(0, new DataView(named.buffer).getUint32(0, true) + 1, true);
  new DataView(long.buffer).setUint16(at, 65, true);
  expectCode(() => decodeFrame(long), ProtocolErrorCode.LIMIT);
  assert.equal((decodeFrame(encodeFrame({ ...hello, guest: '' })) as HelloFrame).guest, undefined, 'empty: unnamed');
  assert.equal(clipUtf8('my-guest.wasm', 64), 'my-guest.wasm');
  assert.equal(clipUtf8('é'.repeat(40), 64), 'é'.repeat(32)); // 2 bytes each
  assert.equal(clipUtf8('✓'.repeat(30), 64), '✓'.repeat(21)); // 3 bytes each: 63
  assert.equal(clipUtf8('😀'.repeat(20), 63), '😀'.repeat(15), 'a surrogate pair is never split'); // 4 bytes each: 60
});

test('payload errors are named', () => {
  // HELLO magic, version range.
  expectCode(() => decodeFrame(patched(hello, 0, [0x46, 0x52, 0x52, 0x58])), ProtocolErrorCode.BAD_MAGIC);
  expectCode(() => decodeFrame(patched(hello, 4, [PROTOCOL_VERSION + 1, 0, PROTOCOL_VERSION + 2, 0])), ProtocolErrorCode.BAD_VERSION);
  expectCode(() => decodeFrame(patched(hello, 4, [3, 0, 2, 0])), ProtocolErrorCode.MALFORMED);
  expectCode(() => decodeFrame(encodeFrame({ type: 'HELLO_ACK', accepted: true, version: PROTOCOL_VERSION + 1, mode: 'precopy', streams: 1, codecs: [] })), ProtocolErrorCode.BAD_VERSION);
  // HELLO_ACK must choose exactly one mode.
  const ack = encodeFrame({ type: 'HELLO_ACK', accepted: true, version: PROTOCOL_VERSION, mode: 'precopy', streams: 1, codecs: [] }).slice();
  ack[HEADER_BYTES + 3] = 0x03;
  expectCode(() => decodeFrame(ack), ProtocolErrorCode.MALFORMED);
  // Truncated: the length field is honest about the bytes, the payload is short of its fields.
  const ping = encodeFrame({ type: 'CANCEL', reason: 'abc' }).slice();
  new DataView(ping.buffer).setUint32(0, 4, true);
  expectCode(() => decodeFrame(ping.subarray(0, HEADER_BYTES + 4)), ProtocolErrorCode.TRUNCATED);
  // Trailing bytes.
  const trailing = concat([encodeFrame({ type: 'CANCEL', reason: 'x' }), new Uint8Array(1)]);
  new DataView(trailing.buffer).setUint32(0, 4, true);
  expectCode(() => decodeFrame(trailing), ProtocolErrorCode.MALFORMED);
  // Bad UTF-8.
  expectCode(() => decodeFrame(patched({ type: 'CANCEL', reason: 'ab' }, 2, [0xff])), ProtocolErrorCode.MALFORMED);
  // Error code syntax.
  expectCode(() => decodeFrame(patched({ type: 'ERROR', code: 'ERR_X', message: '' }, 2, [0x61])), ProtocolErrorCode.MALFORMED);
  // Unknown ACKed type.
  expectCode(() => decodeFrame(patched({ type: 'ACK', acked: 'STATE', value: 0 }, 0, [0x99])), ProtocolErrorCode.MALFORMED);
  // Non-finite PING time.
  expectCode(() => decodeFrame(patched({ type: 'PING', seq: 0, time: 0 }, 4, [0, 0, 0, 0, 0, 0, 0xf8, 0x7f])), ProtocolErrorCode.MALFORMED);
  // Digest with wrong length / unknown algorithm.
  expectCode(() => decodeFrame(patched({ type: 'COMPLETE', digest: { algorithm: 'xxh64', hex: '00'.repeat(8) }, faultWaits: null }, 1, [9])), ProtocolErrorCode.MALFORMED);
  expectCode(() => decodeFrame(patched({ type: 'COMPLETE', digest: { algorithm: 'xxh64', hex: '00'.repeat(8) }, faultWaits: null }, 0, [7])), ProtocolErrorCode.MALFORMED);
  // COMPLETE's fault-wait summary (version 5): after a 10-byte xxh64 digest, a presence byte, u32
  // count, then mean, p50, p99 and max as f64.
  const waits = { type: 'COMPLETE' as const, digest: { algorithm: 'xxh64' as const, hex: '00'.repeat(8) }, faultWaits: { count: 3, meanMs: 0.3, p50Ms: 0.25, p99Ms: 0.9, maxMs: 1 } };
  assert.deepEqual(decodeFrame(encodeFrame(waits)), waits);
  expectCode(() => decodeFrame(patched({ ...waits, faultWaits: null }, 10, [2])), ProtocolErrorCode.MALFORMED); // presence neither 0 nor 1
  expectCode(() => decodeFrame(patched(waits, 11, [0, 0, 0, 0])), ProtocolErrorCode.MALFORMED); // no faults
  expectCode(() => decodeFrame(patched(waits, 15, [0, 0, 0, 0, 0, 0, 0xf8, 0x7f])), ProtocolErrorCode.MALFORMED); // NaN mean
  expectCode(() => decodeFrame(patched(waits, 23, [0, 0, 0, 0, 0, 0, 0x24, 0x40])), ProtocolErrorCode.MALFORMED); // p50 10 > p99
  expectCode(() => decodeFrame(patched(waits, 39, [0, 0, 0, 0, 0, 0, 0xf0, 0xbf])), ProtocolErrorCode.MALFORMED); // max -1
  // A summary cut short: the presence byte says one follows.
  const cut = encodeFrame({ ...waits, faultWaits: null }).slice();
  const longer = new Uint8Array(cut.length + 8);
  longer.set(cut);
  longer[HEADER_BYTES + 10] = 1;
  new DataView(longer.buffer).setUint32(0, 10 + 1 + 8, true);
  expectCode(() => decodeFrame(longer), ProtocolErrorCode.TRUNCATED);
  // The encoder refuses what the decoder would.
  assert.throws(() => encodeFrame({ ...waits, faultWaits: { ...waits.faultWaits, p99Ms: 0.1 } }), InvalidArgumentError);
  assert.throws(() => encodeFrame({ ...waits, faultWaits: { ...waits.faultWaits, count: 0 } }), InvalidArgumentError);
});

test('PAGES: counts, encodings and page lengths are bounded', () => {
  const one = { seq: 0, demand: false, pages: [{ index: 1, encoding: Encoding.RAW, data: page(1) }] };
  // Count above the limit: caught at the header when the frame cannot fit, else at the count.
  const three = encodePages({ ...one, pages: [...one.pages, ...one.pages, ...one.pages] });
  expectCode(() => new FrameDecoder({ maxPagesPerBatch: 1 }).push(three), ProtocolErrorCode.FRAME_TOO_LARGE);
  expectCode(() => new FrameDecoder({ maxPagesPerBatch: 2 }).push(three), ProtocolErrorCode.LIMIT);
  const huge = encodePages(one).slice();
  new DataView(huge.buffer).setUint32(HEADER_BYTES + 4, 0xffffffff, true);
  expectCode(() => decodeFrame(huge), ProtocolErrorCode.LIMIT);
  new DataView(huge.buffer).setUint32(HEADER_BYTES + 4, 4000, true);
  expectCode(() => decodeFrame(huge), ProtocolErrorCode.TRUNCATED);
  new DataView(huge.buffer).setUint32(HEADER_BYTES + 4, 0, true);
  expectCode(() => decodeFrame(huge), ProtocolErrorCode.MALFORMED);
  // A raw page of the wrong size.
  expectCode(() => new FrameDecoder({ pageSize: 8192 }).push(encodePages(one)), ProtocolErrorCode.MALFORMED);
  // Codec ids must have been agreed.
  const coded = encodePages({ seq: 0, demand: false, pages: [{ index: 1, encoding: 5, data: new Uint8Array(10) }] });
  expectCode(() => decodeFrame(coded), ProtocolErrorCode.UNKNOWN_ENCODING);
  const d = new FrameDecoder();
  d.allowEncodings([5]);
  assert.equal(d.push(coded).length, 1);
  const big = encodePages({ seq: 0, demand: false, pages: [{ index: 1, encoding: 5, data: new Uint8Array(9000) }] });
  expectCode(() => new FrameDecoder({ encodings: [5] }).push(big), ProtocolErrorCode.LIMIT);
  // Zero pages carry nothing.
  const zero = encodePages({ seq: 0, demand: false, pages: [{ index: 1, encoding: 5, data: new Uint8Array(1) }] }).slice();
  zero[HEADER_BYTES + 12] = Encoding.ZERO;
  expectCode(() => decodeFrame(zero), ProtocolErrorCode.MALFORMED);
});

test('STATE: JSON, globals and bitmap are bounded and checked', () => {
  const base = { guestBytes: 65536, globals: [], devices: { a: 'x'.repeat(100) }, soft: { size: 33, words: new Uint32Array([1, 1]) } };
  expectCode(() => new FrameDecoder({ maxJsonBytes: 50, maxGlobals: 1, maxBitmapBits: 32 }).push(encodeState(base)), ProtocolErrorCode.FRAME_TOO_LARGE);
  // Header allows it (bigger frame room) but the JSON length field is above the limit.
  expectCode(() => new FrameDecoder({ maxJsonBytes: 50, maxGlobals: 100 }).push(encodeState(base)), ProtocolErrorCode.LIMIT);
  expectCode(() => new FrameDecoder({ maxBitmapBits: 32, maxGlobals: 100 }).push(encodeState(base)), ProtocolErrorCode.LIMIT);
  // Bits past the bitmap's size.
  const stray = encodeState(base).slice();
  stray[stray.length - 1] = 0x80;
  expectCode(() => decodeFrame(stray), ProtocolErrorCode.MALFORMED);
  // Not JSON / not an object / deeply nested.
  const notJson = encodeState(base).slice();
  notJson[HEADER_BYTES + 8 + 4 + 4] = 0x7b + 1;
  expectCode(() => decodeFrame(notJson), ProtocolErrorCode.MALFORMED);
  assert.throws(() => encodeState({ ...base, devices: [] as unknown as Record<string, unknown> }), InvalidArgumentError);
  const arr = encodeState({ ...base, devices: { a: 1 } }).slice();
  arr.set(new TextEncoder().encode('[1,2,3]'), HEADER_BYTES + 16);
  expectCode(() => decodeFrame(arr), ProtocolErrorCode.MALFORMED);
  const deep = '['.repeat(200_000) + ']'.repeat(200_000);
  const deepFrame = encodeState({ ...base, devices: { a: deep } }).slice();
  // Replace the string (quoted) with raw nesting of the same length: {"a":[[[...]]]} stays the same size.
  const text = new TextDecoder().decode(deepFrame.subarray(HEADER_BYTES + 16, HEADER_BYTES + 16 + deep.length + 8));
  assert.ok(text.startsWith('{"a":"['));
  deepFrame.set(new TextEncoder().encode('[' + deep + ']}'), HEADER_BYTES + 16 + 5);
  expectCode(() => decodeFrame(deepFrame), ProtocolErrorCode.LIMIT);
  // Brackets inside strings don't count; 64 levels are fine, 65 are not.
  const nest = (n: number) => JSON.parse('['.repeat(n - 1) + '"[[[{{{\\"[["' + ']'.repeat(n - 1)) as unknown;
  assert.equal(decodeFrame(encodeState({ ...base, devices: { a: nest(64) } })).type, 'STATE');
  expectCode(() => decodeFrame(encodeState({ ...base, devices: { a: nest(65) } })), ProtocolErrorCode.LIMIT);
  // Unknown global type.
  const g = encodeState({ ...base, globals: [{ type: 'i32', value: 1 }] }).slice();
  g[HEADER_BYTES + 12] = 9;
  expectCode(() => decodeFrame(g), ProtocolErrorCode.MALFORMED);
});

test('limits from the handshake: module and memory sizes', () => {
  const h = encodeHello({ ...hello, moduleBytes: 1000 });
  expectCode(() => new FrameDecoder({ maxModuleBytes: 999 }).push(h), ProtocolErrorCode.LIMIT);
  expectCode(() => new FrameDecoder({ maxMemoryBytes: 2 ** 30 }).push(h), ProtocolErrorCode.LIMIT);
  expectCode(() => new FrameDecoder({ maxModuleBytes: 9 }).push(encodeFrame({ type: 'MODULE', totalBytes: 10, offset: 0, chunk: new Uint8Array(1) })), ProtocolErrorCode.LIMIT);
  const past = encodeFrame({ type: 'MODULE', totalBytes: 10, offset: 0, chunk: new Uint8Array(5) }).slice();
  past[HEADER_BYTES + 4] = 6;
  expectCode(() => decodeFrame(past), ProtocolErrorCode.MALFORMED);
});

test('after an error the decoder is poisoned with the same error', () => {
  const d = new FrameDecoder();
  const first = expectCode(() => d.push(header(0, 0xee)), ProtocolErrorCode.UNKNOWN_TYPE);
  assert.equal(d.error, first);
  assert.throws(() => d.push(encodeFrame({ type: 'PING', seq: 1, time: 1 })), (e) => e === first);
  assert.throws(() => d.end(), (e) => e === first);
});

test('end() inside a frame is an unexpected EOF; frames before it are still delivered', () => {
  const bytes = concat([encodeFrame({ type: 'PING', seq: 1, time: 1 }), encodeFrame({ type: 'PING', seq: 2, time: 2 }).subarray(0, 5)]);
  const d = new FrameDecoder();
  assert.equal(d.push(bytes).length, 1);
  assert.equal(d.bufferedBytes, 5);
  expectCode(() => d.end(), ProtocolErrorCode.UNEXPECTED_EOF);
});

test('encoders refuse what the protocol cannot carry', () => {
  assert.throws(() => encodeHello({ ...hello, vmName: 'x'.repeat(65) }), InvalidArgumentError);
  assert.throws(() => encodeHello({ ...hello, vmName: '' }), InvalidArgumentError);
  assert.throws(() => encodeHello({ ...hello, guest: 'x'.repeat(65) }), InvalidArgumentError);
  assert.throws(() => encodeHello({ ...hello, pageSize: 3000 }), InvalidArgumentError);
  assert.throws(() => encodeHello({ ...hello, moduleSha256: 'AB'.repeat(32) }), InvalidArgumentError);
  assert.throws(() => encodeHello({ ...hello, offer: { ...hello.offer, modes: [] } }), InvalidArgumentError);
  assert.throws(() => encodeHello({ ...hello, offer: { ...hello.offer, codecs: [{ id: 1, name: 'zero' }] } }), InvalidArgumentError);
  assert.throws(() => encodeHello({ ...hello, guestBytes: hello.memoryBytes + 1 }), InvalidArgumentError);
  assert.throws(() => encodeFrame({ type: 'ERROR', code: 'oops', message: '' }), InvalidArgumentError);
  assert.throws(() => encodeFrame({ type: 'PAGES', seq: 0, demand: false, pages: [] }), InvalidArgumentError);
  assert.throws(() => encodeFrame({ type: 'PAGES', seq: 0, demand: false, pages: [{ index: 0, encoding: Encoding.RAW, data: new Uint8Array(10) }] }, 4096), InvalidArgumentError);
  assert.throws(() => encodeFrame({ type: 'ROUND_END', round: -1, pages: 0, dirty: 0 }), InvalidArgumentError);
  assert.throws(() => encodeFrame({ type: 'STATE', guestBytes: 0, globals: [{ type: 'i32', value: 2 ** 31 }], devices: {}, soft: { size: 0, words: new Uint32Array(0) } }), InvalidArgumentError);
  assert.throws(() => encodeFrame({ type: 'STATE', guestBytes: 0, globals: [], devices: {}, soft: { size: 1, words: new Uint32Array([2]) } }), InvalidArgumentError);
  assert.throws(() => encodeFrame({ type: 'MODULE', totalBytes: 3, offset: 2, chunk: new Uint8Array(2) }), InvalidArgumentError);
  assert.throws(() => encodeFrame({ type: 'PING', seq: 0, time: NaN }), InvalidArgumentError);
});

// ---- Property tests: whatever bytes arrive, the decoder throws only ProtocolError, stays within
// its buffer cap, and terminates. A seeded PRNG keeps failures reproducible (the seed is printed).


const KNOWN_CODES = new Set<string>(Object.values(ProtocolErrorCode));

interface FuzzStats { frames: number; errors: Map<string, number> }

/**
 * Feeds `bytes` in random chunks, then ends the stream; checks the invariants. Half the time it
 * reads as a socket with `readInto` does (into the decoder's target when it names one, else into a
 * reused buffer pushed as transient) with a run sink that takes some extents into "guest memory".
 */
function feed(d: FrameDecoder, bytes: Uint8Array, rnd: () => number, stats: FuzzStats, label: string): void {
  const byob = rnd() < 0.5;
  const guest = new Uint8Array(1 << 16);
  const scratch = new Uint8Array(4096);
  if (byob) d.setRunSink((first, count) => (rnd() < 0.5 && count * d.limits.pageSize <= guest.length ? guest.subarray(0, count * d.limits.pageSize) : null));
  try {
    let pos = 0;
    while (pos < bytes.length) {
      let n = rnd() < 0.3 ? 1 + Math.floor(rnd() * 8) : 1 + Math.floor(rnd() * bytes.length);
      n = Math.min(n, bytes.length - pos);
      const target = byob ? d.readTarget() : null;
      if (target) {
        n = Math.min(n, target.length);
        target.set(bytes.subarray(pos, pos + n));
        stats.frames += d.push(target.subarray(0, n), true).length;
      } else if (byob) {
        n = Math.min(n, scratch.length);
        scratch.set(bytes.subarray(pos, pos + n));
        stats.frames += d.push(scratch.subarray(0, n), true).length;
        scratch.fill(0xee); // a reused buffer: nothing decoded may still point into it
      } else stats.frames += d.push(bytes.subarray(pos, pos + n)).length;
      pos += n;
      if (d.bufferedBytes > d.maxBufferedBytes) assert.fail(`${label}: buffered ${d.bufferedBytes} > cap ${d.maxBufferedBytes}`);
    }
    d.end();
  } catch (e) {
    if (!(e instanceof ProtocolError)) assert.fail(`${label}: threw ${(e as Error)?.name}: ${(e as Error)?.message}`);
    if (!KNOWN_CODES.has(e.code)) assert.fail(`${label}: unknown code ${e.code}`);
    stats.errors.set(e.code, (stats.errors.get(e.code) ?? 0) + 1);
    // Poisoned: the same error again.
    assert.throws(() => d.push(new Uint8Array(1)), (x) => x === e);
  }
}

function randomBytes(rnd: () => number, n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = Math.floor(rnd() * 256);
  return b;
}

const SEED = Number(process.env.FERRY_FUZZ_SEED ?? 0x5eed) >>> 0;

test(`fuzz: 60,000 random byte strings (seed ${SEED})`, () => {
  const rnd = mulberry32(SEED);
  const stats: FuzzStats = { frames: 0, errors: new Map() };
  const ids = Object.values(FrameTypeId);
  for (let i = 0; i < 60_000; i++) {
    let bytes = randomBytes(rnd, Math.floor(rnd() * (rnd() < 0.2 ? 400 : 96)));
    // Most strings get a plausible header so the payload decoders are reached too.
    if (rnd() < 0.8 && bytes.length >= 8) {
      const v = new DataView(bytes.buffer);
      v.setUint32(0, rnd() < 0.7 ? bytes.length - 8 : Math.floor(rnd() * 2 ** 32), true);
      v.setUint8(4, ids[Math.floor(rnd() * ids.length)]);
      if (rnd() < 0.9) v.setUint8(5, 0);
      if (rnd() < 0.9) v.setUint16(6, 0, true);
      if (v.getUint8(4) === FrameTypeId.HELLO && rnd() < 0.7 && bytes.length >= 16) {
        bytes.set([0x46, 0x52, 0x52, 0x59, 1, 0, 1, 0], 8);
      }
    }
    if (rnd() < 0.05) bytes = concat([encodeFrame(SAMPLE_FRAMES[i % SAMPLE_FRAMES.length]), bytes]);
    const small = rnd() < 0.5;
    feed(new FrameDecoder(small ? { maxPayloadBytes: 64, maxPagesPerBatch: 2, maxJsonBytes: 16 } : { encodings: [2, 3] }), bytes, rnd, stats, `random #${i}`);
  }
  assert.ok(stats.errors.size >= 5, `only reached ${[...stats.errors.keys()].join(', ')}`);
});

test(`fuzz: 60,000 mutated valid frames (seed ${SEED})`, () => {
  const rnd = mulberry32(SEED ^ 0xa5a5a5a5);
  const stats: FuzzStats = { frames: 0, errors: new Map() };
  // Smaller pages keep the PAGES samples cheap to mutate 60k times.
  const samples = SAMPLE_FRAMES.map((f): Frame => {
    if (f.type === 'PAGES') return { ...f, pages: f.pages.map((p) => ({ ...p, data: p.encoding === Encoding.RAW ? p.data.subarray(0, 512) : p.data })) };
    if (f.type === 'RUN') return { ...f, extents: f.extents.map((e) => ({ ...e, data: e.data.subarray(0, e.count * 512) })) };
    return f;
  }).map((f) => encodeFrame(f, 512));
  for (let i = 0; i < 60_000; i++) {
    const k = 1 + Math.floor(rnd() * 3);
    const parts: Uint8Array[] = [];
    for (let j = 0; j < k; j++) parts.push(samples[Math.floor(rnd() * samples.length)]);
    const bytes = concat(parts);
    const v = new DataView(bytes.buffer);
    const start = parts.slice(0, Math.floor(rnd() * k)).reduce((n, p) => n + p.length, 0);
    let out = bytes;
    switch (Math.floor(rnd() * 7)) {
      case 0: { // bit flips anywhere
        for (let f = 1 + Math.floor(rnd() * 3); f > 0; f--) {
          const at = Math.floor(rnd() * bytes.length);
          bytes[at] ^= 1 << Math.floor(rnd() * 8);
        }
        break;
      }
      case 1: out = bytes.subarray(0, Math.floor(rnd() * bytes.length)); break; // truncation
      case 2: v.setUint32(start, [0xffffffff, 0x7fffffff, 0x01000000, 0x01010000, Math.floor(rnd() * 2 ** 32)][Math.floor(rnd() * 5)], true); break;
      case 3: v.setUint8(start + 4, Math.floor(rnd() * 256)); break; // type byte
      case 4: { // a u32 inside a payload set huge / zero / random
        const at = start + 8 + Math.floor(rnd() * Math.max(1, bytes.length - start - 12));
        if (at + 4 <= bytes.length) v.setUint32(at, [0xffffffff, 0, Math.floor(rnd() * 2 ** 32), 0x10000][Math.floor(rnd() * 4)], true);
        break;
      }
      case 5: out = concat([bytes, randomBytes(rnd, 1 + Math.floor(rnd() * 32))]); break; // junk after
      default: { // length off by a little
        const len = v.getUint32(start, true);
        v.setUint32(start, Math.max(0, len + Math.floor(rnd() * 17) - 8), true);
      }
    }
    const small = rnd() < 0.3;
    feed(new FrameDecoder(small ? { maxPayloadBytes: 600, maxPagesPerBatch: 1, pageSize: 512 } : { encodings: [2, 3], pageSize: 512 }), out, rnd, stats, `mutation #${i}`);
  }
  assert.ok(stats.frames > 10_000, `only ${stats.frames} frames survived mutation (mutations too destructive to test decoding)`);
  for (const code of [ProtocolErrorCode.FRAME_TOO_LARGE, ProtocolErrorCode.UNKNOWN_TYPE, ProtocolErrorCode.TRUNCATED, ProtocolErrorCode.MALFORMED, ProtocolErrorCode.UNEXPECTED_EOF]) {
    assert.ok(stats.errors.has(code), `mutations never produced ${code}: ${JSON.stringify([...stats.errors])}`);
  }
});

test('fast-check: arbitrary chunkings of arbitrary bytes never escape ProtocolError', async () => {
  const fc = await import('fast-check');
  fc.assert(fc.property(fc.uint8Array({ maxLength: 200 }), fc.array(fc.nat(50), { maxLength: 10 }), (bytes, cuts) => {
    const d = new FrameDecoder({ maxPayloadBytes: 100 });
    try {
      let pos = 0;
      for (const c of cuts) { d.push(bytes.subarray(pos, pos + c)); pos += c; }
      d.push(bytes.subarray(pos));
      d.end();
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
    }
    return d.bufferedBytes <= d.maxBufferedBytes;
  }), { numRuns: 5000, seed: SEED });
});

test('PagesFrameBuilder produces exactly the bytes encodePages does, and decodes', async () => {
  const { PagesFrameBuilder } = await import('../../src/core/protocol/index.js');
  const b = new PagesFrameBuilder(4, 4096);
  b.addRaw(7).set(page(7));
  b.addZero(9);
  b.addRaw(12).set(page(12));
  const built = b.finish(3, true);
  const expected = encodePages({ seq: 3, demand: true, pages: [
    { index: 7, encoding: Encoding.RAW, data: page(7) },
    { index: 9, encoding: Encoding.ZERO, data: new Uint8Array(0) },
    { index: 12, encoding: Encoding.RAW, data: page(12) },
  ] }, 4096);
  assert.deepEqual(built, expected);
  const f = decodeFrame(built) as Frame & { type: 'PAGES' };
  assert.deepEqual(f.pages.map((p) => p.index), [7, 9, 12]);
  const full = new PagesFrameBuilder(1, 4096);
  full.addZero(1);
  assert.equal(full.full, true);
  assert.throws(() => full.addZero(2), InvalidArgumentError);
  assert.throws(() => new PagesFrameBuilder(1, 4096).finish(0, false), InvalidArgumentError);
});

test('recycle: a big PAGES frame given back is reused for the next one, which still decodes exactly', () => {
  const d = new FrameDecoder();
  const frameOf = (seed: number, n: number) => encodePages({ seq: seed, demand: false, pages: Array.from({ length: n }, (_, i) => ({ index: seed * 1000 + i, encoding: Encoding.RAW, data: page(seed + i) })) });
  const feed = (bytes: Uint8Array) => {
    const out: Frame[] = [];
    for (let at = 0; at < bytes.length; at += 65536) out.push(...d.push(bytes.subarray(at, at + 65536))); // as a socket delivers it
    return out;
  };
  const [a] = feed(frameOf(1, 40));
  assert.equal(a.type, 'PAGES');
  const bufA = a.type === 'PAGES' ? a.pages[0].data.buffer : null;
  d.recycle(a);
  // A smaller big frame lands in the same buffer (longer than the frame: only its length counts).
  const [b] = feed(frameOf(2, 30));
  assert.ok(b.type === 'PAGES');
  assert.equal(b.pages[0].data.buffer, bufA, 'the recycled buffer was reused');
  assert.equal(b.pages.length, 30);
  for (const [i, p] of b.pages.entries()) {
    assert.equal(p.index, 2000 + i);
    assert.deepEqual(p.data, page(2 + i));
  }
  // Not given back: the next frame gets a buffer of its own, and b's data stays intact.
  const [c] = feed(frameOf(3, 40));
  assert.ok(c.type === 'PAGES');
  assert.notEqual(c.pages[0].data.buffer, bufA);
  assert.deepEqual(b.pages[29].data, page(2 + 29));
  // A frame given back twice, or one this decoder never assembled, changes nothing.
  d.recycle(b);
  d.recycle(b);
  d.recycle({ type: 'PUSH_DONE', pagesSent: 1 });
  const [e] = feed(frameOf(4, 40));
  const [f] = feed(frameOf(5, 40));
  assert.ok(e.type === 'PAGES' && f.type === 'PAGES');
  assert.notEqual(e.pages[0].data.buffer, f.pages[0].data.buffer, 'one buffer given back serves one frame');
  assert.deepEqual(e.pages[39].data, page(4 + 39));
});

test('RUN: a stream decodes the same through readTarget and a run sink, byte by byte or at once; in-place extents land in guest memory; short ones are read with what follows', () => {
  const P = 4096;
  const run2 = concat(Array.from({ length: 9 }, (_, k) => page(4 + k)));
  const runs: Frame[] = [
    { type: 'PAGES', seq: 1, demand: false, pages: [{ index: 3, encoding: Encoding.RAW, data: page(30) }] },
    { type: 'RUN', seq: 1, extents: [{ first: 2, count: 2, data: concat([page(1), page(2)]) }, { first: 9, count: 1, data: page(3) }] },
    { type: 'ROUND_END', round: 1, pages: 4, dirty: 0 },
    { type: 'RUN', seq: 2, extents: [{ first: 16, count: 9, data: run2 }] },
  ];
  const stream = concat(runs.map((f) => encodeFrame(f)));
  for (const step of [1, 7, 4096, 5000, stream.length]) {
    const guest = new Uint8Array(32 * P);
    const d = new FrameDecoder();
    const asked: number[] = [];
    d.setRunSink((first, count) => {
      asked.push(first);
      return first === 9 ? null : guest.subarray(first * P, (first + count) * P); // page 9 stays in the frame
    });
    const scratch = new Uint8Array(step);
    const out: Frame[] = [];
    let targets = 0;
    for (let pos = 0; pos < stream.length;) {
      const t = d.readTarget();
      const into = t ?? scratch;
      const n = Math.min(step, into.length, stream.length - pos);
      into.set(stream.subarray(pos, pos + n));
      if (t) {
        targets++;
        // Guest memory is offered for run 2's extent (36 KiB), not for run 1's first (8 KiB, read with what follows).
        if (t.buffer === guest.buffer) assert.ok(t.byteOffset >= 16 * P && t.byteOffset + t.length <= 25 * P, `step ${step}: a target inside run 2`);
        if (t.buffer === guest.buffer) assert.ok(t.length >= 32 * 1024 || t.byteOffset + t.length === 25 * P, `step ${step}: a target of ${t.length} bytes`);
      }
      out.push(...d.push(into.subarray(0, n), true));
      pos += n;
    }
    d.end();
    assert.equal(out.length, 4, `step ${step}`);
    const [pages, r1, , r2] = out;
    assert.ok(pages.type === 'PAGES' && r1.type === 'RUN' && r2.type === 'RUN');
    assert.deepEqual(pages.pages[0].data, page(30), `step ${step}: a PAGES frame decoded from reused buffers keeps its bytes`);
    // When the PAGES frame before it completes in the same push (all at once, or in 5000-byte reads),
    // the first RUN's sink is not asked (the receiver cannot have applied that frame yet): its
    // extents stay in the frame. Read into targets, the PAGES frame ends a push of its own.
    const together = step === stream.length;
    if (together) assert.equal(r1.extents[0].inPlace, undefined);
    if (step <= 4096) assert.equal(r1.extents[0].inPlace, true, `step ${step}`);
    assert.equal(r1.extents[1].inPlace, undefined);
    assert.deepEqual(r1.extents[0].data, concat([page(1), page(2)]));
    assert.deepEqual(r1.extents[1].data, page(3));
    // Run 2 follows ROUND_END, which carries no pages: the sink is asked even in the same push
    // (unless run 1 came in that push too). Read into targets, run 1 ends a push of its own.
    assert.equal(r2.extents[0].inPlace, together ? undefined : true);
    assert.deepEqual(r2.extents[0].data, run2);
    if (r2.extents[0].inPlace) assert.deepEqual(guest.subarray(16 * P, 25 * P), run2, `step ${step}: run 2 is in guest memory`);
    if (r1.extents[0].inPlace) assert.deepEqual(guest.subarray(2 * P, 4 * P), concat([page(1), page(2)]));
    else assert.deepEqual(guest.subarray(2 * P, 4 * P), new Uint8Array(2 * P));
    assert.deepEqual(guest.subarray(9 * P, 10 * P), new Uint8Array(P), 'the extent the sink declined is not in guest memory');
    if (together) assert.deepEqual(asked, [], 'all in one push, every run follows a page frame of that push');
    if (step >= 4096 && step < stream.length) assert.ok(targets > 0, 'bytes were read straight into targets');
  }
});

test('RUN: heads and lengths are checked before any page byte is taken', () => {
  const forged = (pairs: number[][], extra = 0, pagesOverride?: number) => {
    const head = encodeRunHead(1, pairs.map((_, i) => ({ first: i * 10, count: 1 })), 4096);
    const v = new DataView(head.buffer);
    let pages = 0;
    pairs.forEach(([first, count], i) => { v.setUint32(HEADER_BYTES + 8 + i * 8, first, true); v.setUint32(HEADER_BYTES + 12 + i * 8, count, true); pages += count; });
    const carried = pagesOverride ?? pages;
    v.setUint32(0, 8 + 8 * pairs.length + carried * 4096 + extra, true);
    return concat([head, new Uint8Array(carried * 4096 + extra)]);
  };
  assert.equal(decodeFrame(forged([[1, 2]])).type, 'RUN');
  const none = forged([[1, 1]]);
  new DataView(none.buffer).setUint32(HEADER_BYTES + 4, 0, true);
  expectCode(() => decodeFrame(none), ProtocolErrorCode.MALFORMED);
  expectCode(() => decodeFrame(forged([[5, 2], [6, 1]])), ProtocolErrorCode.MALFORMED); // overlap
  expectCode(() => decodeFrame(forged([[5, 1], [4, 1]])), ProtocolErrorCode.MALFORMED); // out of order
  expectCode(() => decodeFrame(forged([[5, 1], [7, 0]], 0, 2)), ProtocolErrorCode.MALFORMED); // empty extent
  expectCode(() => decodeFrame(forged([[0xffffffff, 2]])), ProtocolErrorCode.MALFORMED); // past page 2^32
  expectCode(() => decodeFrame(forged([[0, 3]], 8)), ProtocolErrorCode.MALFORMED); // trailing bytes
  expectCode(() => decodeFrame(forged([[0, 3], [4, 1]], 0, 3)), ProtocolErrorCode.TRUNCATED);
  expectCode(() => new FrameDecoder({ maxPagesPerBatch: 2 }).push(forged([[0, 3]])), ProtocolErrorCode.FRAME_TOO_LARGE);
  expectCode(() => new FrameDecoder({ maxPagesPerBatch: 4 }).push(forged([[0, 3], [4, 2]], 0, 4)), ProtocolErrorCode.LIMIT);
  // A header too short for one page is refused from the header alone.
  const tiny = forged([[0, 1]]).slice(0, HEADER_BYTES);
  new DataView(tiny.buffer).setUint32(0, 20, true);
  expectCode(() => new FrameDecoder().push(tiny), ProtocolErrorCode.TRUNCATED);
  // A sink that throws (a page the receiver does not have) poisons the decoder with its error.
  const d = new FrameDecoder();
  d.setRunSink(() => { throw new ProtocolError(ProtocolErrorCode.MALFORMED, 'page beyond memory'); });
  const e = expectCode(() => d.push(forged([[1, 1]])), ProtocolErrorCode.MALFORMED);
  assert.throws(() => d.push(new Uint8Array(1)), (x) => x === e);
  assert.throws(() => encodeRunHead(0, [{ first: 3, count: 1 }, { first: 3, count: 1 }], 4096), InvalidArgumentError);
  assert.throws(() => encodeRunHead(0, [], 4096), InvalidArgumentError);
  assert.throws(() => encodeRunHead(0, [{ first: 0, count: 0 }], 4096), InvalidArgumentError);
});

test('PAGES (version 2): every page\'s data starts 8-byte aligned; reserved and padding bytes must be zero', () => {
  const odd = new Uint8Array([1, 2, 3, 4, 5]);
  const bytes = encodePages({ seq: 1, demand: false, pages: [
    { index: 7, encoding: 2, data: odd },
    { index: 8, encoding: Encoding.RAW, data: page(8) },
    { index: 9, encoding: Encoding.ZERO, data: new Uint8Array(0) },
  ] });
  const d = new FrameDecoder({ encodings: [2] });
  const [f] = d.push(bytes);
  assert.ok(f.type === 'PAGES');
  assert.deepEqual(f.pages.map((p) => [p.index, p.encoding, p.data.length]), [[7, 2, 5], [8, Encoding.RAW, 4096], [9, Encoding.ZERO, 0]]);
  for (const p of f.pages) assert.equal((p.data.byteOffset - bytes.byteOffset) % 8, 0, `page ${p.index}'s data is aligned in the frame`);
  assert.deepEqual(f.pages[1].data, page(8));
  // Head of page 7 at payload offset 8: index (4), encoding (1), reserved (3), length (4), reserved (4).
  const at = HEADER_BYTES + 8;
  for (const off of [5, 13, 16 + 5]) { // reserved after encoding, reserved after length, padding after the 5 data bytes
    const bad = bytes.slice();
    bad[at + off] = 1;
    expectCode(() => new FrameDecoder({ encodings: [2] }).push(bad), ProtocolErrorCode.MALFORMED);
  }
});

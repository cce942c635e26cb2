import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ProtocolError } from '../../src/core/errors.js';
import { Encoding, ProtocolErrorCode, encodeFrame, type Frame } from '../../src/core/protocol/index.js';
import {
  DEFAULT_MEMORY_HIGH_WATER_MARK, FramedConnection, MemoryNetwork, TransportError, TransportErrorCode, memory, memoryPair,
} from '../../src/core/transport/index.js';
import { transportComplianceSuite } from './transport-suite.test.js';

transportComplianceSuite('memory', {
  setup: async () => memory({ network: new MemoryNetwork() }),
  backpressureBytes: 1 << 20,
  maxInFlightBytes: DEFAULT_MEMORY_HIGH_WATER_MARK,
});

// Same contract when every write is cut into 1…4099-byte pieces.
let x = 7;
transportComplianceSuite('memory (split writes)', {
  setup: async () => memory({ network: new MemoryNetwork(), highWaterMark: 4096, split: () => { x = (x * 48271) % 2147483647; return 1 + (x % 4099); } }),
  backpressureBytes: 256 << 10,
  maxInFlightBytes: 4096 + 4099,
  largeTransferBytes: 8 << 20,
});

test('a listen address can be chosen, and taken only once', async () => {
  const t = memory({ network: new MemoryNetwork() });
  const l = await t.listen({ address: 'memory:dest', onConnection: (c) => c.abort() });
  assert.equal(l.address, 'memory:dest');
  await assert.rejects(t.listen({ address: 'memory:dest', onConnection: (c) => c.abort() }), (e) => e instanceof TransportError && e.code === TransportErrorCode.LISTEN);
  await l.close();
});

function page(seed: number): Uint8Array {
  return Uint8Array.from({ length: 4096 }, (_, i) => (i ^ seed) & 0xff);
}

const frames: Frame[] = [
  { type: 'PING', seq: 1, time: 5 },
  { type: 'PAGES', seq: 1, demand: false, pages: [{ index: 3, encoding: Encoding.RAW, data: page(3) }, { index: 4, encoding: Encoding.ZERO, data: new Uint8Array(0) }] },
  { type: 'ROUND_END', round: 1, pages: 2, dirty: 0 },
  { type: 'CANCEL', reason: 'done' },
];

test('framed connection: frames survive writes cut into 1–7 byte pieces', async () => {
  let s = 1;
  const [a, b] = memoryPair({ split: () => (s = (s * 5 + 3) % 7) + 1 });
  const fa = new FramedConnection(a);
  const fb = new FramedConnection(b);
  const sending = (async () => { for (const f of frames) await fa.send(f); await fa.close(); })();
  const got: Frame[] = [];
  for await (const f of fb) got.push(f);
  await sending;
  assert.deepEqual(got.map((f) => f.type), frames.map((f) => f.type));
  const pages = got[1];
  assert.ok(pages.type === 'PAGES');
  assert.deepEqual([...pages.pages[0].data], [...page(3)]);
});

test('framed connection: breaking out of a loop loses no frames', async () => {
  const [a, b] = memoryPair();
  const fa = new FramedConnection(a);
  const fb = new FramedConnection(b);
  // All four frames arrive in one chunk, so they are decoded together.
  await a.write(Uint8Array.from(frames.flatMap((f) => [...encodeFrame(f)])));
  await fa.close();
  for await (const f of fb) { assert.equal(f.type, 'PING'); break; }
  const rest: string[] = [];
  for await (const f of fb) rest.push(f.type);
  assert.deepEqual(rest, ['PAGES', 'ROUND_END', 'CANCEL']);
});

test('framed connection: a refused frame throws ProtocolError and the peer gets an ERROR frame', async () => {
  const [a, b] = memoryPair();
  const fa = new FramedConnection(a);
  const fb = new FramedConnection(b);
  await fa.send({ type: 'PING', seq: 1, time: 1 });
  await a.write(new Uint8Array([0, 0, 0, 0, 0x7f, 0, 0, 0]));
  const seen: string[] = [];
  await assert.rejects((async () => { for await (const f of fb) seen.push(f.type); })(), (e) => e instanceof ProtocolError && e.code === ProtocolErrorCode.UNKNOWN_TYPE);
  assert.deepEqual(seen, ['PING']);
  const reply = await fa.next();
  assert.ok(reply?.type === 'ERROR');
  assert.equal(reply.code, ProtocolErrorCode.UNKNOWN_TYPE);
  assert.equal(await fa.next(), undefined, 'the refusing side closed its direction');
  // Poisoned: still refused.
  await assert.rejects(fb.next(), (e) => e instanceof ProtocolError && e.code === ProtocolErrorCode.UNKNOWN_TYPE);
});

test('framed connection: the stream ending inside a frame is ERR_PROTOCOL_UNEXPECTED_EOF', async () => {
  const [a, b] = memoryPair();
  const fb = new FramedConnection(b, { reportProtocolErrors: false });
  await a.write(encodeFrame({ type: 'PING', seq: 1, time: 1 }).subarray(0, 10));
  await a.close();
  await assert.rejects(fb.next(), (e) => e instanceof ProtocolError && e.code === ProtocolErrorCode.UNEXPECTED_EOF);
});

test('framed connection: transport failures surface as TransportError', async () => {
  const [a, b] = memoryPair();
  const fb = new FramedConnection(b);
  a.abort(new Error('source crashed'));
  await assert.rejects(fb.next(), (e) => e instanceof TransportError && e.code === TransportErrorCode.RESET && (e.cause as Error).message === 'source crashed');
  await assert.rejects(fb.send({ type: 'PING', seq: 2, time: 2 }), (e) => e instanceof TransportError && e.code === TransportErrorCode.RESET);
});

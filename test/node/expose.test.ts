import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { NET_MAX_PAYLOAD, NetRecord } from '../../src/core/abi.js';
import type { NetRecordData } from '../../src/core/net-ring.js';
import { ExposeEndpoint, parseHostPort, type ExposeOptions } from '../../src/node/net/expose.js';
import { InvalidArgumentError } from '../../src/core/errors.js';

/** Polls `cond` on the event loop; fails (never by timing out a measurement) after many turns. */
async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 20_000; i++) {
    if (cond()) return;
    await new Promise((r) => setTimeout(r, 1));
  }
  assert.fail(`gave up waiting for: ${what}`);
}

async function endpoint(opts: Partial<ExposeOptions> = {}) {
  const got: NetRecordData[] = [];
  const batches: number[] = [];
  const ep = await ExposeEndpoint.listen({ host: '127.0.0.1', port: 0, ...opts, onRecords: (rs) => { got.push(...rs); batches.push(rs.length); } });
  return { ep, got, batches };
}

interface Client { sock: Socket; received: () => Buffer; ended: () => boolean }
async function client(ep: ExposeEndpoint): Promise<Client> {
  const { host, port } = ep.address();
  const sock = connect({ host, port, allowHalfOpen: true });
  const chunks: Buffer[] = [];
  let ended = false;
  sock.on('data', (b: Buffer) => chunks.push(b));
  sock.on('end', () => { ended = true; });
  sock.on('error', () => {});
  await new Promise<void>((resolve, reject) => { sock.once('connect', resolve); sock.once('error', reject); });
  return { sock, received: () => Buffer.concat(chunks), ended: () => ended };
}

const bytesOf = (n: number, seed: number) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 31 + seed * 7) & 0xff));
const opens = (rs: NetRecordData[]) => rs.filter((r) => r.type === NetRecord.OPEN).map((r) => r.conn);
function dataOf(rs: NetRecordData[], conn: number): Buffer {
  return Buffer.concat(rs.filter((r) => r.conn === conn && r.type === NetRecord.DATA).map((r) => Buffer.from(r.payload)));
}
/** Records of one connection must be OPEN, DATA…, CLOSE? in that order, each at most once. */
function assertWellFormed(rs: NetRecordData[]): void {
  const state = new Map<number, 'open' | 'closed'>();
  for (const r of rs) {
    const s = state.get(r.conn);
    if (r.type === NetRecord.OPEN) { assert.equal(s, undefined, `conn ${r.conn} opened twice`); state.set(r.conn, 'open'); }
    else { assert.equal(s, 'open', `conn ${r.conn}: type ${r.type} outside open…close`); if (r.type === NetRecord.CLOSE) state.set(r.conn, 'closed'); }
    assert.ok(r.payload.length <= NET_MAX_PAYLOAD);
    if (r.type !== NetRecord.DATA) assert.equal(r.payload.length, 0);
  }
}

test('parseHostPort', () => {
  assert.deepEqual(parseHostPort('127.0.0.1:0'), { host: '127.0.0.1', port: 0 });
  assert.deepEqual(parseHostPort('[::1]:8080'), { host: '::1', port: 8080 });
  assert.deepEqual(parseHostPort(':9000'), { host: '127.0.0.1', port: 9000 });
  assert.deepEqual(parseHostPort('9000'), { host: '127.0.0.1', port: 9000 });
  assert.throws(() => parseHostPort('localhost:99999'), { code: 'ERR_INVALID_ARGUMENT' });
  assert.throws(() => parseHostPort('nonsense'), { code: 'ERR_INVALID_ARGUMENT' });
});

test('connect, data, close become OPEN, DATA (≤ 64 KiB), CLOSE; guest DATA reaches the client; guest CLOSE ends it', async () => {
  const { ep, got } = await endpoint();
  try {
    assert.equal(ep.address().host, '127.0.0.1');
    assert.ok(ep.address().port > 0);
    const c = await client(ep);
    await until(() => got.length >= 1, 'OPEN');
    assert.equal(got[0].type, NetRecord.OPEN);
    const id = got[0].conn;
    const big = bytesOf(200_000, 1);
    c.sock.write(big);
    await until(() => dataOf(got, id).length === big.length, 'all client bytes');
    assert.deepEqual(dataOf(got, id), big);
    assert.ok(got.filter((r) => r.type === NetRecord.DATA).every((r) => r.payload.length <= NET_MAX_PAYLOAD && r.payload.length > 0));

    c.sock.end(); // half-close: CLOSE for the guest, but the client can still be answered
    await until(() => got.some((r) => r.type === NetRecord.CLOSE), 'CLOSE');
    const reply = bytesOf(150_000, 2);
    ep.deliver([{ conn: id, type: NetRecord.DATA, payload: reply }, { conn: id, type: NetRecord.CLOSE, payload: new Uint8Array(0) }]);
    await until(() => c.ended(), 'client sees the end');
    assert.deepEqual(c.received(), reply, 'everything written before CLOSE arrives');
    await until(() => ep.connections() === 0, 'connection gone');
    assertWellFormed(got);
    assert.equal(got.filter((r) => r.type === NetRecord.CLOSE).length, 1, 'CLOSE exactly once');
    ep.deliver([{ conn: id, type: NetRecord.DATA, payload: Buffer.from('late') }]); // unknown now: ignored
  } finally {
    await ep.close();
  }
});

test('after the guest closes, nothing more is produced for that connection', async () => {
  const { ep, got } = await endpoint();
  try {
    const c = await client(ep);
    await until(() => got.length === 1, 'OPEN');
    const id = got[0].conn;
    ep.deliver([{ conn: id, type: NetRecord.DATA, payload: Buffer.from('bye') }, { conn: id, type: NetRecord.CLOSE, payload: new Uint8Array(0) }]);
    await until(() => c.ended(), 'end');
    assert.equal(c.received().toString(), 'bye');
    c.sock.end('ignored');
    await until(() => ep.connections() === 0, 'closed');
    assert.deepEqual(got.map((r) => r.type), [NetRecord.OPEN]);
  } finally {
    await ep.close();
  }
});

test('hold() buffers input; release() delivers it exactly once, in order', async () => {
  const { ep, got } = await endpoint();
  try {
    const a = await client(ep);
    await until(() => got.length === 1, 'OPEN a');
    const idA = got[0].conn;
    a.sock.write('before;');
    await until(() => dataOf(got, idA).toString() === 'before;', 'before');
    ep.hold();
    ep.hold(); // nested
    const n0 = got.length;
    a.sock.write('during-1;');
    const b = await client(ep); // connects while held
    b.sock.write('b-data');
    b.sock.end();
    a.sock.write('during-2;');
    await until(() => ep.bufferedBytes() === 'during-1;during-2;b-data'.length, 'buffered while held');
    assert.equal(got.length, n0, 'nothing handed over while held');
    ep.release();
    assert.equal(got.length, n0, 'still held once');
    ep.release();
    assert.equal(ep.bufferedBytes(), 0);
    const after = got.slice(n0);
    const idB = opens(after)[0];
    assert.ok(idB !== undefined && idB !== idA);
    assert.equal(dataOf(got, idA).toString(), 'before;during-1;during-2;', 'in order, exactly once');
    assert.equal(dataOf(got, idB).toString(), 'b-data');
    // b's FIN may reach the endpoint after its bytes (and so after release): wait for its CLOSE,
    // which must still come last for b.
    await until(() => got.some((r) => r.conn === idB && r.type === NetRecord.CLOSE), 'CLOSE of b');
    assert.equal(got.filter((r) => r.conn === idB).map((r) => r.type).at(-1), NetRecord.CLOSE);
    assertWellFormed(got);
    a.sock.write('after;');
    await until(() => dataOf(got, idA).toString().endsWith('after;'), 'live again');
    assert.equal(dataOf(got, idA).toString(), 'before;during-1;during-2;after;');
    ep.release(); // extra release is harmless
  } finally {
    await ep.close();
  }
});

test('hold() beyond the buffer limit stops reading (backpressure) and still loses nothing', async () => {
  const limit = 64 * 1024;
  const { ep, got } = await endpoint({ bufferLimit: limit });
  try {
    const c = await client(ep);
    await until(() => got.length === 1, 'OPEN');
    const id = got[0].conn;
    ep.hold();
    const payload = bytesOf(4 << 20, 3);
    let writeDone = false;
    c.sock.write(payload, () => { writeDone = true; });
    await until(() => ep.bufferedBytes() >= limit, 'buffer fills to the limit');
    // Give the sockets plenty of turns: the endpoint must not keep reading.
    for (let i = 0; i < 50; i++) await new Promise((r) => setImmediate(r));
    const buffered = ep.bufferedBytes();
    assert.ok(buffered < limit + 256 * 1024, `buffer bounded (${buffered})`);
    assert.ok(buffered < payload.length);
    assert.equal(got.length, 1, 'nothing handed over while held');
    assert.equal(writeDone, false, 'the client is pushed back on');
    ep.release();
    await until(() => dataOf(got, id).length === payload.length, 'everything after release');
    assert.deepEqual(dataOf(got, id), payload);
  } finally {
    await ep.close();
  }
});

test('flow window: at most `window` bytes outstanding until credited', async () => {
  const { ep, got } = await endpoint({ window: 10_000 });
  try {
    const c = await client(ep);
    await until(() => got.length === 1, 'OPEN');
    const id = got[0].conn;
    const payload = bytesOf(100_000, 4);
    c.sock.write(payload);
    await until(() => ep.bufferedBytes() > 0 && dataOf(got, id).length + ep.bufferedBytes() === payload.length, 'all bytes arrived here');
    let seen = dataOf(got, id).length;
    assert.ok(seen >= 10_000 && seen < 10_000 + NET_MAX_PAYLOAD + 1, `window respected (${seen})`);
    assert.equal(ep.outstanding(), seen);
    while (seen < payload.length) {
      ep.credit(ep.outstanding()); // the VM took everything handed over so far
      const now = dataOf(got, id).length;
      assert.ok(now > seen, 'credit releases more');
      seen = now;
    }
    assert.deepEqual(dataOf(got, id), payload);
  } finally {
    await ep.close();
  }
});

test('many interleaved connections keep their streams apart', async () => {
  const { ep, got } = await endpoint();
  try {
    const N = 24;
    const clients = await Promise.all(Array.from({ length: N }, () => client(ep)));
    await until(() => opens(got).length === N, 'all OPENs');
    const ids = opens(got);
    assert.equal(new Set(ids).size, N, 'distinct ids');
    // Each client sends its own message in several pieces, all interleaved.
    const msgs = clients.map((_, i) => bytesOf(30_000 + i * 1000, i));
    for (let piece = 0; piece < 3; piece++) {
      for (const [i, c] of clients.entries()) {
        const m = msgs[i];
        const from = Math.floor((m.length * piece) / 3);
        const to = Math.floor((m.length * (piece + 1)) / 3);
        c.sock.write(m.subarray(from, to));
      }
      if (piece === 1) ep.hold();
    }
    for (const c of clients) c.sock.end();
    await until(() => ep.bufferedBytes() > 0, 'some input held');
    ep.release();
    await until(() => got.filter((r) => r.type === NetRecord.CLOSE).length === N, 'all CLOSEs');
    assertWellFormed(got);
    // Map conn id → client by the first bytes each sent, then check whole streams.
    const byId = new Map<number, number>();
    for (const id of ids) {
      const d = dataOf(got, id);
      const i = msgs.findIndex((m) => d.equals(m));
      assert.ok(i >= 0, `conn ${id} carries exactly one client's bytes`);
      byId.set(id, i);
    }
    assert.equal(new Set(byId.values()).size, N);
    // The guest answers each connection; every client gets only its own answer.
    for (const [id, i] of byId) ep.deliver([{ conn: id, type: NetRecord.DATA, payload: Buffer.from(`answer-${i}`) }, { conn: id, type: NetRecord.CLOSE, payload: new Uint8Array(0) }]);
    await until(() => clients.every((c) => c.ended()), 'all answered');
    for (const [i, c] of clients.entries()) assert.equal(c.received().toString(), `answer-${i}`);
  } finally {
    await ep.close();
  }
});

test('reset() drops connections: client closed, held input discarded, one CLOSE for the guest', async () => {
  const { ep, got } = await endpoint();
  try {
    const a = await client(ep);
    const b = await client(ep);
    await until(() => opens(got).length === 2, 'OPENs');
    const [idA, idB] = opens(got);
    ep.hold();
    a.sock.write('lost');
    b.sock.write('kept');
    await until(() => ep.bufferedBytes() === 8, 'held');
    ep.reset([idA]);
    assert.equal(ep.bufferedBytes(), 4, "a's held input is dropped");
    const c = await client(ep); // opens while held, then reset before the guest heard of it
    await until(() => ep.connections() === 2 && ep.bufferedBytes() === 4, 'c accepted');
    const idC = Math.max(idA, idB) + 1;
    ep.reset([idC, 12345]);
    ep.release();
    await until(() => a.ended() || a.sock.destroyed, 'a dropped');
    assert.deepEqual(got.filter((r) => r.conn === idA).map((r) => r.type), [NetRecord.OPEN, NetRecord.CLOSE]);
    assert.equal(got.filter((r) => r.conn === idC).length, 0, 'never-announced connection stays unannounced');
    assert.equal(dataOf(got, idB).toString(), 'kept');
    await until(() => c.ended() || c.sock.destroyed, 'c dropped');
    assertWellFormed(got);
    ep.deliver([{ conn: idA, type: NetRecord.DATA, payload: Buffer.from('x') }]); // gone: ignored
  } finally {
    await ep.close();
  }
});

test('listening on a taken port fails with a named error', async () => {
  const { ep } = await endpoint();
  try {
    await assert.rejects(ExposeEndpoint.listen({ host: '127.0.0.1', port: ep.address().port, onRecords: () => {} }), { code: 'ERR_EXPOSE_LISTEN' });
  } finally {
    await ep.close();
  }
});

test('close() ends every connection and the listener', async () => {
  const { ep, got } = await endpoint();
  const { port } = ep.address();
  const c = await client(ep);
  await until(() => got.length === 1, 'OPEN');
  await ep.close();
  await until(() => c.ended(), 'client sees its connection end');
  c.sock.destroy();
  assert.equal(ep.connections(), 0);
  await assert.rejects(new Promise((resolve, reject) => {
    const s = connect({ host: '127.0.0.1', port });
    s.once('connect', () => { s.destroy(); resolve(undefined); });
    s.once('error', reject);
  }), { code: 'ECONNREFUSED' });
  await ep.close(); // idempotent
});

test('firstConnId: a restored VM\'s endpoint hands out ids from there on; out-of-range values are refused', async () => {
  const { ep, got } = await endpoint({ firstConnId: 41 });
  try {
    assert.equal(ep.nextConnId, 41);
    const a = await client(ep);
    const b = await client(ep);
    await until(() => opens(got).length === 2, 'two OPEN records');
    assert.deepEqual(opens(got), [41, 42]);
    assert.equal(ep.nextConnId, 43);
    a.sock.destroy();
    b.sock.destroy();
  } finally {
    await ep.close();
  }
  for (const bad of [0, -1, 1.5, 2 ** 32]) {
    await assert.rejects(endpoint({ firstConnId: bad }), InvalidArgumentError);
  }
});

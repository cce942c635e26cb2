import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NET_MAX_PAYLOAD, NetRecord } from '../../src/core/abi.js';
import type { NetRecordData } from '../../src/core/net-ring.js';
import type { Connection, Transport } from '../../src/core/transport/transport.js';
import { tcp } from '../../src/node/transport/tcp.js';
import {
  Relay, RelayDecoder, RelayError, encodePreface, encodeRecords, encodeRelayFrame, peekStart, rehearseRelay, startsLikeRelay, withPrefix,
  type RelayFrame, type RelayHello, type RelayHandlers,
} from '../../src/node/net/relay.js';

const hello: RelayHello = { vm: 'kv', endpoint: '127.0.0.1:9', home: 'a', homeMigration: '127.0.0.1:10', guest: 'kv' };
const rec = (conn: number, type: number, text = ''): NetRecordData => ({ conn, type, payload: new TextEncoder().encode(text) });

/** A TCP listener that answers relays; resolves each accepted one with its HELLO. */
async function relayServer(): Promise<{ address: string; accepted: Promise<{ relay: Relay; hello: RelayHello }>; rawConns: Connection[]; close(): Promise<void> }> {
  const transport = tcp();
  const rawConns: Connection[] = [];
  let resolve!: (v: { relay: Relay; hello: RelayHello }) => void;
  let reject!: (e: Error) => void;
  const accepted = new Promise<{ relay: Relay; hello: RelayHello }>((res, rej) => ((resolve = res), (reject = rej)));
  accepted.catch(() => undefined);
  const listener = await transport.listen({
    onConnection: (conn) => {
      rawConns.push(conn);
      void (async () => {
        const start = await peekStart(conn);
        assert.ok(startsLikeRelay(start.head));
        Relay.accept(conn, start.prefix, start.chunks).then(resolve, reject);
      })();
    },
  });
  return { address: listener.address, accepted, rawConns, close: () => listener.close() };
}

/** Handlers that record everything they see. */
function recorder(): { h: RelayHandlers; seen: string[]; records: NetRecordData[]; ended: Promise<Error | undefined> } {
  const seen: string[] = [];
  const records: NetRecordData[] = [];
  let end!: (e: Error | undefined) => void;
  const ended = new Promise<Error | undefined>((r) => (end = r));
  return {
    seen, records, ended,
    h: {
      records: (r) => { records.push(...r); seen.push(`records:${r.length}`); },
      returned: (r) => { records.push(...r); seen.push(`returned:${r.length}`); },
      credit: (n) => seen.push(`credit:${n}`),
      running: () => seen.push('running'),
      fence: () => seen.push('fence'),
      fenceAck: () => seen.push('fence-ack'),
      end: (e) => end(e),
    },
  };
}

async function until(pred: () => boolean): Promise<void> {
  while (!pred()) await new Promise((r) => setTimeout(r, 2));
}

test('relay over TCP: HELLO, records both ways in order, credit, control frames, close propagates', async () => {
  const srv = await relayServer();
  const home = await Relay.dial(tcp(), srv.address, hello);
  const homeSide = recorder();
  home.start(homeSide.h);
  const { relay: host, hello: got } = await srv.accepted;
  assert.deepEqual(got, hello);
  const hostSide = recorder();
  host.start(hostSide.h);

  const big = 'x'.repeat(NET_MAX_PAYLOAD);
  home.sendRecords([rec(1, NetRecord.OPEN), rec(1, NetRecord.DATA, 'GET a\n'), rec(1, NetRecord.DATA, big), rec(2, NetRecord.CLOSE)]);
  await until(() => hostSide.records.length === 4);
  assert.deepEqual(hostSide.records.map((r) => [r.conn, r.type, r.payload.length]), [[1, 1, 0], [1, 2, 6], [1, 2, NET_MAX_PAYLOAD], [2, 3, 0]]);

  host.send('RUNNING');
  host.sendRecords([rec(1, NetRecord.DATA, 'VALUE b\n')]);
  host.sendCredit(6);
  home.send('FENCE');
  await until(() => hostSide.seen.includes('fence'));
  host.sendReturned([rec(1, NetRecord.DATA, 'late')]);
  host.send('FENCE_ACK');
  await until(() => homeSide.seen.includes('fence-ack'));
  assert.deepEqual(homeSide.seen, ['running', 'records:1', 'credit:6', 'returned:1', 'fence-ack']);
  assert.equal(new TextDecoder().decode(homeSide.records[0].payload), 'VALUE b\n');
  assert.equal(new TextDecoder().decode(homeSide.records[1].payload), 'late');

  await host.close();
  assert.equal(await homeSide.ended, undefined, 'a clean close ends the peer cleanly');
  await home.close();
  assert.equal(await hostSide.ended, undefined);
  await srv.close();
});

test('relay: a bad frame is refused with a named error and the connection is torn down', async () => {
  const cases: [string, Uint8Array, string][] = [
    ['unknown type', new Uint8Array([0, 0, 0, 0, 0x42, 0, 0, 0]), 'ERR_RELAY_UNKNOWN_TYPE'],
    ['oversized record', (() => { const b = new Uint8Array(8); new DataView(b.buffer).setUint32(0, NET_MAX_PAYLOAD + 6, true); b[4] = 2; return b; })(), 'ERR_RELAY_FRAME_TOO_LARGE'],
    ['record type 9', (() => { const b = encodeRecords('RECORD', [rec(1, NetRecord.DATA, 'x')]); b[12] = 9; return b; })(), 'ERR_RELAY_MALFORMED'],
    ['second HELLO', encodeRelayFrame({ type: 'HELLO', hello }), 'ERR_RELAY_SEQUENCE'],
  ];
  for (const [what, bytes, code] of cases) {
    const srv = await relayServer();
    const raw = await tcp().dial(srv.address);
    const pre = encodePreface();
    const h = encodeRelayFrame({ type: 'HELLO', hello });
    await raw.write(Uint8Array.from([...pre, ...h]));
    const { relay } = await srv.accepted;
    const side = recorder();
    relay.start(side.h);
    await raw.write(bytes);
    const err = await side.ended;
    assert.ok(err instanceof RelayError, `${what}: ${err}`);
    assert.equal(err.code, code, what);
    // The refusing side aborted: our side sees the connection reset (not a clean end).
    assert.notEqual(await raw.closed, undefined, `${what}: connection torn down`);
    await srv.close();
  }
});

test('relay: a connection that does not open with the preface and HELLO is refused', async () => {
  const srv = await relayServer();
  const raw = await tcp().dial(srv.address);
  await raw.write(Uint8Array.from([...encodePreface(), ...encodeRecords('RECORD', [rec(1, NetRecord.OPEN)])]));
  await assert.rejects(srv.accepted, (e: RelayError) => e.code === 'ERR_RELAY_SEQUENCE');
  raw.abort();
  await srv.close();
});

test('relay decoder: byte at a time, bounds before buffering, poisoned after an error', () => {
  const frames: RelayFrame[] = [];
  const d = new RelayDecoder({ preface: true });
  const stream = Uint8Array.from([
    ...encodePreface(), ...encodeRelayFrame({ type: 'HELLO', hello }),
    ...encodeRecords('RECORD', [rec(7, NetRecord.DATA, 'abc'), rec(7, NetRecord.CLOSE)]),
    ...encodeRelayFrame({ type: 'CREDIT', bytes: 3 }), ...encodeRelayFrame({ type: 'FENCE' }),
  ]);
  for (const b of stream) frames.push(...d.push(Uint8Array.of(b)));
  d.end();
  assert.deepEqual(frames.map((f) => f.type), ['HELLO', 'RECORD', 'RECORD', 'CREDIT', 'FENCE']);
  assert.equal(d.bufferedBytes, 0);

  const bad = new RelayDecoder({ preface: true });
  assert.throws(() => bad.push(new TextEncoder().encode('GET /')), (e: RelayError) => e.code === 'ERR_RELAY_BAD_MAGIC');
  assert.throws(() => bad.push(encodePreface()), (e: RelayError) => e.code === 'ERR_RELAY_BAD_MAGIC', 'poisoned');

  const v2 = new RelayDecoder({ preface: true });
  assert.throws(() => v2.push(Uint8Array.of(0x46, 0x52, 0x4c, 0x59, 2)), (e: RelayError) => e.code === 'ERR_RELAY_BAD_VERSION');

  // A header claiming a huge CREDIT is refused at once, before its payload is awaited.
  const big = new RelayDecoder({ preface: false });
  const hdr = new Uint8Array(8);
  new DataView(hdr.buffer).setUint32(0, 1 << 30, true);
  hdr[4] = 4;
  assert.throws(() => big.push(hdr), (e: RelayError) => e.code === 'ERR_RELAY_FRAME_TOO_LARGE');

  const cut = new RelayDecoder({ preface: false });
  cut.push(encodeRelayFrame({ type: 'CREDIT', bytes: 1 }).subarray(0, 10));
  assert.throws(() => cut.end(), (e: RelayError) => e.code === 'ERR_RELAY_UNEXPECTED_EOF');

  const json = new RelayDecoder({ preface: true });
  const notHello = new TextEncoder().encode('{"vm":"../etc"}');
  const f = new Uint8Array(8 + notHello.length);
  new DataView(f.buffer).setUint32(0, notHello.length, true);
  f[4] = 1;
  f.set(notHello, 8);
  assert.throws(() => json.push(Uint8Array.from([...encodePreface(), ...f])), (e: RelayError) => e.code === 'ERR_RELAY_MALFORMED');
});

test('withPrefix replays the bytes read to tell a relay from a migration', async () => {
  const transport = tcp();
  let got!: (s: string) => void;
  const text = new Promise<string>((r) => (got = r));
  const l = await transport.listen({
    onConnection: (conn) => void (async () => {
      const start = await peekStart(conn);
      assert.equal(startsLikeRelay(start.head), false);
      let s = '';
      for await (const c of withPrefix(conn, start.prefix, start.chunks)) s += new TextDecoder().decode(c);
      got(s);
      await conn.close();
    })(),
  });
  const c = await transport.dial(l.address);
  await c.write(new TextEncoder().encode('HE'));
  await new Promise((r) => setTimeout(r, 5));
  await c.write(new TextEncoder().encode('LLO world'));
  await c.close();
  assert.equal(await text, 'HELLO world');
  await l.close();
});

test('rehearseRelay runs a relay from this process to itself: records both ways, credit, RUNNING, FENCE and its ACK', async () => {
  // Three exchanges: OPEN + DATA to the VM's host each; DATA, CREDIT and RUNNING back; then RETURN and FENCE_ACK.
  assert.deepEqual(await rehearseRelay(tcp()), { toHost: 6, toHome: 11 });
  assert.deepEqual(await rehearseRelay(tcp()), { toHost: 6, toHome: 11 }, 'again: nothing of the first run is in the way');
});

test('rehearseRelay fails with a named error, in its time limit, when frames go missing', async () => {
  // A transport whose dialled connections lose everything they write: no preface ever arrives.
  const real = tcp();
  const lossy: Transport = {
    ...real,
    dial: async (address, opts) => {
      const c = await real.dial(address, opts);
      return { ...withPrefix(c, [], c[Symbol.asyncIterator]()), write: async () => undefined };
    },
  };
  const t0 = performance.now();
  await assert.rejects(rehearseRelay(lossy, 300), (e: Error) => e instanceof RelayError && e.code === 'ERR_RELAY_TIMEOUT' && /did not finish within 300 ms/.test(e.message));
  assert.ok(performance.now() - t0 < 3000, 'it gave up at its limit');
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { InvalidArgumentError } from '../../src/core/errors.js';
import { FramedConnection, TransportError, TransportErrorCode } from '../../src/core/transport/index.js';
import { parseTcpAddress, tcp, tcpCongestionOf } from '../../src/node/transport/tcp.js';
import { availableCongestionControls, systemCongestionControl } from '../../src/node/transport/congestion.js';
import type { Connection } from '../../src/core/transport/index.js';
import { PROTOCOL_VERSION } from '../../src/core/protocol/frames.js';
import { transportComplianceSuite } from '../core/transport-suite.test.js';

transportComplianceSuite('tcp', {
  setup: async () => tcp(),
  // Well beyond loopback socket buffers that have not been auto-tuned (nobody reads) plus our 1 MiB queues.
  backpressureBytes: 32 << 20,
  resetMayLookLikeEnd: true,
});

transportComplianceSuite('tcp (small buffers)', {
  setup: async () => tcp({ readHighWaterMark: 4096, writeHighWaterMark: 4096 }),
  backpressureBytes: 16 << 20,
  resetMayLookLikeEnd: true,
  largeTransferBytes: 8 << 20,
});

test('TCP addresses parse and the listener binds 127.0.0.1 on an ephemeral port', async () => {
  assert.deepEqual(parseTcpAddress('127.0.0.1:80'), { host: '127.0.0.1', port: 80 });
  assert.deepEqual(parseTcpAddress('[::1]:9'), { host: '::1', port: 9 });
  for (const bad of ['127.0.0.1', ':80', 'host:99999', '[::1]', 'a:b']) assert.throws(() => parseTcpAddress(bad), InvalidArgumentError);
  const l = await tcp().listen({ onConnection: (c) => c.abort() });
  assert.match(l.address, /^127\.0\.0\.1:\d+$/);
  assert.notEqual(parseTcpAddress(l.address).port, 0);
  await assert.rejects(tcp().listen({ address: l.address, onConnection: (c) => c.abort() }), (e) => e instanceof TransportError && e.code === TransportErrorCode.LISTEN);
  await l.close();
});

test('frames over TCP: a HELLO / HELLO_ACK exchange', async () => {
  const t = tcp();
  let server: Promise<void> | undefined;
  const l = await t.listen({
    onConnection: (c) => {
      const f = new FramedConnection(c);
      server = (async () => {
        const hello = await f.next();
        assert.ok(hello?.type === 'HELLO');
        await f.send({ type: 'HELLO_ACK', accepted: true, version: PROTOCOL_VERSION, mode: hello.offer.modes[0], streams: 1, codecs: [] });
        await f.close();
        assert.equal(await f.next(), undefined);
      })();
    },
  });
  const f = new FramedConnection(await t.dial(l.address));
  await f.send({
    type: 'HELLO', minVersion: PROTOCOL_VERSION, maxVersion: PROTOCOL_VERSION, vmName: 'vm', memoryBytes: 1 << 20, guestBytes: 1 << 16, pageSize: 4096,
    moduleSha256: '00'.repeat(32), moduleBytes: 0, config: '', offer: { modes: ['postcopy'], maxStreams: 1, codecs: [] },
  });
  const ack = await f.next();
  assert.ok(ack?.type === 'HELLO_ACK' && ack.accepted && ack.mode === 'postcopy');
  await f.close();
  assert.equal(await f.next(), undefined);
  assert.equal(await f.closed, undefined);
  assert.ok(server);
  await server;
  await l.close();
});

/** A pattern that differs at every offset within 1 GiB (so a misplaced byte shows). */
function patterned(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = ((i >>> 8) * 7 + i * 13 + seed) & 0xff;
  return b;
}

for (const side of ['accepted', 'dialled'] as const) {
  test(`readInto over TCP (${side} side): bytes land in the reader's targets, in order; pause and resume lose nothing; the end is reported`, async () => {
    const t = tcp();
    const total = 6 << 20;
    const sent = patterned(total, 3);
    const into = new Uint8Array(new SharedArrayBuffer(total));
    let got = 0;
    let inPlace = 0;
    let copied = 0;
    let ended: { err: unknown } | null = null;
    let done!: () => void;
    const finished = new Promise<void>((r) => (done = r));
    const read = (c: import('../../src/core/transport/transport.js').Connection) => {
      assert.ok(c.readInto, 'TCP connections take a reader');
      let paused = false;
      const control = c.readInto({
        // Every other MiB is read through the connection's own buffer.
        target: () => ((got >> 20) % 2 === 0 ? into.subarray(got, Math.min(total, ((got >> 20) + 1) << 20)) : null),
        data: (bytes) => {
          if (bytes.buffer === into.buffer) {
            assert.equal(bytes.byteOffset, got, 'bytes landed where the target began');
            inPlace += bytes.length;
          } else {
            into.set(bytes, got);
            copied += bytes.length;
          }
          got += bytes.length;
          // Pause for a moment at every 2 MiB boundary crossed.
          if (!paused && got % (2 << 20) < bytes.length && got < total) {
            paused = true;
            control.pause();
            setTimeout(() => { paused = false; control.resume(); }, 20);
          }
        },
        end: (err) => {
          ended = { err };
          done();
        },
      });
    };
    let server: import('../../src/core/transport/transport.js').Connection | undefined;
    const accepted = new Promise<void>((r) => {
      void t.listen({ onConnection: (c) => { server = c; r(); } }).then(async (l) => {
        const client = await t.dial(l.address);
        await accepted;
        const [reader, writer] = side === 'accepted' ? [server!, client] : [client, server!];
        read(reader);
        for (let at = 0; at < total; at += 256 << 10) await writer.write(sent.subarray(at, at + (256 << 10)));
        await writer.close();
        await finished;
        await reader.close();
        await l.close();
      });
    });
    await accepted;
    await finished;
    assert.deepEqual(ended, { err: undefined }, 'a clean end');
    assert.equal(got, total);
    assert.ok(inPlace >= 2 << 20, `in place ${inPlace}`);
    assert.ok(copied > 0, 'reads without a target came through the connection buffer');
    assert.ok(Buffer.from(into).equals(Buffer.from(sent)), 'every byte in its place');
  });
}

test('readInto over TCP: a peer that aborts ends the reader with a named error (or, per the OS caveat, an end)', async () => {
  const t = tcp();
  const ended = new Promise<unknown>((resolve) => {
    void t.listen({
      onConnection: (c) => {
        c.readInto!({ target: () => null, data: () => undefined, end: (err) => resolve(err ?? 'end') });
      },
    }).then(async (l) => {
      const c = await t.dial(l.address);
      await c.write(new Uint8Array(100));
      c.abort(new Error('gone'));
      await l.close();
    });
  });
  const err = await ended;
  assert.ok(err === 'end' || (err instanceof TransportError && err.code === TransportErrorCode.RESET), String(err));
});

test('RUN frames over TCP land straight in guest memory through the run sink; declined extents stay in the frame', async () => {
  const { encodeRunHead, FrameDecoder: _fd } = await import('../../src/core/protocol/index.js');
  void _fd;
  const t = tcp();
  const P = 4096;
  const guest = new Uint8Array(new SharedArrayBuffer(1024 * P));
  const src = patterned(1024 * P, 9);
  const frames: import('../../src/core/protocol/frames.js').Frame[] = [];
  let sinkAsked = 0;
  const got = new Promise<void>((resolve, reject) => {
    void t.listen({
      onConnection: (c) => {
        const f = new FramedConnection(c);
        f.decoder.setRunSink((first, count) => {
          sinkAsked++;
          return first >= 1000 ? null : guest.subarray(first * P, (first + count) * P); // the last run stays in its frame
        });
        void (async () => {
          for (;;) {
            const fr = await f.next();
            if (!fr) break;
            frames.push(fr);
          }
          await f.close();
          resolve();
        })().catch(reject);
      },
    }).then(async (l) => {
      const c = new FramedConnection(await t.dial(l.address));
      // 1000 pages as four runs of 250 pages in two extents each, a PING between them, then pages 1000… in a run of their own.
      for (let r = 0; r < 4; r++) {
        const a = { first: r * 250, count: 200 };
        const b = { first: r * 250 + 200, count: 50 };
        await c.sendEncoded(encodeRunHead(r, [a, b], P));
        await c.sendEncoded(src.subarray(a.first * P, (a.first + a.count) * P));
        await c.sendEncoded(src.subarray(b.first * P, (b.first + b.count) * P));
        await c.send({ type: 'PING', seq: r, time: 1 });
      }
      await c.sendEncoded(encodeRunHead(9, [{ first: 1000, count: 24 }], P));
      await c.sendEncoded(src.subarray(1000 * P));
      await c.close();
      await l.close();
    });
  });
  await got;
  const runs = frames.filter((f) => f.type === 'RUN');
  assert.equal(runs.length, 5);
  assert.equal(frames.filter((f) => f.type === 'PING').length, 4);
  let inPlace = 0;
  for (const r of runs) {
    assert.ok(r.type === 'RUN');
    for (const e of r.extents) {
      assert.ok(Buffer.from(e.data).equals(Buffer.from(src.subarray(e.first * P, (e.first + e.count) * P))), `extent at ${e.first}`);
      if (e.inPlace) {
        inPlace += e.count;
        assert.equal(e.data.buffer, guest.buffer);
      }
    }
  }
  const last = runs[4];
  assert.ok(last.type === 'RUN' && last.extents[0].inPlace === undefined, 'the declined run kept its pages');
  assert.ok(sinkAsked >= 4, `sink asked ${sinkAsked} times`);
  // A PING before a run does not keep it from landing in place (it carries no pages).
  assert.equal(inPlace, 1000, `${inPlace} of 1000 pages landed in place`);
  for (const r of runs) {
    if (r.type !== 'RUN') continue;
    for (const e of r.extents) if (e.inPlace) assert.ok(Buffer.from(guest.subarray(e.first * P, (e.first + e.count) * P)).equals(Buffer.from(src.subarray(e.first * P, (e.first + e.count) * P))));
  }
});

test('congestion: both ends of a connection run the algorithm the transport was made with; bad names are refused by name', async (t) => {
  const system = systemCongestionControl();
  // reno is always built in; another algorithm than the system's shows the setting took.
  const other = (availableCongestionControls() ?? []).find((a) => a !== system);
  if (process.platform !== 'linux' || !system || !other) return t.skip('needs Linux with two congestion control algorithms');
  for (const [init, want] of [[{}, system], [{ congestion: other }, other]] as const) {
    const transport = tcp(init);
    const queue: Connection[] = [];
    let waiting: ((c: Connection) => void) | null = null;
    const listener = await transport.listen({
      onConnection: (c) => {
        const w = waiting;
        waiting = null;
        if (w) w(c);
        else queue.push(c);
      },
    });
    const accepted = () => (queue.length > 0 ? Promise.resolve(queue.shift()!) : new Promise<Connection>((r) => (waiting = r)));
    const dialed = await transport.dial(listener.address);
    const server = await accepted();
    assert.equal(tcpCongestionOf(dialed), want, 'dialed');
    assert.equal(tcpCongestionOf(server), want, 'accepted');
    // Bytes still flow.
    await dialed.write(new Uint8Array([1, 2, 3]));
    const it = server[Symbol.asyncIterator]();
    assert.deepEqual([...(await it.next()).value as Uint8Array], [1, 2, 3]);
    dialed.abort();
    server.abort();
    // By name too: the name is looked up first (the family decides the socket made), its addresses tried in turn.
    const byName = await transport.dial(`localhost:${parseTcpAddress(listener.address).port}`);
    assert.equal(tcpCongestionOf(byName), want, 'dialled by name');
    byName.abort();
    (await accepted()).abort();
    await listener.close();
    // Nothing listens there now: the dial fails by name, whichever way its socket was made.
    await assert.rejects(transport.dial(listener.address), (e: unknown) => e instanceof TransportError && e.code === TransportErrorCode.REFUSED);
  }
  for (const [bad, why] of [['no-such-cc', /not available on this machine \(available: /], ['CUBIC', /not a name such as cubic or bbr/], ['a'.repeat(16), /not a name/], ['', /not a name/]] as const) {
    assert.throws(() => tcp({ congestion: bad }), (e: unknown) => e instanceof InvalidArgumentError && why.test(e.message), bad);
  }
});

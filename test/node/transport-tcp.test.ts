import { test } from 'node:test';
import assert from 'node:assert/strict';
import { InvalidArgumentError } from '../../src/core/errors.js';
import { FramedConnection, TransportError, TransportErrorCode } from '../../src/core/transport/index.js';
import { parseTcpAddress, tcp } from '../../src/node/transport/tcp.js';
import { PROTOCOL_VERSION } from '../../src/core/protocol/frames.js';
import { transportComplianceSuite } from '../core/transport-suite.test.js';

transportComplianceSuite('tcp', {
  setup: async () => tcp(),
  // Well beyond loopback socket buffers that have not been auto-tuned (nobody reads) plus our 1 MiB queues.
  backpressureBytes: 32 << 20,
  resetMayLookLikeEnd: true,
  releasesWrites: true,
});

transportComplianceSuite('tcp (small buffers)', {
  setup: async () => tcp({ readHighWaterMark: 4096, writeHighWaterMark: 4096 }),
  backpressureBytes: 16 << 20,
  resetMayLookLikeEnd: true,
  largeTransferBytes: 8 << 20,
  releasesWrites: true,
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

/**
 * Sender threads (src/node/transport/send-threads.ts): a TCP connection whose writes a thread of
 * its own makes keeps the whole transport contract (the compliance suite, both ends sending from
 * threads), guest memory travels as shared views, and threads go back to their pool.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { memoryPair } from '../../src/core/transport/memory.js';
import { TransportError, TransportErrorCode, type Connection, type Transport } from '../../src/core/transport/index.js';
import { SendThreads } from '../../src/node/transport/send-threads.js';
import { sendFromThread, tcp } from '../../src/node/transport/tcp.js';
import { transportComplianceSuite } from '../core/transport-suite.test.js';

const available = SendThreads.available();

/** TCP whose every connection (dialled and accepted) sends from a thread of `threads`. */
function threadedTcp(threads: SendThreads): Transport {
  const t = tcp();
  const handOver = (c: Connection) => {
    assert.ok(sendFromThread(c, threads), 'a fresh TCP connection sends from a thread');
    return c;
  };
  return {
    name: 'tcp',
    dial: async (address, options) => handOver(await t.dial(address, options)),
    listen: (options) => t.listen({ ...options, onConnection: (c) => options.onConnection(handOver(c)) }),
  };
}

if (available) {
  let threads: SendThreads | null = null;
  transportComplianceSuite('tcp sending from threads', {
    setup: async () => threadedTcp((threads = new SendThreads())),
    teardown: async () => threads?.close(),
    // Beyond loopback socket buffers that have not been auto-tuned, plus the 4 MiB a thread may hold.
    backpressureBytes: 48 << 20,
    resetMayLookLikeEnd: true,
  });
}

async function pair(t: Transport): Promise<{ ours: Connection; theirs: Connection; close(): Promise<void> }> {
  let accept!: (c: Connection) => void;
  const accepted = new Promise<Connection>((r) => { accept = r; });
  const listener = await t.listen({ onConnection: (c) => accept(c) });
  const ours = await t.dial(listener.address);
  const theirs = await accepted;
  return { ours, theirs, close: () => listener.close() };
}

/** A TCP pair on a fresh listener and a pool of sender threads (`spares` started), for `fn`; all closed after. */
async function withPair(spares: number, fn: (p: { ours: Connection; theirs: Connection; threads: SendThreads }) => Promise<void>): Promise<void> {
  const threads = new SendThreads(spares);
  const { ours, theirs, close } = await pair(tcp());
  try {
    await fn({ ours, theirs, threads });
  } finally {
    ours.abort();
    theirs.abort();
    await close();
    await threads.close();
  }
}

async function readAll(c: Connection): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  let n = 0;
  for await (const p of c) {
    parts.push(p);
    n += p.length;
  }
  const out = new Uint8Array(n);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

test('a connection sending from a thread sends views of shared memory as they are when sent, other bytes as they were when written', { skip: !available && 'no sender threads on this machine' }, () => withPair(1, async ({ ours, theirs, threads }) => {
  assert.equal(sendFromThread(ours, threads), true);
  const shared = new Uint8Array(new SharedArrayBuffer(3 << 20));
  for (let i = 0; i < shared.length; i++) shared[i] = (i * 7 + (i >>> 12)) & 0xff;
  const own = new Uint8Array(1000).fill(9);
  const reading = readAll(theirs);
  await ours.write(shared.subarray(4096, 2 << 20));
  await ours.write(own);
  own.fill(1); // a writer may reuse a buffer it wrote: the copy went
  await ours.write(shared.subarray(2 << 20));
  await ours.close();
  const got = await reading;
  const want = new Uint8Array([...shared.subarray(4096, 2 << 20), ...new Uint8Array(1000).fill(9), ...shared.subarray(2 << 20)]);
  assert.equal(got.length, want.length);
  assert.ok(Buffer.from(got).equals(Buffer.from(want)), 'the bytes arrived in order and intact');
  await theirs.close();
  assert.equal(await ours.closed, undefined);
  assert.equal(threads.threads, 1, 'the pool\'s one thread served the connection');
}));

test('a thread goes back to its pool when its connection ends, and serves the next one', { skip: !available && 'no sender threads on this machine' }, async () => {
  const threads = new SendThreads(0);
  const t = tcp();
  try {
    for (let round = 0; round < 3; round++) {
      const { ours, theirs, close } = await pair(t);
      assert.equal(sendFromThread(ours, threads), true);
      const reading = readAll(theirs);
      await ours.write(new Uint8Array(100_000).fill(round + 1));
      await ours.close();
      const got = await reading;
      assert.equal(got.length, 100_000);
      assert.ok(got.every((b) => b === round + 1));
      await theirs.close();
      assert.equal(await ours.closed, undefined);
      await close();
      // Free again as soon as its connection ended (its messages are handled in order).
      assert.equal(threads.threads, 1, `after connection ${round}: one thread, reused`);
    }
  } finally {
    await threads.close();
  }
});

test('a peer that resets the connection fails a write the thread is blocked on with ERR_TRANSPORT_RESET', { skip: !available && 'no sender threads on this machine' }, () => withPair(1, async ({ ours, theirs, threads }) => {
  assert.equal(sendFromThread(ours, threads), true);
  const big = new Uint8Array(new SharedArrayBuffer(64 << 20));
  // Nobody reads: the thread fills the kernel's buffers and waits in poll.
  const writing = ours.write(big);
  await new Promise((r) => setTimeout(r, 50));
  theirs.abort();
  await assert.rejects(writing, (e) => e instanceof TransportError && e.code === TransportErrorCode.RESET);
  assert.equal((await ours.closed)?.code, TransportErrorCode.RESET);
}));

test('only plain TCP connections open for writing send from a thread', { skip: !available && 'no sender threads on this machine' }, () => withPair(0, async ({ ours, threads }) => {
  const [a, b] = memoryPair();
  assert.equal(sendFromThread(a, threads), false);
  a.abort();
  b.abort();
  await ours.close();
  assert.equal(sendFromThread(ours, threads), false, 'closed for writing');
  assert.equal(threads.threads, 0, 'no thread was started for it');
}));

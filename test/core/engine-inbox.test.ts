/**
 * The engine's Inbox: frames handed out by type, and the pause that lets a destination stop
 * reading while it holds as many page frames as it will (the connection's backpressure then
 * reaches the sender).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setImmediate as tick } from 'node:timers/promises';
import { Inbox, MigrationError } from '../../src/core/engine/common.js';
import { PAGE_SIZE } from '../../src/core/pages.js';
import { Encoding } from '../../src/core/protocol/frames.js';
import { FramedConnection } from '../../src/core/transport/framed.js';
import { memoryPair } from '../../src/core/transport/memory.js';

async function ticks(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await tick();
}

function pagesFrame(seq: number) {
  return { type: 'PAGES' as const, seq, demand: false, pages: [{ index: seq, encoding: Encoding.RAW, data: new Uint8Array(PAGE_SIZE).fill(seq & 0xff) }] };
}

test('a paused inbox reads no further frames, so the sender is held by backpressure; resume delivers the rest in order', async () => {
  // A 64 KiB pipe: 60 frames of 4 KiB cannot all be in flight.
  const [a, b] = memoryPair({ highWaterMark: 64 << 10 });
  const tx = new FramedConnection(a);
  const rx = new FramedConnection(b);
  const inbox = new Inbox(rx);
  const got: number[] = [];
  inbox.on('PAGES', (f) => {
    got.push(f.seq);
    if (f.seq === 0) inbox.pause(); // the first frame fills the consumer
  });
  let sent = 0;
  const sending = (async () => {
    for (let i = 0; i < 60; i++) {
      await tx.send(pagesFrame(i));
      sent++;
    }
  })();
  await ticks(50);
  assert.deepEqual(got, [0], 'frames were read while paused');
  assert.ok(sent < 60, `the sender was not held back (sent ${sent})`);
  inbox.resume();
  await sending;
  await ticks(50);
  assert.deepEqual(got, Array.from({ length: 60 }, (_, i) => i));
  assert.equal(inbox.error, null);
  a.abort();
  b.abort();
});

test('an inbox that fails while paused ends: waiters hear the failure and done resolves', async () => {
  const [a, b] = memoryPair();
  const tx = new FramedConnection(a);
  const inbox = new Inbox(new FramedConnection(b));
  inbox.on('PAGES', () => inbox.pause());
  await tx.send(pagesFrame(1));
  await ticks(10);
  const waiting = inbox.next('ACK');
  inbox.fail(new MigrationError('ERR_MIGRATION_TEST', 'given up'));
  await assert.rejects(waiting, (e: unknown) => e instanceof MigrationError && e.code === 'ERR_MIGRATION_TEST');
  await inbox.done; // the pump returned instead of waiting for a resume that never comes
  // A pause after the failure is a no-op: nothing is left to hold.
  inbox.pause();
  assert.equal(inbox.error?.message, 'given up');
  a.abort();
  b.abort();
});

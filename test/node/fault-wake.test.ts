/**
 * A post-copy destination wakes its vCPU when the page it waits for arrives, and only then: a
 * pushed page nobody waits for costs no notify. The VM here is a stand-in holding just what the
 * adapter's fault service touches (control words, presence map), so the test can play the vCPU's
 * side of the protocol step by step.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PRESENCE_MAP_OFFSET, RESERVED_BYTES, RESERVED_PAGES } from '../../src/core/abi.js';
import { xxh3 } from '@node-rs/xxhash';
import { Encoding } from '../../src/core/protocol/frames.js';
import { Bitmap } from '../../src/core/bitmap.js';
import { DestinationVmAdapter } from '../../src/node/engine/adapters.js';
import { Ctl } from '../../src/node/vm/control.js';
import type { Vm } from '../../src/node/vm/vm.js';
import { joinedFaultThread } from '../helpers/fault-listener.js';
import { FaultChannelBlock } from '../../src/node/vm/fault-channel.js';

function standIn(pages: number): { vm: Vm; ctl: Int32Array; presence: Uint8Array } {
  const ctl = new Int32Array(new SharedArrayBuffer(64 * 4));
  const presence = new Uint8Array(new SharedArrayBuffer(pages));
  const vm = {
    name: 'stand-in', info: { hash: 'x' }, memoryBytes: pages * 4096, config: {},
    controlBuffer: ctl.buffer,
    prewarm: () => Promise.resolve(),
    prefaultFresh: () => Promise.resolve(0),
    presenceView: () => presence,
    bootFromState: () => Promise.resolve(),
    resume: () => undefined,
    whenRunning: () => Promise.resolve(),
    switchVariant: () => Promise.resolve(),
    stop: () => Promise.resolve(),
  } as unknown as Vm;
  return { vm, ctl, presence };
}

test('post-copy: markPresent wakes the vCPU for the page it waits on, and only for that page', async () => {
  const { vm, ctl, presence } = standIn(16);
  const adapter = new DestinationVmAdapter(vm, { prefault: false });
  const absent = new Bitmap(16);
  for (const p of [3, 5, 7]) absent.set(p);
  await adapter.load({ guestBytes: 16 * 4096, globals: [], devices: {} } as never);
  await adapter.start(absent);
  assert.deepEqual([...presence].map((x, i) => (x ? -1 : i)).filter((i) => i >= 0), [3, 5, 7]);

  // The vCPU faults on page 5: it publishes the page (it would then bump FAULT_REQ and wait).
  Atomics.store(ctl, Ctl.FAULT_PAGE, 5 + RESERVED_PAGES);
  const done0 = Atomics.load(ctl, Ctl.FAULT_DONE);
  adapter.markPresent(3); // pushed, nobody waits for it
  assert.equal(presence[3], 1);
  assert.equal(Atomics.load(ctl, Ctl.FAULT_DONE), done0, 'a page nobody waits for woke the vCPU');
  adapter.markPresent(5); // the one it waits for
  assert.equal(presence[5], 1);
  assert.equal(Atomics.load(ctl, Ctl.FAULT_DONE), done0 + 1, 'the waiting vCPU was not woken');
  adapter.markPresent(7);
  assert.equal(Atomics.load(ctl, Ctl.FAULT_DONE), done0 + 1);
  await adapter.discard();
});

test('destination fault thread (not detached, as without blocking sockets: the thread serves faults, through the shaper): installs an absent demand page, never a present one, and refuses a page beyond the VM by name', async (t) => {
  const { link, source } = await joinedFaultThread(t, '5a'.repeat(16), { latencyMs: 1 }, false);

  const pages = 16;
  const memory = new SharedArrayBuffer(RESERVED_BYTES + pages * 4096);
  const presence = new Uint8Array(memory, PRESENCE_MAP_OFFSET + RESERVED_PAGES, pages);
  presence.fill(1);
  presence[3] = 0; // absent
  const mem = new Uint8Array(memory);
  mem.fill(7, RESERVED_BYTES + 5 * 4096, RESERVED_BYTES + 6 * 4096); // page 5: present, the guest's own content
  const installed: [number, bigint, number | null][] = [];
  const failures: Error[] = [];
  const ctl = new Int32Array(new SharedArrayBuffer(64 * 4));
  assert.equal(link.fd, null, 'the connection is not detached');
  link.start({ memory, ctl: ctl.buffer, channel: FaultChannelBlock.create(pages).buffer, pages }, {
    installed: (page, hash, waited) => installed.push([page, hash, waited]),
    failed: (e) => failures.push(e),
  });
  // Play the vCPU: it faults on page 3; the thread asks the source for it.
  Atomics.store(ctl, Ctl.FAULT_PAGE, 3 + RESERVED_PAGES);
  Atomics.add(ctl, Ctl.FAULT_REQ, 1);
  Atomics.notify(ctl, Ctl.FAULT_REQ);
  const request = await source.next();
  assert.deepEqual(request?.type === 'PAGE_REQUEST' ? request.pages : request, [3]);
  const page = (fill: number) => new Uint8Array(4096).fill(fill);
  // The answer, and page 5 (present: the guest's own) smuggled in beside it.
  await source.send({ type: 'PAGES', seq: request?.type === 'PAGE_REQUEST' ? request.id : 0, demand: true, pages: [{ index: 3, encoding: Encoding.RAW, data: page(9) }, { index: 5, encoding: Encoding.RAW, data: page(9) }] });
  for (let i = 0; i < 200 && installed.length === 0; i++) await new Promise((r) => setTimeout(r, 5));
  assert.deepEqual(installed.map(([p]) => p), [3], 'only the absent page was installed');
  assert.ok(installed[0][2] !== null && installed[0][2] >= 0, 'the vCPU waited for it, and the thread says how long');
  assert.ok(Atomics.load(ctl, Ctl.FAULT_DONE) > 0, 'the vCPU was woken');
  assert.equal(installed[0][1], xxh3.xxh64(page(9)), 'its hash is the digest hash of what was installed');
  assert.equal(presence[3], 1);
  assert.ok(mem.subarray(RESERVED_BYTES + 3 * 4096, RESERVED_BYTES + 4 * 4096).every((b) => b === 9));
  assert.ok(mem.subarray(RESERVED_BYTES + 5 * 4096, RESERVED_BYTES + 6 * 4096).every((b) => b === 7), 'a present page keeps what the guest wrote');

  await source.send({ type: 'PAGES', seq: 2, demand: true, pages: [{ index: pages, encoding: Encoding.ZERO, data: new Uint8Array(0) }] });
  for (let i = 0; i < 200 && failures.length === 0; i++) await new Promise((r) => setTimeout(r, 5));
  assert.equal((failures[0] as { code?: string } | undefined)?.code, 'ERR_PROTOCOL_MALFORMED');
  await link.close();
});

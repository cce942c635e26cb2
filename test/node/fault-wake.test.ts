/**
 * A post-copy destination wakes its vCPU when the page it waits for arrives, and only then: a
 * pushed page nobody waits for costs no notify. The VM here is a stand-in holding just what the
 * adapter's fault service touches (control words, presence map), so the test can play the vCPU's
 * side of the protocol step by step.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RESERVED_PAGES } from '../../src/core/abi.js';
import { Bitmap } from '../../src/core/bitmap.js';
import { DestinationVmAdapter } from '../../src/node/engine/adapters.js';
import { Ctl } from '../../src/node/vm/control.js';
import type { Vm } from '../../src/node/vm/vm.js';

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
  await adapter.start({ guestBytes: 16 * 4096, globals: [], devices: {} } as never, absent);
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

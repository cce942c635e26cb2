import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Vm } from '../../src/node/vm/vm.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';
import { GuestTrapError, InvalidArgumentError, VmStateError } from '../../src/core/errors.js';
import { PAGE_SIZE } from '../../src/core/pages.js';
import { hammerGuest, trapGuest, wat } from '../helpers/wat.js';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { guestsDir } from '../../src/node/paths.js';
import { NetRecord } from '../../src/core/abi.js';

const cache = new InstrumentCache();

function seeded(bytes: Uint8Array, seed: bigint): Vm {
  const vm = Vm.create({ name: `hammer-${seed}`, module: bytes, memoryBytes: 4 << 20, cache, quantumMs: 0.5 });
  new DataView(vm.guestView().buffer, vm.guestView().byteOffset).setBigUint64(0, seed, true);
  return vm;
}

/**
 * The dirty log, the hard way: the guest hammers memory (straddling stores, fills, copies) while
 * the host harvests and copies dirty pages round after round; after a pause and a last harvest,
 * the copy assembled from the rounds must equal guest memory byte for byte.
 */
test('dirty log: pre-copy style rounds reassemble memory exactly, over many seeds', async () => {
  const bytes = hammerGuest(64);
  for (let seed = 1n; seed <= 12n; seed++) {
    const vm = seeded(bytes, seed * 0x9e3779b97f4a7c15n);
    await vm.bootCold();
    await vm.startDirtyLog();
    const copy = new Uint8Array(vm.guestBytes);
    copy.set(vm.guestView()); // first pass, racing with the guest on purpose
    let copied = 0;
    for (let round = 0; round < 6; round++) {
      const dirty = await vm.harvestDirty();
      for (const p of dirty) {
        copy.set(vm.pageView(p), p * PAGE_SIZE);
        copied++;
      }
      await new Promise((r) => setTimeout(r, 2));
    }
    await vm.pause();
    for (const p of await vm.harvestDirty()) copy.set(vm.pageView(p), p * PAGE_SIZE);
    const live = vm.guestView();
    let firstDiff = -1;
    for (let i = 0; i < live.length; i++) if (live[i] !== copy[i]) { firstDiff = i; break; }
    assert.equal(firstDiff, -1, `seed ${seed}: copy differs from guest memory at byte ${firstDiff} (page ${Math.floor(firstDiff / PAGE_SIZE)})`);
    assert.ok(copied > 0, 'the guest dirtied pages during the rounds');
    assert.ok(vm.stat().progress > 0, 'the guest made progress');
    await vm.stop();
  }
});

test('dirty log: a paused VM has nothing new to harvest, and logging off means no marks', async () => {
  const vm = seeded(hammerGuest(16), 42n);
  await vm.bootCold();
  await vm.startDirtyLog();
  await vm.pause();
  await vm.harvestDirty();
  assert.equal((await vm.harvestDirty()).count(), 0);
  await vm.stopDirtyLog();
  vm.resume();
  await new Promise((r) => setTimeout(r, 20));
  await vm.pause();
  assert.equal((await vm.harvestDirty()).count(), 0, 'plain variant must not mark');
  assert.equal(vm.dirtyLogging, false);
  await vm.stop();
});

test('dirty log: dirtyCount counts what the next harvest takes, and clears nothing', async () => {
  const vm = seeded(hammerGuest(16), 7n);
  await vm.bootCold();
  await vm.startDirtyLog();
  await vm.harvestDirty();
  await new Promise((r) => setTimeout(r, 20));
  await vm.pause();
  const counted = vm.dirtyCount();
  assert.ok(counted > 0, 'the guest wrote while it ran');
  assert.equal(vm.dirtyCount(), counted, 'counting twice gives the same');
  assert.equal((await vm.harvestDirty()).count(), counted);
  assert.equal(vm.dirtyCount(), 0, 'the harvest cleared what was counted');
  await vm.stop();
});

test('pause resolves between quanta, resume continues, progress advances', async () => {
  const vm = seeded(hammerGuest(16), 7n);
  await vm.bootCold();
  await vm.pause();
  assert.equal(vm.state, 'paused');
  const p1 = vm.stat().progress;
  const d1 = vm.digest();
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(vm.stat().progress, p1, 'no progress while paused');
  assert.equal(vm.digest(), d1, 'memory unchanged while paused');
  vm.resume();
  await new Promise((r) => setTimeout(r, 20));
  await vm.pause();
  assert.ok(vm.stat().progress > p1);
  await vm.stop();
  assert.equal(vm.state, 'stopped');
});

test('throttle makes the vCPU sleep a share of each period', async () => {
  const vm = seeded(hammerGuest(16), 9n);
  await vm.bootCold();
  assert.throws(() => vm.throttle(1.5), InvalidArgumentError);
  vm.throttle(0.9);
  assert.equal(vm.throttleFraction, 0.9);
  // Quanta run ~0.5 ms each; at 90 % throttle the vCPU sleeps ~4.5 ms after each, so over the same
  // wall interval it runs far fewer quanta. Compare run time to wall time, which is robust to load.
  const s0 = vm.stat();
  const t0 = performance.now();
  await new Promise((r) => setTimeout(r, 100));
  const s1 = vm.stat();
  const wall = performance.now() - t0;
  const busy = (s1.runMs - s0.runMs) / wall;
  assert.ok(busy < 0.5, `vCPU busy ${Math.round(busy * 100)} % of the time under a 90 % throttle`);
  vm.throttle(0);
  await vm.stop();
});

test('fixed budget + pauseAfterQuanta is deterministic', async () => {
  const bytes = hammerGuest(16);
  const digests: string[] = [];
  for (let i = 0; i < 2; i++) {
    const vm = Vm.create({ name: `det${i}`, module: bytes, memoryBytes: 1 << 20, cache, fixedBudget: 5000 });
    new DataView(vm.guestView().buffer, vm.guestView().byteOffset).setBigUint64(0, 1234n, true);
    await vm.bootCold({ pauseAfterQuanta: 25 });
    await vm.whenPaused();
    assert.equal(vm.stat().quanta, 25);
    assert.equal(vm.stat().progress, 25 * 5000);
    digests.push(vm.digest());
    await vm.stop();
  }
  assert.equal(digests[0], digests[1]);
});

test('a guest trap stops the VM with a clear error and leaves memory inspectable', async () => {
  const vm = Vm.create({ name: 'trapper', module: trapGuest(3), memoryBytes: 1 << 20, cache });
  const trapped = new Promise<GuestTrapError>((r) => vm.once('trap', r));
  await vm.bootCold();
  const err = await trapped;
  assert.match(err.message, /trapped.*unreachable/i);
  assert.equal(vm.state, 'trapped');
  assert.equal(new DataView(vm.guestView().buffer, vm.guestView().byteOffset).getUint32(16, true), 0xdeadbeef);
  await assert.rejects(vm.pause(), GuestTrapError);
  assert.throws(() => vm.resume(), GuestTrapError);
  await vm.stop();
});

test('export/import state continues the same machine in a new VM', async () => {
  const bytes = hammerGuest(16);
  const mk = (name: string) => Vm.create({ name, module: bytes, memoryBytes: 1 << 20, cache, fixedBudget: 3000 });
  const straight = mk('straight');
  new DataView(straight.guestView().buffer, straight.guestView().byteOffset).setBigUint64(0, 99n, true);
  await straight.bootCold({ pauseAfterQuanta: 40 });
  await straight.whenPaused();
  const want = straight.digest();
  await straight.stop();

  const first = mk('first');
  new DataView(first.guestView().buffer, first.guestView().byteOffset).setBigUint64(0, 99n, true);
  await first.bootCold({ pauseAfterQuanta: 15 });
  await first.whenPaused();
  const state = await first.exportState();
  const second = mk('second');
  second.guestView().set(first.guestView());
  await first.stop();
  await second.bootFromState(state, { pauseAfterQuanta: 25 });
  await second.whenPaused();
  assert.equal(second.digest(), want);
  await assert.rejects(second.bootFromState(state), VmStateError);
  await second.stop();
});

test('a VM continued from state and kept paused touches no guest memory until it runs (queued network input waits)', async () => {
  const kv = new Uint8Array(readFileSync(join(guestsDir(), 'kv.wasm')));
  const mk = (name: string) => Vm.create({ name, module: kv, memoryBytes: 4 << 20, cache });
  const first = mk('kv-first');
  await first.bootCold();
  await first.pause();
  // Input that arrives while paused waits in the device's queue, not in guest memory.
  const before = first.digest();
  first.deliverNet([
    { conn: 7, type: NetRecord.OPEN, payload: new Uint8Array(0) },
    { conn: 7, type: NetRecord.DATA, payload: new TextEncoder().encode('SET a 1\n') },
  ]);
  const state = await first.exportState();
  assert.equal(first.digest(), before);
  assert.equal((state.devices as { net: { rx: unknown[] } }).net.rx.length, 2, 'the input is in the exported state');
  const second = mk('kv-second');
  second.growTo(state.guestBytes);
  second.guestView().set(first.guestView());
  await first.stop();
  // A migration destination loads the state this way while the last pages still arrive.
  await second.bootFromState(state, { paused: true });
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(second.state, 'paused');
  assert.equal(second.digest(), before, 'a loaded, paused VM wrote guest memory');
  // Running, it takes the input into its ring and serves it.
  second.resume();
  await second.whenRunning();
  for (let i = 0; i < 100 && second.digest() === before; i++) await new Promise((r) => setTimeout(r, 10));
  assert.notEqual(second.digest(), before);
  await second.stop();
});

test('pauseWithState: the state and soft pages come with the pause, as exportState and softPages would give them', async () => {
  const memstress = new Uint8Array(readFileSync(join(guestsDir(), 'memstress.wasm')));
  const vm = Vm.create({ name: 'pws', module: memstress, memoryBytes: 16 << 20, config: 'mem=8MiB wss=1MiB rate=1000000 pattern=zipf', cache });
  await vm.bootCold();
  await new Promise((r) => setTimeout(r, 30));
  const p = vm.pauseWithState();
  const stoppedMs = await p.paused;
  assert.equal(vm.state, 'paused');
  // The thread exports before it says PAUSED, and says how long the guest had been stopped by then.
  assert.ok(stoppedMs > 0 && stoppedMs < 1000, `stopped ${stoppedMs} ms before PAUSED`);
  const first = await Promise.race([p.state.then(() => 'state'), new Promise((r) => setImmediate(() => r('a turn later')))]);
  assert.equal(first, 'state', 'the state was on its way before the pause was told');
  const [state, soft] = await Promise.all([p.state, p.soft]);
  assert.deepEqual(state, await vm.exportState());
  const again = await vm.softPages();
  assert.deepEqual([...soft.words], [...again.words]);
  assert.ok(soft.count() > 0, 'memstress hands its temporaries back as soft pages');
  // Asked again while paused, it answers at once.
  const q = vm.pauseWithState();
  await q.paused;
  assert.deepEqual(await q.state, state);
  await vm.stop();

  const trapping = Vm.create({ name: 'pws-trap', module: trapGuest(3), memoryBytes: 1 << 20, cache });
  const trapped = new Promise((r) => trapping.once('trap', r));
  await trapping.bootCold();
  await trapped;
  const t = trapping.pauseWithState();
  await assert.rejects(t.paused);
  await assert.rejects(t.state, { code: 'ERR_VM_STATE' });
  await trapping.stop();
});

test('soft pages: a free report zeroes its pages, and a page the guest writes afterwards is in use again', async () => {
  // Pages 16..31 (guest addresses 64 KiB..128 KiB) are filled, reported free, then page 17 is written.
  const guest = wat(`(module
  (import "ferry" "soft_pages" (func $soft (param i32 i32 i32)))
  (memory (export "memory") 4)
  (global $calls (mut i32) (i32.const 0))
  (func (export "run") (param i32) (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (if (i32.eq (global.get $calls) (i32.const 1)) (then
      (memory.fill (i32.const 65536) (i32.const 7) (i32.const 65536))
      (call $soft (i32.const 65536) (i32.const 65536) (i32.const 1))
      (i32.store8 (i32.const 69633) (i32.const 1))))
    (i32.const 1)))`);
  const vm = Vm.create({ name: 'soft', module: guest, memoryBytes: 1 << 20, cache });
  await vm.bootCold();
  while (vm.stat().quanta < 2) await new Promise((r) => setTimeout(r, 5));
  const p = vm.pauseWithState();
  await p.paused;
  const soft = await p.soft;
  assert.deepEqual([...soft].filter((x) => x < 64), [16, ...Array.from({ length: 14 }, (_, i) => 18 + i)]);
  assert.ok(vm.pageView(16).every((b) => b === 0), 'the report zeroed the page');
  assert.equal(vm.pageView(17)[1], 1, 'the write after the report is there');
  assert.deepEqual([...(await vm.softPages())].filter((x) => x < 64), [...soft].filter((x) => x < 64), 'asked again: the same');
  await vm.stop();
});

test('bad VM parameters are refused with named errors', () => {
  const bytes = hammerGuest(16);
  assert.throws(() => Vm.create({ name: 'bad name!', module: bytes, memoryBytes: 1 << 20, cache }), InvalidArgumentError);
  assert.throws(() => Vm.create({ name: 'x', module: bytes, memoryBytes: 1000, cache }), InvalidArgumentError);
  assert.throws(() => Vm.create({ name: 'x', module: bytes, memoryBytes: 8 * 1024 ** 3, cache }), InvalidArgumentError);
});

test('pages may be missing (presence variant): the vCPU starts again from one unit of work a quantum, so the first replies go out before the rest is done', async () => {
  // A post-copy destination's first quanta fault on nearly every touch; a budget steered without
  // faults made one quantum of the whole pipeline, and every reply waited for its end (the tx ring
  // is drained between quanta).
  const vm = Vm.create({ name: 'kv-budget', module: new Uint8Array(readFileSync(join(guestsDir(), 'kv.wasm'))), memoryBytes: 16 << 20, cache, variants: ['plain', 'dirty', 'presence'] });
  const replies: number[] = [];
  vm.on('net', (records: { type: number; payload: Uint8Array }[]) => {
    const lines = records.filter((r) => r.type === NetRecord.DATA).reduce((n, r) => n + Buffer.from(r.payload).toString().split('\n').length - 1, 0);
    if (lines > 0) replies.push(lines);
  });
  try {
    await vm.bootCold();
    vm.deliverNet([{ conn: 1, type: NetRecord.OPEN, payload: new Uint8Array(0) }]);
    await vm.pause();
    vm.presenceView().fill(1); // every page present: only the variant changes
    await vm.switchVariant('presence');
    const lines = Array.from({ length: 64 }, (_, i) => `GET k${i}\n`).join('');
    vm.deliverNet([{ conn: 1, type: NetRecord.DATA, payload: new TextEncoder().encode(lines) }]);
    vm.resume();
    for (let i = 0; i < 400 && replies.reduce((a, b) => a + b, 0) < 64; i++) await new Promise((r) => setTimeout(r, 5));
    assert.equal(replies.reduce((a, b) => a + b, 0), 64, 'every request answered');
    // The first quantum may come before the request is in the ring (then the budget doubles once).
    assert.ok(replies[0] <= 2, `the first quantum with requests answered ${replies[0]} (then ${replies.slice(1).join(', ')})`);
    assert.ok(replies.length >= 4, `the replies went out over ${replies.length} quanta`);
  } finally {
    await vm.stop();
  }
});

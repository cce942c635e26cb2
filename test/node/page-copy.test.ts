/**
 * The per-byte path between guest memory and frames: copyBytes at every alignment, prefaulting of
 * fresh memory, the VM's page copies, and the destination adapter that prefaults at admission.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyBytes, prefaultFreshMemory } from '../../src/node/vm/memory-access.js';
import { DestinationVmAdapter } from '../../src/node/engine/adapters.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';
import { Vm } from '../../src/node/vm/vm.js';
import { PAGE_SIZE } from '../../src/core/pages.js';
import { Bitmap } from '../../src/core/bitmap.js';
import { wat } from '../helpers/wat.js';
import { mulberry32 } from '../helpers/prng.js';

const cache = new InstrumentCache();

/** An idle guest of one 64 KiB page that may grow to whatever the VM offers. */
const idleGuest = wat(`(module
  (memory (export "memory") 1)
  (func (export "run") (param i32) (result i32) (i32.const 1)))`);

function randomBytes(n: number, seed: number): Uint8Array {
  const rnd = mulberry32(seed);
  return Uint8Array.from({ length: n }, () => Math.floor(rnd() * 256));
}

function sharedBytes(n: number): Uint8Array {
  return new Uint8Array(new WebAssembly.Memory({ initial: Math.ceil(n / 65536), maximum: Math.ceil(n / 65536), shared: true }).buffer, 0, n);
}

test('copyBytes: shared ↔ plain at every alignment and bounce size moves exactly the bytes', () => {
  const src = randomBytes(3 * 4096 + 77, 7);
  for (const bounceLen of [16, 24, 4104, 1 << 16]) {
    const bounce = new Uint8Array(bounceLen);
    for (let a = 0; a < 8; a++) {
      for (let b = 0; b < 8; b++) {
        const len = src.length - 16;
        // plain → shared (a destination installing a page out of a frame)
        const shared = sharedBytes(src.length + 64);
        copyBytes(shared, 8 + a, src.subarray(b, b + len), bounce);
        assert.deepEqual(shared.subarray(8 + a, 8 + a + len), src.subarray(b, b + len), `plain+${b} → shared+${a}, bounce ${bounceLen}`);
        assert.equal(shared[7 + a], 0, 'nothing before the target range');
        assert.equal(shared[8 + a + len], 0, 'nothing after the target range');
        // shared → plain (a source copying a page into its frame)
        const plain = new Uint8Array(src.length + 64);
        copyBytes(plain, 8 + a, shared.subarray(8 + a, 8 + a + len), bounce);
        assert.deepEqual(plain.subarray(8 + a, 8 + a + len), src.subarray(b, b + len), `shared+${a} → plain+${a}, bounce ${bounceLen}`);
        const plain2 = new Uint8Array(src.length + 64);
        copyBytes(plain2, 3 + b, shared.subarray(8 + a, 8 + a + len), bounce);
        assert.deepEqual(plain2.subarray(3 + b, 3 + b + len), src.subarray(b, b + len), `shared+${a} → plain+${3 + b}`);
      }
    }
  }
});

test('copyBytes: plain ↔ plain and shared ↔ shared are plain copies', () => {
  const src = randomBytes(1000, 3);
  const bounce = new Uint8Array(64);
  const plain = new Uint8Array(1010);
  copyBytes(plain, 5, src, bounce);
  assert.deepEqual(plain.subarray(5, 1005), src);
  const a = sharedBytes(2000);
  const b = sharedBytes(2000);
  a.set(src, 1);
  copyBytes(b, 6, a.subarray(1, 1001), bounce);
  assert.deepEqual(b.subarray(6, 1006), src);
  assert.deepEqual(bounce, new Uint8Array(64), 'the bounce buffer was not needed');
});

test('prefaultFreshMemory: touches each page of the range once, leaves fresh memory zero, stops on abort', async () => {
  const memory = new WebAssembly.Memory({ initial: 32, maximum: 64, shared: true }); // 2 MiB
  const all = new Uint8Array(memory.buffer);
  let yields = 0;
  const n = await prefaultFreshMemory(memory, 4096 + 100, 1 << 20, { sliceBytes: 64 << 10, yieldFn: async () => { yields++; } });
  assert.equal(n, (1 << 20) / 4096 - 1, 'from is rounded down to its page');
  assert.ok(yields >= 14, `yielded between slices (${yields})`);
  assert.ok(all.every((x) => x === 0));
  assert.equal(await prefaultFreshMemory(memory, 0, 8 << 20), (2 << 20) / 4096, 'clamped to the memory');
  const ac = new AbortController();
  ac.abort();
  assert.equal(await prefaultFreshMemory(memory, 0, 1 << 20, { signal: ac.signal }), 0);
});

test('vm: readPageInto / writePageFrom round-trip pages at odd offsets; pages outside memory throw RangeError', async () => {
  const vm = Vm.create({ name: 'pages', module: idleGuest, memoryBytes: 4 << 20, cache });
  const pages = vm.guestPages;
  const frame = new Uint8Array(3 * (PAGE_SIZE + 9) + 16);
  const content = randomBytes(PAGE_SIZE, 11);
  for (let k = 0; k < 3; k++) frame.set(content, 16 + 9 + k * (PAGE_SIZE + 9));
  for (let k = 0; k < 3; k++) vm.writePageFrom(k * 5, frame, 16 + 9 + k * (PAGE_SIZE + 9));
  for (let k = 0; k < 3; k++) assert.deepEqual(vm.pageView(k * 5), content, `page ${k * 5}`);
  assert.ok(vm.pageView(1).every((x) => x === 0), 'neighbours untouched');
  const out = new Uint8Array(PAGE_SIZE + 13);
  vm.readPageInto(10, out, 13);
  assert.deepEqual(out.subarray(13), content);
  vm.readPageInto(5, out, 0);
  assert.deepEqual(out.subarray(0, PAGE_SIZE), content);
  assert.throws(() => vm.readPageInto(pages, out, 0), RangeError);
  assert.throws(() => vm.writePageFrom(-1, frame, 0), RangeError);
  assert.throws(() => vm.writePageFrom(0, frame, frame.length - 100), RangeError, 'short data');
  // A grown memory is seen by the page copies.
  vm.growTo(vm.guestBytes + (1 << 16));
  vm.writePageFrom(pages, content);
  assert.deepEqual(vm.pageView(pages), content);
  await vm.stop();
});

test('vm: softPages arrives as a bitmap over the VM\'s pages', async () => {
  const vm = Vm.create({ name: 'soft', module: idleGuest, memoryBytes: 4 << 20, cache });
  await vm.bootCold({ paused: true });
  const soft = await vm.softPages();
  assert.ok(soft instanceof Bitmap);
  assert.equal(soft.size, vm.maxPages);
  assert.equal(soft.count(), 0, 'a guest that reported nothing free has no soft pages');
  await vm.stop();
});

test('destination adapter: grows to the announced size, prefaults, warms the vCPU thread, installs pages', async () => {
  const vm = Vm.create({ name: 'arriving', module: idleGuest, memoryBytes: 8 << 20, cache, variants: ['plain', 'dirty', 'presence'] });
  const adapter = new DestinationVmAdapter(vm, { guestBytes: 6 << 20 });
  assert.equal(vm.guestBytes, 6 << 20);
  await adapter.warm();
  assert.ok(vm.guestView().every((x) => x === 0), 'prefaulting leaves fresh memory zero');
  const page = randomBytes(PAGE_SIZE + 1, 5);
  adapter.writePage(3, page, 1);
  const back = new Uint8Array(PAGE_SIZE + 3);
  adapter.readPage(3, back, 3);
  assert.deepEqual(back.subarray(3), page.subarray(1));
  await adapter.discard();

  // Without a size the VM keeps its own; prefault can be turned off; discard during warm-up is fine.
  const other = Vm.create({ name: 'arriving-2', module: idleGuest, memoryBytes: 8 << 20, cache, variants: ['plain', 'dirty', 'presence'] });
  const size = other.guestBytes;
  const quiet = new DestinationVmAdapter(other, { prefault: false });
  await quiet.discard();
  await quiet.warm();
  assert.equal(other.guestBytes, size);
});

test('destination adapter: a page installed before warm() resolved stops prefaulting instead of being zeroed', async () => {
  const vm = Vm.create({ name: 'early', module: idleGuest, memoryBytes: 64 << 20, cache, variants: ['plain', 'dirty', 'presence'] });
  const adapter = new DestinationVmAdapter(vm, { guestBytes: 64 << 20 });
  const page = randomBytes(PAGE_SIZE, 9);
  const last = vm.guestPages - 1; // the last slice to be prefaulted
  adapter.writePage(last, page, 0);
  await adapter.warm();
  assert.deepEqual(vm.pageView(last), page);
  await adapter.discard();
});

import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Vm } from '../../src/node/vm/vm.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';
import { GuestMemoryPool } from '../../src/node/vm/memory-pool.js';
import { InvalidArgumentError, VmStateError } from '../../src/core/errors.js';
import { WASM_PAGE_SIZE } from '../../src/core/pages.js';
import { guestsDir } from '../../src/node/paths.js';

const cache = new InstrumentCache();
const memstress = new Uint8Array(readFileSync(join(guestsDir(), 'memstress.wasm')));
const MiB = 1 << 20;

function allZero(b: Uint8Array): boolean {
  const w = new Float64Array(b.buffer, b.byteOffset, b.byteLength / 8);
  for (let i = 0; i < w.length; i++) if (!Object.is(w[i], 0)) return false;
  return true;
}

async function bootedMemstress(name: string, pool: GuestMemoryPool): Promise<Vm> {
  const vm = Vm.create({ name, module: memstress, memoryBytes: 8 * MiB, config: 'mem=4194304 rate=1', cache, pool }, 6 * MiB);
  await vm.bootCold();
  return vm;
}

test('a disposed VM gives its memory back; the next VM of its shape takes it zeroed and backed', async () => {
  const pool = new GuestMemoryPool(64 * MiB);
  const a = await bootedMemstress('pool-a', pool);
  after(() => a.stop()); // should an assertion fail before dispose: no vCPU thread left behind
  assert.equal(a.memoryBacked, false, 'an empty pool has nothing to give');
  a.guestView(0, 4 * MiB).fill(0xa5); // the first VM's bytes, which nobody else may ever see
  const memA = a.memory;
  await a.dispose();
  assert.throws(() => a.memory, VmStateError, 'a disposed VM has no memory any more');
  assert.throws(() => a.pageView(0), VmStateError);
  assert.equal(pool.stats().memories, 1);

  const b = Vm.create({ name: 'pool-b', module: memstress, memoryBytes: 8 * MiB, config: 'mem=4194304 rate=1', cache, pool }, 6 * MiB);
  assert.equal(b.memoryBacked, true);
  assert.equal(b.memory, memA, 'the same memory, reused');
  assert.ok(allZero(new Uint8Array(b.memory.buffer)), 'every byte zero again, the reserved region included');
  assert.deepEqual(pool.stats(), { hits: 1, misses: 1, memories: 0, bytes: 0 });
  try {
    await b.bootCold();
    const p0 = b.stat().quanta;
    for (let i = 0; i < 500 && b.stat().quanta === p0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.ok(b.stat().quanta > p0, 'the guest runs in reused memory');
  } finally {
    await b.dispose();
  }
});

test('the pool serves only the exact shape, and holds no more than its capacity', async () => {
  const pool = new GuestMemoryPool(10 * MiB);
  const shape = { initial: 32, maximum: 64 }; // 2 MiB now, 4 MiB at most
  await pool.warm(shape, 3);
  assert.equal(pool.stats().memories, 3);
  assert.equal(pool.bytes, 6 * MiB);
  await pool.warm({ initial: 48, maximum: 64 }, 2); // 3 MiB each: one more fits, not two
  assert.equal(pool.bytes, 9 * MiB);
  assert.equal(pool.take({ initial: 32, maximum: 128 }), null, 'another maximum');
  assert.equal(pool.take({ initial: 16, maximum: 64 }), null, 'another current size');
  const m = pool.take(shape);
  assert.ok(m);
  assert.equal(m.buffer.byteLength, 32 * WASM_PAGE_SIZE);
  m.grow(1); // a memory that grew has another shape now
  pool.give(m, 64);
  assert.equal(pool.take(shape)?.buffer.byteLength, 32 * WASM_PAGE_SIZE, 'one of the warmed ones');
  assert.equal(pool.take({ initial: 33, maximum: 64 }), m, 'the grown one serves its new size');
  const big = new WebAssembly.Memory({ initial: 200, maximum: 200, shared: true });
  pool.give(big, 200);
  assert.equal(pool.take({ initial: 200, maximum: 200 }), null, 'beyond capacity: dropped, not kept');
  assert.throws(() => new GuestMemoryPool(-1), InvalidArgumentError);
});

test('memory given back is zeroed even when it is taken before the background zeroing got to it', () => {
  const pool = new GuestMemoryPool(64 * MiB, () => new Promise(() => undefined)); // background work never gets a turn
  const m = new WebAssembly.Memory({ initial: 320, maximum: 320, shared: true }); // 20 MiB: more than one slice
  new Uint8Array(m.buffer).fill(7);
  pool.give(m, 320);
  const again = pool.take({ initial: 320, maximum: 320 });
  assert.equal(again, m);
  assert.ok(allZero(new Uint8Array(again.buffer)));
});

test('a pool of capacity 0 keeps nothing', async () => {
  const pool = new GuestMemoryPool(0);
  const a = await bootedMemstress('pool-off', pool);
  await a.dispose();
  assert.deepEqual(pool.stats(), { hits: 0, misses: 1, memories: 0, bytes: 0 });
});

test('trim lets go of the oldest memories until the pool holds at most what it is told', async () => {
  const pool = new GuestMemoryPool(16 * MiB);
  const old = new WebAssembly.Memory({ initial: 32, maximum: 64, shared: true }); // 2 MiB
  const mid = new WebAssembly.Memory({ initial: 48, maximum: 64, shared: true }); // 3 MiB
  const young = new WebAssembly.Memory({ initial: 16, maximum: 64, shared: true }); // 1 MiB
  pool.give(old, 64);
  pool.give(mid, 64);
  pool.give(young, 64);
  assert.equal(pool.trim(6 * MiB), 0, 'it fits: nothing goes');
  assert.equal(pool.trim(4 * MiB), 2 * MiB);
  assert.equal(pool.take({ initial: 32, maximum: 64 }), null, 'the oldest went first');
  assert.equal(pool.bytes, 4 * MiB);
  assert.equal(pool.trim(0), 4 * MiB);
  assert.deepEqual({ memories: pool.stats().memories, bytes: pool.bytes }, { memories: 0, bytes: 0 });
});

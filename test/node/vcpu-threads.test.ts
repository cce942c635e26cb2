import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Vm } from '../../src/node/vm/vm.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';
import { VcpuThreadPool } from '../../src/node/vm/vcpu-threads.js';
import { hammerGuest } from '../helpers/wat.js';
import { runModuleScript } from '../helpers/module-script.js';

const cache = new InstrumentCache();

async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 500 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(cond(), what);
}

test('a VM takes a spare vCPU thread: it boots, runs, pauses and continues from state on it; the pool starts the next spare', async (t) => {
  let busy = true;
  const threads = new VcpuThreadPool(1, { refillDelayMs: 20, busy: () => busy });
  t.after(() => threads.close());
  assert.equal(threads.started, 1, 'one spare started with the pool');
  const bytes = hammerGuest(16);
  const a = Vm.create({ name: 'spare-a', module: bytes, memoryBytes: 4 << 20, cache, quantumMs: 0.5, threads });
  await a.bootCold();
  assert.equal(threads.taken, 1, 'the VM ran on the spare');
  const p0 = a.stat().progress;
  await until(() => a.stat().progress > p0, 'the guest makes progress on the adopted thread');
  await a.pause();
  const state = await a.exportState();
  const digest = a.digest();
  // The next spare starts once the host is not busy; a VM continuing from the state takes it.
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(threads.started, 1, 'no spare starts while the host is busy');
  busy = false;
  await until(() => threads.started === 2, 'the pool started the next spare');
  const b = Vm.create({ name: 'spare-b', module: bytes, memoryBytes: 4 << 20, cache, quantumMs: 0.5, threads }, state.guestBytes);
  b.guestView().set(a.guestView());
  await b.prewarm();
  assert.equal(threads.taken, 2);
  await b.bootFromState({ ...state, name: 'spare-b' }, { paused: true });
  assert.equal(b.digest(), digest, 'the adopted thread continued exactly where the VM was');
  b.resume();
  const q0 = b.stat().progress;
  await until(() => b.stat().progress > q0, 'and runs on');
  await Promise.all([a.stop(), b.stop()]);
  assert.equal(b.state, 'stopped');
});

test('with no spare standing (none kept, or taken), a VM starts its own thread; close() stops the spares', async (t) => {
  const none = new VcpuThreadPool(0);
  const vm = Vm.create({ name: 'own-thread', module: hammerGuest(8), memoryBytes: 4 << 20, cache, quantumMs: 0.5, threads: none });
  t.after(() => vm.stop());
  await vm.bootCold();
  assert.equal(none.taken, 0);
  assert.equal(none.started, 0);
  const p0 = vm.stat().progress;
  await until(() => vm.stat().progress > p0, 'the guest runs on its own thread');
  const pool = new VcpuThreadPool(2, { refillDelayMs: 10_000 });
  await pool.close();
  assert.equal(pool.take(), null, 'a closed pool hands out nothing');
  assert.throws(() => new VcpuThreadPool(-1), RangeError);
});

test('closing the pools at any moment after they start asks their threads to end: never terminated while one loads its native calls', async () => {
  // Terminating a thread inside koffi's load aborted the process (exit 134): a host stopped right
  // after it started, its spare vCPU thread, page-hashing threads and fault listener still warming up (a sweep of
  // close() across their start-up, as below, aborted in 2 runs of 3). Each close must find every
  // thread ending itself when asked (exit code 0; a terminated thread exits with 1), and the
  // process must end with 0.
  const pool = new URL('../../src/node/vm/vcpu-threads.js', import.meta.url).href;
  const hasher = new URL('../../src/node/vm/page-hasher.js', import.meta.url).href;
  const faults = new URL('../../src/node/engine/fault-thread.js', import.meta.url).href;
  const script = `import { VcpuThreadPool } from ${JSON.stringify(pool)};
import { PageHasher } from ${JSON.stringify(hasher)};
import { FaultThreadListener } from ${JSON.stringify(faults)};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const closes = [];
for (let ms = 0; ms <= 300; ms += 20) {
  const threads = new VcpuThreadPool(2);
  const h = new PageHasher(2);
  h.warm();
  const listener = new FaultThreadListener('127.0.0.1');
  listener.port().catch(() => undefined);
  await sleep(ms);
  closes.push(...(await Promise.all([threads.close(), h.close(), listener.close().then(() => null)])).filter((c) => c));
}
console.log(JSON.stringify(closes));`;
  const r = runModuleScript(script, 60_000);
  assert.equal(r.status, 0, `exit ${r.status} ${r.signal ?? ''}: ${r.stderr.slice(-600)}`);
  const closes = JSON.parse(r.stdout) as { threads: number; endedWhenAsked: number }[];
  assert.equal(closes.length, 32);
  for (const c of closes) assert.deepEqual(c, { threads: 2, endedWhenAsked: 2 });
});

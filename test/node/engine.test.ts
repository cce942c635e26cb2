import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Vm } from '../../src/node/vm/vm.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';
import { guestsDir } from '../../src/node/paths.js';
import { migrateSource } from '../../src/core/engine/source.js';
import { MigrationAcceptor, serveDestination, type DestinationOutcome } from '../../src/core/engine/destination.js';
import { DestinationVmAdapter, nodeEngineDeps, sourceVmOf } from '../../src/node/engine/adapters.js';
import { FaultThreadListener, SourceFaultThreads, sourceFaultThread } from '../../src/node/engine/fault-thread.js';
import type { MigrationMode } from '../../src/core/protocol/frames.js';
import type { DestinationFactory, DestinationVm, MigrationProgress, MigrationResult, SourceFaultLink, SourceVm } from '../../src/core/engine/types.js';
import { memoryPair } from '../../src/core/transport/memory.js';
import { FramedConnection } from '../../src/core/transport/framed.js';
import { shaped } from '../../src/core/transport/shaped.js';
import { tcp } from '../../src/node/transport/tcp.js';
import type { Connection } from '../../src/core/transport/transport.js';
import { FerryError } from '../../src/core/errors.js';
import { formatReportTable } from '../../src/core/metrics.js';
import { vmFactory } from '../helpers/destination.js';

const cache = new InstrumentCache();
const memstress = new Uint8Array(readFileSync(join(guestsDir(), 'memstress.wasm')));
const deps = nodeEngineDeps();

const factory = (made: Vm[], opts: { refuse?: FerryError } = {}) => vmFactory(made, cache, opts);

async function tcpPair(): Promise<[Connection, Connection, () => Promise<void>]> {
  const t = tcp();
  let accept!: (c: Connection) => void;
  const accepted = new Promise<Connection>((r) => (accept = r));
  const listener = await t.listen({ onConnection: (c) => accept(c) });
  const a = await t.dial(listener.address);
  return [a, await accepted, () => listener.close()];
}

/** Stops every VM a test made, pass or fail: a vCPU thread left running keeps the test file from exiting. */
async function stopAll(src: Vm, made: Vm[]): Promise<void> {
  for (const vm of [src, ...made]) await vm.stop().catch(() => undefined);
}

/**
 * A destination on real TCP: every connection goes to `acceptor` with `factory`. `outcome()` waits
 * (up to 1 s) for the migration's outcome once the source is done.
 */
async function tcpDestination(acceptor: MigrationAcceptor, factory: DestinationFactory): Promise<{ address: string; accepted(): number; outcome(): Promise<DestinationOutcome>; close(): Promise<void> }> {
  let outcome: Promise<DestinationOutcome> | undefined;
  let accepted = 0;
  const listener = await tcp().listen({
    onConnection: (c) => {
      accepted++;
      const r = acceptor.accept(c, factory);
      r.catch(() => undefined);
      void r.then((o) => { if (o) outcome = Promise.resolve(o); });
    },
  });
  return {
    address: listener.address,
    accepted: () => accepted,
    async outcome() {
      for (let i = 0; i < 100 && !outcome; i++) await new Promise((r) => setTimeout(r, 10));
      return outcome!;
    },
    close: () => listener.close(),
  };
}

/** Both ends' fault threads for a test, stopped (with the test's VMs) when it ends. */
function faultThreadsFor(t: TestContext, src: Vm, made: Vm[]): { listener: FaultThreadListener; threads: SourceFaultThreads } {
  const listener = new FaultThreadListener('127.0.0.1');
  const threads = new SourceFaultThreads();
  t.after(async () => {
    await stopAll(src, made);
    await listener.close();
    await threads.close();
  });
  return { listener, threads };
}

async function source(config: string): Promise<Vm> {
  const vm = Vm.create({ name: 'mover', module: memstress, memoryBytes: 64 << 20, config, cache });
  await vm.bootCold();
  await new Promise((r) => setTimeout(r, 30));
  return vm;
}

for (const mode of ['precopy', 'postcopy', 'hybrid'] as MigrationMode[]) {
  for (const transport of ['tcp', 'memory'] as const) {
    test(`${mode} over ${transport}: the VM moves while writing memory, verified, and keeps running there`, async (t) => {
      const src = await source('mem=24MiB wss=8MiB pattern=hotcold rate=40000000');
      const [a, b, close] = transport === 'tcp' ? await tcpPair() : [...memoryPair(), async () => undefined] as const;
      const made: Vm[] = [];
      t.after(() => stopAll(src, made));
      const progress: number[] = [];
      const events: MigrationProgress[] = [];
      // Pages of RUN frames the destination took straight into guest memory (pre-copy rounds only).
      let inPlace = 0;
      class Counting extends DestinationVmAdapter {
        override pagesView(first: number, count: number): Uint8Array {
          inPlace += count;
          return super.pagesView(first, count);
        }
      }
      const dest = serveDestination(b, vmFactory(made, cache, { adapter: (vm) => new Counting(vm) }), deps);
      // A 10 µs budget makes pre-copy iterate (the hot set keeps being rewritten) until its round
      // limit. (With 1 ms, a round could end with few enough dirty pages to fit at memory-transport
      // speed: 'converged' once in eight runs of this file.)
      const result = await migrateSource(a, sourceVmOf(src), deps, { mode, downtimeMs: mode === 'precopy' ? 0.01 : 50, maxRounds: 6, onProgress: (p) => { progress.push(p.bytesSent); events.push(p); } });
      const outcome: DestinationOutcome = await dest;
      await close();
      const r = result.report;
      assert.equal(r.verified, true);
      assert.notEqual(outcome.verified, false);
      // The vCPU's own fault waits come back in COMPLETE: none without post-copy.
      if (mode === 'precopy') assert.equal(r.postcopy.vcpuWaitMs, null);
      assert.equal(src.state, 'stopped', 'the source released the VM');
      assert.ok(r.downtimeMs !== null && r.downtimeMs >= 0);
      assert.ok(r.totalMigrationTimeMs! >= r.downtimeMs!);
      // The downtime splits where the source had sent everything it waits for.
      const parts = r.downtimeParts!;
      assert.ok(parts.sourceMs >= 0 && parts.destinationMs >= 0, JSON.stringify(parts));
      assert.ok(Math.abs(parts.sourceMs + parts.destinationMs - r.downtimeMs!) < 1e-6);
      assert.ok(r.bytes.wire >= 6 * 1024 * 1024, 'at least the written region crossed the wire');
      assert.ok(r.degradation !== null && r.degradation.beforePerSec > 0, 'degradation is measured against a baseline');
      assert.ok(progress.length > 0 && progress.every((v, i) => i === 0 || v >= progress[i - 1]), 'progress never runs backwards');
      // Within a round (or the push) the pages left count down as pages go; the ETA is a time or unknown.
      let countedDown = false;
      for (let i = 1; i < events.length; i++) {
        const [e, f] = [events[i - 1], events[i]];
        if (e.phase !== f.phase || e.round !== f.round || f.pagesSent <= e.pagesSent) continue;
        assert.ok(f.pagesRemaining <= e.pagesRemaining, `pages left went up within round ${f.round} (${e.pagesRemaining} → ${f.pagesRemaining})`);
        countedDown ||= f.pagesRemaining < e.pagesRemaining;
      }
      assert.ok(countedDown, 'pages left counted down as a round\'s pages went');
      assert.ok(events.every((e) => e.etaMs === null || (Number.isFinite(e.etaMs) && e.etaMs >= 0)));
      // Once a round has measured the rates, pre-copy forecasts the rounds its policy will run.
      if (mode === 'precopy') assert.ok(events.some((e) => e.phase === 'precopy' && e.round >= 1 && e.etaMs !== null && e.etaMs > 0), 'an ETA after the first round');
      if (mode === 'precopy') {
        assert.equal(result.stopReason, 'round-limit');
        assert.ok(r.rounds.length >= 6, `a full pass and rounds of dirty pages (${r.rounds.length})`);
        assert.ok(r.pages.resent > 0, 'dirty pages were re-sent');
      }
      if (mode === 'postcopy') assert.ok(r.pages.pushed + r.pages.faulted > 0);
      // Pre-copy rounds land in guest memory straight from the wire; after the start nothing does.
      if (mode === 'postcopy') assert.equal(inPlace, 0);
      else assert.ok(inPlace >= (4 << 20) / 4096, `${inPlace} pages landed in place`);
      const vm = made[0];
      const p0 = vm.stat().progress;
      for (let i = 0; i < 500 && vm.stat().progress === p0; i++) await new Promise((res) => setTimeout(res, 10));
      assert.ok(vm.stat().progress > p0, 'the guest keeps working on the destination');
      assert.equal(vm.dirtyLogging, false);
      await vm.stop();
    });
  }
}

test('postcopy demand faults are served and counted; pre-paging pages follow', async (t) => {
  const src = await source('mem=32MiB pattern=uniform rate=200000000');
  const [a, b, close] = await tcpPair();
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  const dest = serveDestination(b, factory(made), deps);
  const result = await migrateSource(a, sourceVmOf(src), deps, { mode: 'postcopy' });
  const outcome = await dest;
  await close();
  assert.equal(result.report.verified, true);
  assert.ok(outcome.faults > 0, 'a guest writing uniformly over 32 MiB faults on absent pages');
  assert.equal(outcome.faultLatencyMs.count, outcome.faults);
  // The waits are the vCPU's own, measured where it blocked: as many as it took faults, and the
  // fault service's round trips (requests it sent) are part of them.
  const stat = made[0].stat();
  assert.equal(outcome.faults, stat.faults);
  assert.ok(Math.abs(outcome.faultLatencyMs.mean! * outcome.faults - stat.faultWaitMs) < 1e-6 * stat.faultWaitMs + 1e-9, `${outcome.faultLatencyMs.mean} × ${outcome.faults} ≠ ${stat.faultWaitMs} ms`);
  assert.ok(outcome.faultServiceMs.count > 0 && outcome.faultServiceMs.count <= outcome.faults, JSON.stringify(outcome.faultServiceMs));
  // The source's report has them too (COMPLETE carries them), beside its own side of each fault.
  assert.deepEqual(result.report.postcopy.vcpuWaitMs, outcome.faultLatencyMs);
  assert.match(formatReportTable(result.report), new RegExp(`post-copy faults\\s+${outcome.faults} \\(the vCPU waited p50 .+, p99 .+; the source answered in p50 .+, p99 .+\\)`));
  await made[0].stop();
});

test('refused admission: the VM keeps running on the source, the error is named', async (t) => {
  const src = await source('mem=8MiB');
  t.after(() => stopAll(src, []));
  const [a, b] = memoryPair();
  const dest = serveDestination(b, factory([], { refuse: new FerryError('ERR_NO_CAPACITY', 'host is full') }), deps).catch((e: unknown) => e);
  await assert.rejects(migrateSource(a, sourceVmOf(src), deps, { mode: 'precopy' }), (e: unknown) => e instanceof FerryError && e.code === 'ERR_NO_CAPACITY');
  assert.equal(((await dest) as FerryError).code, 'ERR_NO_CAPACITY');
  assert.equal(src.state, 'running');
  // Pre-copy asks for dirty logging as the handshake starts: a refusal switches it off again.
  assert.equal(src.dirtyLogging, false, 'dirty logging is off again');
  await src.stop();
});

test('a connection lost during pre-copy resumes the VM on the source with nothing lost', async (t) => {
  const src = await source('mem=16MiB rate=20000000');
  const [a, b] = memoryPair();
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  const dest = serveDestination(b, factory(made), deps).catch((e) => e);
  let killed = false;
  const p = migrateSource(a, sourceVmOf(src), deps, {
    mode: 'precopy',
    onProgress: (pr) => {
      if (!killed && pr.pagesSent > 500) {
        killed = true;
        b.abort();
      }
    },
  });
  await assert.rejects(p, FerryError);
  assert.ok((await dest) instanceof Error);
  assert.equal(src.state, 'running', 'the source VM runs again');
  assert.equal(src.dirtyLogging, false, 'dirty logging is off again');
  const p0 = src.stat().progress;
  await new Promise((r) => setTimeout(r, 30));
  assert.ok(src.stat().progress > p0);
  for (const vm of made) assert.equal(vm.state, 'stopped', 'the half-filled destination VM was discarded');
  await src.stop();
});

test('cancel through the AbortSignal before switchover leaves the VM on the source', async (t) => {
  const src = await source('mem=16MiB rate=50000000');
  const [a, b] = memoryPair();
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  const dest = serveDestination(b, factory(made), deps).catch((e) => e);
  const ac = new AbortController();
  const p = migrateSource(a, sourceVmOf(src), deps, { mode: 'hybrid', signal: ac.signal, onProgress: (pr) => { if (pr.pagesSent > 300) ac.abort(); } });
  await assert.rejects(p, (e: unknown) => e instanceof FerryError && e.code === 'ERR_ABORTED');
  const err = await dest;
  // The source aborts the connection (it may be blocked behind backpressure), so the destination
  // sees a reset or a CANCEL, and either way discards what it received.
  assert.ok(err instanceof FerryError, `destination saw ${err}`);
  assert.equal(src.state, 'running');
  await src.stop();
});

/**
 * Waits until a migration held back by a gate is stuck on it: `count()` has reached `atLeast` (the
 * VM is set up first) and then not changed for a while. Returns the count.
 */
async function untilStuck(count: () => number, atLeast: number): Promise<number> {
  for (let i = 0; i < 400 && count() < atLeast; i++) await new Promise((r) => setTimeout(r, 25));
  let last = -1;
  for (let i = 0; i < 200 && count() !== last; i++) {
    last = count();
    await new Promise((r) => setTimeout(r, 100));
  }
  return count();
}

/** Once the gate is open: the migration ends verified, the source having paused on the way. */
async function endsVerifiedAfterPause(moving: Promise<MigrationResult>, dest: Promise<unknown>, paused: () => boolean, made: Vm[]): Promise<void> {
  const result = await moving;
  await dest;
  assert.equal(result.report.verified, true);
  assert.equal(paused(), true, 'the source paused once the gate opened');
  await made[0].stop();
}

for (const mode of ['precopy', 'hybrid', 'postcopy'] as MigrationMode[]) {
  test(`${mode}: pages may arrive while the destination's vCPU thread loads, but the source pauses only once the VM can start`, async (t) => {
    const src = await source('mem=8MiB wss=2MiB rate=4000000');
    const [a, b] = memoryPair();
    const made: Vm[] = [];
    t.after(() => stopAll(src, made)); // no vCPU thread left behind, pass or fail
    let written = 0;
    let pagesBeforeReady = -1;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    // The real adapter, with a vCPU thread that takes until the gate opens to be ready.
    class SlowThread extends DestinationVmAdapter {
      override writePage(page: number, data: Uint8Array, offset: number): void {
        written++;
        super.writePage(page, data, offset);
      }
      // RUN pages land here straight from the wire.
      override pagesView(first: number, count: number): Uint8Array {
        written += count;
        return super.pagesView(first, count);
      }
      override async warm(): Promise<void> {
        await super.warm();
        await gate;
      }
    }
    const slow = vmFactory(made, cache, { adapter: (vm) => new SlowThread(vm) });
    let paused = false;
    const sourceVm = sourceVmOf(src, { onPause: () => (paused = true) });
    const dest = serveDestination(b, slow, deps);
    const moving = migrateSource(a, sourceVm, deps, { mode, baselineMs: 0 });
    try {
      pagesBeforeReady = await untilStuck(() => written, mode === 'postcopy' ? 0 : 1);
      assert.equal(paused, false, 'the source did not pause while the destination VM could not start');
      assert.equal(src.state, 'running');
      if (mode === 'postcopy') assert.equal(pagesBeforeReady, 0, 'post-copy starts the VM right after the module ACK: it waits for the thread');
      else assert.ok(pagesBeforeReady >= (6 << 20) / 4096, `pre-copy pages flowed while the thread loaded (${pagesBeforeReady})`);
    } finally {
      release();
    }
    await endsVerifiedAfterPause(moving, dest, () => paused, made);
  });
}

test('precopy: a round is acknowledged only once its pages are hashed, so a hashing backlog never lands in the downtime', async (t) => {
  const src = await source('mem=8MiB wss=1MiB rate=100000');
  const [a, b] = memoryPair();
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  let queued = 0;
  // The real adapter, with a hashing queue that settles only once the gate opens.
  class SlowHashes extends DestinationVmAdapter {
    override pageHashes(pages: number): ReturnType<DestinationVmAdapter['pageHashes']> {
      const q = super.pageHashes(pages);
      const slow: NonNullable<DestinationVm['pageHashes']> extends (p: number) => infer Q ? Q : never = {
        out: q.out,
        add: (page) => { queued++; q.add(page); },
        addRange: (first, count) => { queued += count; q.addRange(first, count); },
        hurry: () => q.hurry(),
        settled: async () => { await gate; await q.settled(); },
        close: () => q.close(),
      };
      return slow as ReturnType<DestinationVmAdapter['pageHashes']>;
    }
  }
  let paused = false;
  const dest = serveDestination(b, vmFactory(made, cache, { adapter: (vm) => new SlowHashes(vm) }), deps);
  const moving = migrateSource(a, sourceVmOf(src, { onPause: () => (paused = true) }), deps, { mode: 'precopy', baselineMs: 0 });
  try {
    await untilStuck(() => queued, 1);
    assert.ok(queued >= (8 << 20) / 4096 / 2, `the first pass arrived and was queued for hashing (${queued} pages)`);
    assert.equal(paused, false, 'the source did not pause while the round\'s hashes were outstanding');
  } finally {
    release();
  }
  await endsVerifiedAfterPause(moving, dest, () => paused, made);
});

test('stop-and-copy: the state goes among the last pages even when the paused VM gives it a few event-loop turns late', async (t) => {
  const src = await source('mem=16MiB wss=8MiB rate=4000000');
  const [a, b] = memoryPair();
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  // Pages the destination took in place, and how many it had when the source paused and when STATE came.
  let inPlace = 0;
  let atPause = -1;
  let atState = -1;
  class Watching extends DestinationVmAdapter {
    override pagesView(first: number, count: number): Uint8Array {
      inPlace += count;
      return super.pagesView(first, count);
    }

    override load(state: Parameters<DestinationVmAdapter['load']>[0], hint?: Parameters<DestinationVmAdapter['load']>[1]): Promise<void> {
      atState = inPlace;
      return super.load(state, hint);
    }
  }
  const dest = serveDestination(b, vmFactory(made, cache, { adapter: (vm) => new Watching(vm) }), deps);
  // The state and soft pages come two turns of the event loop after the pause (as a vCPU thread's
  // message may, behind other events): the round must not write every page first.
  const turns = <T>(p: Promise<T>): Promise<T> => p.then((v) => new Promise<T>((r) => setImmediate(() => setImmediate(() => r(v)))));
  const base = sourceVmOf(src, { onPause: () => (atPause = inPlace) });
  const late = new Proxy(base, {
    get(target, key) {
      if (key === 'exportState') return () => turns(target.exportState());
      if (key === 'softPages') return () => turns(target.softPages());
      const v = Reflect.get(target, key) as unknown;
      return typeof v === 'function' ? (v as (...args: unknown[]) => unknown).bind(target) : v;
    },
  });
  const result = await migrateSource(a, late, deps, { mode: 'precopy', baselineMs: 0 });
  await dest;
  assert.equal(result.report.verified, true);
  const final = inPlace - atPause;
  assert.ok(final > 512, `the final round carried many batches of pages (${final})`);
  assert.ok(atState >= atPause && atState < inPlace, `STATE came after ${atState - atPause} of the final round's ${final} pages, not after all of them`);
});

for (const mode of ['precopy', 'postcopy', 'hybrid'] as MigrationMode[]) {
  test(`${mode}: pages the guest reported free are never sent, and the migration still verifies`, async (t) => {
    const src = await source('mem=8MiB wss=2MiB rate=4000000');
    const [a, b] = memoryPair();
    const made: Vm[] = [];
    t.after(() => stopAll(src, made));
    const base = sourceVmOf(src);
    const pages = base.guestPages();
    let softCount = 0;
    const vm = {
      ...base,
      softPages: async () => {
        const soft = await base.softPages();
        for (let p = 3; p < pages; p += 7) soft.set(p); // scattered, across word boundaries
        softCount = soft.count();
        return soft;
      },
    };
    const dest = serveDestination(b, factory(made), deps);
    const result = await migrateSource(a, vm, deps, { mode, baselineMs: 0, maxRounds: 3, hybridRounds: 2 });
    const outcome = await dest;
    assert.equal(result.report.verified, true);
    assert.notEqual(outcome.verified, false);
    assert.ok(softCount >= pages / 7 - 1);
    assert.ok(result.report.pages.firstPass <= pages - softCount, `soft pages stayed home (${result.report.pages.firstPass} sent first of ${pages}, ${softCount} soft)`);
    await made[0].stop();
  });
}

test('precopy: a page written after the guest reported it free is in use again: it reaches the destination (docs/guest-abi.md)', async (t) => {
  // The devices keep the free report and do not see guest stores, so the report at the pause is
  // stale for pages written since: every page of the hot 2 MiB is reported free here, and written.
  const src = await source('mem=8MiB wss=2MiB rate=4000000');
  const [a, b] = memoryPair();
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  const base = sourceVmOf(src);
  const hot = (2 << 20) / 4096;
  // The hot pages as they were right after the first report: a page that differs later was
  // written after it (one unchanged since may be skipped: its content does not matter).
  let reported: Uint8Array | null = null;
  const vm = {
    ...base,
    softPages: async () => {
      const soft = await base.softPages();
      for (let p = 0; p < hot; p++) soft.set(p);
      reported ??= src.guestView().slice(0, hot * 4096);
      return soft;
    },
  };
  // What the destination holds when it starts the VM (the guest changes it from then on).
  let atStart: Uint8Array | null = null;
  class Snapshot extends DestinationVmAdapter {
    override async start(absent: Parameters<DestinationVmAdapter['start']>[0]): Promise<void> {
      atStart = this.vm.guestView().slice(0, hot * 4096);
      return super.start(absent);
    }
  }
  const dest = serveDestination(b, vmFactory(made, cache, { adapter: (v) => new Snapshot(v) }), deps);
  const result = await migrateSource(a, vm, deps, { mode: 'precopy', baselineMs: 0, maxRounds: 3 });
  await dest;
  assert.equal(result.report.verified, true);
  assert.equal(src.state, 'stopped');
  const want = src.guestView().subarray(0, hot * 4096);
  const page = (b: Uint8Array, p: number) => b.subarray(p * 4096, (p + 1) * 4096);
  let written = 0;
  let stale = 0;
  for (let p = 0; p < hot; p++) {
    if (Buffer.compare(page(want, p), page(reported!, p)) === 0) continue;
    written++;
    if (Buffer.compare(page(want, p), page(atStart!, p)) !== 0) stale++;
  }
  assert.ok(written > hot / 2, `the guest wrote most hot pages after the report (${written})`);
  assert.equal(stale, 0, `${stale} of the ${written} pages reported free and written since did not arrive as the source left them`);
  await made[0].stop();
});

test('destination VM: start may follow load before it settles (one round trip); a load that fails fails start, and nothing runs', async (t) => {
  const src = await source('mem=4MiB rate=1000');
  await src.pause();
  const state = await sourceVmOf(src).exportState();
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  const mk = () => {
    const vm = Vm.create({ name: `loaded-${made.length}`, module: memstress, memoryBytes: 64 << 20, config: src.config, cache, variants: ['plain', 'presence'] });
    made.push(vm);
    vm.guestView().set(src.guestView().subarray(0, vm.guestView().length));
    return new DestinationVmAdapter(vm, { guestBytes: state.guestBytes });
  };
  const good = mk();
  await assert.rejects(good.start(null), { code: 'ERR_VM_STATE' }, 'start before load is refused');
  const loading = good.load(state);
  await good.start(null); // not awaiting the load first
  await loading;
  assert.equal(good.vm.state, 'running');
  const bad = mk();
  const broken = bad.load({ ...state, devices: { ...(state.devices as object), clock: 'not a clock' } });
  await assert.rejects(bad.start(null), (e: Error & { code?: string }) => e.code === 'ERR_DEVICE_STATE');
  await assert.rejects(broken, (e: Error & { code?: string }) => e.code === 'ERR_DEVICE_STATE');
  assert.notEqual(bad.vm.state, 'running');
  // Readied for post-copy (pages missing) but started with every page here: it runs without presence checks.
  const hinted = mk();
  await hinted.load(state, { pagesMissing: true });
  assert.equal(hinted.vm.variant, 'presence', 'the load readied the presence-checking variant');
  await hinted.start(null);
  assert.equal(hinted.vm.state, 'running');
  const q0 = hinted.vm.stat().quanta;
  while (hinted.vm.stat().quanta === q0) await new Promise((r) => setTimeout(r, 2));
  assert.equal(hinted.vm.variant, 'plain', 'its guest code runs without presence checks');
});

test('a destination VM that never gets ready fails the pre-copy with ERR_MIGRATION_TIMEOUT; the VM runs on at the source', async (t) => {
  const src = await source('mem=4MiB rate=1');
  const [a, b] = memoryPair();
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  class NeverReady extends DestinationVmAdapter {
    override warm(): Promise<void> {
      return new Promise(() => undefined);
    }
  }
  const never = vmFactory(made, cache, { adapter: (vm) => new NeverReady(vm) });
  const dest = new MigrationAcceptor(deps, { vmReadyWaitMs: 300 }).accept(b, never);
  dest.catch(() => undefined);
  await assert.rejects(migrateSource(a, sourceVmOf(src), deps, { mode: 'precopy', baselineMs: 0 }), (e: FerryError) => e.code === 'ERR_MIGRATION_TIMEOUT' && /not ready to start/.test(e.message));
  await assert.rejects(dest, (e: FerryError) => e.code === 'ERR_MIGRATION_TIMEOUT');
  assert.equal(src.state, 'running', 'the VM runs on at the source');
});

test('post-copy with a fault channel: while a fault is outstanding, no pushed page is applied before the demanded one', async (t) => {
  const src = await source('mem=24MiB wss=24MiB pattern=uniform rate=40000000');
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  // The destination's clock never lets the priority wait time out, so the order below is the
  // mechanism's alone (the real one gives up after a few ms, for a demand page that is slow).
  const real = deps.clock;
  const destDeps = { ...deps, clock: { now: () => real.now(), sleep: (_ms: number, signal?: AbortSignal) => new Promise<void>((_r, reject) => signal?.addEventListener('abort', () => reject(new Error('aborted')))) } };
  const events: ['fault' | 'install', number][] = [];
  let started = false;
  class Recording extends DestinationVmAdapter {
    override onFault(handler: (page: number) => void): void {
      super.onFault((p) => { events.push(['fault', p]); handler(p); });
    }
    override writePage(page: number, data: Uint8Array, offset: number): void {
      if (started) events.push(['install', page]);
      super.writePage(page, data, offset);
    }
    override async start(...args: Parameters<DestinationVmAdapter['start']>): Promise<void> {
      started = true;
      await super.start(...args);
    }
  }
  const dest = await tcpDestination(new MigrationAcceptor(destDeps), vmFactory(made, cache, { adapter: (vm) => new Recording(vm) }));
  try {
    const result = await migrateSource(await tcp().dial(dest.address), sourceVmOf(src), deps, { mode: 'postcopy', connect: () => tcp().dial(dest.address), baselineMs: 0 });
    const o = await dest.outcome();
    assert.equal(result.report.verified, true);
    assert.equal(o.faultChannel, true);
    const installed = new Set<number>();
    let checked = 0;
    for (let i = 0; i < events.length; i++) {
      const [kind, page] = events[i];
      if (kind === 'install') { installed.add(page); continue; }
      if (installed.has(page)) continue; // arrived meanwhile: nothing was requested
      const served = events.findIndex(([k, p], j) => j > i && k === 'install' && p === page);
      assert.ok(served > i, `fault on page ${page} was never served`);
      const between = events.slice(i + 1, served).filter(([k]) => k === 'install');
      assert.deepEqual(between, [], `pushed pages were applied while the vCPU waited for page ${page}`);
      checked++;
    }
    assert.ok(checked >= 5, `too few faults to judge (${checked})`);
  } finally {
    await dest.close();
  }
});

test('post-copy with fault threads: page requests and answers go between threads of their own, every fault is answered, verified', async (t) => {
  const src = await source('mem=24MiB wss=24MiB pattern=uniform rate=100000000');
  const made: Vm[] = [];
  const { listener, threads } = faultThreadsFor(t, src, made);
  const main = await tcpDestination(new MigrationAcceptor(deps, { faultThreads: listener }), factory(made));
  try {
    const result = await migrateSource(await tcp().dial(main.address), sourceVmOf(src), deps, {
      mode: 'postcopy', baselineMs: 0, connect: () => tcp().dial(main.address),
      faultThread: sourceFaultThread(threads, src, '127.0.0.1'),
    });
    const o = await main.outcome();
    assert.equal(result.report.verified, true, 'the source checked the destination digest');
    assert.notEqual(o.verified, false);
    assert.equal(result.report.transfer?.faultChannel, true);
    assert.equal(o.faultChannel, true);
    assert.equal(main.accepted(), 1, 'the fault channel did not join through the migration listener');
    assert.ok(o.faults > 0, 'the guest faulted');
    assert.equal(o.faultLatencyMs.count, o.faults, 'every fault was answered');
    assert.ok(result.report.pages.faulted > 0, 'the source counted the pages its thread served');
    const vm = made[0];
    const p0 = vm.stat().progress;
    for (let i = 0; i < 500 && vm.stat().progress === p0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.ok(vm.stat().progress > p0, 'the guest keeps working on the destination');
  } finally {
    await main.close();
  }
});

test('post-copy with fault threads: the source lost while pages are missing fails the destination by name, and its VM stops when its owner discards it (a vCPU blocked on its fault socket included)', async (t) => {
  const src = await source('mem=24MiB wss=24MiB pattern=uniform rate=100000000');
  const made: Vm[] = [];
  const { listener, threads } = faultThreadsFor(t, src, made);
  const acceptor = new MigrationAcceptor(deps, { faultThreads: listener });
  const ended: Promise<unknown>[] = [];
  const migrations = await tcp().listen({ onConnection: (c) => { ended.push(acceptor.accept(c, factory(made)).then(() => null, (e: unknown) => e)); } });
  t.after(() => migrations.close());
  const conn = await tcp().dial(migrations.address);
  let cut = false;
  const p = migrateSource(conn, sourceVmOf(src), deps, {
    mode: 'postcopy', baselineMs: 0, connect: () => tcp().dial(migrations.address),
    faultThread: sourceFaultThread(threads, src, '127.0.0.1'),
    onProgress: (pr) => {
      // Once the vCPU fetched a page on its own (it will soon wait for another), or, on a
      // machine too busy for that to show yet, a fifth of the way into the push.
      if (!cut && pr.phase === 'postcopy' && ((made[0]?.faultWaits().count ?? 0) > 0 || pr.pagesSent > 1200)) {
        cut = true;
        conn.abort(); // the source is gone, as far as the destination can tell
      }
    },
  });
  await assert.rejects(p, FerryError);
  assert.equal(cut, true, 'the connection was cut in post-copy');
  const err = await ended[0];
  assert.ok(err instanceof FerryError, `the destination failed by name: ${String(err)}`);
  assert.equal(made.length, 1);
  const vm = made[0];
  // The VM ran here and depends on the source: its owner discards it (the host agent does).
  const stopped = vm.stop().then(() => 'stopped');
  assert.equal(await Promise.race([stopped, new Promise((r) => setTimeout(() => r('still stopping after 2 s'), 2000))]), 'stopped');
  assert.equal(vm.state, 'stopped');
});

test('post-copy: a fault thread that cannot be reached, opens too late, or a source without one: the fault channel joins as usual; verified', async (t) => {
  const listener = new FaultThreadListener('127.0.0.1');
  t.after(() => listener.close());
  let lateClosed = false;
  const late = (): Promise<SourceFaultLink> => new Promise((resolve) => setTimeout(() => resolve({
    serve: () => assert.fail('a link that opened too late must not serve'),
    close: () => { lateClosed = true; return Promise.resolve(); },
  }), 3300));
  for (const how of ['unreachable', 'late', 'none'] as const) {
    const src = await source('mem=16MiB wss=16MiB pattern=uniform rate=50000000');
    const made: Vm[] = [];
    t.after(() => stopAll(src, made));
    const main = await tcpDestination(new MigrationAcceptor(deps, { faultThreads: listener }), factory(made));
    try {
      let offered: number | null = null;
      const result = await migrateSource(await tcp().dial(main.address), sourceVmOf(src), deps, {
        mode: 'postcopy', baselineMs: 0, connect: () => tcp().dial(main.address),
        ...(how === 'unreachable' ? { faultThread: (port: number) => { offered = port; return Promise.reject(new FerryError('ERR_TEST', 'no route')); } } : {}),
        ...(how === 'late' ? { faultThread: late } : {}),
      });
      const o = await main.outcome();
      assert.equal(result.report.verified, true, how);
      if (how === 'unreachable') assert.ok(offered !== null && offered > 0, 'the destination named its fault thread port');
      assert.equal(main.accepted(), 2, `${how}: control connection + the fault channel joined through the migration listener`);
      assert.equal(o.faultChannel, true);
      assert.equal(o.faultLatencyMs.count, o.faults, 'every fault was answered');
    } finally {
      await main.close();
    }
  }
  for (let i = 0; i < 100 && !lateClosed; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(lateClosed, true, 'the link that opened too late was closed');
});

test('a fault thread refuses a JOIN whose token no session expects, and one that is not a JOIN, by name', async (t) => {
  const listener = new FaultThreadListener('127.0.0.1');
  t.after(() => listener.close());
  const port = await listener.port();
  const link = listener.expect('ab'.repeat(16));
  for (const first of [
    { type: 'JOIN' as const, token: 'cd'.repeat(16), stream: 0, role: 'fault' as const },
    { type: 'JOIN' as const, token: 'ab'.repeat(16), stream: 1, role: 'data' as const },
    { type: 'PING' as const, seq: 1, time: 0 },
  ]) {
    const framed = new FramedConnection(await tcp().dial(`127.0.0.1:${port}`));
    await framed.send(first);
    const reply = await framed.next();
    assert.equal(reply?.type, 'ERROR', JSON.stringify(first));
    assert.equal((reply as { code: string }).code, 'ERR_MIGRATION_UNKNOWN_SESSION');
    assert.equal(await framed.next(), undefined, 'then it closes');
    framed.abort();
  }
  assert.equal(link.joined, false);
  // The expected session joins, once.
  const ok = new FramedConnection(await tcp().dial(`127.0.0.1:${port}`));
  await ok.send({ type: 'JOIN', token: 'ab'.repeat(16), stream: 0, role: 'fault' });
  assert.deepEqual(await ok.next(), { type: 'ACK', acked: 'JOIN', value: 0 });
  for (let i = 0; i < 100 && !link.joined; i++) await new Promise((r) => setTimeout(r, 5));
  assert.equal(link.joined, true);
  const again = new FramedConnection(await tcp().dial(`127.0.0.1:${port}`));
  await again.send({ type: 'JOIN', token: 'ab'.repeat(16), stream: 0, role: 'fault' });
  assert.equal((await again.next())?.type, 'ERROR', 'a second JOIN for the same session is refused');
  again.abort();
  await link.close();
  assert.equal(await ok.next(), undefined, 'closing the session closes its fault connection');
  ok.abort();
});

test('post-copy with fault threads on a shaped link: their connections are shaped too (every fault waits at least the round trip)', async (t) => {
  const src = await source('mem=16MiB wss=16MiB pattern=uniform rate=20000000');
  const made: Vm[] = [];
  const { listener, threads } = faultThreadsFor(t, src, made);
  const link = { latencyMs: 4 };
  listener.shape = link;
  const clock = deps.clock;
  // The destination shapes its direction of every connection it accepts, the source its own.
  const acceptor = new MigrationAcceptor(deps, { faultThreads: listener });
  const main = await tcpDestination(acceptor, factory(made));
  const dial = async () => shaped(await tcp().dial(main.address), { ...link, clock });
  try {
    const result = await migrateSource(await dial(), sourceVmOf(src), deps, {
      mode: 'postcopy', baselineMs: 0, connect: dial, faultThread: sourceFaultThread(threads, src, '127.0.0.1', link),
    });
    const o = await main.outcome();
    assert.equal(result.report.verified, true);
    assert.equal(main.accepted(), 1, 'the fault channel went between the threads');
    assert.ok(o.faults > 0);
    // 4 ms each way through the threads' shapers: no request can be answered sooner. (The vCPU's
    // own waits may be shorter: a page the push brings while the vCPU waits ends its wait.)
    assert.ok(o.faultServiceMs.p50! >= 8 * 0.9, `requests were answered in ${o.faultServiceMs.p50} ms (median), faster than the shaped round trip`);
  } finally {
    await main.close();
  }
});

test('the pause is stamped when the guest stopped: time a VM says it spent stopped before it could say so counts as downtime', async (t) => {
  const src = await source('mem=8MiB pattern=uniform rate=1000000');
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  const [a, b, close] = await tcpPair();
  const vm = sourceVmOf(src);
  const pause = vm.pause;
  // As a VM that spent 60 ms stopped (exporting its state, say) before it said PAUSED reports it.
  const wrapped = { ...vm, pause: async () => { await pause(); await new Promise((r) => setTimeout(r, 60)); return 60; } };
  const dest = serveDestination(b, factory(made), deps);
  const result = await migrateSource(a, wrapped, deps, { mode: 'precopy', baselineMs: 0 });
  await dest;
  await close();
  assert.equal(result.report.verified, true);
  assert.ok(result.report.downtimeMs! >= 60, `downtime ${result.report.downtimeMs} ms counts the 60 ms the guest was stopped before it said so`);
});

/** `src` as the engine sees it, but its `nth` dirty harvest (from 1) first fills page `page` with `byte`, as the guest could have just then. */
function rewriteAtHarvest(src: Vm, nth: number, page: number, byte: number): SourceVm {
  const vm = sourceVmOf(src);
  const harvest = vm.harvestDirty;
  let harvests = 0;
  return { ...vm, harvestDirty: async () => {
    const dirty = await harvest();
    if (++harvests === nth) {
      src.pageView(page).fill(byte);
      dirty.set(page);
    }
    return dirty;
  } };
}

test('a page sent with content and zeroed before the last round arrives zero (only pages never installed skip the write)', async (t) => {
  const src = await source('mem=4MiB rate=1');
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  // A page memstress filled at init (non-zero) that the idle guest leaves alone.
  let x = -1;
  for (let p = 64; p < src.guestPages && x < 0; p++) if (src.pageView(p).some((b) => b !== 0)) x = p;
  assert.ok(x >= 0, 'memstress filled its region');
  // After the first round has sent it with its content, the page becomes zero and dirty.
  const wrapped = rewriteAtHarvest(src, 1, x, 0);
  const [a, b] = memoryPair();
  const dest = serveDestination(b, factory(made), deps);
  dest.catch(() => undefined); // a mismatch fails the source below
  const result = await migrateSource(a, wrapped, deps, { mode: 'precopy', baselineMs: 0 });
  await dest;
  assert.equal(result.report.verified, true, 'the digests match: the destination zeroed the page it had with content');
  assert.ok(made[0].pageView(x).every((b) => b === 0));
});

test('pages the guest dirties while a round awaits its acknowledgement count in the stop decision and go in the next round', async (t) => {
  // An idle VM: every harvest is empty, so the policy would stop after the first pass. The
  // harvest after ROUND_END's acknowledgement finds a page rewritten meanwhile; with a budget no
  // page fits, that one page keeps pre-copy going for a round that carries it.
  const src = await source('mem=4MiB rate=1');
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  const x = 100;
  // Harvest 1: when the first pass's pages are written; 2: once its ROUND_END is acknowledged.
  const wrapped = rewriteAtHarvest(src, 2, x, 0xa5);
  const [a, b] = memoryPair();
  const dest = serveDestination(b, factory(made), deps);
  dest.catch(() => undefined); // a failure fails the source below
  const result = await migrateSource(a, wrapped, deps, { mode: 'precopy', baselineMs: 0, downtimeMs: 1e-6 });
  await dest;
  const r = result.report;
  assert.equal(r.rounds.length, 2, `rounds ${r.rounds.map((x) => x.pagesSent).join(', ')}`);
  assert.equal(r.rounds[0].dirtyPages, 1, 'the first pass ends with the page dirtied after its pages were written');
  assert.equal(r.rounds[1].pagesSent, 1, 'the next round carries it');
  assert.equal(result.stopReason, 'converged');
  assert.equal(r.verified, true);
  assert.ok(made[0].pageView(x).every((v) => v === 0xa5));
});

test('pre-copy lets the event loop turn between batches as time passes, even when every write completes at once', async (t) => {
  // An idle VM over the in-memory pair (writes never wait) with zstd: batch after batch would
  // follow as promise continuations and the loop would never reach its I/O (a host's endpoints,
  // relays, API). The source's clock here moves 1 ms at every reading, so time passes between any
  // two batches: each is followed by a turn.
  const src = await source('mem=16MiB rate=1');
  const [a, b] = memoryPair();
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  const dest = serveDestination(b, factory(made), deps);
  let ms = 0;
  let turns = 0;
  const flying = {
    ...deps,
    clock: { now: () => ++ms, sleep: deps.clock.sleep },
    yieldToIo: () => { turns++; return deps.yieldToIo(); },
  };
  const result = await migrateSource(a, sourceVmOf(src), flying, { mode: 'precopy', baselineMs: 0, codecs: ['zstd'], maxRounds: 1 });
  await dest;
  assert.equal(result.report.verified, true);
  const batches = Math.ceil(result.report.rounds[0].pagesSent / 256);
  assert.ok(batches >= 16, `the first pass went in ${batches} batches`);
  assert.ok(turns >= batches, `${turns} turns of the event loop for ${batches} batches`);
});

test('pre-copy progress: the first pass shows the dirty rate it has counted so far, close to the one the pass reports at its end', async (t) => {
  // 16 MiB through a 40 MB/s cap: a first pass of ~420 ms in 4 MiB batches (a progress event
  // each) while the guest rewrites 2 MiB of it, counted at most every 20 ms as progress is shown.
  const src = await source('mem=16MiB wss=2MiB pattern=uniform rate=20000000');
  const [a, b, close] = await tcpPair();
  const made: Vm[] = [];
  t.after(() => stopAll(src, made));
  const dest = serveDestination(b, factory(made), deps);
  const events: MigrationProgress[] = [];
  const capped = shaped(a, { bandwidthBytesPerSec: 40e6, clock: deps.clock });
  const result = await migrateSource(capped, sourceVmOf(src), deps, { mode: 'precopy', baselineMs: 0, maxRounds: 2, onProgress: (p) => events.push({ ...p }) });
  await dest;
  await close();
  assert.equal(result.report.verified, true);
  const pass = events.filter((e) => e.phase === 'precopy' && e.round === 0);
  const counted = pass.filter((e) => e.dirtyRateBytesPerSec > 0);
  assert.ok(counted.length >= 3 && counted.length >= pass.length - 1, `the first pass showed a dirty rate in ${counted.length} of its ${pass.length} progress events`);
  // The pass's own figure at its end: its dirty pages over its duration.
  const atEnd = result.report.rounds[0].dirtyRatePagesPerSec! * 4096;
  assert.ok(atEnd > 0);
  const last = counted[counted.length - 1].dirtyRateBytesPerSec;
  assert.ok(last > atEnd / 2 && last < atEnd * 2, `late in the pass ${(last / 1e6).toFixed(1)} MB/s, at its end ${(atEnd / 1e6).toFixed(1)} MB/s`);
});

test('pre-copy: the fixed part of the downtime counts in the stop decision, and the report says what the policy estimated', async (t) => {
  // A guest that keeps its 1 MiB working set dirty: the dirty pages alone fit the default 300 ms
  // budget at once; with a fixed part above the budget, no round can, and pre-copy runs to its limit.
  const runs: MigrationResult[] = [];
  for (const fixedDowntimeMs of [undefined, 1000]) {
    const src = await source('wss=1MiB rate=1000000');
    const made: Vm[] = [];
    t.after(() => stopAll(src, made));
    const [a, b] = memoryPair();
    const dest = serveDestination(b, factory(made), deps);
    dest.catch(() => undefined); // a failure fails the source below
    runs.push(await migrateSource(a, sourceVmOf(src), deps, { mode: 'precopy', baselineMs: 0, maxRounds: 3, ...(fixedDowntimeMs !== undefined ? { fixedDowntimeMs } : {}) }));
    await dest;
  }
  const [plain, fixed] = runs;
  assert.equal(plain.stopReason, 'converged');
  assert.equal(plain.report.rounds.length, 1);
  assert.ok(plain.report.estimatedDowntimeMs! > 0 && plain.report.estimatedDowntimeMs! <= 300, `estimated ${plain.report.estimatedDowntimeMs}`);
  assert.match(formatReportTable(plain.report), /estimated downtime\s+\d+(\.\d+)? (ms|µs) \(the stop policy's, when pre-copy stopped\)/);
  assert.equal(fixed.stopReason, 'round-limit');
  assert.equal(fixed.report.rounds.length, 3);
  assert.ok(fixed.report.estimatedDowntimeMs! > 1000, `estimated ${fixed.report.estimatedDowntimeMs}`);
  for (const r of runs) assert.equal(r.report.verified, true);
});

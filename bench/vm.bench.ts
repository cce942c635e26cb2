/**
 * VM runtime benchmarks (issue: VM runtime). Everything is measured side by side in one run:
 * variant overheads alternate plain / dirty / presence windows inside one running VM, so machine
 * noise hits every variant alike.
 */
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { median, percentile, type BenchContext, type BenchSuite } from './harness.js';
import { Vm } from '../src/node/vm/vm.js';
import { InstrumentCache } from '../src/node/vm/instrument.js';
import { restoreSnapshot, writeSnapshot } from '../src/node/vm/snapshot.js';
import { guestsDir } from '../src/node/paths.js';
import type { VariantName } from '../src/node/vm/control.js';

const cache = new InstrumentCache();
const guest = (name: string) => new Uint8Array(readFileSync(join(guestsDir(), `${name}.wasm`)));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function variantRates(vm: Vm, variants: VariantName[], windows: number, windowMs: number): Promise<Map<VariantName, number[]>> {
  const rates = new Map<VariantName, number[]>(variants.map((v) => [v, []]));
  for (let w = 0; w < windows; w++) {
    for (const v of variants) {
      await vm.switchVariant(v);
      await sleep(5); // let the new variant's code warm up before counting
      const s0 = vm.stat();
      await sleep(windowMs);
      const s1 = vm.stat();
      // Work per unit of vCPU time spent in run(): immune to time the thread spent elsewhere.
      rates.get(v)!.push((s1.progress - s0.progress) / Math.max(1e-9, s1.runMs - s0.runMs));
    }
  }
  return rates;
}

async function overhead(ctx: BenchContext, label: string, guestName: string, config: string, memory: number): Promise<void> {
  const vm = Vm.create({ name: `bench-${label}`, module: guest(guestName), memoryBytes: memory, config, cache, variants: ['plain', 'dirty', 'presence'] });
  await vm.bootCold();
  vm.presenceView().fill(1); // every page present: measures the check itself
  const rates = await variantRates(vm, ['plain', 'dirty', 'presence'], ctx.quick ? 3 : 8, ctx.quick ? 100 : 200);
  await vm.stop();
  const plain = median(rates.get('plain')!);
  const dirty = median(rates.get('dirty')!);
  const presence = median(rates.get('presence')!);
  ctx.report({ metric: `${label}.plain-rate`, value: plain * 1000, unit: 'units/s' });
  ctx.report({ metric: `${label}.dirty-overhead`, value: plain / dirty, unit: '×', ...(label === 'memstress-random' ? { target: '<= 1.15' } : {}) });
  ctx.report({ metric: `${label}.presence-overhead`, value: plain / presence, unit: '×' });
}

async function pauseLatency(ctx: BenchContext): Promise<void> {
  const vm = Vm.create({ name: 'bench-pause', module: guest('memstress'), memoryBytes: 64 << 20, config: 'mem=32MiB', cache });
  await vm.bootCold();
  const lat: number[] = [];
  const n = ctx.quick ? 200 : 1000;
  for (let i = 0; i < n; i++) {
    await sleep(1 + (i % 3));
    const t0 = performance.now();
    await vm.pause();
    lat.push(performance.now() - t0);
    vm.resume();
  }
  await vm.stop();
  ctx.report({ metric: 'pause-latency.p50', value: percentile(lat, 50), unit: 'ms', note: `${n} pauses of memstress` });
  ctx.report({ metric: 'pause-latency.p99', value: percentile(lat, 99), unit: 'ms', target: '<= 2' });
}

async function harvest(ctx: BenchContext): Promise<void> {
  const size = ctx.quick ? 256 << 20 : 1 << 30;
  const vm = Vm.create({ name: 'bench-harvest', module: guest('memstress'), memoryBytes: size, config: `mem=${size - (16 << 20)} wss=${size - (16 << 20)}`, cache });
  await vm.bootCold();
  await vm.startDirtyLog();
  const running: number[] = [];
  const pages: number[] = [];
  for (let i = 0; i < (ctx.quick ? 5 : 20); i++) {
    await sleep(20);
    const t0 = performance.now();
    const bm = await vm.harvestDirty();
    running.push(performance.now() - t0);
    pages.push(bm.count());
  }
  await vm.pause();
  const paused: number[] = [];
  for (let i = 0; i < 10; i++) {
    const t0 = performance.now();
    await vm.harvestDirty();
    paused.push(performance.now() - t0);
  }
  await vm.stop();
  const gib = size / 1024 ** 3;
  ctx.report({ metric: 'harvest.running', value: median(running), unit: 'ms', note: `${gib} GiB VM, median ${median(pages)} dirty pages, includes waiting for the quantum boundary` });
  ctx.report({ metric: 'harvest.paused-scan', value: median(paused), unit: 'ms', note: `${gib} GiB VM, scan + clear only` });
}

async function snapshotThroughput(ctx: BenchContext): Promise<void> {
  const size = ctx.quick ? 128 << 20 : 512 << 20;
  const dir = await mkdtemp(join(tmpdir(), 'ferry-bench-'));
  try {
    const vm = Vm.create({ name: 'bench-snap', module: guest('memstress'), memoryBytes: size, config: `mem=${size - (16 << 20)}`, cache });
    await vm.bootCold();
    await sleep(200);
    await vm.pause();
    const file = join(dir, 'vm.snap');
    const w = await writeSnapshot(vm, file);
    await vm.stop();
    const bytes = (await stat(file)).size;
    const t0 = performance.now();
    const r = await restoreSnapshot(file, { cache, noStart: true });
    const restoreMs = performance.now() - t0;
    ctx.report({ metric: 'snapshot.write', value: bytes / 1e6 / (w.ms / 1000), unit: 'MB/s', note: `${(bytes / 2 ** 20).toFixed(0)} MiB file, ${w.pagesWritten} pages, ${w.ms.toFixed(0)} ms` });
    ctx.report({ metric: 'snapshot.restore', value: bytes / 1e6 / (restoreMs / 1000), unit: 'MB/s', note: `verify + fill, ${restoreMs.toFixed(0)} ms, ${r.pages} pages` });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const suite: BenchSuite = {
  name: 'vm',
  description: 'VM runtime: dirty-log and presence overheads, pause latency, harvest, snapshots',
  async run(ctx) {
    await overhead(ctx, 'memstress-random', 'memstress', 'mem=256MiB pattern=uniform', 320 << 20);
    await overhead(ctx, 'memstress-hot', 'memstress', 'mem=256MiB pattern=hotcold', 320 << 20);
    await overhead(ctx, 'memstress-sequential', 'memstress', 'mem=256MiB pattern=sequential', 320 << 20);
    await overhead(ctx, 'compute', 'compute', '', 16 << 20);
    await pauseLatency(ctx);
    await harvest(ctx);
    await snapshotThroughput(ctx);
  },
};
export default suite;

/**
 * Check 2 of the simulator: a dirty trace recorded from a real ferry VM, replayed in the simulator
 * with the same link, predicts the total migration time and downtime the real engine measures when
 * it migrates that VM, within 10 %.
 *
 * The dirty log has a single consumer, so the trace is recorded just before the migration (the
 * workload, memstress at a paced write rate, is stationary), not during it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Vm } from '../../src/node/vm/vm.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';
import { guestsDir } from '../../src/node/paths.js';
import { recordTrace } from '../../src/node/vm/trace.js';
import { migrateSource } from '../../src/core/engine/source.js';
import { serveDestination } from '../../src/core/engine/destination.js';
import { nodeEngineDeps, sourceVmOf } from '../../src/node/engine/adapters.js';
import { memoryPair } from '../../src/core/transport/memory.js';
import { shaped } from '../../src/core/transport/shaped.js';
import { realClock } from '../../src/node/clock.js';
import { PAGE_SIZE } from '../../src/core/pages.js';
import { decodeTrace, pageCost, runSimVm, TraceReplayDirty } from '../../src/core/sim/index.js';
import { vmFactory } from '../helpers/destination.js';

const cache = new InstrumentCache();
const memstress = new Uint8Array(readFileSync(join(guestsDir(), 'memstress.wasm')));

const bandwidth = 25e6; // 200 Mbit/s
const latencyMs = 1;

/** Migrates `src` (pre-copy) with the real engine over an in-memory link shaped to `bandwidth` and `latencyMs`. */
async function engineMigrate(src: Vm, made: Vm[]) {
  const clock = realClock();
  const [a0, b0] = memoryPair();
  // A shallow token bucket: the link is a steady 200 Mbit/s, without a burst at the start.
  const a = shaped(a0, { bandwidthBytesPerSec: bandwidth, latencyMs, clock, burstBytes: 16384 });
  const b = shaped(b0, { bandwidthBytesPerSec: bandwidth, latencyMs, clock, burstBytes: 16384 });
  const factory = vmFactory(made, cache);
  const deps = nodeEngineDeps();
  const dest = serveDestination(b, factory, deps);
  const result = await migrateSource(a, sourceVmOf(src), deps, { mode: 'precopy', downtimeMs: DOWNTIME_MS, maxRounds: MAX_ROUNDS });
  await dest;
  // The destination's copy is not needed: stop it so it does not compete for CPU with what follows.
  for (const vm of made.splice(0)) await vm.stop();
  return result.report;
}

// Zipf writes over 24 MiB: the dirty set after a round depends on how long the round took, so the
// rounds shrink and the stop decision is the policy's, fed what the simulator measured. The final
// dirty set is large (~1 s to send), so the downtime is dominated by what the simulator models and
// not by the host's fixed costs, which vary by tens of ms from run to run.
const CONFIG = 'mem=32MiB wss=24MiB pattern=zipf zipf=0.8';
const RATE = 'rate=200000';
/** Real migrations of the traced workload; the engine's figures are their medians. */
const RUNS = 3;
const DOWNTIME_MS = 150;
const MAX_ROUNDS = 6;

// Real timings on a machine running other heavy work (load well above its cores) vary by more than the
// 10 % this check allows, whatever the simulator does: the check is skipped then, with the reason.
const load = loadavg()[0];
const overloaded = load > 1.5 * availableParallelism() ? `machine overloaded (load ${load.toFixed(1)} on ${availableParallelism()} cores): real-time comparison not meaningful` : false;

test('check 2: a trace recorded from a real VM predicts the engine\'s TMT and downtime within 10 %', { skip: overloaded }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-sim-engine-'));
  const made: Vm[] = [];
  const warm = Vm.create({ name: 'warm', module: memstress, memoryBytes: 64 << 20, config: `${CONFIG} rate=4000`, cache });
  const src = Vm.create({ name: 'traced', module: memstress, memoryBytes: 64 << 20, config: `${CONFIG} ${RATE}`, cache });
  try {
    // Calibrate the host's fixed costs on a separate, nearly idle VM of the same size: set-up before the
    // first page (handshake, module, destination VM creation) and the fixed part of the downtime
    // (pause, state, verification, starting the destination's vCPU). The simulator takes them as
    // world parameters; nothing from the migration being predicted goes in.
    // (A first migration warms the instrumentation cache, as a long-running host would be.)
    await warm.bootCold();
    await engineMigrate(warm, made);
    // Calibration runs alternate with the real runs, so both see the same machine load; medians of
    // three each, since the fixed costs vary by tens of ms from run to run.
    const calibs: { setupMs: number; goodput: number; fixedDowntimeMs: number }[] = [];
    const calibrate = async (i: number) => {
      const idle = Vm.create({ name: `idle${i}`, module: memstress, memoryBytes: 64 << 20, config: `${CONFIG} rate=4000`, cache });
      await idle.bootCold();
      await new Promise((r) => setTimeout(r, 100));
      const calib = await engineMigrate(idle, made);
      await idle.stop().catch(() => undefined);
      // What the engine actually achieves over this link (framing, copying and pacing included).
      const goodput = (calib.rounds[0].bytesSent / calib.rounds[0].durationMs) * 1000;
      const lastPages = calib.pages.total - calib.rounds.reduce((n, r) => n + r.pagesSent, 0);
      calibs.push({
        setupMs: calib.rounds[0].startMs,
        goodput,
        fixedDowntimeMs: Math.max(0, calib.downtimeMs! - ((lastPages * (PAGE_SIZE + 8) + calib.bytes.state) / goodput) * 1000),
      });
    };

    await calibrate(0);
    await src.bootCold();
    await new Promise((r) => setTimeout(r, 200));
    const file = join(dir, 'memstress.trace');
    const summary = await recordTrace(src, { out: file, intervalMs: 50, durationMs: 3000, guest: 'memstress' });
    assert.ok(summary.intervals >= 40 && summary.dirtyPages > 0);
    const guestPages = src.guestPages;
    let zero = 0;
    for (let p = 0; p < guestPages; p++) if (src.pageView(p).every((x) => x === 0)) zero++;
    const reals = [await engineMigrate(src, made)];
    // The same workload (same seed, same pacing) again on fresh VMs: the engine's figures vary by a
    // few per cent from run to run on a busy machine, so the prediction is compared with the medians.
    for (let i = 1; i < RUNS; i++) {
      await calibrate(i);
      const again = Vm.create({ name: `traced${i}`, module: memstress, memoryBytes: 64 << 20, config: `${CONFIG} ${RATE}`, cache });
      await again.bootCold();
      await new Promise((r) => setTimeout(r, 200));
      reals.push(await engineMigrate(again, made));
      await again.stop().catch(() => undefined);
    }
    const med = (k: 'setupMs' | 'goodput' | 'fixedDowntimeMs') => calibs.map((c) => c[k]).sort((x, y) => x - y)[calibs.length >> 1];
    const setupMs = med('setupMs');
    const goodput = med('goodput');
    const fixedDowntimeMs = med('fixedDowntimeMs');
    const byTmt = [...reals].sort((x, y) => x.totalMigrationTimeMs! - y.totalMigrationTimeMs!);
    const real = byTmt[RUNS >> 1];
    const realDowntime = reals.map((r) => r.downtimeMs!).sort((x, y) => x - y)[RUNS >> 1];

    // The simulation: the same VM size and page mix, the same link, the recorded writes.
    const trace = decodeTrace(new Uint8Array(await readFile(file)));
    const dirty = new TraceReplayDirty(trace, { pageCount: guestPages });
    const z = zero / guestPages;
    // ferry's PAGES frames: 8 bytes of header per page, zero pages carry no data.
    const cost = pageCost({ zero: { fraction: z, ratio: 8 / PAGE_SIZE, cpuNsPerPage: 0 }, random: { fraction: 1 - z, ratio: (PAGE_SIZE + 8) / PAGE_SIZE, cpuNsPerPage: 0 } }, 'compress');
    const sim = runSimVm(
      { name: 'traced', memoryBytes: guestPages * PAGE_SIZE, pageSize: PAGE_SIZE, dirty, cost: { ...cost }, stateBytes: 4096 },
      // The shaped connection's default queue (bandwidth-delay product + 1 MiB) is the sender's buffer.
      { bandwidth: goodput, latencyMs, sendBufferBytes: Math.ceil((bandwidth * latencyMs) / 1000) + (1 << 20), technique: 'precopy', options: { downtimeBudgetMs: DOWNTIME_MS, maxRounds: MAX_ROUNDS, setupMs, resumeMs: fixedDowntimeMs } },
    ).result.report;

    const finalPages = (r: typeof real) => r.pages.total - r.rounds.reduce((n, x) => n + x.pagesSent, 0);
    const line = (r: typeof real) => `TMT ${r.totalMigrationTimeMs?.toFixed(0)} ms, downtime ${r.downtimeMs?.toFixed(1)} ms (${finalPages(r)} pages, state ${r.bytes.state} B), rounds ${r.rounds.length} [${r.rounds.map((x) => x.dirtyPages).join(' ')}], wire ${r.bytes.wire}`;
    const msg = `engine runs: TMT ${reals.map((r) => r.totalMigrationTimeMs!.toFixed(0)).join(', ')} ms; downtime ${reals.map((r) => r.downtimeMs!.toFixed(0)).join(', ')} ms\ncalibration: set-up ${setupMs.toFixed(1)} ms, goodput ${(goodput / 1e6).toFixed(2)} MB/s, fixed downtime ${fixedDowntimeMs.toFixed(1)} ms\nengine: ${line(real)}\nsim:    ${line(sim)}\nengine rounds ${JSON.stringify(real.rounds)} prep ${real.preparationTimeMs} resume ${real.resumeTimeMs}\nsim rounds ${JSON.stringify(sim.rounds)} prep ${sim.preparationTimeMs}`;
    t.diagnostic(msg);
    const rel = (x: number | null, y: number | null) => Math.abs(x! - y!) / y!;
    assert.ok(rel(sim.totalMigrationTimeMs, real.totalMigrationTimeMs) <= 0.1, `TMT off by more than 10 %\n${msg}`);
    assert.ok(rel(sim.downtimeMs, realDowntime) <= 0.1, `downtime off by more than 10 %\n${msg}`);
  } finally {
    await src.stop().catch(() => undefined);
    await warm.stop().catch(() => undefined);
    for (const vm of made) await vm.stop().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
});

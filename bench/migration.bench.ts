/**
 * Migration benchmarks: the engine (src/core/engine) moving real memstress VMs over loopback TCP,
 * with every baseline measured in the same run:
 *
 * - pre-copy of an idle VM whose memory is random (nothing to compress, nothing to skip) vs raw
 *   node:net moving the same bytes (the faster of a raw run just before and one just after each
 *   migration) — the engine's cost over the wire it runs on — and vs raw
 *   node:net whose receiver copies the bytes into fresh shared Wasm memory, the least any
 *   migration must do (fresh memory costs a page fault per 4 KiB page on first write); beside
 *   them (informational) raw TCP between two processes, and the CPU time the migration took
 *   against raw's;
 * - downtime vs its physical floor: final dirty bytes ÷ bandwidth + one round trip + state bytes ÷
 *   bandwidth, with bandwidth and round trip measured on the same loopback, the bandwidth just
 *   before and just after each run; beside it (informational) what waking a sleeping thread costs
 *   on this machine, which the floor never pays and a downtime pays at every hand-off;
 * - post-copy fault latency under random writes, as the vCPU waited for it (destination) and as
 *   the source's report histogram has it (request in → page out): the median of 5 migrations'
 *   percentiles;
 * - memstress with writable working sets of 1/8, 1/4, 1/2 of memory dirtying below and above the
 *   link rate (1 Gbit/s through the shaper) in all three modes: TMT, downtime, bytes, verified.
 *
 * The destination runs in a child process (bench/destination-host.ts), so the two engines have an
 * event loop each, as on two hosts; both share this machine's 2 cores. As `ferry migrate` does by
 * default, pre-copy and hybrid send pages on one data stream per core (each past the first from a
 * thread of its own; FERRY_BENCH_STREAMS=1 for one), post-copy on one here, and post-copy page
 * requests travel on a connection of their own (the fault channel).
 *
 * For profiling one part: FERRY_BENCH_MIGRATION_PARTS=precopy-idle[,downtime,…] runs only those
 * parts, FERRY_BENCH_REPS=n repeats the idle pre-copy and the downtime migration n times (default
 * 7: single runs here swing by 2× either way, and the idle pre-copy's median of 3 read 0.82–0.91
 * in six runs of one day; each run is logged: the pre-copy's with where its time went and the CPU time of both processes).
 */
import net from 'node:net';
import { availableParallelism } from 'node:os';
import { median, percentile, section, settle, type BenchContext, type BenchSuite } from './harness.js';
import { benchCongestionText, connect, pinServer } from './congestion.js';
import { rawTcp, rawTcpIntoFreshMemory } from './transport.bench.js';
import { burstFloor } from './burst-floor.js';
import { exchangeFloor, threadWake } from './latency-floor.js';
import { DestinationProcess, faultThreadPriority, memstressVm, cpuMs, type LinkInit, type Outcome } from './destination-host.js';
import { FAULT_THREAD_NICE, FAULT_THREAD_RT_PRIORITY, REALTIME_VCPU_NICE } from '../src/node/engine/thread-priority.js';
import type { MigrationOptions, MigrationResult } from '../src/core/engine/types.js';
import type { MigrationReport } from '../src/core/metrics.js';
import type { MigrationMode } from '../src/core/protocol/frames.js';
import { Vm } from '../src/node/vm/vm.js';
import { defaultStreams } from '../src/node/agent/agent.js';
import { pageHashBackend, pageHashIsa } from '../src/node/vm/page-hash.js';

const MiB = 1 << 20;
const PAGE = 4096;
const fmtMiB = (b: number) => `${(b / MiB).toFixed(1)} MiB`;


interface Run {
  result: MigrationResult;
  outcome: Outcome;
  /** CPU time (user + system, all threads) this process spent on the migration. */
  cpuMs: number;
  report: MigrationReport;
}

let destination: DestinationProcess | undefined;

/**
 * Data streams per migration: what `ferry migrate` opens by default here (defaultStreams: for
 * pre-copy and hybrid one per core, each past the first sent from a thread of its own; for
 * post-copy one here). FERRY_BENCH_STREAMS=n sets another count, e.g. 1 to compare.
 */
const streamsFor = (mode: MigrationMode) => Number(process.env.FERRY_BENCH_STREAMS ?? defaultStreams(mode));

/**
 * Migrates `src` to a fresh VM in the destination process (bench/destination-host.ts) over
 * loopback TCP (both directions shaped when `link` is given), then stops the source.
 */
async function migrate(src: Vm, opts: MigrationOptions, link?: LinkInit, to: DestinationProcess = destination!): Promise<Run> {
  const cpu0 = process.cpuUsage();
  const [r] = await to.migrate([src], { streams: streamsFor(opts.mode), ...opts }, link);
  return { ...r, report: r.result.report, cpuMs: cpuMs(cpu0) };
}

/** Round trip of one byte over a fresh loopback socket: median of `n`. */
async function loopbackRttMs(n: number): Promise<number> {
  const server = net.createServer((s) => s.on('data', (d) => s.write(d)));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const { port } = pinServer(server).address() as net.AddressInfo;
  const sock = connect(port, { noDelay: true });
  await new Promise<void>((r) => sock.once('connect', () => r()));
  const rtts: number[] = [];
  const one = new Uint8Array([1]);
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await new Promise<void>((r) => { sock.once('data', () => r()); sock.write(one); });
    rtts.push(performance.now() - t0);
  }
  sock.destroy();
  server.close();
  return median(rtts);
}

/** Where a pre-copy's time went: set-up (handshake, module, destination VM readied) → rounds → pause → downtime → COMPLETE (the end of TMT), then the source's digest check and release (in the eviction time). */
function phases(run: Run): string {
  const r = run.report;
  const ms = (x: number) => `${x.toFixed(0)} ms`;
  const setup = r.rounds[0]?.startMs ?? 0;
  const rounds = r.rounds.reduce((s, x) => s + x.durationMs, 0);
  const toPause = r.preparationTimeMs! - setup - rounds;
  const ready = run.outcome.readyMs === null ? '' : ` (destination VM ready in ${ms(run.outcome.readyMs)})`;
  const check = r.evictionTimeMs! - r.totalMigrationTimeMs!;
  return `set-up ${ms(setup)}${ready} + rounds ${ms(rounds)} + to pause ${ms(toPause)} + downtime ${r.downtimeMs!.toFixed(1)} ms + to COMPLETE ${ms(r.resumeTimeMs!)}; then digest check and release ${ms(check)}`;
}

/** Pages sent after the pause (stop-and-copy): everything not counted in a pre-copy round. */
function finalRoundBytes(r: MigrationReport): number {
  return r.bytes.total - r.rounds.reduce((s, x) => s + x.bytesSent, 0);
}

// ---------------------------------------------------------------------------------------------

/** What raw TCP sends in the baselines: 1 MiB that does not compress, written again and again. */
const block = new Uint8Array(MiB).map((_, i) => (i * 2654435761) >>> 24);

async function precopyIdle(ctx: BenchContext, mem: number, reps: number): Promise<void> {
  const ratios: number[] = [];
  const evictRatios: number[] = [];
  const freshRatios: number[] = [];
  const rates: number[] = [];
  const freshRates: number[] = [];
  const setups: number[] = [];
  const tmts: number[] = [];
  const cpuRatios: number[] = [];
  let last: Run | undefined;
  await rawTcp(32 * MiB, block); // warm-up
  await rawTcpIntoFreshMemory(32 * MiB, block);
  let cold: { tmt: number; ratio: number; run: Run } | null = null;
  for (let i = -1; i < reps; i++) {
    // Run -1 meets a destination host that has had no VM of this shape yet: its guest memory is
    // fresh and must be faulted in. Every later run finds the memory the previous VM gave back in
    // the host's pool (zeroed, backed), as on a host whose VMs come and go.
    const src = await memstressVm(`idle-${i + 1}`, mem, 'rate=1');
    await settle();
    // Raw TCP just before and just after each migration, the faster counted: one raw run slowed
    // by a hiccup of this shared machine (seen at 0.27 GB/s, against 1.1-1.5) flattered every
    // ratio against it.
    const beforeBytes = mem + MiB;
    const rawBefore = await rawTcp(beforeBytes, block);
    await settle();
    // No work-rate baseline: an idle guest has no work rate to degrade, and the engine counts the
    // baseline's sleep (200 ms by default) into TMT for now ('start' is stamped t=0, later events
    // relative to the session's creation, before the sleep).
    const run = await migrate(src, { mode: 'precopy', baselineMs: 0 });
    const wire = run.report.bytes.wire;
    const total = Math.ceil(wire / MiB) * MiB;
    await settle();
    const rawCpu0 = process.cpuUsage();
    const rawAfter = await rawTcp(total, block);
    const rawAfterCpu = cpuMs(rawCpu0);
    const rawMs = Math.min(rawAfter, rawBefore * (total / beforeBytes));
    await settle();
    const freshMs = await rawTcpIntoFreshMemory(total, block);
    const tmt = run.report.totalMigrationTimeMs!;
    ctx.log(`precopy-idle run ${i < 0 ? 'cold' : i}: TMT ${tmt.toFixed(0)} ms = ${phases(run)}; destination memory ${run.outcome.pooled ? 'from the pool' : 'fresh'}; CPU source ${run.cpuMs.toFixed(0)} ms, destination ${run.outcome.cpuMs.toFixed(0)} ms; raw ${rawMs.toFixed(0)} ms (before ${(rawBefore * (total / beforeBytes)).toFixed(0)}, after ${rawAfter.toFixed(0)}), raw into fresh memory ${freshMs.toFixed(0)} ms`);
    if (i < 0) {
      cold = { tmt, ratio: rawMs / tmt, run };
      continue;
    }
    ratios.push(rawMs / tmt);
    tmts.push(tmt);
    cpuRatios.push((run.cpuMs + run.outcome.cpuMs) / (rawAfterCpu * (wire / total)));
    evictRatios.push(rawMs / run.report.evictionTimeMs!);
    freshRatios.push(freshMs / tmt);
    rates.push(wire / 1e6 / rawMs);
    freshRates.push(wire / 1e6 / freshMs);
    setups.push(run.report.rounds[0]?.startMs ?? NaN);
    last = run;
  }
  const r = last!.report;
  const rate = (x: number) => `${x.toFixed(2)} GB/s`;
  ctx.report({
    metric: 'precopy-idle.vs-raw-tcp', value: median(ratios), unit: '×', target: '>= 0.9',
    note: `raw time (the faster of raw just before and just after each migration) ÷ TMT; destination memory from the host's pool; ${fmtMiB(mem)} random, idle; TMT ${r.totalMigrationTimeMs!.toFixed(0)} ms for ${fmtMiB(r.bytes.wire)} on the wire (${rate(r.bytes.wire / 1e6 / r.totalMigrationTimeMs!)}) vs raw ${rate(median(rates))}; ${r.rounds.length} rounds; page hashes for the digest: ${pageHashBackend() === 'native' ? `native XXH3 (${pageHashIsa()})` : 'XXH3 from @node-rs/xxhash (the native library was not built)'}; ${benchCongestionText()}; median of ${reps}`,
  });
  ctx.report({
    metric: 'precopy-idle.vs-raw-tcp.through-check', value: median(evictRatios), unit: '×',
    note: `raw time ÷ eviction time: TMT plus the source's digest of its paused memory, the comparison with the destination's and the release (${(r.evictionTimeMs! - r.totalMigrationTimeMs!).toFixed(0)} ms in the last run); median of ${reps}`,
  });
  ctx.report({
    metric: 'precopy-idle.vs-raw-tcp-into-fresh-memory', value: median(freshRatios), unit: '×',
    note: `raw-into-fresh time ÷ TMT: the same raw node:net transfer, its receiver copying every byte into a fresh shared WebAssembly.Memory (page faults included) at ${rate(median(freshRates))}; the migrations' destination memory came from the host's pool, so above 1 means the pool saved more than the engine costs; median of ${reps}`,
  });
  if (cold) {
    ctx.report({
      metric: 'precopy-idle.cold-destination.vs-raw-tcp', value: cold.ratio, unit: '×',
      note: `the same, to a destination host with no memory of this shape in its pool (fresh memory faulted in while the VM is readied: ${cold.run.outcome.readyMs?.toFixed(0) ?? '?'} ms); TMT ${cold.tmt.toFixed(0)} ms; one run`,
    });
  }
  // The target's raw baseline is one process, its sender and receiver on one thread. Between two
  // processes, as between two hosts, the same bytes took 102-146 ms against 120-204 in one process
  // on the day this line was added: the one-process baseline flatters nothing.
  await settle();
  const twoProcesses = median(await burstFloor(r.bytes.wire, 3));
  ctx.report({
    metric: 'precopy-idle.vs-raw-tcp-two-processes', value: twoProcesses / median(tmts), unit: '×',
    note: `informational: ${fmtMiB(r.bytes.wire)} written by one process, read straight into shared memory by another (median of 3: ${twoProcesses.toFixed(0)} ms) ÷ the median TMT (${median(tmts).toFixed(0)} ms)`,
  });
  ctx.report({
    metric: 'precopy-idle.cpu-vs-raw-tcp', value: median(cpuRatios), unit: '×',
    note: `informational: CPU time (all threads) of both processes over the migration ÷ raw TCP's for the same bytes (one process, one busy thread: its CPU time is about its time). Raw needs one core; the migration needs this many times its CPU, the source's digest of its paused memory after TMT included, on ${availableParallelism()} cores; median of ${reps}`,
  });
  ctx.report({ metric: 'precopy-idle.tmt', value: r.totalMigrationTimeMs!, unit: 'ms', note: `${phases(last!)}; destination start ${last!.outcome.startMs.toFixed(1)} ms with nothing left to send, verified ${r.verified}` });
  ctx.report({ metric: 'precopy-idle.set-up', value: median(setups), unit: 'ms', note: `start → first round (handshake, module, destination memory ready); the destination's vCPU thread loads during the first round (VM ready to start after ${last!.outcome.readyMs?.toFixed(0) ?? '?'} ms in the last run); median of ${reps}` });
}

/** The same idle pre-copy through a 1 Gbit/s shaped link: does the engine fill a link it can outrun? */
async function precopyIdleOnLink(ctx: BenchContext, mem: number): Promise<void> {
  const cap = 125e6;
  const src = await memstressVm('idle-link', mem, 'rate=1');
  const run = await migrate(src, { mode: 'precopy' }, { bandwidthBytesPerSec: cap });
  const r = run.report;
  const round0 = r.rounds[0];
  ctx.report({
    metric: 'precopy-idle-1gbit.vs-cap', value: round0.bytesSent / (round0.durationMs / 1000) / cap, unit: '×',
    note: `first pass ${fmtMiB(round0.bytesSent)} in ${round0.durationMs.toFixed(0)} ms; TMT ${r.totalMigrationTimeMs!.toFixed(0)} ms (${((r.bytes.wire / (r.totalMigrationTimeMs! / 1000)) / cap).toFixed(2)}× cap over the whole migration)`,
  });
}

/**
 * Downtime against its floor, each run against a floor measured around it: raw loopback TCP just
 * before and just after the migration, the faster counted (the stricter floor). This machine's
 * speed swings between runs (a 16 MiB burst between two processes took 11 ms in one run and 19 ms
 * in the next, same code), so a floor measured a minute earlier flattered some runs and failed
 * others.
 */
async function downtimeFloor(ctx: BenchContext, mem: number, reps: number): Promise<void> {
  const rtt = await loopbackRttMs(200);
  // A hot 16 MiB written at 4 MB/s (≈ 500 k random writes/s): a full final round at every pause.
  const wss = Math.min(16 * MiB, mem / 4);
  const rawBytes = 4 * wss;
  // The median of `reps` migrations: one run on this machine swings by 2× either way.
  const runs: { run: Run; fin: number; floor: number; bandwidth: number }[] = [];
  for (let i = 0; i < reps; i++) {
    const src = await memstressVm(`downtime-${i}`, mem, `wss=${wss} rate=4000000`);
    await settle();
    const before = await rawTcp(rawBytes, block);
    await settle();
    const run = await migrate(src, { mode: 'precopy' });
    await settle();
    const after = await rawTcp(rawBytes, block);
    const bandwidth = rawBytes / (Math.min(before, after) / 1000);
    const fin = finalRoundBytes(run.report);
    const floor = (fin / bandwidth) * 1000 + rtt + (run.report.bytes.state / bandwidth) * 1000;
    ctx.log(`downtime run ${i}: ${run.report.downtimeMs!.toFixed(2)} ms (final round ${fmtMiB(fin)}, destination start ${run.outcome.startMs.toFixed(2)} ms, verified ${run.report.verified}); raw ${(rawBytes / 1e6 / before).toFixed(2)} GB/s before, ${(rawBytes / 1e6 / after).toFixed(2)} after; floor ${floor.toFixed(2)} ms, ratio ${(run.report.downtimeMs! / floor).toFixed(2)}`);
    runs.push({ run, fin, floor, bandwidth });
  }
  runs.sort((a, b) => a.run.report.downtimeMs! / a.floor - b.run.report.downtimeMs! / b.floor);
  const { run, fin, floor, bandwidth } = runs[runs.length >> 1];
  const r = run.report;
  const all = runs.map((x) => x.run.report.downtimeMs!).sort((a, b) => a - b);
  const parts = r.downtimeParts ? `the source sending ${r.downtimeParts.sourceMs.toFixed(1)} ms, then the destination ${r.downtimeParts.destinationMs.toFixed(1)} ms (medians of all runs: ${median(runs.map((x) => x.run.report.downtimeParts?.sourceMs ?? NaN)).toFixed(1)} and ${median(runs.map((x) => x.run.report.downtimeParts?.destinationMs ?? NaN)).toFixed(1)} ms); ` : '';
  ctx.report({ metric: 'downtime', value: r.downtimeMs!, unit: 'ms', note: `the median run of ${reps} by ratio (downtimes ${all.map((x) => x.toFixed(1)).join(', ')} ms): ${parts}final round ${fmtMiB(fin)}, state ${r.bytes.state} B, ${r.rounds.length} pre-copy rounds, destination start (switchover → running) ${run.outcome.startMs.toFixed(1)} ms, verified ${runs.every((x) => x.run.report.verified)}` });
  const bws = runs.map((x) => x.bandwidth / 1e9);
  ctx.report({ metric: 'downtime.floor', value: floor, unit: 'ms', note: `that run's floor: final ÷ ${(bandwidth / 1e9).toFixed(2)} GB/s (raw loopback TCP of ${fmtMiB(rawBytes)}, the faster of just before and just after it; ${Math.min(...bws).toFixed(2)}–${Math.max(...bws).toFixed(2)} GB/s over the ${reps} runs) + RTT ${(rtt * 1000).toFixed(0)} µs + state ÷ bandwidth` });
  ctx.report({ metric: 'downtime.vs-floor', value: r.downtimeMs! / floor, unit: '×', target: '<= 1.2', note: `median of ${reps} runs' ratios, each against its own floor (${runs.map((x) => (x.run.report.downtimeMs! / x.floor).toFixed(2)).join(', ')}); ${benchCongestionText()}` });
  // The same bytes as one burst between two processes (no engine code): the bulk floor above
  // leaves out that the two ends wait to be scheduled for each other.
  await settle();
  const bursts = await burstFloor(fin, 7);
  const burst = median(bursts) + (r.bytes.state / bandwidth) * 1000;
  ctx.report({ metric: 'downtime.burst-floor', value: burst, unit: 'ms', note: `${fmtMiB(fin)} written by one process, read straight into shared memory by another, answered with one byte (median of ${bursts.length}: ${bursts[0].toFixed(1)}–${bursts[bursts.length - 1].toFixed(1)} ms) + state ÷ bandwidth` });
  ctx.report({ metric: 'downtime.vs-burst-floor', value: r.downtimeMs! / burst, unit: '×', note: 'informational: the target above is against the bulk floor' });
  // And split over as many connections as the migrations' final rounds were, written as the
  // engine writes them: what two processes can do with the engine's streams, still without it.
  const streams = r.transfer?.streams ?? 1;
  if (streams > 1) {
    await settle();
    const split = await burstFloor(fin, 7, 300, streams);
    const splitMs = median(split) + (r.bytes.state / bandwidth) * 1000;
    ctx.report({ metric: `downtime.burst-floor-${streams}-streams`, value: splitMs, unit: 'ms', note: `the same burst over ${streams} connections, the first written by the main thread and each other by a thread of its own, read by one event loop (median of ${split.length}: ${split[0].toFixed(1)}–${split[split.length - 1].toFixed(1)} ms) + state ÷ bandwidth; the ${reps} downtimes' median ÷ this: ${(median(all) / splitMs).toFixed(2)}; informational` });
  }
  // What each hand-off between threads costs on this machine (see threadWake): the floors cross none.
  await settle();
  const wakes = await threadWake(200);
  ctx.report({ metric: 'machine.thread-wake.p50', value: percentile(wakes, 50), unit: 'ms', note: `a thread asleep in Atomics.wait 5–25 ms, woken by one that keeps its own core (${wakes.length} wakes; p90 ${percentile(wakes, 90).toFixed(3)} ms); informational` });
  ctx.report({ metric: 'machine.thread-wake.p99', value: percentile(wakes, 99), unit: 'ms', note: `max ${wakes[wakes.length - 1].toFixed(2)} ms; a downtime waits on several such wakes in a row, the floors above on none` });
}

async function postcopyFaults(ctx: BenchContext, mem: number, reps: number): Promise<void> {
  // The hosts' default scheduling carries the targets; the one an experiment on fault latency may
  // choose (real-time fault threads, the vCPU at nice -10 for all of post-copy, not only while it
  // waits for a page) is measured beside it (see FaultThreadPriority and POSTCOPY_VCPU_NICE).
  await postcopyFaultsWith(ctx, mem, destination!, 'postcopy', true, reps);
  await settle();
  const rt = await DestinationProcess.start('realtime', REALTIME_VCPU_NICE);
  try {
    await postcopyFaultsWith(ctx, mem, rt, 'postcopy.realtime', false, reps);
  } finally {
    rt.stop();
  }
}

/** Post-copy runs per setting: one migration's p99 (some 8000 faults) swings by 2-5× between runs here. */
const POSTCOPY_REPS = 5;

async function postcopyFaultsWith(ctx: BenchContext, mem: number, dest: DestinationProcess, label: string, targets: boolean, reps: number): Promise<void> {
  const runs: Run[] = [];
  for (let i = 0; i < reps; i++) {
    // Random 8-byte writes over the whole region, 40 MB/s of writes: nearly every write lands on a
    // page that has not arrived yet, until the push catches up.
    const src = await memstressVm('faults', mem, 'pattern=uniform rate=40000000');
    const run = await migrate(src, { mode: 'postcopy' }, undefined, dest);
    const d = run.outcome.faultLatencyMs;
    ctx.log(`${label} run ${i}: vCPU wait p50 ${d.p50?.toFixed(3)} ms, p99 ${d.p99?.toFixed(3)} ms over ${run.outcome.faults} faults; service p99 ${run.outcome.faultServiceMs.p99?.toFixed(3)} ms; TMT ${run.report.totalMigrationTimeMs!.toFixed(0)} ms, verified ${run.report.verified}`);
    runs.push(run);
    await settle();
  }
  // Each figure is the median over the runs, with every run's value in its note.
  const each = (f: (r: Run) => number | null | undefined) => runs.map((r) => f(r) ?? NaN);
  const med = (f: (r: Run) => number | null | undefined) => median(each(f));
  const list = (f: (r: Run) => number | null | undefined, digits = 3) => each(f).map((x) => x.toFixed(digits)).join(', ');
  const all = (f: (r: Run) => number | null | undefined) => (reps === 1 ? 'one run' : `median of ${reps} runs: ${list(f)}`);
  const got = faultThreadPriority(dest.faultPriority);
  const vcpu = dest.vcpuNice === 0 ? '' : `, the vCPU at nice ${dest.vcpuNice} while pages are missing`;
  const threads = runs[0].report.transfer?.faultChannel ? `fault threads ${{ realtime: `SCHED_FIFO ${FAULT_THREAD_RT_PRIORITY}`, nice: `at nice ${FAULT_THREAD_NICE}`, default: 'at the default priority' }[got]}${got === dest.faultPriority ? '' : ` (${dest.faultPriority} was not permitted)`}${vcpu}` : 'no fault threads';
  const note = `${list((r) => r.outcome.faults, 0)} faults, ${fmtMiB(mem)} uniform random writes, ${threads}; TMT ${list((r) => r.report.totalMigrationTimeMs, 0)} ms, verified ${runs.every((r) => r.report.verified)}`;
  const target = (t: string) => (targets ? { target: t } : {});
  ctx.report({ metric: `${label}.fault-latency.p50`, value: med((r) => r.outcome.faultLatencyMs.p50), unit: 'ms', ...target('<= 0.2'), note: `the vCPU's wait for each fault, measured in its thread (stopped → running on), ${all((r) => r.outcome.faultLatencyMs.p50)}; ${note}` });
  ctx.report({ metric: `${label}.fault-latency.p99`, value: med((r) => r.outcome.faultLatencyMs.p99), unit: 'ms', ...target('<= 1'), note: `${all((r) => r.outcome.faultLatencyMs.p99)}; max ${list((r) => r.outcome.faultLatencyMs.max, 2)} ms` });
  ctx.report({ metric: `${label}.fault-service.p50`, value: med((r) => r.outcome.faultServiceMs.p50), unit: 'ms', note: `request sent → page installed: the network round trip and the source's thread (the vCPU sends and installs itself; the rest of its wait is noting the fault and running on), ${all((r) => r.outcome.faultServiceMs.p50)}` });
  ctx.report({ metric: `${label}.fault-service.p99`, value: med((r) => r.outcome.faultServiceMs.p99), unit: 'ms', note: all((r) => r.outcome.faultServiceMs.p99) });
  ctx.report({ metric: `${label}.report-fault-latency.p50`, value: med((r) => r.report.postcopy.faultLatencyMs.p50), unit: 'ms', ...target('<= 0.2'), note: `source report histogram (request in → page sent), ${all((r) => r.report.postcopy.faultLatencyMs.p50)}` });
  ctx.report({ metric: `${label}.report-fault-latency.p99`, value: med((r) => r.report.postcopy.faultLatencyMs.p99), unit: 'ms', ...target('<= 1'), note: all((r) => r.report.postcopy.faultLatencyMs.p99) });
  // The same machine's floor for a fault's round trip, measured right after (see latency-floor.ts).
  // Its load: a stream at the rate the runs pushed (pushed bytes over the whole migration time).
  const pushRate = med((r) => r.report.bytes.pushed / (r.report.totalMigrationTimeMs! / 1000));
  const f = await exchangeFloor(Math.max(200, med((r) => r.outcome.faultLatencyMs.count)), pushRate, 1, got);
  const fmt = (xs: number[]) => `p50 ${percentile(xs, 50).toFixed(3)} ms, p99 ${percentile(xs, 99).toFixed(2)} ms`;
  ctx.report({
    metric: `${label}.fault-latency.floor.p99`, value: percentile(f.loaded, 99), unit: 'ms',
    note: `4 KiB request/response between two processes' otherwise idle threads (scheduled as the fault threads: ${got}) while their main threads stream ${(f.bulkBytesPerSec / 1e9).toFixed(2)} GB/s, the runs' push rate (${fmt(f.loaded)}); quiet machine: ${fmt(f.idle)}`,
  });
  ctx.report({ metric: `${label}.fault-service.p99.vs-floor`, value: med((r) => r.outcome.faultServiceMs.p99) / percentile(f.loaded, 99), unit: '×', note: 'the floor is two event-loop threads exchanging 4 KiB; a fault goes between two threads blocked on their sockets, which can beat it' });
}

/**
 * Pre-copy's downtime budget in the working-set runs. The engine's default (300 ms) covers
 * 37 MB at 1 Gbit/s — every working set here would stop after the first pass; 50 ms makes the
 * dirty rate decide, as on a VM whose memory dwarfs what one budget can carry.
 */
const DOWNTIME_BUDGET_MS = 50;

async function workingSets(ctx: BenchContext, mem: number): Promise<void> {
  const link = { bandwidthBytesPerSec: 125e6 }; // 1 Gbit/s each way
  // memstress writes 8 random bytes per write: below the link, pages are dirtied at half its
  // rate, above it at twice (nominal: writes/s × 4 KiB, before writes start hitting pages that
  // are already dirty).
  const rates = { below: (0.5 * link.bandwidthBytesPerSec * 8) / PAGE, above: (2 * link.bandwidthBytesPerSec * 8) / PAGE };
  const modes: MigrationMode[] = ['precopy', 'postcopy', 'hybrid'];
  for (const [wssName, frac] of [['1/8', 1 / 8], ['1/4', 1 / 4], ['1/2', 1 / 2]] as const) {
    for (const [rateName, rate] of Object.entries(rates)) {
      for (const mode of modes) {
        const label = `wss-${wssName}.rate-${rateName}.${mode}`;
        const src = await memstressVm('wss', mem, `wss=${Math.floor(mem * frac)} pattern=uniform rate=${Math.round(rate)}`);
        let run: Run;
        try {
          run = await migrate(src, { mode, downtimeMs: DOWNTIME_BUDGET_MS }, link);
        } catch (e) {
          ctx.report({ metric: `${label}.verified`, value: 0, unit: 'ok', target: '>= 1', note: `migration failed: ${(e as Error).message}` });
          continue;
        }
        const r = run.report;
        // Post-copy (and hybrid once it switched) moves no pages during the downtime.
        const postcopyTail = r.bytes.pushed + r.bytes.faulted > 0 || mode === 'postcopy';
        const fin = postcopyTail ? 0 : finalRoundBytes(r);
        const floor = (fin / link.bandwidthBytesPerSec) * 1000 + (r.bytes.state / link.bandwidthBytesPerSec) * 1000;
        ctx.report({ metric: `${label}.tmt`, value: r.totalMigrationTimeMs!, unit: 'ms', note: `${r.rounds.length} pre-copy rounds; ${run.result.stopReason}; downtime budget ${DOWNTIME_BUDGET_MS} ms` });
        ctx.report({
          metric: `${label}.downtime`, value: r.downtimeMs!, unit: 'ms',
          note: `${postcopyTail ? 'post-copy tail: state only' : `final round ${fmtMiB(fin)}`} → floor ${floor.toFixed(1)} ms + RTT; ${r.estimatedDowntimeMs === null ? '' : `the stop policy estimated ${r.estimatedDowntimeMs.toFixed(1)} ms; `}destination start ${run.outcome.startMs.toFixed(1)} ms`,
        });
        ctx.report({
          metric: `${label}.bytes`, value: r.bytes.wire / MiB, unit: 'MiB',
          note: `${(r.bytes.wire / mem).toFixed(2)}× memory; first ${fmtMiB(r.bytes.firstPass)}, re-sent ${fmtMiB(r.bytes.resent)}, pushed ${fmtMiB(r.bytes.pushed)}, faulted ${fmtMiB(r.bytes.faulted)}${r.postcopy.faults ? `; ${run.outcome.faults} faults p50 ${run.outcome.faultLatencyMs.p50?.toFixed(2)} ms p99 ${run.outcome.faultLatencyMs.p99?.toFixed(2)} ms` : ''}`,
        });
        // The source checks the digest the destination computed (COMPLETE); the destination's own check is null then.
        ctx.report({ metric: `${label}.verified`, value: r.verified === true && run.outcome.verified !== false ? 1 : 0, unit: 'ok', target: '>= 1' });
      }
    }
  }
}

const suite: BenchSuite = {
  name: 'migration',
  description: 'engine: idle pre-copy vs raw TCP, downtime vs its floor, post-copy fault latency, working sets × dirty rates × modes on a 1 Gbit/s link',
  async run(ctx) {
    const q = ctx.quick;
    const big = q ? 64 * MiB : 256 * MiB;
    destination = await DestinationProcess.start();
    try {
      await parts(ctx, q, big);
    } finally {
      destination.stop();
      destination = undefined;
    }
  },
};
export default suite;

/** FERRY_BENCH_MIGRATION_PARTS=precopy-idle,downtime runs only those parts (for profiling one of them). */
const only = process.env.FERRY_BENCH_MIGRATION_PARTS?.split(',').filter(Boolean) ?? null;
const wanted = (name: string) => !only || only.includes(name);

async function parts(ctx: BenchContext, q: boolean, big: number): Promise<void> {
  const reps = Number(process.env.FERRY_BENCH_REPS ?? (q ? 1 : 7));
  if (wanted('precopy-idle')) await section(ctx, 'precopy-idle', () => precopyIdle(ctx, big, reps));
  if (wanted('precopy-idle-1gbit')) await section(ctx, 'precopy-idle-1gbit', () => precopyIdleOnLink(ctx, big));
  // The downtime's ratio to its floor spreads 0.5–2.2 between runs here (the floor's raw TCP
  // alone 0.8–2.5 GB/s), and the median of 7 runs moved 1.03–1.54 between bench runs of the same
  // code on one day: 15 runs narrow the median's spread by about a third.
  const downtimeReps = process.env.FERRY_BENCH_REPS !== undefined || q ? reps : 15;
  if (wanted('downtime')) await section(ctx, 'downtime', () => downtimeFloor(ctx, big, downtimeReps));
  if (wanted('postcopy')) await section(ctx, 'postcopy', () => postcopyFaults(ctx, big, q ? 1 : POSTCOPY_REPS));
  if (wanted('wss')) await section(ctx, 'wss', () => workingSets(ctx, q ? 32 * MiB : 128 * MiB));
}


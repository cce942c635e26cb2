/**
 * Runs a {@link Scenario}: builds the world (hosts with NICs and CPUs, shared links, VMs with their
 * workloads), starts each migration at its time on one virtual clock, and runs every sweep point in
 * a world of its own. Pure: trace files come in through {@link WorldEnv.loadTrace}.
 */
import { VirtualClock } from '../clock.js';
import { InvalidArgumentError } from '../errors.js';
import { formatReportTable, type MigrationReport } from '../metrics.js';
import { formatBytes, formatDuration } from '../units.js';
import { startMigration, type SimMigrationOptions, type SimMigrationResult, type SimVm, type Technique } from './migration.js';
import { FluidNetwork, type ChannelUse, type Resource } from './network.js';
import { ScenarioError, type Content, type Options, type Scenario, type Workload } from './scenario.js';
import type { Trace } from './trace-format.js';
import { ConstantRateDirty, hotColdPages, pageCost, PoissonDirty, TraceReplayDirty, uniformPages, zipfPages, type ContentClass, type ContentClassName, type DirtyModel, type PageCost, type PageDistribution } from './workload.js';

export interface WorldEnv {
  /** Loads a trace named in a scenario (the node edge resolves it against the scenario's directory). */
  loadTrace?: (file: string) => Trace;
  /** Page distributions are stateless: VMs with the same shape share one (Zipf tables are O(pages) to build). */
  distributions?: Map<string, PageDistribution>;
}

export interface MigrationOutcome extends SimMigrationResult {
  from: string;
  to: string;
  startMs: number;
}

/** One run of a sweep: a single VM over a single link. */
export interface SweepPoint {
  workload: string;
  technique: Technique;
  bandwidthBytesPerSec: number;
  /** The dirty rate the point overrode, bytes/s, or null when the workload's own applies. */
  dirtyRateBytesPerSec: number | null;
  stopReason: string;
  totalMigrationTimeMs: number;
  downtimeMs: number;
  wireBytes: number;
  rounds: number;
  faults: number;
  faultLatencyP99Ms: number | null;
  degradationRatio: number | null;
  /** Pages dirty after each pre-copy round. */
  dirtyPerRound: number[];
}

export interface ScenarioResult {
  name: string;
  seed: number;
  migrations: MigrationOutcome[];
  sweeps: { name: string; points: SweepPoint[] }[];
  /** Virtual time at which the last migration completed, ms. */
  endMs: number;
  /** Simulator events run. */
  events: number;
}

/** Builds a workload's dirty model for a VM of `memoryBytes`; `dirtyRate` overrides its write rate. */
export function buildDirtyModel(w: Workload, memoryBytes: number, pageSize: number, seed: number, env: WorldEnv, dirtyRate?: number): DirtyModel {
  const pages = Math.floor(memoryBytes / pageSize);
  const resolve = (v: { bytes: number } | { share: number } | undefined, dflt: number) => {
    const n = v === undefined ? dflt : 'share' in v ? Math.round(v.share * pages) : Math.round(v.bytes / pageSize);
    if (!(n >= 1 && n <= pages)) throw new ScenarioError(`working set of ${n} pages does not fit a VM of ${pages} pages`);
    return n;
  };
  switch (w.kind) {
    case 'constant':
      return new ConstantRateDirty(memoryBytes / pageSize, dirtyRate ?? w.dirtyRate, { pageSize, seed, touchPagesPerSec: (w.touchRate ?? dirtyRate ?? w.dirtyRate) / pageSize });
    case 'trace': {
      if (!env.loadTrace) throw new ScenarioError(`workload trace '${w.file}': this runner cannot load trace files`);
      if (dirtyRate !== undefined) throw new ScenarioError(`a sweep cannot override the dirty rate of a recorded trace ('${w.file}')`);
      const trace = env.loadTrace(w.file);
      return new TraceReplayDirty(trace, { pageCount: pages, offsetMs: w.offset });
    }
    default: {
      const wss = resolve(w.wss, pages);
      const key = w.kind === 'uniform' ? `u:${wss}` : w.kind === 'hotcold' ? `h:${wss}:${resolve(w.hot, 1)}:${w.hotFraction}` : `z:${wss}:${w.exponent}`;
      let dist = env.distributions?.get(key);
      if (!dist) {
        dist = w.kind === 'uniform' ? uniformPages(wss) : w.kind === 'hotcold' ? hotColdPages(wss, Math.min(wss, resolve(w.hot, 1)), w.hotFraction) : zipfPages(wss, w.exponent);
        env.distributions?.set(key, dist);
      }
      return new PoissonDirty({ pageCount: pages, writePagesPerSec: (dirtyRate ?? w.writeRate) / pageSize, readPagesPerSec: (w.readRate ?? 0) / pageSize, writes: dist, seed });
    }
  }
}

export function contentCost(c: Content | undefined, pageSize: number): PageCost {
  if (!c) return pageCost(null, 'none', pageSize);
  const mix: Partial<Record<ContentClassName, Partial<ContentClass>>> = {};
  for (const k of ['zero', 'text', 'random', 'duplicate'] as const) {
    const v = c[k];
    if (v !== undefined) mix[k] = typeof v === 'number' ? { fraction: v } : v;
  }
  try {
    return pageCost(Object.keys(mix).length ? mix : null, c.codec, pageSize);
  } catch (e) {
    throw new ScenarioError(`content: ${(e as Error).message}`, { cause: e });
  }
}

export function migrationOptions(o: Options): SimMigrationOptions {
  return {
    downtimeBudgetMs: o.downtime,
    fixedDowntimeMs: o.fixedDowntime,
    maxRounds: o.maxRounds,
    maxSentRatio: o.maxSentRatio,
    dirtyPageThreshold: o.dirtyPageThreshold,
    notConvergingRounds: o.notConvergingRounds,
    autoConverge: o.autoConverge,
    maxPrecopyRounds: o.hybridRounds,
    maxDirtyToBandwidth: o.maxDirtyToBandwidth,
    prepaging: o.prepaging,
    postcopyBatchPages: o.batchPages,
    resumeMs: o.resume,
    setupMs: o.setup,
  };
}

function strip<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}

/** Runs every migration and sweep of a scenario. */
export function runScenario(s: Scenario, envIn: WorldEnv = {}): ScenarioResult {
  const env: WorldEnv = { ...envIn, distributions: envIn.distributions ?? new Map() };
  const workload = (w: string | Workload) => (typeof w === 'string' ? s.workloads[w] : w);
  const wname = (w: string | Workload, i: number) => (typeof w === 'string' ? w : `${w.kind}-${i}`);
  const clock = new VirtualClock();
  const net = new FluidNetwork(clock);
  const out: MigrationOutcome[] = [];
  let events = 0;

  if (s.migrations.length) {
    const nicOut = new Map<string, Resource>();
    const nicIn = new Map<string, Resource>();
    const cpu = new Map<string, Resource>();
    for (const h of s.hosts) {
      nicOut.set(h.name, net.resource(`${h.name}.out`, h.nic));
      nicIn.set(h.name, net.resource(`${h.name}.in`, h.nic));
      cpu.set(h.name, net.resource(`${h.name}.cpu`, h.cores));
    }
    const links = new Map(s.links.map((l) => [l.name, { res: net.resource(l.name, l.bandwidth), latency: l.latency }]));
    s.migrations.forEach((m, i) => {
      const v = s.vms.find((x) => x.name === m.vm)!;
      const seed = v.seed ?? s.seed * 1000 + i;
      const vm: SimVm = { name: v.name, memoryBytes: v.memory, pageSize: s.pageSize, dirty: buildDirtyModel(workload(v.workload), v.memory, s.pageSize, seed, env), cost: contentCost(v.content, s.pageSize), stateBytes: v.state, workPerSec: v.workRate };
      const uses: ChannelUse[] = [{ resource: nicOut.get(v.host)!, perByte: 1 }, ...m.via.map((l) => ({ resource: links.get(l)!.res, perByte: 1 })), { resource: nicIn.get(m.to)!, perByte: 1 }];
      if (vm.cost.cpuSecPerPage > 0) uses.push({ resource: cpu.get(v.host)!, perByte: vm.cost.cpuSecPerPage / vm.cost.wireBytesPerPage });
      const latency = m.latency + m.via.reduce((a, l) => a + links.get(l)!.latency, 0);
      const channel = net.channel({ name: `${v.name}:${v.host}->${m.to}`, uses, latencyMs: latency, capBytesPerSec: m.rateLimit, sendBufferBytes: m.sendBuffer });
      const nominal = Math.min(...uses.filter((u) => u.perByte === 1).map((u) => u.resource.capacity), m.rateLimit ?? Infinity);
      clock.schedule(m.at, () => {
        startMigration(clock, { vm, technique: m.technique, channel, nominalBandwidthBytesPerSec: nominal, options: strip(migrationOptions(m.options)) }, (r) => {
          out.push({ ...r, from: v.host, to: m.to, startMs: m.at });
        });
      });
    });
    clock.runAll();
    events += clock.eventsRun;
    if (out.length !== s.migrations.length) throw new InvalidArgumentError(`${s.migrations.length - out.length} migration(s) never completed`);
  }
  const order = new Map(s.migrations.map((m, i) => [m.vm, i]));
  out.sort((a, b) => order.get(a.vm)! - order.get(b.vm)!);

  const sweeps = s.sweeps.map((sw) => {
    const points: SweepPoint[] = [];
    sw.workloads.forEach((wref, wi) => {
      const w = workload(wref);
      for (const d of sw.dirtyRate ?? [undefined]) {
        for (const bw of sw.bandwidth) {
          for (const technique of sw.techniques) {
            const r = runSingle({ memoryBytes: sw.memory, pageSize: s.pageSize, workload: w, dirtyRate: d, bandwidth: bw, latencyMs: sw.latency, sendBufferBytes: sw.sendBuffer, cores: sw.cores, content: sw.content, stateBytes: sw.state, workPerSec: sw.workRate, technique, options: strip(migrationOptions(sw.options)), seed: s.seed * 7919 + wi }, env);
            events += r.events;
            points.push(summarize(wname(wref, wi), technique, bw, d ?? null, r.result));
          }
        }
      }
    });
    return { name: sw.name, points };
  });

  return { name: s.name, seed: s.seed, migrations: out, sweeps, endMs: out.reduce((a, m) => Math.max(a, m.startMs + (m.report.totalMigrationTimeMs ?? 0)), 0), events };
}

export interface SingleRunInit {
  memoryBytes: number;
  pageSize?: number;
  workload: Workload;
  dirtyRate?: number;
  bandwidth: number;
  latencyMs?: number;
  sendBufferBytes?: number;
  cores?: number;
  content?: Content;
  stateBytes?: number;
  workPerSec?: number;
  technique: Technique;
  options?: SimMigrationOptions;
  seed?: number;
}

/** One VM, one link, one migration: the building block of sweeps (and a handy API). */
export function runSingle(init: SingleRunInit, env: WorldEnv = {}): { result: SimMigrationResult; events: number } {
  const pageSize = init.pageSize ?? 4096;
  const dirty = buildDirtyModel(init.workload, init.memoryBytes, pageSize, init.seed ?? 1, env, init.dirtyRate);
  return runSimVm({ name: 'vm', memoryBytes: init.memoryBytes, pageSize, dirty, cost: contentCost(init.content, pageSize), stateBytes: init.stateBytes ?? 65536, workPerSec: init.workPerSec }, init);
}

/** Migrates an already built VM over one link of `bandwidth` (plus the source CPU when the codec costs). */
export function runSimVm(vm: SimVm, init: { bandwidth: number; latencyMs?: number; sendBufferBytes?: number; cores?: number; technique: Technique; options?: SimMigrationOptions }): { result: SimMigrationResult; events: number } {
  const clock = new VirtualClock();
  const net = new FluidNetwork(clock);
  const uses: ChannelUse[] = [{ resource: net.resource('link', init.bandwidth), perByte: 1 }];
  if (vm.cost.cpuSecPerPage > 0) uses.push({ resource: net.resource('cpu', init.cores ?? 8), perByte: vm.cost.cpuSecPerPage / vm.cost.wireBytesPerPage });
  const channel = net.channel({ name: vm.name, uses, latencyMs: init.latencyMs ?? 0, sendBufferBytes: init.sendBufferBytes });
  let result: SimMigrationResult | null = null;
  startMigration(clock, { vm, technique: init.technique, channel, nominalBandwidthBytesPerSec: init.bandwidth, options: init.options }, (r) => (result = r));
  clock.runAll();
  if (!result) throw new InvalidArgumentError(`migration of ${vm.name} never completed`);
  return { result, events: clock.eventsRun };
}

function summarize(workload: string, technique: Technique, bw: number, d: number | null, r: SimMigrationResult): SweepPoint {
  const rep = r.report;
  return {
    workload,
    technique,
    bandwidthBytesPerSec: bw,
    dirtyRateBytesPerSec: d,
    stopReason: r.stopReason,
    totalMigrationTimeMs: rep.totalMigrationTimeMs ?? NaN,
    downtimeMs: rep.downtimeMs ?? NaN,
    wireBytes: rep.bytes.wire,
    rounds: rep.rounds.length,
    faults: rep.postcopy.faults,
    faultLatencyP99Ms: rep.postcopy.faultLatencyMs.p99,
    degradationRatio: rep.degradation?.ratio ?? null,
    dirtyPerRound: rep.rounds.map((x) => x.dirtyPages),
  };
}

/** A human table of a scenario's results. */
export function formatScenarioTable(r: ScenarioResult, options: { details?: boolean } = {}): string {
  const lines: string[] = [];
  const row = (cells: string[], widths: number[]) => cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  if (r.migrations.length) {
    const w = [14, 9, 10, 10, 11, 7, 7, 14];
    lines.push(`scenario ${r.name}: ${r.migrations.length} migration(s), all done at ${formatDuration(r.endMs)} (virtual)`);
    lines.push(row(['vm', 'technique', 'TMT', 'downtime', 'wire', 'rounds', 'faults', 'reason'], w));
    for (const m of r.migrations) {
      const rep = m.report;
      lines.push(row([m.vm, m.technique, formatDuration(rep.totalMigrationTimeMs ?? NaN), formatDuration(rep.downtimeMs ?? NaN), formatBytes(rep.bytes.wire), String(rep.rounds.length), String(rep.postcopy.faults), m.stopReason], w));
    }
    if (options.details) for (const m of r.migrations) lines.push('', `— ${m.vm}`, formatReportTable(m.report as MigrationReport));
  }
  for (const sw of r.sweeps) {
    const w = [16, 9, 11, 11, 10, 10, 11, 7, 7, 8, 14];
    lines.push('', `sweep ${sw.name}: ${sw.points.length} runs`);
    lines.push(row(['workload', 'technique', 'bandwidth', 'dirty rate', 'TMT', 'downtime', 'wire', 'rounds', 'faults', 'perf', 'reason'], w));
    for (const p of sw.points) {
      lines.push(row([p.workload, p.technique, `${(p.bandwidthBytesPerSec * 8 / 1e6).toFixed(0)} Mbit`, p.dirtyRateBytesPerSec === null ? '—' : `${(p.dirtyRateBytesPerSec / 1e6).toFixed(0)} MB/s`, formatDuration(p.totalMigrationTimeMs), formatDuration(p.downtimeMs), formatBytes(p.wireBytes), String(p.rounds), String(p.faults), p.degradationRatio === null ? '—' : `${(p.degradationRatio * 100).toFixed(1)}%`, p.stopReason], w));
    }
  }
  return lines.join('\n') + '\n';
}

/**
 * Simulator benchmarks (issue 5): how fast the discrete-event simulator runs at page granularity.
 * - one 4 GiB VM (1 M pages) over 1 Gbit/s, each technique (target: pre-copy ≤ 1 s wall);
 * - 1,000 VMs migrating over a shared fabric (target ≤ 60 s wall).
 */
import { median, type BenchContext, type BenchSuite } from './harness.js';
import { validateScenario, runScenario, runSimVm, PoissonDirty, zipfPages, type Technique } from '../src/core/sim/index.js';

const GiB = 1024 ** 3;

function oneVm(ctx: BenchContext, technique: Technique, reps: number): void {
  const walls: number[] = [];
  let events = 0;
  let tmt = 0;
  let rounds = 0;
  for (let i = 0; i < reps; i++) {
    const pages = (4 * GiB) / 4096;
    const dirty = new PoissonDirty({ pageCount: pages, writePagesPerSec: 15_000, readPagesPerSec: 20_000, writes: zipfPages(pages / 2, 0.6), seed: i + 1 });
    const t0 = performance.now();
    const r = runSimVm({ name: 'big', memoryBytes: 4 * GiB, pageSize: 4096, dirty, cost: { wireBytesPerPage: 4096, cpuSecPerPage: 0 }, stateBytes: 65536 }, { bandwidth: 125e6, latencyMs: 0.2, technique });
    walls.push(performance.now() - t0);
    events = r.events;
    tmt = r.result.report.totalMigrationTimeMs ?? NaN;
    rounds = r.result.report.rounds.length;
  }
  ctx.report({ metric: `4GiB-1Gbit.${technique}`, value: median(walls) / 1000, unit: 's wall', ...(technique === 'precopy' ? { target: '<= 1' } : {}), note: `1 M pages, Zipf(0.6) writes 60 MB/s over 2 GiB, ${rounds} rounds, ${events} events, simulated TMT ${(tmt / 1000).toFixed(1)} s, median of ${reps}` });
}

function fleet(ctx: BenchContext, vms: number): void {
  const hosts = Math.max(2, Math.round(vms / 10));
  const techniques: Technique[] = ['precopy', 'precopy', 'precopy', 'hybrid', 'postcopy'];
  const raw = {
    name: 'fleet',
    seed: 11,
    workloads: {
      web: { kind: 'hotcold', writeRate: '8MB/s', readRate: '40MB/s', wss: '30%', hot: '2%', hotFraction: 0.9 },
      db: { kind: 'zipf', writeRate: '40MB/s', readRate: '80MB/s', wss: '60%', exponent: 0.9 },
      batch: { kind: 'uniform', writeRate: '120MB/s', wss: '40%' },
    },
    hosts: Array.from({ length: hosts }, (_, i) => ({ name: `h${i}`, cores: 32, nic: '10Gbit' })),
    links: [{ name: 'spine', bandwidth: '400Gbit', latency: '0.05ms' }, { name: 'leaf0', bandwidth: '100Gbit', latency: '0.02ms' }, { name: 'leaf1', bandwidth: '100Gbit', latency: '0.02ms' }],
    vms: Array.from({ length: vms }, (_, i) => ({
      name: `vm${i}`,
      host: `h${i % (hosts / 2)}`,
      memory: `${1 + (i % 4)}GiB`,
      workload: ['web', 'web', 'db', 'batch'][i % 4],
      ...(i % 3 === 0 ? { content: { codec: 'compress', zero: 0.3, text: 0.4, random: 0.2, duplicate: 0.1 } } : {}),
    })),
    migrations: Array.from({ length: vms }, (_, i) => ({
      vm: `vm${i}`,
      to: `h${hosts / 2 + (i * 7) % (hosts / 2)}`,
      at: `${(i * 37) % 120}s`,
      technique: techniques[i % techniques.length],
      via: [`leaf${i % 2}`, 'spine'],
      options: { maxRounds: 30 },
    })),
  };
  const s = validateScenario(raw, 'fleet');
  const t0 = performance.now();
  const r = runScenario(s);
  const wall = performance.now() - t0;
  const tmts = r.migrations.map((m) => m.report.totalMigrationTimeMs ?? 0);
  const bytes = r.migrations.reduce((a, m) => a + m.report.bytes.wire, 0);
  ctx.report({ metric: `fleet-${vms}.wall`, value: wall / 1000, unit: 's wall', ...(vms >= 1000 ? { target: '<= 60' } : {}), note: `${vms} VMs (1–4 GiB, ${hosts} hosts, 10 Gbit NICs, shared leaf/spine), ${r.events} events, all done at ${(r.endMs / 1000).toFixed(0)} s virtual, median TMT ${(median(tmts) / 1000).toFixed(1)} s, ${(bytes / 1024 ** 4).toFixed(2)} TiB moved` });
}

const suite: BenchSuite = {
  name: 'sim',
  description: 'simulator: a 4 GiB VM at page granularity, 1,000 VMs over a shared fabric',
  async run(ctx) {
    for (const t of ['precopy', 'hybrid', 'postcopy'] as const) oneVm(ctx, t, ctx.quick ? 1 : 3);
    fleet(ctx, ctx.quick ? 100 : 1000);
  },
};
export default suite;

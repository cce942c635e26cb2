/**
 * Data-reduction benchmarks (issue 4) on whole migrations: the engine moving real memstress VMs to
 * a destination in a child process over loopback TCP, every figure measured side by side in one run.
 * Each codec's own throughput and ratio on page corpora is in bench/codec.bench.ts, not here.
 *
 * - whole migrations: pre-copy of a VM with a content mix (`realistic`: 30 % zero, 30 % text, 10 %
 *   repeated, 30 % random pages; `text-heavy`: 80 % text; `random`) and a writable working set whose
 *   re-dirtied pages keep their class (`wcontent=keep`), for each codec set — none, xbzrle, dedup,
 *   lz4, zstd, xbzrle+dedup+zstd (compression `auto`: the measured controller decides) — at loopback
 *   speed, and none, zstd and all through a 1 Gbit/s shaped link, where compression should pay.
 *   Per (mix, set), from the run of median TMT of three: TMT, downtime, wire bytes, page
 *   reduction ×, compression on/off at the end, verified;
 * - gang migration: 4 VMs sharing most of their pages (same `dupseed`, different `seed`), migrated
 *   one after another with `dedup` vs together with one Gang into one MigrationAcceptor: wire
 *   bytes together ÷ separately (issue target ≤ 0.4) and the ideal ratio for that content;
 * - parallel data streams: an idle random VM moved with 1, 2 and 4 streams, without codecs and with
 *   zstd, interleaved, medians of five: TMT, first-pass throughput and TMT(1) ÷ TMT(N). As from a
 *   host agent, every stream past the first is written by a sender thread of its own (the control
 *   stream and the codecs stay on the source's event loop); the destination reads them all on its
 *   event loop, and both share the machine's 2 cores, so more streams need not be faster.
 *
 * Every migration is verified (the destination's digest of memory as at the pause equals the
 * source's); the closing `verified` line counts those that were, and a migration that failed or did
 * not verify prints a `….verified 0` line that misses its target.
 *
 * The destination runs in a child process (bench/destination-host.ts) that serves every connection
 * through one MigrationAcceptor (JOINs of parallel streams, gang members).
 */
import { median, rotated, section, settle, type BenchContext, type BenchSuite } from './harness.js';
import { DestinationProcess, memstressVm, type LinkInit } from './destination-host.js';
import type { DestinationOutcome } from '../src/core/engine/destination.js';
import { Gang, type CodecName } from '../src/core/engine/codecs.js';
import type { MigrationOptions, MigrationResult } from '../src/core/engine/types.js';
import type { MigrationReport, TransferReport } from '../src/core/metrics.js';
import { Vm } from '../src/node/vm/vm.js';

const MiB = 1 << 20;
const fmtMiB = (b: number) => `${(b / MiB).toFixed(1)} MiB`;


interface Run {
  result: MigrationResult;
  outcome: DestinationOutcome;
  report: MigrationReport;
  transfer: TransferReport;
}

let destination: DestinationProcess | undefined;

/** Options every migration here shares: no degradation baseline (not reported here). */
const BASE: Partial<MigrationOptions> = { baselineMs: 0 };

/** Migrates every VM in `srcs` concurrently to the destination process (bench/destination-host.ts). */
async function migrateAll(srcs: Vm[], opts: MigrationOptions, link?: LinkInit): Promise<Run[]> {
  const runs = await destination!.migrate(srcs, { ...BASE, ...opts }, link);
  return runs.map((r) => ({ ...r, report: r.result.report, transfer: r.result.report.transfer! }));
}

async function migrate(src: Vm, opts: MigrationOptions, link?: LinkInit): Promise<Run> {
  return (await migrateAll([src], opts, link))[0];
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping: every migration verified, or a loud line.

class Verification {
  ok = 0;
  total = 0;

  /** Counts `run`; a failed or unverified migration gets a `<label>.verified 0` line. */
  check(ctx: BenchContext, label: string, run: Run | Error): run is Run {
    this.total++;
    if (run instanceof Error) {
      ctx.report({ metric: `${label}.verified`, value: 0, unit: 'ok', target: '>= 1', note: `MIGRATION FAILED: ${run.message}` });
      return false;
    }
    const good = run.report.verified === true && run.outcome.verified !== false;
    if (good) this.ok++;
    else ctx.report({ metric: `${label}.verified`, value: 0, unit: 'ok', target: '>= 1', note: `NOT VERIFIED: source ${run.report.verified}, destination ${run.outcome.verified}` });
    return true;
  }

  summary(ctx: BenchContext): void {
    ctx.report({ metric: 'verified', value: this.total ? this.ok / this.total : NaN, unit: 'ok', target: '>= 1', note: `${this.ok} of ${this.total} migrations verified (digest of memory as at the pause)` });
  }
}

const attempt = <T>(p: Promise<T>): Promise<T | Error> => p.catch((e: unknown) => (e instanceof Error ? e : new Error(String(e))));

function compressionNote(t: TransferReport): string {
  const c = t.compression;
  if (!c) return 'no compression agreed';
  const speedup = c.speedup === null ? '' : `, measured speedup ${c.speedup.toFixed(2)}×`;
  return `compression ${c.on ? 'ON' : 'OFF'} at the end (${c.flips} flip${c.flips === 1 ? '' : 's'}${speedup})`;
}

function codecNote(t: TransferReport): string {
  const s = t.codecStats;
  const parts: string[] = [];
  const pick = (k: string, as: string) => { if (s[k]) parts.push(`${as} ${s[k]}`); };
  pick('page.xbzrle.hits', 'xbzrle hits');
  pick('page.dedup.refs', 'dedup refs');
  if (s.compressedBatches) parts.push(`${s.compressedBatches} batches compressed ${fmtMiB(s.rawBytesIn ?? 0)} → ${fmtMiB(s.compressedBytesOut ?? 0)}`);
  return parts.join(', ');
}

// ---------------------------------------------------------------------------------------------
// Whole migrations: codec sets × content mixes.

const SETS: { name: string; codecs: CodecName[] }[] = [
  { name: 'none', codecs: [] },
  { name: 'xbzrle', codecs: ['xbzrle'] },
  { name: 'dedup', codecs: ['dedup'] },
  { name: 'lz4', codecs: ['lz4'] },
  { name: 'zstd', codecs: ['zstd'] },
  { name: 'all', codecs: ['xbzrle', 'dedup', 'zstd'] },
];

const MIXES: { name: string; content: string }[] = [
  { name: 'realistic', content: 'zero=0.3 text=0.3 repeat=0.1' },
  { name: 'text-heavy', content: 'text=0.8' },
  { name: 'random', content: '' },
];

/** The link where compression should pay: 1 Gbit/s each way. */
const GBIT: LinkInit = { bandwidthBytesPerSec: 125e6 };

/**
 * The working set: 8 MiB (1/16 of memory; 1/8 in a quick pass) written uniformly at 8 MB/s (1 M
 * writes of 8 bytes a second: every page of it is dirty again within a few ms), re-dirtied pages
 * keeping their class. Pre-copy's downtime budget is 50 ms, as in the migration bench: without
 * codecs the working set fits it on loopback (≈ 25 ms at the ≈ 0.3 GB/s the engine moves pages
 * here), so pre-copy converges after a round or two; at 1 Gbit/s it does not (67 ms), so pre-copy
 * runs until a stop condition other than convergence — the case where fewer bytes per page should
 * shorten TMT.
 */
const WRITES = 'pattern=uniform rate=8000000 wcontent=keep';
const DOWNTIME_BUDGET_MS = 50;

async function wholeMigrations(ctx: BenchContext, mem: number, reps: number, v: Verification): Promise<void> {
  const onLink = SETS.filter((s) => ['none', 'zstd', 'all'].includes(s.name));
  const plan = [...SETS.map((s) => ({ ...s, link: false })), ...onLink.map((s) => ({ ...s, link: true }))];
  for (const mix of MIXES) {
    const config = `wss=${Math.min(8 * MiB, mem / 8)} ${WRITES} ${mix.content}`;
    const label = (s: (typeof plan)[number]) => `${mix.name}.${s.name}${s.link ? '-1gbit' : ''}`;
    const runs = new Map<string, Run[]>(plan.map((s) => [label(s), []]));
    // Interleaved: every set sees the same moments of this noisy machine; each starts once the
    // machine has gone quiet after the one before (settle), and the order turns from round to round.
    for (let rep = 0; rep < reps; rep++) {
      for (const s of rotated(plan, rep)) {
        const run = await attempt(memstressVm(`${label(s)}-${rep}`, mem, config).then(async (src) => {
          await settle();
          return migrate(src, { mode: 'precopy', codecs: s.codecs, compression: 'auto', downtimeMs: DOWNTIME_BUDGET_MS }, s.link ? GBIT : undefined);
        }));
        if (v.check(ctx, label(s), run)) runs.get(label(s))!.push(run);
      }
    }
    // Each (mix, set) is reported by its run of median TMT, so its figures belong together.
    const chosen = new Map<string, { run: Run; tmts: number[] }>();
    for (const [l, rs] of runs) {
      if (rs.length === 0) continue;
      const sorted = [...rs].sort((a, b) => a.report.totalMigrationTimeMs! - b.report.totalMigrationTimeMs!);
      chosen.set(l, { run: sorted[(sorted.length - 1) >> 1], tmts: rs.map((r) => r.report.totalMigrationTimeMs!) });
    }
    for (const s of plan) {
      const c = chosen.get(label(s));
      if (!c) continue;
      const { run, tmts } = c;
      const r = run.report;
      const t = run.transfer;
      const none = chosen.get(label({ ...SETS[0], link: s.link }))?.run;
      const vsNone = (f: (x: Run) => number) => (none ? `${(f(run) / f(none)).toFixed(2)}× none; ` : '');
      const of = tmts.length > 1 ? `; the median-TMT run of ${tmts.length} (${tmts.map((x) => x.toFixed(0)).join(', ')} ms)` : '';
      ctx.report({
        metric: `${label(s)}.tmt`, value: r.totalMigrationTimeMs!, unit: 'ms',
        note: `${vsNone((x) => x.report.totalMigrationTimeMs!)}${r.rounds.length} rounds, ${run.result.stopReason}; ${s.link ? '1 Gbit/s link' : 'loopback'}; ${fmtMiB(mem)} ${mix.name}; ${r.verified === true ? 'verified' : 'NOT VERIFIED'}${of}`,
      });
      ctx.report({ metric: `${label(s)}.downtime`, value: r.downtimeMs!, unit: 'ms', note: `destination start ${run.outcome.startMs.toFixed(1)} ms; budget ${DOWNTIME_BUDGET_MS} ms` });
      ctx.report({
        metric: `${label(s)}.wire-bytes`, value: r.bytes.wire / MiB, unit: 'MiB',
        note: `${vsNone((x) => x.report.bytes.wire)}${(r.bytes.wire / mem).toFixed(2)}× memory; ${r.pages.resent} pages re-sent`,
      });
      ctx.report({
        metric: `${label(s)}.reduction`, value: t.reduction, unit: '×',
        note: `page bytes ÷ encoded; ${[compressionNote(t), codecNote(t)].filter(Boolean).join('; ')}`,
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Gang migration: 4 similar VMs, separately vs together.

/**
 * Gang members: 80 % of pages common to all four (same dupseed), 10 % zero, 10 % random of their
 * own (different seeds), and a small working set written slowly. Pages common to the four cross
 * the wire once together, four times separately: with shared fraction s and own non-zero fraction
 * u the ideal ratio is (s + 4u) ÷ 4(s + u) = 0.33 here (zero pages cost next to nothing either way).
 */
const GANG = { dup: 0.8, zero: 0.1 };

async function gangMigration(ctx: BenchContext, mem: number, v: Verification): Promise<void> {
  const own = 1 - GANG.dup - GANG.zero;
  const ideal = (GANG.dup + 4 * own) / (4 * (GANG.dup + own));
  const config = (i: number) => `wss=${mem / 32} pattern=uniform rate=1000000 wcontent=keep zero=${GANG.zero} dup=${GANG.dup} dupseed=77 seed=${i + 1}`;
  const ids = [0, 1, 2, 3];

  const separate: Run[] = [];
  const t0 = performance.now();
  for (const i of ids) {
    const run = await attempt(memstressVm(`solo-${i}`, mem, config(i)).then((src) => migrate(src, { mode: 'precopy', codecs: ['dedup'] })));
    if (v.check(ctx, `gang-4.separate-${i}`, run)) separate.push(run);
  }
  const separateWall = performance.now() - t0;

  const srcs = await Promise.all(ids.map((i) => memstressVm(`gang-${i}`, mem, config(i))));
  const t1 = performance.now();
  const together = await attempt(migrateAll(srcs, { mode: 'precopy', codecs: ['dedup'], gang: new Gang('reduction-bench') }));
  const togetherWall = performance.now() - t1;
  if (together instanceof Error) {
    v.check(ctx, 'gang-4.together', together);
    return;
  }
  for (const [i, run] of together.entries()) v.check(ctx, `gang-4.together-${i}`, run);
  if (separate.length < 4) return;

  const wire = (rs: Run[]) => rs.reduce((n, r) => n + r.report.bytes.wire, 0);
  const sumTmt = (rs: Run[]) => rs.reduce((n, r) => n + r.report.totalMigrationTimeMs!, 0);
  const refs = (rs: Run[]) => rs.reduce((n, r) => n + (r.transfer.codecStats['page.dedup.refs'] ?? 0), 0);
  ctx.report({
    metric: 'gang-4.wire-bytes.vs-separate', value: wire(together) / wire(separate), unit: '×', target: '<= 0.4',
    note: `together ${fmtMiB(wire(together))} vs separately ${fmtMiB(wire(separate))} (4 × ${fmtMiB(mem)}: ${GANG.dup * 100} % common, ${GANG.zero * 100} % zero, ${Math.round(own * 100)} % own); ideal ${ideal.toFixed(2)}×; dedup refs ${refs(together)} vs ${refs(separate)}`,
  });
  ctx.report({ metric: 'gang-4.separate.tmt', value: sumTmt(separate), unit: 'ms', note: `sum of 4 TMTs one after another (wall ${separateWall.toFixed(0)} ms with boots)` });
  ctx.report({
    metric: 'gang-4.together.tmt', value: togetherWall, unit: 'ms',
    note: `wall time of the 4 concurrent migrations; longest TMT ${Math.max(...together.map((r) => r.report.totalMigrationTimeMs!)).toFixed(0)} ms; ${(togetherWall / sumTmt(separate)).toFixed(2)}× the separate sum`,
  });
}

// ---------------------------------------------------------------------------------------------
// Parallel data streams.

const STREAMS = [1, 2, 4];

/**
 * TMT of an idle VM with 1, 2 and 4 data streams. Each migration starts once both processes have
 * gone quiet after the one before (settle), and the order of the stream counts turns from one
 * round to the next, so no count always comes right after the same other. One run before the
 * rounds is not counted: it meets a destination with no memory of this shape in its pool.
 */
async function parallelStreams(ctx: BenchContext, mem: number, reps: number, v: Verification): Promise<void> {
  for (const set of [SETS[0], SETS[4]]) {
    const tmts = new Map<number, number[]>(STREAMS.map((n) => [n, []]));
    const rates = new Map<number, number[]>(STREAMS.map((n) => [n, []]));
    let last: Run | undefined;
    // Interleaved: every stream count sees the same moments of this noisy machine.
    for (let rep = -1; rep < reps; rep++) {
      const order = rep < 0 ? [1] : rotated(STREAMS, rep);
      for (const n of order) {
        const label = `streams-${n}.${set.name}`;
        const run = await attempt(memstressVm(`${label}-${rep}`, mem, 'rate=1').then(async (src) => {
          await settle();
          return migrate(src, { mode: 'precopy', codecs: set.codecs, streams: n });
        }));
        if (!v.check(ctx, label, run) || rep < 0) continue;
        tmts.get(n)!.push(run.report.totalMigrationTimeMs!);
        const r0 = run.report.rounds[0];
        rates.get(n)!.push(r0.bytesSent / 1e6 / r0.durationMs);
        if (n === 1) last = run;
      }
    }
    const one = median(tmts.get(1)!);
    for (const n of STREAMS) {
      const tmt = median(tmts.get(n)!);
      ctx.report({ metric: `streams-${n}.${set.name}.tmt`, value: tmt, unit: 'ms', note: `${fmtMiB(mem)} random, idle; median of ${tmts.get(n)!.length}, each after a pause (settle)` });
      ctx.report({ metric: `streams-${n}.${set.name}.throughput`, value: median(rates.get(n)!), unit: 'GB/s', note: 'first pass: wire bytes ÷ its duration' });
      if (n > 1) ctx.report({ metric: `streams-${n}.${set.name}.vs-1`, value: one / tmt, unit: '×', note: `TMT with 1 stream ÷ TMT with ${n} (> 1: ${n} streams faster)` });
    }
    if (last?.transfer.compression) ctx.log(`streams ${set.name}: ${compressionNote(last.transfer)}`);
  }
}

const suite: BenchSuite = {
  name: 'reduction',
  description: 'engine data reduction: codec sets × content mixes (loopback and 1 Gbit/s), gang of 4 vs separate, N streams vs 1',
  async run(ctx) {
    const q = ctx.quick;
    const v = new Verification();
    destination = await DestinationProcess.start();
    try {
      await section(ctx, 'whole', () => wholeMigrations(ctx, q ? 16 * MiB : 128 * MiB, q ? 1 : 3, v));
      await section(ctx, 'gang', () => gangMigration(ctx, q ? 16 * MiB : 64 * MiB, v));
      await section(ctx, 'streams', () => parallelStreams(ctx, q ? 32 * MiB : 128 * MiB, q ? 1 : 5, v));
    } finally {
      destination.stop();
      destination = undefined;
    }
    v.summary(ctx);
  },
};
export default suite;


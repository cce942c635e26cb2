/**
 * The migration report: the survey's performance metrics ("Performance metrics", items 1–10;
 * eviction time from Deshpande et al. [75]) computed from timestamped events that the engine — or
 * the simulator — records as a migration runs. `docs/metrics.md` defines every field.
 *
 * Phase boundaries follow Hines et al. [63] (cited by the survey for items 4–5):
 *
 *   start ──── preparation ──── paused ── downtime ── resumed ──── resume ──── complete
 *   └──────────────────────── total migration time ─────────────────────────────┘
 *
 * so TMT = preparation + downtime + resume. For pre-copy the resume time is ~0; for post-copy the
 * preparation time is ~0.
 */
import { InvalidArgumentError } from './errors.js';
import { formatBytes, formatDuration } from './units.js';

// ---------------------------------------------------------------------------------------------
// Histogram

export interface HistogramOptions {
  /** Smallest value resolved; smaller values (≥ 0) land in bucket 0. Default 0.001 (1 µs in ms). */
  min?: number;
  /** Ratio between consecutive bucket bounds; the relative error of a percentile is below it. Default 1.05. */
  growth?: number;
}

/**
 * Log-bucket histogram (HdrHistogram-style, bounded relative error): bucket k ≥ 1 holds
 * (min·g^(k−1), min·g^k], bucket 0 holds [0, min]. A percentile is the largest value recorded in
 * the bucket holding the rank — within a factor g of the true percentile, and exact whenever that
 * bucket saw a single distinct value (the usual case for clustered latencies).
 */
export class Histogram {
  private readonly min: number;
  private readonly logG: number;
  private readonly growth: number;
  private counts: number[] = [];
  private highs: number[] = [];
  count = 0;
  sum = 0;
  minValue = Number.POSITIVE_INFINITY;
  maxValue = Number.NEGATIVE_INFINITY;

  constructor(options: HistogramOptions = {}) {
    this.min = options.min ?? 0.001;
    this.growth = options.growth ?? 1.05;
    if (!(this.min > 0 && this.growth > 1)) throw new InvalidArgumentError('histogram needs min > 0 and growth > 1');
    this.logG = Math.log(this.growth);
  }

  /** The bucket `value` falls in. */
  private bucket(value: number): number {
    return value <= this.min ? 0 : Math.max(1, Math.ceil(Math.log(value / this.min) / this.logG - 1e-12));
  }

  record(value: number, times = 1): void {
    if (!(value >= 0) || !Number.isFinite(value)) throw new InvalidArgumentError(`histogram value ${value} must be a finite number ≥ 0`);
    const k = this.bucket(value);
    while (this.counts.length <= k) {
      this.counts.push(0);
      this.highs.push(Number.NEGATIVE_INFINITY);
    }
    this.counts[k] += times;
    if (value > this.highs[k]) this.highs[k] = value;
    this.count += times;
    this.sum += value * times;
    if (value < this.minValue) this.minValue = value;
    if (value > this.maxValue) this.maxValue = value;
  }

  /** Value at quantile `q` (0..1): the largest value in the bucket holding rank ⌈q·count⌉. NaN when empty. */
  quantile(q: number): number {
    if (this.count === 0) return Number.NaN;
    const rank = Math.max(1, Math.ceil(q * this.count));
    let seen = 0;
    for (let k = 0; k < this.counts.length; k++) {
      seen += this.counts[k];
      if (seen >= rank) return this.highs[k];
    }
    return this.maxValue;
  }

  get p50(): number {
    return this.quantile(0.5);
  }

  get p99(): number {
    return this.quantile(0.99);
  }

  get mean(): number {
    return this.count ? this.sum / this.count : Number.NaN;
  }

  /** Adds another histogram's counts (same `min` and `growth`). */
  merge(other: Histogram): void {
    if (other.min !== this.min || other.growth !== this.growth) throw new InvalidArgumentError('cannot merge histograms with different buckets');
    while (this.counts.length < other.counts.length) {
      this.counts.push(0);
      this.highs.push(Number.NEGATIVE_INFINITY);
    }
    other.counts.forEach((c, k) => {
      this.counts[k] += c;
      this.highs[k] = Math.max(this.highs[k], other.highs[k]);
    });
    this.count += other.count;
    this.sum += other.sum;
    this.minValue = Math.min(this.minValue, other.minValue);
    this.maxValue = Math.max(this.maxValue, other.maxValue);
  }

  /**
   * A histogram another thread records into: `view` (SHARED_HISTOGRAM_WORDS Float64 words of a
   * SharedArrayBuffer, zeroed) holds count, sum, min and max, then each bucket's count and largest
   * value. One thread records ({@link recordShared}); any may read a copy ({@link fromShared}).
   * Buckets past the last one fold into it (with the default options: values above ~10⁷).
   */
  static recordShared(view: Float64Array, value: number, options?: HistogramOptions): void {
    if (!(value >= 0) || !Number.isFinite(value)) return;
    const h = options ? new Histogram(options) : Histogram.defaultBuckets; // no allocation per value with the default options
    const k = Math.min(h.bucket(value), SHARED_HISTOGRAM_BUCKETS - 1);
    if (view[0] === 0 || value < view[2]) view[2] = value;
    if (value > view[3]) view[3] = value;
    view[4 + k]++;
    if (value > view[4 + SHARED_HISTOGRAM_BUCKETS + k]) view[4 + SHARED_HISTOGRAM_BUCKETS + k] = value;
    view[1] += value;
    view[0]++;
  }

  private static readonly defaultBuckets = new Histogram();

  /** A copy of what {@link recordShared} recorded into `view` (with the same options). */
  static fromShared(view: Float64Array, options: HistogramOptions = {}): Histogram {
    const h = new Histogram(options);
    const n = view[0];
    if (n === 0) return h;
    let last = 0;
    for (let k = 0; k < SHARED_HISTOGRAM_BUCKETS; k++) if (view[4 + k] > 0) last = k;
    for (let k = 0; k <= last; k++) {
      h.counts.push(view[4 + k]);
      h.highs.push(view[4 + k] > 0 ? view[4 + SHARED_HISTOGRAM_BUCKETS + k] : Number.NEGATIVE_INFINITY);
    }
    h.count = h.counts.reduce((a, b) => a + b, 0); // the buckets, not view[0]: a copy taken mid-record stays consistent
    h.sum = view[1];
    h.minValue = view[2];
    h.maxValue = view[3];
    return h;
  }

  summary(): HistogramSummary {
    const e = this.count === 0;
    return { count: this.count, mean: e ? null : this.mean, p50: e ? null : this.p50, p99: e ? null : this.p99, max: e ? null : this.maxValue };
  }
}

/** Buckets of a shared histogram: with the default options, values up to ~10⁷ (ms: hours) have their own. */
export const SHARED_HISTOGRAM_BUCKETS = 480;
/** Float64 words of a shared histogram (see Histogram.recordShared). */
export const SHARED_HISTOGRAM_WORDS = 4 + 2 * SHARED_HISTOGRAM_BUCKETS;

export interface HistogramSummary {
  count: number;
  mean: number | null;
  p50: number | null;
  p99: number | null;
  max: number | null;
}

// ---------------------------------------------------------------------------------------------
// Events and report

/** How a page crossed the wire. */
export type PageKind = 'first' | 'resent' | 'pushed' | 'faulted';

/** Timestamped facts the engine or simulator records; `t` is ms on the migration's clock. */
export type MigrationEvent =
  | { type: 'start'; t: number }
  | { type: 'round-start'; t: number; round: number }
  | { type: 'round-end'; t: number; round: number; dirtyPages: number }
  | { type: 'pages'; t: number; kind: PageKind; pages: number; bytes: number }
  | { type: 'state'; t: number; bytes: number }
  | { type: 'paused'; t: number }
  | { type: 'resumed'; t: number }
  /** SWITCHOVER written, and every page and the state before it: what the source had to send is on its way. */
  | { type: 'switchover-sent'; t: number }
  /** Pre-copy ended for a stop-and-copy: the downtime its stop policy estimated then (eq. (2) + the fixed part), and that fixed part. */
  | { type: 'stop-decision'; t: number; estimatedDowntimeMs: number; fixedDowntimeMs: number }
  | { type: 'fault'; t: number; page: number; latencyMs: number }
  | { type: 'fault-waits'; t: number; waits: HistogramSummary }
  | { type: 'source-released'; t: number }
  | { type: 'complete'; t: number }
  | { type: 'client-gap'; t: number; durationMs: number }
  | { type: 'progress'; t: number; work: number }
  | { type: 'throttle'; t: number; fraction: number }
  | { type: 'verified'; t: number; ok: boolean };

export interface RoundReport {
  round: number;
  startMs: number;
  durationMs: number;
  pagesSent: number;
  bytesSent: number;
  /** Pages dirty when the round ended. */
  dirtyPages: number;
  /** dirtyPages / duration, pages per second (null for a zero-length round). */
  dirtyRatePagesPerSec: number | null;
}

export interface PageCounts {
  firstPass: number;
  resent: number;
  pushed: number;
  faulted: number;
  total: number;
}

export interface MigrationReport {
  technique: string;
  /** The VM's memory: its ceiling (a Wasm VM's memory grows up to it). */
  memoryBytes: number;
  /**
   * Guest memory in use when the migration started: what the first pass covers, and what pre-copy's
   * stop condition on bytes sent compares against. Equal to memoryBytes where memory does not grow.
   */
  guestBytes: number;
  pageSize: number;
  /** start → complete. */
  totalMigrationTimeMs: number | null;
  /** paused → resumed. */
  downtimeMs: number | null;
  /**
   * Where the downtime went: `sourceMs`, paused → switchover-sent (the stop-and-copy's pages, the
   * state and SWITCHOVER leaving the source); `destinationMs`, → resumed (their way across, the
   * destination taking in and checking what was still coming, starting the VM, and — measured by
   * the engine at the source — RESUMED's way back). They add up to downtimeMs. Null without a
   * switchover-sent event.
   */
  downtimeParts: { sourceMs: number; destinationMs: number } | null;
  /**
   * The downtime pre-copy's stop policy estimated when it ended pre-copy for a stop-and-copy: eq. (2)
   * over the pages dirty then, at the last round's rate, plus the fixed part it was given
   * (`fixedDowntimeMs`). Beside downtimeMs, how far the model is off. Null when no stop-and-copy
   * followed (post-copy; hybrid that switched to post-copy).
   */
  estimatedDowntimeMs: number | null;
  /**
   * The fixed part inside estimatedDowntimeMs (the engine: its `fixedDowntimeMs` option, given or
   * measured by the host; the simulator: that plus the state over its nominal bandwidth). Null
   * with no estimate.
   */
  fixedDowntimeMs: number | null;
  /** Longest service gap a client saw during the migration (null if no client probe). */
  clientDowntimeMs: number | null;
  /** start → paused. */
  preparationTimeMs: number | null;
  /** resumed → complete. */
  resumeTimeMs: number | null;
  /** start → source released. */
  evictionTimeMs: number | null;
  pages: PageCounts;
  bytes: PageCounts & { state: number; wire: number };
  rounds: RoundReport[];
  /** Mean dirtying rate over the pre-copy rounds. */
  dirtyRate: { pagesPerSec: number; bytesPerSec: number } | null;
  /** Highest vCPU throttle applied (0 = none). */
  maxThrottle: number;
  postcopy: {
    faults: number;
    faultLatencyMs: HistogramSummary;
    /** The vCPU's own waits for its faults, as the destination measured them where it blocks (engine, post-copy; null otherwise). */
    vcpuWaitMs: HistogramSummary | null;
  };
  /** Work per second before vs during the migration; ratio = during / before. */
  degradation: { beforePerSec: number; duringPerSec: number; ratio: number } | null;
  /** Destination memory matched the source (null if not checked). */
  verified: boolean | null;
  /** How the pages travelled: streams, codecs and what they saved (set by the engine; absent in simulations). */
  transfer?: TransferReport;
}

export interface TransferReport {
  /** Connections that carried pages (the control connection counts as the first). */
  streams: number;
  /** Post-copy page requests had a connection of their own. */
  faultChannel: boolean;
  /** Codecs agreed beyond zero pages. */
  codecs: string[];
  /** Gang the VM migrated with (shared de-duplication), or null. */
  gang: string | null;
  /** Guest page bytes the streams carried (pages × page size, zero pages included) … */
  pageBytes: number;
  /** … and the bytes they became in PAGES / BATCH payloads. */
  encodedBytes: number;
  /** pageBytes ÷ encodedBytes. */
  reduction: number;
  /** Codec counters summed over the streams (xbzrle hits / misses / overflows, dedup refs / defs, …). */
  codecStats: Record<string, number>;
  /** lz4/zstd compression, when agreed: whether the last decision was on, how often it flipped, the measured speedup. */
  compression: { on: boolean; flips: number; speedup: number | null } | null;
}

export interface ReportBuilderInit {
  technique: string;
  memoryBytes: number;
  /** Guest memory in use at the start (default memoryBytes). */
  guestBytes?: number;
  pageSize?: number;
  histogram?: HistogramOptions;
}

/**
 * Collects events (in any order within a phase; they are sorted by time, stably) and computes a
 * {@link MigrationReport}. Fields whose events are missing are null.
 */
export class MigrationReportBuilder {
  private readonly events: MigrationEvent[] = [];
  readonly faultLatency: Histogram;

  constructor(readonly init: ReportBuilderInit) {
    this.faultLatency = new Histogram(init.histogram);
  }

  add(event: MigrationEvent): this {
    this.events.push(event);
    if (event.type === 'fault') this.faultLatency.record(event.latencyMs);
    return this;
  }

  build(): MigrationReport {
    const ev = this.events.map((e, i) => ({ e, i })).sort((a, b) => a.e.t - b.e.t || a.i - b.i).map((x) => x.e);
    const pageSize = this.init.pageSize ?? 4096;
    const first = (type: MigrationEvent['type']) => ev.find((e) => e.type === type)?.t ?? null;
    const last = (type: MigrationEvent['type']) => [...ev].reverse().find((e) => e.type === type)?.t ?? null;
    const start = first('start');
    const paused = first('paused');
    const resumed = last('resumed');
    // Written to the kernel as the engine learns of it: that news may come after RESUMED itself.
    const sw = first('switchover-sent');
    const sentAll = paused === null || resumed === null || sw === null ? null : Math.min(resumed, Math.max(paused, sw));
    const complete = last('complete');
    const released = first('source-released');
    const span = (a: number | null, b: number | null) => (a === null || b === null ? null : b - a);

    const pages: PageCounts = { firstPass: 0, resent: 0, pushed: 0, faulted: 0, total: 0 };
    const bytes = { firstPass: 0, resent: 0, pushed: 0, faulted: 0, total: 0, state: 0, wire: 0 };
    const key = { first: 'firstPass', resent: 'resent', pushed: 'pushed', faulted: 'faulted' } as const;
    const rounds: RoundReport[] = [];
    const open = new Map<number, RoundReport>();
    let current: RoundReport | null = null;
    let faults = 0;
    let vcpuWaitMs: HistogramSummary | null = null;
    let clientGap: number | null = null;
    let maxThrottle = 0;
    let verified: boolean | null = null;
    let estimatedDowntimeMs: number | null = null;
    let fixedDowntimeMs: number | null = null;
    const progress: { t: number; work: number }[] = [];

    for (const e of ev) {
      switch (e.type) {
        case 'round-start': {
          const r: RoundReport = { round: e.round, startMs: e.t, durationMs: 0, pagesSent: 0, bytesSent: 0, dirtyPages: 0, dirtyRatePagesPerSec: null };
          open.set(e.round, r);
          rounds.push(r);
          current = r;
          break;
        }
        case 'round-end': {
          const r = open.get(e.round);
          if (!r) break;
          r.durationMs = e.t - r.startMs;
          r.dirtyPages = e.dirtyPages;
          r.dirtyRatePagesPerSec = r.durationMs > 0 ? (e.dirtyPages / r.durationMs) * 1000 : null;
          open.delete(e.round);
          if (current === r) current = null;
          break;
        }
        case 'pages':
          pages[key[e.kind]] += e.pages;
          bytes[key[e.kind]] += e.bytes;
          if (current) {
            current.pagesSent += e.pages;
            current.bytesSent += e.bytes;
          }
          break;
        case 'state':
          bytes.state += e.bytes;
          break;
        case 'fault':
          faults++;
          break;
        case 'fault-waits':
          vcpuWaitMs = e.waits;
          break;
        case 'client-gap':
          if (inWindow(e.t, start, complete)) clientGap = Math.max(clientGap ?? 0, e.durationMs);
          break;
        case 'throttle':
          maxThrottle = Math.max(maxThrottle, e.fraction);
          break;
        case 'progress':
          progress.push({ t: e.t, work: e.work });
          break;
        case 'verified':
          verified = (verified ?? true) && e.ok;
          break;
        case 'stop-decision':
          // Infinite when the bandwidth was unknown (a policy stopped on another condition).
          estimatedDowntimeMs = Number.isFinite(e.estimatedDowntimeMs) ? e.estimatedDowntimeMs : null;
          fixedDowntimeMs = estimatedDowntimeMs === null ? null : e.fixedDowntimeMs;
          break;
        default:
          break;
      }
    }
    pages.total = pages.firstPass + pages.resent + pages.pushed + pages.faulted;
    bytes.total = bytes.firstPass + bytes.resent + bytes.pushed + bytes.faulted;
    bytes.wire = bytes.total + bytes.state;

    let dirtyRate: MigrationReport['dirtyRate'] = null;
    const timed = rounds.filter((r) => r.durationMs > 0);
    if (timed.length) {
      const d = timed.reduce((s, r) => s + r.dirtyPages, 0);
      const t = timed.reduce((s, r) => s + r.durationMs, 0);
      const pps = (d / t) * 1000;
      dirtyRate = { pagesPerSec: pps, bytesPerSec: pps * pageSize };
    }

    return {
      technique: this.init.technique,
      memoryBytes: this.init.memoryBytes,
      guestBytes: this.init.guestBytes ?? this.init.memoryBytes,
      pageSize,
      totalMigrationTimeMs: span(start, complete),
      downtimeMs: span(paused, resumed),
      downtimeParts: sentAll === null ? null : { sourceMs: sentAll - paused!, destinationMs: resumed! - sentAll },
      estimatedDowntimeMs,
      fixedDowntimeMs,
      clientDowntimeMs: clientGap,
      preparationTimeMs: span(start, paused),
      resumeTimeMs: span(resumed, complete),
      evictionTimeMs: span(start, released),
      pages,
      bytes,
      rounds,
      dirtyRate,
      maxThrottle,
      postcopy: { faults, faultLatencyMs: this.faultLatency.summary(), vcpuWaitMs },
      degradation: degradation(progress, start, complete),
      verified,
    };
  }
}

function inWindow(t: number, a: number | null, b: number | null): boolean {
  return (a === null || t >= a) && (b === null || t <= b);
}

/**
 * Application degradation: the work rate (cumulative `work` counter sampled by `progress` events)
 * during [start, complete] over the rate before start. Needs ≥ 2 samples on each side, counting
 * the boundary sample: the last sample at or before start begins the "during" window.
 */
function degradation(samples: { t: number; work: number }[], start: number | null, complete: number | null): MigrationReport['degradation'] {
  if (start === null || complete === null) return null;
  const before = samples.filter((s) => s.t <= start);
  const during = samples.filter((s) => s.t >= start && s.t <= complete);
  if (before.length && (during.length === 0 || during[0].t > start)) during.unshift(before[before.length - 1]);
  const rate = (xs: { t: number; work: number }[]) => {
    if (xs.length < 2) return null;
    const a = xs[0];
    const b = xs[xs.length - 1];
    return b.t > a.t ? ((b.work - a.work) / (b.t - a.t)) * 1000 : null;
  };
  const r0 = rate(before);
  const r1 = rate(during);
  if (r0 === null || r1 === null || r0 === 0) return null;
  return { beforePerSec: r0, duringPerSec: r1, ratio: r1 / r0 };
}

// ---------------------------------------------------------------------------------------------
// Formatting (pure strings)

/** The report as stable, pretty JSON (non-finite numbers become null). */
export function reportToJson(report: MigrationReport): string {
  return JSON.stringify(report, (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2);
}

/** A duration for the report table, '—' when there is none. */
const ms = (v: number | null) => (v === null ? '—' : formatDuration(v));

/** The report table's fault line: with the vCPU's own waits when the destination measured them, the source's side beside them. */
function postcopyFaults(p: MigrationReport['postcopy']): string {
  if (!p.faults && !p.vcpuWaitMs?.count) return '0';
  const pct = (h: HistogramSummary) => `p50 ${ms(h.p50)}, p99 ${ms(h.p99)}`;
  if (!p.vcpuWaitMs) return `${p.faults} (${pct(p.faultLatencyMs)})`;
  return `${p.vcpuWaitMs.count} (the vCPU waited ${pct(p.vcpuWaitMs)}; the source answered in ${pct(p.faultLatencyMs)})`;
}

/** A two-column human table of the headline metrics, then one line per round. */
export function formatReportTable(r: MigrationReport): string {
  const rows: [string, string][] = [
    ['technique', r.technique],
    ['memory', r.guestBytes === r.memoryBytes ? formatBytes(r.memoryBytes) : `${formatBytes(r.memoryBytes)} (${formatBytes(r.guestBytes)} in use at the start)`],
    ['total migration time', ms(r.totalMigrationTimeMs)],
    ['downtime', r.downtimeParts ? `${ms(r.downtimeMs)} (the source sending ${ms(r.downtimeParts.sourceMs)}, then the destination ${ms(r.downtimeParts.destinationMs)})` : ms(r.downtimeMs)],
    ['estimated downtime', r.estimatedDowntimeMs === null ? '—' : `${ms(r.estimatedDowntimeMs)} (the stop policy's, when pre-copy stopped${r.fixedDowntimeMs ? `; ${ms(r.fixedDowntimeMs)} of it fixed` : ''})`],
    ['client-observed downtime', ms(r.clientDowntimeMs)],
    ['preparation time', ms(r.preparationTimeMs)],
    ['resume time', ms(r.resumeTimeMs)],
    ['eviction time', ms(r.evictionTimeMs)],
    ['pages sent', `${r.pages.total} (first ${r.pages.firstPass}, re-sent ${r.pages.resent}, pushed ${r.pages.pushed}, faulted ${r.pages.faulted})`],
    ['bytes on the wire', `${formatBytes(r.bytes.wire)} (${(r.bytes.wire / Math.max(1, r.guestBytes)).toFixed(2)}× ${r.guestBytes === r.memoryBytes ? 'memory' : 'the memory in use'})`],
    ['rounds', String(r.rounds.length)],
    ['dirty rate', r.dirtyRate ? `${r.dirtyRate.pagesPerSec.toFixed(0)} pages/s (${formatBytes(r.dirtyRate.bytesPerSec)}/s)` : '—'],
    ['max vCPU throttle', `${(r.maxThrottle * 100).toFixed(0)} %`],
    ['post-copy faults', postcopyFaults(r.postcopy)],
    ['degradation', r.degradation ? `${(r.degradation.ratio * 100).toFixed(1)} % of pre-migration rate` : '—'],
    ['verified', r.verified === null ? '—' : r.verified ? 'yes' : 'NO'],
  ];
  const w = Math.max(...rows.map(([k]) => k.length));
  const lines = rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`);
  if (r.rounds.length) {
    lines.push('', 'round  duration     pages sent  dirty after');
    for (const x of r.rounds) lines.push(`${String(x.round).padStart(5)}  ${formatDuration(x.durationMs).padStart(10)}  ${String(x.pagesSent).padStart(10)}  ${String(x.dirtyPages).padStart(11)}`);
  }
  return lines.join('\n') + '\n';
}

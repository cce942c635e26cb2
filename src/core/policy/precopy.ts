/**
 * Pre-copy decisions: when to stop iterating, how hard to throttle the vCPU, which dirty pages to
 * hold back, and in which order to send the next round.
 *
 * The stop conditions are the survey's ("Types of live virtual machine migration", pre-copy):
 * termination "is executed if any one out of three conditions meet: (i) the number of iterations
 * exceeds pre-defined iterations, or (ii) the total amount of memory that has been sent or (iii) the
 * number of dirty pages in just previous round fall below the defined threshold". ferry reads (ii)
 * as Xen's "more than `maxSentRatio` × memory sent" and (iii) as "the remaining dirty pages could
 * be sent within the downtime budget at the measured bandwidth" — the survey's eq. (2),
 * `t_d = d·l·t_n / b`, where `d·l·t_n` is exactly the dirty data left after the last round — or,
 * optionally, below an absolute page count (Xen's 50 pages).
 *
 * Round numbering follows eq. (3): round 0 is the full first pass, round i ≥ 1 resends what was
 * dirtied during round i−1.
 */
import { Bitmap } from '../bitmap.js';
import { InvalidArgumentError } from '../errors.js';
import { PAGE_SIZE } from '../pages.js';

/** What the engine (or simulator) measured when a pre-copy round ended. */
export interface PrecopyRoundStats {
  /** Index of the round that just ended (0 = the full first pass). */
  round: number;
  /** Pages sent during this round. */
  pagesSentRound: number;
  /** Pages sent so far, all rounds. */
  pagesSentTotal: number;
  /** Bytes put on the wire so far, all rounds (after codecs). */
  bytesSentTotal: number;
  /** Guest memory size, bytes. */
  memoryBytes: number;
  /** Pages dirty now — what the next round or the stop-and-copy would send (deferred hot pages included). */
  dirtyPages: number;
  /** Measured transfer rate, bytes per second (0 if unknown). */
  bandwidthBytesPerSec: number;
  /** Measured dirtying rate, bytes per second. */
  dirtyRateBytesPerSec: number;
  /** Bytes per page on the wire for the downtime estimate. Default PAGE_SIZE (uncompressed). */
  pageBytes?: number;
}

export interface PrecopyStopOptions {
  /** Largest acceptable downtime, ms. Default 300. */
  downtimeBudgetMs?: number;
  /** Most live rounds (condition i). Default 30 (Xen's limit is 29 + the last). */
  maxRounds?: number;
  /** Stop once more than this × memory has been sent (condition ii). Default 3 (Xen's max_factor). */
  maxSentRatio?: number;
  /** Also converged when at most this many pages are dirty (Xen uses 50). Default 0. */
  dirtyPageThreshold?: number;
  /** Fixed part of the downtime (device/CPU state, resume), ms, added to the estimate. Default 0. */
  fixedDowntimeMs?: number;
  /** k: rounds without a new low in the dirty count that mean "not converging". Default 3. */
  notConvergingRounds?: number;
  /**
   * Stop (reason 'not-converging') rather than just flag it. Default false; hybrid switches
   * instead. A budget the fixed part alone fills (`fixedDowntimeMs ≥ downtimeBudgetMs`) stops so
   * regardless: no round can meet it, so rounds go on only while they shrink the dirty set.
   */
  stopWhenNotConverging?: boolean;
}

export type PrecopyStopReason = 'converged' | 'round-limit' | 'sent-too-much' | 'not-converging';

export interface PrecopyDecision {
  stop: boolean;
  /** Why it stops, or 'continue'. When several conditions hold, the first in the order of {@link PrecopyStopReason} wins. */
  reason: PrecopyStopReason | 'continue';
  /** Downtime if the VM were stopped now: eq. (2) plus `fixedDowntimeMs`. Infinity if bandwidth is unknown and pages are dirty. */
  estimatedDowntimeMs: number;
  /** The dirty set has not reached a new low for `notConvergingRounds` rounds. */
  notConverging: boolean;
}

export const PRECOPY_DEFAULTS: Required<PrecopyStopOptions> = {
  downtimeBudgetMs: 300,
  maxRounds: 30,
  maxSentRatio: 3,
  dirtyPageThreshold: 0,
  fixedDowntimeMs: 0,
  notConvergingRounds: 3,
  stopWhenNotConverging: false,
};

/** Eq. (2): t_d = d·l·t_n / b — the dirty data left (`dirtyPages × pageBytes`) over the bandwidth — plus a fixed part. */
export function estimateDowntimeMs(dirtyPages: number, bandwidthBytesPerSec: number, pageBytes = PAGE_SIZE, fixedMs = 0): number {
  if (dirtyPages <= 0) return fixedMs;
  if (!(bandwidthBytesPerSec > 0)) return Number.POSITIVE_INFINITY;
  return ((dirtyPages * pageBytes) / bandwidthBytesPerSec) * 1000 + fixedMs;
}

/**
 * True when the last `k` entries of `dirtyCounts` (pages dirty after each round, oldest first) hold no
 * value below the minimum of the entries before them: k rounds of no progress.
 */
export function isNotConverging(dirtyCounts: readonly number[], k: number): boolean {
  if (k < 1 || dirtyCounts.length <= k) return false;
  let before = Number.POSITIVE_INFINITY;
  for (let i = 0; i < dirtyCounts.length - k; i++) before = Math.min(before, dirtyCounts[i]);
  for (let i = dirtyCounts.length - k; i < dirtyCounts.length; i++) if (dirtyCounts[i] < before) return false;
  return true;
}

/**
 * The stop decision after a round. `previousDirty` holds the dirty counts after the earlier rounds
 * (oldest first, not including `stats.dirtyPages`).
 */
/** Defaults merged with options, where an option left `undefined` keeps its default. */
function withDefaults(options: PrecopyStopOptions): Required<PrecopyStopOptions> {
  const o = { ...PRECOPY_DEFAULTS };
  for (const [k, v] of Object.entries(options)) if (v !== undefined) (o as Record<string, unknown>)[k] = v;
  return o;
}

export function decidePrecopyStop(stats: PrecopyRoundStats, previousDirty: readonly number[], options: PrecopyStopOptions = {}): PrecopyDecision {
  const o = withDefaults(options);
  const estimatedDowntimeMs = estimateDowntimeMs(stats.dirtyPages, stats.bandwidthBytesPerSec, stats.pageBytes ?? PAGE_SIZE, o.fixedDowntimeMs);
  const notConverging = isNotConverging([...previousDirty, stats.dirtyPages], o.notConvergingRounds);
  const decide = (reason: PrecopyDecision['reason']): PrecopyDecision => ({ stop: reason !== 'continue', reason, estimatedDowntimeMs, notConverging });
  if (estimatedDowntimeMs <= o.downtimeBudgetMs || stats.dirtyPages <= o.dirtyPageThreshold) return decide('converged');
  if (stats.round + 1 >= o.maxRounds) return decide('round-limit');
  if (stats.bytesSentTotal > o.maxSentRatio * stats.memoryBytes) return decide('sent-too-much');
  if (notConverging && (o.stopWhenNotConverging || o.fixedDowntimeMs >= o.downtimeBudgetMs)) return decide('not-converging');
  return decide('continue');
}

/** {@link decidePrecopyStop} with the dirty-count history kept for you (one instance per migration). */
export class PrecopyStopPolicy {
  private readonly dirty: number[] = [];
  constructor(readonly options: PrecopyStopOptions = {}) {}

  decide(stats: PrecopyRoundStats): PrecopyDecision {
    const d = decidePrecopyStop(stats, this.dirty, this.options);
    this.dirty.push(stats.dirtyPages);
    return d;
  }

  /** Whether it would stop after a round with `stats`, having seen `history` (for a forecast: nothing is recorded). */
  ends(stats: PrecopyRoundStats, history: readonly number[]): boolean {
    return decidePrecopyStop(stats, history, this.options).stop;
  }

  /** Dirty counts after each round seen so far, oldest first. */
  get history(): readonly number[] {
    return this.dirty;
  }
}

// ---------------------------------------------------------------------------------------------
// Auto-converge (vCPU throttling)

export interface AutoConvergeOptions {
  /** First throttle applied, fraction of vCPU time taken away (QEMU cpu-throttle-initial 20 %). Default 0.2. */
  initial?: number;
  /** Step added each later time (QEMU cpu-throttle-increment 10 %). Default 0.1. */
  increment?: number;
  /** Cap (QEMU max-cpu-throttle 99 %). Default 0.99. */
  max?: number;
  /** A round is "too dirty" when bytes dirtied > triggerRatio × bytes sent in it (QEMU throttle-trigger-threshold 50 %). Default 0.5. */
  triggerRatio?: number;
  /** Too-dirty rounds needed per step (QEMU's dirty_rate_high_cnt ≥ 2). Default 2. */
  triggerRounds?: number;
}

/**
 * Auto-converge as QEMU does it (Jin et al. [113] in the survey slow the vCPU for the same end):
 * count rounds in which the guest dirtied more than `triggerRatio` of what was sent; every
 * `triggerRounds` such rounds, throttle harder — `initial` the first time, then `+increment`, never
 * above `max`. The throttle never relaxes during a migration.
 */
export class AutoConverge {
  private o: Required<AutoConvergeOptions>;
  private high = 0;
  /** Current throttle: fraction of vCPU time taken away, 0 ≤ throttle ≤ max. */
  throttle = 0;

  constructor(options: AutoConvergeOptions = {}) {
    this.o = { initial: 0.2, increment: 0.1, max: 0.99, triggerRatio: 0.5, triggerRounds: 2, ...options };
    if (!(this.o.initial > 0 && this.o.max <= 1 && this.o.initial <= this.o.max && this.o.increment >= 0)) {
      throw new InvalidArgumentError(`auto-converge needs 0 < initial ≤ max ≤ 1 and increment ≥ 0`);
    }
  }

  /** Feeds one round's bytes dirtied and bytes sent; returns the throttle to apply from now on. */
  onRound(bytesDirtiedRound: number, bytesSentRound: number): number {
    if (bytesDirtiedRound > this.o.triggerRatio * bytesSentRound && ++this.high >= this.o.triggerRounds) {
      this.high = 0;
      this.throttle = this.throttle === 0 ? this.o.initial : Math.min(this.o.max, this.throttle + this.o.increment);
    }
    return this.throttle;
  }
}

/**
 * The throttle that brings the dirty rate down to `targetRatio` × bandwidth in one step, assuming
 * dirtying scales with vCPU time (Jin et al. [113] lower the vCPU frequency "to the required service
 * downtime limit"): `1 − targetRatio·b / d`, clamped to [0, max]. With λ = d/b this makes the
 * throttled λ' = targetRatio, so eq. (5)'s rounds shrink by that factor each time.
 */
export function throttleForRatio(dirtyRateBytesPerSec: number, bandwidthBytesPerSec: number, targetRatio = 0.5, max = 0.99): number {
  if (!(dirtyRateBytesPerSec > 0)) return 0;
  return Math.min(max, Math.max(0, 1 - (targetRatio * bandwidthBytesPerSec) / dirtyRateBytesPerSec));
}

export interface RateLimitOptions {
  /** First round's rate (Clark: 100 Mbit/s). Default 12.5e6 B/s. */
  minBytesPerSec?: number;
  /** Ceiling (Clark: 500 Mbit/s). Default 62.5e6 B/s. */
  maxBytesPerSec?: number;
  /** Added to the previous round's dirty rate (Clark: 50 Mbit/s). Default 6.25e6 B/s. */
  incrementBytesPerSec?: number;
}

/**
 * Clark et al.'s dynamic rate limiting [33]: each round may use the previous round's dirtying rate
 * plus a constant increment, between a minimum and a maximum. When the limit would exceed the
 * maximum, pre-copy is not going to win against the guest and `atMax` tells the engine to stop.
 * Pass `null` for the first round.
 */
export function dynamicRateLimit(previousDirtyRateBytesPerSec: number | null, options: RateLimitOptions = {}): { rateBytesPerSec: number; atMax: boolean } {
  const min = options.minBytesPerSec ?? 12.5e6;
  const max = options.maxBytesPerSec ?? 62.5e6;
  const inc = options.incrementBytesPerSec ?? 6.25e6;
  if (previousDirtyRateBytesPerSec === null) return { rateBytesPerSec: min, atMax: false };
  const want = Math.max(min, previousDirtyRateBytesPerSec + inc);
  return { rateBytesPerSec: Math.min(max, want), atMax: want >= max };
}

// ---------------------------------------------------------------------------------------------
// Per-page dirty history: hot-page deferral, LRU ordering, CBP prediction

/**
 * The last `depth` (≤ 8) rounds of each page's dirty bit, one byte per page (bit 0 = the latest
 * round), plus a context table for context-based prediction: Yong et al.'s CBP [115] predicts a
 * page's next dirty bit from its recent bit pattern (PPM over the dirty bitmap history); ferry
 * keeps a fixed-order model — counts of "dirty next" per `order`-bit context, learnt over all pages.
 */
export class DirtyHistory {
  readonly bits: Uint8Array;
  /** Rounds recorded. */
  rounds = 0;
  readonly order: number;
  private readonly seen: Float64Array;
  private readonly hits: Float64Array;

  constructor(readonly pageCount: number, options: { order?: number } = {}) {
    this.order = options.order ?? 4;
    if (!(this.order >= 1 && this.order <= 7)) throw new InvalidArgumentError(`CBP order ${this.order} must be 1..7`);
    this.bits = new Uint8Array(pageCount);
    this.seen = new Float64Array(1 << this.order);
    this.hits = new Float64Array(1 << this.order);
  }

  /** Records one round's harvested dirty bitmap (O(pages)). */
  record(dirty: Bitmap): void {
    if (dirty.size !== this.pageCount) throw new InvalidArgumentError(`dirty bitmap of ${dirty.size} pages for a history of ${this.pageCount}`);
    const mask = (1 << this.order) - 1;
    const learn = this.rounds >= this.order;
    const b = this.bits;
    const w = dirty.words;
    for (let p = 0; p < b.length; p++) {
      const d = (w[p >>> 5] >>> (p & 31)) & 1;
      if (learn) {
        const ctx = b[p] & mask;
        this.seen[ctx]++;
        this.hits[ctx] += d;
      }
      b[p] = ((b[p] << 1) | d) & 0xff;
    }
    this.rounds++;
  }

  /** Consecutive most recent rounds in which `page` was dirtied (0..8). */
  streak(page: number): number {
    const v = this.bits[page];
    return v === 0xff ? 8 : 31 - Math.clz32(~v & (v + 1));
  }

  /** Rounds since `page` was last dirtied (0 = in the latest round; 8 = not in the window). */
  roundsSinceDirty(page: number): number {
    const v = this.bits[page];
    return v === 0 ? 8 : 31 - Math.clz32(v & -v);
  }

  /** CBP: estimated probability that `page` is dirtied in the next round (0.5 when the context is unseen). */
  predict(page: number): number {
    return this.predictContext(this.bits[page] & ((1 << this.order) - 1));
  }

  /** CBP: estimated probability of "dirty next" after the `order`-bit pattern `ctx` (bit 0 = latest round). */
  predictContext(ctx: number): number {
    return this.seen[ctx] > 0 ? this.hits[ctx] / this.seen[ctx] : 0.5;
  }
}

/**
 * Hot-page deferral (Fei Ma et al. [111]; Mohan and Shine [116] "postpone the transmission of
 * frequently dirty pages"): of the candidate pages (this round's harvest ∪ pages deferred earlier),
 * those dirtied in each of the last `k` recorded rounds are held back until stop-and-copy.
 * Record the harvest in `history` before calling. A deferred page that stops being dirtied is
 * released by the next call, since its latest bit is then 0.
 */
export function deferHotPages(candidates: Bitmap, history: DirtyHistory, k = 2): { send: Bitmap; deferred: Bitmap } {
  const send = new Bitmap(candidates.size);
  const deferred = new Bitmap(candidates.size);
  if (k < 1 || history.rounds < k) {
    send.or(candidates);
    return { send, deferred };
  }
  const hotMask = (1 << Math.min(k, 8)) - 1;
  for (const p of candidates) {
    if ((history.bits[p] & hotMask) === hotMask) deferred.set(p);
    else send.set(p);
  }
  return { send, deferred };
}

/**
 * Page order for a round:
 * - `ascending` — page number order (round 0, or no history);
 * - `cold-first` — LRU-style (Zaw and Thein [114]): pages dirtied longest ago first, the most
 *   recently dirtied last, so hot pages are sent as late as possible and re-dirtied less;
 * - `predicted` — CBP: lowest predicted probability of being dirtied again first.
 * Ties keep page-number order. O(pages) (counting sort over at most 2^order + 9 keys).
 */
export type PageOrder = 'ascending' | 'cold-first' | 'predicted';

export function orderPages(candidates: Bitmap, history: DirtyHistory | null, order: PageOrder): Uint32Array {
  const n = candidates.count();
  const out = new Uint32Array(n);
  if (order === 'ascending' || history === null) {
    let i = 0;
    for (const p of candidates) out[i++] = p;
    return out;
  }
  // Bucket key: small = send first.
  let keyOf: (p: number) => number;
  let buckets: number;
  if (order === 'cold-first') {
    buckets = 9;
    keyOf = (p) => 8 - history.roundsSinceDirty(p);
  } else {
    const ctxs = 1 << history.order;
    const probs = Array.from({ length: ctxs }, (_, c) => ({ c, pr: history.predictContext(c) }));
    probs.sort((a, b) => a.pr - b.pr || a.c - b.c);
    const rank = new Uint16Array(ctxs);
    probs.forEach((x, i) => (rank[x.c] = i));
    const mask = ctxs - 1;
    buckets = ctxs;
    keyOf = (p) => rank[history.bits[p] & mask];
  }
  const start = new Uint32Array(buckets + 1);
  for (const p of candidates) start[keyOf(p) + 1]++;
  for (let b = 0; b < buckets; b++) start[b + 1] += start[b];
  for (const p of candidates) out[start[keyOf(p)]++] = p;
  return out;
}

/** The ordering ferry uses for the next round: ascending with no history, CBP once its model has data, LRU in between. */
export function choosePageOrder(nextRound: number, history: DirtyHistory | null): PageOrder {
  if (nextRound === 0 || history === null || history.rounds === 0) return 'ascending';
  return history.rounds > history.order ? 'predicted' : 'cold-first';
}

/**
 * Closed-form cost models of live migration (survey, "Performance metrics", eq. 1–6, after Liu et
 * al. [69]) and the AVG/HIST dirty-rate predictors (Akoush et al. [70]).
 *
 * The survey's equations, as printed:
 *
 *   (1) t_m   = v_m / b                               total migration time from data moved and bandwidth
 *   (2) t_d   = d·l·t_n / b                           downtime: what the last pre-copy round n left dirty
 *   (3) v_i   = v_mem            if i = 0             data sent in round i
 *             = d·t_{i−1}        otherwise
 *   (4) t_i   = v_mem·d^i / r^(i+1)                  duration of round i
 *   (5) v_mig = Σ_{i=0..n} v_mem·(d/r)^i              network traffic
 *   (6) t_mig = Σ_{i=0..n} t_i                        migration latency
 *
 * Reading them together (the constant-dirty-rate world): with t_i = v_i / r, (3) gives
 * v_i = v_mem·λ^i and t_i = v_mem·λ^i / r with λ = d/r, which is (4); (5) and (6) are the geometric
 * sums of rounds 0..n. Two things need care:
 * - Units. In (2) `d` is a page rate (pages/s) and `l` the page size; in (3)–(5) `d` is a byte rate
 *   (`d·t_{i−1}` is an amount of memory). ferry passes one byte rate everywhere:
 *   `dirtyRateBytesPerSec` = d·l. `b` (link speed) and `r` (transmission rate) are the same
 *   number here, `bandwidthBytesPerSec`.
 * - Which round is the stop-and-copy. (2) charges the downtime to the data dirtied during "the last
 *   pre-copy round n", so rounds 0..n are the live rounds and the stop-and-copy sends
 *   v_{n+1} = d·t_n with the VM paused: t_d = v_{n+1} / b = t_{n+1}. (5) and (6) summed to n
 *   therefore count the live rounds only; the whole migration moves v_mig(n) + v_{n+1} bytes in
 *   t_mig(n) + t_d. (Read round n as the stop-and-copy itself and (5), (6) are already the totals;
 *   they are then this module's figures for n − 1.)
 * - The model lets every dirtying hit a fresh page and never caps a round at v_mem; a simulator that
 *   dirties distinct pages at a constant byte rate, with λ < 1, reproduces it.
 *
 * {@link precopyRounds} evaluates the recurrence (3) round by round, stopping by the very
 * {@link decidePrecopyStop} the engine uses, so a simulator that runs that policy in the
 * constant-rate world can be compared with it to floating-point precision; {@link precopyClosedForm}
 * evaluates the closed forms (4)–(6), which agree with the recurrence to rounding.
 */
import { InvalidArgumentError } from './errors.js';
import { PAGE_SIZE } from './pages.js';
import { decidePrecopyStop, type PrecopyRoundStats, type PrecopyStopOptions, type PrecopyStopReason } from './policy/precopy.js';

export interface PrecopyModelInput {
  /** v_mem, bytes. */
  memoryBytes: number;
  /** b = r, bytes per second. */
  bandwidthBytesPerSec: number;
  /** d·l, bytes per second. */
  dirtyRateBytesPerSec: number;
}

/** Eq. (1): t_m = v_m / b, in ms. */
export function migrationTimeMs(bytes: number, bandwidthBytesPerSec: number): number {
  return (bytes / bandwidthBytesPerSec) * 1000;
}

/** Eq. (2): t_d = d·l·t_n / b, in ms, from the dirty byte rate d·l and the last live round's duration t_n (ms). */
export function downtimeMs(dirtyRateBytesPerSec: number, lastRoundMs: number, bandwidthBytesPerSec: number): number {
  return (dirtyRateBytesPerSec * lastRoundMs) / bandwidthBytesPerSec;
}

/** Eq. (3)/(4): v_i = v_mem·(d/r)^i, bytes sent in live round i. */
export function roundBytes(input: PrecopyModelInput, i: number): number {
  return input.memoryBytes * Math.pow(input.dirtyRateBytesPerSec / input.bandwidthBytesPerSec, i);
}

/**
 * Eq. (4): t_i = v_mem·d^i / r^(i+1), ms — evaluated as v_mem·λ^i / r, the same quantity, because
 * d^i and r^(i+1) overflow or lose precision long before their ratio does.
 */
export function roundTimeMs(input: PrecopyModelInput, i: number): number {
  return migrationTimeMs(roundBytes(input, i), input.bandwidthBytesPerSec);
}

/** Eq. (5): v_mig = Σ_{i=0..n} v_mem·(d/r)^i, bytes (live rounds 0..n), as a geometric sum. */
export function liveBytes(input: PrecopyModelInput, n: number): number {
  const lambda = input.dirtyRateBytesPerSec / input.bandwidthBytesPerSec;
  if (lambda === 1) return input.memoryBytes * (n + 1);
  return (input.memoryBytes * (1 - Math.pow(lambda, n + 1))) / (1 - lambda);
}

/** Eq. (6): t_mig = Σ_{i=0..n} t_i, ms (live rounds 0..n) = v_mig / r. */
export function liveTimeMs(input: PrecopyModelInput, n: number): number {
  return migrationTimeMs(liveBytes(input, n), input.bandwidthBytesPerSec);
}

export interface PrecopyPrediction {
  /** Live rounds, in order: bytes sent (v_i) and duration (t_i, ms). */
  rounds: { bytes: number; timeMs: number }[];
  /**
   * Why the live phase ended ('round-limit' too when `maxModelRounds` ran out: see `ended`; and
   * whenever `options.ends` decided, which says only that it ends).
   */
  reason: PrecopyStopReason;
  /** The policy ended the live phase (false: `maxModelRounds` ran out first). */
  ended: boolean;
  /** Bytes sent with the VM paused: v_{n+1} = d·t_n (plus `stateBytes`). */
  stopCopyBytes: number;
  /** Eq. (2) + state transfer + `fixedDowntimeMs`. */
  downtimeMs: number;
  /** Eq. (5) + the stop-and-copy. */
  totalBytes: number;
  /** Eq. (6) + the downtime (preparation + downtime; resume is negligible in pre-copy). */
  totalTimeMs: number;
}

export interface PrecopyPredictOptions extends PrecopyStopOptions {
  /** Bytes per page for the dirty-page count the stop policy sees. Default PAGE_SIZE. */
  pageBytes?: number;
  /** CPU/device state sent during the downtime, bytes. Default 0. */
  stateBytes?: number;
  /** Safety cap on rounds simulated when the policy never stops. Default 10 000. */
  maxModelRounds?: number;
  /**
   * Start from a migration in progress (a forecast): round `round`, of `bytes`, is under way, after
   * `sentBytes` sent before it, the policy having seen `previousDirty`. Default: the first pass
   * of all memory.
   */
  from?: { round: number; bytes: number; sentBytes: number; previousDirty: readonly number[] };
  /** What ends the live phase, in place of decidePrecopyStop with these options (hybrid's switch, say). */
  ends?: (stats: PrecopyRoundStats, previousDirty: readonly number[]) => boolean;
}

/**
 * Bytes dirtied (distinct pages × page size) during an interval of `ms` that starts when a round
 * starts. The constant-rate world is `ms => d·ms/1000`; HIST replays a measured curve.
 */
export type DirtyCurve = (ms: number) => number;

/**
 * Runs the pre-copy recurrence — v_0 = v_mem, t_i = v_i / b, v_{i+1} = D(t_i) — stopping by
 * {@link decidePrecopyStop} with the same statistics the engine would feed it. With
 * D(t) = d·t this is eq. (3)–(6) exactly; with a measured D it is Akoush et al.'s HIST model.
 */
export function precopyRounds(memoryBytes: number, bandwidthBytesPerSec: number, dirty: DirtyCurve, options: PrecopyPredictOptions = {}): PrecopyPrediction {
  if (!(memoryBytes >= 0 && bandwidthBytesPerSec > 0)) throw new InvalidArgumentError(`model needs memory ≥ 0 and bandwidth > 0 (got ${memoryBytes}, ${bandwidthBytesPerSec})`);
  const pageBytes = options.pageBytes ?? PAGE_SIZE;
  const stateBytes = options.stateBytes ?? 0;
  const cap = options.maxModelRounds ?? 10_000;
  const rounds: { bytes: number; timeMs: number }[] = [];
  const from = options.from ?? { round: 0, bytes: memoryBytes, sentBytes: 0, previousDirty: [] };
  const previousDirty: number[] = [...from.previousDirty];
  let v = from.bytes;
  let sent = from.sentBytes;
  let reason: PrecopyStopReason = 'round-limit';
  let ended = false;
  for (let i = from.round; i < from.round + cap; i++) {
    const t = migrationTimeMs(v, bandwidthBytesPerSec);
    rounds.push({ bytes: v, timeMs: t });
    sent += v;
    const next = dirty(t);
    const dirtyPages = next / pageBytes;
    const stats: PrecopyRoundStats = {
      round: i,
      pagesSentRound: v / pageBytes,
      pagesSentTotal: sent / pageBytes,
      bytesSentTotal: sent,
      memoryBytes,
      dirtyPages,
      bandwidthBytesPerSec,
      dirtyRateBytesPerSec: t > 0 ? (next / t) * 1000 : 0,
      pageBytes,
    };
    const decision = options.ends
      ? { stop: options.ends(stats, previousDirty), reason: 'round-limit' as const }
      : decidePrecopyStop(stats, previousDirty, { ...options, fixedDowntimeMs: (options.fixedDowntimeMs ?? 0) + migrationTimeMs(stateBytes, bandwidthBytesPerSec) });
    previousDirty.push(dirtyPages);
    v = next;
    if (decision.stop) {
      reason = decision.reason as PrecopyStopReason;
      ended = true;
      break;
    }
  }
  const stopCopyBytes = v + stateBytes;
  const down = migrationTimeMs(stopCopyBytes, bandwidthBytesPerSec) + (options.fixedDowntimeMs ?? 0);
  const liveMs = rounds.reduce((s, r) => s + r.timeMs, 0);
  return { rounds, reason, ended, stopCopyBytes, downtimeMs: down, totalBytes: sent + stopCopyBytes, totalTimeMs: liveMs + down };
}

/** The constant-dirty-rate world: D(t) = d·t. */
export function constantDirty(dirtyRateBytesPerSec: number): DirtyCurve {
  return (ms) => (dirtyRateBytesPerSec * ms) / 1000;
}

/**
 * Closed form (eq. 2, 4–6) for a pre-copy with exactly `n + 1` live rounds (0..n), then stop-and-copy.
 * Valid for any λ = d/r (λ ≥ 1 just means the rounds grow).
 */
export function precopyClosedForm(input: PrecopyModelInput, n: number): { lastRoundMs: number; liveBytes: number; liveTimeMs: number; downtimeMs: number; totalBytes: number; totalTimeMs: number } {
  const lastRoundMs = roundTimeMs(input, n);
  const down = downtimeMs(input.dirtyRateBytesPerSec, lastRoundMs, input.bandwidthBytesPerSec);
  const lb = liveBytes(input, n);
  const lt = liveTimeMs(input, n);
  return { lastRoundMs, liveBytes: lb, liveTimeMs: lt, downtimeMs: down, totalBytes: lb + roundBytes(input, n + 1), totalTimeMs: lt + down };
}

/**
 * Live rounds the constant-rate model needs before eq. (2) fits the downtime budget: the smallest
 * n ≥ 0 with v_mem·λ^(n+1) / b ≤ budget, i.e. n = ⌈log_λ(budget·b / v_mem)⌉ − 1; Infinity when λ ≥ 1
 * and round 0 does not already fit.
 */
export function roundsToConverge(input: PrecopyModelInput, downtimeBudgetMs: number): number {
  const lambda = input.dirtyRateBytesPerSec / input.bandwidthBytesPerSec;
  const target = (downtimeBudgetMs / 1000) * input.bandwidthBytesPerSec / input.memoryBytes;
  if (lambda <= target) return 0;
  if (lambda >= 1) return Number.POSITIVE_INFINITY;
  // λ^(n+1) ≤ target  ⇔  n + 1 ≥ ln(target)/ln(λ). The loop absorbs rounding at exact powers.
  let n = Math.max(0, Math.ceil(Math.log(target) / Math.log(lambda)) - 2);
  while (Math.pow(lambda, n + 1) > target) n++;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Post-copy and hybrid (ferry's, from the survey's description of Hines et al. [63]; the survey gives
// no equations for them)

export interface PostcopyModelInput {
  memoryBytes: number;
  bandwidthBytesPerSec: number;
  /** CPU/device state moved while paused, bytes. */
  stateBytes: number;
  /** Guest-reported free memory never sent (DSB), bytes. Default 0. */
  softBytes?: number;
  /** Fixed resume cost, ms. Default 0. */
  resumeMs?: number;
}

/**
 * Post-copy sends every non-free page exactly once: downtime = state / b (+ resume); total data =
 * state + v_mem − soft; total time (= eviction time) = total data / b by eq. (1).
 */
export function postcopyModel(input: PostcopyModelInput): { downtimeMs: number; totalBytes: number; totalTimeMs: number } {
  const totalBytes = input.stateBytes + input.memoryBytes - (input.softBytes ?? 0);
  return {
    downtimeMs: migrationTimeMs(input.stateBytes, input.bandwidthBytesPerSec) + (input.resumeMs ?? 0),
    totalBytes,
    totalTimeMs: migrationTimeMs(totalBytes, input.bandwidthBytesPerSec) + (input.resumeMs ?? 0),
  };
}

/**
 * Hybrid with k ≥ 1 live pre-copy rounds (0..k−1) then post-copy: the pages dirtied during round k−1,
 * v_k = min(v_mem, d·t_{k−1}), are sent once after resume. Downtime is the state only.
 */
export function hybridModel(input: PrecopyModelInput & { stateBytes: number; resumeMs?: number }, k: number): { downtimeMs: number; totalBytes: number; totalTimeMs: number; postcopyBytes: number } {
  if (!(k >= 1)) throw new InvalidArgumentError(`hybrid needs at least one pre-copy round (k = ${k})`);
  const pre = liveBytes(input, k - 1);
  const postcopyBytes = Math.min(input.memoryBytes, roundBytes(input, k));
  const totalBytes = pre + input.stateBytes + postcopyBytes;
  const resume = input.resumeMs ?? 0;
  return {
    downtimeMs: migrationTimeMs(input.stateBytes, input.bandwidthBytesPerSec) + resume,
    totalBytes,
    totalTimeMs: migrationTimeMs(totalBytes, input.bandwidthBytesPerSec) + resume,
    postcopyBytes,
  };
}

// ---------------------------------------------------------------------------------------------
// Dirty-rate predictors from history (Akoush et al. [70]: AVG and HIST)

/**
 * AVG: the average page dirty rate over a window of recent observations (each weighted by its
 * duration), fed to the constant-rate model.
 */
export class AvgDirtyRate {
  private readonly samples: { bytes: number; ms: number }[] = [];
  constructor(readonly window = 16) {}

  /** `bytes` dirtied (distinct pages × page size) over `ms`. */
  observe(bytes: number, ms: number): void {
    if (!(ms > 0)) return;
    this.samples.push({ bytes, ms });
    if (this.samples.length > this.window) this.samples.shift();
  }

  /** Bytes per second, or null with no observation. */
  rate(): number | null {
    if (this.samples.length === 0) return null;
    let b = 0;
    let t = 0;
    for (const s of this.samples) {
      b += s.bytes;
      t += s.ms;
    }
    return (b / t) * 1000;
  }

  /** The AVG prediction for a VM of `memoryBytes` over a link of `bandwidthBytesPerSec`. */
  predict(memoryBytes: number, bandwidthBytesPerSec: number, options?: PrecopyPredictOptions): PrecopyPrediction | null {
    const d = this.rate();
    return d === null ? null : precopyRounds(memoryBytes, bandwidthBytesPerSec, constantDirty(d), options);
  }
}

/**
 * HIST: the VM's measured dirty-set growth — distinct bytes dirtied as a function of time since a
 * harvest, sampled as points (ms, bytes) — replayed through the pre-copy recurrence. Between points
 * the curve is linear; beyond the last point it continues at the last segment's slope; it never
 * exceeds `memoryBytes`. This captures the writable working set that AVG's straight line misses
 * (hot pages dirtied twice count once).
 */
export class HistDirtyCurve {
  private readonly pts: { ms: number; bytes: number }[];

  constructor(points: readonly { ms: number; bytes: number }[], readonly memoryBytes: number) {
    this.pts = [{ ms: 0, bytes: 0 }, ...[...points].filter((p) => p.ms > 0).sort((a, b) => a.ms - b.ms)];
    for (let i = 1; i < this.pts.length; i++) {
      if (this.pts[i].bytes < this.pts[i - 1].bytes) throw new InvalidArgumentError('a dirty-set growth curve must not decrease');
    }
  }

  /** Distinct bytes dirtied within `ms` of a harvest. */
  at(ms: number): number {
    const p = this.pts;
    if (p.length === 1) return 0;
    let i = 1;
    while (i < p.length - 1 && p[i].ms < ms) i++;
    const a = p[i - 1];
    const b = p[i];
    const v = a.bytes + ((b.bytes - a.bytes) * (ms - a.ms)) / (b.ms - a.ms);
    return Math.max(0, Math.min(this.memoryBytes, v));
  }

  get curve(): DirtyCurve {
    return (ms) => this.at(ms);
  }

  predict(bandwidthBytesPerSec: number, options?: PrecopyPredictOptions): PrecopyPrediction {
    return precopyRounds(this.memoryBytes, bandwidthBytesPerSec, this.curve, options);
  }
}

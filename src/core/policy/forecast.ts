/**
 * How much a pre-copy (or hybrid) migration still has to send, by its own stop policy run forward
 * on the rates measured so far — the survey's eq. (3)–(5) taken a round at a time, with the policy
 * deciding where they end instead of a closed form. The progress display's ETA is this over the
 * measured bandwidth; a pre-copy that cannot converge (dirty rate near the link's) then says how
 * long until its stop condition on bytes sent ends it, where "what is dirty ÷ bandwidth" kept
 * promising one round's time.
 */
import { PAGE_SIZE } from '../pages.js';
import { precopyRounds, type DirtyCurve } from '../models.js';
import type { PrecopyRoundStats } from './precopy.js';

export interface PrecopyForecastInput {
  /** The round in progress (0 = the first pass). */
  round: number;
  /** Its pages, as bytes, and those of them still to go. */
  roundBytes: number;
  leftBytes: number;
  /** Sent so far, all rounds (the round in progress included). */
  bytesSentTotal: number;
  pagesSentTotal: number;
  /** Guest memory in use: no round's dirty set is larger. */
  memoryBytes: number;
  bandwidthBytesPerSec: number;
  /** Distinct pages dirtied per second, as bytes (0 while unknown: nothing more is assumed dirty). */
  dirtyRateBytesPerSec: number;
  /**
   * Bytes dirtied within `ms` of a harvest, as measured (see sampledDirtyCurve): used instead of
   * the constant rate, which a working set that fills up within a long round understates.
   */
  dirty?: DirtyCurve;
  /** Dirty pages after each finished round, oldest first (what the policy has seen). */
  history: readonly number[];
}

/**
 * Whether the policy ends pre-copy after a round with these `stats`, having seen `history` before
 * it (the pure form of PrecopyStopPolicy / HybridSwitchPolicy: stop-and-copy or switch to
 * post-copy — either way what is dirty then still has to go).
 */
export type PrecopyEnds = (stats: PrecopyRoundStats, history: readonly number[]) => boolean;

/** Most rounds run forward (the policies' own round limits are far below it). */
const MAX_ROUNDS_AHEAD = 10_000;

/**
 * Bytes still to send: the round in progress's rest; then each next round, the pages dirtied while
 * the one before it went (the dirty curve at its duration at the bandwidth, else the dirty rate ×
 * that duration; at most the memory in use),
 * until `ends` says the policy would stop; then what is dirty at that point — the models'
 * recurrence (precopyRounds), started where the migration is. Null when the bandwidth is unknown,
 * or the policy never ends within MAX_ROUNDS_AHEAD.
 */
export function precopyBytesLeft(input: PrecopyForecastInput, ends: PrecopyEnds, pageBytes = PAGE_SIZE): number | null {
  const b = input.bandwidthBytesPerSec;
  if (!(b > 0)) return null;
  const d = Math.max(0, input.dirtyRateBytesPerSec);
  const curve = input.dirty ?? ((ms: number) => (d * ms) / 1000);
  const sentBefore = input.bytesSentTotal - (input.roundBytes - input.leftBytes);
  const p = precopyRounds(input.memoryBytes, b, (ms) => Math.min(input.memoryBytes, curve(ms)), {
    pageBytes, maxModelRounds: MAX_ROUNDS_AHEAD, ends,
    from: { round: input.round, bytes: input.roundBytes, sentBytes: sentBefore, previousDirty: input.history },
  });
  return p.ended ? p.totalBytes - input.bytesSentTotal : null;
}

/**
 * Akoush et al.'s HIST: the dirty curve D(t) — pages dirtied within t ms of a harvest — from
 * samples of one round, (ms since its harvest, pages dirty then) in time order, as bytes.
 * Between samples it interpolates; past the last it goes on at the slope of the samples' last
 * quarter (flat once a working set has filled). Null with fewer than 2 samples.
 */
export function sampledDirtyCurve(samples: readonly (readonly [number, number])[], pageBytes = PAGE_SIZE): DirtyCurve | null {
  if (samples.length < 2) return null;
  const last = samples[samples.length - 1];
  const from = samples[Math.min(samples.length - 2, Math.floor((samples.length * 3) / 4))];
  const slope = last[0] > from[0] ? Math.max(0, (last[1] - from[1]) / (last[0] - from[0])) : 0;
  return (ms) => {
    if (ms >= last[0]) return (last[1] + slope * (ms - last[0])) * pageBytes;
    if (ms < samples[0][0]) return ((samples[0][1] * ms) / samples[0][0]) * pageBytes;
    // The last sample at or before `ms` (binary search: a long first pass holds many).
    let lo = 0;
    let hi = samples.length - 1;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (samples[mid][0] <= ms) lo = mid;
      else hi = mid;
    }
    const [[t0, p0], [t1, p1]] = [samples[lo], samples[lo + 1]];
    return (t1 > t0 ? p0 + ((p1 - p0) * (ms - t0)) / (t1 - t0) : p1) * pageBytes;
  };
}

/**
 * How much a pre-copy (or hybrid) migration still has to send, by its own stop policy run forward
 * on the rates measured so far — the survey's eq. (3)–(5) taken a round at a time, with the policy
 * deciding where they end instead of a closed form. The progress display's ETA is this over the
 * measured bandwidth; a pre-copy that cannot converge (dirty rate near the link's) then says how
 * long until its stop condition on bytes sent ends it, where "what is dirty ÷ bandwidth" kept
 * promising one round's time.
 */
import { PAGE_SIZE } from '../pages.js';
import { precopyRounds } from '../models.js';
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
 * the one before it went (dirty rate × its duration at the bandwidth, at most the memory in use),
 * until `ends` says the policy would stop; then what is dirty at that point — the models'
 * recurrence (precopyRounds), started where the migration is. Null when the bandwidth is unknown,
 * or the policy never ends within MAX_ROUNDS_AHEAD.
 */
export function precopyBytesLeft(input: PrecopyForecastInput, ends: PrecopyEnds, pageBytes = PAGE_SIZE): number | null {
  const b = input.bandwidthBytesPerSec;
  if (!(b > 0)) return null;
  const d = Math.max(0, input.dirtyRateBytesPerSec);
  const sentBefore = input.bytesSentTotal - (input.roundBytes - input.leftBytes);
  const p = precopyRounds(input.memoryBytes, b, (ms) => Math.min(input.memoryBytes, (d * ms) / 1000), {
    pageBytes, maxModelRounds: MAX_ROUNDS_AHEAD, ends,
    from: { round: input.round, bytes: input.roundBytes, sentBytes: sentBefore, previousDirty: input.history },
  });
  return p.ended ? p.totalBytes - input.bytesSentTotal : null;
}

/**
 * Hybrid migration: when to leave pre-copy for post-copy.
 *
 * The survey's hybrid technique ("Hybrid technique") runs "bounded pre-copy rounds" that move the
 * working set, then transfers the minimum VM state, resumes at the destination and finishes by
 * demand paging. ferry switches after each pre-copy round on the first of:
 * - the pre-copy stop decision says `converged` → finish as plain pre-copy (stop-and-copy): the
 *   downtime budget is met, so post-copy would only add fault latency;
 * - `maxPrecopyRounds` rounds have run (the bound);
 * - the dirty set is not converging (no new low for k rounds, see `isNotConverging`), or the guest
 *   dirties faster than the link drains (`dirtyRate ≥ maxDirtyToBandwidth × bandwidth`, λ = d/r ≥ 1
 *   in eq. (4)–(5) means the rounds do not shrink);
 * - pre-copy would stop for `round-limit` or `sent-too-much` — rather than a long stop-and-copy.
 */
import { decidePrecopyStop, type PrecopyRoundStats, type PrecopyStopOptions, type PrecopyDecision } from './precopy.js';

export interface HybridOptions extends PrecopyStopOptions {
  /** Most pre-copy rounds before switching. Default 3. */
  maxPrecopyRounds?: number;
  /** Switch when dirty rate ≥ this × bandwidth (after round 0). Default 1; Infinity disables. */
  maxDirtyToBandwidth?: number;
}

export type HybridAction = 'continue-precopy' | 'stop-and-copy' | 'switch-to-postcopy';
export type HybridReason = 'continue' | 'converged' | 'round-bound' | 'not-converging' | 'dirty-rate' | 'round-limit' | 'sent-too-much';

export interface HybridDecision {
  action: HybridAction;
  reason: HybridReason;
  /** The underlying pre-copy decision (estimated downtime of a stop-and-copy now, convergence flag). */
  precopy: PrecopyDecision;
}

/** The hybrid decision after a pre-copy round; `previousDirty` as for `decidePrecopyStop`. */
export function decideHybridSwitch(stats: PrecopyRoundStats, previousDirty: readonly number[], options: HybridOptions = {}): HybridDecision {
  const maxRounds = options.maxPrecopyRounds ?? 3;
  const ratio = options.maxDirtyToBandwidth ?? 1;
  const precopy = decidePrecopyStop(stats, previousDirty, { ...options, stopWhenNotConverging: false });
  const act = (action: HybridAction, reason: HybridReason): HybridDecision => ({ action, reason, precopy });
  if (precopy.reason === 'converged') return act('stop-and-copy', 'converged');
  if (stats.round + 1 >= maxRounds) return act('switch-to-postcopy', 'round-bound');
  if (precopy.notConverging) return act('switch-to-postcopy', 'not-converging');
  if (stats.round >= 1 && stats.bandwidthBytesPerSec > 0 && stats.dirtyRateBytesPerSec >= ratio * stats.bandwidthBytesPerSec) return act('switch-to-postcopy', 'dirty-rate');
  if (precopy.stop) return act('switch-to-postcopy', precopy.reason as HybridReason);
  return act('continue-precopy', 'continue');
}

/** {@link decideHybridSwitch} with the dirty-count history kept for you. */
export class HybridSwitchPolicy {
  private readonly dirty: number[] = [];
  constructor(readonly options: HybridOptions = {}) {}

  decide(stats: PrecopyRoundStats): HybridDecision {
    const d = decideHybridSwitch(stats, this.dirty, this.options);
    this.dirty.push(stats.dirtyPages);
    return d;
  }

  /** Whether it would leave pre-copy after a round with `stats`, having seen `history` (for a forecast: nothing is recorded). */
  ends(stats: PrecopyRoundStats, history: readonly number[]): boolean {
    return decideHybridSwitch(stats, history, this.options).action !== 'continue-precopy';
  }

  /** Dirty counts after each round seen so far, oldest first. */
  get history(): readonly number[] {
    return this.dirty;
  }
}

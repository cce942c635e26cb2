/**
 * The downtime's fixed part, learnt: what eq. (2) — the dirty pages over the bandwidth — missed in
 * the migrations a host made to each destination. Pre-copy's stop policy adds a fixed part to its
 * estimate (PrecopyStopOptions.fixedDowntimeMs); with `fixedDowntimeMs: 'auto'` a host takes it
 * from here, so a small budget is held to what the pause, the state, the round trips and the
 * destination's start cost on this pair of hosts rather than to the pages alone.
 */
import type { MigrationReport } from '../metrics.js';

/** Misses kept per destination: the median of the newest this many. */
const KEEP = 8;

export class FixedDowntimeLearner {
  private readonly misses = new Map<string, number[]>();

  /**
   * Notes a finished migration to `destination`: its downtime less the eq. (2) part of its stop
   * policy's estimate (the estimate less the fixed part it already held). Migrations without an
   * estimate (post-copy, hybrid that switched) teach nothing.
   */
  record(destination: string, r: Pick<MigrationReport, 'downtimeMs' | 'estimatedDowntimeMs' | 'fixedDowntimeMs'>): void {
    if (r.downtimeMs === null || r.estimatedDowntimeMs === null) return;
    const miss = Math.max(0, r.downtimeMs - (r.estimatedDowntimeMs - (r.fixedDowntimeMs ?? 0)));
    const list = this.misses.get(destination) ?? [];
    list.push(miss);
    if (list.length > KEEP) list.shift();
    this.misses.set(destination, list);
  }

  /** The fixed part for the next migration to `destination`: the median miss noted, 0 before any. */
  fixedFor(destination: string): number {
    const list = [...(this.misses.get(destination) ?? [])].sort((a, b) => a - b);
    if (list.length === 0) return 0;
    const mid = list.length >> 1;
    return list.length % 2 ? list[mid] : (list[mid - 1] + list[mid]) / 2;
  }

  /** Migrations noted for `destination` (at most the newest 8). */
  samples(destination: string): number {
    return this.misses.get(destination)?.length ?? 0;
  }

  /** Every destination with what `auto` would give a migration there now, and from how many migrations. */
  toJSON(): Record<string, { ms: number; migrations: number }> {
    return Object.fromEntries([...this.misses.keys()].map((d) => [d, { ms: this.fixedFor(d), migrations: this.samples(d) }]));
  }
}

/**
 * Post-copy: which page the source sends next.
 *
 * Hines et al.'s post-copy [63] (survey, "Post-copy techniques") resumes the VM at the destination
 * first and then moves memory by four mechanisms, all of which this scheduler serves:
 * - demand paging — a page the destination faults on is sent first ({@link PostcopyScheduler.onFault});
 * - active push — the source pushes the rest proactively, so every page crosses "only once either
 *   via active push or demand paging";
 * - pre-paging — pages near recent faults go before the rest. ferry uses Hines' *bubbling*: the
 *   latest fault is a pivot and the push expands outward from it, alternating forward and
 *   backward; a new fault moves the pivot (with `maxPivots > 1`, the most recent pivots are served
 *   round-robin);
 * - dynamic self-ballooning — pages the guest reports free ("soft") are never sent.
 *
 * Cost: one byte of state per page plus two Int32 "next/previous unsent page" arrays, kept as
 * union-find forests with path halving, so skipping runs of sent pages is amortised near-O(1) and a
 * full migration of N pages costs O(N α(N)) whatever the fault pattern — fit for 1 M-page VMs in the
 * simulator. A page leaves the unsent set for good once emitted, marked present or soft.
 */
import { InvalidArgumentError } from '../errors.js';

/** Per-page states, as stored in {@link PostcopyScheduler.states}. */
export const PostcopyPageState = {
  /** At the source only, not yet requested. */
  MISSING: 0,
  /** Faulted on by the destination, waiting in the demand queue. */
  QUEUED: 1,
  /** Emitted by `next`, not yet confirmed with `onSent`. */
  IN_FLIGHT: 2,
  /** At the destination. */
  PRESENT: 3,
  /** Reported free by the guest: never sent (the destination zero-fills it on touch). */
  SOFT: 4,
} as const;

export interface PostcopySchedulerOptions {
  /** Pre-paging around faults: `bubbling` (Hines) or `none`. Default `bubbling`. */
  prepaging?: 'bubbling' | 'none';
  /** Pivots bubbled around at once, the most recent first, served round-robin. Default 1. */
  maxPivots?: number;
  /** Farthest a bubble extends on each side of its pivot, pages. Default unlimited. */
  window?: number;
  /** Push the remaining pages in page order once faults and bubbles are served. Default true; false = demand paging (+ pre-paging) only. */
  activePush?: boolean;
}

interface Pivot {
  page: number;
  fwd: number;
  back: number;
  forwardNext: boolean;
}

export class PostcopyScheduler {
  /** One {@link PostcopyPageState} per page. */
  readonly states: Uint8Array;
  private readonly nextUnsent: Int32Array;
  private readonly prevUnsent: Int32Array;
  private readonly faults: Int32Array;
  private faultHead = 0;
  private faultTail = 0;
  private pivots: Pivot[] = [];
  private rr = 0;
  private seq = 0;
  private unsent: number;
  private readonly prepaging: boolean;
  private readonly maxPivots: number;
  private readonly window: number;
  private readonly activePush: boolean;
  /** Pages emitted by `next`, by cause. */
  readonly emitted = { faulted: 0, prepaged: 0, pushed: 0 };

  constructor(readonly pageCount: number, options: PostcopySchedulerOptions = {}) {
    if (!Number.isInteger(pageCount) || pageCount < 0 || pageCount > 0x7ffffffe) throw new InvalidArgumentError(`page count ${pageCount} out of range`);
    this.prepaging = (options.prepaging ?? 'bubbling') === 'bubbling';
    this.maxPivots = options.maxPivots ?? 1;
    this.window = options.window ?? Number.POSITIVE_INFINITY;
    this.activePush = options.activePush ?? true;
    if (!(this.maxPivots >= 1)) throw new InvalidArgumentError(`maxPivots ${this.maxPivots} must be ≥ 1`);
    this.states = new Uint8Array(pageCount);
    // nextUnsent[i] → smallest unsent page ≥ i (pageCount = none); prevUnsent[i + 1] → largest unsent page ≤ i, plus 1 (0 = none).
    this.nextUnsent = new Int32Array(pageCount + 1);
    this.prevUnsent = new Int32Array(pageCount + 1);
    for (let i = 0; i <= pageCount; i++) {
      this.nextUnsent[i] = i;
      this.prevUnsent[i] = i;
    }
    this.faults = new Int32Array(pageCount);
    this.unsent = pageCount;
  }

  /** Pages neither sent, in flight, present nor soft. */
  get remaining(): number {
    return this.unsent;
  }

  /** Faults waiting to be served. */
  get pendingFaults(): number {
    return this.faultTail - this.faultHead;
  }

  /** True when every page is present or soft (nothing in flight either). */
  get complete(): boolean {
    return this.unsent === 0 && this.inFlight === 0;
  }

  private inFlight = 0;

  /** The page is already at the destination (e.g. sent by an earlier pre-copy phase). */
  markPresent(page: number): void {
    const s = this.states[page];
    if (s === PostcopyPageState.IN_FLIGHT) this.inFlight--;
    else if (s === PostcopyPageState.MISSING || s === PostcopyPageState.QUEUED) this.take(page);
    this.states[page] = PostcopyPageState.PRESENT;
  }

  /** The guest reported the page free (DSB): it will never be sent. Ignored for pages already sent. */
  markSoft(page: number): void {
    const s = this.states[page];
    if (s !== PostcopyPageState.MISSING && s !== PostcopyPageState.QUEUED) return;
    this.take(page);
    this.states[page] = PostcopyPageState.SOFT;
  }

  /** {@link markSoft} for pages `from` .. `toExclusive − 1` (the guest reports free memory in ranges). */
  markSoftRange(from: number, toExclusive: number): void {
    const end = Math.min(toExclusive, this.pageCount);
    for (let p = Math.max(0, from); p < end; p++) this.markSoft(p);
  }

  /**
   * The destination faulted on `page`. Returns true if the page was queued for sending (false when
   * it is already queued, in flight, present or soft). Any fault becomes the newest bubbling pivot.
   */
  onFault(page: number): boolean {
    if (!(page >= 0 && page < this.pageCount)) throw new InvalidArgumentError(`fault on page ${page} outside 0..${this.pageCount - 1}`);
    if (this.prepaging && this.states[page] !== PostcopyPageState.SOFT) {
      this.pivots.unshift({ page, fwd: page + 1, back: page - 1, forwardNext: true });
      if (this.pivots.length > this.maxPivots) this.pivots.length = this.maxPivots;
      this.rr = 0;
    }
    if (this.states[page] !== PostcopyPageState.MISSING) return false;
    this.states[page] = PostcopyPageState.QUEUED;
    this.faults[this.faultTail++] = page;
    return true;
  }

  /** The page emitted by `next` has arrived. */
  onSent(page: number): void {
    if (this.states[page] === PostcopyPageState.IN_FLIGHT) {
      this.inFlight--;
      this.states[page] = PostcopyPageState.PRESENT;
    }
  }

  /**
   * Up to `n` pages to send now, marked in flight: queued faults first (oldest first), then
   * bubbles around the pivots, then (active push) the lowest unsent pages. Fewer than `n` only when
   * nothing else is eligible.
   */
  next(n: number): number[] {
    const out: number[] = [];
    while (out.length < n) {
      const p = this.pick();
      if (p < 0) break;
      out.push(p);
    }
    return out;
  }

  private pick(): number {
    while (this.faultHead < this.faultTail) {
      const p = this.faults[this.faultHead++];
      if (this.states[p] === PostcopyPageState.QUEUED) {
        this.emit(p);
        this.emitted.faulted++;
        return p;
      }
    }
    if (this.faultHead === this.faultTail) this.faultHead = this.faultTail = 0;
    while (this.prepaging && this.pivots.length > 0) {
      if (this.rr >= this.pivots.length) this.rr = 0;
      const pv = this.pivots[this.rr];
      const p = this.bubble(pv);
      if (p < 0) {
        this.pivots.splice(this.rr, 1);
        continue;
      }
      this.rr++;
      this.emit(p);
      this.emitted.prepaged++;
      return p;
    }
    if (!this.activePush) return -1;
    const p = this.findNext(this.seq);
    if (p >= this.pageCount) return -1;
    this.seq = p + 1;
    this.emit(p);
    this.emitted.pushed++;
    return p;
  }

  /** Next unsent page around `pv`, alternating sides; -1 when both sides are exhausted. */
  private bubble(pv: Pivot): number {
    for (let tries = 0; tries < 2; tries++) {
      const forward = pv.forwardNext;
      pv.forwardNext = !pv.forwardNext;
      if (forward) {
        if (pv.fwd < 0) continue;
        const q = pv.fwd < this.pageCount ? this.findNext(pv.fwd) : this.pageCount;
        if (q >= this.pageCount || q - pv.page > this.window) {
          pv.fwd = -1;
          continue;
        }
        pv.fwd = q + 1;
        return q;
      } else {
        if (pv.back < 0) continue;
        const q = this.findPrev(pv.back);
        if (q < 0 || pv.page - q > this.window) {
          pv.back = -1;
          continue;
        }
        pv.back = q - 1;
        if (pv.back < 0) pv.back = -1;
        return q;
      }
    }
    return -1;
  }

  private emit(p: number): void {
    this.take(p);
    this.states[p] = PostcopyPageState.IN_FLIGHT;
    this.inFlight++;
  }

  /** Removes `p` from the unsent forests. */
  private take(p: number): void {
    this.nextUnsent[p] = p + 1;
    this.prevUnsent[p + 1] = p;
    this.unsent--;
  }

  private findNext(i: number): number {
    const a = this.nextUnsent;
    while (a[i] !== i) {
      a[i] = a[a[i]];
      i = a[i];
    }
    return i;
  }

  private findPrev(i: number): number {
    const a = this.prevUnsent;
    let j = i + 1;
    while (a[j] !== j) {
      a[j] = a[a[j]];
      j = a[j];
    }
    return j - 1;
  }
}

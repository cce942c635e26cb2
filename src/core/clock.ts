/**
 * Time as the pure core sees it.
 *
 * Core code never reads the wall clock and never arms a timer: it is handed a {@link Clock}. The
 * node edge supplies a real one (`performance.now()` + `setTimeout`); tests and the simulator use
 * {@link VirtualClock}, a discrete-event scheduler whose time only moves when its driver says so.
 *
 * Ordering contract of {@link VirtualClock}: events run in ascending virtual time, and events
 * scheduled for the same instant run in the order they were scheduled (insertion sequence). The
 * same program on the same inputs therefore runs the same events in the same order every time.
 */
import { AbortError, FerryError, InvalidArgumentError } from './errors.js';

/** A monotonic millisecond clock that can also wait. */
export interface Clock {
  /** Milliseconds on a monotonic time line (origin unspecified; only differences matter). */
  now(): number;
  /**
   * Resolves once `now()` has advanced by at least `ms` (a non-positive `ms` resolves at the current
   * instant). Rejects with an `AbortError` if `signal` aborts first.
   */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

/** Violations of the virtual clock's rules. `code` is `ERR_CLOCK_PAST` or `ERR_CLOCK_RUNAWAY`. */
export class ClockError extends FerryError {}

/** Handle returned by {@link VirtualClock.schedule}; pass it to `cancel`. */
export interface ScheduledEvent {
  readonly at: number;
  readonly seq: number;
}

export interface VirtualClockOptions {
  /** Initial value of `now()`. Default 0. */
  start?: number;
  /**
   * Most events that may run at one virtual instant before the clock declares a runaway (an event
   * that keeps rescheduling itself with zero delay). Default 1 000 000.
   */
  maxEventsPerInstant?: number;
  /** Most events one `runUntil`/`runAll`/`runUntilSettled` call may run. Default 50 000 000. */
  maxEventsPerRun?: number;
}

interface Entry extends ScheduledEvent {
  fn: () => void;
  cancelled: boolean;
  done: boolean;
}

/** Discrete-event clock: a binary min-heap of (time, sequence) ordered callbacks. */
export class VirtualClock implements Clock {
  private t: number;
  private seq = 0;
  private heap: Entry[] = [];
  private live = 0;
  private instant = Number.NaN;
  private atInstant = 0;
  private readonly maxPerInstant: number;
  private readonly maxPerRun: number;
  /** Total events run over the clock's life. */
  eventsRun = 0;

  constructor(options: VirtualClockOptions = {}) {
    this.t = options.start ?? 0;
    this.maxPerInstant = options.maxEventsPerInstant ?? 1_000_000;
    this.maxPerRun = options.maxEventsPerRun ?? 50_000_000;
    if (!Number.isFinite(this.t)) throw new InvalidArgumentError(`clock start ${this.t} is not finite`);
  }

  now(): number {
    return this.t;
  }

  /** Events scheduled and neither run nor cancelled. */
  get pending(): number {
    return this.live;
  }

  /** Time of the next pending event, or null when none. */
  peek(): number | null {
    this.dropCancelledTop();
    return this.heap.length ? this.heap[0].at : null;
  }

  /** Runs `fn` when virtual time reaches `at` (absolute ms). `at` before `now()` is refused. */
  schedule(at: number, fn: () => void): ScheduledEvent {
    if (Number.isNaN(at)) throw new InvalidArgumentError('event time is NaN');
    if (at < this.t) throw new ClockError('ERR_CLOCK_PAST', `cannot schedule an event at ${at} ms: virtual time is already ${this.t} ms`);
    const e: Entry = { at, seq: this.seq++, fn, cancelled: false, done: false };
    this.push(e);
    this.live++;
    return e;
  }

  /** Runs `fn` `delayMs` from now (negative delays are refused like past times). */
  after(delayMs: number, fn: () => void): ScheduledEvent {
    return this.schedule(this.t + delayMs, fn);
  }

  /** Cancels a pending event; returns false if it already ran or was cancelled. */
  cancel(ev: ScheduledEvent): boolean {
    const e = ev as Entry;
    if (!('fn' in e) || e.cancelled || e.done) return false;
    e.cancelled = true;
    this.live--;
    return true;
  }

  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(new AbortError('sleep aborted', { cause: signal.reason }));
    return new Promise<void>((resolve, reject) => {
      const onAbort = () => {
        this.cancel(ev);
        reject(new AbortError('sleep aborted', { cause: signal?.reason }));
      };
      const ev = this.schedule(this.t + Math.max(0, ms), () => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      });
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** Runs the next pending event (advancing time to it). Returns false when none is pending. */
  step(): boolean {
    this.dropCancelledTop();
    const e = this.pop();
    if (!e) return false;
    this.live--;
    e.done = true;
    if (e.at !== this.instant) {
      this.instant = e.at;
      this.atInstant = 0;
    }
    if (++this.atInstant > this.maxPerInstant) {
      throw new ClockError('ERR_CLOCK_RUNAWAY', `more than ${this.maxPerInstant} events at virtual time ${e.at} ms (an event keeps rescheduling itself without delay?)`);
    }
    this.t = e.at;
    this.eventsRun++;
    e.fn();
    return true;
  }

  /** Runs every event due at or before `t`, then sets `now()` to `t` (if later). Returns events run. */
  runUntil(t: number): number {
    if (t < this.t) throw new ClockError('ERR_CLOCK_PAST', `cannot run until ${t} ms: virtual time is already ${this.t} ms`);
    let n = 0;
    for (;;) {
      const next = this.peek();
      if (next === null || next > t) break;
      this.checkRunBudget(++n);
      this.step();
    }
    this.t = t;
    return n;
  }

  /** Runs events until none is pending. Returns events run. */
  runAll(): number {
    let n = 0;
    while (this.peek() !== null) {
      this.checkRunBudget(++n);
      this.step();
    }
    return n;
  }

  /**
   * Like {@link runAll} (or {@link runUntil} when `until` is given), but lets promise continuations
   * run between events, so async code awaiting `sleep` makes progress at the right virtual time.
   * `settle` is awaited before each event and at the end; the default awaits a few microtask turns,
   * which is enough for straight-line `await` chains. An edge that has macrotasks may pass one
   * (e.g. `() => new Promise(r => setImmediate(r))`) to drain everything.
   */
  async runUntilSettled(until = Number.POSITIVE_INFINITY, settle: () => Promise<void> = microtaskTurns): Promise<number> {
    let n = 0;
    for (;;) {
      await settle();
      const next = this.peek();
      if (next === null || next > until) break;
      this.checkRunBudget(++n);
      this.step();
    }
    if (Number.isFinite(until) && until > this.t) this.t = until;
    return n;
  }

  private checkRunBudget(n: number): void {
    if (n > this.maxPerRun) throw new ClockError('ERR_CLOCK_RUNAWAY', `more than ${this.maxPerRun} events in one run (virtual time ${this.t} ms)`);
  }

  private dropCancelledTop(): void {
    while (this.heap.length && this.heap[0].cancelled) this.pop();
  }

  // Binary heap on (at, seq).
  private static less(a: Entry, b: Entry): boolean {
    return a.at < b.at || (a.at === b.at && a.seq < b.seq);
  }

  private push(e: Entry): void {
    const h = this.heap;
    h.push(e);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!VirtualClock.less(h[i], h[p])) break;
      [h[i], h[p]] = [h[p], h[i]];
      i = p;
    }
  }

  private pop(): Entry | undefined {
    const h = this.heap;
    if (h.length === 0) return undefined;
    const top = h[0];
    const last = h.pop()!;
    if (h.length) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && VirtualClock.less(h[l], h[m])) m = l;
        if (r < h.length && VirtualClock.less(h[r], h[m])) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m], h[i]];
        i = m;
      }
    }
    return top;
  }
}

async function microtaskTurns(): Promise<void> {
  for (let i = 0; i < 16; i++) await Promise.resolve();
}

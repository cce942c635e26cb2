/**
 * Rate limiting and link models, in virtual or real time alike: every method takes `now` (ms, from
 * a {@link Clock}) instead of reading a clock, so the node transport, the engine's migration rate
 * limiter (the survey's "dynamic rate limiting", Clark et al. [33]) and the simulator share them.
 */
import { InvalidArgumentError } from './errors.js';

export interface TokenBucketInit {
  /** Long-run cap, bytes per second (> 0). */
  rateBytesPerSec: number;
  /** Bucket depth: bytes that may go out back-to-back after an idle spell. Default: 50 ms of rate, at least 64 KiB. */
  burstBytes?: number;
  /** `now` of the first reservation; the bucket starts full. Default: set by the first `reserve`. */
  startMs?: number;
}

/**
 * A token bucket that lends: `reserve` always grants, records the debt and says how long the caller
 * must wait before sending. A caller that honours the delays sends at most
 * `burstBytes + rate × elapsed` bytes in any window, so its long-run rate converges to the cap
 * (within `burstBytes / (rate × T)` over a period `T`). Requests larger than the burst are fine:
 * they simply wait longer.
 */
export class TokenBucket {
  private rate: number;
  readonly burstBytes: number;
  private tokens: number;
  private last: number | null;

  constructor(init: TokenBucketInit) {
    if (!(init.rateBytesPerSec > 0) || !Number.isFinite(init.rateBytesPerSec)) throw new InvalidArgumentError(`token bucket rate ${init.rateBytesPerSec} B/s must be a positive finite number`);
    this.rate = init.rateBytesPerSec;
    this.burstBytes = init.burstBytes ?? Math.max(65536, this.rate * 0.05);
    if (!(this.burstBytes > 0)) throw new InvalidArgumentError(`token bucket burst ${init.burstBytes} must be positive`);
    this.tokens = this.burstBytes;
    this.last = init.startMs ?? null;
  }

  get rateBytesPerSec(): number {
    return this.rate;
  }

  /** Changes the cap from `now` on (tokens accrued so far are kept; excess above the burst is dropped). */
  setRate(rateBytesPerSec: number, now: number): void {
    if (!(rateBytesPerSec > 0)) throw new InvalidArgumentError(`token bucket rate ${rateBytesPerSec} B/s must be positive`);
    this.refill(now);
    this.rate = rateBytesPerSec;
  }

  /** Tokens (bytes) available at `now`; negative while in debt. */
  available(now: number): number {
    this.refill(now);
    return this.tokens;
  }

  /**
   * Takes `bytes` from the bucket at `now` and returns how many ms the caller must wait before
   * sending them (0 when the bucket covered them).
   */
  reserve(bytes: number, now: number): number {
    if (!(bytes >= 0)) throw new InvalidArgumentError(`cannot reserve ${bytes} bytes`);
    this.refill(now);
    this.tokens -= bytes;
    return this.tokens >= 0 ? 0 : (-this.tokens / this.rate) * 1000;
  }

  private refill(now: number): void {
    if (this.last === null) {
      this.last = now;
      return;
    }
    // A clock that steps backwards (it should not) must not mint tokens.
    const dt = Math.max(0, now - this.last);
    this.last = Math.max(this.last, now);
    this.tokens = Math.min(this.burstBytes, this.tokens + (dt / 1000) * this.rate);
  }
}

/** A one-way link as the transport shaper and the simulator see it. */
export interface LinkModel {
  /** Serialisation rate, bytes per second (> 0). */
  bandwidthBytesPerSec: number;
  /** One-way propagation latency, ms (≥ 0). */
  latencyMs: number;
}

/** Time for one message of `bytes` to arrive over an idle link: latency + bytes / bandwidth. */
export function transferTimeMs(link: LinkModel, bytes: number): number {
  return link.latencyMs + (bytes / link.bandwidthBytesPerSec) * 1000;
}

/** When a message handed to a {@link LinkShaper} finishes leaving the sender and arrives. */
export interface LinkSchedule {
  /** Serialisation starts (the link was busy until then). */
  startMs: number;
  /** Last byte leaves the sender. */
  departMs: number;
  /** Last byte reaches the receiver (`departMs + latencyMs`). */
  arriveMs: number;
}

/**
 * A FIFO link: messages are serialised one after another at `bandwidthBytesPerSec` and each
 * arrives `latencyMs` after its last byte left. The node transport delays writes to `departMs`
 * (and reads to `arriveMs`); the simulator schedules delivery events at `arriveMs`.
 */
export class LinkShaper {
  private busyUntil = Number.NEGATIVE_INFINITY;

  constructor(readonly link: LinkModel) {
    if (!(link.bandwidthBytesPerSec > 0)) throw new InvalidArgumentError(`link bandwidth ${link.bandwidthBytesPerSec} B/s must be positive`);
    if (!(link.latencyMs >= 0)) throw new InvalidArgumentError(`link latency ${link.latencyMs} ms must be non-negative`);
  }

  /** Queues a message of `bytes` offered at `now`. */
  send(bytes: number, now: number): LinkSchedule {
    const startMs = Math.max(now, this.busyUntil);
    const departMs = startMs + (bytes / this.link.bandwidthBytesPerSec) * 1000;
    this.busyUntil = departMs;
    return { startMs, departMs, arriveMs: departMs + this.link.latencyMs };
  }

  /** Time at which the link becomes idle. */
  idleAt(): number {
    return this.busyUntil;
  }
}

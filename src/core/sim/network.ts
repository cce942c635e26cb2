/**
 * Links and host CPUs as a fluid network: every active transfer channel gets a rate by max-min
 * fair sharing (progressive filling) of the resources it crosses — NICs, shared fabric links, and
 * the source host's CPU when a codec costs cycles. Rates change only when the set of busy channels
 * (or a cap) changes; between changes each channel's head message finishes at a known virtual time,
 * scheduled on the {@link VirtualClock}.
 */
import type { ScheduledEvent, VirtualClock } from '../clock.js';
import { InvalidArgumentError } from '../errors.js';

/** A shared capacity: bytes/s for a link, CPU-seconds per second (cores) for a host CPU. */
export class Resource {
  /** Scratch for the filling algorithm. */
  used = 0;
  demand = 0;
  constructor(readonly name: string, public capacity: number) {
    if (!(capacity > 0) || !Number.isFinite(capacity)) throw new InvalidArgumentError(`resource ${name}: capacity ${capacity} must be a positive finite number`);
  }
}

export interface ChannelUse {
  resource: Resource;
  /** Units of the resource one wire byte takes (1 for a link). */
  perByte: number;
}

export interface ChannelInit {
  name: string;
  uses: ChannelUse[];
  /** One-way latency added to every delivery, ms. Default 0. */
  latencyMs?: number;
  /** Rate cap, bytes/s (a rate limiter). Default none. */
  capBytesPerSec?: number;
  /**
   * Sender-side buffer (socket buffer, shaper queue), bytes: a message counts as *accepted* — the
   * sender's write returns — once no more than this many of the bytes queued up to it are still to
   * leave. Default 0 (accepted when its last byte leaves).
   */
  sendBufferBytes?: number;
}

interface Message {
  bytes: number;
  onDeparted?: (t: number) => void;
  onDelivered?: (t: number) => void;
}

interface PendingAccept {
  /** Cumulative departed bytes at which the message is accepted. */
  threshold: number;
  cb: (t: number) => void;
}

/** A FIFO transfer path of one migration. */
export class Channel {
  /** Current rate, bytes/s. */
  rate = 0;
  readonly uses: ChannelUse[];
  readonly latencyMs: number;
  capBytesPerSec: number;
  /** @internal */ queue: Message[] = [];
  /** @internal */ qHead = 0;
  /** @internal */ headLeft = 0;
  /** @internal */ lastUpdate = 0;
  /** @internal */ event: ScheduledEvent | null = null;
  /** @internal */ frozen = false;
  /** @internal */ departing = false;
  /** Wire bytes fully sent over the channel's life. */
  bytesSent = 0;
  readonly sendBufferBytes: number;
  /** @internal */ enqueued = 0;
  /** @internal */ accepts: PendingAccept[] = [];
  /** @internal */ acceptEvent: ScheduledEvent | null = null;

  constructor(readonly net: FluidNetwork, init: ChannelInit) {
    if (init.uses.length === 0 && init.capBytesPerSec === undefined) throw new InvalidArgumentError(`channel ${init.name} crosses no resource and has no cap`);
    for (const u of init.uses) if (!(u.perByte >= 0)) throw new InvalidArgumentError(`channel ${init.name}: per-byte use must be ≥ 0`);
    this.uses = init.uses.filter((u) => u.perByte > 0);
    this.latencyMs = init.latencyMs ?? 0;
    this.capBytesPerSec = init.capBytesPerSec ?? Number.POSITIVE_INFINITY;
    this.sendBufferBytes = init.sendBufferBytes ?? 0;
  }

  /** Bytes that have left so far, at `now` (the head counted by its progress). */
  departedAt(now: number): number {
    if (this.idle) return this.bytesSent;
    const head = this.queue[this.qHead].bytes;
    const left = this.rate > 0 ? Math.max(0, this.headLeft - (this.rate * (now - this.lastUpdate)) / 1000) : this.headLeft;
    return this.bytesSent + head - left;
  }

  get idle(): boolean {
    return this.qHead >= this.queue.length;
  }

  /**
   * Queues `bytes`; `onDeparted` when its last byte left, `onDelivered` `latencyMs` later,
   * `onAccepted` when the sender's buffer took it (see `sendBufferBytes`).
   */
  send(bytes: number, onDelivered?: (t: number) => void, onDeparted?: (t: number) => void, onAccepted?: (t: number) => void): void {
    if (!(bytes >= 0)) throw new InvalidArgumentError(`cannot send ${bytes} bytes`);
    this.enqueued += bytes;
    if (onAccepted) this.net.accept(this, this.enqueued - this.sendBufferBytes, onAccepted);
    this.queue.push({ bytes, onDelivered, onDeparted });
    // Sent from the previous message's departure callback: the network starts it without re-sharing.
    if (this.departing) return;
    if (this.queue.length - this.qHead === 1) {
      this.headLeft = bytes;
      this.lastUpdate = this.net.clock.now();
      this.net.changed(this);
    }
  }

  /** Changes the rate cap (re-shares the network). */
  setCap(bytesPerSec: number): void {
    this.capBytesPerSec = bytesPerSec;
    this.net.changed(this);
  }
}

/** Max-min fair fluid network on a virtual clock. */
export class FluidNetwork {
  private readonly channels = new Set<Channel>();
  private pendingRecompute: ScheduledEvent | null = null;
  /** Rate recomputations so far (a cost figure for benches). */
  recomputes = 0;

  constructor(readonly clock: VirtualClock) {}

  resource(name: string, capacity: number): Resource {
    return new Resource(name, capacity);
  }

  channel(init: ChannelInit): Channel {
    return new Channel(this, init);
  }

  /** @internal Calls `cb` once `ch` has sent `threshold` bytes in all. */
  accept(ch: Channel, threshold: number, cb: (t: number) => void): void {
    const now = this.clock.now();
    if (threshold <= ch.departedAt(now) + 1e-9) {
      this.clock.after(0, () => cb(this.clock.now()));
      return;
    }
    ch.accepts.push({ threshold, cb });
    if (ch.accepts.length === 1) this.scheduleAccept(ch);
  }

  private scheduleAccept(ch: Channel): void {
    if (ch.acceptEvent) {
      this.clock.cancel(ch.acceptEvent);
      ch.acceptEvent = null;
    }
    if (ch.accepts.length === 0 || !(ch.rate > 0) || ch.idle) return;
    const now = this.clock.now();
    // Within the head message the rate is constant until the next re-share, which reschedules.
    const need = ch.accepts[0].threshold - ch.departedAt(now);
    const headEnd = ch.lastUpdate + (ch.headLeft / ch.rate) * 1000;
    const at = Math.min(headEnd, now + (Math.max(0, need) / ch.rate) * 1000);
    // The head is leaving at this very instant and the threshold lies beyond it: the head's
    // completion reschedules (no zero-delay loop).
    if (need > 1e-6 && at <= now) return;
    ch.acceptEvent = this.clock.schedule(Math.max(now, at), () => {
      ch.acceptEvent = null;
      const t = this.clock.now();
      const done = ch.departedAt(t) + 1e-6;
      while (ch.accepts.length && ch.accepts[0].threshold <= done) ch.accepts.shift()!.cb(t);
      this.scheduleAccept(ch);
    });
  }

  /** @internal A channel became busy or idle or changed its cap: re-share at this instant (once, coalesced). */
  changed(ch: Channel): void {
    if (!ch.idle) this.channels.add(ch);
    if (this.pendingRecompute) return;
    this.pendingRecompute = this.clock.after(0, () => {
      this.pendingRecompute = null;
      this.recompute();
    });
  }

  private recompute(): void {
    this.recomputes++;
    const now = this.clock.now();
    const active: Channel[] = [];
    for (const ch of this.channels) {
      if (ch.event) {
        this.clock.cancel(ch.event);
        ch.event = null;
      }
      if (ch.idle) {
        this.channels.delete(ch);
        ch.rate = 0;
        continue;
      }
      if (ch.rate > 0 && now > ch.lastUpdate) ch.headLeft = Math.max(0, ch.headLeft - (ch.rate * (now - ch.lastUpdate)) / 1000);
      ch.lastUpdate = now;
      active.push(ch);
    }
    share(active);
    for (const ch of active) {
      this.scheduleHead(ch);
      this.scheduleAccept(ch);
    }
  }

  private scheduleHead(ch: Channel): void {
    const at = ch.lastUpdate + (ch.headLeft / ch.rate) * 1000;
    ch.event = this.clock.schedule(Math.max(at, this.clock.now()), () => this.headDone(ch));
  }

  private headDone(ch: Channel): void {
    ch.event = null;
    const now = this.clock.now();
    const m = ch.queue[ch.qHead];
    ch.queue[ch.qHead++] = undefined as unknown as Message;
    ch.bytesSent += m.bytes;
    if (ch.qHead > 1024 && ch.qHead * 2 > ch.queue.length) {
      ch.queue = ch.queue.slice(ch.qHead);
      ch.qHead = 0;
    }
    if (m.onDelivered) {
      const cb = m.onDelivered;
      this.clock.after(ch.latencyMs, () => cb(this.clock.now()));
    }
    if (m.onDeparted) {
      ch.departing = true;
      try {
        m.onDeparted(now);
      } finally {
        ch.departing = false;
      }
    }
    // The next message starts at once at the same rate; only an idle channel re-shares.
    if (!ch.idle) {
      ch.headLeft = ch.queue[ch.qHead].bytes;
      ch.lastUpdate = now;
      this.scheduleHead(ch);
      if (ch.accepts.length && !ch.acceptEvent) this.scheduleAccept(ch);
    } else this.changed(ch);
  }
}

/**
 * Progressive filling: all unfrozen channels rise together; when a resource (or a channel's cap)
 * saturates, the channels on it freeze at that level. O(iterations × resources + Σ uses).
 */
export function share(active: Channel[]): void {
  const resources = new Set<Resource>();
  for (const ch of active) {
    ch.frozen = false;
    ch.rate = 0;
    for (const u of ch.uses) resources.add(u.resource);
  }
  for (const r of resources) {
    r.used = 0;
    r.demand = 0;
  }
  for (const ch of active) for (const u of ch.uses) u.resource.demand += u.perByte;
  let open = [...resources];
  let unfrozen = active.length;
  let capped = active.filter((c) => Number.isFinite(c.capBytesPerSec));
  const byResource = new Map<Resource, Channel[]>();
  for (const ch of active) for (const u of ch.uses) {
    let l = byResource.get(u.resource);
    if (!l) byResource.set(u.resource, (l = []));
    l.push(ch);
  }
  let level = 0;
  const freeze = (ch: Channel) => {
    if (ch.frozen) return;
    ch.frozen = true;
    ch.rate = level;
    unfrozen--;
    for (const u of ch.uses) {
      u.resource.used += level * u.perByte;
      u.resource.demand -= u.perByte;
    }
  };
  while (unfrozen > 0) {
    let next = Number.POSITIVE_INFINITY;
    for (const r of open) if (r.demand > 1e-300) next = Math.min(next, (r.capacity - r.used) / r.demand);
    for (const c of capped) if (!c.frozen) next = Math.min(next, c.capBytesPerSec);
    if (!Number.isFinite(next)) {
      // Channels that cross nothing finite (cannot happen: each has a resource or a cap).
      for (const ch of active) if (!ch.frozen) freeze(ch);
      break;
    }
    level = Math.max(level, next);
    const tol = level * 1e-12;
    for (const c of capped) if (!c.frozen && c.capBytesPerSec <= level + tol) freeze(c);
    const still: Resource[] = [];
    for (const r of open) {
      if (r.demand > 1e-300 && (r.capacity - r.used) / r.demand <= level + tol) {
        for (const ch of byResource.get(r) ?? []) freeze(ch);
      } else if (r.demand > 1e-300) still.push(r);
    }
    open = still;
    capped = capped.filter((c) => !c.frozen);
  }
}

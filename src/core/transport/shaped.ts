/**
 * A link shaper for any Connection: caps the bandwidth of our direction with a {@link TokenBucket}
 * and delays every chunk by a one-way latency, on whatever {@link Clock} it is given (virtual in
 * tests and the simulator, real at the node edge). Benchmarks use it to put a 1 Gbit/s, 10 ms link
 * between two hosts on loopback.
 *
 * The model is a sender serialising at the cap onto a wire that is `latencyMs` long:
 *
 *   write ─► queue ─► pacer (token bucket) ─► wire (latencyMs) ─► underlying connection
 *
 * Latency is pipelined: chunks are on the wire together, so latency delays the stream without
 * cutting its throughput, as long as the high-water mark covers the bandwidth-delay product (the
 * default does). The wire holds at most one window (bandwidth-delay product, the bucket's burst
 * and two chunks): when the underlying connection pushes back, the pacer stops too, so a stall is
 * never followed by a burst larger than the window plus the bucket.
 *
 * Only our direction is shaped; iteration, `closed` and addresses are the underlying connection's.
 * Shape the peer's end as well for a symmetric link.
 */
import { AbortError, InvalidArgumentError } from '../errors.js';
import type { Clock } from '../clock.js';
import { TokenBucket } from '../rate.js';
import {
  TransportError, TransportErrorCode,
  type Connection, type DialOptions, type Listener, type ListenOptions, type Transport,
} from './transport.js';

export interface ShapedConnectionInit {
  /** Cap on our direction, bytes per second. Omitted: no cap (latency only). */
  bandwidthBytesPerSec?: number;
  /** Token bucket depth, bytes (default: the bucket's own, 50 ms of rate and at least 64 KiB). */
  burstBytes?: number;
  /** One-way delay added to every chunk, ms (default 0). */
  latencyMs?: number;
  clock: Clock;
  /**
   * Bytes accepted and not yet handed to the underlying connection before `write` waits.
   * Default: the bandwidth-delay product plus 1 MiB, so latency costs no throughput. (Without a
   * cap, throughput is bounded by highWaterMark / latencyMs.)
   */
  highWaterMark?: number;
  /** Bytes paced and delayed as one (default 64 KiB): a larger write is split, smaller ones gathered. */
  chunkBytes?: number;
  /**
   * A bucket shared with other connections, so one cap holds for all of them together (a
   * migration's parallel streams). It replaces `bandwidthBytesPerSec` / `burstBytes`.
   */
  bucket?: TokenBucket;
}

const DEFAULT_CHUNK = 64 * 1024;
const DEFAULT_SLACK = 1 << 20;

interface Waiter {
  resolve(): void;
  reject(e: Error): void;
}

/** Written bytes not yet paced. */
interface Piece { bytes: Uint8Array }

class ShapedConnection implements Connection {
  private readonly bucket: TokenBucket | undefined;
  private readonly latency: number;
  private readonly hwm: number;
  private readonly chunk: number;
  /** Most bytes on the wire (paced, not yet delivered) before the pacer waits. */
  private readonly window: number;
  private readonly stop = new AbortController();

  /** Written, not yet paced. */
  private queue: Piece[] = [];
  private queueHead = 0;
  /** Paced chunks and the time each may be delivered. */
  private wire: { bytes: Uint8Array; due: number }[] = [];
  private wireHead = 0;
  private wireBytes = 0;
  /** Accepted and not yet handed to the underlying connection. */
  private held = 0;

  private pacing = false;
  private delivering = false;
  private pacerWaiting: (() => void) | undefined;
  private writers: Waiter[] = [];
  private flushed: Waiter[] = [];
  private writeEnded = false;
  private closing: Promise<void> | undefined;
  private error: TransportError | undefined;
  private cleanlyClosed = false;

  constructor(private readonly conn: Connection, private readonly clock: Clock, init: ShapedConnectionInit) {
    const rate = init.bucket?.rateBytesPerSec ?? init.bandwidthBytesPerSec;
    this.bucket = init.bucket ?? (rate === undefined ? undefined : new TokenBucket({ rateBytesPerSec: rate, burstBytes: init.burstBytes }));
    this.latency = init.latencyMs ?? 0;
    if (!(this.latency >= 0) || !Number.isFinite(this.latency)) throw new InvalidArgumentError(`latency ${init.latencyMs} ms must be a finite number ≥ 0`);
    this.chunk = init.chunkBytes ?? DEFAULT_CHUNK;
    if (!Number.isSafeInteger(this.chunk) || this.chunk < 1) throw new InvalidArgumentError(`chunkBytes ${init.chunkBytes} is not a positive integer`);
    const bdp = rate === undefined ? 0 : Math.ceil((rate * this.latency) / 1000);
    this.hwm = init.highWaterMark ?? bdp + DEFAULT_SLACK;
    if (!Number.isSafeInteger(this.hwm) || this.hwm < 0) throw new InvalidArgumentError(`highWaterMark ${init.highWaterMark} is not a non-negative integer`);
    // The wire's capacity. Without a cap it is as wide as the high-water mark lets it be.
    // With a cap it holds the bandwidth-delay product plus the bucket's burst, so the window never
    // paces the stream itself and latency only shifts it (a narrower window would smear the burst
    // over many round trips, the stream running above the cap until the bucket ran dry).
    this.window = this.bucket === undefined ? Number.POSITIVE_INFINITY : bdp + this.bucket.burstBytes + 2 * this.chunk;
    // A failure underneath (peer reset, our abort) ends the shaping too.
    void conn.closed.then((e) => {
      if (e) this.fail(e);
      else this.cleanlyClosed = true;
    });
  }

  get localAddress(): string {
    return this.conn.localAddress;
  }

  get remoteAddress(): string {
    return this.conn.remoteAddress;
  }

  get closed(): Promise<TransportError | undefined> {
    return this.conn.closed;
  }

  write(bytes: Uint8Array): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    if (this.writeEnded) return Promise.reject(new TransportError(TransportErrorCode.CLOSED, `write after close on ${this.localAddress}`));
    if (bytes.length > 0) {
      this.queue.push({ bytes });
      this.held += bytes.length;
      this.pace();
    }
    if (this.held <= this.hwm) return Promise.resolve();
    return new Promise((resolve, reject) => this.writers.push({ resolve, reject }));
  }

  close(): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    if (!this.closing) {
      this.writeEnded = true;
      this.closing = (this.held === 0 ? Promise.resolve() : new Promise<void>((resolve, reject) => this.flushed.push({ resolve, reject })))
        .then(() => this.conn.close());
    }
    return this.closing;
  }

  abort(err?: Error): void {
    if (this.cleanlyClosed) return;
    // The underlying connection reports ABORTED to its own iteration and RESET to the peer; its
    // `closed` then fails our queues too, but pending writes must not wait for that turn.
    this.fail(new TransportError(TransportErrorCode.ABORTED, `connection ${this.localAddress} aborted${err ? `: ${err.message}` : ''}`, { cause: err }));
    this.conn.abort(err);
  }

  [Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
    return this.conn[Symbol.asyncIterator]();
  }

  private fail(e: TransportError): void {
    if (this.error) return;
    this.error = e;
    this.stop.abort(e);
    this.queue = [];
    this.wire = [];
    this.held = 0;
    this.wireBytes = 0;
    const ws = [...this.writers, ...this.flushed];
    this.writers = [];
    this.flushed = [];
    for (const w of ws) w.reject(e);
    this.pacerWaiting?.();
  }

  /** Moves queued bytes onto the wire at the bucket's pace. */
  private pace(): void {
    if (this.pacing || this.error) return;
    this.pacing = true;
    void this.runPacer();
  }

  private async runPacer(): Promise<void> {
    try {
      while (!this.error && this.queueHead < this.queue.length) {
        if (this.wireBytes >= this.window) {
          await new Promise<void>((resolve) => { this.pacerWaiting = resolve; });
          this.pacerWaiting = undefined;
          continue;
        }
        // Up to a chunk at a time, small writes gathered: one reservation (and at most one timer)
        // per chunk, as for one large write. Paced a write at a time, 4 KiB writes (a dirty
        // round's scattered pages) got 72 % of a 25 MB/s cap with a 16 KiB burst, the timer's
        // millisecond overshooting each wait; 1 MiB writes got 96 %.
        const pieces: Uint8Array[] = [];
        let size = 0;
        while (size < this.chunk && this.queueHead < this.queue.length) {
          const head = this.queue[this.queueHead];
          const room = this.chunk - size;
          if (head.bytes.length <= room) {
            pieces.push(head.bytes);
            size += head.bytes.length;
            this.queue[this.queueHead++] = EMPTY_PIECE;
            if (this.queueHead > 1024 && this.queueHead * 2 > this.queue.length) {
              this.queue = this.queue.slice(this.queueHead);
              this.queueHead = 0;
            }
          } else {
            pieces.push(head.bytes.subarray(0, room));
            size += room;
            this.queue[this.queueHead] = { bytes: head.bytes.subarray(room) };
          }
        }
        if (this.bucket) {
          const wait = this.bucket.reserve(size, this.clock.now());
          if (wait > 0) await this.clock.sleep(wait, this.stop.signal);
          if (this.error) return;
        }
        const due = this.clock.now() + this.latency;
        for (const bytes of pieces) this.wire.push({ bytes, due });
        this.wireBytes += size;
        this.deliver();
      }
    } catch (e) {
      if (!(e instanceof AbortError)) throw e;
    } finally {
      // Cleared in the same turn as the last check of the queue: a write arriving later restarts us.
      this.pacing = false;
    }
  }

  /** Hands chunks to the underlying connection once their latency has passed, in order. */
  private deliver(): void {
    if (this.delivering || this.error) return;
    this.delivering = true;
    void this.runDeliverer();
  }

  private async runDeliverer(): Promise<void> {
    try {
      while (!this.error && this.wireHead < this.wire.length) {
        const { bytes, due } = this.wire[this.wireHead];
        const wait = due - this.clock.now();
        if (wait > 0) await this.clock.sleep(wait, this.stop.signal);
        if (this.error) return;
        this.wire[this.wireHead++] = EMPTY_SLOT;
        if (this.wireHead > 1024 && this.wireHead * 2 > this.wire.length) {
          this.wire = this.wire.slice(this.wireHead);
          this.wireHead = 0;
        }
        const written = this.conn.write(bytes);
        this.held -= bytes.length;
        this.wireBytes -= bytes.length;
        this.wakeWriters();
        this.wakePacer();
        if (this.held === 0) this.wakeFlushed();
        await written;
      }
    } catch (e) {
      if (e instanceof TransportError) this.fail(e);
      else if (!(e instanceof AbortError)) throw e;
    } finally {
      this.delivering = false;
    }
  }

  private wakePacer(): void {
    if (this.wireBytes < this.window) this.pacerWaiting?.();
  }

  private wakeWriters(): void {
    if (this.held > this.hwm || this.writers.length === 0) return;
    const ws = this.writers;
    this.writers = [];
    for (const w of ws) w.resolve();
  }

  private wakeFlushed(): void {
    const ws = this.flushed;
    this.flushed = [];
    for (const w of ws) w.resolve();
  }
}

const EMPTY = new Uint8Array(0);
const EMPTY_SLOT = { bytes: EMPTY, due: 0 };
const EMPTY_PIECE: Piece = { bytes: EMPTY };

/**
 * Shapes our direction of `conn`: at most `bandwidthBytesPerSec` (token bucket, `burstBytes`
 * deep) and every chunk delivered `latencyMs` after it left. Backpressure, close and abort keep
 * the Connection contract: `close()` resolves once everything shaped has been handed on and the
 * underlying connection closed; `abort()` drops what is still being shaped.
 */
export function shaped(conn: Connection, init: ShapedConnectionInit): Connection {
  if (init.bandwidthBytesPerSec === undefined && init.bucket === undefined && !init.latencyMs) return conn;
  return new ShapedConnection(conn, init.clock, init);
}

/**
 * A transport whose every connection — dialled or accepted — is {@link shaped}, so both
 * directions of a link are capped alike.
 */
export function shapedTransport(inner: Transport, init: ShapedConnectionInit): Transport {
  return {
    name: `${inner.name}+shaped`,
    async dial(address: string, options?: DialOptions): Promise<Connection> {
      return shaped(await inner.dial(address, options), init);
    },
    listen(options: ListenOptions): Promise<Listener> {
      return inner.listen({ ...options, onConnection: (c) => options.onConnection(shaped(c, init)) });
    },
  };
}

/**
 * A Connection that speaks frames: `send(frame)` encodes and writes (with the connection's
 * backpressure), iteration decodes incoming chunks with a bounded FrameDecoder.
 *
 * Failures surface as the named errors of their layer: a TransportError from the connection, a
 * ProtocolError (with `code`) from the decoder. When the peer sends something the decoder refuses,
 * the peer is told with an ERROR frame carrying the same code (best effort) and our direction is
 * closed; the caller decides when to abort.
 *
 * Over a connection that lets its reader choose where bytes land (Connection.readInto, TCP), the
 * decoder is fed as bytes arrive, and they arrive where it says (FrameDecoder.readTarget): a big
 * payload straight into its buffer, a RUN's pages straight into guest memory when a run sink is
 * set. Decoded frames then wait here, at most {@link MAX_QUEUED_FRAMES}, before reading pauses.
 */
import { ProtocolError } from '../errors.js';
import { FrameDecoder, type FrameDecoderInit } from '../protocol/decoder.js';
import { encodeError, encodeFrame } from '../protocol/encode.js';
import { MAX_MESSAGE_BYTES, type Frame } from '../protocol/frames.js';
import type { ByobControl, Connection, TransportError } from './transport.js';

/** Frames decoded ahead of the reader (readInto connections) before the connection stops reading. */
const MAX_QUEUED_FRAMES = 4;

export interface FramedConnectionInit extends FrameDecoderInit {
  /** Tell the peer about a frame we refuse with an ERROR frame before closing (default true). */
  reportProtocolErrors?: boolean;
}

export class FramedConnection implements AsyncIterable<Frame> {
  readonly decoder: FrameDecoder;
  private readonly chunks: AsyncIterator<Uint8Array> | null = null;
  private pending: Frame[] = [];
  private head = 0;
  private eof = false;
  /** readInto connections: reading is paused (too many frames wait), the reader waiting, a read failure. */
  private readonly control: ByobControl | null = null;
  private paused = false;
  private wake: (() => void) | null = null;
  private failed: Error | null = null;
  private readonly report: boolean;
  private readonly pageSize: number;

  constructor(readonly connection: Connection, init: FramedConnectionInit = {}) {
    this.decoder = new FrameDecoder(init);
    if (connection.readInto) {
      this.control = connection.readInto({
        target: () => (this.failed ? null : this.decoder.readTarget()),
        data: (bytes) => this.onBytes(bytes),
        end: (err) => this.onEnd(err),
      });
    } else this.chunks = connection[Symbol.asyncIterator]();
    this.report = init.reportProtocolErrors ?? true;
    this.pageSize = this.decoder.limits.pageSize;
  }

  /** Encodes and writes one frame (RAW pages are checked against the decoder's page size). */
  send(frame: Frame): Promise<void> {
    return this.connection.write(encodeFrame(frame, this.pageSize));
  }

  /**
   * Writes already-encoded bytes: a frame encoded once and sent on several streams, or a part of
   * one (a RUN head, then its extents straight from guest memory).
   */
  sendEncoded(bytes: Uint8Array): Promise<void> {
    return this.connection.write(bytes);
  }

  /** Frames decoded and not yet returned by next(). */
  get queuedFrames(): number {
    return this.pending.length - this.head;
  }

  /** Bytes from a readInto connection: decoded at once (the connection reuses its buffer). */
  private onBytes(bytes: Uint8Array): void {
    if (this.failed) return;
    try {
      const frames = this.decoder.push(bytes, true);
      if (frames.length) {
        if (this.head === this.pending.length) {
          this.pending = frames;
          this.head = 0;
        } else for (const f of frames) this.pending.push(f);
      }
    } catch (e) {
      this.failed = e as Error;
      if (e instanceof ProtocolError) this.refuse(e);
    }
    if (!this.paused && this.pending.length - this.head >= MAX_QUEUED_FRAMES) {
      this.paused = true;
      this.control!.pause();
    }
    this.wakeReader();
  }

  private onEnd(err?: TransportError): void {
    if (err) this.failed ??= err;
    else {
      try {
        this.decoder.end();
      } catch (e) {
        this.failed ??= e as Error;
      }
      this.eof = true;
    }
    this.wakeReader();
  }

  private wakeReader(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  /** The next frame, or undefined at a clean end of stream (never inside a frame). */
  async next(): Promise<Frame | undefined> {
    if (this.control) return this.nextPushed();
    for (;;) {
      const f = this.take();
      if (f) return f;
      if (this.eof) return undefined;
      // Refused once, refused for good (and the peer is told only once).
      if (this.decoder.error) throw this.decoder.error;
      const r = await this.chunks!.next();
      try {
        if (r.done) {
          this.eof = true;
          this.decoder.end();
        } else {
          this.pending = this.decoder.push(r.value);
          this.head = 0;
        }
      } catch (e) {
        if (e instanceof ProtocolError) this.refuse(e);
        throw e;
      }
    }
  }

  /** The oldest decoded frame not yet handed out; reading resumes once few enough wait. */
  private take(): Frame | undefined {
    if (this.head === this.pending.length) return undefined;
    const f = this.pending[this.head];
    this.pending[this.head++] = undefined as unknown as Frame;
    if (this.paused && this.pending.length - this.head < MAX_QUEUED_FRAMES) {
      this.paused = false;
      this.control!.resume();
    }
    return f;
  }

  /** next() over a readInto connection: frames were decoded as bytes came. */
  private async nextPushed(): Promise<Frame | undefined> {
    for (;;) {
      const f = this.take();
      if (f) return f;
      if (this.failed) throw this.failed;
      if (this.eof) return undefined;
      await new Promise<void>((resolve) => { this.wake = resolve; });
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<Frame> {
    return {
      next: async () => {
        const value = await this.next();
        return value === undefined ? { done: true, value: undefined } : { done: false, value };
      },
      // Breaking out of a loop keeps undelivered frames for the next iteration.
      return: () => Promise.resolve({ done: true, value: undefined }),
    };
  }

  close(): Promise<void> {
    return this.connection.close();
  }

  abort(err?: Error): void {
    this.connection.abort(err);
  }

  get closed(): Promise<TransportError | undefined> {
    return this.connection.closed;
  }

  private refuse(e: ProtocolError): void {
    if (!this.report) {
      this.connection.close().catch(() => undefined);
      return;
    }
    let message = e.message;
    while (new TextEncoder().encode(message).length > MAX_MESSAGE_BYTES) message = message.slice(0, message.length >> 1);
    this.connection.write(encodeError({ code: e.code, message }))
      .then(() => this.connection.close())
      .catch(() => undefined);
  }
}

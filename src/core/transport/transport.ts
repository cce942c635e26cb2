/**
 * The transport contract: reliable, ordered byte streams between two hosts.
 *
 * Implementations (an in-memory pair here, TCP in src/node/transport/tcp.ts, later TLS and
 * N-stream bundles) are factories in the libp2p style — `tcp(init?: TcpTransportInit) => Transport`
 * — and all pass the same compliance suite (test/core/transport-suite.test.ts).
 *
 * Semantics every implementation keeps:
 *
 * - **Order and integrity.** Bytes arrive in the order written, unaltered; chunk boundaries are
 *   not preserved (a write may arrive as many chunks, many writes as one).
 * - **Backpressure.** `write` resolves once the connection holds at most its high-water mark of
 *   bytes the peer has not yet taken (TCP: not yet handed to the kernel), so a writer that awaits
 *   each write never runs ahead of its reader by more than a bounded amount. A reader that stops
 *   iterating stops the writer.
 * - **Half-close.** `close()` ends *our* direction after everything written so far; the peer's
 *   iteration then ends normally, and the peer may keep writing to us until it closes too. The
 *   connection is closed when both directions have ended (or on the first error).
 * - **Abort.** `abort(err)` tears the connection down at once: queued bytes are dropped, our
 *   pending writes and our iteration fail with `ERR_TRANSPORT_ABORTED` (cause: `err`), and the
 *   peer's fail with `ERR_TRANSPORT_RESET`. One OS caveat: a TCP reset that reaches a peer whose
 *   reading is paused by backpressure can surface there as a plain end of stream (Linux reports
 *   the RST as EOF after the data already received); the peer's writes still fail with RESET.
 *   So a protocol must treat an end of stream that its own messages did not announce as a
 *   failure — ferry's does (docs/protocol.md).
 * - **Named errors.** Everything a transport rejects or throws is a {@link TransportError} (or an
 *   `AbortError` when an operation's AbortSignal fires), with the underlying error as `cause`.
 * - **Ownership.** A connection reads the bytes passed to `write` some time before they reach
 *   the peer (TCP: when the kernel takes them; the in-memory pair hands the buffer itself to its
 *   peer). A writer that changes them meanwhile sends whatever they hold when they are read — the
 *   migration source writes guest memory this way and sends again any page the guest changed
 *   (docs/protocol.md, RUN); anyone else should not touch a buffer once written. Chunks handed out
 *   by iteration belong to the reader.
 */
import { FerryError } from '../errors.js';

export const TransportErrorCode = {
  /** Write after close(), or on a connection the peer closed entirely. */
  CLOSED: 'ERR_TRANSPORT_CLOSED',
  /** This side called abort(). */
  ABORTED: 'ERR_TRANSPORT_ABORTED',
  /** The peer aborted, or the connection was reset underneath us. */
  RESET: 'ERR_TRANSPORT_RESET',
  /** Nobody listens at the dialled address. */
  REFUSED: 'ERR_TRANSPORT_REFUSED',
  /** Dialling failed for another reason (unreachable, bad address, …). */
  DIAL: 'ERR_TRANSPORT_DIAL',
  /** Listening failed (address in use, bad address, …). */
  LISTEN: 'ERR_TRANSPORT_LISTEN',
  /** Any other I/O failure on an established connection. */
  IO: 'ERR_TRANSPORT_IO',
} as const;
export type TransportErrorCodeValue = (typeof TransportErrorCode)[keyof typeof TransportErrorCode];

/** Expected transport failures (lost peer, refused dial, use after close). */
export class TransportError extends FerryError {
  declare readonly code: TransportErrorCodeValue;
  constructor(code: TransportErrorCodeValue, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/**
 * A reader that says where incoming bytes land (bring your own buffer; see Connection.readInto):
 * a migration's destination reads pages straight into guest memory this way.
 */
export interface ByobReader {
  /** Where the next incoming bytes should land (they may fill only its start), or null: the connection's own read buffer. */
  target(): Uint8Array | null;
  /**
   * Bytes arrived, handed over synchronously, in order: a view of the last target, or of the
   * connection's read buffer, which it reuses once this returns (copy what you keep).
   */
  data(bytes: Uint8Array): void;
  /** The stream ended: cleanly (no argument) or with the error that ended it. Called once, last. */
  end(err?: TransportError): void;
}

/** Backpressure for a {@link ByobReader}: paused, the connection stops reading (TCP: the window closes). */
export interface ByobControl {
  pause(): void;
  resume(): void;
}

/** One byte stream between two hosts. Iterate it (once at a time) for incoming chunks. */
export interface Connection extends AsyncIterable<Uint8Array> {
  /**
   * Optional zero-copy receive: from now on incoming bytes go to `reader`, landing where it says,
   * instead of to iteration (which must not have started; chunks already queued go to the reader
   * first). At most once per connection. TCP has it; a transport without it is iterated.
   */
  readInto?(reader: ByobReader): ByobControl;
  /** Our end, e.g. `127.0.0.1:40123` or `memory:3`. */
  readonly localAddress: string;
  /** The peer's end, in the same form. */
  readonly remoteAddress: string;
  /**
   * Queues `bytes` and resolves when there is room again (see backpressure above). Rejects with a
   * TransportError when the connection is closed for writing, aborted or reset.
   */
  write(bytes: Uint8Array): Promise<void>;
  /**
   * Ends our direction once everything written so far is flushed; resolves then. Idempotent.
   * Rejects (TransportError) if the connection is aborted or reset before the flush completes.
   */
  close(): Promise<void>;
  /** Tears the connection down now (see abort semantics above). Idempotent. */
  abort(err?: Error): void;
  /**
   * Resolves (never rejects) once both directions have ended: with undefined after a clean
   * close, or with the TransportError that ended the connection.
   */
  readonly closed: Promise<TransportError | undefined>;
}

export interface DialOptions {
  /** Aborting rejects the dial with an AbortError (and drops a half-open connection). */
  signal?: AbortSignal;
}

export interface ListenOptions {
  /** Called with every accepted connection. The handler owns it (it must close or abort it). */
  onConnection(conn: Connection): void;
  /** Address to listen on; form and default depend on the transport (TCP: `127.0.0.1:0`). */
  address?: string;
  /** Aborting closes the listener. */
  signal?: AbortSignal;
}

export interface Listener {
  /** The bound address, to pass to `dial` (TCP: with the real port when asked for port 0). */
  readonly address: string;
  /** Stops accepting. Established connections are not affected. Idempotent. */
  close(): Promise<void>;
}

export interface Transport {
  /** Short name for logs and metrics: `tcp`, `memory`, … */
  readonly name: string;
  dial(address: string, options?: DialOptions): Promise<Connection>;
  listen(options: ListenOptions): Promise<Listener>;
}

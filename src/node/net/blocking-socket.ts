/**
 * A TCP socket a thread blocks on: for threads that wait on the network without an event loop (a
 * post-copy vCPU fetching its own missing page, the source's thread answering it). Each wait is a
 * poll(2) in the thread itself, woken by the kernel when bytes arrive: no event loop between the
 * socket and the code that needs the bytes, and no second thread to hand them over (each hand-over
 * between threads cost ~35-50 µs at p50 on the machines measured, more under load; see the
 * post-copy faults row of docs/metrics.md).
 *
 * Node has no blocking sockets, so the calls go to libc (../libc.ts). A connection is set up the
 * ordinary way (node:net, the handshake in frames) and then detached from its event loop
 * (detachTcp in transport/tcp.ts): its descriptor is duplicated, made blocking, and the node:net
 * socket let go. File descriptors belong to the process, so the number can be handed to any thread.
 */
import { FerryError } from '../../core/errors.js';
import { TokenBucket } from '../../core/rate.js';
import { libc, type Libc } from '../libc.js';

/** A blocking socket's system call failed, or its peer closed it. */
export class BlockingSocketError extends FerryError {
  constructor(message: string, readonly errno = 0) {
    super('ERR_BLOCKING_SOCKET', message);
  }

  /** The peer reset the connection, or it is closed for sending (EPIPE, ECONNRESET). */
  get reset(): boolean {
    return this.errno === EPIPE || this.errno === ECONNRESET;
  }
}

const POLLIN = 0x1;
const POLLOUT = 0x4;
const F_GETFL = 3;
const F_SETFL = 4;
const O_NONBLOCK = 0o4000;
const MSG_NOSIGNAL = 0x4000;
const MSG_DONTWAIT = 0x40;
const SHUT_RDWR = 2;
const EINTR = 4;
const EAGAIN = 11;
const EPIPE = 32;
const ECONNRESET = 104;
const ECANCELED = 125;
/** How long a send waiting for room in the kernel's buffer waits before it asks its `stop` again, ms. */
const STOP_CHECK_MS = 20;

/** libc's calls, as a BlockingSocketError where they cannot be loaded. */
function c(): Libc {
  try {
    return libc();
  } catch (e) {
    throw new BlockingSocketError(`blocking sockets are not available here: ${(e as Error).message}`);
  }
}

/**
 * Whether this machine has blocking sockets (Linux, with koffi's binary for it). The first call in
 * a thread loads libc's calls, so a thread that will need them soon calls it early.
 */
export function blockingSocketsAvailable(): boolean {
  try {
    c();
    return true;
  } catch {
    return false;
  }
}

/**
 * A duplicate of `fd` in blocking mode, for a socket about to be let go by its event loop (the
 * duplicate keeps the connection open when the original is closed).
 */
export function dupBlocking(fd: number): number {
  const l = c();
  const own = l.dup(fd);
  if (own < 0) throw new BlockingSocketError(`dup(${fd}) failed (errno ${l.errno()})`, l.errno());
  const flags = l.fcntl(own, F_GETFL, 'int', 0);
  if (flags < 0 || l.fcntl(own, F_SETFL, 'int', flags & ~O_NONBLOCK) < 0) {
    const e = l.errno();
    l.close(own);
    throw new BlockingSocketError(`cannot make descriptor ${own} blocking (errno ${e})`, e);
  }
  return own;
}

/** A link shape for a blocking socket's sending side (as core/transport/shaped.ts shapes a connection's). */
export interface SendShape {
  /** Cap, bytes per second (omitted: none). */
  bandwidthBytesPerSec?: number;
  /** Token bucket depth, bytes (default: the bucket's own). */
  burstBytes?: number;
  /** One-way delay, ms (default 0). */
  latencyMs?: number;
}

/**
 * Shapes what a thread sends on a blocking socket: before each send the thread sleeps for what
 * the token bucket asks and for the one-way latency, so the bytes reach the peer when they would
 * have on the shaped link. A link shaper (core/transport/shaped.ts) pipelines latency instead, so
 * that a stream keeps its throughput; the threads that send on blocking sockets (a vCPU's page
 * request, the source's answer to it) send one message and wait for the next, which the delay
 * before sending models exactly.
 */
export class SendPacer {
  private readonly bucket: TokenBucket | null;
  private readonly latencyMs: number;
  private readonly sleeper = new Int32Array(new SharedArrayBuffer(4));

  constructor(shape: SendShape) {
    this.bucket = shape.bandwidthBytesPerSec === undefined ? null : new TokenBucket({ rateBytesPerSec: shape.bandwidthBytesPerSec, ...(shape.burstBytes === undefined ? {} : { burstBytes: shape.burstBytes }) });
    this.latencyMs = shape.latencyMs ?? 0;
  }

  /** Blocks this thread until `bytes` may be sent. */
  before(bytes: number): void {
    const wait = (this.bucket?.reserve(bytes, performance.now()) ?? 0) + this.latencyMs;
    const until = performance.now() + wait;
    // Atomics.wait may return early (a spurious wake-up): sleep out what is left.
    for (let left = wait; left > 0; left = until - performance.now()) Atomics.wait(this.sleeper, 0, 0, left);
  }
}

/** A connected TCP socket in blocking mode, owned by one thread at a time. */
export class BlockingSocket {
  private readonly pollfd = new Uint8Array(8);
  private readonly pollOut = new Uint8Array(8);
  private closed = false;

  /** @param pacer shapes what is sent (null: sent at once). */
  constructor(readonly fd: number, private readonly pacer: SendPacer | null = null) {
    if (!Number.isSafeInteger(fd) || fd < 0) throw new BlockingSocketError(`${fd} is not a file descriptor`);
    for (const [p, events] of [[this.pollfd, POLLIN], [this.pollOut, POLLOUT]] as const) {
      new DataView(p.buffer).setInt32(0, fd, true);
      new DataView(p.buffer).setInt16(4, events, true);
    }
    c();
  }

  /**
   * Sends all of `bytes` (after the pacer's delay, if the socket has one), blocking while the
   * kernel's buffer is full. The descriptor may be non-blocking (one an event loop still reads,
   * transport/send-threads.ts): the thread then waits for room in poll(2). `stop` is asked before
   * the first byte and every {@link STOP_CHECK_MS} of waiting whether to give up, which throws an
   * error (errno ECANCELED).
   */
  sendAll(bytes: Uint8Array, stop: (() => boolean) | null = null): void {
    if (stop?.()) throw new BlockingSocketError(`send on descriptor ${this.fd} was stopped`, ECANCELED);
    this.pacer?.before(bytes.length);
    const l = c();
    let at = 0;
    while (at < bytes.length) {
      const part = at === 0 ? bytes : bytes.subarray(at);
      const n = l.send(this.fd, part, part.length, MSG_NOSIGNAL);
      if (n < 0) {
        const e = l.errno();
        if (e === EINTR) continue;
        if (e !== EAGAIN) throw new BlockingSocketError(`send on descriptor ${this.fd} failed (errno ${e})`, e);
        if (stop?.()) throw new BlockingSocketError(`send on descriptor ${this.fd} was stopped`, ECANCELED);
        if (l.poll(this.pollOut, 1, STOP_CHECK_MS) < 0 && l.errno() !== EINTR) throw new BlockingSocketError(`poll on descriptor ${this.fd} failed (errno ${l.errno()})`, l.errno());
        continue;
      }
      at += n;
    }
  }

  /**
   * Waits up to `timeoutMs` for bytes, then reads what is there into `into`: their count, 0 when
   * the peer closed its side, or -1 when the time passed with nothing to read.
   */
  recvSome(into: Uint8Array, timeoutMs: number): number {
    const l = c();
    for (;;) {
      const ready = l.poll(this.pollfd, 1, timeoutMs);
      if (ready < 0) {
        const e = l.errno();
        if (e === EINTR) continue;
        throw new BlockingSocketError(`poll on descriptor ${this.fd} failed (errno ${e})`, e);
      }
      if (ready === 0) return -1;
      const n = l.recv(this.fd, into, into.length, 0);
      if (n >= 0) return n;
      const e = l.errno();
      if (e === EINTR || e === EAGAIN) continue;
      throw new BlockingSocketError(`recv on descriptor ${this.fd} failed (errno ${e})`, e);
    }
  }

  /** Reads and drops what has arrived, without waiting. */
  discardPending(): void {
    const l = c();
    const sink = new Uint8Array(16 * 1024);
    while (l.recv(this.fd, sink, sink.length, MSG_DONTWAIT) > 0);
  }

  /**
   * Ends both directions (the peer sees the end; a thread blocked reading here wakes and reads
   * it). The descriptor stays open until close(), so its number cannot be reused meanwhile.
   */
  shutdown(): void {
    if (!this.closed) c().shutdown(this.fd, SHUT_RDWR);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    c().close(this.fd);
  }
}

/**
 * TCP transport (node:net). Listens on 127.0.0.1 port 0 unless told otherwise, disables Nagle,
 * and maps socket events onto the Connection contract (src/core/transport/transport.ts):
 * incoming data is queued up to `readHighWaterMark` and the socket paused beyond it, so a reader
 * that stops reading stops the sender through TCP's own flow control.
 *
 * Reads go into buffers ferry chooses (node:net's `onread`), so a ByobReader (Connection.readInto)
 * gets bytes where it wants them — a migration's pages straight into guest memory, the kernel's
 * copy the only one. node:net offers `onread` to sockets it dials, not to sockets a server
 * accepts: those are accepted paused and their handle moved into a socket made with `onread`
 * (`adoptWithOnread`).
 */
import net from 'node:net';
import { AbortError, BugIndicatingError, InvalidArgumentError } from '../../core/errors.js';
import { ChunkQueue } from '../../core/transport/chunk-queue.js';
import { dupBlocking } from '../net/blocking-socket.js';
import { fdOf, libc } from '../libc.js';
import { SendThreads, type ThreadSender } from './send-threads.js';
import { checkCongestionControl, congestionControlOf, connectWith, setCongestionControl } from './congestion.js';
import { lookup } from 'node:dns/promises';
import {
  TransportError, TransportErrorCode,
  type ByobControl, type ByobReader, type Connection, type DialOptions, type Listener, type ListenOptions, type Transport,
} from '../../core/transport/transport.js';

export interface TcpTransportInit {
  /** Disable Nagle's algorithm (default true: frames are already batched). */
  noDelay?: boolean;
  /** Incoming bytes queued before the socket is paused (default 1 MiB). */
  readHighWaterMark?: number;
  /**
   * Outgoing bytes held in user space before `write` waits for the kernel to take them (default
   * 1 MiB). Values below Node's own writable high-water mark (16 KiB) act like 16 KiB.
   */
  writeHighWaterMark?: number;
  /**
   * TCP congestion control for every socket this transport dials or accepts, e.g. 'cubic' (Linux,
   * TCP_CONGESTION; checked when the transport is made). Default: the system's
   * (net.ipv4.tcp_congestion_control). See congestion.ts.
   */
  congestion?: string;
}

const DEFAULT_HWM = 1 << 20;
/**
 * Bytes a connection sending from a thread may have queued for it before `write` waits (views of
 * guest memory cost nothing to queue; the thread should never wait for the writer).
 */
const THREAD_WRITE_HWM = 4 << 20;
/** The connection's own read buffer, for reads no ByobReader target takes. */
const READ_BUFFER_BYTES = 64 * 1024;
/** Iteration hands out reads this big or bigger as they are (in a buffer of their own), smaller ones as exact copies. */
const KEEP_READ_BYTES = 16 * 1024;

/** Where a socket's reads go: set before the socket reads its first byte, pointed at the connection once it exists. */
class ReadRouter {
  conn: TcpConnection | null = null;
  private own = new Uint8Array(READ_BUFFER_BYTES);
  readonly onread = {
    buffer: (): Uint8Array => {
      const t = this.conn?.reader?.target();
      return t && t.length > 0 ? t : this.own; // an empty buffer would fail the read (ENOBUFS)
    },
    callback: (n: number, buf: Uint8Array): boolean => {
      const c = this.conn;
      if (!c) return true;
      const bytes = buf.subarray(0, n);
      if (c.reader) c.reader.data(bytes);
      else if (buf !== this.own) c.received(bytes);
      else if (n >= KEEP_READ_BYTES) {
        // The whole buffer goes with the chunk: the next read gets a new one.
        c.received(bytes);
        this.own = new Uint8Array(READ_BUFFER_BYTES);
      } else c.received(bytes.slice());
      return true;
    },
  };
}

/**
 * A socket a server accepted (paused), remade with `onread`: node:net's server does not pass it
 * on, so the handle moves into a socket that has it, and the accepted one, left without a handle,
 * is destroyed (which also takes it off the server's count). Null if this Node has no handle to move.
 */
function adoptWithOnread(accepted: net.Socket, router: ReadRouter, allowHalfOpen: boolean): net.Socket | null {
  const a = accepted as net.Socket & { _handle?: unknown };
  const handle = a._handle;
  if (!handle) return null;
  a._handle = null;
  accepted.destroy();
  return new net.Socket({ handle, allowHalfOpen, readable: true, writable: true, onread: router.onread } as net.SocketConstructorOpts);
}

/** `host:port` or `[v6]:port` → parts. */
export function parseTcpAddress(address: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(address);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new InvalidArgumentError(`'${address}' is not a TCP address (host:port)`);
  return { host: m[1] ?? m[2], port };
}

export function formatTcpAddress(host: string | undefined, port: number | undefined): string {
  const h = host ?? '?';
  return `${h.includes(':') ? `[${h}]` : h}:${port ?? 0}`;
}

function errno(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException | undefined)?.code;
}

class TcpConnection implements Connection {
  /** Set once readInto() was called: incoming bytes go to it. */
  reader: ByobReader | null = null;
  readonly localAddress: string;
  readonly remoteAddress: string;
  readonly closed: Promise<TransportError | undefined>;
  private resolveClosed!: (e: TransportError | undefined) => void;
  private readonly inbound = new ChunkQueue();
  private writeEnded = false;
  private writeFinished = false;
  private readEnded = false;
  private done = false;
  private error: TransportError | undefined;
  private writers: { resolve(): void; reject(e: Error): void }[] = [];
  private closing: Promise<void> | undefined;
  private closeWaiter: { resolve(): void; reject(e: Error): void } | undefined;
  private readonly readHwm: number;
  private writeHwm: number;
  /** Set once sendFromThread() handed the writing to a thread: writes go to it. */
  private sender: ThreadSender | null = null;

  constructor(private readonly socket: net.Socket, init: TcpTransportInit, router?: ReadRouter) {
    this.readHwm = init.readHighWaterMark ?? DEFAULT_HWM;
    this.writeHwm = init.writeHighWaterMark ?? DEFAULT_HWM;
    this.localAddress = formatTcpAddress(socket.localAddress, socket.localPort);
    this.remoteAddress = formatTcpAddress(socket.remoteAddress, socket.remotePort);
    this.closed = new Promise((resolve) => { this.resolveClosed = resolve; });
    socket.setNoDelay(init.noDelay ?? true);

    if (router) router.conn = this;
    // Without a router (not expected: every socket here is made with one) node:net's own reads.
    else socket.on('data', (chunk: Buffer) => this.received(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength)));
    this.inbound.onConsume = (queued) => {
      if (queued <= this.readHwm && socket.isPaused() && !this.done) socket.resume();
    };
    socket.on('end', () => {
      this.readEnded = true;
      this.inbound.end();
      this.reader?.end();
      this.maybeDone();
    });
    socket.on('drain', () => this.wakeWriters());
    socket.on('finish', () => {
      this.writeFinished = true;
      const w = this.closeWaiter;
      this.closeWaiter = undefined;
      w?.resolve();
      this.maybeDone();
    });
    socket.on('error', (e) => {
      const code = errno(e);
      this.failed(code === 'ECONNRESET' || code === 'EPIPE', e);
    });
    socket.on('close', () => {
      if (this.done) return;
      if (this.readEnded && this.writeFinished) this.maybeDone();
      else this.fail(new TransportError(TransportErrorCode.RESET, `connection to ${this.remoteAddress} closed before both sides ended`));
    });
  }

  /** Incoming bytes for iteration (the buffer is the chunk's own). */
  received(chunk: Uint8Array): void {
    this.inbound.push(chunk);
    if (this.inbound.bytes > this.readHwm) this.socket.pause();
  }

  readInto(reader: ByobReader): ByobControl {
    if (this.reader) throw new BugIndicatingError('readInto() was called twice on one connection');
    const queued = this.inbound.takeAll();
    this.reader = reader;
    for (const c of queued) reader.data(c);
    if (this.error) reader.end(this.error);
    else if (this.readEnded) reader.end();
    else if (this.socket.isPaused()) this.socket.resume();
    return {
      pause: () => { if (!this.done) this.socket.pause(); },
      resume: () => { if (!this.done && this.socket.isPaused()) this.socket.resume(); },
    };
  }

  /** Bytes written and not yet taken by the kernel. */
  private get unsent(): number {
    return this.sender ? this.sender.pending : this.socket.writableLength;
  }

  private wakeWriters(): void {
    if (this.unsent > this.writeHwm) return;
    const w = this.writers;
    this.writers = [];
    for (const x of w) x.resolve();
  }

  write(bytes: Uint8Array): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    if (this.writeEnded || this.done) return Promise.reject(new TransportError(TransportErrorCode.CLOSED, `write after close on ${this.localAddress}`));
    if (this.sender) this.sender.write(bytes);
    else this.socket.write(bytes);
    if (this.unsent <= this.writeHwm) return Promise.resolve();
    return new Promise((resolve, reject) => this.writers.push({ resolve, reject }));
  }

  close(): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    if (!this.closing) {
      this.writeEnded = true;
      this.closing = this.writeFinished || this.done
        ? Promise.resolve()
        : new Promise<void>((resolve, reject) => {
          this.closeWaiter = { resolve, reject };
          // A sender thread's bytes go first: the end (FIN) follows what it still has to send.
          if (this.sender) this.sender.whenFlushed(() => { if (!this.done) this.socket.end(); });
          else this.socket.end();
        });
    }
    return this.closing;
  }

  abort(err?: Error): void {
    if (this.done) return;
    this.fail(new TransportError(TransportErrorCode.ABORTED, `connection ${this.localAddress} aborted${err ? `: ${err.message}` : ''}`, { cause: err }));
  }

  /** The socket (or its sender thread) failed: reset by the peer, or another I/O error. */
  private failed(reset: boolean, cause: Error): void {
    this.fail(new TransportError(
      reset ? TransportErrorCode.RESET : TransportErrorCode.IO,
      reset ? `connection reset by peer ${this.remoteAddress}` : `connection ${this.localAddress} → ${this.remoteAddress} failed: ${cause.message}`,
      { cause },
    ));
  }

  private fail(e: TransportError): void {
    if (this.done) return;
    this.done = true;
    this.error = e;
    this.inbound.fail(e);
    this.reader?.end(e);
    const w = this.writers;
    this.writers = [];
    for (const x of w) x.reject(e);
    const c = this.closeWaiter;
    this.closeWaiter = undefined;
    c?.reject(e);
    // The thread drops what it holds and closes its duplicate of the descriptor: the connection
    // ends when the last descriptor closes, with the RST the reset below asks for.
    this.sender?.abort();
    // RST, not FIN: the peer must see a reset, not a clean end.
    if (!this.socket.destroyed) this.socket.resetAndDestroy();
    this.resolveClosed(e);
  }

  private maybeDone(): void {
    if (this.done || !this.readEnded || !this.writeFinished) return;
    this.done = true;
    this.sender?.end();
    this.socket.destroy();
    this.resolveClosed(undefined);
  }

  [Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
    return this.inbound[Symbol.asyncIterator]();
  }

  /** See sendFromThread. */
  sendFromThread(threads: SendThreads): boolean {
    if (this.sender) return true;
    if (this.done || this.writeEnded || this.socket.writableLength > 0) return false;
    const fd = fdOf(this.socket);
    if (fd === null || !SendThreads.available()) return false;
    const own = libc().dup(fd);
    if (own < 0) return false;
    const sender = threads.take(own, { written: () => this.wakeWriters(), failed: (e) => this.failed(e.reset, e) });
    if (!sender) {
      libc().close(own);
      return false;
    }
    this.sender = sender;
    this.writeHwm = Math.max(this.writeHwm, THREAD_WRITE_HWM);
    return true;
  }

  /** The socket's congestion control, as the kernel has it. */
  congestion(): string {
    return congestionControlOf(this.socket);
  }

  /** See detachTcp. */
  async detach(): Promise<number> {
    if (this.sender) throw new BugIndicatingError(`connection ${this.localAddress} sends from a thread: it cannot be detached`);
    if (this.done || this.writeEnded) throw new TransportError(TransportErrorCode.CLOSED, `connection ${this.localAddress} is closed: nothing to detach`);
    if (this.inbound.bytes > 0) throw new BugIndicatingError(`connection ${this.localAddress} has ${this.inbound.bytes} bytes read and not consumed: they would be lost`);
    // What was written goes to the kernel first (node:net may still hold it).
    while (this.socket.writableLength > 0 && !this.done) await new Promise<void>((r) => this.socket.once('drain', r));
    const fd = fdOf(this.socket);
    if (this.done || fd === null) throw new TransportError(TransportErrorCode.IO, `connection ${this.localAddress} has no descriptor to detach`);
    const own = dupBlocking(fd);
    // The socket closes its descriptor; the duplicate keeps the connection (no FIN, no RST).
    this.done = true;
    this.socket.destroy();
    this.resolveClosed(undefined);
    return own;
  }
}

/**
 * Takes a TCP connection off its event loop: returns a blocking duplicate of its socket's file
 * descriptor, for a BlockingSocket (net/blocking-socket.ts) in any thread of this process, and
 * lets the node:net socket go. The connection stays open; this Connection is done. Bytes the peer
 * sent that were read already and not consumed would be lost, so a protocol detaches only when the
 * peer waits for it to speak (refused otherwise).
 */
export function detachTcp(conn: Connection): Promise<number> {
  if (!(conn instanceof TcpConnection)) return Promise.reject(new InvalidArgumentError(`a ${conn.constructor.name} is not a TCP connection: only TCP sockets detach`));
  return conn.detach();
}

/**
 * Hands the writing of a TCP connection to a sender thread from `threads` (send-threads.ts), so
 * that it runs beside the event loop's own sending; reading, closing and resets stay where they
 * were. Returns whether it did: false for a connection that is not plain TCP (a TLS or shaped one
 * writes from its own event loop; a shaped TCP connection can be handed over before it is shaped),
 * for one closed for writing or with bytes node:net has not handed to the kernel yet, or where
 * this machine has no sender threads.
 */
export function sendFromThread(conn: Connection, threads: SendThreads): boolean {
  return conn instanceof TcpConnection && conn.sendFromThread(threads);
}

/** A TCP connection's congestion control (null: not a TCP connection of this transport). */
export function tcpCongestionOf(conn: Connection): string | null {
  return conn instanceof TcpConnection ? conn.congestion() : null;
}

/** The TCP transport factory. */
export function tcp(init: TcpTransportInit = {}): Transport {
  for (const k of ['readHighWaterMark', 'writeHighWaterMark'] as const) {
    const v = init[k];
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 0)) throw new InvalidArgumentError(`${k} ${v} is not a non-negative integer`);
  }
  const congestion = init.congestion;
  if (congestion !== undefined) {
    checkCongestionControl(congestion);
    libc(); // loaded now, not in the first dial (~30 ms the first time in a thread)
  }
  return {
    name: 'tcp',

    async dial(address: string, options: DialOptions = {}): Promise<Connection> {
      const { host, port } = parseTcpAddress(address);
      const { signal } = options;
      const aborted = () => new AbortError(`dial ${address} aborted`, { cause: signal?.reason });
      if (signal?.aborted) throw aborted();
      if (congestion === undefined) return connect((router) => net.connect({ host, port, allowHalfOpen: true, noDelay: init.noDelay ?? true, onread: router.onread }));
      // A chosen congestion control is set on the socket before it connects (see connectWith),
      // which needs the address family first: a name is looked up here, not by node:net, and its
      // addresses are tried in turn.
      let ips: { address: string; family: number }[] = [{ address: host, family: net.isIP(host) }];
      if (ips[0].family === 0) {
        try {
          ips = await lookup(host, { all: true });
        } catch (e) {
          throw new TransportError(TransportErrorCode.DIAL, `cannot dial ${address}: ${(e as Error).message}`, { cause: e });
        }
      }
      let last: unknown;
      for (const ip of ips) {
        if (signal?.aborted) throw aborted();
        try {
          return await connect((router) => connectWith({ host: ip.address, port, noDelay: init.noDelay ?? true }, congestion, { allowHalfOpen: true, onread: router.onread }));
        } catch (e) {
          if (e instanceof AbortError) throw e;
          last = e;
        }
      }
      throw last;

      /** One socket made by `make` (reading through `router`), connected (or the named error). */
      function connect(make: (router: ReadRouter) => net.Socket): Promise<Connection> {
        return new Promise((resolve, reject) => {
          const router = new ReadRouter();
          let socket: net.Socket;
          try {
            socket = make(router);
          } catch (e) {
            reject(new TransportError(TransportErrorCode.DIAL, `cannot dial ${address}: ${(e as Error).message}`, { cause: e }));
            return;
          }
          const cleanup = () => {
            signal?.removeEventListener('abort', onAbort);
            socket.off('connect', onConnect);
            socket.off('error', onError);
          };
          const onAbort = () => {
            cleanup();
            socket.destroy();
            reject(aborted());
          };
          const onConnect = () => {
            cleanup();
            resolve(new TcpConnection(socket, init, router));
          };
          const onError = (e: Error) => {
            cleanup();
            socket.destroy();
            const refused = errno(e) === 'ECONNREFUSED';
            reject(new TransportError(
              refused ? TransportErrorCode.REFUSED : TransportErrorCode.DIAL,
              refused ? `nothing listens at ${address}` : `cannot dial ${address}: ${e.message}`,
              { cause: e },
            ));
          };
          signal?.addEventListener('abort', onAbort, { once: true });
          socket.once('connect', onConnect);
          socket.once('error', onError);
        });
      }
    },

    async listen(options: ListenOptions): Promise<Listener> {
      const { host, port } = parseTcpAddress(options.address ?? '127.0.0.1:0');
      const { signal } = options;
      if (signal?.aborted) throw new AbortError('listen aborted', { cause: signal.reason });
      const server = net.createServer({ allowHalfOpen: true, noDelay: init.noDelay ?? true, pauseOnConnect: true }, (accepted) => {
        // Constructed synchronously, before anything is read.
        let conn: Connection;
        let socket: net.Socket | null = null;
        try {
          const router = new ReadRouter();
          socket = adoptWithOnread(accepted, router, true);
          if (socket) socket.setNoDelay(init.noDelay ?? true);
          else accepted.resume();
          conn = new TcpConnection(socket ?? accepted, init, socket ? router : undefined);
        } catch {
          (socket ?? accepted).destroy();
          return;
        }
        options.onConnection(conn);
      });
      await new Promise<void>((resolve, reject) => {
        server.once('error', (e) => reject(new TransportError(TransportErrorCode.LISTEN, `cannot listen on ${host}:${port}: ${e.message}`, { cause: e })));
        server.listen(port, host, () => resolve());
      });
      // Accepted sockets are born with the listener's congestion control (no one has its address yet).
      if (congestion !== undefined) {
        try {
          setCongestionControl(server, congestion);
        } catch (e) {
          server.close();
          throw new TransportError(TransportErrorCode.LISTEN, `cannot listen on ${host}:${port}: ${(e as Error).message}`, { cause: e });
        }
      }
      // Accept errors (EMFILE, …) after listening are per-connection trouble, not fatal to the host.
      server.on('error', () => undefined);
      const bound = server.address() as net.AddressInfo;
      let open = true;
      const listener: Listener = {
        address: formatTcpAddress(bound.address, bound.port),
        close: async () => {
          if (!open) return;
          open = false;
          signal?.removeEventListener('abort', onAbort);
          // Stops accepting now; established sockets live on (server.close's callback would wait for them).
          server.close();
        },
      };
      const onAbort = () => void listener.close();
      signal?.addEventListener('abort', onAbort, { once: true });
      return listener;
    },
  };
}

/**
 * In-memory transport: connection pairs in one process, for unit tests and the simulator. Pure
 * (no Node APIs). Keeps the transport contract exactly — backpressure, half-close, abort/reset —
 * and can split writes into odd chunks to exercise decoders.
 */
import { AbortError, InvalidArgumentError } from '../errors.js';
import { ChunkQueue } from './chunk-queue.js';
import {
  TransportError, TransportErrorCode,
  type Connection, type DialOptions, type Listener, type ListenOptions, type Transport,
} from './transport.js';

export interface MemoryConnectionInit {
  /** Bytes a connection holds for its peer before `write` waits (default 64 KiB). */
  highWaterMark?: number;
  /**
   * Splits every write into chunks: called with the bytes left of the write, returns the next
   * chunk's size (clamped to 1 … left). Default: one chunk per write.
   */
  split?: (remaining: number) => number;
}

export const DEFAULT_MEMORY_HIGH_WATER_MARK = 64 * 1024;

class MemoryConnection implements Connection {
  peer!: MemoryConnection;
  readonly inbound = new ChunkQueue();
  readonly closed: Promise<TransportError | undefined>;
  private resolveClosed!: (e: TransportError | undefined) => void;
  private writeEnded = false;
  private readEnded = false;
  private done = false;
  private error: TransportError | undefined;
  private waiters: { resolve(): void; reject(e: Error): void }[] = [];
  private readonly hwm: number;
  private readonly split: ((remaining: number) => number) | undefined;

  constructor(readonly localAddress: string, readonly remoteAddress: string, init: MemoryConnectionInit) {
    this.hwm = init.highWaterMark ?? DEFAULT_MEMORY_HIGH_WATER_MARK;
    if (!Number.isSafeInteger(this.hwm) || this.hwm < 0) throw new InvalidArgumentError(`highWaterMark ${this.hwm} is not a non-negative integer`);
    this.split = init.split;
    this.closed = new Promise((resolve) => { this.resolveClosed = resolve; });
  }

  /** Wires two ends together; the peer's reads wake our writers. */
  static pair(a: MemoryConnection, b: MemoryConnection): void {
    a.peer = b;
    b.peer = a;
    a.inbound.onConsume = (queued) => b.wakeWriters(queued);
    b.inbound.onConsume = (queued) => a.wakeWriters(queued);
  }

  private wakeWriters(peerQueued: number): void {
    if (peerQueued > this.hwm || this.waiters.length === 0) return;
    const w = this.waiters;
    this.waiters = [];
    for (const x of w) x.resolve();
  }

  write(bytes: Uint8Array): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    if (this.writeEnded) return Promise.reject(new TransportError(TransportErrorCode.CLOSED, `write after close on ${this.localAddress}`));
    const q = this.peer.inbound;
    if (!this.split) {
      q.push(bytes);
    } else {
      for (let pos = 0; pos < bytes.length;) {
        const left = bytes.length - pos;
        const n = Math.min(left, Math.max(1, Math.floor(this.split(left))));
        q.push(bytes.subarray(pos, pos + n));
        pos += n;
      }
    }
    if (q.bytes <= this.hwm) return Promise.resolve();
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  close(): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    if (!this.writeEnded) {
      this.writeEnded = true;
      this.peer.inbound.end();
      this.peer.readEnded = true;
      this.peer.maybeDone();
      this.maybeDone();
    }
    return Promise.resolve();
  }

  abort(err?: Error): void {
    if (this.done) return;
    this.fail(new TransportError(TransportErrorCode.ABORTED, `connection ${this.localAddress} aborted${err ? `: ${err.message}` : ''}`, { cause: err }));
    this.peer.fail(new TransportError(TransportErrorCode.RESET, `connection reset by peer ${this.remoteAddress}`, { cause: err }));
  }

  private fail(e: TransportError): void {
    if (this.done) return;
    this.error = e;
    this.done = true;
    this.inbound.fail(e);
    const w = this.waiters;
    this.waiters = [];
    for (const x of w) x.reject(e);
    this.resolveClosed(e);
  }

  private maybeDone(): void {
    if (this.done || !this.writeEnded || !this.readEnded) return;
    this.done = true;
    this.resolveClosed(undefined);
  }

  [Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
    return this.inbound[Symbol.asyncIterator]();
  }
}

/** Two connected ends. */
export function memoryPair(init: MemoryConnectionInit = {}, addresses: [string, string] = ['memory:a', 'memory:b']): [Connection, Connection] {
  const a = new MemoryConnection(addresses[0], addresses[1], init);
  const b = new MemoryConnection(addresses[1], addresses[0], init);
  MemoryConnection.pair(a, b);
  return [a, b];
}

/**
 * An address space for memory transports. Pass one instance to every `memory()` transport that
 * should reach the others (no process-wide registry: several networks can coexist).
 */
export class MemoryNetwork {
  private readonly listeners = new Map<string, (conn: Connection) => void>();
  private next = 1;

  /** @internal */
  bind(address: string | undefined, handler: (conn: Connection) => void): string {
    const addr = address ?? `memory:${this.next++}`;
    if (!addr.startsWith('memory:')) throw new TransportError(TransportErrorCode.LISTEN, `'${addr}' is not a memory address (memory:<name>)`);
    if (this.listeners.has(addr)) throw new TransportError(TransportErrorCode.LISTEN, `${addr} is already in use`);
    this.listeners.set(addr, handler);
    return addr;
  }

  /** @internal */
  unbind(address: string): void {
    this.listeners.delete(address);
  }

  /** @internal */
  lookup(address: string): ((conn: Connection) => void) | undefined {
    return this.listeners.get(address);
  }

  /** @internal */
  ephemeral(): string {
    return `memory:dial-${this.next++}`;
  }
}

export interface MemoryTransportInit extends MemoryConnectionInit {
  network: MemoryNetwork;
}

/** A transport over a MemoryNetwork: `listen` binds `memory:<name>` (default `memory:<n>`). */
export function memory(init: MemoryTransportInit): Transport {
  const { network } = init;
  return {
    name: 'memory',
    async dial(address: string, options: DialOptions = {}): Promise<Connection> {
      if (options.signal?.aborted) throw new AbortError(`dial ${address} aborted`, { cause: options.signal.reason });
      const handler = network.lookup(address);
      if (!handler) throw new TransportError(TransportErrorCode.REFUSED, `nothing listens at ${address}`);
      const [ours, theirs] = memoryPair(init, [network.ephemeral(), address]);
      handler(theirs);
      return ours;
    },
    async listen(options: ListenOptions): Promise<Listener> {
      if (options.signal?.aborted) throw new AbortError('listen aborted', { cause: options.signal.reason });
      const address = network.bind(options.address, (c) => options.onConnection(c));
      let open = true;
      const listener: Listener = {
        address,
        close: async () => {
          if (!open) return;
          open = false;
          network.unbind(address);
        },
      };
      options.signal?.addEventListener('abort', () => void listener.close(), { once: true });
      return listener;
    },
  };
}

/**
 * The host side of a VM's network device: a TCP server (`--expose 127.0.0.1:8080`) on the main
 * thread. Each accepted client gets a connection id; its life becomes records for the guest:
 * OPEN on connect, DATA (≤ NET_MAX_PAYLOAD bytes each) for what it sends, CLOSE when it finishes
 * sending (FIN) or goes away. Records from the guest come back through `deliver`: DATA is written to
 * the client, CLOSE ends the connection after everything written before it.
 *
 * Holding. While `hold()` is in force (the VM is paused or moving between hosts), client input is
 * kept here, in arrival order across all connections, instead of being handed to `onRecords`.
 * Beyond `bufferLimit` bytes every socket stops reading, so clients feel TCP backpressure rather
 * than losing data. `release()` hands everything over in order, exactly once, and resumes reading.
 *
 * Flow window (optional). With `window` set, at most that many DATA payload bytes are outstanding:
 * handed to `onRecords` and not yet acknowledged with `credit(bytes)` (call it as the VM moves
 * records into its rx ring). Past the window input is kept exactly as while held. Without
 * `window` nothing needs to be credited; the VM's rx queue limit then bounds what may be
 * outstanding (and refuses batches beyond it).
 *
 * Half-close: a client that shuts down its sending side (FIN) is reported with CLOSE, but its
 * socket stays writable until the guest sends CLOSE, so request/response clients like
 * `printf 'GET /\n' | nc -N` still get their answer. After the guest's CLOSE, further client
 * input is read and discarded, and no more records are produced for that connection.
 *
 * Guest→client writes are not flow-controlled here (Node buffers them); see `writeBacklog()`.
 */
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { NET_MAX_PAYLOAD, NetRecord } from '../../core/abi.js';
import { FerryError, InvalidArgumentError } from '../../core/errors.js';
import { MAX_CONN_ID, isConnId, type NetRecordData } from '../../core/net-ring.js';

export const DEFAULT_EXPOSE_BUFFER_LIMIT = 4 << 20;

export interface ExposeOptions {
  /** Listen address; default 127.0.0.1. */
  host?: string;
  /** Listen port; 0 (default) picks a free one. */
  port?: number;
  /** Receives host→guest records, in order. Called synchronously from socket events and release()/credit(). */
  onRecords(records: NetRecordData[]): void;
  /** Client input kept while held (or past the window) before sockets stop reading; default 4 MiB. */
  bufferLimit?: number;
  /** Outstanding DATA bytes allowed before `credit()`; default: no window. */
  window?: number;
  /** Errors of the listening socket after it started (e.g. accept failures); default: ignored. */
  onError?(err: Error): void;
  /** Largest number of simultaneous clients; further ones are refused (closed at once). Default 10,000. */
  maxConnections?: number;
  /**
   * The first connection id to hand out (default 1): a restored VM's endpoint starts above the ids
   * the VM may still hold records of (SnapshotHeader.netConnsFrom).
   */
  firstConnId?: number;
}

interface Conn {
  id: number;
  socket: Socket;
  /** The guest sent CLOSE: no more records for this connection. */
  guestClosed: boolean;
  /** CLOSE has been produced for the guest. */
  closeSent: boolean;
}

/** Parses `host:port` (`127.0.0.1:8080`, `[::1]:0`, `:8080`, `8080`). */
export function parseHostPort(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(text.trim()) ?? /^()()(\d{1,5})$/.exec(text.trim());
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 0 && port <= 65535)) throw new InvalidArgumentError(`invalid address '${text}' (expected host:port, e.g. 127.0.0.1:8080)`);
  return { host: m[1] || m[2] || '127.0.0.1', port };
}

export class ExposeEndpoint {
  private readonly conns = new Map<number, Conn>();
  private nextId = 1;
  private pending: NetRecordData[] = [];
  private pendingHead = 0;
  private pendingBytes = 0;
  private inFlight = 0;
  private holds = 0;
  private readingPaused = false;
  private closed = false;
  private readonly bufferLimit: number;
  private readonly window: number | undefined;
  private readonly onRecords: (records: NetRecordData[]) => void;

  private constructor(private readonly server: Server, opts: ExposeOptions) {
    this.onRecords = opts.onRecords;
    if (opts.firstConnId !== undefined) {
      if (!isConnId(opts.firstConnId)) throw new InvalidArgumentError(`firstConnId must be an integer in 1..${MAX_CONN_ID}, got ${opts.firstConnId}`);
      this.nextId = opts.firstConnId;
    }
    this.bufferLimit = opts.bufferLimit ?? DEFAULT_EXPOSE_BUFFER_LIMIT;
    this.window = opts.window;
    if (!(this.bufferLimit > 0)) throw new InvalidArgumentError(`bufferLimit must be positive, got ${opts.bufferLimit}`);
    if (this.window !== undefined && !(this.window > 0)) throw new InvalidArgumentError(`window must be positive, got ${opts.window}`);
    server.maxConnections = opts.maxConnections ?? 10_000;
    server.on('connection', (s) => this.accept(s));
  }

  static listen(opts: ExposeOptions): Promise<ExposeEndpoint> {
    const server = createServer({ allowHalfOpen: true, pauseOnConnect: true, noDelay: true });
    const ep = new ExposeEndpoint(server, opts);
    return new Promise((resolve, reject) => {
      server.once('error', (e: NodeJS.ErrnoException) => reject(new FerryError('ERR_EXPOSE_LISTEN', `cannot listen on ${opts.host ?? '127.0.0.1'}:${opts.port ?? 0}: ${e.message}`, { cause: e })));
      server.listen(opts.port ?? 0, opts.host ?? '127.0.0.1', () => {
        server.removeAllListeners('error');
        server.on('error', (e) => opts.onError?.(e));
        resolve(ep);
      });
    });
  }

  address(): { host: string; port: number } {
    const a = this.server.address() as AddressInfo | null;
    if (!a) throw new InvalidArgumentError('endpoint is not listening');
    return { host: a.address, port: a.port };
  }

  /** The id the next client connection will get. */
  get nextConnId(): number {
    return this.nextId;
  }

  /** Open client connections. */
  connections(): number {
    return this.conns.size;
  }

  /** Client input bytes kept (held or past the window), not yet handed to onRecords. */
  bufferedBytes(): number {
    return this.pendingBytes;
  }

  /** DATA bytes handed to onRecords and not yet credited (0 without a window). */
  outstanding(): number {
    return this.inFlight;
  }

  /** Bytes written to clients that the kernel has not taken yet. */
  writeBacklog(): number {
    let n = 0;
    for (const c of this.conns.values()) n += c.socket.writableLength;
    return n;
  }

  get held(): boolean {
    return this.holds > 0;
  }

  /** Stops handing client input over (nested: each hold() needs a release()). */
  hold(): void {
    this.holds++;
  }

  /** Undoes one hold(); at the last, hands over everything kept, in order, and resumes reading. */
  release(): void {
    if (this.holds === 0) return;
    this.holds--;
    this.flush();
  }

  /** The VM took `bytes` of DATA payload into its rx ring (flow window). */
  credit(bytes: number): void {
    if (this.window === undefined) return;
    this.inFlight = Math.max(0, this.inFlight - bytes);
    this.flush();
  }

  /** Records from the guest: DATA → written to the client; CLOSE → end after pending data. Unknown connections are ignored. */
  deliver(records: NetRecordData[]): void {
    for (const r of records) {
      const c = this.conns.get(r.conn);
      if (!c || c.guestClosed) continue;
      if (r.type === NetRecord.DATA) {
        if (r.payload.length) c.socket.write(r.payload);
      } else if (r.type === NetRecord.CLOSE) {
        c.guestClosed = true;
        c.socket.end();
        c.socket.resume(); // drain (and discard) whatever the client still sends, so it can finish
      }
    }
  }

  /**
   * Drops connections at once (e.g. those whose records the VM refused on overflow): the client's
   * socket is destroyed, input kept for them is discarded, and the guest gets a CLOSE for each
   * (unless it already had one or closed the connection itself).
   */
  reset(conns: Iterable<number>): void {
    const ids = new Set(conns);
    if (ids.size === 0) return;
    const before = this.pending.length - this.pendingHead;
    const rest = this.pending.slice(this.pendingHead);
    const neverOpened = new Set(rest.filter((r) => ids.has(r.conn) && r.type === NetRecord.OPEN).map((r) => r.conn));
    const keep = rest.filter((r) => !ids.has(r.conn));
    if (keep.length !== before) {
      this.pending = keep;
      this.pendingHead = 0;
      this.pendingBytes = keep.reduce((a, r) => a + r.payload.length, 0);
    }
    for (const id of ids) {
      const c = this.conns.get(id);
      if (!c) continue;
      this.conns.delete(id);
      const tellGuest = !c.closeSent && !c.guestClosed && !neverOpened.has(id);
      c.closeSent = true;
      c.guestClosed = true;
      c.socket.destroy();
      if (tellGuest) this.emit([{ conn: id, type: NetRecord.CLOSE, payload: new Uint8Array(0) }]);
    }
    this.flush();
  }

  /** Closes the listener and every connection; kept input is dropped. */
  close(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.closed = true;
    const done = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const c of this.conns.values()) c.socket.destroy();
    this.conns.clear();
    this.pending = [];
    this.pendingHead = 0;
    this.pendingBytes = 0;
    return done;
  }

  // ------------------------------------------------------------------ internals

  private blocked(): boolean {
    return this.holds > 0 || (this.window !== undefined && this.inFlight >= this.window);
  }

  private accept(socket: Socket): void {
    if (this.closed) {
      socket.destroy();
      return;
    }
    const id = this.allocId();
    const c: Conn = { id, socket, guestClosed: false, closeSent: false };
    this.conns.set(id, c);
    socket.on('data', (buf: Buffer) => {
      if (c.guestClosed) return;
      const recs: NetRecordData[] = [];
      for (let off = 0; off < buf.length; off += NET_MAX_PAYLOAD) {
        recs.push({ conn: id, type: NetRecord.DATA, payload: new Uint8Array(buf.subarray(off, off + NET_MAX_PAYLOAD)) });
      }
      this.emit(recs);
    });
    const closeOnce = () => {
      if (c.closeSent || c.guestClosed) return;
      c.closeSent = true;
      this.emit([{ conn: id, type: NetRecord.CLOSE, payload: new Uint8Array(0) }]);
    };
    socket.on('end', closeOnce);
    socket.on('error', () => {}); // 'close' follows
    socket.on('close', () => {
      closeOnce();
      this.conns.delete(id);
    });
    this.emit([{ conn: id, type: NetRecord.OPEN, payload: new Uint8Array(0) }]);
    if (!this.readingPaused) socket.resume();
  }

  private allocId(): number {
    for (;;) {
      const id = this.nextId;
      this.nextId = this.nextId === MAX_CONN_ID ? 1 : this.nextId + 1;
      if (!this.conns.has(id)) return id;
    }
  }

  private emit(recs: NetRecordData[]): void {
    if (this.closed) return;
    if (this.blocked() || this.pendingHead < this.pending.length) {
      for (const r of recs) {
        this.pending.push(r);
        this.pendingBytes += r.payload.length;
      }
      if (this.pendingBytes >= this.bufferLimit) this.pauseReading();
      return;
    }
    this.handOver(recs);
  }

  private handOver(recs: NetRecordData[]): void {
    if (this.window !== undefined) for (const r of recs) this.inFlight += r.payload.length;
    this.onRecords(recs);
  }

  private flush(): void {
    if (this.closed) return;
    while (this.pendingHead < this.pending.length && !this.blocked()) {
      // Hand over up to the window (at least one record), in order.
      const batch: NetRecordData[] = [];
      let budget = this.window === undefined ? Infinity : this.window - this.inFlight;
      while (this.pendingHead < this.pending.length && (batch.length === 0 || budget > 0)) {
        const r = this.pending[this.pendingHead++];
        batch.push(r);
        budget -= r.payload.length;
        this.pendingBytes -= r.payload.length;
      }
      this.handOver(batch);
    }
    if (this.pendingHead >= this.pending.length) {
      this.pending = [];
      this.pendingHead = 0;
    } else if (this.pendingHead > 1024 && this.pendingHead * 2 > this.pending.length) {
      this.pending = this.pending.slice(this.pendingHead);
      this.pendingHead = 0;
    }
    if (this.readingPaused && this.pendingBytes < this.bufferLimit / 2) this.resumeReading();
  }

  private pauseReading(): void {
    if (this.readingPaused) return;
    this.readingPaused = true;
    for (const c of this.conns.values()) if (!c.guestClosed) c.socket.pause();
  }

  private resumeReading(): void {
    this.readingPaused = false;
    for (const c of this.conns.values()) c.socket.resume();
  }
}

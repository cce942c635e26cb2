/**
 * The client relay: a bidirectional channel between two host agents that keeps a VM's clients
 * connected after the VM moved. The VM's `--expose` endpoint stays on its *home* host; once the VM
 * runs elsewhere, the home forwards client records over a relay and the guest's records come back
 * the same way.
 *
 * Wire format (all integers little-endian). The dialling side (the home) opens with a preface,
 * `46 52 4c 59` ("FRLY") and a version byte (1), then frames; the answering side sends frames only.
 * Read as a migration frame header, "FRLY" claims a ~1.5 GB payload, which no migration frame may
 * have, so one listener can tell relays from migrations by the first four bytes.
 *
 * Every frame is an 8-byte header — `u32 length` (payload bytes), `u8 type`, `u8 flags` (0),
 * `u16 reserved` (0) — and its payload:
 *
 * | type | name      | payload                                   | direction            |
 * |------|-----------|-------------------------------------------|----------------------|
 * | 0x01 | HELLO     | UTF-8 JSON {@link RelayHello}, ≤ 4096 B  | home → host, first   |
 * | 0x02 | RECORD    | u32 conn, u8 record type (1 OPEN, 2 DATA, 3 CLOSE), payload (DATA only, ≤ 64 KiB) | both |
 * | 0x03 | RETURN    | as RECORD: client records the host received but never gave its VM | host → home |
 * | 0x04 | CREDIT    | u32 bytes the VM took into its rx ring     | host → home          |
 * | 0x05 | RUNNING   | empty: the VM runs on this host now        | host → home          |
 * | 0x06 | FENCE     | empty: the home sends nothing more; return what you hold | home → host |
 * | 0x07 | FENCE_ACK | empty: everything received before FENCE was returned | host → home |
 *
 * The decoder bounds every length before buffering and refuses anything else with a named
 * {@link RelayError}; a relay that receives a bad frame aborts its connection (the peer sees a
 * reset) and reports the error through `end`.
 *
 * Client→guest records are bounded upstream by the endpoint's flow window, so writes are queued
 * without awaiting each one (order is kept); guest→client records are not flow-controlled, like
 * the endpoint itself.
 */
import { NET_MAX_PAYLOAD, NetRecord } from '../../core/abi.js';
import { FerryError } from '../../core/errors.js';
import type { NetRecordData } from '../../core/net-ring.js';
import type { Connection, Transport } from '../../core/transport/transport.js';

export const RELAY_MAGIC = new Uint8Array([0x46, 0x52, 0x4c, 0x59]);
export const RELAY_VERSION = 1;
const PREFACE_BYTES = 5;
const HEADER_BYTES = 8;
export const MAX_RELAY_HELLO_BYTES = 4096;
const MAX_RECORD_PAYLOAD = 5 + NET_MAX_PAYLOAD;

export const RelayFrameType = { HELLO: 1, RECORD: 2, RETURN: 3, CREDIT: 4, RUNNING: 5, FENCE: 6, FENCE_ACK: 7 } as const;

export const RelayErrorCode = {
  BAD_MAGIC: 'ERR_RELAY_BAD_MAGIC',
  BAD_VERSION: 'ERR_RELAY_BAD_VERSION',
  UNKNOWN_TYPE: 'ERR_RELAY_UNKNOWN_TYPE',
  FRAME_TOO_LARGE: 'ERR_RELAY_FRAME_TOO_LARGE',
  MALFORMED: 'ERR_RELAY_MALFORMED',
  SEQUENCE: 'ERR_RELAY_SEQUENCE',
  UNEXPECTED_EOF: 'ERR_RELAY_UNEXPECTED_EOF',
  /** A rehearsal (rehearseRelay) whose frames did not all arrive in its time limit. */
  TIMEOUT: 'ERR_RELAY_TIMEOUT',
} as const;

export class RelayError extends FerryError {}

/** What the home tells the host when it opens a relay for a VM. */
export interface RelayHello {
  /** The VM whose clients this relay carries. */
  vm: string;
  /** The client endpoint (host:port) on the home. */
  endpoint: string;
  /** The home agent's name and migration address (a VM can only go home from elsewhere). */
  home: string;
  homeMigration: string;
  /** The guest's label on the home (for listings). */
  guest: string;
}

export type RelayFrame =
  | { type: 'HELLO'; hello: RelayHello }
  | { type: 'RECORD' | 'RETURN'; record: NetRecordData }
  | { type: 'CREDIT'; bytes: number }
  | { type: 'RUNNING' | 'FENCE' | 'FENCE_ACK' };

const TYPE_NAMES: Record<number, RelayFrame['type']> = { 1: 'HELLO', 2: 'RECORD', 3: 'RETURN', 4: 'CREDIT', 5: 'RUNNING', 6: 'FENCE', 7: 'FENCE_ACK' };
const MAX_PAYLOAD: Record<RelayFrame['type'], number> = {
  HELLO: MAX_RELAY_HELLO_BYTES, RECORD: MAX_RECORD_PAYLOAD, RETURN: MAX_RECORD_PAYLOAD, CREDIT: 4, RUNNING: 0, FENCE: 0, FENCE_ACK: 0,
};

// ------------------------------------------------------------------------------------ encoding

function header(out: DataView, at: number, type: number, length: number): void {
  out.setUint32(at, length, true);
  out.setUint8(at + 4, type);
  out.setUint8(at + 5, 0);
  out.setUint16(at + 6, 0, true);
}

/** The dialling side's first bytes. */
export function encodePreface(): Uint8Array {
  const b = new Uint8Array(PREFACE_BYTES);
  b.set(RELAY_MAGIC);
  b[4] = RELAY_VERSION;
  return b;
}

export function encodeRelayFrame(f: RelayFrame): Uint8Array {
  switch (f.type) {
    case 'HELLO': {
      const json = new TextEncoder().encode(JSON.stringify(f.hello));
      if (json.length > MAX_RELAY_HELLO_BYTES) throw new RelayError(RelayErrorCode.FRAME_TOO_LARGE, `relay HELLO of ${json.length} bytes exceeds ${MAX_RELAY_HELLO_BYTES}`);
      const b = new Uint8Array(HEADER_BYTES + json.length);
      header(new DataView(b.buffer), 0, RelayFrameType.HELLO, json.length);
      b.set(json, HEADER_BYTES);
      return b;
    }
    case 'RECORD':
    case 'RETURN':
      return encodeRecords(f.type, [f.record]);
    case 'CREDIT': {
      const b = new Uint8Array(HEADER_BYTES + 4);
      const dv = new DataView(b.buffer);
      header(dv, 0, RelayFrameType.CREDIT, 4);
      dv.setUint32(HEADER_BYTES, f.bytes, true);
      return b;
    }
    default: {
      const b = new Uint8Array(HEADER_BYTES);
      header(new DataView(b.buffer), 0, RelayFrameType[f.type], 0);
      return b;
    }
  }
}

/** Many records as consecutive RECORD (or RETURN) frames in one buffer. */
export function encodeRecords(type: 'RECORD' | 'RETURN', records: readonly NetRecordData[]): Uint8Array {
  let total = 0;
  for (const r of records) {
    if (r.payload.length > NET_MAX_PAYLOAD) throw new RelayError(RelayErrorCode.FRAME_TOO_LARGE, `record payload of ${r.payload.length} bytes exceeds ${NET_MAX_PAYLOAD}`);
    total += HEADER_BYTES + 5 + r.payload.length;
  }
  const b = new Uint8Array(total);
  const dv = new DataView(b.buffer);
  let at = 0;
  for (const r of records) {
    header(dv, at, RelayFrameType[type], 5 + r.payload.length);
    dv.setUint32(at + HEADER_BYTES, r.conn, true);
    dv.setUint8(at + HEADER_BYTES + 4, r.type);
    b.set(r.payload, at + HEADER_BYTES + 5);
    at += HEADER_BYTES + 5 + r.payload.length;
  }
  return b;
}

// ------------------------------------------------------------------------------------ decoding

function validHello(v: unknown): v is RelayHello {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return false;
  const o = v as Record<string, unknown>;
  return ['vm', 'endpoint', 'home', 'homeMigration', 'guest'].every((k) => typeof o[k] === 'string' && (o[k] as string).length <= 1024)
    && /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$/.test(o.vm as string);
}

/**
 * A relay frame decoder without a socket: `push(chunk)` returns whole frames, `end()` checks that
 * the stream did not stop inside one. With `preface`, the stream must start with the preface and
 * a HELLO; without, HELLO is refused. After an error every call throws it again.
 */
export class RelayDecoder {
  private buf = new Uint8Array(0);
  private needPreface: boolean;
  private needHello: boolean;
  private readonly acceptsHello: boolean;
  error: RelayError | null = null;

  constructor(init: { preface: boolean }) {
    this.needPreface = init.preface;
    this.needHello = init.preface;
    this.acceptsHello = init.preface;
  }

  /** Bytes held back (at most one incomplete frame). */
  get bufferedBytes(): number {
    return this.buf.length;
  }

  push(chunk: Uint8Array): RelayFrame[] {
    if (this.error) throw this.error;
    try {
      return this.parse(chunk);
    } catch (e) {
      this.error = e instanceof RelayError ? e : new RelayError(RelayErrorCode.MALFORMED, (e as Error).message, { cause: e });
      throw this.error;
    }
  }

  end(): void {
    if (this.error) throw this.error;
    if (this.buf.length > 0 || this.needPreface) {
      this.error = new RelayError(RelayErrorCode.UNEXPECTED_EOF, `relay stream ended inside a frame (${this.buf.length} bytes pending)`);
      throw this.error;
    }
  }

  private parse(chunk: Uint8Array): RelayFrame[] {
    let b: Uint8Array;
    if (this.buf.length === 0) b = chunk;
    else {
      b = new Uint8Array(this.buf.length + chunk.length);
      b.set(this.buf);
      b.set(chunk, this.buf.length);
    }
    let at = 0;
    const out: RelayFrame[] = [];
    if (this.needPreface) {
      const n = Math.min(b.length, PREFACE_BYTES);
      for (let i = 0; i < Math.min(n, 4); i++) {
        if (b[i] !== RELAY_MAGIC[i]) throw new RelayError(RelayErrorCode.BAD_MAGIC, 'relay stream does not start with "FRLY"');
      }
      if (n < PREFACE_BYTES) {
        this.buf = b.slice();
        return out;
      }
      if (b[4] !== RELAY_VERSION) throw new RelayError(RelayErrorCode.BAD_VERSION, `relay version ${b[4]} is not supported (this host speaks ${RELAY_VERSION})`);
      this.needPreface = false;
      at = PREFACE_BYTES;
    }
    const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
    while (b.length - at >= HEADER_BYTES) {
      const length = dv.getUint32(at, true);
      const typeId = dv.getUint8(at + 4);
      const type = TYPE_NAMES[typeId];
      if (!type) throw new RelayError(RelayErrorCode.UNKNOWN_TYPE, `relay frame type 0x${typeId.toString(16)} is unknown`);
      if (dv.getUint8(at + 5) !== 0 || dv.getUint16(at + 6, true) !== 0) throw new RelayError(RelayErrorCode.MALFORMED, `relay ${type} frame has flags or reserved bits set`);
      if (length > MAX_PAYLOAD[type]) throw new RelayError(RelayErrorCode.FRAME_TOO_LARGE, `relay ${type} frame claims ${length} bytes (at most ${MAX_PAYLOAD[type]})`);
      if (type === 'HELLO' ? !this.needHello : this.needHello) {
        throw new RelayError(RelayErrorCode.SEQUENCE, this.acceptsHello && this.needHello ? `relay must open with HELLO, got ${type}` : 'relay HELLO out of place');
      }
      if (b.length - at - HEADER_BYTES < length) break;
      const p = b.subarray(at + HEADER_BYTES, at + HEADER_BYTES + length);
      out.push(this.frame(type, p));
      if (type === 'HELLO') this.needHello = false;
      at += HEADER_BYTES + length;
    }
    this.buf = at === b.length ? new Uint8Array(0) : b.slice(at);
    return out;
  }

  private frame(type: RelayFrame['type'], p: Uint8Array): RelayFrame {
    switch (type) {
      case 'HELLO': {
        let v: unknown;
        try {
          v = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(p));
        } catch (e) {
          throw new RelayError(RelayErrorCode.MALFORMED, 'relay HELLO is not UTF-8 JSON', { cause: e });
        }
        if (!validHello(v)) throw new RelayError(RelayErrorCode.MALFORMED, 'relay HELLO lacks vm/endpoint/home/homeMigration/guest strings or names an invalid VM');
        return { type, hello: v };
      }
      case 'RECORD':
      case 'RETURN': {
        if (p.length < 5) throw new RelayError(RelayErrorCode.MALFORMED, `relay ${type} frame of ${p.length} bytes is shorter than its 5-byte header`);
        const dv = new DataView(p.buffer, p.byteOffset, p.byteLength);
        const conn = dv.getUint32(0, true);
        const rt = p[4];
        if (rt !== NetRecord.OPEN && rt !== NetRecord.DATA && rt !== NetRecord.CLOSE) throw new RelayError(RelayErrorCode.MALFORMED, `relay record type ${rt} is not OPEN, DATA or CLOSE`);
        if (rt !== NetRecord.DATA && p.length !== 5) throw new RelayError(RelayErrorCode.MALFORMED, 'relay OPEN/CLOSE records carry no payload');
        if (conn === 0) throw new RelayError(RelayErrorCode.MALFORMED, 'relay record for connection 0');
        return { type, record: { conn, type: rt, payload: p.slice(5) } };
      }
      case 'CREDIT':
        if (p.length !== 4) throw new RelayError(RelayErrorCode.MALFORMED, `relay CREDIT must be 4 bytes, got ${p.length}`);
        return { type, bytes: new DataView(p.buffer, p.byteOffset, 4).getUint32(0, true) };
      default:
        return { type };
    }
  }
}

/** True if `bytes` (the first bytes of a stream) can only be a relay preface. */
export function startsLikeRelay(bytes: Uint8Array): boolean {
  return bytes.length >= 4 && bytes[0] === RELAY_MAGIC[0] && bytes[1] === RELAY_MAGIC[1] && bytes[2] === RELAY_MAGIC[2] && bytes[3] === RELAY_MAGIC[3];
}

// ------------------------------------------------------------------------------------ the channel

export interface RelayHandlers {
  /** RECORD frames (batched per chunk received). */
  records?(records: NetRecordData[]): void;
  /** RETURN frames. */
  returned?(records: NetRecordData[]): void;
  credit?(bytes: number): void;
  running?(): void;
  fence?(): void;
  fenceAck?(): void;
  /** The peer's direction ended: cleanly (undefined) or with an error (bad frame, reset). Once. */
  end?(err: Error | undefined): void;
}

/**
 * One relay over one Connection. Frames received before `start(handlers)` are kept and handed
 * over then, in order.
 */
export class Relay {
  private handlers: RelayHandlers | null = null;
  private queued: RelayFrame[] = [];
  private ended = false;
  private endError: Error | undefined;
  private writeError: Error | null = null;
  private readonly decoder: RelayDecoder;
  private helloWaiter: { resolve(h: RelayHello): void; reject(e: Error): void } | null = null;
  /** Resolves when the peer's direction has ended (never rejects). */
  readonly done: Promise<Error | undefined>;
  private resolveDone!: (e: Error | undefined) => void;

  private constructor(readonly connection: Connection, init: { preface: boolean; prefix?: Uint8Array[]; chunks?: AsyncIterator<Uint8Array> }) {
    this.decoder = new RelayDecoder({ preface: init.preface });
    this.done = new Promise((r) => (this.resolveDone = r));
    void this.pump(init.prefix ?? [], init.chunks ?? connection[Symbol.asyncIterator]());
  }

  /** Dials `address` and opens a relay for `hello.vm`. */
  static async dial(transport: Transport, address: string, hello: RelayHello, opts: { signal?: AbortSignal } = {}): Promise<Relay> {
    const conn = await transport.dial(address, opts);
    const relay = new Relay(conn, { preface: false });
    const pre = encodePreface();
    const h = encodeRelayFrame({ type: 'HELLO', hello });
    const b = new Uint8Array(pre.length + h.length);
    b.set(pre);
    b.set(h, pre.length);
    relay.write(b);
    return relay;
  }

  /**
   * Answers a relay on an accepted connection whose first chunks (`prefix`) were already read from
   * `chunks` (the connection's iterator); resolves with the HELLO.
   */
  static accept(conn: Connection, prefix: Uint8Array[] = [], chunks?: AsyncIterator<Uint8Array>): Promise<{ relay: Relay; hello: RelayHello }> {
    return new Promise((resolve, reject) => {
      const relay = new Relay(conn, { preface: true, prefix, ...(chunks ? { chunks } : {}) });
      relay.helloWaiter = { resolve: (hello) => resolve({ relay, hello }), reject };
    });
  }

  start(handlers: RelayHandlers): void {
    this.handlers = handlers;
    const q = this.queued;
    this.queued = [];
    this.dispatch(q);
    if (this.ended) handlers.end?.(this.endError);
  }

  sendRecords(records: readonly NetRecordData[]): void {
    if (records.length) this.write(encodeRecords('RECORD', records));
  }

  sendReturned(records: readonly NetRecordData[]): void {
    if (records.length) this.write(encodeRecords('RETURN', records));
  }

  sendCredit(bytes: number): void {
    for (let left = Math.floor(bytes); left > 0; left -= 0xffffffff) this.write(encodeRelayFrame({ type: 'CREDIT', bytes: Math.min(left, 0xffffffff) }));
  }

  send(type: 'RUNNING' | 'FENCE' | 'FENCE_ACK'): void {
    this.write(encodeRelayFrame({ type }));
  }

  /** Ends our direction after everything written (the peer's `end` fires cleanly). */
  async close(): Promise<void> {
    await this.connection.close().catch(() => undefined);
  }

  abort(err?: Error): void {
    this.connection.abort(err);
  }

  /** The first write failure, if any (writes are not awaited one by one). */
  get failed(): Error | null {
    return this.writeError;
  }

  private write(bytes: Uint8Array): void {
    if (this.writeError) return;
    this.connection.write(bytes).catch((e: Error) => {
      this.writeError ??= e;
    });
  }

  private dispatch(frames: RelayFrame[]): void {
    const h = this.handlers;
    if (!h) {
      this.queued.push(...frames);
      return;
    }
    // Consecutive records are handed over as one batch.
    let batch: NetRecordData[] = [];
    let batchType: 'RECORD' | 'RETURN' | null = null;
    const flush = () => {
      if (batch.length) (batchType === 'RECORD' ? h.records : h.returned)?.(batch);
      batch = [];
      batchType = null;
    };
    for (const f of frames) {
      if (f.type === 'RECORD' || f.type === 'RETURN') {
        if (batchType !== f.type) flush();
        batchType = f.type;
        batch.push(f.record);
        continue;
      }
      flush();
      if (f.type === 'CREDIT') h.credit?.(f.bytes);
      else if (f.type === 'RUNNING') h.running?.();
      else if (f.type === 'FENCE') h.fence?.();
      else if (f.type === 'FENCE_ACK') h.fenceAck?.();
    }
    flush();
  }

  private handle(frames: RelayFrame[]): void {
    const rest: RelayFrame[] = [];
    for (const f of frames) {
      if (f.type === 'HELLO') {
        const w = this.helloWaiter;
        this.helloWaiter = null;
        w?.resolve(f.hello);
      } else rest.push(f);
    }
    if (rest.length) this.dispatch(rest);
  }

  private async pump(prefix: Uint8Array[], chunks: AsyncIterator<Uint8Array>): Promise<void> {
    let err: Error | undefined;
    // Not from inside the constructor: accept() installs its HELLO waiter first.
    await Promise.resolve();
    try {
      for (const c of prefix) this.handle(this.decoder.push(c));
      for (;;) {
        const r = await chunks.next();
        if (r.done) break;
        this.handle(this.decoder.push(r.value));
      }
      this.decoder.end();
    } catch (e) {
      err = e as Error;
      if (e instanceof RelayError) this.connection.abort(e);
    }
    this.ended = true;
    this.endError = err;
    const w = this.helloWaiter;
    this.helloWaiter = null;
    w?.reject(err ?? new RelayError(RelayErrorCode.UNEXPECTED_EOF, 'relay ended before its HELLO'));
    if (this.handlers) this.handlers.end?.(err);
    this.resolveDone(err);
  }
}

/**
 * A Connection whose first chunks were already read (to tell a relay from a migration): iteration
 * yields `prefix` first, then continues `chunks`.
 */
export function withPrefix(conn: Connection, prefix: Uint8Array[], chunks: AsyncIterator<Uint8Array>): Connection {
  return {
    localAddress: conn.localAddress,
    remoteAddress: conn.remoteAddress,
    closed: conn.closed,
    write: (b) => conn.write(b),
    close: () => conn.close(),
    abort: (e) => conn.abort(e),
    [Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
      const first = [...prefix];
      return {
        next: async () => (first.length ? { done: false, value: first.shift()! } : chunks.next()),
        return: async () => {
          await chunks.return?.();
          return { done: true, value: undefined };
        },
      };
    },
  };
}

/** Reads the first bytes of an accepted connection: at least 4, or fewer at end of stream. */
export async function peekStart(conn: Connection): Promise<{ prefix: Uint8Array[]; chunks: AsyncIterator<Uint8Array>; head: Uint8Array }> {
  const chunks = conn[Symbol.asyncIterator]();
  const prefix: Uint8Array[] = [];
  let n = 0;
  while (n < 4) {
    const r = await chunks.next();
    if (r.done) break;
    prefix.push(r.value);
    n += r.value.length;
  }
  const head = new Uint8Array(Math.min(n, 4));
  let at = 0;
  for (const c of prefix) {
    if (at >= head.length) break;
    const take = c.subarray(0, head.length - at);
    head.set(take, at);
    at += take.length;
  }
  return { prefix, chunks, head };
}

/** What {@link rehearseRelay} moved: frames each side received. */
export interface RelayRehearsal {
  /** RECORD frames the answering side (the VM's host) received. */
  toHost: number;
  /** RECORD, RETURN, CREDIT, RUNNING and FENCE_ACK frames the dialling side (the home) received. */
  toHome: number;
}

/**
 * Runs a relay once over `transport` from this process to itself, as a home and a VM's host use
 * one after a migration: the preface and HELLO, told apart from a migration by its first bytes;
 * client records one way and the guest's back, credit, RUNNING, FENCE and FENCE_ACK; both ends
 * closed. A host runs it when it starts (engine/warm-up.ts): the first migration of a VM whose
 * clients stay connected through its home ran this code for the first time right after the
 * switchover, in the replies its clients waited for. Rejects if a frame goes missing (`timeoutMs`).
 */
export async function rehearseRelay(transport: Transport, timeoutMs = 5000): Promise<RelayRehearsal> {
  let answer!: (v: { relay: Relay; hello: RelayHello }) => void;
  let refuse!: (e: Error) => void;
  const accepted = new Promise<{ relay: Relay; hello: RelayHello }>((res, rej) => { answer = res; refuse = rej; });
  accepted.catch(() => undefined);
  const listener = await transport.listen({
    onConnection: (conn) => {
      void peekStart(conn).then((s) => {
        if (!startsLikeRelay(s.head)) throw new RelayError(RelayErrorCode.BAD_MAGIC, 'the rehearsal relay did not open with the preface');
        return Relay.accept(conn, s.prefix, s.chunks);
      }).then(answer, refuse);
    },
  });
  const relays: Relay[] = [];
  let timer: NodeJS.Timeout | undefined;
  try {
    const work = (async () => {
      const home = await Relay.dial(transport, listener.address, { vm: 'ferry-relay-rehearsal', endpoint: '127.0.0.1:0', home: 'self', homeMigration: listener.address, guest: 'none' });
      relays.push(home);
      const { relay: host } = await accepted;
      relays.push(host);
      const seen = { toHost: 0, toHome: 0 };
      let wake = () => {};
      const bump = (side: 'toHost' | 'toHome', n: number) => { seen[side] += n; wake(); };
      const reach = (side: 'toHost' | 'toHome', n: number) => new Promise<void>((res) => {
        wake = () => { if (seen[side] >= n) res(); };
        wake();
      });
      host.start({ records: (r) => bump('toHost', r.length), fence: () => host.send('FENCE_ACK') });
      home.start({ records: (r) => bump('toHome', r.length), returned: (r) => bump('toHome', r.length), credit: () => bump('toHome', 1), running: () => bump('toHome', 1), fenceAck: () => bump('toHome', 1) });
      const request = new TextEncoder().encode('GET ferry\n');
      const reply = new TextEncoder().encode('VALUE relay\n');
      for (let i = 0; i < 3; i++) {
        home.sendRecords([{ conn: 1, type: NetRecord.OPEN, payload: new Uint8Array(0) }, { conn: 1, type: NetRecord.DATA, payload: request }]);
        await reach('toHost', 2 * (i + 1));
        host.send('RUNNING');
        host.sendRecords([{ conn: 1, type: NetRecord.DATA, payload: reply }]);
        host.sendCredit(request.length);
        await reach('toHome', 3 * (i + 1));
      }
      home.send('FENCE');
      host.sendReturned([{ conn: 1, type: NetRecord.CLOSE, payload: new Uint8Array(0) }]);
      await reach('toHome', 9 + 2);
      return seen;
    })();
    const late = new Promise<never>((_, rej) => { timer = setTimeout(() => rej(new RelayError(RelayErrorCode.TIMEOUT, `the relay rehearsal did not finish within ${timeoutMs} ms`)), timeoutMs); });
    return await Promise.race([work, late]);
  } finally {
    clearTimeout(timer);
    await listener.close();
    // Torn down, not closed: a close waits for the peer, which a failed rehearsal may not have.
    for (const r of relays) r.abort();
  }
}

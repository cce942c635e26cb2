/**
 * The network device's rings (see docs/guest-abi.md, "The network device"): single-producer,
 * single-consumer byte rings of records in guest memory. Pure code over a byte view so the device
 * (host side), test hosts and the simulator share one implementation.
 *
 * `view` addresses the memory the ring lives in and `header` is the ring header's offset in that
 * view. A ring is only touched between quanta, so no atomics are needed.
 */
import { NET_MAX_PAYLOAD, NET_RECORD_HEADER, NET_RING_HEADER } from './abi.js';
import { FerryError } from './errors.js';

export interface NetRecordData {
  conn: number;
  type: number;
  payload: Uint8Array;
}

export class NetRingError extends FerryError {
  constructor(message: string) {
    super('ERR_NET_RING', message);
  }
}

export const MIN_RING_SIZE = 4096;
export const MAX_RING_SIZE = 16 << 20;

export function isValidRingSize(size: number): boolean {
  return Number.isInteger(size) && size >= MIN_RING_SIZE && size <= MAX_RING_SIZE && (size & (size - 1)) === 0;
}

/** The largest client connection id (a record carries it as a u32; ids count from 1). */
export const MAX_CONN_ID = 0xffffffff;

/** A client connection id an endpoint may hand out: a whole number in 1..MAX_CONN_ID. */
export function isConnId(id: number): boolean {
  return Number.isInteger(id) && id >= 1 && id <= MAX_CONN_ID;
}

const pad4 = (n: number) => (n + 3) & ~3;

/** Bytes a record with `payloadLength` bytes occupies in a ring. */
export function recordSpace(payloadLength: number): number {
  return NET_RECORD_HEADER + pad4(payloadLength);
}

export class NetRing {
  private readonly dv: DataView;
  readonly data: number;

  constructor(private readonly bytes: Uint8Array, readonly header: number, readonly size: number) {
    if (!isValidRingSize(size)) throw new NetRingError(`ring size ${size} is not a power of two between ${MIN_RING_SIZE} and ${MAX_RING_SIZE}`);
    if (header < 0 || header + NET_RING_HEADER + size > bytes.length) throw new NetRingError(`ring at ${header} (+${size}) lies outside memory`);
    this.dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.data = header + NET_RING_HEADER;
  }

  /** Writes a fresh, empty header (at `net_init`). */
  reset(): void {
    this.dv.setUint32(this.header, 0, true);
    this.dv.setUint32(this.header + 4, 0, true);
    this.dv.setUint32(this.header + 8, this.size, true);
    this.dv.setUint32(this.header + 12, 0, true);
  }

  get head(): number { return this.dv.getUint32(this.header, true); }
  get tail(): number { return this.dv.getUint32(this.header + 4, true); }
  /** Bytes queued. A value above `size` means the guest corrupted its ring. */
  get used(): number { return (this.tail - this.head) >>> 0; }
  get free(): number { return this.size - this.used; }

  private checkSane(): void {
    if (this.used > this.size) throw new NetRingError(`ring corrupt: ${this.used} bytes queued in a ${this.size}-byte ring`);
  }

  private copyIn(pos: number, src: Uint8Array): void {
    const off = pos & (this.size - 1);
    const first = Math.min(src.length, this.size - off);
    this.bytes.set(src.subarray(0, first), this.data + off);
    if (first < src.length) this.bytes.set(src.subarray(first), this.data);
  }

  private copyOut(pos: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    const off = pos & (this.size - 1);
    const first = Math.min(len, this.size - off);
    out.set(this.bytes.subarray(this.data + off, this.data + off + first));
    if (first < len) out.set(this.bytes.subarray(this.data, this.data + len - first), first);
    return out;
  }

  /** Producer side: appends a record if it fits; returns false when the ring is too full. */
  push(rec: NetRecordData): boolean {
    if (rec.payload.length > NET_MAX_PAYLOAD) throw new NetRingError(`record payload ${rec.payload.length} exceeds ${NET_MAX_PAYLOAD}`);
    this.checkSane();
    const space = recordSpace(rec.payload.length);
    if (space > this.free) return false;
    const hdr = new Uint8Array(NET_RECORD_HEADER);
    const hv = new DataView(hdr.buffer);
    hv.setUint32(0, rec.payload.length, true);
    hv.setUint32(4, rec.conn, true);
    hv.setUint32(8, rec.type, true);
    const tail = this.tail;
    this.copyIn(tail, hdr);
    this.copyIn(tail + NET_RECORD_HEADER, rec.payload);
    this.dv.setUint32(this.header + 4, (tail + space) >>> 0, true); // data first, tail second
    return true;
  }

  /** Consumer side: removes and returns the next record, or null when the ring is empty. */
  pop(): NetRecordData | null {
    this.checkSane();
    if (this.used === 0) return null;
    if (this.used < NET_RECORD_HEADER) throw new NetRingError(`ring corrupt: ${this.used} bytes queued, less than a record header`);
    const head = this.head;
    const hv = new DataView(this.copyOut(head, NET_RECORD_HEADER).buffer);
    const len = hv.getUint32(0, true);
    if (len > NET_MAX_PAYLOAD || recordSpace(len) > this.used) throw new NetRingError(`ring corrupt: record of ${len} bytes with ${this.used} queued`);
    const payload = this.copyOut(head + NET_RECORD_HEADER, len);
    this.dv.setUint32(this.header, (head + recordSpace(len)) >>> 0, true);
    return { conn: hv.getUint32(4, true), type: hv.getUint32(8, true), payload };
  }
}

/** Offsets of the rx and tx ring headers for `net_init(base, ringSize)`. */
export function ringLayout(base: number, ringSize: number): { rx: number; tx: number; end: number } {
  const rx = base;
  const tx = base + NET_RING_HEADER + ringSize;
  return { rx, tx, end: tx + NET_RING_HEADER + ringSize };
}

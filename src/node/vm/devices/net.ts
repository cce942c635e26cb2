/**
 * The network device (docs/guest-abi.md, "The network device"): two record rings in guest memory,
 * touched only between quanta. Host→guest records wait in a bounded queue until the rx ring has
 * room; guest→host records are drained from the tx ring at every `betweenQuanta`.
 *
 * All ring access goes through GuestMemoryAccess: the ring is viewed only when there is work, and
 * on a post-copy destination only the bytes the device will touch are made present first (the
 * header, the tx records queued, the rx space the records that fit will take): viewing a whole
 * 1 MiB ring faulted its 256 pages in right after the resume, one round trip each, while the
 * guest's clients waited. Exactly the bytes the host wrote (rx data and tail, tx head) are
 * reported with `touched` so they reach the dirty log.
 *
 * A guest that corrupts a ring (impossible head/tail, a record longer than what is queued or than
 * NET_MAX_PAYLOAD, an unknown record type on tx) makes the device *fail*: it stops touching the
 * rings and reports the problem once through `onCorrupt` (the VM is aborted).
 *
 * Overflow policy: the rx queue holds at most `limit` ring bytes (header + padded payload).
 * `deliver` refuses a batch that would exceed it as a whole (no record of it is queued), reports
 * the refused records' connection ids through `overflow` (a NetRxOverflowError), and returns
 * false. The host should reset those connections (ExposeEndpoint.reset), whose CLOSE records are
 * always accepted. The expose endpoint's flow window, credited through `rxMoved`, avoids getting
 * here at all.
 */
import { NET_MAX_PAYLOAD, NET_RING_HEADER, NetRecord } from '../../../core/abi.js';
import { FerryError } from '../../../core/errors.js';
import { NetRing, NetRingError, isValidRingSize, recordSpace, ringLayout, type NetRecordData } from '../../../core/net-ring.js';
import type { GuestMemoryAccess } from '../guest-memory.js';

export const DEFAULT_RX_QUEUE_LIMIT = 16 << 20;

export class NetRxOverflowError extends FerryError {
  constructor(message: string, readonly conns: number[]) {
    super('ERR_NET_RX_OVERFLOW', message);
  }
}

export interface NetDeviceEvents {
  tx(records: NetRecordData[]): void;
  corrupt(message: string): void;
  overflow(err: NetRxOverflowError): void;
  /** DATA payload bytes just moved from the queue into the rx ring (flow-control credit). */
  rxMoved(payloadBytes: number): void;
  /** Called with the bytes of guest memory the host wrote (so soft pages are reclaimed). */
  wrote(addr: number, len: number): void;
}

export class NetDevice {
  ring: { base: number; size: number } | null = null;
  failed = false;
  /** Queued host→guest records are rxQueue[rxHead…]; the consumed prefix is dropped lazily. */
  private rxQueue: (NetRecordData | undefined)[] = [];
  private rxHead = 0;
  private queuedBytes = 0;

  constructor(private readonly mem: GuestMemoryAccess, private readonly events: NetDeviceEvents, readonly limit = DEFAULT_RX_QUEUE_LIMIT) {}

  /** The records waiting for the rx ring, oldest first (a copy of the list). */
  pending(): NetRecordData[] {
    return this.rxQueue.slice(this.rxHead) as NetRecordData[];
  }

  /** Bytes (ring space) of records waiting for the rx ring. */
  get queued(): number {
    return this.queuedBytes;
  }

  /** `net_init(base, ring_size)`: 0, or −1 for invalid arguments (or a second call). */
  init(base: number, ringSize: number): number {
    if (this.ring !== null) return -1;
    if (!isValidRingSize(ringSize)) return -1;
    const { rx, tx, end } = ringLayout(base, ringSize);
    if (end > this.mem.byteLength) return -1;
    for (const h of [rx, tx]) {
      this.events.wrote(h, NET_RING_HEADER);
      const hdr = new Uint8Array(NET_RING_HEADER);
      new DataView(hdr.buffer).setUint32(8, ringSize, true);
      this.mem.write(h, hdr);
    }
    this.ring = { base, size: ringSize };
    return 0;
  }

  /** Restores an attached ring (from state); false if it no longer fits guest memory. */
  attach(ring: { base: number; size: number } | null, failed: boolean): boolean {
    if (ring !== null && (!isValidRingSize(ring.size) || ringLayout(ring.base, ring.size).end > this.mem.byteLength)) return false;
    this.ring = ring;
    this.failed = failed;
    return true;
  }

  /** Puts records restored from a device state back in the queue (they were accepted once: no limit check). */
  restoreQueue(records: NetRecordData[]): void {
    for (const r of records) {
      this.rxQueue.push(r);
      this.queuedBytes += recordSpace(r.payload.length);
    }
  }

  deliver(records: NetRecordData[]): boolean {
    let bytes = 0;
    for (const r of records) {
      if (r.type !== NetRecord.OPEN && r.type !== NetRecord.DATA && r.type !== NetRecord.CLOSE) throw new FerryError('ERR_INVALID_ARGUMENT', `net record type ${r.type} is not OPEN, DATA or CLOSE`);
      if (r.payload.length > NET_MAX_PAYLOAD) throw new FerryError('ERR_INVALID_ARGUMENT', `net record payload ${r.payload.length} exceeds ${NET_MAX_PAYLOAD}`);
      bytes += recordSpace(r.payload.length);
    }
    // CLOSE-only batches are always taken: they are tiny, one per connection at most, and they
    // are how the host tells the guest about connections it reset after an overflow.
    const closesOnly = records.every((r) => r.type === NetRecord.CLOSE);
    if (!closesOnly && this.queuedBytes + bytes > this.limit) {
      const conns = [...new Set(records.map((r) => r.conn))];
      this.events.overflow(new NetRxOverflowError(`network rx queue full (${this.queuedBytes} + ${bytes} bytes > ${this.limit}); refused records for connection(s) ${conns.join(', ')}`, conns));
      return false;
    }
    for (const r of records) this.rxQueue.push({ conn: r.conn >>> 0, type: r.type, payload: r.payload });
    this.queuedBytes += bytes;
    return true;
  }

  /** Drains tx, then fills rx from the queue. */
  service(): void {
    if (this.ring === null || this.failed) return;
    const { rx, tx } = ringLayout(this.ring.base, this.ring.size);
    const out: NetRecordData[] = [];
    try {
      this.drainTx(tx, out);
      if (this.rxHead < this.rxQueue.length) this.fillRx(rx);
    } catch (e) {
      if (!(e instanceof NetRingError)) throw e;
      this.failed = true;
      if (out.length) this.events.tx(out);
      this.events.corrupt(`network device: ${e.message}`);
      return;
    }
    if (out.length) this.events.tx(out);
  }

  /** The guest has unread records in its rx ring. */
  rxPending(): boolean {
    if (this.ring === null || this.failed) return false;
    const rx = this.ring.base;
    return this.mem.readU32(rx) !== this.mem.readU32(rx + 4);
  }

  /** The ring at `header`, with its header and the `len` data bytes from position `pos` (wrapping) present. */
  private ringAt(header: number, pos: number, len: number): NetRing {
    const size = this.ring!.size;
    const view = this.mem.view(header, NET_RING_HEADER + size, false);
    this.mem.ensure(header, NET_RING_HEADER);
    this.forSegments(header + NET_RING_HEADER, size, pos, Math.min(len, size), (a, l) => this.mem.ensure(a, l));
    return new NetRing(view, 0, size);
  }

  private drainTx(tx: number, out: NetRecordData[]): void {
    const head = this.mem.readU32(tx);
    const tail = this.mem.readU32(tx + 4);
    if (head === tail) return;
    // The records queued (a corrupt count is refused by the ring's first pop).
    const ring = this.ringAt(tx, head, (tail - head) >>> 0);
    const head0 = ring.head;
    for (let rec = ring.pop(); rec; rec = ring.pop()) {
      if (rec.type !== NetRecord.DATA && rec.type !== NetRecord.CLOSE) {
        throw new NetRingError(`guest sent a tx record of type ${rec.type} on connection ${rec.conn} (only DATA=2 and CLOSE=3 go guest→host)`);
      }
      out.push(rec);
    }
    if (ring.head !== head0) this.mem.touched(tx, 4);
  }

  private fillRx(rx: number): void {
    const size = this.ring!.size;
    const tail = this.mem.readU32(rx + 4);
    const used = (tail - this.mem.readU32(rx)) >>> 0;
    if (used > size) throw new NetRingError(`rx ring corrupt: ${used} bytes queued in a ${size}-byte ring`);
    // The space the records that fit will take, in order (as push takes them).
    let need = 0;
    for (let i = this.rxHead; i < this.rxQueue.length; i++) {
      const space = recordSpace(this.rxQueue[i]!.payload.length);
      if (need + space > size - used) break;
      need += space;
    }
    const ring = this.ringAt(rx, tail, need);
    const tail0 = ring.tail;
    const data = rx + NET_RING_HEADER;
    let moved = 0;
    for (let rec = this.rxQueue[this.rxHead]; rec && ring.push(rec); rec = this.rxQueue[this.rxHead]) {
      this.queuedBytes -= recordSpace(rec.payload.length);
      moved += rec.payload.length;
      this.rxQueue[this.rxHead++] = undefined; // let the payload go
    }
    if (this.rxHead === this.rxQueue.length) {
      this.rxQueue = [];
      this.rxHead = 0;
    } else if (this.rxHead > 1024 && this.rxHead * 2 > this.rxQueue.length) {
      this.rxQueue = this.rxQueue.slice(this.rxHead);
      this.rxHead = 0;
    }
    const written = (ring.tail - tail0) >>> 0;
    if (written === 0) return;
    this.touchRange(data, size, tail0, written);
    this.mem.touched(rx + 4, 4);
    if (moved > 0) this.events.rxMoved(moved);
  }

  private touchRange(data: number, size: number, pos: number, len: number): void {
    this.forSegments(data, size, pos, len, (a, l) => {
      this.mem.touched(a, l);
      this.events.wrote(a, l);
    });
  }

  private forSegments(data: number, size: number, pos: number, len: number, f: (addr: number, len: number) => void): void {
    if (len <= 0) return;
    const off = pos & (size - 1);
    const first = Math.min(len, size - off);
    f(data + off, first);
    if (first < len) f(data, len - first);
  }
}

/**
 * A VM's devices, running on its vCPU worker: console, clock, randomness, configuration, the
 * network rings, the block device, soft-page hints, and the WASI preview1 subset of
 * docs/guest-abi.md. They are synchronous and touch guest memory only through GuestMemoryAccess
 * (so host writes are dirty-marked and post-copy pages are faulted in first).
 *
 * Everything a device knows that is not in guest memory is `exportState()`'s DeviceState: plain,
 * bounded JSON that `Devices.fromState` validates and continues from.
 *
 * Conventions
 * - Guest pointers and lengths arrive as signed i32 and are taken as unsigned.
 * - A `ferry` import given a pointer outside guest memory throws (ERR_GUEST_MEMORY_RANGE: the VM
 *   traps); a WASI import returns EFAULT instead.
 * - `hooks.halt` and `hooks.abort` are expected to throw (unwind the guest). If they return,
 *   Devices throws GuestExitError / GuestTrapError itself, so the guest never continues past
 *   `proc_exit` or `abort`. A corrupt net ring is detected between quanta: the net device stops
 *   touching the rings first, then `hooks.abort` is called (if it throws, the exception leaves
 *   `betweenQuanta`).
 * - Soft pages: the bitmap has one bit per 4 KiB *guest* page (guest address / 4096, i.e. physical
 *   page − RESERVED_PAGES) over the largest guest memory. Devices clear the bit of every page they
 *   write themselves. They cannot see guest stores, so a free report zeroes its pages, and
 *   `softPages()` drops (for good) every soft page that holds anything but zeros: the guest wrote
 *   it after the report, and it is in use again.
 */
import { randomFillSync } from 'node:crypto';
import { MAX_GUEST_BYTES, NET_MAX_PAYLOAD } from '../../../core/abi.js';
import { Bitmap } from '../../../core/bitmap.js';
import { isZeroJs } from '../../../core/codec/zero.js';
import { FerryError, GuestTrapError } from '../../../core/errors.js';
import { recordSpace, type NetRecordData } from '../../../core/net-ring.js';
import { PAGE_SIZE } from '../../../core/pages.js';
import type { GuestMemoryAccess } from '../guest-memory.js';
import { BLOCK_SIZE, BlockDevice } from './block.js';
import { CONSOLE_MAX_LINE, ConsoleDevice } from './console.js';
import { DEFAULT_RX_QUEUE_LIMIT, NetDevice, NetRxOverflowError } from './net.js';
import { DeviceStateError, decodeBitmap, encodeBitmap, fromBase64, toBase64, type DeviceState } from './state.js';

export { BLOCK_SIZE, BlockDeviceError } from './block.js';
export { CONSOLE_MAX_LINE } from './console.js';
export { DEFAULT_RX_QUEUE_LIMIT, NetRxOverflowError } from './net.js';
export { DeviceStateError, type DeviceState } from './state.js';

export interface DevicesInit {
  /** The `--config` string (config_read, WASI args). */
  config: string;
  /** Sparse disk file: created (and sized) if missing, never truncated if present. */
  block?: { path: string; sizeBytes: number };
}

export interface DeviceHooks {
  /** One complete console line, without its `\n`. */
  console(text: string): void;
  /** Records the guest sent (DATA / CLOSE), in ring order; one call per `betweenQuanta` at most. */
  netTx(records: NetRecordData[]): void;
  /** proc_exit. Expected to throw (to unwind the guest). */
  halt(exitCode: number): void;
  /** Guest abort or a corrupt net ring. Expected to throw when called from inside an import. */
  abort(message: string): void;
  /**
   * A `deliverNet` batch was refused because the rx queue is full: nothing of it was queued. The
   * host should reset `err.conns` (ExposeEndpoint.reset); CLOSE-only batches are always accepted.
   * Without this hook the refusal is only visible as deliverNet's `false`.
   */
  netRxOverflow?(err: NetRxOverflowError): void;
  /**
   * DATA payload bytes just moved from the rx queue into the guest's rx ring, once per
   * `betweenQuanta` that moved any. Feed it to ExposeEndpoint.credit when using its flow window.
   */
  netRxCredit?(payloadBytes: number): void;
}

export interface DevicesOptions {
  /** Monotonic host clock in ns (default process.hrtime.bigint); tests inject a fake. */
  now?: () => bigint;
  /** Wall clock in ns, read once at cold boot for WASI's realtime clock (default Date.now()·1e6). */
  wallNs?: () => bigint;
  /** Bytes of host→guest records that may wait for the rx ring (default DEFAULT_RX_QUEUE_LIMIT). */
  rxQueueLimit?: number;
}

/** proc_exit was called and `hooks.halt` returned instead of unwinding. */
export class GuestExitError extends FerryError {
  constructor(readonly exitCode: number) {
    super('ERR_GUEST_EXIT', `guest exited with code ${exitCode}`);
  }
}

/** Bits in the soft-page bitmap: every 4 KiB page of the largest guest memory. */
export const SOFT_PAGE_COUNT = MAX_GUEST_BYTES / PAGE_SIZE;

/** WASI preview1 errno values used here. */
export const Errno = { SUCCESS: 0, BADF: 8, FAULT: 21, INVAL: 28, SPIPE: 70 } as const;
const WASI_FILETYPE_CHARACTER_DEVICE = 2;
const WASI_RIGHT_FD_READ = 1n << 1n;
const WASI_RIGHT_FD_WRITE = 1n << 6n;
const AS_STRING_MAX_BYTES = 8192;
const RANDOM_CHUNK = 1 << 20;
const INT64_MAX = (1n << 63n) - 1n;

const encoder = new TextEncoder();
const utf16 = new TextDecoder('utf-16le', { fatal: false });

function isMemoryRangeError(e: unknown): boolean {
  return e instanceof FerryError && e.code === 'ERR_GUEST_MEMORY_RANGE';
}

export class Devices {
  private readonly configBytes: Uint8Array;
  private readonly console: ConsoleDevice;
  private readonly net: NetDevice;
  private readonly block: BlockDevice | null;
  private readonly soft: Bitmap;
  /** One past the highest page ever reported free (a bound: clears do not lower it). */
  private softEnd = 0;
  private readonly now: () => bigint;
  private readonly realtimeBaseNs: bigint;
  /** Guest clock at the last pause (or at boot/restore). */
  private clockBase: bigint;
  /** Host time when the clock last started running; null while paused. */
  private runningSince: bigint | null;
  private lastClock = 0n;

  /**
   * A cold boot: the guest clock starts at 0 and runs (init may read it). `restore` is internal
   * (use `Devices.fromState`).
   */
  constructor(init: DevicesInit, private readonly mem: GuestMemoryAccess, private readonly hooks: DeviceHooks, options: DevicesOptions = {}, restore?: DeviceState) {
    this.configBytes = encoder.encode(init.config);
    this.now = options.now ?? (() => process.hrtime.bigint());
    this.console = new ConsoleDevice((line) => hooks.console(line), restore ? fromBase64(restore.console.partial) : undefined);
    this.net = new NetDevice(mem, {
      tx: (records) => hooks.netTx(records),
      corrupt: (message) => hooks.abort(message),
      overflow: (err) => hooks.netRxOverflow?.(err),
      rxMoved: (n) => hooks.netRxCredit?.(n),
      wrote: (addr, len) => this.reclaim(addr, len),
    }, options.rxQueueLimit ?? DEFAULT_RX_QUEUE_LIMIT);
    if (restore) {
      this.soft = decodeBitmap(restore.soft, SOFT_PAGE_COUNT, 'soft-page');
      // The encoding stops at its last word with a bit set: base64 length × 3/4 bytes bounds it.
      this.softEnd = Math.min(SOFT_PAGE_COUNT, Math.ceil((restore.soft.words.length * 3) / 16) * 32);
      this.realtimeBaseNs = BigInt(restore.clock.realtimeBaseNs);
      this.clockBase = BigInt(restore.clock.ns);
      this.lastClock = this.clockBase;
      this.runningSince = null; // frozen until resume(): restoring is downtime
    } else {
      this.soft = new Bitmap(SOFT_PAGE_COUNT);
      this.realtimeBaseNs = options.wallNs ? options.wallNs() : BigInt(Date.now()) * 1_000_000n;
      this.clockBase = 0n;
      this.runningSince = this.now();
    }
    if (init.block) {
      const written = restore?.block ? decodeBitmap(restore.block.written, Math.ceil(init.block.sizeBytes / BLOCK_SIZE), 'block write') : undefined;
      this.block = new BlockDevice(init.block.path, init.block.sizeBytes, written);
    } else {
      this.block = null;
    }
  }

  /**
   * Continues devices from `exportState()` output, validated by `parseDeviceState`
   * (state-schema.ts, on the host thread). Throws DeviceStateError (ERR_DEVICE_STATE) for anything
   * inconsistent with `init`/`mem`.
   */
  static fromState(s: DeviceState, init: DevicesInit, mem: GuestMemoryAccess, hooks: DeviceHooks, options: DevicesOptions = {}): Devices {
    if (BigInt(s.clock.ns) > INT64_MAX || BigInt(s.clock.realtimeBaseNs) > INT64_MAX) throw new DeviceStateError('device state clock is out of range');
    if ((s.block === null) !== (init.block === undefined)) {
      throw new DeviceStateError(s.block ? 'device state has a disk but this VM has none' : 'this VM has a disk but its device state has none');
    }
    if (s.block && init.block && s.block.sizeBytes !== init.block.sizeBytes) {
      throw new DeviceStateError(`device state disk is ${s.block.sizeBytes} bytes, this VM's disk is ${init.block.sizeBytes}`);
    }
    const partial = fromBase64(s.console.partial);
    if (partial.length > CONSOLE_MAX_LINE) throw new DeviceStateError('device state console line is too long');
    const rx = s.net.rx.map((r) => ({ conn: r.conn, type: r.type, payload: fromBase64(r.payload) }));
    for (const r of rx) if (r.payload.length > NET_MAX_PAYLOAD) throw new DeviceStateError(`device state rx record of ${r.payload.length} bytes exceeds ${NET_MAX_PAYLOAD}`);
    const limit = options.rxQueueLimit ?? DEFAULT_RX_QUEUE_LIMIT;
    const bytes = rx.reduce((a, r) => a + recordSpace(r.payload.length), 0);
    if (bytes > Math.max(limit, DEFAULT_RX_QUEUE_LIMIT)) throw new DeviceStateError(`device state rx queue of ${bytes} bytes exceeds the limit`);

    const d = new Devices(init, mem, hooks, options, s);
    try {
      if (!d.net.attach(s.net.ring, s.net.failed)) throw new DeviceStateError(`device state net ring ${JSON.stringify(s.net.ring)} does not fit guest memory of ${mem.byteLength} bytes`);
      d.net.restoreQueue(rx);
    } catch (e) {
      d.close();
      throw e;
    }
    return d;
  }

  // ------------------------------------------------------------------ imports

  imports(): WebAssembly.Imports {
    const u = (x: number) => x >>> 0;
    const ferry = {
      console_write: (ptr: number, len: number): void => {
        this.console.write(this.mem.read(u(ptr), u(len)));
      },
      clock_ns: (): bigint => this.clockNs(),
      random_fill: (ptr: number, len: number): void => this.randomFill(u(ptr), u(len)),
      config_read: (ptr: number, cap: number): number => {
        const n = Math.min(u(cap), this.configBytes.length);
        if (n > 0) this.write(u(ptr), this.configBytes.subarray(0, n));
        return this.configBytes.length;
      },
      net_init: (base: number, ringSize: number): number => this.net.init(u(base), u(ringSize)),
      net_notify: (): void => {},
      block_size: (): bigint => BigInt(this.block?.sizeBytes ?? 0),
      block_read: (offset: bigint, ptr: number, len: number): number => {
        const b = this.block;
        if (!b || !b.inRange(offset, u(len))) return -1;
        this.mem.checkRange(u(ptr), u(len));
        b.read(Number(offset), u(len), (at, bytes) => this.write(u(ptr) + at, bytes));
        return 0;
      },
      block_write: (offset: bigint, ptr: number, len: number): number => {
        const b = this.block;
        if (!b || !b.inRange(offset, u(len))) return -1;
        this.mem.checkRange(u(ptr), u(len));
        b.write(Number(offset), u(len), (at, n) => this.mem.read(u(ptr) + at, n));
        return 0;
      },
      soft_pages: (ptr: number, len: number, free: number): void => this.softReport(u(ptr), u(len), free !== 0),
      abort: (msg: number, file: number, line: number, col: number): void => {
        const m = this.asString(u(msg)) ?? 'abort';
        const f = this.asString(u(file));
        const message = f === null ? m : `${m} at ${f}:${u(line)}:${u(col)}`;
        this.console.flush();
        this.hooks.abort(message);
        throw new GuestTrapError(`guest aborted: ${message}`);
      },
    };
    const wasi = (f: () => number): number => {
      try {
        return f();
      } catch (e) {
        if (isMemoryRangeError(e)) return Errno.FAULT;
        throw e;
      }
    };
    const stdio = (fd: number) => fd >= 0 && fd <= 2;
    const wasiImports = {
      fd_write: (fd: number, iovs: number, iovsLen: number, nwritten: number): number => wasi(() => {
        if (fd !== 1 && fd !== 2) return Errno.BADF;
        const n = u(iovsLen);
        if (n > 1 << 20) return Errno.INVAL;
        const vec = this.mem.read(u(iovs), n * 8);
        const dv = new DataView(vec.buffer, vec.byteOffset, vec.byteLength);
        const parts: Uint8Array[] = [];
        let total = 0;
        for (let i = 0; i < n; i++) {
          const buf = dv.getUint32(i * 8, true);
          const len = dv.getUint32(i * 8 + 4, true);
          parts.push(this.mem.read(buf, len));
          total += len;
        }
        if (total > 0xffffffff) return Errno.INVAL;
        this.mem.checkRange(u(nwritten), 4);
        for (const p of parts) this.console.write(p);
        this.writeU32(u(nwritten), total);
        return Errno.SUCCESS;
      }),
      fd_close: (fd: number): number => (stdio(fd) ? Errno.SUCCESS : Errno.BADF),
      fd_seek: (fd: number, _offset: bigint, _whence: number, _newOffset: number): number => (stdio(fd) ? Errno.SPIPE : Errno.BADF),
      fd_fdstat_get: (fd: number, ptr: number): number => wasi(() => {
        if (!stdio(fd)) return Errno.BADF;
        const st = new Uint8Array(24);
        const dv = new DataView(st.buffer);
        dv.setUint8(0, WASI_FILETYPE_CHARACTER_DEVICE);
        dv.setUint16(2, 0, true);
        dv.setBigUint64(8, fd === 0 ? WASI_RIGHT_FD_READ : WASI_RIGHT_FD_WRITE, true);
        dv.setBigUint64(16, 0n, true);
        this.write(u(ptr), st);
        return Errno.SUCCESS;
      }),
      proc_exit: (code: number): void => {
        this.console.flush();
        this.hooks.halt(code);
        throw new GuestExitError(code);
      },
      clock_time_get: (id: number, _precision: bigint, ptr: number): number => wasi(() => {
        let t: bigint;
        if (id === 0) t = this.realtimeBaseNs + this.clockNs();
        else if (id === 1) t = this.clockNs();
        else return Errno.INVAL;
        this.writeU64(u(ptr), t);
        return Errno.SUCCESS;
      }),
      random_get: (ptr: number, len: number): number => wasi(() => {
        this.randomFill(u(ptr), u(len));
        return Errno.SUCCESS;
      }),
      args_sizes_get: (argc: number, bufSize: number): number => wasi(() => {
        this.mem.checkRange(u(argc), 4);
        this.mem.checkRange(u(bufSize), 4);
        this.writeU32(u(argc), 1);
        this.writeU32(u(bufSize), this.configBytes.length + 1);
        return Errno.SUCCESS;
      }),
      args_get: (argv: number, buf: number): number => wasi(() => {
        const s = new Uint8Array(this.configBytes.length + 1);
        s.set(this.configBytes);
        this.mem.checkRange(u(argv), 4);
        this.write(u(buf), s);
        this.writeU32(u(argv), u(buf));
        return Errno.SUCCESS;
      }),
      environ_sizes_get: (count: number, bufSize: number): number => wasi(() => {
        this.mem.checkRange(u(count), 4);
        this.mem.checkRange(u(bufSize), 4);
        this.writeU32(u(count), 0);
        this.writeU32(u(bufSize), 0);
        return Errno.SUCCESS;
      }),
      environ_get: (_environ: number, _buf: number): number => Errno.SUCCESS,
    };
    return { ferry, wasi_snapshot_preview1: wasiImports };
  }

  // ------------------------------------------------------------------ worker interface

  /** Queues host→guest records (OPEN/DATA/CLOSE). Returns false when the batch was refused (queue full; see DeviceHooks.netRxOverflow). */
  deliverNet(records: NetRecordData[]): boolean {
    return this.net.deliver(records);
  }

  /** Drains the tx ring (→ hooks.netTx), then moves queued rx records into the rx ring as space allows. */
  betweenQuanta(): void {
    this.net.service();
  }

  /** The guest has unread records in its rx ring (new input for an IDLE guest). */
  hasPendingInput(): boolean {
    return this.net.rxPending();
  }

  /** Bytes of host→guest records waiting for rx ring space. */
  rxQueuedBytes(): number {
    return this.net.queued;
  }

  /** Freezes the guest clock. Idempotent. */
  pause(): void {
    if (this.runningSince === null) return;
    this.clockBase = this.clockNs();
    this.runningSince = null;
  }

  /** Lets the guest clock run again from where it stopped. Idempotent. */
  resume(): void {
    if (this.runningSince === null) this.runningSince = this.now();
  }

  /** Guest monotonic clock (ns): never decreases, does not advance while paused. */
  clockNs(): bigint {
    let v = this.clockBase;
    if (this.runningSince !== null) {
      const d = this.now() - this.runningSince;
      if (d > 0n) v += d;
    }
    if (v < this.lastClock) v = this.lastClock;
    if (v > INT64_MAX) v = INT64_MAX;
    this.lastClock = v;
    return v;
  }

  /** Emits the console's unfinished line (call on stop). */
  flushConsole(): void {
    this.console.flush();
  }

  exportState(): DeviceState {
    return {
      version: 1,
      clock: { ns: this.clockNs().toString(), realtimeBaseNs: this.realtimeBaseNs.toString() },
      net: {
        ring: this.net.ring ? { ...this.net.ring } : null,
        failed: this.net.failed,
        rx: this.net.pending().map((r) => ({ conn: r.conn, type: r.type, payload: toBase64(r.payload) })),
      },
      block: this.block ? { path: this.block.path, sizeBytes: this.block.sizeBytes, written: encodeBitmap(this.block.written) } : null,
      soft: encodeBitmap(this.soft, this.softWords()),
      console: { partial: toBase64(this.console.pending()) },
    };
  }

  /**
   * Guest pages (guest address / 4096) reported free and not written since. A copy. A report
   * zeroes its pages, so a soft page that holds anything but zeros was written by the guest after
   * it (devices see their own writes, not the guest's stores): it is in use again, from now on.
   * Pages beyond the current memory stay as reported (memory grows zeroed).
   */
  softPages(): Bitmap {
    const bm = new Bitmap(SOFT_PAGE_COUNT);
    bm.words.set(this.softPageWords());
    return bm;
  }

  /**
   * softPages() as its words, up to the last that may hold a set bit (fewer than the bitmap's
   * 32768 words, often none): what a pause exports, inside a migration's downtime, once per VM,
   * in code that is not hot yet, where a loop over every word cost 1-2 ms.
   */
  softPageWords(): Uint32Array {
    const inMemory = Math.floor(this.mem.byteLength / PAGE_SIZE);
    const words = this.soft.words;
    const used = this.softWords();
    for (let wi = 0, end = Math.min(used, Math.ceil(inMemory / 32)); wi < end; wi++) {
      for (let w = words[wi]; w !== 0; w &= w - 1) {
        const p = (wi << 5) + 31 - Math.clz32(w & -w);
        if (p < inMemory && !isZeroJs(this.mem.view(p * PAGE_SIZE, PAGE_SIZE))) this.soft.clear(p);
      }
    }
    return words.slice(0, used);
  }

  /** Words of the soft-page bitmap that may hold a set bit (past them, all are clear). */
  private softWords(): number {
    return Math.ceil(this.softEnd / 32);
  }

  /** Clears soft-page bits of pages known to be in use again (e.g. the dirty pages of a harvest, as guest page numbers). */
  markInUse(pages: Iterable<number> | Bitmap): void {
    if (pages instanceof Bitmap) {
      this.soft.andNot(pages);
      return;
    }
    for (const p of pages) if (p >= 0 && p < this.soft.size) this.soft.clear(p);
  }

  /** Disk blocks (4 KiB) written since boot or the last clearBlockWrites(); a copy, null without a disk. */
  blockWriteBitmap(): Bitmap | null {
    return this.block ? this.block.written.clone() : null;
  }

  clearBlockWrites(): void {
    this.block?.written.clearAll();
  }

  /** Releases the disk file. */
  close(): void {
    this.block?.close();
  }

  // ------------------------------------------------------------------ helpers

  private write(addr: number, data: Uint8Array): void {
    this.reclaim(addr, data.length);
    this.mem.write(addr, data);
  }

  private writeU32(addr: number, v: number): void {
    this.reclaim(addr, 4);
    this.mem.writeU32(addr, v);
  }

  private writeU64(addr: number, v: bigint): void {
    this.reclaim(addr, 8);
    this.mem.writeU64(addr, v);
  }

  /** A device writes `[addr, addr+len)`: those pages are in use. */
  private reclaim(addr: number, len: number): void {
    if (len <= 0) return;
    const last = Math.min(Math.floor((addr + len - 1) / PAGE_SIZE), this.soft.size - 1);
    for (let p = Math.floor(addr / PAGE_SIZE); p <= last; p++) this.soft.clear(p);
  }

  private softReport(ptr: number, len: number, free: boolean): void {
    const first = Math.ceil(ptr / PAGE_SIZE);
    const end = Math.min(Math.floor((ptr + len) / PAGE_SIZE), this.soft.size);
    // Free pages' content does not matter: zeroed now (and marked dirty), so that softPages() can
    // tell a page the guest wrote afterwards. Pages beyond the current memory are zero already.
    const zeroEnd = Math.min(end, Math.floor(this.mem.byteLength / PAGE_SIZE));
    if (free && zeroEnd > first) {
      const [at, n] = [first * PAGE_SIZE, (zeroEnd - first) * PAGE_SIZE];
      this.mem.view(at, n).fill(0);
      this.mem.touched(at, n);
    }
    if (free) this.softEnd = Math.max(this.softEnd, end);
    for (let p = first; p < end; p++) {
      if ((p & 31) === 0 && p + 32 <= end) {
        this.soft.words[p >>> 5] = free ? 0xffffffff : 0;
        p += 31;
      } else if (free) this.soft.set(p);
      else this.soft.clear(p);
    }
  }

  private randomFill(ptr: number, len: number): void {
    this.mem.checkRange(ptr, len);
    for (let done = 0; done < len;) {
      const n = Math.min(RANDOM_CHUNK, len - done);
      this.write(ptr + done, randomFillSync(new Uint8Array(n)));
      done += n;
    }
  }

  /** An AssemblyScript string (UTF-16LE, byte length in the u32 before it); best effort. */
  private asString(ptr: number): string | null {
    if (ptr === 0) return null;
    try {
      if (ptr < 4) throw new Error('bad pointer');
      const bytes = this.mem.readU32(ptr - 4);
      const n = Math.min(bytes & ~1, AS_STRING_MAX_BYTES);
      const text = utf16.decode(this.mem.read(ptr, n));
      return bytes > n ? `${text}…` : text;
    } catch {
      return `<unreadable string at ${ptr}>`;
    }
  }
}

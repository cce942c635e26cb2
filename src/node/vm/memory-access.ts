import { DIRTY_MAP_OFFSET, PRESENCE_MAP_OFFSET, RESERVED_BYTES } from '../../core/abi.js';
import { FerryError } from '../../core/errors.js';
import { PAGE_SHIFT } from '../../core/pages.js';
import type { GuestMemoryAccess } from './guest-memory.js';

export class GuestMemoryRangeError extends FerryError {
  constructor(message: string) {
    super('ERR_GUEST_MEMORY_RANGE', message);
  }
}

/**
 * GuestMemoryAccess over a VM's shared memory, for host code running on the vCPU thread between
 * (or during, via imports) quanta. It does what the instrumented guest code does for its own
 * accesses: with dirty logging on, mark written pages after writing; on a post-copy destination,
 * fault absent pages in before touching them.
 */
export class SharedGuestMemory implements GuestMemoryAccess {
  private u8: Uint8Array;
  private dv: DataView;
  /** Set by the worker when the dirty variant is active. */
  logDirty = false;
  /** Set by the worker while pages may be absent (presence variant active). */
  checkPresence = false;

  /**
   * @param fault blocks until physical page `physPage` is present.
   * @param faultAll the same for several absent pages at once (a range host code is about to
   *   touch), in one wait where it can; without it, each page is faulted in turn.
   */
  constructor(private readonly memory: WebAssembly.Memory, private readonly fault: (physPage: number) => void, private readonly faultAll?: (physPages: number[]) => void) {
    this.u8 = new Uint8Array(memory.buffer);
    this.dv = new DataView(memory.buffer);
  }

  private refresh(): void {
    // A grown shared memory hands out a longer SharedArrayBuffer; old views keep the old length.
    if (this.memory.buffer.byteLength !== this.u8.byteLength) {
      this.u8 = new Uint8Array(this.memory.buffer);
      this.dv = new DataView(this.memory.buffer);
    }
  }

  get byteLength(): number {
    this.refresh();
    return this.u8.byteLength - RESERVED_BYTES;
  }

  checkRange(addr: number, len: number): void {
    if (!Number.isInteger(addr) || !Number.isInteger(len) || addr < 0 || len < 0 || addr + len > this.byteLength) {
      throw new GuestMemoryRangeError(`guest memory range [${addr}, ${addr + len}) is outside the guest's ${this.byteLength} bytes`);
    }
  }

  private present(addr: number, len: number): void {
    if (!this.checkPresence || len === 0) return;
    const first = (addr + RESERVED_BYTES) >>> PAGE_SHIFT;
    const last = (addr + RESERVED_BYTES + len - 1) >>> PAGE_SHIFT;
    if (first === last || !this.faultAll) {
      for (let p = first; p <= last; p++) if (this.u8[PRESENCE_MAP_OFFSET + p] === 0) this.fault(p);
      return;
    }
    const absent: number[] = [];
    for (let p = first; p <= last; p++) if (this.u8[PRESENCE_MAP_OFFSET + p] === 0) absent.push(p);
    if (absent.length === 1) this.fault(absent[0]);
    else if (absent.length > 1) this.faultAll(absent);
  }

  touched(addr: number, len: number): void {
    if (!this.logDirty || len === 0) return;
    const first = (addr + RESERVED_BYTES) >>> PAGE_SHIFT;
    const last = (addr + RESERVED_BYTES + len - 1) >>> PAGE_SHIFT;
    this.u8.fill(1, DIRTY_MAP_OFFSET + first, DIRTY_MAP_OFFSET + last + 1);
  }

  read(addr: number, len: number): Uint8Array {
    this.checkRange(addr, len);
    this.present(addr, len);
    return this.u8.slice(RESERVED_BYTES + addr, RESERVED_BYTES + addr + len);
  }

  write(addr: number, data: Uint8Array): void {
    this.checkRange(addr, data.length);
    this.present(addr, data.length);
    this.u8.set(data, RESERVED_BYTES + addr);
    this.touched(addr, data.length);
  }

  view(addr: number, len: number, present = true): Uint8Array {
    this.checkRange(addr, len);
    if (present) this.present(addr, len);
    return this.u8.subarray(RESERVED_BYTES + addr, RESERVED_BYTES + addr + len);
  }

  ensure(addr: number, len: number): void {
    this.checkRange(addr, len);
    this.present(addr, len);
  }

  readU32(addr: number): number {
    this.checkRange(addr, 4);
    this.present(addr, 4);
    return this.dv.getUint32(RESERVED_BYTES + addr, true);
  }

  writeU32(addr: number, value: number): void {
    this.checkRange(addr, 4);
    this.present(addr, 4);
    this.dv.setUint32(RESERVED_BYTES + addr, value, true);
    this.touched(addr, 4);
  }

  writeU64(addr: number, value: bigint): void {
    this.checkRange(addr, 8);
    this.present(addr, 8);
    this.dv.setBigUint64(RESERVED_BYTES + addr, value, true);
    this.touched(addr, 8);
  }
}

/**
 * Copies `src` into `dst` at `at`, where either may be a view of shared memory (guest RAM), at
 * memory speed whatever their alignment. `bounce` is caller-owned scratch of at least 16 bytes
 * (a multiple of 8 long, starting 8-byte aligned, not shared); bigger means fewer steps.
 *
 * Why: V8 copies to or from a SharedArrayBuffer with relaxed-atomic word moves, and byte by byte
 * when the two addresses differ modulo 8 — as page data does when a frame lies at any offset of a
 * socket chunk (and did in every PAGES frame of protocol version 1, with its 9-byte page heads).
 * Measured on this machine kind: 1.8–1.9 GB/s byte-wise; 5–12 GB/s through a bounce buffer placed
 * at the shared side's alignment (plain memcpy on the other side).
 */
export function copyBytes(dst: Uint8Array, at: number, src: Uint8Array, bounce: Uint8Array): void {
  // The same alignment modulo 8 first (every page copy between guest memory and a frame): asked
  // first, the buffer checks below took a third of the time of copying 256 MiB page by page.
  if (((dst.byteOffset + at - src.byteOffset) & 7) === 0) {
    dst.set(src, at);
    return;
  }
  const dstShared = dst.buffer instanceof SharedArrayBuffer;
  const srcShared = src.buffer instanceof SharedArrayBuffer;
  if ((!dstShared && !srcShared) || (dstShared && srcShared)) {
    dst.set(src, at);
    return;
  }
  // Put the bytes in `bounce` at the shared side's alignment, so that side moves whole words.
  const k = (dstShared ? dst.byteOffset + at : src.byteOffset) & 7;
  const step = (bounce.length & ~7) - 8;
  for (let off = 0; off < src.length; off += step) {
    const n = Math.min(step, src.length - off);
    bounce.set(src.subarray(off, off + n), k);
    dst.set(bounce.subarray(k, k + n), at + off);
  }
}

/**
 * Makes the kernel back physical bytes `[from, to)` of `memory` now, by writing a zero into each
 * 4 KiB page, so that later copies into them run at memory speed instead of taking a page fault
 * per page (measured for 256 MiB of fresh shared memory on this machine kind: 115–1000 ms to fault
 * in, depending on whether the hypervisor still backs the pages; 20–30 ms to write it again).
 *
 * Only for memory nobody has written yet (all zero, so writing zero changes nothing): a migration
 * destination's guest memory before the first page arrives. Works in slices of `sliceBytes`,
 * yielding to the event loop between them through `yieldFn` (if given) so a host thread stays
 * responsive; stops early when `signal` aborts. Resolves with the pages touched.
 */
export async function prefaultFreshMemory(
  memory: WebAssembly.Memory, from: number, to: number,
  opts: { sliceBytes?: number; yieldFn?: () => Promise<void>; signal?: AbortSignal } = {},
): Promise<number> {
  const slice = opts.sliceBytes ?? 8 << 20;
  const u8 = new Uint8Array(memory.buffer);
  const stop = Math.min(to, u8.length);
  let n = 0;
  for (let at = from - (from & 4095); at < stop && !opts.signal?.aborted;) {
    const end = Math.min(stop, at + slice);
    for (; at < end; at += 4096, n++) u8[at] = 0;
    if (at < stop && opts.yieldFn) await opts.yieldFn();
  }
  return n;
}

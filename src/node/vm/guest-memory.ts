/**
 * How host code (devices, the WASI shim) touches guest memory from the vCPU worker.
 *
 * Every device write must look like a guest store to migration: the page must be present first
 * (post-copy destination) and is marked dirty afterwards (data first, mark second). Devices never
 * index the raw memory themselves; they go through this interface, whose addresses are *guest*
 * addresses (physical = guest + RESERVED_BYTES).
 */
export interface GuestMemoryAccess {
  /** Current guest memory size in bytes (it may grow). */
  readonly byteLength: number;
  /** Throws a GuestTrapError-like FerryError ('ERR_GUEST_MEMORY_RANGE') when the range is outside guest memory. */
  checkRange(addr: number, len: number): void;
  /** Copies `len` guest bytes at `addr` out (faulting absent pages in first). */
  read(addr: number, len: number): Uint8Array;
  /** Copies `data` into guest memory at `addr` (faulting in first, marking dirty after). */
  write(addr: number, data: Uint8Array): void;
  /**
   * A live view of guest memory `[addr, addr+len)` for code that reads and writes in place (the
   * net rings). Call `touched(addr, len)` after writing through it so the pages are marked dirty.
   * The range is made present before the view is returned, unless `present` is false: then the
   * caller makes present (`ensure`) exactly the bytes it will touch through the view.
   */
  view(addr: number, len: number, present?: boolean): Uint8Array;
  /** Makes `[addr, addr+len)` present (post-copy: absent pages are fetched, all in one wait where the VM can). */
  ensure(addr: number, len: number): void;
  touched(addr: number, len: number): void;
  readU32(addr: number): number;
  writeU32(addr: number, value: number): void;
  writeU64(addr: number, value: bigint): void;
}

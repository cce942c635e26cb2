/**
 * The guest ABI and the physical layout of a ferry VM's memory, as constants shared by the
 * instrumenter, the vCPU worker, the devices and the engine. `docs/guest-abi.md` is the prose
 * version of this file; keep them in step.
 *
 * Physical layout of the shared `WebAssembly.Memory` (guest address `a` lives at physical
 * `a + RESERVED_BYTES`; the rewriter adds RESERVED_BYTES to every memory access, so the maps below
 * are out of the guest's reach):
 *
 *   [0, 1 MiB)          dirty map: one byte per 4 KiB physical page, 1 = written since harvested
 *   [1 MiB, 2 MiB)      presence map: one byte per 4 KiB physical page, 1 = present (post-copy)
 *   [2 MiB, ...)        guest RAM
 *
 * Both maps cover 2^20 pages = 4 GiB, the most a wasm32 memory can hold, so their place never
 * depends on the VM's size and every variant of a module shares one layout.
 */

export const DIRTY_MAP_OFFSET = 0;
export const PRESENCE_MAP_OFFSET = 1 << 20;
export const MAP_BYTES = 1 << 20;
export const RESERVED_BYTES = 2 << 20;
/** Physical page index of guest page 0. */
export const RESERVED_PAGES = RESERVED_BYTES / 4096;
/** Wasm pages (64 KiB) the reserved region occupies. */
export const RESERVED_WASM_PAGES = RESERVED_BYTES / 65536;
/** Largest guest RAM: 4 GiB of wasm32 memory less the reserved region. */
export const MAX_GUEST_BYTES = 4 * 1024 ** 3 - RESERVED_BYTES;

/** Import module name for ferry's devices. */
export const FERRY_IMPORT_MODULE = 'ferry';
/** Import module for the WASI preview1 subset ferry provides (so C guests built against wasi-libc run). */
export const WASI_IMPORT_MODULE = 'wasi_snapshot_preview1';

/** Imports a guest may declare from the `ferry` module, with their signatures (params → results). */
export const FERRY_IMPORTS = {
  console_write: { params: ['i32', 'i32'], results: [] },
  clock_ns: { params: [], results: ['i64'] },
  random_fill: { params: ['i32', 'i32'], results: [] },
  config_read: { params: ['i32', 'i32'], results: ['i32'] },
  net_init: { params: ['i32', 'i32'], results: ['i32'] },
  net_notify: { params: [], results: [] },
  block_size: { params: [], results: ['i64'] },
  block_read: { params: ['i64', 'i32', 'i32'], results: ['i32'] },
  block_write: { params: ['i64', 'i32', 'i32'], results: ['i32'] },
  soft_pages: { params: ['i32', 'i32', 'i32'], results: [] },
  abort: { params: ['i32', 'i32', 'i32', 'i32'], results: [] },
} as const satisfies Record<string, { params: readonly string[]; results: readonly string[] }>;

/** The WASI preview1 functions ferry provides. */
export const WASI_IMPORTS = {
  fd_write: { params: ['i32', 'i32', 'i32', 'i32'], results: ['i32'] },
  fd_close: { params: ['i32'], results: ['i32'] },
  fd_seek: { params: ['i32', 'i64', 'i32', 'i32'], results: ['i32'] },
  fd_fdstat_get: { params: ['i32', 'i32'], results: ['i32'] },
  proc_exit: { params: ['i32'], results: [] },
  clock_time_get: { params: ['i32', 'i64', 'i32'], results: ['i32'] },
  random_get: { params: ['i32', 'i32'], results: ['i32'] },
  args_sizes_get: { params: ['i32', 'i32'], results: ['i32'] },
  args_get: { params: ['i32', 'i32'], results: ['i32'] },
  environ_sizes_get: { params: ['i32', 'i32'], results: ['i32'] },
  environ_get: { params: ['i32', 'i32'], results: ['i32'] },
} as const satisfies Record<string, { params: readonly string[]; results: readonly string[] }>;

/**
 * Names the instrumenter adds to the rewritten module. They start with `__ferry_` and a guest
 * module that already uses that prefix is refused.
 */
export const REWRITE = {
  /** Imported shared memory: (import "ferry_rt" "memory"). */
  memoryModule: 'ferry_rt',
  memoryName: 'memory',
  /** Post-copy fault import, added by the presence variant: (import "ferry_rt" "fault" (func (param i32))) — argument is a physical page index; returns once the page is present. */
  faultName: 'fault',
  /** Exported mutable globals: `__ferry_g<index>` in global index order. */
  globalPrefix: '__ferry_g',
  /** Cold-boot entry: applies the (now passive) data segments, then runs the original start function. Called once, never on a restored or migrated VM. */
  boot: '__ferry_boot',
} as const;

/** Values `run(budget)` returns. */
export const RunStatus = {
  /** More work is ready; call again. */
  RUNNING: 0,
  /** Waiting for input (network, time); the host may wait for a device event or a short idle timeout. */
  IDLE: 1,
  /** The guest has finished; the VM stops cleanly. */
  HALTED: 2,
} as const;

/** Network ring record types (both directions). */
export const NetRecord = { OPEN: 1, DATA: 2, CLOSE: 3 } as const;
/** Ring header: head u32 (consumer), tail u32 (producer), size u32 (data bytes, power of two), flags u32. */
export const NET_RING_HEADER = 16;
/** Record header: len u32 (payload bytes), conn u32, type u32. Records are padded to 4 bytes. */
export const NET_RECORD_HEADER = 12;
export const NET_MAX_PAYLOAD = 65536;

/** Page math shared by the runtime, the engine and the simulator. */

/** Migration page size in bytes (dirty-log and presence granularity). */
export const PAGE_SIZE = 4096;
export const PAGE_SHIFT = 12;
/** WebAssembly page size (the unit of `memory.grow`). */
export const WASM_PAGE_SIZE = 65536;
export const PAGES_PER_WASM_PAGE = WASM_PAGE_SIZE / PAGE_SIZE;

/**
 * The PAGE_SIZE bytes of `bytes` from `offset`: `bytes` itself when it is exactly that page (a
 * raw page off the wire), so the hot paths that hash or install pages make no view per page.
 */
export function pageBytes(bytes: Uint8Array, offset: number): Uint8Array {
  return offset === 0 && bytes.length === PAGE_SIZE ? bytes : bytes.subarray(offset, offset + PAGE_SIZE);
}

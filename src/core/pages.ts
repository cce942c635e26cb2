/** Page math shared by the runtime, the engine and the simulator. */

/** Migration page size in bytes (dirty-log and presence granularity). */
export const PAGE_SIZE = 4096;
export const PAGE_SHIFT = 12;
/** WebAssembly page size (the unit of `memory.grow`). */
export const WASM_PAGE_SIZE = 65536;
export const PAGES_PER_WASM_PAGE = WASM_PAGE_SIZE / PAGE_SIZE;

export function pageOf(address: number): number {
  return Math.floor(address / PAGE_SIZE);
}

export function pagesFor(bytes: number): number {
  return Math.ceil(bytes / PAGE_SIZE);
}

/** First and last page (inclusive) touched by `length` bytes at `address`; null when length is 0. */
export function pageSpan(address: number, length: number): [number, number] | null {
  if (length <= 0) return null;
  return [pageOf(address), pageOf(address + length - 1)];
}

/** True when every byte of the page is zero. `page` must be PAGE_SIZE long and 8-byte aligned. */
export function isZeroPage(words: BigUint64Array | Float64Array, start = 0, count = PAGE_SIZE / 8): boolean {
  // Reading as 64-bit words is ~8x faster than byte-wise; Float64 compare would treat -0 as 0,
  // so callers pass a BigUint64Array view or accept that caveat knowingly.
  for (let i = start, end = start + count; i < end; i++) if (words[i]) return false;
  return true;
}

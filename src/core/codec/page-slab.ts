/**
 * Page-sized slots of codec state (the XBZRLE cache, the dedup index's copies, the dedup store),
 * backed by memory taken a chunk at a time as slots are first written.
 *
 * Why not one buffer: a codec's cache is sized for the worst case (64 MiB by default, 128 MiB for
 * a destination's dedup store), and allocating it whole at the start of a migration handed V8
 * that much external memory at once: measured on a host relaying a kv client's traffic, the
 * burst of garbage collections it set off held the source's event loop 26-45 ms just before the
 * pause, and the client saw that stall and the downtime back to back. Taken a chunk at a time,
 * a cache costs what it holds (a kv VM's post-copy filled 5 MiB of its 128 MiB) and its
 * allocations spread over the migration.
 */
import { PAGE_SIZE } from '../pages.js';

/** Pages per chunk: 1 MiB. */
const CHUNK_PAGES = 256;
const CHUNK_SHIFT = 8;
const WORDS = PAGE_SIZE >> 2;

export class PageSlab {
  private readonly chunks: (Uint8Array | undefined)[];
  private readonly chunkWords: (Int32Array | undefined)[];
  /** Bytes allocated so far. */
  allocatedBytes = 0;

  constructor(readonly slots: number) {
    if (!(Number.isInteger(slots) && slots >= 1)) throw new RangeError(`a page slab needs at least one slot, not ${slots}`);
    const n = Math.ceil(slots / CHUNK_PAGES);
    this.chunks = new Array<Uint8Array | undefined>(n).fill(undefined);
    this.chunkWords = new Array<Int32Array | undefined>(n).fill(undefined);
  }

  private chunk(slot: number): Uint8Array {
    if (!(slot >= 0 && slot < this.slots)) throw new RangeError(`slot ${slot} outside the slab's ${this.slots}`);
    const c = slot >>> CHUNK_SHIFT;
    let bytes = this.chunks[c];
    if (!bytes) {
      // The last chunk holds only the slots that remain.
      const pages = Math.min(CHUNK_PAGES, this.slots - (c << CHUNK_SHIFT));
      bytes = new Uint8Array(pages * PAGE_SIZE);
      this.chunks[c] = bytes;
      this.chunkWords[c] = new Int32Array(bytes.buffer);
      this.allocatedBytes += bytes.length;
    }
    return bytes;
  }

  /** Copies `page` (PAGE_SIZE bytes) into `slot`. */
  set(slot: number, page: Uint8Array): void {
    this.chunk(slot).set(page, (slot & (CHUNK_PAGES - 1)) * PAGE_SIZE);
  }

  /** The bytes of `slot` (a view: valid until the slot is written again; zero if never written). */
  bytes(slot: number): Uint8Array {
    const off = (slot & (CHUNK_PAGES - 1)) * PAGE_SIZE;
    return this.chunk(slot).subarray(off, off + PAGE_SIZE);
  }

  /** The words of `slot`, as {@link bytes}. */
  words(slot: number): Int32Array {
    this.chunk(slot);
    const off = (slot & (CHUNK_PAGES - 1)) * WORDS;
    return this.chunkWords[slot >>> CHUNK_SHIFT]!.subarray(off, off + WORDS);
  }
}

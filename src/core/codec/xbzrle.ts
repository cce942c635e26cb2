/**
 * xbzrle: XOR + zero-run delta of a re-dirtied page against the sender's cached copy of what it
 * last sent for that page (Svärd et al.'s XBRLE, as refined by Shribman & Hudzia into XBZRLE).
 *
 * Delta layout (what `bytes` holds), LEB128 varints:
 *
 *   zrun₀ [nzrun₀ byte×nzrun₀ [zrun₁ nzrun₁ byte×nzrun₁ …]] [zrunₖ]
 *
 * zrun = bytes unchanged (old XOR new is zero), nzrun = count of changed bytes followed by their
 * *new* values (as QEMU does: the XOR only finds the runs; the destination copies, it does not XOR).
 * Runs alternate, cover the page exactly (sum = PAGE_SIZE), and are canonical: only zrun₀ may be 0,
 * every nzrun ≥ 1. So an unchanged page is one zrun of 4096 (2 bytes), and any strict prefix or any
 * extension of a delta is refused — truncation never decodes silently.
 *
 * The scan compares Int32 words and narrows to bytes only at the edges of a changed run.
 */
import { PAGE_SIZE } from '../pages.js';
import { PageSlab } from './page-slab.js';
import {
  CodecErrorCode, DEFAULT_CODEC_IDS, codecFail, writeVarint,
  type PageCodec, type PageDecoder, type PageEncoder,
} from './codec.js';

const WORDS = PAGE_SIZE >> 2;

function ctz32(x: number): number {
  return 31 - Math.clz32(x & -x);
}

/**
 * Writes the delta from `oldW` to `newW` (PAGE_SIZE/4 Int32 words; `newB` is the byte view of the
 * new page) into `out`; returns its length, or -1 as soon as it would exceed `limit` bytes.
 */
export function xbzrleEncodePage(oldW: Int32Array, newW: Int32Array, newB: Uint8Array, out: Uint8Array, limit: number): number {
  let o = 0;
  let pos = 0;
  let w = 0;
  for (;;) {
    // Skip equal words eight at a time (one OR of XORs per block), then narrow to the word.
    while (w + 8 <= WORDS && ((oldW[w] ^ newW[w]) | (oldW[w + 1] ^ newW[w + 1]) | (oldW[w + 2] ^ newW[w + 2]) | (oldW[w + 3] ^ newW[w + 3])
      | (oldW[w + 4] ^ newW[w + 4]) | (oldW[w + 5] ^ newW[w + 5]) | (oldW[w + 6] ^ newW[w + 6]) | (oldW[w + 7] ^ newW[w + 7])) === 0) w += 8;
    while (w < WORDS && oldW[w] === newW[w]) w++;
    if (w === WORDS) {
      if (pos < PAGE_SIZE) {
        if (o + 2 > limit) return -1;
        o = writeVarint(out, o, PAGE_SIZE - pos);
      }
      return o;
    }
    const start = (w << 2) + (ctz32(oldW[w] ^ newW[w]) >> 3);
    w++;
    while (w < WORDS && oldW[w] !== newW[w]) w++;
    const end = ((w - 1) << 2) + ((31 - Math.clz32(oldW[w - 1] ^ newW[w - 1])) >> 3) + 1;
    const nz = end - start;
    if (o + 4 + nz > limit) return -1; // two varints of ≤ 2 bytes each, then the bytes
    o = writeVarint(out, o, start - pos);
    o = writeVarint(out, o, nz);
    if (nz <= 16) for (let i = start; i < end; i++) out[o++] = newB[i];
    else {
      out.set(newB.subarray(start, end), o);
      o += nz;
    }
    pos = end;
  }
}

// Position after the last varint read by `vint` (a module variable instead of a tuple: no allocation per run).
let vNext = 0;

/** Checked LEB128 read of a run length (≤ 3 bytes suffice for ≤ PAGE_SIZE); sets vNext. */
function vint(buf: Uint8Array, i: number, what: string): number {
  const n = buf.length;
  if (i >= n) codecFail(CodecErrorCode.CORRUPT, `delta ends inside a ${what}`);
  let b = buf[i];
  if (b < 0x80) { vNext = i + 1; return b; }
  let v = b & 0x7f;
  if (i + 1 >= n) codecFail(CodecErrorCode.CORRUPT, `delta ends inside a ${what}`);
  b = buf[i + 1];
  if (b < 0x80) {
    if (b === 0) codecFail(CodecErrorCode.CORRUPT, `${what} is not minimally encoded`);
    vNext = i + 2;
    return v | (b << 7);
  }
  v |= (b & 0x7f) << 7;
  if (i + 2 >= n) codecFail(CodecErrorCode.CORRUPT, `delta ends inside a ${what}`);
  b = buf[i + 2];
  if (b >= 0x80) codecFail(CodecErrorCode.CORRUPT, `${what} is longer than 3 bytes`);
  if (b === 0) codecFail(CodecErrorCode.CORRUPT, `${what} is not minimally encoded`);
  vNext = i + 3;
  return v | (b << 14);
}

/** Checks a delta's structure without touching any page; throws CodecError. */
function validate(bytes: Uint8Array): void {
  let pos = 0;
  let i = 0;
  let first = true;
  const n = bytes.length;
  while (i < n) {
    const z = vint(bytes, i, 'zero run');
    i = vNext;
    if (z === 0 && !first) codecFail(CodecErrorCode.CORRUPT, `empty zero run at page offset ${pos}`);
    pos += z;
    if (pos > PAGE_SIZE) codecFail(CodecErrorCode.CORRUPT, `zero run reaches offset ${pos}, past the page end`);
    if (i === n) break;
    const nz = vint(bytes, i, 'changed run');
    i = vNext;
    if (nz === 0) codecFail(CodecErrorCode.CORRUPT, `empty changed run at page offset ${pos}`);
    if (pos + nz > PAGE_SIZE) codecFail(CodecErrorCode.CORRUPT, `changed run reaches offset ${pos + nz}, past the page end`);
    if (nz > n - i) codecFail(CodecErrorCode.CORRUPT, `changed run of ${nz} bytes but only ${n - i} left`);
    i += nz;
    pos += nz;
    first = false;
  }
  if (pos !== PAGE_SIZE) codecFail(CodecErrorCode.CORRUPT, `delta covers ${pos} of ${PAGE_SIZE} bytes`);
}

/** Applies a delta to `page` (the destination's current content); all-or-nothing. */
export function xbzrleDecodePage(bytes: Uint8Array, page: Uint8Array): void {
  if (page.length !== PAGE_SIZE) throw new RangeError(`destination page is ${page.length} bytes`);
  validate(bytes);
  let pos = 0;
  let i = 0;
  const n = bytes.length;
  // Validated above: this pass cannot fail.
  while (i < n) {
    pos += vint(bytes, i, 'zero run');
    i = vNext;
    if (i === n) break;
    const nz = vint(bytes, i, 'changed run');
    i = vNext;
    if (nz <= 16) for (let k = 0; k < nz; k++) page[pos + k] = bytes[i + k];
    else page.set(bytes.subarray(i, i + nz), pos);
    i += nz;
    pos += nz;
  }
}

export interface XbzrleInit {
  /** Wire id (default DEFAULT_CODEC_IDS.xbzrle). */
  id?: number;
  /** Sender page-cache size in bytes (default 64 MiB, QEMU's default); rounded down to whole pages, ≥ 1 page. */
  cacheBytes?: number;
  /** Largest delta worth sending (default PAGE_SIZE - 1: a delta must be smaller than the page). */
  maxDeltaBytes?: number;
}

/** Sender counters. */
export interface XbzrleStats {
  pages: number;
  /** Page found in the cache and sent as a delta. */
  hits: number;
  /** Page not in the cache: sent raw, now cached. */
  misses: number;
  /** Page in the cache but the delta was not smaller: sent raw, cache updated. */
  overflows: number;
  /** Pages dropped from the cache to make room (LRU). */
  evictions: number;
  bytesIn: number;
  bytesOut: number;
  cachedPages: number;
}

/**
 * Bounded LRU page cache: a slab of `slots` pages, a Map from page index to slot and a doubly
 * linked recency list in typed arrays (no per-entry objects).
 */
class PageCache {
  readonly slab: PageSlab;
  private readonly map = new Map<number, number>();
  private readonly owner: Float64Array;
  private readonly prev: Int32Array;
  private readonly next: Int32Array;
  private head = -1;
  private tail = -1;
  private used = 0;
  evictions = 0;

  /** Slots given back by {@link forget}, taken before a new or an evicted one. */
  private readonly free: number[] = [];

  constructor(readonly slots: number) {
    this.slab = new PageSlab(slots);
    this.owner = new Float64Array(slots);
    this.prev = new Int32Array(slots);
    this.next = new Int32Array(slots);
  }

  get size(): number { return this.map.size; }

  private unlink(s: number): void {
    const p = this.prev[s];
    const n = this.next[s];
    if (p >= 0) this.next[p] = n; else this.head = n;
    if (n >= 0) this.prev[n] = p; else this.tail = p;
  }

  private pushFront(s: number): void {
    this.prev[s] = -1;
    this.next[s] = this.head;
    if (this.head >= 0) this.prev[this.head] = s;
    this.head = s;
    if (this.tail < 0) this.tail = s;
  }

  /** Slot of `page` (and marks it most recent), or -1. */
  lookup(page: number): number {
    const s = this.map.get(page);
    if (s === undefined) return -1;
    if (s !== this.head) {
      this.unlink(s);
      this.pushFront(s);
    }
    return s;
  }

  /** Drops `page` from the cache, if there, and gives its slot back. */
  forget(page: number): void {
    const s = this.map.get(page);
    if (s === undefined) return;
    this.unlink(s);
    this.map.delete(page);
    this.free.push(s);
  }

  /** A slot for `page` (free, new or evicted LRU), marked most recent; the caller fills it. */
  insert(page: number): number {
    let s: number;
    const f = this.free.pop();
    if (f !== undefined) s = f;
    else if (this.used < this.slots) s = this.used++;
    else {
      s = this.tail;
      this.unlink(s);
      this.map.delete(this.owner[s]);
      this.evictions++;
    }
    this.owner[s] = page;
    this.map.set(page, s);
    this.pushFront(s);
    return s;
  }
}

const ZERO_WORDS = new Int32Array(WORDS);

/** A set of page indices, one bit each, grown as indices come. */
class PageBits {
  private words = new Uint32Array(64);

  has(page: number): boolean {
    const i = page >>> 5;
    return i < this.words.length && ((this.words[i] >>> (page & 31)) & 1) === 1;
  }

  add(page: number): void {
    const i = page >>> 5;
    if (i >= this.words.length) {
      const grown = new Uint32Array(Math.max(this.words.length * 2, i + 1));
      grown.set(this.words);
      this.words = grown;
    }
    this.words[i] |= 1 << (page & 31);
  }

  delete(page: number): void {
    const i = page >>> 5;
    if (i < this.words.length) this.words[i] &= ~(1 << (page & 31));
  }
}

/** The XBZRLE page codec. The encoder owns the page cache; the decoder is stateless. */
export function xbzrle(init: XbzrleInit = {}): PageCodec {
  const id = init.id ?? DEFAULT_CODEC_IDS.xbzrle;
  const name = 'xbzrle';
  const slots = Math.floor((init.cacheBytes ?? 64 << 20) / PAGE_SIZE);
  if (!(slots >= 1)) throw new RangeError(`xbzrle cacheBytes must hold at least one ${PAGE_SIZE}-byte page`);
  const limit = init.maxDeltaBytes ?? PAGE_SIZE - 1;
  if (!(limit >= 2 && limit < PAGE_SIZE)) throw new RangeError(`xbzrle maxDeltaBytes must be in 2..${PAGE_SIZE - 1}`);
  return {
    name,
    id,
    createEncoder(): PageEncoder & { stats(): XbzrleStats } {
      const cache = new PageCache(slots);
      const zeros = new PageBits();
      const out = new Uint8Array(PAGE_SIZE);
      const aligned = new Uint8Array(PAGE_SIZE);
      const alignedW = new Int32Array(aligned.buffer);
      let pages = 0, hits = 0, misses = 0, overflows = 0, bytesIn = 0, bytesOut = 0;
      const store = (slot: number, page: Uint8Array) => cache.slab.set(slot, page);
      return {
        name,
        encode(pageIndex, page) {
          if (page.length !== PAGE_SIZE) throw new RangeError(`page ${pageIndex} is ${page.length} bytes`);
          pages++;
          bytesIn += PAGE_SIZE;
          const slot = cache.lookup(pageIndex);
          // The destination's copy: cached, or known to be a zero page (see deliveredZero).
          const zeroBase = slot < 0 && zeros.has(pageIndex);
          if (slot < 0 && !zeroBase) {
            misses++;
            store(cache.insert(pageIndex), page);
            return null;
          }
          let newB = page;
          let newW: Int32Array;
          if ((page.byteOffset & 3) === 0) newW = new Int32Array(page.buffer, page.byteOffset, PAGE_SIZE >> 2);
          else {
            aligned.set(page);
            newB = aligned;
            newW = alignedW;
          }
          const oldW = zeroBase ? ZERO_WORDS : cache.slab.words(slot);
          const len = xbzrleEncodePage(oldW, newW, newB, out, limit);
          if (zeroBase) {
            zeros.delete(pageIndex);
            store(cache.insert(pageIndex), newB);
          } else store(slot, newB);
          if (len < 0) {
            overflows++;
            return null;
          }
          hits++;
          bytesOut += len;
          return { codecId: id, bytes: out.slice(0, len) };
        },
        delivered(pageIndex, page) {
          // The destination now holds `page`: the next delta must be against it.
          zeros.delete(pageIndex);
          let slot = cache.lookup(pageIndex);
          if (slot < 0) slot = cache.insert(pageIndex);
          store(slot, page);
        },
        deliveredZero(pageIndex) {
          // A zero page is remembered by a bit, not a copy: the next delta is against zero.
          cache.forget(pageIndex);
          zeros.add(pageIndex);
        },
        stats: () => ({ pages, hits, misses, overflows, evictions: cache.evictions, bytesIn, bytesOut, cachedPages: cache.size }),
      };
    },
    createDecoder(): PageDecoder {
      let pages = 0;
      return {
        name,
        ids: [id],
        decode(pageIndex, codecId, bytes, page) {
          if (codecId !== id) codecFail(CodecErrorCode.UNKNOWN, `xbzrle decoder got codec id ${codecId} for page ${pageIndex}`);
          if (bytes.length > PAGE_SIZE) codecFail(CodecErrorCode.LIMIT, `xbzrle delta for page ${pageIndex} is ${bytes.length} bytes (limit ${PAGE_SIZE})`);
          xbzrleDecodePage(bytes, page);
          pages++;
        },
        delivered() {},
        stats: () => ({ pages }),
      };
    },
  };
}

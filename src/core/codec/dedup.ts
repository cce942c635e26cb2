/**
 * dedup: a page whose content was already sent goes as a reference (Zhang et al.'s hash-based
 * fingerprints within a VM; Shrinker / gang migration across VMs when the index is shared).
 *
 * Identity is collision-safe without a cryptographic hash: a fast 53-bit content hash only finds a
 * *candidate*, and the sender confirms it by comparing the full page against its own copy of the
 * content it defined. The wire never carries the hash — it carries a sender-assigned u32 id — so
 * a hash collision (even a crafted one: guests control their memory) costs a miss, never a wrong
 * page at the destination.
 *
 * Wire forms (`bytes`):
 *   DEF  'D' u32 id  page×4096   — first sight of a content: the destination stores it under id
 *   REF  'R' u32 id              — the content stored under id
 *
 * Both sides keep a ring of slots indexed by `id mod slots` (slots: a power of two, so ids may wrap
 * at 2^32): the sender's {@link DedupIndex} (hash → id, and a copy of each content for the compare)
 * and the destination's {@link DedupStore} (id → content). A new definition overwrites the oldest
 * (FIFO eviction), identically on both sides; the sender only refers to ids still in its ring, so a
 * store at least as large as the index never lacks a referenced id — as long as each DEF is decoded
 * before the REFs to it. A REF that finds its slot empty or holding another id is refused with
 * `ERR_CODEC_STATE` (never a wrong page).
 *
 * Gang migration: give every VM's encoder the same {@link DedupIndex} and every destination decoder
 * the same {@link DedupStore}; a content defined by one VM's stream is then a reference for all the
 * others. The engine must order each DEF before REFs to it across streams (or retry on
 * `ERR_CODEC_STATE`); `store.has(id)` lets a receiver hold a batch back until its definition lands.
 */
import { PAGE_SIZE } from '../pages.js';
import { PageSlab } from './page-slab.js';
import { CodecErrorCode, DEFAULT_CODEC_IDS, codecFail, type PageCodec, type PageDecoder, type PageEncoder } from './codec.js';

const TAG_DEF = 0x44;
const TAG_REF = 0x52;
const DEF_BYTES = 5 + PAGE_SIZE;
const REF_BYTES = 5;

/**
 * Fast 53-bit content hash of a page (four multiply-rotate lanes over Int32 words, folded into two
 * 32-bit halves). Not cryptographic; candidates are confirmed by a full compare.
 */
export function pageHash(page: Uint8Array): number {
  const w = (page.byteOffset & 3) === 0
    ? new Int32Array(page.buffer, page.byteOffset, page.length >> 2)
    : new Int32Array(page.slice().buffer);
  let a = 0x9e3779b1, b = 0x85ebca77, c = 0xc2b2ae3d, d = 0x27d4eb2f;
  const n = w.length & ~3;
  for (let i = 0; i < n; i += 4) {
    a = Math.imul(a ^ w[i], 0x9e3779b1); a = (a << 13) | (a >>> 19);
    b = Math.imul(b ^ w[i + 1], 0x85ebca77); b = (b << 13) | (b >>> 19);
    c = Math.imul(c ^ w[i + 2], 0xc2b2ae3d); c = (c << 13) | (c >>> 19);
    d = Math.imul(d ^ w[i + 3], 0x27d4eb2f); d = (d << 13) | (d >>> 19);
  }
  let h1 = Math.imul(a ^ (c >>> 15), 0x2c1b3c6d) ^ Math.imul(d, 0x297a2d39);
  let h2 = Math.imul(b ^ (d >>> 13), 0x297a2d39) ^ Math.imul(c, 0x2c1b3c6d);
  h1 ^= h1 >>> 16; h2 ^= h2 >>> 15;
  return (h1 >>> 0) * 0x200000 + (h2 >>> 11);
}

function samePage(a: Int32Array, b: Int32Array): boolean {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function slotCount(capacityBytes: number): number {
  const pages = Math.floor(capacityBytes / PAGE_SIZE);
  if (!(pages >= 1)) throw new RangeError(`dedup capacity must hold at least one ${PAGE_SIZE}-byte page`);
  return 2 ** Math.floor(Math.log2(Math.min(pages, 2 ** 30)));
}

export interface DedupIndexInit {
  /** Bytes of page copies the sender keeps (default 64 MiB); rounded down to a power-of-two page count. */
  capacityBytes?: number;
  /** Content hash (default {@link pageHash}); any function works, collisions only cost misses. */
  hash?: (page: Uint8Array) => number;
}

/** Sender-side index: content hash → id, plus a copy of each defined content (for the compare). */
export class DedupIndex {
  readonly slots: number;
  private readonly slab: PageSlab;
  private readonly slotHash: Float64Array;
  private readonly slotId: Float64Array;
  private readonly byHash = new Map<number, number>();
  private readonly hash: (page: Uint8Array) => number;
  private nextId = 0;
  /** Definitions that overwrote an older one. */
  evictions = 0;
  /** Hash matched but content differed. */
  collisions = 0;

  constructor(init: DedupIndexInit = {}) {
    this.slots = slotCount(init.capacityBytes ?? 64 << 20);
    this.slab = new PageSlab(this.slots);
    this.slotHash = new Float64Array(this.slots);
    this.slotId = new Float64Array(this.slots).fill(-1);
    this.hash = init.hash ?? pageHash;
  }

  /** Ids of contents currently referable. */
  get size(): number { return this.byHash.size; }

  /** Bytes of page copies held so far (memory is taken as the ring fills: PageSlab). */
  get allocatedBytes(): number { return this.slab.allocatedBytes; }

  /** Returns the id of `page`'s content if it was defined and is still in the ring, else defines it: `[id, isNew]`. */
  lookupOrDefine(page: Uint8Array): [id: number, isNew: boolean] {
    const h = this.hash(page);
    const pageW = (page.byteOffset & 3) === 0 ? new Int32Array(page.buffer, page.byteOffset, PAGE_SIZE >> 2) : new Int32Array(page.slice().buffer);
    const known = this.byHash.get(h);
    if (known !== undefined) {
      const s = known % this.slots;
      if (this.slotId[s] === known && samePage(this.slab.words(s), pageW)) return [known, false];
      this.collisions++;
    }
    const id = this.nextId;
    this.nextId = (this.nextId + 1) % 2 ** 32;
    const s = id % this.slots;
    const old = this.slotId[s];
    if (old >= 0) {
      this.evictions++;
      if (this.byHash.get(this.slotHash[s]) === old) this.byHash.delete(this.slotHash[s]);
    }
    this.slab.set(s, page);
    this.slotId[s] = id;
    this.slotHash[s] = h;
    this.byHash.set(h, id);
    return [id, true];
  }
}

export interface DedupStoreInit {
  /** Bytes of page content the destination keeps (default 64 MiB); must be ≥ the sender index's. */
  capacityBytes?: number;
}

/** Destination-side store: id → content, in a ring of `slots` pages. Shareable by several decoders. */
export class DedupStore {
  readonly slots: number;
  private readonly slab: PageSlab;
  private readonly slotId: Float64Array;

  constructor(init: DedupStoreInit = {}) {
    this.slots = slotCount(init.capacityBytes ?? 64 << 20);
    this.slab = new PageSlab(this.slots);
    this.slotId = new Float64Array(this.slots).fill(-1);
  }

  has(id: number): boolean {
    return this.slotId[id % this.slots] === id;
  }

  /** Bytes of content held so far (memory is taken as the ring fills: PageSlab). */
  get allocatedBytes(): number { return this.slab.allocatedBytes; }

  put(id: number, content: Uint8Array): void {
    const s = id % this.slots;
    const old = this.slotId[s];
    // Definitions can arrive out of order across parallel streams (or gang members): a late, older
    // definition never overwrites a newer one in its slot (ids wrap at 2^32, hence the modular test).
    if (old >= 0 && old !== id && (id - old + 2 ** 32) % 2 ** 32 >= 2 ** 31) return;
    this.slab.set(s, content);
    this.slotId[s] = id;
  }

  /** Copies the content of `id` into `page`; false when it is not (or no longer) held. */
  copyTo(id: number, page: Uint8Array): boolean {
    const s = id % this.slots;
    if (this.slotId[s] !== id) return false;
    page.set(this.slab.bytes(s));
    return true;
  }
}

export interface DedupInit {
  /** Wire id (default DEFAULT_CODEC_IDS.dedup). */
  id?: number;
  /** Sender index to share (gang migration); default: a new one per encoder. */
  index?: DedupIndex;
  /** Options for an index created per encoder. */
  indexInit?: DedupIndexInit;
  /** Destination store to share; default: a new one per decoder. */
  store?: DedupStore;
  /** Options for a store created per decoder. */
  storeInit?: DedupStoreInit;
}

/**
 * The dedup page codec. Every page the encoder sees is either a REF (content seen before) or a DEF
 * (5 bytes more than raw: the price of making the content referable).
 */
export function dedup(init: DedupInit = {}): PageCodec {
  const id = init.id ?? DEFAULT_CODEC_IDS.dedup;
  const name = 'dedup';
  return {
    name,
    id,
    createEncoder(): PageEncoder {
      const index = init.index ?? new DedupIndex(init.indexInit);
      let pages = 0, refs = 0, defs = 0, bytesOut = 0;
      return {
        name,
        encode(pageIndex, page) {
          if (page.length !== PAGE_SIZE) throw new RangeError(`page ${pageIndex} is ${page.length} bytes`);
          pages++;
          const [ref, isNew] = index.lookupOrDefine(page);
          const out = new Uint8Array(isNew ? DEF_BYTES : REF_BYTES);
          out[0] = isNew ? TAG_DEF : TAG_REF;
          new DataView(out.buffer).setUint32(1, ref, true);
          if (isNew) {
            out.set(page, 5);
            defs++;
          } else refs++;
          bytesOut += out.length;
          return { codecId: id, bytes: out };
        },
        delivered() {},
        stats: () => ({ pages, refs, defs, bytesOut, evictions: index.evictions, collisions: index.collisions, indexed: index.size }),
      };
    },
    createDecoder(): PageDecoder {
      const store = init.store ?? new DedupStore(init.storeInit);
      let refs = 0, defs = 0, missing = 0;
      return {
        name,
        ids: [id],
        decode(pageIndex, codecId, bytes, page) {
          if (codecId !== id) codecFail(CodecErrorCode.UNKNOWN, `dedup decoder got codec id ${codecId} for page ${pageIndex}`);
          if (page.length !== PAGE_SIZE) throw new RangeError(`destination page is ${page.length} bytes`);
          if (bytes.length > DEF_BYTES) codecFail(CodecErrorCode.LIMIT, `dedup entry for page ${pageIndex} is ${bytes.length} bytes (limit ${DEF_BYTES})`);
          if (bytes.length < REF_BYTES) codecFail(CodecErrorCode.CORRUPT, `dedup entry for page ${pageIndex} is ${bytes.length} bytes`);
          const ref = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(1, true);
          if (bytes[0] === TAG_REF) {
            if (bytes.length !== REF_BYTES) codecFail(CodecErrorCode.CORRUPT, `dedup reference for page ${pageIndex} is ${bytes.length} bytes, not ${REF_BYTES}`);
            if (!store.copyTo(ref, page)) {
              missing++;
              codecFail(CodecErrorCode.STATE, `dedup reference ${ref} (page ${pageIndex}) is not in the store: not received yet, or evicted`);
            }
            refs++;
          } else if (bytes[0] === TAG_DEF) {
            if (bytes.length !== DEF_BYTES) codecFail(CodecErrorCode.CORRUPT, `dedup definition for page ${pageIndex} is ${bytes.length} bytes, not ${DEF_BYTES}`);
            const content = bytes.subarray(5);
            store.put(ref, content);
            page.set(content);
            defs++;
          } else codecFail(CodecErrorCode.CORRUPT, `dedup entry for page ${pageIndex} has tag ${bytes[0]}`);
        },
        delivered() {},
        stats: () => ({ refs, defs, missing }),
      };
    },
  };
}

/**
 * Page codecs: the contract every migration page encoder/decoder keeps.
 *
 * ferry reduces what a migration sends in three layers; each layer is a small interface here and
 * a folder of interchangeable factories beside it (hono style), all run through one conformance
 * suite (`test/helpers/codec-suite.ts`).
 *
 * 1. **Page codecs** ({@link PageCodec}) turn one 4 KiB page into fewer bytes, page by page:
 *    `zero()` (a zero page is a flag), `dedup()` (a page whose content was already sent is a
 *    reference), `xbzrle()` (a re-dirtied page is an XOR/zero-run delta against what was sent
 *    last), and `chain([...])`, which tries several in order. A page codec may be stateful, and
 *    then the state on the two sides must stay in step — see "State" below.
 * 2. **Batch containers** ({@link EncodedBatch}, {@link packBatch}/{@link unpackBatch}): the output
 *    of a page codec for up to {@link MAX_BATCH_PAGES} pages, back to back in one buffer, so that a
 *    whole ~1 MiB batch can be handed to a byte compressor at once (FINDINGS: compress in batches,
 *    never page by page).
 * 3. **Blob codecs** ({@link BlobCodec}) compress a whole packed batch: lz4 and zstd on the node
 *    edge (`src/node/codec`), because they are native bindings. `adaptive()` (adaptive.ts) decides
 *    per page which pages are worth compressing (MECOM: zero / low entropy / high entropy) and,
 *    through a {@link CompressionController}-style measured controller, whether compressing pays
 *    at all for the stream.
 *
 * ## Ids
 * Every page codec and blob codec has a one-byte `id` (the PAGES `encoding` byte on the wire).
 * `RAW_CODEC_ID` (0) and `ZERO_CODEC_ID` (1) are the protocol's always-understood encodings; the
 * others default to {@link DEFAULT_CODEC_IDS} and can be changed through each factory's `id` init
 * field to whatever the HELLO / HELLO_ACK handshake agreed (`>= FIRST_CODEC_ID`).
 *
 * ## Encoding
 * `encoder.encode(pageIndex, page)` returns `{ codecId, bytes }`, or `null` for "not worth it: send
 * the page raw". `bytes` is a fresh array the caller owns (never a view of `page`), at most
 * {@link MAX_ENCODED_PAGE_BYTES} long. An encoder never keeps a reference to `page` past the call;
 * it copies what it needs (the caller may reuse the buffer — it usually is live guest memory).
 *
 * ## Decoding
 * `decoder.decode(pageIndex, codecId, bytes, page)` writes the decoded page into `page`
 * (`PAGE_SIZE` bytes). On entry `page` holds the destination's *current* content of that page —
 * delta codecs (XBZRLE) apply their delta to it; other codecs ignore it. Decoding is
 * all-or-nothing: if it throws, `page` is unchanged. A decoder bounds everything it reads: it never
 * writes outside `page`, never allocates from a length it read without checking it first, and
 * refuses bad input with a {@link CodecError}:
 * - `ERR_CODEC_CORRUPT` — malformed input (truncated, trailing bytes, runs past the page end, …);
 * - `ERR_CODEC_LIMIT` — a declared size beyond a configured limit (page, batch, blob caps);
 * - `ERR_CODEC_UNKNOWN` — a codec id this decoder does not understand;
 * - `ERR_CODEC_STATE` — well-formed input that needs state this side lacks (a dedup reference to
 *   content not received yet or already evicted). Unlike the others this can be a matter of
 *   ordering (a reference overtook its definition on another stream); the caller may retry later.
 * Formats carry no checksum of their own: integrity is the transport's job (TLS / protocol digest).
 * A flipped bit is therefore either refused (most are) or decoded into a page-sized wrong page;
 * it is never a crash, an out-of-bounds write or an unbounded allocation.
 *
 * ## State
 * Some techniques keep state on both sides and the two must describe the same destination memory:
 * - the rule for encoders: **after `encode(i, page)` returns — whatever it returns — the encoder
 *   assumes the destination will hold `page` at index `i`** (through its own result, or raw when it
 *   returned null). If the caller delivers page `i` another way (another codec, or it drops the
 *   encoder's result and sends something else), it calls `encoder.delivered(i, page)` with the
 *   content the destination will hold. XBZRLE's page cache and dedup's sender index live here.
 * - decoders get `decoder.delivered(i, page)` for pages that arrived another way (raw, another
 *   codec), symmetrically; stateless decoders ignore it. Dedup's content store lives on the
 *   destination and may be shared by several decoders (gang migration, see dedup.ts).
 * - Deliveries must reach the decoder in the order the encoder produced them *for the same page*
 *   (XBZRLE deltas are against the previous version) and dedup definitions before their
 *   references. The engine keeps one page's versions on one ordered stream.
 *
 * ## Batches
 * {@link encodeBatch} / {@link decodeBatch} run any page encoder/decoder over a batch of pages
 * (default {@link DEFAULT_BATCH_BYTES} of input) into one {@link EncodedBatch}: a single output
 * buffer with per-page codec ids and offsets (raw pages included verbatim). {@link packBatch}
 * serialises it (the unit a {@link BlobCodec} compresses) and {@link unpackBatch} parses it back,
 * bounding every count and length.
 */
import { FerryError } from '../errors.js';
import { PAGE_SIZE } from '../pages.js';

/** Stable codes of {@link CodecError}. */
export const CodecErrorCode = {
  CORRUPT: 'ERR_CODEC_CORRUPT',
  LIMIT: 'ERR_CODEC_LIMIT',
  UNKNOWN: 'ERR_CODEC_UNKNOWN',
  STATE: 'ERR_CODEC_STATE',
} as const;
export type CodecErrorCodeValue = (typeof CodecErrorCode)[keyof typeof CodecErrorCode];

/** A codec refused its input (see the module comment for what each code means). */
export class CodecError extends FerryError {
  declare readonly code: CodecErrorCodeValue;
  constructor(code: CodecErrorCodeValue, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/** Throws a {@link CodecError}; typed `never` so decoders read as straight-line checks. */
export function codecFail(code: CodecErrorCodeValue, message: string, cause?: unknown): never {
  throw new CodecError(code, message, cause === undefined ? undefined : { cause });
}

/** The protocol's always-understood encodings (same values as `Encoding` in protocol/frames.ts). */
export const RAW_CODEC_ID = 0;
export const ZERO_CODEC_ID = 1;
/** Default ids of the negotiated codecs; override with each factory's `id` init field. */
export const DEFAULT_CODEC_IDS = { xbzrle: 2, dedup: 3, lz4: 4, zstd: 5 } as const;

/** Largest `bytes` any page encoder returns: a page plus room for a small header (dedup's definition). */
export const MAX_ENCODED_PAGE_BYTES = PAGE_SIZE + 16;
/** Default input size of a batch (FINDINGS: ~1 MiB batches). */
export const DEFAULT_BATCH_BYTES = 1 << 20;
/** Most pages in one batch (= the protocol's default maxPagesPerBatch). */
export const MAX_BATCH_PAGES = 4096;

/** One encoded page. */
export interface EncodedPage {
  /** The encoding byte for the wire (RAW_CODEC_ID is never returned: that is `null`). */
  codecId: number;
  bytes: Uint8Array;
}

/** Monotonic counters a codec exposes (hits, misses, bytes in/out, …); names are per codec. */
export type CodecStats = Readonly<Record<string, number>>;

/** The sender half. Not thread-safe; one per stream of pages (or shared deliberately, see dedup). */
export interface PageEncoder {
  /** Codec name (`[a-z0-9.-]{1,32}`, the HELLO offer name). */
  readonly name: string;
  /**
   * Encodes `page` (exactly PAGE_SIZE bytes) or returns null when the raw page is as small. See
   * "Encoding" and "State" above: the encoder assumes the destination ends up holding `page`.
   */
  encode(pageIndex: number, page: Uint8Array): EncodedPage | null;
  /** Page `pageIndex` reached the destination another way with content `page`. */
  delivered(pageIndex: number, page: Uint8Array): void;
  /**
   * {@link delivered} with an all-zero page, for encoders that can do better than keep a copy of
   * it (a VM's memory is mostly zero pages: an XBZRLE cache that copied each filled with zeros).
   * Absent: callers use delivered() with a zero page.
   */
  deliveredZero?(pageIndex: number): void;
  stats(): CodecStats;
}

/** The destination half. */
export interface PageDecoder {
  readonly name: string;
  /** Codec ids this decoder understands. */
  readonly ids: readonly number[];
  /**
   * Decodes `bytes` (encoded with `codecId`) into `page`, which holds the destination's current
   * content of `pageIndex` on entry. All-or-nothing; throws {@link CodecError}.
   */
  decode(pageIndex: number, codecId: number, bytes: Uint8Array, page: Uint8Array): void;
  /** Page `pageIndex` now holds `page` after arriving another way (raw, another codec). */
  delivered(pageIndex: number, page: Uint8Array): void;
  stats(): CodecStats;
}

/** A page codec: a factory of matched encoder/decoder halves (each side builds its own half). */
export interface PageCodec {
  readonly name: string;
  /** The codec's own id on the wire (a composite reports the ids of its parts through its decoder). */
  readonly id: number;
  createEncoder(): PageEncoder;
  createDecoder(): PageDecoder;
}

/**
 * A byte compressor for whole packed batches. `compress` returns null when the output would not be
 * smaller than the input. `decompress` refuses output larger than `maxRawBytes` *before* allocating
 * it (the blob carries its raw length up front), and anything that does not decompress to exactly
 * the declared length.
 */
export interface BlobCodec {
  readonly name: string;
  readonly id: number;
  /** Largest raw input accepted / output produced (default DEFAULT_BATCH_BYTES + slack, per codec). */
  readonly maxRawBytes: number;
  compress(raw: Uint8Array): Uint8Array | null;
  decompress(blob: Uint8Array): Uint8Array;
}

/** Sender-side knobs common to the batch helpers. */
export interface BatchInit {
  /** Refuse batches with more pages than this (default MAX_BATCH_PAGES). */
  maxPages?: number;
  /**
   * Where {@link encodeBatch} writes the entries (at least count × MAX_ENCODED_PAGE_BYTES bytes),
   * reused batch after batch; the batch's `bytes` is then a view into it, valid until the next
   * batch is encoded into it. Default: a new buffer per batch.
   */
  out?: Uint8Array;
}

/** A page encoder's output for a batch: one buffer, per-page ids and offsets. */
export interface EncodedBatch {
  readonly count: number;
  /** Page index of each entry. */
  readonly indices: Uint32Array;
  /** Codec id of each entry; RAW_CODEC_ID for a page sent plain (its PAGE_SIZE bytes are in `bytes`). */
  readonly codecIds: Uint8Array;
  /** `count + 1` offsets into `bytes`; entry k is `bytes[offsets[k] .. offsets[k+1])`. */
  readonly offsets: Uint32Array;
  readonly bytes: Uint8Array;
}

function checkPage(page: Uint8Array, what: string): void {
  if (page.length !== PAGE_SIZE) throw new RangeError(`${what} is ${page.length} bytes, not ${PAGE_SIZE}`);
}

/**
 * Encodes `indices.length` pages laid back to back in `pages` with `encoder`. Pages the encoder
 * declines go raw (and the encoder has already accounted for that, per the State rule).
 */
export function encodeBatch(encoder: PageEncoder, indices: ArrayLike<number>, pages: Uint8Array, init: BatchInit = {}): EncodedBatch {
  const count = indices.length;
  const maxPages = init.maxPages ?? MAX_BATCH_PAGES;
  if (count > maxPages) throw new RangeError(`batch of ${count} pages (limit ${maxPages})`);
  if (pages.length !== count * PAGE_SIZE) throw new RangeError(`batch of ${count} pages needs ${count * PAGE_SIZE} bytes, got ${pages.length}`);
  const need = count * MAX_ENCODED_PAGE_BYTES;
  if (init.out && init.out.length < need) throw new RangeError(`batch of ${count} pages needs ${need} bytes to encode into, got ${init.out.length}`);
  const out = init.out ?? new Uint8Array(need);
  const codecIds = new Uint8Array(count);
  const offsets = new Uint32Array(count + 1);
  const idx = new Uint32Array(count);
  let at = 0;
  for (let k = 0; k < count; k++) {
    idx[k] = indices[k];
    const page = pages.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE);
    const enc = encoder.encode(indices[k], page);
    if (enc === null) {
      out.set(page, at);
      at += PAGE_SIZE;
      codecIds[k] = RAW_CODEC_ID;
    } else {
      out.set(enc.bytes, at);
      at += enc.bytes.length;
      codecIds[k] = enc.codecId;
    }
    offsets[k + 1] = at;
  }
  return { count, indices: idx, codecIds, offsets, bytes: out.subarray(0, at) };
}

/**
 * Decodes a batch into `pages` (`count × PAGE_SIZE`, the destination's current content of each
 * entry, in batch order). Raw entries are copied and reported to `decoder.delivered`. Stops at the
 * first error (entries before it are applied; the failing one is not).
 */
export function decodeBatch(decoder: PageDecoder, batch: EncodedBatch, pages: Uint8Array): void {
  if (pages.length !== batch.count * PAGE_SIZE) throw new RangeError(`batch of ${batch.count} pages needs ${batch.count * PAGE_SIZE} bytes, got ${pages.length}`);
  for (let k = 0; k < batch.count; k++) {
    const page = pages.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE);
    const start = batch.offsets[k];
    const end = batch.offsets[k + 1];
    if (end < start || end > batch.bytes.length) codecFail(CodecErrorCode.CORRUPT, `batch entry ${k} spans ${start}..${end} of ${batch.bytes.length} bytes`);
    const bytes = batch.bytes.subarray(start, end);
    decodeOne(decoder, batch.indices[k], batch.codecIds[k], bytes, page);
  }
}

/** Decodes one entry, handling RAW itself. */
export function decodeOne(decoder: PageDecoder, pageIndex: number, codecId: number, bytes: Uint8Array, page: Uint8Array): void {
  checkPage(page, `destination page ${pageIndex}`);
  if (codecId === RAW_CODEC_ID) {
    if (bytes.length !== PAGE_SIZE) codecFail(CodecErrorCode.CORRUPT, `raw page ${pageIndex} is ${bytes.length} bytes, not ${PAGE_SIZE}`);
    page.set(bytes);
    decoder.delivered(pageIndex, page);
    return;
  }
  decoder.decode(pageIndex, codecId, bytes, page);
}

/*
 * Packed batch layout (little-endian):
 *   u8  version (1)
 *   u32 count                      1 … maxPages
 *   count × { u32 index, u8 codecId, u32 length }
 *   payload bytes (sum of lengths)
 */
const PACK_VERSION = 1;
const PACK_HEADER = 5;
const PACK_ENTRY = 9;

/**
 * Serialises a batch into one buffer (the unit a {@link BlobCodec} compresses): all its entries,
 * or those at positions `keep`, in that order.
 */
export function packBatch(batch: EncodedBatch, keep?: readonly number[]): Uint8Array {
  const count = keep ? keep.length : batch.count;
  const entry = keep ? (j: number) => keep[j] : (j: number) => j;
  let payload = 0;
  if (keep) for (const k of keep) payload += batch.offsets[k + 1] - batch.offsets[k];
  else payload = batch.offsets[batch.count] - batch.offsets[0];
  const out = new Uint8Array(PACK_HEADER + count * PACK_ENTRY + payload);
  const v = new DataView(out.buffer);
  v.setUint8(0, PACK_VERSION);
  v.setUint32(1, count, true);
  let at = PACK_HEADER;
  let data = PACK_HEADER + count * PACK_ENTRY;
  for (let j = 0; j < count; j++) {
    const k = entry(j);
    const [from, to] = [batch.offsets[k], batch.offsets[k + 1]];
    v.setUint32(at, batch.indices[k], true);
    v.setUint8(at + 4, batch.codecIds[k]);
    v.setUint32(at + 5, to - from, true);
    at += PACK_ENTRY;
    out.set(batch.bytes.subarray(from, to), data);
    data += to - from;
  }
  return out;
}

export interface UnpackLimits {
  /** Most pages accepted (default MAX_BATCH_PAGES). */
  maxPages?: number;
}

/** Parses {@link packBatch} output, bounding every count and length; throws {@link CodecError}. */
export function unpackBatch(buf: Uint8Array, limits: UnpackLimits = {}): EncodedBatch {
  const maxPages = limits.maxPages ?? MAX_BATCH_PAGES;
  if (buf.length < PACK_HEADER) codecFail(CodecErrorCode.CORRUPT, `packed batch is ${buf.length} bytes, shorter than its header`);
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const version = v.getUint8(0);
  if (version !== PACK_VERSION) codecFail(CodecErrorCode.CORRUPT, `packed batch version ${version} (expected ${PACK_VERSION})`);
  const count = v.getUint32(1, true);
  if (count > maxPages) codecFail(CodecErrorCode.LIMIT, `packed batch of ${count} pages (limit ${maxPages})`);
  const dataStart = PACK_HEADER + count * PACK_ENTRY;
  if (dataStart > buf.length) codecFail(CodecErrorCode.CORRUPT, `packed batch of ${count} pages cannot fit in ${buf.length} bytes`);
  const indices = new Uint32Array(count);
  const codecIds = new Uint8Array(count);
  const offsets = new Uint32Array(count + 1);
  let total = 0;
  for (let k = 0, at = PACK_HEADER; k < count; k++, at += PACK_ENTRY) {
    indices[k] = v.getUint32(at, true);
    codecIds[k] = v.getUint8(at + 4);
    const len = v.getUint32(at + 5, true);
    if (len > MAX_ENCODED_PAGE_BYTES) codecFail(CodecErrorCode.LIMIT, `packed entry ${k} is ${len} bytes (limit ${MAX_ENCODED_PAGE_BYTES})`);
    total += len;
    offsets[k + 1] = total;
  }
  if (dataStart + total !== buf.length) codecFail(CodecErrorCode.CORRUPT, `packed batch declares ${total} payload bytes but carries ${buf.length - dataStart}`);
  return { count, indices, codecIds, offsets, bytes: buf.subarray(dataStart) };
}

/** Bounds-checked LEB128 (unsigned, ≤ 4 bytes, ≤ 2^28 - 1) read used by the page formats. */
export function readVarint(buf: Uint8Array, pos: number, what: string): [value: number, next: number] {
  let value = 0;
  for (let shift = 0, i = pos; shift < 28; shift += 7, i++) {
    if (i >= buf.length) codecFail(CodecErrorCode.CORRUPT, `input ends inside ${what}`);
    const b = buf[i];
    value |= (b & 0x7f) << shift;
    if ((b & 0x80) === 0) {
      if (b === 0 && shift > 0) codecFail(CodecErrorCode.CORRUPT, `${what} is not minimally encoded`);
      return [value, i + 1];
    }
  }
  return codecFail(CodecErrorCode.CORRUPT, `${what} is longer than 4 bytes`);
}

/** Writes `value` (0 … 2^28 - 1) as LEB128 at `pos`; returns the next position. */
export function writeVarint(buf: Uint8Array, pos: number, value: number): number {
  while (value >= 0x80) {
    buf[pos++] = (value & 0x7f) | 0x80;
    value >>>= 7;
  }
  buf[pos++] = value;
  return pos;
}

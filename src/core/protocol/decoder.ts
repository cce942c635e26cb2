/**
 * FrameDecoder: a socket-free state machine that turns arbitrary chunks of a byte stream into
 * frames (nats.js style: feed it one byte at a time or 64 MiB at once, the frames are the same).
 *
 * Every length it reads is bounded before it is trusted: the header's payload length against
 * `maxPayloadBytes` and against what that frame type can possibly need, then every count and
 * length inside the payload against the configured limits. It keeps at most one incomplete frame
 * (`bufferedBytes` ≤ `maxBufferedBytes` = 8 + maxPayloadBytes). Anything it does not understand
 * is a `ProtocolError` with a `ProtocolErrorCode`; after one, the decoder is poisoned and every
 * further call throws that same error.
 */
import { BugIndicatingError, ProtocolError } from '../errors.js';
import { PAGE_SIZE } from '../pages.js';
import { CODEC_NAME_RE, ERROR_CODE_RE, isValidPageSize } from './encode.js';
import {
  DEFAULT_LIMITS, DIGEST_ALGORITHMS, Encoding, FAULT_WAITS_BYTES, FIRST_CODEC_ID, FLAG_PAGES_DEMAND, FRAME_TYPE_NAMES,
  GLOBAL_TYPE_IDS, HEADER_BYTES, HELLO_MAGIC, MAX_CODEC_NAME_BYTES, MAX_CODECS, MAX_CONFIG_BYTES,
  MAX_ERROR_CODE_BYTES, MAX_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_STREAMS, MIGRATION_MODES, MODE_BITS,
  PAGE_HEAD_BYTES, PROTOCOL_VERSION, PageTable, ProtocolErrorCode, SESSION_TOKEN_BYTES, STREAM_ROLES, pagePadding, pagesFrameOf, runHeadBytes,
  type CodecOffer, type StreamRole, type Digest, type DigestAlgorithm, type FaultWaits, type Frame, type FrameType, type MigrationMode, type WireBitmap,
  type WireGlobal,
} from './frames.js';

export interface FrameDecoderInit {
  /** Largest payload accepted (default 16 MiB + 64 KiB). */
  maxPayloadBytes?: number;
  /** Most pages in one PAGES batch (default 4096). */
  maxPagesPerBatch?: number;
  /** Most page indices in one PAGE_REQUEST (default 4096). */
  maxPagesPerRequest?: number;
  /** Largest device-state JSON document in STATE (default 8 MiB). */
  maxJsonBytes?: number;
  /** Largest guest module (HELLO moduleBytes, MODULE totalBytes; default 256 MiB). */
  maxModuleBytes?: number;
  /** Deepest nesting of arrays/objects in the device-state JSON (default 64). */
  maxJsonDepth?: number;
  /** Most globals in STATE (default 65536). */
  maxGlobals?: number;
  /** Largest soft-page bitmap in STATE, in bits (default 2^20). */
  maxBitmapBits?: number;
  /** Largest guest memory a HELLO may announce (default 2^48). */
  maxMemoryBytes?: number;
  /** Size of a RAW page (default PAGE_SIZE = 4096). */
  pageSize?: number;
  /** Largest encoded page of a negotiated codec (default 2 × pageSize). */
  maxEncodedPageBytes?: number;
  /** Codec encoding ids accepted in PAGES besides RAW and ZERO (default none; see allowEncodings). */
  encodings?: Iterable<number>;
}

/**
 * Where the page data of one RUN extent (pages `first` … `first + count − 1`) should go: a view of
 * exactly `count × pageSize` bytes (e.g. guest memory), or null to have the decoder keep them in
 * the frame. Asked when the extent's first byte is due, so the answer may depend on everything
 * decoded before: the sink is asked only when every frame carrying pages (PAGES, BATCH, RUN)
 * before the RUN has been returned by push(). May throw a ProtocolError (e.g. a page the receiver does not have).
 */
export type RunSink = (first: number, count: number) => Uint8Array | null;

export type FrameDecoderLimits = Readonly<Required<Omit<FrameDecoderInit, 'encodings'>>>;

/** The first buffer of a payload that arrives in pieces (a header alone allocates no more). */
const FIRST_PAYLOAD_BYTES = 64 * 1024;
/** Recycled payload buffers a decoder keeps at most. */
const SPARE_PAYLOADS = 4;
/**
 * readTarget offers a RUN extent's place only for this much of it or more, or for its last
 * extent: a read ends where its target does, so scattered pages read in place took a read each (a
 * system call and a turn of the event loop). The rest come with the extents after them, in the
 * connection's own buffer, and are copied. The last extent's read still ends with the RUN, so the
 * next RUN starts in a read of its own and its run sink is asked (enterExtent).
 */
const DIRECT_READ_MIN_BYTES = 32 * 1024;

function fail(code: string, message: string, cause?: unknown): never {
  throw new ProtocolError(code, message, cause === undefined ? undefined : { cause });
}

function positiveInt(value: number | undefined, fallback: number, what: string, max = Number.MAX_SAFE_INTEGER): number {
  const v = value ?? fallback;
  if (!Number.isSafeInteger(v) || v < 1 || v > max) throw new RangeError(`${what} must be an integer in 1..${max}, got ${v}`);
  return v;
}

const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'));

function toHex(b: Uint8Array): string {
  let s = '';
  for (let i = 0; i < b.length; i++) s += HEX[b[i]];
  return s;
}

/** Maximum nesting depth of `[`/`{` outside strings (an over-estimate only for malformed JSON). */
function jsonDepth(b: Uint8Array): number {
  let depth = 0;
  let max = 0;
  let inString = false;
  for (let i = 0; i < b.length; i++) {
    const c = b[i];
    if (inString) {
      if (c === 0x5c) i++;
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x5b || c === 0x7b) { if (++depth > max) max = depth; }
    else if (c === 0x5d || c === 0x7d) depth--;
  }
  return max;
}

/** Bounds-checked little-endian reads over one payload. */
class Reader {
  private pos = 0;
  private readonly view: DataView;
  constructor(private readonly buf: Uint8Array, private readonly type: FrameType) {
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  private take(n: number, what: string): number {
    if (n > this.buf.length - this.pos) fail(ProtocolErrorCode.TRUNCATED, `${this.type} payload ends inside ${what} (needs ${n} bytes at offset ${this.pos} of ${this.buf.length})`);
    const at = this.pos;
    this.pos += n;
    return at;
  }
  get remaining(): number { return this.buf.length - this.pos; }
  u8(what: string): number { return this.view.getUint8(this.take(1, what)); }
  u16(what: string): number { return this.view.getUint16(this.take(2, what), true); }
  u32(what: string): number { return this.view.getUint32(this.take(4, what), true); }
  i32(what: string): number { return this.view.getInt32(this.take(4, what), true); }
  i64(what: string): bigint { return this.view.getBigInt64(this.take(8, what), true); }
  u64big(what: string): bigint { return this.view.getBigUint64(this.take(8, what), true); }
  /** u64 that must fit a safe integer and be ≤ max. */
  u64(what: string, max: number): number {
    const v = this.u64big(what);
    if (v > BigInt(max)) fail(ProtocolErrorCode.LIMIT, `${this.type} ${what} is ${v} (limit ${max})`);
    return Number(v);
  }
  f64(what: string): number { return this.view.getFloat64(this.take(8, what), true); }
  bytes(n: number, what: string): Uint8Array { const at = this.take(n, what); return this.buf.subarray(at, at + n); }
  /** Skips `n` bytes and returns where they start in `payload`. */
  skip(n: number, what: string): number { return this.take(n, what); }
  /** The bytes read. */
  get payload(): Uint8Array { return this.buf; }
  /** Skips `n` bytes; false if any is not zero (no view made: padding is read once per page). */
  zeros(n: number, what: string): boolean {
    const at = this.take(n, what);
    for (let k = at; k < at + n; k++) if (this.buf[k] !== 0) return false;
    return true;
  }
  utf8(n: number, what: string): string {
    const b = this.bytes(n, what);
    try {
      return utf8.decode(b);
    } catch (e) {
      return fail(ProtocolErrorCode.MALFORMED, `${this.type} ${what} is not valid UTF-8`, e);
    }
  }
  str16(max: number, what: string): string {
    const n = this.u16(`${what} length`);
    if (n > max) fail(ProtocolErrorCode.LIMIT, `${this.type} ${what} is ${n} bytes (limit ${max})`);
    return this.utf8(n, what);
  }
  done(): void {
    if (this.pos !== this.buf.length) fail(ProtocolErrorCode.MALFORMED, `${this.type} payload has ${this.buf.length - this.pos} unexpected trailing bytes`);
  }
}

const EXACT_SIZE: Partial<Record<FrameType, number>> = {
  ROUND_END: 12, RESUMED: 4, ACK: 5, PUSH_DONE: 4, PING: 12, PONG: 12, JOIN: SESSION_TOKEN_BYTES + 3,
};
const CODECS_MAX = 1 + MAX_CODECS * (2 + MAX_CODEC_NAME_BYTES);
const DIGEST_MAX = 2 + 64;

enum State { Header, Payload, RunHead, RunBody }

/** A RUN extent being received. */
interface RxExtent {
  first: number;
  count: number;
  /** Pages of the frame before this extent (its place in the frame's own buffer). */
  before: number;
  /** Where its bytes go (set when the extent is entered). */
  dest: Uint8Array | null;
  direct: boolean;
  have: number;
}

/** True when one of `frames` carries page data (the run sink is not asked behind those). */
function carriesPages(frames: Frame[]): boolean {
  for (const f of frames) if (f.type === 'PAGES' || f.type === 'BATCH' || f.type === 'RUN') return true;
  return false;
}

/** Copies `src` to `dest[at…]`, unless it is there already (it was read into the target {@link FrameDecoder.readTarget} gave). */
function place(dest: Uint8Array, at: number, src: Uint8Array): void {
  if (src.buffer !== dest.buffer || src.byteOffset !== dest.byteOffset + at) dest.set(src, at);
}

export class FrameDecoder {
  readonly limits: FrameDecoderLimits;
  private readonly encodings = new Set<number>();
  private readonly typeMax: Record<FrameType, number>;
  private state = State.Header;
  private readonly header = new Uint8Array(HEADER_BYTES);
  private headerHave = 0;
  private type: FrameType = 'PING';
  private flags = 0;
  private length = 0;
  private payload: Uint8Array | null = null;
  /** Payload buffers of big PAGES frames handed out, by frame, until recycle() gives them back. */
  private readonly assembled = new WeakMap<Frame, Uint8Array>();
  /** Payload buffers given back, for the next big PAGES frames. */
  private readonly spare: Uint8Array[] = [];
  private payloadHave = 0;
  private poisoned: Error | undefined;
  private runSink: RunSink | null = null;
  /** The RUN being received: its head, then its extents and the buffer for those it keeps. */
  private runHead = new Uint8Array(8);
  private runHeadNeed = 8;
  private runSeq = 0;
  private runPages = 0;
  private runExtents: RxExtent[] = [];
  private runK = 0;
  private runData: Uint8Array | null = null;

  constructor(init: FrameDecoderInit = {}) {
    const pageSize = init.pageSize ?? PAGE_SIZE;
    if (!isValidPageSize(pageSize)) throw new RangeError(`pageSize ${pageSize} is not a power of two in 512..65536`);
    const maxPayloadBytes = positiveInt(init.maxPayloadBytes, DEFAULT_LIMITS.maxPayloadBytes, 'maxPayloadBytes', 0xffffffff);
    this.limits = Object.freeze({
      maxPayloadBytes,
      maxPagesPerBatch: positiveInt(init.maxPagesPerBatch, DEFAULT_LIMITS.maxPagesPerBatch, 'maxPagesPerBatch', 0xffffffff),
      maxPagesPerRequest: positiveInt(init.maxPagesPerRequest, DEFAULT_LIMITS.maxPagesPerRequest, 'maxPagesPerRequest', 0xffffffff),
      maxJsonBytes: positiveInt(init.maxJsonBytes, DEFAULT_LIMITS.maxJsonBytes, 'maxJsonBytes', 0xffffffff),
      maxModuleBytes: positiveInt(init.maxModuleBytes, DEFAULT_LIMITS.maxModuleBytes, 'maxModuleBytes', 0xffffffff),
      maxJsonDepth: positiveInt(init.maxJsonDepth, DEFAULT_LIMITS.maxJsonDepth, 'maxJsonDepth', 100_000),
      maxGlobals: positiveInt(init.maxGlobals, DEFAULT_LIMITS.maxGlobals, 'maxGlobals', 0xffffffff),
      maxBitmapBits: positiveInt(init.maxBitmapBits, DEFAULT_LIMITS.maxBitmapBits, 'maxBitmapBits', 0xffffffff),
      maxMemoryBytes: positiveInt(init.maxMemoryBytes, DEFAULT_LIMITS.maxMemoryBytes, 'maxMemoryBytes'),
      pageSize,
      maxEncodedPageBytes: positiveInt(init.maxEncodedPageBytes, 2 * pageSize, 'maxEncodedPageBytes', 0xffffffff),
    });
    if (init.encodings) this.allowEncodings(init.encodings);
    const l = this.limits;
    // The most payload each type can need under these limits: a header claiming more is refused
    // before a single payload byte is buffered.
    this.typeMax = {
      HELLO: 4 + 4 + 2 + MAX_NAME_BYTES + 16 + 4 + 32 + 4 + 4 + MAX_CONFIG_BYTES + 1 + 2 + CODECS_MAX + 2 + MAX_NAME_BYTES,
      HELLO_ACK: 1 + Math.max(2 + 1 + 2 + CODECS_MAX + 1 + SESSION_TOKEN_BYTES + 2, 2 + MAX_ERROR_CODE_BYTES + 2 + MAX_MESSAGE_BYTES),
      MODULE: 8 + l.maxModuleBytes,
      PAGES: 8 + l.maxPagesPerBatch * (PAGE_HEAD_BYTES + Math.max(l.pageSize, l.maxEncodedPageBytes) + 7),
      ROUND_END: 12,
      STATE: 8 + 4 + l.maxGlobals * 9 + 4 + l.maxJsonBytes + 4 + Math.ceil(l.maxBitmapBits / 32) * 4,
      SWITCHOVER: 4 + DIGEST_MAX + 4 + Math.ceil(l.maxBitmapBits / 32) * 4,
      RESUMED: 4,
      ACK: 5,
      PAGE_REQUEST: 8 + 4 * l.maxPagesPerRequest,
      PUSH_DONE: 4,
      COMPLETE: DIGEST_MAX + 1 + FAULT_WAITS_BYTES,
      ERROR: 2 + MAX_ERROR_CODE_BYTES + 2 + MAX_MESSAGE_BYTES,
      CANCEL: 2 + MAX_MESSAGE_BYTES,
      PING: 12,
      PONG: 12,
      JOIN: SESSION_TOKEN_BYTES + 3,
      // A compressed batch may not be smaller than its raw pages by much, but it is never larger.
      BATCH: 13 + l.maxPagesPerBatch * (9 + Math.max(l.pageSize, l.maxEncodedPageBytes)) + 64,
      RUN: runHeadBytes(1) + l.maxPagesPerBatch * (8 + l.pageSize),
    };
  }

  /** The most bytes this decoder ever keeps between pushes. */
  get maxBufferedBytes(): number {
    return HEADER_BYTES + this.limits.maxPayloadBytes;
  }

  /** Bytes of an incomplete frame held right now. */
  get bufferedBytes(): number {
    return this.headerHave + this.payloadHave;
  }

  /** The error that poisoned this decoder, if any (a ProtocolError unless the decoder has a bug). */
  get error(): Error | undefined {
    return this.poisoned;
  }

  /** Accept these codec encoding ids in PAGES from now on (after HELLO_ACK agreed them). */
  allowEncodings(ids: Iterable<number>): void {
    for (const id of ids) {
      if (!Number.isInteger(id) || id < FIRST_CODEC_ID || id > 255) throw new RangeError(`codec encoding id ${id} is not in ${FIRST_CODEC_ID}..255`);
      this.encodings.add(id);
    }
  }

  /**
   * Page data of RUN frames from now on goes where `sink` says, extent by extent (null: kept in
   * the frame, as without a sink). See {@link RunSink} and {@link readTarget}.
   */
  setRunSink(sink: RunSink | null): void {
    this.runSink = sink;
  }

  /**
   * Where the next bytes of the stream should be put to be taken without a copy (bring your own
   * buffer): the rest of the payload being assembled, or of the RUN extent being received (guest
   * memory, when the run sink named it). Null when the decoder has no such place (between frames,
   * in a small head, before a payload's buffer exists), or wants none (the short rest of an extent
   * not the RUN's last). Bytes read into it are then pushed as a view of it, and {@link push} sees
   * they are in place. Valid until the next push.
   */
  readTarget(): Uint8Array | null {
    if (this.poisoned) return null;
    if (this.state === State.Payload) {
      const p = this.payload;
      return p && p.length >= this.length && this.payloadHave < this.length ? p.subarray(this.payloadHave, this.length) : null;
    }
    if (this.state === State.RunBody) {
      const e = this.runExtents[this.runK];
      // The short rest of an extent is read with the extents after it and copied (see DIRECT_READ_MIN_BYTES).
      const last = this.runK === this.runExtents.length - 1;
      return last || e.dest!.length - e.have >= DIRECT_READ_MIN_BYTES ? e.dest!.subarray(e.have) : null;
    }
    return null;
  }

  /**
   * Hands back the payload buffer of a PAGES frame this decoder returned, once nothing refers to
   * its page data any more (every page copied out). A later big frame is assembled in it instead of
   * in a fresh allocation: a fresh 1 MiB buffer costs page faults, measured 18–105 ms per 256 MiB
   * on this machine kind against 4–5 ms to reuse one. Frames that were not assembled from several
   * chunks, or not returned by this decoder, are ignored. Never hand back a frame twice.
   */
  recycle(frame: Frame): void { // PAGES, and RUN frames whose extents the decoder kept
    const payload = this.assembled.get(frame);
    if (!payload) return;
    this.assembled.delete(frame);
    if (this.spare.length < SPARE_PAYLOADS) this.spare.push(payload);
  }

  /**
   * Consumes `chunk` and returns the frames it completes, in order. Frames' byte fields (page
   * data, module chunks) may alias `chunk`: don't modify a chunk after pushing it — unless
   * `transient` is set, and the decoder copies what it keeps (the chunk is a reused read buffer).
   */
  push(chunk: Uint8Array, transient = false): Frame[] {
    if (this.poisoned) throw this.poisoned;
    const out: Frame[] = [];
    try {
      let pos = 0;
      for (;;) {
        if (this.state === State.Header) {
          const rem = chunk.length - pos;
          if (rem === 0) break;
          if (this.headerHave === 0 && rem >= HEADER_BYTES) {
            this.onHeader(chunk, pos);
            pos += HEADER_BYTES;
          } else {
            const n = Math.min(HEADER_BYTES - this.headerHave, rem);
            this.header.set(chunk.subarray(pos, pos + n), this.headerHave);
            this.headerHave += n;
            pos += n;
            if (this.headerHave < HEADER_BYTES) break;
            this.onHeader(this.header, 0);
          }
        }
        if (this.state !== State.Payload) {
          pos = this.runStep(chunk, pos, out);
          if (this.state === State.Header) continue;
          break;
        }
        // Payload state.
        const rem = chunk.length - pos;
        if (this.payloadHave === 0 && rem >= this.length) {
          out.push(this.decodePayload(transient ? chunk.slice(pos, pos + this.length) : chunk.subarray(pos, pos + this.length)));
          pos += this.length;
        } else {
          if (rem === 0) break;
          const n = Math.min(this.length - this.payloadHave, rem);
          this.append(chunk.subarray(pos, pos + n));
          pos += n;
          if (this.payloadHave < this.length) break;
          const payload = this.payload!;
          this.payload = null;
          // A spare may be longer than this frame: only its first `length` bytes are the payload.
          const frame = this.decodePayload(payload.length === this.length ? payload : payload.subarray(0, this.length));
          if (frame.type === 'PAGES' && payload.length > FIRST_PAYLOAD_BYTES) this.assembled.set(frame, payload);
          out.push(frame);
        }
        this.headerHave = 0;
        this.payloadHave = 0;
        this.state = State.Header;
      }
    } catch (e) {
      // Anything but a ProtocolError is a decoder bug: it is not dressed up as bad input (the
      // property tests rely on that), but the decoder is unusable after it all the same.
      this.payload = null;
      this.runData = null;
      this.runExtents = [];
      this.poisoned = e instanceof Error ? e : new BugIndicatingError(String(e));
      throw e;
    }
    return out;
  }

  /** The stream ended: throws ERR_PROTOCOL_UNEXPECTED_EOF if it ended inside a frame. */
  end(): void {
    if (this.poisoned) throw this.poisoned;
    if (this.bufferedBytes > 0) {
      this.poisoned = new ProtocolError(ProtocolErrorCode.UNEXPECTED_EOF, `stream ended inside a frame (${this.bufferedBytes} bytes of it received)`);
      throw this.poisoned;
    }
  }

  private onHeader(buf: Uint8Array, at: number): void {
    const view = new DataView(buf.buffer, buf.byteOffset + at, HEADER_BYTES);
    const length = view.getUint32(0, true);
    const typeId = view.getUint8(4);
    const flags = view.getUint8(5);
    const reserved = view.getUint16(6, true);
    const type = FRAME_TYPE_NAMES.get(typeId);
    if (type === undefined) fail(ProtocolErrorCode.UNKNOWN_TYPE, `unknown frame type 0x${typeId.toString(16).padStart(2, '0')}`);
    if (reserved !== 0) fail(ProtocolErrorCode.MALFORMED, `${type} header has reserved bits set (0x${reserved.toString(16)})`);
    const allowedFlags = type === 'PAGES' || type === 'BATCH' ? FLAG_PAGES_DEMAND : 0;
    if ((flags & ~allowedFlags) !== 0) fail(ProtocolErrorCode.MALFORMED, `${type} header has undefined flags 0x${flags.toString(16)}`);
    if (length > this.limits.maxPayloadBytes) fail(ProtocolErrorCode.FRAME_TOO_LARGE, `${type} frame announces ${length} payload bytes (limit ${this.limits.maxPayloadBytes})`);
    if (length > this.typeMax[type]) fail(ProtocolErrorCode.FRAME_TOO_LARGE, `${type} frame announces ${length} payload bytes; this type needs at most ${this.typeMax[type]}`);
    const exact = EXACT_SIZE[type];
    if (exact !== undefined && length !== exact) fail(length < exact ? ProtocolErrorCode.TRUNCATED : ProtocolErrorCode.MALFORMED, `${type} payload must be ${exact} bytes, header says ${length}`);
    // A RUN holds at least one extent of one page: its head is then never read past the payload.
    if (type === 'RUN' && length < runHeadBytes(1) + this.limits.pageSize) fail(ProtocolErrorCode.TRUNCATED, `RUN payload of ${length} bytes cannot hold one page`);
    this.type = type;
    this.flags = flags;
    this.length = length;
    this.state = type === 'RUN' ? State.RunHead : State.Payload;
    this.runHeadNeed = 8;
    this.headerHave = HEADER_BYTES;
    this.payloadHave = 0;
  }

  /** A recycled buffer of at least `bytes` (see recycle), or null. */
  private takeSpare(bytes: number): Uint8Array | null {
    const i = this.spare.findIndex((b) => b.length >= bytes);
    return i >= 0 ? this.spare.splice(i, 1)[0] : null;
  }

  /**
   * Appends to the incomplete payload. The first buffer is at most 64 KiB (a header alone does not
   * make us allocate what it announces); once the payload outgrows it, the buffer becomes the
   * announced length — still within maxBufferedBytes — so big frames are copied once, not log n times.
   */
  private append(bytes: Uint8Array): void {
    const need = this.payloadHave + bytes.length;
    if (!this.payload && this.type === 'PAGES' && this.length > FIRST_PAYLOAD_BYTES) {
      // A spare big enough (a buffer that exists already: the header alone still allocates nothing).
      this.payload = this.takeSpare(this.length);
    }
    if (!this.payload || this.payload.length < need) {
      const cap = this.payload ? this.length : Math.min(this.length, Math.max(need, FIRST_PAYLOAD_BYTES));
      const next = new Uint8Array(cap);
      if (this.payload) next.set(this.payload.subarray(0, this.payloadHave));
      this.payload = next;
    }
    place(this.payload, this.payloadHave, bytes);
    this.payloadHave = need;
  }

  /**
   * A RUN arrives in two parts: its head (seq, extent count, the extents) is assembled and checked
   * whole, then each extent's page data goes where the run sink says — straight from the chunk,
   * or in place when it was read into {@link readTarget} — or into the frame's own buffer.
   * Returns the position in `chunk` it got to; the frame is in `out` once its last byte came.
   */
  private runStep(chunk: Uint8Array, pos: number, out: Frame[]): number {
    const pageSize = this.limits.pageSize;
    while (this.state === State.RunHead) {
      const n = Math.min(this.runHeadNeed - this.payloadHave, chunk.length - pos);
      this.runHead.set(chunk.subarray(pos, pos + n), this.payloadHave);
      this.payloadHave += n;
      pos += n;
      if (this.payloadHave < this.runHeadNeed) return pos;
      const v = new DataView(this.runHead.buffer, this.runHead.byteOffset, this.runHeadNeed);
      if (this.runHeadNeed === 8) {
        this.runSeq = v.getUint32(0, true);
        const extents = v.getUint32(4, true);
        if (extents === 0) fail(ProtocolErrorCode.MALFORMED, 'RUN has no extents');
        if (extents > this.limits.maxPagesPerBatch) fail(ProtocolErrorCode.LIMIT, `RUN of ${extents} extents (limit ${this.limits.maxPagesPerBatch} pages)`);
        // Each extent holds a page at least: refuse an impossible count before allocating for it.
        if (runHeadBytes(extents) + extents * pageSize > this.length) fail(ProtocolErrorCode.TRUNCATED, `RUN of ${extents} extents cannot fit in ${this.length} bytes`);
        this.runHeadNeed = runHeadBytes(extents);
        const head = new Uint8Array(this.runHeadNeed);
        head.set(this.runHead.subarray(0, 8));
        this.runHead = head;
        continue;
      }
      const extents: RxExtent[] = [];
      let pages = 0;
      let end = 0;
      for (let at = 8; at < this.runHeadNeed; at += 8) {
        const first = v.getUint32(at, true);
        const count = v.getUint32(at + 4, true);
        if (count === 0) fail(ProtocolErrorCode.MALFORMED, `RUN extent at page ${first} has no pages`);
        if (first < end) fail(ProtocolErrorCode.MALFORMED, `RUN extent at page ${first} overlaps or precedes the one before (ending at ${end})`);
        end = first + count;
        if (end > 0x1_0000_0000) fail(ProtocolErrorCode.MALFORMED, `RUN extent of ${count} pages at ${first} runs past page 2^32`);
        extents.push({ first, count, before: pages, dest: null, direct: false, have: 0 });
        pages += count;
        if (pages > this.limits.maxPagesPerBatch) fail(ProtocolErrorCode.LIMIT, `RUN of more than ${this.limits.maxPagesPerBatch} pages`);
      }
      const want = this.runHeadNeed + pages * pageSize;
      if (want !== this.length) fail(want > this.length ? ProtocolErrorCode.TRUNCATED : ProtocolErrorCode.MALFORMED, `RUN of ${pages} pages needs ${want} payload bytes, header says ${this.length}`);
      if (this.runHead.length > 8) this.runHead = new Uint8Array(8);
      this.runExtents = extents;
      this.runPages = pages;
      this.runK = 0;
      this.state = State.RunBody;
      this.enterExtent(!carriesPages(out));
    }
    for (;;) {
      const e = this.runExtents[this.runK];
      if (pos === chunk.length) return pos;
      const dest = e.dest!;
      const n = Math.min(dest.length - e.have, chunk.length - pos);
      place(dest, e.have, chunk.subarray(pos, pos + n));
      e.have += n;
      this.payloadHave += n;
      pos += n;
      if (e.have < dest.length) return pos;
      if (++this.runK < this.runExtents.length) {
        this.enterExtent(!carriesPages(out));
        continue;
      }
      const frame: Frame = { type: 'RUN', seq: this.runSeq, extents: this.runExtents.map((x) => (x.direct ? { first: x.first, count: x.count, data: x.dest!, inPlace: true as const } : { first: x.first, count: x.count, data: x.dest! })) };
      const data = this.runData;
      if (data && data.byteOffset === 0 && data.buffer.byteLength > FIRST_PAYLOAD_BYTES) this.assembled.set(frame, new Uint8Array(data.buffer as ArrayBuffer));
      this.runData = null;
      this.runExtents = [];
      out.push(frame);
      this.headerHave = 0;
      this.payloadHave = 0;
      this.state = State.Header;
      return pos;
    }
  }

  /**
   * The next extent's bytes are due: ask the run sink where they go — only once every frame with
   * pages before this RUN has left push() (`ask`), so the receiver can know they were all applied.
   */
  private enterExtent(ask: boolean): void {
    const e = this.runExtents[this.runK];
    const pageSize = this.limits.pageSize;
    const target = ask ? this.runSink?.(e.first, e.count) ?? null : null;
    if (target) {
      if (target.length !== e.count * pageSize) throw new BugIndicatingError(`run sink gave ${target.length} bytes for ${e.count} pages`);
      e.dest = target;
      e.direct = true;
      return;
    }
    // Kept in the frame's own buffer, made now (the head is checked and the length agrees with
    // it; bounded by maxPayloadBytes like any payload), so reads into it end where the extent does.
    if (!this.runData) {
      const need = this.runPages * pageSize;
      this.runData = this.takeSpare(need)?.subarray(0, need) ?? new Uint8Array(need);
    }
    e.dest = this.runData.subarray(e.before * pageSize, (e.before + e.count) * pageSize);
  }

  private decodePayload(payload: Uint8Array): Frame {
    const r = new Reader(payload, this.type);
    let frame: Frame;
    switch (this.type) {
      case 'HELLO': frame = this.hello(r); break;
      case 'HELLO_ACK': frame = this.helloAck(r); break;
      case 'MODULE': {
        const totalBytes = r.u32('totalBytes');
        if (totalBytes > this.limits.maxModuleBytes) fail(ProtocolErrorCode.LIMIT, `MODULE totalBytes ${totalBytes} (limit ${this.limits.maxModuleBytes})`);
        const offset = r.u32('offset');
        const chunk = r.bytes(r.remaining, 'chunk');
        if (offset + chunk.length > totalBytes) fail(ProtocolErrorCode.MALFORMED, `MODULE chunk ${offset}+${chunk.length} runs past totalBytes ${totalBytes}`);
        frame = { type: 'MODULE', totalBytes, offset, chunk };
        break;
      }
      case 'PAGES': frame = this.pages(r); break;
      case 'ROUND_END': frame = { type: 'ROUND_END', round: r.u32('round'), pages: r.u32('pages'), dirty: r.u32('dirty') }; break;
      case 'STATE': frame = this.stateFrame(r); break;
      case 'SWITCHOVER': {
        const pagesRemaining = r.u32('pagesRemaining');
        const digest = this.digest(r);
        frame = { type: 'SWITCHOVER', pagesRemaining, digest, stale: this.bitmap(r) };
        break;
      }
      case 'RESUMED': frame = { type: 'RESUMED', pagesMissing: r.u32('pagesMissing') }; break;
      case 'ACK': {
        const id = r.u8('acked type');
        const acked = FRAME_TYPE_NAMES.get(id);
        if (acked === undefined) fail(ProtocolErrorCode.MALFORMED, `ACK names unknown frame type 0x${id.toString(16)}`);
        frame = { type: 'ACK', acked, value: r.u32('value') };
        break;
      }
      case 'PAGE_REQUEST': {
        const id = r.u32('request id');
        const count = r.u32('page count');
        if (count === 0) fail(ProtocolErrorCode.MALFORMED, 'PAGE_REQUEST asks for no pages');
        if (count > this.limits.maxPagesPerRequest) fail(ProtocolErrorCode.LIMIT, `PAGE_REQUEST asks for ${count} pages (limit ${this.limits.maxPagesPerRequest})`);
        if (r.remaining !== count * 4) fail(r.remaining < count * 4 ? ProtocolErrorCode.TRUNCATED : ProtocolErrorCode.MALFORMED, `PAGE_REQUEST of ${count} pages has ${r.remaining} index bytes`);
        const pages = new Array<number>(count);
        for (let i = 0; i < count; i++) pages[i] = r.u32('page index');
        frame = { type: 'PAGE_REQUEST', id, pages };
        break;
      }
      case 'PUSH_DONE': frame = { type: 'PUSH_DONE', pagesSent: r.u32('pagesSent') }; break;
      case 'JOIN': {
        const token = toHex(r.bytes(SESSION_TOKEN_BYTES, 'session token'));
        const stream = r.u16('stream');
        const roleId = r.u8('role');
        const role = (Object.entries(STREAM_ROLES) as [StreamRole, number][]).find(([, id]) => id === roleId)?.[0];
        if (role === undefined) fail(ProtocolErrorCode.MALFORMED, `JOIN role ${roleId} is neither data (0) nor fault (1)`);
        if (role === 'data' ? stream < 1 || stream >= MAX_STREAMS : stream !== 0) fail(ProtocolErrorCode.MALFORMED, `JOIN ${role} stream ${stream} is out of range`);
        frame = { type: 'JOIN', token, stream, role };
        break;
      }
      case 'BATCH': {
        const seq = r.u32('seq');
        const blobCodec = r.u8('blob codec');
        if (blobCodec !== 0 && !this.encodings.has(blobCodec)) fail(ProtocolErrorCode.UNKNOWN_ENCODING, `BATCH uses blob codec ${blobCodec}, which was not agreed`);
        const pages = r.u32('page count');
        if (pages === 0) fail(ProtocolErrorCode.MALFORMED, 'BATCH has no pages');
        if (pages > this.limits.maxPagesPerBatch) fail(ProtocolErrorCode.LIMIT, `BATCH of ${pages} pages (limit ${this.limits.maxPagesPerBatch})`);
        r.u32('reserved');
        frame = { type: 'BATCH', seq, demand: (this.flags & FLAG_PAGES_DEMAND) !== 0, blobCodec, pages, data: r.bytes(r.remaining, 'batch data') };
        break;
      }
      case 'COMPLETE': frame = { type: 'COMPLETE', digest: this.digest(r), faultWaits: this.faultWaits(r) }; break;
      case 'RUN': throw new BugIndicatingError('RUN frames are decoded as they stream (runStep)');
      case 'ERROR': {
        const code = r.str16(MAX_ERROR_CODE_BYTES, 'error code');
        if (!ERROR_CODE_RE.test(code)) fail(ProtocolErrorCode.MALFORMED, 'ERROR code is not of the form ERR_[A-Z0-9_]+');
        frame = { type: 'ERROR', code, message: r.str16(MAX_MESSAGE_BYTES, 'message') };
        break;
      }
      case 'CANCEL': frame = { type: 'CANCEL', reason: r.str16(MAX_MESSAGE_BYTES, 'reason') }; break;
      case 'PING':
      case 'PONG': {
        const seq = r.u32('seq');
        const time = r.f64('time');
        if (!Number.isFinite(time)) fail(ProtocolErrorCode.MALFORMED, `${this.type} time is not finite`);
        frame = { type: this.type, seq, time };
        break;
      }
    }
    r.done();
    return frame;
  }

  private codecs(r: Reader): CodecOffer[] {
    const n = r.u8('codec count');
    if (n > MAX_CODECS) fail(ProtocolErrorCode.LIMIT, `${n} codecs offered (limit ${MAX_CODECS})`);
    const out: CodecOffer[] = [];
    const seen = new Set<number>();
    for (let i = 0; i < n; i++) {
      const id = r.u8('codec id');
      if (id < FIRST_CODEC_ID || seen.has(id)) fail(ProtocolErrorCode.MALFORMED, `codec id ${id} is reserved or repeated`);
      seen.add(id);
      const len = r.u8('codec name length');
      if (len > MAX_CODEC_NAME_BYTES) fail(ProtocolErrorCode.LIMIT, `codec name is ${len} bytes (limit ${MAX_CODEC_NAME_BYTES})`);
      const name = r.utf8(len, 'codec name');
      if (!CODEC_NAME_RE.test(name)) fail(ProtocolErrorCode.MALFORMED, 'codec name has characters outside [a-z0-9.-]');
      out.push({ id, name });
    }
    return out;
  }

  private hello(r: Reader): Frame {
    const magic = r.bytes(4, 'magic');
    for (let i = 0; i < 4; i++) if (magic[i] !== HELLO_MAGIC[i]) fail(ProtocolErrorCode.BAD_MAGIC, 'HELLO does not start with the ferry magic "FRRY"');
    const minVersion = r.u16('minVersion');
    const maxVersion = r.u16('maxVersion');
    if (minVersion < 1 || minVersion > maxVersion) fail(ProtocolErrorCode.MALFORMED, `HELLO version range ${minVersion}..${maxVersion} is empty`);
    if (PROTOCOL_VERSION < minVersion || PROTOCOL_VERSION > maxVersion) {
      fail(ProtocolErrorCode.BAD_VERSION, `peer speaks protocol versions ${minVersion}..${maxVersion}; this ferry speaks ${PROTOCOL_VERSION}`);
    }
    const vmName = r.str16(MAX_NAME_BYTES, 'vm name');
    if (vmName.length === 0) fail(ProtocolErrorCode.MALFORMED, 'HELLO vm name is empty');
    const memoryBytes = r.u64('memoryBytes', this.limits.maxMemoryBytes);
    if (memoryBytes === 0) fail(ProtocolErrorCode.MALFORMED, 'HELLO memoryBytes is 0');
    const guestBytes = r.u64('guestBytes', this.limits.maxMemoryBytes);
    if (guestBytes > memoryBytes) fail(ProtocolErrorCode.MALFORMED, `HELLO guestBytes ${guestBytes} exceeds memoryBytes ${memoryBytes}`);
    const pageSize = r.u32('pageSize');
    if (!isValidPageSize(pageSize)) fail(ProtocolErrorCode.MALFORMED, `HELLO page size ${pageSize} is not a power of two in 512..65536`);
    const moduleSha256 = toHex(r.bytes(32, 'module sha256'));
    const moduleBytes = r.u32('moduleBytes');
    if (moduleBytes > this.limits.maxModuleBytes) fail(ProtocolErrorCode.LIMIT, `HELLO announces a ${moduleBytes}-byte module (limit ${this.limits.maxModuleBytes})`);
    const configLen = r.u32('config length');
    if (configLen > MAX_CONFIG_BYTES) fail(ProtocolErrorCode.LIMIT, `HELLO config is ${configLen} bytes (limit ${MAX_CONFIG_BYTES})`);
    const config = r.utf8(configLen, 'config');
    const modeBits = r.u8('modes');
    const modes = this.modes(modeBits);
    if (modes.length === 0) fail(ProtocolErrorCode.MALFORMED, 'HELLO offers no migration mode');
    const maxStreams = r.u16('maxStreams');
    if (maxStreams < 1 || maxStreams > MAX_STREAMS) fail(ProtocolErrorCode.MALFORMED, `HELLO maxStreams ${maxStreams} is not in 1..${MAX_STREAMS}`);
    const codecs = this.codecs(r);
    const gang = r.str16(MAX_NAME_BYTES, 'gang');
    const guest = r.str16(MAX_NAME_BYTES, 'guest');
    return {
      type: 'HELLO', minVersion, maxVersion, vmName, memoryBytes, guestBytes, pageSize, moduleSha256, moduleBytes, config, offer: { modes, maxStreams, codecs },
      ...(gang ? { gang } : {}),
      ...(guest ? { guest } : {}),
    };
  }

  private modes(bits: number): MigrationMode[] {
    let known = 0;
    const out: MigrationMode[] = [];
    for (const m of MIGRATION_MODES) {
      known |= MODE_BITS[m];
      if (bits & MODE_BITS[m]) out.push(m);
    }
    if (bits & ~known) fail(ProtocolErrorCode.MALFORMED, `undefined mode bits 0x${bits.toString(16)}`);
    return out;
  }

  private helloAck(r: Reader): Frame {
    const status = r.u8('status');
    if (status === 0) {
      const code = r.str16(MAX_ERROR_CODE_BYTES, 'refusal code');
      if (!ERROR_CODE_RE.test(code)) fail(ProtocolErrorCode.MALFORMED, 'HELLO_ACK refusal code is not of the form ERR_[A-Z0-9_]+');
      return { type: 'HELLO_ACK', accepted: false, code, message: r.str16(MAX_MESSAGE_BYTES, 'refusal message') };
    }
    if (status !== 1) fail(ProtocolErrorCode.MALFORMED, `HELLO_ACK status ${status} is neither 0 (refused) nor 1 (accepted)`);
    const version = r.u16('version');
    if (version !== PROTOCOL_VERSION) fail(ProtocolErrorCode.BAD_VERSION, `HELLO_ACK chose protocol version ${version}; this ferry speaks ${PROTOCOL_VERSION}`);
    const modes = this.modes(r.u8('mode'));
    if (modes.length !== 1) fail(ProtocolErrorCode.MALFORMED, 'HELLO_ACK must choose exactly one mode');
    const streams = r.u16('streams');
    if (streams < 1 || streams > MAX_STREAMS) fail(ProtocolErrorCode.MALFORMED, `HELLO_ACK streams ${streams} is not in 1..${MAX_STREAMS}`);
    const codecs = this.codecs(r);
    const tokenLen = r.u8('token length');
    if (tokenLen !== 0 && tokenLen !== SESSION_TOKEN_BYTES) fail(ProtocolErrorCode.MALFORMED, `HELLO_ACK session token is ${tokenLen} bytes, not 0 or ${SESSION_TOKEN_BYTES}`);
    const token = tokenLen ? toHex(r.bytes(tokenLen, 'session token')) : undefined;
    const faultPort = r.u16('fault port');
    if (faultPort !== 0 && !token) fail(ProtocolErrorCode.MALFORMED, 'HELLO_ACK names a fault port but no session token');
    return { type: 'HELLO_ACK', accepted: true, version, mode: modes[0], streams, codecs, ...(token ? { token } : {}), ...(faultPort ? { faultPort } : {}) };
  }

  private pages(r: Reader): Frame {
    const seq = r.u32('seq');
    const count = r.u32('page count');
    if (count === 0) fail(ProtocolErrorCode.MALFORMED, 'PAGES batch has no pages');
    if (count > this.limits.maxPagesPerBatch) fail(ProtocolErrorCode.LIMIT, `PAGES batch of ${count} pages (limit ${this.limits.maxPagesPerBatch})`);
    // Each page needs at least its head: refuse an impossible count before allocating for it.
    if (count * PAGE_HEAD_BYTES > r.remaining) fail(ProtocolErrorCode.TRUNCATED, `PAGES batch of ${count} pages cannot fit in ${r.remaining} bytes`);
    const table = new PageTable(count, r.payload);
    const { pageSize, maxEncodedPageBytes } = this.limits;
    for (let i = 0; i < count; i++) {
      const index = r.u32('page index');
      const encoding = r.u8('page encoding');
      if (r.u8('reserved') | r.u16('reserved')) fail(ProtocolErrorCode.MALFORMED, `page ${index} has reserved bytes set`);
      const len = r.u32('page length');
      if (r.u32('reserved') !== 0) fail(ProtocolErrorCode.MALFORMED, `page ${index} has reserved bytes set`);
      if (encoding === Encoding.RAW) {
        if (len !== pageSize) fail(ProtocolErrorCode.MALFORMED, `raw page ${index} is ${len} bytes, not ${pageSize}`);
      } else if (encoding === Encoding.ZERO) {
        if (len !== 0) fail(ProtocolErrorCode.MALFORMED, `zero page ${index} carries ${len} bytes`);
      } else if (!this.encodings.has(encoding)) {
        fail(ProtocolErrorCode.UNKNOWN_ENCODING, `page ${index} uses encoding ${encoding}, which was not agreed`);
      } else if (len > maxEncodedPageBytes) {
        fail(ProtocolErrorCode.LIMIT, `encoded page ${index} is ${len} bytes (limit ${maxEncodedPageBytes})`);
      }
      table.push(index, encoding, r.skip(len, 'page data'), len);
      if (!r.zeros(pagePadding(len), 'page padding')) fail(ProtocolErrorCode.MALFORMED, `page ${index} has non-zero padding`);
    }
    return pagesFrameOf(seq, (this.flags & FLAG_PAGES_DEMAND) !== 0, table);
  }

  private stateFrame(r: Reader): Frame {
    const guestBytes = r.u64('guestBytes', this.limits.maxMemoryBytes);
    const count = r.u32('global count');
    if (count > this.limits.maxGlobals) fail(ProtocolErrorCode.LIMIT, `STATE has ${count} globals (limit ${this.limits.maxGlobals})`);
    if (count * 5 > r.remaining) fail(ProtocolErrorCode.TRUNCATED, `STATE with ${count} globals cannot fit in ${r.remaining} bytes`);
    const globals: WireGlobal[] = [];
    for (let i = 0; i < count; i++) {
      const t = r.u8('global type');
      switch (t) {
        case GLOBAL_TYPE_IDS.i32: globals.push({ type: 'i32', value: r.i32('i32 global') }); break;
        case GLOBAL_TYPE_IDS.i64: globals.push({ type: 'i64', value: r.i64('i64 global') }); break;
        case GLOBAL_TYPE_IDS.f32: globals.push({ type: 'f32', bits: r.u32('f32 global') }); break;
        case GLOBAL_TYPE_IDS.f64: globals.push({ type: 'f64', bits: r.u64big('f64 global') }); break;
        default: fail(ProtocolErrorCode.MALFORMED, `STATE global ${i} has unknown type ${t}`);
      }
    }
    const jsonLen = r.u32('device state length');
    if (jsonLen > this.limits.maxJsonBytes) fail(ProtocolErrorCode.LIMIT, `STATE device state is ${jsonLen} bytes (limit ${this.limits.maxJsonBytes})`);
    const raw = r.bytes(jsonLen, 'device state');
    // JSON.parse would build any depth; consumers that walk the document recursively would not
    // survive it, so nesting is bounded here (a scan that skips string contents).
    const depth = jsonDepth(raw);
    if (depth > this.limits.maxJsonDepth) fail(ProtocolErrorCode.LIMIT, `STATE device state nests ${depth} deep (limit ${this.limits.maxJsonDepth})`);
    let text: string;
    try {
      text = utf8.decode(raw);
    } catch (e) {
      fail(ProtocolErrorCode.MALFORMED, 'STATE device state is not valid UTF-8', e);
    }
    let devices: unknown;
    try {
      devices = JSON.parse(text);
    } catch (e) {
      // Includes a RangeError from absurd nesting: still just a malformed document.
      fail(ProtocolErrorCode.MALFORMED, 'STATE device state is not valid JSON', e);
    }
    if (typeof devices !== 'object' || devices === null || Array.isArray(devices)) fail(ProtocolErrorCode.MALFORMED, 'STATE device state is not a JSON object');
    return { type: 'STATE', guestBytes, globals, devices: devices as Record<string, unknown>, soft: this.bitmap(r) };
  }

  private bitmap(r: Reader): WireBitmap {
    const size = r.u32('bitmap size');
    if (size > this.limits.maxBitmapBits) fail(ProtocolErrorCode.LIMIT, `bitmap of ${size} bits (limit ${this.limits.maxBitmapBits})`);
    const n = Math.ceil(size / 32);
    if (n * 4 > r.remaining) fail(ProtocolErrorCode.TRUNCATED, `bitmap of ${size} bits needs ${n * 4} bytes, ${r.remaining} left`);
    const words = new Uint32Array(n);
    for (let i = 0; i < n; i++) words[i] = r.u32('bitmap word');
    const tail = size & 31;
    if (tail && (words[n - 1] >>> tail) !== 0) fail(ProtocolErrorCode.MALFORMED, 'bitmap has bits set past its size');
    return { size, words };
  }

  /** COMPLETE's fault-wait summary: a presence byte (0 or 1), then count and four times. */
  private faultWaits(r: Reader): FaultWaits | null {
    const present = r.u8('fault-wait presence');
    if (present === 0) return null;
    if (present !== 1) fail(ProtocolErrorCode.MALFORMED, `COMPLETE fault-wait presence byte ${present} is neither 0 nor 1`);
    if (r.remaining < FAULT_WAITS_BYTES) fail(ProtocolErrorCode.TRUNCATED, `COMPLETE fault-wait summary needs ${FAULT_WAITS_BYTES} bytes, ${r.remaining} left`);
    const count = r.u32('fault count');
    const [meanMs, p50Ms, p99Ms, maxMs] = [r.f64('mean'), r.f64('p50'), r.f64('p99'), r.f64('max')];
    if (count < 1) fail(ProtocolErrorCode.MALFORMED, 'COMPLETE fault-wait summary counts no faults');
    if (![meanMs, p50Ms, p99Ms, maxMs].every((t) => Number.isFinite(t) && t >= 0)) fail(ProtocolErrorCode.MALFORMED, 'COMPLETE fault-wait times must be finite and ≥ 0');
    if (!(p50Ms <= p99Ms && p99Ms <= maxMs)) fail(ProtocolErrorCode.MALFORMED, 'COMPLETE fault-wait percentiles must rise (p50 ≤ p99 ≤ max)');
    return { count, meanMs, p50Ms, p99Ms, maxMs };
  }

  private digest(r: Reader): Digest | null {
    const id = r.u8('digest algorithm');
    const len = r.u8('digest length');
    if (id === 0) {
      if (len !== 0) fail(ProtocolErrorCode.MALFORMED, 'absent digest has a length');
      return null;
    }
    const entry = (Object.entries(DIGEST_ALGORITHMS) as [DigestAlgorithm, { id: number; bytes: number }][]).find(([, a]) => a.id === id);
    if (!entry) fail(ProtocolErrorCode.MALFORMED, `unknown digest algorithm ${id}`);
    if (len !== entry[1].bytes) fail(ProtocolErrorCode.MALFORMED, `${entry[0]} digest must be ${entry[1].bytes} bytes, not ${len}`);
    return { algorithm: entry[0], hex: toHex(r.bytes(len, 'digest')) };
  }
}

/** Decodes exactly one complete frame (header + payload) — convenience for tests and tools. */
export function decodeFrame(bytes: Uint8Array, init?: FrameDecoderInit): Frame {
  const d = new FrameDecoder(init);
  const frames = d.push(bytes);
  d.end();
  if (frames.length !== 1) throw new ProtocolError(ProtocolErrorCode.MALFORMED, `expected one frame, got ${frames.length}`);
  return frames[0];
}


/**
 * The migration wire protocol: frame types, constants and limits.
 *
 * Every frame is an 8-byte header followed by `length` payload bytes (all integers little-endian):
 *
 *   u32 length     payload bytes (not counting the header)
 *   u8  type       a {@link FrameTypeId}
 *   u8  flags      per-type flag bits; bits a type does not define must be zero
 *   u16 reserved   must be zero
 *
 * The header never changes between protocol versions; the protocol version is agreed once, in the
 * HELLO / HELLO_ACK handshake (which also carries the magic). docs/protocol.md has the byte layout
 * of every payload and the message sequences of pre-copy, post-copy and hybrid migration.
 */

/** Bytes in every frame header. */
export const HEADER_BYTES = 8;
/** Magic at the start of a HELLO payload: "FRRY". */
export const HELLO_MAGIC = new Uint8Array([0x46, 0x52, 0x52, 0x59]);
/** The protocol version this implementation speaks (the only one, so far). */
export const PROTOCOL_VERSION = 7;

/**
 * Bytes in front of each page's data in a PAGES frame: `u32 index`, `u8 encoding`, 3 zero bytes,
 * `u32 length`, 4 zero bytes; the data is then zero-padded to a multiple of 8. Every page's data
 * thus starts 8-byte aligned in the payload, so a copy between it and guest memory (page-aligned,
 * shared) moves whole words: measured 20 ms per 256 MiB against 35-40 ms for version 1's 9-byte
 * headers, each way. (Version 1: 9-byte headers, no padding.)
 */
export const PAGE_HEAD_BYTES = 16;

/** Zero bytes after `length` bytes of page data in a PAGES frame (to the next multiple of 8). */
export function pagePadding(length: number): number {
  return (8 - (length & 7)) & 7;
}

/** Frame type ids on the wire. */
export const FrameTypeId = {
  HELLO: 0x01,
  HELLO_ACK: 0x02,
  MODULE: 0x03,
  PAGES: 0x04,
  ROUND_END: 0x05,
  STATE: 0x06,
  SWITCHOVER: 0x07,
  RESUMED: 0x08,
  ACK: 0x09,
  PAGE_REQUEST: 0x0a,
  PUSH_DONE: 0x0b,
  COMPLETE: 0x0c,
  ERROR: 0x0d,
  CANCEL: 0x0e,
  PING: 0x0f,
  PONG: 0x10,
  JOIN: 0x11,
  BATCH: 0x12,
  RUN: 0x13,
} as const;
export type FrameType = keyof typeof FrameTypeId;
export const FRAME_TYPE_NAMES: ReadonlyMap<number, FrameType> = new Map(
  (Object.entries(FrameTypeId) as [FrameType, number][]).map(([name, id]) => [id, name]),
);

/** PAGES / BATCH flag: the batch answers a PAGE_REQUEST (its `seq` is the request id). */
export const FLAG_PAGES_DEMAND = 0x01;

/** Bytes of the session token HELLO_ACK hands out and JOIN presents. */
export const SESSION_TOKEN_BYTES = 16;
/** What an extra connection carries (JOIN `role`). */
export const STREAM_ROLES = { data: 0, fault: 1 } as const;
export type StreamRole = keyof typeof STREAM_ROLES;

/** Page encodings. Ids 0 and 1 are always understood; other ids are codec ids agreed in the handshake. */
export const Encoding = {
  /** `pageSize` bytes as they are. */
  RAW: 0,
  /** An all-zero page; no data bytes. */
  ZERO: 1,
} as const;
/** Smallest id a negotiated codec may use. */
export const FIRST_CODEC_ID = 2;

/** Migration modes (a bit each in HELLO's offered `modes`). */
export const MODE_BITS = { precopy: 0x01, postcopy: 0x02, hybrid: 0x04 } as const;
export type MigrationMode = keyof typeof MODE_BITS;
export const MIGRATION_MODES: readonly MigrationMode[] = ['precopy', 'postcopy', 'hybrid'];

/** Memory digest algorithms (id on the wire, digest length). */
export const DIGEST_ALGORITHMS = {
  sha256: { id: 1, bytes: 32 },
  xxh64: { id: 2, bytes: 8 },
} as const;
export type DigestAlgorithm = keyof typeof DIGEST_ALGORITHMS;

/** CPU state value types (a byte each on the wire). */
export const GLOBAL_TYPE_IDS = { i32: 0, i64: 1, f32: 2, f64: 3 } as const;
export type WireGlobalType = keyof typeof GLOBAL_TYPE_IDS;

/** Fixed protocol maxima (not configurable: a peer may rely on them). */
export const MAX_NAME_BYTES = 64;
export const MAX_CODEC_NAME_BYTES = 32;
export const MAX_CODECS = 32;
export const MAX_CONFIG_BYTES = 64 * 1024;
export const MAX_ERROR_CODE_BYTES = 64;
export const MAX_MESSAGE_BYTES = 4096;
export const MAX_STREAMS = 256;
/** Page sizes the protocol can describe: powers of two in this range. */
export const MIN_PAGE_SIZE = 512;
export const MAX_PAGE_SIZE = 64 * 1024;

/** Default decoder limits (see {@link FrameDecoderInit}). */
export const DEFAULT_LIMITS = {
  /** 16 MiB of page data plus room for the per-page headers of a 4096-page batch. */
  maxPayloadBytes: (16 << 20) + (128 << 10),
  maxPagesPerBatch: 4096,
  maxPagesPerRequest: 4096,
  maxJsonBytes: 8 << 20,
  maxJsonDepth: 64,
  maxModuleBytes: 256 << 20,
  maxGlobals: 65536,
  /** One bit per 4 KiB page of a 4 GiB memory. */
  maxBitmapBits: 1 << 20,
  /** Largest memory a HELLO may announce (2^48 bytes). */
  maxMemoryBytes: 2 ** 48,
} as const;

export interface CodecOffer {
  /** Encoding id used in PAGES (>= FIRST_CODEC_ID, < 256). */
  id: number;
  /** Codec name, `[a-z0-9.-]{1,32}` (e.g. `xbzrle`, `lz4`). */
  name: string;
}

export interface Capabilities {
  /** Modes the sender can do (HELLO) — at least one. */
  modes: MigrationMode[];
  /** Parallel streams the sender can use (1 … MAX_STREAMS). */
  maxStreams: number;
  /** Page codecs beyond raw and zero. */
  codecs: CodecOffer[];
}

export interface Digest {
  algorithm: DigestAlgorithm;
  /** Lowercase hex of the digest bytes. */
  hex: string;
}

export type WireGlobal =
  | { type: 'i32'; value: number }
  | { type: 'i64'; value: bigint }
  /** Float globals travel as their IEEE bits, so NaN payloads survive. */
  | { type: 'f32'; bits: number }
  | { type: 'f64'; bits: bigint };

export interface WireBitmap {
  /** Number of bits. */
  size: number;
  /** ceil(size / 32) words, bit i = words[i >>> 5] & (1 << (i & 31)); bits past `size` are zero. */
  words: Uint32Array;
}

export interface WirePage {
  index: number;
  /** `Encoding.RAW`, `Encoding.ZERO` or a negotiated codec id. */
  encoding: number;
  /** Encoded bytes (RAW: exactly pageSize; ZERO: empty). May alias the decoder's input. */
  data: Uint8Array;
}

export interface HelloFrame {
  type: 'HELLO';
  /** Lowest and highest protocol version the sender speaks. */
  minVersion: number;
  maxVersion: number;
  /** VM name, 1 … 64 UTF-8 bytes. */
  vmName: string;
  /** Guest RAM ceiling in bytes. */
  memoryBytes: number;
  /** Guest memory size now (it may grow until switchover; STATE has the final size). */
  guestBytes: number;
  /** Migration page size (power of two, 512 … 65536). */
  pageSize: number;
  /** SHA-256 of the original guest module, lowercase hex. */
  moduleSha256: string;
  /** Length of the guest module the source will send in MODULE frames (0: the destination has it). */
  moduleBytes: number;
  /** VM configuration (opaque to the protocol), ≤ 64 KiB UTF-8. */
  config: string;
  offer: Capabilities;
  /**
   * Gang migration (Deshpande et al.): VMs migrating together name the same gang, ≤ 64 UTF-8
   * bytes, and the destination gives their sessions one shared de-duplication store. Absent or
   * empty: no gang.
   */
  gang?: string;
  /**
   * What the VM runs, by name (a built-in guest's, or its module file's), ≤ 64 UTF-8 bytes, for
   * the destination to list it by (version 7). Absent or empty: unnamed (the destination may
   * still know the module by its hash).
   */
  guest?: string;
}

export type HelloAckFrame =
  | {
      type: 'HELLO_ACK';
      accepted: true;
      version: number;
      mode: MigrationMode;
      /** Streams the destination will accept (1 … offered maxStreams). */
      streams: number;
      /** The subset of offered codecs the destination decodes. */
      codecs: CodecOffer[];
      /**
       * Session token (32 lowercase hex digits = 16 bytes): extra connections (parallel data
       * streams, the post-copy fault channel) present it in JOIN. Absent: no extra connections.
       */
      token?: string;
      /**
       * Post-copy and hybrid: a TCP port, on the host the control connection reached, where the
       * destination's fault thread takes the fault channel's JOIN (a thread of its own serves page
       * requests there). Absent: the fault channel joins like any other stream.
       */
      faultPort?: number;
    }
  | { type: 'HELLO_ACK'; accepted: false; code: string; message: string };

export interface ModuleFrame {
  type: 'MODULE';
  /** Length of the whole module. */
  totalBytes: number;
  /** Where this chunk starts inside the module. */
  offset: number;
  chunk: Uint8Array;
}

export interface PagesFrame {
  type: 'PAGES';
  /** Pre-copy: round number. Post-copy push: 0. Demand reply (`demand`): the PAGE_REQUEST id. */
  seq: number;
  /** True when the batch answers a PAGE_REQUEST (flag FLAG_PAGES_DEMAND). */
  demand: boolean;
  /** The pages (a decoded frame builds this list from `table` on first use). */
  pages: WirePage[];
  /**
   * A decoded frame's pages as columns over its payload (not enumerable, so a decoded frame
   * compares equal to the frame that was encoded). The receiving engine reads this: one object
   * and one view per page, 256 to a batch, were most of what a destination allocated per byte
   * received, and that kept V8 marking its old generation back to back (see
   * src/node/host-runtime.ts).
   */
  readonly table?: PageTable;
}

/** Pages of a PAGES batch, by position: index, encoding and where the bytes are in `bytes`. */
export class PageTable {
  /** Four words per page: index, encoding, offset, length. */
  private readonly cols: Uint32Array;
  count = 0;

  constructor(capacity: number, readonly bytes: Uint8Array) {
    this.cols = new Uint32Array(capacity * 4);
  }

  /** Appends a page whose bytes are `bytes[offset, offset + length)`. */
  push(index: number, encoding: number, offset: number, length: number): void {
    const at = this.count++ * 4;
    this.cols[at] = index;
    this.cols[at + 1] = encoding;
    this.cols[at + 2] = offset;
    this.cols[at + 3] = length;
  }

  index(k: number): number { return this.cols[k * 4]; }
  encoding(k: number): number { return this.cols[k * 4 + 1]; }
  /** The page's bytes (a view of `bytes`). */
  data(k: number): Uint8Array {
    const at = this.cols[k * 4 + 2];
    return this.bytes.subarray(at, at + this.cols[k * 4 + 3]);
  }

  toPages(): WirePage[] {
    const out = new Array<WirePage>(this.count);
    for (let k = 0; k < this.count; k++) out[k] = { index: this.index(k), encoding: this.encoding(k), data: this.data(k) };
    return out;
  }
}

/** A PAGES frame over `table`: `pages` is built from it when first read, once. */
export function pagesFrameOf(seq: number, demand: boolean, table: PageTable): PagesFrame {
  let pages: WirePage[] | undefined;
  const f = { type: 'PAGES', seq, demand } as PagesFrame;
  Object.defineProperty(f, 'pages', {
    get: () => (pages ??= table.toPages()),
    set: (v: WirePage[]) => { pages = v; },
    enumerable: true, configurable: true,
  });
  Object.defineProperty(f, 'table', { value: table, enumerable: false });
  return f;
}

/**
 * Pages after a codec, as one packed batch (core/codec `packBatch` layout), optionally compressed
 * whole by a blob codec (lz4, zstd) agreed in the handshake.
 */
export interface BatchFrame {
  type: 'BATCH';
  /** As in PAGES: round, 0 for a post-copy push, or the PAGE_REQUEST id (with `demand`). */
  seq: number;
  demand: boolean;
  /** 0: `data` is the packed batch itself; otherwise the agreed blob codec id that compressed it. */
  blobCodec: number;
  /** Pages in the batch (so a receiver can count before it decodes). */
  pages: number;
  data: Uint8Array;
}

/** One extent of a RUN frame: pages `first` … `first + count − 1`, raw, back to back. */
export interface RunExtent {
  first: number;
  count: number;
  /** The extent's `count × pageSize` bytes. */
  data: Uint8Array;
  /**
   * Set in a decoded frame when `data` is the place the decoder's run sink named (see
   * FrameDecoder.setRunSink): the bytes were put there as they arrived.
   */
  inPlace?: true;
}

/**
 * Whole raw pages as runs of guest memory (protocol version 4): a sender writes each run straight
 * from guest memory, and a receiver can read each one straight into guest memory — no copy on
 * either side beyond the kernel's (docs/protocol.md, RUN).
 */
export interface RunFrame {
  type: 'RUN';
  /** As in PAGES: pre-copy round, or 0 for a post-copy push (never a demand reply). */
  seq: number;
  /** Ascending, not overlapping, at least one page each. */
  extents: RunExtent[];
}

/** Bytes of a RUN payload in front of its page data: seq, extent count, 8 per extent. */
export function runHeadBytes(extents: number): number {
  return 8 + 8 * extents;
}

/** First frame of an extra connection of a session (parallel data stream, or the fault channel). */
export interface JoinFrame {
  type: 'JOIN';
  /** The session token from HELLO_ACK (32 lowercase hex digits). */
  token: string;
  /** Data streams: 1 … streams-1 (stream 0 is the control connection). The fault channel: 0. */
  stream: number;
  role: StreamRole;
}

export interface RoundEndFrame {
  type: 'ROUND_END';
  round: number;
  /** Pages sent in this round. */
  pages: number;
  /** Pages dirtied during this round (what the next round will have to send). */
  dirty: number;
}

export interface StateFrame {
  type: 'STATE';
  /** Guest memory size at the pause. */
  guestBytes: number;
  /** CPU state: the guest's mutable globals, in export order. */
  globals: WireGlobal[];
  /** Device state (a JSON object; validated by the device layer, not here). */
  devices: Record<string, unknown>;
  /** Soft pages (free/ballooned memory the destination need not fetch: DSB). */
  soft: WireBitmap;
}

export interface SwitchoverFrame {
  type: 'SWITCHOVER';
  /** Pages the destination does not have yet, stale ones included (0 for pure pre-copy). */
  pagesRemaining: number;
  /** Digest of guest memory at the pause (null when the source did not compute one). */
  digest: Digest | null;
  /**
   * Pages the destination received before the pause that were dirtied since and not re-sent
   * (hybrid): it must treat them as missing. Size 0 when there are none.
   */
  stale: WireBitmap;
}

export interface ResumedFrame {
  type: 'RESUMED';
  /** Pages the destination still lacks as it resumes (post-copy / hybrid). */
  pagesMissing: number;
}

export interface AckFrame {
  type: 'ACK';
  /** The frame type acknowledged. */
  acked: FrameType;
  /** Which one (ROUND_END: the round; MODULE: bytes received; STATE / SWITCHOVER: 0). */
  value: number;
}

export interface PageRequestFrame {
  type: 'PAGE_REQUEST';
  /** Request id, echoed in the PAGES `seq` that answers it. */
  id: number;
  /** Page indices (1 … maxPagesPerRequest). */
  pages: number[];
}

export interface PushDoneFrame {
  type: 'PUSH_DONE';
  /** Pages the source pushed or served after switchover. */
  pagesSent: number;
}

export interface CompleteFrame {
  type: 'COMPLETE';
  /** Digest of the destination's memory once it holds every page (null: not computed). */
  digest: Digest | null;
  /**
   * Post-copy: how long the vCPU waited for its faults, as the destination measured it where the
   * vCPU blocks (version 5; null: no faults, or not measured there). The source has only its
   * own side of each fault (request in → answer sent): this is what the guest felt.
   */
  faultWaits: FaultWaits | null;
}

/** A summary of the vCPU's fault waits (COMPLETE, version 5): count ≥ 1, times in ms, finite and ≥ 0, p50 ≤ p99 ≤ max. */
export interface FaultWaits {
  count: number;
  meanMs: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
}

/** Bytes of COMPLETE's fault-wait summary after its presence byte. */
export const FAULT_WAITS_BYTES = 4 + 4 * 8;

export interface ErrorFrame {
  type: 'ERROR';
  /** `ERR_[A-Z0-9_]+`, ≤ 64 bytes. */
  code: string;
  /** ≤ 4096 UTF-8 bytes. */
  message: string;
}

export interface CancelFrame {
  type: 'CANCEL';
  /** ≤ 4096 UTF-8 bytes. */
  reason: string;
}

export interface PingFrame {
  type: 'PING';
  seq: number;
  /** Sender's clock at send (ms); echoed by PONG. */
  time: number;
}

export interface PongFrame {
  type: 'PONG';
  seq: number;
  time: number;
}

export type Frame =
  | HelloFrame
  | HelloAckFrame
  | ModuleFrame
  | PagesFrame
  | RoundEndFrame
  | StateFrame
  | SwitchoverFrame
  | ResumedFrame
  | AckFrame
  | PageRequestFrame
  | PushDoneFrame
  | CompleteFrame
  | ErrorFrame
  | CancelFrame
  | PingFrame
  | PongFrame
  | JoinFrame
  | BatchFrame
  | RunFrame;

/** A frame without its `type` tag (what the per-type encoders take); distributes over unions. */
export type FrameBody<F extends Frame> = F extends unknown ? Omit<F, 'type'> : never;

/** Decoder error codes (ProtocolError.code). */
export const ProtocolErrorCode = {
  /** A header announced more payload than `maxPayloadBytes`. */
  FRAME_TOO_LARGE: 'ERR_PROTOCOL_FRAME_TOO_LARGE',
  /** The type byte names no frame type. */
  UNKNOWN_TYPE: 'ERR_PROTOCOL_UNKNOWN_TYPE',
  /** A payload ended before a field it announced. */
  TRUNCATED: 'ERR_PROTOCOL_TRUNCATED',
  /** HELLO's version range excludes ours, or HELLO_ACK chose a version we don't speak. */
  BAD_VERSION: 'ERR_PROTOCOL_BAD_VERSION',
  /** HELLO without the magic. */
  BAD_MAGIC: 'ERR_PROTOCOL_BAD_MAGIC',
  /** A field is out of range, reserved bits are set, trailing bytes, bad UTF-8 or JSON, … */
  MALFORMED: 'ERR_PROTOCOL_MALFORMED',
  /** A count or length is above a configured limit. */
  LIMIT: 'ERR_PROTOCOL_LIMIT',
  /** A page uses an encoding id that was not agreed. */
  UNKNOWN_ENCODING: 'ERR_PROTOCOL_UNKNOWN_ENCODING',
  /** The stream ended in the middle of a frame (see FrameDecoder.end). */
  UNEXPECTED_EOF: 'ERR_PROTOCOL_UNEXPECTED_EOF',
  /** A well-formed frame out of sequence (SequenceChecker; the decoder never throws it). */
  SEQUENCE: 'ERR_PROTOCOL_SEQUENCE',
} as const;

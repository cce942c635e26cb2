/**
 * The engine's data-reduction plumbing: which codecs a migration offers and accepts, and the
 * per-stream halves that turn a batch of guest pages into BATCH frames and back.
 *
 * Page codecs (core/codec) run per page: zero pages become a flag, XBZRLE sends a re-dirtied page
 * as a delta against the sender's cached copy, dedup sends content already sent as a reference.
 * Blob codecs (lz4, zstd — native, so the node edge supplies them through EngineDeps) compress the
 * low-entropy pages of a batch whole (MECOM-style adaptive chooser), and a measured controller
 * turns compression off for a stream when it makes that stream slower.
 *
 * Ordering rules the engine keeps (core/codec/codec.ts "State"):
 * - a page always travels on the same data stream (see {@link streamOf}), so XBZRLE deltas reach
 *   the destination after the version they are a delta of;
 * - a dedup definition can be on another stream (or another VM's stream, gang migration) than a
 *   reference to it; the destination holds a stream back until the definition has landed.
 */
import { InvalidArgumentError } from '../errors.js';
import { PAGE_SIZE } from '../pages.js';
import {
  CodecError, CodecErrorCode, DEFAULT_CODEC_IDS, RAW_CODEC_ID, codecFail, unpackBatch,
  type BlobCodec, type EncodedBatch, type PageCodec, type PageDecoder,
} from '../codec/codec.js';
import { chain } from '../codec/chain.js';
import { DedupIndex, DedupStore, dedup } from '../codec/dedup.js';
import { xbzrle } from '../codec/xbzrle.js';
import { zero } from '../codec/zero.js';
import { ThroughputController, adaptiveEncoder, type AdaptiveEncoder, type AdaptivePart } from '../codec/adaptive.js';
import type { CodecOffer } from '../protocol/frames.js';

/** Page codecs the engine can run (pure TypeScript). */
export const PAGE_CODEC_NAMES = ['xbzrle', 'dedup'] as const;
/** Blob codecs the engine can use when its edge supplies them (EngineDeps.blobCodecs). */
export const BLOB_CODEC_NAMES = ['lz4', 'zstd'] as const;
export type CodecName = (typeof PAGE_CODEC_NAMES)[number] | (typeof BLOB_CODEC_NAMES)[number];
export const CODEC_NAMES: readonly CodecName[] = [...PAGE_CODEC_NAMES, ...BLOB_CODEC_NAMES];

/** Makes a blob codec with the wire id agreed in the handshake. */
export type BlobCodecFactory = (id: number) => BlobCodec;

/** Pages per data stream run: a stream carries whole 1 MiB runs of guest memory. */
const RUN_PAGES_LOG2 = 8;

/** The data stream that carries `page` (always the same one, so a page's versions stay in order). */
export function streamOf(page: number, streams: number): number {
  return streams === 1 ? 0 : (page >>> RUN_PAGES_LOG2) % streams;
}

/** Pages from `page` on that go on its stream ({@link streamOf}) before the next may not. */
export function pagesOnStream(page: number, streams: number): number {
  return streams === 1 ? Infinity : (1 << RUN_PAGES_LOG2) - (page & ((1 << RUN_PAGES_LOG2) - 1));
}

/** Checks codec names from a user (CLI flag, API body); throws InvalidArgumentError naming the bad one. */
export function parseCodecNames(names: readonly string[]): CodecName[] {
  const out: CodecName[] = [];
  for (const n of names) {
    if (!(CODEC_NAMES as readonly string[]).includes(n)) throw new InvalidArgumentError(`unknown codec '${n}' (known: ${CODEC_NAMES.join(', ')})`);
    if (!out.includes(n as CodecName)) out.push(n as CodecName);
  }
  const blobs = out.filter((n) => (BLOB_CODEC_NAMES as readonly string[]).includes(n));
  if (blobs.length > 1) throw new InvalidArgumentError(`choose one compressor, not ${blobs.join(' and ')}`);
  return out;
}

/** The HELLO offer for these codecs (wire ids: DEFAULT_CODEC_IDS). */
export function codecOffer(names: readonly CodecName[]): CodecOffer[] {
  return parseCodecNames(names).map((name) => ({ id: DEFAULT_CODEC_IDS[name], name }));
}

/** The destination's answer: the offered codecs it can decode, with the ids the source chose. */
export function acceptCodecs(offered: readonly CodecOffer[], blobs: Readonly<Record<string, BlobCodecFactory>> = {}): CodecOffer[] {
  return offered.filter((c) => (PAGE_CODEC_NAMES as readonly string[]).includes(c.name) || ((BLOB_CODEC_NAMES as readonly string[]).includes(c.name) && blobs[c.name] !== undefined));
}

function idOf(agreed: readonly CodecOffer[], name: CodecName): number | undefined {
  return agreed.find((c) => c.name === name)?.id;
}

/** The page-codec chain both sides build from what was agreed: zero, then XBZRLE, then dedup. */
function pageCodecOf(agreed: readonly CodecOffer[], side: { xbzrleCacheBytes?: number; index?: DedupIndex; store?: DedupStore }): PageCodec {
  const parts: PageCodec[] = [zero()];
  const x = idOf(agreed, 'xbzrle');
  if (x !== undefined) parts.push(xbzrle({ id: x, ...(side.xbzrleCacheBytes !== undefined ? { cacheBytes: side.xbzrleCacheBytes } : {}) }));
  const d = idOf(agreed, 'dedup');
  if (d !== undefined) parts.push(dedup({ id: d, ...(side.index ? { index: side.index } : {}), ...(side.store ? { store: side.store } : {}) }));
  return chain(parts, { name: 'pages' });
}

/** True when the agreed codecs need BATCH frames (anything beyond raw and zero). */
export function usesCodecs(agreed: readonly CodecOffer[]): boolean {
  return agreed.length > 0;
}

export interface PageEncoderInit {
  agreed: readonly CodecOffer[];
  blobs?: Readonly<Record<string, BlobCodecFactory>>;
  /** XBZRLE cache for this stream, bytes. */
  xbzrleCacheBytes?: number;
  /** Dedup index: the VM's (shared by its streams) or the gang's. */
  index?: DedupIndex;
  /** 'auto': the measured controller turns compression on and off; 'always': compress every batch. */
  compression?: 'auto' | 'always';
  now: () => number;
}

/** Sender half for one data stream. */
export class StreamEncoder {
  private readonly enc: AdaptiveEncoder;
  readonly controller: ThroughputController | null;
  readonly compressor: BlobCodec | null;
  rawBytes = 0;
  encodedBytes = 0;

  constructor(init: PageEncoderInit) {
    const blobName = BLOB_CODEC_NAMES.find((n) => idOf(init.agreed, n) !== undefined && init.blobs?.[n]);
    this.compressor = blobName ? init.blobs![blobName](idOf(init.agreed, blobName)!) : null;
    this.controller = this.compressor && init.compression !== 'always' ? new ThroughputController() : null;
    this.enc = adaptiveEncoder({
      pageCodec: pageCodecOf(init.agreed, { xbzrleCacheBytes: init.xbzrleCacheBytes, index: init.index }),
      ...(this.compressor ? { compressor: this.compressor } : {}),
      ...(this.controller ? { controller: this.controller } : {}),
      now: init.now,
    });
  }

  /** Encodes `indices.length` pages laid back to back in `pages` into parts (one BATCH frame each). */
  encode(indices: ArrayLike<number>, pages: Uint8Array): AdaptivePart[] {
    const parts = this.enc.encodeBatch(indices, pages);
    this.rawBytes += indices.length * PAGE_SIZE;
    for (const p of parts) this.encodedBytes += p.bytes.length;
    return parts;
  }

  /** The stream took another batch of `pageBytes` at `nowMs` (the compression controller's measure). */
  recordSent(pageBytes: number, nowMs: number): void {
    this.controller?.recordSent(pageBytes, nowMs);
  }

  stats(): Record<string, number> {
    return this.enc.stats();
  }
}

/** Destination half for one data stream: unpacks BATCH payloads and decodes pages. */
export class StreamDecoder {
  readonly decoder: PageDecoder;
  private readonly blobs = new Map<number, BlobCodec>();

  /** `store`: the session's (or its gang's) dedup store, when dedup was agreed. */
  constructor(agreed: readonly CodecOffer[], blobs: Readonly<Record<string, BlobCodecFactory>>, store: DedupStore | null, private readonly maxPages: number) {
    this.decoder = pageCodecOf(agreed, store ? { store } : {}).createDecoder();
    for (const name of BLOB_CODEC_NAMES) {
      const id = idOf(agreed, name);
      if (id !== undefined && blobs[name]) this.blobs.set(id, blobs[name](id));
    }
  }

  /** The packed batch a BATCH frame carries (decompressed when it was). Throws CodecError. */
  unpack(blobCodec: number, data: Uint8Array, pages: number): EncodedBatch {
    let packed = data;
    if (blobCodec !== RAW_CODEC_ID) {
      const c = this.blobs.get(blobCodec);
      if (!c) codecFail(CodecErrorCode.UNKNOWN, `BATCH compressed with codec ${blobCodec}, which this side did not agree to`);
      packed = c.decompress(data);
    }
    const b = unpackBatch(packed, { maxPages: this.maxPages });
    if (b.count !== pages) codecFail(CodecErrorCode.CORRUPT, `BATCH announces ${pages} pages but carries ${b.count}`);
    return b;
  }
}

/** True for the error a dedup reference raises when its definition has not landed yet. */
export function isMissingDefinition(e: unknown): boolean {
  return e instanceof CodecError && e.code === CodecErrorCode.STATE;
}

/** Sender dedup index of a gang (both sides know it: the destination sizes its store from it). */
export const GANG_INDEX_BYTES = 256 << 20;

/** Sender dedup index of one VM migrating alone: up to 64 MiB, never more than its memory. */
export function vmIndexBytes(memoryBytes: number): number {
  return Math.max(PAGE_SIZE, Math.min(64 << 20, memoryBytes));
}

/**
 * Destination store size for a sender index of `indexBytes`: twice as large, so definitions that
 * arrive out of order across streams do not evict an id a reference still needs.
 */
export function storeBytesFor(indexBytes: number): number {
  return indexBytes * 2;
}

/**
 * Gang migration (Deshpande et al.): VMs migrating together to the same destination share one
 * de-duplication index, so a page common to several of them crosses the wire once. Give every
 * member's `migrateSource` the same Gang; the destination shares one store among the sessions that
 * name the same gang in HELLO — so the id must be unique at the destination while the gang's
 * sessions last (the host agent adds a random suffix to the name a user gives).
 *
 * Known limit: a member that fails may leave definitions in the shared index that never reached
 * the destination; a member referring to one waits `definitionWaitMs` and fails with
 * ERR_CODEC_STATE (before its switchover, so its VM runs on at the source).
 */
export class Gang {
  readonly index: DedupIndex;
  constructor(readonly id: string) {
    if (!/^[\x21-\x7e]{1,64}$/.test(id)) throw new InvalidArgumentError(`gang id '${id}' must be 1..64 printable ASCII characters`);
    this.index = new DedupIndex({ capacityBytes: GANG_INDEX_BYTES });
  }
}

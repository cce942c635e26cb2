/**
 * MECOM-style adaptive compression (Jin et al.): classify each page — zero / low entropy / high
 * entropy — and pick the treatment per class (zero → flag, low → a byte compressor over the whole
 * batch, high → raw, since compressing noise only burns CPU), plus a controller that turns
 * compression off for a stream when it makes the stream slower — measured, not guessed.
 *
 * The controller is pure: the engine feeds it the link throughput it observed and the compressor's
 * measured throughput and ratio; it answers "compress this batch?". With compression pipelined
 * against sending, the stream moves raw bytes at
 *
 *     effective = min(compressRate, linkRate / ratio)      (ratio = compressed / raw ≤ 1)
 *
 * versus `linkRate` without. Compression turns on when effective ≥ linkRate·(1 + onMargin) and off
 * when effective < linkRate·(1 + offMargin) (hysteresis), re-evaluated every `intervalMs`. While off,
 * one batch in `probeEvery` is still compressed so the ratio and speed stay measured.
 */
import { PAGE_SIZE } from '../pages.js';
import {
  CodecErrorCode, MAX_ENCODED_PAGE_BYTES, RAW_CODEC_ID, codecFail, decodeOne, encodeBatch, packBatch, unpackBatch,
  type BlobCodec, type PageCodec, type PageDecoder, type PageEncoder,
} from './codec.js';

export type PageClass = 'zero' | 'low' | 'high';

const DEFAULT_SAMPLE = 256;
const logTables = new Map<number, Float64Array>();

function entropyTable(n: number): Float64Array {
  let t = logTables.get(n);
  if (!t) {
    t = new Float64Array(n + 1);
    for (let c = 1; c <= n; c++) t[c] = -(c / n) * Math.log2(c / n);
    logTables.set(n, t);
  }
  return t;
}

const hist = new Uint16Array(256);

/**
 * Shannon entropy (bits per byte, 0 … 8) of a strided sample of `sampleBytes` bytes of `page`.
 * With 256 samples, uniformly random bytes estimate ≈ 7.2 and text ≈ 4–5.
 */
export function sampleEntropy(page: Uint8Array, sampleBytes = DEFAULT_SAMPLE): number {
  const n = Math.min(sampleBytes, page.length);
  if (n === 0) return 0;
  const stride = Math.floor(page.length / n);
  hist.fill(0);
  // Odd offset inside the stride so word-aligned patterns are not always sampled at the same lane.
  for (let k = 0, i = stride >> 1; k < n; k++, i += stride) hist[page[i]]++;
  const t = entropyTable(n);
  let e = 0;
  for (let b = 0; b < 256; b++) e += t[hist[b]];
  return e;
}

export interface ClassifyInit {
  /** Below this estimated entropy (bits/byte) a page is 'low' (default 6). */
  lowEntropyBits?: number;
  sampleBytes?: number;
  /** Zero test (default: a full scan in JS words; pass a ZeroScanner's isZero for SIMD). */
  isZero?: (page: Uint8Array) => boolean;
}

function isZeroWords(page: Uint8Array): boolean {
  for (let i = 0; i < page.length; i++) if (page[i] !== 0) return false;
  return true;
}

export function classifyPage(page: Uint8Array, init: ClassifyInit = {}): PageClass {
  if ((init.isZero ?? isZeroWords)(page)) return 'zero';
  return sampleEntropy(page, init.sampleBytes) < (init.lowEntropyBits ?? 6) ? 'low' : 'high';
}

export interface CompressionControllerInit {
  /** Re-evaluate at most this often (default 1000 ms). */
  intervalMs?: number;
  /** Turn on when compression is at least this much faster (default 0.1 = 10 %). */
  onMargin?: number;
  /** Turn off when it is less than this much faster (default 0). */
  offMargin?: number;
  /** While off, compress one batch in this many to keep measuring (default 16; 0 = never). */
  probeEvery?: number;
  /** Weight of the newest sample in the moving averages (default 0.3). */
  alpha?: number;
  /** Start enabled (default true: compress until measured otherwise). */
  initiallyOn?: boolean;
}

export interface CompressionDecision {
  enabled: boolean;
  /** Wire bytes per second, measured. */
  linkRate: number;
  /** Raw bytes per second the compressor consumes, measured. */
  compressRate: number;
  /** Compressed / raw, measured. */
  ratio: number;
  /** Raw bytes per second with compression: min(compressRate, linkRate / ratio). */
  effectiveRate: number;
  /** effectiveRate / linkRate. */
  speedup: number;
}

/** Decides from measurements whether compressing pays on a stream. Pure: time comes in as numbers. */
export class CompressionController implements CompressionGate {
  private readonly intervalMs: number;
  private readonly onMargin: number;
  private readonly offMargin: number;
  private readonly probeEvery: number;
  private readonly alpha: number;
  private on: boolean;
  private linkRate = NaN;
  private compressRate = NaN;
  private ratio = NaN;
  private lastEval = -Infinity;
  private batches = 0;
  /** Times the decision flipped. */
  flips = 0;

  constructor(init: CompressionControllerInit = {}) {
    this.intervalMs = init.intervalMs ?? 1000;
    this.onMargin = init.onMargin ?? 0.1;
    this.offMargin = init.offMargin ?? 0;
    this.probeEvery = init.probeEvery ?? 16;
    this.alpha = init.alpha ?? 0.3;
    this.on = init.initiallyOn ?? true;
  }

  private avg(old: number, x: number): number {
    return Number.isNaN(old) ? x : old + this.alpha * (x - old);
  }

  /** `wireBytes` left the link in `ms` milliseconds (time the link was busy, not idle time). */
  recordLink(wireBytes: number, ms: number): void {
    if (wireBytes > 0 && ms > 0) this.linkRate = this.avg(this.linkRate, (wireBytes / ms) * 1000);
  }

  /** The compressor took `ms` to turn `rawBytes` into `compressedBytes`. */
  recordCompress(rawBytes: number, compressedBytes: number, ms: number): void {
    if (rawBytes <= 0) return;
    this.ratio = this.avg(this.ratio, Math.min(1, compressedBytes / rawBytes));
    if (ms > 0) this.compressRate = this.avg(this.compressRate, (rawBytes / ms) * 1000);
  }

  /** The current figures and what they imply (without changing the decision). */
  assess(): CompressionDecision {
    const effectiveRate = Math.min(this.compressRate, this.linkRate / this.ratio);
    return { enabled: this.on, linkRate: this.linkRate, compressRate: this.compressRate, ratio: this.ratio, effectiveRate, speedup: effectiveRate / this.linkRate };
  }

  /** Re-evaluates when `intervalMs` has passed since the last evaluation; returns the decision. */
  evaluate(nowMs: number): CompressionDecision {
    const d = this.assess();
    if (nowMs - this.lastEval < this.intervalMs || !Number.isFinite(d.speedup)) return d;
    this.lastEval = nowMs;
    const next = this.on ? d.speedup >= 1 + this.offMargin : d.speedup >= 1 + this.onMargin;
    if (next !== this.on) {
      this.on = next;
      this.flips++;
    }
    return { ...d, enabled: this.on };
  }

  /** Should the next batch be compressed? (the decision, or a probe while off). */
  shouldCompress(nowMs: number): boolean {
    this.evaluate(nowMs);
    this.batches++;
    return this.on || (this.probeEvery > 0 && this.batches % this.probeEvery === 0);
  }
}

/** What the adaptive encoder asks before each batch, and tells after compressing one. */
export interface CompressionGate {
  shouldCompress(nowMs: number): boolean;
  recordCompress(rawBytes: number, compressedBytes: number, ms: number): void;
}

export interface ThroughputControllerInit {
  /** Sending time per measurement window, ms (default 100). */
  windowMs?: number;
  /** After this many windows in the better mode, one window in the other, to re-measure it (default 8). */
  exploreEvery?: number;
  /** Compression must move pages this much faster to be chosen (default 0.05 = 5 %). */
  margin?: number;
  /** Pauses longer than this between batches (round ends, ACK waits) are not sending time, ms (default 20). */
  gapMs?: number;
}

/**
 * Turns compression on or off for a stream by measuring what it is for: page bytes the stream
 * moved per second of sending time, in alternating windows with compression on and off — an A/B
 * that needs no model of the link, and is not fooled by socket buffers that make a write look
 * instant. It starts on, measures one window each way, keeps the faster mode and re-measures the
 * other one window in `exploreEvery`.
 */
export class ThroughputController implements CompressionGate {
  private readonly windowMs: number;
  private readonly exploreEvery: number;
  private readonly margin: number;
  private readonly gapMs: number;
  /** Mode of the current window. */
  private mode = true;
  /** The mode the measurements favour. */
  private best = true;
  private last = Number.NaN;
  private windowTime = 0;
  private windowBytes = 0;
  private rateOn = Number.NaN;
  private rateOff = Number.NaN;
  private sinceExplore = 0;
  private prev: { bytes: number; mode: boolean } | null = null;
  /** Times the favoured mode changed. */
  flips = 0;

  constructor(init: ThroughputControllerInit = {}) {
    this.windowMs = init.windowMs ?? 100;
    this.exploreEvery = init.exploreEvery ?? 8;
    this.margin = init.margin ?? 0.05;
    this.gapMs = init.gapMs ?? 20;
  }

  /**
   * A batch of `pageBytes` (before any codec), encoded in the current mode, was handed to the
   * stream at `nowMs`. The time until the next batch is what this one cost.
   */
  recordSent(pageBytes: number, nowMs: number): void {
    const dt = nowMs - this.last;
    const prev = this.prev;
    this.last = nowMs;
    this.prev = { bytes: pageBytes, mode: this.mode };
    // The first batch, a batch after a pause, or one sent in the mode before a switch: no sample.
    if (!prev || !(dt >= 0) || dt > this.gapMs || prev.mode !== this.mode) return;
    this.windowTime += dt;
    this.windowBytes += prev.bytes;
    if (this.windowTime < this.windowMs) return;
    const rate = (this.windowBytes / this.windowTime) * 1000;
    if (this.mode) this.rateOn = Number.isNaN(this.rateOn) ? rate : (this.rateOn + rate) / 2;
    else this.rateOff = Number.isNaN(this.rateOff) ? rate : (this.rateOff + rate) / 2;
    this.windowTime = 0;
    this.windowBytes = 0;
    if (Number.isNaN(this.rateOff)) {
      this.mode = false; // measured on; now measure off
      return;
    }
    const best = this.rateOn >= this.rateOff * (1 + this.margin);
    if (best !== this.best) this.flips++;
    this.best = best;
    if (++this.sinceExplore > this.exploreEvery) {
      this.sinceExplore = 0;
      this.mode = !best;
    } else this.mode = best;
  }

  shouldCompress(): boolean {
    return this.mode;
  }

  recordCompress(): void {}

  /** The favoured mode and the page rates behind it (NaN until measured). */
  assess(): { enabled: boolean; rateOn: number; rateOff: number; speedup: number } {
    return { enabled: this.best, rateOn: this.rateOn, rateOff: this.rateOff, speedup: this.rateOn / this.rateOff };
  }
}

/** One part of an adaptive batch: a packed batch, compressed with `blobCodecId` (RAW_CODEC_ID = not). */
export interface AdaptivePart {
  blobCodecId: number;
  /** Pages in the part. */
  pages: number;
  bytes: Uint8Array;
}

export interface AdaptiveInit extends Omit<ClassifyInit, 'isZero'> {
  /** Per-page layer (zero / xbzrle / dedup …): zero pages become flags there; full-page payloads it leaves are classified by entropy. */
  pageCodec: PageCodec;
  /** Compressor for the low-entropy raw pages of a batch; none = never compress. */
  compressor?: BlobCodec;
  /** Measured on/off control; none = always compress low-entropy pages. */
  controller?: CompressionGate;
  /** Milliseconds clock for timing the compressor and the controller (default performance.now). */
  now?: () => number;
}

export interface AdaptiveEncoder {
  /**
   * Encodes a batch (each page index at most once) into parts, to be decoded in order: the
   * compressed low-entropy part first (if any), then the rest.
   */
  encodeBatch(indices: ArrayLike<number>, pages: Uint8Array): AdaptivePart[];
  stats(): Record<string, number>;
}

export interface AdaptiveDecoder {
  /** Decodes parts in order; `pageFor(i)` returns the destination's PAGE_SIZE view of page i. */
  decodeParts(parts: readonly AdaptivePart[], pageFor: (pageIndex: number) => Uint8Array): number;
  stats(): Record<string, number>;
}

export function adaptiveEncoder(init: AdaptiveInit): AdaptiveEncoder {
  const enc: PageEncoder = init.pageCodec.createEncoder();
  let scratch = new Uint8Array(0);
  const now = init.now ?? (() => performance.now());
  const counts = { zero: 0, low: 0, high: 0, encoded: 0, compressedBatches: 0, plainBatches: 0, rawBytesIn: 0, compressedBytesOut: 0 };
  return {
    encodeBatch(indices, pages) {
      const seen = new Set<number>();
      for (let k = 0; k < indices.length; k++) {
        if (seen.has(indices[k])) throw new RangeError(`page ${indices[k]} appears twice in one batch`);
        seen.add(indices[k]);
      }
      // Encoded into one buffer, batch after batch: its parts are packed (copied) below.
      const need = indices.length * MAX_ENCODED_PAGE_BYTES;
      if (scratch.length < need) scratch = new Uint8Array(need);
      const batch = encodeBatch(enc, indices, pages, { out: scratch });
      const compressNow = init.compressor !== undefined && (init.controller?.shouldCompress(now()) ?? true);
      const low: number[] = [];
      const rest: number[] = [];
      for (let k = 0; k < batch.count; k++) {
        const len = batch.offsets[k + 1] - batch.offsets[k];
        if (len === 0) counts.zero++;
        // Only full-page payloads (raw pages, dedup definitions) are worth a compressor's time.
        if (len >= PAGE_SIZE) {
          const cls = sampleEntropy(pages.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE), init.sampleBytes) < (init.lowEntropyBits ?? 6) ? 'low' : 'high';
          counts[cls]++;
          if (cls === 'low' && compressNow) { low.push(k); continue; }
        } else if (len > 0) counts.encoded++;
        rest.push(k);
      }
      const parts: AdaptivePart[] = [];
      if (low.length > 0) {
        const packed = packBatch(batch, low);
        const t0 = now();
        const blob = init.compressor!.compress(packed);
        init.controller?.recordCompress(packed.length, blob ? blob.length : packed.length, now() - t0);
        counts.rawBytesIn += packed.length;
        if (blob) {
          counts.compressedBatches++;
          counts.compressedBytesOut += blob.length;
          parts.push({ blobCodecId: init.compressor!.id, pages: low.length, bytes: blob });
        } else rest.unshift(...low); // incompressible after all: ship them plain (order within a batch is free)
      }
      if (rest.length > 0) {
        counts.plainBatches++;
        parts.push({ blobCodecId: RAW_CODEC_ID, pages: rest.length, bytes: packBatch(batch, rest) });
      }
      return parts;
    },
    stats: () => ({ ...counts, ...Object.fromEntries(Object.entries(enc.stats()).map(([k, v]) => [`page.${k}`, v])) }),
  };
}

export interface AdaptiveDecoderInit {
  pageCodec: PageCodec;
  /** Blob codecs the decoder accepts, by id. */
  compressors?: readonly BlobCodec[];
  /** Most pages per part (default MAX_BATCH_PAGES). */
  maxPages?: number;
}

export function adaptiveDecoder(init: AdaptiveDecoderInit): AdaptiveDecoder {
  const dec: PageDecoder = init.pageCodec.createDecoder();
  const blobs = new Map((init.compressors ?? []).map((c) => [c.id, c]));
  let pages = 0;
  return {
    decodeParts(parts, pageFor) {
      let n = 0;
      for (const part of parts) {
        let packed = part.bytes;
        if (part.blobCodecId !== RAW_CODEC_ID) {
          const c = blobs.get(part.blobCodecId);
          if (!c) codecFail(CodecErrorCode.UNKNOWN, `no blob codec with id ${part.blobCodecId}`);
          packed = c.decompress(part.bytes);
        }
        const b = unpackBatch(packed, { maxPages: init.maxPages });
        for (let k = 0; k < b.count; k++) {
          decodeOne(dec, b.indices[k], b.codecIds[k], b.bytes.subarray(b.offsets[k], b.offsets[k + 1]), pageFor(b.indices[k]));
          n++;
        }
      }
      pages += n;
      return n;
    },
    stats: () => ({ pages, ...Object.fromEntries(Object.entries(dec.stats()).map(([k, v]) => [`page.${k}`, v])) }),
  };
}

/**
 * ferry dirty-trace files (docs/trace-format.md): a header, then one record per harvest interval
 * holding the pages the guest wrote in it, run-length or raw encoded, whichever is smaller.
 * Encoding and decoding are pure, so the simulator replays a trace from bytes alone; the recorder
 * (src/node/vm/trace.ts) does the file I/O.
 */
import { Bitmap } from '../bitmap.js';
import { FerryError } from '../errors.js';

/** A malformed or truncated trace. `code` is `ERR_TRACE_FORMAT`. */
export class TraceFormatError extends FerryError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_TRACE_FORMAT', message, options);
  }
}

export const TRACE_MAGIC = 'FERRYTR1';
/** Largest header or record payload accepted, bytes. */
export const TRACE_MAX_CHUNK = 64 << 20;

export interface TraceHeader {
  version: 1;
  /** VM name and what ran in it. */
  vm: string;
  guest?: string;
  config?: string;
  pageSize: number;
  /** Bitmap size of every record: the VM's page ceiling. */
  pageCount: number;
  memoryBytes: number;
  /** Requested harvest interval, ms (records carry their real start and end). */
  intervalMs: number;
  /** Wall-clock start, ISO 8601 (informational). */
  startedAt?: string;
}

export interface TraceInterval {
  /** ms since the trace started. */
  startMs: number;
  endMs: number;
  /** Guest pages in use at the harvest. */
  guestPages: number;
  /** Pages written during [startMs, endMs). */
  dirty: Bitmap;
}

export interface Trace {
  header: TraceHeader;
  intervals: TraceInterval[];
}

const ENC_RAW = 0;
const ENC_RLE = 1;
const REC_INTERVAL = 1;

const te = new TextEncoder();
const td = new TextDecoder();

export function encodeTraceHeader(h: TraceHeader): Uint8Array {
  const json = te.encode(JSON.stringify(h));
  const out = new Uint8Array(8 + 4 + json.length);
  out.set(te.encode(TRACE_MAGIC), 0);
  new DataView(out.buffer).setUint32(8, json.length, true);
  out.set(json, 12);
  return out;
}

/** Run lengths of the bitmap's first `n` bits, alternating clear/set and starting with clear, as LEB128 varints. */
export function encodeRuns(bm: Bitmap, n: number): Uint8Array {
  const out: number[] = [];
  const put = (v: number) => {
    while (v >= 0x80) {
      out.push((v & 0x7f) | 0x80);
      v = Math.floor(v / 128);
    }
    out.push(v);
  };
  const w = bm.words;
  let p = 0;
  let want = 0;
  while (p < n) {
    let q = p;
    // Skip whole words quickly when they are uniform.
    while (q < n) {
      if ((q & 31) === 0 && q + 32 <= n && w[q >>> 5] === (want ? 0xffffffff : 0)) {
        q += 32;
        continue;
      }
      if (((w[q >>> 5] >>> (q & 31)) & 1) !== want) break;
      q++;
    }
    put(q - p);
    p = q;
    want ^= 1;
  }
  return Uint8Array.from(out);
}

export function decodeRuns(bytes: Uint8Array, n: number, size: number): Bitmap {
  const bm = new Bitmap(size);
  let i = 0;
  let p = 0;
  let set = false;
  while (i < bytes.length) {
    let v = 0;
    let mul = 1;
    for (;;) {
      if (i >= bytes.length) throw new TraceFormatError('run-length payload ends inside a varint');
      const b = bytes[i++];
      v += (b & 0x7f) * mul;
      if (b < 0x80) break;
      mul *= 128;
      if (mul > 2 ** 35) throw new TraceFormatError('run-length varint too long');
    }
    if (p + v > n) throw new TraceFormatError(`run-length payload covers ${p + v} pages, more than ${n}`);
    if (set) bm.setRange(p, p + v);
    p += v;
    set = !set;
  }
  return bm;
}

export function encodeTraceRecord(iv: TraceInterval): Uint8Array {
  const n = Math.min(iv.guestPages, iv.dirty.size);
  const rle = encodeRuns(iv.dirty, n);
  const rawWords = Math.ceil(n / 32);
  const useRaw = rawWords * 4 < rle.length;
  const payload = useRaw ? new Uint8Array(iv.dirty.words.buffer.slice(iv.dirty.words.byteOffset, iv.dirty.words.byteOffset + rawWords * 4)) : rle;
  const out = new Uint8Array(1 + 8 + 8 + 4 + 1 + 4 + payload.length);
  const dv = new DataView(out.buffer);
  out[0] = REC_INTERVAL;
  dv.setFloat64(1, iv.startMs, true);
  dv.setFloat64(9, iv.endMs, true);
  dv.setUint32(17, n, true);
  out[21] = useRaw ? ENC_RAW : ENC_RLE;
  dv.setUint32(22, payload.length, true);
  out.set(payload, 26);
  return out;
}

/** Parses a whole trace file. Throws {@link TraceFormatError} on anything malformed or truncated. */
export function decodeTrace(bytes: Uint8Array): Trace {
  if (bytes.length < 12 || td.decode(bytes.subarray(0, 8)) !== TRACE_MAGIC) throw new TraceFormatError(`not a ferry trace (magic ${TRACE_MAGIC} missing)`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const hl = dv.getUint32(8, true);
  if (hl > TRACE_MAX_CHUNK || 12 + hl > bytes.length) throw new TraceFormatError(`trace header of ${hl} bytes is truncated or too large`);
  let header: TraceHeader;
  try {
    header = JSON.parse(td.decode(bytes.subarray(12, 12 + hl))) as TraceHeader;
  } catch (e) {
    throw new TraceFormatError('trace header is not JSON', { cause: e });
  }
  if (header.version !== 1 || !(header.pageCount >= 0) || !(header.pageSize > 0)) throw new TraceFormatError(`unsupported trace header (version ${String(header.version)})`);
  const intervals: TraceInterval[] = [];
  let o = 12 + hl;
  while (o < bytes.length) {
    if (o + 26 > bytes.length) throw new TraceFormatError(`trace truncated in a record header at byte ${o}`);
    if (bytes[o] !== REC_INTERVAL) throw new TraceFormatError(`unknown record type ${bytes[o]} at byte ${o}`);
    const startMs = dv.getFloat64(o + 1, true);
    const endMs = dv.getFloat64(o + 9, true);
    const n = dv.getUint32(o + 17, true);
    const enc = bytes[o + 21];
    const len = dv.getUint32(o + 22, true);
    if (n > header.pageCount) throw new TraceFormatError(`record at byte ${o} covers ${n} pages, more than the header's ${header.pageCount}`);
    if (len > TRACE_MAX_CHUNK || o + 26 + len > bytes.length) throw new TraceFormatError(`trace truncated in a record payload at byte ${o}`);
    if (!(endMs >= startMs)) throw new TraceFormatError(`record at byte ${o} ends (${endMs} ms) before it starts (${startMs} ms)`);
    const payload = bytes.subarray(o + 26, o + 26 + len);
    let dirty: Bitmap;
    if (enc === ENC_RLE) dirty = decodeRuns(payload, n, header.pageCount);
    else if (enc === ENC_RAW) {
      if (len !== Math.ceil(n / 32) * 4) throw new TraceFormatError(`raw record at byte ${o} has ${len} bytes for ${n} pages`);
      dirty = new Bitmap(header.pageCount);
      const words = new Uint32Array(payload.slice().buffer);
      dirty.words.set(words.subarray(0, Math.min(words.length, dirty.words.length)));
      // Bits past the record's page count in its last word are not part of it.
      if (n & 31) dirty.words[n >>> 5] &= (1 << (n & 31)) - 1;
    } else throw new TraceFormatError(`unknown record encoding ${enc} at byte ${o}`);
    intervals.push({ startMs, endMs, guestPages: n, dirty });
    o += 26 + len;
  }
  return { header, intervals };
}

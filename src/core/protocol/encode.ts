/**
 * Frame encoders. Each returns one Uint8Array holding header + payload, ready to write.
 *
 * Encoders refuse (InvalidArgumentError) values the protocol cannot carry — the same rules the
 * decoder applies — so a frame we send is a frame a conforming peer accepts (configurable decoder
 * limits aside: those are the peer's business).
 */
import { InvalidArgumentError } from '../errors.js';
import {
  DIGEST_ALGORITHMS, FAULT_WAITS_BYTES, FIRST_CODEC_ID, FLAG_PAGES_DEMAND, FrameTypeId, GLOBAL_TYPE_IDS, HEADER_BYTES, HELLO_MAGIC,
  MAX_CODECS, MAX_CONFIG_BYTES, MAX_ERROR_CODE_BYTES, MAX_MESSAGE_BYTES, MAX_NAME_BYTES,
  MAX_PAGE_SIZE, MAX_STREAMS, MIN_PAGE_SIZE, MIGRATION_MODES, MODE_BITS, Encoding, PAGE_HEAD_BYTES, SESSION_TOKEN_BYTES, STREAM_ROLES, pagePadding, runHeadBytes,
  type AckFrame, type BatchFrame, type JoinFrame, type CancelFrame, type CodecOffer, type CompleteFrame, type Digest, type ErrorFrame, type Frame,
  type FrameType, type HelloAckFrame, type HelloFrame, type ModuleFrame, type PageRequestFrame, type PagesFrame,
  type PingFrame, type PongFrame, type PushDoneFrame, type ResumedFrame, type RoundEndFrame, type StateFrame,
  type SwitchoverFrame, type WireBitmap, type WireGlobal, type FrameBody, type RunFrame,
} from './frames.js';
import { PAGE_SIZE } from '../pages.js';

const utf8 = new TextEncoder();
export const ERROR_CODE_RE = /^ERR_[A-Z0-9_]{1,60}$/;
export const CODEC_NAME_RE = /^[a-z0-9.-]{1,32}$/;
const HEX_RE = /^[0-9a-f]*$/;

function bad(message: string): never {
  throw new InvalidArgumentError(message);
}

function checkU32(value: number, what: string): number {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) bad(`${what} must be a u32, got ${value}`);
  return value;
}

/** Growable little-endian writer. Sized up front by the caller where it can be. */
class Writer {
  buf: Uint8Array;
  view: DataView;
  pos = HEADER_BYTES;
  constructor(capacity: number) {
    this.buf = new Uint8Array(Math.max(capacity, HEADER_BYTES + 16));
    this.view = new DataView(this.buf.buffer);
  }
  private need(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    const next = new Uint8Array(Math.max(this.buf.length * 2, this.pos + n));
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }
  u8(v: number): void { this.need(1); this.view.setUint8(this.pos, v); this.pos += 1; }
  u16(v: number): void { this.need(2); this.view.setUint16(this.pos, v, true); this.pos += 2; }
  u32(v: number): void { this.need(4); this.view.setUint32(this.pos, v, true); this.pos += 4; }
  u64(v: number | bigint): void { this.need(8); this.view.setBigUint64(this.pos, BigInt(v), true); this.pos += 8; }
  i64(v: bigint): void { this.need(8); this.view.setBigInt64(this.pos, v, true); this.pos += 8; }
  f64(v: number): void { this.need(8); this.view.setFloat64(this.pos, v, true); this.pos += 8; }
  bytes(b: Uint8Array): void { this.need(b.length); this.buf.set(b, this.pos); this.pos += b.length; }
  /** u16 length + UTF-8. */
  str16(s: string, max: number, what: string): void {
    const b = utf8.encode(s);
    if (b.length > max) bad(`${what} is ${b.length} bytes (limit ${max})`);
    this.u16(b.length);
    this.bytes(b);
  }
  /** u32 length + UTF-8. */
  str32(s: string, max: number, what: string): void {
    const b = utf8.encode(s);
    if (b.length > max) bad(`${what} is ${b.length} bytes (limit ${max})`);
    this.u32(b.length);
    this.bytes(b);
  }
  finish(type: FrameType, flags = 0): Uint8Array {
    const length = this.pos - HEADER_BYTES;
    this.view.setUint32(0, length, true);
    this.view.setUint8(4, FrameTypeId[type]);
    this.view.setUint8(5, flags);
    this.view.setUint16(6, 0, true);
    return this.pos === this.buf.length ? this.buf : this.buf.subarray(0, this.pos);
  }
}

function hexToBytes(hex: string, bytes: number, what: string): Uint8Array {
  if (hex.length !== bytes * 2 || !HEX_RE.test(hex)) bad(`${what} must be ${bytes * 2} lowercase hex digits`);
  const out = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) out[i] = parseInt(hex.slice(i * 2, i * 2 + 2), 16);
  return out;
}

function writeCodecs(w: Writer, codecs: CodecOffer[]): void {
  if (codecs.length > MAX_CODECS) bad(`${codecs.length} codecs (limit ${MAX_CODECS})`);
  const seen = new Set<number>();
  w.u8(codecs.length);
  for (const c of codecs) {
    if (!Number.isInteger(c.id) || c.id < FIRST_CODEC_ID || c.id > 255 || seen.has(c.id)) bad(`codec id ${c.id} is not a free id in ${FIRST_CODEC_ID}..255`);
    if (!CODEC_NAME_RE.test(c.name)) bad(`codec name '${c.name}' must match ${CODEC_NAME_RE}`);
    seen.add(c.id);
    w.u8(c.id);
    w.u8(c.name.length);
    w.bytes(utf8.encode(c.name));
  }
}

function writeDigest(w: Writer, digest: Digest | null): void {
  if (digest === null) { w.u8(0); w.u8(0); return; }
  const alg = DIGEST_ALGORITHMS[digest.algorithm];
  if (!alg) bad(`unknown digest algorithm ${String(digest.algorithm)}`);
  w.u8(alg.id);
  w.u8(alg.bytes);
  w.bytes(hexToBytes(digest.hex, alg.bytes, 'digest'));
}

export function encodeHello(f: Omit<HelloFrame, 'type'>): Uint8Array {
  const w = new Writer(256 + f.config.length * 3);
  if (!Number.isInteger(f.minVersion) || !Number.isInteger(f.maxVersion) || f.minVersion < 1 || f.maxVersion > 0xffff || f.minVersion > f.maxVersion) {
    bad(`version range ${f.minVersion}..${f.maxVersion} is invalid`);
  }
  w.bytes(HELLO_MAGIC);
  w.u16(f.minVersion);
  w.u16(f.maxVersion);
  if (f.vmName.length === 0) bad('vm name is empty');
  w.str16(f.vmName, MAX_NAME_BYTES, 'vm name');
  if (!Number.isSafeInteger(f.memoryBytes) || f.memoryBytes <= 0) bad(`memoryBytes ${f.memoryBytes} is not a positive integer`);
  if (!Number.isSafeInteger(f.guestBytes) || f.guestBytes < 0 || f.guestBytes > f.memoryBytes) bad(`guestBytes ${f.guestBytes} is not within 0..memoryBytes`);
  w.u64(f.memoryBytes);
  w.u64(f.guestBytes);
  if (!isValidPageSize(f.pageSize)) bad(`page size ${f.pageSize} is not a power of two in ${MIN_PAGE_SIZE}..${MAX_PAGE_SIZE}`);
  w.u32(f.pageSize);
  w.bytes(hexToBytes(f.moduleSha256, 32, 'module sha256'));
  w.u32(checkU32(f.moduleBytes, 'moduleBytes'));
  w.str32(f.config, MAX_CONFIG_BYTES, 'config');
  let modes = 0;
  for (const m of f.offer.modes) {
    if (!(m in MODE_BITS)) bad(`unknown mode ${m}`);
    modes |= MODE_BITS[m];
  }
  if (modes === 0) bad('no migration mode offered');
  w.u8(modes);
  if (!Number.isInteger(f.offer.maxStreams) || f.offer.maxStreams < 1 || f.offer.maxStreams > MAX_STREAMS) bad(`maxStreams ${f.offer.maxStreams} is not in 1..${MAX_STREAMS}`);
  w.u16(f.offer.maxStreams);
  writeCodecs(w, f.offer.codecs);
  w.str16(f.gang ?? '', MAX_NAME_BYTES, 'gang');
  w.str16(f.guest ?? '', MAX_NAME_BYTES, 'guest');
  return w.finish('HELLO');
}

/** `s` cut to at most `maxBytes` bytes of UTF-8, at a character's boundary (for a name field that may be longer). */
export function clipUtf8(s: string, maxBytes: number): string {
  // encodeInto writes whole characters only and says how much of `s` it took.
  return s.slice(0, utf8.encodeInto(s, new Uint8Array(maxBytes)).read);
}

export function isValidPageSize(n: number): boolean {
  return Number.isInteger(n) && n >= MIN_PAGE_SIZE && n <= MAX_PAGE_SIZE && (n & (n - 1)) === 0;
}

export function encodeHelloAck(f: FrameBody<HelloAckFrame>): Uint8Array {
  const w = new Writer(128);
  if (f.accepted) {
    w.u8(1);
    if (!Number.isInteger(f.version) || f.version < 1 || f.version > 0xffff) bad(`version ${f.version} is invalid`);
    w.u16(f.version);
    if (!MIGRATION_MODES.includes(f.mode)) bad(`unknown mode ${f.mode}`);
    w.u8(MODE_BITS[f.mode]);
    if (!Number.isInteger(f.streams) || f.streams < 1 || f.streams > MAX_STREAMS) bad(`streams ${f.streams} is not in 1..${MAX_STREAMS}`);
    w.u16(f.streams);
    writeCodecs(w, f.codecs);
    if (f.token === undefined) w.u8(0);
    else {
      w.u8(SESSION_TOKEN_BYTES);
      w.bytes(hexToBytes(f.token, SESSION_TOKEN_BYTES, 'session token'));
    }
    if (f.faultPort !== undefined && (!Number.isInteger(f.faultPort) || f.faultPort < 1 || f.faultPort > 0xffff)) bad(`fault port ${f.faultPort} is not in 1..65535`);
    if (f.faultPort !== undefined && f.token === undefined) bad('a fault port needs a session token (its JOIN presents it)');
    w.u16(f.faultPort ?? 0);
  } else {
    w.u8(0);
    if (!ERROR_CODE_RE.test(f.code)) bad(`error code '${f.code}' must match ${ERROR_CODE_RE}`);
    w.str16(f.code, MAX_ERROR_CODE_BYTES, 'error code');
    w.str16(f.message, MAX_MESSAGE_BYTES, 'message');
  }
  return w.finish('HELLO_ACK');
}

export function encodeModule(f: Omit<ModuleFrame, 'type'>): Uint8Array {
  checkU32(f.totalBytes, 'totalBytes');
  checkU32(f.offset, 'offset');
  if (f.offset + f.chunk.length > f.totalBytes) bad(`module chunk ${f.offset}+${f.chunk.length} runs past ${f.totalBytes}`);
  const w = new Writer(HEADER_BYTES + 8 + f.chunk.length);
  w.u32(f.totalBytes);
  w.u32(f.offset);
  w.bytes(f.chunk);
  return w.finish('MODULE');
}

/** PAGES. `pageSize` is checked against RAW pages (default: the data length must match). */
export function encodePages(f: Omit<PagesFrame, 'type'>, pageSize?: number): Uint8Array {
  checkU32(f.seq, 'seq');
  if (f.pages.length === 0) bad('a PAGES batch needs at least one page');
  let size = HEADER_BYTES + 8;
  for (const p of f.pages) size += PAGE_HEAD_BYTES + p.data.length + pagePadding(p.data.length);
  const w = new Writer(size);
  w.u32(f.seq);
  w.u32(f.pages.length);
  for (const p of f.pages) {
    checkU32(p.index, 'page index');
    if (!Number.isInteger(p.encoding) || p.encoding < 0 || p.encoding > 255) bad(`encoding ${p.encoding} is not a byte`);
    if (p.encoding === Encoding.ZERO && p.data.length !== 0) bad(`zero page ${p.index} carries ${p.data.length} bytes`);
    if (p.encoding === Encoding.RAW && pageSize !== undefined && p.data.length !== pageSize) bad(`raw page ${p.index} is ${p.data.length} bytes, not ${pageSize}`);
    w.u32(p.index);
    w.u32(p.encoding); // u8 encoding + 3 zero bytes
    w.u32(p.data.length);
    w.u32(0);
    w.bytes(p.data);
    for (let i = pagePadding(p.data.length); i > 0; i--) w.u8(0);
  }
  return w.finish('PAGES', f.demand ? FLAG_PAGES_DEMAND : 0);
}

/**
 * Builds one PAGES frame in place, so a sender can copy each page straight from guest memory
 * into the frame (one copy instead of two; the page's bytes are 8-byte aligned in the buffer, so
 * the copy moves whole words). Produces exactly the bytes {@link encodePages} would.
 */
export class PagesFrameBuilder {
  private readonly buf: Uint8Array;
  private readonly view: DataView;
  private pos = HEADER_BYTES + 8;
  private n = 0;

  constructor(readonly maxPages: number, readonly pageSize: number) {
    if (!Number.isInteger(maxPages) || maxPages < 1) bad(`a PAGES builder needs room for at least one page, got ${maxPages}`);
    if (!Number.isInteger(pageSize) || pageSize < 8 || pageSize % 8 !== 0) bad(`a PAGES builder needs a page size that is a multiple of 8, got ${pageSize}`);
    this.buf = new Uint8Array(HEADER_BYTES + 8 + maxPages * (PAGE_HEAD_BYTES + pageSize));
    this.view = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
  }

  get count(): number { return this.n; }
  get full(): boolean { return this.n >= this.maxPages; }
  /** Bytes the frame occupies so far. */
  get byteLength(): number { return this.pos; }

  private head(index: number, encoding: number, length: number): void {
    if (this.full) bad('PAGES builder is full');
    checkU32(index, 'page index');
    this.view.setUint32(this.pos, index, true);
    this.view.setUint32(this.pos + 4, encoding, true); // u8 encoding + 3 zero bytes
    this.view.setUint32(this.pos + 8, length, true);
    this.view.setUint32(this.pos + 12, 0, true);
    this.pos += PAGE_HEAD_BYTES;
    this.n++;
  }

  /** Adds a raw page and returns the bytes to fill with its content. */
  addRaw(index: number): Uint8Array {
    this.head(index, Encoding.RAW, this.pageSize);
    const at = this.pos;
    this.pos += this.pageSize;
    return this.buf.subarray(at, at + this.pageSize);
  }

  addZero(index: number): void {
    this.head(index, Encoding.ZERO, 0);
  }

  /** The finished frame (a view of the builder's buffer; the builder is spent). */
  finish(seq: number, demand: boolean): Uint8Array {
    if (this.n === 0) bad('a PAGES batch needs at least one page');
    this.view.setUint32(HEADER_BYTES, checkU32(seq, 'seq'), true);
    this.view.setUint32(HEADER_BYTES + 4, this.n, true);
    this.view.setUint32(0, this.pos - HEADER_BYTES, true);
    this.view.setUint8(4, FrameTypeId.PAGES);
    this.view.setUint8(5, demand ? FLAG_PAGES_DEMAND : 0);
    this.view.setUint16(6, 0, true);
    return this.buf.subarray(0, this.pos);
  }
}

/** A PAGES frame of zero pages only (16 bytes a page, no data), as {@link encodePages} would make it. */
export function encodeZeroPages(seq: number, demand: boolean, indices: ArrayLike<number>, count = indices.length): Uint8Array {
  if (count < 1) bad('a PAGES batch needs at least one page');
  const w = new Writer(HEADER_BYTES + 8 + count * PAGE_HEAD_BYTES);
  w.u32(checkU32(seq, 'seq'));
  w.u32(count);
  for (let i = 0; i < count; i++) {
    w.u32(checkU32(indices[i], 'page index'));
    w.u32(Encoding.ZERO);
    w.u32(0);
    w.u32(0);
  }
  return w.finish('PAGES', demand ? FLAG_PAGES_DEMAND : 0);
}

export function encodeJoin(f: Omit<JoinFrame, 'type'>): Uint8Array {
  const w = new Writer(HEADER_BYTES + SESSION_TOKEN_BYTES + 3);
  w.bytes(hexToBytes(f.token, SESSION_TOKEN_BYTES, 'session token'));
  const role = STREAM_ROLES[f.role];
  if (role === undefined) bad(`unknown stream role ${String(f.role)}`);
  if (!Number.isInteger(f.stream) || (f.role === 'data' ? f.stream < 1 || f.stream >= MAX_STREAMS : f.stream !== 0)) bad(`${f.role} stream ${f.stream} is out of range`);
  w.u16(f.stream);
  w.u8(role);
  return w.finish('JOIN');
}

/** Header + fixed fields of a BATCH frame, in front of `data` bytes (see {@link encodeBatchFrame}). */
export const BATCH_HEAD_BYTES = HEADER_BYTES + 13;

/**
 * BATCH. With `into` (a buffer whose bytes from BATCH_HEAD_BYTES on already hold `data`), the
 * header is written in place and no copy is made.
 */
export function encodeBatchFrame(f: Omit<BatchFrame, 'type'>, into?: Uint8Array): Uint8Array {
  checkU32(f.seq, 'seq');
  if (!Number.isInteger(f.blobCodec) || f.blobCodec < 0 || f.blobCodec > 255 || f.blobCodec === Encoding.ZERO) bad(`blob codec ${f.blobCodec} is not 0 or a codec id`);
  if (!Number.isInteger(f.pages) || f.pages < 1) bad(`a BATCH needs at least one page, got ${f.pages}`);
  checkU32(f.pages, 'pages');
  const buf = into ?? new Uint8Array(BATCH_HEAD_BYTES + f.data.length);
  if (!into) buf.set(f.data, BATCH_HEAD_BYTES);
  else if (buf.length !== BATCH_HEAD_BYTES + f.data.length) bad('BATCH buffer does not match its data');
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  v.setUint32(0, buf.length - HEADER_BYTES, true);
  v.setUint8(4, FrameTypeId.BATCH);
  v.setUint8(5, f.demand ? FLAG_PAGES_DEMAND : 0);
  v.setUint16(6, 0, true);
  v.setUint32(HEADER_BYTES, f.seq, true);
  v.setUint8(HEADER_BYTES + 4, f.blobCodec);
  v.setUint32(HEADER_BYTES + 5, f.pages, true);
  v.setUint32(HEADER_BYTES + 9, 0, true);
  return buf;
}

export function encodeRoundEnd(f: Omit<RoundEndFrame, 'type'>): Uint8Array {
  const w = new Writer(HEADER_BYTES + 12);
  w.u32(checkU32(f.round, 'round'));
  w.u32(checkU32(f.pages, 'pages'));
  w.u32(checkU32(f.dirty, 'dirty'));
  return w.finish('ROUND_END');
}

function writeBitmap(w: Writer, bm: WireBitmap): void {
  checkU32(bm.size, 'bitmap size');
  const words = Math.ceil(bm.size / 32);
  if (bm.words.length !== words) bad(`bitmap of ${bm.size} bits needs ${words} words, got ${bm.words.length}`);
  const tail = bm.size & 31;
  if (tail && words > 0 && (bm.words[words - 1] >>> tail) !== 0) bad('bitmap has bits set past its size');
  w.u32(bm.size);
  for (let i = 0; i < words; i++) w.u32(bm.words[i]);
}

function writeGlobal(w: Writer, g: WireGlobal): void {
  w.u8(GLOBAL_TYPE_IDS[g.type]);
  switch (g.type) {
    case 'i32':
      if (!Number.isInteger(g.value) || g.value < -(2 ** 31) || g.value > 2 ** 31 - 1) bad(`i32 global ${g.value} out of range`);
      w.u32(g.value >>> 0);
      break;
    case 'i64':
      if (BigInt.asIntN(64, g.value) !== g.value) bad(`i64 global ${g.value} out of range`);
      w.i64(g.value);
      break;
    case 'f32':
      w.u32(checkU32(g.bits, 'f32 bits'));
      break;
    case 'f64':
      if (BigInt.asUintN(64, g.bits) !== g.bits) bad(`f64 bits ${g.bits} out of range`);
      w.u64(g.bits);
      break;
    default:
      bad(`unknown global type ${(g as { type: string }).type}`);
  }
}

export function encodeState(f: Omit<StateFrame, 'type'>): Uint8Array {
  if (!Number.isSafeInteger(f.guestBytes) || f.guestBytes < 0) bad(`guestBytes ${f.guestBytes} is invalid`);
  if (typeof f.devices !== 'object' || f.devices === null || Array.isArray(f.devices)) bad('device state must be a JSON object');
  const json = utf8.encode(JSON.stringify(f.devices));
  const w = new Writer(HEADER_BYTES + 32 + f.globals.length * 9 + json.length + f.soft.words.length * 4);
  w.u64(f.guestBytes);
  w.u32(checkU32(f.globals.length, 'global count'));
  for (const g of f.globals) writeGlobal(w, g);
  w.u32(json.length);
  w.bytes(json);
  writeBitmap(w, f.soft);
  return w.finish('STATE');
}

export function encodeSwitchover(f: Omit<SwitchoverFrame, 'type'>): Uint8Array {
  const w = new Writer(HEADER_BYTES + 44 + f.stale.words.length * 4);
  w.u32(checkU32(f.pagesRemaining, 'pagesRemaining'));
  writeDigest(w, f.digest);
  writeBitmap(w, f.stale);
  return w.finish('SWITCHOVER');
}

export function encodeResumed(f: Omit<ResumedFrame, 'type'>): Uint8Array {
  const w = new Writer(HEADER_BYTES + 4);
  w.u32(checkU32(f.pagesMissing, 'pagesMissing'));
  return w.finish('RESUMED');
}

export function encodeAck(f: Omit<AckFrame, 'type'>): Uint8Array {
  const id = FrameTypeId[f.acked];
  if (id === undefined) bad(`unknown frame type ${f.acked}`);
  const w = new Writer(HEADER_BYTES + 5);
  w.u8(id);
  w.u32(checkU32(f.value, 'ack value'));
  return w.finish('ACK');
}

export function encodePageRequest(f: Omit<PageRequestFrame, 'type'>): Uint8Array {
  if (f.pages.length === 0) bad('a PAGE_REQUEST needs at least one page');
  const w = new Writer(HEADER_BYTES + 8 + f.pages.length * 4);
  w.u32(checkU32(f.id, 'request id'));
  w.u32(f.pages.length);
  for (const p of f.pages) w.u32(checkU32(p, 'page index'));
  return w.finish('PAGE_REQUEST');
}

export function encodePushDone(f: Omit<PushDoneFrame, 'type'>): Uint8Array {
  const w = new Writer(HEADER_BYTES + 4);
  w.u32(checkU32(f.pagesSent, 'pagesSent'));
  return w.finish('PUSH_DONE');
}

export function encodeComplete(f: Omit<CompleteFrame, 'type'>): Uint8Array {
  const w = new Writer(HEADER_BYTES + 40 + 1 + FAULT_WAITS_BYTES);
  writeDigest(w, f.digest);
  const s = f.faultWaits;
  w.u8(s ? 1 : 0);
  if (s) {
    checkU32(s.count, 'fault count');
    if (s.count < 1) bad('a fault-wait summary counts at least one fault');
    const times = [s.meanMs, s.p50Ms, s.p99Ms, s.maxMs];
    if (!times.every((t) => Number.isFinite(t) && t >= 0)) bad(`fault-wait times must be finite and ≥ 0, got ${times.join(', ')}`);
    if (!(s.p50Ms <= s.p99Ms && s.p99Ms <= s.maxMs)) bad(`fault-wait percentiles must rise: p50 ${s.p50Ms}, p99 ${s.p99Ms}, max ${s.maxMs}`);
    w.u32(s.count);
    for (const t of times) w.f64(t);
  }
  return w.finish('COMPLETE');
}

export function encodeError(f: Omit<ErrorFrame, 'type'>): Uint8Array {
  if (!ERROR_CODE_RE.test(f.code)) bad(`error code '${f.code}' must match ${ERROR_CODE_RE}`);
  const w = new Writer(HEADER_BYTES + 8 + f.code.length + f.message.length * 3);
  w.str16(f.code, MAX_ERROR_CODE_BYTES, 'error code');
  w.str16(f.message, MAX_MESSAGE_BYTES, 'message');
  return w.finish('ERROR');
}

export function encodeCancel(f: Omit<CancelFrame, 'type'>): Uint8Array {
  const w = new Writer(HEADER_BYTES + 2 + f.reason.length * 3);
  w.str16(f.reason, MAX_MESSAGE_BYTES, 'cancel reason');
  return w.finish('CANCEL');
}

function encodePingPong(type: 'PING' | 'PONG', f: { seq: number; time: number }): Uint8Array {
  if (!Number.isFinite(f.time)) bad(`${type} time ${f.time} is not finite`);
  const w = new Writer(HEADER_BYTES + 12);
  w.u32(checkU32(f.seq, 'seq'));
  w.f64(f.time);
  return w.finish(type);
}

export function encodePing(f: Omit<PingFrame, 'type'>): Uint8Array {
  return encodePingPong('PING', f);
}

export function encodePong(f: Omit<PongFrame, 'type'>): Uint8Array {
  return encodePingPong('PONG', f);
}

/**
 * The header and head of a RUN frame whose extents' page data follow it on the wire (the sender
 * writes them from wherever they are, e.g. straight from guest memory). Checks what the decoder
 * checks: 1 … n extents, ascending, not overlapping, each at least one page.
 */
export function encodeRunHead(seq: number, extents: readonly { first: number; count: number }[], pageSize: number): Uint8Array {
  checkU32(seq, 'seq');
  if (extents.length === 0) bad('a RUN needs at least one extent');
  if (!isValidPageSize(pageSize)) bad(`page size ${pageSize} is not a power of two in 512..65536`);
  let pages = 0;
  let end = 0;
  for (const e of extents) {
    checkU32(e.first, 'extent first page');
    if (!Number.isInteger(e.count) || e.count < 1 || e.first + e.count > 0x1_0000_0000) bad(`extent of ${e.count} pages at ${e.first} is empty or past page 2^32`);
    if (e.first < end) bad(`extent at page ${e.first} overlaps or precedes the one before (which ends at ${end})`);
    end = e.first + e.count;
    pages += e.count;
  }
  const length = runHeadBytes(extents.length) + pages * pageSize;
  if (length > 0xffffffff) bad(`RUN of ${pages} pages is too long for one frame`);
  const w = new Writer(HEADER_BYTES + runHeadBytes(extents.length));
  w.u32(seq);
  w.u32(extents.length);
  for (const e of extents) {
    w.u32(e.first);
    w.u32(e.count);
  }
  const buf = w.finish('RUN');
  new DataView(buf.buffer, buf.byteOffset).setUint32(0, length, true);
  return buf;
}

/** RUN with its page data, as one buffer (tests, tools; a sender writes the head and the data apart). */
export function encodeRun(f: Omit<RunFrame, 'type'>, pageSize: number): Uint8Array {
  const head = encodeRunHead(f.seq, f.extents, pageSize);
  let size = head.length;
  for (const e of f.extents) {
    if (!e.data || e.data.length !== e.count * pageSize) bad(`extent at page ${e.first} needs ${e.count * pageSize} bytes of data`);
    size += e.data.length;
  }
  const out = new Uint8Array(size);
  out.set(head);
  let at = head.length;
  for (const e of f.extents) {
    out.set(e.data!, at);
    at += e.data!.length;
  }
  return out;
}

/** Encodes any frame. `pageSize` (optional) is checked against RAW pages in PAGES frames (RUN: default PAGE_SIZE). */
export function encodeFrame(frame: Frame, pageSize?: number): Uint8Array {
  switch (frame.type) {
    case 'HELLO': return encodeHello(frame);
    case 'HELLO_ACK': return encodeHelloAck(frame);
    case 'MODULE': return encodeModule(frame);
    case 'PAGES': return encodePages(frame, pageSize);
    case 'ROUND_END': return encodeRoundEnd(frame);
    case 'STATE': return encodeState(frame);
    case 'SWITCHOVER': return encodeSwitchover(frame);
    case 'RESUMED': return encodeResumed(frame);
    case 'ACK': return encodeAck(frame);
    case 'PAGE_REQUEST': return encodePageRequest(frame);
    case 'PUSH_DONE': return encodePushDone(frame);
    case 'COMPLETE': return encodeComplete(frame);
    case 'ERROR': return encodeError(frame);
    case 'CANCEL': return encodeCancel(frame);
    case 'PING': return encodePing(frame);
    case 'PONG': return encodePong(frame);
    case 'JOIN': return encodeJoin(frame);
    case 'BATCH': return encodeBatchFrame(frame);
    case 'RUN': return encodeRun(frame, pageSize ?? PAGE_SIZE);
    default: return bad(`unknown frame type ${(frame as { type: string }).type}`);
  }
}

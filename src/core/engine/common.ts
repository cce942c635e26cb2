/**
 * Pieces both migration sessions use: the frame inbox, the memory digest, bitmap conversions.
 */
import { Bitmap, popcount32 } from '../bitmap.js';
import { BugIndicatingError, FerryError, ProtocolError } from '../errors.js';
import { PAGE_SIZE } from '../pages.js';
import { FrameDecoder } from '../protocol/decoder.js';
import { PagesFrameBuilder, encodeFrame } from '../protocol/encode.js';
import type { Frame, FrameType, WireBitmap } from '../protocol/frames.js';
import type { FramedConnection } from '../transport/framed.js';

/** The peer sent ERROR: its code and message, verbatim. */
export class RemoteMigrationError extends FerryError {}

export class MigrationError extends FerryError {}

type FrameOf<T extends FrameType> = Extract<Frame, { type: T }>;

/**
 * Reads every incoming frame in one task and hands them out by type, so a session can wait for
 * "the next ACK" while page requests are handled as they come. PING is answered here. An ERROR
 * from the peer, a protocol violation or the end of the stream fails every waiter.
 */
export class Inbox {
  private readonly queues = new Map<FrameType, Frame[]>();
  private readonly waiters = new Map<FrameType, { resolve: (f: Frame) => void; reject: (e: Error) => void }[]>();
  private failure: Error | null = null;
  private readonly handlers = new Map<FrameType, (f: Frame) => void>();
  /** Set while the consumer of this connection's pages is behind (see {@link pause}). */
  private held: { promise: Promise<void>; release: () => void } | null = null;
  readonly done: Promise<void>;

  /** `onFail` hears the first failure (peer error, protocol violation, end of stream). */
  constructor(private readonly framed: FramedConnection, private readonly onFail?: (e: Error) => void) {
    this.done = this.pump();
  }

  /** Frames of this type go to `fn` instead of the queue (e.g. PAGE_REQUEST, PAGES). */
  on<T extends FrameType>(type: T, fn: (f: FrameOf<T>) => void): void {
    this.handlers.set(type, fn as (f: Frame) => void);
    const queued = this.queues.get(type);
    if (queued) {
      this.queues.delete(type);
      for (const f of queued) fn(f as FrameOf<T>);
    }
  }

  /**
   * Stops reading until {@link resume}: the consumer has as many frames as it can hold. The
   * connection's own backpressure then reaches the peer (TCP: the receive window closes), so
   * frames wait in the kernel instead of in freshly allocated buffers here, and the event loop
   * stays free for what must not wait (a post-copy demand page on another connection).
   */
  pause(): void {
    if (this.held || this.failure) return;
    let release!: () => void;
    const promise = new Promise<void>((r) => (release = r));
    this.held = { promise, release };
  }

  resume(): void {
    const h = this.held;
    this.held = null;
    h?.release();
  }

  private async pump(): Promise<void> {
    try {
      for (;;) {
        while (this.held) {
          await this.held.promise;
          if (this.failure) return;
        }
        const f = await this.framed.next();
        if (!f) throw new MigrationError('ERR_MIGRATION_PEER_CLOSED', 'the peer closed the migration connection before the migration ended');
        if (f.type === 'ERROR') throw new RemoteMigrationError(f.code, `peer reported: ${f.message}`);
        if (f.type === 'CANCEL') throw new RemoteMigrationError('ERR_MIGRATION_CANCELLED', `peer cancelled the migration: ${f.reason}`);
        if (f.type === 'PING') {
          void this.framed.send({ type: 'PONG', seq: f.seq, time: f.time }).catch(() => undefined);
          continue;
        }
        const h = this.handlers.get(f.type);
        if (h) {
          h(f);
          continue;
        }
        const w = this.waiters.get(f.type)?.shift();
        if (w) w.resolve(f);
        else {
          let q = this.queues.get(f.type);
          if (!q) this.queues.set(f.type, (q = []));
          q.push(f);
        }
      }
    } catch (e) {
      this.fail(e instanceof Error ? e : new Error(String(e)));
    }
  }

  fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    this.resume();
    for (const list of this.waiters.values()) for (const w of list.splice(0)) w.reject(e);
    this.onFail?.(e);
  }

  get error(): Error | null { return this.failure; }

  /** The next frame of `type` (queued or future). */
  next<T extends FrameType>(type: T): Promise<FrameOf<T>> {
    const q = this.queues.get(type);
    if (q?.length) return Promise.resolve(q.shift() as FrameOf<T>);
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      let list = this.waiters.get(type);
      if (!list) this.waiters.set(type, (list = []));
      list.push({ resolve: resolve as (f: Frame) => void, reject });
    });
  }

  /** Waits for an ACK of `acked` with `value`. */
  async ack(acked: FrameType, value: number): Promise<void> {
    const f = await this.next('ACK');
    if (f.acked !== acked || f.value !== value) {
      throw new ProtocolError('ERR_PROTOCOL_SEQUENCE', `expected ACK of ${acked} ${value}, got ACK of ${f.acked} ${f.value}`);
    }
  }
}

export function toWireBitmap(b: Bitmap, size = b.size): WireBitmap {
  const words = new Uint32Array(Math.ceil(size / 32));
  words.set(b.words.subarray(0, words.length));
  const tail = size & 31;
  if (tail && words.length) words[words.length - 1] &= (1 << tail) - 1;
  return { size, words };
}

export function fromWireBitmap(w: WireBitmap, size: number): Bitmap {
  const b = new Bitmap(size);
  b.words.set(w.words.subarray(0, Math.min(w.words.length, b.words.length)));
  const tail = size & 31;
  if (tail && b.words.length) b.words[b.words.length - 1] &= (1 << tail) - 1;
  return b;
}

/**
 * Memory digest: SHA-256 over the 64-bit hash of every guest page in index order, where a soft
 * page (content does not matter) counts as 0. Both sides compute it over memory *as at the
 * pause* — the destination hashes each page as it is installed, before the guest can change it.
 */
export class MemoryDigest {
  private readonly hashes: BigUint64Array;
  readonly pages: number;
  constructor(pages: number, hashes?: BigUint64Array) {
    this.hashes = hashes ?? new BigUint64Array(pages);
    this.pages = this.hashes.length;
  }

  /** A digest over `hashes` as they are (index = page), without a copy. */
  static adopt(hashes: BigUint64Array): MemoryDigest {
    return new MemoryDigest(0, hashes);
  }

  set(page: number, hash: bigint): void {
    this.hashes[page] = hash;
  }

  /** Pages [first, first + count) count as 0 (soft, or not yet here). Beyond the digest's pages: ignored. */
  clearRange(first: number, count: number): void {
    this.hashes.fill(0n, Math.min(first, this.hashes.length), Math.min(first + count, this.hashes.length));
  }

  hex(sha256Hex: (b: Uint8Array) => string): string {
    return sha256Hex(new Uint8Array(this.hashes.buffer, this.hashes.byteOffset, this.hashes.byteLength));
  }
}

/**
 * What a destination lacks at the switchover, and its digest so far, in one pass over the words:
 * page i is absent when it was not received (or is stale: received, then dirtied) and is not
 * soft; the hash of every absent or soft page is cleared in `hashes` (it counts 0 until the page
 * arrives). Returns the absent pages (a bitmap of `size` bits) and their count.
 *
 * It runs once per migration, inside the downtime, in code V8 has not optimized: written as three
 * passes with a closure per word (a bitmap built from a closure over words, count, runs) it took
 * 2.3-3.5 ms for 64 Ki pages. Hence plain loops, whole words at a time, and one fill per run of
 * words (and no closure made per migration: see Bitmap.select).
 */
export function absentAtSwitchover(
  size: number, pages: number, received: Uint32Array, stale: Uint32Array, soft: Uint32Array, hashes: BigUint64Array,
): { absent: Bitmap; missing: number } {
  const absent = new Bitmap(size);
  const aw = absent.words;
  const words = Math.ceil(Math.min(pages, size) / 32);
  const tail = Math.min(pages, size) & 31;
  let missing = 0;
  /** First page of a run of whole words whose hashes are cleared, or -1. */
  let run = -1;
  for (let i = 0; i < words; i++) {
    const mask = i === words - 1 && tail !== 0 ? (1 << tail) - 1 : -1;
    const sw = soft[i] ?? 0;
    const a = ~(received[i] ?? 0) | (stale[i] ?? 0);
    const w = (a & ~sw & mask) >>> 0;
    aw[i] = w;
    if (w === 0xffffffff) missing += 32;
    else if (w !== 0) missing += popcount32(w);
    const gone = ((w | sw) & mask) >>> 0;
    if (gone === 0xffffffff) {
      if (run < 0) run = i << 5;
      continue;
    }
    if (run >= 0) {
      hashes.fill(0n, run, Math.min(i << 5, hashes.length));
      run = -1;
    }
    for (let g = gone; g !== 0; g &= g - 1) {
      const p = (i << 5) + 31 - Math.clz32(g & -g);
      if (p < hashes.length) hashes[p] = 0n;
    }
  }
  if (run >= 0) hashes.fill(0n, run, Math.min(words << 5, hashes.length));
  return { absent, missing };
}

/** Pages of the sample warmSwitchover runs on: enough for V8 to optimize the per-word loops. */
const WARM_PAGES = 1 << 16;

/**
 * Runs the switchover's once-per-migration code on a sample, before the pause: a STATE and a
 * SWITCHOVER (bitmaps of the VM's size, up to WARM_PAGES) encoded, decoded and turned back into
 * bitmaps, and absentAtSwitchover over them. Both sessions call it (warmSwitchoverOnce) while
 * they prepare; nothing of it touches the session.
 *
 * Why: this code runs inside the downtime, once per migration, so in a process that had not run
 * it yet (every host's first migration in or out, which is all `ferry demo` shows) it ran cold.
 * Measured here in a fresh process: encoding both frames took 2.5-3.8 ms the first time and
 * 0.4-0.6 ms after, decoding them 4.4-5.8 ms and 0.5-1.3 ms.
 *
 * The sample has only its last page received, stale and soft, so it lacks every other page:
 * returns that count (one less than the sample's pages) as the round trip decoded it.
 */
export function warmSwitchover(pages: number): number {
  const n = Math.max(1, Math.min(pages, WARM_PAGES));
  const sample = new Bitmap(n);
  sample.set(n - 1);
  const wire = toWireBitmap(sample, n);
  const decoder = new FrameDecoder();
  const state = decoder.push(encodeFrame({
    type: 'STATE', guestBytes: n * PAGE_SIZE, devices: { sample: true }, soft: wire,
    globals: [{ type: 'i32', value: 0 }, { type: 'i64', value: 0n }, { type: 'f32', bits: 0 }, { type: 'f64', bits: 0n }],
  }));
  const sw = decoder.push(encodeFrame({ type: 'SWITCHOVER', pagesRemaining: 0, digest: null, stale: wire }));
  if (state[0]?.type !== 'STATE' || sw[0]?.type !== 'SWITCHOVER') throw new BugIndicatingError('the switchover frames did not survive their own round trip');
  const soft = fromWireBitmap(state[0].soft, n);
  const stale = fromWireBitmap(sw[0].stale, n);
  return absentAtSwitchover(n, n, sample.words, stale.words, soft.words, new BigUint64Array(n)).missing;
}

let switchoverWarm = false;

/**
 * warmSwitchover on the largest sample, once per process (what the sessions call): a process warms
 * at its first migration, in or out, whatever that VM's size; later ones find the code warm.
 */
export function warmSwitchoverOnce(): void {
  if (switchoverWarm) return;
  switchoverWarm = true;
  warmSwitchover(WARM_PAGES);
}

/**
 * The answer to a page request `id`: one DEMAND PAGES frame with the pages asked for that are in
 * the guest's `guestPages` and not soft (zero pages as ZERO, the rest read by `read`), or null
 * when none is left. The source's session and its fault thread answer alike.
 */
export function demandAnswer(
  id: number, pages: readonly number[], guestPages: number, soft: Bitmap,
  isZero: (page: number) => boolean, read: (page: number, into: Uint8Array) => void,
): { want: number[]; frame: Uint8Array } | null {
  const want = pages.filter((p) => p < guestPages && !soft.get(p));
  if (want.length === 0) return null;
  const b = new PagesFrameBuilder(want.length, PAGE_SIZE);
  for (const p of want) {
    if (isZero(p)) b.addZero(p);
    else read(p, b.addRaw(p));
  }
  return { want, frame: b.finish(id, true) };
}

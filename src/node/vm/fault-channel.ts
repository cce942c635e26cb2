/**
 * Post-copy demand paging from the vCPU's own thread (see FaultThreads in core/engine/types.ts).
 *
 * A vCPU that touches a missing page sends the page request on the session's fault connection
 * itself and blocks in poll(2) on that socket until the answer is there, then installs the page
 * and runs on. No other thread stands between the fault and the network: the request leaves
 * while the vCPU still has its core, and the kernel wakes the vCPU when the answer arrives. (With
 * a fault thread in between, each fault took two more wake-ups between threads: ~85 µs of a
 * 0.3 ms p50 wait, and most of the tail, measured on the machines of docs/metrics.md.)
 *
 * The vCPU and the destination's fault thread share a FaultChannelBlock:
 * - the socket's descriptor (the fault thread detached it from its event loop after the JOIN)
 *   and a busy word, so that the fault thread can take the socket back and close it safely;
 * - the install claims shared with the session's own thread (which applies pushed pages): the
 *   first to claim a page installs it, the other never writes it (the guest may have since);
 * - a log of what the vCPU installed (page, hash for the digest, the service time), which the
 *   fault thread reads and reports to the session, and the failure, if the channel failed.
 */
import { getPriority } from 'node:os';
import { PRESENCE_MAP_OFFSET, RESERVED_BYTES, RESERVED_PAGES } from '../../core/abi.js';
import { Bitmap } from '../../core/bitmap.js';
import { MigrationError, demandAnswer } from '../../core/engine/common.js';
import { FerryError } from '../../core/errors.js';
import { PAGE_SIZE } from '../../core/pages.js';
import { FrameDecoder } from '../../core/protocol/decoder.js';
import { encodeFrame, encodePageRequest } from '../../core/protocol/encode.js';
import { Encoding, type Frame, type WirePage } from '../../core/protocol/frames.js';
import { BlockingSocket, SendPacer, type SendShape } from '../net/blocking-socket.js';
import { LATENCY_SLICE_US, setFairScheduling } from '../fair-scheduling.js';
import { hashPage } from './page-hash.js';

const enum W {
  /** The socket's descriptor; -1 before it is given and once it is taken back. */
  FD = 0,
  /** 1 while the vCPU uses the socket. */
  BUSY = 1,
  /** Set (to 1) once the channel failed; the failure's code and message follow in the block. */
  FAILED = 2,
  /** Log entries written (by the vCPU) and read (by the fault thread). */
  HEAD = 3,
  TAIL = 4,
  /** Bytes of the failure's text. */
  FAILURE_BYTES = 5,
  WORDS = 16,
}

const FAILURE_AT = W.WORDS * 4;
const FAILURE_MAX = 512 - FAILURE_AT;
const LOG_AT = 512;
/** Entries of the install log: page, hash (two 32-bit halves), service time (NaN: no fault). */
const LOG_ENTRIES = 1024;
const ENTRY = 4;
const CLAIMS_AT = LOG_AT + LOG_ENTRIES * ENTRY * 8;

/**
 * How often the fault thread reads the install log, ms: what it reports (hashes for the digest,
 * the count of pages still missing) is bookkeeping, late by this much at most.
 */
export const LOG_READ_MS = 2;

/** How long a blocked vCPU waits before it looks whether it was asked to stop, ms. */
const POLL_MS = 100;

/** The memory the vCPU and the destination's fault thread share for one post-copy VM. */
export class FaultChannelBlock {
  readonly words: Int32Array;
  readonly claims: Int32Array;
  private readonly log: Float64Array;

  /** A block for a VM of `pages` guest pages (at most: its presence map's length). */
  static create(pages: number): FaultChannelBlock {
    const block = new FaultChannelBlock(new SharedArrayBuffer(CLAIMS_AT + Math.ceil(pages / 32) * 4));
    Atomics.store(block.words, W.FD, -1);
    return block;
  }

  constructor(readonly buffer: SharedArrayBuffer) {
    this.words = new Int32Array(buffer, 0, W.WORDS);
    this.log = new Float64Array(buffer, LOG_AT, LOG_ENTRIES * ENTRY);
    this.claims = new Int32Array(buffer, CLAIMS_AT);
  }

  /** Claims `page` for one install: true for the first caller only. */
  claim(page: number): boolean {
    const bit = 1 << (page & 31);
    return (Atomics.or(this.claims, page >> 5, bit) & bit) === 0;
  }

  /** Gives the vCPU the socket (before the VM runs). */
  setSocket(fd: number): void {
    Atomics.store(this.words, W.FD, fd);
  }

  /**
   * Takes the socket back from the vCPU: from now on it does not use it, and one blocked on it
   * is woken (`wake`: ends the connection). Resolves once the vCPU let go of it (it may be closed).
   */
  async takeSocket(wake: () => void): Promise<void> {
    if (Atomics.exchange(this.words, W.FD, -1) < 0) return;
    if (Atomics.load(this.words, W.BUSY) === 0) return;
    wake();
    while (Atomics.load(this.words, W.BUSY) !== 0) {
      const r = Atomics.waitAsync(this.words, W.BUSY, 1, POLL_MS);
      if (r.async) await r.value;
    }
  }

  /** The vCPU starts using the socket: its descriptor, or -1 if it has none (then it must not). */
  enter(): number {
    Atomics.store(this.words, W.BUSY, 1);
    const fd = Atomics.load(this.words, W.FD);
    if (fd < 0) this.leave();
    return fd;
  }

  leave(): void {
    Atomics.store(this.words, W.BUSY, 0);
    Atomics.notify(this.words, W.BUSY);
  }

  /** The vCPU installed `page` (hash 0 and a time: it asked for it, and a push had won). */
  logInstall(page: number, hash: bigint, serviceMs: number | null): void {
    const head = Atomics.load(this.words, W.HEAD);
    for (let tail = Atomics.load(this.words, W.TAIL); head - tail >= LOG_ENTRIES; tail = Atomics.load(this.words, W.TAIL)) {
      Atomics.wait(this.words, W.TAIL, tail, POLL_MS); // the fault thread is behind: rare, brief
    }
    const at = (head % LOG_ENTRIES) * ENTRY;
    this.log[at] = page;
    this.log[at + 1] = Number(hash >> 32n);
    this.log[at + 2] = Number(hash & 0xffffffffn);
    this.log[at + 3] = serviceMs ?? NaN;
    Atomics.store(this.words, W.HEAD, head + 1);
    // No wake-up per install: the fault thread reads the log every LOG_READ_MS. Woken at once, it
    // took the vCPU's core for ~80 µs of each fault (measured: p50 wait 0.225 ms, service 0.145).
    // Only a log half full is worth a wake-up.
    if (head + 1 - Atomics.load(this.words, W.TAIL) >= LOG_ENTRIES / 2) Atomics.notify(this.words, W.HEAD);
  }

  /** Reads the log's new entries (the fault thread). */
  drain(each: (page: number, hash: bigint, serviceMs: number | null) => void): void {
    const head = Atomics.load(this.words, W.HEAD);
    let tail = Atomics.load(this.words, W.TAIL);
    for (; tail !== head; tail++) {
      const at = (tail % LOG_ENTRIES) * ENTRY;
      const ms = this.log[at + 3];
      each(this.log[at], (BigInt(this.log[at + 1]) << 32n) | BigInt(this.log[at + 2]), Number.isNaN(ms) ? null : ms);
    }
    Atomics.store(this.words, W.TAIL, tail);
    Atomics.notify(this.words, W.TAIL);
  }

  /**
   * Waits (without blocking the thread) for the log to have entries past `seen`: LOG_READ_MS at
   * most, less when the log fills or the channel fails.
   */
  async logged(seen: number): Promise<number> {
    const r = Atomics.waitAsync(this.words, W.HEAD, seen, LOG_READ_MS);
    if (r.async) await r.value;
    return Atomics.load(this.words, W.HEAD);
  }

  /** The vCPU's channel failed: the first failure is kept for the fault thread. */
  fail(code: string, message: string): void {
    if (Atomics.compareExchange(this.words, W.FAILED, 0, 2) !== 0) return;
    const text = new TextEncoder().encode(`${code} ${message}`).subarray(0, FAILURE_MAX);
    new Uint8Array(this.buffer, FAILURE_AT, FAILURE_MAX).set(text);
    Atomics.store(this.words, W.FAILURE_BYTES, text.length);
    Atomics.store(this.words, W.FAILED, 1);
    Atomics.notify(this.words, W.HEAD);
  }

  /** The failure, once there is one. */
  failure(): { code: string; message: string } | null {
    if (Atomics.load(this.words, W.FAILED) !== 1) return null;
    const text = new TextDecoder().decode(new Uint8Array(this.buffer, FAILURE_AT, Atomics.load(this.words, W.FAILURE_BYTES)).slice());
    const space = text.indexOf(' ');
    return { code: text.slice(0, space), message: text.slice(space + 1) };
  }
}

/** The digest hash of a zero page. */
const ZERO_PAGE_HASH = hashPage(new Uint8Array(PAGE_SIZE));

/**
 * What a destination takes from a frame on a fault channel (whoever reads it: the vCPU, or the
 * fault thread where the connection is not detached): the demand pages of a DEMAND PAGES frame, each checked (raw or
 * zero, a whole page, within the VM's `pages`), or the reply a PING asks for. An ERROR from the
 * source, or any other frame, fails the channel by name.
 */
export function takeFaultFrame(f: Frame, pages: number): { pages: readonly WirePage[] } | { reply: Frame } {
  if (f.type === 'PAGES' && f.demand) {
    for (const p of f.pages) {
      if (p.encoding !== Encoding.RAW && p.encoding !== Encoding.ZERO) throw new MigrationError('ERR_PROTOCOL_MALFORMED', `demand page ${p.index} in encoding ${p.encoding}: the fault channel carries raw or zero pages`);
      if (p.encoding === Encoding.RAW && p.data.length !== PAGE_SIZE) throw new MigrationError('ERR_PROTOCOL_MALFORMED', `raw page ${p.index} is ${p.data.length} bytes`);
      if (p.index >= pages) throw new MigrationError('ERR_PROTOCOL_MALFORMED', `demand page ${p.index} is beyond the VM's ${pages} pages`);
    }
    return { pages: f.pages };
  }
  if (f.type === 'PING') return { reply: { type: 'PONG', seq: f.seq, time: f.time } };
  if (f.type === 'ERROR') throw new MigrationError(f.code, `source reported: ${f.message}`);
  throw new MigrationError('ERR_PROTOCOL_SEQUENCE', `${f.type} on the fault channel`);
}

/**
 * Installs demand page `page` (a raw page; zero for a ZERO one) into guest memory `bytes`, unless
 * it is present already or the session's own thread claimed it (it installs pushed pages): a page
 * the guest may have written since is never overwritten. Returns its digest hash, or null when it
 * was not installed. Data first, then the presence flag.
 */
export function installDemandPage(bytes: Uint8Array, block: FaultChannelBlock, p: WirePage): bigint | null {
  const flag = PRESENCE_MAP_OFFSET + RESERVED_PAGES + p.index;
  if (Atomics.load(bytes, flag) !== 0 || !block.claim(p.index)) return null;
  const at = RESERVED_BYTES + p.index * PAGE_SIZE;
  let hash: bigint;
  if (p.encoding === Encoding.ZERO) {
    bytes.fill(0, at, at + PAGE_SIZE);
    hash = ZERO_PAGE_HASH;
  } else {
    bytes.set(p.data, at);
    hash = hashPage(p.data);
  }
  Atomics.store(bytes, flag, 1);
  return hash;
}

/**
 * A fault's round trip once, on scratch memory, on the calling thread: a request encoded and
 * decoded, its answer (a raw page and a zero page) built as the source's threads build it,
 * encoded, decoded and installed as the vCPU installs it. In a fresh thread all of that is cold
 * code, and the first fault after a post-copy resume paid for it inside the vCPU's wait (traced
 * between two hosts: the source's thread took 0.7 ms to build its first answer, the vCPU 1.2-2.2
 * ms to install it, against 0.1-0.3 ms warm). Threads that will serve or take faults run it while
 * they stand by. Returns the pages it installed (2).
 */
export function rehearseFaultPath(): number {
  const pages = 2;
  const memory = new Uint8Array(RESERVED_BYTES + pages * PAGE_SIZE);
  const block = FaultChannelBlock.create(pages);
  const content = new Uint8Array(PAGE_SIZE).fill(7);
  let installed = 0;
  for (const request of new FrameDecoder().push(encodePageRequest({ id: 1, pages: [0, 1] }))) {
    if (request.type !== 'PAGE_REQUEST') continue;
    const answer = demandAnswer(request.id, request.pages, pages, new Bitmap(pages), (p) => p === 1, (_p, into) => into.set(content));
    if (!answer) continue;
    for (const f of new FrameDecoder().push(answer.frame)) {
      const t = takeFaultFrame(f, pages);
      if ('pages' in t) for (const p of t.pages) if (installDemandPage(memory, block, p) !== null) installed++;
    }
  }
  return installed;
}

/**
 * What a VM's vCPU thread is told to fetch its missing pages itself (Vm.useFaultChannel): the
 * channel's shared block, the guest's pages, the nice value it waits at (the destination's
 * fault-thread nice value, FAULT_THREAD_NICE, when its host asks for raised fault threads and may
 * raise them; null: its own) and the link shape of its requests (null: none).
 */
export interface FaultChannelUse {
  block: SharedArrayBuffer;
  pages: number;
  waitNice: number | null;
  shape: SendShape | null;
}

/** What a vCPU thread needs to fetch its missing pages itself. */
export interface FaultFetcherInit {
  block: FaultChannelBlock;
  /** Guest memory (pages at RESERVED_BYTES + page × PAGE_SIZE, the presence map inside). */
  memory: () => ArrayBuffer | SharedArrayBuffer;
  /** Guest pages the presence map covers. */
  pages: number;
  /** Whether the vCPU was asked to stop (checked between waits). */
  stopping: () => boolean;
  /**
   * Blocks until physical page `physical` is present, woken by the thread installing it: for an
   * answer that found the page claimed by the session's thread, whose install of a pushed copy
   * is under way (nothing more comes on the socket to wake a poll).
   */
  awaitInstall: (physical: number) => void;
  /** See FaultChannelUse. */
  waitNice: number | null;
  /** See FaultChannelUse. */
  shape: SendShape | null;
}

/** Most pages one {@link FaultFetcher.fetchAll} asks for (a 1 MiB answer). */
export const MAX_FETCH_PAGES = 256;

/** The vCPU thread's side of a FaultChannelBlock. */
export class FaultFetcher {
  private socket: BlockingSocket | null = null;
  private readonly decoder = new FrameDecoder();
  private readonly into = new Uint8Array(64 * 1024);
  private nextId = 0;

  constructor(private readonly init: FaultFetcherInit) {}

  /**
   * Fetches physical page `physical` on the fault connection and installs it, blocking this
   * thread until it is present. False when the channel cannot serve it (no socket, a page
   * outside the guest's, the channel failed or was taken back): the caller then waits for the
   * page as it would without a channel.
   */
  fetch(physical: number): boolean {
    return this.fetchAll([physical]);
  }

  /**
   * Fetches physical pages `physicals` (at most {@link MAX_FETCH_PAGES}, the first the one the
   * vCPU stopped at) with one request and installs them, blocking until every one is present:
   * one round trip where a device's access to a range of absent pages (a net ring, 256 pages)
   * took one each, 20 ms in all, right after a post-copy resume. False as for {@link fetch}.
   */
  fetchAll(physicals: readonly number[]): boolean {
    const pages = physicals.map((x) => x - RESERVED_PAGES);
    const { block } = this.init;
    if (pages.length === 0 || pages.length > MAX_FETCH_PAGES || pages.some((p) => p < 0 || p >= this.init.pages)) return false;
    const page = pages[0];
    const fd = block.enter();
    if (fd < 0) return false;
    const allPresent = () => pages.every((p) => this.present(p));
    try {
      if (this.socket?.fd !== fd) this.socket = new BlockingSocket(fd, this.init.shape ? new SendPacer(this.init.shape) : null);
      const socket = this.socket;
      const sent = performance.now();
      socket.sendAll(encodePageRequest({ id: ++this.nextId >>> 0, pages }));
      this.answered = false;
      this.boostedFrom ??= this.boost();
      while (!allPresent()) {
        if (this.init.stopping()) throw new StoppedWhileFaulting();
        if (this.answered) {
          // The answer came (all of it: one frame), and a push of a page it brought is being
          // installed by the session's thread.
          for (const p of pages) if (!this.present(p)) this.init.awaitInstall(p + RESERVED_PAGES);
          break;
        }
        const n = socket.recvSome(this.into, POLL_MS);
        if (n < 0) continue;
        if (n === 0) throw new MigrationError('ERR_MIGRATION_PEER_CLOSED', 'the source closed the fault channel');
        for (const f of this.decoder.push(this.into.subarray(0, n))) this.take(f, page, sent, socket);
      }
      // A push brought it before the answer (which will be read, and dropped, at the next fault).
      if (!this.answered) block.logInstall(page, 0n, performance.now() - sent);
      return true;
    } catch (e) {
      if (e instanceof StoppedWhileFaulting) throw e;
      // Taken back (all pages are in, or the session ended): no failure of the channel's.
      if (Atomics.load(block.words, W.FD) < 0) return allPresent();
      block.fail(e instanceof FerryError ? e.code : 'ERR_MIGRATION_FAULT_CHANNEL', (e as Error).message);
      return false;
    } finally {
      block.leave();
    }
  }

  /**
   * While it waits for a page, the vCPU is the destination's fault thread, and is scheduled as one
   * (FaultFetcherInit.waitNice, with the latency slice: fair-scheduling.ts): woken by its answer,
   * it takes a core from the threads that apply pushed pages at once rather than at the end of
   * their time slice. Its own nice value, to go back to, or null when it is not raised (no such
   * nice value and no slice, or not permitted).
   */
  private boost(): number | null {
    const want = this.init.waitNice;
    if (want === null || this.boostRefused) return null;
    const own = getPriority(0);
    // Where raising the nice value is refused, the short slice alone.
    for (const nice of want < own ? [want, own] : [own]) {
      try {
        setFairScheduling(nice, LATENCY_SLICE_US);
        return own;
      } catch {
        // Not permitted: the next one down.
      }
    }
    this.boostRefused = true;
    return null;
  }

  /** The vCPU's own nice value while it is raised (from its first wait in a quantum to the quantum's end). */
  private boostedFrom: number | null = null;

  /**
   * Back to the vCPU's own nice value and the kernel's slice: at the end of a quantum in which
   * it waited for a page. Dropped at once after each page, its weight fell while it had a core,
   * and the kernel often took the core at once (the drop itself then took 1 ms or more in 0.3 %
   * of faults); kept to the quantum's end, the guest runs on with its page first.
   */
  relax(): void {
    if (this.boostedFrom === null) return;
    try {
      setFairScheduling(this.boostedFrom, 0);
    } catch {
      // Going back down is always permitted.
    }
    this.boostedFrom = null;
  }

  private boostRefused = false;

  /** The answer to the request under way came. */
  private answered = false;
  private bytes: Uint8Array<ArrayBuffer | SharedArrayBuffer> = new Uint8Array(0);

  /** Guest memory as bytes (a view made anew only when the memory grew). */
  private view(): Uint8Array {
    const m = this.init.memory();
    if (this.bytes.byteLength !== m.byteLength) this.bytes = new Uint8Array(m);
    return this.bytes;
  }

  private present(page: number): boolean {
    return Atomics.load(this.view(), PRESENCE_MAP_OFFSET + RESERVED_PAGES + page) !== 0;
  }

  private take(f: Frame, waiting: number, sent: number, socket: BlockingSocket): void {
    const t = takeFaultFrame(f, this.init.pages);
    if ('reply' in t) {
      socket.sendAll(encodeFrame(t.reply));
      return;
    }
    for (const p of t.pages) {
      const serviceMs = p.index === waiting ? performance.now() - sent : null;
      if (serviceMs !== null) this.answered = true;
      const hash = installDemandPage(this.view(), this.init.block, p);
      // Not installed (a push won): only the wait is news.
      if (hash !== null || serviceMs !== null) this.init.block.logInstall(p.index, hash ?? 0n, serviceMs);
    }
  }
}

/** The vCPU was told to stop while it waited for a page: it stops (the guest's quantum unwinds). */
export class StoppedWhileFaulting extends Error {
  constructor() {
    super('stopped while waiting for a post-copy page');
  }
}

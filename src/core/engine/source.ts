/**
 * The source side of a live migration: pre-copy (Clark et al.), post-copy (Hines et al.) and
 * hybrid, over one framed connection. The decisions — when to stop pre-copy, when to switch to
 * post-copy, how hard to throttle, which page next — are the shared policies in core/policy; this
 * file is the mechanism around them.
 */
import { Bitmap } from '../bitmap.js';
import { AbortError, FerryError } from '../errors.js';
import { MigrationReportBuilder, type MigrationEvent } from '../metrics.js';
import { PAGE_SIZE } from '../pages.js';
import { AutoConverge, PrecopyStopPolicy, type PrecopyRoundStats } from '../policy/precopy.js';
import { HybridSwitchPolicy } from '../policy/hybrid.js';
import { precopyBytesLeft, sampledDirtyCurve } from '../policy/forecast.js';
import type { DirtyCurve } from '../models.js';
import { PostcopyScheduler } from '../policy/postcopy.js';
import { DedupIndex } from '../codec/dedup.js';
import { DEFAULT_BATCH_BYTES } from '../codec/codec.js';
import type { TransferReport } from '../metrics.js';
import { MAX_NAME_BYTES, MAX_STREAMS, PROTOCOL_VERSION, type CodecOffer, type PageRequestFrame } from '../protocol/frames.js';
import { clipUtf8, encodeBatchFrame, encodeRunHead, encodeZeroPages } from '../protocol/encode.js';
import { FramedConnection } from '../transport/framed.js';
import type { Connection } from '../transport/transport.js';
import { StreamEncoder, codecOffer, pagesOnStream, streamOf, usesCodecs, vmIndexBytes, type CodecName } from './codecs.js';
import { Inbox, MemoryDigest, MigrationError, RemoteMigrationError, demandAnswer, toWireBitmap, warmSwitchoverOnce } from './common.js';
import type { EngineDeps, MigrationOptions, MigrationPhase, MigrationProgress, MigrationResult, SourceFaultLink, SourceVm, VmWireState } from './types.js';

const MODULE_CHUNK = 1 << 20;
/** How long the handshake waits for each answer by default (the destination VM's set-up gets 4×). */
const HANDSHAKE_TIMEOUT_MS = 30_000;

type Ownership = 'source' | 'in-doubt' | 'destination';

/**
 * Most time the page sending keeps the event loop, ms, before it lets other work in (one turn).
 * Batches whose writes complete at once follow each other as promise continuations, which never
 * let the loop reach its I/O: a post-copy push with codecs held it 50-175 ms at a stretch, and the
 * host's VM endpoints, relays and control API waited that long (its clients' longest stall).
 */
const TURN_EVERY_MS = 2;

/** How long the source waits for its fault thread's connection before it joins the fault channel the usual way, ms. */
const FAULT_THREAD_OPEN_MS = 3000;

/**
 * RUN extents shorter than this many pages are copied, each stretch of them into one buffer,
 * rather than written from guest memory as they are: each write is a system call (or a message to
 * the stream's sender thread, and its call), about 5-8 µs here against about 0.5 µs to copy a
 * page. A final round of ~120 scattered pages went as ~120 writes per stream.
 */
const GATHER_BELOW_PAGES = 8;

/**
 * One connection that carries pages. It batches the pages routed to it and keeps one write in
 * flight, so the streams' writes overlap instead of taking turns.
 *
 * Without a codec, raw pages travel as RUN frames: a small head, then each run of consecutive
 * pages written straight from guest memory (SourceVm.pagesView) — the only copy is the kernel's.
 * A page the guest writes between the harvest and the kernel's copy is dirty again and goes again
 * (in the final round the VM is paused). Zero pages go as ZERO entries of a PAGES frame. With
 * codecs, pages are copied into a batch and encoded into BATCH frames.
 *
 * Exported for its tests (test/core/send-stream.test.ts); the session is its only user.
 */
export class SendStream {
  private inflight: Promise<void> = Promise.resolve();
  /** Guest page bytes this stream carried, and the frame bytes they became. */
  pageBytes = 0;
  frameBytes = 0;
  /** Codec path: the batch's page indices, and its pages back to back in `buf`. */
  private readonly indices: number[] = [];
  private readonly buf: Uint8Array | null;
  /**
   * RUN path: the batch's pages as runs — (first, count) pairs in the order added, a page that
   * continues the last run extending it — and how many pages they hold. `ordered` while each run
   * starts past the end of the one before (a round's pages come so); pages added out of order are
   * sorted, and repeats dropped, at flush.
   */
  private readonly runs: Uint32Array;
  private runCount = 0;
  private pendingCount = 0;
  private ordered = true;
  /** For sorting pages added out of order: the batch's pages one by one. */
  private readonly unsorted: Uint32Array;
  private readonly zeroFlags: Uint8Array;
  private readonly zeros: Uint32Array;

  /** Pages a batch takes now (at most the `batchPages` it was made for): see setLimit. */
  private limit: number;

  /** Page bytes a batch takes now. */
  get batchBytes(): number {
    return this.limit * PAGE_SIZE;
  }

  constructor(readonly framed: FramedConnection, readonly encoder: StreamEncoder | null, private readonly vm: SourceVm, private readonly batchPages: number, private readonly now: () => number) {
    this.limit = batchPages;
    this.buf = encoder ? new Uint8Array(batchPages * PAGE_SIZE) : null;
    this.runs = new Uint32Array(encoder ? 0 : 2 * batchPages);
    this.unsorted = new Uint32Array(encoder ? 0 : batchPages);
    this.zeroFlags = new Uint8Array(encoder ? 0 : batchPages);
    this.zeros = new Uint32Array(encoder ? 0 : batchPages);
  }

  get count(): number {
    return this.encoder ? this.indices.length : this.pendingCount;
  }

  get full(): boolean {
    return this.count >= this.limit;
  }

  /** Batches of at most `pages` from the next one on (never more than the stream was made for). */
  setLimit(pages: number): void {
    this.limit = Math.max(1, Math.min(pages, this.batchPages));
  }

  /** Adds page `p` to the batch (codec path: copied now; RUN path: read from guest memory when written). */
  add(p: number): void {
    if (this.buf) {
      this.vm.readPage(p, this.buf, this.indices.length * PAGE_SIZE);
      this.indices.push(p);
      return;
    }
    this.pushRun(p, 1);
  }

  /** Adds pages [first, first + count) — no more than the batch has room for. */
  addRun(first: number, count: number): void {
    if (this.buf) {
      for (let k = 0; k < count; k++) this.add(first + k);
      return;
    }
    this.pushRun(first, count);
  }

  private pushRun(first: number, count: number): void {
    if (count <= 0) return;
    const runs = this.runs;
    const n = this.runCount;
    this.pendingCount += count;
    if (n > 0) {
      const end = runs[2 * n - 2] + runs[2 * n - 1];
      if (first === end) {
        runs[2 * n - 1] += count;
        return;
      }
      if (first < end) this.ordered = false;
    }
    runs[2 * n] = first;
    runs[2 * n + 1] = count;
    this.runCount = n + 1;
  }

  /** Pages the batch still has room for. */
  get room(): number {
    return this.limit - this.count;
  }

  /** Makes the runs ordered and disjoint: pages added out of order, sorted, each once. */
  private sortRuns(): void {
    const runs = this.runs;
    const pages = this.unsorted;
    let n = 0;
    for (let r = 0; r < this.runCount; r++) for (let k = 0; k < runs[2 * r + 1]; k++) pages[n++] = runs[2 * r] + k;
    pages.subarray(0, n).sort();
    this.runCount = 0;
    this.pendingCount = 0; // counted again below, each page once
    this.ordered = true;
    for (let i = 0; i < n; i++) {
      if (i > 0 && pages[i] === pages[i - 1]) continue; // the same page twice: once
      this.pushRun(pages[i], 1);
    }
  }

  /**
   * The RUN path's frames: the RUN head, each extent's bytes, then the zero pages' PAGES frame.
   * Each run of the batch is scanned for zero pages in one call; a run without any is one extent
   * as it is (no step per page: a round of random memory is nothing but such runs), the others'
   * non-zero stretches become the extents.
   */
  private runFrames(seq: number): Uint8Array[] {
    const vm = this.vm;
    if (!this.ordered) this.sortRuns();
    const runs = this.runs;
    const nRuns = this.runCount;
    this.runCount = 0;
    this.pendingCount = 0;
    const extents: { first: number; count: number }[] = [];
    let zeroCount = 0;
    const flags = this.zeroFlags;
    for (let r = 0; r < nRuns; r++) {
      const first = runs[2 * r];
      const count = runs[2 * r + 1];
      const zeros = vm.zeroPages(first, count, flags);
      if (zeros === 0) {
        extents.push({ first, count });
        continue;
      }
      for (let k = 0; k < count; k++) {
        if (flags[k] === 1) this.zeros[zeroCount++] = first + k;
        else if (k > 0 && flags[k - 1] !== 1) extents[extents.length - 1].count++; // the page before is the last extent's
        else extents.push({ first: first + k, count: 1 });
      }
    }
    const out: Uint8Array[] = [];
    if (extents.length > 0) {
      out.push(encodeRunHead(seq, extents, PAGE_SIZE));
      const view = vm.pagesView?.bind(vm);
      for (let i = 0; i < extents.length;) {
        if (view && extents[i].count >= GATHER_BELOW_PAGES) {
          out.push(view(extents[i].first, extents[i].count));
          i++;
          continue;
        }
        // A stretch of short extents (every extent, for a VM without views): copied into one buffer.
        let j = i;
        let pages = 0;
        while (j < extents.length && !(view && extents[j].count >= GATHER_BELOW_PAGES)) pages += extents[j++].count;
        const b = new Uint8Array(new SharedArrayBuffer(pages * PAGE_SIZE));
        for (let at = 0; i < j; i++) {
          const e = extents[i];
          if (view) b.set(view(e.first, e.count), at);
          else for (let k = 0; k < e.count; k++) vm.readPage(e.first + k, b, at + k * PAGE_SIZE);
          at += e.count * PAGE_SIZE;
        }
        out.push(b);
      }
    }
    if (zeroCount > 0) out.push(encodeZeroPages(seq, false, this.zeros, zeroCount));
    return out;
  }

  /**
   * Encodes the batch and queues its frames behind the stream's previous write (waiting for that
   * one first). Returns the pages and wire bytes it queued.
   */
  async flush(seq: number): Promise<{ pages: number; bytes: number }> {
    const n = this.count;
    if (n === 0) return { pages: 0, bytes: 0 };
    const frames: Uint8Array[] = [];
    if (this.encoder) {
      const parts = this.encoder.encode(this.indices, this.buf!.subarray(0, n * PAGE_SIZE));
      this.indices.length = 0;
      for (const part of parts) frames.push(encodeBatchFrame({ seq, demand: false, blobCodec: part.blobCodecId, pages: part.pages, data: part.bytes }));
    } else frames.push(...this.runFrames(seq));
    await this.inflight;
    let bytes = 0;
    for (const f of frames) bytes += f.length;
    this.pageBytes += n * PAGE_SIZE;
    this.frameBytes += bytes;
    // The stream moves one batch per previous write: the pace the compression controller compares.
    this.encoder?.recordSent(n * PAGE_SIZE, this.now());
    // Written in order now (later frames on this connection go behind them); awaited as one.
    const w = Promise.all(frames.map((f) => this.framed.sendEncoded(f))).then(() => undefined);
    w.catch(() => undefined); // a failure surfaces at the next flush or drain
    this.inflight = w;
    return { pages: n, bytes };
  }

  /** Resolves once everything queued was written (rejects with the write's error). */
  drain(): Promise<void> {
    return this.inflight;
  }
}

/**
 * Pages per batch in pre-copy's first pass without codecs: 4 MiB (with codecs at most what a codec
 * takes at once, DEFAULT_BATCH_BYTES; later rounds, the stop-and-copy and post-copy's push
 * LATENCY_BATCH_PAGES). Against 1 MiB, an idle 256 MiB pre-copy here took a median of 110 against
 * 129 ms (the system's BBR; 18 runs each, alternating), and 93 against 98 ms with sockets pinned to
 * CUBIC (measured with every round in 4 MiB batches): a quarter of the frames, writes and turns of
 * the event loop. A batch still goes in ~1.3 ms at loopback speed, inside the event loop's 2 ms turns.
 */
const DEFAULT_BATCH_PAGES = 1024;
/**
 * Batches where latency counts stay at 1 MiB: the rounds after the first pass (they race the
 * guest's dirtying: over the shaped link of sim-engine.test.ts, 4 MiB batches of scattered pages
 * left final rounds of 4931–4964 pages and downtimes of 852–892 ms, 3–5 % above the simulator's
 * prediction; 1 MiB batches 832–846 ms, 1.5 % above it),
 * the stop-and-copy (the paused VM's state, when it comes late, goes between two batches, and the
 * destination loads it while the last pages come) and post-copy's push (pre-paging picks each batch
 * around the latest faults).
 */
const LATENCY_BATCH_PAGES = 256;
/** Least time a phase's own rate is measured over before it feeds the ETA (see liveRate). */
const ETA_RATE_WINDOW_MS = 250;
/** Least time between two samples of the dirty count during the first pass (see sampleDirty). */
const DIRTY_SAMPLE_MS = 20;
/** What a stream may hold on the way beyond its batches: a sender thread's queue (THREAD_WRITE_HWM in node/transport/tcp.ts). */
const ETA_BUFFERED_PER_STREAM = 4 << 20;

class SourceSession {
  private readonly framed: FramedConnection;
  private readonly inbox: Inbox;
  private readonly builder: MigrationReportBuilder;
  /** The migration's time zero: set again once the degradation baseline has been measured. */
  private t0: number;
  private bytesSent = 0;
  private pagesSent = 0;
  private round = 0;
  private phase: MigrationPhase = 'handshake';
  private pagesRemaining = 0;
  /** Pre-copy's stop policy (or hybrid's switch), for the ETA's forecast; null outside pre-copy. */
  private policy: PrecopyStopPolicy | HybridSwitchPolicy | null = null;
  /** The round in progress's pages. */
  private roundPages = 0;
  /**
   * Where the rate of the phase or round in progress is measured from (the ETA's, until a round
   * has measured one): `steady` once what may be buffered on the way has been written.
   */
  private rateFrom = { t: 0, bytes: 0, steady: false };
  /** When dirty logging began, and the first pass's samples of how many pages were dirty since: (ms, pages). */
  private loggingSince: number | null = null;
  private dirtySamples: [number, number][] = [];
  /** The dirty curve the first pass measured (HIST), for the ETA's forecast; null without samples. */
  private dirtyCurve: DirtyCurve | null = null;
  private dirtyRate = 0;
  private bandwidth = 0;
  private paused = false;
  /** Dirty logging's start, once asked for (fail() waits for it before it stops logging). */
  private logging: Promise<void> | null = null;
  private owner: Ownership = 'source';
  private readonly batchPages: number;
  /** Pages per post-copy push batch (the scheduler re-plans around faults between batches). */
  private readonly pushPages: number;
  private readonly maxPages: number;
  private stopReason = '';
  /** Page-carrying connections; streams[0] is the control connection. */
  private streams: SendStream[] = [];
  /** The post-copy fault channel, when one was opened. */
  private fault: { framed: FramedConnection; inbox: Inbox } | null = null;
  /** The post-copy fault channel on a thread of its own, when the destination offered one and it opened. */
  private faultLink: SourceFaultLink | null = null;
  private readonly extra: FramedConnection[] = [];
  private agreed: CodecOffer[] = [];
  /** Set once the migration is ending normally: extra connections closing is then no failure. */
  private ending = false;

  constructor(conn: Connection, private readonly vm: SourceVm, private readonly deps: EngineDeps, private readonly opts: MigrationOptions) {
    this.framed = new FramedConnection(conn);
    this.inbox = new Inbox(this.framed, (e) => {
      // The destination gave up (ERROR): writes blocked behind its full buffers must not wait for it.
      if (!this.ending && e instanceof RemoteMigrationError) for (const f of [this.framed, ...this.extra]) f.abort(e);
    });
    this.builder = new MigrationReportBuilder({ technique: opts.mode, memoryBytes: vm.memoryBytes, guestBytes: vm.guestPages() * PAGE_SIZE });
    this.t0 = deps.clock.now();
    this.batchPages = Math.max(1, Math.min(opts.batchPages ?? DEFAULT_BATCH_PAGES, 4096));
    this.pushPages = Math.min(this.batchPages, LATENCY_BATCH_PAGES);
    this.maxPages = Math.ceil(vm.memoryBytes / PAGE_SIZE);
  }

  private now(): number {
    return this.deps.clock.now() - this.t0;
  }

  private event(e: MigrationEvent): void {
    this.builder.add(e);
  }

  private report(): void {
    if (!this.opts.onProgress) return;
    this.sampleDirty();
    const p: MigrationProgress = {
      phase: this.phase, mode: this.opts.mode, round: this.round, bytesSent: this.bytesSent, pagesSent: this.pagesSent,
      pagesRemaining: this.pagesRemaining, dirtyRateBytesPerSec: this.shownDirtyRate(), bandwidthBytesPerSec: this.bandwidth, elapsedMs: this.now(),
      ...this.eta(),
    };
    this.opts.onProgress(p);
  }

  /**
   * The dirty rate progress shows: the last round's; during the first pass, before any round has
   * ended, the pages dirtied since logging began over the time since, as sampled (the same
   * quantity the pass will report at its end), 0 without samples.
   */
  private shownDirtyRate(): number {
    if (this.round > 0 || this.phase !== 'precopy' || this.dirtyRate > 0) return this.dirtyRate;
    const last = this.dirtySamples[this.dirtySamples.length - 1];
    return last && last[0] > 0 ? ((last[1] * PAGE_SIZE) / last[0]) * 1000 : this.dirtyRate;
  }

  /**
   * During the first pass, at most every DIRTY_SAMPLE_MS: how many pages are dirty since logging
   * began (counted, not harvested). The samples make the dirty curve the ETA forecasts with.
   */
  private sampleDirty(): void {
    if (this.phase !== 'precopy' || this.round !== 0 || !this.vm.dirtyCount || this.loggingSince === null) return;
    const t = this.deps.clock.now() - this.loggingSince;
    const prev = this.dirtySamples[this.dirtySamples.length - 1];
    if (prev && t - prev[0] < DIRTY_SAMPLE_MS) return;
    this.dirtySamples.push([t, this.vm.dirtyCount()]);
  }

  /** Restarts the rate the ETA uses until a round has measured one (a phase or round begins). */
  private measureFromHere(): void {
    this.rateFrom = { t: this.deps.clock.now(), bytes: this.bytesSent, steady: false };
  }

  /**
   * The rate the phase in progress sends at, 0 while unknown. Counted as `sent` counts bytes —
   * when written — it runs ahead of the link at first, by what is buffered on the way (each
   * stream's batch being written and the next, a shaper's queue, a sender thread's; a 200 Mbit/s
   * first pass seemed to go at 65 MB/s), and not after: so it is measured from the moment that
   * much has been written, over ETA_RATE_WINDOW_MS at least.
   */
  private liveRate(): number {
    const now = this.deps.clock.now();
    if (!this.rateFrom.steady) {
      const buffered = this.streams.reduce((n, s) => n + 2 * s.batchBytes + ETA_BUFFERED_PER_STREAM, 0);
      if (this.bytesSent - this.rateFrom.bytes < buffered) return 0;
      this.rateFrom = { t: now, bytes: this.bytesSent, steady: true };
    }
    const since = now - this.rateFrom.t;
    return since >= ETA_RATE_WINDOW_MS ? ((this.bytesSent - this.rateFrom.bytes) / since) * 1000 : 0;
  }

  /** See MigrationProgress.etaMs and etaAtLeast. */
  private eta(): { etaMs: number | null; etaAtLeast: boolean } {
    if (this.phase === 'handshake') return { etaMs: null, etaAtLeast: false };
    // The rate the last pre-copy round measured (sent → acknowledged); before any, the phase's own.
    const b = this.bandwidth > 0 ? this.bandwidth : this.liveRate();
    if (this.phase === 'precopy' && this.policy) {
      // The dirty curve: the first pass's, once measured; during the pass, what it has sampled so far.
      const curve = this.dirtyCurve ?? (this.round === 0 ? sampledDirtyCurve(this.dirtySamples) : null);
      const etaAtLeast = this.round === 0 && !curve;
      if (!(b > 0)) return { etaMs: null, etaAtLeast };
      const policy = this.policy;
      const bytes = precopyBytesLeft({
        round: this.round, roundBytes: this.roundPages * PAGE_SIZE, leftBytes: this.pagesRemaining * PAGE_SIZE,
        bytesSentTotal: this.bytesSent, pagesSentTotal: this.pagesSent, memoryBytes: this.vm.guestPages() * PAGE_SIZE,
        bandwidthBytesPerSec: b, dirtyRateBytesPerSec: this.dirtyRate, history: policy.history,
        ...(curve ? { dirty: curve } : {}),
      }, (stats, history) => policy.ends(stats, history));
      return { etaMs: bytes === null ? null : (bytes / b) * 1000, etaAtLeast };
    }
    return { etaMs: b > 0 ? ((this.pagesRemaining * PAGE_SIZE) / b) * 1000 : null, etaAtLeast: false };
  }

  private checkAbort(): void {
    const s = this.opts.signal;
    if (s?.aborted && this.owner === 'source') throw new AbortError('migration cancelled', { cause: s.reason });
  }

  // ------------------------------------------------------------------ sending pages

  /**
   * Sends `pages` over the data streams (each page on its own stream, {@link streamOf}): PAGES
   * frames with each page copied once straight into its frame when no codec runs, BATCH frames
   * from the stream's encoder otherwise. Returns once every page is queued on its stream.
   */
  private async sendPages(pages: Iterable<number> | Bitmap, seq: number): Promise<number> {
    const n = this.streams.length;
    let sent = 0;
    if (pages instanceof Bitmap) {
      // A round's pages, a run of consecutive pages at a time (a stream's share of it at a time).
      for (const [first, count] of pages.runs()) {
        for (let p = first, end = first + count; p < end;) {
          this.checkAbort();
          const s = this.streams[streamOf(p, n)];
          const k = Math.min(end - p, pagesOnStream(p, n), s.room);
          s.addRun(p, k);
          p += k;
          if (s.full) sent += await this.flush(s, seq);
        }
      }
      for (const s of this.streams) sent += await this.flush(s, seq);
      return sent;
    }
    for (const p of pages) {
      this.checkAbort();
      const s = this.streams[streamOf(p, n)];
      s.add(p);
      if (s.full) sent += await this.flush(s, seq);
    }
    for (const s of this.streams) sent += await this.flush(s, seq);
    return sent;
  }

  /**
   * While this says so, the event loop turns after each batch written (flush): the
   * stop-and-copy's pages wait for nothing, so without it a message the round waits for (the
   * paused VM's state) stayed unread until the last page was written.
   */
  private yieldWhile: (() => boolean) | null = null;
  /** When the event loop last turned for other work between batches (see {@link TURN_EVERY_MS}). */
  private lastTurn = 0;

  private async flush(s: SendStream, seq: number): Promise<number> {
    const { pages, bytes } = await s.flush(seq);
    if (pages === 0) return 0;
    this.bytesSent += bytes;
    this.pagesSent += pages;
    this.pagesRemaining = Math.max(0, this.pagesRemaining - pages);
    this.report();
    if (this.yieldWhile?.() || this.deps.clock.now() - this.lastTurn >= TURN_EVERY_MS) {
      await this.deps.yieldToIo();
      this.lastTurn = this.deps.clock.now();
    }
    return pages;
  }

  private async drainStreams(): Promise<void> {
    await Promise.all(this.streams.map((s) => s.drain()));
  }

  // ------------------------------------------------------------------ phases

  private async handshake(): Promise<void> {
    const names: CodecName[] = [...(this.opts.codecs ?? [])];
    if (this.opts.gang && !names.includes('dedup')) names.push('dedup');
    const wantStreams = Math.max(1, Math.min(Math.floor(this.opts.streams ?? 1), MAX_STREAMS));
    if (wantStreams > 1 && !this.opts.connect) throw new MigrationError('ERR_MIGRATION_STREAMS', `${wantStreams} streams need a way to open more connections (connect)`);
    const offer = { modes: [this.opts.mode], maxStreams: wantStreams, codecs: codecOffer(names) };
    await this.framed.send({
      type: 'HELLO', minVersion: PROTOCOL_VERSION, maxVersion: PROTOCOL_VERSION, vmName: this.vm.name,
      memoryBytes: this.vm.memoryBytes, guestBytes: this.vm.guestPages() * PAGE_SIZE, pageSize: PAGE_SIZE,
      moduleSha256: this.vm.moduleSha256, moduleBytes: this.vm.module.length, config: this.vm.config, offer,
      ...(this.opts.gang ? { gang: this.opts.gang.id } : {}),
      ...(this.vm.guest ? { guest: clipUtf8(this.vm.guest, MAX_NAME_BYTES) } : {}),
    });
    // While the destination answers: the switchover's code, warmed once per process (it runs inside the downtime).
    warmSwitchoverOnce();
    const ack = await this.within(this.inbox.next('HELLO_ACK'), this.opts.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS, 'HELLO_ACK');
    if (!ack.accepted) throw new RemoteMigrationError(ack.code, `destination refused the migration: ${ack.message}`);
    if (ack.mode !== this.opts.mode) throw new MigrationError('ERR_MIGRATION_MODE', `destination chose ${ack.mode}, ${this.opts.mode} was asked for`);
    if (ack.streams > wantStreams) throw new MigrationError('ERR_MIGRATION_STREAMS', `destination chose ${ack.streams} streams, at most ${wantStreams} were offered`);
    for (const c of ack.codecs) {
      if (!offer.codecs.some((o) => o.id === c.id && o.name === c.name)) throw new MigrationError('ERR_MIGRATION_CODEC', `destination agreed to codec ${c.name} (${c.id}), which was not offered`);
    }
    this.agreed = ack.codecs;
    const wantFault = this.opts.mode !== 'precopy' && this.opts.faultChannel !== false;
    // The destination's fault thread first (page requests never wait behind background pages);
    // if it cannot be reached, the fault channel joins like any stream.
    if (wantFault && ack.faultPort !== undefined && ack.token !== undefined && this.opts.faultThread) {
      this.faultLink = await this.openFaultThread(this.opts.faultThread, ack.faultPort, ack.token);
      if (this.ending || this.inbox.error) {
        await this.faultLink?.close();
        throw this.inbox.error ?? new MigrationError('ERR_MIGRATION_ABORTED', 'the migration ended while the fault channel was opening');
      }
    }
    if (ack.streams > 1 && ack.token === undefined) {
      throw new MigrationError('ERR_MIGRATION_STREAMS', 'destination agreed to several streams but gave no session token');
    }
    // Extra connections join the session while the module goes and the destination readies its
    // VM, and before any page moves.
    const joins: Promise<void>[] = [];
    const dataConns: { framed: FramedConnection; inbox: Inbox }[] = [];
    for (let i = 1; i < ack.streams; i++) joins.push(this.join(ack.token!, i, 'data').then((c) => { dataConns[i - 1] = c; }));
    if (wantFault && !this.faultLink && this.opts.connect && ack.token !== undefined) joins.push(this.join(ack.token, 0, 'fault').then((c) => { this.fault = c; }));
    const joined = Promise.all(joins);
    joined.catch(() => undefined); // awaited after the module's ACK
    for (let off = 0; off < this.vm.module.length; off += MODULE_CHUNK) {
      const chunk = this.vm.module.subarray(off, Math.min(this.vm.module.length, off + MODULE_CHUNK));
      await this.framed.send({ type: 'MODULE', totalBytes: this.vm.module.length, offset: off, chunk });
      this.bytesSent += chunk.length + 16;
    }
    // The destination acknowledges once its VM is ready to start (thread loaded): only then may
    // we pause, so the destination's set-up is not part of the downtime.
    await this.within(this.inbox.ack('MODULE', this.vm.module.length), (this.opts.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS) * 4, 'the destination VM to be ready (ACK of MODULE)');
    await joined;

    const index = this.opts.gang?.index ?? (this.agreed.some((c) => c.name === 'dedup') ? new DedupIndex({ capacityBytes: vmIndexBytes(this.vm.memoryBytes) }) : undefined);
    const conns = [{ framed: this.framed, inbox: this.inbox }, ...dataConns];
    const now = () => this.deps.clock.now();
    // Post-copy sends every page once: XBZRLE, a delta against the copy sent before, would only
    // keep a copy of each page in its cache (in a kv post-copy ~6 % of the source's event loop).
    // The destination decodes whatever was agreed; the source encodes with the rest.
    const used = this.opts.mode === 'postcopy' ? this.agreed.filter((c) => c.name !== 'xbzrle') : this.agreed;
    // Encoded batches stay within what a codec takes at once (DEFAULT_BATCH_BYTES): larger, the
    // destination's lz4/zstd refused them (a batchPages above 256 with a compressor failed).
    const codecs = usesCodecs(used);
    const batchPages = codecs ? Math.min(this.batchPages, DEFAULT_BATCH_BYTES / PAGE_SIZE) : this.batchPages;
    this.streams = conns.map((c) => new SendStream(c.framed, codecs
      ? new StreamEncoder({
        agreed: used, now, index,
        ...(this.deps.blobCodecs ? { blobs: this.deps.blobCodecs } : {}),
        xbzrleCacheBytes: Math.max(PAGE_SIZE, Math.floor((this.opts.xbzrleCacheBytes ?? 64 << 20) / conns.length)),
        ...(this.opts.compression ? { compression: this.opts.compression } : {}),
      })
      : null, this.vm, batchPages, now));
  }

  /**
   * `p`, or ERR_MIGRATION_TIMEOUT when the destination stays silent for `ms` (before the
   * switchover, so the VM runs on here).
   */
  private async within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
    const ac = new AbortController();
    const timeout = this.deps.clock.sleep(ms, ac.signal).then(() => {
      throw new MigrationError('ERR_MIGRATION_TIMEOUT', `the destination did not answer within ${ms} ms (waiting for ${what})`);
    }, () => undefined as never);
    try {
      return await Promise.race([p, timeout]);
    } finally {
      ac.abort();
    }
  }

  /**
   * The fault thread's link, or null when it cannot be opened within FAULT_THREAD_OPEN_MS (a port
   * a firewall drops would otherwise hold the handshake for a TCP connect timeout): the fault
   * channel then joins like any stream. A link that opens too late is closed.
   */
  private async openFaultThread(open: NonNullable<MigrationOptions['faultThread']>, port: number, token: string): Promise<SourceFaultLink | null> {
    const opening = open(port, token);
    const ac = new AbortController();
    const late = this.deps.clock.sleep(FAULT_THREAD_OPEN_MS, ac.signal).then(() => 'late' as const, () => 'late' as const);
    const first = await Promise.race([opening.then((l) => l, () => null), late]);
    ac.abort();
    if (first !== 'late') return first;
    void opening.then((l) => l.close(), () => undefined);
    return null;
  }

  /** Opens an extra connection of this session and presents the token; resolves once the destination acknowledged it. */
  private async join(token: string, stream: number, role: 'data' | 'fault'): Promise<{ framed: FramedConnection; inbox: Inbox }> {
    const conn = await this.opts.connect!(role);
    const framed = new FramedConnection(conn);
    this.extra.push(framed);
    if (this.ending || this.inbox.error) {
      // The migration failed while this connection was being opened: nobody else will close it.
      framed.abort();
      throw this.inbox.error ?? new MigrationError('ERR_MIGRATION_ABORTED', 'the migration ended while a stream was opening');
    }
    const inbox = new Inbox(framed, (e) => {
      if (!this.ending) this.inbox.fail(e);
    });
    await framed.send({ type: 'JOIN', token, stream, role });
    await this.within(inbox.ack('JOIN', stream), this.opts.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS, `ACK of JOIN for ${role} stream ${stream}`);
    return { framed, inbox };
  }

  /** Every page of the VM but `soft` (once per migration, in post-copy inside the downtime). */
  private allBut(soft: Bitmap): Bitmap {
    return Bitmap.select(this.maxPages, this.vm.guestPages(), [], [soft]);
  }

  /**
   * Dirty logging on, then the soft pages (in that order: a page written after the soft pages were
   * read is logged). Resolves with the soft pages.
   */
  private startLogging(): Promise<Bitmap> {
    this.logging = this.vm.startDirtyLog().then(() => { this.loggingSince = this.deps.clock.now(); });
    const soft = this.logging.then(() => this.vm.softPages());
    soft.catch(() => undefined); // awaited by precopy(), or the migration failed before it
    return soft;
  }

  /**
   * Pre-copy rounds, from the soft pages read once dirty logging was on (startLogging). Returns
   * the pages still to send and whether to finish by post-copy.
   */
  private async precopy(softAtStart: Promise<Bitmap>): Promise<{ dirty: Bitmap; sentEver: Bitmap; postcopy: boolean }> {
    this.phase = 'precopy';
    // Unset options keep the policies' own defaults (PRECOPY_DEFAULTS, the hybrid policy's).
    const stopOpts = { downtimeBudgetMs: this.opts.downtimeMs, maxRounds: this.opts.maxRounds, maxSentRatio: this.opts.maxSentRatio, fixedDowntimeMs: this.opts.fixedDowntimeMs };
    const stopPolicy = new PrecopyStopPolicy(stopOpts);
    const hybrid = this.opts.mode === 'hybrid' ? new HybridSwitchPolicy({ ...stopOpts, maxPrecopyRounds: this.opts.hybridRounds }) : null;
    this.policy = hybrid ?? stopPolicy;
    const converge = this.opts.autoConverge ? new AutoConverge() : null;

    let toSend = this.allBut(await softAtStart);
    const sentEver = new Bitmap(this.maxPages);

    for (this.round = 0; ; this.round++) {
      this.checkAbort();
      const rs = this.deps.clock.now();
      const b0 = this.bytesSent;
      this.roundPages = this.pagesRemaining = toSend.count();
      this.measureFromHere();
      this.event({ type: 'round-start', t: this.now(), round: this.round });
      const n = await this.sendPages(toSend, this.round);
      // The first pass is bulk; the rounds after it send what the guest dirtied meanwhile.
      if (this.round === 0) for (const s of this.streams) s.setLimit(LATENCY_BATCH_PAGES);
      sentEver.or(toSend);
      this.event({ type: 'pages', t: this.now(), kind: this.round === 0 ? 'first' : 'resent', pages: n, bytes: this.bytesSent - b0 });
      const dirty = await this.vm.harvestDirty();
      const harvested = dirty.count();
      if (this.round === 0 && this.dirtySamples.length > 0 && this.loggingSince !== null) {
        this.dirtySamples.push([this.deps.clock.now() - this.loggingSince, harvested]);
        this.dirtyCurve = sampledDirtyCurve(this.dirtySamples);
      }
      await this.framed.send({ type: 'ROUND_END', round: this.round, pages: n, dirty: harvested });
      await this.inbox.ack('ROUND_END', this.round);
      // The guest kept writing while the round's last bytes drained out of the transport's
      // buffers and the acknowledgement came back (on a 1 Gbit/s link a buffer's worth: tens of
      // ms). The policy weighs what the next round or the stop-and-copy would send, so those pages
      // count too: without them a 50 ms budget stopped with 5.7 MiB dirty and paused with 6.4 MiB
      // (53.6 ms of downtime; bench/migration.bench.ts, wss 1/4 below the link rate).
      dirty.or(await this.vm.harvestDirty());
      const dirtyPages = dirty.count();
      const ms = Math.max(1e-3, this.deps.clock.now() - rs);
      // The policies weigh dirty *pages* against this rate, so after the first pass it is the rate
      // at which pages went, as page bytes: with codecs a re-sent page may cost a few wire bytes
      // (the next round's pages are like this round's, re-dirtied ones). The first pass uses wire
      // bytes: its pages (zero ones, first copies) say little about the dirty ones.
      const moved = this.round === 0 ? this.bytesSent - b0 : n * PAGE_SIZE;
      this.bandwidth = (moved / ms) * 1000;
      this.dirtyRate = ((dirtyPages * PAGE_SIZE) / ms) * 1000;
      this.pagesRemaining = dirtyPages;
      this.event({ type: 'round-end', t: this.now(), round: this.round, dirtyPages });
      this.event({ type: 'progress', t: this.now(), work: this.vm.progress() });
      this.report();

      const stats: PrecopyRoundStats = {
        round: this.round, pagesSentRound: n, pagesSentTotal: this.pagesSent, bytesSentTotal: this.bytesSent,
        memoryBytes: this.vm.guestPages() * PAGE_SIZE, dirtyPages, bandwidthBytesPerSec: this.bandwidth, dirtyRateBytesPerSec: this.dirtyRate,
      };
      if (hybrid) {
        const d = hybrid.decide(stats);
        if (d.action !== 'continue-precopy') {
          this.stopReason = d.reason;
          if (d.action === 'stop-and-copy') this.stopDecision(d.precopy.estimatedDowntimeMs);
          return { dirty, sentEver, postcopy: d.action === 'switch-to-postcopy' };
        }
      } else {
        const d = stopPolicy.decide(stats);
        if (d.stop) {
          this.stopReason = d.reason;
          this.stopDecision(d.estimatedDowntimeMs);
          return { dirty, sentEver, postcopy: false };
        }
      }
      if (converge) {
        const f = converge.onRound(dirtyPages * PAGE_SIZE, moved);
        this.vm.throttle(f);
        this.event({ type: 'throttle', t: this.now(), fraction: f });
      }
      toSend = dirty;
    }
  }

  /** Pre-copy ends for a stop-and-copy: what its policy estimated the downtime to be, for the report. */
  private stopDecision(estimatedDowntimeMs: number): void {
    this.event({ type: 'stop-decision', t: this.now(), estimatedDowntimeMs, fixedDowntimeMs: this.opts.fixedDowntimeMs ?? 0 });
  }

  private async pause(): Promise<void> {
    this.event({ type: 'progress', t: this.now(), work: this.vm.progress() });
    const before = (await this.vm.pause()) ?? 0;
    // Stamped when the vCPU stopped: until then the guest still runs its quantum (0.3-8 ms
    // measured here), so it is not down yet; time it spent stopped before it could say so counts
    // (the node VM exports its state first). Clients' input is held from the pause request on
    // (the client-observed downtime counts that).
    this.event({ type: 'paused', t: this.now() - Math.max(0, before) });
    this.paused = true;
    this.vm.throttle(0);
  }

  /**
   * What the switchover needs of the paused VM, asked for at once and used as each arrives (the
   * node VM has both from the pause itself: Vm.pauseWithState). A failure surfaces where each is
   * awaited.
   */
  private afterPause(): { soft: Promise<Bitmap>; state: Promise<VmWireState> } {
    const soft = this.vm.softPages();
    const state = this.vm.exportState();
    soft.catch(() => undefined);
    state.catch(() => undefined);
    return { soft, state };
  }

  /**
   * Digest of the paused source memory (soft pages excluded), taken once every page has gone:
   * source memory cannot change until release, so the digest is the same whenever it is taken,
   * and the destination reports its own in COMPLETE. Taken earlier, hashing all of memory took a
   * core the destination needed inside the downtime, and in post-copy it held the push and the
   * first page requests back by its 40-60 ms.
   */
  private async digestOfPausedMemory(soft: Bitmap): Promise<string> {
    const pages = this.vm.guestPages();
    if (this.vm.hashAllPages) {
      const hashes = await this.vm.hashAllPages();
      if (hashes.length !== pages) throw new MigrationError('ERR_MIGRATION_VERIFY', `the VM hashed ${hashes.length} pages, it has ${pages}`);
      const digest = MemoryDigest.adopt(hashes);
      for (const [first, count] of soft.runs()) digest.clearRange(first, count);
      return digest.hex((b) => this.deps.sha256Hex(b));
    }
    const digest = new MemoryDigest(pages);
    const scratch = new Uint8Array(PAGE_SIZE);
    for (let p = 0; p < pages; p++) {
      if (soft.get(p)) continue;
      if (this.vm.hashPage) digest.set(p, this.vm.hashPage(p));
      else {
        this.vm.readPage(p, scratch, 0);
        digest.set(p, this.deps.hashPage(scratch, 0));
      }
      if ((p & 511) === 511) await this.deps.yieldToIo(); // let frames (page requests) in: 512 pages ≈ 0.5 ms
    }
    return digest.hex((b) => this.deps.sha256Hex(b));
  }

  /**
   * STATE, as soon as the paused VM has exported it (`exported`, asked for right after the pause:
   * see afterPause). In stop-and-copy it goes between the final round's batches, so the
   * destination loads it while the last pages arrive. Whole frames are written synchronously, so
   * it never lands inside another frame.
   */
  private async sendState(exported: Promise<VmWireState>, soft: Bitmap): Promise<void> {
    const state = await exported;
    const pages = this.vm.guestPages();
    const stateBytes = JSON.stringify(state.devices).length + state.globals.length * 9 + 16;
    await this.framed.send({ type: 'STATE', guestBytes: state.guestBytes, globals: state.globals, devices: state.devices, soft: toWireBitmap(soft, pages) });
    this.bytesSent += stateBytes;
    this.event({ type: 'state', t: this.now(), bytes: stateBytes });
  }

  /** SWITCHOVER once STATE has gone (`stateSent`); from here the outcome is in doubt until RESUMED or ERROR. */
  private async switchover(remaining: Bitmap, stale: Bitmap, stateSent: Promise<void>): Promise<void> {
    const pages = this.vm.guestPages();
    await stateSent;
    this.checkAbort();
    this.owner = 'in-doubt';
    await this.framed.send({ type: 'SWITCHOVER', pagesRemaining: remaining.count(), digest: null, stale: toWireBitmap(stale, pages) });
    // Once the data streams have written what went before it too (not awaited: the downtime's
    // split in the report, MigrationReport.downtimeParts).
    this.drainStreams().then(() => this.event({ type: 'switchover-sent', t: this.now() }), () => undefined);
    try {
      await this.inbox.next('RESUMED');
    } catch (e) {
      // The destination says it did not start the VM: ours again. A lost connection stays in doubt.
      if (e instanceof RemoteMigrationError) this.owner = 'source';
      throw e;
    }
    this.owner = 'destination';
    this.event({ type: 'resumed', t: this.now() });
  }

  /**
   * Post-copy tail: page requests are answered at once from now on, each on the channel it came
   * in on (the fault channel when there is one), so a demand page never waits behind pushed ones;
   * the function returned pushes every remaining page over the data streams.
   */
  private postcopy(remaining: Bitmap, soft: Bitmap): () => Promise<void> {
    const pages = this.vm.guestPages();
    // The scheduler is built once SWITCHOVER has gone (a pass over every page, outside the
    // downtime); pages demanded before that wait here for it.
    let sched: PostcopyScheduler | null = null;
    const early: number[] = [];
    let demandPages = 0;
    let demandBytes = 0;
    // Demand pages, served here or by the fault thread: the push skips them, each is the
    // scheduler's newest pivot, and each counts for the report.
    const demanded = (want: number[], bytes: number) => {
      for (const p of want) {
        if (!sched) early.push(p);
        else {
          sched.onFault(p);
          sched.markPresent(p);
        }
      }
      demandPages += want.length;
      demandBytes += bytes;
      this.bytesSent += bytes;
      this.pagesSent += want.length;
    };
    const faulted = (want: number[], latencyMs: number) => {
      const done = this.now();
      for (const p of want) this.event({ type: 'fault', t: done, page: p, latencyMs });
    };
    const oneFlag = new Uint8Array(1);
    const serve = (f: PageRequestFrame, framed: FramedConnection) => {
      const t = this.now();
      // Served now with the page's final content (the source is paused), even when a push of it is
      // already under way: the vCPU is waiting.
      const answer = demandAnswer(f.id, f.pages, pages, soft, (p) => this.vm.zeroPages(p, 1, oneFlag) === 1, (p, into) => this.vm.readPage(p, into, 0));
      if (!answer) return;
      demanded(answer.want, answer.frame.length);
      framed.sendEncoded(answer.frame).then(() => faulted(answer.want, this.now() - t), () => undefined);
    };
    // Served from now on, before SWITCHOVER goes: the destination's vCPU may ask for its first
    // page before RESUMED is back here (served from RESUMED on, that page waited 10-15 ms).
    this.inbox.on('PAGE_REQUEST', (f) => serve(f, this.framed));
    this.faultLink?.serve(soft, (want, bytes, latencyMs) => {
      demanded(want, bytes);
      faulted(want, latencyMs);
    }, (e) => this.inbox.fail(e));
    const fault = this.fault;
    if (fault) fault.inbox.on('PAGE_REQUEST', (f) => serve(f, fault.framed));
    // The push, once the destination runs.
    return async () => {
      this.phase = 'postcopy';
      this.measureFromHere();
      sched = new PostcopyScheduler(pages, { prepaging: this.opts.prepaging === false ? 'none' : 'bubbling' });
      for (let p = 0; p < pages; p++) {
        if (soft.get(p)) sched.markSoft(p);
        else if (!remaining.get(p)) sched.markPresent(p);
      }
      for (const p of early.splice(0)) {
        sched.onFault(p);
        sched.markPresent(p);
      }
      let pushedPages = 0;
      let pushedBytes = 0;
      while (!sched.complete) {
        if (this.inbox.error) throw this.inbox.error;
        const batch = sched.next(this.pushPages);
        if (batch.length === 0) break;
        const b0 = this.bytesSent;
        pushedPages += await this.sendPages(batch.sort((a, b) => a - b), 0);
        pushedBytes += this.bytesSent - b0;
        for (const p of batch) sched.onSent(p);
        this.pagesRemaining = sched.remaining;
        // Writes that do not block never reach the event loop; give incoming page requests a turn.
        await this.deps.yieldToIo();
      }
      await this.drainStreams();
      this.event({ type: 'pages', t: this.now(), kind: 'pushed', pages: pushedPages, bytes: pushedBytes });
      this.event({ type: 'pages', t: this.now(), kind: 'faulted', pages: demandPages, bytes: demandBytes });
      await this.framed.send({ type: 'PUSH_DONE', pagesSent: pushedPages + demandPages });
    };
  }

  /**
   * The destination's COMPLETE says every page is there and the VM runs: from then on it depends
   * on nothing here, so that is when the migration is complete (the end of its total migration
   * time). Then the check: the digest of our paused memory against the one COMPLETE carries,
   * hashed only now so it takes no core from the destination before COMPLETE. The source is
   * released after the check; the eviction time includes it.
   */
  private async finish(soft: Bitmap): Promise<boolean> {
    this.phase = 'complete';
    await this.drainStreams();
    const complete = await this.inbox.next('COMPLETE');
    this.ending = true;
    const w = complete.faultWaits;
    if (w) this.event({ type: 'fault-waits', t: this.now(), waits: { count: w.count, mean: w.meanMs, p50: w.p50Ms, p99: w.p99Ms, max: w.maxMs } });
    this.event({ type: 'complete', t: this.now() });
    const sourceDigest = await this.digestOfPausedMemory(soft);
    const ok = complete.digest?.hex === sourceDigest;
    this.event({ type: 'verified', t: this.now(), ok });
    await this.framed.send({ type: 'ACK', acked: 'COMPLETE', value: 0 });
    await Promise.all([this.framed, ...this.extra].map((f) => f.close().catch(() => undefined)));
    await this.faultLink?.close();
    await this.vm.release();
    this.event({ type: 'source-released', t: this.now() });
    if (!ok) throw new MigrationError('ERR_MIGRATION_VERIFY', `memory digest mismatch: source ${sourceDigest.slice(0, 16)}…, destination ${complete.digest?.hex.slice(0, 16) ?? 'none'}…`);
    return ok;
  }

  /** How the pages travelled, for the report (pages on the data streams; demand pages are counted in report.pages.faulted). */
  private transfer(): TransferReport {
    const codecStats: Record<string, number> = {};
    let pageBytes = 0;
    let encodedBytes = 0;
    let compression = null as TransferReport['compression'];
    for (const s of this.streams) {
      pageBytes += s.pageBytes;
      encodedBytes += s.frameBytes;
      const e = s.encoder;
      if (!e) continue;
      for (const [k, v] of Object.entries(e.stats())) codecStats[k] = (codecStats[k] ?? 0) + v;
      if (e.controller) {
        const d = e.controller.assess();
        compression = {
          on: (compression?.on ?? false) || d.enabled,
          flips: (compression?.flips ?? 0) + e.controller.flips,
          speedup: Number.isFinite(d.speedup) ? d.speedup : (compression?.speedup ?? null),
        };
      } else if (e.compressor) compression = { on: true, flips: 0, speedup: null };
    }
    return {
      streams: this.streams.length, faultChannel: this.fault !== null || this.faultLink !== null, codecs: this.agreed.map((c) => c.name), gang: this.opts.gang?.id ?? null,
      pageBytes, encodedBytes, reduction: encodedBytes > 0 ? pageBytes / encodedBytes : 1, codecStats, compression,
    };
  }

  async run(): Promise<MigrationResult> {
    // Application degradation compares the guest's work rate during the migration with a short
    // baseline measured just before it.
    const baselineMs = this.opts.baselineMs ?? 200;
    if (baselineMs > 0) {
      this.event({ type: 'progress', t: -baselineMs, work: this.vm.progress() });
      await this.deps.clock.sleep(baselineMs, this.opts.signal);
      // The baseline is not part of the migration: every time in the report counts from here.
      this.t0 = this.deps.clock.now();
    }
    this.event({ type: 'start', t: 0 });
    this.event({ type: 'progress', t: 0, work: this.vm.progress() });
    const onAbort = () => {
      if (this.owner !== 'source') return;
      // The session may be blocked in a write behind backpressure: abort the connection so it
      // unblocks now (the destination sees the reset and discards, as for a CANCEL).
      const err = new AbortError('migration cancelled', { cause: this.opts.signal?.reason });
      this.inbox.fail(err);
      this.framed.abort(err);
      for (const f of this.extra) f.abort(err);
    };
    this.opts.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      this.checkAbort();
      // Pre-copy and hybrid: dirty logging (a variant switch on the vCPU thread) and the soft
      // pages, asked for now, come while the destination answers instead of after it.
      const atStart = this.opts.mode === 'postcopy' ? null : this.startLogging();
      await this.handshake();
      let soft: Bitmap;
      if (this.opts.mode === 'postcopy') {
        this.stopReason = 'postcopy';
        await this.pause();
        const after = this.afterPause();
        soft = await after.soft;
        const remaining = this.allBut(soft);
        this.pagesRemaining = remaining.count();
        const push = this.postcopy(remaining, soft);
        await this.switchover(remaining, new Bitmap(this.maxPages), this.sendState(after.state, soft));
        await push();
      } else {
        const { dirty, sentEver, postcopy } = await this.precopy(atStart!);
        this.phase = 'stop-and-copy';
        this.policy = null;
        await this.pause();
        this.measureFromHere();
        const after = this.afterPause();
        const last = await this.vm.harvestDirty();
        last.or(dirty);
        // Dirty logging stays on: a paused VM writes nothing, and switching variants now would
        // only add to the downtime. It is switched off if the VM resumes here after a failure.
        const pages = this.vm.guestPages();
        // The soft pages at the pause, less any dirtied since it was last sent: a page written
        // after its free report is in use again (docs/guest-abi.md), and the devices that keep
        // the report do not see guest stores.
        const softNow = after.soft.then((s) => Bitmap.select(this.maxPages, pages, [s], [last]));
        softNow.catch(() => undefined); // awaited below
        if (!postcopy) {
          // Stop-and-copy. First the pages dirtied since they were sent, without waiting for the
          // soft pages (a round trip to the paused vCPU thread); then, soft pages known, what was
          // never sent and is not soft. The state goes among the pages as soon as it is exported.
          this.round++;
          const b0 = this.bytesSent;
          const stateSent = softNow.then((s) => this.sendState(after.state, s));
          stateSent.catch(() => undefined); // awaited by switchover
          // The node VM's state and soft pages come with the pause (Vm.pauseWithState): one turn
          // of the event loop lets their message in, and STATE then leads the final round — the
          // destination loads it and hashes the last pages promptly while they arrive. Once the
          // pages flow, writes that never wait keep the event loop from taking it in.
          if (await Promise.race([softNow.then(() => true, () => true), this.deps.yieldToIo().then(() => false)])) await stateSent.catch(() => undefined);
          // Else the pages make way for it: a turn of the event loop after each batch until STATE
          // has gone (measured: it went after the last page in half the runs, 1-3 ms of downtime).
          let stateGone = false;
          stateSent.then(() => (stateGone = true), () => (stateGone = true));
          this.yieldWhile = () => !stateGone;
          let n = await this.sendPages(Bitmap.select(this.maxPages, pages, [last, sentEver]), this.round);
          soft = await softNow;
          n += await this.sendPages(Bitmap.select(this.maxPages, pages, [], [sentEver, soft]), this.round);
          this.yieldWhile = null;
          this.event({ type: 'pages', t: this.now(), kind: 'resent', pages: n, bytes: this.bytesSent - b0 });
          // No waiting for this round's ACK: the stream is ordered, STATE and SWITCHOVER follow.
          await this.framed.send({ type: 'ROUND_END', round: this.round, pages: n, dirty: 0 });
          await this.switchover(new Bitmap(this.maxPages), new Bitmap(this.maxPages), stateSent);
        } else {
          // Hybrid switching to post-copy: what the destination has is current except `stale`
          // (sent, then dirtied); the rest of what is not there yet, never sent, is pushed too.
          soft = await softNow;
          const stale = Bitmap.select(this.maxPages, pages, [last, sentEver], [soft]);
          // Current there: sent and not dirtied since. The rest, but the soft pages, is pushed.
          const current = Bitmap.select(this.maxPages, pages, [sentEver], [last]);
          const remaining = Bitmap.select(this.maxPages, pages, [], [current, soft]);
          this.pagesRemaining = remaining.count();
          const push = this.postcopy(remaining, soft);
          await this.switchover(remaining, stale, this.sendState(after.state, soft));
          await push();
        }
      }
      await this.finish(soft);
      const report = this.builder.build();
      report.transfer = this.transfer();
      return { report, stopReason: this.stopReason };
    } catch (e) {
      // What the destination said beats what its hanging up did to our writes.
      const err = this.inbox.error instanceof RemoteMigrationError ? this.inbox.error : e;
      await this.fail(err);
      throw err;
    } finally {
      this.opts.signal?.removeEventListener('abort', onAbort);
    }
  }

  /** Before the switchover the VM is ours: resume it and tell the peer. Afterwards, report only. */
  private async fail(e: unknown): Promise<void> {
    this.phase = 'failed';
    if (this.owner === 'source') {
      const msg = e instanceof Error ? e.message : String(e);
      const frame = e instanceof AbortError
        ? { type: 'CANCEL' as const, reason: msg.slice(0, 1000) }
        : { type: 'ERROR' as const, code: e instanceof FerryError && /^ERR_[A-Z0-9_]+$/.test(e.code) && !(e instanceof RemoteMigrationError) ? e.code : 'ERR_MIGRATION_ABORTED', message: msg.slice(0, 1000) };
      await this.framed.send(frame).catch(() => undefined);
      this.vm.throttle(0);
      if (this.logging) await this.logging.then(() => this.vm.stopDirtyLog()).catch(() => undefined);
      if (this.paused) await this.vm.resume();
    }
    this.ending = true;
    this.framed.abort(e instanceof Error ? e : undefined);
    for (const f of this.extra) f.abort(e instanceof Error ? e : undefined);
    await this.faultLink?.close().catch(() => undefined);
  }
}

/**
 * Migrates `vm` over `conn` to a destination running {@link serveDestination}. Resolves with the
 * report once the destination holds every page and the memory digest matched; rejects with a
 * named error otherwise — before the switchover the VM is running on the source again.
 */
export function migrateSource(conn: Connection, vm: SourceVm, deps: EngineDeps, opts: MigrationOptions): Promise<MigrationResult> {
  return new SourceSession(conn, vm, deps, opts).run();
}

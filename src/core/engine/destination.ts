/**
 * The destination side of a live migration. It admits (or refuses) the VM, fills guest memory as
 * pages arrive — on the control connection and on any parallel data streams that joined the
 * session, decoding what the agreed codecs encoded — checks the memory digest, and starts the VM:
 * at once with every page present (pre-copy), or with absent pages that fault in on demand
 * (post-copy, hybrid), their requests travelling on a fault channel of their own when the source
 * opened one.
 *
 * {@link MigrationAcceptor} is the entry point for a host: it takes every incoming connection,
 * starts a session for a HELLO and hands a JOIN to the session whose token it presents.
 */
import { Bitmap } from '../bitmap.js';
import { decodeOne, type EncodedBatch } from '../codec/codec.js';
import { DedupStore } from '../codec/dedup.js';
import { FerryError, ProtocolError } from '../errors.js';
import { Histogram, type HistogramSummary } from '../metrics.js';
import { PAGE_SIZE } from '../pages.js';
import {
  Encoding, MAX_STREAMS, PROTOCOL_VERSION, SESSION_TOKEN_BYTES,
  type BatchFrame, type CodecOffer, type FaultWaits, type HelloFrame, type JoinFrame, type MigrationMode, type PagesFrame, type RunExtent, type RunFrame,
} from '../protocol/frames.js';
import { FramedConnection } from '../transport/framed.js';
import type { Connection } from '../transport/transport.js';
import { GANG_INDEX_BYTES, StreamDecoder, acceptCodecs, isMissingDefinition, storeBytesFor, usesCodecs, vmIndexBytes } from './codecs.js';
import { Inbox, MemoryDigest, MigrationError, RemoteMigrationError, absentAtSwitchover, fromWireBitmap, warmSwitchoverOnce } from './common.js';
import type { DestinationFactory, DestinationFaultLink, DestinationVm, EngineDeps, FaultThreadEvents, FaultThreads } from './types.js';

export interface DestinationOutcome {
  vmName: string;
  mode: MigrationMode;
  /**
   * Digest of memory as at the pause equalled the source's; null when the source sent no digest
   * at switchover (ferry's source checks after the start, against the digest in COMPLETE).
   */
  verified: boolean | null;
  pagesReceived: number;
  /**
   * Post-copy: faults the vCPU took, and how long it waited for each, measured where it blocks:
   * by the VM when it can (DestinationVm.faultWaits: stopped → running on), else the fault
   * service's measure (`faultServiceMs`).
   */
  faults: number;
  faultLatencyMs: HistogramSummary;
  /** Post-copy: the fault service's side of each fault: request sent → page installed, both network legs included. */
  faultServiceMs: HistogramSummary;
  /** Destination clock: switchover frame received → VM running. */
  startMs: number;
  /** Connections that carried pages, and whether page requests had their own. */
  streams: number;
  faultChannel: boolean;
  /** The source acknowledged COMPLETE (released its copy). False when its ACK never came: the VM runs here all the same. */
  acknowledged: boolean;
}

export interface MigrationAcceptorInit {
  /** Most parallel data streams granted to one migration (default 16). */
  maxStreams?: number;
  /** A stream held back for a dedup definition that does not arrive fails the migration after this long, ms (default 30 s). */
  definitionWaitMs?: number;
  /**
   * How long a pre-copy or hybrid migration waits for its destination VM to be ready to start
   * (vCPU thread loaded) while pages already flow, before it fails with ERR_MIGRATION_TIMEOUT.
   * Default 120 s, as long as the source waits for a post-copy destination's module ACK.
   */
  vmReadyWaitMs?: number;
  /** Post-copy faults served on threads of their own (see FaultThreads); without it, on the session's. */
  faultThreads?: FaultThreads;
}

interface GangEntry {
  store: DedupStore;
  members: Set<DestinationSession>;
}

/**
 * Accepts the connections of incoming migrations: a HELLO starts a session, a JOIN adds a
 * parallel data stream or the fault channel to the session its token names. Sessions that name
 * the same gang share one de-duplication store.
 */
export class MigrationAcceptor {
  private readonly sessions = new Map<string, DestinationSession>();
  private readonly gangs = new Map<string, GangEntry>();
  readonly maxStreams: number;
  readonly definitionWaitMs: number;
  readonly vmReadyWaitMs: number;
  readonly faultThreads: FaultThreads | null;

  constructor(private readonly deps: EngineDeps, init: MigrationAcceptorInit = {}) {
    this.faultThreads = init.faultThreads ?? null;
    this.maxStreams = Math.max(1, Math.min(init.maxStreams ?? 16, MAX_STREAMS));
    this.definitionWaitMs = init.definitionWaitMs ?? 30_000;
    this.vmReadyWaitMs = init.vmReadyWaitMs ?? 120_000;
  }

  /**
   * Serves one incoming connection. For a HELLO, resolves with the migration's outcome once it
   * ended (rejects if it failed); for a JOIN, resolves with null once the connection belongs to
   * its session. Anything else is refused with an ERROR frame and a named error.
   */
  async accept(conn: Connection, factory: DestinationFactory): Promise<DestinationOutcome | null> {
    const framed = new FramedConnection(conn);
    const first = await framed.next().catch((e: Error) => {
      framed.abort(e);
      throw e;
    });
    if (first?.type === 'HELLO') return new DestinationSession(framed, first, factory, this.deps, this).run();
    const refuse = async (code: string, message: string): Promise<never> => {
      await framed.send({ type: 'ERROR', code, message }).catch(() => undefined);
      await framed.close().catch(() => undefined);
      throw new MigrationError(code, message);
    };
    if (first?.type !== 'JOIN') return refuse('ERR_PROTOCOL_SEQUENCE', first ? `a migration connection starts with HELLO or JOIN, not ${first.type}` : 'the connection closed before its first frame');
    const session = this.sessions.get(first.token);
    if (!session) return refuse('ERR_MIGRATION_UNKNOWN_SESSION', 'JOIN names no migration in progress here');
    try {
      await session.join(framed, first);
    } catch (e) {
      return refuse(e instanceof FerryError ? e.code : 'ERR_MIGRATION_JOIN', (e as Error).message);
    }
    return null;
  }

  /** @internal */
  register(token: string, s: DestinationSession): void {
    this.sessions.set(token, s);
  }

  /** @internal */
  unregister(token: string | null, s: DestinationSession, gang: string | null): void {
    if (token && this.sessions.get(token) === s) this.sessions.delete(token);
    if (gang) {
      const g = this.gangs.get(gang);
      g?.members.delete(s);
      if (g && g.members.size === 0) this.gangs.delete(gang);
    }
  }

  /** @internal The dedup store a session uses: its gang's, shared, or its own. */
  storeFor(s: DestinationSession, hello: HelloFrame): DedupStore {
    if (!hello.gang) return new DedupStore({ capacityBytes: storeBytesFor(vmIndexBytes(hello.memoryBytes)) });
    let g = this.gangs.get(hello.gang);
    if (!g) this.gangs.set(hello.gang, (g = { store: new DedupStore({ capacityBytes: storeBytesFor(GANG_INDEX_BYTES) }), members: new Set() }));
    g.members.add(s);
    return g.store;
  }

  /** @internal A session of `gang` applied definitions: streams of the others waiting for one may go on. */
  wakeGang(gang: string, from: DestinationSession): void {
    for (const m of this.gangs.get(gang)?.members ?? []) if (m !== from) m.retryBlocked();
  }
}

/** A single migration on a single connection (no parallel streams): {@link MigrationAcceptor} for one connection. */
export async function serveDestination(conn: Connection, factory: DestinationFactory, deps: EngineDeps): Promise<DestinationOutcome> {
  const outcome = await new MigrationAcceptor(deps).accept(conn, factory);
  if (!outcome) throw new MigrationError('ERR_MIGRATION_UNKNOWN_SESSION', 'the connection joined no migration');
  return outcome;
}

/** Page entries of a PAGES, BATCH or RUN frame, read uniformly. */
interface Entries {
  seq: number;
  count: number;
  index(k: number): number;
  codec(k: number): number;
  data(k: number): Uint8Array;
  /** The page's bytes are in guest memory already (a RUN extent read straight into it). */
  inPlace(k: number): boolean;
}

const notInPlace = () => false;

/** The entries of a RUN frame's extents `ext` (its round `seq`). */
function runEntries(seq: number, ext: readonly RunExtent[]): Entries {
  // Entry k is page `at[k]` of extent `of[k]` (a batch of pages at most, so one pass is cheap).
  let count = 0;
  for (const e of ext) count += e.count;
  const of = new Uint32Array(count);
  const at = new Uint32Array(count);
  for (let i = 0, k = 0; i < ext.length; i++) {
    for (let j = 0; j < ext[i].count; j++, k++) {
      of[k] = i;
      at[k] = j;
    }
  }
  return {
    seq, count, codec: () => Encoding.RAW,
    index: (k) => ext[of[k]].first + at[k],
    data: (k) => ext[of[k]].data.subarray(at[k] * PAGE_SIZE, (at[k] + 1) * PAGE_SIZE),
    inPlace: (k) => ext[of[k]].inPlace === true,
  };
}

function pagesEntries(f: PagesFrame): Entries {
  const t = f.table;
  if (t) return { seq: f.seq, count: t.count, index: (k) => t.index(k), codec: (k) => t.encoding(k), data: (k) => t.data(k), inPlace: notInPlace };
  return { seq: f.seq, count: f.pages.length, index: (k) => f.pages[k].index, codec: (k) => f.pages[k].encoding, data: (k) => f.pages[k].data, inPlace: notInPlace };
}

function batchEntries(seq: number, b: EncodedBatch): Entries {
  return {
    seq, count: b.count, index: (k) => b.indices[k], codec: (k) => b.codecIds[k],
    data: (k) => b.bytes.subarray(b.offsets[k], b.offsets[k + 1]), inPlace: notInPlace,
  };
}

const FAULT_STREAM = 'fault channel';
/** Pushed pages applied per event-loop turn while the VM runs. */
const POSTCOPY_SLICE_PAGES = 32;
/**
 * What a zero page counts for in a slice: its apply marks it present and books its hash, and
 * writes nothing when the page was never installed (memory starts zero). Counted as a whole
 * page, a mostly-zero VM's post-copy push took 2048 event-loop turns per 256 MiB.
 */
const ZERO_PAGE_SLICE_COST = 1 / 8;
/**
 * Frames a stream holds before its connection stops reading. Post-copy applies pushed pages in
 * slices, slower than a socket delivers them: unbounded, the frames piled up here, each in a
 * fresh buffer (page-faulted in, then garbage), and the reading starved the event loop that
 * serves faults (10–30 ms stalls measured). Bounded, the decoder's recycled buffers suffice.
 */
const RX_QUEUE_FRAMES = 2;
/**
 * Post-copy with a fault channel: while the vCPU waits for a demand page, pushed pages wait too
 * (at most this long, ms), so the event loop is free the moment the page lands instead of busy
 * with a slice of background pages — Hines' "a fault is served ahead of background pages", on
 * the receiving side.
 */
const FAULT_PRIORITY_MS = 2;

/** One connection's pages, applied in arrival order; held back while a dedup definition is missing. */
class RxStream {
  readonly queue: (PagesFrame | BatchFrame | RunFrame)[] = [];
  cur: Entries | null = null;
  k = 0;
  blockedAt: number | null = null;
  /** A continuation of this stream's drain is scheduled (post-copy applies in slices). */
  resuming = false;
  /** Its page frames go to the session as they come (handlers registered, guest memory set up). */
  live = false;
  /** Cancels the watchdog of the current wait for a definition. */
  watchdog: AbortController | null = null;

  unblock(): void {
    this.blockedAt = null;
    this.watchdog?.abort();
    this.watchdog = null;
  }
  /** The frame `cur` came from, while it is being applied. */
  frame: PagesFrame | BatchFrame | RunFrame | null = null;

  /**
   * @param framed the connection the stream's frames come in on: a PAGES frame applied in full
   *   (every page copied into guest memory; no codec keeps a reference) gives its buffer back to
   *   that connection's decoder for the next frame.
   */
  constructor(readonly name: string, readonly decoder: StreamDecoder | null, readonly framed: FramedConnection, private readonly inbox: Inbox) {}

  /** A frame came in: the connection stops reading once the stream holds enough. */
  add(f: PagesFrame | BatchFrame | RunFrame): void {
    this.queue.push(f);
    if (this.queue.length >= RX_QUEUE_FRAMES) this.inbox.pause();
  }

  /** The next frame to apply. */
  take(): PagesFrame | BatchFrame | RunFrame | undefined {
    const f = this.queue.shift();
    if (this.queue.length < RX_QUEUE_FRAMES) this.inbox.resume();
    return f;
  }

  /** The current frame is applied in full. */
  done(): void {
    if ((this.frame?.type === 'PAGES' || this.frame?.type === 'RUN') && !this.decoder) this.framed.decoder.recycle(this.frame);
    this.frame = null;
    this.cur = null;
  }
}

class DestinationSession {
  private readonly inbox: Inbox;
  private vm: DestinationVm | null = null;
  private started = false;
  /** The VM could start now (vCPU thread loaded): rounds may be acknowledged. */
  private warmed = false;
  private maxPages = 0;
  private received = new Bitmap(0);
  private pagesReceived = 0;
  private absent: Bitmap | null = null;

  /**
   * Pages now arrive for a VM that runs (or is starting): only absent pages are installed, each
   * counted as it arrives. From the moment the absent pages are known at a post-copy switchover,
   * not from the start's end: the source may answer the vCPU's first fault before the start has
   * returned here.
   */
  private get postStart(): boolean {
    return this.started || this.absent !== null;
  }
  private missing = 0;
  private digest: MemoryDigest | null = null;
  private readonly faultAt = new Map<number, number>();
  /** Pushed-page streams waiting for the outstanding faults to be served (see FAULT_PRIORITY_MS). */
  private faultServed: (() => void)[] = [];
  private readonly latency = new Histogram();
  private faults = 0;
  private allArrived: (() => void) | null = null;
  private pageError: Error | null = null;
  private token: string | null = null;
  private agreed: CodecOffer[] = [];
  private store: DedupStore | null = null;
  private streamsAgreed = 1;
  private readonly rx: RxStream[] = [];
  private readonly joined = new Map<number, { framed: FramedConnection; inbox: Inbox }>();
  private fault: { framed: FramedConnection; inbox: Inbox } | null = null;
  /** Pages applied per round (PAGES/BATCH `seq` of non-demand batches) and the ROUND_ENDs waiting for theirs. */
  private readonly applied = new Map<number, number>();
  private readonly roundEnds: { round: number; pages: number }[] = [];
  private roundsSettled: (() => void) | null = null;
  private ending = false;
  private readonly gang: string | null;

  constructor(private readonly framed: FramedConnection, private readonly hello: HelloFrame, private readonly factory: DestinationFactory, private readonly deps: EngineDeps, private readonly acceptor: MigrationAcceptor) {
    this.inbox = new Inbox(this.framed);
    this.gang = hello.gang ?? null;
  }

  // ------------------------------------------------------------------ joining connections

  /** A JOIN for this session arrived on `framed`. */
  async join(framed: FramedConnection, f: JoinFrame): Promise<void> {
    if (this.ending || this.inbox.error) throw new MigrationError('ERR_MIGRATION_JOIN', 'the migration is over');
    if (f.role === 'data') {
      if (f.stream >= this.streamsAgreed) throw new MigrationError('ERR_MIGRATION_JOIN', `stream ${f.stream} is beyond the ${this.streamsAgreed} agreed`);
      if (this.joined.has(f.stream)) throw new MigrationError('ERR_MIGRATION_JOIN', `stream ${f.stream} joined already`);
    } else if (this.fault) throw new MigrationError('ERR_MIGRATION_JOIN', 'the fault channel joined already');
    framed.decoder.allowEncodings(this.agreed.map((c) => c.id));
    const inbox = new Inbox(framed, (e) => {
      if (!this.ending) this.inbox.fail(e);
    });
    const conn = { framed, inbox };
    if (f.role === 'data') {
      this.joined.set(f.stream, conn);
      const s = this.newStream(`stream ${f.stream}`, framed, inbox);
      inbox.on('PAGES', (p) => this.enqueue(s, p));
      inbox.on('BATCH', (b) => this.enqueue(s, b));
      inbox.on('RUN', (r) => this.enqueue(s, r));
      s.live = true;
    } else {
      this.fault = conn;
      // Demand pages: raw or zero, applied as they come.
      const s = this.newStream(FAULT_STREAM, framed, inbox);
      inbox.on('PAGES', (p) => this.enqueue(s, p));
    }
    await framed.send({ type: 'ACK', acked: 'JOIN', value: f.stream });
  }

  private newStream(name: string, framed: FramedConnection, inbox: Inbox): RxStream {
    const s = new RxStream(name, usesCodecs(this.agreed) ? new StreamDecoder(this.agreed, this.deps.blobCodecs ?? {}, this.store, this.framed.decoder.limits.maxPagesPerBatch) : null, framed, inbox);
    this.rx.push(s);
    framed.decoder.setRunSink((first, count) => this.runTarget(s, first, count));
    return s;
  }

  /**
   * Where a RUN extent's pages go as they arrive: straight into guest memory before the start,
   * when nothing of this connection is waiting to be applied — an earlier frame applied after
   * the run would put older bytes over newer ones (a page always travels on one connection, so
   * other connections cannot). Otherwise null: the decoder keeps the pages and they are applied
   * in order like any others.
   */
  private runTarget(s: RxStream, first: number, count: number): Uint8Array | null {
    const vm = this.vm;
    if (!vm?.pagesView || !s.live || !this.memoryUp || this.postStart || this.pageError) return null;
    if (first + count > this.maxPages) throw new ProtocolError('ERR_PROTOCOL_MALFORMED', `pages ${first}…${first + count - 1} are beyond the VM's ${this.maxPages} pages`);
    if (s.queue.length > 0 || s.cur !== null || s.blockedAt !== null || s.resuming || s.framed.queuedFrames > 0) return null;
    vm.ensurePages(first + count);
    return vm.pagesView(first, count);
  }

  // ------------------------------------------------------------------ applying pages

  private enqueue(s: RxStream, f: PagesFrame | BatchFrame | RunFrame): void {
    if (this.pageError) return;
    s.add(f);
    // Before the VM exists (a data stream can be quicker than the control connection) frames wait.
    if (this.vm && s.blockedAt === null && !s.resuming) this.drain(s);
  }

  /** Applies what `s` holds, in order, until it is empty or waits for a dedup definition. */
  private drain(s: RxStream): void {
    let progressed = false;
    let slice = 0;
    try {
      for (;;) {
        if (!s.cur) {
          const f = s.take();
          if (!f) break;
          s.frame = f;
          if (f.type === 'PAGES') s.cur = pagesEntries(f);
          else if (f.type === 'RUN') {
            const rest = this.installInPlace(s, f);
            if (rest.length < f.extents.length) progressed = true;
            s.cur = runEntries(f.seq, rest);
          }
          else {
            if (!s.decoder) throw new ProtocolError('ERR_PROTOCOL_UNKNOWN_ENCODING', 'BATCH frame, but no codec was agreed');
            s.cur = batchEntries(f.seq, s.decoder.unpack(f.blobCodec, f.data, f.pages));
          }
          s.k = 0;
          if ((f.type === 'PAGES' || f.type === 'BATCH') && f.demand) s.cur = { ...s.cur, seq: -1 };
        }
        const e = s.cur;
        while (s.k < e.count) {
          // While the VM runs, pushed pages are applied in slices so a demand page (fault channel)
          // or a fault notification waits for one slice at most, not for a whole batch.
          const faultFirst = this.started && this.fault !== null && !this.threaded && this.faultAt.size > 0;
          if (this.started && s.name !== FAULT_STREAM && (slice >= POSTCOPY_SLICE_PAGES || faultFirst)) {
            s.resuming = true;
            void (faultFirst ? this.faultsServed() : this.deps.yieldToIo()).then(() => {
              s.resuming = false;
              if (s.blockedAt === null && !this.pageError) this.drain(s);
            });
            return;
          }
          if (!this.apply(s, e.index(s.k), e.codec(s.k), e.data(s.k), e.inPlace(s.k))) {
            if (s.blockedAt === null) {
              s.blockedAt = this.deps.clock.now();
              this.watch(s);
            }
            return;
          }
          if (s.blockedAt !== null) s.unblock();
          progressed = true;
          slice += e.codec(s.k) === Encoding.ZERO ? ZERO_PAGE_SLICE_COST : 1;
          if (e.seq >= 0) this.applied.set(e.seq, (this.applied.get(e.seq) ?? 0) + 1);
          s.k++;
        }
        s.done();
      }
      if (s.blockedAt !== null) s.unblock();
    } catch (err) {
      this.pageError = err as Error;
      this.inbox.fail(this.pageError);
      return;
    } finally {
      if (progressed) {
        this.settleRounds();
        if (this.rx.some((x) => x !== s && x.blockedAt !== null)) queueMicrotask(() => this.retryBlocked());
        if (this.gang) queueMicrotask(() => this.acceptor.wakeGang(this.gang!, this));
      }
    }
  }

  /** Resolves once no fault is outstanding, or after FAULT_PRIORITY_MS. */
  private faultsServed(): Promise<void> {
    const ac = new AbortController();
    let served!: () => void;
    return Promise.race([
      new Promise<void>((r) => this.faultServed.push((served = r))),
      this.deps.clock.sleep(FAULT_PRIORITY_MS, ac.signal).catch(() => undefined),
    ]).finally(() => {
      ac.abort();
      const i = this.faultServed.indexOf(served);
      if (i >= 0) this.faultServed.splice(i, 1);
    });
  }

  /** Streams waiting for a definition try again (one may have landed on another stream or VM). */
  retryBlocked(): void {
    for (const s of this.rx) if (s.blockedAt !== null) this.drain(s);
  }

  /** One watchdog per wait: it fails the migration if the definition never lands. */
  private watch(s: RxStream): void {
    const since = s.blockedAt;
    const ac = (s.watchdog = new AbortController());
    void this.deps.clock.sleep(this.acceptor.definitionWaitMs, ac.signal).then(() => {
      if (s.blockedAt !== since || this.pageError) return;
      this.retryBlocked();
      if (s.blockedAt !== since) return;
      this.pageError = new MigrationError('ERR_CODEC_STATE', `${s.name} waited ${this.acceptor.definitionWaitMs} ms for a de-duplication definition that never arrived`);
      this.inbox.fail(this.pageError);
    }, () => undefined);
  }

  /** Guest memory is set up and the control connection's pages flow: RUN pages may land in place. */
  private memoryUp = false;

  /** Post-copy faults are served by the fault thread (its link joined and the VM took it). */
  private threaded = false;
  /** The session's link to the destination's fault thread, if it has one. */
  private faultLink: DestinationFaultLink | null = null;

  /** With a fault thread, exactly one of it and this thread installs each page. */
  private claimed(page: number): boolean {
    return !this.threaded || this.vm!.claim!(page);
  }

  /**
   * Before the start, a RUN extent read straight into guest memory (see runTarget) needs no page
   * to be applied, only bookkeeping: each such extent is taken in one step here instead of page
   * by page. Returns the extents left for the page-by-page path.
   */
  private installInPlace(s: RxStream, f: RunFrame): readonly RunExtent[] {
    if (this.postStart || s.decoder !== null) return f.extents;
    const left: RunExtent[] = [];
    for (const e of f.extents) {
      if (e.inPlace !== true) {
        left.push(e);
        continue;
      }
      // runTarget checked the extent against the VM's pages and ensured them.
      this.received.setRange(e.first, e.first + e.count);
      this.pagesReceived += e.count;
      if (this.hashQueue) this.hashQueue.addRange(e.first, e.count);
      else for (let k = 0; k < e.count; k++) this.preHashes[e.first + k] = this.deps.hashPage(e.data, k * PAGE_SIZE);
      this.applied.set(f.seq, (this.applied.get(f.seq) ?? 0) + e.count);
    }
    return left;
  }

  private scratch = new Uint8Array(PAGE_SIZE);
  /** Hashes of pages as installed before the start, by page (valid where `received` is set). */
  private preHashes: BigUint64Array = new BigUint64Array(0);
  /** Where installed pages are hashed before the start, when the VM hashes them off this thread. */
  private hashQueue: ReturnType<NonNullable<DestinationVm['pageHashes']>> | null = null;
  private zeroHashValue: bigint | null = null;
  private zeroHash(): bigint {
    return (this.zeroHashValue ??= this.deps.hashPage(new Uint8Array(PAGE_SIZE), 0));
  }

  /**
   * Installs one page (before the start the last copy wins; after it only absent pages are
   * installed — a page the guest already has stays as the guest left it — but every codec entry is
   * still decoded, so codec state stays in step). False when a dedup reference must wait.
   */
  private apply(s: RxStream, page: number, codec: number, data: Uint8Array, inPlace: boolean): boolean {
    const vm = this.vm!;
    if (page >= this.maxPages) throw new ProtocolError('ERR_PROTOCOL_MALFORMED', `page ${page} is beyond the VM's ${this.maxPages} pages`);
    const wanted = !this.postStart || this.absent!.get(page);
    if (!this.postStart) vm.ensurePages(page + 1);
    // The bytes installed, to hash (null: a zero page).
    let content: Uint8Array | null;
    if (codec === Encoding.ZERO) {
      if (data.length !== 0) throw new ProtocolError('ERR_PROTOCOL_MALFORMED', `zero page ${page} carries ${data.length} bytes`);
      if (!wanted || !this.claimed(page)) return true;
      // Guest memory starts zero (DestinationVm): a page never installed needs no write.
      if (this.received.get(page)) vm.zeroPage(page);
      s.decoder?.decoder.delivered(page, (this.scratch.fill(0), this.scratch));
      content = null;
    } else if (codec === Encoding.RAW) {
      if (data.length !== PAGE_SIZE) throw new ProtocolError('ERR_PROTOCOL_MALFORMED', `raw page ${page} is ${data.length} bytes, not ${PAGE_SIZE}`);
      s.decoder?.decoder.delivered(page, data);
      if (!wanted || !this.claimed(page)) return true;
      if (!inPlace) vm.writePage(page, data, 0);
      content = data;
    } else {
      if (!s.decoder) throw new ProtocolError('ERR_PROTOCOL_UNKNOWN_ENCODING', `page ${page}: encoding ${codec} was not agreed`);
      // Delta codecs apply to what this side holds now.
      vm.readPage(page, this.scratch, 0);
      try {
        decodeOne(s.decoder.decoder, page, codec, data, this.scratch);
      } catch (e) {
        if (isMissingDefinition(e)) return false;
        throw e;
      }
      if (!wanted || !this.claimed(page)) return true;
      vm.writePage(page, this.scratch, 0);
      content = this.scratch;
    }
    if (!this.postStart) {
      this.pagesReceived++;
      this.received.set(page);
      // Before the start, hashing may wait: off this thread when the VM offers it (see pageHashes).
      if (this.hashQueue) this.hashQueue.add(page);
      else this.preHashes[page] = content === null ? this.zeroHash() : this.deps.hashPage(content, 0);
      return true;
    }
    const hash = content === null ? this.zeroHash() : this.deps.hashPage(content, 0);
    vm.markPresent(page);
    const t = this.faultAt.get(page);
    if (t !== undefined) {
      this.latency.record(this.deps.clock.now() - t);
      this.faultAt.delete(page);
      if (this.faultAt.size === 0 && this.faultServed.length > 0) for (const w of this.faultServed.splice(0)) w();
    }
    this.arrived(page, hash);
    return true;
  }

  /** A page absent at the start is here now (installed by this thread or the fault thread). */
  private arrived(page: number, hash: bigint): void {
    this.pagesReceived++;
    this.digest!.set(page, hash);
    this.absent!.clear(page);
    if (--this.missing === 0) this.allArrived?.();
  }

  /** What the fault thread did, folded into this session's accounting (see FaultThreadEvents). */
  private threadEvents(): FaultThreadEvents {
    return {
      // The fault thread alone counts faults and their waits (it asked for the pages).
      installed: (page, hash, waitedMs) => {
        if (waitedMs !== null) {
          this.faults++;
          this.latency.record(waitedMs);
        }
        if (this.absent?.get(page)) this.arrived(page, hash); // else this thread installed it first
      },
      failed: (e) => {
        this.pageError ??= e;
        this.inbox.fail(e);
      },
    };
  }

  /** Acknowledges each ROUND_END once all of its round's pages are applied, in order. */
  private settleRounds(): void {
    if (!this.warmed) return; // the VM cannot start yet: the source must not pause (see serve)
    while (this.roundEnds.length > 0) {
      const r = this.roundEnds[0];
      if ((this.applied.get(r.round) ?? 0) < r.pages) return;
      this.roundEnds.shift();
      // Acknowledged once the round's pages are hashed too: the source pauses only after an
      // acknowledged round, so a hashing backlog is worked off while the VM still runs there
      // rather than inside the downtime, where it held the start back (idle pre-copy of 256 MiB:
      // 4-20 ms of a downtime with nothing left to send).
      const round = r.round;
      void this.hashesSettled().then(() => this.framed.send({ type: 'ACK', acked: 'ROUND_END', value: round })).catch(() => undefined);
    }
    this.roundsSettled?.();
  }

  /** The hash queue's waits, one at a time (it serves one waiter). */
  private hashSettling: Promise<void> = Promise.resolve();

  /** Resolves once every page queued for hashing so far is hashed (at once without a queue). */
  private hashesSettled(): Promise<void> {
    const q = this.hashQueue;
    if (!q) return Promise.resolve();
    const p = this.hashSettling.then(() => q.settled());
    this.hashSettling = p.catch(() => undefined);
    return p;
  }

  /** Resolves once every announced round's pages are applied (the switchover needs them all). */
  private allRoundsApplied(): Promise<void> {
    if (this.roundEnds.length === 0) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      this.roundsSettled = () => {
        if (this.roundEnds.length > 0) return;
        this.roundsSettled = null;
        resolve();
      };
      void this.inbox.done.then(() => reject(this.inbox.error ?? new MigrationError('ERR_MIGRATION_PEER_CLOSED', 'source went away before its pages arrived')));
    });
  }

  // ------------------------------------------------------------------ the session

  async run(): Promise<DestinationOutcome> {
    try {
      return await this.serve();
    } catch (e) {
      if (!this.started) {
        if (!(e instanceof RemoteMigrationError)) {
          const code = e instanceof FerryError && /^ERR_[A-Z0-9_]+$/.test(e.code) ? e.code : 'ERR_MIGRATION_DESTINATION';
          await this.framed.send({ type: 'ERROR', code, message: (e as Error).message.slice(0, 1000) }).catch(() => undefined);
        }
        await this.vm?.discard().catch(() => undefined);
      }
      this.ending = true;
      for (const c of this.connections()) c.abort(e instanceof Error ? e : undefined);
      // Our side closes so the source reads the ERROR; a source that does not hang up is cut off.
      void this.framed.close().catch(() => undefined);
      void this.deps.clock.sleep(2000).then(() => this.framed.abort(e instanceof Error ? e : undefined), () => undefined);
      throw e;
    } finally {
      this.ending = true;
      // Not at the switchover: waking the hashing thread to let it go took the core the start needed.
      this.hashQueue?.close();
      for (const s of this.rx) s.unblock();
      await this.faultLink?.close();
      this.acceptor.unregister(this.token, this, this.gang);
    }
  }

  private connections(): FramedConnection[] {
    return [...[...this.joined.values()].map((c) => c.framed), ...(this.fault ? [this.fault.framed] : [])];
  }

  private async serve(): Promise<DestinationOutcome> {
    const hello = this.hello;
    const mode = hello.offer.modes[0];
    let admission: Awaited<ReturnType<DestinationFactory['admit']>>;
    try {
      if (hello.pageSize !== PAGE_SIZE) throw new MigrationError('ERR_MIGRATION_PAGE_SIZE', `page size ${hello.pageSize} is not supported (ferry uses ${PAGE_SIZE})`);
      admission = await this.factory.admit(hello, mode);
    } catch (e) {
      const code = e instanceof FerryError && /^ERR_[A-Z0-9_]+$/.test(e.code) ? e.code : 'ERR_ADMISSION';
      await this.framed.send({ type: 'HELLO_ACK', accepted: false, code, message: (e as Error).message.slice(0, 1000) });
      await this.framed.close().catch(() => undefined);
      throw e;
    }
    this.agreed = acceptCodecs(hello.offer.codecs, this.deps.blobCodecs);
    this.framed.decoder.allowEncodings(this.agreed.map((c) => c.id));
    if (this.agreed.some((c) => c.name === 'dedup')) this.store = this.acceptor.storeFor(this, hello);
    this.streamsAgreed = Math.min(hello.offer.maxStreams, this.acceptor.maxStreams);
    const token = Array.from(globalThis.crypto.getRandomValues(new Uint8Array(SESSION_TOKEN_BYTES)), (b) => b.toString(16).padStart(2, '0')).join('');
    this.token = token;
    this.acceptor.register(token, this);
    const control = this.newStream('control connection', this.framed, this.inbox);
    // Post-copy faults may be served on a thread of its own: the source is told where it listens.
    let faultPort: number | undefined;
    if (mode !== 'precopy' && this.acceptor.faultThreads) {
      try {
        faultPort = await this.acceptor.faultThreads.port();
        this.faultLink = this.acceptor.faultThreads.expect(token);
      } catch {
        faultPort = undefined; // no thread: the fault channel joins as any stream does
      }
    }
    await this.framed.send({ type: 'HELLO_ACK', accepted: true, version: PROTOCOL_VERSION, mode, streams: this.streamsAgreed, codecs: this.agreed, token, ...(faultPort !== undefined ? { faultPort } : {}) });

    // While the module comes: the switchover's code, warmed once per process (it runs inside the downtime).
    warmSwitchoverOnce();
    const module = new Uint8Array(hello.moduleBytes);
    for (let got = 0; got < hello.moduleBytes;) {
      const m = await this.inbox.next('MODULE');
      if (m.offset !== got || m.totalBytes !== hello.moduleBytes) throw new ProtocolError('ERR_PROTOCOL_SEQUENCE', `module chunk at ${m.offset}, expected ${got}`);
      module.set(m.chunk, got);
      got += m.chunk.length;
    }
    if (this.deps.sha256Hex(module) !== hello.moduleSha256) throw new MigrationError('ERR_MIGRATION_MODULE_HASH', 'the guest module received does not match the hash in HELLO');

    this.maxPages = Math.floor(hello.memoryBytes / PAGE_SIZE);
    this.received = new Bitmap(this.maxPages);
    const vm = await admission.create(module);
    this.vm = vm;
    this.hashQueue = vm.pageHashes?.(this.maxPages) ?? null;
    this.preHashes = this.hashQueue?.out ?? new BigUint64Array(this.maxPages);
    // Written through once now, so its pages are faulted in here: the switchover's pass clears the
    // entry of every absent page, which in post-copy is nearly all of them (perf inside post-copy
    // downtimes: 0.3-0.7 ms of page faults in that pass for 256 MiB, up to 5 ms under load).
    this.preHashes.fill(0n);
    // VM set-up is never part of the downtime. Post-copy starts the VM right after this ACK, so
    // the ACK waits for the vCPU thread. Pre-copy and hybrid pause the source only once a round is
    // acknowledged, so pages may flow as soon as memory is set up while the thread still loads:
    // round acknowledgements wait for it instead (settleRounds).
    const warm = vm.warm();
    if (mode === 'postcopy' || !vm.memoryReady) {
      await warm;
      this.warmed = true;
    } else {
      const fail = (e: Error) => {
        this.pageError ??= e;
        this.inbox.fail(this.pageError);
      };
      const timer = new AbortController();
      warm.then(() => {
        timer.abort();
        this.warmed = true;
        this.settleRounds();
      }, (e: unknown) => {
        timer.abort();
        fail(e instanceof Error ? e : new Error(String(e)));
      });
      // Nothing else bounds this wait: the source waits for round ACKs as long as it takes.
      const limit = this.acceptor.vmReadyWaitMs;
      void this.deps.clock.sleep(limit, timer.signal).then(() => {
        if (!this.warmed) fail(new MigrationError('ERR_MIGRATION_TIMEOUT', `the destination VM was not ready to start within ${limit} ms`));
      }, () => undefined);
      await vm.memoryReady();
    }
    await this.framed.send({ type: 'ACK', acked: 'MODULE', value: hello.moduleBytes });
    vm.ensurePages(Math.ceil(hello.guestBytes / PAGE_SIZE));
    this.inbox.on('PAGES', (f) => this.enqueue(control, f));
    this.inbox.on('BATCH', (f) => this.enqueue(control, f));
    this.inbox.on('RUN', (f) => this.enqueue(control, f));
    control.live = true;
    this.memoryUp = true;
    for (const s of this.rx) if (s.queue.length) this.drain(s); // data streams may have been quicker than the ACK
    this.inbox.on('ROUND_END', (f) => {
      this.roundEnds.push({ round: f.round, pages: f.pages });
      this.settleRounds();
    });

    const state = await this.inbox.next('STATE');
    // The source is paused: the pages still to come are its last, and the downtime waits for their hashes.
    this.hashQueue?.hurry();
    const pages = Math.ceil(state.guestBytes / PAGE_SIZE);
    if (pages > this.maxPages) throw new ProtocolError('ERR_PROTOCOL_MALFORMED', `state claims ${pages} pages, more than the VM's ${this.maxPages}`);
    vm.ensurePages(pages);
    // The state is loaded at once: ferry's source sends STATE as soon as the paused VM exported
    // it, while the last pages are still on their way, and loading (a round trip to the vCPU
    // thread, which restores devices and globals) then stays out of the downtime.
    // Post-copy starts with pages absent (hybrid only if it did not converge, unknown yet).
    const loaded = vm.load({ guestBytes: state.guestBytes, globals: state.globals, devices: state.devices }, { pagesMissing: mode === 'postcopy' });
    loaded.catch(() => undefined); // start() waits for it, and fails with it
    const sw = await this.inbox.next('SWITCHOVER');
    await this.allRoundsApplied();
    if (this.pageError) throw this.pageError;
    await this.hashesSettled();
    const swAt = this.deps.clock.now();
    const soft = fromWireBitmap(state.soft, pages);
    const stale = fromWireBitmap(sw.stale, pages);
    // absent = (not received, or stale) and not soft; the hashes of the pages installed so far, as
    // they are, with soft and absent pages counting 0 for now. Inside the downtime, in one pass.
    const hashes = this.preHashes.subarray(0, pages);
    const { absent, missing } = absentAtSwitchover(this.maxPages, pages, this.received.words, stale.words, soft.words, hashes);
    if (missing !== sw.pagesRemaining) {
      throw new MigrationError('ERR_MIGRATION_MISSING_PAGES', `the source says ${sw.pagesRemaining} pages remain, but ${missing} are missing here`);
    }
    const digest = MemoryDigest.adopt(hashes);
    this.preHashes = new BigUint64Array(0);
    this.digest = digest;
    const want = sw.digest?.hex ?? null;

    if (missing === 0) {
      // Pre-copy (or hybrid that converged). A digest in SWITCHOVER is checked before anything
      // runs; ferry's source sends none (it checks ours in COMPLETE), so ours is finished once the
      // VM runs: it is built from the hashes taken as pages were installed, and stays out of the
      // downtime.
      let hex = want === null ? null : digest.hex((b) => this.deps.sha256Hex(b));
      if (want !== null && hex !== want) throw new MigrationError('ERR_MIGRATION_VERIFY', `memory digest mismatch at switchover: source ${want.slice(0, 16)}…, here ${hex!.slice(0, 16)}…`);
      await vm.start(null);
      this.started = true;
      const startMs = this.deps.clock.now() - swAt;
      await this.framed.send({ type: 'RESUMED', pagesMissing: 0 });
      hex ??= digest.hex((b) => this.deps.sha256Hex(b));
      await this.complete(hex);
      return this.outcome(hello.vmName, mode, want === null ? null : hex === want, startMs);
    }

    // Post-copy: run now, fetch absent pages on demand while the source pushes the rest.
    this.absent = absent;
    this.missing = missing;
    let requestId = 0;
    // The fault thread serves faults if the source's joined it (and not the in-session channel).
    const link = this.faultLink;
    this.threaded = this.fault === null && link !== null && link.joined && vm.claim !== undefined && (vm.serveFaultsOn?.(link, this.threadEvents()) ?? false);
    if (!this.threaded) {
      vm.onFault((page) => {
        if (!this.absent?.get(page) || this.faultAt.has(page)) return;
        this.faults++;
        this.faultAt.set(page, this.deps.clock.now());
        void (this.fault?.framed ?? this.framed).send({ type: 'PAGE_REQUEST', id: ++requestId, pages: [page] }).catch(() => undefined);
      });
    }
    const arrived = new Promise<void>((r) => (this.allArrived = r));
    await vm.start(absent);
    this.started = true;
    const startMs = this.deps.clock.now() - swAt;
    await this.framed.send({ type: 'RESUMED', pagesMissing: missing });
    await Promise.race([arrived, this.inbox.done.then(() => { throw this.inbox.error ?? new MigrationError('ERR_MIGRATION_PEER_CLOSED', 'source went away during post-copy'); })]);
    if (this.pageError) throw this.pageError;
    await this.faultLink?.close();
    await vm.allPresent();
    const hex = digest.hex((b) => this.deps.sha256Hex(b));
    await this.complete(hex);
    if (want !== null && hex !== want) throw new MigrationError('ERR_MIGRATION_VERIFY', `memory digest mismatch after post-copy: source ${want.slice(0, 16)}…, here ${hex.slice(0, 16)}…`);
    return this.outcome(hello.vmName, mode, want === null ? null : true, startMs);
  }

  /**
   * Every page is here and the VM runs: COMPLETE, then the source's ACK. From COMPLETE on the VM is
   * this host's whatever happens to the connections — the source closing its extra connections
   * before we read its ACK, or the ACK never coming, must not cost the VM.
   */
  private async complete(hex: string): Promise<void> {
    this.ending = true;
    await this.framed.send({ type: 'COMPLETE', digest: { algorithm: 'sha256', hex }, faultWaits: this.faultWaitSummary() }).catch(() => undefined);
    this.acknowledged = await this.inbox.ack('COMPLETE', 0).then(() => true, () => false);
    await this.close();
  }

  /** The source acknowledged COMPLETE (it released its copy); false when its ACK never came. */
  private acknowledged = false;

  private async close(): Promise<void> {
    this.ending = true;
    await Promise.all([this.framed, ...this.connections()].map((f) => f.close().catch(() => undefined)));
  }

  /** The vCPU's own fault waits (null: none, or the VM does not measure them). */
  private vcpuWaits(): Histogram | null {
    const w = this.vm?.faultWaits?.();
    return w && w.count > 0 ? w : null;
  }

  /** The vCPU's own fault waits, for COMPLETE. */
  private faultWaitSummary(): FaultWaits | null {
    const w = this.vcpuWaits();
    return w && { count: w.count, meanMs: w.mean, p50Ms: w.p50, p99Ms: w.p99, maxMs: w.maxValue };
  }

  /** Faults and their waits as the vCPU saw them where the VM measures that, and the fault service's side of them. */
  private faultCounts(): Pick<DestinationOutcome, 'faults' | 'faultLatencyMs' | 'faultServiceMs'> {
    const service = this.latency.summary();
    const w = this.vcpuWaits();
    return w ? { faults: w.count, faultLatencyMs: w.summary(), faultServiceMs: service } : { faults: this.faults, faultLatencyMs: service, faultServiceMs: service };
  }

  private outcome(vmName: string, mode: MigrationMode, verified: boolean | null, startMs: number): DestinationOutcome {
    return {
      vmName, mode, verified, pagesReceived: this.pagesReceived, ...this.faultCounts(), startMs,
      streams: 1 + this.joined.size, faultChannel: this.fault !== null || this.threaded, acknowledged: this.acknowledged,
    };
  }
}

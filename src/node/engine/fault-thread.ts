/**
 * Post-copy demand paging on threads of their own (see FaultThreads in core/engine/types.ts).
 *
 * The destination's fault thread listens on a TCP port the session names in HELLO_ACK. For each
 * VM it is started on, it waits for the vCPU's fault notifications (the same control words the
 * in-session service uses), asks the source for the page on the session's fault connection, and
 * installs the answer itself: copies it into guest memory, hashes it for the digest, marks it
 * present and wakes the vCPU. Pages are claimed in a shared bitmap first, so that exactly one of
 * this thread and the session's own (which applies pushed pages) installs each page.
 *
 * The source's fault thread dials that port, presents the session token, and answers page
 * requests from the paused VM's memory (shared, final since the pause).
 *
 * Neither thread does anything else, so a request and its answer never wait behind the work of
 * the threads that push and apply background pages, and a thread that mostly sleeps is scheduled
 * promptly when it wakes. The frames are those of any fault channel (docs/protocol.md).
 *
 * This file is both the main-thread side (FaultThreadListener, SourceFaultThreads) and the worker
 * (run when loaded as one).
 */
import { fileURLToPath } from 'node:url';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { PRESENCE_MAP_OFFSET, RESERVED_BYTES, RESERVED_PAGES } from '../../core/abi.js';
import { Bitmap } from '../../core/bitmap.js';
import { MigrationError, demandAnswer } from '../../core/engine/common.js';
import type { DestinationFaultLink, FaultThreadEvents, FaultThreads, SourceFaultLink } from '../../core/engine/types.js';
import { FerryError } from '../../core/errors.js';
import { PAGE_SIZE } from '../../core/pages.js';
import { type Frame, type WirePage } from '../../core/protocol/frames.js';
import { FramedConnection } from '../../core/transport/framed.js';
import { shaped, type ShapedConnectionInit } from '../../core/transport/shaped.js';
import { realClock } from '../clock.js';
import { endThread } from '../threads.js';
import { TransportError, type Connection } from '../../core/transport/transport.js';
import { Ctl } from '../vm/control.js';
import type { Vm } from '../vm/vm.js';
import { detachTcp, tcp } from '../transport/tcp.js';
import { BlockingSocket, BlockingSocketError, SendPacer, blockingSocketsAvailable } from '../net/blocking-socket.js';
import { FrameDecoder } from '../../core/protocol/decoder.js';
import { encodeFrame } from '../../core/protocol/encode.js';
import { FaultChannelBlock, installDemandPage, rehearseFaultPath, takeFaultFrame } from '../vm/fault-channel.js';
import { FAULT_THREAD_NICE, raisePriority, type FaultThreadPriority } from './thread-priority.js';

// ------------------------------------------------------------------ messages

/** What a destination VM hands its fault thread (all shared with the vCPU and the session). */
export interface FaultThreadVm {
  /** The guest memory's buffer (pages at RESERVED_BYTES + page × PAGE_SIZE, presence map inside). */
  memory: SharedArrayBuffer;
  /** The VM's control words (FAULT_PAGE, FAULT_REQ, FAULT_DONE). */
  ctl: SharedArrayBuffer;
  /**
   * The FaultChannelBlock shared with the vCPU (vm/fault-channel.ts): the install claims (first
   * one wins) and, on a detached channel, the socket the vCPU fetches pages on and its install log.
   */
  channel: SharedArrayBuffer;
  /** Guest pages. */
  pages: number;
}

/**
 * A link shaper for a fault connection's direction (see core/transport/shaped.ts), as an
 * experiment shapes every connection of a migration. Not a shared cap: a token bucket shared with
 * other connections cannot cross into a thread.
 */
export type FaultLinkShape = Pick<ShapedConnectionInit, 'bandwidthBytesPerSec' | 'burstBytes' | 'latencyMs' | 'chunkBytes'>;

/** The part of a link shaper a fault thread can apply itself; null for a shared bucket, which it cannot. */
export function faultLinkShape(init: Omit<ShapedConnectionInit, 'clock'>): FaultLinkShape | null {
  if (init.bucket) return null;
  const shape: FaultLinkShape = {};
  if (init.bandwidthBytesPerSec !== undefined) shape.bandwidthBytesPerSec = init.bandwidthBytesPerSec;
  if (init.burstBytes !== undefined) shape.burstBytes = init.burstBytes;
  if (init.latencyMs !== undefined) shape.latencyMs = init.latencyMs;
  if (init.chunkBytes !== undefined) shape.chunkBytes = init.chunkBytes;
  return shape;
}

/**
 * `shape`, if it shapes anything (a bandwidth, or a latency above 0), else null: shaped() hands
 * back the connection itself for a shape that does nothing, and a second FramedConnection on it
 * broke the session (it read the connection twice).
 */
function shaping(shape: FaultLinkShape | null): FaultLinkShape | null {
  return shape && (shape.bandwidthBytesPerSec !== undefined || (shape.latencyMs ?? 0) > 0) ? shape : null;
}

type ToListener =
  /** `shape`: normalized (see shaping). */
  | { t: 'expect'; token: string; shape: FaultLinkShape | null; detach: boolean }
  | ({ t: 'start'; token: string } & FaultThreadVm)
  | { t: 'close'; token: string }
  /** The host is closing: the thread ends (FaultThreadListener.close). */
  | { t: 'exit' };
type FromListener =
  | { t: 'port'; port: number; priority: FaultThreadPriority }
  | { t: 'listen-failed'; message: string }
  /** `fd`: the connection, detached for the vCPU to fetch pages on itself (null: this thread serves). */
  | { t: 'joined'; token: string; fd: number | null }
  | { t: 'installed'; token: string; page: number; hash: bigint; waitedMs: number | null }
  | { t: 'failed'; token: string; code: string; message: string }
  | { t: 'closed'; token: string };

type ToSource =
  | ({ t: 'dial' } & SourceDial)
  | { t: 'serve'; memory: SharedArrayBuffer; pages: number; soft: Uint32Array; softBits: number }
  | { t: 'close' }
  /** To a spare never dialed: the host is closing, the thread ends (SourceFaultThreads.close). */
  | { t: 'exit' };
type FromSource =
  | { t: 'priority'; priority: FaultThreadPriority }
  | { t: 'dialed' }
  | { t: 'dial-failed'; code: string; message: string }
  | { t: 'served'; pages: number[]; bytes: number; latencyMs: number }
  | { t: 'failed'; code: string; message: string }
  | { t: 'closed' };

/** What a source session's thread is told to do: where it dials, with what, and the word its blocking loop watches for close. */
interface SourceDial {
  host: string;
  port: number;
  token: string;
  shape: FaultLinkShape | null;
  /** Int32 word 0: set to 1 when the session closes (a thread blocked on its socket looks between waits). */
  closing: SharedArrayBuffer;
}

/** `congestion`: the TCP congestion control of the thread's sockets (default: the system's; see transport/congestion.ts). */
type Role = ({ role: 'listen'; host: string } | { role: 'source' }) & { ask: FaultThreadPriority; congestion?: string };

/** The TCP transport of a fault thread's sockets. */
function threadTcp(): ReturnType<typeof tcp> {
  const congestion = (workerData as Role | undefined)?.congestion;
  return tcp(congestion !== undefined ? { congestion } : {});
}

const HERE = fileURLToPath(import.meta.url);

function errorOf(code: string, message: string): Error {
  return new MigrationError(code, message);
}

function codeOf(e: unknown): string {
  return e instanceof FerryError ? e.code : 'ERR_MIGRATION_FAULT_THREAD';
}

// ------------------------------------------------------------------ destination, main thread

/**
 * A destination host's fault thread (one per acceptor, started on first use): the FaultThreads an
 * acceptor is given. `host` is where it listens (the host migrations come in to).
 */
export class FaultThreadListener implements FaultThreads {
  private worker: Worker | null = null;
  private portP: Promise<number> | null = null;
  private readonly links = new Map<string, NodeDestinationFaultLink>();
  /** How the thread is scheduled ('default' until it started). */
  priority: FaultThreadPriority = 'default';
  /** Where the thread listens, once it does. */
  listeningPort: number | null = null;
  /** Shapes the thread's direction of the fault connections of sessions expected from now on. */
  shape: FaultLinkShape | null = null;
  /**
   * Whether the fault connections of sessions expected from now on are detached for their vCPUs
   * to fetch pages on (where this machine has blocking sockets). False keeps this thread serving
   * the faults, as on a machine without them.
   */
  detach = true;

  /**
   * @param host where the thread listens (the host migrations come in to; may be set until first use).
   * @param ask how the thread asks to be scheduled (see FaultThreadPriority).
   * @param congestion the TCP congestion control of the connections it accepts (default: the system's).
   */
  constructor(public host: string, readonly ask: FaultThreadPriority = 'nice', private readonly congestion?: string) {}

  port(): Promise<number> {
    if (this.portP) return this.portP;
    const worker = new Worker(HERE, { workerData: { role: 'listen', host: this.host, ask: this.ask, ...(this.congestion !== undefined ? { congestion: this.congestion } : {}) } satisfies Role });
    worker.unref(); // it never keeps a host process alive by itself
    this.worker = worker;
    worker.once('exit', () => {
      if (this.worker === worker) this.worker = null;
      for (const l of [...this.links.values()]) {
        l.events?.failed(errorOf('ERR_MIGRATION_FAULT_THREAD', 'the fault thread exited'));
        l.closedNow();
      }
    });
    this.portP = new Promise<number>((resolve, reject) => {
      worker.once('error', reject);
      worker.on('message', (m: FromListener) => {
        if (m.t === 'port') {
          this.priority = m.priority;
          this.listeningPort = m.port;
          resolve(m.port);
        }
        else if (m.t === 'listen-failed') reject(errorOf('ERR_MIGRATION_FAULT_THREAD', m.message));
        else this.route(m);
      });
    });
    // A thread that failed to start is not retried for each session: they go without.
    this.portP.catch(() => undefined);
    return this.portP;
  }

  expect(token: string): DestinationFaultLink {
    // Without a thread (it died) nothing can touch memory: close() returns at once then.
    const link = new NodeDestinationFaultLink(token, (m) => { if (this.worker) this.worker.postMessage(m); else link.closedNow(); }, () => this.links.delete(token));
    link.waitNice = this.priority === 'default' ? null : FAULT_THREAD_NICE;
    link.shape = shaping(this.shape);
    this.links.set(token, link);
    this.worker?.postMessage({ t: 'expect', token, shape: link.shape, detach: this.detach } satisfies ToListener);
    return link;
  }

  /** Stops the thread (a host shutting down). Sessions still using it fail. */
  async close(): Promise<void> {
    const w = this.worker;
    this.worker = null;
    this.portP = null;
    // Asked, not terminated: the thread may still be loading its native calls (see endThread).
    if (w) await endThread(w, () => w.postMessage({ t: 'exit' } satisfies ToListener));
    for (const l of [...this.links.values()]) l.closedNow();
  }

  private route(m: Exclude<FromListener, { t: 'port' } | { t: 'listen-failed' }>): void {
    const link = this.links.get(m.token);
    if (!link) return;
    if (m.t === 'closed') link.closedNow();
    else if (m.t === 'joined') {
      link.joined = true;
      link.fd = m.fd;
    }
    else if (m.t === 'installed') link.events?.installed(m.page, m.hash, m.waitedMs);
    else link.events?.failed(errorOf(m.code, m.message));
  }
}

/** One session's link to the destination's fault thread. */
export class NodeDestinationFaultLink implements DestinationFaultLink {
  joined = false;
  /**
   * The fault connection's descriptor, when the thread detached it for the vCPU to fetch pages on
   * itself (vm/fault-channel.ts); null when the thread serves faults (no blocking sockets here, or
   * FaultThreadListener.detach off).
   */
  fd: number | null = null;
  /**
   * The nice value the vCPU waits for its pages at when it fetches them itself: it is the fault
   * thread then, so it waits as the host's fault threads run (FAULT_THREAD_NICE when they are
   * raised; a vCPU cannot switch to SCHED_FIFO for each wait, so 'realtime' waits at it too).
   */
  waitNice: number | null = null;
  /** The link shape of the vCPU's requests when it fetches its pages itself (null: none). */
  shape: FaultLinkShape | null = null;
  events: FaultThreadEvents | null = null;
  private closing: Promise<void> | null = null;
  private done: (() => void) | null = null;

  constructor(readonly token: string, private readonly post: (m: ToListener) => void, private readonly forget: () => void) {}

  /** The thread serves `vm`'s faults from now on, telling `events`. */
  start(vm: FaultThreadVm, events: FaultThreadEvents): void {
    this.events = events;
    this.post({ t: 'start', token: this.token, ...vm });
  }

  close(): Promise<void> {
    this.closing ??= new Promise<void>((resolve) => {
      this.events = null;
      this.done = resolve;
      this.post({ t: 'close', token: this.token });
    });
    return this.closing;
  }

  /** The thread let go of the session (or is gone). */
  closedNow(): void {
    this.events = null;
    this.forget();
    this.done?.();
  }
}

// ------------------------------------------------------------------ source, main thread

/**
 * A source host's fault threads: one per outgoing post-copy migration, started when it opens its
 * fault connection (before the pause) and ended with it. Each answers its session's page requests
 * from the paused VM's memory, blocked on its socket (see serveBlocking), so that no other work of
 * this host's stands between a request and its answer.
 */
export class SourceFaultThreads {
  private readonly links = new Set<NodeSourceFaultLink>();
  /**
   * A thread started and waiting for the next migration. A thread takes ~100 ms to start here
   * (its isolate, libc's socket calls, its priority), all of it inside the migration's set-up,
   * which waits for the fault connection: the first migration pays it, and each one that ends
   * starts the next one's thread.
   */
  private spare: Worker | null = null;
  /** Threads alive that said how they are scheduled (sessions' and the spare). */
  private readonly started = new Set<Worker>();
  private closed = false;
  /** How the threads are scheduled ('default' until one started). */
  priority: FaultThreadPriority = 'default';

  /**
   * @param ask how the threads ask to be scheduled (see FaultThreadPriority).
   * @param congestion the TCP congestion control of the connections they dial (default: the system's).
   */
  constructor(private readonly ask: FaultThreadPriority = 'nice', private readonly congestion?: string) {}

  /** Threads alive that have started (the sessions' and the spare). */
  get threads(): number {
    return this.started.size;
  }

  private spawn(): Worker {
    const worker = new Worker(HERE, { workerData: { role: 'source', ask: this.ask, ...(this.congestion !== undefined ? { congestion: this.congestion } : {}) } satisfies Role });
    worker.unref(); // it never keeps a host process alive by itself
    worker.on('message', (m: FromSource) => {
      if (m.t !== 'priority') return;
      this.priority = m.priority;
      this.started.add(worker);
    });
    const gone = () => {
      this.started.delete(worker);
      if (this.spare === worker) this.spare = null;
    };
    worker.on('error', gone);
    worker.on('exit', gone);
    return worker;
  }

  /**
   * Opens the fault connection of session `token` to `host:port` from a thread of its own;
   * resolves once the destination's fault thread acknowledged the JOIN. `memory` gives the VM's
   * pages to serve once serve() is called (after the pause).
   */
  async open(host: string, port: number, token: string, memory: () => { buffer: SharedArrayBuffer; pages: number }, shape: FaultLinkShape | null = null): Promise<SourceFaultLink> {
    if (this.closed) throw errorOf('ERR_MIGRATION_FAULT_THREAD', 'the host\'s fault threads are closed');
    const closing = new SharedArrayBuffer(4);
    const worker = this.spare ?? this.spawn();
    this.spare = null;
    const link = new NodeSourceFaultLink(worker, new Int32Array(closing), memory, () => {
      this.links.delete(link);
      if (!this.spare && !this.closed) this.spare = this.spawn();
    });
    this.links.add(link);
    worker.postMessage({ t: 'dial', host, port, token, shape, closing } satisfies ToSource);
    await link.dialed;
    return link;
  }

  /** Ends every session's thread and the spare (a host shutting down). */
  async close(): Promise<void> {
    this.closed = true;
    const spare = this.spare;
    this.spare = null;
    // The spare is asked (it may still be loading its native calls: see endThread); a session's
    // thread, long past loading, is stopped at once.
    await Promise.all([...[...this.links].map((l) => l.terminate()), spare && endThread(spare, () => spare.postMessage({ t: 'exit' } satisfies ToSource))]);
  }
}

/**
 * The engine's `faultThread` option for migrating `vm` to a destination on `host` (the host its
 * control connection dialled): the fault channel from `threads`, serving `vm`'s memory.
 */
export function sourceFaultThread(threads: SourceFaultThreads, vm: Vm, host: string, shape: FaultLinkShape | null = null): (port: number, token: string) => Promise<SourceFaultLink> {
  return (port, token) => threads.open(host, port, token, () => ({ buffer: vm.memory.buffer as unknown as SharedArrayBuffer, pages: vm.guestPages }), shape);
}

class NodeSourceFaultLink implements SourceFaultLink {
  private served: ((pages: number[], bytes: number, latencyMs: number) => void) | null = null;
  private failed: ((e: Error) => void) | null = null;
  private done: (() => void) | null = null;
  private closing: Promise<void> | null = null;
  private exited = false;
  /** Resolves once the JOIN was acknowledged; rejects if the thread could not get there. */
  readonly dialed: Promise<void>;

  constructor(
    private readonly worker: Worker, private readonly closingWord: Int32Array,
    private readonly memory: () => { buffer: SharedArrayBuffer; pages: number },
    private readonly forget: () => void,
  ) {
    this.dialed = new Promise<void>((resolve, reject) => {
      worker.on('message', (m: FromSource) => {
        if (m.t === 'priority') return; // SourceFaultThreads hears it
        if (m.t === 'dialed') resolve();
        else if (m.t === 'dial-failed') reject(errorOf(m.code, m.message));
        else if (m.t === 'served') this.served?.(m.pages, m.bytes, m.latencyMs);
        else if (m.t === 'failed') this.failed?.(errorOf(m.code, m.message));
        else this.closedNow();
      });
      // A thread that dies fails what it served (and lets close() return).
      const died = (e: Error) => {
        if (this.exited) return;
        this.exited = true;
        reject(e);
        this.failed?.(e);
        this.closedNow();
      };
      worker.on('error', died);
      worker.on('exit', (code) => died(errorOf('ERR_MIGRATION_FAULT_THREAD', `the fault thread exited (${code})`)));
    });
    this.dialed.catch(() => this.forget());
  }

  serve(soft: Bitmap, served: (pages: number[], bytes: number, latencyMs: number) => void, failed: (e: Error) => void): void {
    this.served = served;
    this.failed = failed;
    const { buffer, pages } = this.memory();
    this.worker.postMessage({ t: 'serve', memory: buffer, pages, soft: soft.words.slice(), softBits: soft.size } satisfies ToSource);
  }

  private closedNow(): void {
    this.done?.();
    if (this.forgotten) return;
    this.forgotten = true; // once: its end starts the next session's thread (the exit that follows is no second end)
    this.forget();
  }

  private forgotten = false;

  close(): Promise<void> {
    this.closing ??= new Promise<void>((resolve) => {
      this.served = null;
      this.failed = null;
      this.done = resolve;
      if (this.exited) return this.closedNow();
      Atomics.store(this.closingWord, 0, 1);
      this.worker.postMessage({ t: 'close' } satisfies ToSource);
    });
    return this.closing;
  }

  async terminate(): Promise<void> {
    this.served = null;
    this.failed = null;
    Atomics.store(this.closingWord, 0, 1); // a thread blocked on its socket returns to JavaScript within its poll
    await this.worker.terminate();
  }
}

// ------------------------------------------------------------------ the threads

/** A destination session as its fault thread knows it. */
interface ListenSession {
  /** Where requests are written (through the session's shaper, if it has one). */
  conn: FramedConnection | null;
  shape: FaultLinkShape | null;
  /** Whether to detach the connection for the vCPU (FaultThreadListener.detach). */
  detach: boolean;
  /** The connection detached for the vCPU (see NodeDestinationFaultLink.fd); this thread closes it. */
  socket: BlockingSocket | null;
  vm: (FaultThreadVm & { mem: Uint8Array; presence: Uint8Array; ctl32: Int32Array; block: FaultChannelBlock }) | null;
  requested: Map<number, number>;
  nextId: number;
  active: boolean;
  /** Its fault connection joined (a second JOIN is refused). */
  joined: boolean;
}

function listenThread(host: string, priority: FaultThreadPriority): void {
  const post = (m: FromListener) => parentPort!.postMessage(m);
  const sessions = new Map<string, ListenSession>();

  const failed = (token: string, e: unknown) => {
    const s = sessions.get(token);
    if (!s?.active) return;
    post({ t: 'failed', token, code: codeOf(e), message: (e as Error).message ?? String(e) });
  };

  const wake = (ctl: Int32Array) => {
    Atomics.add(ctl, Ctl.FAULT_DONE, 1);
    Atomics.notify(ctl, Ctl.FAULT_DONE);
  };

  /**
   * Installs a demand page unless it is present already (it was at the start, or the session's own
   * thread installed it: a page the guest may have written since is never overwritten).
   */
  const install = (token: string, s: ListenSession, p: WirePage) => {
    const vm = s.vm;
    if (!s.active) return;
    if (!vm) throw errorOf('ERR_PROTOCOL_SEQUENCE', `demand page ${p.index} before any page was asked for`);
    const t0 = s.requested.get(p.index);
    s.requested.delete(p.index);
    const hash = installDemandPage(vm.mem, vm.block, p);
    if (hash !== null) wake(vm.ctl32);
    // Not installed: a push installed it first (and woke the vCPU): only the wait is news, an upper bound of it.
    else if (t0 === undefined) return;
    post({ t: 'installed', token, page: p.index, hash: hash ?? 0n, waitedMs: t0 === undefined ? null : performance.now() - t0 });
  };

  const readFrames = async (token: string, s: ListenSession, framed: FramedConnection) => {
    try {
      for (;;) {
        const f: Frame | undefined = await framed.next();
        if (!f) return;
        const t = takeFaultFrame(f, s.vm?.pages ?? Infinity);
        if ('reply' in t) await framed.send(t.reply);
        else for (const p of t.pages) install(token, s, p);
      }
    } catch (e) {
      failed(token, e);
      framed.abort();
    }
  };

  /** The vCPU's fault notifications for one VM, until the session closes. */
  const serveFaults = async (token: string, s: ListenSession) => {
    const vm = s.vm!;
    const ctl = vm.ctl32;
    /** The fault FAULT_PAGE names: woken at once if its page is there (or it is about to trap), else asked for. */
    const handle = () => {
      const page = Atomics.load(ctl, Ctl.FAULT_PAGE) - RESERVED_PAGES;
      if (page < 0 || page >= vm.pages || Atomics.load(vm.presence, page)) {
        wake(ctl); // about to trap, or arrived meanwhile
        return;
      }
      if (s.requested.has(page) || !s.conn) return;
      s.requested.set(page, performance.now());
      s.conn.send({ type: 'PAGE_REQUEST', id: ++s.nextId, pages: [page] }).catch((e: unknown) => failed(token, e));
    };
    let seen = Atomics.load(ctl, Ctl.FAULT_REQ);
    // The vCPU may have faulted before this thread got the VM (start is a message): serve that one.
    if (seen !== 0) handle();
    while (s.active) {
      const r = Atomics.waitAsync(ctl, Ctl.FAULT_REQ, seen, 100);
      if (r.async) await r.value;
      const now = Atomics.load(ctl, Ctl.FAULT_REQ);
      if (now === seen) continue;
      seen = now;
      handle();
    }
  };

  /** What the vCPU installed on a detached channel, told as this thread's own installs are. */
  const readLog = async (token: string, s: ListenSession) => {
    const block = s.vm!.block;
    let seen = 0;
    while (s.active) {
      seen = await block.logged(seen);
      if (!s.active) return; // the close reads what is left
      block.drain((page, hash, ms) => post({ t: 'installed', token, page, hash, waitedMs: ms }));
      const f = block.failure();
      if (f) {
        failed(token, errorOf(f.code, f.message));
        return;
      }
    }
  };

  const accept = async (conn: Connection) => {
    const framed = new FramedConnection(conn);
    try {
      const first = await framed.next();
      const s = first?.type === 'JOIN' && first.role === 'fault' ? sessions.get(first.token) : undefined;
      if (!first || first.type !== 'JOIN' || !s || s.joined) {
        const message = first?.type === 'JOIN' ? 'JOIN names no session expecting a fault channel here' : 'a fault connection starts with JOIN';
        await framed.send({ type: 'ERROR', code: 'ERR_MIGRATION_UNKNOWN_SESSION', message }).catch(() => undefined);
        await framed.close().catch(() => undefined);
        return;
      }
      s.joined = true;
      if (s.detach && blockingSocketsAvailable()) {
        // The vCPU fetches its pages itself (vm/fault-channel.ts), pacing its requests by the
        // link's shape: the connection leaves this thread's event loop. The source sends nothing
        // before it is asked, so nothing is lost.
        await framed.send({ type: 'ACK', acked: 'JOIN', value: 0 });
        s.socket = new BlockingSocket(await detachTcp(conn));
        post({ t: 'joined', token: first.token, fd: s.socket.fd });
        return;
      }
      // This thread serves the faults: requests go through the session's shaper; frames are still
      // read from the connection itself.
      s.conn = s.shape ? new FramedConnection(shaped(conn, { ...s.shape, clock: realClock() })) : framed;
      post({ t: 'joined', token: first.token, fd: null });
      await s.conn.send({ type: 'ACK', acked: 'JOIN', value: 0 });
      void readFrames(first.token, s, framed);
    } catch {
      framed.abort();
    }
  };

  parentPort!.on('message', (m: ToListener) => {
    if (m.t === 'exit') process.exit(0); // in a worker, ends this thread only
    if (m.t === 'expect') {
      sessions.set(m.token, { conn: null, shape: m.shape, detach: m.detach, socket: null, vm: null, requested: new Map(), nextId: 0, active: true, joined: false });
    } else if (m.t === 'start') {
      const s = sessions.get(m.token);
      if (!s || s.vm) return;
      s.vm = {
        ...m,
        mem: new Uint8Array(m.memory),
        presence: new Uint8Array(m.memory, PRESENCE_MAP_OFFSET + RESERVED_PAGES, m.pages),
        ctl32: new Int32Array(m.ctl),
        block: new FaultChannelBlock(m.channel),
      };
      void serveFaults(m.token, s);
      if (s.socket) void readLog(m.token, s);
    } else {
      const s = sessions.get(m.token);
      sessions.delete(m.token);
      if (!s) {
        post({ t: 'closed', token: m.token });
        return;
      }
      s.active = false;
      const block = s.vm?.block;
      s.vm = null; // no install after this: the memory may go back to a pool
      void s.conn?.close().catch(() => undefined);
      const socket = s.socket;
      if (!socket) {
        post({ t: 'closed', token: m.token });
        return;
      }
      // The vCPU lets go of the socket first (woken if it waits on it), then it closes: its
      // number cannot be reused under a vCPU still blocked on it.
      void (block ? block.takeSocket(() => socket.shutdown()) : Promise.resolve()).then(() => {
        socket.shutdown();
        socket.discardPending(); // an answer nobody waits for any more, so that the close is not a reset
        socket.close();
        post({ t: 'closed', token: m.token });
      });
    }
  });

  void threadTcp().listen({ address: `${host}:0`, onConnection: (c) => void accept(c) }).then(
    (l) => post({ t: 'port', port: Number(l.address.slice(l.address.lastIndexOf(':') + 1)), priority }),
    (e: unknown) => post({ t: 'listen-failed', message: (e as Error).message }),
  );
}

/** What a source session's thread answers from, once the VM paused (its memory is final then). */
interface Served {
  mem: Uint8Array;
  words: Uint32Array;
  pages: number;
  soft: Bitmap;
}

/** Transport trouble on the fault connection is no failure of the source's (see read below). */
function transportTrouble(e: unknown): boolean {
  return e instanceof TransportError || e instanceof BlockingSocketError;
}

/**
 * One outgoing post-copy migration's fault thread. It dials the destination's fault thread and
 * joins the session; then, where this machine has blocking sockets, it takes the connection off
 * its event loop and, from the pause on, answers requests blocked on the socket (serveBlocking):
 * a request wakes this thread in the kernel and its answer leaves before the thread sleeps again,
 * paced by the link's shape if it has one (SendPacer). Without blocking sockets it stays on the
 * event loop, which applies the shaper.
 */
function sourceThread(r: SourceDial): void {
  const post = (m: FromSource) => parentPort!.postMessage(m);
  const closing = new Int32Array(r.closing);
  const shape = shaping(r.shape);
  let served: Served | null = null;
  /** The connection: on the event loop (shaped), or detached. */
  let framed: FramedConnection | null = null;
  let socket: BlockingSocket | null = null;
  /** Requests that came before serve() (event loop only: a detached socket is not read before). */
  const early: { id: number; pages: number[]; t: number }[] = [];

  const failed = (e: unknown) => {
    // The end of the fault channel, or a reset, is no failure: the destination closes it once
    // every page is there (resetting it if an answer it no longer needed, a push having brought
    // the page first, was still unread), and a destination that lost it fails on its own side;
    // one that died fails the control connection too.
    if (Atomics.load(closing, 0) === 0 && !transportTrouble(e)) post({ t: 'failed', code: codeOf(e), message: (e as Error).message });
  };

  const isZero = (words: Uint32Array, page: number) => {
    const from = (RESERVED_BYTES + page * PAGE_SIZE) >>> 2;
    for (let i = from, end = from + PAGE_SIZE / 4; i < end; i++) if (words[i] !== 0) return false;
    return true;
  };

  const answerOf = (sv: Served, reqId: number, wanted: number[]) => demandAnswer(reqId, wanted, sv.pages, sv.soft, (p) => isZero(sv.words, p), (p, into) => {
    const at = RESERVED_BYTES + p * PAGE_SIZE;
    into.set(sv.mem.subarray(at, at + PAGE_SIZE));
  });

  /** Frames other than requests, on either path. */
  const other = (f: Frame): Frame => {
    if (f.type === 'ERROR') throw errorOf(f.code, `destination reported: ${f.message}`);
    if (f.type !== 'PING') throw errorOf('ERR_PROTOCOL_SEQUENCE', `${f.type} on the fault channel`);
    return { type: 'PONG', seq: f.seq, time: f.time };
  };

  /** Blocked on the detached socket until the destination ends the channel or the session closes. */
  const serveBlocking = (sv: Served, sock: BlockingSocket) => {
    const decoder = new FrameDecoder();
    const into = new Uint8Array(64 * 1024);
    try {
      while (Atomics.load(closing, 0) === 0) {
        const n = sock.recvSome(into, 100);
        if (n < 0) continue;
        if (n === 0) return;
        for (const f of decoder.push(into.subarray(0, n))) {
          if (f.type !== 'PAGE_REQUEST') {
            sock.sendAll(encodeFrame(other(f)));
            continue;
          }
          const t0 = performance.now();
          const a = answerOf(sv, f.id, f.pages);
          if (!a) continue;
          sock.sendAll(a.frame);
          post({ t: 'served', pages: a.want, bytes: a.frame.length, latencyMs: performance.now() - t0 });
        }
      }
    } catch (e) {
      failed(e);
    }
  };

  const answer = (sv: Served, f: FramedConnection, reqId: number, wanted: number[], t0: number) => {
    const a = answerOf(sv, reqId, wanted);
    if (!a) return;
    f.sendEncoded(a.frame).then(() => post({ t: 'served', pages: a.want, bytes: a.frame.length, latencyMs: performance.now() - t0 }), failed);
  };

  const read = async (f: FramedConnection) => {
    try {
      for (let m = await f.next(); m; m = await f.next()) {
        if (m.type !== 'PAGE_REQUEST') await f.send(other(m));
        else if (served) answer(served, f, m.id, m.pages, performance.now());
        else early.push({ id: m.id, pages: m.pages, t: performance.now() });
      }
    } catch (e) {
      failed(e);
      f.abort();
    }
  };

  const end = () => {
    post({ t: 'closed' });
    parentPort!.unref(); // nothing else holds the thread: it ends
  };

  parentPort!.on('message', (m: ToSource) => {
    if (m.t === 'serve') {
      if (served) return;
      served = { mem: new Uint8Array(m.memory), words: new Uint32Array(m.memory, 0, m.memory.byteLength >>> 2), pages: m.pages, soft: new Bitmap(m.softBits, m.soft) };
      if (socket) serveBlocking(served, socket);
      else if (framed) for (const q of early.splice(0)) answer(served, framed, q.id, q.pages, q.t);
    } else {
      Atomics.store(closing, 0, 1);
      if (socket) {
        socket.shutdown();
        socket.close();
        end();
      } else if (framed) void framed.close().catch(() => undefined).finally(end);
      else end();
    }
  });

  void (async () => {
    let f: FramedConnection | null = null;
    try {
      const conn = await threadTcp().dial(`${r.host.includes(':') ? `[${r.host}]` : r.host}:${r.port}`);
      // Detached, the answers are paced by the link's shape on the socket itself.
      const detach = blockingSocketsAvailable();
      f = new FramedConnection(shape && !detach ? shaped(conn, { ...shape, clock: realClock() }) : conn);
      await f.send({ type: 'JOIN', token: r.token, stream: 0, role: 'fault' });
      const ack = await f.next();
      if (ack?.type === 'ERROR') throw errorOf(ack.code, ack.message);
      if (ack?.type !== 'ACK' || ack.acked !== 'JOIN') throw errorOf('ERR_PROTOCOL_SEQUENCE', `expected ACK of JOIN, got ${ack?.type ?? 'end of stream'}`);
      // The destination sends nothing before it is asked, so nothing read is lost by detaching.
      if (detach) socket = new BlockingSocket(await detachTcp(conn), shape ? new SendPacer(shape) : null);
      else {
        framed = f;
        void read(f);
      }
      post({ t: 'dialed' });
    } catch (e) {
      f?.abort();
      post({ t: 'dial-failed', code: codeOf(e), message: (e as Error).message });
      end();
    }
  })();
}

const role = isMainThread ? undefined : (workerData as Role | undefined);
if (role?.role === 'listen' || role?.role === 'source') {
  const priority = raisePriority(role.ask);
  if (role.role === 'listen') {
    rehearseFaultPath(); // it installs demand pages where the vCPU does not fetch them itself
    listenThread(role.host, priority);
  }
  else {
    // Started ahead of its migration: all it can ready before it is told where to dial.
    parentPort!.postMessage({ t: 'priority', priority } satisfies FromSource);
    blockingSocketsAvailable();
    rehearseFaultPath();
    parentPort!.once('message', (m: ToSource) => {
      if (m.t === 'dial') sourceThread(m);
      else if (m.t === 'exit') process.exit(0);
    });
  }
}

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
import { Encoding, type Frame } from '../../core/protocol/frames.js';
import { FramedConnection } from '../../core/transport/framed.js';
import { shaped, type ShapedConnectionInit } from '../../core/transport/shaped.js';
import { realClock } from '../clock.js';
import type { Connection } from '../../core/transport/transport.js';
import { Ctl } from '../vm/control.js';
import { hashPage } from '../vm/page-hash.js';
import type { Vm } from '../vm/vm.js';
import { tcp } from '../transport/tcp.js';
import { raisePriority, type FaultThreadPriority } from './thread-priority.js';

// ------------------------------------------------------------------ messages

/** What a destination VM hands its fault thread (all shared with the vCPU and the session). */
export interface FaultThreadVm {
  /** The guest memory's buffer (pages at RESERVED_BYTES + page × PAGE_SIZE, presence map inside). */
  memory: SharedArrayBuffer;
  /** The VM's control words (FAULT_PAGE, FAULT_REQ, FAULT_DONE). */
  ctl: SharedArrayBuffer;
  /** One bit per guest page: set by whoever installs it (Atomics.or), first one wins. */
  claims: SharedArrayBuffer;
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

type ToListener =
  | { t: 'expect'; token: string; shape: FaultLinkShape | null }
  | ({ t: 'start'; token: string } & FaultThreadVm)
  | { t: 'close'; token: string };
type FromListener =
  | { t: 'port'; port: number; priority: FaultThreadPriority }
  | { t: 'listen-failed'; message: string }
  | { t: 'joined'; token: string }
  | { t: 'installed'; token: string; page: number; hash: bigint; waitedMs: number | null }
  | { t: 'failed'; token: string; code: string; message: string }
  | { t: 'closed'; token: string };

type ToSource =
  | { t: 'dial'; id: number; host: string; port: number; token: string; shape: FaultLinkShape | null }
  | { t: 'serve'; id: number; memory: SharedArrayBuffer; pages: number; soft: Uint32Array; softBits: number }
  | { t: 'close'; id: number };
type FromSource =
  | { t: 'dialed'; id: number }
  | { t: 'dial-failed'; id: number; code: string; message: string }
  | { t: 'served'; id: number; pages: number[]; bytes: number; latencyMs: number }
  | { t: 'failed'; id: number; code: string; message: string }
  | { t: 'closed'; id: number }
  | { t: 'priority'; priority: FaultThreadPriority };

type Role = ({ role: 'listen'; host: string } | { role: 'source' }) & { ask: FaultThreadPriority };

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
   * @param host where the thread listens (the host migrations come in to; may be set until first use).
   * @param ask how the thread asks to be scheduled (see FaultThreadPriority).
   */
  constructor(public host: string, readonly ask: FaultThreadPriority = 'nice') {}

  port(): Promise<number> {
    if (this.portP) return this.portP;
    const worker = new Worker(HERE, { workerData: { role: 'listen', host: this.host, ask: this.ask } satisfies Role });
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
    this.links.set(token, link);
    this.worker?.postMessage({ t: 'expect', token, shape: this.shape } satisfies ToListener);
    return link;
  }

  /** Stops the thread (a host shutting down). Sessions still using it fail. */
  async close(): Promise<void> {
    const w = this.worker;
    this.worker = null;
    this.portP = null;
    await w?.terminate();
    for (const l of [...this.links.values()]) l.closedNow();
  }

  private route(m: Exclude<FromListener, { t: 'port' } | { t: 'listen-failed' }>): void {
    const link = this.links.get(m.token);
    if (!link) return;
    if (m.t === 'closed') link.closedNow();
    else if (m.t === 'joined') link.joined = true;
    else if (m.t === 'installed') link.events?.installed(m.page, m.hash, m.waitedMs);
    else link.events?.failed(errorOf(m.code, m.message));
  }
}

/** One session's link to the destination's fault thread. */
export class NodeDestinationFaultLink implements DestinationFaultLink {
  joined = false;
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
 * A source host's fault thread (one per host, started on first use): opens the fault connections
 * of its outgoing post-copy migrations and answers their page requests.
 */
export class SourceFaultThreads {
  private worker: Worker | null = null;
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();
  private readonly links = new Map<number, NodeSourceFaultLink>();
  /** How the thread is scheduled ('default' until it started). */
  priority: FaultThreadPriority = 'default';

  /** @param ask how the thread asks to be scheduled (see FaultThreadPriority). */
  constructor(private readonly ask: FaultThreadPriority = 'nice') {}

  private thread(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(HERE, { workerData: { role: 'source', ask: this.ask } satisfies Role });
    worker.unref();
    worker.on('message', (m: FromSource) => this.route(m));
    // A thread that dies fails what it served (and lets their close() return).
    const died = (e: Error) => {
      if (this.worker !== worker) return;
      this.worker = null;
      for (const p of this.pending.values()) p.reject(e);
      this.pending.clear();
      for (const l of [...this.links.values()]) {
        l.fail(e);
        l.closedNow();
      }
    };
    worker.on('error', died);
    worker.on('exit', (code) => died(errorOf('ERR_MIGRATION_FAULT_THREAD', `the fault thread exited (${code})`)));
    this.worker = worker;
    return worker;
  }

  /**
   * Opens the fault connection of session `token` to `host:port` from the thread; resolves once
   * the destination's fault thread acknowledged the JOIN. `memory` gives the VM's pages to serve
   * once serve() is called (after the pause).
   */
  async open(host: string, port: number, token: string, memory: () => { buffer: SharedArrayBuffer; pages: number }, shape: FaultLinkShape | null = null): Promise<SourceFaultLink> {
    const id = this.nextId++;
    const worker = this.thread();
    const link = new NodeSourceFaultLink(id, (m) => worker.postMessage(m), memory, () => this.links.delete(id));
    this.links.set(id, link);
    try {
      await new Promise<void>((resolve, reject) => {
        this.pending.set(id, { resolve, reject });
        worker.postMessage({ t: 'dial', id, host, port, token, shape } satisfies ToSource);
      });
    } catch (e) {
      this.links.delete(id);
      throw e;
    }
    return link;
  }

  async close(): Promise<void> {
    const w = this.worker;
    this.worker = null;
    await w?.terminate();
  }

  private route(m: FromSource): void {
    if (m.t === 'priority') {
      this.priority = m.priority;
      return;
    }
    if (m.t === 'dialed' || m.t === 'dial-failed') {
      const p = this.pending.get(m.id);
      this.pending.delete(m.id);
      if (m.t === 'dialed') p?.resolve();
      else p?.reject(errorOf(m.code, m.message));
      return;
    }
    const link = this.links.get(m.id);
    if (!link) return;
    if (m.t === 'served') link.served?.(m.pages, m.bytes, m.latencyMs);
    else if (m.t === 'failed') link.fail(errorOf(m.code, m.message));
    else link.closedNow();
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
  served: ((pages: number[], bytes: number, latencyMs: number) => void) | null = null;
  private failed: ((e: Error) => void) | null = null;
  private done: (() => void) | null = null;
  private closing: Promise<void> | null = null;

  constructor(readonly id: number, private readonly post: (m: ToSource) => void, private readonly memory: () => { buffer: SharedArrayBuffer; pages: number }, private readonly forget: () => void) {}

  serve(soft: Bitmap, served: (pages: number[], bytes: number, latencyMs: number) => void, failed: (e: Error) => void): void {
    this.served = served;
    this.failed = failed;
    const { buffer, pages } = this.memory();
    this.post({ t: 'serve', id: this.id, memory: buffer, pages, soft: soft.words.slice(), softBits: soft.size });
  }

  fail(e: Error): void {
    this.failed?.(e);
  }

  closedNow(): void {
    this.done?.();
    this.forget();
  }

  close(): Promise<void> {
    this.closing ??= new Promise<void>((resolve) => {
      this.served = null;
      this.failed = null;
      this.done = resolve;
      this.post({ t: 'close', id: this.id });
    });
    return this.closing;
  }
}

// ------------------------------------------------------------------ the threads

/** A destination session as its fault thread knows it. */
interface ListenSession {
  /** Where requests are written (through the session's shaper, if it has one). */
  conn: FramedConnection | null;
  shape: FaultLinkShape | null;
  vm: (FaultThreadVm & { mem: Uint8Array; presence: Uint8Array; ctl32: Int32Array; claims32: Int32Array }) | null;
  requested: Map<number, number>;
  nextId: number;
  active: boolean;
}

function listenThread(host: string, priority: FaultThreadPriority): void {
  const post = (m: FromListener) => parentPort!.postMessage(m);
  const sessions = new Map<string, ListenSession>();
  const zeroHash = hashPage(new Uint8Array(PAGE_SIZE));

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
  const install = (token: string, s: ListenSession, page: number, encoding: number, data: Uint8Array) => {
    const vm = s.vm;
    if (!s.active) return;
    if (!vm) throw errorOf('ERR_PROTOCOL_SEQUENCE', `demand page ${page} before any page was asked for`);
    if (page >= vm.pages) throw errorOf('ERR_PROTOCOL_MALFORMED', `demand page ${page} is beyond the VM's ${vm.pages} pages`);
    const bit = 1 << (page & 31);
    const t0 = s.requested.get(page);
    s.requested.delete(page);
    if (Atomics.load(vm.presence, page) || Atomics.or(vm.claims32, page >> 5, bit) & bit) {
      // A push installed it first (and woke the vCPU): only the wait is news, an upper bound of it.
      if (t0 !== undefined) post({ t: 'installed', token, page, hash: 0n, waitedMs: performance.now() - t0 });
      return;
    }
    const at = RESERVED_BYTES + page * PAGE_SIZE;
    let hash: bigint;
    if (encoding === Encoding.ZERO) {
      vm.mem.fill(0, at, at + PAGE_SIZE);
      hash = zeroHash;
    } else {
      vm.mem.set(data, at);
      hash = hashPage(data);
    }
    Atomics.store(vm.presence, page, 1);
    wake(vm.ctl32);
    post({ t: 'installed', token, page, hash, waitedMs: t0 === undefined ? null : performance.now() - t0 });
  };

  const readFrames = async (token: string, s: ListenSession, framed: FramedConnection) => {
    try {
      for (;;) {
        const f: Frame | undefined = await framed.next();
        if (!f) return;
        if (f.type === 'PAGES' && f.demand) {
          for (const p of f.pages) {
            if (p.encoding !== Encoding.RAW && p.encoding !== Encoding.ZERO) throw errorOf('ERR_PROTOCOL_MALFORMED', `demand page ${p.index} in encoding ${p.encoding}: the fault channel carries raw or zero pages`);
            if (p.encoding === Encoding.RAW && p.data.length !== PAGE_SIZE) throw errorOf('ERR_PROTOCOL_MALFORMED', `raw page ${p.index} is ${p.data.length} bytes`);
            install(token, s, p.index, p.encoding, p.data);
          }
        } else if (f.type === 'PING') {
          await framed.send({ type: 'PONG', seq: f.seq, time: f.time });
        } else if (f.type === 'ERROR') {
          throw errorOf(f.code, `source reported: ${f.message}`);
        } else {
          throw errorOf('ERR_PROTOCOL_SEQUENCE', `${f.type} on the fault channel`);
        }
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

  const accept = async (conn: Connection) => {
    const framed = new FramedConnection(conn);
    try {
      const first = await framed.next();
      const s = first?.type === 'JOIN' && first.role === 'fault' ? sessions.get(first.token) : undefined;
      if (!first || first.type !== 'JOIN' || !s || s.conn) {
        const message = first?.type === 'JOIN' ? 'JOIN names no session expecting a fault channel here' : 'a fault connection starts with JOIN';
        await framed.send({ type: 'ERROR', code: 'ERR_MIGRATION_UNKNOWN_SESSION', message }).catch(() => undefined);
        await framed.close().catch(() => undefined);
        return;
      }
      // Requests go through the session's shaper; frames are still read from the connection itself.
      s.conn = s.shape ? new FramedConnection(shaped(conn, { ...s.shape, clock: realClock() })) : framed;
      post({ t: 'joined', token: first.token });
      await s.conn.send({ type: 'ACK', acked: 'JOIN', value: 0 });
      void readFrames(first.token, s, framed);
    } catch {
      framed.abort();
    }
  };

  parentPort!.on('message', (m: ToListener) => {
    if (m.t === 'expect') {
      sessions.set(m.token, { conn: null, shape: m.shape, vm: null, requested: new Map(), nextId: 0, active: true });
    } else if (m.t === 'start') {
      const s = sessions.get(m.token);
      if (!s || s.vm) return;
      s.vm = {
        ...m,
        mem: new Uint8Array(m.memory),
        presence: new Uint8Array(m.memory, PRESENCE_MAP_OFFSET + RESERVED_PAGES, m.pages),
        ctl32: new Int32Array(m.ctl),
        claims32: new Int32Array(m.claims),
      };
      void serveFaults(m.token, s);
    } else {
      const s = sessions.get(m.token);
      sessions.delete(m.token);
      if (s) {
        s.active = false;
        s.vm = null; // no install after this: the memory may go back to a pool
        void s.conn?.close().catch(() => undefined);
      }
      post({ t: 'closed', token: m.token });
    }
  });

  void tcp().listen({ address: `${host}:0`, onConnection: (c) => void accept(c) }).then(
    (l) => post({ t: 'port', port: Number(l.address.slice(l.address.lastIndexOf(':') + 1)), priority }),
    (e: unknown) => post({ t: 'listen-failed', message: (e as Error).message }),
  );
}

/** An outgoing fault connection as the source's thread knows it. */
interface SourceSession {
  framed: FramedConnection;
  mem: Uint8Array | null;
  words: Uint32Array | null;
  pages: number;
  soft: Bitmap | null;
  /** Requests that came before serve(): answered once it does. */
  early: { id: number; pages: number[]; t: number }[];
  closing: boolean;
}

function sourceThread(priority: FaultThreadPriority): void {
  const post = (m: FromSource) => parentPort!.postMessage(m);
  post({ t: 'priority', priority });
  const sessions = new Map<number, SourceSession>();

  const isZero = (words: Uint32Array, page: number) => {
    const from = (RESERVED_BYTES + page * PAGE_SIZE) >>> 2;
    for (let i = from, end = from + PAGE_SIZE / 4; i < end; i++) if (words[i] !== 0) return false;
    return true;
  };

  const answer = (id: number, s: SourceSession, reqId: number, wanted: number[], t0: number) => {
    const mem = s.mem!;
    const a = demandAnswer(reqId, wanted, s.pages, s.soft!, (p) => isZero(s.words!, p), (p, into) => {
      const at = RESERVED_BYTES + p * PAGE_SIZE;
      into.set(mem.subarray(at, at + PAGE_SIZE));
    });
    if (!a) return;
    const { want, frame: bytes } = a;
    s.framed.sendEncoded(bytes).then(
      () => post({ t: 'served', id, pages: want, bytes: bytes.length, latencyMs: performance.now() - t0 }),
      (e: unknown) => { if (!s.closing) post({ t: 'failed', id, code: codeOf(e), message: (e as Error).message }); },
    );
  };

  const read = async (id: number, s: SourceSession) => {
    try {
      for (;;) {
        const f = await s.framed.next();
        if (!f) break;
        if (f.type === 'PAGE_REQUEST') {
          const t0 = performance.now();
          if (s.mem) answer(id, s, f.id, f.pages, t0);
          else s.early.push({ id: f.id, pages: f.pages, t: t0 });
        } else if (f.type === 'PING') {
          await s.framed.send({ type: 'PONG', seq: f.seq, time: f.time });
        } else if (f.type === 'ERROR') {
          throw errorOf(f.code, `destination reported: ${f.message}`);
        } else {
          throw errorOf('ERR_PROTOCOL_SEQUENCE', `${f.type} on the fault channel`);
        }
      }
      // The end of the fault channel alone is no failure: the destination closes it once every
      // page is there, and a destination that died fails the control connection too.
    } catch (e) {
      if (!s.closing) post({ t: 'failed', id, code: codeOf(e), message: (e as Error).message });
      s.framed.abort();
    }
  };

  parentPort!.on('message', (m: ToSource) => {
    if (m.t === 'dial') {
      void (async () => {
        let framed: FramedConnection | null = null;
        try {
          const conn = await tcp().dial(`${m.host.includes(':') ? `[${m.host}]` : m.host}:${m.port}`);
          framed = new FramedConnection(m.shape ? shaped(conn, { ...m.shape, clock: realClock() }) : conn);
          await framed.send({ type: 'JOIN', token: m.token, stream: 0, role: 'fault' });
          const ack = await framed.next();
          if (ack?.type === 'ERROR') throw errorOf(ack.code, ack.message);
          if (ack?.type !== 'ACK' || ack.acked !== 'JOIN') throw errorOf('ERR_PROTOCOL_SEQUENCE', `expected ACK of JOIN, got ${ack?.type ?? 'end of stream'}`);
          const s: SourceSession = { framed, mem: null, words: null, pages: 0, soft: null, early: [], closing: false };
          sessions.set(m.id, s);
          void read(m.id, s);
          post({ t: 'dialed', id: m.id });
        } catch (e) {
          framed?.abort();
          post({ t: 'dial-failed', id: m.id, code: codeOf(e), message: (e as Error).message });
        }
      })();
    } else if (m.t === 'serve') {
      const s = sessions.get(m.id);
      if (!s) return;
      s.mem = new Uint8Array(m.memory);
      s.words = new Uint32Array(m.memory, 0, m.memory.byteLength >>> 2);
      s.pages = m.pages;
      s.soft = new Bitmap(m.softBits, m.soft);
      for (const r of s.early.splice(0)) answer(m.id, s, r.id, r.pages, r.t);
    } else {
      const s = sessions.get(m.id);
      sessions.delete(m.id);
      if (!s) {
        post({ t: 'closed', id: m.id });
        return;
      }
      s.closing = true;
      void s.framed.close().catch(() => undefined).finally(() => post({ t: 'closed', id: m.id }));
    }
  });
}

const role = isMainThread ? undefined : (workerData as Role | undefined);
if (role?.role === 'listen' || role?.role === 'source') {
  const priority = raisePriority(role.ask);
  if (role.role === 'listen') listenThread(role.host, priority);
  else sourceThread(priority);
}

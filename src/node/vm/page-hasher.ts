/**
 * Hashes every page of a guest memory on worker threads, reading the shared memory in place: the
 * page hashes of the memory digest (XXH3-64 per page, as EngineDeps.hashPage) of a paused VM.
 *
 * Why: the source hashes its paused memory once every page has reached the destination, and the
 * migration is not over until it has. On one thread that took 35-75 ms per 256 MiB on this
 * machine kind (the completion phase of every pre-copy); the VM's vCPU thread is idle then, and so
 * are the cores it ran on.
 *
 * One module, two roles (like the fault thread): imported on a host thread it is the pool; run as
 * a worker it hashes the ranges it is sent. A worker that fails or exits leaves its range to the
 * calling thread, so a migration never fails for want of a hashing thread.
 */
import { availableParallelism } from 'node:os';
import { Worker, parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { BugIndicatingError } from '../../core/errors.js';
import { PAGE_SIZE } from '../../core/pages.js';
import { hashPages, pageHashBackend } from './page-hash.js';
import { collectSoon, endThreads, type ThreadsClosed } from '../threads.js';

interface Job {
  id: number;
  memory: SharedArrayBuffer;
  /** Byte offset of page 0 in `memory`. */
  base: number;
  from: number;
  to: number;
  out: SharedArrayBuffer;
}

/** Serve a PageHashQueue's ring (see RING) until it is closed. */
interface QueueJob {
  id: number;
  /** The memory itself, not its buffer: the thread sees it grow. */
  memory: WebAssembly.Memory;
  base: number;
  out: SharedArrayBuffer;
  ring: SharedArrayBuffer;
}

/**
 * A queue's ring, shared with its thread: ranges go in without a message each (a postMessage per
 * range, its SharedArrayBuffers cloned every time, cost the receiving engine 25-30 ms of its
 * thread per 256 MiB migration). Int32 slots: WRITE (ranges put in), DONE (ranges hashed),
 * CLOSED (no more ranges), ABANDONED (stop now: the pool is closing), CALLER_WAITS (the caller
 * waits for DONE, so the thread wakes it), CLAIM (ranges taken: the next to hash is CLAIM's, and
 * the thread is hashing one while CLAIM > DONE); then CAPACITY entries of (first page, page count).
 *
 * Ranges are hashed in order, each by whoever claims it (compare-and-swap on CLAIM): the thread,
 * or the caller waiting in settled() while the thread is between ranges (asleep, or not yet
 * scheduled: on a busy machine its wake-up took up to several ms of a migration's downtime). The
 * caller claims only when no range is being hashed, and then every range left, so a page queued
 * again is never hashed by one side after the other hashed its newer queueing.
 */
const RING = { WRITE: 0, DONE: 1, CLOSED: 2, ABANDONED: 3, CALLER_WAITS: 4, CLAIM: 5, HEADER: 8, CAPACITY: 4096 } as const;
/**
 * Each thread's doorbell: SEQ is bumped to wake it, WAITS says it is about to sleep on SEQ. A
 * thread serving rings sleeps in Atomics.wait (a futex: waking it costs the caller a few µs,
 * where waking an Atomics.waitAsync in another thread cost ~80 µs measured here).
 */
const BELL = { SEQ: 0, WAITS: 1, SLOTS: 2 } as const;
/**
 * Pages put in the ring before a sleeping thread is woken for them (settled and close wake it at
 * once): pages arrive in smaller runs than this.
 */
const WAKE_PAGES = 2048;

/**
 * Most pages settled() hashes on the caller's thread when the ring's thread is between ranges
 * (16 MiB, 1-3 ms here): more is left to the thread, so the caller's event loop is not held long.
 */
const TAKE_MAX_PAGES = 4096;

/** Tells a thread to end (PageHasher.close). */
interface Exit {
  exit: true;
}

interface Done {
  id: number;
  error?: string;
}

/** out[p] = hashPage of page p, for p in [from, to). */
export function hashPageRange(memory: ArrayBufferLike, base: number, from: number, to: number, out: BigUint64Array): void {
  if (to > from) hashPages(new Uint8Array(memory, base + from * PAGE_SIZE, (to - from) * PAGE_SIZE), out.subarray(from, to));
}

const HERE = new URL(import.meta.url);
/** workerData of a hashing thread (other threads import this module too: they are not one). */
const ROLE = 'ferry-page-hasher';

export class PageHasher {
  private readonly workers: Worker[] = [];
  /** Each thread's doorbell (see BELL). */
  private readonly bells = new Map<Worker, Int32Array>();
  private readonly pending = new Map<number, { worker: Worker; resolve(ok: boolean): void }>();
  private nextId = 1;

  /** @param threads hashing threads (default: one per core, at most 4). */
  constructor(readonly threads = Math.max(1, Math.min(4, availableParallelism()))) {}

  /** Starts the threads now (they take a few tens of ms to load), so a hash() later need not wait. */
  warm(): void {
    while (this.workers.length < this.threads) this.workers.push(this.spawn());
  }

  /**
   * Hashes of guest pages [0, pages) of `memory` (page 0 at byte `base`), index = page. The memory
   * must not change meanwhile (a paused VM). A memory that is not shared is hashed on this thread.
   */
  async hash(memory: WebAssembly.Memory, base: number, pages: number): Promise<BigUint64Array> {
    const buf = memory.buffer as ArrayBufferLike;
    if (!Number.isInteger(pages) || pages < 0 || base < 0 || base + pages * PAGE_SIZE > buf.byteLength) {
      throw new RangeError(`${pages} pages from byte ${base} do not fit in a memory of ${buf.byteLength} bytes`);
    }
    if (!(buf instanceof SharedArrayBuffer)) {
      const out = new BigUint64Array(pages);
      hashPageRange(buf, base, 0, pages, out);
      return out;
    }
    this.warm();
    const out = new BigUint64Array(new SharedArrayBuffer(pages * 8));
    const n = this.workers.length;
    const per = Math.ceil(pages / n);
    const ranges = this.workers.map((w, i) => ({ w, from: Math.min(pages, i * per), to: Math.min(pages, (i + 1) * per) }));
    const ok = await Promise.all(ranges.map((r) => (r.from < r.to ? this.run(r.w, { memory: buf, base, from: r.from, to: r.to, out: out.buffer as SharedArrayBuffer }) : true)));
    // A range a thread could not hash is hashed here.
    ranges.forEach((r, i) => { if (!ok[i]) hashPageRange(buf, base, r.from, r.to, out); });
    return new BigUint64Array(out);
  }

  /**
   * A queue of guest pages to hash on one of the threads, in the order queued, each read from
   * `memory` when its turn comes: the hash left for a page queued again after each change is that
   * of its last content. Hashes land in `out` (index = page), shared with the thread. A memory that
   * is not shared, or a range the thread could not hash, is hashed on this thread, in order too.
   */
  queue(memory: WebAssembly.Memory, base: number, pages: number): PageHashQueue {
    return new PageHashQueue(this, memory, base, pages);
  }

  /**
   * Has thread `slot` serve a queue's ring until the ring is closed; resolves true once it has
   * stopped serving it, false if the thread could not (or went away meanwhile).
   */
  serveOn(slot: number, job: Omit<QueueJob, 'id'>): { serving: Promise<boolean>; bell: Int32Array | null } {
    this.warm();
    const w = this.workers[slot % Math.max(1, this.workers.length)];
    if (!w) return { serving: Promise.resolve(false), bell: null };
    const ctl = new Int32Array(job.ring, 0, RING.HEADER);
    const bell = this.bells.get(w)!;
    const serving = this.run(w, job).finally(() => this.rings.delete(ctl));
    this.rings.set(ctl, { serving, bell });
    return { serving, bell };
  }

  /** The rings threads serve now, each until its job ends (see close). */
  private readonly rings = new Map<Int32Array, { serving: Promise<boolean>; bell: Int32Array }>();

  private run(worker: Worker, job: Omit<Job, 'id'> | Omit<QueueJob, 'id'>): Promise<boolean> {
    const id = this.nextId++;
    // Held while it works for someone; idle, it keeps no process alive.
    worker.ref();
    return new Promise<boolean>((resolve) => {
      this.pending.set(id, { worker, resolve });
      worker.postMessage({ ...job, id } satisfies Job | QueueJob);
      // A thread serving rings reads its messages between ranges, and must wake for this one.
      const bell = this.bells.get(worker);
      if (bell) ring(bell);
    }).finally(() => {
      if (![...this.pending.values()].some((p) => p.worker === worker)) worker.unref();
    });
  }

  private spawn(): Worker {
    const bell = new Int32Array(new SharedArrayBuffer(BELL.SLOTS * 4));
    const worker = new Worker(HERE, { workerData: { role: ROLE, bell: bell.buffer } });
    this.bells.set(worker, bell);
    worker.on('message', (m: Done) => {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      p.resolve(m.error === undefined);
    });
    const gone = () => {
      this.bells.delete(worker);
      const i = this.workers.indexOf(worker);
      if (i >= 0) this.workers.splice(i, 1);
      for (const [id, p] of this.pending) {
        if (p.worker !== worker) continue;
        this.pending.delete(id);
        p.resolve(false);
      }
    };
    worker.on('error', gone);
    worker.on('exit', gone);
    // Idle, it never keeps a host process alive (after the listeners: a 'message' listener refs it).
    worker.unref();
    return worker;
  }

  /** Threads started and still running. */
  get running(): number {
    return this.workers.length;
  }

  /** Stops the threads (a later hash() starts new ones). */
  async close(): Promise<ThreadsClosed> {
    // A thread serving a queue is told to stop first (its queue hashes what is left on its own
    // thread), so no thread goes while it sleeps on a ring.
    if (this.rings.size > 0) {
      const rings = [...this.rings];
      for (const [ctl, r] of rings) {
        Atomics.store(ctl, RING.ABANDONED, 1);
        ring(r.bell);
      }
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([Promise.all(rings.map(([, r]) => r.serving)), new Promise((r) => { timer = setTimeout(r, 2000); })]);
      clearTimeout(timer);
    }
    const ws = this.workers.splice(0);
    // Asked, not terminated: a thread may still be loading the hashing library (see endThread).
    return endThreads(ws.map((w) => ({ worker: w, ask: () => w.postMessage({ exit: true } satisfies Exit) })));
  }
}

/** Wakes the thread whose doorbell this is (if it sleeps). */
function ring(bell: Int32Array): void {
  Atomics.add(bell, BELL.SEQ, 1);
  Atomics.notify(bell, BELL.SEQ);
}

/** A ring a thread serves, with its views. */
interface Served {
  job: QueueJob;
  ctl: Int32Array;
  entries: Int32Array;
  out: BigUint64Array;
  buf: ArrayBufferLike;
}

/** Hashes every range in `r` now; true if there was any. Throws once the ring is abandoned. */
function serveSome(r: Served): boolean {
  const { ctl, entries } = r;
  let did = false;
  for (;;) {
    if (Atomics.load(ctl, RING.ABANDONED) !== 0) throw new Error('abandoned: the pool is closing');
    const d = Atomics.load(ctl, RING.CLAIM);
    if (d >= Atomics.load(ctl, RING.WRITE)) break;
    // Read before claiming: once claimed, the entry's slot may take a new range.
    const i = (d % RING.CAPACITY) * 2;
    const [from, to] = [entries[i], entries[i] + entries[i + 1]];
    if (Atomics.compareExchange(ctl, RING.CLAIM, d, d + 1) !== d) continue; // the caller took the rest
    if (r.job.base + to * PAGE_SIZE > r.buf.byteLength) r.buf = r.job.memory.buffer; // it grew
    hashPageRange(r.buf, r.job.base, from, to, r.out);
    Atomics.store(ctl, RING.DONE, d + 1);
    if (Atomics.load(ctl, RING.CALLER_WAITS) !== 0) Atomics.notify(ctl, RING.DONE);
    did = true;
  }
  if (Atomics.load(ctl, RING.ABANDONED) !== 0) throw new Error('abandoned: the pool is closing');
  return did;
}

/**
 * A hashing thread with rings to serve: it hashes their ranges as they come, takes its other
 * messages (hash jobs, more rings) between them, and sleeps on its doorbell when there is nothing
 * to do. It goes back to its event loop once every ring is closed and drained.
 */
function serveRings(first: QueueJob, port: MessagePort, bell: Int32Array, hashJob: (j: Job) => void, done: (id: number, e?: unknown) => void): void {
  const open = (j: QueueJob): Served => ({
    job: j, ctl: new Int32Array(j.ring, 0, RING.HEADER), entries: new Int32Array(j.ring, RING.HEADER * 4, RING.CAPACITY * 2),
    out: new BigUint64Array(j.out), buf: j.memory.buffer,
  });
  const rings = [open(first)];
  while (rings.length > 0) {
    const seen = Atomics.load(bell, BELL.SEQ);
    for (let m = receiveMessageOnPort(port); m; m = receiveMessageOnPort(port)) {
      const j = m.message as Job | QueueJob | Exit;
      if ('exit' in j) process.exit(0);
      if ('ring' in j) rings.push(open(j));
      else hashJob(j);
    }
    let worked = false;
    for (let k = rings.length - 1; k >= 0; k--) {
      const r = rings[k];
      try {
        if (serveSome(r)) worked = true;
        if (Atomics.load(r.ctl, RING.CLOSED) === 0 || Atomics.load(r.ctl, RING.DONE) < Atomics.load(r.ctl, RING.WRITE)) continue;
        done(r.job.id);
      } catch (e) {
        done(r.job.id, e);
      }
      rings.splice(k, 1);
    }
    if (worked || rings.length === 0) continue;
    // Say so, then look once more: a caller that put work in after the look above sees WAITS and rings.
    Atomics.store(bell, BELL.WAITS, 1);
    const idle = rings.every((r) => Atomics.load(r.ctl, RING.DONE) === Atomics.load(r.ctl, RING.WRITE) && Atomics.load(r.ctl, RING.CLOSED) === 0 && Atomics.load(r.ctl, RING.ABANDONED) === 0);
    if (idle) Atomics.wait(bell, BELL.SEQ, seen);
    Atomics.store(bell, BELL.WAITS, 0);
  }
}

if (parentPort && (workerData as { role?: unknown } | null)?.role === ROLE) {
  const port = parentPort;
  const bell = new Int32Array((workerData as { bell: SharedArrayBuffer }).bell);
  pageHashBackend(); // loads the hashing library now, not in a migration's first range
  const done = (id: number, e?: unknown) => port.postMessage(e === undefined ? { id } satisfies Done : { id, error: e instanceof Error ? e.message : String(e) } satisfies Done);
  const hashJob = (j: Job) => {
    try {
      hashPageRange(j.memory, j.base, j.from, j.to, new BigUint64Array(j.out));
      done(j.id);
    } catch (e) {
      done(j.id, e);
    }
  };
  port.on('message', (j: Job | QueueJob | Exit) => {
    if ('exit' in j) process.exit(0); // in a worker, ends this thread only
    if ('ring' in j) serveRings(j, port, bell, hashJob, done);
    else hashJob(j);
    // Every job names a guest memory, which this thread would otherwise keep (see threads.ts).
    collectSoon();
  });
}

/** See PageHasher.queue. */
export class PageHashQueue {
  /** Hashes, index = page (shared with the hashing thread). */
  readonly out: BigUint64Array;
  /** The run of consecutive pages being gathered (first, end), not in the ring yet. */
  private runFirst = -1;
  private runEnd = -1;
  private flushing = false;
  /** The ring shared with the thread (see RING), or null when this thread hashes (memory not shared, or the thread failed). */
  private ctl: Int32Array | null = null;
  private entries: Int32Array | null = null;
  /** Ranges put in (the ring's WRITE, kept here too), and ranges waiting for room in the ring. */
  private written = 0;
  private readonly overflow: number[] = [];
  /** Resolves true once the thread stopped serving the ring, false if it failed. */
  private serving: Promise<boolean> = Promise.resolve(true);
  /** The serving thread's doorbell. */
  private bell: Int32Array | null = null;
  private closed = false;

  constructor(hasher: PageHasher, private readonly memory: WebAssembly.Memory, private readonly base: number, pages: number) {
    this.out = new BigUint64Array(new SharedArrayBuffer(pages * 8));
    const buf = memory.buffer as ArrayBufferLike;
    if (!(buf instanceof SharedArrayBuffer)) return;
    const ring = new SharedArrayBuffer((RING.HEADER + RING.CAPACITY * 2) * 4);
    this.ctl = new Int32Array(ring, 0, RING.HEADER);
    this.entries = new Int32Array(ring, RING.HEADER * 4, RING.CAPACITY * 2);
    // One thread, so ranges are hashed in the order queued.
    const { serving, bell } = hasher.serveOn(0, { memory, base, out: this.out.buffer as SharedArrayBuffer, ring });
    this.serving = serving;
    this.bell = bell;
    void this.serving.then((ok) => { if (!ok) this.takeOver(); });
  }

  /** Queues `page` (it was just installed). Consecutive pages go as one range, at the end of this turn. */
  add(page: number): void {
    this.addRange(page, 1);
  }

  /** Queues pages [first, first + count). */
  addRange(first: number, count: number): void {
    if (this.closed) throw new BugIndicatingError('pages queued after the queue was closed');
    if (first === this.runEnd) {
      this.runEnd += count;
      return;
    }
    this.flush();
    this.runFirst = first;
    this.runEnd = first + count;
    if (!this.flushing) {
      this.flushing = true;
      queueMicrotask(() => {
        this.flushing = false;
        this.flush();
      });
    }
  }

  /**
   * Resolves once every page queued so far is hashed. Whatever the thread has not begun when it is
   * between ranges is hashed here, at once (see RING).
   */
  async settled(): Promise<void> {
    this.flush();
    for (;;) {
      const ctl = this.ctl;
      if (!ctl) return; // hashed here, in order, as they came
      this.refill(true);
      if (this.takeRest(ctl)) continue; // the ring may have room for more now
      Atomics.store(ctl, RING.CALLER_WAITS, 1);
      const done = Atomics.load(ctl, RING.DONE);
      if (done >= this.written && this.overflow.length === 0) {
        Atomics.store(ctl, RING.CALLER_WAITS, 0);
        return;
      }
      // Woken by the thread's progress, or by its failure (then hashed here: takeOver).
      const r = Atomics.waitAsync(ctl, RING.DONE, done, 50);
      if (r.async) await Promise.race([r.value, this.serving]);
      Atomics.store(ctl, RING.CALLER_WAITS, 0);
    }
  }

  /**
   * Claims and hashes every range in the ring, if the thread is hashing none (CLAIM = DONE; a
   * range it is hashing is waited for, so ranges stay in order) and they hold at most
   * TAKE_MAX_PAGES. True if it took them.
   */
  private takeRest(ctl: Int32Array): boolean {
    const claim = Atomics.load(ctl, RING.DONE);
    if (claim >= this.written || Atomics.load(ctl, RING.CLAIM) !== claim) return false;
    const entries = this.entries!;
    let pages = 0;
    for (let d = claim; d < this.written && pages <= TAKE_MAX_PAGES; d++) pages += entries[(d % RING.CAPACITY) * 2 + 1];
    if (pages > TAKE_MAX_PAGES) return false;
    if (Atomics.compareExchange(ctl, RING.CLAIM, claim, this.written) !== claim) return false;
    this.hashRingFrom(claim);
    Atomics.store(ctl, RING.DONE, this.written);
    return true;
  }

  /** Hashes the ring's ranges from entry `from` to the last put in, here. */
  private hashRingFrom(from: number): void {
    const buf = this.memory.buffer;
    const entries = this.entries!;
    for (let d = from; d < this.written; d++) {
      const i = (d % RING.CAPACITY) * 2;
      hashPageRange(buf, this.base, entries[i], entries[i] + entries[i + 1], this.out);
    }
  }

  /**
   * From now on the thread is woken for every range, not every WAKE_PAGES: for the last pages of a
   * migration (the source is paused), where what counts is how soon the last is hashed.
   */
  hurry(): void {
    this.wakePages = 1;
    this.refill(true);
  }

  private wakePages: number = WAKE_PAGES;

  /** No more pages: the thread stops serving the ring once it has hashed what is in it. */
  close(): void {
    if (this.closed) return;
    this.flush();
    this.closed = true;
    const ctl = this.ctl;
    if (!ctl) return;
    this.refill(true);
    Atomics.store(ctl, RING.CLOSED, 1);
    if (this.bell) ring(this.bell);
  }

  private flush(): void {
    if (this.runFirst < 0) return;
    const [from, to] = [this.runFirst, this.runEnd];
    this.runFirst = this.runEnd = -1;
    if (!this.ctl) {
      hashPageRange(this.memory.buffer, this.base, from, to, this.out);
      return;
    }
    this.overflow.push(from, to - from);
    this.refill();
  }

  /**
   * Moves waiting ranges into the ring while it has room, in order, and wakes the thread if it
   * waits and WAKE_PAGES have gathered (or `wake`).
   */
  private refill(wake = false): void {
    const ctl = this.ctl;
    if (!ctl) return;
    const room = RING.CAPACITY - (this.written - Atomics.load(ctl, RING.DONE));
    const n = Math.min(room, this.overflow.length / 2);
    if (n > 0) {
      for (let k = 0; k < n; k++) {
        const i = (this.written % RING.CAPACITY) * 2;
        this.entries![i] = this.overflow[2 * k];
        this.entries![i + 1] = this.overflow[2 * k + 1];
        this.unsignalled += this.overflow[2 * k + 1];
        this.written++;
      }
      this.overflow.splice(0, 2 * n);
      Atomics.store(ctl, RING.WRITE, this.written);
    }
    const bell = this.bell;
    if (bell && this.unsignalled > 0 && (wake || this.unsignalled >= this.wakePages) && Atomics.load(bell, BELL.WAITS) !== 0) {
      ring(bell);
      this.unsignalled = 0;
    }
  }

  /** Pages put in the ring since the thread was last woken. */
  private unsignalled = 0;

  /** The thread failed: what it had not hashed is hashed here, in order, and so is everything after. */
  private takeOver(): void {
    const ctl = this.ctl;
    if (!ctl) return;
    this.ctl = null;
    this.hashRingFrom(Atomics.load(ctl, RING.DONE));
    const buf = this.memory.buffer;
    for (let k = 0; k < this.overflow.length; k += 2) hashPageRange(buf, this.base, this.overflow[k], this.overflow[k] + this.overflow[k + 1], this.out);
    this.overflow.length = 0;
    // Wake a settled() waiting on the ring.
    Atomics.notify(ctl, RING.DONE);
  }
}

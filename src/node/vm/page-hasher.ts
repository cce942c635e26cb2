/**
 * Hashes every page of a guest memory on worker threads, reading the shared memory in place: the
 * page hashes of the memory digest (xxh64 per page, as EngineDeps.hashPage) of a paused VM.
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
import { Worker, parentPort, workerData } from 'node:worker_threads';
import { PAGE_SIZE } from '../../core/pages.js';
import { hashPage } from './page-hash.js';

interface Job {
  id: number;
  memory: SharedArrayBuffer;
  /** Byte offset of page 0 in `memory`. */
  base: number;
  from: number;
  to: number;
  out: SharedArrayBuffer;
}

interface Done {
  id: number;
  error?: string;
}

/** out[p] = hashPage of page p, for p in [from, to). */
export function hashPageRange(memory: ArrayBufferLike, base: number, from: number, to: number, out: BigUint64Array): void {
  for (let p = from; p < to; p++) out[p] = hashPage(new Uint8Array(memory, base + p * PAGE_SIZE, PAGE_SIZE));
}

const HERE = new URL(import.meta.url);
/** workerData of a hashing thread (other threads import this module too: they are not one). */
const ROLE = 'ferry-page-hasher';

export class PageHasher {
  private readonly workers: Worker[] = [];
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

  /** Hashes pages [from, to) into `out` on thread `slot` (0 = first); false when it could not. */
  hashOn(slot: number, memory: ArrayBufferLike, base: number, from: number, to: number, out: SharedArrayBuffer): Promise<boolean> {
    this.warm();
    const w = this.workers[slot % Math.max(1, this.workers.length)];
    return w ? this.run(w, { memory: memory as SharedArrayBuffer, base, from, to, out }) : Promise.resolve(false);
  }

  private run(worker: Worker, job: Omit<Job, 'id'>): Promise<boolean> {
    const id = this.nextId++;
    // Held while it works for someone; idle, it keeps no process alive.
    worker.ref();
    return new Promise<boolean>((resolve) => {
      this.pending.set(id, { worker, resolve });
      worker.postMessage({ ...job, id } satisfies Job);
    }).finally(() => {
      if (![...this.pending.values()].some((p) => p.worker === worker)) worker.unref();
    });
  }

  private spawn(): Worker {
    const worker = new Worker(HERE, { workerData: { role: ROLE } });
    worker.on('message', (m: Done) => {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      p.resolve(m.error === undefined);
    });
    const gone = () => {
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

  /** Stops the threads (a later hash() starts new ones). */
  async close(): Promise<void> {
    const ws = this.workers.splice(0);
    await Promise.all(ws.map((w) => w.terminate()));
  }
}

if (parentPort && (workerData as { role?: unknown } | null)?.role === ROLE) {
  const port = parentPort;
  port.on('message', (j: Job) => {
    try {
      hashPageRange(j.memory, j.base, j.from, j.to, new BigUint64Array(j.out));
      port.postMessage({ id: j.id } satisfies Done);
    } catch (e) {
      port.postMessage({ id: j.id, error: e instanceof Error ? e.message : String(e) } satisfies Done);
    }
  });
}

/** See PageHasher.queue. */
export class PageHashQueue {
  /** Hashes, index = page (shared with the hashing thread). */
  readonly out: BigUint64Array;
  private runFirst = -1;
  private runEnd = -1;
  private flushing = false;
  private tail: Promise<void> = Promise.resolve();

  constructor(private readonly hasher: PageHasher, private readonly memory: WebAssembly.Memory, private readonly base: number, pages: number) {
    this.out = new BigUint64Array(new SharedArrayBuffer(pages * 8));
  }

  /** Queues `page` (it was just installed). Consecutive pages go as one range, at the end of this turn. */
  add(page: number): void {
    if (page === this.runEnd) {
      this.runEnd++;
      return;
    }
    this.flush();
    this.runFirst = page;
    this.runEnd = page + 1;
    if (!this.flushing) {
      this.flushing = true;
      queueMicrotask(() => {
        this.flushing = false;
        this.flush();
      });
    }
  }

  /** Resolves once every page queued so far is hashed. */
  settled(): Promise<void> {
    this.flush();
    return this.tail;
  }

  private flush(): void {
    if (this.runFirst < 0) return;
    const [from, to] = [this.runFirst, this.runEnd];
    this.runFirst = this.runEnd = -1;
    const buf = this.memory.buffer as ArrayBufferLike;
    const out = this.out.buffer as SharedArrayBuffer;
    if (!(buf instanceof SharedArrayBuffer)) {
      hashPageRange(buf, this.base, from, to, this.out);
      return;
    }
    // One thread, so ranges are hashed in the order queued; a range it could not hash is hashed
    // here once every range before it has settled, so the order holds.
    const done = this.hasher.hashOn(0, buf, this.base, from, to, out);
    this.tail = Promise.all([this.tail, done]).then(([, ok]) => {
      if (!ok) hashPageRange(this.memory.buffer, this.base, from, to, this.out);
    });
  }
}

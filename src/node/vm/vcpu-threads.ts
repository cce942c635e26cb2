/**
 * Spare vCPU threads: a host that receives VMs keeps one thread started and loaded ahead of the
 * VM it will run. Starting a worker thread (a Node isolate, the vCPU code, the device library)
 * costs 35–60 ms of a core (measured on a migration destination); taken from here, a VM's thread
 * only adopts the VM — its memory, control blocks, modules and port arrive by message — so that
 * cost is paid while the host is idle instead of inside a migration's first round, where the
 * destination's main thread needs the core.
 *
 * One pool per host (like the memory pool): `take()` hands out a standing thread (or null: the VM
 * starts its own), and the pool starts the next spare `refillDelayMs` later and only once the host
 * says it is not `busy` — starting a thread in the middle of a post-copy migration took the CPU its
 * fault threads needed (fault-latency p99 2.6 ms against a floor of 1.0 ms, measured). Spare
 * threads never keep the process alive.
 */
import { MessageChannel, Worker, type MessagePort } from 'node:worker_threads';
import { endThreads, type ThreadsClosed } from '../threads.js';

/** workerData of a spare thread (see vcpu-worker.ts). */
export interface SpareThreadData {
  role: 'ferry-vcpu-spare';
  /** Rung (Int32 0) when the adoption message is on `port`. */
  wake: SharedArrayBuffer;
  port: MessagePort;
}

export const SPARE_ROLE = 'ferry-vcpu-spare';

/** A standing thread and how to hand it its VM. */
export interface SpareThread {
  readonly worker: Worker;
  /** Sends the VM's thread data (what a fresh thread would get as workerData) and wakes the thread. */
  adopt(data: unknown, transfer: (MessagePort | ArrayBuffer)[]): void;
}

interface Standing {
  worker: Worker;
  port: MessagePort;
  wake: Int32Array;
  onExit: () => void;
}

/** Posts a standing thread `message` and rings it: it waits on its wake word, not on its port. */
function tell(s: Standing, message: unknown, transfer: (MessagePort | ArrayBuffer)[] = []): void {
  s.port.postMessage(message, transfer);
  Atomics.add(s.wake, 0, 1);
  Atomics.notify(s.wake, 0);
}

export interface VcpuThreadPoolInit {
  /** How long after a take the next spare starts, ms (default 250). */
  refillDelayMs?: number;
  /** True while the host should not start a thread (a migration is under way): the refill waits. */
  busy?: () => boolean;
}

export class VcpuThreadPool {
  private readonly standing: Standing[] = [];
  private timer: NodeJS.Timeout | null = null;
  private closed = false;
  /** Threads handed out, and started. */
  taken = 0;
  started = 0;

  private readonly refillDelayMs: number;
  private readonly busy: () => boolean;

  /** @param spares threads to keep standing (0 keeps none: every VM starts its own) */
  constructor(readonly spares = 1, init: VcpuThreadPoolInit = {}) {
    if (!Number.isInteger(spares) || spares < 0 || spares > 16) throw new RangeError(`spares ${spares} is not an integer in 0..16`);
    this.refillDelayMs = init.refillDelayMs ?? 250;
    this.busy = init.busy ?? (() => false);
    this.refill();
  }

  /** A standing thread for a VM, or null when none stands by. */
  take(): SpareThread | null {
    const s = this.standing.shift();
    this.scheduleRefill();
    if (!s) return null;
    this.taken++;
    s.worker.off('exit', s.onExit);
    s.worker.ref();
    return {
      worker: s.worker,
      adopt: (data, transfer) => {
        tell(s, { data }, transfer);
        s.port.close();
      },
    };
  }

  private scheduleRefill(): void {
    if (this.closed || this.timer || this.standing.length >= this.spares) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.busy()) this.scheduleRefill();
      else this.refill();
    }, this.refillDelayMs);
    this.timer.unref();
  }

  private refill(): void {
    while (!this.closed && this.standing.length < this.spares) {
      const { port1, port2 } = new MessageChannel();
      const wake = new SharedArrayBuffer(4);
      const data: SpareThreadData = { role: SPARE_ROLE, wake, port: port2 };
      const worker = new Worker(new URL('./vcpu-worker.js', import.meta.url), { workerData: data, transferList: [port2] });
      this.started++;
      const s: Standing = {
        worker, port: port1, wake: new Int32Array(wake),
        // A spare that dies (it should not) is only forgotten: a VM then starts its own.
        onExit: () => {
          const i = this.standing.indexOf(s);
          if (i >= 0) this.standing.splice(i, 1);
        },
      };
      worker.on('error', () => undefined);
      worker.once('exit', s.onExit);
      worker.unref();
      port1.unref();
      this.standing.push(s);
    }
  }

  /** Stops the standing threads; later takes get none. */
  async close(): Promise<ThreadsClosed> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const all = this.standing.splice(0);
    // Asked, not terminated: a spare may still be loading its native calls (see endThread).
    return endThreads(all.map((s) => ({
      worker: s.worker,
      ask: () => {
        s.worker.off('exit', s.onExit);
        tell(s, { exit: true });
      },
    })));
  }
}

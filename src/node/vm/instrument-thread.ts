/**
 * Guest modules instrumented on a thread of its own. binaryen takes tens of milliseconds per
 * variant (the kv guest: ~50 ms each, three variants for an arriving VM), all of it synchronous:
 * on a host's thread that is as long with no socket read, no relayed client request, no answer
 * from its API — a migration arriving with a module the host had not seen stalled the demo's
 * client 140-160 ms. InstrumentCache.prepare runs the rewrite here and keeps the result, so the
 * synchronous InstrumentCache.get that Vm.create calls finds it.
 *
 * One module, two roles (like the page hasher): imported on a host thread it is the client; run
 * as a worker it rewrites what it is sent. A thread that cannot be started or fails leaves the
 * rewrite to the caller (InstrumentCache.get), so nothing fails for want of it.
 */
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { BugIndicatingError, GuestModuleError } from '../../core/errors.js';
import { instrument, type InstrumentedModule, type Variant } from './instrument.js';

const ROLE = 'ferry-instrument';

interface Job {
  id: number;
  bytes: Uint8Array;
  variant: Variant;
}

type Answer =
  | { id: number; ok: true; bytes: Uint8Array; module: WebAssembly.Module; info: InstrumentedModule['info'] }
  | { id: number; ok: false; guest: boolean; code?: string; message: string };

export class InstrumentThread {
  private worker: Worker | null = null;
  private readonly pending = new Map<number, { resolve(m: InstrumentedModule | null): void; reject(e: Error): void; variant: Variant }>();
  private nextId = 1;

  /**
   * `bytes` rewritten into `variant` on the thread. Rejects with GuestModuleError for a module the
   * rewriter refuses; resolves null when the thread could not do it (the caller rewrites then).
   */
  run(bytes: Uint8Array, variant: Variant): Promise<InstrumentedModule | null> {
    const w = this.thread();
    if (!w) return Promise.resolve(null);
    const id = this.nextId++;
    w.ref();
    return new Promise<InstrumentedModule | null>((resolve, reject) => {
      this.pending.set(id, { resolve, reject, variant });
      w.postMessage({ id, bytes, variant } satisfies Job);
    }).finally(() => {
      if (this.pending.size === 0) this.worker?.unref();
    });
  }

  /**
   * Starts the thread now: loading the rewriter takes it 100-200 ms, which a host that starts it
   * when it starts keeps out of its first arriving migration's set-up.
   */
  warm(): void {
    this.thread();
  }

  /** Stops the thread (a later run starts a new one). */
  async close(): Promise<void> {
    const w = this.worker;
    this.worker = null;
    if (w) await w.terminate();
  }

  private thread(): Worker | null {
    if (this.worker) return this.worker;
    let w: Worker;
    try {
      w = new Worker(new URL(import.meta.url), { workerData: { role: ROLE } });
    } catch {
      return null;
    }
    w.on('message', (a: Answer) => {
      const p = this.pending.get(a.id);
      if (!p) return;
      this.pending.delete(a.id);
      if (a.ok) p.resolve({ variant: p.variant, bytes: a.bytes, module: a.module, info: a.info });
      else if (a.guest) p.reject(new GuestModuleError(a.code ?? 'ERR_MODULE_INVALID', a.message));
      else p.resolve(null); // the thread's own trouble: the caller rewrites on its thread
    });
    const gone = () => {
      if (this.worker === w) this.worker = null;
      for (const [id, p] of this.pending) {
        this.pending.delete(id);
        p.resolve(null);
      }
    };
    w.on('error', gone);
    w.on('exit', gone);
    w.unref();
    this.worker = w;
    return w;
  }
}

let shared: InstrumentThread | null = null;
/** This process's instrumenting thread, started on first use. */
export function instrumentThread(): InstrumentThread {
  return (shared ??= new InstrumentThread());
}

if (!isMainThread && parentPort && (workerData as { role?: unknown } | null)?.role === ROLE) {
  const port = parentPort;
  port.on('message', (j: Job) => {
    try {
      const m = instrument(j.bytes, j.variant);
      port.postMessage({ id: j.id, ok: true, bytes: m.bytes, module: m.module, info: m.info } satisfies Answer);
    } catch (e) {
      const guest = e instanceof GuestModuleError;
      const err = e as Error & { code?: string };
      port.postMessage({ id: j.id, ok: false, guest, ...(guest ? { code: err.code } : {}), message: e instanceof BugIndicatingError || !(e instanceof Error) ? String(e) : err.message } satisfies Answer);
    }
  });
}

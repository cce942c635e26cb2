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
import binaryen from 'binaryen';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { BugIndicatingError, GuestModuleError } from '../../core/errors.js';
import { VARIANTS, instrument, type InstrumentedModule, type Variant } from './instrument.js';

const ROLE = 'ferry-instrument';

interface Job {
  id: number;
  bytes: Uint8Array;
  variant: Variant;
}

/** Asks the thread to rewrite SAMPLE_GUEST in every variant once (see InstrumentThread.warm). */
interface WarmJob {
  id: number;
  warm: true;
}

/**
 * A small guest with what the rewriter handles (stores of every width and with offsets, bulk
 * memory, a loop, mutable globals, a data segment), for warming the rewriter.
 */
const SAMPLE_GUEST = `(module
  (memory (export "memory") 2 2)
  (data (i32.const 64) "ferry")
  (global $n (mut i64) (i64.const 0))
  (global $x (mut i32) (i32.const 7))
  (func (export "progress") (result i64) (global.get $n))
  (func (export "run") (param $budget i32) (result i32)
    (local $a i32)
    (block $done
      (loop $l
        (br_if $done (i32.eqz (local.get $budget)))
        (local.set $budget (i32.sub (local.get $budget) (i32.const 1)))
        (global.set $x (i32.xor (global.get $x) (i32.shl (global.get $x) (i32.const 13))))
        (local.set $a (i32.and (global.get $x) (i32.const 0x1fff0)))
        (i64.store offset=8 (local.get $a) (global.get $n))
        (i32.store (local.get $a) (global.get $x))
        (i32.store16 offset=2 (local.get $a) (local.get $budget))
        (i32.store8 (local.get $a) (local.get $budget))
        (f64.store (local.get $a) (f64.load (i32.const 64)))
        (memory.fill (i32.const 4096) (local.get $budget) (i32.const 64))
        (memory.copy (i32.const 8192) (local.get $a) (i32.const 16))
        (global.set $n (i64.add (global.get $n) (i64.const 1)))
        (br $l)))
    (i32.const 0)))`;

/** Rewrites SAMPLE_GUEST in every variant (its result is thrown away). */
function warmRewriter(): void {
  const m = binaryen.parseText(SAMPLE_GUEST);
  try {
    m.setFeatures(binaryen.Features.All);
    const bytes = m.emitBinary();
    for (const v of VARIANTS) instrument(bytes, v);
  } finally {
    m.dispose();
  }
}

type Answer =
  | { id: number; warmed: boolean }
  | { id: number; ok: true; bytes: Uint8Array; module: WebAssembly.Module; info: InstrumentedModule['info'] }
  | { id: number; ok: false; guest: boolean; code?: string; message: string };

/** One instrumenting thread and the jobs it has not answered yet. */
interface Thread {
  worker: Worker;
  /** By job id: what to do with the thread's answer, or with its end (null). */
  waiting: Map<number, (a: Answer | null) => void>;
  /** The warm-up asked of this thread (see warm), once asked. */
  warmed: Promise<boolean> | null;
}

export class InstrumentThread {
  private current: Thread | null = null;
  private nextId = 1;

  /**
   * `bytes` rewritten into `variant` on the thread. Rejects with GuestModuleError for a module the
   * rewriter refuses; resolves null when the thread could not do it (the caller rewrites then).
   */
  run(bytes: Uint8Array, variant: Variant): Promise<InstrumentedModule | null> {
    const t = this.thread();
    if (!t) return Promise.resolve(null);
    return this.ask(t, { bytes, variant }, (a) => {
      if (!a || 'warmed' in a) return null; // the thread ended: the caller rewrites on its thread
      if (a.ok) return { variant, bytes: a.bytes, module: a.module, info: a.info };
      if (a.guest) throw new GuestModuleError(a.code ?? 'ERR_MODULE_INVALID', a.message);
      return null; // the thread's own trouble: the caller rewrites on its thread
    });
  }

  /**
   * Starts the thread now: loading the rewriter takes it 100-200 ms, which a host that starts it
   * when it starts keeps out of its first arriving migration's set-up.
   *
   * `rewrite`: the thread also rewrites a small sample guest in every variant, once. The rewriter
   * (binaryen, itself WebAssembly) runs slowly until V8 has compiled its hot code, and that
   * compiling then takes the cores: the kv guest's first rewrite in a process took 600-860 ms of
   * CPU and 230-300 ms more after it, where after one sample it took 310-440 ms and 50-100 ms
   * (measured here). Doing that at a host's start keeps most of it out of the first arriving
   * migration, whose VM is readied while its source keeps serving and whose downtime and
   * post-copy share the cores with it. It costs the host about a second of CPU, on a thread that
   * nothing waits for. Resolves whether the sample was rewritten.
   */
  warm(opts: { rewrite?: boolean } = {}): Promise<boolean> {
    const t = this.thread();
    if (!t) return Promise.resolve(false);
    if (!opts.rewrite) return Promise.resolve(true);
    return (t.warmed ??= this.ask(t, { warm: true }, (a) => a !== null && 'warmed' in a && a.warmed));
  }

  /** Stops the thread (a later run starts a new one). */
  async close(): Promise<void> {
    const t = this.current;
    this.current = null;
    if (t) await t.worker.terminate();
  }

  /** Posts a job to `t` and settles with what `settle` makes of its answer; the process waits meanwhile. */
  private ask<T>(t: Thread, job: Omit<Job, 'id'> | Omit<WarmJob, 'id'>, settle: (a: Answer | null) => T): Promise<T> {
    const id = this.nextId++;
    t.worker.ref();
    return new Promise<T>((resolve, reject) => {
      t.waiting.set(id, (a) => {
        try {
          resolve(settle(a));
        } catch (e) {
          reject(e as Error);
        }
      });
      t.worker.postMessage({ ...job, id } satisfies Job | WarmJob);
    }).finally(() => {
      // With nothing asked of it, the thread does not keep the process alive.
      if (t.waiting.size === 0) t.worker.unref();
    });
  }

  private thread(): Thread | null {
    if (this.current) return this.current;
    let w: Worker;
    try {
      w = new Worker(new URL(import.meta.url), { workerData: { role: ROLE } });
    } catch {
      return null;
    }
    const t: Thread = { worker: w, waiting: new Map(), warmed: null };
    w.on('message', (a: Answer) => {
      const settle = t.waiting.get(a.id);
      t.waiting.delete(a.id);
      settle?.(a);
    });
    // Its end settles only its own jobs (a thread started after close() keeps its own).
    const gone = () => {
      if (this.current === t) this.current = null;
      for (const [id, settle] of t.waiting) {
        t.waiting.delete(id);
        settle(null);
      }
    };
    w.on('error', gone);
    w.on('exit', gone);
    w.unref();
    this.current = t;
    return t;
  }
}

let shared: InstrumentThread | null = null;
/** This process's instrumenting thread, started on first use. */
export function instrumentThread(): InstrumentThread {
  return (shared ??= new InstrumentThread());
}

if (!isMainThread && parentPort && (workerData as { role?: unknown } | null)?.role === ROLE) {
  const port = parentPort;
  port.on('message', (j: Job | WarmJob) => {
    if ('warm' in j) {
      let warmed = true;
      try {
        warmRewriter();
      } catch {
        warmed = false; // only the warm-up is lost: a real rewrite reports its own trouble
      }
      port.postMessage({ id: j.id, warmed } satisfies Answer);
      return;
    }
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

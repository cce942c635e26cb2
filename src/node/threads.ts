/**
 * Worker threads' lifecycle: letting go of guest memories, and ending without aborting the process.
 *
 * Guest memories: a SharedArrayBuffer's memory is freed only once every thread that held it has
 * collected its last reference (FINDINGS: freeing a VM), and a thread that allocates little never
 * collects: a page-hashing thread that had hashed the memories of forty 64 MiB VMs still held all
 * of them (2.6 GB) long after the VMs were gone — a full benchmark run went out of memory at 24 GB
 * that way. Long-lived threads that take guest memories (page hashing, sending pages) call
 * {@link collectSoon} when they let one go: a full collection follows once the thread is quiet.
 *
 * Node gives no collection call without --expose-gc, which a worker cannot be started with; the
 * flag is set at run time and `gc` taken from a new context, as Jest's leak detector does. Where
 * that fails the thread just collects when V8 decides, as before.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import type { Worker } from 'node:worker_threads';

let gc: (() => void) | null | undefined;
let timer: NodeJS.Timeout | null = null;

/** A full garbage collection in this thread now (false where none can be asked for). */
export function collectNow(): boolean {
  if (gc === undefined) {
    try {
      setFlagsFromString('--expose-gc');
      gc = runInNewContext('gc') as () => void;
    } catch {
      gc = null;
    }
  }
  if (typeof gc !== 'function') return false;
  gc();
  return true;
}

/**
 * A full collection in this thread `afterMs` from now (default 100), unless called again first:
 * after a burst of work the thread collects once, when it has gone quiet. Keeps no thread alive.
 */
export function collectSoon(afterMs = 100): void {
  if (timer) clearTimeout(timer);
  timer = setTimeout(() => {
    timer = null;
    collectNow();
  }, afterMs);
  timer.unref();
}

/**
 * Ends a worker thread by asking it (`ask` posts it the message it exits on), and terminates it
 * only if it has not gone within `timeoutMs`. Terminating a thread while it loads a native addon
 * (koffi, on its first libc call or page hash) aborts the whole process (Node 20: a fatal error in
 * the addon's registration): seen as exit code 134 from a host stopped right after it started,
 * its spare vCPU thread still loading. A thread handles messages only between its synchronous
 * steps, so one that is asked never goes in the middle of a load. Resolves true when the thread
 * ended itself (exit code 0), false when it had gone already or had to be terminated.
 */
export async function endThread(worker: Worker, ask: () => void, timeoutMs = 2000): Promise<boolean> {
  if (worker.threadId < 0) return false; // gone already
  let exited = false;
  let code = -1;
  const gone = new Promise<void>((resolve) => worker.once('exit', (c: number) => { exited = true; code = c; resolve(); }));
  try {
    ask();
  } catch {
    // already gone, or its port closed: terminate below if it is still there
  }
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([gone, new Promise<void>((resolve) => { timer = setTimeout(resolve, timeoutMs); })]);
  clearTimeout(timer);
  if (!exited) await worker.terminate().catch(() => undefined);
  return exited && code === 0;
}

/** What closing a pool of threads did: threads it ended, and how many of them ended themselves when asked. */
export interface ThreadsClosed {
  threads: number;
  endedWhenAsked: number;
}

/** Ends each thread (see endThread), asked the way it says. */
export async function endThreads(threads: { worker: Worker; ask(): void }[]): Promise<ThreadsClosed> {
  const ended = await Promise.all(threads.map((t) => endThread(t.worker, t.ask)));
  return { threads: threads.length, endedWhenAsked: ended.filter(Boolean).length };
}

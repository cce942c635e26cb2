/**
 * Lets a worker thread give back the guest memories it has seen. A SharedArrayBuffer's memory is
 * freed only once every thread that held it has collected its last reference (FINDINGS: freeing a
 * VM), and a thread that allocates little never collects: a page-hashing thread that had hashed
 * the memories of forty 64 MiB VMs still held all of them (2.6 GB) long after the VMs were gone —
 * a full benchmark run went out of memory at 24 GB that way. Threads that take guest memories for
 * a while (page hashing, post-copy fault serving) call {@link collectSoon} when they let one go:
 * a full collection follows once the thread has been idle for a moment.
 *
 * Node gives no collection call without --expose-gc, which a worker cannot be started with; the
 * flag is set at run time and `gc` taken from a new context, as Jest's leak detector does. Where
 * that fails the thread just collects when V8 decides, as before.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

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

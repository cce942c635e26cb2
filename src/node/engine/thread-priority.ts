/**
 * Scheduling for threads whose work is latency, not throughput: the post-copy fault threads (and
 * the bench's floor under them).
 */
import { execFileSync } from 'node:child_process';
import { readlinkSync } from 'node:fs';
import { LATENCY_SLICE_US, setFairScheduling } from '../fair-scheduling.js';

/**
 * How a fault thread is scheduled. A waiting vCPU is the most urgent work on either host, and a
 * fault thread mostly sleeps, so what matters is how soon it runs when a request or a page comes.
 * - `nice` (hosts' default): nice {@link FAULT_THREAD_NICE}, which weighs the thread's share of
 *   the CPU, and the kernel's shortest time slice where it has slices of its own (Linux ≥ 6.12),
 *   so that a woken fault thread preempts the thread on its core (src/node/fair-scheduling.ts);
 *   the scheduler still places it where it was woken from.
 * - `realtime`: SCHED_FIFO at {@link FAULT_THREAD_RT_PRIORITY}: it runs as soon as it wakes, ahead
 *   of every ordinary thread. Measured here (Linux 6.18, EEVDF, two cores), it is what an
 *   experiment on fault latency wants and not what a service wants:
 *   - with both hosts' main threads busy pushing and applying pages, the fault threads' round-trip
 *     p99 was 0.5-0.9 ms against 1.0-3.5 ms at nice -10; the vCPU's own p99 wait was 2.4 against
 *     3.5-4.9 ms in three interleaved runs, and no better in two later ones (3.1-4.1 against
 *     2.4-4.1 ms): the bench's post-copy part measures both settings side by side;
 *   - but a woken real-time thread is not placed beside its waker: it preempts the threads that
 *     push pages, on its own core, so the push ran slower, a kv guest took twice the faults, and
 *     its client's longest stall in post-copy was ~30 % longer (mean 198 against 148 ms over
 *     nine migrations, hosts in two processes; 181-230 against 129-176 ms in `ferry demo`).
 *   The kernel's real-time throttling (95 % of each second by default) still bounds a thread that
 *   would not sleep.
 * - `default`: as any thread.
 * A thread asks for what the host was told, and takes the next one down where it is refused
 * (both raised policies need CAP_SYS_NICE, which root has; `realtime` also needs Linux and
 * util-linux's `chrt`). Hosts report what their threads got.
 */
export type FaultThreadPriority = 'realtime' | 'nice' | 'default';

export const FAULT_THREAD_PRIORITIES: readonly FaultThreadPriority[] = ['realtime', 'nice', 'default'];

/** The SCHED_FIFO priority of a `realtime` fault thread (1-99; low: above every ordinary thread, below the kernel's own). */
export const FAULT_THREAD_RT_PRIORITY = 10;

/** The nice value of a `nice` fault thread. */
export const FAULT_THREAD_NICE = -10;

/**
 * The nice value an arriving VM's vCPU thread takes while it runs with pages missing, unless the
 * host says otherwise (see VmInit.faultNice): 0, its own. Measured here, nice -10 paid off only
 * with real-time fault threads, and not in every run (the vCPU's p99 wait 1.5-2.9 ms against
 * 3.8-5.1 ms in interleaved runs, 3.1-4.1 ms in later ones); with the default threads their own
 * round trip's tail dominates (p99 3.4-5.6 ms either way) and the guest's extra CPU made
 * post-copy up to 50 % longer.
 */
export const POSTCOPY_VCPU_NICE = 0;

/** The vCPU's nice value that goes with real-time fault threads (see POSTCOPY_VCPU_NICE). */
export const REALTIME_VCPU_NICE = -10;

/** Sets the calling thread's scheduling to `ask`, or the next policy down that it is allowed; returns what it got. */
export function raisePriority(ask: FaultThreadPriority): FaultThreadPriority {
  if (ask === 'realtime') {
    try {
      // The thread's own id (/proc/thread-self), so that only this thread changes, not the process.
      const tid = readlinkSync('/proc/thread-self').split('/').pop()!;
      if (!/^\d+$/.test(tid)) throw new Error(`no thread id in /proc/thread-self (${tid})`);
      execFileSync('chrt', ['--fifo', '--pid', String(FAULT_THREAD_RT_PRIORITY), tid], { stdio: 'ignore', timeout: 5000 });
      return 'realtime';
    } catch {
      // Not Linux, no chrt, or not permitted: a raised nice value is the next best.
    }
  }
  if (ask !== 'default') {
    try {
      setFairScheduling(FAULT_THREAD_NICE, LATENCY_SLICE_US);
      return 'nice';
    } catch {
      // Not permitted.
    }
  }
  return 'default';
}

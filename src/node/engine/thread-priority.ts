/**
 * Scheduling for threads whose work is latency, not throughput: the post-copy fault threads (and
 * the bench's floor under them).
 */
import { execFileSync } from 'node:child_process';
import { readlinkSync } from 'node:fs';
import { setPriority } from 'node:os';

/**
 * How a fault thread is scheduled. A waiting vCPU is the most urgent work on either host, and a
 * fault thread mostly sleeps, so what matters is how soon it runs when a request or a page comes.
 * - `realtime`: SCHED_FIFO at {@link FAULT_THREAD_RT_PRIORITY}: it runs as soon as it wakes,
 *   ahead of every ordinary thread. Measured here with both hosts' main threads busy pushing and
 *   applying pages (Linux 6.18, EEVDF), fault p99 was 0.44-0.92 ms in six runs, against
 *   1.1-3.2 ms at nice -10. The kernel's real-time throttling (95 % of each second by default)
 *   still bounds a thread that would not sleep.
 * - `nice`: nice {@link FAULT_THREAD_NICE}, which only weighs the thread's share of the CPU.
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

/** The nice value an arriving VM's vCPU thread takes while it runs with pages missing, unless the host says otherwise (see VmInit.faultNice). */
export const POSTCOPY_VCPU_NICE = -10;

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
      setPriority(0, FAULT_THREAD_NICE);
      return 'nice';
    } catch {
      // Not permitted.
    }
  }
  return 'default';
}

/**
 * The calling thread's settings in the kernel's fair scheduler: its nice value and its time slice.
 *
 * Nice weighs a thread's share of the CPU. It does not by itself make a woken thread run at once:
 * under EEVDF (Linux ≥ 6.6) the thread on the core may finish its slice first (~1.5 ms on two
 * cores). Since Linux 6.12 a thread may ask for a shorter slice of its own (sched_setattr's
 * `sched_runtime` for SCHED_OTHER, 0.1-100 ms); a woken thread with a shorter slice than the
 * running one preempts it (the scheduler's PREEMPT_SHORT). That is the kernel's mechanism for a
 * thread that sleeps most of the time and must run the moment its wait ends: a vCPU waiting for a
 * page, a fault thread. Measured here (4 KiB exchanges between two processes' threads while their
 * main threads moved a bulk stream): loaded p99 0.7-2.5 ms at nice -10 alone, 0.7-1.5 ms at nice
 * -10 with a 100 µs slice, in interleaved runs.
 *
 * Where the kernel has no such slices, or the call is not there (not Linux, no koffi binary), the
 * slice is left out and only the nice value is set.
 */
import { getPriority, setPriority } from 'node:os';
import { FerryError } from '../core/errors.js';
import { libc } from './libc.js';

/** The slice latency-bound threads ask for: the kernel's shortest. */
export const LATENCY_SLICE_US = 100;

/** The kernel refused a thread's scheduling change (raising priority needs CAP_SYS_NICE). */
export class SchedulingError extends FerryError {
  constructor(message: string) {
    super('ERR_SCHEDULING', message);
  }
}

const SYS: Partial<Record<string, { setattr: number; getattr: number }>> = {
  x64: { setattr: 314, getattr: 315 },
  arm64: { setattr: 274, getattr: 275 },
};
/** sched_attr, version 0: size, policy, flags, nice, priority, runtime, deadline, period. */
const ATTR_BYTES = 48;
const SCHED_OTHER = 0;
/** This thread's sched_attr (module state is per thread): a vCPU sets it twice per quantum with faults. */
const attr = new Uint8Array(ATTR_BYTES);
const view = new DataView(attr.buffer);

/** sched_setattr/sched_getattr here, or null (not Linux, an architecture not listed, no libc calls). */
function calls(): { setattr: number; getattr: number } | null {
  const sys = SYS[process.arch];
  if (!sys) return null;
  try {
    libc();
    return sys;
  } catch {
    return null;
  }
}

/**
 * Sets the calling thread's nice value and slice (µs; 0: the kernel's default). Where
 * sched_setattr is missing or refuses, only the nice value is set. Throws SchedulingError when the
 * nice value is refused.
 */
export function setFairScheduling(nice: number, sliceUs: number): void {
  const sys = calls();
  if (sys) {
    attr.fill(0);
    view.setUint32(0, ATTR_BYTES, true);
    view.setUint32(4, SCHED_OTHER, true);
    view.setInt32(16, nice, true);
    view.setBigUint64(24, BigInt(Math.round(sliceUs * 1000)), true);
    if (libc().syscallPtr(sys.setattr, 0, attr, 0, 0) === 0) return;
    // Refused (an older kernel's view of the attributes, a seccomp filter that allows setpriority
    // but not sched_setattr, or a nice value not permitted): the nice value alone, which fails in
    // turn where it is the nice value that is not permitted.
  }
  try {
    setPriority(0, nice);
  } catch (e) {
    throw new SchedulingError(`not permitted to set nice ${nice}: ${(e as Error).message}`);
  }
}

/** The calling thread's nice value and slice (µs) as the kernel reports them (slice 0 where it reports none). */
export function fairScheduling(): { nice: number; sliceUs: number } {
  const sys = calls();
  if (sys) {
    if (libc().syscallPtr(sys.getattr, 0, attr, ATTR_BYTES, 0) === 0) {
      return { nice: view.getInt32(16, true), sliceUs: Number(view.getBigUint64(24, true)) / 1000 };
    }
  }
  return { nice: getPriority(0), sliceUs: 0 };
}

/**
 * The control block shared by a VM's host side and its vCPU worker: a small SharedArrayBuffer of
 * Int32 words. Commands flow host → worker through CMD and the DOORBELL (bumped on every message,
 * so a worker blocked in Atomics.wait wakes up); state and counters flow back. Every transition
 * uses Atomics, which also orders the guest's plain stores before them (the dirty-log harvester
 * relies on that: see dirty-log.ts).
 */
import { SHARED_HISTOGRAM_WORDS } from '../../core/metrics.js';

export const enum Ctl {
  /** Host's wish: CmdRun / CmdPause / CmdStop. */
  CMD = 0,
  /** Worker's state: one of VmRunState. */
  STATE = 1,
  /** Quanta completed (incremented after every quantum and at every pause). */
  EPOCH = 2,
  /** Bumped by the host whenever it posts a message or changes CMD. */
  DOORBELL = 3,
  /** vCPU throttle, in thousandths of each period spent asleep (0–990). */
  THROTTLE = 4,
  /** Requested variant: VariantId. */
  VARIANT_REQ = 5,
  /** Variant the vCPU is running now. */
  VARIANT_CUR = 6,
  /** When > 0: the worker pauses itself after this many more quanta (deterministic runs). */
  QUANTA_LEFT = 7,
  /** Post-copy faults: the vCPU writes the physical page here, then bumps FAULT_REQ. */
  FAULT_PAGE = 8,
  FAULT_REQ = 9,
  /** Bumped by whoever installs pages on a post-copy destination; faulting vCPUs wait on it. */
  FAULT_DONE = 10,
  /** Fixed budget per quantum (0 = adaptive). */
  FIXED_BUDGET = 11,
  WORDS = 16,
}

export const enum Cmd { RUN = 0, PAUSE = 1, STOP = 2 }

export const enum VmRunState { BOOTING = 0, RUNNING = 1, PAUSED = 2, STOPPED = 3, HALTED = 4, TRAPPED = 5 }

export const VARIANTS = ['plain', 'dirty', 'presence'] as const;
export type VariantName = (typeof VARIANTS)[number];
export const variantId = (v: VariantName): number => VARIANTS.indexOf(v);

/** Float64 statistics the worker publishes (a second SharedArrayBuffer). */
export const enum Stat {
  QUANTA = 0,
  /** Wall time spent inside run(), ns. */
  RUN_NS = 1,
  /** Guest-reported cumulative progress (progress() export). */
  PROGRESS = 2,
  BUDGET = 3,
  LAST_QUANTUM_NS = 4,
  /**
   * At the last pause: how long the guest had been stopped before the vCPU thread said PAUSED
   * (it exports the state first when asked to: Vm.pauseWithState), ns.
   */
  STOPPED_BEFORE_PAUSED_NS = 5,
  /**
   * From here, SHARED_HISTOGRAM_WORDS words: each post-copy fault's wait as the vCPU saw it, ms
   * (from its notice to the fault service to running on; see Histogram.recordShared). Its count
   * and sum are the faults and their total wait.
   */
  FAULT_WAITS = 6,
  /** The nice value the vCPU thread runs at now (see VmInit.faultNice). */
  VCPU_NICE = 6 + 964,
  WORDS = 6 + 964 + 1,
}

// The layout leaves room for the fault-wait histogram (Stat is a const enum: its sizes are literals).
if (Stat.VCPU_NICE - Stat.FAULT_WAITS !== SHARED_HISTOGRAM_WORDS) throw new Error(`Stat leaves ${Stat.VCPU_NICE - Stat.FAULT_WAITS} words for a ${SHARED_HISTOGRAM_WORDS}-word histogram`);

/** The fault-wait histogram inside a VM's statistics (see Stat.FAULT_WAITS). */
export function faultWaitsOf(stats: Float64Array): Float64Array {
  return stats.subarray(Stat.FAULT_WAITS, Stat.FAULT_WAITS + SHARED_HISTOGRAM_WORDS);
}

export function stateName(s: number): string {
  return ['booting', 'running', 'paused', 'stopped', 'halted', 'trapped'][s] ?? `unknown(${s})`;
}

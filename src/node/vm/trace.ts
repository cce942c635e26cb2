/**
 * Dirty-trace recording: the page-level write pattern of a real ferry VM over time, for the
 * simulator to replay (docs/trace-format.md). The recorder turns the VM's dirty log on, harvests it
 * every interval (get-and-clear, the same operation pre-copy uses) and appends one run-length or raw
 * record per interval — so its cost to the guest is the dirty-logging variant plus one harvest per
 * interval, and the file stays small for sparse writers.
 *
 * The dirty log has one consumer: do not record a VM that is being migrated (both would harvest,
 * and each would see only part of the writes).
 */
import { open, type FileHandle } from 'node:fs/promises';
import type { Bitmap } from '../../core/bitmap.js';
import { AbortError } from '../../core/errors.js';
import { PAGE_SIZE } from '../../core/pages.js';
import { encodeTraceHeader, encodeTraceRecord, type TraceHeader } from '../../core/sim/trace-format.js';

/** What the recorder needs from a VM (src/node/vm/vm.ts `Vm` has it). */
export interface TraceSource {
  readonly name: string;
  readonly memoryBytes: number;
  readonly maxPages: number;
  readonly guestPages: number;
  readonly config?: string;
  startDirtyLog(): Promise<void>;
  harvestDirty(into?: Bitmap): Promise<Bitmap>;
  stopDirtyLog(): Promise<void>;
}

export interface TraceRecordOptions {
  /** File to write (created or truncated). */
  out: string;
  /** Harvest interval, ms. Default 100. */
  intervalMs?: number;
  /** Stop after this long, ms. Default: until `signal` aborts. */
  durationMs?: number;
  signal?: AbortSignal;
  /** Recorded in the header. */
  guest?: string;
  /** Called after each record. */
  onInterval?: (i: { index: number; startMs: number; endMs: number; dirtyPages: number; bytes: number }) => void;
  /** Monotonic ms clock. Default performance.now. */
  now?: () => number;
}

export interface TraceSummary {
  file: string;
  intervals: number;
  durationMs: number;
  /** Bytes written, header included. */
  bytes: number;
  /** Distinct dirty pages summed over intervals. */
  dirtyPages: number;
  /** Mean time a harvest took, ms (the recorder's cost). */
  meanHarvestMs: number;
}

const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setTimeout(done, Math.max(0, ms));
    function done() {
      signal?.removeEventListener('abort', done);
      clearTimeout(t);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });

/**
 * Records `vm`'s dirty pages every `intervalMs` into `out` until `durationMs` passes or `signal`
 * aborts (an abort ends the trace cleanly; it is not an error once recording started).
 */
export async function recordTrace(vm: TraceSource, options: TraceRecordOptions): Promise<TraceSummary> {
  if (options.signal?.aborted) throw new AbortError('trace recording aborted before it started');
  const now = options.now ?? (() => performance.now());
  const interval = options.intervalMs ?? 100;
  const header: TraceHeader = {
    version: 1, vm: vm.name, guest: options.guest, config: vm.config, pageSize: PAGE_SIZE, pageCount: vm.maxPages,
    memoryBytes: vm.memoryBytes, intervalMs: interval, startedAt: new Date().toISOString(),
  };
  let fh: FileHandle | null = null;
  let bytes = 0;
  let dirtyPages = 0;
  let harvestMs = 0;
  let n = 0;
  let t0 = 0;
  let last = 0;
  try {
    fh = await open(options.out, 'w');
    const h = encodeTraceHeader(header);
    await fh.write(h);
    bytes += h.length;
    await vm.startDirtyLog();
    t0 = now();
    last = t0;
    const end = options.durationMs === undefined ? Number.POSITIVE_INFINITY : t0 + options.durationMs;
    for (;;) {
      const target = Math.min(end, t0 + (n + 1) * interval);
      await sleep(target - now(), options.signal);
      const h0 = now();
      const dirty = await vm.harvestDirty();
      const t = now();
      harvestMs += t - h0;
      const rec = encodeTraceRecord({ startMs: last - t0, endMs: t - t0, guestPages: vm.guestPages, dirty });
      await fh.write(rec);
      bytes += rec.length;
      const c = dirty.count();
      dirtyPages += c;
      options.onInterval?.({ index: n, startMs: last - t0, endMs: t - t0, dirtyPages: c, bytes: rec.length });
      last = t;
      n++;
      if (t >= end || options.signal?.aborted) break;
    }
  } finally {
    await vm.stopDirtyLog().catch(() => undefined);
    await fh?.close();
  }
  return { file: options.out, intervals: n, durationMs: last - t0, bytes, dirtyPages, meanHarvestMs: n ? harvestMs / n : 0 };
}

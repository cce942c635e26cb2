/**
 * The benchmark harness every `bench/*.bench.ts` uses.
 *
 * A suite measures figures side by side in one run (a baseline and the thing under test, interleaved
 * where it matters) and reports each as one result line. Targets are checked and printed, never
 * asserted: speed belongs here, not in the tests.
 */

export interface BenchResult {
  /** Metric name within the suite, e.g. `memstress-random.overhead`. */
  metric: string;
  value: number;
  unit: string;
  /** A target such as `<= 1.15` or `>= 0.9`; omitted when the figure is informational. */
  target?: string;
  /** Free-form context printed after the figure (sizes, run counts). */
  note?: string;
}

export interface BenchContext {
  report(result: BenchResult): void;
  /** True when a quick pass was asked for (`--quick`): suites shrink sizes and repetitions. */
  quick: boolean;
  log(message: string): void;
}

export interface BenchSuite {
  name: string;
  description: string;
  run(ctx: BenchContext): Promise<void>;
}

/** Checks `value` against a target like `<= 1.15`, `< 2`, `>= 0.9`. Returns undefined without a target. */
export function meetsTarget(value: number, target: string | undefined): boolean | undefined {
  if (!target) return undefined;
  const m = /^\s*(<=|>=|<|>)\s*(-?\d+(?:\.\d+)?)\s*$/.exec(target);
  if (!m) return undefined;
  const t = Number(m[2]);
  switch (m[1]) {
    case '<=': return value <= t;
    case '>=': return value >= t;
    case '<': return value < t;
    default: return value > t;
  }
}

/**
 * Lets both processes go quiet before a measurement: after a migration the destination zeroes the
 * memory the VM gave back and starts its next spare vCPU thread, the source frees its VM, and a
 * new source VM fills its memory. Measured in that wake, raw TCP ran at half speed (0.72 against
 * 1.5 GB/s), which flattered every ratio against it; and a migration with 2 data streams right
 * after another took a median of 81 ms against 67 ms with 1 stream, where after a pause it took
 * 61 against 71 ms (128 MiB idle, 5 runs each, interleaved).
 */
export function settle(ms = 600): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** `xs` begun at index `k` (mod its length): the order of an interleaved comparison's round `k`, so no entry always comes first or right after the same other. */
export function rotated<T>(xs: readonly T[], k: number): T[] {
  return xs.map((_, i) => xs[(i + k) % xs.length]);
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  if (n === 0) return NaN;
  return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

export function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const idx = Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1));
  return s[idx];
}

/** One failing part (an engine error) is logged and the others still run. */
export async function section(ctx: BenchContext, name: string, fn: () => Promise<void>): Promise<void> {
  const t0 = performance.now();
  try {
    await fn();
  } catch (e) {
    ctx.log(`${name} failed: ${(e as Error).stack ?? String(e)}`);
  }
  ctx.log(`${name}: ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}

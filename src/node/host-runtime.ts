/**
 * The V8 heap settings of a process that hosts VMs (`ferry host start`, `ferry demo`, the
 * benchmarks' hosts), and a way to re-run a script under them.
 *
 * Why: a host receiving a migration moves hundreds of MB/s through one event loop. With V8's
 * defaults its young generation grew to 16 MB, and V8 starts marking the old generation whenever
 * the room left under the old generation's limit is less than the young generation's size; with
 * a small old generation (35 MB here) that room was never more than that, so a destination ran a
 * mark-compact every 25-50 ms, 6-12 per 256 MiB received, their concurrent marking taking
 * 100-180 ms of CPU from the two processes' main threads (measured on this machine kind with
 * `--trace-gc --trace-incremental-marking`). A small young generation and an old generation whose
 * first limit is not tiny keep it to scavenges: 0-1 mark-compacts per 256 MiB, and the round
 * times of idle pre-copy stop drifting upwards from one migration to the next.
 */
import { spawn } from 'node:child_process';
import { constants } from 'node:os';

/** Node options of a host process. */
export const HOST_NODE_FLAGS: readonly string[] = ['--max-semi-space-size=2', '--initial-old-space-size=96'];

/** Set in the environment of a process re-run with HOST_NODE_FLAGS (so it is done once). */
const RELAUNCHED = 'FERRY_HOST_RUNTIME';

/** Whether this process runs with the host's heap settings (its own or ones given on the command line). */
export function hasHostFlags(execArgv: readonly string[] = process.execArgv): boolean {
  const names = (args: readonly string[]) => new Set(args.map((a) => a.split('=')[0].replace(/_/g, '-')));
  const have = names(execArgv);
  return [...names(HOST_NODE_FLAGS)].every((n) => have.has(n));
}

/**
 * Runs this script again under HOST_NODE_FLAGS, unless it already has them or FERRY_HOST_RUNTIME
 * is set (the new process has it; `FERRY_HOST_RUNTIME=0` runs with node's defaults). Resolves
 * with the exit code to leave with (signals it receives are passed on to the new process), or
 * null when this process should go on itself.
 */
export function relaunchWithHostFlags(): Promise<number> | null {
  if (hasHostFlags() || process.env[RELAUNCHED] !== undefined) return null;
  const child = spawn(process.execPath, [...HOST_NODE_FLAGS, ...process.execArgv, ...process.argv.slice(1)], {
    stdio: 'inherit',
    env: { ...process.env, [RELAUNCHED]: '1' },
  });
  const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
  const forward = (s: NodeJS.Signals) => { child.kill(s); };
  for (const s of signals) process.on(s, forward);
  return new Promise((resolve) => {
    child.on('error', (e) => {
      console.error(`ferry: could not start node with ${HOST_NODE_FLAGS.join(' ')}: ${e.message}`);
      resolve(1);
    });
    child.on('exit', (code, signal) => {
      for (const s of signals) process.off(s, forward);
      // Killed by a signal: the shell's convention, 128 + its number.
      resolve(code ?? 128 + (signal ? constants.signals[signal] : 0));
    });
  });
}

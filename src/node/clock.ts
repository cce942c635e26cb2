/**
 * The real {@link Clock} for the node edge: `performance.now()` and `setTimeout`. Node's timers
 * count whole milliseconds of loop time, so a timer can fire a little before `performance.now()`
 * says it should; `sleep` re-arms for the remainder, keeping the contract's "at least `ms`". Timers
 * also fire up to a millisecond or so late; code that paces itself on a clock (the token bucket)
 * absorbs that lateness in its burst allowance.
 */
import { AbortError } from '../core/errors.js';
import type { Clock } from '../core/clock.js';

export function realClock(): Clock {
  return {
    now: () => performance.now(),
    sleep(ms: number, signal?: AbortSignal): Promise<void> {
      if (signal?.aborted) return Promise.reject(new AbortError('sleep aborted', { cause: signal.reason }));
      const deadline = performance.now() + Math.max(0, ms);
      return new Promise<void>((resolve, reject) => {
        let timer: ReturnType<typeof setTimeout>;
        const onAbort = () => {
          clearTimeout(timer);
          reject(new AbortError('sleep aborted', { cause: signal?.reason }));
        };
        const arm = () => {
          const left = deadline - performance.now();
          if (left <= 0) {
            signal?.removeEventListener('abort', onAbort);
            resolve();
            return;
          }
          timer = setTimeout(arm, Math.ceil(left));
        };
        signal?.addEventListener('abort', onAbort, { once: true });
        arm();
      });
    },
  };
}

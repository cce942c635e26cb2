/**
 * Why a migration left pre-copy, in words, for reports and the CLI. The codes are the policies'
 * (PrecopyStopReason, HybridReason) and the engine's 'postcopy' (post-copy from the start); the
 * text says what the code only names — chiefly whether pre-copy converged, since a pre-copy that
 * did not ends with a stop-and-copy longer than its downtime budget.
 */
const TEXT: Record<string, (mode: string) => string> = {
  converged: () => 'pre-copy converged: the pages still dirty fit the downtime budget',
  'round-limit': (mode) => `pre-copy reached its round limit without converging; ${leaving(mode)}`,
  'sent-too-much': (mode) => `pre-copy had sent its limit (a multiple of the memory in use) without converging; ${leaving(mode)}`,
  'not-converging': (mode) => `the pages dirtied in each round stopped shrinking; ${leaving(mode)}`,
  'round-bound': () => 'hybrid ran its bounded pre-copy rounds without converging, then switched to post-copy',
  'dirty-rate': () => 'the guest dirtied memory about as fast as the link sends it; hybrid switched to post-copy',
  postcopy: () => 'post-copy from the start',
};

function leaving(mode: string): string {
  return mode === 'hybrid' ? 'hybrid switched to post-copy' : 'the stop-and-copy sent everything still dirty, beyond what the downtime budget allows';
}

/** `reason` (a policy's code) in words, the code after it: "… (sent-too-much)". Unknown codes come back as they are. */
export function describeStopReason(reason: string, mode: string): string {
  const text = TEXT[reason];
  return text ? `${text(mode)} (${reason})` : reason;
}

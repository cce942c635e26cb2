/**
 * Ends the test process explicitly once its tests are done. Node 20 sometimes spins forever in its
 * exit-time handle cleanup (Environment::CleanupHandles) after a file that opened and closed many
 * sockets and worker threads — observed in about one run in four of migrate-agent.test, with every
 * test passed and no libuv handle or request left alive (gdb). Leaving through process.exit skips
 * that cleanup; the half second lets the runner's report of the file go out first.
 */
import { after } from 'node:test';

export function leaveWhenDone(): void {
  after(() => {
    setTimeout(() => process.exit(), 500);
  });
}

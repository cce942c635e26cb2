import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/**
 * Runs `script` (an ES module's text) in a new node process, from a file: run with
 * `--input-type=module -e`, node passes those options on to the process's worker threads, whose
 * own module files then fail to load ("--input-type can only be used with string input"), so a
 * test of threads would quietly test their failure instead.
 */
export function runModuleScript(script: string, timeoutMs = 20_000): SpawnSyncReturns<string> {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-script-'));
  try {
    const file = join(dir, 'script.mjs');
    writeFileSync(file, script);
    return spawnSync(process.execPath, [file], { encoding: 'utf8', timeout: timeoutMs });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

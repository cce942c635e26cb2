import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseScenario, runScenario, scenarioCharts, type SweepPoint } from '../../src/core/sim/index.js';
import { packageRoot } from '../../src/node/paths.js';
import { resultsJson } from '../../src/node/sim/run.js';

const dir = join(packageRoot(), 'experiments');
const scenario = parseScenario(readFileSync(join(dir, 'survey-claims.yaml'), 'utf8'), 'survey-claims.yaml');
const result = runScenario(scenario);

/** lo ≤ x ≤ hi with a relative tolerance. */
function between(x: number, a: number, b: number, tol = 0.01): boolean {
  const lo = Math.min(a, b);
  const hi = Math.max(a, b);
  return x >= lo * (1 - tol) - 1e-9 && x <= hi * (1 + tol) + 1e-9;
}

function points(workload: string): Record<'precopy' | 'postcopy' | 'hybrid', SweepPoint> {
  const sw = result.sweeps.find((s) => s.name === 'claims')!;
  const get = (t: string) => sw.points.find((p) => p.workload === workload && p.technique === t)!;
  return { precopy: get('precopy'), postcopy: get('postcopy'), hybrid: get('hybrid') };
}

test('check 3a (survey): pre-copy is the better technique for a read-intensive workload', () => {
  const { precopy, postcopy } = points('read-intensive');
  // Pre-copy converges quickly within the downtime budget and leaves the application almost untouched;
  // post-copy stalls the guest on network faults for every first read of a page.
  assert.equal(precopy.stopReason, 'converged');
  assert.ok(precopy.downtimeMs <= 300);
  assert.ok(precopy.degradationRatio! > 0.95, `pre-copy keeps ${precopy.degradationRatio} of the work rate`);
  assert.ok(precopy.degradationRatio! > postcopy.degradationRatio! + 0.2, `pre-copy ${precopy.degradationRatio} vs post-copy ${postcopy.degradationRatio}`);
  assert.equal(precopy.faults, 0);
  assert.ok(postcopy.faults > 100);
  // …at about the same cost in time and data (few pages are re-sent).
  assert.ok(precopy.wireBytes <= postcopy.wireBytes * 1.05);
  assert.ok(precopy.totalMigrationTimeMs <= postcopy.totalMigrationTimeMs * 1.05);
});

test('check 3b (survey): post-copy is the better technique for a write-intensive workload', () => {
  const { precopy, postcopy } = points('write-intensive');
  // Pre-copy re-sends pages that keep being dirtied and does not converge: it stops on a safety cap
  // and pays a long stop-and-copy.
  assert.notEqual(precopy.stopReason, 'converged');
  assert.ok(postcopy.totalMigrationTimeMs < precopy.totalMigrationTimeMs / 2, `TMT post ${postcopy.totalMigrationTimeMs} vs pre ${precopy.totalMigrationTimeMs}`);
  assert.ok(postcopy.wireBytes < precopy.wireBytes / 2, `bytes post ${postcopy.wireBytes} vs pre ${precopy.wireBytes}`);
  assert.ok(postcopy.downtimeMs < precopy.downtimeMs / 10, `downtime post ${postcopy.downtimeMs} vs pre ${precopy.downtimeMs}`);
  assert.ok(precopy.downtimeMs > 300, 'pre-copy misses the downtime budget');
});

test('check 3c (survey): hybrid lies between pre-copy and post-copy', () => {
  for (const w of ['read-intensive', 'write-intensive']) {
    const { precopy, postcopy, hybrid } = points(w);
    for (const k of ['totalMigrationTimeMs', 'downtimeMs', 'wireBytes', 'degradationRatio'] as const) {
      assert.ok(between(hybrid[k]!, precopy[k]!, postcopy[k]!), `${w} ${k}: hybrid ${hybrid[k]} not between pre-copy ${precopy[k]} and post-copy ${postcopy[k]}`);
    }
  }
  // Strictly between on the write-intensive workload, where the techniques differ most.
  const { precopy, postcopy, hybrid } = points('write-intensive');
  assert.ok(hybrid.totalMigrationTimeMs < precopy.totalMigrationTimeMs && hybrid.totalMigrationTimeMs > postcopy.totalMigrationTimeMs);
  assert.ok(hybrid.wireBytes < precopy.wireBytes && hybrid.wireBytes > postcopy.wireBytes);
});

test('pre-copy cost grows with the dirty rate and shrinks with bandwidth; post-copy is flat in the dirty rate', () => {
  const byRate = result.sweeps.find((s) => s.name === 'by-dirty-rate')!.points;
  const pre = byRate.filter((p) => p.technique === 'precopy').sort((a, b) => a.dirtyRateBytesPerSec! - b.dirtyRateBytesPerSec!);
  for (let i = 1; i < pre.length; i++) assert.ok(pre[i].wireBytes >= pre[i - 1].wireBytes, 'pre-copy bytes grow with the dirty rate');
  const post = byRate.filter((p) => p.technique === 'postcopy');
  assert.ok(Math.max(...post.map((p) => p.wireBytes)) === Math.min(...post.map((p) => p.wireBytes)));
  const byBw = result.sweeps.find((s) => s.name === 'by-bandwidth')!.points.filter((p) => p.technique === 'precopy').sort((a, b) => a.bandwidthBytesPerSec - b.bandwidthBytesPerSec);
  for (let i = 1; i < byBw.length; i++) assert.ok(byBw[i].totalMigrationTimeMs < byBw[i - 1].totalMigrationTimeMs);
});

test('the shipped charts and results are what the scenario produces (regenerate with ferry sim run … --svg-dir experiments/survey-claims)', () => {
  for (const c of scenarioCharts(result)) {
    const shipped = readFileSync(join(dir, 'survey-claims', c.file), 'utf8');
    assert.equal(shipped, c.svg, `${c.file} is stale`);
  }
  const shipped = JSON.parse(readFileSync(join(dir, 'survey-claims', 'results.json'), 'utf8')) as unknown;
  assert.deepEqual(shipped, JSON.parse(resultsJson(result)));
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { VirtualClock } from '../../src/core/clock.js';
import { PrecopyStopPolicy } from '../../src/core/policy/precopy.js';
import { constantDirty, precopyClosedForm, precopyRounds } from '../../src/core/models.js';
import { MigrationReportBuilder } from '../../src/core/metrics.js';

/**
 * A miniature constant-rate world on the virtual clock: each round is an event at the time the
 * previous one finished; the guest dirties d bytes/s of fresh pages; the engine's stop policy
 * decides. Its report must match the closed-form model to floating-point precision.
 */
function simulate(memoryBytes: number, bw: number, d: number) {
  const clock = new VirtualClock();
  const policy = new PrecopyStopPolicy();
  const report = new MigrationReportBuilder({ technique: 'precopy', memoryBytes });
  let toSend = memoryBytes;
  let sentTotal = 0;
  let round = 0;
  report.add({ type: 'start', t: clock.now() });
  const startRound = () => {
    const started = clock.now();
    report.add({ type: 'round-start', t: started, round });
    const bytes = toSend;
    clock.after((bytes / bw) * 1000, () => {
      const elapsed = clock.now() - started;
      sentTotal += bytes;
      report.add({ type: 'pages', t: clock.now(), kind: round === 0 ? 'first' : 'resent', pages: bytes / 4096, bytes });
      const dirty = (d * elapsed) / 1000;
      report.add({ type: 'round-end', t: clock.now(), round, dirtyPages: dirty / 4096 });
      const decision = policy.decide({
        round, pagesSentRound: bytes / 4096, pagesSentTotal: sentTotal / 4096, bytesSentTotal: sentTotal, memoryBytes,
        dirtyPages: dirty / 4096, bandwidthBytesPerSec: bw, dirtyRateBytesPerSec: d,
      });
      toSend = dirty;
      round++;
      if (!decision.stop) return startRound();
      report.add({ type: 'paused', t: clock.now() });
      clock.after((toSend / bw) * 1000, () => {
        report.add({ type: 'pages', t: clock.now(), kind: 'resent', pages: toSend / 4096, bytes: toSend });
        report.add({ type: 'resumed', t: clock.now() });
        report.add({ type: 'complete', t: clock.now() });
      });
    });
  };
  startRound();
  clock.runAll();
  return report.build();
}

test('a constant-rate simulation on the virtual clock reproduces eq. (2)–(6)', () => {
  for (const [mem, bw, d] of [[1e9, 1e8, 2.5e7], [2 * 1024 ** 3, 125e6, 40e6], [512 * 1024 ** 2, 1e9 / 8, 3e6]]) {
    const r = simulate(mem, bw, d);
    const model = precopyRounds(mem, bw, constantDirty(d));
    const n = model.rounds.length - 1;
    const closed = precopyClosedForm({ memoryBytes: mem, bandwidthBytesPerSec: bw, dirtyRateBytesPerSec: d }, n);
    const rel = (a: number | null, b: number) => Math.abs((a ?? NaN) - b) / b;
    assert.equal(r.rounds.length, n + 1);
    assert.ok(rel(r.downtimeMs, closed.downtimeMs) < 1e-12, `downtime ${r.downtimeMs} vs ${closed.downtimeMs}`);
    assert.ok(rel(r.totalMigrationTimeMs, closed.totalTimeMs) < 1e-12, `TMT ${r.totalMigrationTimeMs} vs ${closed.totalTimeMs}`);
    assert.ok(rel(r.bytes.total, closed.totalBytes) < 1e-12, `bytes ${r.bytes.total} vs ${closed.totalBytes}`);
    assert.ok(rel(r.preparationTimeMs, closed.liveTimeMs) < 1e-12);
    assert.ok(r.downtimeMs! <= 300);
  }
});

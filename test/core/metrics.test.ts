import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Histogram, MigrationReportBuilder, SHARED_HISTOGRAM_WORDS, formatReportTable, reportToJson } from '../../src/core/metrics.js';
import { InvalidArgumentError } from '../../src/core/errors.js';

test('histogram percentiles of 1..1000 are within the bucket growth of the true values', () => {
  const h = new Histogram({ growth: 1.02 });
  for (let v = 1; v <= 1000; v++) h.record(v);
  assert.equal(h.count, 1000);
  assert.equal(h.mean, 500.5);
  assert.ok(h.p50 >= 500 && h.p50 <= 500 * 1.02, `p50 ${h.p50}`);
  assert.ok(h.p99 >= 990 && h.p99 <= 990 * 1.02, `p99 ${h.p99}`);
  assert.equal(h.quantile(1), 1000);
  assert.equal(h.quantile(0), 1);
});

test('histogram: skewed latencies, exact single values, zeros, merge', () => {
  const h = new Histogram();
  for (let i = 0; i < 980; i++) h.record(0.2);
  for (let i = 0; i < 20; i++) h.record(50);
  assert.equal(h.p50, 0.2);
  assert.equal(h.p99, 50);
  assert.equal(h.quantile(0.98), 0.2);
  const z = new Histogram();
  z.record(0, 3);
  assert.equal(z.p99, 0);
  const a = new Histogram();
  a.record(10);
  a.merge(h);
  assert.equal(a.count, 1001);
  assert.equal(a.maxValue, 50);
  assert.ok(Number.isNaN(new Histogram().p50));
  assert.throws(() => h.record(-1), InvalidArgumentError);
  assert.throws(() => a.merge(new Histogram({ growth: 2 })), InvalidArgumentError);
});

test('shared histogram: what one thread records into shared memory reads back as the same histogram; a bad value is skipped; huge ones fold into the last bucket', () => {
  const view = new Float64Array(new SharedArrayBuffer(SHARED_HISTOGRAM_WORDS * 8));
  assert.equal(Histogram.fromShared(view).count, 0);
  assert.ok(Number.isNaN(Histogram.fromShared(view).p50));
  const plain = new Histogram();
  const values = [0, 0.0004, 0.2, 0.21, 0.25, 0.25, 0.3, 1.7, 3.9, 12, 250];
  for (const v of values) {
    Histogram.recordShared(view, v);
    plain.record(v);
  }
  Histogram.recordShared(view, -1);
  Histogram.recordShared(view, Number.NaN);
  const copy = Histogram.fromShared(view);
  assert.deepEqual(copy.summary(), plain.summary());
  for (const q of [0, 0.1, 0.5, 0.9, 0.99, 1]) assert.equal(copy.quantile(q), plain.quantile(q), `q ${q}`);
  assert.equal(copy.minValue, 0);
  // The copy is a copy: recording on goes to the shared one only.
  Histogram.recordShared(view, 1e12);
  assert.equal(copy.count, values.length);
  const after = Histogram.fromShared(view);
  assert.equal(after.count, values.length + 1);
  assert.equal(after.maxValue, 1e12);
  assert.equal(after.quantile(1), 1e12);
});

test('pre-copy report: phases, rounds, pages by kind, dirty rate, degradation, client gap', () => {
  const b = new MigrationReportBuilder({ technique: 'precopy', memoryBytes: 100 * 4096 });
  b.add({ type: 'progress', t: -1000, work: 0 })
    .add({ type: 'progress', t: 0, work: 1000 })
    .add({ type: 'start', t: 0 })
    .add({ type: 'round-start', t: 10, round: 0 })
    .add({ type: 'pages', t: 50, kind: 'first', pages: 100, bytes: 409_600 })
    .add({ type: 'round-end', t: 110, round: 0, dirtyPages: 20 })
    .add({ type: 'round-start', t: 110, round: 1 })
    .add({ type: 'pages', t: 120, kind: 'resent', pages: 20, bytes: 81_920 })
    .add({ type: 'throttle', t: 120, fraction: 0.2 })
    .add({ type: 'round-end', t: 130, round: 1, dirtyPages: 2 })
    .add({ type: 'paused', t: 130 })
    .add({ type: 'pages', t: 131, kind: 'resent', pages: 2, bytes: 8192 })
    .add({ type: 'state', t: 131, bytes: 1000 })
    .add({ type: 'resumed', t: 135 })
    .add({ type: 'client-gap', t: 132, durationMs: 12 })
    .add({ type: 'client-gap', t: 5000, durationMs: 99 }) // after completion: ignored
    .add({ type: 'source-released', t: 140 })
    .add({ type: 'complete', t: 140 })
    .add({ type: 'progress', t: 140, work: 1070 })
    .add({ type: 'verified', t: 141, ok: true });
  const r = b.build();
  assert.equal(r.totalMigrationTimeMs, 140);
  assert.equal(r.preparationTimeMs, 130);
  assert.equal(r.downtimeMs, 5);
  assert.equal(r.resumeTimeMs, 5);
  assert.equal(r.evictionTimeMs, 140);
  assert.equal(r.clientDowntimeMs, 12);
  assert.deepEqual(r.pages, { firstPass: 100, resent: 22, pushed: 0, faulted: 0, total: 122 });
  assert.equal(r.bytes.total, 499_712);
  assert.equal(r.bytes.wire, 500_712);
  assert.equal(r.rounds.length, 2);
  assert.deepEqual(r.rounds[0], { round: 0, startMs: 10, durationMs: 100, pagesSent: 100, bytesSent: 409_600, dirtyPages: 20, dirtyRatePagesPerSec: 200 });
  assert.equal(r.rounds[1].pagesSent, 20, 'stop-and-copy pages are not charged to a round');
  assert.equal(r.rounds[1].dirtyRatePagesPerSec, 100);
  assert.ok(Math.abs(r.dirtyRate!.pagesPerSec - 22 / 0.12) < 1e-9);
  assert.equal(r.maxThrottle, 0.2);
  assert.deepEqual(r.degradation, { beforePerSec: 1000, duringPerSec: 500, ratio: 0.5 });
  assert.equal(r.verified, true);
  assert.equal(r.postcopy.faults, 0);
  assert.equal(r.downtimeParts, null, 'no switchover-sent event: no split');
  assert.equal(r.estimatedDowntimeMs, null, 'no stop decision: no estimate');
  assert.match(formatReportTable(r), /estimated downtime\s+—\n/);
  const est = (e: number) => new MigrationReportBuilder({ technique: 'precopy', memoryBytes: 4096 }).add({ type: 'stop-decision', t: 3, estimatedDowntimeMs: e, fixedDowntimeMs: 1.5 }).build();
  assert.deepEqual([est(4.5).estimatedDowntimeMs, est(4.5).fixedDowntimeMs], [4.5, 1.5]);
  assert.match(formatReportTable(est(4.5)), /estimated downtime\s+4\.50 ms \(the stop policy's, when pre-copy stopped; 1\.50 ms of it fixed\)\n/);
  assert.deepEqual([est(Number.POSITIVE_INFINITY).estimatedDowntimeMs, est(Number.POSITIVE_INFINITY).fixedDowntimeMs], [null, null], 'an estimate without a bandwidth is none');
  const table = formatReportTable(r);
  assert.match(table, /downtime\s+5\.00 ms\n/);
  assert.match(table, /rounds\s+2/);
  // SWITCHOVER and the pages before it written at 133.5: the downtime splits there.
  const split = b.add({ type: 'switchover-sent', t: 133.5 }).build();
  assert.deepEqual(split.downtimeParts, { sourceMs: 3.5, destinationMs: 1.5 });
  assert.match(formatReportTable(split), /downtime\s+5\.00 ms \(the source sending 3\.50 ms, then the destination 1\.50 ms\)/);
  // Learnt of after RESUMED came in (the kernel took the last bytes before the engine heard): the source's part ends at RESUMED.
  const late = new MigrationReportBuilder({ technique: 'precopy', memoryBytes: 4096 }).add({ type: 'paused', t: 10 }).add({ type: 'resumed', t: 14 }).add({ type: 'switchover-sent', t: 14.2 }).build();
  assert.deepEqual(late.downtimeParts, { sourceMs: 4, destinationMs: 0 });
  assert.deepEqual(JSON.parse(reportToJson(r)).pages, r.pages);
});

test('report: a VM whose memory grows is measured against the memory in use, and the table says so', () => {
  const grown = new MigrationReportBuilder({ technique: 'precopy', memoryBytes: 128 << 20, guestBytes: 32 << 20 });
  grown.add({ type: 'start', t: 0 }).add({ type: 'pages', t: 1, kind: 'first', pages: 8192, bytes: 32 << 20 }).add({ type: 'pages', t: 2, kind: 'resent', pages: 8192, bytes: 32 << 20 });
  const r = grown.build();
  assert.equal(r.memoryBytes, 128 << 20);
  assert.equal(r.guestBytes, 32 << 20);
  const table = formatReportTable(r);
  assert.match(table, /memory\s+128 MiB \(32\.0 MiB in use at the start\)/);
  assert.match(table, /bytes on the wire\s+64\.0 MiB \(2\.00× the memory in use\)/);
  // Where memory does not grow (the simulator's VMs), both are the same and the table as before.
  const fixed = new MigrationReportBuilder({ technique: 'precopy', memoryBytes: 32 << 20 }).add({ type: 'pages', t: 1, kind: 'first', pages: 8192, bytes: 32 << 20 }).build();
  assert.equal(fixed.guestBytes, 32 << 20);
  assert.match(formatReportTable(fixed), /memory\s+32\.0 MiB\n/);
  assert.match(formatReportTable(fixed), /bytes on the wire\s+32\.0 MiB \(1\.00× memory\)/);
});

test('post-copy report: fault count and latency percentiles; missing events give nulls', () => {
  const b = new MigrationReportBuilder({ technique: 'postcopy', memoryBytes: 1 << 20 });
  b.add({ type: 'start', t: 1000 }).add({ type: 'paused', t: 1001 }).add({ type: 'resumed', t: 1004 });
  for (let i = 0; i < 99; i++) b.add({ type: 'fault', t: 1005 + i, page: i, latencyMs: 1 });
  b.add({ type: 'fault', t: 1200, page: 500, latencyMs: 40 });
  b.add({ type: 'pages', t: 1300, kind: 'faulted', pages: 100, bytes: 409_600 }).add({ type: 'pages', t: 1300, kind: 'pushed', pages: 156, bytes: 638_976 });
  b.add({ type: 'complete', t: 2004 });
  const r = b.build();
  assert.equal(r.preparationTimeMs, 1);
  assert.equal(r.downtimeMs, 3);
  assert.equal(r.resumeTimeMs, 1000);
  assert.equal(r.totalMigrationTimeMs, 1004);
  assert.equal(r.postcopy.faults, 100);
  assert.equal(r.postcopy.faultLatencyMs.p50, 1);
  assert.equal(r.postcopy.faultLatencyMs.p99, 1);
  assert.equal(r.postcopy.faultLatencyMs.max, 40);
  assert.equal(r.pages.total, 256);
  assert.equal(r.evictionTimeMs, null);
  assert.equal(r.clientDowntimeMs, null);
  assert.equal(r.degradation, null);
  assert.equal(r.verified, null);
  assert.equal(r.dirtyRate, null);
  assert.match(formatReportTable(r), /post-copy faults\s+100 \(p50 1\.00 ms, p99 1\.00 ms\)/);
  assert.equal(r.postcopy.vcpuWaitMs, null);
  // The engine adds the vCPU's own waits (from the destination's COMPLETE): the table shows both sides.
  b.add({ type: 'fault-waits', t: 1003, waits: { count: 104, mean: 0.4, p50: 0.33, p99: 2.5, max: 41 } });
  const w = b.build();
  assert.deepEqual(w.postcopy.vcpuWaitMs, { count: 104, mean: 0.4, p50: 0.33, p99: 2.5, max: 41 });
  assert.match(formatReportTable(w), /post-copy faults\s+104 \(the vCPU waited p50 330 µs, p99 2\.50 ms; the source answered in p50 1\.00 ms, p99 1\.00 ms\)/);
});

test('a failed verification wins over a passed one', () => {
  const b = new MigrationReportBuilder({ technique: 'precopy', memoryBytes: 4096 });
  b.add({ type: 'verified', t: 1, ok: true }).add({ type: 'verified', t: 2, ok: false });
  assert.equal(b.build().verified, false);
});

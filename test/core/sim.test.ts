import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Bitmap } from '../../src/core/bitmap.js';
import { VirtualClock } from '../../src/core/clock.js';
import { constantDirty, postcopyModel, precopyClosedForm, precopyRounds } from '../../src/core/models.js';
import {
  ConstantRateDirty, decodeTrace, encodeTraceHeader, encodeTraceRecord, FluidNetwork, parseScenario, PoissonDirty, runScenario, runSimVm,
  Rng, ScenarioError, TraceFormatError, TraceReplayDirty, uniformPages, zipfPages, hotColdPages, type SimVm, type Trace,
} from '../../src/core/sim/index.js';

const PAGE = 4096;
const rel = (a: number | null, b: number) => (b === 0 ? Math.abs(a ?? NaN) : Math.abs((a ?? NaN) - b) / Math.abs(b));

function constantVm(memoryBytes: number, d: number, stateBytes = 0): SimVm {
  return { name: 'c', memoryBytes, pageSize: PAGE, dirty: new ConstantRateDirty(memoryBytes / PAGE, d), cost: { wireBytesPerPage: PAGE, cpuSecPerPage: 0 }, stateBytes };
}

test('check 1: constant-rate world, no caps — pre-copy equals the closed form (eq. 1–6) to floating-point precision', () => {
  const cases: [number, number, number, number][] = [
    [1e9, 1e8, 2.5e7, 0],
    [2 * 1024 ** 3, 125e6, 40e6, 0],
    [512 * 1024 ** 2, 1e9 / 8, 3e6, 0],
    [4 * 1024 ** 3, 125e6, 100e6, 0], // λ = 0.8: many rounds
    [1e9, 1e8, 1.5e8, 0], // λ > 1: stops on sent-too-much
    [3e9, 1.25e9, 5e8, 256 * 1024], // with CPU/device state in the downtime
  ];
  for (const [mem, bw, d, state] of cases) {
    const { result } = runSimVm(constantVm(mem, d, state), { bandwidth: bw, technique: 'precopy' });
    const r = result.report;
    const model = precopyRounds(mem, bw, constantDirty(d), { stateBytes: state });
    const n = model.rounds.length - 1;
    const closed = precopyClosedForm({ memoryBytes: mem, bandwidthBytesPerSec: bw, dirtyRateBytesPerSec: d }, n);
    const tag = `mem ${mem} bw ${bw} d ${d}`;
    assert.equal(r.rounds.length, model.rounds.length, `${tag}: rounds`);
    assert.equal(result.stopReason, model.reason, `${tag}: stop reason`);
    r.rounds.forEach((x, i) => {
      assert.ok(rel(x.bytesSent, model.rounds[i].bytes) < 1e-12, `${tag}: v_${i} ${x.bytesSent} vs ${model.rounds[i].bytes}`);
      assert.ok(rel(x.durationMs, model.rounds[i].timeMs) < 1e-12, `${tag}: t_${i}`);
    });
    assert.ok(rel(r.downtimeMs, model.downtimeMs) < 1e-12, `${tag}: downtime ${r.downtimeMs} vs ${model.downtimeMs}`);
    assert.deepEqual(r.downtimeParts, { sourceMs: r.downtimeMs, destinationMs: 0 }, `${tag}: no latency, no resume time: all of the downtime is sending`);
    // In this world the stop policy's estimate (eq. (2) at the round's rate, plus the state) is the downtime.
    assert.ok(rel(r.estimatedDowntimeMs, r.downtimeMs!) < 1e-12, `${tag}: estimated ${r.estimatedDowntimeMs} vs ${r.downtimeMs}`);
    assert.ok(rel(r.totalMigrationTimeMs, model.totalTimeMs) < 1e-12, `${tag}: TMT ${r.totalMigrationTimeMs} vs ${model.totalTimeMs}`);
    assert.ok(rel(r.bytes.wire, model.totalBytes) < 1e-12, `${tag}: bytes ${r.bytes.wire} vs ${model.totalBytes}`);
    // And the closed forms themselves (eq. 2, 4–6), which have no state term.
    if (state === 0) {
      assert.ok(rel(r.preparationTimeMs, closed.liveTimeMs) < 1e-12, `${tag}: eq. 6`);
      assert.ok(rel(r.downtimeMs, closed.downtimeMs) < 1e-12, `${tag}: eq. 2`);
      assert.ok(rel(r.bytes.total, closed.totalBytes) < 1e-12, `${tag}: eq. 5 + v_(n+1)`);
    }
  }
});

test('the downtime splits where the source has sent the last of it: the link\'s latency and the resume time are the destination\'s part', () => {
  for (const technique of ['precopy', 'postcopy'] as const) {
    const { result } = runSimVm(constantVm(256 * 1024 ** 2, 20e6, 64 * 1024), { bandwidth: 125e6, latencyMs: 2, technique, options: { resumeMs: 3 } });
    const r = result.report;
    assert.ok(Math.abs(r.downtimeParts!.destinationMs - 5) < 1e-9, `${technique}: ${JSON.stringify(r.downtimeParts)}`);
    assert.ok(Math.abs(r.downtimeParts!.sourceMs + r.downtimeParts!.destinationMs - r.downtimeMs!) < 1e-9);
    // The estimate leaves out the resume time (unless given as fixedDowntimeMs), and the latency
    // but for what it took off the round's measured rate; post-copy makes none.
    if (technique === 'precopy') assert.ok(r.downtimeMs! - r.estimatedDowntimeMs! > 3 && r.downtimeMs! - r.estimatedDowntimeMs! < 5, `estimated ${r.estimatedDowntimeMs} vs ${r.downtimeMs}`);
    else assert.equal(r.estimatedDowntimeMs, null);
  }
});

test('the stop-and-copy carries the dirty pages the policy decided on, those written while the last acknowledgement was on the way included', () => {
  // 50 ms of latency: the harvest when a round's last page leaves and the decision, one latency
  // after it arrived, are far apart. The guest writes all along; the decision counts it all.
  const d = 60e6;
  const { result } = runSimVm(constantVm(256 * 1024 ** 2, d), { bandwidth: 125e6, latencyMs: 50, technique: 'precopy' });
  const r = result.report;
  assert.equal(result.stopReason, 'converged');
  const last = r.rounds[r.rounds.length - 1];
  const final = r.bytes.total - r.rounds.reduce((n, x) => n + x.bytesSent, 0);
  assert.ok(rel(final, last.dirtyPages * PAGE) < 1e-9, `stop-and-copy ${final / PAGE} pages, decided on ${last.dirtyPages}`);
  assert.ok(rel(last.dirtyPages * PAGE, (d * last.durationMs) / 1000) < 1e-9, 'the last round dirtied for all of its time');
});

test('constant-rate world: post-copy equals the post-copy model (every page once, downtime = state)', () => {
  const mem = 256 * 1024 ** 2;
  const bw = 125e6;
  const state = 64 * 1024;
  const { result } = runSimVm(constantVm(mem, 10e6, state), { bandwidth: bw, technique: 'postcopy' });
  const m = postcopyModel({ memoryBytes: mem, bandwidthBytesPerSec: bw, stateBytes: state });
  assert.ok(rel(result.report.downtimeMs, m.downtimeMs) < 1e-12);
  assert.ok(rel(result.report.totalMigrationTimeMs, m.totalTimeMs) < 1e-9, `${result.report.totalMigrationTimeMs} vs ${m.totalTimeMs}`);
  assert.equal(result.report.bytes.wire, m.totalBytes);
  assert.equal(result.report.pages.total, mem / PAGE);
  assert.ok(result.report.postcopy.faults > 0);
});

test('the fluid network shares links max-min fairly and re-shares when a flow ends', () => {
  const clock = new VirtualClock();
  const net = new FluidNetwork(clock);
  const fabric = net.resource('fabric', 300);
  const slow = net.resource('slow-nic', 50);
  const a = net.channel({ name: 'a', uses: [{ resource: fabric, perByte: 1 }] });
  const b = net.channel({ name: 'b', uses: [{ resource: fabric, perByte: 1 }] });
  const c = net.channel({ name: 'c', uses: [{ resource: fabric, perByte: 1 }, { resource: slow, perByte: 1 }] });
  const done: Record<string, number> = {};
  a.send(125, (t) => (done.a = t));
  b.send(1000, (t) => (done.b = t));
  c.send(100, (t) => (done.c = t));
  clock.runUntil(0);
  assert.deepEqual([a.rate, b.rate, c.rate], [125, 125, 50]);
  clock.runAll();
  // a: 125 B at 125 B/s → 1 s. c stays at its NIC's 50 B/s until 2 s, so b gets 250 B/s meanwhile
  // (875 → 625 B left), then the whole 300 B/s.
  assert.equal(done.a, 1000);
  assert.equal(done.c, 2000);
  assert.ok(Math.abs(done.b - (2000 + (625 / 300) * 1000)) < 1e-9, String(done.b));
});

test('host CPU caps a compressing migration: rate = cores / CPU-seconds per wire byte', () => {
  const clock = new VirtualClock();
  const net = new FluidNetwork(clock);
  const link = net.resource('link', 1e9);
  const cpu = net.resource('cpu', 2);
  const ch = net.channel({ name: 'x', uses: [{ resource: link, perByte: 1 }, { resource: cpu, perByte: 8e-6 / 1000 }] });
  ch.send(1e6);
  clock.runUntil(0);
  // 2 cores at 8 ns per wire byte: 250 MB/s, below the 1 GB/s link.
  assert.ok(Math.abs(ch.rate - 2.5e8) / 2.5e8 < 1e-12, String(ch.rate));
});

test('Poisson writes: distinct dirty pages follow W·(1 − e^(−n/W)) for a uniform working set', () => {
  const W = 50_000;
  for (const writes of [10_000, 500_000]) {
    const m = new PoissonDirty({ pageCount: 100_000, writePagesPerSec: writes, writes: uniformPages(W), seed: 3 });
    m.run(1000, 1);
    const got = m.harvest().pages;
    const want = W * (1 - Math.exp(-writes / W));
    assert.ok(Math.abs(got - want) / want < 0.02, `${writes} writes: ${got} distinct vs ${want}`);
  }
  const z = zipfPages(1000, 1.1);
  let s = 0;
  for (let p = 0; p < 1000; p++) s += z.weight(p);
  assert.ok(Math.abs(s - 1) < 1e-9);
  // The alias sampler draws pages with the Zipf probabilities.
  const rng = new Rng(5);
  const hits = new Float64Array(1000);
  for (let i = 0; i < 200_000; i++) hits[z.sample(rng)]++;
  for (const p of [0, 1, 10, 500]) assert.ok(Math.abs(hits[p] / 200_000 - z.weight(p)) < 0.1 * z.weight(p) + 2e-4, `page ${p}: ${hits[p] / 200_000} vs ${z.weight(p)}`);
  const hc = hotColdPages(1000, 10, 0.9);
  assert.ok(Math.abs(hc.weight(0) * 10 - 0.9) < 1e-12);
});

function sampleTrace(): Trace {
  const pageCount = 5000;
  const intervals = Array.from({ length: 20 }, (_, k) => {
    const dirty = new Bitmap(pageCount);
    for (let p = k * 7; p < pageCount; p += 13 + (k % 5)) dirty.set(p);
    if (k % 3 === 0) dirty.setRange(100, 1200); // long runs: RLE wins
    return { startMs: k * 100, endMs: (k + 1) * 100, guestPages: 4096 + k * 16, dirty };
  });
  return { header: { version: 1, vm: 't', pageSize: PAGE, pageCount, memoryBytes: pageCount * PAGE, intervalMs: 100 }, intervals };
}

function traceBytes(t: Trace): Uint8Array {
  const parts = [encodeTraceHeader(t.header), ...t.intervals.map(encodeTraceRecord)];
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

test('trace format: round trip (RLE and raw records), named errors on truncation and garbage', () => {
  const t = sampleTrace();
  const bytes = traceBytes(t);
  const back = decodeTrace(bytes);
  assert.deepEqual(back.header, t.header);
  assert.equal(back.intervals.length, t.intervals.length);
  back.intervals.forEach((iv, k) => {
    const want = [...t.intervals[k].dirty].filter((p) => p < t.intervals[k].guestPages);
    assert.deepEqual([...iv.dirty], want);
    assert.equal(iv.startMs, t.intervals[k].startMs);
  });
  assert.throws(() => decodeTrace(bytes.subarray(0, bytes.length - 3)), TraceFormatError);
  assert.throws(() => decodeTrace(new Uint8Array(40)), TraceFormatError);
  const bad = bytes.slice();
  bad[encodeTraceHeader(t.header).length] = 9;
  assert.throws(() => decodeTrace(bad), (e: unknown) => e instanceof TraceFormatError && e.code === 'ERR_TRACE_FORMAT');
});

test('trace replay: the dirty set does not depend on how time is split, and one pass dirties each interval exactly', () => {
  const t = sampleTrace();
  const whole = new TraceReplayDirty(t, { pageCount: 5000 });
  whole.run(2000, 1);
  const a = whole.harvest();
  const pieces = new TraceReplayDirty(t, { pageCount: 5000 });
  for (let i = 0; i < 37; i++) pieces.run(2000 / 37, 1);
  const b = pieces.harvest();
  const union = new Bitmap(5000);
  for (const iv of t.intervals) union.or(iv.dirty);
  assert.deepEqual([...a.bitmap!], [...union]);
  assert.deepEqual([...b.bitmap!], [...union]);
  // Half an interval dirties about half its pages.
  const half = new TraceReplayDirty(t, { pageCount: 5000 });
  half.run(50, 1);
  const n = half.harvest().pages;
  const full = t.intervals[0].dirty.count();
  assert.ok(Math.abs(n - full / 2) < full * 0.1, `${n} of ${full}`);
});

test('scenarios: named errors with the offending path', () => {
  const base = 'name: s\nhosts: [{name: a, nic: 1Gbit}, {name: b, nic: 1Gbit}]\nvms: [{name: v, host: a, memory: 64MiB, workload: {kind: uniform, writeRate: 10MB/s}}]\n';
  assert.throws(() => parseScenario(base + 'migrations: [{vm: v, to: c, technique: precopy}]'), (e: unknown) => e instanceof ScenarioError && /migrations\.0\.to: unknown host 'c'/.test(e.message));
  assert.throws(() => parseScenario(base + 'migrations: [{vm: v, to: b, technique: teleport}]'), (e: unknown) => e instanceof ScenarioError && /migrations\.0\.technique/.test(e.message));
  assert.throws(() => parseScenario(base.replace('64MiB', 'lots')), (e: unknown) => e instanceof ScenarioError && /vms\.0\.memory.*invalid size/.test(e.message));
  assert.throws(() => parseScenario('name: [1, 2'), ScenarioError);
  assert.throws(() => parseScenario(base + 'migrations: [{vm: v, to: b, technique: precopy, via: [nowhere]}]'), /via\.0: unknown link/);
  assert.throws(() => parseScenario(base + 'bogus: 1'), /bogus/);
});

test('a scenario with shared links runs deterministically, and concurrent migrations slow each other', () => {
  const text = `
name: shared
seed: 3
workloads: { w: { kind: zipf, writeRate: 20MB/s, exponent: 1.0, wss: 50% } }
hosts: [{name: a, nic: 10Gbit}, {name: b, nic: 10Gbit}, {name: c, nic: 10Gbit}]
links: [{name: core, bandwidth: 1Gbit, latency: 0.5ms}]
vms:
  - {name: v1, host: a, memory: 256MiB, workload: w}
  - {name: v2, host: a, memory: 256MiB, workload: w, content: {codec: compress, zero: 0.3, text: 0.5, random: 0.2}}
  - {name: v3, host: c, memory: 256MiB, workload: w}
migrations:
  - {vm: v1, to: b, technique: precopy, via: [core]}
  - {vm: v2, to: b, technique: hybrid, via: [core]}
  - {vm: v3, to: b, technique: postcopy, via: [core], at: 5s}
`;
  const s = parseScenario(text);
  const r1 = runScenario(s);
  const r2 = runScenario(s);
  assert.deepEqual(JSON.parse(JSON.stringify(r1)), JSON.parse(JSON.stringify(r2)));
  assert.equal(r1.migrations.length, 3);
  const alone = runScenario(parseScenario(text.replace(/  - \{vm: v2.*\n/, '').replace(/  - \{vm: v3.*\n/, '')));
  const v1Shared = r1.migrations[0].report.totalMigrationTimeMs!;
  const v1Alone = alone.migrations[0].report.totalMigrationTimeMs!;
  assert.ok(v1Shared > v1Alone * 1.3, `shared ${v1Shared} vs alone ${v1Alone}`);
  // v2 compresses: fewer bytes on the wire than pages × 4 KiB.
  const v2 = r1.migrations[1].report;
  assert.ok(v2.bytes.total < v2.pages.total * PAGE * 0.6);
});

test('scenarios: fixedDowntime is added to the stop policy\'s estimate, which then needs smaller final rounds', () => {
  const text = (opts: string) => `name: f
hosts: [{name: a, nic: 1Gbit}, {name: b, nic: 1Gbit}]
vms: [{name: v, host: a, memory: 256MiB, workload: {kind: uniform, writeRate: 40MB/s}}]
migrations: [{vm: v, to: b, technique: precopy, options: {downtime: 30ms${opts}}}]
`;
  const [plain] = runScenario(parseScenario(text(''))).migrations;
  const [fixed] = runScenario(parseScenario(text(', fixedDowntime: 20ms'))).migrations;
  assert.ok(plain.report.estimatedDowntimeMs! <= 30 && fixed.report.estimatedDowntimeMs! <= 30, `${plain.report.estimatedDowntimeMs} ${fixed.report.estimatedDowntimeMs}`);
  assert.ok(fixed.report.estimatedDowntimeMs! >= 20);
  assert.ok(fixed.report.rounds.length > plain.report.rounds.length, `rounds ${plain.report.rounds.length} → ${fixed.report.rounds.length}`);
  assert.ok(fixed.report.downtimeMs! < plain.report.downtimeMs!, `downtime ${plain.report.downtimeMs} → ${fixed.report.downtimeMs}`);
  assert.throws(() => parseScenario(text(', fixedDowntime: soon')), (e: unknown) => e instanceof ScenarioError && /fixedDowntime/.test(e.message));
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PostcopyPageState, PostcopyScheduler } from '../../src/core/policy/postcopy.js';

test('with no faults, active push sends every page in order, once', () => {
  const s = new PostcopyScheduler(10);
  assert.deepEqual(s.next(4), [0, 1, 2, 3]);
  assert.deepEqual(s.next(100), [4, 5, 6, 7, 8, 9]);
  assert.deepEqual(s.next(5), []);
  assert.equal(s.remaining, 0);
  assert.equal(s.complete, false, 'pages still in flight');
  for (let p = 0; p < 10; p++) s.onSent(p);
  assert.equal(s.complete, true);
});

test('demand faults go first, then bubbling outward from the pivot, alternating sides', () => {
  const s = new PostcopyScheduler(100);
  assert.deepEqual(s.next(2), [0, 1]);
  assert.equal(s.onFault(50), true);
  assert.deepEqual(s.next(7), [50, 51, 49, 52, 48, 53, 47]);
  // a new fault moves the pivot
  assert.equal(s.onFault(80), true);
  assert.equal(s.onFault(80), false, 'already queued');
  assert.deepEqual(s.next(5), [80, 81, 79, 82, 78]);
  assert.deepEqual(s.emitted, { faulted: 2, prepaged: 10, pushed: 2 });
});

test('bubbling skips pages already sent and stops at memory edges, then falls back to sequential push', () => {
  const s = new PostcopyScheduler(10);
  s.markPresent(3);
  s.markPresent(4);
  s.onFault(2);
  // pivot 2: fwd 3,4 present → 5; back 1, 0; then only forward remains
  assert.deepEqual(s.next(10), [2, 5, 1, 6, 0, 7, 8, 9]);
  assert.equal(s.remaining, 0);
});

test('bubble window bounds pre-paging, after which pages are pushed in order', () => {
  const s = new PostcopyScheduler(20, { window: 2 });
  s.onFault(10);
  assert.deepEqual(s.next(20), [10, 11, 9, 12, 8, 0, 1, 2, 3, 4, 5, 6, 7, 13, 14, 15, 16, 17, 18, 19]);
});

test('soft (guest-free) pages are never sent, not even on fault', () => {
  const s = new PostcopyScheduler(10);
  s.markSoftRange(2, 4);
  s.markSoft(7);
  s.markSoftRange(12, 99); // clamped to memory
  assert.equal(s.onFault(3), false);
  assert.equal(s.states[3], PostcopyPageState.SOFT);
  s.onFault(5);
  const out = s.next(100);
  assert.deepEqual(out, [5, 6, 4, 8, 1, 9, 0]);
  assert.ok(!out.includes(2) && !out.includes(3) && !out.includes(7));
  for (const p of out) s.onSent(p);
  assert.equal(s.complete, true);
});

test('faults on pages in flight or present are not re-sent', () => {
  const s = new PostcopyScheduler(10);
  const [a] = s.next(1);
  assert.equal(s.onFault(a), false);
  s.onSent(a);
  assert.equal(s.onFault(a), false);
  assert.equal(s.states[a], PostcopyPageState.PRESENT);
  // queued faults are all served, oldest first, before any bubbling; a queued page marked present meanwhile is skipped
  const t = new PostcopyScheduler(10);
  t.onFault(5);
  t.onFault(6); // pivot now 6; queue [5, 6]
  t.onFault(2);
  t.markPresent(2); // e.g. arrived by pre-copy
  assert.deepEqual(t.next(4), [5, 6, 3, 1]);
});

test('multiple pivots are served round-robin, most recent first', () => {
  const s = new PostcopyScheduler(1000, { maxPivots: 2 });
  s.onFault(100);
  s.onFault(500);
  assert.deepEqual(s.next(6), [100, 500, 501, 101, 499, 99]);
});

test('demand-only mode (no active push, no pre-paging) sends faulted pages and nothing else', () => {
  const s = new PostcopyScheduler(100, { activePush: false, prepaging: 'none' });
  assert.deepEqual(s.next(10), []);
  s.onFault(7);
  s.onFault(3);
  assert.deepEqual(s.next(10), [7, 3]);
  assert.deepEqual(s.next(10), []);
});

test('1 M pages with random faults: every non-soft page exactly once', () => {
  const N = 1 << 20;
  const s = new PostcopyScheduler(N, { maxPivots: 4 });
  let seed = 12345;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) % N);
  let soft = 0;
  for (let i = 0; i < 50_000; i++) {
    const p = rnd();
    if (s.states[p] === PostcopyPageState.MISSING) soft++;
    s.markSoft(p);
  }
  const seen = new Uint8Array(N);
  let sent = 0;
  for (;;) {
    for (let f = 0; f < 8; f++) s.onFault(rnd());
    const batch = s.next(256);
    if (batch.length === 0) break;
    for (const p of batch) {
      assert.ok(seen[p] === 0 && s.states[p] === PostcopyPageState.IN_FLIGHT, `page ${p} twice`);
      seen[p] = 1;
      s.onSent(p);
    }
    sent += batch.length;
  }
  assert.equal(sent, N - soft);
  assert.equal(s.complete, true);
});

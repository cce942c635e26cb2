import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ClockError, VirtualClock } from '../../src/core/clock.js';
import { AbortError } from '../../src/core/errors.js';

test('events run in time order, then insertion order at the same instant', () => {
  const c = new VirtualClock();
  const log: string[] = [];
  c.schedule(20, () => log.push('b@20'));
  c.schedule(10, () => log.push('a@10'));
  c.schedule(20, () => log.push('c@20'));
  c.schedule(10, () => log.push('d@10'));
  c.schedule(0, () => log.push('e@0'));
  assert.equal(c.runAll(), 5);
  assert.deepEqual(log, ['e@0', 'a@10', 'd@10', 'b@20', 'c@20']);
  assert.equal(c.now(), 20);
});

test('an event scheduled from an event at the same instant runs after those already queued', () => {
  const c = new VirtualClock();
  const log: string[] = [];
  c.schedule(5, () => {
    log.push('first');
    c.after(0, () => log.push('nested'));
  });
  c.schedule(5, () => log.push('second'));
  c.runAll();
  assert.deepEqual(log, ['first', 'second', 'nested']);
});

test('scheduling in the past is refused with ERR_CLOCK_PAST', () => {
  const c = new VirtualClock({ start: 100 });
  assert.throws(() => c.schedule(99, () => {}), (e: unknown) => e instanceof ClockError && e.code === 'ERR_CLOCK_PAST');
  assert.throws(() => c.after(-1, () => {}), ClockError);
  c.runUntil(150);
  assert.equal(c.now(), 150);
  assert.throws(() => c.schedule(120, () => {}), ClockError);
  assert.throws(() => c.runUntil(140), ClockError);
});

test('runUntil runs only due events and leaves time at the target', () => {
  const c = new VirtualClock();
  const log: number[] = [];
  for (const t of [5, 10, 15, 20]) c.schedule(t, () => log.push(c.now()));
  assert.equal(c.runUntil(12), 2);
  assert.deepEqual(log, [5, 10]);
  assert.equal(c.now(), 12);
  assert.equal(c.pending, 2);
  assert.equal(c.peek(), 15);
});

test('cancelled events do not run', () => {
  const c = new VirtualClock();
  let ran = false;
  const ev = c.schedule(10, () => (ran = true));
  assert.equal(c.cancel(ev), true);
  assert.equal(c.cancel(ev), false);
  assert.equal(c.pending, 0);
  c.runAll();
  assert.equal(ran, false);
});

test('a zero-delay self-rescheduling event is stopped as a runaway', () => {
  const c = new VirtualClock({ maxEventsPerInstant: 1000 });
  const again = () => void c.after(0, again);
  c.after(0, again);
  assert.throws(() => c.runAll(), (e: unknown) => e instanceof ClockError && e.code === 'ERR_CLOCK_RUNAWAY');
  assert.equal(c.eventsRun, 1000);
});

test('an endlessly self-rescheduling event is capped per run', () => {
  const c = new VirtualClock({ maxEventsPerRun: 500 });
  const again = () => void c.after(1, again);
  c.after(1, again);
  assert.throws(() => c.runAll(), (e: unknown) => e instanceof ClockError && e.code === 'ERR_CLOCK_RUNAWAY');
  assert.equal(c.now(), 500);
});

test('many events at distinct instants are not a runaway', () => {
  const c = new VirtualClock({ maxEventsPerInstant: 3 });
  for (let i = 0; i < 100; i++) c.schedule(i, () => {});
  for (let i = 0; i < 3; i++) c.schedule(50, () => {});
  assert.throws(() => c.runAll(), ClockError); // 4 events at t=50
  const d = new VirtualClock({ maxEventsPerInstant: 3 });
  for (let i = 0; i < 100; i++) d.schedule(i, () => {});
  assert.equal(d.runAll(), 100);
});

test('sleep resolves only when virtual time reaches it', async () => {
  const c = new VirtualClock();
  let woke = -1;
  const p = c.sleep(30).then(() => (woke = c.now()));
  c.runUntil(29);
  await Promise.resolve();
  await Promise.resolve();
  assert.equal(woke, -1);
  c.runUntil(30);
  await p;
  assert.equal(woke, 30);
});

test('sleep rejects with AbortError when its signal aborts, and the event is dropped', async () => {
  const c = new VirtualClock();
  const ac = new AbortController();
  const p = c.sleep(10, ac.signal);
  ac.abort();
  await assert.rejects(p, AbortError);
  assert.equal(c.pending, 0);
  await assert.rejects(c.sleep(5, ac.signal), AbortError);
});

test('runUntilSettled drives async code that sleeps in a loop', async () => {
  const c = new VirtualClock();
  const times: number[] = [];
  const worker = (async () => {
    for (let i = 0; i < 5; i++) {
      await c.sleep(10);
      times.push(c.now());
    }
  })();
  await c.runUntilSettled();
  await worker;
  assert.deepEqual(times, [10, 20, 30, 40, 50]);
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { PostcopyPageState, PostcopyScheduler } from '../../src/core/policy/postcopy.js';

type Op = { k: 'fault' | 'soft' | 'present'; p: number } | { k: 'next'; n: number };

const N = 64;
const op: fc.Arbitrary<Op> = fc.oneof(
  fc.record({ k: fc.constant('fault' as const), p: fc.nat(N - 1) }),
  fc.record({ k: fc.constant('soft' as const), p: fc.nat(N - 1) }),
  fc.record({ k: fc.constant('present' as const), p: fc.nat(N - 1) }),
  fc.record({ k: fc.constant('next' as const), n: fc.integer({ min: 1, max: 8 }) }),
);

test('property: any mix of faults, soft/present marks and batches sends each eligible page exactly once, faults first', () => {
  fc.assert(
    fc.property(fc.array(op, { maxLength: 80 }), fc.integer({ min: 1, max: 3 }), fc.boolean(), (ops, maxPivots, bubbling) => {
      const s = new PostcopyScheduler(N, { maxPivots, prepaging: bubbling ? 'bubbling' : 'none' });
      const sent = new Set<number>();
      const excluded = new Set<number>(); // soft or present before being sent
      let queued: number[] = [];
      const drain = (n: number) => {
        const batch = s.next(n);
        // the batch starts with the still-queued faults, oldest first
        const expectFaults = queued.filter((p) => !sent.has(p) && !excluded.has(p)).slice(0, n);
        assert.deepEqual(batch.slice(0, expectFaults.length), expectFaults);
        queued = queued.filter((p) => !expectFaults.includes(p));
        for (const p of batch) {
          assert.ok(!sent.has(p), `page ${p} sent twice`);
          assert.ok(!excluded.has(p), `page ${p} was soft or present`);
          sent.add(p);
        }
        return batch.length;
      };
      for (const o of ops) {
        if (o.k === 'next') drain(o.n);
        else if (o.k === 'fault') {
          if (s.onFault(o.p)) queued.push(o.p);
        } else if (o.k === 'soft') {
          if (!sent.has(o.p) && s.states[o.p] !== PostcopyPageState.PRESENT) excluded.add(o.p);
          s.markSoft(o.p);
        } else {
          if (!sent.has(o.p)) excluded.add(o.p);
          s.markPresent(o.p);
        }
      }
      while (drain(5) > 0);
      assert.equal(sent.size + excluded.size, N, 'every page is sent or excluded');
      assert.equal(s.remaining, 0);
    }),
    { numRuns: 300 },
  );
});

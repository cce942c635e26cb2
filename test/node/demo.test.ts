/** The README's first command, end to end: `ferry demo` moves a serving kv VM there and back. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ferry } from '../helpers/ferry-cli.js';

test('ferry demo --json: both migrations verified, the client saw every reply right, the way back used codecs and two streams', async () => {
  const r = await ferry(['demo', '--json']);
  assert.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as {
    verified: boolean; wrongReplies: number; keysWrongAtEnd: number; requests: number;
    migrations: { mode: string; verified: boolean; transfer: string | null; postcopyFaults: number | null; faultWaitMs: { count: number; p50: number | null } | null }[];
  };
  assert.equal(out.verified, true);
  assert.equal(out.wrongReplies, 0);
  assert.equal(out.keysWrongAtEnd, 0);
  assert.ok(out.requests > 1000, `the client kept working (${out.requests} requests)`);
  assert.deepEqual(out.migrations.map((m) => [m.mode, m.verified]), [['precopy', true], ['postcopy', true]]);
  assert.match(out.migrations[1].transfer ?? '', /2 streams \+ fault channel, dedup\+zstd: .* \(\d+\.\d\d×\)/);
  // The way back is post-copy: the kv guest faults, and the report has the vCPU's own waits for them.
  assert.equal(out.migrations[0].faultWaitMs, null);
  const back = out.migrations[1];
  assert.ok(back.faultWaitMs && back.faultWaitMs.count > 0 && back.faultWaitMs.p50! > 0, JSON.stringify(back.faultWaitMs));
});

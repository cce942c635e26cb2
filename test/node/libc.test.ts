import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';

test('libc: loadedLibc() stays null in a thread until libc() loads it there (a hot path never pays the load); sched_yield returns 0', async () => {
  const url = new URL('../../src/node/libc.js', import.meta.url).href;
  const w = new Worker(`
    const { parentPort } = require('node:worker_threads');
    import(${JSON.stringify(url)}).then((m) => {
      const before = m.loadedLibc();
      const l = m.libc();
      parentPort.postMessage({ before, same: m.loadedLibc() === l, yielded: l.schedYield() });
    });`, { eval: true });
  const got = await new Promise<{ before: unknown; same: boolean; yielded: number }>((resolve, reject) => {
    w.once('message', resolve);
    w.once('error', reject);
  });
  await w.terminate();
  assert.equal(got.before, null, 'nothing loaded before the first libc()');
  assert.equal(got.same, true, 'then loadedLibc() is the loaded one');
  assert.equal(got.yielded, 0);
});

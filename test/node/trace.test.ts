import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Vm } from '../../src/node/vm/vm.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';
import { guestsDir } from '../../src/node/paths.js';
import { recordTrace } from '../../src/node/vm/trace.js';
import { decodeTrace, TraceReplayDirty } from '../../src/core/sim/index.js';

const memstress = new Uint8Array(readFileSync(join(guestsDir(), 'memstress.wasm')));

test('recordTrace writes the pages a real VM dirties, interval by interval, in the documented format', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-trace-'));
  const vm = Vm.create({ name: 'tr', module: memstress, memoryBytes: 32 << 20, config: 'mem=8MiB wss=2MiB pattern=uniform rate=4000000', cache: new InstrumentCache() });
  try {
    await vm.bootCold();
    await new Promise((r) => setTimeout(r, 50));
    const file = join(dir, 'm.trace');
    const seen: number[] = [];
    const s = await recordTrace(vm, { out: file, intervalMs: 25, durationMs: 400, guest: 'memstress', onInterval: (i) => seen.push(i.dirtyPages) });
    assert.ok(s.intervals >= 8 && s.intervals <= 20, `${s.intervals} intervals`);
    assert.equal(seen.length, s.intervals);
    assert.equal(vm.dirtyLogging, false, 'the dirty log is off again');
    const bytes = new Uint8Array(await readFile(file));
    assert.equal(bytes.length, s.bytes);
    const t = decodeTrace(bytes);
    assert.equal(t.header.vm, 'tr');
    assert.equal(t.header.guest, 'memstress');
    assert.equal(t.header.pageCount, vm.maxPages);
    assert.equal(t.intervals.length, s.intervals);
    let prev = 0;
    for (const iv of t.intervals) {
      assert.ok(iv.startMs >= prev - 1e-9 && iv.endMs >= iv.startMs);
      prev = iv.endMs;
    }
    // memstress writes 4 MB/s uniformly into a 2 MiB (512-page) working set: each 25 ms interval
    // dirties a good share of it and little outside it (stack, globals).
    const counts = t.intervals.map((iv) => iv.dirty.count());
    assert.deepEqual(counts, seen);
    const mid = counts.slice(1, -1);
    assert.ok(mid.every((c) => c > 100 && c < 700), `dirty pages per interval: ${counts.join(' ')}`);
    // The file is small: run-length records of a sparse bitmap.
    assert.ok(s.bytes < s.intervals * 2048, `${s.bytes} bytes`);
    // And the simulator replays it.
    const replay = new TraceReplayDirty(t);
    replay.run(100, 1);
    assert.ok(replay.harvest().pages > 100);
  } finally {
    await vm.stop().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
});

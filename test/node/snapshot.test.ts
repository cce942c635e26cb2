import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdtemp, readFile, rm, writeFile, readdir } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Vm } from '../../src/node/vm/vm.js';
import { InstrumentCache } from '../../src/node/vm/instrument.js';
import { restoreSnapshot, writeSnapshot } from '../../src/node/vm/snapshot.js';
import { InvalidArgumentError, SnapshotError } from '../../src/core/errors.js';
import { guestsDir } from '../../src/node/paths.js';

const run = promisify(execFile);
const cache = new InstrumentCache();
const memstress = new Uint8Array(readFileSync(join(guestsDir(), 'memstress.wasm')));
const child = fileURLToPath(new URL('../helpers/restore-child.js', import.meta.url));
const BUDGET = 20000;
const CONFIG = 'mem=8MiB wss=6MiB pattern=zipf seed=7';

function mk(name: string): Vm {
  return Vm.create({ name, module: memstress, memoryBytes: 16 << 20, config: CONFIG, cache, fixedBudget: BUDGET });
}

test('snapshot/restore in another process continues the machine exactly (N straight == k + snapshot + restore + N-k)', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-snap-'));
  try {
    const N = 60;
    const k = 23;
    const straight = mk('straight');
    await straight.bootCold({ pauseAfterQuanta: N });
    await straight.whenPaused();
    const want = straight.digest();
    await straight.stop();

    const first = mk('first');
    await first.bootCold({ pauseAfterQuanta: k });
    await first.whenPaused();
    const atK = first.digest();
    const file = join(dir, 'vm.snap');
    const stats = await writeSnapshot(first, file);
    await first.stop();
    assert.ok(stats.zeroPagesSkipped > 0, 'zero pages are not written');
    assert.equal((await readdir(dir)).length, 1, 'no temporary file is left behind');

    const { stdout } = await run(process.execPath, [child, file, String(N - k), String(BUDGET)]);
    const out = JSON.parse(stdout.trim()) as { digest: string; quanta: number };
    assert.equal(out.quanta, N - k);
    assert.notEqual(atK, want, 'the guest changed memory after the snapshot point');
    assert.equal(out.digest, want);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('truncated, altered, foreign and future-version snapshots are refused with named errors', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-snap-'));
  try {
    const vm = mk('victim');
    await vm.bootCold({ pauseAfterQuanta: 3 });
    await vm.whenPaused();
    const file = join(dir, 'good.snap');
    try {
      // Into a directory that is not there: named for the file asked for, and nothing is left behind.
      await assert.rejects(writeSnapshot(vm, join(dir, 'no-such-dir', 'x.snap')), (e: unknown) => e instanceof SnapshotError && e.code === 'ERR_SNAPSHOT_WRITE' && e.message === `cannot write snapshot ${join(dir, 'no-such-dir', 'x.snap')}: its directory does not exist`);
      await writeSnapshot(vm, file);
    } finally {
      await vm.stop(); // a failure above is reported, not left waiting on a running vCPU
    }
    assert.deepEqual(await readdir(dir), ['good.snap']);
    const good = await readFile(file);
    const expectCode = async (bytes: Uint8Array, code: string) => {
      const p = join(dir, `bad-${code}-${bytes.length}.snap`);
      await writeFile(p, bytes);
      await assert.rejects(restoreSnapshot(p, { cache }), (e: unknown) => e instanceof SnapshotError && e.code === code);
    };
    for (const cut of [0, 10, 20, 200, good.length >> 1, good.length - 33, good.length - 1]) {
      await expectCode(good.subarray(0, cut), 'ERR_SNAPSHOT_TRUNCATED');
    }
    for (const at of [good.length >> 1, good.length - 40, good.length - 5]) {
      const bad = Buffer.from(good);
      bad[at] ^= 0x40;
      await expectCode(bad, 'ERR_SNAPSHOT_CORRUPT');
    }
    const v2 = Buffer.from(good);
    v2.writeUInt32LE(2, 8);
    await expectCode(v2, 'ERR_SNAPSHOT_VERSION');
    await expectCode(Buffer.from('definitely not a snapshot file at all'), 'ERR_SNAPSHOT_NOT_A_SNAPSHOT');
    await expectCode(Buffer.concat([good, Buffer.from([1, 2, 3])]), 'ERR_SNAPSHOT_CORRUPT');
    await assert.rejects(restoreSnapshot(join(dir, 'missing.snap'), { cache }), (e: unknown) => e instanceof SnapshotError && e.code === 'ERR_SNAPSHOT_OPEN');
    // The good file still restores after all that.
    const { vm: back } = await restoreSnapshot(file, { cache, paused: true });
    assert.equal(back.state, 'paused');
    await back.stop();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('a snapshot carries where its VM\'s client connection ids stand, for the restore; a bad value is refused', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-snap-'));
  try {
    const vm = mk('conns');
    await vm.bootCold({ pauseAfterQuanta: 3 });
    await vm.whenPaused();
    const file = join(dir, 'conns.snap');
    await writeSnapshot(vm, file, { netConnsFrom: 1234 });
    const plain = join(dir, 'plain.snap');
    await writeSnapshot(vm, plain);
    await assert.rejects(writeSnapshot(vm, join(dir, 'bad.snap'), { netConnsFrom: 0 }), InvalidArgumentError);
    await vm.stop();
    const { vm: back, header } = await restoreSnapshot(file, { cache, noStart: true });
    assert.equal(header.netConnsFrom, 1234);
    await back.stop();
    const { vm: back2, header: h2 } = await restoreSnapshot(plain, { cache, noStart: true });
    assert.equal(h2.netConnsFrom, undefined, 'older snapshots and VMs without an endpoint: absent');
    await back2.stop();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SendStream } from '../../src/core/engine/source.js';
import type { SourceVm } from '../../src/core/engine/types.js';
import { PAGE_SIZE } from '../../src/core/pages.js';
import { FrameDecoder } from '../../src/core/protocol/decoder.js';
import type { Frame } from '../../src/core/protocol/frames.js';
import { FramedConnection } from '../../src/core/transport/framed.js';
import { memoryPair } from '../../src/core/transport/memory.js';

/**
 * Guest memory of `pages` pages, page p filled with p + 1 except the zero pages; the SourceVm
 * calls the RUN path makes, counting the zero scans (one per run of the batch).
 */
function vmWith(pages: number, zero: Set<number>): { vm: SourceVm; scans: number[] } {
  const mem = new Uint8Array(pages * PAGE_SIZE);
  for (let p = 0; p < pages; p++) if (!zero.has(p)) mem.fill((p % 255) + 1, p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
  const scans: number[] = [];
  const vm = {
    readPage: (p: number, into: Uint8Array, off: number) => into.set(mem.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE), off),
    pagesView: (first: number, count: number) => mem.subarray(first * PAGE_SIZE, (first + count) * PAGE_SIZE),
    zeroPages: (first: number, count: number, out: Uint8Array) => {
      scans.push(count);
      let n = 0;
      for (let k = 0; k < count; k++) n += out[k] = zero.has(first + k) ? 1 : 0;
      return n;
    },
  } as unknown as SourceVm;
  return { vm, scans };
}

/**
 * What one flush of `add` (pages and runs, in that order) puts on the wire, decoded, and the
 * connection writes it took; `views: false` for a VM that cannot lend views of its memory.
 */
async function flushed(add: (s: SendStream) => void, zero: Set<number> = new Set(), views = true): Promise<{ frames: Frame[]; pages: number; scans: number[]; writes: Uint8Array[]; vm: SourceVm }> {
  const [a, b] = memoryPair();
  const received = framesOf(b);
  const { vm, scans } = vmWith(64, zero);
  if (!views) delete (vm as { pagesView?: unknown }).pagesView;
  const writes: Uint8Array[] = [];
  const write = a.write.bind(a);
  a.write = (bytes) => {
    writes.push(bytes);
    return write(bytes);
  };
  const s = new SendStream(new FramedConnection(a), null, vm, 32, () => 0);
  add(s);
  const { pages } = await s.flush(3);
  await s.drain();
  await a.close();
  return { frames: await received, pages, scans, writes, vm };
}

/** Every frame that arrives on `conn` until it ends (read as it comes: the writer waits for its reader). */
async function framesOf(conn: AsyncIterable<Uint8Array>): Promise<Frame[]> {
  const dec = new FrameDecoder();
  const frames: Frame[] = [];
  for await (const chunk of conn) frames.push(...dec.push(chunk));
  return frames;
}

/** The pages a RUN frame carries, each checked to hold its own bytes. */
function runPages(frames: Frame[]): number[] {
  const out: number[] = [];
  for (const f of frames) {
    if (f.type !== 'RUN') continue;
    assert.equal(f.seq, 3);
    for (const e of f.extents) {
      for (let k = 0; k < e.count; k++) {
        const page = e.data.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE);
        assert.ok(page.every((x) => x === ((e.first + k) % 255) + 1), `page ${e.first + k} carries its bytes`);
        out.push(e.first + k);
      }
    }
  }
  return out;
}

const zeroPagesOf = (frames: Frame[]) => frames.flatMap((f) => (f.type === 'PAGES' ? f.pages.map((p) => p.index) : []));
const extentsOf = (frames: Frame[]) => frames.flatMap((f) => (f.type === 'RUN' ? f.extents.map((e) => [e.first, e.count]) : []));

test('send stream: a batch of runs goes as one extent per run, one zero scan each', async () => {
  const { frames, pages, scans } = await flushed((s) => {
    s.addRun(4, 10);
    s.addRun(14, 2); // continues the run before: one run
    s.addRun(30, 3);
    s.add(33); // and so does this page
  });
  assert.equal(pages, 16);
  assert.deepEqual(extentsOf(frames), [[4, 12], [30, 4]]);
  assert.deepEqual(scans, [12, 4], 'one scan per run, not per page');
  assert.deepEqual(runPages(frames), [...Array.from({ length: 12 }, (_, k) => 4 + k), 30, 31, 32, 33]);
  assert.deepEqual(zeroPagesOf(frames), []);
});

test('send stream: zero pages split their run and go as ZERO entries', async () => {
  const { frames, scans } = await flushed((s) => s.addRun(0, 12), new Set([0, 5, 6, 11]));
  assert.deepEqual(scans, [12]);
  assert.deepEqual(extentsOf(frames), [[1, 4], [7, 4]]);
  assert.deepEqual(zeroPagesOf(frames), [0, 5, 6, 11]);
  runPages(frames);
});

test('send stream: pages added out of order, some twice, go sorted and once each', async () => {
  const { frames, pages } = await flushed((s) => {
    s.add(9);
    s.addRun(2, 3);
    s.add(3); // again
    s.add(20);
    s.addRun(8, 3); // 8, 9 (again), 10
    s.add(5);
  }, new Set([20]));
  assert.equal(pages, 10, 'the batch counted what was added');
  assert.deepEqual(extentsOf(frames), [[2, 4], [8, 3]]);
  assert.deepEqual(runPages(frames), [2, 3, 4, 5, 8, 9, 10]);
  assert.deepEqual(zeroPagesOf(frames), [20]);
});

test('send stream: an empty run adds nothing, and an empty batch writes nothing', async () => {
  const { frames, pages } = await flushed((s) => s.addRun(7, 0));
  assert.equal(pages, 0);
  assert.deepEqual(frames, []);
});

test('send stream: the next batch starts afresh, in order again', async () => {
  const [a, b] = memoryPair();
  const received = framesOf(b);
  const { vm } = vmWith(64, new Set());
  const s = new SendStream(new FramedConnection(a), null, vm, 32, () => 0);
  s.add(9);
  s.add(1); // out of order
  await s.flush(1);
  s.addRun(40, 4);
  s.add(44);
  await s.flush(2);
  await s.drain();
  await a.close();
  const frames = await received;
  assert.deepEqual(frames.map((f) => (f.type === 'RUN' ? [f.seq, f.extents.map((e) => [e.first, e.count])] : f.type)), [[1, [[1, 1], [9, 1]]], [2, [[40, 5]]]]);
});

test('send stream: short extents are copied together into one write; long ones go from guest memory as they are', async () => {
  for (const views of [true, false]) {
    const { frames, writes, vm } = await flushed((s) => {
      for (const p of [1, 3, 5]) s.add(p);
      s.addRun(10, 10); // 10 pages: long enough to go as it is
      s.addRun(30, 2);
      s.add(40);
    }, new Set(), views);
    assert.deepEqual(extentsOf(frames), [[1, 1], [3, 1], [5, 1], [10, 10], [30, 2], [40, 1]]);
    assert.deepEqual(runPages(frames), [1, 3, 5, ...Array.from({ length: 10 }, (_, k) => 10 + k), 30, 31, 40]);
    // The head, then one write per stretch of short extents and one per long extent (without
    // views, every extent is copied: one write for all of them).
    const guest = vm.pagesView?.(0, 1).buffer;
    assert.deepEqual(writes.map((w) => w.length), views ? [writes[0].length, 3 * PAGE_SIZE, 10 * PAGE_SIZE, 3 * PAGE_SIZE] : [writes[0].length, 16 * PAGE_SIZE]);
    if (views) assert.deepEqual(writes.map((w) => w.buffer === guest), [false, false, true, false], 'only the long extent is a view of guest memory');
  }
});

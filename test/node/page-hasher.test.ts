import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { xxh3 } from '@node-rs/xxhash';
import { PAGE_SIZE } from '../../src/core/pages.js';
import { PageHasher } from '../../src/node/vm/page-hasher.js';
import { collectNow } from '../../src/node/threads.js';
import { runModuleScript } from '../helpers/module-script.js';

const BASE = 3 * PAGE_SIZE;

function memoryWithPages(pages: number, shared: boolean): WebAssembly.Memory {
  const wasmPages = Math.ceil((BASE + pages * PAGE_SIZE) / 65536);
  const memory = new WebAssembly.Memory({ initial: wasmPages, maximum: wasmPages, shared });
  const u8 = new Uint8Array(memory.buffer);
  for (let i = 0; i < u8.length; i += 13) u8[i] = (i * 2654435761) >>> 24;
  return memory;
}

/** A hasher of `threads` threads, closed when the test ends. */
function hasherFor(t: TestContext, threads: number): PageHasher {
  const hasher = new PageHasher(threads);
  t.after(() => hasher.close());
  return hasher;
}

function expected(memory: WebAssembly.Memory, pages: number): bigint[] {
  const out: bigint[] = [];
  for (let p = 0; p < pages; p++) out.push(xxh3.xxh64(new Uint8Array(memory.buffer, BASE + p * PAGE_SIZE, PAGE_SIZE)));
  return out;
}

test('PageHasher: threads hash every page of shared memory as XXH3-64 of the page, index = page', async (t) => {
  const hasher = hasherFor(t, 3);
  const pages = 1000; // not a multiple of the threads: the last range is shorter
  const memory = memoryWithPages(pages, true);
  const got = await hasher.hash(memory, BASE, pages);
  assert.equal(got.length, pages);
  assert.ok(!(got.buffer instanceof SharedArrayBuffer), 'the result is the caller\'s own memory');
  assert.deepEqual([...got], expected(memory, pages));
  assert.deepEqual([...(await hasher.hash(memory, BASE, 2))], expected(memory, 2), 'fewer pages than threads');
});

test('PageHasher: memory that is not shared is hashed on the calling thread, alike', async (t) => {
  const hasher = hasherFor(t, 2);
  const memory = memoryWithPages(40, false);
  assert.deepEqual([...(await hasher.hash(memory, BASE, 40))], expected(memory, 40));
});

test('PageHasher: a range beyond the memory is a RangeError; a closed hasher starts new threads', async (t) => {
  const hasher = hasherFor(t, 2);
  const memory = memoryWithPages(16, true);
  await assert.rejects(hasher.hash(memory, BASE, 1 << 20), RangeError);
  await hasher.close();
  assert.deepEqual([...(await hasher.hash(memory, BASE, 16))], expected(memory, 16));
});

test('PageHasher: idle threads keep no process alive; working ones do until they answer', () => {
  const url = new URL('../../src/node/vm/page-hasher.js', import.meta.url).href;
  const script = `import { PageHasher } from ${JSON.stringify(url)};
const h = new PageHasher(2); h.warm();
const m = new WebAssembly.Memory({ initial: 2, maximum: 2, shared: true });
const hashes = await h.hash(m, 0, 32);
console.log(hashes.length, h.running);`;
  const r = runModuleScript(script);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trim(), '32 2', 'hashed by its two threads, then the process ended by itself');
});

test('PageHashQueue: pages queued after each change end with their last content\'s hash, in shared memory or not', async (t) => {
  for (const shared of [true, false]) {
    const hasher = hasherFor(t, 2);
    const pages = 300;
    const memory = memoryWithPages(pages, shared);
    const q = hasher.queue(memory, BASE, pages);
    const u8 = new Uint8Array(memory.buffer);
    // Install every page once (in runs and out of order), then change some and queue them again,
    // as later rounds of a pre-copy do, while earlier ranges may still be hashing.
    for (let p = 0; p < pages; p += 2) q.add(p);
    for (let p = 1; p < pages; p += 2) q.add(p);
    await Promise.resolve();
    for (let round = 1; round <= 5; round++) {
      for (let p = round; p < pages; p += 7) {
        u8.fill(round * 31 + p, BASE + p * PAGE_SIZE, BASE + (p + 1) * PAGE_SIZE);
        q.add(p);
      }
      if (round % 2) await Promise.resolve(); // some rounds flushed apart, some together
    }
    await q.settled();
    assert.deepEqual([...q.out], expected(memory, pages), shared ? 'shared' : 'not shared');
    assert.equal(q.out.buffer instanceof SharedArrayBuffer, true);
  }
});

test('PageHashQueue: ranges whose thread is gone are hashed on this thread, in order', async (t) => {
  const hasher = hasherFor(t, 1);
  const pages = 64;
  const memory = memoryWithPages(pages, true);
  const q = hasher.queue(memory, BASE, pages);
  for (let p = 0; p < pages; p++) q.add(p);
  const closing = hasher.close(); // its thread goes while the range is queued
  const u8 = new Uint8Array(memory.buffer);
  u8.fill(9, BASE, BASE + PAGE_SIZE);
  q.add(0);
  await closing;
  await q.settled();
  assert.deepEqual([...q.out], expected(memory, pages));
});

test('PageHashQueue: settled() hashes what its thread has not begun while that thread is busy with other work', async (t) => {
  const hasher = hasherFor(t, 1);
  const pages = 300;
  const memory = memoryWithPages(pages, true);
  const q = hasher.queue(memory, BASE, pages);
  // The queue's one thread takes a hash job of 1 GiB (it runs jobs between ranges): busy for a while.
  const big = new WebAssembly.Memory({ initial: 16384, maximum: 16384, shared: true });
  let bigDone = false;
  const busy = hasher.hash(big, 0, (1 << 30) / PAGE_SIZE).then(() => { bigDone = true; });
  await new Promise((r) => setTimeout(r, 5));
  const u8 = new Uint8Array(memory.buffer);
  for (let p = 0; p < pages; p += 3) q.add(p);
  await Promise.resolve();
  for (let p = 0; p < pages; p++) {
    if (p % 5 === 0) u8.fill(p, BASE + p * PAGE_SIZE, BASE + (p + 1) * PAGE_SIZE); // changed after its first queueing
    q.add(p);
  }
  await q.settled();
  assert.equal(bigDone, false, 'settled without waiting for the thread to finish its job');
  assert.deepEqual([...q.out], expected(memory, pages));
  await busy;
  q.close();
});

test('PageHashQueue: the thread and settled() taking ranges in turn leave every page with its last content\'s hash', async (t) => {
  const hasher = hasherFor(t, 1);
  const pages = 512;
  const memory = memoryWithPages(pages, true);
  const q = hasher.queue(memory, BASE, pages);
  q.hurry(); // the thread is woken for every range: it and settled() race for them
  const u8 = new Uint8Array(memory.buffer);
  let seed = 7;
  const rand = (n: number) => (seed = (seed * 1103515245 + 12345) >>> 0) % n;
  for (let p = 0; p < pages; p++) q.add(p);
  for (let step = 0; step < 300; step++) {
    for (let k = rand(40); k > 0; k--) {
      const p = rand(pages);
      const n = 1 + rand(Math.min(8, pages - p));
      u8.fill(step, BASE + p * PAGE_SIZE + rand(PAGE_SIZE), BASE + (p + n) * PAGE_SIZE);
      q.addRange(p, n);
    }
    if (rand(3) === 0) await Promise.resolve(); // some flushed apart
    if (rand(4) === 0) {
      await q.settled();
      assert.deepEqual([...q.out], expected(memory, pages), `step ${step}`);
    }
  }
  await q.settled();
  q.close();
  assert.deepEqual([...q.out], expected(memory, pages));
});

test('PageHashQueue: more separate ranges than its ring holds, and pages of memory grown meanwhile, all end with their hash', async (t) => {
  const hasher = hasherFor(t, 1);
  // Memory that grows (as a destination's does when the guest grew): pages beyond its first size are queued later.
  const first = 9000;
  const pages = 12000;
  const maxWasm = Math.ceil((BASE + pages * PAGE_SIZE) / 65536);
  const memory = new WebAssembly.Memory({ initial: Math.ceil((BASE + first * PAGE_SIZE) / 65536), maximum: maxWasm, shared: true });
  const fill = (from: number, to: number) => {
    const u8 = new Uint8Array(memory.buffer);
    for (let p = from; p < to; p++) u8.fill((p * 7) & 255, BASE + p * PAGE_SIZE + (p % 4000), BASE + p * PAGE_SIZE + (p % 4000) + 9);
  };
  fill(0, first);
  const q = hasher.queue(memory, BASE, pages);
  // Every other page: 4500 ranges of one page each in a single turn, more than the ring's 4096.
  for (let p = 0; p < first; p += 2) q.add(p);
  await Promise.resolve();
  for (let p = 1; p < first; p += 2) q.add(p);
  memory.grow(maxWasm - memory.buffer.byteLength / 65536);
  fill(first, pages);
  q.addRange(first, pages - first);
  await q.settled();
  q.close();
  assert.deepEqual([...q.out], expected(memory, pages));
});

test('PageHashQueue: a closed queue lets its thread go (no process kept alive) and takes no more pages', () => {
  const url = new URL('../../src/node/vm/page-hasher.js', import.meta.url).href;
  const script = `import { PageHasher } from ${JSON.stringify(url)};
const h = new PageHasher(1);
const m = new WebAssembly.Memory({ initial: 2, maximum: 2, shared: true });
const q = h.queue(m, 0, 32);
q.addRange(0, 32);
await q.settled();
q.close();
console.log(h.running);
try { q.add(1); console.log('taken'); } catch (e) { console.log(e.constructor.name); }`;
  const r = runModuleScript(script);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trim(), '1\nBugIndicatingError', 'its thread served the queue; the process ended by itself once the queue closed');
});

test('PageHashQueue: while a thread serves a queue, the same threads still answer hash() (a host migrating VMs in and out at once)', async (t) => {
  const hasher = hasherFor(t, 2);
  const memory = memoryWithPages(64, true);
  const q = hasher.queue(memory, BASE, 64);
  q.addRange(0, 10);
  await q.settled(); // thread 0 now sleeps on the queue's ring
  const other = memoryWithPages(100, true);
  new Uint8Array(other.buffer).fill(5, BASE, BASE + 40 * PAGE_SIZE);
  assert.deepEqual([...(await hasher.hash(other, BASE, 100))], expected(other, 100));
  q.addRange(10, 54);
  await q.settled();
  q.close();
  assert.deepEqual([...q.out], expected(memory, 64));
});

test('PageHasher: its threads let go of the guest memories they hashed (a host whose VMs come and go stays its size)', async (t) => {
  const hasher = hasherFor(t, 2);
  const MiB = 1 << 20;
  const rss = () => process.memoryUsage().rss;
  const pages = (64 * MiB) / PAGE_SIZE;
  const settle = async () => {
    collectNow(); // this thread's references
    await new Promise((r) => setTimeout(r, 400)); // the threads collect once they have been quiet for 100 ms
    collectNow();
  };
  // One memory first: threads started, code loaded, so that what follows measures only the memories.
  for (let k = 0; k < 2; k++) {
    const m = new WebAssembly.Memory({ initial: 1024, maximum: 1024, shared: true });
    new Uint8Array(m.buffer).fill(1);
    await hasher.hash(m, 0, pages);
  }
  await settle();
  const before = rss();
  for (let k = 0; k < 24; k++) {
    // 64 MiB each, every byte written (so the memory is resident), hashed both ways a migration does.
    const m = new WebAssembly.Memory({ initial: 1024, maximum: 1024, shared: true });
    new Uint8Array(m.buffer).fill(k + 1);
    await hasher.hash(m, 0, pages);
    const q = hasher.queue(m, 0, pages);
    q.addRange(0, pages);
    await q.settled();
    q.close();
  }
  await settle();
  const grown = (rss() - before) / MiB;
  // Kept, the 24 memories would be 1536 MiB (measured before the fix: 64 MiB more per memory).
  assert.ok(grown < 384, `resident memory grew by ${grown.toFixed(0)} MiB after 24 memories of 64 MiB were hashed and dropped`);
});

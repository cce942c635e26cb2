import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { xxh3 } from '@node-rs/xxhash';
import { BugIndicatingError } from '../../src/core/errors.js';
import { PAGE_SIZE } from '../../src/core/pages.js';
import { nativeDir } from '../../src/node/paths.js';
import { hashPage, hashPages, pageHashBackend, pageHashIsa } from '../../src/node/vm/page-hash.js';

/** `n` pages of shared memory, every byte set (each page differs). */
function pages(n: number): Uint8Array {
  const u8 = new Uint8Array(new SharedArrayBuffer(n * PAGE_SIZE));
  for (let i = 0; i < u8.length; i++) u8[i] = (i * 2654435761) >>> 24;
  return u8;
}
const reference = (u8: Uint8Array, p: number) => xxh3.xxh64(u8.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE));

test('page hash: the native library is what hashes wherever the build made it', () => {
  const built = existsSync(join(nativeDir(), 'page-hash.so'));
  assert.equal(pageHashBackend(), built ? 'native' : 'node-rs');
  // The test suite runs after `npm run build` on a machine set up by scripts/setup.sh: built there.
  if (process.env.CI) assert.ok(built, 'npm run build made build/native/page-hash.so');
});

test('page hash: hashPage and hashPages give XXH3-64 (seed 0) of each page, as @node-rs/xxhash computes it', () => {
  const u8 = pages(300);
  const out = new BigUint64Array(300);
  hashPages(u8, out);
  for (let p = 0; p < 300; p++) assert.equal(out[p], reference(u8, p), `page ${p}`);
  assert.equal(hashPage(u8.subarray(7 * PAGE_SIZE, 8 * PAGE_SIZE)), reference(u8, 7));
  assert.equal(hashPage(new Uint8Array(PAGE_SIZE)), xxh3.xxh64(new Uint8Array(PAGE_SIZE)), 'a zero page');
  assert.notEqual(out[0], out[1]);
  // Into part of a larger array: only that part is written.
  const wide = new BigUint64Array(10).fill(5n);
  hashPages(u8.subarray(PAGE_SIZE, 4 * PAGE_SIZE), wide.subarray(2, 5));
  assert.deepEqual([...wide], [5n, 5n, reference(u8, 1), reference(u8, 2), reference(u8, 3), 5n, 5n, 5n, 5n, 5n]);
});

test('page hash: each instruction set the library was built for hashes alike where the CPU has it, and the best is used', { skip: !existsSync(join(nativeDir(), 'page-hash.so')) && 'the native library was not built' }, () => {
  // Built for every CPU of its architecture (not -march=native, whose library would kill a host with
  // an older CPU on its first hash): on x86-64 one variant per instruction set, picked at run time.
  const koffi = createRequire(import.meta.url)('koffi') as { load(path: string): { func(decl: string): (...args: unknown[]) => number } };
  const withIsa = koffi.load(join(nativeDir(), 'page-hash.so')).func('int ferry_hash_pages_with(const char *isa, void *pages, size_t count, size_t pageSize, void *out)');
  const flags = /^flags\s*:(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1].trim().split(/\s+/) ?? [];
  const cpuHas = (isa: string) => isa === 'sse2' || isa === 'base' || flags.includes(isa === 'avx512' ? 'avx512f' : isa);
  const isas = process.arch === 'x64' ? ['sse2', 'avx2', 'avx512'] : ['base'];
  const u8 = pages(40);
  const want = Array.from({ length: 40 }, (_, p) => reference(u8, p));
  for (const isa of isas) {
    const out = new BigUint64Array(40);
    const ran = withIsa(isa, u8, 40, PAGE_SIZE, out);
    assert.equal(ran, cpuHas(isa) ? 1 : 0, `${isa}: run where the CPU has it, and only there`);
    assert.deepEqual([...out], ran ? want : new Array<bigint>(40).fill(0n), isa);
  }
  assert.equal(withIsa('mmx', u8, 40, PAGE_SIZE, new BigUint64Array(40)), 0, 'a variant the library does not have');
  assert.equal(pageHashIsa(), [...isas].reverse().find(cpuHas));
});

test('page hash: bytes that are not whole pages for the hashes asked are a bug, and nothing is written', () => {
  const out = new BigUint64Array(2).fill(9n);
  assert.throws(() => hashPages(pages(3), out), BugIndicatingError);
  assert.throws(() => hashPages(new Uint8Array(PAGE_SIZE + 1), new BigUint64Array(1)), BugIndicatingError);
  assert.deepEqual([...out], [9n, 9n]);
  hashPages(new Uint8Array(0), new BigUint64Array(0)); // nothing to hash
});

/**
 * Hashes `u8`'s pages on a thread of its own with the page-hash module at `url`: which backend
 * that thread used, its hashes and whether it loaded the fallback's package, or the error its
 * import or hashing raised.
 */
async function hashOnThread(url: string, u8: Uint8Array, env: NodeJS.ProcessEnv = process.env): Promise<{ backend?: string; out?: BigUint64Array; fallbackLoaded?: boolean; error?: string }> {
  const w = new Worker(`
    const { workerData, parentPort } = require('node:worker_threads');
    import(${JSON.stringify(url)}).then(({ hashPages, pageHashBackend }) => {
      const out = new BigUint64Array(workerData.length / ${PAGE_SIZE});
      hashPages(workerData, out);
      const fallbackLoaded = Object.keys(require.cache).some((k) => k.includes('@node-rs'));
      parentPort.postMessage({ backend: pageHashBackend(), out, fallbackLoaded });
    }).catch((e) => parentPort.postMessage({ error: String(e) }));`, { eval: true, workerData: u8, env });
  try {
    return await new Promise((resolve, reject) => { w.once('message', resolve); w.once('error', reject); });
  } finally {
    await w.terminate();
  }
}

test('page hash: the fallback (FERRY_PAGE_HASH=node-rs) hashes alike on its own thread', async () => {
  const u8 = pages(5);
  const got = await hashOnThread(new URL('../../src/node/vm/page-hash.js', import.meta.url).href, u8, { ...process.env, FERRY_PAGE_HASH: 'node-rs' });
  assert.equal(got.error, undefined);
  assert.equal(got.backend, 'node-rs');
  assert.equal(got.fallbackLoaded, true);
  assert.deepEqual([...got.out!], [0, 1, 2, 3, 4].map((p) => reference(u8, p)));
  const native = new BigUint64Array(5);
  hashPages(u8, native);
  assert.deepEqual([...native], [...got.out!], 'this thread\'s hashes are the same');
});

test('page hash: a thread that hashes natively never loads the fallback package', { skip: !existsSync(join(nativeDir(), 'page-hash.so')) && 'the native library was not built' }, async () => {
  // Imported as a module, the CommonJS package had node scan its 29 KB loader for exports on
  // every thread that imports page-hash (each vCPU, hashing and fault thread): ~65 ms of CPU each.
  const u8 = pages(2);
  const got = await hashOnThread(new URL('../../src/node/vm/page-hash.js', import.meta.url).href, u8);
  assert.equal(got.error, undefined);
  assert.equal(got.backend, 'native');
  assert.equal(got.fallbackLoaded, false);
  assert.deepEqual([...got.out!], [0, 1].map((p) => reference(u8, p)));
});

test('page hash: a native library that does not load leaves the fallback hashing, alike', async () => {
  const { cpSync, mkdtempSync, mkdirSync, writeFileSync, rmSync, symlinkSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const root = mkdtempSync(join(tmpdir(), 'ferry-hash-'));
  try {
    // A copy of the package layout whose build/native/page-hash.so is not a library.
    const here = new URL('../../', import.meta.url).pathname; // dist/
    mkdirSync(join(root, 'build', 'native'), { recursive: true });
    writeFileSync(join(root, 'build', 'native', 'page-hash.so'), 'not an ELF file');
    symlinkSync(join(here, '..', 'node_modules'), join(root, 'node_modules'));
    symlinkSync(join(here, '..', 'package.json'), join(root, 'package.json'));
    // A copy, not a link: node resolves a module's links to its real path, whose package root is ours.
    cpSync(join(here, 'src'), join(root, 'dist', 'src'), { recursive: true });
    const u8 = pages(3);
    const got = await hashOnThread(new URL(`file://${join(root, 'dist', 'src', 'node', 'vm', 'page-hash.js')}`).href, u8);
    assert.equal(got.error, undefined);
    assert.equal(got.backend, 'node-rs');
    assert.deepEqual([...got.out!], [0, 1, 2].map((p) => reference(u8, p)));
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

/**
 * The page hash of the memory digest (EngineDeps.hashPage): XXH3-64 (seed 0) of one page, read in
 * place. Every thread that hashes pages for a digest (the engine's, the fault threads, the page
 * hasher) uses this module, so their hashes agree — and so do two hosts' (protocol version 6).
 *
 * Hashes come from ferry's native page hashing (native/page-hash.c, built by `npm run build` into
 * build/native/page-hash.so, called through koffi), which hashes a run of pages in one call: every
 * page a migration moves is hashed on both hosts, and one call per page from JavaScript cost more
 * than the hash (measured: ~5 GB/s for @node-rs/xxhash's xxh64 per page, against ~30 GB/s for the
 * native loop on pages in cache). The library runs on any CPU of its architecture, with the best
 * vector instructions the CPU has ({@link pageHashIsa}). Where it was not built (no C compiler or
 * no xxhash.h when building), @node-rs/xxhash's XXH3 gives the same values, much more slowly:
 * {@link pageHashBackend} says which this thread uses. Loaded on a thread's first hash (~30 ms when
 * the thread has not loaded koffi yet), so threads that hash on a deadline hash once as they start.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { BugIndicatingError } from '../../core/errors.js';
import { PAGE_SIZE } from '../../core/pages.js';
import { nativeDir } from '../paths.js';

type HashRun = (pages: Uint8Array, count: number, pageSize: number, out: BigUint64Array) => void;

/** The native loop and the instruction set it uses, or null where it was not built (or cannot load); looked up once per thread. */
let native: { run: HashRun; isa: string } | null | undefined;

function nativeHashRun(): HashRun | null {
  return nativeLib()?.run ?? null;
}

function nativeLib(): { run: HashRun; isa: string } | null {
  if (native !== undefined) return native;
  native = null;
  const lib = join(nativeDir(), 'page-hash.so');
  if (process.env.FERRY_PAGE_HASH !== 'node-rs' && existsSync(lib)) {
    try {
      const koffi = createRequire(import.meta.url)('koffi') as { load(path: string): { func(decl: string): (...args: unknown[]) => unknown } };
      const l = koffi.load(lib);
      const run = l.func('void ferry_hash_pages(void *pages, size_t count, size_t pageSize, void *out)') as HashRun;
      native = { run, isa: String(l.func('const char *ferry_hash_isa(void)')()) };
    } catch {
      // A library that does not load (built elsewhere, damaged) hashes nothing: the fallback gives
      // the same values, and pageHashBackend() says which is in use.
      native = null;
    }
  }
  return native;
}

/**
 * The instruction set the native library hashes with on this CPU — 'avx512', 'avx2' or 'sse2' on
 * x86-64 (the best the CPU has), 'base' elsewhere — or null where the fallback hashes.
 */
export function pageHashIsa(): string | null {
  return nativeLib()?.isa ?? null;
}

/** Which implementation hashes pages on this thread: 'native' (build/native/page-hash.so) or 'node-rs' (@node-rs/xxhash, the fallback; FERRY_PAGE_HASH=node-rs asks for it). */
export function pageHashBackend(): 'native' | 'node-rs' {
  return nativeHashRun() ? 'native' : 'node-rs';
}

/**
 * The fallback's XXH3-64, loaded on first use: imported from a module, this CommonJS package had
 * node scan its 29 KB loader for exports in every thread that imports this module — each vCPU,
 * hashing and fault thread — which cost each thread ~25 ms to start and ~65 ms of CPU (the
 * scanner compiled by V8's optimizing compiler, on the cores a migration uses).
 */
let fallback: ((page: Uint8Array) => bigint) | undefined;
function xxh64(page: Uint8Array): bigint {
  if (!fallback) {
    const { xxh3 } = createRequire(import.meta.url)('@node-rs/xxhash') as { xxh3: { xxh64(input: Uint8Array): bigint } };
    fallback = (p) => xxh3.xxh64(p);
  }
  return fallback(page);
}

const one = new BigUint64Array(1);

/** XXH3-64 (seed 0) of `page` (any length; a digest hashes whole pages). */
export function hashPage(page: Uint8Array): bigint {
  const run = nativeHashRun();
  if (!run) return xxh64(page);
  run(page, 1, page.length, one);
  return one[0];
}

/** out[i] = hashPage of page i of `pages` (out.length whole pages, in place: `pages` may be a view of guest memory). */
export function hashPages(pages: Uint8Array, out: BigUint64Array): void {
  if (pages.length !== out.length * PAGE_SIZE) throw new BugIndicatingError(`hashPages: ${pages.length} bytes are not ${out.length} pages`);
  if (out.length === 0) return;
  const run = nativeHashRun();
  if (run) run(pages, out.length, PAGE_SIZE, out);
  else for (let i = 0; i < out.length; i++) out[i] = xxh64(pages.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
}

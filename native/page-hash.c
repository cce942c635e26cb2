/*
 * ferry's page hashing: XXH3-64 (seed 0) of each 4 KiB page of a run, from the xxHash library
 * (Debian's libxxhash-dev header, inlined), called through koffi by src/node/vm/page-hash.ts.
 *
 * Why a C loop: the memory digest hashes every page a migration moves, on both hosts. Called once
 * per page from JavaScript, a hash paid for the call, the page's view and a BigInt each time
 * (xxh64 from @node-rs/xxhash: ~5 GB/s on the machines measured; its XXH3: ~1 GB/s); one call per
 * run of pages, writing the hashes straight into the caller's BigUint64Array, runs at the speed
 * of XXH3 itself (~30 GB/s on pages in cache, memory bandwidth otherwise).
 *
 * Portable: a library built on one machine runs on any CPU of its architecture. On x86-64 this
 * file is compiled once per instruction set (FERRY_VARIANT names the function: SSE2, which every
 * x86-64 CPU has, AVX2 and AVX-512, each with the compiler flag that makes xxHash use it), and
 * once more without FERRY_VARIANT as the dispatcher, which asks the CPU once which it may use.
 * Built with -march=native (as it was), a build/ directory copied to a host with an older CPU
 * would kill that host on its first hash (SIGILL, which nothing in node can catch). Elsewhere
 * there is one variant, for the architecture's baseline. See scripts/build-native.mjs.
 */
#include <stddef.h>
#include <stdint.h>

typedef void hash_pages_fn(const uint8_t *pages, size_t count, size_t page_size, uint64_t *out);

#ifdef FERRY_VARIANT

#define XXH_INLINE_ALL
#include <xxhash.h>

/* out[i] = XXH3-64 (seed 0) of pages[i * page_size .. (i + 1) * page_size), for i in [0, count). */
void FERRY_VARIANT(const uint8_t *pages, size_t count, size_t page_size, uint64_t *out) {
  for (size_t i = 0; i < count; i++) out[i] = XXH3_64bits(pages + i * page_size, page_size);
}

#else /* the dispatcher: ferry_hash_pages, ferry_hash_isa, ferry_hash_pages_with */

#include <string.h>

/* __builtin_cpu_supports also checks that the OS saves the registers; it takes a literal only. */
#if defined(FERRY_DISPATCH_X86)
hash_pages_fn ferry_hash_pages_sse2, ferry_hash_pages_avx2, ferry_hash_pages_avx512;
static int has_avx512(void) { __builtin_cpu_init(); return __builtin_cpu_supports("avx512f"); }
static int has_avx2(void) { __builtin_cpu_init(); return __builtin_cpu_supports("avx2"); }
static const struct { const char *name; int (*has)(void); hash_pages_fn *fn; } variants[] = {
  /* Best first; the last runs everywhere (has: NULL). */
  { "avx512", has_avx512, ferry_hash_pages_avx512 },
  { "avx2", has_avx2, ferry_hash_pages_avx2 },
  { "sse2", NULL, ferry_hash_pages_sse2 },
};
#else
hash_pages_fn ferry_hash_pages_base;
static const struct { const char *name; int (*has)(void); hash_pages_fn *fn; } variants[] = {
  { "base", NULL, ferry_hash_pages_base },
};
#endif

static int supported(size_t i) { return !variants[i].has || variants[i].has(); }

#define VARIANTS (sizeof variants / sizeof variants[0])

/* The best variant this CPU runs; chosen on the first call (threads that race choose alike). */
static size_t chosen = (size_t)-1;
static size_t choose(void) {
  size_t c = chosen;
  if (c != (size_t)-1) return c;
  for (c = 0; c + 1 < VARIANTS && !supported(c); c++) {}
  chosen = c;
  return c;
}

void ferry_hash_pages(const uint8_t *pages, size_t count, size_t page_size, uint64_t *out) {
  variants[choose()].fn(pages, count, page_size, out);
}

/* The instruction set ferry_hash_pages uses here: "avx512", "avx2", "sse2" (x86-64) or "base". */
const char *ferry_hash_isa(void) { return variants[choose()].name; }

/* Hashes with the variant named `isa` if this CPU runs it (returns 1), else does nothing (0): for tests. */
int ferry_hash_pages_with(const char *isa, const uint8_t *pages, size_t count, size_t page_size, uint64_t *out) {
  for (size_t i = 0; i < VARIANTS; i++) {
    if (strcmp(variants[i].name, isa) || !supported(i)) continue;
    variants[i].fn(pages, count, page_size, out);
    return 1;
  }
  return 0;
}

#endif
